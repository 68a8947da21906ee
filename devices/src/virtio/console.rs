//! virtio-console (virtio 1.x, 5.3 Console Device) with a single port.
//!
//! Two queues: receiveq (0, host to guest) and transmitq (1, guest to host). No
//! `VIRTIO_CONSOLE_F_MULTIPORT` (so no control queues); `VIRTIO_CONSOLE_F_SIZE` is offered with
//! the console's columns and rows in config space, as Cloud Hypervisor does.
//!
//! Host side ([`ConsoleBackend`]): output goes to a writer (stdout, a file, a pty master, or
//! nothing), or to the client connected to a listening Unix socket (discarded while none is);
//! input comes from a readable fd (stdin, a pty master) or the socket client. Input bytes wait
//! in a bounded buffer until the guest has receive buffers, so nothing typed before the driver
//! is up is lost (up to [`MAX_PENDING_INPUT`] bytes; beyond that input is dropped and counted).
//!
//! Threads: as with virtio-net, `activate`/`reset` (vCPU thread) only store or drop the queues
//! and signal `activate_evt`; all queue, input and output work runs on the device event loop,
//! which also accepts socket clients. Guest memory is written only through vm-memory, so every
//! receive write marks the dirty bitmap.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, info, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateError, ActiveQueue, InterruptKind, VirtQueueState, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_ID_CONSOLE,
};
use crate::state::RestoreError;
use crate::GuestMemoryMmap;

/// Queue indices (5.3.2): receiveq(port0), transmitq(port0).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const NUM_QUEUES: usize = 2;

/// Queue size, as Cloud Hypervisor's console.
pub const QUEUE_SIZE: u16 = 256;

/// Feature bit (5.3.3): the configuration fields `cols` and `rows` are valid.
pub const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;

/// Most input bytes kept while the guest has no receive buffers; more is dropped and counted.
pub const MAX_PENDING_INPUT: usize = 64 << 10;

/// Config space (5.3.4): cols (u16), rows (u16), max_nr_ports (u32), emerg_wr (u32).
const CONFIG_LEN: usize = 12;

/// Bytes read from the host input per event, and copied out per step on transmit.
const IO_CHUNK: usize = 4096;

/// How many chains one event serves before yielding to other devices.
const MAX_BATCH: usize = 256;

/// Event-loop tokens.
const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_RX_QUEUE: u32 = 1;
const TOKEN_TX_QUEUE: u32 = 2;
const TOKEN_INPUT: u32 = 3;
const TOKEN_LISTENER: u32 = 4;
const TOKEN_CLIENT: u32 = 5;

/// Where the console's bytes go and come from on the host.
pub enum ConsoleBackend {
    /// Output only (`null`, `file=`); the guest never receives input.
    Output(Box<dyn Write + Send>),
    /// Output to a writer and input from a readable fd: `tty` (stdout and stdin) or `pty`
    /// (the master for both). The input fd is polled by the device event loop; a fd epoll
    /// cannot watch (a regular file, /dev/null) leaves the console without input.
    Stream {
        output: Box<dyn Write + Send>,
        input: File,
    },
    /// A listening Unix socket (`socket=`): the connected client (the latest one) is both
    /// input and output; output while none is connected is discarded.
    Socket(UnixListener),
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("virtio-console {id}: cannot create an eventfd: {source}")]
    EventFd {
        id: String,
        #[source]
        source: io::Error,
    },
}

/// Device counters (monotonic since creation; saved so they stay so across a migration).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleCounters {
    /// Guest output bytes handed to the host side.
    pub tx_bytes: u64,
    /// Guest output bytes the host side did not take (no socket client, slow reader).
    pub tx_dropped: u64,
    /// Input bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Input bytes dropped because the pending buffer was full.
    pub rx_dropped: u64,
    /// Chains refused as malformed (either queue).
    pub bad_chains: u64,
}

