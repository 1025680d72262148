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
    /// An IPv6 wildcard socket that takes IPv4 too (systemd's default for
    /// `ListenStream=502`; not with `BindIPv6Only=ipv6-only`).
    dual_stack: bool,
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
            let addr = listener.local_addr()?;
            let dual_stack = match addr {
                SocketAddr::V6(v6) if v6.ip().is_unspecified() => {
                    !socket2::SockRef::from(&listener).only_v6()?
                }
                _ => false,
            };
            handed.push(Handed { addr, listener, dual_stack });
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
            let listener = fds.take_tcp_listener(i).map_err(bad)?.ok_or_else(not_tcp)?;
            listening(&listener).map_err(bad)?;
            listeners.push(listener);
        }
        let sockets = Self::new(listeners).map_err(|source| HandedError { fd: first, count, source })?;
        Ok((sockets, None))
    }

    /// A listener on `addr` for `section` (`[server]`, for the log): the handed-over socket
    /// bound to it, or else a new socket bound here. Must be called inside a tokio runtime.
    pub fn listen(&self, addr: SocketAddr, section: &str) -> std::io::Result<tokio::net::TcpListener> {
        let std = match self.pick(addr) {
            Some(h) => {
                tracing::info!(
                    "{section} listening on {} with the socket handed over already bound (socket activation)",
                    h.addr
                );
                h.listener.try_clone()?
            }
            None => std::net::TcpListener::bind(addr).map_err(|e| self.why_taken(addr, e))?,
        };
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)
    }

    /// A bind of `addr` that failed because a handed-over socket holds its port (`[::]:P`
    /// asked while only `0.0.0.0:P` was handed over): says which socket and what to write.
    fn why_taken(&self, addr: SocketAddr, e: std::io::Error) -> std::io::Error {
        match self.0.iter().find(|h| h.addr.port() == addr.port()) {
            Some(h) if e.kind() == std::io::ErrorKind::AddrInUse => std::io::Error::new(
                e.kind(),
                format!(
                    "{e}: the socket handed over on {} holds this port and cannot serve {addr}; listen on {} instead",
                    h.addr, h.addr
                ),
            ),
            _ => e,
        }
    }

    /// Checks that no two sections of one configuration (`[server]` and its `listen`, ...)
    /// would take the same handed-over socket: both would accept on it and the kernel
    /// would split the connections between them, where a second bind of one address
    /// fails. Says which sections and which socket.
    pub fn check_shared(&self, listens: &[(&str, SocketAddr)]) -> Result<(), String> {
        for (i, (a, first)) in listens.iter().enumerate() {
            for (b, second) in &listens[i + 1..] {
                if let (Some(x), Some(y)) = (self.pick(*first), self.pick(*second))
                    && std::ptr::eq(x, y)
                {
                    return Err(format!(
                        "{a} (listen {first}) and {b} (listen {second}) would both take the socket handed over on {}: give each its own address",
                        x.addr
                    ));
                }
            }
        }
        Ok(())
    }

    /// Handed-over sockets that none of the `listen` addresses takes: they stay open
    /// (the service manager holds them anyway) and connections to them wait unanswered.
    pub fn unnamed(&self, listen: &[SocketAddr]) -> Vec<SocketAddr> {
        let named: Vec<&Handed> = listen.iter().filter_map(|l| self.pick(*l)).collect();
        self.0.iter().filter(|h| !named.iter().any(|n| std::ptr::eq(*n, *h))).map(|h| h.addr).collect()
    }

    /// The handed-over socket a section listening on `listen` takes: the one bound to that
    /// very address, else for `0.0.0.0:P` a dual-stack `[::]:P` (systemd's `ListenStream=P`,
    /// which takes IPv4 too). Never an IPv4 socket for an IPv6 address, nor an IPv6-only one
    /// for an IPv4 address: those would leave the other family's clients unanswered.
    fn pick(&self, listen: SocketAddr) -> Option<&Handed> {
        let wildcard_v4 = matches!(listen, SocketAddr::V4(v4) if v4.ip().is_unspecified());
        self.0
            .iter()
            .find(|h| h.addr == listen)
            .or_else(|| self.0.iter().find(|h| wildcard_v4 && h.dual_stack && h.addr.port() == listen.port()))
    }
}

