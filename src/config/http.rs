//! The `[http]` section: the local status page, Prometheus metrics and JSON API.
//!
//! ```toml
//! [http]                     # optional: without it the defaults below apply (on,
//!                            #   loopback only), so a running gateway can be looked at
//!                            #   from the same machine without any configuration
//! enabled = true             # default true; false: nothing listens for HTTP
//! listen = "127.0.0.1:8502"  # default 127.0.0.1:8502 (loopback only). Any address that
//!                            #   is not loopback needs token_file
//! token_file = "/etc/m2m-gateway/http.token"
//!                            # a file holding the access token (one line, at least 16
//!                            #   characters); never the token itself. Clients send it as
//!                            #   `Authorization: Bearer <token>`. Required for every
//!                            #   request that does not come from loopback, and for every
//!                            #   write, even from loopback: without it nothing can be
//!                            #   written through HTTP
//!
//! [[http.grant]]             # what operators may write (m2m-gateway write, POST
//!                            #   /api/v1/points/<name>); nothing else is writable
//! points = "boiler.setpoint" # required: point glob(s), each matching a configured
//!                            #   holding register or coil point, in no other grant
//! min = 20.0                 # optional limits (numeric points only), min <= max
//! max = 80.0
//! ```
//!
//! Without `[http]` in the file the endpoint is on with the defaults, and a port that is
//! taken only costs a warning at start (two gateways on one machine, or one started
//! twice); an `[http]` section that is written makes the listener required, so a bind
//! failure stops the start like any other configured socket.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::write::{self, RawGrant};
use super::{Checker, path_key};
use crate::model::{Http, Point};

/// The default listening address: loopback, a port above 1024 near the other defaults
/// (Modbus-TCP 5020) and free of the well-known ones (Prometheus 9090, Grafana 3000).
pub const LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8502);

/// `[http]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    enabled: Option<Spanned<bool>>,
    listen: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    #[serde(default)]
    grant: Vec<RawGrant>,
}

/// Resolves `[http]` (`None` when absent: the defaults); `None` out when disabled.
pub(super) fn validate(
    raw: Option<&RawHttp>,
    points: &[&Point],
    dir: &Path,
    check: &mut Checker,
) -> Option<Http> {
    const PATH: &str = "http";
    let Some(raw) = raw else {
        return Some(Http { listen: LISTEN, token_file: None, grants: Vec::new(), required: false });
    };
    let listen = match &raw.listen {
        None => LISTEN,
        Some(l) => match l.get_ref().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                check.report(
                    l.span(),
                    PATH,
                    format!(
                        "listen {:?} is not an ip:port address (like \"127.0.0.1:8502\" or \"0.0.0.0:8502\")",
                        l.get_ref()
                    ),
                );
                LISTEN
            }
        },
    };
    let token_file = raw.token_file.as_ref().map(|t| path_key(check, t, dir, PATH, "token_file"));
    if !listen.ip().is_loopback() && token_file.is_none() {
        let span = raw.listen.as_ref().map_or(0..0, |l| l.span());
        check.report(
            span,
            PATH,
            format!(
                "listen {listen} is reachable from other machines: set token_file (a file holding the access token) or listen on 127.0.0.1"
            ),
        );
    }
    let grants = write::grants(&raw.grant, points, PATH, check);
    if raw.enabled.as_ref().is_some_and(|e| !*e.get_ref()) {
        return None;
    }
    Some(Http { listen, token_file, grants, required: true })
}
