//! The farm's certificates, in the PEM files nbdkit, QEMU and libnbd read.
//!
//! ```text
//!   farm CA (ca-cert.pem, ca-key.pem)           kept off the servers
//!    ├── server certificate (server-cert.pem)   one per server, its names and addresses
//!    ├── device credential (client-cert.pem)    issued ahead of time, CN = the device
//!    └── enrollment CA (enroll-ca-cert.pem)     one per server that enrolls devices
//!         └── device certificate                short-lived, CN = the device, traded
//!                                               for a one-time token at boot
//! ```
//!
//! Keys are ECDSA P-256. A certificate's subject CN names its holder; a
//! server's names and addresses are in its subjectAltName, which is all
//! rustls and webpki look at. This crate knows no sockets, farm or files
//! but [`write_folder`].

use std::io::Write;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

/// Why a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: {source}")]
    Rcgen {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn rc(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { what, source }
}

/// A random positive serial number of 16 bytes.
fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from(bytes.to_vec())
}

fn at(unix: i64) -> Result<OffsetDateTime, PkiError> {
    OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| PkiError::Invalid(format!("{unix} is not a time: {e}")))
}

fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// When a certificate is valid, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// From a minute ago (clocks of a farm differ a little) for `secs`.
    pub fn from_now(secs: u64) -> Validity {
        let now = now_unix();
        Validity {
            not_before: now - 60,
            not_after: now.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX / 2)),
        }
    }
}

/// A certificate made here, with its key when this side made the key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, then its issuer's when the issuer is not the root:
    /// the chain a TLS peer sends.
    pub chain_pem: String,
    /// Its private key (PKCS#8), unless the holder made it (a request).
    pub key_pem: Option<String>,
    /// Its serial number, in hex, for the logs.
    pub serial: String,
    pub validity: Validity,
}

/// A certificate authority: the farm's CA, or a server's enrollment CA
/// under it. It signs with its key; its certificate names it as issuer.
pub struct Authority {
    params: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
    /// Its own certificate is sent with those it issues (it is not a root).
    intermediate: bool,
    not_after: i64,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("intermediate", &self.intermediate)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// A new root CA named `name`, valid for `days`.
    pub fn create(name: &str, days: u32) -> Result<Authority, PkiError> {
        let key = KeyPair::generate().map_err(rc("making the CA's key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = named(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(serial());
        let validity = Validity::from_now(u64::from(days) * 86_400);
        params.not_before = at(validity.not_before)?;
        params.not_after = at(validity.not_after)?;
        let cert = params.self_signed(&key).map_err(rc("signing the CA"))?;
        Ok(Authority {
            cert_pem: cert.pem(),
            params: cert,
            key,
            intermediate: false,
            not_after: validity.not_after,
        })
    }

    /// The authority of a CA certificate and its key (PEM).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Authority, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(rc("reading the CA's key"))?;
        let first = first_pem(cert_pem)?;
        let der = pem_der(&first)?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::Invalid(format!("not a certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(PkiError::Invalid(format!(
                "{} is not a CA certificate",
                x509.subject()
            )));
        }
        let spki = x509.public_key().raw;
        if spki != key.public_key_der().as_slice() {
            return Err(PkiError::Invalid(
                "the key is not the certificate's: they do not match".into(),
            ));
        }
        let intermediate = x509.subject() != x509.issuer();
        let not_after = x509.validity().not_after.timestamp();
        let params =
            CertificateParams::from_ca_cert_der(&der.into()).map_err(rc("reading the CA"))?;
        // Only its name and key identifier are used to sign: the signature
        // of this copy is never shown to anyone.
        let cert = params.self_signed(&key).map_err(rc("reading the CA"))?;
        Ok(Authority {
            params: cert,
            key,
            cert_pem: first,
            intermediate,
            not_after,
        })
    }

    /// Its certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Its private key (PEM, PKCS#8).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The end of its own validity.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// `want`, ending no later than this authority does.
    fn within(&self, want: Validity) -> Validity {
        Validity {
            not_before: want.not_before,
            not_after: want.not_after.min(self.not_after),
        }
    }

    fn chain(&self, leaf: &rcgen::Certificate) -> String {
        match self.intermediate {
            true => format!("{}{}", leaf.pem(), self.cert_pem),
            false => leaf.pem(),
        }
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public: &impl rcgen::PublicKeyData,
        want: Validity,
    ) -> Result<(String, String, Validity), PkiError> {
        let validity = self.within(want);
        if validity.not_after <= validity.not_before {
            return Err(PkiError::Invalid(
                "the issuing CA's own certificate has expired".into(),
            ));
        }
        let serial = serial();
        let hex: String = serial.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        params.serial_number = Some(serial);
        params.not_before = at(validity.not_before)?;
        params.not_after = at(validity.not_after)?;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(public, &self.params, &self.key)
            .map_err(rc("signing the certificate"))?;
        Ok((self.chain(&cert), hex, validity))
    }

    /// A CA under this one, for a server to enroll devices with: it may
    /// sign device certificates and nothing below them.
    pub fn enrollment_ca(&self, server: &str, days: u32) -> Result<Issued, PkiError> {
        if self.intermediate {
            return Err(PkiError::Invalid(
                "an enrollment CA is made by the farm's root CA, not by another one".into(),
            ));
        }
        let key = KeyPair::generate().map_err(rc("making the key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = named(&format!("vstream enrollment CA of {server}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (chain_pem, serial, validity) =
            self.sign(params, &key, Validity::from_now(u64::from(days) * 86_400))?;
        Ok(Issued {
            chain_pem,
            key_pem: Some(key.serialize_pem()),
            serial,
            validity,
        })
    }

    /// A server's certificate: CN `name`, and `names` (host names and IP
    /// addresses clients dial) in its subjectAltName.
    pub fn server(&self, name: &str, names: &[String], days: u32) -> Result<Issued, PkiError> {
        if names.is_empty() {
            return Err(PkiError::Invalid(
                "a server certificate needs the names and addresses clients dial".into(),
            ));
        }
        let key = KeyPair::generate().map_err(rc("making the key"))?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| PkiError::Invalid(format!("{names:?}: {e}")))?;
        params.distinguished_name = named(name);
        params.is_ca = IsCa::ExplicitNoCa;
        // GnuTLS (QEMU, nbd-client) wants key encipherment on a server's
        // certificate, whatever its key.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (chain_pem, serial, validity) =
            self.sign(params, &key, Validity::from_now(u64::from(days) * 86_400))?;
        Ok(Issued {
            chain_pem,
            key_pem: Some(key.serialize_pem()),
            serial,
            validity,
        })
    }

    fn device_params(device: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = named(device);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params
    }

    /// A device's credential with a key made here: CN `device`.
    pub fn device(&self, device: &str, validity: Validity) -> Result<Issued, PkiError> {
        let key = KeyPair::generate().map_err(rc("making the key"))?;
        let (chain_pem, serial, validity) =
            self.sign(Authority::device_params(device), &key, validity)?;
        Ok(Issued {
            chain_pem,
            key_pem: Some(key.serialize_pem()),
            serial,
            validity,
        })
    }

    /// A device's certificate for the key of a signing request (PEM),
    /// whose signature is checked. Only the key is taken from the request:
    /// the name is always `device`, the usage always a client's.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        device: &str,
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        let public = request_key(csr_pem)?;
        let (chain_pem, serial, validity) =
            self.sign(Authority::device_params(device), &public, validity)?;
        Ok(Issued {
            chain_pem,
            key_pem: None,
            serial,
            validity,
        })
    }
}

