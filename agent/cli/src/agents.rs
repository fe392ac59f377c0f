//! How the commands reach the agents: through the API server (the
//! aggregated API `tap.nodemesh.io`, as RBAC allows: `nodemesh-viewer` for
//! stat, `nodemesh-tapper` for tap), or directly with `--agent ADDR` on the
//! node itself (agents answer nobody else) — and the plain-text tables the
//! commands print.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::TokioIo;
use kube::config::{KubeConfigOptions, Kubeconfig};
use nodemesh_core::{
    names::{API_GROUP, API_VERSION},
    wire::{StatList, StatReport, TapEvent, TapLines},
};
use tokio::sync::mpsc;

/// A client for the API server as kubectl would make it: `kubeconfig`
/// (else $KUBECONFIG, ~/.kube/config, in-cluster) and `context` (else its
/// current one); no read timeout (a tap may be quiet for minutes).
pub async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<kube::Client, String> {
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let mut config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None if context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| format!("kubeconfig: {e}"))?,
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no kubeconfig ({e}): pass --kubeconfig"))?,
    };
    config.read_timeout = None;
    kube::Client::try_from(config).map_err(|e| format!("kube client: {e}"))
}

/// Where the agents are read.
#[derive(Args, Clone, Debug, Default)]
pub struct Reach {
    /// Read this agent directly (its admin address; repeatable) instead of
    /// through the API server: for debugging on a node, the only place an
    /// agent answers (127.0.0.1:4191).
    #[arg(long, value_name = "ADDR")]
    pub agent: Vec<SocketAddr>,
    /// The kubeconfig (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current one).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

/// The agents, as reached.
#[derive(Clone)]
pub enum Source {
    Direct(Vec<SocketAddr>),
    Api(kube::Client),
}

/// An agent's tap item: (who, event), or (who, why its stream ended).
pub type TapItem = Result<(String, TapEvent), (String, String)>;

impl Source {
    pub async fn new(reach: &Reach) -> Result<Source, String> {
        if !reach.agent.is_empty() {
            return Ok(Source::Direct(reach.agent.clone()));
        }
        kube_client(reach.kubeconfig.as_deref(), reach.context.as_deref())
            .await
            .map(Source::Api)
            .map_err(|e| format!("{e} (or, on a node, --agent 127.0.0.1:4191)"))
    }

    /// Every agent's report for `window`: (who, the report or why not).
    /// Through the API server, `namespace` scopes it (RBAC in that
    /// namespace is enough; without, the cluster-wide resource).
    pub async fn stats(
        &self,
        window: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<(String, Result<StatReport, String>)>, String> {
        match self {
            Source::Direct(agents) => {
                let mut out = Vec::new();
                for addr in agents {
                    out.push((addr.to_string(), fetch(*addr, window).await));
                }
                Ok(out)
            }
            Source::Api(client) => {
                let req = Request::get(format!("{}/stat?window={window}", api_base(namespace)))
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                let list: StatList =
                    tokio::time::timeout(Duration::from_secs(30), client.request(req))
                        .await
                        .map_err(|_| "the API server did not answer within 30s".to_owned())?
                        .map_err(api_error)?;
                if list.agents.is_empty() {
                    return Err("no agent is running (is nodemesh installed?)".into());
                }
                Ok(list
                    .agents
                    .into_iter()
                    .map(|a| {
                        let who = if a.node.is_empty() { a.pod } else { a.node };
                        let r = a
                            .report
                            .ok_or_else(|| a.error.unwrap_or_else(|| "no report".into()));
                        (who, r)
                    })
                    .collect())
            }
        }
    }

    /// Follows the agents' taps (`query`: the filter) into `tx` until it
    /// is closed. Through the API server, `resource` is `tap` (RBAC:
    /// `nodemesh-tapper`) or `top` (`nodemesh-viewer`): the same stream.
    pub async fn tap(
        &self,
        resource: &'static str,
        query: String,
        namespace: Option<&str>,
        tx: mpsc::Sender<TapItem>,
    ) {
        match self {
            Source::Direct(agents) => {
                for addr in agents {
                    tokio::spawn(follow_direct(*addr, query.clone(), tx.clone()));
                }
            }
            Source::Api(client) => {
                let base = api_base(namespace);
                tokio::spawn(follow_api(client.clone(), base, resource, query, tx));
            }
        }
    }
}

/// The aggregated API's path for one namespace's resources, or every one.
fn api_base(namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("/apis/{API_GROUP}/{API_VERSION}/namespaces/{ns}"),
        None => format!("/apis/{API_GROUP}/{API_VERSION}"),
    }
}

/// What an error of the API server means here.
fn api_error(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "{} (bind the ClusterRole nodemesh-viewer for stat and edges, nodemesh-tapper for tap and top: with a RoleBinding, in that namespace only (-n), with a ClusterRoleBinding, every one)",
            s.message
        ),
        kube::Error::Api(s) if s.code == 404 || s.code == 503 => format!(
            "{} (see nodemesh check: is nodemesh installed, its identity service up, its aggregated API available?)",
            s.message
        ),
        kube::Error::Api(s) => s.message,
        e => e.to_string(),
    }
}

