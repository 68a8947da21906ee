//! virtio 1.x devices over two transports, driven by polling from CPL3:
//! virtio-pci (modern interface, found by scanning PCI bus 0) and virtio-mmio
//! (register layout version 2, named by `virtio_mmio.device=` on the command
//! line). Drivers see one `Dev` / `Transport` / `Virtq` whatever the
//! transport; only this file knows the register layouts.
//!
//! Register accesses are MMIO and exit to the VMM (expensive here), so they
//! are kept to set-up and queue notifications. Completions are found by
//! reading the used ring in RAM natively; no interrupts are used (avail rings
//! carry VRING_AVAIL_F_NO_INTERRUPT, MSI-X vectors stay NO_VECTOR, INTx is
//! masked) and a notify is skipped while the device says it does not need one
//! (VRING_USED_F_NO_NOTIFY).

use core::sync::atomic::{fence, Ordering};

use crate::{dma, pci};

pub const ID_NET: u32 = 1;
pub const ID_BLK: u32 = 2;

pub const F_VERSION_1: u64 = 1 << 32;

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

// ---------------------------------------------------------------------------
// virtio-mmio registers.

const MAGIC: u32 = 0x7472_6976; // "virt"

const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_DEVICE_FEATURES: u64 = 0x010;
const R_DEVICE_FEATURES_SEL: u64 = 0x014;
const R_DRIVER_FEATURES: u64 = 0x020;
const R_DRIVER_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_QUEUE_NOTIFY: u64 = 0x050;
const R_STATUS: u64 = 0x070;
const R_QUEUE_DESC: u64 = 0x080;
const R_QUEUE_DRIVER: u64 = 0x090;
const R_QUEUE_DEVICE: u64 = 0x0a0;
const R_CONFIG_GENERATION: u64 = 0x0fc;
const R_CONFIG: u64 = 0x100;

// ---------------------------------------------------------------------------
// virtio-pci: vendor capabilities and the common configuration structure.

const PCI_VENDOR: u16 = 0x1af4;
/// Modern devices: 0x1040 + virtio device ID.
const PCI_MODERN_BASE: u16 = 0x1040;
/// Transitional devices: 0x1000..=0x103f, virtio ID in the subsystem ID.
const PCI_TRANSITIONAL: core::ops::RangeInclusive<u16> = 0x1000..=0x103f;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

const C_DEVICE_FEATURE_SELECT: u64 = 0x00;
const C_DEVICE_FEATURE: u64 = 0x04;
const C_DRIVER_FEATURE_SELECT: u64 = 0x08;
const C_DRIVER_FEATURE: u64 = 0x0c;
const C_CONFIG_MSIX_VECTOR: u64 = 0x10;
const C_NUM_QUEUES: u64 = 0x12;
const C_DEVICE_STATUS: u64 = 0x14;
const C_CONFIG_GENERATION: u64 = 0x15;
const C_QUEUE_SELECT: u64 = 0x16;
const C_QUEUE_SIZE: u64 = 0x18;
const C_QUEUE_MSIX_VECTOR: u64 = 0x1a;
const C_QUEUE_ENABLE: u64 = 0x1c;
const C_QUEUE_NOTIFY_OFF: u64 = 0x1e;
const C_QUEUE_DESC: u64 = 0x20;
const C_QUEUE_DRIVER: u64 = 0x28;
const C_QUEUE_DEVICE: u64 = 0x30;
/// Size of the common configuration structure up to queue_device.
const COMMON_LEN: u32 = 0x38;

const NO_VECTOR: u16 = 0xffff;

// ---------------------------------------------------------------------------
// Register access: identity mapped, user accessible below 4 GiB (devices
// whose registers lie elsewhere are refused by `discover`).

fn rd32(addr: u64) -> u32 {
    // SAFETY: a device register inside a window `discover` checked.
    unsafe { core::ptr::read_volatile(addr as usize as *const u32) }
}

fn wr32(addr: u64, v: u32) {
    // SAFETY: as in `rd32`.
    unsafe { core::ptr::write_volatile(addr as usize as *mut u32, v) }
}

fn rd16(addr: u64) -> u16 {
    // SAFETY: as in `rd32`.
    unsafe { core::ptr::read_volatile(addr as usize as *const u16) }
}

fn wr16(addr: u64, v: u16) {
    // SAFETY: as in `rd32`.
    unsafe { core::ptr::write_volatile(addr as usize as *mut u16, v) }
}

fn rd8(addr: u64) -> u8 {
    // SAFETY: as in `rd32`.
    unsafe { core::ptr::read_volatile(addr as usize as *const u8) }
}

