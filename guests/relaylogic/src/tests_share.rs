//! Tests of share tunnels (`share.rs`): the bridge between the cloud's `Share` frames and
//! the controller's `ShareOpen` / `ShareAnswer`, in order, one request in flight, and its
//! refusals.

use alloc::vec;
use alloc::vec::Vec;

use duplex_link::{HostReply, HostRequest};
use duplex_tunnel::*;

use crate::tests::{closes, sent, H};

use crate::tests_tunnel::{controller_requests, open_tunnel, ready};
use crate::*;

fn reply(h: &mut H, r: HostReply) -> Vec<Action> {
    h.relay.on_controller_reply(r, h.now);
    h.relay.take_actions()
}

fn sync_open(device: &str) -> CloudToRelay {
    CloudToRelay::SyncOpen {
        device_id: device.into(),
    }
}

fn share(bytes: &[u8]) -> CloudToRelay {
    CloudToRelay::Share {
        bytes: bytes.to_vec(),
    }
}

fn error_of(a: &[Action], t: ConnId) -> Option<u16> {
    sent::<RelayToCloud>(a, t)
        .into_iter()
        .find_map(|m| match m {
            RelayToCloud::Error { code, .. } => Some(code),
            _ => None,
        })
}

#[test]
fn the_done_body_is_the_postcard_of_device_to_cloud_done() {
    let done = postcard::to_allocvec(&duplex_docs::DeviceToCloud::Done).expect("encode");
    assert_eq!(done, SHARE_DONE_BODY);
}

#[test]
fn a_share_exchange_is_bridged_in_order_one_request_in_flight() {
    let (mut h, t) = ready();
    let a = h.feed(t, &sync_open("mfp-1"));
    assert_eq!(
        controller_requests(&a),
        vec![HostRequest::ShareOpen {
            device_id: "mfp-1".into()
        }]
    );
    assert!(sent::<RelayToCloud>(&a, t).is_empty());
    // The cloud may not speak while the controller has the turn.
    let a = reply(
        &mut h,
        HostReply::ShareSend {
            bytes: vec![0, 1, 100],
        },
    );
    assert_eq!(
        sent::<RelayToCloud>(&a, t),
        vec![RelayToCloud::Share {
            bytes: vec![0, 1, 100]
        }]
    );
    assert!(controller_requests(&a).is_empty());
    let a = h.feed(t, &share(&[0, 9, 9]));
    assert_eq!(
        controller_requests(&a),
        vec![HostRequest::ShareAnswer {
            bytes: vec![0, 9, 9]
        }]
    );
    let a = reply(&mut h, HostReply::ShareSend { bytes: vec![1, 7] });
    assert_eq!(
        sent::<RelayToCloud>(&a, t),
        vec![RelayToCloud::Share { bytes: vec![1, 7] }]
    );
    let a = h.feed(t, &share(&[1, 8]));
    assert_eq!(
        controller_requests(&a),
        vec![HostRequest::ShareAnswer { bytes: vec![1, 8] }]
    );
    let a = reply(&mut h, HostReply::ShareDone);
    assert_eq!(
        sent::<RelayToCloud>(&a, t),
        vec![RelayToCloud::Share {
            bytes: SHARE_DONE_BODY.to_vec()
        }]
    );
    // After Done, the cloud closes.
    let a = h.feed(t, &CloudToRelay::Close);
    assert_eq!(
        sent::<RelayToCloud>(&a, t),
        vec![RelayToCloud::Closed { jobs: 0 }]
    );
    assert!(closes(&a, t));
    assert_eq!(h.relay.tunnel_count(), 0);
}

