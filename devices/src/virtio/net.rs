//! virtio-net (virtio 1.x, 5.1) backed by a TAP device.
//!
//! One RX and one TX queue, no control queue. Every frame is an Ethernet frame behind a 12-byte
//! `virtio_net_hdr_v1`. Transmit offloads are not offered: a TX frame is complete. Receive
//! offloads are offered as Cloud Hypervisor's `offload_csum`/`offload_tso` say (both on by
//! default): `VIRTIO_NET_F_GUEST_CSUM`, and with it `GUEST_TSO4`/`GUEST_TSO6`. When the driver
//! accepts them the TAP may hand over TCP segments of up to 64 KiB with the checksum left to
//! do, and the header tells the driver so; each frame then costs one TAP read, one input-log
//! record and one guest buffer instead of up to 45. Without `VIRTIO_NET_F_MRG_RXBUF`, each RX
//! chain must hold header and frame (a driver that takes TSO posts 64 KiB buffers, 5.1.6.3.1);
//! the chain may have any number of descriptors, indirect ones included.
//!
//! Threads: `activate`/`reset` run on a vCPU thread (the transport calls them); all queue and
//! TAP work runs on the device event loop. As in Firecracker, `activate` only stores the queues
//! and signals `activate_evt`; the loop then registers the queue notification eventfds and the
//! TAP fd. `reset` drops the queues and signals the same eventfd, and the loop unregisters what
//! it had registered, so the device can be activated again.
//!
//! Output: TX frames leave only through the [`NetOutputGate`]; the default gate ([`TapGate`])
//! writes straight to the TAP. Fault tolerance swaps in a gate that holds frames per epoch.
//! Guest memory is written only through vm-memory, so every RX write marks the dirty bitmap.
//!
//! Input: with fault tolerance, every RX frame passes a [`NetInputRecorder`] (the input log)
//! before it reaches guest memory, and after a failover the device first delivers the frames
//! the backup replays ([`Net::queue_replay`]), then reads the TAP again.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io::{self, IoSlice};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, ActiveQueue, InterruptKind, VirtQueueState, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_ID_NET,
};
use crate::gate::{NetInputRecorder, NetOutputGate, ReplayWatch};
use crate::state::RestoreError;
use crate::tap::{PassedTap, Tap, TapError, VNET_HDR_LEN};
use crate::GuestMemoryMmap;

/// Queue indices (5.1.2): receiveq1, transmitq1; no control queue.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const NUM_QUEUES: usize = 2;

/// Default queue size, as Cloud Hypervisor's.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Largest packet a driver may hand over, header included (5.1.6.3: 65550 bytes of frame for
/// a GSO packet plus the header). Without offloads frames are much smaller; anything beyond
/// this is a malformed chain.
pub const MAX_PACKET_LEN: usize = 65550 + VNET_HDR_LEN;

/// How many frames one event handles before yielding to other devices (the fds are
/// level-triggered, so the rest is picked up on the next loop iteration).
const MAX_BATCH: usize = 256;

/// Event-loop tokens (the `data` of each registered event).
const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_RX_QUEUE: u32 = 1;
const TOKEN_TX_QUEUE: u32 = 2;
const TOKEN_TAP: u32 = 3;

/// Size of the device configuration space (5.1.4): mac[6], status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr([u8; 6]);

/// A MAC address string that is not six colon-separated hex bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six colon-separated hex bytes like 12:34:56:78:9a:bc")]
pub struct MacAddrParseError(pub String);

impl MacAddr {
    pub const fn new(bytes: [u8; 6]) -> MacAddr {
        MacAddr(bytes)
    }

    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// Whether the group bit (I/G) is set; a NIC's own address must not be multicast.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// A random unicast, locally administered address (as Cloud Hypervisor picks for a guest
    /// without `mac=`).
    pub fn random_local() -> MacAddr {
        let mut bytes = [0u8; 6];
        fill_random(&mut bytes);
        bytes[0] = (bytes[0] & 0xfe) | 0x02;
        MacAddr(bytes)
    }
}

/// Fills `buf` from the kernel's random source; falls back to time and pid mixing, which is
/// enough to keep MACs of VMs on one host apart, if getrandom is unavailable.
fn fill_random(buf: &mut [u8]) {
    // SAFETY: getrandom writes at most `buf.len()` bytes into the valid, exclusively borrowed
    // buffer.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if usize::try_from(got).ok() == Some(buf.len()) {
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut x = (nanos as u64) ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    for b in buf.iter_mut() {
        // xorshift64: spreads the seed's entropy over all bytes.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

impl FromStr for MacAddr {
    type Err = MacAddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacAddrParseError(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(bytes))
    }
}

/// As its text form ("52:54:00:12:34:56"), which is what people grep snapshots for.
impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// What a virtio-net device is built from (Cloud Hypervisor's `--net` fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// TAP to attach to or create; `None` creates `vmtap<N>`.
    pub tap: Option<String>,
    /// A TAP descriptor someone else opened (`--net fd=N`, `vm.add-net` with descriptors);
    /// used instead of `tap` when set.
    pub tap_fd: Option<PassedTap>,
    /// IPv4 address for the host side of the TAP (set when given).
    pub ip: Option<Ipv4Addr>,
    /// Netmask for `ip` (set when given).
    pub mask: Option<Ipv4Addr>,
    /// The guest's MAC; `None` picks a random locally administered one.
    pub mac: Option<MacAddr>,
    /// MTU of the TAP, also offered to the guest (`VIRTIO_NET_F_MTU`).
    pub mtu: Option<u16>,
    /// Size of each queue: a power of two, at most 32768.
    pub queue_size: u16,
    /// Device id for logs and the API.
    pub id: Option<String>,
    /// Offer `VIRTIO_NET_F_GUEST_CSUM`: frames may arrive with their TCP/UDP checksum left to
    /// do (`offload_csum`).
    pub offload_csum: bool,
    /// Offer `GUEST_TSO4`/`GUEST_TSO6` (with `offload_csum` only, as the spec requires): TCP
    /// segments of up to 64 KiB (`offload_tso`).
    pub offload_tso: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            tap: None,
            tap_fd: None,
            ip: None,
            mask: None,
            mac: None,
            mtu: None,
            queue_size: DEFAULT_QUEUE_SIZE,
            id: None,
            offload_csum: true,
            offload_tso: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("virtio-net queue size {0} is invalid: it must be a power of two between 1 and 32768")]
    InvalidQueueSize(u16),
    #[error("MAC address {0} is a multicast address; a NIC needs a unicast one")]
    MulticastMac(MacAddr),
    #[error("MTU {0} is invalid: it must be at least 68")]
    InvalidMtu(u16),
    #[error("virtio-net: cannot create an eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("TAP {name}: cannot duplicate its fd for the output gate: {source}")]
    CloneTap {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// The pass-through output gate: each frame goes straight to the TAP (with a zeroed virtio-net
/// header in front, which the TAP expects because of `IFF_VNET_HDR`).
pub struct TapGate {
    tap: Tap,
}

impl TapGate {
    pub fn new(tap: Tap) -> TapGate {
        TapGate { tap }
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }
}

impl NetOutputGate for TapGate {
    fn transmit(&mut self, frame: &[u8]) -> io::Result<()> {
        let hdr = [0u8; VNET_HDR_LEN];
        let want = hdr.len() + frame.len();
        let written = self
            .tap
            .write_vectored(&[IoSlice::new(&hdr), IoSlice::new(frame)])?;
        if written != want {
            // A TAP write is one frame or nothing; a short count means the kernel cut it.
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("TAP {} took {written} of {want} bytes", self.tap.name()),
            ));
        }
        Ok(())
    }
}

