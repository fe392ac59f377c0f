//! What a connection delivered to a served pod speaks: the client's first
//! bytes, or the app's if it speaks first (never waiting on a server-first
//! protocol: the app is dialled before anything is read), within the
//! detect timeout. What was read goes back in front ([`super::http::Rewind`]).
use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::TcpStream,
};

use crate::proxy::detect::{DETECT_BYTES, Detected, classify, is_h2_settings};

/// Reads the client's first bytes into `said` until they say what they are
/// (or end).
pub(super) async fn first_bytes<C: AsyncRead + Unpin>(
    client: &mut C,
    said: &mut Vec<u8>,
) -> Detected {
    let mut buf = vec![0u8; DETECT_BYTES];
    loop {
        let room = DETECT_BYTES - said.len();
        match client.read(&mut buf[..room]).await {
            Ok(0) | Err(_) => return Detected::Opaque,
            Ok(n) => {
                said.extend_from_slice(&buf[..n]);
                match classify(said) {
                    Some(d) => return d,
                    None if said.len() >= DETECT_BYTES => return Detected::Opaque,
                    None => {}
                }
            }
        }
    }
}

/// Whoever speaks first decides, within `timeout`: the client's first bytes
/// (classified), or the app's (server first: opaque; an HTTP/2 server's
/// unprompted SETTINGS is not, it waits for its client like any). Returns
/// what was read from each, to be put back.
pub(super) async fn detect<C>(
    client: &mut C,
    server: &mut TcpStream,
    timeout: Duration,
) -> (Detected, Vec<u8>, Vec<u8>)
where
    C: AsyncRead + Unpin,
{
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut said = Vec::new();
    let mut server_said = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    // Boxed so it can be dropped (ending its borrow of `said`) before
    // `said` is returned; cancelling it loses nothing (`read` is
    // cancel-safe, and what it read is in `said`).
    let mut client_first = Box::pin(first_bytes(client, &mut said));
    loop {
        tokio::select! {
            biased;
            d = &mut client_first => {
                drop(client_first);
                return (d, said, server_said);
            }
            r = server.read(&mut buf), if server_said.is_empty() => match r {
                Ok(n) if n > 0 && is_h2_settings(&buf[..n]) => {
                    server_said.extend_from_slice(&buf[..n]);
                }
                Ok(n) if n > 0 => {
                    server_said.extend_from_slice(&buf[..n]);
                    drop(client_first);
                    return (Detected::ServerFirst, said, server_said);
                }
                // The app closed or failed before a word: bytes from here.
                _ => {
                    drop(client_first);
                    return (Detected::Opaque, said, server_said);
                }
            },
            _ = &mut deadline => {
                drop(client_first);
                return (Detected::Timeout, said, server_said);
            }
        }
    }
}
