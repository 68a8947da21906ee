//! virtio-pmem (virtio 1.x, 5.19 PMEM Device): a file mapped into the guest's physical address
//! space as persistent memory, plus one request queue on which the driver asks the device to
//! make what it wrote there durable (FLUSH).
//!
//! Two parts:
//! - [`PmemBacking`] opens the file and maps it, `MAP_SHARED` (guest stores land in the file's
//!   page cache) or, with `discard_writes`, `MAP_PRIVATE` over a read-only descriptor (guest
//!   stores are copy-on-write pages of this process and never reach the file). The VMM
//!   registers [`PmemBacking::host_addr`] / [`PmemBacking::len`] as a KVM memory slot of its
//!   own at a guest address it chooses; the guest then reads and writes the region directly,
//!   without the device seeing any of it.
//! - [`Pmem`] is the virtio device: its config space says where the region is (`start`,
//!   `size`), and its queue serves FLUSH requests with `fdatasync` on the file.
//!
//! Size rules, as Cloud Hypervisor's: the size defaults to the file's; it must be a multiple of
//! 2 MiB ([`PMEM_ALIGNMENT`]); a directory as `file` needs an explicit size and gets an
//! anonymous temporary file in it. Unlike Cloud Hypervisor, a file smaller than `size` is
//! refused instead of mapped: guest accesses past its end would raise SIGBUS in the VMM.
//!
//! # Snapshot, migration and fault tolerance
//!
//! The region is not guest RAM: its contents are the file's, and [`PmemState`] carries only
//! the device's registers, its address and size. What the VMM must do with the contents:
//!
//! - **Snapshot** (writable, `MAP_SHARED`): call [`PmemBacking::sync`] after pausing the vCPUs
//!   so the file holds everything the guest stored; the snapshot refers to the file by its path
//!   (as a disk image) and does not copy it. Restoring requires that file unchanged since the
//!   snapshot, exactly as for a disk image; a VM resumed after the snapshot changes it.
//! - **Snapshot** (`discard_writes`): the guest's changes exist only in this process, as
//!   private copies of the pages it wrote. [`PmemBacking::private_pages`] lists them; save
//!   those pages with the snapshot (like guest RAM, but only those) and, on restore, map the
//!   same file and write them back through [`PmemBacking::write_at`] before any vCPU runs. An
//!   unchanged region (Kata mounts its rootfs read-only) costs nothing.
//! - **Live migration** (writable): the file must be shared storage the destination opens too.
//!   The source syncs at the final stop (after the vCPUs paused, before the destination's vCPUs
//!   run) so a destination on another host sees every store; the region's pages are not sent.
//! - **Live migration** (`discard_writes`): send the private pages like guest RAM: register the
//!   slot with dirty logging, send [`PmemBacking::private_pages`] in the first pass and the
//!   slot's dirty pages in later passes; the destination writes them into its own private
//!   mapping of the same file.
//! - **FT failover** (`discard_writes`, recommended and what Kata's rootfs uses): treat the
//!   region exactly like guest RAM: dirty logging on its slot, the private pages sent in the
//!   initial sync and its dirty pages shipped with each epoch into the backup's private
//!   mapping of the same file; after a failover the backup's region is the last committed
//!   epoch's.
//! - **FT failover** (writable): only when each host has its own copy of the file, identical
//!   when FT starts; then the region is again handled like RAM (dirty pages of committed epochs
//!   applied to the backup's mapping of its copy). A writable region on storage both hosts
//!   share cannot be protected: guest stores reach the shared file at once, past the output
//!   gate, so after a failover the backup would resume from an epoch whose memory predates
//!   stores already in the file. Enabling FT should refuse that configuration with an error.
//!
//! The region is a KVM slot only, not part of the devices' guest memory map (as in Cloud
//! Hypervisor): a virtio device asked to transfer data to or from it fails that request.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, MmapRegion, VolatileMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateError, ActiveQueue, InterruptKind, VirtQueueState, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::state::RestoreError;
use crate::GuestMemoryMmap;

/// Device ID from the virtio specification (5 Device Types).
pub const VIRTIO_ID_PMEM: u32 = 27;

/// Queue size, as Cloud Hypervisor's pmem device.
pub const QUEUE_SIZE: u16 = 256;

