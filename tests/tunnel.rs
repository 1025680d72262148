//! Serial tunnels end to end, in process: two gateways configured from TOML, linked
//! over 127.0.0.1 with real TLS (keys from `tls::keygen`) through a TCP proxy the test
//! can cut, each with a tunnel on its own pseudo-terminal. The gateway opens the slave
//! side; the test holds the master side as "the machine" at each end. Every wait has a
//! deadline; nothing synchronises on a fixed sleep.

use crate::common;
use crate::common::proxy;

use std::net::SocketAddr;
use std::time::Duration;

use common::{logs, wait_until};
use m2m_gateway::config;
use m2m_gateway::gateway::Gateway;
use m2m_gateway::link::LinkHandle;
use m2m_gateway::link::tls::{self, Identity};
use m2m_gateway::link::tunnel::TunnelHandle;
use m2m_gateway::model::{Model, OnLinkDown};
use m2m_gateway::sim::VirtualPort;
use proxy::Proxy;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(10);

/// One gateway's identity, data directory and the pty its tunnel uses (reached
/// through a `/dev/serial/by-id`-style symlink, so it can be unplugged and re-plugged).
struct Site {
    dir: TempDir,
    id: Identity,
    /// The pty pair; its slave side is the gateway's port.
    port: VirtualPort,
    /// The machine's end of the cable (the pty master).
    machine: SerialStream,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = tls::keygen(&dir.path().join("id"), false).expect("keygen");
        let mut port = VirtualPort::with_link(dir.path().join("tty")).expect("pty pair");
        let machine = port.take_master().expect("master side");
        Self { dir, id, port, machine }
    }

    /// Unplugs the port and plugs in a new one at the same path.
    async fn replug(&mut self) {
        self.port.vanish().await;
        self.port.come_back().expect("new pty pair");
        let new = self.port.take_master().expect("master side");
        // Closing the old master hangs up the gateway's side of the old pair.
        drop(std::mem::replace(&mut self.machine, new));
    }

    /// This site's config: a link with one peer and one tunnel `press` to it.
    fn model(&self, name: &str, peer: &str, peer_fp: &str, dial: Option<SocketAddr>, tunnel: &str) -> Model {
        let dir = self.dir.path().display();
        let (listen, dial) = match dial {
            // `listen` is rebound to port 0 below: the config refuses port 0.
            None => ("listen = \"127.0.0.1:7700\"".to_string(), String::new()),
            Some(addr) => (String::new(), format!("dial = \"{addr}\"")),
        };
        let text = format!(
            r#"
[gateway]
name = "{name}"

[link]
identity = "{dir}/id"
data_dir = "{dir}/data"
{listen}

[[peer]]
name = "{peer}"
fingerprint = "{peer_fp}"
heartbeat = "300ms"
{dial}

[[tunnel]]
name = "press"
peer = "{peer}"
port = "{port}"
{tunnel}
"#,
            port = self.port.path().display()
        );
        let mut model = config::parse(&text, &format!("{name}.toml")).unwrap_or_else(|e| panic!("{e}"));
        if let Some(links) = model.links.as_mut().filter(|l| l.listen.is_some()) {
            links.listen = Some("127.0.0.1:0".parse().expect("addr"));
        }
        model
    }
}

/// Two gateways with a tunnel `press` between them; a dials b through a proxy.
struct Pair {
    a: Site,
    b: Site,
    ga: Gateway,
    gb: Gateway,
    proxy: Proxy,
    shutdown: CancellationToken,
}

impl Pair {
    async fn start(tunnel_a: &str, tunnel_b: &str) -> Self {
        logs();
        let (a, b) = (Site::new(), Site::new());
        let shutdown = CancellationToken::new();
        let mb = b.model("site-b", "site-a", &a.id.fingerprint.to_string(), None, tunnel_b);
        let gb = Gateway::start(&mb, shutdown.child_token()).expect("start b");
        let mut proxy = Proxy::reserve(gb.listen_addr().expect("b listens"));
        proxy.start().await;
        let ma = a.model("site-a", "site-b", &b.id.fingerprint.to_string(), Some(proxy.addr), tunnel_a);
        let ga = Gateway::start(&ma, shutdown.child_token()).expect("start a");
        let pair = Self { a, b, ga, gb, proxy, shutdown };
        pair.wait_up().await;
        let (ta, tb) = (pair.ta(), pair.tb());
        wait_until("both tunnel ports open", DEADLINE, || ta.stats().port_open && tb.stats().port_open).await;
        pair
    }

