//! A TCP forwarder the link tests can cut and restore, standing for a network that fails.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards connections from `addr` to `target` while started.
pub struct Proxy {
    /// Where peers connect.
    pub addr: SocketAddr,
    target: SocketAddr,
    stop: Option<CancellationToken>,
}

impl Proxy {
    /// Reserves a port without listening yet.
    pub fn reserve(target: SocketAddr) -> Self {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        Self { addr, target, stop: None }
    }

    /// Listens and forwards (again, after [`Proxy::kill`]).
    pub async fn start(&mut self) {
        // The killed accept loop drops its socket when it next runs: retry briefly.
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < end,
                        "cannot rebind the proxy on {}: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let stop = CancellationToken::new();
        let (s, target) = (stop.clone(), self.target);
        tokio::spawn(async move {
            loop {
                let (mut down, _) = tokio::select! {
                    r = listener.accept() => r.expect("accept"),
                    () = s.cancelled() => return,
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        () = s.cancelled() => {}
                    }
                });
            }
        });
        self.stop = Some(stop);
    }

    /// Cuts every forwarded connection and stops listening.
    pub fn kill(&mut self) {
        if let Some(s) = self.stop.take() {
            s.cancel();
        }
    }
}
