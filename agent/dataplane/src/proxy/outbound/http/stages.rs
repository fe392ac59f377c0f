//! The stages of one request's life on the outbound HTTP path, as types:
//! what it goes to ([`RequestTarget`], resolved once), what a connection
//! for an attempt must be ([`Expected`], from its route), why an attempt
//! got no answer ([`AttemptError`]), and what the request is seen as
//! ([`Observer`]). The stages themselves are `Forwarder`'s (`super`).
use std::{net::SocketAddr, sync::Arc, time::Instant};

use hyper::{Response, StatusCode, body::Incoming};
use nodemesh_core::wire::TapPeer;

use super::{
    Dest,
    pool::{Conn, Key},
};
use crate::{
    proxy::{balance::InFlight, outbound::route::Route},
    state::{ServiceTarget, Target},
    telemetry::{
        http::{Protocol, Request as RequestMetric},
        tap::Tapped,
    },
};

/// What one request goes to, resolved once when it comes: the Service's
/// endpoints as they are then (every attempt picks among those), or the
/// one address.
#[derive(Clone, Debug)]
pub(super) enum RequestTarget {
    Service(Arc<ServiceTarget>),
    Single(SocketAddr),
    /// The connection's cluster IP is no Service port any more.
    Gone,
}

impl RequestTarget {
    /// For a connection to `dest`, where `upstream` says what is behind an
    /// address now.
    pub(super) fn resolve(dest: &Dest, upstream: impl FnOnce(SocketAddr) -> Target) -> Self {
        match dest {
            Dest::Single(addr) => RequestTarget::Single(*addr),
            Dest::Service(vip) => match upstream(*vip) {
                Target::Service(svc) => RequestTarget::Service(svc),
                _ => RequestTarget::Gone,
            },
        }
    }
}

/// What a connection to an endpoint must be now (its route): over TLS,
/// and to which identity. A pooled one that no longer matches (the
/// destination became meshed, say) is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Expected {
    pub(super) tls: bool,
    pub(super) peer: Option<String>,
}

impl Expected {
    /// What a connection for `route` must be; `None` when routing refuses.
    pub(super) fn of(route: &Route<'_>) -> Option<Self> {
        match route {
            Route::Direct => Some(Expected {
                tls: false,
                peer: None,
            }),
            Route::Local { id, .. } => Some(Expected {
                tls: false,
                peer: Some(id.uri().to_owned()),
            }),
            Route::Tunnel { dst, .. } => Some(Expected {
                tls: true,
                peer: Some(dst.uri().to_owned()),
            }),
            Route::Refuse(_) => None,
        }
    }

    /// Whether a pooled connection was made for it.
    pub(super) fn made(&self, conn: &Conn) -> bool {
        conn.tls == self.tls && conn.peer_uri() == self.peer.as_deref()
    }
}

/// Why one attempt at a request got no response from its endpoint.
#[derive(Debug, thiserror::Error)]
pub(super) enum AttemptError {
    /// Never written: the request is back, and may go again — to the same
    /// endpoint on a new connection when a pooled one had closed (a
    /// keep-alive race, not the endpoint's fault), else to another.
    #[error("request not sent to {endpoint}: {reason}")]
    NotSent {
        endpoint: SocketAddr,
        reason: String,
        pooled: bool,
    },
    /// The destination's inbound policy refused the client (it is up, and
    /// says no: not counted against it).
    #[error("{endpoint}: refused by its inbound policy")]
    Refused { endpoint: SocketAddr },
    /// No connection could be had: routing refused it, or it could not
    /// be reached.
    #[error("{0}")]
    Unreachable(String),
    /// Written, and failed upstream: never sent again (it may have had
    /// effects).
    #[error("upstream {endpoint}: {source}")]
    Upstream {
        endpoint: SocketAddr,
        tls: bool,
        source: hyper::Error,
    },
}

