//! Replicated disks end to end: the initial synchronisation copies the primary's image onto a
//! backup image that starts blank, empty, stale, short or long, while the guest keeps writing,
//! and after a `kill -9` of the primary the backup's own image holds everything the guest saw
//! completed.
//!
//! Each case: the primary's image (128 MiB) holds data spread across it (written from the host
//! before boot: data, holes, allocated zeros, partly written MiBs) plus the test guest's own
//! writes made before protection (`req` records and `rw` rounds, see `guest/src/ft.rs`). The
//! backup's image starts as a sparse file of the primary's size, an empty file, a full-size
//! image of 0xAA bytes, or an image of 0xAA bytes of 16 MiB or 160 MiB (a regular file must
//! take the primary's size: the guest sees the same capacity after failover). A client keeps
//! the guest writing (`req` and `rw` rounds, paced) while `enable-ft ... disk_mode=replicated`
//! runs its drive-mirror style copy, and with `req` after protection.
//! Then the primary is killed with SIGKILL, the backup must take over (the client's sequence
//! goes on with no gap or repeat), the guest checks its records against the backup's image
//! (`check`), the taken-over VM is paused, and the test compares the backup's image with
//! what the guest acknowledged:
//! - the record sectors hold exactly the newest record of every acknowledged `req` (the
//!   records are deterministic, so they are rebuilt here), the rest of them zero;
//! - the `rw` region holds the newest round of each sector (all rounds ran before protection
//!   finished, so it equals the primary's bytes too);
//! - everything past that equals the primary's image byte for byte (and the host's pattern):
//!   no stale 0xAA byte and no missing data anywhere.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration::ft::{ft_status, wait_status, Load, SeqClient};
use integration::{
    api_vmm, ch_remote, guest_vm_args, kvm_serial_guard, marker_fields, report, require_kvm,
    require_netns, test_guest, two_hosts, TempDir, Vmm, HOST_B,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const GUEST_MAC: &str = "12:34:56:78:9a:bc";
const FT_PORT: u16 = 7100;
const MIB: u64 = 1 << 20;
/// The primary's image.
const IMAGE_MIB: u64 = 128;
/// The host's pattern starts here (the guest writes only below 1.125 MiB).
const FILL_FROM_MIB: u64 = 2;

const SECTOR: usize = 512;
/// The guest's record sectors (`req`): 0..2048; its `rw` region: 2048..2304.
const DISK_SLOTS: u64 = 2048;
const RW_BASE: u64 = 2048;
const RW_SPAN: u64 = 256;
const RECORDS_END: usize = (RW_BASE + RW_SPAN) as usize * SECTOR;
const MAGIC: u64 = u64::from_le_bytes(*b"TANDEMFT");

/// Requests and `rw` rounds before protection.
const PRE_REQS: u64 = 150;
const PRE_RW: u64 = 40;
/// Pause between the client's rounds while enable-ft runs.
const SYNC_PACE: Duration = Duration::from_millis(8);

/// splitmix64's finalizer (the guest's `blk::mix`).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The guest's disk record for sector `lba`, sequence (or round) `seq`, boot `run`.
fn record(lba: u64, seq: u64, run: u64) -> [u8; SECTOR] {
    let mut w = [0u64; 64];
    w[0] = MAGIC;
    w[1] = lba;
    w[2] = seq;
    w[4] = run;
    for (j, x) in w.iter_mut().enumerate().skip(5) {
        *x = mix(lba.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ seq.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
            ^ run.wrapping_mul(0x1656_67b1_9e37_79f9)
            ^ j as u64);
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, &x) in w.iter().enumerate() {
        if i != 3 {
            h = (h ^ x).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    w[3] = h;
    let mut bytes = [0u8; SECTOR];
    for (b, x) in bytes.chunks_exact_mut(8).zip(w.iter()) {
        b.copy_from_slice(&x.to_le_bytes());
    }
    bytes
}

/// A short description of what a sector holds, for failure messages.
fn describe(sector: &[u8]) -> String {
    let word = |j: usize| u64::from_le_bytes(sector[j * 8..j * 8 + 8].try_into().unwrap());
    if sector.iter().all(|&b| b == 0) {
        "zeros".into()
    } else if sector.iter().all(|&b| b == 0xAA) {
        "0xAA (stale backup image)".into()
    } else if word(0) == MAGIC {
        format!("record lba {} seq {} run {:#x}", word(1), word(2), word(4))
    } else {
        format!("other data {:02x?}", &sector[..16])
    }
}

/// Sectors an `rw` round writes: 1 to 24.
fn rw_sectors(k: u64) -> u64 {
    1 + (k * 7) % 24
}

/// The first sector round `k` of `n` sectors writes (the guest's formula).
fn rw_lba(k: u64, n: u64) -> u64 {
    RW_BASE + (k * 5) % (RW_SPAN + 1 - n)
}

/// One `rw` round on `client`, checking the guest's answer; returns the round number.
fn rw_round(client: &mut SeqClient, k: u64) -> Result<u64, String> {
    let n = rw_sectors(k);
    let reply = client.command(&format!("rw {n}"))?;
    let want = format!("rw {k} ok lba={} sectors={n}", rw_lba(k, n));
    if reply != want {
        return Err(format!("rw round {k}: got {reply:?}, want {want:?}"));
    }
    Ok(k)
}

/// What the host writes into the primary's image before boot, MiB by MiB from
/// [`FILL_FROM_MIB`]: pattern data, a hole, allocated zeros, or 64 KiB of data in a hole.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fill {
    Data,
    Hole,
    Zeros,
    Partial { at: u64 },
}

fn fill_of(mib: u64) -> Fill {
    if mib < FILL_FROM_MIB {
        return Fill::Hole;
    }
    match mib % 4 {
        0 => Fill::Data,
        1 => Fill::Hole,
        2 => Fill::Zeros,
        _ => Fill::Partial {
            at: (mib * 37 % 15) * (64 << 10),
        },
    }
}

/// Pattern bytes for `len` bytes from `offset` (8-aligned), a function of the offset only.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for i in 0..len / 8 {
        let word = mix((offset / 8 + i as u64) ^ 0x7a6e_6465_6d5f_7379);
        out.extend_from_slice(&word.to_le_bytes());
    }
    out
}

