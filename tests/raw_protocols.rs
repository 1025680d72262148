//! Raw serial protocols end to end through the pure building blocks: request templates,
//! frame rules, checksums and extraction, with real device frames.

use m2m_gateway::point::extract::{
    BinField, BinKind, Extract, ExtractError, TextField, TextKind, compile_regex, extract, parse_int,
    parse_number,
};
use m2m_gateway::point::value::{DataType, Value, WordOrder};
use m2m_gateway::serial::ascii::Ascii;
use m2m_gateway::serial::checksum::{CheckFormat, Checksum, ChecksumRule};
use m2m_gateway::serial::framing::{Decoded, Framing, SkipReason};
use m2m_gateway::serial::raw::{
    FrameEnd, FrameRule, MAX_FRAME, RawError, RawFraming, build_request, find_frame, format_command,
    parse_hex, unescape,
};
use rand::{Rng, SeedableRng};
use tokio_modbus::{Request, Response};

fn crlf() -> FrameRule {
    FrameRule { start: None, end: FrameEnd::Terminator(b"\r\n".to_vec()) }
}

fn reply(len: usize, frame: &[u8]) -> Decoded {
    Decoded::Reply { len, reply: Ok(Response::Custom(0, bytes::Bytes::copy_from_slice(frame))) }
}

fn skip(len: usize, why: SkipReason) -> Decoded {
    Decoded::Skip { len, why }
}

fn field(capture: &str, point: usize, kind: TextKind) -> TextField {
    TextField { capture: capture.into(), point, kind, scale: 1.0, offset: 0.0 }
}

/// Runs a stream through `find_frame` like a streaming task: returns frames and skips.
fn stream(rule: &FrameRule, ck: &ChecksumRule, chunks: &[&[u8]], silent_end: bool) -> Vec<Decoded> {
    let mut buf = Vec::new();
    let mut seen = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        buf.extend_from_slice(chunk);
        let silent = silent_end && i + 1 == chunks.len();
        loop {
            let d = find_frame(rule, ck, &buf, silent);
            match &d {
                Decoded::Incomplete => break,
                Decoded::Reply { len, .. } | Decoded::Skip { len, .. } => {
                    assert!(*len >= 1 && *len <= buf.len(), "{d:?} for {} bytes", buf.len());
                    buf.drain(..*len);
                }
            }
            seen.push(d);
        }
    }
    seen
}

#[test]
fn scale_request_and_weight() {
    let template = unescape("W\\r\\n").expect("escapes");
    let request = build_request(&template, None, &ChecksumRule::NONE).expect("builds");
    assert_eq!(request, b"W\r\n");
    let framing = RawFraming { framing: crlf(), checksum: ChecksumRule::NONE };
    let req = Request::Custom(0, request.into());
    let mut out = Vec::new();
    framing.encode(1, &req, &mut out).expect("encodes");
    assert_eq!(out, b"W\r\n");

    let answer = b"ST,GS,+0012.50kg\r\n";
    for n in 0..answer.len() {
        assert_eq!(framing.decode(1, &req, &answer[..n], false), Decoded::Incomplete);
    }
    assert_eq!(framing.decode(1, &req, answer, false), reply(answer.len(), answer));

    let ex = Extract::regex(
        r"^(?P<status>ST|US),GS,(?P<weight>[+-] *[0-9.]+)kg",
        vec![field("weight", 7, TextKind::Number), field("status", 8, TextKind::Text)],
    )
    .expect("valid");
    assert_eq!(
        extract(&ex, answer).expect("extracts"),
        [(7, Value::Float(12.5)), (8, Value::Text("ST".into()))]
    );
    // Overload: the regex does not match, and no value is taken.
    let e = extract(&ex, b"OL,GS,+9999999kg\r\n").expect_err("no match");
    assert!(matches!(e, ExtractError::NoMatch { .. }), "{e}");
    assert!(e.to_string().contains("OL,GS"), "{e}");
}

