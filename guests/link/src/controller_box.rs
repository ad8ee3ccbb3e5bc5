//! The controller's part of the document service (`HostRequest::Box`), without I/O.
//!
//! The document service itself (accounts, boxes, documents, rights, the disk) is
//! `duplex-docsvc`, which the firmware owns; this logic only keeps each client's replies in
//! request order and runs scans on the engine:
//!
//! * every `Box` request reserves the client's next reply slot and waits in a queue the
//!   firmware drains with [`Controller::take_box_requests`]; the firmware answers each with
//!   [`Controller::box_reply`] (at once, or later);
//! * a `Scan` the service allowed is started with [`Controller::start_scan`]: its pages go
//!   to the engine as `ScanPage` (before print pages, in the same [`super::WINDOW`]), the
//!   engine answers each with its halftone, and the finished document (one multi-image
//!   PBM) is handed to the firmware through [`Controller::take_scans_done`] to be stored;
//!   the firmware then answers with [`Controller::box_reply`]. A failed page or a link
//!   reset fails the scan with `Error` 503 and the engine's reason.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::{error, Action, ClientId, Controller, Link, Waiting};
use crate::msg::{
    box_error, pbm_header, EngineState, HostReply, ToEngine, MAX_BOX_DOCUMENT, MAX_PAGE_PIXELS,
    MAX_SCAN_PAGES,
};
use crate::print::halftone_stride;

/// Most scans started and not finished at once; one more is refused with 429.
pub const MAX_ACTIVE_SCANS: usize = 4;

/// Where the reply to one request goes: a client and the request's place in its order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplySlot {
    client: ClientId,
    seq: u64,
}

impl ReplySlot {
    /// The client the reply goes to.
    pub fn client(&self) -> ClientId {
        self.client
    }
}

/// A `Box` request waiting for the firmware's document service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoxRequest {
    /// Where the answer goes ([`Controller::box_reply`]).
    pub slot: ReplySlot,
    /// The account the request is made as.
    pub account: String,
    /// The operation.
    pub op: crate::msg::BoxOp,
}

/// A `ShareOpen` or `ShareAnswer` request waiting for the firmware's share service
/// (`duplex-docsvc`); answered with [`Controller::box_reply`] like a `Box` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareRequest {
    /// Where the answer goes.
    pub slot: ReplySlot,
    /// `HostRequest::ShareOpen` or `HostRequest::ShareAnswer`.
    pub request: crate::msg::HostRequest,
}

/// What a scan is and where its document goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanRequest {
    /// The account the scan is made as.
    pub account: String,
    /// The box the document goes in.
    pub box_id: String,
    /// The document's name.
    pub name: String,
    /// Pages, 1..=[`MAX_SCAN_PAGES`].
    pub pages: u32,
    /// Seed of the page content.
    pub seed: u64,
    /// Page width in pixels.
    pub width: u16,
    /// Page height in pixels.
    pub height: u16,
}

/// A finished scan whose document the firmware must store, then answer `slot`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanDone {
    /// Where the answer goes.
    pub slot: ReplySlot,
    /// The scan.
    pub scan: ScanRequest,
    /// The document: each page as `P4\n<w> <h>\n` and its halftone, in page order.
    pub document: Vec<u8>,
}

#[derive(Clone, Debug)]
struct Scan {
    slot: ReplySlot,
    req: ScanRequest,
    /// Pages sent to the engine.
    sent: u32,
    /// Pages received, in order.
    received: u32,
    document: Vec<u8>,
}

/// The controller's document state.
#[derive(Debug, Default)]
pub(super) struct Docs {
    requests: VecDeque<BoxRequest>,
    shares: VecDeque<ShareRequest>,
    scans: BTreeMap<u64, Scan>,
    next_scan: u64,
    done: Vec<ScanDone>,
}

