//! virtio-rng (virtio 1.x, 5.4 Entropy Device): one request queue whose device-writable
//! buffers the device fills from an entropy source (a file the VMM opened, `/dev/urandom` by
//! default).
//!
//! Each chain gets as many bytes as it holds, at most [`MAX_REQUEST`] per chain; a read that
//! comes back short (a regular file at its end) is reported with the length actually written.
//! Requests are served on the device event loop, like the other devices' queues.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateError, ActiveQueue, InterruptKind, VirtQueueState, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_ID_RNG,
};
use crate::state::RestoreError;
use crate::GuestMemoryMmap;

/// Queue size, as Cloud Hypervisor's entropy device.
pub const QUEUE_SIZE: u16 = 256;

/// Most bytes one chain gets: bounds the buffer and the time one request takes.
pub const MAX_REQUEST: usize = 64 << 10;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_QUEUE: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("virtio-rng {id}: cannot create an eventfd: {source}")]
    EventFd {
        id: String,
        #[source]
        source: io::Error,
    },
}

/// Device counters (monotonic since creation; saved so they stay so across a migration).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RngCounters {
    pub bytes: u64,
    pub requests: u64,
    /// Chains refused (read-only or outside guest memory) or not filled (source errors).
    pub errors: u64,
}

/// virtio-rng's own saved state (the queue is in the transport's). Requests are served
/// synchronously on the stopped device loop, so none is in flight; the entropy source is a
/// host resource the destination opens itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    pub avail_features: u64,
    pub acked_features: u64,
    pub queue_sizes: Vec<u16>,
    pub counters: RngCounters,
}

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ChainError {
    #[error("the chain is cut short (loop, bad next index, bad indirect table)")]
    Broken,
    #[error("a descriptor is device-readable; entropy buffers must be device-writable")]
    ReadOnly,
    #[error("a descriptor lies outside guest memory")]
    OutOfRange,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: ActiveQueue,
}

/// A virtio-rng device.
pub struct Rng {
    id: String,
    source: File,
    queue_sizes: [u16; 1],
    avail_features: u64,
    acked_features: u64,
    activate_evt: EventFd,
    active: Option<Active>,
    /// The queue eventfd the loop has registered.
    registered: Option<Arc<EventFd>>,
    buf: Vec<u8>,
    counters: RngCounters,
}

impl Rng {
    /// An entropy device reading `source` (opened for reading by the caller).
    pub fn new(id: impl Into<String>, source: File) -> Result<Rng, RngError> {
        let id = id.into();
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| RngError::EventFd {
            id: id.clone(),
            source,
        })?;
        Ok(Rng {
            id,
            source,
            queue_sizes: [QUEUE_SIZE],
            avail_features: VIRTIO_F_VERSION_1,
            acked_features: 0,
            activate_evt,
            active: None,
            registered: None,
            buf: vec![0u8; MAX_REQUEST],
            counters: RngCounters::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let c = &self.counters;
        BTreeMap::from([
            ("bytes", c.bytes),
            ("requests", c.requests),
            ("errors", c.errors),
        ])
    }

    /// Captures the device's own state. Call it only while the event loop is stopped.
    pub fn state(&self) -> RngState {
        RngState {
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            queue_sizes: self.queue_sizes.to_vec(),
            counters: self.counters,
        }
    }

    /// Loads `state` into a device built from the same configuration; on error the device is
    /// unchanged.
    pub fn restore(&mut self, state: &RngState) -> Result<(), RestoreError> {
        let device = format!("virtio-rng {}", self.id);
        super::check_restored_device(
            &device,
            (&self.queue_sizes, &state.queue_sizes),
            (self.avail_features, state.avail_features),
            state.acked_features,
        )?;
        self.acked_features = state.acked_features;
        self.counters = state.counters;
        Ok(())
    }

    fn sync_registrations(&mut self, ops: &mut EventOps) {
        if let Some(evt) = self.registered.take() {
            if let Err(e) = ops.remove(Events::with_data(evt.as_ref(), TOKEN_QUEUE, EventSet::IN)) {
                warn!("{}: cannot unregister the queue eventfd: {e:?}", self.id);
            }
        }
        if let Some(active) = &self.active {
            let evt = active.queue.notify.clone();
            match ops.add(Events::with_data(evt.as_ref(), TOKEN_QUEUE, EventSet::IN)) {
                Ok(()) => self.registered = Some(evt),
                Err(e) => error!("{}: cannot register the queue eventfd: {e:?}", self.id),
            }
        }
    }

    /// Fills every available chain, then interrupts the guest if it wants.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queue.queue;
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            self.counters.requests += 1;
            let len = match writable_segments(chain, mem) {
                Ok(segments) => fill(
                    &mut self.source,
                    &mut self.buf,
                    mem,
                    &segments,
                    &self.id,
                    &mut self.counters,
                ),
                Err(e) => {
                    warn!("{}: request {head} refused: {e}", self.id);
                    self.counters.errors += 1;
                    0
                }
            };
            match queue.add_used(mem, head, len) {
                Ok(()) => used_any = true,
                Err(e) => {
                    error!("{}: cannot add used element {head}: {e:?}", self.id);
                    break;
                }
            }
        }
        if used_any && super::driver_wants_interrupt(queue, mem) {
            if let Err(e) = active.interrupt.trigger(InterruptKind::Queue(0)) {
                error!("{}: cannot interrupt the guest: {e}", self.id);
            }
        }
    }
}

