//! Virtual units (`[[server.unit.map]]`): a unit id answered from a register map over
//! the image — local points and points received from peers — encoded exactly as a
//! `[[plc.map]]` encodes them (`plc::encode`).
//!
//! Reads (FC1-4) are answered at once from the image, never from a bus or the link:
//! - an address no target (nor the status block) covers answers 0x02;
//! - a point that is not good — stale, `comm_fail` (a received point while its link is
//!   down), an exception, or never received — answers 0x0B, unless the unit says
//!   `on_bad = "last"`: then its last value is served (a point with no value yet still
//!   answers 0x0B: there is nothing to serve);
//! - a value the target's type cannot hold (a received 70000 into a u16) answers 0x04,
//!   logged once per point until it fits again.
//!
//! The status block (input registers from `status`): +0 counts seconds since start
//! (wraps at 65535: a SCADA that sees it stand still knows the gateway is hung), +1 has
//! bit i set while the link to the i-th peer the map names is up, +2.. has bit (i % 16)
//! of register i / 16 set while target i (map order) is good.
//!
//! Writes (FC5, 6, 15, 16) must cover whole targets (a multi-register value is written
//! whole or not at all: else 0x02). Each target is written in address order:
//! - a received point goes over the link to its owner as a peer write; the owner's
//!   `[[peer.grant]]` decides. The master gets its normal answer only after the owner
//!   confirmed; a refusal answers 0x02 (point not writable) or 0x03 (value outside the
//!   granted range), logged with the owner's reason; link down, write lost with the
//!   link or no result in time answer 0x0B; owner busy 0x06; the owner's device write
//!   failing 0x04. Never queued across a lost link (the link refuses at once).
//! - a local point needs a `[[server.grant]]` covering its registers (else 0x02) and
//!   goes to its device through the writer, like a peer write.
//!
//! A write covering several targets is not atomic: they are written one after the
//! other, and the first failure answers its exception (the targets before it stay
//! written). Invariants: nothing here touches a bus or the link on a read; every request
//! gets exactly one answer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tokio_modbus::{ExceptionCode, Request, Response};
use tracing::{debug, info, warn};

use crate::image::Image;
use crate::point::registers::decode_registers;
use futures::future::BoxFuture;

use crate::model::{Encoded, MapTarget, OnBad, VirtualUnit, WriteGrant, encode};
use crate::point::value::{Quality, Table, Value};

/// Why the owner of a point did not write it (see [`Owners::write`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteFailure {
    /// The point may not be written (the owner's grants, or a read-only point): 0x02.
    #[error("{0}")]
    NotWritable(String),
    /// The value is outside what the owner grants or the point holds: 0x03.
    #[error("{0}")]
    BadValue(String),
    /// Too many writes waiting: 0x06.
    #[error("{0}")]
    Busy(String),
    /// Nothing carries the write to the owner (no such peer): 0x0A.
    #[error("{0}")]
    NoPath(String),
    /// The link is down, dropped with the write in flight, or no result came in time;
    /// or the local device did not answer: 0x0B.
    #[error("{0}")]
    Unavailable(String),
    /// The owner tried and its device write failed: 0x04.
    #[error("{0}")]
    Failed(String),
}

impl WriteFailure {
    fn exception(&self) -> ExceptionCode {
        match self {
            WriteFailure::NotWritable(_) => ExceptionCode::IllegalDataAddress,
            WriteFailure::BadValue(_) => ExceptionCode::IllegalDataValue,
            WriteFailure::Busy(_) => ExceptionCode::ServerDeviceBusy,
            WriteFailure::NoPath(_) => ExceptionCode::GatewayPathUnavailable,
            WriteFailure::Unavailable(_) => ExceptionCode::GatewayTargetDevice,
            WriteFailure::Failed(_) => ExceptionCode::ServerDeviceFailure,
        }
    }
}

/// How virtual units reach the owners of their points; the gateway wires it to the
/// local writer (`device.point`) and the peer links (`peer/device.point`).
pub trait Owners: Send + Sync {
    /// Writes `value` into `point` and resolves once the owner confirmed it.
    fn write(&self, point: &str, value: Value) -> BoxFuture<'static, Result<(), WriteFailure>>;
    /// True while the link to `peer` is up.
    fn link_up(&self, peer: &str) -> bool;
}

/// One running virtual unit.
pub(super) struct VUnit {
    config: VirtualUnit,
    /// Per table: first address -> target index.
    index: HashMap<Table, BTreeMap<u16, usize>>,
    /// The peers the map names (status bits, in this order).
    peers: Vec<String>,
    owners: Arc<dyn Owners>,
    grants: Vec<WriteGrant>,
    started: Instant,
    /// Points whose value does not fit their target (logged once until it fits).
    unfit: Mutex<HashSet<usize>>,
}

/// A value read for one target.
enum Read {
    Words(Vec<u16>),
    Bit(bool),
}

