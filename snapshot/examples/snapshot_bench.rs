//! Measures snapshot set write, commit, verify and load times for a 1 GiB guest of which
//! 64 MiB was touched (scattered: every 16th page; and clustered: one 64 MiB block), plus
//! an incremental set of 4 MiB dirty pages on top.
//!
//! `cargo run --release -p duplex-snapshot --example snapshot_bench [DIR]` (default: a
//! directory under the system temp dir, removed at the end). Cold numbers drop the set's
//! files from the page cache first (`posix_fadvise(DONTNEED)`).

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use duplex_snapshot::{LoadMode, SetWriter, SnapshotSet};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const GIB: usize = 1 << 30;
const PAGE: u64 = 4096;

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Drops every file of the set from the page cache.
fn evict(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(f) = std::fs::File::open(e.path()) {
            let _ = f.sync_all();
            // SAFETY: posix_fadvise on a file descriptor we own; it only drops clean pages.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// Reads one byte of every touched page (what a guest touching its working set costs).
fn touch(mem: &GuestMemoryMmap, pages: &[u64]) -> Duration {
    let t = Instant::now();
    let mut sum = 0u64;
    for &p in pages {
        let v: u8 = mem.read_obj(GuestAddress(p * PAGE)).unwrap_or(0);
        sum += u64::from(v);
    }
    std::hint::black_box(sum);
    t.elapsed()
}

fn run(base: &Path, label: &str, pages: &[u64]) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "\n== {label}: 1 GiB guest, {} MiB touched",
        (pages.len() as u64 * PAGE) >> 20
    );
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GIB)])?;
    let mut buf = vec![0u8; PAGE as usize];
    for &p in pages {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (p as u8) ^ (i as u8) | 1;
        }
        mem.write_slice(&buf, GuestAddress(p * PAGE))?;
    }
    let dest = base.join(label);

    let t = Instant::now();
    let mut w = SetWriter::create(&dest, None)?;
    let ws = w.write_memory("engine", &mem, None)?;
    w.write_state("engine", br#"{"version":1}"#)?;
    let cs = w.commit(serde_json::Value::Null, serde_json::Value::Null)?;
    let total = t.elapsed();
    println!(
        "write_memory {} ({} pages scanned of {}, {} MiB written) | commit {} (fsync {}, \
         rename {}) | total {}",
        ms(ws.elapsed),
        ws.pages_scanned,
        ws.pages_total,
        ws.bytes_written >> 20,
        ms(cs.total),
        ms(cs.fsync),
        ms(cs.rename),
        ms(total)
    );

    let t = Instant::now();
    let set = SnapshotSet::open(&dest)?;
    let open = t.elapsed();
    evict(&dest);
    let vs = set.verify()?;
    let vwarm = set.verify()?;
    println!(
        "open {} | verify cold {} ({} MiB read) | verify warm {}",
        ms(open),
        ms(vs.elapsed),
        vs.bytes_read >> 20,
        ms(vwarm.elapsed)
    );

    for cold in [true, false] {
        if cold {
            evict(&dest);
        }
        let t = Instant::now();
        let lazy = set.load_memory("engine", LoadMode::Lazy)?;
        let map = t.elapsed();
        let first = touch(&lazy, pages);
        drop(lazy);
        if cold {
            evict(&dest);
        }
        let t = Instant::now();
        let pre = set.load_memory("engine", LoadMode::LazyPrefetch)?;
        let pmap = t.elapsed();
        let pfirst = touch(&pre, pages);
        drop(pre);
        if cold {
            evict(&dest);
        }
        let t = Instant::now();
        let eager = set.load_memory("engine", LoadMode::Eager)?;
        let load = t.elapsed();
        let after = touch(&eager, pages);
        let kind = if cold { "cold" } else { "warm" };
        println!(
            "{kind}: lazy map {} + first touch of the touched pages {} | lazy+prefetch map {} + \
             first touch {} | eager load {} + touch {}",
            ms(map),
            ms(first),
            ms(pmap),
            ms(pfirst),
            ms(load),
            ms(after)
        );
        if !cold {
            let back: u8 = eager.read_obj(GuestAddress(pages[1] * PAGE))?;
            assert_eq!(back, (pages[1] as u8) | 1, "restored memory differs");
        }
    }

    // An incremental set: 4 MiB of the touched pages dirtied again.
    let mut dirty = vec![0u64; GIB / PAGE as usize / 64];
    for &p in pages.iter().step_by(16) {
        mem.write_obj(0xabu8, GuestAddress(p * PAGE))?;
        dirty[(p / 64) as usize] |= 1 << (p % 64);
    }
    let child = base.join(format!("{label}-inc"));
    let t = Instant::now();
    let mut w = SetWriter::create(&child, Some(&set))?;
    let ws = w.write_memory("engine", &mem, Some(&[dirty]))?;
    w.write_state("engine", b"{}")?;
    let cs = w.commit(serde_json::Value::Null, serde_json::Value::Null)?;
    println!(
        "incremental: {} dirty pages, write_memory {} | commit {} | total {}",
        ws.pages_present,
        ms(ws.elapsed),
        ms(cs.total),
        ms(t.elapsed())
    );
    let inc = SnapshotSet::open(&child)?;
    evict(&child);
    evict(&dest);
    let t = Instant::now();
    let lazy = inc.load_memory("engine", LoadMode::Lazy)?;
    println!("incremental chain: lazy map + overlay {}", ms(t.elapsed()));
    let region_len: u64 = lazy.iter().map(|r| r.len()).sum();
    assert_eq!(region_len, GIB as u64);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (base, remove) = match std::env::args().nth(1) {
        Some(d) => (PathBuf::from(d), false),
        None => (
            std::env::temp_dir().join(format!("duplex-snapshot-bench-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&base)?;
    let pages_total = GIB as u64 / PAGE;
    let scattered: Vec<u64> = (0..pages_total).step_by(16).collect();
    let clustered: Vec<u64> = (0..pages_total / 16).collect();
    let r = run(&base, "scattered", &scattered).and_then(|_| run(&base, "clustered", &clustered));
    if remove {
        let _ = std::fs::remove_dir_all(&base);
    }
    r
}
