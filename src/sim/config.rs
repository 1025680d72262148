//! The simulator's configuration: the TOML format (`[line]`, `[[unit]]`,
//! `[[unit.register]]`), fault specs, loading with every problem reported at once, and
//! the simulations built in code (`quick` for the CLI, `from_bus`/`from_model` for demo).
//!
//! ```toml
//! [line]                 # optional: emulate wire timing; absent = reply at once
//! baud = 9600
//! parity = "even"        # none | even | odd            (default even)
//! data_bits = 8          # 7 | 8                        (default 8)
//! stop_bits = 1          # 1 | 2                        (default 1)
//! turnaround = "2ms"     # think time before a reply    (default 0)
//!
//! [[unit]]
//! unit = 1               # 1..=247
//! fault = "late 300ms"   # optional, see below
//!
//! [[unit.register]]      # fixed values, one per register / bit
//! table = "holding"      # coils | discrete | holding | input
//! address = 0            # zero-based
//! values = [1, 2, -3]    # registers: -32768..=65535; bits: 0/1 or false/true
//!
//! [[unit.register]]      # a fixed string, 2 bytes a register, high byte first
//! table = "input"
//! address = 100
//! text = "PUMP-7"
//!
//! [[unit.register]]      # generators
//! table = "input"
//! address = 10
//! kind = "sine"          # counter | ramp | sine | random-walk | toggle
//! type = "f32"           # u16 i16 u32 i32 u64 i64 f32 f64 (default u16; not on bit tables)
//! order = "abcd"         # abcd | cdab | badc | dcba (default abcd)
//! min = 0.0              # default 0
//! max = 100.0            # default: type max (counter), 1 (toggle), 100 (others)
//! period = "60s"         # counter/toggle: per step (default 1s); ramp/sine: per cycle (60s)
//! step = 1.0             # counter increment / largest random-walk move per read (default 1)
//! count = 1              # this many generators at consecutive addresses (default 1)
//! ```
//!
//! `protocol = "ascii"` (top level) frames the units' messages as Modbus ASCII instead of
//! RTU; `[[raw]]` entries simulate raw serial devices instead of units (see `sim/raw.rs`).
//!
//! Bit tables take `values` or `kind = "toggle"`. Faults: `silent`, `late <duration>`,
//! `queued <duration>`, `corrupt-crc`, `wrong-unit <id>`, `noise <bytes>`,
//! `exception <code>`, `drop-every <n>`, `drop-byte <n>`.
//!
//! Invariants: raw serde types use `deny_unknown_fields`; a config that passed
//! [`SimConfig::validate`] compiles into register maps without any entry skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::model::{Bus, Line, Model, Parity};
use crate::point::value::{DataType, Table, WordOrder};
use crate::serial::framing::ModbusSerial;
use crate::sim::{SimError, build_units};

/// A simulation: the optional line timing and the simulated units.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Wire timing to emulate; `None` answers instantly.
    #[serde(default)]
    pub line: Option<LineConfig>,
    /// The simulated units (`[[unit]]`).
    #[serde(default, rename = "unit")]
    pub units: Vec<UnitConfig>,
    /// How the units frame their messages: `"rtu"` (default) or `"ascii"`.
    #[serde(default)]
    pub protocol: ModbusSerial,
    /// Raw serial devices (`[[raw]]`, see `sim/raw.rs`); a line simulates either Modbus
    /// units or raw devices.
    #[serde(default)]
    pub raw: Vec<crate::sim::raw::RawSimConfig>,
    /// `echo = true`: the master hears every byte it sends echoed back before any reply,
    /// as through a 2-wire RS-485 adapter without echo suppression.
    #[serde(default)]
    pub echo: bool,
}

/// `[line]`: character framing whose timing the simulator emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineConfig {
    /// Bits per second.
    pub baud: u32,
    /// `"none" | "even" | "odd"` (default even, as the Modbus spec says).
    #[serde(default = "default_parity")]
    pub parity: Parity,
    /// 7 or 8 (default 8).
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// 1 or 2 (default 1).
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Device think time between the request and the first reply byte (default 0).
    #[serde(default, with = "crate::config::duration::serde_any")]
    pub turnaround: Duration,
}

