//! NBD over TLS, as the NBD spec, QEMU, nbdkit and libnbd do it: the client
//! sends `NBD_OPT_STARTTLS`, the server acknowledges, and the TLS handshake
//! runs on the same connection; the option haggling then starts again inside
//! TLS, with nothing negotiated before it kept.
//!
//! ```text
//!   --tls off       STARTTLS refused (NBD_REP_ERR_POLICY); plain NBD as before
//!   --tls on        TLS if the client asks for it, plain otherwise
//!   --tls require   FORCEDTLS: before STARTTLS every option but STARTTLS and
//!                   ABORT gets NBD_REP_ERR_TLS_REQD; NBD_OPT_EXPORT_NAME,
//!                   which cannot be refused, closes the connection
//! ```
//!
//! Certificates come from one folder laid out as nbdkit and QEMU lay theirs
//! out: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, and optionally
//! `ca-crl.pem`. With a CA, a client may present a certificate from it (not
//! revoked by the CRL), which names the client ([`Certificate`]); with
//! `verify_peer` it must.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// When a connection must, may or cannot use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// STARTTLS is refused.
    #[default]
    Off,
    /// TLS when the client asks for it.
    On,
    /// Nothing but STARTTLS and ABORT before TLS (the spec's FORCEDTLS).
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<TlsMode, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!("{s:?} is not a TLS mode: off, on or require")),
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

/// A listener's TLS: its mode, and the server's credentials when it has any.
#[derive(Clone)]
pub struct Tls {
    pub mode: TlsMode,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// The same credentials with a client certificate optional (HTTPS: a
    /// device enrolls before it has one; each route decides).
    api_acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("credentials", &self.acceptor.is_some())
            .finish()
    }
}

/// Why a certificate folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls {0} needs certificates (--tls-certificates DIR)")]
    NoCertificates(TlsMode),
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: {why}", path.display())]
    Bad { path: PathBuf, why: String },
}

impl Tls {
    /// Plain NBD only.
    pub fn off() -> Tls {
        Tls {
            mode: TlsMode::Off,
            acceptor: None,
            api_acceptor: None,
        }
    }

    /// `mode` with the credentials in `dir` (see the module docs).
    pub fn load(mode: TlsMode, dir: Option<&Path>, verify_peer: bool) -> Result<Tls, TlsError> {
        let Some(dir) = dir else {
            return match mode {
                TlsMode::Off => Ok(Tls::off()),
                m => Err(TlsError::NoCertificates(m)),
            };
        };
        let acceptor = |verify| {
            server_config(dir, verify).map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)))
        };
        Ok(Tls {
            mode,
            acceptor: Some(acceptor(verify_peer)?),
            api_acceptor: Some(acceptor(false)?),
        })
    }

    /// The acceptor of the server's credentials, whatever the NBD mode,
    /// with a client certificate optional: for the API's HTTPS listener,
    /// whose routes each decide what a request must show.
    pub fn api_credentials(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.api_acceptor.as_ref()
    }

    /// The acceptor for a STARTTLS, unless this listener refuses TLS.
    pub fn acceptor(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        match self.mode {
            TlsMode::Off => None,
            _ => self.acceptor.as_ref(),
        }
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::Bad {
            path: path.to_owned(),
            why: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

/// The rustls server configuration for the credentials in `dir`.
fn server_config(dir: &Path, verify_peer: bool) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_path = dir.join("ca-cert.pem");
    let cert_path = dir.join("server-cert.pem");
    let key_path = dir.join("server-key.pem");
    let chain = read_certs(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|source| TlsError::Read {
        path: key_path.clone(),
        source,
    })?;
    let bad = |path: &Path, why: String| TlsError::Bad {
        path: path.to_owned(),
        why,
    };
    // With a CA, a client certificate is asked for and, when shown,
    // checked: it names the device. `verify_peer` makes it required.
    let verifier = if verify_peer || ca_path.exists() {
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&ca_path)? {
            roots
                .add(ca)
                .map_err(|e| bad(&ca_path, format!("not a CA certificate: {e}")))?;
        }
        let crl_path = dir.join("ca-crl.pem");
        let crls = match crl_path.exists() {
            true => CertificateRevocationListDer::pem_file_iter(&crl_path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsError::Read {
                    path: crl_path.clone(),
                    source,
                })?,
            false => Vec::new(),
        };
        let builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .with_crls(crls);
        match verify_peer {
            true => builder,
            false => builder.allow_unauthenticated(),
        }
        .build()
        .map_err(|e| bad(&ca_path, format!("cannot verify clients with it: {e}")))?
    } else {
        WebPkiClientVerifier::no_client_auth()
    };
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(dir, e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad(&cert_path, format!("with {}: {e}", key_path.display())))
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// The subject's common name: the device it names (a device's name or
    /// MAC). `None` if the subject has no CN.
    pub name: Option<String>,
    /// The start of its validity, in seconds since the Unix epoch: a
    /// device's credentials revoked at time T refuse every certificate that
    /// became valid up to T.
    pub not_before: i64,
    /// The end of its validity, in seconds since the Unix epoch.
    pub not_after: i64,
    /// It may serve TLS (extended key usage serverAuth): a server's
    /// certificate, not a device's, which is for clients only.
    pub server: bool,
    /// The serial number, in hex, for the logs.
    pub serial: String,
}