    fn la(&self) -> &LinkHandle {
        self.ga.link("site-b").expect("link a")
    }

    fn lb(&self) -> &LinkHandle {
        self.gb.link("site-a").expect("link b")
    }

    fn ta(&self) -> TunnelHandle {
        self.ga.tunnel("press").expect("tunnel a").clone()
    }

    fn tb(&self) -> TunnelHandle {
        self.gb.tunnel("press").expect("tunnel b").clone()
    }

    async fn wait_up(&self) {
        let (la, lb) = (self.la().clone(), self.lb().clone());
        wait_until("link up at both ends", DEADLINE, || la.stats().connected && lb.stats().connected).await;
    }

    async fn cut(&mut self) {
        self.proxy.kill();
        let (la, lb) = (self.la().clone(), self.lb().clone());
        wait_until("both ends notice the cut", DEADLINE, || !la.stats().connected && !lb.stats().connected)
            .await;
    }

    async fn restore(&mut self) {
        self.proxy.start().await;
        self.wait_up().await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.ga.shutdown(Duration::from_secs(3)).await;
        self.gb.shutdown(Duration::from_secs(3)).await;
    }
}

/// Reads exactly `n` bytes from `port`, or panics naming `what` after [`DEADLINE`]
/// with what arrived so far.
async fn read_n(port: &mut SerialStream, n: usize, what: &str) -> Vec<u8> {
    let mut got = vec![0u8; n];
    let mut have = 0;
    let end = tokio::time::Instant::now() + DEADLINE;
    while have < n {
        match tokio::time::timeout_at(end, port.read(&mut got[have..])).await {
            Ok(Ok(0)) => panic!("{what}: port closed after {have} of {n} bytes"),
            Ok(Ok(k)) => have += k,
            Ok(Err(e)) => panic!("{what}: read failed after {have} of {n} bytes: {e}"),
            Err(_) => panic!("{what}: only {have} of {n} bytes within {DEADLINE:?}"),
        }
    }
    got
}

/// Nothing more arrives on `port` within `wait` (the one fixed wait: proving absence).
async fn read_nothing(port: &mut SerialStream, wait: Duration, what: &str) {
    let mut buf = [0u8; 64];
    if let Ok(r) = tokio::time::timeout(wait, port.read(&mut buf)).await {
        panic!("{what}: unexpected bytes {r:?} {:?}", &buf[..r.as_ref().map_or(0, |n| *n)]);
    }
}

fn every_byte_value() -> Vec<u8> {
    (0..=255u8).chain((0..=255u8).rev()).collect()
}

fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random()).collect()
}

/// Writes `data` into `from` while reading the same number of bytes from `to`, so a
/// burst larger than the pty buffers cannot stall; returns what `to` received.
async fn carry(from: &mut SerialStream, to: &mut SerialStream, data: &[u8], what: &str) -> Vec<u8> {
    let write = async {
        from.write_all(data).await.expect("machine writes");
        from.flush().await.expect("flush");
    };
    let (_, got) = tokio::join!(write, read_n(to, data.len(), what));
    got
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
        panic!("{what}: {} bytes, want {}; first difference at byte {at}", got.len(), want.len());
    }
}

