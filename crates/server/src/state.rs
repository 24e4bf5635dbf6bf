//! The server composed of its subsystems. Each subsystem owns its state and
//! is built here with the handles it takes, bottom up:
//!
//! ```text
//!   config, store, farm, metrics                  the base handles
//!   membership (view, verified versions)          store
//!   quarantine, replication state                 -
//!   stores (named stores held here)               config, store, farm
//!   sessions (exports, device sessions, locks)    config, store, farm, metrics, membership,
//!                                                 quarantine, replication state
//!   replication (reconcile, transfer, scrub)      all of the above
//!   farm (the publish loop)                       all of the above
//!   boot (script, files, sync, TFTP, ProxyDHCP)   config, store, farm, membership, sessions,
//!                                                 replication state
//!   iscsi (devices as iSCSI targets)              config, farm, sessions
//! ```
//!
//! The admin API is the one part that sees the whole: its router's state is
//! [`Server`], and each handler takes only the handles it uses (`State<T>`
//! for each `T` below, through [`FromRef`]).

use std::sync::Arc;

use axum::extract::FromRef;
use vstream_farm::FarmStore;
use vstream_image::Store;

use crate::boot::Boot;
use crate::config::Config;
use crate::membership::Membership;
use crate::quarantine::Quarantine;
use crate::replication::Replication;
use crate::sessions::Sessions;
use crate::stores::Stores;
use vstream_service::metrics::Metrics;

/// One server: its subsystems, each a handle.
#[derive(Clone)]
pub struct Server {
    pub config: Arc<Config>,
    pub store: Store,
    pub farm: FarmStore,
    pub metrics: Arc<Metrics>,
    pub membership: Arc<Membership>,
    pub quarantine: Arc<Quarantine>,
    pub stores: Arc<Stores>,
    pub sessions: Arc<Sessions>,
    pub replication: Arc<Replication>,
    /// Replication's loops, peer routes and version operations.
    pub replicator: Arc<crate::replication::Handles>,
    /// The publish loop.
    pub member: Arc<crate::farm::Handles>,
    pub boot: Arc<Boot>,
    /// The enrollment CA: device certificates for tokens and admins.
    pub enrollment: Arc<crate::enroll::Enrollment>,
    /// Failed device logins, per address and per MAC.
    pub login_guard: Arc<crate::login_guard::LoginGuard>,
    /// The iSCSI front door's view of the farm: devices as targets.
    pub iscsi: Arc<crate::iscsi::IscsiTargets>,
}

impl Server {
    /// The server of `config`, serving NBD with `tls`.
    pub fn new(
        config: Config,
        store: Store,
        farm: FarmStore,
        tls: vstream_service::Tls,
        enrollment: crate::enroll::Enrollment,
    ) -> Server {
        let enrollment = Arc::new(enrollment);
        let login_guard = Arc::new(crate::login_guard::LoginGuard::new(config.login_failures));
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let membership = Arc::new(Membership::new(store.clone()));
        let quarantine = Arc::new(Quarantine::default());
        let replication = Arc::new(Replication::new(&config.replication));
        let stores = Arc::new(Stores::new(config.clone(), store.clone(), farm.clone()));
        let sessions = Arc::new(
            Sessions::new(
                config.clone(),
                store.clone(),
                farm.clone(),
                metrics.clone(),
                membership.clone(),
                quarantine.clone(),
                replication.clone(),
            )
            .with_tls(tls),
        );
        let replicator = Arc::new(crate::replication::Handles {
            config: config.clone(),
            store: store.clone(),
            farm: farm.clone(),
            replication: replication.clone(),
            membership: membership.clone(),
            sessions: sessions.clone(),
            quarantine: quarantine.clone(),
            stores: stores.clone(),
        });
        let member = Arc::new(crate::farm::Handles {
            config: config.clone(),
            store: store.clone(),
            farm: farm.clone(),
            metrics: metrics.clone(),
            membership: membership.clone(),
            sessions: sessions.clone(),
            replication: replication.clone(),
            quarantine: quarantine.clone(),
            stores: stores.clone(),
        });
        let boot = Arc::new(Boot {
            config: config.clone(),
            store: store.clone(),
            farm: farm.clone(),
            membership: membership.clone(),
            sessions: sessions.clone(),
            replication: replication.clone(),
            enrollment: enrollment.clone(),
            stats: Default::default(),
        });
        let iscsi = Arc::new(crate::iscsi::IscsiTargets::new(
            config.clone(),
            farm.clone(),
            sessions.clone(),
        ));
        Server {
            iscsi,
            config,
            store,
            farm,
            metrics,
            membership,
            quarantine,
            stores,
            sessions,
            replication,
            replicator,
            member,
            boot,
            enrollment,
            login_guard,
        }
    }
}

/// Lets a handler take one of the server's handles as `State<T>`.
macro_rules! handles {
    ($($field:ident: $ty:ty,)*) => {
        $(impl FromRef<Server> for $ty {
            fn from_ref(server: &Server) -> $ty {
                server.$field.clone()
            }
        })*
    };
}

handles! {
    config: Arc<Config>,
    enrollment: Arc<crate::enroll::Enrollment>,
    login_guard: Arc<crate::login_guard::LoginGuard>,
    iscsi: Arc<crate::iscsi::IscsiTargets>,
    store: Store,
    farm: FarmStore,
    metrics: Arc<Metrics>,
    membership: Arc<Membership>,
    quarantine: Arc<Quarantine>,
    stores: Arc<Stores>,
    sessions: Arc<Sessions>,
    replication: Arc<Replication>,
    replicator: Arc<crate::replication::Handles>,
    member: Arc<crate::farm::Handles>,
    boot: Arc<Boot>,
}
