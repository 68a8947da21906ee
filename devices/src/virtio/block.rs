//! virtio-blk (virtio 1.x, 5.2 Block Device) on a raw image file.
//!
//! Requests are handled on the device event loop thread. Activation arrives on a vCPU thread,
//! which cannot touch the event loop, so the device signals its own `activate_evt`; the loop then
//! (un)registers the queue notification eventfds to match the device's state. The same event
//! serves reset, so a driver can reset and re-activate the device any number of times.
//!
//! Writes leave through a [`DiskOutputGate`] (fault tolerance swaps in a holding gate for shared
//! disks). Reads pass through the same gate, which reads the image and patches in writes it still
//! holds, so the guest reads its own writes before their epoch commits. All guest memory access
//! goes through vm-memory, so device writes land in the dirty bitmap, and a malformed request can
//! only fail, never touch memory outside the guest's RAM or the request's own writable buffers.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, Le32, Le64};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateError, ActiveQueue, InterruptKind, VirtQueueState, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK,
};
use crate::gate::{DiskOutputGate, FileDiskGate, DIRECT_IO_ALIGN};
use crate::state::RestoreError;
use crate::GuestMemoryMmap;

/// Sector size of the virtio-blk protocol (capacity and request sectors are in these units).
pub const SECTOR_SIZE: u64 = 512;
/// Largest queue size virtio allows (2.7 Split Virtqueues).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Upper bound on `num_queues`: one event loop serves them all, more would only waste fds.
pub const MAX_QUEUES: usize = 64;

// Feature bits (5.2.3).
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;

// Request types (5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

// Request status values (5.2.6).
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Size of the config space we expose: up to and including `num_queues` (5.2.4).
const CONFIG_SIZE: usize = 36;

/// Bounce buffer size: requests are copied between the image and guest memory in pieces of
/// this size, so a request's size never decides how much the VMM allocates.
const CHUNK: usize = 256 * 1024;

/// `Events` data tag of the control eventfd; queue eventfds carry their queue index.
const CTRL_TOKEN: u32 = u32::MAX;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// Open the image with `O_DIRECT` (bypass the host page cache).
    pub direct: bool,
    /// The serial the guest reads with GET_ID (at most 20 bytes used); default: derived from the
    /// image's device and inode numbers.
    pub id: Option<String>,
    pub num_queues: usize,
    pub queue_size: u16,
    /// Open the image without taking its lock; the owner takes it with
    /// [`Block::reacquire_lock`] before the device runs (a migration destination prepares its
    /// devices while the source still holds the lock).
    pub defer_lock: bool,
}

impl BlockConfig {
    /// Cloud Hypervisor's defaults: writable, cached, one queue of 128 entries.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            readonly: false,
            direct: false,
            id: None,
            num_queues: 1,
            queue_size: 128,
            defer_lock: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image {0} does not exist")]
    NotFound(PathBuf),
    #[error("disk image {0}: permission denied opening it for writing (use readonly=on for a read-only image)")]
    WriteDenied(PathBuf),
    #[error("disk image {0}: permission denied")]
    ReadDenied(PathBuf),
    #[error("disk image {0}: the filesystem does not support direct=on (O_DIRECT)")]
    DirectUnsupported(PathBuf),
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot get the size of disk image {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("disk image {path} is {size} bytes, smaller than one 512-byte sector")]
    TooSmall { path: PathBuf, size: u64 },
    #[error("disk image {0} is locked by another process")]
    Locked(PathBuf),
    #[error("cannot lock disk image {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("invalid queue_size {0}: must be a power of two between 1 and 32768")]
    QueueSize(u16),
    #[error("invalid num_queues {0}: must be between 1 and 64")]
    NumQueues(usize),
    #[error("cannot create the block device's eventfd: {0}")]
    EventFd(io::Error),
}

/// The request header (5.2.6), read from the start of the chain.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct RequestHeader {
    type_: Le32,
    reserved: Le32,
    sector: Le64,
}

// SAFETY: `RequestHeader` is `repr(C)`, has no padding (4 + 4 + 8 bytes) and every bit pattern
// is a valid value of its fields.
unsafe impl ByteValued for RequestHeader {}

/// One descriptor of a request, as the guest described it.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u64,
    write: bool,
}

/// I/O counters; saved so that `vm.counters` stays monotonic across a migration.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockCounters {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

