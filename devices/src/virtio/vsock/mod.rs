//! virtio-vsock (virtio 1.x, 5.10 Socket Device) with Cloud Hypervisor's hybrid vsock backend:
//! guest stream sockets (`AF_VSOCK`) meet host Unix sockets.
//!
//! Three queues: rx (0, device to driver), tx (1, driver to device) and event (2, unused: no
//! event is ever sent, see restore below). Config space: `guest_cid` (le64). Features:
//! VIRTIO_F_VERSION_1 only (stream sockets; no SEQPACKET).
//!
//! Host side, as Cloud Hypervisor's `--vsock cid=N,socket=PATH`:
//! - host-initiated: the device listens on PATH. A client connects and writes
//!   `CONNECT <port>\n`; the guest gets a REQUEST for that port; on its RESPONSE the client
//!   reads `OK <host_port>\n` and from then on its bytes flow both ways. An RST from the guest
//!   (nobody listening there), or no answer within [`Timeouts::request`], closes the client. A
//!   line that is not `CONNECT <u32>\n` within [`MAX_CONNECT_LINE`] bytes and
//!   [`Timeouts::connect_line`] closes the client too.
//! - guest-initiated: a REQUEST for host port P connects to the Unix socket `PATH_P`; if
//!   nothing listens there, the guest gets an RST.
//!
//! Flow control and bounds are in `connection`: each connection holds at most
//! [`BUF_ALLOC`] guest bytes for a host socket that does not read, host bytes are read only
//! when the guest has credit, at most [`MAX_CONNECTIONS`] connections and pending clients exist
//! at once, and all host sockets are non-blocking, so a stuck host peer stalls only its own
//! connection. Packets for the guest are taken round-robin over the connections that have some.
//!
//! # Wiring (for the VMM)
//! ```text
//! let vsock = Arc::new(Mutex::new(Vsock::new("vsock0", cid, &socket)?));
//! // restore only: vsock.lock().restore(&saved.device)?, before the transport's restore
//! let pci = VirtioPciDevice::new(vsock.clone(), mem, resources)?;
//! device_event_manager.add_subscriber(vsock.clone());
//! ```
//! The device registers its own fds when added to the device event loop (`init`): its
//! activation eventfd and a timerfd; once the driver activates it, the three queue eventfds,
//! the listening socket and one fd per host client or connection (EPOLLIN/EPOLLOUT as each
//! needs). The VMM owns none of them. Save [`VsockState`] (`state()`) next to the
//! transport's state, like the other devices.
//!
//! # Snapshot, restore, failover
//! Connections are host resources and do not survive a restore (Cloud Hypervisor does the
//! same): the restored device starts with none. The saved state lists the (host port, guest
//! port) pairs the guest may still think open, and the restored device sends the guest an RST
//! for each, as Cloud Hypervisor does, rather than a TRANSPORT_RESET event: Linux handles an
//! RST for a connected socket by closing it (the application sees the connection end) and drops
//! an RST for a socket it no longer has, and RSTs need no event-queue buffer.
//!
//! Threads: `activate`/`reset` (vCPU thread) only store or drop the queues and signal the
//! activation eventfd; all queue and socket work runs on the device event loop.

mod connection;
pub mod packet;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, info, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use self::connection::{Connection, Deadline, Key, LineRead, Outgoing, PendingClient};
pub use self::connection::{Timeouts, BUF_ALLOC, MAX_CONNECT_LINE};
use self::packet::*;
use super::{
    ActivateError, ActiveQueue, InterruptKind, VirtQueueState, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::state::RestoreError;
use crate::GuestMemoryMmap;

/// The virtio device ID (5 Device Types).
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// Queue indices (5.10.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
const NUM_QUEUES: usize = 3;

/// Queue size, as Cloud Hypervisor's vsock.
pub const QUEUE_SIZE: u16 = 256;

/// Most connections plus host clients still sending their CONNECT line (Cloud Hypervisor's
/// limit on connections).
pub const MAX_CONNECTIONS: usize = 1023;

/// RSTs for packets that name no connection, queued for the guest. Beyond this the device
/// stops taking transmit chains until the guest gives receive buffers: the guest's own queue
/// holds what it sends, not host memory.
const MAX_PENDING_RSTS: usize = 256;
/// Hard cap on that queue (a restore may add one RST per saved connection).
const MAX_QUEUED_RSTS: usize = 4 * (MAX_CONNECTIONS + 1);

/// Host ports given to host-initiated connections: [2^30, 2^31), as Cloud Hypervisor.
const LOCAL_PORT_FIRST: u32 = 1 << 30;
const LOCAL_PORT_LAST: u32 = (1 << 31) - 1;

/// Chains served per queue per pass, before the loop serves other devices.
const MAX_BATCH: usize = 256;
/// Clients accepted per listener event.
const MAX_ACCEPTS: usize = 16;

const CONFIG_LEN: usize = 8;

/// Event-loop tokens; host sockets use `FD_TOKEN | fd`.
const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_RX_QUEUE: u32 = 1;
const TOKEN_TX_QUEUE: u32 = 2;
const TOKEN_EVENT_QUEUE: u32 = 3;
const TOKEN_LISTENER: u32 = 4;
const TOKEN_TIMER: u32 = 5;
const FD_TOKEN: u32 = 1 << 31;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("virtio-vsock {id}: guest CID {cid} is not usable (it must be from 3 to 4294967294)")]
    InvalidCid { id: String, cid: u64 },
    #[error("virtio-vsock {id}: cannot listen on {}: {source}{}", path.display(),
        if source.kind() == io::ErrorKind::AddrInUse { " (the path exists: remove a stale socket left by an earlier run)" } else { "" })]
    Bind {
        id: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("virtio-vsock {id}: cannot create an eventfd: {source}")]
    EventFd {
        id: String,
        #[source]
        source: io::Error,
    },
    #[error("virtio-vsock {id}: cannot create a timer: {source}")]
    Timer {
        id: String,
        #[source]
        source: io::Error,
    },
}

