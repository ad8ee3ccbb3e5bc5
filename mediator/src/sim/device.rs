//! The simulated relay's fake device: "prints" a job by computing the checksums the engine
//! would answer (`duplex_link::expected_page_checksum`), and, like the controller, takes
//! a job id only once: a job id seen before is answered with the first job's id, and its
//! result when that job finishes. The device outlives the relay's sessions and tunnels,
//! as the controller partition outlives the relay's connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

/// A job as the device took it.
struct Entry {
    device_job: u64,
    result: watch::Receiver<Option<Vec<u32>>>,
}

/// A device's job table and print counter.
#[derive(Default)]
pub struct FakeDevice {
    jobs: Mutex<HashMap<String, Entry>>,
    prints: Arc<AtomicU64>,
    next_job: AtomicU64,
    /// How long each print takes.
    pub print_delay: Duration,
}

/// A job the device took: its id, whether it had it before, and its result to come.
pub struct Taken {
    pub device_job: u64,
    pub duplicate: bool,
    result: watch::Receiver<Option<Vec<u32>>>,
}

impl Taken {
    /// The page checksums, once printed (`None` if the print task died).
    pub async fn result(mut self) -> Option<Vec<u32>> {
        self.result.wait_for(Option::is_some).await.ok()?.clone()
    }
}

impl FakeDevice {
    /// A device that prints at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// A device that takes `delay` per job.
    pub fn with_delay(delay: Duration) -> Self {
        FakeDevice {
            print_delay: delay,
            ..Self::default()
        }
    }

    fn jobs(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many jobs were printed (duplicates not counted).
    pub fn prints(&self) -> u64 {
        self.prints.load(Ordering::SeqCst)
    }

    /// The device job id of `job_id`, if the device took it.
    pub fn device_job(&self, job_id: &str) -> Option<u64> {
        self.jobs().get(job_id).map(|e| e.device_job)
    }

    /// Takes `job_id` (printing it in the background) unless taken before.
    pub fn submit(&self, job_id: &str, pages: u32, seed: u64, width: u16, height: u16) -> Taken {
        let mut jobs = self.jobs();
        if let Some(e) = jobs.get(job_id) {
            return Taken {
                device_job: e.device_job,
                duplicate: true,
                result: e.result.clone(),
            };
        }
        let device_job = self.next_job.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, rx) = watch::channel(None);
        let (delay, prints) = (self.print_delay, self.prints.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let sums = tokio::task::spawn_blocking(move || {
                crate::cloud::document::expected_checksums(seed, pages, width, height)
            })
            .await
            .unwrap_or_default();
            prints.fetch_add(1, Ordering::SeqCst);
            tx.send_replace(Some(sums));
        });
        jobs.insert(
            job_id.to_string(),
            Entry {
                device_job,
                result: rx.clone(),
            },
        );
        Taken {
            device_job,
            duplicate: false,
            result: rx,
        }
    }
}
