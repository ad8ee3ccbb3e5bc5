//! Framing and message tests.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::*;

fn info() -> EngineInfo {
    EngineInfo {
        state: EngineState::Printing,
        pages_printed: u64::MAX,
        toner_pct: 97,
        error: Some("paper jam".into()),
    }
}

fn host_requests() -> Vec<HostRequest> {
    vec![
        HostRequest::SubmitJob {
            pages: 3,
            seed: u64::MAX,
            width: DEFAULT_PAGE_WIDTH,
            height: DEFAULT_PAGE_HEIGHT,
        },
        HostRequest::JobStatus { id: None },
        HostRequest::JobStatus { id: Some(42) },
        HostRequest::EngineStatus,
        HostRequest::InjectJam,
        HostRequest::ClearJam,
        HostRequest::InjectCrash,
        HostRequest::PrepareSnapshot,
        HostRequest::RequestSnapshot { reboot: false },
        HostRequest::RequestSnapshot { reboot: true },
    ]
}

fn host_replies() -> Vec<HostReply> {
    let states = [
        JobState::Queued,
        JobState::Printing,
        JobState::Done,
        JobState::Failed,
    ];
    vec![
        HostReply::JobAccepted { id: 1 },
        HostReply::Jobs(vec![]),
        HostReply::Jobs(
            states
                .iter()
                .enumerate()
                .map(|(i, &state)| JobInfo {
                    id: i as u64,
                    state,
                    pages: 4,
                    pages_done: i as u32,
                    checksums: vec![0xdead_beef; i],
                    error: (state == JobState::Failed).then(|| String::from("x")),
                })
                .collect(),
        ),
        HostReply::Engine(info()),
        HostReply::Engine(EngineInfo {
            state: EngineState::WarmingUp,
            pages_printed: 0,
            toner_pct: 100,
            error: None,
        }),
        HostReply::Error {
            code: error_code::QUEUE_FULL,
            message: "queue full".into(),
        },
        HostReply::SnapshotReady {
            engine_pages_printed: u64::MAX,
            jobs_queued: u32::MAX,
        },
        HostReply::Error {
            code: error_code::SNAPSHOT_DENIED,
            message: "paper jam".into(),
        },
    ]
}

fn to_engine() -> Vec<ToEngine> {
    vec![
        ToEngine::Print {
            job: 7,
            page: 2,
            width: 256,
            height: 256,
            raster: page_raster(1, 2, 256, 256),
        },
        ToEngine::Status,
        ToEngine::Jam,
        ToEngine::ClearJam,
        ToEngine::Crash,
        ToEngine::PrepareSnapshot,
    ]
}

fn from_engine() -> Vec<FromEngine> {
    vec![
        FromEngine::Ready,
        FromEngine::PageDone {
            job: 1,
            page: 0,
            checksum: 0xCBF4_3926,
        },
        FromEngine::PageFailed {
            job: 1,
            page: 9,
            reason: "paper jam".into(),
        },
        FromEngine::Status(info()),
        FromEngine::Status(EngineInfo {
            state: EngineState::Ready,
            pages_printed: 1,
            toner_pct: 0,
            error: None,
        }),
        FromEngine::SnapshotApproved { pages_printed: 0 },
        FromEngine::SnapshotApproved {
            pages_printed: u64::MAX,
        },
        FromEngine::SnapshotDenied {
            reason: "paper jam".into(),
        },
    ]
}