/// Device counters (monotonic since creation; saved so they stay so across a migration).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockCounters {
    /// Packets taken from the guest, and their payload bytes handed to host sockets.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets given to the guest, and their payload bytes.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Connections opened from the host (CONNECT) and from the guest (REQUEST).
    pub host_connections: u64,
    pub guest_connections: u64,
    /// Connection attempts refused (limit reached, no `PATH_port` listener, bad CONNECT line).
    pub refused: u64,
    /// RSTs sent to the guest.
    pub resets: u64,
    /// Guest packets dropped or answered with RST for breaking the protocol.
    pub bad_packets: u64,
    /// Chains refused as malformed (either queue).
    pub bad_chains: u64,
}

/// virtio-vsock's own saved state (the queues are in the transport's).
///
/// Not saved: connections and host clients (host sockets, which the destination does not
/// have). `connections` lists the (host port, guest port) pairs the guest may still think
/// open; the restored device sends it an RST for each (see the module documentation).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockState {
    /// Checked: the driver negotiated against these.
    pub avail_features: u64,
    pub acked_features: u64,
    /// Checked: maximum size of the rx, tx and event queues.
    pub queue_sizes: Vec<u16>,
    /// Checked: the guest knows itself by this CID.
    pub cid: u64,
    pub connections: Vec<(u32, u32)>,
    pub counters: VsockCounters,
}

/// What the device holds while the driver has it active.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: ActiveQueue,
    tx: ActiveQueue,
    event: ActiveQueue,
}

/// A standalone RST for the guest (a packet that named no connection).
#[derive(Clone, Copy, Debug)]
struct RstReply {
    local_port: u32,
    peer_port: u32,
    type_: u16,
}

/// Kinds of trouble logged at `warn` the first time and at `debug` after, so a misbehaving
/// guest or host client cannot flood the log.
#[derive(Clone, Copy)]
enum Trouble {
    Chain = 0,
    Length,
    Address,
    SocketType,
    Protocol,
    Limit,
    HostClient,
    HostSocket,
}

/// A virtio-vsock device with the hybrid Unix-socket backend.
pub struct Vsock {
    id: String,
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    /// The bound socket file's identity, so that only our own file is removed on drop.
    listener_file: Option<(u64, u64)>,
    queue_sizes: [u16; NUM_QUEUES],
    avail_features: u64,
    acked_features: u64,
    timeouts: Timeouts,
    activate_evt: EventFd,
    timer: TimerFd,
    timer_at: Option<Instant>,
    active: Option<Active>,
    /// Bumped by activate and reset; the loop catches up in `sync_registrations`.
    generation: u64,
    registered_gen: u64,
    /// Queue eventfds registered with the loop (kept open until removed).
    registered: Vec<Arc<EventFd>>,
    listener_registered: bool,
    conns: HashMap<Key, Connection>,
    conn_fds: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, PendingClient>,
    /// Host ports in use by host-initiated connections.
    local_ports: HashSet<u32>,
    next_local_port: u32,
    /// Connections with something for the guest, served round-robin.
    rx_order: VecDeque<Key>,
    rsts: VecDeque<RstReply>,
    /// Connections changed since the last sweep (registrations, removal, rx order).
    dirty: Vec<Key>,
    tx_payload: Vec<u8>,
    rx_payload: Vec<u8>,
    warned: u32,
    counters: VsockCounters,
}