/// The key of a signing request (PEM) whose signature holds. What else it
/// asks for (names, extensions: GnuTLS and OpenSSL add some) is ignored.
fn request_key(csr_pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, PkiError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::FromDer;
    let invalid = |why: String| {
        PkiError::Invalid(format!(
            "not a certificate signing request with a valid signature: {why}"
        ))
    };
    let (_, block) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| invalid(format!("unreadable PEM: {e}")))?;
    if block.label != "CERTIFICATE REQUEST" && block.label != "NEW CERTIFICATE REQUEST" {
        return Err(invalid(format!("a PEM {:?} block", block.label)));
    }
    let (_, csr) =
        X509CertificationRequest::from_der(&block.contents).map_err(|e| invalid(e.to_string()))?;
    csr.verify_signature()
        .map_err(|e| invalid(format!("its signature does not hold: {e}")))?;
    rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| invalid(format!("its key: {e}")))
}

/// A new key and a signing request for it (both PEM): what a device sends
/// to be certified, keeping its key.
pub fn request(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(rc("making the key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = named(name);
    let csr = params
        .serialize_request(&key)
        .map_err(rc("making the signing request"))?;
    let pem = csr.pem().map_err(rc("making the signing request"))?;
    Ok((pem, key.serialize_pem()))
}

/// A new one-time token: 32 random bytes in hex, 256 bits a guesser
/// cannot cover within its few minutes.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a token, in hex: what the farm state keeps of it, so a
/// reader of the farm state cannot spend it.
pub fn token_digest(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// Whether `token` is the one whose digest is `digest`, in time that does
/// not depend on where they differ.
pub fn token_matches(token: &str, digest: &str) -> bool {
    constant_time_eq(token_digest(token).as_bytes(), digest.as_bytes())
}

/// Whether `a` and `b` are equal, in time that does not depend on where
/// they differ (secrets, tokens).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The first PEM block of `text`, with its armour.
fn first_pem(text: &str) -> Result<String, PkiError> {
    const END: &str = "-----END CERTIFICATE-----";
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .ok_or_else(|| PkiError::Invalid("no certificate (PEM) in it".into()))?;
    let end = text[start..]
        .find(END)
        .ok_or_else(|| PkiError::Invalid("a certificate (PEM) without its end".into()))?;
    Ok(format!("{}\n", &text[start..start + end + END.len()]))
}

fn pem_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("unreadable PEM: {e}")))?;
    Ok(block.contents)
}

