//! TCP throughput of the real Linux guest with and without FT, both directions, side by side in
//! one run (`ci/bench-ft-linux` builds the release binaries and runs this).
//!
//! Lab: the integration tests' two "hosts" and a client as network namespaces
//! ([`integration::try_two_hosts`]). The guest is the project's small Linux
//! (`ci/build-linux-guest`: Debian's linux-source-6.1, busybox initramfs, /init =
//! ci/linux-guest/init.c), booted once on host A with 1 vCPU, 256 MiB, no disk, its virtio-net
//! NIC on the TAP `tapvm` bridged to the client network, /init serving line commands on TCP
//! 5001 (`tg.checks=serve`). The client is Linux's own TCP stack in the client namespace.
//!
//! Cases, alternating within each run (odd runs in this order, even runs reversed; the two
//! directions swap with them):
//!   noFT     the VM alone;
//!   FT       `enable-ft --epoch-ms 10` (the default epoch, given explicitly) to a fresh backup
//!            VMM on host B (`receive-ft --tap tapvm`), mutual TLS, early ACKs on (the default:
//!            input mirrored to the backup as it arrives, pure ACKs leave once it holds it);
//!   FT held  the same with `--no-early-acks`: every guest frame waits for its epoch's commit;
//!   FT no resend  FT with `--no-resend-output`: the frames still held when an epoch ends are
//!            not copied to the backup (what that copy costs the guest's sending).
//! Each FT case is a fresh protection session (1 s heartbeat timeout: the emulated guest
//! kernel keeps both host cores busy), ended with `disable-ft` after the case; the session must
//! still be `protected` then.
//!
//! Per case and direction, BYTES bytes on one TCP connection (default 1 MiB, --quick 256 KiB),
//! after one unmeasured transfer each way right after the boot (the first transfers of a fresh
//! guest are slower: its first touches of buffers fault, TCP starts cold):
//!   guest -> client  /init's `tsource PORT N`: the client connects, the guest sends a
//!                    deterministic xorshift64 stream and shuts down its side; timed at the
//!                    client from the connect to EOF; checked: the length, and the FNV-1a 64 of
//!                    the received bytes against the guest's `tsource ok ... fnv=` and the
//!                    stream's own (regenerated here);
//!   client -> guest  /init's `tsink PORT N`: the client connects and sends N pseudo-random
//!                    bytes; the guest reads N, then writes `bytes=N fnv=H` on the connection
//!                    and closes it; timed at the client from the connect to that EOF; checked:
//!                    length and FNV on both sides.
//! MB/s = 10^6 bytes per second; the table shows the median over the runs per case and
//! direction, and FT/noFT, FT held/noFT; with more than one run also the spread (min-max).
//!
//! The guest's kernel code (its TCP stack, virtio-net driver) runs under KVM's instruction
//! emulator on this project's CI machines (DESIGN.md, section 2): absolute MB/s are low there;
//! the ratios are the figures.
//!
//! Needs root, /dev/kvm, iproute2 and /dev/net/tun; prints a SKIP line and exits 0 without
//! them. `TANDEM_VMM_BIN` names the VMM (else the harness builds it). The exit code is non-zero
//! if a case could not run (130 when interrupted).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use integration::bench::{
    self, check_interrupted, fmt, install_signal_handlers, loadavg, machine, print_table,
    INTERRUPTED,
};
use integration::linux_guest::{
    fnv, linux_assets, source_stream, try_wait_step, Ctl, QUIRKS_CMDLINE,
};
use integration::{
    kvm_available, marker_fields, netns_or_skip, tls_dir, try_two_hosts, vmm_binary, TempDir,
    TwoHosts, Vmm, CLIENT_NET, HOST_B,
};

type Res<T> = Result<T, String>;

const GUEST_IP: &str = "192.168.249.2";
const GUEST_MAC: &str = "12:34:56:78:9a:be";
const GUEST_MEMORY: &str = "256M";
const GUEST_CPUS: u32 = 1;
const CTL_PORT: u16 = 5001;
const SOURCE_PORT: u16 = 5002;
const SINK_PORT: u16 = 5003;
const EPOCH_MS: u64 = 10;
const HEARTBEAT_TIMEOUT_MS: u64 = 1000;
const FIRST_FT_PORT: u16 = 7300;
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// A transfer's socket timeout (no progress for this long fails the case).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

