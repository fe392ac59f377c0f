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

use crate::{
    inbound::{at, certificates, denied, line_from, plain_namespace},
    mesh::{HandTunnel, connect_request},
};

const ECHO: u16 = 8080;

fn open_inbound(m: &Metrics, pod: &str) -> f64 {
    m.sum(
        "nodemesh_tcp_open_connections",
        &[("pod", pod), ("direction", "inbound")],
    )
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
    let status = tunnel_a_to_b(&bed, &cert, &chain).connect(at(&server, INBOUND_PORT));
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

/// A tunnel connection made by hand from node a to node b, presenting
/// `cert`, for the server's identity.
fn tunnel_a_to_b(bed: &MeshBed, cert: &CertAndKey, chain: &str) -> HandTunnel {
    let sni = Identity::new(&bed.ns, "server")
        .unwrap()
        .dns_name("cluster.local")
        .unwrap();
    HandTunnel::new(
        &bed.a.netns,
        SocketAddr::from((bed.b.ip, mesh::TUNNEL_PORT)),
        &bed.install.pki.anchor.cert_pem,
        cert,
        chain,
        sni,
    )
}

/// A certificate for `sa` in the bed's namespace, from the install's issuer.
fn leaf(bed: &MeshBed, sa: &str) -> (CertAndKey, String) {
    let id = Identity::new(&bed.ns, sa).unwrap();
    bed.install.pki.leaf(&id, Duration::from_secs(600))
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

    // The positive control: those addresses do lead to the app, through
    // the agent, once the policy lets anyone in.
    bed.cluster.annotate_pod(
        &server,
        INBOUND_POLICY_ANNOTATION,
        Some("all-unauthenticated"),
    );
    for (what, netns, to) in [
        (
            "link-local from a pod",
            neighbour.netns.clone(),
            scoped(&neighbour.netns, "eth0"),
        ),
        (
            "the added address from the node",
            bed.b.netns.clone(),
            added,
        ),
    ] {
        nodemesh_tests::eventually(what, Duration::from_secs(10), || line_from(&netns, to));
    }
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
        let (cert, chain) = bed.install.pki.leaf(&id, Duration::from_secs(600));
        assert!(
            !tap_port_answers(&bed, &bed.b.netns, tap_a, &cert, &chain),
            "node a's tap port answered {id}"
        );
    }
    // The control: the identity service's tap client is answered.
    let (cert, chain) = bed.install.pki.tap_client();
    assert!(tap_port_answers(&bed, &bed.b.netns, tap_a, &cert, &chain));
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

/// A plaintext echo server of the node itself on `addr` (what kube-proxy's
/// rules would lead to for a cluster IP); its `peers` are who reached it.
fn node_listener(node: &nodemesh_tests::Node, addr: SocketAddr) -> nodemesh_tests::TcpApp {
    nodemesh_tests::sys::ip(&[
        "-n",
        &node.name,
        "addr",
        "add",
        &format!("{}/32", addr.ip()),
        "dev",
        "lo",
    ]);
    let mut app = node.host_process("listener");
    app.listen_on(addr);
    app
}

/// Medium 5: a cluster IP the agent did not know yet (before its first
/// list, a brand-new Service) was routed direct, in plaintext through
/// kube-proxy, to endpoints that may be meshed. Now nothing is captured
/// before Services and slices are listed, and an address of the Service
/// network (`--service-cidr`) that is no known Service port is refused.
pub fn a_cluster_ip_the_agent_does_not_know_is_refused() {
    let bed = MeshBed::new("24h");
    let client = bed.pod(&bed.a, "client", "client");
    let server = bed.pod(&bed.b, "server", "server");
    bed.agent_a
        .wait_metric("client's certificate", |m| certificates(m) == 1.0);
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    // Where "direct" to an unknown cluster IP would end up.
    let unknown = SocketAddr::from(([10, 96, 200, 200], 80));
    let mut reached = node_listener(&bed.a, unknown);
    let refused = client.tcp().exchange(unknown, 100);
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        reached.peers(unknown.port()),
        [],
        "a connection to an unknown cluster IP went around the mesh"
    );
    bed.agent_a.wait_metric("counted", |m| {
        m.sum(
            "nodemesh_tcp_connect_errors_total",
            &[("pod", "client"), ("reason", "no_endpoints")],
        ) >= 1.0
    });
    // The control: a Service the agent knows is balanced over its endpoint.
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let vip = bed.cluster.service(&bed.ns, "known", 80, ECHO);
    bed.cluster
        .endpoint_slice(&bed.ns, "known", ECHO, &[(&server, &bed.b, true)]);
    nodemesh_tests::eventually(
        "the Service through the mesh",
        Duration::from_secs(10),
        || {
            client
                .tcp()
                .exchange(SocketAddr::from((vip, 80)), 1000)
                .map(|_| ())
                .map_err(|f| format!("{f:?}"))
        },
    );
    assert_eq!(reached.peers(unknown.port()), []);
    // And the address does lead there, for an unmeshed pod.
    let plain = plain_namespace(&bed);
    let outsider = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain, "outsider"));
    outsider.tcp().exchange_ok(unknown, 100);
    assert_eq!(reached.peers(unknown.port()).len(), 1);
}

