//! Who may open which export. On a server with TLS, a client certificate
//! names a device: that device opens its own disk (`device/`, `base/`) and
//! its vDisk's read-only versions, nothing else. A client without one opens
//! only the vDisks an admin opened to anonymous readers. A server without
//! TLS trusts its network, as before TLS: anyone opens anything.
//!
//! The device is looked up in the farm state at connect time, so removing a
//! device or revoking its credentials refuses its next connection at once,
//! while its certificate is still valid.

use vstream_api::{Device, VDisk};
use vstream_farm::DeviceKey;
use vstream_service::{Client, OpenError, Refusal, TlsMode};

use super::Sessions;

/// Who a client is, as far as opening exports goes.
pub(super) enum Holder {
    /// A server without TLS: its network is trusted.
    Anyone,
    /// No client certificate.
    Anonymous,
    /// The device its certificate names, as the farm state has it now.
    Device(Box<(Device, VDisk)>),
}

/// What an export name asks for.
pub(super) enum Wants<'a> {
    /// `device/KEY` or `base/KEY@N/HASH` (the export, and KEY): a device's
    /// own disk.
    Device(&'a str, &'a str),
    /// `VDISK` or `VDISK@N`: a vDisk's version, read-only.
    VDisk(&'a str),
}

impl Sessions {
    /// Who `client` is: the device its certificate names, checked against
    /// the farm state now.
    pub(super) async fn holder(&self, client: &Client) -> Result<Holder, OpenError> {
        if self.tls.mode == TlsMode::Off {
            return Ok(Holder::Anyone);
        }
        let Some(cert) = &client.certificate else {
            return Ok(Holder::Anonymous);
        };
        let unknown = |why: String| OpenError::Denied(Refusal::UnknownDevice, why);
        let Some(name) = &cert.name else {
            return Err(unknown(format!(
                "the client certificate (serial {}) has no common name: it names no device",
                cert.serial
            )));
        };
        if DeviceKey::parse(name).is_err() {
            return Err(unknown(format!(
                "the client certificate names {name:?}, which is no device name or MAC"
            )));
        }
        let (device, vdisk) = match self.device_and_vdisk(name).await {
            Err(OpenError::Unknown(_)) => {
                return Err(unknown(format!(
                    "the client certificate names {name:?}, which is no device of this farm"
                )))
            }
            other => other?,
        };
        if let Some(why) = device.revoked(cert.not_before) {
            return Err(OpenError::Denied(Refusal::Revoked, why));
        }
        Ok(Holder::Device(Box::new((device, vdisk))))
    }

    /// Refuses `wants` unless `holder` may open it.
    pub(super) async fn admit(&self, holder: &Holder, wants: Wants<'_>) -> Result<(), OpenError> {
        match (holder, wants) {
            (Holder::Anyone, _) => Ok(()),
            (Holder::Anonymous, Wants::Device(export, _)) => Err(OpenError::Denied(
                Refusal::Anonymous,
                format!("{export} opens only with the device's client certificate"),
            )),
            (Holder::Device(d), Wants::Device(export, key)) => {
                let (device, _) = &**d;
                match DeviceKey::parse(key) {
                    Ok(k) if k.names(device) => Ok(()),
                    _ => Err(OpenError::Denied(
                        Refusal::WrongExport,
                        format!(
                            "the certificate of device {} opens only its own disk, not {export}",
                            device.name
                        ),
                    )),
                }
            }
            (holder, Wants::VDisk(name)) => {
                let own = match holder {
                    Holder::Device(d) => d.1.name == name,
                    _ => false,
                };
                if own || self.anonymous_read(name).await {
                    return Ok(());
                }
                Err(match holder {
                    Holder::Device(d) => OpenError::Denied(
                        Refusal::WrongExport,
                        format!(
                            "the certificate of device {} opens vDisk {}, not vDisk {name}",
                            d.0.name, d.1.name
                        ),
                    ),
                    _ => OpenError::Denied(
                        Refusal::Anonymous,
                        format!(
                            "vDisk {name} is not open to clients without a device's certificate \
                             (`vstream vdisk set {name} --anonymous-read on`)"
                        ),
                    ),
                })
            }
        }
    }

    /// Whether vDisk `name` is open to anonymous readers, by the farm state
    /// (the last known one while it is away).
    async fn anonymous_read(&self, name: &str) -> bool {
        if self.membership.is_connected() {
            if let Ok(found) = self.farm.get_vdisk(name).await {
                return found.is_some_and(|v| v.anonymous_read);
            }
        }
        self.membership
            .view()
            .vdisk(name)
            .is_some_and(|v| v.anonymous_read)
    }

    /// The exports NBD_OPT_LIST shows `client`: what it may open, by the
    /// farm state now.
    pub(crate) async fn listed(&self, client: &Client) -> Vec<(String, String)> {
        let Ok(holder) = self.holder(client).await else {
            // Names no device (or a revoked one): nothing opens for it.
            return Vec::new();
        };
        let mut list = Vec::new();
        if let Holder::Device(d) = &holder {
            let name = &d.0.name;
            list.push((format!("device/{name}"), format!("device {name}'s disk")));
        }
        for n in self.store.list().unwrap_or_default() {
            if self.admit(&holder, Wants::VDisk(&n)).await.is_ok() {
                let description = format!("vDisk {n} (read-only)");
                list.push((n, description));
            }
        }
        list
    }
}
