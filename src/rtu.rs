//! Modbus RTU framing: the CRC-16 and the ADU (`unit | pdu | crc-lo crc-hi`), with the
//! line timing the serial-line spec requires (character time and the t3.5 silence).

use std::time::Duration;

use crate::model::{Line, Parity};

/// CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF), sent low byte first.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Appends `unit`, the PDU and the CRC: one complete RTU frame.
pub fn frame(unit: u8, pdu: &[u8], buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.push(unit);
    buf.extend_from_slice(pdu);
    let crc = crc16(&buf[start..]);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// True when `frame` (unit .. crc) carries a correct CRC.
pub fn crc_ok(frame: &[u8]) -> bool {
    frame.len() >= 4 && {
        let (body, crc) = frame.split_at(frame.len() - 2);
        crc16(body).to_le_bytes() == [crc[0], crc[1]]
    }
}

/// Bits on the wire per character: start + data + parity + stop.
pub fn bits_per_char(line: &Line) -> u32 {
    1 + u32::from(line.data_bits)
        + u32::from(line.parity != Parity::None)
        + u32::from(line.stop_bits)
}

/// Time one character takes on the wire.
pub fn char_time(line: &Line) -> Duration {
    Duration::from_nanos(
        u64::from(bits_per_char(line)) * 1_000_000_000 / u64::from(line.baud.max(1)),
    )
}

/// Time `bytes` characters take on the wire.
pub fn wire_time(line: &Line, bytes: usize) -> Duration {
    char_time(line) * bytes as u32
}

/// The inter-frame silence: 3.5 character times, fixed at 1.75 ms above 19200 baud
/// (Modbus over serial line spec v1.02, §2.5.1.1).
pub fn t35(line: &Line) -> Duration {
    if line.baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        char_time(line) * 7 / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_spec_example() {
        // Serial line spec §6.2.2 example: 02 07 -> CRC 0x1241, sent 41 12.
        assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
        let mut buf = Vec::new();
        frame(0x01, &[0x03, 0x00, 0x00, 0x00, 0x0A], &mut buf);
        assert_eq!(buf, [0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD]);
        assert!(crc_ok(&buf));
        buf[3] ^= 1;
        assert!(!crc_ok(&buf));
    }

    #[test]
    fn timing() {
        let l = Line {
            baud: 9600,
            data_bits: 8,
            parity: Parity::Even,
            stop_bits: 1,
        };
        assert_eq!(bits_per_char(&l), 11);
        assert_eq!(t35(&l).as_micros(), 4010);
        let fast = Line { baud: 115_200, ..l };
        assert_eq!(t35(&fast), Duration::from_micros(1750));
    }
}
