//! The aggregated API `tap.nodemesh.io/v1alpha1` (an `APIService` points the
//! API server here): how `nodemesh stat|tap|top|edges` and the dashboard
//! read the agents, with Kubernetes RBAC deciding who may.
//!
//! - Only the API server's front proxy gets in: its client certificate must
//!   chain to the request-header CA the API server publishes in
//!   `kube-system/extension-apiserver-authentication` (re-read every
//!   minute) and carry one of the allowed names. The user is then the one
//!   in its `X-Remote-User`/`X-Remote-Group` headers.
//! - The API server has already authorized the request with RBAC; a
//!   SubjectAccessReview checks it again here (`list` on `stat` and
//!   `agents`, `watch` on `tap` and `top`), so nothing reaches an agent for a user RBAC
//!   does not allow.
//! - Agents are reached on their tap ports over mutual TLS as the
//!   service's own identity ([`crate::agents`]).
use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, body::Incoming, header};
use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::ConfigMap,
};
use kube::{Api, Client, api::PostParams};
use nodemesh_core::{
    admin::ndjson,
    names::{API_GROUP, API_VERSION},
    pki::{self, provider},
    wire::{AgentList, STAT_WINDOWS, StatList, TapFilter, percent_decode},
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::CertificateDer,
    server::{ResolvesServerCert, WebPkiClientVerifier},
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::agents::Agents;

pub(crate) type Body = nodemesh_core::admin::AdminBody;

/// What the API server publishes about its front proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FrontProxy {
    ca_pem: String,
    allowed_names: Vec<String>,
    user_headers: Vec<String>,
    group_headers: Vec<String>,
    extra_prefixes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FrontProxyError {
    #[error("cannot read kube-system/extension-apiserver-authentication: {0}")]
    Read(#[from] kube::Error),
    #[error(
        "the API server publishes no requestheader-client-ca-file: start it with --requestheader-client-ca-file and --proxy-client-cert-file so it can reach aggregated APIs"
    )]
    NoCa,
    #[error("the request-header CA: {0}")]
    BadCa(String),
}

/// Reads the front proxy's settings (a JSON list per key, as the API
/// server writes them).
pub(crate) async fn front_proxy(client: &Client) -> Result<FrontProxy, FrontProxyError> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
        .get("extension-apiserver-authentication")
        .await?;
    let data = cm.data.unwrap_or_default();
    let list = |key: &str, default: &[&str]| -> Vec<String> {
        data.get(key)
            .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect())
    };
    let ca_pem = data
        .get("requestheader-client-ca-file")
        .filter(|v| !v.trim().is_empty())
        .cloned()
        .ok_or(FrontProxyError::NoCa)?;
    pki::certs_from_pem(&ca_pem, "request-header CA")
        .map_err(|e| FrontProxyError::BadCa(e.to_string()))?;
    // Absent or empty: any name the CA signed (as the API server reads
    // it); unreadable: no name at all (never open).
    let allowed_names = match data.get("requestheader-allowed-names") {
        None => Vec::new(),
        Some(v) if v.trim().is_empty() => Vec::new(),
        Some(v) => serde_json::from_str::<Vec<String>>(v).map_err(|e| {
            FrontProxyError::BadCa(format!("requestheader-allowed-names {v:?}: {e}"))
        })?,
    };
    Ok(FrontProxy {
        ca_pem,
        allowed_names,
        user_headers: list("requestheader-username-headers", &["X-Remote-User"]),
        group_headers: list("requestheader-group-headers", &["X-Remote-Group"]),
        extra_prefixes: list("requestheader-extra-headers-prefix", &["X-Remote-Extra-"]),
    })
}

