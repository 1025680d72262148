//! Frame checksums of serial field protocols: what is computed ([`Checksum`]), how the
//! value travels ([`CheckFormat`]: binary big/little endian or ASCII hex), and where it
//! sits in a frame ([`ChecksumRule`]).
//!
//! Invariants: computing and verifying never panic, whatever the frame; a frame too short
//! for its rule simply fails verification. Every algorithm is pinned to its published
//! check value (the checksum of the ASCII bytes `123456789`) in the tests.

use std::fmt;
use std::str::FromStr;

use crc::Crc;

/// A checksum name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    /// Not one of [`Checksum::ALL`].
    #[error("unknown checksum {name:?} (valid: {})", Checksum::names())]
    Unknown {
        /// The name given.
        name: String,
    },
    /// Not one of the checksum formats.
    #[error("unknown checksum format {name:?} (valid: be, le, hex)")]
    UnknownFormat {
        /// The name given.
        name: String,
    },
}

/// A checksum algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Checksum {
    /// No checksum.
    #[default]
    None,
    /// 8-bit sum of the bytes, carries dropped.
    Sum8,
    /// 16-bit sum of the bytes, carries dropped.
    Sum16,
    /// XOR of the bytes (NMEA 0183).
    Xor,
    /// Modbus ASCII LRC: the two's complement of the 8-bit sum, so the bytes plus the LRC
    /// sum to zero.
    Lrc,
    /// CRC-16/MODBUS: poly 0x8005 reflected (0xA001), init 0xFFFF, no final xor.
    Crc16Modbus,
    /// CRC-16/CCITT-FALSE (also called CRC-16/IBM-3740): poly 0x1021, init 0xFFFF, not
    /// reflected, no final xor. This is what "CRC-CCITT" means in most device manuals.
    Crc16Ccitt,
    /// CRC-16/XMODEM: poly 0x1021, init 0x0000, not reflected, no final xor.
    Crc16Xmodem,
    /// CRC-32 (ISO-HDLC, as in Ethernet and zip): poly 0x04C11DB7 reflected, init and
    /// final xor 0xFFFFFFFF.
    Crc32,
}

impl Checksum {
    /// Every checksum with its configuration name.
    pub const ALL: [(&'static str, Checksum); 9] = [
        ("none", Checksum::None),
        ("sum8", Checksum::Sum8),
        ("sum16", Checksum::Sum16),
        ("xor", Checksum::Xor),
        ("lrc", Checksum::Lrc),
        ("crc16-modbus", Checksum::Crc16Modbus),
        ("crc16-ccitt", Checksum::Crc16Ccitt),
        ("crc16-xmodem", Checksum::Crc16Xmodem),
        ("crc32", Checksum::Crc32),
    ];

    fn names() -> String {
        Self::ALL.map(|(n, _)| n).join(", ")
    }

    /// The configuration name.
    pub fn name(&self) -> &'static str {
        Self::ALL.iter().find(|(_, c)| c == self).map_or("none", |(n, _)| n)
    }

    /// The checksum of `data`, in the low [`width`](Self::width) bytes.
    pub fn compute(&self, data: &[u8]) -> u32 {
        let sum = || data.iter().fold(0u32, |s, b| s.wrapping_add(u32::from(*b)));
        match self {
            Checksum::None => 0,
            Checksum::Sum8 => sum() & 0xFF,
            Checksum::Sum16 => sum() & 0xFFFF,
            Checksum::Xor => u32::from(data.iter().fold(0u8, |x, b| x ^ b)),
            Checksum::Lrc => sum().wrapping_neg() & 0xFF,
            Checksum::Crc16Modbus => u32::from(crc16_modbus(data)),
            Checksum::Crc16Ccitt => u32::from(CRC16_CCITT.checksum(data)),
            Checksum::Crc16Xmodem => u32::from(CRC16_XMODEM.checksum(data)),
            Checksum::Crc32 => CRC32.checksum(data),
        }
    }

    /// Width of the value in bytes (0 for none).
    pub fn width(&self) -> usize {
        match self {
            Checksum::None => 0,
            Checksum::Sum8 | Checksum::Xor | Checksum::Lrc => 1,
            Checksum::Sum16 | Checksum::Crc16Modbus | Checksum::Crc16Ccitt => 2,
            Checksum::Crc16Xmodem => 2,
            Checksum::Crc32 => 4,
        }
    }

    /// How this checksum usually travels: CRC-16/MODBUS low byte first (as in Modbus RTU),
    /// the others big-endian.
    pub fn default_format(&self) -> CheckFormat {
        match self {
            Checksum::Crc16Modbus => CheckFormat::LittleEndian,
            _ => CheckFormat::BigEndian,
        }
    }

    /// Bytes the value takes in a frame in `format` (ASCII hex: two characters a byte).
    pub fn encoded_len(&self, format: CheckFormat) -> usize {
        match format {
            CheckFormat::Hex => 2 * self.width(),
            CheckFormat::BigEndian | CheckFormat::LittleEndian => self.width(),
        }
    }

