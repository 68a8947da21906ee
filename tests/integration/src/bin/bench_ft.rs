//! The fault-tolerance benchmark (`ci/bench-ft` builds the release binaries and runs this).
//!
//! Lab: the integration tests' two "hosts" and a client as network namespaces
//! ([`integration::try_two_hosts`]): the primary VMM runs on host A with the guest's NIC on a
//! TAP bridged to the client network, the backup VMM on host B, replication over the hosts' own
//! link (10.77.0.1 -> 10.77.0.2). The guest is the test guest's `workload=ft` (1 vCPU, 256 MiB):
//! it rewrites `ft.dirty_rate` pages per second of a 32 MiB region, counts the iterations of a
//! compute loop as `work`, answers `req` with the next sequence number on TCP 7000 and discards
//! what it receives on TCP 7001.
//!
//! Cells: epochs of 5, 10 and 20 ms x 0, 250, 1000 and 4000 dirtied pages per epoch (the guest
//! is asked for pages_per_epoch * 1000 / epoch_ms pages/s; what it achieves is reported, since
//! the first write to a write-protected page is slow on this machine). One VM is booted per
//! distinct dirty rate; in it, for run i = 1..N, the cases "no FT", and per cell with that
//! rate "floor at epoch E" and "FT at epoch E", alternate (odd runs: no FT first, even runs:
//! reversed), each FT case on a fresh protection session (mutual TLS) with a fresh backup VMM
//! (so ft-status's pause percentiles cover that session only).
//! The floor is the honest baseline of FT's cost: the same guest with no FT while the VMM
//! harvests and re-arms the dirty log every epoch exactly as an FT checkpoint does
//! (`vm.enable-ft` with the peer `dirty-log-floor`, a benchmark hook of the VMM: its epoch
//! timer calls the same `dirty_since_last` harvest, KVM_GET_DIRTY_LOG per slot, which
//! write-protects the pages again, OR the device bitmap) and does nothing else: no pause, no
//! copy, no state capture, no backup, nothing sent. floor/noFT is this machine's
//! dirty-tracking cost (write faults on nested KVM are expensive), FT/floor what FT costs
//! beyond it. Each case measures, in this order:
//!   work      `stats` at the start and the end of a window: work/s and pages dirtied/s by the
//!             guest's own clock; under FT also ft-status deltas over the window (epochs,
//!             bytes sent, pages the VMM found dirty, the guest's KVM page faults) and the
//!             session's pause p50/p99/max; the floor's faults and lost work give what one
//!             write fault costs the guest here (`us/fault floor`);
//!   latency   sequential `req` round trips on one connection (each reply checked to be the
//!             next sequence number), p50 and p99; under FT each request is sent after a random
//!             think time in [0, epoch) so that requests arrive at random points of an epoch;
//!   tcp       (10 ms epochs at 0, 250 and 1000 pages, 20 and 40 ms at 0 pages, where the
//!             epochs and pages asked for hold them) MB/s of a bulk send to the sink
//!             (pseudo-random bytes, as real data: no receive buffer gets what it held before),
//!             from the first byte to its `got N` reply. Under FT the guest's pure ACKs leave
//!             once the backup holds the input they acknowledge (input mirroring), not at the
//!             epoch's commit. Also, for FT during the transfer: VMM-dirty pages per epoch,
//!             the pages early sending left to the pause (receive buffers written again before
//!             it) and replication bytes per byte the guest received (where the link's bytes
//!             go); next to FT, FT with --no-early-send when the early-sending cases run. The
//!             floor measures it too: what dirty tracking alone costs a transfer, and the
//!             guest's KVM page faults per epoch for both. What bounds each transfer: the
//!             guest's vCPU threads' CPU time (% of a core) and their time waiting for a core
//!             other threads held, and the client's TCP_INFO (the
//!             share of its busy time it waited for the guest's window, its retransmits), with
//!             the client's congestion control (the host's default, or `--client-cc NAME`).
//! Failover: a VM protected at 10 ms epochs with 250 pages/epoch, a client issuing `req` back
//! to back and pinging the guest every millisecond; the primary is killed with SIGKILL at a
//! random point of an epoch (a host does not die in step with the VMM's timers: without the
//! random wait the kill often came together with an epoch's output release, just as the client
//! sent its next request, which then died in flight with the primary). Failover
//! time = SIGKILL sent -> first ICMP echo reply to a ping sent at least 5 ms after it (only the
//! backup can answer it). Also shown: the same for the first `req` reply (same TCP
//! connection), the backup's own figure (`last_failover_ms`: primary lost -> VM running) and
//! how long the killed process took to disappear (its connection to the backup closes then).
//! The roles then swap (a new backup on the other host) for the next repetition. `--failovers
//! N` kills N primaries protected as by default and N with `--no-resend-output` (held output
//! not copied to the backup), alternating: the first TCP answer is shown per kind. Each kill's
//! line shows when that request, and the one before it, were sent and answered: a request sent
//! just before the kill died in flight with the primary, and only the client's retransmission
//! timeout (>= 200 ms on Linux) brings it to the backup.
//! Groups (`--no-group` skips it): two VMs on host A (guests .21 and .22 on TAPs `tapvm` and
//! `tapvm2`), each dirtying 250 pages per 10 ms epoch, booted once; in turn no FT, both
//! protected separately (two sessions, a backup VMM each on host B) and both in one FT group.
//! Each case measures relay round trips (`relay` to VM 1, which asks VM 2 for `req`: client ->
//! VM 1 -> VM 2 -> VM 1 -> client) and then direct `req` round trips to VM 1, p50 and p99, each
//! request after a random think time in [0, epoch) in all three cases (one run; twice the
//! cells' round trips in three times their budget). Separately protected VMs hold every frame
//! they send, the members of a group do not hold frames between each other: a relay should wait
//! for about three epoch commits apart and one in a group. Also per case the pause (ft-status
//! p50/p99) of the member that stood still longest, and (unless `--no-early-compare`) the
//! group once more with `--no-early-staging`: members stage early like a lone primary, three
//! quarters of the group's epoch after their last cut.
//! Peer: QEMU COLO on the same guest at 10 ms (x-checkpoint-delay) x 0 and 1000 pages: a
//! diskless primary/secondary pair over loopback in a namespace of its own, against QEMU alone
//! (work/s overhead and round-trip latency, measured as above).
//! TLS (`--no-tls` skips it): every protection session above replicates over mutual TLS with
//! the test CA's credentials ([`integration::tls_dir`]); this section shows what TLS costs. At
//! 10 ms epochs x 1000 and 4000 pages/epoch (the cells where the sender is busiest) one VM is
//! booted per rate; in it, for run i = 1..N, an FT case over plain TCP (`--insecure-plaintext`)
//! and one over mutual TLS (`--tls-dir`) alternate (odd runs: plaintext first, even runs:
//! reversed), each on a fresh session and measured like the cells' FT cases. Reported per rate,
//! plaintext vs TLS with the ratio TLS/plaintext: sender throughput (ft-status bytes sent during
//! the work window / its wall time, i.e. epochs x real epoch), pause p50 and p99, guest work/s,
//! `req` round trips p50/p99 and, at 1000 pages (a TCP cell), TCP MB/s to the guest.
//! Delta (`--no-delta` skips it): the FT primary sends a dirty page as a delta against the
//! backup's copy when that is smaller. The cells' guest rewrites every word of a page (no
//! delta helps); here, per page count at 10 ms epochs, a guest booted with
//! `ft.dirty_bytes=64` (`--dirty-bytes N`) changes 64 bytes per rewrite; no FT and FT alternate
//! as in the cells. Reported: bytes sent per VMM-dirty page with every word rewritten (the
//! cell) and with 64 bytes (the delta case) side by side, pause p50/p99 and work overhead.
//!
//! Time caps: the round trips of a case stop after a budget (at least 5 are taken), a bulk
//! send after a few seconds; overloaded cells (round trips of hundreds of ms) would otherwise
//! take minutes. The cells' protection sessions use a 1 s heartbeat timeout (see
//! [`CELL_HEARTBEAT_TIMEOUT_MS`]).
//!
//! Targets (reported, never an error): pause p50 <= 1 ms and p99 <= 3 ms at 1000 pages/epoch;
//! overhead <= 25 % and beyond the dirty-tracking floor <= 5 % at 10 ms epochs and 1000
//! pages/epoch; added p99 latency <= epoch + 2 ms; failover <= 100 ms;
//! first TCP answer after a failover <= 50 ms (per kill: how many met it);
//! TLS costs <= 10 % of FT sender throughput (1 - TLS/plaintext bytes sent per second) at
//! both TLS cells; <= 300 bytes per dirty page at 1000 pages/epoch with 64 bytes changed per
//! rewrite.
//! The exit code is non-zero only if a case could not run.
//!
//! Needs root, /dev/kvm, iproute2 and /dev/net/tun; prints a SKIP line and exits 0 without
//! them. `TANDEM_VMM_BIN` / `TANDEM_GUEST` name the binaries (else the harness builds them).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use integration::bench::{
    self, check_interrupted, fmt, install_signal_handlers, loadavg, machine, print_table, ratio,
    INTERRUPTED,
};
use integration::ft::SeqClient;
use integration::{
    api_request, kvm_available, netns_or_skip, test_guest, tls_dir, try_two_hosts, vmm_binary,
    NetNs, TempDir, TwoHosts, Vmm, HOST_A, HOST_B,
};

type Res<T> = Result<T, String>;
/// A guest's NIC: the TAP on its host, its IP, its MAC.
type GuestNic = (&'static str, Ipv4Addr, &'static str);

const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 249, 2);
const GUEST_MAC: &str = "12:34:56:78:9a:bc";
const GUEST_MEMORY: &str = "256M";
const DIRTY_REGION_MIB: u64 = 32;
const SINK_PORT: u16 = 7001;
const FIRST_FT_PORT: u16 = 7300;
/// Generous: boots and syncs share two cores with whatever else runs on this machine.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(20);
const FAILOVER_EPOCH_MS: u64 = 10;
const FAILOVER_PAGES: u64 = 250;
const PING_EVERY: Duration = Duration::from_millis(1);
/// Probes sent this long after SIGKILL count as answered by the backup.
const KILL_MARGIN: Duration = Duration::from_millis(5);
const LATENCY_WARMUP: usize = 10;
const LATENCY_MIN_SAMPLES: usize = 5;
/// Heartbeat timeout of the cells' protection sessions. The default (five epochs, at least
/// 100 ms) trips at high dirty rates on this machine: the primary hears nothing from the backup
/// while it is still sending a large epoch, declares it lost and goes on alone (and, with no
/// witness, the backup takes over too). The failover runs keep the default.
const CELL_HEARTBEAT_TIMEOUT_MS: u64 = 1000;

const TARGET_PAUSE_MS: f64 = 1.0;
/// The pause's p99 target at the same cell.
const TARGET_PAUSE_P99_MS: f64 = 3.0;
const TARGET_PAUSE_PAGES: u64 = 1000;
const TARGET_OVERHEAD_PCT: f64 = 25.0;
/// FT's overhead beyond the dirty-tracking floor (1 - FT/floor) at the same cell.
const TARGET_BEYOND_FLOOR_PCT: f64 = 5.0;
const TARGET_OVERHEAD_CELL: (u64, u64) = (10, 1000);
const TARGET_ADDED_LATENCY_SLACK_MS: f64 = 2.0;
const TARGET_FAILOVER_MS: f64 = 100.0;
/// The first TCP answer after a failover: the backup answers the request in flight (input
/// mirrored and delivered again, held output sent again) before the client's retransmission.
const TARGET_FAILOVER_TCP_MS: f64 = 50.0;
/// The TLS section: its epoch and its pages per epoch (the sender-bound cells).
const TLS_EPOCH_MS: u64 = 10;
const TLS_PAGES: [u64; 2] = [1000, 4000];
/// The pipeline section: FT with the sender encoding alone, with 1 and 2 encoder threads, with
/// the pages on 2 data streams beside the first connection (`--streams 3`), and with the
/// pause's staging on the control loop alone (`--no-stage-helper`).
const PIPELINE_EPOCH_MS: u64 = 10;
const PIPELINE_PAGES: [u64; 2] = [1000, 4000];
const PIPELINE_MODES: [Mode; 5] = [
    Mode::FtEncoders(0),
    Mode::FtEncoders(1),
    Mode::FtEncoders(2),
    Mode::FtStreams(3),
    Mode::FtNoStageHelper,
];
/// TLS may cost at most this share of the FT sender's throughput (bytes sent per second).
const TARGET_TLS_COST_PCT: f64 = 10.0;
/// Cells that also measure TCP throughput (epoch ms, pages per epoch). The longer epochs at 0
/// pages show what a transfer's per-epoch work costs it (each epoch copies and sends again the
/// receive buffers it filled); 40 ms runs only when `--epochs` names it.
const TCP_CELLS: [(u64, u64); 5] = [(10, 0), (10, 250), (10, 1000), (20, 0), (40, 0)];
/// The groups section: epoch and pages per epoch of both VMs.
const GROUP_EPOCH_MS: u64 = 10;
const GROUP_PAGES: u64 = 250;
/// The groups section's two VMs: TAP on host A, guest IP, MAC.
const GROUP_VMS: [GuestNic; 2] = [
    (
        "tapvm",
        Ipv4Addr::new(192, 168, 249, 21),
        "12:34:56:78:9a:b0",
    ),
    (
        "tapvm2",
        Ipv4Addr::new(192, 168, 249, 22),
        "12:34:56:78:9a:b1",
    ),
];
/// The guest's control service (`req`, `relay`, `stats`).
const SEQ_PORT: u16 = 7000;
/// `vm.enable-ft` with this peer starts the VMM's dirty-log floor (`vmm::vmm::
/// DIRTY_LOG_FLOOR_PEER`; this binary does not link the VMM's crate).
const DIRTY_LOG_FLOOR_PEER: &str = "dirty-log-floor";
/// The delta section's epoch (the first of `--epochs` if this one is not among them).
const DELTA_EPOCH_MS: u64 = 10;
/// Default `ft.dirty_bytes` of the delta section.
const DELTA_DIRTY_BYTES: u64 = 64;
/// The hot-page section's region: 256 pages, so at 250 pages/epoch and more every page is
/// rewritten about every epoch (the pages a write-fault predictor keeps writable).
const HOT_REGION_MIB: u64 = 1;
/// Target: bytes on the wire per dirty page when each rewrite changes 64 bytes.
const TARGET_DELTA_BYTES: f64 = 300.0;
const TARGET_DELTA_PAGES: u64 = 1000;

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

struct Options {
    quick: bool,
    runs: usize,
    window: Duration,
    settle: Duration,
    round_trips: usize,
    /// The round trips of a case stop early after this long (slow cells would take minutes).
    latency_budget: Duration,
    sink_mib: usize,
    /// A bulk send stops early after this long.
    sink_budget: Duration,
    failovers: usize,
    epochs: Vec<u64>,
    pages: Vec<u64>,
    cells: bool,
    colo: bool,
    /// The groups section (relay latency: no FT, separate protection, one group).
    group: bool,
    /// `--heartbeat-timeout-ms` for the cells (the failover runs use the default).
    heartbeat_timeout_ms: u64,
    /// The TLS section (FT over plaintext TCP vs mutual TLS).
    tls: bool,
    /// The pipeline section (FT with 0, 1 and 2 encoder threads).
    pipeline: bool,
    /// The delta section (the guest changes `dirty_bytes` bytes per page rewrite).
    delta: bool,
    dirty_bytes: u64,
    /// Per cell also FT with hot pages off (`--no-hot-pages`): what keeping them writable
    /// saves.
    hot_compare: bool,
    /// Per cell also FT copying every page in the pause (`--no-early-staging`) and FT staging
    /// early but sending in the pause (`--no-early-send`): what early staging and early
    /// sending save.
    early_compare: bool,
    /// The sink client's TCP congestion control (None: the host's default).
    client_cc: Option<String>,
}

const USAGE: &str = "usage: bench_ft [--quick] [--runs N] [--window-s S] [--round-trips N] \
[--failovers N] [--epochs 5,10,20] [--pages 0,250,1000,4000] [--no-cells] [--no-colo] \
[--no-group] [--no-tls] [--no-pipeline] [--no-delta] [--no-hot-compare] [--no-early-compare] \
[--dirty-bytes N] \
[--heartbeat-timeout-ms N] [--client-cc NAME]";

fn parse_list(text: &str, what: &str) -> Res<Vec<u64>> {
    text.split(',')
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| format!("{what}: {v:?} is not a number"))
        })
        .collect()
}

impl Options {
    fn parse() -> Res<Options> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut quick = false;
        let mut runs = None;
        let mut window = None;
        let mut round_trips = None;
        let mut failovers = None;
        let mut epochs = vec![5, 10, 20];
        let mut pages = vec![0, 250, 1000, 4000];
        let mut cells = true;
        let mut colo = true;
        let mut group = true;
        let mut tls = true;
        let mut pipeline = true;
        let mut delta = true;
        let mut hot_compare = true;
        let mut early_compare = true;
        let mut dirty_bytes = DELTA_DIRTY_BYTES;
        let mut heartbeat_timeout_ms = CELL_HEARTBEAT_TIMEOUT_MS;
        let mut client_cc = None;
        let mut i = 0;
        while i < args.len() {
            let flag = args[i].as_str();
            let mut value = || -> Res<&str> {
                i += 1;
                args.get(i)
                    .map(String::as_str)
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
            };
            match flag {
                "--quick" => quick = true,
                "--runs" | "-n" => runs = Some(parse_count(value()?, "--runs")?),
                "--window-s" => {
                    let v = value()?;
                    let secs: f64 = v
                        .parse()
                        .ok()
                        .filter(|s: &f64| *s > 0.0 && s.is_finite())
                        .ok_or_else(|| format!("--window-s: {v:?} is not a positive number"))?;
                    window = Some(Duration::from_secs_f64(secs));
                }
                "--round-trips" => round_trips = Some(parse_count(value()?, "--round-trips")?),
                "--failovers" => {
                    let v = value()?;
                    failovers = Some(
                        v.parse::<usize>()
                            .map_err(|_| format!("--failovers: {v:?} is not a number"))?,
                    );
                }
                "--epochs" => epochs = parse_list(value()?, "--epochs")?,
                "--pages" => pages = parse_list(value()?, "--pages")?,
                "--no-cells" => cells = false,
                "--no-colo" => colo = false,
                "--no-group" => group = false,
                "--no-tls" => tls = false,
                "--no-pipeline" => pipeline = false,
                "--no-delta" => delta = false,
                "--no-hot-compare" => hot_compare = false,
                "--no-early-compare" => early_compare = false,
                "--dirty-bytes" => dirty_bytes = parse_count(value()?, "--dirty-bytes")? as u64,
                "--heartbeat-timeout-ms" => {
                    heartbeat_timeout_ms = parse_count(value()?, "--heartbeat-timeout-ms")? as u64
                }
                "--client-cc" => client_cc = Some(congestion_control(value()?)?),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
            i += 1;
        }
        if epochs.iter().any(|&e| e == 0 || e > 1000) {
            return Err("--epochs: each epoch is 1..=1000 ms".into());
        }
        Ok(Options {
            quick,
            runs: runs.unwrap_or(if quick { 1 } else { 2 }),
            window: window.unwrap_or(Duration::from_millis(if quick { 1500 } else { 3000 })),
            settle: Duration::from_millis(if quick { 300 } else { 500 }),
            round_trips: round_trips.unwrap_or(if quick { 100 } else { 300 }),
            latency_budget: Duration::from_secs(if quick { 2 } else { 4 }),
            sink_mib: if quick { 128 } else { 256 },
            sink_budget: Duration::from_secs(if quick { 2 } else { 3 }),
            failovers: failovers.unwrap_or(if quick { 3 } else { 5 }),
            epochs,
            pages,
            cells,
            colo,
            group,
            heartbeat_timeout_ms,
            tls,
            pipeline,
            hot_compare,
            early_compare,
            delta,
            dirty_bytes,
            client_cc,
        })
    }
}

/// The TCP congestion controls this host offers.
const AVAILABLE_CC: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";

/// `--client-cc NAME`, refused at once when this host does not offer it (rather than in
/// every TCP case).
fn congestion_control(name: &str) -> Res<String> {
    match std::fs::read_to_string(AVAILABLE_CC) {
        Ok(have) if !have.split_whitespace().any(|cc| cc == name) => Err(format!(
            "--client-cc {name:?}: this host offers {}",
            have.trim()
        )),
        _ => Ok(name.to_string()),
    }
}

fn parse_count(v: &str, what: &str) -> Res<usize> {
    v.parse::<usize>()
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| format!("{what}: {v:?} is not a whole number >= 1"))
}

// ---------------------------------------------------------------------------------------------
// Interruption: SIGINT/SIGTERM/SIGHUP set a flag that every wait checks, so that the lab is
// torn down by the normal drops (the release profile aborts on panic: no unwinding to rely on).
// ---------------------------------------------------------------------------------------------

/// Sleeps `d`, waking early (with an error) when a signal arrived.
fn nap(d: Duration) -> Res<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

fn log(line: &str) {
    println!("==> bench-ft: {line}");
    let _ = std::io::stdout().flush();
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Linear-interpolation percentile (as the other benchmarks compute it).
/// Columns for a time with a feature and without it: both in ms, then without/with.
fn times_against(with: Option<f64>, without: Option<f64>) -> [String; 3] {
    [fmt(with, 3), fmt(without, 3), fmt(ratio(without, with), 2)]
}

fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let k = (sorted.len() - 1) as f64 * p / 100.0;
    let lo = k.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (k - lo as f64))
}

fn median(values: &[f64]) -> Option<f64> {
    percentile(values, 50.0)
}

// ---------------------------------------------------------------------------------------------
// ch-remote and ft-status
// ---------------------------------------------------------------------------------------------

struct Binaries {
    ch_remote: PathBuf,
    guest: PathBuf,
}

