//! Tests of the tunnel messages and authentication.

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use crate::*;

const SECRET: [u8; KEY_LEN] = [7; KEY_LEN];
const OTHER: [u8; KEY_LEN] = [8; KEY_LEN];

fn body() -> TicketBody {
    TicketBody {
        tunnel_id: 42,
        relay_id: "relay-1".to_string(),
        device_id: "mfp-1".to_string(),
        nonce: [3; TICKET_NONCE_LEN],
        expires_ms: 1_000_000,
    }
}

#[test]
fn login_proof_verifies_only_with_the_same_secret_relay_and_challenge() {
    let challenge = [9; CHALLENGE_LEN];
    let proof = login_proof(&SECRET, "relay-1", &challenge);
    assert!(verify_login_proof(&SECRET, "relay-1", &challenge, &proof));
    assert!(!verify_login_proof(&OTHER, "relay-1", &challenge, &proof));
    assert!(!verify_login_proof(&SECRET, "relay-2", &challenge, &proof));
    assert!(!verify_login_proof(
        &SECRET,
        "relay-1",
        &[1; CHALLENGE_LEN],
        &proof
    ));
    let mut flipped = proof;
    flipped[31] ^= 1;
    assert!(!verify_login_proof(
        &SECRET, "relay-1", &challenge, &flipped
    ));
}

#[test]
fn login_proof_is_hmac_sha256_of_label_and_postcard_fields() {
    // Recomputed independently: HMAC-SHA256(secret, label || len(id) id || challenge).
    use hmac::{Hmac, Mac};
    let challenge = [0xab; CHALLENGE_LEN];
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&SECRET).unwrap();
    mac.update(b"duplex-tunnel/v1/login");
    mac.update(&[7]);
    mac.update(b"relay-1");
    mac.update(&challenge);
    let want: [u8; 32] = mac.finalize().into_bytes().into();
    assert_eq!(login_proof(&SECRET, "relay-1", &challenge), want);
}

#[test]
fn a_ticket_verifies_until_it_expires_and_not_once_changed() {
    let t = Ticket::sign(&SECRET, body());
    assert_eq!(t.verify(&SECRET, 999_999), Ok(()));
    assert_eq!(t.verify(&SECRET, 1_000_000), Err(TicketError::Expired));
    assert_eq!(t.verify(&OTHER, 0), Err(TicketError::BadMac));
    let mut moved = t.clone();
    moved.body.device_id = "mfp-2".to_string();
    assert_eq!(moved.verify(&SECRET, 0), Err(TicketError::BadMac));
    let mut later = t.clone();
    later.body.expires_ms += 1;
    assert_eq!(later.verify(&SECRET, 0), Err(TicketError::BadMac));
    let mut tunnel = t;
    tunnel.body.tunnel_id = 43;
    assert_eq!(tunnel.verify(&SECRET, 0), Err(TicketError::BadMac));
}

#[test]
fn a_login_proof_is_never_a_valid_ticket_mac() {
    // Domain separation: different labels.
    let t = Ticket::sign(&SECRET, body());
    let challenge: [u8; CHALLENGE_LEN] = t.mac;
    let proof = login_proof(&SECRET, "relay-1", &challenge);
    assert_ne!(proof, t.mac);
}

#[test]
fn messages_round_trip_through_frames() {
    let msgs = vec![
        RelayToMediator::Hello {
            version: PROTOCOL_VERSION,
            relay_id: "relay-1".to_string(),
        },
        RelayToMediator::Login {
            proof: [1; KEY_LEN],
            devices: vec!["mfp-1".to_string()],
        },
        RelayToMediator::TunnelClosed {
            tunnel_id: 5,
            jobs: vec!["j-1".to_string(), "j-2".to_string()],
        },
    ];
    let mut dec = control_decoder::<RelayToMediator>();
    for m in &msgs {
        dec.push(&encode(m));
    }
    let got: Vec<_> = dec.map(|r| r.unwrap()).collect();
    assert_eq!(got, msgs);
    let req = MediatorToRelay::TunnelRequest {
        tunnel_id: 9,
        device_id: "mfp-1".to_string(),
        cloud: Endpoint {
            ip: [10, 77, 0, 3],
            port: DEFAULT_TUNNEL_PORT,
        },
        ticket: Ticket::sign(&SECRET, body()),
    };
    let mut dec = control_decoder::<MediatorToRelay>();
    dec.push(&encode(&req));
    assert_eq!(dec.next_message(), Some(Ok(req)));
}

#[test]
fn wire_bytes_of_the_first_messages_are_as_documented() {
    // docs/tunnel-protocol.md, "Examples".
    let hello = encode(&RelayToMediator::Hello {
        version: 1,
        relay_id: "r1".to_string(),
    });
    assert_eq!(hello, [5, 0, 0, 0, 0, 1, 2, b'r', b'1']);
    assert_eq!(
        encode(&RelayToMediator::Ping { seq: 300 }),
        [3, 0, 0, 0, 2, 0xac, 0x02]
    );
    assert_eq!(encode(&CloudToRelay::Close), [1, 0, 0, 0, 4]);
}

