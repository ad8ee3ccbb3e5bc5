//! Random numbers from the CPU's `RDRAND` instruction (allowed in ring 3, no VM exit).
//!
//! [`RdRand`] is a `rand_core` RNG for embedded-tls (its ECDHE key shares and client
//! random) and, through [`RdRand::random`], the source of the reconnect jitter. `RDRAND` may
//! fail transiently (carry flag clear); each draw retries up to [`RETRIES`] times. A CPU
//! whose `RDRAND` keeps failing has a broken random generator, and the relay must not make
//! TLS keys from it: [`RdRand::try_next`] reports it, and the `RngCore` methods panic.

use rand_core::{CryptoRng, RngCore};

/// Attempts per draw before `RDRAND` is declared broken (Intel recommends 10).
pub const RETRIES: usize = 100;

/// The `RDRAND` random number generator.
#[derive(Clone, Copy, Debug)]
pub struct RdRand(());

/// Whether CPUID says the CPU has `RDRAND` (leaf 1, ECX bit 30).
pub fn has_rdrand() -> bool {
    let ecx: u32;
    // SAFETY: CPUID leaf 1 exists on every x86-64 CPU; the instruction only writes the four
    // registers named here (RBX is saved and restored, as LLVM reserves it).
    unsafe {
        core::arch::asm!(
            "mov {save:r}, rbx",
            "cpuid",
            "mov rbx, {save:r}",
            save = out(reg) _,
            inout("eax") 1u32 => _,
            inout("ecx") 0u32 => ecx,
            out("edx") _,
            options(nomem, nostack, preserves_flags),
        );
    }
    ecx & (1 << 30) != 0
}

/// One `RDRAND` attempt.
fn rdrand64() -> Option<u64> {
    let value: u64;
    let ok: u8;
    // SAFETY: only executed after `has_rdrand` said the instruction exists; it writes the
    // named registers and the flags, and touches no memory.
    unsafe {
        core::arch::asm!(
            "rdrand {v}",
            "setc {ok}",
            v = out(reg) value,
            ok = out(reg_byte) ok,
            options(nomem, nostack),
        );
    }
    (ok == 1).then_some(value)
}

impl RdRand {
    /// The generator, if the CPU has `RDRAND`.
    pub fn new() -> Option<Self> {
        has_rdrand().then_some(RdRand(()))
    }

    /// 64 random bits, or `None` if `RDRAND` failed [`RETRIES`] times in a row.
    pub fn try_next(&mut self) -> Option<u64> {
        (0..RETRIES).find_map(|_| rdrand64())
    }

    /// 64 random bits.
    ///
    /// # Panics
    ///
    /// If `RDRAND` failed [`RETRIES`] times in a row (a broken random generator).
    pub fn random(&mut self) -> u64 {
        match self.try_next() {
            Some(v) => v,
            None => panic!("RDRAND failed {RETRIES} times in a row: no entropy"),
        }
    }
}

impl RngCore for RdRand {
    fn next_u32(&mut self) -> u32 {
        self.random() as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.random()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.random().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        for chunk in dest.chunks_mut(8) {
            let v = self.try_next().ok_or_else(rdrand_broken)?.to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}

impl CryptoRng for RdRand {}

/// The `rand_core` error for a failing `RDRAND` (the first custom code).
fn rdrand_broken() -> rand_core::Error {
    match core::num::NonZeroU32::new(rand_core::Error::CUSTOM_START) {
        Some(code) => rand_core::Error::from(code),
        None => unreachable!("CUSTOM_START is not 0"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdrand_gives_varied_values_on_this_cpu() {
        let Some(mut r) = RdRand::new() else {
            std::println!("no RDRAND on this CPU; skipped");
            return;
        };
        let a = r.random();
        let b = r.random();
        assert_ne!(a, b);
        let mut buf = [0u8; 13];
        r.fill_bytes(&mut buf);
        assert!(buf.iter().any(|&x| x != 0));
    }
}
