//! workload=blk: write a region of a virtio-blk disk with self-describing
//! sectors, flush, read it back and verify (or only verify a region an
//! earlier boot wrote). The sector format is documented in README.md; the
//! host tests check the image file against it.

use crate::virtio::{self, Transport, Virtq, DESC_F_NEXT, DESC_F_WRITE};
use crate::workloads::{Config, Frac};
use crate::{clock, console, dma};

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const SECTOR: usize = 512;
const MAX_DEPTH: usize = 16;
const QUEUE_SIZE: u16 = 256;
/// A request that does not complete in this time is reported, not waited for.
const TIMEOUT_NS: u64 = 60_000_000_000;

pub const MAGIC: [u8; 8] = *b"TANDEMBK";

pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Word `j` (4..64) of sector `lba` in run `seq`.
fn fill_word(lba: u64, seq: u64, j: u64) -> u64 {
    mix(lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ j)
}

/// FNV-1a style hash over the 64-bit words of a sector, word 3 (the checksum
/// itself) excluded.
pub fn checksum(w: &[u64; 64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, &x) in w.iter().enumerate() {
        if i != 3 {
            h = (h ^ x).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn make_sector(lba: u64, seq: u64, out: &mut [u64; 64]) {
    out[0] = u64::from_le_bytes(MAGIC);
    out[1] = lba;
    out[2] = seq;
    for (j, w) in out.iter_mut().enumerate().skip(4) {
        *w = fill_word(lba, seq, j as u64);
    }
    out[3] = checksum(out);
}

fn sector_ok(lba: u64, seq: u64, s: &[u64; 64]) -> bool {
    let mut want = [0u64; 64];
    make_sector(lba, seq, &mut want);
    *s == want
}

fn as_sectors(buf: &mut [u8]) -> &mut [[u64; 64]] {
    // SAFETY: buffers are page aligned and a multiple of 512 bytes long.
    unsafe {
        core::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut [u64; 64], buf.len() / SECTOR)
    }
}

struct Blk {
    t: Transport,
    q: Virtq,
    /// Descriptors per request: header, data segments, status.
    stride: u16,
    seg_bytes: usize,
    req_bytes: usize,
    depth: usize,
    hdrs: *mut [u64; 2],
    status: *mut u8,
    data: &'static mut [u8],
}

struct Done {
    slot: usize,
    status: u8,
}

impl Blk {
    fn slot_data(&mut self, slot: usize) -> &mut [u8] {
        &mut self.data[slot * self.req_bytes..(slot + 1) * self.req_bytes]
    }

    /// Queues request `typ` on `slot` with `len` bytes of its data buffer.
    fn submit(&mut self, slot: usize, typ: u32, sector: u64, len: usize) {
        let head = slot as u16 * self.stride;
        // SAFETY: per-slot header and status bytes, not in flight now.
        unsafe {
            self.hdrs.add(slot).write_volatile([typ as u64, sector]);
            self.status.add(slot).write_volatile(0xff);
        }
        let hdr_addr = self.hdrs as u64 + 16 * slot as u64;
        let status_addr = self.status as u64 + slot as u64;
        let data_addr = self.slot_data(slot).as_ptr() as u64;
        let dev_writes = typ == T_IN || typ == T_GET_ID;
        let mut i = head;
        *self.q.desc(i) = virtio::Desc {
            addr: hdr_addr,
            len: 16,
            flags: DESC_F_NEXT,
            next: i + 1,
        };
        i += 1;
        let mut off = 0;
        while off < len {
            let n = (len - off).min(self.seg_bytes);
            *self.q.desc(i) = virtio::Desc {
                addr: data_addr + off as u64,
                len: n as u32,
                flags: DESC_F_NEXT | if dev_writes { DESC_F_WRITE } else { 0 },
                next: i + 1,
            };
            off += n;
            i += 1;
        }
        *self.q.desc(i) = virtio::Desc {
            addr: status_addr,
            len: 1,
            flags: DESC_F_WRITE,
            next: 0,
        };
        self.q.push(head);
    }

    /// Waits for the next completion.
    fn complete(&mut self) -> Result<Done, &'static str> {
        let deadline = clock::now_ns() + TIMEOUT_NS;
        loop {
            if let Some((id, _)) = self.q.pop_used() {
                let slot = (id / self.stride) as usize;
                if id % self.stride != 0 || slot >= self.depth {
                    return Err("device returned a bad descriptor id");
                }
                // SAFETY: the device finished with this slot's status byte.
                let status = unsafe { self.status.add(slot).read_volatile() };
                return Ok(Done { slot, status });
            }
            if clock::now_ns() > deadline {
                return Err("request timed out");
            }
            core::hint::spin_loop();
        }
    }

    /// One request, synchronously.
    fn single(&mut self, typ: u32, sector: u64, len: usize) -> Result<u8, &'static str> {
        self.submit(0, typ, sector, len);
        self.q.kick_always();
        Ok(self.complete()?.status)
    }

    /// Writes (or reads and verifies) sectors [start, end) with up to
    /// `depth` requests in flight. Returns the first bad sector when reading.
    fn stream(
        &mut self,
        write: bool,
        start: u64,
        end: u64,
        seq: u64,
    ) -> Result<Option<u64>, &'static str> {
        let per_req = (self.req_bytes / SECTOR) as u64;
        let mut next = start;
        let mut free: [usize; MAX_DEPTH] = [0; MAX_DEPTH];
        let mut nfree = self.depth;
        for (i, f) in free.iter_mut().enumerate().take(self.depth) {
            *f = i;
        }
        let mut slot_lba = [0u64; MAX_DEPTH];
        let mut slot_n = [0u64; MAX_DEPTH];
        let mut bad: Option<u64> = None;
        while next < end || nfree < self.depth {
            while nfree > 0 && next < end {
                nfree -= 1;
                let slot = free[nfree];
                let n = per_req.min(end - next);
                if write {
                    let buf = self.slot_data(slot);
                    for (k, s) in as_sectors(&mut buf[..n as usize * SECTOR])
                        .iter_mut()
                        .enumerate()
                    {
                        make_sector(next + k as u64, seq, s);
                    }
                }
                slot_lba[slot] = next;
                slot_n[slot] = n;
                self.submit(
                    slot,
                    if write { T_OUT } else { T_IN },
                    next,
                    n as usize * SECTOR,
                );
                next += n;
            }
            self.q.kick();
            let d = self.complete()?;
            if d.status != 0 {
                return Err(if d.status == 2 {
                    "request unsupported"
                } else {
                    "I/O error"
                });
            }
            if !write && bad.is_none() {
                let (lba, n) = (slot_lba[d.slot], slot_n[d.slot] as usize);
                let buf = self.slot_data(d.slot);
                for (k, s) in as_sectors(&mut buf[..n * SECTOR]).iter().enumerate() {
                    if !sector_ok(lba + k as u64, seq, s) {
                        bad = Some(lba + k as u64);
                        break;
                    }
                }
            }
            free[nfree] = d.slot;
            nfree += 1;
        }
        Ok(bad)
    }
}

