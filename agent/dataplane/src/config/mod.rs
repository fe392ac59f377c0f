//! The agent's configuration: its flags ([`args`]), validated all at once
//! so an operator sees every problem in one go.
mod args;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use nodemesh_core::{
    config::{
        ConfigErrors, IpCidr, Problems, parse_bool, parse_cidr, parse_count, parse_duration,
        parse_ip_cidr, parse_port, parse_positive_duration,
    },
    identity::Identity,
    names::InboundPolicy,
    names::is_dns_subdomain,
    pki,
};

pub use self::args::AgentArgs;

/// Workload identity settings (all given, files read).
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    pub addr: String,
    pub server_name: String,
    pub trust_anchors_pem: String,
    pub token_file: PathBuf,
    /// Where the tunnel listens: one port, one or more addresses.
    pub tunnel_addrs: Vec<SocketAddr>,
    pub tunnel_idle_timeout: Duration,
    pub tunnel_max_connection_age: Duration,
    /// Where the tap port listens: one port, one or more addresses.
    pub tap_addrs: Vec<SocketAddr>,
    /// The agent's own identity (its tap port's certificate).
    pub agent_identity: Identity,
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
    /// Pods' netns from the runtime's directory, by address (`--netns-dir`).
    pub netns_dir: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub admin_addr: SocketAddr,
    pub outbound_port: u16,
    pub fast_path: bool,
    pub bypass_nets: Vec<(Ipv4Addr, u8)>,
    /// The cluster's Service network: an address there the agent does not
    /// know as a Service port is refused.
    pub service_cidrs: Vec<IpCidr>,
    pub bypass_ports: Vec<u16>,
    pub connect_timeout: Duration,
    pub detect_timeout: Duration,
    pub default_inbound_policy: InboundPolicy,
    /// Every connection must pass this too (`--min-inbound-policy`).
    pub min_inbound_policy: InboundPolicy,
    pub shutdown_grace: Duration,
    pub buffer_size: usize,
    /// `None`: derived from the memory limit (see [`crate::memory`]).
    pub max_connections: Option<usize>,
    pub max_requests: Option<usize>,
    /// Opaque relays silent both ways this long are closed.
    pub idle_timeout: Duration,
    pub worker_threads: usize,
    pub cleanup_on_exit: bool,
    /// Workload identity and the tunnel, when on.
    pub identity: Option<IdentitySettings>,
}

impl TryFrom<&AgentArgs> for AgentConfig {
    type Error = ConfigErrors;

