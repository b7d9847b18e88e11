//! The docs stay true: every `sh` block of docs/api.md runs against both services, and docs/configuration.md is
//! exactly what the services' own flag definitions generate (`UPDATE_DOCS=1 cargo test -p palette-e2e --test docs`
//! rewrites it after a change).

use std::path::PathBuf;
use std::process::Command;

use clap::CommandFactory;
use palette_e2e::{example_photos, repo_root, start_orchestrator, start_segmenter};

fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_example_runs() {
    let tools = PathBuf::from(std::env::var("PALETTE_TOOLS_BIN").unwrap_or_default());
    if !tools.join("grpcurl").is_file() {
        assert!(
            std::env::var("PALETTE_REQUIRE_TOOLS").is_err(),
            "grpcurl missing: run .ci/setup"
        );
        eprintln!("SKIPPED: grpcurl not found (run .ci/setup)");
        return;
    }
    let mut segmenter = start_segmenter().await;
    let storage = tempfile::tempdir().unwrap();
    let photo = example_photos().remove(0).1;
    for job in ["test-job", "test-job-2"] {
        let dir = storage.path().join(format!("inputs/test-user/{job}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("0.jpg"), &photo).unwrap();
    }
    let mut config = orchestrator_svc::Config::for_tests(storage.path(), segmenter.url());
    config.limits.presets_dir = repo_root().join("presets");
    let mut orchestrator = start_orchestrator(config.clone()).await;
    // The TLS examples' server: mutual TLS and a token, certificates in the files deploy/dev-certs.sh writes.
    let pki = palette_testing::tls::Pki::generate();
    pki.serve_tls(&mut config.serve, true);
    config.serve.auth_tokens = Some(palette_testing::tls::TOKEN.into());
    let secure = palette_testing::orchestrator::start(&segmenter.url(), |c| *c = config).await;
    palette_testing::server::wait_serving_on(pki.endpoint(secure.addr, Some("client")), "").await;

    let doc = std::fs::read_to_string(repo_root().join("docs/api.md")).unwrap();
    let blocks = sh_blocks(&doc);
    assert!(blocks.len() >= 8, "docs/api.md lost its examples");
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (seg, orch) = (segmenter.addr.to_string(), orchestrator.addr.to_string());
    // By name: grpcurl checks the certificate against the name it dials.
    let secure_orch = format!("localhost:{}", secure.addr.port());
    let certs = pki.dir().to_path_buf();
    for block in blocks {
        let script = format!("set -euo pipefail\n{block}");
        let out = tokio::task::spawn_blocking({
            let (path, seg, orch) = (path.clone(), seg.clone(), orch.clone());
            let (secure_orch, certs) = (secure_orch.clone(), certs.clone());
            move || {
                Command::new("bash")
                    .arg("-c")
                    .arg(script)
                    .current_dir(repo_root())
                    .env("PATH", path)
                    .env("SEGMENTER", seg)
                    .env("ORCHESTRATOR", orch)
                    .env("SECURE_ORCHESTRATOR", secure_orch)
                    .env("CERTS", certs)
                    .env("TOKEN", palette_testing::tls::TOKEN)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "docs/api.md example failed:\n{block}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    orchestrator.stop().await.unwrap();
    segmenter.stop().await.unwrap();
}

/// One markdown table per service, from the clap definitions: flag, environment variable, default, help.
fn configuration_markdown() -> String {
    let mut out = String::from(
        "# Configuration reference\n\nGenerated from the services' flag definitions by `tests/tests/docs.rs` and \
         checked by it in CI: regenerate with `UPDATE_DOCS=1 cargo test -p palette-e2e --test docs`. Every flag can \
         also be given as its environment variable; the seed's variable names are kept.\n",
    );
    let services = [
        ("segmenter-svc", segmenter_svc::Config::command()),
        ("orchestrator-svc", orchestrator_svc::Config::command()),
    ];
    for (name, command) in services {
        out.push_str(&format!("\n## {name}\n\n| environment variable | flag | default | meaning |\n|---|---|---|---|\n"));
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            let env = arg
                .get_env()
                .map(|e| format!("`{}`", e.to_string_lossy()))
                .unwrap_or_default();
            let default = arg
                .get_default_values()
                .iter()
                .map(|v| format!("`{}`", v.to_string_lossy()))
                .collect::<Vec<_>>()
                .join(", ");
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string().replace('\n', " ").replace('|', "\\|"))
                .unwrap_or_default();
            out.push_str(&format!("| {env} | `--{long}` | {default} | {help} |\n"));
        }
    }
    out
}

#[test]
fn configuration_reference_matches_the_code() {
    let path = repo_root().join("docs/configuration.md");
    let generated = configuration_markdown();
    if std::env::var("UPDATE_DOCS").as_deref() == Ok("1") {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/configuration.md is stale: run UPDATE_DOCS=1 cargo test -p palette-e2e --test docs"
    );
}