/// Fails unless `socket` is listening: a unit with `Accept=yes` hands over each accepted
/// connection instead, which no section can serve.
fn listening(socket: &std::net::TcpListener) -> std::io::Result<()> {
    if socket2::SockRef::from(socket).is_listener()? {
        Ok(())
    } else {
        Err(std::io::Error::other("it is a connection (the socket unit needs Accept=no, the default)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handed socket claiming to be bound to `addr` (what `pick` reads is the address).
    fn handed(addr: &str, dual_stack: bool) -> Handed {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        Handed { addr: addr.parse().expect("addr"), listener, dual_stack }
    }

    fn picked(sockets: &Sockets, listen: &str) -> Option<String> {
        sockets.pick(listen.parse().expect("addr")).map(|h| h.addr.to_string())
    }

    #[test]
    fn a_listen_address_takes_its_own_socket_first_and_a_dual_stack_wildcard_only_for_ipv4_any() {
        let both = Sockets(vec![handed("[::]:502", true), handed("0.0.0.0:502", false)].into());
        assert_eq!(picked(&both, "0.0.0.0:502").as_deref(), Some("0.0.0.0:502"), "its own socket first");
        assert_eq!(picked(&both, "[::]:502").as_deref(), Some("[::]:502"));
        assert_eq!(picked(&both, "0.0.0.0:503"), None);
        assert_eq!(picked(&both, "127.0.0.1:502"), None, "a specific address is bound here");

        let dual = Sockets(vec![handed("[::]:502", true)].into());
        assert_eq!(picked(&dual, "0.0.0.0:502").as_deref(), Some("[::]:502"), "[::] takes IPv4 too");
        let v6_only = Sockets(vec![handed("[::]:502", false)].into());
        assert_eq!(picked(&v6_only, "0.0.0.0:502"), None, "an IPv6-only socket would leave IPv4 unanswered");
        let v4 = Sockets(vec![handed("0.0.0.0:502", false)].into());
        assert_eq!(picked(&v4, "[::]:502"), None, "an IPv4 socket would leave IPv6 unanswered");

        let any: SocketAddr = "0.0.0.0:502".parse().expect("addr");
        assert_eq!(both.unnamed(&[any]), vec!["[::]:502".parse::<SocketAddr>().expect("addr")]);
        assert!(dual.unnamed(&[any]).is_empty());
        assert_eq!(v6_only.unnamed(&[any]).len(), 1);
    }

    #[test]
    fn a_connection_handed_over_is_refused_and_a_listener_taken() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert!(listening(&listener).is_ok());
        let stream = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let connection: std::net::TcpListener = socket2::Socket::from(stream).into();
        let e = listening(&connection).expect_err("a connection");
        assert!(e.to_string().contains("Accept=no"), "{e}");
    }

    #[tokio::test]
    async fn a_bind_refused_for_the_port_of_a_handed_socket_says_which() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = held.local_addr().expect("addr").port();
        let sockets = Sockets(vec![handed(&format!("127.0.0.2:{port}"), false)].into());
        // The handed socket claims 127.0.0.2; the port is really held on 127.0.0.1.
        let e = sockets
            .listen(format!("127.0.0.1:{port}").parse().expect("addr"), "[server]")
            .expect_err("taken");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert!(
            e.to_string().contains(&format!("the socket handed over on 127.0.0.2:{port} holds this port")),
            "{e}"
        );
        drop(held);
    }

    #[test]
    fn two_sections_that_would_take_one_handed_socket_are_named() {
        let sockets = Sockets(vec![handed("[::]:502", true), handed("127.0.0.1:8502", false)].into());
        let at = |a: &str| a.parse::<SocketAddr>().expect("addr");
        let distinct = [
            ("[server]", at("0.0.0.0:502")),
            ("[http]", at("127.0.0.1:8502")),
            ("[link]", at("0.0.0.0:7700")),
        ];
        assert_eq!(sockets.check_shared(&distinct), Ok(()));
        let shared =
            [("[server]", at("0.0.0.0:502")), ("[http]", at("127.0.0.1:8502")), ("[link]", at("[::]:502"))];
        assert_eq!(
            sockets.check_shared(&shared),
            Err("[server] (listen 0.0.0.0:502) and [link] (listen [::]:502) would both take the socket handed over on [::]:502: give each its own address".into())
        );
    }

    #[tokio::test]
    async fn a_handed_socket_is_used_again_after_a_restart_and_other_addresses_are_bound() {
        let bound = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = bound.local_addr().expect("addr");
        let sockets = Sockets::new([bound]).expect("sockets");
        assert_eq!(sockets.unnamed(&["127.0.0.1:1".parse().expect("addr")]), vec![addr]);
        assert!(sockets.unnamed(&[addr]).is_empty());
        let first = sockets.listen(addr, "[server]").expect("handed socket");
        assert_eq!(first.local_addr().expect("addr"), addr);
        drop(first);
        // The endpoint restarted: the port is still ours, and a client's connect is taken.
        let again = sockets.listen(addr, "[server]").expect("handed socket again");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (_, from) = again.accept().await.expect("accept");
        assert_eq!(from, client.local_addr().expect("addr"));
        let other = sockets.listen("127.0.0.1:0".parse().expect("addr"), "[http]").expect("bound here");
        assert_ne!(other.local_addr().expect("addr"), addr);
    }
}
