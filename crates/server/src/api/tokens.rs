//! The farm's API tokens and the audit trail.

use std::sync::Arc;

use super::extract::Json;
use super::extract::{Path, Query};
use axum::http::StatusCode;
use axum::Extension;
use serde::Deserialize;
use vstream_api::{ApiToken, AuditEntry, CreateToken, ErrorBody, NewToken, TokenInfo};

use crate::access::{Access, Caller};
use crate::clock::now_unix;
use crate::error::ApiError;
use axum::extract::State;
use vstream_farm::FarmStore;

fn info(t: &ApiToken) -> TokenInfo {
    TokenInfo {
        name: t.name.clone(),
        role: t.role,
        created_unix: t.created_unix,
        expires_unix: t.expires_unix,
        created_by: t.created_by.clone(),
    }
}

/// A token for every server of the farm, with a role; shown once.
#[utoipa::path(post, path = "/api/v1/tokens", request_body = CreateToken,
    responses((status = 201, body = NewToken), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn create_token(
    State(farm): State<FarmStore>,
    Extension(access): Extension<Arc<Access>>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<CreateToken>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    vstream_farm::validate_name(&req.name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let now = now_unix();
    let expires_unix = match req.expires_secs {
        Some(0) => return Err(ApiError::bad_request("a token must last at least a second")),
        Some(s) => Some(now.saturating_add(s)),
        None => None,
    };
    let token = vstream_pki::new_token();
    let record = ApiToken {
        name: req.name,
        sha256: vstream_pki::token_digest(&token),
        role: req.role,
        created_unix: now,
        expires_unix,
        created_by: caller.name,
    };
    farm.create_token(&record).await?;
    access.tokens_changed();
    tracing::info!(token = %record.name, role = %record.role, by = %record.created_by, "API token created");
    Ok((
        StatusCode::CREATED,
        Json(NewToken {
            info: info(&record),
            token,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/tokens", responses((status = 200, body = [TokenInfo])))]
pub(super) async fn list_tokens(
    State(farm): State<FarmStore>,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(farm.list_tokens().await?.iter().map(info).collect()))
}

/// Revokes a token: every server refuses it within a second.
#[utoipa::path(delete, path = "/api/v1/tokens/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke_token(
    State(farm): State<FarmStore>,
    Extension(access): Extension<Arc<Access>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let t = farm.revoke_token(&name).await?;
    access.tokens_changed();
    tracing::info!(token = %t.name, role = %t.role, "API token revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub(super) struct AuditQuery {
    /// Entries from this second on (Unix time).
    since: Option<u64>,
    /// Entries about this object only (`device/pc1`, `vdisk/win10`), or
    /// its prefix (`device/`).
    object: Option<String>,
    /// The newest this many entries [default: 1000].
    limit: Option<usize>,
}

/// The audit trail, oldest first: the same from every server.
#[utoipa::path(get, path = "/api/v1/audit", params(AuditQuery),
    responses((status = 200, body = [AuditEntry])))]
pub(super) async fn audit(
    State(farm): State<FarmStore>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let since_ms = q.since.unwrap_or(0).saturating_mul(1000);
    let mut all: Vec<AuditEntry> = farm
        .audit()
        .await?
        .into_iter()
        .filter(|e| e.at_ms >= since_ms)
        .filter(|e| q.object.as_deref().is_none_or(|o| e.object.starts_with(o)))
        .collect();
    let limit = q.limit.unwrap_or(1000);
    if all.len() > limit {
        all.drain(..all.len() - limit);
    }
    Ok(Json(all))
}