fn setup(req_kib: u64, dev: &virtio::Dev) -> Result<(Blk, u64, u32), &'static str> {
    let t = Transport::init(dev, F_SIZE_MAX | F_SEG_MAX | F_RO | F_FLUSH)?;
    let capacity = u64::from_le_bytes(t.config::<8>(0));
    let size_max = if t.has(F_SIZE_MAX) {
        u32::from_le_bytes(t.config::<4>(8))
    } else {
        0
    };
    let seg_max = if t.has(F_SEG_MAX) {
        u32::from_le_bytes(t.config::<4>(12))
    } else {
        0
    };
    let q = t.queue(0, QUEUE_SIZE)?;
    t.driver_ok();
    let mut req_bytes = (req_kib.clamp(1, 4096) * 1024) as usize;
    // Segments no longer than size_max (whole sectors), no more than seg_max.
    let seg_bytes = if size_max >= SECTOR as u32 {
        size_max as usize & !(SECTOR - 1)
    } else {
        req_bytes
    };
    let mut segs = req_bytes.div_ceil(seg_bytes);
    let max_segs = if seg_max > 0 {
        seg_max as usize
    } else {
        usize::MAX
    };
    let max_segs = max_segs.min(q.size as usize - 2);
    if segs > max_segs {
        segs = max_segs;
        req_bytes = segs * seg_bytes;
    }
    let stride = (segs + 2) as u16;
    let depth = (q.size / stride).clamp(1, MAX_DEPTH as u16) as usize;
    let hdrs = dma::alloc(16 * MAX_DEPTH, 4096) as *mut [u64; 2];
    let status = dma::alloc(MAX_DEPTH, 64);
    let data = dma::alloc_bytes(req_bytes * depth);
    let blk = Blk {
        t,
        q,
        stride,
        seg_bytes,
        req_bytes,
        depth,
        hdrs,
        status,
        data,
    };
    Ok((blk, capacity, seg_max))
}

/// The first virtio disk for other workloads (`workload=ft`): one request at
/// a time, each waited for (`Blk::single`, one QueueNotify per request).
pub struct Disk {
    blk: Blk,
    pub capacity: u64,
    pub ro: bool,
}

