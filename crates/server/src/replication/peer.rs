//! The peer client: how a server asks its peers for layers, boot files and
//! boot sets (the routes that answer are `routes.rs`).

use std::io::Read;
use std::time::Duration;

use vstream_client::{Agent, Client};

use vstream_api::ServerStatus;

use super::state::Replication;
use crate::membership::View;

/// Most peers one layer is pulled from at once.
pub const MAX_PEERS: usize = 4;
pub const SERVER_HEADER: &str = vstream_client::SERVER_HEADER;
/// Most chunks one data request may cover (1 GiB of logical disk; the
/// answer holds only what the layer has there, streamed).
pub const MAX_REQUEST_CHUNKS: u64 = 64 * vstream_image::replica::SEGMENT_CHUNKS;

/// Tells every other live server that the catalog changed (best effort:
/// they look at it within a second anyway).
pub fn poke_peers(replication: &Replication, me: &str, view: &View) {
    let Some(secret) = replication.secret() else {
        return;
    };
    let me = me.to_owned();
    let tls = replication.peer_tls().cloned();
    let peers: Vec<Peer> = view
        .servers
        .iter()
        .filter(|s| s.name != me)
        .map(|s| Peer::of(s, tls.is_some()))
        .collect();
    if peers.is_empty() {
        return;
    }
    std::thread::spawn(move || {
        let mut agent = Agent::builder().timeout(Duration::from_secs(2));
        if let Some(tls) = &tls {
            agent = agent.tls_config(tls.config());
        }
        let agent = agent.build();
        for p in peers {
            let _ = PeerClient::new(&agent, &p, &secret, &me).and_then(|c| c.poke());
        }
    });
}

/// A peer to pull from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// Its API URL.
    pub api: String,
}

impl Peer {
    /// The server of `status`, reached over HTTPS when `tls` (this server
    /// has certificates) and it serves HTTPS.
    pub fn of(status: &ServerStatus, tls: bool) -> Peer {
        let api = match (&status.api_tls, tls) {
            (Some(https), true) => https.clone(),
            _ => status.api.clone(),
        };
        Peer {
            name: status.name.clone(),
            api,
        }
    }
}

/// The HTTP client for peers: a short connect timeout, and a whole-request
/// deadline that takes a silent peer as failed (a request moves at most
/// 64 MiB, in well under that on any LAN).
/// Over mutual TLS on a farm with TLS.
pub fn agent(replication: &Replication) -> Agent {
    let mut builder = Agent::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .max_idle_per_host(2 * MAX_PEERS);
    if let Some(tls) = replication.peer_tls() {
        builder = builder.tls_config(tls.config());
    }
    builder.build()
}

/// The largest answer read into memory (a layer's metadata is ~33 KiB per GiB).
const MAX_IN_MEMORY: u64 = 256 << 20;

/// One peer's `/peer/v1`, asked as server `me` with the farm's secret. Every
/// failure comes back as a sentence naming the peer.
pub struct PeerClient<'a> {
    client: Client,
    peer: &'a Peer,
}

impl<'a> PeerClient<'a> {
    pub fn new(
        agent: &Agent,
        peer: &'a Peer,
        secret: &str,
        me: &str,
    ) -> Result<PeerClient<'a>, String> {
        let client = agent
            .client(&peer.api)
            .map_err(|e| describe(peer, e))?
            .with_token(secret)
            .as_server(me);
        Ok(PeerClient { client, peer })
    }

    /// A layer's metadata.
    pub fn meta(&self, vdisk: &str, file: &str) -> Result<Vec<u8>, String> {
        self.client
            .layer_meta(vdisk, file, MAX_IN_MEMORY)
            .map_err(|e| describe(self.peer, e))
    }

    /// A layer's data `[from, to)`, handed to `read` as it arrives.
    pub fn data<T>(
        &self,
        vdisk: &str,
        file: &str,
        (from, to): (u64, u64),
        read: impl FnOnce(&mut dyn Read) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut body = self
            .client
            .layer_data(vdisk, file, from, to)
            .map_err(|e| describe(self.peer, e))?;
        read(&mut body).map_err(|e| format!("server {}: {e}", self.peer.name))
    }

    /// A layer's data `[from, to)` in memory (a repaired block).
    pub fn data_vec(&self, vdisk: &str, file: &str, range: (u64, u64)) -> Result<Vec<u8>, String> {
        self.client
            .layer_data_vec(vdisk, file, range, MAX_IN_MEMORY)
            .map_err(|e| describe(self.peer, e))
    }

    /// The peer's boot set of `vdisk`'s version `version`, in its file's
    /// form, read up to `limit` bytes.
    pub fn boot_set(&self, vdisk: &str, version: u32, limit: u64) -> Result<Vec<u8>, String> {
        self.client
            .boot_set(vdisk, version, limit)
            .map_err(|e| describe(self.peer, e))
    }

    /// "The catalog changed": the peer reconciles now.
    pub fn poke(&self) -> Result<(), String> {
        self.client.poke().map_err(|e| describe(self.peer, e))
    }
}

/// A failed peer request, as replication has always reported it.
fn describe(peer: &Peer, e: vstream_client::Error) -> String {
    match e {
        vstream_client::Error::Status { status, body, .. } => {
            format!("server {} answered {status}: {}", peer.name, body.trim())
        }
        vstream_client::Error::ReadAnswer { source, .. } => {
            format!("server {}: reading the answer: {source}", peer.name)
        }
        other => format!("server {}: {}", peer.name, other.http_text()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Peer {
        Peer {
            name: "s2".into(),
            api: "http://10.0.0.2:7080".into(),
        }
    }

    #[test]
    fn failures_name_the_peer_as_before() {
        let refused = vstream_client::Error::Status {
            url: "http://10.0.0.2:7080/peer/v1/poke".into(),
            status: 403,
            status_text: "Forbidden".into(),
            error: Some("not a server of this farm: wrong peer secret".into()),
            body: "{\"error\":\"not a server of this farm: wrong peer secret\"}\n".into(),
        };
        assert_eq!(
            describe(&peer(), refused),
            "server s2 answered 403: {\"error\":\"not a server of this farm: wrong peer secret\"}"
        );
        let broken = vstream_client::Error::ReadAnswer {
            url: "http://10.0.0.2:7080/peer/v1/x".into(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out reading response"),
        };
        assert_eq!(
            describe(&peer(), broken),
            "server s2: reading the answer: timed out reading response"
        );
        let bad = Peer {
            name: "s3".into(),
            api: "10.0.0.3:7080".into(),
        };
        let err = PeerClient::new(
            &agent(&Replication::new(&Default::default())),
            &bad,
            "secret",
            "s1",
        )
        .err()
        .unwrap();
        assert_eq!(
            err,
            "server s3: \"10.0.0.3:7080\" is not an http:// or https:// URL"
        );
    }

    #[test]
    fn a_dead_peer_is_named_with_the_url_asked() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dead = Peer {
            name: "s4".into(),
            api: format!("http://127.0.0.1:{port}/"),
        };
        let err = PeerClient::new(
            &agent(&Replication::new(&Default::default())),
            &dead,
            "secret",
            "s1",
        )
        .unwrap()
        .meta("w", "0001.layer")
        .unwrap_err();
        assert!(
            err.starts_with(&format!(
                "server s4: http://127.0.0.1:{port}/peer/v1/vdisks/w/layers/0001.layer/meta: Connection Failed"
            )),
            "{err}"
        );
    }
}
