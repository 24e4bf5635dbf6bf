//! Device credentials: the server's enrollment CA signs short-lived device
//! certificates, for a one-time token from a boot script (a netbooted
//! device, which has no disk to keep a key on) or for an administrator
//! (`vstream device credential`, a VM or host that has one).
//!
//! ```text
//!   GET /boot/ipxe?mac=M     token T (random, 256 bits) on the kernel command
//!                            line; the farm keeps SHA-256(T), M, the asker,
//!                            and T's expiry: enroll/DEVICE, one per device
//!   POST /api/v1/enroll      over HTTPS: {M, T, CSR} → a certificate naming
//!                            the device, valid --device-cert-hours; T is taken
//!                            from the farm in the same transaction, so it
//!                            serves once, on whichever server it is shown
//! ```
//!
//! The enrollment CA (`enroll-ca-cert.pem`, `enroll-ca-key.pem` in the TLS
//! folder) is the server's own, made by the farm's CA with path length 0:
//! it can sign devices and nothing else, and is the only CA key a server
//! holds. The farm CA's key stays offline. A token is refused if it is
//! unknown, spent, replaced by a later boot script, late, shown with
//! another MAC, or older than the device's last `device revoke`.

use std::path::Path;
use std::sync::atomic::AtomicU64;

use vstream_api::{CredentialReply, Device, EnrollToken};
use vstream_farm::{FarmError, FarmStore};
use vstream_pki::{Authority, Validity};
use vstream_service::metrics::Metrics;

/// A `/metrics` row: name, type, help, counter.
pub(crate) type Row<'a> = (&'static str, &'static str, &'static str, &'a AtomicU64);
use crate::clock::now_unix;
use crate::config::Config;

/// The enrollment CA's files in the TLS certificates folder.
pub const CA_CERT: &str = "enroll-ca-cert.pem";
pub const CA_KEY: &str = "enroll-ca-key.pem";

/// Longest credential an administrator may ask a server for, and the
/// default: a month, renewed by asking again. Revocation in the farm state
/// ends it sooner.
pub const MAX_CREDENTIAL_HOURS: u64 = 24 * 90;
pub const DEFAULT_CREDENTIAL_HOURS: u64 = 24 * 30;

/// This server's enrollment: its CA, if it has one, and what it did.
#[derive(Default)]
pub struct Enrollment {
    ca: Option<Authority>,
    /// The farm's CA (`ca-cert.pem`), which devices check servers with.
    root_pem: String,
    pub stats: Stats,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Stats {
    tokens: AtomicU64,
    issued: AtomicU64,
    refused: AtomicU64,
}

impl Stats {
    pub fn metrics(&self) -> Vec<Row<'_>> {
        vec![
            (
                "vstream_enroll_tokens_total",
                "counter",
                "enrollment tokens handed out in boot scripts",
                &self.tokens,
            ),
            (
                "vstream_enroll_certificates_total",
                "counter",
                "device certificates signed (enrollment and admin credentials)",
                &self.issued,
            ),
            (
                "vstream_enroll_refusals_total",
                "counter",
                "enrollments refused (reason in the log): unknown device, bad or spent or late token, revoked",
                &self.refused,
            ),
        ]
    }
}

/// Why a credential was not issued: the HTTP status it maps to and the
/// reason, which names no token.
#[derive(Debug)]
pub enum Refused {
    /// The request does not hold up: a bad token, an unknown device.
    Forbidden(String),
    /// A signing request that is not one.
    BadRequest(String),
    /// This server cannot sign (no enrollment CA, no TLS).
    Unavailable(String),
    Farm(FarmError),
}

