//! The relay firmware (`docs/relay.md`): keeps a TLS control session to the mediation
//! server, opens a TLS tunnel to a cloud server when asked, and hands the jobs it receives
//! to the controller partition over vsock (`docs/tunnel-protocol.md`).
//!
//! The logic — sessions, heartbeats, backoff, tunnels, jobs — is `duplex_relay::Relay`,
//! which does no I/O; this file runs the loop around it: the network ([`stack`]: smoltcp
//! over the virtio-net card, a pinned-key TLS session per connection), the controller link
//! ([`ctl`]), the clock, and restore detection. Configuration is on the command line
//! (`ip=`, `gw=`, `relay_id=`, `secret=`, `devices=`, `mediator=`, `mediator_pin=`,
//! `cloud_pin=`, ...); a missing or invalid key is printed with its name, and the firmware
//! then only beats (`relay heartbeat N` every 10 s).
//!
//! Console lines: `relay READY ip=<a.b.c.d/n> mac=<mac>`, and from the logic
//! `relay: session up id=<n>`, `relay: session down: <why>`, `relay: tunnel <id> open to
//! <ip:port>`, `relay: job <job_id> done (device job <n>, duplicate=<b>)`,
//! `relay: tunnel <id> closed (<n> jobs)`; after a restore `relay: restored; reconnecting`.
//!
//! Sleep (`sleep_idle_ms=`): on the logic's `Action::Sleep` the loop lets the session's
//! close go out, drops its network stack, prints `relay: asleep` and sleeps in the monitor
//! (`SLEEP`); once woken it builds a fresh stack and the logic logs in again
//! (`relay: woken (magic packet)`). As a substitute it broadcasts magic packets
//! (`relay: sent magic packet for <mac>`).

#![no_std]
#![no_main]

extern crate alloc;

#[path = "../../link/firmware/common.rs"]
mod common;
mod ctl;
mod netdev;
mod profile;
mod stack;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use duplex_relay::config::{endpoint_string, hex, parse_config, parse_net};
use duplex_relay::entropy::RdRand;
use duplex_relay::{mac_string, Action, Peer, Relay};
use duplex_runtime::heartbeat::Heartbeat;
use duplex_runtime::net::open_net;
use duplex_runtime::time::{self, raw_tsc, rdtsc};
use duplex_runtime::vsock::{self, Vsock};
use duplex_runtime::{heap, println, sysctl, BootInfo};

use ctl::CtlLink;
use netdev::NetDevice;
use profile::{since, Profile};
use stack::{NetEvent, Stack};

duplex_runtime::entry!(main);

/// Longest single sleep: a wake the monitor loses costs at most this much latency.
const MAX_WAIT_MS: u64 = 1000;
/// vsock events handled per turn of the loop.
const EVENT_BATCH: usize = 32;
/// Heap growth that is reported (`relay: heap high-water N KiB`).
const HIGH_WATER_STEP: usize = 256 * 1024;
/// Period of the heartbeat of a relay that cannot run.
const PARKED_BEAT_MS: u64 = 10_000;
/// Longest a log line waits while the loop is busy ([`Log`]).
const LOG_DELAY_MS: u64 = 20;
/// Most log lines kept waiting.
const LOG_LINES: usize = 64;

/// Guest time in milliseconds (continues across a restore: the runtime subtracts the
/// time bias).
fn now_ms() -> u64 {
    time::now_ns() / 1_000_000
}

/// The command line with the value of `secret=` replaced by `<redacted>`: consoles end up
/// in log files, the secret must not.
fn redacted(cmdline: &str) -> alloc::string::String {
    let words: alloc::vec::Vec<&str> = cmdline
        .split_ascii_whitespace()
        .map(|w| {
            if w.starts_with("secret=") {
                "secret=<redacted>"
            } else {
                w
            }
        })
        .collect();
    words.join(" ")
}

/// Prints why the relay cannot run, then only beats.
fn park(why: &str) -> ! {
    println!("relay: {why}; not running");
    let mut beat = Heartbeat::new("relay", PARKED_BEAT_MS);
    loop {
        beat.beat();
    }
}