/// Region sizes and guest addresses are multiples of this (Cloud Hypervisor's rule; lets the
/// host back the region with huge pages).
pub const PMEM_ALIGNMENT: u64 = 2 << 20;

/// Request type (Driver Operations): make every completed write to the region durable.
pub const VIRTIO_PMEM_REQ_TYPE_FLUSH: u32 = 0;
/// Response values (Device Operations): 0 for success, -1 for failure. Linux treats any
/// nonzero value as an I/O error (Cloud Hypervisor answers 1).
pub const VIRTIO_PMEM_RESP_OK: u32 = 0;
pub const VIRTIO_PMEM_RESP_ERR: u32 = u32::MAX;

/// Bytes of `struct virtio_pmem_req` and `struct virtio_pmem_resp`.
const REQ_LEN: usize = 4;
const RESP_LEN: usize = 4;

/// Config space (Device configuration layout): start (le64), size (le64).
const CONFIG_LEN: usize = 16;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_QUEUE: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    #[error("cannot open persistent memory file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("persistent memory {path} is a directory but no size was given")]
    DirectoryWithoutSize { path: PathBuf },
    #[error(
        "cannot size the temporary persistent memory file in {path} to {size} bytes: {source}"
    )]
    SetLen {
        path: PathBuf,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot find the size of persistent memory file {path}: {source}")]
    FileSize {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("persistent memory file {path}: size {size} is not a multiple of 2MiB")]
    SizeNotAligned { path: PathBuf, size: u64 },
    #[error("persistent memory file {path}: the size is 0")]
    Empty { path: PathBuf },
    #[error("persistent memory file {path} is {file_size} bytes, smaller than the requested size {size}")]
    FileTooSmall {
        path: PathBuf,
        file_size: u64,
        size: u64,
    },
    #[error("persistent memory file {path}: size {size} does not fit the address space")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("cannot map persistent memory file {path} ({size} bytes): {source}")]
    Mmap {
        path: PathBuf,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot sync persistent memory file {path}: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("persistent memory file {path}: {len} bytes at offset {offset:#x} are past the region's {size} bytes")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error("cannot read this process's page map for persistent memory file {path}: {source}")]
    PageMap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("virtio-pmem {id}: guest address {addr:#x} is not a multiple of 2MiB")]
    AddressNotAligned { id: String, addr: u64 },
    #[error("virtio-pmem {id}: a region of {size} bytes at guest address {addr:#x} passes the end of the address space")]
    AddressOverflow { id: String, addr: u64, size: u64 },
    #[error("virtio-pmem {id}: cannot create an eventfd: {source}")]
    EventFd {
        id: String,
        #[source]
        source: io::Error,
    },
}

/// The file behind a pmem region and this process's mapping of it. The mapping is removed when
/// the backing is dropped: the VMM must delete its KVM memory slot first (it holds an `Arc` to
/// the backing for as long as the slot exists).
#[derive(Debug)]
pub struct PmemBacking {
    path: PathBuf,
    file: File,
    map: MmapRegion<()>,
    discard_writes: bool,
}

