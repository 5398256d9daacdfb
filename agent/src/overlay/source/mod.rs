//! Where leases live: the `LeaseStore` seam, its etcd implementation and an in-memory fake.
//!
//! The store knows flannel's key layout (`<prefix>/config`, `<prefix>/subnets/<key>`) and nothing
//! about the dataplane. Creation is a transaction that succeeds only if the key is absent, and a
//! reclaim only if the key still has the revision we saw, so two nodes can never hold one subnet.
//! Every key is bound to an etcd lease: a node that vanishes loses its subnet when the TTL runs out.
//!
//! Renewing checks more than the etcd lease: the key must still exist and still hang on the
//! etcd lease we hold ([`StoreError::LeaseLost`] otherwise), so a node whose key was deleted or
//! rewritten by another node learns it at the latest at its next renewal. Listings carry the
//! revision and the cluster id they were read at, so the agent can tell an etcd that lost its
//! data (or was replaced) from one where every node really left. A node that finds its public
//! IP in a lease it cannot prove is its own leaves a short-lived claim under
//! `<prefix>/claims/<lease key>/`, so the node holding the lease learns of the conflict too.

pub mod annotations;
pub mod kube;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use crate::overlay::lease::{Lease, LeaseAttrs, LeaseSubnets};

/// Errors from the lease store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An etcd call failed.
    #[error("etcd {op} {key}: {source}")]
    Etcd {
        /// The call (`get`, `txn`, `lease grant`, ...).
        op: &'static str,
        /// The key or prefix involved.
        key: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// The network config key is absent.
    #[error("network config key {0} not found in etcd")]
    NoConfig(String),
    /// `--etcd-endpoints` is empty.
    #[error("no etcd endpoint given (--etcd-endpoints)")]
    NoEndpoint,
    /// An `--etcd-endpoints` entry is not a URL etcd's client can dial.
    #[error("etcd endpoint {endpoint:?} is not an http:// or https:// URL: {reason}")]
    BadEndpoint {
        /// The entry as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Plain and TLS endpoints in one list.
    #[error(
        "etcd endpoints mix http ({http}) and https ({https}): use one scheme for every endpoint"
    )]
    MixedSchemes {
        /// The first http endpoint.
        http: String,
        /// The first https endpoint.
        https: String,
    },
    /// A client certificate without its key, or a key without its certificate.
    #[error("{given} is given without {missing}: a client certificate and its key go together")]
    TlsFlagAlone {
        /// The flag given.
        given: &'static str,
        /// The flag missing.
        missing: &'static str,
    },
    /// TLS files with plain http endpoints (they would not be used).
    #[error(
        "{flags} given, but etcd endpoint {endpoint} is plain http: use https:// or drop the TLS flags"
    )]
    TlsOverHttp {
        /// The TLS flags given.
        flags: String,
        /// The first http endpoint.
        endpoint: String,
    },
    /// The lease key we hold is gone, or hangs on another etcd lease (another node rewrote it).
    #[error("lease {key} is no longer ours: {reason}")]
    LeaseLost {
        /// The key.
        key: String,
        /// What was found instead.
        reason: String,
        /// Whether another holder rewrote the key (not merely deleted or expired).
        taken: bool,
    },
    /// A TLS file could not be read.
    #[error("read {flag} {path}: {cause}")]
    TlsFile {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: String,
        /// The error, with its errno. (In the message, not chained as a source: `{:#}` would
        /// print it twice.)
        cause: std::io::Error,
    },
    /// etcd's client refused the settings (it dials lazily: this is never an unreachable etcd).
    #[error("etcd client settings for {endpoints}: {reason}")]
    ClientSettings {
        /// The endpoints.
        endpoints: String,
        /// The client's error with its causes.
        reason: String,
    },
    /// A TLS file holds nothing the client can use in its place.
    #[error("{flag} {path}: {reason}")]
    BadTlsFile {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: String,
        /// What is wrong (no PEM certificate in it, a certificate that does not parse, ...).
        reason: String,
    },
    /// The watch stream ended or broke; the caller re-lists.
    #[error("lease watch ended: {0}")]
    WatchEnded(String),
    /// The kube subnet manager failed (the Kubernetes API, the node's `podCIDRs`, the network
    /// config file).
    #[error(transparent)]
    Kube(Box<crate::overlay::source::kube::SubnetError>),
}

/// A lease as stored, with the store's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLease {
    /// The lease.
    pub lease: Lease,
    /// Revision of the last change of the key (for compare-and-swap).
    pub mod_revision: i64,
    /// Revision the key was created at (which of two overlapping leases came first).
    pub create_revision: i64,
    /// The etcd lease the key is bound to (0: none).
    pub etcd_lease: i64,
}

/// A lease this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    /// The subnets.
    pub subnets: LeaseSubnets,
    /// The etcd lease id to renew.
    pub etcd_lease: i64,
    /// When it expires unless renewed.
    pub expires: SystemTime,
    /// The store revision of our last write of the key (0: unknown); a listing older than this
    /// cannot show our write yet.
    pub revision: i64,
}

/// Every lease, as of one store revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The leases.
    pub leases: Vec<StoredLease>,
    /// The store revision the listing was read at.
    pub revision: i64,
    /// The etcd cluster's id (0: not known, e.g. Kubernetes).
    pub cluster_id: u64,
}

/// A change seen by the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease was created or changed.
    Put(StoredLease),
    /// A lease was deleted or expired, at this store revision.
    Delete(LeaseSubnets, i64),
}

