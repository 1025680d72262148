//! The `[[raw_device]]` sections: devices on a `protocol = "raw"` bus that speak their own
//! serial protocol (scales, barcode/RFID readers, gas analysers, GPS/NMEA, meters).
//!
//! ```toml
//! [[raw_device]]
//! name = "scale"             # required, unique among all devices; points are scale.<point>
//! bus = "scales"             # required, a [[bus]] with protocol = "raw"
//! mode = "poll"              # poll (request/response, default) | stream (talks by itself;
//!                            #   then it is the only device of its bus, and takes no
//!                            #   request, address, interval or command)
//! request = "W\r\n"          # poll: the request as text with escapes \r \n \t \0 \\ \xHH
//! request_hex = "01 03 00"   #   ... or as hex bytes (exactly one of the two)
//! address = "01"             # text put in for {address} in the request
//! interval = "1s"            # poll interval, default 1s, >= 10ms
//! timeout = "500ms"          # default: the bus timeout
//! stale_after = "3s"         # default 3 x interval (poll) or 5s (stream)
//! start = "$"                # optional start marker (or start_hex); bytes before it are noise
//! end = "terminator"         # required: terminator | fixed | length | silence
//! terminator = "\r\n"        # end = terminator: the end marker (or terminator_hex)
//! length = 12                # end = fixed: total frame length, start marker included
//! length_offset = 2          # end = length: offset of the length field from the frame start
//! length_width = 1           #   1 | 2 bytes (default 1)
//! length_order = "be"        #   be | le for a 2-byte field (default be)
//! length_adjust = 0          #   total frame length = field value + adjust (default 0)
//! silence = "20ms"           # quiet time that ends a frame (end = silence; default 20ms);
//!                            #   1ms..=10s; the bus keeps the longest of its devices'
//! checksum = "xor"           # none|sum8|sum16|xor|lrc|crc16-modbus|crc16-ccitt|crc16-xmodem|crc32
//! checksum_format = "hex"    # be | le | hex (default: le for crc16-modbus, else be)
//! checksum_skip = 1          # leading bytes not covered (a start marker), default 0
//! checksum_gap = 1           # bytes between the covered bytes and the checksum ('*'), default 0
//! checksum_trailer = 2       # bytes after the checksum (a terminator), default 0
//! checksum_send = true       # also put the checksum into requests and commands, default true
//! regex = '^ST,GS,(?P<weight>[-+ 0-9.]+)kg'   # text frames: points are named captures
//!
//! [[raw_device.point]]       # text point (the device has a regex)
//! name = "weight"            # required, unique in the device
//! capture = "weight"         # capture group name or number, default: the point name
//! kind = "number"            # number | int | text | bool, default number
//! scale = 1.0                # default 1, finite, not 0 (number, int)
//! offset = 0.0               # default 0
//! unit = "kg"                # engineering unit label, optional
//!
//! [[raw_device.point]]       # binary point (the device has no regex)
//! name = "flow"
//! byte = 3                   # required: offset of the field from the frame start
//! type = "u16"               # u8|i8|bit|u16|i16|u32|i32|u64|i64|f32|f64|string, default u8
//! bit = 0                    # 0..=7, required with type = "bit"
//! length = 8                 # bytes, required with type = "string"
//! order = "abcd"             # abcd (big-endian) | dcba (little-endian) | badc | cdab
//! scale = 0.1
//!
//! [[raw_device.command]]     # a writable point: writing it sends the formatted template
//! name = "setpoint"          # required, unique among the device's points and commands
//! template = "SP{value:.1}\r\n"   # escapes as in request; {value}, {value:+08.2}, {{ }}
//! ok = "^OK"                 # the reply must match this regex (needs reply = true)
//! reply = true               # wait for a reply frame, default true
//! timeout = "1s"             # default: the device timeout
//! ```
//!
//! The checksum rule is checked on every received frame and, unless `checksum_send =
//! false`, put into the request and commands as well (inserted before the trailer).
//! Raw devices are a section of their own rather than `[[device]]` entries: their keys
//! and points share nothing with Modbus devices, and keeping the two schemas apart keeps
//! `deny_unknown_fields` (and its messages) exact for both. Regexes are compiled here, so a bad
//! one is a configuration problem naming the pattern, never a runtime surprise.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::device::INTERVAL_MIN;
use super::{Checker, item, number};
use crate::model::{Bus, Protocol, RawCommand, RawDevice, RawMode, RawPoint};
use crate::point::extract::{self, BinField, BinKind, Extract, TextField, TextKind};
use crate::point::names;
use crate::point::value::{DataType, Value, WordOrder};
use crate::serial::checksum::{CheckFormat, Checksum, ChecksumRule};
use crate::serial::raw::{self, FrameEnd, FrameRule, RawFraming};

