//! The steps of sleep and wake on a [`Mediator`] (the rules are in [`super::wake`]):
//! routing a request for a sleeping relay, `Sleep`, `Lan`, `WakeSent`, a login and a
//! session's end, and the sweep that resends `WakeRelay` and gives up at the deadline.
//! Each step holds the wake book's async mutex across its store calls.

use std::sync::Arc;
use std::time::Duration;

use duplex_tunnel::error_code as code;
use duplex_tunnel::{valid_id, MediatorToRelay, MAX_DEVICES_PER_RELAY};

use super::login::message;
use super::wake::{no_substitute_error, timeout_error, Due, Lan, LastWake, Wake, WakeBook};
use super::{Command, Mediator};
use crate::store::{ErrorInfo, SleepLease, Transition, TunnelRecord};
use crate::util::{mac_string, now_ms};

/// How often the wake sweep looks at the wakes in flight.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Writes the wake's info into its requests' records (`waking`).
async fn save_wake(m: &Mediator, w: &Wake) {
    let ids: Vec<u64> = w.tunnels.iter().map(|t| t.0).collect();
    let info = w.info.clone();
    let r = m
        .store
        .run(move |s| {
            for id in ids {
                let t = Transition::Waking { wake: info.clone() };
                if let Err(e) = s.update_tunnel(id, None, t) {
                    log::debug!("tunnel {id}: wake not recorded: {e}");
                }
            }
            Ok(())
        })
        .await;
    if let Err(e) = r {
        log::error!("relay {}: cannot record the wake: {e}", w.info.relay_id);
    }
}

/// Applies `t(id)` to each of `ids`, logging failures.
async fn apply_all(m: &Mediator, ids: Vec<u64>, t: impl Fn() -> Transition + Send + 'static) {
    let r = m
        .store
        .run(move |s| {
            for id in ids {
                if let Err(e) = s.update_tunnel(id, None, t()) {
                    log::debug!("tunnel {id}: {e}");
                }
            }
            Ok(())
        })
        .await;
    if let Err(e) = r {
        log::error!("cannot record a wake's end: {e}");
    }
}

/// Sends `WakeRelay` for the wake of `relay` through a substitute; false when none
/// could be asked.
async fn send_wake(m: &Mediator, book: &mut WakeBook, relay: &str, now: u64) -> bool {
    let Some(w) = book.wakes.get(relay) else {
        return false;
    };
    let Some(&(tunnel_id, ref device_id)) = w.tunnels.first() else {
        return false;
    };
    let device_id = device_id.clone();
    let prefer = w.info.substitute.clone();
    let (segment, failed, mac) = (w.info.segment.clone(), w.failed.clone(), w.mac);
    let Some(sub) = book.choose_substitute(relay, &segment, prefer.as_deref(), &failed, |id| {
        m.sessions().contains_key(id)
    }) else {
        return false;
    };
    let wake_id = m.next_wake_id();
    let msg = MediatorToRelay::WakeRelay {
        wake_id,
        relay_id: relay.to_string(),
        mac,
        device_id,
        tunnel_id,
    };
    let sent = m
        .sessions()
        .get(&sub)
        .is_some_and(|s| s.tx.send(Command::Send(Box::new(msg))).is_ok());
    if !sent {
        return false;
    }
    let Some(w) = book.wakes.get_mut(relay) else {
        return false;
    };
    w.info.substitute = Some(sub.clone());
    w.info.attempts += 1;
    w.sent_to.push((wake_id, sub.clone()));
    w.next_send_ms = now.saturating_add(m.cfg.wake_retry_ms);
    log::info!(
        "wake {wake_id}: asking relay {sub} to wake relay {relay} (mac {}, segment {segment}, attempt {}/{}, tunnels {:?})",
        mac_string(&mac),
        w.info.attempts,
        m.cfg.wake_attempts,
        w.tunnels.iter().map(|t| t.0).collect::<Vec<_>>()
    );
    let w = w.clone();
    save_wake(m, &w).await;
    true
}

/// Gives up the wake of `relay`: its requests fail with `error`; the relay stays asleep.
async fn give_up(
    m: &Mediator,
    book: &mut WakeBook,
    relay: &str,
    now: u64,
    error: ErrorInfo,
    outcome: &'static str,
) {
    let Some(w) = book.wakes.remove(relay) else {
        return;
    };
    let ids: Vec<u64> = w.tunnels.iter().map(|t| t.0).collect();
    log::warn!("tunnels {ids:?} failed: {}: {}", error.code, error.message);
    let info = w.info.clone();
    book.last.insert(
        relay.to_string(),
        LastWake {
            info: info.clone(),
            outcome,
        },
    );
    apply_all(m, ids, move || Transition::WakeFailed {
        at: now,
        error: error.clone(),
        wake: info.clone(),
    })
    .await;
}