/// virtio-console's own saved state (the queues are in the transport's).
///
/// Input read from the host but not yet delivered is carried over (`pending_input`), so a
/// failover or migration loses no keystroke the source already took. Not saved: the host
/// ends (stdin, pty, socket, file), which the destination opens from its own configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleState {
    /// Checked: the driver negotiated against these.
    pub avail_features: u64,
    pub acked_features: u64,
    /// Checked: maximum size of the receive and transmit queues.
    pub queue_sizes: Vec<u16>,
    /// The size the guest read from config space.
    pub cols: u16,
    pub rows: u16,
    pub pending_input: Vec<u8>,
    pub counters: ConsoleCounters,
}

/// What the device holds while the driver has it active.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: ActiveQueue,
    tx: ActiveQueue,
}

/// A queue eventfd the loop registered; the Arc keeps it open until removed from epoll.
struct Registration {
    token: u32,
    evt: Arc<EventFd>,
}

/// Why a descriptor chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ChainError {
    #[error("the chain is cut short (loop, bad next index, bad indirect table)")]
    Broken,
    #[error("a descriptor lies outside guest memory")]
    OutOfRange,
    #[error("a transmit descriptor is device-writable")]
    WriteOnlyInTx,
    #[error("a receive descriptor is device-readable")]
    ReadOnlyInRx,
    #[error("the chain holds no bytes")]
    Empty,
}

/// Where output goes.
enum Sink {
    Writer(Box<dyn Write + Send>),
    /// To the socket client, if any.
    Client,
}

/// A virtio-console device.
pub struct Console {
    id: String,
    sink: Sink,
    /// Readable host input (stdin, pty master); None without input or after it ended.
    input: Option<File>,
    input_registered: bool,
    listener: Option<UnixListener>,
    listener_registered: bool,
    /// The connected socket client (read and written as a plain fd).
    client: Option<File>,
    client_registered: bool,
    /// The client failed on output; the loop drops it after the current event.
    client_broken: bool,
    cols: u16,
    rows: u16,
    queue_sizes: [u16; NUM_QUEUES],
    avail_features: u64,
    acked_features: u64,
    activate_evt: EventFd,
    active: Option<Active>,
    registered: Vec<Registration>,
    pending: VecDeque<u8>,
    /// The sink failed with an error other than "would block"; logged once.
    sink_error_logged: bool,
    counters: ConsoleCounters,
}

