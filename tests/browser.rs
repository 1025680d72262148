//! The status page in a real browser: headless chromium driven over WebDriver
//! (chromedriver), against a gateway polling the project's simulator on a pty pair. The
//! page must show the live values, follow their changes, and show a device that stops
//! answering as failed, and the traffic monitor list the bus's frames with their verdicts.
//!
//! Without chromedriver the test is skipped with a message, unless `CI` is set: CI
//! installs chromium and chromium-driver (.ci/run), so there a missing driver fails.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common;
use common::{Rig, wait_until};
use fantoccini::{ClientBuilder, Locator};
use m2m_gateway::point::value::Table;
use m2m_gateway::sim::Fault;

const SIM: &str = r#"
[[unit]]
unit = 1
[[unit.register]]
table = "holding"
address = 0
values = [215]
[[unit]]
unit = 2
[[unit.register]]
table = "holding"
address = 0
values = [1400]
"#;

const GATEWAY: &str = r#"
[gateway]
name = "plant-a"

[[bus]]
name = "line1"
port = "{port}"
timeout = "100ms"
retries = 0

[[device]]
name = "boiler"
bus = "line1"
unit = 1
interval = "100ms"
point = [ { name = "temperature", table = "holding", address = 0, scale = 0.1, unit = "°C" } ]

[[device]]
name = "pump"
bus = "line1"
unit = 2
interval = "100ms"
point = [ { name = "speed", table = "holding", address = 0, unit = "rpm" } ]

[http]
listen = "127.0.0.1:0"

[link]
identity = "{dir}/id"
data_dir = "{dir}/data"

[[peer]]
name = "site-b"
fingerprint = "3F:A2:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:01:23:45:67:89:AB:CD:EF:10:32:54:76:98:9C"
dial = "127.0.0.1:1"
"#;

/// chromedriver on a free port, in its own process group with the browsers it starts;
/// the whole group is killed on drop, so a failing test leaves no browser behind.
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts chromedriver, or says why the test cannot run (`None`: skip).
fn driver() -> Option<Driver> {
    // Port 0: chromedriver binds a free port itself and says which.
    let child = Command::new("chromedriver")
        .arg("--port=0")
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(mut c) => {
            use std::io::BufRead;
            let mut out = std::io::BufReader::new(c.stdout.take().expect("stdout"));
            let mut said = Vec::new();
            let mut line = String::new();
            while out.read_line(&mut line).is_ok_and(|n| n > 0) {
                let port = line.trim_end().split("started successfully on port ").nth(1);
                if let Some(port) = port.and_then(|p| p.trim_end_matches('.').parse().ok()) {
                    // Its later lines are drained, so it never writes into a closed pipe.
                    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
                    return Some(Driver(c, port));
                }
                said.push(std::mem::take(&mut line));
            }
            panic!("chromedriver exited without saying its port: {said:?}");
        }
        Err(e) if std::env::var_os("CI").is_none() => {
            println!(
                "SKIPPED browser test: chromedriver not runnable ({e}); apt-get install chromium chromium-driver"
            );
            None
        }
        Err(e) => panic!("chromedriver is required in CI (apt-get install chromium chromium-driver): {e}"),
    }
}

/// The text of the first element matching `css`, or "" when there is none yet.
async fn text(browser: &fantoccini::Client, css: &str) -> String {
    match browser.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until the text at `css` satisfies `ok`; panics with the last text seen.
async fn wait_text(browser: &fantoccini::Client, css: &str, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let t = text(browser, css).await;
        if ok(&t) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "page never showed {what}: {css} reads {t:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_live_values_and_a_failed_device() {
    let Some(driver) = driver() else {
        return;
    };
    // A peer that never answers: the page shows it down, with its counters.
    let dir = tempfile::tempdir().expect("tempdir");
    m2m_gateway::link::tls::keygen(&dir.path().join("id"), false).expect("keygen");
    let rig = Rig::start(SIM, &GATEWAY.replace("{dir}", &dir.path().display().to_string()));
    let addr = rig.gateway().http_addr.expect("http endpoint");
    wait_until("the boiler polled", Duration::from_secs(10), || rig.value("boiler.temperature").is_some())
        .await;

    let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
        "goog:chromeOptions": {
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--window-size=800,900"],
        }
    }))
    .expect("capabilities");
    let url = format!("http://127.0.0.1:{}", driver.1);
    // chromedriver takes a moment to listen: retry the session until it does.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let browser = loop {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(b) => break b,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "no webdriver session: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let outcome = async {
        browser.goto(&format!("http://{addr}/")).await.expect("open the page");
        let temp = r#"tr[data-point="boiler.temperature"] .value"#;
        wait_text(&browser, temp, "the live temperature", |t| t == "21.5").await;
        wait_text(&browser, r#"tr[data-point="boiler.temperature"] .unit"#, "the unit", |t| t == "°C").await;
        wait_text(&browser, "#gw-name", "the gateway name", |t| t == "plant-a").await;
        wait_text(&browser, "#summary", "the counts", |t| {
            t.ends_with(" · 1 bus · 2 devices · 2 points · 1 peer")
        })
        .await;
        wait_text(&browser, r#"tr[data-peer="site-b"] .state"#, "the peer down", |t| t == "down").await;
        wait_text(&browser, r#"tr[data-peer="site-b"] .relay"#, "the relay counters", |t| {
            t == "0 relayed · 0 loops cut · 0 refused"
        })
        .await;
        wait_text(&browser, r#"[data-device="pump"] .state"#, "the pump up", |t| t == "up").await;

        // The value changes at the device: the page follows without a reload.
        rig.sim.set_register(1, Table::Holding, 0, 634).expect("set");
        wait_text(&browser, temp, "the new temperature", |t| t == "63.4").await;

        // The pump stops answering: the page shows it failed, its value's quality, and
        // the gateway degraded.
        rig.sim.set_fault(2, Fault::Silent).expect("fault");
        wait_text(&browser, r#"[data-device="pump"] .state"#, "the pump failed", |t| t == "failed").await;
        wait_text(&browser, r#"tr[data-point="pump.speed"] .quality"#, "comm fail", |t| t == "comm fail")
            .await;
        wait_text(&browser, "#health", "degraded health", |t| t.eq_ignore_ascii_case("degraded")).await;
        wait_text(&browser, "#problems", "the problem named", |t| t.contains("device pump")).await;

        // The traffic monitor: started on the bus, it lists the boiler's frames as ok and
        // the silent pump's requests as timeouts, newest first.
        browser
            .find(Locator::Css("#traffic-toggle"))
            .await
            .expect("start button")
            .click()
            .await
            .expect("start");
        wait_text(&browser, "#traffic-toggle", "the stop button", |t| t == "Stop").await;
        wait_text(
            &browser,
            r#"#traffic tr[data-verdict="ok"][data-dir="rx"] td:nth-child(4)"#,
            "an ok reply",
            |t| t.starts_with("unit 1 reply"),
        )
        .await;
        wait_text(&browser, r#"#traffic tr[data-verdict="sent"] td:nth-child(4)"#, "a request", |t| {
            t.starts_with("unit ") && t.contains(" read holding ")
        })
        .await;
        wait_text(&browser, r#"#traffic tr[data-verdict="timeout"] .verdict"#, "the pump's timeouts", |t| {
            t == "timeout"
        })
        .await;
        if let Ok(path) = std::env::var("M2M_SCREENSHOT") {
            let png = browser.screenshot().await.expect("screenshot");
            std::fs::write(path, png).expect("write screenshot");
        }
    }
    .await;
    let _ = browser.close().await;
    drop(driver);
    rig.stop().await;
    outcome
}
