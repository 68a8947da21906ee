//! Which input frames an early ACK needs the backup to hold (TCP at full speed).
//!
//! A pure TCP ACK from the guest acknowledges the bytes of one connection below its ACK
//! number. It may leave once the backup holds every input frame carrying those bytes: at
//! failover they are in the restored state or delivered again. Frames delivered after them
//! (segments of the same connection the guest has not acknowledged yet, other connections'
//! input) need not wait for it. Tagged with the newest frame delivered overall, an ACK waited
//! for the mirroring of the segments the NIC had already put into the guest's buffers behind
//! the ones it acknowledges: up to a ring's worth (a megabyte with receive offloads).
//!
//! The index keeps, per connection, the frames not yet known to be mirrored that carry
//! sequence space (data, SYN, FIN): their log seq and the TCP sequence number of their first
//! byte. It is bounded: past [`MAX_ENTRIES`] it forgets its entries and counts every frame
//! delivered so far as needed by every ACK, as if there were no index, until the backup holds
//! them.

use std::collections::{HashMap, VecDeque};

use super::tcp_ack::tcp_segment;
use crate::tap::VNET_HDR_LEN;

/// Entries kept at most (frames delivered but not yet mirrored, over all connections).
const MAX_ENTRIES: usize = 16 * 1024;

/// An address (IPv4 in the first 4 bytes) and port.
type Endpoint = ([u8; 16], u16);

