//! Several nodes meshed together: a link between them (a netns with a
//! bridge, where traffic between nodes can be captured), the install's
//! identity objects in the API server, the identity service on one node,
//! and agents with workload identity and the tunnel on every node.
#![allow(unsafe_code)] // the AF_PACKET capture on the link
use std::{
    fs::{self, File},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nodemesh_core::pki::{self, Signer};

use crate::{
    Agent, AgentOptions, Cluster,
    kube::unique,
    node::{Node, Pod, PodSpec},
    prom::Metrics,
    sys::{http_get, in_netns, ip, ip_quiet, read_or_empty, self_exe, spawn_in},
};

static LINKS: AtomicU32 = AtomicU32::new(0);

/// The port of the tunnel on every node.
pub const TUNNEL_PORT: u16 = 15008;
/// Where the identity service listens (on its node's address).
pub const IDENTITY_PORT: u16 = 8080;
pub const IDENTITY_ADMIN_PORT: u16 = 9990;
/// Where the identity service serves the aggregated API (on its node's
/// address).
pub const API_PORT: u16 = nodemesh_core::names::API_PORT;

/// Nodes wired together: each node gets an `up0` veth into the link's
/// bridge, an address on the link network, routes to the other nodes' pod
/// subnets (and node addresses) through them, and IP forwarding.
#[derive(Debug)]
pub struct Link {
    pub name: String,
    pub netns: PathBuf,
}

impl Link {
    pub fn connect(nodes: &[&Node]) -> Link {
        crate::node::sweep_once();
        let k = LINKS.fetch_add(1, Ordering::Relaxed);
        let name = format!("nmt{}-l{k}", std::process::id());
        let link = Link {
            netns: PathBuf::from("/run/netns").join(&name),
            name,
        };
        let net = |i: usize| Ipv4Addr::new(172, 31, (k % 250) as u8, i as u8 + 1);
        let net6 =
            |i: usize| Ipv6Addr::new(0xfd00, 0xac1f, (k % 250) as u16, 0, 0, 0, 0, i as u16 + 1);
        ip(&["netns", "add", &link.name]);
        ip(&["-n", &link.name, "link", "set", "lo", "up"]);
        ip(&["-n", &link.name, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &link.name, "link", "set", "br0", "up"]);
        for (i, node) in nodes.iter().enumerate() {
            let veth = format!("n{i}");
            ip(&[
                "-n", &link.name, "link", "add", &veth, "type", "veth", "peer", "name", "up0",
                "netns", &node.name,
            ]);
            ip(&[
                "-n", &link.name, "link", "set", &veth, "master", "br0", "up",
            ]);
            ip(&[
                "-n",
                &node.name,
                "addr",
                "add",
                &format!("{}/24", net(i)),
                "dev",
                "up0",
            ]);
            ip(&[
                "-n",
                &node.name,
                "addr",
                "add",
                &format!("{}/64", net6(i)),
                "dev",
                "up0",
                "nodad",
            ]);
            ip(&["-n", &node.name, "link", "set", "up0", "up"]);
            in_netns(&node.netns, || {
                fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding");
                fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
                    .expect("enable IPv6 forwarding");
            });
        }
        for (i, node) in nodes.iter().enumerate() {
            for (j, other) in nodes.iter().enumerate() {
                if i != j {
                    // From the node's own address (its pods' hostIP), as
                    // a node sends to another's InternalIP.
                    ip(&[
                        "-n",
                        &node.name,
                        "route",
                        "add",
                        &other.pod_subnet(),
                        "via",
                        &net(j).to_string(),
                        "src",
                        &node.ip.to_string(),
                    ]);
                    ip(&[
                        "-n",
                        &node.name,
                        "-6",
                        "route",
                        "add",
                        &other.pod_subnet6(),
                        "via",
                        &net6(j).to_string(),
                        "src",
                        &node.ip6.to_string(),
                    ]);
                }
            }
        }
        link
    }

    /// Starts capturing every frame that crosses the link.
    pub fn capture(&self) -> Capture {
        Capture::start(&self.netns)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        ip_quiet(&["netns", "del", &self.name]);
    }
}

/// Frames seen on the link (a raw AF_PACKET socket in its netns).
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<u8>>>,
}