/// The end of the validity of the first certificate in `pem`.
pub fn not_after(pem: &str) -> Result<i64, PkiError> {
    let der = pem_der(&first_pem(pem)?)?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::Invalid(format!("not a certificate: {e}")))?;
    Ok(x509.validity().not_after.timestamp())
}

/// Writes `files` (name, contents, secret) into `dir`, made if missing. A
/// secret is mode 0600 from its creation. Nothing is overwritten: a file
/// already there stops it before anything is written.
pub fn write_folder(dir: &Path, files: &[(&str, &str, bool)]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    for (name, _, _) in files {
        let path = dir.join(name);
        if path.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists; not overwritten", path.display()),
            ));
        }
    }
    for (name, contents, secret) in files {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if *secret { 0o600 } else { 0o644 })
            .open(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pem: &str) -> Vec<Vec<u8>> {
        x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
            .map(|p| p.unwrap().contents)
            .collect()
    }

    fn cn(der: &[u8]) -> String {
        let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
        let name = c.subject().iter_common_name().next().unwrap();
        name.as_str().unwrap().to_owned()
    }

    #[test]
    fn a_request_is_signed_for_the_device_named_by_the_signer() {
        let root = Authority::create("farm CA", 10).unwrap();
        let issued = root.enrollment_ca("pvs1", 5).unwrap();
        let ca = Authority::load(&issued.chain_pem, issued.key_pem.as_deref().unwrap()).unwrap();
        let (csr, _key) = request("pc9-claims-this").unwrap();
        let cert = ca
            .sign_request(&csr, "pc1", Validity::from_now(3600))
            .unwrap();
        let chain = parse(&cert.chain_pem);
        assert_eq!(chain.len(), 2, "leaf and enrollment CA");
        assert_eq!(cn(&chain[0]), "pc1");
        assert_eq!(cn(&chain[1]), "vstream enrollment CA of pvs1");
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let (_, mid) = x509_parser::parse_x509_certificate(&chain[1]).unwrap();
        leaf.verify_signature(Some(mid.public_key())).unwrap();
        assert!(!leaf.is_ca());
        // Capped at the enrollment CA's end (5 days), not the asked 10 years.
        let long = ca
            .sign_request(&csr, "pc1", Validity::from_now(10 * 365 * 86_400))
            .unwrap();
        assert_eq!(long.validity.not_after, ca.not_after());
    }

    #[test]
    fn a_forged_request_or_a_mismatched_key_is_refused() {
        let root = Authority::create("farm CA", 10).unwrap();
        let (csr, _) = request("pc1").unwrap();
        // One byte of the signature changed.
        let mut der = parse(&csr.replace("CERTIFICATE REQUEST", "CERTIFICATE"))
            .pop()
            .unwrap();
        let last = der.len() - 3;
        der[last] ^= 0xff;
        let forged = pem_text("CERTIFICATE REQUEST", &der);
        let err = root
            .sign_request(&forged, "pc1", Validity::from_now(60))
            .unwrap_err();
        assert!(err.to_string().contains("signing request"), "{err}");
        let other = Authority::create("other", 1).unwrap();
        let err = Authority::load(root.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
        let server = root.server("pvs1", &["10.0.0.1".into()], 1).unwrap();
        let err =
            Authority::load(&server.chain_pem, server.key_pem.as_deref().unwrap()).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    fn pem_text(tag: &str, der: &[u8]) -> String {
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in der.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
                << (8 * (3 - chunk.len()));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        format!("-----BEGIN {tag}-----\n{out}\n-----END {tag}-----\n")
    }

    #[test]
    fn a_token_matches_its_digest_only() {
        let t = new_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, new_token());
        let d = token_digest(&t);
        assert_eq!(
            token_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(token_matches(&t, &d));
        assert!(!token_matches(&new_token(), &d));
        assert!(!token_matches(&t, &d[..63]));
        assert!(!token_matches(&d, &d), "the digest is not the token");
    }

    #[test]
    fn folders_are_written_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("vstream-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_folder(&dir, &[("a.pem", "A", false), ("k.pem", "K", true)]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("k.pem")).unwrap().permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
        let err = write_folder(&dir, &[("b.pem", "B", false), ("k.pem", "X", true)]).unwrap_err();
        assert!(err.to_string().contains("not overwritten"), "{err}");
        assert!(!dir.join("b.pem").exists());
        assert_eq!(std::fs::read_to_string(dir.join("k.pem")).unwrap(), "K");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
