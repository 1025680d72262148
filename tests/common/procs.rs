//! Real `m2m-gateway` child processes for tests: spawn with collected stdout/stderr,
//! wait for a log line with a deadline, SIGTERM/SIGKILL, keys, ports and config files.
//! Every child is killed when its [`Proc`] drops, pass or fail.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_m2m-gateway");
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A child whose stdout and stderr lines are collected as they come.
pub struct Proc {
    pub name: &'static str,
    child: Child,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
}

pub fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            l.lock().expect("lock").push(line);
        }
    });
    lines
}

impl Proc {
    pub fn spawn(name: &'static str, args: &[&str], rust_log: &str) -> Self {
        Self::spawn_env(name, args, rust_log, &[])
    }

    /// As [`Proc::spawn`], with these extra environment variables.
    pub fn spawn_env(name: &'static str, args: &[&str], rust_log: &str, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", rust_log)
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn m2m-gateway");
        let out = collect(child.stdout.take().expect("stdout"));
        let err = collect(child.stderr.take().expect("stderr"));
        Proc { name, child, out, err }
    }

    pub fn stderr(&self) -> Vec<String> {
        self.err.lock().expect("lock").clone()
    }

    /// Waits until `cond` holds over the stderr lines so far; returns its result.
    pub fn wait_err<T>(&mut self, what: &str, cond: impl Fn(&[String]) -> Option<T>) -> T {
        wait_lines(self.name, &self.err, &mut self.child, what, cond)
    }

    /// Waits until `cond` holds over the stdout lines so far.
    pub fn wait_out<T>(&mut self, what: &str, cond: impl Fn(&[String]) -> Option<T>) -> T {
        wait_lines(self.name, &self.out, &mut self.child, what, cond)
    }

    /// SIGTERM, then waits for the exit (a clean shutdown).
    pub fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(ok.success(), "kill -TERM {pid}");
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "{} exited with {status} after SIGTERM", self.name);
                return;
            }
            assert!(Instant::now() < end, "{} still running {DEADLINE:?} after SIGTERM", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` (`HUP`, `TERM`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args([&format!("-{signal}"), &pid]).status().expect("run kill");
        assert!(ok.success(), "kill -{signal} {pid}");
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_lines<T>(
    name: &str,
    lines: &Mutex<Vec<String>>,
    child: &mut Child,
    what: &str,
    cond: impl Fn(&[String]) -> Option<T>,
) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(t) = cond(&lines.lock().expect("lock")) {
            return t;
        }
        if let Ok(Some(status)) = child.try_wait() {
            std::thread::sleep(Duration::from_millis(50));
            let text = lines.lock().expect("lock").join("\n");
            panic!("{name} exited ({status}) while waiting for {what}:\n{text}");
        }
        if Instant::now() > end {
            let text = lines.lock().expect("lock").join("\n");
            panic!("{name}: no {what} within {DEADLINE:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `m2m-gateway keygen --dir DIR`: the fingerprint it prints.
pub fn keygen(dir: &Path) -> String {
    let out = Command::new(BIN).arg("keygen").arg("--dir").arg(dir).output().expect("run keygen");
    assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
    let fp = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(fp.len(), 32 * 3 - 1, "a SHA-256 fingerprint as AA:BB:..: {fp:?}");
    fp
}

/// A free port on 127.0.0.1 (the config wants a fixed listen port; peers dial it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

pub fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).expect("write config");
    path.to_path_buf()
}

/// The value of ` key=` in a log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split([' ', ';']).next()
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