impl Disk {
    /// Initializes the device with requests of up to `req_kib` KiB.
    pub fn open(dev: &virtio::Dev, req_kib: u64) -> Result<Disk, &'static str> {
        let (blk, capacity, _) = setup(req_kib, dev)?;
        let ro = blk.t.has(F_RO);
        Ok(Disk { blk, capacity, ro })
    }

    /// Largest request in bytes (a multiple of 512).
    pub fn max_bytes(&self) -> usize {
        self.blk.req_bytes
    }

    fn status(st: u8) -> Result<(), &'static str> {
        match st {
            0 => Ok(()),
            2 => Err("request unsupported"),
            _ => Err("I/O error"),
        }
    }

    /// Writes `data` (whole sectors, at most `max_bytes`) at `sector` and
    /// waits until the device has completed the request.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), &'static str> {
        let len = data.len();
        if len == 0 || !len.is_multiple_of(SECTOR) || len > self.blk.req_bytes {
            return Err("bad write length");
        }
        self.blk.slot_data(0)[..len].copy_from_slice(data);
        Self::status(self.blk.single(T_OUT, sector, len)?)
    }

    /// Like `write`, the data made in place: `fill(k, bytes)` fills the `k`-th
    /// of `sectors` sectors (no copy of the data on the caller's stack).
    pub fn write_with(
        &mut self,
        sector: u64,
        sectors: usize,
        mut fill: impl FnMut(usize, &mut [u8]),
    ) -> Result<(), &'static str> {
        let len = sectors * SECTOR;
        if len == 0 || len > self.blk.req_bytes {
            return Err("bad write length");
        }
        for (k, bytes) in self.blk.slot_data(0)[..len]
            .chunks_exact_mut(SECTOR)
            .enumerate()
        {
            fill(k, bytes);
        }
        Self::status(self.blk.single(T_OUT, sector, len)?)
    }

    /// Reads `sectors` sectors (at most `max_bytes`) at `sector`; the data is
    /// valid until the next request.
    pub fn read(&mut self, sector: u64, sectors: usize) -> Result<&[u8], &'static str> {
        let len = sectors * SECTOR;
        if len == 0 || len > self.blk.req_bytes {
            return Err("bad read length");
        }
        // The buffer may still hold what a write just sent: cleared, so only
        // the device's data can match it.
        self.blk.slot_data(0)[..len].fill(0);
        Self::status(self.blk.single(T_IN, sector, len)?)?;
        Ok(&self.blk.slot_data(0)[..len])
    }
}

fn mibps(bytes: u64, ns: u64) -> Frac {
    Frac(bytes as u128 * 1_000_000_000, ns.max(1) as u128 * (1 << 20))
}

pub fn run(cfg: &Config, devs: &virtio::Devices) {
    let dev = match devs.first(virtio::ID_BLK) {
        Ok(d) => d,
        Err(e) => {
            println!("BLK error {}", e);
            return;
        }
    };
    let (mut blk, capacity, _) = match setup(cfg.blk_req_kib, &dev) {
        Ok(x) => x,
        Err(e) => {
            println!("BLK error {}", e);
            return;
        }
    };
    let ro = blk.t.has(F_RO);
    let flush = blk.t.has(F_FLUSH);
    println!(
        "BLK capacity={} sectors ro={} flush={} req_kib={} depth={} features=0x{:x}",
        capacity,
        ro as u8,
        flush as u8,
        blk.req_bytes / 1024,
        blk.depth,
        blk.t.features
    );
    match blk.single(T_GET_ID, 0, 20) {
        Ok(0) => {
            let id = &blk.slot_data(0)[..20];
            let n = id.iter().position(|&b| b == 0).unwrap_or(20);
            println!("BLK id=\"{}\"", console::Bytes(&id[..n]));
        }
        Ok(_) => println!("BLK id=\"\""),
        Err(e) => {
            println!("BLK error GET_ID: {}", e);
            return;
        }
    }
    let sectors = cfg.blk_mib * (1 << 20) / SECTOR as u64;
    let start = cfg.blk_start;
    let end = start + sectors;
    if sectors == 0 || end > capacity {
        println!(
            "BLK error region start={} sectors={} does not fit capacity={}",
            start, sectors, capacity
        );
        return;
    }
    let seq = cfg.blk_seq;
    let mut write_ns = 0;
    if !cfg.blk_verify_only {
        if ro {
            println!("BLK error device is read-only");
            return;
        }
        let t0 = clock::now_ns();
        let r = blk.stream(true, start, end, seq).and_then(|_| {
            if flush && blk.single(T_FLUSH, 0, 0)? != 0 {
                return Err("FLUSH failed");
            }
            Ok(())
        });
        write_ns = clock::now_ns() - t0;
        if let Err(e) = r {
            println!("BLK error write: {}", e);
            return;
        }
    }
    let t0 = clock::now_ns();
    let r = blk.stream(false, start, end, seq);
    let read_ns = clock::now_ns() - t0;
    let bytes = sectors * SECTOR as u64;
    let wr = if cfg.blk_verify_only {
        Frac(0, 1)
    } else {
        mibps(bytes, write_ns)
    };
    match r {
        Err(e) => println!("BLK error read: {}", e),
        Ok(None) => println!(
            "BLK result mib={} seq={} write_MiBps={} read_MiBps={} verify=ok",
            cfg.blk_mib,
            seq,
            wr,
            mibps(bytes, read_ns)
        ),
        Ok(Some(bad)) => println!(
            "BLK result mib={} seq={} write_MiBps={} read_MiBps={} verify=FAIL sector={}",
            cfg.blk_mib,
            seq,
            wr,
            mibps(bytes, read_ns),
            bad
        ),
    }
}
