//! Wake-on-LAN: recognising a magic packet addressed to a card's MAC ([`classify`]), and
//! draining a sleeping partition's backend in search of one ([`drain`]): its card keeps
//! reading the TAP while the guest sleeps (`docs/guest-abi.md`, "Sleep and wake").
//!
//! A magic packet's payload holds the *sync stream* — six `0xFF` bytes — followed by the
//! target MAC sixteen times (102 bytes). It arrives either as the payload of an Ethernet
//! frame of EtherType `0x0842`, or as the payload of a UDP datagram over IPv4 or IPv6 (any
//! port; 7 and 9 are usual). Frames are parsed by `etherparse`; nothing in a frame is
//! trusted beyond the match: a magic packet only says "wake", and anything malformed is
//! simply not one.

use std::io;

use etherparse::{LinkSlice, SlicedPacket, TransportSlice};

use super::{NetBackend, NetStats, NET_HDR_LEN};

/// EtherType of a raw Wake-on-LAN frame.
pub const ETHERTYPE_WOL: u16 = 0x0842;
/// Length of the sync stream and the sixteen copies of the MAC.
pub const MAGIC_LEN: usize = 6 + 16 * 6;

/// What a frame is, to a sleeping card with a given MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Magic {
    /// A magic packet for this MAC: wake.
    Wake,
    /// A well-formed magic packet for another MAC.
    OtherMac,
    /// Not a magic packet (including malformed ones).
    None,
}

/// Whether `payload` holds a magic packet, and for which MAC: the sync stream followed by
/// sixteen copies of one MAC, anywhere in the payload (senders may pad or prefix it).
fn magic_target(payload: &[u8]) -> Option<[u8; 6]> {
    payload.windows(MAGIC_LEN).find_map(|w| {
        let (sync, macs) = w.split_at(6);
        if sync != [0xFF; 6] {
            return None;
        }
        let first: [u8; 6] = macs[..6].try_into().ok()?;
        macs.chunks_exact(6).all(|m| m == first).then_some(first)
    })
}

/// Classifies an Ethernet frame (without the virtio-net header) for a card with `mac`.
pub fn classify(frame: &[u8], mac: [u8; 6]) -> Magic {
    let Ok(packet) = SlicedPacket::from_ethernet(frame) else {
        return Magic::None;
    };
    let payload = match (&packet.link, &packet.transport) {
        (_, Some(TransportSlice::Udp(udp))) => udp.payload(),
        (Some(LinkSlice::Ethernet2(eth)), None) if eth.ether_type().0 == ETHERTYPE_WOL => {
            eth.payload_slice()
        }
        _ => return Magic::None,
    };
    match magic_target(payload) {
        Some(target) if target == mac => Magic::Wake,
        Some(_) => Magic::OtherMac,
        None => Magic::None,
    }
}

/// Frames a sleeping card reads from its backend per turn of the event loop; after a full
/// batch the owner leaves the backend alone for [`WATCH_PAUSE`], so a flood costs a bounded
/// amount of CPU (what does not fit the TAP's queue meanwhile, the kernel drops).
pub const WATCH_BATCH: usize = 64;
/// How long the owner leaves the backend alone after a full batch.
pub const WATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// How a [`drain`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// A magic packet for the card's MAC arrived (consumed): wake the partition.
    Woke,
    /// The backend is empty (or failed: counted in `backend_errors`).
    Empty,
    /// `budget` frames were read and dropped; more may wait.
    Budget,
}