/// Medium 6: `config.nodemesh.io/default-inbound-policy: Deny` (or
/// `all_authenticated`) was ignored and the looser default applied. Now an
/// annotation that cannot be read means `deny`, on a pod or a namespace,
/// and its owner gets a Warning Event saying why.
pub fn a_mistyped_policy_annotation_means_deny() {
    let bed = MeshBed::new("24h");
    let plain = plain_namespace(&bed);
    let typo_ns = unique("typo");
    bed.cluster
        .namespace(&typo_ns, &[(nodemesh_core::names::MESH_LABEL, "enabled")]);
    let typo_pod = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&bed.ns, "server")
            .service_account("server")
            .annotation(INBOUND_POLICY_ANNOTATION, "Deny"),
    );
    let in_typo_ns = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&typo_ns, "other").service_account("other"),
    );
    let client = bed.cluster.run_pod(&bed.a, PodSpec::new(&plain, "client"));
    bed.agent_b
        .wait_metric("both certificates", |m| certificates(m) == 2.0);
    bed.cluster.annotate_namespace(
        &typo_ns,
        INBOUND_POLICY_ANNOTATION,
        Some("all_authenticated"),
    );
    let mut a = typo_pod.tcp();
    a.listen(ECHO);
    let mut b = in_typo_ns.tcp();
    b.listen(ECHO);
    for pod in [&typo_pod, &in_typo_ns] {
        nodemesh_tests::eventually("refused", Duration::from_secs(10), || {
            match line_from(&client.netns, at(pod, ECHO)) {
                Err(_) => Ok(()),
                Ok(()) => Err(format!("{} served plaintext", pod.name)),
            }
        });
    }
    assert!(a.peers(ECHO).is_empty() && b.peers(ECHO).is_empty());
    bed.agent_b.wait_metric("refused under deny", |m| {
        denied(m, "server", "denied") >= 1.0 && denied(m, "other", "denied") >= 1.0
    });
    let told = |ns: &str, name: &str| {
        nodemesh_tests::eventually("a Warning Event", Duration::from_secs(10), || {
            bed.cluster
                .events(ns)
                .into_iter()
                .find(|(object, reason, _)| {
                    object == name && reason == "NodemeshInvalidInboundPolicy"
                })
                .ok_or_else(|| format!("no event for {ns}/{name} yet"))
        })
    };
    let (_, _, message) = told(&bed.ns, "server");
    assert!(message.contains("deny applies"), "{message}");
    // A namespace's Events are in `default` (it is cluster-scoped).
    told("default", &typo_ns);
    // A namespace mistyped before this node had a pod in it is told when
    // its first pod here comes (as after an agent's start: namespaces are
    // listed before pods).
    let early_ns = unique("typo-early");
    bed.cluster
        .namespace(&early_ns, &[(nodemesh_core::names::MESH_LABEL, "enabled")]);
    bed.cluster
        .annotate_namespace(&early_ns, INBOUND_POLICY_ANNOTATION, Some("Deny"));
    std::thread::sleep(Duration::from_millis(500));
    let _late = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&early_ns, "late").service_account("late"),
    );
    told("default", &early_ns);
    // Fixed: the policy it meant applies, live.
    bed.cluster.annotate_pod(
        &typo_pod,
        INBOUND_POLICY_ANNOTATION,
        Some("all-unauthenticated"),
    );
    nodemesh_tests::eventually("served once fixed", Duration::from_secs(10), || {
        line_from(&client.netns, at(&typo_pod, ECHO))
    });
}