#[test]
fn scale_with_sum8_before_etx() {
    // STX "+0012.50kg" hex(sum8) ETX, sum over the text between STX and the checksum.
    let ck = ChecksumRule { kind: Checksum::Sum8, format: CheckFormat::Hex, skip: 1, gap: 0, trailer: 1 };
    let mut frame = b"\x02+0012.50kg\x03".to_vec();
    ck.apply(&mut frame);
    let sum = b"+0012.50kg".iter().fold(0u8, |s, b| s.wrapping_add(*b));
    assert_eq!(&frame[11..13], format!("{sum:02X}").as_bytes());
    let rule = FrameRule { start: Some(vec![0x02]), end: FrameEnd::Terminator(vec![0x03]) };
    let mut noisy = b"\x00\x03".to_vec();
    noisy.extend_from_slice(&frame);
    assert_eq!(find_frame(&rule, &ck, &noisy, false), skip(2, SkipReason::Noise));
    assert_eq!(find_frame(&rule, &ck, &frame, false), reply(frame.len(), &frame));
    frame[4] = b'9';
    assert_eq!(find_frame(&rule, &ck, &frame, false), skip(frame.len(), SkipReason::Crc));
}

fn nmea() -> (FrameRule, ChecksumRule) {
    (
        FrameRule { start: Some(b"$".to_vec()), end: FrameEnd::Terminator(b"\r\n".to_vec()) },
        ChecksumRule { kind: Checksum::Xor, format: CheckFormat::Hex, skip: 1, gap: 1, trailer: 2 },
    )
}

const GGA: &[u8] = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n";

#[test]
fn nmea_gga_valid_and_corrupted() {
    let (rule, ck) = nmea();
    assert_eq!(find_frame(&rule, &ck, GGA, false), reply(GGA.len(), GGA));
    let mut bad = GGA.to_vec();
    bad[20] = b'9';
    assert_eq!(find_frame(&rule, &ck, &bad, false), skip(GGA.len(), SkipReason::Crc));

    // In a stream: noise, a cut-off sentence, the corrupt one, then a good one.
    let mut chunks: Vec<&[u8]> = vec![b"\xFF\x00garbage", b"$GPGGA,1235"];
    chunks.push(&bad);
    chunks.extend(GGA.chunks(7));
    let seen = stream(&rule, &ck, &chunks, false);
    assert_eq!(
        seen,
        [
            skip(9, SkipReason::Noise),
            skip(11, SkipReason::Noise), // the cut-off sentence restarts at the next '$'
            skip(GGA.len(), SkipReason::Crc),
            reply(GGA.len(), GGA),
        ]
    );

    let ex = Extract::regex(
        r"^\$GPGGA,(?P<time>\d+),(?P<lat>[\d.]+),[NS],(?P<lon>[\d.]+),[EW],(?P<fix>\d),(?P<sats>\d+),[^,]*,(?P<alt>[-\d.]+),M",
        vec![
            field("sats", 0, TextKind::Int),
            field("alt", 1, TextKind::Number),
            field("fix", 2, TextKind::Bool),
        ],
    )
    .expect("valid");
    assert_eq!(
        extract(&ex, GGA).expect("extracts"),
        [(0, Value::Int(8)), (1, Value::Float(545.4)), (2, Value::Bool(true))]
    );
    // Building a query with its checksum: the published MTK command.
    let q = build_request(b"$PMTK220,1000*\r\n", None, &ck).expect("builds");
    assert_eq!(q, b"$PMTK220,1000*1F\r\n");
}

/// A binary meter frame: AA 55, payload length, payload, CRC-16/MODBUS low byte first.
fn meter_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xAA, 0x55, payload.len() as u8];
    f.extend_from_slice(payload);
    ChecksumRule::new(Checksum::Crc16Modbus).apply(&mut f);
    f
}

fn meter_rule() -> FrameRule {
    FrameRule {
        start: Some(vec![0xAA, 0x55]),
        end: FrameEnd::LengthField { offset: 2, width: 1, big_endian: true, adjust: 5 },
    }
}

