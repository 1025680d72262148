//! Server-sent event streams.
//!
//! `GET /api/v1/points/stream?glob=boiler.*`: first a `snapshot` event (a JSON array of
//! every matching point, as `GET /api/v1/points` gives it), then a `change` event (a JSON
//! array of the points that changed) per batch of changes from the image. A client that
//! reads too slowly falls behind the image's broadcast channel; it then gets a fresh
//! `snapshot` instead of the changes it missed (the poller never waits for it).
//!
//! Every stream sends a comment every 15 s so proxies keep it open, and ends at shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;

use super::App;
use super::api::{Filter, matching, view};

/// How often an idle stream sends a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new().route("/api/v1/points/stream", get(points))
}

fn event(kind: &str, data: &impl serde::Serialize) -> Event {
    // Serialising plain views cannot fail; an empty event is harmless if it ever did.
    Event::default().event(kind).json_data(data).unwrap_or_else(|_| Event::default().event(kind))
}

async fn points(State(app): State<Arc<App>>, Query(filter): Query<Filter>) -> Response {
    let matcher = match filter.matcher() {
        Ok(m) => m,
        Err(rsp) => return rsp,
    };
    // Subscribe before the snapshot, so no change falls between the two.
    let rx = app.seen.image.subscribe();
    let first = event("snapshot", &matching(&app, matcher.as_ref()));
    let shutdown = app.shutdown.clone();
    let changes = futures::stream::unfold((rx, app, matcher), |(mut rx, app, matcher)| async move {
        loop {
            let out = match rx.recv().await {
                Ok(batch) => {
                    let views: Vec<_> = batch
                        .samples
                        .iter()
                        .filter(|(n, _)| matcher.as_ref().is_none_or(|m| m.is_match(&**n)))
                        .map(|(n, s)| view(&app, n, s))
                        .collect();
                    if views.is_empty() {
                        continue;
                    }
                    event("change", &views)
                }
                Err(RecvError::Lagged(_)) => event("snapshot", &matching(&app, matcher.as_ref())),
                Err(RecvError::Closed) => return None,
            };
            return Some((Ok::<_, std::convert::Infallible>(out), (rx, app, matcher)));
        }
    });
    let stream = futures::stream::once(async move { Ok(first) }).chain(changes);
    sse(stream, shutdown)
}

/// An SSE answer of `stream`, ending at `shutdown`.
pub(super) fn sse(
    stream: impl Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) -> Response {
    let stream = stream.take_until(shutdown.cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response()
}
