//! The share sub-protocol between the controller and the cloud, as carried through the
//! relay's tunnel (`docs/shared-data.md`, "Transport"): the device asks for the cloud's
//! users page by page and sends its sync messages; the cloud answers each in order. Each
//! message is one postcard body inside the tunnel's `Share { bytes }` frames, so the tunnel
//! protocol stays a transport and this crate owns the share's messages.
//!
//! **Never reorder variants or fields; add new ones at the end.**

use alloc::string::String;

use serde::{Deserialize, Serialize};

use crate::pairing::ScimListResponse;
use crate::sync::{SyncReply, SyncRequest};

/// Device → cloud, one message per `Share` frame of the tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceToCloud {
    /// Variant 0: the cloud's users from `start_index` (1-based, as SCIM), at most `count`
    /// (≤ [`crate::pairing::MAX_SCIM_PAGE`]). Answered `Users`.
    ListUsers { start_index: u32, count: u32 },
    /// Variant 1: a sync message of a share. Answered `Sync`.
    Sync(SyncRequest),
    /// Variant 2: the device has nothing more to send on this tunnel; the cloud closes it
    /// (`Close`) once it has answered everything before.
    Done,
}

/// Cloud → device, one per [`DeviceToCloud`] request, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudToDevice {
    /// Variant 0: a page of the cloud's users (SCIM `ListResponse`).
    Users(ScimListResponse),
    /// Variant 1: the answer to a `Sync`.
    Sync(SyncReply),
    /// Variant 2: the request could not be read or served (`code`, why); the tunnel goes on.
    Error { code: u16, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn the_share_messages_keep_their_variant_numbers_and_round_trip() {
        let ask = DeviceToCloud::ListUsers {
            start_index: 1,
            count: 100,
        };
        let bytes = postcard::to_allocvec(&ask).expect("encode");
        assert_eq!(bytes, vec![0, 1, 100]);
        assert_eq!(postcard::from_bytes::<DeviceToCloud>(&bytes), Ok(ask));
        assert_eq!(
            postcard::to_allocvec(&DeviceToCloud::Done).expect("encode"),
            vec![2]
        );
        let err = CloudToDevice::Error {
            code: 400,
            message: "x".to_string(),
        };
        let bytes = postcard::to_allocvec(&err).expect("encode");
        assert_eq!(bytes[0], 2);
        assert_eq!(postcard::from_bytes::<CloudToDevice>(&bytes), Ok(err));
    }
}
