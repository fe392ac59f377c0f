//! `nodemesh dashboard`: a web UI with live golden metrics, served by this
//! process from assets embedded in the binary (no CDN, nothing fetched at
//! run time). The browser talks only to this process; this process talks
//! to the API server (as the kubeconfig's user: RBAC decides what it may
//! show), or directly to agents on their node with `--agent`.
//!
//! - `/` (and `app.js`, `style.css`): overview → namespace → workload
//!   pages and a live tap page, plain HTML/JS/SVG;
//! - `/api/stat?window=10s|1m|10m`: the agents' reports merged, with any
//!   agent that did not answer named;
//! - `/api/history`: requests per second and success rate per workload,
//!   sampled every 10 s for the last 10 minutes (sparklines);
//! - `/api/tap?since=N&namespace=&workload=&path=`: the latest live
//!   requests (this process follows every agent's tap, keeping the last
//!   [`TAP_KEPT`] events).
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use nodemesh_core::wire::{StatReport, TapEvent, TapFilter};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::agents::{Reach, Source};

const INDEX: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// Tap events kept for the tap and workload pages.
pub const TAP_KEPT: usize = 500;
/// History points per workload (10 minutes every 10 s).
const HISTORY: usize = 60;
const HISTORY_EVERY: Duration = Duration::from_secs(10);

/// `nodemesh dashboard`.
#[derive(Args, Debug)]
pub struct DashboardArgs {
    /// Where to serve the UI (keep it on loopback: it shows paths and
    /// identities).
    #[arg(long, default_value = "127.0.0.1")]
    pub address: std::net::IpAddr,
    #[arg(long, default_value_t = 50750)]
    pub port: u16,
    /// Show one namespace only (what a RoleBinding of nodemesh-viewer, and
    /// nodemesh-tapper for the tap page, in it allows); default: every one.
    #[arg(short = 'n', long, value_name = "NS")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub reach: Reach,
}

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Reach(String),
}

#[derive(Debug, Default)]
struct Shared {
    /// (namespace/kind/name) → (unix seconds, requests per second,
    /// success rate).
    history: BTreeMap<String, VecDeque<(u64, f64, Option<f64>)>>,
    /// (sequence, the agent, the event).
    tap: VecDeque<(u64, String, TapEvent)>,
    next: u64,
    /// The last error of each agent that has one (or of the API server).
    errors: HashMap<String, String>,
    /// The one namespace shown (`--namespace`), if any.
    namespace: Option<String>,
}

type State = Arc<Mutex<Shared>>;

