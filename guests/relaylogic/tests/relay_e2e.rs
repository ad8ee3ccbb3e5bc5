//! The relay logic and its TLS sessions end to end on the host: a `Relay` driven the way
//! the firmware drives it (its actions carried out over real loopback TCP with
//! `TlsSession`s, a fake controller answering its vsock requests) against a mock mediation
//! server and a mock cloud server, both rustls TLS 1.3 with pinned P-256 keys.
//!
//! The mediator checks the login proof, welcomes the relay with a 100 ms heartbeat and asks
//! for a tunnel; the cloud server checks the ticket, sends one job with a 100 000-byte
//! document in two chunks, checks `JobAccepted` and `JobResult` (checksums and the
//! document's CRC-32), and closes (the relay answers `Closed` and ends TLS with
//! `close_notify`); the mediator then hears `TunnelAccepted`, `TunnelClosed` with the job
//! id, and the pings.

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use common::{certificate, p256_key, server_config, Pump};
use duplex_link::{decode_body, encode, HostReply, HostRequest, JobInfo, JobState};
use duplex_relay::entropy::RdRand;
use duplex_relay::tls::spki_pin;
use duplex_relay::{Action, ConnId, Peer, Relay, RelayConfig};
use duplex_tunnel::*;
use rcgen::PublicKeyData;
use serde::de::DeserializeOwned;
use serde::Serialize;

const SECRET: [u8; 32] = [0x42; 32];
const TICKET_KEY: [u8; 32] = [0x24; 32];
const DOC_LEN: usize = 100_000;

fn read_frame<T: DeserializeOwned>(s: &mut impl Read) -> Result<T, String> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    decode_body(&body).map_err(|e| e.to_string())
}

fn write_frame<T: Serialize>(s: &mut impl Write, msg: &T) -> Result<(), String> {
    s.write_all(&encode(msg)).map_err(|e| e.to_string())?;
    s.flush().map_err(|e| e.to_string())
}

