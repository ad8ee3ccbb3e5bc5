//! Small shared helpers: the wall clock in milliseconds, hex, MAC addresses, random
//! bytes, and raising the open-file limit for servers that hold thousands of sockets.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// A MAC address as `52:54:00:12:34:56`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| hex(&[*b])).collect::<Vec<_>>().join(":")
}

/// Parses `52:54:00:12:34:56` (or with `-`; either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Fills a fresh array with random bytes from the operating system.
///
/// # Panics
///
/// If the operating system has no entropy source (`getrandom` fails), which no server can
/// run without.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if let Err(e) = getrandom::fill(&mut out) {
        panic!("no random numbers from the operating system: {e}");
    }
    out
}

/// A random `u64`.
pub fn random_u64() -> u64 {
    u64::from_le_bytes(random_bytes::<8>())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit` for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid `rlimit` read back from `getrlimit` with the soft limit
        // raised to the hard one, which an unprivileged process may always do.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Parses `"a.b.c.d:port"` into an IPv4 socket address.
pub fn parse_v4(s: &str) -> Option<std::net::SocketAddrV4> {
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_with_parse_key() {
        let key: [u8; 32] = random_bytes();
        assert_eq!(duplex_tunnel::parse_key(&hex(&key)), Some(key));
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
    }

    #[test]
    fn macs_round_trip() {
        let mac = [0x52, 0x54, 0x00, 0xab, 0x0c, 0xff];
        assert_eq!(mac_string(&mac), "52:54:00:ab:0c:ff");
        assert_eq!(parse_mac("52:54:00:AB:0c:ff"), Some(mac));
        assert_eq!(parse_mac("52-54-00-ab-0c-ff"), Some(mac));
        for bad in [
            "52:54:00:ab:0c",
            "52:54:00:ab:0c:ff:00",
            "5:54:00:ab:0c:ff",
            "zz:54:00:ab:0c:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn nofile_limit_is_at_least_the_old_one() {
        let n = raise_nofile_limit().unwrap();
        assert!(n >= 256, "{n}");
    }
}