/// The lease store seam.
pub trait LeaseStore: Send + Sync + 'static {
    /// The raw network config JSON.
    fn get_config(&self) -> impl Future<Output = Result<String, StoreError>> + Send;
    /// Every lease, with the revision and cluster the list was read at.
    fn list(&self) -> impl Future<Output = Result<Listing, StoreError>> + Send;
    /// Creates the lease if its key is absent. `Ok(None)` when another node got there first.
    fn create(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<HeldLease>, StoreError>> + Send;
    /// Rewrites an existing lease (our own, from before a restart) if it still has
    /// `mod_revision`. `Ok(None)` when it changed meanwhile.
    fn reclaim(
        &self,
        old: &StoredLease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<HeldLease>, StoreError>> + Send;
    /// Renews a held lease; returns the new expiry. [`StoreError::LeaseLost`] when the key is
    /// gone or no longer hangs on our etcd lease.
    fn renew(
        &self,
        held: &HeldLease,
    ) -> impl Future<Output = Result<SystemTime, StoreError>> + Send;
    /// Streams lease changes after `revision` into `tx` until the stream breaks (then returns
    /// the error; the caller re-lists).
    fn watch(
        &self,
        revision: i64,
        tx: mpsc::Sender<Vec<LeaseEvent>>,
    ) -> impl Future<Output = StoreError> + Send;
    /// For stores where something else assigns this node's subnets (Kubernetes'
    /// `node.spec.podCIDRs`): publishes `attrs` for them and returns the lease. `None`, the
    /// default, lets the agent choose a free subnet and [`LeaseStore::create`] it.
    fn acquire_assigned(
        &self,
        cfg: &crate::overlay::config::NetworkConfig,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<HeldLease>, StoreError>> + Send {
        let _ = (cfg, attrs, ttl);
        async { Ok(None) }
    }
    /// Leaves a claim on `lease` (held by another node with our public IP) for `ttl`, so its
    /// holder learns that a node with `attrs` wants it. Stores without claims do nothing.
    fn claim(
        &self,
        lease: &LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (lease, attrs, ttl);
        async { Ok(()) }
    }
    /// The live claims on `lease` (what each claimant published).
    fn claims(
        &self,
        lease: &LeaseSubnets,
    ) -> impl Future<Output = Result<Vec<LeaseAttrs>, StoreError>> + Send {
        let _ = lease;
        async { Ok(Vec::new()) }
    }
}

impl StoreError {
    /// Whether the error is bad input (the etcd flags, the TLS files): retrying cannot help, the
    /// caller stops with it.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::NoEndpoint
                | Self::BadEndpoint { .. }
                | Self::MixedSchemes { .. }
                | Self::TlsFlagAlone { .. }
                | Self::TlsOverHttp { .. }
                | Self::TlsFile { .. }
                | Self::BadTlsFile { .. }
                | Self::ClientSettings { .. }
        )
    }
}

/// The flags that name etcd's TLS files.
const CAFILE_FLAG: &str = "--etcd-cafile";
const CERTFILE_FLAG: &str = "--etcd-certfile";
const KEYFILE_FLAG: &str = "--etcd-keyfile";

/// TLS material for etcd (flannel's `--etcd-cafile/--etcd-certfile/--etcd-keyfile`).
///
/// The rules, etcd's own client's (`transport.TLSInfo`) where it has one: a certificate and its
/// key go together (one without the other is refused, where flannel silently fell back to plain
/// http); a CA alone means TLS that verifies etcd without a client identity; `https://`
/// endpoints without a CA verify etcd against the system's trust store. Where etcd's client
/// silently drops TLS (files given with `http://` endpoints), twill refuses: files given for
/// TLS mean TLS was wanted. Every file is read and parsed (PEM, and the certificates and key in
/// it) when the flags are checked, so a missing or wrong file stops the start instead of a retry
/// loop.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// CA bundle.
    pub ca_file: Option<String>,
    /// Client certificate.
    pub cert_file: Option<String>,
    /// Client key.
    pub key_file: Option<String>,
}

impl EtcdTls {
    /// The TLS flags given, by name.
    fn given(&self) -> Vec<&'static str> {
        [
            (CAFILE_FLAG, &self.ca_file),
            (CERTFILE_FLAG, &self.cert_file),
            (KEYFILE_FLAG, &self.key_file),
        ]
        .into_iter()
        .filter(|(_, f)| f.is_some())
        .map(|(flag, _)| flag)
        .collect()
    }
}

/// flannel's etcd flags, shared by the agent and by `twilld apply/get/delete`, so one prefix
/// serves both.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated `http://HOST:PORT` or `https://HOST:PORT` URLs (one
    /// scheme for all). Given twice, the last one counts (as flannel's flags).
    #[arg(
        long,
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ',',
        action = clap::ArgAction::Set
    )]
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix holding `config`, `subnets/` and `services/`.
    #[arg(long, default_value = "/coreos.com/network")]
    pub etcd_prefix: String,
    /// CA bundle (PEM) that etcd's certificate is checked against; with https endpoints and no
    /// CA, the system's trust store is used.
    #[arg(long)]
    pub etcd_cafile: Option<String>,
    /// Client certificate (PEM) for etcd mTLS; needs --etcd-keyfile and https endpoints.
    #[arg(long)]
    pub etcd_certfile: Option<String>,
    /// Client key (PEM) for etcd mTLS; needs --etcd-certfile and https endpoints.
    #[arg(long)]
    pub etcd_keyfile: Option<String>,
}

impl EtcdArgs {
    /// The TLS material the flags name (an empty value, as flannel's templates pass, is none).
    pub fn tls(&self) -> EtcdTls {
        let named = |f: &Option<String>| f.clone().filter(|p| !p.is_empty());
        EtcdTls {
            ca_file: named(&self.etcd_cafile),
            cert_file: named(&self.etcd_certfile),
            key_file: named(&self.etcd_keyfile),
        }
    }

