//! Memory files truncated under their mappings. A guest restored lazily maps its set's
//! memory file `MAP_PRIVATE`; `verify` reads memory files through a shared mapping. If
//! someone truncates such a file, the first touch of a page past its new end raises
//! `SIGBUS` in whichever thread touches it (a device emulation thread, the snapshot
//! writer...), which would end the whole monitor.
//!
//! A guarded range is registered in a fixed, lock-free table that a process-wide `SIGBUS`
//! handler (installed once, `SA_SIGINFO`) reads: on a fault inside a registered range it
//! maps an anonymous zero page over the faulting page (`mmap(MAP_FIXED | MAP_PRIVATE |
//! MAP_ANONYMOUS)` is async-signal-safe), marks the range truncated and returns, so the
//! access is retried and reads zeros. A fault anywhere else puts the previous action back
//! and lets the fault happen again (a `SIGBUS` that is not ours ends the process as before).
//! A watcher thread, woken through a pipe, then calls the callbacks of the guards whose
//! ranges were hit: the monitor crashes the partition whose memory it was (its memory is
//! no longer what it was), never the process. See `docs/decisions.md` (issue 11).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::io::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::sys::PAGE;

/// Ranges the table holds at most (a guarded guest region, or a mapping being verified,
/// takes one each; ranges registered twice share one).
pub const MAX_GUARDED: usize = 256;

const FREE: u8 = 0;
const LIVE: u8 = 2;
const BUSY: u8 = 1;

/// One registered range; read by the signal handler with atomics only.
struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    truncated: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    truncated: AtomicBool::new(false),
};

static TABLE: [Slot; MAX_GUARDED] = [EMPTY; MAX_GUARDED];
/// The pipe's write end (the handler writes a byte to wake the watcher), -1 before install.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The `SIGBUS` action before ours, put back for a fault that is not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// Faults the handler turned into zero pages (for tests and status).
static FAULTS: AtomicU64 = AtomicU64::new(0);

type Callback = Arc<dyn Fn() + Send + Sync>;

/// What the registry knows of each guard (structural changes only, under a lock; the
/// handler never takes it).
#[derive(Default)]
struct Registry {
    /// Users of each slot (a range registered twice shares its slot).
    refs: BTreeMap<usize, usize>,
    /// Guards with a callback: id → (its slots, the callback, whether it was called).
    watchers: BTreeMap<u64, (Vec<usize>, Callback, bool)>,
    next_id: u64,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(Registry::default()))
}

fn lock() -> std::sync::MutexGuard<'static, Registry> {
    registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why a range could not be guarded.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The handler or its watcher could not be set up.
    #[error("installing the SIGBUS guard: {0}")]
    Install(String),
    /// Every slot of the table is taken.
    #[error("the SIGBUS guard's table is full ({MAX_GUARDED} ranges)")]
    Full,
}

/// Ranges protected against their file being truncated, until dropped.
#[derive(Debug)]
pub struct MemoryGuard {
    id: u64,
    slots: Vec<usize>,
}

impl MemoryGuard {
    /// Guards `ranges` (host address, length; page aligned). `on_truncated` is called once,
    /// on the watcher thread, after a fault in one of them was turned into a zero page.
    pub fn new(
        ranges: &[(usize, usize)],
        on_truncated: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> Result<MemoryGuard, GuardError> {
        install()?;
        let mut reg = lock();
        let mut slots = Vec::with_capacity(ranges.len());
        for &(start, len) in ranges {
            match acquire(&mut reg, start, len) {
                Some(i) => slots.push(i),
                None => {
                    for i in slots {
                        release(&mut reg, i);
                    }
                    return Err(GuardError::Full);
                }
            }
        }
        reg.next_id += 1;
        let id = reg.next_id;
        if let Some(cb) = on_truncated {
            let cb: Callback = Arc::from(cb);
            reg.watchers.insert(id, (slots.clone(), cb, false));
        }
        Ok(MemoryGuard { id, slots })
    }

    /// Guards every region of `mem` that maps a file (a lazily restored guest's memory
    /// file); regions of anonymous memory cannot be truncated and are left out.
    pub fn for_memory<B: Bitmap>(
        mem: &GuestMemoryMmap<B>,
        on_truncated: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> Result<MemoryGuard, GuardError> {
        let ranges: Vec<(usize, usize)> = mem
            .iter()
            .filter(|r| r.file_offset().is_some())
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some((host as usize, r.len() as usize))
            })
            .collect();
        MemoryGuard::new(&ranges, on_truncated)
    }

    /// True once a fault in one of the ranges was turned into a zero page: the file was
    /// truncated under the mapping, and what was read there is zeros, not its content.
    pub fn truncated(&self) -> bool {
        self.slots
            .iter()
            .any(|&i| TABLE[i].truncated.load(Ordering::Acquire))
    }

