//! The system control page of the guest ABI (`docs/guest-abi.md`): how a guest powers
//! off, asks for a reboot, sleeps without spinning, sleeps for power saving until woken,
//! and reports a fault or a panic.
//!
//! The device only decodes accesses; what an access means for the partition is returned
//! as a [`SysctlAction`] for the vCPU loop to carry out.
//!
//! Its whole state (TSC frequency, a fault report being written) is plain serde data: a
//! snapshot ([`Persist`]) saves the [`Sysctl`] itself.

use serde::{Deserialize, Serialize};

use crate::persist::Persist;

/// `MAGIC` register value: "DPLX" little-endian.
pub const MAGIC: u32 = 0x584C_5044;
/// The guest ABI version this device implements.
pub const ABI_VERSION: u32 = 1;

/// Register offsets within the page.
pub mod reg {
    /// R, 4 bytes: [`super::MAGIC`].
    pub const MAGIC: u64 = 0x00;
    /// R, 4 bytes: [`super::ABI_VERSION`].
    pub const VERSION: u64 = 0x04;
    /// R, 8 bytes: TSC frequency in kHz.
    pub const TSC_KHZ: u64 = 0x08;
    /// W, 4 bytes: power off with this exit status.
    pub const POWER_OFF: u64 = 0x10;
    /// W, 4 bytes: reboot request.
    pub const REBOOT: u64 = 0x14;
    /// W, 8 bytes: sleep until the TSC reaches this value.
    pub const WAIT_UNTIL: u64 = 0x18;
    /// W, 8 bytes: fault report, vector.
    pub const FAULT_VECTOR: u64 = 0x20;
    /// W, 8 bytes: fault report, error code.
    pub const FAULT_ERROR: u64 = 0x28;
    /// W, 8 bytes: fault report, rip.
    pub const FAULT_RIP: u64 = 0x30;
    /// W, 4 bytes: commit the fault report.
    pub const FAULT_COMMIT: u64 = 0x38;
    /// W, 4 bytes: guest panic with this code.
    pub const PANIC: u64 = 0x40;
    /// W, 4 bytes: the guest asks for a coordinated snapshot (1) or a snapshot and a
    /// reboot from it (2); other values are ignored.
    pub const SNAPSHOT_REQUEST: u64 = 0x48;
    /// W (8 bytes): the guest-physical address of the guest's time bias, a u64 (8-byte
    /// aligned) that the guest subtracts from the TSC to tell time; 0 unregisters it.
    pub const TIME_BIAS_ADDR: u64 = 0x50;
    /// R (8 bytes): the time bias the monitor keeps (also written at `TIME_BIAS_ADDR`).
    pub const TIME_BIAS: u64 = 0x58;
    /// W (4 bytes): `1` puts the partition to sleep (power saving) until it is woken.
    pub const SLEEP: u64 = 0x60;
    /// R (4 bytes): why the partition last woke ([`super::WakeReason::code`]; 0: never).
    pub const WAKE_REASON: u64 = 0x64;
}

/// What woke a sleeping partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WakeReason {
    /// A Wake-on-LAN magic packet for its network card's MAC.
    MagicPacket,
    /// The operator (`duplex ctl wake NAME`).
    Operator,
}

impl WakeReason {
    /// The `WAKE_REASON` register's value.
    pub fn code(self) -> u32 {
        match self {
            WakeReason::MagicPacket => 1,
            WakeReason::Operator => 2,
        }
    }
}

impl std::fmt::Display for WakeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WakeReason::MagicPacket => "magic packet",
            WakeReason::Operator => "operator",
        })
    }
}

/// A partition's power-saving sleep (guest ABI `SLEEP`), kept in the page's state so that
/// a snapshot taken while it sleeps restores it asleep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SleepState {
    /// Since when it sleeps (ms since the Unix epoch), while it does.
    pub since_ms: Option<u64>,
    /// Why it last woke, and when (ms since the Unix epoch).
    pub wake_reason: Option<WakeReason>,
    pub woken_ms: Option<u64>,
    /// How many times it slept.
    pub sleeps: u64,
    /// How many times it was woken.
    pub wakes: u64,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fault the guest reported about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultReport {
    /// Exception vector (0..32 for CPU exceptions).
    pub vector: u64,
    /// Error code pushed by the CPU, or 0.
    pub error: u64,
    /// Instruction pointer of the faulting instruction.
    pub rip: u64,
}

impl FaultReport {
    /// The partition's crash reason for this fault.
    pub fn reason(&self) -> String {
        format!(
            "guest fault: vector {} ({}) at rip {:#x}, error {:#x}",
            self.vector,
            exception_name(self.vector),
            self.rip,
            self.error
        )
    }
}

