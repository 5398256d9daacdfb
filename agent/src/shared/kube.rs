//! The Kubernetes API client both loops use: the kube subnet manager of the overlay
//! ([`crate::overlay::source::kube`], with flannel's node annotations) and the Services and
//! EndpointSlices source of the service proxy ([`crate::services::source::kube`], with
//! kube-proxy's health server in [`crate::services::healthz`]).
//!
//! Why this shape:
//! - Both halves of the agent keep their seams: the overlay loop sees one more
//!   [`crate::overlay::source::LeaseStore`] (Nodes instead of etcd keys) and the service loop one more
//!   source of [`crate::services::source::SourceUpdate`]s. Nothing downstream of a seam knows
//!   Kubernetes exists, so the reconcilers, their tests and their behaviour when the source is
//!   away (keep the dataplane as it is) are the same in both modes.
//! - Objects are converted into the model at the edge, through the model's own parser and
//!   validation: a Service means the same thing whether it came from etcd or the API server,
//!   and an object twill cannot program faithfully is refused (treated as absent, logged and
//!   counted) rather than half-programmed.
//! - The client is configured as flannel's `--kube-api-url` / `--kubeconfig-file` do
//!   (client-go's `BuildConfigFromFlags`): a kubeconfig file, optionally with its server
//!   replaced by the URL; the URL alone (no credentials, for a local or test API server); or,
//!   with neither, the in-cluster service account (`KUBERNETES_SERVICE_HOST`/`_PORT`, the token
//!   and CA under `/var/run/secrets/kubernetes.io/serviceaccount`), which is how the DaemonSet
//!   in `deploy/` runs.

use std::path::{Path, PathBuf};

/// Errors talking to Kubernetes.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// `--kube-api-url` is not a URL.
    #[error("--kube-api-url {url:?} is not a URL: {source}")]
    BadUrl {
        /// The flag's value.
        url: String,
        /// The parser's error.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither flag was given and the in-cluster configuration is not there.
    #[error(
        "no Kubernetes API configured: give --kube-api-url or --kubeconfig, or run in a pod \
         (in-cluster config: {source})"
    )]
    NotInCluster {
        /// Why the in-cluster configuration failed.
        #[source]
        source: kube::config::InClusterError,
    },
    /// The client could not be built from the configuration.
    #[error("create the Kubernetes client for {url}: {source}")]
    Client {
        /// The API server URL.
        url: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// An API call failed.
    #[error("kubernetes {op} {object}: {source}")]
    Api {
        /// The call (`get`, `list`, `watch`, `patch status`).
        op: &'static str,
        /// The object or collection (`node n1`, `nodes`).
        object: String,
        /// The client's error (an API `Status` keeps its code and reason).
        #[source]
        source: kube::Error,
    },
}

/// The API server configuration the flags name, as client-go's `BuildConfigFromFlags` builds it.
pub async fn config(
    api_url: Option<&str>,
    kubeconfig: Option<&Path>,
) -> Result<kube::Config, KubeError> {
    let url = |u: &str| {
        u.parse::<http::Uri>().map_err(|source| KubeError::BadUrl {
            url: u.to_string(),
            source,
        })
    };
    match (api_url, kubeconfig) {
        (_, Some(path)) => {
            let err = |source| KubeError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            let mut cfg = kube::Config::from_custom_kubeconfig(
                file,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(err)?;
            if let Some(u) = api_url {
                cfg.cluster_url = url(u)?;
            }
            Ok(cfg)
        }
        (Some(u), None) => Ok(kube::Config::new(url(u)?)),
        (None, None) => {
            kube::Config::incluster().map_err(|source| KubeError::NotInCluster { source })
        }
    }
}

/// Which API server to talk to (flannel's `--kube-api-url` and `--kubeconfig-file`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeApi {
    /// The server's URL; with a kubeconfig, replaces its server.
    pub url: Option<String>,
    /// A kubeconfig file.
    pub kubeconfig: Option<PathBuf>,
}

impl KubeApi {
    /// The API server configuration, as client-go's `BuildConfigFromFlags` builds it.
    pub async fn config(&self) -> Result<kube::Config, KubeError> {
        config(self.url.as_deref(), self.kubeconfig.as_deref()).await
    }

    /// A client for the API server.
    pub async fn client(&self) -> Result<kube::Client, KubeError> {
        let cfg = self.config().await?;
        let url = cfg.cluster_url.to_string();
        kube::Client::try_from(cfg).map_err(|source| KubeError::Client { url, source })
    }
}

/// `op object: error` for an API call.
pub(crate) fn api_err(
    op: &'static str,
    object: impl Into<String>,
) -> impl FnOnce(kube::Error) -> KubeError {
    let object = object.into();
    move |source| KubeError::Api { op, object, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::testutil::TempDir;

    #[tokio::test]
    async fn configuration_from_flags() {
        let c = config(Some("http://198.18.0.1:8080"), None).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "http://198.18.0.1:8080/");
        let e = config(Some("not a url"), None).await.unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--kube-api-url \"not a url\" is not a URL"),
            "{e}"
        );
        let dir = TempDir::new("kubeconfig");
        let path = dir.write(
            "config",
            "apiVersion: v1\nkind: Config\ncurrent-context: x\n\
             clusters: [{name: c, cluster: {server: 'https://10.0.0.1:6443', insecure-skip-tls-verify: true}}]\n\
             users: [{name: u, user: {token: abc}}]\n\
             contexts: [{name: x, context: {cluster: c, user: u}}]\n",
        );
        let c = config(None, Some(&path)).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://10.0.0.1:6443/");
        // --kube-api-url replaces the kubeconfig's server, as flannel's flags do.
        let c = config(Some("https://10.0.0.2:6443"), Some(&path))
            .await
            .unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://10.0.0.2:6443/");
        let missing = dir.path().join("missing");
        let e = config(None, Some(&missing)).await.unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("kubeconfig {}", missing.display())),
            "{e}"
        );
    }
}