#[test]
fn binary_meter_length_field_and_crc() {
    let mut payload = 2301u16.to_be_bytes().to_vec(); // voltage, 0.1 V
    payload.extend_from_slice(&12.5f32.to_be_bytes()); // current
    payload.extend_from_slice(&(-40i16).to_le_bytes()); // temperature, little endian
    let frame = meter_frame(&payload);
    let ck = ChecksumRule::new(Checksum::Crc16Modbus);
    let rule = meter_rule();
    for n in 0..frame.len() {
        assert_eq!(find_frame(&rule, &ck, &frame[..n], false), Decoded::Incomplete, "{n}");
    }
    assert_eq!(find_frame(&rule, &ck, &frame, false), reply(frame.len(), &frame));
    // A partial start marker at the end of noise is kept until more bytes come.
    assert_eq!(find_frame(&rule, &ck, b"\x01\x02\xAA", false), skip(2, SkipReason::Noise));

    let bin = |at, kind, order, scale, point| BinField { at, kind, order, scale, offset: 0.0, point };
    let ex = Extract::Binary {
        fields: vec![
            bin(3, BinKind::Data(DataType::U16), WordOrder::Abcd, 0.1, 0),
            bin(5, BinKind::Data(DataType::F32), WordOrder::Abcd, 1.0, 1),
            bin(9, BinKind::Data(DataType::I16), WordOrder::Dcba, 1.0, 2),
            bin(2, BinKind::U8, WordOrder::Abcd, 1.0, 3),
            bin(9, BinKind::Bit8(3), WordOrder::Abcd, 1.0, 4),
        ],
    };
    let got = extract(&ex, &frame).expect("extracts");
    let Value::Float(v) = got[0].1 else { panic!("{got:?}") };
    assert!((v - 230.1).abs() < 1e-9);
    assert_eq!(
        got[1..],
        [(1, Value::Float(12.5)), (2, Value::Int(-40)), (3, Value::UInt(8)), (4, Value::Bool(0xD8 & 8 != 0)),]
    );
    // Past the end of the frame: an error, no value.
    let past =
        Extract::Binary { fields: vec![bin(12, BinKind::Data(DataType::U32), WordOrder::Abcd, 1.0, 0)] };
    assert_eq!(extract(&past, &frame), Err(ExtractError::OutOfFrame { at: 12, need: 4, len: 13 }));

    // Corrupt CRC: one byte dropped (resync), counted as a CRC error; the stream then
    // finds the next good frame.
    let mut bad = frame.clone();
    bad[6] ^= 0x10;
    assert_eq!(find_frame(&rule, &ck, &bad, false), skip(1, SkipReason::Crc));
    let seen = stream(&rule, &ck, &[&bad, &frame], false);
    assert_eq!(
        seen,
        [skip(1, SkipReason::Crc), skip(bad.len() - 1, SkipReason::Noise), reply(frame.len(), &frame)]
    );
    // An impossible length field is noise.
    let silly = [0xAA, 0x55, 0xFF, 0, 0];
    let two = FrameRule {
        start: Some(vec![0xAA, 0x55]),
        end: FrameEnd::LengthField { offset: 2, width: 2, big_endian: true, adjust: 0 },
    };
    assert_eq!(find_frame(&two, &ck, &silly, false), skip(1, SkipReason::Noise));
}

#[test]
fn fixed_length_and_silence() {
    let fixed = FrameRule { start: None, end: FrameEnd::Fixed(4) };
    let ck = ChecksumRule::new(Checksum::Sum8);
    let f = [0x10, 0x20, 0x30, 0x60];
    assert_eq!(find_frame(&fixed, &ck, &f[..3], true), Decoded::Incomplete);
    assert_eq!(find_frame(&fixed, &ck, &f, false), reply(4, &f));
    assert_eq!(find_frame(&fixed, &ck, &[1, 2, 3, 4], false), skip(1, SkipReason::Crc));

    let quiet = FrameRule { start: None, end: FrameEnd::Silence };
    let none = ChecksumRule::NONE;
    assert_eq!(find_frame(&quiet, &none, b"12.5 kg", false), Decoded::Incomplete);
    assert_eq!(find_frame(&quiet, &none, b"12.5 kg", true), reply(7, b"12.5 kg"));
    assert_eq!(find_frame(&quiet, &none, b"", true), Decoded::Incomplete);
    // A blank line is not a frame.
    assert_eq!(find_frame(&crlf(), &none, b"\r\nOK\r\n", false), skip(2, SkipReason::Noise));
    // Silence ends nothing for a terminated frame: USB adapters deliver in bursts.
    assert_eq!(find_frame(&crlf(), &none, b"12.5", true), Decoded::Incomplete);
}