impl Console {
    /// A console on `backend` whose config space reports `cols` x `rows`.
    pub fn new(
        id: impl Into<String>,
        backend: ConsoleBackend,
        cols: u16,
        rows: u16,
    ) -> Result<Console, ConsoleError> {
        let id = id.into();
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| ConsoleError::EventFd {
            id: id.clone(),
            source,
        })?;
        let (sink, input, listener) = match backend {
            ConsoleBackend::Output(out) => (Sink::Writer(out), None, None),
            ConsoleBackend::Stream { output, input } => (Sink::Writer(output), Some(input), None),
            ConsoleBackend::Socket(listener) => (Sink::Client, None, Some(listener)),
        };
        Ok(Console {
            id,
            sink,
            input,
            input_registered: false,
            listener,
            listener_registered: false,
            client: None,
            client_registered: false,
            client_broken: false,
            cols,
            rows,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            avail_features: VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_SIZE,
            acked_features: 0,
            activate_evt,
            active: None,
            registered: Vec::new(),
            pending: VecDeque::new(),
            sink_error_logged: false,
            counters: ConsoleCounters::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the device is activated (and not reset since).
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Input bytes waiting for receive buffers.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// Counters, by Cloud Hypervisor-style names (for `vm.counters`).
    pub fn counters(&self) -> std::collections::BTreeMap<&'static str, u64> {
        let c = &self.counters;
        std::collections::BTreeMap::from([
            ("tx_bytes", c.tx_bytes),
            ("tx_dropped", c.tx_dropped),
            ("rx_bytes", c.rx_bytes),
            ("rx_dropped", c.rx_dropped),
            ("bad_chains", c.bad_chains),
        ])
    }

    /// Changes the size the guest reads and tells it (a config-change interrupt) when the
    /// device is active and the size negotiated.
    pub fn resize(&mut self, cols: u16, rows: u16) {
        if (cols, rows) == (self.cols, self.rows) {
            return;
        }
        self.cols = cols;
        self.rows = rows;
        if self.acked_features & VIRTIO_CONSOLE_F_SIZE == 0 {
            return;
        }
        if let Some(active) = &self.active {
            if let Err(e) = active.interrupt.trigger(InterruptKind::Config) {
                warn!("{}: cannot signal the size change: {e}", self.id);
            }
        }
    }

    /// Captures the device's own state. Call it only while the event loop is stopped.
    pub fn state(&self) -> ConsoleState {
        ConsoleState {
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            queue_sizes: self.queue_sizes.to_vec(),
            cols: self.cols,
            rows: self.rows,
            pending_input: self.pending.iter().copied().collect(),
            counters: self.counters,
        }
    }

    /// Loads `state` into a device built from the same configuration. The queues come back
    /// through the transport's restore. On error the device is unchanged.
    pub fn restore(&mut self, state: &ConsoleState) -> Result<(), RestoreError> {
        let device = format!("virtio-console {}", self.id);
        super::check_restored_device(
            &device,
            (&self.queue_sizes, &state.queue_sizes),
            (self.avail_features, state.avail_features),
            state.acked_features,
        )?;
        self.acked_features = state.acked_features;
        self.cols = state.cols;
        self.rows = state.rows;
        // Bytes read here before the restore stay behind the source's (they came later).
        let mut pending: VecDeque<u8> = state.pending_input.iter().copied().collect();
        pending.extend(self.pending.drain(..));
        let excess = pending.len().saturating_sub(MAX_PENDING_INPUT);
        pending.truncate(MAX_PENDING_INPUT);
        self.pending = pending;
        self.counters = state.counters;
        self.counters.rx_dropped += excess as u64;
        Ok(())
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut cfg = [0u8; CONFIG_LEN];
        cfg[0..2].copy_from_slice(&self.cols.to_le_bytes());
        cfg[2..4].copy_from_slice(&self.rows.to_le_bytes());
        // max_nr_ports: only valid with MULTIPORT, reported as Cloud Hypervisor does.
        cfg[4..8].copy_from_slice(&1u32.to_le_bytes());
        cfg
    }

    /// Registers the host input, the listener and the client if not yet registered.
    fn register_host_fds(&mut self, ops: &mut EventOps) {
        if !self.input_registered {
            if let Some(input) = &self.input {
                match ops.add(Events::with_data(input, TOKEN_INPUT, EventSet::IN)) {
                    Ok(()) => self.input_registered = true,
                    Err(e) => {
                        // EPERM: a regular file or /dev/null, which epoll cannot watch.
                        info!(
                            "{}: the console input cannot be polled ({e:?}); the guest gets no input",
                            self.id
                        );
                        self.input = None;
                    }
                }
            }
        }
        if !self.listener_registered {
            if let Some(listener) = &self.listener {
                match ops.add(Events::with_data(listener, TOKEN_LISTENER, EventSet::IN)) {
                    Ok(()) => self.listener_registered = true,
                    Err(e) => error!("{}: cannot watch the console socket: {e:?}", self.id),
                }
            }
        }
        if !self.client_registered {
            if let Some(client) = &self.client {
                match ops.add(Events::with_data(client, TOKEN_CLIENT, EventSet::IN)) {
                    Ok(()) => self.client_registered = true,
                    Err(e) => {
                        error!("{}: cannot watch the console client: {e:?}", self.id);
                        self.client = None;
                    }
                }
            }
        }
    }

    /// Makes the registered queue eventfds match the device state.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for reg in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::with_data(reg.evt.as_ref(), reg.token, EventSet::IN))
            {
                warn!("{}: cannot unregister a queue eventfd: {e:?}", self.id);
            }
        }
        let Some(active) = &self.active else {
            return;
        };
        for (token, q) in [(TOKEN_RX_QUEUE, &active.rx), (TOKEN_TX_QUEUE, &active.tx)] {
            match ops.add(Events::with_data(q.notify.as_ref(), token, EventSet::IN)) {
                Ok(()) => self.registered.push(Registration {
                    token,
                    evt: q.notify.clone(),
                }),
                Err(e) => error!("{}: cannot register a queue eventfd: {e:?}", self.id),
            }
        }
    }

    /// Reads what the host input has now into the pending buffer.
    fn read_input(&mut self, ops: &mut EventOps) {
        let Some(input) = self.input.as_mut() else {
            return;
        };
        let mut buf = [0u8; IO_CHUNK];
        // One read per readiness event: stdin may share its file description with stdout,
        // so it is not switched to non-blocking; a single read after readiness cannot block.
        match read_once(input, &mut buf) {
            HostRead::Bytes(n) => self.push_input(&buf[..n]),
            HostRead::Nothing => {}
            HostRead::Closed => {
                info!("{}: the console input ended", self.id);
                self.drop_input(ops);
            }
            HostRead::Failed(e) => {
                warn!("{}: cannot read the console input: {e}", self.id);
                self.drop_input(ops);
            }
        }
    }

    fn drop_input(&mut self, ops: &mut EventOps) {
        if let Some(input) = self.input.take() {
            if self.input_registered {
                let _ = ops.remove(Events::with_data(&input, TOKEN_INPUT, EventSet::IN));
            }
        }
        self.input_registered = false;
    }

    /// Keeps `bytes` for the guest, up to the cap.
    fn push_input(&mut self, bytes: &[u8]) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        let take = bytes.len().min(room);
        self.pending.extend(&bytes[..take]);
        let dropped = bytes.len() - take;
        if dropped > 0 {
            if self.counters.rx_dropped == 0 {
                warn!(
                    "{}: the guest is not taking console input; dropping input beyond {MAX_PENDING_INPUT} bytes",
                    self.id
                );
            }
            self.counters.rx_dropped += dropped as u64;
        }
    }

    fn accept_client(&mut self, ops: &mut EventOps) {
        let Some(listener) = &self.listener else {
            return;
        };
        // SAFETY: accept4 on a listening socket we own, with no address buffer; the returned
        // fd (if any) is new and owned by nobody else.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                warn!("{}: cannot accept a console client: {e}", self.id);
            }
            return;
        }
        // SAFETY: `fd` was just returned by accept4 and is owned by nothing else.
        let client = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        if self.client.is_some() {
            info!(
                "{}: a new console client replaces the previous one",
                self.id
            );
            self.drop_client(ops);
        }
        self.client = Some(client);
        self.client_broken = false;
        self.register_host_fds(ops);
    }

    fn drop_client(&mut self, ops: &mut EventOps) {
        if let Some(client) = self.client.take() {
            if self.client_registered {
                let _ = ops.remove(Events::with_data(&client, TOKEN_CLIENT, EventSet::IN));
            }
        }
        self.client_registered = false;
        self.client_broken = false;
    }

    fn read_client(&mut self, ops: &mut EventOps) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let mut buf = [0u8; IO_CHUNK];
        match read_once(client, &mut buf) {
            HostRead::Bytes(n) => self.push_input(&buf[..n]),
            HostRead::Nothing => {}
            HostRead::Closed => {
                debug!("{}: the console client went away", self.id);
                self.drop_client(ops);
            }
            HostRead::Failed(e) => {
                debug!("{}: dropping the console client: {e}", self.id);
                self.drop_client(ops);
            }
        }
    }

    /// Hands guest output to the sink; what it does not take now is dropped and counted.
    fn emit(&mut self, data: &[u8]) {
        let result = match &mut self.sink {
            Sink::Writer(w) => write_or_drop(w.as_mut(), data),
            Sink::Client => match self.client.as_mut() {
                Some(c) if !self.client_broken => write_or_drop(c, data),
                _ => Ok(data.len()),
            },
        };
        match result {
            Ok(dropped) => {
                self.counters.tx_bytes += (data.len() - dropped) as u64;
                self.counters.tx_dropped += dropped as u64;
            }
            Err(e) => {
                self.counters.tx_dropped += data.len() as u64;
                match self.sink {
                    Sink::Client => self.client_broken = true,
                    Sink::Writer(_) if !self.sink_error_logged => {
                        warn!("{}: console output failed, dropping it: {e}", self.id);
                        self.sink_error_logged = true;
                    }
                    Sink::Writer(_) => {}
                }
            }
        }
    }

    /// Serves up to a batch of transmit chains. Returns (used buffers added, batch full).
    fn process_tx(&mut self) -> (bool, bool) {
        let mut used_any = false;
        let mut chunk = [0u8; IO_CHUNK];
        // A handle of its own: output goes through `self` while chains are read.
        let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
            return (false, false);
        };
        for _ in 0..MAX_BATCH {
            let Some(active) = self.active.as_mut() else {
                return (used_any, false);
            };
            let Some(chain) = active.tx.queue.pop_descriptor_chain(&mem) else {
                return (used_any, false);
            };
            let head = chain.head_index();
            match tx_segments(chain, &mem) {
                Ok(segments) => {
                    for (addr, len) in segments {
                        let mut done = 0usize;
                        while done < len {
                            let n = (len - done).min(IO_CHUNK);
                            let Some(at) = addr.checked_add(done as u64) else {
                                break;
                            };
                            if mem.read_slice(&mut chunk[..n], at).is_err() {
                                // Checked in tx_segments; only a memory map change gets here.
                                self.counters.bad_chains += 1;
                                break;
                            }
                            self.emit(&chunk[..n]);
                            done += n;
                        }
                    }
                }
                Err(e) => {
                    warn!("{}: transmit chain {head} skipped: {e}", self.id);
                    self.counters.bad_chains += 1;
                }
            }
            // The device writes nothing into transmit buffers.
            if let Some(active) = self.active.as_mut() {
                used_any |= add_used(&mut active.tx.queue, &mem, head, 0, &self.id);
            }
        }
        (used_any, true)
    }

    /// Delivers pending input into receive buffers while both are there. Returns whether used
    /// buffers were added.
    fn process_rx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = &active.mem;
        let queue = &mut active.rx.queue;
        let mut used_any = false;
        while !self.pending.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let segments = match rx_segments(chain, mem) {
                Ok(s) => s,
                Err(e) => {
                    warn!("{}: receive chain {head} skipped: {e}", self.id);
                    self.counters.bad_chains += 1;
                    used_any |= add_used(queue, mem, head, 0, &self.id);
                    continue;
                }
            };
            let mut written = 0usize;
            'fill: for (addr, len) in segments {
                let mut done = 0usize;
                while done < len && !self.pending.is_empty() {
                    let (front, _) = self.pending.as_slices();
                    let n = front.len().min(len - done);
                    let Some(at) = addr.checked_add(done as u64) else {
                        break 'fill;
                    };
                    if mem.write_slice(&front[..n], at).is_err() {
                        // Checked in rx_segments; only a memory map change gets here.
                        break 'fill;
                    }
                    self.pending.drain(..n);
                    done += n;
                    written += n;
                }
                if self.pending.is_empty() {
                    break;
                }
            }
            self.counters.rx_bytes += written as u64;
            let used_len = u32::try_from(written).unwrap_or(u32::MAX);
            used_any |= add_used(queue, mem, head, used_len, &self.id);
        }
        used_any
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

    fn handle_rx(&mut self) {
        if self.process_rx() {
            self.signal_used(RX_QUEUE);
        }
    }

    /// Serves the transmit queue until it is empty (the notification is consumed, so nothing
    /// else would bring the loop back for chains left behind), then flushes the sink.
    fn handle_tx(&mut self) {
        loop {
            let (used, more) = self.process_tx();
            if used {
                self.signal_used(TX_QUEUE);
            }
            if !more {
                break;
            }
        }
        if let Sink::Writer(w) = &mut self.sink {
            // Line-buffered writers (stdout) would otherwise hold a prompt without a newline.
            if let Err(e) = w.flush() {
                if !self.sink_error_logged {
                    warn!("{}: cannot flush the console output: {e}", self.id);
                    self.sink_error_logged = true;
                }
            }
        }
    }
}

