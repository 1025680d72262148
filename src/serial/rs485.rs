//! RS-485 direction control by the kernel (the TIOCSRS485 ioctl): the UART driver raises
//! RTS (the transceiver's driver-enable) for each transmission and drops it when the last
//! stop bit has left, timed by the kernel, not by us. This module owns the one mapping
//! from the `[[bus]]` keys to the kernel's `struct serial_rs485` (through serial2's safe
//! wrapper, which owns the ioctl: this crate forbids `unsafe`), and applying it to a
//! port.
//!
//! Mapping (kernel flag names, see the kernel's serial-rs485 documentation):
//! - always `SER_RS485_ENABLED`;
//! - RTS high while sending, low after (`SER_RS485_RTS_ON_SEND`), or the inverse with
//!   `rs485_invert_rts` (`SER_RS485_RTS_AFTER_SEND`), for transceivers whose enable is
//!   active low;
//! - `SER_RS485_RX_DURING_TX` with `rs485_rx_during_tx` (4-wire lines; on a 2-wire line
//!   the receiver then hears our own request: set `local_echo` too);
//! - `delay_rts_before_send` / `delay_rts_after_send` from the two delays, in whole
//!   milliseconds (the kernel's unit).
//!
//! Invariants: a port whose driver refuses the ioctl (a pty, most USB adapters, whose
//! chips switch direction themselves) is never opened for traffic: the open fails with
//! one error naming the port and the option, so a misconfigured line is never driven
//! with the transmitter in an unknown state. The setting is applied each time the port
//! is opened (the kernel keeps it per port, but a re-plugged adapter is a new port).
//! Userspace RTS toggling (for adapters without kernel support) is not implemented.

use std::time::Duration;

use serial2::rs4xx::Rs485Config;

/// Kernel RS-485 mode of a bus (`rs485 = "kernel"` and its `rs485_*` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rs485 {
    /// RTS low while sending and high after, instead of high while sending.
    pub invert_rts: bool,
    /// RTS is raised this long before the first bit is sent (whole milliseconds).
    pub delay_before: Duration,
    /// RTS is kept this long after the last bit has left (whole milliseconds).
    pub delay_after: Duration,
    /// The receiver stays on while sending (4-wire RS-485 / RS-422 wiring).
    pub rx_during_tx: bool,
}

impl Rs485 {
    /// The kernel configuration this stands for (serial2 turns it into the ioctl's
    /// `struct serial_rs485`, flags as in the module documentation).
    pub fn kernel_config(&self) -> Rs485Config {
        let mut c = Rs485Config::new();
        c.set_invert_rts(self.invert_rts);
        c.set_full_duplex(self.rx_during_tx);
        c.set_delay_before_send(self.delay_before);
        c.set_delay_after_send(self.delay_after);
        c
    }

    /// Switches the serial port at `path` to this RS-485 mode (opening it briefly for the
    /// ioctl). The error names the port, the option and what to do.
    pub fn apply(&self, path: &str) -> Result<(), String> {
        let refused = |e: std::io::Error| {
            format!(
                "{path}: cannot switch to kernel RS-485 mode (rs485 = \"kernel\"): {e}; this port's \
                 driver has no RS-485 mode (a pty, or a USB adapter that switches direction by itself): \
                 remove rs485 from the bus"
            )
        };
        let port =
            serial2::SerialPort::open(path, serial2::KeepSettings).map_err(|e| format!("{path}: {e}"))?;
        port.set_rs4xx_mode(self.kernel_config()).map_err(refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keys_map_to_the_kernel_configuration() {
        let plain = Rs485::default().kernel_config();
        assert!(!plain.get_invert_rts(), "RTS high while sending (SER_RS485_RTS_ON_SEND)");
        assert!(!plain.get_full_duplex(), "receiver off while sending");
        assert_eq!(plain.get_delay_before_send(), Duration::ZERO);
        assert_eq!(plain.get_delay_after_send(), Duration::ZERO);
        let all = Rs485 {
            invert_rts: true,
            delay_before: Duration::from_millis(2),
            delay_after: Duration::from_millis(5),
            rx_during_tx: true,
        }
        .kernel_config();
        assert!(all.get_invert_rts(), "RTS high after sending (SER_RS485_RTS_AFTER_SEND)");
        assert!(all.get_full_duplex(), "SER_RS485_RX_DURING_TX");
        assert_eq!(all.get_delay_before_send(), Duration::from_millis(2));
        assert_eq!(all.get_delay_after_send(), Duration::from_millis(5));
    }

    #[tokio::test]
    async fn a_pty_refuses_and_the_error_names_the_port_and_the_option() {
        let (_master, slave) = tokio_serial::SerialStream::pair().expect("pty pair");
        let path = tokio_serial::SerialPort::name(&slave).expect("pty path");
        let err = Rs485::default().apply(&path).expect_err("a pty has no rs-485 mode");
        assert!(err.starts_with(&format!("{path}: cannot switch to kernel RS-485 mode")), "{err}");
        assert!(err.contains("rs485 = \"kernel\"") && err.contains("remove rs485"), "{err}");
        let missing = Rs485::default().apply("/dev/no-such-port").expect_err("no such port");
        assert!(missing.starts_with("/dev/no-such-port: "), "{missing}");
    }
}
