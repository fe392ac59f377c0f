//! Identity and mutual TLS between two nodes: cross-node traffic through
//! the tunnel (not readable on the link, identities on both sides), node
//! authorization by the identity service, peers the tunnel must refuse,
//! and certificate rotation under a long-lived stream.
//!
//! Longer than 500 lines on purpose: one scenario family around one bed
//! (two nodes, identity service), each test a story read top to bottom.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use nodemesh_core::{
    identity::{Identity, TOKEN_AUDIENCE},
    pki::{self, CertAndKey},
};
use nodemesh_dataplane::identity::client::{
    IdentityClient, IdentityClientConfig, IdentityClientError,
};
use nodemesh_tests::{
    Metrics, Node, Pod, PodSpec, eventually,
    kube::unique,
    mesh::{self, MeshBed},
    sys::in_netns,
};

const ECHO: u16 = 8080;

fn echo(pod: &Pod) -> SocketAddr {
    SocketAddr::from((pod.ip, ECHO))
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

fn certificates(m: &Metrics) -> f64 {
    m.sum("nodemesh_identity_certificates", &[])
}

fn expiry(m: &Metrics, identity: &str) -> f64 {
    m.sum(
        "nodemesh_identity_certificate_expiry_timestamp_seconds",
        &[("identity", identity)],
    )
}

fn peer_opens(m: &Metrics, pod: &str, direction: &str, tls: &str, peer: &str) -> f64 {
    m.sum(
        "nodemesh_tcp_peer_open_total",
        &[
            ("pod", pod),
            ("direction", direction),
            ("tls", tls),
            ("peer_identity", peer),
        ],
    )
}

fn tunnel(m: &Metrics, family: &str, direction: &str) -> f64 {
    m.sum(
        &format!("nodemesh_tunnel_{family}_total"),
        &[("direction", direction)],
    )
}

fn tunnel_errors(m: &Metrics, reason: &str) -> f64 {
    m.sum(
        "nodemesh_tunnel_errors_total",
        &[("direction", "inbound"), ("reason", reason)],
    )
}

pub fn cross_node_traffic_is_encrypted_and_carries_identities() {
    let bed = MeshBed::new("24h");
    let server = bed.pod(&bed.b, "server", "server");
    let neighbour = bed.pod(&bed.b, "neighbour", "neighbour");
    let client = bed.pod(&bed.a, "client", "client");
    // The control: the same across the link, unmeshed.
    let plain_ns = unique("plain");
    bed.cluster.namespace(&plain_ns, &[]);
    let plain_server = bed
        .cluster
        .run_pod(&bed.b, PodSpec::new(&plain_ns, "plain-server"));
    let plain_client = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain_ns, "plain-client"));
    bed.agent_a
        .wait_metric("client's certificate", |m| certificates(m) == 1.0);
    bed.agent_b
        .wait_metric("server's and neighbour's certificates", |m| {
            certificates(m) == 2.0
        });
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut psrv = plain_server.tcp();
    psrv.listen(ECHO);
    let mut cli = client.tcp();
    let mut pcli = plain_client.tcp();

    let marker = format!("NODEMESH-SECRET-{}-", std::process::id());
    let control = format!("NODEMESH-PLAINTEXT-{}-", std::process::id());
    let capture = bed.link.capture();
    let x = cli
        .text(echo(&server), &marker, 64)
        .expect("text through the tunnel");
    assert!(x.intact, "{x:?}");
    cli.exchange_ok(echo(&server), 4 << 20);
    let x = pcli
        .text(echo(&plain_server), &control, 64)
        .expect("plain text");
    assert!(x.intact, "{x:?}");
    let seen = capture.finish();
    assert!(
        seen.len() > 4 << 20,
        "the capture saw the transfer cross the link ({} bytes)",
        seen.len()
    );
    assert!(
        mesh::contains(&seen, control.as_bytes()),
        "the capture sees plaintext when there is some"
    );
    assert!(
        !mesh::contains(&seen, marker.as_bytes()),
        "meshed payload visible in the clear on the link"
    );

    // Identities on both sides; one tunnel connection for both streams.
    let client_id = spiffe(&bed.ns, "client");
    let server_id = spiffe(&bed.ns, "server");
    let m = bed
        .agent_b
        .wait_metric("the server side saw the client's identity", |m| {
            peer_opens(m, "server", "inbound", "true", &client_id) == 2.0
        });
    assert!(
        m.sum(
            "nodemesh_tcp_received_bytes_total",
            &[("pod", "server"), ("direction", "inbound")]
        ) >= (4 << 20) as f64,
        "{}",
        m.text
    );
    let m = bed
        .agent_a
        .wait_metric("the client side checked the server's identity", |m| {
            peer_opens(m, "client", "outbound", "true", &server_id) == 2.0
        });
    assert_eq!(tunnel(&m, "connections", "outbound"), 1.0, "{}", m.text);
    assert_eq!(tunnel(&m, "streams", "outbound"), 2.0, "{}", m.text);
    // The server sees its client's pod address, not the tunnel's end.
    let peers = srv.peers(ECHO);
    assert!(
        !peers.is_empty() && peers.iter().all(|p| p.ip() == client.ip),
        "{peers:?}"
    );

    // Same node: no TLS, both identities recorded.
    let mut nb = neighbour.tcp();
    nb.exchange_ok(echo(&server), 1000);
    let neighbour_id = spiffe(&bed.ns, "neighbour");
    bed.agent_b.wait_metric("same-node identities", |m| {
        peer_opens(m, "neighbour", "outbound", "false", &server_id) == 1.0
            && peer_opens(m, "server", "inbound", "false", &neighbour_id) == 1.0
    });
    assert_eq!(
        tunnel(&bed.agent_b.metrics(), "connections", "outbound"),
        0.0
    );
    // Unmeshed destinations: plain, no peer identity.
    let x = cli.exchange_ok(echo(&plain_server), 1000);
    assert!(x.redirected());
    bed.agent_a.wait_metric("plain connection counted", |m| {
        peer_opens(m, "client", "outbound", "false", "") == 1.0
    });
    drop(bed.identity);
}

