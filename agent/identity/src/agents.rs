//! Reaching the node agents' tap ports over mutual TLS, as the identity
//! service's own identity: which agents there are (their pods), one
//! `/v1/stat` from each, and their `/v1/tap` streams merged into one.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};
use nodemesh_core::{
    pki::provider,
    wire::{AgentNode, AgentStat, NodeReport, StatReport, TapEvent, TapLines},
};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::config::IdentityConfig;

/// One agent to ask.
#[derive(Clone, Debug)]
pub(crate) struct AgentAddr {
    pub node: String,
    pub pod: String,
    pub addr: SocketAddr,
}

/// The agents' tap ports and how to reach them.
pub(crate) struct Agents {
    pub client: Client,
    pub namespace: String,
    pub selector: String,
    pub port: u16,
    /// Names an agent's certificate may have (one per agent service
    /// account): rustls checks the chain and the name; each is tried.
    pub server_names: Vec<ServerName<'static>>,
    pub tls: Arc<ClientConfig>,
}

/// A connection, request and response head must come within this.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// An agent's report is at most this big (512 series of stats are well
/// under it).
const MAX_ANSWER: usize = 16 << 20;
/// Agents are listed again this often during a tap (new nodes, restarted
/// agents).
const RELIST_EVERY: Duration = Duration::from_secs(10);

