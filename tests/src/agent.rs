//! The nodemesh agent as a process on a test node: started in the node's
//! netns and in its own cgroup under the node's cgroup root, like a
//! DaemonSet pod would be.
use std::{
    fs::{self, File},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{
    node::Node,
    prom::Metrics,
    sys::{eventually, http_get, read_or_empty, self_exe, spawn_in},
};

/// The role argument under which the test binary runs as the agent (the
/// agent's own `nodemesh::run`, in a process of its own).
pub const ROLE: &str = "__nodemesh_agent";

static AGENTS: AtomicU32 = AtomicU32::new(0);

/// How to run the agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub fast_path: bool,
    /// More `nodemesh agent` flags.
    pub args: Vec<String>,
    /// The log filter.
    pub log: String,
    /// Run this `nodemesh` binary instead of the agent built into the test
    /// binary (the demo and benchmarks run the release build).
    pub binary: Option<PathBuf>,
    /// Discover pods from the Kubernetes API with this kubeconfig (the
    /// node's name is the node's) instead of the node's pod file; the API
    /// server's port is made reachable from inside the node.
    pub kubeconfig: Option<(PathBuf, u16)>,
    /// Start the agent under this soft open-file limit.
    pub open_files: Option<u64>,
    /// `--cgroup-root` (default: the node's cgroup).
    pub cgroup_root: Option<PathBuf>,
    /// Start the agent in this cgroup v1 memory controller's directory too
    /// (where a hybrid host and containerd put a container's memory
    /// limit): see [`crate::sys::MemoryCgroup`].
    pub memory_cgroup: Option<PathBuf>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            // The agent's default (off); NODEMESH_TEST_FAST_PATH=true runs
            // the suite with the sk_msg fast path on.
            fast_path: std::env::var("NODEMESH_TEST_FAST_PATH").is_ok_and(|v| v == "true"),
            args: Vec::new(),
            log: std::env::var("NODEMESH_TEST_LOG")
                .unwrap_or_else(|_| "info,nodemesh=debug".into()),
            binary: None,
            kubeconfig: None,
            open_files: None,
            cgroup_root: None,
            memory_cgroup: None,
        }
    }
}

impl AgentOptions {
    pub fn fast_path(mut self, on: bool) -> Self {
        self.fast_path = on;
        self
    }

    /// Kubernetes discovery from `cluster` with the admin's kubeconfig.
    pub fn kube(self, cluster: &crate::Cluster) -> Self {
        self.kube_as(cluster, &cluster.kubeconfig)
    }

    /// Kubernetes discovery from `cluster` with another kubeconfig.
    pub fn kube_as(mut self, cluster: &crate::Cluster, kubeconfig: &std::path::Path) -> Self {
        self.kubeconfig = Some((kubeconfig.to_owned(), cluster.port));
        self
    }

    pub fn cgroup_root(mut self, root: &std::path::Path) -> Self {
        self.cgroup_root = Some(root.to_owned());
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }
}

/// A running agent. Killed when dropped; when the test is failing, the end
/// of its log is printed first.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    pub log_path: PathBuf,
    netns: PathBuf,
    pub admin: std::net::SocketAddr,
}