#[test]
fn oversized_frames_are_refused_by_the_decoders_limit() {
    let mut dec = control_decoder::<RelayToMediator>();
    dec.push(&((MAX_CONTROL_FRAME as u32) + 1).to_le_bytes());
    assert!(matches!(
        dec.next_message(),
        Some(Err(FrameError::TooLong(_)))
    ));
    assert!(dec.is_failed());
    let mut dec = tunnel_decoder::<CloudToRelay>();
    let big = encode(&CloudToRelay::JobData {
        job_id: "j".to_string(),
        bytes: vec![0; MAX_DOCUMENT_CHUNK],
    });
    dec.push(&big);
    assert!(matches!(dec.next_message(), Some(Ok(_))));
    let mut dec = control_decoder::<CloudToRelay>();
    dec.push(&big);
    assert!(matches!(
        dec.next_message(),
        Some(Err(FrameError::TooLong(_)))
    ));
}

#[test]
fn ids_and_keys_parse_as_documented() {
    assert!(valid_id("relay-1"));
    assert!(valid_id("user@example.com"));
    assert!(!valid_id(""));
    assert!(!valid_id("a b"));
    assert!(!valid_id(&"x".repeat(MAX_ID_LEN + 1)));
    assert!(valid_id(&"x".repeat(MAX_ID_LEN)));
    assert!(!valid_id("ümlaut"));
    let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
    let key = parse_key(hex).unwrap();
    assert_eq!(key[1], 0x11);
    assert_eq!(key[31], 0xff);
    assert_eq!(parse_key(&hex[1..]), None);
    assert_eq!(parse_key(&hex.replace('0', "g")), None);
}

#[test]
fn job_data_bytes_keep_the_plain_vec_wire_format() {
    // `bytes` is serialized with serde_bytes: on postcard's wire that must be exactly what a
    // plain `Vec<u8>` gives (variant 3, the job id, a varint length, the raw bytes).
    let bytes: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    let frame = encode(&CloudToRelay::JobData {
        job_id: "j".to_string(),
        bytes: bytes.clone(),
    });
    let mut want = vec![3u8, 1, b'j', 0xac, 0x02];
    want.extend_from_slice(&bytes);
    assert_eq!(&frame[4..], &want[..]);
    let mut dec = tunnel_decoder::<CloudToRelay>();
    dec.push(&frame);
    assert_eq!(
        dec.next_message(),
        Some(Ok(CloudToRelay::JobData {
            job_id: "j".to_string(),
            bytes
        }))
    );
}

#[test]
fn a_magic_packet_is_six_ff_then_the_mac_sixteen_times() {
    let mac = [0x52, 0x54, 0, 0x77, 1, 0x0b];
    let p = magic_packet(mac);
    assert_eq!(&p[..6], &[0xFF; 6]);
    for i in 0..16 {
        assert_eq!(&p[6 + i * 6..12 + i * 6], &mac, "repetition {i}");
    }
}

#[test]
fn the_sleep_and_wake_messages_keep_their_variant_numbers() {
    // New variants go at the end: a v1 peer decodes every old message as before.
    let lan = encode(&RelayToMediator::Lan {
        segment: "s".to_string(),
        mac: [1, 2, 3, 4, 5, 6],
    });
    assert_eq!(&lan[4..], &[7, 1, b's', 1, 2, 3, 4, 5, 6]);
    let sleep = encode(&RelayToMediator::Sleep {
        devices: vec!["d".to_string()],
        mac: [0; 6],
        segment: "s".to_string(),
    });
    assert_eq!(sleep[4], 8);
    let sent = encode(&RelayToMediator::WakeSent {
        wake_id: 1,
        sent: true,
        code: 0,
        message: "".to_string(),
    });
    assert_eq!(&sent[4..], &[9, 1, 1, 0, 0]);
    assert_eq!(&encode(&MediatorToRelay::SleepGranted)[4..], &[7]);
    let wake = encode(&MediatorToRelay::WakeRelay {
        wake_id: 2,
        relay_id: "b".to_string(),
        mac: [9; 6],
        device_id: "d".to_string(),
        tunnel_id: 3,
    });
    assert_eq!(&wake[4..], &[9, 2, 1, b'b', 9, 9, 9, 9, 9, 9, 1, b'd', 3]);
    let back: MediatorToRelay = decode_body(&wake[4..]).unwrap();
    assert!(matches!(
        back,
        MediatorToRelay::WakeRelay { tunnel_id: 3, .. }
    ));
}

#[test]
fn the_share_frames_are_new_variants_at_the_end() {
    let open = encode(&CloudToRelay::SyncOpen {
        device_id: "d".to_string(),
    });
    assert_eq!(&open[4..], &[5, 1, b'd']);
    let share = encode(&CloudToRelay::Share { bytes: vec![7, 8] });
    assert_eq!(&share[4..], &[6, 2, 7, 8]);
    let up = encode(&RelayToCloud::Share { bytes: vec![9] });
    assert_eq!(&up[4..], &[5, 1, 9]);
    let back: RelayToCloud = decode_body(&up[4..]).unwrap();
    assert_eq!(back, RelayToCloud::Share { bytes: vec![9] });
}
