//! Reading and writing the guest's descriptor chains for the network card: a TX chain is
//! gathered (header and frame, device-readable only), an RX chain's room is checked
//! (device-writable only, inside guest memory, room for the header) before a frame is taken
//! from the backend, then the frame is scattered into it.

use crate::GuestMemoryMmap;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{NetHdr, ETH_HDR_LEN, NET_HDR_LEN};

/// Why a chain cannot carry a frame.
#[derive(Debug, thiserror::Error)]
pub(super) enum ChainError {
    #[error("a device-writable descriptor in a TX chain")]
    WriteOnly,
    #[error("a device-readable descriptor in an RX chain")]
    ReadOnly,
    #[error("longer than a header and the longest frame")]
    TooLong,
    #[error("{0} bytes: too short for the header (and, on TX, an Ethernet header)")]
    TooShort(usize),
    #[error("a buffer outside guest memory")]
    Memory,
    #[error("the header asks for checksum or GSO offload, which was not negotiated")]
    Offload,
}

/// Copies a TX chain (header and frame) into `buf`; returns its length.
pub(super) fn gather(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let mut len = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err(ChainError::WriteOnly);
        }
        let end = len
            .checked_add(d.len() as usize)
            .filter(|&end| end <= buf.len())
            .ok_or(ChainError::TooLong)?;
        let dst = buf.get_mut(len..end).ok_or(ChainError::TooLong)?;
        mem.read_slice(dst, d.addr())
            .map_err(|_| ChainError::Memory)?;
        len = end;
    }
    if len < NET_HDR_LEN + ETH_HDR_LEN {
        return Err(ChainError::TooShort(len));
    }
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr.copy_from_slice(buf.get(..NET_HDR_LEN).ok_or(ChainError::TooShort(len))?);
    let hdr = NetHdr::from_bytes(&hdr);
    if hdr.flags != 0 || hdr.gso_type != 0 {
        return Err(ChainError::Offload);
    }
    Ok(len)
}

/// The writable buffers of an RX chain, inside guest memory; it must hold at least the
/// header.
pub(super) fn scatter_room(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Vec<(GuestAddress, usize)>, ChainError> {
    let mut room = Vec::new();
    let mut total = 0usize;
    for d in chain {
        if !d.is_write_only() {
            return Err(ChainError::ReadOnly);
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(ChainError::Memory);
        }
        total = total
            .checked_add(d.len() as usize)
            .ok_or(ChainError::TooLong)?;
        room.push((d.addr(), d.len() as usize));
    }
    if total < NET_HDR_LEN {
        return Err(ChainError::TooShort(total));
    }
    Ok(room)
}

/// Writes the RX header and `frame` across `room`.
pub(super) fn write_frame(
    mem: &GuestMemoryMmap,
    room: &[(GuestAddress, usize)],
    frame: &[u8],
) -> Result<(), ChainError> {
    let hdr = NetHdr::RX.to_bytes();
    let mut parts = [&hdr[..], frame];
    let mut part = 0;
    for &(addr, len) in room {
        let mut at = 0usize;
        while at < len && part < parts.len() {
            let src = parts[part];
            let n = src.len().min(len - at);
            let dst = addr.0.checked_add(at as u64).ok_or(ChainError::Memory)?;
            mem.write_slice(&src[..n], GuestAddress(dst))
                .map_err(|_| ChainError::Memory)?;
            at += n;
            parts[part] = &src[n..];
            if parts[part].is_empty() {
                part += 1;
            }
        }
    }
    Ok(())
}
