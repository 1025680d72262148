//! The poll plan: which read requests cover a device's points, and what they cost on the
//! wire.
//!
//! Points are grouped by (table, interval); within a group they are sorted by address
//! and merged greedily into one read while the read stays within the device's limit
//! (`max_registers` for holding/input, `max_bits` for coils/discrete, never above the
//! protocol's 125/2000) and the hole between two points is at most `max_gap`.
//!
//! Invariants: every point is covered by exactly one read of its group, at
//! `slot.offset .. slot.offset + width` inside it; reads come out ordered by table,
//! interval, start. Planning never panics: a point wider than the limit (which config
//! validation already refuses) simply gets a read of its own.
//!
//! Timing uses the RTU frame sizes and [`crate::serial::rtu`]'s character time and t3.5, so the
//! bus load printed by `m2m-gateway check` is what the line will actually carry.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use tokio_modbus::Request;

use crate::model::{Bus, Device, Line, Model};
use crate::point::names::Named;
use crate::point::value::Table;
use crate::serial::pdu::{MAX_READ_BITS, MAX_READ_REGISTERS};
use crate::serial::rtu::{t35, wire_time};

/// Bus load above which `render` adds a note: retries and writes need room too.
const NOTE_LOAD: f64 = 0.8;

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Table read.
    pub table: Table,
    /// First address (zero-based, as on the wire).
    pub start: u16,
    /// Registers or bits read.
    pub count: u16,
    /// How often the read is made (the interval of all its points).
    pub interval: Duration,
    /// The points decoded from the reply, in address order.
    pub slots: Vec<Slot>,
}

/// Where one point sits inside a [`Read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index into `device.points`.
    pub point: usize,
    /// Offset of the point's first register/bit from `Read::start`.
    pub offset: u16,
}

/// How points are turned into reads; `Merged` is what the gateway runs, the others are
/// baselines for the benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Merge across holes of up to the device's `max_gap`.
    Merged,
    /// Merge only touching or overlapping points (`max_gap` = 0).
    Contiguous,
    /// One read per point.
    PerPoint,
}

/// True for the single-bit tables (coils, discrete inputs).
fn is_bits(table: Table) -> bool {
    matches!(table, Table::Coils | Table::Discrete)
}

/// The most registers/bits one read of `table` may cover on `device`.
fn limit(device: &Device, table: Table) -> u32 {
    let (device_max, protocol_max) = if is_bits(table) {
        (device.max_bits, MAX_READ_BITS)
    } else {
        (device.max_registers, MAX_READ_REGISTERS)
    };
    u32::from(device_max.clamp(1, protocol_max))
}

/// The reads for a device's points, merged with the device's own limits.
pub fn plan_device(device: &Device) -> Vec<Read> {
    plan_device_with(device, Strategy::Merged)
}

/// Splits a merged read at its gaps, for a device that refuses to read registers no
/// point uses (exception 0x02 on a gap-bridging read). Empty when the read has no gap.
pub fn split_read(device: &Device, read: &Read) -> Vec<Read> {
    let sub = Device {
        points: read.slots.iter().map(|s| device.points[s.point].clone()).collect(),
        ..device.clone()
    };
    let mut parts = plan_device_with(&sub, Strategy::Contiguous);
    if parts.len() < 2 {
        return Vec::new();
    }
    for part in &mut parts {
        part.slots.iter_mut().for_each(|slot| slot.point = read.slots[slot.point].point);
    }
    parts
}

