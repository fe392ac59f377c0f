//! `GET /v1/tap`: live requests as NDJSON events, and what selects them.
use serde::{Deserialize, Serialize};

/// Splits a tap's NDJSON stream, as its bytes come, into events; a line
/// over 1 MiB means the stream is not a tap.
#[derive(Debug, Default)]
pub struct TapLines(Vec<u8>);

impl TapLines {
    /// The events `data` completes.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<TapEvent>, String> {
        self.0.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(at) = self.0.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.0.drain(..=at).collect();
            out.push(serde_json::from_slice(&line).map_err(|e| format!("bad event: {e}"))?);
        }
        if self.0.len() > 1 << 20 {
            return Err("an event over 1 MiB".into());
        }
        Ok(out)
    }
}

/// One end of a tapped request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapPeer {
    pub namespace: String,
    /// `kind/name` of its workload, when known.
    pub workload: String,
    pub pod: String,
    /// Its SPIFFE ID, when authenticated or meshed.
    pub identity: String,
    /// Its address, `ip:port` (the client's port when the proxy saw it,
    /// else its IP alone).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub addr: String,
}

/// One line of `GET /v1/tap` (NDJSON): a request's start (`req`), its
/// response's head (`rsp`), its end (`end`) — or `dropped` (this reader
/// fell behind and missed `count` events). Never header values or bodies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapEvent {
    pub kind: String,
    /// Ties a request's events together (per agent).
    pub id: u64,
    /// `outbound` (seen by the client's proxy) or `inbound` (the server's).
    pub direction: String,
    pub src: TapPeer,
    pub dst: TapPeer,
    pub tls: bool,
    pub method: String,
    pub authority: String,
    /// Without the query string.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// `rsp`: from the request to the response's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// `end`: from the request to the response's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<u64>,
    /// `dropped`: how many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The node whose agent saw it (set by the API, which merges agents).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// `error`: an agent's stream could not be had or ended (the others
    /// go on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What a tap reader wants (`/v1/tap?namespace=…&workload=…`): every field
/// set must match; `max_rps` samples requests (their three events go
/// together).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapFilter {
    /// Of either end.
    pub namespace: Option<String>,
    /// The name of either end's workload.
    pub workload: Option<String>,
    pub pod: Option<String>,
    /// The other end's workload name (`--to`).
    pub to: Option<String>,
    pub direction: Option<String>,
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    pub authority: Option<String>,
    pub max_rps: Option<u32>,
}

