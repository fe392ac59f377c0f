//! The security audit's attacks, each run on the two-node bed as the audit
//! ran it (real API server, agents, eBPF), and each a test that failed
//! before its fix: what one connection, one node or one annotation could
//! do to the mesh, and now cannot (docs/security.md names them).
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream},
    time::{Duration, Instant},
};

use nodemesh_core::{
    identity::Identity,
    names::{INBOUND_POLICY_ANNOTATION, INBOUND_PORT},
    pki::CertAndKey,
};
use nodemesh_tests::{
    Metrics, Pod, PodSpec,
    kube::unique,
    mesh::{self, MeshBed},
    sys::in_netns,
};

use crate::mesh::connect_stream;

const ECHO: u16 = 8080;

fn at(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::from((pod.ip, port))
}

fn certificates(m: &Metrics) -> f64 {
    m.sum("nodemesh_identity_certificates", &[])
}

fn denied(m: &Metrics, pod: &str, reason: &str) -> f64 {
    m.sum(
        "nodemesh_inbound_denied_total",
        &[("pod", pod), ("reason", reason)],
    )
}

fn open_inbound(m: &Metrics, pod: &str) -> f64 {
    m.sum(
        "nodemesh_tcp_open_connections",
        &[("pod", pod), ("direction", "inbound")],
    )
}

/// An unmeshed namespace for plaintext clients.
fn plain_namespace(bed: &MeshBed) -> String {
    let ns = unique("plain");
    bed.cluster.namespace(&ns, &[]);
    ns
}

/// What a plain client from `netns` gets at `to` when it sends a line and
/// waits for it back: `Ok(())` echoed, else how it failed.
fn line_from(netns: &std::path::Path, to: SocketAddr) -> Result<(), String> {
    in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"hello\n").map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
        (&buf == b"hello\n")
            .then_some(())
            .ok_or_else(|| "a different answer".to_string())
    })
}

/// The interface index of `name` inside `netns` (for link-local scopes).
fn ifindex(netns: &std::path::Path, name: &'static str) -> u32 {
    in_netns(netns, move || {
        nix::net::if_::if_nametoindex(name).unwrap_or_else(|e| panic!("ifindex of {name}: {e}"))
    })
}

/// The pod's IPv6 link-local address on `eth0` (the kernel made it when
/// the link came up; the API server never hears of it).
fn link_local(pod: &Pod) -> Ipv6Addr {
    let netns = pod.netns.clone();
    nodemesh_tests::eventually(
        "the pod's link-local address",
        Duration::from_secs(10),
        || {
            let netns = netns.clone();
            in_netns(&netns, || {
                nix::ifaddrs::getifaddrs()
                    .map_err(|e| e.to_string())?
                    .filter(|a| a.interface_name == "eth0")
                    .filter_map(|a| a.address?.as_sockaddr_in6().map(|v6| v6.ip()))
                    .find(|ip| ip.is_unicast_link_local())
                    .ok_or_else(|| "no link-local address yet".to_string())
            })
        },
    )
}

