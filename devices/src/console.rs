//! The partition console: a 16550 UART from vm-superio whose transmitted bytes are cut
//! into lines, written to the partition's sink and kept in a ring of recent lines.
//!
//! Snapshots ([`Persist`]) carry the UART's registers and receive FIFO ([`ConsoleState`]);
//! the lines and their sink are the monitor's, not the guest's, and stay in the
//! [`ConsoleHandle`] the restore is given.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::persist::Persist;

mod writer;

pub use writer::{flush_all, ConsoleFile, FILE_MAX_BYTES, QUEUE_BYTES};

/// How many recent lines a console keeps for `console` requests and crash reports.
pub const RECENT_LINES: usize = 2000;
/// A line longer than this is cut (the rest continues on a new line).
pub const MAX_LINE: usize = 4096;

/// Where a console's lines go besides the ring of recent lines. Every sink but `Discard`
/// is written by a thread of its own, never by the vCPU (see [`writer`]).
#[derive(Debug)]
pub enum ConsoleOutput {
    /// The monitor's stdout, each line prefixed with `[prefix] `.
    Stdout { prefix: String },
    /// A file, lines as the guest wrote them; lines that would take it past
    /// [`FILE_MAX_BYTES`] are dropped (counted).
    File(File),
    /// A file at a path, lines as the guest wrote them, rotated to `<path>.1` at its cap.
    RotatingFile(ConsoleFile),
    /// Nowhere (only the ring of recent lines).
    Discard,
}

impl ConsoleOutput {
    /// A console file at `path` (opened now, created mode 0600 if missing, appended to),
    /// rotated at [`FILE_MAX_BYTES`].
    pub fn file(path: &std::path::Path) -> io::Result<ConsoleOutput> {
        ConsoleFile::open(path, FILE_MAX_BYTES).map(ConsoleOutput::RotatingFile)
    }
}

/// A console's counters (`status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConsoleStats {
    /// Lines the guest has written since the console was made.
    pub lines: u64,
    /// Lines not written to the sink: its queue was full (a slow or stuck reader), or a
    /// plain file sink reached its cap. They are still in the ring of recent lines.
    pub dropped_lines: u64,
    /// Lines the sink refused (write errors).
    pub output_errors: u64,
    /// Bytes waiting for the writer now.
    pub queued_bytes: u64,
    /// Times a console file was rotated to `<file>.1`.
    pub rotations: u64,
}

/// The lines a console has produced.
#[derive(Debug)]
pub struct ConsoleLog {
    writer: Option<writer::Writer>,
    /// The writer could not be started: lines go to the ring only.
    writer_error: Option<String>,
    pending: Vec<u8>,
    recent: VecDeque<String>,
    total_lines: u64,
}

