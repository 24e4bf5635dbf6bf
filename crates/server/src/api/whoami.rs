//! Who the caller is: the web console asks it once after login, to show
//! the token's name and to offer only what its role may do.

use std::sync::Arc;

use axum::extract::State;
use axum::{Extension, Json};
use vstream_api::{ErrorBody, Whoami};

use crate::access::Caller;
use crate::config::Config;

/// The calling token's name and role, and the server that answered.
#[utoipa::path(get, path = "/api/v1/whoami",
    responses((status = 200, body = Whoami), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn whoami(
    State(config): State<Arc<Config>>,
    Extension(caller): Extension<Caller>,
) -> Json<Whoami> {
    Json(Whoami {
        name: caller.name,
        role: caller.role,
        server: config.name.clone(),
    })
}