/// High 1: one connection to `<pod>:15006` made the agent deliver it to
/// `<pod>:15006`, which came back to its own listener, and again, until
/// every connection slot was taken. Now the agent's listeners in the pod
/// are on loopback (only `sk_lookup` hands them the pod's connections) and
/// `sk_lookup` knows the agent's own deliveries by their ends: a
/// connection to `<pod>:15006` is just a port the app does not serve —
/// from another node in plaintext, from a meshed pod on the same node,
/// through the tunnel — and someone in the pod dialling the agent's
/// listener itself is refused and counted. The node keeps serving.
pub fn the_agents_own_ports_are_never_a_destination() {
    let bed = MeshBed::new("24h");
    let plain = plain_namespace(&bed);
    let server = bed.pod(&bed.b, "server", "server");
    let near = bed.pod(&bed.b, "near", "web");
    let far = bed.pod(&bed.a, "far", "web");
    let attacker = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain, "attacker"));
    bed.agent_b
        .wait_metric("server's and web's certificates", |m| {
            certificates(m) == 2.0
        });
    bed.agent_a
        .wait_metric("web's certificate", |m| certificates(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);

    // Plaintext from another node, to the inbound and the outbound port:
    // held open a while, as the audit's attacker did.
    let agent_ports = [INBOUND_PORT, 15001];
    let held: Vec<TcpStream> = agent_ports
        .iter()
        .filter_map(|port| {
            let to = at(&server, *port);
            in_netns(&attacker.netns, move || {
                TcpStream::connect_timeout(&to, Duration::from_secs(3)).ok()
            })
        })
        .collect();
    for port in agent_ports {
        let got = line_from(&attacker.netns, at(&server, port));
        assert!(got.is_err(), "port {port} answered: {got:?}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let m = bed.agent_b.metrics();
    assert_eq!(
        open_inbound(&m, "server"),
        0.0,
        "nothing is carried for them (no chain of connections): {}",
        m.text
    );
    assert!(
        m.sum(
            "nodemesh_tcp_connect_errors_total",
            &[
                ("pod", "server"),
                ("direction", "inbound"),
                ("reason", "refused")
            ]
        ) >= 2.0,
        "each was delivered once, to a port nobody serves: {}",
        m.text
    );
    drop(held);

    // A meshed pod on the same node, and one through the tunnel.
    let same_node = near.tcp().exchange(at(&server, INBOUND_PORT), 100);
    assert!(same_node.is_err(), "same node: {same_node:?}");
    let through = far.tcp().exchange(at(&server, INBOUND_PORT), 100);
    assert!(through.is_err(), "through the tunnel: {through:?}");
    let (cert, chain) = leaf(&bed, "web");
    let sni = Identity::new(&bed.ns, "server")
        .unwrap()
        .dns_name("cluster.local")
        .unwrap();
    let status = connect_stream(
        &bed.a.netns,
        SocketAddr::from((bed.b.ip, mesh::TUNNEL_PORT)),
        &bed.install.pki.anchor.cert_pem,
        &cert,
        &chain,
        sni,
        at(&server, INBOUND_PORT),
    );
    assert_eq!(status, 502, "a hand-made CONNECT to the inbound port");
    // From inside the pod, the agent's listener itself.
    for to in ["127.0.0.1", "[::1]"] {
        let to: SocketAddr = format!("{to}:{INBOUND_PORT}").parse().unwrap();
        let got = server.tcp().exchange(to, 100);
        assert!(got.is_err(), "{to} from inside the pod: {got:?}");
    }
    let m = bed.agent_b.wait_metric("the pod's own dials refused", |m| {
        denied(m, "server", "agent_port") == 2.0
    });
    assert_eq!(open_inbound(&m, "server"), 0.0, "{}", m.text);
    assert!(srv.peers(ECHO).is_empty(), "the app saw none of it");

    // And the node keeps serving: every client still gets through.
    for client in [&near, &far, &attacker] {
        let x = client.tcp().exchange_ok(at(&server, ECHO), 10_000);
        assert!(x.intact, "{}: {x:?}", client.name);
    }
}

/// A certificate for `sa` in the bed's namespace, from the install's issuer.
fn leaf(bed: &MeshBed, sa: &str) -> (CertAndKey, String) {
    let id = Identity::new(&bed.ns, sa).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let now = std::time::SystemTime::now();
    let issued = bed
        .install
        .pki
        .signer()
        .sign_identity(&key, &id, now, now + Duration::from_secs(600))
        .unwrap();
    (
        CertAndKey {
            cert_pem: issued.cert_pem,
            key_pem: key.serialize_pem(),
        },
        issued.chain_pem,
    )
}

/// High 3: inbound capture took only the addresses the API lists, so the
/// pod's IPv6 link-local address (and any address added inside it) reached
/// the app around the policy. Now every address of the pod's netns is
/// captured: under `deny`, neither an unmeshed pod on the same bridge nor
/// the node itself reaches the app through `fe80::…` or an address the
/// pod added, and a meshed client's connect to a link-local address is
/// refused rather than sent around the mesh.
pub fn every_address_of_a_pod_is_captured() {
    let bed = MeshBed::new("24h");
    let plain = plain_namespace(&bed);
    let server = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&bed.ns, "server")
            .service_account("server")
            .annotation(INBOUND_POLICY_ANNOTATION, "deny"),
    );
    let neighbour = bed
        .cluster
        .run_pod(&bed.b, PodSpec::new(&plain, "neighbour"));
    let meshed = bed.pod(&bed.b, "meshed", "web");
    bed.agent_b
        .wait_metric("server's and web's certificates", |m| {
            certificates(m) == 2.0
        });
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let fe80 = link_local(&server);

    // The control: the listed address is refused under `deny`.
    assert!(line_from(&neighbour.netns, at(&server, ECHO)).is_err());
    // Link-local, from a pod on the same bridge and from the node.
    let scoped = |netns: &std::path::Path, dev| {
        SocketAddr::V6(SocketAddrV6::new(fe80, ECHO, 0, ifindex(netns, dev)))
    };
    let from_pod = line_from(&neighbour.netns, scoped(&neighbour.netns, "eth0"));
    assert!(from_pod.is_err(), "link-local from a pod: {from_pod:?}");
    let from_node = line_from(&bed.b.netns, scoped(&bed.b.netns, "nm0"));
    assert!(
        from_node.is_err(),
        "link-local from the node: {from_node:?}"
    );

    // An address the pod adds itself, which no API lists.
    let extra = IpAddr::V4(bed.b.unused_ip());
    nodemesh_tests::sys::ip(&[
        "-n",
        &netns_name(&server),
        "addr",
        "add",
        &format!("{extra}/24"),
        "dev",
        "eth0",
    ]);
    let added = SocketAddr::new(extra, ECHO);
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let got = line_from(&bed.b.netns, added);
        assert!(got.is_err(), "an added address reached the app: {got:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        srv.peers(ECHO).is_empty(),
        "the app accepted nothing: {:?}",
        srv.peers(ECHO)
    );
    bed.agent_b.wait_metric("the refusals counted", |m| {
        denied(m, "server", "denied") >= 3.0
    });

    // A meshed client's connect to a link-local address fails at once
    // (EPERM), never in the clear around the proxy.
    let refused = meshed
        .tcp()
        .exchange(scoped(&meshed.netns, "eth0"), 100)
        .expect_err("a meshed pod's link-local connect");
    assert_eq!(refused.kind, "denied", "{refused:?}");
}

