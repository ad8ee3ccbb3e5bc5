//! Linux bzImage boot through the 32-bit boot protocol (`Documentation/arch/x86/boot.rst`).
//!
//! The protected-mode part of the image is loaded at [`layout::KERNEL_START`], the command
//! line at [`layout::CMDLINE_START`], and a `boot_params` zero page built from the image's
//! setup header at [`layout::ZERO_PAGE`]. The real-mode setup code is not run: the boot vCPU
//! enters `code32_start` in 32-bit protected mode with `ESI` = the zero page (see
//! `docs/linux-boot.md`).

use duplex_devices::GuestMemoryMmap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH,
};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, GuestAddress};

use super::pvh::memory_map;
use super::{BootEntry, BootError};
use crate::layout;

/// Offset of the setup header in a bzImage (and in `boot_params`).
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Offset of the `HdrS` magic.
const HDRS_OFFSET: usize = 0x202;
/// The `HdrS` magic.
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
/// Oldest boot protocol accepted: 2.06 gives `cmdline_size` and a 32-bit entry we can trust.
const MIN_PROTOCOL: u16 = 0x0206;
/// `type_of_loader` for a boot loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// How much of the file is read to check the header (the setup header ends before 0x280).
const HEADER_BYTES: usize = 1024;

/// Whether `header` (the first bytes of a file, at least 0x206 of them) is a bzImage: the
/// `HdrS` magic at offset 0x202.
pub fn is_bzimage(header: &[u8]) -> bool {
    header.get(HDRS_OFFSET..HDRS_OFFSET + HDRS_MAGIC.len()) == Some(HDRS_MAGIC.as_slice())
}

/// Loads the bzImage `kernel` into `mem` with `cmdline` and an e820 map of `ram`
/// (`(start, length)` ranges), and returns how to enter it.
pub fn load_bzimage(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    cmdline: &str,
    ram: &[(u64, u64)],
) -> Result<BootEntry, BootError> {
    let load_err = |message: String| BootError::Load {
        path: kernel.to_path_buf(),
        message,
    };
    let open_err = |source: std::io::Error| BootError::Open {
        path: kernel.to_path_buf(),
        source,
    };

    let mut file = File::open(kernel).map_err(open_err)?;
    let file_len = file.metadata().map_err(open_err)?.len();
    let mut header = Vec::with_capacity(HEADER_BYTES);
    (&mut file)
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut header)
        .map_err(open_err)?;
    if !is_bzimage(&header) {
        return Err(BootError::UnknownFormat {
            path: kernel.to_path_buf(),
        });
    }
    let hdr = parse_setup_header(&header)
        .ok_or_else(|| load_err("bzImage setup header is truncated".into()))?;
    check_header(&hdr, file_len).map_err(load_err)?;
    check_memory(&hdr, ram).map_err(load_err)?;

    // Command line first: it is cheap to check and its error is the caller's.
    check_cmdline(cmdline, &hdr)?;

    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(layout::KERNEL_START)),
        &mut file,
        Some(GuestAddress(layout::KERNEL_START)),
    )
    .map_err(|e| load_err(e.to_string()))?;
    let setup = loaded
        .setup_header
        .ok_or_else(|| load_err("the loader returned no setup header".into()))?;
    log::debug!(
        "bzImage {}: protocol {}.{:02}, protected-mode kernel {:#x}..{:#x}",
        kernel.display(),
        hdr.version >> 8,
        hdr.version & 0xff,
        layout::KERNEL_START,
        loaded.kernel_end
    );

    super::write_cmdline(mem, cmdline)?;

    let mut params = boot_params {
        hdr: setup,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    // CAN_USE_HEAP/heap_end_ptr only matter to the real-mode setup code, which is not run.
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    params.hdr.ramdisk_image = 0;
    params.hdr.ramdisk_size = 0;
    params.ext_cmd_line_ptr = 0;

    // The same map the PVH boot gives: RAM type 1, first page and MMIO window type 2.
    let map = memory_map(ram);
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(load_err(format!(
            "{} memory map entries, the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}",
            map.len()
        )));
    }
    for (slot, &(addr, size, r#type)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr, size, r#type };
    }
    params.e820_entries = map.len() as u8;

    let bp = BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem).map_err(|e| {
        BootError::GuestMemory {
            what: "the boot_params zero page",
            message: e.to_string(),
        }
    })?;

    Ok(BootEntry::Linux {
        entry: u64::from(setup.code32_start),
        boot_params: layout::ZERO_PAGE,
    })
}

/// The setup header from the first bytes of the file, if they hold all of it.
fn parse_setup_header(header: &[u8]) -> Option<setup_header> {
    let mut hdr = setup_header::default();
    let len = hdr.as_slice().len();
    let bytes = header.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + len)?;
    hdr.as_mut_slice().copy_from_slice(bytes);
    Some(hdr)
}

