//! Snapshots with host connections (real Unix sockets): an in-process reboot keeps the open,
//! unchanged host sockets with their credit and buffered bytes; connections whose socket
//! went away or moved on since the cut, and sockets opened after it, are reset; a restore
//! in a new process resets every host connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use super::host_tests::{connected, host_connect, read_all};
use super::persist_tests::Rig;
use super::*;
use crate::vsock::packet::{op, HOST_CID, SHUTDOWN_F_SEND};
use crate::vsock::HOST_BUF_ALLOC;

const WAIT: Duration = Duration::from_secs(5);

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 13 + i / 509) as u8).collect()
}

/// Everything `g` received, until `done` holds for it.
fn recv_until(
    g: &mut MockGuest,
    mut done: impl FnMut(&[(Hdr, Vec<u8>)]) -> bool,
) -> Vec<(Hdr, Vec<u8>)> {
    let mut got = Vec::new();
    wait_until(WAIT, || {
        got.extend(g.recv());
        done(&got)
    });
    got
}

fn rw_from(got: &[(Hdr, Vec<u8>)], src: Endpoint) -> Vec<u8> {
    got.iter()
        .filter(|(h, _)| h.op == op::RW && h.src() == src)
        .flat_map(|(_, d)| d.clone())
        .collect()
}

fn ops_from(got: &[(Hdr, Vec<u8>)], src: Endpoint) -> Vec<u16> {
    got.iter()
        .filter(|(h, _)| h.src() == src)
        .map(|(h, _)| h.op)
        .collect()
}

/// The partition A (CID 3) with a host program connected to its port 80.
struct HostRig {
    rig: Rig,
    dir: PathBuf,
    host: UnixStream,
    hep: Endpoint,
    gep: Endpoint,
}

impl Persist for HostRig {
    type State = <Rig as Persist>::State;
    type ConstructorArgs = (super::persist_tests::RigArgs, PathBuf, UnixStream, Endpoint);
    type Error = VsockError;

    fn save(&self) -> Result<Self::State, VsockError> {
        self.rig.save()
    }

    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, VsockError> {
        let (rig_args, dir, host, hep) = args;
        Ok(HostRig {
            rig: Rig::restore(rig_args, state)?,
            dir,
            host,
            hep,
            gep: ep(3, 80),
        })
    }
}

const BIG: usize = HOST_BUF_ALLOC as usize;

/// Host and guest exchange a few bytes, then the guest sends its whole credit (256 KiB)
/// to a host that does not read: part of it waits in the monitor at the cut.
fn host_link_with_buffered_bytes() -> HostRig {
    let dir = temp_dir("persist-keep");
    let uds = dir.join("a.vsock");
    let mut rig = Rig::new(&[(3, Some(uds.clone()))]);
    let g = &mut rig.guests[0];
    g.add_rx(16, 4096);
    let (mut host, hep) = connected(g, &uds, 80);
    let gep = ep(3, 80);
    host.write_all(b"h2g-1").unwrap();
    assert_eq!(
        rw_from(&recv_until(g, |got| !got.is_empty()), hep),
        b"h2g-1"
    );
    let data = pattern(BIG);
    for chunk in data.chunks(64 * 1024) {
        assert!(g.send(hdr(gep, hep, op::RW), chunk));
    }
    let buffered = rig.sw.stats().host_buffered_bytes;
    assert!(buffered > 0, "the host socket did not take it all");
    HostRig {
        rig,
        dir,
        host,
        hep,
        gep,
    }
}

crate::persist_round_trip!(
    host_link_round_trip_in_process,
    HostRig,
    make: host_link_with_buffered_bytes,
    mutate: |_: &mut HostRig| {},
    args: |h: &mut HostRig| {
        let host = h.host.try_clone().unwrap();
        (h.rig.in_process_args(), h.dir.clone(), host, h.hep)
    },
    check: |_original: HostRig, mut r: HostRig| {
        let (hep, gep) = (r.hep, r.gep);
        // The host reads the guest's 256 KiB, each byte once, in order.
        let mut got = vec![0u8; BIG];
        r.host.read_exact(&mut got).unwrap();
        assert!(got == pattern(BIG), "no byte lost or duplicated");
        let g = &mut r.rig.guests[0];
        // The credit goes on from the saved counters: all 256 KiB forwarded.
        std::thread::sleep(Duration::from_millis(20));
        g.recv();
        assert!(g.send(hdr(gep, hep, op::CREDIT_REQUEST), &[]));
        let seen = recv_until(g, |got| !got.is_empty());
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].0.op, seen[0].0.fwd_cnt), (op::CREDIT_UPDATE, BIG as u32));
        assert!(g.send(hdr(gep, hep, op::RW), b"g2h-2"));
        let mut more = [0u8; 5];
        r.host.read_exact(&mut more).unwrap();
        assert_eq!(&more, b"g2h-2");
        r.host.write_all(b"h2g-2").unwrap();
        let got = recv_until(g, |got| !got.is_empty());
        assert_eq!(rw_from(&got, hep), b"h2g-2");
        let st = r.rig.sw.stats();
        assert_eq!(st.connection_list[0].bytes_to_client, (BIG + 5) as u64);
        assert_eq!(st.connection_list[0].bytes_to_server, 10);
        let _ = std::fs::remove_dir_all(&r.dir);
    },
);