impl PmemBacking {
    /// Opens `path` (read-only when `discard_writes`) and maps `size` bytes of it, the file's
    /// size when `None`. A directory gets an unnamed temporary file of `size` bytes in it.
    pub fn open(
        path: impl AsRef<Path>,
        size: Option<u64>,
        discard_writes: bool,
    ) -> Result<PmemBacking, PmemError> {
        let path = path.as_ref().to_path_buf();
        let is_dir = path.is_dir();
        if is_dir && size.is_none() {
            return Err(PmemError::DirectoryWithoutSize { path });
        }
        let mut options = OpenOptions::new();
        // A temporary file must be writable to be sized; its mapping stays private with
        // discard_writes all the same.
        options.read(true).write(is_dir || !discard_writes);
        if is_dir {
            options.custom_flags(libc::O_TMPFILE);
        }
        let mut file = options.open(&path).map_err(|source| PmemError::Open {
            path: path.clone(),
            source,
        })?;
        if let (true, Some(size)) = (is_dir, size) {
            file.set_len(size).map_err(|source| PmemError::SetLen {
                path: path.clone(),
                size,
                source,
            })?;
        }
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let file_size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| PmemError::FileSize {
                path: path.clone(),
                source,
            })?;
        let size = size.unwrap_or(file_size);
        if size == 0 {
            return Err(PmemError::Empty { path });
        }
        if !size.is_multiple_of(PMEM_ALIGNMENT) {
            return Err(PmemError::SizeNotAligned { path, size });
        }
        if file_size < size {
            return Err(PmemError::FileTooSmall {
                path,
                file_size,
                size,
            });
        }
        let Ok(len) = usize::try_from(size) else {
            return Err(PmemError::TooLarge { path, size });
        };
        let mapped = file.try_clone().map_err(|source| PmemError::Open {
            path: path.clone(),
            source,
        })?;
        // Writable even over a read-only descriptor with MAP_PRIVATE: the guest's stores then
        // go to copy-on-write pages. NORESERVE: the region is file-backed, not swap-backed.
        let flags = libc::MAP_NORESERVE
            | if discard_writes {
                libc::MAP_PRIVATE
            } else {
                libc::MAP_SHARED
            };
        let map = MmapRegion::build(
            Some(FileOffset::new(mapped, 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(|source| PmemError::Mmap {
            path: path.clone(),
            size,
            source,
        })?;
        Ok(PmemBacking {
            path,
            file,
            map,
            discard_writes,
        })
    }

    /// Start of the mapping in this process: what the VMM gives KVM as `userspace_addr`.
    pub fn host_addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// Bytes mapped (the region's size, a multiple of [`PMEM_ALIGNMENT`]).
    pub fn len(&self) -> u64 {
        self.map.size() as u64
    }

    /// Always false: an empty backing is refused by [`PmemBacking::open`].
    pub fn is_empty(&self) -> bool {
        self.map.size() == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn discard_writes(&self) -> bool {
        self.discard_writes
    }

    /// Makes the guest's stores to a shared mapping durable in the file (they already are in
    /// its page cache, which `fdatasync` writes back along with the file's other dirty pages).
    /// With `discard_writes` nothing of the guest's reaches the file, so there is nothing to do.
    pub fn sync(&self) -> Result<(), PmemError> {
        if self.discard_writes {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| PmemError::Sync {
            path: self.path.clone(),
            source,
        })
    }

    /// The start of `len` bytes at `offset` as an index into the mapping, if they are in it.
    fn check_range(&self, offset: u64, len: usize) -> Result<usize, PmemError> {
        usize::try_from(offset)
            .ok()
            .filter(|start| {
                start
                    .checked_add(len)
                    .is_some_and(|end| end <= self.map.size())
            })
            .ok_or_else(|| self.out_of_range(offset, len))
    }

    /// Reads `buf.len()` bytes of the region (as the guest sees it) at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), PmemError> {
        let start = self.check_range(offset, buf.len())?;
        self.map
            .as_volatile_slice()
            .read_slice(buf, start)
            .map_err(|_| self.out_of_range(offset, buf.len()))
    }

    /// Writes `data` into the region at `offset`, as a guest store would: into the file's
    /// pages when shared, into private copies with `discard_writes`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), PmemError> {
        let start = self.check_range(offset, data.len())?;
        self.map
            .as_volatile_slice()
            .write_slice(data, start)
            .map_err(|_| self.out_of_range(offset, data.len()))
    }

    fn out_of_range(&self, offset: u64, len: usize) -> PmemError {
        PmemError::OutOfRange {
            path: self.path.clone(),
            offset,
            len,
            size: self.len(),
        }
    }

    /// Offsets (page-aligned, ascending) of the pages whose contents differ from the file's
    /// because the guest (or [`PmemBacking::write_at`]) wrote them: the private copy-on-write
    /// pages of a `discard_writes` mapping, resident or swapped out. Empty for a shared
    /// mapping, whose pages are the file's. Read from `/proc/self/pagemap`, whose flags need
    /// no privilege.
    pub fn private_pages(&self) -> Result<Vec<u64>, PmemError> {
        // pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE_OR_SHARED_ANON: u64 = 1 << 61;
        const CHUNK: usize = 512;
        if !self.discard_writes {
            return Ok(Vec::new());
        }
        let page_map_err = |source| PmemError::PageMap {
            path: self.path.clone(),
            source,
        };
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = u64::try_from(page)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| page_map_err(io::Error::last_os_error()))?;
        let pagemap = File::open("/proc/self/pagemap").map_err(page_map_err)?;
        let pages = self.len() / page;
        let first = self.host_addr() / page;
        let mut out = Vec::new();
        let mut raw = vec![0u8; CHUNK * 8];
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(CHUNK as u64) as usize;
            let buf = &mut raw[..n * 8];
            pagemap
                .read_exact_at(buf, (first + done) * 8)
                .map_err(page_map_err)?;
            for (i, entry) in buf.chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(entry);
                let entry = u64::from_ne_bytes(b);
                let private_resident = entry & PRESENT != 0 && entry & FILE_OR_SHARED_ANON == 0;
                // A file page is never swapped out (it is written back instead), so a swap
                // entry is a private copy.
                if private_resident || entry & SWAPPED != 0 {
                    out.push((done + i as u64) * page);
                }
            }
            done += n as u64;
        }
        Ok(out)
    }
}