/// virtio-blk's own saved state (the queues are in the transport's).
///
/// There are no in-flight requests to save: requests are served synchronously on the device
/// event loop, which is stopped during a capture, so every request taken from a queue has
/// completed and its used entry is written; requests not taken yet are still in the avail ring
/// (guest memory) and are served after restore from the saved `next_avail`.
///
/// Not saved: the image path, file and gate (host resources, reopened from the destination's
/// configuration) and the config space (derived from capacity and queue settings, which are
/// checked instead).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// In 512-byte sectors; the reopened image must have the same (the guest sized its
    /// partitions and filesystems by it).
    pub capacity: u64,
    /// Checked: the driver negotiated against these (readonly, multi-queue).
    pub avail_features: u64,
    pub acked_features: u64,
    /// Checked: one entry per queue, each its maximum size.
    pub queue_sizes: Vec<u16>,
    /// The GET_ID serial the guest may have read; by default derived from the image's inode,
    /// which differs on the destination, so the saved one is kept.
    pub id: [u8; VIRTIO_BLK_ID_BYTES],
    pub counters: BlockCounters,
}

/// What the driver handed over on activation.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<ActiveQueue>,
}

/// The image side of the device, kept apart from the queues so both can be borrowed at once.
struct Disk {
    path: PathBuf,
    file: File,
    gate: Box<dyn DiskOutputGate>,
    capacity: u64,
    readonly: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    /// Over-allocated so that an aligned window of `CHUNK` bytes (for O_DIRECT) fits inside.
    bounce: Vec<u8>,
    bounce_start: usize,
    counters: BlockCounters,
}

/// A virtio-blk device backed by a raw image file.
pub struct Block {
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    config: [u8; CONFIG_SIZE],
    /// Written on activation and reset (vCPU thread); the event loop then syncs its fds.
    activate_evt: EventFd,
    active: Option<Active>,
    /// Queue eventfds currently registered with the event loop.
    registered: Vec<Arc<EventFd>>,
}

impl Block {
    pub fn new(cfg: BlockConfig) -> Result<Self, BlockError> {
        if cfg.queue_size == 0
            || cfg.queue_size > MAX_QUEUE_SIZE
            || !cfg.queue_size.is_power_of_two()
        {
            return Err(BlockError::QueueSize(cfg.queue_size));
        }
        if cfg.num_queues == 0 || cfg.num_queues > MAX_QUEUES {
            return Err(BlockError::NumQueues(cfg.num_queues));
        }
        let path = cfg.path.clone();
        let mut file = open_image(&path, cfg.readonly, cfg.direct)?;
        // Seeking to the end works for block devices too, where metadata reports 0 bytes.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        if size < SECTOR_SIZE {
            return Err(BlockError::TooSmall { path, size });
        }
        if !cfg.defer_lock {
            lock_image(&file, &path, cfg.readonly)?;
        }
        let capacity = size / SECTOR_SIZE;
        let id = disk_id(&file, cfg.id.as_deref());
        let gate_file = file.try_clone().map_err(|source| BlockError::Open {
            path: path.clone(),
            source,
        })?;
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?;

        let mut avail_features =
            VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
        if cfg.readonly {
            avail_features |= VIRTIO_BLK_F_RO;
        }
        if cfg.num_queues > 1 {
            avail_features |= VIRTIO_BLK_F_MQ;
        }
        let mut config = [0u8; CONFIG_SIZE];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // size_max (8..12) stays 0: no limit on a segment's size.
        // seg_max: the chain also carries the header and the status descriptors.
        let seg_max = u32::from(cfg.queue_size).saturating_sub(2).max(1);
        config[12..16].copy_from_slice(&seg_max.to_le_bytes());
        // geometry (16..20) stays 0: not offered.
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // topology (24..32) and writeback (32) are not offered.
        config[34..36].copy_from_slice(&(cfg.num_queues as u16).to_le_bytes());