fn main(boot: &BootInfo) -> ! {
    println!(
        "duplex relay: role=relay cmdline=\"{}\"",
        redacted(boot.cmdline)
    );
    let arg = |k: &str| boot.arg(k);
    let net_cfg = parse_net(arg);
    let cfg = parse_config(arg);
    let (net_cfg, mut cfg) = match (net_cfg, cfg) {
        (Ok(n), Ok(c)) => (n, c),
        (n, c) => {
            let errors = n.err().into_iter().chain(c.err()).flatten();
            for e in errors {
                println!("relay: configuration error: {e}");
            }
            park("bad configuration")
        }
    };
    let Some(mut rng) = RdRand::new() else {
        park("the CPU has no RDRAND, so no entropy for TLS")
    };
    let Some(net) = open_net(boot) else {
        park("no network card (virtio-net) on the command line")
    };
    let Some(mut v) = vsock::open_vsock(boot) else {
        park("no vsock device: the controller is unreachable")
    };
    let now = now_ms();
    let mut stack = Stack::new(NetDevice::new(net), net_cfg, rng, now);
    let (ip, m) = (net_cfg.ip, stack.mac());
    // The MAC of the sleep lease and of `Lan` is the card's.
    cfg.mac = Some(m);
    println!(
        "relay: id={} devices={} mediator={} mediator_pin={} cloud_pin={} controller cid {} segment={} sleep_idle_ms={} heap {} KiB",
        cfg.relay_id,
        cfg.devices.join(","),
        endpoint_string(&cfg.mediator),
        hex(&cfg.mediator_pin),
        hex(&cfg.cloud_pin),
        cfg.controller_cid,
        cfg.segment.as_deref().unwrap_or("none"),
        cfg.sleep_idle_ms.unwrap_or(0),
        boot.heap.1 / 1024,
    );
    let (mediator_pin, cloud_pin) = (cfg.mediator_pin, cfg.cloud_pin);
    let mut ctl = CtlLink::new(cfg.controller_cid);
    let mut logic = Relay::new(cfg, Box::new(move || rng.random()), now);
    println!(
        "relay READY ip={}.{}.{}.{}/{} mac={}",
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        net_cfg.prefix_len,
        mac_string(&m)
    );
    let mut cx = Cx {
        pins: Pins {
            mediator: mediator_pin,
            cloud: cloud_pin,
        },
        prof: Profile::new(arg("profile") == Some("1")),
        log: Log::default(),
        sleep_at: None,
    };
    let mut high_water = HighWater(heap::used());
    let mut bias = time::bias();
    loop {
        cx.prof.turns += 1;
        let now = now_ms();
        let b = time::bias();
        if b != bias {
            bias = b;
            cx.log.push("relay: restored; reconnecting".into(), now);
            stack.reset(now);
            logic.on_restored(now);
        }
        let mut busy = false;
        for _ in 0..EVENT_BATCH {
            match vsock::poll(&mut v) {
                Ok(Some(event)) => {
                    ctl.handle(&mut v, event, &mut logic, now);
                    busy = true;
                }
                Ok(None) => break,
                Err(e) => {
                    cx.log.push(format!("relay: vsock: {e}"), now);
                    break;
                }
            }
        }
        let (events, moved) = stack.poll(now, &mut cx.prof);
        busy |= moved;
        for event in events {
            match event {
                NetEvent::Connected(id) => logic.on_connected(id, now),
                NetEvent::Data(id, bytes) => {
                    let t0 = raw_tsc();
                    logic.on_data(id, &bytes, now);
                    cx.prof.logic += since(t0);
                    cx.prof.plaintext_bytes += bytes.len() as u64;
                }
                NetEvent::Closed(id, why) => logic.on_closed(id, &why, now),
            }
        }
        logic.on_tick(now);
        busy |= apply(
            logic.take_actions(),
            &mut stack,
            &mut ctl,
            &mut v,
            &mut logic,
            &mut cx,
        );
        busy |= ctl.flush(&mut v, &mut logic, now);
        busy |= apply(
            logic.take_actions(),
            &mut stack,
            &mut ctl,
            &mut v,
            &mut logic,
            &mut cx,
        );
        high_water.check(&mut cx.log, now);
        if let Some(at) = cx.sleep_at {
            if !logic.is_sleeping() {
                // A restore in the grace period woke the logic: it is dialling again.
                cx.sleep_at = None;
            } else if stack.connections() == 0 || now >= at {
                cx.sleep_at = None;
                hibernate(&mut stack, &mut logic, &mut cx.log);
                // A restore while asleep (the set held the partition asleep) is part of
                // this one fresh start, not a second one.
                let b = time::bias();
                if b != bias {
                    bias = b;
                    cx.log.push("relay: restored while asleep".into(), now_ms());
                }
                continue;
            }
        }
        if busy || stack.has_frame() {
            cx.log.flush_overdue(now);
            continue;
        }
        cx.log.flush();
        let t0 = raw_tsc();
        sleep(now, &logic, &mut stack, &ctl);
        cx.prof.sleep += since(t0);
        cx.prof.sleeps += 1;
    }
}

/// Reports the heap's high-water mark, in steps of [`HIGH_WATER_STEP`].
struct HighWater(usize);

impl HighWater {
    fn check(&mut self, log: &mut Log, now: u64) {
        let used = heap::used();
        if used >= self.0.saturating_add(HIGH_WATER_STEP) {
            self.0 = used;
            log.push(format!("relay: heap high-water {} KiB", used / 1024), now);
        }
    }
}

/// The servers' pins.
struct Pins {
    mediator: [u8; 32],
    cloud: [u8; 32],
}

