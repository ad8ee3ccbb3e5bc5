//! A partition's images in a set being written: its memory file and its disk file are both
//! "images" (a sparse file of 4 KiB pages, a page CRC, for an incremental set a pages file),
//! written by the same code; the disk is read through a read-only shared mapping of its
//! file, which `memfile::write` scans like a file-backed RAM region.

use std::collections::BTreeSet;
use std::fs::File;

use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryMmap;

use super::SetWriter;
use crate::crc::MemCrc;
use crate::manifest::{FileEntry, RamRegion, MAX_DISK};
use crate::memfile::{self, MemoryWriteStats, PageBits};
use crate::sys::PAGE;
use crate::{disk, SnapshotError};

/// Which image of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ImageKind {
    /// Guest RAM: `<name>.mem`, `<name>.pages`.
    Memory,
    /// The disk: `<name>.disk`, `<name>.diskpages`.
    Disk,
}

impl ImageKind {
    fn suffixes(self) -> (&'static str, &'static str) {
        match self {
            ImageKind::Memory => (".mem", ".pages"),
            ImageKind::Disk => (".disk", ".diskpages"),
        }
    }

    /// "memory" or "disk", for messages.
    fn what(self) -> &'static str {
        match self {
            ImageKind::Memory => "memory",
            ImageKind::Disk => "disk",
        }
    }
}

/// One image of a partition as written so far.
pub(super) struct Image {
    /// The image file's name in the set.
    pub file: String,
    /// Its pages file's name (written at commit, for an incremental set).
    pages_file: String,
    /// The image file: its index in `SetWriter::open`.
    open: usize,
    /// The image's length in bytes.
    pub len: u64,
    /// Bytes of page data written.
    pub bytes_written: u64,
    /// For an incremental set: the pages it holds.
    present: Option<PageBits>,
    /// The file's checksum, per chunk.
    crc: MemCrc,
    /// Chunks written again by a second pass: their checksums are computed again at commit.
    rewritten: BTreeSet<u64>,
}

impl Image {
    /// The pages file's name, for an incremental set.
    pub fn pages_file_name(&self) -> Option<String> {
        self.present.is_some().then(|| self.pages_file.clone())
    }
}

impl SetWriter {
    fn image_mut(&mut self, i: usize, kind: ImageKind) -> &mut Option<Image> {
        let part = &mut self.parts[i];
        match kind {
            ImageKind::Memory => &mut part.memory,
            ImageKind::Disk => &mut part.disk,
        }
    }

    /// Refuses a second image of the kind, and a dirty bitmap that does not go with the
    /// set's kind (incremental sets need one, full sets take none).
    pub(super) fn check_new_image(
        &mut self,
        i: usize,
        kind: ImageKind,
        dirty: bool,
    ) -> Result<(), SnapshotError> {
        let name = self.parts[i].name.clone();
        let what = kind.what();
        if self.image_mut(i, kind).is_some() {
            return Err(self.usage(&name, format!("{what} written twice")));
        }
        let bitmaps = match kind {
            ImageKind::Memory => "a dirty bitmap per RAM region",
            ImageKind::Disk => "a dirty bitmap of the disk's blocks",
        };
        match (self.parent.is_some(), dirty) {
            (true, false) => Err(self.usage(
                &name,
                format!("an incremental set (it has a parent) needs {bitmaps}"),
            )),
            (false, true) => Err(self.usage(
                &name,
                "dirty bitmaps are for incremental sets; this set has no parent",
            )),
            _ => Ok(()),
        }
    }

