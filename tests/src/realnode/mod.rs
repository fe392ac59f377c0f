//! A real Kubernetes node on this machine: etcd, kube-apiserver,
//! controller-manager, scheduler, kube-proxy, containerd (runc, bridge CNI)
//! and the kubelet, v1.20.2, running real images (`cargo xtask image`).
//!
//! Everything lives in namespaces and directories this module makes, so it
//! leaves the host as it was:
//! - one **network namespace** (`/run/netns/<name>`) is the node: every
//!   daemon, the CNI bridge, the iptables rules of kube-proxy and the
//!   kubelet, and host-network pods live there; a veth joins it to the host
//!   (the host end only serves the test's API client). The API server
//!   listens on the node's address, which the `kubernetes` Service can
//!   publish (a 127.0.0.1 server cannot publish its own endpoint);
//! - one **mount namespace** (held by a `sleep` process) gets private
//!   `/run`, `/var/log` and `/var/lib/cni`: netns files, shim sockets,
//!   container logs and CNI caches vanish with it;
//! - **cgroups**: the kubelet's cgroup root `/<name>` in every hierarchy
//!   (v1 controllers and v2), the daemons in `<cgroup2>/<name>-sys`;
//! - **files** in `<tmp>/<name>` (containerd's root and state, the
//!   kubelet's root, logs, certificates).
//!
//! [`RealNode::remove`] undoes all of it by name: on drop, for `nodemesh-node
//! down`, and for what a crashed run left.
pub mod files;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node as K8sNode;
use kube::Api;

use crate::{
    Cluster,
    kube::kube_bin_dir,
    sys::{cgroup2_mount, ip, ip_quiet, remove_cgroup_tree, spawn_in_cgroup, spawn_kept},
};

/// The version every image is tagged with (the workspace's).
pub const IMAGE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The sandbox image `cargo xtask image` makes.
pub fn pause_image() -> String {
    format!("nodemesh.test/pause:{IMAGE_VERSION}")
}

/// The test apps' image.
pub fn testapp_image() -> String {
    format!("nodemesh.test/testapp:{IMAGE_VERSION}")
}

/// The nodemesh image (`nodemesh install`'s default).
pub fn nodemesh_image() -> String {
    format!("ghcr.io/nodemesh/nodemesh:{IMAGE_VERSION}")
}

/// Where the installed agent pins (the install's `NODEMESH_BPFFS`).
pub const AGENT_PINS: &str = "/sys/fs/bpf/nodemesh";

/// How to make a node.
#[derive(Clone, Debug)]
pub struct RealNodeOptions {
    /// Names the node, its netns, cgroups and directory.
    pub name: String,
    /// Host end of the veth (at most 15 characters).
    pub veth: String,
    /// The node's address is `10.250.<subnet>.2`, the host end's `.1`.
    pub subnet: u8,
    /// The image archives to import (`cargo xtask image`).
    pub images: Vec<PathBuf>,
    /// The sandbox ("pause") image's reference.
    pub pause_image: String,
    /// Keep running after this process ends (`nodemesh-node up`); else its
    /// processes die with this one and drop removes everything.
    pub detached: bool,
}

impl RealNodeOptions {
    /// A node for this test run, named after the process (the leftover
    /// sweep knows such names).
    pub fn for_tests(images: Vec<PathBuf>, pause_image: &str) -> Self {
        let pid = std::process::id();
        Self {
            name: format!("nmt{pid}-node"),
            veth: format!("nmr{}", pid % 1_000_000),
            subnet: (pid % 200) as u8 + 20,
            images,
            pause_image: pause_image.to_owned(),
            detached: false,
        }
    }
}