/// The content the host gave MiB `mib` of the primary's image.
fn expected_mib(mib: u64) -> Vec<u8> {
    let base = mib * MIB;
    match fill_of(mib) {
        Fill::Data => pattern(base, MIB as usize),
        Fill::Hole | Fill::Zeros => vec![0; MIB as usize],
        Fill::Partial { at } => {
            let mut v = vec![0; MIB as usize];
            v[at as usize..at as usize + (64 << 10)].copy_from_slice(&pattern(base + at, 64 << 10));
            v
        }
    }
}

fn make_primary_image(path: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).expect("create the primary's image");
    file.set_len(IMAGE_MIB * MIB).expect("size the image");
    for mib in FILL_FROM_MIB..IMAGE_MIB {
        let base = mib * MIB;
        match fill_of(mib) {
            Fill::Hole => {}
            Fill::Data | Fill::Zeros => file
                .write_all_at(&expected_mib(mib), base)
                .expect("fill the image"),
            Fill::Partial { at } => file
                .write_all_at(&pattern(base + at, 64 << 10), base + at)
                .expect("fill the image"),
        }
    }
    file.sync_all().expect("sync the image");
}

/// How the backup's image starts.
#[derive(Clone, Copy, Debug)]
enum BackupImage {
    /// A sparse file of the primary's size: reads as zeros.
    Blank,
    /// An empty file (0 bytes).
    Empty,
    /// The primary's size, every byte 0xAA.
    Stale,
    /// 16 MiB of 0xAA: shorter than the primary's.
    Short,
    /// 160 MiB of 0xAA: longer than the primary's (a regular file takes the primary's size).
    Long,
}

fn make_backup_image(path: &std::path::Path, kind: BackupImage) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("create the backup's image");
    let stale_mib = match kind {
        BackupImage::Blank => {
            file.set_len(IMAGE_MIB * MIB).expect("size the image");
            0
        }
        BackupImage::Empty => 0,
        BackupImage::Stale => IMAGE_MIB,
        BackupImage::Short => 16,
        BackupImage::Long => IMAGE_MIB + 32,
    };
    let stale = vec![0xAAu8; MIB as usize];
    for _ in 0..stale_mib {
        file.write_all(&stale).expect("fill the stale image");
    }
    file.sync_all().expect("sync the image");
}