        let bounce = vec![0u8; CHUNK + DIRECT_IO_ALIGN];
        let bounce_start = bounce.as_ptr().align_offset(DIRECT_IO_ALIGN);
        Ok(Self {
            disk: Disk {
                path,
                file,
                gate: Box::new(FileDiskGate::new(gate_file, cfg.direct)),
                capacity,
                readonly: cfg.readonly,
                id,
                bounce,
                bounce_start,
                counters: BlockCounters::default(),
            },
            avail_features,
            acked_features: 0,
            queue_sizes: vec![cfg.queue_size; cfg.num_queues],
            config,
            activate_evt,
            active: None,
            registered: Vec::new(),
        })
    }

    /// Replaces the output gate (fault tolerance installs its holding gate), returning the old one.
    pub fn set_output_gate(&mut self, gate: Box<dyn DiskOutputGate>) -> Box<dyn DiskOutputGate> {
        std::mem::replace(&mut self.disk.gate, gate)
    }

    /// Gives up the image lock so that a migration's destination can take it. The VM must stay
    /// paused until the destination has it, or until [`Block::reacquire_lock`] after a failed
    /// hand-off.
    pub fn release_lock(&self) -> Result<(), BlockError> {
        // SAFETY: flock on a file descriptor we own; it touches no memory.
        if unsafe { libc::flock(self.disk.file.as_raw_fd(), libc::LOCK_UN) } != 0 {
            return Err(BlockError::Lock {
                path: self.disk.path.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Takes the image lock back after a hand-off that did not happen; fails if another process
    /// holds it now (then this VM must not run again).
    pub fn reacquire_lock(&self) -> Result<(), BlockError> {
        lock_image(&self.disk.file, &self.disk.path, self.disk.readonly)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    /// The image this device serves.
    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the device is activated (and not reset since).
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// I/O counters (Cloud Hypervisor's `vm.counters` keys for a disk).
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let c = &self.disk.counters;
        BTreeMap::from([
            ("read_bytes", c.read_bytes),
            ("write_bytes", c.write_bytes),
            ("read_ops", c.read_ops),
            ("write_ops", c.write_ops),
        ])
    }

    /// Captures the device's own state. Call it only while the event loop is stopped.
    pub fn state(&self) -> BlockState {
        BlockState {
            capacity: self.disk.capacity,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            queue_sizes: self.queue_sizes.clone(),
            id: self.disk.id,
            counters: self.disk.counters,
        }
    }

    /// Loads `state` into a device built from the same configuration, after checking that the
    /// reopened image and the configuration match what the guest knew. The queues come back
    /// through the transport's restore (which activates the device); the order of the two
    /// calls does not matter. On error the device is unchanged.
    pub fn restore(&mut self, state: &BlockState) -> Result<(), RestoreError> {
        let device = format!("virtio-blk {}", self.disk.path.display());
        if state.capacity != self.disk.capacity {
            return Err(RestoreError::Capacity {
                path: self.disk.path.clone(),
                have: self.disk.capacity,
                want: state.capacity,
            });
        }
        super::check_restored_device(
            &device,
            (&self.queue_sizes, &state.queue_sizes),
            (self.avail_features, state.avail_features),
            state.acked_features,
        )?;
        self.acked_features = state.acked_features;
        self.disk.id = state.id;
        self.disk.counters = state.counters;
        Ok(())
    }

    /// Makes the registered queue eventfds match the device state: none when inactive, the
    /// active queues' otherwise. Idempotent, so the order in which activation and reset
    /// signals are seen does not matter.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.registered.drain(..).enumerate() {
            if let Err(e) = ops.remove(Events::with_data(evt.as_ref(), i as u32, EventSet::IN)) {
                log::warn!("virtio-blk: cannot unregister queue {i} eventfd: {e:?}");
            }
        }
        let Some(active) = &self.active else {
            return;
        };
        for (i, q) in active.queues.iter().enumerate() {
            match ops.add(Events::with_data(q.notify.as_ref(), i as u32, EventSet::IN)) {
                Ok(()) => self.registered.push(q.notify.clone()),
                Err(e) => {
                    log::error!(
                        "virtio-blk {}: cannot register queue {i} eventfd: {e:?}",
                        self.disk.path.display()
                    );
                    // Keep indices aligned with queue numbers for later removal.
                    break;
                }
            }
        }
    }

    /// Serves every available request of queue `index`, then interrupts the guest if it wants.
    fn process_queue(&mut self, index: usize) {
        let Some(active) = &mut self.active else {
            return;
        };
        let Some(aq) = active.queues.get_mut(index) else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        while let Some(chain) = aq.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used_len = self.disk.handle(mem, chain);
            if let Err(e) = aq.queue.add_used(mem, head, used_len) {
                log::warn!("virtio-blk: cannot add used entry {head}: {e}");
                break;
            }
            used_any = true;
        }
        if !used_any {
            return;
        }
        if super::driver_wants_interrupt(&mut aq.queue, mem) {
            if let Err(e) = active.interrupt.trigger(InterruptKind::Queue(index as u16)) {
                log::warn!("virtio-blk: cannot interrupt the guest: {e}");
            }
        }
    }
}