/// At most this much is kept.
const CAPTURE_LIMIT: usize = 256 << 20;

impl Capture {
    fn start(netns: &Path) -> Capture {
        let ns = File::open(netns).expect("open link netns");
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stopping = stop.clone();
        let thread = thread::spawn(move || {
            // SAFETY: setns on this capture thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
            // SAFETY: plain socket(2); the fd is owned right away.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fd is a fresh socket we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            let rcvbuf: libc::c_int = 32 << 20;
            // SAFETY: valid option values and lengths.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const timeout).cast(),
                    size_of::<libc::timeval>() as u32,
                );
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const rcvbuf).cast(),
                    size_of::<libc::c_int>() as u32,
                );
            }
            let _ = ready_tx.send(());
            let mut data = Vec::new();
            // Large: offloaded (GSO/GRO) frames exceed 64 KiB.
            let mut buf = vec![0u8; 512 * 1024];
            while !stopping.load(Ordering::Relaxed) {
                // SAFETY: buf is valid for its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 && data.len() < CAPTURE_LIMIT {
                    data.extend_from_slice(&buf[..n as usize]);
                }
            }
            data
        });
        ready_rx.recv().expect("capture started");
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns the raw frames, concatenated.
    pub fn finish(mut self) -> Vec<u8> {
        // Let frames in flight arrive.
        thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("capture thread"))
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connections `pod`'s agent accepted for it through the tunnel from
/// `peer` (a SPIFFE ID).
pub fn tunnelled_in(m: &Metrics, pod: &str, peer: &str) -> f64 {
    m.sum(
        "nodemesh_tcp_peer_open_total",
        &[
            ("pod", pod),
            ("direction", "inbound"),
            ("tls", "true"),
            ("peer_identity", peer),
        ],
    )
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A trust anchor and issuer made by the test (so it can also sign
/// certificates the mesh must refuse), written to files.
#[derive(Debug)]
pub struct TestPki {
    pub anchor: pki::CertAndKey,
    pub issuer: pki::CertAndKey,
    pub anchors_file: PathBuf,
    pub issuer_cert_file: PathBuf,
    pub issuer_key_file: PathBuf,
}

impl TestPki {
    pub fn generate(dir: &Path) -> Self {
        let anchor = pki::generate_trust_anchor("cluster.local", Duration::from_secs(86400))
            .expect("trust anchor");
        let issuer = pki::generate_issuer(&anchor, "cluster.local", Duration::from_secs(43200))
            .expect("issuer");
        fs::create_dir_all(dir).expect("pki dir");
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            fs::write(&p, text).expect("write pki file");
            p
        };
        Self {
            anchors_file: write("ca-bundle.crt", &anchor.cert_pem),
            issuer_cert_file: write("issuer.crt", &issuer.cert_pem),
            issuer_key_file: write("issuer.key", &issuer.key_pem),
            anchor,
            issuer,
        }
    }

    pub fn signer(&self) -> Signer {
        Signer::load(
            &self.issuer.cert_pem,
            &self.issuer.key_pem,
            &self.anchor.cert_pem,
            "cluster.local",
        )
        .expect("signer")
    }

    /// A workload certificate for `id`, valid for `lifetime` from now: the
    /// certificate and its key, and the chain to send with it.
    pub fn leaf(
        &self,
        id: &nodemesh_core::identity::Identity,
        lifetime: Duration,
    ) -> (pki::CertAndKey, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let now = std::time::SystemTime::now();
        let issued = self
            .signer()
            .sign_identity(&key, id, now, now + lifetime)
            .expect("a workload certificate");
        Self::with_key(issued, &key)
    }

    /// A certificate of the identity service's tap client (10 minutes).
    pub fn tap_client(&self) -> (pki::CertAndKey, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let issued = self
            .signer()
            .sign_client(
                &key,
                &nodemesh_core::identity::tap_client_id("cluster.local"),
                Duration::from_secs(600),
            )
            .expect("the tap client's certificate");
        Self::with_key(issued, &key)
    }

    fn with_key(issued: pki::Issued, key: &rcgen::KeyPair) -> (pki::CertAndKey, String) {
        (
            pki::CertAndKey {
                cert_pem: issued.cert_pem,
                key_pem: key.serialize_pem(),
            },
            issued.chain_pem,
        )
    }
}

/// nodemesh installed in the API server (its manifests applied, with the
/// test's PKI), removed on drop.
pub struct Install<'c> {
    pub cluster: &'c Cluster,
    pub namespace: String,
    pub pki: TestPki,
    manifests: String,
    /// The documents of [`CLUSTER_SINGLETONS`], not applied.
    singletons: String,
}

