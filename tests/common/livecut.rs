//! Checks that a snapshot set of the `counter` guest (guests/counter) is an exact cut: its
//! memory and its vCPU registers are of one instant.
//!
//! The guest's loop keeps its whole state in one register, `r14 = k` (page writes done),
//! with `r12` = the region's guest-physical base and `r13` = its page count `N`. With
//! `c = k / N + 1` and `i = k % N`, at every instruction boundary the first 8 bytes of the
//! region's pages are: pages `[0, i)` hold `c`, page `i` holds `c` or `c - 1`, pages
//! `(i, N)` hold `c - 1` (0 during the first pass). A set whose memory was copied at another
//! moment than its registers (earlier or later, wholly or page by page) breaks this.
//!
//! The state file is read as plain JSON (`PartitionState` of vmm/src/partition/snapshot.rs,
//! whose `vcpus[n].regs` is a `kvm_regs` that kvm-bindings' serde writes as its raw bytes),
//! so nothing here depends on the monitor's types.

use std::path::Path;

use serde_json::Value;
use vm_memory::{Bytes, GuestAddress};

/// The guest's page size (its loop strides by 4 KiB).
pub const PAGE: u64 = 4096;

/// `kvm_regs` as KVM lays it out: 18 u64 in this order.
const KVM_REGS: [&str; 18] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "rflags",
];

/// `(c, i)` of the loop counter `k` over `pages` pages: the pass (from 1) and the page
/// being written.
pub fn position(k: u64, pages: u64) -> (u64, u64) {
    (k / pages + 1, k % pages)
}

/// The pure invariant: `values[p]` is the first u64 of page `p`; `(c, i)` the position.
/// `Err` names the first page that disagrees.
pub fn check_pages(values: &[u64], c: u64, i: u64) -> Result<(), String> {
    let n = values.len() as u64;
    if c == 0 || i >= n {
        return Err(format!(
            "position out of range: c={c}, i={i}, pages={n} (c >= 1, i < pages)"
        ));
    }
    for (p, &v) in (0u64..).zip(values) {
        let ok = match p.cmp(&i) {
            std::cmp::Ordering::Less => v == c,
            std::cmp::Ordering::Equal => v == c || v == c - 1,
            std::cmp::Ordering::Greater => v == c - 1,
        };
        if !ok {
            let expected = match p.cmp(&i) {
                std::cmp::Ordering::Less => format!("{c}"),
                std::cmp::Ordering::Equal => format!("{c} or {}", c - 1),
                std::cmp::Ordering::Greater => format!("{}", c - 1),
            };
            return Err(format!(
                "page {p}: found {v}, expected {expected} (c={c}, i={i}, pages={n})"
            ));
        }
    }
    Ok(())
}

/// Register `reg` of vCPU `vcpu` in a partition state (JSON): `vcpus[vcpu].regs` as
/// kvm-bindings' bytes (an array of numbers), or as an object with named fields.
pub fn vcpu_reg(state: &Value, vcpu: usize, reg: &str) -> Result<u64, String> {
    let regs = &state["vcpus"][vcpu]["regs"];
    if let Some(v) = regs.get(reg) {
        return v
            .as_u64()
            .ok_or_else(|| format!("vcpus[{vcpu}].regs.{reg} is not a number: {v}"));
    }
    let bytes = regs.as_array().ok_or_else(|| {
        format!("vcpus[{vcpu}].regs is neither an object nor a byte array in the state file")
    })?;
    let idx = KVM_REGS
        .iter()
        .position(|r| *r == reg)
        .ok_or_else(|| format!("unknown register {reg}"))?;
    if bytes.len() < KVM_REGS.len() * 8 {
        return Err(format!(
            "vcpus[{vcpu}].regs has {} bytes, a kvm_regs has {}",
            bytes.len(),
            KVM_REGS.len() * 8
        ));
    }
    let mut le = [0u8; 8];
    for (b, v) in le.iter_mut().zip(&bytes[idx * 8..idx * 8 + 8]) {
        *b = v
            .as_u64()
            .and_then(|x| u8::try_from(x).ok())
            .ok_or_else(|| format!("vcpus[{vcpu}].regs holds a non-byte {v}"))?;
    }
    Ok(u64::from_le_bytes(le))
}

/// Checks the `counter` partition `partition` of the set at `set_dir` (its incremental
/// chain resolved by the snapshot crate), whose region is `pages` pages at `base`. Returns
/// `(c, i)` of the cut, or a message naming the first page that disagrees.
pub fn check_counter_cut(
    set_dir: &Path,
    partition: &str,
    base: u64,
    pages: u64,
) -> Result<(u64, u64), String> {
    check_counter_mix(set_dir, set_dir, partition, base, pages)
}

/// As [`check_counter_cut`], with the registers from the set at `state_dir` and the memory
/// from the set at `memory_dir`: two different sets make a torn "set" on purpose, which
/// the tests use to show that the check sees tearing in real data.
pub fn check_counter_mix(
    state_dir: &Path,
    memory_dir: &Path,
    partition: &str,
    base: u64,
    pages: u64,
) -> Result<(u64, u64), String> {
    let at = |dir: &Path| format!("set {} partition {partition}", dir.display());
    if pages == 0 {
        return Err(format!("{}: pages is 0", at(state_dir)));
    }
    let open = |dir: &Path| {
        duplex_snapshot::SnapshotSet::open(dir).map_err(|e| format!("{}: open: {e}", at(dir)))
    };
    let state_set = open(state_dir)?;
    let state_bytes = state_set
        .read_state(partition)
        .map_err(|e| format!("{}: read_state: {e}", at(state_dir)))?;
    let state: Value = serde_json::from_slice(&state_bytes)
        .map_err(|e| format!("{}: state file is not JSON: {e}", at(state_dir)))?;
    let vcpus = state["vcpus"].as_array().map_or(0, Vec::len);
    if vcpus != 1 {
        return Err(format!(
            "{}: {vcpus} vCPUs in the state, expected 1",
            at(state_dir)
        ));
    }
    let reg = |r: &str| vcpu_reg(&state, 0, r).map_err(|e| format!("{}: {e}", at(state_dir)));
    let (r12, r13, k, rip) = (reg("r12")?, reg("r13")?, reg("r14")?, reg("rip")?);
    if r12 != base || r13 != pages {
        return Err(format!(
            "{}: the vCPU is not in the counter loop: r12={r12:#x} r13={r13} rip={rip:#x}, \
             expected r12={base:#x} r13={pages}",
            at(state_dir)
        ));
    }
    let (c, i) = position(k, pages);
    let mem = open(memory_dir)?
        .load_memory(partition, duplex_snapshot::LoadMode::Eager)
        .map_err(|e| format!("{}: load_memory: {e}", at(memory_dir)))?;
    let mut values = Vec::with_capacity(pages as usize);
    for p in 0..pages {
        let gpa = base + p * PAGE;
        let v: u64 = mem
            .read_obj(GuestAddress(gpa))
            .map_err(|e| format!("{}: reading page {p} at {gpa:#x}: {e}", at(memory_dir)))?;
        values.push(v);
    }
    check_pages(&values, c, i).map_err(|e| {
        format!(
            "{}: not an exact cut (k={k}, rip={rip:#x}): {e}",
            at(memory_dir)
        )
    })?;
    Ok((c, i))
}
