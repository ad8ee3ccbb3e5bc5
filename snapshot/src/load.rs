//! Restoring a partition's guest memory from a set: lazily (each RAM region a private
//! mapping of the memory file, pages fault in from the page cache on first touch) or
//! eagerly (anonymous memory filled from the file's data extents). For an incremental
//! chain the full set at its root is loaded first and the newer sets' pages are copied
//! over it, each page from the newest set that holds it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::manifest::{PartitionEntry, RamRegion};
use crate::memfile::PageBits;
use crate::set::open_checked;
use crate::sys::{self, PAGE};
use crate::{SnapshotError, SnapshotSet};

/// How `load_memory` brings guest memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// Each RAM region is a `MAP_PRIVATE | MAP_NORESERVE` mapping of the memory file: nothing
    /// is read up front, pages fault in from the page cache on first touch, guest writes stay
    /// private (the file is never modified). For an incremental chain, the root full set is
    /// mapped and the newer pages are copied in (those pages become private copies).
    Lazy,
    /// As `Lazy`, and a short-lived background thread asks the kernel to read the memory
    /// file's data extents into the page cache (`POSIX_FADV_WILLNEED`), so that the guest's
    /// first touches find their pages there instead of each waiting for a disk read.
    LazyPrefetch,
    /// Anonymous memory, filled by reading the memory files' data extents up front.
    Eager,
}

/// Where a partition's memory file regions land in guest memory.
struct Layout<'a> {
    ram: &'a [RamRegion],
    offsets: Vec<u64>,
}

impl Layout<'_> {
    /// Splits the file range `[off, off + len)` into `(gpa, file offset, length)` pieces that
    /// each lie in one RAM region.
    fn pieces(&self, mut off: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let end = off + len;
        let mut v = Vec::new();
        for (r, &ro) in self.ram.iter().zip(&self.offsets) {
            if off >= end {
                break;
            }
            let rend = ro + r.len;
            if off >= ro && off < rend {
                let n = end.min(rend) - off;
                v.push((r.gpa + (off - ro), off, n));
                off += n;
            }
        }
        v
    }
}

impl SnapshotSet {
    /// A partition's guest memory, with the guest addresses of the manifest's `ram` entries.
    /// Checksums are not checked here: call [`SnapshotSet::verify`] first.
    pub fn load_memory(
        &self,
        name: &str,
        mode: LoadMode,
    ) -> Result<GuestMemoryMmap, SnapshotError> {
        self.load_memory_with_bitmap::<()>(name, mode)
    }

    /// As [`SnapshotSet::load_memory`], with a vm-memory dirty bitmap type `B` on each region
    /// (pages the loader writes are marked dirty in it).
    pub fn load_memory_with_bitmap<B: NewBitmap>(
        &self,
        name: &str,
        mode: LoadMode,
    ) -> Result<GuestMemoryMmap<B>, SnapshotError> {
        self.load_memory_at::<B>(name, mode, None)
    }

    /// As [`SnapshotSet::load_memory_with_bitmap`], but each RAM region is mapped at the
    /// given host address (one per region, in `ram` order, page aligned), replacing what
    /// is mapped there (`MAP_FIXED`): address ranges the caller reserved (e.g. ones a KVM
    /// memory slot already points at, so that no slot has to be registered again).
    ///
    /// # Safety
    ///
    /// Each `[addr, addr + len)` must be a range the caller owns, of the region's length,
    /// that nothing else uses: it is replaced. The mapping is not unmapped when the memory
    /// is dropped; the caller unmaps (or reserves again) the range once no clone of the
    /// returned memory is left.
    pub unsafe fn load_memory_into<B: NewBitmap>(
        &self,
        name: &str,
        mode: LoadMode,
        at: &[usize],
    ) -> Result<GuestMemoryMmap<B>, SnapshotError> {
        self.load_memory_at::<B>(name, mode, Some(at))
    }