#[tokio::test]
async fn bytes_cross_both_ways_unchanged() {
    let mut p = Pair::start("baud = 9600\nsilence = \"2ms\"", "baud = 115200\nmax_packet = 64").await;
    let all = every_byte_value();
    let got = carry(&mut p.a.machine, &mut p.b.machine, &all, "a to b, every byte value").await;
    assert_same(&got, &all, "a to b, every byte value");
    let got = carry(&mut p.b.machine, &mut p.a.machine, &all, "b to a, every byte value").await;
    assert_same(&got, &all, "b to a, every byte value");

    // A 10 KB burst each way at the same time.
    let (ab, ba) = (noise(1, 10_000), noise(2, 10_000));
    let (ra, wa) = tokio::io::split(&mut p.a.machine);
    let (rb, wb) = tokio::io::split(&mut p.b.machine);
    async fn pump(
        mut w: tokio::io::WriteHalf<&mut SerialStream>,
        mut r: tokio::io::ReadHalf<&mut SerialStream>,
        data: &[u8],
        n: usize,
    ) -> Vec<u8> {
        let write = async {
            w.write_all(data).await.expect("machine writes");
        };
        let read = async {
            let mut got = Vec::with_capacity(n);
            let mut buf = [0u8; 4096];
            let end = tokio::time::Instant::now() + DEADLINE;
            while got.len() < n {
                match tokio::time::timeout_at(end, r.read(&mut buf)).await {
                    Ok(Ok(k)) if k > 0 => got.extend_from_slice(&buf[..k]),
                    other => panic!("burst: {} of {n} bytes, then {other:?}", got.len()),
                }
            }
            got
        };
        tokio::join!(write, read).1
    }
    let (at_a, at_b) = tokio::join!(pump(wa, ra, &ab, ba.len()), pump(wb, rb, &ba, ab.len()));
    assert_same(&at_b, &ab, "10 KB burst a to b");
    assert_same(&at_a, &ba, "10 KB burst b to a");

    let (sa, sb) = (p.ta().stats(), p.tb().stats());
    let total = (all.len() + ab.len()) as u64;
    assert_eq!((sa.bytes_out, sa.bytes_in), (total, total), "{sa:?}");
    assert_eq!((sb.bytes_out, sb.bytes_in), (total, total), "{sb:?}");
    assert_eq!((sa.dropped_out, sa.dropped_in, sb.dropped_out, sb.dropped_in), (0, 0, 0, 0));
    // b cuts at 64 bytes: at least 10 000 / 64 packets of its burst.
    assert!(sb.packets_out >= 10_000 / 64, "{sb:?}");
    assert!(sa.packets_out >= 2, "{sa:?}");
    p.stop().await;
}

#[tokio::test]
async fn buffer_policy_carries_bytes_written_during_a_cut_after_restore() {
    let policy = "on_link_down = \"buffer\"\nbuffer_max = \"16KiB\"";
    let mut p = Pair::start(policy, policy).await;
    let hello = b"before the cut".to_vec();
    let got = carry(&mut p.a.machine, &mut p.b.machine, &hello, "before the cut").await;
    assert_same(&got, &hello, "before the cut");

    p.cut().await;
    let (ta, tb) = (p.ta(), p.tb());
    let (ab, ba) = (noise(3, 5000), noise(4, 3000));
    // Written in several pieces, as a machine talking on would.
    for chunk in ab.chunks(700) {
        p.a.machine.write_all(chunk).await.expect("write a");
    }
    p.b.machine.write_all(&ba).await.expect("write b");
    wait_until("a buffers what its machine wrote", DEADLINE, || ta.stats().buffered == ab.len() as u64).await;
    wait_until("b buffers what its machine wrote", DEADLINE, || tb.stats().buffered == ba.len() as u64).await;
    read_nothing(&mut p.b.machine, Duration::from_millis(100), "b during the cut").await;

    p.restore().await;
    let got_b = read_n(&mut p.b.machine, ab.len(), "a's buffered bytes at b").await;
    assert_same(&got_b, &ab, "buffered a to b");
    let got_a = read_n(&mut p.a.machine, ba.len(), "b's buffered bytes at a").await;
    assert_same(&got_a, &ba, "buffered b to a");
    wait_until("buffers empty", DEADLINE, || ta.stats().buffered == 0 && tb.stats().buffered == 0).await;

    // And it goes on working.
    let after = every_byte_value();
    let got = carry(&mut p.b.machine, &mut p.a.machine, &after, "after the restore").await;
    assert_same(&got, &after, "after the restore");
    let (sa, sb) = (ta.stats(), tb.stats());
    assert_eq!((sa.dropped_out, sb.dropped_out), (0, 0), "{sa:?} {sb:?}");
    assert!(p.la().stats().sessions >= 2);
    p.stop().await;
}

#[tokio::test]
async fn buffer_policy_keeps_only_the_newest_bytes_within_its_bound() {
    let policy = "on_link_down = \"buffer\"\nbuffer_max = \"1KiB\"";
    let mut p = Pair::start(policy, policy).await;
    p.cut().await;
    let ta = p.ta();
    let data = noise(5, 3000);
    p.a.machine.write_all(&data).await.expect("write");
    wait_until("a read everything", DEADLINE, || {
        let s = ta.stats();
        s.buffered + s.dropped_out == data.len() as u64
    })
    .await;
    let s = ta.stats();
    assert_eq!((s.buffered, s.dropped_out), (1024, 3000 - 1024), "{s:?}");
    p.restore().await;
    let got = read_n(&mut p.b.machine, 1024, "the newest 1 KiB").await;
    assert_same(&got, &data[3000 - 1024..], "the newest 1 KiB");
    read_nothing(&mut p.b.machine, Duration::from_millis(100), "nothing more").await;
    p.stop().await;
}