    /// Appends `value` in `format` (ASCII hex in uppercase, most significant digit first).
    pub fn append(&self, value: u32, format: CheckFormat, out: &mut Vec<u8>) {
        let w = self.width();
        let be = &value.to_be_bytes()[4 - w..];
        match format {
            CheckFormat::BigEndian => out.extend_from_slice(be),
            CheckFormat::LittleEndian => out.extend(be.iter().rev()),
            CheckFormat::Hex => out.extend_from_slice(hex::encode_upper(be).as_bytes()),
        }
    }

    /// Reads a value written in `format` from exactly `bytes`; `None` when the bytes are
    /// not such a value (wrong length, not hex). Hex digits may be either case.
    pub fn read(&self, format: CheckFormat, bytes: &[u8]) -> Option<u32> {
        if bytes.len() != self.encoded_len(format) {
            return None;
        }
        let fold = |it: &mut dyn Iterator<Item = u8>| it.fold(0u32, |v, b| (v << 8) | u32::from(b));
        Some(match format {
            CheckFormat::BigEndian => fold(&mut bytes.iter().copied()),
            CheckFormat::LittleEndian => fold(&mut bytes.iter().rev().copied()),
            CheckFormat::Hex => fold(&mut hex::decode(bytes).ok()?.into_iter()),
        })
    }
}

impl FromStr for Checksum {
    type Err = ChecksumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        Self::ALL
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|(_, c)| *c)
            .ok_or_else(|| ChecksumError::Unknown { name: s.to_string() })
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// CRC-16/MODBUS (poly 0x8005 reflected, init 0xFFFF): Modbus RTU's frame check.
const CRC16_MODBUS: Crc<u16> = Crc::<u16>::new(&crc::CRC_16_MODBUS);
/// CRC-16/IBM-3740, often called CRC-16/CCITT (poly 0x1021, init 0xFFFF, not reflected).
const CRC16_CCITT: Crc<u16> = Crc::<u16>::new(&crc::CRC_16_IBM_3740);
/// CRC-16/XMODEM (poly 0x1021, init 0, not reflected).
const CRC16_XMODEM: Crc<u16> = Crc::<u16>::new(&crc::CRC_16_XMODEM);
/// CRC-32/ISO-HDLC (Ethernet, zip).
const CRC32: Crc<u32> = Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// CRC-16/MODBUS of `data`, as Modbus RTU frames carry it (low byte first on the wire).
pub fn crc16_modbus(data: &[u8]) -> u16 {
    CRC16_MODBUS.checksum(data)
}

/// How a checksum value is written into a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckFormat {
    /// Binary, most significant byte first.
    BigEndian,
    /// Binary, least significant byte first (Modbus RTU's CRC).
    LittleEndian,
    /// ASCII hex, two characters a byte, most significant first (NMEA's `*hh`).
    Hex,
}

impl FromStr for CheckFormat {
    type Err = ChecksumError;

    /// Names: `be`, `le`, `hex`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "be" => Ok(CheckFormat::BigEndian),
            "le" => Ok(CheckFormat::LittleEndian),
            "hex" => Ok(CheckFormat::Hex),
            _ => Err(ChecksumError::UnknownFormat { name: s.to_string() }),
        }
    }
}

/// Where the checksum sits in a frame and what it covers. A frame is laid out as
///
/// ```text
/// [skip bytes][covered bytes ...][gap bytes][checksum][trailer bytes]
/// ```
///
/// NMEA `$GPGGA,...*47\r\n`: xor, hex, skip 1 (`$`), gap 1 (`*`), trailer 2 (CR LF).
/// A binary frame ending in CRC-16/MODBUS: crc16-modbus, little endian, all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChecksumRule {
    /// The algorithm (`None`: nothing is checked or added).
    pub kind: Checksum,
    /// How the value is written.
    pub format: CheckFormat,
    /// Bytes at the start of the frame not covered (a start marker).
    pub skip: usize,
    /// Bytes between the covered bytes and the checksum (NMEA's `*`).
    pub gap: usize,
    /// Bytes after the checksum (a terminator).
    pub trailer: usize,
}

impl Default for ChecksumRule {
    fn default() -> Self {
        Self::NONE
    }
}

impl ChecksumRule {
    /// No checksum.
    pub const NONE: ChecksumRule =
        ChecksumRule { kind: Checksum::None, format: CheckFormat::BigEndian, skip: 0, gap: 0, trailer: 0 };

    /// `kind` in its default format over the whole frame, at the very end.
    pub fn new(kind: Checksum) -> Self {
        Self { kind, format: kind.default_format(), ..Self::NONE }
    }

    /// Bytes a frame needs at least to hold this rule's parts.
    pub fn min_len(&self) -> usize {
        self.skip
            .saturating_add(self.gap)
            .saturating_add(self.kind.encoded_len(self.format))
            .saturating_add(self.trailer)
    }

