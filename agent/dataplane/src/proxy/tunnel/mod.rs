//! The mutual-TLS tunnel between nodes (HBONE-style), on each node's
//! `:15008`: transport only. What a stream carries, and whether it may, is
//! the inbound and outbound proxies' business.
//!
//! A meshed pod's connection to a meshed pod on another node travels as an
//! HTTP/2 `CONNECT <pod-ip>:<port>` stream over one TLS 1.3 connection per
//! (source identity, destination node, destination identity), reused
//! across streams ([`pool`]). The client presents the source pod's
//! certificate and sends the destination identity's DNS name as SNI; the
//! server presents that identity's certificate, which the client checks
//! (chain to the trust anchors, DNS SAN and SPIFFE URI SAN) ([`tls`]). The
//! server ([`server`]) checks the client's chain, reads its SPIFFE ID and
//! hands each stream to its [`server::Destinations`] (the inbound proxy).
//! Both ends use the same HTTP/2 settings ([`h2`]).
pub mod h2;
pub mod pool;
pub mod server;
pub mod tls;

use std::time::Duration;

use nodemesh_core::{label_values, labels::Direction};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

pub use self::{
    pool::{OpenError, TunnelPool},
    server::{Destinations, TunnelServer},
};

/// Tunnel settings.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// The port peers' tunnel servers listen on.
    pub port: u16,
    pub connect_timeout: Duration,
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// A pooled connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// No connection takes new streams past this age (both ends: the
    /// client dials a new one, the server sends GOAWAY), nor past its
    /// peer certificate's `notAfter`; open streams finish.
    pub max_connection_age: Duration,
}

label_values! {
    /// Why the tunnel refused or failed a connection or stream.
    pub enum TunnelError {
        /// Not TLS at all: plaintext or garbage.
        NotTls => "not_tls",
        /// The peer's certificate has expired.
        ExpiredCertificate => "expired_certificate",
        /// The peer's certificate does not chain to the trust anchors.
        UntrustedCertificate => "untrusted_certificate",
        /// The client presented no certificate.
        NoClientCertificate => "no_client_certificate",
        /// The certificate names no usable identity, or not the expected one.
        WrongIdentity => "wrong_identity",
        /// The client asked for an identity this node holds no certificate for.
        UnknownServerName => "unknown_server_name",
        /// Any other handshake failure, or a handshake timeout.
        Handshake => "handshake",
        /// The policy refused the client's identity.
        PolicyDenied => "policy_denied",
        /// Not an HTTP/2 CONNECT to an address.
        BadRequest => "bad_request",
        /// The destination is not a meshed pod on this node.
        UnknownDestination => "unknown_destination",
        /// The destination pod (server side) or the peer node (client side)
        /// could not be reached.
        Connect => "connect",
        /// The destination pod (or the client identity) is over its
        /// admission share on the server's node.
        Overloaded => "overloaded",
        /// The source identity has no certificate (yet).
        NoCertificate => "no_certificate",
        /// HTTP/2 failed.
        Protocol => "protocol",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    direction: Direction,
    reason: TunnelError,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabels {
    direction: Direction,
}

/// The tunnel's own families.
#[derive(Clone, Debug)]
pub struct TunnelMetrics {
    connections: Family<DirLabels, Counter>,
    streams: Family<DirLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    /// Handshakes by key exchange, for the tunnel and the agent's other
    /// TLS endpoints.
    pub tls: crate::telemetry::TlsMetrics,
}

impl TunnelMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            connections: Family::default(),
            streams: Family::default(),
            errors: Family::default(),
            tls: crate::telemetry::TlsMetrics::new(registry),
        };
        registry.register(
            "tunnel_connections",
            "Mutual-TLS connections between nodes established, by direction (outbound: this node dialled)",
            m.connections.clone(),
        );
        registry.register(
            "tunnel_streams",
            "CONNECT streams carried by the tunnel, by direction",
            m.streams.clone(),
        );
        registry.register(
            "tunnel_errors",
            "Tunnel connections or streams refused or failed, by direction and reason",
            m.errors.clone(),
        );
        m
    }

    fn connection(&self, direction: Direction) {
        self.connections
            .get_or_create(&DirLabels { direction })
            .inc();
    }

    fn stream(&self, direction: Direction) {
        self.streams.get_or_create(&DirLabels { direction }).inc();
    }

    fn error(&self, direction: Direction, reason: TunnelError) {
        self.errors
            .get_or_create(&ErrorLabels { direction, reason })
            .inc();
    }
}