/// The loop's console lines, printed when it is about to sleep, or once the oldest has
/// waited [`LOG_DELAY_MS`] (or [`LOG_LINES`] wait): each console byte is a VM exit (about
/// 25 µs here), so a 50-byte line printed between a tunnel request and its dial would add
/// more than a millisecond to the tunnel's opening.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    /// When the oldest waiting line was queued (ms).
    since: u64,
}

impl Log {
    fn push(&mut self, line: String, now: u64) {
        if self.lines.is_empty() {
            self.since = now;
        }
        self.lines.push(line);
        if self.lines.len() >= LOG_LINES {
            self.flush();
        }
    }

    /// Prints the lines if the oldest has waited long enough.
    fn flush_overdue(&mut self, now: u64) {
        if !self.lines.is_empty() && now.saturating_sub(self.since) >= LOG_DELAY_MS {
            self.flush();
        }
    }

    fn flush(&mut self) {
        for line in self.lines.drain(..) {
            println!("{line}");
        }
    }
}

/// What the loop carries besides the logic and the devices.
struct Cx {
    pins: Pins,
    prof: Profile,
    log: Log,
    /// The logic asked to sleep: sleep once the closed connections are gone, or at this
    /// time (ms) at the latest.
    sleep_at: Option<u64>,
}

/// Sleeps in the monitor until woken, with no network state: every socket and the
/// interface are dropped before, and a fresh interface (empty ARP cache, new local ports
/// and ISN seed; the same virtio-net card) is built after. Then the logic hears of the wake
/// and logs in again.
fn hibernate(stack: &mut Stack, logic: &mut Relay, log: &mut Log) {
    log.push("relay: asleep".into(), now_ms());
    log.flush();
    stack.reset(now_ms());
    let reason = match sysctl::sleep() {
        sysctl::wake_reason::MAGIC_PACKET => String::from("magic packet"),
        sysctl::wake_reason::OPERATOR => String::from("operator"),
        n => format!("unknown ({n})"),
    };
    let now = now_ms();
    stack.reset(now);
    logic.on_woken(&reason, now);
}

/// Carries out the logic's actions; returns whether there were any. With `profile=1` a
/// dial is noted and a close prints the connection's profile line.
fn apply(
    actions: Vec<Action>,
    stack: &mut Stack,
    ctl: &mut CtlLink,
    v: &mut Vsock,
    logic: &mut Relay,
    cx: &mut Cx,
) -> bool {
    let any = !actions.is_empty();
    let now = now_ms();
    for a in actions {
        match a {
            Action::Dial {
                conn,
                endpoint,
                peer,
            } => {
                let (pin, rx_buffer) = match peer {
                    Peer::Mediator => (cx.pins.mediator, stack::SESSION_RX_BUFFER),
                    Peer::Cloud => (cx.pins.cloud, stack::TUNNEL_RX_BUFFER),
                };
                stack.dial(conn, endpoint, pin, rx_buffer);
                cx.prof.dialed(conn, stack.card_ticks());
            }
            Action::Send { conn, bytes } => stack.send(conn, &bytes),
            Action::Close { conn } => {
                stack.close(conn, now);
                if let Some(line) = cx.prof.closed(conn, stack.card_ticks()) {
                    cx.log.push(line, now);
                }
            }
            Action::ControllerConnect => ctl.connect(v, logic, now),
            Action::ControllerSend(req) => ctl.send(&req),
            Action::ControllerClose => ctl.close(v),
            Action::Log(line) => cx.log.push(format!("relay: {line}"), now),
            // Let the session's close go out first (at most the close grace).
            Action::Sleep => cx.sleep_at = Some(now.saturating_add(stack::CLOSE_GRACE_MS)),
            Action::SendMagic { wake_id, mac } => {
                let result = stack.send_magic(mac, now);
                if result.is_ok() {
                    cx.log.push(
                        format!("relay: sent magic packet for {}", mac_string(&mac)),
                        now,
                    );
                }
                logic.on_magic_sent(wake_id, result, now);
            }
        }
    }
    any
}

/// Sleeps until the next deadline of the logic, the network or the controller link (at
/// most [`MAX_WAIT_MS`]); the monitor wakes the vCPU early when a frame or a vsock packet
/// arrives.
fn sleep(now: u64, logic: &Relay, stack: &mut Stack, ctl: &CtlLink) {
    let deadline_ms = [logic.next_deadline(), stack.deadline(now)]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(u64::MAX)
        .min(now.saturating_add(MAX_WAIT_MS));
    // At least 1 ms: a timer due now was just run, so a 0 here would only spin.
    let wait_ms = deadline_ms.saturating_sub(now).max(1);
    let mut deadline = rdtsc().saturating_add(time::ns_to_ticks(wait_ms.saturating_mul(1_000_000)));
    if let Some(d) = ctl.deadline() {
        deadline = deadline.min(d);
    }
    sysctl::wait_until(deadline);
}
