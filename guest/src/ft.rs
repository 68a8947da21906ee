//! workload=ft: the service the fault-tolerance tests and benchmarks run
//! against. One CPU, everything at CPL3, polled (no interrupts).
//!
//! Command line: `workload=ft net.ip=A.B.C.D/P` (`ip=` is a short form;
//! `net.gw=` as for `workload=net`), `ft.dirty_rate=N` pages per second to
//! rewrite (default 0), `ft.dirty_mib=M` size of the rewritten region (default
//! 16), `ft.dirty_bytes=B` bytes each rewrite of a page changes (default 0: every
//! word; see Region). Devices: the first virtio-net device (required) and the first
//! virtio-blk device if there is one (the service works without a disk).
//!
//! Main loop, forever: poll smoltcp and serve the sockets; rewrite the pages
//! that are due at `ft.dirty_rate` (by the clock; at most 32 per pass, a
//! backlog beyond 100 ms worth is dropped rather than made up in a burst,
//! e.g. after the VM was paused); then one chunk of 2048 iterations of a
//! register-only compute loop, counted as `work` (the FT benchmark compares
//! work/s with and without FT). Nothing but the dirtier writes pages in the
//! region, so its dirty rate is what the VMM's dirty log sees (plus the few
//! pages of stacks, rings and socket buffers the loop itself touches).
//!
//! Region: `ft.dirty_mib` MiB of pages, all written once at start
//! (generation 0), then rewritten round-robin: the k-th rewrite (k = 0, 1, ...)
//! goes to page `k % pages` with generation `k / pages + 1`. A page holds 512
//! little-endian u64 words: `w[0]` = page index, `w[1]` = generation,
//! `w[j]` = `seed + j` for j = 2..511, with `seed = mix(page *
//! 0x9e3779b97f4a7c15 ^ mix(gen ^ 0xf7f7f7f7))` (`mix` = splitmix64's
//! finalizer, see README). So a page can be verified on its own, and against
//! the number of rewrites so far. A region larger than the free RAM ends in
//! `TANDEM-GUEST PANIC out of memory`.
//!
//! With `ft.dirty_bytes=B` (1 ..= 4087; larger is every word) a rewrite changes
//! only `n = ceil(B / 8)` words (a page delta's workload): `w[1]` and a window of
//! `m = max(1, n - 1)` words. Words 2.. are cut into `slots = 510 / m` windows of
//! `m` words (slot `s` = words `2 + s*m .. 2 + (s+1)*m`); generation `g >= 1`
//! rewrites slot `(g - 1) % slots` with `seed(g) + j`. So word `j` of slot `s`
//! holds `seed(g') + j` for the newest `g' <= gen` with `(g' - 1) % slots == s`,
//! or `seed(0) + j` when there is none yet; words past the last slot keep
//! generation 0. Generation 0 (the first fill) writes every word as above.
//!
//! Disk records (sector `lba` = `seq % 2048`, the first 1 MiB of the disk):
//! 64 little-endian u64 words: `w[0]` = ASCII `TANDEMFT`, `w[1]` = `lba`,
//! `w[2]` = `seq`, `w[3]` = checksum (FNV-1a over words like the blk sectors:
//! `h = 0xcbf29ce484222325`, `h = (h ^ w[j]) * 0x100000001b3` for every j
//! except 3), `w[4]` = the run id of this boot (printed in the ready marker),
//! `w[j]` = `mix(lba * 0x9e3779b97f4a7c15 ^ seq * 0xc2b2ae3d27d4eb4f ^ run *
//! 0x165667b19e3779f9 ^ j)` for j = 5..63. Writes are not followed by a FLUSH.
//! `rw` rounds write the same format to sectors 2048..2304 (the 128 KiB after
//! the first MiB), with the round number `k` in place of `seq`.
//!
//! TCP 7000, control (4 connections at a time; lines end with `\n`, a `\r`
//! before it is ignored, a last line without `\n` counts when the client
//! half-closes):
//! - `req` -> `seq += 1`, with a disk the record for `seq` is written and
//!   completed, then `seq <n>`. If the write fails: `bad disk write: <why>`
//!   and `seq` stays (the next `req` rewrites the same record).
//! - `check` -> every page of the region holds its pattern and latest
//!   generation, and (with a disk) for each `s` in `max(1, seq-2047)..=seq`
//!   sector `s % 2048` holds the record of `s`: `ok seq=<n> pages=<k>
//!   disk=<0|1>`, else `bad page <i> gen <g> word <j>`, `bad disk sector <lba>
//!   want seq <s> <holds seq <x>|no record|corrupt>` or `bad disk read: <why>`.
//! - `stats` -> `work <iterations> dirtied <pages> seq <n> uptime_ms <ms>
//!   relays <r> relay_errors <e>` (`dirtied` counts rewrites, `uptime_ms` is
//!   since the workload started, `relays`/`relay_errors` count the `relay`
//!   replies below of either kind; fields are only ever added at the end).
//! - `relay A.B.C.D` or `relay A.B.C.D:PORT` (default port 7000) -> this
//!   guest sends `req` to that peer (another ft guest, nothing special there)
//!   over an outgoing connection of its own and replies `relay <A.B.C.D> seq
//!   <n>` with the peer's number (`relay <A.B.C.D:PORT> seq <n>` for a port
//!   other than 7000), or `relay error <why>`: `missing address`, `bad
//!   address` (not a unicast IPv4 address), `bad port`, `own address`, `no
//!   route` (off-subnet without `net.gw`), `timeout connecting` (no ARP
//!   answer or SYN-ACK), `timeout waiting for the answer`, `timeout waiting
//!   for a free connection`, `connection refused`, `connection closed`,
//!   `answer too long`, `cannot connect`, or `peer said <its line>` (e.g. the
//!   peer's `bad disk write: ...`). The whole relay is bounded by 2 s. One
//!   connection per peer (local port from 49152..=65535), kept open and
//!   reused, reopened when it is gone (a reused one found dead is retried
//!   once within the relay); up to 4 peers at a time, a new peer beyond that
//!   takes over the least recently used idle connection. One `req` at a time
//!   per peer connection: concurrent relays to one peer (from several
//!   clients) are served one after the other. The main loop goes on while a
//!   relay waits (other connections are served, pages dirtied, work done);
//!   the connection that asked reads no further command until the relay's
//!   reply is queued, so replies keep the order of the commands. See
//!   `ft/relay.rs`.
//! - `rw <n>` (1 <= n <= 128) -> read-your-writes round `k` (1, 2, ...): the
//!   records of `k` are written to the `n` sectors from `lba = 2048 + (k * 5)
//!   % (257 - n)` in one request, completed, then read back at once in one
//!   request: `rw <k> ok lba=<lba> sectors=<n>` when every sector holds its
//!   new record, else `rw <k> bad sector <lba> <holds seq <x>|no record|
//!   corrupt>`. Consecutive rounds overlap, so a read must see the newest
//!   write. `bad disk write: <why>` (`k` stays), `bad disk read: <why>`, `bad
//!   no disk`, `bad disk too small` (under 2304 sectors) or `bad rw count`.
//! - `attach <n>` (1 <= n <= 31) -> PCI bus 0 is scanned again and the
//!   virtio disk at device `n` (e.g. one hot-plugged since boot; the VMM
//!   programmed its BAR) becomes the service's disk: `attach ok pci=<bus:dev.fn>
//!   capacity=<sectors> from=<s>`, where `s` = `seq + 1` is the first request
//!   whose record goes to it (`check` verifies records from there on), else
//!   `attach bad <why>` and the disk stays.
//! - `eject` -> what ACPI PCI hot-plug has the guest do when the VMM asks for
//!   a device (the DSDT's `_EVT` and `_EJ0`): read the hot-plug controller's
//!   PCID register (the slots the VMM wants back; reading clears it), let go
//!   of the service's disk if it sits in one of them, and write those slots
//!   to B0EJ: `eject slots=0x<bitmap>` (0: nothing was asked).
//! - `quit` -> the guest closes the connection (no reply).
//! - `poweroff` -> `bye`, the connection is closed and the guest waits (at
//!   most 2 s) until the client has acknowledged it, then the workload ends
//!   and the guest does what `exit=` says (default: ACPI power-off).
//! - anything else -> `bad unknown command`; a line over 128 bytes -> `bad
//!   line too long`.
//!
//! TCP 7001, sink (2 connections at a time, 1 MiB receive window each):
//! discards what it receives and, when the client half-closes, replies
//! `got <bytes> fnv <h>` and closes; `h` is the FNV-1a 64 hash of the bytes
//! (16 hex digits; `0xcbf29ce484222325`, then per byte `h = (h ^ b) *
//! 0x100000001b3`), so a client can tell that every byte arrived once, in
//! order.
//!
//! ARP and ICMP echo are answered by smoltcp's interface (`ping` works); it
//! also resolves relay peers by ARP (16-entry neighbour cache).
//!
//! Serial: `ft: ready ip=<A.B.C.D> mac=<mac> disk=<0|1> pages=<k>
//! dirty_rate=<n> run=<hex>` once the services listen; `ft: poweroff seq=<n>
//! work=<w> dirtied=<d>` before the workload ends; `ft: error <why>` (no
//! usable NIC: the workload ends) and `ft: disk unusable: <why>` (goes on
//! without a disk).

