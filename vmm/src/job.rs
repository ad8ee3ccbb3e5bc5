//! `duplex job`: a host client of the controller's job port, reached through the
//! controller partition's vsock host bridge (`CONNECT 1024`), speaking the link
//! protocol (`docs/link-protocol.md`): submit print jobs, read job and engine status.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use duplex_link::{encode, FrameDecoder, FrameError, HostReply, HostRequest, JobInfo, JOB_PORT};
use serde_json::{json, Value};

/// Why a job request failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The bridge socket could not be reached or the connection broke.
    #[error("vsock bridge {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The bridge refused the `CONNECT` (nobody listens on the port, or the partition is down).
    #[error("vsock bridge {path}: CONNECT {port} refused: {answer:?}")]
    Refused {
        path: PathBuf,
        port: u32,
        answer: String,
    },
    /// The controller sent bytes that are not a valid frame.
    #[error("malformed reply from the controller: {0:?}")]
    Frame(FrameError),
    /// The controller closed the connection before answering.
    #[error("the controller closed the connection before answering")]
    Closed,
    /// The controller answered with an error.
    #[error("controller error {code}: {message}")]
    Controller { code: u16, message: String },
    /// The controller answered with a reply of the wrong kind.
    #[error("unexpected reply {0:?}")]
    Unexpected(Box<HostReply>),
    /// A job did not finish in time.
    #[error("job {id} did not finish within {secs} s")]
    Timeout { id: u64, secs: u64 },
    /// The client's overall deadline passed before the answer was complete.
    #[error("vsock bridge {path}: no complete answer before the deadline")]
    Deadline { path: PathBuf },
}

/// One connection to the controller's job port.
pub struct JobClient {
    path: PathBuf,
    stream: BufReader<UnixStream>,
    decoder: FrameDecoder<HostReply>,
    /// When set, every connect, read and write must be done by then (see
    /// [`JobClient::connect_port_by`]).
    deadline: Option<Instant>,
}

