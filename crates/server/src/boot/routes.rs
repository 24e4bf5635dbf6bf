//! The boot routes: the iPXE script and boot files for devices (no admin
//! token, as with login), and boot files for peers (the farm's peer secret).

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;
use vstream_api::{BootFileKind, Device, VDisk};
use vstream_netboot::ipxe::{self, BootScript};

use super::{file_path, valid_hash, Boot};
use crate::auth::require_peer;
use crate::clock::now_unix;
use crate::error::ApiError;
use vstream_service::metrics::Metrics;

/// The device-facing routes: no admin token, as with login.
pub fn routes(boot: Arc<Boot>) -> Router {
    Router::new()
        .route("/boot/ipxe", axum::routing::get(script))
        .route("/boot/:mac/:file", axum::routing::get(file))
        .with_state(boot)
}

/// The boot file route of the peer protocol, behind the farm's peer secret.
pub fn peer_routes(boot: Arc<Boot>) -> Router {
    Router::new()
        .route(
            "/peer/v1/vdisks/:name/boot/:hash",
            axum::routing::get(peer_file),
        )
        .layer(middleware::from_fn_with_state(
            boot.replication.clone(),
            require_peer,
        ))
        .with_state(boot)
}

/// The live servers' HTTP base URLs, this one first.
fn servers(server: &Boot) -> Vec<String> {
    let me = server.config.advertise_api.trim_end_matches('/').to_owned();
    let mut out = vec![me.clone()];
    for s in &server.membership.view().servers {
        let api = s.api.trim_end_matches('/').to_owned();
        if !out.contains(&api) {
            out.push(api);
        }
    }
    out
}

/// Where devices log in, this one first: each live server's HTTPS API if
/// it has one (a farm with TLS), else its HTTP API.
fn logins(server: &Boot) -> Vec<String> {
    let config = &server.config;
    let mine = config
        .advertise_api_tls
        .as_ref()
        .unwrap_or(&config.advertise_api);
    let mut out = vec![mine.trim_end_matches('/').to_owned()];
    for s in &server.membership.view().servers {
        let api = s.api_tls.as_ref().unwrap_or(&s.api).trim_end_matches('/');
        if !out.iter().any(|o| o == api) {
            out.push(api.to_owned());
        }
    }
    out
}

#[derive(Deserialize)]
struct ScriptQuery {
    mac: Option<String>,
}

fn ipxe_script(text: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

/// `GET /boot/ipxe?mac=M`: the device's boot script, or a message for its
/// console saying why it cannot boot. Always a script: iPXE shows nothing
/// useful of an HTTP error.
async fn script(
    State(server): State<Arc<Boot>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<ScriptQuery>,
) -> Response {
    let servers = servers(&server);
    let raw = q.mac.unwrap_or_default();
    let Ok(mac) = vstream_api::parse_mac(&raw) else {
        return ipxe_script(ipxe::refusal(
            &format!("{raw:?} is not a MAC address"),
            "chain to /boot/ipxe?mac=${net0/mac}",
            // Asked again with the NIC's own MAC, which iPXE fills in.
            "${net0/mac}",
            &servers,
        ));
    };
    let stats = &server.stats;
    match boot_target(&server, &mac, true).await {
        Ok((device, vdisk)) if vdisk.boot.method == vstream_api::BootMethod::Sanboot => {
            sanboot(&server, &device, &vdisk, &mac, peer, &servers).await
        }
        Ok((device, vdisk)) => {
            let Some(kernel) = &vdisk.boot.kernel else {
                Metrics::add(&stats.refusals, 1);
                return ipxe_script(ipxe::refusal(
                    &format!(
                        "vDisk {} has no kernel to network-boot (device {})",
                        vdisk.name, device.name
                    ),
                    &format!(
                        "set one: vstream vdisk set {} --kernel FILE --initrd FILE",
                        vdisk.name
                    ),
                    &mac,
                    &servers,
                ));
            };
            // The device asks for its script as it starts: a new boot. Its
            // sessions of the last one end wherever they are, and the token
            // reaches its agent (or initramfs) on the kernel command line.
            let token = crate::sessions::new_boot_token();
            let boot = server
                .sessions
                .boot_of(&device.name, Some(&token), "ipxe")
                .await;
            // On a farm that enrolls devices: a one-time token for its
            // certificate, recorded before the device can show it.
            let enroll = match server
                .enrollment
                .hand_out(
                    &server.config,
                    &server.farm,
                    &device,
                    &peer.ip().to_string(),
                )
                .await
            {
                Ok(token) => token.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(device = %device.name, error = %e, "boot script refused: no enrollment token");
                    Metrics::add(&stats.refusals, 1);
                    return ipxe_script(ipxe::refusal(
                        &format!(
                            "the farm state could not record device {}'s enrollment token: {e}",
                            device.name
                        ),
                        "",
                        &mac,
                        &servers,
                    ));
                }
            };
            tracing::info!(device = %device.name, %mac, vdisk = %vdisk.name, kernel = %kernel.name, boot = boot.map_or(0, |b| b.seq), enroll = !enroll.is_empty(), "boot script");
            Metrics::add(&stats.scripts, 1);
            let login = logins(&server);
            ipxe_script(
                BootScript {
                    device: &device.name,
                    mac: &mac,
                    vdisk: &vdisk.name,
                    servers: &servers,
                    login: &login,
                    cmdline: &vdisk.boot.cmdline,
                    has_initrd: vdisk.boot.initrd.is_some(),
                    boot: &token,
                    enroll: &enroll,
                }
                .render(),
            )
        }
        Err(why) => {
            tracing::info!(%mac, reason = %why.0, "boot script refused");
            Metrics::add(&stats.refusals, 1);
            ipxe_script(ipxe::refusal(&why.0, &why.1, &mac, &servers))
        }
    }
}

