//! Vsock packets as the switch holds them: a copy of the header ([`Hdr`], plain data) and
//! of the payload, taken out of a TX descriptor chain and written into RX descriptor chains
//! with `virtio_vsock::packet::VsockPacket`, which does the chain parsing and validation.

use serde::{Deserialize, Serialize};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::Bytes;

/// The host's CID: the switch is the vsock endpoint for host programs.
pub const HOST_CID: u64 = 2;
/// The only socket type the device offers.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio 1.2 §5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_F_RECEIVE: u32 = 1;
/// `SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_F_SEND: u32 = 2;

/// Size of the packet header in guest memory.
pub const HDR_SIZE: usize = PKT_HEADER_SIZE;
/// The largest payload accepted from a TX chain, and the largest RX data buffer used.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// One side of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub cid: u64,
    pub port: u32,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.cid, self.port)
    }
}

/// A vsock packet header (`struct virtio_vsock_hdr`), host-endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    /// A stream header from `src` to `dst` with no payload and no credit information.
    pub fn new(src: Endpoint, dst: Endpoint, op: u16) -> Self {
        Hdr {
            src_cid: src.cid,
            dst_cid: dst.cid,
            src_port: src.port,
            dst_port: dst.port,
            type_: TYPE_STREAM,
            op,
            ..Default::default()
        }
    }

    /// The sender.
    pub fn src(&self) -> Endpoint {
        Endpoint {
            cid: self.src_cid,
            port: self.src_port,
        }
    }

    /// The receiver.
    pub fn dst(&self) -> Endpoint {
        Endpoint {
            cid: self.dst_cid,
            port: self.dst_port,
        }
    }

    /// The header as it is laid out in guest memory (little-endian, packed).
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The header of a packet parsed by virtio-vsock.
    fn from_packet<B: vm_memory::bitmap::BitmapSlice>(p: &VsockPacket<'_, B>) -> Self {
        Hdr {
            src_cid: p.src_cid(),
            dst_cid: p.dst_cid(),
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            len: p.len(),
            type_: p.type_(),
            op: p.op(),
            flags: p.flags(),
            buf_alloc: p.buf_alloc(),
            fwd_cnt: p.fwd_cnt(),
        }
    }
}

/// Why a packet could not be taken from or put into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// Reading the payload or writing the packet failed (bad guest address).
    #[error("guest memory access: {0}")]
    Memory(String),
    /// The RX buffer has no room for payload while the packet has some.
    #[error("RX buffer has no room for payload")]
    NoRoom,
}

/// A packet held by the switch: header, payload, and how much of the payload has already
/// been written into the receiver's RX queue (a payload larger than one RX buffer is split
/// over several RW packets, which a stream allows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub hdr: Hdr,
    #[serde(with = "super::hex")]
    pub data: Vec<u8>,
    pub sent: usize,
}

impl Pending {
    /// A packet with header `hdr` (its `len` is set from `data`).
    pub fn new(mut hdr: Hdr, data: Vec<u8>) -> Self {
        hdr.len = data.len() as u32;
        Pending { hdr, data, sent: 0 }
    }

    /// Copies header and payload out of a TX packet. Only RW packets carry payload: any
    /// other packet's payload is dropped (and its `len` set to 0).
    pub fn from_tx<B: vm_memory::bitmap::BitmapSlice>(
        p: &VsockPacket<'_, B>,
    ) -> Result<Self, PacketError> {
        let mut hdr = Hdr::from_packet(p);
        let data = match p.data_slice().filter(|_| hdr.op == op::RW) {
            Some(slice) => {
                let mut data = vec![0u8; slice.len()];
                slice
                    .read_slice(&mut data, 0)
                    .map_err(|e| PacketError::Memory(e.to_string()))?;
                data
            }
            None => Vec::new(),
        };
        hdr.len = data.len() as u32;
        Ok(Pending { hdr, data, sent: 0 })
    }

    /// Payload bytes not yet delivered.
    pub fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.sent)
    }

    /// What the packet costs in a backlog: header plus undelivered payload.
    pub fn cost(&self) -> usize {
        HDR_SIZE + self.remaining()
    }

    /// Writes the next fragment of the packet into an RX packet; returns the bytes written
    /// (the used length) and how many payload bytes that fragment carried.
    pub fn write_into<B: vm_memory::bitmap::BitmapSlice>(
        &self,
        rx: &mut VsockPacket<'_, B>,
    ) -> Result<(u32, usize), PacketError> {
        let room = rx.data_slice().map_or(0, |s| s.len());
        let remaining = self.remaining();
        let n = remaining.min(room);
        if remaining > 0 && n == 0 {
            return Err(PacketError::NoRoom);
        }
        if n > 0 {
            let chunk = self
                .data
                .get(self.sent..self.sent + n)
                .ok_or(PacketError::NoRoom)?;
            if let Some(slice) = rx.data_slice() {
                slice
                    .write_slice(chunk, 0)
                    .map_err(|e| PacketError::Memory(e.to_string()))?;
            }
        }
        let mut hdr = self.hdr;
        hdr.len = n as u32;
        rx.set_header_from_raw(&hdr.to_bytes())
            .map_err(|e| PacketError::Memory(e.to_string()))?;
        Ok(((HDR_SIZE + n) as u32, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_matches_virtio_vsock_hdr() {
        let h = Hdr {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 3,
            src_port: 0x1111_2222,
            dst_port: 0x3333_4444,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0xa0b0_c0d0,
            buf_alloc: 0x0004_0000,
            fwd_cnt: 0x99,
        };
        let b = h.to_bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[8..16], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..20], &[0x22, 0x22, 0x11, 0x11]);
        assert_eq!(&b[20..24], &[0x44, 0x44, 0x33, 0x33]);
        assert_eq!(&b[24..28], &[5, 0, 0, 0]);
        assert_eq!(&b[28..30], &[1, 0]);
        assert_eq!(&b[30..32], &[5, 0]);
        assert_eq!(&b[32..36], &[0xd0, 0xc0, 0xb0, 0xa0]);
        assert_eq!(&b[36..40], &[0, 0, 4, 0]);
        assert_eq!(&b[40..44], &[0x99, 0, 0, 0]);
    }

    #[test]
    fn cost_counts_header_and_undelivered_payload() {
        let mut p = Pending::new(Hdr::default(), vec![1; 100]);
        assert_eq!(p.hdr.len, 100);
        assert_eq!(p.cost(), 144);
        p.sent = 60;
        assert_eq!(p.cost(), 84);
    }
}