    /// Checks the flags as a whole before anything is dialled or retried: the endpoints, the
    /// TLS flags' pairing, the TLS files' presence and form; then builds (without dialling; the
    /// client connects lazily) a client, so whatever else etcd's client refuses is refused here
    /// too. An error is bad input ([`StoreError::is_config`]): stop, do not retry.
    pub async fn check(&self) -> Result<(), StoreError> {
        connect_client(&self.etcd_endpoints, &self.tls())
            .await
            .map(drop)
    }
}

/// The etcd v3 lease store.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
}

fn etcd(op: &'static str, key: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> StoreError {
    let key = key.into();
    move |source| StoreError::Etcd { op, key, source }
}

/// Whether an endpoint speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

/// Checks one `--etcd-endpoints` entry: `http://` or `https://`, a host, an optional port and
/// nothing else (etcd's gRPC API has no path). etcd's own tools also take a bare `HOST:PORT`;
/// twill wants the scheme written out, so whether TLS is used is never a guess.
fn endpoint_scheme(endpoint: &str) -> Result<Scheme, StoreError> {
    let bad = |reason: &str| StoreError::BadEndpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let scheme = match endpoint.split_once("://") {
        Some(("http", _)) => Scheme::Http,
        Some(("https", _)) => Scheme::Https,
        Some((other, _)) => return Err(bad(&format!("scheme {other:?} is not http or https"))),
        None => {
            return Err(bad(
                "no scheme (write http://HOST:PORT or https://HOST:PORT)",
            ));
        }
    };
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    let Some(authority) = uri.authority() else {
        return Err(bad("no host"));
    };
    if authority.as_str().contains('@') {
        return Err(bad("user information is not supported"));
    }
    if authority.host().is_empty() {
        return Err(bad("no host"));
    }
    if let Some(port) = authority
        .as_str()
        .strip_prefix(authority.host())
        .and_then(|rest| rest.strip_prefix(':'))
    {
        match port.parse::<u16>() {
            Ok(1..) => {}
            _ if port.is_empty() => return Err(bad("empty port")),
            _ => {
                return Err(bad(&format!(
                    "port {port:?} is not a number from 1 to 65535"
                )));
            }
        }
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("a path or query is not used by etcd's API"));
    }
    Ok(scheme)
}

/// What a TLS file must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsFile {
    /// CA certificates, each a usable trust anchor.
    Ca,
    /// A client certificate (chain).
    Cert,
    /// A private key.
    Key,
}

/// Reads a TLS file and parses it as the client will (PEM, DER inside), so a wrong file is
/// refused at start with the reason rather than failing every handshake later (rustls skips CA
/// certificates it cannot parse, which leaves a client that trusts nothing).
fn read_tls_file(flag: &'static str, path: &str, kind: TlsFile) -> Result<Vec<u8>, StoreError> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let bytes = std::fs::read(path).map_err(|cause| StoreError::TlsFile {
        flag,
        path: path.to_string(),
        cause,
    })?;
    let bad = |reason: String| StoreError::BadTlsFile {
        flag,
        path: path.to_string(),
        reason,
    };
    if kind == TlsFile::Key {
        PrivateKeyDer::from_pem_slice(&bytes)
            .map_err(|e| bad(format!("no PEM private key in it ({e})")))?;
        return Ok(bytes);
    }
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM file ({e})")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    for (i, cert) in certs.iter().enumerate() {
        let parsed = match kind {
            TlsFile::Ca => webpki::anchor_from_trusted_cert(cert).map(drop),
            _ => webpki::EndEntityCert::try_from(cert).map(drop),
        };
        parsed.map_err(|e| {
            bad(format!(
                "certificate {} of {} does not parse ({e})",
                i + 1,
                certs.len()
            ))
        })?;
    }
    Ok(bytes)
}

/// Checks `endpoints` and `tls` together (see [`EtcdTls`] for the rules) and reads the TLS
/// files: the client's TLS settings, `None` for plain http.
fn tls_options(endpoints: &[String], tls: &EtcdTls) -> Result<Option<TlsOptions>, StoreError> {
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => {
            return Err(StoreError::TlsFlagAlone {
                given: CERTFILE_FLAG,
                missing: KEYFILE_FLAG,
            });
        }
        (None, Some(_)) => {
            return Err(StoreError::TlsFlagAlone {
                given: KEYFILE_FLAG,
                missing: CERTFILE_FLAG,
            });
        }
        _ => {}
    }
    if endpoints.iter().all(String::is_empty) {
        return Err(StoreError::NoEndpoint);
    }
    let mut first = (None, None);
    for e in endpoints {
        match endpoint_scheme(e)? {
            Scheme::Http => first.0 = first.0.or(Some(e)),
            Scheme::Https => first.1 = first.1.or(Some(e)),
        }
    }
    match first {
        (Some(http), Some(https)) => Err(StoreError::MixedSchemes {
            http: http.clone(),
            https: https.clone(),
        }),
        (Some(http), None) => {
            let given = tls.given();
            if given.is_empty() {
                Ok(None)
            } else {
                Err(StoreError::TlsOverHttp {
                    flags: given.join(", "),
                    endpoint: http.clone(),
                })
            }
        }
        _ => {
            let mut t = TlsOptions::new();
            t = match &tls.ca_file {
                Some(ca) => t.ca_certificate(Certificate::from_pem(read_tls_file(
                    CAFILE_FLAG,
                    ca,
                    TlsFile::Ca,
                )?)),
                None => t.with_native_roots(),
            };
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                t = t.identity(Identity::from_pem(
                    read_tls_file(CERTFILE_FLAG, cert, TlsFile::Cert)?,
                    read_tls_file(KEYFILE_FLAG, key, TlsFile::Key)?,
                ));
            }
            Ok(Some(t))
        }
    }
}

