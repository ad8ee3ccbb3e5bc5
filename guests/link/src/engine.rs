//! The engine's state machine, without I/O: the firmware feeds it decoded [`ToEngine`]
//! messages and sends back what it returns. See `docs/print-pipeline.md`.
//!
//! ```text
//! warming_up --calibrated--> ready <--> printing      (printing: a page within the last second)
//!                              |  ^
//!                          Jam |  | ClearJam
//!                              v  |
//!                             error                    (every Print → PageFailed "paper jam")
//! ```
//!
//! `PrepareSnapshot` (the coordinated snapshot) is approved in `ready` and `printing` and
//! denied otherwise, with the reason (`paper jam`, `warming up`). The engine answers its
//! messages one at a time, in order, so when it answers `PrepareSnapshot` every page sent
//! before it has been printed and answered: that is its safe point. Nothing changes state;
//! the counters live in ordinary memory and go on from the snapshot after a restore.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::msg::{EngineInfo, EngineState, FromEngine, ToEngine};
use crate::print::{halftone, page_checksum, page_raster};

/// After printing a page the engine reports `printing` for this long.
pub const PRINTING_LINGER_MS: u64 = 1000;
/// Toner drops one percent per this many pages.
pub const PAGES_PER_TONER_PCT: u64 = 100;
/// The reason of a page refused while jammed, and the engine's error then.
pub const PAPER_JAM: &str = "paper jam";
/// The reason of a page refused before calibration finished.
pub const WARMING_UP: &str = "warming up";

/// The print engine.
#[derive(Clone, Debug)]
pub struct Engine {
    gamma: [u8; 256],
    ready: bool,
    jammed: bool,
    pages_printed: u64,
    last_print_ms: Option<u64>,
}

impl Engine {
    /// A cold engine (warming up) that will halftone through `gamma`.
    pub fn new(gamma: [u8; 256]) -> Self {
        Engine {
            gamma,
            ready: false,
            jammed: false,
            pages_printed: 0,
            last_print_ms: None,
        }
    }

    /// Calibration finished: the engine can print. Returns the `Ready` message for every
    /// connection already open.
    pub fn calibrated(&mut self) -> FromEngine {
        self.ready = true;
        FromEngine::Ready
    }

    /// Whether calibration has finished.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Whether the paper path is jammed.
    pub fn is_jammed(&self) -> bool {
        self.jammed
    }

    /// Pages printed since the cold start.
    pub fn pages_printed(&self) -> u64 {
        self.pages_printed
    }

    /// Toner left in percent.
    pub fn toner_pct(&self) -> u8 {
        100u64.saturating_sub(self.pages_printed / PAGES_PER_TONER_PCT) as u8
    }