struct Options {
    runs: usize,
    bytes: usize,
}

const USAGE: &str = "usage: bench_ft_linux [--quick] [--runs N] [--bytes N]";

impl Options {
    fn parse() -> Res<Options> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let (mut quick, mut runs, mut bytes) = (false, None, None);
        let mut i = 0;
        while i < args.len() {
            let flag = args[i].as_str();
            let mut value = || -> Res<usize> {
                i += 1;
                let v = args
                    .get(i)
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
                v.parse::<usize>()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| format!("{flag}: {v:?} is not a whole number >= 1"))
            };
            match flag {
                "--quick" => quick = true,
                "--runs" | "-n" => runs = Some(value()?),
                "--bytes" => bytes = Some(value()?),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
            i += 1;
        }
        Ok(Options {
            runs: runs.unwrap_or(if quick { 1 } else { 3 }),
            bytes: bytes.unwrap_or(if quick { 256 << 10 } else { 1 << 20 }),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Interruption: SIGINT/SIGTERM/SIGHUP set a flag that every step checks, so that the lab is
// torn down by the normal drops (the release profile aborts on panic).
// ---------------------------------------------------------------------------------------------

fn log(line: &str) {
    println!("==> bench-ft-linux: {line}");
    let _ = std::io::stdout().flush();
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

// ---------------------------------------------------------------------------------------------
// ch-remote
// ---------------------------------------------------------------------------------------------

fn ch_remote(bin: &Path, socket: &Path, args: &[&str]) -> Res<String> {
    bench::ch_remote(bin, socket, args, STEP_TIMEOUT)
}

/// `ft-status` -> (health, last committed epoch).
fn ft_health(bin: &Path, socket: &Path) -> Res<(String, u64)> {
    let text = ch_remote(bin, socket, &["ft-status"])?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("ft-status is not JSON ({e}): {text}"))?;
    Ok((
        v["health"].as_str().unwrap_or("?").to_string(),
        v["last_committed_epoch"].as_u64().unwrap_or(0),
    ))
}

// ---------------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    NoFt,
    Ft,
    FtHeld,
    FtNoResend,
}

const CASES: [Case; 4] = [Case::NoFt, Case::Ft, Case::FtHeld, Case::FtNoResend];

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::NoFt => "noFT",
            Case::Ft => "FT",
            Case::FtHeld => "FT held",
            Case::FtNoResend => "FT no resend",
        }
    }

    /// What `enable-ft` adds for the case (None: no FT).
    fn ft_flags(self) -> Option<&'static [&'static str]> {
        match self {
            Case::NoFt => None,
            Case::Ft => Some(&[]),
            Case::FtHeld => Some(&["--no-early-acks"]),
            Case::FtNoResend => Some(&["--no-resend-output"]),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    /// Guest -> client (`tsource`).
    Out,
    /// Client -> guest (`tsink`).
    In,
}

impl Dir {
    fn label(self) -> &'static str {
        match self {
            Dir::Out => "guest -> client",
            Dir::In => "client -> guest",
        }
    }
}

struct Lab {
    ch_remote: PathBuf,
    hosts: TwoHosts,
    dir: TempDir,
    primary: Vmm,
    primary_socket: PathBuf,
    ctl: Ctl,
    next_port: u16,
    spawned: u32,
    tls: String,
}

