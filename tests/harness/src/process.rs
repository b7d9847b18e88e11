//! A service as a real child process, for tests that kill it: SIGKILL leaves no destructor, no drain and no flushed
//! buffer behind, which an in-process server (or a runtime dropped in a thread) cannot imitate. Its output goes to a
//! log file in the caller's directory, printed when the test fails to start it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::free_port;

pub struct Process {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Process {
    /// Starts `binary` with exactly `env` (plus PATH) and GRPC_ADDR on a free loopback port; returns once it is
    /// SERVING. Output goes to `log`.
    pub async fn start(binary: &Path, env: &[(String, String)], log: &Path) -> Process {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("GRPC_ADDR", addr.to_string())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("the service binary did not start");
        let mut process = Process {
            child,
            addr,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        while crate::server::health(addr, "").await != serving {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!("exited with {status} before serving:\n{}", process.log());
            }
            assert!(
                Instant::now() < deadline,
                "not SERVING after 30 s:\n{}",
                process.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        process
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time and peak resident memory of the process so far, from /proc, as "1.23 CPU-s, peak RSS 45 MB".
    pub fn usage(&self) -> String {
        let read = |file: &str| std::fs::read_to_string(format!("/proc/{}/{file}", self.pid()));
        let (Ok(status), Ok(stat)) = (read("status"), read("stat")) else {
            return "(no /proc)".into();
        };
        let peak_mb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024);
        // utime and stime: fields 14 and 15, counted after the parenthesised command name.
        let ticks: Vec<u64> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|t| t.parse().ok())
            .collect();
        let cpu_s = ticks.iter().sum::<u64>() as f64 / 100.0;
        format!("{cpu_s:.2} CPU-s, peak RSS {peak_mb} MB")
    }

    /// A Jobs client for this process (connects on first use: the process may be restarting).
    pub fn jobs_client(
        &self,
    ) -> palette_proto::orchestrator::v1::jobs_client::JobsClient<tonic::transport::Channel> {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .expect("a socket address is a valid URI")
            .connect_lazy();
        palette_proto::orchestrator::v1::jobs_client::JobsClient::new(channel)
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; then waits (at most `limit`) for the exit. Returns how long the process took to exit, or None when
    /// it was still running at `limit` (it is then killed).
    pub async fn terminate(&mut self, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        // kill(1) rather than libc: the workspace denies unsafe code. The pid is our unwaited child's: not reused.
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -TERM failed");
        while started.elapsed() < limit {
            if self.child.try_wait().unwrap().is_some() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What every orchestrator process of the kill/replica tests is started with: no metrics port, INFO logs, the
/// segmenter at `segmenter`, signed callbacks to `callbacks` retried fast (10 ms, at most 1 s apart), two items in
/// flight. Each test adds its storage and job store, and overrides by pushing a later value of the same name.
pub fn orchestrator_env(segmenter: &str, callbacks: &str, secret: &str) -> Vec<(String, String)> {
    [
        ("METRICS_ADDR", ""),
        ("LOG_LEVEL", "INFO"),
        ("SEGMENTER_URL", segmenter),
        ("WORKERS_API_URL", callbacks),
        ("GPU_CALLBACK_SECRET", secret),
        ("CALLBACK_BASE_DELAY_MS", "10"),
        ("CALLBACK_MAX_DELAY_SEC", "1"),
        ("BATCH_CONCURRENCY", "2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}