/// Low 16: a pod's annotation beat the namespace's and the install's
/// policy, and `skip-inbound-ports` took ports out of every policy. Now an
/// install-wide floor (`--min-inbound-policy`) holds whatever the
/// annotations say: they can only tighten it, and exempt ports are not
/// honoured under it. The kubelet's probes still pass.
pub fn the_install_floor_is_what_annotations_cannot_open() {
    let bed = MeshBed::with_agent_args(
        nodemesh_tests::Node::new(),
        nodemesh_tests::Node::new(),
        "24h",
        &["--min-inbound-policy", "all-authenticated"],
    );
    let plain = plain_namespace(&bed);
    let server = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&bed.ns, "server")
            .service_account("server")
            .annotation(INBOUND_POLICY_ANNOTATION, "all-unauthenticated")
            .annotation(nodemesh_core::names::SKIP_INBOUND_PORTS_ANNOTATION, "9090")
            .tcp_probe(7070),
    );
    let web = bed.pod(&bed.a, "web", "web");
    let client = bed.cluster.run_pod(&bed.a, PodSpec::new(&plain, "client"));
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    bed.agent_a
        .wait_metric("web's certificate", |m| certificates(m) == 1.0);
    let mut srv = server.tcp();
    for port in [ECHO, 9090, 7070] {
        srv.listen(port);
    }
    for port in [ECHO, 9090] {
        let got = line_from(&client.netns, at(&server, port));
        assert!(got.is_err(), "plaintext to {port} under the floor: {got:?}");
    }
    let x = web.tcp().exchange_ok(at(&server, ECHO), 1000);
    assert!(x.intact, "a meshed client: {x:?}");
    line_from(&bed.b.netns, at(&server, 7070)).expect("the kubelet's probe");
    bed.agent_b.wait_metric("refusals counted", |m| {
        denied(m, "server", "unauthenticated") >= 2.0
    });
}

/// Two CONNECT streams for `target` on one hand-made tunnel connection,
/// `gap` apart: the first one's status, and the second's (or why it
/// could not be opened).
fn two_streams(
    tunnel: &HandTunnel,
    target: SocketAddr,
    gap: Duration,
) -> (u16, Result<u16, String>) {
    tunnel.on_connection(move |mut send| async move {
        let first = send
            .send_request(connect_request(target, None))
            .await
            .expect("the first CONNECT")
            .status()
            .as_u16();
        tokio::time::sleep(gap).await;
        let second = match send.ready().await {
            Err(e) => Err(e.to_string()),
            Ok(()) => send
                .send_request(connect_request(target, None))
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string()),
        };
        (first, second)
    })
}

/// Medium 9: a tunnel connection outlived its client certificate — one
/// valid for 8 s opened a new stream at 12 s. Now the server says GOAWAY
/// at the certificate's `notAfter` (and at the connection's age cap): no
/// new stream after it.
pub fn a_tunnel_connection_takes_no_stream_past_its_certificate() {
    let bed = MeshBed::new("24h");
    let server = bed.pod(&bed.b, "server", "server");
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let id = Identity::new(&bed.ns, "web").unwrap();
    let (cert, chain) = bed.install.pki.leaf(&id, Duration::from_secs(5));
    let tunnel = tunnel_a_to_b(&bed, &cert, &chain);
    let (first, second) = two_streams(&tunnel, at(&server, ECHO), Duration::from_secs(8));
    assert_eq!(first, 200, "a stream while the certificate is valid");
    assert!(
        second.is_err(),
        "a new stream after the certificate expired: {second:?}"
    );
}