/// Device counters (monotonic since creation; saved so they stay so across a migration).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PmemCounters {
    /// Chains taken from the queue.
    pub requests: u64,
    /// FLUSH requests answered (successfully or not).
    pub flushes: u64,
    /// Syncs of the backing (one serves every FLUSH taken in the same pass; with
    /// `discard_writes` there is nothing to write back).
    pub syncs: u64,
    /// Requests answered with an error (failed sync, unknown type, malformed request) or
    /// dropped (no room for a response, chain outside guest memory).
    pub errors: u64,
}

/// virtio-pmem's own saved state (the queue is in the transport's). Requests are served
/// synchronously on the stopped device loop, so none is in flight. The region's contents are
/// not here: see the module documentation for what a snapshot, a migration and a failover do
/// with them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PmemState {
    pub avail_features: u64,
    pub acked_features: u64,
    pub queue_sizes: Vec<u16>,
    /// Guest physical address and size of the region: the guest's driver has them, so the
    /// destination must place the region at the same address.
    pub start: u64,
    pub size: u64,
    pub discard_writes: bool,
    pub counters: PmemCounters,
}

/// A request as read from a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Flush,
    Unknown(u32),
    /// The chain's device-readable part is shorter than a request.
    TooShort,
    /// A device-readable descriptor follows a device-writable one (2.7.4.2).
    BadLayout,
}

/// Guest buffers `(address, length)`, in chain order.
type Segments = Vec<(GuestAddress, usize)>;

/// A chain taken from the queue, waiting for its answer.
struct Pending {
    head: u16,
    /// `None` when the chain itself is unusable (it is returned with a used length of 0).
    request: Option<Request>,
    /// Where the response goes; `None` when the chain has no room for one (it is returned
    /// unanswered, with a used length of 0).
    response: Option<Segments>,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: ActiveQueue,
}

/// A virtio-pmem device.
pub struct Pmem {
    id: String,
    backing: Arc<PmemBacking>,
    start: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    avail_features: u64,
    acked_features: u64,
    activate_evt: EventFd,
    active: Option<Active>,
    /// The queue eventfd the loop has registered.
    registered: Option<Arc<EventFd>>,
    counters: PmemCounters,
}

