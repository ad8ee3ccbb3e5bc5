//! Benchmark baseline: throughput (64 KiB writes) and round-trip latency of a host
//! AF_UNIX stream socketpair between two threads, the yardstick `scripts/bench` holds
//! partition-to-partition vsock against. Prints one JSON object.
//!
//! `cargo run --release --example unix_baseline -- [BYTES] [ROUND_TRIPS] [RTT_SIZE]`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>().ok());
    let bytes = args.next().flatten().unwrap_or(256 << 20);
    let trips = args.next().flatten().unwrap_or(10_000);
    let rtt_size = args.next().flatten().unwrap_or(64) as usize;

    let (mut a, mut b) = UnixStream::pair()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0u64;
        loop {
            let n = b.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            got += n as u64;
        }
    });
    let chunk = vec![0x5au8; 64 << 10];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        a.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    a.shutdown(std::net::Shutdown::Write)?;
    let got = reader
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))??;
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(got, bytes);

    let (mut a, mut b) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; rtt_size];
        for _ in 0..trips {
            b.read_exact(&mut buf)?;
            b.write_all(&buf)?;
        }
        Ok(())
    });
    let msg = vec![1u8; rtt_size];
    let mut back = vec![0u8; rtt_size];
    let t1 = Instant::now();
    for _ in 0..trips {
        a.write_all(&msg)?;
        a.read_exact(&mut back)?;
    }
    let rtt_ns = t1.elapsed().as_nanos() as f64 / trips as f64;
    echo.join()
        .map_err(|_| std::io::Error::other("echo panicked"))??;

    println!(
        "{{\"bytes\": {bytes}, \"mb_per_s\": {:.1}, \"round_trips\": {trips}, \"rtt_size\": {rtt_size}, \"rtt_avg_ns\": {rtt_ns:.0}}}",
        bytes as f64 / secs / 1e6
    );
    Ok(())
}