/// Dials etcd with twill's client settings (2 s connect, 5 s request timeouts, keep-alives) and
/// the (m)TLS material of flannel's `--etcd-*file` flags, after checking both (see [`EtcdTls`]).
/// Shared by every etcd user in the agent. The client connects lazily: an error here is bad
/// input ([`StoreError::is_config`]), never an unreachable etcd.
pub async fn connect_client(endpoints: &[String], tls: &EtcdTls) -> Result<Client, StoreError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    let settings = tls_options(endpoints, tls)?;
    let system_roots = settings.is_some() && tls.ca_file.is_none();
    if let Some(t) = settings {
        opts = opts.with_tls(t);
    }
    Client::connect(endpoints, Some(opts)).await.map_err(|e| {
        let mut reason = client_error(&e);
        if system_roots {
            reason
                .push_str(" (no --etcd-cafile: etcd is verified against the system's trust store)");
        }
        StoreError::ClientSettings {
            endpoints: endpoints.join(","),
            reason,
        }
    })
}

/// etcd's client error with the causes its `Display` leaves out: a transport error's sources
/// (a TLS file rustls cannot parse, no system certificates) are not chained by the client.
fn client_error(e: &etcd_client::Error) -> String {
    let mut text = e.to_string();
    if let etcd_client::Error::TransportError(t) = e {
        let mut source = std::error::Error::source(t);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
    }
    text
}

#[cfg(test)]
mod etcd_flag_tests {
    use super::*;

    fn tls(ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> EtcdTls {
        EtcdTls {
            ca_file: ca.map(String::from),
            cert_file: cert.map(String::from),
            key_file: key.map(String::from),
        }
    }

    fn eps(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_string()).collect()
    }

    /// A self-signed CA certificate (P-256) made for these tests only, valid until 2126.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBojCCAUegAwIBAgIUGo+x1YeDZ2e+EwbBP+S1LWU70MQwCgYIKoZIzj0EAwIw\n\
HTEbMBkGA1UEAwwSdHdpbGwgdW5pdCB0ZXN0IENBMCAXDTI2MTIwNzE3MTExNloY\n\
DzIxMjYxMTEzMTcxMTE2WjAdMRswGQYDVQQDDBJ0d2lsbCB1bml0IHRlc3QgQ0Ew\n\
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASkSx6MqDrPZEnxg2FltqxE72EGbU9Q\n\
qb8lDCsv7l2w79/I1BZ+BakSf8xOM5E5+Rd6vCvA8xzlJkfWxr+x1Nj4o2MwYTAd\n\
BgNVHQ4EFgQU0CU7qUaQlMqvNW8sD1pYiLSexKYwHwYDVR0jBBgwFoAU0CU7qUaQ\n\
lMqvNW8sD1pYiLSexKYwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYw\n\
CgYIKoZIzj0EAwIDSQAwRgIhAPnoSoe/vKsST/CnoOpcWigkWruoFb4OB3JPK1kT\n\
3aezAiEA6mBaKmS6v02HXvfoJOVu7vvs/KExAERABkKrEbSGXRc=\n\
-----END CERTIFICATE-----\n\
";
    /// Its key.
    const CA_KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgHobG/lNdh9LZrliK\n\
6w+48gjb3n3p+nPFtz34Vp6yN1ShRANCAASkSx6MqDrPZEnxg2FltqxE72EGbU9Q\n\
qb8lDCsv7l2w79/I1BZ+BakSf8xOM5E5+Rd6vCvA8xzlJkfWxr+x1Nj4\n\
-----END PRIVATE KEY-----\n\
";
    /// A key that belongs to no certificate here.
    const OTHER_KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgKOuxQCazeRk7WvL0\n\
jsO8VtFbBoNVsrKmpax4gEoiSM2hRANCAAShmTyMxJoVjiGUqrHz6FGCLsxUwTty\n\
zF92Gns/ZlXq/2vic5lxtzo8BWxkTMjPbysr0DzGO1Aaa6Js1u6eP+V8\n\
-----END PRIVATE KEY-----\n\
";

    /// A temporary directory with TLS files, good and bad.
    struct Files(std::path::PathBuf);

    impl Files {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("twill-etcd-flags-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for (file, text) in [
                ("ca.pem", CA_PEM),
                ("ca.key", CA_KEY),
                ("other.key", OTHER_KEY),
                ("junk.pem", "not a pem file\n"),
                (
                    "bad-der.pem",
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                ),
            ] {
                std::fs::write(dir.join(file), text).unwrap();
            }
            Files(dir)
        }

