//! A Kubernetes client the way every nodemesh process makes one: from a
//! kubeconfig when given, else the pod's service account, else
//! `$KUBECONFIG` or `~/.kube/config`.
use std::path::{Path, PathBuf};

use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not in a cluster and no kubeconfig ({0}); pass --kubeconfig"
    )]
    Infer(kube::config::InferConfigError),
    #[error("cannot make a Kubernetes client: {0}")]
    Client(kube::Error),
}

/// A client from `kubeconfig`, or the in-cluster service account, or
/// `$KUBECONFIG`/`~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                path: path.to_owned(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}
