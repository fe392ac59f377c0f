//! `nodemesh install` and `nodemesh uninstall`: the manifests in
//! `deploy/nodemesh.yaml`, filled in from flags, printed for
//! `kubectl apply -f -` (and `kubectl delete -f -`). An issuer given at
//! install is `pki`'s, the identity service's NetworkPolicy
//! `network_policy`'s, what removes it all `uninstall`'s.
mod network_policy;
mod pki;
mod uninstall;

pub use uninstall::uninstall;

use base64::Engine as _;
use clap::Args;

use self::{
    network_policy::identity_network_policy,
    pki::{PKI_DOCUMENTS, identity_pki},
};

use nodemesh_core::{
    config::{ConfigErrors, parse_cidr},
    names::{InboundPolicy, is_dns_label, is_dns_subdomain},
};

/// The manifests, with `{{placeholders}}`.
pub const TEMPLATE: &str = include_str!("../../../../deploy/nodemesh.yaml");

#[derive(Args, Clone, Debug)]
pub struct InstallArgs {
    /// Namespace for the agent (created).
    #[arg(long, default_value = "nodemesh", value_name = "NAME")]
    pub namespace: String,

    /// The agent's container image.
    #[arg(long, default_value = concat!("ghcr.io/nodemesh/nodemesh:", env!("CARGO_PKG_VERSION")), value_name = "IMAGE")]
    pub image: String,

    /// The agent's log filter (a level, or tracing directives).
    #[arg(
        long = "agent-log-level",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub agent_log_level: String,

    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
    pub trust_domain: String,

    /// sk_msg fast path between apps and the proxy (off by default: see
    /// docs/datapath.md for when it may be turned on).
    #[arg(long, default_value = "false", value_name = "BOOL")]
    pub fast_path: String,

    /// Who may connect to a meshed pod whose own and namespace's
    /// `config.nodemesh.io/default-inbound-policy` annotations say nothing:
    /// all-unauthenticated (anyone; mTLS where the client is meshed),
    /// all-authenticated (only mTLS clients of the trust domain),
    /// cluster-unauthenticated (plaintext only from the cluster's pod and
    /// node addresses) or deny.
    #[arg(long, default_value = "all-unauthenticated", value_name = "POLICY")]
    pub default_inbound_policy: String,

    /// The floor under every pod's and namespace's inbound policy: an
    /// annotation can only make it stricter (a connection must pass both),
    /// and above all-unauthenticated a pod's
    /// `config.nodemesh.io/skip-inbound-ports` is not honoured.
    #[arg(long, default_value = "all-unauthenticated", value_name = "POLICY")]
    pub min_inbound_policy: String,

    /// The cluster's Service network (the API server's
    /// --service-cluster-ip-range; repeatable, IPv4 or IPv6): a meshed
    /// pod's connection to an address there that the agent does not know
    /// as a Service port yet is refused instead of sent, unmeshed, to
    /// kube-proxy. Without it, such a connection goes direct.
    #[arg(long = "service-cidr", value_delimiter = ',', value_name = "CIDR")]
    pub service_cidrs: Vec<String>,

    /// The cluster's pod network (the controller-manager's --cluster-cidr;
    /// repeatable, every one on dual-stack). Given: a NetworkPolicy lets
    /// only sources outside it — the nodes' agents, the API server — reach
    /// the identity service's certificate and aggregated-API ports (its
    /// metrics port stays open), over the families given. Needs a network
    /// plugin that enforces NetworkPolicy, and node-to-pod traffic that
    /// keeps the node's address: on overlays (VXLAN, IPIP) a node reaches
    /// pods from a tunnel address inside the pod network, and the agents
    /// of other nodes would be shut out.
    #[arg(long = "pod-cidr", value_delimiter = ',', value_name = "CIDR")]
    pub pod_cidrs: Vec<String>,