fn wr8(addr: u64, v: u8) {
    // SAFETY: as in `rd32`.
    unsafe { core::ptr::write_volatile(addr as usize as *mut u8, v) }
}

/// Where a device's registers are: everything a driver needs to reach them.
#[derive(Clone, Copy)]
enum Regs {
    /// Base of the virtio-mmio window.
    Mmio(u64),
    /// Addresses of the virtio-pci structures (found through the vendor
    /// capabilities: BAR address + offset).
    Pci {
        common: u64,
        notify: u64,
        notify_len: u32,
        notify_mult: u32,
        /// 0 (and length 0) when the device has no device-specific config.
        device: u64,
        device_len: u32,
    },
}

impl Regs {
    fn status(&self) -> u32 {
        match *self {
            Regs::Mmio(b) => rd32(b + R_STATUS),
            Regs::Pci { common, .. } => rd8(common + C_DEVICE_STATUS) as u32,
        }
    }

    fn set_status(&self, s: u32) {
        match *self {
            Regs::Mmio(b) => wr32(b + R_STATUS, s),
            Regs::Pci { common, .. } => wr8(common + C_DEVICE_STATUS, s as u8),
        }
    }

    fn device_features(&self) -> u64 {
        let (sel, val) = match *self {
            Regs::Mmio(b) => (b + R_DEVICE_FEATURES_SEL, b + R_DEVICE_FEATURES),
            Regs::Pci { common, .. } => {
                (common + C_DEVICE_FEATURE_SELECT, common + C_DEVICE_FEATURE)
            }
        };
        wr32(sel, 1);
        let hi = rd32(val) as u64;
        wr32(sel, 0);
        hi << 32 | rd32(val) as u64
    }

    fn set_driver_features(&self, f: u64) {
        let (sel, val) = match *self {
            Regs::Mmio(b) => (b + R_DRIVER_FEATURES_SEL, b + R_DRIVER_FEATURES),
            Regs::Pci { common, .. } => {
                (common + C_DRIVER_FEATURE_SELECT, common + C_DRIVER_FEATURE)
            }
        };
        wr32(sel, 1);
        wr32(val, (f >> 32) as u32);
        wr32(sel, 0);
        wr32(val, f as u32);
    }

    fn config_generation(&self) -> u32 {
        match *self {
            Regs::Mmio(b) => rd32(b + R_CONFIG_GENERATION),
            Regs::Pci { common, .. } => rd8(common + C_CONFIG_GENERATION) as u32,
        }
    }

    /// Address and length of the device-specific configuration.
    fn config_window(&self) -> (u64, u64) {
        match *self {
            // The MMIO window's size is not checked here, as before.
            Regs::Mmio(b) => (b + R_CONFIG, u64::MAX),
            Regs::Pci {
                device, device_len, ..
            } => (device, device_len as u64),
        }
    }

    /// Selects queue `index` and returns the largest size the device allows
    /// (0: no such queue), or an error if it is already enabled.
    fn select_queue(&self, index: u16) -> Result<u32, &'static str> {
        let (live, max) = match *self {
            Regs::Mmio(b) => {
                wr32(b + R_QUEUE_SEL, index as u32);
                (rd32(b + R_QUEUE_READY), rd32(b + R_QUEUE_NUM_MAX))
            }
            Regs::Pci { common, .. } => {
                if index >= rd16(common + C_NUM_QUEUES) {
                    return Ok(0);
                }
                wr16(common + C_QUEUE_SELECT, index);
                (
                    rd16(common + C_QUEUE_ENABLE) as u32,
                    rd16(common + C_QUEUE_SIZE) as u32,
                )
            }
        };
        if live != 0 {
            return Err("queue already live after reset");
        }
        Ok(max)
    }

    /// Programs the selected queue and enables it; returns how to notify it.
    fn enable_queue(&self, index: u16, q: &Virtq) -> Result<Notify, &'static str> {
        let areas = [q.desc as u64, q.avail as u64, q.used as u64];
        match *self {
            Regs::Mmio(b) => {
                wr32(b + R_QUEUE_NUM, q.size as u32);
                for (reg, addr) in [R_QUEUE_DESC, R_QUEUE_DRIVER, R_QUEUE_DEVICE]
                    .into_iter()
                    .zip(areas)
                {
                    wr32(b + reg, addr as u32);
                    wr32(b + reg + 4, (addr >> 32) as u32);
                }
                wr32(b + R_QUEUE_READY, 1);
                Ok(Notify::Mmio(b + R_QUEUE_NOTIFY, index as u32))
            }
            Regs::Pci {
                common,
                notify,
                notify_len,
                notify_mult,
                ..
            } => {
                let off = rd16(common + C_QUEUE_NOTIFY_OFF) as u64 * notify_mult as u64;
                if off + 2 > notify_len as u64 {
                    return Err("queue notify address outside the notify structure");
                }
                wr16(common + C_QUEUE_SIZE, q.size);
                wr16(common + C_QUEUE_MSIX_VECTOR, NO_VECTOR);
                // 64-bit fields as two 32-bit halves, low first (spec 4.1.3.1).
                for (reg, addr) in [C_QUEUE_DESC, C_QUEUE_DRIVER, C_QUEUE_DEVICE]
                    .into_iter()
                    .zip(areas)
                {
                    wr32(common + reg, addr as u32);
                    wr32(common + reg + 4, (addr >> 32) as u32);
                }
                wr16(common + C_QUEUE_ENABLE, 1);
                Ok(Notify::Pci(notify + off, index))
            }
        }
    }
}

