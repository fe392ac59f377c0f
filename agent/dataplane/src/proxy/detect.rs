//! What a connection speaks, from its first bytes — and never by waiting
//! on a server-first protocol: both sides dial the destination at once
//! while they look, and whichever speaks first decides (outbound:
//! `Outbound::handle`; inbound: `Inbound::carry`). This module only
//! classifies bytes.
pub use crate::telemetry::http::Detected;

/// The HTTP/2 connection preface (prior knowledge).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The methods told at once, from their first bytes; any other method
/// token is told by its whole request line ([`request_line`]), in the
/// bytes the client sent first (an HTTP client writes its request head at
/// once): detection never waits on an unknown word, which a client-first
/// text protocol's first line may start with.
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// Bytes of a client's first words looked at: an HTTP/1 request line with
/// a method not in `METHODS` must end within them.
pub const DETECT_BYTES: usize = 2048;

/// Classifies what the client sent first; `None` while the bytes so far
/// are the start of something recognisable (wait for more).
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.is_empty() {
        return None;
    }
    if bytes.len() >= H2_PREFACE.len() {
        if bytes.starts_with(H2_PREFACE) {
            return Some(Detected::H2);
        }
    } else if H2_PREFACE.starts_with(bytes) {
        return None;
    }
    if bytes[0] == 0x16 {
        return match bytes.get(1) {
            None => None,
            Some(0x03) => Some(Detected::Tls),
            Some(_) => Some(Detected::Opaque),
        };
    }
    // Empty lines before a request line are to be ignored (RFC 9112
    // §2.2): a client that ends each request with an extra CRLF sends them.
    let line = match bytes.iter().position(|b| !matches!(b, b'\r' | b'\n')) {
        Some(0) => bytes,
        Some(i) if i <= MAX_EMPTY_LINES * 2 => &bytes[i..],
        Some(_) => return Some(Detected::Opaque),
        None if bytes.len() <= MAX_EMPTY_LINES * 2 => return None,
        None => return Some(Detected::Opaque),
    };
    let mut partial = false;
    for method in METHODS {
        if line.starts_with(method) {
            return Some(Detected::Http1);
        }
        partial |= method.starts_with(line);
    }
    match request_line(line) {
        Some(d) => Some(d),
        None if partial => None,
        None => Some(Detected::Opaque),
    }
}

/// Empty lines ignored before a request line at most.
const MAX_EMPTY_LINES: usize = 4;

/// The longest method token taken for one (`VERSION-CONTROL` is 15).
const MAX_METHOD: usize = 20;