impl Lab {
    /// The namespaces, and the Linux guest booted on host A up to /init's command service.
    fn new() -> Res<Lab> {
        let vmm = vmm_binary().map_err(|e| format!("the VMM binary: {e}"))?;
        let ch_remote = vmm.with_file_name("ch-remote");
        for path in [&vmm, &ch_remote] {
            if !path.is_file() {
                return Err(format!("{} is missing", path.display()));
            }
        }
        let assets = linux_assets()?;
        let hosts = try_two_hosts("bfl").map_err(|e| format!("network namespaces: {e}"))?;
        let dir = TempDir::new("bench_ft_linux").map_err(|e| e.to_string())?;
        let tls = tls_dir().to_string_lossy().into_owned();
        log(&format!(
            "namespaces {}, {}, {}; booting the Linux guest on host A ({GUEST_CPUS} vCPU, \
             {GUEST_MEMORY}iB)",
            hosts.client.name(),
            hosts.a.name(),
            hosts.b.name()
        ));
        let socket = dir.join("primary.sock");
        let socket_arg = socket
            .to_str()
            .ok_or("socket path is not UTF-8")?
            .to_string();
        let initramfs = assets.initramfs.display().to_string();
        let cmdline = format!(
            "console=ttyS0 {QUIRKS_CMDLINE} tg.ip={GUEST_IP}/24 tg.peer={CLIENT_NET} \
             tg.ctl={CTL_PORT} tg.checks=serve"
        );
        let net = format!("tap=tapvm,mac={GUEST_MAC}");
        let started = Instant::now();
        let mut primary = Vmm::builder("bench_ft_linux-primary")
            .wrapped_in(hosts.a.exec_prefix())
            .kernel(&assets.vmlinux)
            .args(["--initramfs", initramfs.as_str()])
            .cmdline(&cmdline)
            .cpus(GUEST_CPUS)
            .memory(GUEST_MEMORY)
            .serial_tty()
            .args([
                "--net",
                net.as_str(),
                "--api-socket",
                socket_arg.as_str(),
                "-v",
            ])
            .spawn()
            .map_err(|e| format!("start the VMM: {e}"))?;
        try_wait_step(&mut primary, "LINUX-GUEST SERVE listening", BOOT_TIMEOUT)?;
        let mut ctl = Ctl::connect(&hosts.client, (GUEST_IP, CTL_PORT), STEP_TIMEOUT)
            .map_err(|e| primary.diagnose(&format!("the guest's command service: {e}")))?;
        let info = ctl.cmd("info")?;
        log(&format!(
            "guest serving after {:.1} s: {info}",
            started.elapsed().as_secs_f64()
        ));
        Ok(Lab {
            ch_remote,
            hosts,
            dir,
            primary,
            primary_socket: socket,
            ctl,
            next_port: FIRST_FT_PORT,
            spawned: 0,
            tls,
        })
    }

    /// A backup VMM on host B with its API socket up.
    fn spawn_backup(&mut self) -> Res<(Vmm, PathBuf)> {
        self.spawned += 1;
        let socket = self.dir.join(&format!("backup{}.sock", self.spawned));
        let socket_arg = socket.to_str().ok_or("socket path is not UTF-8")?;
        let mut vmm = Vmm::builder(&format!("bench_ft_linux-backup{}", self.spawned))
            .wrapped_in(self.hosts.b.exec_prefix())
            .args(["--api-socket", socket_arg, "-v"])
            .spawn()
            .map_err(|e| format!("start the backup VMM: {e}"))?;
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
        Ok((vmm, socket))
    }

