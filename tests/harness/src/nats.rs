//! A real NATS server with JetStream for tests: `nats-server` (Debian package `nats-server`) on a free loopback
//! port. Skipped with a loud message when it is missing, unless PALETTE_REQUIRE_NATS=1 (CI), which makes it fail.

use crate::ports::free_port;
use std::io::Read;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct Nats {
    child: Child,
    pub url: String,
    port: u16,
    name: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// Stops the server (SIGKILL: nothing flushed beyond what JetStream already synced), waits `down`, and starts
    /// it again on the same port and store directory, as a crashed and restarted server comes back.
    pub fn restart(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = spawn(self.port, &self.name, self._dir.path());
        let deadline = Instant::now() + Duration::from_secs(15);
        while !greets_as(self.port, &self.name) {
            assert!(Instant::now() < deadline, "nats-server did not come back");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Nats {
    /// Stops the server's process (SIGSTOP) until `thaw`: requests sent meanwhile wait in its socket, their callers
    /// time out, and the server still carries them out once thawed (a write committed whose answer was lost).
    pub fn freeze(&self) {
        signal(self.child.id(), "-STOP");
    }

    pub fn thaw(&self) {
        signal(self.child.id(), "-CONT");
    }
}

fn signal(pid: u32, which: &str) {
    let status = Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {which} {pid}");
}

fn spawn(port: u16, name: &str, dir: &std::path::Path) -> Child {
    Command::new("nats-server")
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-n",
            name,
            "-sd",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server did not start")
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "palette-test-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::SeqCst)
        );
        let mut child = spawn(port, &name, dir.path());
        // Ready when the port greets with THIS server's INFO (not another test's server, nor another listener).
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut ready = false;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if greets_as(port, &name) {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            continue;
        }
        return Some(Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            port,
            name,
            _dir: dir,
        });
    }
    panic!("nats-server did not start on any free port");
}

/// Whether 127.0.0.1:`port` answers with the INFO of the NATS server named `name`.
fn greets_as(port: u16, name: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut greeting = Vec::new();
    let mut buf = [0u8; 4096];
    while !greeting.ends_with(b"\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => greeting.extend_from_slice(&buf[..n]),
        }
    }
    let greeting = String::from_utf8_lossy(&greeting);
    greeting.starts_with("INFO ") && greeting.contains(&format!("\"server_name\":\"{name}\""))
}
