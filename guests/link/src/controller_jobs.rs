//! The controller's job table: submitting jobs (keyed or not), recording pages as the
//! engine answers them, finishing jobs and forgetting the oldest finished ones.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::*;

impl Controller {
    /// `SubmitKeyedJob`: a known key answers with its job (if the parameters are the
    /// same); a new one queues a job as `SubmitJob` does.
    pub(super) fn submit_keyed(
        &mut self,
        key: String,
        pages: u32,
        seed: u64,
        width: u16,
        height: u16,
        out: &mut Vec<Action>,
    ) -> HostReply {
        if key.is_empty() || key.len() > MAX_JOB_KEY_LEN || key.chars().any(char::is_control) {
            return error(
                error_code::INVALID_JOB,
                format!("job key must be 1..={MAX_JOB_KEY_LEN} bytes without control characters"),
            );
        }
        if let Some(&id) = self.keys.get(&key) {
            let same = self.jobs.get(&id).is_some_and(|j| {
                (j.pages, j.seed, j.width, j.height) == (pages, seed, width, height)
            });
            if !same {
                return error(
                    error_code::INVALID_JOB,
                    format!("job key {key:?} was used for job {id} with other parameters"),
                );
            }
            out.push(Action::Log(format!(
                "job {id} submitted again (key {key:?})"
            )));
            return HostReply::KeyedJobAccepted {
                id,
                duplicate: true,
            };
        }
        match self.submit(pages, seed, width, height, Some(key), out) {
            HostReply::JobAccepted { id } => HostReply::KeyedJobAccepted {
                id,
                duplicate: false,
            },
            other => other,
        }
    }

    pub(super) fn submit(
        &mut self,
        pages: u32,
        seed: u64,
        width: u16,
        height: u16,
        key: Option<String>,
        out: &mut Vec<Action>,
    ) -> HostReply {
        if pages == 0 || pages > MAX_JOB_PAGES {
            return error(
                error_code::INVALID_JOB,
                format!("pages must be 1..={MAX_JOB_PAGES}, not {pages}"),
            );
        }
        let pixels = u32::from(width) * u32::from(height);
        if width == 0 || height == 0 || pixels > MAX_PAGE_PIXELS {
            return error(
                error_code::INVALID_JOB,
                format!("page {width}x{height} is empty or over {MAX_PAGE_PIXELS} pixels"),
            );
        }
        if self.active.len() >= MAX_ACTIVE_JOBS {
            return error(
                error_code::QUEUE_FULL,
                format!("queue full ({MAX_ACTIVE_JOBS} jobs)"),
            );
        }
        let id = self.next_id;
        self.next_id += 1;
        self.jobs.insert(
            id,
            Job {
                pages,
                seed,
                width,
                height,
                state: JobState::Queued,
                sent: 0,
                checksums: Vec::new(),
                error: None,
                key: key.clone(),
            },
        );
        if let Some(key) = key {
            self.keys.insert(key, id);
        }
        self.active.push_back(id);
        out.push(Action::Log(format!(
            "job {id} queued: {pages} pages {width}x{height}"
        )));
        HostReply::JobAccepted { id }
    }

    /// All remembered jobs in id order; if they do not fit one frame, the newest that do.
    pub(super) fn all_jobs(&self) -> Vec<JobInfo> {
        let budget = MAX_FRAME - 64 * 1024;
        let mut used = 0;
        let mut infos = Vec::new();
        for (&id, job) in self.jobs.iter().rev() {
            let size = 48 + 5 * job.checksums.len() + job.error.as_ref().map_or(0, String::len);
            if used + size > budget {
                break;
            }
            used += size;
            infos.push(job_info(id, job));
        }
        infos.reverse();
        infos
    }

    pub(super) fn page_done(&mut self, id: u64, page: u32, checksum: u32, out: &mut Vec<Action>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.state != JobState::Printing {
            return; // already failed
        }
        if page as usize != job.checksums.len() {
            let reason = format!(
                "engine answered page {page} before page {}",
                job.checksums.len()
            );
            self.finish(id, Some(reason), out);
            return;
        }
        job.checksums.push(checksum);
        if job.checksums.len() as u32 == job.pages {
            self.finish(id, None, out);
        }
    }

    /// Ends job `id`: done (`error` None) or failed.
    pub(super) fn finish(&mut self, id: u64, error: Option<String>, out: &mut Vec<Action>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        match &error {
            None => {
                job.state = JobState::Done;
                out.push(Action::Log(format!("job {id} done: {} pages", job.pages)));
            }
            Some(reason) => {
                job.state = JobState::Failed;
                out.push(Action::Log(format!(
                    "job {id} failed after {} of {} pages: {reason}",
                    job.checksums.len(),
                    job.pages
                )));
            }
        }
        job.error = error;
        self.active.retain(|&a| a != id);
        self.finished.push_back(id);
        while self.finished.len() > MAX_FINISHED_JOBS {
            if let Some(old) = self.finished.pop_front() {
                if let Some(key) = self.jobs.remove(&old).and_then(|j| j.key) {
                    self.keys.remove(&key);
                }
            }
        }
    }
}

pub(super) fn job_info(id: u64, j: &Job) -> JobInfo {
    JobInfo {
        id,
        state: j.state,
        pages: j.pages,
        pages_done: j.checksums.len() as u32,
        checksums: j.checksums.clone(),
        error: j.error.clone(),
    }
}

/// An `Error` reply.
pub(super) fn error(code: u16, message: String) -> HostReply {
    HostReply::Error { code, message }
}
