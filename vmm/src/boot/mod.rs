//! Kernel loading: PVH ELF images and Linux bzImages, into a partition's guest memory.

pub mod bzimage;
pub mod pvh;

use duplex_devices::GuestMemoryMmap;
use std::path::PathBuf;

/// How the boot vCPU enters the loaded kernel. Both protocols start in 32-bit
/// protected mode with flat segments and paging off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: `EIP = entry`, `EBX = start_info` (guest-physical address of `hvm_start_info`).
    Pvh { entry: u64, start_info: u64 },
    /// Linux 32-bit boot protocol: `EIP = entry` (`code32_start`), `ESI = boot_params`.
    Linux { entry: u64, boot_params: u64 },
}

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("kernel {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The kernel file is neither a PVH ELF nor a bzImage.
    #[error("kernel {path}: not a PVH ELF (no XEN_ELFNOTE_PHYS32_ENTRY note) nor a bzImage")]
    UnknownFormat { path: PathBuf },
    /// An ELF kernel without the PVH entry note.
    #[error("kernel {path}: ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NotPvh { path: PathBuf },
    /// The loader refused the image.
    #[error("kernel {path}: {message}")]
    Load { path: PathBuf, message: String },
    /// The command line is too long or contains a NUL.
    #[error("command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("writing {what} into guest memory: {message}")]
    GuestMemory { what: &'static str, message: String },
}

use std::io::Read;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use crate::layout;

/// The kernel formats Duplex boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF (booted by PVH; the note is checked when loading).
    Elf,
    /// A Linux bzImage.
    BzImage,
}

/// Tells what kind of kernel `path` is, from its first bytes.
pub fn kernel_format(path: &Path) -> Result<KernelFormat, BootError> {
    let open_err = |source| BootError::Open {
        path: path.to_owned(),
        source,
    };
    let mut head = Vec::with_capacity(1024);
    std::fs::File::open(path)
        .map_err(open_err)?
        .take(1024)
        .read_to_end(&mut head)
        .map_err(open_err)?;
    if head.starts_with(b"\x7fELF") {
        Ok(KernelFormat::Elf)
    } else if bzimage::is_bzimage(&head) {
        Ok(KernelFormat::BzImage)
    } else {
        Err(BootError::UnknownFormat {
            path: path.to_owned(),
        })
    }
}

/// Checks that `path` is a kernel Duplex can boot, by loading it into scratch memory of
/// `memory_bytes` (mapped lazily, so this costs only the pages the image touches).
pub fn probe_kernel(path: &Path, memory_bytes: u64) -> Result<(), BootError> {
    kernel_format(path)?;
    let ram = layout::ram_ranges(memory_bytes);
    let ranges: Vec<(GuestAddress, usize)> = ram
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| BootError::GuestMemory {
        what: "scratch memory",
        message: e.to_string(),
    })?;
    load_kernel(&mem, path, "", &ram).map(|_| ())
}

/// Loads the kernel at `path` into `mem` by the protocol its format calls for.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    cmdline: &str,
    ram: &[(u64, u64)],
) -> Result<BootEntry, BootError> {
    match kernel_format(path)? {
        KernelFormat::Elf => pvh::load_pvh(mem, path, cmdline, ram),
        KernelFormat::BzImage => bzimage::load_bzimage(mem, path, cmdline, ram),
    }
}

/// Writes the NUL-terminated command line at [`layout::CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= layout::CMDLINE_MAX {
        return Err(BootError::Cmdline(format!(
            "{} bytes, at most {} allowed",
            cmdline.len(),
            layout::CMDLINE_MAX - 1
        )));
    }
    if cmdline.contains('\0') {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|e| BootError::GuestMemory {
            what: "command line",
            message: e.to_string(),
        })
}