const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT_MIN: Duration = Duration::from_millis(1);
const STREAM_STALE: Duration = Duration::from_secs(5);
const SILENCE: Duration = Duration::from_millis(20);
const MAX_FRAME: i64 = raw::MAX_FRAME as i64;

/// One `[[raw_device]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSerialDevice {
    name: Spanned<String>,
    bus: Spanned<String>,
    mode: Option<Spanned<Mode>>,
    request: Option<Spanned<String>>,
    request_hex: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    stale_after: Option<Spanned<String>>,
    start: Option<Spanned<String>>,
    start_hex: Option<Spanned<String>>,
    end: Spanned<End>,
    terminator: Option<Spanned<String>>,
    terminator_hex: Option<Spanned<String>>,
    length: Option<Spanned<i64>>,
    length_offset: Option<Spanned<i64>>,
    length_width: Option<Spanned<i64>>,
    length_order: Option<Spanned<ByteOrder>>,
    length_adjust: Option<Spanned<i64>>,
    silence: Option<Spanned<String>>,
    checksum: Option<Spanned<String>>,
    checksum_format: Option<Spanned<String>>,
    checksum_skip: Option<Spanned<i64>>,
    checksum_gap: Option<Spanned<i64>>,
    checksum_trailer: Option<Spanned<i64>>,
    checksum_send: Option<Spanned<bool>>,
    regex: Option<Spanned<String>>,
    #[serde(default)]
    point: Vec<RawField>,
    #[serde(default)]
    command: Vec<RawCommandConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Poll,
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum End {
    Terminator,
    Fixed,
    Length,
    Silence,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::Terminator => "terminator",
            End::Fixed => "fixed",
            End::Length => "length",
            End::Silence => "silence",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ByteOrder {
    Be,
    Le,
}

/// One `[[raw_device.point]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: Spanned<String>,
    capture: Option<Spanned<String>>,
    kind: Option<Spanned<String>>,
    byte: Option<Spanned<i64>>,
    #[serde(rename = "type")]
    data_type: Option<Spanned<String>>,
    bit: Option<Spanned<i64>>,
    length: Option<Spanned<i64>>,
    order: Option<WordOrder>,
    scale: Option<Spanned<f64>>,
    offset: Option<Spanned<f64>>,
    unit: Option<String>,
}

/// One `[[raw_device.command]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommandConfig {
    name: Spanned<String>,
    template: Spanned<String>,
    ok: Option<Spanned<String>>,
    reply: Option<bool>,
    timeout: Option<Spanned<String>>,
}

