//! The kube subnet manager (`--kube-subnet-mgr`): a [`LeaseStore`] over Kubernetes Nodes, so
//! the overlay loop runs unchanged with Kubernetes assigning the subnets.
//!
//! Why this shape:
//! - flannel's model (`pkg/subnet/kube/kube.go`): the controller manager assigns each node its
//!   `spec.podCIDRs`; the agent publishes its backend attributes as annotations on its own Node
//!   ([`super::annotations`]) and reads every other node's as a lease. There is no TTL and
//!   nothing to renew: a lease lasts as long as the Node.
//! - The annotations are written with a strategic-merge patch of the `nodes/status`
//!   subresource, as flannel does; that is the permission flannel's RBAC (and twill's, in
//!   `deploy/`) grants, and it touches no other field of the Node.
//! - The store lists Nodes and then watches from the list's `resourceVersion` with bookmarks,
//!   re-watching from the last version it saw when a watch times out; a `410 Gone` or a broken
//!   connection ends [`LeaseStore::watch`] and the agent's lease cache re-lists (with backoff),
//!   exactly as it does for etcd's compaction. A Node that stops being a valid lease (its
//!   annotations removed or broken) is reported as deleted, so the overlay forgets it.
//! - The network config is a file (flannel's `--net-config-path`, a ConfigMap in `deploy/`),
//!   read at start and re-read on every resync like the etcd key, so a change is reported
//!   (restart to apply) and an invalid one is refused.
//! - The overlay loop is generic over [`LeaseStore`] and does not change: the agent picks the
//!   store at start and runs the same loop over either.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use tokio::sync::mpsc;

use super::annotations::{self, AnnotationError, Annotations};
use crate::overlay::config::{ConfigError, NetworkConfig};
use crate::overlay::lease::LEASE_TTL;
use crate::overlay::lease::{LeaseAttrs, LeaseSubnets};
use crate::overlay::source::{HeldLease, LeaseEvent, LeaseStore, Listing, StoreError, StoredLease};
use crate::shared::kube::KubeApi;
use crate::shared::kube::{KubeError, api_err};

/// The watch timeout asked of the API server (client-go's informers use 5-10 min; kube-rs 290 s).
const WATCH_TIMEOUT_SECS: u32 = 290;

/// Errors of the kube subnet manager.
#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    /// The network config file could not be read.
    #[error("read network config {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The network config file is invalid.
    #[error("refusing network config {path}: {source}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ConfigError,
    },
    /// An API call failed.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// The node, its `podCIDRs` or the annotation prefix is unusable.
    #[error(transparent)]
    Node(#[from] AnnotationError),
    /// A watch ended with an error status (`410 Gone`: the version is too old; re-list).
    #[error("kubernetes watch nodes: {code} {reason}: {message}")]
    WatchStatus {
        /// HTTP status code.
        code: u16,
        /// The status' reason (`Expired`, `Gone`).
        reason: String,
        /// Its message.
        message: String,
    },
    /// Called to choose a subnet, which Kubernetes does in this mode.
    #[error("subnets are assigned by Kubernetes (node.spec.podCIDRs) in kube-subnet-mgr mode")]
    Assigned,
}

impl From<SubnetError> for StoreError {
    fn from(e: SubnetError) -> Self {
        StoreError::Kube(Box::new(e))
    }
}

