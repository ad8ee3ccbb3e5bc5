//! `duplex-link`: the print link of the Duplex reference device.
//!
//! * [`frame`]: framing (`u32` little-endian length + postcard body, at most
//!   [`MAX_FRAME`] bytes), [`encode`] and the streaming [`FrameDecoder`].
//! * [`msg`]: the messages — host ↔ controller on the job port ([`HostRequest`],
//!   [`HostReply`]) and controller ↔ engine on the link port ([`ToEngine`],
//!   [`FromEngine`]) — with ports, limits and error codes.
//! * [`print`]: the print algorithms both sides share: [`page_raster`], [`gamma_table`],
//!   [`halftone`] (Floyd–Steinberg to 1 bit per pixel) and [`page_checksum`]
//!   (CRC-32/ISO-HDLC), so host tools can predict every checksum.
//! * [`engine`] and [`controller`]: the firmware's protocol logic without I/O, so it is
//!   tested on the host.
//! * [`outbox`]: outgoing bytes of a connection, sent as the peer's credit allows.
//!
//! `#![no_std]` with `alloc`: it builds for the guests (`x86_64-unknown-none`) and for host
//! tools; its tests run on the host (`cargo test --target x86_64-unknown-linux-gnu`).
//! The protocol is documented in `docs/link-protocol.md`, the algorithms and state machines
//! in `docs/print-pipeline.md`.

#![no_std]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod controller;
pub mod engine;
pub mod frame;
pub mod msg;
pub mod outbox;
pub mod print;

pub use frame::{decode_body, encode, try_encode, FrameDecoder, FrameError, HEADER_LEN, MAX_FRAME};
pub use msg::{
    error_code, EngineInfo, EngineState, FromEngine, HostReply, HostRequest, JobInfo, JobState,
    ToEngine, DEFAULT_ENGINE_CID, DEFAULT_PAGE_HEIGHT, DEFAULT_PAGE_WIDTH, JOB_PORT, LINK_PORT,
    MAX_ACTIVE_JOBS, MAX_FINISHED_JOBS, MAX_JOB_KEY_LEN, MAX_JOB_PAGES, MAX_PAGE_PIXELS,
};
pub use print::{
    expected_page_checksum, gamma_table, halftone, halftone_stride, identity_table, page_checksum,
    page_raster, print_checksum,
};

#[cfg(test)]
mod tests;
