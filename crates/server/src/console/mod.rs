//! The web console: three static files embedded in the binary and served at
//! `/` of every server's API address. The page is a client of `/api/v1`
//! like the CLI: it holds a token in the tab's `sessionStorage`, sends it as
//! `Authorization: Bearer`, and every action it offers is an API call, so the
//! role checks and the audit trail of [`crate::access`] apply to it as to
//! any other caller. No cookie is ever set, so there is nothing to forge
//! across sites.
//!
//! ```text
//!   GET /                    index.html   the shell: header, navigation, <main>
//!   GET /console/app.js      the console  hash routes, 1 s polling, DOM building
//!   GET /console/app.css     its styles
//! ```
//!
//! Every answer carries a Content-Security-Policy that allows scripts,
//! styles and fetches from this origin only, and no inline script at all:
//! a vDisk named `<img src=x onerror=...>` that slipped past the page's own
//! escaping (it builds every node with `textContent`, never `innerHTML`)
//! would still run nothing.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The policy of every console answer: this origin only, no inline script
/// or style, no framing (clickjacking), no plugins, no form posts.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// The console's routes, for any router state.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

/// `body` as `content_type`, with the console's security headers. The
/// files change only with the binary; `no-cache` makes a browser check
/// again after an upgrade.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The largest JSON answer given an ETag (the device list of a big farm
/// is a few MiB); larger ones pass as they are.
const MAX_TAGGED: usize = 64 * 1024 * 1024;

/// Conditional GETs for the console's polling: a JSON answer of the API
/// gets an `ETag` (the BLAKE3 of its body), and a request whose
/// `If-None-Match` names it gets `304 Not Modified` with no body. The
/// handler still runs (the answer is computed to be compared), so this
/// saves the transfer and the page's parsing, not the server's work.
/// Layered inside the access guard: a 304 goes only to a caller allowed the
/// route.
pub async fn etag(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if req.method() != axum::http::Method::GET {
        return next.run(req).await;
    }
    let asked = req.headers().get(header::IF_NONE_MATCH).cloned();
    let resp = next.run(req).await;
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if resp.status() != axum::http::StatusCode::OK || !json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_TAGGED).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "an API answer too big to tag or cut short");
            parts.status = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
            return Response::from_parts(parts, axum::body::Body::empty());
        }
    };
    let tag = format!("\"{}\"", &blake3::hash(&bytes).to_hex()[..32]);
    let Ok(value) = HeaderValue::from_str(&tag) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    let same = asked
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().trim_start_matches("W/") == tag || t.trim() == "*")
        });
    parts.headers.insert(header::ETAG, value);
    if same {
        parts.status = axum::http::StatusCode::NOT_MODIFIED;
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::CONTENT_TYPE);
        return Response::from_parts(parts, axum::body::Body::empty());
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fetch(app: &Router, if_none_match: Option<&str>) -> (u16, Option<String>, Vec<u8>) {
        use tower_service::Service;
        let mut req = axum::http::Request::get("/list");
        if let Some(t) = if_none_match {
            req = req.header(header::IF_NONE_MATCH, t);
        }
        let req = req.body(axum::body::Body::empty()).expect("request");
        let resp = app.clone().call(req).await.expect("infallible");
        let status = resp.status().as_u16();
        let tag = resp
            .headers()
            .get(header::ETAG)
            .map(|v| v.to_str().expect("ASCII").to_owned());
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, tag, body.to_vec())
    }

    /// A poll that names the last answer's tag gets 304 and no body while
    /// the answer stays the same, and the new answer once it changes.
    #[tokio::test]
    async fn an_unchanged_answer_is_not_sent_again() {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1));
        let m = n.clone();
        let app: Router = Router::new()
            .route(
                "/list",
                get(move || {
                    let m = m.clone();
                    async move { axum::Json(vec![m.load(std::sync::atomic::Ordering::SeqCst)]) }
                }),
            )
            .route("/text", get(|| async { "plain" }))
            .layer(axum::middleware::from_fn(etag));
        let (status, tag, body) = fetch(&app, None).await;
        assert_eq!((status, body.as_slice()), (200, b"[1]".as_slice()));
        let tag = tag.expect("an ETag on JSON");
        let (status, again, body) = fetch(&app, Some(&tag)).await;
        assert_eq!((status, body.len()), (304, 0));
        assert_eq!(again.as_deref(), Some(tag.as_str()));
        let (status, _, _) = fetch(&app, Some("\"other\"")).await;
        assert_eq!(status, 200);
        n.store(2, std::sync::atomic::Ordering::SeqCst);
        let (status, new_tag, body) = fetch(&app, Some(&tag)).await;
        assert_eq!((status, body.as_slice()), (200, b"[2]".as_slice()));
        assert_ne!(new_tag, Some(tag));
        // Only JSON is tagged (exports and /metrics stream past).
        let mut app = app;
        let req = axum::http::Request::get("/text")
            .body(axum::body::Body::empty())
            .expect("request");
        let resp = tower_service::Service::call(&mut app, req)
            .await
            .expect("infallible");
        assert!(resp.headers().get(header::ETAG).is_none());
    }

    /// The page's script must never build markup from strings: no
    /// `innerHTML`, `outerHTML`, `insertAdjacentHTML`, `document.write` or
    /// `eval` anywhere in it, so a name can only ever be text.
    #[test]
    fn the_script_never_parses_strings_as_markup() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ] {
            assert!(!APP_JS.contains(sink), "app.js uses {sink}");
        }
    }

    /// The shell loads its script and style from this origin and has no
    /// inline script or handler, which the policy would refuse anyway.
    #[test]
    fn the_shell_has_no_inline_script() {
        assert!(INDEX.contains(r#"<script type="module" src="/console/app.js"></script>"#));
        let handler = INDEX.match_indices(" on").any(|(i, _)| {
            let rest = &INDEX[i + 3..];
            let word = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(0);
            word > 0 && rest[word..].starts_with('=')
        });
        assert!(!handler, "an inline event handler in index.html");
        assert_eq!(INDEX.matches("<script").count(), 1);
        assert!(CSP.contains("script-src 'self'") && !CSP.contains("unsafe"));
    }
}