/// The mnemonic of an x86 exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved",
        "reserved", "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
    ];
    usize::try_from(vector)
        .ok()
        .and_then(|v| NAMES.get(v))
        .copied()
        .unwrap_or("interrupt")
}

/// What a guest write asks of the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlAction {
    /// Nothing beyond the register update.
    None,
    /// Power off with an exit status.
    PowerOff(u32),
    /// Cold-boot the partition again.
    Reboot,
    /// Sleep until the guest TSC reaches this value.
    WaitUntil(u64),
    /// The guest reported a fault.
    Fault(FaultReport),
    /// The guest panicked with this code.
    Panic(u32),
    /// The guest asks for a coordinated snapshot (and a reboot from it when `reboot`).
    SnapshotRequest { reboot: bool },
    /// The guest went to sleep (power saving): park its vCPUs until it is woken.
    Sleep,
}

/// The system control page of one partition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sysctl {
    tsc_khz: u64,
    fault: FaultReport,
    bad_accesses: u64,
    /// Where the guest keeps its time bias (0: it did not say).
    #[serde(default)]
    time_bias_addr: u64,
    /// The guest's time bias: ticks the guest subtracts from the TSC (see `docs/guest-abi.md`,
    /// "Time across a restore").
    #[serde(default)]
    time_bias: u64,
    /// Power-saving sleep (`SLEEP`).
    #[serde(default)]
    sleep: SleepState,
}

fn le_value(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

impl Sysctl {
    /// A control page announcing a TSC of `tsc_khz` kHz.
    pub fn new(tsc_khz: u64) -> Self {
        Sysctl {
            tsc_khz,
            ..Default::default()
        }
    }

    /// Where the guest keeps its time bias, if it registered one.
    pub fn time_bias_addr(&self) -> Option<u64> {
        (self.time_bias_addr != 0).then_some(self.time_bias_addr)
    }

    /// The guest's time bias (0 unless a restore moved its TSC).
    pub fn time_bias(&self) -> u64 {
        self.time_bias
    }

    /// Adds `ticks` (wrapping) to the time bias; returns the new bias.
    pub fn add_time_bias(&mut self, ticks: u64) -> u64 {
        self.time_bias = self.time_bias.wrapping_add(ticks);
        self.time_bias
    }

    /// Whether the partition sleeps (power saving) until woken.
    pub fn asleep(&self) -> bool {
        self.sleep.since_ms.is_some()
    }

    /// The sleep record: since when, the last wake and its reason, counts.
    pub fn sleep_state(&self) -> SleepState {
        self.sleep
    }

    /// Wakes a sleeping partition at `now_ms` for `reason`; false (and nothing changes) if
    /// it was not asleep.
    pub fn wake(&mut self, reason: WakeReason, now_ms: u64) -> bool {
        if self.sleep.since_ms.take().is_none() {
            return false;
        }
        self.sleep.wake_reason = Some(reason);
        self.sleep.woken_ms = Some(now_ms);
        self.sleep.wakes += 1;
        true
    }

    /// Accesses that were misaligned, of the wrong size, or outside any register.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses
    }

    fn size_of(offset: u64) -> Option<usize> {
        match offset {
            reg::MAGIC
            | reg::VERSION
            | reg::POWER_OFF
            | reg::REBOOT
            | reg::FAULT_COMMIT
            | reg::PANIC
            | reg::SNAPSHOT_REQUEST
            | reg::SLEEP
            | reg::WAKE_REASON => Some(4),
            reg::TSC_KHZ
            | reg::TIME_BIAS_ADDR
            | reg::TIME_BIAS
            | reg::WAIT_UNTIL
            | reg::FAULT_VECTOR
            | reg::FAULT_ERROR
            | reg::FAULT_RIP => Some(8),
            _ => None,
        }
    }

    fn check(&mut self, offset: u64, len: usize) -> bool {
        let ok = Self::size_of(offset) == Some(len);
        if !ok {
            self.bad_accesses += 1;
        }
        ok
    }

    /// A guest read at `offset` within the page.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !self.check(offset, data.len()) {
            return;
        }
        let value: u64 = match offset {
            reg::MAGIC => MAGIC.into(),
            reg::VERSION => ABI_VERSION.into(),
            reg::TSC_KHZ => self.tsc_khz,
            reg::TIME_BIAS => self.time_bias,
            reg::WAKE_REASON => self.sleep.wake_reason.map_or(0, |r| r.code().into()),
            _ => 0,
        };
        let n = data.len();
        data.copy_from_slice(&value.to_le_bytes()[..n]);
    }

    /// A guest write at `offset` within the page.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> SysctlAction {
        if !self.check(offset, data.len()) {
            return SysctlAction::None;
        }
        let value = le_value(data);
        // Four-byte registers: the value fits in u32 because the size was checked.
        let value32 = value as u32;
        match offset {
            reg::POWER_OFF => SysctlAction::PowerOff(value32),
            reg::REBOOT => SysctlAction::Reboot,
            reg::WAIT_UNTIL => SysctlAction::WaitUntil(value),
            reg::FAULT_VECTOR => {
                self.fault.vector = value;
                SysctlAction::None
            }
            reg::FAULT_ERROR => {
                self.fault.error = value;
                SysctlAction::None
            }
            reg::FAULT_RIP => {
                self.fault.rip = value;
                SysctlAction::None
            }
            reg::FAULT_COMMIT => SysctlAction::Fault(std::mem::take(&mut self.fault)),
            reg::PANIC => SysctlAction::Panic(value32),
            reg::TIME_BIAS_ADDR => {
                // An unaligned address cannot hold the u64: refused (counted).
                if value.is_multiple_of(8) {
                    self.time_bias_addr = value;
                } else {
                    self.bad_accesses += 1;
                }
                SysctlAction::None
            }
            reg::SLEEP if value32 == 1 => {
                self.sleep.since_ms = Some(unix_ms());
                self.sleep.sleeps += 1;
                SysctlAction::Sleep
            }
            reg::SLEEP => {
                self.bad_accesses += 1;
                SysctlAction::None
            }
            reg::SNAPSHOT_REQUEST => match value32 {
                1 => SysctlAction::SnapshotRequest { reboot: false },
                2 => SysctlAction::SnapshotRequest { reboot: true },
                _ => SysctlAction::None,
            },
            _ => SysctlAction::None,
        }
    }
}