/// Checks what the loader relies on before anything is written to guest memory.
fn check_header(hdr: &setup_header, file_len: u64) -> Result<(), String> {
    let version = hdr.version;
    if version < MIN_PROTOCOL {
        return Err(format!(
            "bzImage boot protocol {}.{:02} is too old (2.06 or later needed)",
            version >> 8,
            version & 0xff
        ));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err("zImage (loaded low) is not supported, only bzImage".into());
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_bytes = (setup_sects + 1) * 512;
    let kernel_bytes = u64::from(hdr.syssize) * 16;
    if file_len < setup_bytes + kernel_bytes {
        return Err(format!(
            "bzImage is truncated: {file_len} bytes, its header says {} (setup {setup_bytes} + kernel {kernel_bytes})",
            setup_bytes + kernel_bytes
        ));
    }
    Ok(())
}

/// Checks that one RAM range holds the kernel where it decompresses itself: from
/// `pref_address` (where a relocatable kernel below it moves to) for `init_size` bytes
/// (protocol 2.10 and later; older headers lack the fields).
fn check_memory(hdr: &setup_header, ram: &[(u64, u64)]) -> Result<(), String> {
    if hdr.version < 0x020a {
        return Ok(());
    }
    let need_end = hdr
        .pref_address
        .max(layout::KERNEL_START)
        .saturating_add(u64::from(hdr.init_size));
    let fits = ram.iter().any(|&(start, len)| {
        start <= layout::KERNEL_START && start.saturating_add(len) >= need_end
    });
    if fits {
        Ok(())
    } else {
        Err(format!(
            "guest memory too small: the kernel needs RAM from {:#x} up to {need_end:#x} ({} MiB)",
            layout::KERNEL_START,
            need_end.div_ceil(1 << 20)
        ))
    }
}

/// Checks `cmdline` against the kernel's limit (`cmdline_size` bytes without the NUL, and
/// at most [`layout::CMDLINE_MAX`] with it). The line is passed as written.
fn check_cmdline(cmdline: &str, hdr: &setup_header) -> Result<(), BootError> {
    let kernel_max = usize::try_from(hdr.cmdline_size).unwrap_or(usize::MAX);
    let max = kernel_max.min(layout::CMDLINE_MAX - 1);
    if cmdline.len() > max {
        return Err(BootError::Cmdline(format!(
            "{} bytes, longer than the kernel accepts ({max} bytes)",
            cmdline.len()
        )));
    }
    if cmdline.contains('\0') {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::pvh::{E820_RAM, E820_RESERVED};
    use std::path::PathBuf;
    use vm_memory::Bytes;

    const MEM: u64 = 256 << 20;
    const CMDLINE: &str = "console=ttyS0 earlyprintk=serial panic=-1 -- init arg";

    /// The test bzImage: `$DUPLEX_TEST_BZIMAGE`, else `.cache/linux/vmlinuz`. Missing is a
    /// failure, not a skip.
    fn kernel_path() -> PathBuf {
        let path = std::env::var_os("DUPLEX_TEST_BZIMAGE")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/linux/vmlinuz")
            });
        assert!(
            path.is_file(),
            "test kernel {} is missing: run scripts/fetch-linux-kernel (or set DUPLEX_TEST_BZIMAGE)",
            path.display()
        );
        path
    }

    fn memory(bytes: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)]).unwrap()
    }

    fn load(mem: &GuestMemoryMmap) -> BootEntry {
        load_bzimage(mem, &kernel_path(), CMDLINE, &layout::ram_ranges(MEM)).unwrap()
    }

    fn zero_page(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap()
    }

    /// A scratch file with `bytes`, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str, bytes: &[u8]) -> Self {
            let path =
                std::env::temp_dir().join(format!("duplex-bzimage-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn real_kernel_loads_at_1mib() {
        let mem = memory(MEM);
        assert_eq!(
            load(&mem),
            BootEntry::Linux {
                entry: 0x10_0000,
                boot_params: layout::ZERO_PAGE
            }
        );
    }

    #[test]
    fn zero_page_has_header_and_cmdline() {
        let mem = memory(MEM);
        load(&mem);
        let params = zero_page(&mem);
        let hdr = params.hdr;
        let (magic, version, boot_flag) = (hdr.header, hdr.version, hdr.boot_flag);
        assert_eq!(&magic.to_le_bytes(), b"HdrS");
        assert!(version >= MIN_PROTOCOL, "protocol {version:#x}");
        assert_eq!(boot_flag, 0xaa55);
        let (loader, loadflags, ptr, size, code32) = (
            hdr.type_of_loader,
            hdr.loadflags,
            hdr.cmd_line_ptr,
            hdr.cmdline_size,
            hdr.code32_start,
        );
        assert_eq!(loader, 0xff);
        assert_ne!(loadflags & LOADED_HIGH, 0);
        assert_eq!(u64::from(ptr), layout::CMDLINE_START);
        assert_eq!(size as usize, CMDLINE.len());
        assert_eq!(u64::from(code32), layout::KERNEL_START);

        let mut buf = vec![0u8; CMDLINE.len() + 1];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&buf[..CMDLINE.len()], CMDLINE.as_bytes());
        assert_eq!(buf[CMDLINE.len()], 0);
    }

    #[test]
    fn e820_covers_ram_and_reserves_mmio() {
        let mem = memory(MEM);
        load(&mem);
        let params = zero_page(&mem);
        let n = params.e820_entries as usize;
        let table: Vec<(u64, u64, u32)> = params.e820_table[..n]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            table,
            vec![
                (0, 0x1000, E820_RESERVED),
                (0x1000, MEM - 0x1000, E820_RAM),
                (layout::MMIO_START, layout::MMIO_SIZE, E820_RESERVED),
            ]
        );
        // Everything the kernel is told is RAM is really guest memory.
        for &(addr, size, t) in &table {
            if t == E820_RAM {
                assert!(addr + size <= MEM);
            }
        }
    }

    #[test]
    fn e820_of_large_memory_has_high_ram() {
        let bytes = 4u64 << 30;
        let ram = layout::ram_ranges(bytes);
        let ranges: Vec<(GuestAddress, usize)> = ram
            .iter()
            .map(|&(s, l)| (GuestAddress(s), l as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        load_bzimage(&mem, &kernel_path(), CMDLINE, &ram).unwrap();
        let params = zero_page(&mem);
        let n = params.e820_entries as usize;
        let table: Vec<(u64, u64, u32)> = params.e820_table[..n]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            table,
            vec![
                (0, 0x1000, E820_RESERVED),
                (0x1000, layout::LOW_RAM_END - 0x1000, E820_RAM),
                (layout::MMIO_START, layout::MMIO_SIZE, E820_RESERVED),
                (
                    layout::HIGH_RAM_START,
                    bytes - layout::LOW_RAM_END,
                    E820_RAM
                ),
            ]
        );
    }

    #[test]
    fn protected_mode_kernel_is_at_1mib() {
        let mem = memory(MEM);
        load(&mem);
        let file = std::fs::read(kernel_path()).unwrap();
        let setup_sects = match file[SETUP_HEADER_OFFSET] {
            0 => 4,
            n => n as usize,
        };
        let offset = (setup_sects + 1) * 512;
        let want = &file[offset..offset + 4096];
        let mut got = vec![0u8; want.len()];
        mem.read_slice(&mut got, GuestAddress(layout::KERNEL_START))
            .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn truncated_kernel_is_refused() {
        let file = std::fs::read(kernel_path()).unwrap();
        let scratch = Scratch::new("truncated", &file[..4096]);
        let mem = memory(MEM);
        let err = load_bzimage(&mem, &scratch.0, CMDLINE, &layout::ram_ranges(MEM)).unwrap_err();
        assert!(matches!(err, BootError::Load { .. }), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn old_protocol_is_refused() {
        let mut file = std::fs::read(kernel_path()).unwrap();
        file[0x206..0x208].copy_from_slice(&0x0205u16.to_le_bytes());
        let scratch = Scratch::new("old-protocol", &file);
        let mem = memory(MEM);
        let err = load_bzimage(&mem, &scratch.0, CMDLINE, &layout::ram_ranges(MEM)).unwrap_err();
        assert!(matches!(err, BootError::Load { .. }), "{err}");
        assert!(err.to_string().contains("2.05"), "{err}");
    }

    #[test]
    fn non_bzimage_is_refused() {
        let mem = memory(MEM);
        let ram = layout::ram_ranges(MEM);
        let mut elf = vec![0u8; 4096];
        elf[..4].copy_from_slice(b"\x7fELF");
        for (name, bytes) in [("elf", &elf[..]), ("tiny", b"HdrS".as_slice())] {
            let scratch = Scratch::new(name, bytes);
            let err = load_bzimage(&mem, &scratch.0, CMDLINE, &ram).unwrap_err();
            assert!(matches!(err, BootError::UnknownFormat { .. }), "{err}");
        }
        let err = load_bzimage(&mem, Path::new("/nonexistent/vmlinuz"), CMDLINE, &ram).unwrap_err();
        assert!(matches!(err, BootError::Open { .. }), "{err}");
    }

    #[test]
    fn too_small_memory_is_refused() {
        let mem = memory(32 << 20);
        let err =
            load_bzimage(&mem, &kernel_path(), CMDLINE, &layout::ram_ranges(32 << 20)).unwrap_err();
        assert!(matches!(err, BootError::Load { .. }), "{err}");
        assert!(err.to_string().contains("too small"), "{err}");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = memory(MEM);
        let long = "a".repeat(layout::CMDLINE_MAX);
        let err = load_bzimage(&mem, &kernel_path(), &long, &layout::ram_ranges(MEM)).unwrap_err();
        assert!(matches!(err, BootError::Cmdline(_)), "{err}");
        // Nothing was written: the command line is checked before loading.
        let at_1mib: u32 = mem.read_obj(GuestAddress(layout::KERNEL_START)).unwrap();
        assert_eq!(at_1mib, 0);
    }

    #[test]
    fn is_bzimage_checks_magic() {
        let mut header = vec![0u8; HEADER_BYTES];
        assert!(!is_bzimage(&header));
        header[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(b"HdrS");
        assert!(is_bzimage(&header));
        assert!(!is_bzimage(&header[..HDRS_OFFSET + 3]));
        let file = std::fs::read(kernel_path()).unwrap();
        assert!(is_bzimage(&file[..HEADER_BYTES]));
    }
}
