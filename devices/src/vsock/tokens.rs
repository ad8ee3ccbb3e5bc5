//! Ids of listeners and host sockets: unique in the process (a restore in the same process
//! finds its host sockets by these ids, see `HostLink::token`), from a random base so that
//! ids saved by another process do not match by accident. Depends on nothing.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::SystemTime;

/// A fresh id (never 0).
pub(crate) fn fresh_token() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
        h.write_u128(now.map_or(0, |d| d.as_nanos()));
        h.finish()
    });
    loop {
        let t = base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
        if t != 0 {
            return t;
        }
    }
}
