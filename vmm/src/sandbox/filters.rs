//! The allowlists, one per [`ThreadKind`], built from groups of system calls, each with
//! why it is there. They were derived from the KVM test suite run under `strace -f` with
//! `DUPLEX_SECCOMP=off` (`scripts/seccomp-profile`); keep them so (docs/security.md).
//!
//! Filters stack: a thread keeps the filters of the threads that started it. So a kind
//! that starts vCPU threads includes the vCPU groups, and the startup filter (main, first
//! thing) is the union of every kind's.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{SandboxError, ThreadKind};

/// One system call: its number and its name (`SYS_<name>`).
type Call = (i64, &'static str);

macro_rules! calls {
    ($($name:ident),* $(,)?) => { &[$((libc::$name, stringify!($name))),*] };
}

/// Every thread: memory (the allocator, stacks), locks and condition variables, channels
/// and joins, time and sleeps (and their restart after a signal), its own exit, signals
/// (the vCPU kick, SIGINT/SIGTERM run on any thread; the SIGSYS handler resets SIGSYS and
/// sends it to itself), logging to stderr, the console on stdout, closing what it drops,
/// per-thread hash keys.
const BASE: &[Call] = calls![
    // memory
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    // locks, condition variables, channels, joins
    SYS_futex,
    SYS_sched_yield,
    // time, sleeps, timeouts; a sleep or wait interrupted by a signal resumes through
    // restart_syscall
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_restart_syscall,
    // leaving
    SYS_exit,
    SYS_exit_group,
    // signals
    SYS_rt_sigreturn,
    SYS_rt_sigprocmask,
    SYS_rt_sigaction,
    SYS_sigaltstack,
    SYS_getpid,
    SYS_gettid,
    SYS_tgkill,
    // stderr (logs), stdout (consoles), dropping fds, descriptor flags, hash keys
    SYS_write,
    SYS_writev,
    SYS_close,
    SYS_fcntl,
    SYS_getrandom,
];

/// A vCPU thread's devices, on top of [`BASE`] and `KVM_RUN` ([`vcpu_ioctls`]).
const VCPU: &[Call] = calls![
    // the disk (virtio-blk): requests on the backing file, flushes
    SYS_pread64,
    SYS_pwrite64,
    SYS_fdatasync,
    // vsock: bytes to and from host sockets, a peer's close
    SYS_sendto,
    SYS_recvfrom,
    SYS_shutdown,
    // vsock: a guest-initiated host connection (`<uds>_<port>`, hostlink.rs; socket() is
    // restricted to AF_UNIX), made only to a socket of ours or root's (lstat of it and its
    // directory, our euid, SO_PEERCRED of the listener: vsock/uds.rs)
    SYS_socket,
    SYS_connect,
    SYS_newfstatat,
    SYS_statx,
    SYS_geteuid,
    SYS_getsockopt,
];

/// Starting threads (glibc's pthread_create and what a new thread does before it enters
/// its own kind: its robust list, rseq, its name, the CPU count for worker pools), and the
/// new thread entering its kind (`seccomp`, `prctl` for no-new-privs: a filter can only
/// add restrictions). `clone` only with CLONE_THREAD: no fork.
const SPAWN: &[Call] = calls![
    SYS_clone,
    SYS_clone3,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_prctl,
    SYS_sched_getaffinity,
    SYS_seccomp,
];

/// Device operations (control clients, the supervisor, workers): building VMs (KVM and
/// TAP ioctls), reading configs, kernels and sets, writing sets (atomically: temp files,
/// fsync, rename; replaced sets removed), restored disks, eventfds for irqfds, the vsock
/// bridge's sockets kept or re-made by a restore (socket() restricted to AF_UNIX; umask
/// and modes around binds).
const OPERATION: &[Call] = calls![
    SYS_openat,
    SYS_read,
    SYS_pread64,
    SYS_pwrite64,
    SYS_lseek,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_getdents64,
    SYS_readlink,
    // `snapshot.root` confinement canonicalises paths (realpath: a relative one needs the
    // working directory)
    SYS_getcwd,
    // whether a path may be written (a set's destination)
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_mkdir,
    SYS_rename,
    SYS_renameat2,
    SYS_unlink,
    SYS_unlinkat,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_fsync,
    SYS_fdatasync,
    SYS_sync_file_range,
    SYS_fadvise64,
    SYS_flock,
    SYS_mincore,
    SYS_eventfd2,
    // a restored network card's sleep timer (its magic-packet watch)
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_ioctl,
    SYS_socket,
    SYS_connect,
    SYS_bind,
    SYS_listen,
    SYS_setsockopt,
    SYS_sendto,
    SYS_recvfrom,
    SYS_shutdown,
    SYS_poll,
    SYS_umask,
    SYS_chmod,
    SYS_fchmod,
    SYS_fchmodat,
    // the SIGBUS guard's wake-up pipe (snapshot/src/guard.rs), made at the first lazily
    // mapped restore
    SYS_pipe2,
    SYS_pipe,
    // every Unix socket is bound on a short-lived thread that unshares its file system
    // attributes to own its umask (`duplex_devices::umask`): CLONE_FS only
    SYS_unshare,
];

/// The control socket: accepting clients (polled), their requests and answers, their
/// timeouts; `status` reads the process's fd limit (`prlimit64` with no new limit).
const CONTROL: &[Call] = calls![
    SYS_prlimit64,
    SYS_accept4,
    SYS_poll,
    SYS_recvfrom,
    SYS_sendto,
    SYS_setsockopt,
    SYS_shutdown,
];

/// The device event loop: epoll, its eventfds and timerfd, the TAPs' frames (read), the
/// bridge's accepts and host sockets (ioctl: FIONBIO only).
const EVENT_LOOP: &[Call] = calls![
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_read,
    SYS_readv,
    SYS_accept4,
    SYS_recvfrom,
    SYS_sendto,
    SYS_shutdown,
    SYS_timerfd_settime,
    SYS_ioctl,
    // the rest of a guest's TX budget (vsock), which may open a guest-initiated host
    // connection: as on a vCPU thread (socket() restricted to AF_UNIX)
    SYS_socket,
    SYS_connect,
    SYS_newfstatat,
    SYS_statx,
    SYS_geteuid,
    SYS_getsockopt,
];

/// The main thread once the device is up: waiting, then stopping every partition and
/// removing the control socket if it is still its own.
const MAIN: &[Call] = calls![SYS_newfstatat, SYS_statx, SYS_unlink, SYS_shutdown];

/// The main thread's setup, on top of every other kind's groups: the control socket and
/// bridge listeners (bind, listen, chmod), the event loop (epoll, timerfd), the signal
/// handlers; the runtime directory and file limit (issue 11: uid, umask, RLIMIT_NOFILE).
const STARTUP: &[Call] = calls![
    SYS_bind,
    SYS_listen,
    SYS_chmod,
    SYS_epoll_create1,
    SYS_timerfd_create,
    SYS_prlimit64,
    SYS_setrlimit,
    SYS_getrlimit,
    SYS_getuid,
    SYS_geteuid,
];

/// Opening files (`openat`: what glibc and std use) for the kinds that must not: allowed
/// by their allowlist, then answered `EACCES` by a second filter ([`deny_open`]). glibc's
/// malloc opens `/proc/sys/vm/overcommit_memory` once, lazily, the first time it shrinks a
/// thread's heap (seen on a vCPU thread under strace), and copes with a failed open; a trap
/// there would kill the monitor for a free().
const OPEN_REFUSED: &[Call] = calls![SYS_openat];

/// The second filter of the kinds that may not open files: `openat` fails with
/// `EACCES`, everything else is left to the kind's allowlist.
pub fn deny_open() -> Result<BpfProgram, SandboxError> {
    let compile = |source| SandboxError::Compile {
        kind: "deny-open",
        source,
    };
    let rules = OPEN_REFUSED
        .iter()
        .map(|(nr, _)| (*nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .map_err(compile)?;
    filter.try_into().map_err(compile)
}

/// Whether `kind` gets [`deny_open`] on top of its allowlist.
pub fn refuses_open(kind: ThreadKind) -> bool {
    matches!(
        kind,
        ThreadKind::Vcpu | ThreadKind::EventLoop | ThreadKind::Main
    )
}

/// The `ioctl` requests a vCPU thread makes: `KVM_RUN`; `KVM_GET_MSRS` (the guest's TSC
/// for a guest sleep); `KVM_GET_REGS` (the `rip` of a crash report).
fn vcpu_ioctls() -> [u64; 3] {
    [kvm::KVM_RUN(), kvm::KVM_GET_MSRS(), kvm::KVM_GET_REGS()]
}

mod kvm {
    //! The KVM ioctl numbers the vCPU filter allows.
    use kvm_bindings::{kvm_msrs, kvm_regs};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};
    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
}

/// The ioctl type byte (bits 8..16 of the request) of KVM's requests.
const IOCTL_TYPE_KVM: u64 = 0xAE;
/// The ioctl type byte `'T'`: the TUN requests (`TUNSETIFF`, ...) and FIONBIO/FIOCLEX.
const IOCTL_TYPE_T: u64 = 0x54;

/// How each call is allowed on one filter: at all (`None`), or when one of its rules
/// matches.
type Rules = BTreeMap<i64, Option<Vec<SeccompRule>>>;

fn compile_error(source: seccompiler::BackendError) -> SandboxError {
    SandboxError::Compile {
        kind: "rules",
        source,
    }
}

fn allow(rules: &mut Rules, groups: &[&[Call]]) {
    for (nr, _) in groups.iter().flat_map(|g| g.iter()) {
        rules.insert(*nr, None);
    }
}

/// Allows `nr` only when `arg` masked with `mask` equals one of `values`.
fn restrict(
    rules: &mut Rules,
    nr: i64,
    arg: u8,
    mask: u64,
    values: &[u64],
) -> Result<(), SandboxError> {
    let mut list = Vec::new();
    for v in values {
        let op = match mask {
            u64::MAX => SeccompCmpOp::Eq,
            m => SeccompCmpOp::MaskedEq(m),
        };
        let cond =
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, *v).map_err(compile_error)?;
        list.push(SeccompRule::new(vec![cond]).map_err(compile_error)?);
    }
    rules.insert(nr, Some(list));
    Ok(())
}

/// The rules of `kind`'s filter.
fn rules(kind: ThreadKind) -> Result<Rules, SandboxError> {
    let mut r = Rules::new();
    let groups: &[&[Call]] = match kind {
        ThreadKind::Vcpu => &[BASE, VCPU, OPEN_REFUSED],
        ThreadKind::EventLoop => &[BASE, EVENT_LOOP, OPEN_REFUSED],
        ThreadKind::Supervisor | ThreadKind::Worker => &[BASE, VCPU, SPAWN, OPERATION],
        ThreadKind::Control => &[BASE, VCPU, SPAWN, OPERATION, CONTROL],
        ThreadKind::Main => &[BASE, MAIN, OPEN_REFUSED],
        ThreadKind::Startup => &[
            BASE, VCPU, SPAWN, OPERATION, CONTROL, EVENT_LOOP, MAIN, STARTUP,
        ],
    };
    allow(&mut r, groups);
    // Arguments: what each kind may ask of ioctl, socket and clone.
    let unix = [libc::AF_UNIX as u64];
    match kind {
        ThreadKind::Vcpu => {
            restrict(&mut r, libc::SYS_ioctl, 1, u64::MAX, &vcpu_ioctls())?;
            restrict(&mut r, libc::SYS_socket, 0, u64::MAX, &unix)?;
        }
        ThreadKind::EventLoop => {
            restrict(
                &mut r,
                libc::SYS_ioctl,
                1,
                u64::MAX,
                &[libc::FIONBIO, libc::FIOCLEX],
            )?;
            restrict(&mut r, libc::SYS_socket, 0, u64::MAX, &unix)?;
        }
        ThreadKind::Main => {}
        ThreadKind::Supervisor | ThreadKind::Worker | ThreadKind::Control | ThreadKind::Startup => {
            let types = [IOCTL_TYPE_KVM << 8, IOCTL_TYPE_T << 8];
            restrict(&mut r, libc::SYS_ioctl, 1, 0xff00, &types)?;
            restrict(&mut r, libc::SYS_socket, 0, u64::MAX, &unix)?;
            let thread = libc::CLONE_THREAD as u64;
            restrict(&mut r, libc::SYS_clone, 0, thread, &[thread])?;
            let fs = libc::CLONE_FS as u64;
            restrict(&mut r, libc::SYS_unshare, 0, u64::MAX, &[fs])?;
        }
    }
    Ok(r)
}

/// `kind`'s filter, compiled: anything not allowed traps (`SIGSYS`).
pub fn program(kind: ThreadKind) -> Result<BpfProgram, SandboxError> {
    let compile = |source| SandboxError::Compile {
        kind: kind.name(),
        source,
    };
    let rules = rules(kind)?
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(compile)?;
    filter.try_into().map_err(compile)
}

/// System calls a compromised thread would want, named in the SIGSYS line.
const NOTABLE: &[Call] = calls![
    SYS_getppid,
    SYS_execve,
    SYS_execveat,
    SYS_fork,
    SYS_vfork,
    SYS_ptrace,
    SYS_kill,
    SYS_setuid,
    SYS_setgid,
    SYS_mount,
    SYS_chroot,
    SYS_bpf,
    SYS_open,
    SYS_creat,
    SYS_link,
    SYS_symlink,
    SYS_chown,
    SYS_fchown,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_init_module,
    SYS_finit_module,
    SYS_kexec_load,
    SYS_reboot,
    SYS_personality,
    SYS_io_uring_setup,
    SYS_userfaultfd,
    SYS_perf_event_open,
    SYS_seccomp,
    SYS_getuid,
];

/// A system call's name, when it is one the filters or [`NOTABLE`] know
/// (async-signal-safe: a scan of static tables).
pub fn syscall_name(nr: i64) -> &'static str {
    let groups: [&[Call]; 10] = [
        BASE,
        VCPU,
        SPAWN,
        OPERATION,
        CONTROL,
        EVENT_LOOP,
        MAIN,
        STARTUP,
        OPEN_REFUSED,
        NOTABLE,
    ];
    for group in groups {
        for (n, name) in group {
            if *n == nr {
                return name.strip_prefix("SYS_").unwrap_or(name);
            }
        }
    }
    "unknown"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn allowed(kind: ThreadKind) -> BTreeSet<i64> {
        rules(kind).expect("rules").into_keys().collect()
    }

    #[test]
    fn every_filter_compiles_within_the_kernels_limits() {
        let mut longest = 0;
        for kind in ThreadKind::ALL {
            let len = program(kind).expect("compiles").len();
            // BPF_MAXINSNS for one filter.
            assert!(len < 4096, "{} filter: {len} instructions", kind.name());
            longest = longest.max(len);
        }
        // A vCPU thread started by a worker of a guest-raised snapshot carries the
        // startup, supervisor, worker, worker (a restore's build) and vCPU filters; the
        // kernel caps a thread's stack of filters at 32768 instructions (plus 4 each).
        assert!(6 * (longest + 4) < 32768, "{longest}");
    }

    #[test]
    fn spawners_allow_what_the_threads_they_start_need() {
        let vcpu = allowed(ThreadKind::Vcpu);
        for spawner in [
            ThreadKind::Startup,
            ThreadKind::Control,
            ThreadKind::Supervisor,
            ThreadKind::Worker,
        ] {
            let have = allowed(spawner);
            let missing: Vec<_> = vcpu.difference(&have).map(|n| syscall_name(*n)).collect();
            assert!(missing.is_empty(), "{}: {missing:?}", spawner.name());
        }
        let worker = allowed(ThreadKind::Worker);
        for spawner in [ThreadKind::Control, ThreadKind::Supervisor] {
            assert!(worker.is_subset(&allowed(spawner)), "{}", spawner.name());
        }
        let startup = allowed(ThreadKind::Startup);
        for kind in ThreadKind::ALL {
            let missing: Vec<_> = allowed(kind)
                .difference(&startup)
                .map(|n| syscall_name(*n))
                .collect();
            assert!(missing.is_empty(), "{}: {missing:?}", kind.name());
        }
    }

    #[test]
    fn guest_facing_threads_cannot_start_programs_threads_or_open_files() {
        for kind in [ThreadKind::Vcpu, ThreadKind::EventLoop] {
            let have = allowed(kind);
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_ptrace,
                libc::SYS_getppid,
                libc::SYS_mount,
                libc::SYS_setuid,
            ] {
                assert!(
                    !have.contains(&nr),
                    "{} allows {}",
                    kind.name(),
                    syscall_name(nr)
                );
            }
        }
        for kind in ThreadKind::ALL {
            for nr in [
                libc::SYS_execve,
                libc::SYS_fork,
                libc::SYS_ptrace,
                libc::SYS_getppid,
            ] {
                assert!(
                    !allowed(kind).contains(&nr),
                    "{} allows {}",
                    kind.name(),
                    syscall_name(nr)
                );
            }
        }
    }

    #[test]
    fn guest_facing_threads_get_eacces_for_any_open() {
        assert!(refuses_open(ThreadKind::Vcpu));
        assert!(refuses_open(ThreadKind::EventLoop));
        assert!(!refuses_open(ThreadKind::Worker));
        assert!(deny_open().expect("compiles").len() < 16);
    }

    #[test]
    fn arguments_are_restricted_where_it_matters() {
        let vcpu = rules(ThreadKind::Vcpu).expect("rules");
        let ioctl = vcpu.get(&libc::SYS_ioctl).expect("ioctl");
        assert_eq!(
            ioctl.as_ref().map(Vec::len),
            Some(3),
            "KVM_RUN, GET_MSRS, GET_REGS"
        );
        assert!(matches!(vcpu.get(&libc::SYS_socket), Some(Some(r)) if r.len() == 1));
        let control = rules(ThreadKind::Control).expect("rules");
        assert!(matches!(control.get(&libc::SYS_clone), Some(Some(_))));
        assert!(matches!(control.get(&libc::SYS_ioctl), Some(Some(_))));
        assert_eq!(kvm::KVM_RUN(), 0xae80);
        assert_eq!(syscall_name(libc::SYS_getppid), "getppid");
        assert_eq!(syscall_name(100_000), "unknown");
    }
}
