//! Thin, safe wrappers over the Linux calls the format needs and `std` does not offer:
//! `getrandom`, `mincore`, `/proc/self/pagemap`, `SEEK_DATA`/`SEEK_HOLE`, directory
//! `fsync`, `renameat2(RENAME_EXCHANGE)`, `sync_file_range` and `flock`.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The page size of the format (and of the x86-64 hosts it runs on).
pub const PAGE: usize = 4096;

/// `n` random bytes from the kernel, as lowercase hex.
pub fn random_hex(n: usize) -> io::Result<String> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes that outlives the
        // call; getrandom writes at most that many bytes into it.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += r as usize;
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Which pages of `[addr, addr + pages * PAGE)` are resident: one byte per page, bit 0 set
/// for resident. `addr` must be page aligned. Only queries the page tables: no page of
/// the range is read or faulted in.
pub fn resident(addr: usize, pages: usize, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    out.resize(pages, 0);
    // SAFETY: mincore only inspects the page tables of the range (an unmapped range gives
    // ENOMEM, not a fault) and writes exactly one byte per page into `out`, which holds
    // `pages` bytes.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, pages * PAGE, out.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True if the host has swap space in use, so that `mincore` may miss pages that hold
/// data but are swapped out.
pub fn swap_active() -> bool {
    let mut s = String::new();
    match File::open("/proc/swaps").and_then(|mut f| f.read_to_string(&mut s)) {
        Ok(_) => s.lines().count() > 1,
        // Unknown: assume swap, the safe side (pagemap is then consulted).
        Err(_) => true,
    }
}

/// Which pages of `[addr, addr + pages * PAGE)` in this process are swapped out (bit 62
/// of `/proc/self/pagemap`), one bool per page.
pub fn swapped(addr: usize, pages: usize) -> io::Result<Vec<bool>> {
    let f = File::open("/proc/self/pagemap")?;
    let mut raw = vec![0u8; pages * 8];
    f.read_exact_at(&mut raw, (addr / PAGE) as u64 * 8)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w) & (1 << 62) != 0
        })
        .collect())
}

/// The data extents `(start, end)` of `file` within `[start, end)`, by `SEEK_DATA` and
/// `SEEK_HOLE`, clipped to the range. `None` if the file system does not support them.
pub fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on a file descriptor we own; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(Some(out)),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
                _ => Err(e),
            };
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
                _ => Err(e),
            };
        }
        let hole = (hole as u64).min(end);
        if hole <= data {
            // A file system answering nonsense: treat as unsupported, read everything.
            return Ok(None);
        }
        out.push((data, hole));
        pos = hole;
    }
    Ok(Some(out))
}

