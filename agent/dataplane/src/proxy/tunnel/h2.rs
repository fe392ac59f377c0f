//! The HTTP/2 settings both ends of the tunnel use: large windows so one
//! stream can fill a fast link (memory stays bounded by the connection
//! window), large frames, keep-alive pings to find dead peers.
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Streams at once on one tunnel connection (a client opening more waits,
/// up to its open timeout). Memory stays bounded by the connection window.
pub const MAX_STREAMS: u32 = 1024;
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 256 * 1024;
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// The server side's builder.
pub fn server() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(KEEP_ALIVE);
    b
}

/// The client side's builder.
pub fn client() -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .keep_alive_interval(KEEP_ALIVE);
    b
}
