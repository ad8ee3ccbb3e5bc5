//! The host bridge end to end, with real Unix sockets: `CONNECT`, guest-initiated
//! connections to `<uds>_<port>`, error lines, timeouts, credit flow control, detach.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use super::*;
use crate::vsock::packet::{op, HOST_CID, SHUTDOWN_F_RECEIVE, SHUTDOWN_F_SEND, TYPE_STREAM};
use crate::vsock::{VsockError, HOST_BUF_ALLOC};

const WAIT: Duration = Duration::from_secs(5);

pub(super) fn host_connect(uds: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(uds).expect("connect to uds");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

pub(super) fn read_line(s: &UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// Reads until EOF (or an error after the data, e.g. a reset).
pub(super) fn read_all(mut s: &UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        v.extend_from_slice(&buf[..n]);
    }
    v
}

/// A host program connects with `CONNECT port` and the guest accepts: returns the host
/// stream and the host endpoint the guest sees.
pub(super) fn connected(
    g: &mut MockGuest,
    uds: &std::path::Path,
    port: u32,
) -> (UnixStream, Endpoint) {
    let mut host = host_connect(uds);
    host.write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let got = g.recv_wait(1, WAIT);
    assert_eq!(got.len(), 1, "the guest sees the REQUEST");
    let req = got[0].0;
    assert_eq!((req.op, req.type_), (op::REQUEST, TYPE_STREAM));
    assert_eq!((req.src_cid, req.dst()), (HOST_CID, ep(g.cid, port)));
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.buf_alloc, HOST_BUF_ALLOC);
    let mut resp = hdr(req.dst(), req.src(), op::RESPONSE);
    resp.buf_alloc = 1 << 20;
    assert!(g.send(resp, &[]));
    assert_eq!(read_line(&host), format!("OK {}\n", req.src_port));
    (host, req.src())
}

