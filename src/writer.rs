//! Writes a typed value into a local device point through the bus that owns its line:
//! the one place that turns "point = value" into a Modbus write request. Used by peer
//! writes, write-back, and (later) the local Modbus-TCP server.
//!
//! Invariants: a write goes to the bus queue at [`Priority::Write`] with the device's
//! timeout and the bus's retries, as one request (no read-modify-write: a `Bit(n)`
//! point is written with an FC22 mask write, so the other 15 bits are never clobbered
//! by a stale read); read-only tables and values that do not encode are refused before
//! anything reaches the line; every error names the point.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_modbus::Request;

use crate::bus::{BusError, BusHandle, Job, Priority};
use crate::model::{Model, Point};
use crate::point::registers::{self, CodecError};
use crate::point::value::{DataType, Table, Value};

/// Why a write did not happen.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum WriteError {
    /// No local point has this name.
    #[error("unknown point {0}")]
    UnknownPoint(String),
    /// The point lives in a table that cannot be written.
    #[error("point {point} is read-only ({table:?} table)")]
    ReadOnly {
        /// The point.
        point: String,
        /// Its table.
        table: Table,
    },
    /// The value does not fit the point's type.
    #[error("point {point}: {source}")]
    Encode {
        /// The point.
        point: String,
        /// Why.
        source: CodecError,
    },
    /// The bus did not carry the write out.
    #[error("point {point}: write failed: {source}")]
    Bus {
        /// The point.
        point: String,
        /// Why.
        source: BusError,
    },
    /// A raw device's command point refused or failed the write.
    #[error(transparent)]
    Command(#[from] crate::poll::raw::CommandError),
}

#[derive(Debug, Clone)]
struct Target {
    bus: BusHandle,
    unit: u8,
    timeout: Duration,
    turnaround: Duration,
    retries: u8,
    point: Point,
}

/// What a writer can address.
#[derive(Debug, Default)]
struct Targets {
    targets: HashMap<String, Target>,
    /// Command points of raw serial devices: a write becomes the configured command.
    commands: Option<Arc<crate::poll::raw::SerialDevices>>,
}

/// Writes local points by name. Cheap to clone; every clone shares one table, which a
/// reload replaces ([`Writer::replace`]) so that links and the server keep their writer.
#[derive(Debug, Clone, Default)]
pub struct Writer {
    table: Arc<std::sync::RwLock<Arc<Targets>>>,
}

impl Writer {
    /// A writer for every point of `model`; `buses` are the bus handles in model order
    /// (a bus without a handle has unwritable points: they are left out).
    pub fn new(model: &Model, buses: &[BusHandle]) -> Self {
        let mut targets = HashMap::new();
        // Matched by name: buses without a bus task (stream buses) have no handle.
        let handles =
            model.buses.iter().filter_map(|b| Some((b, buses.iter().find(|h| h.name() == b.name)?)));
        for (bus, handle) in handles {
            for dev in &bus.devices {
                for p in &dev.points {
                    targets.insert(
                        p.name.clone(),
                        Target {
                            bus: handle.clone(),
                            unit: dev.unit,
                            timeout: dev.timeout,
                            turnaround: dev.turnaround,
                            retries: bus.retries,
                            point: p.clone(),
                        },
                    );
                }
            }
        }
        Self::from(Targets { targets, commands: None })
    }

    fn from(targets: Targets) -> Self {
        Self { table: Arc::new(std::sync::RwLock::new(Arc::new(targets))) }
    }

    fn current(&self) -> Arc<Targets> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Also writes the command points of these raw serial devices.
    pub fn with_commands(self, serial: Arc<crate::poll::raw::SerialDevices>) -> Self {
        let targets = self.current();
        let targets = Targets {
            targets: targets.targets.iter().map(|(k, t)| (k.clone(), t.clone())).collect(),
            commands: Some(serial),
        };
        Self::from(targets)
    }

    /// Gives this writer (and every clone of it) the table of `other`: after a reload,
    /// writes go to the points, devices and buses of the new configuration.
    pub fn replace(&self, other: &Writer) {
        let table = other.current();
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table;
    }

    /// True when `point` is a local point (or command point) this writer can address.
    pub fn knows(&self, point: &str) -> bool {
        let t = self.current();
        t.targets.contains_key(point) || t.commands.as_ref().is_some_and(|s| s.commands().any(|c| c == point))
    }