/// Device counters (monotonic since creation; saved so that they stay so across a migration).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetCounters {
    pub rx_bytes: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_frames: u64,
    pub tx_errors: u64,
}

/// virtio-net's own saved state (the queues are in the transport's).
///
/// Nothing is in flight: RX and TX are served synchronously on the device event loop, which is
/// stopped during a capture, so every chain taken from a queue is used; chains not taken are
/// still in the avail rings and are served after restore. Frames the host kernel queued on the
/// source TAP stay there (as a lost packet on a real network).
///
/// Not saved, because re-derived: "RX blocked until the driver adds buffers" and whether the
/// TAP is polled (a restored device tries RX once and finds out), event loop registrations.
/// Not saved because host resources: the TAP and its gate (from the destination's config).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The MAC the guest read from config space; kept even if the destination's configuration
    /// picked another (a random default), since the guest's stack uses this one.
    pub mac: MacAddr,
    /// Checked: offered to the guest in config space and set on the TAP.
    pub mtu: Option<u16>,
    /// Checked: the driver negotiated against these.
    pub avail_features: u64,
    pub acked_features: u64,
    /// Checked: maximum size of the RX and TX queues.
    pub queue_sizes: Vec<u16>,
    pub counters: NetCounters,
}

/// What the device holds while the driver has it active.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: ActiveQueue,
    tx: ActiveQueue,
}

/// An fd the event loop registered for this device; the Arc keeps a queue eventfd open until
/// it has been removed from epoll, even after `reset` dropped the queue.
struct Registration {
    fd: i32,
    _keep: Option<Arc<EventFd>>,
}

/// Why a descriptor chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ChainError {
    #[error(
        "the chain has no descriptor or is cut short (loop, bad next index, bad indirect table)"
    )]
    Broken,
    #[error("a descriptor lies outside guest memory")]
    OutOfRange,
    #[error("a TX descriptor is device-writable")]
    WriteOnlyInTx,
    #[error("an RX descriptor is device-readable")]
    ReadOnlyInRx,
    #[error("the chain is longer than {MAX_PACKET_LEN} bytes")]
    TooLong,
    #[error("the chain is shorter than the {VNET_HDR_LEN}-byte header")]
    TooShort,
}

/// A virtio-net device on a TAP.
pub struct Net {
    id: String,
    tap: Tap,
    gate: Box<dyn NetOutputGate>,
    mac: MacAddr,
    mtu: Option<u16>,
    queue_sizes: [u16; NUM_QUEUES],
    avail_features: u64,
    acked_features: u64,
    activate_evt: EventFd,
    active: Option<Active>,
    /// Bumped by every activate and reset; the loop's registrations belong to `registered_gen`.
    generation: u64,
    registered_gen: u64,
    registered: Vec<Registration>,
    /// The RX queue had no buffer: the TAP is not polled until the driver adds buffers.
    rx_blocked: bool,
    /// Whether the TAP is currently registered with EPOLLIN interest.
    tap_polled: bool,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    counters: NetCounters,
    /// Sees every RX frame before the guest does (fault tolerance's input log).
    input_recorder: Option<Box<dyn NetInputRecorder>>,
    /// Ethernet frames to deliver before the TAP is read again (replayed at failover).
    replay: VecDeque<Vec<u8>>,
    /// Replayed TCP segments the guest has not acknowledged yet (see [`ReplayWatch`]).
    replay_watch: ReplayWatch,
}

impl Net {
    /// Opens or creates the TAP, configures it and builds the device with a [`TapGate`].
    pub fn new(cfg: NetConfig) -> Result<Net, NetError> {
        let qs = cfg.queue_size;
        if qs == 0 || qs > 32768 || !qs.is_power_of_two() {
            return Err(NetError::InvalidQueueSize(qs));
        }
        let mac = cfg.mac.unwrap_or_else(MacAddr::random_local);
        if mac.is_multicast() {
            return Err(NetError::MulticastMac(mac));
        }
        if let Some(mtu) = cfg.mtu {
            if mtu < 68 {
                return Err(NetError::InvalidMtu(mtu));
            }
        }

        let tap = match (&cfg.tap_fd, &cfg.tap) {
            (Some(passed), _) => Tap::from_passed(passed)?,
            (None, Some(name)) => Tap::open_named(name)?,
            (None, None) => Tap::create()?,
        };
        if let Some(ip) = cfg.ip {
            tap.set_ip_addr(ip)?;
        }
        if let Some(mask) = cfg.mask {
            tap.set_netmask(mask)?;
        }
        if let Some(mtu) = cfg.mtu {
            tap.set_mtu(mtu)?;
        }
        // A passed TAP was set up by whoever opened it (as with Cloud Hypervisor); the VMM may
        // lack the privilege to touch the interface, which may sit in another namespace.
        if cfg.tap_fd.is_none() {
            tap.enable()?;
        }

        let gate_tap = tap.try_clone().map_err(|source| NetError::CloneTap {
            name: tap.name().to_string(),
            source,
        })?;
        let activate_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd)?;

        let mut avail_features =
            VIRTIO_F_VERSION_1 | (1u64 << VIRTIO_NET_F_MAC) | (1u64 << VIRTIO_NET_F_STATUS);
        if cfg.mtu.is_some() {
            avail_features |= 1u64 << VIRTIO_NET_F_MTU;
        }
        if cfg.offload_csum {
            avail_features |= 1u64 << VIRTIO_NET_F_GUEST_CSUM;
            if cfg.offload_tso {
                // A driver taking TSO posts 64 KiB buffers; indirect descriptors let it do so
                // in one ring slot each.
                avail_features |= (1u64 << VIRTIO_NET_F_GUEST_TSO4)
                    | (1u64 << VIRTIO_NET_F_GUEST_TSO6)
                    | (1u64 << VIRTIO_RING_F_INDIRECT_DESC);
            }
        }

