//! The simulated units' register maps and what a request does to them (no I/O): fixed
//! cells, time-driven generators, reads, all-or-nothing writes, and the Modbus exception
//! each bad request earns.
//!
//! Invariants: a read or write touching one unmapped address fails whole with 0x02 and
//! changes nothing; writing one word of a generated multi-register value freezes the
//! whole value first, so its other words stay consistent.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_modbus::Response;

use crate::point::value::{Table, WordOrder};
use crate::serial::pdu;
use crate::sim::{Fault, GenKind, InitValue, RegisterConfig, SimConfig, SimType, entry_len};

/// Exception code: function not supported.
pub(crate) const ILLEGAL_FUNCTION: u8 = 0x01;
/// Exception code: an address outside the map.
pub(crate) const ILLEGAL_ADDRESS: u8 = 0x02;
/// Exception code: a bad quantity, byte count or coil value.
pub(crate) const ILLEGAL_VALUE: u8 = 0x03;

#[derive(Debug, Clone, Copy)]
enum Cell {
    Fixed(u16),
    /// Word `1` of generator `0`.
    Gen(usize, u16),
}

#[derive(Debug, Clone)]
struct Generator {
    kind: GenKind,
    ty: SimType,
    order: WordOrder,
    min: f64,
    max: f64,
    period: Duration,
    step: f64,
    walk: f64,
    table: Table,
    base: u16,
}

impl Generator {
    fn value(&mut self, t: Duration) -> f64 {
        let span = self.max - self.min;
        let period = self.period.as_secs_f64().max(1e-3);
        let cycles = t.as_secs_f64() / period;
        match self.kind {
            GenKind::Counter if span > 0.0 => self.min + (cycles.floor() * self.step).rem_euclid(span + 1.0),
            GenKind::Counter => self.min,
            GenKind::Ramp => self.min + span * cycles.fract(),
            GenKind::Sine => self.min + span / 2.0 * (1.0 + (std::f64::consts::TAU * cycles).sin()),
            GenKind::RandomWalk => {
                let mv = (rand::random::<f64>() * 2.0 - 1.0) * self.step;
                self.walk = (self.walk + mv).clamp(self.min, self.max.max(self.min));
                self.walk
            }
            GenKind::Toggle if (cycles.floor() as u64).is_multiple_of(2) => self.min,
            GenKind::Toggle => self.max,
        }
    }

    fn words(&mut self, t: Duration) -> Vec<u16> {
        let v = self.value(t);
        match self.table {
            Table::Coils | Table::Discrete => vec![u16::from(v != 0.0)],
            _ => encode(v, self.ty, self.order),
        }
    }
}

/// Encodes `v` as `ty` in `order` (`as` casts saturate; NaN becomes 0). Deliberately
/// independent of `point/registers.rs`: the end-to-end decoding tests check the gateway's codec
/// against this second implementation.
fn encode(v: f64, ty: SimType, order: WordOrder) -> Vec<u16> {
    let r = v.round();
    let mut b: Vec<u8> = match ty {
        SimType::U16 => (r as u16).to_be_bytes().to_vec(),
        SimType::I16 => (r as i16).to_be_bytes().to_vec(),
        SimType::U32 => (r as u32).to_be_bytes().to_vec(),
        SimType::I32 => (r as i32).to_be_bytes().to_vec(),
        SimType::U64 => (r as u64).to_be_bytes().to_vec(),
        SimType::I64 => (r as i64).to_be_bytes().to_vec(),
        SimType::F32 => (v as f32).to_be_bytes().to_vec(),
        SimType::F64 => v.to_be_bytes().to_vec(),
        // Not a SimType (it deserializes only the numeric types).
        _ => Vec::new(),
    };
    match order {
        WordOrder::Abcd => {}
        WordOrder::Dcba => b.reverse(),
        WordOrder::Badc => b.chunks_mut(2).for_each(|c| c.reverse()),
        WordOrder::Cdab => {
            b.reverse();
            b.chunks_mut(2).for_each(|c| c.reverse());
        }
    }
    b.chunks(2).map(|c| u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])).collect()
}

fn table_index(t: Table) -> usize {
    match t {
        Table::Coils => 0,
        Table::Discrete => 1,
        Table::Holding => 2,
        Table::Input => 3,
    }
}