#[test]
fn oversize_frames_are_noise() {
    let none = ChecksumRule::NONE;
    let long = vec![b'A'; MAX_FRAME + 10];
    assert_eq!(find_frame(&crlf(), &none, &long, false), skip(MAX_FRAME + 9, SkipReason::Noise));
    let mut marked = vec![b'$'];
    marked.extend_from_slice(&long);
    let (rule, _) = nmea();
    assert_eq!(find_frame(&rule, &none, &marked, false), skip(1, SkipReason::Noise));
    let quiet = FrameRule { start: None, end: FrameEnd::Silence };
    assert_eq!(find_frame(&quiet, &none, &long, false), skip(long.len(), SkipReason::Noise));
    // A terminator just past the limit is not found: the run is noise.
    let mut late = vec![b'A'; MAX_FRAME];
    late.extend_from_slice(b"\r\n");
    assert!(matches!(find_frame(&crlf(), &none, &late, false), Decoded::Skip { why: SkipReason::Noise, .. }));
    let mut fits = vec![b'A'; MAX_FRAME - 2];
    fits.extend_from_slice(b"\r\n");
    assert_eq!(find_frame(&crlf(), &none, &fits, false), reply(MAX_FRAME, &fits));
}

#[test]
fn rule_validation() {
    let bad = [
        FrameEnd::Terminator(vec![]),
        FrameEnd::Fixed(0),
        FrameEnd::Fixed(MAX_FRAME + 1),
        FrameEnd::LengthField { offset: 0, width: 3, big_endian: true, adjust: 0 },
    ];
    for end in bad {
        let rule = FrameRule { start: None, end };
        assert!(matches!(rule.validate(), Err(RawError::Rule(_))), "{rule:?}");
    }
    assert!(meter_rule().validate().is_ok());
    let short = FrameRule { start: Some(b"abc".to_vec()), end: FrameEnd::Fixed(2) };
    assert!(short.validate().is_err());
    let huge = FrameRule { start: Some(vec![b'$'; 2000]), end: FrameEnd::Terminator(vec![b'\n'; 2000]) };
    assert!(huge.validate().is_err());
    // Even unvalidated, an absurd rule does not panic.
    let none = ChecksumRule::NONE;
    for buf in [vec![b'$'; 2100], vec![b'\n'; 1100], vec![b'x'; 1100]] {
        let _ = stream(&huge, &none, &[&buf], true);
        let no_start = FrameRule { start: None, end: huge.end.clone() };
        let _ = stream(&no_start, &none, &[&buf], true);
    }
    let tiny = RawFraming {
        framing: FrameRule { start: None, end: FrameEnd::Fixed(2) },
        checksum: ChecksumRule::new(Checksum::Crc32),
    };
    assert!(tiny.validate().is_err());
    assert!(
        RawFraming { framing: meter_rule(), checksum: ChecksumRule::new(Checksum::Crc16Modbus) }
            .validate()
            .is_ok()
    );
}

#[test]
fn requests_with_address_and_crc() {
    let ck = ChecksumRule::new(Checksum::Crc16Modbus);
    let body = parse_hex("01 03 00 00 00 0A").expect("hex");
    assert_eq!(
        build_request(&body, None, &ck).expect("builds"),
        [0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD]
    );
    let text = unescape("#{address}RD\\r").expect("escapes");
    assert_eq!(build_request(&text, Some("07"), &ChecksumRule::NONE).expect("builds"), b"#07RD\r");
    assert_eq!(build_request(&text, None, &ChecksumRule::NONE), Err(RawError::NoAddress));
    let (_, nmea_ck) = nmea();
    assert_eq!(build_request(b"$*\r", None, &nmea_ck), Err(RawError::TooShort { len: 3, need: 4 }));
    // Only Custom requests can go on a raw bus.
    let framing = RawFraming { framing: crlf(), checksum: ck };
    let mut out = Vec::new();
    assert!(framing.encode(1, &Request::ReadCoils(0, 1), &mut out).is_err());
    // The unit and request do not matter when decoding.
    assert!(matches!(
        framing.decode(9, &Request::ReadCoils(0, 1), b"x\r\n", false),
        Decoded::Skip { why: SkipReason::Crc, .. }
    ));
}

