//! Server-sent event streams.
//!
//! `GET /api/v1/points/stream?glob=boiler.*`: first a `snapshot` event (a JSON array of
//! every matching point, as `GET /api/v1/points` gives it), then a `change` event (a JSON
//! array of the points that changed) per batch of changes from the image. A client that
//! reads too slowly falls behind the image's broadcast channel; it then gets a fresh
//! `snapshot` instead of the changes it missed (the poller never waits for it).
//!
//! `GET /api/v1/buses/{bus}/traffic`: the bus traffic monitor, one `frame` event per frame
//! the bus sends or hears (a [`crate::bus::TraceEvent`] as JSON: `at`, `dir`, hex `bytes`,
//! `unit`, `summary`, `verdict`). A client that reads too slowly loses the oldest frames, never
//! slows the bus: it then gets a `lagged` event `{"missed": N}` and the stream goes on from the
//! newest frames. The bus builds these events only while at least one stream is open.
//! An unknown bus is a 404 `{"error": "no bus \"x\" (buses: line1, line2)"}`.
//!
//! Every stream sends a comment every 15 s so proxies keep it open, and ends at shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::bus::TraceEvent;

use super::App;
use super::api::{Filter, error, matching, view};

/// How often an idle stream sends a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/points/stream", get(points))
        .route("/api/v1/buses/{bus}/traffic", get(traffic))
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

async fn traffic(State(app): State<Arc<App>>, Path(bus): Path<String>) -> Response {
    let Some(handle) = app.seen.buses.iter().find(|b| b.name() == bus) else {
        let names: Vec<&str> = app.seen.buses.iter().map(|b| b.name()).collect();
        let known = if names.is_empty() { "none configured".to_string() } else { names.join(", ") };
        return error(StatusCode::NOT_FOUND, format!("no bus {bus:?} (buses: {known})"));
    };
    let frames = traffic_items(handle.trace()).map(|item| {
        Ok::<_, std::convert::Infallible>(match item {
            Traffic::Frame(frame) => event("frame", &frame),
            Traffic::Lagged(missed) => event("lagged", &serde_json::json!({ "missed": missed })),
        })
    });
    sse(frames, app.shutdown.clone())
}

/// One item of a traffic stream.
#[derive(Debug)]
enum Traffic {
    /// A frame the bus sent or heard.
    Frame(TraceEvent),
    /// This many frames were lost because the client read too slowly.
    Lagged(u64),
}

/// The frames of `rx` until the bus ends; a fall-behind becomes one [`Traffic::Lagged`]
/// and the stream goes on with the oldest frame still held.
fn traffic_items(rx: broadcast::Receiver<TraceEvent>) -> impl Stream<Item = Traffic> {
    futures::stream::unfold(rx, |mut rx| async move {
        let item = match rx.recv().await {
            Ok(frame) => Traffic::Frame(frame),
            Err(RecvError::Lagged(missed)) => Traffic::Lagged(missed),
            Err(RecvError::Closed) => return None,
        };
        Some((item, rx))
    })
}

/// An SSE answer of `stream`, ending at `shutdown`.
pub(super) fn sse(
    stream: impl Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) -> Response {
    let stream = stream.take_until(shutdown.cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::trace::{TRACE_CAPACITY, Tap};
    use crate::bus::{TraceDir, Verdict};

    #[tokio::test]
    async fn a_slow_reader_is_told_how_many_frames_it_missed_and_goes_on() {
        let tap = Tap::default();
        let mut items = Box::pin(traffic_items(tap.subscribe()));
        let total = TRACE_CAPACITY + 7;
        for i in 0..total {
            let byte = (i % 256) as u8;
            tap.emit(TraceDir::Tx, &[byte], Some(1), Verdict::Sent, || format!("frame {i}"));
        }
        match items.next().await {
            Some(Traffic::Lagged(n)) => assert_eq!(n, 7),
            other => panic!("expected a lag notice first, got {other:?}"),
        }
        match items.next().await {
            Some(Traffic::Frame(f)) => assert_eq!(f.summary, "frame 7", "the oldest frame still held"),
            other => panic!("expected a frame, got {other:?}"),
        }
        drop(tap);
        let rest = items.count().await;
        assert_eq!(rest, TRACE_CAPACITY - 1, "every held frame, then the end when the bus goes");
    }
}
