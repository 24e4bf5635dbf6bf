//! The provisioning server: the NBD stream service and the HTTP API over one
//! local store and the farm state.

pub mod access;
pub mod admin_tokens;
pub mod api;
pub mod auth;
pub mod boot;
pub mod bootsets;
pub mod cidr;
pub mod clock;
pub mod config;
pub mod console;
pub mod enroll;
pub mod error;
pub mod events;
pub mod farm;
pub mod http;
pub mod identity;
pub mod io;
pub mod iscsi;
pub mod login;
pub mod login_guard;
pub mod membership;
pub mod moves;
pub mod nbd;
pub mod quarantine;
pub mod rebalance;
pub mod replication;
pub mod schedule;
pub mod sessions;
pub mod state;
pub mod stores;

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

pub use config::Config;
pub use state::Server;
pub use vstream_service::{limits, metrics, tcp, wait_for_signal};

pub use config::ETCD_PREFIX;

/// Runs a server until SIGTERM or SIGINT, then drains and flushes.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: draining connections");
        let _ = tx.send(true);
    });
    run_until(config, rx).await
}

/// Runs a server until `shutdown` turns true.
pub async fn run_until(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let (open_files, found) = limits::raise_open_files();
    let budget = limits::budget(
        open_files,
        config.max_connections,
        config.max_connections_per_peer,
    );
    tracing::info!(
        open_files,
        raised_from = found,
        nbd_connections = budget.nbd,
        per_peer = config.max_connections_per_peer,
        api_connections = budget.api,
        api_per_peer = budget.api_per_peer,
        "connection limits"
    );
    if budget.nbd < config.max_connections {
        tracing::warn!(
            "max_connections {} does not fit in the open-file limit of {open_files} \
             (raise LimitNOFILE): serving at most {} NBD connections",
            config.max_connections,
            budget.nbd
        );
    }
    std::fs::create_dir_all(&config.data)
        .with_context(|| format!("creating data folder {}", config.data.display()))?;
    let tokens = Arc::new(
        admin_tokens::AdminTokens::open(&config.data).context("reading the admin tokens")?,
    );
    let store = vstream_image::Store::open(&config.data).context("opening the vDisk store")?;
    let farm = match &config.farm {
        config::FarmConfig::Embedded => {
            vstream_farm::FarmStore::embedded(config.data.join("farm.redb"))
                .context("opening the farm database")?
        }
        config::FarmConfig::Etcd(endpoints) => {
            vstream_farm::FarmStore::etcd(endpoints, ETCD_PREFIX)
                .await
                .context("joining the farm in etcd")?
        }
    };
    let where_ = identity::describe(&config.farm, &config.data);
    identity::check(&config.data, &farm, &where_, config.adopt_data).await?;
    let boot_services = boot::Services::bind(&config).await?;
    let tls = vstream_service::Tls::load(
        config.tls,
        config.tls_certificates.as_deref(),
        config.tls_verify_peer,
    )
    .context("loading the NBD TLS certificates")?;
    if config.tls != vstream_service::TlsMode::Off {
        tracing::info!(mode = %config.tls, verify_peer = config.tls_verify_peer, "NBD over TLS");
    }
    let api_tls = tls.api_credentials().cloned();
    let enrollment = enroll::Enrollment::load(config.tls_certificates.as_deref())
        .context("loading the device enrollment CA")?;
    if enrollment.enabled() && config.api_tls.is_none() {
        tracing::warn!(
            "an enrollment CA but no --api-tls: devices enroll over HTTPS only, so boot \
             scripts hand out no enrollment tokens"
        );
    }
    let server = Server::new(config.clone(), store, farm, tls, enrollment);
    if let Some(dir) = config.tls_certificates.as_deref() {
        // Peers over mutual TLS: this server's certificate is its proof.
        let peer_tls = vstream_service::ClientTls::load_server(dir)
            .context("loading the server's certificate for its peers")?;
        server.replication.set_peer_tls(peer_tls);
    }
    server.stores.hold_remembered();

    let api = nbd::listen_tcp(config.api)
        .with_context(|| format!("binding the API to {}", config.api))?;
    tracing::info!(addr = %config.api, "API listening");
    let nbd_limits = nbd::Limits::new(budget.nbd, config.max_connections_per_peer);
    let api_limits = nbd::Limits::new(budget.api, budget.api_per_peer);
    let mut tasks = tokio::task::JoinSet::new();
    for addr in &config.nbd {
        let listener = nbd::Listener::bind(addr)
            .await
            .with_context(|| format!("binding NBD to {addr}"))?;
        tracing::info!(addr = %listener.local_addr(), "NBD listening");
        tasks.spawn(nbd::serve(
            listener,
            server.sessions.clone() as Arc<dyn nbd::Exports>,
            nbd_limits.clone(),
            shutdown.clone(),
        ));
    }
    for addr in &config.iscsi {
        let listener = nbd::Listener::bind(&nbd::Listen::Tcp(*addr))
            .await
            .with_context(|| format!("binding iSCSI to {addr}"))?;
        tracing::info!(addr = %listener.local_addr(), prefix = %config.iqn_prefix, "iSCSI listening");
        tasks.spawn(vstream_service::iscsi::serve(
            listener,
            server.iscsi.clone() as Arc<dyn vstream_service::iscsi::Targets>,
            nbd_limits.clone(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(farm::run(server.member.clone(), shutdown.clone()));
    if !config.audit {
        tracing::warn!(
            "the audit trail is off (--audit off): no change or refusal made through this \
             server's API is recorded; use it only to measure what the trail costs"
        );
    }
    tasks.spawn(access::prune(
        server.farm.clone(),
        config.audit_retention_days,
        shutdown.clone(),
    ));
    tasks.spawn(replication::run(
        server.replicator.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(bootsets::run(
        server.sessions.boot_sets.clone(),
        Arc::new(bootsets::Peers {
            replication: server.replication.clone(),
            membership: server.membership.clone(),
            me: config.name.clone(),
            in_farm: matches!(config.farm, config::FarmConfig::Etcd(_)),
        }),
        shutdown.clone(),
    ));
    tasks.spawn(boot::run(
        server.boot.clone(),
        boot_services,
        shutdown.clone(),
    ));
    if let Some(addr) = config.metrics {
        let listener =
            nbd::listen_tcp(addr).with_context(|| format!("binding /metrics to {addr}"))?;
        tracing::info!(%addr, "metrics listening, without a token");
        tasks.spawn(http::serve(
            listener,
            api::metrics_router(server.clone()),
            nbd::Limits::new(16, 4),
            http::Timeouts {
                header: std::time::Duration::from_secs(config.api_header_timeout_secs),
                idle: std::time::Duration::from_secs(config.api_idle_timeout_secs),
            },
            None,
            shutdown.clone(),
        ));
    }
    let router = api::router(server.clone(), tokens);
    let timeouts = http::Timeouts {
        header: std::time::Duration::from_secs(config.api_header_timeout_secs),
        idle: std::time::Duration::from_secs(config.api_idle_timeout_secs),
    };
    if let (Some(addr), Some(acceptor)) = (config.api_tls, api_tls) {
        let listener =
            nbd::listen_tcp(addr).with_context(|| format!("binding the HTTPS API to {addr}"))?;
        tracing::info!(%addr, "API listening over HTTPS");
        tasks.spawn(http::serve(
            listener,
            router.clone(),
            api_limits.clone(),
            timeouts,
            Some(acceptor),
            shutdown.clone(),
        ));
    }
    tasks.spawn(http::serve(
        api,
        router,
        api_limits,
        timeouts,
        None,
        shutdown.clone(),
    ));
    while tasks.join_next().await.is_some() {}
    server.sessions.flush_all();
    tracing::info!("stopped");
    Ok(())
}
