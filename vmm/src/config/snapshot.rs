//! The config's `snapshot` section: where sets go, where they may be, and which guests may
//! raise one (guest ABI `SNAPSHOT_REQUEST`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{PartitionConfig, Role};

/// The device's save destination and its limits (see `docs/snapshot-format.md` and
/// `docs/config.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// The set's directory (written atomically; relative to the config file's directory).
    pub dir: PathBuf,
    /// Which guests may raise a snapshot, and how often.
    #[serde(default)]
    pub guest_requests: GuestRequestsConfig,
    /// Confines sets (optional): the `dest` of `snapshot`, the `from` of `reboot` and
    /// `duplex run --restore` must lie inside this directory once resolved (relative to the
    /// config file's directory; see `docs/snapshot-format.md`, "Untrusted sets").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
}

/// Who may write `SNAPSHOT_REQUEST`, and how often one is honoured. Any other request is
/// refused and counted in `status` (`guest_snapshots`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestRequestsConfig {
    /// The partitions whose requests are honoured. Absent: the partitions whose role is
    /// `controller`. Empty: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<String>>,
    /// The least time between the end of one guest-raised snapshot and the start of the
    /// next (default 10 000 ms).
    #[serde(default = "default_min_interval_ms")]
    pub min_interval_ms: u64,
}

impl Default for GuestRequestsConfig {
    fn default() -> Self {
        GuestRequestsConfig {
            from: None,
            min_interval_ms: default_min_interval_ms(),
        }
    }
}

fn default_min_interval_ms() -> u64 {
    10_000
}

impl GuestRequestsConfig {
    /// The names of the partitions allowed to raise a snapshot, among `partitions`.
    pub fn allowed(&self, partitions: &[PartitionConfig]) -> Vec<String> {
        match &self.from {
            Some(names) => names.clone(),
            None => partitions
                .iter()
                .filter(|p| p.role == Role::Controller)
                .map(|p| p.name.clone())
                .collect(),
        }
    }
}