    /// Writes image `kind` of partition `i` from `mem` (see `memfile::write`); returns what
    /// was written and the layout of `mem`.
    pub(super) fn write_image<B: Bitmap, D: AsRef<[u64]>>(
        &mut self,
        i: usize,
        kind: ImageKind,
        mem: &GuestMemoryMmap<B>,
        dirty: Option<&[D]>,
    ) -> Result<(MemoryWriteStats, Vec<RamRegion>), SnapshotError> {
        let name = self.parts[i].name.clone();
        let (suffix, pages_suffix) = kind.suffixes();
        let fname = format!("{name}{suffix}");
        let (path, file) = self.new_file(&fname)?;
        let usage = |m: String| self.usage(&name, m);
        let w = memfile::write(&path, &file, mem, dirty, &usage)?;
        self.files.insert(
            fname.clone(),
            FileEntry {
                len: w.len,
                crc32: w.crc.finish(),
            },
        );
        self.bytes_written += w.stats.bytes_written;
        self.open.push((path, file));
        let open = self.open.len() - 1;
        *self.image_mut(i, kind) = Some(Image {
            file: fname,
            pages_file: format!("{name}{pages_suffix}"),
            open,
            len: w.len,
            bytes_written: w.stats.bytes_written,
            present: w.present,
            crc: w.crc,
            rewritten: BTreeSet::new(),
        });
        Ok((w.stats, w.ram))
    }

    /// Writes again the pages of `delta` over image `kind` of partition `i` (see
    /// `memfile::overwrite`).
    pub(super) fn update_image<B: Bitmap, D: AsRef<[u64]>>(
        &mut self,
        i: usize,
        kind: ImageKind,
        mem: &GuestMemoryMmap<B>,
        delta: &[D],
    ) -> Result<MemoryWriteStats, SnapshotError> {
        let (dest, name) = (self.dest.clone(), self.parts[i].name.clone());
        let usage = |message: String| SnapshotError::Usage {
            dest: dest.clone(),
            partition: name.clone(),
            message,
        };
        let part = &mut self.parts[i];
        let image = match kind {
            ImageKind::Memory => part.memory.as_mut(),
            ImageKind::Disk => part.disk.as_mut(),
        };
        let Some(image) = image else {
            return Err(usage(format!(
                "{} updated before it was written",
                kind.what()
            )));
        };
        let (path, file) = &self.open[image.open];
        let stats = memfile::overwrite(
            path,
            file,
            mem,
            delta,
            image.present.as_mut(),
            &mut image.rewritten,
            &usage,
        )?;
        image.bytes_written += stats.bytes_written;
        self.bytes_written += stats.bytes_written;
        Ok(stats)
    }

    /// Before the manifest: checksums of images written twice, and pages files.
    pub(super) fn finish_images(&mut self) -> Result<(), SnapshotError> {
        for i in 0..self.parts.len() {
            for kind in [ImageKind::Memory, ImageKind::Disk] {
                let Some(mut image) = self.image_mut(i, kind).take() else {
                    continue;
                };
                let done = self.finish_image(&mut image);
                *self.image_mut(i, kind) = Some(image);
                done?;
            }
        }
        Ok(())
    }

    fn finish_image(&mut self, image: &mut Image) -> Result<(), SnapshotError> {
        if !image.rewritten.is_empty() {
            let (path, file) = &self.open[image.open];
            for chunk in std::mem::take(&mut image.rewritten) {
                image
                    .crc
                    .recompute(file, image.len, chunk)
                    .map_err(|e| SnapshotError::io(path, "checksumming", e))?;
            }
            image.bytes_written = image.bytes_written.min(image.len);
            let entry = FileEntry {
                len: image.len,
                crc32: image.crc.finish(),
            };
            self.files.insert(image.file.clone(), entry);
        }
        if let Some(present) = &image.present {
            self.write_small(&image.pages_file, &present.encode())?;
        }
        Ok(())
    }