    fn load_memory_at<B: NewBitmap>(
        &self,
        name: &str,
        mode: LoadMode,
        at: Option<&[usize]>,
    ) -> Result<GuestMemoryMmap<B>, SnapshotError> {
        let chain = self.chain();
        let entries = chain
            .iter()
            .map(|s| s.partition_or_err(name))
            .collect::<Result<Vec<_>, _>>()?;
        let (base, base_entry) = match (chain.last(), entries.last()) {
            (Some(s), Some(e)) => (*s, *e),
            _ => return Err(self.mem_err(name, "empty chain".into())),
        };
        let entry = entries[0];
        let layout = Layout {
            ram: &entry.ram,
            offsets: entry.region_offsets(),
        };
        let len = entry.memory_len();
        let base_file = open_checked(&base.dir, &base_entry.memory_file, len)?;
        // For a chain mapped lazily, the pages the overlay replaces are read from the base
        // file first (copy on write): prefetch them.
        let base_for_overlay = match mode {
            LoadMode::Eager => None,
            _ if chain.len() > 1 => base_file.try_clone().ok(),
            _ => None,
        };
        if let Some(at) = at {
            if at.len() != entry.ram.len() {
                return Err(self.mem_err(
                    name,
                    format!("{} addresses for {} RAM regions", at.len(), entry.ram.len()),
                ));
            }
        }
        let mem = match mode {
            LoadMode::Lazy => self.map_private::<B>(name, entry, &layout, base_file, at)?,
            LoadMode::LazyPrefetch => {
                let path = base.dir.join(&base_entry.memory_file);
                let extents = sys::page_extents(&base_file, 0, len)
                    .map_err(|e| SnapshotError::io(&path, "finding data extents of", e))?;
                if let Ok(f) = base_file.try_clone() {
                    // Best effort: without the thread, pages are read on first touch.
                    let _ = std::thread::Builder::new()
                        .name("snapshot-prefetch".into())
                        .spawn(move || sys::prefetch(&f, &extents));
                }
                self.map_private::<B>(name, entry, &layout, base_file, at)?
            }
            LoadMode::Eager => {
                let ranges: Vec<(GuestAddress, usize)> = entry
                    .ram
                    .iter()
                    .map(|r| (GuestAddress(r.gpa), r.len as usize))
                    .collect();
                let mem = match at {
                    None => GuestMemoryMmap::<B>::from_ranges(&ranges)
                        .map_err(|e| self.mem_err(name, format!("allocating: {e}")))?,
                    Some(at) => self.map_fixed::<B>(name, entry, at, None)?,
                };
                let path = base.dir.join(&base_entry.memory_file);
                let extents = sys::page_extents(&base_file, 0, len)
                    .map_err(|e| SnapshotError::io(&path, "finding data extents of", e))?;
                sys::prefetch(&base_file, &extents);
                let mut buf = vec![0u8; 256 * PAGE];
                for (s, e) in extents {
                    self.copy_in(name, &mem, &layout, &base_file, &path, s, e - s, &mut buf)?;
                }
                mem
            }
        };
        // The overlay writes into the file mapping: guarded against the file being cut
        // short meanwhile (the caller guards the memory from here on, see `guard`).
        let guard = match mode {
            LoadMode::Eager => None,
            _ => Some(
                crate::guard::MemoryGuard::for_memory(&mem, None)
                    .map_err(|e| self.mem_err(name, e.to_string()))?,
            ),
        };
        self.overlay(name, &mem, &layout, &chain, &entries, base_for_overlay)?;
        if guard
            .as_ref()
            .is_some_and(crate::guard::MemoryGuard::truncated)
        {
            return Err(self.mem_err(
                name,
                format!(
                    "{} was truncated while it was loaded",
                    base_entry.memory_file
                ),
            ));
        }
        Ok(mem)
    }

    fn mem_err(&self, partition: &str, message: String) -> SnapshotError {
        SnapshotError::Memory {
            dir: self.dir.clone(),
            partition: partition.to_string(),
            message,
        }
    }

