//! The monitor's seccomp sandbox: every long-lived thread enters the filter of its
//! [`ThreadKind`] first thing ([`enter`]), an allowlist of the system calls that kind of
//! thread makes (`filters.rs`); anything else raises `SIGSYS` (`SECCOMP_RET_TRAP`), whose
//! handler writes one line to stderr and kills the monitor. See `docs/security.md`.
//!
//! Filters are inherited and stack: a thread spawned by a filtered thread keeps its
//! parent's filter and adds its own, so only what both allow is allowed. Hence the kinds
//! that start vCPU threads (main at startup, control clients, the supervisor, workers)
//! allow everything a vCPU thread needs ([`filters`] builds them as supersets).
//!
//! Modes ([`init`]): enforcing (the default of `duplex run`), log-only
//! (`DUPLEX_SECCOMP=off`: [`enter`] logs `sandbox: tid=<tid> kind=<kind>` and installs
//! nothing; used to profile the threads under `strace -f`, `scripts/seccomp-profile`), and
//! off (`duplex run --no-seccomp`, for debugging). Without [`init`] (the library used
//! in-process, unit tests) [`enter`] does nothing.

pub mod filters;

use std::cell::Cell;
use std::sync::OnceLock;

/// The kinds of monitor threads, each with its own filter (`filters.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread while it sets the device up (config, KVM, partitions, restore,
    /// control socket). Installed first thing in `duplex run`, so that every thread of the
    /// monitor, including those of other crates that enter no filter of their own
    /// (snapshot prefetch and checksum workers), is filtered from its start: the union of
    /// every other kind, plus the setup (TAPs, signal handlers, limits).
    Startup,
    /// The main thread once the device is up: waits for the shutdown, then stops the
    /// partitions and closes the control socket. Starts no thread.
    Main,
    /// A vCPU thread (`<partition>-vcpu<i>`): `KVM_RUN` and the exits, which the
    /// partition's devices handle inline (console, control page, vsock TX and routing to
    /// host sockets, network TX to the TAP, disk requests on the backing file). The
    /// guest-facing kind: the narrowest filter, with `ioctl` restricted to the vCPU's
    /// KVM requests and the few socket/file requests the devices make.
    Vcpu,
    /// The control socket's accept thread and its client threads: the commands, which
    /// run device operations (snapshot, restore, reboot, start) and so start vCPU and
    /// worker threads.
    Control,
    /// The device event loop (`device-loop`): network cards' RX from their TAPs, the
    /// vsock host bridge's listeners and host sockets.
    EventLoop,
    /// The supervisor: reaps ended runs, cold-boots a partition again on a guest reboot,
    /// starts guest-raised snapshots on a worker.
    Supervisor,
    /// Short-lived threads of an operation: a guest-raised snapshot, the quiesce, the
    /// restore's builds and verifier, VM shell makers, the teardown of replaced runs.
    Worker,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Startup,
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Control,
        ThreadKind::EventLoop,
        ThreadKind::Supervisor,
        ThreadKind::Worker,
    ];

    /// Its name in logs and in the `SIGSYS` line.
    pub const fn name(self) -> &'static str {
        match self {
            ThreadKind::Startup => "startup",
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Control => "control",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Supervisor => "supervisor",
            ThreadKind::Worker => "worker",
        }
    }
}

/// Whether and how the filters apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every thread installs its kind's filter (the default).
    Enforce,
    /// Threads only log their kind and tid (profiling: `DUPLEX_SECCOMP=off`).
    LogOnly,
    /// No filter, no log (`--no-seccomp`, debugging only).
    Off,
}

/// Why the sandbox could not be set up or entered.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A filter could not be compiled.
    #[error("seccomp: compiling the {kind} filter: {source}")]
    Compile {
        /// The kind whose filter failed.
        kind: &'static str,
        /// What seccompiler said.
        source: seccompiler::BackendError,
    },
    /// A filter could not be installed.
    #[error("seccomp: installing the {kind} filter: {source}")]
    Install {
        /// The kind whose filter failed.
        kind: &'static str,
        /// What seccompiler said.
        source: seccompiler::Error,
    },
    /// The `SIGSYS` handler could not be installed.
    #[error("seccomp: installing the SIGSYS handler: {0}")]
    Signal(std::io::Error),
    /// [`init`] was called twice.
    #[error("seccomp: the sandbox was set up already")]
    AlreadySet,
}

struct State {
    mode: Mode,
    /// The compiled filters, by kind (`ThreadKind::ALL` order): its allowlist, and
    /// [`filters::deny_open`] for the kinds that may not open files; empty unless
    /// enforcing.
    programs: Vec<Vec<seccompiler::BpfProgram>>,
}

static STATE: OnceLock<State> = OnceLock::new();