/// Every message survives encode → decode, whole, split at every byte, and as one stream.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + core::fmt::Debug>(msgs: &[T]) {
    let mut stream = Vec::new();
    for m in msgs {
        let f = encode(m);
        let len = u32::from_le_bytes(f[..4].try_into().unwrap()) as usize;
        assert_eq!(len, f.len() - 4);
        assert_eq!(&decode_body::<T>(&f[4..]).unwrap(), m);
        stream.extend_from_slice(&f);
    }
    // Byte at a time.
    let mut dec = FrameDecoder::<T>::new();
    let mut got = Vec::new();
    for b in &stream {
        dec.push(core::slice::from_ref(b));
        while let Some(m) = dec.next_message() {
            got.push(m.unwrap());
        }
    }
    assert_eq!(got, msgs);
    assert_eq!(dec.buffered(), 0);
    // Uneven chunks.
    for chunk in [2, 3, 7, 100, 4096] {
        let mut dec = FrameDecoder::<T>::new();
        let mut got = Vec::new();
        for c in stream.chunks(chunk) {
            dec.push(c);
            got.extend(dec.by_ref().map(Result::unwrap));
        }
        assert_eq!(got, msgs, "chunks of {chunk}");
    }
}

#[test]
fn every_message_round_trips() {
    round_trip(&host_requests());
    round_trip(&host_replies());
    round_trip(&to_engine());
    round_trip(&from_engine());
}

#[test]
fn wire_format_is_pinned() {
    // Variant index, then fields; varints for integers; u32 LE length prefix.
    assert_eq!(encode(&HostRequest::EngineStatus), [1, 0, 0, 0, 2]);
    assert_eq!(
        encode(&HostRequest::SubmitJob {
            pages: 2,
            seed: 300,
            width: 256,
            height: 1
        }),
        [7, 0, 0, 0, 0, 2, 0xac, 0x02, 0x80, 0x02, 1]
    );
    assert_eq!(
        encode(&HostRequest::JobStatus { id: Some(5) }),
        [3, 0, 0, 0, 1, 1, 5]
    );
    assert_eq!(encode(&FromEngine::Ready), [1, 0, 0, 0, 0]);
    assert_eq!(
        encode(&HostReply::Error {
            code: 404,
            message: "no".into()
        }),
        [6, 0, 0, 0, 3, 0x94, 0x03, 2, b'n', b'o']
    );
}

#[test]
fn snapshot_messages_are_appended_at_the_end_of_each_enum() {
    // Host → controller: InjectCrash is 5, PrepareSnapshot 6, RequestSnapshot 7.
    assert_eq!(encode(&HostRequest::InjectCrash), [1, 0, 0, 0, 5]);
    assert_eq!(encode(&HostRequest::PrepareSnapshot), [1, 0, 0, 0, 6]);
    assert_eq!(
        encode(&HostRequest::RequestSnapshot { reboot: true }),
        [2, 0, 0, 0, 7, 1]
    );
    assert_eq!(
        encode(&HostRequest::RequestSnapshot { reboot: false }),
        [2, 0, 0, 0, 7, 0]
    );
    // Controller → host: SnapshotReady is 4; a denial is Error (3) with code 409.
    assert_eq!(
        encode(&HostReply::SnapshotReady {
            engine_pages_printed: 300,
            jobs_queued: 2
        }),
        [4, 0, 0, 0, 4, 0xac, 0x02, 2]
    );
    assert_eq!(
        encode(&HostReply::Error {
            code: error_code::SNAPSHOT_DENIED,
            message: "paper jam".into()
        }),
        [13, 0, 0, 0, 3, 0x99, 0x03, 9, b'p', b'a', b'p', b'e', b'r', b' ', b'j', b'a', b'm']
    );
    // Controller → engine: Crash is 4, PrepareSnapshot 5.
    assert_eq!(encode(&ToEngine::Crash), [1, 0, 0, 0, 4]);
    assert_eq!(encode(&ToEngine::PrepareSnapshot), [1, 0, 0, 0, 5]);
    // Engine → controller: SnapshotApproved is 4, SnapshotDenied 5.
    assert_eq!(
        encode(&FromEngine::SnapshotApproved { pages_printed: 300 }),
        [3, 0, 0, 0, 4, 0xac, 0x02]
    );
    assert_eq!(
        encode(&FromEngine::SnapshotDenied {
            reason: "paper jam".into()
        }),
        [11, 0, 0, 0, 5, 9, b'p', b'a', b'p', b'e', b'r', b' ', b'j', b'a', b'm']
    );
}