    /// Maps each region at its address in `at` with `MAP_FIXED`: the memory file's range
    /// (copy on write) with `file`, else fresh anonymous memory. The regions do not own
    /// their mappings (see [`SnapshotSet::load_memory_into`]).
    fn map_fixed<B: NewBitmap>(
        &self,
        name: &str,
        entry: &PartitionEntry,
        at: &[usize],
        file: Option<(&Arc<File>, &[u64])>,
    ) -> Result<GuestMemoryMmap<B>, SnapshotError> {
        let mut regions = Vec::with_capacity(entry.ram.len());
        for (i, (r, &addr)) in entry.ram.iter().zip(at).enumerate() {
            let len = r.len as usize;
            let (fd, off) = match file {
                Some((f, offsets)) => (f.as_raw_fd(), offsets.get(i).copied().unwrap_or(0)),
                None => (-1, 0),
            };
            let flags = libc::MAP_PRIVATE
                | libc::MAP_NORESERVE
                | libc::MAP_FIXED
                | if fd < 0 { libc::MAP_ANONYMOUS } else { 0 };
            let off = libc::off_t::try_from(off)
                .map_err(|_| self.mem_err(name, format!("file offset {off} is too large")))?;
            // SAFETY: the caller of `load_memory_into` owns `[addr, addr + len)` and lets it
            // be replaced; `fd` (if any) is a file this set opened.
            let p = unsafe {
                libc::mmap(
                    addr as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    fd,
                    off,
                )
            };
            if p == libc::MAP_FAILED || p as usize != addr {
                return Err(self.mem_err(
                    name,
                    format!(
                        "mapping region at gpa {:#x} at {addr:#x}: {}",
                        r.gpa,
                        std::io::Error::last_os_error()
                    ),
                ));
            }
            let mut builder = MmapRegionBuilder::new_with_bitmap(len, B::with_len(len))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags & !libc::MAP_FIXED);
            if let Some((f, offsets)) = file {
                let o = offsets.get(i).copied().unwrap_or(0);
                builder = builder.with_file_offset(FileOffset::from_arc(f.clone(), o));
            }
            // SAFETY: `addr` is the page-aligned start of the mapping of `len` bytes just made,
            // which stays mapped for as long as the caller keeps the range (see above).
            let region = unsafe { builder.with_raw_mmap_pointer(addr as *mut u8) }
                .build()
                .map_err(|e| self.mem_err(name, format!("region at gpa {:#x}: {e}", r.gpa)))?;
            let region = GuestRegionMmap::new(region, GuestAddress(r.gpa)).ok_or_else(|| {
                self.mem_err(name, format!("region at gpa {:#x} overflows", r.gpa))
            })?;
            regions.push(region);
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| self.mem_err(name, format!("{e}")))
    }

    fn map_private<B: NewBitmap>(
        &self,
        name: &str,
        entry: &PartitionEntry,
        layout: &Layout,
        file: File,
        at: Option<&[usize]>,
    ) -> Result<GuestMemoryMmap<B>, SnapshotError> {
        let file = Arc::new(file);
        if let Some(at) = at {
            return self.map_fixed::<B>(name, entry, at, Some((&file, &layout.offsets)));
        }
        let mut regions = Vec::with_capacity(entry.ram.len());
        for (r, &off) in entry.ram.iter().zip(&layout.offsets) {
            let len = r.len as usize;
            let region = MmapRegionBuilder::new_with_bitmap(len, B::with_len(len))
                .with_file_offset(FileOffset::from_arc(file.clone(), off))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| {
                    self.mem_err(name, format!("mapping region at gpa {:#x}: {e}", r.gpa))
                })?;
            let region = GuestRegionMmap::new(region, GuestAddress(r.gpa)).ok_or_else(|| {
                self.mem_err(name, format!("region at gpa {:#x} overflows", r.gpa))
            })?;
            regions.push(region);
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| self.mem_err(name, format!("{e}")))
    }

    /// Copies the file range `[off, off + len)` of `file` into guest memory.
    #[allow(clippy::too_many_arguments)]
    fn copy_in<B: NewBitmap>(
        &self,
        name: &str,
        mem: &GuestMemoryMmap<B>,
        layout: &Layout,
        file: &File,
        path: &std::path::Path,
        off: u64,
        len: u64,
        buf: &mut [u8],
    ) -> Result<(), SnapshotError> {
        for (gpa, foff, n) in layout.pieces(off, len) {
            let mut done = 0u64;
            while done < n {
                let k = ((n - done) as usize).min(buf.len());
                file.read_exact_at(&mut buf[..k], foff + done)
                    .map_err(|e| SnapshotError::io(path, "reading", e))?;
                mem.write_slice(&buf[..k], GuestAddress(gpa + done))
                    .map_err(|e| self.mem_err(name, format!("writing gpa {gpa:#x}: {e}")))?;
                done += k as u64;
            }
        }
        Ok(())
    }

    /// Copies the pages of the chain's incremental sets over the root's memory, each page
    /// from the newest set that holds it; a page a set holds as zero (a hole in its file)
    /// is zeroed if the memory below has data there.
    fn overlay<B: NewBitmap>(
        &self,
        name: &str,
        mem: &GuestMemoryMmap<B>,
        layout: &Layout,
        chain: &[&SnapshotSet],
        entries: &[&PartitionEntry],
        base: Option<File>,
    ) -> Result<(), SnapshotError> {
        let n = chain.len();
        if n < 2 {
            return Ok(());
        }
        let len = entries[0].memory_len();
        let pages = len / PAGE as u64;
        // Which pages each incremental set provides: those it holds that no newer set holds.
        let mut claimed = PageBits::new(pages);
        let mut mine = Vec::with_capacity(n - 1);
        for set in &chain[..n - 1] {
            let present = set.present_pages(name)?.ok_or_else(|| {
                SnapshotError::manifest(&set.dir, format!("partition {name:?} has no pages file"))
            })?;
            mine.push(claimed.claim(&present));
        }
        if let Some(base) = &base {
            sys::prefetch(base, &claimed.byte_runs());
        }
        let mut buf = vec![0u8; 256 * PAGE];
        let mut page = vec![0u8; PAGE];
        let zero = vec![0u8; PAGE];
        for ((set, entry), mine) in chain[..n - 1].iter().zip(&entries[..n - 1]).zip(&mine) {
            let file = open_checked(&set.dir, &entry.memory_file, len)?;
            sys::prefetch(&file, &mine.byte_runs());
            let path = set.dir.join(&entry.memory_file);
            let extents = sys::page_extents(&file, 0, len)
                .map_err(|e| SnapshotError::io(&path, "finding data extents of", e))?;
            let mut ext = 0usize;
            let mut run: Option<(u64, u64)> = None; // data pages to copy: (first, count)
            for p in 0..pages {
                let take = mine.get(p);
                let off = p * PAGE as u64;
                while ext < extents.len() && extents[ext].1 <= off {
                    ext += 1;
                }
                let data = take && ext < extents.len() && extents[ext].0 <= off;
                match run {
                    Some((first, count)) if data && first + count == p => {
                        run = Some((first, count + 1))
                    }
                    _ => {
                        if let Some((first, count)) = run.take() {
                            self.copy_in(
                                name,
                                mem,
                                layout,
                                &file,
                                &path,
                                first * PAGE as u64,
                                count * PAGE as u64,
                                &mut buf,
                            )?;
                        }
                        if data {
                            run = Some((p, 1));
                        }
                    }
                }
                if !take {
                    continue;
                }
                if !data {
                    // Held as zero by this set: clear whatever the older sets left.
                    for (gpa, _, _) in layout.pieces(off, PAGE as u64) {
                        mem.read_slice(&mut page, GuestAddress(gpa)).map_err(|e| {
                            self.mem_err(name, format!("reading gpa {gpa:#x}: {e}"))
                        })?;
                        if !sys::is_zero(&page) {
                            mem.write_slice(&zero, GuestAddress(gpa)).map_err(|e| {
                                self.mem_err(name, format!("writing gpa {gpa:#x}: {e}"))
                            })?;
                        }
                    }
                }
            }
            if let Some((first, count)) = run {
                self.copy_in(
                    name,
                    mem,
                    layout,
                    &file,
                    &path,
                    first * PAGE as u64,
                    count * PAGE as u64,
                    &mut buf,
                )?;
            }
        }
        Ok(())
    }
}