#[test]
fn connect_then_bytes_both_ways_then_close() {
    let dir = temp_dir("e2e");
    let uds = dir.join("g.vsock");
    let sw = VsockSwitch::new().unwrap();
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    g.add_rx(16, 4096);
    let (mut host, hep) = connected(&mut g, &uds, 1234);
    let gep = ep(3, 1234);

    host.write_all(b"hello from the host").unwrap();
    let got = g.recv_wait(1, WAIT);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.src(), got[0].0.dst()),
        (op::RW, hep, gep)
    );
    assert_eq!(got[0].1, b"hello from the host");
    assert!(g.wakes.load(Ordering::SeqCst) > 0);

    assert!(g.send(hdr(gep, hep, op::RW), b"hello from the guest"));
    let mut buf = [0u8; 20];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello from the guest");
    let st = sw.stats();
    assert_eq!(st.connections, 1);
    assert_eq!(st.counters.host_connections, 1);
    assert_eq!(st.connection_list[0].bytes_to_server, 19);
    assert_eq!(st.connection_list[0].bytes_to_client, 20);

    // The host closes: the guest is told nobody sends or receives any more; its RST ends it.
    drop(host);
    let got = g.recv_wait(2, WAIT);
    let flags: u32 = got
        .iter()
        .filter(|(h, _)| h.op == op::SHUTDOWN)
        .fold(0, |f, (h, _)| f | h.flags);
    assert_eq!(flags, SHUTDOWN_F_SEND | SHUTDOWN_F_RECEIVE);
    assert!(g.send(hdr(gep, hep, op::RST), &[]));
    assert_eq!(sw.stats().connections, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn host_to_guest_respects_the_guest_credit() {
    let dir = temp_dir("credit");
    let uds = dir.join("g.vsock");
    let sw = VsockSwitch::new().unwrap();
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    g.add_rx(16, 4096);
    let mut host = host_connect(&uds);
    host.write_all(b"CONNECT 80\n").unwrap();
    let req = g.recv_wait(1, WAIT)[0].0;
    let (gep, hep) = (req.dst(), req.src());
    let mut resp = hdr(gep, hep, op::RESPONSE);
    resp.buf_alloc = 1000;
    assert!(g.send(resp, &[]));
    assert_eq!(read_line(&host), format!("OK {}\n", hep.port));
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 241) as u8).collect();
    host.write_all(&data).unwrap();

    let mut got = Vec::new();
    for round in 1..=3usize {
        // Exactly the credit arrives, then a request for more, then nothing.
        let mut asked = false;
        wait_until(WAIT, || {
            for (h, d) in g.recv() {
                match h.op {
                    op::RW => got.extend_from_slice(&d),
                    op::CREDIT_REQUEST => asked = true,
                    other => panic!("unexpected op {other}"),
                }
            }
            asked && got.len() == 1000 * round
        });
        assert_eq!(got.len(), 1000 * round, "round {round}");
        assert!(asked, "the switch asks for credit when it runs out");
        std::thread::sleep(Duration::from_millis(50));
        assert!(g.recv().is_empty(), "nothing beyond the credit");
        let mut upd = hdr(gep, hep, op::CREDIT_UPDATE);
        upd.buf_alloc = 1000;
        upd.fwd_cnt = (1000 * round) as u32;
        assert!(g.send(upd, &[]));
    }
    assert!(got == data);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn guest_shutdown_closes_the_host_side_cleanly() {
    let dir = temp_dir("shut");
    let uds = dir.join("g.vsock");
    let sw = VsockSwitch::new().unwrap();
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    g.add_rx(16, 4096);
    let (host, hep) = connected(&mut g, &uds, 80);
    let gep = ep(3, 80);
    assert!(g.send(hdr(gep, hep, op::RW), b"last words"));
    let mut shut = hdr(gep, hep, op::SHUTDOWN);
    shut.flags = SHUTDOWN_F_SEND | SHUTDOWN_F_RECEIVE;
    assert!(g.send(shut, &[]));
    // The host gets everything, then EOF; the guest gets the RST that completes its close.
    assert_eq!(read_all(&host), b"last words");
    let got = g.recv_wait(1, WAIT);
    assert_eq!(got.last().map(|(h, _)| h.op), Some(op::RST));
    assert_eq!(sw.stats().connections, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_connect_lines_get_an_error_line_and_are_closed() {
    let dir = temp_dir("badline");
    let uds = dir.join("g.vsock");
    let sw = VsockSwitch::new().unwrap();
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    g.add_rx(4, 4096);
    for line in [
        &b"CONNECT abc\n"[..],
        b"HELLO 5\n",
        b"CONNECT 99999999999\n",
    ] {
        let mut host = host_connect(&uds);
        host.write_all(line).unwrap();
        assert_eq!(read_all(&host), b"ERR malformed CONNECT line\n");
    }
    // No newline within 64 bytes.
    let mut host = host_connect(&uds);
    host.write_all(&[b'C'; 100]).unwrap_or_default();
    assert_eq!(read_all(&host), b"ERR malformed CONNECT line\n");
    assert!(g.recv().is_empty(), "the guest saw nothing");
    assert_eq!(sw.stats().counters.host_errors, 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refused_and_unanswered_connects_are_reported_to_the_host() {
    let dir = temp_dir("refused");
    let uds = dir.join("g.vsock");
    let sw = VsockSwitch::new().unwrap();
    sw.set_connect_timeout(Duration::from_millis(200));
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    g.add_rx(8, 4096);

    // Nobody listens on port 81: the guest's stack answers RST.
    let mut host = host_connect(&uds);
    host.write_all(b"CONNECT 81\n").unwrap();
    let req = g.recv_wait(1, WAIT)[0].0;
    assert!(g.send(hdr(req.dst(), req.src(), op::RST), &[]));
    assert_eq!(read_all(&host), b"ERR connection refused\n");

    // The guest never answers: timeout, and the guest's pending REQUEST is cancelled.
    let mut host = host_connect(&uds);
    host.write_all(b"CONNECT 82\n").unwrap();
    let req = g.recv_wait(1, WAIT)[0].0;
    assert_eq!(read_all(&host), b"ERR timeout\n");
    let got = g.recv_wait(1, WAIT);
    assert_eq!((got[0].0.op, got[0].0.src()), (op::RST, req.src()));

    // A host that never sends its line times out too.
    let host = host_connect(&uds);
    assert_eq!(read_all(&host), b"ERR timeout\n");
    let st = sw.stats();
    assert_eq!(st.counters.host_errors, 3);
    assert_eq!(st.connections, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn guest_connects_to_host_port_through_uds_suffix() {
    let dir = temp_dir("g2h");
    let uds = dir.join("g.vsock");
    let sw = VsockSwitch::new().unwrap();
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    let mut plain = MockGuest::new(&sw, 4, None);
    g.add_rx(8, 4096);
    plain.add_rx(4, 4096);
    let listener = UnixListener::bind(dir.join("g.vsock_5000")).unwrap();
    let (gep, hep) = (ep(3, 7000), ep(HOST_CID, 5000));

    assert!(g.send(hdr(gep, hep, op::REQUEST), &[]));
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.src(), got[0].0.dst()),
        (op::RESPONSE, hep, gep)
    );
    assert_eq!(got[0].0.buf_alloc, HOST_BUF_ALLOC);
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    assert!(g.send(hdr(gep, hep, op::RW), b"to the host"));
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to the host");
    s.write_all(b"to the guest").unwrap();
    let got = g.recv_wait(1, WAIT);
    assert_eq!(got[0].1, b"to the guest");

    // No socket for port 5001, and no uds at all for CID 4: RST.
    assert!(g.send(hdr(ep(3, 7001), ep(HOST_CID, 5001), op::REQUEST), &[]));
    assert_eq!(g.recv()[0].0.op, op::RST);
    assert!(plain.send(hdr(ep(4, 1), ep(HOST_CID, 5000), op::REQUEST), &[]));
    assert_eq!(plain.recv()[0].0.op, op::RST);
    let st = sw.stats();
    assert_eq!(st.counters.host_connections, 1);
    assert_eq!(st.counters.host_errors, 2);
    assert_eq!(st.connections, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `data[sent..]` from the guest to the host within the credit the switch gives
/// (`credit` = its last buf_alloc and fwd_cnt); stops when no credit came for `idle`.
/// Returns how much of `data` was sent in all, and the last credit.
fn send_with_credit(
    g: &mut MockGuest,
    sw: &VsockSwitch,
    (gep, hep): (Endpoint, Endpoint),
    data: &[u8],
    mut sent: usize,
    mut credit: (u32, u32),
    idle: Duration,
) -> (usize, (u32, u32)) {
    let mut last_progress = Instant::now();
    let mut asked = false;
    while sent < data.len() && last_progress.elapsed() < idle {
        for (h, _) in g.recv() {
            if h.src() == hep {
                credit = (h.buf_alloc, h.fwd_cnt);
            }
        }
        let free = credit
            .0
            .saturating_sub((sent as u32).wrapping_sub(credit.1)) as usize;
        if free == 0 {
            if !asked && last_progress.elapsed() > idle / 2 {
                assert!(g.send(hdr(gep, hep, op::CREDIT_REQUEST), &[]));
                asked = true;
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let n = free.min(16 * 1024).min(data.len() - sent);
        assert!(g.send(hdr(gep, hep, op::RW), &data[sent..sent + n]));
        sent += n;
        last_progress = Instant::now();
        asked = false;
        let buffered = sw.stats().host_buffered_bytes;
        assert!(
            buffered <= HOST_BUF_ALLOC as usize,
            "monitor buffers {buffered}"
        );
    }
    (sent, credit)
}

#[test]
fn slow_host_reader_bounds_what_the_monitor_buffers() {
    let dir = temp_dir("slow");
    let uds = dir.join("g.vsock");
    let sw = VsockSwitch::new().unwrap();
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    g.add_rx(32, 4096);
    let (host, hep) = connected(&mut g, &uds, 90);
    let gep = ep(3, 90);
    let data: Vec<u8> = (0..2 << 20).map(|i: usize| (i % 253) as u8).collect();

    // The host does not read: the guest runs out of credit.
    let credit = (HOST_BUF_ALLOC, 0);
    let (sent, credit) = send_with_credit(
        &mut g,
        &sw,
        (gep, hep),
        &data,
        0,
        credit,
        Duration::from_millis(400),
    );
    let buffered = sw.stats().host_buffered_bytes;
    // The guest used all the credit: the monitor holds exactly what it advertised.
    assert_eq!(buffered, HOST_BUF_ALLOC as usize);
    assert!(sent > HOST_BUF_ALLOC as usize, "the socket took some");
    assert!(sent < data.len(), "the guest was stopped by credit");
    // fwd_cnt counts only what the host socket accepted.
    assert_eq!(credit.1 as usize, sent - buffered);

    // The host reads now: everything arrives, byte-exact, as credit comes back.
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 2 << 20];
        (&host).read_exact(&mut got).map(|_| got)
    });
    let (total, _) = send_with_credit(
        &mut g,
        &sw,
        (gep, hep),
        &data,
        sent,
        credit,
        Duration::from_secs(5),
    );
    assert_eq!(total, data.len());
    let got = reader.join().unwrap().expect("host read");
    assert!(got == data, "byte-exact transfer");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn guest_beyond_credit_is_reset() {
    let dir = temp_dir("violate");
    let uds = dir.join("g.vsock");
    let sw = VsockSwitch::new().unwrap();
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    g.add_rx(32, 4096);
    let (host, hep) = connected(&mut g, &uds, 91);
    let gep = ep(3, 91);
    // Ignore credit entirely: 64 KiB packets until the switch resets the connection.
    let chunk = vec![0x5a; 64 * 1024];
    let mut sent = 0;
    let mut reset = false;
    for _ in 0..64 {
        assert!(g.send(hdr(gep, hep, op::RW), &chunk));
        sent += chunk.len();
        if g.recv().iter().any(|(h, _)| h.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "reset after {sent} bytes");
    let st = sw.stats();
    assert_eq!(st.counters.credit_violations, 1);
    assert_eq!(st.connections, 0);
    assert_eq!(st.host_buffered_bytes, 0);
    // The host got a prefix of the stream, then EOF.
    let got = read_all(&host);
    assert!(got.len() < sent && got.iter().all(|&b| b == 0x5a));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn detach_closes_host_connections_and_removes_the_socket() {
    let dir = temp_dir("detach");
    let uds = dir.join("g.vsock");
    // A stale socket file is replaced; a regular file is refused.
    drop(UnixListener::bind(&uds).unwrap());
    let sw = VsockSwitch::new().unwrap();
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    g.add_rx(8, 4096);
    let (host, _) = connected(&mut g, &uds, 80);
    sw.detach(3);
    assert_eq!(read_all(&host), b"", "EOF for the host");
    assert!(!uds.exists());
    assert_eq!(sw.stats().connections, 0);

    let file = dir.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let r = sw.attach(5, "x", g.mem.clone(), irq(), Some(file.clone()));
    assert!(matches!(r, Err(VsockError::UdsNotSocket(_))));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // The CID comes back with its socket.
    let _g2 = MockGuest::new(&sw, 3, Some(uds.clone()));
    assert!(uds.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