/// Where and what to write to notify one queue.
#[derive(Clone, Copy)]
enum Notify {
    /// QueueNotify register, queue index (32-bit write).
    Mmio(u64, u32),
    /// The queue's notify address, queue index (16-bit write).
    Pci(u64, u16),
}

impl Notify {
    fn send(self) {
        match self {
            Notify::Mmio(a, v) => wr32(a, v),
            Notify::Pci(a, v) => wr16(a, v),
        }
    }
}

// ---------------------------------------------------------------------------
// Discovery.

/// Where a device sits, for the device listing.
#[derive(Clone, Copy)]
pub enum At {
    /// A `virtio_mmio.device=<size>@<base>:<irq>` entry.
    Mmio { base: u64, size: u64 },
    /// A function on PCI bus 0; `span` is the extent of the virtio
    /// structures in the BAR holding the common configuration.
    Pci { addr: pci::Addr, span: u64 },
}

/// One virtio device, as discovery found it (identity and offered features;
/// nothing reset or set up yet).
#[derive(Clone, Copy)]
pub struct Dev {
    pub at: At,
    /// MMIO: the command line's IRQ; PCI: the interrupt line register.
    pub irq: u32,
    /// 0 when the window does not hold a virtio device.
    pub id: u32,
    /// 2: a virtio 1.x interface this driver runs (virtio-mmio version 2, or
    /// virtio-pci with the modern capabilities); 1: legacy only; 0: unusable.
    pub version: u32,
    pub features: u64,
    /// Why a device is unusable (version 0), and the address concerned.
    pub problem: Option<(&'static str, u64)>,
    regs: Regs,
}

impl Dev {
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
    pub list: [Option<Dev>; MAX_DEVICES],
    pub count: usize,
}

impl Devices {
    pub fn iter(&self) -> impl Iterator<Item = &Dev> {
        self.list[..self.count].iter().flatten()
    }

    fn push(&mut self, d: Dev) {
        if self.count < MAX_DEVICES {
            self.list[self.count] = Some(d);
            self.count += 1;
        }
    }

