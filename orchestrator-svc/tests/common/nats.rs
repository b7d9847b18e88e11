//! A real NATS server with JetStream for tests: `nats-server` (Debian package `nats-server`) on a free loopback
//! port. Skipped with a loud message when it is missing, unless PALETTE_REQUIRE_NATS=1 (CI), which makes it fail.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nats {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Nats {
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

/// Starts `nats-server -js`; None (after a loud message) when it is not installed.
pub fn start() -> Option<Nats> {
    let found = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("PALETTE_REQUIRE_NATS").as_deref() == Ok("1") {
            panic!(
                "PALETTE_REQUIRE_NATS=1 but `nats-server` is not on PATH (apt-get install nats-server)"
            );
        }
        eprintln!(
            "\n!!! SKIPPING NATS TESTS: `nats-server` is not on PATH (apt-get install nats-server); set PALETTE_REQUIRE_NATS=1 to fail instead\n"
        );
        return None;
    }
    // A free port can be taken by another test's server between the probe and the bind: then this server exits,
    // and another port is tried (connecting to the other test's server instead would mix the tests' jobs).
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server did not start");
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut exited = false;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if child.try_wait().unwrap().is_some() {
                exited = true;
                break;
            }
            assert!(Instant::now() < deadline, "nats-server never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        if exited || child.try_wait().unwrap().is_some() {
            continue;
        }
        return Some(Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _dir: dir,
        });
    }
    panic!("nats-server did not start on any free port");
}