/// Reads and validates the network config file.
pub fn read_config(path: &Path) -> Result<(String, NetworkConfig), SubnetError> {
    let text = std::fs::read_to_string(path).map_err(|source| SubnetError::ReadConfig {
        path: path.to_path_buf(),
        source,
    })?;
    let cfg = NetworkConfig::parse(&text).map_err(|source| SubnetError::BadConfig {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((text, cfg))
}

/// Leases from Kubernetes Nodes.
#[derive(Clone)]
pub struct KubeSubnetStore {
    api: Api<Node>,
    node: String,
    annotations: Annotations,
    config_path: PathBuf,
    cfg: NetworkConfig,
}

fn parse_rv(rv: Option<&str>) -> i64 {
    rv.and_then(|v| v.parse().ok()).unwrap_or(0)
}

impl KubeSubnetStore {
    /// The store for node `node`, with the network config at `config_path` (read and validated
    /// now: which families are enabled decides which `podCIDRs` make a lease).
    pub fn new(
        client: kube::Client,
        node: &str,
        annotation_prefix: &str,
        config_path: &Path,
    ) -> Result<Self, SubnetError> {
        let (_, cfg) = read_config(config_path)?;
        Ok(KubeSubnetStore {
            api: Api::all(client),
            node: node.to_string(),
            annotations: Annotations::new(annotation_prefix)?,
            config_path: config_path.to_path_buf(),
            cfg,
        })
    }

    /// The store of node `node` on the API server `api`.
    pub async fn connect(
        api: &KubeApi,
        node: &str,
        annotation_prefix: &str,
        config_path: &Path,
    ) -> Result<Self, SubnetError> {
        Self::new(api.client().await?, node, annotation_prefix, config_path)
    }

    /// Where the network config comes from, for messages: the file.
    pub fn config_location(&self) -> String {
        self.config_path.display().to_string()
    }

    fn decode(&self, node: &Node) -> Option<StoredLease> {
        match annotations::node_lease(&self.annotations, &self.cfg, node) {
            Ok(Some(lease)) => Some(StoredLease {
                lease,
                mod_revision: parse_rv(node.metadata.resource_version.as_deref()),
                // Kubernetes assigns podCIDRs without overlaps; the version orders them anyway.
                create_revision: parse_rv(node.metadata.resource_version.as_deref()),
                etcd_lease: 0,
            }),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring node as a lease");
                None
            }
        }
    }

    /// A watch event as lease events: a node that is not (or no longer) a valid lease is a
    /// delete of its subnets, which the cache ignores if it never had them.
    fn events(
        &self,
        ev: WatchEvent<Node>,
    ) -> Result<(Option<String>, Vec<LeaseEvent>), SubnetError> {
        Ok(match ev {
            WatchEvent::Added(n) | WatchEvent::Modified(n) => {
                let rv = n.metadata.resource_version.clone();
                let at = parse_rv(rv.as_deref());
                let ev = match self.decode(&n) {
                    Some(l) => Some(LeaseEvent::Put(l)),
                    None => annotations::node_subnets(&self.cfg, &n)
                        .ok()
                        .map(|s| LeaseEvent::Delete(s, at)),
                };
                (rv, ev.into_iter().collect())
            }
            WatchEvent::Deleted(n) => {
                let rv = n.metadata.resource_version.clone();
                let at = parse_rv(rv.as_deref());
                let ev = annotations::node_subnets(&self.cfg, &n)
                    .ok()
                    .map(|s| LeaseEvent::Delete(s, at));
                (rv, ev.into_iter().collect())
            }
            WatchEvent::Bookmark(b) => (Some(b.metadata.resource_version), Vec::new()),
            WatchEvent::Error(s) => {
                return Err(SubnetError::WatchStatus {
                    code: s.code,
                    reason: s.reason.clone(),
                    message: s.message.clone(),
                });
            }
        })
    }

    async fn watch_inner(&self, revision: i64, tx: &mpsc::Sender<Vec<LeaseEvent>>) -> SubnetError {
        let mut rv = revision.to_string();
        // Bookmarks are on by default: the version advances while nothing changes.
        let wp = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
        loop {
            let mut stream = match self.api.watch(&wp, &rv).await {
                Ok(s) => s.boxed(),
                Err(e) => return api_err("watch", "nodes")(e).into(),
            };
            // The server ends a watch after its timeout: watch again from where we are.
            loop {
                // kube-rs' idle bound: the server's timeout plus a margin, then re-watch.
                let next = tokio::time::timeout(
                    Duration::from_secs(u64::from(WATCH_TIMEOUT_SECS) + 5),
                    stream.next(),
                );
                let ev = match next.await {
                    Ok(Some(Ok(ev))) => ev,
                    Ok(Some(Err(e))) => return api_err("watch", "nodes")(e).into(),
                    Ok(None) | Err(_) => break,
                };
                match self.events(ev) {
                    Ok((new_rv, batch)) => {
                        if let Some(v) = new_rv.filter(|v| !v.is_empty()) {
                            rv = v;
                        }
                        if !batch.is_empty() && tx.send(batch).await.is_err() {
                            return SubnetError::WatchStatus {
                                code: 0,
                                reason: "Closed".into(),
                                message: "receiver gone".into(),
                            };
                        }
                    }
                    Err(e) => return e,
                }
            }
        }
    }
}

impl LeaseStore for KubeSubnetStore {
    async fn get_config(&self) -> Result<String, StoreError> {
        Ok(read_config(&self.config_path)?.0)
    }

    async fn list(&self) -> Result<Listing, StoreError> {
        let list = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(api_err("list", "nodes"))
            .map_err(SubnetError::from)?;
        Ok(Listing {
            leases: list.items.iter().filter_map(|n| self.decode(n)).collect(),
            revision: parse_rv(list.metadata.resource_version.as_deref()),
            cluster_id: 0,
        })
    }

    async fn create(
        &self,
        _subnets: LeaseSubnets,
        _attrs: &LeaseAttrs,
        _ttl: Duration,
    ) -> Result<Option<HeldLease>, StoreError> {
        Err(SubnetError::Assigned.into())
    }

    async fn reclaim(
        &self,
        _old: &StoredLease,
        _attrs: &LeaseAttrs,
        _ttl: Duration,
    ) -> Result<Option<HeldLease>, StoreError> {
        Err(SubnetError::Assigned.into())
    }

    async fn renew(&self, _held: &HeldLease) -> Result<SystemTime, StoreError> {
        // Nothing expires: the lease lasts as long as the Node (flannel: "unimplemented").
        Ok(SystemTime::now() + LEASE_TTL)
    }

    async fn watch(&self, revision: i64, tx: mpsc::Sender<Vec<LeaseEvent>>) -> StoreError {
        self.watch_inner(revision, &tx).await.into()
    }

    async fn acquire_assigned(
        &self,
        cfg: &NetworkConfig,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<HeldLease>, StoreError> {
        let object = format!("node {}", self.node);
        let node = self
            .api
            .get(&self.node)
            .await
            .map_err(api_err("get", &object))
            .map_err(SubnetError::from)?;
        let subnets = annotations::own_subnets(cfg, &node).map_err(SubnetError::from)?;
        let current = node.metadata.annotations.clone().unwrap_or_default();
        let patch = annotations::annotation_patch(&self.annotations, attrs, &current);
        if !patch.is_empty() {
            let body = serde_json::json!({"metadata": {"annotations": patch}});
            self.api
                .patch_status(&self.node, &PatchParams::default(), &Patch::Strategic(body))
                .await
                .map_err(api_err("patch status", &object))
                .map_err(SubnetError::from)?;
            tracing::info!(node = %self.node, subnet = %subnets.key(), "published the node's lease annotations");
        }
        Ok(Some(HeldLease {
            subnets,
            etcd_lease: 0,
            expires: SystemTime::now() + ttl,
            revision: 0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::testutil::TempDir;
    use kube::core::watch::Bookmark;

    fn store(dir: &TempDir) -> KubeSubnetStore {
        let path = dir.write(
            "net-conf.json",
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        );
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        KubeSubnetStore::new(client, "n1", annotations::DEFAULT_PREFIX, &path).unwrap()
    }

    fn node(rv: &str, annotated: bool) -> Node {
        let mut ann = serde_json::json!({"node.alpha.kubernetes.io/ttl": "0"});
        if annotated {
            for (k, v) in [
                ("backend-data", r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}"#),
                ("backend-type", "vxlan"),
                ("kube-subnet-manager", "true"),
                ("public-ip", "198.18.0.12"),
            ] {
                ann[format!("flannel.alpha.coreos.com/{k}")] = serde_json::json!(v);
            }
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n2", "resourceVersion": rv, "annotations": ann},
            "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24"]}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn node_events_become_lease_events() {
        let dir = TempDir::new("ksm");
        let s = store(&dir);
        let sn: LeaseSubnets = LeaseSubnets::parse_key("10.244.2.0-24").unwrap();

        let (rv, evs) = s.events(WatchEvent::Added(node("7", true))).unwrap();
        assert_eq!(rv.as_deref(), Some("7"));
        match &evs[..] {
            [LeaseEvent::Put(l)] => {
                assert_eq!(l.lease.subnets, sn);
                assert_eq!(l.mod_revision, 7);
                assert_eq!(l.lease.attrs.public_ip.unwrap().to_string(), "198.18.0.12");
            }
            other => panic!("{other:?}"),
        }
        // Its annotations removed: no longer a lease, so a delete of its subnet.
        let (_, evs) = s.events(WatchEvent::Modified(node("8", false))).unwrap();
        assert_eq!(evs, vec![LeaseEvent::Delete(sn, 8)]);
        let (_, evs) = s.events(WatchEvent::Deleted(node("9", true))).unwrap();
        assert_eq!(evs, vec![LeaseEvent::Delete(sn, 9)]);
        // A bookmark moves the version on; a 410 ends the watch (the cache re-lists).
        let bm: Bookmark = serde_json::from_value(serde_json::json!({
            "kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": "12"}
        }))
        .unwrap();
        let (rv, evs) = s.events(WatchEvent::Bookmark(bm)).unwrap();
        assert_eq!((rv.as_deref(), evs.len()), (Some("12"), 0));
        let gone: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "message": "too old resource version: 5 (12)",
            "reason": "Expired", "code": 410
        }))
        .unwrap();
        let e = s.events(WatchEvent::Error(Box::new(gone))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kubernetes watch nodes: 410 Expired: too old resource version: 5 (12)"
        );
        // Creating or reclaiming a subnet is refused: Kubernetes assigns them.
        let e = s
            .create(
                sn,
                &LeaseAttrs::parse("k", b"{}").unwrap(),
                Duration::from_secs(1),
            )
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("subnets are assigned by Kubernetes"),
            "{e}"
        );
        assert_eq!(
            s.config_location(),
            dir.path().join("net-conf.json").display().to_string()
        );
    }

    #[test]
    fn bad_config_file_is_refused_naming_it() {
        let e = read_config(Path::new("/nonexistent/net-conf.json")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("read network config /nonexistent/net-conf.json"),
            "{e}"
        );
        let dir = TempDir::new("ksm-bad");
        let path = dir.write("net-conf.json", r#"{"Network":"10.244.0.0/33"}"#);
        let e = read_config(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("refusing network config {}: ", path.display()))
                && e.contains("10.244.0.0/33"),
            "{e}"
        );
    }
}