/// `a` is before `b` in sequence space (RFC 9293 comparisons, modulo 2^32).
fn seq_lt(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

#[derive(Debug, Default)]
pub struct AckIndex {
    /// Keyed by (sender, receiver) of the input frames; (log seq, first TCP seq) oldest first.
    flows: HashMap<(Endpoint, Endpoint), VecDeque<(u64, u32)>>,
    entries: usize,
    /// Frames up to this log seq may be missing from the index: every ACK needs them.
    unindexed_upto: u64,
}

impl AckIndex {
    /// Frame `seq` (virtio-net header, then Ethernet) was delivered to the guest; the backup
    /// holds every frame up to `mirrored`.
    pub fn delivered(&mut self, seq: u64, frame: &[u8], mirrored: u64) {
        let Some(segment) = frame.get(VNET_HDR_LEN..).and_then(tcp_segment) else {
            return;
        };
        if segment.len == 0 {
            // A bare ACK from the peer: no bytes the guest could acknowledge.
            return;
        }
        if self.entries >= MAX_ENTRIES {
            self.prune(mirrored);
        }
        if self.entries >= MAX_ENTRIES {
            self.flows.clear();
            self.entries = 0;
            self.unindexed_upto = seq;
            return;
        }
        let frames = self.flows.entry((segment.src, segment.dst)).or_default();
        while frames.front().is_some_and(|&(s, _)| s <= mirrored) {
            frames.pop_front();
            self.entries -= 1;
        }
        frames.push_back((seq, segment.seq));
        self.entries += 1;
    }

    /// The newest input frame (log seq; 0: none) the pure TCP ACK `ack`, an Ethernet frame
    /// from the guest, needs the backup to hold. None when `ack` is not a TCP segment with an
    /// ACK number: the caller then counts every frame delivered as needed.
    pub fn needed_by(&mut self, ack: &[u8], mirrored: u64) -> Option<u64> {
        let segment = tcp_segment(ack)?;
        let acknowledged = segment.ack?;
        let mut needed = self.unindexed_upto;
        // The ACK goes the other way: from the receiver of the input to its sender.
        let key = (segment.dst, segment.src);
        if let Some(frames) = self.flows.get_mut(&key) {
            while frames.front().is_some_and(|&(s, _)| s <= mirrored) {
                frames.pop_front();
                self.entries -= 1;
            }
            // A retransmitted segment may come after later ones: look at all of them.
            for &(seq, first) in frames.iter() {
                if seq_lt(first, acknowledged) {
                    needed = needed.max(seq);
                }
            }
            if frames.is_empty() {
                self.flows.remove(&key);
            }
        }
        Some(needed)
    }

    /// Forgets everything: protection (re)starts with every earlier frame mirrored, or ends.
    pub fn clear(&mut self) {
        self.flows.clear();
        self.entries = 0;
        self.unindexed_upto = 0;
    }

    fn prune(&mut self, mirrored: u64) {
        self.flows.retain(|_, frames| {
            while frames.front().is_some_and(|&(s, _)| s <= mirrored) {
                frames.pop_front();
            }
            !frames.is_empty()
        });
        self.entries = self.flows.values().map(VecDeque::len).sum();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gate::tcp_ack::tests::{ipv4_tcp_frame, pure_ack};

    const TCP_ACK: u8 = 0x10;
    const TCP_PSH: u8 = 0x08;

    /// A data segment from the peer to the guest (the reverse of [`pure_ack`]'s direction),
    /// `len` bytes from sequence number `first`, from source port `port`, with the 12-byte
    /// virtio-net header a logged frame starts with.
    pub(crate) fn input_segment(port: u16, first: u32, len: usize) -> Vec<u8> {
        let mut f = ipv4_tcp_frame(TCP_ACK | TCP_PSH, 0, len);
        // Swap addresses and ports: the guest sends `pure_ack` from 10.0.0.2:40000.
        f[14 + 12..14 + 16].copy_from_slice(&[10, 0, 0, 1]);
        f[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 2]);
        f[14 + 20..14 + 22].copy_from_slice(&port.to_be_bytes());
        f[14 + 22..14 + 24].copy_from_slice(&40000u16.to_be_bytes());
        f[14 + 24..14 + 28].copy_from_slice(&first.to_be_bytes());
        let mut logged = vec![0u8; VNET_HDR_LEN];
        logged.extend_from_slice(&f);
        logged
    }

    /// The guest's pure ACK of everything below `acknowledged`, to the peer's port `port`.
    pub(crate) fn guest_ack(port: u16, acknowledged: u32) -> Vec<u8> {
        let mut f = pure_ack();
        f[14 + 22..14 + 24].copy_from_slice(&port.to_be_bytes());
        f[14 + 28..14 + 32].copy_from_slice(&acknowledged.to_be_bytes());
        f
    }

    #[test]
    fn an_ack_needs_only_the_frames_whose_bytes_it_acknowledges() {
        let mut index = AckIndex::default();
        index.delivered(1, &input_segment(80, 1000, 100), 0);
        index.delivered(2, &input_segment(81, 5000, 100), 0);
        index.delivered(3, &input_segment(80, 1100, 100), 0);
        index.delivered(4, &input_segment(80, 1200, 100), 0);
        assert_eq!(index.needed_by(&guest_ack(80, 1000), 0), Some(0));
        assert_eq!(index.needed_by(&guest_ack(80, 1100), 0), Some(1));
        assert_eq!(index.needed_by(&guest_ack(80, 1150), 0), Some(3));
        assert_eq!(index.needed_by(&guest_ack(80, 1300), 0), Some(4));
        assert_eq!(index.needed_by(&guest_ack(81, 5100), 0), Some(2));
        // Another connection's ACK needs none of port 80's frames.
        assert_eq!(index.needed_by(&guest_ack(82, 9999), 0), Some(0));
    }

    #[test]
    fn a_late_retransmission_and_sequence_wrap_are_counted() {
        let mut index = AckIndex::default();
        index.delivered(1, &input_segment(80, u32::MAX - 49, 100), 0);
        index.delivered(2, &input_segment(80, 50, 100), 0);
        // The first segment again, after the second.
        index.delivered(3, &input_segment(80, u32::MAX - 49, 100), 0);
        assert_eq!(index.needed_by(&guest_ack(80, 50), 0), Some(3));
        assert_eq!(index.needed_by(&guest_ack(80, 150), 0), Some(3));
    }

    #[test]
    fn mirrored_frames_are_forgotten_and_overflow_falls_back_to_everything() {
        let mut index = AckIndex::default();
        index.delivered(1, &input_segment(80, 0, 10), 0);
        index.delivered(2, &input_segment(80, 10, 10), 0);
        assert_eq!(index.needed_by(&guest_ack(80, 20), 1), Some(2));
        assert_eq!(index.entries, 1, "frame 1 is mirrored");
        assert_eq!(index.needed_by(&guest_ack(80, 20), 2), Some(0));
        assert!(index.flows.is_empty());
        for seq in 1..=MAX_ENTRIES as u64 + 1 {
            index.delivered(seq, &input_segment(80, seq as u32 * 10, 10), 0);
        }
        assert_eq!(index.unindexed_upto, MAX_ENTRIES as u64 + 1);
        assert_eq!(
            index.needed_by(&guest_ack(82, 1), 0),
            Some(MAX_ENTRIES as u64 + 1),
            "after an overflow every ACK needs every frame so far"
        );
        index.clear();
        assert_eq!(index.needed_by(&guest_ack(82, 1), 0), Some(0));
    }

    #[test]
    fn bare_acks_and_other_frames_are_not_indexed_and_an_unparsable_ack_is_refused() {
        let mut index = AckIndex::default();
        index.delivered(1, &input_segment(80, 0, 0), 0);
        index.delivered(2, b"not a frame at all", 0);
        assert_eq!(index.entries, 0);
        assert_eq!(index.needed_by(b"short", 0), None);
    }
}
