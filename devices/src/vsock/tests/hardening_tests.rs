//! Issue 11 (hostile guests and host peers): packets of unknown connections, a flooding
//! partition beside well-behaved ones, the bridge's sockets (mode, live sockets, impostors),
//! `EMFILE` on accept and the cap on host connections.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};

use super::host_tests::{connected, host_connect, read_all, read_line};
use super::*;
use crate::event_loop::EventLoop;
use crate::vsock::packet::{op, HOST_CID};

const WAIT: Duration = Duration::from_secs(5);

/// Sends every header in `hdrs` (no payload but on RW: 16 bytes), in batches of 128 chains
/// per notification, and waits until the device has used them all.
fn flood(g: &mut MockGuest, hdrs: &[Hdr]) {
    for batch in hdrs.chunks(128) {
        for h in batch {
            let mut h = *h;
            let data: &[u8] = if h.op == op::RW { &[0x66; 16] } else { &[] };
            h.len = data.len() as u32;
            let ha = g.alloc(HDR_SIZE as u32);
            g.mem.write_slice(&h.to_bytes(), GuestAddress(ha)).unwrap();
            let mut descs = vec![(ha, HDR_SIZE as u32, 0)];
            if !data.is_empty() {
                let da = g.alloc(data.len() as u32);
                g.mem.write_slice(data, GuestAddress(da)).unwrap();
                descs.push((da, data.len() as u32, 0));
            }
            g.push_chain(1, &descs);
        }
        g.notify(1);
        let mut used = 0;
        assert!(
            wait_until(WAIT, || {
                used += g.pop_used(1).len();
                used == batch.len()
            }),
            "the device used {used} of {} chains",
            batch.len()
        );
    }
}

#[test]
fn packets_of_unknown_connections_get_an_rst_and_are_not_forwarded() {
    let sw = VsockSwitch::new().unwrap();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    a.add_rx(64, 4096);
    b.add_rx(64, 4096);
    let junk: Vec<Hdr> = [op::RW, op::CREDIT_UPDATE, op::CREDIT_REQUEST, op::SHUTDOWN]
        .into_iter()
        .enumerate()
        .flat_map(|(i, o)| (0..5u32).map(move |p| hdr(ep(3, 100 * i as u32 + p), ep(4, 80), o)))
        .collect();
    flood(&mut a, &junk);
    // An RST for an unknown connection is dropped, not answered.
    flood(&mut a, &[hdr(ep(3, 999), ep(4, 80), op::RST)]);
    assert!(b.recv().is_empty(), "B saw none of the junk");
    let got = a.recv();
    assert_eq!(got.len(), junk.len(), "one RST per junk packet");
    for ((h, _), j) in got.iter().zip(&junk) {
        assert_eq!((h.op, h.src(), h.dst()), (op::RST, j.dst(), j.src()));
    }
    let st = sw.stats();
    assert_eq!(st.connections, 0);
    assert_eq!(st.counters.rst_sent, junk.len() as u64);
    assert_eq!(st.counters.rst_unknown, junk.len() as u64 + 1);
    // A REQUEST is still forwarded: the peer answers for itself.
    flood(&mut a, &[hdr(ep(3, 7), ep(4, 81), op::REQUEST)]);
    assert_eq!(b.recv()[0].0.op, op::REQUEST);
}

/// A floods B with junk (RW and credit packets of connections that do not exist, REQUESTs
/// from many source ports) while C sends to B over an established connection. B takes few
/// RX buffers per round. C's share of them must not depend on how much A sends.
#[test]
fn a_flooding_partition_cannot_hold_back_another_partitions_traffic() {
    let sw = VsockSwitch::new().unwrap();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    let mut c = MockGuest::new(&sw, 5, None);
    a.recycle = false; // A never drains the RSTs it earns.
    c.add_rx(16, 4096);
    b.recycle = false;
    b.add_rx(1, 4096);
    let (cc, sb) = (ep(5, 2000), ep(4, 80));
    assert!(c.send(hdr(cc, sb, op::REQUEST), &[]));
    assert_eq!(b.recv().len(), 1);
    assert!(b.send(hdr(sb, cc, op::RESPONSE), &[]));
    assert_eq!(c.recv().len(), 1);

    const ROUNDS: u32 = 8;
    const BUFS: usize = 8;
    let mut c_total = 0;
    for round in 0..ROUNDS {
        let base = 10_000 + round * 1000;
        let mut junk = Vec::new();
        for i in 0..100 {
            junk.push(hdr(ep(3, base + i), ep(4, 80 + i % 7), op::RW));
            junk.push(hdr(ep(3, base + i), ep(4, 80), op::CREDIT_UPDATE));
            junk.push(hdr(ep(3, base + 500 + i), ep(4, 1000 + i), op::REQUEST));
        }
        flood(&mut a, &junk);
        for _ in 0..BUFS {
            assert!(c.send(hdr(cc, sb, op::RW), &[0x43; 100]));
        }
        b.add_rx(BUFS, 4096);
        let got = b.recv();
        assert_eq!(got.len(), BUFS, "round {round}: B's buffers were all used");
        let from_c = got.iter().filter(|(h, _)| h.src() == cc).count();
        // Two sources wait for B (A and C): C gets at least every other buffer.
        assert!(
            from_c >= BUFS / 2,
            "round {round}: C got {from_c} of B's {BUFS} buffers"
        );
        assert!(
            got.iter()
                .all(|(h, _)| h.src() == cc || h.op == op::REQUEST),
            "round {round}: nothing but A's REQUESTs reaches B from A"
        );
        c_total += from_c;
    }
    assert!(c_total >= ROUNDS as usize * BUFS / 2);
    let st = sw.stats();
    assert!(
        st.connection_list.iter().any(|c| c.client == cc),
        "C's connection survived"
    );
}

