//! Replicated disks: the initial copy of each image to the backup, drive-mirror style.
//!
//! In replicated mode each host has its own image, and epochs ship only the writes made after
//! protection began. Before that the backup's image must equal the primary's, whatever it held
//! (nothing, zeros, a stale copy, a shorter file). So, inside the initial synchronisation:
//!
//! 1. every disk's [`DiskWriteLog`] starts tracking written blocks ([`BLOCK_SIZE`]) before
//!    anything is read, so that no write can slip between the copy and the tracking;
//! 2. the whole image is sent while the guest runs: `DiskSyncStart`, then chunk by chunk
//!    ([`CHUNK_SIZE`]) the data as DiskWrites frames; holes (found with `SEEK_DATA`, not read)
//!    and all-zero chunks go as `DiskZero` ranges, so that a stale backup image is zeroed
//!    there too;
//! 3. the blocks written meanwhile are re-read and re-sent, pass after pass, until few remain;
//! 4. with the VM paused, the last written blocks, then `DiskSyncDone` with a digest; the
//!    backup answers the sync epoch's EpochEnd with Ack only if its digest matches.
//!
//! # The digest
//!
//! Both sides keep a table, one entry per chunk: the (truncated) SHA-256 of the chunk's content,
//! or zero for an all-zero chunk. The primary sets an entry each time it reads the chunk to
//! send all or part of it (the full pass, and each chunk holding a re-sent block); the backup
//! sets it each time it writes into the chunk, by reading the chunk back from its own image
//! (a chunk wholly zeroed by `DiskZero` is set to zero without reading). The digest is a SHA-256
//! over the image size, the chunk size and the table in chunk order. No side reads the whole
//! image at the end, so the final pause costs only the last dirty chunks.
//!
//! Why the entries agree when the copy is right: a block is marked dirty only after its write
//! reached the image, so a chunk read after taking the marks holds every write whose mark was
//! taken, and any later write is re-sent (and its chunk re-read) in a later pass; the last
//! pass runs paused. So the primary's final entry for a chunk is the hash of the content the
//! backup was last sent for each of its blocks. The check catches data lost, altered or
//! misplaced between the primary's reads and the backup's image (a frame not applied, a bad
//! write, a stale region never sent); it does not re-read the primary's image, so a write that
//! bypassed the tracking is not caught.
//!
//! # Hooking it up
//!
//! Primary (`Primary::initial_sync`, replicated mode only), with `send` =
//! `|kind, payload| sender.send_frame(kind, payload)`:
//!
//! 1. after Hello and Params, before `live::precopy`: pause the VM (`ft_gates` wants the device
//!    loop stopped), `let gates = vm.device_manager_mut().ft_gates(0)?`, resume; then
//!    `let mut disks = DiskSync::start(paths.zip(gates.disk_logs.clone()))?` (`paths`: the
//!    image paths of `config.disks`, in order: the i-th block device owns `disk_logs[i]`)
//!    and `disks.copy_live(&mut send)?`;
//! 2. `live::precopy` as today, then `disks.catch_up(&mut send)?`, then `vm.pause()`;
//! 3. paused, after the last memory pass and before `send_state`:
//!    `disks.finish_paused(&mut send)?` (last dirty blocks, `DiskSyncDone`; stops tracking);
//! 4. the rest as today: State, EpochEnd, wait for the Ack (a digest mismatch arrives as the
//!    backup's Error frame, so `initial_sync` fails and protection is refused), then
//!    `log.take(); log.set_recording(true)` while still paused: no write can fall between
//!    the last dirty-block read and the start of recording.
//!
//! On any failure drop the [`DiskSync`]: it stops the tracking.
//!
//! Backup (`backup.rs`), replicated mode:
//!
//! 1. open the images read-write (`OpenOptions::new().read(true).write(true)`): the backup
//!    reads back what it writes;
//! 2. while `initial`, make a [`ReplicaSet`] from clones of the image files; apply disk frames
//!    at once, not buffered into the pending epoch: a DiskWrites frame goes to
//!    [`ReplicaSet::apply_disk_writes`], a Control message first to
//!    [`ReplicaSet::apply_control`] (`Ok(true)`: it was a disk-sync message, done);
//! 3. at the initial EpochEnd, before committing and acknowledging:
//!    [`ReplicaSet::verify_all`]; an error goes back as the Error frame (as other stream
//!    errors do) and the backup gives up. After the initial sync the disk-sync messages are
//!    unexpected, and DiskWrites are buffered per epoch as today.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use devices::gate::{DiskWriteLog, RecordedWrite};
use sha2::{Digest, Sha256};
use vmm::migration::protocol::{FrameType, ProtocolError};

use crate::wire::{decode_disk_writes, encode_disk_writes, Control, DiskWrite, WireError};

/// Granularity of the digest table and of the reads of the full pass, for images up to 1 TiB.
/// A re-sent block costs a read of its whole chunk (to refresh the entry), so smaller is
/// cheaper in the final pause; larger images get larger chunks so that the table keeps to
/// [`TARGET_CHUNKS`] entries (17 bytes each) on both sides.
pub const CHUNK_SIZE: u64 = 256 << 10;
/// Most digest-table entries the primary chooses to keep for one image.
pub const TARGET_CHUNKS: u64 = 1 << 22;
/// Granularity of dirty-block tracking: a written block is re-sent whole.
pub const BLOCK_SIZE: u64 = 64 << 10;
/// Data gathered before a DiskWrites frame is sent (below the frame limit).
const BATCH_BYTES: usize = 8 << 20;
/// Adjacent zero ranges are merged up to this size, so that a long run of allocated zeros
/// (read, not skipped) still yields a frame every so often and the backup hears from us.
const ZERO_RUN_MAX: u64 = 256 << 20;
/// Chunk sizes a backup accepts.
const MIN_CHUNK: u64 = 4 << 10;
const MAX_CHUNK: u64 = 16 << 20;
/// Most table entries a backup allocates (the size comes off the wire).
const MAX_CHUNKS: u64 = 1 << 26;
/// The backup flushes its image after this many bytes, so the flush at the end (in the
/// primary's pause) stays short.
const FLUSH_EVERY: u64 = 256 << 20;
/// Live passes over dirty blocks before giving up on converging (the rest go in the pause).
const LIVE_PASSES_MAX: usize = 10;
/// A live pass that finds at most this many dirty blocks ends the live phase.
const LIVE_SMALL_BLOCKS: usize = 64;
const DIGEST_DOMAIN: &[u8] = b"tandem disk image digest v1";

/// One digest-table entry: 128 bits detect any accidental difference and halve the table.
type Entry = [u8; 16];
const ZERO_ENTRY: Entry = [0; 16];