        Ok(Net {
            id: cfg.id.unwrap_or_else(|| tap.name().to_string()),
            gate: Box::new(TapGate::new(gate_tap)),
            tap,
            mac,
            mtu: cfg.mtu,
            queue_sizes: [qs; NUM_QUEUES],
            avail_features,
            acked_features: 0,
            activate_evt,
            active: None,
            generation: 0,
            registered_gen: 0,
            registered: Vec::new(),
            rx_blocked: false,
            tap_polled: false,
            rx_buf: vec![0u8; MAX_PACKET_LEN],
            tx_buf: vec![0u8; MAX_PACKET_LEN],
            counters: NetCounters::default(),
            input_recorder: None,
            replay: VecDeque::new(),
            replay_watch: ReplayWatch::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Lets the TAP hand over what the driver accepted (and nothing after a reset). Runs on
    /// the thread that activates, resets or restores the device, not on the event loop. A TAP
    /// that refuses only ever hands over complete frames, which every driver takes.
    fn apply_offloads(&self) {
        let flags = tap_offloads(self.acked_features);
        if let Err(e) = self.tap.set_offload(flags) {
            warn!(
                "{}: TAP {} refuses offloads {flags:#x}: {e}; frames arrive complete",
                self.id,
                self.tap.name()
            );
        }
    }

    /// The name of the TAP the device is attached to.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The host end of the device (for configuration queries; frames go through the device).
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Broadcasts a RARP frame from the guest's MAC, as QEMU's announce-self does, so that
    /// switches and bridges learn where the guest is now (after a migration or failover).
    pub fn announce(&self) -> io::Result<()> {
        const ETHERTYPE_RARP: u16 = 0x8035;
        let mac = self.mac.bytes();
        let mut frame = [0u8; 60];
        frame[0..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&mac);
        frame[12..14].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
        // htype Ethernet, ptype IPv4, hlen 6, plen 4, op 3 (reverse request).
        frame[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 3]);
        frame[22..28].copy_from_slice(&mac);
        frame[32..38].copy_from_slice(&mac);
        let header = [0u8; crate::tap::VNET_HDR_LEN];
        self.tap
            .write_vectored(&[IoSlice::new(&header), IoSlice::new(&frame)])
            .map(|_| ())
    }

    /// Sends `frame` (an Ethernet frame the guest transmitted before, without the virtio
    /// header) through the output gate once more: fault tolerance's takeover sends the output
    /// a dead primary may have held.
    pub fn transmit_again(&mut self, frame: &[u8]) -> io::Result<()> {
        self.gate.transmit(frame)
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Replaces the output gate and returns the previous one (fault tolerance wraps the
    /// pass-through [`TapGate`] in a gate that holds frames until their epoch commits).
    pub fn replace_output_gate(&mut self, gate: Box<dyn NetOutputGate>) -> Box<dyn NetOutputGate> {
        std::mem::replace(&mut self.gate, gate)
    }

    /// Sets (or removes) the recorder every RX frame passes before it is written into guest
    /// memory; a frame it refuses is dropped (counted as `rx_dropped`).
    pub fn set_input_recorder(&mut self, recorder: Option<Box<dyn NetInputRecorder>>) {
        self.input_recorder = recorder;
    }

    /// Queues frames as the input log holds them (virtio-net header, then the Ethernet frame)
    /// for delivery to the guest ahead of anything read from the TAP from now on, each exactly
    /// like a TAP frame (failover: the input the primary's guest had received after the
    /// restored state). Not saved in [`NetState`].
    pub fn queue_replay(&mut self, frames: Vec<Vec<u8>>) {
        if frames.is_empty() {
            return;
        }
        self.replay.extend(frames);
        self.replay_watch.start(std::time::Instant::now());
        // The loop serves RX on the activation event; an inactive device gets there when it
        // is activated.
        if self.active.is_some() {
            if let Err(e) = self.activate_evt.write(1) {
                error!("{}: cannot schedule the replayed frames: {e}", self.id);
            }
        }
    }

    /// Replayed frames not delivered yet.
    pub fn replay_pending(&self) -> usize {
        self.replay.len()
    }

    /// Counters: rx_bytes, rx_frames, rx_dropped (frames larger than the posted buffer, and
    /// frames the input recorder refused),
    /// rx_errors (malformed RX chains), tx_bytes, tx_frames, tx_errors (malformed TX chains
    /// and frames the gate refused). Bytes count Ethernet frames, without the virtio header.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let c = self.counters;
        BTreeMap::from([
            ("rx_bytes", c.rx_bytes),
            ("rx_frames", c.rx_frames),
            ("rx_dropped", c.rx_dropped),
            ("rx_errors", c.rx_errors),
            ("tx_bytes", c.tx_bytes),
            ("tx_frames", c.tx_frames),
            ("tx_errors", c.tx_errors),
        ])
    }

    /// Captures the device's own state. Call it only while the event loop is stopped.
    pub fn state(&self) -> NetState {
        NetState {
            mac: self.mac,
            mtu: self.mtu,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            queue_sizes: self.queue_sizes.to_vec(),
            counters: self.counters,
        }
    }

    /// Loads `state` into a device built from the same configuration, after checking that the
    /// configuration matches what the guest negotiated against. The queues come back through
    /// the transport's restore (which activates the device); the order of the two calls does
    /// not matter. On error the device is unchanged.
    pub fn restore(&mut self, state: &NetState) -> Result<(), RestoreError> {
        let device = format!("virtio-net {}", self.id);
        super::check_restored_device(
            &device,
            (&self.queue_sizes, &state.queue_sizes),
            (self.avail_features, state.avail_features),
            state.acked_features,
        )?;
        if state.mtu != self.mtu {
            return Err(RestoreError::Mtu {
                device,
                have: self.mtu,
                want: state.mtu,
            });
        }
        if state.mac != self.mac {
            log::info!(
                "{}: MAC {} from the snapshot replaces the configured {}",
                self.id,
                state.mac,
                self.mac
            );
        }
        self.mac = state.mac;
        self.acked_features = state.acked_features;
        self.counters = state.counters;
        Ok(())
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut cfg = [0u8; CONFIG_LEN];
        cfg[0..6].copy_from_slice(&self.mac.bytes());
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        cfg
    }

    /// Brings the loop's registrations in line with the current activation: removes whatever
    /// an earlier activation registered, then registers the queues and the TAP if active.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for reg in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::empty_raw(reg.fd)) {
                debug!(
                    "{}: removing fd {} from the event loop: {e:?}",
                    self.id, reg.fd
                );
            }
        }
        self.tap_polled = false;
        self.rx_blocked = false;
        self.registered_gen = self.generation;

