//! Documents: store (whole, or as an upload in chunks), read in chunks, list, delete.
//!
//! A document is stored in one transaction: its metadata (`doc/<id>`), its bytes in
//! [`DATA_CHUNK`] pieces (`dat/<id>/<i>`) and the next document number (`svc/meta`). So it
//! becomes visible whole, and a crash before the commit leaves no trace of it.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use duplex_docs::{document_crc32, valid_name, Document, Object, Op, Target};
use duplex_store::BlockDevice;

use crate::service::{doc_number, encode, Item};
use crate::{keys, DocError, DocService, Meta, DATA_CHUNK, MAX_DOCUMENT_LEN};

/// An upload in progress (memory only).
#[derive(Debug)]
pub(crate) struct Upload {
    account: String,
    box_id: String,
    name: String,
    len: u64,
    bytes: Vec<u8>,
}

/// The chunks a document of `len` bytes is stored in.
fn chunk_count(len: u64) -> u32 {
    len.div_ceil(DATA_CHUNK as u64) as u32
}

/// The items that remove document `d` (metadata and bytes).
pub(crate) fn removal_items(d: &Document, items: &mut Vec<Item>) {
    items.push((keys::doc(&d.id), None));
    for i in 0..chunk_count(d.len) {
        items.push((keys::data(&d.id, i), None));
    }
}

impl<D: BlockDevice> DocService<D> {
    /// Whether `who` may put a document called `name` into `box_id` now (a scan checks
    /// before it starts; storing checks again).
    pub fn check_put(&self, who: &str, box_id: &str, name: &str) -> Result<(), DocError> {
        self.known(who)?;
        if !self.has_box(box_id) {
            return Err(DocError::not_found("box", box_id));
        }
        self.may(who, Op::PutDoc, Target::Box(box_id))?;
        if !valid_name(name) {
            return Err(DocError::Invalid(format!("document name {name:?}")));
        }
        Ok(())
    }

    /// Stores a new document in a box (`write` on the box); durable when `Ok`.
    pub fn put_document(
        &mut self,
        who: &str,
        box_id: &str,
        name: &str,
        bytes: &[u8],
    ) -> Result<Document, DocError> {
        self.check_put(who, box_id, name)?;
        let len = bytes.len() as u64;
        if len > MAX_DOCUMENT_LEN {
            return Err(DocError::TooLarge {
                what: "a document",
                len,
                max: MAX_DOCUMENT_LEN,
            });
        }
        let n = self.meta.next_doc;
        let doc = Document {
            id: format!("d{n}"),
            box_id: box_id.into(),
            name: name.into(),
            len,
            crc32: document_crc32(bytes),
            created_by: who.into(),
        };
        let meta = Meta {
            next_doc: n + 1,
            ..self.meta
        };
        let doc_key = keys::doc(&doc.id);
        let doc_value = encode(&doc)?;
        let meta_value = encode(&meta)?;
        let chunk_keys: Vec<Vec<u8>> = (0..chunk_count(len))
            .map(|i| keys::data(&doc.id, i))
            .collect();
        let mut items: Vec<(&[u8], Option<&[u8]>)> = Vec::with_capacity(chunk_keys.len() + 2);
        items.push((keys::META, Some(&meta_value)));
        items.push((&doc_key, Some(&doc_value)));
        for (k, part) in chunk_keys.iter().zip(bytes.chunks(DATA_CHUNK)) {
            items.push((k, Some(part)));
        }
        self.store.put_many(&items)?;
        self.meta = meta;
        self.docs.insert(n, doc.clone());
        self.shared_document_added(&doc, bytes);
        Ok(doc)
    }

    /// Starts an upload of `len` bytes into a box (`write` on the box); returns its id.
    /// When [`crate::Limits::uploads`] are in progress, the oldest is dropped.
    pub fn put_begin(
        &mut self,
        who: &str,
        box_id: &str,
        name: &str,
        len: u64,
    ) -> Result<u64, DocError> {
        self.check_put(who, box_id, name)?;
        if len > MAX_DOCUMENT_LEN {
            return Err(DocError::TooLarge {
                what: "a document",
                len,
                max: MAX_DOCUMENT_LEN,
            });
        }
        while self.uploads.len() >= self.limits.uploads.max(1) {
            self.uploads.pop_first();
        }
        let pending: u64 = self.uploads.values().map(|u| u.len).sum();
        if pending + len > self.limits.upload_bytes {
            return Err(DocError::Busy(format!(
                "uploads of {pending} bytes are in progress"
            )));
        }
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(len as usize)
            .map_err(|_| DocError::Busy(format!("no memory for {len} bytes")))?;
        let id = self.next_put;
        self.next_put += 1;
        self.uploads.insert(
            id,
            Upload {
                account: who.into(),
                box_id: box_id.into(),
                name: name.into(),
                len,
                bytes,
            },
        );
        Ok(id)
    }

    fn upload(&mut self, who: &str, put_id: u64) -> Result<&mut Upload, DocError> {
        match self.uploads.get_mut(&put_id) {
            Some(u) if u.account == who => Ok(u),
            _ => Err(DocError::not_found("upload", &format!("{put_id}"))),
        }
    }

    /// Adds the bytes at `offset` (= the bytes received so far) to an upload; returns the
    /// bytes received.
    pub fn put_data(
        &mut self,
        who: &str,
        put_id: u64,
        offset: u64,
        bytes: &[u8],
    ) -> Result<u64, DocError> {
        if bytes.len() > DATA_CHUNK {
            return Err(DocError::TooLarge {
                what: "a chunk",
                len: bytes.len() as u64,
                max: DATA_CHUNK as u64,
            });
        }
        let u = self.upload(who, put_id)?;
        let have = u.bytes.len() as u64;
        if offset != have {
            return Err(DocError::BadRequest(format!(
                "upload {put_id}: offset {offset}, expected {have}"
            )));
        }
        if have + bytes.len() as u64 > u.len {
            return Err(DocError::BadRequest(format!(
                "upload {put_id}: more than the {} bytes announced",
                u.len
            )));
        }
        u.bytes.extend_from_slice(bytes);
        Ok(u.bytes.len() as u64)
    }

