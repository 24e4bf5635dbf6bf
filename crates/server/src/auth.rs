//! The farm's peer secret on `/peer/v1` (the admin routes' tokens and
//! roles are `access`'s).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::replication::peer::SERVER_HEADER;
use crate::replication::state::Replication;

pub use vstream_pki::constant_time_eq;

/// Why a request is not from a server of this farm with TLS, if it is not:
/// it came over HTTPS with a server certificate the farm's CA signed (the
/// TLS handshake checked the signature).
fn peer_certified(req: &Request) -> Result<(), String> {
    let ext = req.extensions();
    if ext.get::<crate::http::Https>().is_none() {
        return Err(
            "this farm's servers talk to each other over HTTPS with their \
                    certificates (the peer's --api-tls address)"
                .into(),
        );
    }
    match ext.get::<crate::http::PeerCertificate>() {
        None => Err("a peer request over HTTPS needs the server's certificate".into()),
        Some(c) if !c.0.server => Err(format!(
            "the certificate of {:?} is not a server's (no serverAuth usage)",
            c.0.name.as_deref().unwrap_or_default()
        )),
        Some(_) => Ok(()),
    }
}

/// Lets through only a request bearing the farm's peer secret.
pub async fn require_peer(
    State(replication): State<Arc<Replication>>,
    req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let who = req
        .headers()
        .get(SERVER_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    // A farm with TLS: a peer proves itself with a server certificate of
    // the farm's CA first, over HTTPS; a stolen peer secret alone pulls
    // nothing.
    if replication.peer_tls().is_some() {
        if let Err(why) = peer_certified(&req) {
            tracing::warn!(peer = %who, reason = %why, "a peer request was refused");
            return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
        }
    }
    let Some(secret) = replication.secret() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server has not read the farm's peer secret yet",
        )
        .into_response();
    };
    match given {
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "peer requests need the farm's peer secret (Authorization: Bearer ...)",
        )
        .into_response(),
        Some(g) if !constant_time_eq(g.as_bytes(), secret.as_bytes()) => {
            tracing::warn!(peer = %who, "a peer request with a wrong secret was refused");
            ApiError::new(
                StatusCode::FORBIDDEN,
                "not a server of this farm: wrong peer secret",
            )
            .into_response()
        }
        Some(_) => next.run(req).await,
    }
}