impl AttemptError {
    /// The proxy's answer when this was the last attempt.
    pub(super) fn status(&self) -> StatusCode {
        match self {
            AttemptError::Refused { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// A request's answer from an endpoint, with what it came over.
pub(super) struct Answered {
    pub(super) resp: Response<Incoming>,
    pub(super) conn: Conn,
    pub(super) key: Key,
    pub(super) endpoint: SocketAddr,
    pub(super) work: Option<InFlight>,
}

/// What one request is seen as from its start to its end: its tap events
/// (when someone listens), then its metrics on both sides.
pub(super) struct Observer {
    pub(super) started: Instant,
    pub(super) protocol: Protocol,
    pub(super) tapped: Option<Tapped>,
    /// Its `req` event went out (at the first attempt that wrote it).
    pub(super) announced: bool,
}

impl Observer {
    /// The request is written to `dst` now (the first time only counts).
    pub(super) fn sending(&mut self, dst: impl FnOnce() -> TapPeer, tls: bool) {
        if let Some(t) = &mut self.tapped
            && !self.announced
        {
            t.to(dst(), tls);
            t.sent();
        }
        self.announced = true;
    }

    /// The proxy answers itself, with `status`.
    pub(super) fn refused(mut self, status: StatusCode, metric: Option<RequestMetric>) {
        if let Some(mut t) = self.tapped.take() {
            if !self.announced {
                t.sent();
            }
            t.response(status.as_u16(), None);
            t.end(0, None);
        }
        if let Some(m) = metric {
            m.response(status.as_u16(), None, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use nodemesh_core::identity::{Identity, SpiffeId};

    use super::*;
    use crate::proxy::outbound::route::Refusal;

    #[test]
    fn a_request_goes_to_what_its_destination_is_when_it_comes() {
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let pod: SocketAddr = "10.1.0.2:8080".parse().unwrap();
        let svc = Arc::new(ServiceTarget {
            service: crate::state::ObjectKey {
                namespace: "shop".into(),
                name: "web".into(),
            },
            port: crate::state::ServicePort {
                name: None,
                port: 80,
                app_protocol: None,
            },
            endpoints: Arc::from([pod]),
            on_node: Arc::from([pod]),
            in_zone: Arc::from([]),
            protocol: crate::state::ConfiguredProtocol::Detect,
        });
        let service = || Target::Service(svc.clone());
        for (dest, behind, want) in [
            (Dest::Single(pod), Target::Unknown, "single"),
            (Dest::Service(vip), service(), "service"),
            // The Service went away while the connection was open.
            (Dest::Service(vip), Target::Unknown, "gone"),
            (Dest::Service(vip), Target::UnknownService, "gone"),
        ] {
            let got = match RequestTarget::resolve(&dest, |_| behind) {
                RequestTarget::Single(a) if a == pod => "single",
                RequestTarget::Service(s) if s.endpoints[..] == [pod] => "service",
                RequestTarget::Gone => "gone",
                other => panic!("{other:?}"),
            };
            assert_eq!(got, want, "{dest:?}");
        }
    }

    #[test]
    fn a_connection_is_made_for_its_route() {
        let id = |sa: &str| SpiffeId::new(Identity::new("shop", sa).unwrap(), "cluster.local");
        let (web, api) = (id("web"), id("api"));
        let tunnel = Route::Tunnel {
            node_ip: "192.168.0.2".parse().unwrap(),
            src: &web,
            dst: &api,
        };
        for (route, want) in [
            (
                Route::Direct,
                Some(Expected {
                    tls: false,
                    peer: None,
                }),
            ),
            (
                tunnel,
                Some(Expected {
                    tls: true,
                    peer: Some(api.uri().to_owned()),
                }),
            ),
            (Route::Refuse(Refusal::NoSourceIdentity), None),
        ] {
            assert_eq!(Expected::of(&route), want, "{route:?}");
        }
    }
}
