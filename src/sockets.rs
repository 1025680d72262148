//! Listening sockets: bound here, or handed over already bound.
//!
//! Two callers hand sockets over: the service manager (systemd socket activation: the
//! `LISTEN_FDS` protocol, read by [`Sockets::from_env`]) and a program that embeds the
//! gateway ([`crate::gateway::Gateway::start_on`], e.g. a test that binds port 0 first).
//! A section whose `listen` address is the address of a handed-over socket uses that socket
//! instead of binding; every other address is bound here.
//!
//! What this buys on a plant floor: the service manager holds the port across a restart or
//! an upgrade, so a SCADA master's connect waits in the socket's backlog instead of being
//! refused, and an unprivileged service can serve port 502 without any capability.
//!
//! Invariant: a handed-over socket stays open for the life of the process. A reload that
//! restarts an endpoint takes it again (the address cannot be bound a second time while the
//! service manager holds it).

use std::net::SocketAddr;
use std::sync::Arc;

/// The handed-over listening sockets, shared by every part that listens. Cloning shares.
#[derive(Debug, Clone, Default)]
pub struct Sockets(Arc<[Handed]>);

#[derive(Debug)]
struct Handed {
    addr: SocketAddr,
    listener: std::net::TcpListener,
}

/// A socket the service manager handed over that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("socket activation: descriptor {fd} (of LISTEN_FDS={count}) is not a listening TCP socket: {source}")]
pub struct HandedError {
    /// The descriptor number.
    pub fd: usize,
    /// How many descriptors were handed over.
    pub count: usize,
    /// What is wrong with it.
    pub source: std::io::Error,
}

impl Sockets {
    /// These already-bound listeners, taken by the sections that listen on their addresses.
    pub fn new(listeners: impl IntoIterator<Item = std::net::TcpListener>) -> std::io::Result<Self> {
        let mut handed = Vec::new();
        for listener in listeners {
            handed.push(Handed { addr: listener.local_addr()?, listener });
        }
        Ok(Self(handed.into()))
    }

    /// The sockets the service manager handed over (`LISTEN_FDS`, starting at descriptor 3),
    /// as systemd's `sd_listen_fds` reads them: only when `LISTEN_PID` is this process's
    /// pid. `LISTEN_FDS` without `LISTEN_PID` (inherited from a shell, or set by a wrapper)
    /// hands nothing over: its descriptors are left alone, and the second value says so for
    /// the log. Reads and then unsets those variables, so call it before any thread starts.
    pub fn from_env() -> Result<(Self, Option<String>), HandedError> {
        let pid = std::env::var("LISTEN_PID").ok();
        // listenfd's extension: the first descriptor may be given (systemd's is always 3).
        let first = std::env::var("LISTEN_FDS_FIRST_FD").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
        // Unsets the variables; ignores them when LISTEN_PID names another process.
        let mut fds = listenfd::ListenFd::from_env();
        let count = fds.len();
        if pid.as_deref().is_none_or(str::is_empty) {
            let ignored = (count > 0).then(|| {
                format!(
                    "LISTEN_FDS={count} is set without LISTEN_PID: no service manager handed sockets to \
                     this process (systemd always sets both), so descriptors {first}.. are left alone \
                     and every listen address is bound here"
                )
            });
            return Ok((Self::default(), ignored));
        }
        let mut listeners = Vec::new();
        for i in 0..count {
            let bad = |source| HandedError { fd: first + i, count, source };
            let not_tcp = || bad(std::io::Error::other("not a TCP stream socket"));
            listeners.push(fds.take_tcp_listener(i).map_err(bad)?.ok_or_else(not_tcp)?);
        }
        let sockets = Self::new(listeners).map_err(|source| HandedError { fd: first, count, source })?;
        Ok((sockets, None))
    }

    /// A listener on `addr`: the handed-over socket bound to it, or else a new socket bound
    /// here. Must be called inside a tokio runtime.
    pub fn listen(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        let std = match self.0.iter().find(|h| same(h.addr, addr)) {
            Some(h) => {
                tracing::info!(
                    "listening on {} with the socket handed over already bound (socket activation)",
                    h.addr
                );
                h.listener.try_clone()?
            }
            None => std::net::TcpListener::bind(addr)?,
        };
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)
    }

    /// Handed-over sockets that none of the `listen` addresses takes: they stay open
    /// (the service manager holds them anyway) and connections to them wait unanswered.
    pub fn unnamed(&self, listen: &[SocketAddr]) -> Vec<SocketAddr> {
        self.0.iter().filter(|h| !listen.iter().any(|l| same(h.addr, *l))).map(|h| h.addr).collect()
    }
}

/// `listen` names the socket bound to `bound`: the same address, or both the wildcard
/// address of either family on the same port (systemd's `ListenStream=502` binds `[::]:502`,
/// which also takes IPv4, while a config may say `0.0.0.0:502`).
fn same(bound: SocketAddr, listen: SocketAddr) -> bool {
    bound == listen
        || (bound.port() == listen.port() && bound.ip().is_unspecified() && listen.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listen_address_takes_the_handed_socket_on_that_address_and_a_wildcard_either_family() {
        let a: SocketAddr = "127.0.0.1:502".parse().expect("addr");
        assert!(same(a, a));
        assert!(!same(a, "127.0.0.1:503".parse().expect("addr")));
        assert!(!same(a, "0.0.0.0:502".parse().expect("addr")));
        assert!(same("[::]:502".parse().expect("addr"), "0.0.0.0:502".parse().expect("addr")));
        assert!(!same("[::]:502".parse().expect("addr"), "0.0.0.0:503".parse().expect("addr")));
    }

    #[tokio::test]
    async fn a_handed_socket_is_used_again_after_a_restart_and_other_addresses_are_bound() {
        let bound = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = bound.local_addr().expect("addr");
        let sockets = Sockets::new([bound]).expect("sockets");
        assert_eq!(sockets.unnamed(&["127.0.0.1:1".parse().expect("addr")]), vec![addr]);
        assert!(sockets.unnamed(&[addr]).is_empty());
        let first = sockets.listen(addr).expect("handed socket");
        assert_eq!(first.local_addr().expect("addr"), addr);
        drop(first);
        // The endpoint restarted: the port is still ours, and a client's connect is taken.
        let again = sockets.listen(addr).expect("handed socket again");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (_, from) = again.accept().await.expect("accept");
        assert_eq!(from, client.local_addr().expect("addr"));
        let other = sockets.listen("127.0.0.1:0".parse().expect("addr")).expect("bound here");
        assert_ne!(other.local_addr().expect("addr"), addr);
    }
}
