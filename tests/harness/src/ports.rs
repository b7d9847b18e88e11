//! Ports for servers that are told a port number instead of being handed a listener (nats-server, weed mini, the
//! Prometheus exporter). Probing with a port-0 bind and dropping it is racy: the kernel may hand the same port to
//! the next port-0 bind in this process (a fake segmenter, a callback receiver) before the server binds it; that
//! made a test read /metrics from a gRPC server. These come from below the kernel's ephemeral range, which port-0
//! binds never use, and never twice in one process.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The first port of the kernel's ephemeral range (32768 unless configured otherwise).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A loopback port that is free now, outside the ephemeral range, and not returned before in this process.
pub fn free_port() -> u16 {
    static HANDED_OUT: AtomicU32 = AtomicU32::new(0);
    let end = ephemeral_start().min(u32::from(u16::MAX));
    let start = end.saturating_sub(12_000).max(1024);
    let span = end - start;
    // Test binaries run one after another, but two checkouts' CI could overlap: start each process elsewhere.
    let offset = std::process::id() % span;
    for _ in 0..span {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        let port = (start + (offset + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {start}..{end}");
}
