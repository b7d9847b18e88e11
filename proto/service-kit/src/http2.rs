//! HTTP/2 flow control sized for this API's messages, on both ends of every call: a phone photo goes to the
//! segmenter as ~3 MB of raw RGB, and a reply carries each concept's instance masks (20 x 83 KB at 288², ~5 MB for
//! 3 concepts). hyper's defaults are sized for small messages: a server window of 1 MiB per stream and per
//! connection, a client window of 2 MiB per stream, 16 KiB frames. A 3 MB request then crossed in ~190 frames with
//! the sender stopping at each window's end until the receiver's WINDOW_UPDATE came back; measured with
//! segmenter-bench --send rgb on loopback (2 cores, 1008² photo, bundled model): 3.5-4.3 ms of the call outside the
//! server's stages, 2.5-2.7 ms with these settings (the JPEG path, a 79 KB request, is unchanged at ~0.6 ms).
//!
//! Memory stays bounded per connection: h2 enforces the connection window on receipt, so one connection may have at
//! most CONNECTION_WINDOW (16 MiB) sent and not yet read, whatever its number of streams (MAX_CONCURRENT_STREAMS);
//! hyper's default was 1 MiB. Only the API listener takes these settings: the health-only listener (HEALTH_ADDR,
//! unauthenticated, never a large message) keeps hyper's.

use tonic::transport::{Endpoint, Server};

/// What one stream may send ahead of the receiver's reads: a whole 1008² RGB photo with room to spare.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// What all streams of one connection together may send ahead of the receiver's reads.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest DATA frame a peer may send us (HTTP/2 allows up to 16 MiB - 1; the default is 16 KiB).
pub const MAX_FRAME: u32 = 1 << 20;

/// A server builder with these windows and frame size.
pub fn server(builder: Server) -> Server {
    builder
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
}

/// A client endpoint with these windows and frame size (replies come in frames up to MAX_FRAME).
pub fn client(endpoint: Endpoint) -> Endpoint {
    endpoint
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
}

// Checked at compile time: a whole 1008 x 1008 RGB photo (what the orchestrator sends for a phone photo) fits one
// stream window; the connection window holds a stream's; the frame size is legal (RFC 9113 6.5.2: 2^14 to 2^24 - 1).
const _: () = {
    assert!(STREAM_WINDOW as usize > 1008 * 1008 * 3 + 4096);
    assert!(CONNECTION_WINDOW >= STREAM_WINDOW);
    assert!(MAX_FRAME >= 1 << 14 && MAX_FRAME < 1 << 24);
};