    /// A fresh backup on host B and the guest protected by it; returns the backup, the initial
    /// sync time and the last committed epoch then (the primary's epoch count goes on across
    /// sessions).
    fn protect(&mut self, flags: &[&str]) -> Res<(Vmm, Duration, u64)> {
        let port = self.next_port;
        self.next_port += 1;
        let (backup, socket) = self.spawn_backup()?;
        let listen = format!("tcp:{HOST_B}:{port}");
        ch_remote(
            &self.ch_remote,
            &socket,
            &[
                "receive-ft",
                &listen,
                "--tls-dir",
                &self.tls,
                "--tap",
                "tapvm",
            ],
        )
        .map_err(|e| format!("{e}\n{}", backup.diagnose("receive-ft")))?;
        let peer = format!("{HOST_B}:{port}");
        let epoch = EPOCH_MS.to_string();
        let heartbeat = HEARTBEAT_TIMEOUT_MS.to_string();
        let mut args = vec![
            "enable-ft",
            "--peer",
            &peer,
            "--epoch-ms",
            &epoch,
            "--heartbeat-timeout-ms",
            &heartbeat,
            "--tls-dir",
            &self.tls,
        ];
        args.extend_from_slice(flags);
        let started = Instant::now();
        ch_remote(&self.ch_remote, &self.primary_socket, &args).map_err(|e| {
            format!(
                "{e}\n{}\n{}",
                self.primary.diagnose("enable-ft"),
                backup.diagnose("enable-ft")
            )
        })?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            check_interrupted()?;
            let (health, epoch) = ft_health(&self.ch_remote, &self.primary_socket)?;
            if health == "protected" {
                return Ok((backup, started.elapsed(), epoch));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "ft-status health is {health:?}, not \"protected\", after {STEP_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends the protection session: the primary must still be protected; `disable-ft`, the
    /// backup stopped, the bridges' MAC tables flushed (in case the backup ever announced the
    /// guest). Returns the last committed epoch.
    fn unprotect(&mut self, backup: Vmm) -> Res<u64> {
        let status = ft_health(&self.ch_remote, &self.primary_socket);
        let disabled = ch_remote(&self.ch_remote, &self.primary_socket, &["disable-ft"])
            .map_err(|e| format!("{e}\n{}", self.primary.diagnose("disable-ft")));
        drop(backup);
        for (ns, bridge) in [
            (&self.hosts.client, "br0"),
            (&self.hosts.a, "brh"),
            (&self.hosts.b, "brh"),
        ] {
            ns.ip(&["link", "set", bridge, "type", "bridge", "fdb_flush"])
                .map_err(|e| e.to_string())?;
        }
        let (health, epochs) = status?;
        disabled?;
        if health != "protected" {
            return Err(format!(
                "the FT session was {health:?} at the end of the case, not \"protected\""
            ));
        }
        Ok(epochs)
    }

    /// One transfer of `bytes` in direction `dir`; returns MB/s as the client measured it.
    fn transfer(&mut self, dir: Dir, bytes: usize) -> Res<f64> {
        check_interrupted()?;
        let (name, port) = match dir {
            Dir::Out => ("tsource", SOURCE_PORT),
            Dir::In => ("tsink", SINK_PORT),
        };
        let command = format!("{name} {port} {bytes}");
        let listening = self.ctl.cmd(&command)?;
        if !listening.starts_with(&format!("{name} listening")) {
            return Err(format!("{command}: the guest replied {listening:?}"));
        }
        let addr: SocketAddr = format!("{GUEST_IP}:{port}")
            .parse()
            .map_err(|e| format!("{GUEST_IP}:{port}: {e}"))?;
        let (secs, got, sum) = match dir {
            Dir::Out => self
                .hosts
                .client
                .run(move || receive_all(addr))
                .map_err(|e| e.to_string())??,
            Dir::In => {
                let data = sink_data(bytes);
                let sum = fnv(&data, FNV_START);
                let (secs, line) = self
                    .hosts
                    .client
                    .run(move || send_all(addr, data))
                    .map_err(|e| e.to_string())??;
                let want = format!("bytes={bytes} fnv={sum:016x}");
                if line != want {
                    return Err(format!(
                        "{command}: the guest answered {line:?} on the data connection, \
                         expected {want:?}"
                    ));
                }
                (secs, bytes, sum)
            }
        };
        let done = self.ctl.line(&command)?;
        let fields = marker_fields(&done);
        let field = |k: &str| fields.get(k).cloned().unwrap_or_default();
        if !done.starts_with(&format!("{name} ok"))
            || field("bytes") != bytes.to_string()
            || field("fnv") != format!("{sum:016x}")
        {
            return Err(format!(
                "{command}: the client got {got} bytes with FNV {sum:016x}, the guest replied \
                 {done:?}"
            ));
        }
        if got != bytes {
            return Err(format!("{command}: the client got {got} of {bytes} bytes"));
        }
        if dir == Dir::Out {
            let want = fnv(&source_stream(bytes), FNV_START);
            if sum != want {
                return Err(format!(
                    "{command}: the received stream's FNV {sum:016x} is not the source \
                     stream's {want:016x}"
                ));
            }
        }
        Ok(bytes as f64 / secs / 1e6)
    }
}

/// What the client sends to `tsink`: pseudo-random bytes (another xorshift than the guest's).
fn sink_data(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn connect(addr: SocketAddr) -> Res<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(TRANSFER_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TRANSFER_TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    Ok(stream)
}

/// Guest -> client: connect, read to EOF. Returns (seconds from the connect to EOF, bytes,
/// FNV-1a 64 of them).
fn receive_all(addr: SocketAddr) -> Res<(f64, usize, u64)> {
    let mut stream = connect(addr)?;
    let start = Instant::now();
    let (mut got, mut sum, mut buf) = (0usize, FNV_START, vec![0u8; 64 << 10]);
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                sum = fnv(&buf[..n], sum);
                got += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("receive after {got} bytes: {e}")),
        }
    }
    Ok((start.elapsed().as_secs_f64(), got, sum))
}

