//! The flags of `nodemesh identity`, and the configuration they make once
//! every one has been checked (all problems reported at once).
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
use nodemesh_core::{
    config::{ConfigErrors, parse_duration},
    identity::{Identity, MAX_CERT_LIFETIME, MIN_CERT_LIFETIME},
    names::is_dns_subdomain,
    pki::Signer,
};

/// Flags of `nodemesh identity`.
#[derive(Args, Clone, Debug)]
pub struct IdentityArgs {
    /// Where to serve HTTPS.
    #[arg(
        long,
        env = "NODEMESH_IDENTITY_ADDR",
        default_value = "0.0.0.0:8080",
        value_name = "ADDR"
    )]
    pub addr: String,

    /// Where to serve /metrics, /live and /ready.
    #[arg(
        long,
        env = "NODEMESH_ADMIN_ADDR",
        default_value = "0.0.0.0:9990",
        value_name = "ADDR"
    )]
    pub admin_addr: String,

    /// The issuer certificate (PEM; intermediates may follow it). With
    /// --issuer-key-file and --trust-anchors-file; or none of the three and
    /// --issuer-secret.
    #[arg(long, env = "NODEMESH_ISSUER_CERT", value_name = "PATH")]
    pub issuer_certificate_file: Option<PathBuf>,

    /// The issuer's private key (PEM).
    #[arg(long, env = "NODEMESH_ISSUER_KEY", value_name = "PATH")]
    pub issuer_key_file: Option<PathBuf>,

    /// The trust anchors (PEM bundle) the issuer must chain to.
    #[arg(long, env = "NODEMESH_TRUST_ANCHORS", value_name = "PATH")]
    pub trust_anchors_file: Option<PathBuf>,

    /// Instead of files: the issuer is this Secret of the service's own
    /// namespace (`tls.crt`, `tls.key`, `ca.crt`: the trust anchor), read
    /// through the API; if there is none, the service makes a trust anchor
    /// and an issuer and creates it (the key never leaves the cluster),
    /// with --trust-anchors-configmap for the agents.
    #[arg(long, env = "NODEMESH_ISSUER_SECRET", value_name = "NAME")]
    pub issuer_secret: Option<String>,

    /// The ConfigMap (`ca-bundle.crt`) the agents read the trust anchors
    /// from: created from the issuer's Secret when missing.
    #[arg(long, env = "NODEMESH_TRUST_ANCHORS_CONFIGMAP", value_name = "NAME")]
    pub trust_anchors_configmap: Option<String>,

    /// The APIService of the aggregated API: its `caBundle` is set to the
    /// trust anchors (what its serving certificate chains to).
    #[arg(long, env = "NODEMESH_API_SERVICE", value_name = "NAME")]
    pub api_service: Option<String>,

    /// The lifetime of an issuer the service makes itself (its trust
    /// anchor lives ten times as long).
    #[arg(
        long,
        env = "NODEMESH_ISSUER_LIFETIME",
        default_value = "8760h",
        value_name = "DURATION"
    )]
    pub issuer_lifetime: String,

    /// The SPIFFE trust domain.
    #[arg(
        long,
        env = "NODEMESH_TRUST_DOMAIN",
        default_value = "cluster.local",
        value_name = "DOMAIN"
    )]
    pub trust_domain: String,

    /// How long the workload certificates it signs are valid.
    #[arg(
        long,
        env = "NODEMESH_CERT_LIFETIME",
        default_value = "24h",
        value_name = "DURATION"
    )]
    pub cert_lifetime: String,

    /// Service accounts (`namespace/name`) whose tokens may ask for
    /// certificates: the agents'. Repeat or separate with commas.
    #[arg(
        long = "agent-service-account",
        env = "NODEMESH_AGENT_SERVICE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "nodemesh/nodemesh-agent",
        value_name = "NS/NAME"
    )]
    pub agent_service_accounts: Vec<String>,

    /// DNS names of the service's own certificate (what agents dial).
    /// Repeat or separate with commas.
    #[arg(
        long = "server-name",
        env = "NODEMESH_IDENTITY_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "nodemesh-identity.nodemesh.svc",
        value_name = "DNS"
    )]
    pub server_names: Vec<String>,

    /// Where to serve the aggregated API `tap.nodemesh.io` (HTTPS, to the
    /// API server's front proxy only): `nodemesh stat|tap|top|edges` and
    /// the dashboard read agents through it, as RBAC allows.
    #[arg(
        long,
        env = "NODEMESH_API_ADDR",
        default_value = "0.0.0.0:8443",
        value_name = "ADDR"
    )]
    pub api_addr: String,

    /// The service's own service account (`namespace/name`): its
    /// namespace is the install's, whose service accounts no agent ever
    /// gets a certificate for (but each agent its own).
    #[arg(
        long = "service-account",
        env = "NODEMESH_IDENTITY_SERVICE_ACCOUNT",
        default_value = "nodemesh/nodemesh-identity",
        value_name = "NS/NAME"
    )]
    pub service_account: String,

    /// The agents' DaemonSet, in the namespace of the first
    /// --agent-service-account: an agent's token must be bound to a pod it
    /// controls (one made by someone else with the agents' service account
    /// gets nothing signed).
    #[arg(
        long,
        env = "NODEMESH_AGENT_DAEMONSET",
        default_value = "nodemesh-agent",
        value_name = "NAME"
    )]
    pub agent_daemonset: String,

    /// The agents' pods: this label selector, in the namespace of the
    /// first --agent-service-account.
    #[arg(
        long,
        env = "NODEMESH_AGENT_SELECTOR",
        default_value = "app.kubernetes.io/name=nodemesh-agent",
        value_name = "SELECTOR"
    )]
    pub agent_selector: String,

    /// The agents' tap port.
    #[arg(
        long,
        env = "NODEMESH_AGENT_TAP_PORT",
        default_value_t = nodemesh_core::names::TAP_PORT,
        value_name = "PORT"
    )]
    pub agent_tap_port: u16,

    /// kubeconfig to reach the API server (default: in-cluster).
    #[arg(long, env = "NODEMESH_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