/// Medium 11: the key exchange was X25519 everywhere (rustls without its
/// `prefer-post-quantum` feature lists the hybrid last). Now every
/// endpoint settles on X25519MLKEM768 — the tunnel both ways, the agents'
/// handshakes with the identity service, the tap port — as each
/// handshake's negotiated group, counted, shows.
pub fn every_handshake_settles_on_the_post_quantum_hybrid() {
    let bed = MeshBed::new("24h");
    let server = bed.pod(&bed.b, "server", "server");
    let client = bed.pod(&bed.a, "client", "client");
    bed.agent_a
        .wait_metric("client's certificate", |m| certificates(m) == 1.0);
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    client.tcp().exchange_ok(at(&server, ECHO), 10_000);
    let (tap, chain) = bed.install.pki.tap_client();
    assert!(tap_port_answers(
        &bed,
        &bed.a.netns,
        SocketAddr::from((bed.b.ip, nodemesh_core::names::TAP_PORT)),
        &tap,
        &chain
    ));
    let handshakes = |m: &Metrics, endpoint: &str, group: &str| {
        m.sum(
            "nodemesh_tls_handshakes_total",
            &[("endpoint", endpoint), ("group", group)],
        )
    };
    let a = bed.agent_a.wait_metric("the tunnel's client end", |m| {
        handshakes(m, "tunnel_outbound", "X25519MLKEM768") >= 1.0
    });
    let b = bed
        .agent_b
        .wait_metric("the tunnel's server end and the tap port", |m| {
            handshakes(m, "tunnel_inbound", "X25519MLKEM768") >= 1.0
                && handshakes(m, "tap_port", "X25519MLKEM768") >= 1.0
        });
    for m in [&a, &b] {
        assert!(
            handshakes(m, "identity_service", "X25519MLKEM768") >= 1.0,
            "{}",
            m.text
        );
        let all = m.sum("nodemesh_tls_handshakes_total", &[]);
        let hybrid = m.sum(
            "nodemesh_tls_handshakes_total",
            &[("group", "X25519MLKEM768")],
        );
        assert_eq!(all, hybrid, "every handshake is the hybrid:\n{}", m.text);
    }
}

/// A hand-made CONNECT for `target` naming its client in `forwarded`;
/// sends a line through it once answered 200.
fn stream_claiming(tunnel: &HandTunnel, target: SocketAddr, forwarded: String) -> u16 {
    tunnel.on_connection(move |mut send| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let resp = send
            .send_request(connect_request(target, Some(&forwarded)))
            .await
            .expect("CONNECT");
        let status = resp.status().as_u16();
        if status == 200 {
            let mut io =
                hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.expect("upgrade"));
            io.write_all(b"line\n").await.expect("write");
            let mut buf = [0u8; 5];
            let _ = tokio::time::timeout(Duration::from_secs(3), io.read_exact(&mut buf)).await;
        }
        status
    })
}

/// Low 17: `forwarded: for=` accepted any pod of the identity anywhere,
/// with any port, so a node could make a server see its client as a pod
/// on another node. Now the claimed pod must be on the tunnel peer's node
/// (else the app sees that node), and the port is never taken.
pub fn a_node_vouches_only_for_its_own_pods() {
    let bed = MeshBed::new("24h");
    let server = bed.pod(&bed.b, "server", "server");
    let near = bed.pod(&bed.b, "near", "web");
    let far = bed.pod(&bed.a, "far", "web");
    bed.agent_b
        .wait_metric("server's and web's certificates", |m| {
            certificates(m) == 2.0
        });
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let (cert, chain) = leaf(&bed, "web");
    let tunnel = tunnel_a_to_b(&bed, &cert, &chain);
    let open = |claim: String| stream_claiming(&tunnel, at(&server, ECHO), claim);
    // Node a claims a web pod of node b, with a port of its choosing.
    assert_eq!(open(format!("for=\"{}:4444\"", near.ip)), 200);
    // Its own web pod, with the same port.
    assert_eq!(open(format!("for=\"{}:4444\"", far.ip)), 200);
    let peers = nodemesh_tests::eventually("both accepted", Duration::from_secs(5), || {
        let peers = srv.peers(ECHO);
        if peers.len() == 2 {
            Ok(peers)
        } else {
            Err(format!("{peers:?}"))
        }
    });
    let ips: Vec<IpAddr> = peers.iter().map(|p| p.ip()).collect();
    assert!(
        !ips.contains(&IpAddr::from(near.ip)),
        "the app saw a pod of another node as the client: {peers:?}"
    );
    assert!(
        ips.contains(&IpAddr::from(far.ip)),
        "its own pod is: {peers:?}"
    );
    assert!(
        ips.contains(&IpAddr::from(bed.a.ip)),
        "else the peer node: {peers:?}"
    );
    assert!(
        peers.iter().all(|p| p.port() != 4444),
        "the claimed port was taken: {peers:?}"
    );
}

