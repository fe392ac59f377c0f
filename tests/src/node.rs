//! Nodes and pods out of network namespaces, veth pairs and cgroups.
//!
//! Longer than 500 lines on purpose: a node and its pods share their
//! set-up and clean-up (the leftover sweep), kept side by side.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicU32, Ordering},
    },
};

use serde::Serialize;

use crate::{
    apps::{grpc::GrpcApp, http::HttpApp, tcp::TcpApp},
    sys::{self, cgroup2_mount, ip, ip_quiet, pid_alive, remove_cgroup_tree},
};

/// Every name the test bed creates starts with this, then the pid.
const PREFIX: &str = "nmt";
/// Where the agent listens for /metrics inside a node.
pub const ADMIN_PORT: u16 = 4191;

static NODES: AtomicU32 = AtomicU32::new(0);
static PODS: AtomicU32 = AtomicU32::new(0);

/// kubelet's cgroup driver: how it names pod cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`
    Systemd,
    /// `kubepods/<qos>/pod<uid>`
    Cgroupfs,
}

/// A pod's QoS class (where kubelet puts its cgroup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// What to create a pod with.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// The API's UID (else one is made up).
    pub uid: Option<String>,
    /// The controller owning it in the API: (kind, name).
    pub owner: Option<(String, String)>,
    pub qos: Qos,
    pub driver: CgroupDriver,
    pub annotations: BTreeMap<String, String>,
    /// A TCP readiness probe on this port (what kubelet dials from the
    /// node).
    pub probe_port: Option<u16>,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service_account: "default".into(),
            labels: BTreeMap::new(),
            uid: None,
            owner: None,
            qos: Qos::BestEffort,
            driver: CgroupDriver::Systemd,
            annotations: BTreeMap::new(),
            probe_port: None,
        }
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn tcp_probe(mut self, port: u16) -> Self {
        self.probe_port = Some(port);
        self
    }

    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.into();
        self
    }

    pub fn owner(mut self, kind: &str, name: &str) -> Self {
        self.owner = Some((kind.into(), name.into()));
        self
    }

    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }

    pub fn driver(mut self, driver: CgroupDriver) -> Self {
        self.driver = driver;
        self
    }

    /// With `nodemesh.io/mesh=enabled`.
    pub fn meshed(self) -> Self {
        self.label(nodemesh_core::names::MESH_LABEL, "enabled")
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// A simulated pod: its own netns and cgroup on a [`Node`].
#[derive(Debug)]
pub struct Pod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub ip: Ipv4Addr,
    /// Every pod is dual-stack: its IPv6 address.
    pub ip6: Ipv6Addr,
    /// Its node reports IPv6 first (`status.podIP`, `status.hostIP`).
    pub ipv6_primary: bool,
    /// `/run/netns/<name>`.
    pub netns: PathBuf,
    /// The pod cgroup relative to the node's cgroup root (kubelet layout).
    pub cgroup_rel: PathBuf,
    /// The pod cgroup's absolute path.
    pub cgroup: PathBuf,
    pub qos: Qos,
    labels: Mutex<BTreeMap<String, String>>,
    containers: AtomicU32,
    sandbox: Mutex<Option<TcpApp>>,
}

