//! The controller's document service on its disk: the virtio-blk disk as a
//! `duplex_store::BlockDevice` ([`BlkDisk`]), opening the service at start ([`open`]),
//! and answering the `Box` requests the link logic queued ([`serve`], [`store_scan`]) and
//! the relay's share requests ([`serve_share`]).
//! `docs/shared-data.md` describes the service and its storage.

use alloc::vec::Vec;

use duplex_docsvc::wire::{disabled_reply, doc_entry, error_reply};
use duplex_docsvc::DocService;
use duplex_link::controller::{
    Action, BoxRequest, Controller, ScanDone, ScanRequest, ShareRequest,
};
use duplex_link::msg::{BoxOp, BoxReply};
use duplex_link::HostReply;
use duplex_runtime::blk::{open_blk, Blk};
use duplex_runtime::{println, BootInfo};
use duplex_store::{BlockDevice, BlockError};

/// The partition's virtio-blk disk.
pub struct BlkDisk(Blk);

impl BlockDevice for BlkDisk {
    fn sectors(&self) -> u64 {
        self.0.sectors()
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.0
            .read(sector, buf)
            .map_err(|_| BlockError::Io("virtio-blk read failed"))
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.0
            .write(sector, buf)
            .map_err(|_| BlockError::Io("virtio-blk write failed"))
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.0
            .flush()
            .map_err(|_| BlockError::Io("virtio-blk flush failed"))
    }
}

/// The service, or `None` (documents disabled) without a disk or with one that does not
/// open; prints `controller: store ready (...)` or why not.
pub fn open(boot: &BootInfo) -> Option<DocService<BlkDisk>> {
    let Some(blk) = open_blk(boot) else {
        println!("controller: no disk: documents disabled");
        return None;
    };
    match DocService::open(BlkDisk(blk)) {
        Ok(svc) => {
            let s = svc.stats();
            println!(
                "controller: store ready (accounts {}, boxes {}, documents {} of {} bytes, grants {}; {} items, capacity {} bytes, free {} bytes)",
                s.accounts,
                s.boxes,
                s.documents,
                s.document_bytes,
                s.grants,
                s.store.items,
                s.store.capacity_bytes,
                s.store.free_bytes
            );
            Some(svc)
        }
        Err(e) => {
            println!("controller: the disk does not open ({e}): documents disabled");
            None
        }
    }
}

/// Answers one `Box` request: at once, or (a scan the service allows) by starting it.
pub fn serve(
    ctl: &mut Controller,
    svc: Option<&mut DocService<BlkDisk>>,
    r: BoxRequest,
) -> Vec<Action> {
    let Some(svc) = svc else {
        return ctl.box_reply(r.slot, disabled_reply());
    };
    match r.op {
        BoxOp::Scan {
            box_id,
            name,
            pages,
            seed,
            width,
            height,
        } => match svc.check_put(&r.account, &box_id, &name) {
            Ok(()) => ctl.start_scan(
                r.slot,
                ScanRequest {
                    account: r.account,
                    box_id,
                    name,
                    pages,
                    seed,
                    width,
                    height,
                },
            ),
            Err(e) => ctl.box_reply(r.slot, error_reply(&e)),
        },
        op => {
            let reply = svc.serve(&r.account, op);
            if let HostReply::Box(BoxReply::Stored(d)) = &reply {
                println!(
                    "controller: stored {} ({} bytes) in box {} for {}",
                    d.id, d.len, d.box_id, d.created_by
                );
            }
            ctl.box_reply(r.slot, reply)
        }
    }
}

/// Stores a finished scan's document and answers its request.
pub fn store_scan(
    ctl: &mut Controller,
    svc: Option<&mut DocService<BlkDisk>>,
    d: ScanDone,
) -> Vec<Action> {
    let reply = match svc {
        None => disabled_reply(),
        Some(svc) => {
            let s = &d.scan;
            match svc.put_document(&s.account, &s.box_id, &s.name, &d.document) {
                Ok(doc) => {
                    println!(
                        "controller: scanned {} pages into {} ({} bytes) in box {}",
                        s.pages, doc.id, doc.len, doc.box_id
                    );
                    HostReply::Box(BoxReply::Stored(doc_entry(doc)))
                }
                Err(e) => error_reply(&e),
            }
        }
    };
    ctl.box_reply(d.slot, reply)
}

/// Answers one `ShareOpen` / `ShareAnswer` with the share service (503 without a disk).
pub fn serve_share(
    ctl: &mut Controller,
    svc: Option<&mut DocService<BlkDisk>>,
    r: ShareRequest,
) -> Vec<Action> {
    let Some(svc) = svc else {
        return ctl.box_reply(r.slot, disabled_reply());
    };
    let open = matches!(r.request, duplex_link::HostRequest::ShareOpen { .. });
    let reply = svc.share_serve(r.request);
    match &reply {
        HostReply::ShareDone => println!("controller: share sync done"),
        HostReply::Error { code, message } => {
            println!("controller: share sync refused: {code} {message}")
        }
        _ if open => println!("controller: share sync opened"),
        _ => {}
    }
    ctl.box_reply(r.slot, reply)
}