/// Reads up to `budget` frames (each with its virtio-net header) from `backend` into `buf`,
/// and drops each, counting it in `stats.asleep_dropped`, until one is a magic packet for
/// `mac`: that one is counted in `stats.wake_packets` and ends the drain. Nothing read here
/// reaches the guest.
pub fn drain<B: NetBackend>(
    backend: &mut B,
    buf: &mut [u8],
    mac: [u8; 6],
    budget: usize,
    stats: &mut NetStats,
) -> Drained {
    for _ in 0..budget {
        let len = match backend.recv(buf) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Empty,
            Err(e) => {
                log::debug!("net: backend recv while asleep: {e}");
                stats.backend_errors += 1;
                return Drained::Empty;
            }
        };
        let frame = buf.get(NET_HDR_LEN..len).unwrap_or_default();
        if classify(frame, mac) == Magic::Wake {
            stats.wake_packets += 1;
            return Drained::Woke;
        }
        stats.asleep_dropped += 1;
    }
    Drained::Budget
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x01, 0x0b];
    const OTHER: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x01, 0x0c];

    fn magic(mac: [u8; 6]) -> Vec<u8> {
        let mut p = vec![0xFF; 6];
        for _ in 0..16 {
            p.extend_from_slice(&mac);
        }
        p
    }

    fn raw_frame(payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xFF; 6]);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ETHERTYPE_WOL.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn udp_frame(port: u16, payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 1], [0xFF; 6])
            .ipv4([10, 77, 1, 10], [10, 77, 1, 255], 64)
            .udp(40000, port);
        let mut out = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn magic_packets_wake_only_their_mac() {
        for frame in [
            raw_frame(&magic(MAC)),
            udp_frame(9, &magic(MAC)),
            udp_frame(7, &magic(MAC)),
        ] {
            assert_eq!(classify(&frame, MAC), Magic::Wake);
            assert_eq!(classify(&frame, OTHER), Magic::OtherMac);
        }
        // With a prefix and a SecureOn-style 6-byte password after it: still a match.
        let mut padded = vec![0u8; 10];
        padded.extend_from_slice(&magic(MAC));
        padded.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(classify(&udp_frame(9, &padded), MAC), Magic::Wake);
    }

    #[test]
    fn malformed_and_ordinary_frames_are_not_magic() {
        let good = magic(MAC);
        // One MAC copy short, one copy different, the sync stream broken.
        assert_eq!(
            classify(&raw_frame(&good[..MAGIC_LEN - 6]), MAC),
            Magic::None
        );
        let mut wrong_copy = good.clone();
        wrong_copy[6 + 15 * 6] ^= 1;
        assert_eq!(classify(&raw_frame(&wrong_copy), MAC), Magic::None);
        let mut no_sync = good.clone();
        no_sync[0] = 0xFE;
        assert_eq!(classify(&udp_frame(9, &no_sync), MAC), Magic::None);
        // The right bytes under another EtherType, in TCP, or a truncated frame.
        let mut ipv6_type = raw_frame(&good);
        ipv6_type[12..14].copy_from_slice(&0x86DDu16.to_be_bytes());
        assert_eq!(classify(&ipv6_type, MAC), Magic::None);
        let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], MAC)
            .ipv4([10, 77, 1, 2], [10, 77, 1, 10], 64)
            .tcp(1000, 9, 1, 1024);
        let mut tcp = Vec::new();
        builder.write(&mut tcp, &good).unwrap();
        assert_eq!(classify(&tcp, MAC), Magic::None);
        assert_eq!(classify(&udp_frame(9, &good)[..30], MAC), Magic::None);
        assert_eq!(classify(&[], MAC), Magic::None);
    }

    #[test]
    fn a_drain_drops_everything_but_the_right_magic_packet_and_stops_at_it() {
        let (mut backend, peer) = crate::net::pair(16).expect("pair");
        for frame in [
            udp_frame(9, &magic(OTHER)),
            raw_frame(&magic(MAC)[..MAGIC_LEN - 1]),
            udp_frame(53, b"ordinary"),
            vec![1, 2, 3],
            raw_frame(&magic(MAC)),
            udp_frame(9, &magic(MAC)),
        ] {
            peer.inject(&frame).expect("inject");
        }
        let mut stats = NetStats::default();
        let mut buf = vec![0u8; 2048];
        assert_eq!(
            drain(&mut backend, &mut buf, MAC, 64, &mut stats),
            Drained::Woke
        );
        assert_eq!((stats.asleep_dropped, stats.wake_packets), (4, 1));
        // The second magic packet is still in the backend: one wake per drain.
        assert_eq!(
            drain(&mut backend, &mut buf, MAC, 64, &mut stats),
            Drained::Woke
        );
        assert_eq!(
            drain(&mut backend, &mut buf, MAC, 64, &mut stats),
            Drained::Empty
        );
    }

    #[test]
    fn a_drain_reads_at_most_its_budget() {
        let (mut backend, peer) = crate::net::pair(16).expect("pair");
        for _ in 0..10 {
            peer.inject(&udp_frame(9, &magic(OTHER))).expect("inject");
        }
        let mut stats = NetStats::default();
        let mut buf = vec![0u8; 2048];
        assert_eq!(
            drain(&mut backend, &mut buf, MAC, 4, &mut stats),
            Drained::Budget
        );
        assert_eq!(stats.asleep_dropped, 4);
        assert_eq!(
            drain(&mut backend, &mut buf, MAC, 64, &mut stats),
            Drained::Empty
        );
        assert_eq!((stats.asleep_dropped, stats.wake_packets), (10, 0));
    }
}
