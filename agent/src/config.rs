//! The agent's configuration: command-line flags (each also readable from a
//! `NODEMESH_*` environment variable), validated all at once so an operator
//! sees every problem in one go.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::Args;

/// Flags of `nodemesh agent`, as given.
#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// Learn this node's pods from a YAML file (see docs/pod-file.md),
    /// re-read when it changes, instead of from the Kubernetes API.
    #[arg(long, env = "NODEMESH_POD_FILE", value_name = "PATH")]
    pub pod_file: Option<PathBuf>,

    /// This node's name in Kubernetes (the DaemonSet passes it from the
    /// downward API).
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// kubeconfig to reach the API server; default: the pod's service
    /// account in a cluster, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "NODEMESH_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// The agent's own namespace and DaemonSet (set by the install): when
    /// the agent stops and its DaemonSet is gone, nodemesh is being
    /// uninstalled and the agent removes its eBPF state.
    #[arg(
        long,
        env = "NODEMESH_NAMESPACE",
        value_name = "NAME",
        requires = "daemonset"
    )]
    pub namespace: Option<String>,

    #[arg(
        long,
        env = "NODEMESH_DAEMONSET",
        value_name = "NAME",
        requires = "namespace"
    )]
    pub daemonset: Option<String>,

    /// The SPIFFE trust domain of workload identities.
    #[arg(
        long,
        env = "NODEMESH_TRUST_DOMAIN",
        default_value = "cluster.local",
        value_name = "DOMAIN"
    )]
    pub trust_domain: String,

    /// How often to check the pod file for changes.
    #[arg(
        long,
        env = "NODEMESH_POD_FILE_INTERVAL",
        default_value = "500ms",
        value_name = "DURATION"
    )]
    pub pod_file_interval: String,

    /// cgroup v2 directory above every pod and the agent: sock_ops attaches
    /// here and pod cgroups are looked up under it. Default: where cgroup v2
    /// is mounted (from /proc/self/mountinfo).
    #[arg(long, env = "NODEMESH_CGROUP_ROOT", value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,

    /// Directory on bpffs for pinned eBPF maps and links (mounted at
    /// /sys/fs/bpf when missing).
    #[arg(
        long,
        env = "NODEMESH_BPFFS",
        default_value = "/sys/fs/bpf/nodemesh",
        value_name = "PATH"
    )]
    pub bpffs: PathBuf,

    /// Address of the admin server (/metrics, /live, /ready).
    #[arg(
        long,
        env = "NODEMESH_ADMIN_ADDR",
        default_value = "0.0.0.0:4191",
        value_name = "ADDR"
    )]
    pub admin_addr: String,

    /// Port of the outbound listener inside each meshed pod's netns.
    #[arg(
        long,
        env = "NODEMESH_OUTBOUND_PORT",
        default_value = "15001",
        value_name = "PORT"
    )]
    pub outbound_port: String,

    /// Move bytes between apps and the proxy socket-to-socket with sk_msg
    /// (true), or through the loopback TCP/IP stack (false).
    #[arg(
        long,
        env = "NODEMESH_FAST_PATH",
        default_value = "true",
        value_name = "BOOL"
    )]
    pub fast_path: String,

    /// Destination network never redirected (CIDR, IPv4); repeat or
    /// separate with commas.
    #[arg(
        long = "bypass-cidr",
        env = "NODEMESH_BYPASS_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub bypass_cidrs: Vec<String>,

    /// Destination port never redirected; repeat or separate with commas.
    #[arg(
        long = "bypass-port",
        env = "NODEMESH_BYPASS_PORTS",
        value_delimiter = ',',
        value_name = "PORT"
    )]
    pub bypass_ports: Vec<String>,

    /// How long connecting to a destination may take before the client is
    /// reset.
    #[arg(
        long,
        env = "NODEMESH_CONNECT_TIMEOUT",
        default_value = "5s",
        value_name = "DURATION"
    )]
    pub connect_timeout: String,

    /// On SIGTERM/SIGINT: how long open connections may take to finish.
    #[arg(
        long,
        env = "NODEMESH_SHUTDOWN_GRACE",
        default_value = "30s",
        value_name = "DURATION"
    )]
    pub shutdown_grace: String,

    /// Relay buffer per direction per connection, in bytes. Proxy memory is
    /// bounded by about max-connections × 2 × this (pages a connection never
    /// fills are not resident). Larger buffers move bulk data faster.
    #[arg(
        long,
        env = "NODEMESH_BUFFER_SIZE",
        default_value = "131072",
        value_name = "BYTES"
    )]
    pub buffer_size: String,

    /// Connections proxied at once on this node; more wait to be accepted.
    #[arg(
        long,
        env = "NODEMESH_MAX_CONNECTIONS",
        default_value = "20000",
        value_name = "N"
    )]
    pub max_connections: String,

    /// Proxy worker threads (0: one per CPU).
    #[arg(
        long,
        env = "NODEMESH_WORKER_THREADS",
        default_value = "0",
        value_name = "N"
    )]
    pub worker_threads: String,

    /// Detach and unpin all eBPF state when the agent exits (default: keep
    /// it, so a restarted agent takes over without a gap).
    #[arg(long, env = "NODEMESH_CLEANUP_ON_EXIT")]
    pub cleanup_on_exit: bool,

    /// `host:port` of the identity service. Turns on workload identity:
    /// certificates for the node's meshed service accounts, and the
    /// mutual-TLS tunnel between nodes. Needs Kubernetes discovery.
    #[arg(long, env = "NODEMESH_IDENTITY_ADDR", value_name = "HOST:PORT")]
    pub identity_addr: Option<String>,

    /// The DNS name in the identity service's certificate.
    #[arg(
        long,
        env = "NODEMESH_IDENTITY_SERVER_NAME",
        default_value = "nodemesh-identity.nodemesh.svc",
        value_name = "DNS"
    )]
    pub identity_server_name: String,

    /// The trust anchors (PEM bundle) every workload certificate chains to.
    #[arg(long, env = "NODEMESH_IDENTITY_TRUST_ANCHORS", value_name = "PATH")]
    pub identity_trust_anchors_file: Option<PathBuf>,

    /// The agent's projected service-account token (audience
    /// identity.nodemesh.io), bound to its pod.
    #[arg(
        long,
        env = "NODEMESH_IDENTITY_TOKEN_FILE",
        default_value = "/var/run/secrets/nodemesh.io/identity/token",
        value_name = "PATH"
    )]
    pub identity_token_file: PathBuf,

    /// Where the mutual-TLS tunnel listens for other nodes (with identity).
    #[arg(
        long,
        env = "NODEMESH_TUNNEL_ADDR",
        default_value = "0.0.0.0:15008",
        value_name = "ADDR"
    )]
    pub tunnel_addr: String,

    /// A pooled tunnel connection to another node with no new stream for
    /// this long is closed.
    #[arg(
        long,
        env = "NODEMESH_TUNNEL_IDLE_TIMEOUT",
        default_value = "60s",
        value_name = "DURATION"
    )]
    pub tunnel_idle_timeout: String,
}