/// Serves until interrupted; prints the URL first.
pub fn run(args: &DashboardArgs) -> Result<(), DashboardError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DashboardError::Runtime)?;
    runtime.block_on(async {
        let addr = SocketAddr::new(args.address, args.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DashboardError::Bind { addr, source })?;
        let source = Source::new(&args.reach)
            .await
            .map_err(DashboardError::Reach)?;
        let state: State = Arc::default();
        state.lock().unwrap_or_else(|p| p.into_inner()).namespace = args.namespace.clone();
        tokio::spawn(follow_tap(source.clone(), state.clone()));
        tokio::spawn(keep_history(source.clone(), state.clone()));
        println!(
            "nodemesh dashboard: http://{addr}/ ({})",
            match &source {
                Source::Api(_) => "agents through the API server".to_owned(),
                Source::Direct(a) => format!(
                    "agents: {}",
                    a.iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        );
        let agents = Arc::new(source);
        let hosts = Arc::new(allowed_hosts(addr));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (state, agents, hosts) = (state.clone(), agents.clone(), hosts.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let (state, agents, hosts) = (state.clone(), agents.clone(), hosts.clone());
                    async move {
                        // A page of another site, its name re-pointed at
                        // this address (DNS rebinding), names itself.
                        let host = req
                            .headers()
                            .get(header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or_default();
                        if !hosts.iter().any(|h| h == host) {
                            return Ok::<_, Infallible>(respond(
                                StatusCode::FORBIDDEN,
                                "text/plain",
                                "unexpected Host: open the URL nodemesh dashboard printed",
                            ));
                        }
                        Ok::<_, Infallible>(route(req, &state, &agents).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// The `Host` values this UI answers: its address, and loopback names.
fn allowed_hosts(addr: SocketAddr) -> Vec<String> {
    let port = addr.port();
    vec![
        addr.to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ]
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(_) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "cannot encode",
        ),
    }
}

fn query<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

#[derive(Serialize)]
struct AgentError {
    agent: String,
    error: String,
}

#[derive(Serialize)]
struct StatAnswer {
    report: StatReport,
    errors: Vec<AgentError>,
}

#[derive(Serialize)]
struct TapAnswer {
    next: u64,
    events: Vec<TapEvent>,
    errors: Vec<AgentError>,
}

fn errors(state: &State) -> Vec<AgentError> {
    let s = state.lock().unwrap_or_else(|p| p.into_inner());
    let mut e: Vec<AgentError> = s
        .errors
        .iter()
        .map(|(a, e)| AgentError {
            agent: a.to_string(),
            error: e.clone(),
        })
        .collect();
    e.sort_by(|a, b| a.agent.cmp(&b.agent));
    e
}

/// Every agent's report for `window` (those that answer), noting the rest.
async fn reports(source: &Source, window: &str, state: &State) -> StatReport {
    let mut got = Vec::new();
    let namespace = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .namespace
        .clone();
    let answers = source.stats(window, namespace.as_deref()).await;
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    match answers {
        Ok(answers) => {
            s.errors.remove("API server");
            for (agent, report) in answers {
                match report {
                    Ok(r) => {
                        s.errors.remove(&agent);
                        got.push(r);
                    }
                    Err(e) => {
                        s.errors.insert(agent, e);
                    }
                }
            }
        }
        Err(e) => {
            s.errors.insert("API server".into(), e);
        }
    }
    StatReport::merge(&got)
}

async fn route(req: Request<Incoming>, state: &State, agents: &Source) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/" | "/index.html" => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        "/app.js" => respond(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
        "/style.css" => respond(StatusCode::OK, "text/css; charset=utf-8", STYLE),
        "/api/stat" => {
            let window = query(&req, "window").unwrap_or("1m");
            if !nodemesh_core::wire::STAT_WINDOWS
                .iter()
                .any(|(w, _)| *w == window)
            {
                return respond(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "window: 10s, 1m or 10m",
                );
            }
            let report = reports(agents, window, state).await;
            json(&StatAnswer {
                report,
                errors: errors(state),
            })
        }
        "/api/history" => {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            json(&s.history)
        }
        "/api/tap" => {
            let since: u64 = query(&req, "since")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let filter = TapFilter::parse(
                &req.uri()
                    .query()
                    .unwrap_or_default()
                    .split('&')
                    .filter(|kv| !kv.starts_with("since="))
                    .collect::<Vec<_>>()
                    .join("&"),
            )
            .unwrap_or_default();
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            let mut wanted = std::collections::HashSet::new();
            let mut events = Vec::new();
            for (seq, agent, e) in &s.tap {
                let key = (agent.as_str(), e.id);
                if e.kind == "req" && filter.matches(e) {
                    wanted.insert(key);
                }
                if *seq >= since && wanted.contains(&key) {
                    events.push(e.clone());
                }
            }
            let next = s.next;
            drop(s);
            json(&TapAnswer {
                next,
                events,
                errors: errors(state),
            })
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found"),
    }
}

/// Follows one agent's tap for as long as this runs (again after a pause
/// when it goes away).
async fn follow_tap(source: Source, state: State) {
    // Agents read directly are followed (and retried) one by one.
    if let Source::Direct(agents) = &source
        && agents.len() > 1
    {
        for agent in agents {
            tokio::spawn(follow_one(Source::Direct(vec![*agent]), state.clone()));
        }
        return;
    }
    follow_one(source, state).await
}

async fn follow_one(source: Source, state: State) {
    loop {
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        let namespace = state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .namespace
            .clone();
        let query = TapFilter {
            max_rps: Some(50),
            namespace: namespace.clone(),
            ..TapFilter::default()
        }
        .query();
        source.tap("tap", query, namespace.as_deref(), tx).await;
        while let Some(item) = rx.recv().await {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            match item {
                Ok((agent, event)) => {
                    s.errors.remove(&agent);
                    let seq = s.next;
                    s.next += 1;
                    s.tap.push_back((seq, agent, event));
                    while s.tap.len() > TAP_KEPT {
                        s.tap.pop_front();
                    }
                }
                Err((agent, e)) => {
                    s.errors.insert(agent, e);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Samples the 10 s window every 10 s: rps and success per workload.
async fn keep_history(agents: Source, state: State) {
    let mut every = tokio::time::interval(HISTORY_EVERY);
    loop {
        every.tick().await;
        let report = reports(&agents, "10s", &state).await;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut by: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for row in report
            .requests
            .iter()
            .filter(|r| r.key.direction == "inbound")
        {
            let w = &row.key.workload;
            let e = by
                .entry(format!("{}/{}/{}", w.namespace, w.kind, w.name))
                .or_default();
            e.0 += row.golden.requests;
            e.1 += row.golden.successes;
        }
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        for (key, (requests, successes)) in by {
            let points = s.history.entry(key).or_default();
            points.push_back((
                now,
                requests as f64 / report.window_secs.max(1) as f64,
                (requests > 0).then(|| successes as f64 / requests as f64),
            ));
            while points.len() > HISTORY {
                points.pop_front();
            }
        }
        // Workloads gone quiet for 10 minutes go.
        s.history.retain(|_, p| {
            p.back()
                .is_some_and(|(t, _, _)| now.saturating_sub(*t) < 600)
        });
    }
}