fn default_parity() -> Parity {
    Parity::Even
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_count() -> u16 {
    1
}

impl LineConfig {
    /// The line as the RTU timing functions take it.
    pub fn line(&self) -> Line {
        Line { baud: self.baud, data_bits: self.data_bits, parity: self.parity, stop_bits: self.stop_bits }
    }
}

/// `[[unit]]`: one simulated slave.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitConfig {
    /// Unit id, 1..=247.
    pub unit: u8,
    /// Misbehaviour from the start, e.g. `"late 300ms"` (see [`Fault`]).
    #[serde(default)]
    pub fault: Option<Fault>,
    /// The mapped registers and bits (`[[unit.register]]`).
    #[serde(default, rename = "register")]
    pub registers: Vec<RegisterConfig>,
}

/// `[[unit.register]]`: a run of fixed values, a fixed string, or `count` generators.
/// Exactly one of `values`, `text`, `kind` is given.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// Table.
    pub table: Table,
    /// Zero-based address of the first register/bit.
    pub address: u16,
    /// Fixed initial values, one per register (-32768..=65535, negatives as i16) or bit
    /// (`0`/`1` or `false`/`true`).
    #[serde(default)]
    pub values: Vec<InitValue>,
    /// A fixed string, two bytes a register, high byte first, NUL-padded.
    #[serde(default)]
    pub text: Option<String>,
    /// A generator.
    #[serde(default)]
    pub kind: Option<GenKind>,
    /// Encoding of a generated value (register tables only; default u16).
    #[serde(default, rename = "type")]
    pub data_type: Option<SimType>,
    /// Word/byte order of a multi-register generated value (default abcd).
    #[serde(default)]
    pub order: WordOrder,
    /// Lowest generated value.
    #[serde(default)]
    pub min: Option<f64>,
    /// Highest generated value.
    #[serde(default)]
    pub max: Option<f64>,
    /// Counter/toggle: time per step; ramp/sine: time per cycle.
    #[serde(default, with = "crate::config::duration::serde_any::option")]
    pub period: Option<Duration>,
    /// Counter increment, or the largest random-walk move per read.
    #[serde(default)]
    pub step: Option<f64>,
    /// How many generators of this shape at consecutive addresses (default 1).
    #[serde(default = "default_count")]
    pub count: u16,
}

/// An initial value: a number or a bool.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum InitValue {
    /// `true`/`false` (bit tables).
    Bool(bool),
    /// A number.
    Int(i64),
}

/// Shapes a generated value can take over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GenKind {
    /// `min + n * step`, one step each `period`, wrapping past `max`.
    Counter,
    /// Sawtooth from `min` to `max` over `period`.
    Ramp,
    /// Sine between `min` and `max` with `period`.
    Sine,
    /// Moves by at most `step` each read, kept within `min..=max`.
    RandomWalk,
    /// Alternates `min` and `max` every `period` (bits: false/true).
    Toggle,
}

crate::point::names::named_subset! {
    /// Encoding of a generated register value: a numeric type, `u16` to `f64`.
    pub struct SimType(DataType) where DataType::is_numeric;
}

#[allow(missing_docs)] // each is the type of its name
impl SimType {
    pub const U16: SimType = SimType(DataType::U16);
    pub const I16: SimType = SimType(DataType::I16);
    pub const U32: SimType = SimType(DataType::U32);
    pub const I32: SimType = SimType(DataType::I32);
    pub const U64: SimType = SimType(DataType::U64);
    pub const I64: SimType = SimType(DataType::I64);
    pub const F32: SimType = SimType(DataType::F32);
    pub const F64: SimType = SimType(DataType::F64);
}

impl SimType {
    pub(crate) fn words(self) -> u16 {
        self.0.width()
    }
    pub(crate) fn max(self) -> f64 {
        match self {
            SimType::U16 => 65535.0,
            SimType::I16 => 32767.0,
            SimType::U32 => 4_294_967_295.0,
            SimType::I32 => 2_147_483_647.0,
            _ => 1.0e9,
        }
    }
}