    /// Destination network the agents never redirect (repeatable).
    #[arg(long = "bypass-cidr", value_delimiter = ',', value_name = "CIDR")]
    pub bypass_cidrs: Vec<String>,

    /// Destination port the agents never redirect (repeatable).
    #[arg(long = "bypass-port", value_delimiter = ',', value_name = "PORT")]
    pub bypass_ports: Vec<String>,

    /// Where the nodes mount cgroup v2 (/sys/fs/cgroup/unified on hybrid
    /// hosts).
    #[arg(long, default_value = "/sys/fs/cgroup", value_name = "PATH")]
    pub host_cgroup_root: String,

    /// Run the agents in the host's PID namespace (with CAP_SYS_PTRACE): a
    /// pod's netns is reached through its sandbox's process as soon as it
    /// starts. `false`: no hostPID, no CAP_SYS_PTRACE; pods' netns are
    /// found among the container runtime's (/var/run/netns, read-only) by
    /// their address, so a pod is served only once the API has its
    /// address (its connections are refused until then).
    #[arg(long, default_value = "true", value_name = "BOOL")]
    pub host_pid: String,

    /// Trust anchors (PEM bundle) of an issuer of your own. Give it with
    /// the issuer's certificate and key — they are then printed (as the
    /// Secret nodemesh-identity-issuer: its key in this output) — or give
    /// none of the three: the identity service makes a trust anchor and an
    /// issuer in the cluster at its first start, and the key is never
    /// printed.
    #[arg(long, value_name = "PATH", requires_all = ["identity_issuer_certificate_file", "identity_issuer_key_file"])]
    pub identity_trust_anchors_file: Option<std::path::PathBuf>,

    /// The issuer certificate (PEM), signed by one of the trust anchors.
    #[arg(long, value_name = "PATH", requires_all = ["identity_trust_anchors_file", "identity_issuer_key_file"])]
    pub identity_issuer_certificate_file: Option<std::path::PathBuf>,

    /// The issuer's private key (PEM).
    #[arg(long, value_name = "PATH", requires_all = ["identity_trust_anchors_file", "identity_issuer_certificate_file"])]
    pub identity_issuer_key_file: Option<std::path::PathBuf>,

    /// How long workload certificates are valid (renewed at half-life).
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    pub identity_cert_lifetime: String,

    /// Lifetime of an issuer the identity service makes (its trust anchor
    /// gets ten times as long).
    #[arg(long, default_value = "8760h", value_name = "DURATION")]
    pub identity_issuer_lifetime: String,
}

impl Default for InstallArgs {
    /// What `nodemesh install` with no flags renders.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            install: InstallArgs,
        }
        <Cli as clap::Parser>::try_parse_from(["nodemesh"])
            .map(|c| c.install)
            .expect("the flags' defaults parse")
    }
}