/// Resolves every `[[raw_device]]` and appends it to its bus's `raw_devices`. Runs after
/// the Modbus devices are attached, so names are checked across both kinds.
pub(super) fn validate(raw: &[RawSerialDevice], buses: &mut [Bus], check: &mut Checker) {
    let mut names: HashSet<String> =
        buses.iter().flat_map(|b| b.devices.iter().map(|d| d.name.clone())).collect();
    // Stream devices by bus index, to check they are alone on their bus.
    let mut streams: HashMap<usize, &Spanned<String>> = HashMap::new();
    for r in raw {
        let path = item("raw_device", &r.name);
        check.name(&r.name, &path);
        if !names.insert(r.name.get_ref().clone()) {
            check.report(r.name.span(), &path, "name is already used by another device");
        }
        let bus = buses.iter().position(|b| b.name == *r.bus.get_ref());
        match bus.and_then(|b| buses.get(b)) {
            None => check.report(
                r.bus.span(),
                &path,
                format!("bus {:?} is not defined by any [[bus]]", r.bus.get_ref()),
            ),
            Some(b) if b.protocol != Protocol::Raw => check.report(
                r.bus.span(),
                &path,
                format!("bus {:?} does not have protocol = \"raw\"", r.bus.get_ref()),
            ),
            Some(_) => {}
        }
        let bus_timeout = bus.and_then(|b| buses.get(b)).map_or(TIMEOUT_MIN, |b| b.timeout);
        let mut device = resolve(r, &path, bus_timeout, check);
        let Some(b) = bus.filter(|b| buses.get(*b).is_some_and(|b| b.protocol == Protocol::Raw)) else {
            continue;
        };
        if device.mode == RawMode::Stream {
            streams.insert(b, &r.name);
        }
        let Some(bus) = buses.get_mut(b) else { continue };
        let count = bus.raw_devices.len();
        match u8::try_from(count + 1).ok().filter(|id| *id <= 247) {
            Some(id) => device.id = id,
            None => check.report(r.name.span(), &path, "a raw bus carries at most 247 devices"),
        }
        bus.raw_devices.push(device);
    }
    for (b, name) in streams {
        if let Some(bus) = buses.get(b).filter(|bus| bus.raw_devices.len() > 1) {
            check.report(
                name.span(),
                &item("raw_device", name),
                format!(
                    "mode = \"stream\" needs bus {:?} to itself, but it has {} raw devices",
                    bus.name,
                    bus.raw_devices.len()
                ),
            );
        }
    }
}

/// Reports `key` when it is set where it does not belong.
fn refuse<T>(check: &mut Checker, value: &Option<Spanned<T>>, path: &str, message: &str) {
    if let Some(v) = value {
        check.report(v.span(), path, message);
    }
}

/// Bytes of a text-or-hex pair of keys (`start`/`start_hex`); `None` when neither is set.
fn bytes_key(
    check: &mut Checker,
    text: &Option<Spanned<String>>,
    hex: &Option<Spanned<String>>,
    path: &str,
    key: &str,
) -> Option<Vec<u8>> {
    match (text, hex) {
        (Some(t), Some(_)) => {
            check.report(t.span(), path, format!("give {key} or {key}_hex, not both"));
            None
        }
        (Some(t), None) => match raw::unescape(t.get_ref()) {
            Ok(b) => Some(b),
            Err(e) => {
                check.report(t.span(), path, format!("{key} {e}"));
                None
            }
        },
        (None, Some(h)) => match raw::parse_hex(h.get_ref()) {
            Ok(b) => Some(b),
            Err(e) => {
                check.report(h.span(), path, format!("{key}_hex {e}"));
                None
            }
        },
        (None, None) => None,
    }
}

fn frame_rule(r: &RawSerialDevice, path: &str, check: &mut Checker) -> FrameRule {
    let end = *r.end.get_ref();
    let only = |k: End| format!("is only used with end = \"{}\"", k.label());
    if end != End::Terminator {
        refuse(check, &r.terminator, path, &format!("terminator {}", only(End::Terminator)));
        refuse(check, &r.terminator_hex, path, &format!("terminator_hex {}", only(End::Terminator)));
    }
    if end != End::Fixed {
        refuse(check, &r.length, path, &format!("length {}", only(End::Fixed)));
    }
    if end != End::Length {
        refuse(check, &r.length_offset, path, &format!("length_offset {}", only(End::Length)));
        refuse(check, &r.length_width, path, &format!("length_width {}", only(End::Length)));
        refuse(check, &r.length_order, path, &format!("length_order {}", only(End::Length)));
        refuse(check, &r.length_adjust, path, &format!("length_adjust {}", only(End::Length)));
    }
    let missing = |check: &mut Checker, what: &str| {
        check.report(r.end.span(), path, format!("end = \"{}\" needs {what}", end.label()));
    };
    let start = bytes_key(check, &r.start, &r.start_hex, path, "start");
    let end = match end {
        End::Terminator => {
            let t = bytes_key(check, &r.terminator, &r.terminator_hex, path, "terminator");
            if r.terminator.is_none() && r.terminator_hex.is_none() {
                missing(check, "terminator (or terminator_hex), e.g. terminator = \"\\r\\n\"");
            }
            FrameEnd::Terminator(t.unwrap_or_else(|| b"\n".to_vec()))
        }
        End::Fixed => match &r.length {
            Some(l) => FrameEnd::Fixed(check.int(Some(l), 1, 1..=MAX_FRAME, path, "length")),
            None => {
                missing(check, "length, the total frame length in bytes");
                FrameEnd::Fixed(1)
            }
        },
        End::Length => {
            let offset = match &r.length_offset {
                Some(o) => check.int(Some(o), 0, 0..=MAX_FRAME - 1, path, "length_offset"),
                None => {
                    missing(check, "length_offset, where the length field is in the frame");
                    0
                }
            };
            FrameEnd::LengthField {
                offset,
                width: check.int(r.length_width.as_ref(), 1, 1..=2, path, "length_width"),
                big_endian: r.length_order.as_ref().is_none_or(|o| *o.get_ref() == ByteOrder::Be),
                adjust: check.int(r.length_adjust.as_ref(), 0, -MAX_FRAME..=MAX_FRAME, path, "length_adjust"),
            }
        }
        End::Silence => FrameEnd::Silence,
    };
    FrameRule { start, end }
}