    /// Ends an upload: checks its length and CRC, stores the document (rights checked
    /// again) and returns it once durable. The upload is gone afterwards, stored or not.
    pub fn put_end(&mut self, who: &str, put_id: u64, crc32: u32) -> Result<Document, DocError> {
        self.upload(who, put_id)?;
        let Some(u) = self.uploads.remove(&put_id) else {
            return Err(DocError::not_found("upload", &format!("{put_id}")));
        };
        if u.bytes.len() as u64 != u.len {
            return Err(DocError::BadRequest(format!(
                "upload {put_id}: {} of {} bytes received",
                u.bytes.len(),
                u.len
            )));
        }
        let got = document_crc32(&u.bytes);
        if got != crc32 {
            return Err(DocError::BadRequest(format!(
                "upload {put_id}: CRC {got:08x}, the client said {crc32:08x}"
            )));
        }
        self.put_document(who, &u.box_id, &u.name, &u.bytes)
    }

    /// Drops an upload.
    pub fn put_abort(&mut self, who: &str, put_id: u64) -> Result<(), DocError> {
        self.upload(who, put_id)?;
        self.uploads.remove(&put_id);
        Ok(())
    }

    /// Uploads in progress.
    pub fn uploads(&self) -> usize {
        self.uploads.len()
    }

    /// A document's metadata (`read` on it or its box).
    pub fn document(&self, who: &str, doc_id: &str) -> Result<Document, DocError> {
        self.known(who)?;
        let d = self.doc(doc_id)?;
        self.may(who, Op::GetDoc, doc_target(d))?;
        Ok(d.clone())
    }

    /// Up to `len` (at most [`DATA_CHUNK`]) bytes of a document from `offset` (`read` on
    /// it or its box), with its metadata; fewer at its end, none at or past it.
    pub fn get(
        &mut self,
        who: &str,
        doc_id: &str,
        offset: u64,
        len: u32,
    ) -> Result<(Document, Vec<u8>), DocError> {
        let doc = self.document(who, doc_id)?;
        if offset > doc.len {
            return Err(DocError::BadRequest(format!(
                "offset {offset} is past the end of {doc_id} ({} bytes)",
                doc.len
            )));
        }
        let end = doc.len.min(offset + u64::from(len).min(DATA_CHUNK as u64));
        let n = doc_number(&doc.id).ok_or(DocError::Corrupted("a document id"))?;
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut at = offset;
        while at < end {
            let i = (at / DATA_CHUNK as u64) as u32;
            let chunk = self.chunk(n, &doc, i)?;
            let from = (at % DATA_CHUNK as u64) as usize;
            let take = ((end - at) as usize).min(chunk.len().saturating_sub(from));
            if take == 0 {
                return Err(DocError::Corrupted("a document's chunk is short"));
            }
            out.extend_from_slice(&chunk[from..from + take]);
            at += take as u64;
        }
        Ok((doc, out))
    }

    /// Chunk `i` of document number `n` (the last one read is cached).
    fn chunk(&mut self, n: u64, doc: &Document, i: u32) -> Result<&[u8], DocError> {
        let hit = matches!(&self.cache, Some((cn, ci, _)) if *cn == n && *ci == i);
        if !hit {
            let bytes = self
                .store
                .get(&keys::data(&doc.id, i))?
                .ok_or(DocError::Corrupted("a document's chunk is missing"))?;
            let want = (doc.len - u64::from(i) * DATA_CHUNK as u64).min(DATA_CHUNK as u64);
            if bytes.len() as u64 != want {
                return Err(DocError::Corrupted("a document's chunk has the wrong size"));
            }
            self.cache = Some((n, i, bytes));
        }
        match &self.cache {
            Some((_, _, b)) => Ok(b),
            None => Err(DocError::Corrupted("chunk cache")),
        }
    }

    /// A box's documents, oldest first (`read` on the box).
    pub fn list_box(&self, who: &str, box_id: &str) -> Result<Vec<Document>, DocError> {
        self.known(who)?;
        if !self.has_box(box_id) {
            return Err(DocError::not_found("box", box_id));
        }
        self.may(who, Op::ListBox, Target::Box(box_id))?;
        Ok(self
            .docs
            .values()
            .filter(|d| d.box_id == box_id)
            .cloned()
            .collect())
    }

    /// Deletes a document with its bytes and the grants on it (`write` on it or its box).
    pub fn delete_document(&mut self, who: &str, doc_id: &str) -> Result<(), DocError> {
        self.known(who)?;
        let d = self.doc(doc_id)?.clone();
        self.may(who, Op::DeleteDoc, doc_target(&d))?;
        let n = doc_number(&d.id).ok_or(DocError::Corrupted("a document id"))?;
        let grants: Vec<_> = self
            .grants
            .iter()
            .filter(|g| g.object != Object::Doc(d.id.clone()))
            .cloned()
            .collect();
        let mut items = alloc::vec![Self::grants_item(&grants)?];
        removal_items(&d, &mut items);
        self.commit(&items)?;
        self.grants = grants;
        self.docs.remove(&n);
        self.cache = None;
        self.shared_document_removed(&d);
        Ok(())
    }
}

/// The rights target of a document.
fn doc_target(d: &Document) -> Target<'_> {
    Target::Doc {
        box_id: &d.box_id,
        doc_id: &d.id,
    }
}