/// A running node (see the module documentation).
pub struct RealNode {
    pub name: String,
    pub dir: PathBuf,
    pub netns: PathBuf,
    /// The node's address (its InternalIP, the API server's address).
    pub ip: Ipv4Addr,
    /// The kubelet's cgroup root in the v2 hierarchy: what the agent's
    /// `--host-cgroup-root` is on this hybrid host.
    pub cgroup_v2: PathBuf,
    /// The API server, as the tests reach it (admin token).
    pub cluster: Cluster,
    holder: u32,
    detached: bool,
    children: Mutex<Vec<(String, Child)>>,
}

impl std::fmt::Debug for RealNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealNode")
            .field("name", &self.name)
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

/// Every cgroup hierarchy mounted on this host (v1 controllers and v2).
fn hierarchies() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mountpoint = left.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mountpoint))
        })
        .collect()
}

fn step(what: &str, t0: Instant) {
    eprintln!("real node: {what} ({:.1}s)", t0.elapsed().as_secs_f64());
}

impl RealNode {
    /// Starts the node and waits until it is Ready with the images
    /// imported. Prints each step (it takes about half a minute).
    pub fn start(opts: RealNodeOptions) -> RealNode {
        let t0 = Instant::now();
        crate::node::sweep_once();
        for bin in [
            "kube-apiserver",
            "kubelet",
            "kube-controller-manager",
            "kube-scheduler",
            "kube-proxy",
        ] {
            assert!(
                kube_bin_dir().join(bin).exists(),
                "{bin} is missing: run `cargo xtask setup`"
            );
        }
        for bin in [
            "/usr/bin/containerd",
            "/usr/sbin/runc",
            "/usr/lib/cni/bridge",
        ] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: run `cargo xtask setup`"
            );
        }
        for image in &opts.images {
            assert!(
                image.exists(),
                "{} is missing: run `cargo xtask image`",
                image.display()
            );
        }
        // Whatever an earlier node of this name left.
        Self::remove(&opts.name);
        let dir = std::env::temp_dir().join(&opts.name);
        for sub in [
            "pki",
            "log",
            "cni",
            "cni-ipam",
            "kubelet",
            "containerd",
            "client",
        ] {
            fs::create_dir_all(dir.join(sub)).expect("node dir");
        }
        fs::write(dir.join("resolv.conf"), "").expect("resolv.conf");
        let netns = PathBuf::from("/run/netns").join(&opts.name);
        let host_ip = Ipv4Addr::new(10, 250, opts.subnet, 1);
        let node_ip = Ipv4Addr::new(10, 250, opts.subnet, 2);

        // The node's network namespace, joined to the host by a veth.
        ip(&["netns", "add", &opts.name]);
        ip(&["-n", &opts.name, "link", "set", "lo", "up"]);
        ip(&[
            "link", "add", &opts.veth, "type", "veth", "peer", "name", "eth0", "netns", &opts.name,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &opts.veth]);
        ip(&["link", "set", &opts.veth, "up"]);
        ip(&[
            "-n",
            &opts.name,
            "addr",
            "add",
            &format!("{node_ip}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &opts.name, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &opts.name,
            "route",
            "add",
            "default",
            "via",
            &host_ip.to_string(),
        ]);

        // cgroups: the daemons', and the kubelet's root in every hierarchy.
        let sys_cgroup = cgroup2_mount().join(format!("{}-sys", opts.name));
        fs::create_dir_all(&sys_cgroup).expect("daemons cgroup");
        for h in hierarchies() {
            let root = h.join(&opts.name);
            fs::create_dir_all(&root).expect("kubelet cgroup root");
            if h.ends_with("cpuset") {
                // A new cpuset has no CPUs or memory nodes until given.
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = fs::read_to_string(h.join(f)).unwrap_or_default();
                    let _ = fs::write(root.join(f), v.trim());
                }
            }
        }
        if !Path::new("/var/lib/cni").exists() {
            fs::create_dir_all("/var/lib/cni").expect("/var/lib/cni");
            fs::write(dir.join("created-var-lib-cni"), "").expect("marker");
        }

        let pki = dir.join("pki");
        files::pki(&pki, &opts.name, node_ip);
        let server = format!("https://{node_ip}:{}", files::API_PORT);
        for (file, token) in [
            ("admin.kubeconfig", files::ADMIN_TOKEN),
            ("kubelet.kubeconfig", files::NODE_TOKEN),
        ] {
            files::kubeconfig(&dir.join(file), &server, &pki.join("ca.crt"), token);
        }
        let mut node = RealNode {
            name: opts.name.clone(),
            netns: netns.clone(),
            ip: node_ip,
            cgroup_v2: cgroup2_mount().join(&opts.name),
            cluster: Cluster::external(
                dir.join("client"),
                dir.join("admin.kubeconfig"),
                files::API_PORT,
            ),
            dir: dir.clone(),
            holder: 0,
            detached: opts.detached,
            children: Mutex::new(Vec::new()),
        };
        // From here on, drop removes whatever was made.
        node.holder = node.start_holder(&sys_cgroup);
        step("namespaces and cgroups made", t0);

        let p = |f: &str| pki.join(f).display().to_string();
        let bin = |b: &str| kube_bin_dir().join(b).display().to_string();
        let d = |f: &str| dir.join(f).display().to_string();

        node.spawn(
            "etcd",
            &sys_cgroup,
            &[
                "/usr/bin/etcd",
                "--name=node",
                "--log-level=warn",
                &format!("--data-dir={}", d("etcd")),
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=node=http://127.0.0.1:2380",
            ],
            &[],
        );
        let front_proxy = crate::kube::front_proxy_flags(&pki);
        node.spawn(
            "kube-apiserver",
            &sys_cgroup,
            &[
                &bin("kube-apiserver"),
                "--etcd-servers=http://127.0.0.1:2379",
                &format!("--bind-address={node_ip}"),
                &format!("--advertise-address={node_ip}"),
                &format!("--secure-port={}", files::API_PORT),
                &format!("--tls-cert-file={}", p("apiserver.crt")),
                &format!("--tls-private-key-file={}", p("apiserver.key")),
                &format!("--client-ca-file={}", p("ca.crt")),
                &format!("--token-auth-file={}", p("tokens.csv")),
                "--service-account-issuer=https://kubernetes.default.svc",
                &format!("--service-account-key-file={}", p("sa.pub")),
                &format!("--service-account-signing-key-file={}", p("sa.key")),
                "--api-audiences=https://kubernetes.default.svc",
                &format!("--service-cluster-ip-range={}", files::SERVICE_RANGE),
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                &format!("--cert-dir={}", d("apiserver-certs")),
            ],
            &front_proxy,
        );
        node.wait_api(t0);
        step("API server ready", t0);

        let admin = d("admin.kubeconfig");
        node.spawn(
            "kube-controller-manager",
            &sys_cgroup,
            &[
                &bin("kube-controller-manager"),
                &format!("--kubeconfig={admin}"),
                "--controllers=*,-nodeipam",
                "--leader-elect=false",
                &format!("--service-account-private-key-file={}", p("sa.key")),
                &format!("--root-ca-file={}", p("ca.crt")),
                "--use-service-account-credentials=false",
                "--bind-address=127.0.0.1",
                "--port=0",
            ],
            &[],
        );
        node.spawn(
            "kube-scheduler",
            &sys_cgroup,
            &[
                &bin("kube-scheduler"),
                &format!("--kubeconfig={admin}"),
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--port=0",
            ],
            &[],
        );
        fs::write(
            dir.join("containerd.toml"),
            files::containerd(&dir, &opts.pause_image),
        )
        .expect("containerd config");
        fs::write(dir.join("cni/10-nodemesh.conflist"), files::cni(&dir)).expect("cni config");
        node.spawn(
            "containerd",
            &sys_cgroup,
            &[
                "/usr/bin/containerd",
                &format!("--config={}", d("containerd.toml")),
            ],
            &[],
        );
        node.wait_containerd(t0);
        for image in &opts.images {
            let path = fs::canonicalize(image).expect("image archive");
            node.ctr(&["images", "import", &path.display().to_string()]);
        }
        step("containerd up, images imported", t0);

        fs::write(
            dir.join("kubelet.yaml"),
            files::kubelet(&dir, node_ip, &format!("/{}", opts.name)),
        )
        .expect("kubelet config");
        let sock = format!("unix://{}", d("containerd/containerd.sock"));
        node.spawn(
            "kubelet",
            &sys_cgroup,
            &[
                &bin("kubelet"),
                &format!("--kubeconfig={}", d("kubelet.kubeconfig")),
                &format!("--config={}", d("kubelet.yaml")),
                "--container-runtime=remote",
                &format!("--container-runtime-endpoint={sock}"),
                &format!("--image-service-endpoint={sock}"),
                &format!("--pod-infra-container-image={}", opts.pause_image),
                &format!("--node-ip={node_ip}"),
                &format!("--hostname-override={}", opts.name),
                &format!("--root-dir={}", d("kubelet")),
                &format!("--cert-dir={}", d("kubelet/pki")),
                "--v=1",
            ],
            &[],
        );
        node.spawn(
            "kube-proxy",
            &sys_cgroup,
            &[
                &bin("kube-proxy"),
                &format!("--kubeconfig={admin}"),
                "--proxy-mode=iptables",
                &format!("--hostname-override={}", opts.name),
                &format!("--bind-address={node_ip}"),
                &format!("--cluster-cidr={}", files::POD_RANGE),
                // Pod → Service → pod on one bridge without br_netfilter.
                "--masquerade-all=true",
                // Host-wide settings stay as they are.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--metrics-bind-address=127.0.0.1:10249",
                "--healthz-bind-address=127.0.0.1:10256",
            ],
            &[],
        );
        node.wait_ready(t0);
        step("node Ready", t0);
        node
    }

    /// The mount-namespace holder: private `/run`, `/var/log`,
    /// `/var/lib/cni` for the node's daemons, in the node's netns.
    fn start_holder(&self, cgroup: &Path) -> u32 {
        let ready = self.dir.join("holder.ready");
        let script = format!(
            "set -e
mount -t tmpfs -o mode=755 nodemesh-run /run
mkdir -p /run/netns
mount --bind {log} /var/log
mount -t tmpfs -o mode=755 nodemesh-cni /var/lib/cni
touch {ready}
exec sleep 2147483647",
            log = self.dir.join("log").display(),
            ready = ready.display()
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .args(["--", "unshare", "--mount", "--propagation", "private", "--"])
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(self.log("holder"))
            .stderr(self.log("holder"));
        let child = if self.detached {
            spawn_in_cgroup(cmd, cgroup)
        } else {
            spawn_kept(cmd, cgroup.to_owned())
        };
        let pid = child.id();
        self.children.lock().unwrap().push(("holder".into(), child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "the mount namespace holder did not come up:\n{}",
                self.log_tail("holder", 20)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pid
    }

    fn log(&self, name: &str) -> fs::File {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log file")
    }

    /// The last `lines` of a daemon's log.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Starts a daemon in the node's namespaces and `cgroup`.
    fn spawn(&self, name: &str, cgroup: &Path, argv: &[&str], more: &[String]) {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.holder))
            .args(["--mount", "--net", "--"])
            .args(argv)
            .args(more)
            .stdin(Stdio::null())
            .stdout(self.log(name))
            .stderr(self.log(name));
        let child = if self.detached {
            spawn_in_cgroup(cmd, cgroup)
        } else {
            spawn_kept(cmd, cgroup.to_owned())
        };
        self.children.lock().unwrap().push((name.into(), child));
    }

    /// Panics (with its log) if a daemon has exited.
    fn check_alive(&self) {
        let mut children = self.children.lock().unwrap();
        for (name, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let name = name.clone();
                drop(children);
                panic!(
                    "real node: {name} exited ({status}):\n{}",
                    self.log_tail(&name, 40)
                );
            }
        }
    }

    fn wait(
        &self,
        what: &str,
        t0: Instant,
        timeout: Duration,
        mut ok: impl FnMut() -> bool,
        log: &str,
    ) {
        let deadline = Instant::now() + timeout;
        while !ok() {
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "real node: {what} not after {timeout:?} ({:.1}s in):\n{}",
                t0.elapsed().as_secs_f64(),
                self.log_tail(log, 40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_api(&self, t0: Instant) {
        self.wait(
            "API server ready",
            t0,
            Duration::from_secs(60),
            || {
                self.cluster.block_on(async {
                    let req = http::Request::get("/readyz")
                        .body(Vec::new())
                        .expect("request");
                    self.cluster.client.request_text(req).await.is_ok()
                })
            },
            "kube-apiserver",
        );
    }

    fn wait_containerd(&self, t0: Instant) {
        let sock = self.dir.join("containerd/containerd.sock");
        self.wait(
            "containerd up",
            t0,
            Duration::from_secs(30),
            || sock.exists() && self.ctr_ok(&["version"]),
            "containerd",
        );
    }

    fn wait_ready(&self, t0: Instant) {
        let nodes: Api<K8sNode> = Api::all(self.cluster.client.clone());
        self.wait(
            "node Ready",
            t0,
            Duration::from_secs(120),
            || {
                self.cluster
                    .block_on(nodes.get_opt(&self.name))
                    .ok()
                    .flatten()
                    .and_then(|n| n.status?.conditions)
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            },
            "kubelet",
        );
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.holder))
            .args(["--mount", "--net", "--", "ctr"])
            .arg(format!(
                "--address={}",
                self.dir.join("containerd/containerd.sock").display()
            ))
            .args(["--namespace", "k8s.io"])
            .args(args);
        cmd
    }

    fn ctr_ok(&self, args: &[&str]) -> bool {
        self.ctr_command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs `ctr` against the node's containerd; panics if it fails.
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = self.ctr_command(args).output().expect("run ctr");
        assert!(
            out.status.success(),
            "ctr {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The API server's address, as the tests reach it.
    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, files::API_PORT))
    }

    /// Removes everything a node named `name` made (running or left by a
    /// crash): processes, cgroups in every hierarchy, the netns (its veth,
    /// bridge and iptables rules with it), its directory, and what it put
    /// in `/var/lib/cni`. Quiet and idempotent.
    pub fn remove(name: &str) {
        let v2 = cgroup2_mount();
        // Containers first (in the kubelet's root), then the daemons.
        remove_cgroup_tree(&v2.join(name));
        remove_cgroup_tree(&v2.join(format!("{name}-sys")));
        for h in hierarchies() {
            crate::sys::remove_cgroup_dirs(&h.join(name));
        }
        ip_quiet(&["netns", "del", name]);
        let dir = std::env::temp_dir().join(name);
        if dir.exists() {
            // What an agent this node ran pinned, if it was killed rather
            // than uninstalled (the install's --bpffs default).
            let _ = fs::remove_dir_all(AGENT_PINS);
        }
        if dir.join("created-var-lib-cni").exists() {
            let _ = fs::remove_dir("/var/lib/cni");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // A detached node outlives this process, unless its start failed.
        if self.detached && !std::thread::panicking() {
            return;
        }
        if std::thread::panicking() {
            for name in ["kubelet", "containerd"] {
                eprintln!(
                    "---- real node: {name} log (tail) ----\n{}",
                    self.log_tail(name, 30)
                );
            }
        }
        for (_, child) in self
            .children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os("NODEMESH_TEST_KEEP_LOGS").is_some() {
            let keep = std::env::temp_dir().join(format!("{}-logs", self.name));
            let _ = fs::create_dir_all(&keep);
            for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let _ = fs::copy(e.path(), keep.join(e.file_name()));
                }
            }
            eprintln!("real node: logs kept in {}", keep.display());
        }
        Self::remove(&self.name);
    }
}
