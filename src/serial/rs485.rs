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
//!
//! Userspace mode (`rs485 = "rts"`, for adapters whose driver has no RS-485 mode but
//! lets RTS be set): the bus engine raises RTS itself around each request (see
//! [`Rts`] and the engine's `attempt`): RTS to its transmit level, `rs485_delay_before`,
//! the request, a wait until its last bit has left (the wire time from the line
//! settings: never a blocking `tcdrain` on a runtime thread), `rs485_delay_after`, RTS
//! back to idle. The levels come from [`Rs485::rts_levels`] (asserted while sending, or
//! the inverse with `rs485_invert_rts`). The delays may be finer than a millisecond
//! (timed by the engine's precise sleep). A port that refuses RTS control (a pty) is
//! never opened for traffic: one error names the port and the option.

use std::time::Duration;

use serial2::rs4xx::Rs485Config;

/// Who switches the transceiver's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The UART driver (`rs485 = "kernel"`, the TIOCSRS485 ioctl).
    #[default]
    Kernel,
    /// The bus engine, setting RTS around each request (`rs485 = "rts"`).
    Rts,
}

/// RS-485 direction control of a bus (`rs485 = "kernel"` or `"rts"` and its `rs485_*` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rs485 {
    /// Kernel or userspace direction control.
    pub mode: Mode,
    /// RTS low while sending and high after, instead of high while sending.
    pub invert_rts: bool,
    /// RTS is raised this long before the first bit is sent (kernel: whole milliseconds).
    pub delay_before: Duration,
    /// RTS is kept this long after the last bit has left (kernel: whole milliseconds).
    pub delay_after: Duration,
    /// The receiver stays on while sending (4-wire RS-485 / RS-422 wiring; kernel only).
    pub rx_during_tx: bool,
}

/// The RTS levels of userspace direction control (`true` = RTS asserted, the
/// `TIOCM_RTS` bit set, as the kernel's `SER_RS485_RTS_ON_SEND` means it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtsLevels {
    /// While the request is being sent (transmitter enabled).
    pub transmit: bool,
    /// The rest of the time (transmitter off, listening).
    pub idle: bool,
}

/// Something that can set a port's RTS line: the open serial port, or a fake in tests.
pub trait RtsLine: Send {
    /// Sets RTS asserted (`true`) or not.
    fn set_rts(&mut self, asserted: bool) -> std::io::Result<()>;
}

impl RtsLine for serial2::SerialPort {
    fn set_rts(&mut self, asserted: bool) -> std::io::Result<()> {
        serial2::SerialPort::set_rts(self, asserted)
    }
}

/// Userspace direction control of an open port: its RTS line and the bus's settings.
pub struct Rts {
    /// The port's RTS line.
    pub line: Box<dyn RtsLine>,
    /// The levels while sending and idle.
    pub levels: RtsLevels,
    /// RTS at its transmit level this long before the first bit.
    pub delay_before: Duration,
    /// RTS kept at its transmit level this long after the last bit has left.
    pub delay_after: Duration,
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

    /// The RTS levels of userspace mode: asserted while sending, or the inverse with
    /// `rs485_invert_rts` (an active-low driver enable).
    pub fn rts_levels(&self) -> RtsLevels {
        RtsLevels { transmit: !self.invert_rts, idle: self.invert_rts }
    }

    /// Takes RTS control of the serial port at `path` (userspace mode): opens it (before
    /// the traffic handle, which locks the port for exclusive use) and sets RTS to idle.
    /// The error names the port, the option and what to do.
    pub fn open_rts(&self, path: &str) -> Result<Rts, String> {
        let port =
            serial2::SerialPort::open(path, serial2::KeepSettings).map_err(|e| format!("{path}: {e}"))?;
        let levels = self.rts_levels();
        let mut line: Box<dyn RtsLine> = Box::new(port);
        line.set_rts(levels.idle).map_err(|e| {
            format!(
                "{path}: cannot switch RS-485 direction with RTS (rs485 = \"rts\"): {e}; this port \
                 has no RTS line to set (a pty, or a USB adapter that switches direction by itself): \
                 remove rs485 from the bus"
            )
        })?;
        Ok(Rts { line, levels, delay_before: self.delay_before, delay_after: self.delay_after })
    }

    /// Switches the serial port at `path` to kernel RS-485 mode (opening it briefly for
    /// the ioctl). The error names the port, the option and what to do.
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
            mode: Mode::Kernel,
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

    #[test]
    fn userspace_rts_is_asserted_while_sending_or_the_inverse() {
        let plain = Rs485 { mode: Mode::Rts, ..Rs485::default() };
        assert_eq!(plain.rts_levels(), RtsLevels { transmit: true, idle: false });
        let inverted = Rs485 { mode: Mode::Rts, invert_rts: true, ..Rs485::default() };
        assert_eq!(inverted.rts_levels(), RtsLevels { transmit: false, idle: true });
    }

    #[tokio::test]
    async fn a_pty_refuses_rts_control_and_the_error_names_the_port_and_the_option() {
        let (_master, slave) = tokio_serial::SerialStream::pair().expect("pty pair");
        let path = tokio_serial::SerialPort::name(&slave).expect("pty path");
        let mode = Rs485 { mode: Mode::Rts, ..Rs485::default() };
        let Err(err) = mode.open_rts(&path) else { panic!("a pty has no RTS line") };
        assert!(err.starts_with(&format!("{path}: cannot switch RS-485 direction with RTS")), "{err}");
        assert!(err.contains("rs485 = \"rts\"") && err.contains("remove rs485"), "{err}");
        let Err(missing) = mode.open_rts("/dev/no-such-port") else { panic!("no such port") };
        assert!(missing.starts_with("/dev/no-such-port: "), "{missing}");
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