fn netns_name(pod: &Pod) -> String {
    pod.netns
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a /run/netns name")
        .to_owned()
}

/// Whether an agent's tap port at `addr` answers `GET /v1/stat` to a
/// client in `netns` presenting `client` (its chain after it).
fn tap_port_answers(
    bed: &MeshBed,
    netns: &std::path::Path,
    addr: SocketAddr,
    client: &CertAndKey,
    chain: &str,
) -> bool {
    let cfg = crate::mesh::client_config_alpn(
        &bed.install.pki.anchor.cert_pem,
        client,
        chain,
        b"http/1.1",
    );
    let name = Identity::new(&bed.install.namespace, "nodemesh-agent")
        .unwrap()
        .dns_name("cluster.local")
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(name).unwrap();
    in_netns(netns, move || {
        let Ok(tcp) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
        let Ok(conn) = rustls::ClientConnection::new(cfg, name) else {
            return false;
        };
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        if tls
            .write_all(
                b"GET /v1/stat?window=1m HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n",
            )
            .is_err()
        {
            return false;
        }
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer);
        answer.starts_with(b"HTTP/1.1 200")
    })
}

/// High 2: the identity service signed any service account with a pod on
/// the asking agent's node — its own included, on the node that runs it —
/// and that identity opened every other node's tap port. Now it signs only
/// for meshed pods that are not on the host's network, never for the
/// install's other accounts, only for tokens of pods the agents' DaemonSet
/// controls; and the tap port answers only an identity outside the
/// workload space, which no node can get.
pub fn a_node_gets_only_its_meshed_pods_identities() {
    let bed = MeshBed::new("24h");
    let plain = plain_namespace(&bed);
    let _server = bed.pod(&bed.b, "server", "server");
    let _lonely = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&plain, "lonely").service_account("lonely"),
    );
    bed.cluster
        .host_network_pod(&bed.ns, "on-host", &bed.b, "hostnet");
    // The identity service's pod, as if scheduled to node b.
    bed.cluster.host_network_pod(
        &bed.install.namespace,
        "identity",
        &bed.b,
        "nodemesh-identity",
    );
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    let token_b =
        std::fs::read_to_string(mesh::identity_token_file(&bed.b)).expect("agent b's token");
    let certify = |ns: &str, sa: &str, token: &str| {
        crate::mesh::certify(&bed, &bed.b, token, Identity::new(ns, sa).unwrap())
    };
    let refused = |ns: &str, sa: &str, token: &str| crate::mesh::refused(certify(ns, sa, token));

    // What a node may have: its meshed pods' identities, and its own.
    certify(&bed.ns, "server", &token_b).expect("a meshed pod on the node");
    certify(&bed.install.namespace, "nodemesh-agent", &token_b).expect("the agent's own");
    // What it may not, with the agent's own token.
    assert_eq!(
        refused(&plain, "lonely", &token_b),
        (403, "not_on_node".into()),
        "an unmeshed pod's"
    );
    assert_eq!(
        refused(&bed.ns, "hostnet", &token_b),
        (403, "not_on_node".into()),
        "a host-network pod's"
    );
    assert_eq!(
        refused(&bed.install.namespace, "nodemesh-identity", &token_b),
        (403, "reserved".into()),
        "the identity service's, on the node that runs it"
    );
    // A pod with the agents' service account that their DaemonSet does not
    // control: its token is no agent's.
    let uid =
        bed.cluster
            .host_network_pod(&bed.install.namespace, "rogue", &bed.b, "nodemesh-agent");
    let rogue = bed.cluster.bound_token(
        &bed.install.namespace,
        "nodemesh-agent",
        Some(("rogue", &uid)),
        nodemesh_core::identity::TOKEN_AUDIENCE,
    );
    assert_eq!(
        refused(&bed.ns, "server", &rogue),
        (403, "not_an_agent".into())
    );
    // Whatever node b holds, node a's tap port answers none of it.
    let tap_a = SocketAddr::from((bed.a.ip, nodemesh_core::names::TAP_PORT));
    for (ns, sa) in [
        (bed.ns.clone(), "server"),
        (bed.install.namespace.clone(), "nodemesh-agent"),
        (bed.install.namespace.clone(), "nodemesh-identity"),
    ] {
        let id = Identity::new(&ns, sa).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let now = std::time::SystemTime::now();
        let issued = bed
            .install
            .pki
            .signer()
            .sign_identity(&key, &id, now, now + Duration::from_secs(600))
            .unwrap();
        let cert = CertAndKey {
            cert_pem: issued.cert_pem,
            key_pem: key.serialize_pem(),
        };
        assert!(
            !tap_port_answers(&bed, &bed.b.netns, tap_a, &cert, &issued.chain_pem),
            "node a's tap port answered {id}"
        );
    }
    // The control: the identity service's tap client is answered.
    let key = rcgen::KeyPair::generate().unwrap();
    let issued = bed
        .install
        .pki
        .signer()
        .sign_client(
            &key,
            &nodemesh_core::identity::tap_client_id("cluster.local"),
            Duration::from_secs(600),
        )
        .unwrap();
    let cert = CertAndKey {
        cert_pem: issued.cert_pem,
        key_pem: key.serialize_pem(),
    };
    assert!(tap_port_answers(
        &bed,
        &bed.b.netns,
        tap_a,
        &cert,
        &issued.chain_pem
    ));
    let m = bed.identity.metrics();
    for (result, n) in [
        ("not_on_node", 2.0),
        ("reserved", 1.0),
        ("not_an_agent", 1.0),
    ] {
        assert_eq!(
            m.sum("nodemesh_identity_certify_total", &[("result", result)]),
            n,
            "{result}\n{}",
            m.text
        );
    }
}