/// The first offset where `a` and `b` differ within `range`, described.
fn first_difference(
    a: &[u8],
    b: &[u8],
    range: std::ops::Range<usize>,
    what: &str,
) -> Result<(), String> {
    let (x, y) = (&a[range.clone()], &b[range.clone()]);
    if x == y {
        return Ok(());
    }
    // Sector by sector (memcmp), then byte by byte within the first differing sector.
    let mut sectors = x.chunks(SECTOR).zip(y.chunks(SECTOR)).enumerate();
    let (first, (p, q)) = sectors
        .by_ref()
        .find(|(_, (p, q))| p != q)
        .expect("the ranges differ");
    let differing = 1 + sectors.filter(|(_, (p, q))| p != q).count();
    let at = first * SECTOR + p.iter().zip(q).position(|(u, v)| u != v).unwrap_or(0);
    let offset = range.start + at;
    let sector = offset / SECTOR * SECTOR;
    Err(format!(
        "{what}: {differing} sectors differ, the first byte at offset {offset:#x} (MiB {}, \
         {:?}): backup sector holds {}, want {}",
        offset as u64 / MIB,
        fill_of(offset as u64 / MIB),
        describe(&a[sector..sector + SECTOR]),
        describe(&b[sector..sector + SECTOR])
    ))
}

/// The backup's image after the failover, against what the guest acknowledged: `seq` requests
/// and `rounds` rw rounds of boot `run`, and the primary's image past the guest's sectors.
fn verify_backup_image(
    backup: &[u8],
    primary: &[u8],
    seq: u64,
    rounds: u64,
    run: u64,
) -> Result<(), String> {
    if backup.len() != primary.len() {
        return Err(format!(
            "the backup's image has {} bytes, the primary's {}",
            backup.len(),
            primary.len()
        ));
    }
    let sector = |lba: u64| &backup[lba as usize * SECTOR..(lba as usize + 1) * SECTOR];
    // Record sectors: the newest acknowledged record of each, zeros where none was written.
    for lba in 0..DISK_SLOTS {
        let newest = (0..=seq / DISK_SLOTS)
            .rev()
            .map(|wrap| wrap * DISK_SLOTS + lba)
            .find(|&s| s >= 1 && s <= seq);
        let got = sector(lba);
        match newest {
            Some(s) if got != record(lba, s, run) => {
                return Err(format!(
                    "record sector {lba}: want seq {s}, holds {}",
                    describe(got)
                ))
            }
            None if got.iter().any(|&b| b != 0) => {
                return Err(format!(
                    "record sector {lba}: never written, holds {}",
                    describe(got)
                ))
            }
            _ => {}
        }
    }
    // The rw region: the newest round of each sector.
    let mut owner = vec![0u64; RW_SPAN as usize];
    for k in 1..=rounds {
        let n = rw_sectors(k);
        let at = (rw_lba(k, n) - RW_BASE) as usize;
        owner[at..at + n as usize].fill(k);
    }
    for (i, &k) in owner.iter().enumerate() {
        let lba = RW_BASE + i as u64;
        let got = sector(lba);
        if k == 0 {
            if got.iter().any(|&b| b != 0) {
                return Err(format!(
                    "rw sector {lba}: no round wrote it, holds {}",
                    describe(got)
                ));
            }
        } else if got != record(lba, k, run) {
            return Err(format!(
                "rw sector {lba}: want round {k}, holds {}",
                describe(got)
            ));
        }
    }
    // Only rounds before the failover wrote there: the primary's bytes, exactly.
    first_difference(
        backup,
        primary,
        DISK_SLOTS as usize * SECTOR..RECORDS_END,
        "rw region",
    )?;
    // The rest: the primary's image (which the guest never wrote there) byte for byte.
    first_difference(backup, primary, RECORDS_END..backup.len(), "image")
}

/// The primary's image still holds the host's pattern where the guest never writes.
fn verify_primary_untouched(primary: &[u8]) -> Result<(), String> {
    for mib in FILL_FROM_MIB..IMAGE_MIB {
        let range = (mib * MIB) as usize..((mib + 1) * MIB) as usize;
        if primary[range.clone()] != expected_mib(mib)[..] {
            return Err(format!(
                "the primary's image changed in MiB {mib} ({:?}), which the guest never writes",
                fill_of(mib)
            ));
        }
    }
    Ok(())
}