        fn path(&self, name: &str) -> String {
            self.0.join(name).display().to_string()
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn err(endpoints: &[&str], t: &EtcdTls) -> String {
        match tls_options(&eps(endpoints), t) {
            Ok(_) => panic!("{endpoints:?} with {t:?} was accepted"),
            Err(e) => {
                assert!(e.is_config(), "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn endpoints_must_be_http_or_https_urls() {
        for ok in [
            "http://127.0.0.1:2379",
            "https://etcd.example.internal:2379",
            "http://[fd00::1]:2379/",
            "https://etcd-0",
        ] {
            assert!(endpoint_scheme(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("198.18.0.1:2379", "no scheme"),
            ("etcd:2379", "no scheme"),
            ("unix:///run/etcd.sock", "not http or https"),
            ("grpc://198.18.0.1:2379", "not http or https"),
            ("http://", "http://"),
            ("http://:2379", "no host"),
            ("http://198.18.0.1:", "empty port"),
            (
                "http://198.18.0.1:0",
                "port \"0\" is not a number from 1 to 65535",
            ),
            ("http://[fd00::1]:99999", "port \"99999\""),
            ("http://198.18.0.1:port", "198.18.0.1:port"),
            ("http://user:pw@198.18.0.1:2379", "user information"),
            ("http://198.18.0.1:2379/v3", "path"),
            (" http://198.18.0.1:2379", "\" http"),
            ("", "\"\""),
        ] {
            let e = match endpoint_scheme(bad) {
                Ok(s) => panic!("{bad:?} accepted as {s:?}"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_certificate_and_its_key_go_together() {
        let e = err(
            &["https://198.18.0.1:2379"],
            &tls(None, None, Some("/k.pem")),
        );
        assert!(
            e.starts_with("--etcd-keyfile is given without --etcd-certfile"),
            "{e}"
        );
        // Named even with http endpoints (where flannel fell back to plain http without a word).
        let e = err(
            &["http://198.18.0.1:2379"],
            &tls(None, Some("/c.pem"), None),
        );
        assert!(
            e.starts_with("--etcd-certfile is given without --etcd-keyfile"),
            "{e}"
        );
    }

    #[test]
    fn tls_files_with_http_endpoints_are_refused() {
        let e = err(
            &["http://198.18.0.1:2379"],
            &tls(Some("/ca.pem"), None, None),
        );
        assert!(e.contains("--etcd-cafile given"), "{e}");
        assert!(e.contains("http://198.18.0.1:2379 is plain http"), "{e}");
        let e = err(
            &["http://198.18.0.1:2379", "https://198.18.0.2:2379"],
            &tls(None, None, None),
        );
        assert!(
            e.contains("mix http (http://198.18.0.1:2379) and https (https://198.18.0.2:2379)"),
            "{e}"
        );
        assert_eq!(
            err(&[""], &tls(None, None, None)),
            "no etcd endpoint given (--etcd-endpoints)"
        );
    }

    #[test]
    fn plain_http_has_no_tls_and_https_verifies_etcd() {
        assert!(
            tls_options(&eps(&["http://198.18.0.1:2379"]), &EtcdTls::default())
                .unwrap()
                .is_none()
        );
        // Without a CA: the system's trust store (as etcd's client does).
        assert!(
            tls_options(&eps(&["https://198.18.0.1:2379"]), &EtcdTls::default())
                .unwrap()
                .is_some()
        );
        let f = Files::new("ok");
        let t = tls(
            Some(&f.path("ca.pem")),
            Some(&f.path("ca.pem")),
            Some(&f.path("ca.key")),
        );
        assert!(
            tls_options(&eps(&["https://198.18.0.1:2379"]), &t)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn unreadable_or_wrong_tls_files_name_the_flag_path_and_errno() {
        let f = Files::new("bad");
        let https = ["https://198.18.0.1:2379"];
        let missing = f.path("nope.pem");
        let e = err(&https, &tls(Some(&missing), None, None));
        assert_eq!(
            e,
            format!("read --etcd-cafile {missing}: No such file or directory (os error 2)")
        );
        let dir = f.path("");
        let e = err(&https, &tls(None, Some(&dir), Some(&f.path("ca.key"))));
        assert_eq!(
            e,
            format!("read --etcd-certfile {dir}: Is a directory (os error 21)")
        );
        let junk = f.path("junk.pem");
        let e = err(&https, &tls(Some(&junk), None, None));
        assert_eq!(e, format!("--etcd-cafile {junk}: no PEM certificate in it"));
        // A key where the CA belongs, a certificate where the key belongs.
        let (ca, key) = (f.path("ca.pem"), f.path("ca.key"));
        let e = err(&https, &tls(Some(&key), None, None));
        assert_eq!(e, format!("--etcd-cafile {key}: no PEM certificate in it"));
        let e = err(&https, &tls(None, Some(&ca), Some(&ca)));
        assert!(
            e.starts_with(&format!("--etcd-keyfile {ca}: no PEM private key in it (")),
            "{e}"
        );
        // PEM markers around something that is no certificate (rustls would skip it and trust
        // nothing).
        let bad = f.path("bad-der.pem");
        let e = err(&https, &tls(Some(&bad), None, None));
        assert!(
            e.starts_with(&format!(
                "--etcd-cafile {bad}: certificate 1 of 1 does not parse ("
            )),
            "{e}"
        );
    }

    #[test]
    fn empty_tls_flags_are_none() {
        let args = EtcdArgs {
            etcd_endpoints: eps(&["http://127.0.0.1:2379"]),
            etcd_prefix: "/p".into(),
            etcd_cafile: Some(String::new()),
            etcd_certfile: Some(String::new()),
            etcd_keyfile: None,
        };
        let t = args.tls();
        assert!(t.ca_file.is_none() && t.cert_file.is_none() && t.key_file.is_none());
    }

    #[tokio::test]
    async fn a_key_that_is_not_the_certificates_is_refused_with_the_clients_reason() {
        // Each file parses; the pair does not match: rustls says so when the client is built
        // (before any dial), and its reason is kept.
        let f = Files::new("parse");
        let args = EtcdArgs {
            etcd_endpoints: eps(&["https://127.0.0.1:1"]),
            etcd_prefix: "/p".into(),
            etcd_cafile: Some(f.path("ca.pem")),
            etcd_certfile: Some(f.path("ca.pem")),
            etcd_keyfile: Some(f.path("other.key")),
        };
        let e = args.check().await.unwrap_err();
        assert!(e.is_config(), "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with("etcd client settings for https://127.0.0.1:1: transport error"),
            "{text}"
        );
        assert!(
            text.len()
                > "etcd client settings for https://127.0.0.1:1: transport error: transport error"
                    .len(),
            "no cause in {text}"
        );
    }

    #[tokio::test]
    async fn check_refuses_bad_flags_without_dialling() {
        let args = |endpoints: &[&str], key: Option<&str>| EtcdArgs {
            etcd_endpoints: eps(endpoints),
            etcd_prefix: "/p".into(),
            etcd_cafile: None,
            etcd_certfile: None,
            etcd_keyfile: key.map(String::from),
        };
        let e = args(&["http://127.0.0.1:2379"], Some("/k.pem"))
            .check()
            .await
            .unwrap_err();
        assert!(e.is_config(), "{e}");
        // Nothing listens on port 1 of loopback: a client that dialled would fail or time out;
        // the check neither dials nor waits.
        let start = std::time::Instant::now();
        args(&["http://127.0.0.1:1"], None).check().await.unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
}

/// Why [`watch_prefix`] returned.
#[derive(Debug)]
pub enum WatchEnd {
    /// The watch call or stream failed.
    Etcd(etcd_client::Error),
    /// The stream ended, was canceled or compacted, or the receiver went away.
    Ended(String),
}

/// Watches every key under `prefix` after `revision` (with progress notifications), decodes each
/// event with `decode` and sends each response's changes as one batch into `tx`, until the stream
/// breaks; the caller then re-lists. Shared by the lease store and the service source.
pub async fn watch_prefix<T>(
    client: &Client,
    prefix: &str,
    revision: i64,
    tx: &mpsc::Sender<Vec<T>>,
    mut decode: impl FnMut(&etcd_client::Event) -> Option<T>,
) -> WatchEnd {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let mut stream = match client.clone().watch(prefix, Some(opts)).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Etcd(e),
    };
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                if resp.canceled() || resp.compact_revision() > 0 {
                    return WatchEnd::Ended(format!(
                        "canceled ({}), compacted at {}",
                        resp.cancel_reason(),
                        resp.compact_revision()
                    ));
                }
                let batch: Vec<T> = resp.events().iter().filter_map(&mut decode).collect();
                if !batch.is_empty() && tx.send(batch).await.is_err() {
                    return WatchEnd::Ended("receiver gone".into());
                }
            }
            Ok(None) => return WatchEnd::Ended("stream closed".into()),
            Err(e) => return WatchEnd::Etcd(e),
        }
    }
}

impl EtcdStore {
    /// Connects to `endpoints` under `prefix`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: &EtcdTls,
    ) -> Result<Self, StoreError> {
        Ok(EtcdStore {
            client: connect_client(endpoints, tls).await?,
            prefix: prefix.trim_end_matches('/').to_string(),
        })
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key(&self, subnets: &LeaseSubnets) -> String {
        format!("{}{}", self.subnets_prefix(), subnets.key())
    }

    fn claims_prefix(&self, subnets: &LeaseSubnets) -> String {
        format!("{}/claims/{}/", self.prefix, subnets.key())
    }

    fn decode(&self, kv: &etcd_client::KeyValue) -> Option<StoredLease> {
        let key = kv.key_str().ok()?;
        let short = key.strip_prefix(&self.subnets_prefix())?;
        let subnets = match LeaseSubnets::parse_key(short) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring key under subnets/");
                return None;
            }
        };
        let attrs = match LeaseAttrs::parse(key, kv.value()) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring lease");
                return None;
            }
        };
        Some(StoredLease {
            lease: Lease {
                subnets,
                attrs,
                expires: None,
            },
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
            etcd_lease: kv.lease(),
        })
    }

    /// Puts `attrs` at `key` on a new etcd lease if `cmp` holds: the etcd lease id and the
    /// revision of the write.
    async fn put_if(
        &self,
        key: String,
        cmp: Compare,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let mut c = self.client.clone();
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let grant = c
            .lease_grant(ttl_secs, None)
            .await
            .map_err(etcd("lease grant", &key))?;
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
            key.clone(),
            attrs.to_json(),
            Some(PutOptions::new().with_lease(grant.id())),
        )]);
        let resp = c.txn(txn).await.map_err(etcd("txn", &key))?;
        if resp.succeeded() {
            let rev = resp
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision);
            Ok(Some((grant.id(), rev)))
        } else {
            let _ = c.lease_revoke(grant.id()).await;
            Ok(None)
        }
    }
}

impl LeaseStore for EtcdStore {
    async fn get_config(&self) -> Result<String, StoreError> {
        let key = format!("{}/config", self.prefix);
        let resp = self
            .client
            .clone()
            .get(key.as_str(), None)
            .await
            .map_err(etcd("get", &key))?;
        let kv = resp.kvs().first().ok_or(StoreError::NoConfig(key))?;
        Ok(String::from_utf8_lossy(kv.value()).into_owned())
    }

