//! Staging an epoch in the pause: the hot pages' compares and the copy of every changed page
//! from guest memory into the staging memory.
//!
//! Both are most of the pause (on the 2-core test host, about 0.3 µs per compared page and
//! 0.4 µs per copied one, bound by memory latency on one core), and while the guest is paused
//! its vCPU's core is often idle: so the epoch is cut into chunks of pages that the control
//! loop and a helper thread (`ft-stage`) take in turn from a shared cursor. A helper that is
//! slow to wake (its core busy) finds fewer chunks left, or none; the control loop never
//! waits for it beyond the chunk it is working on. Chunks never share a page.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::memory::{DirtyPages, PAGE_SIZE};

/// Pages per chunk: small enough that the last one does not keep the pause waiting long,
/// large enough that taking one costs little.
const CHUNK_PAGES: u64 = 32;
/// Fewer pages than this are staged on the calling thread alone: waking the helper costs
/// more than it saves.
const MIN_SHARED_PAGES: u64 = 128;

/// One chunk: its runs of pages (start, count) and the kept pages among them to compare
/// first, both in address order.
#[derive(Default)]
struct Chunk {
    runs: Vec<(GuestAddress, u64)>,
    candidates: Vec<GuestAddress>,
}

/// An epoch's chunks, shared by the two threads.
struct Job {
    chunks: Vec<Chunk>,
    /// The next chunk to take.
    next: AtomicUsize,
    /// Chunks finished (by either thread).
    done: AtomicUsize,
    /// What the compares found unchanged, and the compares' time, summed; the first error.
    found: Mutex<Found>,
}

#[derive(Default)]
struct Found {
    unchanged: Vec<GuestAddress>,
    compare_time: Duration,
    error: Option<String>,
}