/// The reads for a device's points under `strategy`.
pub fn plan_device_with(device: &Device, strategy: Strategy) -> Vec<Read> {
    let mut groups: BTreeMap<(Table, Duration), Vec<usize>> = BTreeMap::new();
    for (i, p) in device.points.iter().enumerate() {
        groups.entry((p.table, p.interval)).or_default().push(i);
    }
    let max_gap = match strategy {
        Strategy::Merged => u32::from(device.max_gap),
        Strategy::Contiguous | Strategy::PerPoint => 0,
    };

    let mut reads = Vec::new();
    for ((table, interval), mut members) in groups {
        members.sort_by_key(|&i| (device.points[i].address, i));
        let limit = limit(device, table);
        // The read being built: start and exclusive end, in u32 so that a point at the
        // top of the address space cannot overflow.
        let mut current: Option<(u32, u32, Vec<Slot>)> = None;
        for i in members {
            let p = &device.points[i];
            let start = u32::from(p.address);
            // In a bit table every point is one bit; a zero-length string still reads one
            // register so that the request is valid.
            let width = if is_bits(table) { 1 } else { u32::from(p.data_type.width()).max(1) };
            let end = start + width;
            if let Some((s, e, slots)) = current.as_mut() {
                let joins = strategy != Strategy::PerPoint
                    && start.saturating_sub(*e) <= max_gap
                    && end.max(*e) - *s <= limit;
                if joins {
                    slots.push(Slot { point: i, offset: to_u16(start - *s) });
                    *e = (*e).max(end);
                    continue;
                }
            }
            if let Some(done) = current.take() {
                reads.push(finish(table, interval, done));
            }
            current = Some((start, end, vec![Slot { point: i, offset: 0 }]));
        }
        if let Some(done) = current {
            reads.push(finish(table, interval, done));
        }
    }
    // Groups come out by (table, interval) and each group by start already; the sort is
    // stable and only pins the documented order.
    reads.sort_by_key(|r| (r.table, r.interval, r.start));
    reads
}

fn to_u16(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn finish(table: Table, interval: Duration, (start, end, slots): (u32, u32, Vec<Slot>)) -> Read {
    Read { table, start: to_u16(start), count: to_u16(end - start), interval, slots }
}

/// The Modbus request for a read (FC1/2/3/4 by table).
pub fn read_request(read: &Read) -> Request<'static> {
    match read.table {
        Table::Coils => Request::ReadCoils(read.start, read.count),
        Table::Discrete => Request::ReadDiscreteInputs(read.start, read.count),
        Table::Holding => Request::ReadHoldingRegisters(read.start, read.count),
        Table::Input => Request::ReadInputRegisters(read.start, read.count),
    }
}

/// Bytes of the RTU request frame: unit, function, address, quantity, CRC.
pub fn request_bytes(_read: &Read) -> usize {
    8
}

/// Bytes of the RTU reply frame: unit, function, byte count, data, CRC.
pub fn response_bytes(read: &Read) -> usize {
    let count = usize::from(read.count);
    let data = if is_bits(read.table) { count.div_ceil(8) } else { 2 * count };
    5 + data
}

/// Line time of one transaction: the request, the frame gap (t3.5 by the spec), the
/// device's turnaround, the reply and the gap again before the next frame may start.
pub fn transaction_time(
    line: &Line,
    gap: Duration,
    turnaround: Duration,
    req_bytes: usize,
    rsp_bytes: usize,
) -> Duration {
    wire_time(line, req_bytes) + gap + turnaround + wire_time(line, rsp_bytes) + gap
}

/// The plan of one bus.
#[derive(Debug, Clone, PartialEq)]
pub struct BusPlan {
    /// Bus name.
    pub bus: String,
    /// The plan of every device, in configuration order.
    pub devices: Vec<DevicePlan>,
    /// Fraction of the line's time the reads take: the sum over reads of
    /// `transaction_time / interval` (1.0 = the line is never idle; infinite when a read
    /// has a zero interval).
    pub load: f64,
    /// The raw devices of a raw bus, in configuration order.
    pub raw: Vec<RawPlan>,
}

/// Reply size assumed for a raw device whose frames have no fixed length.
pub const RAW_REPLY_ASSUMED: usize = 64;

/// The line cost of one raw device.
#[derive(Debug, Clone, PartialEq)]
pub struct RawPlan {
    /// Device name.
    pub device: String,
    /// Request bytes (0 for a streaming device).
    pub request: usize,
    /// Reply bytes when the frame rule fixes them; `None`: unknown
    /// ([`RAW_REPLY_ASSUMED`] is used for the time).
    pub reply: Option<usize>,
    /// Poll interval; `None` for a streaming device (it owns its line, nothing is sent).
    pub interval: Option<Duration>,
    /// Line time of one transaction.
    pub time: Duration,
    /// Number of points.
    pub points: usize,
}

/// Modbus ASCII sends each RTU byte but the CRC as two hex digits, plus `:`, the LRC
/// (two digits) and CR LF: `2 * rtu_bytes + 1`.
fn ascii_bytes(rtu_bytes: usize) -> usize {
    2 * rtu_bytes + 1
}

