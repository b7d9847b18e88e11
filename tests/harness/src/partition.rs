//! A TCP proxy in front of a server that a test can cut off and bring back: a peer gone without a FIN or RST (a lost
//! host, a network partition), for one client while the others still reach the server.
//!
//! `cut` stops carrying bytes either way while every connection stays open (silent, as a partition is). `heal`
//! closes every connection made before it (their byte streams lost bytes in the middle, or may have) and carries new
//! ones again: the client notices, reconnects, and finds the server as the other clients left it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// The proxy's address (`url`) and its switch; the proxy runs until the test's runtime ends.
pub struct Partition {
    /// `upstream` with this proxy's address in place of the server's, scheme kept (`nats://`, `http://`).
    pub url: String,
    cut: Arc<AtomicBool>,
    /// Bumped by each heal: every connection made before it closes.
    heals: watch::Sender<u64>,
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
        let cut = Arc::new(AtomicBool::new(false));
        let (heals, _) = watch::channel(0u64);
        let (cut_flag, heal_watch) = (cut.clone(), heals.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // Accepted during a cut, the connection is made all the same (the client's SYN is answered here) and
                // carries nothing until the heal closes it, like one made before the cut.
                let Ok(server) = TcpStream::connect(&address).await else {
                    continue;
                };
                let healed = heal_watch.subscribe();
                tokio::spawn(carry(client, server, cut_flag.clone(), healed));
            }
        });
        Partition { url, cut, heals }
    }

    /// From now on nothing passes either way; the connections stay open.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Closes every connection made before now and carries bytes again.
    pub fn heal(&self) {
        self.heals.send_modify(|n| *n += 1);
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies bytes both ways until either side ends or a heal comes; while cut, reads and drops them. Both sockets are
/// dropped on return, so the client sees its connection close.
async fn carry(
    client: TcpStream,
    server: TcpStream,
    cut: Arc<AtomicBool>,
    mut healed: watch::Receiver<u64>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        tokio::select! {
            read = client_read.read(&mut up) => {
                let Ok(n @ 1..) = read else { return };
                if !cut.load(Ordering::SeqCst) && server_write.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            read = server_read.read(&mut down) => {
                let Ok(n @ 1..) = read else { return };
                if !cut.load(Ordering::SeqCst) && client_write.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
            _ = healed.changed() => return,
        }
    }
}