/// Low 18: an upgraded connection (WebSocket, CONNECT) and a long HTTP/2
/// stream were decided once, at their request, and never again. Now they
/// are in the register every policy change decides on: a WebSocket-style
/// connection is cut once the server's policy refuses its client.
pub fn an_upgraded_connection_is_decided_again_on_a_policy_change() {
    use nodemesh_tests::apps::http;
    let bed = MeshBed::new("24h");
    let plain = plain_namespace(&bed);
    let server = bed.pod(&bed.b, "server", "server");
    let client = bed.cluster.run_pod(&bed.a, PodSpec::new(&plain, "client"));
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    let mut app = server.http();
    app.serve(ECHO, http::Knobs::default());
    let to = at(&server, ECHO);
    let ws = in_netns(&client.netns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(
            format!(
                "GET /chat HTTP/1.1\r\nHost: {to}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("request");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).expect("the response head");
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        s
    });
    echo_once(&ws).expect("bytes after the upgrade");
    assert!(
        !cut_within(&ws, Duration::from_secs(1)),
        "cut for no reason"
    );
    bed.cluster.annotate_pod(
        &server,
        INBOUND_POLICY_ANNOTATION,
        Some("all-authenticated"),
    );
    assert!(
        cut_within(&ws, Duration::from_secs(5)),
        "the upgraded connection outlived a policy that refuses its client"
    );
}

/// Accepts any server certificate (a prober's view: it only wants to see
/// how far a handshake gets).
#[derive(Debug)]
struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How a handshake without a client certificate, asking for `sni`, ends.
fn probe_without_certificate(netns: &std::path::Path, addr: SocketAddr, sni: String) -> String {
    let provider = nodemesh_core::pki::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let cfg = std::sync::Arc::new(cfg);
    let name = rustls::pki_types::ServerName::try_from(sni).unwrap();
    in_netns(netns, move || {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let conn = rustls::ClientConnection::new(cfg, name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let mut buf = [0u8; 16];
        match tls.read(&mut buf) {
            Ok(n) => format!("read {n} bytes"),
            Err(e) => {
                let got_certificate = tls.conn.peer_certificates().is_some_and(|c| !c.is_empty());
                format!("{e} (server certificate shown: {got_certificate})")
            }
        }
    })
}

/// Low 19: every unauthenticated attempt on `:15008` and `:4190` was one
/// `warn!` (a flood fills the log), and a name this node holds no
/// certificate for failed the handshake at once where a known one went on
/// to ask for the client's certificate (enumeration before any
/// authentication). Now refusals are logged once per reason a minute
/// (and all counted), and known and unknown names get the same handshake.
pub fn probes_get_one_answer_and_floods_one_log_line() {
    let bed = MeshBed::new("24h");
    let _server = bed.pod(&bed.b, "server", "server");
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    let tunnel = SocketAddr::from((bed.b.ip, mesh::TUNNEL_PORT));
    let name = |sa: &str| {
        Identity::new(&bed.ns, sa)
            .unwrap()
            .dns_name("cluster.local")
            .unwrap()
    };
    let known = probe_without_certificate(&bed.a.netns, tunnel, name("server"));
    let unknown = probe_without_certificate(&bed.a.netns, tunnel, name("nobody-here"));
    assert_eq!(
        known, unknown,
        "known and unknown names answered differently"
    );
    assert!(known.contains("shown: true"), "{known}");

    // A flood of garbage on both ports.
    let tap = SocketAddr::from((bed.b.ip, nodemesh_core::names::TAP_PORT));
    for _ in 0..200 {
        for to in [tunnel, tap] {
            let _ = crate::mesh::raw_attempt(&bed.a.netns, to, b"GET / HTTP/1.1\r\n\r\n");
        }
    }
    bed.agent_b.wait_metric("every attempt counted", |m| {
        m.sum(
            "nodemesh_tunnel_errors_total",
            &[("direction", "inbound"), ("reason", "not_tls")],
        ) >= 200.0
    });
    let log = bed.agent_b.log();
    let lines = log.matches("not TLS (plaintext or garbage)").count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} log lines for 200 attempts"
    );
}