/// A way a unit misbehaves. In TOML and on the command line: `silent`, `late 300ms`,
/// `queued 300ms`, `corrupt-crc`, `wrong-unit 9`, `noise 5`, `exception 4`,
/// `drop-every 3`, `drop-byte 10`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Never answers, applies nothing (a dead or disconnected device).
    Silent,
    /// Answers after this extra delay. Requests that arrive meanwhile are lost (the
    /// device is not listening while it works on one).
    Late(Duration),
    /// Answers every request after this delay, in order, one at a time, like a device
    /// with a receive queue: the reply to request k leaves at
    /// `max(request k heard, reply k-1 sent) + delay`, and requests that arrive meanwhile
    /// (a master's retries) are queued and answered too.
    Queued(Duration),
    /// Answers with a wrong CRC.
    CorruptCrc,
    /// Answers with this unit id in the reply.
    WrongUnit(u8),
    /// Sends this many random bytes before the real reply.
    NoiseBefore(usize),
    /// Answers every request with this exception code, applies nothing.
    Exception(u8),
    /// Ignores every n-th request addressed to it (as if lost on the line).
    DropEvery(u32),
    /// Loses one byte (in the middle) of every n-th reply, as a noisy line drops a
    /// character: the reply arrives one byte short.
    DropByte(u32),
}

impl FromStr for Fault {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, SimError> {
        let bad = || SimError::Fault { spec: s.to_owned() };
        let mut it = s.split_whitespace();
        let (name, arg, rest) = (it.next(), it.next(), it.next());
        if rest.is_some() {
            return Err(bad());
        }
        let num = |a: Option<&str>| a.and_then(|a| a.parse::<u64>().ok()).ok_or_else(bad);
        Ok(match (name.unwrap_or(""), arg) {
            ("silent", None) => Fault::Silent,
            ("corrupt-crc", None) => Fault::CorruptCrc,
            ("late", Some(d)) => Fault::Late(
                crate::config::duration::parse(d, Duration::ZERO..=Duration::MAX).map_err(|_| bad())?,
            ),
            ("queued", Some(d)) => Fault::Queued(
                crate::config::duration::parse(d, Duration::ZERO..=Duration::MAX).map_err(|_| bad())?,
            ),
            ("wrong-unit", a) => Fault::WrongUnit(u8::try_from(num(a)?).map_err(|_| bad())?),
            ("noise", a) => Fault::NoiseBefore(usize::try_from(num(a)?).map_err(|_| bad())?),
            ("exception", a) => Fault::Exception(u8::try_from(num(a)?).map_err(|_| bad())?),
            ("drop-every", a) => Fault::DropEvery(u32::try_from(num(a)?).map_err(|_| bad())?),
            ("drop-byte", a) => Fault::DropByte(u32::try_from(num(a)?).map_err(|_| bad())?),
            _ => return Err(bad()),
        })
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Silent => write!(f, "silent"),
            Fault::Late(d) => write!(f, "late {}", humantime::format_duration(*d)),
            Fault::Queued(d) => write!(f, "queued {}", humantime::format_duration(*d)),
            Fault::CorruptCrc => write!(f, "corrupt-crc"),
            Fault::WrongUnit(u) => write!(f, "wrong-unit {u}"),
            Fault::NoiseBefore(n) => write!(f, "noise {n}"),
            Fault::Exception(c) => write!(f, "exception {c}"),
            Fault::DropEvery(n) => write!(f, "drop-every {n}"),
            Fault::DropByte(n) => write!(f, "drop-byte {n}"),
        }
    }
}

impl<'de> Deserialize<'de> for Fault {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Reads and validates a simulation file; every problem is reported at once.
pub fn load(path: &Path) -> Result<SimConfig, SimError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| SimError::Read { path: path.to_owned(), source })?;
    let config: SimConfig = toml::from_str(&text)
        .map_err(|e| SimError::Parse { path: path.to_owned(), message: e.to_string() })?;
    config.validate().map_err(|e| match e {
        SimError::Invalid { problems, .. } => SimError::Invalid { path: path.to_owned(), problems },
        other => other,
    })?;
    Ok(config)
}

impl SimConfig {
    /// Checks the config; `Err(SimError::Invalid)` lists every problem.
    pub fn validate(&self) -> Result<(), SimError> {
        let (_, mut problems) = build_units(self);
        problems.extend(crate::sim::raw::check(&self.raw));
        if !self.raw.is_empty() && !self.units.is_empty() {
            problems.push("a line simulates either [[unit]]s or [[raw]] devices, not both".into());
        }
        if problems.is_empty() { Ok(()) } else { Err(SimError::Invalid { path: PathBuf::new(), problems }) }
    }