/// Why a device cannot boot, and what an administrator can do about it.
struct Refusal(String, String);

/// The script that sanboots `device`'s iSCSI target: a new boot (so its
/// Standard-mode cache of the last one goes), its names and CHAP secrets,
/// and the portals that can serve it, best first.
async fn sanboot(
    server: &Arc<Boot>,
    device: &Device,
    vdisk: &VDisk,
    mac: &str,
    peer: SocketAddr,
    servers: &[String],
) -> Response {
    let stats = &server.stats;
    let refuse = |why: String, hint: &str| {
        tracing::info!(device = %device.name, %mac, reason = %why, "boot script refused");
        Metrics::add(&stats.refusals, 1);
        ipxe_script(ipxe::refusal(&why, hint, mac, servers))
    };
    let order = server.sessions.iscsi_order(mac, Some(peer.ip()));
    if order.is_empty() {
        return refuse(
            format!(
                "no live server with an iSCSI portal can serve vDisk {} to device {} now",
                vdisk.name, device.name
            ),
            "start servers with --iscsi HOST, and check `vstream farm replication`",
        );
    }
    let secrets = match server
        .farm
        .iscsi_secrets(&device.name, crate::iscsi::fresh_secrets())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                format!(
                    "the farm state could not give device {}'s CHAP secrets: {e}",
                    device.name
                ),
                "",
            )
        }
    };
    let token = crate::sessions::new_boot_token();
    let boot = server
        .sessions
        .boot_of(&device.name, Some(&token), "ipxe")
        .await;
    let prefix = &server.config.iqn_prefix;
    let target = vstream_api::device_target(prefix, &device.name);
    let initiator = device.initiator(prefix);
    let portals: Vec<String> = order.into_iter().map(|(_, p)| p).collect();
    tracing::info!(device = %device.name, %mac, vdisk = %vdisk.name, method = "sanboot", portals = %portals.join(","), boot = boot.map_or(0, |b| b.seq), "boot script");
    Metrics::add(&stats.scripts, 1);
    ipxe_script(
        ipxe::SanbootScript {
            device: &device.name,
            mac,
            vdisk: &vdisk.name,
            initiator: &initiator,
            target: &target,
            chap_user: &device.name,
            chap_secret: &secrets.chap_secret,
            target_user: &target,
            target_secret: &secrets.target_secret,
            portals: &portals,
            servers,
        }
        .render(),
    )
}