impl Pmem {
    /// A pmem device whose region, `backing`'s mapping, the VMM places at guest physical
    /// address `start` (a multiple of [`PMEM_ALIGNMENT`], outside guest RAM and every other
    /// region) as a KVM memory slot of its own.
    pub fn new(
        id: impl Into<String>,
        start: GuestAddress,
        backing: Arc<PmemBacking>,
    ) -> Result<Pmem, PmemError> {
        let id = id.into();
        let size = backing.len();
        if !start.0.is_multiple_of(PMEM_ALIGNMENT) {
            return Err(PmemError::AddressNotAligned { id, addr: start.0 });
        }
        if start.0.checked_add(size).is_none() {
            return Err(PmemError::AddressOverflow {
                id,
                addr: start.0,
                size,
            });
        }
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| PmemError::EventFd {
            id: id.clone(),
            source,
        })?;
        let mut config = [0u8; CONFIG_LEN];
        config[..8].copy_from_slice(&start.0.to_le_bytes());
        config[8..].copy_from_slice(&size.to_le_bytes());
        Ok(Pmem {
            id,
            backing,
            start: start.0,
            config,
            queue_sizes: [QUEUE_SIZE],
            avail_features: VIRTIO_F_VERSION_1,
            acked_features: 0,
            activate_evt,
            active: None,
            registered: None,
            counters: PmemCounters::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    pub fn backing(&self) -> &Arc<PmemBacking> {
        &self.backing
    }

    /// Guest physical address of the region.
    pub fn start(&self) -> GuestAddress {
        GuestAddress(self.start)
    }

    /// Says the region is at `start` from now on (the VMM moved its KVM slot there). Only
    /// before the guest runs: a restore places the region where the snapshot's guest had it.
    pub fn relocate(&mut self, start: GuestAddress) -> Result<(), PmemError> {
        let size = self.backing.len();
        if !start.0.is_multiple_of(PMEM_ALIGNMENT) {
            return Err(PmemError::AddressNotAligned {
                id: self.id.clone(),
                addr: start.0,
            });
        }
        if start.0.checked_add(size).is_none() {
            return Err(PmemError::AddressOverflow {
                id: self.id.clone(),
                addr: start.0,
                size,
            });
        }
        self.start = start.0;
        self.config[..8].copy_from_slice(&start.0.to_le_bytes());
        Ok(())
    }

    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let c = &self.counters;
        BTreeMap::from([
            ("requests", c.requests),
            ("flushes", c.flushes),
            ("syncs", c.syncs),
            ("errors", c.errors),
        ])
    }

    /// Captures the device's own state. Call it only while the event loop is stopped.
    pub fn state(&self) -> PmemState {
        PmemState {
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            queue_sizes: self.queue_sizes.to_vec(),
            start: self.start,
            size: self.backing.len(),
            discard_writes: self.backing.discard_writes(),
            counters: self.counters,
        }
    }

    /// Loads `state` into a device built from the same configuration (same region address,
    /// size and `discard_writes`); on error the device is unchanged.
    pub fn restore(&mut self, state: &PmemState) -> Result<(), RestoreError> {
        let device = format!("virtio-pmem {}", self.id);
        super::check_restored_device(
            &device,
            (&self.queue_sizes, &state.queue_sizes),
            (self.avail_features, state.avail_features),
            state.acked_features,
        )?;
        let (have, want) = (
            (
                self.start,
                self.backing.len(),
                self.backing.discard_writes(),
            ),
            (state.start, state.size, state.discard_writes),
        );
        if have != want {
            return Err(RestoreError::Inconsistent {
                device_type: VIRTIO_ID_PMEM,
                reason: format!(
                    "{device}: the region is at {:#x}, {} bytes, discard_writes={} but the \
                     snapshot's was at {:#x}, {} bytes, discard_writes={}",
                    have.0, have.1, have.2, want.0, want.1, want.2
                ),
            });
        }
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

    /// Answers every available chain, then interrupts the guest if it wants.
    ///
    /// The sync runs here, on the device event loop, and blocks the other devices' queues
    /// for as long as it takes (the file's dirty pages are written back). That is accepted
    /// for the same reason as virtio-blk's FLUSH, also served on the loop: requests are
    /// handled synchronously so that a stopped loop has nothing in flight and the saved
    /// state is complete, and the guest's driver issues FLUSH rarely (on fsync or a
    /// journal commit). One sync serves every FLUSH taken in the same pass.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queue.queue;
        let mut pending = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            self.counters.requests += 1;
            let head = chain.head_index();
            match parse(chain, mem) {
                Ok((request, response)) => pending.push(Pending {
                    head,
                    request: Some(request),
                    response,
                }),
                Err(e) => {
                    warn!("{}: request {head} dropped: {e}", self.id);
                    pending.push(Pending {
                        head,
                        request: None,
                        response: None,
                    });
                }
            }
        }
        if pending.is_empty() {
            return;
        }
        // Only a chain that can be answered gets its flush done (as Cloud Hypervisor does).
        let wants_sync = pending
            .iter()
            .any(|p| p.request == Some(Request::Flush) && p.response.is_some());
        let synced = wants_sync.then(|| {
            self.counters.syncs += 1;
            self.backing.sync().map_err(|e| {
                error!("{}: FLUSH failed: {e}", self.id);
            })
        });
        let mut used_any = false;
        for p in pending {
            let status = match p.request {
                Some(Request::Flush) => {
                    self.counters.flushes += 1;
                    match synced {
                        Some(Ok(())) => VIRTIO_PMEM_RESP_OK,
                        _ => VIRTIO_PMEM_RESP_ERR,
                    }
                }
                Some(Request::Unknown(t)) => {
                    debug!("{}: request {} has unknown type {t}", self.id, p.head);
                    VIRTIO_PMEM_RESP_ERR
                }
                Some(bad @ (Request::TooShort | Request::BadLayout)) => {
                    debug!("{}: request {} is malformed: {bad:?}", self.id, p.head);
                    VIRTIO_PMEM_RESP_ERR
                }
                None => VIRTIO_PMEM_RESP_ERR,
            };
            let len = match (&p.request, &p.response) {
                (Some(_), Some(segments)) => {
                    // Checked in parse; only a memory map change makes the write fail.
                    if write_segments(mem, segments, &status.to_le_bytes()) {
                        RESP_LEN as u32
                    } else {
                        0
                    }
                }
                (Some(_), None) => {
                    warn!("{}: request {} has no room for a response", self.id, p.head);
                    0
                }
                (None, _) => 0,
            };
            if status != VIRTIO_PMEM_RESP_OK || len == 0 {
                self.counters.errors += 1;
            }
            // A head the ring cannot take back (an index past the table) is only logged: the
            // chains after it in the batch still get their answers.
            match queue.add_used(mem, p.head, len) {
                Ok(()) => used_any = true,
                Err(e) => error!("{}: cannot add used element {}: {e:?}", self.id, p.head),
            }
        }
        if used_any && super::driver_wants_interrupt(queue, mem) {
            if let Err(e) = active.interrupt.trigger(InterruptKind::Queue(0)) {
                error!("{}: cannot interrupt the guest: {e}", self.id);
            }
        }
    }
}