impl Pod {
    /// A new container cgroup below the pod's, the way the runtime names
    /// them.
    fn container_cgroup(&self) -> PathBuf {
        let n = self.containers.fetch_add(1, Ordering::Relaxed);
        let dir = self.cgroup.join(format!("cri-containerd-{n:04}.scope"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        dir
    }

    /// Starts a TCP container: a long-lived process in the pod's netns and
    /// in a container cgroup, driven over stdin/stdout.
    pub fn tcp(&self) -> TcpApp {
        TcpApp::start(&self.netns, &self.container_cgroup(), &self.key())
    }

    /// Starts an HTTP container.
    pub fn http(&self) -> HttpApp {
        HttpApp::start(&self.netns, &self.container_cgroup(), &self.key())
    }

    /// Starts a gRPC container.
    pub fn grpc(&self) -> GrpcApp {
        GrpcApp::start(&self.netns, &self.container_cgroup(), &self.key())
    }

    /// Runs `cmd` as a container of this pod (its netns, a container
    /// cgroup): a real client or server (iperf3, …). Killed by the pod's
    /// clean-up if still running.
    pub fn spawn(&self, cmd: std::process::Command) -> std::process::Child {
        crate::sys::spawn_in(cmd, &self.netns, &self.container_cgroup())
    }

    /// How many TCP sockets of the pod's netns are in `state` (`ss`'s
    /// names: `time-wait`, `established`), matching `ss`'s `filter`
    /// (e.g. `dport = :8080`) when one is given.
    pub fn tcp_sockets(&self, state: &str, filter: Option<&str>) -> usize {
        let mut cmd = std::process::Command::new("ss");
        cmd.args(["-Htan", "state", state]);
        if let Some(filter) = filter {
            cmd.arg(format!("( {filter} )"));
        }
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let out = self.spawn(cmd).wait_with_output().expect("run ss");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// Starts the pod's sandbox (kubelet's pause container): an idle
    /// process that holds the pod's netns and cgroup.
    pub fn start_sandbox(&self) {
        let mut sandbox = self.sandbox.lock().unwrap();
        if sandbox.is_none() {
            *sandbox = Some(self.tcp());
        }
    }

    /// `status.qosClass`.
    pub fn qos_class(&self) -> &'static str {
        match self.qos {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }

    pub fn set_label(&self, key: &str, value: Option<&str>) {
        let mut labels = self.labels.lock().unwrap();
        match value {
            Some(v) => labels.insert(key.into(), v.into()),
            None => labels.remove(key),
        };
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        self.labels.lock().unwrap().clone()
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its addresses, the primary first.
    pub fn ips(&self) -> [IpAddr; 2] {
        if self.ipv6_primary {
            [self.ip6.into(), self.ip.into()]
        } else {
            [self.ip.into(), self.ip6.into()]
        }
    }

    /// Its entry in the agent's pod file.
    pub fn entry(&self) -> PodEntry {
        let [primary, other] = self.ips();
        PodEntry {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            ip: Some(primary.to_string()),
            ips: vec![other.to_string()],
            service_account: self.service_account.clone(),
            labels: self.labels(),
            cgroup: self.cgroup_rel.clone(),
            netns: Some(self.netns.clone()),
        }
    }
}

/// One entry of the pod file, as the agent reads it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEntry {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub cgroup: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

#[derive(Serialize)]
struct PodFile<'a> {
    pods: &'a [PodEntry],
}

/// Host `host` of the IPv6 pod subnet numbered `subnet` (`fd00:a:<subnet>::/64`,
/// the twin of `10.<subnet>.0.0/24`).
fn v6(subnet: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xa, u16::from(subnet), 0, 0, 0, 0, host)
}

/// Where kubelet puts a pod's cgroup (relative to its cgroup root), as
/// kubelet names it: written out here, independently of the agent's lookup.
fn kubelet_cgroup(uid: &str, qos: Qos, driver: CgroupDriver) -> PathBuf {
    let escaped = uid.replace('-', "_");
    PathBuf::from(match (driver, qos) {
        (CgroupDriver::Systemd, Qos::Guaranteed) => {
            format!("kubepods.slice/kubepods-pod{escaped}.slice")
        }
        (CgroupDriver::Systemd, Qos::Burstable) => {
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice")
        }
        (CgroupDriver::Systemd, Qos::BestEffort) => format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice"
        ),
        (CgroupDriver::Cgroupfs, Qos::Guaranteed) => format!("kubepods/pod{uid}"),
        (CgroupDriver::Cgroupfs, Qos::Burstable) => format!("kubepods/burstable/pod{uid}"),
        (CgroupDriver::Cgroupfs, Qos::BestEffort) => format!("kubepods/besteffort/pod{uid}"),
    })
}

/// A simulated node: a netns with a bridge its pods hang off, a cgroup
/// root, a bpffs pin directory and a scratch directory.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    /// `/run/netns/<name>`.
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    /// The node's IPv6 address (every node is dual-stack).
    pub ip6: Ipv6Addr,
    /// It reports IPv6 first: its pods' `status.hostIP` and `podIP` are
    /// IPv6 (as on an IPv6-primary dual-stack cluster).
    pub ipv6_primary: bool,
    /// The node's cgroup root (what the agent gets as --cgroup-root).
    pub cgroup: PathBuf,
    /// The agent's --bpffs.
    pub pins: PathBuf,
    /// Scratch: pod file, agent logs.
    pub dir: PathBuf,
    subnet: u8,
    next_host: AtomicU32,
    pod_netns: Mutex<Vec<String>>,
    forwards: Mutex<Vec<crate::sys::Forward>>,
}