/// The device with `mac` and its vDisk, from the farm state, or from the
/// last view of it while the farm state is unreachable. An unknown device is
/// registered first if `may_add` and auto-add is on: only the script adds,
/// never a file request.
async fn boot_target(
    server: &Arc<Boot>,
    mac: &str,
    may_add: bool,
) -> Result<(Device, VDisk), Refusal> {
    let view = server.membership.view();
    let live = server.membership.is_connected();
    let found = match live {
        true => server.farm.find_device(mac).await.ok().flatten(),
        false => None,
    };
    let device = match found.or_else(|| view.device_by_mac(mac).cloned()) {
        Some(d) => d,
        None => auto_add(server, mac, may_add).await?,
    };
    let fresh = match live {
        true => server.farm.get_vdisk(&device.vdisk).await.ok().flatten(),
        false => None,
    };
    let vdisk = fresh
        .or_else(|| view.vdisk(&device.vdisk).cloned())
        .ok_or_else(|| {
            Refusal(
                format!(
                    "device {} is assigned vDisk {}, which does not exist",
                    device.name, device.vdisk
                ),
                format!("vstream device set {} --vdisk VDISK", device.name),
            )
        })?;
    Ok((device, vdisk))
}

/// PVS's Auto-Add: an unknown MAC becomes device `auto-<MAC digits>` on the
/// configured vDisk, if `may_add`.
async fn auto_add(server: &Arc<Boot>, mac: &str, may_add: bool) -> Result<Device, Refusal> {
    let unknown = || {
        Refusal(
            format!("this device ({mac}) is not registered in the farm"),
            format!("register it: vstream device add NAME --mac {mac} --vdisk VDISK"),
        )
    };
    let Some(vdisk) = server.config.netboot.auto_add.as_ref().filter(|_| may_add) else {
        return Err(unknown());
    };
    let name = format!("auto-{}", mac.replace(':', ""));
    let device = Device::new(name.clone(), mac, vdisk.clone(), now_unix());
    match server.farm.create_device(device).await {
        Ok(d) => {
            tracing::info!(device = %d.name, %mac, vdisk = %d.vdisk, "auto-added a device");
            Ok(d)
        }
        // Two servers (or two requests) raced: the other one added it.
        Err(e) => match server.farm.find_device(mac).await {
            Ok(Some(d)) => Ok(d),
            _ => Err(Refusal(
                format!("auto-adding this device ({mac}) failed: {e}"),
                String::new(),
            )),
        },
    }
}

/// `GET /boot/MAC/kernel|initrd`: the device's own vDisk's boot file.
async fn file(
    State(server): State<Arc<Boot>>,
    UrlPath((mac, which)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let which: BootFileKind = which.parse().map_err(ApiError::not_found)?;
    let mac = vstream_api::parse_mac(&mac.replace('-', ":")).map_err(ApiError::bad_request)?;
    let (_, vdisk) = boot_target(&server, &mac, false)
        .await
        .map_err(|r| ApiError::not_found(r.0))?;
    let f = vdisk.boot.get(which).ok_or_else(|| {
        ApiError::not_found(format!("vDisk {} has no {which} to boot", vdisk.name))
    })?;
    let path = file_path(&server.store, &vdisk.name, &f.blake3);
    let sent = serve_file(&path, f.size).await.map_err(|e| {
        ApiError::not_found(format!(
            "this server does not hold the {which} of vDisk {} yet: {e}",
            vdisk.name
        ))
    })?;
    Metrics::add(&server.stats.file_bytes, f.size);
    Ok(sent)
}

/// `GET /peer/v1/vdisks/NAME/boot/HASH` (peers only): a boot file this
/// server holds.
async fn peer_file(
    State(server): State<Arc<Boot>>,
    UrlPath((vdisk, hash)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    vstream_farm::validate_name(&vdisk)?;
    if !valid_hash(&hash) {
        return Err(ApiError::bad_request(
            "a boot file is named by its blake3 hash",
        ));
    }
    let path = file_path(&server.store, &vdisk, &hash);
    let size = std::fs::metadata(&path)
        .map_err(|_| ApiError::not_found(format!("no boot file {hash} of vDisk {vdisk} here")))?
        .len();
    serve_file(&path, size)
        .await
        .map_err(|e| ApiError::internal(format!("reading boot file {hash}: {e}")))
}

/// Streams a file in 256 KiB pieces.
async fn serve_file(path: &Path, size: u64) -> std::io::Result<Response> {
    let mut f = std::fs::File::open(path)?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .body(Body::from_stream(stream))
        .map_err(std::io::Error::other)
}