/// JSON string quoting is valid YAML double-quoted scalar syntax.
pub(super) fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Fills in the template; every problem with the flags is reported at once.
pub fn render(a: &InstallArgs) -> Result<String, ConfigErrors> {
    let mut problems = Vec::new();
    if !is_dns_label(&a.namespace) {
        problems.push(format!(
            "--namespace {:?}: not a namespace name (a DNS label)",
            a.namespace
        ));
    }
    if a.image.is_empty() || a.image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        problems.push(format!("--image {:?}: not an image reference", a.image));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&a.agent_log_level) {
        problems.push(format!("--agent-log-level {:?}: {e}", a.agent_log_level));
    }
    if !is_dns_subdomain(&a.trust_domain) {
        problems.push(format!(
            "--trust-domain {:?}: not a DNS name",
            a.trust_domain
        ));
    }
    let host_pid = match a.host_pid.to_ascii_lowercase().as_str() {
        "true" => true,
        "false" => false,
        _ => {
            problems.push(format!("--host-pid {:?}: true or false", a.host_pid));
            true
        }
    };
    let fast_path = match a.fast_path.to_ascii_lowercase().as_str() {
        "true" | "false" => a.fast_path.to_ascii_lowercase(),
        _ => {
            problems.push(format!("--fast-path {:?}: true or false", a.fast_path));
            String::new()
        }
    };
    if let Err(why) = InboundPolicy::parse(&a.default_inbound_policy) {
        problems.push(format!(
            "--default-inbound-policy {:?}: {why}",
            a.default_inbound_policy
        ));
    }
    if let Err(why) = InboundPolicy::parse(&a.min_inbound_policy) {
        problems.push(format!(
            "--min-inbound-policy {:?}: {why}",
            a.min_inbound_policy
        ));
    }
    for c in a.service_cidrs.iter().filter(|c| !c.is_empty()) {
        if let Err(why) = nodemesh_core::config::parse_ip_cidr(c) {
            problems.push(format!("--service-cidr {c:?}: {why}"));
        }
    }
    let mut pod_cidrs = Vec::new();
    for c in a.pod_cidrs.iter().filter(|c| !c.is_empty()) {
        match nodemesh_core::config::parse_ip_cidr(c) {
            Ok(cidr) if cidr.len == 0 => problems.push(format!(
                "--pod-cidr {c:?}: the whole address space (nothing would reach the identity service)"
            )),
            Ok(cidr) if matches!(cidr.addr, std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) => {
                problems.push(format!(
                    "--pod-cidr {c:?}: an IPv4-mapped range; give the IPv4 network"
                ))
            }
            Ok(cidr) => pod_cidrs.push(cidr),
            Err(why) => problems.push(format!("--pod-cidr {c:?}: {why}")),
        }
    }
    for c in a.bypass_cidrs.iter().filter(|c| !c.is_empty()) {
        if let Err(why) = parse_cidr(c) {
            problems.push(format!("--bypass-cidr {c:?}: {why}"));
        }
    }
    for p in a.bypass_ports.iter().filter(|p| !p.is_empty()) {
        if !matches!(p.parse::<u16>(), Ok(n) if n > 0) {
            problems.push(format!("--bypass-port {p:?}: not a port"));
        }
    }
    if !a.host_cgroup_root.starts_with('/') || a.host_cgroup_root.chars().any(char::is_control) {
        problems.push(format!(
            "--host-cgroup-root {:?}: not an absolute path",
            a.host_cgroup_root
        ));
    }
    let pki = if problems.is_empty() {
        identity_pki(a, &mut problems)
    } else {
        None
    };
    let (true, Some(pki)) = (problems.is_empty(), pki) else {
        return Err(ConfigErrors(problems));
    };
    // Given files: their objects, and the aggregated API's caBundle now;
    // else the identity service makes both and sets it.
    let identity_pki = match &pki {
        Some(pki) => PKI_DOCUMENTS
            .replace("{{trust_anchors}}", &quoted(&pki.trust_anchors))
            .replace("{{issuer_cert}}", &quoted(&pki.issuer_cert))
            .replace("{{issuer_key}}", &quoted(&pki.issuer_key)),
        None => String::new(),
    };
    let ca_bundle = match &pki {
        Some(pki) => format!(
            "  caBundle: {}\n",
            base64::engine::general_purpose::STANDARD.encode(pki.trust_anchors.as_bytes())
        ),
        None => String::new(),
    };
    let identity_network_policy = identity_network_policy(&pod_cidrs);
    let join = |v: &[String]| {
        v.iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(",")
    };
    // The namespace and version are validated identifiers, used inside other
    // names; everything else is a quoted scalar.
    // Without the host's PID namespace: no SYS_PTRACE, the runtime's
    // netns read-only instead.
    let (capabilities, ptrace_comment, netns_env, netns_mount, netns_volume) = if host_pid {
        (
            "BPF, NET_ADMIN, SYS_ADMIN, SYS_PTRACE",
            "              # SYS_PTRACE: open /proc/<pid>/ns/net of a pod's sandbox\n              #   process (of another user: the pause image's).\n",
            "",
            "",
            "",
        )
    } else {
        (
            "BPF, NET_ADMIN, SYS_ADMIN",
            "",
            "            - name: NODEMESH_NETNS_DIR\n              value: /host/run/netns\n",
            "            # The runtime's pod network namespaces, found by address.\n            - name: netns\n              mountPath: /host/run/netns\n              readOnly: true\n              mountPropagation: HostToContainer\n",
            "        - name: netns\n          hostPath:\n            path: /var/run/netns\n            type: DirectoryOrCreate\n",
        )
    };
    let out = TEMPLATE
        .replace("{{host_pid}}", if host_pid { "true" } else { "false" })
        .replace("{{capabilities}}", capabilities)
        .replace("{{ptrace_comment}}", ptrace_comment)
        .replace("{{netns_env}}", netns_env)
        .replace("{{netns_mount}}", netns_mount)
        .replace("{{netns_volume}}", netns_volume)
        .replace("{{identity_pki}}", &identity_pki)
        .replace("{{ca_bundle}}", &ca_bundle)
        .replace("{{identity_network_policy}}", &identity_network_policy)
        .replace("{{namespace}}", &a.namespace)
        .replace("{{version}}", env!("CARGO_PKG_VERSION"))
        .replace("{{image}}", &quoted(&a.image))
        .replace("{{log_level}}", &quoted(&a.agent_log_level))
        .replace("{{trust_domain}}", &quoted(&a.trust_domain))
        .replace("{{fast_path}}", &quoted(&fast_path))
        .replace(
            "{{default_inbound_policy}}",
            &quoted(&a.default_inbound_policy),
        )
        .replace("{{min_inbound_policy}}", &quoted(&a.min_inbound_policy))
        .replace("{{service_cidrs}}", &quoted(&join(&a.service_cidrs)))
        .replace("{{bypass_cidrs}}", &quoted(&join(&a.bypass_cidrs)))
        .replace("{{bypass_ports}}", &quoted(&join(&a.bypass_ports)))
        .replace("{{host_cgroup_root}}", &quoted(&a.host_cgroup_root))
        .replace("{{cert_lifetime}}", &quoted(&a.identity_cert_lifetime))
        .replace("{{issuer_lifetime}}", &quoted(&a.identity_issuer_lifetime));
    Ok(out)
}

