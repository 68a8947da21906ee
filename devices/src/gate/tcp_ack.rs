//! Recognising pure TCP ACKs: segments that carry no data and no state change, only the ACK
//! flag (and possibly ECN bits). Only those may leave before their epoch commits.

const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPV6_HDR: usize = 40;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;

/// Whether `frame` (an untagged Ethernet frame) is a well-formed TCP segment over IPv4 or IPv6
/// (no extension headers) with no payload and only ACK among FIN/SYN/RST/PSH/ACK/URG.
/// Anything else, malformed included, is not.
pub fn is_pure_tcp_ack(frame: &[u8]) -> bool {
    let Some(ethertype) = frame.get(12..14) else {
        return false;
    };
    let ip = &frame[ETH_HDR.min(frame.len())..];
    // The IP packet without Ethernet padding: its own length field counts, not the frame's.
    let tcp = match u16::from_be_bytes([ethertype[0], ethertype[1]]) {
        ETHERTYPE_IPV4 => ipv4_tcp(ip),
        ETHERTYPE_IPV6 => ipv6_tcp(ip),
        // VLAN tags (0x8100, 0x88a8) and everything else.
        _ => None,
    };
    let Some(tcp) = tcp else {
        return false;
    };
    if tcp.len() < 20 {
        return false;
    }
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    if data_offset < 20 || data_offset != tcp.len() {
        // Shorter than the header (malformed) or payload behind it.
        return false;
    }
    let flags = tcp[13];
    flags & TCP_ACK != 0 && flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_PSH | TCP_URG) == 0
}

/// What the replay watch needs of a TCP segment (see [`super::ReplayWatch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    /// Source and destination addresses (IPv4 ones in the first 4 bytes) and ports.
    pub src: ([u8; 16], u16),
    pub dst: ([u8; 16], u16),
    pub seq: u32,
    pub ack: Option<u32>,
    pub window: u16,
    /// Sequence space the segment covers: payload bytes, plus one for SYN and for FIN.
    pub len: u32,
}

/// Parses `frame` (an untagged Ethernet frame; a segment of up to 64 KiB with receive
/// offloads) as a TCP segment over IPv4 or IPv6 without extension headers; None for anything
/// else, malformed included.
pub fn tcp_segment(frame: &[u8]) -> Option<TcpSegment> {
    let (tcp, (src, dst), data_offset) = tcp_of(frame)?;
    let word = |at: usize| u32::from_be_bytes([tcp[at], tcp[at + 1], tcp[at + 2], tcp[at + 3]]);
    let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    let flags = tcp[13];
    let control = u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
    Some(TcpSegment {
        src: (src, port(0)),
        dst: (dst, port(2)),
        seq: word(4),
        ack: (flags & TCP_ACK != 0).then(|| word(8)),
        window: port(14),
        len: (tcp.len() - data_offset) as u32 + control,
    })
}

/// Where in `frame` (as [`tcp_segment`] reads it) the segment's payload lies.
pub fn tcp_payload(frame: &[u8]) -> Option<std::ops::Range<usize>> {
    let (tcp, _, data_offset) = tcp_of(frame)?;
    // `tcp` is a part of `frame`.
    let start = tcp.as_ptr() as usize - frame.as_ptr() as usize + data_offset;
    Some(start..start + tcp.len() - data_offset)
}

/// Source and destination addresses (IPv4 ones in the first 4 bytes).
type Addresses = ([u8; 16], [u8; 16]);

/// The TCP segment in `frame` (header and payload), its addresses and its data offset.
fn tcp_of(frame: &[u8]) -> Option<(&[u8], Addresses, usize)> {
    let ethertype = frame.get(12..14)?;
    let ip = frame.get(ETH_HDR..)?;
    let (tcp, src, dst) = match u16::from_be_bytes([ethertype[0], ethertype[1]]) {
        ETHERTYPE_IPV4 => {
            let tcp = ipv4_tcp(ip)?;
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src[..4].copy_from_slice(&ip[12..16]);
            dst[..4].copy_from_slice(&ip[16..20]);
            (tcp, src, dst)
        }
        ETHERTYPE_IPV6 => {
            let tcp = ipv6_tcp(ip)?;
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            (tcp, src, dst)
        }
        _ => return None,
    };
    if tcp.len() < 20 {
        return None;
    }
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    if data_offset < 20 || data_offset > tcp.len() {
        return None;
    }
    Some((tcp, (src, dst), data_offset))
}

