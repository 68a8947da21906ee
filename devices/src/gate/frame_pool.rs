//! Reused buffers for logged frames: the primary's input log and the backup's input store.
//!
//! During a bulk transfer to the guest both logs take megabytes of frames per epoch and free
//! them again soon after (the primary once they are sent, the backup once an epoch covering
//! them is held). Allocated and freed one by one, that memory goes back to the kernel on the
//! frees and is page-faulted in again for the next frames: on the backup the faults took
//! about 40 % of the receiving thread's time, and the whole client-to-guest transfer ran
//! 15-20 % slower. Frames too small to matter are allocated as usual.

use crate::virtio::net::MAX_PACKET_LEN;

/// Spare buffers for large frames, up to a bound.
#[derive(Debug)]
pub struct FramePool {
    spare: Vec<Vec<u8>>,
    max_spare: usize,
}

impl FramePool {
    /// Frames at least this long get a pooled buffer (segments with receive offloads); smaller
    /// ones stay in the allocator's small bins, which it keeps.
    pub const POOLED_FROM: usize = 16 << 10;
    /// A pooled buffer's capacity: the largest packet a virtio-net device delivers, its header
    /// included.
    pub const BUFFER_LEN: usize = MAX_PACKET_LEN;

    /// A pool keeping at most `max_spare_bytes` of spare buffers.
    pub fn new(max_spare_bytes: usize) -> Self {
        Self {
            spare: Vec::new(),
            max_spare: max_spare_bytes / Self::BUFFER_LEN,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(&mut self, data: &[u8]) -> Vec<u8> {
        if !(Self::POOLED_FROM..=Self::BUFFER_LEN).contains(&data.len()) {
            return data.to_vec();
        }
        let mut buf = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(Self::BUFFER_LEN));
        buf.clear();
        buf.extend_from_slice(data);
        buf
    }

    /// The frame `buffer[..len]` as a buffer of its own. A large frame in a buffer as long as
    /// a pooled one's capacity (a device's receive buffer) is taken whole, not copied: a spare
    /// buffer of the same length replaces it (only a fresh spare's bytes need zeroing).
    pub fn take_frame(&mut self, buffer: &mut Vec<u8>, len: usize) -> Vec<u8> {
        let swappable = (Self::POOLED_FROM..=Self::BUFFER_LEN).contains(&len)
            && len <= buffer.len()
            && buffer.capacity() >= Self::BUFFER_LEN;
        if !swappable {
            return self.copy_of(&buffer[..len.min(buffer.len())]);
        }
        let mut spare = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(Self::BUFFER_LEN));
        spare.resize(buffer.len(), 0);
        let mut frame = std::mem::replace(buffer, spare);
        frame.truncate(len);
        frame
    }

    /// Takes `buf` back for reuse: kept if it came from the pool and there is room.
    pub fn give_back(&mut self, buf: Vec<u8>) {
        if buf.capacity() >= Self::BUFFER_LEN && self.spare.len() < self.max_spare {
            self.spare.push(buf);
        }
    }

    /// Spare buffers kept now.
    pub fn spare(&self) -> usize {
        self.spare.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_frames_reuse_buffers_given_back() {
        let mut pool = FramePool::new(2 * FramePool::BUFFER_LEN);
        let big = vec![7u8; 60_000];
        let first = pool.copy_of(&big);
        assert_eq!(first, big);
        pool.give_back(first);
        assert_eq!(pool.spare(), 1);
        let again = pool.copy_of(&[9u8; 20_000]);
        assert_eq!(pool.spare(), 0, "the spare buffer was reused");
        assert_eq!(again, vec![9u8; 20_000]);
    }

    #[test]
    fn a_large_frame_takes_its_buffer_and_a_spare_of_the_same_length_replaces_it() {
        let mut pool = FramePool::new(2 * FramePool::BUFFER_LEN);
        let mut rx = vec![3u8; FramePool::BUFFER_LEN];
        let at = rx.as_ptr();
        let frame = pool.take_frame(&mut rx, 40_000);
        assert_eq!(frame, vec![3u8; 40_000]);
        assert_eq!(frame.as_ptr(), at, "the buffer itself, not a copy");
        assert_eq!(rx.len(), FramePool::BUFFER_LEN);
        assert!(rx.capacity() >= FramePool::BUFFER_LEN);
        // The frame comes back and is the next replacement, whatever it held.
        pool.give_back(frame);
        let mut rx2 = vec![4u8; FramePool::BUFFER_LEN];
        let second = pool.take_frame(&mut rx2, 30_000);
        assert_eq!(second, vec![4u8; 30_000]);
        assert_eq!(rx2.as_ptr(), at);
        assert_eq!(rx2.len(), FramePool::BUFFER_LEN);
        // A small frame is copied and the buffer stays.
        let kept = rx2.as_ptr();
        rx2[..100].fill(5);
        assert_eq!(pool.take_frame(&mut rx2, 100), vec![5u8; 100]);
        assert_eq!(rx2.as_ptr(), kept);
    }

    #[test]
    fn small_frames_and_foreign_buffers_are_not_kept_and_the_bound_holds() {
        let mut pool = FramePool::new(2 * FramePool::BUFFER_LEN);
        let small = pool.copy_of(&[1u8; 1514]);
        assert!(small.capacity() < FramePool::BUFFER_LEN);
        pool.give_back(small);
        pool.give_back(vec![0u8; 100]);
        assert_eq!(pool.spare(), 0);
        for _ in 0..3 {
            pool.give_back(Vec::with_capacity(FramePool::BUFFER_LEN));
        }
        assert_eq!(pool.spare(), 2, "at most the bound is kept");
    }
}