/// The data extents of `[start, end)` widened to whole pages, merged and sorted; the whole
/// range if the file system cannot tell holes.
pub fn page_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let p = PAGE as u64;
    let raw = data_extents(file, start, end)?.unwrap_or_else(|| vec![(start, end)]);
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(raw.len());
    for (s, e) in raw {
        let s = (s / p * p).max(start);
        let e = e.div_ceil(p).saturating_mul(p).min(end);
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    Ok(out)
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Starts writeback of `file`'s dirty pages without waiting for it (best effort: the fsync
/// at commit is what makes the data durable).
pub fn start_writeback(file: &File) {
    // SAFETY: sync_file_range only reads its arguments; an invalid range or descriptor is
    // answered with an error, which is ignored here.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Makes a directory's entries durable.
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Atomically swaps the directory entries `a` and `b` (both must exist).
pub fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    let (ca, cb) = (cpath(a)?, cpath(b)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to read `extents` of `file` into the page cache in the background
/// (`POSIX_FADV_WILLNEED`), so that the reads that follow find them there instead of
/// waiting for one disk read at a time. Best effort: a failure only costs speed.
pub fn prefetch(file: &File, extents: &[(u64, u64)]) {
    for &(s, e) in extents {
        // SAFETY: posix_fadvise on a file descriptor we own; it only schedules reads.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                s as libc::off_t,
                (e - s) as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }
}

/// Takes an exclusive `flock` on `file` without waiting; false if someone holds it.
pub fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a file descriptor we own.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// True if every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    let body = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0);
    body && chunks.remainder().iter().all(|&b| b == 0)
}

/// The host's page size.
pub fn host_page_size() -> usize {
    // SAFETY: sysconf has no side effects.
    let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if r <= 0 {
        PAGE
    } else {
        r as usize
    }
}

/// Opens `path` for reading without following a symbolic link at its last component
/// (`O_NOFOLLOW`: a link is refused with `ELOOP`) and without blocking on a FIFO or device
/// (`O_NONBLOCK`, which changes nothing for a regular file); the caller checks what it
/// opened with `fstat` ([`File::metadata`]) and reads from this descriptor only.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Reads the whole of an opened regular file of at most `cap` bytes (checked with `fstat`
/// before anything is allocated, and again while reading: a file that grows past `cap`
/// meanwhile is refused too). `Err(Some(len))`: the file is longer than `cap`.
pub fn read_capped(file: &File, cap: u64) -> Result<Vec<u8>, ReadCapped> {
    let len = file.metadata().map_err(ReadCapped::Io)?.len();
    if len > cap {
        return Err(ReadCapped::TooLong(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    let r: &File = file;
    r.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadCapped::Io)?;
    if bytes.len() as u64 > cap {
        return Err(ReadCapped::TooLong(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Why [`read_capped`] failed.
#[derive(Debug)]
pub enum ReadCapped {
    /// The file is this long, over the cap.
    TooLong(u64),
    /// Reading failed.
    Io(io::Error),
}

/// A read-only shared mapping of a whole file (for checksumming without copying), guarded
/// against the file being truncated while it is read (see `guard`).
pub struct FileMap {
    ptr: *mut libc::c_void,
    len: usize,
    guard: Option<crate::guard::MemoryGuard>,
}

// SAFETY: the mapping is read-only and owned by this value; reading it from several threads
// at once is sound.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps `len` bytes of `file` read-only. The caller must keep the file from being
    /// truncated while the mapping is read (a set's files are written once, then only read).
    pub fn new(file: &File, len: u64) -> io::Result<FileMap> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        if len == 0 {
            return Ok(FileMap {
                ptr: std::ptr::null_mut(),
                len: 0,
                guard: None,
            });
        }
        // SAFETY: a new read-only mapping chosen by the kernel; it aliases no Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Dropped (and so unmapped) if it cannot be guarded.
        let mut map = FileMap {
            ptr,
            len,
            guard: None,
        };
        map.guard = Some(
            crate::guard::MemoryGuard::new(&[(ptr as usize, len)], None)
                .map_err(io::Error::other)?,
        );
        Ok(map)
    }

    /// True if the file was truncated under the mapping while it was read: pages past the
    /// new end read as zeros instead of raising `SIGBUS`.
    pub fn truncated(&self) -> bool {
        self.guard
            .as_ref()
            .is_some_and(crate::guard::MemoryGuard::truncated)
    }

    /// Bytes `[start, end)` of the file (clamped to its mapped length).
    pub fn slice(&self, start: u64, end: u64) -> &[u8] {
        let end = (end as usize).min(self.len);
        let start = (start as usize).min(end);
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `[start, end)` lies inside the live mapping of `len` readable bytes, which
        // lives as long as `self`; nothing writes through this mapping.
        unsafe { std::slice::from_raw_parts((self.ptr as *const u8).add(start), end - start) }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // Unguarded before it is unmapped: the range may be reused at once.
        drop(self.guard.take());
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping `new` made; no slice of it outlives `self`.
            unsafe {
                libc::munmap(self.ptr, self.len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_hex_is_random_and_hex() {
        let a = random_hex(16).expect("getrandom");
        let b = random_hex(16).expect("getrandom");
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn is_zero_sees_a_single_bit() {
        let mut page = vec![0u8; PAGE];
        assert!(is_zero(&page));
        page[PAGE - 1] = 1;
        assert!(!is_zero(&page));
        page[PAGE - 1] = 0;
        page[100] = 0x80;
        assert!(!is_zero(&page));
        assert!(!is_zero(&[0, 0, 3]));
    }
}
