//! What a connection speaks, from its first bytes — and never by waiting
//! on a server-first protocol: both sides dial the destination at once
//! while they look, and whichever speaks first decides (outbound:
//! `Outbound::handle`; inbound: `Inbound::carry`). This module only
//! classifies bytes.
pub use crate::telemetry::http::Detected;

/// The HTTP/2 connection preface (prior knowledge).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
    for method in METHODS {
        if bytes.starts_with(method) {
            return Some(Detected::Http1);
        }
        if method.starts_with(bytes) {
            return None;
        }
    }
    Some(Detected::Opaque)
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
        assert_eq!(classify(b"GETX"), Some(Detected::Opaque));
    }

    #[test]
    fn a_partial_start_waits_for_more() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"P"), None, "PRI, POST, PUT or PATCH");
        assert_eq!(classify(&[0x16]), None);
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