thread_local! {
    /// The thread's name and kind, for the `SIGSYS` handler (constant-initialised, no
    /// destructor: reading them in a signal handler makes no call).
    static WHO: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
    static KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// Sets the sandbox up for this process: the mode (`no_seccomp`, else `DUPLEX_SECCOMP`),
/// the filters compiled, the `SIGSYS` handler, and the device event loop's hook. Call once,
/// before any thread that enters is started.
pub fn init(no_seccomp: bool) -> Result<Mode, SandboxError> {
    let mode = if no_seccomp {
        Mode::Off
    } else if std::env::var("DUPLEX_SECCOMP").is_ok_and(|v| v == "off") {
        Mode::LogOnly
    } else {
        Mode::Enforce
    };
    let mut programs = Vec::new();
    if mode == Mode::Enforce {
        for kind in ThreadKind::ALL {
            // deny_open first: the allowlist does not allow installing filters.
            let mut list = Vec::new();
            if filters::refuses_open(kind) {
                list.push(filters::deny_open()?);
            }
            list.push(filters::program(kind)?);
            programs.push(list);
        }
    }
    if mode == Mode::Enforce {
        install_sigsys_handler()?;
    }
    STATE
        .set(State { mode, programs })
        .map_err(|_| SandboxError::AlreadySet)?;
    // Another user of the devices crate in this process may have set it: then the
    // event loop does what that one says.
    let _ = duplex_devices::event_loop::ON_THREAD_START.set(event_loop_started);
    match mode {
        Mode::Enforce => log::info!("seccomp: on (a filter per thread kind)"),
        Mode::LogOnly => log::warn!(
            "seccomp: DUPLEX_SECCOMP=off: NO FILTER IS INSTALLED; threads only log their kind"
        ),
        Mode::Off => log::warn!(
            "!!! seccomp is OFF (--no-seccomp): the monitor runs WITHOUT its sandbox; \
             for debugging only !!!"
        ),
    }
    Ok(mode)
}

/// Whether the filters are enforced in this process (`status.seccomp`).
pub fn enforcing() -> bool {
    STATE.get().is_some_and(|s| s.mode == Mode::Enforce)
}

/// Installs `kind`'s filter on the calling thread (enforcing), or logs it (log-only). Call
/// first thing on the thread. Nothing without [`init`].
pub fn enter(kind: ThreadKind) -> Result<(), SandboxError> {
    let Some(state) = STATE.get() else {
        return Ok(());
    };
    if state.mode == Mode::Off {
        return Ok(());
    }
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    let mut who = [0u8; 16];
    if let Some(name) = std::thread::current().name() {
        let n = name.len().min(15);
        who[..n].copy_from_slice(&name.as_bytes()[..n]);
    }
    WHO.with(|w| w.set(who));
    let index = ThreadKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
    KIND.with(|k| k.set(u8::try_from(index).unwrap_or(u8::MAX)));
    match state.programs.get(index) {
        Some(list) => {
            log::debug!("sandbox: tid={tid} kind={}", kind.name());
            for program in list {
                seccompiler::apply_filter(program).map_err(|source| SandboxError::Install {
                    kind: kind.name(),
                    source,
                })?;
            }
            Ok(())
        }
        None => {
            log::info!("sandbox: tid={tid} kind={}", kind.name());
            Ok(())
        }
    }
}

/// [`enter`] for a thread that cannot report an error: on failure the monitor stops (it
/// was asked to run sandboxed and cannot).
pub fn enter_or_exit(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        eprintln!("duplex: {e}; stopping the monitor");
        std::process::exit(70);
    }
}

/// The device event loop's thread-start hook (`duplex_devices::event_loop::ON_THREAD_START`).
fn event_loop_started(_name: &str) {
    enter_or_exit(ThreadKind::EventLoop);
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler is an
    // `extern "C"` function taking the SA_SIGINFO arguments, and it only makes
    // async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::Signal(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// A fixed buffer a signal handler can format into (no allocation).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = *b;
                self.len += 1;
            }
        }
    }

    fn number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// `SIGSYS` from a filter: one line on stderr, then the process dies of `SIGSYS`.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // On x86-64 the SIGSYS fields follow the 16-byte header: `void *_call_addr` (8
    // bytes), then `int _syscall`.
    // SAFETY: the kernel passes a valid siginfo_t (SA_SIGINFO); offset 24 is inside it
    // (128 bytes) and holds si_syscall for a seccomp SIGSYS.
    let nr = unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<i32>()) };
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"duplex: seccomp: thread ");
    let who = WHO.with(Cell::get);
    let n = who.iter().position(|b| *b == 0).unwrap_or(who.len());
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    if n > 0 {
        line.push(&who[..n]);
        line.push(b" tid ");
    }
    line.number(i64::from(tid));
    line.push(b" (");
    let kind = KIND.with(Cell::get);
    match ThreadKind::ALL.get(usize::from(kind)) {
        Some(k) => line.push(k.name().as_bytes()),
        None => line.push(b"inherited filter"),
    }
    line.push(b") made forbidden syscall ");
    line.number(i64::from(nr));
    line.push(b" (");
    line.push(filters::syscall_name(i64::from(nr)).as_bytes());
    line.push(b"); stopping the monitor\n");
    // SAFETY: write, sigaction, getpid and tgkill are async-signal-safe; the buffer is
    // valid for `len` bytes; every filter allows these calls. SIGSYS is blocked while this
    // handler runs: the signal sent here is delivered, with its default action (the
    // process dies, as if by SECCOMP_RET_KILL_PROCESS), as soon as the handler returns.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
    }
}
