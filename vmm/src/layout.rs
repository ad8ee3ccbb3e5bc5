//! The guest-physical memory map every partition gets (see `docs/guest-abi.md`).

/// Where the PVH `hvm_start_info` structure is written.
pub const PVH_START_INFO: u64 = 0x6000;
/// Where the PVH memory map (`hvm_memmap_table_entry[]`) is written.
pub const PVH_MEMMAP: u64 = 0x7000;
/// Where the Linux `boot_params` zero page is written (bzImage boot).
pub const ZERO_PAGE: u64 = 0x7000;
/// Where the kernel command line is written (NUL-terminated).
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line, including its NUL.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Where kernels are loaded (ELF physical addresses normally start here too).
pub const KERNEL_START: u64 = 0x10_0000;
/// End of low RAM: RAM above this moves to [`HIGH_RAM_START`].
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// Start of the RAM that does not fit below [`LOW_RAM_END`].
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// The MMIO window for devices.
pub const MMIO_START: u64 = 0xD000_0000;
/// Size of the MMIO window.
pub const MMIO_SIZE: u64 = 0x10_0000;
/// The console UART's MMIO address (8 one-byte registers).
pub const CONSOLE_MMIO: u64 = MMIO_START;
/// The console UART's I/O port base (COM1).
pub const CONSOLE_PIO: u16 = 0x3f8;
/// The system control page.
pub const SYSCTL_MMIO: u64 = MMIO_START + 0x1000;
/// The first virtio-mmio device window (the vsock device), 4 KiB.
pub const VIRTIO_MMIO_START: u64 = MMIO_START + 0x2000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The GSI of the vsock device's interrupt.
pub const VSOCK_GSI: u32 = 5;
/// The second virtio-mmio device window (the network card), 4 KiB.
pub const NET_MMIO: u64 = VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE;
/// The GSI of the network card's interrupt.
pub const NET_GSI: u32 = 6;
/// The third virtio-mmio device window (the disk), 4 KiB.
pub const BLK_MMIO: u64 = NET_MMIO + VIRTIO_MMIO_SIZE;
/// The GSI of the disk's interrupt.
pub const BLK_GSI: u32 = 7;
/// The GSI of the console UART (COM1).
pub const CONSOLE_GSI: u32 = 4;

/// The kernel command line entry announcing a virtio-mmio window at `addr` with interrupt
/// `gsi`, in Linux's syntax.
fn virtio_cmdline_entry(addr: u64, gsi: u32) -> String {
    format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        VIRTIO_MMIO_SIZE >> 10,
        addr,
        gsi
    )
}

/// The kernel command line entry announcing the vsock device.
pub fn vsock_cmdline_entry() -> String {
    virtio_cmdline_entry(VIRTIO_MMIO_START, VSOCK_GSI)
}

/// The kernel command line entry announcing the network card.
pub fn net_cmdline_entry() -> String {
    virtio_cmdline_entry(NET_MMIO, NET_GSI)
}

/// The kernel command line entry announcing the disk.
pub fn blk_cmdline_entry() -> String {
    virtio_cmdline_entry(BLK_MMIO, BLK_GSI)
}

/// Where KVM's TSS for real-mode emulation lives (3 pages, inside the MMIO hole).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// The guest RAM ranges `(start, length)` for a partition of `bytes` bytes.
pub fn ram_ranges(bytes: u64) -> Vec<(u64, u64)> {
    if bytes <= LOW_RAM_END {
        vec![(0, bytes)]
    } else {
        vec![(0, LOW_RAM_END), (HIGH_RAM_START, bytes - LOW_RAM_END)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
    }

    #[test]
    fn vsock_cmdline_entry_uses_linux_syntax() {
        assert_eq!(vsock_cmdline_entry(), "virtio_mmio.device=4K@0xd0002000:5");
        assert_eq!(net_cmdline_entry(), "virtio_mmio.device=4K@0xd0003000:6");
        assert_eq!(blk_cmdline_entry(), "virtio_mmio.device=4K@0xd0004000:7");
        const { assert!(BLK_MMIO + VIRTIO_MMIO_SIZE <= MMIO_START + MMIO_SIZE) };
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![(0, LOW_RAM_END), (HIGH_RAM_START, (4 << 30) - LOW_RAM_END)]
        );
        assert!(r[0].0 + r[0].1 <= MMIO_START);
    }
}
