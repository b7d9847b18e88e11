//! A TCP proxy in front of a server that a test can cut off and bring back: a peer gone without a FIN or RST (a lost
//! host, a network partition), for one client while the others still reach the server.
//!
//! `cut` stops carrying bytes either way while every connection stays open (silent, as a partition is). `heal`
//! closes the connections that lived through the cut, whose byte streams lost bytes in the middle, and carries new
//! ones again: the client notices, reconnects, and finds the server as the other clients left it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The proxy's address (`url`) and its switch; the proxy runs until the test's runtime ends.
pub struct Partition {
    /// `upstream` with this proxy's address in place of the server's, scheme kept (`nats://`, `http://`).
    pub url: String,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    cut: AtomicBool,
    /// Bumped by each heal: connections of an earlier generation that lived through a cut close.
    generation: AtomicU64,
}

impl Partition {
    /// A proxy to `upstream` (`scheme://host:port` or `host:port`), carrying bytes until `cut`.
    pub async fn start(upstream: &str) -> Partition {
        let (scheme, address) = match upstream.split_once("://") {
            Some((scheme, address)) => (format!("{scheme}://"), address.to_string()),
            None => (String::new(), upstream.to_string()),
        };
        let address = address.trim_end_matches('/').to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("{scheme}{}", listener.local_addr().unwrap());
        let state = Arc::new(State::default());
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // Accepted during a cut, the connection is made all the same (the client's SYN is answered here) and
                // carries nothing until the heal, like one made before it.
                let Ok(server) = tokio::net::TcpStream::connect(&address).await else {
                    continue;
                };
                let born = shared.generation.load(Ordering::SeqCst);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, shared.clone(), born));
                tokio::spawn(pump(server_read, client_write, shared.clone(), born));
            }
        });
        Partition { url, state }
    }

    /// From now on nothing passes either way; the connections stay open.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
    }

    /// Closes every connection made before now and carries bytes again.
    pub fn heal(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either ends, or a heal closes this connection (born before it); while cut, reads and
/// drops. A connection silent in the cut closes at its next byte after the heal.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, state: Arc<State>, born: u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut lost_bytes = false;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if state.cut.load(Ordering::SeqCst) {
            lost_bytes = true;
            continue;
        }
        if lost_bytes || state.generation.load(Ordering::SeqCst) != born {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
