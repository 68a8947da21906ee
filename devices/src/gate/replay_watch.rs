//! After a failover, replayed TCP input is delivered again until the restored guest has
//! taken it.
//!
//! The primary let the guest's ACKs leave as soon as the backup held the input they covered
//! ("TCP at full speed"), so the client may have been told about bytes the restored guest has
//! yet to receive: the backup replays them ([`crate::virtio::net::Net::queue_replay`]). A
//! guest takes a segment only as far as its receive window reaches, though, and the replay
//! comes in a burst: the primary's guest had its application drain the socket between the
//! original frames, the restored one may not have yet. Whatever it cuts off at the window's
//! edge the client will never send again (it was acknowledged), and the stream stalls for
//! good. So, like a TCP sender, the device keeps each replayed segment until the guest's own
//! ACK covers it, and offers the rest again whenever the guest's ACK or window for that
//! connection moves (its application made room). Bounded: a segment is offered at most
//! [`MAX_OFFERS`] times, and the watch ends [`WATCH_FOR`] after the takeover.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::tcp_ack::{tcp_segment, TcpSegment};

/// How long after the replay started segments are still offered again.
pub const WATCH_FOR: Duration = Duration::from_secs(10);
/// How often one segment is offered at most.
pub const MAX_OFFERS: u32 = 256;

/// A connection, seen from the client: (client address, port), (guest address, port).
type Flow = (([u8; 16], u16), ([u8; 16], u16));

struct Watched {
    flow: Flow,
    /// Sequence number after the segment (wrapping).
    end: u32,
    offers: u32,
    /// The frame as delivered (virtio-net header first).
    frame: Vec<u8>,
}

/// The guest's latest ACK number and window on a watched connection.
struct GuestSide {
    flow: Flow,
    ack: u32,
    window: u16,
}

/// See the module documentation. Empty (and free) unless a replay is under way.
#[derive(Default)]
pub struct ReplayWatch {
    until: Option<Instant>,
    watched: VecDeque<Watched>,
    guest: Vec<GuestSide>,
}

/// `a` is at or before `b` in sequence space (RFC 9293 comparisons, modulo 2^32).
fn seq_le(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) >= 0
}

impl ReplayWatch {
    /// Whether a replay is being watched (it may have expired; the next call notices).
    pub fn is_watching(&self) -> bool {
        self.until.is_some()
    }

    /// A replay starts now (a later one extends the watch).
    pub fn start(&mut self, now: Instant) {
        self.until = Some(now + WATCH_FOR);
    }

    fn expired(&mut self, now: Instant) -> bool {
        if self.until.is_some_and(|until| now < until) {
            return false;
        }
        self.until = None;
        self.watched.clear();
        self.guest.clear();
        true
    }

    /// A replayed frame (`logged`: header then Ethernet frame, `header_len` bytes of header)
    /// reached the guest: a TCP segment with data is watched until the guest acknowledges it.
    pub fn delivered(&mut self, logged: &[u8], header_len: usize, now: Instant) {
        if self.expired(now) {
            return;
        }
        let Some(seg) = logged.get(header_len..).and_then(tcp_segment) else {
            return;
        };
        if seg.len == 0 {
            return;
        }
        let (flow, end) = ((seg.src, seg.dst), seg.seq.wrapping_add(seg.len));
        if self.watched.iter().any(|w| w.flow == flow && w.end == end) {
            // Offered again by `guest_sent`: already watched (and counted).
            return;
        }
        self.watched.push_back(Watched {
            flow,
            end,
            offers: 1,
            frame: logged.to_vec(),
        });
    }

    /// The guest sent `frame` (an Ethernet frame). Returns the watched frames of its
    /// connection to deliver again, oldest first: those its ACK does not cover, when its ACK
    /// or window moved since the last frame seen on that connection.
    pub fn guest_sent(&mut self, frame: &[u8], now: Instant) -> Vec<Vec<u8>> {
        if self.until.is_none() || self.expired(now) {
            return Vec::new();
        }
        let Some(TcpSegment {
            src,
            dst,
            ack: Some(ack),
            window,
            ..
        }) = tcp_segment(frame)
        else {
            return Vec::new();
        };
        let flow = (dst, src);
        self.watched
            .retain(|w| w.flow != flow || !seq_le(w.end, ack));
        let moved = match self.guest.iter_mut().find(|g| g.flow == flow) {
            Some(g) => {
                let moved = g.ack != ack || g.window != window;
                (g.ack, g.window) = (ack, window);
                moved
            }
            None => {
                self.guest.push(GuestSide { flow, ack, window });
                true
            }
        };
        if !moved {
            return Vec::new();
        }
        let mut again = Vec::new();
        let mut kept = VecDeque::with_capacity(self.watched.len());
        for mut w in self.watched.drain(..) {
            if w.flow != flow {
                kept.push_back(w);
            } else if w.offers < MAX_OFFERS {
                w.offers += 1;
                again.push(w.frame.clone());
                kept.push_back(w);
            }
        }
        self.watched = kept;
        again
    }