impl FrontProxy {
    /// The TLS settings: the serving certificate, and client certificates
    /// checked against the request-header CA (a connection without one
    /// is answered 401, so an operator sees why).
    pub(crate) fn tls(
        &self,
        serving: Arc<dyn ResolvesServerCert>,
    ) -> Result<TlsAcceptor, FrontProxyError> {
        let mut roots = RootCertStore::empty();
        for cert in pki::certs_from_pem(&self.ca_pem, "request-header CA")
            .map_err(|e| FrontProxyError::BadCa(e.to_string()))?
        {
            roots
                .add(cert)
                .map_err(|e| FrontProxyError::BadCa(e.to_string()))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| FrontProxyError::BadCa(e.to_string()))?;
        let mut tls = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| FrontProxyError::BadCa(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(serving);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(tls)))
    }

    /// Whether a verified client certificate is the front proxy's.
    pub(crate) fn allows(&self, certs: Option<&[CertificateDer<'_>]>) -> Result<(), String> {
        let leaf = certs.and_then(|c| c.first()).ok_or_else(|| {
            "no client certificate: only the API server's front proxy may call this API".to_owned()
        })?;
        if self.allowed_names.is_empty() {
            return Ok(());
        }
        let cn = pki::cert_info(leaf)
            .ok()
            .and_then(|i| i.common_name)
            .unwrap_or_default();
        if self.allowed_names.contains(&cn) {
            Ok(())
        } else {
            Err(format!(
                "client certificate {cn:?} is not one of the front proxy's names"
            ))
        }
    }

    /// The user the API server authenticated: name, groups, extra.
    fn user(&self, headers: &HeaderMap) -> Option<User> {
        let name = self
            .user_headers
            .iter()
            .find_map(|h| headers.get(h.as_str()))
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())?
            .to_owned();
        let groups = self
            .group_headers
            .iter()
            .flat_map(|h| headers.get_all(h.as_str()))
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in headers {
            for prefix in &self.extra_prefixes {
                if let Some(key) = k.as_str().strip_prefix(&prefix.to_ascii_lowercase())
                    && let Ok(v) = v.to_str()
                {
                    extra
                        .entry(percent_decode(key))
                        .or_default()
                        .push(v.to_owned());
                }
            }
        }
        Some(User {
            name,
            groups,
            extra,
        })
    }
}

#[derive(Clone, Debug)]
struct User {
    name: String,
    groups: Vec<String>,
    extra: BTreeMap<String, Vec<String>>,
}

/// The API's handlers.
pub(crate) struct AggregatedApi {
    pub client: Client,
    pub agents: Arc<Agents>,
    pub front: RwLock<Option<FrontProxy>>,
}

/// Tap streams served at once (each holds a stream from every agent).
pub(crate) const MAX_TAPS: usize = 32;