/// Client -> guest: connect, send `data`, read the guest's `bytes=N fnv=H` line to EOF.
/// Returns (seconds from the connect to EOF, the line).
fn send_all(addr: SocketAddr, data: Vec<u8>) -> Res<(f64, String)> {
    let mut stream = connect(addr)?;
    let start = Instant::now();
    for (i, chunk) in data.chunks(64 << 10).enumerate() {
        stream
            .write_all(chunk)
            .map_err(|e| format!("send after {} bytes: {e}", i * (64 << 10)))?;
    }
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("the guest's answer after all {} bytes: {e}", data.len()))?;
    Ok((start.elapsed().as_secs_f64(), reply.trim().to_string()))
}

// ---------------------------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Results {
    /// (case, direction, MB/s) per successful transfer.
    samples: Vec<(Case, Dir, f64)>,
    notes: Vec<String>,
    failure: Option<String>,
}

impl Results {
    fn values(&self, case: Case, dir: Dir) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.0 == case && s.1 == dir)
            .map(|s| s.2)
            .collect()
    }

    fn median(&self, case: Case, dir: Dir) -> Option<f64> {
        median(&self.values(case, dir))
    }

    /// `min-max` of the runs' MB/s.
    fn spread(&self, case: Case, dir: Dir) -> String {
        let v = self.values(case, dir);
        let min = v.iter().copied().reduce(f64::min);
        let max = v.iter().copied().reduce(f64::max);
        format!("{}-{} ({})", fmt(min, 3), fmt(max, 3), v.len())
    }
}