    /// The Modbus request that writes `value` into `point` (nothing is sent).
    pub fn request(&self, point: &str, value: &Value) -> Result<Request<'static>, WriteError> {
        let table = self.current();
        let t = table.targets.get(point).ok_or_else(|| WriteError::UnknownPoint(point.to_string()))?;
        request_for(&t.point, value)
    }

    /// Writes `value` into `point` and waits until the device accepted it.
    pub async fn write(&self, point: &str, value: &Value) -> Result<(), WriteError> {
        let table = self.current();
        let Some(t) = table.targets.get(point) else {
            return match &table.commands {
                Some(serial) if serial.commands().any(|c| c == point) => {
                    serial.send_command(point, value).await.map(|_| ()).map_err(WriteError::from)
                }
                _ => Err(WriteError::UnknownPoint(point.to_string())),
            };
        };
        let request = request_for(&t.point, value)?;
        let bus_err = |source| WriteError::Bus { point: point.to_string(), source };
        let (reply, rx) = oneshot::channel();
        t.bus
            .submit(Job {
                unit: t.unit,
                request,
                priority: Priority::Write,
                timeout: t.timeout,
                turnaround: t.turnaround,
                retries: t.retries,
                reply,
            })
            .map_err(bus_err)?;
        rx.await.unwrap_or(Err(BusError::Closed)).map(|_| ()).map_err(bus_err)
    }
}

/// The one request that writes `value` into `p`.
fn request_for(p: &Point, value: &Value) -> Result<Request<'static>, WriteError> {
    let enc = |source| WriteError::Encode { point: p.name.clone(), source };
    match p.table {
        Table::Input | Table::Discrete => Err(WriteError::ReadOnly { point: p.name.clone(), table: p.table }),
        Table::Coils => {
            let words = registers::encode_registers(DataType::Bool, p.order, 1.0, 0.0, value).map_err(enc)?;
            Ok(Request::WriteSingleCoil(p.address, words.first().is_some_and(|w| *w != 0)))
        }
        Table::Holding => {
            if let DataType::Bit(n) = p.data_type {
                let on = match value {
                    Value::Bool(b) => *b,
                    Value::Int(0) | Value::UInt(0) => false,
                    Value::Int(1) | Value::UInt(1) => true,
                    _ => {
                        return Err(enc(CodecError::Kind {
                            value: value.to_string(),
                            data_type: p.data_type,
                        }));
                    }
                };
                let (and, or) = registers::bit_masks(n, on).map_err(enc)?;
                return Ok(Request::MaskWriteRegister(p.address, and, or));
            }
            let words =
                registers::encode_registers(p.data_type, p.order, p.scale, p.offset, value).map_err(enc)?;
            Ok(match words.as_slice() {
                [one] => Request::WriteSingleRegister(p.address, *one),
                _ => Request::WriteMultipleRegisters(p.address, words.into()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::value::WordOrder;

    fn point(table: Table, data_type: DataType) -> Point {
        Point {
            name: "dev.p".into(),
            table,
            address: 10,
            data_type,
            order: WordOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            interval: Duration::from_secs(1),
            stale_after: Duration::from_secs(3),
            unit: None,
        }
    }

    #[test]
    fn picks_the_function_code() {
        let r = |t, d, v: Value| request_for(&point(t, d), &v);
        assert_eq!(r(Table::Holding, DataType::U16, Value::UInt(7)), Ok(Request::WriteSingleRegister(10, 7)));
        assert_eq!(
            r(Table::Holding, DataType::U32, Value::UInt(0x0001_0002)),
            Ok(Request::WriteMultipleRegisters(10, vec![1, 2].into()))
        );
        assert_eq!(
            r(Table::Coils, DataType::Bool, Value::Bool(true)),
            Ok(Request::WriteSingleCoil(10, true))
        );
        assert_eq!(
            r(Table::Holding, DataType::Bit(3), Value::Bool(true)),
            Ok(Request::MaskWriteRegister(10, !0x0008, 0x0008))
        );
        assert_eq!(
            r(Table::Holding, DataType::Bit(3), Value::Bool(false)),
            Ok(Request::MaskWriteRegister(10, !0x0008, 0))
        );
    }

    #[test]
    fn refuses_what_cannot_be_written() {
        let r = |t, d, v: Value| request_for(&point(t, d), &v);
        assert!(matches!(r(Table::Input, DataType::U16, Value::UInt(1)), Err(WriteError::ReadOnly { .. })));
        assert!(matches!(
            r(Table::Discrete, DataType::Bool, Value::Bool(true)),
            Err(WriteError::ReadOnly { .. })
        ));
        let e = r(Table::Holding, DataType::Str(2), Value::Text("abc".into())).expect_err("too long");
        assert!(e.to_string().contains("dev.p"), "{e}");
        assert!(matches!(r(Table::Holding, DataType::U16, Value::Int(-1)), Err(WriteError::Encode { .. })));
        assert_eq!(
            Writer::default().request("x.y", &Value::Int(1)),
            Err(WriteError::UnknownPoint("x.y".into()))
        );
    }
}