impl Vsock {
    /// A vsock device for guest `cid` listening on `socket_path`. Like Cloud Hypervisor it
    /// refuses a path that exists (a stale socket of an earlier run included): binding fails
    /// with "address in use" and the caller removes the file if it knows it is stale. The
    /// socket file is removed when the device is dropped.
    pub fn new(
        id: impl Into<String>,
        cid: u64,
        socket_path: impl Into<PathBuf>,
    ) -> Result<Vsock, VsockError> {
        let id = id.into();
        let path = socket_path.into();
        if cid < 3 || cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid { id, cid });
        }
        let bind_err = |source| VsockError::Bind {
            id: id.clone(),
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let listener_file = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| VsockError::EventFd {
            id: id.clone(),
            source,
        })?;
        let timer_err = |source| VsockError::Timer {
            id: id.clone(),
            source,
        };
        let timer = TimerFd::new().map_err(|e| timer_err(io::Error::from(e)))?;
        // The timer is read after its event only, but a re-arm in between must not make that
        // read block the loop.
        set_nonblocking(timer.as_raw_fd()).map_err(timer_err)?;
        Ok(Vsock {
            id,
            cid,
            path,
            listener,
            listener_file,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            avail_features: VIRTIO_F_VERSION_1,
            acked_features: 0,
            timeouts: Timeouts::default(),
            activate_evt,
            timer,
            timer_at: None,
            active: None,
            generation: 0,
            registered_gen: 0,
            registered: Vec::new(),
            listener_registered: false,
            conns: HashMap::new(),
            conn_fds: HashMap::new(),
            pending: HashMap::new(),
            local_ports: HashSet::new(),
            next_local_port: LOCAL_PORT_FIRST,
            rx_order: VecDeque::new(),
            rsts: VecDeque::new(),
            dirty: Vec::new(),
            tx_payload: vec![0u8; MAX_PKT_LEN],
            rx_payload: vec![0u8; MAX_PKT_LEN],
            warned: 0,
            counters: VsockCounters::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Whether the device is activated (and not reset since).
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Open connections (not counting host clients still sending their CONNECT line).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Guest bytes held for host sockets that have not taken them yet, over all connections.
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(|c| c.tx_buffered()).sum()
    }

    /// Changes how long peers are waited for (applies to connections opened from now on).
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
    }

    /// Counters, by Cloud Hypervisor-style names (for `vm.counters`).
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let c = &self.counters;
        BTreeMap::from([
            ("tx_packets", c.tx_packets),
            ("tx_bytes", c.tx_bytes),
            ("rx_packets", c.rx_packets),
            ("rx_bytes", c.rx_bytes),
            ("host_connections", c.host_connections),
            ("guest_connections", c.guest_connections),
            ("refused", c.refused),
            ("resets", c.resets),
            ("bad_packets", c.bad_packets),
            ("bad_chains", c.bad_chains),
        ])
    }

    /// Captures the device's own state. Call it only while the event loop is stopped.
    pub fn state(&self) -> VsockState {
        let mut connections: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        connections.extend(
            self.rsts
                .iter()
                .filter(|r| r.type_ == VSOCK_TYPE_STREAM)
                .map(|r| (r.local_port, r.peer_port)),
        );
        connections.sort_unstable();
        connections.dedup();
        VsockState {
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            queue_sizes: self.queue_sizes.to_vec(),
            cid: self.cid,
            connections,
            counters: self.counters,
        }
    }

    /// Loads `state` into a device built from the same configuration; the queues come back
    /// through the transport's restore. The guest gets an RST for every connection the state
    /// lists. Connections this device had are closed when its loop next runs. On error the
    /// device is unchanged.
    pub fn restore(&mut self, state: &VsockState) -> Result<(), RestoreError> {
        let device = format!("virtio-vsock {}", self.id);
        super::check_restored_device(
            &device,
            (&self.queue_sizes, &state.queue_sizes),
            (self.avail_features, state.avail_features),
            state.acked_features,
        )?;
        if state.cid != self.cid {
            return Err(RestoreError::Inconsistent {
                device_type: VIRTIO_ID_VSOCK,
                reason: format!(
                    "{device}: the device has guest CID {} but the snapshot's guest knows itself as {}",
                    self.cid, state.cid
                ),
            });
        }
        self.acked_features = state.acked_features;
        self.counters = state.counters;
        let mut dropped = 0usize;
        for &(local_port, peer_port) in &state.connections {
            if self.rsts.len() >= MAX_QUEUED_RSTS {
                dropped += 1;
                continue;
            }
            self.rsts.push_back(RstReply {
                local_port,
                peer_port,
                type_: VSOCK_TYPE_STREAM,
            });
        }
        if dropped > 0 {
            warn!("{device}: {dropped} saved connections beyond the limit are not reset");
        }
        // Whatever this device had open belongs to the guest before the restore.
        self.generation += 1;
        if let Err(e) = self.activate_evt.write(1) {
            error!("{device}: cannot signal the event loop of the restore: {e}");
        }
        Ok(())
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        self.cid.to_le_bytes()
    }

    /// Logs trouble of `kind`: at warn the first time, at debug afterwards.
    fn trouble(&mut self, kind: Trouble, msg: std::fmt::Arguments) {
        let bit = 1u32 << kind as u32;
        if self.warned & bit == 0 {
            self.warned |= bit;
            warn!(
                "{}: {msg} (further ones are logged at debug level)",
                self.id
            );
        } else {
            debug!("{}: {msg}", self.id);
        }
    }

    // ---- event loop registrations ----

    /// Brings the loop's registrations in line with the current activation. Connections and
    /// clients of an earlier activation are closed: their guest driver is gone.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::empty_raw(evt.as_raw_fd())) {
                warn!("{}: cannot unregister a queue eventfd: {e:?}", self.id);
            }
        }
        if self.listener_registered {
            if let Err(e) = ops.remove(Events::empty(&self.listener)) {
                warn!("{}: cannot unregister the listener: {e:?}", self.id);
            }
            self.listener_registered = false;
        }
        if self.registered_gen != self.generation {
            self.close_everything(Some(ops));
            self.registered_gen = self.generation;
        }
        self.register_active(ops);
    }

    /// Registers the queues and the listener of an active device.
    fn register_active(&mut self, ops: &mut EventOps) {
        let Some(active) = &self.active else {
            return;
        };
        for (token, q) in [
            (TOKEN_RX_QUEUE, &active.rx),
            (TOKEN_TX_QUEUE, &active.tx),
            (TOKEN_EVENT_QUEUE, &active.event),
        ] {
            match ops.add(Events::with_data(q.notify.as_ref(), token, EventSet::IN)) {
                Ok(()) => self.registered.push(q.notify.clone()),
                Err(e) => error!("{}: cannot register a queue eventfd: {e:?}", self.id),
            }
        }
        match ops.add(Events::with_data(
            &self.listener,
            TOKEN_LISTENER,
            EventSet::IN,
        )) {
            Ok(()) => self.listener_registered = true,
            Err(e) => error!("{}: cannot watch the vsock socket: {e:?}", self.id),
        }
    }

    /// Closes every connection and host client (removing them from the loop when `ops` is the
    /// loop they are registered with).
    fn close_everything(&mut self, mut ops: Option<&mut EventOps>) {
        let n = self.conns.len() + self.pending.len();
        if n > 0 {
            info!(
                "{}: closing {n} host connections of the previous driver",
                self.id
            );
        }
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key, ops.as_deref_mut());
        }
        let fds: Vec<RawFd> = self.pending.keys().copied().collect();
        for fd in fds {
            self.remove_pending(fd, ops.as_deref_mut());
        }
        self.rx_order.clear();
        self.dirty.clear();
    }

    fn remove_conn(&mut self, key: Key, ops: Option<&mut EventOps>) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        let fd = conn.stream.as_raw_fd();
        if let (Some(_), Some(ops)) = (conn.interest, ops) {
            if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                warn!("{}: cannot unregister connection {key:?}: {e:?}", self.id);
            }
        }
        self.conn_fds.remove(&fd);
        if conn.host_initiated {
            self.local_ports.remove(&conn.local_port);
        }
        debug!("{}: connection {key:?} closed", self.id);
    }

    fn remove_pending(&mut self, fd: RawFd, ops: Option<&mut EventOps>) {
        let Some(client) = self.pending.remove(&fd) else {
            return;
        };
        if let (true, Some(ops)) = (client.registered, ops) {
            if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                warn!("{}: cannot unregister a host client: {e:?}", self.id);
            }
        }
    }

    /// Applies what changed on connections: registrations follow what each wants, finished
    /// ones are removed, those with packets for the guest join the round-robin.
    fn sweep(&mut self, ops: &mut EventOps) {
        while let Some(key) = self.dirty.pop() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if conn.closed {
                self.remove_conn(key, Some(ops));
                continue;
            }
            let fd = conn.stream.as_raw_fd();
            let want = conn.wanted_interest();
            let result = match (conn.interest, want) {
                (None, Some(set)) => ops
                    .add(Events::with_data_raw(fd, FD_TOKEN | fd as u32, set))
                    .map(|()| conn.interest = Some(set)),
                (Some(old), Some(set)) if old != set => ops
                    .modify(Events::with_data_raw(fd, FD_TOKEN | fd as u32, set))
                    .map(|()| conn.interest = Some(set)),
                (Some(_), None) => ops
                    .remove(Events::empty_raw(fd))
                    .map(|()| conn.interest = None),
                _ => Ok(()),
            };
            if let Err(e) = result {
                error!(
                    "{}: cannot watch the host socket of connection {key:?}: {e:?}",
                    self.id
                );
                // Unwatchable: reset it, and do not try again.
                conn.host_hup = true;
                conn.kill();
            }
            if conn.has_rx_work() && !conn.in_rx_order {
                conn.in_rx_order = true;
                self.rx_order.push_back(key);
            }
        }
    }

    /// Arms the timer for the earliest deadline (or disarms it).
    fn arm_timer(&mut self) {
        let next = self
            .conns
            .values()
            .filter_map(|c| c.deadline.map(|d| d.0))
            .chain(self.pending.values().map(|p| p.deadline))
            .min();
        if next == self.timer_at {
            return;
        }
        self.timer_at = next;
        let result = match next {
            Some(at) => {
                let wait = at
                    .saturating_duration_since(Instant::now())
                    .max(std::time::Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            error!("{}: cannot arm the timer: {e}", self.id);
        }
    }

    /// Ends what passed its deadline.
    fn expire(&mut self, ops: &mut EventOps) {
        let now = Instant::now();
        self.timer_at = None;
        let late: Vec<(Key, Deadline)> = self
            .conns
            .iter()
            .filter_map(|(k, c)| c.deadline.filter(|d| d.0 <= now).map(|d| (*k, d.1)))
            .collect();
        for (key, why) in late {
            let what = match why {
                Deadline::Request => "the guest did not answer the connection request",
                Deadline::Shutdown => "the connection did not finish shutting down",
            };
            info!("{}: resetting connection {key:?}: {what}", self.id);
            if let Some(c) = self.conns.get_mut(&key) {
                c.kill();
                self.dirty.push(key);
            }
        }
        let late: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        let limit = self.timeouts.connect_line;
        for fd in late {
            self.counters.refused += 1;
            self.trouble(
                Trouble::HostClient,
                format_args!("closing a host client that sent no CONNECT line within {limit:?}"),
            );
            self.remove_pending(fd, Some(ops));
        }
    }

    // ---- host side ----

    fn accept_clients(&mut self, ops: &mut EventOps) {
        for _ in 0..MAX_ACCEPTS {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    self.trouble(
                        Trouble::HostSocket,
                        format_args!("cannot accept a host client: {e}"),
                    );
                    return;
                }
            };
            if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
                self.counters.refused += 1;
                self.trouble(
                    Trouble::Limit,
                    format_args!("{MAX_CONNECTIONS} connections open: refusing a host client"),
                );
                continue;
            }
            // fcntl rather than std's ioctl(FIONBIO): the device loop's seccomp filter allows
            // it no ioctl.
            if let Err(e) = set_nonblocking(stream.as_raw_fd()) {
                warn!("{}: cannot make a host client non-blocking: {e}", self.id);
                continue;
            }
            let fd = stream.as_raw_fd();
            let mut client =
                PendingClient::new(stream, Instant::now() + self.timeouts.connect_line);
            match ops.add(Events::with_data_raw(
                fd,
                FD_TOKEN | fd as u32,
                EventSet::IN,
            )) {
                Ok(()) => client.registered = true,
                Err(e) => {
                    error!("{}: cannot watch a host client: {e:?}", self.id);
                    continue;
                }
            }
            self.pending.insert(fd, client);
        }
    }

    /// A host socket (client or connection) is ready.
    fn host_event(&mut self, fd: RawFd, set: EventSet, ops: &mut EventOps) {
        if let Some(client) = self.pending.get_mut(&fd) {
            match client.read_line() {
                LineRead::More => {}
                LineRead::Refuse(why) => {
                    self.counters.refused += 1;
                    self.trouble(
                        Trouble::HostClient,
                        format_args!("closing a host client: {why}"),
                    );
                    self.remove_pending(fd, Some(ops));
                }
                LineRead::Port(port) => self.connect_to_guest(fd, port),
            }
            return;
        }
        let Some(&key) = self.conn_fds.get(&fd) else {
            // A stale event of a socket closed earlier in this batch.
            return;
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            if let Some(why) = conn.on_host_event(set) {
                debug!("{}: resetting connection {key:?}: {why}", self.id);
            }
            self.dirty.push(key);
        }
    }

    /// A host client asked for guest `port`: the connection starts with a REQUEST.
    fn connect_to_guest(&mut self, fd: RawFd, port: u32) {
        let Some(client) = self.pending.remove(&fd) else {
            return;
        };
        let local_port = self.allocate_local_port(port);
        let mut conn = Connection::host_initiated(client.stream, local_port, port, self.timeouts);
        // Still registered as the client was.
        conn.interest = client.registered.then_some(EventSet::IN);
        let key = conn.key();
        debug!(
            "{}: host client connecting to guest port {port} as {key:?}",
            self.id
        );
        self.local_ports.insert(local_port);
        self.conn_fds.insert(fd, key);
        self.conns.insert(key, conn);
        self.dirty.push(key);
        self.counters.host_connections += 1;
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        // At most MAX_CONNECTIONS ports are taken, so this ends within MAX_CONNECTIONS + 1 steps.
        loop {
            let port = self.next_local_port;
            self.next_local_port = if port >= LOCAL_PORT_LAST {
                LOCAL_PORT_FIRST
            } else {
                port + 1
            };
            if !self.local_ports.contains(&port) && !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    // ---- guest packets ----

    fn push_rst(&mut self, hdr: &Header) {
        if hdr.op == VSOCK_OP_RST {
            // Never answer an RST with one.
            return;
        }
        if self.rsts.len() >= MAX_QUEUED_RSTS {
            self.trouble(
                Trouble::Limit,
                format_args!("too many RSTs queued for the guest: dropping one"),
            );
            return;
        }
        self.rsts.push_back(RstReply {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
            type_: hdr.type_,
        });
    }

    /// A malformed packet: the connection it names (if any) cannot continue intact.
    fn reset_named(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.kill();
                self.dirty.push(key);
            }
            None => self.push_rst(hdr),
        }
    }

    /// Takes one transmit chain's packet.
    fn handle_tx_chain(&mut self, mem: &GuestMemoryMmap, segs: &Segments) {
        let mut raw = [0u8; HDR_LEN];
        if segs.read_at(mem, 0, &mut raw).is_err() {
            // Checked in Segments::of; only a memory map change gets here.
            self.counters.bad_chains += 1;
            return;
        }
        let hdr = Header::from_bytes(&raw);
        let room = segs.total() - HDR_LEN;
        let len = hdr.len as usize;
        if len > MAX_PKT_LEN || len > room {
            self.counters.bad_packets += 1;
            self.trouble(
                Trouble::Length,
                format_args!(
                    "guest packet claims {len} payload bytes; its chain holds {room} (at most {MAX_PKT_LEN} allowed): {hdr:?}"
                ),
            );
            self.reset_named(&hdr);
            return;
        }
        let mut payload = std::mem::take(&mut self.tx_payload);
        if segs.read_at(mem, HDR_LEN, &mut payload[..len]).is_err() {
            self.counters.bad_chains += 1;
        } else {
            self.counters.tx_packets += 1;
            self.handle_guest_packet(&hdr, &payload[..len]);
        }
        self.tx_payload = payload;
    }

    fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.dst_cid != VSOCK_HOST_CID || hdr.src_cid != self.cid {
            self.counters.bad_packets += 1;
            let cid = self.cid;
            self.trouble(
                Trouble::Address,
                format_args!(
                    "dropping a guest packet from CID {} to CID {} (only {cid} to {VSOCK_HOST_CID} is served)",
                    hdr.src_cid, hdr.dst_cid
                ),
            );
            return;
        }
        if hdr.type_ != VSOCK_TYPE_STREAM {
            self.counters.bad_packets += 1;
            self.trouble(
                Trouble::SocketType,
                format_args!(
                    "refusing a guest packet of socket type {} (only stream sockets are served)",
                    hdr.type_
                ),
            );
            self.push_rst(hdr);
            return;
        }
        if !(VSOCK_OP_REQUEST..=VSOCK_OP_CREDIT_REQUEST).contains(&hdr.op) {
            self.counters.bad_packets += 1;
            self.trouble(
                Trouble::Protocol,
                format_args!("unknown op {} in a guest packet: {hdr:?}", hdr.op),
            );
            self.reset_named(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == VSOCK_OP_RST {
            if let Some(conn) = self.conns.get_mut(&key) {
                debug!("{}: the guest reset connection {key:?}", self.id);
                conn.closed = true;
                self.dirty.push(key);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op == VSOCK_OP_REQUEST {
                self.connect_to_host(hdr);
            } else {
                // Normal after a reset crossed the guest's packet; anything else is a guest bug.
                debug!(
                    "{}: guest op {} for no connection {key:?}: RST",
                    self.id, hdr.op
                );
                self.push_rst(hdr);
            }
            return;
        };
        let violation = conn.on_guest_packet(hdr, payload);
        if hdr.op == VSOCK_OP_RW && violation.is_none() {
            self.counters.tx_bytes += payload.len() as u64;
        }
        self.dirty.push(key);
        if let Some(why) = violation {
            self.counters.bad_packets += 1;
            self.trouble(
                Trouble::Protocol,
                format_args!("resetting connection {key:?}: {why}"),
            );
        }
    }

    /// The guest's REQUEST for host port P: connect to `PATH_P`.
    fn connect_to_host(&mut self, hdr: &Header) {
        if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            self.counters.refused += 1;
            self.trouble(
                Trouble::Limit,
                format_args!("{MAX_CONNECTIONS} connections open: refusing a guest connection"),
            );
            self.push_rst(hdr);
            return;
        }
        let path = port_path(&self.path, hdr.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Connection::guest_initiated(stream, hdr, self.timeouts);
                let key = conn.key();
                debug!(
                    "{}: guest connected to {} as {key:?}",
                    self.id,
                    path.display()
                );
                self.conn_fds.insert(conn.stream.as_raw_fd(), key);
                self.conns.insert(key, conn);
                self.dirty.push(key);
                self.counters.guest_connections += 1;
            }
            Err(e) => {
                // Nobody listening is the ordinary "connection refused" of the guest.
                debug!(
                    "{}: guest connection to host port {} refused: {}: {e}",
                    self.id,
                    hdr.dst_port,
                    path.display()
                );
                self.counters.refused += 1;
                self.push_rst(hdr);
            }
        }
    }

    // ---- queues ----

    /// Serves up to a batch of transmit chains. Returns (used buffers added, batch full).
    fn process_tx(&mut self) -> (bool, bool) {
        let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
            return (false, false);
        };
        let mut used = false;
        for _ in 0..MAX_BATCH {
            if self.rsts.len() >= MAX_PENDING_RSTS {
                // Resumed once the guest takes RSTs (process_rx).
                return (used, false);
            }
            let Some(active) = self.active.as_mut() else {
                return (used, false);
            };
            let Some(chain) = active.tx.queue.pop_descriptor_chain(&mem) else {
                return (used, false);
            };
            let head = chain.head_index();
            match Segments::of(chain, &mem, false) {
                Ok(segs) => self.handle_tx_chain(&mem, &segs),
                Err(e) => {
                    self.counters.bad_chains += 1;
                    self.trouble(
                        Trouble::Chain,
                        format_args!("transmit chain {head} skipped: {e}"),
                    );
                }
            }
            if let Some(active) = self.active.as_mut() {
                used |= add_used(&mut active.tx.queue, &mem, head, 0, &self.id);
            }
        }
        (used, true)
    }

    /// Fills receive chains with packets while both are there. Returns (used buffers added,
    /// batch full).
    fn process_rx(&mut self) -> (bool, bool) {
        let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
            return (false, false);
        };
        let mut used = false;
        for _ in 0..MAX_BATCH {
            if self.rsts.is_empty() && self.rx_order.is_empty() {
                return (used, false);
            }
            let Some(active) = self.active.as_mut() else {
                return (used, false);
            };
            let Some(chain) = active.rx.queue.pop_descriptor_chain(&mem) else {
                return (used, false);
            };
            let head = chain.head_index();
            let segs = match Segments::of(chain, &mem, true) {
                Ok(segs) => segs,
                Err(e) => {
                    used |= add_used(&mut active.rx.queue, &mem, head, 0, &self.id);
                    self.counters.bad_chains += 1;
                    self.trouble(
                        Trouble::Chain,
                        format_args!("receive chain {head} skipped: {e}"),
                    );
                    continue;
                }
            };
            let room = (segs.total() - HDR_LEN).min(MAX_PKT_LEN);
            let Some(out) = self.next_packet(room) else {
                // Nothing to send after all: the chain stays for the next packet.
                if let Some(active) = self.active.as_mut() {
                    active.rx.queue.go_to_previous_position();
                }
                return (used, false);
            };
            let written = segs
                .write_at(&mem, 0, &out.hdr.to_bytes())
                .and_then(|()| segs.write_at(&mem, HDR_LEN, &self.rx_payload[..out.len]));
            let len = match written {
                Ok(()) => {
                    self.counters.rx_packets += 1;
                    self.counters.rx_bytes += out.len as u64;
                    if out.hdr.op == VSOCK_OP_RST {
                        self.counters.resets += 1;
                    }
                    (HDR_LEN + out.len) as u32
                }
                Err(()) => {
                    // Checked in Segments::of; only a memory map change gets here.
                    self.counters.bad_chains += 1;
                    0
                }
            };
            if let Some(active) = self.active.as_mut() {
                used |= add_used(&mut active.rx.queue, &mem, head, len, &self.id);
            }
        }
        (used, true)
    }

    /// The next packet for the guest (payload in `rx_payload`): standalone RSTs first, then
    /// the connections round-robin, one packet each per turn.
    fn next_packet(&mut self, room: usize) -> Option<Outgoing> {
        if let Some(r) = self.rsts.pop_front() {
            return Some(Outgoing {
                hdr: Header {
                    src_cid: VSOCK_HOST_CID,
                    dst_cid: self.cid,
                    src_port: r.local_port,
                    dst_port: r.peer_port,
                    type_: r.type_,
                    op: VSOCK_OP_RST,
                    ..Header::default()
                },
                len: 0,
            });
        }
        // Each connection yields a packet within a few turns (a read that would block, or
        // the end of the socket, clears what it had), so this bound is never the limit in
        // practice; it only keeps a logic error from spinning.
        let mut turns = 3 * self.rx_order.len() + 1;
        while turns > 0 {
            turns -= 1;
            let key = self.rx_order.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_order = false;
            let result = conn.next_packet(self.cid, room, &mut self.rx_payload);
            self.dirty.push(key);
            if conn.has_rx_work() {
                conn.in_rx_order = true;
                self.rx_order.push_back(key);
            }
            match result {
                Ok(Some(out)) => return Some(out),
                Ok(None) => {}
                Err(why) => debug!("{}: resetting connection {key:?}: {why}", self.id),
            }
        }
        None
    }

    fn signal_used(&mut self, queue_index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let queue = match queue_index {
            RX_QUEUE => &mut active.rx.queue,
            _ => &mut active.tx.queue,
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

    /// Moves everything that can move: transmit chains in, packets out, until neither makes
    /// progress (or a batch limit: then the loop is asked to come back).
    fn pump(&mut self, ops: &mut EventOps) {
        let mut rx_used = false;
        let mut tx_used = false;
        let mut more = false;
        for _ in 0..4 {
            let (t_used, t_more) = self.process_tx();
            self.sweep(ops);
            let (r_used, r_more) = self.process_rx();
            self.sweep(ops);
            tx_used |= t_used;
            rx_used |= r_used;
            more = t_more || r_more;
            // RSTs taken may unblock transmit; new connections may have packets.
            if !(t_used || r_used) {
                break;
            }
        }
        if rx_used {
            self.signal_used(RX_QUEUE);
        }
        if tx_used {
            self.signal_used(TX_QUEUE);
        }
        if more {
            if let Err(e) = self.activate_evt.write(1) {
                error!("{}: cannot reschedule the device: {e}", self.id);
            }
        }
        self.arm_timer();
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Remove the socket file, but only if it is still the one we bound.
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.listener_file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `PATH_port`, where a host service for guest connections to `port` listens.
fn port_path(path: &Path, port: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a fd we own; F_GETFL/F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connects to the Unix socket at `path` without blocking: a listener whose backlog is full
/// refuses (EAGAIN) instead of stalling the device loop.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is too long or holds a NUL byte",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes, alive for the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Adds a used element; a failure means the used ring left guest memory, which activation
/// ruled out, so it is only logged.
fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32, id: &str) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            error!("{id}: cannot add used element {head}: {e:?}");
            false
        }
    }
}