fn open_image(path: &Path, readonly: bool, direct: bool) -> Result<File, BlockError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(!readonly);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => BlockError::NotFound(path.to_owned()),
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem if !readonly => {
            BlockError::WriteDenied(path.to_owned())
        }
        io::ErrorKind::PermissionDenied => BlockError::ReadDenied(path.to_owned()),
        _ if direct && source.raw_os_error() == Some(libc::EINVAL) => {
            BlockError::DirectUnsupported(path.to_owned())
        }
        _ => BlockError::Open {
            path: path.to_owned(),
            source,
        },
    })
}

/// Advisory lock: exclusive for a writer, shared for readers, so two VMMs (a primary and a
/// confused backup, say) can never write one image at the same time.
fn lock_image(file: &File, path: &Path, readonly: bool) -> Result<(), BlockError> {
    let op = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    } | libc::LOCK_NB;
    // SAFETY: flock on a file descriptor we own; it touches no memory.
    let ret = unsafe { libc::flock(file.as_raw_fd(), op) };
    if ret == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(BlockError::Locked(path.to_owned()))
    } else {
        Err(BlockError::Lock {
            path: path.to_owned(),
            source,
        })
    }
}

/// The GET_ID serial: the configured id, or one derived from where the image lives.
fn disk_id(file: &File, id: Option<&str>) -> [u8; VIRTIO_BLK_ID_BYTES] {
    let text = match (id, file.metadata()) {
        (Some(id), _) => id.to_owned(),
        (None, Ok(m)) => format!("{:x}{:x}{:x}", m.dev(), m.rdev(), m.ino()),
        (None, Err(_)) => String::new(),
    };
    let mut out = [0u8; VIRTIO_BLK_ID_BYTES];
    let n = text.len().min(VIRTIO_BLK_ID_BYTES);
    out[..n].copy_from_slice(&text.as_bytes()[..n]);
    out
}

/// A request that cannot be served: the status byte says why.
struct Failed(u8);

impl Disk {
    /// Serves one request; returns the number of bytes written to guest memory (the used
    /// length). Never fails: a bad request is reported to the guest through its status byte, or
    /// dropped with used length 0 when it has no writable status byte.
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        // The chain iterator stops at loops (it yields at most queue-size descriptors), at
        // descriptors outside the table and at chains longer than 4 GiB in total. A chain cut
        // short that way ends in a descriptor that still says NEXT: its real status byte is
        // unknown, so nothing is written and the request is dropped.
        let mut truncated = false;
        let mut segs: Vec<Segment> = chain
            .map(|d| {
                truncated = d.has_next();
                Segment {
                    addr: d.addr(),
                    len: u64::from(d.len()),
                    write: d.is_write_only(),
                }
            })
            .collect();
        if truncated {
            log::debug!("virtio-blk: malformed descriptor chain dropped");
            return 0;
        }

        // The status byte is the last byte of the last descriptor, which must be writable.
        let Some(status_addr) = segs.last_mut().and_then(|last| {
            if !last.write || last.len == 0 {
                return None;
            }
            last.len -= 1;
            last.addr.checked_add(last.len)
        }) else {
            log::debug!("virtio-blk: request without a writable status byte dropped");
            return 0;
        };
        if !GuestMemoryBackend::check_range(mem, status_addr, 1) {
            log::debug!("virtio-blk: request status byte outside guest memory dropped");
            return 0;
        }