    /// A simulation answering every device and point of one bus with moving values:
    /// counters for integers, sines for floats (in the point's type and word order),
    /// toggling bools, a fixed string; gaps up to the device's `max_gap` are mapped to 0
    /// so merged reads succeed. The line timing is the bus's, with a 2 ms turnaround.
    pub fn from_bus(bus: &Bus) -> SimConfig {
        let line = LineConfig {
            baud: bus.line.baud,
            parity: bus.line.parity,
            data_bits: bus.line.data_bits,
            stop_bits: bus.line.stop_bits,
            turnaround: Duration::from_millis(2),
        };
        let units = bus.devices.iter().map(device_unit).collect();
        let protocol = if bus.protocol == crate::model::Protocol::ModbusAscii {
            ModbusSerial::Ascii
        } else {
            ModbusSerial::Rtu
        };
        SimConfig { line: Some(line), units, protocol, raw: Vec::new(), echo: false }
    }

    /// [`SimConfig::from_bus`] for every bus of a gateway config in one simulation (the
    /// line of the first bus). For `demo`, prefer one `from_bus` simulator per bus.
    pub fn from_model(model: &Model) -> SimConfig {
        let mut out = SimConfig::default();
        for bus in &model.buses {
            let sim = SimConfig::from_bus(bus);
            out.line = out.line.or(sim.line);
            out.units.extend(sim.units);
        }
        out
    }
}

fn device_unit(device: &crate::model::Device) -> UnitConfig {
    let mut used: BTreeMap<Table, BTreeSet<u16>> = BTreeMap::new();
    let mut registers = Vec::new();
    for (i, p) in device.points.iter().enumerate() {
        let i = i as u32;
        let bit_table = matches!(p.table, Table::Coils | Table::Discrete);
        let mk = |kind, ty, min: f64, max: f64, period: Duration| RegisterConfig {
            kind: Some(kind),
            data_type: (!bit_table).then_some(ty),
            order: p.order,
            min: Some(min),
            max: Some(max),
            period: Some(period),
            ..fixed(p.table, p.address, &[])
        };
        let cfg = match p.data_type {
            _ if bit_table => mk(GenKind::Toggle, SimType::U16, 0.0, 1.0, secs(2 + i % 5)),
            DataType::Bool => mk(GenKind::Toggle, SimType::U16, 0.0, 1.0, secs(2 + i % 5)),
            DataType::Bit(b) => {
                let max = f64::from(1u32 << b.min(15));
                mk(GenKind::Toggle, SimType::U16, 0.0, max, secs(2 + i % 5))
            }
            DataType::F32 | DataType::F64 => {
                let ty = if p.data_type == DataType::F32 { SimType::F32 } else { SimType::F64 };
                mk(GenKind::Sine, ty, 0.0, 100.0, secs(30 + 7 * (i % 5)))
            }
            DataType::Str(n) => {
                let mut s = format!("SIM {}", device.name);
                s.truncate(usize::from(n));
                RegisterConfig {
                    text: Some(format!("{s:\0<width$}", width = usize::from(n))),
                    ..fixed(p.table, p.address, &[])
                }
            }
            // A scaled number is a measurement: a slow sine between 0 and 100 in the
            // point's engineering unit. An unscaled one counts up from a non-zero base,
            // as energy counters and run hours do.
            t if p.scale != 1.0 => {
                let (ty, type_max) = match t {
                    DataType::I16 => (SimType::I16, f64::from(i16::MAX)),
                    DataType::U32 => (SimType::U32, f64::from(u32::MAX)),
                    DataType::I32 => (SimType::I32, f64::from(i32::MAX)),
                    DataType::U64 => (SimType::U64, 1.0e15),
                    DataType::I64 => (SimType::I64, 1.0e15),
                    _ => (SimType::U16, f64::from(u16::MAX)),
                };
                let max = ((100.0 - p.offset) / p.scale.abs()).clamp(1.0, type_max);
                mk(GenKind::Sine, ty, 0.0, max, secs(40 + 7 * (i % 5)))
            }
            t => {
                let (ty, min, max) = match t {
                    DataType::I16 => (SimType::I16, -100.0, 100.0),
                    DataType::U32 => (SimType::U32, 12_345.0, 1.0e9),
                    DataType::I32 => (SimType::I32, 1000.0, 1.0e9),
                    DataType::U64 => (SimType::U64, 12_345.0, 1.0e12),
                    DataType::I64 => (SimType::I64, 1000.0, 1.0e12),
                    _ => (SimType::U16, 100.0, 10_000.0),
                };
                mk(GenKind::Counter, ty, min, max, Duration::from_secs(1))
            }
        };
        let width = entry_len(&cfg);
        let set = used.entry(p.table).or_default();
        let span = u32::from(p.address)..u32::from(p.address) + u32::from(width);
        if span.end > 0x1_0000 || span.clone().any(|a| set.contains(&(a as u16))) {
            continue; // overlapping points: the first one owns the registers
        }
        set.extend(span.map(|a| a as u16));
        registers.push(cfg);
    }
    // Fill the gaps the planner may read across when it merges requests.
    for (table, set) in &used {
        let addrs: Vec<u16> = set.iter().copied().collect();
        for pair in addrs.windows(2) {
            let gap = pair[1] - pair[0] - 1;
            if gap > 0 && gap <= device.max_gap {
                let zeros = vec![InitValue::Int(0); usize::from(gap)];
                registers.push(fixed(*table, pair[0] + 1, &zeros));
            }
        }
    }
    UnitConfig { unit: device.unit, fault: None, registers }
}