    /// True when `frame` carries a correct checksum (always, for `None`).
    pub fn verify(&self, frame: &[u8]) -> bool {
        if self.kind == Checksum::None {
            return true;
        }
        if frame.len() < self.min_len() {
            return false;
        }
        let at = frame.len() - self.trailer - self.kind.encoded_len(self.format);
        let covered = &frame[self.skip..at - self.gap];
        let sent = &frame[at..frame.len() - self.trailer];
        self.kind.read(self.format, sent) == Some(self.kind.compute(covered))
    }

    /// Inserts the checksum into `frame`, which holds everything but the checksum (so the
    /// gap and trailer bytes are already there): the value goes `trailer` bytes before
    /// the end. A frame too short for the rule is left as it is.
    pub fn apply(&self, frame: &mut Vec<u8>) {
        let parts = self.skip.saturating_add(self.gap).saturating_add(self.trailer);
        if self.kind == Checksum::None || frame.len() < parts {
            return;
        }
        let at = frame.len() - self.trailer;
        let value = self.kind.compute(&frame[self.skip..at - self.gap]);
        let mut encoded = Vec::with_capacity(8);
        self.kind.append(value, self.format, &mut encoded);
        frame.splice(at..at, encoded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_values() {
        let data = b"123456789";
        let expect = [
            (Checksum::None, 0),
            (Checksum::Sum8, 0xDD),
            (Checksum::Sum16, 0x01DD),
            (Checksum::Xor, 0x31),
            (Checksum::Lrc, 0x23),
            (Checksum::Crc16Modbus, 0x4B37),
            (Checksum::Crc16Ccitt, 0x29B1),
            (Checksum::Crc16Xmodem, 0x31C3),
            (Checksum::Crc32, 0xCBF4_3926),
        ];
        assert_eq!(expect.len(), Checksum::ALL.len());
        for (c, v) in expect {
            assert_eq!(c.compute(data), v, "{c}");
            assert!(u64::from(c.compute(data)) < 1u64 << (8 * c.width()), "{c} fits");
        }
        // The LRC makes the bytes sum to zero.
        let lrc = Checksum::Lrc.compute(data) as u8;
        assert_eq!(data.iter().fold(lrc, |s, b| s.wrapping_add(*b)), 0);
    }

    #[test]
    fn names_round_trip_and_unknown_lists_valid() {
        for (n, c) in Checksum::ALL {
            assert_eq!(n.parse::<Checksum>(), Ok(c));
            assert_eq!(c.to_string(), n);
        }
        assert_eq!("CRC16-Modbus".parse(), Ok(Checksum::Crc16Modbus));
        let e = "crc17".parse::<Checksum>().expect_err("unknown").to_string();
        assert!(e.contains("\"crc17\"") && e.contains("crc16-ccitt") && e.contains("lrc"), "{e}");
        assert_eq!("hex".parse(), Ok(CheckFormat::Hex));
        assert!("middle".parse::<CheckFormat>().is_err());
    }

    #[test]
    fn formats() {
        let c = Checksum::Crc16Modbus;
        let mut out = Vec::new();
        c.append(0x4B37, CheckFormat::LittleEndian, &mut out);
        c.append(0x4B37, CheckFormat::BigEndian, &mut out);
        c.append(0x4B37, CheckFormat::Hex, &mut out);
        assert_eq!(out, b"\x37\x4B\x4B\x374B37");
        assert_eq!(c.read(CheckFormat::LittleEndian, b"\x37\x4B"), Some(0x4B37));
        assert_eq!(c.read(CheckFormat::Hex, b"4b37"), Some(0x4B37));
        assert_eq!(c.read(CheckFormat::Hex, b"4G37"), None);
        assert_eq!(c.read(CheckFormat::Hex, b"4B3"), None);
        assert_eq!(Checksum::Xor.encoded_len(CheckFormat::Hex), 2);
    }

    #[test]
    fn rule_apply_and_verify() {
        // NMEA: "$PMTK220,1000*1F\r\n" (a published MTK command).
        let nmea =
            ChecksumRule { kind: Checksum::Xor, format: CheckFormat::Hex, skip: 1, gap: 1, trailer: 2 };
        let mut f = b"$PMTK220,1000*\r\n".to_vec();
        nmea.apply(&mut f);
        assert_eq!(f, b"$PMTK220,1000*1F\r\n");
        assert!(nmea.verify(&f));
        f[3] ^= 1;
        assert!(!nmea.verify(&f));
        assert!(!nmea.verify(b"$*\r"));
        assert!(!nmea.verify(b""));
        // Modbus RTU frame from the serial line spec: 01 03 00 00 00 0A C5 CD.
        let rtu = ChecksumRule::new(Checksum::Crc16Modbus);
        let mut f = vec![0x01, 0x03, 0x00, 0x00, 0x00, 0x0A];
        rtu.apply(&mut f);
        assert_eq!(f, [0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD]);
        assert!(rtu.verify(&f));
        assert!(ChecksumRule::NONE.verify(b"anything"));
        // Absurd offsets fail, never overflow.
        let wild = ChecksumRule { skip: usize::MAX, gap: usize::MAX, ..rtu };
        assert!(!wild.verify(&f));
        let mut g = f.clone();
        wild.apply(&mut g);
        assert_eq!(g, f);
    }
}