fn ok(out: std::process::Output, what: &str, nodes: &[&Vmm]) {
    assert!(
        out.status.success(),
        "{what}: {}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        diagnose(nodes, what)
    );
}

fn diagnose(nodes: &[&Vmm], what: &str) -> String {
    nodes
        .iter()
        .map(|n| n.diagnose(what))
        .collect::<Vec<_>>()
        .join("\n")
}

fn run_case(tag: &str, kind: BackupImage) {
    let _boot = kvm_serial_guard();
    let started = Instant::now();
    let hosts = two_hosts(tag);
    let dir = TempDir::new(&format!("ft_replicated_sync_{tag}")).expect("temp dir");
    let primary_image = dir.join("primary.img");
    let backup_image = dir.join("backup.img");
    make_primary_image(&primary_image);
    make_backup_image(&backup_image, kind);

    // The primary: the guest's service with a disk; some memory dirtied continuously.
    let kernel = test_guest().expect("guest").display().to_string();
    let disk = format!("path={}", primary_image.display());
    let net = format!("tap=tapvm,mac={GUEST_MAC}");
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let args = guest_vm_args(
        &kernel,
        "workload=ft net.ip=192.168.249.2/24 ft.dirty_rate=1000 ft.dirty_mib=4",
        "size=64M",
        &net,
        &["-v", "--disk", &disk],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut primary = api_vmm(TIMEOUT, &format!("{tag}_primary"), &hosts.a, &sock_a, &args);
    let ready = primary
        .wait_for("ft: ready", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let fields = marker_fields(&ready.line);
    assert_eq!(fields["disk"], "1", "{}", ready.line);
    let run = u64::from_str_radix(&fields["run"], 16).expect("run id in hex");

    // 1. The guest writes before protection: records and rw rounds.
    let mut client = SeqClient::connect(&hosts.client).unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..PRE_REQS {
        client.req().unwrap_or_else(|e| panic!("{e}"));
    }
    for k in 1..=PRE_RW {
        rw_round(&mut client, k).unwrap_or_else(|e| panic!("{e}"));
    }

    // The backup, on its own image (blank, empty, stale, short or long).
    let backup = api_vmm(
        TIMEOUT,
        &format!("{tag}_backup"),
        &hosts.b,
        &sock_b,
        &["-v"],
    );
    let url = format!("tcp:{HOST_B}:{FT_PORT}");
    let backup_disk = backup_image.display().to_string();
    ok(
        ch_remote(
            &sock_b,
            &[
                "receive-ft",
                &url,
                "--disk-path",
                &backup_disk,
                "--tap",
                "tapvm",
            ],
            None,
        ),
        "receive-ft",
        &[&backup],
    );

    // 2. The guest keeps writing (rw rounds and req) while enable-ft copies the image.
    let rw_on = Arc::new(AtomicBool::new(true));
    let rw_done = Arc::new(AtomicU64::new(PRE_RW));
    let (on, done) = (rw_on.clone(), rw_done.clone());
    let load = Load::start_with(client, move |c: &mut SeqClient| {
        if on.load(Ordering::SeqCst) {
            let k = done.load(Ordering::SeqCst) + 1;
            rw_round(c, k)?;
            done.store(k, Ordering::SeqCst);
            // Paced, so that the records written before and during the sync are not all
            // overwritten (2048 slots) by the time the backup's image is checked.
            std::thread::sleep(SYNC_PACE);
        }
        c.req()
    });
    load.wait_progress(5, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let seq_before = load.seq.load(Ordering::SeqCst);
    let rw_before = rw_done.load(Ordering::SeqCst);
    let peer = format!("{HOST_B}:{FT_PORT}");
    let enable = [
        "enable-ft",
        "--peer",
        peer.as_str(),
        "--disk-mode",
        "replicated",
        "--heartbeat-timeout-ms",
        "1000",
    ];
    let t = Instant::now();
    let out = ch_remote(&sock_a, &enable, None);
    let sync_time = t.elapsed();
    let seq_during = load.seq.load(Ordering::SeqCst) - seq_before;
    let rw_during = rw_done.load(Ordering::SeqCst) - rw_before;
    if !out.status.success() {
        panic!(
            "enable-ft (the initial sync) was refused: {}{}\nprimary status {}\nbackup status \
             {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            ft_status(&sock_a),
            ft_status(&sock_b),
            diagnose(&[&primary, &backup], "enable-ft")
        );
    }
    rw_on.store(false, Ordering::SeqCst);
    assert!(
        seq_during >= 3 && rw_during >= 3,
        "the guest hardly wrote during the {sync_time:?} sync: {seq_during} requests, \
         {rw_during} rw rounds"
    );

    // Protected on both sides; the sync refused nothing.
    let p = wait_status(&sock_a, "health", &["protected"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&primary, &backup], "protection")));
    assert_eq!(p["disk_mode"], "replicated", "{p}");
    assert!(p["last_error"].is_null(), "primary: {p}");
    let b = wait_status(&sock_b, "health", &["protected"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&backup], "backup protection")));
    assert_eq!(b["role"], "backup", "{b}");
    assert!(b["last_error"].is_null(), "backup: {b}");

    // 3. More writes while protected (the last rw round has surely finished by then), then
    // the primary dies.
    load.wait_progress(100, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&primary, &backup], "protected load")));
    let rounds = rw_done.load(Ordering::SeqCst);
    let b = ft_status(&sock_b);
    assert_eq!(b["health"], "protected", "backup before the kill: {b}");
    let committed = b["last_committed_epoch"].as_u64().unwrap_or(0);
    let seq_at_kill = load.seq.load(Ordering::SeqCst);
    primary.kill();
    let t = wait_status(&sock_b, "health", &["took_over", "failed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&backup], "failover")));
    assert_eq!(
        t["health"],
        "took_over",
        "{t}\n{}",
        diagnose(&[&backup], "failover")
    );
    load.wait_progress(30, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&backup], "after the failover")));
    let mut client = load.stop().unwrap_or_else(|e| panic!("{e}"));

    // 4. The guest checks its records on the backup's image; then, paused, the test compares.
    let check = client.command("check").expect("check");
    assert!(
        check.starts_with("ok ") && check.contains("disk=1"),
        "guest self-check on the backup's image: {check}"
    );
    let stats = client.command("stats").expect("stats");
    let seq: u64 = stats
        .split_whitespace()
        .skip_while(|w| *w != "seq")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("stats: {stats:?}"));
    assert_eq!(seq, client.last, "stats: {stats}");
    ok(ch_remote(&sock_b, &["pause"], None), "pause", &[&backup]);
    let backup_data = std::fs::read(&backup_image).expect("read the backup's image");
    let primary_data = std::fs::read(&primary_image).expect("read the primary's image");
    verify_primary_untouched(&primary_data).unwrap_or_else(|e| panic!("{e}"));
    verify_backup_image(&backup_data, &primary_data, seq, rounds, run).unwrap_or_else(|e| {
        panic!(
            "{kind:?} backup image: {e}\n(seq {seq}, {rounds} rw rounds, {seq_during} requests \
             and {rw_during} rounds during the sync)\n{}",
            diagnose(&[&backup], "image check")
        )
    });
    let takeover = backup
        .stderr()
        .lines()
        .find(|l| l.contains("taking over at epoch"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    // Records still the newest in their sector were each checked; older ones were superseded.
    let checked_from = seq.saturating_sub(DISK_SLOTS - 1).max(1);
    let pre = if checked_from == 1 {
        "all of them, the ones written before protection included".to_string()
    } else {
        format!("those before seq {checked_from} were overwritten since")
    };
    report(&format!(
        "ft replicated sync ({kind:?} backup image, {IMAGE_MIB} MiB): enable-ft took \
         {sync_time:?} with {seq_during} requests and {rw_during} rw rounds written meanwhile; \
         protected (backup committed epoch {committed}), killed at seq {seq_at_kill}; {takeover}; \
         backup image matches every acknowledged write (records {checked_from}..={seq}, {rounds} \
         rw rounds; records: {pre}) and the primary's image byte for byte elsewhere; guest \
         {check}; case took {:?}",
        started.elapsed()
    ));
}

#[test]
fn replicated_sync_onto_a_blank_backup_image_survives_failover() {
    require_kvm!();
    require_netns!();
    run_case("rsb", BackupImage::Blank);
}

#[test]
fn replicated_sync_onto_an_empty_backup_image_survives_failover() {
    require_kvm!();
    require_netns!();
    run_case("rse", BackupImage::Empty);
}

#[test]
fn replicated_sync_onto_a_stale_backup_image_survives_failover() {
    require_kvm!();
    require_netns!();
    run_case("rss", BackupImage::Stale);
}

#[test]
fn replicated_sync_onto_a_short_backup_image_survives_failover() {
    require_kvm!();
    require_netns!();
    run_case("rsh", BackupImage::Short);
}

#[test]
fn replicated_sync_onto_a_long_backup_image_survives_failover() {
    require_kvm!();
    require_netns!();
    run_case("rsl", BackupImage::Long);
}

/// The image check itself (no KVM): it accepts the image the guest's acknowledged writes
/// describe, and catches a stale byte, a lost record, a lost rw round and a wrong size.
#[test]
fn the_image_check_catches_stale_bytes_and_lost_writes() {
    let (seq, rounds, run) = (2100u64, 300u64, 0x1234_5678_9abc_def0u64);
    let mut primary = Vec::with_capacity((IMAGE_MIB * MIB) as usize);
    for mib in 0..IMAGE_MIB {
        primary.extend_from_slice(&expected_mib(mib));
    }
    for s in seq.saturating_sub(DISK_SLOTS - 1).max(1)..=seq {
        let lba = (s % DISK_SLOTS) as usize;
        primary[lba * SECTOR..(lba + 1) * SECTOR].copy_from_slice(&record(lba as u64, s, run));
    }
    for k in 1..=rounds {
        let n = rw_sectors(k);
        for lba in rw_lba(k, n)..rw_lba(k, n) + n {
            let at = lba as usize * SECTOR;
            primary[at..at + SECTOR].copy_from_slice(&record(lba, k, run));
        }
    }
    verify_primary_untouched(&primary).expect("the pattern");
    verify_backup_image(&primary, &primary, seq, rounds, run).expect("a faithful copy");

    let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut backup = primary.clone();
        f(&mut backup);
        verify_backup_image(&backup, &primary, seq, rounds, run).expect_err("a bad copy passed")
    };
    // A byte of a stale image left in a hole of the primary's.
    let hole = (FILL_FROM_MIB..IMAGE_MIB)
        .find(|&m| fill_of(m) == Fill::Hole)
        .unwrap();
    let e = mutate(&|b| b[(hole * MIB + 4097) as usize] = 0xAA);
    assert!(
        e.contains("1 sectors differ") && e.contains("want zeros"),
        "{e}"
    );
    // A whole stale sector there.
    let e = mutate(&|b| b[(hole * MIB) as usize..(hole * MIB) as usize + SECTOR].fill(0xAA));
    assert!(e.contains("holds 0xAA"), "{e}");
    // An acknowledged record missing (the older one in its place).
    let e = mutate(&|b| {
        let lba = (seq % DISK_SLOTS) as usize;
        b[lba * SECTOR..(lba + 1) * SECTOR].copy_from_slice(&record(
            lba as u64,
            seq - DISK_SLOTS,
            run,
        ));
    });
    assert!(e.contains(&format!("want seq {seq}")), "{e}");
    // The last rw round lost.
    let e = mutate(&|b| {
        let at = rw_lba(rounds, rw_sectors(rounds)) as usize * SECTOR;
        b[at..at + SECTOR].fill(0);
    });
    assert!(e.contains(&format!("want round {rounds}")), "{e}");
    // Data of the primary's image missing on the backup.
    let data = (FILL_FROM_MIB..IMAGE_MIB)
        .find(|&m| fill_of(m) == Fill::Data)
        .unwrap();
    let e = mutate(&|b| b[(data * MIB) as usize..(data * MIB + 512) as usize].fill(0));
    assert!(e.contains("want other data"), "{e}");
    // A backup image of another size.
    let e = mutate(&|b| b.truncate((16 * MIB) as usize));
    assert!(e.contains("bytes, the primary's"), "{e}");
}
