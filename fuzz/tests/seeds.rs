//! The harnesses reach what their seeds (`fuzz/seeds/<target>`) are for: a seed program of
//! the virtio targets really opens a vsock connection and moves data, sends frames, writes
//! the disk; the set seeds open, verify and load; every seed passes its target's checks.
//! (The minimised corpora in `fuzz/corpus` are run by libFuzzer itself when a target
//! starts: an input that fails there is a crash.)

use std::path::Path;

use duplex_devices::vsock::ConnState;
// In the instrumented build (scripts/fuzz), libFuzzer provides the coverage callbacks.
use duplex_fuzz::virtio::{self, Device};
use libfuzzer_sys as _;

/// The seeds of a target: every input of `fuzz/seeds/<target>`.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.expect("entry").path()).expect("read"))
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} is empty", dir.display());
    inputs
}

#[test]
fn every_seed_passes_its_target() {
    for input in corpus("control_request") {
        duplex_fuzz::control::check_line(&input);
    }
    for input in corpus("snapshot_manifest") {
        duplex_fuzz::snapshot::check_manifest(&input);
    }
    for input in corpus("snapshot_set") {
        let _ = duplex_fuzz::snapshot::check_set(&input);
    }
    for input in corpus("partition_state") {
        duplex_fuzz::state::check_state(&input);
    }
    for input in corpus("virtio_vsock") {
        duplex_fuzz::vsock::run(&input);
    }
    for input in corpus("virtio_net") {
        duplex_fuzz::net::run(&input);
    }
    for input in corpus("virtio_blk") {
        duplex_fuzz::blk::run(&input);
    }
    for input in corpus("vsock_connect") {
        duplex_fuzz::connect::check_line(&input);
    }
}

#[test]
fn a_vsock_seed_opens_a_connection_and_moves_data() {
    let mut best = 0;
    for input in corpus("virtio_vsock") {
        let mut pair = duplex_fuzz::vsock::VsockPair::new();
        virtio::run(&mut pair, &input);
        let stats = pair.stats();
        for c in &stats.connection_list {
            if c.state == ConnState::Established {
                best = best.max(c.bytes_to_server);
            }
        }
        pair.check();
    }
    assert_eq!(
        best, 5,
        "no seed moved its 5 bytes over an established connection"
    );
}

#[test]
fn a_net_seed_sends_frames() {
    let mut most = 0;
    for input in corpus("virtio_net") {
        let mut card = duplex_fuzz::net::NetCard::new();
        virtio::run(&mut card, &input);
        most = most.max(card.frames_sent());
    }
    assert!(most >= 2, "no seed sent its two frames (most: {most})");
}

#[test]
fn a_blk_seed_writes_the_disk() {
    let written = corpus("virtio_blk").iter().any(|input| {
        let mut disk = duplex_fuzz::blk::Disk::new();
        virtio::run(&mut disk, input);
        disk.contents().get(1024..1536) == Some(&[0xab; 512][..])
    });
    assert!(written, "no seed wrote sector 2");
}

#[test]
fn the_set_seeds_open_verify_and_load_a_full_and_an_incremental_set() {
    let outcomes: Vec<_> = corpus("snapshot_set")
        .iter()
        .map(|input| duplex_fuzz::snapshot::check_set(input))
        .collect();
    for chain in [1, 2] {
        assert!(
            outcomes
                .iter()
                .any(|o| o.chain == chain && o.verified && o.loaded == 2),
            "no seed opens, verifies and loads a chain of {chain}: {outcomes:?}"
        );
    }
    // The seed whose manifest the harness does not seal is refused.
    assert!(outcomes.iter().any(|o| o.chain == 0), "{outcomes:?}");
}
