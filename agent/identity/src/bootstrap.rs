//! The issuer from the cluster, not from `nodemesh install`'s output: the
//! service reads it from a Secret of its own namespace, and on a fresh
//! install — no Secret yet — makes a trust anchor and an issuer and
//! creates it, so the issuer's key is never printed, never in a shell's
//! pipe or a CI log, never in `kubectl.kubernetes.io/last-applied-
//! configuration`. The trust anchor goes to the agents' ConfigMap and the
//! aggregated API's `caBundle`.
//!
//! Two replicas starting at once both try to create it: one wins (the
//! other's create answers 409) and both read the winner's.
use std::{collections::BTreeMap, time::Duration};

use base64::Engine;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use nodemesh_core::pki::{self, PkiError, Signer};
use serde_json::json;
use tracing::info;

/// The key of the trust anchor in the issuer's Secret.
const CA_KEY: &str = "ca.crt";
/// The key of the trust anchors in the agents' ConfigMap.
const BUNDLE_KEY: &str = "ca-bundle.crt";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot read or create Secret {namespace}/{name}: {source}")]
    Secret {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("cannot read or create ConfigMap {namespace}/{name}: {source}")]
    ConfigMap {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("cannot set the caBundle of APIService {name}: {source}")]
    ApiService { name: String, source: kube::Error },
    #[error(
        "Secret {namespace}/{name} holds no {key}: it must be a TLS Secret of the issuer (tls.crt, tls.key)"
    )]
    Incomplete {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error(
        "no trust anchors: neither Secret {namespace}/{secret} (ca.crt) nor ConfigMap {namespace}/{configmap} ({BUNDLE_KEY}) has them"
    )]
    NoAnchors {
        namespace: String,
        secret: String,
        configmap: String,
    },
    #[error("the issuer: {0}")]
    Pki(#[from] PkiError),
}

/// Where the issuer lives.
pub struct ClusterIssuer<'a> {
    pub client: &'a Client,
    pub namespace: &'a str,
    pub secret: &'a str,
    pub configmap: &'a str,
    pub trust_domain: &'a str,
    /// For an issuer made here.
    pub lifetime: Duration,
}

impl ClusterIssuer<'_> {
    /// The issuer (read, or made and stored), and the trust anchors.
    pub async fn load(&self) -> Result<(Signer, String), BootstrapError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), self.namespace);
        let secret_err = |source| BootstrapError::Secret {
            namespace: self.namespace.into(),
            name: self.secret.into(),
            source,
        };
        let secret = match secrets.get_opt(self.secret).await.map_err(secret_err)? {
            Some(s) => s,
            None => self.create(&secrets).await?,
        };
        let data = secret.data.unwrap_or_default();
        let field = |key: &'static str| {
            data.get(key)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .filter(|s| !s.trim().is_empty())
        };
        let incomplete = |key| BootstrapError::Incomplete {
            namespace: self.namespace.into(),
            name: self.secret.into(),
            key,
        };
        let cert = field("tls.crt").ok_or_else(|| incomplete("tls.crt"))?;
        let key = field("tls.key").ok_or_else(|| incomplete("tls.key"))?;
        let anchors = self.anchors(field(CA_KEY)).await?;
        let signer = Signer::load(&cert, &key, &anchors, self.trust_domain)?;
        Ok((signer, anchors))
    }

    /// The metadata of an object this makes: `name` in the service's
    /// namespace, labelled as the install's.
    fn meta(&self, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some(self.namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".into(),
                "nodemesh".into(),
            )])),
            ..ObjectMeta::default()
        }
    }

    /// A trust anchor and an issuer made now, stored; or, if another
    /// replica stored one first, that one.
    async fn create(&self, secrets: &Api<Secret>) -> Result<Secret, BootstrapError> {
        let anchor = pki::generate_trust_anchor(self.trust_domain, self.lifetime * 10)?;
        let issuer = pki::generate_issuer(&anchor, self.trust_domain, self.lifetime)?;
        let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
        let secret = Secret {
            metadata: self.meta(self.secret),
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("tls.crt".into(), bytes(&issuer.cert_pem)),
                ("tls.key".into(), bytes(&issuer.key_pem)),
                (CA_KEY.into(), bytes(&anchor.cert_pem)),
            ])),
            ..Secret::default()
        };
        let secret_err = |source| BootstrapError::Secret {
            namespace: self.namespace.into(),
            name: self.secret.into(),
            source,
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(made) => {
                info!(secret = %format_args!("{}/{}", self.namespace, self.secret), lifetime = ?self.lifetime, "no issuer yet: made a trust anchor and an issuer, stored in the cluster");
                Ok(made)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                secrets.get(self.secret).await.map_err(secret_err)
            }
            Err(e) => Err(secret_err(e)),
        }
    }

    /// The trust anchors: the Secret's (written to the agents' ConfigMap if
    /// it is missing), else the ConfigMap's (an issuer given at install).
    async fn anchors(&self, in_secret: Option<String>) -> Result<String, BootstrapError> {
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), self.namespace);
        let map_err = |source| BootstrapError::ConfigMap {
            namespace: self.namespace.into(),
            name: self.configmap.into(),
            source,
        };
        let existing = maps.get_opt(self.configmap).await.map_err(map_err)?;
        let in_map = existing
            .as_ref()
            .and_then(|m| m.data.as_ref()?.get(BUNDLE_KEY).cloned())
            .filter(|s| !s.trim().is_empty());
        match (in_secret, in_map) {
            // A bundle (several anchors while one is rotated) holding the
            // issuer's anchor, or the only word there is.
            (Some(anchor), Some(bundle)) if bundle.contains(anchor.trim()) => Ok(bundle),
            (None, Some(bundle)) => Ok(bundle),
            (Some(anchor), _) => {
                let map = ConfigMap {
                    metadata: self.meta(self.configmap),
                    data: Some(BTreeMap::from([(BUNDLE_KEY.into(), anchor.clone())])),
                    ..ConfigMap::default()
                };
                let written = match existing {
                    Some(_) => {
                        maps.patch(
                            self.configmap,
                            &PatchParams::default(),
                            &Patch::Merge(&json!({"data": {BUNDLE_KEY: anchor}})),
                        )
                        .await
                    }
                    None => maps.create(&PostParams::default(), &map).await,
                };
                match written {
                    Ok(_) => Ok(anchor),
                    // Another replica wrote it first: the same anchor.
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(anchor),
                    Err(e) => Err(map_err(e)),
                }
            }
            (None, None) => Err(BootstrapError::NoAnchors {
                namespace: self.namespace.into(),
                secret: self.secret.into(),
                configmap: self.configmap.into(),
            }),
        }
    }
}

/// Sets the aggregated API's `caBundle` to `anchors` (what the service's
/// serving certificate chains to), if it is not that already.
pub async fn api_service_ca(
    client: &Client,
    name: &str,
    anchors: &str,
) -> Result<(), BootstrapError> {
    let gvk = GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService");
    let api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "apiservices"),
    );
    let err = |source| BootstrapError::ApiService {
        name: name.into(),
        source,
    };
    let want = base64::engine::general_purpose::STANDARD.encode(anchors.as_bytes());
    let Some(current) = api.get_opt(name).await.map_err(err)? else {
        // Not applied (yet, or at all): nothing to keep.
        return Ok(());
    };
    if current.data["spec"]["caBundle"].as_str() == Some(want.as_str()) {
        return Ok(());
    }
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"caBundle": want}})),
    )
    .await
    .map_err(err)?;
    info!(
        apiservice = name,
        "the aggregated API's caBundle set to the trust anchors"
    );
    Ok(())
}