/// The install's cluster-wide objects named without its namespace (the
/// aggregated API and the ClusterRoles to read it): one per cluster. The
/// test bed's installs (many at once on the shared API server) leave them
/// to the one test that applies them ([`AggregatedApi`]).
const CLUSTER_SINGLETONS: [&str; 3] = [
    "name: v1alpha1.tap.nodemesh.io",
    "name: nodemesh-viewer",
    "name: nodemesh-tapper",
];

fn is_singleton(doc: &str) -> bool {
    CLUSTER_SINGLETONS.iter().any(|n| doc.contains(n))
}

/// A manifest without [`CLUSTER_SINGLETONS`].
pub fn without_singletons(text: &str) -> String {
    nodemesh_cli::install::documents(text)
        .into_iter()
        .filter(|d| !is_singleton(d))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

impl<'c> Install<'c> {
    /// Installed with the test's PKI given (printed, as asked).
    pub fn apply(cluster: &'c Cluster, dir: &Path) -> Self {
        Self::apply_with(cluster, dir, true)
    }

    /// Installed with the test's PKI given, or (`give_pki` false) as a user
    /// does by default: none, the identity service makes it in the cluster
    /// (then `pki` is the test's, unused by the install).
    pub fn apply_with(cluster: &'c Cluster, dir: &Path, give_pki: bool) -> Self {
        let namespace = unique("nm-sys");
        let pki = TestPki::generate(&dir.join("pki"));
        let file = |p: &PathBuf| give_pki.then(|| p.clone());
        let args = nodemesh_cli::install::InstallArgs {
            namespace: namespace.clone(),
            image: "nodemesh.test/nodemesh:1".into(),
            identity_trust_anchors_file: file(&pki.anchors_file),
            identity_issuer_certificate_file: file(&pki.issuer_cert_file),
            identity_issuer_key_file: file(&pki.issuer_key_file),
            ..Default::default()
        };
        let all = nodemesh_cli::install::render(&args).expect("install manifests");
        let manifests = without_singletons(&all);
        let singletons: Vec<&str> = nodemesh_cli::install::documents(&all)
            .into_iter()
            .filter(|d| is_singleton(d))
            .collect();
        cluster
            .apply_manifests(&manifests, false)
            .unwrap_or_else(|e| panic!("apply the install: {e}"));
        Self {
            cluster,
            namespace,
            pki,
            manifests,
            singletons: singletons.join("\n---\n"),
        }
    }

    /// The identity service's DNS name (what agents check).
    pub fn server_name(&self) -> String {
        format!("nodemesh-identity.{}.svc", self.namespace)
    }
}

impl Drop for Install<'_> {
    fn drop(&mut self) {
        self.cluster.delete_manifests(&self.manifests);
    }
}

/// The install's aggregated API `tap.nodemesh.io` and its ClusterRoles,
/// applied; the API server reaching the identity service on its node
/// through a forward from its loopback (the test API server has no
/// Service network: the `nodemesh-identity` Service becomes an
/// ExternalName one for `127.0.0.1`, and the APIService names the
/// forward's port). Removed on drop.
pub struct AggregatedApi<'c> {
    cluster: &'c Cluster,
    manifests: String,
    _forward: crate::sys::ReverseForward,
}