    /// Segments still waiting for the guest's ACK.
    pub fn pending(&self) -> usize {
        self.watched.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const HDR: usize = 12;

    /// An IPv4 TCP segment client 10.0.0.1:5000 -> guest 10.0.0.2:7001 (or the reverse),
    /// behind a 12-byte header when `to_guest`.
    pub(crate) fn segment(
        to_guest: bool,
        seq: u32,
        ack: u32,
        window: u16,
        payload: usize,
    ) -> Vec<u8> {
        let (src, dst, sport, dport) = if to_guest {
            ([10, 0, 0, 1], [10, 0, 0, 2], 5000u16, 7001u16)
        } else {
            ([10, 0, 0, 2], [10, 0, 0, 1], 7001, 5000)
        };
        let total = 20 + 20 + payload;
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = vec![0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[9] = 6;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x10;
        tcp[14..16].copy_from_slice(&window.to_be_bytes());
        f.extend_from_slice(&tcp);
        f.extend(std::iter::repeat_n(0xab, payload));
        if to_guest {
            let mut l = vec![0u8; HDR];
            l.extend_from_slice(&f);
            l
        } else {
            f
        }
    }

    #[test]
    fn a_segment_the_guest_cut_short_is_offered_again_when_its_window_opens() {
        let now = Instant::now();
        let mut w = ReplayWatch::default();
        w.start(now);
        let a = segment(true, 1000, 1, 100, 500);
        let b = segment(true, 1500, 1, 100, 500);
        w.delivered(&a, HDR, now);
        w.delivered(&b, HDR, now);
        assert_eq!(w.pending(), 2);
        // The guest took 300 bytes of a (its window ended there): both are offered again.
        assert_eq!(
            w.guest_sent(&segment(false, 1, 1300, 0, 0), now),
            vec![a.clone(), b.clone()]
        );
        // The same ACK and window again (a duplicate): nothing new to offer.
        assert!(w.guest_sent(&segment(false, 1, 1300, 0, 0), now).is_empty());
        // Its application made room: the window moved, both are still short.
        assert_eq!(
            w.guest_sent(&segment(false, 1, 1300, 64, 0), now),
            vec![a.clone(), b.clone()]
        );
        // Delivering what was offered again watches nothing twice.
        w.delivered(&a, HDR, now);
        w.delivered(&b, HDR, now);
        assert_eq!(w.pending(), 2);
        // a is covered now.
        assert_eq!(w.guest_sent(&segment(false, 1, 1500, 64, 0), now), vec![b]);
        assert_eq!(w.pending(), 1);
        assert!(w
            .guest_sent(&segment(false, 1, 2000, 64, 0), now)
            .is_empty());
        assert_eq!(w.pending(), 0);
    }

    #[test]
    fn other_traffic_and_other_connections_are_left_alone() {
        let now = Instant::now();
        let mut w = ReplayWatch::default();
        w.start(now);
        // No payload: nothing to watch; not TCP: nothing either.
        w.delivered(&segment(true, 1000, 1, 100, 0), HDR, now);
        w.delivered(&[0u8; 60], HDR, now);
        assert_eq!(w.pending(), 0);
        let a = segment(true, 1000, 1, 100, 500);
        w.delivered(&a, HDR, now);
        // An ACK of another connection (other port) offers nothing.
        let mut other = segment(false, 1, 1000, 0, 0);
        other[34..36].copy_from_slice(&7002u16.to_be_bytes());
        assert!(w.guest_sent(&other, now).is_empty());
        assert_eq!(w.pending(), 1);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let now = Instant::now();
        let mut w = ReplayWatch::default();
        w.start(now);
        let a = segment(true, u32::MAX - 99, 1, 100, 200);
        w.delivered(&a, HDR, now);
        assert_eq!(
            w.guest_sent(&segment(false, 1, u32::MAX, 10, 0), now),
            vec![a]
        );
        assert!(w.guest_sent(&segment(false, 1, 100, 10, 0), now).is_empty());
        assert_eq!(w.pending(), 0);
    }

    #[test]
    fn offers_and_the_watch_are_bounded() {
        let now = Instant::now();
        let mut w = ReplayWatch::default();
        w.start(now);
        w.delivered(&segment(true, 1000, 1, 100, 500), HDR, now);
        let mut offered = 1;
        for window in 1..=(MAX_OFFERS as u16 + 10) {
            offered += w.guest_sent(&segment(false, 1, 1000, window, 0), now).len();
        }
        assert_eq!(offered, MAX_OFFERS as usize);
        assert_eq!(w.pending(), 0);
        // After the watch ends nothing is kept.
        w.delivered(&segment(true, 1000, 1, 100, 500), HDR, now + WATCH_FOR);
        assert_eq!(w.pending(), 0);
        // Without a replay nothing is watched at all.
        let mut idle = ReplayWatch::default();
        idle.delivered(&segment(true, 1000, 1, 100, 500), HDR, now);
        assert_eq!(idle.pending(), 0);
    }
}
