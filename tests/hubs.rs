//! Hubs between real processes: three `m2m-gateway run` children on 127.0.0.1 wired in a
//! ring, site-a -> hub-b -> site-c -> site-a, with keys made by `m2m-gateway keygen`.
//! site-a polls an `m2m-gateway simulate` child and sends its point to hub-b; hub-b
//! relays the points received from site-a to site-c (`site-a/*`) and also has a rule
//! naming every received point (`*/*`) towards site-a itself; site-c names every
//! received point (`*/*`) towards site-a, closing a ring that no single configuration
//! can see. site-c serves the relayed point on a virtual Modbus-TCP unit.
//!
//! site-c starts without `accept_relayed` for hub-b: hub-b may relay nothing to it, so
//! site-a's values are refused there (never stored nor served; counted and logged with
//! the key to change). A reload adding `accept_relayed = ["site-a"]` lets them in; at the
//! end a reload taking it away again turns the relayed point `comm_fail`.
//!
//! What must hold: site-c has `site-a/dev.x` (not `hub-b/site-a/dev.x`) with site-a's
//! sample time and quality, readable over Modbus-TCP; neither hub-b nor site-c ever
//! sends site-a's value back to site-a (their loop counters rise instead, again when
//! the value changes), so site-a never stores a copy of its own point; a cut of site-a
//! reaches site-c as comm_fail through the hub. Each gateway's HTTP API and /metrics
//! are read with a plain HTTP/1.0 client.
//!
//! Every wait has a deadline; every child is killed when the test ends, pass or fail.

use std::net::SocketAddr;

use crate::common;

use common::blocking::{http_get, read_words, wait_for};
use common::procs::{Proc, bound, keygen, path, write};

/// A point as `GET /api/v1/points/NAME` shows it (`None`: no value yet).
fn point(addr: SocketAddr, name: &str) -> Option<serde_json::Value> {
    let name = name.replace('/', "%2F");
    serde_json::from_str(&http_get(addr, &format!("/api/v1/points/{name}"))?).ok()
}

/// Every point name the gateway's image holds.
fn names(addr: SocketAddr) -> Vec<String> {
    let body = http_get(addr, "/api/v1/points").expect("points");
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).expect("points json");
    list.iter().map(|p| p["name"].as_str().expect("name").to_string()).collect()
}