impl<'c> AggregatedApi<'c> {
    pub fn apply(install: &Install<'c>, identity: &IdentityService, node: &Node) -> Self {
        let cluster = install.cluster;
        let forward = crate::sys::ReverseForward::start(&node.netns, identity.api);
        let manifests = install
            .singletons
            .replace("    port: 443", &format!("    port: {}", forward.port));
        cluster.delete_service(&install.namespace, "nodemesh-identity");
        cluster
            .apply_manifests(
                &format!(
                    "apiVersion: v1\nkind: Service\nmetadata:\n  name: nodemesh-identity\n  namespace: {}\nspec:\n  type: ExternalName\n  externalName: 127.0.0.1\n  ports:\n    - name: api\n      protocol: TCP\n      port: {}\n---\n{manifests}",
                    install.namespace, forward.port
                ),
                false,
            )
            .unwrap_or_else(|e| panic!("apply the aggregated API: {e}"));
        let api = Self {
            cluster,
            manifests,
            _forward: forward,
        };
        // Available once the API server's check of it passed.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = cluster.block_on(async {
                let req = http::Request::get(format!(
                    "/apis/{}/{}",
                    nodemesh_core::names::API_GROUP,
                    nodemesh_core::names::API_VERSION
                ))
                .body(Vec::new())
                .expect("request");
                cluster.client.request_text(req).await
            });
            match got {
                Ok(_) => break,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "the aggregated API is not available after 30s: {e}\nits status: {:#}\n{}",
                    cluster
                        .get_object(
                            "apiregistration.k8s.io/v1",
                            "APIService",
                            "",
                            "v1alpha1.tap.nodemesh.io"
                        )
                        .map(|o| o["status"].clone())
                        .unwrap_or_default(),
                    identity.log()
                ),
            }
            thread::sleep(Duration::from_millis(200));
        }
        api
    }
}

impl Drop for AggregatedApi<'_> {
    fn drop(&mut self) {
        self.cluster.delete_manifests(&self.manifests);
    }
}

/// `nodemesh identity`, run on a node with the installed service account.
pub struct IdentityService {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The aggregated API.
    pub api: SocketAddr,
    netns: PathBuf,
    pub log_path: PathBuf,
}

impl IdentityService {
    /// The service with the test's PKI files.
    pub fn start(node: &Node, install: &Install, cert_lifetime: &str) -> Self {
        let files = [
            ("--issuer-certificate-file", &install.pki.issuer_cert_file),
            ("--issuer-key-file", &install.pki.issuer_key_file),
            ("--trust-anchors-file", &install.pki.anchors_file),
        ];
        let args: Vec<std::ffi::OsString> = files
            .iter()
            .flat_map(|(flag, path)| [flag.into(), path.as_os_str().to_owned()])
            .collect();
        Self::start_with(node, install, cert_lifetime, &args)
    }

    /// The service as installed: its issuer from the cluster (made there if
    /// missing), the aggregated API's caBundle kept.
    pub fn start_from_cluster(node: &Node, install: &Install, cert_lifetime: &str) -> Self {
        let args: Vec<std::ffi::OsString> = [
            "--issuer-secret",
            "nodemesh-identity-issuer",
            "--trust-anchors-configmap",
            "nodemesh-identity-trust-anchors",
        ]
        .iter()
        .map(Into::into)
        .collect();
        Self::start_with(node, install, cert_lifetime, &args)
    }

