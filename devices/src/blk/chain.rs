//! Reading a request's descriptor chain: the device-readable bytes (the 16-byte header,
//! then the data of an `OUT`), then the device-writable bytes (the data of an `IN` or
//! `GET_ID`, then the status byte, the chain's last writable byte). Descriptor boundaries do
//! not matter (virtio 1.2 §2.7.4, "message framing"): a header or a status byte may share a
//! descriptor with data, and data may span any number of descriptors.
//!
//! A chain of the wrong shape is refused ([`Layout::Bad`] when its status byte can still
//! be written, [`Layout::Unanswerable`] when it cannot); nothing here panics on guest input.

use crate::GuestMemoryMmap;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::REQ_HDR_LEN;

/// A run of guest memory: address and length.
pub(super) type Seg = (GuestAddress, u64);

/// Why a chain is not a request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum ChainError {
    #[error("a device-readable descriptor after a device-writable one")]
    Order,
    #[error("{0} device-readable bytes: too short for the 16-byte header")]
    NoHeader(u64),
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("a buffer outside guest memory")]
    Memory,
    #[error("data of the wrong direction for the request type")]
    Direction,
}

/// The request header (virtio 1.2 §5.2.6), little-endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ReqHeader {
    pub type_: u32,
    pub sector: u64,
}

/// A well-formed chain: header, data both ways, where the status goes.
#[derive(Debug)]
pub(super) struct Request {
    pub hdr: ReqHeader,
    /// Device-readable bytes after the header.
    pub out: Vec<Seg>,
    pub out_len: u64,
    /// Device-writable bytes before the status byte.
    pub inp: Vec<Seg>,
    pub in_len: u64,
    pub status: GuestAddress,
}

/// What a chain is.
#[derive(Debug)]
pub(super) enum Layout {
    Ok(Request),
    /// Of the wrong shape, with a status byte to answer `IOERR` in.
    Bad(GuestAddress, ChainError),
    /// Of the wrong shape, without a status byte that can be written: returned with length 0.
    Unanswerable(ChainError),
}

/// `addr + n`, saturated: an address past the end of the address space is outside guest
/// memory, never a wrapped one inside it.
fn offset(addr: GuestAddress, n: u64) -> GuestAddress {
    GuestAddress(addr.0.saturating_add(n))
}

/// Splits `segs` after `at` bytes.
pub(super) fn split(segs: &[Seg], at: u64) -> (Vec<Seg>, Vec<Seg>) {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    let mut done = 0u64;
    for &(addr, len) in segs {
        let take = at.saturating_sub(done).min(len);
        if take > 0 {
            head.push((addr, take));
        }
        if take < len {
            tail.push((offset(addr, take), len - take));
        }
        done += len;
    }
    (head, tail)
}

fn in_memory(mem: &GuestMemoryMmap, segs: &[Seg]) -> bool {
    segs.iter().all(|&(addr, len)| {
        usize::try_from(len).is_ok_and(|len| GuestMemoryBackend::check_range(mem, addr, len))
    })
}

/// The layout of `chain`'s request.
pub(super) fn parse(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Layout {
    let (mut readable, mut writable) = (Vec::new(), Vec::new());
    let (mut r_len, mut w_len) = (0u64, 0u64);
    let mut order_ok = true;
    for d in chain {
        let len = u64::from(d.len());
        if d.is_write_only() {
            writable.push((d.addr(), len));
            w_len += len;
        } else {
            order_ok &= writable.is_empty();
            readable.push((d.addr(), len));
            r_len += len;
        }
    }
    // The status byte first: without it, nothing can be answered.
    let (w_data, status) = split(&writable, w_len.saturating_sub(1));
    let status = match status.first() {
        Some(&(addr, _)) if w_len > 0 => addr,
        _ => return Layout::Unanswerable(ChainError::NoStatus),
    };
    if !GuestMemoryBackend::check_range(mem, status, 1) {
        return Layout::Unanswerable(ChainError::Memory);
    }
    if !order_ok {
        return Layout::Bad(status, ChainError::Order);
    }
    if r_len < REQ_HDR_LEN as u64 {
        return Layout::Bad(status, ChainError::NoHeader(r_len));
    }
    let (hdr_segs, out) = split(&readable, REQ_HDR_LEN as u64);
    if !in_memory(mem, &readable) || !in_memory(mem, &w_data) {
        return Layout::Bad(status, ChainError::Memory);
    }
    let mut raw = [0u8; REQ_HDR_LEN];
    let mut at = 0usize;
    for (addr, len) in hdr_segs {
        let end = at + len as usize;
        let Some(dst) = raw.get_mut(at..end) else {
            return Layout::Bad(status, ChainError::NoHeader(r_len));
        };
        if mem.read_slice(dst, addr).is_err() {
            return Layout::Bad(status, ChainError::Memory);
        }
        at = end;
    }
    let mut type_ = [0u8; 4];
    type_.copy_from_slice(&raw[..4]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..]);
    Layout::Ok(Request {
        hdr: ReqHeader {
            type_: u32::from_le_bytes(type_),
            sector: u64::from_le_bytes(sector),
        },
        out_len: r_len - REQ_HDR_LEN as u64,
        out,
        in_len: w_len - 1,
        inp: w_data,
        status,
    })
}

/// Calls `f(guest address, byte offset within the data, length)` for each piece of at most
/// `chunk` bytes of `segs`, in order, until it fails.
pub(super) fn for_chunks<E>(
    segs: &[Seg],
    chunk: usize,
    mut f: impl FnMut(GuestAddress, u64, usize) -> Result<(), E>,
) -> Result<(), E> {
    let mut done = 0u64;
    for &(addr, len) in segs {
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(chunk as u64);
            f(offset(addr, at), done + at, n as usize)?;
            at += n;
        }
        done += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cuts_inside_a_segment_and_keeps_order() {
        let segs = [(GuestAddress(0x1000), 10), (GuestAddress(0x2000), 10)];
        let (a, b) = split(&segs, 15);
        assert_eq!(
            a,
            vec![(GuestAddress(0x1000), 10), (GuestAddress(0x2000), 5)]
        );
        assert_eq!(b, vec![(GuestAddress(0x2005), 5)]);
        let (a, b) = split(&segs, 0);
        assert!(a.is_empty());
        assert_eq!(b.len(), 2);
        let (a, b) = split(&segs, 20);
        assert_eq!((a.len(), b.len()), (2, 0));
    }

    #[test]
    fn chunks_cover_every_byte_once_in_order() {
        let segs = [(GuestAddress(0x1000), 10), (GuestAddress(0x2000), 7)];
        let mut seen = Vec::new();
        for_chunks::<()>(&segs, 4, |a, off, n| {
            seen.push((a.0, off, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (0x1000, 0, 4),
                (0x1004, 4, 4),
                (0x1008, 8, 2),
                (0x2000, 10, 4),
                (0x2004, 14, 3)
            ]
        );
    }
}