impl JobClient {
    /// How long one reply may take (30 s after `connect`).
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), JobError> {
        self.stream
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|source| JobError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Connects to the controller's job port through the vsock bridge socket at `uds`.
    pub fn connect(uds: &Path) -> Result<JobClient, JobError> {
        Self::connect_port(uds, JOB_PORT)
    }

    /// Connects to guest `port` through the vsock bridge socket at `uds`.
    pub fn connect_port(uds: &Path, port: u32) -> Result<JobClient, JobError> {
        Self::connect_port_by(uds, port, None)
    }

    /// [`JobClient::connect_port`] with an overall `deadline`: the connect and every later
    /// call must be complete by then, however the other side dribbles its bytes (each read
    /// and write gets only the time left; [`JobError::Deadline`] once it is gone).
    pub fn connect_port_by(
        uds: &Path,
        port: u32,
        deadline: Option<Instant>,
    ) -> Result<JobClient, JobError> {
        let io = |source| JobError::Io {
            path: uds.to_owned(),
            source,
        };
        let s = UnixStream::connect(uds).map_err(io)?;
        let mut stream = BufReader::new(s);
        let mut c = JobClient {
            path: uds.to_owned(),
            stream,
            decoder: FrameDecoder::new(),
            deadline,
        };
        c.arm(Duration::from_secs(30))?;
        c.stream
            .get_mut()
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(|e| c.io_error(e))?;
        let mut answer = String::new();
        // The answer is one short line: read it a byte at a time, so a peer that never
        // ends it cannot hold the caller past the deadline.
        let mut byte = [0u8; 1];
        while !answer.ends_with('\n') && answer.len() < 256 {
            c.arm(Duration::from_secs(30))?;
            match c.stream.read(&mut byte) {
                Ok(0) => break,
                Ok(_) => answer.push(char::from(byte[0])),
                Err(e) => return Err(c.io_error(e)),
            }
        }
        stream = c.stream;
        if !answer.starts_with("OK ") {
            return Err(JobError::Refused {
                path: uds.to_owned(),
                port,
                answer: answer.trim_end().to_owned(),
            });
        }
        Ok(JobClient {
            path: uds.to_owned(),
            stream,
            decoder: FrameDecoder::new(),
            deadline,
        })
    }

    /// Sets the socket's timeouts for the next read or write: the time left before the
    /// deadline, or `otherwise` without one.
    fn arm(&self, otherwise: Duration) -> Result<(), JobError> {
        let t = match self.deadline {
            None => otherwise,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(JobError::Deadline {
                        path: self.path.clone(),
                    });
                }
                left
            }
        };
        let s = self.stream.get_ref();
        s.set_read_timeout(Some(t))
            .and_then(|()| s.set_write_timeout(Some(t)))
            .map_err(|source| JobError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// An I/O error, or [`JobError::Deadline`] when it is the deadline's timeout.
    fn io_error(&self, source: std::io::Error) -> JobError {
        let timed_out = matches!(
            source.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        );
        if timed_out && self.deadline.is_some_and(|d| Instant::now() >= d) {
            JobError::Deadline {
                path: self.path.clone(),
            }
        } else {
            JobError::Io {
                path: self.path.clone(),
                source,
            }
        }
    }

    /// Sends one request and waits for its reply.
    pub fn call(&mut self, req: &HostRequest) -> Result<HostReply, JobError> {
        let io = |source| JobError::Io {
            path: self.path.clone(),
            source,
        };
        if self.deadline.is_some() {
            self.arm(Duration::ZERO)?;
        }
        self.stream.get_mut().write_all(&encode(req)).map_err(io)?;
        let mut buf = [0u8; 16 << 10];
        loop {
            match self.decoder.next_message() {
                Some(Ok(HostReply::Error { code, message })) => {
                    return Err(JobError::Controller { code, message })
                }
                Some(Ok(reply)) => return Ok(reply),
                Some(Err(e)) => return Err(JobError::Frame(e)),
                None => {}
            }
            if self.deadline.is_some() {
                self.arm(Duration::ZERO)?;
            }
            let n = self
                .stream
                .read(&mut buf)
                .map_err(|source| self.io_error(source))?;
            if n == 0 {
                return Err(JobError::Closed);
            }
            self.decoder.push(&buf[..n]);
        }
    }

    /// Submits a job; returns its id.
    pub fn submit(
        &mut self,
        pages: u32,
        seed: u64,
        width: u16,
        height: u16,
    ) -> Result<u64, JobError> {
        match self.call(&HostRequest::SubmitJob {
            pages,
            seed,
            width,
            height,
        })? {
            HostReply::JobAccepted { id } => Ok(id),
            other => Err(JobError::Unexpected(Box::new(other))),
        }
    }

    /// The status of one job, or of all remembered jobs.
    pub fn jobs(&mut self, id: Option<u64>) -> Result<Vec<JobInfo>, JobError> {
        match self.call(&HostRequest::JobStatus { id })? {
            HostReply::Jobs(jobs) => Ok(jobs),
            other => Err(JobError::Unexpected(Box::new(other))),
        }
    }

    /// Polls job `id` until it is done or failed.
    pub fn wait(&mut self, id: u64, timeout: Duration) -> Result<JobInfo, JobError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(job) = self.jobs(Some(id))?.into_iter().find(|j| j.id == id) {
                if job.state.is_finished() {
                    return Ok(job);
                }
            }
            if Instant::now() >= deadline {
                return Err(JobError::Timeout {
                    id,
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `duplex job ...`
#[derive(clap::Args)]
pub struct JobArgs {
    /// The controller partition's vsock host-bridge socket (its config's `vsock.uds`).
    #[arg(long)]
    pub vsock: PathBuf,
    #[command(subcommand)]
    pub command: JobCommand,
}

/// What `duplex job` does.
#[derive(clap::Subcommand)]
pub enum JobCommand {
    /// Submit a print job of generated pages; prints its id (and, with --wait, the result).
    Submit {
        /// Number of pages.
        #[arg(long)]
        pages: u32,
        /// Seed of the generated page content.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Page width in pixels.
        #[arg(long, default_value_t = duplex_link::DEFAULT_PAGE_WIDTH)]
        width: u16,
        /// Page height in pixels.
        #[arg(long, default_value_t = duplex_link::DEFAULT_PAGE_HEIGHT)]
        height: u16,
        /// Wait until the job is done or failed and print it.
        #[arg(long)]
        wait: bool,
    },
    /// Print the status of one job (with its per-page checksums), or of all jobs.
    Status {
        /// The job id (all jobs when absent).
        id: Option<u64>,
    },
    /// Print the engine's status.
    Engine,
    /// Jam the engine's paper path (test hook).
    Jam,
    /// Clear a paper jam.
    ClearJam,
}

/// Runs `duplex job`; returns the JSON to print.
pub fn run_job(args: &JobArgs) -> Result<Value, JobError> {
    let mut c = JobClient::connect(&args.vsock)?;
    match &args.command {
        JobCommand::Submit {
            pages,
            seed,
            width,
            height,
            wait,
        } => {
            let id = c.submit(*pages, *seed, *width, *height)?;
            if *wait {
                let job = c.wait(id, Duration::from_secs(600))?;
                Ok(to_json(&job))
            } else {
                Ok(json!({ "id": id, "state": "queued" }))
            }
        }
        JobCommand::Status { id } => {
            let jobs = c.jobs(*id)?;
            match (id, jobs.as_slice()) {
                (Some(_), [job]) => Ok(to_json(job)),
                _ => Ok(to_json(&jobs)),
            }
        }
        JobCommand::Engine => reply_json(c.call(&HostRequest::EngineStatus)?),
        JobCommand::Jam => reply_json(c.call(&HostRequest::InjectJam)?),
        JobCommand::ClearJam => reply_json(c.call(&HostRequest::ClearJam)?),
    }
}

fn reply_json(reply: HostReply) -> Result<Value, JobError> {
    match reply {
        HostReply::Engine(info) => Ok(to_json(&info)),
        other => Err(JobError::Unexpected(Box::new(other))),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A bridge that answers `OK`, then dribbles a reply one byte every 20 ms, forever (or
    /// never ends its `OK` line, with `endless_ok`). Returns the bytes it sent.
    fn dribbler(path: &Path, endless_ok: bool) -> std::thread::JoinHandle<usize> {
        let listener = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut sent = 0;
            let head: &[u8] = if endless_ok {
                b"OK "
            } else {
                b"OK 1073741824\n"
            };
            if s.write_all(head).is_err() {
                return sent;
            }
            let reply = encode(&HostReply::Error {
                code: 500,
                message: "x".repeat(4096),
            });
            for b in reply.iter().cycle().take(10_000) {
                std::thread::sleep(Duration::from_millis(20));
                if s.write_all(&[if endless_ok { b'1' } else { *b }]).is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        })
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("duplex-job-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    #[test]
    fn a_dribbling_reply_cannot_hold_a_call_past_its_deadline() {
        let d = dir("dribble");
        let sock = d.join("b.sock");
        let server = dribbler(&sock, false);
        let deadline = Instant::now() + Duration::from_millis(400);
        let mut c = JobClient::connect_port_by(&sock, JOB_PORT, Some(deadline)).expect("connect");
        let r = c.call(&HostRequest::PrepareSnapshot);
        drop(c);
        let sent = server.join().expect("server");
        let _ = std::fs::remove_dir_all(&d);
        assert!(matches!(r, Err(JobError::Deadline { .. })), "{r:?}");
        // Each byte came well within a per-read timeout: only the overall deadline ends it.
        assert!(sent < 100, "the client read {sent} bytes");
    }

    #[test]
    fn an_endless_ok_line_cannot_hold_the_connect_past_its_deadline() {
        let d = dir("endless");
        let sock = d.join("b.sock");
        let server = dribbler(&sock, true);
        let deadline = Instant::now() + Duration::from_millis(400);
        let r = JobClient::connect_port_by(&sock, JOB_PORT, Some(deadline)).map(|_| ());
        let sent = server.join().expect("server");
        let _ = std::fs::remove_dir_all(&d);
        assert!(matches!(r, Err(JobError::Deadline { .. })), "{r:?}");
        assert!(sent < 100, "the client read {sent} bytes");
    }
}
