//! Ports for servers that are told a port number instead of being handed a listener (nats-server, weed mini, the
//! Prometheus exporter, a child process's gRPC port). Probing with a port-0 bind and dropping it is racy: the kernel
//! may hand the same port to the next port-0 bind in this process (a fake segmenter, a callback receiver) before the
//! server binds it; that made a test read /metrics from a gRPC server. These come from below the kernel's ephemeral
//! range, which port-0 binds never use, and never twice in one process.
//!
//! Nor twice across processes: nextest runs each test in its own process, and two of them probing the same free port
//! before either server bound it started one test's orchestrator on the port the other test's client then called
//! (a job of one test accepted by the other's replica). Each port handed out is claimed with an exclusive lock on a
//! file named after it, held until this process exits (the kernel drops it even on a SIGKILL); a port another live
//! process claimed is skipped.

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// The first port of the kernel's ephemeral range (32768 unless configured otherwise).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Where the claims live: one directory per machine, shared by every checkout's tests.
fn claims_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("palette-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Claims `port` for this process's lifetime; false when another live process holds it. Without a usable claims
/// directory (or locks) the probe bind alone decides, as before.
fn claim(port: u16) -> bool {
    static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());
    let Ok(file) = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(claims_dir().join(format!("{port}.lock")))
    else {
        return true;
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return false,
        // No locks on this filesystem: the probe bind alone decides.
        Err(std::fs::TryLockError::Error(_)) => return true,
    }
    HELD.lock().unwrap_or_else(|p| p.into_inner()).push(file);
    true
}

/// A loopback port that is free now, outside the ephemeral range, and not handed out before by this process or any
/// other live one.
pub fn free_port() -> u16 {
    static HANDED_OUT: AtomicU32 = AtomicU32::new(0);
    let end = ephemeral_start().min(u32::from(u16::MAX));
    let start = end.saturating_sub(12_000).max(1024);
    let span = end - start;
    // Test processes start one after another with nearby pids: spread their first ports over the range (Fibonacci
    // hashing), so they rarely meet a port another one claimed.
    let offset =
        (u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32 % span;
    for _ in 0..span {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        let port = (start + (offset + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && claim(port) {
            return port;
        }
    }
    panic!("no free loopback port in {start}..{end}");
}
