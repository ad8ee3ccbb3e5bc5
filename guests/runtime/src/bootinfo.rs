//! What the firmware learns at boot: the PVH `hvm_start_info` (command line, memory map)
//! and the TSC frequency from the system control page.

use core::fmt;

/// `hvm_start_info.magic`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Memory map entry type: usable RAM.
pub const E820_RAM: u32 = 1;
/// Memory map entry type: reserved.
pub const E820_RESERVED: u32 = 2;
/// Longest command line the monitor writes, including its NUL.
const CMDLINE_MAX: usize = 0x1_0000;
/// More memory map entries than this means the start info is garbage.
const MEMMAP_MAX: u32 = 128;

/// The PVH start info (Xen's `struct hvm_start_info`, version 1).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// One PVH memory map entry (Xen's `struct hvm_memmap_table_entry`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemMapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type: [`E820_RAM`], [`E820_RESERVED`], ...
    pub kind: u32,
    reserved: u32,
}

impl MemMapEntry {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }

    /// Whether this is usable RAM.
    pub fn is_ram(&self) -> bool {
        self.kind == E820_RAM
    }

    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        self.addr <= addr && addr < self.end()
    }
}

/// Boot information handed to the firmware's `main`.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// The kernel command line (up to the first NUL or invalid UTF-8).
    pub cmdline: &'static str,
    /// The memory map, as the monitor wrote it.
    pub memory_map: &'static [MemMapEntry],
    /// The TSC frequency in kHz.
    pub tsc_khz: u64,
    /// The heap: start address and size in bytes.
    pub heap: (usize, usize),
}

impl BootInfo {
    /// The value of `key=value` on the command line (the last one wins); `""` for a bare `key`.
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        cmdline_arg(self.cmdline, key)
    }

    /// [`BootInfo::arg`] parsed as a number (decimal, or hex with `0x`).
    pub fn arg_u64(&self, key: &str) -> Option<u64> {
        self.arg(key).and_then(parse_u64)
    }

    /// The RAM entries of the memory map.
    pub fn ram(&self) -> impl Iterator<Item = &'static MemMapEntry> {
        self.memory_map.iter().filter(|e| e.is_ram())
    }
}

/// Finds `key=value` in a whitespace-separated command line (the last one wins).
pub fn cmdline_arg<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_ascii_whitespace().rev().find_map(|word| {
        let rest = word.strip_prefix(key)?;
        if rest.is_empty() {
            Some(rest)
        } else {
            rest.strip_prefix('=')
        }
    })
}

/// Parses a decimal or `0x` hexadecimal number.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Why the start info could not be used.
#[derive(Clone, Copy, Debug)]
pub enum BootInfoError {
    /// `hvm_start_info.magic` is wrong.
    BadMagic(u32),
    /// The memory map is missing or absurd.
    BadMemoryMap(u32),
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootInfoError::BadMagic(m) => write!(f, "bad hvm_start_info magic {m:#x}"),
            BootInfoError::BadMemoryMap(n) => write!(f, "bad PVH memory map ({n} entries)"),
        }
    }
}

/// Reads the command line and memory map from the `hvm_start_info` at `paddr`.
///
/// # Safety
///
/// `paddr` must be the address the monitor passed in `EBX`; the structure, the command
/// line and the memory map it points to must stay unchanged for the rest of the run (the
/// runtime never allocates below the image, so they do).
pub(crate) unsafe fn parse(
    paddr: u64,
) -> Result<(&'static str, &'static [MemMapEntry]), BootInfoError> {
    // SAFETY: per this function's contract `paddr` points to an identity-mapped, aligned
    // `hvm_start_info`; it is read by value.
    let info = unsafe { core::ptr::read_volatile(paddr as *const HvmStartInfo) };
    if info.magic != HVM_START_MAGIC {
        return Err(BootInfoError::BadMagic(info.magic));
    }
    // SAFETY: the command line is a NUL-terminated string the monitor wrote (contract).
    let cmdline = unsafe { read_cmdline(info.cmdline_paddr) };
    if info.version < 1 || info.memmap_paddr == 0 || info.memmap_entries > MEMMAP_MAX {
        return Err(BootInfoError::BadMemoryMap(info.memmap_entries));
    }
    // SAFETY: version >= 1, so `memmap_paddr` points to `memmap_entries` 8-byte aligned
    // entries written by the monitor that nothing overwrites (contract).
    let map = unsafe {
        core::slice::from_raw_parts(
            info.memmap_paddr as *const MemMapEntry,
            info.memmap_entries as usize,
        )
    };
    Ok((cmdline, map))
}

/// Reads the NUL-terminated command line at `paddr` (`""` if `paddr` is 0).
///
/// # Safety
///
/// As for [`parse`].
unsafe fn read_cmdline(paddr: u64) -> &'static str {
    if paddr == 0 {
        return "";
    }
    let base = paddr as *const u8;
    let mut len = 0;
    // SAFETY: the monitor's command line area holds at most CMDLINE_MAX bytes including
    // the NUL; reads stop at the NUL or at that bound, all inside identity-mapped RAM.
    while len < CMDLINE_MAX - 1 && unsafe { *base.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes just scanned are readable and never change (contract).
    let bytes = unsafe { core::slice::from_raw_parts(base, len) };
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        // Keep the valid prefix; `valid_up_to` is a char boundary.
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}
