//! What replication works with: this server's store and farm state, its own
//! state, and the subsystems it asks (which devices use a version, which
//! vDisks are quarantined, which stores are held).

use std::sync::Arc;

use vstream_farm::FarmStore;
use vstream_image::Store;

use super::state::Replication;
use crate::config::Config;
use crate::membership::Membership;
use crate::quarantine::Quarantine;
use crate::sessions::Sessions;
use crate::stores::Stores;

/// The handles replication's loops and routes take.
pub struct Handles {
    pub config: Arc<Config>,
    pub store: Store,
    pub farm: FarmStore,
    pub replication: Arc<Replication>,
    pub membership: Arc<Membership>,
    pub sessions: Arc<Sessions>,
    pub quarantine: Arc<Quarantine>,
    pub stores: Arc<Stores>,
}
