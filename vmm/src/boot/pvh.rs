//! PVH boot: load an ELF kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note (linux-loader),
//! write the command line, `hvm_start_info` and the memory map.

use duplex_devices::GuestMemoryMmap;
use std::fs::File;
use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::GuestAddress;

use super::{write_cmdline, BootEntry, BootError};
use crate::layout;

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved ranges.
pub const E820_RESERVED: u32 = 2;

/// The memory map a guest of `ram` gets: RAM ranges minus the first page, plus the
/// reserved first page and MMIO window. Sorted by address.
pub fn memory_map(ram: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, 0x1000, E820_RESERVED)];
    for &(start, len) in ram {
        let (start, len) = if start == 0 {
            (0x1000, len.saturating_sub(0x1000))
        } else {
            (start, len)
        };
        map.push((start, len, E820_RAM));
    }
    map.push((layout::MMIO_START, layout::MMIO_SIZE, E820_RESERVED));
    map.sort_by_key(|e| e.0);
    map
}

/// Loads the PVH ELF at `path` into `mem`, with `cmdline`, for a guest of RAM `ram`.
pub fn load_pvh(
    mem: &GuestMemoryMmap,
    path: &Path,
    cmdline: &str,
    ram: &[(u64, u64)],
) -> Result<BootEntry, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Open {
        path: path.to_owned(),
        source,
    })?;
    let loaded = Elf::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::KERNEL_START)),
    )
    .map_err(|e| BootError::Load {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => {
            return Err(BootError::NotPvh {
                path: path.to_owned(),
            })
        }
    };
    write_cmdline(mem, cmdline)?;

    let map: Vec<hvm_memmap_table_entry> = memory_map(ram)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_START_INFO));
    params.set_sections(&map, GuestAddress(layout::PVH_MEMMAP));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(|e| {
        BootError::GuestMemory {
            what: "hvm_start_info",
            message: e.to_string(),
        }
    })?;
    Ok(BootEntry::Pvh {
        entry,
        start_info: layout::PVH_START_INFO,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_reserves_first_page_and_mmio() {
        let map = memory_map(&layout::ram_ranges(64 << 20));
        assert_eq!(
            map,
            vec![
                (0, 0x1000, E820_RESERVED),
                (0x1000, (64 << 20) - 0x1000, E820_RAM),
                (layout::MMIO_START, layout::MMIO_SIZE, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn memory_map_of_large_guest_has_high_ram_last() {
        let map = memory_map(&layout::ram_ranges(5 << 30));
        assert_eq!(
            map.last().map(|e| (e.0, e.2)),
            Some((layout::HIGH_RAM_START, E820_RAM))
        );
    }

    #[test]
    fn non_pvh_elf_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        // The test binary itself is an ELF without a PVH note (and linked far too high).
        let me = std::env::current_exe().expect("exe");
        let err = load_pvh(&mem, &me, "", &[(0, 64 << 20)]).expect_err("must refuse");
        let msg = err.to_string();
        assert!(msg.contains(&me.display().to_string()), "{msg}");
    }
}
