//! The console's asynchronous, bounded writer: the vCPU side appends finished lines to a
//! queue of at most [`QUEUE_BYTES`] and never waits for the output; a writer thread per
//! console (a supervised service, `console-<name>`) writes them to stdout or to a file.
//! When the queue is full a line is dropped and counted (`dropped_lines`). Console files
//! are capped: [`ConsoleFile`] rotates to `<file>.1` when the next line would take it past
//! its cap; a plain [`File`] sink stops taking lines at [`FILE_MAX_BYTES`] (counted as
//! dropped).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::health::{self, Restart};

/// The most bytes of lines waiting for a console's writer; beyond, lines are dropped.
pub const QUEUE_BYTES: usize = 1 << 20;
/// A console file's cap (the default of [`ConsoleFile::open`], and the cap of a plain
/// [`File`] sink).
pub const FILE_MAX_BYTES: u64 = 64 << 20;

/// A console file at a path, rotated to `<path>.1` (replacing it) when the next line would
/// take it past `max_bytes`. At most twice `max_bytes` of a console is on disk.
#[derive(Debug)]
pub struct ConsoleFile {
    path: PathBuf,
    file: File,
    len: u64,
    max_bytes: u64,
}

impl ConsoleFile {
    /// Opens (creating it, mode 0600, if missing) `path` for appending, capped at
    /// `max_bytes` (at least 1).
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<ConsoleFile> {
        let file = open_append(path)?;
        let len = file.metadata()?.len();
        Ok(ConsoleFile {
            path: path.to_path_buf(),
            file,
            len,
            max_bytes: max_bytes.max(1),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_line(&mut self, line: &[u8], stats: &Stats) -> io::Result<()> {
        let n = line.len() as u64;
        if self.len > 0 && self.len + n > self.max_bytes {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, &old)?;
            self.file = open_append(&self.path)?;
            self.len = 0;
            stats.rotations.fetch_add(1, Ordering::Relaxed);
        }
        self.file.write_all(line)?;
        self.len += n;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Where a writer thread puts lines.
#[derive(Debug)]
pub(super) enum Sink {
    Stdout { prefix: String },
    File { file: File, len: u64 },
    Rotating(ConsoleFile),
}

/// Counters shared by the console and its writer.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) dropped: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) rotations: AtomicU64,
}

#[derive(Debug, Default)]
struct Queue {
    lines: VecDeque<String>,
    bytes: usize,
    /// The writer holds a batch it took out of `lines`.
    writing: bool,
    /// The console is gone: write what is left, then end.
    closed: bool,
}

#[derive(Debug, Default)]
pub(super) struct Shared {
    queue: Mutex<Queue>,
    /// Lines arrived, or the console closed.
    ready: Condvar,
    /// The writer finished a batch.
    idle: Condvar,
    pub(super) stats: Stats,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes waiting to be written.
    pub(super) fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Waits until every line queued so far is written, at most `timeout`; false if not.
    pub(super) fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        while !q.lines.is_empty() || q.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self
                .idle
                .wait_timeout(q, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Every live console writer, for [`flush_all`].
static WRITERS: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

/// Waits until every console's queued lines are written (the monitor calls it before it
/// exits), at most `timeout` in all; false if some were not.
pub fn flush_all(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let live: Vec<Arc<Shared>> = WRITERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    live.iter()
        .all(|w| w.flush(deadline.saturating_duration_since(Instant::now())))
}

/// The console's end of its writer: appends lines; dropping it lets the writer finish.
#[derive(Debug)]
pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
}

impl Writer {
    /// Starts the writer thread `console-<name>` for `sink`.
    pub(super) fn start(name: &str, sink: Sink) -> io::Result<Writer> {
        let shared = Arc::new(Shared::default());
        let mut registry = WRITERS.lock().unwrap_or_else(|p| p.into_inner());
        registry.retain(|w| w.strong_count() > 0);
        registry.push(Arc::downgrade(&shared));
        drop(registry);
        let s = shared.clone();
        let mut sink = sink;
        health::spawn_service(&format!("console-{name}"), Restart::UpTo(3), move || {
            run(&s, &mut sink);
            Ok(())
        })?;
        Ok(Writer { shared })
    }

    /// Queues `line`, or drops and counts it when the queue is full. Never waits for I/O.
    pub(super) fn push(&self, line: String) {
        let cost = line.len() + 1;
        let mut q = self.shared.lock();
        if q.bytes + cost > QUEUE_BYTES {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let wake = q.lines.is_empty() && !q.writing;
        q.bytes += cost;
        q.lines.push_back(line);
        drop(q);
        if wake {
            self.shared.ready.notify_one();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
    }
}

/// The writer thread: takes the queued lines in batches and writes them, until the console
/// is closed and the queue empty.
fn run(shared: &Shared, sink: &mut Sink) {
    let mut q = shared.lock();
    // After a restart (a panic while writing): the batch in hand was lost.
    q.writing = false;
    shared.idle.notify_all();
    loop {
        while q.lines.is_empty() && !q.closed {
            q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.lines.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut q.lines);
        q.bytes = 0;
        q.writing = true;
        drop(q);
        write_batch(sink, batch, &shared.stats);
        q = shared.lock();
        q.writing = false;
        shared.idle.notify_all();
    }
}

fn write_batch(sink: &mut Sink, batch: VecDeque<String>, stats: &Stats) {
    let errors = &stats.errors;
    match sink {
        Sink::Stdout { prefix } => {
            let mut text = String::new();
            for line in &batch {
                text.push('[');
                text.push_str(prefix);
                text.push_str("] ");
                text.push_str(line);
                text.push('\n');
            }
            let mut out = io::stdout().lock();
            if out
                .write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                errors.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        }
        Sink::File { file, len } => {
            for line in batch {
                let n = line.len() as u64 + 1;
                if *len + n > FILE_MAX_BYTES {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match writeln!(file, "{line}") {
                    Ok(()) => *len += n,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Sink::Rotating(f) => {
            for mut line in batch {
                line.push('\n');
                if f.write_line(line.as_bytes(), stats).is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ConsoleHandle, ConsoleOutput};
    use super::*;
    use std::os::fd::FromRawFd;
    use std::sync::mpsc;

    /// A pipe: (read end, write end).
    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just created and are owned here only.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_sink_nobody_reads_does_not_block_the_vcpu_side() {
        let (read_end, write_end) = pipe();
        let handle = ConsoleHandle::new(ConsoleOutput::File(write_end));
        let mut vcpu = handle.clone();
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..20_000 {
                let _ = writeln!(vcpu, "line {i} {}", "x".repeat(100));
            }
            let _ = done.send(());
        });
        // 20 000 lines are ~2.2 MB: the pipe takes 64 KiB, the queue 1 MiB. Not a speed
        // check: a hang detector (the old console blocked here for good).
        let wrote_all = finished.recv_timeout(Duration::from_secs(20)).is_ok();
        let stats = handle.stats();
        let tail = handle.lock().tail(2);
        drop(read_end);
        assert!(
            wrote_all,
            "the vCPU side blocked on a console sink nobody reads"
        );
        assert_eq!(stats.lines, 20_000);
        // At most the queue, a batch in hand and the pipe's 64 KiB got through.
        assert!(stats.dropped_lines > 5_000, "{stats:?}");
        assert!(stats.queued_bytes <= QUEUE_BYTES as u64, "{stats:?}");
        assert!(tail[0].starts_with("line 19998 ") && tail[1].starts_with("line 19999 "));
        // The reader gone, the writer gets EPIPE and drains; nothing waits for ever.
        assert!(handle.flush_output(Duration::from_secs(20)));
    }

    #[test]
    fn a_console_file_rotates_at_its_cap() {
        let dir = std::env::temp_dir().join(format!("duplex-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("dir");
        let path = dir.join("c.log");
        let file = ConsoleFile::open(&path, 100).expect("open");
        let mut handle = ConsoleHandle::new(ConsoleOutput::RotatingFile(file));
        for i in 0..25 {
            writeln!(handle, "line {i:02} ........").expect("write"); // 19 bytes a line
        }
        assert!(handle.flush_output(Duration::from_secs(10)));
        let now = std::fs::read_to_string(&path).expect("current");
        let old = std::fs::read_to_string(dir.join("c.log.1")).expect("rotated");
        let stats = handle.stats();
        let _ = std::fs::remove_dir_all(&dir);
        // 5 lines (95 bytes) fit in 100: files of lines 0-4, 5-9, ..., 20-24.
        assert_eq!(stats.rotations, 4, "{stats:?}");
        assert!(
            now.starts_with("line 20 ") && now.ends_with("line 24 ........\n"),
            "{now}"
        );
        assert!(old.starts_with("line 15 ") && old.len() <= 100, "{old}");
        assert_eq!(stats.dropped_lines, 0);
    }
}
