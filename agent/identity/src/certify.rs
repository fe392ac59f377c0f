//! The certify endpoint: who asks (TokenReview), from where (the pod its
//! token is bound to), for what (a pod of that service account on that
//! node), then the signature.
use std::{net::SocketAddr, time::SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use nodemesh_core::{
    identity::{CERTIFY_PATH, Identity, MIN_CERT_LIFETIME, TOKEN_AUDIENCE},
    label_values,
    names::{MeshLabel, mesh_decision},
    pki::PkiError,
    wire::{CertifyError, CertifyRequest, CertifyResponse},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Serialize;
use tracing::{info, warn};

use crate::{config::IdentityConfig, reviews::Reviews};

label_values! {
    /// How a certify request ended.
    pub enum CertifyResult {
        Ok => "ok",
        /// No token, or the API server does not accept it.
        Unauthenticated => "unauthenticated",
        /// The token is not an agent's (its service account, or a pod the
        /// agents' DaemonSet does not control).
        NotAnAgent => "not_an_agent",
        /// The token is not bound to a pod, or that pod is gone.
        UnboundToken => "unbound_token",
        /// No meshed pod with that service account runs on the agent's
        /// node (an unmeshed or host-network one does not count).
        NotOnNode => "not_on_node",
        /// One of the install's own service accounts (the identity
        /// service's, say): never a workload's.
        Reserved => "reserved",
        /// Malformed request or CSR.
        BadRequest => "bad_request",
        /// The API server could not be asked.
        ApiError => "api_error",
        /// Signing failed.
        SigningError => "signing_error",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: CertifyResult,
}

/// The certify endpoint and what it needs.
pub(crate) struct Service {
    pub(crate) cfg: IdentityConfig,
    pub(crate) signer: std::sync::Arc<nodemesh_core::pki::Signer>,
    client: Client,
    results: Family<ResultLabels, Counter>,
    /// Accepted tokens' reviews, for their life.
    reviews: Reviews,
}

type Answer = Result<CertifyResponse, (CertifyResult, String)>;

/// The review says the token was made for the identity service.
fn for_us(status: &k8s_openapi::api::authentication::v1::TokenReviewStatus) -> bool {
    status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == TOKEN_AUDIENCE))
}

impl Service {
    pub(crate) fn new(
        cfg: IdentityConfig,
        signer: std::sync::Arc<nodemesh_core::pki::Signer>,
        client: Client,
        registry: &mut Registry,
    ) -> Self {
        let results = Family::<ResultLabels, Counter>::default();
        registry.register(
            "identity_certify",
            "Certificate requests the identity service answered, by result",
            results.clone(),
        );
        Self {
            cfg,
            signer,
            client,
            results,
            reviews: Reviews::default(),
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        if req.uri().path() != CERTIFY_PATH {
            return json(
                StatusCode::NOT_FOUND,
                &CertifyError {
                    error: "not_found".into(),
                    message: format!("only POST {} is served", CERTIFY_PATH),
                },
            );
        }
        if req.method() != Method::POST {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                &CertifyError {
                    error: "method_not_allowed".into(),
                    message: "use POST".into(),
                },
            );
        }
        let answer = self.certify(req).await;
        let result = match &answer {
            Ok(_) => CertifyResult::Ok,
            Err((r, _)) => *r,
        };
        self.results.get_or_create(&ResultLabels { result }).inc();
        match answer {
            Ok(ok) => json(StatusCode::OK, &ok),
            Err((result, message)) => {
                warn!(%peer, %result, %message, "certificate request refused");
                let status = match result {
                    CertifyResult::Unauthenticated => StatusCode::UNAUTHORIZED,
                    CertifyResult::NotAnAgent
                    | CertifyResult::UnboundToken
                    | CertifyResult::NotOnNode
                    | CertifyResult::Reserved => StatusCode::FORBIDDEN,
                    CertifyResult::BadRequest => StatusCode::BAD_REQUEST,
                    CertifyResult::ApiError => StatusCode::SERVICE_UNAVAILABLE,
                    CertifyResult::SigningError | CertifyResult::Ok => {
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                };
                // What the API server said stays in the log: a caller it
                // did not authenticate learns nothing of it.
                let message = match result {
                    CertifyResult::Unauthenticated => {
                        "the token is not accepted: send the agent's projected service-account token".into()
                    }
                    CertifyResult::ApiError => {
                        "the identity service cannot ask the API server now; try again".into()
                    }
                    _ => message,
                };
                json(
                    status,
                    &CertifyError {
                        error: result.as_str().into(),
                        message,
                    },
                )
            }
        }
    }

    async fn certify(&self, req: Request<Incoming>) -> Answer {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or((
                CertifyResult::Unauthenticated,
                "no bearer token: send the agent's service-account token".into(),
            ))?;
        let body = Limited::new(req.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| {
                (
                    CertifyResult::BadRequest,
                    format!("cannot read the body: {e}"),
                )
            })?
            .to_bytes();
        let request: CertifyRequest = serde_json::from_slice(&body)
            .map_err(|e| (CertifyResult::BadRequest, format!("malformed request: {e}")))?;
        let identity = Identity::new(&request.namespace, &request.service_account)
            .map_err(|e| (CertifyResult::BadRequest, e.to_string()))?;

        // 1. Who is asking (an accepted token once per its life).
        let status = match self.reviews.get(&token) {
            Some(status) => status,
            None => {
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: token.clone(),
                        audiences: Some(vec![TOKEN_AUDIENCE.into()]),
                    },
                    ..TokenReview::default()
                };
                let reviewed = Api::<TokenReview>::all(self.client.clone())
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|e| (CertifyResult::ApiError, format!("TokenReview failed: {e}")))?;
                let status = reviewed.status.unwrap_or_default();
                if status.authenticated == Some(true) && for_us(&status) {
                    self.reviews.put(&token, &status);
                }
                status
            }
        };
        let for_us = for_us(&status);
        if status.authenticated != Some(true) || !for_us {
            return Err((
                CertifyResult::Unauthenticated,
                format!(
                    "the API server does not accept the token for audience {}{}",
                    TOKEN_AUDIENCE,
                    status.error.map(|e| format!(": {e}")).unwrap_or_default()
                ),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if !self.cfg.agent_service_accounts.contains(&username) {
            return Err((
                CertifyResult::NotAnAgent,
                format!("{username:?} is not a nodemesh agent's service account"),
            ));
        }
        // 2. Where it runs: the pod its token is bound to, which the
        // agents' DaemonSet controls.
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (
            first("authentication.kubernetes.io/pod-name"),
            first("authentication.kubernetes.io/pod-uid"),
        ) else {
            return Err((
                CertifyResult::UnboundToken,
                "the token is not bound to a pod: agents must use their projected service-account token".into(),
            ));
        };
        let (agent_ns, agent_sa) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(ns, sa)| (ns.to_owned(), sa.to_owned()))
            .unwrap_or_default();
        let agent_pod = Api::<Pod>::namespaced(self.client.clone(), &agent_ns)
            .get_opt(&pod_name)
            .await
            .map_err(|e| {
                (
                    CertifyResult::ApiError,
                    format!("cannot read the agent's pod: {e}"),
                )
            })?
            .filter(|p| p.metadata.uid.as_deref() == Some(pod_uid.as_str()))
            .ok_or_else(|| {
                (
                    CertifyResult::UnboundToken,
                    format!("the token's pod {agent_ns}/{pod_name} ({pod_uid}) no longer exists"),
                )
            })?;
        self.controlled_by_the_agents(&agent_pod, &agent_ns, &pod_name)
            .await?;
        let node = agent_pod.spec.and_then(|s| s.node_name).ok_or_else(|| {
            (
                CertifyResult::UnboundToken,
                format!("the agent pod {agent_ns}/{pod_name} is not scheduled to a node"),
            )
        })?;
        // 3. Node authorization: the agent's own identity, or one of a
        // meshed workload pod on its node — never one of the install's
        // other accounts (the identity service's would open every node's
        // tap port).
        let own = identity.namespace == agent_ns && identity.service_account == agent_sa;
        if !own {
            if self
                .cfg
                .reserved_namespaces()
                .any(|ns| ns == identity.namespace)
            {
                return Err((
                    CertifyResult::Reserved,
                    format!("{identity} is one of the install's own service accounts"),
                ));
            }
            self.meshed_pod_on(&identity, &node).await?;
        }
        // 4. Sign, unless the issuer is about to expire (certificates are
        // capped at its expiry; ever shorter ones would only be asked again).
        let issuer_left = self
            .signer
            .issuer_not_after()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if issuer_left < MIN_CERT_LIFETIME * 6 {
            return Err((
                CertifyResult::SigningError,
                format!("the issuer certificate expires in {issuer_left:?}: rotate the issuer"),
            ));
        }
        let issued = self
            .signer
            .sign_csr(&request.csr, &identity, self.cfg.cert_lifetime)
            .map_err(|e| match e {
                PkiError::BadCsr(_) => (CertifyResult::BadRequest, e.to_string()),
                e => (CertifyResult::SigningError, e.to_string()),
            })?;
        info!(identity = %identity.spiffe_id(self.signer.trust_domain()), %node, agent = %pod_name, "certificate signed");
        Ok(CertifyResponse {
            certificate: issued.cert_pem,
            chain: issued.chain_pem,
            not_after: issued
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }
}

impl Service {
    /// Whether `pod` (an agent's, by its token) is one the agents'
    /// DaemonSet controls: its controller reference names the live
    /// DaemonSet, by uid.
    async fn controlled_by_the_agents(
        &self,
        pod: &Pod,
        namespace: &str,
        name: &str,
    ) -> Result<(), (CertifyResult, String)> {
        let wanted = &self.cfg.agent_daemonset;
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true));
        let Some(owner) = owner.filter(|o| o.kind == "DaemonSet" && &o.name == wanted) else {
            return Err((
                CertifyResult::NotAnAgent,
                format!(
                    "the token's pod {namespace}/{name} is not controlled by DaemonSet {wanted}"
                ),
            ));
        };
        let ds = Api::<DaemonSet>::namespaced(self.client.clone(), namespace)
            .get_opt(wanted)
            .await
            .map_err(|e| {
                (
                    CertifyResult::ApiError,
                    format!("cannot read DaemonSet {namespace}/{wanted}: {e}"),
                )
            })?;
        if ds.and_then(|d| d.metadata.uid).as_deref() != Some(owner.uid.as_str()) {
            return Err((
                CertifyResult::NotAnAgent,
                format!(
                    "the token's pod {namespace}/{name} names a DaemonSet {wanted} that is not the live one"
                ),
            ));
        }
        Ok(())
    }

    /// Whether a meshed pod of `identity` that is not on the host's network
    /// and has not finished runs on `node`.
    async fn meshed_pod_on(
        &self,
        identity: &Identity,
        node: &str,
    ) -> Result<(), (CertifyResult, String)> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), &identity.namespace)
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| (CertifyResult::ApiError, format!("cannot list pods: {e}")))?;
        let candidates: Vec<&Pod> = pods
            .items
            .iter()
            .filter(|p| {
                let spec = p.spec.as_ref();
                let sa = spec
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default");
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                sa == identity.service_account
                    && !matches!(phase, Some("Succeeded" | "Failed"))
                    && !spec.and_then(|s| s.host_network).unwrap_or(false)
            })
            .collect();
        if candidates.is_empty() {
            return Err((
                CertifyResult::NotOnNode,
                format!(
                    "no pod with service account {identity} runs on node {node:?}, the agent's node"
                ),
            ));
        }
        let namespace_label = if candidates.iter().any(|p| pod_label(p).is_none()) {
            let ns = Api::<Namespace>::all(self.client.clone())
                .get_opt(&identity.namespace)
                .await
                .map_err(|e| {
                    (
                        CertifyResult::ApiError,
                        format!("cannot read namespace {}: {e}", identity.namespace),
                    )
                })?;
            ns.and_then(|n| n.metadata.labels)
                .and_then(|l| MeshLabel::parse(&l).ok().flatten())
        } else {
            None
        };
        if candidates
            .iter()
            .any(|p| mesh_decision(pod_label(p), namespace_label))
        {
            Ok(())
        } else {
            Err((
                CertifyResult::NotOnNode,
                format!(
                    "no meshed pod with service account {identity} runs on node {node:?}, the agent's node (unmeshed and host-network pods get no identity)"
                ),
            ))
        }
    }
}

/// A pod's own `nodemesh.io/mesh` label (an unreadable value counts as
/// none: the namespace decides, as the agents do).
fn pod_label(pod: &Pod) -> Option<MeshLabel> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| MeshLabel::parse(l).ok().flatten())
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let text = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