/// Why a chain cannot be answered at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ChainError {
    #[error("the chain is cut short (loop, bad next index, bad indirect table)")]
    Broken,
    #[error("a descriptor lies outside guest memory")]
    OutOfRange,
}

/// Reads a chain's request from its device-readable part and finds room for the response in
/// its device-writable part, wherever the driver split them (any layout, 2.7.4).
fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<(Request, Option<Segments>), ChainError> {
    let mut req = [0u8; REQ_LEN];
    let mut req_got = 0usize;
    let mut writable = Vec::new();
    let mut writable_len = 0usize;
    let mut seen_writable = false;
    let mut bad_layout = false;
    let mut last_has_next = true;
    for desc in chain {
        last_has_next = desc.has_next();
        let len = desc.len() as usize;
        if len != 0 && !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(ChainError::OutOfRange);
        }
        if desc.is_write_only() {
            seen_writable = true;
            let take = len.min(RESP_LEN - writable_len);
            if take > 0 {
                writable.push((desc.addr(), take));
                writable_len += take;
            }
        } else if seen_writable {
            bad_layout = true;
        } else {
            let take = len.min(REQ_LEN - req_got);
            if take > 0 {
                mem.read_slice(&mut req[req_got..req_got + take], desc.addr())
                    .map_err(|_| ChainError::OutOfRange)?;
                req_got += take;
            }
        }
    }
    if last_has_next {
        return Err(ChainError::Broken);
    }
    let request = if bad_layout {
        Request::BadLayout
    } else if req_got < REQ_LEN {
        Request::TooShort
    } else {
        match u32::from_le_bytes(req) {
            VIRTIO_PMEM_REQ_TYPE_FLUSH => Request::Flush,
            t => Request::Unknown(t),
        }
    };
    let response = (writable_len == RESP_LEN).then_some(writable);
    Ok((request, response))
}

/// Writes `data` across `segments` (which hold exactly `data.len()` bytes).
fn write_segments(mem: &GuestMemoryMmap, segments: &[(GuestAddress, usize)], data: &[u8]) -> bool {
    let mut at = 0usize;
    for &(addr, len) in segments {
        let Some(part) = data.get(at..at + len) else {
            return false;
        };
        if mem.write_slice(part, addr).is_err() {
            return false;
        }
        at += len;
    }
    at == data.len()
}

impl VirtioDevice for Pmem {
    virtio_device_basics!(VIRTIO_ID_PMEM);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The config space is read-only for the driver.
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
        // The region keeps its contents across a reset: only the queue goes.
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

impl MutEventSubscriber for Pmem {
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