fn binaries() -> Res<Binaries> {
    let vmm = vmm_binary().map_err(|e| format!("the VMM binary: {e}"))?;
    let guest = test_guest().map_err(|e| format!("the test guest: {e}"))?;
    let ch_remote = vmm.with_file_name("ch-remote");
    for path in [&vmm, &ch_remote, &guest] {
        if !path.is_file() {
            return Err(format!("{} is missing", path.display()));
        }
    }
    Ok(Binaries { ch_remote, guest })
}

fn ch_remote(bins: &Binaries, socket: &Path, args: &[&str]) -> Res<String> {
    bench::ch_remote(&bins.ch_remote, socket, args, STEP_TIMEOUT)
}

/// What the benchmark reads from `ft-status`.
#[derive(Clone, Debug, Default)]
struct FtStatus {
    health: String,
    peer: Option<String>,
    epoch: u64,
    bytes: u64,
    dirty_pages: u64,
    pages_from_input: u64,
    /// Pages staged early that early sending left to the pause (written again before it).
    pages_held_for_pause: u64,
    pause_us_p50: u64,
    pause_us_p99: u64,
    pause_us_max: u64,
    send_us_p50: u64,
    commit_us_p50: u64,
    commit_us_p99: u64,
    /// How long input frames waited for the backup (what early ACKs of them waited).
    input_mirror_us_p50: u64,
    input_mirror_us_p99: u64,
    epochs_cut_early: u64,
    last_failover_ms: Option<u64>,
    last_error: Option<String>,
    /// Members of the VM's FT group (none when it is in no group).
    group_members: Option<u64>,
    /// Page faults KVM handled for the guest since protection (or the floor) started; None
    /// when this kernel does not count them.
    kvm_page_faults: Option<u64>,
}

fn ft_status(bins: &Binaries, socket: &Path) -> Res<FtStatus> {
    let text = ch_remote(bins, socket, &["ft-status"])?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("ft-status is not JSON ({e}): {text}"))?;
    let num = |key: &str| -> Res<u64> {
        v[key]
            .as_u64()
            .ok_or_else(|| format!("ft-status has no number {key:?}: {text}"))
    };
    Ok(FtStatus {
        health: v["health"].as_str().unwrap_or("?").to_string(),
        peer: v["peer"].as_str().map(str::to_string),
        epoch: num("epoch")?,
        bytes: num("bytes")?,
        dirty_pages: num("dirty_pages")?,
        pages_from_input: num("pages_from_input")?,
        pages_held_for_pause: num("pages_held_for_pause")?,
        pause_us_p50: num("pause_us_p50")?,
        pause_us_p99: num("pause_us_p99")?,
        pause_us_max: num("pause_us_max")?,
        send_us_p50: num("send_us_p50")?,
        commit_us_p50: num("commit_us_p50")?,
        commit_us_p99: num("commit_us_p99")?,
        input_mirror_us_p50: num("input_mirror_us_p50")?,
        input_mirror_us_p99: num("input_mirror_us_p99")?,
        epochs_cut_early: num("epochs_cut_early")?,
        last_failover_ms: v["last_failover_ms"].as_u64(),
        last_error: v["last_error"].as_str().map(str::to_string),
        group_members: v["group_members"].as_u64(),
        kvm_page_faults: v["kvm_page_faults"].as_u64(),
    })
}

fn wait_health(bins: &Binaries, socket: &Path, want: &str, timeout: Duration) -> Res<FtStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        let status = ft_status(bins, socket)?;
        if status.health == want {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "ft-status health is {:?}, not {want:?}, after {timeout:?} (last error: {:?})",
                status.health, status.last_error
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// The lab: two hosts, VMM processes on them
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    A,
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn addr(self) -> &'static str {
        match self {
            Side::A => HOST_A,
            Side::B => HOST_B,
        }
    }
}

/// One VMM process on one host.
struct Node {
    vmm: Vmm,
    socket: PathBuf,
    side: Side,
    /// The guest's TAP (a primary's); its backup's operator names the same TAP on its host.
    tap: Option<String>,
}

impl Node {
    /// The VMM's console and stderr tails, for a failure report.
    fn diagnose(&self, what: &str) -> String {
        self.vmm.diagnose(what)
    }
}

struct Lab {
    bins: Binaries,
    hosts: TwoHosts,
    dir: TempDir,
    next_port: u16,
    spawned: u32,
    /// The replication channel: mutual TLS with the test CA's credentials (`Some`), or the
    /// explicit plaintext opt-out (`None`) for the rows that show what TLS costs.
    tls_dir: Option<String>,
    /// Hot pages (`false`: `--no-hot-pages`, the FtCold cases).
    hot_pages: bool,
    /// Early staging (`false`: `--no-early-staging`, the FtLateStaging cases).
    early_staging: bool,
    /// Early sending (`false`: `--no-early-send`, the FtPauseSend cases).
    early_send: bool,
    /// Early ACKs (`false`: `--no-early-acks`, the FtHeldAcks cases).
    early_acks: bool,
    /// Latency mode (`--latency-mode`, the FtLatency cases).
    latency_mode: bool,
    /// `--encode-threads` (None: the VMM's default; the pipeline section).
    encode_threads: Option<u32>,
    /// `--streams` (None: one connection; the pipeline section).
    streams: Option<u32>,
    /// The pause's staging helper (`false`: `--no-stage-helper`; the pipeline section).
    stage_helper: bool,
    /// Held output copied to the backup (`false`: `--no-resend-output`; every other kill of
    /// the failover section).
    resend_output: bool,
}

impl Lab {
    fn new(bins: Binaries) -> Res<Lab> {
        let hosts = try_two_hosts("bft").map_err(|e| format!("network namespaces: {e}"))?;
        let dir = TempDir::new("bench_ft").map_err(|e| e.to_string())?;
        Ok(Lab {
            bins,
            hosts,
            dir,
            next_port: FIRST_FT_PORT,
            spawned: 0,
            tls_dir: Some(tls_dir().to_string_lossy().into_owned()),
            hot_pages: true,
            early_staging: true,
            early_send: true,
            early_acks: true,
            latency_mode: false,
            resend_output: true,
            encode_threads: None,
            streams: None,
            stage_helper: true,
        })
    }

    fn ns(&self, side: Side) -> &NetNs {
        match side {
            Side::A => &self.hosts.a,
            Side::B => &self.hosts.b,
        }
    }

    /// Starts a VMM with an API socket on `side` and waits until the socket answers.
    fn spawn_vmm(&mut self, role: &str, side: Side, extra: &[&str]) -> Res<Node> {
        self.spawned += 1;
        let socket = self.dir.join(&format!("vmm{}.sock", self.spawned));
        let socket_arg = socket.to_str().ok_or("socket path is not UTF-8")?;
        let mut vmm = Vmm::builder(&format!("{role}{}-{side:?}", self.spawned))
            .wrapped_in(self.ns(side).exec_prefix())
            .args(["--api-socket", socket_arg, "-v"])
            .args(extra)
            .spawn()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        while UnixStream::connect(&socket).is_err() {
            check_interrupted()?;
            if let Some(status) = vmm.poll_exit() {
                return Err(vmm.diagnose(&format!("the VMM exited ({status}) before its API")));
            }
            if Instant::now() >= deadline {
                return Err(vmm.diagnose("the API socket never appeared"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Node {
            vmm,
            socket,
            side,
            tap: None,
        })
    }

    /// Forgets where the guest's MAC was: a new VM on host A after one on host B (a takeover)
    /// would otherwise not be reached until it transmits first.
    fn flush_bridges(&self) -> Res<()> {
        for (ns, bridge) in [
            (&self.hosts.client, "br0"),
            (&self.hosts.a, "brh"),
            (&self.hosts.b, "brh"),
        ] {
            ns.ip(&["link", "set", bridge, "type", "bridge", "fdb_flush"])
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Boots the ft workload dirtying `dirty_rate` pages/s on `side`; waits for its services.
    fn boot_primary(&mut self, side: Side, dirty_rate: u64) -> Res<Node> {
        self.boot_vm(
            side,
            (dirty_rate, 0, DIRTY_REGION_MIB),
            ("tapvm", GUEST_IP, GUEST_MAC),
        )
    }

    /// [`Lab::boot_primary`] with the guest on `tap` at `ip` with `mac`.
    /// The guest's load: pages per second, bytes each page rewrite changes (`ft.dirty_bytes`;
    /// 0: every word) and the size of the rewritten region in MiB.
    fn boot_vm(
        &mut self,
        side: Side,
        (dirty_rate, dirty_bytes, dirty_mib): (u64, u64, u64),
        (tap, ip, mac): GuestNic,
    ) -> Res<Node> {
        self.flush_bridges()?;
        let kernel = self.bins.guest.to_str().ok_or("guest path is not UTF-8")?;
        let kernel = kernel.to_string();
        let cmdline = format!(
            "workload=ft net.ip={ip}/24 ft.dirty_rate={dirty_rate} ft.dirty_mib={dirty_mib} ft.dirty_bytes={dirty_bytes}"
        );
        let net = format!("tap={tap},mac={mac}");
        let memory = format!("size={GUEST_MEMORY}");
        let mut node = self.spawn_vmm(
            "primary",
            side,
            &[
                "--kernel",
                &kernel,
                "--cmdline",
                &cmdline,
                "--memory",
                &memory,
                "--serial",
                "tty",
                "--console",
                "off",
                "--net",
                &net,
            ],
        )?;
        node.vmm
            .wait_for("ft: ready", STEP_TIMEOUT)
            .map_err(|e| e.to_string())?;
        node.tap = Some(tap.to_string());
        Ok(node)
    }

    /// A fresh backup VMM on the other host, and `primary` protected by it at `epoch_ms`
    /// (with the default heartbeat timeout unless `heartbeat_timeout_ms` is given), as a
    /// member of `group` if given.
    fn protect(
        &mut self,
        primary: &Node,
        epoch_ms: u64,
        heartbeat_timeout_ms: Option<u64>,
        group: Option<&GroupSockets>,
    ) -> Res<Node> {
        let port = self.next_port;
        // A fresh port per session: no listener ever waits for an old one's TIME_WAIT.
        self.next_port = if port >= 7999 {
            FIRST_FT_PORT
        } else {
            port + 1
        };
        let backup_side = primary.side.other();
        let mut backup = self.spawn_vmm("backup", backup_side, &[])?;
        // After a takeover the backup is the primary, protected in turn on the same TAP.
        backup.tap = primary.tap.clone();
        let listen = format!("tcp:{}:{port}", backup_side.addr());
        let security = match &self.tls_dir {
            Some(dir) => vec!["--tls-dir", dir.as_str()],
            None => vec!["--insecure-plaintext"],
        };
        let mut receive = vec!["receive-ft", listen.as_str()];
        receive.extend(&security);
        if let Some(tap) = &primary.tap {
            receive.extend(["--tap", tap.as_str()]);
        }
        if let Some(g) = group {
            receive.extend(["--group", g.backups.as_str()]);
        }
        ch_remote(&self.bins, &backup.socket, &receive)
            .map_err(|e| format!("{e}\n{}", backup.diagnose("receive-ft")))?;
        let peer = format!("{}:{port}", backup_side.addr());
        let epoch = epoch_ms.to_string();
        let mut args = vec!["enable-ft", "--peer", &peer, "--epoch-ms", &epoch];
        args.extend(&security);
        let heartbeat = heartbeat_timeout_ms.map(|ms| ms.to_string());
        if let Some(ms) = &heartbeat {
            args.extend(["--heartbeat-timeout-ms", ms.as_str()]);
        }
        if let Some(g) = group {
            args.extend(["--group", g.primaries.as_str()]);
        }
        if !self.hot_pages {
            args.push("--no-hot-pages");
        }
        if !self.early_staging {
            args.push("--no-early-staging");
        }
        if !self.early_send {
            args.push("--no-early-send");
        }
        if !self.early_acks {
            args.push("--no-early-acks");
        }
        if self.latency_mode {
            args.push("--latency-mode");
        }
        if !self.resend_output {
            args.push("--no-resend-output");
        }
        let encode_threads = self.encode_threads.map(|n| n.to_string());
        if let Some(n) = &encode_threads {
            args.extend(["--encode-threads", n.as_str()]);
        }
        let streams = self.streams.map(|n| n.to_string());
        if let Some(n) = &streams {
            args.extend(["--streams", n.as_str()]);
        }
        if !self.stage_helper {
            args.push("--no-stage-helper");
        }
        ch_remote(&self.bins, &primary.socket, &args).map_err(|e| {
            format!(
                "{e}\n{}\n{}",
                primary.diagnose("enable-ft"),
                backup.diagnose("enable-ft")
            )
        })?;
        wait_health(&self.bins, &primary.socket, "protected", STEP_TIMEOUT)?;
        Ok(backup)
    }

    /// Ends the protection session (the backup stands down and its process is stopped).
    fn unprotect(&mut self, primary: &Node, backup: Node) -> Res<()> {
        let disabled = ch_remote(&self.bins, &primary.socket, &["disable-ft"])
            .map_err(|e| format!("{e}\n{}", primary.diagnose("disable-ft")));
        drop(backup);
        // A backup that took over (after a false failure detection) announced the guest's MAC
        // on host B; the primary's guest must be reachable again for the next case.
        self.flush_bridges()?;
        disabled.map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------------
// Guest clients
// ---------------------------------------------------------------------------------------------

/// `stats` -> `work W dirtied D seq S uptime_ms U`.
#[derive(Clone, Copy, Debug)]
struct GuestStats {
    work: u64,
    dirtied: u64,
    uptime_ms: u64,
}

fn guest_stats(client: &mut SeqClient) -> Res<GuestStats> {
    let line = client.command("stats")?;
    // `name value` pairs; newer guests may add pairs after these.
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |name: &str| -> Res<u64> {
        words
            .chunks(2)
            .find(|pair| pair[0] == name)
            .and_then(|pair| pair.get(1)?.parse().ok())
            .ok_or_else(|| format!("stats reply {line:?} has no number {name:?}"))
    };
    Ok(GuestStats {
        work: num("work")?,
        dirtied: num("dirtied")?,
        uptime_ms: num("uptime_ms")?,
    })
}

/// A bulk send to the guest's sink as the client's TCP stack saw it.
#[derive(Clone, Debug)]
struct SinkRun {
    /// MB/s (10^6) from the first byte to the `got N` reply.
    mbps: f64,
    sent: u64,
    /// What the client's kernel says of the connection once the last byte was written.
    client: Option<ClientTcp>,
}

/// The client's view of a transfer (`TCP_INFO`, Linux 4.10 and later).
#[derive(Clone, Debug)]
struct ClientTcp {
    /// Its congestion control.
    cc: String,
    /// Of the time it had data to send, the share it waited for the guest's receive window
    /// (tcpi_rwnd_limited / tcpi_busy_time), %: near 100 the guest's consumption (or the
    /// release of its window updates) bounds the transfer, near 0 the client's own congestion
    /// window or pacing does.
    window_bound_pct: f64,
    /// Segments retransmitted (frames lost on the way, or an ACK released too late).
    retransmits: u32,
}

/// Sends `bytes` (or what fits into `budget`) to the guest's sink, half-closes and waits for
/// `got N`. `cc` sets the client's congestion control (None: the host's default).
fn sink_throughput(ns: &NetNs, bytes: usize, budget: Duration, cc: Option<&str>) -> Res<SinkRun> {
    let addr = std::net::SocketAddr::from((GUEST_IP, SINK_PORT));
    let mut stream = ns
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("connect to the sink: {e}"))?;
    if let Some(cc) = cc {
        set_congestion_control(&stream, cc)?;
    }
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(30))))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let payload = sink_payload();
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes && start.elapsed() < budget {
        let n = SINK_WRITE.min(bytes - sent);
        let at = sent % (payload.len() - SINK_WRITE + 1);
        stream
            .write_all(&payload[at..at + n])
            .map_err(|e| format!("sink: send after {sent} bytes: {e}"))?;
        sent += n;
    }
    let client = client_tcp(&stream);
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("sink: half-close: {e}"))?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("sink: reply: {e}"))?;
    let elapsed = start.elapsed();
    if reply.split_whitespace().nth(1) != Some(sent.to_string().as_str()) {
        return Err(format!("sink replied {reply:?} to {sent} bytes"));
    }
    Ok(SinkRun {
        mbps: sent as f64 / elapsed.as_secs_f64() / 1e6,
        sent: sent as u64,
        client,
    })
}

/// `TCP_CONGESTION` on a connected socket (Linux switches an open connection over).
fn set_congestion_control(stream: &TcpStream, cc: &str) -> Res<()> {
    // SAFETY: the fd is the open socket `stream` owns; the option value is `cc`'s bytes, with
    // their length, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let have = std::fs::read_to_string(AVAILABLE_CC).unwrap_or_default();
        return Err(format!(
            "--client-cc {cc}: {e} (this host has: {})",
            have.trim()
        ));
    }
    Ok(())
}

/// The client's `TCP_INFO` and congestion control; None where the kernel gives neither.
fn client_tcp(stream: &TcpStream) -> Option<ClientTcp> {
    let fd = stream.as_raw_fd();
    // SAFETY: tcp_info is plain integers: all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is the open socket `stream` owns; `info` and `len` are writable and
    // `len` is `info`'s size, which the kernel does not write past.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // A kernel before 4.10 fills less: no busy and window-limited times.
    let filled = std::mem::offset_of!(libc::tcp_info, tcpi_rwnd_limited) + 8;
    if rc != 0 || (len as usize) < filled || info.tcpi_busy_time == 0 {
        return None;
    }
    let mut name = [0u8; 16];
    let mut name_len = name.len() as libc::socklen_t;
    // SAFETY: as above; `name` is writable for `name_len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut name_len,
        )
    };
    let name = if rc == 0 {
        &name[..name_len as usize]
    } else {
        &[]
    };
    let cc = String::from_utf8_lossy(name)
        .trim_end_matches('\0')
        .to_string();
    Some(ClientTcp {
        cc,
        window_bound_pct: info.tcpi_rwnd_limited as f64 * 100.0 / info.tcpi_busy_time as f64,
        retransmits: info.tcpi_total_retrans,
    })
}

/// The sink client's write size.
const SINK_WRITE: usize = 64 * 1024;

/// What the sink client sends: 16 MiB of pseudo-random bytes, far more than the guest's
/// receive buffers hold, so a buffer never receives what it held before, as with real data
/// (a short repeating pattern would let the receive buffers' pages go as empty deltas).
fn sink_payload() -> &'static [u8] {
    static PAYLOAD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PAYLOAD.get_or_init(|| {
        let mut rng = XorShift(0x5eed_1e55);
        (0..(16usize << 20) / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect()
    })
}

/// CPU time so far of the replication threads on this host (threads named `ft-*`), in ns:
/// (all, the primary's: sender, acks, staging, encoders and data streams; the backup's
/// receiver and data streams, `ft-receiver` and `ft-lane-*`, are the rest). What each received
/// byte costs the replication, the figure a per-byte saving moves; in a real deployment the
/// backup's share runs on another host. Like throughput it swings between runs on a nested
/// 2-core machine (everything runs slower at times): compare cases within a run.
fn replication_cpu_ns() -> (u64, u64) {
    let (mut total, mut primary) = (0, 0);
    each_thread_cpu_ns(|comm, ns, _| {
        if !comm.starts_with("ft-") {
            return;
        }
        total += ns;
        if !(comm.starts_with("ft-receiver") || comm.starts_with("ft-lane-")) {
            primary += ns;
        }
    });
    (total, primary)
}

/// Time so far of the vCPU threads on this host, in ns: (on the CPU, runnable but waiting for
/// it). The first is the guest's share of the cores (a standby backup's vCPUs stay parked; the
/// TCP cases run one guest); the second is what other threads took from a guest that wanted
/// to run.
fn vcpu_cpu_ns() -> (u64, u64) {
    let (mut on, mut waiting) = (0, 0);
    each_thread_cpu_ns(|comm, ns, wait_ns| {
        if comm.starts_with("vcpu") {
            on += ns;
            waiting += wait_ns;
        }
    });
    (on, waiting)
}

/// Every thread on this host: its name, its CPU time so far and its time runnable but waiting
/// for a CPU (ns).
fn each_thread_cpu_ns(mut each: impl FnMut(&str, u64, u64)) {
    for process in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let tasks = std::fs::read_dir(process.path().join("task"));
        for task in tasks.into_iter().flatten().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            let (on, waiting) = schedstat_times(&stat);
            each(comm.trim_end(), on, waiting);
        }
    }
}

/// A thread's `schedstat` line: time on the CPU (ns), time runnable but waiting for it (ns),
/// time slices. Returns the first two (0 for what is missing or unreadable).
fn schedstat_times(stat: &str) -> (u64, u64) {
    let mut fields = stat
        .split_whitespace()
        .map(|ns| ns.parse::<u64>().unwrap_or(0));
    let on = fields.next().unwrap_or(0);
    let waiting = fields.next().unwrap_or(0);
    (on, waiting)
}