fn checksum_rule(r: &RawSerialDevice, path: &str, check: &mut Checker) -> ChecksumRule {
    let kind = match &r.checksum {
        None => Checksum::None,
        Some(c) => c.get_ref().parse::<Checksum>().unwrap_or_else(|e| {
            check.report(c.span(), path, format!("checksum: {e}"));
            Checksum::None
        }),
    };
    if kind == Checksum::None {
        let what = "is only used with a checksum";
        refuse(check, &r.checksum_format, path, &format!("checksum_format {what}"));
        refuse(check, &r.checksum_skip, path, &format!("checksum_skip {what}"));
        refuse(check, &r.checksum_gap, path, &format!("checksum_gap {what}"));
        refuse(check, &r.checksum_trailer, path, &format!("checksum_trailer {what}"));
        refuse(check, &r.checksum_send, path, &format!("checksum_send {what}"));
        return ChecksumRule::NONE;
    }
    let format = match &r.checksum_format {
        None => kind.default_format(),
        Some(f) => f.get_ref().parse::<CheckFormat>().unwrap_or_else(|e| {
            check.report(f.span(), path, format!("checksum_format: {e}"));
            kind.default_format()
        }),
    };
    let part = |check: &mut Checker, v: &Option<Spanned<i64>>, key| {
        check.int(v.as_ref(), 0usize, 0..=MAX_FRAME, path, key)
    };
    ChecksumRule {
        kind,
        format,
        skip: part(check, &r.checksum_skip, "checksum_skip"),
        gap: part(check, &r.checksum_gap, "checksum_gap"),
        trailer: part(check, &r.checksum_trailer, "checksum_trailer"),
    }
}

/// The regex crate's message, on one line: its `error:` line when it has one.
fn regex_message(e: &extract::ExtractError) -> String {
    match e {
        extract::ExtractError::Regex { message, .. } => message
            .lines()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .unwrap_or(message.lines().last().unwrap_or(message))
            .trim()
            .to_string(),
        other => other.to_string(),
    }
}

fn compile(
    check: &mut Checker,
    pattern: &Spanned<String>,
    path: &str,
    key: &str,
) -> Option<extract::Pattern> {
    extract::compile_regex(pattern.get_ref())
        .map_err(|e| {
            check.report(
                pattern.span(),
                path,
                format!("{key} {:?} does not compile: {}", pattern.get_ref(), regex_message(&e)),
            )
        })
        .ok()
}