    async fn list(&self) -> Result<Listing, StoreError> {
        let prefix = self.subnets_prefix();
        let resp = self
            .client
            .clone()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd("get", &prefix))?;
        let header = resp.header();
        Ok(Listing {
            leases: resp.kvs().iter().filter_map(|kv| self.decode(kv)).collect(),
            revision: header.map_or(0, etcd_client::ResponseHeader::revision),
            cluster_id: header.map_or(0, etcd_client::ResponseHeader::cluster_id),
        })
    }

    async fn create(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<HeldLease>, StoreError> {
        let key = self.key(&subnets);
        let cmp = Compare::create_revision(key.as_str(), CompareOp::Equal, 0);
        Ok(self
            .put_if(key, cmp, attrs, ttl)
            .await?
            .map(|(id, revision)| HeldLease {
                subnets,
                etcd_lease: id,
                expires: SystemTime::now() + ttl,
                revision,
            }))
    }

    async fn reclaim(
        &self,
        old: &StoredLease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<HeldLease>, StoreError> {
        let key = self.key(&old.lease.subnets);
        let cmp = Compare::mod_revision(key.as_str(), CompareOp::Equal, old.mod_revision);
        let got = self.put_if(key, cmp, attrs, ttl).await?;
        if got.is_some() && old.etcd_lease != 0 {
            // The key now hangs on the new etcd lease; the old one holds nothing of ours.
            let _ = self.client.clone().lease_revoke(old.etcd_lease).await;
        }
        Ok(got.map(|(id, revision)| HeldLease {
            subnets: old.lease.subnets,
            etcd_lease: id,
            expires: SystemTime::now() + ttl,
            revision,
        }))
    }

    async fn renew(&self, held: &HeldLease) -> Result<SystemTime, StoreError> {
        let key = self.key(&held.subnets);
        let (mut keeper, mut stream) = self
            .client
            .clone()
            .lease_keep_alive(held.etcd_lease)
            .await
            .map_err(etcd("lease keep-alive", &key))?;
        keeper
            .keep_alive()
            .await
            .map_err(etcd("lease keep-alive", &key))?;
        let resp = stream
            .message()
            .await
            .map_err(etcd("lease keep-alive", &key))?;
        let ttl = match resp {
            Some(r) if r.ttl() > 0 => r.ttl(),
            _ => {
                return Err(StoreError::LeaseLost {
                    key,
                    reason: format!(
                        "its etcd lease {:x} expired or was revoked",
                        held.etcd_lease
                    ),
                    taken: false,
                });
            }
        };
        // The etcd lease lives on, but is the key still on it? Someone may have deleted the key
        // or rewritten it on an etcd lease of their own.
        let got = self
            .client
            .clone()
            .get(key.as_str(), None)
            .await
            .map_err(etcd("get", &key))?;
        match got.kvs().first() {
            None => Err(StoreError::LeaseLost {
                key,
                reason: "the key was deleted".into(),
                taken: false,
            }),
            Some(kv) if kv.lease() != held.etcd_lease => Err(StoreError::LeaseLost {
                taken: true,
                reason: format!(
                    "the key was rewritten on etcd lease {:x} (ours is {:x}): {}",
                    kv.lease(),
                    held.etcd_lease,
                    String::from_utf8_lossy(kv.value())
                ),
                key,
            }),
            Some(_) => {
                Ok(SystemTime::now() + Duration::from_secs(u64::try_from(ttl).unwrap_or_default()))
            }
        }
    }

    async fn watch(&self, revision: i64, tx: mpsc::Sender<Vec<LeaseEvent>>) -> StoreError {
        let prefix = self.subnets_prefix();
        let end = watch_prefix(&self.client, &prefix, revision, &tx, |ev| {
            let kv = ev.kv()?;
            match ev.event_type() {
                EventType::Put => self.decode(kv).map(LeaseEvent::Put),
                EventType::Delete => {
                    let short = kv.key_str().ok()?.strip_prefix(&prefix)?;
                    LeaseSubnets::parse_key(short)
                        .ok()
                        .map(|s| LeaseEvent::Delete(s, kv.mod_revision()))
                }
            }
        })
        .await;
        match end {
            WatchEnd::Etcd(e) => etcd("watch", &prefix)(e),
            WatchEnd::Ended(why) => StoreError::WatchEnded(why),
        }
    }

    async fn claim(
        &self,
        lease: &LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let id = attrs.node_id.clone().unwrap_or_default();
        let key = format!("{}{id}", self.claims_prefix(lease));
        let mut c = self.client.clone();
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let grant = c
            .lease_grant(ttl_secs, None)
            .await
            .map_err(etcd("lease grant", &key))?;
        c.put(
            key.as_str(),
            attrs.to_json(),
            Some(PutOptions::new().with_lease(grant.id())),
        )
        .await
        .map_err(etcd("put", &key))?;
        Ok(())
    }

    async fn claims(&self, lease: &LeaseSubnets) -> Result<Vec<LeaseAttrs>, StoreError> {
        let prefix = self.claims_prefix(lease);
        let resp = self
            .client
            .clone()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd("get", &prefix))?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| LeaseAttrs::parse(kv.key_str().unwrap_or(""), kv.value()).ok())
            .collect())
    }
}