impl Agent {
    /// Starts an agent on `node` reading the node's pod file.
    pub fn start(node: &Node, opts: AgentOptions) -> Self {
        let n = AGENTS.fetch_add(1, Ordering::Relaxed);
        let cgroup = node.cgroup.join("nodemesh-agent");
        fs::create_dir_all(&cgroup).expect("agent cgroup");
        if opts.kubeconfig.is_none() && !node.pod_file().exists() {
            node.write_pods(&[]);
        }
        let log_path = node.dir.join(format!("agent-{n}.log"));
        let log = File::create(&log_path).expect("agent log");
        let mut cmd = match &opts.binary {
            Some(binary) => Command::new(binary),
            None => {
                let mut cmd = Command::new(self_exe());
                cmd.arg(ROLE);
                cmd
            }
        };
        cmd.args(["--log-level", &opts.log, "agent"]);
        if let Some((_, port)) = &opts.kubeconfig {
            node.reach_host_loopback(*port);
        }
        match &opts.kubeconfig {
            Some((kubeconfig, _)) => cmd
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .arg("--node-name")
                .arg(&node.name),
            None => cmd
                .arg("--pod-file")
                .arg(node.pod_file())
                .arg("--pod-file-interval")
                .arg("100ms"),
        };
        cmd.arg("--cgroup-root")
            .arg(opts.cgroup_root.as_ref().unwrap_or(&node.cgroup))
            .arg("--bpffs")
            .arg(&node.pins)
            .arg("--admin-addr")
            .arg(node.admin_addr().to_string())
            .arg("--fast-path")
            .arg(opts.fast_path.to_string())
            .args(&opts.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        if let Some(soft) = opts.open_files {
            crate::sys::limit_open_files(&mut cmd, soft);
        }
        if let Some(dir) = &opts.memory_cgroup {
            crate::sys::join_cgroup_at_exec(&mut cmd, dir);
        }
        let child = spawn_in(cmd, &node.netns, &cgroup);
        Self {
            child: Some(child),
            log_path,
            netns: node.netns.clone(),
            admin: node.admin_addr(),
        }
    }

    /// Starts an agent and waits until it reports ready.
    pub fn start_ready(node: &Node, opts: AgentOptions) -> Self {
        let mut agent = Self::start(node, opts);
        agent.wait_ready();
        agent
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.try_status() {
                panic!(
                    "agent exited ({status}) before it was ready:\n{}",
                    self.log_tail(60)
                );
            }
            if let Ok((200, _)) = http_get(&self.netns, self.admin, "/ready") {
                return;
            }
            if Instant::now() > deadline {
                panic!("agent not ready after 30s:\n{}", self.log_tail(60));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A scrape of /metrics.
    pub fn metrics(&self) -> Metrics {
        match http_get(&self.netns, self.admin, "/metrics") {
            Ok((200, body)) => Metrics::parse(&body),
            other => panic!("GET /metrics: {other:?}\n{}", self.log_tail(40)),
        }
    }

    /// GET `path` on the admin server.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(&self.netns, self.admin, path)
    }

    /// Waits until a metric satisfies `ok`.
    pub fn wait_metric(&self, what: &str, ok: impl Fn(&Metrics) -> bool) -> Metrics {
        eventually(what, Duration::from_secs(15), || {
            let m = self.metrics();
            if ok(&m) { Ok(m) } else { Err(m.text) }
        })
    }

    /// Waits until the agent lists `ready` ready endpoints for the Service
    /// at `vip` (its `/v1/services`).
    pub fn wait_service(&self, vip: std::net::SocketAddr, ready: usize) {
        eventually(
            &format!("{vip} with {ready} ready endpoints"),
            Duration::from_secs(15),
            || {
                let (status, body) = self.get("/v1/services").map_err(|e| e.to_string())?;
                if status != 200 {
                    return Err(format!("{status}: {body}"));
                }
                let views: Vec<nodemesh_core::wire::ServiceView> =
                    serde_json::from_str(&body).map_err(|e| e.to_string())?;
                let n = views
                    .iter()
                    .find(|v| v.addr == vip)
                    .map(|v| v.endpoints.iter().filter(|e| e.ready).count());
                if n == Some(ready) {
                    Ok(())
                } else {
                    Err(format!("{n:?}: {body}"))
                }
            },
        );
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the agent process, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        crate::sys::rss_kib(self.pid()?)
    }

    pub fn log(&self) -> String {
        read_or_empty(&self.log_path)
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        eventually(
            &format!("agent log contains {needle:?}"),
            Duration::from_secs(15),
            || {
                let log = self.log();
                if log.contains(needle) {
                    Ok(log)
                } else {
                    Err(self.log_tail(30))
                }
            },
        )
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `grace`).
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait().ok();
                self.child = None;
                return status;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the agent dies without cleaning anything up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- agent log ({}) ----\n{}\n---- end of agent log ----",
                self.log_path.display(),
                self.log_tail(
                    std::env::var("NODEMESH_TEST_LOG_LINES")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(80)
                )
            );
        }
        self.kill();
    }
}
