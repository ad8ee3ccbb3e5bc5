//! Crash tests: a workload runs once on a disk that logs every write; then, for each write
//! `w`, the disk as a crash at `w` leaves it (writes before `w` done, `w` lost, cut at a
//! sector, or torn inside a sector) is reopened and must hold exactly the state after the
//! last acknowledged call, or that plus the call in flight, whole. And the fill-up test.
//!
//! The log holds device requests, not ekv's writes: the adapter merges ekv's appends into
//! one request, sent later (see [`crate::disk`]). A crash before a request is sent leaves
//! the disk without any of it (the merged writes still pending in memory are lost), and
//! a torn request may leave any of its sectors, so in any order the merged writes. The
//! exhaustive sweep crashes at every request of a small workload, in every way.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::vec::Vec;
use std::{format, println, vec};

use super::{LogDisk, Logged, MemDisk, Rng};
use crate::{Store, StoreError, SECTOR_SIZE};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

enum Op {
    Put(Vec<u8>, Vec<u8>),
    Many(Vec<(Vec<u8>, Option<Vec<u8>>)>),
    Remove(Vec<u8>),
}

fn key(rng: &mut Rng) -> Vec<u8> {
    let ns = ["acct/", "box/", "doc/", "right/"][rng.below(4) as usize];
    format!("{ns}{}", rng.below(6)).into_bytes()
}

fn value(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(10) {
        0..=5 => rng.below(300),
        6..=8 => 4000 + rng.below(30_000),
        _ => 60_000 + rng.below(150_000),
    };
    rng.bytes(len as usize)
}

fn workload(seed: u64, ops: usize) -> Vec<Op> {
    let mut rng = Rng(seed);
    (0..ops)
        .map(|_| match rng.below(6) {
            0..=2 => Op::Put(key(&mut rng), value(&mut rng)),
            3 | 4 => Op::Many(
                (0..2 + rng.below(3))
                    .map(|_| {
                        let k = key(&mut rng);
                        let v = (rng.below(4) != 0).then(|| value(&mut rng));
                        (k, v)
                    })
                    .collect(),
            ),
            _ => Op::Remove(key(&mut rng)),
        })
        .collect()
}

fn run(store: &mut Store<impl crate::BlockDevice>, op: &Op) -> Result<(), StoreError> {
    match op {
        Op::Put(k, v) => store.put(k, v),
        Op::Remove(k) => store.remove(k),
        Op::Many(items) => {
            let items: Vec<(&[u8], Option<&[u8]>)> =
                items.iter().map(|(k, v)| (&k[..], v.as_deref())).collect();
            store.put_many(&items)
        }
    }
}

fn apply(model: &mut Model, op: &Op) {
    match op {
        Op::Put(k, v) => {
            model.insert(k.clone(), v.clone());
        }
        Op::Remove(k) => {
            model.remove(k);
        }
        Op::Many(items) => {
            for (k, v) in items {
                match v {
                    Some(v) => model.insert(k.clone(), v.clone()),
                    None => model.remove(k),
                };
            }
        }
    }
}

fn state(store: &mut Store<MemDisk>) -> Result<Model, StoreError> {
    let mut m = Model::new();
    for k in store.keys(b"")? {
        let v = store
            .get(&k)?
            .ok_or(StoreError::Internal("listed key has no value"))?;
        m.insert(k, v);
    }
    Ok(m)
}

/// Runs `ops` on a logging disk of `mib` MiB: the write log and the model after each
/// step (step 0 is the format, step `i + 1` is `ops[i]`).
fn record(mib: usize, ops: &[Op]) -> (Vec<Logged>, Vec<Model>) {
    let step = Rc::new(RefCell::new(0));
    let log = Rc::new(RefCell::new(Vec::new()));
    let disk = LogDisk {
        disk: MemDisk::new(mib),
        step: step.clone(),
        log: log.clone(),
    };
    let mut store = Store::open(disk).unwrap();
    let mut models = vec![Model::new()];
    for (i, op) in ops.iter().enumerate() {
        *step.borrow_mut() = i + 1;
        run(&mut store, op).unwrap();
        let mut m = models[i].clone();
        apply(&mut m, op);
        models.push(m);
    }
    drop(store);
    let log = Rc::try_unwrap(log).ok().unwrap().into_inner();
    (log, models)
}

/// How a crash treats the write it interrupts. The device model: each sector is written
/// whole or not at all, and a request of several sectors may be cut anywhere between them
/// (a killed process's `pwrite` stops at a page) or, on a host power cut, leave any of
/// them written.
fn tear(img: &mut [u8], w: &Logged, mode: u64, rng: &mut Rng) -> &'static str {
    let at = w.sector as usize * SECTOR_SIZE;
    let sectors = w.data.len() / SECTOR_SIZE;
    match mode {
        0 => "lost",
        1 => {
            let keep = rng.below(sectors as u64) as usize * SECTOR_SIZE;
            img[at..at + keep].copy_from_slice(&w.data[..keep]);
            "cut at a sector"
        }
        _ => {
            for i in 0..sectors {
                if rng.below(2) == 0 {
                    let r = i * SECTOR_SIZE..(i + 1) * SECTOR_SIZE;
                    img[at + r.start..at + r.end].copy_from_slice(&w.data[r]);
                }
            }
            "some of its sectors written"
        }
    }
}