/// Counters of one simulated unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitStats {
    /// Frames with a good CRC addressed to the unit (broadcasts included).
    pub requests: u64,
    /// Replies sent (normal or exception).
    pub answered: u64,
    /// Write requests applied.
    pub writes: u64,
    /// Bad-CRC frames whose first byte was this unit id.
    pub crc_errors_seen: u64,
}

/// Bus-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Frames with a good CRC, for any unit.
    pub frames_received: u64,
    /// Candidate frames with a bad CRC.
    pub crc_errors: u64,
    /// Bytes dropped while resynchronising (and bytes that collided with a reply).
    pub garbage_bytes: u64,
    /// Modbus-TCP connections accepted (`Simulator::serve_tcp`).
    pub tcp_connections: u64,
    /// The most Modbus-TCP requests read and not yet answered at one time (all
    /// connections): above 1 only when a master pipelines and the connections work in
    /// parallel (`SimHandle::set_tcp_parallel`).
    pub tcp_most_outstanding: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Unit {
    tables: [BTreeMap<u16, Cell>; 4],
    gens: Vec<Generator>,
    pub(crate) fault: Option<Fault>,
    pub(crate) stats: UnitStats,
}

/// A Modbus exception code.
pub(crate) type Exception = u8;

impl Unit {
    pub(crate) fn read(
        &mut self,
        table: Table,
        addr: u16,
        qty: u16,
        t: Duration,
    ) -> Result<Vec<u16>, Exception> {
        let Unit { tables, gens, .. } = self;
        let map = &tables[table_index(table)];
        let mut cache: BTreeMap<usize, Vec<u16>> = BTreeMap::new();
        let mut out = Vec::with_capacity(usize::from(qty));
        for a in u32::from(addr)..u32::from(addr) + u32::from(qty) {
            let a = u16::try_from(a).map_err(|_| ILLEGAL_ADDRESS)?;
            match map.get(&a) {
                None => return Err(ILLEGAL_ADDRESS),
                Some(Cell::Fixed(v)) => out.push(*v),
                Some(Cell::Gen(g, w)) => {
                    let words = match cache.get(g) {
                        Some(w) => w,
                        None => {
                            let words = gens.get_mut(*g).map(|x| x.words(t)).unwrap_or_default();
                            cache.entry(*g).or_insert(words)
                        }
                    };
                    out.push(words.get(usize::from(*w)).copied().unwrap_or(0));
                }
            }
        }
        Ok(out)
    }

    /// Writes `values` from `addr`; all addresses must be mapped (else nothing changes).
    fn write(&mut self, table: Table, addr: u16, values: &[u16], t: Duration) -> Result<(), Exception> {
        let ti = table_index(table);
        let end = u32::from(addr) + values.len() as u32;
        if end > 0x1_0000 || (u32::from(addr)..end).any(|a| !self.tables[ti].contains_key(&(a as u16))) {
            return Err(ILLEGAL_ADDRESS);
        }
        for (a, v) in (addr..).zip(values) {
            self.set(table, a, *v, t);
        }
        Ok(())
    }

    /// Maps `addr` to a fixed value; a generator it belonged to is frozen first, so the
    /// other words of a multi-register value stay consistent.
    pub(crate) fn set(&mut self, table: Table, addr: u16, value: u16, t: Duration) {
        let ti = table_index(table);
        if let Some(Cell::Gen(g, _)) = self.tables[ti].get(&addr).copied()
            && let Some(g0) = self.gens.get_mut(g)
        {
            let words = g0.words(t);
            for (a, w) in (g0.base..).zip(words) {
                if matches!(self.tables[ti].get(&a), Some(Cell::Gen(x, _)) if *x == g) {
                    self.tables[ti].insert(a, Cell::Fixed(w));
                }
            }
        }
        self.tables[ti].insert(addr, Cell::Fixed(value));
    }

    fn add(&mut self, table: Table, addr: u16, cell: Cell) {
        self.tables[table_index(table)].insert(addr, cell);
    }
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b.get(i).copied().unwrap_or(0), b.get(i + 1).copied().unwrap_or(0)])
}

fn unpack_bits(bytes: &[u8], n: usize) -> Vec<u16> {
    (0..n).map(|i| u16::from(bytes.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1))).collect()
}

