//! The `[link]` section: this gateway's identity and socket for peer links.
//!
//! ```toml
//! [link]                     # optional; without it there are no peers and no socket
//! identity = "/etc/m2m-gateway"     # required: directory with cert.pem and key.pem,
//!                                   #   made by `m2m-gateway keygen`
//! data_dir = "/var/lib/m2m-gateway" # required: the per-peer spools live here
//! listen = "0.0.0.0:7700"    # optional: ip:port (or host:port, e.g. localhost:7700: the
//!                            #   name's first IPv4 address) to accept peers that do not `dial`;
//!                            #   required as soon as one peer has no `dial`
//! allow = ["10.0.0.0/8", "192.168.1.20"]  # optional source allowlist (CIDR; a bare
//!                            #   address is /32 or /128); empty: any source (the
//!                            #   certificate pin still applies)
//! ```
//!
//! Relative paths resolve against the directory of the configuration file. The peers
//! themselves are `[[peer]]` sections (config/peer.rs).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{Checker, path_key};
use crate::model::{IpNet, Links};

/// `[link]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLink {
    pub(super) identity: Spanned<String>,
    pub(super) data_dir: Spanned<String>,
    pub(super) listen: Option<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

/// Resolves `[link]`, with no peers yet.
pub(super) fn validate(raw: &RawLink, dir: &Path, check: &mut Checker) -> Links {
    const PATH: &str = "link";
    let identity_dir = path_key(check, &raw.identity, dir, PATH, "identity");
    let data_dir = path_key(check, &raw.data_dir, dir, PATH, "data_dir");
    let listen = raw
        .listen
        .as_ref()
        .and_then(|l| listen(l.get_ref()).map_err(|e| check.report(l.span(), PATH, e)).ok());
    let mut allow: Vec<IpNet> = Vec::with_capacity(raw.allow.len());
    for entry in &raw.allow {
        match cidr(entry.get_ref()) {
            Ok(net) if allow.contains(&net) => {
                check.report(entry.span(), PATH, format!("allow {:?} is listed twice", entry.get_ref()))
            }
            Ok(net) => allow.push(net),
            Err(e) => check.report(entry.span(), PATH, e),
        }
    }
    Links { identity_dir, data_dir, listen, allow, peers: Vec::new(), tunnels: Vec::new() }
}

/// `ip:port` (or `host:port`, see [`super::socket_addr`]) to listen on, port not 0.
fn listen(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = super::socket_addr(text).map_err(|e| {
        e.unwrap_or_else(|| {
            format!("listen {text:?} is not an ip:port address (like \"0.0.0.0:7700\" or \"[::]:7700\")")
        })
    })?;
    if addr.port() == 0 {
        return Err(format!("listen {text:?} has port 0: peers need a fixed port to dial"));
    }
    Ok(addr)
}

/// A network in CIDR form (`10.0.0.0/8`), or a bare address (one host). Host bits set
/// below the prefix are refused: `10.0.0.1/8` is more likely a typo than a network.
fn cidr(text: &str) -> Result<IpNet, String> {
    let bad = || {
        format!(
            "allow {text:?} is not a network: write an address (\"192.168.1.20\") or address/prefix (\"10.0.0.0/8\")"
        )
    };
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
    let bits: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => bits,
        Some(p) => match p.trim().parse::<u8>() {
            Ok(p) if p <= bits => p,
            Ok(p) => {
                return Err(format!(
                    "allow {text:?}: prefix /{p} is longer than the {bits} bits of the address"
                ));
            }
            Err(_) => return Err(bad()),
        },
    };
    let net = IpNet::new(addr, prefix).map_err(|_| bad())?;
    let network = net.trunc();
    if network != net {
        let network = network.addr();
        return Err(format!(
            "allow {text:?} has host bits set below the /{prefix} prefix: did you mean \"{network}/{prefix}\"?"
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let net = cidr("10.0.0.0/8").expect("valid");
        assert_eq!(net.prefix_len(), 8);
        assert!(net.contains(&"10.200.1.2".parse::<IpAddr>().expect("ip")));
        assert!(!net.contains(&"11.0.0.1".parse::<IpAddr>().expect("ip")));
        assert_eq!(cidr("192.168.1.20").expect("host").prefix_len(), 32);
        assert_eq!(cidr("::1").expect("v6 host").prefix_len(), 128);
        assert_eq!(cidr("fd00::/8").expect("v6 net").prefix_len(), 8);
        assert_eq!(cidr("0.0.0.0/0").expect("any").prefix_len(), 0);
        let err = cidr("10.0.0.1/8").expect_err("host bits");
        assert!(err.contains("did you mean \"10.0.0.0/8\""), "{err}");
        assert!(cidr("10.0.0.0/33").is_err());
        assert!(cidr("10.0.0/8").is_err());
        assert!(cidr("10.0.0.0/x").is_err());
        assert!(cidr("").is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(listen("0.0.0.0:7700").expect("v4").port(), 7700, "an ip:port listens");
        assert!(listen("[::]:7700").is_ok());
        assert!(listen("0.0.0.0:0").is_err());
        assert_eq!(
            listen("localhost:7700").expect("a name resolves"),
            "127.0.0.1:7700".parse().expect("addr"),
            "localhost is the IPv4 loopback"
        );
        assert!(listen("no-such-host.invalid:7700").is_err());
        assert!(listen("7700").is_err());
    }
}