        let Some(active) = &self.active else {
            return;
        };
        let wanted = [
            (
                active.rx.notify.as_raw_fd(),
                TOKEN_RX_QUEUE,
                Some(active.rx.notify.clone()),
            ),
            (
                active.tx.notify.as_raw_fd(),
                TOKEN_TX_QUEUE,
                Some(active.tx.notify.clone()),
            ),
            (self.tap.as_raw_fd(), TOKEN_TAP, None),
        ];
        for (fd, token, keep) in wanted {
            match ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                Ok(()) => {
                    self.registered.push(Registration { fd, _keep: keep });
                    self.tap_polled |= token == TOKEN_TAP;
                }
                Err(e) => error!(
                    "{}: cannot register fd {fd} with the event loop: {e:?}",
                    self.id
                ),
            }
        }
    }

    /// Turns EPOLLIN on the TAP off while the RX queue has no buffers (the kernel keeps
    /// queueing frames meanwhile), and on again once it has.
    fn update_tap_interest(&mut self, ops: &mut EventOps) {
        let want = !self.rx_blocked;
        if want == self.tap_polled {
            return;
        }
        let set = if want {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        match ops.modify(Events::with_data(&self.tap, TOKEN_TAP, set)) {
            Ok(()) => self.tap_polled = want,
            Err(e) => error!("{}: cannot change the TAP's event interest: {e:?}", self.id),
        }
    }

    /// Moves frames from the TAP into RX buffers until one of them runs out (or a batch is
    /// done). Returns whether used buffers were added.
    fn process_rx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = &active.mem;
        let queue = &mut active.rx.queue;
        let mut used_any = false;
        for _ in 0..MAX_BATCH {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Out of buffers: the driver's next RX kick is wanted now. Buffers it added
                // before it could see that would otherwise wait for a kick that never comes.
                if queue.enable_notification(mem).unwrap_or(false) {
                    continue;
                }
                self.rx_blocked = true;
                break;
            };
            let head = chain.head_index();
            let segments = match rx_segments(chain, mem) {
                Ok(s) => s,
                Err(e) => {
                    // The buffer is unusable; hand it back empty so the driver can recycle it.
                    debug!("{}: RX chain {head} refused: {e}", self.id);
                    self.counters.rx_errors += 1;
                    used_any |= add_used(queue, mem, head, 0, &self.id);
                    continue;
                }
            };
            let capacity: usize = segments.iter().map(|&(_, len)| len).sum();

            // Replayed frames go first: they were delivered before anything now on the TAP.
            let from_replay = self.replay.pop_front();
            let replayed = from_replay.is_some();
            let n = match from_replay.map(|frame| load_rx_frame(&mut self.rx_buf, &frame)) {
                Some(Some(n)) => n,
                Some(None) => {
                    debug!("{}: replayed frame too large for any buffer", self.id);
                    self.counters.rx_dropped += 1;
                    queue.go_to_previous_position();
                    continue;
                }
                None => match self.tap.read(&mut self.rx_buf) {
                    Ok(n) => n,
                    Err(e) => {
                        // Nothing to read (or a TAP error): keep the buffer for the next frame.
                        queue.go_to_previous_position();
                        if e.kind() != io::ErrorKind::WouldBlock {
                            warn!("{}: reading TAP {}: {e}", self.id, self.tap.name());
                        }
                        break;
                    }
                },
            };
            if n <= VNET_HDR_LEN {
                queue.go_to_previous_position();
                continue;
            }
            if !fit_rx_header(&mut self.rx_buf[..VNET_HDR_LEN], self.acked_features) {
                // Only a TAP whose offloads someone else changed, or a replayed frame from a
                // primary that negotiated otherwise, can get here.
                debug!(
                    "{}: RX frame needs an offload the driver did not accept; dropped",
                    self.id
                );
                self.counters.rx_dropped += 1;
                queue.go_to_previous_position();
                continue;
            }
            if n > capacity {
                // Dropping the frame and keeping the buffer: a later, smaller frame may fit.
                debug!(
                    "{}: RX frame of {n} bytes dropped: the buffer holds {capacity}",
                    self.id
                );
                self.counters.rx_dropped += 1;
                queue.go_to_previous_position();
                continue;
            }
            let mut done = 0;
            let mut ok = true;
            for &(addr, len) in &segments {
                let take = len.min(n - done);
                if take == 0 {
                    break;
                }
                if mem
                    .write_slice(&self.rx_buf[done..done + take], addr)
                    .is_err()
                {
                    ok = false;
                    break;
                }
                done += take;
            }
            if !ok {
                // Checked in rx_segments; only a memory map change could get here.
                self.counters.rx_errors += 1;
                used_any |= add_used(queue, mem, head, 0, &self.id);
                continue;
            }
            if let Some(recorder) = self.input_recorder.as_mut() {
                // Before the guest can see it (the used ring): a delivered frame the backup
                // could not replay would be unsafe, a dropped one is recovered by the guest's
                // protocols. A refused frame's buffer goes back unused, so what the device
                // wrote into it stays unseen. With its header: the backup's guest must see the
                // same checksum and segmentation state. The log may take `rx_buf` itself,
                // except a replayed frame's, which is watched below.
                let recorded = if replayed {
                    recorder.record(&self.rx_buf[..n], &segments)
                } else {
                    recorder.record_buffer(&mut self.rx_buf, n, &segments)
                };
                if !recorded {
                    debug!(
                        "{}: RX frame of {n} bytes refused by the input log",
                        self.id
                    );
                    self.counters.rx_dropped += 1;
                    queue.go_to_previous_position();
                    continue;
                }
            }
            used_any |= add_used(queue, mem, head, n as u32, &self.id);
            if replayed {
                self.replay_watch.delivered(
                    &self.rx_buf[..n],
                    VNET_HDR_LEN,
                    std::time::Instant::now(),
                );
            }
            self.counters.rx_frames += 1;
            self.counters.rx_bytes += (n - VNET_HDR_LEN) as u64;
        }
        used_any
    }

    /// Sends up to a batch of TX chains through the gate. Returns whether used buffers were
    /// added and whether the batch was full (more chains may be waiting).
    fn process_tx(&mut self) -> (bool, bool) {
        let Some(active) = self.active.as_mut() else {
            return (false, false);
        };
        let mem = &active.mem;
        let queue = &mut active.tx.queue;
        let mut used_any = false;
        let mut full = true;
        let mut offer_again = Vec::new();
        for _ in 0..MAX_BATCH {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                full = false;
                break;
            };
            let head = chain.head_index();
            match gather_tx(chain, mem, &mut self.tx_buf) {
                Ok(len) => {
                    let frame = &self.tx_buf[VNET_HDR_LEN..len];
                    // Only after a takeover; no clock read per frame otherwise.
                    if self.replay_watch.is_watching() {
                        offer_again.extend(
                            self.replay_watch
                                .guest_sent(frame, std::time::Instant::now()),
                        );
                    }
                    match self.gate.transmit(frame) {
                        Ok(()) => {
                            self.counters.tx_frames += 1;
                            self.counters.tx_bytes += frame.len() as u64;
                        }
                        Err(e) => {
                            debug!(
                                "{}: TX frame of {} bytes not sent: {e}",
                                self.id,
                                frame.len()
                            );
                            self.counters.tx_errors += 1;
                        }
                    }
                }
                Err(e) => {
                    debug!("{}: TX chain {head} refused: {e}", self.id);
                    self.counters.tx_errors += 1;
                }
            }
            // The device writes nothing into TX buffers (5.1.6.2).
            used_any |= add_used(queue, mem, head, 0, &self.id);
        }
        if !offer_again.is_empty() {
            // Ahead of the rest of the replay and of the TAP, in their order; the loop serves
            // RX on the activation event (or on the driver's next RX kick when out of buffers).
            for frame in offer_again.into_iter().rev() {
                self.replay.push_front(frame);
            }
            if let Err(e) = self.activate_evt.write(1) {
                error!("{}: cannot schedule replayed frames again: {e}", self.id);
            }
        }
        (used_any, full)
    }

    fn signal_used(&mut self, queue_index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let queue = if queue_index == RX_QUEUE {
            &mut active.rx.queue
        } else {
            &mut active.tx.queue
        };
        if super::driver_wants_interrupt(queue, &active.mem) {
            if let Err(e) = active
                .interrupt
                .trigger(InterruptKind::Queue(queue_index as u16))
            {
                error!("{}: cannot interrupt the guest: {e}", self.id);
            }
        }
    }

    fn handle_rx(&mut self, ops: &mut EventOps) {
        if self.process_rx() {
            self.signal_used(RX_QUEUE);
        }
        if !self.replay.is_empty() && !self.rx_blocked && self.active.is_some() {
            // A full batch left replayed frames behind; no fd is readable for them, so come
            // back through the activation event (out of buffers: the RX kick brings us back).
            if let Err(e) = self.activate_evt.write(1) {
                error!("{}: cannot schedule the replayed frames: {e}", self.id);
            }
        }
        self.update_tap_interest(ops);
    }

    /// Serves the TX queue until it is empty: the notification was consumed, so nothing
    /// would bring the loop back for chains left behind. Interrupts once per batch. While it
    /// works, the driver is told not to notify (VRING_USED_F_NO_NOTIFY): each notification is
    /// a VM exit, and the loop picks up chains added meanwhile anyway.
    fn handle_tx(&mut self) {
        self.set_notification(TX_QUEUE, false);
        loop {
            let (used, more) = self.process_tx();
            if used {
                self.signal_used(TX_QUEUE);
            }
            if !more {
                // Chains the driver added after the last pop but before notifications were on
                // again would otherwise wait for the next kick.
                if self.set_notification(TX_QUEUE, true) {
                    self.set_notification(TX_QUEUE, false);
                    continue;
                }
                break;
            }
        }
    }

    /// Turns TX notifications on or off; when turning them on, says whether chains are waiting.
    /// Turns the driver's notifications for one queue on or off (VRING_USED_F_NO_NOTIFY);
    /// turning them on returns whether chains were added meanwhile.
    fn set_notification(&mut self, queue_index: usize, enable: bool) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let queue = if queue_index == RX_QUEUE {
            &mut active.rx.queue
        } else {
            &mut active.tx.queue
        };
        let result = if enable {
            queue.enable_notification(&active.mem)
        } else {
            queue.disable_notification(&active.mem).map(|()| false)
        };
        // The rings were checked at activation; an error here means the driver broke its own
        // queue, and looping on it would spin the device loop.
        result.unwrap_or(false)
    }
}

