//! Farm membership: each server's last published status.
//!
//! * `members/NAME` → [`ServerStatus`], a plain key: the server as last seen,
//!   kept after it goes down so that `server list` can show it down.
//! * `live/NAME` → [`ServerStatus`], an ephemeral key (etcd: under the
//!   server's lease): present while the server is up.

use std::time::Duration;

use vstream_model::{RebalanceRequest, ServerStatus};

use crate::{checked_name, decode, encode, FarmError, FarmStore, Op, RecordKind};

const MEMBERS: &str = "members/";
pub(crate) const LIVE: &str = "live/";
const REBALANCE: &str = "rebalance";

impl FarmStore {
    /// Publishes `status` as live for about `ttl`, and records the member.
    pub async fn publish_server(
        &self,
        status: &ServerStatus,
        ttl: Duration,
    ) -> Result<(), FarmError> {
        checked_name(RecordKind::Server, &status.name)?;
        let live = format!("{LIVE}{}", status.name);
        let member = format!("{MEMBERS}{}", status.name);
        self.backend
            .put_ephemeral(&live, encode(&live, status)?, ttl)
            .await?;
        self.backend
            .txn(vec![], vec![Op::put(&member, encode(&member, status)?)])
            .await?;
        Ok(())
    }

    /// Removes a server's live record (a graceful stop).
    pub async fn withdraw_server(&self, name: &str) -> Result<(), FarmError> {
        checked_name(RecordKind::Server, name)?;
        self.backend
            .txn(vec![], vec![Op::delete(format!("{LIVE}{name}"))])
            .await?;
        Ok(())
    }

    /// The servers that are up, by name.
    pub async fn live_servers(&self) -> Result<Vec<ServerStatus>, FarmError> {
        self.list_records(LIVE).await
    }

    /// Every server ever published, by name, as last seen.
    pub async fn members(&self) -> Result<Vec<ServerStatus>, FarmError> {
        self.list_records(MEMBERS).await
    }

    /// Records a rebalance request for every server to act on once.
    pub async fn request_rebalance(&self, req: &RebalanceRequest) -> Result<(), FarmError> {
        self.backend
            .txn(vec![], vec![Op::put(REBALANCE, encode(REBALANCE, req)?)])
            .await?;
        Ok(())
    }

    /// The newest rebalance request, if any.
    pub async fn rebalance_request(&self) -> Result<Option<RebalanceRequest>, FarmError> {
        match self.backend.get(REBALANCE).await? {
            Some(v) => Ok(Some(decode(REBALANCE, &v.value)?)),
            None => Ok(None),
        }
    }
}