#[test]
fn a_share_frame_out_of_turn_is_refused() {
    // Before SyncOpen.
    let (mut h, t) = ready();
    let a = h.feed(t, &share(&[2]));
    assert_eq!(error_of(&a, t), Some(error_code::MALFORMED));
    assert!(closes(&a, t));
    assert!(controller_requests(&a).is_empty());
    // While the controller has the turn (a second request would be in flight).
    let (mut h, t) = ready();
    h.feed(t, &sync_open("mfp-1"));
    let a = h.feed(t, &share(&[2]));
    assert_eq!(error_of(&a, t), Some(error_code::MALFORMED));
    assert!(controller_requests(&a).is_empty());
    // After Done.
    let (mut h, t) = ready();
    h.feed(t, &sync_open("mfp-1"));
    reply(&mut h, HostReply::ShareDone);
    let a = h.feed(t, &share(&[2]));
    assert_eq!(error_of(&a, t), Some(error_code::MALFORMED));
}

#[test]
fn sync_open_for_another_device_or_a_second_share_is_refused() {
    let (mut h, t) = ready();
    let a = h.feed(t, &sync_open("mfp-9"));
    assert_eq!(error_of(&a, t), Some(error_code::DEVICE_NOT_SERVED));
    assert!(controller_requests(&a).is_empty());
    // Served by the relay, but not this tunnel's ticket.
    let (mut h, t) = ready();
    let a = h.feed(t, &sync_open("mfp-2"));
    assert_eq!(error_of(&a, t), Some(error_code::DEVICE_NOT_SERVED));
    // One share tunnel at a time.
    let (mut h, t) = ready();
    h.feed(t, &sync_open("mfp-1"));
    let t2 = open_tunnel(&mut h, 6, "mfp-1");
    let a = h.feed(t2, &sync_open("mfp-1"));
    assert_eq!(error_of(&a, t2), Some(error_code::TOO_MANY));
    assert!(controller_requests(&a).is_empty());
}

#[test]
fn the_controller_down_ends_the_share_with_503() {
    // Down before SyncOpen.
    let (mut h, t) = ready();
    h.relay.on_controller_closed(h.now);
    h.relay.take_actions();
    let a = h.feed(t, &sync_open("mfp-1"));
    assert_eq!(error_of(&a, t), Some(error_code::DEVICE_UNAVAILABLE));
    assert!(closes(&a, t));
    // Lost while the controller has the turn.
    let (mut h, t) = ready();
    h.feed(t, &sync_open("mfp-1"));
    h.relay.on_controller_closed(h.now);
    let a = h.relay.take_actions();
    assert_eq!(error_of(&a, t), Some(error_code::DEVICE_UNAVAILABLE));
    assert!(closes(&a, t));
    // Lost while the cloud has the turn.
    let (mut h, t) = ready();
    h.feed(t, &sync_open("mfp-1"));
    reply(&mut h, HostReply::ShareSend { bytes: vec![0] });
    h.relay.on_controller_closed(h.now);
    let a = h.relay.take_actions();
    assert_eq!(error_of(&a, t), Some(error_code::DEVICE_UNAVAILABLE));
}

#[test]
fn a_controller_error_ends_the_share_with_its_code() {
    let (mut h, t) = ready();
    h.feed(t, &sync_open("mfp-1"));
    let a = reply(
        &mut h,
        HostReply::Error {
            code: 503,
            message: "no disk".into(),
        },
    );
    assert_eq!(error_of(&a, t), Some(503));
    assert!(closes(&a, t));
    assert_eq!(h.relay.tunnel_count(), 0);
}

#[test]
fn a_job_on_a_share_tunnel_is_refused_and_a_late_reply_is_dropped() {
    let (mut h, t) = ready();
    h.feed(t, &sync_open("mfp-1"));
    let a = h.feed(t, &crate::tests_tunnel::job("j-1", "mfp-1", 0));
    assert_eq!(error_of(&a, t), Some(error_code::MALFORMED));
    // The controller's answer to the ShareOpen arrives after the tunnel ended.
    let a = reply(&mut h, HostReply::ShareSend { bytes: vec![0] });
    assert!(a
        .iter()
        .all(|x| !matches!(x, Action::Send { .. } | Action::ControllerClose)));
}
