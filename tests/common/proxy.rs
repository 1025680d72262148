//! A TCP forwarder the link tests can cut and restore, standing for a network that fails.
//!
//! It holds its listening socket from [`Proxy::reserve`] to the end of the test, so its
//! port can never be taken by anything else (no bind, drop and rebind). While cut, it
//! accepts each connection and closes it at once: the dialer's connection fails, as on a
//! network that is down.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards connections from `addr` to `target` while started.
pub struct Proxy {
    /// Where peers connect.
    pub addr: SocketAddr,
    target: SocketAddr,
    /// The socket, until the first start moves it into the accept loop.
    listener: Option<std::net::TcpListener>,
    /// While forwarding: the token that cuts the forwarded connections.
    up: Arc<Mutex<Option<CancellationToken>>>,
    /// Ends the accept loop when the proxy is dropped.
    end: CancellationToken,
}

impl Proxy {
    /// Listens on a port of its own, cut (nothing is forwarded until [`Proxy::start`]).
    pub fn reserve(target: SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (up, end) = (Arc::default(), CancellationToken::new());
        Self { addr, target, listener: Some(listener), up, end }
    }

    /// Forwards (again, after [`Proxy::kill`]).
    pub async fn start(&mut self) {
        if let Some(std) = self.listener.take() {
            let listener = TcpListener::from_std(std).expect("tokio listener");
            let (up, end, target) = (self.up.clone(), self.end.clone(), self.target);
            tokio::spawn(async move {
                loop {
                    let (mut down, _) = tokio::select! {
                        r = listener.accept() => r.expect("accept"),
                        () = end.cancelled() => return,
                    };
                    // Cut: the connection is closed at once (dropped here).
                    let Some(cut) = up.lock().expect("lock").clone() else { continue };
                    tokio::spawn(async move {
                        let Ok(mut up) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            () = cut.cancelled() => {}
                        }
                    });
                }
            });
        }
        *self.up.lock().expect("lock") = Some(CancellationToken::new());
    }

    /// Cuts every forwarded connection and refuses new ones until the next start.
    pub fn kill(&mut self) {
        if let Some(cut) = self.up.lock().expect("lock").take() {
            cut.cancel();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
        self.end.cancel();
    }
}