#[derive(Debug, thiserror::Error)]
pub enum DiskSyncError {
    #[error("disk {disk}: cannot open image {}: {source}", path.display())]
    Open {
        disk: u32,
        path: PathBuf,
        source: io::Error,
    },
    #[error("disk {disk}: cannot find the image size: {source}")]
    Size { disk: u32, source: io::Error },
    #[error("disk {disk}: reading {len} bytes at {offset}: {source}")]
    Read {
        disk: u32,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("disk {disk}: writing {len} bytes at {offset}: {source}")]
    Write {
        disk: u32,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("disk {disk}: cannot resize the image to {size} bytes: {source}")]
    Resize {
        disk: u32,
        size: u64,
        source: io::Error,
    },
    #[error(
        "disk {disk}: the backup's block device holds {have} bytes, the primary's image {need}"
    )]
    TooSmall { disk: u32, have: u64, need: u64 },
    #[error("disk {disk}: an image of {size} bytes in chunks of {chunk_size} is not supported")]
    Geometry {
        disk: u32,
        size: u64,
        chunk_size: u64,
    },
    #[error("disk {disk}: flushing the image: {source}")]
    Flush { disk: u32, source: io::Error },
    #[error("disk {disk}: sending the image: {source}")]
    Send { disk: u32, source: ProtocolError },
    #[error("disk {disk}: {what} before the image copy started")]
    NotStarted { disk: u32, what: &'static str },
    #[error("disk {disk}: {len} bytes at {offset} run past the image end ({size} bytes)")]
    OutOfRange {
        disk: u32,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error(
        "disk {disk}: the copy ended with {missing} chunks never sent (the first: chunk {first})"
    )]
    Incomplete { disk: u32, missing: u64, first: u64 },
    #[error(
        "disk {disk}: the backup's image differs from the primary's (digest {backup}, the \
         primary's {primary}); it cannot be protected"
    )]
    DigestMismatch {
        disk: u32,
        primary: String,
        backup: String,
    },
    #[error("disk {disk}: the VM has {count} disks")]
    NoSuchDisk { disk: u32, count: usize },
    #[error("disk {disk}: the image copy did not finish")]
    NotVerified { disk: u32 },
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// What one side has done so far, for status and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Bytes sent (primary) or written (backup) as data.
    pub data_bytes: u64,
    /// Bytes sent (primary) or applied (backup) as zero ranges.
    pub zero_bytes: u64,
    /// Bytes read from the image (primary: to send; backup: read back).
    pub read_bytes: u64,
}

/// The per-chunk digest table both sides keep (see the module documentation).
struct DigestTable {
    size: u64,
    chunk: u64,
    entries: Vec<Option<Entry>>,
}