    /// The state at time `now_ms` (any monotonic millisecond clock).
    pub fn state(&self, now_ms: u64) -> EngineState {
        if !self.ready {
            EngineState::WarmingUp
        } else if self.jammed {
            EngineState::Error
        } else if self
            .last_print_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < PRINTING_LINGER_MS)
        {
            EngineState::Printing
        } else {
            EngineState::Ready
        }
    }

    /// The status report at time `now_ms`.
    pub fn info(&self, now_ms: u64) -> EngineInfo {
        EngineInfo {
            state: self.state(now_ms),
            pages_printed: self.pages_printed,
            toner_pct: self.toner_pct(),
            error: self.jammed.then(|| PAPER_JAM.to_string()),
        }
    }

    /// What a newly accepted connection is told first: `Ready` if calibrated, else nothing
    /// (it gets `Ready` when calibration finishes).
    pub fn greeting(&self) -> Option<FromEngine> {
        self.ready.then_some(FromEngine::Ready)
    }

    /// Handles one message at time `now_ms`; returns the reply.
    pub fn handle(&mut self, msg: ToEngine, now_ms: u64) -> FromEngine {
        match msg {
            ToEngine::Print {
                job,
                page,
                width,
                height,
                raster,
            } => match self.print(width, height, &raster, now_ms) {
                Ok(checksum) => FromEngine::PageDone {
                    job,
                    page,
                    checksum,
                },
                Err(reason) => FromEngine::PageFailed { job, page, reason },
            },
            ToEngine::Status => FromEngine::Status(self.info(now_ms)),
            ToEngine::Jam => {
                self.jammed = true;
                FromEngine::Status(self.info(now_ms))
            }
            ToEngine::ClearJam => {
                self.jammed = false;
                FromEngine::Status(self.info(now_ms))
            }
            // The firmware faults before handing `Crash` here; as logic it is `Status`.
            ToEngine::Crash => FromEngine::Status(self.info(now_ms)),
            ToEngine::PrepareSnapshot => match self.snapshot_refusal() {
                None => FromEngine::SnapshotApproved {
                    pages_printed: self.pages_printed,
                },
                Some(reason) => FromEngine::SnapshotDenied {
                    reason: reason.to_string(),
                },
            },
            ToEngine::ScanPage {
                scan,
                page,
                seed,
                width,
                height,
            } => match self.scan(seed, page, width, height) {
                Ok(bytes) => FromEngine::ScannedPage { scan, page, bytes },
                Err(reason) => FromEngine::ScanFailed { scan, page, reason },
            },
        }
    }

    /// Scans one page: the halftone of `page_raster(seed, page, width, height)` through
    /// the engine's tone curve, exactly as `Print` halftones it (so its
    /// [`page_checksum`] is the print checksum). A scan needs the engine calibrated and its
    /// paper path clear; it does not count as a printed page.
    fn scan(&self, seed: u64, page: u32, width: u16, height: u16) -> Result<Vec<u8>, String> {
        if !self.ready {
            return Err(WARMING_UP.to_string());
        }
        if self.jammed {
            return Err(PAPER_JAM.to_string());
        }
        let pixels = u32::from(width) * u32::from(height);
        if width == 0 || height == 0 || pixels > crate::msg::MAX_PAGE_PIXELS {
            return Err(alloc::format!("bad page: {width}x{height}"));
        }
        let raster = page_raster(seed, page, width, height);
        Ok(halftone(&raster, width, height, &self.gamma))
    }

    /// Why the engine must not be snapshotted now (`None`: it may). A jammed engine is
    /// refused so that a device never starts from a set that needs a service call; one
    /// still calibrating, so that a restore skips the calibration.
    pub fn snapshot_refusal(&self) -> Option<&'static str> {
        if !self.ready {
            Some(WARMING_UP)
        } else if self.jammed {
            Some(PAPER_JAM)
        } else {
            None
        }
    }

    /// Prints one page: its checksum, or why it failed.
    fn print(
        &mut self,
        width: u16,
        height: u16,
        raster: &[u8],
        now_ms: u64,
    ) -> Result<u32, String> {
        if !self.ready {
            return Err(WARMING_UP.to_string());
        }
        if self.jammed {
            return Err(PAPER_JAM.to_string());
        }
        let want = usize::from(width) * usize::from(height);
        if width == 0 || height == 0 || raster.len() != want {
            return Err(alloc::format!(
                "bad raster: {} bytes for {width}x{height}",
                raster.len()
            ));
        }
        let bits: Vec<u8> = halftone(raster, width, height, &self.gamma);
        self.pages_printed += 1;
        self.last_print_ms = Some(now_ms);
        Ok(page_checksum(&bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::print::{expected_page_checksum, gamma_table};
    use alloc::vec;

    fn print(job: u64, page: u32) -> ToEngine {
        ToEngine::Print {
            job,
            page,
            width: 64,
            height: 32,
            raster: page_raster(job, page, 64, 32),
        }
    }

    #[test]
    fn warms_up_then_prints() {
        let mut e = Engine::new(gamma_table());
        assert_eq!(e.state(0), EngineState::WarmingUp);
        assert_eq!(e.greeting(), None);
        assert_eq!(
            e.handle(print(1, 0), 0),
            FromEngine::PageFailed {
                job: 1,
                page: 0,
                reason: "warming up".into()
            }
        );
        assert_eq!(e.calibrated(), FromEngine::Ready);
        assert_eq!(e.greeting(), Some(FromEngine::Ready));
        assert_eq!(e.state(0), EngineState::Ready);
        assert_eq!(
            e.handle(print(1, 0), 5000),
            FromEngine::PageDone {
                job: 1,
                page: 0,
                checksum: expected_page_checksum(1, 0, 64, 32)
            }
        );
        assert_eq!(e.state(5500), EngineState::Printing);
        assert_eq!(e.state(6000), EngineState::Ready);
        assert_eq!(e.pages_printed(), 1);
    }

    #[test]
    fn jam_fails_pages_until_cleared() {
        let mut e = Engine::new(gamma_table());
        e.calibrated();
        let FromEngine::Status(info) = e.handle(ToEngine::Jam, 0) else {
            panic!()
        };
        assert_eq!(info.state, EngineState::Error);
        assert_eq!(info.error.as_deref(), Some("paper jam"));
        assert_eq!(
            e.handle(print(2, 3), 0),
            FromEngine::PageFailed {
                job: 2,
                page: 3,
                reason: "paper jam".into()
            }
        );
        assert_eq!(e.pages_printed(), 0);
        let FromEngine::Status(info) = e.handle(ToEngine::ClearJam, 0) else {
            panic!()
        };
        assert_eq!((info.state, info.error), (EngineState::Ready, None));
        assert!(matches!(
            e.handle(print(2, 3), 0),
            FromEngine::PageDone { .. }
        ));
    }

    #[test]
    fn toner_drops_one_percent_per_hundred_pages_and_stops_at_zero() {
        let mut e = Engine::new(gamma_table());
        e.calibrated();
        let tiny = |page| ToEngine::Print {
            job: 1,
            page,
            width: 1,
            height: 1,
            raster: vec![0],
        };
        for p in 0..250 {
            assert!(matches!(e.handle(tiny(p), 0), FromEngine::PageDone { .. }));
        }
        assert_eq!(e.toner_pct(), 98);
        e.pages_printed = 10_050;
        assert_eq!(e.toner_pct(), 0);
        assert!(matches!(e.handle(tiny(0), 0), FromEngine::PageDone { .. }));
        assert_eq!(e.info(0).toner_pct, 0);
    }

    #[test]
    fn snapshot_is_approved_when_ready_or_printing_and_denied_otherwise() {
        let mut e = Engine::new(gamma_table());
        assert_eq!(
            e.handle(ToEngine::PrepareSnapshot, 0),
            FromEngine::SnapshotDenied {
                reason: "warming up".into()
            }
        );
        e.calibrated();
        assert_eq!(
            e.handle(ToEngine::PrepareSnapshot, 0),
            FromEngine::SnapshotApproved { pages_printed: 0 }
        );
        assert!(matches!(
            e.handle(print(1, 0), 100),
            FromEngine::PageDone { .. }
        ));
        assert_eq!(e.state(200), EngineState::Printing);
        assert_eq!(
            e.handle(ToEngine::PrepareSnapshot, 200),
            FromEngine::SnapshotApproved { pages_printed: 1 }
        );
        e.handle(ToEngine::Jam, 300);
        assert_eq!(
            e.handle(ToEngine::PrepareSnapshot, 300),
            FromEngine::SnapshotDenied {
                reason: "paper jam".into()
            }
        );
        // Asking changes nothing: still jammed, same counters; cleared, it approves.
        assert_eq!(e.state(300), EngineState::Error);
        e.handle(ToEngine::ClearJam, 400);
        assert_eq!(
            e.handle(ToEngine::PrepareSnapshot, 400),
            FromEngine::SnapshotApproved { pages_printed: 1 }
        );
        assert!(matches!(
            e.handle(print(1, 1), 500),
            FromEngine::PageDone { .. }
        ));
        assert_eq!(e.pages_printed(), 2);
    }

    #[test]
    fn bad_raster_fails_the_page() {
        let mut e = Engine::new(gamma_table());
        e.calibrated();
        let r = e.handle(
            ToEngine::Print {
                job: 1,
                page: 0,
                width: 10,
                height: 10,
                raster: vec![0; 99],
            },
            0,
        );
        assert_eq!(
            r,
            FromEngine::PageFailed {
                job: 1,
                page: 0,
                reason: "bad raster: 99 bytes for 10x10".into()
            }
        );
    }

    #[test]
    fn a_scanned_page_is_the_print_halftone_and_needs_a_ready_clear_engine() {
        let mut e = Engine::new(gamma_table());
        let scan = |page| ToEngine::ScanPage {
            scan: 7,
            page,
            seed: 42,
            width: 50,
            height: 20,
        };
        assert_eq!(
            e.handle(scan(0), 0),
            FromEngine::ScanFailed {
                scan: 7,
                page: 0,
                reason: "warming up".into()
            }
        );
        e.calibrated();
        let FromEngine::ScannedPage {
            scan: 7,
            page: 1,
            bytes,
        } = e.handle(scan(1), 0)
        else {
            panic!("not scanned")
        };
        assert_eq!(bytes.len(), 7 * 20);
        assert_eq!(page_checksum(&bytes), expected_page_checksum(42, 1, 50, 20));
        assert_eq!(e.pages_printed(), 0, "a scan is not a printed page");
        e.handle(ToEngine::Jam, 0);
        assert!(matches!(
            e.handle(scan(2), 0),
            FromEngine::ScanFailed { .. }
        ));
        e.handle(ToEngine::ClearJam, 0);
        let bad = ToEngine::ScanPage {
            scan: 1,
            page: 0,
            seed: 0,
            width: 0,
            height: 5,
        };
        assert_eq!(
            e.handle(bad, 0),
            FromEngine::ScanFailed {
                scan: 1,
                page: 0,
                reason: "bad page: 0x5".into()
            }
        );
    }
}