/// A plaintext connection from `netns` to `to`, held open, with one line
/// echoed on it.
fn held_connection(netns: &std::path::Path, to: SocketAddr) -> TcpStream {
    let s = in_netns(netns, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(3))
    })
    .expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    echo_once(&s).expect("the first line");
    s
}

/// One line through an open connection, echoed back.
fn echo_once(mut s: &TcpStream) -> std::io::Result<()> {
    s.write_all(b"line\n")?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf)?;
    if &buf == b"line\n" {
        Ok(())
    } else {
        Err(std::io::Error::other("a different answer"))
    }
}

/// Whether `s` stops carrying lines within `within`.
fn cut_within(s: &TcpStream, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if echo_once(s).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Medium 4: a pod labelled into the mesh kept the plaintext connections
/// its app had accepted before, whatever its policy said. Now capture
/// decides on them as on any new one: under `deny` the old connection is
/// destroyed when the pod is captured (counted like a refusal); under the
/// default policy it lives on — until a policy change refuses it.
pub fn connections_from_before_capture_are_decided_at_capture() {
    let bed = MeshBed::new("24h");
    let plain = plain_namespace(&bed);
    let strict = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&plain, "strict")
            .service_account("strict")
            .annotation(INBOUND_POLICY_ANNOTATION, "deny"),
    );
    let open = bed
        .cluster
        .run_pod(&bed.b, PodSpec::new(&plain, "open").service_account("open"));
    let client = bed.cluster.run_pod(&bed.a, PodSpec::new(&plain, "client"));
    let mut strict_app = strict.tcp();
    strict_app.listen(ECHO);
    let mut open_app = open.tcp();
    open_app.listen(ECHO);
    let to_strict = held_connection(&client.netns, at(&strict, ECHO));
    let to_open = held_connection(&client.netns, at(&open, ECHO));

    // Into the mesh, live.
    for pod in [&strict, &open] {
        bed.cluster
            .label_pod(pod, nodemesh_core::names::MESH_LABEL, Some("enabled"));
    }
    bed.agent_b.wait_metric("both captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 2.0
    });
    assert!(
        cut_within(&to_strict, Duration::from_secs(5)),
        "the old connection to the deny pod still carries bytes"
    );
    assert!(
        !cut_within(&to_open, Duration::from_secs(2)),
        "the old connection to the all-unauthenticated pod was cut"
    );
    bed.agent_b
        .wait_metric("the destroyed connection counted", |m| {
            denied(m, "strict", "denied") >= 1.0
        });
    // New connections are decided the usual way.
    assert!(line_from(&client.netns, at(&strict, ECHO)).is_err());
    line_from(&client.netns, at(&open, ECHO)).expect("a new connection to the open pod");

    // A policy change decides on the surviving one again.
    bed.cluster
        .annotate_pod(&open, INBOUND_POLICY_ANNOTATION, Some("all-authenticated"));
    assert!(
        cut_within(&to_open, Duration::from_secs(5)),
        "the old connection survived a policy that refuses it"
    );
    bed.agent_b
        .wait_metric("counted", |m| denied(m, "open", "unauthenticated") >= 1.0);
}