        let mut written = 0u64;
        let status = match self.execute(mem, &segs, &mut written) {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(Failed(s)) => s,
        };
        if mem.write_obj(status, status_addr).is_err() {
            return 0;
        }
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[Segment],
        written: &mut u64,
    ) -> Result<(), Failed> {
        const IOERR: Failed = Failed(VIRTIO_BLK_S_IOERR);
        // Device-readable descriptors come first, then device-writable ones (2.7.4.2).
        let first_write = segs.iter().position(|s| s.write).unwrap_or(segs.len());
        if segs[first_write..].iter().any(|s| !s.write) {
            return Err(IOERR);
        }
        let (readable, writable) = segs.split_at(first_write);
        let mut readable = SegCursor::new(readable);

        let mut header = RequestHeader::default();
        readable
            .read_exact(mem, header.as_mut_slice())
            .map_err(|_| IOERR)?;
        let sector = header.sector.to_native();
        match header.type_.to_native() {
            VIRTIO_BLK_T_IN => {
                if readable.remaining() != 0 {
                    return Err(IOERR);
                }
                let len = self.check_data(mem, writable, sector)?;
                self.read(mem, writable, sector, len, written)
            }
            VIRTIO_BLK_T_OUT => {
                let data = readable.rest();
                // Only the status byte may be writable.
                if self.readonly || writable.iter().any(|s| s.len != 0) {
                    return Err(IOERR);
                }
                let len = self.check_data(mem, &data, sector)?;
                self.write(mem, &data, sector, len)
            }
            VIRTIO_BLK_T_FLUSH => self.gate.flush().map_err(|e| {
                log::warn!("virtio-blk {}: flush failed: {e}", self.path.display());
                IOERR
            }),
            VIRTIO_BLK_T_GET_ID => {
                if readable.remaining() != 0 || !in_memory(mem, writable) {
                    return Err(IOERR);
                }
                let mut out = SegCursor::new(writable);
                let n = out.write_all(mem, &self.id).map_err(|_| IOERR)?;
                *written += n;
                Ok(())
            }
            _ => Err(Failed(VIRTIO_BLK_S_UNSUPP)),
        }
    }

    /// Checks data buffers of an IN/OUT request: in guest memory, whole sectors, within the
    /// disk. Returns the data length in bytes.
    fn check_data(
        &self,
        mem: &GuestMemoryMmap,
        data: &[Segment],
        sector: u64,
    ) -> Result<u64, Failed> {
        let len: u64 = data.iter().map(|s| s.len).sum();
        let end = sector.checked_add(len / SECTOR_SIZE);
        // A mask: `is_multiple_of` is newer than the workspace's minimum Rust version.
        if len & (SECTOR_SIZE - 1) != 0
            || end.is_none_or(|end| end > self.capacity)
            || !in_memory(mem, data)
        {
            return Err(Failed(VIRTIO_BLK_S_IOERR));
        }
        Ok(len)
    }

    fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        data: &[Segment],
        sector: u64,
        len: u64,
        written: &mut u64,
    ) -> Result<(), Failed> {
        let mut out = SegCursor::new(data);
        let mut offset = sector * SECTOR_SIZE;
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let buf = &mut self.bounce[self.bounce_start..self.bounce_start + n];
            // Through the gate: a holding gate patches in writes it has not released yet, so
            // the guest reads what it wrote. The image read fills the aligned bounce buffer, as
            // O_DIRECT needs.
            let file = &self.file;
            let res = self
                .gate
                .read_through(offset, buf, &mut |b| file.read_exact_at(b, offset));
            if let Err(e) = res {
                log::warn!(
                    "virtio-blk {}: read at {offset} failed: {e}",
                    self.path.display()
                );
                return Err(Failed(VIRTIO_BLK_S_IOERR));
            }
            let copied = out
                .write_all(mem, buf)
                .map_err(|_| Failed(VIRTIO_BLK_S_IOERR))?;
            *written += copied;
            offset += n as u64;
            left -= n as u64;
        }
        self.counters.read_ops += 1;
        self.counters.read_bytes += len;
        Ok(())
    }

    fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        data: &[Segment],
        sector: u64,
        len: u64,
    ) -> Result<(), Failed> {
        let mut input = SegCursor::new(data);
        let mut offset = sector * SECTOR_SIZE;
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let buf = &mut self.bounce[self.bounce_start..self.bounce_start + n];
            input
                .read_exact(mem, buf)
                .map_err(|_| Failed(VIRTIO_BLK_S_IOERR))?;
            if let Err(e) = self.gate.write_at(offset, buf) {
                log::warn!(
                    "virtio-blk {}: write at {offset} failed: {e}",
                    self.path.display()
                );
                return Err(Failed(VIRTIO_BLK_S_IOERR));
            }
            offset += n as u64;
            left -= n as u64;
        }
        self.counters.write_ops += 1;
        self.counters.write_bytes += len;
        Ok(())
    }
}

/// Whether every segment lies entirely in guest memory.
fn in_memory(mem: &GuestMemoryMmap, segs: &[Segment]) -> bool {
    segs.iter().all(|s| {
        s.len == 0
            || usize::try_from(s.len)
                .is_ok_and(|len| GuestMemoryBackend::check_range(mem, s.addr, len))
    })
}

/// A position in a list of guest buffers, consumed front to back.
struct SegCursor<'a> {
    segs: &'a [Segment],
    /// Bytes already consumed of `segs[0]`.
    offset: u64,
}

impl<'a> SegCursor<'a> {
    fn new(segs: &'a [Segment]) -> Self {
        Self { segs, offset: 0 }
    }

