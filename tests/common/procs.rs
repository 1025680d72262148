//! Real `m2m-gateway` child processes for tests: spawn with collected stdout/stderr,
//! wait for a log line with a deadline, SIGTERM/SIGKILL, keys, ports and config files.
//! Every child is killed when its [`Proc`] drops, pass or fail.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
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
    /// Lines of stdout and stderr already taken by [`Proc::next_out`] / [`Proc::next_err`].
    taken: [usize; 2],
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
        Self::spawn_on(name, args, rust_log, env, &[])
    }

    /// As [`Proc::spawn_env`], handing `sockets` over already bound, as systemd's socket
    /// activation does: the listeners stay open in the test, so a port is never released
    /// and bound again (no other test can take it), and a restarted child gets it again.
    pub fn spawn_on(
        name: &'static str,
        args: &[&str],
        rust_log: &str,
        env: &[(&str, &str)],
        sockets: &[&TcpListener],
    ) -> Self {
        let mut command = if sockets.is_empty() {
            Command::new(BIN)
        } else {
            // LISTEN_PID must be the gateway's own pid: the shell's, which exec keeps.
            let mut sh = Command::new("/bin/sh");
            sh.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", BIN]);
            hand_over(&mut sh, sockets);
            sh
        };
        command.args(args).envs(env.iter().copied()).env("RUST_LOG", rust_log);
        Self::command(name, command)
    }

    /// Spawns `command` as it is (any program, any arguments) with its output collected.
    pub fn command(name: &'static str, mut command: Command) -> Self {
        let mut child = command
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let out = collect(child.stdout.take().expect("stdout"));
        let err = collect(child.stderr.take().expect("stderr"));
        Proc { name, child, out, err, taken: [0, 0] }
    }

    /// The next stdout line, after those already taken, for which `pick` holds: lines
    /// are read in order, as a reader of the terminal would.
    pub fn next_out(&mut self, what: &str, pick: impl Fn(&str) -> bool) -> String {
        self.next(0, what, pick)
    }

    /// As [`Proc::next_out`], on stderr.
    pub fn next_err(&mut self, what: &str, pick: impl Fn(&str) -> bool) -> String {
        self.next(1, what, pick)
    }

    fn next(&mut self, stream: usize, what: &str, pick: impl Fn(&str) -> bool) -> String {
        let from = self.taken[stream];
        let lines = if stream == 0 { &self.out } else { &self.err };
        let (at, line) = wait_lines(self.name, lines, &mut self.child, what, |l| {
            let i = l.get(from..)?.iter().position(|l| pick(l))?;
            Some((from + i, l[from + i].clone()))
        });
        self.taken[stream] = at + 1;
        line
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

    /// Waits for the child to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < end, "{} still running after {DEADLINE:?}", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
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
            // Its last lines may still be on their way from the pipe.
            std::thread::sleep(Duration::from_millis(50));
            if let Some(t) = cond(&lines.lock().expect("lock")) {
                return t;
            }
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

/// Puts `sockets` at descriptors 3, 4, … of the child with `LISTEN_FDS` set: the
/// systemd socket activation protocol (`sd_listen_fds(3)`).
#[allow(unsafe_code)]
fn hand_over(command: &mut Command, sockets: &[&TcpListener]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    const MAX: usize = 8;
    assert!(sockets.len() <= MAX, "at most {MAX} sockets");
    let mut fds = [-1; MAX];
    for (fd, socket) in fds.iter_mut().zip(sockets) {
        *fd = socket.as_raw_fd();
    }
    let n = sockets.len();
    command.env("LISTEN_FDS", n.to_string()).env_remove("LISTEN_FDNAMES");
    // SAFETY: between fork and exec the closure only calls fcntl, dup2 and close, which
    // are async-signal-safe, on descriptors the parent keeps open, and allocates nothing.
    // Each socket is first moved above the target range, so no dup2 overwrites a socket
    // not yet moved; dup2 leaves the targets without close-on-exec.
    unsafe {
        command.pre_exec(move || {
            let mut high = [-1; MAX];
            for i in 0..n {
                high[i] = libc::fcntl(fds[i], libc::F_DUPFD_CLOEXEC, 64);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high.iter().enumerate().take(n) {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            Ok(())
        });
    }
}

/// A listening socket on a free port of 127.0.0.1, and its port: hand it to the child
/// that listens there with [`Proc::spawn_on`], and keep it for the test's whole life.
pub fn bound() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    (l, port)
}

/// `m2m-gateway keygen --dir DIR`: the fingerprint it prints.
pub fn keygen(dir: &Path) -> String {
    let out = Command::new(BIN).arg("keygen").arg("--dir").arg(dir).output().expect("run keygen");
    assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
    let fp = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(fp.len(), 32 * 3 - 1, "a SHA-256 fingerprint as AA:BB:..: {fp:?}");
    fp
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