/// The value of one sample line of /metrics (0 when absent).
fn metric(addr: SocketAddr, series: &str) -> f64 {
    let text = http_get(addr, "/metrics").expect("metrics");
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

/// The `[link]`, `[http]` and `[gateway]` sections every gateway of the ring has.
fn head(name: &str, listen: u16, http: u16) -> String {
    format!(
        "[gateway]\nname = \"{name}\"\n\n[link]\nidentity = \"{name}-id\"\ndata_dir = \"{name}-data\"\n\
         listen = \"127.0.0.1:{listen}\"\nallow = [\"127.0.0.1\"]\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n"
    )
}

/// A `[[peer]]` (dialing `dial` when given), with its send rules.
fn peer(name: &str, fp: &str, dial: Option<u16>, send: &[&str]) -> String {
    relaying_peer(name, fp, dial, send, None)
}

/// A `[[peer]]` as [`peer`] makes it, with `accept_relayed = <accept>` when given.
fn relaying_peer(name: &str, fp: &str, dial: Option<u16>, send: &[&str], accept: Option<&str>) -> String {
    let mut s = format!(
        "[[peer]]\nname = \"{name}\"\nfingerprint = \"{fp}\"\nheartbeat = \"300ms\"\nreconnect_max = \"500ms\"\n"
    );
    if let Some(origins) = accept {
        s += &format!("accept_relayed = {origins}\n");
    }
    if let Some(port) = dial {
        s += &format!("dial = \"127.0.0.1:{port}\"\n");
    }
    for points in send {
        s += &format!("\n[[peer.send]]\npoints = {points}\n");
    }
    s + "\n"
}

#[test]
fn a_hub_relays_with_origin_time_and_quality_and_a_ring_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let (fa, fb, fc) =
        (keygen(&root.join("site-a-id")), keygen(&root.join("hub-b-id")), keygen(&root.join("site-c-id")));
    let sim_cfg = write(
        &root.join("sim.toml"),
        "[[unit]]\nunit = 1\n\n[[unit.register]]\ntable = \"holding\"\naddress = 0\nvalues = [1234]\n",
    );
    let mut sim = Proc::spawn("simulate", &["simulate", "-c", path(&sim_cfg)], "warn");
    let tty = sim.wait_out("the virtual port path", |l| l.first().cloned());
    let [(sa, la), (sb, lb), (sc, lc), (sha, ha), (shb, hb), (shc, hc), (ss, server)] =
        std::array::from_fn(|_| bound());
    let addr = |port: u16| -> SocketAddr { format!("127.0.0.1:{port}").parse().expect("addr") };
    let (http_a, http_b, http_c) = (addr(ha), addr(hb), addr(hc));

    // site-a polls once a minute: the sample time it sent stays its image's time.
    let a_cfg = format!(
        "{}{}{}[[bus]]\nname = \"line\"\nport = \"{tty}\"\nbaud = 115200\nparity = \"none\"\nstop_bits = 2\n\n\
         [[device]]\nname = \"dev\"\nbus = \"line\"\nunit = 1\ninterval = \"60s\"\ntimeout = \"300ms\"\n\n\
         [[device.point]]\nname = \"x\"\ntable = \"holding\"\naddress = 0\n",
        head("site-a", la, ha),
        peer("hub-b", &fb, Some(lb), &["[\"dev.*\"]"]),
        peer("site-c", &fc, None, &[]),
    );
    // hub-b: relays site-a's points to site-c, and names every received point towards
    // site-a too (a config check cannot refuse `*/*`: the run-time path does).
    let b_cfg = format!(
        "{}{}{}",
        head("hub-b", lb, hb),
        peer("site-a", &fa, None, &["[\"*/*\"]"]),
        peer("site-c", &fc, Some(lc), &["[\"site-a/*\"]"]),
    );
    // site-c: closes the ring towards site-a and serves the relayed point; it accepts
    // from hub-b the relayed origins `accept` lists (none without it).
    let c_text = |accept: Option<&str>| {
        format!(
            "{}{}{}[server]\nlisten = \"127.0.0.1:{server}\"\n\n[[server.unit]]\nunit = 10\n\n\
             [[server.unit.map]]\npoints = \"site-a/dev.x\"\ntable = \"holding\"\naddress = 0\ntype = \"u16\"\n",
            head("site-c", lc, hc),
            relaying_peer("hub-b", &fb, None, &[], accept),
            peer("site-a", &fa, Some(la), &["[\"*/*\"]"]),
        )
    };
    let cfg = |name: &str, text: &str| write(&root.join(format!("{name}.toml")), text);
    let (a_cfg, b_cfg, c_cfg) = (cfg("a", &a_cfg), cfg("b", &b_cfg), cfg("c", &c_text(None)));
    let run = |name: &'static str, cfg: &std::path::Path, sockets: &[&std::net::TcpListener]| {
        Proc::spawn_on(name, &["run", "-c", path(cfg)], "info", &[], sockets)
    };
    let mut c = run("site-c", &c_cfg, &[&sc, &shc, &ss]);
    let mut b = run("hub-b", &b_cfg, &[&sb, &shb]);
    let mut a = run("site-a", &a_cfg, &[&sa, &sha]);

    // hub-b may relay nothing to site-c yet: site-a's values are refused there, counted,
    // logged with the key to change, and never stored or served.
    let untrusted =
        |at: SocketAddr| metric(at, r#"m2m_gateway_peer_relayed_refused_values_total{peer="hub-b"}"#);
    wait_for("site-c refusing site-a's values relayed by hub-b", || (untrusted(http_c) >= 1.0).then_some(()));
    const REFUSED_LINE: &str = "peer hub-b relayed values of site-a, which its accept_relayed does not list: \
                                refused (add \"site-a\" to accept_relayed of [[peer]] hub-b to accept them)";
    c.wait_err("the refusal logged", |l| {
        l.iter().find(|l| l.contains(REFUSED_LINE) && l.contains("ERROR")).cloned()
    });
    assert!(point(http_c, "site-a/dev.x").is_none(), "a refused value is never stored");
    assert!(!names(http_c).iter().any(|n| n.starts_with("site-a/")), "{:?}", names(http_c));
    assert_eq!(read_words(addr(server), 10, 3, 0, 1), Err(0x0B), "nor served (never received)");
    let peers: serde_json::Value =
        serde_json::from_str(&http_get(http_c, "/api/v1/peers").expect("peers")).expect("peers json");
    let hub = peers.as_array().and_then(|l| l.iter().find(|p| p["name"] == "hub-b")).expect("hub-b");
    assert!(hub["relayed_refused"].as_u64() >= Some(1), "{hub}");
    // The operator lists site-a for hub-b and reloads: hub-b reconnects and re-sends.
    let reloads = |c: &mut Proc, n: usize| {
        c.wait_err("the reload", |l| {
            (l.iter().filter(|l| l.contains("reload done")).count() >= n).then_some(())
        })
    };
    write(&c_cfg, &c_text(Some("[\"site-a\"]")));
    c.signal("HUP");
    reloads(&mut c, 1);

    // site-c has site-a's point under its origin's name, site-a's time, good.
    let at_c = wait_for("site-a/dev.x good at site-c", || {
        point(http_c, "site-a/dev.x").filter(|p| p["quality"] == "good" && !p["value"].is_null())
    });
    let at_a = point(http_a, "dev.x").expect("dev.x at site-a");
    assert_eq!(at_c["value"], at_a["value"], "{at_c} / {at_a}");
    assert_eq!(at_c["at"], at_a["at"], "site-a's sample time, not a receive time: {at_c} / {at_a}");
    assert_eq!(at_c["origin"], "peer site-a via hub-b");
    let at_b = point(http_b, "site-a/dev.x").expect("site-a/dev.x at hub-b");
    assert_eq!((&at_b["at"], &at_b["origin"]), (&at_a["at"], &serde_json::json!("peer site-a")));
    assert!(
        !names(http_c).iter().any(|n| n.starts_with("hub-b/")),
        "never stored as hub-b/...: {:?}",
        names(http_c)
    );
    // A SCADA at site-c reads it from the virtual unit.
    let words = wait_for("the relayed value over Modbus-TCP", || read_words(addr(server), 10, 3, 0, 1).ok());
    assert_eq!(words, [1234]);
    assert!(metric(http_b, r#"m2m_gateway_peer_relayed_values_total{peer="site-c"}"#) >= 1.0);

    // Never back towards the origin: hub-b (asked by `*/*`) and site-c (the ring) refuse.
    let refused = |at: SocketAddr| metric(at, r#"m2m_gateway_peer_loop_refused_values_total{peer="site-a"}"#);
    wait_for("hub-b's and site-c's loop refusals", || {
        (refused(http_b) >= 1.0 && refused(http_c) >= 1.0).then_some(())
    });
    let c_before = refused(http_c);
    assert_eq!(metric(http_b, r#"m2m_gateway_peer_relayed_values_total{peer="site-a"}"#), 0.0);
    assert_eq!(metric(http_c, r#"m2m_gateway_peer_relayed_values_total{peer="site-a"}"#), 0.0);

    // site-a goes away: hub-b marks its point comm_fail and relays that; the ring is cut
    // again for the new sample (the counter rises).
    a.kill9();
    let failed = wait_for("comm_fail at site-c through the hub", || {
        point(http_c, "site-a/dev.x").filter(|p| p["quality"] == "comm_fail")
    });
    assert_eq!(failed["value"], at_a["value"], "the last value is kept");
    wait_for("site-c's loop counter to rise", || (refused(http_c) > c_before).then_some(()));

    // site-a back: good again at site-c; site-a never stored a copy of its own point.
    let mut a = run("site-a", &a_cfg, &[&sa, &sha]);
    wait_for("good again at site-c", || point(http_c, "site-a/dev.x").filter(|p| p["quality"] == "good"));
    wait_for("site-a's http api", || http_get(http_a, "/api/v1/points"));
    let at_a_names = names(http_a);
    assert_eq!(at_a_names, ["dev.x"], "site-a holds only its own point, never a relayed copy");
    assert_eq!(
        metric(http_a, r#"m2m_gateway_peer_loop_refused_values_total{peer="site-c"}"#),
        0.0,
        "nothing came back"
    );
    let logs = b.stderr().join("\n") + &c.stderr().join("\n");
    assert!(logs.contains("not relaying site-a/dev.x to site-a"), "the refusal is logged:\n{logs}");

    // hub-b may no longer relay site-a's values: the one it relayed turns comm_fail at
    // site-c, and what hub-b re-sends is refused again.
    let refused_before = untrusted(http_c);
    write(&c_cfg, &c_text(Some("[\"line-*\"]")));
    c.signal("HUP");
    reloads(&mut c, 2);
    wait_for("site-a/dev.x comm_fail at site-c after the reload", || {
        point(http_c, "site-a/dev.x").filter(|p| p["quality"] == "comm_fail")
    });
    wait_for("hub-b's re-sent values refused", || {
        http_get(http_c, "/metrics")?;
        (untrusted(http_c) > refused_before).then_some(())
    });
    assert_eq!(point(http_c, "site-a/dev.x").expect("kept")["quality"], "comm_fail", "never good again");
    c.wait_err("the refusal logged again by the new link", |l| {
        (l.iter().filter(|l| l.contains(REFUSED_LINE)).count() >= 2).then_some(())
    });
    eprintln!(
        "relayed to site-c: {}; loops refused: hub-b {}, site-c {}; relayed refused at site-c: {}",
        metric(http_b, r#"m2m_gateway_peer_relayed_values_total{peer="site-c"}"#),
        refused(http_b),
        refused(http_c),
        untrusted(http_c),
    );
    for p in [&mut a, &mut b, &mut c] {
        p.terminate();
    }
    drop(sim);
}