/// Runs `iptables` in `node`'s netns.
fn iptables(node: &nodemesh_tests::Node, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, "iptables"])
        .args(args)
        .output()
        .expect("run iptables (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "iptables {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Medium 7: probe ports were open to anything whose source was one of the
/// pod's `hostIPs` — so NodePort or hostPort traffic SNATed to the node,
/// and every host-network pod, passed any policy there, while on a bridge
/// CNI the kubelet's own probes (from the bridge's address) could be
/// refused. Now only a connection the node made itself — a socket in its
/// own netns, of a process that is not a pod — is the kubelet's, whatever
/// node address it comes from.
pub fn only_the_node_itself_gets_through_to_probe_ports() {
    let bed = MeshBed::new("24h");
    let plain = plain_namespace(&bed);
    const PROBE: u16 = 7070;
    let server = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&bed.ns, "server")
            .service_account("server")
            .annotation(INBOUND_POLICY_ANNOTATION, "all-authenticated")
            .tcp_probe(PROBE),
    );
    let outsider = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain, "outsider"));
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(PROBE);
    // The kubelet: the node itself, from its address on the pods' bridge.
    line_from(&bed.b.netns, at(&server, PROBE)).expect("the node's probe");
    // A host-network pod: the node's netns and address, but a pod.
    let uid = bed
        .cluster
        .host_network_pod(&plain, "hostnet", &bed.b, "default");
    // The agent learns the pod from its watch in milliseconds; a kubelet
    // takes far longer to start its containers.
    std::thread::sleep(Duration::from_millis(500));
    let mut hostnet = bed.b.host_network_container(&uid);
    let refused = hostnet.exchange(at(&server, PROBE), 100);
    assert!(refused.is_err(), "a host-network pod: {refused:?}");
    // NodePort-style traffic: from another node to node b's address, DNAT
    // to the pod and SNAT to the node's bridge address (its hostIP here).
    let node_port = 30070u16;
    let link_ip = in_netns(&bed.b.netns, || {
        nix::ifaddrs::getifaddrs()
            .unwrap()
            .filter(|a| a.interface_name == "up0")
            .find_map(|a| a.address?.as_sockaddr_in().map(|v4| v4.ip()))
            .expect("node b's link address")
    });
    let dnat = format!("{}:{PROBE}", server.ip);
    iptables(
        &bed.b,
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            &node_port.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &dnat,
        ],
    );
    iptables(
        &bed.b,
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-p",
            "tcp",
            "-d",
            &server.ip.to_string(),
            "--dport",
            &PROBE.to_string(),
            "-j",
            "MASQUERADE",
        ],
    );
    let translated = line_from(&outsider.netns, SocketAddr::from((link_ip, node_port)));
    assert!(translated.is_err(), "SNATed to the node: {translated:?}");
    let peers = srv.peers(PROBE);
    assert_eq!(
        peers.len(),
        1,
        "only the node's probe reached the app: {peers:?}"
    );
    bed.agent_b.wait_metric("the others refused", |m| {
        denied(m, "server", "unauthenticated") >= 2.0
    });
}