/// The device-writable buffers of a chain, checked to lie in guest memory; capacity beyond
/// [`MAX_REQUEST`] is left out.
fn writable_segments(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<(GuestAddress, usize)>, ChainError> {
    let mut out = Vec::new();
    let mut total = 0usize;
    let mut last_has_next = true;
    for desc in chain {
        if !desc.is_write_only() {
            return Err(ChainError::ReadOnly);
        }
        last_has_next = desc.has_next();
        let len = desc.len() as usize;
        if len != 0 && !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(ChainError::OutOfRange);
        }
        let len = len.min(MAX_REQUEST - total);
        if len > 0 {
            out.push((desc.addr(), len));
            total += len;
        }
    }
    if last_has_next {
        return Err(ChainError::Broken);
    }
    Ok(out)
}

/// Reads as many bytes as `segments` hold from `source` and writes them there; returns the
/// number written.
fn fill(
    source: &mut File,
    buf: &mut [u8],
    mem: &GuestMemoryMmap,
    segments: &[(GuestAddress, usize)],
    id: &str,
    counters: &mut RngCounters,
) -> u32 {
    let want: usize = segments.iter().map(|s| s.1).sum::<usize>().min(buf.len());
    let mut got = 0usize;
    while got < want {
        match source.read(&mut buf[got..want]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn!("{id}: cannot read the entropy source: {e}");
                counters.errors += 1;
                break;
            }
        }
    }
    if got < want {
        debug!("{id}: the entropy source gave {got} of {want} bytes");
    }
    let mut written = 0usize;
    for &(addr, len) in segments {
        if written == got {
            break;
        }
        let n = len.min(got - written);
        if mem.write_slice(&buf[written..written + n], addr).is_err() {
            // Checked in writable_segments; only a memory map change gets here.
            counters.errors += 1;
            break;
        }
        written += n;
    }
    counters.bytes += written as u64;
    u32::try_from(written).unwrap_or(u32::MAX)
}

impl VirtioDevice for Rng {
    virtio_device_basics!(VIRTIO_ID_RNG);

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No config space (5.4.4).
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
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
        let got = queues.len();
        let mut queues = queues.into_iter();
        let (Some(queue), None) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { got, want: 1 });
        };
        if !queue.queue.is_valid(&mem) {
            return Err(ActivateError::InvalidQueue(0));
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queue,
        });
        self.activate_evt.write(1).map_err(|e| {
            self.active = None;
            ActivateError::Device(format!("{}: cannot signal the event loop: {e}", self.id))
        })
    }

    fn active_queue_states(&self) -> Vec<VirtQueueState> {
        self.active.as_ref().map_or_else(Vec::new, |a| {
            vec![VirtQueueState::from(a.queue.queue.state())]
        })
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        if let Err(e) = self.activate_evt.write(1) {
            error!(
                "{}: cannot signal the event loop of the reset: {e}",
                self.id
            );
        }
    }
}

impl MutEventSubscriber for Rng {
    /// Joins a (new) event loop; a restored device also serves the requests queued before
    /// the snapshot.
    fn init(&mut self, ops: &mut EventOps) {
        self.registered = None;
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
                error!("{}: cannot schedule the restored queue: {e}", self.id);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.sync_registrations(ops);
                self.process_queue();
            }
            TOKEN_QUEUE => {
                if let Some(evt) = &self.registered {
                    let _ = evt.read();
                }
                self.process_queue();
            }
            other => warn!("{}: unexpected event token {other}", self.id),
        }
    }
}