impl AggregatedApi {
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        taps: &Arc<tokio::sync::Semaphore>,
    ) -> Response<Body> {
        let base = format!("/apis/{API_GROUP}/{API_VERSION}");
        let path = req.uri().path().trim_end_matches('/');
        if req.method() != Method::GET {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "use GET",
            );
        }
        if path == format!("/apis/{API_GROUP}") {
            return whole_json(
                StatusCode::OK,
                &json!({
                    "kind": "APIGroup", "apiVersion": "v1", "name": API_GROUP,
                    "versions": [{"groupVersion": format!("{API_GROUP}/{API_VERSION}"), "version": API_VERSION}],
                    "preferredVersion": {"groupVersion": format!("{API_GROUP}/{API_VERSION}"), "version": API_VERSION},
                }),
            );
        }
        if path == base {
            return whole_json(
                StatusCode::OK,
                &json!({
                    "kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": format!("{API_GROUP}/{API_VERSION}"),
                    "resources": [
                        {"name": "stat", "singularName": "", "namespaced": true, "kind": "Stat", "verbs": ["list"]},
                        {"name": "tap", "singularName": "", "namespaced": true, "kind": "Tap", "verbs": ["watch"]},
                        {"name": "agents", "singularName": "", "namespaced": false, "kind": "Agent", "verbs": ["list"]},
                        {"name": "top", "singularName": "", "namespaced": true, "kind": "Top", "verbs": ["watch"]},
                    ],
                }),
            );
        }
        // `…/namespaces/<ns>/<resource>`: one namespace (a RoleBinding
        // there is enough); `…/<resource>`: every one (cluster-wide RBAC).
        let Some((namespace, resource)) = path.strip_prefix(&base).and_then(resource_of) else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{base}/[namespaces/<ns>/]stat, tap and top, and {base}/agents only"),
            );
        };
        let front = self.front.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(user) = front.and_then(|f| f.user(req.headers())) else {
            return status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "no user: the API server's front proxy names one",
            );
        };
        let query = req.uri().query().unwrap_or_default().to_owned();
        let verb = if matches!(resource, "tap" | "top") {
            "watch"
        } else {
            "list"
        };
        match self.review(&user, verb, resource, namespace).await {
            Ok(None) => {}
            Ok(Some(why)) => {
                info!(user = %user.name, verb, resource, namespace = namespace.unwrap_or("*"), "refused by RBAC");
                let scope = match namespace {
                    Some(ns) => format!(" in the namespace {ns:?}"),
                    None => " at the cluster scope".into(),
                };
                return status(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!(
                        "{resource}.{API_GROUP} is forbidden: User {:?} cannot {verb} resource {resource:?} in API group {API_GROUP:?}{scope}{}",
                        user.name,
                        if why.is_empty() {
                            String::new()
                        } else {
                            format!(": {why}")
                        }
                    ),
                );
            }
            Err(e) => {
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &format!("cannot check RBAC (SubjectAccessReview): {e}"),
                );
            }
        }
        match resource {
            "stat" => self.stat(&query, namespace).await,
            "agents" => self.nodes().await,
            // What `top` needs: paths and numbers, no identities or
            // authorities (paths are for tappers: they can carry secrets).
            "top" => self.tap(&query, true, taps, namespace).await,
            _ => self.tap(&query, false, taps, namespace).await,
        }
    }

    /// `None` when the user may; else why not.
    async fn review(
        &self,
        user: &User,
        verb: &str,
        resource: &str,
        namespace: Option<&str>,
    ) -> Result<Option<String>, kube::Error> {
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(API_GROUP.into()),
                    version: Some(API_VERSION.into()),
                    resource: Some(resource.into()),
                    verb: Some(verb.into()),
                    namespace: namespace.map(str::to_owned),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &sar)
            .await?;
        let st = reviewed.status.unwrap_or_default();
        Ok((!st.allowed).then(|| st.reason.unwrap_or_default()))
    }

    async fn stat(&self, query: &str, namespace: Option<&str>) -> Response<Body> {
        let window = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("window="))
            .unwrap_or("1m");
        if !STAT_WINDOWS.iter().any(|(w, _)| *w == window) {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "window: one of 10s, 1m, 10m",
            );
        }
        let agents = match self.agents_now().await {
            Ok(a) => a,
            Err(resp) => return resp,
        };
        let mut reports = self.agents.stat(&agents, window).await;
        if let Some(ns) = namespace {
            for report in reports.iter_mut().filter_map(|a| a.report.as_mut()) {
                report.only_namespace(ns);
            }
        }
        let list = StatList {
            kind: "StatList".into(),
            api_version: format!("{API_GROUP}/{API_VERSION}"),
            agents: reports,
        };
        whole_json(StatusCode::OK, &list)
    }

    /// The running agents, or the answer saying why they are not known.
    async fn agents_now(&self) -> Result<Vec<crate::agents::AgentAddr>, Response<Body>> {
        self.agents.list().await.map_err(|e| {
            status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                &format!("cannot list the agents: {e}"),
            )
        })
    }

    async fn nodes(&self) -> Response<Body> {
        let agents = match self.agents_now().await {
            Ok(a) => a,
            Err(resp) => return resp,
        };
        whole_json(
            StatusCode::OK,
            &AgentList {
                kind: "AgentList".into(),
                api_version: format!("{API_GROUP}/{API_VERSION}"),
                agents: self.agents.nodes(&agents).await,
            },
        )
    }

    async fn tap(
        &self,
        query: &str,
        strip: bool,
        taps: &Arc<tokio::sync::Semaphore>,
        namespace: Option<&str>,
    ) -> Response<Body> {
        // `watch=true` makes the API server take it for a long-running
        // request (else it is cut at its request timeout) and authorize
        // `watch`, the verb checked here; the watch parameters generic
        // clients add are the API server's; the rest are the agents' filters.
        if !query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1")
        {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "a tap is a watch: add watch=true",
            );
        }
        const WATCH_PARAMS: [&str; 5] = [
            "watch=",
            "resourceVersion=",
            "timeoutSeconds=",
            "allowWatchBookmarks=",
            "resourceVersionMatch=",
        ];
        // In a namespace, only its workloads are tapped, whatever the
        // query says.
        let scoped = namespace.map(|ns| format!("namespace={ns}"));
        let filters: Vec<&str> = query
            .split('&')
            .filter(|kv| !kv.is_empty() && !WATCH_PARAMS.iter().any(|p| kv.starts_with(p)))
            .filter(|kv| scoped.is_none() || !kv.starts_with("namespace="))
            .chain(scoped.as_deref())
            .collect();
        let filters = filters.join("&");
        if let Err(e) = TapFilter::parse(&filters) {
            return status(StatusCode::BAD_REQUEST, "BadRequest", &e);
        }
        let Ok(permit) = taps.clone().try_acquire_owned() else {
            return status(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                &format!("{MAX_TAPS} taps already running; try again later"),
            );
        };
        let agents = match self.agents_now().await {
            Ok(a) => a,
            Err(resp) => return resp,
        };
        if agents.is_empty() {
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "no agent is running (is the nodemesh-agent DaemonSet up?)",
            );
        }
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let follower = self.agents.clone();
        tokio::spawn(async move {
            // The tap's slot is taken until its reader goes.
            let _permit = permit;
            follower.follow_all(agents, filters, strip, tx).await
        });
        ndjson(rx)
    }
}

