//! The API's `Json`, `Path` and `Query`: axum's extractors, with every
//! rejection answered as the API's JSON error body (`{"error": "..."}`)
//! instead of axum's plain text, keeping axum's status (400 for a body that
//! is not JSON or a path or query that does not parse, 415 for a body
//! without `Content-Type: application/json`, 422 for JSON of the wrong
//! shape, 413 for a body over the limit). The OpenAPI document lists those
//! answers once for every route, in [`super::doc`].
//!
//! The handlers import these in place of axum's, so no route can answer a
//! rejection in another form. `Json` is also the response type: it
//! serializes as axum's does.

use axum::async_trait;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;

/// A JSON request or response body.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

/// Path parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

/// Query parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

#[async_trait]
impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Every request body is an object: serde would take a struct from
        // an array of its fields in order, which the document forbids.
        let value = match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => v,
            Err(e) => return Err(json_rejection(e)),
        };
        if !value.is_object() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the request body is not what this route takes: a JSON object is expected",
            ));
        }
        serde_json::from_value(value).map(Json).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the request body is not what this route takes: {e}"),
            )
        })
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

#[async_trait]
impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(path_rejection(e)),
        }
    }
}

#[async_trait]
impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(query_rejection(e)),
        }
    }
}

fn json_rejection(e: JsonRejection) -> ApiError {
    let message = match &e {
        JsonRejection::MissingJsonContentType(_) => {
            "the request body must be JSON, sent with Content-Type: application/json".to_owned()
        }
        JsonRejection::JsonSyntaxError(_) => {
            format!("the request body is not valid JSON: {}", e.body_text())
        }
        JsonRejection::JsonDataError(_) => {
            format!(
                "the request body is not what this route takes: {}",
                e.body_text()
            )
        }
        _ => e.body_text(),
    };
    ApiError::new(e.status(), message)
}

fn path_rejection(e: PathRejection) -> ApiError {
    ApiError::new(
        e.status(),
        format!("the path does not parse: {}", e.body_text()),
    )
}

fn query_rejection(e: QueryRejection) -> ApiError {
    ApiError::new(
        e.status(),
        format!("the query string does not parse: {}", e.body_text()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::Router;
    use tower_service::Service;

    #[derive(serde::Deserialize)]
    struct Body1 {
        #[allow(dead_code)]
        n: u32,
    }

    async fn call(req: axum::http::Request<Body>) -> (StatusCode, String, serde_json::Value) {
        let mut app = Router::new().route(
            "/x/:n",
            post(
                |Path(_n): Path<u32>,
                 Query(_q): Query<std::collections::HashMap<String, u32>>,
                 Json(_b): Json<Body1>| async { StatusCode::NO_CONTENT },
            ),
        );
        // A Router is always ready.
        let resp = app.call(req).await.unwrap();
        let status = resp.status();
        let ct = resp
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, ct, body)
    }

    fn req(uri: &str, ct: Option<&str>, body: &str) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::post(uri);
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        b.body(Body::from(body.to_owned())).unwrap()
    }

    #[tokio::test]
    async fn rejections_are_json_error_bodies() {
        let json = Some("application/json");
        for (r, want) in [
            (req("/x/1", json, "{not json"), StatusCode::BAD_REQUEST),
            (
                req("/x/1", json, r#"{"n":"a"}"#),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                req("/x/1", Some("text/plain"), r#"{"n":1}"#),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                req("/x/1", None, r#"{"n":1}"#),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            // The fields in order, as an array: serde alone would take it.
            (req("/x/1", json, "[1]"), StatusCode::UNPROCESSABLE_ENTITY),
            (req("/x/1", json, "1"), StatusCode::UNPROCESSABLE_ENTITY),
            (req("/x/nope", json, r#"{"n":1}"#), StatusCode::BAD_REQUEST),
            (req("/x/1?a=b", json, r#"{"n":1}"#), StatusCode::BAD_REQUEST),
        ] {
            let (status, ct, body) = call(r).await;
            assert_eq!(status, want, "{body}");
            assert_eq!(ct, "application/json");
            let sentence = body["error"].as_str().unwrap_or_default();
            assert!(!sentence.is_empty(), "no error sentence: {body}");
        }
        let (status, _, _) = call(req("/x/1?a=2", json, r#"{"n":1}"#)).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
}