#[test]
fn in_process_reboot_keeps_open_host_sockets_and_resets_the_rest() {
    let dir = temp_dir("persist-reboot");
    let uds = dir.join("a.vsock");
    let mut rig = Rig::new(&[(3, Some(uds.clone())), (4, None)]);
    let (ca, sb) = (ep(3, 1000), ep(4, 80));
    let (h1, hep1, h2, hep2) = {
        let [a, b] = &mut rig.guests[..] else {
            unreachable!()
        };
        a.add_rx(16, 4096);
        b.add_rx(16, 4096);
        assert!(a.send(hdr(ca, sb, op::REQUEST), &[]));
        assert!(b.send(hdr(sb, ca, op::RESPONSE), &[]));
        assert_eq!(b.recv().len(), 1);
        assert_eq!(a.recv()[0].0.op, op::RESPONSE);
        let (mut h1, hep1) = connected(a, &uds, 81);
        let (h2, hep2) = connected(a, &uds, 82);
        h1.write_all(b"one").unwrap();
        assert_eq!(rw_from(&recv_until(a, |g| !g.is_empty()), hep1), b"one");
        (h1, hep1, h2, hep2)
    };

    // The cut: switch, devices and guest memory, frozen.
    let frozen = rig.sw.freeze();
    let state = rig.save().unwrap();
    let images: Vec<GuestImage> = rig.guests.iter().map(MockGuest::image).collect();
    drop(frozen);

    // The partitions run on: H2's program exits, H3 connects.
    drop(h2);
    let a = &mut rig.guests[0];
    let got = recv_until(a, |g| {
        g.iter()
            .filter(|(h, _)| h.src() == hep2 && h.op == op::SHUTDOWN)
            .fold(0, |f, (h, _)| f | h.flags)
            == 3
    });
    assert!(ops_from(&got, hep2).contains(&op::SHUTDOWN));
    std::thread::sleep(Duration::from_millis(20));
    let late = a.recv();
    assert!(late.is_empty(), "{late:?}");
    let (h3, _) = connected(a, &uds, 83);

    // The reboot: frozen, detached quietly, memory back to the cut, restored.
    let frozen = rig.sw.freeze();
    for g in &rig.guests {
        rig.sw.detach_quiet(g.cid);
    }
    for (g, img) in rig.guests.iter_mut().zip(&images) {
        g.load_image(img);
    }
    rig.sw.restore_state(&state.switch, true).unwrap();
    for (g, s) in rig.guests.iter_mut().zip(&state.devices) {
        let uds = (g.cid == 3).then(|| uds.clone());
        g.restore_on(&rig.sw, s, uds).unwrap();
    }
    drop(frozen);

    let [a, b] = &mut rig.guests[..] else {
        unreachable!()
    };
    // H2's connection (its socket is gone) is reset; A never hears of H3, whose socket is
    // closed.
    let got = recv_until(a, |g| !ops_from(g, hep2).is_empty());
    assert_eq!(ops_from(&got, hep2), vec![op::RST]);
    assert!(got.iter().all(|(h, _)| h.src() == hep2));
    h3.set_read_timeout(Some(WAIT)).unwrap();
    assert!(read_all(&h3).is_empty(), "H3 is closed");
    // H1 goes on, both ways.
    let mut h1 = h1;
    h1.write_all(b"two").unwrap();
    assert_eq!(rw_from(&recv_until(a, |g| !g.is_empty()), hep1), b"two");
    assert!(a.send(hdr(ep(3, 81), hep1, op::RW), b"back"));
    let mut buf = [0u8; 4];
    h1.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"back");
    // The partitions' connection survived, without RSTs.
    assert!(b.recv().is_empty(), "no RST for B");
    assert!(a.send(hdr(ca, sb, op::RW), b"p2p"));
    assert_eq!(rw_from(&b.recv(), ca), b"p2p");
    // A listens again.
    let mut h4 = host_connect(&uds);
    h4.write_all(b"CONNECT 84\n").unwrap();
    let got = recv_until(a, |g| g.iter().any(|(h, _)| h.op == op::REQUEST));
    assert!(got
        .iter()
        .any(|(h, _)| h.op == op::REQUEST && h.src_cid == HOST_CID && h.dst_port == 84));
    let st = rig.sw.stats();
    assert_eq!(st.connections, 3, "{:?}", st.connection_list);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn new_process_restore_resets_host_connections() {
    let dir = temp_dir("persist-new");
    let uds = dir.join("a.vsock");
    let mut rig = Rig::new(&[(3, Some(uds.clone()))]);
    let g = &mut rig.guests[0];
    g.add_rx(16, 4096);
    let (mut h1, hep1) = connected(g, &uds, 80);
    h1.write_all(b"before").unwrap();
    assert_eq!(rw_from(&recv_until(g, |g| !g.is_empty()), hep1), b"before");
    let state = crate::persist::json_round_trip(&rig.save().unwrap()).unwrap();
    let args = rig.new_process_args();
    let mut restored = Rig::restore(args, &state).unwrap();
    // The old process ends: its sockets close.
    drop(rig);
    h1.set_read_timeout(Some(WAIT)).unwrap();
    assert!(read_all(&h1).is_empty());
    let g = &mut restored.guests[0];
    let got = recv_until(g, |g| !g.is_empty());
    assert_eq!(
        ops_from(&got, hep1),
        vec![op::RST],
        "the guest sees a reset"
    );
    let st = restored.sw.stats();
    assert_eq!((st.connections, st.counters.rst_sent), (0, 1));
    // Host programs connect to the new process.
    let (mut h2, hep2) = connected(g, &uds, 81);
    assert_ne!(hep2, hep1, "a fresh host port");
    h2.write_all(b"after").unwrap();
    assert_eq!(rw_from(&recv_until(g, |g| !g.is_empty()), hep2), b"after");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn host_bytes_written_while_frozen_are_delivered_once_after_an_in_process_restore() {
    let dir = temp_dir("persist-frozen");
    let uds = dir.join("a.vsock");
    let mut rig = Rig::new(&[(3, Some(uds.clone()))]);
    let g = &mut rig.guests[0];
    g.add_rx(16, 4096);
    let (mut h1, hep1) = connected(g, &uds, 80);
    let frozen = rig.sw.freeze();
    h1.write_all(b"during the cut").unwrap();
    h1.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(rig.guests[0].recv().is_empty(), "frozen: nothing delivered");
    let state = rig.save().unwrap();
    let image = rig.guests[0].image();
    rig.sw.detach_quiet(3);
    rig.guests[0].load_image(&image);
    rig.sw.restore_state(&state.switch, true).unwrap();
    let sw = rig.sw.clone();
    rig.guests[0]
        .restore_on(&sw, &state.devices[0], Some(uds.clone()))
        .unwrap();
    drop(frozen);
    let g = &mut rig.guests[0];
    let got = recv_until(g, |g| ops_from(g, hep1).contains(&op::SHUTDOWN));
    assert_eq!(rw_from(&got, hep1), b"during the cut");
    let shut = got.iter().find(|(h, _)| h.op == op::SHUTDOWN).unwrap();
    assert_eq!(shut.0.flags & SHUTDOWN_F_SEND, SHUTDOWN_F_SEND);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn host_bytes_that_moved_after_the_cut_reset_the_connection_instead_of_vanishing() {
    let dir = temp_dir("persist-moved");
    let uds = dir.join("a.vsock");
    let mut rig = Rig::new(&[(3, Some(uds.clone()))]);
    let g = &mut rig.guests[0];
    g.add_rx(16, 4096);
    let (mut h1, hep1) = connected(g, &uds, 80);
    let frozen = rig.sw.freeze();
    let state = rig.save().unwrap();
    let image = rig.guests[0].image();
    drop(frozen);
    // Not frozen any more: the bridge reads these bytes and the guest takes them.
    h1.write_all(b"late").unwrap();
    let g = &mut rig.guests[0];
    assert_eq!(rw_from(&recv_until(g, |g| !g.is_empty()), hep1), b"late");
    // The reboot restores a guest that never saw them: the connection cannot go on.
    let frozen = rig.sw.freeze();
    rig.sw.detach_quiet(3);
    rig.guests[0].load_image(&image);
    rig.sw.restore_state(&state.switch, true).unwrap();
    let sw = rig.sw.clone();
    rig.guests[0]
        .restore_on(&sw, &state.devices[0], Some(uds.clone()))
        .unwrap();
    drop(frozen);
    let g = &mut rig.guests[0];
    let got = recv_until(g, |g| !g.is_empty());
    assert_eq!(ops_from(&got, hep1), vec![op::RST]);
    h1.set_read_timeout(Some(WAIT)).unwrap();
    assert!(read_all(&h1).is_empty(), "the host program reads EOF");
    assert_eq!(rig.sw.stats().connections, 0);
    let _ = std::fs::remove_dir_all(&dir);
}
