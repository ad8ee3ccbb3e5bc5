//! A partition's network card on the monitor's side (`docs/net.md`): the TAP the partition
//! keeps open for its whole life ([`PartitionNet`]; each run's card gets a duplicate of it,
//! so a reboot in place keeps the interface and the frames waiting in it), and one run's
//! card with its subscriber on the device event loop ([`RunNet`]).

use std::sync::Arc;

use serde::Serialize;

use duplex_devices::event_loop::{EventLoop, SubscriptionKey};
use duplex_devices::net::{format_mac, NetMmio, NetPoller, NetStats, Tap};

use super::PartitionError;
use crate::config::NetConfig;

/// A partition's network card: a virtio-mmio window in front of a TAP.
pub type Card = NetMmio<Tap>;

/// What a partition with a `net` entry keeps across its runs.
#[derive(Debug)]
pub struct PartitionNet {
    tap: Tap,
    mac: [u8; 6],
    event_loop: EventLoop,
}

impl PartitionNet {
    /// Opens (creating it if needed) the TAP of partition `name`'s card.
    pub fn open(
        name: &str,
        config: &NetConfig,
        event_loop: &EventLoop,
    ) -> Result<Self, PartitionError> {
        let mac = config.mac_bytes().map_err(|message| PartitionError::Net {
            name: name.to_owned(),
            message,
        })?;
        let tap = Tap::open(&config.tap).map_err(|e| PartitionError::Net {
            name: name.to_owned(),
            message: e.to_string(),
        })?;
        Ok(PartitionNet {
            tap,
            mac,
            event_loop: event_loop.clone(),
        })
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The TAP's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// A run's backend: a duplicate of the partition's TAP.
    pub fn backend(&self, name: &str) -> Result<Tap, PartitionError> {
        self.tap.try_clone().map_err(|e| PartitionError::Net {
            name: name.to_owned(),
            message: format!("duplicating the TAP {}: {e}", self.tap.name()),
        })
    }

    /// A run's card, not yet on the loop.
    pub fn run_net(&self, card: Card) -> RunNet {
        RunNet {
            card: Arc::new(card),
            event_loop: self.event_loop.clone(),
            key: None,
        }
    }
}

/// One run's card and its place on the device event loop: on it from
/// [`subscribe`](Self::subscribe) (the run starts, or a restored run is installed) until it
/// is dropped (the run ends).
pub struct RunNet {
    pub card: Arc<Card>,
    event_loop: EventLoop,
    key: Option<SubscriptionKey>,
}

impl std::fmt::Debug for RunNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunNet")
            .field("card", &self.card)
            .field("subscribed", &self.key.is_some())
            .finish()
    }
}

impl RunNet {
    /// Puts the card on the loop (once).
    pub fn subscribe(&mut self) -> Result<(), String> {
        if self.key.is_none() {
            let poller = NetPoller::new(self.card.clone());
            self.key = Some(
                self.event_loop
                    .add(Box::new(poller))
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(())
    }

    /// Takes the card off the loop (its TAP fd leaves the loop before it is closed).
    pub fn unsubscribe(&mut self) {
        if let Some(key) = self.key.take() {
            self.event_loop.remove(key);
        }
    }
}

impl Drop for RunNet {
    fn drop(&mut self) {
        self.unsubscribe();
    }
}

/// What `status` shows of a partition's card.
#[derive(Debug, Clone, Serialize)]
pub struct NetStatus {
    /// The TAP interface.
    pub tap: String,
    /// The card's MAC address.
    pub mac: String,
    /// The card's counters in the current run (or the last one; a restore carries them).
    pub counters: NetStats,
}

impl NetStatus {
    pub fn new(net: &PartitionNet, counters: NetStats) -> Self {
        NetStatus {
            tap: net.tap_name().to_owned(),
            mac: format_mac(&net.mac()),
            counters,
        }
    }
}