fn run(opts: &Options, results: &mut Results) -> Res<()> {
    let mut lab = Lab::new()?;
    log(&format!(
        "{} run(s) of {} bytes per case and direction; noFT, FT, FT held and FT no resend alternating",
        opts.runs, opts.bytes
    ));
    let warmup = (opts.bytes / 4).max(64 << 10);
    for dir in [Dir::Out, Dir::In] {
        let mbps = lab
            .transfer(dir, warmup)
            .map_err(|e| format!("warm-up, {}: {e}", dir.label()))?;
        log(&format!(
            "warm-up {}: {warmup} bytes at {mbps:.3} MB/s (not counted)",
            dir.label()
        ));
    }
    for run in 1..=opts.runs {
        let mut cases = CASES.to_vec();
        let mut dirs = vec![Dir::Out, Dir::In];
        if run % 2 == 0 {
            cases.reverse();
            dirs.reverse();
        }
        for case in cases {
            check_interrupted()?;
            let session = match case.ft_flags() {
                None => None,
                Some(flags) => Some(lab.protect(flags)?),
            };
            let mut line = format!("run {run} {:<12}", case.label());
            let mut outcome = Ok(());
            for &dir in &dirs {
                match lab.transfer(dir, opts.bytes) {
                    Ok(mbps) => {
                        results.samples.push((case, dir, mbps));
                        line.push_str(&format!("  {}: {mbps:.3} MB/s", dir.label()));
                    }
                    Err(e) => {
                        outcome = Err(format!("run {run}, {}, {}: {e}", case.label(), dir.label()));
                        break;
                    }
                }
            }
            if let Some((backup, sync, first_epoch)) = session {
                let ended = lab.unprotect(backup);
                if let Ok(last_epoch) = &ended {
                    line.push_str(&format!(
                        "  (initial sync {:.1} s, {} epochs committed)",
                        sync.as_secs_f64(),
                        last_epoch.saturating_sub(first_epoch)
                    ));
                }
                if outcome.is_ok() {
                    outcome = ended
                        .map(|_| ())
                        .map_err(|e| format!("run {run}, {}: {e}", case.label()));
                }
            }
            log(&line);
            outcome?;
        }
    }
    let klog = lab.ctl.cmd("klog")?;
    if !klog.starts_with("klog ok") {
        results
            .notes
            .push(format!("the guest's kernel log tells of trouble: {klog}"));
    }
    // A clean end: /init powers the VM off (the drop kills it otherwise).
    if lab.ctl.cmd("poweroff").is_ok() {
        let _ = lab.primary.wait_exit(STEP_TIMEOUT);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn print_report(opts: &Options, r: &Results, load_before: &str, elapsed: Duration) {
    println!();
    println!(
        "FT TCP throughput, Linux guest ({GUEST_CPUS} vCPU, {GUEST_MEMORY}iB, virtio-net on a TAP); \
         primary and backup VMMs in two network namespaces on this machine, client in a third; \
         FT at --epoch-ms {EPOCH_MS} (the default), mutual TLS; {} run(s) of {} bytes per case \
         and direction, median; took {:.0} s",
        opts.runs,
        opts.bytes,
        elapsed.as_secs_f64()
    );
    for line in machine() {
        println!("  {line}");
    }
    println!(
        "  load average (1/5/15 min) before: {load_before}, after: {}",
        loadavg()
    );
    println!();
    println!(
        "  FT: early ACKs (input mirrored to the backup, pure ACKs leave once it holds it); \
         FT held: --no-early-acks (every guest frame held to its epoch's commit); \
         FT no resend: --no-resend-output (held output not copied to the backup)"
    );
    println!(
        "  guest -> client: /init `tsource`, client connect -> EOF; client -> guest: /init \
         `tsink`, client connect -> the guest's `bytes=N fnv=H` and EOF; MB/s = 10^6 B/s"
    );
    println!();
    let rows: Vec<Vec<String>> = [Dir::Out, Dir::In]
        .iter()
        .map(|&dir| {
            let no = r.median(Case::NoFt, dir);
            let ratio = |x: Option<f64>| match (no, x) {
                (Some(n), Some(f)) if n > 0.0 => Some(f / n),
                _ => None,
            };
            let mut row = vec![dir.label().to_string()];
            row.extend(CASES.iter().map(|&case| fmt(r.median(case, dir), 3)));
            row.extend(
                CASES[1..]
                    .iter()
                    .map(|&case| fmt(ratio(r.median(case, dir)), 3)),
            );
            row
        })
        .collect();
    print_table(
        &[
            "direction",
            "noFT MB/s",
            "FT MB/s",
            "FT held MB/s",
            "FT no resend MB/s",
            "FT/noFT",
            "FT held/noFT",
            "FT no resend/noFT",
        ],
        &rows,
    );
    if opts.runs > 1 {
        println!();
        println!("spread over the runs: min-max MB/s (runs)");
        println!();
        let rows: Vec<Vec<String>> = [Dir::Out, Dir::In]
            .iter()
            .map(|&dir| {
                let mut row = vec![dir.label().to_string()];
                row.extend(CASES.iter().map(|&case| r.spread(case, dir)));
                row
            })
            .collect();
        print_table(
            &["direction", "noFT", "FT", "FT held", "FT no resend"],
            &rows,
        );
    }
    if !r.notes.is_empty() {
        println!("\nnotes:");
        for n in &r.notes {
            println!("  {n}");
        }
    }
    if let Some(f) = &r.failure {
        println!("\nfailure (the table holds the runs before it):");
        println!("  {}", f.replace('\n', "\n    "));
    }
}

fn main() {
    let opts = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-ft-linux: {e}");
            std::process::exit(2);
        }
    };
    if let Err(why) = kvm_available() {
        println!("SKIP: bench-ft-linux: {why} - the benchmark did NOT run");
        return;
    }
    if !netns_or_skip("bench-ft-linux") {
        return;
    }
    install_signal_handlers();
    let started = Instant::now();
    let load_before = loadavg();
    let mut results = Results::default();
    if let Err(e) = run(&opts, &mut results) {
        results.failure = Some(e);
    }
    print_report(&opts, &results, &load_before, started.elapsed());
    if INTERRUPTED.load(Ordering::SeqCst) {
        println!("interrupted: partial results");
        std::process::exit(130);
    }
    if results.failure.is_some() {
        std::process::exit(1);
    }
}