mod relay;

use core::fmt::Write;

use smoltcp::iface::{SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::tcp;

use self::relay::{Pending, Relays, RELAY_SOCKETS};
use crate::blk::{self, Disk};
use crate::workloads::{parse_u64, Config};
use crate::{clock, dma, net, pci, virtio};

const CONTROL_PORT: u16 = 7000;
const SINK_PORT: u16 = 7001;
const CONTROL_SOCKETS: usize = 4;
const SINK_SOCKETS: usize = 2;
const CONTROL_RX: usize = 4096;
const CONTROL_TX: usize = 16 * 1024;
const SINK_RX: usize = 1 << 20;
const SINK_TX: usize = 4096;
/// Longest command line (the newline included) and longest reply.
const LINE_MAX: usize = 128;
const REPLY_MAX: usize = 128;

const PAGE_WORDS: usize = 512;
/// Most pages rewritten per pass of the main loop (network latency stays low).
const DIRTY_BURST: u64 = 32;
/// Iterations of the compute loop per pass.
const WORK_CHUNK: u64 = 2048;

/// Records live in sectors 0..2048.
const DISK_SLOTS: u64 = 2048;
const SECTOR: usize = 512;
pub const RECORD_MAGIC: [u8; 8] = *b"TANDEMFT";
/// `rw` rounds use sectors RW_BASE..RW_BASE + RW_SPAN, after the records.
const RW_BASE: u64 = DISK_SLOTS;
const RW_SPAN: u64 = 256;
const POWEROFF_DRAIN_NS: u64 = 2_000_000_000;
/// Where the Tandem VMM maps its PCI hot-plug controller (Cloud Hypervisor's PCIU, PCID,
/// B0EJ, PSEG registers; the DSDT's `PHPR` region), below 4 GiB: identity mapped.
const PCI_HOTPLUG_REGS: u64 = 0xfe00_1000;
const PCID: u64 = 0x4;
const B0EJ: u64 = 0x8;

fn page_seed(page: u64, gen: u64) -> u64 {
    blk::mix(page.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ blk::mix(gen ^ 0xf7f7_f7f7))
}

/// Words a rewrite changes besides `w[1]` (`ft.dirty_bytes`; 0: every word).
fn window_words(dirty_bytes: u64) -> usize {
    let words = dirty_bytes.div_ceil(8) as usize;
    if dirty_bytes == 0 || words >= PAGE_WORDS - 1 {
        0
    } else {
        words.saturating_sub(1).max(1)
    }
}

/// The generation whose pattern word `j` holds in generation `gen` (module comment: with
/// windows of `m` words, the newest generation that rewrote word `j`'s window).
fn word_gen(j: usize, gen: u64, m: usize) -> u64 {
    if m == 0 {
        return gen;
    }
    let slots = ((PAGE_WORDS - 2) / m) as u64;
    let slot = ((j - 2) / m) as u64;
    if slot >= slots || gen < slot + 1 {
        return 0;
    }
    gen - (gen - 1 - slot) % slots
}

/// Writes generation `gen` of page `page`: every word for generation 0 or without windows
/// (`m` = 0), else `w[1]` and the window generation `gen` rewrites.
fn fill_page(words: &mut [u64], page: u64, gen: u64, m: usize) {
    words[0] = page;
    words[1] = gen;
    if gen == 0 || m == 0 {
        let seed = page_seed(page, gen);
        for (j, w) in words.iter_mut().enumerate().skip(2) {
            *w = seed.wrapping_add(j as u64);
        }
        return;
    }
    let slots = ((PAGE_WORDS - 2) / m) as u64;
    let first = 2 + ((gen - 1) % slots) as usize * m;
    let seed = page_seed(page, gen);
    for (j, w) in words.iter_mut().enumerate().skip(first).take(m) {
        *w = seed.wrapping_add(j as u64);
    }
}

/// The first word of `words` that differs from page `page`, generation `gen`.
fn page_mismatch(words: &[u64], page: u64, gen: u64, m: usize) -> Option<usize> {
    if words[0] != page {
        return Some(0);
    }
    if words[1] != gen {
        return Some(1);
    }
    let (now, first) = (page_seed(page, gen), page_seed(page, 0));
    words
        .iter()
        .enumerate()
        .skip(2)
        .find(|&(j, &w)| {
            let seed = match word_gen(j, gen, m) {
                g if g == gen => now,
                0 => first,
                g => page_seed(page, g),
            };
            w != seed.wrapping_add(j as u64)
        })
        .map(|(j, _)| j)
}

fn make_record(lba: u64, seq: u64, run: u64) -> [u64; 64] {
    let mut w = [0u64; 64];
    w[0] = u64::from_le_bytes(RECORD_MAGIC);
    w[1] = lba;
    w[2] = seq;
    w[4] = run;
    for (j, x) in w.iter_mut().enumerate().skip(5) {
        *x = blk::mix(
            lba.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ seq.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
                ^ run.wrapping_mul(0x1656_67b1_9e37_79f9)
                ^ j as u64,
        );
    }
    w[3] = blk::checksum(&w);
    w
}

fn record_bytes(rec: &[u64; 64], bytes: &mut [u8]) {
    for (b, w) in bytes.chunks_exact_mut(8).zip(rec.iter()) {
        b.copy_from_slice(&w.to_le_bytes());
    }
}

fn holds_record(sector: &[u8], rec: &[u64; 64]) -> bool {
    sector
        .chunks_exact(8)
        .zip(rec.iter())
        .all(|(b, &w)| b == w.to_le_bytes())
}

/// What `sector` holds instead of `rec`, the record of sequence `want`.
fn describe_instead(out: &mut Reply, sector: &[u8], rec: &[u64; 64], want: u64) {
    let word = |j: usize| u64::from_le_bytes(sector[j * 8..j * 8 + 8].try_into().unwrap_or([0; 8]));
    let _ = if word(0) != rec[0] {
        write!(out, "no record")
    } else if word(2) != want {
        write!(out, "holds seq {}", word(2))
    } else {
        write!(out, "corrupt")
    };
}

/// The largest s <= seq with s % 2048 == lba and s >= 1 (the record sector
/// `lba` must hold), or None if no such request happened yet.
fn expected_seq(lba: u64, seq: u64) -> Option<u64> {
    let r = seq % DISK_SLOTS;
    let base = seq - r;
    let s = if lba <= r {
        Some(base + lba)
    } else {
        (base + lba).checked_sub(DISK_SLOTS)
    };
    s.filter(|&s| s >= 1)
}

/// A reply line (cut at REPLY_MAX - 1 bytes; the newline always fits).
struct Reply {
    buf: [u8; REPLY_MAX],
    len: usize,
}

impl Reply {
    fn new() -> Reply {
        Reply {
            buf: [0; REPLY_MAX],
            len: 0,
        }
    }

    fn line(&mut self) -> &[u8] {
        self.buf[self.len] = b'\n';
        &self.buf[..self.len + 1]
    }
}

impl Write for Reply {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(REPLY_MAX - 1 - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// A control connection's partial input line.
struct Conn {
    line: [u8; LINE_MAX],
    len: usize,
    /// The current line grew past LINE_MAX: dropped up to its newline.
    overflow: bool,
    /// `quit` or `poweroff` seen: further input is ignored.
    closing: bool,
    /// A `relay` in progress (further lines wait for its reply).
    relay: Pending,
}

impl Conn {
    const fn new() -> Conn {
        Conn {
            line: [0; LINE_MAX],
            len: 0,
            overflow: false,
            closing: false,
            relay: Pending::None,
        }
    }
}

enum Action {
    None,
    Poweroff,
    /// `relay` to a valid peer: the reply comes later.
    Relay(relay::Peer),
}

struct Ft {
    seq: u64,
    /// The last `rw` round.
    rw_seq: u64,
    work: u64,
    work_state: u64,
    dirtied: u64,
    /// Rewrites dropped because the loop fell too far behind.
    skipped: u64,
    rate: u64,
    t0: u64,
    region: &'static mut [u64],
    pages: u64,
    /// Words a rewrite changes besides the generation (0: every word).
    window: usize,
    disk: Option<Disk>,
    /// The PCI device number of the disk (for `eject`); None for virtio-mmio.
    disk_slot: Option<u8>,
    /// The first request whose record is on the current disk (`attach` moves it).
    disk_from: u64,
    run: u64,
    relay: Relays,
}

#[inline(never)]
fn work_chunk(mut x: u64) -> u64 {
    for _ in 0..WORK_CHUNK {
        x = x
            .wrapping_mul(0x5851_f42d_4c95_7f2d)
            .wrapping_add(0x1405_7b7e_f767_814f);
        x ^= x >> 33;
    }
    x
}

impl Ft {
    fn page(&mut self, page: u64) -> &mut [u64] {
        let i = page as usize * PAGE_WORDS;
        &mut self.region[i..i + PAGE_WORDS]
    }

    fn dirty_step(&mut self, now: u64) {
        if self.rate == 0 || self.pages == 0 {
            return;
        }
        let due = (self.rate as u128 * now.saturating_sub(self.t0) as u128 / 1_000_000_000) as u64;
        let due = due.saturating_sub(self.skipped);
        let mut behind = due.saturating_sub(self.dirtied);
        let max_backlog = (self.rate / 10).max(DIRTY_BURST);
        if behind > max_backlog {
            self.skipped += behind - max_backlog;
            behind = max_backlog;
        }
        for _ in 0..behind.min(DIRTY_BURST) {
            let page = self.dirtied % self.pages;
            let gen = self.dirtied / self.pages + 1;
            let m = self.window;
            fill_page(self.page(page), page, gen, m);
            self.dirtied += 1;
        }
    }

    fn work_step(&mut self) {
        self.work_state = core::hint::black_box(work_chunk(self.work_state));
        self.work += WORK_CHUNK;
    }

    fn req(&mut self, out: &mut Reply) {
        let next = self.seq + 1;
        if let Some(disk) = self.disk.as_mut() {
            let lba = next % DISK_SLOTS;
            let rec = make_record(lba, next, self.run);
            let mut bytes = [0u8; SECTOR];
            record_bytes(&rec, &mut bytes);
            if let Err(e) = disk.write(lba, &bytes) {
                let _ = write!(out, "bad disk write: {}", e);
                return;
            }
        }
        self.seq = next;
        let _ = write!(out, "seq {}", next);
    }

    fn check(&mut self, out: &mut Reply) {
        for page in 0..self.pages {
            let gen = self.dirtied / self.pages + u64::from(page < self.dirtied % self.pages);
            let m = self.window;
            if let Some(j) = page_mismatch(self.page(page), page, gen, m) {
                let _ = write!(out, "bad page {} gen {} word {}", page, gen, j);
                return;
            }
        }
        let seq = self.seq;
        let run = self.run;
        let from = self.disk_from;
        if let Some(disk) = self.disk.as_mut() {
            // Sectors 1..=seq before the first wrap, all of them after it.
            let (mut lba, end) = if seq < DISK_SLOTS {
                (1, seq + 1)
            } else {
                (0, DISK_SLOTS)
            };
            let per = (disk.max_bytes() / SECTOR) as u64;
            while lba < end {
                let n = per.min(end - lba);
                let data = match disk.read(lba, n as usize) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = write!(out, "bad disk read: {}", e);
                        return;
                    }
                };
                for (k, sector) in data.chunks_exact(SECTOR).enumerate() {
                    let at = lba + k as u64;
                    let Some(want) = expected_seq(at, seq).filter(|&s| s >= from) else {
                        continue;
                    };
                    let rec = make_record(at, want, run);
                    if !holds_record(sector, &rec) {
                        let _ = write!(out, "bad disk sector {} want seq {} ", at, want);
                        describe_instead(out, sector, &rec, want);
                        return;
                    }
                }
                lba += n;
            }
        }
        let _ = write!(
            out,
            "ok seq={} pages={} disk={}",
            seq,
            self.pages,
            u8::from(self.disk.is_some())
        );
    }

    /// `rw <n>`: one read-your-writes round (see the module comment).
    fn rw(&mut self, arg: &[u8], out: &mut Reply) {
        let run = self.run;
        let Some(disk) = self.disk.as_mut() else {
            let _ = write!(out, "bad no disk");
            return;
        };
        if disk.capacity < RW_BASE + RW_SPAN {
            let _ = write!(out, "bad disk too small");
            return;
        }
        let max = (disk.max_bytes() / SECTOR) as u64;
        let Some(n) = parse_u64(arg).filter(|&n| n >= 1 && n <= max.min(RW_SPAN)) else {
            let _ = write!(out, "bad rw count");
            return;
        };
        let k = self.rw_seq + 1;
        // Rounds overlap their predecessors: reads must see the newest data.
        let lba = RW_BASE + (k * 5) % (RW_SPAN + 1 - n);
        let fill = |i: usize, bytes: &mut [u8]| {
            record_bytes(&make_record(lba + i as u64, k, run), bytes);
        };
        if let Err(e) = disk.write_with(lba, n as usize, fill) {
            let _ = write!(out, "bad disk write: {}", e);
            return;
        }
        self.rw_seq = k;
        let data = match disk.read(lba, n as usize) {
            Ok(d) => d,
            Err(e) => {
                let _ = write!(out, "bad disk read: {}", e);
                return;
            }
        };
        for (i, sector) in data.chunks_exact(SECTOR).enumerate() {
            let at = lba + i as u64;
            let rec = make_record(at, k, run);
            if !holds_record(sector, &rec) {
                let _ = write!(out, "rw {} bad sector {} ", k, at);
                describe_instead(out, sector, &rec, k);
                return;
            }
        }
        let _ = write!(out, "rw {} ok lba={} sectors={}", k, lba, n);
    }

    /// `attach <n>`: the virtio disk at PCI device `n` becomes the service's disk.
    fn attach(&mut self, arg: &[u8], out: &mut Reply) {
        let Some(slot) = parse_u64(arg).filter(|n| (1..32).contains(n)) else {
            let _ = write!(out, "attach bad device number");
            return;
        };
        let slot = slot as u8;
        // Only that function is probed: the devices in use are left alone.
        let bus = pci::scan();
        let mut one = pci::Bus::empty();
        for f in bus
            .iter()
            .filter(|f| f.addr.dev == slot && f.addr.func == 0)
        {
            one.list[0] = *f;
            one.count = 1;
        }
        let devs = virtio::discover(b"", &one);
        let dev = match devs.first(virtio::ID_BLK) {
            Ok(d) => d,
            Err(e) => {
                let _ = write!(out, "attach bad 00:{:02x}.0: {}", slot, e);
                return;
            }
        };
        match Disk::open(&dev, 64) {
            Ok(disk) if disk.ro => {
                let _ = write!(out, "attach bad read-only");
            }
            Ok(disk) if disk.capacity < DISK_SLOTS => {
                let _ = write!(out, "attach bad {} sectors", disk.capacity);
            }
            Ok(disk) => {
                let _ = write!(
                    out,
                    "attach ok pci=00:{:02x}.0 capacity={} from={}",
                    slot,
                    disk.capacity,
                    self.seq + 1
                );
                self.disk = Some(disk);
                self.disk_slot = Some(slot);
                self.disk_from = self.seq + 1;
            }
            Err(e) => {
                let _ = write!(out, "attach bad {}", e);
            }
        }
    }

    /// `eject`: gives up the slots the VMM asked for, as ACPI's `_EVT` / `_EJ0` would.
    fn eject(&mut self, out: &mut Reply) {
        // SAFETY: the VMM's hot-plug registers, MMIO in the identity map, user accessible;
        // each access exits to the VMM.
        let down = unsafe { core::ptr::read_volatile((PCI_HOTPLUG_REGS + PCID) as *const u32) };
        if let Some(slot) = self.disk_slot {
            if down & (1 << slot) != 0 {
                self.disk = None;
                self.disk_slot = None;
            }
        }
        if down != 0 {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile((PCI_HOTPLUG_REGS + B0EJ) as *mut u32, down) };
        }
        let _ = write!(out, "eject slots=0x{:x}", down);
    }

    fn stats(&self, out: &mut Reply) {
        let _ = write!(
            out,
            "work {} dirtied {} seq {} uptime_ms {} relays {} relay_errors {}",
            self.work,
            self.dirtied,
            self.seq,
            clock::now_ns().saturating_sub(self.t0) / 1_000_000,
            self.relay.ok,
            self.relay.errors
        );
    }

    /// Runs one command line into `out`; returns whether the connection stays
    /// open, and what the main loop must do.
    fn command(&mut self, line: &[u8], out: &mut Reply) -> (bool, Action) {
        let mut end = line.len();
        while end > 0 && matches!(line[end - 1], b'\r' | b' ' | b'\t') {
            end -= 1;
        }
        let mut start = 0;
        while start < end && matches!(line[start], b' ' | b'\t') {
            start += 1;
        }
        let line = &line[start..end];
        if let Some(arg) = line.strip_prefix(b"relay") {
            if arg.is_empty() || matches!(arg[0], b' ' | b'\t') {
                let arg = arg.trim_ascii_start();
                match self.relay.parse(arg) {
                    Ok(peer) => return (true, Action::Relay(peer)),
                    Err(why) => {
                        self.relay.errors += 1;
                        let _ = write!(out, "relay error {}", why);
                        return (true, Action::None);
                    }
                }
            }
        }
        if let Some(arg) = line.strip_prefix(b"rw") {
            if arg.is_empty() || matches!(arg[0], b' ' | b'\t') {
                self.rw(arg.trim_ascii_start(), out);
                return (true, Action::None);
            }
        }
        if let Some(arg) = line.strip_prefix(b"attach") {
            if arg.is_empty() || matches!(arg[0], b' ' | b'\t') {
                self.attach(arg.trim_ascii_start(), out);
                return (true, Action::None);
            }
        }
        match line {
            b"req" => self.req(out),
            b"check" => self.check(out),
            b"stats" => self.stats(out),
            b"eject" => self.eject(out),
            b"quit" => return (false, Action::None),
            b"poweroff" => {
                let _ = write!(out, "bye");
                return (false, Action::Poweroff);
            }
            b"" => {}
            _ => {
                let _ = write!(out, "bad unknown command");
            }
        }
        (true, Action::None)
    }

    /// Serves the complete lines a control connection has sent, as long as
    /// its send buffer has room for a reply.
    fn serve_control(&mut self, s: &mut tcp::Socket, c: &mut Conn) -> Action {
        if c.closing {
            let _ = s.recv(|b| (b.len(), ()));
            return Action::None;
        }
        loop {
            // A relay's reply goes first; lines after a relay wait for it.
            match &mut c.relay {
                Pending::None => {}
                Pending::Queued(..) | Pending::InFlight => return Action::None,
                Pending::Done(reply) => {
                    if s.send_capacity() - s.send_queue() < REPLY_MAX {
                        return Action::None;
                    }
                    let _ = s.send_slice(reply.line());
                    c.relay = Pending::None;
                }
            }
            if let Some(nl) = c.line[..c.len].iter().position(|&b| b == b'\n') {
                if s.send_capacity() - s.send_queue() < REPLY_MAX {
                    return Action::None;
                }
                let mut out = Reply::new();
                let (keep, action) = if c.overflow {
                    c.overflow = false;
                    let _ = write!(out, "bad line too long");
                    (true, Action::None)
                } else {
                    let mut line = [0u8; LINE_MAX];
                    line[..nl].copy_from_slice(&c.line[..nl]);
                    self.command(&line[..nl], &mut out)
                };
                c.line.copy_within(nl + 1..c.len, 0);
                c.len -= nl + 1;
                if let Action::Relay(peer) = action {
                    c.relay = Pending::Queued(peer, clock::now_ns() + relay::TIMEOUT_NS);
                    continue;
                }
                if out.len > 0 {
                    let _ = s.send_slice(out.line());
                }
                if !keep {
                    c.closing = true;
                    s.close();
                    return action;
                }
                continue;
            }
            if c.len == LINE_MAX {
                c.overflow = true;
                c.len = 0;
            }
            if s.can_recv() {
                match s.recv_slice(&mut c.line[c.len..]) {
                    Ok(n) if n > 0 => c.len += n,
                    _ => return Action::None,
                }
            } else if s.state() == tcp::State::CloseWait {
                // The client is done sending: a last line without a newline
                // still counts; then the connection closes once replies are
                // queued (smoltcp sends the FIN after them).
                if c.len > 0 || c.overflow {
                    if c.len == LINE_MAX {
                        c.overflow = true;
                        c.len = 0;
                    }
                    c.line[c.len] = b'\n';
                    c.len += 1;
                    continue;
                }
                c.closing = true;
                s.close();
                return Action::None;
            } else {
                return Action::None;
            }
        }
    }
}