/// Asks the identity service for `identity` with `token`, from `node`.
pub(crate) fn certify(
    bed: &MeshBed,
    node: &Node,
    token: &str,
    identity: Identity,
) -> Result<pki::CertInfo, IdentityClientError> {
    let token_file = node.dir.join(format!("token-{}", unique("t")));
    std::fs::write(&token_file, token).expect("token file");
    let cfg = IdentityClientConfig {
        addr: bed.identity.addr.to_string(),
        server_name: bed.install.server_name(),
        trust_anchors_pem: bed.install.pki.anchor.cert_pem.clone(),
        token_file,
        trust_domain: "cluster.local".into(),
        timeout: Duration::from_secs(10),
    };
    in_netns(&node.netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let client = IdentityClient::new(cfg)?;
            client.fetch(&identity).await.map(|issued| issued.info)
        })
    })
}

pub(crate) fn refused(r: Result<pki::CertInfo, IdentityClientError>) -> (u16, String) {
    match r {
        Err(IdentityClientError::Refused { status, error, .. }) => (status, error),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

pub fn the_identity_service_signs_only_for_pods_on_the_agents_node() {
    let bed = MeshBed::new("24h");
    let _server = bed.pod(&bed.b, "server", "server");
    let _client = bed.pod(&bed.a, "client", "client");
    bed.agent_a
        .wait_metric("client's certificate", |m| certificates(m) == 1.0);
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    let agent_a_token =
        std::fs::read_to_string(mesh::identity_token_file(&bed.a)).expect("agent a token");
    let id = |sa: &str| Identity::new(&bed.ns, sa).expect("identity");

    // Its own node's pod: signed, for exactly that identity.
    let info = certify(&bed, &bed.a, &agent_a_token, id("client")).expect("signed");
    assert_eq!(
        info.spiffe_id.as_deref(),
        Some(spiffe(&bed.ns, "client").as_str())
    );
    // A pod on another node: refused.
    assert_eq!(
        refused(certify(&bed, &bed.a, &agent_a_token, id("server"))),
        (403, "not_on_node".into())
    );
    // Not bound to a pod; not an agent; not a token at all.
    let unbound = bed.cluster.bound_token(
        &bed.install.namespace,
        "nodemesh-agent",
        None,
        TOKEN_AUDIENCE,
    );
    assert_eq!(
        refused(certify(&bed, &bed.a, &unbound, id("client"))),
        (403, "unbound_token".into())
    );
    let other = bed.cluster.bound_token(
        &bed.install.namespace,
        "nodemesh-identity",
        None,
        TOKEN_AUDIENCE,
    );
    assert_eq!(
        refused(certify(&bed, &bed.a, &other, id("client"))),
        (403, "not_an_agent".into())
    );
    // A caller the API server does not authenticate learns nothing of
    // what it said (the audit: TokenReview's own words came back).
    match certify(&bed, &bed.a, "garbage", id("client")) {
        Err(IdentityClientError::Refused {
            status,
            error,
            message,
        }) => {
            assert_eq!((status, error.as_str()), (401, "unauthenticated"));
            assert_eq!(
                message,
                "the token is not accepted: send the agent's projected service-account token"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let m = bed.identity.metrics();
    for (result, n) in [
        ("not_on_node", 1.0),
        ("unbound_token", 1.0),
        ("not_an_agent", 1.0),
        ("unauthenticated", 1.0),
    ] {
        assert_eq!(
            m.sum("nodemesh_identity_certify_total", &[("result", result)]),
            n,
            "{result}\n{}",
            m.text
        );
    }
    assert!(m.sum("nodemesh_identity_certify_total", &[("result", "ok")]) >= 3.0);
    let log = bed.identity.log();
    assert!(log.contains("certificate request refused"), "{log}");
    assert!(log.contains("runs on node"), "{log}");
}

/// TLS settings of a hand-made tunnel client: trusts `anchors_pem`,
/// presents `client` followed by `chain_pem`, speaks h2.
pub(crate) fn client_config(
    anchors_pem: &str,
    client: &CertAndKey,
    chain_pem: &str,
) -> Arc<rustls::ClientConfig> {
    client_config_alpn(anchors_pem, client, chain_pem, b"h2")
}

/// The same, speaking `alpn`.
pub(crate) fn client_config_alpn(
    anchors_pem: &str,
    client: &CertAndKey,
    chain_pem: &str,
    alpn: &[u8],
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in pki::certs_from_pem(anchors_pem, "anchors").expect("anchors") {
        roots.add(c).expect("an anchor");
    }
    let mut chain = pki::certs_from_pem(&client.cert_pem, "client").expect("client cert");
    chain.extend(pki::certs_from_pem(chain_pem, "chain").expect("chain"));
    let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).expect("client key");
    let mut cfg = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}

/// A TLS client to `addr` presenting `client` (cert, key), for `sni`:
/// whether a request got through.
pub(crate) fn tls_attempt(
    netns: &std::path::Path,
    addr: SocketAddr,
    anchors_pem: &str,
    client: &CertAndKey,
    chain_pem: &str,
    sni: String,
) -> Result<(), String> {
    let cfg = client_config(anchors_pem, client, chain_pem);
    let name = rustls::pki_types::ServerName::try_from(sni).map_err(|e| e.to_string())?;
    in_netns(netns, move || {
        let tcp =
            TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        // The HTTP/2 preface; the server answers with SETTINGS if it took us.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 9];
        tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// A tunnel client made by hand: from `netns` to a node's tunnel port,
/// mutual TLS as `client`, for the server name `sni`, HTTP/2.
pub(crate) struct HandTunnel {
    netns: std::path::PathBuf,
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    sni: rustls::pki_types::ServerName<'static>,
}

/// What a hand-made tunnel connection sends requests with.
pub(crate) type TunnelSender =
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

impl HandTunnel {
    pub(crate) fn new(
        netns: &std::path::Path,
        addr: SocketAddr,
        anchors_pem: &str,
        client: &CertAndKey,
        chain_pem: &str,
        sni: String,
    ) -> Self {
        Self {
            netns: netns.to_owned(),
            addr,
            cfg: client_config(anchors_pem, client, chain_pem),
            sni: rustls::pki_types::ServerName::try_from(sni).expect("a DNS name"),
        }
    }

    /// Opens one connection and runs `f` with its sender (in the netns, on
    /// a runtime of its own): what `f` returns.
    pub(crate) fn on_connection<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(TunnelSender) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        let (addr, cfg, sni) = (self.addr, self.cfg.clone(), self.sni.clone());
        in_netns(&self.netns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(sni, tcp)
                    .await
                    .expect("handshake");
                let (send, conn) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(tls),
                )
                .await
                .expect("h2");
                tokio::spawn(conn);
                f(send).await
            })
        })
    }

    /// One stream asking for `target`, on a connection of its own: the
    /// status the tunnel answers.
    pub(crate) fn connect(&self, target: SocketAddr) -> u16 {
        self.on_connection(move |mut send| async move {
            send.send_request(connect_request(target, None))
                .await
                .expect("CONNECT")
                .status()
                .as_u16()
        })
    }
}

/// A CONNECT for `target`, naming the client in a `forwarded` header if
/// given.
pub(crate) fn connect_request(
    target: SocketAddr,
    forwarded: Option<&str>,
) -> hyper::Request<http_body_util::Empty<bytes::Bytes>> {
    let mut req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(target.to_string());
    if let Some(f) = forwarded {
        req = req.header("forwarded", f);
    }
    req.body(http_body_util::Empty::new()).expect("a CONNECT")
}

/// Sends raw bytes to `addr`; whether the connection ended (closed or
/// reset) without a byte back.
pub(crate) fn raw_attempt(netns: &std::path::Path, addr: SocketAddr, bytes: &'static [u8]) -> bool {
    in_netns(netns, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
        let _ = s.write_all(bytes);
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) | Err(_) => true,
            Ok(_) => false,
        }
    })
}