    /// The first device of type `id` this driver can run (version 2).
    pub fn first(&self, id: u32) -> Result<Dev, &'static str> {
        match self.iter().find(|d| d.id == id && d.version == 2) {
            Some(d) => Ok(*d),
            None => match self.iter().find(|d| d.id == id) {
                Some(Dev {
                    problem: Some((why, _)),
                    ..
                }) => Err(why),
                Some(_) => Err("only a legacy virtio device found"),
                None => Err("no such virtio device (PCI bus 0, virtio_mmio.device=)"),
            },
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

/// A virtio structure a vendor capability points at.
#[derive(Clone, Copy, Default)]
struct Found {
    bar: u8,
    offset: u32,
    len: u32,
}

/// Reads a virtio-pci function's identity and locates its structures.
fn probe_pci(f: &pci::Function) -> Option<Dev> {
    let a = f.addr;
    let id = if (PCI_MODERN_BASE..PCI_MODERN_BASE + 0x40).contains(&f.device) {
        (f.device - PCI_MODERN_BASE) as u32
    } else if PCI_TRANSITIONAL.contains(&f.device) {
        a.read32(pci::SUBSYSTEM) >> 16
    } else {
        return None;
    };
    let mut d = Dev {
        at: At::Pci { addr: a, span: 0 },
        irq: a.read32(pci::INTERRUPT) & 0xff,
        id,
        version: 1,
        features: 0,
        problem: None,
        regs: Regs::Mmio(0),
    };
    // The first capability of each type is the preferred one (spec 4.1.4).
    let mut caps: [Option<Found>; 5] = [None; 5];
    let mut notify_mult = 0;
    for (off, head) in a.caps() {
        if head as u8 != pci::CAP_VENDOR {
            continue;
        }
        let (cap_len, cfg_type) = ((head >> 16) as u8, (head >> 24) as u8);
        let slot = match cfg_type {
            CAP_COMMON | CAP_NOTIFY | CAP_ISR | CAP_DEVICE => cfg_type as usize,
            _ => continue,
        };
        if caps[slot].is_some() || cap_len < 16 {
            continue;
        }
        let bar = a.read32(off + 4) as u8;
        if bar > 5 {
            continue;
        }
        if cfg_type == CAP_NOTIFY {
            if cap_len < 20 {
                continue;
            }
            notify_mult = a.read32(off + 16);
        }
        caps[slot] = Some(Found {
            bar,
            offset: a.read32(off + 8),
            len: a.read32(off + 12),
        });
    }
    let (Some(common), Some(notify)) = (caps[CAP_COMMON as usize], caps[CAP_NOTIFY as usize])
    else {
        // A transitional device without the modern interface: legacy only.
        return Some(d);
    };
    if common.len < COMMON_LEN {
        d.version = 0;
        d.problem = Some(("virtio-pci common config structure too short", 0));
        return Some(d);
    }
    // Each BAR read once; a structure's address must lie in the identity map.
    let mut bars: [Option<Option<u64>>; 6] = [None; 6];
    let mut place = |s: Found| -> Result<u64, (&'static str, u64)> {
        let base = *bars[s.bar as usize].get_or_insert_with(|| a.mem_bar(s.bar));
        match base {
            None => Err((
                "virtio-pci structure in an I/O or malformed BAR",
                s.bar as u64,
            )),
            Some(0) => Err(("virtio-pci BAR not assigned", s.bar as u64)),
            Some(b) if b + s.offset as u64 + s.len as u64 > 1 << 32 => Err((
                "virtio-pci BAR above 4 GiB, outside the identity map: device skipped",
                b,
            )),
            Some(b) => Ok(b + s.offset as u64),
        }
    };
    let device = caps[CAP_DEVICE as usize].unwrap_or_default();
    let placed = (|| {
        Ok((
            place(common)?,
            place(notify)?,
            if device.len > 0 { place(device)? } else { 0 },
        ))
    })();
    let (common_addr, notify_addr, device_addr) = match placed {
        Ok(x) => x,
        Err(p) => {
            d.version = 0;
            d.problem = Some(p);
            return Some(d);
        }
    };
    let span = caps
        .iter()
        .flatten()
        .filter(|s| s.bar == common.bar)
        .map(|s| s.offset as u64 + s.len as u64)
        .max()
        .unwrap_or(0);
    d.at = At::Pci { addr: a, span };
    d.regs = Regs::Pci {
        common: common_addr,
        notify: notify_addr,
        notify_len: notify.len,
        notify_mult,
        device: device_addr,
        device_len: device.len,
    };
    d.version = 2;
    a.enable();
    d.features = d.regs.device_features();
    Some(d)
}

/// Finds the virtio devices: on PCI bus 0 first, in (device, function)
/// order, then the command line's `virtio_mmio.device=` entries in their
/// order. Reads their identity and offered features; no reset (harmless for
/// workloads that do not use them).
pub fn discover(cmdline: &[u8], bus: &pci::Bus) -> Devices {
    let mut devs = Devices {
        list: [None; MAX_DEVICES],
        count: 0,
    };
    for f in bus.iter().filter(|f| f.vendor == PCI_VENDOR) {
        if let Some(d) = probe_pci(f) {
            devs.push(d);
        }
    }
    for tok in cmdline.split(|b| b.is_ascii_whitespace()) {
        let Some(v) = tok.strip_prefix(b"virtio_mmio.device=") else {
            continue;
        };
        let Some((size, base, irq)) = parse_entry(v) else {
            continue;
        };
        // The identity map covers the first 4 GiB only.
        if base == 0 || base + size.max(0x100) > 1 << 32 {
            continue;
        }
        let mut d = Dev {
            at: At::Mmio { base, size },
            irq,
            id: 0,
            version: 0,
            features: 0,
            problem: None,
            regs: Regs::Mmio(base),
        };
        if rd32(base + R_MAGIC) == MAGIC {
            d.version = rd32(base + R_VERSION);
            d.id = rd32(base + R_DEVICE_ID);
            if d.id != 0 && d.version == 2 {
                d.features = d.regs.device_features();
            }
        }
        devs.push(d);
    }
    devs
}

// ---------------------------------------------------------------------------
// Driver side.

/// A device after the virtio initialization sequence (up to FEATURES_OK).
pub struct Transport {
    regs: Regs,
    pub features: u64,
}

impl Transport {
    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation: `wanted` is what the
    /// driver can use; VERSION_1 must be offered (this is not a legacy driver).
    pub fn init(dev: &Dev, wanted: u64) -> Result<Transport, &'static str> {
        let regs = dev.regs;
        if dev.version != 2 {
            return Err("not a virtio 1.x device");
        }
        if let Regs::Mmio(base) = regs {
            if rd32(base + R_MAGIC) != MAGIC || rd32(base + R_VERSION) != 2 {
                return Err("not a virtio-mmio version 2 device");
            }
        }
        regs.set_status(0);
        // A reset completes when the device reads back status 0.
        let mut spins = 0;
        while regs.status() != 0 {
            spins += 1;
            if spins > 1000 {
                return Err("device does not reset");
            }
        }
        if let Regs::Pci { common, .. } = regs {
            wr16(common + C_CONFIG_MSIX_VECTOR, NO_VECTOR);
        }
        regs.set_status(S_ACKNOWLEDGE);
        regs.set_status(S_ACKNOWLEDGE | S_DRIVER);
        let offered = regs.device_features();
        if offered & F_VERSION_1 == 0 {
            regs.set_status(S_FAILED);
            return Err("device does not offer VERSION_1");
        }
        let features = offered & (wanted | F_VERSION_1);
        regs.set_driver_features(features);
        regs.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if regs.status() & S_FEATURES_OK == 0 {
            regs.set_status(S_FAILED);
            return Err("device did not accept the features (FEATURES_OK cleared)");
        }
        Ok(Transport { regs, features })
    }

    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// Sets up queue `index` with at most `want` entries (the device's
    /// maximum if smaller; rounded down to a power of two).
    pub fn queue(&self, index: u16, want: u16) -> Result<Virtq, &'static str> {
        let max = self.regs.select_queue(index)?;
        if max == 0 {
            return Err("queue not available");
        }
        let mut size = (max.min(want as u32).min(32768)) as u16;
        size = 1 << (15 - size.leading_zeros());
        let mut q = Virtq::new(size);
        q.notify = Some(self.regs.enable_queue(index, &q)?);
        Ok(q)
    }