impl Enrollment {
    /// The enrollment CA in the TLS folder `dir`, if both its files are
    /// there. A key others can read is refused: it signs for every device.
    pub fn load(dir: Option<&Path>) -> anyhow::Result<Enrollment> {
        use anyhow::Context;
        use std::os::unix::fs::PermissionsExt;
        let Some(dir) = dir else {
            return Ok(Enrollment::default());
        };
        let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if !cert.exists() && !key.exists() {
            return Ok(Enrollment::default());
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let mode = std::fs::metadata(&key)
            .with_context(|| format!("reading {}", key.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "{} can be read by others (mode {:o}): it signs certificates for every \
                 device; chmod 600 it",
                key.display(),
                mode & 0o777
            );
        }
        let ca = Authority::load(&read(&cert)?, &read(&key)?)
            .with_context(|| format!("the enrollment CA in {}", dir.display()))?;
        let root_pem = read(&dir.join("ca-cert.pem"))?;
        tracing::info!(not_after = ca.not_after(), "device enrollment CA loaded");
        Ok(Enrollment {
            ca: Some(ca),
            root_pem,
            stats: Stats::default(),
        })
    }

    /// Whether this server signs device certificates.
    pub fn enabled(&self) -> bool {
        self.ca.is_some()
    }

    /// A new token for `device`, recorded in the farm state in place of
    /// any earlier one; `None` if this server does not enroll.
    pub async fn hand_out(
        &self,
        config: &Config,
        farm: &FarmStore,
        device: &Device,
        from: &str,
    ) -> Result<Option<String>, FarmError> {
        // Without an HTTPS API the device could not show it anywhere.
        if !self.enabled() || config.api_tls.is_none() {
            return Ok(None);
        }
        let token = vstream_pki::new_token();
        let now = now_unix();
        let record = EnrollToken {
            sha256: vstream_pki::token_digest(&token),
            mac: device.mac.clone(),
            from: from.to_owned(),
            created_unix: now,
            expires_unix: now + config.enroll_token_ttl_secs,
        };
        farm.put_enroll_token(&device.name, &record).await?;
        Metrics::add(&self.stats.tokens, 1);
        Ok(Some(token))
    }

    /// Spends `token` of the device with `mac` and signs `csr` for it.
    pub async fn enroll(
        &self,
        config: &Config,
        farm: &FarmStore,
        mac: &str,
        token: &str,
        csr: &str,
    ) -> Result<CredentialReply, Refused> {
        let outcome = self.try_enroll(config, farm, mac, token, csr).await;
        self.count(&outcome);
        outcome
    }

    async fn try_enroll(
        &self,
        config: &Config,
        farm: &FarmStore,
        mac: &str,
        token: &str,
        csr: &str,
    ) -> Result<CredentialReply, Refused> {
        self.ca()?;
        let mac = vstream_api::parse_mac(mac).map_err(Refused::BadRequest)?;
        let device = farm
            .find_device(&mac)
            .await
            .map_err(Refused::Farm)?
            .ok_or_else(|| Refused::Forbidden(format!("no device has MAC {mac}")))?;
        let now = now_unix();
        let revoked = device.credentials_revoked_unix;
        let check = |t: &EnrollToken| -> Result<(), String> {
            if t.mac != mac {
                return Err(format!(
                    "device {}'s token was handed to MAC {}, not {mac}",
                    device.name, t.mac
                ));
            }
            if !vstream_pki::token_matches(token, &t.sha256) {
                return Err(format!(
                    "not device {}'s enrollment token (wrong, or replaced by a later boot script)",
                    device.name
                ));
            }
            Ok(())
        };
        let taken = farm
            .take_enroll_token(&device.name, check)
            .await
            .map_err(Refused::Farm)?
            .map_err(Refused::Forbidden)?;
        // Spent either way from here: a late token cannot be tried again.
        if now > taken.expires_unix {
            return Err(Refused::Forbidden(format!(
                "device {}'s enrollment token expired {} s ago",
                device.name,
                now - taken.expires_unix
            )));
        }
        if let Some(at) = revoked.filter(|at| taken.created_unix <= *at) {
            return Err(Refused::Forbidden(format!(
                "device {}'s enrollment token predates the revocation of its credentials at {at}",
                device.name
            )));
        }
        self.sign(&device, csr, config.device_cert_hours * 3600)
    }

    /// A new certificate for a device that showed a valid one of its own.
    pub fn renew(
        &self,
        config: &Config,
        device: &Device,
        csr: &str,
    ) -> Result<CredentialReply, Refused> {
        let outcome = self.sign(device, csr, config.device_cert_hours * 3600);
        self.count(&outcome);
        outcome
    }

    /// A certificate for an administrator's request.
    pub fn credential(
        &self,
        device: &Device,
        csr: &str,
        hours: Option<u64>,
    ) -> Result<CredentialReply, Refused> {
        let hours = hours.unwrap_or(DEFAULT_CREDENTIAL_HOURS);
        let outcome = match hours {
            1..=MAX_CREDENTIAL_HOURS => self.sign(device, csr, hours * 3600),
            _ => Err(Refused::BadRequest(format!(
                "a credential lasts 1 to {MAX_CREDENTIAL_HOURS} hours, not {hours}"
            ))),
        };
        self.count(&outcome);
        outcome
    }

    fn ca(&self) -> Result<&Authority, Refused> {
        self.ca.as_ref().ok_or_else(|| {
            Refused::Unavailable(format!(
                "this server has no enrollment CA ({CA_CERT} and {CA_KEY} in its \
                 --tls-certificates folder; `vstream ca server --enrollment` makes them)"
            ))
        })
    }

    /// Signs `csr` for `device`, valid `secs` from now but never from
    /// before its last revocation.
    fn sign(&self, device: &Device, csr: &str, secs: u64) -> Result<CredentialReply, Refused> {
        let ca = self.ca()?;
        let mut validity = Validity::from_now(secs);
        if let Some(at) = device.credentials_revoked_unix {
            validity.not_before = validity.not_before.max(at as i64 + 1);
        }
        let issued = ca
            .sign_request(csr, &device.name, validity)
            .map_err(|e| Refused::BadRequest(e.to_string()))?;
        tracing::info!(device = %device.name, serial = %issued.serial, not_after = issued.validity.not_after, "device certificate signed");
        Ok(CredentialReply {
            device: device.name.clone(),
            chain_pem: issued.chain_pem,
            ca_pem: self.root_pem.clone(),
            not_after_unix: issued.validity.not_after,
            serial: issued.serial,
        })
    }

    fn count(&self, outcome: &Result<CredentialReply, Refused>) {
        match outcome {
            Ok(_) => Metrics::add(&self.stats.issued, 1),
            Err(Refused::Farm(_)) => {}
            Err(_) => Metrics::add(&self.stats.refused, 1),
        }
    }
}