/// What a sink connection received so far: bytes and their FNV-1a 64 hash.
#[derive(Clone, Copy)]
struct SinkTally {
    bytes: u64,
    fnv: u64,
}

impl SinkTally {
    const NEW: SinkTally = SinkTally {
        bytes: 0,
        fnv: 0xcbf2_9ce4_8422_2325,
    };
}

/// Discards what a sink connection receives; `got <bytes> fnv <hash>` once the
/// client half-closes.
fn serve_sink(s: &mut tcp::Socket, tally: &mut SinkTally) {
    while s.can_recv() {
        let taken = s.recv(|b| {
            for &byte in b.iter() {
                tally.fnv = (tally.fnv ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
            (b.len(), b.len())
        });
        match taken {
            Ok(n) if n > 0 => tally.bytes += n as u64,
            _ => break,
        }
    }
    if s.state() == tcp::State::CloseWait && !s.can_recv() {
        let mut out = Reply::new();
        let _ = write!(out, "got {} fnv {:016x}", tally.bytes, tally.fnv);
        let _ = s.send_slice(out.line());
        s.close();
    }
}

pub fn run(cfg: &Config, devs: &virtio::Devices) {
    let vdev = match devs.first(virtio::ID_NET) {
        Ok(d) => d,
        Err(e) => {
            println!("ft: error {}", e);
            return;
        }
    };
    let disk = match devs.first(virtio::ID_BLK) {
        Err(_) if !devs.iter().any(|d| d.id == virtio::ID_BLK) => None,
        Err(e) => {
            println!("ft: disk unusable: {}", e);
            None
        }
        Ok(d) => match Disk::open(&d, 64) {
            Ok(disk) if disk.ro => {
                println!("ft: disk unusable: read-only");
                None
            }
            Ok(disk) if disk.capacity < DISK_SLOTS => {
                println!(
                    "ft: disk unusable: {} sectors, {} needed",
                    disk.capacity, DISK_SLOTS
                );
                None
            }
            Ok(disk) => Some(disk),
            Err(e) => {
                println!("ft: disk unusable: {}", e);
                None
            }
        },
    };
    // Where that disk sits, so that `eject` lets go of it when the VMM asks.
    let disk_slot = match devs.first(virtio::ID_BLK).map(|d| d.at) {
        Ok(virtio::At::Pci { addr, .. }) if disk.is_some() => Some(addr.dev),
        _ => None,
    };
    let (mut dev, mac) = match net::open(&vdev) {
        Ok(x) => x,
        Err(e) => {
            println!("ft: error {}", e);
            return;
        }
    };
    let mut iface = net::interface(&cfg.net, &mut dev, mac);

    let pages = cfg.ft_dirty_mib.saturating_mul(1 << 20) / 4096;
    let region = dma::alloc(pages as usize * 4096, 4096) as *mut u64;
    // SAFETY: a fresh allocation of `pages` pages, never handed out again.
    let region = unsafe { core::slice::from_raw_parts_mut(region, pages as usize * PAGE_WORDS) };
    let storage = dma::alloc_array(CONTROL_SOCKETS + SINK_SOCKETS + RELAY_SOCKETS, || {
        SocketStorage::EMPTY
    });
    let mut sockets = SocketSet::new(&mut storage[..]);
    let relays = Relays::new(&mut sockets, &cfg.net);
    let mut ft = Ft {
        seq: 0,
        rw_seq: 0,
        work: 0,
        work_state: clock::rdtsc(),
        dirtied: 0,
        skipped: 0,
        rate: cfg.ft_dirty_rate,
        t0: 0,
        region,
        pages,
        window: window_words(cfg.ft_dirty_bytes),
        disk,
        disk_slot,
        disk_from: 1,
        run: blk::mix(clock::rdtsc()) | 1,
        relay: relays,
    };
    for page in 0..pages {
        fill_page(ft.page(page), page, 0, 0);
    }

    let mut control_h = [SocketHandle::default(); CONTROL_SOCKETS];
    for h in control_h.iter_mut() {
        *h = sockets.add(net::tcp_socket(CONTROL_RX, CONTROL_TX));
    }
    let mut sink_h = [SocketHandle::default(); SINK_SOCKETS];
    for h in sink_h.iter_mut() {
        *h = sockets.add(net::tcp_socket(SINK_RX, SINK_TX));
    }
    let conns = dma::alloc_array(CONTROL_SOCKETS, Conn::new);
    let mut sink_tally = [SinkTally::NEW; SINK_SOCKETS];
    for (h, c) in control_h.iter().zip(conns.iter_mut()) {
        net::relisten(sockets.get_mut::<tcp::Socket>(*h), CONTROL_PORT);
        *c = Conn::new();
    }
    for h in sink_h {
        net::relisten(sockets.get_mut::<tcp::Socket>(h), SINK_PORT);
    }

    let ip = cfg.net.ip;
    println!(
        "ft: ready ip={}.{}.{}.{} mac={} disk={} pages={} dirty_rate={} run={:x}",
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        net::Mac(mac),
        u8::from(ft.disk.is_some()),
        pages,
        ft.rate,
        ft.run
    );

    ft.t0 = clock::now_ns();
    let bye = 'main: loop {
        let ts = net::now();
        iface.poll(ts, &mut dev, &mut sockets);
        for (i, h) in control_h.into_iter().enumerate() {
            if net::relisten(sockets.get_mut::<tcp::Socket>(h), CONTROL_PORT) {
                ft.relay.cancel(i, &mut sockets);
                conns[i] = Conn::new();
            }
            let s = sockets.get_mut::<tcp::Socket>(h);
            if let Action::Poweroff = ft.serve_control(s, &mut conns[i]) {
                net::egress(ts, &mut iface, &mut dev, &mut sockets);
                break 'main h;
            }
        }
        ft.relay
            .step(clock::now_ns(), &mut iface, &mut sockets, conns);
        // Relays that finished in this pass: their replies (and the lines
        // that waited for them) go out with this pass's egress.
        for (i, h) in control_h.into_iter().enumerate() {
            if let Pending::Done(_) = conns[i].relay {
                let s = sockets.get_mut::<tcp::Socket>(h);
                if let Action::Poweroff = ft.serve_control(s, &mut conns[i]) {
                    net::egress(ts, &mut iface, &mut dev, &mut sockets);
                    break 'main h;
                }
            }
        }
        for (i, h) in sink_h.into_iter().enumerate() {
            let s = sockets.get_mut::<tcp::Socket>(h);
            if net::relisten(s, SINK_PORT) {
                sink_tally[i] = SinkTally::NEW;
            }
            serve_sink(s, &mut sink_tally[i]);
        }
        net::egress(ts, &mut iface, &mut dev, &mut sockets);
        ft.dirty_step(clock::now_ns());
        ft.work_step();
    };

    // `bye` and the FIN are queued: keep the stack running until the client
    // has acknowledged both (or the deadline passes), so the reply is not
    // lost with the machine.
    let deadline = clock::now_ns() + POWEROFF_DRAIN_NS;
    while clock::now_ns() < deadline {
        let ts = net::now();
        iface.poll(ts, &mut dev, &mut sockets);
        net::egress(ts, &mut iface, &mut dev, &mut sockets);
        let s = sockets.get::<tcp::Socket>(bye);
        if s.send_queue() == 0
            && matches!(
                s.state(),
                tcp::State::FinWait2 | tcp::State::TimeWait | tcp::State::Closed
            )
        {
            break;
        }
    }
    println!(
        "ft: poweroff seq={} work={} dirtied={}",
        ft.seq, ft.work, ft.dirtied
    );
}
