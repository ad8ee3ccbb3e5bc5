//! The `junk` phase: well-formed chains carrying packets for connections that do not
//! exist, aimed at every port of the peers from thousands of source ports: data, credit
//! updates and requests, shutdowns, resets, and connection requests, 16 chains per
//! notify. The receive queue is never set up: every answer piles up in the monitor,
//! against its caps.

use duplex_runtime::{println, BootInfo};

use crate::desc::{self, reg, Hdr, Ring, QSIZE, TX};

/// virtio-vsock operations.
const OPS: [u16; 7] = [5, 5, 6, 7, 4, 3, 1]; // RW, RW, CREDIT_UPDATE, CREDIT_REQUEST, SHUTDOWN, RST, REQUEST
/// Bytes per data slot (header + payload).
const SLOT: u64 = 512;
const PAYLOAD: u32 = 256;

fn peers(boot: &BootInfo) -> [u64; 2] {
    let mut out = [3, 4];
    if let Some(list) = boot.arg("hostile.peers") {
        for (slot, cid) in out.iter_mut().zip(
            list.split([',', ':'])
                .filter_map(duplex_runtime::bootinfo::parse_u64),
        ) {
            *slot = cid;
        }
    }
    out
}

/// Sends `n` junk packets.
pub fn run(boot: &BootInfo, n: u64) {
    let (Some(w), Some(ring)) = (desc::find(boot), Ring::new()) else {
        println!("hostile: junk skipped: no vsock device or no memory");
        return;
    };
    let me = desc::cid(&w);
    let peers = peers(boot);
    desc::setup(&w, &ring, ring.desc(), ring.avail(), ring.used());
    let (mut idx, mut i, mut stalls) = (0u16, 0u64, 0u32);
    while i < n {
        let batch = (n - i).min(u64::from(QSIZE)) as u16;
        for j in 0..batch {
            let k = i + u64::from(j);
            let op = OPS[(k % OPS.len() as u64) as usize];
            let len = if op == 5 { PAYLOAD } else { 0 };
            let at = u64::from(j) * SLOT;
            ring.packet(
                at,
                &Hdr {
                    src: me,
                    dst: peers[(k % 2) as usize],
                    src_port: 20_000 + (k % 40_000) as u32,
                    dst_port: 1 + (k % 6000) as u32,
                    len,
                    op,
                    flags: if op == 4 { 3 } else { 0 },
                },
            );
            ring.set_desc(j, ring.data() + at, 44 + len, 0, 0);
            idx = idx.wrapping_add(1);
            ring.publish(j, idx);
        }
        w.write(reg::QUEUE_NOTIFY, TX);
        // The device may leave part of a batch for later (its work budget): notify again
        // until it has taken everything, a bounded number of times.
        let mut tries = 0;
        while ring.used_idx() != idx && tries < 1000 {
            w.write(reg::QUEUE_NOTIFY, TX);
            tries += 1;
        }
        if ring.used_idx() != idx {
            stalls += 1;
            // Start over on a fresh queue rather than overwrite chains the device holds.
            desc::setup(&w, &ring, ring.desc(), ring.avail(), ring.used());
            idx = 0;
        }
        i += u64::from(batch);
    }
    w.write(reg::STATUS, 0);
    println!("hostile: junk done sent={n} stalls={stalls}");
}