/// Sequential round trips of `request` (`req`, `relay`: each reply checked to continue the
/// sequence), in ms. Under FT each request waits a random time in [0, epoch) first: a request
/// sent right after the previous reply was released would always arrive early in an epoch and
/// wait for all of it, which measures the epoch length rather than the latency of independent
/// requests.
fn round_trips(
    client: &mut SeqClient,
    count: usize,
    think_max: Duration,
    budget: Duration,
    mut request: impl FnMut(&mut SeqClient) -> Res<u64>,
) -> Res<Vec<f64>> {
    let mut rtts = Vec::with_capacity(count);
    let mut rng = XorShift::from_clock();
    let start = Instant::now();
    let mut warmup = 0;
    loop {
        check_interrupted()?;
        // Warm-up takes at most a quarter of the budget; then at least a few samples even
        // when one round trip takes longer than the budget (an overloaded cell).
        let warming = warmup < LATENCY_WARMUP && start.elapsed() < budget / 4;
        let enough =
            rtts.len() >= count || (rtts.len() >= LATENCY_MIN_SAMPLES && start.elapsed() >= budget);
        if !warming && enough {
            break;
        }
        if !think_max.is_zero() {
            let nanos = think_max.as_nanos() as u64;
            std::thread::sleep(Duration::from_nanos(rng.next() % nanos));
        }
        let t = Instant::now();
        request(client)?;
        if warming {
            warmup += 1;
        } else {
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(rtts)
}

/// xorshift64*: think times and the sink's payload need no more than this.
struct XorShift(u64);

impl XorShift {
    fn from_clock() -> XorShift {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A client issuing `req` back to back, remembering when each was sent and answered.
struct ReqLoad {
    stop: Arc<AtomicBool>,
    /// The last sequence number the client was answered.
    last_seq: Arc<AtomicU64>,
    /// (sent, answered) per request.
    log: Arc<Mutex<Vec<(Instant, Instant)>>>,
    error: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<SeqClient>>,
}

impl ReqLoad {
    fn start(mut client: SeqClient) -> ReqLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let last_seq = Arc::new(AtomicU64::new(client.last));
        let log = Arc::new(Mutex::new(Vec::new()));
        let error = Arc::new(Mutex::new(None));
        let (s, q, l, e) = (stop.clone(), last_seq.clone(), log.clone(), error.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let sent = Instant::now();
                match client.req() {
                    Ok(seq) => {
                        lock(&l).push((sent, Instant::now()));
                        q.store(seq, Ordering::SeqCst);
                    }
                    Err(err) => {
                        *lock(&e) = Some(err);
                        break;
                    }
                }
            }
            client
        });
        ReqLoad {
            stop,
            last_seq,
            log,
            error,
            thread: Some(thread),
        }
    }

    fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    fn answered(&self) -> usize {
        lock(&self.log).len()
    }

    /// Time from `origin` to the reply of the first request sent at or after `sent_after`.
    fn first_answer_to_request_after(
        &self,
        sent_after: Instant,
        origin: Instant,
    ) -> Option<Duration> {
        lock(&self.log)
            .iter()
            .find(|(sent, _)| *sent >= sent_after)
            .map(|(_, answered)| answered.saturating_duration_since(origin))
    }

    /// Where the request [`ReqLoad::first_answer_to_request_after`] measures, and the one before
    /// it, lay around `origin`: `sent -> answered` in ms after it (negative: before). A miss of
    /// the first TCP answer target reads from it whether that request went out before the
    /// backup ran (lost with the primary) or the reply it waited for came late.
    fn timeline_after(&self, sent_after: Instant, origin: Instant) -> String {
        let ms = |t: Instant| -> f64 {
            if t >= origin {
                t.duration_since(origin).as_secs_f64() * 1e3
            } else {
                -(origin.duration_since(t).as_secs_f64() * 1e3)
            }
        };
        let log = lock(&self.log);
        let Some(at) = log.iter().position(|(sent, _)| *sent >= sent_after) else {
            return "no request sent after the kill was answered".into();
        };
        let (sent, answered) = log[at];
        let mut line = format!(
            "request sent {:+.1} -> answered {:+.1} ms",
            ms(sent),
            ms(answered)
        );
        if let Some((before_sent, before_answered)) = at.checked_sub(1).map(|i| log[i]) {
            let _ = write!(
                line,
                " (the one before: sent {:+.1} -> answered {:+.1} ms)",
                ms(before_sent),
                ms(before_answered)
            );
        }
        line
    }

    fn stop(mut self) -> Res<SeqClient> {
        self.stop.store(true, Ordering::SeqCst);
        let client = self
            .thread
            .take()
            .ok_or("the request load was already stopped")?
            .join()
            .map_err(|_| "the request load thread panicked".to_string())?;
        match self.error() {
            Some(e) => Err(e),
            None => Ok(client),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// ICMP echo prober (raw socket in the client namespace)
// ---------------------------------------------------------------------------------------------

struct Pinger {
    stop: Arc<AtomicBool>,
    /// Send time of echo request number `i` (its ICMP sequence number).
    sent: Arc<Mutex<Vec<Instant>>>,
    /// (sequence number, arrival) of each echo reply, in arrival order.
    replies: Arc<Mutex<Vec<(u16, Instant)>>>,
    threads: Vec<JoinHandle<()>>,
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn open_icmp_socket() -> Res<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned by the OwnedFd right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(format!(
            "raw ICMP socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // A receive timeout lets the reader notice the stop flag.
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    // SAFETY: setsockopt with a pointer to a timeval that lives across the call and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!("SO_RCVTIMEO: {}", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

impl Pinger {
    fn start(ns: &NetNs, target: Ipv4Addr, ident: u16) -> Res<Pinger> {
        let fd = Arc::new(ns.run(open_icmp_socket).map_err(|e| e.to_string())??);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let sender = {
            let (fd, stop, sent) = (fd.clone(), stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(target).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                for seq in 0..=u16::MAX {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let mut packet = [0u8; 16];
                    packet[0] = 8; // echo request
                    packet[4..6].copy_from_slice(&ident.to_be_bytes());
                    packet[6..8].copy_from_slice(&seq.to_be_bytes());
                    packet[8..16].copy_from_slice(b"tandemft");
                    let sum = icmp_checksum(&packet);
                    packet[2..4].copy_from_slice(&sum.to_be_bytes());
                    lock(&sent).push(Instant::now());
                    // SAFETY: sendto with a buffer and a sockaddr_in that outlive the call.
                    // A failed send (no route for a moment) is just a lost probe.
                    unsafe {
                        libc::sendto(
                            fd.as_raw_fd(),
                            packet.as_ptr().cast(),
                            packet.len(),
                            0,
                            (&addr as *const libc::sockaddr_in).cast(),
                            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                        );
                    }
                    std::thread::sleep(PING_EVERY);
                }
            })
        };
        let receiver = {
            let (fd, stop, replies) = (fd, stop.clone(), replies.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::SeqCst) {
                    // SAFETY: recv into a buffer we own, with its length.
                    let n = unsafe {
                        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    let arrived = Instant::now();
                    if n <= 0 {
                        continue; // timeout (checks the stop flag) or a transient error
                    }
                    let packet = &buf[..n as usize];
                    let ip_header = usize::from(packet[0] & 0x0f) * 4;
                    let Some(icmp) = packet.get(ip_header..ip_header + 8) else {
                        continue;
                    };
                    let is_our_reply =
                        icmp[0] == 0 && u16::from_be_bytes([icmp[4], icmp[5]]) == ident;
                    if is_our_reply {
                        lock(&replies).push((u16::from_be_bytes([icmp[6], icmp[7]]), arrived));
                    }
                }
            })
        };
        Ok(Pinger {
            stop,
            sent,
            replies,
            threads: vec![sender, receiver],
        })
    }

    /// Time from `origin` to the first echo reply to a request sent at or after `sent_after`.
    fn first_answer_after(&self, sent_after: Instant, origin: Instant) -> Option<Duration> {
        let sent = lock(&self.sent);
        lock(&self.replies)
            .iter()
            .find(|(seq, _)| {
                sent.get(usize::from(*seq))
                    .is_some_and(|s| *s >= sent_after)
            })
            .map(|(_, arrived)| arrived.saturating_duration_since(origin))
    }

    fn replies(&self) -> usize {
        lock(&self.replies).len()
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------

/// What the FT side of one case measured.
#[derive(Clone, Debug)]
struct FtWindow {
    epochs: u64,
    real_epoch_ms: f64,
    vmm_dirty_pages: u64,
    bytes: u64,
    cut_early: u64,
    pause_p50_us: u64,
    pause_p99_us: u64,
    pause_max_us: u64,
    send_p50_us: u64,
    commit_p50_us: u64,
    commit_p99_us: u64,
    /// KVM page faults of the guest during the window (None: not counted here).
    faults: Option<u64>,
}

#[derive(Clone, Debug)]
struct CaseResult {
    work_per_s: f64,
    dirtied_per_s: f64,
    rtts_ms: Vec<f64>,
    tcp_mbps: Option<f64>,
    /// The guest's CPU and the client's TCP during the transfer.
    tcp_side: Option<TcpClientSide>,
    /// KVM page faults per epoch during the TCP transfer (the floor and FT; None without
    /// either, or where the kernel does not count them).
    tcp_faults_per_epoch: Option<f64>,
    tcp_ft: Option<TcpFt>,
    ft: Option<FtWindow>,
}

/// What bounds a TCP transfer: the guest's CPU, the client's window.
#[derive(Clone, Debug)]
struct TcpClientSide {
    /// The vCPU threads' CPU time over the transfer, % of one core.
    vcpu_pct: f64,
    /// Their time runnable but waiting for a CPU (other threads on it), % of the transfer.
    vcpu_wait_pct: f64,
    tcp: Option<ClientTcp>,
}

/// FT during the TCP transfer.
#[derive(Clone, Copy, Debug)]
struct TcpFt {
    /// VMM-dirty pages per epoch.
    dirty_per_epoch: f64,
    /// Of them, pages sent as mirrored input laid over the backup's copy.
    input_pages_per_epoch: f64,
    /// Pages early sending left to the pause per epoch (written again before it).
    held_pages_per_epoch: f64,
    /// Replication bytes (input mirrored, pages, state) per byte the guest received.
    bytes_per_byte: f64,
    /// CPU time of the replication threads of both sides per MB the guest received, ms.
    cpu_ms_per_mb: f64,
    /// The same, the primary's threads only.
    primary_cpu_ms_per_mb: f64,
    /// How long an input frame waited for the backup to hold it, p50 and p99, ms (ft-status
    /// after the transfer: its recent frames).
    input_mirror_ms: (f64, f64),
}

/// How one case is measured.
struct CaseSetup<'a> {
    bins: &'a Binaries,
    /// Where the client runs (the throughput connection is opened there).
    client_ns: &'a NetNs,
    /// The primary's API socket when the VM is protected by our FT (ft-status is read).
    ft_socket: Option<&'a Path>,
    /// What ft-status must say after the window: `protected`, or `off` with the dirty-log
    /// floor's peer (the floor protects nothing).
    floor: bool,
    /// Each round trip waits a random time below this first (the epoch under FT, else 0).
    think_max: Duration,
    tcp: bool,
}

/// One case on a running guest: the work window, the round trips and, if asked, throughput.
fn measure_case(setup: &CaseSetup, client: &mut SeqClient, opts: &Options) -> Res<CaseResult> {
    nap(opts.settle)?;
    let (ft_socket, think_max) = (setup.ft_socket, setup.think_max);
    let ft_before = match ft_socket {
        Some(s) => Some((Instant::now(), ft_status(setup.bins, s)?)),
        None => None,
    };
    let g0 = guest_stats(client)?;
    nap(opts.window)?;
    let g1 = guest_stats(client)?;
    let ft = match (ft_socket, ft_before) {
        (Some(s), Some((t0, before))) => {
            let after = ft_status(setup.bins, s)?;
            let elapsed = t0.elapsed();
            if setup.floor && after.peer.as_deref() != Some(DIRTY_LOG_FLOOR_PEER) {
                return Err(format!(
                    "the dirty-log floor is not running: health {:?}, peer {:?}",
                    after.health, after.peer
                ));
            }
            if !setup.floor && after.health != "protected" {
                return Err(format!(
                    "the VM is no longer protected: health {:?}, last error {:?}",
                    after.health, after.last_error
                ));
            }
            let epochs = after.epoch.saturating_sub(before.epoch);
            if epochs == 0 {
                return Err("no epoch ended during the window".into());
            }
            Some(FtWindow {
                epochs,
                real_epoch_ms: elapsed.as_secs_f64() * 1e3 / epochs as f64,
                vmm_dirty_pages: after.dirty_pages.saturating_sub(before.dirty_pages),
                bytes: after.bytes.saturating_sub(before.bytes),
                cut_early: after
                    .epochs_cut_early
                    .saturating_sub(before.epochs_cut_early),
                pause_p50_us: after.pause_us_p50,
                pause_p99_us: after.pause_us_p99,
                pause_max_us: after.pause_us_max,
                send_p50_us: after.send_us_p50,
                commit_p50_us: after.commit_us_p50,
                commit_p99_us: after.commit_us_p99,
                faults: faults_between(&before, &after),
            })
        }
        _ => None,
    };
    let guest_ms = g1.uptime_ms.saturating_sub(g0.uptime_ms);
    if guest_ms == 0 || g1.work <= g0.work {
        return Err(format!("the guest made no progress: {g0:?} -> {g1:?}"));
    }
    let guest_s = guest_ms as f64 / 1e3;
    let rtts_ms = round_trips(
        client,
        opts.round_trips,
        think_max,
        opts.latency_budget,
        SeqClient::req,
    )?;
    let (tcp, tcp_faults_per_epoch, tcp_ft) = if setup.tcp {
        let status_before = ft_socket.map(|s| ft_status(setup.bins, s)).transpose()?;
        let cpu_before = replication_cpu_ns();
        let vcpu_before = vcpu_cpu_ns();
        let started = Instant::now();
        let run = sink_throughput(
            setup.client_ns,
            opts.sink_mib << 20,
            opts.sink_budget,
            opts.client_cc.as_deref(),
        )?;
        let vcpu_after = vcpu_cpu_ns();
        let vcpu_ns = vcpu_after.0.saturating_sub(vcpu_before.0);
        let vcpu_wait_ns = vcpu_after.1.saturating_sub(vcpu_before.1);
        let took = started.elapsed();
        let cpu_after = replication_cpu_ns();
        let sent = run.sent;
        let status_after = ft_socket.map(|s| ft_status(setup.bins, s)).transpose()?;
        let cpu_ns = cpu_after.0.saturating_sub(cpu_before.0);
        let primary_cpu_ns = cpu_after.1.saturating_sub(cpu_before.1);
        let faults_per_epoch = match (&status_before, &status_after) {
            (Some(before), Some(after)) => faults_between(before, after).map(|faults| {
                faults as f64 / after.epoch.saturating_sub(before.epoch).max(1) as f64
            }),
            _ => None,
        };
        // The floor protects nothing: its counters say nothing about replication.
        let tcp_ft = match (status_before.filter(|_| !setup.floor), status_after) {
            (Some(before), Some(after)) => {
                let epochs = after.epoch.saturating_sub(before.epoch).max(1) as f64;
                let dirty = after.dirty_pages.saturating_sub(before.dirty_pages) as f64;
                let bytes = after.bytes.saturating_sub(before.bytes) as f64;
                let mb = sent.max(1) as f64 / 1e6;
                let input = after
                    .pages_from_input
                    .saturating_sub(before.pages_from_input) as f64;
                let held = after
                    .pages_held_for_pause
                    .saturating_sub(before.pages_held_for_pause) as f64;
                Some(TcpFt {
                    dirty_per_epoch: dirty / epochs,
                    input_pages_per_epoch: input / epochs,
                    held_pages_per_epoch: held / epochs,
                    bytes_per_byte: bytes / sent.max(1) as f64,
                    cpu_ms_per_mb: cpu_ns as f64 / 1e6 / mb,
                    primary_cpu_ms_per_mb: primary_cpu_ns as f64 / 1e6 / mb,
                    input_mirror_ms: (
                        after.input_mirror_us_p50 as f64 / 1e3,
                        after.input_mirror_us_p99 as f64 / 1e3,
                    ),
                })
            }
            _ => None,
        };
        let client = TcpClientSide {
            vcpu_pct: vcpu_ns as f64 * 100.0 / took.as_nanos().max(1) as f64,
            vcpu_wait_pct: vcpu_wait_ns as f64 * 100.0 / took.as_nanos().max(1) as f64,
            tcp: run.client,
        };
        (Some((run.mbps, client)), faults_per_epoch, tcp_ft)
    } else {
        (None, None, None)
    };
    Ok(CaseResult {
        work_per_s: (g1.work - g0.work) as f64 / guest_s,
        dirtied_per_s: g1.dirtied.saturating_sub(g0.dirtied) as f64 / guest_s,
        rtts_ms,
        tcp_mbps: tcp.as_ref().map(|t| t.0),
        tcp_side: tcp.map(|t| t.1),
        tcp_faults_per_epoch,
        tcp_ft,
        ft,
    })
}

/// Guest time per fault, us: `lost` (a fraction of each epoch of `epoch_us`) over `faults`
/// per epoch; None with too few faults for the quotient to mean anything.
fn per_fault_us(epoch_us: f64, lost: Option<f64>, faults: Option<f64>) -> Option<f64> {
    match (lost, faults) {
        (Some(lost), Some(faults)) if faults >= 20.0 => Some(epoch_us * lost / faults),
        _ => None,
    }
}

/// KVM page faults between two ft-status answers of one session.
fn faults_between(before: &FtStatus, after: &FtStatus) -> Option<u64> {
    Some(
        after
            .kvm_page_faults?
            .saturating_sub(before.kvm_page_faults?),
    )
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    NoFt,
    Ft,
    /// QEMU without COLO (the peer's baseline).
    QemuPlain,
    Colo,
    /// FT over plain TCP (`--insecure-plaintext`; the TLS section).
    FtPlaintext,
    /// FT over mutual TLS (`--tls-dir`; the TLS section).
    FtTls,
    /// FT with this many encoder threads (`--encode-threads`; the pipeline section).
    FtEncoders(u32),
    /// FT over this many TCP connections (`--streams`; the pipeline section).
    FtStreams(u32),
    /// FT staging each pause on the control loop alone (`--no-stage-helper`; the pipeline
    /// section).
    FtNoStageHelper,
    /// No FT, the dirty log harvested and re-armed every epoch (the VMM's dirty-log floor).
    Floor,
    /// FT with hot pages off: every dirty page write-protected at each checkpoint.
    FtCold,
    /// FT with early staging off: every dirty page copied in the pause.
    FtLateStaging,
    /// FT staging early but sending every page in the pause (`--no-early-send`).
    FtPauseSend,
    /// FT with the guest's ACKs held until their epoch commits (`--no-early-acks`; TCP cells).
    FtHeldAcks,
    /// FT in latency mode (`--latency-mode`): epochs end early while output waits.
    FtLatency,
    /// The delta section (`ft.dirty_bytes`): no FT, and FT.
    NoFtDelta,
    FtDelta,
    /// The hot-page section (a small region rewritten every epoch): no FT, the floor, FT, and
    /// FT with hot pages off.
    NoFtHot,
    FloorHot,
    FtHot,
    FtHotCold,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Metric {
    WorkPerS,
    AchievedPagesPerEpoch,
    VmmDirtyPerEpoch,
    RealEpochMs,
    PauseP50Ms,
    PauseP99Ms,
    PauseMaxMs,
    SendP50Ms,
    CommitP50Ms,
    CommitP99Ms,
    BytesPerDirtyPage,
    KibPerEpoch,
    CutEarlyPct,
    RttP50Ms,
    RttP99Ms,
    RoundTrips,
    TcpMbps,
    /// VMM-dirty pages per epoch during the TCP transfer.
    TcpDirtyPerEpoch,
    /// Of them, pages sent as input laid over the backup's copy.
    TcpInputPagesPerEpoch,
    /// Pages early sending left to the pause per epoch during the TCP transfer.
    TcpHeldPagesPerEpoch,
    /// Replication bytes per byte the guest received during the TCP transfer.
    TcpReplBytesPerByte,
    TcpReplCpuMsPerMb,
    /// The primary's share of it.
    TcpReplPrimaryCpuMsPerMb,
    /// Input frames' wait for the backup during the TCP transfer, ms.
    TcpInputMirrorP50Ms,
    TcpInputMirrorP99Ms,
    /// FT bytes sent per second of the work window, MB/s.
    SenderMbps,
    /// KVM page faults of the guest per epoch in the work window (the floor and FT).
    FaultsPerEpoch,
    /// The same during the TCP transfer.
    TcpFaultsPerEpoch,
    /// The guest's vCPU threads during the TCP transfer, % of one core.
    TcpVcpuPct,
    /// Their time runnable but waiting for a core, % of the transfer.
    TcpVcpuWaitPct,
    /// The client's time waiting for the guest's window, % of its busy time.
    TcpWindowBoundPct,
    /// Segments the client retransmitted.
    TcpRetransmits,
}

/// A cell: (epoch ms, pages per epoch).
type Cell = (u64, u64);

#[derive(Default)]
struct Results {
    samples: BTreeMap<(Cell, Mode, Metric), Vec<f64>>,
    failovers: Vec<FailoverSample>,
    /// The groups section, in the order measured.
    group: Vec<GroupSample>,
    failures: Vec<String>,
    notes: Vec<String>,
    /// The TCP client's congestion controls, as its kernel named them.
    client_ccs: std::collections::BTreeSet<String>,
}

#[derive(Clone, Copy, Debug)]
struct FailoverSample {
    /// Protected with held output copied to the backup (the default), or with
    /// `--no-resend-output`.
    resend: bool,
    icmp_ms: f64,
    tcp_ms: f64,
    backup_own_ms: Option<f64>,
    reaped_ms: f64,
}

impl Results {
    fn add(&mut self, cell: Cell, mode: Mode, metric: Metric, value: f64) {
        self.samples
            .entry((cell, mode, metric))
            .or_default()
            .push(value);
    }

    fn med(&self, cell: Cell, mode: Mode, metric: Metric) -> Option<f64> {
        self.samples
            .get(&(cell, mode, metric))
            .and_then(|v| median(v))
    }

    /// `a`/`b` pairing their n-th figures (the n-th run's when no case of theirs failed; runs
    /// take turns, so a run's cases ran close together): how much the ratio moves from run to
    /// run.
    fn ratio_by_run(&self, cell: Cell, (a, b): (Mode, Mode), metric: Metric) -> Vec<f64> {
        let values = |mode| self.samples.get(&(cell, mode, metric));
        match (values(a), values(b)) {
            (Some(a), Some(b)) => a
                .iter()
                .zip(b)
                .filter(|(_, &b)| b > 0.0)
                .map(|(a, b)| a / b)
                .collect(),
            _ => Vec::new(),
        }
    }

    fn count(&self, cell: Cell, mode: Mode, metric: Metric) -> usize {
        self.samples.get(&(cell, mode, metric)).map_or(0, Vec::len)
    }

    fn fail(&mut self, what: String) {
        println!("  FAILED: {}", what.replace('\n', "\n    "));
        self.failures.push(what);
    }

    /// Stores one case's figures under `cell`.
    fn record(&mut self, cell: Cell, mode: Mode, r: &CaseResult) {
        let (epoch_ms, _) = cell;
        self.add(cell, mode, Metric::WorkPerS, r.work_per_s);
        self.add(
            cell,
            mode,
            Metric::AchievedPagesPerEpoch,
            r.dirtied_per_s * epoch_ms as f64 / 1e3,
        );
        if let Some(p50) = percentile(&r.rtts_ms, 50.0) {
            self.add(cell, mode, Metric::RttP50Ms, p50);
        }
        if let Some(p99) = percentile(&r.rtts_ms, 99.0) {
            self.add(cell, mode, Metric::RttP99Ms, p99);
        }
        self.add(cell, mode, Metric::RoundTrips, r.rtts_ms.len() as f64);
        if let Some(mbps) = r.tcp_mbps {
            self.add(cell, mode, Metric::TcpMbps, mbps);
        }
        if let Some(faults) = r.tcp_faults_per_epoch {
            self.add(cell, mode, Metric::TcpFaultsPerEpoch, faults);
        }
        if let Some(side) = &r.tcp_side {
            self.add(cell, mode, Metric::TcpVcpuPct, side.vcpu_pct);
            self.add(cell, mode, Metric::TcpVcpuWaitPct, side.vcpu_wait_pct);
            if let Some(tcp) = &side.tcp {
                self.add(cell, mode, Metric::TcpWindowBoundPct, tcp.window_bound_pct);
                self.add(cell, mode, Metric::TcpRetransmits, tcp.retransmits as f64);
                self.client_ccs.insert(tcp.cc.clone());
            }
        }
        if let Some(t) = r.tcp_ft {
            self.add(cell, mode, Metric::TcpDirtyPerEpoch, t.dirty_per_epoch);
            self.add(
                cell,
                mode,
                Metric::TcpInputPagesPerEpoch,
                t.input_pages_per_epoch,
            );
            self.add(
                cell,
                mode,
                Metric::TcpHeldPagesPerEpoch,
                t.held_pages_per_epoch,
            );
            self.add(cell, mode, Metric::TcpReplBytesPerByte, t.bytes_per_byte);
            self.add(cell, mode, Metric::TcpReplCpuMsPerMb, t.cpu_ms_per_mb);
            self.add(
                cell,
                mode,
                Metric::TcpReplPrimaryCpuMsPerMb,
                t.primary_cpu_ms_per_mb,
            );
            self.add(cell, mode, Metric::TcpInputMirrorP50Ms, t.input_mirror_ms.0);
            self.add(cell, mode, Metric::TcpInputMirrorP99Ms, t.input_mirror_ms.1);
        }
        if let Some(ft) = &r.ft {
            let epochs = ft.epochs as f64;
            self.add(
                cell,
                mode,
                Metric::VmmDirtyPerEpoch,
                ft.vmm_dirty_pages as f64 / epochs,
            );
            self.add(cell, mode, Metric::RealEpochMs, ft.real_epoch_ms);
            if let Some(faults) = ft.faults {
                self.add(cell, mode, Metric::FaultsPerEpoch, faults as f64 / epochs);
            }
            self.add(cell, mode, Metric::PauseP50Ms, ft.pause_p50_us as f64 / 1e3);
            self.add(cell, mode, Metric::PauseP99Ms, ft.pause_p99_us as f64 / 1e3);
            self.add(cell, mode, Metric::PauseMaxMs, ft.pause_max_us as f64 / 1e3);
            self.add(cell, mode, Metric::SendP50Ms, ft.send_p50_us as f64 / 1e3);
            self.add(
                cell,
                mode,
                Metric::CommitP50Ms,
                ft.commit_p50_us as f64 / 1e3,
            );
            self.add(
                cell,
                mode,
                Metric::CommitP99Ms,
                ft.commit_p99_us as f64 / 1e3,
            );
            if ft.vmm_dirty_pages > 0 {
                self.add(
                    cell,
                    mode,
                    Metric::BytesPerDirtyPage,
                    ft.bytes as f64 / ft.vmm_dirty_pages as f64,
                );
            }
            self.add(
                cell,
                mode,
                Metric::KibPerEpoch,
                ft.bytes as f64 / 1024.0 / epochs,
            );
            self.add(
                cell,
                mode,
                Metric::CutEarlyPct,
                ft.cut_early as f64 * 100.0 / epochs,
            );
            let window_s = epochs * ft.real_epoch_ms / 1e3;
            if window_s > 0.0 {
                self.add(
                    cell,
                    mode,
                    Metric::SenderMbps,
                    ft.bytes as f64 / window_s / 1e6,
                );
            }
        }
    }
}

fn describe_case(r: &CaseResult) -> String {
    let mut s = format!(
        "work {:.1} M/s, dirtied {:.0} pages/s, {} round trips p50 {:.2} p99 {:.2} ms",
        r.work_per_s / 1e6,
        r.dirtied_per_s,
        r.rtts_ms.len(),
        percentile(&r.rtts_ms, 50.0).unwrap_or(f64::NAN),
        percentile(&r.rtts_ms, 99.0).unwrap_or(f64::NAN),
    );
    if let Some(mbps) = r.tcp_mbps {
        let _ = write!(s, ", tcp {mbps:.1} MB/s");
    }
    if let Some(t) = r.tcp_ft {
        let _ = write!(
            s,
            " ({:.0} VMM-dirty pages/epoch, {:.0} sent as input, {:.0} held for the pause, \
             {:.2} replication B per B received, replication threads {:.2} ms CPU per MB, {:.2} of it the primary's, input \
             held by the backup p50 {:.2} p99 {:.2} ms after delivery)",
            t.dirty_per_epoch,
            t.input_pages_per_epoch,
            t.held_pages_per_epoch,
            t.bytes_per_byte,
            t.cpu_ms_per_mb,
            t.primary_cpu_ms_per_mb,
            t.input_mirror_ms.0,
            t.input_mirror_ms.1
        );
    }
    if let Some(ft) = &r.ft {
        let _ = write!(
            s,
            "; {} epochs of {:.2} ms, {:.0} VMM-dirty pages/epoch, {:.0} B/dirty page, pause p50 {:.3} p99 {:.3} max {:.3} ms, send p50 {:.3} ms, commit p50 {:.3} p99 {:.3} ms, {} cut early",
            ft.epochs,
            ft.real_epoch_ms,
            ft.vmm_dirty_pages as f64 / ft.epochs as f64,
            ft.bytes as f64 / ft.vmm_dirty_pages.max(1) as f64,
            ft.pause_p50_us as f64 / 1e3,
            ft.pause_p99_us as f64 / 1e3,
            ft.pause_max_us as f64 / 1e3,
            ft.send_p50_us as f64 / 1e3,
            ft.commit_p50_us as f64 / 1e3,
            ft.commit_p99_us as f64 / 1e3,
            ft.cut_early
        );
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The runs
// ---------------------------------------------------------------------------------------------

/// Guest dirty rate (pages/s) for a cell.
fn rate_of(cell: Cell) -> u64 {
    let (epoch_ms, pages) = cell;
    pages * 1000 / epoch_ms
}

/// Cells grouped by the guest dirty rate they need (one boot per rate).
fn groups(opts: &Options) -> BTreeMap<u64, Vec<Cell>> {
    let mut groups: BTreeMap<u64, Vec<Cell>> = BTreeMap::new();
    for &pages in &opts.pages {
        for &epoch in &opts.epochs {
            groups
                .entry(rate_of((epoch, pages)))
                .or_default()
                .push((epoch, pages));
        }
    }
    groups
}

/// Connects to the guest of a boot just made; a failure is recorded (`section`: "" or a
/// section's prefix such as "TLS: ").
fn connect_guest(
    lab: &Lab,
    primary: &Node,
    section: &str,
    rate: u64,
    results: &mut Results,
) -> Option<SeqClient> {
    match SeqClient::connect(&lab.hosts.client) {
        Ok(c) => Some(c),
        Err(e) => {
            results.fail(format!(
                "{section}connect to the guest at {rate} pages/s: {e}\n{}",
                primary.diagnose("connect")
            ));
            None
        }
    }
}

/// Records a failed case (`section` as in [`connect_guest`]); returns whether this boot's
/// other cases can still run (the primary lives and a new connection to the guest was made,
/// as a failure may leave the old one unusable).
fn case_failed(
    lab: &Lab,
    primary: &mut Node,
    client: &mut SeqClient,
    section: &str,
    failure: String,
    results: &mut Results,
) -> bool {
    results.fail(format!("{section}{failure}"));
    if let Some(status) = primary.vmm.poll_exit() {
        results.fail(primary.diagnose(&format!(
            "the primary exited ({status}); the rest of this rate is skipped"
        )));
        return false;
    }
    match SeqClient::connect(&lab.hosts.client) {
        Ok(c) => {
            *client = c;
            true
        }
        Err(e) => {
            results.fail(format!("{section}reconnect to the guest: {e}"));
            false
        }
    }
}

/// Ends a boot: the guest checks its memory pattern and sequence (unless the primary is gone
/// or the run was interrupted), then the primary is killed.
fn end_boot(
    mut primary: Node,
    client: &mut SeqClient,
    section: &str,
    rate: u64,
    results: &mut Results,
) {
    if primary.vmm.poll_exit().is_none() && !INTERRUPTED.load(Ordering::SeqCst) {
        if let Err(e) = guest_check(client) {
            results.fail(format!("{section}guest self-check at {rate} pages/s: {e}"));
        }
    }
    primary.vmm.kill();
}

/// One boot: no FT and FT at each of `cells`' epochs, alternating, `opts.runs` times.
fn run_group(lab: &mut Lab, rate: u64, cells: &[Cell], opts: &Options, results: &mut Results) {
    let cells_text: Vec<String> = cells
        .iter()
        .map(|(e, p)| format!("{p} pages/{e} ms"))
        .collect();
    log(&format!(
        "guest dirtying {rate} pages/s ({})",
        cells_text.join(", ")
    ));
    let mut primary = match lab.boot_primary(Side::A, rate) {
        Ok(node) => node,
        Err(e) => {
            results.fail(format!("boot at {rate} pages/s: {e}"));
            return;
        }
    };
    let Some(mut client) = connect_guest(lab, &primary, "", rate, results) else {
        return;
    };
    let with_tcp = cells.iter().any(|c| TCP_CELLS.contains(c));
    for run in 1..=opts.runs {
        // Per cell the floor (dirty logging at the cell's epoch, no FT) next to its FT case
        // (and FT with hot pages off).
        let per_cell: Vec<Mode> = [Mode::Floor, Mode::Ft]
            .into_iter()
            .chain(opts.hot_compare.then_some(Mode::FtCold))
            .chain(opts.early_compare.then_some(Mode::FtLateStaging))
            .chain(opts.early_compare.then_some(Mode::FtPauseSend))
            .chain([Mode::FtLatency])
            .collect();
        let per_cell = &per_cell;
        let mut order: Vec<Option<(Cell, Mode)>> = std::iter::once(None)
            .chain(cells.iter().flat_map(|&c| {
                // TCP cells also show FT with every ACK held to its epoch's commit.
                let held = TCP_CELLS.contains(&c).then_some(Mode::FtHeldAcks);
                per_cell
                    .iter()
                    .copied()
                    .chain(held)
                    .map(move |m| Some((c, m)))
            }))
            .collect();
        if run % 2 == 0 {
            order.reverse();
        }
        for case in order {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return;
            }
            let label = match case {
                None => format!("run {run} {rate:>6} pages/s  no FT"),
                Some(((e, p), Mode::Floor)) => format!(
                    "run {run} {rate:>6} pages/s  floor {e:>2} ms ({p} pages/epoch, dirty log only)"
                ),
                Some(((e, p), Mode::FtCold)) => format!(
                    "run {run} {rate:>6} pages/s  FT {e:>2} ms ({p} pages/epoch, hot pages off)"
                ),
                Some(((e, p), Mode::FtLateStaging)) => format!(
                    "run {run} {rate:>6} pages/s  FT {e:>2} ms ({p} pages/epoch, early staging off)"
                ),
                Some(((e, p), Mode::FtPauseSend)) => format!(
                    "run {run} {rate:>6} pages/s  FT {e:>2} ms ({p} pages/epoch, early sending off)"
                ),
                Some(((e, p), Mode::FtHeldAcks)) => format!(
                    "run {run} {rate:>6} pages/s  FT {e:>2} ms ({p} pages/epoch, ACKs held)"
                ),
                Some(((e, p), Mode::FtLatency)) => format!(
                    "run {run} {rate:>6} pages/s  FT {e:>2} ms ({p} pages/epoch, latency mode)"
                ),
                Some(((e, p), _)) => {
                    format!("run {run} {rate:>6} pages/s  FT {e:>2} ms ({p} pages/epoch)")
                }
            };
            let outcome = match case {
                None => {
                    let setup = CaseSetup {
                        bins: &lab.bins,
                        client_ns: &lab.hosts.client,
                        ft_socket: None,
                        floor: false,
                        think_max: Duration::ZERO,
                        tcp: with_tcp,
                    };
                    measure_case(&setup, &mut client, opts).map(|r| {
                        log(&format!("  {label}: {}", describe_case(&r)));
                        for &cell in cells {
                            results.record(cell, Mode::NoFt, &r);
                        }
                    })
                }
                Some((cell, mode)) => {
                    let measured = match mode {
                        Mode::Floor => floor_case(lab, &primary, &mut client, cell, opts, with_tcp),
                        _ => {
                            lab.hot_pages = mode != Mode::FtCold;
                            lab.early_staging = mode != Mode::FtLateStaging;
                            lab.early_send = mode != Mode::FtPauseSend;
                            lab.early_acks = mode != Mode::FtHeldAcks;
                            lab.latency_mode = mode == Mode::FtLatency;
                            let r = ft_case(lab, &primary, &mut client, cell, opts);
                            lab.hot_pages = true;
                            lab.early_staging = true;
                            lab.early_send = true;
                            lab.early_acks = true;
                            lab.latency_mode = false;
                            r
                        }
                    };
                    measured.map(|r| {
                        log(&format!("  {label}: {}", describe_case(&r)));
                        results.record(cell, mode, &r);
                    })
                }
            };
            if let Err(e) = outcome {
                let failure = format!("{label}: {e}");
                if !case_failed(lab, &mut primary, &mut client, "", failure, results) {
                    return;
                }
            }
        }
    }
    end_boot(primary, &mut client, "", rate, results);
}

/// The guest's own check of its memory pattern and the sequence.
fn guest_check(client: &mut SeqClient) -> Res<()> {
    let reply = client.command("check")?;
    if reply.starts_with("ok ") {
        Ok(())
    } else {
        Err(format!("check answered {reply:?}"))
    }
}

/// A section whose FT cases differ in one setting (the TLS and pipeline sections): per cell
/// of `pages` (at `epoch_ms`) one boot, in which the FT cases of `modes` take turns on fresh
/// sessions, the order rotating with the run (run 1: as given; run 2: starting from the
/// second; ...), each measured like the cells' FT cases.
fn run_compare(
    lab: &mut Lab,
    opts: &Options,
    results: &mut Results,
    (name, epoch_ms, pages): (&str, u64, &[u64]),
    modes: &[Mode],
) {
    for &pages in pages {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return;
        }
        let cell = (epoch_ms, pages);
        let rate = rate_of(cell);
        let prefix = format!("{name}: ");
        let names: Vec<String> = modes.iter().map(|&m| mode_setting(m)).collect();
        log(&format!(
            "{name}: guest dirtying {rate} pages/s ({pages} pages/{epoch_ms} ms), FT {} in turn",
            names.join(", ")
        ));
        let mut primary = match lab.boot_primary(Side::A, rate) {
            Ok(node) => node,
            Err(e) => {
                results.fail(format!("{name}: boot at {rate} pages/s: {e}"));
                continue;
            }
        };
        let Some(mut client) = connect_guest(lab, &primary, &prefix, rate, results) else {
            continue;
        };
        'runs: for run in 1..=opts.runs {
            let mut order = modes.to_vec();
            order.rotate_left((run - 1) % modes.len().max(1));
            for mode in order {
                if INTERRUPTED.load(Ordering::SeqCst) {
                    break 'runs;
                }
                let label = format!(
                    "run {run} {rate:>6} pages/s  FT {epoch_ms:>2} ms ({pages} pages/epoch), {}",
                    mode_setting(mode)
                );
                let saved = (
                    lab.tls_dir.clone(),
                    lab.encode_threads,
                    lab.streams,
                    lab.stage_helper,
                );
                match mode {
                    Mode::FtTls => lab.tls_dir = Some(tls_dir().to_string_lossy().into_owned()),
                    Mode::FtPlaintext => lab.tls_dir = None,
                    Mode::FtEncoders(n) => lab.encode_threads = Some(n),
                    Mode::FtStreams(n) => lab.streams = Some(n),
                    Mode::FtNoStageHelper => {
                        // Otherwise as "sender alone": only the helper differs.
                        lab.encode_threads = Some(0);
                        lab.stage_helper = false;
                    }
                    _ => {}
                }
                let outcome = ft_case(lab, &primary, &mut client, cell, opts);
                (
                    lab.tls_dir,
                    lab.encode_threads,
                    lab.streams,
                    lab.stage_helper,
                ) = saved;
                match outcome {
                    Ok(r) => {
                        log(&format!("  {label}: {}", describe_case(&r)));
                        results.record(cell, mode, &r);
                    }
                    Err(e) => {
                        let failure = format!("{label}: {e}");
                        if !case_failed(lab, &mut primary, &mut client, &prefix, failure, results) {
                            break 'runs;
                        }
                    }
                }
            }
        }
        end_boot(primary, &mut client, &prefix, rate, results);
    }
}

/// What distinguishes an FT case of a compare section.
fn mode_setting(mode: Mode) -> String {
    match mode {
        Mode::FtTls => "over TLS".into(),
        Mode::FtPlaintext => "over plaintext".into(),
        Mode::FtEncoders(n) => format!("--encode-threads {n}"),
        Mode::FtStreams(n) => format!("--streams {n}"),
        Mode::FtNoStageHelper => "--no-stage-helper".into(),
        other => format!("{other:?}"),
    }
}

fn ft_case(
    lab: &mut Lab,
    primary: &Node,
    client: &mut SeqClient,
    cell: Cell,
    opts: &Options,
) -> Res<CaseResult> {
    let backup = lab.protect(primary, cell.0, Some(opts.heartbeat_timeout_ms), None)?;
    let tcp = TCP_CELLS.contains(&cell);
    let setup = CaseSetup {
        bins: &lab.bins,
        client_ns: &lab.hosts.client,
        ft_socket: Some(&primary.socket),
        floor: false,
        think_max: Duration::from_millis(cell.0),
        tcp,
    };
    let measured = measure_case(&setup, client, opts);
    let measured = measured.map_err(|e| {
        format!(
            "{e}\n{}\n{}",
            primary.diagnose("FT case"),
            backup.diagnose("FT case")
        )
    });
    let ended = lab.unprotect(primary, backup);
    let result = measured?;
    ended?;
    Ok(result)
}

/// The dirty-log floor at `cell`'s epoch: the VMM harvests and re-arms the dirty log every
/// epoch as an FT checkpoint does, with no backup, no pause, no copy and nothing sent (`tcp`:
/// the bulk send too, in the TCP cells).
fn floor_case(
    lab: &Lab,
    primary: &Node,
    client: &mut SeqClient,
    cell: Cell,
    opts: &Options,
    tcp: bool,
) -> Res<CaseResult> {
    let body = format!(
        r#"{{"peer": "{DIRTY_LOG_FLOOR_PEER}", "epoch_ms": {}}}"#,
        cell.0
    );
    let (code, answer) = api_request(
        &primary.socket,
        "PUT",
        "vm.enable-ft",
        Some(&body),
        STEP_TIMEOUT,
    )
    .map_err(|e| format!("start the dirty-log floor: {e}"))?;
    if !(200..300).contains(&code) {
        return Err(format!("start the dirty-log floor: HTTP {code} {answer}"));
    }
    let setup = CaseSetup {
        bins: &lab.bins,
        client_ns: &lab.hosts.client,
        ft_socket: Some(&primary.socket),
        floor: true,
        think_max: Duration::ZERO,
        tcp: tcp && TCP_CELLS.contains(&cell),
    };
    let measured = measure_case(&setup, client, opts)
        .map_err(|e| format!("{e}\n{}", primary.diagnose("floor case")));
    let ended = ch_remote(&lab.bins, &primary.socket, &["disable-ft"]);
    let result = measured?;
    ended?;
    Ok(result)
}

/// A section with a boot of its own per page count: how the guest rewrites pages, and the
/// cases run side by side on each boot (alternating order, odd runs as listed).
struct Section {
    /// Prefix of its log and failure lines.
    name: &'static str,
    dirty_bytes: u64,
    dirty_mib: u64,
    modes: &'static [Mode],
}

/// The delta section: the guest changes `opts.dirty_bytes` bytes per page rewrite; no FT and
/// FT.
fn run_delta(lab: &mut Lab, opts: &Options, results: &mut Results) {
    let section = Section {
        name: "delta",
        dirty_bytes: opts.dirty_bytes,
        dirty_mib: DIRTY_REGION_MIB,
        modes: &[Mode::NoFtDelta, Mode::FtDelta],
    };
    run_section(lab, opts, results, &section);
}

/// The hot-page section: a region of [`HOT_REGION_MIB`] rewritten every word, so every page
/// is rewritten every epoch or more often; no FT, the floor, FT, and FT with hot pages off.
fn run_hot(lab: &mut Lab, opts: &Options, results: &mut Results) {
    let section = Section {
        name: "hot",
        dirty_bytes: 0,
        dirty_mib: HOT_REGION_MIB,
        modes: &[Mode::NoFtHot, Mode::FloorHot, Mode::FtHot, Mode::FtHotCold],
    };
    run_section(lab, opts, results, &section);
}

fn run_section(lab: &mut Lab, opts: &Options, results: &mut Results, section: &Section) {
    let epoch = delta_epoch(opts);
    let name = section.name;
    let prefix = format!("{name}: ");
    for &pages in opts.pages.iter().filter(|&&p| p > 0) {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return;
        }
        let cell = (epoch, pages);
        let rate = rate_of(cell);
        let load = (rate, section.dirty_bytes, section.dirty_mib);
        log(&format!(
            "{name}: guest dirtying {rate} pages/s ({pages} pages/{epoch} ms) of {} MiB, {} bytes per rewrite (0: every word)",
            section.dirty_mib, section.dirty_bytes
        ));
        let mut primary = match lab.boot_vm(Side::A, load, ("tapvm", GUEST_IP, GUEST_MAC)) {
            Ok(node) => node,
            Err(e) => {
                results.fail(format!("{name}: boot at {rate} pages/s: {e}"));
                continue;
            }
        };
        let Some(mut client) = connect_guest(lab, &primary, &prefix, rate, results) else {
            continue;
        };
        'runs: for run in 1..=opts.runs {
            let mut order = section.modes.to_vec();
            if run % 2 == 0 {
                order.reverse();
            }
            for mode in order {
                if INTERRUPTED.load(Ordering::SeqCst) {
                    break 'runs;
                }
                let what = match mode {
                    Mode::NoFtDelta | Mode::NoFtHot => "no FT".to_string(),
                    Mode::FloorHot => format!("floor {epoch:>2} ms (dirty log only)"),
                    Mode::FtHotCold => {
                        format!("FT {epoch:>2} ms ({pages} pages/epoch, hot pages off)")
                    }
                    _ => format!("FT {epoch:>2} ms ({pages} pages/epoch)"),
                };
                let label = format!("run {run} {rate:>6} pages/s  {what}");
                let outcome = match mode {
                    Mode::NoFtDelta | Mode::NoFtHot => {
                        let setup = CaseSetup {
                            bins: &lab.bins,
                            client_ns: &lab.hosts.client,
                            ft_socket: None,
                            floor: false,
                            think_max: Duration::ZERO,
                            tcp: false,
                        };
                        measure_case(&setup, &mut client, opts)
                    }
                    Mode::FloorHot => floor_case(lab, &primary, &mut client, cell, opts, false),
                    _ => {
                        lab.hot_pages = mode != Mode::FtHotCold;
                        let r = ft_case(lab, &primary, &mut client, cell, opts);
                        lab.hot_pages = true;
                        r
                    }
                };
                match outcome {
                    Ok(r) => {
                        log(&format!("  {label}: {}", describe_case(&r)));
                        results.record(cell, mode, &r);
                    }
                    Err(e) => {
                        let failure = format!("{label}: {e}");
                        if !case_failed(lab, &mut primary, &mut client, &prefix, failure, results) {
                            break 'runs;
                        }
                    }
                }
            }
        }
        end_boot(primary, &mut client, &prefix, rate, results);
    }
}

fn delta_epoch(opts: &Options) -> u64 {
    if opts.epochs.contains(&DELTA_EPOCH_MS) {
        DELTA_EPOCH_MS
    } else {
        opts.epochs.first().copied().unwrap_or(DELTA_EPOCH_MS)
    }
}

/// What the client and the guest say about a connection that stopped after a failover: the
/// client's TCP state (`ss`) and the guest's own sequence number on a new connection. A guest
/// behind the client's last answer means the client saw output the backup never had.
fn stall_diagnosis(client_ns: &NetNs, client_last_seq: u64) -> String {
    let ss = Command::new("ip")
        .args(["netns", "exec", client_ns.name(), "ss", "-tino", "dst"])
        .arg(format!("{GUEST_IP}"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("ss: {e}"));
    let guest = SeqClient::connect(client_ns).and_then(|mut c| c.command("stats"));
    format!(
        "client: last answered seq {client_last_seq}; guest on a new connection: {guest:?}\nclient TCP state:\n{ss}"
    )
}

/// Kill -9 of the primary under load, `opts.failovers` times with the default protection and
/// as many with `--no-resend-output`, alternating; the roles swap each time.
fn run_failovers(lab: &mut Lab, opts: &Options, results: &mut Results) -> Res<()> {
    let rate = rate_of((FAILOVER_EPOCH_MS, FAILOVER_PAGES));
    log(&format!(
        "failover: {} kill(s) of the primary with held output sent again by the backup and {} with --no-resend-output, alternating; {FAILOVER_EPOCH_MS} ms epochs, guest dirtying {rate} pages/s",
        opts.failovers, opts.failovers
    ));
    let outcome = kill_primaries(lab, opts, results, rate);
    lab.resend_output = true;
    outcome
}

fn kill_primaries(lab: &mut Lab, opts: &Options, results: &mut Results, rate: u64) -> Res<()> {
    let mut primary = lab.boot_primary(Side::A, rate)?;
    let client = SeqClient::connect(&lab.hosts.client)?;
    let load = ReqLoad::start(client);
    let mut kill_phase = XorShift::from_clock();
    for rep in 1..=2 * opts.failovers {
        check_interrupted()?;
        let resend = rep % 2 == 1;
        lab.resend_output = resend;
        let backup = lab.protect(&primary, FAILOVER_EPOCH_MS, None, None)?;
        nap(Duration::from_millis(if opts.quick { 500 } else { 1000 }))?;
        if let Some(e) = load.error() {
            return Err(format!("request load before kill {rep}: {e}"));
        }
        let ident = (std::process::id() as u16) ^ (rep as u16).wrapping_mul(0x101);
        let pinger = Pinger::start(&lab.hosts.client, GUEST_IP, ident)?;
        // Pings and requests must both be answered before the kill.
        let answered_at_start = load.answered();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            nap(Duration::from_millis(100))?;
            if pinger.replies() > 0 && load.answered() > answered_at_start {
                break;
            }
            if let Some(e) = load.error() {
                return Err(format!("request load before kill {rep}: {e}"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "before kill {rep}: in 5 s {} ICMP echo replies and {} answered requests from the protected guest\n{}\n{}",
                    pinger.replies(),
                    load.answered() - answered_at_start,
                    primary.diagnose("before the kill"),
                    backup.diagnose("before the kill")
                ));
            }
        }
        // A host dies at no particular point of an epoch: after the check's own timer (which the
        // kernel may fire together with the epoch timer) wait a random part of an epoch.
        let offset_us = kill_phase.next() % (FAILOVER_EPOCH_MS * 1000);
        std::thread::sleep(Duration::from_micros(offset_us));
        let answered_before = load.answered();
        let killed = Instant::now();
        primary.vmm.kill();
        let reaped_ms = killed.elapsed().as_secs_f64() * 1e3;
        // Once SIGKILL has taken effect no thread of the primary runs again, so a probe sent
        // after that can only be answered by the backup; the margin covers signal delivery.
        let only_backup_answers = killed + KILL_MARGIN;
        let mut took_over: Option<(f64, Option<u64>)> = None;
        let deadline = killed + FAILOVER_TIMEOUT;
        let (icmp, tcp, tcp_timeline) = loop {
            check_interrupted()?;
            if took_over.is_none() {
                let status = ft_status(&lab.bins, &backup.socket)?;
                match status.health.as_str() {
                    "took_over" => {
                        took_over = Some((
                            killed.elapsed().as_secs_f64() * 1e3,
                            status.last_failover_ms,
                        ))
                    }
                    "failed" | "fenced" => {
                        return Err(format!(
                            "the backup did not take over: {} ({:?})\n{}",
                            status.health,
                            status.last_error,
                            backup.diagnose("failover")
                        ))
                    }
                    _ => {}
                }
            }
            let icmp = pinger.first_answer_after(only_backup_answers, killed);
            let tcp = load.first_answer_to_request_after(only_backup_answers, killed);
            if let (Some(icmp), Some(tcp), Some(_)) = (icmp, tcp, took_over) {
                break (icmp, tcp, load.timeline_after(only_backup_answers, killed));
            }
            if let Some(e) = load.error() {
                return Err(format!("request load after kill {rep}: {e}"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "kill {rep}: after {FAILOVER_TIMEOUT:?}: took over {took_over:?}, first ICMP answer {icmp:?}, first TCP answer {tcp:?} ({} requests answered before the kill, {} now)\n{}\n{}",
                    answered_before,
                    load.answered(),
                    stall_diagnosis(&lab.hosts.client, load.last_seq.load(Ordering::SeqCst)),
                    backup.diagnose("failover")
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        drop(pinger);
        let (seen_ms, own_ms) = took_over.unwrap_or((f64::NAN, None));
        // Why the backup gave up on the primary (connection closed or heartbeat timeout).
        let stderr = backup.vmm.stderr();
        let reason = stderr
            .lines()
            .find_map(|l| l.split_once("FT: primary lost (").map(|(_, r)| r))
            .and_then(|r| r.rsplit_once("); taking over").map(|(r, _)| r.to_string()))
            .unwrap_or_else(|| "reason not logged".into());
        let sample = FailoverSample {
            resend,
            icmp_ms: icmp.as_secs_f64() * 1e3,
            tcp_ms: tcp.as_secs_f64() * 1e3,
            backup_own_ms: own_ms.map(|v| v as f64),
            reaped_ms,
        };
        log(&format!(
            "  kill {rep}{}: primary reaped after {reaped_ms:.1} ms, first ICMP answer {:.1} ms, first TCP answer to a new request {:.1} ms ({tcp_timeline}), backup: {reason}, then -> running in {} ms (took_over seen via the API after {:.1} ms)",
            if resend { "" } else { " (--no-resend-output)" },
            sample.icmp_ms,
            sample.tcp_ms,
            own_ms.map_or("?".to_string(), |v| v.to_string()),
            seen_ms
        ));
        results.failovers.push(sample);
        primary = backup;
    }
    let mut client = load.stop()?;
    guest_check(&mut client).map_err(|e| format!("guest self-check after the failovers: {e}"))?;
    primary.vmm.kill();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Groups: relay latency with no FT, separate protection and one FT group
// ---------------------------------------------------------------------------------------------

/// The `--group` socket paths of one FT group: the primaries' (host A) and the backups'
/// (host B). The namespaces share the file system, so the two must differ.
struct GroupSockets {
    primaries: String,
    backups: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum GroupCase {
    NoFt,
    Separate,
    Group,
    /// In one group, every page copied in the pause (`--no-early-staging`).
    GroupLate,
}

impl GroupCase {
    fn label(self) -> &'static str {
        match self {
            GroupCase::NoFt => "no FT",
            GroupCase::Separate => "FT separately",
            GroupCase::Group => "FT in one group",
            GroupCase::GroupLate => "FT in one group, late staging",
        }
    }
}

/// Round trips of one groups case, in ms.
#[derive(Clone, Debug)]
struct GroupSample {
    case: GroupCase,
    relay_ms: Vec<f64>,
    direct_ms: Vec<f64>,
    /// Under FT, the pause (ft-status p50, p99, ms) of the member that stood still longest.
    pause_ms: Option<(f64, f64)>,
}

/// The groups section's two VMs and their clients (both connected to VM 1).
struct GroupVms {
    vms: Vec<Node>,
    relay: SeqClient,
    direct: SeqClient,
}

/// Boots both VMs, then measures no FT, separate protection and one group, in that order.
fn run_groups(lab: &mut Lab, opts: &Options, results: &mut Results) -> Res<()> {
    let rate = rate_of((GROUP_EPOCH_MS, GROUP_PAGES));
    log(&format!(
        "groups: two VMs dirtying {rate} pages/s, {GROUP_EPOCH_MS} ms epochs: relay and direct round trips with no FT, FT separately, FT in one group"
    ));
    let mut vms = Vec::new();
    for vm in GROUP_VMS {
        vms.push(lab.boot_vm(Side::A, (rate, 0, DIRTY_REGION_MIB), vm)?);
    }
    let vm1 = format!("{}:{SEQ_PORT}", GROUP_VMS[0].1);
    let mut g = GroupVms {
        relay: SeqClient::connect_to(&lab.hosts.client, &vm1)?,
        direct: SeqClient::connect_to(&lab.hosts.client, &vm1)?,
        vms,
    };
    let outcome = group_cases(lab, &mut g, opts, results);
    for node in &mut g.vms {
        node.vmm.kill();
    }
    outcome
}

fn group_cases(lab: &mut Lab, g: &mut GroupVms, opts: &Options, results: &mut Results) -> Res<()> {
    let sample = group_round_trips(lab, g, GroupCase::NoFt, &[], opts)?;
    results.group.push(sample);
    let mut cases = vec![GroupCase::Separate, GroupCase::Group];
    if opts.early_compare {
        cases.push(GroupCase::GroupLate);
    }
    for case in cases {
        check_interrupted()?;
        lab.early_staging = case != GroupCase::GroupLate;
        let grouped = matches!(case, GroupCase::Group | GroupCase::GroupLate);
        let sockets = grouped.then(|| GroupSockets {
            primaries: lab.dir.join("group-primaries.sock").display().to_string(),
            backups: lab.dir.join("group-backups.sock").display().to_string(),
        });
        let mut backups = Vec::new();
        let mut protected = Ok(());
        for (i, vm) in g.vms.iter().enumerate() {
            let heartbeat = Some(opts.heartbeat_timeout_ms);
            match lab.protect(vm, GROUP_EPOCH_MS, heartbeat, sockets.as_ref()) {
                Ok(backup) => backups.push(backup),
                Err(e) => {
                    protected = Err(format!("{}: protect VM {}: {e}", case.label(), i + 1));
                    break;
                }
            }
        }
        if protected.is_ok() && sockets.is_some() {
            protected = wait_group_members(&lab.bins, &g.vms, g.vms.len() as u64);
        }
        let sockets: Vec<PathBuf> = g.vms.iter().map(|n| n.socket.clone()).collect();
        let measured = protected.and_then(|()| group_round_trips(lab, g, case, &sockets, opts));
        let measured = measured.map_err(|e| {
            let mut text = e;
            for (vm, backup) in g.vms.iter().zip(&backups) {
                let _ = write!(
                    text,
                    "\n{}\n{}",
                    vm.diagnose(case.label()),
                    backup.diagnose(case.label())
                );
            }
            text
        });
        // The group's creator (VM 1) last: its protection ending ends the group's.
        let mut ended = Ok(());
        for (vm, backup) in g.vms.iter().zip(backups).rev() {
            let r = lab.unprotect(vm, backup);
            ended = ended.and(r);
        }
        lab.early_staging = true;
        results.group.push(measured?);
        ended?;
    }
    for (tap, ip, _) in GROUP_VMS {
        let mut client = SeqClient::connect_to(&lab.hosts.client, &format!("{ip}:{SEQ_PORT}"))?;
        guest_check(&mut client).map_err(|e| format!("guest self-check of {tap}'s VM: {e}"))?;
    }
    Ok(())
}

/// Waits until every primary in `vms` is protected in a group of `members`.
fn wait_group_members(bins: &Binaries, vms: &[Node], members: u64) -> Res<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    for vm in vms {
        loop {
            check_interrupted()?;
            let status = ft_status(bins, &vm.socket)?;
            if status.health == "protected" && status.group_members == Some(members) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the group never had {members} members protected: health {:?}, members {:?}, last error {:?}",
                    status.health, status.group_members, status.last_error
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// Relay round trips through VM 1 to VM 2, then direct ones to VM 1; each request after a
/// random think time in [0, epoch). `ft_sockets` (the primaries under FT) must still be
/// protected afterwards.
fn group_round_trips(
    lab: &Lab,
    g: &mut GroupVms,
    case: GroupCase,
    ft_sockets: &[PathBuf],
    opts: &Options,
) -> Res<GroupSample> {
    nap(opts.settle)?;
    let think = Duration::from_millis(GROUP_EPOCH_MS);
    // p99s of one run each: twice the cells' round trips, in three times their budget (separate
    // relays take about three epochs each). About 30 s in all with --quick, 60 s without.
    let (count, budget) = (opts.round_trips * 2, opts.latency_budget * 3);
    let peer = GROUP_VMS[1].1.to_string();
    let relay_ms = round_trips(&mut g.relay, count, think, budget, |c| c.relay(&peer))?;
    let direct_ms = round_trips(&mut g.direct, count, think, budget, SeqClient::req)?;
    let mut pause_ms: Option<(f64, f64)> = None;
    for socket in ft_sockets {
        let status = ft_status(&lab.bins, socket)?;
        let (p50, p99) = (
            status.pause_us_p50 as f64 / 1e3,
            status.pause_us_p99 as f64 / 1e3,
        );
        pause_ms = Some(pause_ms.map_or((p50, p99), |(a, b)| (a.max(p50), b.max(p99))));
        if status.health != "protected" {
            return Err(format!(
                "{} is no longer protected: health {:?}, last error {:?}",
                socket.display(),
                status.health,
                status.last_error
            ));
        }
    }
    let sample = GroupSample {
        case,
        relay_ms,
        direct_ms,
        pause_ms,
    };
    let p = |v: &[f64], q| percentile(v, q).unwrap_or(f64::NAN);
    log(&format!(
        "  {}: {} relays p50 {:.2} p99 {:.2} ms, {} direct p50 {:.2} p99 {:.2} ms",
        case.label(),
        sample.relay_ms.len(),
        p(&sample.relay_ms, 50.0),
        p(&sample.relay_ms, 99.0),
        sample.direct_ms.len(),
        p(&sample.direct_ms, 50.0),
        p(&sample.direct_ms, 99.0),
    ));
    Ok(sample)
}

// ---------------------------------------------------------------------------------------------
// Peer: QEMU COLO (diskless pair on this machine, over loopback)
// ---------------------------------------------------------------------------------------------

const QEMU: &str = "qemu-system-x86_64";
/// Cells measured under QEMU COLO too; the epoch is COLO's periodic checkpoint interval
/// (`x-checkpoint-delay`). COLO also checkpoints whenever the two copies' output differs.
const COLO_CELLS: [Cell; 2] = [(10, 0), (10, 1000)];
const COLO_FIRST_PORT: u16 = 9100;

/// A QMP connection: JSON lines over a Unix socket.
struct Qmp {
    reader: std::io::BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, vm: &mut Vmm) -> Res<Qmp> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let stream = loop {
            check_interrupted()?;
            if let Ok(s) = UnixStream::connect(path) {
                break s;
            }
            if let Some(status) = vm.poll_exit() {
                return Err(vm.diagnose(&format!("QEMU exited ({status}) before its QMP socket")));
            }
            if Instant::now() >= deadline {
                return Err(vm.diagnose("the QMP socket never appeared"));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stream
            .set_read_timeout(Some(STEP_TIMEOUT))
            .map_err(|e| format!("QMP socket: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("QMP socket: {e}"))?;
        let mut qmp = Qmp {
            reader: std::io::BufReader::new(stream),
            writer,
        };
        let greeting = qmp.line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("unexpected QMP greeting {greeting}"));
        }
        qmp.cmd("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn line(&mut self) -> Res<String> {
        use std::io::BufRead;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => Ok(line),
            Err(e) => Err(format!("QMP read: {e}")),
        }
    }

    /// Runs a command and returns its `return` value (events in between are skipped).
    fn cmd(&mut self, name: &str, args: Option<serde_json::Value>) -> Res<serde_json::Value> {
        let mut msg = serde_json::json!({ "execute": name });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP {name}: {e}"))?;
        loop {
            let line = self.line()?;
            let reply: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("QMP {name}: {e}: {line}"))?;
            if let Some(error) = reply.get("error") {
                return Err(format!("QMP {name}: {error}"));
            }
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
        }
    }
}

/// `Ok` when this QEMU has the objects a diskless COLO pair needs (the `x-colo` migration
/// capability is checked when the pair is set up), else why not.
fn colo_support() -> Res<String> {
    let out = Command::new(QEMU)
        .args(["-object", "help"])
        .output()
        .map_err(|e| format!("{QEMU} cannot be started: {e}"))?;
    let objects = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = [
        "colo-compare",
        "filter-mirror",
        "filter-redirector",
        "filter-rewriter",
        "iothread",
    ]
    .into_iter()
    .filter(|o| !objects.lines().any(|l| l.trim() == *o))
    .collect();
    if !missing.is_empty() {
        return Err(format!("{QEMU} lacks {}", missing.join(", ")));
    }
    let version = Command::new(QEMU)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown version".into());
    Ok(version)
}

/// A namespace holding QEMU's guest TAP (tapp, the client's side: 192.168.249.1) and the COLO
/// secondary's TAP (taps, connected to nothing: the secondary's traffic goes through the
/// primary's filters).
struct ColoLab {
    ns: NetNs,
    dir: TempDir,
    guest: PathBuf,
    sessions: u16,
}

impl ColoLab {
    fn new(guest: &Path) -> Res<ColoLab> {
        let ns = NetNs::new("bftcolo").map_err(|e| e.to_string())?;
        for args in [
            &["tuntap", "add", "tapp", "mode", "tap"][..],
            &["addr", "add", "192.168.249.1/24", "dev", "tapp"],
            &["link", "set", "tapp", "up"],
            &["tuntap", "add", "taps", "mode", "tap"],
            &["link", "set", "taps", "up"],
        ] {
            ns.ip(args).map_err(|e| e.to_string())?;
        }
        let dir = TempDir::new("bench_ft_colo").map_err(|e| e.to_string())?;
        Ok(ColoLab {
            ns,
            dir,
            guest: guest.to_path_buf(),
            sessions: 0,
        })
    }

    /// Starts QEMU microvm with the ft workload on `tap`; returns it and its QMP connection.
    fn qemu(&self, name: &str, tap: &str, rate: u64, extra: &[String]) -> Res<(Vmm, Qmp)> {
        let qmp_path = self.dir.join(&format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp_path);
        let guest = self.guest.to_str().ok_or("guest path is not UTF-8")?;
        let qmp_arg = format!(
            "unix:{},server=on,wait=off",
            qmp_path.to_str().ok_or("QMP path is not UTF-8")?
        );
        let cmdline = format!(
            "workload=ft net.ip={GUEST_IP}/24 ft.dirty_rate={rate} ft.dirty_mib={DIRTY_REGION_MIB}"
        );
        // -arch-capabilities: QEMU 7.2 aborts writing MSR 0x10a under this machine's KVM.
        // acpi=off: microvm then names the virtio-mmio devices on the command line (the guest
        // finds them there). vnet_hdr=off: colo-compare cannot parse frames with a vnet header
        // unless every filter is told about it.
        let netdev =
            format!("tap,id=hn0,ifname={tap},script=no,downscript=no,vhost=off,vnet_hdr=off");
        let device = format!("virtio-net-device,netdev=hn0,mac={GUEST_MAC}");
        let mut vm = Vmm::builder(name)
            .program(Path::new(QEMU))
            .wrapped_in(self.ns.exec_prefix())
            .args([
                "-M",
                "microvm,acpi=off",
                "-enable-kvm",
                "-cpu",
                "host,-arch-capabilities",
                "-m",
                GUEST_MEMORY,
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-global",
                "virtio-mmio.force-legacy=false",
                "-kernel",
                guest,
                "-append",
                &cmdline,
                "-qmp",
                &qmp_arg,
                "-netdev",
                &netdev,
                "-device",
                &device,
            ])
            .args(extra)
            .spawn()
            .map_err(|e| e.to_string())?;
        let qmp = Qmp::connect(&qmp_path, &mut vm)?;
        Ok((vm, qmp))
    }

    /// QEMU alone (no COLO): the baseline of the COLO figures.
    fn plain_case(&mut self, bins: &Binaries, rate: u64, opts: &Options) -> Res<CaseResult> {
        let (mut vm, _qmp) = self.qemu("qemu-plain", "tapp", rate, &[])?;
        vm.wait_for("ft: ready", STEP_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let mut client = SeqClient::connect(&self.ns)?;
        let setup = CaseSetup {
            bins,
            client_ns: &self.ns,
            ft_socket: None,
            floor: false,
            think_max: Duration::ZERO,
            tcp: false,
        };
        let result = measure_case(&setup, &mut client, opts)
            .map_err(|e| format!("{e}\n{}", vm.diagnose("QEMU case")));
        vm.kill();
        result
    }

    /// A COLO pair checkpointing every `epoch_ms` (and on every output mismatch).
    fn colo_case(
        &mut self,
        bins: &Binaries,
        rate: u64,
        epoch_ms: u64,
        opts: &Options,
    ) -> Res<CaseResult> {
        // Fresh ports per pair: nothing waits for the previous pair's sockets to go away.
        let base = COLO_FIRST_PORT + 10 * (self.sessions % 80);
        self.sessions += 1;
        let port = |n: u16| base + n;
        let primary_extra: Vec<String> = [
            format!("socket,id=mirror0,host=127.0.0.1,port={},server=on,wait=off", port(3)),
            format!("socket,id=compare1,host=127.0.0.1,port={},server=on,wait=off", port(4)),
            format!("socket,id=compare0,host=127.0.0.1,port={},server=on,wait=off", port(1)),
            format!("socket,id=compare0-0,host=127.0.0.1,port={}", port(1)),
            format!("socket,id=compare_out,host=127.0.0.1,port={},server=on,wait=off", port(5)),
            format!("socket,id=compare_out0,host=127.0.0.1,port={}", port(5)),
        ]
        .into_iter()
        .flat_map(|c| ["-chardev".to_string(), c])
        .chain(
            [
                "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
                "filter-redirector,netdev=hn0,id=redire0,queue=rx,indev=compare_out",
                "filter-redirector,netdev=hn0,id=redire1,queue=rx,outdev=compare0",
                "iothread,id=iothread1",
                "colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1,outdev=compare_out0,iothread=iothread1",
            ]
            .into_iter()
            .flat_map(|o| ["-object".to_string(), o.to_string()]),
        )
        .collect();
        let secondary_extra: Vec<String> = vec![
            "-chardev".into(),
            format!("socket,id=red0,host=127.0.0.1,port={},reconnect=1", port(3)),
            "-chardev".into(),
            format!("socket,id=red1,host=127.0.0.1,port={},reconnect=1", port(4)),
            "-object".into(),
            "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0".into(),
            "-object".into(),
            "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1".into(),
            "-object".into(),
            "filter-rewriter,id=rew0,netdev=hn0,queue=all".into(),
            "-incoming".into(),
            format!("tcp:127.0.0.1:{}", port(8)),
        ];
        // The primary first: its filter sockets listen before the secondary connects to them.
        let (mut primary, mut qmp_p) = self.qemu("colo-primary", "tapp", rate, &primary_extra)?;
        let (secondary, mut qmp_s) = self.qemu("colo-secondary", "taps", rate, &secondary_extra)?;
        let diagnose =
            |what: &str, p: &Vmm, s: &Vmm| format!("{}\n{}", p.diagnose(what), s.diagnose(what));
        primary
            .wait_for("ft: ready", STEP_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let colo =
            serde_json::json!({ "capabilities": [{ "capability": "x-colo", "state": true }] });
        qmp_s.cmd("migrate-set-capabilities", Some(colo.clone()))?;
        qmp_p.cmd("migrate-set-capabilities", Some(colo))?;
        qmp_p.cmd(
            "migrate-set-parameters",
            Some(
                serde_json::json!({ "x-checkpoint-delay": epoch_ms, "max-bandwidth": 1u64 << 40 }),
            ),
        )?;
        qmp_p.cmd(
            "migrate",
            Some(serde_json::json!({ "uri": format!("tcp:127.0.0.1:{}", port(8)) })),
        )?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            check_interrupted()?;
            let status = qmp_p.cmd("query-migrate", None)?;
            match status["status"].as_str() {
                Some("colo") => break,
                Some("failed") | Some("cancelled") | Some("completed") => {
                    return Err(format!(
                        "COLO did not start: query-migrate {status}\n{}",
                        diagnose("COLO start", &primary, &secondary)
                    ))
                }
                _ if Instant::now() >= deadline => {
                    return Err(format!(
                        "COLO did not start within {STEP_TIMEOUT:?}: query-migrate {status}"
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let mut client = SeqClient::connect(&self.ns)?;
        let setup = CaseSetup {
            bins,
            client_ns: &self.ns,
            ft_socket: None,
            floor: false,
            think_max: Duration::from_millis(epoch_ms),
            tcp: false,
        };
        let result = measure_case(&setup, &mut client, opts)
            .map_err(|e| format!("{e}\n{}", diagnose("COLO case", &primary, &secondary)))?;
        // Still a COLO pair at the end (no failover happened on the way)?
        let mode = qmp_p.cmd("query-colo-status", None)?;
        if mode["mode"] != "primary" {
            return Err(format!(
                "the COLO pair broke up during the case: query-colo-status {mode}\n{}",
                diagnose("COLO end", &primary, &secondary)
            ));
        }
        Ok(result)
    }
}

/// QEMU alone and QEMU COLO, alternating, for the cells in [`COLO_CELLS`] that this run
/// measures. Returns the peer line for the report.
fn run_colo(bins: &Binaries, opts: &Options, results: &mut Results) -> String {
    let cells: Vec<Cell> = COLO_CELLS
        .into_iter()
        .filter(|(e, p)| opts.epochs.contains(e) && opts.pages.contains(p))
        .collect();
    if cells.is_empty() {
        return "no QEMU COLO column: none of its cells (10 ms x 0 and 1000 pages) is in this run"
            .into();
    }
    let version = match colo_support() {
        Ok(v) => v,
        Err(why) => return format!("no QEMU COLO column: {why}"),
    };
    let mut lab = match ColoLab::new(&bins.guest) {
        Ok(lab) => lab,
        Err(e) => {
            results.fail(format!("COLO lab: {e}"));
            return format!("no QEMU COLO column: its namespace could not be set up ({e})");
        }
    };
    log(&format!("peer: {version}, COLO pair vs QEMU alone"));
    for run in 1..=opts.runs {
        for &cell in &cells {
            let rate = rate_of(cell);
            let mut order = [Mode::QemuPlain, Mode::Colo];
            if run % 2 == 0 {
                order.reverse();
            }
            for mode in order {
                if INTERRUPTED.load(Ordering::SeqCst) {
                    return "interrupted".into();
                }
                let label = match mode {
                    Mode::Colo => format!(
                        "run {run} {rate:>6} pages/s  QEMU COLO {} ms ({} pages/epoch)",
                        cell.0, cell.1
                    ),
                    _ => format!("run {run} {rate:>6} pages/s  QEMU alone"),
                };
                let outcome = match mode {
                    Mode::Colo => lab.colo_case(bins, rate, cell.0, opts),
                    _ => lab.plain_case(bins, rate, opts),
                };
                match outcome {
                    Ok(r) => {
                        log(&format!("  {label}: {}", describe_case(&r)));
                        results.record(cell, mode, &r);
                    }
                    Err(e) => results.fail(format!("{label}: {e}")),
                }
            }
        }
    }
    format!(
        "{version} COLO: a diskless pair on loopback in one namespace (colo-compare, filter-mirror/redirector/rewriter; no disk, so no quorum/replication drivers), x-checkpoint-delay = epoch; compared with QEMU alone on the same guest; cells {}",
        cells
            .iter()
            .map(|(e, p)| format!("{e} ms/{p} pages"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// Other processes using CPU now (a build or a test run beside the benchmark).
fn other_load() -> String {
    let Ok(out) = Command::new("ps")
        .args(["-eo", "pcpu=,comm=", "--sort=-pcpu"])
        .output()
    else {
        return String::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .take(8)
        .filter_map(|l| {
            let (pcpu, comm) = l.trim().split_once(' ')?;
            let pcpu: f64 = pcpu.parse().ok()?;
            let comm = comm.trim();
            (pcpu >= 20.0 && !["ps", "bench_ft", "cloud-hypervisor"].contains(&comm))
                .then(|| format!("{comm} {pcpu}%"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "MISSED"
    }
}

struct Report<'a> {
    opts: &'a Options,
    results: &'a Results,
    load_before: String,
    peer_note: String,
    elapsed: Duration,
}

impl Report<'_> {
    fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for &epoch in &self.opts.epochs {
            for &pages in &self.opts.pages {
                cells.push((epoch, pages));
            }
        }
        cells
    }

    fn print(&self) {
        let r = self.results;
        let o = self.opts;
        println!();
        println!(
            "FT benchmark: test guest workload=ft, 1 vCPU, {GUEST_MEMORY}iB, {DIRTY_REGION_MIB} MiB dirty region; primary and backup VMMs in two network namespaces on this machine; {} run(s) per case, median; {:.1} s work window, {} round trips per case; took {:.0} s",
            o.runs,
            o.window.as_secs_f64(),
            o.round_trips,
            self.elapsed.as_secs_f64()
        );
        for line in machine() {
            println!("  {line}");
        }
        println!(
            "  load average (1/5/15 min) before: {}, after: {}",
            self.load_before,
            loadavg()
        );
        let busy = other_load();
        if !busy.is_empty() {
            println!("  other busy processes at the end (numbers are noisy): {busy}");
        }
        println!("  peer: {}", self.peer_note);
        if o.cells {
            self.print_cells();
            self.print_peer();
        }
        if o.tls {
            self.print_tls();
        }
        if o.pipeline {
            self.print_pipeline();
        }
        if o.delta {
            self.print_delta();
        }
        if self.opts.hot_compare {
            self.print_hot();
        }
        if o.cells && self.opts.early_compare {
            self.print_early_staging();
            self.print_early_send();
        }
        if o.group {
            self.print_group();
        }
        self.print_failover();
        self.print_targets();
        if !r.notes.is_empty() {
            println!("\nnotes:");
            for n in &r.notes {
                println!("  {n}");
            }
        }
        if !r.failures.is_empty() {
            println!("\n{} failure(s):", r.failures.len());
            for f in &r.failures {
                println!("  {}", f.replace('\n', "\n    "));
            }
        }
    }

    fn print_cells(&self) {
        let r = self.results;
        let cells = self.cells();
        println!();
        println!("Epochs, pauses and replication traffic (FT cases). pages/ep = pages per epoch;");
        println!("  asked = the guest's dirty rate was set for this many; achieved = what it dirtied (by its own");
        println!("  stats) x the nominal epoch; VMM dirty = pages the VMM found dirty per real epoch (the");
        println!("  region plus the guest's stacks, rings, socket buffers); pause = guest stopped per epoch");
        println!("  (ft-status p50/p99/max of the case's session); send = the sender's time per epoch; commit =");
        println!("  output commit delay, checkpoint -> the backup's Ack released the epoch's held output (both");
        println!(
            "  ft-status p50/p99 of the case's session); B/dirty pg = bytes sent / VMM-dirty pages"
        );
        println!(
            "  (4096 = raw page; less = deltas/zero pages, no LZ4 by default; includes per-epoch state and framing)"
        );
        println!();
        let header = [
            "epoch ms",
            "asked pages/ep",
            "achieved FT",
            "achieved noFT",
            "VMM dirty/ep",
            "real epoch ms",
            "pause p50 ms",
            "pause p99 ms",
            "pause max ms",
            "send p50 ms",
            "commit p50 ms",
            "commit p99 ms",
            "B/dirty pg",
            "KiB/epoch",
            "cut early %",
            "runs",
        ];
        let rows: Vec<Vec<String>> = cells
            .iter()
            .map(|&c| {
                let m = |mode, metric, d| fmt(r.med(c, mode, metric), d);
                vec![
                    c.0.to_string(),
                    c.1.to_string(),
                    m(Mode::Ft, Metric::AchievedPagesPerEpoch, 0),
                    m(Mode::NoFt, Metric::AchievedPagesPerEpoch, 0),
                    m(Mode::Ft, Metric::VmmDirtyPerEpoch, 0),
                    m(Mode::Ft, Metric::RealEpochMs, 2),
                    m(Mode::Ft, Metric::PauseP50Ms, 3),
                    m(Mode::Ft, Metric::PauseP99Ms, 3),
                    m(Mode::Ft, Metric::PauseMaxMs, 3),
                    m(Mode::Ft, Metric::SendP50Ms, 3),
                    m(Mode::Ft, Metric::CommitP50Ms, 3),
                    m(Mode::Ft, Metric::CommitP99Ms, 3),
                    m(Mode::Ft, Metric::BytesPerDirtyPage, 0),
                    m(Mode::Ft, Metric::KibPerEpoch, 1),
                    m(Mode::Ft, Metric::CutEarlyPct, 1),
                    format!(
                        "{}/{}",
                        r.count(c, Mode::Ft, Metric::WorkPerS),
                        self.opts.runs
                    ),
                ]
            })
            .collect();
        print_table(&header, &rows);

        println!();
        println!("Runtime overhead: guest work (compute-loop iterations) per second of its own clock, same");
        println!("  guest and dirty rate with no FT, with the floor (no FT; the VMM harvests and re-arms the");
        println!("  dirty log every epoch, as a checkpoint does, without pausing, copying or sending: what dirty");
        println!("  tracking alone costs here) and with FT; overhead = 1 - FT/noFT, beyond floor = 1 - FT/floor;");
        println!("  `FT hot off`: FT with every dirty page write-protected at each checkpoint (--no-hot-pages);");
        println!("  `by run`: beyond floor within each run (FT and the floor of one run ran close together);");
        println!("  faults/ep: page faults KVM handled for the guest per epoch (ft-status kvm_page_faults): with dirty");
        println!("  logging on, nearly all are first writes to write-protected pages, what tracking costs the guest;");
        println!("  us/fault floor: guest time the floor costs per fault (epoch x (1 - floor/noFT) / faults)");
        println!();
        let header = [
            "epoch ms",
            "asked pages/ep",
            "work/s noFT (M)",
            "floor (M)",
            "FT (M)",
            "FT hot off (M)",
            "floor/noFT",
            "FT/noFT",
            "FT/floor",
            "FT/FT hot off",
            "overhead %",
            "beyond floor %",
            "by run",
            "floor dirty/ep",
            "faults/ep floor",
            "FT",
            "FT hot off",
            "us/fault floor",
            "runs noFT/floor/FT/hot off",
        ];
        let rows: Vec<Vec<String>> = cells
            .iter()
            .map(|&c| {
                let no = r.med(c, Mode::NoFt, Metric::WorkPerS);
                let floor = r.med(c, Mode::Floor, Metric::WorkPerS);
                let ft = r.med(c, Mode::Ft, Metric::WorkPerS);
                let cold = r.med(c, Mode::FtCold, Metric::WorkPerS);
                let ft_no = ratio(ft, no);
                let ft_floor = ratio(ft, floor);
                vec![
                    c.0.to_string(),
                    c.1.to_string(),
                    fmt(no.map(|v| v / 1e6), 1),
                    fmt(floor.map(|v| v / 1e6), 1),
                    fmt(ft.map(|v| v / 1e6), 1),
                    fmt(cold.map(|v| v / 1e6), 1),
                    fmt(ratio(floor, no), 3),
                    fmt(ft_no, 3),
                    fmt(ft_floor, 3),
                    fmt(ratio(ft, cold), 3),
                    fmt(ft_no.map(|x| (1.0 - x) * 100.0), 1),
                    fmt(ft_floor.map(|x| (1.0 - x) * 100.0), 1),
                    r.ratio_by_run(c, (Mode::Ft, Mode::Floor), Metric::WorkPerS)
                        .iter()
                        .map(|x| format!("{:.1}", (1.0 - x) * 100.0))
                        .collect::<Vec<_>>()
                        .join(" "),
                    fmt(r.med(c, Mode::Floor, Metric::VmmDirtyPerEpoch), 0),
                    fmt(r.med(c, Mode::Floor, Metric::FaultsPerEpoch), 0),
                    fmt(r.med(c, Mode::Ft, Metric::FaultsPerEpoch), 0),
                    fmt(r.med(c, Mode::FtCold, Metric::FaultsPerEpoch), 0),
                    fmt(
                        per_fault_us(
                            c.0 as f64 * 1e3,
                            ratio(floor, no).map(|x| 1.0 - x),
                            r.med(c, Mode::Floor, Metric::FaultsPerEpoch),
                        ),
                        1,
                    ),
                    format!(
                        "{}/{}/{}/{}",
                        r.count(c, Mode::NoFt, Metric::WorkPerS),
                        r.count(c, Mode::Floor, Metric::WorkPerS),
                        r.count(c, Mode::Ft, Metric::WorkPerS),
                        r.count(c, Mode::FtCold, Metric::WorkPerS)
                    ),
                ]
            })
            .collect();
        print_table(&header, &rows);

        println!();
        println!("Output latency: `req` round trips on one connection from the client namespace, ms; under FT");
        println!("  the reply is held until the backup has its epoch, and each request waits a random time in");
        println!("  [0, epoch) first (independent arrivals); added = FT - noFT; target: added p99 <= epoch + 2 ms;");
        println!("  `lat`: FT in latency mode (--latency-mode: an epoch ends early, after 1 ms or more, once output waits);");
        println!(
            "  n = round trips per case (median; at most {}, fewer when {:.0} s were not enough)",
            self.opts.round_trips,
            self.opts.latency_budget.as_secs_f64()
        );
        println!();
        let header = [
            "epoch ms",
            "asked pages/ep",
            "p50 noFT",
            "p50 FT",
            "p99 noFT",
            "p99 FT",
            "added p50",
            "added p99",
            "target",
            "p99 FT lat",
            "added p99 lat",
            "n noFT/FT",
        ];
        let rows: Vec<Vec<String>> = cells
            .iter()
            .map(|&c| {
                let get = |mode, metric| r.med(c, mode, metric);
                let added = |metric| match (get(Mode::Ft, metric), get(Mode::NoFt, metric)) {
                    (Some(f), Some(n)) => Some(f - n),
                    _ => None,
                };
                let added_p99 = added(Metric::RttP99Ms);
                let limit = c.0 as f64 + TARGET_ADDED_LATENCY_SLACK_MS;
                vec![
                    c.0.to_string(),
                    c.1.to_string(),
                    fmt(get(Mode::NoFt, Metric::RttP50Ms), 2),
                    fmt(get(Mode::Ft, Metric::RttP50Ms), 2),
                    fmt(get(Mode::NoFt, Metric::RttP99Ms), 2),
                    fmt(get(Mode::Ft, Metric::RttP99Ms), 2),
                    fmt(added(Metric::RttP50Ms), 2),
                    fmt(added_p99, 2),
                    match added_p99 {
                        Some(a) => {
                            format!("<= {limit:.0}: {}", if a <= limit { "met" } else { "MISS" })
                        }
                        None => "-".into(),
                    },
                    fmt(get(Mode::FtLatency, Metric::RttP99Ms), 2),
                    fmt(
                        get(Mode::FtLatency, Metric::RttP99Ms)
                            .zip(get(Mode::NoFt, Metric::RttP99Ms))
                            .map(|(f, n)| f - n),
                        2,
                    ),
                    format!(
                        "{}/{}",
                        fmt(get(Mode::NoFt, Metric::RoundTrips), 0),
                        fmt(get(Mode::Ft, Metric::RoundTrips), 0)
                    ),
                ]
            })
            .collect();
        print_table(&header, &rows);

        let tcp_rows: Vec<Vec<String>> = TCP_CELLS
            .iter()
            .filter(|c| self.opts.epochs.contains(&c.0) && self.opts.pages.contains(&c.1))
            .map(|&c| {
                let no = r.med(c, Mode::NoFt, Metric::TcpMbps);
                let floor = r.med(c, Mode::Floor, Metric::TcpMbps);
                let ft = r.med(c, Mode::Ft, Metric::TcpMbps);
                let held = r.med(c, Mode::FtHeldAcks, Metric::TcpMbps);
                let send_late = r.med(c, Mode::FtPauseSend, Metric::TcpMbps);
                let ratio = |x: Option<f64>, of: Option<f64>| match (of, x) {
                    (Some(n), Some(f)) if n > 0.0 => Some(f / n),
                    _ => None,
                };
                vec![
                    c.0.to_string(),
                    c.1.to_string(),
                    fmt(no, 1),
                    fmt(floor, 1),
                    fmt(ft, 1),
                    fmt(held, 1),
                    fmt(ratio(floor, no), 3),
                    fmt(ratio(ft, no), 3),
                    fmt(ratio(ft, floor), 3),
                    fmt(ratio(held, no), 3),
                    fmt(send_late, 1),
                    fmt(ratio(ft, send_late), 3),
                    fmt(r.med(c, Mode::Ft, Metric::TcpDirtyPerEpoch), 0),
                    fmt(r.med(c, Mode::Ft, Metric::TcpInputPagesPerEpoch), 0),
                    fmt(r.med(c, Mode::Ft, Metric::TcpHeldPagesPerEpoch), 0),
                    fmt(r.med(c, Mode::Ft, Metric::TcpReplBytesPerByte), 2),
                    fmt(r.med(c, Mode::Ft, Metric::TcpReplCpuMsPerMb), 2),
                    fmt(r.med(c, Mode::Ft, Metric::TcpReplPrimaryCpuMsPerMb), 2),
                    fmt(r.med(c, Mode::Ft, Metric::TcpInputMirrorP50Ms), 2),
                    fmt(r.med(c, Mode::Ft, Metric::TcpInputMirrorP99Ms), 2),
                    fmt(r.med(c, Mode::Floor, Metric::TcpFaultsPerEpoch), 0),
                    fmt(r.med(c, Mode::Ft, Metric::TcpFaultsPerEpoch), 0),
                    fmt(r.med(c, Mode::NoFt, Metric::TcpVcpuPct), 0),
                    fmt(r.med(c, Mode::Ft, Metric::TcpVcpuPct), 0),
                    fmt(r.med(c, Mode::NoFt, Metric::TcpVcpuWaitPct), 0),
                    fmt(r.med(c, Mode::Ft, Metric::TcpVcpuWaitPct), 0),
                    fmt(r.med(c, Mode::NoFt, Metric::TcpWindowBoundPct), 0),
                    fmt(r.med(c, Mode::Ft, Metric::TcpWindowBoundPct), 0),
                    fmt(r.med(c, Mode::Ft, Metric::TcpRetransmits), 0),
                ]
            })
            .collect();
        if !tcp_rows.is_empty() {
            println!();
            println!(
                "TCP throughput client -> guest sink (port 7001, {} MiB of pseudo-random bytes or {:.0} s per case, first byte -> `got N`), MB/s",
                self.opts.sink_mib,
                self.opts.sink_budget.as_secs_f64()
            );
            println!();
            println!(
                "  floor: no FT, the dirty log harvested and re-armed every epoch (what dirty tracking alone costs the transfer)"
            );
            println!(
                "  FT: early ACKs (input mirrored to the backup, pure ACKs leave once it holds it); FT held: --no-early-acks"
            );
            println!(
                "  FT send late: --no-early-send (every page sent after the pause; - when the early-sending section was skipped)"
            );
            println!(
                "  FT dirty/ep: VMM-dirty pages per epoch during the transfer (FT); as input: of them, sent as the mirrored input"
            );
            println!(
                "  frames laid over the backup's copy; held: of them, staged early but left to the pause by early sending (written"
            );
            println!(
                "  again before the last pause: sent early they would go twice); repl B/B: bytes FT sent per byte the guest received"
            );
            println!(
                "  repl CPU ms/MB: CPU time of the replication threads of both sides (ft-*) per MB the guest received;"
            );
            println!(
                "  of it primary: the primary's threads (the backup's would run on another host in production)"
            );
            println!(
                "  input wait p50/p99: how long an input frame waited from its delivery to the guest until the backup held it"
            );
            println!("  (ft-status input_mirror_us_*): an early ACK's added delay");
            println!(
                "  faults/ep: the guest's KVM page faults per epoch during the transfer (its 1 MiB receive ring is rewritten every"
            );
            println!(
                "  epoch: the floor write-protects it again each time, FT keeps it writable as hot pages)"
            );
            println!(
                "  vCPU %: the guest's vCPU threads on the CPU during the transfer, % of one core (its sink hashes every byte:"
            );
            println!(
                "  noFT it is the bottleneck); vCPU wait %: their time runnable but waiting for a core other threads held"
            );
            println!(
                "  (replication, devices, the backup and the client share this host's cores); window-bound %: the client's"
            );
            println!(
                "  time waiting for the guest's receive window, % of the time it had data to send (its TCP_INFO): high with a"
            );
            println!(
                "  vCPU below noFT's, the guest got less CPU or lost time in pauses; low, the client's congestion window or"
            );
            println!("  pacing held it back; retrans: segments it sent again");
            let ccs: Vec<&str> = r.client_ccs.iter().map(String::as_str).collect();
            println!(
                "  client congestion control: {} ({})",
                if ccs.is_empty() {
                    "unknown".to_string()
                } else {
                    ccs.join(", ")
                },
                if self.opts.client_cc.is_some() {
                    "--client-cc"
                } else {
                    "this host's default; --client-cc picks another"
                }
            );
            println!();
            print_table(
                &[
                    "epoch ms",
                    "asked pages/ep",
                    "noFT",
                    "floor",
                    "FT",
                    "FT held",
                    "floor/noFT",
                    "FT/noFT",
                    "FT/floor",
                    "FT held/noFT",
                    "FT send late",
                    "FT/send late",
                    "FT dirty/ep",
                    "as input",
                    "held",
                    "FT repl B/B",
                    "FT repl CPU ms/MB",
                    "of it primary",
                    "input wait p50 ms",
                    "input wait p99 ms",
                    "faults/ep floor",
                    "FT",
                    "vCPU % noFT",
                    "FT",
                    "vCPU wait % noFT",
                    "FT",
                    "window-bound % noFT",
                    "FT",
                    "retrans FT",
                ],
                &tcp_rows,
            );
        }
    }

    /// Bytes per dirty page with every word rewritten (the cells) and with `dirty_bytes` per
    /// rewrite (the delta section), at the delta section's epoch.
    fn print_delta(&self) {
        let r = self.results;
        let o = self.opts;
        let epoch = delta_epoch(o);
        println!();
        println!(
            "Delta encoding: FT at {epoch} ms epochs; the guest rewrites every word of a page (the cells above) or"
        );
        println!(
            "  changes {} bytes per rewrite (ft.dirty_bytes, its own boot); B/dirty pg = bytes sent / VMM-dirty",
            o.dirty_bytes
        );
        println!(
            "  pages (deltas against the backup's copy, no LZ4 by default; state and framing included)"
        );
        println!();
        let header = [
            "epoch ms",
            "asked pages/ep",
            "B/dirty pg every word",
            "B/dirty pg delta",
            "delta/every",
            "KiB/epoch delta",
            "VMM dirty/ep delta",
            "pause p50 ms",
            "pause p99 ms",
            "overhead % delta",
            "runs noFT/FT",
        ];
        let rows: Vec<Vec<String>> = o
            .pages
            .iter()
            .map(|&pages| {
                let c = (epoch, pages);
                let every = r.med(c, Mode::Ft, Metric::BytesPerDirtyPage);
                let delta = r.med(c, Mode::FtDelta, Metric::BytesPerDirtyPage);
                let ratio = match (delta, every) {
                    (Some(d), Some(e)) if e > 0.0 => Some(d / e),
                    _ => None,
                };
                let overhead = match (
                    r.med(c, Mode::NoFtDelta, Metric::WorkPerS),
                    r.med(c, Mode::FtDelta, Metric::WorkPerS),
                ) {
                    (Some(n), Some(f)) if n > 0.0 => Some((1.0 - f / n) * 100.0),
                    _ => None,
                };
                vec![
                    epoch.to_string(),
                    pages.to_string(),
                    fmt(every, 0),
                    fmt(delta, 0),
                    fmt(ratio, 3),
                    fmt(r.med(c, Mode::FtDelta, Metric::KibPerEpoch), 1),
                    fmt(r.med(c, Mode::FtDelta, Metric::VmmDirtyPerEpoch), 0),
                    fmt(r.med(c, Mode::FtDelta, Metric::PauseP50Ms), 3),
                    fmt(r.med(c, Mode::FtDelta, Metric::PauseP99Ms), 3),
                    fmt(overhead, 1),
                    format!(
                        "{}/{}",
                        r.count(c, Mode::NoFtDelta, Metric::WorkPerS),
                        r.count(c, Mode::FtDelta, Metric::WorkPerS)
                    ),
                ]
            })
            .collect();
        print_table(&header, &rows);
    }

    /// The hot-page section: a small region every page of which is rewritten every epoch.
    fn print_early_staging(&self) {
        let r = self.results;
        println!();
        println!(
            "Early staging: FT (most of an epoch's pages copied into staging while the guest runs,"
        );
        println!("  three quarters into the epoch) and `late`: FT copying every page in the pause");
        println!("  (--no-early-staging), per cell in the same run; pause = guest stopped per epoch; work =");
        println!("  guest work/s; beyond floor = 1 - FT/floor; ratios late/FT for pauses, FT/late for work");
        println!();
        let header = [
            "epoch ms",
            "asked pages/ep",
            "pause p50 FT",
            "pause p50 late",
            "p50 late/FT",
            "pause p99 FT",
            "pause p99 late",
            "p99 late/FT",
            "work FT (M)",
            "work late (M)",
            "work FT/late",
            "beyond floor % FT",
            "beyond floor % late",
            "runs FT/late",
        ];
        let rows: Vec<Vec<String>> = self
            .cells()
            .iter()
            .map(|&c| {
                let m = |mode, metric| r.med(c, mode, metric);
                let (ft, late) = (Mode::Ft, Mode::FtLateStaging);
                let floor = m(Mode::Floor, Metric::WorkPerS);
                let beyond =
                    |mode| ratio(m(mode, Metric::WorkPerS), floor).map(|x| (1.0 - x) * 100.0);
                let mut row = vec![c.0.to_string(), c.1.to_string()];
                for metric in [Metric::PauseP50Ms, Metric::PauseP99Ms] {
                    row.extend(times_against(m(ft, metric), m(late, metric)));
                }
                row.extend([
                    fmt(m(ft, Metric::WorkPerS).map(|v| v / 1e6), 1),
                    fmt(m(late, Metric::WorkPerS).map(|v| v / 1e6), 1),
                    fmt(ratio(m(ft, Metric::WorkPerS), m(late, Metric::WorkPerS)), 3),
                    fmt(beyond(ft), 1),
                    fmt(beyond(late), 1),
                    format!(
                        "{}/{}",
                        r.count(c, ft, Metric::WorkPerS),
                        r.count(c, late, Metric::WorkPerS)
                    ),
                ]);
                row
            })
            .collect();
        print_table(&header, &rows);
    }

    /// Early sending: the early-staged pages leave while the guest runs, or in the pause.
    fn print_early_send(&self) {
        let r = self.results;
        println!();
        println!("Early sending: FT (the early-staged pages sent at once, while the guest runs) and `pause`:");
        println!("  FT staging early but sending every page in the pause (--no-early-send), per cell in the");
        println!("  same run; commit = capture to the backup's Ack (how long the epoch's last output waits);");
        println!("  added = request p99 FT - noFT; ratios pause/FT for times, FT/pause for work and bytes");
        println!();
        let header = [
            "epoch ms",
            "asked pages/ep",
            "commit p50 FT",
            "commit p50 pause",
            "p50 pause/FT",
            "commit p99 FT",
            "commit p99 pause",
            "p99 pause/FT",
            "added p99 FT",
            "added p99 pause",
            "pause p50 FT/pause",
            "work FT/pause",
            "B/page FT/pause",
            "runs FT/pause",
        ];
        let rows: Vec<Vec<String>> = self
            .cells()
            .iter()
            .map(|&c| {
                let m = |mode, metric| r.med(c, mode, metric);
                let (ft, pause) = (Mode::Ft, Mode::FtPauseSend);
                let added = |mode| {
                    m(mode, Metric::RttP99Ms)
                        .zip(m(Mode::NoFt, Metric::RttP99Ms))
                        .map(|(a, b)| a - b)
                };
                let pair = |metric, places| {
                    format!(
                        "{} / {}",
                        fmt(m(ft, metric), places),
                        fmt(m(pause, metric), places)
                    )
                };
                let mut row = vec![c.0.to_string(), c.1.to_string()];
                for metric in [Metric::CommitP50Ms, Metric::CommitP99Ms] {
                    row.extend(times_against(m(ft, metric), m(pause, metric)));
                }
                row.extend([
                    fmt(added(ft), 2),
                    fmt(added(pause), 2),
                    pair(Metric::PauseP50Ms, 3),
                    fmt(
                        ratio(m(ft, Metric::WorkPerS), m(pause, Metric::WorkPerS)),
                        3,
                    ),
                    fmt(
                        ratio(
                            m(ft, Metric::BytesPerDirtyPage),
                            m(pause, Metric::BytesPerDirtyPage),
                        ),
                        2,
                    ),
                    format!(
                        "{}/{}",
                        r.count(c, ft, Metric::WorkPerS),
                        r.count(c, pause, Metric::WorkPerS)
                    ),
                ]);
                row
            })
            .collect();
        print_table(&header, &rows);
    }

    fn print_hot(&self) {
        let r = self.results;
        let o = self.opts;
        let epoch = delta_epoch(o);
        println!();
        println!(
            "Hot pages: FT at {epoch} ms epochs; the guest rewrites every word of the pages of a {HOT_REGION_MIB} MiB region"
        );
        println!("  (its own boot), so each page is rewritten every epoch or more often. Hot pages kept writable");
        println!("  and compared at each pause (FT) against every dirty page write-protected at each checkpoint");
        println!("  (FT hot off, --no-hot-pages); the floor harvests and re-arms the dirty log every epoch, no FT;");
        println!("  faults/ep: the guest's KVM page faults per epoch; us/fault floor: the guest time the floor costs");
        println!("  per fault (epoch x (1 - floor/noFT) / faults), what one write fault costs on this host;");
        println!("  us saved/fault: the guest time hot pages give back per fault they save (epoch x (FT - FT hot");
        println!("  off)/noFT / (faults hot off - faults FT)), compares in the pause included");
        println!();
        let header = [
            "epoch ms",
            "asked pages/ep",
            "work/s noFT (M)",
            "floor (M)",
            "FT (M)",
            "FT hot off (M)",
            "floor/noFT",
            "FT/noFT",
            "FT hot off/noFT",
            "FT/FT hot off",
            "pause p50 ms FT/hot off",
            "pause p99 ms FT/hot off",
            "faults/ep floor",
            "FT",
            "FT hot off",
            "us/fault floor",
            "us saved/fault",
            "runs",
        ];
        let rows: Vec<Vec<String>> = o
            .pages
            .iter()
            .filter(|&&p| p > 0)
            .map(|&pages| {
                let c = (epoch, pages);
                let work = |mode| r.med(c, mode, Metric::WorkPerS);
                let (no, floor, ft, cold) = (
                    work(Mode::NoFtHot),
                    work(Mode::FloorHot),
                    work(Mode::FtHot),
                    work(Mode::FtHotCold),
                );
                let pause = |metric| {
                    format!(
                        "{} / {}",
                        fmt(r.med(c, Mode::FtHot, metric), 3),
                        fmt(r.med(c, Mode::FtHotCold, metric), 3)
                    )
                };
                let faults = |mode| r.med(c, mode, Metric::FaultsPerEpoch);
                let epoch_us = epoch as f64 * 1e3;
                let floor_cost = per_fault_us(
                    epoch_us,
                    ratio(floor, no).map(|x| 1.0 - x),
                    faults(Mode::FloorHot),
                );
                let saved = match (ft, cold, no, faults(Mode::FtHotCold), faults(Mode::FtHot)) {
                    (Some(ft), Some(cold), Some(no), Some(f_cold), Some(f_ft)) if no > 0.0 => {
                        per_fault_us(epoch_us, Some((ft - cold) / no), Some(f_cold - f_ft))
                    }
                    _ => None,
                };
                vec![
                    epoch.to_string(),
                    pages.to_string(),
                    fmt(no.map(|v| v / 1e6), 1),
                    fmt(floor.map(|v| v / 1e6), 1),
                    fmt(ft.map(|v| v / 1e6), 1),
                    fmt(cold.map(|v| v / 1e6), 1),
                    fmt(ratio(floor, no), 3),
                    fmt(ratio(ft, no), 3),
                    fmt(ratio(cold, no), 3),
                    fmt(ratio(ft, cold), 3),
                    pause(Metric::PauseP50Ms),
                    pause(Metric::PauseP99Ms),
                    fmt(faults(Mode::FloorHot), 0),
                    fmt(faults(Mode::FtHot), 0),
                    fmt(faults(Mode::FtHotCold), 0),
                    fmt(floor_cost, 1),
                    fmt(saved, 1),
                    format!(
                        "{}/{}/{}/{}",
                        r.count(c, Mode::NoFtHot, Metric::WorkPerS),
                        r.count(c, Mode::FloorHot, Metric::WorkPerS),
                        r.count(c, Mode::FtHot, Metric::WorkPerS),
                        r.count(c, Mode::FtHotCold, Metric::WorkPerS)
                    ),
                ]
            })
            .collect();
        print_table(&header, &rows);
    }

    fn print_peer(&self) {
        let r = self.results;
        let cells: Vec<Cell> = COLO_CELLS
            .into_iter()
            .filter(|&c| {
                r.count(c, Mode::Colo, Metric::WorkPerS)
                    + r.count(c, Mode::QemuPlain, Metric::WorkPerS)
                    > 0
            })
            .collect();
        if cells.is_empty() {
            return;
        }
        println!();
        println!(
            "Peer: QEMU COLO on the same guest and client, each against its own VMM without FT"
        );
        println!("  (COLO: QEMU alone; ours: our VMM without FT). COLO checkpoints every epoch and whenever");
        println!(
            "  the primary's and the secondary's output differ; its secondary runs the guest too"
        );
        println!(
            "  (a second busy vCPU on this 2-core machine). Round trips as in the latency table."
        );
        println!();
        let header = [
            "epoch ms",
            "asked pages/ep",
            "achieved COLO",
            "work/s QEMU (M)",
            "work/s COLO (M)",
            "overhead COLO %",
            "overhead ours %",
            "p50 QEMU",
            "p50 COLO",
            "p99 QEMU",
            "p99 COLO",
            "added p99 COLO",
            "added p99 ours",
            "runs QEMU/COLO",
        ];
        let overhead = |c: Cell, base: Mode, ft: Mode| match (
            r.med(c, base, Metric::WorkPerS),
            r.med(c, ft, Metric::WorkPerS),
        ) {
            (Some(b), Some(f)) if b > 0.0 => Some((1.0 - f / b) * 100.0),
            _ => None,
        };
        let added = |c: Cell, base: Mode, ft: Mode| match (
            r.med(c, base, Metric::RttP99Ms),
            r.med(c, ft, Metric::RttP99Ms),
        ) {
            (Some(b), Some(f)) => Some(f - b),
            _ => None,
        };
        let rows: Vec<Vec<String>> = cells
            .iter()
            .map(|&c| {
                let m = |mode, metric, d| fmt(r.med(c, mode, metric), d);
                vec![
                    c.0.to_string(),
                    c.1.to_string(),
                    m(Mode::Colo, Metric::AchievedPagesPerEpoch, 0),
                    fmt(
                        r.med(c, Mode::QemuPlain, Metric::WorkPerS).map(|v| v / 1e6),
                        1,
                    ),
                    fmt(r.med(c, Mode::Colo, Metric::WorkPerS).map(|v| v / 1e6), 1),
                    fmt(overhead(c, Mode::QemuPlain, Mode::Colo), 1),
                    fmt(overhead(c, Mode::NoFt, Mode::Ft), 1),
                    m(Mode::QemuPlain, Metric::RttP50Ms, 2),
                    m(Mode::Colo, Metric::RttP50Ms, 2),
                    m(Mode::QemuPlain, Metric::RttP99Ms, 2),
                    m(Mode::Colo, Metric::RttP99Ms, 2),
                    fmt(added(c, Mode::QemuPlain, Mode::Colo), 2),
                    fmt(added(c, Mode::NoFt, Mode::Ft), 2),
                    format!(
                        "{}/{}",
                        r.count(c, Mode::QemuPlain, Metric::WorkPerS),
                        r.count(c, Mode::Colo, Metric::WorkPerS)
                    ),
                ]
            })
            .collect();
        print_table(&header, &rows);
    }

    fn print_tls(&self) {
        let runs = self.opts.runs;
        println!();
        println!(
            "TLS: FT replication over plaintext TCP (--insecure-plaintext) vs mutual TLS (--tls-dir: rustls, ring provider) at {TLS_EPOCH_MS} ms epochs; per rate one VM, the two alternating on fresh sessions (odd runs plaintext first); median of {runs} run(s)"
        );
        let aes = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("flags"))
                    .map(|l| l.split_whitespace().any(|f| f == "aes"))
            })
            .map_or("unknown", |yes| if yes { "yes" } else { "no" });
        println!(
            "  machine: {}; AES-NI: {aes}; primary and backup share its cores",
            machine().join(", ")
        );
        println!("  sender MB/s = ft-status bytes sent during the work window / its wall time (epochs x real epoch);");
        println!("  pause = ft-status p50/p99 of the case's session; work = the guest's compute loop, M/s of its");
        println!("  own clock; req = `req` round trips, ms; TCP = bulk send client -> guest sink (MB/s; only");
        println!("  the cells that measure it); ratio = TLS/plaintext (the cost: < 1 for MB/s and work, > 1");
        println!("  for pauses and round trips)");
        println!();
        self.print_compare(
            (TLS_EPOCH_MS, &TLS_PAGES[..]),
            &[Mode::FtPlaintext, Mode::FtTls],
            &["plaintext", "TLS"],
        );
        println!();
        self.print_tls_target();
    }

    /// The table of a compare section: per cell each measure for every mode, and each mode's
    /// ratio to the first.
    fn print_compare(&self, (epoch_ms, pages): (u64, &[u64]), modes: &[Mode], names: &[&str]) {
        let r = self.results;
        type Row = (&'static str, Metric, f64, usize);
        let measures: [Row; 8] = [
            ("achieved pages/ep", Metric::AchievedPagesPerEpoch, 1.0, 0),
            ("sender MB/s", Metric::SenderMbps, 1.0, 1),
            ("pause p50 ms", Metric::PauseP50Ms, 1.0, 3),
            ("pause p99 ms", Metric::PauseP99Ms, 1.0, 3),
            ("work M/s", Metric::WorkPerS, 1e-6, 1),
            ("req p50 ms", Metric::RttP50Ms, 1.0, 2),
            ("req p99 ms", Metric::RttP99Ms, 1.0, 2),
            ("TCP MB/s", Metric::TcpMbps, 1.0, 1),
        ];
        let mut rows = Vec::new();
        for &pages in pages {
            let cell = (epoch_ms, pages);
            let mut first = true;
            for (name, metric, scale, decimals) in measures {
                let values: Vec<Option<f64>> = modes
                    .iter()
                    .map(|&m| r.med(cell, m, metric).map(|v| v * scale))
                    .collect();
                let counts: Vec<String> = modes
                    .iter()
                    .map(|&m| r.count(cell, m, metric).to_string())
                    .collect();
                if metric == Metric::TcpMbps && values.iter().all(Option::is_none) {
                    continue;
                }
                let mut row = vec![
                    if first {
                        format!("{pages} pages/{epoch_ms} ms")
                    } else {
                        String::new()
                    },
                    name.to_string(),
                ];
                row.extend(values.iter().map(|&v| fmt(v, decimals)));
                for &v in &values[1..] {
                    let ratio = match (values[0], v) {
                        (Some(base), Some(v)) if base > 0.0 => Some(v / base),
                        _ => None,
                    };
                    row.push(fmt(ratio, 3));
                }
                row.push(counts.join("/"));
                rows.push(row);
                first = false;
            }
        }
        let mut header = vec!["cell".to_string(), "measure".to_string()];
        header.extend(names.iter().map(|n| n.to_string()));
        header.extend(names[1..].iter().map(|n| format!("{n}/{}", names[0])));
        header.push(format!("runs {}", names.join("/")));
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        print_table(&header, &rows);
    }

    fn print_pipeline(&self) {
        println!();
        println!(
            "Pipeline: FT with each epoch's pages encoded (staging read, delta, checksum) by the sender thread alone (--encode-threads 0), by 1 or 2 encoder threads while it writes, on 2 data streams beside the first connection, each encoded and written by its own thread (--streams 3), and with the sender alone and each pause staged on the control loop without its helper thread (--no-stage-helper), at {PIPELINE_EPOCH_MS} ms epochs over mutual TLS; per rate one VM, the cases taking turns on fresh sessions (the order rotating per run); median of {} run(s)",
            self.opts.runs
        );
        println!(
            "  machine: {}; primary, backup and the guest's vCPU share its cores; measures as in the TLS section; ratio = case / sender alone",
            machine().join(", ")
        );
        println!();
        self.print_compare(
            (PIPELINE_EPOCH_MS, &PIPELINE_PAGES[..]),
            &PIPELINE_MODES,
            &[
                "sender alone",
                "1 thread",
                "2 threads",
                "3 streams",
                "no stage helper",
            ],
        );
    }

    /// The added-p99-latency target for FT in `mode`, over the cells.
    fn print_latency_target(&self, mode: Mode, label: &str) {
        let r = self.results;
        let mut met = 0;
        let mut measured = 0;
        let mut misses = Vec::new();
        let mut worst_margin = f64::INFINITY;
        for c in self.cells() {
            let (Some(f), Some(n)) = (
                r.med(c, mode, Metric::RttP99Ms),
                r.med(c, Mode::NoFt, Metric::RttP99Ms),
            ) else {
                continue;
            };
            measured += 1;
            let limit = c.0 as f64 + TARGET_ADDED_LATENCY_SLACK_MS;
            let added = f - n;
            worst_margin = worst_margin.min(limit - added);
            if added <= limit {
                met += 1;
            } else {
                misses.push(format!(
                    "{} ms/{} pages: +{added:.1} ms, over by {:.1} ms",
                    c.0,
                    c.1,
                    added - limit
                ));
            }
        }
        let what =
            format!("added p99 latency <= epoch + {TARGET_ADDED_LATENCY_SLACK_MS} ms{label}");
        if measured == 0 {
            println!("  {what}: not measured");
        } else if misses.is_empty() {
            println!(
                "  {what}: MET in all {measured} cells (smallest margin {worst_margin:.1} ms)"
            );
        } else {
            println!(
                "  {what}: MISSED in {} of {measured} cells ({met} met): {}",
                misses.len(),
                misses.join("; ")
            );
        }
    }

    /// The TLS target line: sender throughput with TLS within [`TARGET_TLS_COST_PCT`] of
    /// plaintext at every TLS cell.
    fn print_tls_target(&self) {
        let r = self.results;
        let mut parts = Vec::new();
        let mut all_met = true;
        let mut measured = 0;
        for pages in TLS_PAGES {
            let cell = (TLS_EPOCH_MS, pages);
            match (
                r.med(cell, Mode::FtPlaintext, Metric::SenderMbps),
                r.med(cell, Mode::FtTls, Metric::SenderMbps),
            ) {
                (Some(p), Some(t)) if p > 0.0 => {
                    measured += 1;
                    let cost = (1.0 - t / p) * 100.0;
                    let met = cost <= TARGET_TLS_COST_PCT;
                    all_met &= met;
                    parts.push(format!(
                        "{pages} pages/epoch: {p:.1} -> {t:.1} MB/s, cost {cost:.1} % {}",
                        if met { "met" } else { "MISSED" }
                    ));
                }
                _ => parts.push(format!("{pages} pages/epoch: not measured")),
            }
        }
        if measured == 0 {
            println!(
                "  TLS costs <= {TARGET_TLS_COST_PCT} % of FT sender throughput ({TLS_EPOCH_MS} ms epochs): not measured"
            );
        } else {
            println!(
                "  TLS costs <= {TARGET_TLS_COST_PCT} % of FT sender throughput ({TLS_EPOCH_MS} ms epochs): {} ({})",
                if all_met && measured == TLS_PAGES.len() {
                    "MET"
                } else if all_met {
                    "MET where measured"
                } else {
                    "MISSED"
                },
                parts.join("; ")
            );
        }
    }

    fn failover_figures(&self) -> Option<(f64, f64)> {
        let icmp: Vec<f64> = self.results.failovers.iter().map(|f| f.icmp_ms).collect();
        Some((
            median(&icmp)?,
            icmp.iter().copied().fold(f64::MIN, f64::max),
        ))
    }

    fn print_group(&self) {
        let samples = &self.results.group;
        println!();
        println!(
            "FT groups: two VMs on host A, {GROUP_PAGES} pages per {GROUP_EPOCH_MS} ms epoch each; relay = client -> VM 1 -> VM 2 -> VM 1 -> client, direct = client -> VM 1; ms, each request after a random think time in [0, {GROUP_EPOCH_MS} ms)"
        );
        println!("  separately protected VMs hold every frame (a relay waits for about 3 epoch commits); a group holds only what leaves it (about 1)");
        println!("  pause: ft-status p50/p99 of the member that stood still longest (a group's members pause together);");
        println!(
            "  late staging: the group with --no-early-staging (every page copied in the pause)"
        );
        println!();
        let p = |v: &[f64], q| percentile(v, q);
        let mut rows: Vec<Vec<String>> = samples
            .iter()
            .map(|g| {
                vec![
                    g.case.label().to_string(),
                    fmt(p(&g.relay_ms, 50.0), 2),
                    fmt(p(&g.relay_ms, 99.0), 2),
                    fmt(p(&g.direct_ms, 50.0), 2),
                    fmt(p(&g.direct_ms, 99.0), 2),
                    fmt(g.pause_ms.map(|p| p.0), 3),
                    fmt(g.pause_ms.map(|p| p.1), 3),
                    format!("{}/{}", g.relay_ms.len(), g.direct_ms.len()),
                ]
            })
            .collect();
        let find = |case| samples.iter().find(|g| g.case == case);
        if let (Some(sep), Some(grp)) = (find(GroupCase::Separate), find(GroupCase::Group)) {
            let ratio = |a: &[f64], b: &[f64], q| match (p(a, q), p(b, q)) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            rows.push(vec![
                "separately / group".into(),
                ratio(&sep.relay_ms, &grp.relay_ms, 50.0),
                ratio(&sep.relay_ms, &grp.relay_ms, 99.0),
                ratio(&sep.direct_ms, &grp.direct_ms, 50.0),
                ratio(&sep.direct_ms, &grp.direct_ms, 99.0),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        if let (Some(late), Some(grp)) = (
            find(GroupCase::GroupLate).and_then(|g| g.pause_ms),
            find(GroupCase::Group).and_then(|g| g.pause_ms),
        ) {
            let ratio = |a: f64, b: f64| {
                if b > 0.0 {
                    format!("{:.2}x", a / b)
                } else {
                    "-".into()
                }
            };
            rows.push(vec![
                "group: late / early staging".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                ratio(late.0, grp.0),
                ratio(late.1, grp.1),
                String::new(),
            ]);
        }
        if rows.is_empty() {
            println!("  not measured");
            return;
        }
        print_table(
            &[
                "case",
                "relay p50",
                "relay p99",
                "direct p50",
                "direct p99",
                "pause p50",
                "pause p99",
                "round trips",
            ],
            &rows,
        );
    }

    fn print_failover(&self) {
        let f = &self.results.failovers;
        if self.opts.failovers == 0 {
            return;
        }
        println!();
        println!(
            "Failover: SIGKILL of the primary ({FAILOVER_EPOCH_MS} ms epochs, {FAILOVER_PAGES} pages/epoch, request load + 1 ms pings), ms, {}/{} kills, alternating: held output sent again by the backup (the default) and --no-resend-output",
            f.len(),
            2 * self.opts.failovers
        );
        println!("  first ICMP answer = SIGKILL sent -> echo reply to the first ping sent 5 ms or more after it");
        println!("  (only the backup can answer it; the target is judged on this); first TCP answer = the same");
        println!(
            "  for `req` on the client's connection (includes the client's TCP retransmission"
        );
        println!(
            "  timeout, >= 200 ms on Linux, when the request in flight was lost); backup: its own"
        );
        println!("  last_failover_ms, from noticing the primary gone to the VM running; reaped = until the");
        println!("  killed process was gone (its replication connection closes only then)");
        println!();
        let stat = |values: Vec<f64>| -> (String, String) {
            let max = values.iter().copied().fold(f64::NAN, f64::max);
            (fmt(median(&values), 1), fmt(Some(max), 1))
        };
        let tcp = |resend: bool| -> Vec<f64> {
            f.iter()
                .filter(|s| s.resend == resend)
                .map(|s| s.tcp_ms)
                .collect()
        };
        let rows = [
            ("first ICMP answer", f.iter().map(|s| s.icmp_ms).collect()),
            ("first TCP answer", tcp(true)),
            ("first TCP answer, --no-resend-output", tcp(false)),
            (
                "backup: primary lost -> VM running",
                f.iter()
                    .filter_map(|s| s.backup_own_ms)
                    .collect::<Vec<f64>>(),
            ),
            (
                "SIGKILL -> primary reaped",
                f.iter().map(|s| s.reaped_ms).collect::<Vec<f64>>(),
            ),
        ];
        let rows: Vec<Vec<String>> = rows
            .into_iter()
            .map(|(name, values)| {
                let (med, max) = stat(values);
                vec![name.to_string(), med, max]
            })
            .collect();
        print_table(&["measure", "median", "max"], &rows);
    }

    fn print_targets(&self) {
        let r = self.results;
        println!();
        println!("Targets (a miss is reported, not an error):");
        if self.opts.cells {
            for &epoch in &self.opts.epochs {
                let cell = (epoch, TARGET_PAUSE_PAGES);
                if !self.opts.pages.contains(&TARGET_PAUSE_PAGES) {
                    break;
                }
                match (
                    r.med(cell, Mode::Ft, Metric::PauseP50Ms),
                    r.med(cell, Mode::Ft, Metric::PauseP99Ms),
                ) {
                    (Some(p50), Some(p99)) => println!(
                        "  pause p50 <= {TARGET_PAUSE_MS} ms and p99 <= {TARGET_PAUSE_P99_MS} ms at {TARGET_PAUSE_PAGES} pages/epoch, {epoch} ms epochs (achieved {} pages/epoch): median {p50:.3} ms {} by {:.3} ms; p99 {p99:.3} ms {} by {:.3} ms",
                        fmt(r.med(cell, Mode::Ft, Metric::AchievedPagesPerEpoch), 0),
                        verdict(p50 <= TARGET_PAUSE_MS),
                        (TARGET_PAUSE_MS - p50).abs(),
                        verdict(p99 <= TARGET_PAUSE_P99_MS),
                        (TARGET_PAUSE_P99_MS - p99).abs(),
                    ),
                    _ => println!(
                        "  pause <= {TARGET_PAUSE_MS} ms at {TARGET_PAUSE_PAGES} pages/epoch, {epoch} ms epochs: not measured"
                    ),
                }
            }
            let cell = TARGET_OVERHEAD_CELL;
            match (
                r.med(cell, Mode::NoFt, Metric::WorkPerS),
                r.med(cell, Mode::Ft, Metric::WorkPerS),
            ) {
                (Some(no), Some(ft)) if no > 0.0 => {
                    let overhead = (1.0 - ft / no) * 100.0;
                    println!(
                        "  overhead <= {TARGET_OVERHEAD_PCT} % at {} ms epochs, {} pages/epoch (achieved {}): {overhead:.1} % {} by {:.1} points",
                        cell.0,
                        cell.1,
                        fmt(r.med(cell, Mode::Ft, Metric::AchievedPagesPerEpoch), 0),
                        verdict(overhead <= TARGET_OVERHEAD_PCT),
                        (TARGET_OVERHEAD_PCT - overhead).abs()
                    );
                }
                _ => println!(
                    "  overhead <= {TARGET_OVERHEAD_PCT} % at {} ms epochs, {} pages/epoch: not measured",
                    cell.0, cell.1
                ),
            }
            match (
                r.med(cell, Mode::Floor, Metric::WorkPerS),
                r.med(cell, Mode::Ft, Metric::WorkPerS),
            ) {
                (Some(floor), Some(ft)) if floor > 0.0 => {
                    let beyond = (1.0 - ft / floor) * 100.0;
                    println!(
                        "  overhead beyond the dirty-tracking floor <= {TARGET_BEYOND_FLOOR_PCT} % at {} ms epochs, {} pages/epoch: {beyond:.1} % {} by {:.1} points",
                        cell.0,
                        cell.1,
                        verdict(beyond <= TARGET_BEYOND_FLOOR_PCT),
                        (TARGET_BEYOND_FLOOR_PCT - beyond).abs()
                    );
                }
                _ => println!(
                    "  overhead beyond the dirty-tracking floor <= {TARGET_BEYOND_FLOOR_PCT} % at {} ms epochs, {} pages/epoch: not measured",
                    cell.0, cell.1
                ),
            }
            if self.opts.delta && self.opts.pages.contains(&TARGET_DELTA_PAGES) {
                let cell = (delta_epoch(self.opts), TARGET_DELTA_PAGES);
                let bytes = self.opts.dirty_bytes;
                match r.med(cell, Mode::FtDelta, Metric::BytesPerDirtyPage) {
                    Some(b) => println!(
                        "  bytes per dirty page <= {TARGET_DELTA_BYTES} with {bytes} bytes changed per rewrite at {} ms, {} pages/epoch: {b:.0} {} by {:.0}",
                        cell.0,
                        cell.1,
                        verdict(b <= TARGET_DELTA_BYTES),
                        (TARGET_DELTA_BYTES - b).abs()
                    ),
                    None => println!(
                        "  bytes per dirty page <= {TARGET_DELTA_BYTES} with {bytes} bytes changed per rewrite: not measured"
                    ),
                }
            }
            self.print_latency_target(Mode::Ft, "");
            self.print_latency_target(Mode::FtLatency, " (--latency-mode)");
        }
        if self.opts.tls {
            self.print_tls_target();
        }
        if self.opts.failovers > 0 {
            match self.failover_figures() {
                Some((med, max)) => println!(
                    "  failover <= {TARGET_FAILOVER_MS} ms (kill -9 -> first answer from the backup, detection included): median {med:.1} ms {} by {:.1} ms; max {max:.1} ms {} by {:.1} ms",
                    verdict(med <= TARGET_FAILOVER_MS),
                    (TARGET_FAILOVER_MS - med).abs(),
                    verdict(max <= TARGET_FAILOVER_MS),
                    (TARGET_FAILOVER_MS - max).abs()
                ),
                None => println!("  failover <= {TARGET_FAILOVER_MS} ms: not measured"),
            }
            for resend in [true, false] {
                let tcp: Vec<f64> = self
                    .results
                    .failovers
                    .iter()
                    .filter(|s| s.resend == resend)
                    .map(|s| s.tcp_ms)
                    .collect();
                let Some(med) = median(&tcp) else {
                    continue;
                };
                let met = tcp
                    .iter()
                    .filter(|&&ms| ms <= TARGET_FAILOVER_TCP_MS)
                    .count();
                let max = tcp.iter().copied().fold(f64::NAN, f64::max);
                // A miss within the client's retransmission timeout of the kill is a request
                // that reached only the dead primary (see the kill lines); one near the
                // guest's own retransmission timeout, a reply the dead primary held.
                let (what, judged) = if resend {
                    ("", format!(" {}", verdict(met == tcp.len())))
                } else {
                    (" (--no-resend-output, for comparison)", String::new())
                };
                println!(
                    "  first TCP answer after a failover <= {TARGET_FAILOVER_TCP_MS} ms{what}: {met}/{} kills{judged}; median {med:.1} ms, max {max:.1} ms",
                    tcp.len(),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------------

fn main() {
    let opts = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-ft: {e}");
            std::process::exit(2);
        }
    };
    if let Err(why) = kvm_available() {
        println!("SKIP: bench-ft: {why} - the FT benchmark did NOT run");
        return;
    }
    if !netns_or_skip("bench-ft") {
        return;
    }
    install_signal_handlers();
    let started = Instant::now();
    let load_before = loadavg();
    let mut results = Results::default();
    let mut peer_note = "no QEMU COLO column: the run ended before it".to_string();
    let outcome = run(&opts, &mut results, &mut peer_note);
    if let Err(e) = outcome {
        results.fail(e);
    }
    let interrupted = INTERRUPTED.load(Ordering::SeqCst);
    Report {
        opts: &opts,
        results: &results,
        load_before,
        peer_note,
        elapsed: started.elapsed(),
    }
    .print();
    if interrupted {
        println!("interrupted: partial results");
        std::process::exit(130);
    }
    if !results.failures.is_empty() {
        std::process::exit(1);
    }
}

fn run(opts: &Options, results: &mut Results, peer_note: &mut String) -> Res<()> {
    let bins = binaries()?;
    let mut lab = Lab::new(bins)?;
    log(&format!(
        "namespaces {}, {}, {}; {} run(s) per case, no FT and FT alternating",
        lab.hosts.client.name(),
        lab.hosts.a.name(),
        lab.hosts.b.name(),
        opts.runs
    ));
    if opts.cells {
        for (rate, cells) in groups(opts) {
            check_interrupted()?;
            run_group(&mut lab, rate, &cells, opts, results);
        }
    }
    check_interrupted()?;
    if opts.colo && opts.cells {
        *peer_note = run_colo(&lab.bins, opts, results);
    } else {
        *peer_note = "no QEMU COLO column: not asked for (--no-colo or --no-cells)".into();
    }
    check_interrupted()?;
    if opts.tls {
        let section = ("TLS", TLS_EPOCH_MS, &TLS_PAGES[..]);
        run_compare(
            &mut lab,
            opts,
            results,
            section,
            &[Mode::FtPlaintext, Mode::FtTls],
        );
    }
    check_interrupted()?;
    if opts.pipeline {
        let section = ("pipeline", PIPELINE_EPOCH_MS, &PIPELINE_PAGES[..]);
        run_compare(&mut lab, opts, results, section, &PIPELINE_MODES);
    }
    check_interrupted()?;
    if opts.delta {
        run_delta(&mut lab, opts, results);
    }
    check_interrupted()?;
    if opts.hot_compare {
        run_hot(&mut lab, opts, results);
    }
    check_interrupted()?;
    if opts.group {
        if let Err(e) = run_groups(&mut lab, opts, results) {
            results.fail(format!("groups: {e}"));
        }
    }
    check_interrupted()?;
    if opts.failovers > 0 {
        if let Err(e) = run_failovers(&mut lab, opts, results) {
            results.fail(format!("failover: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_gives_the_time_on_the_cpu_then_the_time_waiting_for_it() {
        assert_eq!(schedstat_times("1500 250 7\n"), (1500, 250));
        assert_eq!(schedstat_times(""), (0, 0));
        assert_eq!(schedstat_times("42"), (42, 0));
    }

    #[test]
    fn a_congestion_control_the_host_does_not_offer_is_refused_at_once() {
        let Ok(have) = std::fs::read_to_string(AVAILABLE_CC) else {
            eprintln!("SKIP: no {AVAILABLE_CC} on this host");
            return;
        };
        let err = congestion_control("no-such-cc").unwrap_err();
        assert!(
            err.contains("no-such-cc") && err.contains(have.trim()),
            "{err}"
        );
        for offered in have.split_whitespace() {
            assert_eq!(congestion_control(offered).as_deref(), Ok(offered));
        }
    }
}