/// Writes what `w` takes now; returns how many bytes were dropped because it would block.
fn write_or_drop(w: &mut dyn Write, data: &[u8]) -> io::Result<usize> {
    let mut rest = data;
    while !rest.is_empty() {
        match w.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(rest.len()),
            Err(e) => return Err(e),
        }
    }
    Ok(0)
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

/// The buffers of a chain, each checked to lie in guest memory and to have the direction the
/// queue needs (`writable`: device-writable, for the receive queue).
fn segments(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    writable: bool,
) -> Result<Vec<(GuestAddress, usize)>, ChainError> {
    let mut out = Vec::new();
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
        out.push((desc.addr(), len));
    }
    if last_has_next {
        return Err(ChainError::Broken);
    }
    if out.is_empty() {
        return Err(ChainError::Empty);
    }
    Ok(out)
}

fn tx_segments(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<(GuestAddress, usize)>, ChainError> {
    segments(chain, mem, false)
}

fn rx_segments(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<(GuestAddress, usize)>, ChainError> {
    segments(chain, mem, true)
}

/// What one read of a host-side input (stdin, a pty, a socket client) gave.
enum HostRead {
    Bytes(usize),
    /// Not ready after all (or interrupted): try again at the next readiness event.
    Nothing,
    /// End of input.
    Closed,
    Failed(io::Error),
}

fn read_once(input: &mut impl Read, buf: &mut [u8]) -> HostRead {
    match input.read(buf) {
        Ok(0) => HostRead::Closed,
        Ok(n) => HostRead::Bytes(n),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            HostRead::Nothing
        }
        Err(e) => HostRead::Failed(e),
    }
}

impl VirtioDevice for Console {
    virtio_device_basics!(VIRTIO_ID_CONSOLE);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr needs VIRTIO_CONSOLE_F_EMERG_WRITE, not offered; the rest is device-owned.
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
        self.active = Some(Active {
            mem,
            interrupt,
            rx,
            tx,
        });
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
        // The loop unregisters the queue eventfds when it sees this.
        if let Err(e) = self.activate_evt.write(1) {
            error!(
                "{}: cannot signal the event loop of the reset: {e}",
                self.id
            );
        }
    }
}