/// Whether `line` is an HTTP/1 request line, `method SP target SP
/// HTTP/1.x` (RFC 9112 §3), for any method token: `None` when it ends
/// before saying.
fn request_line(line: &[u8]) -> Option<Detected> {
    let opaque = Some(Detected::Opaque);
    let method = line.iter().take_while(|b| is_tchar(**b)).count();
    if method > MAX_METHOD {
        return opaque;
    }
    match line.get(method) {
        None => return None,
        Some(b' ') if method > 0 => {}
        Some(_) => return opaque,
    }
    let rest = &line[method + 1..];
    let target = rest.iter().take_while(|b| b.is_ascii_graphic()).count();
    match rest.get(target) {
        None => return None,
        Some(b' ') if target > 0 => {}
        Some(_) => return opaque,
    }
    let version = &rest[target + 1..];
    const HTTP1: &[u8] = b"HTTP/1.";
    if version.len() < HTTP1.len() {
        return if HTTP1.starts_with(version) {
            None
        } else {
            opaque
        };
    }
    if !version.starts_with(HTTP1) {
        return opaque;
    }
    match version.get(HTTP1.len()) {
        None => None,
        Some(b'0' | b'1') => Some(Detected::Http1),
        Some(_) => opaque,
    }
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `said` starts with an HTTP/2 SETTINGS frame on stream 0 (what
/// an HTTP/2 server sends first, unprompted).
pub fn is_h2_settings(said: &[u8]) -> bool {
    const SETTINGS: u8 = 0x4;
    said.len() >= 9
        && said[3] == SETTINGS
        && said[4] & !0x1 == 0
        && said[5..9] == [0, 0, 0, 0]
        && (u32::from(said[0]) << 16 | u32::from(said[1]) << 8 | u32::from(said[2])) % 6 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_are_classified() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST /x HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::H2));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Some(Detected::Tls));
        assert_eq!(classify(b"\x00\x00\x00\x01"), Some(Detected::Opaque));
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING\r\n"),
            Some(Detected::Opaque),
            "redis"
        );
        assert_eq!(classify(b"GETX\r\n"), Some(Detected::Opaque));
        assert_eq!(
            classify(b"PROPFIND /dav/ HTTP/1.1\r\n"),
            Some(Detected::Http1),
            "any method, by its request line"
        );
        assert_eq!(classify(b"PURGE /x HTTP/1.0"), Some(Detected::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(
            classify(b"\r\nGET / HTTP/1.1\r\n"),
            Some(Detected::Http1),
            "a leading empty line is ignored"
        );
        assert_eq!(classify(b"\r\n\r\nPURGE / HTTP/1.1"), Some(Detected::Http1));
    }

    #[test]
    fn text_protocols_that_are_not_http_stay_opaque() {
        // Redis inline commands, memcached, a line protocol, SMTP-ish.
        for text in [
            &b"SET key value\r\n"[..],
            b"get foo\r\n",
            b"PING\r\n",
            b"HELO x y\r\n",
            b"PURGE /x HTTP/2.0\r\n",
            b"PURGE  /x HTTP/1.1",
            b"\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1",
            b"\n\n\x00",
        ] {
            assert_eq!(
                classify(text),
                Some(Detected::Opaque),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        // No end of the first line within the bytes looked at.
        let long = [b'A'; DETECT_BYTES];
        assert_eq!(classify(&long), Some(Detected::Opaque));
        let mut long = b"PROPFIND /".to_vec();
        long.resize(DETECT_BYTES, b'a');
        assert_eq!(classify(&long), Some(Detected::Opaque));
    }

    #[test]
    fn a_partial_start_waits_for_more() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"P"), None, "PRI, POST, PUT or PATCH");
        assert_eq!(classify(&[0x16]), None);
        // Not the common methods: the whole line at once, or bytes (a
        // client-first text protocol must not wait for the timeout).
        assert_eq!(classify(b"PROPFIND /dav/ HT"), Some(Detected::Opaque));
        assert_eq!(classify(b"PURGE"), Some(Detected::Opaque));
        assert_eq!(classify(b"NODEMESH-MARKER-1-"), Some(Detected::Opaque));
        assert_eq!(classify(b"\r\n"), None);
    }

    #[test]
    fn an_http2_servers_greeting_is_not_server_first() {
        // Empty SETTINGS, and one with two settings (12 bytes).
        assert!(is_h2_settings(&[0, 0, 0, 4, 0, 0, 0, 0, 0]));
        let mut two = vec![0, 0, 12, 4, 0, 0, 0, 0, 0];
        two.extend_from_slice(&[0, 3, 0, 0, 0, 100, 0, 4, 0, 1, 0, 0]);
        assert!(is_h2_settings(&two));
        // A banner, a DATA frame, SETTINGS on a stream, a bad length.
        assert!(!is_h2_settings(b"220 smtp.example ESMTP\r\n"));
        assert!(!is_h2_settings(&[0, 0, 6, 0, 0, 0, 0, 0, 0]));
        assert!(!is_h2_settings(&[0, 0, 0, 4, 0, 0, 0, 0, 1]));
        assert!(!is_h2_settings(&[0, 0, 5, 4, 0, 0, 0, 0, 0]));
        assert!(!is_h2_settings(&[0, 0, 0, 4]));
    }
}