fn resolve(r: &RawSerialDevice, path: &str, bus_timeout: Duration, check: &mut Checker) -> RawDevice {
    let stream = r.mode.as_ref().is_some_and(|m| *m.get_ref() == Mode::Stream);
    let timeout = check.duration(r.timeout.as_ref(), bus_timeout, TIMEOUT_MIN, path, "timeout");
    let framing = frame_rule(r, path, check);
    let checksum = checksum_rule(r, path, check);
    let send_checksum =
        if r.checksum_send.as_ref().is_none_or(|s| *s.get_ref()) { checksum } else { ChecksumRule::NONE };
    let framing = RawFraming { framing, checksum };
    if let Err(e) = framing.validate() {
        check.report(r.end.span(), path, e.to_string());
    }
    let silence_default = if *r.end.get_ref() == End::Silence { SILENCE } else { Duration::ZERO };
    let silence = check.duration_within(
        r.silence.as_ref(),
        silence_default,
        Duration::from_millis(1)..=Duration::from_secs(10),
        path,
        "silence",
    );

    let (mode, interval) = if stream {
        let why = "is not used with mode = \"stream\" (the device talks by itself)";
        refuse(check, &r.request, path, &format!("request {why}"));
        refuse(check, &r.request_hex, path, &format!("request_hex {why}"));
        refuse(check, &r.address, path, &format!("address {why}"));
        refuse(check, &r.interval, path, &format!("interval {why}"));
        if let Some(c) = r.command.first() {
            check.report(c.name.span(), path, "commands need mode = \"poll\": a stream bus sends nothing");
        }
        (RawMode::Stream, None)
    } else {
        let interval = check.duration(r.interval.as_ref(), INTERVAL, INTERVAL_MIN, path, "interval");
        let template = bytes_key(check, &r.request, &r.request_hex, path, "request");
        if r.request.is_none() && r.request_hex.is_none() {
            check.report(
                r.name.span(),
                path,
                "needs request (or request_hex), or mode = \"stream\" for a device that talks by itself",
            );
        }
        let address = r.address.as_ref().map(|a| a.get_ref().as_str());
        let request = template
            .map(|t| {
                raw::build_request(&t, address, &send_checksum).unwrap_or_else(|e| {
                    let span =
                        r.request.as_ref().or(r.request_hex.as_ref()).map_or(r.name.span(), |s| s.span());
                    check.report(span, path, format!("request: {e}"));
                    Vec::new()
                })
            })
            .unwrap_or_default();
        (RawMode::Poll { request, interval }, Some(interval))
    };
    let stale_default = interval.map_or(STREAM_STALE, |i| i * 3);
    let stale_after = check.duration(
        r.stale_after.as_ref(),
        stale_default,
        interval.unwrap_or(TIMEOUT_MIN),
        path,
        "stale_after",
    );

    let (points, extract) = points(r, path, stale_after, &framing, check);
    let commands = commands(r, path, timeout, &points, check);
    if points.is_empty() && (stream || commands.is_empty()) {
        check.report(
            r.name.span(),
            path,
            "has no points: add at least one [[raw_device.point]] (or a [[raw_device.command]])",
        );
    }
    RawDevice {
        name: r.name.get_ref().clone(),
        id: 0,
        mode,
        framing,
        send_checksum,
        timeout,
        silence,
        extract,
        points,
        commands,
    }
}

