//! The limits `Serving::serve` puts on both listeners, seen from a client: health Watch streams (open to anyone,
//! each kept until shutdown) are capped at MAX_HEALTH_WATCHES, and every HTTP/2 connection is told
//! MAX_CONCURRENT_STREAMS in the server's SETTINGS. Without them one unauthenticated connection opened 100,000 Watch
//! streams on the orchestrator (116 MB to 658 MB RSS).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use futures::FutureExt;
use palette_service_kit::{ServeArgs, Serving, http2};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// The defaults, plaintext, no tokens, with a health-only listener too.
fn args() -> ServeArgs {
    Cli::try_parse_from(["test", "--health-addr", "127.0.0.1:0"])
        .unwrap()
        .serve
}

struct Running {
    addr: SocketAddr,
    health_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn start(args: &ServeArgs) -> Running {
    let serving = Serving::prepare(args, &[]).await.unwrap();
    let health_addr = serving.health_addr().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = palette_service_kit::health::reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serving.serve(
        health,
        tonic::service::Routes::default(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    Running {
        addr,
        health_addr,
        stop: Some(stop),
        server,
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn overall() -> HealthCheckRequest {
    HealthCheckRequest {
        service: String::new(),
    }
}

#[tokio::test]
async fn health_watches_past_the_cap_are_refused_and_the_first_stay_open() {
    assert_eq!(args().max_health_watches, 1024, "the default");
    let args = Cli::try_parse_from([
        "test",
        "--health-addr",
        "127.0.0.1:0",
        "--max-health-watches",
        "12",
    ])
    .unwrap()
    .serve;
    let per_connection = palette_service_kit::health::WATCHES_PER_CONNECTION;
    let mut running = start(&args).await;
    let watch_n = |client: &mut HealthClient<Channel>, n: usize| {
        let mut client = client.clone();
        async move {
            let mut open = Vec::with_capacity(n);
            for _ in 0..n {
                let mut stream = client.watch(overall()).await.unwrap().into_inner();
                let first = stream.message().await.unwrap().unwrap();
                assert_eq!(first.status, ServingStatus::Serving as i32);
                open.push(stream);
            }
            open
        }
    };
    // One connection (the measured attack used one) gets its share, not every slot.
    let mut client = HealthClient::new(channel(running.addr).await);
    let mut open = watch_n(&mut client, per_connection).await;
    let refused = client.watch(overall()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("this connection"), "{refused:?}");
    // Another client still watches, up to the server's cap (12), which the health-only listener shares.
    let mut other = HealthClient::new(channel(running.addr).await);
    open.extend(watch_n(&mut other, 12 - per_connection).await);
    let refused = other.watch(overall()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("MAX_HEALTH_WATCHES"),
        "{refused:?}"
    );
    let mut health_port = HealthClient::new(channel(running.health_addr).await);
    let refused = health_port.watch(overall()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Check is never refused.
    let checked = health_port.check(overall()).await.unwrap().into_inner();
    assert_eq!(checked.status, ServingStatus::Serving as i32);
    client.check(overall()).await.unwrap();

    // The first ones are still open: nothing ended them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for stream in &mut open {
        assert!(stream.message().now_or_never().is_none(), "a Watch ended");
    }

    // A stream the client drops gives its slots back (the server's and its connection's).
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut again = loop {
        match other.watch(overall()).await {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the dropped Watch's slot never came back"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    assert_eq!(
        again.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    open.push(again);

    // Shutdown still ends every one of them (a last NOT_SERVING), so the server stops.
    running.stop.take().unwrap().send(()).unwrap();
    for stream in &mut open {
        let last = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(last.status, ServingStatus::NotServing as i32);
    }
    drop(open);
    tokio::time::timeout(Duration::from_secs(10), running.server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A client gone without a FIN or RST (a peer behind NAT that vanished, a proxy that hangs) would hold its streams,
/// and so its health Watch slots, until shutdown: the server's HTTP/2 keepalive pings a silent connection every
/// `keepalive_interval` and closes it when a ping is not answered within `keepalive_timeout` (30 s and 20 s by
/// default; shortened here). A live client answers the pings and keeps its streams.
#[tokio::test]
async fn a_silent_peers_connection_is_closed_by_keepalive_and_its_watches_come_back() {
    assert_eq!(
        (args().keepalive_interval, args().keepalive_timeout),
        (Duration::from_secs(30), Duration::from_secs(20)),
        "the defaults"
    );
    let mut args = Cli::try_parse_from([
        "test",
        "--health-addr",
        "127.0.0.1:0",
        "--max-health-watches",
        "4",
    ])
    .unwrap()
    .serve;
    args.keepalive_interval = Duration::from_millis(300);
    args.keepalive_timeout = Duration::from_millis(300);
    let running = start(&args).await;
    let proxy = HangingProxy::start(running.addr).await;
    let mut through = HealthClient::new(channel(proxy.addr).await);
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut stream = through.watch(overall()).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::Serving as i32);
        open.push(stream);
    }
    let mut direct = HealthClient::new(channel(running.addr).await);
    // Several keepalive rounds: the live client answered every ping, so its watches are still open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for stream in &mut open {
        assert!(stream.message().now_or_never().is_none(), "a Watch ended");
    }
    let refused = direct.watch(overall()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    proxy.hang();
    let hung = tokio::time::Instant::now();
    let mut again = loop {
        match direct.watch(overall()).await {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    hung.elapsed() < Duration::from_secs(10),
                    "the silent connection's watches were never released"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    eprintln!("slots back {:?} after the peer went silent", hung.elapsed());
    assert_eq!(
        again.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
}

/// A TCP proxy that can hang: from `hang()` on it forwards nothing more either way and keeps both connections
/// open, as a peer gone without a FIN or RST looks to the server.
struct HangingProxy {
    addr: SocketAddr,
    hung: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HangingProxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hung = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = hung.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let up = TcpStream::connect(upstream).await.unwrap();
                let (down_read, down_write) = down.into_split();
                let (up_read, up_write) = up.into_split();
                tokio::spawn(pipe(down_read, up_write, flag.clone()));
                tokio::spawn(pipe(up_read, down_write, flag.clone()));
            }
        });
        HangingProxy { addr, hung }
    }

    fn hang(&self) {
        self.hung.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hung: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if hung.load(std::sync::atomic::Ordering::SeqCst) {
            // Holds both halves (the connections stay open) and never forwards again.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn both_listeners_advertise_max_concurrent_streams() {
    let args = args();
    assert_eq!(args.max_concurrent_streams, 1024, "the default");
    let running = start(&args).await;
    for addr in [running.addr, running.health_addr] {
        let settings = server_settings(addr).await;
        assert!(
            settings.contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 1024)),
            "{addr}: {settings:?}"
        );
    }

    let mut lower = args.clone();
    lower.max_concurrent_streams = 8;
    let running = start(&lower).await;
    assert!(
        server_settings(running.addr)
            .await
            .contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 8))
    );
}

#[tokio::test]
async fn the_api_listener_advertises_windows_and_frames_sized_for_photos() {
    // A phone photo is ~3 MB of raw RGB: the stream window and frame size of `http2`, not hyper's 1 MiB and 16 KiB.
    // (The connection window is raised by a WINDOW_UPDATE on stream 0, not a SETTINGS parameter.) The health-only
    // listener, unauthenticated and never sent a large message, keeps hyper's.
    let running = start(&args()).await;
    let api = server_settings(running.addr).await;
    let health = server_settings(running.health_addr).await;
    for wanted in [
        (SETTINGS_INITIAL_WINDOW_SIZE, http2::STREAM_WINDOW),
        (SETTINGS_MAX_FRAME_SIZE, http2::MAX_FRAME),
    ] {
        assert!(api.contains(&wanted), "API listener: {api:?}");
        assert!(!health.contains(&wanted), "health listener: {health:?}");
    }
}

const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// The parameters of the server's SETTINGS frame (RFC 9113 §6.5), read after a plaintext HTTP/2 client preface.
async fn server_settings(addr: SocketAddr) -> Vec<(u16, u32)> {
    const SETTINGS: u8 = 0x4;
    const ACK: u8 = 0x1;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // An empty SETTINGS frame: length 0, type SETTINGS, no flags, stream 0.
    tcp.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let read = async {
        loop {
            let mut header = [0u8; 9];
            tcp.read_exact(&mut header).await.unwrap();
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; length];
            tcp.read_exact(&mut payload).await.unwrap();
            if header[3] == SETTINGS && header[4] & ACK == 0 {
                return payload
                    .chunks_exact(6)
                    .map(|p| {
                        (
                            u16::from_be_bytes([p[0], p[1]]),
                            u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                        )
                    })
                    .collect();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap()
}

/// A plaintext connection that never sends the whole HTTP/2 preface was held for ever (HTTP/2 keepalive starts after
/// the preface; the TLS handshake timeout covered TLS only): closed after the same limit now (10 s; 200 ms here), on
/// both listeners, while a client that speaks at once is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_connection_that_never_speaks_is_closed() {
    use tokio::io::AsyncReadExt;
    let mut args = args();
    args.tls_handshake_timeout = Duration::from_millis(200);
    let server = start(&args).await;
    // Nothing at all, or the preface's first bytes only (handed on after one byte, it was held for ever: hyper waits
    // for the rest with no timer).
    for (addr, sends) in [
        (server.addr, &b""[..]),
        (server.health_addr, b""),
        (server.addr, b"PRI * HTTP/2.0"),
        (server.health_addr, b"P"),
    ] {
        use tokio::io::AsyncWriteExt;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        silent.write_all(sends).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "{addr}: the server kept a connection open that sent {sends:?}: {read:?}"
        );
    }
    let mut health = HealthClient::new(channel(server.addr).await);
    health.check(overall()).await.unwrap();
}
