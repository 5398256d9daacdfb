//! The etcd client both loops use: flannel's etcd flags, checked as a whole, the dialled client with its (m)TLS, and the prefix watch.

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions, WatchOptions};
use std::fmt::Write as _;
use std::time::Duration;
use tokio::sync::mpsc;

/// Why the etcd flags or TLS files are refused (always bad input: stop, do not retry).
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
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
}

/// The flags that name etcd's TLS files.
pub(crate) const CAFILE_FLAG: &str = "--etcd-cafile";

pub(crate) const CERTFILE_FLAG: &str = "--etcd-certfile";

pub(crate) const KEYFILE_FLAG: &str = "--etcd-keyfile";

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
    /// too. An error is bad input ([`EtcdError`]): stop, do not retry.
    pub async fn check(&self) -> Result<(), EtcdError> {
        connect_client(&self.etcd_endpoints, &self.tls())
            .await
            .map(drop)
    }
}

/// Whether an endpoint speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    Https,
}

/// Checks one `--etcd-endpoints` entry: `http://` or `https://`, a host, an optional port and
/// nothing else (etcd's gRPC API has no path). etcd's own tools also take a bare `HOST:PORT`;
/// twill wants the scheme written out, so whether TLS is used is never a guess.
pub(crate) fn endpoint_scheme(endpoint: &str) -> Result<Scheme, EtcdError> {
    let bad = |reason: &str| EtcdError::BadEndpoint {
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
pub(crate) enum TlsFile {
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
pub(crate) fn read_tls_file(
    flag: &'static str,
    path: &str,
    kind: TlsFile,
) -> Result<Vec<u8>, EtcdError> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let bytes = std::fs::read(path).map_err(|cause| EtcdError::TlsFile {
        flag,
        path: path.to_string(),
        cause,
    })?;
    let bad = |reason: String| EtcdError::BadTlsFile {
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
pub(crate) fn tls_options(
    endpoints: &[String],
    tls: &EtcdTls,
) -> Result<Option<TlsOptions>, EtcdError> {
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => {
            return Err(EtcdError::TlsFlagAlone {
                given: CERTFILE_FLAG,
                missing: KEYFILE_FLAG,
            });
        }
        (None, Some(_)) => {
            return Err(EtcdError::TlsFlagAlone {
                given: KEYFILE_FLAG,
                missing: CERTFILE_FLAG,
            });
        }
        _ => {}
    }
    if endpoints.iter().all(String::is_empty) {
        return Err(EtcdError::NoEndpoint);
    }
    let mut first = (None, None);
    for e in endpoints {
        match endpoint_scheme(e)? {
            Scheme::Http => first.0 = first.0.or(Some(e)),
            Scheme::Https => first.1 = first.1.or(Some(e)),
        }
    }
    match first {
        (Some(http), Some(https)) => Err(EtcdError::MixedSchemes {
            http: http.clone(),
            https: https.clone(),
        }),
        (Some(http), None) => {
            let given = tls.given();
            if given.is_empty() {
                Ok(None)
            } else {
                Err(EtcdError::TlsOverHttp {
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
/// input ([`EtcdError`]), never an unreachable etcd.
pub async fn connect_client(endpoints: &[String], tls: &EtcdTls) -> Result<Client, EtcdError> {
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
        EtcdError::ClientSettings {
            endpoints: endpoints.join(","),
            reason,
        }
    })
}

/// etcd's client error with the causes its `Display` leaves out: a transport error's sources
/// (a TLS file rustls cannot parse, no system certificates) are not chained by the client.
pub(crate) fn client_error(e: &etcd_client::Error) -> String {
    let mut text = e.to_string();
    if let etcd_client::Error::TransportError(t) = e {
        for s in std::iter::successors(std::error::Error::source(t), |s| s.source()) {
            let _ = write!(text, ": {s}");
        }
    }
    text
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::testutil::TempDir;

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
    struct Files(TempDir);

    impl Files {
        fn new(name: &str) -> Self {
            let dir = TempDir::new(&format!("etcd-flags-{name}"));
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
                dir.write(file, text);
            }
            Files(dir)
        }

        fn path(&self, name: &str) -> String {
            self.0.path().join(name).display().to_string()
        }
    }

    fn err(endpoints: &[&str], t: &EtcdTls) -> String {
        match tls_options(&eps(endpoints), t) {
            Ok(_) => panic!("{endpoints:?} with {t:?} was accepted"),
            Err(e) => e.to_string(),
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
        assert!(matches!(e, EtcdError::TlsFlagAlone { .. }), "{e}");
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