impl DigestTable {
    fn new(disk: u32, size: u64, chunk: u64) -> Result<Self, DiskSyncError> {
        let geometry = || DiskSyncError::Geometry {
            disk,
            size,
            chunk_size: chunk,
        };
        if !chunk.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
            return Err(geometry());
        }
        let count = size.div_ceil(chunk);
        if count > MAX_CHUNKS {
            return Err(geometry());
        }
        let count = usize::try_from(count).map_err(|_| geometry())?;
        let mut entries = Vec::new();
        // A table we cannot allocate is an error to report, not a reason to abort.
        entries.try_reserve_exact(count).map_err(|_| geometry())?;
        entries.resize(count, None);
        Ok(Self {
            size,
            chunk,
            entries,
        })
    }

    /// Byte offset and length of chunk `index`.
    fn span(&self, index: u64) -> (u64, u64) {
        let start = index * self.chunk;
        (start, self.chunk.min(self.size - start))
    }

    fn count(&self) -> u64 {
        self.entries.len() as u64
    }

    fn set(&mut self, index: u64, entry: Entry) {
        if let Some(e) = usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get_mut(i))
        {
            *e = Some(entry);
        }
    }

    /// The digest (hex), or the chunks that never got an entry: (count, first).
    fn digest(&self) -> Result<String, (u64, u64)> {
        let mut missing = self.entries.iter().enumerate().filter(|(_, e)| e.is_none());
        if let Some((first, _)) = missing.next() {
            return Err((missing.count() as u64 + 1, first as u64));
        }
        let mut h = Sha256::new();
        h.update(DIGEST_DOMAIN);
        h.update(self.size.to_le_bytes());
        h.update(self.chunk.to_le_bytes());
        for entry in self.entries.iter().flatten() {
            h.update(entry);
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

fn is_zero(data: &[u8]) -> bool {
    // OR-ing fixed-size blocks lets the compiler vectorise the test.
    let mut blocks = data.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

fn chunk_entry(data: &[u8]) -> Entry {
    if is_zero(data) {
        return ZERO_ENTRY;
    }
    let full = Sha256::digest(data);
    let mut entry = [0u8; 16];
    entry.copy_from_slice(&full[..16]);
    entry
}

/// The digest chunk size the primary uses for an image of `size` bytes.
pub fn chunk_size_for(size: u64) -> u64 {
    let mut chunk = CHUNK_SIZE;
    while size.div_ceil(chunk) > TARGET_CHUNKS && chunk < MAX_CHUNK {
        chunk *= 2;
    }
    chunk
}

/// Size of an image: seeking to the end works for block devices too (their metadata says 0).
/// This moves the file offset; nothing here uses it (all I/O is positional).
fn image_size(disk: u32, mut file: &File) -> Result<u64, DiskSyncError> {
    file.seek(SeekFrom::End(0))
        .map_err(|source| DiskSyncError::Size { disk, source })
}

/// The size of the image at `path` (a file or a block device).
pub fn image_size_of(disk: u32, path: &Path) -> Result<u64, DiskSyncError> {
    let file = File::open(path).map_err(|source| DiskSyncError::Size { disk, source })?;
    image_size(disk, &file)
}

/// Gives the backup's image of `disk` the primary's `size` before its block device is built
/// (the guest must see the same capacity after failover): a regular file is extended or cut,
/// a block device must be large enough. `size` comes off the wire and is checked first.
pub fn size_image(disk: u32, file: &File, size: u64) -> Result<(), DiskSyncError> {
    DigestTable::new(disk, size, chunk_size_for(size))?;
    let have = image_size(disk, file)?;
    let is_block = file
        .metadata()
        .map_err(|source| DiskSyncError::Size { disk, source })?
        .file_type()
        .is_block_device();
    if let Some(new_size) = resize_plan(disk, is_block, have, size)? {
        file.set_len(new_size)
            .map_err(|source| DiskSyncError::Resize {
                disk,
                size: new_size,
                source,
            })?;
    }
    Ok(())
}

/// The first offset at or after `from` that holds data; `None` when only a hole follows.
fn next_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    let from =
        libc::off_t::try_from(from).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor that `file` owns and keeps open for the call; it touches no
    // memory. It moves the file offset, which the positional reads here do not use.
    let found = unsafe { libc::lseek(file.as_raw_fd(), from, libc::SEEK_DATA) };
    if found >= 0 {
        return Ok(Some(found as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Frames of one disk on their way out: zero ranges merged, data batched.
struct Outbox<'s, S> {
    disk: u32,
    send: &'s mut S,
    zero: Option<(u64, u64)>,
    batch: Vec<RecordedWrite>,
    batch_bytes: usize,
    stats: SyncStats,
}

impl<'s, S> Outbox<'s, S>
where
    S: FnMut(FrameType, &[u8]) -> Result<(), ProtocolError>,
{
    fn new(disk: u32, send: &'s mut S) -> Self {
        Self {
            disk,
            send,
            zero: None,
            batch: Vec::new(),
            batch_bytes: 0,
            stats: SyncStats::default(),
        }
    }

    fn frame(&mut self, kind: FrameType, payload: &[u8]) -> Result<(), DiskSyncError> {
        (self.send)(kind, payload).map_err(|source| DiskSyncError::Send {
            disk: self.disk,
            source,
        })
    }

    fn control(&mut self, c: &Control) -> Result<(), DiskSyncError> {
        self.frame(FrameType::Control, &c.encode())
    }

    fn zero(&mut self, start: u64, end: u64) -> Result<(), DiskSyncError> {
        self.stats.zero_bytes += end - start;
        if let Some((s, e)) = self.zero {
            if e == start && end - s <= ZERO_RUN_MAX {
                self.zero = Some((s, end));
                return Ok(());
            }
            self.flush_zero()?;
        }
        self.zero = Some((start, end));
        Ok(())
    }

    fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskSyncError> {
        self.stats.data_bytes += data.len() as u64;
        self.batch_bytes += data.len();
        self.batch.push(RecordedWrite {
            offset,
            data: data.to_vec(),
        });
        if self.batch_bytes >= BATCH_BYTES {
            self.flush_data()?;
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<(), DiskSyncError> {
        if let Some((start, end)) = self.zero.take() {
            self.control(&Control::DiskZero {
                disk: self.disk,
                offset: start,
                len: end - start,
            })?;
        }
        Ok(())
    }

    fn flush_data(&mut self) -> Result<(), DiskSyncError> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        for frame in encode_disk_writes(self.disk, &batch) {
            self.frame(FrameType::DiskWrites, &frame)?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<SyncStats, DiskSyncError> {
        self.flush_zero()?;
        self.flush_data()?;
        Ok(self.stats)
    }
}

/// The primary's side of one image: sends it whole, then its dirty blocks, then the digest.
pub struct ImageMirror {
    disk: u32,
    file: File,
    table: DigestTable,
    full_done: bool,
    /// Cleared when the file system cannot find data (`SEEK_DATA`): then everything is read.
    seek_data: bool,
    buf: Vec<u8>,
    stats: SyncStats,
}

impl ImageMirror {
    /// Opens image `path` of disk `disk` read-only, with a file offset of its own.
    pub fn open(disk: u32, path: &Path) -> Result<Self, DiskSyncError> {
        let file = File::open(path).map_err(|source| DiskSyncError::Open {
            disk,
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(disk, file)
    }

    /// Mirrors `file` (disk `disk`), whose size is taken now. It moves the file offset: give it
    /// a descriptor of its own, not a clone of the block device's.
    pub fn new(disk: u32, file: File) -> Result<Self, DiskSyncError> {
        let size = image_size(disk, &file)?;
        Ok(Self {
            disk,
            file,
            table: DigestTable::new(disk, size, chunk_size_for(size))?,
            full_done: false,
            seek_data: true,
            buf: Vec::new(),
            stats: SyncStats::default(),
        })
    }

    pub fn disk(&self) -> u32 {
        self.disk
    }

    pub fn size(&self) -> u64 {
        self.table.size
    }

    pub fn stats(&self) -> SyncStats {
        self.stats
    }

    /// Reads chunk `index` into the buffer and records its entry.
    fn read_chunk(&mut self, index: u64) -> Result<(), DiskSyncError> {
        let (start, len) = self.table.span(index);
        // `len` is at most MAX_CHUNK.
        self.buf.resize(len as usize, 0);
        self.file
            .read_exact_at(&mut self.buf, start)
            .map_err(|source| DiskSyncError::Read {
                disk: self.disk,
                offset: start,
                len,
                source,
            })?;
        self.stats.read_bytes += len;
        self.table.set(index, chunk_entry(&self.buf));
        Ok(())
    }

    fn add(&mut self, stats: SyncStats) {
        self.stats.data_bytes += stats.data_bytes;
        self.stats.zero_bytes += stats.zero_bytes;
    }

    /// Sends `DiskSyncStart` and the whole image: data chunks as DiskWrites, holes and all-zero
    /// chunks as `DiskZero`. Dirty-block tracking must already be on.
    pub fn send_full<S>(&mut self, send: &mut S) -> Result<(), DiskSyncError>
    where
        S: FnMut(FrameType, &[u8]) -> Result<(), ProtocolError>,
    {
        let mut out = Outbox::new(self.disk, send);
        out.control(&Control::DiskSyncStart {
            disk: self.disk,
            size: self.table.size,
            chunk_size: self.table.chunk,
        })?;
        let count = self.table.count();
        let mut index = 0;
        while index < count {
            let (start, len) = self.table.span(index);
            if self.seek_data {
                let hole_until = match next_data(&self.file, start) {
                    Ok(None) => Some(count),
                    // At least this chunk, even if the file grew past the size taken.
                    Ok(Some(at)) if at >= start + len => {
                        Some((at / self.table.chunk).clamp(index + 1, count))
                    }
                    Ok(Some(_)) => None,
                    Err(e) => {
                        log::debug!(
                            "disk {}: SEEK_DATA unusable ({e}), reading it all",
                            self.disk
                        );
                        self.seek_data = false;
                        None
                    }
                };
                if let Some(until) = hole_until {
                    // Chunks without any data read as zeros: no need to read them.
                    for i in index..until {
                        self.table.set(i, ZERO_ENTRY);
                    }
                    let end = self.table.span(until - 1);
                    out.zero(start, end.0 + end.1)?;
                    index = until;
                    continue;
                }
            }
            self.read_chunk(index)?;
            if is_zero(&self.buf) {
                out.zero(start, start + len)?;
            } else {
                out.data(start, &self.buf)?;
            }
            index += 1;
        }
        let stats = out.finish()?;
        self.add(stats);
        self.full_done = true;
        Ok(())
    }

    /// Re-reads and sends blocks `blocks` (indexes of `block_size`-byte blocks, as
    /// [`DiskWriteLog::take_dirty_blocks`] gives them), all-zero ones as `DiskZero`. Each
    /// chunk holding one is read whole once, to refresh its digest entry.
    pub fn send_blocks<S>(
        &mut self,
        blocks: &[u64],
        block_size: u64,
        send: &mut S,
    ) -> Result<(), DiskSyncError>
    where
        S: FnMut(FrameType, &[u8]) -> Result<(), ProtocolError>,
    {
        if !self.full_done {
            return Err(DiskSyncError::NotStarted {
                disk: self.disk,
                what: "dirty blocks",
            });
        }
        let block_size = block_size.max(1);
        let size = self.table.size;
        // Byte ranges, merged, within the image (a block past the end cannot have been
        // written by the guest).
        let mut sorted = blocks.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for b in sorted {
            let Some(start) = b.checked_mul(block_size).filter(|&s| s < size) else {
                break;
            };
            let end = start.saturating_add(block_size).min(size);
            match ranges.last_mut() {
                Some((_, e)) if *e >= start => *e = (*e).max(end),
                _ => ranges.push((start, end)),
            }
        }
        // Pieces of those ranges, each within one chunk, grouped by chunk.
        let chunk = self.table.chunk;
        let mut pieces: Vec<(u64, u64, u64)> = Vec::new();
        for (mut start, end) in ranges {
            while start < end {
                let index = start / chunk;
                let piece_end = end.min((index + 1) * chunk);
                pieces.push((index, start, piece_end));
                start = piece_end;
            }
        }
        let mut out = Outbox::new(self.disk, send);
        let mut at = 0;
        while at < pieces.len() {
            let index = pieces[at].0;
            // One read per chunk, before its pieces are cut from it.
            self.read_chunk(index)?;
            let chunk_start = index * chunk;
            while at < pieces.len() && pieces[at].0 == index {
                let (_, start, end) = pieces[at];
                let data = &self.buf[(start - chunk_start) as usize..(end - chunk_start) as usize];
                if is_zero(data) {
                    out.zero(start, end)?;
                } else {
                    out.data(start, data)?;
                }
                at += 1;
            }
        }
        let stats = out.finish()?;
        self.add(stats);
        Ok(())
    }

    /// The digest of the image as sent (hex), once the full pass is done.
    pub fn digest(&self) -> Result<String, DiskSyncError> {
        if !self.full_done {
            return Err(DiskSyncError::NotStarted {
                disk: self.disk,
                what: "the digest",
            });
        }
        self.table
            .digest()
            .map_err(|(missing, first)| DiskSyncError::Incomplete {
                disk: self.disk,
                missing,
                first,
            })
    }

    /// Sends `DiskSyncDone` with the digest, and returns the digest. The last dirty blocks
    /// must have been sent, with the VM paused.
    pub fn send_done<S>(&mut self, send: &mut S) -> Result<String, DiskSyncError>
    where
        S: FnMut(FrameType, &[u8]) -> Result<(), ProtocolError>,
    {
        let digest = self.digest()?;
        Outbox::new(self.disk, send).control(&Control::DiskSyncDone {
            disk: self.disk,
            digest: digest.clone(),
        })?;
        Ok(digest)
    }
}

/// The primary's copy of all its replicated disks, with their dirty-block tracking. Dropping it
/// stops the tracking.
pub struct DiskSync {
    disks: Vec<(ImageMirror, DiskWriteLog)>,
}

impl DiskSync {
    /// Starts tracking the writes of each disk, then opens its image. `disks`: the image path
    /// and write log of each disk, in disk order (the index is the disk number on the wire).
    pub fn start(
        disks: impl IntoIterator<Item = (PathBuf, DiskWriteLog)>,
    ) -> Result<Self, DiskSyncError> {
        let mut sync = Self { disks: Vec::new() };
        for ((path, log), disk) in disks.into_iter().zip(0u32..) {
            // Tracking first: a write between the open and the first read must be seen.
            log.start_tracking(BLOCK_SIZE);
            match ImageMirror::open(disk, &path) {
                Ok(mirror) => sync.disks.push((mirror, log)),
                Err(e) => {
                    log.stop_tracking();
                    return Err(e);
                }
            }
        }
        Ok(sync)
    }

    /// While the guest runs: every image whole, then passes over the blocks written meanwhile
    /// until few are left (or enough passes were made).
    pub fn copy_live<S>(&mut self, send: &mut S) -> Result<(), DiskSyncError>
    where
        S: FnMut(FrameType, &[u8]) -> Result<(), ProtocolError>,
    {
        for (mirror, _) in &mut self.disks {
            mirror.send_full(send)?;
        }
        for _ in 0..LIVE_PASSES_MAX {
            let mut most = 0;
            for (mirror, log) in &mut self.disks {
                let dirty = log.take_dirty_blocks();
                most = most.max(dirty.len());
                let block_size = log.tracking_block_size().unwrap_or(BLOCK_SIZE);
                mirror.send_blocks(&dirty, block_size, send)?;
            }
            if most <= LIVE_SMALL_BLOCKS {
                break;
            }
        }
        Ok(())
    }

    /// While the guest runs: one more pass over the written blocks (after the memory
    /// pre-copy, just before the pause, to keep the pause short).
    pub fn catch_up<S>(&mut self, send: &mut S) -> Result<(), DiskSyncError>
    where
        S: FnMut(FrameType, &[u8]) -> Result<(), ProtocolError>,
    {
        for (mirror, log) in &mut self.disks {
            let dirty = log.take_dirty_blocks();
            let block_size = log.tracking_block_size().unwrap_or(BLOCK_SIZE);
            mirror.send_blocks(&dirty, block_size, send)?;
        }
        Ok(())
    }

    /// With the VM paused and the device loop stopped: the last written blocks, then
    /// `DiskSyncDone` for each disk. Stops the tracking. Returns each disk's digest.
    pub fn finish_paused<S>(&mut self, send: &mut S) -> Result<Vec<String>, DiskSyncError>
    where
        S: FnMut(FrameType, &[u8]) -> Result<(), ProtocolError>,
    {
        self.catch_up(send)?;
        let mut digests = Vec::with_capacity(self.disks.len());
        for (mirror, log) in &mut self.disks {
            digests.push(mirror.send_done(send)?);
            log.stop_tracking();
        }
        Ok(digests)
    }

    /// What was sent, per disk.
    pub fn stats(&self) -> Vec<SyncStats> {
        self.disks.iter().map(|(m, _)| m.stats()).collect()
    }
}

impl Drop for DiskSync {
    fn drop(&mut self) {
        for (_, log) in &self.disks {
            log.stop_tracking();
        }
    }
}

/// The backup's state of one image's copy.
struct Applying {
    table: DigestTable,
    unflushed: u64,
}

/// The backup's side of one image: applies the copy and checks the digest.
pub struct ImageReplica {
    disk: u32,
    file: File,
    applying: Option<Applying>,
    verified: Option<String>,
    buf: Vec<u8>,
    stats: SyncStats,
}

/// What to do with the backup's image before the copy: a regular file takes the primary's
/// size exactly (the guest must see the same capacity after failover); a block device cannot
/// change size and must be large enough.
fn resize_plan(
    disk: u32,
    is_block: bool,
    have: u64,
    need: u64,
) -> Result<Option<u64>, DiskSyncError> {
    match (is_block, have.cmp(&need)) {
        (_, std::cmp::Ordering::Equal) => Ok(None),
        (true, std::cmp::Ordering::Less) => Err(DiskSyncError::TooSmall { disk, have, need }),
        (true, std::cmp::Ordering::Greater) => {
            log::warn!(
                "disk {disk}: the backup's block device holds {have} bytes, the primary's image \
                 {need}; the rest is not copied"
            );
            Ok(None)
        }
        (false, _) => Ok(Some(need)),
    }
}

/// Writes zeros over `offset .. offset + len` (where holes cannot be punched).
fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(CHUNK_SIZE) as usize];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = (end - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Deallocates `offset .. offset + len` so that it reads as zeros, keeping the size.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let bad = || io::Error::from_raw_os_error(libc::EINVAL);
    let offset = libc::off_t::try_from(offset).map_err(|_| bad())?;
    let len = libc::off_t::try_from(len).map_err(|_| bad())?;
    // SAFETY: fallocate on a descriptor that `file` owns and keeps open for the call; it
    // touches no memory.
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl ImageReplica {
    /// `file`: the backup's image of disk `disk`, open for reading and writing.
    pub fn new(disk: u32, file: File) -> Self {
        Self {
            disk,
            file,
            applying: None,
            verified: None,
            buf: Vec::new(),
            stats: SyncStats::default(),
        }
    }

    /// Opens image `path` of disk `disk` for reading and writing.
    pub fn open(disk: u32, path: &Path) -> Result<Self, DiskSyncError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| DiskSyncError::Open {
                disk,
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self::new(disk, file))
    }

    /// The digest the copy ended with, once it matched the primary's.
    pub fn verified(&self) -> Option<&str> {
        self.verified.as_deref()
    }

    pub fn stats(&self) -> SyncStats {
        self.stats
    }

    /// `DiskSyncStart`: sizes the image and starts a new copy (forgetting an earlier one).
    pub fn start(&mut self, size: u64, chunk_size: u64) -> Result<(), DiskSyncError> {
        let disk = self.disk;
        // The table first: it checks the size and chunk size that came off the wire.
        let table = DigestTable::new(disk, size, chunk_size)?;
        size_image(disk, &self.file, size)?;
        self.applying = Some(Applying {
            table,
            unflushed: 0,
        });
        self.verified = None;
        self.stats = SyncStats::default();
        Ok(())
    }

    fn applying(&mut self, what: &'static str) -> Result<&mut Applying, DiskSyncError> {
        let disk = self.disk;
        self.applying
            .as_mut()
            .ok_or(DiskSyncError::NotStarted { disk, what })
    }

    fn check_range(
        &mut self,
        offset: u64,
        len: u64,
        what: &'static str,
    ) -> Result<(), DiskSyncError> {
        let disk = self.disk;
        let size = self.applying(what)?.table.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(DiskSyncError::OutOfRange {
                disk,
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    /// Reads chunk `index` back from the image and records its entry.
    fn rehash(&mut self, index: u64) -> Result<(), DiskSyncError> {
        let disk = self.disk;
        let Some(applying) = self.applying.as_mut() else {
            return Err(DiskSyncError::NotStarted {
                disk,
                what: "a digest entry",
            });
        };
        let (start, len) = applying.table.span(index);
        self.buf.resize(len as usize, 0);
        self.file
            .read_exact_at(&mut self.buf, start)
            .map_err(|source| DiskSyncError::Read {
                disk,
                offset: start,
                len,
                source,
            })?;
        self.stats.read_bytes += len;
        applying.table.set(index, chunk_entry(&self.buf));
        Ok(())
    }

    /// Flushes the image once enough was written, so the last flush stays short.
    fn wrote(&mut self, bytes: u64) -> Result<(), DiskSyncError> {
        let disk = self.disk;
        let applying = self.applying("data")?;
        applying.unflushed += bytes;
        if applying.unflushed >= FLUSH_EVERY {
            applying.unflushed = 0;
            self.file
                .sync_data()
                .map_err(|source| DiskSyncError::Flush { disk, source })?;
        }
        Ok(())
    }

    /// `DiskZero`: makes the range read as zeros.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), DiskSyncError> {
        self.check_range(offset, len, "a zero range")?;
        if len == 0 {
            return Ok(());
        }
        let disk = self.disk;
        if let Err(e) = punch_hole(&self.file, offset, len) {
            // Not every file system or device can deallocate; zeros written do the same.
            log::debug!("disk {disk}: cannot punch a hole ({e}), writing zeros");
            write_zeros(&self.file, offset, len).map_err(|source| DiskSyncError::Write {
                disk,
                offset,
                len,
                source,
            })?;
            self.wrote(len)?;
        }
        self.stats.zero_bytes += len;
        let end = offset + len;
        let chunk = self.applying("a zero range")?.table.chunk;
        let (first, last) = (offset / chunk, (end - 1) / chunk);
        for index in first..=last {
            let applying = self.applying("a zero range")?;
            let (start, chunk_len) = applying.table.span(index);
            if offset <= start && start + chunk_len <= end {
                // Wholly zeroed: no need to read it back.
                applying.table.set(index, ZERO_ENTRY);
            } else {
                self.rehash(index)?;
            }
        }
        Ok(())
    }

    /// Data of the copy (one DiskWrites frame): written, then each chunk touched read back.
    pub fn apply_writes(&mut self, writes: &[DiskWrite]) -> Result<(), DiskSyncError> {
        let disk = self.disk;
        let chunk = self.applying("data")?.table.chunk;
        for w in writes {
            self.check_range(w.offset, w.data.len() as u64, "data")?;
        }
        let mut touched = BTreeSet::new();
        for w in writes.iter().filter(|w| !w.data.is_empty()) {
            let len = w.data.len() as u64;
            self.file
                .write_all_at(&w.data, w.offset)
                .map_err(|source| DiskSyncError::Write {
                    disk,
                    offset: w.offset,
                    len,
                    source,
                })?;
            self.stats.data_bytes += len;
            self.wrote(len)?;
            touched.extend(w.offset / chunk..=(w.offset + len - 1) / chunk);
        }
        for index in touched {
            self.rehash(index)?;
        }
        Ok(())
    }

    /// `DiskSyncDone`: flushes the image and compares the digests.
    pub fn finish(&mut self, primary: &str) -> Result<(), DiskSyncError> {
        let disk = self.disk;
        let applying = self.applying("the end of the copy")?;
        let digest =
            applying
                .table
                .digest()
                .map_err(|(missing, first)| DiskSyncError::Incomplete {
                    disk,
                    missing,
                    first,
                })?;
        self.file
            .sync_all()
            .map_err(|source| DiskSyncError::Flush { disk, source })?;
        if digest != primary {
            return Err(DiskSyncError::DigestMismatch {
                disk,
                primary: primary.to_string(),
                backup: digest,
            });
        }
        self.applying = None;
        self.verified = Some(digest);
        Ok(())
    }
}

/// The backup's replicated disks during the initial synchronisation.
pub struct ReplicaSet {
    replicas: Vec<ImageReplica>,
}

impl ReplicaSet {
    /// `files`: the backup's images in disk order, open for reading and writing.
    pub fn new(files: Vec<File>) -> Self {
        Self {
            replicas: files
                .into_iter()
                .zip(0u32..)
                .map(|(f, disk)| ImageReplica::new(disk, f))
                .collect(),
        }
    }

    fn replica(&mut self, disk: u32) -> Result<&mut ImageReplica, DiskSyncError> {
        let count = self.replicas.len();
        usize::try_from(disk)
            .ok()
            .and_then(|i| self.replicas.get_mut(i))
            .ok_or(DiskSyncError::NoSuchDisk { disk, count })
    }

    /// Applies a disk-sync Control message: `Ok(true)` if it was one, `Ok(false)` if the
    /// message is something else (left to the caller).
    pub fn apply_control(&mut self, control: &Control) -> Result<bool, DiskSyncError> {
        match control {
            Control::DiskSyncStart {
                disk,
                size,
                chunk_size,
            } => self.replica(*disk)?.start(*size, *chunk_size)?,
            Control::DiskZero { disk, offset, len } => self.replica(*disk)?.zero(*offset, *len)?,
            Control::DiskSyncDone { disk, digest } => self.replica(*disk)?.finish(digest)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Applies one DiskWrites payload of the copy.
    pub fn apply_disk_writes(&mut self, payload: &[u8]) -> Result<(), DiskSyncError> {
        let (disk, writes) = decode_disk_writes(payload)?;
        self.replica(disk)?.apply_writes(&writes)
    }

    /// Every disk was copied and its digest matched.
    pub fn verify_all(&self) -> Result<(), DiskSyncError> {
        for (disk, r) in (0u32..).zip(&self.replicas) {
            if r.verified.is_none() {
                return Err(DiskSyncError::NotVerified { disk });
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> Vec<SyncStats> {
        self.replicas.iter().map(|r| r.stats()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::gate::{DiskOutputGate, FileDiskGate, RecordingDiskGate};
    use std::sync::atomic::{AtomicU64, Ordering};

    type Frames = Vec<(FrameType, Vec<u8>)>;

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "disk-sync-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const MIB: u64 = 1 << 20;
    /// Not a multiple of the chunk size: the last chunk is short.
    const SIZE: u64 = 6 * MIB + 12_345;

    fn rw(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap()
    }

    /// A sparse source: a hole, data, a run of written zeros, a hole, data in the short tail.
    fn sparse_source(path: &Path) {
        let f = rw(path);
        f.set_len(SIZE).unwrap();
        f.write_all_at(&[0x11; 5000], MIB + 100).unwrap();
        f.write_all_at(&vec![0; 2 * MIB as usize], 2 * MIB).unwrap();
        f.write_all_at(&[0x22; 3000], 4 * MIB - 1500).unwrap();
        f.write_all_at(&[0x33; 345], SIZE - 345).unwrap();
    }

    fn file_of(path: &Path, len: u64, byte: u8) {
        let f = rw(path);
        f.set_len(0).unwrap();
        if len > 0 {
            f.write_all_at(&vec![byte; len as usize], 0).unwrap();
        }
    }

    fn collect(
        frames: &mut Frames,
    ) -> impl FnMut(FrameType, &[u8]) -> Result<(), ProtocolError> + '_ {
        move |kind, payload| {
            frames.push((kind, payload.to_vec()));
            Ok(())
        }
    }

    fn apply(set: &mut ReplicaSet, frames: &[(FrameType, Vec<u8>)]) -> Result<(), DiskSyncError> {
        for (kind, payload) in frames {
            match kind {
                FrameType::Control => {
                    let c = Control::decode(payload)?;
                    assert!(set.apply_control(&c)?, "not a disk-sync message: {c:?}");
                }
                FrameType::DiskWrites => set.apply_disk_writes(payload)?,
                other => panic!("unexpected {other} frame"),
            }
        }
        Ok(())
    }

    fn data_bytes(frames: &[(FrameType, Vec<u8>)]) -> u64 {
        frames
            .iter()
            .filter(|(k, _)| *k == FrameType::DiskWrites)
            .flat_map(|(_, p)| decode_disk_writes(p).unwrap().1)
            .map(|w| w.data.len() as u64)
            .sum()
    }

    fn same_content(a: &Path, b: &Path) {
        let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        assert_eq!(a.len(), b.len(), "sizes differ");
        if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("images differ at byte {at}");
        }
    }

    /// Full copy of a static image to a backup image, checked byte for byte.
    fn copy_static(dir: &TempDir, backup: &Path) -> (Frames, SyncStats) {
        let source = dir.path("source");
        sparse_source(&source);
        let mut mirror = ImageMirror::open(0, &source).unwrap();
        let mut frames = Frames::new();
        mirror.send_full(&mut collect(&mut frames)).unwrap();
        let digest = mirror.send_done(&mut collect(&mut frames)).unwrap();
        assert_eq!(digest.len(), 64);
        let mut set = ReplicaSet::new(vec![rw(backup)]);
        assert!(matches!(
            set.verify_all(),
            Err(DiskSyncError::NotVerified { disk: 0 })
        ));
        apply(&mut set, &frames).unwrap();
        set.verify_all().unwrap();
        assert_eq!(set.replicas[0].verified(), Some(digest.as_str()));
        same_content(&source, backup);
        (frames, mirror.stats())
    }

    #[test]
    fn a_sparse_image_reaches_a_blank_backup_without_its_zeros() {
        let dir = TempDir::new();
        let backup = dir.path("backup");
        file_of(&backup, 0, 0);
        let (frames, stats) = copy_static(&dir, &backup);
        // Data lives in one chunk at 1 MiB, two around 4 MiB and the short last one; the
        // written zeros from 2 MiB and the holes are not sent.
        let sent = data_bytes(&frames);
        assert_eq!(sent, stats.data_bytes);
        assert_eq!(sent, 3 * CHUNK_SIZE + 12_345);
        assert_eq!(stats.data_bytes + stats.zero_bytes, SIZE);
        assert!(stats.read_bytes < SIZE, "holes are not read");
    }

    #[test]
    fn a_stale_backup_full_of_garbage_ends_identical() {
        let dir = TempDir::new();
        let backup = dir.path("backup");
        file_of(&backup, SIZE, 0xAA);
        copy_static(&dir, &backup);
    }

    #[test]
    fn a_shorter_backup_is_extended_and_a_longer_one_cut() {
        let dir = TempDir::new();
        let backup = dir.path("backup");
        file_of(&backup, MIB + 7, 0xAA);
        copy_static(&dir, &backup);
        file_of(&backup, SIZE + 3 * MIB, 0xAA);
        copy_static(&dir, &backup);
        assert_eq!(std::fs::metadata(&backup).unwrap().len(), SIZE);
    }

    #[test]
    fn without_seek_data_everything_is_read_and_still_elided() {
        let dir = TempDir::new();
        let (source, backup) = (dir.path("source"), dir.path("backup"));
        sparse_source(&source);
        file_of(&backup, SIZE, 0xAA);
        let mut mirror = ImageMirror::open(0, &source).unwrap();
        mirror.seek_data = false;
        let mut frames = Frames::new();
        mirror.send_full(&mut collect(&mut frames)).unwrap();
        mirror.send_done(&mut collect(&mut frames)).unwrap();
        assert_eq!(mirror.stats().read_bytes, SIZE);
        assert_eq!(data_bytes(&frames), 3 * CHUNK_SIZE + 12_345);
        let mut set = ReplicaSet::new(vec![rw(&backup)]);
        apply(&mut set, &frames).unwrap();
        set.verify_all().unwrap();
        same_content(&source, &backup);
    }

    #[test]
    fn several_disks_are_copied_side_by_side() {
        let dir = TempDir::new();
        let (s0, s1) = (dir.path("s0"), dir.path("s1"));
        sparse_source(&s0);
        file_of(&s1, 2 * MIB + 5, 0x5A);
        let (mut g0, l0) = gate_for(&s0);
        let (mut g1, l1) = gate_for(&s1);
        let mut sync = DiskSync::start([(s0.clone(), l0), (s1.clone(), l1)]).unwrap();
        let mut frames = Frames::new();
        sync.copy_live(&mut collect(&mut frames)).unwrap();
        g0.write_at(100, b"zero").unwrap();
        g1.write_at(MIB, &[0; 4096]).unwrap();
        sync.finish_paused(&mut collect(&mut frames)).unwrap();
        let (b0, b1) = (dir.path("b0"), dir.path("b1"));
        file_of(&b0, 0, 0);
        file_of(&b1, 7, 7);
        let mut set = ReplicaSet::new(vec![rw(&b0), rw(&b1)]);
        apply(&mut set, &frames).unwrap();
        set.verify_all().unwrap();
        same_content(&s0, &b0);
        same_content(&s1, &b1);
    }

    #[test]
    fn a_block_device_must_be_large_enough() {
        assert!(matches!(
            resize_plan(2, true, 100, 200),
            Err(DiskSyncError::TooSmall {
                disk: 2,
                have: 100,
                need: 200
            })
        ));
        assert_eq!(resize_plan(0, true, 300, 200).unwrap(), None);
        assert_eq!(resize_plan(0, true, 200, 200).unwrap(), None);
        assert_eq!(resize_plan(0, false, 100, 200).unwrap(), Some(200));
        assert_eq!(resize_plan(0, false, 300, 200).unwrap(), Some(200));
        assert_eq!(resize_plan(0, false, 200, 200).unwrap(), None);
    }

    /// Writes through the gate the block device would use, so the log tracks them.
    fn gate_for(path: &Path) -> (RecordingDiskGate, DiskWriteLog) {
        RecordingDiskGate::new(Box::new(FileDiskGate::new(rw(path), false)))
    }

    #[test]
    fn blocks_written_during_the_copy_are_sent_again() {
        let dir = TempDir::new();
        let (source, backup) = (dir.path("source"), dir.path("backup"));
        sparse_source(&source);
        file_of(&backup, SIZE, 0xAA);
        let (mut gate, log) = gate_for(&source);
        let mut sync = DiskSync::start([(source.clone(), log.clone())]).unwrap();
        assert_eq!(log.tracking_block_size(), Some(BLOCK_SIZE));
        let mut frames = Frames::new();
        sync.copy_live(&mut collect(&mut frames)).unwrap();

        // The guest goes on writing: data into a hole, zeros over data, across a chunk border,
        // and into the short last chunk.
        gate.write_at(5 * MIB + 4096, &[0x44; 512]).unwrap();
        gate.write_at(MIB + 100, &[0; 5000]).unwrap();
        gate.write_at(3 * MIB - 700, &[0x55; 1400]).unwrap();
        sync.catch_up(&mut collect(&mut frames)).unwrap();
        gate.write_at(SIZE - 10, &[0x66; 10]).unwrap();
        gate.write_at(5 * MIB + 4096, &[0x77; 100]).unwrap();
        let resent_before = sync.stats()[0].data_bytes;
        let digests = sync.finish_paused(&mut collect(&mut frames)).unwrap();
        assert!(sync.stats()[0].data_bytes > resent_before);
        assert_eq!(
            log.tracking_block_size(),
            None,
            "finishing stops the tracking"
        );

        let mut set = ReplicaSet::new(vec![rw(&backup)]);
        apply(&mut set, &frames).unwrap();
        set.verify_all().unwrap();
        assert_eq!(set.replicas[0].verified(), Some(digests[0].as_str()));
        same_content(&source, &backup);
        // Only the written blocks went again, not the whole image.
        assert!(data_bytes(&frames) < 4 * MIB);
    }

    #[test]
    fn a_digest_covers_the_final_content_only() {
        // Two copies that end with the same content agree, however they got there.
        let dir = TempDir::new();
        let (source, b1, b2) = (dir.path("source"), dir.path("b1"), dir.path("b2"));
        sparse_source(&source);
        let (mut gate, log) = gate_for(&source);
        let mut sync = DiskSync::start([(source.clone(), log)]).unwrap();
        let mut frames = Frames::new();
        sync.copy_live(&mut collect(&mut frames)).unwrap();
        gate.write_at(10, b"changed").unwrap();
        let d1 = sync.finish_paused(&mut collect(&mut frames)).unwrap();
        file_of(&b1, 0, 0);
        apply(&mut ReplicaSet::new(vec![rw(&b1)]), &frames).unwrap();

        let mut fresh = ImageMirror::open(0, &source).unwrap();
        let mut frames = Frames::new();
        fresh.send_full(&mut collect(&mut frames)).unwrap();
        let d2 = fresh.send_done(&mut collect(&mut frames)).unwrap();
        file_of(&b2, 0, 0);
        apply(&mut ReplicaSet::new(vec![rw(&b2)]), &frames).unwrap();
        assert_eq!(d1[0], d2);
        same_content(&b1, &b2);
    }

    #[test]
    fn a_corrupted_frame_is_caught_by_the_digest() {
        let dir = TempDir::new();
        let (source, backup) = (dir.path("source"), dir.path("backup"));
        sparse_source(&source);
        file_of(&backup, 0, 0);
        let mut mirror = ImageMirror::open(3, &source).unwrap();
        let mut frames = Frames::new();
        mirror.send_full(&mut collect(&mut frames)).unwrap();
        mirror.send_done(&mut collect(&mut frames)).unwrap();
        // Flip the last data byte of the first DiskWrites frame (past its header and table).
        let (_, payload) = frames
            .iter_mut()
            .find(|(k, _)| *k == FrameType::DiskWrites)
            .unwrap();
        *payload.last_mut().unwrap() ^= 0x01;
        let files = (0..4).map(|i| rw(&dir.path(&format!("b{i}")))).collect();
        let mut set = ReplicaSet::new(files);
        let err = apply(&mut set, &frames).unwrap_err();
        match &err {
            DiskSyncError::DigestMismatch {
                disk: 3,
                primary,
                backup,
            } => assert_ne!(primary, backup),
            other => panic!("expected a digest mismatch, got {other}"),
        }
        assert!(err.to_string().starts_with("disk 3:"), "{err}");
        assert!(set.verify_all().is_err());
    }

    #[test]
    fn a_truncated_stream_never_counts_as_done() {
        let dir = TempDir::new();
        let (source, backup) = (dir.path("source"), dir.path("backup"));
        sparse_source(&source);
        let mut mirror = ImageMirror::open(0, &source).unwrap();
        let mut frames = Frames::new();
        mirror.send_full(&mut collect(&mut frames)).unwrap();
        mirror.send_done(&mut collect(&mut frames)).unwrap();
        assert!(frames.len() >= 3);

        // Without DiskSyncDone: applied, but not done.
        file_of(&backup, 0, 0);
        let mut set = ReplicaSet::new(vec![rw(&backup)]);
        apply(&mut set, &frames[..frames.len() - 1]).unwrap();
        assert!(matches!(
            set.verify_all(),
            Err(DiskSyncError::NotVerified { disk: 0 })
        ));

        // A frame lost in the middle: the backup knows chunks are missing.
        let data_at = frames
            .iter()
            .position(|(k, _)| *k == FrameType::DiskWrites)
            .unwrap();
        let mut gap = frames.clone();
        gap.remove(data_at);
        let mut set = ReplicaSet::new(vec![rw(&backup)]);
        assert!(matches!(
            apply(&mut set, &gap),
            Err(DiskSyncError::Incomplete { disk: 0, .. })
        ));
        assert!(set.verify_all().is_err());

        // And a sender that fails reports the disk.
        let mut failing =
            |_: FrameType, _: &[u8]| -> Result<(), ProtocolError> { Err(ProtocolError::Closed) };
        let err = ImageMirror::open(0, &source)
            .unwrap()
            .send_full(&mut failing)
            .unwrap_err();
        assert!(matches!(err, DiskSyncError::Send { disk: 0, .. }), "{err}");
    }

    #[test]
    fn the_backup_refuses_what_does_not_fit() {
        let dir = TempDir::new();
        let backup = dir.path("backup");
        file_of(&backup, 0, 0);
        let mut set = ReplicaSet::new(vec![rw(&backup)]);
        let write = |offset: u64, len: usize| {
            encode_disk_writes(
                0,
                &[RecordedWrite {
                    offset,
                    data: vec![1; len],
                }],
            )
            .remove(0)
        };
        assert!(matches!(
            set.apply_disk_writes(&write(0, 10)),
            Err(DiskSyncError::NotStarted { disk: 0, .. })
        ));
        assert!(matches!(
            set.apply_control(&Control::DiskZero {
                disk: 0,
                offset: 0,
                len: 1
            }),
            Err(DiskSyncError::NotStarted { disk: 0, .. })
        ));
        assert!(matches!(
            set.apply_control(&Control::DiskSyncStart {
                disk: 1,
                size: MIB,
                chunk_size: MIB
            }),
            Err(DiskSyncError::NoSuchDisk { disk: 1, count: 1 })
        ));
        for (size, chunk_size) in [(MIB, 3 * 4096), (MIB, 1024), (MIB, 1 << 30), (1 << 62, MIB)] {
            assert!(
                matches!(
                    set.apply_control(&Control::DiskSyncStart {
                        disk: 0,
                        size,
                        chunk_size
                    }),
                    Err(DiskSyncError::Geometry { .. })
                ),
                "{size} / {chunk_size}"
            );
        }
        assert_eq!(std::fs::metadata(&backup).unwrap().len(), 0, "untouched");
        assert!(set
            .apply_control(&Control::DiskSyncStart {
                disk: 0,
                size: MIB,
                chunk_size: 64 << 10
            })
            .unwrap());
        assert!(matches!(
            set.apply_disk_writes(&write(MIB - 5, 10)),
            Err(DiskSyncError::OutOfRange { disk: 0, .. })
        ));
        assert!(matches!(
            set.apply_control(&Control::DiskZero {
                disk: 0,
                offset: 1,
                len: u64::MAX
            }),
            Err(DiskSyncError::OutOfRange { disk: 0, .. })
        ));
        assert!(!set.apply_control(&Control::Heartbeat { epoch: 1 }).unwrap());
        assert!(set.apply_disk_writes(b"short").is_err());
    }

    #[test]
    fn zeros_reach_the_image_with_or_without_hole_punching() {
        let dir = TempDir::new();
        let path = dir.path("img");
        file_of(&path, 3 * MIB, 0xAA);
        let f = rw(&path);
        write_zeros(&f, 100, MIB + 1).unwrap();
        let mut r = ImageReplica::new(0, rw(&path));
        r.start(3 * MIB, MIB).unwrap();
        // Partly covered chunks are read back; the wholly covered one is not.
        r.zero(2 * MIB - 10, MIB + 10).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..100].iter().all(|&b| b == 0xAA));
        assert!(data[100..MIB as usize + 101].iter().all(|&b| b == 0));
        assert!(data[MIB as usize + 101..2 * MIB as usize - 10]
            .iter()
            .all(|&b| b == 0xAA));
        assert!(data[2 * MIB as usize - 10..].iter().all(|&b| b == 0));
        assert_eq!(r.stats().read_bytes, MIB);
        let applying = r.applying.as_ref().unwrap();
        assert_eq!(applying.table.entries[2], Some(ZERO_ENTRY));
        assert!(applying.table.entries[0].is_none());
    }

    #[test]
    fn mirror_operations_need_the_full_pass_first() {
        let dir = TempDir::new();
        let source = dir.path("source");
        file_of(&source, 4096, 1);
        let mut mirror = ImageMirror::open(0, &source).unwrap();
        let mut frames = Frames::new();
        assert!(matches!(
            mirror.send_blocks(&[0], BLOCK_SIZE, &mut collect(&mut frames)),
            Err(DiskSyncError::NotStarted { .. })
        ));
        assert!(mirror.send_done(&mut collect(&mut frames)).is_err());
        assert!(frames.is_empty());
        assert!(matches!(
            ImageMirror::open(0, &dir.path("missing")),
            Err(DiskSyncError::Open { disk: 0, .. })
        ));
        // Blocks past the end are ignored, an empty image copies fine.
        mirror.send_full(&mut collect(&mut frames)).unwrap();
        mirror
            .send_blocks(&[0, 1, u64::MAX], BLOCK_SIZE, &mut collect(&mut frames))
            .unwrap();
        let empty = dir.path("empty");
        file_of(&empty, 0, 0);
        let mut mirror = ImageMirror::open(0, &empty).unwrap();
        let mut frames = Frames::new();
        mirror.send_full(&mut collect(&mut frames)).unwrap();
        mirror.send_done(&mut collect(&mut frames)).unwrap();
        let backup = dir.path("backup");
        file_of(&backup, 100, 9);
        let mut set = ReplicaSet::new(vec![rw(&backup)]);
        apply(&mut set, &frames).unwrap();
        set.verify_all().unwrap();
        assert_eq!(std::fs::metadata(&backup).unwrap().len(), 0);
    }

    #[test]
    fn dropping_the_sync_stops_tracking() {
        let dir = TempDir::new();
        let source = dir.path("source");
        file_of(&source, 4096, 1);
        let (_gate, log) = gate_for(&source);
        let (_gate2, log2) = gate_for(&source);
        let sync = DiskSync::start([(source.clone(), log.clone())]).unwrap();
        assert!(log.tracking_block_size().is_some());
        drop(sync);
        assert!(log.tracking_block_size().is_none());
        // A disk that cannot be opened leaves no tracking behind.
        assert!(DiskSync::start([
            (source.clone(), log.clone()),
            (dir.path("missing"), log2.clone())
        ])
        .is_err());
        assert!(log.tracking_block_size().is_none());
        assert!(log2.tracking_block_size().is_none());
    }

    #[test]
    fn large_images_get_larger_chunks() {
        const TIB: u64 = 1 << 40;
        assert_eq!(chunk_size_for(0), CHUNK_SIZE);
        assert_eq!(chunk_size_for(TIB), CHUNK_SIZE);
        assert_eq!(chunk_size_for(TIB + 1), 2 * CHUNK_SIZE);
        assert_eq!(chunk_size_for(64 * TIB), MAX_CHUNK);
        assert_eq!(chunk_size_for(u64::MAX), MAX_CHUNK);
        // What the primary picks, the backup accepts, up to its limit.
        for size in [0, 12_345, TIB, 64 * TIB] {
            DigestTable::new(0, size, chunk_size_for(size))
                .map(drop)
                .unwrap();
        }
        assert!(DigestTable::new(0, MAX_CHUNKS * MAX_CHUNK + 1, MAX_CHUNK).is_err());
        assert!(DigestTable::new(0, u64::MAX, chunk_size_for(u64::MAX)).is_err());
    }

    #[test]
    fn zero_detection_and_entries() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        assert_eq!(chunk_entry(&[0; 77]), ZERO_ENTRY);
        assert_ne!(chunk_entry(&v), ZERO_ENTRY);
    }
}
