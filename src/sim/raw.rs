//! Raw serial devices in the simulator (`[[raw]]` in a simulation file): devices that
//! answer a configured request with a templated reply (a scale: `W\r\n` →
//! `ST,GS,+0012.50kg\r\n` with a moving weight), or talk by themselves every period (an
//! NMEA receiver, a continuously printing scale).
//!
//! ```toml
//! [[raw]]
//! name = "scale"
//! request = "W\r\n"          # answer this exact request (escapes \r \n \t \0 \\ \xHH) ...
//! request_prefix = "SP"      # ... or any request starting with this (one of the two), or
//! period = "200ms"           # ... talk by itself this often (no request)
//! reply = "ST,GS,{value:+08.2}kg\r\n"  # reply template ({value} is the moving value) ...
//! reply_hex = "01 04 00 7B"  # ... or fixed binary bytes (one of the two)
//! min = 0.0                  # the moving value: a triangle wave from min to max and back
//! max = 100.0                #   (min = max: a constant), defaults 0 and 100
//! wave = "60s"               #   one cycle, default 60s
//! checksum = "xor"           # added to every reply, as in the gateway's [[raw_device]]
//! checksum_format = "hex"    # be | le | hex
//! checksum_skip = 1
//! checksum_gap = 1
//! checksum_trailer = 2
//! fault = "corrupt-checksum" # corrupt-checksum | partial (first half only) | silent
//! ```
//!
//! Requests are framed by line silence (t3.5 of `[line]`, 2 ms without), or at once when
//! the input is exactly a configured request. Replies are not paced to the wire time.
//!
//! Invariants: bad input never ends the serve loop and never panics; the input buffer is
//! capped at `INPUT_CAP` bytes; a configuration with problems reports every one of them.

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::point::value::Value;
use crate::serial::checksum::{CheckFormat, Checksum, ChecksumRule};
use crate::serial::raw;
use crate::sim::{INPUT_CAP, SimError};

/// `[[raw]]`: one simulated raw serial device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSimConfig {
    /// Name (for handles and messages).
    pub name: String,
    /// Exact request answered.
    #[serde(default)]
    pub request: Option<String>,
    /// Prefix of the requests answered.
    #[serde(default)]
    pub request_prefix: Option<String>,
    /// Talk by itself this often.
    #[serde(default, with = "crate::config::duration::serde_any::option")]
    pub period: Option<Duration>,
    /// Reply template with `{value...}` placeholders.
    #[serde(default)]
    pub reply: Option<String>,
    /// Fixed binary reply.
    #[serde(default)]
    pub reply_hex: Option<String>,
    /// Low end of the moving value.
    #[serde(default)]
    pub min: f64,
    /// High end of the moving value.
    #[serde(default = "default_max")]
    pub max: f64,
    /// One cycle of the moving value.
    #[serde(default = "default_wave", with = "crate::config::duration::serde_any")]
    pub wave: Duration,
    /// Checksum name (as the gateway's `checksum`).
    #[serde(default)]
    pub checksum: Option<String>,
    /// `be | le | hex`.
    #[serde(default)]
    pub checksum_format: Option<String>,
    /// Leading bytes not covered.
    #[serde(default)]
    pub checksum_skip: usize,
    /// Bytes between the covered bytes and the checksum.
    #[serde(default)]
    pub checksum_gap: usize,
    /// Bytes after the checksum.
    #[serde(default)]
    pub checksum_trailer: usize,
    /// Misbehaviour from the start.
    #[serde(default)]
    pub fault: Option<RawFault>,
}

fn default_max() -> f64 {
    100.0
}
fn default_wave() -> Duration {
    Duration::from_secs(60)
}

/// Misbehaviour of a simulated raw device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawFault {
    /// The last checksum byte of every reply is flipped.
    CorruptChecksum,
    /// Only the first half of every reply is sent.
    Partial,
    /// Nothing is sent.
    Silent,
}

impl FromStr for RawFault {
    type Err = SimError;

    fn from_str(s: &str) -> Result<Self, SimError> {
        match s.trim() {
            "corrupt-checksum" => Ok(RawFault::CorruptChecksum),
            "partial" => Ok(RawFault::Partial),
            "silent" => Ok(RawFault::Silent),
            _ => Err(SimError::Invalid {
                path: Default::default(),
                problems: vec![format!("bad raw fault {s:?}: expected corrupt-checksum | partial | silent")],
            }),
        }
    }
}