/// A path below the API's version: (its namespace, the resource), for
/// `/<resource>` and `/namespaces/<ns>/<resource>` (`agents` is the
/// cluster's only).
fn resource_of(rest: &str) -> Option<(Option<&str>, &'static str)> {
    let (namespace, name) = match rest.strip_prefix("/namespaces/") {
        Some(scoped) => {
            let (ns, name) = scoped.split_once('/')?;
            nodemesh_core::names::is_dns_label(ns).then_some((Some(ns), name))?
        }
        None => (None, rest.strip_prefix('/')?),
    };
    let resource = match name {
        "stat" => "stat",
        "tap" => "tap",
        "top" => "top",
        "agents" if namespace.is_none() => "agents",
        _ => return None,
    };
    Some((namespace, resource))
}

pub(crate) fn whole_json(code: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(serde_json::to_vec(value).unwrap_or_default())).boxed(),
    );
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A Kubernetes `Status` (clients show its message).
pub(crate) fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    whole_json(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

/// Keeps the front proxy's settings current (the API server may rotate its
/// request-header CA): `front` and the acceptor are replaced on change.
pub(crate) async fn follow_front_proxy(
    api: Arc<AggregatedApi>,
    acceptor: Arc<RwLock<Option<TlsAcceptor>>>,
    serving: Arc<dyn ResolvesServerCert>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut last_error = String::new();
    loop {
        match front_proxy(&api.client).await {
            Ok(front) => {
                let changed =
                    api.front.read().unwrap_or_else(|p| p.into_inner()).as_ref() != Some(&front);
                if changed {
                    match front.tls(serving.clone()) {
                        Ok(tls) => {
                            info!(allowed_names = ?front.allowed_names, "aggregated API: front proxy settings read");
                            *acceptor.write().unwrap_or_else(|p| p.into_inner()) = Some(tls);
                            *api.front.write().unwrap_or_else(|p| p.into_inner()) = Some(front);
                        }
                        Err(e) => {
                            warn!(error = %e, "aggregated API: unusable front proxy settings")
                        }
                    }
                }
                last_error.clear();
            }
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    warn!(error = %text, "aggregated API: cannot read the front proxy settings; nodemesh stat/tap through the API server will not work until they can be");
                    last_error = text;
                }
            }
        }
        let wait = if api
            .front
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(5)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn front(allowed: &[&str]) -> FrontProxy {
        FrontProxy {
            ca_pem: String::new(),
            allowed_names: allowed.iter().map(|s| s.to_string()).collect(),
            user_headers: vec!["X-Remote-User".into()],
            group_headers: vec!["X-Remote-Group".into()],
            extra_prefixes: vec!["X-Remote-Extra-".into()],
        }
    }

    #[test]
    fn the_user_is_read_from_the_front_proxys_headers() {
        let mut h = HeaderMap::new();
        assert!(front(&[]).user(&h).is_none(), "no user, no request");
        h.insert("x-remote-user", "alice".parse().unwrap());
        h.append("x-remote-group", "dev".parse().unwrap());
        h.append("x-remote-group", "system:authenticated".parse().unwrap());
        h.append("x-remote-extra-scopes%2fa", "one".parse().unwrap());
        let u = front(&[]).user(&h).expect("a user");
        assert_eq!(u.name, "alice");
        assert_eq!(u.groups, ["dev", "system:authenticated"]);
        assert_eq!(u.extra["scopes/a"], ["one"]);
    }

    #[test]
    fn resources_are_namespaced_but_the_agents() {
        assert_eq!(resource_of("/stat"), Some((None, "stat")));
        assert_eq!(
            resource_of("/namespaces/shop/tap"),
            Some((Some("shop"), "tap"))
        );
        assert_eq!(
            resource_of("/namespaces/shop/top"),
            Some((Some("shop"), "top"))
        );
        assert_eq!(resource_of("/agents"), Some((None, "agents")));
        assert_eq!(resource_of("/namespaces/shop/agents"), None);
        assert_eq!(resource_of("/namespaces/Not_A_Name/stat"), None);
        assert_eq!(resource_of("/namespaces//stat"), None);
        assert_eq!(resource_of("/namespaces/shop/stat/extra"), None);
        assert_eq!(resource_of("/secrets"), None);
    }

    #[test]
    fn only_the_allowed_names_and_only_with_a_certificate() {
        let anchor =
            pki::generate_trust_anchor("front", std::time::Duration::from_secs(60)).unwrap();
        let der = pki::certs_from_pem(&anchor.cert_pem, "cert").unwrap();
        assert!(front(&[]).allows(None).is_err());
        assert!(
            front(&[]).allows(Some(&der)).is_ok(),
            "any name when none listed"
        );
        let cn = pki::cert_info(&der[0])
            .unwrap()
            .common_name
            .unwrap_or_default();
        assert!(front(&[&cn]).allows(Some(&der)).is_ok(), "{cn}");
        assert!(front(&["front-proxy-client"]).allows(Some(&der)).is_err());
    }
}
