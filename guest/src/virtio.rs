//! virtio-mmio transport (virtio 1.x, register layout version 2) and split
//! virtqueues, driven by polling from CPL3.
//!
//! Register accesses are MMIO and exit to the VMM (expensive here), so they
//! are kept to set-up and QueueNotify. Completions are found by reading the
//! used ring in RAM natively; no interrupts are used (avail rings carry
//! VRING_AVAIL_F_NO_INTERRUPT) and a notify is skipped while the device says
//! it does not need one (VRING_USED_F_NO_NOTIFY).

use core::sync::atomic::{fence, Ordering};

use crate::dma;

pub const ID_NET: u32 = 1;
pub const ID_BLK: u32 = 2;

pub const F_VERSION_1: u64 = 1 << 32;

const MAGIC: u32 = 0x7472_6976; // "virt"

const R_MAGIC: usize = 0x000;
const R_VERSION: usize = 0x004;
const R_DEVICE_ID: usize = 0x008;
const R_DEVICE_FEATURES: usize = 0x010;
const R_DEVICE_FEATURES_SEL: usize = 0x014;
const R_DRIVER_FEATURES: usize = 0x020;
const R_DRIVER_FEATURES_SEL: usize = 0x024;
const R_QUEUE_SEL: usize = 0x030;
const R_QUEUE_NUM_MAX: usize = 0x034;
const R_QUEUE_NUM: usize = 0x038;
const R_QUEUE_READY: usize = 0x044;
const R_QUEUE_NOTIFY: usize = 0x050;
const R_STATUS: usize = 0x070;
const R_QUEUE_DESC: usize = 0x080;
const R_QUEUE_DRIVER: usize = 0x090;
const R_QUEUE_DEVICE: usize = 0x0a0;
const R_CONFIG_GENERATION: usize = 0x0fc;
const R_CONFIG: usize = 0x100;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

pub const MAX_DEVICES: usize = 16;

/// One `virtio_mmio.device=<size>@<base>:<irq>` entry.
#[derive(Clone, Copy, Default)]
pub struct MmioDev {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
    /// 0 when the window does not hold a virtio device (or a version-1 one).
    pub id: u32,
    pub version: u32,
    pub features: u64,
}

impl MmioDev {
    pub fn kind(&self) -> &'static str {
        match self.id {
            ID_NET => "net",
            ID_BLK => "blk",
            0 => "none",
            _ => "other",
        }
    }
}

pub struct Devices {
    pub list: [MmioDev; MAX_DEVICES],
    pub count: usize,
}

impl Devices {
    pub fn iter(&self) -> impl Iterator<Item = &MmioDev> {
        self.list[..self.count].iter()
    }

    /// The first device of type `id` this driver can run (version 2).
    pub fn first(&self, id: u32) -> Result<MmioDev, &'static str> {
        match self.iter().find(|d| d.id == id && d.version == 2) {
            Some(d) => Ok(*d),
            None if self.iter().any(|d| d.id == id) => {
                Err("only a legacy (version 1) virtio-mmio device found")
            }
            None => Err("no such virtio-mmio device on the command line"),
        }
    }
}