impl Persist for Sysctl {
    type State = Sysctl;
    type ConstructorArgs = ();
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<Sysctl, Self::Error> {
        Ok(self.clone())
    }

    /// Any value of the fields is a valid page: nothing to validate.
    fn restore(_args: (), state: &Sysctl) -> Result<Self, Self::Error> {
        Ok(state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::persist_round_trip!(
        sysctl_round_trip,
        Sysctl,
        make: || Sysctl::new(2_500_000),
        mutate: |s: &mut Sysctl| {
            // A fault report half written when the snapshot is taken.
            s.write(reg::FAULT_VECTOR, &13u64.to_le_bytes());
            s.write(reg::FAULT_ERROR, &0x18u64.to_le_bytes());
        },
        args: |_: &mut Sysctl| (),
        check: |_original: Sysctl, mut restored: Sysctl| {
            assert_eq!(read(&mut restored, reg::TSC_KHZ, 8), 2_500_000);
            restored.write(reg::FAULT_RIP, &0x4000u64.to_le_bytes());
            assert_eq!(
                restored.write(reg::FAULT_COMMIT, &0u32.to_le_bytes()),
                SysctlAction::Fault(FaultReport {
                    vector: 13,
                    error: 0x18,
                    rip: 0x4000
                })
            );
        },
    );

    fn read(s: &mut Sysctl, off: u64, len: usize) -> u64 {
        let mut d = vec![0u8; len];
        s.read(off, &mut d);
        le_value(&d)
    }

    #[test]
    fn identity_registers() {
        let mut s = Sysctl::new(2_500_000);
        assert_eq!(read(&mut s, reg::MAGIC, 4), u64::from(MAGIC));
        assert_eq!(read(&mut s, reg::VERSION, 4), 1);
        assert_eq!(read(&mut s, reg::TSC_KHZ, 8), 2_500_000);
        assert_eq!(s.bad_accesses(), 0);
    }

    #[test]
    fn power_off_reboot_wait_panic() {
        let mut s = Sysctl::new(1);
        assert_eq!(
            s.write(reg::POWER_OFF, &7u32.to_le_bytes()),
            SysctlAction::PowerOff(7)
        );
        assert_eq!(
            s.write(reg::REBOOT, &0u32.to_le_bytes()),
            SysctlAction::Reboot
        );
        assert_eq!(
            s.write(reg::WAIT_UNTIL, &0x1234_5678_9abcu64.to_le_bytes()),
            SysctlAction::WaitUntil(0x1234_5678_9abc)
        );
        assert_eq!(
            s.write(reg::PANIC, &3u32.to_le_bytes()),
            SysctlAction::Panic(3)
        );
    }

    #[test]
    fn snapshot_requests() {
        let mut s = Sysctl::new(1);
        let w = |s: &mut Sysctl, v: u32| s.write(reg::SNAPSHOT_REQUEST, &v.to_le_bytes());
        assert_eq!(
            w(&mut s, 1),
            SysctlAction::SnapshotRequest { reboot: false }
        );
        assert_eq!(w(&mut s, 2), SysctlAction::SnapshotRequest { reboot: true });
        assert_eq!(w(&mut s, 0), SysctlAction::None);
        assert_eq!(w(&mut s, 3), SysctlAction::None);
        assert_eq!(s.bad_accesses(), 0);
    }

    #[test]
    fn fault_report_is_committed_once() {
        let mut s = Sysctl::new(1);
        assert_eq!(
            s.write(reg::FAULT_VECTOR, &14u64.to_le_bytes()),
            SysctlAction::None
        );
        s.write(reg::FAULT_ERROR, &6u64.to_le_bytes());
        s.write(reg::FAULT_RIP, &0x10_2030u64.to_le_bytes());
        let report = FaultReport {
            vector: 14,
            error: 6,
            rip: 0x10_2030,
        };
        assert_eq!(
            s.write(reg::FAULT_COMMIT, &0u32.to_le_bytes()),
            SysctlAction::Fault(report)
        );
        assert_eq!(
            report.reason(),
            "guest fault: vector 14 (#PF) at rip 0x102030, error 0x6"
        );
        // The report is consumed by the commit.
        assert_eq!(
            s.write(reg::FAULT_COMMIT, &0u32.to_le_bytes()),
            SysctlAction::Fault(FaultReport::default())
        );
    }

    #[test]
    fn wrong_sizes_and_offsets_are_counted_and_ignored() {
        let mut s = Sysctl::new(1);
        assert_eq!(s.write(reg::POWER_OFF, &[1u8]), SysctlAction::None);
        assert_eq!(s.write(reg::WAIT_UNTIL, &[1u8; 4]), SysctlAction::None);
        assert_eq!(s.write(0x44, &[0u8; 4]), SysctlAction::None);
        assert_eq!(s.write(0x11, &[0u8; 4]), SysctlAction::None);
        assert_eq!(read(&mut s, reg::MAGIC, 8), 0);
        assert_eq!(s.bad_accesses(), 5);
    }

    #[test]
    fn sleep_is_kept_across_a_restore_until_a_wake_with_its_reason() {
        let mut s = Sysctl::new(1);
        assert_eq!(read(&mut s, reg::WAKE_REASON, 4), 0, "never slept");
        assert!(!s.wake(WakeReason::Operator, 5), "nothing to wake");
        assert_eq!(s.write(reg::SLEEP, &2u32.to_le_bytes()), SysctlAction::None);
        assert_eq!((s.asleep(), s.bad_accesses()), (false, 1));
        assert_eq!(
            s.write(reg::SLEEP, &1u32.to_le_bytes()),
            SysctlAction::Sleep
        );
        assert!(s.asleep());
        let mut back = Sysctl::restore((), &crate::persist::json_round_trip(&s).expect("json"))
            .expect("restore");
        assert!(back.asleep(), "a set taken asleep restores asleep");
        assert!(back.wake(WakeReason::MagicPacket, 1234));
        assert!(!back.wake(WakeReason::Operator, 1300), "woken once");
        assert_eq!(read(&mut back, reg::WAKE_REASON, 4), 1);
        let st = back.sleep_state();
        assert_eq!(
            (
                st.since_ms,
                st.wake_reason,
                st.woken_ms,
                st.sleeps,
                st.wakes
            ),
            (None, Some(WakeReason::MagicPacket), Some(1234), 1, 1)
        );
    }

    #[test]
    fn exception_names() {
        assert_eq!(exception_name(6), "#UD");
        assert_eq!(exception_name(13), "#GP");
        assert_eq!(exception_name(8), "#DF");
        assert_eq!(exception_name(200), "interrupt");
    }

    #[test]
    fn the_time_bias_is_registered_read_and_kept_across_a_restore() {
        let mut s = Sysctl::new(2_500_000);
        assert_eq!(s.time_bias_addr(), None);
        // An unaligned address is refused and counted.
        s.write(reg::TIME_BIAS_ADDR, &0x1004u64.to_le_bytes());
        assert_eq!((s.time_bias_addr(), s.bad_accesses()), (None, 1));
        s.write(reg::TIME_BIAS_ADDR, &0x20_0000u64.to_le_bytes());
        assert_eq!(s.time_bias_addr(), Some(0x20_0000));
        assert_eq!(s.add_time_bias(1000), 1000);
        assert_eq!(
            s.add_time_bias(u64::MAX),
            999,
            "wrapping: a TSC may also go back"
        );
        let mut d = [0u8; 8];
        s.read(reg::TIME_BIAS, &mut d);
        assert_eq!(u64::from_le_bytes(d), 999);
        let back = Sysctl::restore((), &crate::persist::json_round_trip(&s).expect("json"))
            .expect("restore");
        assert_eq!(
            (back.time_bias_addr(), back.time_bias()),
            (Some(0x20_0000), 999)
        );
    }
}
