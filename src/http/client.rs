//! A small client of the gateway's own HTTP API, for the command line (`m2m-gateway
//! status`, `read`, `write`) and the tests: plain HTTP/1.1 over hyper, JSON bodies, and
//! server-sent event streams read one event at a time.
//!
//! Invariants: connecting and every request other than an event stream have a deadline
//! ([`CONNECT_TIMEOUT`], [`REQUEST_TIMEOUT`]); an error answer of the gateway
//! (`{"error": ...}`) comes back as [`ClientError::Refused`] with its status and message.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

/// Longest wait for the gateway to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a whole answer (event streams excepted).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://host:port`.
    #[error("url {0:?}: give http://host:port (https is not served by the gateway)")]
    Url(String),
    /// Nothing answered.
    #[error("cannot reach the gateway at {addr}: {reason} (is it running, with [http] enabled?)")]
    Connect {
        /// host:port.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The connection broke or timed out.
    #[error("gateway at {addr}: {reason}")]
    Transport {
        /// host:port.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// The gateway answered with an error.
    #[error("{message} (http {status})")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The gateway's message.
        message: String,
    },
    /// The answer is not what the API gives.
    #[error("unexpected answer from the gateway: {0}")]
    Body(String),
}

/// A client of one gateway.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    token: Option<String>,
}

impl Client {
    /// A client of the gateway at `url` (`http://host:port`, a path is ignored), sending
    /// `token` with every request when given.
    pub fn new(url: &str, token: Option<String>) -> Result<Self, ClientError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| ClientError::Url(url.to_string()))?;
        let addr = rest.split('/').next().unwrap_or_default();
        if addr.is_empty() || !addr.contains(':') {
            return Err(ClientError::Url(url.to_string()));
        }
        Ok(Self { addr: addr.to_string(), token })
    }

    /// The `host:port` this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let addr = self.addr.clone();
        let connect_err = |reason: String| ClientError::Connect { addr: addr.clone(), reason };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.addr))
            .await
            .map_err(|_| connect_err(format!("no connection within {}s", CONNECT_TIMEOUT.as_secs())))?
            .map_err(|e| connect_err(e.to_string()))?;
        let transport =
            |e: hyper::Error| ClientError::Transport { addr: addr.clone(), reason: e.to_string() };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(transport)?;
        tokio::spawn(async move {
            // The connection ends with the answer; its error shows in the request.
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.addr)
            .header(header::USER_AGENT, concat!("m2m-gateway/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Body(e.to_string()))?;
        sender.send_request(req).await.map_err(transport)
    }

    /// Sends a request and reads the whole answer; an error status becomes `Refused`.
    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, ClientError> {
        let work = async {
            let rsp = self.send(method, path, body).await?;
            let status = rsp.status();
            let bytes = rsp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Transport { addr: self.addr.clone(), reason: e.to_string() })?
                .to_bytes();
            if status.is_success() { Ok(bytes) } else { Err(refused(status, &bytes)) }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, work).await.map_err(|_| ClientError::Transport {
            addr: self.addr.clone(),
            reason: format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
        })?
    }

    /// `GET path` as text.
    pub async fn text(&self, path: &str) -> Result<String, ClientError> {
        let bytes = self.call(Method::GET, path, None).await?;
        String::from_utf8(bytes.to_vec()).map_err(|e| ClientError::Body(e.to_string()))
    }

    /// `GET path`, parsed as JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Body(e.to_string()))
    }

    /// `POST path` with a JSON body; the answer parsed as JSON.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        let bytes = self.call(Method::POST, path, Some(body.to_string().into_bytes())).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Body(e.to_string()))
    }

    /// Opens the event stream at `path`.
    pub async fn events(&self, path: &str) -> Result<Events, ClientError> {
        let rsp = tokio::time::timeout(REQUEST_TIMEOUT, self.send(Method::GET, path, None))
            .await
            .map_err(|_| ClientError::Transport { addr: self.addr.clone(), reason: "no answer".into() })??;
        let status = rsp.status();
        if !status.is_success() {
            let bytes = rsp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Err(refused(status, &bytes));
        }
        Ok(Events { body: rsp.into_body(), buf: BytesMut::new(), addr: self.addr.clone() })
    }
}

fn refused(status: StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    ClientError::Refused { status: status.as_u16(), message }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its type (`message` when none was given).
    pub kind: String,
    /// Its data lines, joined with line feeds.
    pub data: String,
}

/// An open event stream.
pub struct Events {
    body: Incoming,
    buf: BytesMut,
    addr: String,
}

impl Events {
    /// The next event; `Ok(None)` when the stream ended. Keep-alive comments are skipped.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block = self.buf.split_to(at + 2);
                let text = String::from_utf8_lossy(&block[..at]).into_owned();
                if let Some(e) = parse_event(&text) {
                    return Ok(Some(e));
                }
                continue;
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(ClientError::Transport { addr: self.addr.clone(), reason: e.to_string() });
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        // Normalise CR LF so one separator rule holds.
                        let text = data.iter().copied().filter(|b| *b != b'\r');
                        self.buf.extend(text);
                    }
                }
            }
        }
    }
}

/// One event block (`event:` and `data:` lines); `None` for a comment-only block.
fn parse_event(block: &str) -> Option<Event> {
    let mut kind = None;
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            kind = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if data.is_empty() && kind.is_none() {
        return None;
    }
    Some(Event { kind: kind.unwrap_or_else(|| "message".into()), data: data.join("\n") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(Client::new("http://127.0.0.1:8502", None).expect("url").addr(), "127.0.0.1:8502");
        assert_eq!(Client::new("http://gw:8502/status", None).expect("url").addr(), "gw:8502");
        assert!(Client::new("https://gw:8502", None).is_err());
        assert!(Client::new("http://gw", None).is_err());
    }

    #[test]
    fn events() {
        assert_eq!(parse_event(": keep-alive"), None);
        let e = parse_event("event: change\ndata: [1,\ndata: 2]").expect("event");
        assert_eq!((e.kind.as_str(), e.data.as_str()), ("change", "[1,\n2]"));
    }
}