/// Routes a new request: a device of a sleeping relay (one its lease lists) gets a wake,
/// anything else is offered as usual (if its relay is active). Returns the record as it
/// is now.
pub async fn route(m: &Arc<Mediator>, rec: TunnelRecord) -> TunnelRecord {
    let (id, relay, device) = (rec.tunnel_id, rec.relay_id.clone(), rec.device_id.clone());
    let mut book = m.book.lock().await;
    let lease = book
        .leases
        .get(&relay)
        .filter(|l| l.devices.contains(&device))
        .cloned();
    let Some(lease) = lease else {
        drop(book);
        m.nudge(&relay, &device, id);
        return rec;
    };
    let now = now_ms();
    if let Some(w) = book.wakes.get_mut(&relay) {
        w.tunnels.push((id, device));
        log::info!("tunnel {id} waits for the wake of relay {relay} under way");
        let w = w.clone();
        save_wake(m, &w).await;
    } else {
        let mut w = Wake::new(&lease, now, m.cfg.wake_timeout_ms);
        w.tunnels.push((id, device));
        book.wakes.insert(relay.clone(), w);
        if !send_wake(m, &mut book, &relay, now).await {
            let error = no_substitute_error(&relay, &lease.segment);
            give_up(m, &mut book, &relay, now, error, "no_substitute").await;
        }
    }
    drop(book);
    match m.store.run(move |s| s.tunnel(id)).await {
        Ok(Some(now_rec)) => now_rec,
        _ => rec,
    }
}

/// A relay logged in (its session is registered): its sleep lease ends, and the requests
/// its wake held become `pending` (the session offers them next).
pub async fn on_login(m: &Mediator, relay: &str) {
    let mut book = m.book.lock().await;
    if !book.leases.contains_key(relay) && !book.wakes.contains_key(relay) {
        return;
    }
    if book.leases.remove(relay).is_some() {
        let r = relay.to_string();
        if let Err(e) = m.store.run(move |s| s.clear_sleep_lease(&r)).await {
            log::error!("relay {relay}: cannot clear the sleep lease: {e}");
        }
        log::info!("relay {relay} is awake: sleep lease cleared");
    }
    if let Some(mut w) = book.wakes.remove(relay) {
        let now = now_ms();
        w.info.woken_ms = Some(now);
        let ids: Vec<u64> = w.tunnels.iter().map(|t| t.0).collect();
        log::info!(
            "relay {relay} woke {} ms after the wake ({} wake requests through {:?}); tunnels {ids:?} go to it",
            now.saturating_sub(w.info.requested_ms),
            w.info.attempts,
            w.substitutes()
        );
        book.last.insert(
            relay.to_string(),
            LastWake {
                info: w.info.clone(),
                outcome: "woken",
            },
        );
        apply_all(m, ids, move || Transition::Woken { at: now }).await;
    }
}

/// `Lan` from an active relay (segment already checked).
pub async fn on_lan(m: &Mediator, relay: &str, session_id: u64, segment: String, mac: [u8; 6]) {
    log::info!(
        "relay {relay} is on LAN segment {segment} (mac {})",
        mac_string(&mac)
    );
    m.book.lock().await.lans.insert(
        relay.to_string(),
        Lan {
            session_id,
            segment,
            mac,
        },
    );
}

/// The session of `relay` ended: it is no substitute any more; with a sleep lease it is
/// now asleep.
pub async fn on_session_end(m: &Mediator, relay: &str, session_id: u64) {
    let mut book = m.book.lock().await;
    if book
        .lans
        .get(relay)
        .is_some_and(|l| l.session_id == session_id)
    {
        book.lans.remove(relay);
    }
    if let Some(l) = book.leases.get(relay) {
        log::info!(
            "relay {relay} is asleep (session {session_id} ended): segment {}, mac {}, devices {:?}",
            l.segment,
            mac_string(&l.mac),
            l.devices
        );
    }
}

/// `Sleep` from an active relay: `SleepGranted` (the lease stored) or `SleepRefused`.
pub async fn sleep(
    m: &Mediator,
    relay: &str,
    devices: Vec<String>,
    mac: [u8; 6],
    segment: String,
) -> MediatorToRelay {
    let refuse = |c: u16, why: String| {
        log::info!("relay {relay} may not sleep: {c}: {why}");
        MediatorToRelay::SleepRefused {
            code: c,
            message: message(why),
        }
    };
    if !valid_id(&segment) {
        let shown: String = segment.chars().take(80).collect();
        return refuse(code::MALFORMED, format!("invalid LAN segment {shown:?}"));
    }
    if devices.len() > MAX_DEVICES_PER_RELAY {
        return refuse(
            code::MALFORMED,
            format!("{} devices, at most {MAX_DEVICES_PER_RELAY}", devices.len()),
        );
    }
    let listed = m
        .relay(relay)
        .map(|r| r.devices.clone())
        .unwrap_or_default();
    if let Some(d) = devices.iter().find(|d| !listed.contains(d)) {
        let shown: String = d.chars().take(80).collect();
        return refuse(
            code::MALFORMED,
            format!("device {shown:?} is not listed for relay {relay}"),
        );
    }
    let mut unique: Vec<String> = Vec::with_capacity(devices.len());
    for d in devices {
        if !unique.contains(&d) {
            unique.push(d);
        }
    }
    let mut book = m.book.lock().await;
    let r = relay.to_string();
    let busy = match m.store.run(move |s| s.busy_for_relay(&r)).await {
        Ok(n) => n,
        Err(e) => return refuse(code::SLEEP_DEFERRED, format!("cannot check tunnels: {e}")),
    };
    if busy > 0 {
        return refuse(
            code::SLEEP_DEFERRED,
            format!(
                "{busy} tunnel request{} pending, offered or open for relay {relay}",
                if busy == 1 { " is" } else { "s are" }
            ),
        );
    }
    let lease = SleepLease {
        relay_id: relay.to_string(),
        devices: unique,
        mac,
        segment,
        since_ms: now_ms(),
    };
    let stored = lease.clone();
    if let Err(e) = m.store.run(move |s| s.put_sleep_lease(&stored)).await {
        return refuse(code::SLEEP_DEFERRED, format!("cannot store the lease: {e}"));
    }
    log::info!(
        "relay {relay} may sleep: lease devices {:?}, mac {}, segment {}",
        lease.devices,
        mac_string(&lease.mac),
        lease.segment
    );
    book.leases.insert(relay.to_string(), lease);
    MediatorToRelay::SleepGranted
}