/// Carries out one request PDU; returns the reply PDU and whether it wrote.
pub(crate) fn execute(unit: &mut Unit, p: &[u8], t: Duration) -> Result<(Vec<u8>, bool), Exception> {
    let f = p.first().copied().unwrap_or(0);
    let (a, q) = (be16(p, 1), be16(p, 3));
    let mut out = Vec::new();
    let range_ok = |q: u16, max: u16| (1..=max).contains(&q);
    // Fixed-length requests of another length are malformed (0x03), never read with
    // missing bytes taken as 0: ASCII frames, and RTU frames ended by silence, can carry
    // any length.
    let fixed = match f {
        1..=6 => Some(5),
        22 => Some(7),
        _ => None,
    };
    if fixed.is_some_and(|n| p.len() != n) {
        return Err(ILLEGAL_VALUE);
    }
    match f {
        1..=4 => {
            let bits = f <= 2;
            let max = if bits { pdu::MAX_READ_BITS } else { pdu::MAX_READ_REGISTERS };
            if !range_ok(q, max) {
                return Err(ILLEGAL_VALUE);
            }
            let table = [Table::Coils, Table::Discrete, Table::Holding, Table::Input][usize::from(f - 1)];
            let v = unit.read(table, a, q, t)?;
            let rsp = match f {
                1 => Response::ReadCoils(v.iter().map(|x| *x != 0).collect()),
                2 => Response::ReadDiscreteInputs(v.iter().map(|x| *x != 0).collect()),
                3 => Response::ReadHoldingRegisters(v),
                _ => Response::ReadInputRegisters(v),
            };
            pdu::encode_response(&rsp, &mut out);
            Ok((out, false))
        }
        5 => {
            let on = match q {
                0xFF00 => 1,
                0x0000 => 0,
                _ => return Err(ILLEGAL_VALUE),
            };
            unit.write(Table::Coils, a, &[on], t)?;
            Ok((p.to_vec(), true))
        }
        6 => {
            unit.write(Table::Holding, a, &[q], t)?;
            Ok((p.to_vec(), true))
        }
        15 | 16 => {
            let bits = f == 15;
            let (max, bc) = if bits {
                (pdu::MAX_WRITE_BITS, usize::from(q).div_ceil(8))
            } else {
                (pdu::MAX_WRITE_REGISTERS, 2 * usize::from(q))
            };
            if !range_ok(q, max) || p.get(5).map(|b| usize::from(*b)) != Some(bc) || p.len() != 6 + bc {
                return Err(ILLEGAL_VALUE);
            }
            let data = &p[6..];
            let values: Vec<u16> = if bits {
                unpack_bits(data, usize::from(q))
            } else {
                data.chunks(2).map(|c| be16(c, 0)).collect()
            };
            unit.write(if bits { Table::Coils } else { Table::Holding }, a, &values, t)?;
            let rsp = if bits {
                Response::WriteMultipleCoils(a, q)
            } else {
                Response::WriteMultipleRegisters(a, q)
            };
            pdu::encode_response(&rsp, &mut out);
            Ok((out, true))
        }
        22 => {
            let (and, or) = (be16(p, 3), be16(p, 5));
            let cur = unit.read(Table::Holding, a, 1, t)?[0];
            unit.write(Table::Holding, a, &[(cur & and) | (or & !and)], t)?;
            Ok((p.to_vec(), true))
        }
        23 => {
            let (wa, wq, bc) = (be16(p, 5), be16(p, 7), p.get(9).copied().map(usize::from));
            if !range_ok(q, pdu::MAX_READ_REGISTERS)
                || !range_ok(wq, pdu::MAX_RW_WRITE_REGISTERS)
                || bc != Some(2 * usize::from(wq))
                || p.len() != 10 + 2 * usize::from(wq)
            {
                return Err(ILLEGAL_VALUE);
            }
            // Check the read range before writing, so a bad read changes nothing.
            unit.read(Table::Holding, a, q, t)?;
            let values: Vec<u16> = p[10..].chunks(2).map(|c| be16(c, 0)).collect();
            unit.write(Table::Holding, wa, &values, t)?;
            let v = unit.read(Table::Holding, a, q, t)?;
            pdu::encode_response(&Response::ReadWriteMultipleRegisters(v), &mut out);
            Ok((out, true))
        }
        // Diagnostics, sub-function 0 (return query data): the request comes back as is.
        8 if p.len() >= 3 && be16(p, 1) == 0 => Ok((p.to_vec(), false)),
        8 => Err(ILLEGAL_FUNCTION),
        // Read device identification, basic objects (vendor, product code, revision),
        // read as a stream (code 1) or one object (code 4).
        43 if p.get(1) == Some(&0x0E) => {
            let (code, first) = (p.get(2).copied(), p.get(3).copied());
            if p.len() != 4 || !matches!(code, Some(1 | 4)) {
                return Err(ILLEGAL_VALUE);
            }
            let first = first.unwrap_or(0);
            if first > 2 {
                return Err(ILLEGAL_ADDRESS);
            }
            let objects: Vec<(u8, &[u8])> = [(0u8, &b"m2m-gateway"[..]), (1, b"SIM-RTU"), (2, b"1.0")]
                .into_iter()
                .filter(|(id, _)| if code == Some(4) { *id == first } else { *id >= first })
                .collect();
            // Conformity level 0x01: basic identification, stream access only.
            out.extend_from_slice(&[43, 0x0E, code.unwrap_or(1), 0x01, 0, 0, objects.len() as u8]);
            for (id, value) in objects {
                out.push(id);
                out.push(value.len() as u8);
                out.extend_from_slice(value);
            }
            Ok((out, false))
        }
        _ => Err(ILLEGAL_FUNCTION),
    }
}