#[test]
fn escapes_and_hex() {
    assert_eq!(unescape("a\\x02\\x7fb\\t\\0\\\\{x}é").expect("ok"), b"a\x02\x7fb\t\0\\{x}\xC3\xA9");
    let e = unescape("ab\\q").expect_err("unknown").to_string();
    assert!(e.contains("unknown escape \\q at character 3"), "{e}");
    let e = unescape("\\x4").expect_err("short").to_string();
    assert!(e.contains("two hex digits at character 1"), "{e}");
    assert!(unescape("end\\").expect_err("trailing").to_string().contains("character 4"));

    assert_eq!(parse_hex("01 03 00 00").expect("ok"), [1, 3, 0, 0]);
    assert_eq!(parse_hex("0x01,0xFF:aa010203").expect("ok"), [1, 0xFF, 0xAA, 1, 2, 3]);
    assert_eq!(parse_hex("").expect("ok"), b"");
    let e = parse_hex("01 0 03").expect_err("odd").to_string();
    assert!(e.contains("odd number of hex digits at character 4"), "{e}");
    let e = parse_hex("01 zz").expect_err("bad").to_string();
    assert!(e.contains("'z' is not a hex digit at character 4"), "{e}");
}

#[test]
fn command_templates() {
    let f = |t: &str, v: Value| String::from_utf8(format_command(t, &v).expect(t)).expect("utf8");
    assert_eq!(f("SP{value:.1}\\r\\n", Value::Float(12.345)), "SP12.3\r\n");
    assert_eq!(f("{value}", Value::Float(12.5)), "12.5");
    assert_eq!(f("{value}", Value::Int(-3)), "-3");
    assert_eq!(f("{value}", Value::Bool(true)), "1");
    assert_eq!(f("{value}", Value::Text("ON".into())), "ON");
    assert_eq!(f("S{value:04}", Value::UInt(42)), "S0042");
    assert_eq!(f("S{value:04}", Value::Int(-42)), "S-042");
    assert_eq!(f("{value:+08.2}", Value::Float(12.5)), "+0012.50");
    assert_eq!(f("[{value:6.1}]", Value::Float(-1.25)), "[  -1.2]");
    assert_eq!(f("{value:.2}", Value::Int(7)), "7.00");
    assert_eq!(f("{value:.1}", Value::Float(-0.01)), "0.0");
    assert_eq!(f("{{{value}}}\\x03", Value::UInt(1)), "{1}\x03");
    let err = |t: &str, v: Value| format_command(t, &v).expect_err(t).to_string();
    assert!(err("{val}", Value::Int(1)).contains("unknown placeholder {val} at character 1"));
    assert!(err("x{value:q}", Value::Int(1)).contains("bad format {value:q} at character 2"));
    assert!(err("{value", Value::Int(1)).contains("unclosed {"));
    assert!(err("a}", Value::Int(1)).contains("unmatched }"));
    assert!(err("{value:.1}", Value::Text("x".into())).contains("text takes no format"));
    assert!(err("{value}", Value::Float(f64::NAN)).contains("not a finite number"));
}

#[test]
fn regex_errors_name_the_problem() {
    let e = compile_regex("(unclosed").expect_err("bad").to_string();
    assert!(e.contains("\"(unclosed\"") && e.contains("unclosed group"), "{e}");
    let e = Extract::regex("(?P<a>\\d+)", vec![field("b", 0, TextKind::Int)])
        .expect_err("unknown capture")
        .to_string();
    assert!(e.contains("no capture group \"b\""), "{e}");
    // Numbered groups work; past the last group is unknown.
    assert!(Extract::regex("(\\d+)", vec![field("1", 0, TextKind::Int)]).is_ok());
    assert!(Extract::regex("(\\d+)", vec![field("2", 0, TextKind::Int)]).is_err());

    let ex = Extract::regex(
        "W=(?P<w>[^;]*);(?:S=(?P<s>\\w+))?",
        vec![field("w", 0, TextKind::Number), field("s", 1, TextKind::Text)],
    )
    .expect("valid");
    let e = extract(&ex, b"W=12;").expect_err("missing").to_string();
    assert!(e.contains("capture \"s\" is empty"), "{e}");
    let e = extract(&ex, b"W=12,5;S=ok").expect_err("comma").to_string();
    assert!(e.contains("\"12,5\" is not a number"), "{e}");
    assert_eq!(
        extract(&ex, b"W= +  3.5 ;S=ok").expect("ok"),
        [(0, Value::Float(3.5)), (1, Value::Text("ok".into()))]
    );
}

