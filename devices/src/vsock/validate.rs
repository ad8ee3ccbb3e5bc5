//! Validation of a saved [`SwitchState`]: every packet and connection is one the switch
//! could have made, within its caps. Pure (depends on the state and packet types and the
//! limits only).

use std::collections::BTreeMap;

use super::limits::{
    BACKLOG_CAP, CONTROL_SLACK, HOST_BUF_ALLOC, MAX_CONNECT_LINE, MAX_CONNS_PER_CID, MIN_GUEST_CID,
};
use super::packet::{op, Pending, HOST_CID, MAX_PKT_DATA, TYPE_STREAM};
use super::state::{HostOrigin, SwitchState};
use super::table::FIRST_HOST_PORT;

/// Whether `cid` can be a partition's.
pub(crate) fn guest_cid(cid: u64) -> bool {
    (MIN_GUEST_CID..u64::from(u32::MAX)).contains(&cid)
}

/// Checks a saved switch state: every packet and connection is one the switch could have
/// made, within its caps. Returns what is wrong.
pub(crate) fn validate(set: &SwitchState) -> Result<(), String> {
    for (&cid, backlog) in &set.backlogs {
        if !guest_cid(cid) {
            return Err(format!("backlog of reserved CID {cid}"));
        }
        let mut bytes = 0usize;
        for p in &backlog.packets {
            validate_packet(cid, p)?;
            bytes += p.cost();
        }
        if bytes > BACKLOG_CAP + CONTROL_SLACK {
            return Err(format!(
                "backlog of CID {cid} holds {bytes} bytes, over its cap"
            ));
        }
    }
    let mut per_cid: BTreeMap<u64, usize> = BTreeMap::new();
    for (key, c) in &set.conns {
        let name = format!("connection {} -> {}", c.client, c.server);
        if *key != (c.client, c.server) {
            return Err(format!("{name}: key does not match"));
        }
        let hosts = [c.client, c.server]
            .iter()
            .filter(|e| e.cid == HOST_CID)
            .count();
        for side in [c.client, c.server] {
            if side.cid == HOST_CID {
                continue;
            }
            if !set.backlogs.contains_key(&side.cid) {
                return Err(format!("{name}: CID {} was not attached", side.cid));
            }
            let n = per_cid.entry(side.cid).or_default();
            *n += 1;
            if *n > MAX_CONNS_PER_CID {
                return Err(format!("CID {} has too many connections", side.cid));
            }
        }
        match (hosts, &c.host) {
            (0, None) => {}
            (1, Some(link)) => {
                let origin_ok = match link.origin {
                    HostOrigin::Connect => c.client.cid == HOST_CID,
                    HostOrigin::Guest => c.server.cid == HOST_CID,
                };
                if !origin_ok {
                    return Err(format!("{name}: host side does not match its origin"));
                }
                if link.buf_alloc == 0 || link.buf_alloc > HOST_BUF_ALLOC {
                    return Err(format!("{name}: host buffer of {} bytes", link.buf_alloc));
                }
                if link.to_host.len() > link.buf_alloc as usize {
                    return Err(format!("{name}: more bytes for the host than its buffer"));
                }
                if link.early_data.len() > MAX_CONNECT_LINE {
                    return Err(format!("{name}: too much early host data"));
                }
            }
            _ => return Err(format!("{name}: host link does not match its endpoints")),
        }
    }
    if set.next_host_port < FIRST_HOST_PORT {
        return Err(format!("next host port {} is too low", set.next_host_port));
    }
    Ok(())
}

/// A queued packet is one the switch could have queued for `cid`.
fn validate_packet(cid: u64, p: &Pending) -> Result<(), String> {
    let h = &p.hdr;
    let what = format!(
        "packet {} -> {} op {} in CID {cid}'s backlog",
        h.src(),
        h.dst(),
        h.op
    );
    let ok = h.dst_cid == cid
        && h.type_ == TYPE_STREAM
        && (op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op)
        && p.data.len() <= MAX_PKT_DATA as usize
        && h.len as usize == p.data.len()
        && (p.data.is_empty() || h.op == op::RW)
        && (p.sent < p.data.len() || (p.sent == 0 && p.data.is_empty()));
    if ok {
        Ok(())
    } else {
        Err(format!("{what} is not valid"))
    }
}
