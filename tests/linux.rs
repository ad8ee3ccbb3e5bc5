//! Opt-in end-to-end: boot a real Linux bzImage (Debian's cloud kernel) as a partition
//! and see it print its banner on the console. Runs only when `DUPLEX_LINUX_KERNEL`
//! names a bzImage: on nested KVM, where guest ring 0 is emulated, Linux takes minutes
//! to get anywhere, so `scripts/test` skips it (counted as skipped) unless the variable
//! is set. Run: `DUPLEX_LINUX_KERNEL=$(scripts/fetch-linux-kernel) cargo test -p duplex-vmm --test linux`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn linux_kernel_boots_to_its_banner() {
    require_kvm();
    let kernel = std::env::var("DUPLEX_LINUX_KERNEL")
        .ok()
        .filter(|k| !k.is_empty())
        .expect("SKIPPED-BY-ENVIRONMENT: set DUPLEX_LINUX_KERNEL to a bzImage to run this test");
    let minutes: u64 = std::env::var("DUPLEX_LINUX_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(15);
    let mut dev = Device::boot(&json!({"partitions": [{
        "name": "linux", "role": "other", "kernel": kernel, "memory_mib": 256, "vcpus": 1,
        "cmdline": "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 noapic nolapic",
        "console": "stdout"
    }]}));
    let line = dev.wait_line("linux", "Linux version", Duration::from_secs(minutes * 60));
    assert!(line.contains("Linux version"));
    assert!(dev.shutdown().success());
}