impl ConsoleLog {
    fn new(output: ConsoleOutput) -> Self {
        let started = match output {
            ConsoleOutput::Discard => Ok(None),
            ConsoleOutput::Stdout { prefix } => {
                let name = prefix.clone();
                writer::Writer::start(&name, writer::Sink::Stdout { prefix }).map(Some)
            }
            ConsoleOutput::File(file) => {
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                writer::Writer::start("file", writer::Sink::File { file, len }).map(Some)
            }
            ConsoleOutput::RotatingFile(f) => {
                let name = f
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "file".to_owned());
                writer::Writer::start(&name, writer::Sink::Rotating(f)).map(Some)
            }
        };
        let (writer, writer_error) = match started {
            Ok(w) => (w, None),
            Err(e) => {
                log::error!(
                    "console: cannot start its writer thread: {e}; lines kept in memory only"
                );
                (None, Some(e.to_string()))
            }
        };
        ConsoleLog {
            writer,
            writer_error,
            pending: Vec::new(),
            recent: VecDeque::with_capacity(64),
            total_lines: 0,
        }
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'\n' => self.end_line(),
                b'\r' => {}
                _ => {
                    self.pending.push(b);
                    if self.pending.len() >= MAX_LINE {
                        self.end_line();
                    }
                }
            }
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        if let Some(w) = &self.writer {
            w.push(line.clone());
        }
        if self.recent.len() == RECENT_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
        self.total_lines += 1;
    }

    /// Ends a partial last line (used when the partition ends).
    pub fn flush_partial(&mut self) {
        if !self.pending.is_empty() {
            self.end_line();
        }
    }

    /// The last `n` complete lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let skip = self.recent.len().saturating_sub(n);
        self.recent.iter().skip(skip).cloned().collect()
    }

    /// How many lines the console has produced since it was created.
    pub fn total_lines(&self) -> u64 {
        self.total_lines
    }

    /// How many lines could not be written to the sink.
    pub fn output_errors(&self) -> u64 {
        self.writer
            .as_ref()
            .map_or(0, |w| w.shared.stats.errors.load(Ordering::Relaxed))
    }

    /// The console's counters.
    pub fn stats(&self) -> ConsoleStats {
        let Some(w) = &self.writer else {
            return ConsoleStats {
                lines: self.total_lines,
                ..ConsoleStats::default()
            };
        };
        let s = &w.shared.stats;
        ConsoleStats {
            lines: self.total_lines,
            dropped_lines: s.dropped.load(Ordering::Relaxed),
            output_errors: s.errors.load(Ordering::Relaxed),
            queued_bytes: w.shared.queued_bytes() as u64,
            rotations: s.rotations.load(Ordering::Relaxed),
        }
    }

    /// Why the sink gets nothing (its writer thread could not be started), if so.
    pub fn writer_error(&self) -> Option<&str> {
        self.writer_error.as_deref()
    }
}

/// A shared handle on a console's lines; the UART writes through it.
#[derive(Debug, Clone)]
pub struct ConsoleHandle(Arc<Mutex<ConsoleLog>>);

impl ConsoleHandle {
    /// A console writing to `output` (through a writer thread of its own, unless
    /// `Discard`).
    pub fn new(output: ConsoleOutput) -> Self {
        ConsoleHandle(Arc::new(Mutex::new(ConsoleLog::new(output))))
    }

    /// Locks the log (a poisoned lock is recovered: the log is plain data).
    pub fn lock(&self) -> MutexGuard<'_, ConsoleLog> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The console's counters (lines, dropped lines, ...).
    pub fn stats(&self) -> ConsoleStats {
        self.lock().stats()
    }

    /// Waits until the lines produced so far are written to the sink, at most `timeout`;
    /// false if they were not (a stuck reader).
    pub fn flush_output(&self, timeout: Duration) -> bool {
        let shared = self.lock().writer.as_ref().map(|w| w.shared.clone());
        shared.is_none_or(|s| s.flush(timeout))
    }
}

impl Write for ConsoleHandle {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock().push_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART's interrupt line: an eventfd that the monitor wires to an irqfd (GSI 4).
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Size of the UART's receive FIFO (vm-superio's, not exported by it).
pub const RX_FIFO_SIZE: usize = 64;

/// The UART's registers and receive FIFO: vm-superio's `SerialState`, serializable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Divisor latch, low and high byte.
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Received bytes the guest has not read yet (at most [`RX_FIFO_SIZE`]).
    pub rx_fifo: Vec<u8>,
}

impl Default for ConsoleState {
    fn default() -> Self {
        SerialState::default().into()
    }
}

impl From<SerialState> for ConsoleState {
    fn from(s: SerialState) -> Self {
        ConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer,
        }
    }
}

impl From<&ConsoleState> for SerialState {
    fn from(s: &ConsoleState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.rx_fifo.clone(),
        }
    }
}

/// What a console restore needs besides its state.
#[derive(Debug)]
pub struct ConsoleArgs {
    /// The UART's interrupt (wired to GSI 4 by the monitor).
    pub irq: EventFd,
    /// Where the restored console's lines go (the partition's existing log, or a new one).
    pub handle: ConsoleHandle,
}

/// Why a console state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The saved receive FIFO is longer than the UART's.
    #[error("console: the receive FIFO holds {0} bytes, the UART's holds {RX_FIFO_SIZE}")]
    FifoTooLong(usize),
    /// The interrupt the restored registers call for could not be raised.
    #[error("console: raising the restored interrupt: {0}")]
    Irq(io::Error),
}

