//! Command line and the workloads (all at CPL3, natively).

use core::sync::atomic::Ordering;

use crate::bootinfo::BootInfo;
use crate::tables::Cpus;
use crate::virtio::Devices;
use crate::{clock, smp, MAX_CPUS};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Hello,
    Dirty,
    Smp,
    /// virtio-blk write/flush/read/verify (see blk.rs).
    Blk,
    /// TCP/IP services over virtio-net (see net.rs).
    Net,
    /// The service fault-tolerance tests and benchmarks run against (ft.rs).
    Ft,
    /// Self-checks of the failure reports: a page fault / a Rust panic.
    Fault,
    Panic,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Shutdown,
    Reset,
    Halt,
}

pub struct Config {
    pub workload: Workload,
    pub dirty_mib: u64,
    pub dirty_rate: u64,
    pub dirty_ms: u64,
    pub smp_iters: u64,
    pub exit: Exit,
    /// `clock=tsc`: skip kvmclock (exercises the fallback).
    pub force_tsc: bool,
    /// `pci=cf8`: configuration space through ports 0xcf8/0xcfc only.
    pub pci_cf8: bool,
    /// `pci=off`: no PCI scan (virtio-mmio devices only).
    pub pci_off: bool,
    pub blk_mib: u64,
    pub blk_start: u64,
    pub blk_seq: u64,
    pub blk_req_kib: u64,
    pub blk_verify_only: bool,
    pub net: crate::net::Net,
    pub net_count: u64,
    pub net_ms: u64,
    /// Pages per second `workload=ft` rewrites (0 = none).
    pub ft_dirty_rate: u64,
    /// Size of the region `workload=ft` dirties and checks, MiB.
    pub ft_dirty_mib: u64,
    /// Bytes each rewrite of a page changes in `workload=ft` (0: every word).
    pub ft_dirty_bytes: u64,
}

pub(crate) fn parse_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add((b - b'0') as u64)?;
    }
    Some(n)
}