#[test]
fn uds_listeners_are_private() {
    let dir = temp_dir("mode");
    let uds = dir.join("g.vsock");
    let sw = VsockSwitch::new().unwrap();
    let _g = MockGuest::new(&sw, 3, Some(uds.clone()));
    let mode = std::fs::metadata(&uds).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "uds mode {mode:o}");
    // A mode from the config.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let shared = dir.join("shared.vsock");
    let cfg = |mode| crate::vsock::UdsConfig {
        path: Some(shared.clone()),
        mode: Some(mode),
    };
    let _m = sw
        .attach_with(4, "p4", mem.clone(), irq(), cfg(0o660))
        .unwrap();
    let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o660, "uds mode {mode:o}");
    let e = sw
        .attach_with(5, "p5", mem, irq(), cfg(0o4777))
        .unwrap_err();
    assert!(
        matches!(e, crate::vsock::VsockError::UdsMode(0o4777)),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_live_socket_is_never_unlinked() {
    let dir = temp_dir("live");
    let uds = dir.join("g.vsock");
    let other = UnixListener::bind(&uds).unwrap();
    let sw = VsockSwitch::new().unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let r = sw.attach(3, "p3", mem.clone(), irq(), Some(uds.clone()));
    let e = r.expect_err("a live socket is in use");
    assert!(e.to_string().contains("in use by another process"), "{e}");
    // The other monitor's socket still works (it saw the switch's probe first).
    let mut c = UnixStream::connect(&uds).expect("still there");
    let (probe, _) = other.accept().unwrap();
    assert_eq!(read_all(&probe), b"", "the probe only connected");
    let (mut s, _) = other.accept().unwrap();
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    // A symlink to a socket is not a socket: refused, left alone.
    let link = dir.join("link.vsock");
    std::os::unix::fs::symlink(&uds, &link).unwrap();
    let r = sw.attach(3, "p3", mem, irq(), Some(link.clone()));
    assert!(r.is_err());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether this test process runs as root (chown and mode tests need it).
fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn guest_connections_refuse_impostor_sockets() {
    if !is_root() {
        eprintln!("SKIPPED guest_connections_refuse_impostor_sockets: needs root for chown");
        return;
    }
    let dir = temp_dir("impostor");
    let uds = dir.join("g.vsock");
    let sw = VsockSwitch::new().unwrap();
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    g.add_rx(16, 4096);
    let hp = |p| ep(HOST_CID, p);
    // Another user's socket at <uds>_5000.
    let path = dir.join("g.vsock_5000");
    let _l = UnixListener::bind(&path).unwrap();
    std::os::unix::fs::chown(&path, Some(12345), Some(12345)).unwrap();
    assert!(g.send(hdr(ep(3, 1), hp(5000), op::REQUEST), &[]));
    assert_eq!(
        g.recv()[0].0.op,
        op::RST,
        "another user's socket is refused"
    );
    // Our socket, in a directory anybody may write to (not sticky): refused.
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sw2 = VsockSwitch::new().unwrap();
    let mut g2 = MockGuest::new(&sw2, 4, Some(open.join("h.vsock")));
    g2.add_rx(16, 4096);
    let _l2 = UnixListener::bind(open.join("h.vsock_6000")).unwrap();
    assert!(g2.send(hdr(ep(4, 1), hp(6000), op::REQUEST), &[]));
    assert_eq!(g2.recv()[0].0.op, op::RST, "world-writable directory");
    // The same, sticky (as /tmp): our own socket is accepted.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    assert!(g2.send(hdr(ep(4, 2), hp(6000), op::REQUEST), &[]));
    assert_eq!(
        g2.recv()[0].0.op,
        op::RESPONSE,
        "sticky directory, our socket"
    );
    // Our socket in a private directory: accepted.
    let _l3 = UnixListener::bind(dir.join("g.vsock_5001")).unwrap();
    assert!(g.send(hdr(ep(3, 2), hp(5001), op::REQUEST), &[]));
    assert_eq!(g.recv()[0].0.op, op::RESPONSE);
    assert_eq!(sw.stats().counters.untrusted_sockets, 1);
    assert_eq!(sw2.stats().counters.untrusted_sockets, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `name` (a test of this module) alone in a child process with `ENV` set: for tests
/// that change process-wide limits.
fn in_child(name: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            &format!("vsock::tests::hardening_tests::{name}"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child test failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran the test:\n{text}");
}

const CHILD_ENV: &str = "DUPLEX_VSOCK_TEST_CHILD";

/// `accept` failing with `EMFILE` must not make the level-triggered loop spin.
#[test]
fn emfile_on_accept_backs_off_instead_of_spinning() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return in_child("emfile_on_accept_backs_off_instead_of_spinning");
    }
    let dir = temp_dir("emfile");
    let uds = dir.join("g.vsock");
    let el = EventLoop::start("vsock-emfile").unwrap();
    let sw = VsockSwitch::on_loop(&el).unwrap();
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    g.add_rx(8, 4096);
    // Queue a connection while the switch is frozen (the loop leaves the listener alone),
    // then use up every fd the process may have.
    let freeze = sw.freeze();
    let mut host = host_connect(&uds);
    host.write_all(b"CONNECT 80\n").unwrap();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct; results checked.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        let low = libc::rlimit {
            rlim_cur: 512,
            rlim_max: lim.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0);
    }
    let mut hog = Vec::new();
    for _ in 0..1024 {
        match std::fs::File::open("/dev/null") {
            Ok(f) => hog.push(f),
            Err(_) => break,
        }
    }
    assert!(std::fs::File::open("/dev/null").is_err(), "fds exhausted");
    let before = el.stats().wakeups;
    drop(freeze);
    std::thread::sleep(Duration::from_millis(400));
    let wakes = el.stats().wakeups - before;
    assert!(
        wakes < 40,
        "the loop woke {wakes} times in 400 ms: it spins"
    );
    // With fds again, the connection is accepted.
    drop(hog);
    let got = g.recv_wait(1, WAIT);
    assert_eq!(got.first().map(|(h, _)| h.op), Some(op::REQUEST));
    let backoffs = sw.stats().counters.accept_backoffs;
    assert!((1..10).contains(&backoffs), "{backoffs} back-offs");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn host_connections_beyond_the_cap_get_err_busy() {
    let dir = temp_dir("busy");
    let uds = dir.join("g.vsock");
    let sw = VsockSwitch::new().unwrap();
    let mut g = MockGuest::new(&sw, 3, Some(uds.clone()));
    g.add_rx(32, 4096);
    let cap = crate::vsock::MAX_HOST_SOCKS_PER_CID as u32;
    let mut open = Vec::new();
    for i in 0..cap {
        open.push(connected(&mut g, &uds, 1000 + i));
    }
    let mut extra = host_connect(&uds);
    let _ = extra.write_all(b"CONNECT 80\n");
    assert_eq!(read_line(&extra), "ERR busy\n");
    assert_eq!(read_all(&extra), b"");
    assert_eq!(sw.stats().counters.host_busy, 1);
    // Below the cap again, a connection is accepted.
    let (last, hep) = open.pop().unwrap();
    drop(last);
    let got = g.recv_wait(1, WAIT);
    assert_eq!((got[0].0.op, got[0].0.src()), (op::SHUTDOWN, hep));
    assert!(g.send(hdr(got[0].0.dst(), hep, op::RST), &[]));
    let (_again, _) = connected(&mut g, &uds, 80);
    drop(open);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One notify takes at most one budget of chains from a TX queue; the device event loop
/// takes the rest, in order.
#[test]
fn a_notify_takes_one_budget_and_the_loop_takes_the_rest() {
    let sw = VsockSwitch::new().unwrap();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    a.add_rx(4, 4096);
    b.add_rx(1, 4096);
    let (ca, sb) = (ep(3, 1), ep(4, 80));
    assert!(a.send(hdr(ca, sb, op::REQUEST), &[]));
    assert_eq!(b.recv().len(), 1);
    let n = 3 * crate::vsock::TX_BUDGET_CHAINS + 10;
    let hdrs: Vec<Hdr> = (0..n)
        .map(|i| {
            let mut h = hdr(ca, sb, op::CREDIT_UPDATE);
            h.fwd_cnt = i as u32;
            h
        })
        .collect();
    flood(&mut a, &hdrs);
    let st = sw.stats();
    assert!(st.counters.tx_deferred >= 2, "{:?}", st.counters);
    assert_eq!(st.counters.tx_packets, n as u64 + 1);
    b.recycle = true;
    b.add_rx(64, 4096);
    let mut got = Vec::new();
    wait_until(WAIT, || {
        got.extend(b.recv());
        got.len() == n
    });
    let order: Vec<u32> = got.iter().map(|(h, _)| h.fwd_cnt).collect();
    assert_eq!(order, (0..n as u32).collect::<Vec<_>>(), "in order");
}