pub fn the_tunnel_refuses_bad_peers_and_keeps_serving() {
    let bed = MeshBed::new("24h");
    let server = bed.pod(&bed.b, "server", "server");
    let neighbour = bed.pod(&bed.b, "neighbour", "neighbour");
    let client = bed.pod(&bed.a, "client", "client");
    bed.agent_a
        .wait_metric("client's certificate", |m| certificates(m) == 1.0);
    bed.agent_b
        .wait_metric("server's and neighbour's certificates", |m| {
            certificates(m) == 2.0
        });
    let tunnel_addr = SocketAddr::from((bed.b.ip, mesh::TUNNEL_PORT));
    let sni = Identity::new(&bed.ns, "server")
        .unwrap()
        .dns_name("cluster.local")
        .unwrap();
    let anchors = bed.install.pki.anchor.cert_pem.clone();
    let client_id = Identity::new(&bed.ns, "client").unwrap();

    // Plaintext, and garbage that starts like TLS.
    assert!(raw_attempt(
        &bed.a.netns,
        tunnel_addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    ));
    assert!(raw_attempt(
        &bed.a.netns,
        tunnel_addr,
        b"\x16\x03\x01\x00\x05garbage-garbage"
    ));

    // A certificate for the right identity from another trust anchor.
    let foreign_anchor =
        pki::generate_trust_anchor("cluster.local", Duration::from_secs(3600)).unwrap();
    let foreign_issuer =
        pki::generate_issuer(&foreign_anchor, "cluster.local", Duration::from_secs(3600)).unwrap();
    let foreign = pki::Signer::load(
        &foreign_issuer.cert_pem,
        &foreign_issuer.key_pem,
        &foreign_anchor.cert_pem,
        "cluster.local",
    )
    .unwrap();
    let leaf = |signer: &pki::Signer, not_before, not_after| {
        let key = rcgen::KeyPair::generate().unwrap();
        let issued = signer
            .sign_identity(&key, &client_id, not_before, not_after)
            .unwrap();
        (
            CertAndKey {
                cert_pem: issued.cert_pem,
                key_pem: key.serialize_pem(),
            },
            issued.chain_pem,
        )
    };
    let now = std::time::SystemTime::now();
    let (cert, chain) = leaf(&foreign, now, now + Duration::from_secs(600));
    let r = tls_attempt(
        &bed.a.netns,
        tunnel_addr,
        &anchors,
        &cert,
        &chain,
        sni.clone(),
    );
    assert!(r.is_err(), "a foreign certificate got through");
    // The right issuer, but expired.
    let signer = bed.install.pki.signer();
    let (cert, chain) = leaf(
        &signer,
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    let r = tls_attempt(
        &bed.a.netns,
        tunnel_addr,
        &anchors,
        &cert,
        &chain,
        sni.clone(),
    );
    assert!(r.is_err(), "an expired certificate got through");
    // The positive control: a valid certificate is let in.
    // The right issuer, another trust domain: refused by policy.
    let other_td = pki::Signer::load(
        &bed.install.pki.issuer.cert_pem,
        &bed.install.pki.issuer.key_pem,
        &bed.install.pki.anchor.cert_pem,
        "other.example",
    )
    .unwrap();
    let (cert, chain) = leaf(&other_td, now, now + Duration::from_secs(600));
    let r = tls_attempt(
        &bed.a.netns,
        tunnel_addr,
        &anchors,
        &cert,
        &chain,
        sni.clone(),
    );
    assert!(r.is_err(), "another trust domain got through");
    // A valid certificate asking for an identity node b does not serve.
    let (cert, chain) = leaf(&signer, now, now + Duration::from_secs(600));
    let elsewhere = client_id.dns_name("cluster.local").unwrap();
    let r = tls_attempt(
        &bed.a.netns,
        tunnel_addr,
        &anchors,
        &cert,
        &chain,
        elsewhere,
    );
    assert!(
        r.is_err(),
        "a server name without a certificate got through"
    );
    // The positive control: a valid certificate is let in.
    tls_attempt(
        &bed.a.netns,
        tunnel_addr,
        &anchors,
        &cert,
        &chain,
        sni.clone(),
    )
    .expect("a valid certificate is accepted");
    // Authenticated for the server's identity, the stream may only go to a
    // pod of that identity on this node.
    let by_hand = HandTunnel::new(&bed.a.netns, tunnel_addr, &anchors, &cert, &chain, sni);
    let status = |target| by_hand.connect(target);
    assert_eq!(status(echo(&neighbour)), 404, "a pod of another identity");
    assert_eq!(
        status(SocketAddr::from((bed.b.unused_ip(), ECHO))),
        404,
        "no pod there"
    );
    assert_eq!(
        status(echo(&server)),
        502,
        "the right pod, nothing listening yet"
    );
    // Never to the node itself: its admin port, or a host-network pod
    // (labelled meshed, of the right identity) whose address is the node's.
    bed.cluster
        .host_network_pod(&bed.ns, "on-host", &bed.b, "server");
    assert_eq!(
        status(SocketAddr::from((bed.b.ip, 4191))),
        404,
        "the node's admin port"
    );
    assert_eq!(
        status(SocketAddr::from((bed.b.ip, ECHO))),
        404,
        "a host-network pod"
    );

    let m = bed.agent_b.wait_metric("every refusal counted", |m| {
        tunnel_errors(m, "not_tls") >= 2.0
            && tunnel_errors(m, "untrusted_certificate") == 1.0
            && tunnel_errors(m, "expired_certificate") == 1.0
            && tunnel_errors(m, "policy_denied") == 1.0
            && tunnel_errors(m, "unknown_server_name") == 1.0
            && tunnel_errors(m, "unknown_destination") == 4.0
            && tunnel_errors(m, "connect") == 1.0
    });
    // The valid control, and one per CONNECT attempt above.
    assert_eq!(tunnel(&m, "connections", "inbound"), 6.0, "{}", m.text);
    let log = bed.agent_b.log();
    assert!(log.contains("not TLS (plaintext or garbage)"), "{log}");
    assert!(log.contains("TLS handshake failed"), "{log}");

    // And it keeps serving.
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut cli = client.tcp();
    cli.exchange_ok(echo(&server), 100_000);
    bed.agent_b.wait_metric("real traffic still flows", |m| {
        peer_opens(m, "server", "inbound", "true", &spiffe(&bed.ns, "client")) == 1.0
    });
}

pub fn certificates_rotate_under_a_long_lived_stream() {
    let bed = MeshBed::new("10s");
    let server = bed.pod(&bed.b, "server", "server");
    let client = bed.pod(&bed.a, "client", "client");
    let client_id = spiffe(&bed.ns, "client");
    let m = bed
        .agent_a
        .wait_metric("client's certificate", |m| expiry(m, &client_id) > 0.0);
    let first_expiry = expiry(&m, &client_id);
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut cli = client.tcp();
    // Longer than the first certificates live.
    let trips = cli
        .paced(echo(&server), 14, Duration::from_millis(100))
        .unwrap_or_else(|f| panic!("the long-lived stream broke: {f:?}"));
    assert!(trips.len() >= 50, "{} round trips", trips.len());
    let m = bed.agent_a.metrics();
    assert!(
        expiry(&m, &client_id) >= first_expiry + 5.0,
        "renewed while the stream flowed: {} then {}",
        first_expiry,
        expiry(&m, &client_id)
    );
    assert!(bed.agent_a.log().contains("certificate renewed"));
    assert!(bed.agent_b.log().contains("certificate renewed"));
    // New connections use the renewed certificate (a new tunnel connection).
    cli.exchange_ok(echo(&server), 10_000);
    let m = bed.agent_a.metrics();
    assert!(tunnel(&m, "connections", "outbound") >= 2.0, "{}", m.text);
    assert_eq!(
        m.sum("nodemesh_tcp_connect_errors_total", &[("pod", "client")]),
        0.0
    );

    // The last pod with the service account leaves: the certificate goes.
    drop(cli);
    bed.cluster.delete_pod(&client);
    bed.agent_a
        .wait_metric("certificate forgotten", |m| certificates(m) == 0.0);
    assert!(eventually("log says so", Duration::from_secs(5), || {
        if bed.agent_a.log().contains("certificate forgotten") {
            Ok(true)
        } else {
            Err("not yet".into())
        }
    }));
}
