//! Service health: the monitor's long-lived service threads (the device event loop, the
//! control socket's accept loop, console writers, ...) are started with [`spawn_service`],
//! which records in a registry whether each one runs, has stopped, failed, or panicked, with
//! a message and a restart count, so that none can die silently.
//!
//! A panic in a service is caught (`catch_unwind`): the service is restarted while its
//! [`Restart`] budget lasts (after a short pause that grows with each restart), then marked
//! `panicked` with the panic's message. [`HealthRegistry::snapshot`] is what `status` shows.
//!
//! The module also reads the process's own limits ([`process_limits`]: open fds against
//! `RLIMIT_NOFILE`, threads) and raises the soft open-file limit ([`raise_fd_limit`]).

use std::any::Any;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde::Serialize;

/// How many ended services (stopped, failed, panicked) the registry keeps for `status`;
/// older ones are forgotten. Running services are always kept.
pub const MAX_ENDED: usize = 32;
/// The pause before a restart, times the restart's number (a service that panics at once
/// cannot spin).
pub const RESTART_PAUSE: Duration = Duration::from_millis(50);

/// What became of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Its thread runs (also after a restart).
    Running,
    /// It ended as asked (its work is done, or the monitor stopped it).
    Stopped,
    /// It ended with an error (`message`); not restarted.
    Failed,
    /// It panicked more often than its restart budget allows (`message` is the panic's).
    Panicked,
}

/// One service, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceHealth {
    /// The service's (thread's) name, e.g. `device-loop`, `api-accept`.
    pub name: String,
    /// Whether it runs.
    pub state: ServiceState,
    /// The last panic's or error's message (also kept after a successful restart).
    pub message: Option<String>,
    /// How many times it was restarted after a panic.
    pub restarts: u64,
}

/// What a service does after a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Marked `panicked` at the first panic.
    Never,
    /// Restarted after each of its first `n` panics, then marked `panicked`.
    UpTo(u32),
}

struct Entry {
    id: u64,
    /// When it ended (a sequence number), for forgetting the oldest ended first.
    ended: Option<u64>,
    health: ServiceHealth,
}

struct Inner {
    next_id: u64,
    ends: u64,
    entries: Vec<Entry>,
}

/// The registry of services. The monitor uses [`HealthRegistry::global`]; tests may make
/// their own (leaked, so that its threads can refer to it).
pub struct HealthRegistry {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for HealthRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthRegistry")
            .field("services", &self.snapshot())
            .finish()
    }
}

static GLOBAL: HealthRegistry = HealthRegistry::new();

/// Starts `body` on a thread called `name`, supervised in the global registry (see
/// [`HealthRegistry::spawn`]).
pub fn spawn_service<F>(name: &str, restart: Restart, body: F) -> io::Result<JoinHandle<()>>
where
    F: FnMut() -> Result<(), String> + Send + 'static,
{
    GLOBAL.spawn(name, restart, body)
}

/// [`spawn_service`] with `start` run once on the new thread before `body`, and not again
/// when a panic restarts `body` (e.g. entering the thread's seccomp sandbox).
pub fn spawn_service_with<S, F>(
    name: &str,
    restart: Restart,
    start: S,
    body: F,
) -> io::Result<JoinHandle<()>>
where
    S: FnOnce() + Send + 'static,
    F: FnMut() -> Result<(), String> + Send + 'static,
{
    GLOBAL.spawn_with(name, restart, start, body)
}

impl HealthRegistry {
    /// An empty registry.
    pub const fn new() -> HealthRegistry {
        HealthRegistry {
            inner: Mutex::new(Inner {
                next_id: 0,
                ends: 0,
                entries: Vec::new(),
            }),
        }
    }

    /// The monitor's registry.
    pub fn global() -> &'static HealthRegistry {
        &GLOBAL
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every running service and the last [`MAX_ENDED`] ended ones, in the order they
    /// started.
    pub fn snapshot(&self) -> Vec<ServiceHealth> {
        self.lock()
            .entries
            .iter()
            .map(|e| e.health.clone())
            .collect()
    }

