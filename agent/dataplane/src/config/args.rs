//! The flags of `nodemesh agent`, as given (each also read from a
//! `NODEMESH_*` environment variable); checked by [`super::AgentConfig`].
use std::path::PathBuf;

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

    /// Find pods' network namespaces among the container runtime's (the
    /// files in this directory, e.g. /var/run/netns), by the pod's address,
    /// instead of through a process of the pod in /proc: the agent then
    /// needs neither the host's PID namespace nor CAP_SYS_PTRACE, and a pod
    /// is served once the API has its address (refused until then).
    #[arg(long, env = "NODEMESH_NETNS_DIR", value_name = "PATH")]
    pub netns_dir: Option<PathBuf>,

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
    /// (true), or through the loopback TCP/IP stack (false, the default).
    /// On, blocking apps can see spurious EAGAIN and bulk senders ENOMEM
    /// (kernel sockmap limits: docs/datapath.md); only for event-loop apps
    /// doing small request/response exchanges.
    #[arg(
        long,
        env = "NODEMESH_FAST_PATH",
        default_value = "false",
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

    /// The cluster's Service network (CIDR, IPv4 or IPv6; repeat or
    /// separate with commas): a connection to an address there that is not
    /// a Service port the agent knows (a brand-new Service, or before the
    /// first list) is refused rather than sent, unmeshed, to kube-proxy.
    #[arg(
        long = "service-cidr",
        env = "NODEMESH_SERVICE_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub service_cidrs: Vec<String>,

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

    /// How long an outbound connection may stay silent both ways before
    /// it is relayed as bytes (the destination is dialled meanwhile, so a
    /// server that speaks first never waits for it).
    #[arg(
        long,
        env = "NODEMESH_DETECT_TIMEOUT",
        default_value = "1s",
        value_name = "DURATION"
    )]
    pub detect_timeout: String,

    /// Who may connect to a meshed pod whose annotations (and namespace's)
    /// do not say: all-unauthenticated (mutual TLS where the client is
    /// meshed, plaintext from the others), all-authenticated (meshed
    /// clients only), cluster-unauthenticated (plaintext only from the
    /// cluster's pods and nodes), or deny.
    #[arg(
        long,
        env = "NODEMESH_DEFAULT_INBOUND_POLICY",
        default_value = "all-unauthenticated",
        value_name = "POLICY"
    )]
    pub default_inbound_policy: String,

    /// The floor under every pod's and namespace's inbound policy: a
    /// connection must pass both it and theirs (annotations can only
    /// tighten), and above all-unauthenticated no pod's
    /// `config.nodemesh.io/skip-inbound-ports` is honoured.
    #[arg(
        long,
        env = "NODEMESH_MIN_INBOUND_POLICY",
        default_value = "all-unauthenticated",
        value_name = "POLICY"
    )]
    pub min_inbound_policy: String,

    /// On SIGTERM/SIGINT: how long open connections may take to finish.
    #[arg(
        long,
        env = "NODEMESH_SHUTDOWN_GRACE",
        default_value = "30s",
        value_name = "DURATION"
    )]
    pub shutdown_grace: String,

    /// Relay buffer per direction per connection, in bytes, taken only
    /// while data moves (an idle connection holds none; a connection starts
    /// with a small one). Larger buffers move bulk data faster; how many
    /// are held at once is bounded by the memory limit (see docs/limits.md).
    #[arg(
        long,
        env = "NODEMESH_BUFFER_SIZE",
        default_value = "131072",
        value_name = "BYTES"
    )]
    pub buffer_size: String,

    /// Connections open through the proxy at once on this node, every door
    /// together: split evenly among the served pods (each at least 16, or
    /// its config.nodemesh.io/max-connections annotation); a pod over its
    /// share has its own new connections reset. `auto`: derived from the
    /// agent's cgroup memory limit (20000 without one).
    #[arg(
        long,
        env = "NODEMESH_MAX_CONNECTIONS",
        default_value = "auto",
        value_name = "N|auto"
    )]
    pub max_connections: String,

    /// HTTP requests in flight through the proxy at once on this node,
    /// split among the pods like connections (a pod over its share gets
    /// 503s). `auto`: as many as connections.
    #[arg(
        long,
        env = "NODEMESH_MAX_REQUESTS",
        default_value = "auto",
        value_name = "N|auto"
    )]
    pub max_requests: String,

    /// How long an opaque (non-HTTP) connection may stay silent both ways
    /// before the proxy closes it (a pod's config.nodemesh.io/idle-timeout
    /// annotation sets its own).
    #[arg(
        long,
        env = "NODEMESH_IDLE_TIMEOUT",
        default_value = "1h",
        value_name = "DURATION"
    )]
    pub idle_timeout: String,

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

    /// Where the mutual-TLS tunnel listens for other nodes (with identity):
    /// one or more addresses on one port, comma-separated. `[::]` takes
    /// IPv4 and IPv6 (IPv4 only where the node has no IPv6).
    #[arg(
        long,
        env = "NODEMESH_TUNNEL_ADDR",
        default_value = "[::]:15008",
        value_delimiter = ',',
        value_name = "ADDR,..."
    )]
    pub tunnel_addr: Vec<String>,

    /// Where `/v1/stat` and `/v1/tap` are served over mutual TLS (with
    /// identity), to the identity service's tap client only
    /// (`spiffe://<trust domain>/nodemesh/tap`, an identity no workload
    /// certificate can carry), which serves them to users RBAC allows.
    #[arg(
        long,
        env = "NODEMESH_TAP_ADDR",
        default_value = "[::]:4190",
        value_delimiter = ',',
        value_name = "ADDR,..."
    )]
    pub tap_addr: Vec<String>,

    /// The agent's own service account (`namespace/name`): the identity of
    /// its tap port's certificate.
    #[arg(
        long,
        env = "NODEMESH_AGENT_IDENTITY",
        default_value = "nodemesh/nodemesh-agent",
        value_name = "NS/NAME"
    )]
    pub agent_identity: String,

    /// A pooled tunnel connection to another node with no new stream for
    /// this long is closed.
    #[arg(
        long,
        env = "NODEMESH_TUNNEL_IDLE_TIMEOUT",
        default_value = "60s",
        value_name = "DURATION"
    )]
    pub tunnel_idle_timeout: String,

    /// No tunnel connection takes new streams past this age (the client
    /// dials a new one; the server says GOAWAY), nor past its peer's
    /// certificate expiry; streams open on it finish.
    #[arg(
        long,
        env = "NODEMESH_TUNNEL_MAX_CONNECTION_AGE",
        default_value = "1h",
        value_name = "DURATION"
    )]
    pub tunnel_max_connection_age: String,
}