fn points(
    r: &RawSerialDevice,
    device_path: &str,
    stale_after: Duration,
    framing: &RawFraming,
    check: &mut Checker,
) -> (Vec<RawPoint>, Extract) {
    let device = r.name.get_ref();
    let mut names: HashSet<&str> = HashSet::new();
    let mut points = Vec::with_capacity(r.point.len());
    let re = r.regex.as_ref().and_then(|p| compile(check, p, device_path, "regex"));
    let mut text_fields = Vec::new();
    let mut bin_fields = Vec::new();
    for (i, p) in r.point.iter().enumerate() {
        let path = format!("{device_path} point {:?}", p.name.get_ref());
        check.name(&p.name, &path);
        if !names.insert(p.name.get_ref()) {
            check.report(p.name.span(), &path, "name is already used by another point of this device");
        }
        let scale = number(check, p.scale.as_ref(), 1.0, f64::MIN..=f64::MAX, "finite", &path, "scale");
        if scale == 0.0
            && let Some(s) = &p.scale
        {
            check.report(s.span(), &path, "scale 0 would make every value 0");
        }
        let offset = number(check, p.offset.as_ref(), 0.0, f64::MIN..=f64::MAX, "finite", &path, "offset");
        if r.regex.is_some() {
            let why = "is for binary frames; this device reads text with its regex";
            refuse(check, &p.byte, &path, &format!("byte {why}"));
            refuse(check, &p.data_type, &path, &format!("type {why} (use kind)"));
            refuse(check, &p.bit, &path, &format!("bit {why}"));
            refuse(check, &p.length, &path, &format!("length {why}"));
            let kind = match &p.kind {
                None => TextKind::Number,
                Some(k) => k.get_ref().parse().unwrap_or_else(|e: extract::ExtractError| {
                    check.report(k.span(), &path, e.to_string());
                    TextKind::Number
                }),
            };
            let capture = p.capture.as_ref().unwrap_or(&p.name);
            let field = TextField { capture: capture.get_ref().clone(), point: i, kind, scale, offset };
            if let Some(re) = &re
                && extract::check_captures(re, std::slice::from_ref(&field)).is_err()
            {
                let groups: Vec<&str> = re.capture_names().flatten().collect();
                check.report(
                    capture.span(),
                    &path,
                    format!(
                        "regex has no capture group {:?} (named groups: {})",
                        capture.get_ref(),
                        if groups.is_empty() { "none".to_string() } else { groups.join(", ") }
                    ),
                );
            }
            text_fields.push(field);
        } else {
            let why = "needs a regex on the device";
            refuse(check, &p.capture, &path, &format!("capture {why}"));
            refuse(check, &p.kind, &path, &format!("kind {why} (binary fields take type)"));
            let Some(byte) = &p.byte else {
                check.report(
                    p.name.span(),
                    &path,
                    "needs byte (the offset of a binary field), or a regex on the device for text frames",
                );
                continue;
            };
            let at = check.int(Some(byte), 0usize, 0..=MAX_FRAME - 1, &path, "byte");
            let kind = bin_kind(p, &path, check);
            let end = at + kind.size();
            let limit = match framing.framing.end {
                FrameEnd::Fixed(n) => n,
                _ => raw::MAX_FRAME,
            };
            if end > limit {
                check.report(
                    byte.span(),
                    &path,
                    format!(
                        "field of {} bytes at byte {at} ends past the frame's {limit} bytes",
                        kind.size()
                    ),
                );
            }
            bin_fields.push(BinField {
                at,
                kind,
                order: p.order.unwrap_or(WordOrder::Abcd),
                scale,
                offset,
                point: i,
            });
        }
        points.push(RawPoint {
            name: format!("{device}.{}", p.name.get_ref()),
            stale_after,
            unit: p.unit.clone(),
        });
    }
    let extract = match re {
        Some(re) => Extract::Regex { re, fields: text_fields },
        None => Extract::Binary { fields: bin_fields },
    };
    (points, extract)
}

fn bin_kind(p: &RawField, path: &str, check: &mut Checker) -> BinKind {
    let name = p.data_type.as_ref().map_or("u8", |t| t.get_ref().as_str());
    let span = p.data_type.as_ref().map_or(p.name.span(), |t| t.span());
    if name != "bit" {
        refuse(check, &p.bit, path, "bit is only used with type = \"bit\"");
    }
    if name != "string" {
        refuse(check, &p.length, path, "length is only used with type = \"string\"");
    }
    match name {
        "u8" => BinKind::U8,
        "i8" => BinKind::I8,
        "bit" => BinKind::Bit8(match &p.bit {
            Some(b) => check.int(Some(b), 0, 0..=7, path, "bit"),
            None => {
                check.report(span, path, "type \"bit\" needs bit, 0..=7 (0 = least significant)");
                0
            }
        }),
        "string" => BinKind::Data(DataType::Str(match &p.length {
            Some(l) => check.int(Some(l), 1, 1..=MAX_FRAME, path, "length"),
            None => {
                check.report(span, path, "type \"string\" needs length, in bytes");
                1
            }
        })),
        numeric if let Some(t) = names::parse::<DataType>(numeric).filter(|t| t.is_numeric()) => {
            BinKind::Data(t)
        }
        other => {
            check.report(
                span,
                path,
                format!("unknown type {other:?} (valid: u8, i8, bit, u16, i16, u32, i32, u64, i64, f32, f64, string)"),
            );
            BinKind::U8
        }
    }
}