/// `WakeSent` from `relay` (which was asked `wake_id`: the session checked).
pub async fn wake_sent(m: &Mediator, relay: &str, wake_id: u64, sent: bool, c: u16, why: &str) {
    let mut book = m.book.lock().await;
    let found = book
        .wakes
        .iter_mut()
        .find(|(_, w)| w.sent_to.iter().any(|(id, s)| *id == wake_id && s == relay));
    let Some((sleeping, w)) = found else {
        log::info!("wake {wake_id}: relay {relay} answered sent={sent}, but that wake is over");
        return;
    };
    let sleeping = sleeping.clone();
    if sent {
        log::info!("wake {wake_id}: relay {relay} sent the magic packet for relay {sleeping}");
        if w.info.sent_ms.is_none() {
            w.info.sent_ms = Some(now_ms());
            let w = w.clone();
            save_wake(m, &w).await;
        }
    } else {
        let shown: String = why.chars().take(120).collect();
        log::warn!("wake {wake_id}: relay {relay} could not wake relay {sleeping}: {c}: {shown}");
        w.failed.insert(relay.to_string());
        // Another substitute may be asked at once (within the attempts left).
        w.next_send_ms = now_ms();
    }
}

/// Takes up the `waking` records found at start: a relay still asleep gets a fresh wake;
/// any other request is `pending` again (offered when its relay logs in).
async fn recover(m: &Mediator, book: &mut WakeBook) {
    let waking = match m.store.run(|s| s.waking()).await {
        Ok(w) => w,
        Err(e) => {
            log::error!("cannot read waking requests: {e}");
            return;
        }
    };
    if waking.is_empty() {
        return;
    }
    let now = now_ms();
    let mut pending = Vec::new();
    for rec in waking {
        let active = m.sessions().contains_key(&rec.relay_id);
        let lease = book.leases.get(&rec.relay_id).cloned();
        match lease {
            Some(lease) if !active => {
                let w = book
                    .wakes
                    .entry(rec.relay_id.clone())
                    .or_insert_with(|| Wake::new(&lease, now, m.cfg.wake_timeout_ms));
                w.tunnels.push((rec.tunnel_id, rec.device_id.clone()));
            }
            _ => pending.push(rec),
        }
    }
    log::info!(
        "taking up waking requests: wakes for {:?}, {} back to pending",
        book.wakes.keys().collect::<Vec<_>>(),
        pending.len()
    );
    let ids: Vec<u64> = pending.iter().map(|r| r.tunnel_id).collect();
    apply_all(m, ids, move || Transition::Woken { at: now }).await;
    for rec in pending {
        m.nudge(&rec.relay_id, &rec.device_id, rec.tunnel_id);
    }
}

/// One pass over the wakes in flight: resend, or give up at the deadline.
pub async fn sweep_once(m: &Mediator) {
    let mut book = m.book.lock().await;
    if !book.recovered {
        recover(m, &mut book).await;
        book.recovered = true;
    }
    if book.wakes.is_empty() {
        return;
    }
    let now = now_ms();
    let relays: Vec<String> = book.wakes.keys().cloned().collect();
    for relay in relays {
        let Some(w) = book.wakes.get(&relay) else {
            continue;
        };
        match w.due(now, m.cfg.wake_attempts) {
            Due::Timeout => {
                let error = timeout_error(w, m.cfg.wake_timeout_ms);
                give_up(m, &mut book, &relay, now, error, "wake_timeout").await;
            }
            Due::Send => {
                send_wake(m, &mut book, &relay, now).await;
            }
            Due::Wait => {}
        }
    }
}

/// Runs [`sweep_once`] every 100 ms.
pub async fn sweep(m: Arc<Mediator>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sweep_once(&m).await;
    }
}
