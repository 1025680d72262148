//! Who may do what through HTTP: the access token and the one rule that checks it.
//!
//! Rules ([`decide`]): a request from another machine needs the token; a write (any
//! method but GET/HEAD) needs it from anywhere, loopback included, so a local process
//! cannot change a setpoint by accident; a token that is presented must be right. No
//! token configured: reads from loopback only (config refuses a listen address that is
//! not loopback then) and no writes at all.
//!
//! Invariants: the token is never logged or sent back; it is compared by SHA-256 digest,
//! so the time the comparison takes says nothing about how much of a guess was right.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{App, HttpError};

/// The shortest token accepted: shorter ones can be guessed over the network.
const MIN_TOKEN: usize = 16;

/// The access token, kept as its digest. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Token(ring::digest::Digest);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(MASKED)")
    }
}

impl Token {
    /// The token in `text` (surrounding whitespace is not part of it).
    pub fn new(text: &str) -> Option<Self> {
        let t = text.trim();
        (t.len() >= MIN_TOKEN).then(|| Self(ring::digest::digest(&ring::digest::SHA256, t.as_bytes())))
    }

    /// Reads the token from `path` (its first line).
    pub fn read(path: &Path) -> Result<Self, HttpError> {
        let bad = |reason: String| HttpError::Token { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let line = text.lines().next().unwrap_or("");
        Self::new(line).ok_or_else(|| {
            bad(format!(
                "the token must be at least {MIN_TOKEN} characters on the first line (make one with: head -c 24 /dev/urandom | base64 > {})",
                path.display()
            ))
        })
    }

    fn matches(&self, presented: &str) -> bool {
        ring::digest::digest(&ring::digest::SHA256, presented.trim().as_bytes()).as_ref() == self.0.as_ref()
    }
}

/// Why a request is refused: the status and the message sent back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Denied {
    pub(super) status: StatusCode,
    pub(super) message: &'static str,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let body = axum::Json(serde_json::json!({ "error": self.message }));
        let mut rsp = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            rsp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        rsp
    }
}

/// The access rule. `presented` is the bearer token sent, if any.
pub(super) fn decide(
    token: Option<&Token>,
    loopback: bool,
    write: bool,
    presented: Option<&str>,
) -> Result<(), Denied> {
    let unauthorized = |message| Err(Denied { status: StatusCode::UNAUTHORIZED, message });
    match (token, presented) {
        (Some(t), Some(p)) if t.matches(p) => Ok(()),
        (Some(_), Some(_)) => unauthorized("wrong access token"),
        (None, Some(_)) => {
            unauthorized("this gateway has no access token configured ([http] token_file); send none")
        }
        (None, None) if write => Err(Denied {
            status: StatusCode::FORBIDDEN,
            message: "writing through http needs an access token: set [http] token_file in the gateway's configuration",
        }),
        (Some(_), None) if write => unauthorized(
            "writes need the access token: send Authorization: Bearer <token> (m2m-gateway write --token-file)",
        ),
        (_, None) if loopback => Ok(()),
        (Some(_), None) => unauthorized(
            "requests from other machines need the access token: send Authorization: Bearer <token>",
        ),
        (None, None) => {
            Err(Denied { status: StatusCode::FORBIDDEN, message: "only this machine may connect" })
        }
    }
}

/// The bearer token of a request, if it sent one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// Middleware: applies [`decide`] to every request.
pub(super) async fn guard(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    let loopback = match peer.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        ip => ip.is_loopback(),
    };
    match decide(app.token.as_ref(), loopback, write, bearer(req.headers())) {
        Ok(()) => next.run(req).await,
        Err(denied) => {
            tracing::debug!(%peer, method = %req.method(), path = req.uri().path(), reason = denied.message, "http request refused");
            denied.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        let t = Token::new("0123456789abcdef-secret").expect("long enough");
        let good = Some("0123456789abcdef-secret");
        let status = |r: Result<(), Denied>| r.err().map(|d| d.status.as_u16());
        // With a token: loopback reads are free, everything else needs it.
        assert_eq!(status(decide(Some(&t), true, false, None)), None);
        assert_eq!(status(decide(Some(&t), false, false, None)), Some(401));
        assert_eq!(status(decide(Some(&t), false, false, good)), None);
        assert_eq!(status(decide(Some(&t), true, true, None)), Some(401), "writes need it on loopback");
        assert_eq!(status(decide(Some(&t), true, true, good)), None);
        assert_eq!(status(decide(Some(&t), true, false, Some("wrong-but-long-enough"))), Some(401));
        // Without one: loopback reads only, never a write.
        assert_eq!(status(decide(None, true, false, None)), None);
        assert_eq!(status(decide(None, true, true, None)), Some(403));
        assert_eq!(status(decide(None, false, false, None)), Some(403));
        assert!(Token::new("short").is_none());
        assert_eq!(format!("{t:?}"), "Token(MASKED)");
    }

    #[test]
    fn bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().expect("header"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("header"));
        assert_eq!(bearer(&h), None);
    }
}
