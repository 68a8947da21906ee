//! The virtio-vsock packet header (virtio 1.x, 5.10.6 Device Operation) and the scatter-gather
//! access to the descriptor chains that carry packets.
//!
//! Every packet is a 44-byte little-endian header followed by `len` payload bytes. A chain may
//! split header and payload over descriptors any way it likes (Linux puts them in one
//! descriptor on receive, older drivers in two), so header and payload are gathered from, and
//! scattered into, the chain's buffers by offset.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMemoryMmap;

/// Size of the packet header (`struct virtio_vsock_hdr`).
pub const HDR_LEN: usize = 44;

/// The host's address (5.10.4): packets from the guest to the host carry it as `dst_cid`.
pub const VSOCK_HOST_CID: u64 = 2;

/// Socket types (5.10.6).
pub const VSOCK_TYPE_STREAM: u16 = 1;
pub const VSOCK_TYPE_SEQPACKET: u16 = 2;

/// Operations (5.10.6).
pub const VSOCK_OP_REQUEST: u16 = 1;
pub const VSOCK_OP_RESPONSE: u16 = 2;
pub const VSOCK_OP_RST: u16 = 3;
pub const VSOCK_OP_SHUTDOWN: u16 = 4;
pub const VSOCK_OP_RW: u16 = 5;
pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags, from the sender's side: it will receive no more / send no more.
pub const VSOCK_SHUTDOWN_F_RECEIVE: u32 = 1;
pub const VSOCK_SHUTDOWN_F_SEND: u32 = 2;

/// Largest payload of one packet in either direction (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`);
/// a guest packet claiming more is malformed.
pub const MAX_PKT_LEN: usize = 64 << 10;

/// A packet header, fields in host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
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

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |i: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
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
}

/// Why a descriptor chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ChainError {
    #[error("the chain is cut short (loop, bad next index, bad indirect table)")]
    Broken,
    #[error("a descriptor lies outside guest memory")]
    OutOfRange,
    #[error("a transmit descriptor is device-writable")]
    WriteOnlyInTx,
    #[error("a receive descriptor is device-readable")]
    ReadOnlyInRx,
    #[error("the chain holds {0} bytes, less than a packet header")]
    TooShort(usize),
}

/// The buffers of one chain, each checked to lie in guest memory.
pub(crate) struct Segments {
    segs: Vec<(GuestAddress, usize)>,
    total: usize,
}

impl Segments {
    /// The buffers of `chain`, all of the direction the queue needs (`writable`: receive
    /// queue), holding at least a header.
    pub(crate) fn of(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        writable: bool,
    ) -> Result<Segments, ChainError> {
        let mut segs = Vec::new();
        let mut total = 0usize;
        let mut last_has_next = true;
        for desc in chain {
            if desc.is_write_only() != writable {
                return Err(if writable {
                    ChainError::ReadOnlyInRx
                } else {
                    ChainError::WriteOnlyInTx
                });
            }
            last_has_next = desc.has_next();
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
                return Err(ChainError::OutOfRange);
            }
            segs.push((desc.addr(), len));
            total = total.saturating_add(len);
        }
        if last_has_next {
            return Err(ChainError::Broken);
        }
        if total < HDR_LEN {
            return Err(ChainError::TooShort(total));
        }
        Ok(Segments { segs, total })
    }

    /// Bytes the chain holds.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Calls `f(addr, range in the chain)` for the parts of the buffers that cover
    /// `offset..offset + len`; stops at the first error.
    fn walk(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ()>,
    ) -> Result<(), ()> {
        let end = offset.checked_add(len).ok_or(())?;
        if end > self.total {
            return Err(());
        }
        let mut at = 0usize;
        for &(addr, seg_len) in &self.segs {
            let seg_end = at + seg_len;
            let from = offset.max(at);
            let to = end.min(seg_end);
            if from < to {
                let guest = addr.checked_add((from - at) as u64).ok_or(())?;
                f(guest, from - offset..to - offset)?;
            }
            if seg_end >= end {
                break;
            }
            at = seg_end;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` in the chain.
    pub(crate) fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), ()> {
        self.walk(offset, buf.len(), |addr, r| {
            mem.read_slice(&mut buf[r], addr).map_err(|_| ())
        })
    }

    /// Writes `data` at `offset` in the chain (through vm-memory: the pages are marked dirty).
    pub(crate) fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: usize,
        data: &[u8],
    ) -> Result<(), ()> {
        self.walk(offset, data.len(), |addr, r| {
            mem.write_slice(&data[r], addr).map_err(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_with_the_spec_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1111_2222,
            dst_port: 1024,
            len: 7,
            type_: VSOCK_TYPE_STREAM,
            op: VSOCK_OP_RW,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[20..24], &1024u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &99u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }
}