fn commands(
    r: &RawSerialDevice,
    device_path: &str,
    device_timeout: Duration,
    points: &[RawPoint],
    check: &mut Checker,
) -> Vec<RawCommand> {
    let device = r.name.get_ref();
    let mut names: HashSet<String> = points.iter().map(|p| p.name.clone()).collect();
    let mut out = Vec::with_capacity(r.command.len());
    for c in &r.command {
        let path = format!("{device_path} command {:?}", c.name.get_ref());
        check.name(&c.name, &path);
        let name = format!("{device}.{}", c.name.get_ref());
        if !names.insert(name.clone()) {
            check.report(c.name.span(), &path, "name is already used by a point or command of this device");
        }
        // A probe value shows template mistakes (escapes, placeholders, format specs) now.
        for probe in [Value::Float(1.5), Value::Int(-2)] {
            match raw::format_command(c.template.get_ref(), &probe) {
                Err(e @ raw::RawError::Text { .. }) => {
                    check.report(c.template.span(), &path, format!("template {e}"));
                    break;
                }
                _ => continue,
            }
        }
        let reply = c.reply.unwrap_or(true);
        let ok = c.ok.as_ref().and_then(|p| compile(check, p, &path, "ok"));
        if let (Some(o), false) = (&c.ok, reply) {
            check.report(o.span(), &path, "ok needs reply = true: there is no reply to check");
        }
        out.push(RawCommand {
            name,
            template: c.template.get_ref().clone(),
            ok,
            reply,
            timeout: check.duration(c.timeout.as_ref(), device_timeout, TIMEOUT_MIN, &path, "timeout"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::{ConfigError, parse};
    use crate::model::RawMode;

    const HEAD: &str =
        "[gateway]\nname = \"g\"\n[[bus]]\nname = \"l\"\nport = \"/dev/x\"\nprotocol = \"raw\"\n";

    #[test]
    fn nmea_request_gets_its_checksum_and_checksum_send_false_leaves_it_out() {
        let device = |send: &str| {
            format!(
                "{HEAD}[[raw_device]]\nname = \"gps\"\nbus = \"l\"\nrequest = \"$PMTK220,1000*\\r\\n\"\n\
                 end = \"terminator\"\nterminator = \"\\r\\n\"\nchecksum = \"xor\"\nchecksum_format = \"hex\"\n\
                 checksum_skip = 1\nchecksum_gap = 1\nchecksum_trailer = 2\n{send}\
                 regex = '(?P<x>\\d+)'\n[[raw_device.point]]\nname = \"x\"\n"
            )
        };
        let model = parse(&device(""), "t.toml").unwrap_or_else(|e| panic!("{e}"));
        let d = &model.buses[0].raw_devices[0];
        // A published MTK command with its checksum.
        assert!(matches!(&d.mode, RawMode::Poll { request, .. } if request == b"$PMTK220,1000*1F\r\n"));
        let model = parse(&device("checksum_send = false\n"), "t.toml").unwrap_or_else(|e| panic!("{e}"));
        let d = &model.buses[0].raw_devices[0];
        assert!(matches!(&d.mode, RawMode::Poll { request, .. } if request == b"$PMTK220,1000*\r\n"));
    }

    #[test]
    fn unknown_keys_and_missing_end_are_shape_errors() {
        let text = format!("{HEAD}[[raw_device]]\nname = \"a\"\nbus = \"l\"\nrequest = \"?\"\n");
        let err = parse(&text, "t.toml").expect_err("end is required");
        assert!(matches!(&err, ConfigError::Invalid(p) if p.len() == 1), "{err}");
        assert!(err.to_string().contains("raw_device \"a\": missing field `end`"), "{err}");
        let text = format!("{HEAD}[[raw_device]]\nname = \"a\"\nbus = \"l\"\nend = \"silence\"\nbogus = 1\n");
        let err = parse(&text, "t.toml").expect_err("unknown key");
        assert!(err.to_string().contains("unknown field `bogus`"), "{err}");
    }
}