/// In-memory store for unit tests: same semantics (create-if-absent, compare mod revision), plus
/// what an etcd can go through (down, wiped, replaced by a fresh cluster).
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<MemInner>>,
    /// Wakes watches when the store is replaced (their stream breaks, as etcd's would).
    replaced: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct MemInner {
    config: Option<String>,
    revision: i64,
    cluster_id: u64,
    next_lease: i64,
    leases: BTreeMap<String, StoredLease>,
    claims: BTreeMap<String, BTreeMap<String, LeaseAttrs>>,
    /// Every change so far, by revision, for watches that start behind (as etcd keeps them).
    history: Vec<(i64, Vec<LeaseEvent>)>,
    watchers: Vec<mpsc::Sender<Vec<LeaseEvent>>>,
    down: bool,
}

impl MemInner {
    fn send(&mut self, batch: Vec<LeaseEvent>) {
        if batch.is_empty() {
            return;
        }
        self.watchers.retain(|w| w.try_send(batch.clone()).is_ok());
        self.history.push((self.revision, batch));
    }
}

impl MemStore {
    /// A store holding `config`.
    pub fn new(config: &str) -> Self {
        let s = MemStore::default();
        {
            let mut g = s.inner.lock().unwrap();
            g.config = Some(config.to_string());
            g.cluster_id = 1;
        }
        s
    }

    /// Makes every call fail (etcd away) or succeed again.
    pub fn set_down(&self, down: bool) {
        self.inner.lock().unwrap().down = down;
    }

    /// Writes (`Some`) or deletes (`None`) the network config key.
    pub fn set_config(&self, config: Option<&str>) {
        let mut g = self.inner.lock().unwrap();
        g.revision += 1;
        g.config = config.map(str::to_string);
    }

    /// Inserts a lease as another node would.
    pub fn insert(&self, lease: Lease) {
        let mut g = self.inner.lock().unwrap();
        g.revision += 1;
        let key = lease.subnets.key();
        let create_revision = g.leases.get(&key).map_or(g.revision, |l| l.create_revision);
        let stored = StoredLease {
            lease,
            mod_revision: g.revision,
            create_revision,
            etcd_lease: 0,
        };
        g.leases.insert(key, stored.clone());
        g.send(vec![LeaseEvent::Put(stored)]);
    }