    fn remaining(&self) -> u64 {
        self.segs.iter().map(|s| s.len).sum::<u64>() - self.offset
    }

    /// The unconsumed buffers (the first one trimmed).
    fn rest(&self) -> Vec<Segment> {
        let mut out: Vec<Segment> = self.segs.to_vec();
        if let Some(first) = out.first_mut() {
            first.addr = first.addr.unchecked_add(self.offset);
            first.len -= self.offset;
        }
        out
    }

    /// Calls `f(addr, start, n)` for consecutive pieces until `len` bytes are consumed or the
    /// buffers run out; returns the bytes consumed.
    fn walk(
        &mut self,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), ()>,
    ) -> Result<u64, ()> {
        let mut done = 0usize;
        while done < len {
            let Some(seg) = self.segs.first() else {
                break;
            };
            let avail = seg.len - self.offset;
            if avail == 0 {
                self.segs = &self.segs[1..];
                self.offset = 0;
                continue;
            }
            let n = usize::try_from(avail).unwrap_or(usize::MAX).min(len - done);
            let addr = seg.addr.checked_add(self.offset).ok_or(())?;
            f(addr, done, n)?;
            done += n;
            self.offset += n as u64;
        }
        Ok(done as u64)
    }

    /// Fills `buf` from guest memory; fails when the buffers hold fewer bytes.
    fn read_exact(&mut self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Result<(), ()> {
        let len = buf.len();
        let got = self.walk(len, |addr, start, n| {
            mem.read_slice(&mut buf[start..start + n], addr)
                .map_err(|_| ())
        })?;
        if got == len as u64 {
            Ok(())
        } else {
            Err(())
        }
    }

    /// Writes as much of `buf` as the buffers hold into guest memory; returns the bytes written.
    fn write_all(&mut self, mem: &GuestMemoryMmap, buf: &[u8]) -> Result<u64, ()> {
        self.walk(buf.len(), |addr, start, n| {
            mem.write_slice(&buf[start..start + n], addr)
                .map_err(|_| ())
        })
    }
}

impl VirtioDevice for Block {
    virtio_device_basics!(VIRTIO_ID_BLOCK);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE, not offered.
        log::debug!("virtio-blk: ignored config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: self.queue_sizes.len(),
            });
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        self.activate_evt.write(1).map_err(|e| {
            self.active = None;
            ActivateError::Device(format!("cannot signal the device event loop: {e}"))
        })
    }

    fn active_queue_states(&self) -> Vec<VirtQueueState> {
        self.active.as_ref().map_or_else(Vec::new, |a| {
            a.queues
                .iter()
                .map(|q| VirtQueueState::from(q.queue.state()))
                .collect()
        })
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        // The event loop unregisters the queue eventfds when it sees this; until then, queue
        // events find no active queues and are ignored.
        if let Err(e) = self.activate_evt.write(1) {
            log::warn!("virtio-blk: cannot signal reset to the event loop: {e}");
        }
    }
}

impl MutEventSubscriber for Block {
    /// Joins a (new) event loop. A device restored from a snapshot, or one whose loop was
    /// replaced, is already active: its queue eventfds are registered here, and the control
    /// event is signalled so that the first loop iteration serves the requests the guest queued
    /// before the snapshot (their notifications went to the source's eventfds and are lost).
    fn init(&mut self, ops: &mut EventOps) {
        // Registrations of an earlier loop belong to that loop's epoll, not this one.
        self.registered.clear();
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            CTRL_TOKEN,
            EventSet::IN,
        )) {
            log::error!(
                "virtio-blk {}: cannot register with the event loop: {e:?}",
                self.disk.path.display()
            );
        }
        if self.active.is_some() {
            self.sync_registrations(ops);
            if let Err(e) = self.activate_evt.write(1) {
                log::warn!(
                    "virtio-blk {}: cannot schedule the restored queues: {e}",
                    self.disk.path.display()
                );
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == CTRL_TOKEN {
            let _ = self.activate_evt.read();
            self.sync_registrations(ops);
            // Buffers the driver queued before the loop saw the activation.
            let queues = self.active.as_ref().map_or(0, |a| a.queues.len());
            for i in 0..queues {
                self.process_queue(i);
            }
            return;
        }
        let index = token as usize;
        if let Some(evt) = self.registered.get(index) {
            // Non-blocking: an already drained eventfd just returns EAGAIN.
            let _ = evt.read();
        }
        self.process_queue(index);
    }
}