/// Where the issuer comes from.
#[derive(Debug)]
pub enum IssuerSource {
    /// Files, read and checked already.
    Files(Box<Signer>),
    /// A Secret of the service's namespace, made if missing (see
    /// [`crate::bootstrap`]).
    Cluster {
        secret: String,
        configmap: String,
        lifetime: Duration,
    },
}

/// A validated configuration.
#[derive(Debug)]
pub struct IdentityConfig {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Taken when the service starts.
    pub issuer: Option<IssuerSource>,
    pub trust_domain: String,
    /// The APIService whose `caBundle` the service keeps.
    pub api_service: Option<String>,
    pub cert_lifetime: Duration,
    pub agent_service_accounts: Vec<String>,
    pub server_names: Vec<String>,
    pub kubeconfig: Option<PathBuf>,
    pub api_addr: SocketAddr,
    /// The service's own identity.
    pub identity: Identity,
    /// The agents' identities (their tap ports present one of these).
    pub agent_identities: Vec<Identity>,
    /// Where the agents' pods are, how they are labelled, and the
    /// DaemonSet that must control them.
    pub agent_namespace: String,
    pub agent_selector: String,
    pub agent_daemonset: String,
    pub agent_tap_port: u16,
}

impl IdentityConfig {
    /// The install's namespaces (the service's own and the agents'): their
    /// service accounts are never a workload's identity.
    pub fn reserved_namespaces(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.identity.namespace.as_str())
            .chain(self.agent_identities.iter().map(|i| i.namespace.as_str()))
    }
}

impl TryFrom<&IdentityArgs> for IdentityConfig {
    type Error = ConfigErrors;

