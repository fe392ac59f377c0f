//! The TCP app's client side: transfers checked byte for byte, round
//! trips, paced and new-connection latencies.
use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsFd,
    thread,
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::{Exchange, Failure};

/// How a blocking client reads. `Plain` is what an ordinary client does:
/// an error (including `EAGAIN`) is an error. `TolerateEagain` retries
/// `EAGAIN` until the deadline: only the benchmark's fast-path rows use it,
/// because the kernel's sockmap receive path returns a spurious `EAGAIN` to
/// blocking reads (docs/datapath.md), and the bench measures latency, not
/// that bug.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reads {
    #[default]
    Plain,
    TolerateEagain,
}

fn read_with(
    reads: Reads,
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e)
                if reads == Reads::TolerateEagain
                    && e.kind() == ErrorKind::WouldBlock
                    && Instant::now() < deadline =>
            {
                continue;
            }
            other => return other,
        }
    }
}

fn read_exact_with(
    reads: Reads,
    stream: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: Instant,
) -> io::Result<()> {
    while !buf.is_empty() {
        match read_with(reads, stream, buf, deadline)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

pub(super) fn text(
    to: SocketAddr,
    text: &str,
    repeat: u32,
    reads: Reads,
    pause: Duration,
) -> io::Result<Exchange> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    thread::sleep(pause);
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    let kernel_local = kernel_local(&stream);
    let payload = text.repeat(repeat as usize).into_bytes();
    // Small enough for the echo to fit in the socket buffers meanwhile.
    stream.write_all(&payload)?;
    stream.shutdown(Shutdown::Write)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut back = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match read_with(reads, &mut stream, &mut buf, deadline)? {
            0 => break,
            n => back.extend_from_slice(&buf[..n]),
        }
    }
    Ok(Exchange {
        sent: payload.len() as u64,
        received: back.len() as u64,
        intact: back == payload,
        local,
        peer,
        kernel_local,
    })
}

pub(super) fn paced(
    to: SocketAddr,
    seconds: u32,
    interval_ms: u32,
    reads: Reads,
) -> io::Result<Vec<u32>> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let end = Instant::now() + Duration::from_secs(u64::from(seconds));
    let msg = [0x42u8; 64];
    let mut buf = [0u8; 64];
    let mut micros = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        stream.write_all(&msg)?;
        read_exact_with(reads, &mut stream, &mut buf, t + Duration::from_secs(10))?;
        if buf != msg {
            return Err(io::Error::other("echo differs"));
        }
        micros.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        thread::sleep(Duration::from_millis(u64::from(interval_ms)));
    }
    Ok(micros)
}

pub(super) fn setup(
    to: SocketAddr,
    count: u32,
    pause_ms: u32,
    reads: Reads,
) -> io::Result<Vec<u32>> {
    let mut micros = Vec::new();
    for i in 0..count {
        if i > 0 {
            thread::sleep(Duration::from_millis(u64::from(pause_ms)));
        }
        let t = Instant::now();
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"x")?;
        let mut b = [0u8; 1];
        read_exact_with(reads, &mut stream, &mut b, t + Duration::from_secs(10))?;
        micros.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    Ok(micros)
}

/// The deterministic byte at every offset of the stream for `seed`, so a
/// chunk can be made or checked wherever it falls.
pub(super) fn pattern_at(seed: u64, offset: u64, out: &mut [u8]) {
    let word = |i: u64| {
        // splitmix64 of (seed, word index)
        let mut z = seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).to_le_bytes()
    };
    let mut current = (u64::MAX, [0u8; 8]);
    for (k, b) in out.iter_mut().enumerate() {
        let i = offset + k as u64;
        if current.0 != i / 8 {
            current = (i / 8, word(i / 8));
        }
        *b = current.1[(i % 8) as usize];
    }
}