/// Low 16: a policy that selects pods which are not meshed looked in force
/// but protected nothing there (their connections never reach an agent).
/// Now its status names them: condition `Meshed` False, `unmeshedPods`;
/// and it follows the pods (a pod meshed later clears it).
pub fn a_policy_names_the_pods_it_selects_but_cannot_protect() {
    let bed = MeshBed::new("24h");
    let _meshed = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&bed.ns, "api-1")
            .service_account("api")
            .label("app", "api"),
    );
    let opted_out = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&bed.ns, "api-2")
            .service_account("api")
            .label("app", "api")
            .label(nodemesh_core::names::MESH_LABEL, "disabled"),
    );
    let policy = format!(
        "apiVersion: policy.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: api, namespace: {}}}\nspec: {{selector: {{matchLabels: {{app: api}}}}, clients: {{authenticated: true}}}}\n",
        bed.ns
    );
    bed.cluster
        .apply_manifests(&policy, false)
        .expect("the policy");
    let status = |want_meshed: &'static str| {
        nodemesh_tests::eventually("the policy's status", Duration::from_secs(45), || {
            let o = bed
                .cluster
                .get_object(
                    "policy.nodemesh.io/v1alpha1",
                    "AuthorizationPolicy",
                    &bed.ns,
                    "api",
                )
                .ok_or("no policy")?;
            let meshed = o["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Meshed"))
                .cloned()
                .ok_or_else(|| format!("no Meshed condition: {o}"))?;
            if meshed["status"] == want_meshed {
                Ok((meshed, o["status"]["unmeshedPods"].clone()))
            } else {
                Err(format!("{meshed}"))
            }
        })
    };
    let (condition, named) = status("False");
    assert_eq!(named, serde_json::json!(["api-2"]), "{condition}");
    assert!(
        condition["message"]
            .as_str()
            .is_some_and(|m| m.contains("api-2")),
        "{condition}"
    );
    // Meshed after all: the status follows (within its resync).
    bed.cluster
        .label_pod(&opted_out, nodemesh_core::names::MESH_LABEL, None);
    let (_, named) = status("True");
    assert_eq!(named, serde_json::json!([]));
    bed.cluster.delete_manifests(&policy);
}