impl fmt::Display for RawFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RawFault::CorruptChecksum => "corrupt-checksum",
            RawFault::Partial => "partial",
            RawFault::Silent => "silent",
        })
    }
}

impl<'de> Deserialize<'de> for RawFault {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: SimError| serde::de::Error::custom(e.to_string()))
    }
}

/// Counters of one simulated raw device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawSimStats {
    /// Requests that matched this device.
    pub requests: u64,
    /// Frames sent (replies and spontaneous ones).
    pub sent: u64,
    /// The last request received.
    pub last_request: Vec<u8>,
}

#[derive(Debug, Clone)]
enum Reply {
    Template(String),
    Fixed(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Trigger {
    Exact(Vec<u8>),
    Prefix(Vec<u8>),
    Every(Duration),
}

#[derive(Debug, Clone)]
struct Device {
    name: String,
    trigger: Trigger,
    reply: Reply,
    min: f64,
    max: f64,
    wave: Duration,
    checksum: ChecksumRule,
}

#[derive(Debug, Default)]
struct DeviceState {
    fault: Option<RawFault>,
    stats: RawSimStats,
}

/// The simulated raw devices of one line.
#[derive(Debug)]
pub(crate) struct RawSim {
    devices: Vec<Device>,
    state: Mutex<Vec<DeviceState>>,
    epoch: Instant,
}

/// Every problem of the `[[raw]]` entries, one line each naming the entry.
pub(crate) fn check(configs: &[RawSimConfig]) -> Vec<String> {
    build(configs).1
}

fn build(configs: &[RawSimConfig]) -> (Vec<(Device, Option<RawFault>)>, Vec<String>) {
    let mut problems = Vec::new();
    let mut devices = Vec::new();
    for c in configs {
        let mut bad = |what: String| problems.push(format!("raw {:?}: {what}", c.name));
        let text =
            |s: &str, bad: &mut dyn FnMut(String)| raw::unescape(s).map_err(|e| bad(e.to_string())).ok();
        let trigger = match (&c.request, &c.request_prefix, c.period) {
            (Some(r), None, None) => text(r, &mut bad).map(Trigger::Exact),
            (None, Some(p), None) => text(p, &mut bad).map(Trigger::Prefix),
            (None, None, Some(p)) if !p.is_zero() => Some(Trigger::Every(p)),
            _ => {
                bad("give exactly one of request, request_prefix or a non-zero period".into());
                None
            }
        };
        let reply = match (&c.reply, &c.reply_hex) {
            (Some(t), None) => match raw::format_command(t, &Value::Float(c.min)) {
                Ok(_) => Some(Reply::Template(t.clone())),
                Err(e) => {
                    bad(format!("reply {e}"));
                    None
                }
            },
            (None, Some(h)) => {
                raw::parse_hex(h).map_err(|e| bad(format!("reply_hex {e}"))).ok().map(Reply::Fixed)
            }
            _ => {
                bad("give exactly one of reply or reply_hex".into());
                None
            }
        };
        let kind = c.checksum.as_deref().map_or(Ok(Checksum::None), str::parse::<Checksum>);
        let kind = kind.map_err(|e| bad(e.to_string())).unwrap_or_default();
        let format =
            c.checksum_format.as_deref().map_or(Ok(kind.default_format()), str::parse::<CheckFormat>);
        let format = format.map_err(|e| bad(e.to_string())).unwrap_or(CheckFormat::BigEndian);
        if !c.min.is_finite() || !c.max.is_finite() || c.wave.is_zero() {
            bad("min and max must be finite and wave longer than 0".into());
        }
        let checksum = ChecksumRule {
            kind,
            format,
            skip: c.checksum_skip,
            gap: c.checksum_gap,
            trailer: c.checksum_trailer,
        };
        if let (Some(trigger), Some(reply)) = (trigger, reply) {
            let device = Device {
                name: c.name.clone(),
                trigger,
                reply,
                min: c.min,
                max: c.max,
                wave: c.wave,
                checksum,
            };
            devices.push((device, c.fault));
        }
    }
    (devices, problems)
}

impl Device {
    /// The moving value at `t`: a triangle wave from min to max and back.
    fn value(&self, t: Duration) -> f64 {
        let phase = (t.as_secs_f64() / self.wave.as_secs_f64().max(1e-9)).fract();
        self.min + (self.max - self.min) * (1.0 - (2.0 * phase - 1.0).abs())
    }

    fn frame(&self, t: Duration, fault: Option<RawFault>) -> Vec<u8> {
        let mut bytes = match &self.reply {
            Reply::Template(tpl) => {
                raw::format_command(tpl, &Value::Float(self.value(t))).unwrap_or_default()
            }
            Reply::Fixed(b) => b.clone(),
        };
        self.checksum.apply(&mut bytes);
        match fault {
            Some(RawFault::CorruptChecksum) => {
                let at = bytes.len().saturating_sub(self.checksum.trailer + 1);
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= 0x01;
                }
            }
            Some(RawFault::Partial) => bytes.truncate(bytes.len() / 2),
            _ => {}
        }
        bytes
    }
}

impl RawSim {
    /// The simulated devices of `configs`; entries with problems are left out (use
    /// [`check`] to have them reported).
    pub(crate) fn new(configs: &[RawSimConfig]) -> Self {
        let (built, problems) = build(configs);
        for p in problems {
            tracing::warn!(problem = %p, "simulator raw entry skipped");
        }
        let state =
            built.iter().map(|(_, fault)| DeviceState { fault: *fault, ..Default::default() }).collect();
        RawSim {
            devices: built.into_iter().map(|(d, _)| d).collect(),
            state: Mutex::new(state),
            epoch: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<DeviceState>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn index(&self, name: &str) -> Result<usize, SimError> {
        self.devices.iter().position(|d| d.name == name).ok_or_else(|| SimError::Invalid {
            path: Default::default(),
            problems: vec![format!("raw device {name:?} is not simulated")],
        })
    }

    /// Sets (or clears, with `None`) the fault of the device `name`.
    pub(crate) fn set_fault(&self, name: &str, fault: Option<RawFault>) -> Result<(), SimError> {
        let i = self.index(name)?;
        if let Some(s) = self.lock().get_mut(i) {
            s.fault = fault;
        }
        Ok(())
    }

    /// The counters of the device `name`.
    pub(crate) fn stats(&self, name: &str) -> Option<RawSimStats> {
        let i = self.index(name).ok()?;
        self.lock().get(i).map(|s| s.stats.clone())
    }

    /// The frame device `i` sends now (`None`: silent), counted.
    fn outgoing(&self, i: usize, request: Option<&[u8]>) -> Option<Vec<u8>> {
        let t = self.epoch.elapsed();
        let mut st = self.lock();
        let s = st.get_mut(i)?;
        if let Some(r) = request {
            s.stats.requests += 1;
            s.stats.last_request = r.to_vec();
        }
        if s.fault == Some(RawFault::Silent) {
            return None;
        }
        s.stats.sent += 1;
        Some(self.devices.get(i)?.frame(t, s.fault))
    }

    /// The device answering `input`: exact matches first, then prefixes.
    fn responder(&self, input: &[u8], silent: bool) -> Option<usize> {
        let exact = self.devices.iter().position(|d| matches!(&d.trigger, Trigger::Exact(r) if r == input));
        exact.or_else(|| {
            silent
                .then(|| {
                    self.devices.iter().position(
                        |d| matches!(&d.trigger, Trigger::Prefix(p) if !p.is_empty() && input.starts_with(p)),
                    )
                })
                .flatten()
        })
    }

    /// Serves the line until `shutdown` or end of input. `silence` frames requests;
    /// `turnaround` is the think time before a reply.
    pub(crate) async fn serve<S>(
        &self,
        mut io: S,
        silence: Duration,
        turnaround: Duration,
        shutdown: CancellationToken,
    ) -> Result<(), SimError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let start = Instant::now();
        let mut talk_at: Vec<Option<Instant>> = self
            .devices
            .iter()
            .map(|d| match d.trigger {
                Trigger::Every(p) => Some(start + p),
                _ => None,
            })
            .collect();
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 256];
        loop {
            let next_talk = talk_at.iter().flatten().min().copied();
            let pending = !buf.is_empty();
            let read = async {
                if pending {
                    tokio::time::timeout(silence, io.read(&mut chunk)).await
                } else {
                    Ok(io.read(&mut chunk).await)
                }
            };
            let talk = async move {
                match next_talk {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let mut silent = false;
            tokio::select! {
                // Cancel-safety: `read` is cancel-safe, no accepted byte is lost.
                _ = shutdown.cancelled() => return Ok(()),
                () = talk => {
                    let now = Instant::now();
                    for (i, at) in talk_at.iter_mut().enumerate() {
                        let Some(due) = *at else { continue };
                        if due > now {
                            continue;
                        }
                        if let Trigger::Every(p) = self.devices[i].trigger {
                            *at = Some((due + p).max(now));
                        }
                        if let Some(bytes) = self.outgoing(i, None) {
                            write(&mut io, &bytes).await?;
                        }
                    }
                    continue;
                }
                r = read => match r {
                    Err(_elapsed) => silent = true,
                    Ok(Ok(0)) => return Ok(()),
                    Ok(Ok(n)) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if buf.len() > INPUT_CAP {
                            buf.drain(..buf.len() - INPUT_CAP);
                        }
                    }
                    Ok(Err(e)) => {
                        if super::read_failed(e, &shutdown).await? {
                            return Ok(());
                        }
                    }
                },
            }
            if buf.is_empty() {
                continue;
            }
            let Some(i) = self.responder(&buf, silent) else {
                if silent {
                    buf.clear(); // a request nobody answers
                }
                continue;
            };
            let request = std::mem::take(&mut buf);
            if let Some(bytes) = self.outgoing(i, Some(&request)) {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(turnaround) => {}
                }
                write(&mut io, &bytes).await?;
            }
        }
    }
}

async fn write<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> Result<(), SimError> {
    match io.write_all(bytes).await.and(io.flush().await) {
        Ok(()) => Ok(()),
        // Nobody holds the other side of the pty: the bytes are lost, as on a bare wire.
        Err(e) if e.raw_os_error() == Some(5) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Vec<RawSimConfig> {
        #[derive(Deserialize)]
        struct Wrap {
            raw: Vec<RawSimConfig>,
        }
        toml::from_str::<Wrap>(text).expect("parses").raw
    }

    #[test]
    fn nmea_frames_carry_a_correct_checksum() {
        let c = config(
            r#"
[[raw]]
name = "gps"
period = "100ms"
reply = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,{value:.1},M,46.9,M,,*\r\n"
min = 545.4
max = 545.4
checksum = "xor"
checksum_format = "hex"
checksum_skip = 1
checksum_gap = 1
checksum_trailer = 2
"#,
        );
        assert!(check(&c).is_empty());
        let sim = RawSim::new(&c);
        let frame = sim.devices[0].frame(Duration::ZERO, None);
        // The published GGA example sentence and its checksum.
        assert_eq!(frame, b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n");
        let bad = sim.devices[0].frame(Duration::ZERO, Some(RawFault::CorruptChecksum));
        assert_ne!(bad, frame);
        assert_eq!(bad.len(), frame.len());
        let part = sim.devices[0].frame(Duration::ZERO, Some(RawFault::Partial));
        assert_eq!(part, frame[..frame.len() / 2]);
    }

    #[test]
    fn moving_value_and_problems() {
        let c = config(
            r#"
[[raw]]
name = "scale"
request = "W\r\n"
reply = "ST,GS,{value:+08.2}kg\r\n"
min = 0
max = 10
wave = "10s"
"#,
        );
        let sim = RawSim::new(&c);
        let d = &sim.devices[0];
        assert_eq!(d.frame(Duration::from_millis(2500), None), b"ST,GS,+0005.00kg\r\n");
        assert_eq!(d.value(Duration::from_secs(5)), 10.0);
        assert_eq!(sim.responder(b"W\r\n", false), Some(0));
        assert_eq!(sim.responder(b"X\r\n", true), None);
        let bad = config(
            r#"
[[raw]]
name = "x"
period = "1s"
request = "W"
reply = "{nope}"
checksum = "crc99"
"#,
        );
        let problems = check(&bad);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.iter().all(|p| p.starts_with("raw \"x\": ")));
        assert!(problems[2].contains("crc16-modbus"), "{problems:?}");
    }
}