    pub fn driver_ok(&self) {
        self.regs
            .set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    }

    pub fn fail(&self) {
        self.regs.set_status(S_FAILED);
    }

    /// Reads `N` bytes of device config at `off`, retried until the config
    /// generation is stable (a consistent snapshot, spec 4.2.2.2). Aligned
    /// 32-bit (else 16-bit, else byte) accesses, as the fields' widths
    /// allow; bytes beyond the device's config read as 0.
    pub fn config<const N: usize>(&self, off: usize) -> [u8; N] {
        let (base, len) = self.regs.config_window();
        let width = if off.is_multiple_of(4) && N.is_multiple_of(4) {
            4
        } else if off.is_multiple_of(2) && N.is_multiple_of(2) {
            2
        } else {
            1
        };
        loop {
            let g0 = self.regs.config_generation();
            let mut out = [0u8; N];
            for (i, chunk) in out.chunks_exact_mut(width).enumerate() {
                let o = (off + i * width) as u64;
                if o + width as u64 > len {
                    break;
                }
                let a = base + o;
                match width {
                    4 => chunk.copy_from_slice(&rd32(a).to_le_bytes()),
                    2 => chunk.copy_from_slice(&rd16(a).to_le_bytes()),
                    _ => chunk[0] = rd8(a),
                }
            }
            if self.regs.config_generation() == g0 {
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
    /// Set once the queue is enabled.
    notify: Option<Notify>,
    /// Notifications sent (each one a VM exit).
    pub notifies: u64,
}

impl Virtq {
    fn new(size: u16) -> Virtq {
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
            notify: None,
            notifies: 0,
        }
    }

    fn send_notify(&mut self) {
        if let Some(n) = self.notify {
            self.notifies += 1;
            n.send();
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
            self.send_notify();
        }
    }

    /// Always notifies (for rare requests where the cost does not matter).
    pub fn kick_always(&mut self) {
        fence(Ordering::SeqCst);
        self.notified_idx = self.avail_idx;
        self.send_notify();
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
