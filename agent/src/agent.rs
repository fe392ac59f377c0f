//! `nodemesh agent`: wires the parts together and runs until SIGTERM/SIGINT.
//!
//! Start-up order: eBPF (so pods captured by an earlier agent keep being
//! redirected), admin server, pod source, capture loop. Shutdown: stop
//! accepting, let open connections finish within the grace period, leave
//! eBPF in place for the next agent unless asked to clean up.
use std::{
    sync::{Arc, RwLock, atomic::AtomicBool},
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    admin::{AdminError, AdminServer, AdminState},
    capture::{CaptureConfig, CaptureMetrics, Captures},
    cgroup::{self, CgroupDir, CgroupError},
    config::{AgentConfig, PodSourceConfig},
    discovery::{
        SourceMetrics,
        file::FileSource,
        kube::{self, KubeError, KubeSource},
        services::{ServiceIndex, SharedIndex},
    },
    identity::store::{CertStore, IdentityClientConfig, IdentityClientError},
    metrics::{PREFIX, TcpMetrics},
    netns,
    proxy::{Outbound, OutboundConfig, outbound::Mesh},
    redirect::{EbpfLogger, Redirect, RedirectConfig, RedirectError},
    tunnel::{LocalPods, TunnelClient, TunnelConfig, TunnelMetrics, TunnelServer},
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
    #[error("{0}")]
    Kube(#[from] KubeError),
    #[error("identity: {0}")]
    Identity(#[from] IdentityClientError),
    #[error("tunnel TLS settings: {0}")]
    TunnelTls(#[from] rustls::Error),
    #[error("cannot listen on {addr} for the tunnel: {source}; is another agent running?")]
    TunnelBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the agent until a termination signal.
pub async fn run(cfg: AgentConfig, log_level: u8) -> Result<(), AgentError> {
    netns::init().map_err(AgentError::Netns)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;

    let mount = cgroup::find_cgroup2_mount()?;
    let root_path = cfg.cgroup_root.clone().unwrap_or_else(|| mount.clone());
    let cgroup_root = CgroupDir::open(&root_path)?;
    let own = cgroup::own_cgroup(&mount)?;
    info!(cgroup_root = %cgroup_root.path().display(), agent_cgroup = %own.path().display(), "cgroups found");

    let (redirect, logger) = Redirect::install(&RedirectConfig {
        pin_dir: cfg.bpffs.clone(),
        cgroup_root: cgroup_root.path().to_owned(),
        outbound_port: cfg.outbound_port,
        fast_path: cfg.fast_path,
        bypass_nets: cfg.bypass_nets.clone(),
        bypass_ports: cfg.bypass_ports.clone(),
        agent_cgroup: own.id(),
        log_level,
    })?;
    let redirect = Arc::new(redirect);
    let shutdown = CancellationToken::new();
    tokio::spawn(forward_ebpf_logs(logger, shutdown.clone()));

    let mut registry = Registry::with_prefix(PREFIX);
    let tcp = TcpMetrics::new(&mut registry);
    let source_metrics = SourceMetrics::new(&mut registry);
    let capture_metrics = CaptureMetrics::new(&mut registry, redirect.clone());
    let ready = Arc::new(AtomicBool::new(false));
    let index: SharedIndex = Arc::new(RwLock::new(ServiceIndex::new(&cfg.trust_domain)));

    // Workload identity and the tunnel between nodes.
    let mut identity = None;
    if let (Some(id), PodSourceConfig::Kube { node_name, .. }) = (&cfg.identity, &cfg.source) {
        let store = Arc::new(CertStore::new(
            IdentityClientConfig {
                addr: id.addr.clone(),
                server_name: id.server_name.clone(),
                trust_anchors_pem: id.trust_anchors_pem.clone(),
                token_file: id.token_file.clone(),
                trust_domain: cfg.trust_domain.clone(),
                timeout: Duration::from_secs(10),
            },
            &mut registry,
        )?);
        let metrics = TunnelMetrics::new(&mut registry);
        let tunnel_cfg = TunnelConfig {
            listen: id.tunnel_addr,
            port: id.tunnel_addr.port(),
            connect_timeout: cfg.connect_timeout,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: id.tunnel_idle_timeout,
            buffer_size: cfg.buffer_size,
        };
        let local = LocalPods::default();
        let server = Arc::new(TunnelServer::new(
            tunnel_cfg.clone(),
            store.clone(),
            local.clone(),
            metrics.clone(),
        )?);
        let listener = server
            .bind()
            .await
            .map_err(|source| AgentError::TunnelBind {
                addr: id.tunnel_addr,
                source,
            })?;
        let client = Arc::new(TunnelClient::new(tunnel_cfg, store.clone(), metrics));
        identity = Some((store, server, listener, client, local, node_name.clone()));
    }
    let admin = AdminServer::start(
        cfg.admin_addr,
        AdminState {
            registry: Arc::new(registry),
            ready: ready.clone(),
            services: matches!(cfg.source, PodSourceConfig::Kube { .. }).then(|| index.clone()),
        },
    )?;

    let (pods_tx, pods_rx) = watch::channel(None);
    // With Kubernetes: the client and the agent's own DaemonSet, to tell an
    // uninstall from a restart at shutdown.
    let mut uninstall_check = None;
    let source_task = match &cfg.source {
        PodSourceConfig::File { path, interval } => {
            let source = FileSource {
                path: path.clone(),
                interval: *interval,
                metrics: source_metrics,
            };
            tokio::spawn(source.run(pods_tx, shutdown.clone()))
        }
        PodSourceConfig::Kube {
            node_name,
            kubeconfig,
            daemonset,
        } => {
            let client = kube::client(kubeconfig.as_deref()).await?;
            uninstall_check = daemonset.clone().map(|ds| (client.clone(), ds));
            let source = KubeSource {
                client,
                node_name: node_name.clone(),
                metrics: source_metrics,
                index: index.clone(),
            };
            tokio::spawn(source.run(pods_tx, shutdown.clone()))
        }
    };

    let mut mesh = None;
    let mut local_pods = None;
    let mut tunnel_server = None;
    if let Some((store, server, listener, client, local, node_name)) = identity {
        tokio::spawn(store.run(pods_rx.clone(), shutdown.clone()));
        tokio::spawn(server.clone().serve(listener, shutdown.clone()));
        tokio::spawn(client.clone().evict_idle(shutdown.clone()));
        mesh = Some(Mesh {
            node_name,
            index: index.clone(),
            local: local.clone(),
            tunnel: client,
        });
        local_pods = Some(local);
        tunnel_server = Some(server);
    }
    let outbound = Arc::new(Outbound::new(
        OutboundConfig {
            connect_timeout: cfg.connect_timeout,
            buffer_size: cfg.buffer_size,
            max_connections: cfg.max_connections,
        },
        redirect.clone(),
        mesh,
    ));
    let captures = Captures::new(
        CaptureConfig {
            outbound_port: cfg.outbound_port,
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(10),
        },
        cgroup_root,
        redirect.clone(),
        outbound.clone(),
        tcp,
        capture_metrics,
        ready,
    )
    .with_local_pods(local_pods);
    let capture_task = tokio::spawn(captures.run(pods_rx, shutdown.clone()));

    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    info!(
        signal,
        in_flight = outbound.in_flight(),
        grace = ?cfg.shutdown_grace,
        "shutting down: no new connections; waiting for open ones"
    );
    shutdown.cancel();
    let _ = capture_task.await;
    let _ = source_task.await;
    let left = match &tunnel_server {
        Some(tunnel) => {
            let (a, b) = tokio::join!(
                outbound.drain(cfg.shutdown_grace),
                tunnel.drain(cfg.shutdown_grace)
            );
            a + b
        }
        None => outbound.drain(cfg.shutdown_grace).await,
    };
    if left > 0 {
        warn!(
            connections = left,
            "grace period over; closing the connections still open"
        );
    }
    admin.stop();
    let uninstalling = match &uninstall_check {
        Some((client, (namespace, name))) => {
            let gone = kube::daemonset_gone(client, namespace, name).await;
            if gone {
                info!(daemonset = %name, %namespace, "the agent's DaemonSet is gone: nodemesh is being uninstalled");
            }
            gone
        }
        None => false,
    };
    if cfg.cleanup_on_exit || uninstalling {
        match redirect.uninstall() {
            Ok(true) => info!(pins = %cfg.bpffs.display(), "eBPF programs detached and unpinned"),
            Ok(false) => warn!("another agent uses the eBPF state; leaving it in place"),
            Err(e) => warn!(error = %e, "cannot remove eBPF state"),
        }
    } else {
        info!(pins = %cfg.bpffs.display(), "eBPF state left in place for the next agent");
    }
    Ok(())
}

/// Moves aya-log records from the programs into the agent's log.
async fn forward_ebpf_logs(logger: EbpfLogger, shutdown: CancellationToken) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open (and
    // unchanged) for as long as the AsyncFd holds it.
    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e.into_parts().1, "cannot read eBPF logs");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            guard = logger.readable_mut() => match guard {
                Ok(g) => g,
                Err(e) => {
                    warn!(error = %e, "eBPF log buffer unreadable; no more eBPF logs");
                    return;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