pub(crate) fn is_bits(table: Table) -> bool {
    matches!(table, Table::Coils | Table::Discrete)
}

fn secs(s: u32) -> Duration {
    Duration::from_secs(u64::from(s))
}

/// A `[[unit.register]]` entry of fixed values.
fn fixed(table: Table, address: u16, values: &[InitValue]) -> RegisterConfig {
    RegisterConfig {
        table,
        address,
        values: values.to_vec(),
        text: None,
        kind: None,
        data_type: None,
        order: WordOrder::Abcd,
        min: None,
        max: None,
        period: None,
        step: None,
        count: 1,
    }
}

/// Registers or bits an entry covers.
pub(crate) fn entry_len(r: &RegisterConfig) -> u16 {
    if let Some(t) = &r.text {
        return u16::try_from(t.len().div_ceil(2)).unwrap_or(u16::MAX);
    }
    if r.kind.is_some() {
        let w = match r.table {
            Table::Coils | Table::Discrete => 1,
            _ => r.data_type.unwrap_or(SimType::U16).words(),
        };
        return w.saturating_mul(r.count);
    }
    u16::try_from(r.values.len()).unwrap_or(u16::MAX)
}

/// A quick simulation for `m2m-gateway simulate --units 1,2,3`: each unit has holding
/// 0..registers as u16 counters, input 0..registers as f32 sines (ABCD, two registers
/// each; an odd last register is a counter), and 64 coils and 64 discrete inputs toggling.
pub fn quick(units: &[u8], registers: u16) -> SimConfig {
    let mk = |table, address, kind, ty, max: f64, period: Duration, count| RegisterConfig {
        kind: Some(kind),
        data_type: (!is_bits(table)).then_some(ty),
        min: Some(0.0),
        max: Some(max),
        period: Some(period),
        count,
        ..fixed(table, address, &[])
    };
    let mut out = SimConfig::default();
    for &unit in units {
        let mut regs = Vec::new();
        for a in 0..registers {
            let period = Duration::from_millis(500 + 250 * u64::from(a % 4));
            regs.push(mk(Table::Holding, a, GenKind::Counter, SimType::U16, 65535.0, period, 1));
        }
        for a in (0..registers / 2).map(|i| 2 * i) {
            let period = secs(20 + 5 * u32::from(a % 8));
            regs.push(mk(Table::Input, a, GenKind::Sine, SimType::F32, 100.0, period, 1));
        }
        if registers % 2 == 1 {
            let (t, a, p) = (Table::Input, registers - 1, secs(1));
            regs.push(mk(t, a, GenKind::Counter, SimType::U16, 65535.0, p, 1));
        }
        for a in 0..64u16 {
            let p = secs(1 + u32::from(a % 8));
            regs.push(mk(Table::Coils, a, GenKind::Toggle, SimType::U16, 1.0, p, 1));
            let p = secs(2 + u32::from(a % 5));
            regs.push(mk(Table::Discrete, a, GenKind::Toggle, SimType::U16, 1.0, p, 1));
        }
        out.units.push(UnitConfig { unit, fault: None, registers: regs });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Device, Gateway, Point};

    /// A simulation file using the keys of docs/SIMULATOR.md.
    const EXAMPLE: &str = r#"
[line]
baud = 9600
parity = "even"
data_bits = 8
stop_bits = 1
turnaround = "2ms"

[[unit]]
unit = 1
fault = "late 250ms"
[[unit.register]]
table = "holding"
address = 0
values = [1, 2, 3]
[[unit.register]]
table = "coils"
address = 0
values = [true, false, 1]
[[unit.register]]
table = "input"
address = 10
kind = "sine"
type = "f32"
order = "cdab"
min = -10.0
max = 10
period = "30s"
[[unit.register]]
table = "input"
address = 20
kind = "random-walk"
min = 0
max = 1000
step = 5
count = 4
[[unit.register]]
table = "holding"
address = 100
text = "PUMP-7"
[[unit.register]]
table = "discrete"
address = 0
kind = "toggle"
period = "1s"
count = 16
"#;

    #[test]
    fn example_parses_and_validates() {
        let config: SimConfig = toml::from_str(EXAMPLE).expect("parses");
        config.validate().expect("valid");
        let line = config.line.expect("line");
        assert_eq!(line.turnaround, Duration::from_millis(2));
        assert_eq!(line.line().parity, Parity::Even);
        assert_eq!(config.units[0].fault, Some(Fault::Late(Duration::from_millis(250))));
        assert_eq!(entry_len(&config.units[0].registers[3]), 4);
        assert_eq!(entry_len(&config.units[0].registers[4]), 3);
    }

    #[test]
    fn bad_fault_in_toml_names_the_syntax() {
        let e =
            toml::from_str::<SimConfig>("[[unit]]\nunit = 1\nfault = \"sleepy\"\n").expect_err("bad fault");
        assert!(e.to_string().contains("wrong-unit <id>"), "{e}");
    }

    fn point(name: &str, table: Table, address: u16, data_type: DataType) -> Point {
        Point {
            name: name.into(),
            table,
            address,
            data_type,
            order: WordOrder::Cdab,
            scale: 1.0,
            offset: 0.0,
            interval: Duration::from_secs(1),
            stale_after: Duration::from_secs(10),
            unit: None,
        }
    }

    #[test]
    fn model_simulation_maps_every_point() {
        let device = Device {
            name: "pump".into(),
            unit: 5,
            template: None,
            timeout: Duration::from_millis(500),
            turnaround: Duration::ZERO,
            max_registers: 125,
            max_bits: 2000,
            max_gap: 4,
            backoff_max: Duration::from_secs(30),
            points: vec![
                point("pump.flow", Table::Input, 0, DataType::F32),
                point("pump.runtime", Table::Holding, 0, DataType::U32),
                point("pump.alarm", Table::Holding, 4, DataType::Bit(3)),
                point("pump.tag", Table::Holding, 10, DataType::Str(6)),
                point("pump.run", Table::Coils, 7, DataType::Bool),
                point("pump.temp", Table::Input, 5, DataType::I16),
                point("pump.dup", Table::Input, 1, DataType::U16),
            ],
        };
        let bus = Bus {
            name: "line1".into(),
            port: "/dev/ttyUSB0".into(),
            line: Line { baud: 19200, data_bits: 8, parity: Parity::None, stop_bits: 1 },
            protocol: crate::model::Protocol::ModbusRtu,
            frame_gap: Duration::from_micros(1750),
            local_echo: false,
            timeout: Duration::from_millis(500),
            retries: 1,
            queue_depth: 16,
            reopen_max: Duration::from_secs(30),
            max_in_flight: 1,
            devices: vec![device],
            broadcast: false,
            rs485: None,
            raw_devices: Vec::new(),
        };
        let model = Model {
            gateway: Gateway {
                name: "gw".into(),
                summary_interval: Duration::from_secs(60),
                worker_threads: None,
                log_format: Default::default(),
            },
            buses: vec![bus],
            links: None,
            server: None,
            plcs: Vec::new(),
            http: None,
        };
        let config = SimConfig::from_model(&model);
        config.validate().expect("valid");
        assert_eq!(config.line.map(|l| l.baud), Some(19200));
        let (mut units, _) = build_units(&config);
        let u = units.get_mut(&5).expect("unit 5");
        let t = Duration::from_secs(1);
        // The whole input block 0..=5 reads in one request: the gap 2..=4 is filled.
        let words = u.read(Table::Input, 0, 6, t).expect("mapped");
        let flow = f32::from_bits(u32::from(words[1]) << 16 | u32::from(words[0]));
        assert!((0.0..=100.0).contains(&flow), "flow {flow}");
        assert!(u.read(Table::Holding, 0, 5, t).is_ok());
        assert_eq!(u.read(Table::Holding, 10, 3, t), Ok(vec![0x5349, 0x4D20, 0x7075]));
        assert!(u.read(Table::Coils, 7, 1, t).is_ok());
        assert!(u.read(Table::Holding, 20, 1, t).is_err());
    }
}