    /// True if the guard protects nothing (no region of the memory maps a file).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

impl Drop for MemoryGuard {
    fn drop(&mut self) {
        let mut reg = lock();
        reg.watchers.remove(&self.id);
        for &i in &self.slots {
            release(&mut reg, i);
        }
    }
}

/// Faults turned into zero pages since the process started.
pub fn faults_caught() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

/// A slot for `[start, start + len)`: the one that has it already, or a free one.
fn acquire(reg: &mut Registry, start: usize, len: usize) -> Option<usize> {
    let existing = TABLE.iter().position(|s| {
        s.state.load(Ordering::Acquire) == LIVE
            && s.start.load(Ordering::Relaxed) == start
            && s.len.load(Ordering::Relaxed) == len
    });
    if let Some(i) = existing {
        *reg.refs.entry(i).or_default() += 1;
        return Some(i);
    }
    let i = TABLE.iter().position(|s| {
        s.state
            .compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })?;
    let s = &TABLE[i];
    s.start.store(start, Ordering::Relaxed);
    s.len.store(len, Ordering::Relaxed);
    s.truncated.store(false, Ordering::Relaxed);
    s.state.store(LIVE, Ordering::Release);
    reg.refs.insert(i, 1);
    Some(i)
}

fn release(reg: &mut Registry, i: usize) {
    let left = match reg.refs.get_mut(&i) {
        Some(n) => {
            *n = n.saturating_sub(1);
            *n
        }
        None => 0,
    };
    if left == 0 {
        reg.refs.remove(&i);
        TABLE[i].state.store(BUSY, Ordering::Release);
        TABLE[i].len.store(0, Ordering::Relaxed);
        TABLE[i].state.store(FREE, Ordering::Release);
    }
}

/// Installs the handler and starts the watcher, once per process.
fn install() -> Result<(), GuardError> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(install_once)
        .clone()
        .map_err(GuardError::Install)
}

fn install_once() -> Result<(), String> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which has room for them.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // The handler must never block on a full pipe: one pending byte is enough to wake.
    // SAFETY: fcntl on the write end just made.
    unsafe { libc::fcntl(fds[1], libc::F_SETFL, libc::O_NONBLOCK) };
    // SAFETY: `fds[0]` is the read end just made, owned by nothing else from here on.
    let reader = unsafe { File::from_raw_fd(fds[0]) };
    std::thread::Builder::new()
        .name("sigbus-watch".into())
        .spawn(move || watch(reader))
        .map_err(|e| format!("starting the watcher: {e}"))?;
    WAKE_FD.store(fds[1], Ordering::Release);

    // SAFETY: an all-zero sigaction is a valid value to be filled in.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = on_sigbus as *const () as usize;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
    // SAFETY: `sa_mask` is a valid sigset to empty.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    // Recorded before ours is installed, so the handler always finds it.
    // SAFETY: reads the current action into `old` without changing it.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } < 0 {
        return Err(format!("sigaction: {}", std::io::Error::last_os_error()));
    }
    let _ = PREVIOUS.set(old);
    // SAFETY: installs `on_sigbus`, an async-signal-safe extern "C" handler of the
    // SA_SIGINFO signature.
    if unsafe { libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) } < 0 {
        return Err(format!("sigaction: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The watcher: each byte from the handler means "a range was hit"; calls the callbacks
/// of the guards hit since, once each.
fn watch(mut reader: File) {
    let mut buf = [0u8; 64];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        let due: Vec<Callback> = {
            let mut reg = lock();
            reg.watchers
                .values_mut()
                .filter(|(slots, _, called)| {
                    !*called
                        && slots
                            .iter()
                            .any(|&i| TABLE[i].truncated.load(Ordering::Acquire))
                })
                .map(|(_, cb, called)| {
                    *called = true;
                    cb.clone()
                })
                .collect()
        };
        for cb in due {
            cb();
        }
    }
}

/// The `SIGBUS` handler (async-signal-safe: atomics, `mmap`, `write`, `sigaction`, `raise`).
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: errno is a thread-local the handler must leave as it found it.
    let saved_errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // Only a fault the kernel raised (si_code > 0) is one of ours to absorb.
    if code > 0 && absorb(addr) {
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = saved_errno };
        return;
    }
    // Not ours: the previous action, and the fault again (or the signal again, if it was
    // sent rather than raised by an access).
    if let Some(prev) = PREVIOUS.get() {
        // SAFETY: puts back the action recorded at install.
        unsafe { libc::sigaction(sig, prev, std::ptr::null_mut()) };
    } else {
        // SAFETY: resets SIGBUS to its default action.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    if code <= 0 {
        // SAFETY: raise is async-signal-safe.
        unsafe { libc::raise(sig) };
    }
}

/// If `addr` is in a registered range: maps a zero page over it, marks the range, wakes
/// the watcher. False if it is not ours (or the page could not be replaced).
fn absorb(addr: usize) -> bool {
    for s in TABLE.iter() {
        if s.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let (start, len) = (
            s.start.load(Ordering::Relaxed),
            s.len.load(Ordering::Relaxed),
        );
        if addr < start || addr - start >= len {
            continue;
        }
        let page = addr & !(PAGE - 1);
        // SAFETY: replaces one page of a guarded mapping (the range is mapped and owned by
        // the guard's user until it unregisters) with anonymous zeros, in place.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return false;
        }
        s.truncated.store(true, Ordering::Release);
        FAULTS.fetch_add(1, Ordering::Relaxed);
        let fd = WAKE_FD.load(Ordering::Acquire);
        if fd >= 0 {
            let b = 1u8;
            // SAFETY: writes one byte from a live local to the pipe (non-blocking; a full
            // pipe already holds a wake-up).
            unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
        }
        return true;
    }
    false
}

/// If a region of `mem` maps a file that is now shorter than the region's range of it:
/// which region, and the lengths (checked with `fstat` on the mapped file).
pub fn truncated_file<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> Option<String> {
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else { continue };
        let need = fo.start().saturating_add(r.len());
        let have = match fo.file().metadata() {
            Ok(m) => m.len(),
            Err(_) => continue,
        };
        if have < need {
            return Some(format!(
                "the memory file behind guest RAM at {:#x} is {have} bytes long, the mapping \
                 needs {need}",
                r.start_addr().0
            ));
        }
    }
    None
}