    /// Starts `body` on a thread called `name`. `body` returning `Ok(())` ends the service
    /// (`stopped`); `Err(message)` ends it as `failed`; a panic restarts it (calls `body`
    /// again) while `restart` allows, else ends it as `panicked`. Fails only when the
    /// thread cannot be started (the registry then forgets the service).
    pub fn spawn<F>(
        &'static self,
        name: &str,
        restart: Restart,
        body: F,
    ) -> io::Result<JoinHandle<()>>
    where
        F: FnMut() -> Result<(), String> + Send + 'static,
    {
        self.spawn_with(name, restart, || {}, body)
    }

    /// [`HealthRegistry::spawn`] with `start` run once on the new thread before `body`
    /// (not again after a restart).
    pub fn spawn_with<S, F>(
        &'static self,
        name: &str,
        restart: Restart,
        start: S,
        mut body: F,
    ) -> io::Result<JoinHandle<()>>
    where
        S: FnOnce() + Send + 'static,
        F: FnMut() -> Result<(), String> + Send + 'static,
    {
        let id = self.register(name);
        let spawned = thread::Builder::new().name(name.to_owned()).spawn(move || {
            start();
            self.supervise(id, restart, &mut body)
        });
        if spawned.is_err() {
            self.lock().entries.retain(|e| e.id != id);
        }
        spawned
    }

    fn register(&self, name: &str) -> u64 {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.entries.push(Entry {
            id,
            ended: None,
            health: ServiceHealth {
                name: name.to_owned(),
                state: ServiceState::Running,
                message: None,
                restarts: 0,
            },
        });
        id
    }

    fn update(&self, id: u64, change: impl FnOnce(&mut ServiceHealth)) {
        let mut inner = self.lock();
        inner.ends += 1;
        let seq = inner.ends;
        let Some(e) = inner.entries.iter_mut().find(|e| e.id == id) else {
            return;
        };
        change(&mut e.health);
        if e.health.state == ServiceState::Running || e.ended.is_some() {
            return;
        }
        e.ended = Some(seq);
        let ended = inner.entries.iter().filter(|e| e.ended.is_some()).count();
        if ended > MAX_ENDED {
            let oldest = inner
                .entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| e.ended.map(|s| (s, i)))
                .min();
            if let Some((_, i)) = oldest {
                inner.entries.remove(i);
            }
        }
    }

    fn supervise<F>(&self, id: u64, restart: Restart, body: &mut F)
    where
        F: FnMut() -> Result<(), String>,
    {
        let name = thread::current().name().unwrap_or("service").to_owned();
        let mut restarts: u32 = 0;
        loop {
            match catch_unwind(AssertUnwindSafe(&mut *body)) {
                Ok(Ok(())) => {
                    self.update(id, |h| h.state = ServiceState::Stopped);
                    return;
                }
                Ok(Err(message)) => {
                    log::error!("service {name} failed: {message}");
                    self.update(id, |h| {
                        h.state = ServiceState::Failed;
                        h.message = Some(message);
                    });
                    return;
                }
                Err(payload) => {
                    let message = panic_message(payload.as_ref());
                    let again = match restart {
                        Restart::Never => false,
                        Restart::UpTo(n) => restarts < n,
                    };
                    if !again {
                        log::error!("service {name} panicked ({message}); it is not restarted");
                        self.update(id, |h| {
                            h.state = ServiceState::Panicked;
                            h.message = Some(message);
                        });
                        return;
                    }
                    restarts += 1;
                    log::error!("service {name} panicked ({message}); restart {restarts}");
                    self.update(id, |h| {
                        h.restarts = u64::from(restarts);
                        h.message = Some(message);
                    });
                    thread::sleep(RESTART_PAUSE * restarts);
                }
            }
        }
    }
}

impl Default for HealthRegistry {
    fn default() -> Self {
        HealthRegistry::new()
    }
}

/// The text of a panic's payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_owned()
    }
}

/// The process's use of fds and threads against its limits (for `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProcessLimits {
    /// File descriptors open now.
    pub open_fds: u64,
    /// `RLIMIT_NOFILE`, soft (the one that counts).
    pub fd_limit: u64,
    /// `RLIMIT_NOFILE`, hard.
    pub fd_hard_limit: u64,
    /// Threads of the process now.
    pub threads: u64,
}

