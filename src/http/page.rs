//! The status page at `/`: one HTML file, one stylesheet and one script, compiled into the
//! binary (`include_str!`), with no CDN, web font or other outside resource, because a
//! plant network has no internet. The script reads the JSON API (`/api/v1/status` every
//! two seconds, the point stream for live values, a bus's traffic stream while the
//! operator has the traffic monitor started), so the page shows nothing the API
//! does not.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::App;

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body)
}
