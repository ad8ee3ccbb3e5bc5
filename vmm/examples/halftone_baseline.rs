//! Benchmark baseline: pages per second the host itself generates and halftones (the
//! same duplex-link code the engine firmware runs), one thread, 256x256 pages. Prints
//! one JSON object. `cargo run --release --example halftone_baseline -- [PAGES]`

use std::time::Instant;

fn main() {
    let pages: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let t0 = Instant::now();
    let mut acc = 0u32;
    for p in 0..pages {
        acc ^= duplex_link::expected_page_checksum(1, p, 256, 256);
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{{\"pages\": {pages}, \"pages_per_s\": {:.1}, \"xor\": {acc}}}",
        f64::from(pages) / secs
    );
}
