//! The virtual serial port the simulator usually runs on: a pseudo-terminal pair whose
//! slave side a gateway opens by path (optionally through a `/dev/serial/by-id`-like
//! symlink), which can vanish and come back to exercise reopen logic; and
//! [`run_virtual`], the whole of `m2m-gateway simulate`.
//!
//! Invariants: the slave side is held open for the life of the pair, so the master never
//! sees a hang-up before or between a gateway's opens; a symlink is only ever replaced
//! atomically (rename over it), so an opener never sees a half-made link.

use std::path::{Path, PathBuf};

use tokio::task::JoinHandle;
use tokio_serial::{SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;

use crate::sim::{SimError, Simulator};

/// A pseudo-terminal pair standing in for a serial port: the simulator talks on the
/// master side, the gateway opens [`VirtualPort::path`]. The slave side is kept open so
/// the master never sees a hang-up before (or between) the gateway's opens. Optionally a
/// symlink (a stand-in for `/dev/serial/by-id/...`) points at the slave. The port can
/// vanish (master closed, link removed) and come back (a new pair, the link re-pointed)
/// to exercise a gateway's reopen logic. Must be created inside a tokio runtime.
pub struct VirtualPort {
    master: Option<SerialStream>,
    slave: Option<SerialStream>,
    device: PathBuf,
    link: Option<PathBuf>,
    sim: Option<Simulator>,
    task: Option<(CancellationToken, JoinHandle<()>)>,
}

fn port_err(what: impl Into<String>, e: impl std::fmt::Display) -> SimError {
    SimError::Port { what: what.into(), message: e.to_string() }
}

fn open_pair() -> Result<(SerialStream, SerialStream, PathBuf), SimError> {
    let (master, slave) = SerialStream::pair().map_err(|e| port_err("pty pair", e))?;
    let device = slave.name().ok_or_else(|| port_err("pty pair", "slave side has no device path"))?;
    Ok((master, slave, PathBuf::from(device)))
}

/// Points `link` at `target`, replacing any old link atomically.
fn point_link(link: &Path, target: &Path) -> Result<(), SimError> {
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(".sim-tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let what = || format!("link {}", link.display());
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| port_err(what(), e))?;
    std::fs::rename(&tmp, link).map_err(|e| port_err(what(), e))
}

impl VirtualPort {
    /// A new pty pair.
    pub fn new() -> Result<Self, SimError> {
        let (master, slave, device) = open_pair()?;
        Ok(VirtualPort {
            master: Some(master),
            slave: Some(slave),
            device,
            link: None,
            sim: None,
            task: None,
        })
    }

    /// A new pty pair reachable through a symlink at `link` (replaced if it exists).
    pub fn with_link(link: impl Into<PathBuf>) -> Result<Self, SimError> {
        let mut port = Self::new()?;
        let link = link.into();
        point_link(&link, &port.device)?;
        port.link = Some(link);
        Ok(port)
    }

    /// The path a gateway opens: the link if there is one, else the pty device.
    pub fn path(&self) -> &Path {
        self.link.as_deref().unwrap_or(&self.device)
    }

    /// The pty slave device (`/dev/pts/N`) of the current pair.
    pub fn device_path(&self) -> &Path {
        &self.device
    }

    /// The master side, to serve it yourself (then `vanish` cannot close it for you).
    pub fn take_master(&mut self) -> Option<SerialStream> {
        self.master.take()
    }

    /// Serves `sim` on the master side in a background task; it is served again after
    /// [`VirtualPort::come_back`].
    pub fn run(&mut self, sim: Simulator) -> Result<(), SimError> {
        let master = self
            .master
            .take()
            .ok_or_else(|| port_err("run", "master side already taken or port vanished"))?;
        let token = CancellationToken::new();
        let task = tokio::spawn({
            let (sim, token) = (sim.clone(), token.clone());
            async move {
                if let Err(e) = sim.serve(master, token).await {
                    tracing::warn!(error = %e, "simulator stopped");
                }
            }
        });
        self.sim = Some(sim);
        self.task = Some((token, task));
        Ok(())
    }

    /// True between creation (or `come_back`) and `vanish`.
    pub fn is_present(&self) -> bool {
        self.slave.is_some()
    }

    /// Unplugs the port: stops serving, closes both pty sides (an open gateway side sees
    /// a hang-up) and removes the link.
    pub async fn vanish(&mut self) {
        if let Some((token, task)) = self.task.take() {
            token.cancel();
            let _ = task.await;
        }
        self.master = None;
        self.slave = None;
        if let Some(link) = &self.link {
            let _ = std::fs::remove_file(link);
        }
    }

    /// Plugs the port back in: a new pty pair (usually a different device), the link
    /// re-pointed at it, and the simulator given to `run` served on it again.
    pub fn come_back(&mut self) -> Result<(), SimError> {
        let (master, slave, device) = open_pair()?;
        if let Some(link) = &self.link {
            point_link(link, &device)?;
        }
        self.master = Some(master);
        self.slave = Some(slave);
        self.device = device;
        if let Some(sim) = self.sim.take() {
            self.run(sim)?;
        }
        Ok(())
    }
}

impl Drop for VirtualPort {
    fn drop(&mut self) {
        if let Some((token, _)) = &self.task {
            token.cancel();
        }
        if let Some(link) = &self.link {
            let _ = std::fs::remove_file(link);
        }
    }
}

/// Runs `sim` on a new virtual port (reachable through `link` if given) until
/// `shutdown`; `ready` is called once with the path a gateway should open. For
/// `m2m-gateway simulate`.
pub async fn run_virtual(
    sim: Simulator,
    link: Option<&Path>,
    shutdown: CancellationToken,
    ready: impl FnOnce(&Path),
) -> Result<(), SimError> {
    let mut port = match link {
        Some(l) => VirtualPort::with_link(l)?,
        None => VirtualPort::new()?,
    };
    port.run(sim)?;
    ready(port.path());
    shutdown.cancelled().await;
    port.vanish().await;
    Ok(())
}