/// Compiles a config into unit maps; problems are collected, bad entries skipped.
pub(crate) fn build(config: &SimConfig) -> (BTreeMap<u8, Unit>, Vec<String>) {
    let mut units = BTreeMap::new();
    let mut problems = Vec::new();
    if let Some(l) = &config.line {
        if l.baud == 0 {
            problems.push("line: baud must be above 0".to_owned());
        }
        if !(7..=8).contains(&l.data_bits) || !(1..=2).contains(&l.stop_bits) {
            problems.push("line: data_bits must be 7 or 8, stop_bits 1 or 2".to_owned());
        }
    }
    for uc in &config.units {
        let u = uc.unit;
        if !(1..=247).contains(&u) {
            problems.push(format!("unit {u}: id must be 1..=247"));
            continue;
        }
        if units.contains_key(&u) {
            problems.push(format!("unit {u}: defined twice"));
            continue;
        }
        let mut unit = Unit { fault: uc.fault, ..Unit::default() };
        for (i, r) in uc.registers.iter().enumerate() {
            if let Err(p) = add_entry(&mut unit, r) {
                problems.push(format!("unit {u} register #{} ({} {}): {p}", i + 1, r.table, r.address));
            }
        }
        units.insert(u, unit);
    }
    (units, problems)
}