impl Certificate {
    /// The certificate a TLS handshake verified, if the client showed one.
    pub fn of_peer(conn: &rustls::ServerConnection) -> Result<Option<Certificate>, String> {
        match conn.peer_certificates() {
            Some([leaf, ..]) => Certificate::from_der(leaf).map(Some),
            _ => Ok(None),
        }
    }

    /// Reads the leaf certificate (DER) a TLS handshake verified.
    pub fn from_der(der: &[u8]) -> Result<Certificate, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable client certificate: {e}"))?;
        let name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(Certificate {
            name,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            server: matches!(cert.extended_key_usage(), Ok(Some(eku)) if eku.value.server_auth),
            serial: cert.raw_serial_as_string(),
        })
    }
}

/// Who is at the other end of one connection.
#[derive(Debug, Clone, Default)]
pub struct Client {
    /// Its address, for the logs.
    pub addr: String,
    /// The connection went on inside TLS.
    pub tls: bool,
    /// The client certificate the TLS handshake verified, if it showed one.
    pub certificate: Option<Certificate>,
}

impl Client {
    /// A client known by its address only.
    pub fn plain(addr: &str) -> Client {
        Client {
            addr: addr.to_owned(),
            ..Client::default()
        }
    }
}

/// A client's TLS (the agent's, to its servers): the farm's CA to check the
/// server with, and the device's own certificate to show, from a folder
/// with nbdkit's and QEMU's client layout: `ca-cert.pem`, and
/// `client-cert.pem` with `client-key.pem`.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    /// The name the server's certificate must carry, instead of the host
    /// the client dials (QEMU's and libnbd's `tls-hostname`).
    hostname: Option<String>,
    /// The certificate the client shows: swapped in place when the agent
    /// enrolls or renews, for every connection made after.
    credential: Arc<Credential>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("hostname", &self.hostname)
            .field("credential", &self.credential.not_after())
            .finish()
    }
}

/// A client's certificate and key, if it has them yet.
#[derive(Debug, Default)]
struct Credential {
    current: std::sync::RwLock<Option<(Arc<rustls::sign::CertifiedKey>, i64)>>,
}

impl Credential {
    fn get(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.as_ref().map(|(k, _)| k.clone())
    }
    fn not_after(&self) -> Option<i64> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.as_ref().map(|(_, t)| *t)
    }
}

impl rustls::client::ResolvesClientCert for Credential {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.get()
    }
    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

/// The certificate and key of a chain and key in PEM, with the end of the
/// leaf's validity.
fn certified_key(
    provider: &rustls::crypto::CryptoProvider,
    chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Arc<rustls::sign::CertifiedKey>, i64), String> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err("no certificate in it".into());
    };
    let not_after = Certificate::from_der(leaf)?.not_after;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("unreadable key: {e}"))?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable key: {e}"))?;
    let certified = rustls::sign::CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| format!("the key is not the certificate's: {e}"))?;
    Ok((Arc::new(certified), not_after))
}

