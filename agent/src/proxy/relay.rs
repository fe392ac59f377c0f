//! Relaying bytes both ways between two TCP streams: bounded buffers, byte
//! counts as they pass, half-close carried across, resets carried across.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Counts the bytes read through it.
struct Counted<'a> {
    inner: &'a mut TcpStream,
    counter: &'a Counter,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counter.inc_by(n as u64);
        }
        res
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Bytes moved each way by [`relay`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    pub client_to_server: u64,
    pub server_to_client: u64,
}

/// Copies `client` ⇄ `server` until both directions have finished. When one
/// side closes its write half, the other side's write half is shut down too
/// (half-close). On an error (typically a reset) both sockets are closed
/// with a reset, so the peers see what they would have seen without the
/// proxy.
pub async fn relay(
    client: &mut TcpStream,
    server: &mut TcpStream,
    buffer_size: usize,
    client_sent: &Counter,
    server_sent: &Counter,
) -> io::Result<Relayed> {
    let result = {
        let mut c = Counted {
            inner: client,
            counter: client_sent,
        };
        let mut s = Counted {
            inner: server,
            counter: server_sent,
        };
        tokio::io::copy_bidirectional_with_sizes(&mut c, &mut s, buffer_size, buffer_size).await
    };
    match result {
        Ok((up, down)) => Ok(Relayed {
            client_to_server: up,
            server_to_client: down,
        }),
        Err(e) => {
            reset(client);
            reset(server);
            Err(e)
        }
    }
}

/// Makes the coming close send RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