fn nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one; returns (old soft, new soft).
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut lim = nofile()?;
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit; raising the soft limit up to the hard one is
        // always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

/// The process's open fds, threads and fd limits now (0 for what cannot be read).
pub fn process_limits() -> ProcessLimits {
    // Reading the directory opens one fd of its own, which is not counted.
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1) as u64)
        .unwrap_or(0);
    let threads = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0);
    let lim = nofile().unwrap_or(libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    });
    ProcessLimits {
        open_fds,
        fd_limit: lim.rlim_cur,
        fd_hard_limit: lim.rlim_max,
        threads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn registry() -> &'static HealthRegistry {
        Box::leak(Box::new(HealthRegistry::new()))
    }

    fn one(r: &HealthRegistry, name: &str) -> ServiceHealth {
        r.snapshot()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    #[test]
    fn a_panicking_service_is_restarted_then_marked_dead() {
        let r = registry();
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        r.spawn("flaky", Restart::UpTo(3), move || {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("first call fails");
            }
            Ok(())
        })
        .expect("spawn")
        .join()
        .expect("join");
        let flaky = one(r, "flaky");
        assert_eq!(flaky.state, ServiceState::Stopped);
        assert_eq!(flaky.restarts, 1);
        assert_eq!(flaky.message.as_deref(), Some("first call fails"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        r.spawn("doomed", Restart::UpTo(2), || panic!("always {}", 42))
            .expect("spawn")
            .join()
            .expect("join");
        let doomed = one(r, "doomed");
        assert_eq!(doomed.state, ServiceState::Panicked);
        assert_eq!(doomed.restarts, 2);
        assert_eq!(doomed.message.as_deref(), Some("always 42"));

        r.spawn("erring", Restart::UpTo(5), || Err("no epoll".into()))
            .expect("spawn")
            .join()
            .expect("join");
        let erring = one(r, "erring");
        assert_eq!(erring.state, ServiceState::Failed);
        assert_eq!(erring.restarts, 0);
        let json = serde_json::to_value(&erring).expect("json");
        assert_eq!(json["state"], "failed");
        assert_eq!(json["message"], "no epoll");
    }

    #[test]
    fn the_start_hook_runs_once_however_often_the_body_restarts() {
        let r = registry();
        let (starts, calls) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (s, c) = (starts.clone(), calls.clone());
        r.spawn_with(
            "hooked",
            Restart::UpTo(3),
            move || {
                s.fetch_add(1, Ordering::SeqCst);
            },
            move || {
                if c.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("restart me");
                }
                Ok(())
            },
        )
        .expect("spawn")
        .join()
        .expect("join");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(starts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_running_service_shows_as_running_and_ended_ones_are_capped() {
        let r = registry();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let handle = r
            .spawn("waiter", Restart::Never, move || {
                let _ = rx.recv();
                Ok(())
            })
            .expect("spawn");
        assert_eq!(one(r, "waiter").state, ServiceState::Running);
        for i in 0..MAX_ENDED + 5 {
            r.spawn(&format!("short-{i}"), Restart::Never, || Ok(()))
                .expect("spawn")
                .join()
                .expect("join");
        }
        let all = r.snapshot();
        assert_eq!(
            all.len(),
            MAX_ENDED + 1,
            "the running one and the last ended ones"
        );
        assert_eq!(all[0].name, "waiter");
        assert_eq!(all[1].name, "short-5");
        drop(tx);
        handle.join().expect("join");
        assert_eq!(one(r, "waiter").state, ServiceState::Stopped);
    }

    #[test]
    fn limits_are_read_and_the_soft_fd_limit_raised() {
        let (_old, new) = raise_fd_limit().expect("raise");
        let l = process_limits();
        assert_eq!(l.fd_limit, new);
        assert_eq!(l.fd_limit, l.fd_hard_limit);
        assert!(l.open_fds >= 3, "{l:?}");
        assert!(l.threads >= 1, "{l:?}");
    }
}