/// Workload identity settings (all given, files read).
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    pub addr: String,
    pub server_name: String,
    pub trust_anchors_pem: String,
    pub token_file: PathBuf,
    pub tunnel_addr: SocketAddr,
    pub tunnel_idle_timeout: Duration,
}

/// Where the agent learns its node's pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodSourceConfig {
    /// A watched YAML file.
    File { path: PathBuf, interval: Duration },
    /// The Kubernetes API.
    Kube {
        node_name: String,
        kubeconfig: Option<PathBuf>,
        /// (namespace, name) of the agent's own DaemonSet.
        daemonset: Option<(String, String)>,
    },
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub source: PodSourceConfig,
    pub trust_domain: String,
    pub cgroup_root: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub admin_addr: SocketAddr,
    pub outbound_port: u16,
    pub fast_path: bool,
    pub bypass_nets: Vec<(Ipv4Addr, u8)>,
    pub bypass_ports: Vec<u16>,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
    pub buffer_size: usize,
    pub max_connections: usize,
    pub worker_threads: usize,
    pub cleanup_on_exit: bool,
    /// Workload identity and the tunnel, when on.
    pub identity: Option<IdentitySettings>,
}

/// Every problem found in the configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

/// Collects problems while parsing.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check<T>(&mut self, flag: &str, value: &str, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(why) => {
                self.0.push(format!("--{flag} {value:?}: {why}"));
                None
            }
        }
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("not a duration ({e}); try 500ms, 5s or 1m"))
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err("not a port (1-65535)".into()),
        Ok(p) => Ok(p),
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err("not a boolean (true or false)".into()),
    }
}

fn parse_count(s: &str, min: usize, max: usize) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("not a number from {min} to {max}")),
    }
}