impl Agents {
    /// Reaches the agents `cfg` names, trusting `roots`, presenting `own`.
    pub(crate) fn new(
        cfg: &IdentityConfig,
        client: Client,
        roots: Arc<RootCertStore>,
        own: Arc<crate::CurrentCert>,
    ) -> Result<Self, rustls::Error> {
        let server_names = cfg
            .agent_identities
            .iter()
            .filter_map(|id| id.dns_name(&cfg.trust_domain).ok())
            .filter_map(|n| ServerName::try_from(n).ok())
            .collect();
        let mut tls = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_cert_resolver(own);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            client,
            namespace: cfg.agent_namespace.clone(),
            selector: cfg.agent_selector.clone(),
            port: cfg.agent_tap_port,
            server_names,
            tls: Arc::new(tls),
        })
    }

    /// The running agents (their pods' addresses: agents use the node's
    /// network).
    pub(crate) async fn list(&self) -> Result<Vec<AgentAddr>, kube::Error> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default().labels(&self.selector))
            .await?;
        let mut out: Vec<AgentAddr> = pods
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| {
                let status = p.status?;
                if status.phase.as_deref() != Some("Running") {
                    return None;
                }
                let ip = status.pod_ip?.parse().ok()?;
                Some(AgentAddr {
                    node: p.spec.and_then(|s| s.node_name).unwrap_or_default(),
                    pod: p.metadata.name.unwrap_or_default(),
                    addr: SocketAddr::new(ip, self.port),
                })
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    /// `GET path` on one agent's tap port: the response, its body still to
    /// read (it may stream).
    async fn get(
        &self,
        agent: &AgentAddr,
        path: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let ask = async {
            // The agent's certificate names one of the agents' identities:
            // each is tried (one, usually).
            let mut last = "no agent identity configured".to_owned();
            let mut verified = None;
            for name in &self.server_names {
                let tcp = tokio::net::TcpStream::connect(agent.addr)
                    .await
                    .map_err(|e| format!("cannot connect to {}: {e}", agent.addr))?;
                match TlsConnector::from(self.tls.clone())
                    .connect(name.clone(), tcp)
                    .await
                {
                    Ok(tls) => {
                        verified = Some(tls);
                        break;
                    }
                    Err(e) => {
                        last = format!("TLS with the agent's tap port at {}: {e}", agent.addr)
                    }
                }
            }
            let tls = verified.ok_or(last)?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = Request::get(path)
                .header(hyper::header::HOST, agent.addr.to_string())
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            send.send_request(req).await.map_err(|e| e.to_string())
        };
        let resp = tokio::time::timeout(ASK_TIMEOUT, ask)
            .await
            .map_err(|_| format!("no answer from {} within 10s", agent.addr))??;
        if resp.status() == StatusCode::OK {
            return Ok(resp);
        }
        let status = resp.status();
        let body =
            tokio::time::timeout(ASK_TIMEOUT, Limited::new(resp.into_body(), 4096).collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| b.to_bytes())
                .unwrap_or_default();
        Err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(512)]).trim()
        ))
    }

    /// `GET path` on every agent at once: each one's answer as JSON, or
    /// why not.
    pub(crate) async fn ask_all<T: serde::de::DeserializeOwned>(
        &self,
        agents: &[AgentAddr],
        path: &str,
    ) -> Vec<Result<T, String>> {
        join_all(agents.iter().map(|agent| async move {
            let resp = self.get(agent, path).await?;
            let body = tokio::time::timeout(
                ASK_TIMEOUT,
                Limited::new(resp.into_body(), MAX_ANSWER).collect(),
            )
            .await
            .map_err(|_| "the answer did not come within 10s".to_owned())?
            .map_err(|e| e.to_string())?
            .to_bytes();
            serde_json::from_slice::<T>(&body).map_err(|e| format!("unexpected answer: {e}"))
        }))
        .await
    }

    /// Every agent's `/v1/stat` for `window`.
    pub(crate) async fn stat(&self, agents: &[AgentAddr], window: &str) -> Vec<AgentStat> {
        let answers = self
            .ask_all::<StatReport>(agents, &format!("/v1/stat?window={window}"))
            .await;
        agents
            .iter()
            .zip(answers)
            .map(|(agent, answer)| AgentStat {
                node: agent.node.clone(),
                pod: agent.pod.clone(),
                error: answer.as_ref().err().cloned(),
                report: answer.ok(),
            })
            .collect()
    }

    /// Every agent's `/v1/node`.
    pub(crate) async fn nodes(&self, agents: &[AgentAddr]) -> Vec<AgentNode> {
        let answers = self.ask_all::<NodeReport>(agents, "/v1/node").await;
        agents
            .iter()
            .zip(answers)
            .map(|(agent, answer)| AgentNode {
                node: agent.node.clone(),
                pod: agent.pod.clone(),
                error: answer.as_ref().err().cloned(),
                report: answer.ok(),
            })
            .collect()
    }

    /// Follows the agents' `/v1/tap?query` into `tx` until it is closed:
    /// agents listed again every [`RELIST_EVERY`] (a new or restarted
    /// agent joins), each one's stream opened again after a failure (told
    /// as an `error` event). `strip`: without identities and authorities
    /// (what `top` shows viewers).
    pub(crate) async fn follow_all(
        self: Arc<Self>,
        first: Vec<AgentAddr>,
        query: String,
        strip: bool,
        tx: mpsc::Sender<Bytes>,
    ) {
        let mut followed: std::collections::HashMap<String, tokio::task::JoinHandle<()>> =
            std::collections::HashMap::new();
        let mut agents = first;
        loop {
            let names: std::collections::HashSet<String> =
                agents.iter().map(|a| a.pod.clone()).collect();
            followed.retain(|pod, task| {
                let keep = names.contains(pod) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            for agent in &agents {
                if !followed.contains_key(&agent.pod) {
                    let task = tokio::spawn(self.clone().follow(
                        agent.clone(),
                        query.clone(),
                        strip,
                        tx.clone(),
                    ));
                    followed.insert(agent.pod.clone(), task);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RELIST_EVERY) => {}
                _ = tx.closed() => break,
            }
            match self.list().await {
                Ok(a) => agents = a,
                Err(e) => {
                    debug!(error = %e, "tap: cannot list the agents again; keeping the ones followed")
                }
            }
        }
        for task in followed.into_values() {
            task.abort();
        }
    }

    /// Follows one agent's `/v1/tap?query` into `tx` (NDJSON lines with the
    /// node set) until `tx` closes, again after a pause when it fails.
    async fn follow(
        self: Arc<Self>,
        agent: AgentAddr,
        query: String,
        strip: bool,
        tx: mpsc::Sender<Bytes>,
    ) {
        let mut pause = Duration::from_secs(1);
        loop {
            let message = match self.follow_once(&agent, &query, strip, &tx).await {
                Ok(()) => return,
                Err(m) => m,
            };
            debug!(node = %agent.node, error = %message, "tap stream from an agent ended; again in {pause:?}");
            let event = TapEvent {
                kind: "error".into(),
                node: agent.node.clone(),
                message: Some(message),
                ..TapEvent::default()
            };
            if tx.send(line_of(&event)).await.is_err() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = tx.closed() => return,
            }
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    }

    /// One stream: `Ok` when the reader went away.
    async fn follow_once(
        &self,
        agent: &AgentAddr,
        query: &str,
        strip: bool,
        tx: &mpsc::Sender<Bytes>,
    ) -> Result<(), String> {
        let resp = self.get(agent, &format!("/v1/tap?{query}")).await?;
        let mut body = resp.into_body();
        let mut lines = TapLines::default();
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = tx.closed() => return Ok(()),
            };
            let Some(frame) = frame else {
                return Err("the agent ended the stream".to_owned());
            };
            let frame = frame.map_err(|e| e.to_string())?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            for mut event in lines.push(data)? {
                event.node = agent.node.clone();
                if strip {
                    event.src.identity.clear();
                    event.dst.identity.clear();
                    event.authority.clear();
                }
                if tx.send(line_of(&event)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// An event as one NDJSON line.
pub(crate) fn line_of(event: &TapEvent) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}