#[tokio::test]
async fn drop_policy_drops_and_counts_during_a_cut_then_works_again() {
    let mut p = Pair::start("on_link_down = \"drop\"", "").await;
    p.cut().await;
    let (ta, tb) = (p.ta(), p.tb());
    let (ab, ba) = (noise(6, 2000), noise(7, 500));
    p.a.machine.write_all(&ab).await.expect("write a");
    p.b.machine.write_all(&ba).await.expect("write b");
    wait_until("a drops and counts", DEADLINE, || ta.stats().dropped_out == ab.len() as u64).await;
    wait_until("b drops and counts (drop is the default)", DEADLINE, || {
        tb.stats().dropped_out == ba.len() as u64
    })
    .await;
    assert_eq!((ta.stats().buffered, tb.stats().buffered), (0, 0));

    p.restore().await;
    let fresh = b"after the restore \x00\xff\r\n".to_vec();
    let got = carry(&mut p.a.machine, &mut p.b.machine, &fresh, "a to b after the restore").await;
    assert_same(&got, &fresh, "only the fresh bytes arrive, none of the dropped ones");
    let got = carry(&mut p.b.machine, &mut p.a.machine, &fresh, "b to a after the restore").await;
    assert_same(&got, &fresh, "only the fresh bytes arrive at a");
    read_nothing(&mut p.b.machine, Duration::from_millis(100), "nothing more at b").await;
    assert_eq!(ta.stats().bytes_out, fresh.len() as u64);
    p.stop().await;
}

#[test]
fn tunnel_config_resolves_defaults() {
    let text = r#"
[gateway]
name = "site-a"

[link]
identity = "id"
data_dir = "data"

[[peer]]
name = "site-b"
fingerprint = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
dial = "10.0.0.2:7700"

[[tunnel]]
name = "t1"
peer = "site-b"
port = "/dev/ttyUSB1"

[[tunnel]]
name = "t2"
peer = "site-b"
port = "tcp://10.0.0.9:4001"
baud = 38400
parity = "even"
silence = "20ms"
max_packet = 1024
on_link_down = "buffer"
"#;
    let model = config::parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    let tunnels = &model.links.expect("links").tunnels;
    let [t1, t2] = &tunnels[..] else { panic!("two tunnels") };
    assert_eq!((t1.line.baud, t1.line.data_bits, t1.line.stop_bits), (9600, 8, 1));
    assert_eq!(t1.line.parity, m2m_gateway::model::Parity::None);
    // 3.5 characters of 10 bits at 9600 baud.
    assert_eq!(t1.silence, Duration::from_nanos(10 * 1_000_000_000 / 9600 * 7 / 2));
    assert_eq!(t1.max_packet, 256);
    assert_eq!(t1.on_link_down, OnLinkDown::Drop);
    assert_eq!(t1.reopen_max, Duration::from_secs(30));
    assert_eq!(t2.silence, Duration::from_millis(20));
    assert_eq!(t2.max_packet, 1024);
    assert_eq!(t2.on_link_down, OnLinkDown::Buffer { max_bytes: 64 * 1024 });
    assert_eq!(t2.port, "tcp://10.0.0.9:4001");
}

#[tokio::test]
async fn a_replugged_port_is_reopened_and_the_tunnel_carries_on() {
    let mut p = Pair::start("", "").await;
    let ta = p.ta();
    let first = b"before".to_vec();
    let got = carry(&mut p.a.machine, &mut p.b.machine, &first, "before the replug").await;
    assert_same(&got, &first, "before the replug");
    p.a.replug().await;
    wait_until("a reopens its port", DEADLINE, || ta.stats().opens == 2 && ta.stats().port_open).await;
    let all = every_byte_value();
    let got = carry(&mut p.a.machine, &mut p.b.machine, &all, "a to b after the replug").await;
    assert_same(&got, &all, "a to b after the replug");
    let got = carry(&mut p.b.machine, &mut p.a.machine, &all, "b to a after the replug").await;
    assert_same(&got, &all, "b to a after the replug");
    assert_eq!(p.la().stats().sessions, 1, "the link never noticed");
    p.stop().await;
}