/// Crashes the workload of `seed` at about `points` writes spread over all of them (every
/// write if `points` is `usize::MAX`), each in one way at random, or in each way if
/// `every_way`.
fn crash_sweep(
    seed: u64,
    ops: usize,
    mib: usize,
    points: usize,
    every_way: bool,
) -> (usize, usize) {
    let ops = workload(seed, ops);
    let (log, models) = record(mib, &ops);
    let stride = (log.len() / points.min(log.len())).max(1);
    let offset = seed as usize % stride;
    let mut img = vec![0u8; mib << 20];
    let mut rng = Rng(seed ^ 0x5eed);
    let mut checked = 0;
    for (w, write) in log.iter().enumerate() {
        let at = write.sector as usize * SECTOR_SIZE;
        if !(w % stride == offset || w + 1 == log.len()) {
            img[at..at + write.data.len()].copy_from_slice(&write.data);
            continue;
        }
        let modes = if every_way {
            0..3
        } else {
            let m = rng.below(3);
            m..m + 1
        };
        for mode in modes {
            let mut crashed = img.clone();
            let how = tear(&mut crashed, write, mode, &mut rng);
            let s = write.step;
            let (before, after) = (&models[s.saturating_sub(1)], &models[s]);
            let mut store = Store::open(MemDisk::from_image(crashed.clone())).unwrap_or_else(|e| {
                let len = write.data.len();
                panic!(
                    "write {w} (sector {}, {len} bytes, step {s}, {how}): open: {e}",
                    write.sector
                )
            });
            let got = state(&mut store)
                .unwrap_or_else(|e| panic!("write {w} (step {s}, {how}): read: {e}"));
            assert!(
                got == *before || got == *after,
                "write {w} (step {s}, {how}): neither the state before nor after the step"
            );
            let st = store.stats();
            assert_eq!(st.items, got.len() as u64, "write {w}: counters");
            // The store goes on working, and that survives a reopen.
            store.put(b"after/crash", &[w as u8; 5000]).unwrap();
            if w % (stride * 8) == 0 {
                store
                    .remove(got.keys().next().map_or(&b"x"[..], |k| k))
                    .unwrap();
                drop(store);
                let mut again = Store::open(MemDisk::from_image(crashed)).unwrap();
                // (A fresh image: this reopen checks the same crash state again.)
                assert!(state(&mut again).is_ok());
            }
            checked += 1;
        }
        img[at..at + write.data.len()].copy_from_slice(&write.data);
    }
    (checked, log.len())
}

#[test]
fn a_crash_at_any_write_keeps_every_acknowledged_call_and_no_partial_one() {
    let (checked, writes) = crash_sweep(42, 30, 2, 250, false);
    println!("crash sweep: {checked} crash points of {writes} writes checked");
    assert!(checked >= 200);
}

#[test]
fn crash_sweeps_with_other_workloads() {
    for seed in [1, 2] {
        let (checked, writes) = crash_sweep(seed, 40, 2, 100, false);
        println!("seed {seed}: {checked} crash points of {writes} writes checked");
    }
}

#[test]
fn a_crash_at_every_request_in_every_way() {
    // (This workload fails when a chunk header is sent before its data.)
    let (checked, writes) = crash_sweep(3, 16, 2, usize::MAX, true);
    println!("exhaustive: {checked} crashes at {writes} writes checked");
    assert_eq!(checked, 3 * writes);
}

#[test]
fn a_full_disk_says_full_and_recovers_after_removals() {
    let disk = MemDisk::new(2);
    let mut s = Store::open(disk.clone()).unwrap();
    let doc = Rng(9).bytes(64 << 10);
    let mut stored = 0;
    let err = loop {
        match s.put(format!("doc/{stored:03}").as_bytes(), &doc) {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 1000, "never full");
    };
    assert_eq!(err, StoreError::Full);
    assert!(stored > 5, "only {stored} documents fit");
    println!("full after {stored} documents of 64 KiB on a 2 MiB disk");
    for i in 0..stored {
        assert_eq!(
            s.get(format!("doc/{i:03}").as_bytes()).unwrap().as_ref(),
            Some(&doc)
        );
    }
    // Removing one at a time works even when full, and frees room.
    for i in 0..stored / 2 {
        s.remove(format!("doc/{i:03}").as_bytes()).unwrap();
    }
    s.put(b"doc/new", &doc).unwrap();
    assert_eq!(s.get(b"doc/new").unwrap().as_ref(), Some(&doc));
    drop(s);
    let mut s = Store::open(disk).unwrap();
    assert_eq!(s.keys(b"doc/").unwrap().len(), stored - stored / 2 + 1);
}