#[test]
fn large_print_frame_is_within_limits() {
    let raster = vec![0x55; MAX_PAGE_PIXELS as usize];
    let msg = ToEngine::Print {
        job: u64::MAX,
        page: u32::MAX,
        width: 1024,
        height: 768,
        raster,
    };
    let f = encode(&msg);
    assert!(f.len() - HEADER_LEN <= MAX_FRAME);
    let mut dec = FrameDecoder::<ToEngine>::new();
    for c in f.chunks(468) {
        dec.push(c);
    }
    assert_eq!(dec.next_message(), Some(Ok(msg)));
}

#[test]
fn oversize_frames_are_errors_and_end_the_stream() {
    let mut dec = FrameDecoder::<HostRequest>::new();
    dec.push(&((MAX_FRAME as u32) + 1).to_le_bytes());
    assert_eq!(
        dec.next_message(),
        Some(Err(FrameError::TooLong(MAX_FRAME as u32 + 1)))
    );
    assert!(dec.is_failed());
    dec.push(&encode(&HostRequest::EngineStatus));
    assert_eq!(dec.next_message(), None);
    assert_eq!(dec.buffered(), 0);

    let mut dec = FrameDecoder::<HostRequest>::new();
    dec.push(&[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(dec.next_message(), Some(Err(FrameError::TooLong(u32::MAX))));
    // Exactly MAX_FRAME is allowed (it waits for the bytes).
    let mut dec = FrameDecoder::<HostRequest>::new();
    dec.push(&(MAX_FRAME as u32).to_le_bytes());
    assert_eq!(dec.next_message(), None);
    assert!(!dec.is_failed());

    assert!(matches!(
        try_encode(&vec![0u8; MAX_FRAME]),
        Err(FrameError::TooLong(_))
    ));
}

#[test]
fn garbage_frames_are_errors_and_are_skipped() {
    let mut dec = FrameDecoder::<HostRequest>::new();
    // Unknown variant 200.
    dec.push(&[2, 0, 0, 0, 200, 1]);
    // Empty body.
    dec.push(&[0, 0, 0, 0]);
    // A valid message followed by a stray byte inside the frame.
    dec.push(&[2, 0, 0, 0, 2, 0]);
    // SubmitJob cut short.
    dec.push(&[2, 0, 0, 0, 0, 5]);
    // Invalid varint (11 continuation bytes).
    let mut bad = vec![12, 0, 0, 0, 1, 1];
    bad.extend_from_slice(&[0xff; 10]);
    dec.push(&bad);
    // Then a good one.
    dec.push(&encode(&HostRequest::ClearJam));
    let got: Vec<_> = dec.by_ref().collect();
    assert_eq!(got.len(), 6);
    assert!(got[..5].iter().all(|r| *r == Err(FrameError::Decode)));
    assert_eq!(got[5], Ok(HostRequest::ClearJam));

    // Random bytes never panic.
    let mut state = 1u64;
    for _ in 0..2000 {
        let mut dec = FrameDecoder::<HostReply>::new();
        let mut bytes = Vec::new();
        for _ in 0..64 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bytes.push((state >> 56) as u8);
        }
        // Keep lengths small so most frames complete.
        bytes[0] &= 0x1f;
        bytes[1] = 0;
        bytes[2] = 0;
        bytes[3] = 0;
        dec.push(&bytes);
        for _ in dec.by_ref() {}
    }
}

#[test]
fn decoder_keeps_memory_bounded_on_long_streams() {
    let mut dec = FrameDecoder::<FromEngine>::new();
    let f = encode(&FromEngine::PageDone {
        job: 1,
        page: 2,
        checksum: 3,
    });
    for _ in 0..100_000 {
        dec.push(&f[..3]);
        assert!(dec.next_message().is_none());
        dec.push(&f[3..]);
        assert!(dec.next_message().unwrap().is_ok());
    }
    assert_eq!(dec.buffered(), 0);
}