impl ClientTls {
    /// The rustls configuration, for an HTTPS client of the same farm.
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.connector.config().clone()
    }

    /// The farm's CA from `dir/ca-cert.pem`, and the client's certificate
    /// from `client-cert.pem` with `client-key.pem` if they are there (a
    /// device that enrolls gets it later: [`ClientTls::set_credential`]).
    pub fn load(dir: &Path, hostname: Option<String>) -> Result<ClientTls, TlsError> {
        ClientTls::load_as(dir, "client", hostname)
    }

    /// A server's TLS towards the other servers of its farm: the farm's CA
    /// from `dir/ca-cert.pem`, and its own `server-cert.pem` with
    /// `server-key.pem` shown as its client certificate.
    pub fn load_server(dir: &Path) -> Result<ClientTls, TlsError> {
        ClientTls::load_as(dir, "server", None)
    }

    /// A client that trusts the CA certificates of `ca_file` and shows no
    /// certificate: the admin CLI towards a server's HTTPS API.
    pub fn trusting(ca_file: &Path) -> Result<ClientTls, TlsError> {
        ClientTls::build(ca_file, None, None)
    }

    fn load_as(dir: &Path, role: &str, hostname: Option<String>) -> Result<ClientTls, TlsError> {
        let cert_path = dir.join(format!("{role}-cert.pem"));
        let key_path = dir.join(format!("{role}-key.pem"));
        let own = cert_path
            .exists()
            .then_some((cert_path.as_path(), key_path.as_path()));
        ClientTls::build(&dir.join("ca-cert.pem"), own, hostname)
    }

    fn build(
        ca_path: &Path,
        own: Option<(&Path, &Path)>,
        hostname: Option<String>,
    ) -> Result<ClientTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let dir = ca_path.parent().unwrap_or(Path::new("."));
        let bad = |path: &Path, why: String| TlsError::Bad {
            path: path.to_owned(),
            why,
        };
        let mut roots = RootCertStore::empty();
        for ca in read_certs(ca_path)? {
            roots
                .add(ca)
                .map_err(|e| bad(ca_path, format!("not a CA certificate: {e}")))?;
        }
        let credential = Arc::new(Credential::default());
        if let Some((cert_path, key_path)) = own {
            let read =
                |p: &Path| std::fs::read(p).map_err(|e| bad(p, format!("cannot read it: {e}")));
            let loaded = certified_key(&provider, &read(cert_path)?, &read(key_path)?)
                .map_err(|e| bad(cert_path, format!("with {}: {e}", key_path.display())))?;
            *credential
                .current
                .write()
                .unwrap_or_else(|e| e.into_inner()) = Some(loaded);
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(dir, e.to_string()))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(credential.clone());
        // A resumed session keeps the identity of the one it resumes: the
        // certificate the client had then, or none before it enrolled. A
        // full handshake each time (a login, a failover) shows today's.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            hostname,
            credential,
        })
    }

    /// Whether the client has a certificate to show.
    pub fn has_credential(&self) -> bool {
        self.credential.get().is_some()
    }

    /// When the client's certificate ends (Unix seconds), if it has one.
    pub fn credential_not_after(&self) -> Option<i64> {
        self.credential.not_after()
    }

    /// Shows `chain_pem` (the certificate, then its issuers) with
    /// `key_pem` from the next connection on; this and every clone.
    pub fn set_credential(&self, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        let provider = rustls::crypto::ring::default_provider();
        let loaded = certified_key(&provider, chain_pem.as_bytes(), key_pem.as_bytes())?;
        *self
            .credential
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(loaded);
        Ok(())
    }

    /// The TLS handshake on `stream`, to the server at `addr` (HOST:PORT):
    /// its certificate must name HOST, or the configured host name.
    pub async fn connect<S>(
        &self,
        addr: &str,
        stream: S,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let host = match &self.hostname {
            Some(h) => h.as_str(),
            None => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                host.trim_start_matches('[').trim_end_matches(']')
            }
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{host:?} is not a server name for TLS: {e}"),
            )
        })?;
        self.connector.connect(name, stream).await
    }
}