impl MutEventSubscriber for Console {
    /// Joins a (new) event loop: registers the host fds and, for a restored or already active
    /// device, its queues, and schedules a first pass over them (chains queued before a
    /// snapshot had their notifications on the source's eventfds).
    fn init(&mut self, ops: &mut EventOps) {
        // Registrations of an earlier loop belong to that loop's epoll.
        self.registered.clear();
        self.input_registered = false;
        self.listener_registered = false;
        self.client_registered = false;
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            error!("{}: cannot register the activation eventfd: {e:?}", self.id);
        }
        self.register_host_fds(ops);
        if self.active.is_some() {
            self.sync_registrations(ops);
            if let Err(e) = self.activate_evt.write(1) {
                error!("{}: cannot schedule the restored queues: {e}", self.id);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.sync_registrations(ops);
                if self.active.is_some() {
                    self.handle_rx();
                    self.handle_tx();
                }
            }
            TOKEN_RX_QUEUE => {
                if let Some(a) = &self.active {
                    let _ = a.rx.notify.read();
                }
                self.handle_rx();
            }
            TOKEN_TX_QUEUE => {
                if let Some(a) = &self.active {
                    let _ = a.tx.notify.read();
                }
                self.handle_tx();
            }
            TOKEN_INPUT => {
                self.read_input(ops);
                self.handle_rx();
            }
            TOKEN_LISTENER => self.accept_client(ops),
            TOKEN_CLIENT => {
                self.read_client(ops);
                self.handle_rx();
            }
            other => warn!("{}: unexpected event token {other}", self.id),
        }
        if self.client_broken {
            debug!("{}: the console client stopped taking output", self.id);
            self.drop_client(ops);
        }
    }
}