/// The line cost of the raw devices of `bus`.
fn plan_raw(bus: &Bus) -> Vec<RawPlan> {
    bus.raw_devices
        .iter()
        .map(|d| {
            let (request, interval) = match &d.mode {
                crate::model::RawMode::Poll { request, interval } => (request.len(), Some(*interval)),
                crate::model::RawMode::Stream => (0, None),
            };
            let reply = match d.framing.framing.end {
                crate::serial::raw::FrameEnd::Fixed(n) => Some(n),
                _ => None,
            };
            let gap = bus.frame_gap.max(d.silence);
            let rsp = reply.unwrap_or(RAW_REPLY_ASSUMED);
            let time = wire_time(&bus.line, request) + gap + wire_time(&bus.line, rsp) + gap;
            RawPlan { device: d.name.clone(), request, reply, interval, time, points: d.points.len() }
        })
        .collect()
}

/// The plan of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePlan {
    /// Device name.
    pub device: String,
    /// Modbus unit id.
    pub unit: u8,
    /// The `[[template]]` the device was made from, if any.
    pub template: Option<String>,
    /// The reads, ordered by table, interval, start.
    pub reads: Vec<Read>,
    /// The line time of each read (same index as `reads`).
    pub times: Vec<Duration>,
}

/// Plans every device of a bus and sums the load.
pub fn plan_bus(bus: &Bus) -> BusPlan {
    let mut load = 0.0;
    let devices = bus
        .devices
        .iter()
        .map(|d| {
            let reads = plan_device(d);
            let ascii = bus.protocol == crate::model::Protocol::ModbusAscii;
            let size = |n: usize| if ascii { ascii_bytes(n) } else { n };
            let times: Vec<Duration> = reads
                .iter()
                .map(|r| {
                    let (req, rsp) = (size(request_bytes(r)), size(response_bytes(r)));
                    if bus.protocol == crate::model::Protocol::ModbusTcp {
                        // No line: the device's own response time is all there is.
                        return bus.frame_gap + d.turnaround;
                    }
                    transaction_time(&bus.line, bus.frame_gap, d.turnaround, req, rsp)
                })
                .collect();
            for (r, t) in reads.iter().zip(&times) {
                load += share(*t, r.interval);
            }
            DevicePlan { device: d.name.clone(), unit: d.unit, template: d.template.clone(), reads, times }
        })
        .collect();
    let raw = plan_raw(bus);
    load += raw.iter().filter_map(|r| Some(share(r.time, r.interval?))).sum::<f64>();
    BusPlan { bus: bus.name.clone(), devices, load, raw }
}

/// The fraction of time a transaction of `time` repeated every `interval` takes.
fn share(time: Duration, interval: Duration) -> f64 {
    let every = interval.as_secs_f64();
    if every > 0.0 { time.as_secs_f64() / every } else { f64::INFINITY }
}

/// Plans every bus of the model.
pub fn plan_model(model: &Model) -> Vec<BusPlan> {
    model.buses.iter().map(plan_bus).collect()
}

/// The points of every device made from a `[[template]]`, expanded: what the template
/// and the device's overrides resolved to (for `check`). Empty when no device uses one.
pub fn render_templated(model: &Model) -> String {
    let mut out = String::new();
    let devices = model.buses.iter().flat_map(|b| &b.devices);
    for d in devices.filter(|d| d.template.is_some()) {
        if out.is_empty() {
            out.push_str("devices made from templates, expanded (wire addresses):\n");
        }
        let _ =
            writeln!(out, "  {} (unit {}, template {})", d.name, d.unit, d.template.as_deref().unwrap_or(""));
        let rows: Vec<[String; 5]> = d
            .points
            .iter()
            .map(|p| {
                let short = p.name.strip_prefix(&format!("{}.", d.name)).unwrap_or(&p.name).to_string();
                let mut decode = type_label(p.data_type);
                if p.order != crate::point::value::WordOrder::Abcd {
                    let _ = write!(decode, " {:?}", p.order);
                    decode = decode.to_lowercase();
                }
                if p.scale != 1.0 {
                    let _ = write!(decode, " x{}", p.scale);
                }
                if p.offset != 0.0 {
                    let _ = write!(decode, " {:+}", p.offset);
                }
                [
                    short,
                    format!("{} {}", table_label(p.table), p.address),
                    decode,
                    p.unit.clone().unwrap_or_default(),
                    format!("every {}", humantime::format_duration(p.interval)),
                ]
            })
            .collect();
        let width = |i: usize| rows.iter().map(|r| r[i].len()).max().unwrap_or(0);
        let (w0, w1, w2, w3) = (width(0), width(1), width(2), width(3));
        for [name, at, decode, unit, every] in rows {
            let _ = writeln!(out, "    {name:w0$}  {at:w1$}  {decode:w2$}  {unit:w3$}  {every}");
        }
    }
    out
}