/// The size of a scan's document, or why the scan is refused (code, message).
fn scan_size(r: &ScanRequest) -> Result<u64, (u16, String)> {
    let pixels = u32::from(r.width) * u32::from(r.height);
    if r.pages == 0 || r.pages > MAX_SCAN_PAGES {
        return Err((
            box_error::INVALID,
            format!("pages must be 1..={MAX_SCAN_PAGES}, not {}", r.pages),
        ));
    }
    if r.width == 0 || r.height == 0 || pixels > MAX_PAGE_PIXELS {
        return Err((
            box_error::INVALID,
            format!("bad page size {}x{}", r.width, r.height),
        ));
    }
    let page = (pbm_header(r.width, r.height).len()
        + halftone_stride(r.width) * usize::from(r.height)) as u64;
    let total = page * u64::from(r.pages);
    if total > MAX_BOX_DOCUMENT {
        return Err((
            box_error::TOO_LARGE,
            format!("a scan of {total} bytes is larger than {MAX_BOX_DOCUMENT}"),
        ));
    }
    Ok(total)
}

impl Controller {
    /// Takes the `Box` requests received since the last call, in arrival order.
    pub fn take_box_requests(&mut self) -> Vec<BoxRequest> {
        self.docs.requests.drain(..).collect()
    }

    /// Takes the queued share requests (`ShareOpen`, `ShareAnswer`), in arrival order.
    pub fn take_share_requests(&mut self) -> Vec<ShareRequest> {
        self.docs.shares.drain(..).collect()
    }

    /// Takes the scans whose pages all arrived.
    pub fn take_scans_done(&mut self) -> Vec<ScanDone> {
        core::mem::take(&mut self.docs.done)
    }

    /// Scans started and not finished.
    pub fn active_scans(&self) -> usize {
        self.docs.scans.len()
    }

    /// Answers a `Box` request (replies go out in each client's request order).
    pub fn box_reply(&mut self, slot: ReplySlot, reply: HostReply) -> Vec<Action> {
        let mut out = Vec::new();
        self.fill(slot.client, slot.seq, reply, &mut out);
        out
    }

    /// Starts a scan the document service allowed; its answer comes later (through
    /// [`Controller::take_scans_done`] and the firmware), or now as an error: 422/413 for
    /// bad parameters, 429 when [`MAX_ACTIVE_SCANS`] run, 503 when the engine is not ready.
    pub fn start_scan(&mut self, slot: ReplySlot, req: ScanRequest) -> Vec<Action> {
        let mut out = Vec::new();
        let refused = match scan_size(&req) {
            Err(e) => Some(e),
            Ok(_) if self.link != Link::Ready => {
                Some((box_error::UNAVAILABLE, super::ENGINE_NOT_CONNECTED.into()))
            }
            Ok(_) if self.docs.scans.len() >= MAX_ACTIVE_SCANS => Some((
                box_error::BUSY,
                format!("{MAX_ACTIVE_SCANS} scans are running"),
            )),
            Ok(_) => None,
        };
        if let Some((code, message)) = refused {
            self.fill(slot.client, slot.seq, error(code, message), &mut out);
            return out;
        }
        self.docs.next_scan += 1;
        let id = self.docs.next_scan;
        out.push(Action::Log(format!(
            "scan {id}: {} pages into box {} as {}",
            req.pages, req.box_id, req.account
        )));
        let document = Vec::new();
        self.docs.scans.insert(
            id,
            Scan {
                slot,
                req,
                sent: 0,
                received: 0,
                document,
            },
        );
        self.pump(&mut out);
        out
    }

    /// Queues a `Box` request for the firmware.
    pub(super) fn queue_box(
        &mut self,
        client: ClientId,
        seq: u64,
        account: String,
        op: crate::msg::BoxOp,
    ) {
        self.docs.requests.push_back(BoxRequest {
            slot: ReplySlot { client, seq },
            account,
            op,
        });
    }

    pub(super) fn queue_share(
        &mut self,
        client: ClientId,
        seq: u64,
        request: crate::msg::HostRequest,
    ) {
        self.docs.shares.push_back(ShareRequest {
            slot: ReplySlot { client, seq },
            request,
        });
    }