fn accept_tls(
    listener: TcpListener,
    config: std::sync::Arc<rustls::ServerConfig>,
) -> Result<rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>, String> {
    let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

fn document() -> Vec<u8> {
    (0..DOC_LEN).map(|i| (i * 31 % 256) as u8).collect()
}

/// What the mock mediator heard: pings, `TunnelAccepted`, the `TunnelClosed` job ids.
type MediatorLog = (u64, bool, Vec<String>);

fn mediator(
    listener: TcpListener,
    config: std::sync::Arc<rustls::ServerConfig>,
    cloud_port: u16,
) -> Result<MediatorLog, String> {
    let mut s = accept_tls(listener, config)?;
    match read_frame::<RelayToMediator>(&mut s)? {
        RelayToMediator::Hello {
            version: 1,
            relay_id,
        } if relay_id == "relay-1" => {}
        other => return Err(format!("expected Hello, got {other:?}")),
    }
    let nonce = [7u8; 32];
    write_frame(&mut s, &MediatorToRelay::Challenge { nonce })?;
    match read_frame::<RelayToMediator>(&mut s)? {
        RelayToMediator::Login { proof, devices }
            if verify_login_proof(&SECRET, "relay-1", &nonce, &proof) && devices == ["mfp-1"] => {}
        other => return Err(format!("bad Login: {other:?}")),
    }
    let welcome = MediatorToRelay::Welcome {
        session_id: 1,
        heartbeat_ms: 100,
        heartbeat_timeout_ms: 5000,
    };
    write_frame(&mut s, &welcome)?;
    let ticket = Ticket::sign(
        &TICKET_KEY,
        TicketBody {
            tunnel_id: 1,
            relay_id: "relay-1".into(),
            device_id: "mfp-1".into(),
            nonce: [1; 16],
            expires_ms: u64::MAX,
        },
    );
    let request = MediatorToRelay::TunnelRequest {
        tunnel_id: 1,
        device_id: "mfp-1".into(),
        cloud: Endpoint {
            ip: [127, 0, 0, 1],
            port: cloud_port,
        },
        ticket,
    };
    write_frame(&mut s, &request)?;
    let (mut pings, mut accepted) = (0, false);
    loop {
        match read_frame::<RelayToMediator>(&mut s)? {
            RelayToMediator::Ping { seq } => {
                pings += 1;
                if seq != pings {
                    return Err(format!("ping {seq}, expected {pings}"));
                }
                write_frame(&mut s, &MediatorToRelay::Pong { seq })?;
            }
            RelayToMediator::TunnelAccepted { tunnel_id: 1 } => accepted = true,
            RelayToMediator::TunnelClosed { tunnel_id: 1, jobs } => {
                return Ok((pings, accepted, jobs))
            }
            other => return Err(format!("unexpected {other:?}")),
        }
    }
}

fn cloud(
    listener: TcpListener,
    config: std::sync::Arc<rustls::ServerConfig>,
) -> Result<(), String> {
    let mut s = accept_tls(listener, config)?;
    match read_frame::<RelayToCloud>(&mut s)? {
        RelayToCloud::Dial { version: 1, ticket } => {
            ticket.verify(&TICKET_KEY, 0).map_err(|e| e.to_string())?;
        }
        other => return Err(format!("expected Dial, got {other:?}")),
    }
    write_frame(&mut s, &CloudToRelay::DialOk { tunnel_id: 1 })?;
    let job = CloudToRelay::Job {
        job_id: "job-1".into(),
        device_id: "mfp-1".into(),
        user: "alice".into(),
        pages: 2,
        seed: 7,
        width: 16,
        height: 16,
        document_len: DOC_LEN as u64,
    };
    write_frame(&mut s, &job)?;
    let doc = document();
    for chunk in doc.chunks(MAX_DOCUMENT_CHUNK) {
        let data = CloudToRelay::JobData {
            job_id: "job-1".into(),
            bytes: chunk.to_vec(),
        };
        write_frame(&mut s, &data)?;
    }
    match read_frame::<RelayToCloud>(&mut s)? {
        RelayToCloud::JobAccepted {
            device_job: 1,
            duplicate: false,
            ..
        } => {}
        other => return Err(format!("expected JobAccepted, got {other:?}")),
    }
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(&doc);
    match read_frame::<RelayToCloud>(&mut s)? {
        RelayToCloud::JobResult {
            outcome: JobOutcome::Done,
            checksums,
            document_crc32,
            error: None,
            ..
        } if checksums == [11, 22] && document_crc32 == crc => {}
        other => return Err(format!("bad JobResult: {other:?}")),
    }
    write_frame(&mut s, &CloudToRelay::Close)?;
    match read_frame::<RelayToCloud>(&mut s)? {
        RelayToCloud::Closed { jobs: 1 } => {}
        other => return Err(format!("expected Closed, got {other:?}")),
    }
    // Then the relay ends TLS properly: rustls reads a clean end (close_notify), not an
    // unexpected EOF.
    match s.read(&mut [0u8; 1]) {
        Ok(0) => Ok(()),
        other => Err(format!("expected close_notify, got {other:?}")),
    }
}

/// The fake controller's answer to a request.
fn controller_reply(req: &HostRequest) -> HostReply {
    match req {
        HostRequest::SubmitKeyedJob { key, .. } if key == "job-1" => HostReply::KeyedJobAccepted {
            id: 1,
            duplicate: false,
        },
        HostRequest::JobStatus { id: Some(1) } => HostReply::Jobs(vec![JobInfo {
            id: 1,
            state: JobState::Done,
            pages: 2,
            pages_done: 2,
            checksums: vec![11, 22],
            error: None,
        }]),
        other => HostReply::Error {
            code: 400,
            message: format!("unexpected {other:?}"),
        },
    }
}

#[test]
fn a_job_crosses_from_the_cloud_to_the_controller_and_back() {
    let (mkey, ckey) = (p256_key(), p256_key());
    let (mlisten, clisten) = (
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        TcpListener::bind("127.0.0.1:0").expect("bind"),
    );
    let mport = mlisten.local_addr().expect("addr").port();
    let cport = clisten.local_addr().expect("addr").port();
    let mconfig = server_config(certificate(&mkey), &mkey);
    let cconfig = server_config(certificate(&ckey), &ckey);
    let med = thread::spawn(move || mediator(mlisten, mconfig, cport));
    let cl = thread::spawn(move || cloud(clisten, cconfig));

    let cfg = RelayConfig {
        relay_id: "relay-1".into(),
        secret: SECRET,
        devices: vec!["mfp-1".into()],
        mediator: Endpoint {
            ip: [127, 0, 0, 1],
            port: mport,
        },
        mediator_pin: spki_pin(&mkey.subject_public_key_info()),
        cloud_pin: spki_pin(&ckey.subject_public_key_info()),
        controller_cid: 4,
        backoff_base_ms: 50,
        backoff_max_ms: 1000,
        heartbeat_ms: 30_000,
        heartbeat_timeout_ms: 45_000,
        login_timeout_ms: 10_000,
        ..RelayConfig::default()
    };
    let (mediator_pin, cloud_pin) = (cfg.mediator_pin, cfg.cloud_pin);
    let mut rng = RdRand::new().expect("RDRAND");
    let start = Instant::now();
    let mut relay = Relay::new(cfg, Box::new(move || rng.random()), 0);
    let mut conns: Vec<(ConnId, Pump, bool)> = Vec::new();
    let mut replies: VecDeque<HostReply> = VecDeque::new();
    let mut logs: Vec<String> = Vec::new();
    // Until both servers are done (the mediator returns on `TunnelClosed`).
    while start.elapsed() < Duration::from_secs(30) && !(med.is_finished() && cl.is_finished()) {
        let now = start.elapsed().as_millis() as u64;
        let mut i = 0;
        while i < conns.len() {
            let (id, pump, reported) = &mut conns[i];
            let result = pump.step();
            if !*reported && pump.tls.is_open() {
                *reported = true;
                relay.on_connected(*id, now);
            }
            let data = pump.tls.take_plaintext();
            if !data.is_empty() {
                relay.on_data(*id, &data, now);
            }
            let ended = result.err().or_else(|| pump.tls.ended().map(String::from));
            if let Some(why) = ended {
                relay.on_closed(*id, &why, now);
                conns.remove(i);
                continue;
            }
            i += 1;
        }
        while let Some(r) = replies.pop_front() {
            relay.on_controller_reply(r, now);
        }
        relay.on_tick(now);
        for a in relay.take_actions() {
            match a {
                Action::Dial {
                    conn,
                    endpoint,
                    peer,
                } => {
                    let pin = if peer == Peer::Mediator {
                        mediator_pin
                    } else {
                        cloud_pin
                    };
                    match Pump::connect(endpoint.port, pin) {
                        Ok(p) => conns.push((conn, p, false)),
                        Err(e) => relay.on_closed(conn, &e.to_string(), now),
                    }
                }
                Action::Send { conn, bytes } => {
                    if let Some((_, p, _)) = conns.iter_mut().find(|(c, _, _)| *c == conn) {
                        p.tls.write(&bytes);
                    }
                }
                Action::Close { conn } => {
                    // As the firmware does: the last bytes and close_notify go out first.
                    if let Some(i) = conns.iter().position(|(c, _, _)| *c == conn) {
                        let (_, mut pump, _) = conns.remove(i);
                        pump.tls.close();
                        let until = Instant::now() + Duration::from_secs(2);
                        while pump.tls.ciphertext_pending() > 0 && Instant::now() < until {
                            if pump.step().is_err() {
                                break;
                            }
                        }
                        assert!(pump.tls.ended().is_some());
                    }
                }
                Action::ControllerConnect => relay.on_controller_connected(now),
                Action::ControllerSend(req) => replies.push_back(controller_reply(&req)),
                Action::ControllerClose => {}
                Action::Log(line) => logs.push(line),
                // No sleep_idle_ms= and no segment=: neither comes.
                Action::Sleep | Action::SendMagic { .. } => panic!("unexpected {a:?}"),
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    let cloud_result = cl.join().expect("cloud thread");
    assert_eq!(cloud_result, Ok(()), "relay log: {logs:#?}");
    let (pings, accepted, jobs) = med
        .join()
        .expect("mediator thread")
        .unwrap_or_else(|e| panic!("mediator: {e}; relay log: {logs:#?}"));
    assert!(accepted);
    assert_eq!(jobs, vec!["job-1".to_string()]);
    assert!(
        pings >= 1,
        "no heartbeat in {} ms",
        start.elapsed().as_millis()
    );
    for expected in [
        "session up id=1".to_string(),
        format!("tunnel 1 open to 127.0.0.1:{cport}"),
        "job job-1 done (device job 1, duplicate=false)".to_string(),
        "tunnel 1 closed (1 jobs)".to_string(),
    ] {
        assert!(logs.contains(&expected), "{expected:?} not in {logs:#?}");
    }
}