impl TapFilter {
    /// From a query string (unknown keys are an error).
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut f = TapFilter::default();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            // A query string: `+` is a space, then `%XX` escapes.
            let v = percent_decode(&v.replace('+', " "));
            match k {
                "namespace" => f.namespace = Some(v),
                "workload" => f.workload = Some(v),
                "pod" => f.pod = Some(v),
                "to" => f.to = Some(v),
                "direction" => f.direction = Some(v),
                "method" => f.method = Some(v),
                "path" => f.path_prefix = Some(v),
                "authority" => f.authority = Some(v),
                "max_rps" => {
                    f.max_rps = Some(v.parse().map_err(|_| format!("max_rps={v}: a number"))?)
                }
                other => return Err(format!("unknown filter {other:?}")),
            }
        }
        Ok(f)
    }

    /// As a query string.
    pub fn query(&self) -> String {
        let mut q = Vec::new();
        let mut add = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                q.push(format!("{k}={}", percent_encode(v)));
            }
        };
        add("namespace", &self.namespace);
        add("workload", &self.workload);
        add("pod", &self.pod);
        add("to", &self.to);
        add("direction", &self.direction);
        add("method", &self.method);
        add("path", &self.path_prefix);
        add("authority", &self.authority);
        if let Some(n) = self.max_rps {
            q.push(format!("max_rps={n}"));
        }
        q.join("&")
    }

    /// Whether a request (its `req` event) is wanted. As in Linkerd, a
    /// resource is tapped at its own proxy: `namespace`, `workload` and
    /// `pod` select the end whose side saw the request (the source of an
    /// `outbound` event, the destination of an `inbound` one), and `to`
    /// is the other end — so a request shows once per tapped side that saw it, never once per agent that carried it.
    pub fn matches(&self, e: &TapEvent) -> bool {
        let name = |w: &str| w.rsplit('/').next().unwrap_or_default().to_owned();
        let (tapped, other) = if e.direction == "inbound" {
            (&e.dst, &e.src)
        } else {
            (&e.src, &e.dst)
        };
        let is = |want: &Option<String>, have: &str| want.as_ref().is_none_or(|w| w == have);
        is(&self.namespace, &tapped.namespace)
            && is(&self.workload, &name(&tapped.workload))
            && is(&self.pod, &tapped.pod)
            && is(&self.to, &name(&other.workload))
            && self.direction.as_ref().is_none_or(|d| *d == e.direction)
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.eq_ignore_ascii_case(&e.method))
            && self
                .path_prefix
                .as_ref()
                .is_none_or(|p| e.path.starts_with(p.as_str()))
            && self.authority.as_ref().is_none_or(|a| *a == e.authority)
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `%XX` escapes decoded (others left as they are); invalid UTF-8 is
/// replaced.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tap_tests {
    use super::*;

    #[test]
    fn filters_travel_as_a_query_and_match_requests() {
        let f = TapFilter {
            namespace: Some("shop".into()),
            workload: Some("web".into()),
            to: Some("api".into()),
            path_prefix: Some("/a b".into()),
            max_rps: Some(5),
            ..TapFilter::default()
        };
        let q = f.query();
        assert_eq!(TapFilter::parse(&q).unwrap(), f, "{q}");
        assert!(TapFilter::parse("color=red").is_err());
        // Whatever the network sends decodes without a panic.
        assert_eq!(
            TapFilter::parse("path=%a\u{e9}%zz%41")
                .unwrap()
                .path_prefix
                .as_deref(),
            Some("%a\u{e9}%zzA")
        );
        assert_eq!(
            percent_decode("a%2fb%2F%+1+"),
            "a/b/%+1+",
            "no sign, no form space"
        );
        let mut lines = TapLines::default();
        let line = serde_json::to_string(&TapEvent::default()).unwrap();
        assert!(lines.push(&line.as_bytes()[..5]).unwrap().is_empty());
        let rest = format!("{}\n{line}\n", &line[5..]);
        assert_eq!(lines.push(rest.as_bytes()).unwrap().len(), 2);
        assert!(lines.push(&vec![b'x'; (1 << 20) + 1]).is_err());
        let e = TapEvent {
            kind: "req".into(),
            direction: "outbound".into(),
            src: TapPeer {
                namespace: "shop".into(),
                workload: "deployment/web".into(),
                ..TapPeer::default()
            },
            dst: TapPeer {
                namespace: "shop".into(),
                workload: "deployment/api".into(),
                ..TapPeer::default()
            },
            method: "GET".into(),
            path: "/a b/c".into(),
            ..TapEvent::default()
        };
        assert!(f.matches(&e));
        let other_path = TapEvent {
            path: "/b".into(),
            ..e.clone()
        };
        assert!(!f.matches(&other_path));
        let to_db = TapFilter {
            to: Some("db".into()),
            ..f.clone()
        };
        assert!(!to_db.matches(&e));
    }

    #[test]
    fn a_resource_is_tapped_at_its_own_side_once() {
        // web → api, seen by web's side (outbound) and api's (inbound).
        let peer = |w: &str, pod: &str| TapPeer {
            namespace: "shop".into(),
            workload: format!("deployment/{w}"),
            pod: pod.into(),
            ..TapPeer::default()
        };
        let out = TapEvent {
            kind: "req".into(),
            direction: "outbound".into(),
            src: peer("web", "web-1"),
            dst: peer("api", "api-1"),
            ..TapEvent::default()
        };
        let inb = TapEvent {
            direction: "inbound".into(),
            ..out.clone()
        };
        let tap = |w: &str| TapFilter {
            workload: Some(w.into()),
            ..TapFilter::default()
        };
        assert!(tap("api").matches(&inb) && !tap("api").matches(&out));
        assert!(tap("web").matches(&out) && !tap("web").matches(&inb));
        let pod = TapFilter {
            pod: Some("api-1".into()),
            ..TapFilter::default()
        };
        assert!(pod.matches(&inb) && !pod.matches(&out));
        // `--to` is the other end of the tapped side.
        let web_to_api = TapFilter {
            to: Some("api".into()),
            ..tap("web")
        };
        assert!(web_to_api.matches(&out) && !web_to_api.matches(&inb));
        // A namespace: every side in it (both, as Linkerd shows).
        let ns = TapFilter {
            namespace: Some("shop".into()),
            ..TapFilter::default()
        };
        assert!(ns.matches(&out) && ns.matches(&inb));
        let other_ns = TapFilter {
            namespace: Some("other".into()),
            ..TapFilter::default()
        };
        let from_other = TapEvent {
            src: TapPeer {
                namespace: "other".into(),
                ..peer("x", "x-1")
            },
            ..inb.clone()
        };
        assert!(!other_ns.matches(&from_other), "the tapped side is in shop");
    }
}
