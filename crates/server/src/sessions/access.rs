//! Who may open which export: the rules, without the lookups (the sessions
//! do those, in the farm state at connect time). On a server with TLS, a
//! client certificate names a device: that device opens its own disk
//! (`device/`, `base/`) and its vDisk's read-only versions, nothing else. A
//! client without one opens only the vDisks an admin opened to anonymous
//! readers. A server without TLS trusts its network, as before TLS: anyone
//! opens anything.

use vstream_api::{Device, VDisk};
use vstream_farm::DeviceKey;
use vstream_service::{Certificate, Client, OpenError, Refusal, TlsMode};

/// Who a client is, as far as opening exports goes.
pub(super) enum Holder {
    /// A server without TLS: its network is trusted.
    Anyone,
    /// No client certificate.
    Anonymous,
    /// The device its certificate names, as the farm state has it now.
    Device(Box<(Device, VDisk)>),
}

/// Who a client says it is, before the farm state is asked.
pub(super) enum Claim<'a> {
    Known(Holder),
    /// A certificate naming this device (its name or MAC).
    Device(&'a str, &'a Certificate),
}

/// What an export name asks for.
pub(super) enum Wants<'a> {
    /// `device/KEY` or `base/KEY@N/HASH` (the export, and KEY): a device's
    /// own disk.
    Device(&'a str, &'a str),
    /// `VDISK` or `VDISK@N`: a vDisk's version, read-only.
    VDisk(&'a str),
}

/// What `client` claims on a listener in TLS mode `mode`.
pub(super) fn claim(mode: TlsMode, client: &Client) -> Result<Claim<'_>, OpenError> {
    if mode == TlsMode::Off {
        return Ok(Claim::Known(Holder::Anyone));
    }
    let Some(cert) = &client.certificate else {
        return Ok(Claim::Known(Holder::Anonymous));
    };
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
    Ok(Claim::Device(name, cert))
}

/// The holder of `cert`, which names `name`, once the farm state answered
/// `found` for it.
pub(super) fn device_holder(
    name: &str,
    cert: &Certificate,
    found: Result<(Device, VDisk), OpenError>,
) -> Result<Holder, OpenError> {
    let (device, vdisk) = match found {
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

fn unknown(why: String) -> OpenError {
    OpenError::Denied(Refusal::UnknownDevice, why)
}

/// Whether `holder` needs to know if a vDisk it wants is open to anonymous
/// readers (it is neither trusted nor the vDisk's own device).
pub(super) fn asks_anonymous_read(holder: &Holder, wants: &Wants<'_>) -> bool {
    match (holder, wants) {
        (Holder::Anyone, _) | (_, Wants::Device(..)) => false,
        (Holder::Device(d), Wants::VDisk(name)) => d.1.name != *name,
        (Holder::Anonymous, Wants::VDisk(_)) => true,
    }
}

/// Refuses `wants` unless `holder` may open it; `anonymous_read`: the vDisk
/// it wants is open to anonymous readers.
pub(super) fn admit(
    holder: &Holder,
    wants: Wants<'_>,
    anonymous_read: bool,
) -> Result<(), OpenError> {
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
        (Holder::Device(d), Wants::VDisk(name)) if d.1.name == name || anonymous_read => Ok(()),
        (Holder::Device(d), Wants::VDisk(name)) => Err(OpenError::Denied(
            Refusal::WrongExport,
            format!(
                "the certificate of device {} opens vDisk {}, not vDisk {name}",
                d.0.name, d.1.name
            ),
        )),
        (Holder::Anonymous, Wants::VDisk(_)) if anonymous_read => Ok(()),
        (Holder::Anonymous, Wants::VDisk(name)) => Err(OpenError::Denied(
            Refusal::Anonymous,
            format!(
                "vDisk {name} is not open to clients without a device's certificate \
                 (`vstream vdisk set {name} --anonymous-read on`)"
            ),
        )),
    }
}