/// The TCP segment of an IPv4 packet (header and payload, padding cut off).
fn ipv4_tcp(ip: &[u8]) -> Option<&[u8]> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    // MF flag and fragment offset: a fragment's TCP header may be elsewhere or incomplete.
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 || ip[9] != IPPROTO_TCP {
        return None;
    }
    ip.get(ihl..total)
}

/// The TCP segment of an IPv6 packet whose next header is TCP directly.
fn ipv6_tcp(ip: &[u8]) -> Option<&[u8]> {
    if ip.len() < IPV6_HDR || ip[0] >> 4 != 6 || ip[6] != IPPROTO_TCP {
        return None;
    }
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    // A zero payload length means a jumbogram (hop-by-hop option), which has an extension
    // header and so is already refused by the next-header check; an empty segment is too short.
    ip.get(IPV6_HDR..IPV6_HDR + payload)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A TCP/IPv4 frame with `flags`, `options` bytes of TCP options and `payload` data bytes,
    /// padded to the 60-byte Ethernet minimum.
    pub(crate) fn ipv4_tcp_frame(flags: u8, options: usize, payload: usize) -> Vec<u8> {
        let tcp_len = 20 + options + payload;
        let total = 20 + tcp_len;
        let mut f = vec![0u8; ETH_HDR + total];
        f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip = &mut f[ETH_HDR..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = IPPROTO_TCP;
        ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 1]);
        let tcp = &mut ip[20..];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = (((20 + options) / 4) as u8) << 4;
        tcp[13] = flags;
        if f.len() < 60 {
            f.resize(60, 0);
        }
        f
    }

    /// The same over IPv6.
    pub(crate) fn ipv6_tcp_frame(flags: u8, payload: usize) -> Vec<u8> {
        let tcp_len = 20 + payload;
        let mut f = vec![0u8; ETH_HDR + IPV6_HDR + tcp_len];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let ip = &mut f[ETH_HDR..];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        ip[6] = IPPROTO_TCP;
        ip[7] = 64;
        let tcp = &mut ip[IPV6_HDR..];
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        f
    }

    /// A pure ACK (padded to 60 bytes).
    pub(crate) fn pure_ack() -> Vec<u8> {
        ipv4_tcp_frame(TCP_ACK, 0, 0)
    }

    #[test]
    fn plain_ack_over_ipv4_and_ipv6() {
        assert!(is_pure_tcp_ack(&pure_ack()));
        assert!(is_pure_tcp_ack(&ipv6_tcp_frame(TCP_ACK, 0)));
    }

    #[test]
    fn ack_with_options_and_ecn_bits() {
        // Timestamps (12 bytes of options) and ECE|CWR.
        assert!(is_pure_tcp_ack(&ipv4_tcp_frame(TCP_ACK | 0xc0, 12, 0)));
    }

    #[test]
    fn padding_beyond_the_ip_length_is_not_payload() {
        let f = pure_ack();
        assert_eq!(f.len(), 60);
        let mut longer = f.clone();
        longer.extend_from_slice(&[0xaa; 30]);
        assert!(is_pure_tcp_ack(&longer));
    }

    #[test]
    fn the_payload_is_found_behind_options_and_before_padding() {
        let v4 = ipv4_tcp_frame(TCP_ACK, 12, 100);
        assert_eq!(tcp_payload(&v4), Some(66..166));
        // Ethernet padding is no payload.
        assert_eq!(tcp_payload(&ipv4_tcp_frame(TCP_ACK, 0, 2)), Some(54..56));
        assert_eq!(tcp_payload(&ipv6_tcp_frame(TCP_ACK, 300)), Some(74..374));
        assert_eq!(tcp_payload(&v4[..60]), None, "cut short");
    }

    #[test]
    fn segments_with_payload_are_not_pure_acks() {
        assert!(!is_pure_tcp_ack(&ipv4_tcp_frame(TCP_ACK, 0, 1)));
        assert!(!is_pure_tcp_ack(&ipv4_tcp_frame(TCP_ACK, 0, 6)));
        assert!(!is_pure_tcp_ack(&ipv6_tcp_frame(TCP_ACK, 1)));
    }

    #[test]
    fn other_flags_are_not_pure_acks() {
        for flag in [TCP_SYN, TCP_FIN, TCP_RST, TCP_PSH, TCP_URG] {
            assert!(
                !is_pure_tcp_ack(&ipv4_tcp_frame(TCP_ACK | flag, 0, 0)),
                "{flag:#x}"
            );
            assert!(
                !is_pure_tcp_ack(&ipv6_tcp_frame(TCP_ACK | flag, 0)),
                "{flag:#x}"
            );
        }
        // No ACK at all.
        assert!(!is_pure_tcp_ack(&ipv4_tcp_frame(0, 0, 0)));
        assert!(!is_pure_tcp_ack(&ipv4_tcp_frame(0xc0, 0, 0)));
    }

    #[test]
    fn vlan_tagged_frames_are_not_pure_acks() {
        let f = pure_ack();
        let mut tagged = f[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        tagged.extend_from_slice(&f[12..]);
        assert!(!is_pure_tcp_ack(&tagged));
    }

    #[test]
    fn fragments_are_not_pure_acks() {
        let mut mf = pure_ack();
        mf[ETH_HDR + 6] = 0x20;
        assert!(!is_pure_tcp_ack(&mf));
        let mut offset = pure_ack();
        offset[ETH_HDR + 7] = 0x01;
        assert!(!is_pure_tcp_ack(&offset));
    }

    #[test]
    fn other_protocols_and_ipv6_extension_headers_are_not_pure_acks() {
        let mut udp = pure_ack();
        udp[ETH_HDR + 9] = 17;
        assert!(!is_pure_tcp_ack(&udp));
        let mut hop_by_hop = ipv6_tcp_frame(TCP_ACK, 0);
        hop_by_hop[ETH_HDR + 6] = 0;
        assert!(!is_pure_tcp_ack(&hop_by_hop));
        let mut arp = pure_ack();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(!is_pure_tcp_ack(&arp));
    }

    #[test]
    fn inconsistent_lengths_are_not_pure_acks() {
        // IHL below 5.
        let mut f = pure_ack();
        f[ETH_HDR] = 0x44;
        assert!(!is_pure_tcp_ack(&f));
        // IP version field not 4.
        let mut f = pure_ack();
        f[ETH_HDR] = 0x65;
        assert!(!is_pure_tcp_ack(&f));
        // Total length shorter than the IP header.
        let mut f = pure_ack();
        f[ETH_HDR + 2..ETH_HDR + 4].copy_from_slice(&19u16.to_be_bytes());
        assert!(!is_pure_tcp_ack(&f));
        // Total length beyond the frame.
        let mut f = pure_ack();
        f[ETH_HDR + 2..ETH_HDR + 4].copy_from_slice(&100u16.to_be_bytes());
        assert!(!is_pure_tcp_ack(&f));
        // Total length cutting the TCP header short.
        let mut f = pure_ack();
        f[ETH_HDR + 2..ETH_HDR + 4].copy_from_slice(&30u16.to_be_bytes());
        assert!(!is_pure_tcp_ack(&f));
        // TCP data offset below 5, and beyond the segment.
        let mut f = pure_ack();
        f[ETH_HDR + 20 + 12] = 4 << 4;
        assert!(!is_pure_tcp_ack(&f));
        let mut f = pure_ack();
        f[ETH_HDR + 20 + 12] = 6 << 4;
        assert!(!is_pure_tcp_ack(&f));
        // IPv6 payload length beyond the frame.
        let mut f = ipv6_tcp_frame(TCP_ACK, 0);
        f[ETH_HDR + 4..ETH_HDR + 6].copy_from_slice(&21u16.to_be_bytes());
        assert!(!is_pure_tcp_ack(&f));
        // Truncated frames.
        let f = pure_ack();
        for len in 0..(ETH_HDR + 40) {
            assert!(!is_pure_tcp_ack(&f[..len]), "{len}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = is_pure_tcp_ack(&bytes);
        }

        #[test]
        fn arbitrary_headers_after_a_valid_ethertype_never_panic(
            v6 in any::<bool>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&(if v6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 }).to_be_bytes());
            f.extend_from_slice(&bytes);
            let _ = is_pure_tcp_ack(&f);
        }

        #[test]
        fn an_ack_with_payload_is_not_pure(
            payload in 1usize..1500,
            options in 0usize..=10,
            v6 in any::<bool>(),
        ) {
            let f = if v6 {
                ipv6_tcp_frame(TCP_ACK, payload)
            } else {
                ipv4_tcp_frame(TCP_ACK, options * 4, payload)
            };
            prop_assert!(!is_pure_tcp_ack(&f));
        }
    }
}