impl VirtioDevice for Vsock {
    virtio_device_basics!(VIRTIO_ID_VSOCK);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // guest_cid is device-owned.
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
        let (Some(rx), Some(tx), Some(event)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount {
                got: 0,
                want: NUM_QUEUES,
            });
        };
        self.active = Some(Active {
            mem,
            interrupt,
            rx,
            tx,
            event,
        });
        self.generation += 1;
        self.activate_evt.write(1).map_err(|e| {
            self.active = None;
            ActivateError::Device(format!("{}: cannot signal the event loop: {e}", self.id))
        })
    }

    fn active_queue_states(&self) -> Vec<VirtQueueState> {
        self.active.as_ref().map_or_else(Vec::new, |a| {
            [&a.rx, &a.tx, &a.event]
                .iter()
                .map(|q| VirtQueueState::from(q.queue.state()))
                .collect()
        })
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        // The loop closes the connections and unregisters the queues when it sees this.
        self.generation += 1;
        if let Err(e) = self.activate_evt.write(1) {
            error!(
                "{}: cannot signal the event loop of the reset: {e}",
                self.id
            );
        }
    }
}

impl MutEventSubscriber for Vsock {
    /// Joins a (new) event loop: registers the activation eventfd and the timer and, for a
    /// restored or already active device, its queues, listener and host sockets, and schedules
    /// a first pass (chains queued before a snapshot had their notifications on the source's
    /// eventfds).
    fn init(&mut self, ops: &mut EventOps) {
        // Registrations of an earlier loop belong to that loop's epoll.
        self.registered.clear();
        self.listener_registered = false;
        if self.registered_gen != self.generation {
            self.close_everything(None);
            self.registered_gen = self.generation;
        }
        for conn in self.conns.values_mut() {
            conn.interest = None;
        }
        self.dirty.extend(self.conns.keys().copied());
        for (&fd, client) in self.pending.iter_mut() {
            client.registered = ops
                .add(Events::with_data_raw(
                    fd,
                    FD_TOKEN | fd as u32,
                    EventSet::IN,
                ))
                .is_ok();
        }
        for (token, fd) in [
            (TOKEN_ACTIVATE, self.activate_evt.as_raw_fd()),
            (TOKEN_TIMER, self.timer.as_raw_fd()),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                error!("{}: cannot register with the event loop: {e:?}", self.id);
            }
        }
        self.register_active(ops);
        if let Err(e) = self.activate_evt.write(1) {
            error!("{}: cannot schedule the first pass: {e}", self.id);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == TOKEN_ACTIVATE {
            // Non-blocking eventfd: an empty counter (already consumed) is not an error.
            let _ = self.activate_evt.read();
        }
        if self.registered_gen != self.generation {
            self.sync_registrations(ops);
        }
        match token {
            TOKEN_ACTIVATE => {}
            TOKEN_RX_QUEUE | TOKEN_TX_QUEUE | TOKEN_EVENT_QUEUE => {
                if let Some(a) = &self.active {
                    let q = match token {
                        TOKEN_RX_QUEUE => &a.rx,
                        TOKEN_TX_QUEUE => &a.tx,
                        _ => &a.event,
                    };
                    let _ = q.notify.read();
                }
            }
            TOKEN_LISTENER => {
                if self.active.is_some() {
                    self.accept_clients(ops);
                }
            }
            TOKEN_TIMER => {
                // Non-blocking: a timer re-armed since it fired reads as empty.
                let _ = self.timer.wait();
                self.expire(ops);
            }
            t if t & FD_TOKEN != 0 => {
                self.host_event((t & !FD_TOKEN) as RawFd, events.event_set(), ops)
            }
            other => warn!("{}: unexpected event token {other}", self.id),
        }
        self.pump(ops);
    }
}