    /// Writes a partition's disk image (`<name>.disk`): `disk` is the disk's backing file, a
    /// regular file of `len` bytes (a multiple of 4096). A full set holds every 4 KiB block
    /// that has data (`SEEK_DATA` extents; blocks that are not in the page cache are read
    /// too) and is not all zeros. An incremental set (the writer has a parent, whose
    /// partition must have a disk of the same length) holds only the blocks set in `dirty`
    /// (block `i` is bit `i % 64` of word `i / 64`: the blocks written since the parent),
    /// with a pages file `<name>.diskpages`. May run while the partition runs, as the first
    /// pass of a live snapshot: [`update_disk`](Self::update_disk) then writes, paused, the
    /// blocks written since this call began.
    pub fn write_disk(
        &mut self,
        partition: &str,
        disk: &File,
        len: u64,
        dirty: Option<&[u64]>,
    ) -> Result<MemoryWriteStats, SnapshotError> {
        let i = self.part(partition)?;
        self.check_new_image(i, ImageKind::Disk, dirty.is_some())?;
        if len == 0 || !len.is_multiple_of(PAGE as u64) || len > MAX_DISK {
            return Err(self.usage(
                partition,
                format!(
                    "the disk's length {len} is not a positive multiple of {PAGE} of at most \
                     {MAX_DISK}"
                ),
            ));
        }
        if let Some(p) = &self.parent {
            let parent_len = p
                .partitions
                .iter()
                .find(|e| e.name == partition)
                .and_then(|e| e.disk.as_ref())
                .map(|d| d.len);
            match parent_len {
                None => return Err(self.usage(partition, "the parent set has no disk for it")),
                Some(l) if l != len => {
                    return Err(self.usage(
                        partition,
                        format!(
                            "the disk is {len} bytes long, the parent set's is {l}: an \
                             incremental set needs the same disk"
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        let mem = self.map_disk(partition, disk, len, dirty)?;
        let dirty = dirty.as_ref().map(std::slice::from_ref);
        Ok(self.write_image(i, ImageKind::Disk, &mem, dirty)?.0)
    }

    /// Writes again the disk blocks set in `delta` (as `dirty` of
    /// [`write_disk`](Self::write_disk)): the second pass of a live snapshot, with the
    /// partition paused, for the blocks written since `write_disk` began. Blocks that are
    /// zero now become zeros; for an incremental set the blocks join those it holds. The
    /// checksum of the chunks written again is computed at commit.
    pub fn update_disk(
        &mut self,
        partition: &str,
        disk: &File,
        delta: &[u64],
    ) -> Result<MemoryWriteStats, SnapshotError> {
        let i = self.part(partition)?;
        let Some(len) = self.parts[i].disk.as_ref().map(|d| d.len) else {
            return Err(self.usage(partition, "disk updated before it was written"));
        };
        let mem = self.map_disk(partition, disk, len, Some(delta))?;
        self.update_image(i, ImageKind::Disk, &mem, std::slice::from_ref(&delta))
    }

    /// `disk` mapped read-only as one region, after checking that it is a regular file of
    /// `len` bytes and that `bits` covers its blocks.
    fn map_disk(
        &self,
        partition: &str,
        disk: &File,
        len: u64,
        bits: Option<&[u64]>,
    ) -> Result<GuestMemoryMmap, SnapshotError> {
        let blocks = len / PAGE as u64;
        if let Some(b) = bits.filter(|b| (b.len() as u64) < blocks.div_ceil(64)) {
            return Err(self.usage(
                partition,
                format!(
                    "the disk's dirty bitmap has {} words, a disk of {blocks} blocks needs {}",
                    b.len(),
                    blocks.div_ceil(64)
                ),
            ));
        }
        let md = disk
            .metadata()
            .map_err(|e| self.usage(partition, format!("the disk file: stat: {e}")))?;
        if !md.is_file() || md.len() != len {
            return Err(self.usage(
                partition,
                format!(
                    "the disk file must be a regular file of {len} bytes; it is {} of {} bytes",
                    if md.is_file() { "a file" } else { "not a file" },
                    md.len()
                ),
            ));
        }
        disk::map(disk, len).map_err(|e| self.usage(partition, format!("mapping the disk: {e}")))
    }
}