/// Full-duplex exchange on a non-blocking socket driven by poll(2). With a
/// `seed` the bytes follow its pattern and are checked on the way back;
/// without, they are zeros and only counted (for throughput).
pub(super) fn exchange(
    to: SocketAddr,
    bytes: u64,
    seed: Option<u64>,
    timeout: Duration,
) -> Result<Exchange, Failure> {
    let fail = |e: &io::Error, s, r| Failure::from_io(e, s, r);
    let stream = TcpStream::connect_timeout(&to, timeout).map_err(|e| fail(&e, 0, 0))?;
    let local = stream.local_addr().map_err(|e| fail(&e, 0, 0))?;
    let peer = stream.peer_addr().map_err(|e| fail(&e, 0, 0))?;
    let kernel_local = kernel_local(&stream);
    stream.set_nonblocking(true).map_err(|e| fail(&e, 0, 0))?;
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    let mut out = vec![0u8; 0];
    let mut out_pos = 0;
    let mut inbuf = vec![0u8; 64 * 1024];
    let mut expect = vec![0u8; 64 * 1024];
    let (mut sent, mut received) = (0u64, 0u64);
    let mut intact = true;
    let mut write_closed = bytes == 0;
    if write_closed {
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| fail(&e, 0, 0))?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(&io::Error::from(ErrorKind::TimedOut), sent, received));
        }
        let mut events = PollFlags::POLLIN;
        if !write_closed {
            events |= PollFlags::POLLOUT;
        }
        let mut fds = [PollFd::new(stream.as_fd(), events)];
        let wait =
            PollTimeout::try_from(left.min(Duration::from_secs(1))).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, wait) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(fail(&e.into(), sent, received)),
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if !write_closed
            && revents.intersects(PollFlags::POLLOUT | PollFlags::POLLERR | PollFlags::POLLHUP)
        {
            if out_pos == out.len() {
                let n = (bytes - sent).min(64 * 1024) as usize;
                out.resize(n, 0);
                if let Some(seed) = seed {
                    pattern_at(seed, sent, &mut out);
                }
                out_pos = 0;
            }
            match stream.write(&out[out_pos..]) {
                Ok(n) => {
                    out_pos += n;
                    sent += n as u64;
                    if sent == bytes {
                        stream
                            .shutdown(Shutdown::Write)
                            .map_err(|e| fail(&e, sent, received))?;
                        write_closed = true;
                    }
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(&e, sent, received)),
            }
        }
        if revents.intersects(PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP) {
            match stream.read(&mut inbuf) {
                Ok(0) => break,
                Ok(n) => {
                    if received + n as u64 > bytes {
                        intact = false;
                    } else if let (true, Some(seed)) = (intact, seed) {
                        pattern_at(seed, received, &mut expect[..n]);
                        intact = inbuf[..n] == expect[..n];
                    }
                    received += n as u64;
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(&e, sent, received)),
            }
        }
    }
    Ok(Exchange {
        sent,
        received,
        intact: intact && received == bytes,
        local,
        peer,
        kernel_local,
    })
}

pub(super) fn round_trips(
    to: SocketAddr,
    count: u32,
    size: u32,
    reads: Reads,
) -> io::Result<Vec<u32>> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let msg = vec![0x5au8; size as usize];
    let mut buf = vec![0u8; size as usize];
    let mut micros = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t = Instant::now();
        stream.write_all(&msg)?;
        read_exact_with(reads, &mut stream, &mut buf, t + Duration::from_secs(10))?;
        micros.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    Ok(micros)
}

/// An ordinary blocking client: one thread writes `bytes` of the pattern
/// for `seed` while another reads the echo with plain blocking `read()`s
/// (no retries: an `EAGAIN` is a failure, as it is for any such client),
/// then compares.
pub(super) fn duplex_blocking(
    to: SocketAddr,
    bytes: u64,
    seed: u64,
    timeout: Duration,
) -> Result<Exchange, Failure> {
    let fail = |e: &io::Error, s, r| Failure::from_io(e, s, r);
    let stream = TcpStream::connect_timeout(&to, timeout).map_err(|e| fail(&e, 0, 0))?;
    let local = stream.local_addr().map_err(|e| fail(&e, 0, 0))?;
    let peer = stream.peer_addr().map_err(|e| fail(&e, 0, 0))?;
    let kernel_local = kernel_local(&stream);
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| fail(&e, 0, 0))?;
    let mut writer = stream.try_clone().map_err(|e| fail(&e, 0, 0))?;
    let sending = thread::spawn(move || -> io::Result<u64> {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(chunk.len() as u64) as usize;
            pattern_at(seed, sent, &mut chunk[..n]);
            writer.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(sent)
    });
    let mut reader = stream;
    let (mut received, mut intact) = (0u64, true);
    let mut buf = vec![0u8; 64 * 1024];
    let mut expect = vec![0u8; 64 * 1024];
    let read_result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if intact {
                    pattern_at(seed, received, &mut expect[..n]);
                    intact = buf[..n] == expect[..n];
                }
                received += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
    };
    let sent = match sending.join() {
        Ok(Ok(sent)) => sent,
        Ok(Err(e)) => return Err(fail(&e, 0, received)),
        Err(_) => return Err(fail(&io::Error::other("writer panicked"), 0, received)),
    };
    read_result.map_err(|e| fail(&e, sent, received))?;
    Ok(Exchange {
        sent,
        received,
        intact: intact && received == bytes,
        local,
        peer,
        kernel_local,
    })
}