fn add_entry(unit: &mut Unit, r: &RegisterConfig) -> Result<(), String> {
    let bits = matches!(r.table, Table::Coils | Table::Discrete);
    let given = [!r.values.is_empty(), r.text.is_some(), r.kind.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err("give exactly one of values, text, kind".into());
    }
    if r.kind.is_none()
        && (r.data_type.is_some()
            || r.min.is_some()
            || r.max.is_some()
            || r.period.is_some()
            || r.step.is_some()
            || r.count != 1)
    {
        return Err("type, min, max, period, step and count only go with kind".into());
    }
    let len = u32::from(entry_len(r));
    if len == 0 || u32::from(r.address) + len > 0x1_0000 {
        return Err(format!("{len} values from address {} pass 65535", r.address));
    }
    if !r.values.is_empty() {
        let mut words = Vec::new();
        for v in &r.values {
            words.push(match (*v, bits) {
                (InitValue::Bool(b), true) => u16::from(b),
                (InitValue::Int(n @ 0..=1), true) => n as u16,
                (InitValue::Int(n @ -32768..=65535), false) => n as u16,
                (v, _) => {
                    let v = match v {
                        InitValue::Bool(b) => b.to_string(),
                        InitValue::Int(n) => n.to_string(),
                    };
                    return Err(format!("value {v} does not fit the {} table", r.table));
                }
            });
        }
        for (a, w) in (r.address..).zip(words) {
            unit.add(r.table, a, Cell::Fixed(w));
        }
        return Ok(());
    }
    if let Some(text) = &r.text {
        if bits {
            return Err("text needs a register table".into());
        }
        for (a, w) in (r.address..).zip(text.as_bytes().chunks(2).map(|c| be16(c, 0))) {
            unit.add(r.table, a, Cell::Fixed(w));
        }
        return Ok(());
    }
    let kind = r.kind.unwrap_or(GenKind::Counter);
    if bits && (kind != GenKind::Toggle || r.data_type.is_some()) {
        return Err("bit tables take only kind = \"toggle\" (no type)".into());
    }
    let ty = r.data_type.unwrap_or(SimType::U16);
    let min = r.min.unwrap_or(0.0);
    let max = r.max.unwrap_or(match kind {
        GenKind::Counter => ty.max(),
        GenKind::Toggle => 1.0,
        _ => 100.0,
    });
    if !(min.is_finite() && max.is_finite() && min <= max) {
        return Err(format!("min {min} and max {max}: need finite min <= max"));
    }
    let period = r.period.unwrap_or(match kind {
        GenKind::Ramp | GenKind::Sine => Duration::from_secs(60),
        _ => Duration::from_secs(1),
    });
    if period.is_zero() {
        return Err("period must be above 0".into());
    }
    let w = if bits { 1 } else { ty.words() };
    for n in 0..r.count {
        let g = unit.gens.len();
        let base = r.address + n * w;
        unit.gens.push(Generator {
            kind,
            ty,
            order: r.order,
            min,
            max,
            period,
            step: r.step.unwrap_or(1.0),
            walk: (min + max) / 2.0,
            table: r.table,
            base,
        });
        for k in 0..w {
            unit.add(r.table, base + k, Cell::Gen(g, k));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(toml_text: &str) -> Unit {
        let config: SimConfig = toml::from_str(toml_text).expect("parses");
        let (mut units, problems) = build(&config);
        assert!(problems.is_empty(), "{problems:?}");
        units.remove(&1).expect("unit 1")
    }

    const T: Duration = Duration::from_secs(0);

    #[test]
    fn word_orders_of_one_f32() {
        // 1.0f32 = 0x3F80_0000, bytes A B C D = 3F 80 00 00.
        assert_eq!(encode(1.0, SimType::F32, WordOrder::Abcd), [0x3F80, 0x0000]);
        assert_eq!(encode(1.0, SimType::F32, WordOrder::Cdab), [0x0000, 0x3F80]);
        assert_eq!(encode(1.0, SimType::F32, WordOrder::Badc), [0x803F, 0x0000]);
        assert_eq!(encode(1.0, SimType::F32, WordOrder::Dcba), [0x0000, 0x803F]);
        assert_eq!(encode(-2.0, SimType::I16, WordOrder::Abcd), [0xFFFE]);
        assert_eq!(encode(70_000.0, SimType::U16, WordOrder::Abcd), [0xFFFF]);
        assert_eq!(encode(0x0102_0304 as f64, SimType::U32, WordOrder::Cdab), [0x0304, 0x0102]);
        assert_eq!(encode(1.0, SimType::F64, WordOrder::Cdab), [0x0000, 0x0000, 0x0000, 0x3FF0]);
    }

    #[test]
    fn generators_move_within_bounds() {
        let mut g = Generator {
            kind: GenKind::Counter,
            ty: SimType::U16,
            order: WordOrder::Abcd,
            min: 10.0,
            max: 12.0,
            period: Duration::from_secs(1),
            step: 1.0,
            walk: 11.0,
            table: Table::Holding,
            base: 0,
        };
        let at = |s| Duration::from_millis(s);
        let seq: Vec<f64> = [0, 1000, 2000, 3000].iter().map(|s| g.value(at(*s))).collect();
        assert_eq!(seq, [10.0, 11.0, 12.0, 10.0]);
        g.kind = GenKind::Toggle;
        assert_eq!((g.value(at(500)), g.value(at(1500))), (10.0, 12.0));
        g.kind = GenKind::Ramp;
        assert_eq!(g.value(at(500)), 11.0);
        g.kind = GenKind::RandomWalk;
        for _ in 0..100 {
            assert!((10.0..=12.0).contains(&g.value(T)));
        }
    }

    #[test]
    fn writing_part_of_a_generated_value_freezes_it() {
        let mut u = unit(
            "[[unit]]\nunit = 1\n[[unit.register]]\ntable = \"holding\"\naddress = 0\n\
             kind = \"counter\"\ntype = \"u32\"\nmin = 65536\nmax = 65540\n",
        );
        assert_eq!(u.read(Table::Holding, 0, 2, T), Ok(vec![1, 0]));
        u.write(Table::Holding, 1, &[7], T).expect("mapped");
        let later = Duration::from_secs(3);
        assert_eq!(u.read(Table::Holding, 0, 2, later), Ok(vec![1, 7]));
    }

    #[test]
    fn requests_and_their_exceptions() {
        let mut u = unit(
            "[[unit]]\nunit = 1\n[[unit.register]]\ntable = \"holding\"\naddress = 0\nvalues = [1, 2]\n\
             [[unit.register]]\ntable = \"input\"\naddress = 0\ntext = \"ABC\"\n",
        );
        let ok = |r: Result<(Vec<u8>, bool), Exception>| r.expect("no exception").0;
        assert_eq!(ok(execute(&mut u, &[4, 0, 0, 0, 2], T)), [4, 4, 0x41, 0x42, 0x43, 0]);
        assert_eq!(execute(&mut u, &[3, 0, 1, 0, 2], T), Err(ILLEGAL_ADDRESS));
        assert_eq!(execute(&mut u, &[3, 0xFF, 0xFF, 0, 2], T), Err(ILLEGAL_ADDRESS));
        assert_eq!(execute(&mut u, &[5, 0, 0, 0x12, 0x34], T), Err(ILLEGAL_VALUE));
        assert_eq!(execute(&mut u, &[5, 0, 0, 0xFF, 0], T), Err(ILLEGAL_ADDRESS));
        assert_eq!(execute(&mut u, &[16, 0, 0, 0, 2, 3, 0, 0, 0], T), Err(ILLEGAL_VALUE));
        // Device identification: the basic objects, or one; other MEI types are refused.
        let id = ok(execute(&mut u, &[43, 14, 1, 0], T));
        assert_eq!(&id[..7], [43, 14, 1, 1, 0, 0, 3]);
        assert_eq!(pdu::pdu_len(&id, false), Some(id.len()), "a well-formed reply");
        assert_eq!(ok(execute(&mut u, &[43, 14, 4, 2], T)), [43, 14, 4, 1, 0, 0, 1, 2, 3, b'1', b'.', b'0']);
        assert_eq!(execute(&mut u, &[43, 14, 4, 3], T), Err(ILLEGAL_ADDRESS));
        assert_eq!(execute(&mut u, &[43, 13, 0], T), Err(ILLEGAL_FUNCTION));
        // Diagnostics: sub-function 0 returns the query; others are not supported.
        assert_eq!(ok(execute(&mut u, &[8, 0, 0, 0xA5, 0x37], T)), [8, 0, 0, 0xA5, 0x37]);
        assert_eq!(execute(&mut u, &[8, 0, 1, 0, 0], T), Err(ILLEGAL_FUNCTION));
        // Short or long fixed-length requests change nothing (ASCII frames any length).
        assert_eq!(execute(&mut u, &[6, 0, 1], T), Err(ILLEGAL_VALUE));
        assert_eq!(execute(&mut u, &[6, 0, 1, 0, 9, 9], T), Err(ILLEGAL_VALUE));
        assert_eq!(execute(&mut u, &[5, 0, 0], T), Err(ILLEGAL_VALUE));
        assert_eq!(execute(&mut u, &[3, 0, 0], T), Err(ILLEGAL_VALUE));
        assert_eq!(execute(&mut u, &[22, 0, 0, 0xFF], T), Err(ILLEGAL_VALUE));
        assert_eq!(u.read(Table::Holding, 0, 2, T), Ok(vec![1, 2]));
        // Input registers cannot be written: no function code reaches them.
        assert_eq!(execute(&mut u, &[6, 0, 5, 0, 1], T), Err(ILLEGAL_ADDRESS));
        assert_eq!(ok(execute(&mut u, &[16, 0, 0, 0, 2, 4, 0, 9, 0, 8], T)), [16, 0, 0, 0, 2]);
        assert_eq!(u.read(Table::Holding, 0, 2, T), Ok(vec![9, 8]));
    }

    /// The slave side of the spec's state diagrams: each function's quantity limits
    /// (0x03) at their exact edges, and quantity before address.
    #[test]
    fn quantity_limits_at_their_edges() {
        let mut u = unit(
            "[[unit]]\nunit = 1\n[[unit.register]]\ntable = \"holding\"\naddress = 0\nkind = \"counter\"\n\
             count = 200\n[[unit.register]]\ntable = \"coils\"\naddress = 0\nkind = \"toggle\"\ncount = 2000\n\
             [[unit.register]]\ntable = \"discrete\"\naddress = 0\nkind = \"toggle\"\ncount = 2000\n",
        );
        let code = |u: &mut Unit, p: &[u8]| execute(u, p, T).err();
        let bits = |f: u8, q: u16, bc: usize| {
            let mut p = vec![f, 0, 0];
            p.extend_from_slice(&q.to_be_bytes());
            if bc > 0 {
                p.push(bc as u8);
                p.extend(std::iter::repeat_n(0, bc));
            }
            p
        };
        for (f, max) in [(1u8, 2000u16), (2, 2000), (3, 125), (4, 125)] {
            let ok = if f == 4 { Some(ILLEGAL_ADDRESS) } else { None };
            assert_eq!(code(&mut u, &bits(f, max, 0)), ok, "FC{f} {max}");
            assert_eq!(code(&mut u, &bits(f, max + 1, 0)), Some(ILLEGAL_VALUE), "FC{f} {}", max + 1);
            assert_eq!(code(&mut u, &bits(f, 0, 0)), Some(ILLEGAL_VALUE), "FC{f} 0");
        }
        assert_eq!(code(&mut u, &bits(15, 1968, 246)), None);
        assert_eq!(code(&mut u, &bits(15, 1969, 247)), Some(ILLEGAL_VALUE));
        assert_eq!(code(&mut u, &bits(15, 9, 1)), Some(ILLEGAL_VALUE), "9 coils need 2 bytes");
        assert_eq!(code(&mut u, &bits(16, 123, 246)), None);
        assert_eq!(code(&mut u, &bits(16, 124, 248)), Some(ILLEGAL_VALUE));
        assert_eq!(code(&mut u, &bits(16, 2, 2)), Some(ILLEGAL_VALUE), "2 registers need 4 bytes");
        // FC23: read 1..=125, write 1..=121, byte count twice the write quantity.
        let rw = |rq: u16, wq: u16, bc: usize| {
            let mut p = vec![23, 0, 0];
            p.extend_from_slice(&rq.to_be_bytes());
            p.extend_from_slice(&[0, 0]);
            p.extend_from_slice(&wq.to_be_bytes());
            p.push(bc as u8);
            p.extend(std::iter::repeat_n(0, bc));
            p
        };
        assert_eq!(code(&mut u, &rw(125, 121, 242)), None);
        assert_eq!(code(&mut u, &rw(126, 1, 2)), Some(ILLEGAL_VALUE));
        assert_eq!(code(&mut u, &rw(1, 122, 244)), Some(ILLEGAL_VALUE));
        assert_eq!(code(&mut u, &rw(0, 1, 2)), Some(ILLEGAL_VALUE));
        assert_eq!(code(&mut u, &rw(1, 1, 4)), Some(ILLEGAL_VALUE));
        // Quantity before address: a bad quantity at an unmapped address is 0x03.
        assert_eq!(code(&mut u, &[3, 0xFF, 0xFF, 0, 126]), Some(ILLEGAL_VALUE));
        assert_eq!(code(&mut u, &[3, 0xFF, 0xFF, 0, 2]), Some(ILLEGAL_ADDRESS));
        assert_eq!(code(&mut u, &[5, 0xFF, 0xFF, 0, 1]), Some(ILLEGAL_VALUE));
    }

    #[test]
    fn config_problems_are_all_reported() {
        let config: SimConfig = toml::from_str(
            "[line]\nbaud = 0\n[[unit]]\nunit = 1\n[[unit.register]]\ntable = \"holding\"\naddress = 0\n\
             values = [1]\nkind = \"sine\"\n[[unit.register]]\ntable = \"coils\"\naddress = 0\n\
             kind = \"sine\"\n[[unit.register]]\ntable = \"holding\"\naddress = 9\nkind = \"sine\"\n\
             min = 5\nmax = 1\n[[unit]]\nunit = 1\n",
        )
        .expect("parses");
        let (_, problems) = build(&config);
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems[1].starts_with("unit 1 register #1 (holding 0)"), "{problems:?}");
    }
}