/// Low 13: the issuer's key was in `nodemesh install`'s output (a shell
/// pipe, CI logs, `last-applied-configuration`) and mounted with the
/// default mode. Now, unless an operator gives an issuer of their own, the
/// install prints no key: the identity service makes a trust anchor and an
/// issuer in the cluster at its first start (nothing mounted), the agents'
/// trust anchors with it, and a restarted service keeps them.
pub fn the_issuers_key_is_never_in_the_install_output() {
    let cluster = nodemesh_tests::Cluster::shared();
    let node = nodemesh_tests::Node::new();
    let install = mesh::Install::apply_with(cluster, &node.dir, false);
    let printed = nodemesh_cli::install::render(&nodemesh_cli::install::InstallArgs {
        namespace: install.namespace.clone(),
        ..nodemesh_cli::install::InstallArgs::default()
    })
    .expect("renders");
    assert!(!printed.contains("PRIVATE KEY"), "a key in the output");
    let secret = |cluster: &nodemesh_tests::Cluster| {
        cluster.get_object(
            "v1",
            "Secret",
            &install.namespace,
            "nodemesh-identity-issuer",
        )
    };
    assert!(
        secret(cluster).is_none(),
        "no issuer before the service runs"
    );

    let identity = mesh::IdentityService::start_from_cluster(&node, &install, "24h");
    let made = secret(cluster).expect("the issuer made in the cluster");
    let data = &made["data"];
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(data[key].is_string(), "{key} in {made}");
    }
    let anchors = cluster
        .get_object(
            "v1",
            "ConfigMap",
            &install.namespace,
            "nodemesh-identity-trust-anchors",
        )
        .expect("the agents' trust anchors");
    assert!(
        anchors["data"]["ca-bundle.crt"]
            .as_str()
            .is_some_and(|p| p.contains("BEGIN CERTIFICATE")),
        "{anchors}"
    );
    assert!(
        identity.log().contains("made a trust anchor and an issuer"),
        "{}",
        identity.log()
    );
    // Restarted: the same issuer, not a new PKI.
    drop(identity);
    let again = mesh::IdentityService::start_from_cluster(&node, &install, "24h");
    assert_eq!(secret(cluster).expect("still there")["data"], made["data"]);
    assert!(
        !again.log().contains("made a trust anchor"),
        "{}",
        again.log()
    );
    // It serves with it: its certificate chains to the anchors the agents
    // are given.
    let bundle = anchors["data"]["ca-bundle.crt"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut roots = rustls::RootCertStore::empty();
    for c in nodemesh_core::pki::certs_from_pem(&bundle, "anchors").unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(nodemesh_core::pki::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let name = rustls::pki_types::ServerName::try_from(install.server_name()).unwrap();
    let addr = again.addr;
    let handshake = in_netns(&node.netns, move || {
        let tcp =
            TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        let mut conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
        let mut tcp = tcp;
        conn.complete_io(&mut tcp)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    handshake.expect("the identity service's certificate chains to the cluster-made anchors");
}

/// Low 15: the pod's netns was the first process's anywhere below its
/// cgroup, so a container that made a network namespace of its own could
/// be taken for the pod — the agent's listeners and `sk_lookup` there, and
/// the pod's real netns left uncaptured (its inbound policy bypassed). Now
/// the sandbox's is taken (the container cgroup the pod's status does not
/// list), and only a netns holding the pod's addresses; one taken before
/// they were known is let go and the pod captured again when they come.
pub fn a_container_with_a_netns_of_its_own_is_never_the_pod() {
    let bed = MeshBed::new("24h");
    let plain = plain_namespace(&bed);
    let client = bed.cluster.run_pod(&bed.a, PodSpec::new(&plain, "client"));
    let server = bed.cluster.create_pod(
        &bed.b,
        PodSpec::new(&bed.ns, "server")
            .service_account("server")
            .annotation(INBOUND_POLICY_ANNOTATION, "deny"),
    );
    // A container that starts first and unshares its network namespace.
    let rogue = server.cgroup.join("cri-containerd-rogue0001.scope");
    std::fs::create_dir_all(&rogue).expect("the rogue container's cgroup");
    let mut unshare = std::process::Command::new("unshare");
    unshare.args(["--net", "sh", "-c", "ip link set lo up && exec sleep 300"]);
    let _rogue = nodemesh_tests::sys::Killed::new(nodemesh_tests::sys::spawn_in(
        unshare,
        &server.netns,
        &rogue,
    ));
    std::thread::sleep(Duration::from_millis(300));
    // Then the sandbox, and the status naming the rogue as a container.
    server.start_sandbox();
    bed.cluster.pod_running(&bed.b, &server);
    bed.cluster.patch_pod_status(
        &server,
        serde_json::json!({"containerStatuses": [{
            "name": "app", "containerID": "containerd://rogue0001", "ready": true,
            "restartCount": 0, "image": "nodemesh.test/app:1", "imageID": "",
            "state": {"running": {}}
        }]}),
    );
    bed.agent_b.wait_metric("server captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 1.0
    });
    let mut app = server.tcp();
    app.listen(ECHO);
    // Captured in its real netns: plaintext is refused under deny, the app
    // sees nothing (around the policy, it would have answered).
    nodemesh_tests::eventually(
        "the pod's own netns captured",
        Duration::from_secs(10),
        || match line_from(&client.netns, at(&server, ECHO)) {
            Err(_) if denied(&bed.agent_b.metrics(), "server", "denied") >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(app.peers(ECHO).is_empty(), "{:?}", app.peers(ECHO));
}

/// Low 14: the agent needed the host's PID namespace and CAP_SYS_PTRACE
/// to reach pods' netns through their processes. With `--netns-dir` (what
/// `nodemesh install --host-pid=false` sets) it finds them among the
/// container runtime's netns by address instead — no /proc of other
/// processes at all — and meshes as before: tunnelled, policies enforced.
pub fn pods_netns_are_found_among_the_runtimes_by_address() {
    let bed = MeshBed::with_agent_args(
        nodemesh_tests::Node::new(),
        nodemesh_tests::Node::new(),
        "24h",
        &["--netns-dir", "/run/netns"],
    );
    let plain = plain_namespace(&bed);
    let server = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&bed.ns, "server")
            .service_account("server")
            .annotation(INBOUND_POLICY_ANNOTATION, "all-authenticated"),
    );
    let client = bed.pod(&bed.a, "client", "client");
    let outsider = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain, "outsider"));
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    bed.agent_a
        .wait_metric("client's certificate", |m| certificates(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let x = client.tcp().exchange_ok(at(&server, ECHO), 10_000);
    assert!(x.intact && x.redirected(), "{x:?}");
    bed.agent_b.wait_metric("through the tunnel", |m| {
        mesh::tunnelled_in(
            m,
            "server",
            &format!("spiffe://cluster.local/ns/{}/sa/client", bed.ns),
        ) == 1.0
    });
    assert!(line_from(&outsider.netns, at(&server, ECHO)).is_err());
    for (agent, pod) in [(&bed.agent_b, &server), (&bed.agent_a, &client)] {
        let log = agent.log();
        let captured = format!("netns={}", pod.netns.display());
        assert!(
            log.lines()
                .any(|l| l.contains("pod captured") && l.contains(&captured)),
            "{captured} not in:\n{log}"
        );
    }
}