/// The YAML documents of a multi-document text.
pub fn documents(text: &str) -> Vec<&str> {
    text.split("\n---\n")
        .map(str::trim)
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The object of `kind` (named `name`, if given) in rendered
    /// manifests.
    pub(in crate::install) fn object(
        out: &str,
        kind: &str,
        name: Option<&str>,
    ) -> Option<serde_norway::Value> {
        documents(out)
            .iter()
            .map(|d| serde_norway::from_str::<serde_norway::Value>(d).expect("YAML"))
            .find(|v| {
                v["kind"].as_str() == Some(kind)
                    && name.is_none_or(|n| v["metadata"]["name"].as_str() == Some(n))
            })
    }

    #[test]
    fn every_placeholder_is_filled_and_every_document_parses() {
        let out = render(&InstallArgs::default()).expect("renders");
        assert!(!out.contains("{{"), "placeholder left:\n{out}");
        let kinds: Vec<String> = documents(&out)
            .iter()
            .map(|d| {
                let v: serde_norway::Value = serde_norway::from_str(d).expect("YAML");
                v["kind"].as_str().expect("a kind").to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "CustomResourceDefinition",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "ConfigMap",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "Service",
                "Deployment",
                "RoleBinding",
                "APIService",
                "ClusterRole",
                "ClusterRole",
                "DaemonSet"
            ]
        );
        // No key in the output: the identity service makes the PKI (and
        // sets the aggregated API's caBundle) in the cluster.
        assert!(!out.contains("PRIVATE KEY"), "{out}");
        assert!(!out.contains("caBundle: "), "{out}");
        assert!(out.contains("NODEMESH_ISSUER_SECRET"));
        assert!(out.contains("name: nodemesh-nodemesh-agent"));
        // Both pods say where their metrics are.
        for doc in documents(&out) {
            let v: serde_norway::Value = serde_norway::from_str(doc).unwrap();
            if matches!(v["kind"].as_str(), Some("DaemonSet" | "Deployment")) {
                let a = &v["spec"]["template"]["metadata"]["annotations"];
                assert_eq!(a["prometheus.io/scrape"].as_str(), Some("true"), "{doc}");
                assert!(a["prometheus.io/port"].as_str().is_some(), "{doc}");
            }
        }
    }

    #[test]
    fn without_host_pid_the_agent_has_no_ptrace_and_reads_the_runtimes_netns() {
        let daemonset = |out: &str| object(out, "DaemonSet", None).expect("the DaemonSet");
        let spec = |ds: &serde_norway::Value| ds["spec"]["template"]["spec"].clone();
        let caps = |ds: &serde_norway::Value| {
            spec(ds)["containers"][0]["securityContext"]["capabilities"]["add"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        let with = daemonset(&render(&InstallArgs::default()).unwrap());
        assert_eq!(spec(&with)["hostPID"].as_bool(), Some(true));
        assert!(caps(&with).contains(&"SYS_PTRACE".to_owned()));
        let mut args = InstallArgs {
            host_pid: "false".into(),
            ..InstallArgs::default()
        };
        let without = daemonset(&render(&args).unwrap());
        assert_eq!(spec(&without)["hostPID"].as_bool(), Some(false));
        assert_eq!(caps(&without), ["BPF", "NET_ADMIN", "SYS_ADMIN"]);
        let container = &spec(&without)["containers"][0];
        assert!(
            container["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|e| e["name"].as_str() == Some("NODEMESH_NETNS_DIR")),
            "{container:?}"
        );
        let mount = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"].as_str() == Some("netns"))
            .expect("the netns mount")
            .clone();
        assert_eq!(mount["readOnly"].as_bool(), Some(true));
        assert_eq!(mount["mountPropagation"].as_str(), Some("HostToContainer"));
        args.host_pid = "maybe".into();
        assert!(
            render(&args)
                .unwrap_err()
                .to_string()
                .contains("--host-pid")
        );
    }

    #[test]
    fn values_are_quoted_and_checked() {
        let mut args = InstallArgs {
            image: "registry.example/nm:1 # oops".into(),
            ..InstallArgs::default()
        };
        args.namespace = "Bad_NS".into();
        args.bypass_cidrs = vec!["10.0.0.0/99".into()];
        args.default_inbound_policy = "allow".into();
        let err = render(&args).unwrap_err();
        assert_eq!(err.0.len(), 4, "{err}");
        assert!(
            err.to_string().contains("--default-inbound-policy"),
            "{err}"
        );
        let mut args = InstallArgs::default();
        assert!(
            render(&args)
                .expect("renders")
                .contains(r#"NODEMESH_DEFAULT_INBOUND_POLICY: "all-unauthenticated""#)
        );
        args.default_inbound_policy = "all-authenticated".into();
        args.agent_log_level = "info,nodemesh=debug".into();
        args.bypass_ports = vec!["22".into(), "53".into()];
        let out = render(&args).expect("renders");
        assert!(
            out.contains(r#"NODEMESH_LOG: "info,nodemesh=debug""#),
            "{out}"
        );
        assert!(out.contains(r#"NODEMESH_BYPASS_PORTS: "22,53""#), "{out}");
        assert!(
            out.contains(r#"NODEMESH_DEFAULT_INBOUND_POLICY: "all-authenticated""#),
            "{out}"
        );
    }
}