    fn try_from(a: &AgentArgs) -> Result<Self, ConfigErrors> {
        let mut p = Problems::default();
        let pod_file_interval = p.check(
            "pod-file-interval",
            &a.pod_file_interval,
            parse_positive_duration(&a.pod_file_interval),
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
        let service_cidrs: Vec<_> = a
            .service_cidrs
            .iter()
            .filter(|s| !s.trim().is_empty())
            .filter_map(|s| p.check("service-cidr", s, parse_ip_cidr(s)))
            .collect();
        let bypass_ports: Vec<_> = a
            .bypass_ports
            .iter()
            .filter(|s| !s.trim().is_empty())
            .filter_map(|s| p.check("bypass-port", s, parse_port(s)))
            .collect();
        if bypass_nets.len() + bypass_ports.len() > nodemesh_common::BYPASS_ENTRIES as usize {
            p.push(format!(
                "at most {} bypass CIDRs and as many bypass ports",
                nodemesh_common::BYPASS_ENTRIES
            ));
        }
        let connect_timeout = p.check(
            "connect-timeout",
            &a.connect_timeout,
            parse_duration(&a.connect_timeout),
        );
        let detect_timeout = p.check(
            "detect-timeout",
            &a.detect_timeout,
            parse_positive_duration(&a.detect_timeout),
        );
        let default_inbound_policy = p.check(
            "default-inbound-policy",
            &a.default_inbound_policy,
            InboundPolicy::parse(&a.default_inbound_policy),
        );
        let min_inbound_policy = p.check(
            "min-inbound-policy",
            &a.min_inbound_policy,
            InboundPolicy::parse(&a.min_inbound_policy),
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
        let auto = |s: &str| -> Result<Option<usize>, String> {
            if s.trim() == "auto" {
                Ok(None)
            } else {
                parse_count(s, 1, 1 << 20).map(Some)
            }
        };
        let max_connections = p.check(
            "max-connections",
            &a.max_connections,
            auto(&a.max_connections),
        );
        let max_requests = p.check("max-requests", &a.max_requests, auto(&a.max_requests));
        let idle_timeout = p.check(
            "idle-timeout",
            &a.idle_timeout,
            parse_positive_duration(&a.idle_timeout),
        );
        let worker_threads = p.check(
            "worker-threads",
            &a.worker_threads,
            parse_count(&a.worker_threads, 0, 1024),
        );
        if let (Some(admin), Some(port)) = (admin_addr, outbound_port)
            && admin.port() == port
        {
            p.push(format!(
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
                p.push(format!("--node-name {node:?}: not a Kubernetes node name"));
                None
            }
            (None, None) => {
                p.push(
                    "--node-name (or NODE_NAME) is needed to watch this node's pods; or give --pod-file"
                        .into(),
                );
                None
            }
        };
        if !is_dns_subdomain(&a.trust_domain) {
            p.push(format!(
                "--trust-domain {:?}: not a DNS name (like cluster.local)",
                a.trust_domain
            ));
        }
        let identity = match &a.identity_addr {
            None => None,
            Some(addr) => {
                let tunnel_addrs = p.check(
                    "tunnel-addr",
                    &a.tunnel_addr.join(","),
                    tunnel_addrs(&a.tunnel_addr),
                );
                let tunnel_addr = tunnel_addrs.as_ref().and_then(|t| t.first().copied());
                let max_age = p.check(
                    "tunnel-max-connection-age",
                    &a.tunnel_max_connection_age,
                    parse_positive_duration(&a.tunnel_max_connection_age),
                );
                let idle = p.check(
                    "tunnel-idle-timeout",
                    &a.tunnel_idle_timeout,
                    parse_positive_duration(&a.tunnel_idle_timeout),
                );
                let tap_addrs = p.check(
                    "tap-addr",
                    &a.tap_addr.join(","),
                    self::tunnel_addrs(&a.tap_addr),
                );
                let tap_port = tap_addrs
                    .as_ref()
                    .and_then(|t| t.first())
                    .map(SocketAddr::port);
                let ports = [
                    ("--admin-addr", admin_addr.map(|a| a.port())),
                    ("--tunnel-addr", tunnel_addr.map(|a| a.port())),
                    ("--tap-addr", tap_port),
                ];
                for (i, (a_name, a_port)) in ports.iter().enumerate() {
                    for (b_name, b_port) in &ports[i + 1..] {
                        if let (Some(x), Some(y)) = (a_port, b_port)
                            && x == y
                        {
                            p.push(format!("{a_name} and {b_name} both use port {x}"));
                        }
                    }
                }
                let agent_identity = p.check(
                    "agent-identity",
                    &a.agent_identity,
                    parse_identity(&a.agent_identity),
                );
                if a.pod_file.is_some() {
                    p.push(
                        "--identity-addr needs Kubernetes discovery (--node-name), not --pod-file"
                            .into(),
                    );
                }
                if !addr.contains(':') {
                    p.push(format!("--identity-addr {addr:?}: expected host:port"));
                }
                if !is_dns_subdomain(&a.identity_server_name) {
                    p.push(format!(
                        "--identity-server-name {:?}: not a DNS name",
                        a.identity_server_name
                    ));
                }
                let anchors = match &a.identity_trust_anchors_file {
                    None => {
                        p.push(
                            "--identity-trust-anchors-file is needed with --identity-addr".into(),
                        );
                        None
                    }
                    Some(path) => match std::fs::read_to_string(path) {
                        Ok(text) => match pki::certs_from_pem(&text, "trust anchors") {
                            Ok(_) => Some(text),
                            Err(e) => {
                                p.push(format!(
                                    "--identity-trust-anchors-file {}: {e}",
                                    path.display()
                                ));
                                None
                            }
                        },
                        Err(e) => {
                            p.push(format!(
                                "--identity-trust-anchors-file {}: {e}",
                                path.display()
                            ));
                            None
                        }
                    },
                };
                match (
                    tunnel_addrs,
                    idle,
                    anchors,
                    tap_addrs,
                    agent_identity,
                    max_age,
                ) {
                    (
                        Some(tunnel_addrs),
                        Some(tunnel_idle_timeout),
                        Some(trust_anchors_pem),
                        Some(tap_addrs),
                        Some(agent_identity),
                        Some(tunnel_max_connection_age),
                    ) => Some(IdentitySettings {
                        addr: addr.clone(),
                        server_name: a.identity_server_name.clone(),
                        trust_anchors_pem,
                        token_file: a.identity_token_file.clone(),
                        tunnel_addrs,
                        tunnel_idle_timeout,
                        tunnel_max_connection_age,
                        tap_addrs,
                        agent_identity,
                    }),
                    _ => None,
                }
            }
        };
        p.finish()?;
        // Every `None` above pushed a problem, so these are all `Some`.
        let missing = || ConfigErrors(vec!["internal: a value was not parsed".into()]);
        Ok(Self {
            source: source.ok_or_else(missing)?,
            trust_domain: a.trust_domain.clone(),
            cgroup_root: a.cgroup_root.clone(),
            netns_dir: a.netns_dir.clone(),
            bpffs: a.bpffs.clone(),
            admin_addr: admin_addr.ok_or_else(missing)?,
            outbound_port: outbound_port.ok_or_else(missing)?,
            fast_path: fast_path.ok_or_else(missing)?,
            bypass_nets,
            service_cidrs,
            bypass_ports,
            connect_timeout: connect_timeout.ok_or_else(missing)?,
            detect_timeout: detect_timeout.ok_or_else(missing)?,
            default_inbound_policy: default_inbound_policy.ok_or_else(missing)?,
            min_inbound_policy: min_inbound_policy.ok_or_else(missing)?,
            shutdown_grace: shutdown_grace.ok_or_else(missing)?,
            buffer_size: buffer_size.ok_or_else(missing)?,
            max_connections: max_connections.ok_or_else(missing)?,
            max_requests: max_requests.ok_or_else(missing)?,
            idle_timeout: idle_timeout.ok_or_else(missing)?,
            worker_threads: worker_threads.ok_or_else(missing)?,
            cleanup_on_exit: a.cleanup_on_exit,
            identity,
        })
    }
}

#[cfg(test)]
mod tests;

/// `namespace/name` of a service account.
fn parse_identity(text: &str) -> Result<Identity, String> {
    let (ns, name) = text
        .split_once('/')
        .ok_or_else(|| "expected namespace/service-account".to_owned())?;
    Identity::new(ns, name).map_err(|e| e.to_string())
}

/// `--tunnel-addr`: addresses on one port (peers dial that port on any
/// address of the node), none twice.
fn tunnel_addrs(list: &[String]) -> Result<Vec<SocketAddr>, String> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for text in list {
        let addr = text
            .trim()
            .parse::<SocketAddr>()
            .map_err(|_| format!("{text:?} is not an address:port (like [::]:15008)"))?;
        if addrs.contains(&addr) {
            return Err(format!("{addr} is given twice"));
        }
        addrs.push(addr);
    }
    match addrs.first() {
        None => Err("no address".into()),
        Some(first) if addrs.iter().any(|a| a.port() != first.port()) => {
            Err("every address must use the same port (other nodes dial one port)".into())
        }
        Some(_) => Ok(addrs),
    }
}