fn parse_num(v: &[u8]) -> Option<u64> {
    let (digits, radix) = match v {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (v, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in digits {
        let d = (b as char).to_digit(radix)? as u64;
        n = n.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(n)
}

/// Linux's syntax: `<size>[KMG]@<base>:<irq>[:<id>]`, numbers in C notation.
fn parse_entry(v: &[u8]) -> Option<(u64, u64, u32)> {
    let at = v.iter().position(|&b| b == b'@')?;
    let (size, rest) = (&v[..at], &v[at + 1..]);
    let (size, shift) = match size.last()? {
        b'k' | b'K' => (&size[..size.len() - 1], 10),
        b'm' | b'M' => (&size[..size.len() - 1], 20),
        b'g' | b'G' => (&size[..size.len() - 1], 30),
        _ => (size, 0),
    };
    let size = parse_num(size)?.checked_shl(shift)?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let base = parse_num(&rest[..colon])?;
    let irq_part = &rest[colon + 1..];
    let irq_end = irq_part
        .iter()
        .position(|&b| b == b':')
        .unwrap_or(irq_part.len());
    let irq = parse_num(&irq_part[..irq_end])? as u32;
    Some((size, base, irq))
}

fn rd(base: u64, off: usize) -> u32 {
    // SAFETY: an MMIO register of a device window from the command line,
    // identity mapped and user accessible below 4 GiB.
    unsafe { core::ptr::read_volatile((base as usize + off) as *const u32) }
}

fn wr(base: u64, off: usize, v: u32) {
    // SAFETY: as in `rd`.
    unsafe { core::ptr::write_volatile((base as usize + off) as *mut u32, v) }
}

/// Finds the devices the command line names and reads their identity and
/// offered features (no reset: harmless for workloads that do not use them).
pub fn discover(cmdline: &[u8]) -> Devices {
    let mut devs = Devices {
        list: [MmioDev::default(); MAX_DEVICES],
        count: 0,
    };
    for tok in cmdline.split(|b| b.is_ascii_whitespace()) {
        let Some(v) = tok.strip_prefix(b"virtio_mmio.device=") else {
            continue;
        };
        let Some((size, base, irq)) = parse_entry(v) else {
            continue;
        };
        // The identity map covers the first 4 GiB only.
        if devs.count == MAX_DEVICES || base == 0 || base + size.max(0x100) > 1 << 32 {
            continue;
        }
        let mut d = MmioDev {
            base,
            size,
            irq,
            ..MmioDev::default()
        };
        if rd(base, R_MAGIC) == MAGIC {
            d.version = rd(base, R_VERSION);
            d.id = rd(base, R_DEVICE_ID);
            if d.id != 0 && d.version == 2 {
                wr(base, R_DEVICE_FEATURES_SEL, 1);
                let hi = rd(base, R_DEVICE_FEATURES) as u64;
                wr(base, R_DEVICE_FEATURES_SEL, 0);
                d.features = hi << 32 | rd(base, R_DEVICE_FEATURES) as u64;
            }
        }
        devs.list[devs.count] = d;
        devs.count += 1;
    }
    devs
}

/// A device after the virtio initialization sequence (up to FEATURES_OK).
pub struct Transport {
    pub base: u64,
    pub features: u64,
}

impl Transport {
    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation: `wanted` is what the
    /// driver can use; VERSION_1 must be offered (this is not a legacy driver).
    pub fn init(dev: &MmioDev, wanted: u64) -> Result<Transport, &'static str> {
        let base = dev.base;
        if rd(base, R_MAGIC) != MAGIC || rd(base, R_VERSION) != 2 {
            return Err("not a virtio-mmio version 2 device");
        }
        wr(base, R_STATUS, 0);
        // A reset completes when the device reads back status 0.
        let mut spins = 0;
        while rd(base, R_STATUS) != 0 {
            spins += 1;
            if spins > 1000 {
                return Err("device does not reset");
            }
        }
        wr(base, R_STATUS, S_ACKNOWLEDGE);
        wr(base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        wr(base, R_DEVICE_FEATURES_SEL, 1);
        let hi = rd(base, R_DEVICE_FEATURES) as u64;
        wr(base, R_DEVICE_FEATURES_SEL, 0);
        let offered = hi << 32 | rd(base, R_DEVICE_FEATURES) as u64;
        if offered & F_VERSION_1 == 0 {
            wr(base, R_STATUS, S_FAILED);
            return Err("device does not offer VERSION_1");
        }
        let features = offered & (wanted | F_VERSION_1);
        wr(base, R_DRIVER_FEATURES_SEL, 1);
        wr(base, R_DRIVER_FEATURES, (features >> 32) as u32);
        wr(base, R_DRIVER_FEATURES_SEL, 0);
        wr(base, R_DRIVER_FEATURES, features as u32);
        let st = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK;
        wr(base, R_STATUS, st);
        if rd(base, R_STATUS) & S_FEATURES_OK == 0 {
            wr(base, R_STATUS, S_FAILED);
            return Err("device did not accept the features (FEATURES_OK cleared)");
        }
        Ok(Transport { base, features })
    }

    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// Sets up queue `index` with at most `want` entries (the device's
    /// maximum if smaller; rounded down to a power of two).
    pub fn queue(&self, index: u16, want: u16) -> Result<Virtq, &'static str> {
        let base = self.base;
        wr(base, R_QUEUE_SEL, index as u32);
        if rd(base, R_QUEUE_READY) != 0 {
            return Err("queue already live after reset");
        }
        let max = rd(base, R_QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue not available");
        }
        let mut size = (max.min(want as u32).min(32768)) as u16;
        size = 1 << (15 - size.leading_zeros());
        let q = Virtq::new(size, base, index);
        wr(base, R_QUEUE_NUM, size as u32);
        for (reg, addr) in [
            (R_QUEUE_DESC, q.desc as u64),
            (R_QUEUE_DRIVER, q.avail as u64),
            (R_QUEUE_DEVICE, q.used as u64),
        ] {
            wr(base, reg, addr as u32);
            wr(base, reg + 4, (addr >> 32) as u32);
        }
        wr(base, R_QUEUE_READY, 1);
        Ok(q)
    }

    pub fn driver_ok(&self) {
        wr(
            self.base,
            R_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    pub fn fail(&self) {
        wr(self.base, R_STATUS, S_FAILED);
    }

    /// Reads `N` bytes of device config at `off`, retried until the config
    /// generation is stable (a consistent snapshot, spec 4.2.2.2).
    pub fn config<const N: usize>(&self, off: usize) -> [u8; N] {
        loop {
            let g0 = rd(self.base, R_CONFIG_GENERATION);
            let mut out = [0u8; N];
            for (i, b) in out.iter_mut().enumerate() {
                // SAFETY: byte reads of the config window (any width allowed).
                *b = unsafe {
                    core::ptr::read_volatile((self.base as usize + R_CONFIG + off + i) as *const u8)
                };
            }
            if rd(self.base, R_CONFIG_GENERATION) == g0 {
                return out;
            }
        }
    }
}

#[repr(C)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A split virtqueue in RAM: descriptor table, avail ring (driver area) and
/// used ring (device area), each page aligned.
pub struct Virtq {
    pub size: u16,
    desc: *mut Desc,
    avail: *mut u16,
    used: *mut u8,
    /// Our copy of avail.idx (only we write it).
    avail_idx: u16,
    /// Next used.idx value we have not consumed.
    last_used: u16,
    /// avail.idx at the last notify: nothing new means no notify.
    notified_idx: u16,
    mmio: u64,
    index: u16,
    /// QueueNotify writes made (each one a VM exit).
    pub notifies: u64,
}

impl Virtq {
    fn new(size: u16, mmio: u64, index: u16) -> Virtq {
        let n = size as usize;
        let desc = dma::alloc(16 * n, 4096) as *mut Desc;
        let avail = dma::alloc(6 + 2 * n, 4096) as *mut u16;
        let used = dma::alloc(6 + 8 * n, 4096);
        // SAFETY: freshly allocated ring memory.
        unsafe { avail.write_volatile(AVAIL_F_NO_INTERRUPT) };
        Virtq {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
            notified_idx: 0,
            mmio,
            index,
            notifies: 0,
        }
    }

    /// Descriptor `i` (i < size).
    pub fn desc(&mut self, i: u16) -> &mut Desc {
        assert!(i < self.size);
        // SAFETY: inside the table; the device only reads descriptors.
        unsafe { &mut *self.desc.add(i as usize) }
    }

    /// Makes the chain starting at `head` available (visible to the device
    /// at once; a notify may still be needed, see `kick`).
    pub fn push(&mut self, head: u16) {
        let slot = (self.avail_idx % self.size) as usize;
        // SAFETY: ring entries after flags and idx.
        unsafe { self.avail.add(2 + slot).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Descriptors and ring entry before the index (x86 keeps store order;
        // this stops the compiler reordering).
        fence(Ordering::Release);
        // SAFETY: avail.idx.
        unsafe { self.avail.add(1).write_volatile(self.avail_idx) };
    }

    /// Notifies the device of new buffers, unless there are none since the
    /// last notify or the device has said it is polling the ring anyway.
    pub fn kick(&mut self) {
        if self.avail_idx == self.notified_idx {
            return;
        }
        // The index store must be visible before we read the device's flag,
        // or both sides may think the other will look (spec 2.7.13.3).
        fence(Ordering::SeqCst);
        // SAFETY: used.flags.
        let flags = unsafe { (self.used as *const u16).read_volatile() };
        self.notified_idx = self.avail_idx;
        if flags & USED_F_NO_NOTIFY == 0 {
            self.notifies += 1;
            wr(self.mmio, R_QUEUE_NOTIFY, self.index as u32);
        }
    }

    /// Always notifies (for rare requests where the cost does not matter).
    pub fn kick_always(&mut self) {
        fence(Ordering::SeqCst);
        self.notified_idx = self.avail_idx;
        self.notifies += 1;
        wr(self.mmio, R_QUEUE_NOTIFY, self.index as u32);
    }

    /// The next completed chain: (head id, bytes written by the device).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used.idx, written by the device.
        let idx = unsafe { (self.used.add(2) as *const u16).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        // The element must be read after the index that published it.
        fence(Ordering::Acquire);
        let slot = (self.last_used % self.size) as usize;
        // SAFETY: used ring element `slot` (id: u32, len: u32) after flags/idx.
        let (id, len) = unsafe {
            let e = self.used.add(4 + 8 * slot) as *const u32;
            (e.read_volatile(), e.add(1).read_volatile())
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }
}