    /// Deletes a lease as an admin (or expiry) would.
    pub fn remove(&self, subnets: &LeaseSubnets) {
        let mut g = self.inner.lock().unwrap();
        g.revision += 1;
        let rev = g.revision;
        if g.leases.remove(&subnets.key()).is_some() {
            g.send(vec![LeaseEvent::Delete(*subnets, rev)]);
        }
    }

    /// `etcdctl del --prefix <prefix>`: every lease and the config key go in one revision.
    pub fn wipe(&self) {
        let mut g = self.inner.lock().unwrap();
        g.revision += 1;
        let rev = g.revision;
        let gone: Vec<LeaseEvent> = std::mem::take(&mut g.leases)
            .into_values()
            .map(|l| LeaseEvent::Delete(l.lease.subnets, rev))
            .collect();
        g.config = None;
        g.claims.clear();
        g.send(gone);
    }

    /// The store is replaced by a fresh cluster (another cluster id, revisions from the start)
    /// holding `config` and no lease: running watches break, as they would on a new etcd.
    pub fn replace_with_fresh(&self, config: Option<&str>) {
        {
            let mut g = self.inner.lock().unwrap();
            g.revision = 1;
            g.cluster_id += 1;
            g.leases.clear();
            g.claims.clear();
            g.history.clear();
            g.watchers.clear();
            g.config = config.map(str::to_string);
        }
        self.replaced.notify_waiters();
    }

    /// A snapshot of every lease.
    pub fn leases(&self) -> Vec<StoredLease> {
        self.inner
            .lock()
            .unwrap()
            .leases
            .values()
            .cloned()
            .collect()
    }

    fn check(&self) -> Result<std::sync::MutexGuard<'_, MemInner>, StoreError> {
        let g = self.inner.lock().unwrap();
        if g.down {
            return Err(StoreError::WatchEnded("store is down".into()));
        }
        Ok(g)
    }

    fn put(
        g: &mut MemInner,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> HeldLease {
        g.revision += 1;
        g.next_lease += 1;
        let key = subnets.key();
        let create_revision = g.leases.get(&key).map_or(g.revision, |l| l.create_revision);
        let stored = StoredLease {
            lease: Lease {
                subnets,
                attrs: attrs.clone(),
                expires: None,
            },
            mod_revision: g.revision,
            create_revision,
            etcd_lease: g.next_lease,
        };
        g.leases.insert(key, stored.clone());
        g.send(vec![LeaseEvent::Put(stored)]);
        HeldLease {
            subnets,
            etcd_lease: g.next_lease,
            expires: SystemTime::now() + ttl,
            revision: g.revision,
        }
    }
}

impl LeaseStore for MemStore {
    async fn get_config(&self) -> Result<String, StoreError> {
        self.check()?
            .config
            .clone()
            .ok_or_else(|| StoreError::NoConfig("config".into()))
    }

    async fn list(&self) -> Result<Listing, StoreError> {
        let g = self.check()?;
        Ok(Listing {
            leases: g.leases.values().cloned().collect(),
            revision: g.revision,
            cluster_id: g.cluster_id,
        })
    }

    async fn create(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<HeldLease>, StoreError> {
        let mut g = self.check()?;
        if g.leases.contains_key(&subnets.key()) {
            return Ok(None);
        }
        Ok(Some(Self::put(&mut g, subnets, attrs, ttl)))
    }

    async fn reclaim(
        &self,
        old: &StoredLease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<HeldLease>, StoreError> {
        let mut g = self.check()?;
        match g.leases.get(&old.lease.subnets.key()) {
            Some(cur) if cur.mod_revision == old.mod_revision => {
                Ok(Some(Self::put(&mut g, old.lease.subnets, attrs, ttl)))
            }
            _ => Ok(None),
        }
    }

    async fn renew(&self, held: &HeldLease) -> Result<SystemTime, StoreError> {
        let g = self.check()?;
        let key = held.subnets.key();
        match g.leases.get(&key) {
            Some(l) if l.etcd_lease == held.etcd_lease => {
                Ok(SystemTime::now() + Duration::from_hours(24))
            }
            Some(l) => Err(StoreError::LeaseLost {
                key,
                taken: true,
                reason: format!(
                    "the key was rewritten on etcd lease {:x} (ours is {:x})",
                    l.etcd_lease, held.etcd_lease
                ),
            }),
            None => Err(StoreError::LeaseLost {
                key,
                reason: "the key was deleted".into(),
                taken: false,
            }),
        }
    }

    async fn watch(&self, revision: i64, tx: mpsc::Sender<Vec<LeaseEvent>>) -> StoreError {
        let replaced = self.replaced.notified();
        tokio::pin!(replaced);
        replaced.as_mut().enable();
        match self.check() {
            Ok(mut g) => {
                for (_, batch) in g.history.iter().filter(|(rev, _)| *rev > revision) {
                    if tx.try_send(batch.clone()).is_err() {
                        return StoreError::WatchEnded("receiver full or gone".into());
                    }
                }
                g.watchers.push(tx.clone());
            }
            Err(e) => return e,
        }
        tokio::select! {
            () = tx.closed() => StoreError::WatchEnded("receiver gone".into()),
            () = replaced => StoreError::WatchEnded("store replaced".into()),
        }
    }

    async fn claim(
        &self,
        lease: &LeaseSubnets,
        attrs: &LeaseAttrs,
        _ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut g = self.check()?;
        g.claims
            .entry(lease.key())
            .or_default()
            .insert(attrs.node_id.clone().unwrap_or_default(), attrs.clone());
        Ok(())
    }

    async fn claims(&self, lease: &LeaseSubnets) -> Result<Vec<LeaseAttrs>, StoreError> {
        let g = self.check()?;
        Ok(g.claims
            .get(&lease.key())
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default())
    }
}