/// Puts a logged frame (virtio-net header and Ethernet frame, as a TAP read gives them) into
/// `buf`; returns its length, or `None` when it does not fit.
fn load_rx_frame(buf: &mut [u8], frame: &[u8]) -> Option<usize> {
    buf.get_mut(..frame.len())?.copy_from_slice(frame);
    Some(frame.len())
}

/// The `TUN_F_*` offloads matching the features the driver accepted.
fn tap_offloads(acked: u64) -> libc::c_uint {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut flags = 0;
    // The kernel refuses segmentation offloads without checksum offload, as the spec does.
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

/// Makes an RX frame's `virtio_net_hdr_v1` what the driver may see (5.1.6.4): only the flags
/// and segmentation it accepted, `num_buffers` = 1 (no MRG_RXBUF). False when the frame needs
/// an offload the driver did not accept (its checksum is not done, or it is a segment larger
/// than the MTU): it cannot be delivered.
fn fit_rx_header(hdr: &mut [u8], acked: u64) -> bool {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let (flags, gso_type) = (u32::from(hdr[0]), u32::from(hdr[1]));
    let gso_ok = match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_GUEST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_GUEST_TSO6),
        // UDP, ECN: never offered.
        _ => false,
    };
    let csum = has(VIRTIO_NET_F_GUEST_CSUM);
    if !gso_ok || (!csum && flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0) {
        return false;
    }
    let kept = if csum {
        flags & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)
    } else {
        0
    };
    hdr[0] = kept as u8;
    if gso_type == VIRTIO_NET_HDR_GSO_NONE {
        // hdr_len and gso_size mean nothing without segmentation.
        hdr[2..6].fill(0);
    }
    if kept & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
        // csum_start and csum_offset mean nothing without a checksum to do.
        hdr[6..10].fill(0);
    }
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
    true
}

/// Adds a used element; a failure means the used ring is not in guest memory any more, which
/// `is_valid` ruled out at activation, so it is only logged.
fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32, id: &str) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            error!("{id}: cannot add used element {head}: {e:?}");
            false
        }
    }
}

/// The writable buffers of an RX chain, all checked to lie in guest memory.
fn rx_segments(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<(GuestAddress, usize)>, ChainError> {
    let mut segments = Vec::new();
    let mut total = 0usize;
    let mut last_has_next = true;
    for desc in chain {
        if !desc.is_write_only() {
            return Err(ChainError::ReadOnlyInRx);
        }
        let len = desc.len() as usize;
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(ChainError::OutOfRange);
        }
        last_has_next = desc.has_next();
        // Capacity beyond the largest packet is never used; stop counting there.
        let room = MAX_PACKET_LEN.saturating_sub(total);
        let len = len.min(room);
        if len > 0 {
            segments.push((desc.addr(), len));
            total += len;
        }
    }
    if last_has_next {
        return Err(ChainError::Broken);
    }
    Ok(segments)
}

/// Copies a TX chain (header + frame) into `buf`; returns its length.
fn gather_tx(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let mut total = 0usize;
    let mut last_has_next = true;
    for desc in chain {
        if desc.is_write_only() {
            return Err(ChainError::WriteOnlyInTx);
        }
        let len = desc.len() as usize;
        let end = total
            .checked_add(len)
            .filter(|&end| end <= buf.len())
            .ok_or(ChainError::TooLong)?;
        mem.read_slice(&mut buf[total..end], desc.addr())
            .map_err(|_| ChainError::OutOfRange)?;
        total = end;
        last_has_next = desc.has_next();
    }
    if last_has_next {
        return Err(ChainError::Broken);
    }
    if total <= VNET_HDR_LEN {
        return Err(ChainError::TooShort);
    }
    Ok(total)
}

impl VirtioDevice for Net {
    virtio_device_basics!(VIRTIO_ID_NET);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // All fields are device-owned (the MAC is writable only with the legacy interface or
        // VIRTIO_NET_F_CTRL_MAC_ADDR, neither offered).
        debug!(
            "{}: ignoring a {}-byte config write at {offset:#x}",
            self.id,
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        super::check_active_queues(&queues, &mem, NUM_QUEUES)?;
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount {
                got: 0,
                want: NUM_QUEUES,
            });
        };
        self.apply_offloads();
        self.active = Some(Active {
            mem,
            interrupt,
            rx,
            tx,
        });
        self.generation += 1;
        self.activate_evt.write(1).map_err(|e| {
            self.active = None;
            ActivateError::Device(format!("{}: cannot signal the event loop: {e}", self.id))
        })
    }

    fn active_queue_states(&self) -> Vec<VirtQueueState> {
        self.active.as_ref().map_or_else(Vec::new, |a| {
            [&a.rx, &a.tx]
                .iter()
                .map(|q| VirtQueueState::from(q.queue.state()))
                .collect()
        })
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.apply_offloads();
        self.generation += 1;
        // The loop unregisters the old queue eventfds when it sees this.
        if let Err(e) = self.activate_evt.write(1) {
            error!(
                "{}: cannot signal the event loop of the reset: {e}",
                self.id
            );
        }
    }
}