/// A DNS subdomain (RFC 1123): what Kubernetes accepts as a node name.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `a.b.c.d/len` (or a bare address, meaning /32).
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = s.trim().split_once('/').unwrap_or((s.trim(), "32"));
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| "not an IPv4 CIDR (like 10.96.0.0/12)".to_string())?;
    let len: u8 = match len.parse() {
        Ok(l) if l <= 32 => l,
        _ => return Err("prefix length must be 0-32".into()),
    };
    // Keep only the network bits so equal networks compare equal.
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok((Ipv4Addr::from(u32::from(addr) & mask), len))
}

impl TryFrom<&AgentArgs> for AgentConfig {
    type Error = ConfigErrors;

    fn try_from(a: &AgentArgs) -> Result<Self, ConfigErrors> {
        let mut p = Problems::default();
        let pod_file_interval = p.check(
            "pod-file-interval",
            &a.pod_file_interval,
            parse_duration(&a.pod_file_interval).and_then(|d| {
                if d.is_zero() {
                    Err("must be more than zero".into())
                } else {
                    Ok(d)
                }
            }),
        );
        let admin_addr = p.check(
            "admin-addr",
            &a.admin_addr,
            a.admin_addr
                .parse::<SocketAddr>()
                .map_err(|_| "not an address:port (like 0.0.0.0:4191)".to_string()),
        );
        let outbound_port = p.check(
            "outbound-port",
            &a.outbound_port,
            parse_port(&a.outbound_port),
        );
        let fast_path = p.check("fast-path", &a.fast_path, parse_bool(&a.fast_path));
        let bypass_nets: Vec<_> = a
            .bypass_cidrs
            .iter()
            .filter(|s| !s.trim().is_empty())
            .filter_map(|s| p.check("bypass-cidr", s, parse_cidr(s)))
            .collect();
        let bypass_ports: Vec<_> = a
            .bypass_ports
            .iter()
            .filter(|s| !s.trim().is_empty())
            .filter_map(|s| p.check("bypass-port", s, parse_port(s)))
            .collect();
        if bypass_nets.len() + bypass_ports.len() > nodemesh_common::BYPASS_ENTRIES as usize {
            p.0.push(format!(
                "at most {} bypass CIDRs and as many bypass ports",
                nodemesh_common::BYPASS_ENTRIES
            ));
        }
        let connect_timeout = p.check(
            "connect-timeout",
            &a.connect_timeout,
            parse_duration(&a.connect_timeout),
        );
        let shutdown_grace = p.check(
            "shutdown-grace",
            &a.shutdown_grace,
            parse_duration(&a.shutdown_grace),
        );
        let buffer_size = p.check(
            "buffer-size",
            &a.buffer_size,
            parse_count(&a.buffer_size, 1024, 4 << 20),
        );
        let max_connections = p.check(
            "max-connections",
            &a.max_connections,
            parse_count(&a.max_connections, 1, 1 << 20),
        );
        let worker_threads = p.check(
            "worker-threads",
            &a.worker_threads,
            parse_count(&a.worker_threads, 0, 1024),
        );
        if let (Some(admin), Some(port)) = (admin_addr, outbound_port)
            && admin.port() == port
        {
            p.0.push(format!(
                "--admin-addr and --outbound-port both use port {port}"
            ));
        }
        let source = match (&a.pod_file, &a.node_name) {
            (Some(path), _) => pod_file_interval.map(|interval| PodSourceConfig::File {
                path: path.clone(),
                interval,
            }),
            (None, Some(node)) if is_dns_subdomain(node) => Some(PodSourceConfig::Kube {
                node_name: node.clone(),
                kubeconfig: a.kubeconfig.clone(),
                daemonset: a.namespace.clone().zip(a.daemonset.clone()),
            }),
            (None, Some(node)) => {
                p.0.push(format!("--node-name {node:?}: not a Kubernetes node name"));
                None
            }
            (None, None) => {
                p.0.push(
                    "--node-name (or NODE_NAME) is needed to watch this node's pods; or give --pod-file"
                        .into(),
                );
                None
            }
        };
        if !is_dns_subdomain(&a.trust_domain) {
            p.0.push(format!(
                "--trust-domain {:?}: not a DNS name (like cluster.local)",
                a.trust_domain
            ));
        }
        let identity = match &a.identity_addr {
            None => None,
            Some(addr) => {
                let tunnel_addr = p.check(
                    "tunnel-addr",
                    &a.tunnel_addr,
                    a.tunnel_addr
                        .parse::<SocketAddr>()
                        .map_err(|_| "not an address:port (like 0.0.0.0:15008)".to_string()),
                );
                let idle = p.check(
                    "tunnel-idle-timeout",
                    &a.tunnel_idle_timeout,
                    parse_duration(&a.tunnel_idle_timeout).and_then(|d| {
                        if d.is_zero() {
                            Err("must be more than zero".into())
                        } else {
                            Ok(d)
                        }
                    }),
                );
                if let (Some(t), Some(admin)) = (tunnel_addr, admin_addr)
                    && t.port() == admin.port()
                {
                    p.0.push(format!(
                        "--admin-addr and --tunnel-addr both use port {}",
                        admin.port()
                    ));
                }
                if a.pod_file.is_some() {
                    p.0.push(
                        "--identity-addr needs Kubernetes discovery (--node-name), not --pod-file"
                            .into(),
                    );
                }
                if !addr.contains(':') {
                    p.0.push(format!("--identity-addr {addr:?}: expected host:port"));
                }
                if !is_dns_subdomain(&a.identity_server_name) {
                    p.0.push(format!(
                        "--identity-server-name {:?}: not a DNS name",
                        a.identity_server_name
                    ));
                }
                let anchors = match &a.identity_trust_anchors_file {
                    None => {
                        p.0.push(
                            "--identity-trust-anchors-file is needed with --identity-addr".into(),
                        );
                        None
                    }
                    Some(path) => match std::fs::read_to_string(path) {
                        Ok(text) => {
                            match crate::identity::pki::certs_from_pem(&text, "trust anchors") {
                                Ok(_) => Some(text),
                                Err(e) => {
                                    p.0.push(format!(
                                        "--identity-trust-anchors-file {}: {e}",
                                        path.display()
                                    ));
                                    None
                                }
                            }
                        }
                        Err(e) => {
                            p.0.push(format!(
                                "--identity-trust-anchors-file {}: {e}",
                                path.display()
                            ));
                            None
                        }
                    },
                };
                match (tunnel_addr, idle, anchors) {
                    (Some(tunnel_addr), Some(tunnel_idle_timeout), Some(trust_anchors_pem)) => {
                        Some(IdentitySettings {
                            addr: addr.clone(),
                            server_name: a.identity_server_name.clone(),
                            trust_anchors_pem,
                            token_file: a.identity_token_file.clone(),
                            tunnel_addr,
                            tunnel_idle_timeout,
                        })
                    }
                    _ => None,
                }
            }
        };
        if !p.0.is_empty() {
            return Err(ConfigErrors(p.0));
        }
        // Every `None` above pushed a problem, so these are all `Some`.
        let missing = || ConfigErrors(vec!["internal: a value was not parsed".into()]);
        Ok(Self {
            source: source.ok_or_else(missing)?,
            trust_domain: a.trust_domain.clone(),
            cgroup_root: a.cgroup_root.clone(),
            bpffs: a.bpffs.clone(),
            admin_addr: admin_addr.ok_or_else(missing)?,
            outbound_port: outbound_port.ok_or_else(missing)?,
            fast_path: fast_path.ok_or_else(missing)?,
            bypass_nets,
            bypass_ports,
            connect_timeout: connect_timeout.ok_or_else(missing)?,
            shutdown_grace: shutdown_grace.ok_or_else(missing)?,
            buffer_size: buffer_size.ok_or_else(missing)?,
            max_connections: max_connections.ok_or_else(missing)?,
            worker_threads: worker_threads.ok_or_else(missing)?,
            cleanup_on_exit: a.cleanup_on_exit,
            identity,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn args(extra: &[&str]) -> AgentArgs {
        let mut argv = vec!["nodemesh", "--pod-file", "/tmp/pods.yaml"];
        argv.extend(extra);
        Cli::try_parse_from(argv).expect("clap accepts").agent
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = AgentConfig::try_from(&args(&[])).expect("valid");
        assert_eq!(cfg.outbound_port, 15001);
        assert_eq!(cfg.admin_addr.port(), 4191);
        assert!(cfg.fast_path);
        assert_eq!(cfg.connect_timeout, Duration::from_secs(5));
        assert_eq!(cfg.bpffs, PathBuf::from("/sys/fs/bpf/nodemesh"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = AgentConfig::try_from(&args(&[
            "--outbound-port",
            "0",
            "--connect-timeout",
            "soon",
            "--fast-path",
            "maybe",
            "--bypass-cidr",
            "10.0.0.0/40,10.96.0.0/12",
            "--admin-addr",
            "nowhere",
        ]))
        .unwrap_err();
        let text = err.to_string();
        for flag in [
            "--outbound-port",
            "--connect-timeout",
            "--fast-path",
            "--bypass-cidr",
            "--admin-addr",
        ] {
            assert!(text.contains(flag), "{flag} missing from:\n{text}");
        }
        assert_eq!(err.0.len(), 5, "{text}");
    }

    #[test]
    fn cidrs_and_ports() {
        assert_eq!(
            parse_cidr("10.96.1.2/12"),
            Ok((Ipv4Addr::new(10, 96, 0, 0), 12))
        );
        assert_eq!(parse_cidr("1.2.3.4"), Ok((Ipv4Addr::new(1, 2, 3, 4), 32)));
        assert_eq!(parse_cidr("0.0.0.0/0"), Ok((Ipv4Addr::UNSPECIFIED, 0)));
        assert!(parse_cidr("::1/128").is_err());
        let cfg =
            AgentConfig::try_from(&args(&["--bypass-port", "22,53", "--bypass-port", "8080"]))
                .expect("valid");
        assert_eq!(cfg.bypass_ports, [22, 53, 8080]);
    }

    #[test]
    fn identity_settings_are_checked_together() {
        let cli = |argv: &[&str]| {
            let mut all = vec!["nodemesh"];
            all.extend(argv);
            Cli::try_parse_from(all).expect("clap accepts").agent
        };
        // Off by default.
        let cfg = AgentConfig::try_from(&cli(&["--node-name", "n1"])).expect("valid");
        assert!(cfg.identity.is_none());
        // On: needs anchors that parse, Kubernetes discovery, sane addresses.
        let dir = std::env::temp_dir().join(format!("nodemesh-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let anchors = dir.join("ca.crt");
        let anchor =
            crate::identity::pki::generate_trust_anchor("cluster.local", Duration::from_secs(60))
                .expect("anchor");
        std::fs::write(&anchors, &anchor.cert_pem).expect("write");
        let anchors = anchors.to_string_lossy().into_owned();
        let cfg = AgentConfig::try_from(&cli(&[
            "--node-name",
            "n1",
            "--identity-addr",
            "identity.example:8080",
            "--identity-trust-anchors-file",
            &anchors,
        ]))
        .expect("valid");
        let id = cfg.identity.expect("identity on");
        assert_eq!(id.tunnel_addr.port(), 15008);
        assert_eq!(id.tunnel_idle_timeout, Duration::from_secs(60));
        let err = AgentConfig::try_from(&cli(&[
            "--pod-file",
            "/tmp/pods.yaml",
            "--identity-addr",
            "no-port",
            "--tunnel-addr",
            "0.0.0.0:4191",
        ]))
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "needs Kubernetes discovery",
            "expected host:port",
            "--identity-trust-anchors-file is needed",
            "--admin-addr and --tunnel-addr both use port 4191",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        std::fs::write(dir.join("bad.crt"), "not a certificate").expect("write");
        let bad = dir.join("bad.crt").to_string_lossy().into_owned();
        let err = AgentConfig::try_from(&cli(&[
            "--node-name",
            "n1",
            "--identity-addr",
            "identity:8080",
            "--identity-trust-anchors-file",
            &bad,
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kubernetes_needs_a_node_name() {
        let cli = |argv: &[&str]| {
            let mut all = vec!["nodemesh"];
            all.extend(argv);
            Cli::try_parse_from(all).expect("clap accepts").agent
        };
        let err = AgentConfig::try_from(&cli(&[])).unwrap_err();
        assert!(err.to_string().contains("--node-name"), "{err}");
        let err = AgentConfig::try_from(&cli(&["--node-name", "Node_1"])).unwrap_err();
        assert!(
            err.to_string().contains("not a Kubernetes node name"),
            "{err}"
        );
        let cfg = AgentConfig::try_from(&cli(&["--node-name", "node-1.example"])).expect("valid");
        assert_eq!(
            cfg.source,
            PodSourceConfig::Kube {
                node_name: "node-1.example".into(),
                kubeconfig: None,
                daemonset: None,
            }
        );
    }

    #[test]
    fn same_port_twice_is_refused() {
        let err = AgentConfig::try_from(&args(&["--admin-addr", "0.0.0.0:15001"])).unwrap_err();
        assert!(err.to_string().contains("both use port 15001"), "{err}");
    }
}