/// A partition's console device: the UART and where its output goes.
pub struct Console {
    uart: Serial<IrqLine, NoEvents, ConsoleHandle>,
    handle: ConsoleHandle,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// A console whose UART raises `irq` and writes into `handle`.
    pub fn new(irq: EventFd, handle: ConsoleHandle) -> Self {
        Console {
            uart: Serial::new(IrqLine(irq), handle.clone()),
            handle,
        }
    }

    /// The shared log this console writes into.
    pub fn handle(&self) -> &ConsoleHandle {
        &self.handle
    }

    /// A guest read of UART register `offset` (0..8).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match u8::try_from(offset) {
            Ok(o) if o < 8 => self.uart.read(o),
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    /// A guest write of UART register `offset` (0..8). Only the first byte counts.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(o), Some(&v)) = (u8::try_from(offset), data.first()) {
            if o < 8 {
                // A failed interrupt trigger only loses an interrupt nobody waits for.
                let _ = self.uart.write(o, v);
            }
        }
    }
}

impl Persist for Console {
    type State = ConsoleState;
    type ConstructorArgs = ConsoleArgs;
    type Error = ConsoleError;

    fn save(&self) -> Result<ConsoleState, Self::Error> {
        Ok(self.uart.state().into())
    }

    /// A console with the saved registers and FIFO. As a real UART would, it raises its
    /// interrupt at once if the registers say one is pending and enabled.
    fn restore(args: ConsoleArgs, state: &ConsoleState) -> Result<Self, ConsoleError> {
        if state.rx_fifo.len() > RX_FIFO_SIZE {
            return Err(ConsoleError::FifoTooLong(state.rx_fifo.len()));
        }
        let uart = Serial::from_state(
            &SerialState::from(state),
            IrqLine(args.irq),
            NoEvents,
            args.handle.clone(),
        )
        .map_err(|e| match e {
            vm_superio::serial::Error::Trigger(e) => ConsoleError::Irq(e),
            vm_superio::serial::Error::FullFifo => ConsoleError::FifoTooLong(state.rx_fifo.len()),
            vm_superio::serial::Error::IOError(e) => ConsoleError::Irq(e),
        })?;
        Ok(Console {
            uart,
            handle: args.handle,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> Console {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        Console::new(irq, ConsoleHandle::new(ConsoleOutput::Discard))
    }

    fn send(c: &mut Console, s: &str) {
        for b in s.bytes() {
            c.write(0, &[b]);
        }
    }

    #[test]
    fn bytes_become_lines() {
        let mut c = console();
        send(&mut c, "hello\r\nworld\npartial");
        let log = c.handle().lock();
        assert_eq!(log.tail(10), vec!["hello", "world"]);
        assert_eq!(log.total_lines(), 2);
    }

    #[test]
    fn partial_line_is_flushed_on_request() {
        let mut c = console();
        send(&mut c, "last words");
        c.handle().lock().flush_partial();
        assert_eq!(c.handle().lock().tail(1), vec!["last words"]);
    }

    #[test]
    fn ring_keeps_only_recent_lines() {
        let mut c = console();
        for i in 0..RECENT_LINES + 5 {
            send(&mut c, &format!("{i}\n"));
        }
        let log = c.handle().lock();
        let tail = log.tail(RECENT_LINES + 100);
        assert_eq!(tail.len(), RECENT_LINES);
        assert_eq!(tail[0], "5");
        assert_eq!(
            log.tail(2),
            vec![
                format!("{}", RECENT_LINES + 3),
                format!("{}", RECENT_LINES + 4)
            ]
        );
    }

    #[test]
    fn over_long_line_is_cut() {
        let mut c = console();
        send(&mut c, &"x".repeat(MAX_LINE + 10));
        send(&mut c, "\n");
        let tail = c.handle().lock().tail(2);
        assert_eq!(tail[0].len(), MAX_LINE);
        assert_eq!(tail[1].len(), 10);
    }

    #[test]
    fn file_sink_receives_lines() {
        let path = std::env::temp_dir().join(format!("duplex-console-{}.log", std::process::id()));
        let f = File::create(&path).expect("create");
        let mut c = Console::new(
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            ConsoleHandle::new(ConsoleOutput::File(f)),
        );
        send(&mut c, "one\ntwo\n");
        assert!(c.handle().flush_output(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        assert_eq!(text, "one\ntwo\n");
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let mut c = console();
        let mut lsr = [0u8; 1];
        c.read(5, &mut lsr);
        assert_ne!(
            lsr[0] & 0x20,
            0,
            "THR empty bit must be set so guests can write"
        );
    }

    fn reg(c: &mut Console, offset: u64) -> u8 {
        let mut d = [0u8; 1];
        c.read(offset, &mut d);
        d[0]
    }

    /// LCR with DLAB, divisor 3, LCR 8N1, IER "received data", scratch, MCR loopback with
    /// two bytes looped into the receive FIFO; a line already written.
    fn drive(c: &mut Console) {
        send(c, "before\n");
        c.write(3, &[0x80]);
        c.write(0, &[3]);
        c.write(1, &[0]);
        c.write(3, &[0x03]);
        c.write(1, &[0x01]);
        c.write(7, &[0x5a]);
        c.write(4, &[0x10]);
        send(c, "hi");
    }

    crate::persist_round_trip!(
        console_round_trip,
        Console,
        make: console,
        mutate: drive,
        args: |c: &mut Console| ConsoleArgs {
            irq: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            handle: c.handle().clone(),
        },
        check: |mut original: Console, mut restored: Console| {
            for offset in [1, 3, 4, 5, 6, 7] {
                assert_eq!(
                    reg(&mut restored, offset),
                    reg(&mut original, offset),
                    "register {offset} reads back the same"
                );
            }
            assert_eq!(reg(&mut restored, 3), 0x03);
            assert_eq!(reg(&mut restored, 1), 0x01);
            assert_eq!(reg(&mut restored, 7), 0x5a);
            restored.write(3, &[0x83]);
            assert_eq!((reg(&mut restored, 0), reg(&mut restored, 1)), (3, 0));
            restored.write(3, &[0x03]);
            // The looped-back bytes are in the restored FIFO, once.
            assert_eq!(reg(&mut restored, 5) & 1, 1, "data ready");
            assert_eq!(reg(&mut restored, 0), b'h');
            assert_eq!(reg(&mut restored, 0), b'i');
            assert_eq!(reg(&mut restored, 5) & 1, 0, "FIFO drained");
            // Output goes on into the same log.
            restored.write(4, &[0]);
            send(&mut restored, "after\n");
            assert_eq!(restored.handle().lock().tail(2), vec!["before", "after"]);
        },
    );

    #[test]
    fn restore_refuses_an_over_long_fifo() {
        let state = ConsoleState {
            rx_fifo: vec![0; RX_FIFO_SIZE + 1],
            ..Default::default()
        };
        let args = ConsoleArgs {
            irq: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            handle: ConsoleHandle::new(ConsoleOutput::Discard),
        };
        assert!(matches!(
            Console::restore(args, &state),
            Err(ConsoleError::FifoTooLong(65))
        ));
    }

    #[test]
    fn restore_raises_a_pending_enabled_interrupt() {
        let mut c = console();
        drive(&mut c);
        let state = c.save().expect("save");
        assert_eq!(state.rx_fifo, b"hi");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let args = ConsoleArgs {
            irq: irq.try_clone().expect("clone"),
            handle: ConsoleHandle::new(ConsoleOutput::Discard),
        };
        let _restored = Console::restore(args, &state).expect("restore");
        assert!(irq.read().is_ok(), "received-data interrupt raised again");
    }

    #[test]
    fn out_of_range_offsets_are_ignored() {
        let mut c = console();
        c.write(9, b"x");
        c.write(u64::MAX, b"x");
        let mut d = [0xffu8; 2];
        c.read(300, &mut d);
        assert_eq!(d, [0, 0]);
        assert_eq!(c.handle().lock().total_lines(), 0);
    }
}