impl VUnit {
    pub(super) fn new(config: VirtualUnit, owners: Arc<dyn Owners>, grants: Vec<WriteGrant>) -> Self {
        let mut index: HashMap<Table, BTreeMap<u16, usize>> = HashMap::new();
        for (i, t) in config.targets.iter().enumerate() {
            index.entry(t.table).or_default().insert(t.address, i);
        }
        let peers = config.peers().iter().map(|p| p.to_string()).collect();
        Self { config, index, peers, owners, grants, started: Instant::now(), unfit: Mutex::default() }
    }

    /// True if the unit offers `function`: reads always, writes of whole coils and
    /// registers (FC5, 6, 15, 16) when some coil or holding target exists.
    pub(super) fn serves(&self, function: u8) -> bool {
        match function {
            1..=4 => true,
            5 | 15 => self.index.contains_key(&Table::Coils),
            6 | 16 => self.index.contains_key(&Table::Holding),
            _ => false,
        }
    }

    /// The target covering `address` of `table`, if any.
    fn at(&self, table: Table, address: u16) -> Option<(usize, &MapTarget)> {
        let (_, &i) = self.index.get(&table)?.range(..=address).next_back()?;
        let t = &self.config.targets[i];
        (u32::from(address) < u32::from(t.address) + u32::from(t.width())).then_some((i, t))
    }

    /// The status block register at `offset` (`None`: past the block).
    fn status_word(&self, image: &Image, offset: u16) -> Option<u16> {
        match offset {
            0 => Some(self.started.elapsed().as_secs() as u16),
            1 => Some(
                self.peers
                    .iter()
                    .take(16)
                    .enumerate()
                    .filter(|(_, p)| self.owners.link_up(p))
                    .fold(0u16, |acc, (i, _)| acc | (1 << i)),
            ),
            n if n < self.config.status_len() => {
                let first = usize::from(n - 2) * 16;
                let mut word = 0u16;
                for (bit, t) in self.config.targets.iter().skip(first).take(16).enumerate() {
                    if image.get(&t.point).is_some_and(|s| s.quality == Quality::Good && s.value.is_some()) {
                        word |= 1 << bit;
                    }
                }
                Some(word)
            }
            _ => None,
        }
    }

    /// The encoded value of target `i`, or the exception its read answers.
    fn read_target(&self, image: &Image, i: usize) -> Result<Read, ExceptionCode> {
        let t = &self.config.targets[i];
        let Some(sample) = image.get(&t.point) else {
            return Err(ExceptionCode::GatewayTargetDevice);
        };
        if sample.quality != Quality::Good && self.config.on_bad == OnBad::Exception {
            return Err(ExceptionCode::GatewayTargetDevice);
        }
        let Some(value) = sample.value else {
            return Err(ExceptionCode::GatewayTargetDevice);
        };
        let unfit = || self.unfit.lock().unwrap_or_else(|e| e.into_inner());
        match encode(t, &value) {
            Ok(e) => {
                if unfit().remove(&i) {
                    info!(unit = self.config.unit, point = %t.point, "the point's value fits its registers again");
                }
                Ok(match e {
                    Encoded::Bit(b) => Read::Bit(b),
                    Encoded::Words(w) => Read::Words(w),
                })
            }
            Err(e) => {
                if unfit().insert(i) {
                    warn!(unit = self.config.unit, point = %t.point, address = t.address, error = %e,
                        "value does not fit the virtual unit's register map; reads of it answer exception 0x04 (logged once until it fits)");
                }
                Err(ExceptionCode::ServerDeviceFailure)
            }
        }
    }