impl Job {
    /// Takes chunks until none is left.
    fn work(&self, from: &GuestMemoryMmap, to: &GuestMemoryMmap) {
        let mut unchanged = Vec::new();
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            let Some(chunk) = self.chunks.get(i) else {
                return;
            };
            unchanged.clear();
            let staged = stage_chunk(from, to, chunk, &mut unchanged);
            {
                let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
                match staged {
                    Ok(time) => {
                        found.compare_time += time;
                        found.unchanged.extend_from_slice(&unchanged);
                    }
                    Err(e) => {
                        found.error.get_or_insert(e);
                    }
                }
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// What staging an epoch found.
pub struct Staged {
    /// Kept pages that did not change (not copied; not to be sent), in no particular order.
    pub unchanged: Vec<GuestAddress>,
    /// Time spent comparing, summed over the threads.
    pub compare_time: Duration,
}

struct Helper {
    jobs: Option<mpsc::Sender<Arc<Job>>>,
    thread: Option<JoinHandle<()>>,
    /// Host addresses of the first region of the guest memory and of the staging memory
    /// the helper works on: it serves only that pair.
    serves: (usize, usize),
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Closing its channel ends the thread.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Stages epochs into the staging memory, with a helper thread when the host has the cores.
pub struct StagingCopier {
    helper: Option<Helper>,
}

fn first_region_addr(mem: &GuestMemoryMmap) -> usize {
    mem.iter().next().map_or(0, |r| r.as_ptr() as usize)
}

impl StagingCopier {
    /// A copier without a helper: everything on the calling thread.
    pub fn alone() -> Self {
        Self { helper: None }
    }

    /// A copier with a helper thread for `guest` -> `staging` when the host has more than one
    /// core (else, or when the thread cannot start, [`StagingCopier::alone`]). `on_start` runs
    /// first on the helper (its seccomp filter); a helper for which it fails takes no chunk.
    pub fn start(
        guest: &GuestMemoryMmap,
        staging: &GuestMemoryMmap,
        on_start: impl FnOnce() -> bool + Send + 'static,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            return Self::alone();
        }
        let (jobs, job_rx) = mpsc::channel::<Arc<Job>>();
        let (from, to) = (guest.clone(), staging.clone());
        let spawned = std::thread::Builder::new()
            .name("ft-stage".into())
            .spawn(move || {
                if !on_start() {
                    return;
                }
                while let Ok(job) = job_rx.recv() {
                    job.work(&from, &to);
                }
            });
        match spawned {
            Ok(thread) => Self {
                helper: Some(Helper {
                    jobs: Some(jobs),
                    thread: Some(thread),
                    serves: (first_region_addr(guest), first_region_addr(staging)),
                }),
            },
            Err(e) => {
                log::warn!("FT: the pause stages epochs on one thread (no helper thread: {e})");
                Self::alone()
            }
        }
    }

    /// Compares `candidates` (kept pages of `pages`, in address order) with their staging
    /// copies and copies the other pages of `pages` from `from` into `to` (same layout).
    pub fn stage(
        &mut self,
        from: &GuestMemoryMmap,
        to: &GuestMemoryMmap,
        pages: &DirtyPages,
        candidates: &[GuestAddress],
    ) -> Result<Staged, String> {
        let serves = (first_region_addr(from), first_region_addr(to));
        let total = pages.count();
        let shared =
            total >= MIN_SHARED_PAGES && self.helper.as_ref().is_some_and(|h| h.serves == serves);
        let chunk_pages = if shared { CHUNK_PAGES } else { u64::MAX };
        let job = Arc::new(Job {
            chunks: chunks(pages, candidates, chunk_pages),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            found: Mutex::new(Found::default()),
        });
        if shared {
            let handed = self
                .helper
                .as_ref()
                .and_then(|h| h.jobs.as_ref())
                .is_some_and(|jobs| jobs.send(job.clone()).is_ok());
            if !handed {
                log::warn!("FT: the staging helper thread ended; staging on one thread");
                self.helper = None;
            }
        }
        job.work(from, to);
        // The helper may still be finishing its last chunk (a few microseconds; yield if its
        // core is taken by this thread's own).
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < job.chunks.len() {
            let gone = self
                .helper
                .as_ref()
                .and_then(|h| h.thread.as_ref())
                .is_none_or(|t| t.is_finished());
            if gone && job.done.load(Ordering::Acquire) < job.chunks.len() {
                self.helper = None;
                return Err("the staging helper thread ended in the middle of an epoch".into());
            }
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let mut found = std::mem::take(&mut *job.found.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(e) = found.error.take() {
            return Err(e);
        }
        Ok(Staged {
            unchanged: found.unchanged,
            compare_time: found.compare_time,
        })
    }
}

/// Cuts `pages` into chunks of at most `chunk_pages` pages, each with its `candidates`.
fn chunks(pages: &DirtyPages, candidates: &[GuestAddress], chunk_pages: u64) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut chunk = Chunk::default();
    let mut room = chunk_pages;
    for (mut start, mut n) in pages.runs() {
        while n > 0 {
            let take = n.min(room);
            chunk.runs.push((start, take));
            start = GuestAddress(start.0 + take * PAGE_SIZE as u64);
            n -= take;
            room -= take;
            if room == 0 {
                chunks.push(std::mem::take(&mut chunk));
                room = chunk_pages;
            }
        }
    }
    if !chunk.runs.is_empty() {
        chunks.push(chunk);
    }
    // Each candidate to the chunk whose runs hold it (both in address order).
    let mut c = 0;
    for gpa in candidates {
        while let Some(chunk) = chunks.get(c) {
            let end = chunk
                .runs
                .last()
                .map_or(0, |&(start, n)| start.0 + n * PAGE_SIZE as u64);
            if gpa.0 < end {
                break;
            }
            c += 1;
        }
        if let Some(chunk) = chunks.get_mut(c) {
            chunk.candidates.push(*gpa);
        }
    }
    chunks
}

/// Stages one chunk: compares its candidates (adding the unchanged ones to `unchanged`),
/// then copies its runs without them. Returns the time the compares took.
fn stage_chunk(
    from: &GuestMemoryMmap,
    to: &GuestMemoryMmap,
    chunk: &Chunk,
    unchanged: &mut Vec<GuestAddress>,
) -> Result<Duration, String> {
    let started = Instant::now();
    for &gpa in &chunk.candidates {
        if same_page(from, to, gpa)? {
            unchanged.push(gpa);
        }
    }
    let compare_time = started.elapsed();
    // Both lists are in address order: the copy skips the unchanged pages as it meets them.
    let mut skip = unchanged.iter().peekable();
    for &(start, n) in &chunk.runs {
        let end = start.0 + n * PAGE_SIZE as u64;
        let mut from_gpa = start.0;
        while from_gpa < end {
            let stop = match skip.peek() {
                Some(&&gpa) if gpa.0 < end => gpa.0,
                _ => end,
            };
            copy_run(from, to, GuestAddress(from_gpa), stop - from_gpa)?;
            if stop < end {
                skip.next();
            }
            from_gpa = stop + PAGE_SIZE as u64;
        }
    }
    Ok(compare_time)
}

/// Copies `len` bytes at `start` from `from` into `to` (same layout; within one region).
fn copy_run(
    from: &GuestMemoryMmap,
    to: &GuestMemoryMmap,
    start: GuestAddress,
    len: u64,
) -> Result<(), String> {
    if len == 0 {
        return Ok(());
    }
    let len = len as usize;
    let source = from
        .get_slice(start, len)
        .map_err(|e| format!("reading guest pages at {:#x}: {e}", start.0))?;
    let target = to
        .get_slice(start, len)
        .map_err(|e| format!("staging pages at {:#x}: {e}", start.0))?;
    source.copy_to_volatile_slice(target);
    Ok(())
}

/// Whether the page at `gpa` holds the same bytes in both memories (same layout).
fn same_page(a: &GuestMemoryMmap, b: &GuestMemoryMmap, gpa: GuestAddress) -> Result<bool, String> {
    let left = a
        .get_slice(gpa, PAGE_SIZE)
        .map_err(|e| format!("guest page {:#x}: {e}", gpa.0))?;
    let right = b
        .get_slice(gpa, PAGE_SIZE)
        .map_err(|e| format!("staging page {:#x}: {e}", gpa.0))?;
    let (l, r) = (left.ptr_guard(), right.ptr_guard());
    // SAFETY: both slices are PAGE_SIZE bytes of live mappings (vm-memory checked the range);
    // the VM is paused and the sender is not using the staging memory, so neither changes
    // while it is read.
    let equal = unsafe {
        std::slice::from_raw_parts(l.as_ptr(), PAGE_SIZE)
            == std::slice::from_raw_parts(r.as_ptr(), PAGE_SIZE)
    };
    Ok(equal)
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    const MEM: u64 = 8 << 20;

    fn page(p: u64) -> GuestAddress {
        GuestAddress(p * PAGE_SIZE as u64)
    }

    #[test]
    fn both_halves_are_compared_and_copied_and_nothing_else_is() {
        let pages = MEM / PAGE_SIZE as u64;
        let guest = vmm::memory::create(MEM).unwrap();
        for p in 0..pages {
            guest
                .write_slice(&[p as u8 | 1; PAGE_SIZE], page(p))
                .unwrap();
        }
        // Runs of every length; the split falls inside one of them.
        let dirty: Vec<u64> = (0..pages).filter(|p| p % 7 < 3 || p % 50 == 9).collect();
        let set = DirtyPages::from_pages(&guest, dirty.iter().map(|&p| page(p)))
            .unwrap()
            .0;
        assert!(set.count() >= MIN_SHARED_PAGES);
        for helped in [false, true] {
            let staging = vmm::memory::create(MEM).unwrap();
            let mut copier = if helped {
                StagingCopier::start(&guest, &staging, || true)
            } else {
                StagingCopier::alone()
            };
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            assert_eq!(copier.helper.is_some(), helped && cores > 1);
            // Every third dirty page is kept; those already in staging (written there with
            // the guest's bytes) are unchanged and must not be copied again.
            let kept: Vec<GuestAddress> = dirty.iter().step_by(3).map(|&p| page(p)).collect();
            let same: Vec<GuestAddress> = kept.iter().step_by(2).copied().collect();
            for &gpa in &same {
                let p = gpa.0 / PAGE_SIZE as u64;
                staging.write_slice(&[p as u8 | 1; PAGE_SIZE], gpa).unwrap();
            }
            let staged = copier.stage(&guest, &staging, &set, &kept).unwrap();
            let mut unchanged = staged.unchanged;
            unchanged.sort();
            assert_eq!(unchanged, same, "helped {helped}");
            // Mark the unchanged pages in staging: a copy over them would undo the mark.
            for &gpa in &same {
                staging.write_slice(&[0xee; 8], gpa).unwrap();
            }
            // Again with no candidates: every page is copied.
            copier.stage(&guest, &staging, &set, &[]).unwrap();
            let mut buf = vec![0u8; PAGE_SIZE];
            for p in 0..pages {
                staging.read_slice(&mut buf, page(p)).unwrap();
                let expected = if dirty.contains(&p) { p as u8 | 1 } else { 0 };
                assert!(
                    buf.iter().all(|&b| b == expected),
                    "helped {helped}: page {p}"
                );
            }
            // Once more with the candidates after the marks: the marked pages changed.
            for &gpa in &same {
                staging.write_slice(&[0xee; 8], gpa).unwrap();
            }
            let staged = copier.stage(&guest, &staging, &set, &kept).unwrap();
            assert_eq!(staged.unchanged.len(), kept.len() - same.len());
            for &gpa in &same {
                staging.read_slice(&mut buf, gpa).unwrap();
                assert_ne!(
                    buf[0], 0xee,
                    "helped {helped}: a changed kept page not copied"
                );
            }
            // Another pair of memories is staged too (on this thread).
            let other = vmm::memory::create(MEM).unwrap();
            copier.stage(&guest, &other, &set, &[]).unwrap();
            other.read_slice(&mut buf, page(0)).unwrap();
            assert!(buf.iter().all(|&b| b == 1));
        }
    }
}
