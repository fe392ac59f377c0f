//! `nodemesh agent`: builds the parts from the configuration, in the order
//! that keeps the node safe, and runs them until SIGTERM/SIGINT.
//!
//! Start-up: eBPF first (pods captured by an earlier agent keep being
//! redirected), then everything that binds (admin, tunnel; a taken port
//! fails the start with a clear error), then discovery, certificates,
//! capture. [`App::build`] returns what it bound ([`Bound`]).
//!
//! Shutdown: stop accepting, let open connections finish within the grace
//! period, leave eBPF in place for the next agent unless asked to clean up
//! (or uninstalled).
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use nodemesh_core::{
    admin::{AdminError, AdminServer, AdminState, Ready},
    kube::{self as kube_client, KubeError},
    labels::PREFIX,
    listen::{CapsConfig, Guard},
};
use prometheus_client::registry::Registry;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    admin::{AgentRoutes, NOT_READY, NodeFacts},
    capture::{CaptureConfig, CaptureMetrics, Captures},
    cgroup::{self, CgroupDir, CgroupError},
    config::{AgentConfig, PodSourceConfig},
    discovery::{
        NoEvents, PodEvents, SourceMetrics,
        file::FileSource,
        kube::{KubeSource, events::KubeEvents},
    },
    identity::{
        CertStore,
        client::{IdentityClient, IdentityClientConfig, IdentityClientError, ServiceAddrs, roots},
    },
    memory::{self, Budgets},
    netns,
    proxy::{
        Admission, AdmissionConfig, Drain, NetnsConnector, Proxy, ProxyConfig, ProxyInputs,
        ProxyMetrics, inbound::InboundConfig, tunnel,
    },
    redirect::{EbpfLogger, Redirect, RedirectConfig, RedirectError},
    state::StateStore,
    tapport::{self, TapPort},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Cgroup(#[from] CgroupError),
    #[error("{0}")]
    Redirect(#[from] RedirectError),
    #[error("{0}")]
    Admin(#[from] AdminError),
    #[error("cannot open the agent's own network namespace: {0}")]
    Netns(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("internal: {0}")]
    Internal(&'static str),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Kube(#[from] KubeError),
    #[error("identity: {0}")]
    Identity(#[from] IdentityClientError),
    #[error("tunnel TLS settings: {0}")]
    TunnelTls(#[from] rustls::Error),
    #[error("cannot listen on {addr} for the tunnel: {source}; is another agent running?")]
    TunnelBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for the tap port: {source}; is another agent running?")]
    TapBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Service addresses from the Kubernetes API (for the identity service's
/// name, with no need for cluster DNS on the host network).
struct ApiServices(kube::Client);

impl ServiceAddrs for ApiServices {
    fn cluster_ip<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Option<std::net::IpAddr>> {
        Box::pin(async move {
            let api: kube::Api<k8s_openapi::api::core::v1::Service> =
                kube::Api::namespaced(self.0.clone(), namespace);
            match api.get_opt(name).await {
                Ok(svc) => svc
                    .and_then(|s| s.spec?.cluster_ip)
                    .and_then(|ip| ip.parse().ok()),
                Err(e) => {
                    warn!(service = %format!("{namespace}/{name}"), error = %e, "cannot look the Service up in the API; trying DNS");
                    None
                }
            }
        })
    }
}

/// What the agent bound.
#[derive(Clone, Debug)]
pub struct Bound {
    /// The admin server (`/metrics`, `/live`, `/ready`).
    pub admin: SocketAddr,
    /// The tunnel between nodes, with workload identity (none without).
    pub tunnel: Vec<SocketAddr>,
    /// The tap port (with identity).
    pub tap: Vec<SocketAddr>,
}

/// A built agent, not running yet.
pub struct App {
    cfg: AgentConfig,
    bound: Bound,
    redirect: Arc<Redirect>,
    logger: EbpfLogger,
    admin: AdminServer,
    state: StateStore,
    certs: Option<Arc<CertStore>>,
    proxy: Arc<Proxy>,
    tunnel: Vec<TcpListener>,
    tap_port: Option<(TapPort, Vec<TcpListener>)>,
    captures: Captures,
    ready: Ready,
    source: Source,
}

/// Where discovery comes from, ready to run.
enum Source {
    File(FileSource),
    Kube {
        source: KubeSource,
        /// The agent's own DaemonSet (namespace, name): gone at stop means
        /// uninstall.
        daemonset: Option<(String, String)>,
    },
}

impl App {
    /// Loads eBPF, binds, and wires every part. Nothing runs until
    /// [`App::run`].
    pub async fn build(
        cfg: AgentConfig,
        budgets: Budgets,
        ebpf_log_level: u8,
    ) -> Result<Self, AgentError> {
        netns::init().map_err(AgentError::Netns)?;
        let mount = cgroup::find_cgroup2_mount()?;
        let root_path = cfg.cgroup_root.clone().unwrap_or_else(|| mount.clone());
        let cgroup_root = match CgroupDir::open(&root_path) {
            // A hybrid host's /sys/fs/cgroup (v1 controllers on a tmpfs)
            // given as the root: its v2 hierarchy is `unified` below it.
            Err(CgroupError::NotCgroup2 { .. })
                if CgroupDir::open(&root_path.join("unified")).is_ok() =>
            {
                let unified = root_path.join("unified");
                info!(given = %root_path.display(), using = %unified.display(), "the cgroup root is a hybrid layout's v1 mount; using its cgroup v2 hierarchy");
                CgroupDir::open(&unified)?
            }
            other => other?,
        };
        let own = cgroup::own_cgroup()?;
        info!(cgroup_root = %cgroup_root.path().display(), agent_cgroup = %own.path().display(), "cgroups found");
        let cgroup_path = cgroup_root.path().to_owned();

        let (redirect, logger) = Redirect::install(&RedirectConfig {
            pin_dir: cfg.bpffs.clone(),
            cgroup_root: cgroup_root.path().to_owned(),
            outbound_port: cfg.outbound_port,
            fast_path: cfg.fast_path,
            bypass_nets: cfg.bypass_nets.clone(),
            bypass_ports: cfg.bypass_ports.clone(),
            agent_cgroup: own.id(),
            log_level: ebpf_log_level,
        })?;
        let redirect = Arc::new(redirect);

        let node = match &cfg.source {
            PodSourceConfig::Kube { node_name, .. } => node_name.clone(),
            // A pod file describes this node only.
            PodSourceConfig::File { .. } => "local".to_owned(),
        };
        let state = StateStore::new(&node, &cfg.trust_domain);
        state.set_service_cidrs(cfg.service_cidrs.clone());
        let mut registry = Registry::with_prefix(PREFIX);
        let source_metrics = SourceMetrics::new(&mut registry);

        let kube = match &cfg.source {
            PodSourceConfig::Kube { kubeconfig, .. } => {
                Some(kube_client::client(kubeconfig.as_deref()).await?)
            }
            PodSourceConfig::File { .. } => None,
        };
        let proxy_metrics = ProxyMetrics::new(&mut registry);
        let admin_guard = Guard::new("admin", CapsConfig::SMALL, proxy_metrics.listeners.clone());
        let tap_guard = Guard::new("tap", CapsConfig::SMALL, proxy_metrics.listeners.clone());
        let admission = Admission::new(AdmissionConfig {
            max_connections: budgets.connections,
            max_requests: budgets.requests,
        });
        admission.register(&mut registry);
        let tls_metrics = proxy_metrics.tunnel.tls.clone();
        // Workload identity: certificates, and with them the tunnel.
        let certs = match &cfg.identity {
            Some(id) => {
                let mut client = IdentityClient::new(IdentityClientConfig {
                    addr: id.addr.clone(),
                    server_name: id.server_name.clone(),
                    trust_anchors_pem: id.trust_anchors_pem.clone(),
                    token_file: id.token_file.clone(),
                    trust_domain: cfg.trust_domain.clone(),
                    timeout: Duration::from_secs(10),
                })?;
                if let Some(kube) = &kube {
                    client = client.with_services(Arc::new(ApiServices(kube.clone())));
                }
                let client = client.with_tls_metrics(tls_metrics.clone());
                Some(Arc::new(CertStore::new(
                    Arc::new(client),
                    roots(&id.trust_anchors_pem)?,
                    &cfg.trust_domain,
                    &mut registry,
                )))
            }
            None => None,
        };
        let tunnel_cfg = tunnel::TunnelConfig {
            port: cfg
                .identity
                .as_ref()
                .and_then(|id| id.tunnel_addrs.first())
                .map_or(nodemesh_core::names::TUNNEL_PORT, SocketAddr::port),
            connect_timeout: cfg.connect_timeout,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: cfg
                .identity
                .as_ref()
                .map_or(Duration::from_secs(60), |id| id.tunnel_idle_timeout),
            max_connection_age: cfg
                .identity
                .as_ref()
                .map_or(Duration::from_secs(3600), |id| id.tunnel_max_connection_age),
        };
        let tunnel = match &cfg.identity {
            Some(id) => tunnel::server::bind(&id.tunnel_addrs)
                .map_err(|(addr, source)| AgentError::TunnelBind { addr, source })?,
            None => Vec::new(),
        };
        let tap_listeners = match &cfg.identity {
            Some(id) => tunnel::server::bind(&id.tap_addrs)
                .map_err(|(addr, source)| AgentError::TapBind { addr, source })?,
            None => Vec::new(),
        };
        if let (Some(store), Some(id)) = (&certs, &cfg.identity) {
            store.pin(id.agent_identity.clone());
        }
        let proxy = Arc::new(Proxy::new(ProxyInputs {
            cfg: ProxyConfig {
                buffer_size: cfg.buffer_size,
                buffer_budget: budgets.buffer_bytes,
                idle_timeout: cfg.idle_timeout,
                tunnel: tunnel_cfg,
                detect_timeout: cfg.detect_timeout,
                inbound: InboundConfig {
                    default_policy: cfg.default_inbound_policy,
                    floor: cfg.min_inbound_policy,
                    cgroup_root: Some(cgroup_path.clone()),
                    connect_timeout: cfg.connect_timeout,
                    // The proxy's own.
                    detect_timeout: Duration::ZERO,
                },
            },
            state: state.clone(),
            certs: certs.clone(),
            metrics: proxy_metrics,
            connector: Arc::new(NetnsConnector {
                timeout: cfg.connect_timeout,
            }),
            orig_dst: redirect.clone(),
            clients: Some(redirect.clone()),
            drain: Drain::default(),
            admission: admission.clone(),
        })?);
        let source = match &cfg.source {
            PodSourceConfig::File { path, interval } => Source::File(FileSource {
                path: path.clone(),
                interval: *interval,
                metrics: source_metrics,
                state: state.clone(),
            }),
            PodSourceConfig::Kube { daemonset, .. } => Source::Kube {
                source: KubeSource {
                    client: kube
                        .clone()
                        .ok_or(AgentError::Internal("no Kubernetes client"))?,
                    metrics: source_metrics,
                    state: state.clone(),
                },
                daemonset: daemonset.clone(),
            },
        };
        let events: Arc<dyn PodEvents> = match &source {
            Source::Kube { source, .. } => Arc::new(KubeEvents {
                client: source.client.clone(),
                node: node.clone(),
            }),
            Source::File(_) => Arc::new(NoEvents),
        };
        let capture_metrics =
            CaptureMetrics::new(&mut registry, redirect.clone(), proxy.pods().clone());
        let captures = Captures::new(
            CaptureConfig {
                outbound_port: cfg.outbound_port,
                // Quick at first: a new pod's first connection may be
                // moments away (it is refused, not sent around, meanwhile).
                retry_min: Duration::from_millis(50),
                retry_max: Duration::from_secs(10),
                startup_grace: Duration::from_secs(5),
                startup_poll: Duration::from_millis(10),
                address_poll: Duration::from_secs(2),
                skip_ports_allowed: cfg.min_inbound_policy
                    == nodemesh_core::names::InboundPolicy::AllUnauthenticated,
                netns_dir: cfg.netns_dir.clone(),
            },
            cgroup_root,
            redirect.clone(),
            proxy.clone(),
            capture_metrics,
            events,
        );

        let ready = Ready::default();
        let routes = AgentRoutes {
            services: matches!(source, Source::Kube { .. }).then(|| state.clone()),
            stats: Some((proxy.stats().clone(), state.node())),
            tap: Some(proxy.tap().clone()),
            node: Some(NodeFacts {
                node: state.node(),
                cgroup_root: cgroup_path,
                bpffs: cfg.bpffs.clone(),
                ready: ready.clone(),
                pods: proxy.pods().clone(),
                certs: certs.clone(),
                memory_limit: budgets.limit.as_ref().map(|l| l.bytes),
                admission: admission.clone(),
            }),
        };
        let tap_port = match (&certs, &cfg.identity) {
            (Some(store), Some(id)) => Some((
                TapPort {
                    store: store.clone(),
                    me: id.agent_identity.clone(),
                    routes: routes.clone(),
                    tls: tls_metrics.clone(),
                    guard: tap_guard,
                },
                tap_listeners,
            )),
            _ => None,
        };
        let admin = AdminServer::start(
            cfg.admin_addr,
            AdminState {
                registry: Arc::new(registry),
                ready: ready.clone(),
                not_ready: NOT_READY,
                routes: Some(Arc::new(routes)),
                guard: admin_guard,
            },
        )?;
        let bound = Bound {
            admin: admin.addr,
            tunnel: tunnel.iter().filter_map(|l| l.local_addr().ok()).collect(),
            tap: tap_port
                .iter()
                .flat_map(|(_, ls)| ls.iter().filter_map(|l| l.local_addr().ok()))
                .collect(),
        };
        Ok(Self {
            cfg,
            bound,
            redirect,
            logger,
            admin,
            state,
            certs,
            proxy,
            tunnel,
            tap_port,
            captures,
            ready,
            source,
        })
    }

    pub fn bound(&self) -> &Bound {
        &self.bound
    }

    /// Runs until `until` resolves (to the reason, for the log), then shuts
    /// down.
    pub async fn run(self, until: impl Future<Output = &'static str>) -> Result<(), AgentError> {
        let Self {
            cfg,
            bound: _,
            redirect,
            logger,
            admin,
            state,
            certs,
            proxy,
            tunnel,
            tap_port,
            captures,
            ready,
            source,
        } = self;
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::redirect::logs::forward(logger, shutdown.clone()));
        let mut uninstall_check = None;
        let source_task: JoinHandle<()> = match source {
            Source::File(file) => tokio::spawn(file.run(shutdown.clone())),
            Source::Kube { source, daemonset } => {
                uninstall_check = daemonset.map(|(namespace, name)| {
                    let watch = crate::discovery::kube::UninstallWatch::default();
                    watch.spawn(&source.client, &namespace, &name, shutdown.clone());
                    (source.client.clone(), (namespace, name), watch)
                });
                tokio::spawn(source.run(shutdown.clone()))
            }
        };
        if let Some(store) = &certs {
            tokio::spawn(store.clone().run(state.clone(), shutdown.clone()));
        }
        proxy.serve_tunnel(tunnel, shutdown.clone());
        if let Some((port, listeners)) = tap_port {
            tapport::serve(port, listeners, shutdown.clone())?;
        }
        tokio::spawn(proxy.clone().tidy(shutdown.clone()));
        let capture_task = tokio::spawn(captures.run(state, ready, shutdown.clone()));

        let reason = until.await;
        // Uninstall or restart? What the agent saw while it could ask, else
        // asked now: in a minute the answer is gone with the service account
        // (see `UninstallWatch`).
        let uninstalling = match &uninstall_check {
            Some((client, (namespace, name), watch)) => {
                let why = watch.uninstalling(client, namespace, name).await;
                if let Some(why) = why {
                    info!(daemonset = %name, %namespace, why, "nodemesh is being uninstalled: the node's eBPF state goes when the agent stops");
                }
                why.is_some()
            }
            None => false,
        };
        info!(
            signal = reason,
            in_flight = proxy.in_flight(),
            grace = ?cfg.shutdown_grace,
            "shutting down: no new connections; waiting for open ones"
        );
        shutdown.cancel();
        // Listeners closed; the pods stay served while connections drain.
        let served = capture_task.await.unwrap_or_default();
        let _ = source_task.await;
        let left = proxy.drain(cfg.shutdown_grace).await;
        drop(served);
        if left > 0 {
            warn!(
                connections = left,
                "grace period over; closing the connections still open"
            );
        }
        admin.stop();
        if cfg.cleanup_on_exit || uninstalling {
            match redirect.uninstall() {
                Ok(true) => {
                    info!(pins = %cfg.bpffs.display(), "eBPF programs detached and unpinned")
                }
                Ok(false) => warn!("another agent uses the eBPF state; leaving it in place"),
                Err(e) => warn!(error = %e, "cannot remove eBPF state"),
            }
        } else {
            info!(pins = %cfg.bpffs.display(), "eBPF state left in place for the next agent");
        }
        Ok(())
    }
}

/// File descriptors the agent needs beyond its proxied connections:
/// listeners (one per captured pod), the tunnel, the API server, logs.
const SPARE_FDS: u64 = 4096;

/// Raises the open-file limit to what `max_connections` needs (two
/// sockets each, plus spares): the hard limit too when the agent may, else
/// the soft one up to the hard one. Returns (before, after, needed).
fn raise_fd_limit(max_connections: usize) -> (u64, u64, u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let needed = 2 * max_connections as u64 + SPARE_FDS;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (0, 0, needed);
    };
    // Above the hard limit too where the agent may (CAP_SYS_RESOURCE: a
    // privileged DaemonSet, root on a test bed).
    if needed > hard && setrlimit(Resource::RLIMIT_NOFILE, needed, needed).is_ok() {
        return (soft, needed, needed);
    }
    let want = needed.min(hard);
    if want > soft && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
        return (soft, want, needed);
    }
    (soft, soft, needed)
}

/// The whole of `nodemesh agent` once its flags are checked: a runtime,
/// the app, signals.
pub fn main(cfg: AgentConfig, ebpf_log_level: u8) -> Result<(), AgentError> {
    memory::tune_allocator();
    let mut budgets = Budgets::derive(
        memory::own_limit(),
        cfg.buffer_size,
        cfg.max_connections,
        cfg.max_requests,
    );
    match &budgets.limit {
        Some(limit) => info!(
            memory_limit = limit.bytes,
            from = %limit.file.display(),
            max_connections = budgets.connections,
            max_requests = budgets.requests,
            relay_buffer_bytes = budgets.buffer_bytes,
            "admission budgets (flags set to auto are derived from the memory limit)"
        ),
        None => info!(
            max_connections = budgets.connections,
            max_requests = budgets.requests,
            "admission budgets (no memory limit found: set one, or --max-connections)"
        ),
    }
    let (before, after, needed) = raise_fd_limit(budgets.connections);
    if after > before {
        info!(from = before, to = after, "open-file limit raised");
    }
    if after < needed {
        // Connections beyond what the descriptors allow wait in the
        // listeners' backlogs rather than fail half-accepted.
        let fits = (after.saturating_sub(SPARE_FDS) / 2).max(64) as usize;
        warn!(
            limit = after,
            needed,
            max_connections = fits,
            "the open-file limit is below what --max-connections needs; proxying fewer connections at once (raise the hard limit, LimitNOFILE, for more)"
        );
        budgets.connections = budgets.connections.min(fits);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("nodemesh-proxy");
    if cfg.worker_threads > 0 {
        builder.worker_threads(cfg.worker_threads);
    }
    let runtime = builder.build().map_err(AgentError::Runtime)?;
    let result = runtime.block_on(async {
        let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
        let app = App::build(cfg, budgets, ebpf_log_level).await?;
        info!(admin = %app.bound().admin, tunnel = ?app.bound().tunnel, "agent started");
        app.run(async move {
            tokio::select! {
                _ = sigterm.recv() => "SIGTERM",
                _ = sigint.recv() => "SIGINT",
            }
        })
        .await
    });
    // Connections still open after the grace period are dropped here.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