    fn start_with(
        node: &Node,
        install: &Install,
        cert_lifetime: &str,
        issuer: &[std::ffi::OsString],
    ) -> Self {
        let cluster = install.cluster;
        node.reach_host_loopback(cluster.port);
        let kubeconfig = node.dir.join("identity.kubeconfig");
        cluster.kubeconfig_with_token(
            &kubeconfig,
            &cluster.token(&install.namespace, "nodemesh-identity"),
        );
        let cgroup = node.cgroup.join("nodemesh-identity");
        fs::create_dir_all(&cgroup).expect("identity cgroup");
        let log_path = node.dir.join("identity.log");
        let log = File::create(&log_path).expect("identity log");
        let addr = SocketAddr::from((node.ip, IDENTITY_PORT));
        let admin = SocketAddr::from((node.ip, IDENTITY_ADMIN_PORT));
        let api = SocketAddr::from((node.ip, API_PORT));
        let mut cmd = Command::new(self_exe());
        cmd.arg(crate::agent::ROLE)
            .args(["--log-level", "info", "identity"])
            .arg("--addr")
            .arg(addr.to_string())
            .arg("--admin-addr")
            .arg(admin.to_string())
            .args(issuer)
            .arg("--cert-lifetime")
            .arg(cert_lifetime)
            .arg("--agent-service-account")
            .arg(format!("{}/nodemesh-agent", install.namespace))
            .arg("--server-name")
            .arg(install.server_name())
            .arg("--api-addr")
            .arg(api.to_string())
            .arg("--service-account")
            .arg(format!("{}/nodemesh-identity", install.namespace))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = spawn_in(cmd, &node.netns, &cgroup);
        let mut service = Self {
            child: Some(child),
            addr,
            admin,
            api,
            netns: node.netns.clone(),
            log_path,
        };
        service.wait_ready();
        service
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("identity service exited ({status}):\n{}", self.log());
            }
            if let Ok((200, _)) = http_get(&self.netns, self.admin, "/ready") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "identity service not ready after 30s:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> Metrics {
        match http_get(&self.netns, self.admin, "/metrics") {
            Ok((200, body)) => Metrics::parse(&body),
            other => panic!("identity GET /metrics: {other:?}"),
        }
    }

    pub fn log(&self) -> String {
        read_or_empty(&self.log_path)
    }
}

impl Drop for IdentityService {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("---- identity service log ----\n{}\n----", self.log());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The agent's pod object on `node` and a token bound to it (audience
/// `identity.nodemesh.io`), written where the agent reads it. Returns the
/// token file.
pub fn agent_identity_token(install: &Install, node: &Node) -> PathBuf {
    let name = format!("nodemesh-agent-{}", node.name);
    let uid = install
        .cluster
        .agent_pod(&install.namespace, &name, node, "nodemesh-agent");
    let token = install.cluster.bound_token(
        &install.namespace,
        "nodemesh-agent",
        Some((&name, &uid)),
        nodemesh_core::identity::TOKEN_AUDIENCE,
    );
    let path = identity_token_file(node);
    fs::write(&path, token).expect("write token");
    path
}

/// Where [`agent_identity_token`] writes the node agent's token.
pub fn identity_token_file(node: &Node) -> PathBuf {
    node.dir.join("identity-token")
}

/// Agent options for a meshed node: Kubernetes discovery, identity from
/// `identity`, the tunnel on the node's address.
pub fn mesh_agent_options(
    install: &Install,
    identity: &IdentityService,
    node: &Node,
) -> AgentOptions {
    let token = agent_identity_token(install, node);
    agent_options_with_token(install, identity, node, &token)
}

fn agent_options_with_token(
    install: &Install,
    identity: &IdentityService,
    node: &Node,
    token: &Path,
) -> AgentOptions {
    AgentOptions::default()
        .kube(install.cluster)
        .arg("--identity-addr")
        .arg(&identity.addr.to_string())
        .arg("--identity-server-name")
        .arg(&install.server_name())
        .arg("--identity-trust-anchors-file")
        .arg(&install.pki.anchors_file.to_string_lossy())
        .arg("--identity-token-file")
        .arg(&token.to_string_lossy())
        .arg("--tunnel-addr")
        .arg(&format!(
            "{},{}",
            SocketAddr::from((node.ip, TUNNEL_PORT)),
            SocketAddr::from((node.ip6, TUNNEL_PORT))
        ))
        .arg("--agent-identity")
        .arg(&format!("{}/nodemesh-agent", install.namespace))
        // The test API server's --service-cluster-ip-range.
        .arg("--service-cidr")
        .arg(crate::kube::SERVICE_RANGE)
}

/// Starts a meshed agent on `node` and waits for it to be ready.
pub fn mesh_agent(install: &Install, identity: &IdentityService, node: &Node) -> Agent {
    Agent::start_ready(node, mesh_agent_options(install, identity, node))
}

/// Starts the next meshed agent on `node` (after one stopped), with the
/// same agent pod and token.
pub fn next_mesh_agent(install: &Install, identity: &IdentityService, node: &Node) -> Agent {
    Agent::start_ready(
        node,
        agent_options_with_token(install, identity, node, &identity_token_file(node)),
    )
}

/// Two nodes on a link, nodemesh installed, the identity service on node
/// `a`, a meshed agent on each, and a meshed namespace for the apps.
pub struct MeshBed {
    pub agent_a: Agent,
    pub agent_b: Agent,
    pub identity: IdentityService,
    pub link: Link,
    pub a: Node,
    pub b: Node,
    pub install: Install<'static>,
    pub cluster: &'static Cluster,
    pub ns: String,
    _nodes: [crate::kube::NodeObject<'static>; 2],
}

impl MeshBed {
    pub fn new(cert_lifetime: &str) -> MeshBed {
        Self::with_nodes(Node::new(), Node::new(), cert_lifetime)
    }