/// Opens `count` connections to `to`, checks each with a 1-byte round
/// trip, and returns the ones that worked, and the first few failures.
pub(super) fn hold(to: SocketAddr, count: u32) -> (Vec<TcpStream>, Vec<Failure>) {
    let mut held = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..count {
        let checked = TcpStream::connect_timeout(&to, Duration::from_secs(5)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"h")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            Ok(s)
        });
        match checked {
            Ok(s) => held.push(s),
            Err(e) if failures.len() < 5 => failures.push(Failure::from_io(&e, 0, 0)),
            Err(_) => {}
        }
    }
    (held, failures)
}

/// How a download ended.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Download {
    pub received: u64,
    /// "eof" (a clean end of stream), "error" or "timeout".
    pub end: String,
    pub error: Option<Failure>,
}

/// Reads from `to` until the stream ends or `seconds` pass.
pub(super) fn download(to: SocketAddr, seconds: u32) -> Download {
    let deadline = Instant::now() + Duration::from_secs(u64::from(seconds));
    let mut received = 0u64;
    let mut stream = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            return Download {
                received,
                end: "error".into(),
                error: Some(Failure::from_io(&e, 0, 0)),
            };
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if Instant::now() >= deadline {
            return Download {
                received,
                end: "timeout".into(),
                error: None,
            };
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                return Download {
                    received,
                    end: "eof".into(),
                    error: None,
                };
            }
            Ok(n) => received += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => {
                return Download {
                    received,
                    end: "error".into(),
                    error: Some(Failure::from_io(&e, 0, received)),
                };
            }
        }
    }
}

/// The socket's local address as the kernel's socket table lists it
/// (`/proc/self/net/tcp{,6}`, found by the socket's inode): what the
/// socket really is bound to, whatever `getsockname()` answers.
pub(super) fn kernel_local(stream: &TcpStream) -> Option<SocketAddr> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", stream.as_raw_fd())).ok()?;
    let inode = link
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .to_owned();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(9) != Some(&inode.as_str()) {
                continue;
            }
            let (ip, port) = fields.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // Each 32-bit word is printed in host (little-endian) order.
            let words: Vec<u32> = (0..ip.len() / 8)
                .filter_map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok())
                .collect();
            let ip: std::net::IpAddr = match words.as_slice() {
                [w] => std::net::Ipv4Addr::from(w.to_le_bytes()).into(),
                [a, b, c, d] => {
                    let mut bytes = [0u8; 16];
                    for (i, w) in [a, b, c, d].iter().enumerate() {
                        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
                    }
                    let v6 = std::net::Ipv6Addr::from(bytes);
                    v6.to_ipv4_mapped().map_or(v6.into(), Into::into)
                }
                _ => return None,
            };
            return Some(SocketAddr::new(ip, port));
        }
    }
    None
}

/// Reads the `bytes` a server-first server says on connect.
pub(super) fn greeting(to: SocketAddr, bytes: u32, timeout: Duration) -> io::Result<(String, u64)> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0u8; bytes as usize];
    stream.read_exact(&mut buf)?;
    let micros = start.elapsed().as_micros() as u64;
    Ok((String::from_utf8_lossy(&buf).into_owned(), micros))
}

/// `GET /` with `Upgrade: websocket` on a raw socket; after the response
/// head, `bytes` of the pattern written and read back.
pub(super) fn upgrade(to: SocketAddr, bytes: u64) -> io::Result<(String, u64, bool)> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        stream,
        "GET /chat HTTP/1.1\r\nHost: {to}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )?;
    // The response head, byte by byte (what follows it is the echo).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "no response head",
            ));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status_line = head.lines().next().unwrap_or_default().to_owned();
    if !status_line.contains(" 101 ") {
        return Ok((status_line, 0, false));
    }
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut w = stream.try_clone()?;
        let payload = payload.clone();
        std::thread::spawn(move || w.write_all(&payload))
    };
    let mut back = vec![0u8; bytes as usize];
    stream.read_exact(&mut back)?;
    writer
        .join()
        .map_err(|_| io::Error::other("writer panicked"))??;
    Ok((status_line, bytes, back == payload))
}