impl MutEventSubscriber for Net {
    /// Joins a (new) event loop. A device restored from a snapshot, or one whose loop was
    /// replaced, is already active: its queue eventfds and the TAP are registered here, and
    /// the activation event is signalled so that the first loop iteration serves the chains
    /// the guest queued before the snapshot (their notifications went to the source's
    /// eventfds and are lost).
    fn init(&mut self, ops: &mut EventOps) {
        // Registrations of an earlier loop belong to that loop's epoll, not this one.
        self.registered.clear();
        self.tap_polled = false;
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            error!("{}: cannot register the activation eventfd: {e:?}", self.id);
        }
        if self.active.is_some() {
            self.sync_registrations(ops);
            if let Err(e) = self.activate_evt.write(1) {
                error!("{}: cannot schedule the restored queues: {e}", self.id);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == TOKEN_ACTIVATE {
            // Non-blocking eventfd: an empty counter (already consumed) is not an error.
            let _ = self.activate_evt.read();
            if self.registered_gen != self.generation {
                self.sync_registrations(ops);
            }
            // Frames may have queued on the TAP before activation, and a restored device has
            // chains queued before the snapshot; serving empty queues costs nothing.
            if self.active.is_some() {
                self.handle_rx(ops);
                self.handle_tx();
            }
            return;
        }
        if self.registered_gen != self.generation || self.active.is_none() {
            // An event of an activation that was reset (or replaced) before the loop caught
            // up: drop the stale registrations instead of serving it.
            self.sync_registrations(ops);
            return;
        }
        match token {
            TOKEN_RX_QUEUE => {
                if let Some(a) = &self.active {
                    let _ = a.rx.notify.read();
                }
                // New RX buffers: the TAP may be polled again, and while buffers last the
                // driver need not kick RX (each kick is a VM exit and a loop wake-up for
                // nothing); running out turns the kicks back on (`process_rx`).
                self.rx_blocked = false;
                self.set_notification(RX_QUEUE, false);
                self.handle_rx(ops);
            }
            TOKEN_TX_QUEUE => {
                if let Some(a) = &self.active {
                    let _ = a.tx.notify.read();
                }
                self.handle_tx();
            }
            TOKEN_TAP => {
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                {
                    warn!(
                        "{}: TAP {} reports an error or hang-up",
                        self.id,
                        self.tap.name()
                    );
                }
                self.handle_rx(ops);
            }
            other => warn!("{}: unexpected event token {other}", self.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_and_prints() {
        let mac: MacAddr = "12:34:56:78:9a:bc".parse().unwrap();
        assert_eq!(mac.bytes(), [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
        assert_eq!(mac.to_string(), "12:34:56:78:9a:bc");
        let upper: MacAddr = "AA:BB:CC:DD:EE:0F".parse().unwrap();
        assert_eq!(upper.to_string(), "aa:bb:cc:dd:ee:0f");
    }

    #[test]
    fn malformed_macs_are_rejected_with_the_input_named() {
        for bad in [
            "",
            "12:34:56:78:9a",
            "12:34:56:78:9a:bc:de",
            "12:34:56:78:9a:bg",
            "1:34:56:78:9a:bc",
            "123:4:56:78:9a:bc",
            "12-34-56-78-9a-bc",
            "12:34:56:78:9a:bc:",
            "+1:34:56:78:9a:bc",
            " 12:34:56:78:9a:bc",
        ] {
            let err = bad.parse::<MacAddr>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..64 {
            let mac = MacAddr::random_local();
            assert!(!mac.is_multicast(), "{mac}");
            assert_eq!(mac.bytes()[0] & 0x02, 0x02, "{mac}");
        }
        assert_ne!(MacAddr::random_local(), MacAddr::random_local());
    }

    #[test]
    fn multicast_detection() {
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        assert!(!"02:00:00:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
    }

    #[test]
    fn logged_frames_are_loaded_as_they_were_logged() {
        let mut buf = vec![0xffu8; 32];
        assert_eq!(load_rx_frame(&mut buf, b"header+frame"), Some(12));
        assert_eq!(&buf[..12], b"header+frame");
        assert_eq!(load_rx_frame(&mut buf, &[1; 32]), Some(32));
        assert_eq!(load_rx_frame(&mut buf, &[1; 33]), None);
    }

    const CSUM: u64 = 1 << VIRTIO_NET_F_GUEST_CSUM;
    const TSO: u64 = CSUM | (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6);

    /// flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
    fn hdr(flags: u8, gso: u8) -> [u8; 12] {
        [flags, gso, 54, 0, 0xb4, 0x05, 34, 0, 16, 0, 0, 0]
    }

    #[test]
    fn tap_offloads_follow_what_the_driver_accepted() {
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(tap_offloads(CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            tap_offloads(TSO),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        // Segmentation without checksum offload is not a valid combination: none of it.
        assert_eq!(tap_offloads(TSO & !CSUM), 0);
    }

    #[test]
    fn rx_headers_carry_only_what_the_driver_accepted() {
        // A TSO segment with its checksum to do reaches a driver that took TSO unchanged.
        let mut h = hdr(1, 1);
        assert!(fit_rx_header(&mut h, TSO));
        assert_eq!(h, [1, 1, 54, 0, 0xb4, 0x05, 34, 0, 16, 0, 1, 0]);
        // Without TSO it cannot be delivered; nor a partial checksum without GUEST_CSUM.
        assert!(!fit_rx_header(&mut hdr(1, 1), CSUM));
        assert!(!fit_rx_header(&mut hdr(1, 0), 0));
        assert!(!fit_rx_header(
            &mut hdr(0, 4),
            CSUM | (1 << VIRTIO_NET_F_GUEST_TSO4)
        ));
        // UDP fragmentation and ECN are never offered.
        assert!(!fit_rx_header(&mut hdr(0, 3), TSO));
        assert!(!fit_rx_header(&mut hdr(0, 0x81), TSO));
        // A complete frame: the meaningless fields are cleared, DATA_VALID kept with CSUM.
        let mut h = hdr(2, 0);
        assert!(fit_rx_header(&mut h, CSUM));
        assert_eq!(h, [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let mut h = hdr(2 | 4, 0);
        assert!(fit_rx_header(&mut h, 0));
        assert_eq!(h, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    }

    /// Driving the device without a transport: queues laid out by hand in guest memory.
    mod rx {
        use super::*;
        use std::sync::Mutex;
        use std::time::{Duration, Instant};

        const QSIZE: u16 = 16;
        const RX_DESC: u64 = 0x1000;
        const RX_AVAIL: u64 = 0x2000;
        const RX_USED: u64 = 0x3000;
        const TX_DESC: u64 = 0x4000;
        const TX_AVAIL: u64 = 0x5000;
        const TX_USED: u64 = 0x6000;
        const BUFS: u64 = 0x10000;
        const BUF_LEN: u32 = 2048;
        const VIRTQ_DESC_F_WRITE: u16 = 2;

        struct NoInterrupt;

        impl VirtioInterrupt for NoInterrupt {
            fn trigger(&self, _kind: InterruptKind) -> io::Result<()> {
                Ok(())
            }
        }

        fn queue(desc: u64, avail: u64, used: u64) -> ActiveQueue {
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_size(QSIZE);
            q.set_desc_table_address(Some(desc as u32), Some(0));
            q.set_avail_ring_address(Some(avail as u32), Some(0));
            q.set_used_ring_address(Some(used as u32), Some(0));
            q.set_ready(true);
            ActiveQueue {
                queue: q,
                notify: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            }
        }

        struct Rig {
            net: Net,
            mem: GuestMemoryMmap,
            posted: u16,
            sent: u16,
        }

        impl Rig {
            fn new(mut net: Net) -> Rig {
                let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
                let queues = vec![
                    queue(RX_DESC, RX_AVAIL, RX_USED),
                    queue(TX_DESC, TX_AVAIL, TX_USED),
                ];
                net.activate(mem.clone(), Arc::new(NoInterrupt), queues)
                    .unwrap();
                // The activation event; drained so that tests see later writes.
                assert_eq!(net.activate_evt.read().unwrap(), 1);
                Rig {
                    net,
                    mem,
                    posted: 0,
                    sent: 0,
                }
            }

            /// Posts one device-writable buffer of `len` bytes (descriptor i, buffer i).
            fn post(&mut self, len: u32) {
                let i = self.posted % QSIZE;
                let d = RX_DESC + u64::from(i) * 16;
                let m = &self.mem;
                m.write_obj(BUFS + u64::from(i) * 0x1000, GuestAddress(d))
                    .unwrap();
                m.write_obj(len, GuestAddress(d + 8)).unwrap();
                m.write_obj(VIRTQ_DESC_F_WRITE, GuestAddress(d + 12))
                    .unwrap();
                m.write_obj(0u16, GuestAddress(d + 14)).unwrap();
                m.write_obj(i, GuestAddress(RX_AVAIL + 4 + u64::from(i) * 2))
                    .unwrap();
                self.posted = self.posted.wrapping_add(1);
                m.write_obj(self.posted, GuestAddress(RX_AVAIL + 2))
                    .unwrap();
            }

            /// Used RX elements so far: the frames (header cut off) in order.
            fn received(&self) -> Vec<Vec<u8>> {
                let m = &self.mem;
                let used: u16 = m.read_obj(GuestAddress(RX_USED + 2)).unwrap();
                (0..used)
                    .map(|k| {
                        let e = RX_USED + 4 + u64::from(k % QSIZE) * 8;
                        let id: u32 = m.read_obj(GuestAddress(e)).unwrap();
                        let len: u32 = m.read_obj(GuestAddress(e + 4)).unwrap();
                        let mut buf = vec![0u8; len as usize];
                        m.read_slice(&mut buf, GuestAddress(BUFS + u64::from(id) * 0x1000))
                            .unwrap();
                        assert_eq!(buf[..10], [0u8; 10]);
                        assert_eq!(buf[10..12], 1u16.to_le_bytes());
                        buf.split_off(VNET_HDR_LEN)
                    })
                    .collect()
            }

            fn counter(&self, name: &str) -> u64 {
                self.net.counters()[name]
            }

            /// The guest transmits `frame` (one TX chain, header first); TX is served.
            fn guest_sends(&mut self, frame: &[u8]) {
                const TX_BUFS: u64 = 0x80000;
                let i = self.sent % QSIZE;
                let addr = TX_BUFS + u64::from(i) * 0x1000;
                let mut chain = vec![0u8; VNET_HDR_LEN];
                chain.extend_from_slice(frame);
                let (m, d) = (&self.mem, TX_DESC + u64::from(i) * 16);
                m.write_slice(&chain, GuestAddress(addr)).unwrap();
                m.write_obj(addr, GuestAddress(d)).unwrap();
                m.write_obj(chain.len() as u32, GuestAddress(d + 8))
                    .unwrap();
                m.write_obj(0u32, GuestAddress(d + 12)).unwrap();
                m.write_obj(i, GuestAddress(TX_AVAIL + 4 + u64::from(i) * 2))
                    .unwrap();
                self.sent = self.sent.wrapping_add(1);
                m.write_obj(self.sent, GuestAddress(TX_AVAIL + 2)).unwrap();
                self.net.process_tx();
            }
        }

        /// Runs `f` with a device on a fresh TAP in a private network namespace (10.77.9.1/24,
        /// no IPv6 chatter); prints a SKIP line when TAPs cannot be made here.
        fn with_net(test: &'static str, f: impl FnOnce(Net) + Send + 'static) {
            let ran = std::thread::spawn(move || {
                // SAFETY: unshare(2) with CLONE_NEWNET only changes this thread's network
                // namespace; no memory is involved.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return false;
                }
                let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
                let cfg = NetConfig {
                    ip: Some(Ipv4Addr::new(10, 77, 9, 1)),
                    mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
                    mac: Some(MacAddr::new([0x52, 0x54, 0, 0x12, 0x34, 0x56])),
                    ..NetConfig::default()
                };
                let Ok(net) = Net::new(cfg) else {
                    return false;
                };
                f(net);
                true
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
            if !ran {
                // Straight to stderr, past the harness's capture, so the skip shows.
                use std::io::Write as _;
                let line =
                    format!("SKIP: {test}: needs root and /dev/net/tun - this test did NOT run\n");
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }

        /// Records what it sees; refuses while `refuse` is positive (counting down).
        #[derive(Clone, Default)]
        struct Log {
            seen: Arc<Mutex<Vec<Vec<u8>>>>,
            refuse: Arc<Mutex<u32>>,
        }

        impl NetInputRecorder for Log {
            fn record(&mut self, frame: &[u8], _placed: &[(GuestAddress, usize)]) -> bool {
                let mut refuse = self.refuse.lock().unwrap();
                if *refuse > 0 {
                    *refuse -= 1;
                    return false;
                }
                self.seen.lock().unwrap().push(frame.to_vec());
                true
            }
        }

        fn frame(tag: u8, len: usize) -> Vec<u8> {
            let mut f = vec![tag; len];
            f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
            f
        }

        /// `frame` as the input log holds it: behind the header the guest's buffer got.
        fn logged(frame: &[u8]) -> Vec<u8> {
            let mut l = vec![0u8; VNET_HDR_LEN];
            l[10] = 1;
            l.extend_from_slice(frame);
            l
        }

        fn replay(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
            frames.iter().map(|f| logged(f)).collect()
        }

        #[test]
        fn replayed_frames_reach_rx_buffers_before_tap_frames() {
            with_net(
                "replayed_frames_reach_rx_buffers_before_tap_frames",
                |net| {
                    let mut rig = Rig::new(net);
                    let log = Log::default();
                    rig.net.set_input_recorder(Some(Box::new(log.clone())));
                    // A broadcast needs no neighbour: the kernel sends it out of the TAP at once.
                    let sock = std::net::UdpSocket::bind("10.77.9.1:0").unwrap();
                    sock.set_broadcast(true).unwrap();
                    sock.send_to(b"from-the-tap", "10.77.9.255:9").unwrap();
                    rig.net
                        .queue_replay(replay(&[frame(0xa1, 60), frame(0xa2, 70)]));
                    assert_eq!(rig.net.replay_pending(), 2);
                    // The device is active: the loop is woken to deliver them.
                    assert_eq!(rig.net.activate_evt.read().unwrap(), 1);
                    for _ in 0..3 {
                        rig.post(BUF_LEN);
                    }
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while rig.received().len() < 3 && Instant::now() < deadline {
                        rig.net.process_rx();
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let got = rig.received();
                    assert_eq!(got.len(), 3, "{got:?}");
                    assert_eq!(got[0], frame(0xa1, 60));
                    assert_eq!(got[1], frame(0xa2, 70));
                    assert!(got[2].ends_with(b"from-the-tap"), "{:?}", got[2]);
                    assert_eq!(rig.net.replay_pending(), 0);
                    // The recorder saw exactly what the guest got, in order, header included.
                    let seen: Vec<Vec<u8>> = got.iter().map(|f| logged(f)).collect();
                    assert_eq!(*log.seen.lock().unwrap(), seen);
                    assert_eq!(rig.counter("rx_frames"), 3);
                    let bytes: usize = got.iter().map(Vec::len).sum();
                    assert_eq!(rig.counter("rx_bytes"), bytes as u64);
                },
            );
        }

        #[test]
        fn a_replayed_segment_the_guest_did_not_take_is_delivered_again() {
            with_net(
                "a_replayed_segment_the_guest_did_not_take_is_delivered_again",
                |net| {
                    let mut rig = Rig::new(net);
                    let seg = crate::gate::tcp_test_segment(true, 1000, 1, 100, 500);
                    let ack = |ack, window| crate::gate::tcp_test_segment(false, 1, ack, window, 0);
                    rig.net.queue_replay(vec![seg.clone()]);
                    assert_eq!(rig.net.activate_evt.read().unwrap(), 1);
                    rig.post(BUF_LEN);
                    rig.net.process_rx();
                    assert_eq!(rig.received().len(), 1);
                    // The guest's window ended 200 bytes into it: offered again.
                    rig.guest_sends(&ack(1300, 0));
                    assert_eq!(rig.net.replay_pending(), 1);
                    assert_eq!(rig.net.activate_evt.read().unwrap(), 1, "RX is scheduled");
                    rig.post(BUF_LEN);
                    rig.net.process_rx();
                    let got = rig.received();
                    assert_eq!(got.len(), 2);
                    assert_eq!(got[1], seg[VNET_HDR_LEN..]);
                    // A duplicate ACK offers nothing; one that covers it ends the watch.
                    rig.guest_sends(&ack(1300, 0));
                    assert_eq!(rig.net.replay_pending(), 0);
                    rig.guest_sends(&ack(1500, 100));
                    rig.guest_sends(&ack(1500, 200));
                    assert_eq!(rig.net.replay_pending(), 0);
                    assert_eq!(rig.counter("tx_frames"), 4);
                },
            );
        }

        #[test]
        fn frames_needing_an_offload_the_driver_refused_are_dropped() {
            with_net(
                "frames_needing_an_offload_the_driver_refused_are_dropped",
                |net| {
                    let mut rig = Rig::new(net);
                    // NEEDS_CSUM: the checksum is left to a driver that did not take that on.
                    let mut partial = logged(&frame(1, 60));
                    partial[0] = 1;
                    rig.net.queue_replay(vec![partial, logged(&frame(2, 60))]);
                    rig.post(BUF_LEN);
                    rig.net.process_rx();
                    assert_eq!(rig.received(), vec![frame(2, 60)]);
                    assert_eq!(rig.counter("rx_dropped"), 1);
                },
            );
        }

        #[test]
        fn refused_frames_are_dropped_and_the_buffer_kept() {
            with_net("refused_frames_are_dropped_and_the_buffer_kept", |net| {
                let mut rig = Rig::new(net);
                let log = Log::default();
                *log.refuse.lock().unwrap() = 1;
                rig.net.set_input_recorder(Some(Box::new(log.clone())));
                rig.net.queue_replay(replay(&[frame(1, 60), frame(2, 60)]));
                rig.post(BUF_LEN);
                rig.net.process_rx();
                assert_eq!(rig.received(), vec![frame(2, 60)]);
                assert_eq!(rig.counter("rx_dropped"), 1);
                assert_eq!(rig.counter("rx_frames"), 1);
                assert_eq!(*log.seen.lock().unwrap(), vec![logged(&frame(2, 60))]);
            });
        }

        #[test]
        fn replayed_frames_wait_for_buffers_and_oversized_ones_are_dropped() {
            with_net(
                "replayed_frames_wait_for_buffers_and_oversized_ones_are_dropped",
                |net| {
                    let mut rig = Rig::new(net);
                    rig.net
                        .queue_replay(replay(&[frame(1, 100), frame(2, 3000), frame(3, 60)]));
                    // No buffer: nothing is lost, RX waits for the driver.
                    rig.net.process_rx();
                    assert!(rig.net.rx_blocked);
                    assert_eq!(rig.net.replay_pending(), 3);
                    rig.post(BUF_LEN);
                    rig.post(BUF_LEN);
                    rig.net.process_rx();
                    assert_eq!(rig.received(), vec![frame(1, 100), frame(3, 60)]);
                    assert_eq!(rig.counter("rx_dropped"), 1);
                    assert_eq!(rig.net.replay_pending(), 0);
                },
            );
        }

        #[test]
        fn replay_into_an_inactive_device_waits_for_activation() {
            with_net(
                "replay_into_an_inactive_device_waits_for_activation",
                |mut net| {
                    net.queue_replay(replay(&[frame(1, 60)]));
                    assert!(net.activate_evt.read().is_err(), "no event while inactive");
                    assert_eq!(net.replay_pending(), 1);
                    let mut rig = Rig::new(net);
                    rig.post(BUF_LEN);
                    rig.net.process_rx();
                    assert_eq!(rig.received(), vec![frame(1, 60)]);
                    // Replay frames are not part of the saved state.
                    rig.net.queue_replay(replay(&[frame(2, 60)]));
                    let json = serde_json::to_string(&rig.net.state()).unwrap();
                    assert!(!json.contains("replay"), "{json}");
                },
            );
        }
    }
}