    /// Answers a read request.
    pub(super) fn read(&self, image: &Image, req: &Request<'_>) -> Result<Response, ExceptionCode> {
        let (table, start, count) = match req {
            Request::ReadCoils(a, q) => (Table::Coils, *a, *q),
            Request::ReadDiscreteInputs(a, q) => (Table::Discrete, *a, *q),
            Request::ReadHoldingRegisters(a, q) => (Table::Holding, *a, *q),
            Request::ReadInputRegisters(a, q) => (Table::Input, *a, *q),
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        let addresses =
            (u32::from(start)..u32::from(start) + u32::from(count)).filter_map(|a| u16::try_from(a).ok());
        if matches!(table, Table::Coils | Table::Discrete) {
            let mut bits = Vec::with_capacity(usize::from(count));
            for a in addresses {
                let (i, _) = self.at(table, a).ok_or(ExceptionCode::IllegalDataAddress)?;
                match self.read_target(image, i)? {
                    Read::Bit(b) => bits.push(b),
                    Read::Words(_) => return Err(ExceptionCode::ServerDeviceFailure),
                }
            }
            return Ok(if table == Table::Coils {
                Response::ReadCoils(bits)
            } else {
                Response::ReadDiscreteInputs(bits)
            });
        }
        // Check every address first: an unmapped one is 0x02 whatever the quality.
        let status = self.config.status.filter(|_| table == Table::Input);
        let in_status =
            |a: u16| status.and_then(|s| a.checked_sub(s)).filter(|o| *o < self.config.status_len());
        for a in addresses.clone() {
            if in_status(a).is_none() && self.at(table, a).is_none() {
                return Err(ExceptionCode::IllegalDataAddress);
            }
        }
        let mut words = Vec::with_capacity(usize::from(count));
        let mut cached: Option<(usize, Vec<u16>)> = None;
        for a in addresses {
            if let Some(offset) = in_status(a) {
                words.push(self.status_word(image, offset).unwrap_or(0));
                continue;
            }
            let Some((i, t)) = self.at(table, a) else {
                return Err(ExceptionCode::IllegalDataAddress);
            };
            if cached.as_ref().is_none_or(|(c, _)| *c != i) {
                let w = match self.read_target(image, i)? {
                    Read::Words(w) => w,
                    Read::Bit(b) => vec![u16::from(b)],
                };
                cached = Some((i, w));
            }
            let w = cached.as_ref().map(|(_, w)| w).ok_or(ExceptionCode::ServerDeviceFailure)?;
            words.push(w.get(usize::from(a - t.address)).copied().unwrap_or(0));
        }
        Ok(if table == Table::Holding {
            Response::ReadHoldingRegisters(words)
        } else {
            Response::ReadInputRegisters(words)
        })
    }

    /// The targets a write request covers, each with its decoded value, in address
    /// order; or the exception it answers at once (before anything is written).
    pub(super) fn plan_write(&self, req: &Request<'_>) -> Result<Vec<(usize, Value)>, ExceptionCode> {
        enum Data<'a> {
            Bits(&'a [bool]),
            Words(&'a [u16]),
        }
        let (table, start, data) = match req {
            Request::WriteSingleCoil(a, b) => (Table::Coils, *a, Data::Bits(std::slice::from_ref(b))),
            Request::WriteMultipleCoils(a, bits) => (Table::Coils, *a, Data::Bits(bits)),
            Request::WriteSingleRegister(a, w) => (Table::Holding, *a, Data::Words(std::slice::from_ref(w))),
            Request::WriteMultipleRegisters(a, w) => (Table::Holding, *a, Data::Words(w)),
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        let len = match &data {
            Data::Bits(b) => b.len(),
            Data::Words(w) => w.len(),
        };
        let mut out = Vec::new();
        let mut offset = 0usize;
        while offset < len {
            let address =
                u16::try_from(usize::from(start) + offset).map_err(|_| ExceptionCode::IllegalDataAddress)?;
            let Some((i, t)) = self.at(table, address).filter(|(_, t)| t.address == address) else {
                debug!(
                    unit = self.config.unit,
                    address, "write refused: not the first register of a mapped point"
                );
                return Err(ExceptionCode::IllegalDataAddress);
            };
            let width = usize::from(t.width());
            if offset + width > len {
                debug!(unit = self.config.unit, point = %t.point, "write refused: it covers part of a value only");
                return Err(ExceptionCode::IllegalDataAddress);
            }
            if t.received().is_none() {
                let granted = (address..=address + (t.width() - 1))
                    .all(|a| self.grants.iter().any(|g| g.covers(self.config.unit, table, a)));
                if !granted {
                    debug!(unit = self.config.unit, point = %t.point, "write refused: no [[server.grant]] covers it");
                    return Err(ExceptionCode::IllegalDataAddress);
                }
            }
            let value = match &data {
                Data::Bits(b) => Value::Bool(b[offset]),
                Data::Words(w) => {
                    decode_registers(t.data_type, t.order, t.scale, t.offset, &w[offset..offset + width])
                        .map_err(|_| ExceptionCode::IllegalDataValue)?
                }
            };
            out.push((i, value));
            offset += width;
        }
        Ok(out)
    }

    /// Carries out a planned write: each target in turn, stopping at the first failure.
    pub(super) async fn write(&self, planned: Vec<(usize, Value)>) -> Result<(), ExceptionCode> {
        let unit = self.config.unit;
        for (i, value) in planned {
            let t = &self.config.targets[i];
            if let Err(e) = self.owners.write(&t.point, value.clone()).await {
                warn!(unit, point = %t.point, %value, "write from a master not done: {e}");
                return Err(e.exception());
            }
            info!(unit, point = %t.point, %value, "write from a master done");
        }
        Ok(())
    }
}

/// The answer to a write request that succeeded.
pub(super) fn write_response(req: &Request<'_>) -> Option<Response> {
    Some(match req {
        Request::WriteSingleCoil(a, b) => Response::WriteSingleCoil(*a, *b),
        Request::WriteMultipleCoils(a, bits) => Response::WriteMultipleCoils(*a, bits.len() as u16),
        Request::WriteSingleRegister(a, w) => Response::WriteSingleRegister(*a, *w),
        Request::WriteMultipleRegisters(a, w) => Response::WriteMultipleRegisters(*a, w.len() as u16),
        _ => return None,
    })
}

/// Shared so a pending write outlives the request handler.
pub(super) type SharedVUnit = Arc<VUnit>;