#[test]
fn numbers_as_devices_print_them() {
    assert_eq!(parse_number("+0012.50"), Some(12.5));
    assert_eq!(parse_number(" -3"), Some(-3.0));
    assert_eq!(parse_number("-  7.25 "), Some(-7.25));
    assert_eq!(parse_number(".5"), Some(0.5));
    assert_eq!(parse_number("1.5e3"), Some(1500.0));
    for bad in ["", "+", ".", "12,5", "1 000", "inf", "NaN", "0x10", "--1", "12kg"] {
        assert_eq!(parse_number(bad), None, "{bad:?}");
    }
    assert_eq!(parse_int("+0012"), Some(12));
    assert_eq!(parse_int("-9223372036854775808"), Some(i64::MIN));
    assert_eq!(parse_int("9223372036854775808"), None);
    assert_eq!(parse_int("1.0"), None);
    let mut scaled = field("1", 0, TextKind::Int);
    scaled.scale = 0.5;
    let ex = Extract::regex("(\\S+)", vec![scaled]).expect("valid");
    assert_eq!(extract(&ex, b"+5").expect("ok"), [(0, Value::Float(2.5))]);
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED_0006);
    let (nmea_rule, nmea_ck) = nmea();
    let rules = [
        (crlf(), ChecksumRule::NONE),
        (nmea_rule, nmea_ck),
        (meter_rule(), ChecksumRule::new(Checksum::Crc16Modbus)),
        (
            FrameRule {
                start: None,
                end: FrameEnd::LengthField { offset: 1, width: 2, big_endian: false, adjust: -3 },
            },
            ChecksumRule::new(Checksum::Crc32),
        ),
        (FrameRule { start: Some(vec![0x02]), end: FrameEnd::Fixed(6) }, ChecksumRule::new(Checksum::Lrc)),
        (FrameRule { start: None, end: FrameEnd::Silence }, ChecksumRule::new(Checksum::Sum16)),
    ];
    let ex_text = Extract::regex(
        "(?-u)(?P<a>[^,]*),(?P<b>.*)",
        vec![field("a", 0, TextKind::Number), field("b", 1, TextKind::Bool)],
    )
    .expect("valid");
    let ex_bin = Extract::Binary {
        fields: vec![BinField {
            at: 3,
            kind: BinKind::Data(DataType::Str(5)),
            order: WordOrder::Badc,
            scale: 1.0,
            offset: 0.0,
            point: 0,
        }],
    };
    let alphabet = b"$*\r\n,:0123456789ABCDEFabcdef{}\\x.+-\xAA\x55\x02\x03";
    let req = Request::ReadHoldingRegisters(0, 2);
    for round in 0..4000 {
        let len = rng.random_range(0..1500);
        let data: Vec<u8> =
            (0..len)
                .map(|_| {
                    if round % 2 == 0 { rng.random() } else { alphabet[rng.random_range(0..alphabet.len())] }
                })
                .collect();
        let (rule, ck) = &rules[round % rules.len()];
        let silent = round % 3 == 0;
        let _ = stream(rule, ck, &[&data[..len / 2], &data[len / 2..]], silent);
        match Ascii.decode(1, &req, &data, silent) {
            Decoded::Skip { len, .. } | Decoded::Reply { len, .. } => {
                assert!(len >= 1 && len <= data.len());
            }
            Decoded::Incomplete => {}
        }
        let _ = extract(&ex_text, &data);
        let _ = extract(&ex_bin, &data);
        let text = String::from_utf8_lossy(&data);
        let _ = unescape(&text);
        let _ = parse_hex(&text);
        let _ = format_command(&text, &Value::Float(rng.random()));
        let _ = parse_number(&text);
        let _ = build_request(&data, Some("1"), ck);
    }
}

#[test]
fn sentence_survives_random_noise_and_chunking() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x4E4D_4541);
    let (rule, ck) = nmea();
    for _ in 0..500 {
        let mut data: Vec<u8> =
            (0..rng.random_range(0..200)).map(|_| rng.random::<u8>()).filter(|b| *b != b'$').collect();
        data.extend_from_slice(GGA);
        let cut = rng.random_range(0..data.len());
        let seen = stream(&rule, &ck, &[&data[..cut], &data[cut..]], false);
        assert_eq!(seen.last(), Some(&reply(GGA.len(), GGA)));
        assert_eq!(seen.iter().filter(|d| matches!(d, Decoded::Reply { .. })).count(), 1);
    }
}