impl Node {
    /// Creates a node; the first one in a process clears leftovers of
    /// crashed earlier runs.
    #[expect(
        clippy::new_without_default,
        reason = "a node creates namespaces and cgroups: not a default value"
    )]
    pub fn new() -> Self {
        Self::create(false)
    }

    /// A node whose pods report IPv6 first (`status.hostIP` and `podIP`).
    pub fn ipv6_primary() -> Self {
        Self::create(true)
    }

    fn create(ipv6_primary: bool) -> Self {
        sweep_once();
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the test bed needs root (netns, cgroups, BPF)"
        );
        let k = NODES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{k}", std::process::id());
        let subnet = (k % 200 + 20) as u8;
        let node_ip = Ipv4Addr::new(10, subnet, 0, 1);
        let node_ip6 = v6(subnet, 1);
        let node = Self {
            netns: PathBuf::from("/run/netns").join(&name),
            cgroup: cgroup2_mount().join(&name),
            pins: PathBuf::from("/sys/fs/bpf").join(&name),
            dir: std::env::temp_dir().join(&name),
            name,
            ip: node_ip,
            ip6: node_ip6,
            ipv6_primary,
            subnet,
            next_host: AtomicU32::new(2),
            pod_netns: Mutex::default(),
            forwards: Mutex::default(),
        };
        // From here on, Drop cleans up whatever was made.
        ip(&["netns", "add", &node.name]);
        ip(&["-n", &node.name, "link", "set", "lo", "up"]);
        ip(&["-n", &node.name, "link", "add", "nm0", "type", "bridge"]);
        ip(&[
            "-n",
            &node.name,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            "nm0",
        ]);
        ip(&[
            "-n",
            &node.name,
            "addr",
            "add",
            &format!("{node_ip6}/64"),
            "dev",
            "nm0",
            "nodad",
        ]);
        ip(&["-n", &node.name, "link", "set", "nm0", "up"]);
        fs::create_dir_all(&node.cgroup).expect("create node cgroup");
        fs::create_dir_all(&node.dir).expect("create node scratch dir");
        node
    }

    /// Creates a pod: netns, veth to the bridge, address, default route,
    /// and a kubelet-style cgroup (systemd driver, BestEffort QoS).
    pub fn pod(&self, spec: PodSpec) -> Arc<Pod> {
        let n = PODS.fetch_add(1, Ordering::Relaxed);
        let host = self.next_host.fetch_add(1, Ordering::Relaxed);
        assert!(host < 250, "too many pods on one node");
        let uid = spec.uid.clone().unwrap_or_else(|| {
            format!(
                "7e57{:04x}-0000-4000-8000-{:012x}",
                std::process::id() & 0xffff,
                n
            )
        });
        let netns_name = format!("{}-p{n}", self.name);
        self.pod_netns.lock().unwrap().push(netns_name.clone());
        let ip_addr = Ipv4Addr::new(10, self.subnet, 0, host as u8);
        let veth = format!("p{n}");
        ip(&["netns", "add", &netns_name]);
        ip(&["-n", &netns_name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &self.name,
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns_name,
        ]);
        ip(&[
            "-n", &self.name, "link", "set", &veth, "master", "nm0", "up",
        ]);
        ip(&[
            "-n",
            &netns_name,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ]);
        let ip6_addr = v6(self.subnet, host as u16);
        ip(&[
            "-n",
            &netns_name,
            "addr",
            "add",
            &format!("{ip6_addr}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", &netns_name, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &netns_name,
            "route",
            "add",
            "default",
            "via",
            &self.ip.to_string(),
        ]);
        ip(&[
            "-n",
            &netns_name,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.ip6.to_string(),
        ]);
        let cgroup_rel = kubelet_cgroup(&uid, spec.qos, spec.driver);
        let cgroup = self.cgroup.join(&cgroup_rel);
        fs::create_dir_all(&cgroup).expect("create pod cgroup");
        Arc::new(Pod {
            uid,
            namespace: spec.namespace,
            name: spec.name,
            service_account: spec.service_account,
            ip: ip_addr,
            ip6: ip6_addr,
            ipv6_primary: self.ipv6_primary,
            netns: PathBuf::from("/run/netns").join(netns_name),
            cgroup_rel,
            cgroup,
            qos: spec.qos,
            labels: Mutex::new(spec.labels),
            containers: AtomicU32::new(0),
            sandbox: Mutex::new(None),
        })
    }

    /// The pod file the agent watches.
    pub fn pod_file(&self) -> PathBuf {
        self.dir.join("pods.yaml")
    }

    /// Writes the pod file (atomically) from the pods' current state.
    pub fn write_pods(&self, pods: &[&Pod]) {
        let entries: Vec<PodEntry> = pods.iter().map(|p| p.entry()).collect();
        self.write_pod_entries(&entries);
    }

    pub fn write_pod_entries(&self, entries: &[PodEntry]) {
        let text = serde_norway::to_string(&PodFile { pods: entries }).expect("serialize pods");
        self.write_pod_file_raw(&text);
    }

    /// Writes arbitrary text as the pod file (atomically).
    pub fn write_pod_file_raw(&self, text: &str) {
        let tmp = self.dir.join("pods.yaml.tmp");
        fs::write(&tmp, text).expect("write pod file");
        fs::rename(&tmp, self.pod_file()).expect("rename pod file");
    }

    /// Makes the host's `127.0.0.1:port` reachable as `127.0.0.1:port` from
    /// inside the node (as a hostNetwork agent reaches the API server): a
    /// forwarder between the two loopbacks, stopped when the node drops.
    pub fn reach_host_loopback(&self, port: u16) {
        let mut forwards = self.forwards.lock().unwrap();
        if !forwards.iter().any(|f| f.port == port) {
            forwards.push(crate::sys::Forward::start(&self.netns, port));
        }
    }

    /// Cuts (or restores) the node's way to the host's `127.0.0.1:port`.
    pub fn partition_from_host(&self, port: u16, cut: bool) {
        for f in self
            .forwards
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.port == port)
        {
            f.set_blocked(cut);
        }
    }

    /// The agent's admin address on this node.
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, ADMIN_PORT))
    }

    /// The node's pod subnet (its address is in it too), CIDR.
    pub fn pod_subnet(&self) -> String {
        format!("10.{}.0.0/24", self.subnet)
    }

    /// The same for IPv6.
    pub fn pod_subnet6(&self) -> String {
        format!("{}/64", v6(self.subnet, 0))
    }

    /// Its primary address (what its pods' `status.hostIP` says).
    pub fn host_ip(&self) -> IpAddr {
        if self.ipv6_primary {
            self.ip6.into()
        } else {
            self.ip.into()
        }
    }

    /// A process in this node's own netns but in the cgroup kubelet makes
    /// for pod `uid` (BestEffort, systemd layout): a host-network pod's
    /// container.
    pub fn host_network_container(&self, uid: &str) -> crate::TcpApp {
        let slice = uid.replace('-', "_");
        let cgroup = self.cgroup.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{slice}.slice/cri-containerd-0.scope"
        ));
        self.process_in(&cgroup, &format!("host-network/{uid}"))
    }

    /// A process of the node itself, no pod's (its netns, a cgroup of its
    /// own): a host daemon. Killed with the guard; its cgroup goes with
    /// the node's.
    pub fn host_process(&self, name: &str) -> crate::TcpApp {
        self.process_in(&self.cgroup.join(format!("host-{name}")), name)
    }

    fn process_in(&self, cgroup: &std::path::Path, name: &str) -> crate::TcpApp {
        fs::create_dir_all(cgroup).unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
        crate::TcpApp::start(&self.netns, cgroup, name)
    }

    /// An address in this node's pod subnet where nothing lives.
    pub fn unused_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, 0, 254)
    }

    /// Pinned `connect4` links, by pod uid.
    pub fn pinned_pod_links(&self) -> Vec<String> {
        let dir = self
            .pins
            .join(format!("v{}", nodemesh_common::LAYOUT_VERSION))
            .join("links/pods");
        let mut uids: Vec<String> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        uids.sort();
        uids
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Processes first (agent and containers), then what they used.
        remove_cgroup_tree(&self.cgroup);
        self.forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for ns in self
            .pod_netns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            ip_quiet(&["netns", "del", &ns]);
        }
        ip_quiet(&["netns", "del", &self.name]);
        let _ = fs::remove_dir_all(&self.pins);
        if std::env::var_os("NODEMESH_TEST_KEEP_LOGS").is_some() {
            eprintln!(
                "test bed: kept {} (NODEMESH_TEST_KEEP_LOGS)",
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Clears leftovers once per process, before the test bed creates anything
/// (so objects named after this very process are stale too: pid reuse).
pub(crate) fn sweep_once() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(sweep_leftovers);
}

/// Removes what runs of the test bed left behind when they crashed: every
/// object named after a process that no longer exists.
fn sweep_leftovers() {
    let stale = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return false;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        match pid.parse::<u32>() {
            Ok(pid) => pid == std::process::id() || !pid_alive(pid),
            Err(_) => false,
        }
    };
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| stale(n))
            .collect()
    };
    let mut removed = 0;
    // Real nodes first: their containers, v1 cgroups and /var/lib/cni.
    for name in names(&std::env::temp_dir()) {
        if name.ends_with("-node") {
            crate::realnode::RealNode::remove(&name);
            removed += 1;
        }
    }
    for name in names(cgroup2_mount()) {
        remove_cgroup_tree(&cgroup2_mount().join(name));
        removed += 1;
    }
    for name in names(Path::new("/run/netns")) {
        ip_quiet(&["netns", "del", &name]);
        removed += 1;
    }
    for name in names(Path::new("/sys/fs/bpf")) {
        let _ = fs::remove_dir_all(Path::new("/sys/fs/bpf").join(name));
        removed += 1;
    }
    for name in names(&std::env::temp_dir()) {
        let dir = std::env::temp_dir().join(name);
        unmount_below(&dir);
        let _ = fs::remove_dir_all(dir);
        removed += 1;
    }
    if removed > 0 {
        eprintln!("test bed: removed {removed} leftovers of earlier runs");
    }
}

/// Lazily unmounts whatever a crashed test mounted below `dir`, deepest
/// first, so removing `dir` never reaches into another file system.
fn unmount_below(dir: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&point)
            .status();
    }
}

/// Removes a pod's netns by hand (to test a pod whose netns disappeared).
pub fn delete_netns(path: &Path) {
    if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
        sys::ip_quiet(&["netns", "del", name]);
    }
}