    /// The same with the given nodes (e.g. one reporting IPv6 first).
    pub fn with_nodes(a: Node, b: Node, cert_lifetime: &str) -> MeshBed {
        Self::with_agent_args(a, b, cert_lifetime, &[])
    }

    /// The same, with more flags for both agents.
    pub fn with_agent_args(a: Node, b: Node, cert_lifetime: &str, args: &[&str]) -> MeshBed {
        Self::with_agent(a, b, cert_lifetime, args, None)
    }

    /// The same, the agents run from `binary` (a release build) when given.
    pub fn with_agent(
        a: Node,
        b: Node,
        cert_lifetime: &str,
        args: &[&str],
        binary: Option<&std::path::Path>,
    ) -> MeshBed {
        Self::with_agent_cgroups(a, b, cert_lifetime, args, binary, [None, None])
    }

    /// The same, each agent started in a memory cgroup too (node a's,
    /// node b's) when given (see [`crate::sys::MemoryCgroup`]).
    pub fn with_agent_cgroups(
        a: Node,
        b: Node,
        cert_lifetime: &str,
        args: &[&str],
        binary: Option<&std::path::Path>,
        memory: [Option<std::path::PathBuf>; 2],
    ) -> MeshBed {
        let cluster = Cluster::shared();
        let link = Link::connect(&[&a, &b]);
        let install = Install::apply(cluster, &a.dir);
        let identity = IdentityService::start(&a, &install, cert_lifetime);
        let start = |node: &Node, memory: &Option<std::path::PathBuf>| {
            let mut opts = args
                .iter()
                .fold(mesh_agent_options(&install, &identity, node), |o, a| {
                    o.arg(a)
                });
            if let Some(b) = binary {
                opts.binary = Some(b.to_owned());
            }
            opts.memory_cgroup = memory.clone();
            Agent::start_ready(node, opts)
        };
        let nodes = [cluster.node_object(&a), cluster.node_object(&b)];
        let agent_a = start(&a, &memory[0]);
        let agent_b = start(&b, &memory[1]);
        let ns = unique("mesh");
        cluster.namespace(&ns, &[(nodemesh_core::names::MESH_LABEL, "enabled")]);
        MeshBed {
            _nodes: nodes,
            agent_a,
            agent_b,
            identity,
            link,
            a,
            b,
            install,
            cluster,
            ns,
        }
    }

    /// A running pod of Deployment `app` in the meshed namespace, named
    /// `<app>-<hash>-<suffix>` (owned by ReplicaSet `<app>-<hash>`, with the
    /// `pod-template-hash` label), of service account `app`.
    pub fn deployment(&self, node: &Node, app: &str, pod: &str) -> Arc<Pod> {
        let hash = pod.rsplit('-').nth(1).expect("<app>-<hash>-<suffix>");
        self.cluster.run_pod(
            node,
            PodSpec::new(&self.ns, pod)
                .service_account(app)
                .label("pod-template-hash", hash)
                .owner("ReplicaSet", &format!("{app}-{hash}")),
        )
    }

    /// A running pod in the meshed namespace.
    pub fn pod(&self, node: &Node, name: &str, sa: &str) -> Arc<Pod> {
        self.cluster
            .run_pod(node, PodSpec::new(&self.ns, name).service_account(sa))
    }
}