/// A point's type as the configuration writes it.
fn type_label(t: crate::point::value::DataType) -> String {
    use crate::point::value::DataType;
    match t {
        DataType::Bit(b) => format!("{} {b}", t.name()),
        DataType::Str(n) => format!("{} {n}", t.name()),
        _ => t.name().to_string(),
    }
}

/// A table as the plan names it (one coil table, but "coil" reads better in a row).
fn table_label(table: Table) -> &'static str {
    match table {
        Table::Coils => "coil",
        other => other.name(),
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn percent(load: f64) -> String {
    if load.is_finite() { format!("{:.1}%", load * 100.0) } else { "unbounded".to_string() }
}

/// `8N1`, `8E1`, `7O2`.
fn framing(line: &Line) -> String {
    format!("{}{}{}", line.data_bits, line.parity.letter(), line.stop_bits)
}

/// The columns of one read's line in the rendered plan.
fn read_columns(read: &Read, time: Duration) -> [String; 3] {
    let last = u32::from(read.start) + u32::from(read.count).max(1) - 1;
    let range = if read.count <= 1 {
        format!("{} {}", read.table, read.start)
    } else {
        format!("{} {}..={last}", read.table, read.start)
    };
    let (one, many) = if is_bits(read.table) { ("bit", "bits") } else { ("reg", "regs") };
    let size = format!(
        "({}, every {})",
        plural(usize::from(read.count), one, many),
        humantime::format_duration(read.interval)
    );
    let cost = format!("-> {}, {} on the wire", plural(read.slots.len(), "point", "points"), millis(time));
    [range, size, cost]
}

/// The human-readable plan `m2m-gateway check` prints: per bus its line settings, per
/// device the merged requests with their line time, the bus load, and a `warning:` line
/// when the intervals cannot fit on the line (a `note:` when it is over 80% busy).
pub fn render(model: &Model, plans: &[BusPlan]) -> String {
    let mut out = String::new();
    for plan in plans {
        let bus = model.buses.iter().find(|b| b.name == plan.bus);
        match bus {
            Some(b) if b.protocol == crate::model::Protocol::ModbusTcp => {
                let pace = if b.max_in_flight > 1 {
                    format!("up to {} requests outstanding at once", b.max_in_flight)
                } else {
                    "one transaction at a time".to_owned()
                };
                let _ = writeln!(
                    out,
                    "bus {} ({}, modbus-tcp device(s), {pace}; line times do not apply)",
                    b.name, b.port
                );
            }
            Some(b) => {
                let _ = writeln!(
                    out,
                    "bus {} ({}, {} baud {}, {} {})",
                    b.name,
                    b.port,
                    b.line.baud,
                    framing(&b.line),
                    if b.frame_gap == t35(&b.line) { "t3.5" } else { "frame gap" },
                    format_args!("{:.2} ms", b.frame_gap.as_secs_f64() * 1000.0),
                );
                if let Some(r) = b.rs485.filter(|r| r.mode == crate::serial::rs485::Mode::Rts) {
                    let _ = writeln!(
                        out,
                        "  userspace RS-485 direction control: the gateway sets RTS {} {:?} before each \
                         request and {} {:?} after its last bit has left (timed from the line's wire \
                         time); a port that refuses RTS control is not opened",
                        if r.invert_rts { "low" } else { "high" },
                        r.delay_before,
                        if r.invert_rts { "high" } else { "low" },
                        r.delay_after,
                    );
                } else if let Some(r) = &b.rs485 {
                    let _ = writeln!(
                        out,
                        "  kernel RS-485 direction control: RTS {} while sending, raised {:?} before and \
                         kept {:?} after; receiver {} while sending (a port whose driver refuses \
                         it is not opened)",
                        if r.invert_rts { "low" } else { "high" },
                        r.delay_before,
                        r.delay_after,
                        if r.rx_during_tx { "on" } else { "off" },
                    );
                } else if b.local_echo {
                    let _ = writeln!(out, "  the adapter's echo of each request is taken off (local_echo)");
                }
            }
            None => {
                let _ = writeln!(out, "bus {}", plan.bus);
            }
        }

        // Rows of (device label or blank, range, size, cost), padded per bus.
        let mut rows: Vec<(String, [String; 3])> = Vec::new();
        for d in &plan.devices {
            let label = match &d.template {
                Some(t) => format!("{} (unit {}, template {t})", d.device, d.unit),
                None => format!("{} (unit {})", d.device, d.unit),
            };
            if d.reads.is_empty() {
                rows.push((label, ["no points".to_string(), String::new(), String::new()]));
                continue;
            }
            for (k, (r, t)) in d.reads.iter().zip(&d.times).enumerate() {
                let label = if k == 0 { label.clone() } else { String::new() };
                rows.push((label, read_columns(r, *t)));
            }
        }
        for r in &plan.raw {
            let label = format!("{} (raw)", r.device);
            let points = plural(r.points, "point", "points");
            let Some(every) = r.interval else {
                rows.push((label, [format!("streaming -> {points}"), String::new(), String::new()]));
                continue;
            };
            let reply = match r.reply {
                Some(n) => plural(n, "byte", "bytes"),
                None => format!("length unknown, {RAW_REPLY_ASSUMED} assumed"),
            };
            rows.push((
                label,
                [
                    format!("request {}, reply {reply}", plural(r.request, "byte", "bytes")),
                    format!("(every {})", humantime::format_duration(every)),
                    format!("-> {points}, {} on the wire", millis(r.time)),
                ],
            ));
        }
        let w_label = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w_range = rows.iter().map(|r| r.1[0].len()).max().unwrap_or(0);
        let w_size = rows.iter().map(|r| r.1[1].len()).max().unwrap_or(0);
        for (label, [range, size, cost]) in rows {
            let line = format!("  {label:w_label$}  {range:w_range$}  {size:w_size$}  {cost}");
            let _ = writeln!(out, "{}", line.trim_end());
        }

        let requests: usize = plan.devices.iter().map(|d| d.reads.len()).sum::<usize>()
            + plan.raw.iter().filter(|r| r.interval.is_some()).count();
        let points: usize = bus.map_or(0, |b| b.devices.iter().map(|d| d.points.len()).sum())
            + plan.raw.iter().map(|r| r.points).sum::<usize>();
        let _ = writeln!(
            out,
            "  bus load: {} of line capacity ({} for {})",
            percent(plan.load),
            plural(requests, "request", "requests"),
            plural(points, "point", "points"),
        );
        if plan.load > 1.0 {
            let needed = percent(plan.load);
            let _ = writeln!(
                out,
                "warning: bus {}: configured intervals cannot fit on the line: {needed} needed; \
                 slow the intervals or raise the baud",
                plan.bus
            );
        } else if plan.load > NOTE_LOAD {
            let _ = writeln!(
                out,
                "note: bus {}: the line is {} busy; little room is left for retries and writes",
                plan.bus,
                percent(plan.load)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Gateway, Parity, Point, Protocol};
    use crate::point::value::{DataType, WordOrder};

    const SEC: Duration = Duration::from_secs(1);

    fn point(name: &str, table: Table, address: u16, data_type: DataType, interval: Duration) -> Point {
        Point {
            name: format!("dev.{name}"),
            table,
            address,
            data_type,
            order: WordOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            interval,
            stale_after: interval * 3,
            unit: None,
        }
    }

    fn hr(address: u16, data_type: DataType) -> Point {
        point("p", Table::Holding, address, data_type, SEC)
    }

    fn device(points: Vec<Point>) -> Device {
        Device {
            name: "boiler".into(),
            unit: 1,
            template: None,
            timeout: Duration::from_millis(200),
            turnaround: Duration::ZERO,
            max_registers: 125,
            max_bits: 2000,
            max_gap: 4,
            backoff_max: Duration::from_secs(60),
            points,
        }
    }

    fn line_9600(parity: Parity) -> Line {
        Line { baud: 9600, data_bits: 8, parity, stop_bits: 1 }
    }

    fn model(devices: Vec<Device>) -> Model {
        Model {
            gateway: Gateway {
                name: "gw".into(),
                summary_interval: Duration::from_secs(60),
                worker_threads: None,
                log_format: Default::default(),
            },
            buses: vec![Bus {
                name: "field".into(),
                port: "/dev/ttyUSB0".into(),
                line: line_9600(Parity::None),
                protocol: Protocol::ModbusRtu,
                frame_gap: t35(&line_9600(Parity::None)),
                local_echo: false,
                timeout: Duration::from_millis(200),
                retries: 1,
                queue_depth: 16,
                reopen_max: Duration::from_secs(30),
                max_in_flight: 1,
                devices,
                broadcast: false,
                rs485: None,
                raw_devices: Vec::new(),
            }],
            links: None,
            server: None,
            plcs: Vec::new(),
            http: None,
        }
    }

    #[test]
    fn raw_devices_cost_their_request_and_reply() {
        let text = r#"
[gateway]
name = "g"
[[bus]]
name = "w"
port = "/dev/x"
protocol = "raw"
baud = 9600
parity = "none"
[[raw_device]]
name = "meter"
bus = "w"
request_hex = "01 52"
checksum = "crc16-modbus"
interval = "100ms"
end = "fixed"
length = 9
[[raw_device.point]]
name = "flow"
byte = 2
type = "u16"
[[raw_device]]
name = "scale"
bus = "w"
request = "W\r\n"
end = "terminator"
terminator = "\r\n"
regex = '(?P<w>[0-9.]+)'
[[raw_device.point]]
name = "w"
"#;
        let model = crate::config::parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        let plans = plan_model(&model);
        let [meter, scale] = &plans[0].raw[..] else { panic!("two raw plans") };
        assert_eq!((meter.request, meter.reply), (4, Some(9)));
        assert_eq!((scale.request, scale.reply), (3, None));
        let line = model.buses[0].line;
        // 4 + 9 bytes on the wire and two t3.5 gaps, every 100 ms.
        assert_eq!(meter.time, wire_time(&line, 4) + wire_time(&line, 9) + t35(&line) * 2);
        assert!(plans[0].load > meter.time.as_secs_f64() / 0.1);
        let shown = render(&model, &plans);
        assert!(shown.contains("meter (raw)  request 4 bytes, reply 9 bytes"), "{shown}");
        assert!(shown.contains("reply length unknown, 64 assumed"), "{shown}");
        assert!(shown.contains("(2 requests for 2 points)"), "{shown}");
    }

    /// (table, start, count, number of points) of each read.
    fn shape(reads: &[Read]) -> Vec<(Table, u16, u16, usize)> {
        reads.iter().map(|r| (r.table, r.start, r.count, r.slots.len())).collect()
    }

    #[test]
    fn gaps_up_to_max_gap_merge() {
        // 0..2 (f32), gap 4 -> 6, gap 5 -> 12.
        let d = device(vec![hr(0, DataType::F32), hr(6, DataType::U16), hr(12, DataType::U16)]);
        let reads = plan_device(&d);
        assert_eq!(shape(&reads), [(Table::Holding, 0, 7, 2), (Table::Holding, 12, 1, 1)]);
        assert_eq!(reads[0].slots[1], Slot { point: 1, offset: 6 });
        assert_eq!(request_bytes(&reads[0]), 8);
        assert_eq!(response_bytes(&reads[0]), 5 + 14);
    }

    #[test]
    fn points_are_sorted_and_indexed() {
        let d = device(vec![hr(10, DataType::U16), hr(8, DataType::U32), hr(9, DataType::U16)]);
        let reads = plan_device(&d);
        assert_eq!(shape(&reads), [(Table::Holding, 8, 3, 3)]);
        assert_eq!(
            reads[0].slots,
            [Slot { point: 1, offset: 0 }, Slot { point: 2, offset: 1 }, Slot { point: 0, offset: 2 },]
        );
    }

    #[test]
    fn overlapping_points_share_a_read() {
        // A u32 at 4..6 and its low word as a u16 at 5, plus a bit of register 4.
        let d = device(vec![hr(4, DataType::U32), hr(5, DataType::U16), hr(4, DataType::Bit(3))]);
        let reads = plan_device(&d);
        assert_eq!(shape(&reads), [(Table::Holding, 4, 2, 3)]);
        assert_eq!(plan_device_with(&d, Strategy::Contiguous), reads, "overlap merges even without a gap");
    }

    #[test]
    fn protocol_and_device_limits_split() {
        // 130 consecutive registers: 125 + 5.
        let d = device((0..130).map(|a| hr(a, DataType::U16)).collect());
        assert_eq!(shape(&plan_device(&d)), [(Table::Holding, 0, 125, 125), (Table::Holding, 125, 5, 5)]);
        // A lower device limit; a device limit above the protocol's is clamped.
        let mut small = d.clone();
        small.max_registers = 50;
        assert_eq!(
            shape(&plan_device(&small)),
            [(Table::Holding, 0, 50, 50), (Table::Holding, 50, 50, 50), (Table::Holding, 100, 30, 30)]
        );
        let mut big = d;
        big.max_registers = 1000;
        assert_eq!(plan_device(&big)[0].count, 125);
        // A 4-register point does not straddle the limit: it starts a new read.
        let mut tight = device(vec![hr(0, DataType::U16), hr(1, DataType::U64)]);
        tight.max_registers = 4;
        assert_eq!(shape(&plan_device(&tight)), [(Table::Holding, 0, 1, 1), (Table::Holding, 1, 4, 1)]);
        // Wider than the limit: its own read, no panic.
        let mut tiny = device(vec![hr(0, DataType::U16), hr(1, DataType::Str(20))]);
        tiny.max_registers = 2;
        assert_eq!(shape(&plan_device(&tiny)), [(Table::Holding, 0, 1, 1), (Table::Holding, 1, 10, 1)]);
    }

    #[test]
    fn bit_tables() {
        let coil = |a| point("c", Table::Coils, a, DataType::Bool, SEC);
        let mut points: Vec<Point> = (0..2001).map(coil).collect();
        points.push(point("d", Table::Discrete, 3, DataType::Bool, SEC));
        points.push(point("e", Table::Discrete, 8, DataType::Bool, SEC));
        let d = device(points);
        let reads = plan_device(&d);
        assert_eq!(
            shape(&reads),
            [(Table::Coils, 0, 2000, 2000), (Table::Coils, 2000, 1, 1), (Table::Discrete, 3, 6, 2)]
        );
        assert_eq!(response_bytes(&reads[0]), 5 + 250);
        assert_eq!(response_bytes(&reads[2]), 6);
        assert_eq!(read_request(&reads[0]), Request::ReadCoils(0, 2000));
        assert_eq!(read_request(&reads[2]), Request::ReadDiscreteInputs(3, 6));
        let mut limited = d;
        limited.max_bits = 16;
        assert_eq!(plan_device(&limited)[0].count, 16);
    }

    #[test]
    fn intervals_and_tables_do_not_merge() {
        let d = device(vec![
            point("slow", Table::Holding, 1, DataType::U16, SEC * 10),
            point("fast", Table::Holding, 0, DataType::U16, SEC),
            point("in", Table::Input, 0, DataType::U16, SEC),
            point("fast2", Table::Holding, 2, DataType::U16, SEC),
        ]);
        let reads = plan_device(&d);
        let got: Vec<_> = reads.iter().map(|r| (r.table, r.interval, r.start, r.count)).collect();
        assert_eq!(
            got,
            [(Table::Holding, SEC, 0, 3), (Table::Holding, SEC * 10, 1, 1), (Table::Input, SEC, 0, 1),]
        );
        assert_eq!(read_request(&reads[0]), Request::ReadHoldingRegisters(0, 3));
        assert_eq!(read_request(&reads[2]), Request::ReadInputRegisters(0, 1));
    }

    #[test]
    fn strategies() {
        let d = device(vec![
            hr(0, DataType::U16),
            hr(1, DataType::F32),
            hr(5, DataType::U16),
            hr(20, DataType::U16),
        ]);
        assert_eq!(plan_device_with(&d, Strategy::Merged).len(), 2);
        assert_eq!(
            shape(&plan_device_with(&d, Strategy::Contiguous)),
            [(Table::Holding, 0, 3, 2), (Table::Holding, 5, 1, 1), (Table::Holding, 20, 1, 1)]
        );
        let per_point = plan_device_with(&d, Strategy::PerPoint);
        assert_eq!(per_point.len(), 4);
        assert!(per_point.iter().all(|r| r.slots.len() == 1));
        assert_eq!(per_point[1].count, 2);
    }

    #[test]
    fn ten_registers_at_9600() {
        let read = Read { table: Table::Holding, start: 0, count: 10, interval: SEC, slots: vec![] };
        assert_eq!((request_bytes(&read), response_bytes(&read)), (8, 25));
        // 8N1: 10 bits a character, 1.0417 ms; 33 characters = 34.4 ms, t3.5 = 3.65 ms.
        let line = line_9600(Parity::None);
        let t = transaction_time(&line, t35(&line), Duration::ZERO, 8, 25);
        assert_eq!(t, Duration::from_nanos(33 * 1_041_666 + 2 * 3_645_831));
        assert!((t.as_secs_f64() * 1000.0 - 41.67).abs() < 0.01, "{t:?}");
        // 8E1: 11 bits, 37.8 ms of characters, t3.5 = 4.01 ms; turnaround adds on.
        let line = line_9600(Parity::Even);
        let t = transaction_time(&line, t35(&line), Duration::from_millis(5), 8, 25);
        assert!((t.as_secs_f64() * 1000.0 - (37.81 + 8.02 + 5.0)).abs() < 0.01, "{t:?}");
    }

    #[test]
    fn bus_load_and_render() {
        let mut d = device(vec![
            hr(0, DataType::F32),
            hr(2, DataType::U16),
            hr(9, DataType::U16),
            point("c", Table::Coils, 0, DataType::Bool, SEC * 5),
        ]);
        d.name = "boiler".into();
        d.max_gap = 8;
        let mut other = device(vec![]);
        other.name = "meter".into();
        other.unit = 12;
        let m = model(vec![d, other]);
        let plans = plan_model(&m);
        assert_eq!(plans.len(), 1);
        let p = &plans[0];
        assert_eq!(p.devices[0].reads.len(), 2);
        assert_eq!(p.devices[0].times.len(), 2);
        // Coils (sorted first) every 5 s (8 + 6 bytes: 21.9 ms) + holding 0..=9 every 1 s
        // (41.67 ms).
        let expect = p.devices[0].times[0].as_secs_f64() / 5.0 + p.devices[0].times[1].as_secs_f64();
        assert!((p.load - expect).abs() < 1e-12);
        assert!((p.load - 0.0461).abs() < 0.001, "{}", p.load);

        let text = render(&m, &plans);
        let expected = "\
bus field (/dev/ttyUSB0, 9600 baud 8N1, t3.5 3.65 ms)
  boiler (unit 1)  coils 0        (1 bit, every 5s)    -> 1 point, 21.9 ms on the wire
                   holding 0..=9  (10 regs, every 1s)  -> 3 points, 41.7 ms on the wire
  meter (unit 12)  no points
  bus load: 4.6% of line capacity (2 requests for 4 points)
";
        assert_eq!(text, expected);
        assert!(text.contains("  meter (unit 12)  no points\n"), "{text}");
        assert!(text.contains("  bus load: 4.6% of line capacity (2 requests for 4 points)\n"), "{text}");
        assert!(!text.contains("warning:") && !text.contains("note:"), "{text}");
    }

    #[test]
    fn overloaded_bus_warns() {
        // 30 separate registers every 100 ms at 9600: ~26 ms each, far over the line.
        let points = (0..30)
            .map(|a| point("p", Table::Holding, a * 10, DataType::U16, Duration::from_millis(100)))
            .collect();
        let m = model(vec![device(points)]);
        let plans = plan_model(&m);
        assert!(plans[0].load > 1.0);
        let text = render(&m, &plans);
        let warning = text
            .lines()
            .find(|l| l.starts_with("warning:"))
            .unwrap_or_else(|| panic!("no warning in {text}"));
        assert!(warning.contains("configured intervals cannot fit on the line"), "{warning}");
        assert!(warning.contains("slow the intervals or raise the baud"), "{warning}");
        assert!(warning.contains(&format!("{:.1}% needed", plans[0].load * 100.0)), "{warning}");

        // Just over 80%: a note, not a warning.
        let mut busy = plans[0].clone();
        busy.load = 0.85;
        let text = render(&m, &[busy]);
        assert!(text.lines().any(|l| l.starts_with("note:")), "{text}");
        assert!(!text.contains("warning:"), "{text}");
    }
}
