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

#[cfg(test)]
mod tests {
    use super::*;

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