    /// Sends scan pages while the window has room.
    pub(super) fn pump_scans(&mut self, out: &mut Vec<Action>) {
        while self.link == Link::Ready
            && !self.hold
            && self.engine.state != EngineState::Error
            && self.pages_in_flight() < super::WINDOW
        {
            let Some((&id, scan)) = self
                .docs
                .scans
                .iter_mut()
                .find(|(_, s)| s.sent < s.req.pages)
            else {
                return;
            };
            let page = scan.sent;
            scan.sent += 1;
            self.waiting.push_back(Waiting::Scan { scan: id, page });
            out.push(Action::Engine(ToEngine::ScanPage {
                scan: id,
                page,
                seed: scan.req.seed,
                width: scan.req.width,
                height: scan.req.height,
            }));
        }
    }

    /// Removes the waiting scan page; false (and a log line) if it was not sent.
    fn take_scan_page(&mut self, scan: u64, page: u32, out: &mut Vec<Action>) -> bool {
        let want = Waiting::Scan { scan, page };
        match self.waiting.iter().position(|w| *w == want) {
            Some(pos) => {
                self.waiting.remove(pos);
                true
            }
            None => {
                out.push(Action::Log(format!(
                    "engine answered scan {scan} page {page}, which was not sent"
                )));
                false
            }
        }
    }

    /// The engine's `ScannedPage`.
    pub(super) fn on_scanned(&mut self, id: u64, page: u32, bytes: Vec<u8>, out: &mut Vec<Action>) {
        if !self.take_scan_page(id, page, out) {
            return;
        }
        let Some(scan) = self.docs.scans.get_mut(&id) else {
            return; // failed meanwhile
        };
        let (w, h) = (scan.req.width, scan.req.height);
        if page != scan.received || bytes.len() != halftone_stride(w) * usize::from(h) {
            let reason = format!("page {page} came back out of order or of the wrong size");
            self.fail_scan(id, box_error::UNAVAILABLE, reason, out);
            return;
        }
        scan.document.extend_from_slice(&pbm_header(w, h));
        scan.document.extend_from_slice(&bytes);
        scan.received += 1;
        if scan.received == scan.req.pages {
            if let Some(s) = self.docs.scans.remove(&id) {
                out.push(Action::Log(format!(
                    "scan {id}: {} pages, {} bytes; storing",
                    s.received,
                    s.document.len()
                )));
                self.docs.done.push(ScanDone {
                    slot: s.slot,
                    scan: s.req,
                    document: s.document,
                });
            }
        }
    }

    /// The engine's `ScanFailed`: the scan fails; the engine's state is asked before more
    /// pages go out.
    pub(super) fn on_scan_failed(
        &mut self,
        id: u64,
        page: u32,
        reason: String,
        out: &mut Vec<Action>,
    ) {
        if !self.take_scan_page(id, page, out) {
            return;
        }
        self.fail_scan(id, box_error::UNAVAILABLE, reason, out);
        if !self.hold {
            self.hold = true;
            self.ask_engine(ToEngine::Status, None, out);
        }
    }

    /// Fails one scan with an error reply.
    fn fail_scan(&mut self, id: u64, code: u16, reason: String, out: &mut Vec<Action>) {
        if let Some(s) = self.docs.scans.remove(&id) {
            out.push(Action::Log(format!("scan {id} failed: {reason}")));
            let message = format!("scan failed: {reason}");
            self.fill(s.slot.client, s.slot.seq, error(code, message), out);
        }
    }

    /// The engine link reset: every scan fails.
    pub(super) fn fail_all_scans(&mut self, reason: &str, out: &mut Vec<Action>) {
        let ids: Vec<u64> = self.docs.scans.keys().copied().collect();
        for id in ids {
            self.fail_scan(id, box_error::UNAVAILABLE, reason.into(), out);
        }
    }
}

#[cfg(test)]
#[path = "controller_box_tests.rs"]
mod tests;