async fn fetch(addr: SocketAddr, window: &str) -> Result<StatReport, String> {
    let resp = get(addr, &format!("/v1/stat?window={window}")).await?;
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .map_err(|_| "no answer within 10s".to_owned())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice::<StatReport>(&body).map_err(|e| format!("bad answer: {e}"))
}

async fn follow_direct(addr: SocketAddr, query: String, tx: mpsc::Sender<TapItem>) {
    let who = addr.to_string();
    let stream = async {
        let resp = get(addr, &format!("/v1/tap?{query}")).await?;
        let mut body = resp.into_body();
        let mut lines = TapLines::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            for event in lines.push(data)? {
                if tx.send(Ok((who.clone(), event))).await.is_err() {
                    return Ok(());
                }
            }
        }
        Err("the agent ended the stream".to_owned())
    };
    if let Err(e) = stream.await {
        let _ = tx.send(Err((who, e))).await;
    }
}

async fn follow_api(
    client: kube::Client,
    base: String,
    resource: &'static str,
    query: String,
    tx: mpsc::Sender<TapItem>,
) {
    let who = "API server".to_owned();
    let stream = async {
        let req = Request::get(format!("{base}/{resource}?watch=true&{query}"))
            .body(kube::client::Body::empty())
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(30), client.send(req))
            .await
            .map_err(|_| "the API server did not answer within 30s".to_owned())?
            .map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::OK {
            let code = resp.status().as_u16();
            let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let status: Result<kube::core::Status, _> = serde_json::from_slice(&body);
            return Err(match status {
                Ok(s) => api_error(kube::Error::Api(Box::new(s))),
                Err(_) => format!("{code}: {}", String::from_utf8_lossy(&body).trim()),
            });
        }
        let mut body = resp.into_body();
        let mut lines = TapLines::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            for event in lines.push(data)? {
                let item = if event.kind == "error" {
                    Err((
                        event.node.clone(),
                        event.message.clone().unwrap_or_default(),
                    ))
                } else {
                    Ok((event.node.clone(), event))
                };
                if tx.send(item).await.is_err() {
                    return Ok(());
                }
            }
        }
        Err("the API server ended the stream".to_owned())
    };
    if let Err(e) = stream.await {
        let _ = tx.send(Err((who, e))).await;
    }
}

/// `GET path` on the agent at `addr`: its response when it is 200 (the
/// body still to read: it may stream), else why not. The connection, the
/// request and the head must come within 10 s.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response<Incoming>, String> {
    let ask = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        send.send_request(req).await.map_err(|e| e.to_string())
    };
    let resp = tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .map_err(|_| "no answer within 10s".to_owned())??;
    if resp.status() == StatusCode::OK {
        return Ok(resp);
    }
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Err(format!(
        "{status}: {}",
        String::from_utf8_lossy(&body).trim()
    ))
}

/// Rows as columns three spaces apart, each as wide as its widest cell.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_line_up_whatever_the_characters() {
        let t = super::table(&[
            vec!["SRC".into(), "SECURED".into()],
            vec!["web".into(), "√ (node)".into()],
        ]);
        assert_eq!(t, "SRC   SECURED\nweb   √ (node)\n");
    }
}