    fn try_from(a: &IdentityArgs) -> Result<Self, ConfigErrors> {
        let mut problems = Vec::new();
        let addr = a
            .addr
            .parse()
            .map_err(|e| problems.push(format!("--addr {:?}: {e}", a.addr)))
            .ok();
        let admin_addr = a
            .admin_addr
            .parse()
            .map_err(|e| problems.push(format!("--admin-addr {:?}: {e}", a.admin_addr)))
            .ok();
        let cert_lifetime = match parse_duration(&a.cert_lifetime) {
            Ok(d) if (MIN_CERT_LIFETIME..=MAX_CERT_LIFETIME).contains(&d) => Some(d),
            Ok(_) => {
                problems.push(format!(
                    "--cert-lifetime {:?}: must be between 10s and 7d",
                    a.cert_lifetime
                ));
                None
            }
            Err(why) => {
                problems.push(format!("--cert-lifetime {:?}: {why}", a.cert_lifetime));
                None
            }
        };
        let mut agent_identities = Vec::new();
        for sa in &a.agent_service_accounts {
            match sa.split_once('/').map(|(ns, name)| Identity::new(ns, name)) {
                Some(Ok(id)) => agent_identities.push(id),
                _ => problems.push(format!(
                    "--agent-service-account {sa:?}: expected namespace/name"
                )),
            }
        }
        if a.agent_service_accounts.is_empty() {
            problems.push("--agent-service-account: at least one".into());
        }
        let identity = match a
            .service_account
            .split_once('/')
            .map(|(ns, name)| Identity::new(ns, name))
        {
            Some(Ok(id)) => Some(id),
            _ => {
                problems.push(format!(
                    "--service-account {:?}: expected namespace/name",
                    a.service_account
                ));
                None
            }
        };
        let api_addr = a
            .api_addr
            .parse()
            .map_err(|e| problems.push(format!("--api-addr {:?}: {e}", a.api_addr)))
            .ok();
        if a.agent_selector.trim().is_empty() {
            problems.push("--agent-selector: empty".into());
        }
        if !is_dns_subdomain(&a.agent_daemonset) {
            problems.push(format!(
                "--agent-daemonset {:?}: not a DaemonSet name",
                a.agent_daemonset
            ));
        }
        if a.agent_tap_port == 0 {
            problems.push("--agent-tap-port 0: not a port".into());
        }
        for name in &a.server_names {
            if !is_dns_subdomain(name) {
                problems.push(format!("--server-name {name:?}: not a DNS name"));
            }
        }
        if !is_dns_subdomain(&a.trust_domain) {
            problems.push(format!(
                "--trust-domain {:?}: not a DNS name",
                a.trust_domain
            ));
        }
        let issuer = issuer_source(a, &mut problems);
        for (flag, name) in [
            ("issuer-secret", &a.issuer_secret),
            ("trust-anchors-configmap", &a.trust_anchors_configmap),
            ("api-service", &a.api_service),
        ] {
            if let Some(n) = name
                && !is_dns_subdomain(n)
            {
                problems.push(format!("--{flag} {n:?}: not an object name"));
            }
        }
        match (addr, admin_addr, cert_lifetime, issuer, api_addr, identity) {
            (
                Some(addr),
                Some(admin_addr),
                Some(cert_lifetime),
                Some(issuer),
                Some(api_addr),
                Some(identity),
            ) if problems.is_empty() => Ok(Self {
                addr,
                admin_addr,
                issuer: Some(issuer),
                trust_domain: a.trust_domain.clone(),
                api_service: a.api_service.clone(),
                cert_lifetime,
                agent_service_accounts: a
                    .agent_service_accounts
                    .iter()
                    .map(|sa| {
                        let (ns, name) = sa.split_once('/').unwrap_or_default();
                        format!("system:serviceaccount:{ns}:{name}")
                    })
                    .collect(),
                server_names: a.server_names.clone(),
                kubeconfig: a.kubeconfig.clone(),
                api_addr,
                identity,
                agent_namespace: agent_identities
                    .first()
                    .map(|id| id.namespace.clone())
                    .unwrap_or_default(),
                agent_identities,
                agent_selector: a.agent_selector.clone(),
                agent_daemonset: a.agent_daemonset.clone(),
                agent_tap_port: a.agent_tap_port,
            }),
            _ => Err(ConfigErrors(problems)),
        }
    }
}

/// The issuer's files (all three, read and checked), or its Secret and
/// the agents' ConfigMap (both named).
fn issuer_source(a: &IdentityArgs, problems: &mut Vec<String>) -> Option<IssuerSource> {
    let files = (
        &a.issuer_certificate_file,
        &a.issuer_key_file,
        &a.trust_anchors_file,
    );
    match (files, &a.issuer_secret, &a.trust_anchors_configmap) {
        ((Some(cert), Some(key), Some(anchors)), None, None) => {
            let mut read = |flag: &str, path: &PathBuf| match std::fs::read_to_string(path) {
                Ok(text) => Some(text),
                Err(e) => {
                    problems.push(format!("--{flag} {}: {e}", path.display()));
                    None
                }
            };
            let (cert, key, anchors) = (
                read("issuer-certificate-file", cert),
                read("issuer-key-file", key),
                read("trust-anchors-file", anchors),
            );
            match Signer::load(&cert?, &key?, &anchors?, &a.trust_domain) {
                Ok(s) => Some(IssuerSource::Files(Box::new(s))),
                Err(e) => {
                    problems.push(format!("issuer: {e}"));
                    None
                }
            }
        }
        ((None, None, None), Some(secret), Some(configmap)) => {
            match parse_duration(&a.issuer_lifetime) {
                Ok(lifetime) if lifetime >= Duration::from_secs(3600) => {
                    Some(IssuerSource::Cluster {
                        secret: secret.clone(),
                        configmap: configmap.clone(),
                        lifetime,
                    })
                }
                Ok(_) => {
                    problems.push(format!(
                        "--issuer-lifetime {:?}: at least 1h",
                        a.issuer_lifetime
                    ));
                    None
                }
                Err(why) => {
                    problems.push(format!("--issuer-lifetime {:?}: {why}", a.issuer_lifetime));
                    None
                }
            }
        }
        _ => {
            problems.push(
                "the issuer: --issuer-certificate-file, --issuer-key-file and --trust-anchors-file together, or --issuer-secret with --trust-anchors-configmap".into(),
            );
            None
        }
    }
}