pub(crate) fn parse_ipv4(v: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = v.split(|&b| b == b'.');
    for o in out.iter_mut() {
        *o = u8::try_from(parse_u64(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// `A.B.C.D/prefix`, or `A.B.C.D` meaning /24.
fn parse_cidr(v: &[u8]) -> Option<([u8; 4], u8)> {
    match v.iter().position(|&b| b == b'/') {
        Some(i) => {
            let prefix = parse_u64(&v[i + 1..]).filter(|&p| p <= 32)? as u8;
            Some((parse_ipv4(&v[..i])?, prefix))
        }
        None => Some((parse_ipv4(v)?, 24)),
    }
}

impl Config {
    /// `key=value` tokens; anything unknown or malformed is ignored so Linux
    /// style parameters can share the command line.
    pub fn parse(cmdline: &[u8]) -> Config {
        let mut c = Config {
            workload: Workload::Hello,
            dirty_mib: 16,
            dirty_rate: 0,
            dirty_ms: 1000,
            smp_iters: 20_000,
            exit: Exit::Shutdown,
            force_tsc: false,
            pci_cf8: false,
            pci_off: false,
            blk_mib: 8,
            blk_start: 0,
            blk_seq: 1,
            blk_req_kib: 64,
            blk_verify_only: false,
            net: crate::net::Net {
                ip: [192, 168, 249, 2],
                prefix: 24,
                gw: None,
            },
            net_count: 1000,
            net_ms: 0,
            ft_dirty_rate: 0,
            ft_dirty_mib: 16,
            ft_dirty_bytes: 0,
        };
        for tok in cmdline.split(|b| b.is_ascii_whitespace()) {
            let Some(eq) = tok.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (k, v) = (&tok[..eq], &tok[eq + 1..]);
            match k {
                b"workload" => match v {
                    b"hello" => c.workload = Workload::Hello,
                    b"dirty" => c.workload = Workload::Dirty,
                    b"smp" => c.workload = Workload::Smp,
                    b"blk" => c.workload = Workload::Blk,
                    b"net" => c.workload = Workload::Net,
                    b"ft" => c.workload = Workload::Ft,
                    b"fault" => c.workload = Workload::Fault,
                    b"panic" => c.workload = Workload::Panic,
                    _ => {}
                },
                b"exit" => match v {
                    b"shutdown" => c.exit = Exit::Shutdown,
                    b"reset" => c.exit = Exit::Reset,
                    b"halt" => c.exit = Exit::Halt,
                    _ => {}
                },
                b"clock" => c.force_tsc = v == b"tsc",
                b"pci" => {
                    c.pci_cf8 = v == b"cf8";
                    c.pci_off = v == b"off";
                }
                b"dirty.mib" => c.dirty_mib = parse_u64(v).unwrap_or(c.dirty_mib),
                b"dirty.rate" => c.dirty_rate = parse_u64(v).unwrap_or(c.dirty_rate),
                b"dirty.ms" => c.dirty_ms = parse_u64(v).unwrap_or(c.dirty_ms),
                b"smp.iters" => c.smp_iters = parse_u64(v).unwrap_or(c.smp_iters),
                b"blk.mib" => c.blk_mib = parse_u64(v).unwrap_or(c.blk_mib),
                b"blk.start" => c.blk_start = parse_u64(v).unwrap_or(c.blk_start),
                b"blk.seq" => c.blk_seq = parse_u64(v).unwrap_or(c.blk_seq),
                b"blk.req_kib" => c.blk_req_kib = parse_u64(v).unwrap_or(c.blk_req_kib),
                b"blk.verify_only" => c.blk_verify_only = v == b"1",
                // `ip=` is accepted as a short form of `net.ip=` (only in
                // the `A.B.C.D[/prefix]` form; Linux's `ip=` syntax is not).
                b"net.ip" | b"ip" => {
                    if let Some((ip, prefix)) = parse_cidr(v) {
                        c.net.ip = ip;
                        c.net.prefix = prefix;
                    }
                }
                b"net.gw" => c.net.gw = parse_ipv4(v).or(c.net.gw),
                b"net.count" => c.net_count = parse_u64(v).unwrap_or(c.net_count),
                b"net.ms" => c.net_ms = parse_u64(v).unwrap_or(c.net_ms),
                b"ft.dirty_rate" => c.ft_dirty_rate = parse_u64(v).unwrap_or(c.ft_dirty_rate),
                b"ft.dirty_mib" => c.ft_dirty_mib = parse_u64(v).unwrap_or(c.ft_dirty_mib),
                b"ft.dirty_bytes" => c.ft_dirty_bytes = parse_u64(v).unwrap_or(c.ft_dirty_bytes),
                _ => {}
            }
        }
        c
    }
}

pub fn run(cfg: &Config, info: &BootInfo, cpus: &Cpus, devs: &Devices) {
    match cfg.workload {
        Workload::Hello => {}
        Workload::Blk => crate::blk::run(cfg, devs),
        Workload::Net => crate::net::run(cfg, devs),
        Workload::Ft => crate::ft::run(cfg, devs),
        Workload::Dirty => dirty(cfg, info),
        Workload::Smp => smp_run(cfg, cpus),
        Workload::Fault => {
            // Above the 4 GiB identity map: not present.
            // SAFETY: deliberately faults; the kernel reports and powers off.
            unsafe { core::ptr::write_volatile(0x1_0000_1000 as *mut u64, 1) };
        }
        Workload::Panic => panic!("requested by workload=panic"),
    }
}

/// Fixed-point x.yy of num/den.
pub struct Frac(pub u128, pub u128);

impl core::fmt::Display for Frac {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let h = (self.0 * 100).checked_div(self.1).unwrap_or(0);
        write!(f, "{}.{:02}", h / 100, h % 100)
    }
}

// ---------------------------------------------------------------------------
// dirty: rewrite pages of a working set at a set rate, then verify.

const PAGE: u64 = 4096;
const WORDS: usize = 512;

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn page_seed(page: u64, pass: u64) -> u64 {
    mix(page.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ mix(pass.wrapping_add(0x5eed)))
}

/// Places the working set in RAM above the image (from 16 MiB), below 4 GiB
/// (the identity map).
fn working_set(info: &BootInfo, bytes: u64) -> Option<u64> {
    let floor = crate::free_mem_start().max(16 << 20);
    for r in info.ram_regions() {
        let start = r.addr.max(floor).next_multiple_of(2 << 20);
        let end = (r.addr + r.size).min(1 << 32);
        if start.checked_add(bytes).is_some_and(|e| e <= end) {
            return Some(start);
        }
    }
    None
}

fn dirty(cfg: &Config, info: &BootInfo) {
    let bytes = cfg.dirty_mib.saturating_mul(1 << 20);
    let Some(base) = working_set(info, bytes).filter(|_| bytes > 0) else {
        println!(
            "DIRTY error mib={} does not fit in RAM (mem_mib={})",
            cfg.dirty_mib,
            info.ram_mib()
        );
        return;
    };
    let pages = bytes / PAGE;
    // SAFETY: RAM reported by the loader, unused by the image or stacks.
    let mem = unsafe { core::slice::from_raw_parts_mut(base as *mut u64, (bytes / 8) as usize) };
    let rate = cfg.dirty_rate;
    let limit_ns = cfg.dirty_ms * 1_000_000;
    let t0 = clock::now_ns();
    let mut written: u64 = 0;
    let mut next_report_ms = 1000;
    let mut elapsed;
    loop {
        elapsed = clock::now_ns() - t0;
        if limit_ns != 0 && elapsed >= limit_ns {
            break;
        }
        let target = if rate == 0 {
            written + 64
        } else {
            (rate as u128 * elapsed as u128 / 1_000_000) as u64
        };
        if written >= target {
            core::hint::spin_loop();
        }
        while written < target {
            let page = written % pages;
            let seed = page_seed(page, written / pages);
            let words = &mut mem[page as usize * WORDS..(page as usize + 1) * WORDS];
            for (j, w) in words.iter_mut().enumerate() {
                *w = seed.wrapping_add(j as u64);
            }
            written += 1;
        }
        let ms = elapsed / 1_000_000;
        if ms >= next_report_ms {
            println!("DIRTY progress ms={} pages={}", ms, written);
            next_report_ms = ms + 1000;
        }
    }
    let mut bad = None;
    for page in 0..pages.min(written) {
        let pass = (written - 1 - page) / pages;
        let seed = page_seed(page, pass);
        let words = &mem[page as usize * WORDS..(page as usize + 1) * WORDS];
        if words
            .iter()
            .enumerate()
            .any(|(j, &w)| w != seed.wrapping_add(j as u64))
        {
            bad = Some(page);
            break;
        }
    }
    let ms = elapsed / 1_000_000;
    let ppm = Frac(written as u128 * 1_000_000, elapsed.max(1) as u128);
    let mibps = Frac(
        written as u128 * PAGE as u128 * 1_000_000_000,
        elapsed.max(1) as u128 * (1 << 20),
    );
    match bad {
        None => println!(
            "DIRTY result mib={} rate={} ms={} pages={} pages_per_ms={} MiBps={} verify=ok",
            cfg.dirty_mib, rate, ms, written, ppm, mibps
        ),
        Some(p) => println!(
            "DIRTY result mib={} rate={} ms={} pages={} pages_per_ms={} MiBps={} verify=FAIL page={}",
            cfg.dirty_mib, rate, ms, written, ppm, mibps, p
        ),
    }
}

// ---------------------------------------------------------------------------
// smp: every CPU fills and checks a buffer natively; all must agree.

static SMP_ITERS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Returns (checksum, memory read back as written).
fn smp_work(iters: u64) -> (u64, bool) {
    let mut buf = [0u64; 1024];
    let mut sum: u64 = 0;
    let mut ok = true;
    for r in 0..iters {
        let mut x = mix(r ^ 0x5a5a);
        let mut expect: u64 = 0;
        for (i, w) in buf.iter_mut().enumerate() {
            x = mix(x.wrapping_add(i as u64));
            *w = x;
            expect = (expect ^ x).rotate_left(7);
        }
        let seen = core::hint::black_box(&buf);
        let mut h: u64 = 0;
        for &w in seen.iter() {
            h = (h ^ w).rotate_left(7);
        }
        ok &= h == expect;
        sum = sum.rotate_left(13) ^ h;
    }
    (sum, ok)
}

/// One CPU's share; reports and records its result.
pub fn smp_cpu(cpu: usize) {
    let (sum, ok) = smp_work(SMP_ITERS.load(Ordering::Acquire));
    let apic = if cpu < MAX_CPUS {
        smp::APIC_ID[cpu].load(Ordering::Relaxed)
    } else {
        u32::MAX
    };
    if cpu < MAX_CPUS {
        smp::RESULT[cpu].store(if ok { sum } else { !sum }, Ordering::Release);
    }
    if ok {
        println!("SMP cpu={} apic={} result={:x} ok", cpu, apic, sum);
    } else {
        println!("SMP cpu={} apic={} result={:x} FAIL memory", cpu, apic, sum);
    }
    smp::FINISHED.fetch_add(1, Ordering::AcqRel);
}

fn smp_run(cfg: &Config, cpus: &Cpus) {
    SMP_ITERS.store(cfg.smp_iters, Ordering::Release);
    smp::RUN_WORK.store(true, Ordering::Release);
    let expected = cpus.count.max(1);
    let online = if cpus.count > 1 {
        smp::start_aps(&cpus.apic_ids[..cpus.count])
    } else if cpus.count == 0 {
        smp::start_aps(&[])
    } else {
        smp::APIC_ID[0].store(smp::bsp_apic_id(), Ordering::Relaxed);
        1
    };
    let expected = if cpus.count == 0 { online } else { expected };
    smp_cpu(0);
    // Generous: APs share two host cores with the BSP in our CI.
    let deadline = clock::now_ns() + 120_000_000_000;
    while smp::FINISHED.load(Ordering::Acquire) < online && clock::now_ns() < deadline {
        core::hint::spin_loop();
    }
    let finished = smp::FINISHED.load(Ordering::Acquire);
    let reference = smp::RESULT[0].load(Ordering::Acquire);
    let agree =
        (0..online.min(MAX_CPUS)).all(|i| smp::RESULT[i].load(Ordering::Acquire) == reference);
    if online == expected && finished == online && agree {
        println!("SMP done cpus={} ok", online);
    } else {
        println!(
            "SMP done cpus={} expected={} FAIL",
            finished.min(online),
            expected
        );
    }
}
