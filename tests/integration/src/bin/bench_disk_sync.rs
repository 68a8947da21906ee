//! Initial synchronisation of a replicated disk: ours vs QEMU's drive-mirror to an NBD target,
//! the same image, side by side in one run (`ci/bench-disk-sync` builds the release binaries
//! and runs this).
//!
//! The image: a raw file of `--size-mib` (1024) MiB of which `--data-pct` (50) percent holds
//! incompressible data (xorshift output) in 1 MiB runs at scattered, seeded places; the rest
//! are holes. It is made once and used by every case; the copies start as blank sparse files
//! of the same size. Everything runs on this host over TCP loopback (127.0.0.1).
//!
//! Cases, interleaved (run i: ours, then QEMU), `--runs` (3) times each; the table shows the
//! median of each figure:
//!   ours  a primary `cloud-hypervisor` boots the test guest (`workload=hello exit=halt`, 1 vCPU,
//!         64 MiB, no NIC) with the image as its disk; a backup VMM waits with
//!         `receive-ft tcp:127.0.0.1:PORT --disk-path BLANK`; the time is that of the
//!         `PUT vm.enable-ft` request (`disk_mode: replicated`) on the primary's API socket, from
//!         sending it to its answer: the initial sync copies the guest's memory and the whole
//!         image (sparse-aware, zero chunks elided, digest checked) and returns once the backup
//!         holds the sync epoch. "wire" is the primary's ft-status `bytes` right after (the
//!         sync's frames: memory pages and disk data). The test guest never idles in `hlt`: its
//!         vCPU spins at CPL3 and would take one of this machine's two cores from the copy, so
//!         the bench puts that thread in SCHED_IDLE (an idle guest's vCPU costs nothing on a
//!         real host); `--vcpu-normal` leaves it alone.
//!   qemu  two `qemu-system-x86_64 -machine none -nodefaults -display none` processes (no guest,
//!         no vCPU) driven over QMP: the target exports the blank image with `nbd-server-start`
//!         (TCP loopback) and `nbd-server-add writable=true`; the source opens the image as a raw
//!         blockdev, `blockdev-add`s the NBD export and runs `blockdev-mirror sync=full`; the
//!         time runs from sending the command to the BLOCK_JOB_READY event (the initial copy is
//!         done and flushed to the target; then the job is cancelled, which keeps the copy).
//! Every copy is compared with the image byte for byte (ours: after `pause` of the primary;
//! QEMU: after the job ended). CPU is the CPU time the processes of a case used during the
//! timed span (user + system, both sides; for ours without the vCPU threads).
//! With `--baseline` (on by default; `--no-baseline`) each case also runs once on an image of
//! the same size that is all holes: what the memory copy, the protocol and the scan of holes cost
//! without data.
//!
//! Needs root and /dev/kvm for our case (prints SKIP and exits 0 without them) and
//! `qemu-system-x86_64` for QEMU's (without it that column says why). `TANDEM_VMM_BIN` /
//! `TANDEM_GUEST` name the binaries (else the harness builds them).
//!
//! Usage: bench_disk_sync [--runs N] [--size-mib N] [--data-pct P] [--no-qemu] [--no-ours]
//!                        [--no-baseline] [--vcpu-normal] [--port N] [--perf DIR]
//!
//! `--perf DIR` records `perf record -g` of both our VMMs during each timed enable-ft into
//! DIR/<run>.perf.data (a diagnostic: it slows the copy a little).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration::ft::{ft_status, wait_status};
use integration::{
    api_request, ch_remote, kvm_available, test_guest, tls_dir, vmm_binary, wait_for_api_socket,
    TempDir, Vmm, GUEST_DONE,
};

type Res<T> = Result<T, String>;

const MIB: u64 = 1 << 20;
const GUEST_MEMORY: &str = "size=64M";
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Generous: 1 GiB on a busy 2-core machine.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);
const QEMU: &str = "qemu-system-x86_64";
const SEED: u64 = 0x7461_6e64_656d_6473;

struct Opts {
    runs: usize,
    size_mib: u64,
    data_pct: u64,
    ours: bool,
    qemu: bool,
    baseline: bool,
    vcpu_idle: bool,
    port: u16,
    /// Record a `perf` profile of both VMMs during each timed enable-ft into this directory.
    perf: Option<std::path::PathBuf>,
}

fn parse_args() -> Res<Opts> {
    let mut o = Opts {
        runs: 3,
        size_mib: 1024,
        data_pct: 50,
        ours: true,
        qemu: true,
        baseline: true,
        vcpu_idle: true,
        port: 7640,
        perf: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Res<u64> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} wants a number"))
        };
        match a.as_str() {
            "--runs" => o.runs = num("--runs")?.max(1) as usize,
            "--size-mib" => o.size_mib = num("--size-mib")?.max(1),
            "--data-pct" => o.data_pct = num("--data-pct")?.min(100),
            "--port" => o.port = num("--port")? as u16,
            "--no-qemu" => o.qemu = false,
            "--no-ours" => o.ours = false,
            "--no-baseline" => o.baseline = false,
            "--vcpu-normal" => o.vcpu_idle = false,
            "--perf" => o.perf = args.next().map(Into::into),
            "-h" | "--help" => {
                println!(
                    "bench_disk_sync [--runs N] [--size-mib N] [--data-pct P] [--no-qemu] \
                     [--no-ours] [--no-baseline] [--vcpu-normal] [--port N] [--perf DIR]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------------------------

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Writes `size_mib` MiB, `data_mib` of them random data at seeded places, the rest holes.
/// Returns the bytes allocated (as `stat` counts them).
fn make_image(path: &Path, size_mib: u64, data_mib: u64) -> Res<u64> {
    let file = File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    file.set_len(size_mib * MIB)
        .map_err(|e| format!("size {}: {e}", path.display()))?;
    let mut rng = Rng(SEED);
    // A partial Fisher-Yates shuffle: the first `data_mib` of a random permutation.
    let mut order: Vec<u64> = (0..size_mib).collect();
    for i in 0..data_mib as usize {
        let j = i + (rng.next() % (size_mib - i as u64)) as usize;
        order.swap(i, j);
    }
    let mut picked = order[..data_mib as usize].to_vec();
    picked.sort_unstable();
    let mut buf = vec![0u8; MIB as usize];
    for mib in picked {
        for word in buf.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        file.write_all_at(&buf, mib * MIB)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    file.sync_all()
        .map_err(|e| format!("sync {}: {e}", path.display()))?;
    allocated(path)
}

fn allocated(path: &Path) -> Res<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("stat {}: {e}", path.display()))?;
    Ok(meta.blocks() * 512)
}

fn blank_image(path: &Path, size: u64) -> Res<()> {
    let _ = std::fs::remove_file(path);
    let file = File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    file.set_len(size)
        .map_err(|e| format!("size {}: {e}", path.display()))
}

/// Compares `copy` with `image` byte for byte; the first difference as the error.
fn compare(image: &Path, copy: &Path) -> Res<()> {
    let open = |p: &Path| File::open(p).map_err(|e| format!("open {}: {e}", p.display()));
    let (a, b) = (open(image)?, open(copy)?);
    let len = |f: &File, p: &Path| {
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| format!("stat {}: {e}", p.display()))
    };
    let (la, lb) = (len(&a, image)?, len(&b, copy)?);
    if la != lb {
        return Err(format!("the copy has {lb} bytes, the image {la}"));
    }
    let mut x = vec![0u8; 4 * MIB as usize];
    let mut y = vec![0u8; 4 * MIB as usize];
    let mut at = 0u64;
    while at < la {
        let n = (la - at).min(x.len() as u64) as usize;
        a.read_exact_at(&mut x[..n], at)
            .map_err(|e| format!("read {}: {e}", image.display()))?;
        b.read_exact_at(&mut y[..n], at)
            .map_err(|e| format!("read {}: {e}", copy.display()))?;
        if x[..n] != y[..n] {
            let i = x[..n]
                .iter()
                .zip(&y[..n])
                .position(|(p, q)| p != q)
                .unwrap_or(0);
            return Err(format!(
                "the copy differs from the image at offset {:#x} (MiB {})",
                at + i as u64,
                (at + i as u64) / MIB
            ));
        }
        at += n as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CPU accounting
// ---------------------------------------------------------------------------------------------

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of one `/proc/.../stat` line, in ticks.
fn stat_ticks(stat: &str) -> u64 {
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let rest = match stat.rfind(')') {
        Some(i) => &stat[i + 1..],
        None => return 0,
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // rest[0] is field 3.
    get(11) + get(12)
}

/// CPU ticks used so far by the threads of `pid` whose name does not start with `skip`.
fn cpu_ticks(pid: u32, skip: Option<&str>) -> u64 {
    let dir = format!("/proc/{pid}/task");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut total = 0;
    for e in entries.flatten() {
        let p = e.path();
        if let Some(prefix) = skip {
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            if comm.starts_with(prefix) {
                continue;
            }
        }
        total += std::fs::read_to_string(p.join("stat"))
            .map(|s| stat_ticks(&s))
            .unwrap_or(0);
    }
    total
}

/// CPU ticks so far per thread name of `pid` (threads of one name summed).
fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut map = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return map;
    };
    for e in entries.flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let ticks = std::fs::read_to_string(p.join("stat"))
            .map(|s| stat_ticks(&s))
            .unwrap_or(0);
        *map.entry(comm.trim().to_string()).or_insert(0) += ticks;
    }
    map
}

/// "name 1.23 s, ..." for the threads that used CPU between `before` and `after`, busiest
/// first.
fn thread_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let mut v: Vec<(u64, &String)> = after
        .iter()
        .map(|(k, t)| (t.saturating_sub(*before.get(k).unwrap_or(&0)), k))
        .filter(|(t, _)| *t > 0)
        .collect();
    v.sort_by(|a, b| b.cmp(a));
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|(t, k)| format!("{k} {:.2}", *t as f64 / clock_ticks()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Puts the threads of `pid` named `vcpu*` in SCHED_IDLE; returns how many.
fn vcpus_to_idle(pid: u32) -> Res<usize> {
    let dir = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut n = 0;
    for e in entries.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("vcpu") {
            continue;
        }
        let tid: libc::pid_t = e
            .file_name()
            .to_string_lossy()
            .parse()
            .map_err(|_| "bad task id".to_string())?;
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler on a thread id of our child, with a valid param.
        if unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) } != 0 {
            return Err(format!(
                "SCHED_IDLE for thread {tid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        n += 1;
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// One result
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct Sample {
    secs: f64,
    /// Bytes on the wire, when known.
    wire: Option<u64>,
    cpu_secs: f64,
    note: String,
}

// ---------------------------------------------------------------------------------------------
// Ours
// ---------------------------------------------------------------------------------------------

fn ours(o: &Opts, dir: &TempDir, image: &Path, copy: &Path, port: u16, label: &str) -> Res<Sample> {
    let size = std::fs::metadata(image).map_err(|e| e.to_string())?.len();
    blank_image(copy, size)?;
    let kernel = test_guest().map_err(|e| e.to_string())?;
    let (sock_a, sock_b) = (
        dir.join(&format!("{label}-a.sock")),
        dir.join(&format!("{label}-b.sock")),
    );
    let _ = std::fs::remove_file(&sock_a);
    let _ = std::fs::remove_file(&sock_b);
    let disk = format!("path={}", image.display());
    let mut primary = Vmm::builder(&format!("{label}-primary"))
        .args(["--api-socket", sock_a.to_str().ok_or("path")?])
        .kernel(&kernel)
        .cmdline("workload=hello exit=halt")
        .args(["--memory", GUEST_MEMORY])
        .serial_tty()
        .args(["--disk", disk.as_str(), "-v"])
        .spawn()
        .map_err(|e| e.to_string())?;
    primary
        .wait_for(GUEST_DONE, STEP_TIMEOUT)
        .map_err(|e| e.to_string())?;
    wait_for_api_socket(&mut primary, &sock_a, STEP_TIMEOUT);
    let mut backup = Vmm::builder(&format!("{label}-backup"))
        .args(["--api-socket", sock_b.to_str().ok_or("path")?, "-v"])
        .spawn()
        .map_err(|e| e.to_string())?;
    wait_for_api_socket(&mut backup, &sock_b, STEP_TIMEOUT);
    let url = format!("tcp:127.0.0.1:{port}");
    let copy_arg = copy.display().to_string();
    let out = ch_remote(
        &sock_b,
        &["receive-ft", &url, "--disk-path", &copy_arg],
        None,
    );
    if !out.status.success() {
        return Err(format!(
            "receive-ft: {}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            backup.diagnose("receive-ft")
        ));
    }
    let mut note = String::new();
    if o.vcpu_idle {
        let n = vcpus_to_idle(primary.pid())?;
        if n == 0 {
            note = "no vcpu thread found to deprioritise".into();
        }
    }
    let body = serde_json::json!({
        "peer": format!("127.0.0.1:{port}"),
        "disk_mode": "replicated",
        "heartbeat_timeout_ms": 2000,
        "tls_dir": tls_dir(),
    })
    .to_string();
    let cpu0 = cpu_ticks(primary.pid(), Some("vcpu")) + cpu_ticks(backup.pid(), None);
    let (pt0, bt0) = (thread_ticks(primary.pid()), thread_ticks(backup.pid()));
    let mut perf = match &o.perf {
        Some(dir) => {
            let _ = std::fs::create_dir_all(dir);
            let out = dir.join(format!("{label}.perf.data"));
            let pids = format!("{},{}", primary.pid(), backup.pid());
            let child = Command::new("perf")
                .args(["record", "-q", "-g", "-F", "999", "-p", &pids, "-o"])
                .arg(&out)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("perf: {e}"))?;
            std::thread::sleep(Duration::from_millis(300));
            Some(child)
        }
        None => None,
    };
    let t = Instant::now();
    let answer = api_request(&sock_a, "PUT", "vm.enable-ft", Some(&body), SYNC_TIMEOUT);
    let secs = t.elapsed().as_secs_f64();
    if let Some(child) = perf.as_mut() {
        // SAFETY: kill(2) of our own, not yet reaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let _ = child.wait();
    }
    let cpu1 = cpu_ticks(primary.pid(), Some("vcpu")) + cpu_ticks(backup.pid(), None);
    let threads = format!(
        "CPU s by thread: primary [{}]; backup [{}]",
        thread_delta(&pt0, &thread_ticks(primary.pid())),
        thread_delta(&bt0, &thread_ticks(backup.pid()))
    );
    let fail = |what: String| {
        format!(
            "{what}\nprimary ft-status {}\nbackup ft-status {}\n{}\n{}",
            ft_status(&sock_a),
            ft_status(&sock_b),
            primary.diagnose("enable-ft"),
            backup.diagnose("enable-ft")
        )
    };
    match answer {
        Ok((code, _)) if (200..300).contains(&code) => {}
        Ok((code, body)) => return Err(fail(format!("enable-ft answered {code}: {body}"))),
        Err(e) => return Err(fail(format!("enable-ft: {e}"))),
    }
    let status = ft_status(&sock_a);
    let wire = status["bytes"].as_u64();
    wait_status(&sock_a, "health", &["protected"], STEP_TIMEOUT).map_err(fail)?;
    wait_status(&sock_b, "health", &["protected"], STEP_TIMEOUT).map_err(fail)?;
    let out = ch_remote(&sock_a, &["pause"], None);
    if !out.status.success() {
        return Err(format!(
            "pause: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    compare(image, copy).map_err(|e| format!("{label}: {e}"))?;
    primary.kill();
    backup.kill();
    let _ = std::fs::remove_file(copy);
    Ok(Sample {
        secs,
        wire,
        cpu_secs: cpu1.saturating_sub(cpu0) as f64 / clock_ticks(),
        note: if note.is_empty() {
            threads
        } else {
            format!("{note}; {threads}")
        },
    })
}

// ---------------------------------------------------------------------------------------------
// QEMU over QMP
// ---------------------------------------------------------------------------------------------

/// A QEMU process, killed on drop.
struct QemuProc {
    child: Child,
}

impl Drop for QemuProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A QMP connection: commands and their answers; events are kept in order.
struct Qmp {
    name: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<serde_json::Value>,
}

impl Qmp {
    fn start(name: &str, socket: &Path) -> Res<(QemuProc, Qmp)> {
        let _ = std::fs::remove_file(socket);
        let qmp = format!("unix:{},server=on,wait=off", socket.display());
        let child = Command::new(QEMU)
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
                &qmp,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start {QEMU}: {e}"))?;
        let mut proc = QemuProc { child };
        let deadline = Instant::now() + STEP_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(st)) = proc.child.try_wait() {
                        return Err(format!("{name}: QEMU exited ({st}) before its QMP socket"));
                    }
                    if Instant::now() > deadline {
                        return Err(format!("{name}: no QMP socket: {e}"));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        stream
            .set_read_timeout(Some(SYNC_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut q = Qmp {
            name: name.to_string(),
            reader: BufReader::new(stream.try_clone().map_err(|e| e.to_string())?),
            writer: stream,
            events: VecDeque::new(),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("{name}: not a QMP greeting: {greeting}"));
        }
        q.cmd("qmp_capabilities", serde_json::json!({}))?;
        Ok((proc, q))
    }

    fn read(&mut self) -> Res<serde_json::Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("{}: QMP read: {e}", self.name))?;
        if n == 0 {
            return Err(format!("{}: QMP connection closed", self.name));
        }
        serde_json::from_str(&line).map_err(|e| format!("{}: QMP {line:?}: {e}", self.name))
    }

    fn cmd(&mut self, execute: &str, args: serde_json::Value) -> Res<serde_json::Value> {
        let msg = serde_json::json!({"execute": execute, "arguments": args});
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| format!("{}: QMP write: {e}", self.name))?;
        loop {
            let r = self.read()?;
            if r.get("event").is_some() {
                self.events.push_back(r);
                continue;
            }
            if let Some(ret) = r.get("return") {
                return Ok(ret.clone());
            }
            return Err(format!("{}: {execute} {args}: {r}", self.name));
        }
    }

    /// Waits for one of the events `names` (earlier ones first); returns it.
    fn wait_event(&mut self, names: &[&str]) -> Res<serde_json::Value> {
        let is = |e: &serde_json::Value| names.iter().any(|n| e["event"] == *n);
        if let Some(i) = self.events.iter().position(is) {
            let e = self.events.remove(i).unwrap_or_default();
            self.events.drain(..i);
            return Ok(e);
        }
        self.events.clear();
        loop {
            let r = self.read()?;
            if is(&r) {
                return Ok(r);
            }
        }
    }
}

fn free_port() -> Res<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn process_ticks(p: &QemuProc) -> u64 {
    cpu_ticks(p.child.id(), None)
}

fn qemu(dir: &TempDir, image: &Path, copy: &Path, label: &str) -> Res<Sample> {
    let size = std::fs::metadata(image).map_err(|e| e.to_string())?.len();
    blank_image(copy, size)?;
    let (tproc, mut tgt) = Qmp::start(&format!("{label}-target"), &dir.join("qt.sock"))?;
    let (sproc, mut src) = Qmp::start(&format!("{label}-source"), &dir.join("qs.sock"))?;
    let port = free_port()?.to_string();
    let raw_file = |node: &str, path: &Path| {
        serde_json::json!({"driver": "raw", "node-name": node,
            "file": {"driver": "file", "filename": path.display().to_string()}})
    };
    tgt.cmd("blockdev-add", raw_file("copy", copy))?;
    tgt.cmd(
        "nbd-server-start",
        serde_json::json!({"addr": {"type": "inet",
            "data": {"host": "127.0.0.1", "port": port}}}),
    )?;
    tgt.cmd(
        "nbd-server-add",
        serde_json::json!({"device": "copy", "name": "copy", "writable": true}),
    )?;
    src.cmd("blockdev-add", raw_file("image", image))?;
    src.cmd(
        "blockdev-add",
        serde_json::json!({"driver": "raw", "node-name": "nbd",
            "file": {"driver": "nbd", "export": "copy",
                "server": {"type": "inet", "host": "127.0.0.1", "port": port}}}),
    )?;
    let cpu0 = process_ticks(&tproc) + process_ticks(&sproc);
    let (tt0, st0) = (
        thread_ticks(tproc.child.id()),
        thread_ticks(sproc.child.id()),
    );
    let t = Instant::now();
    src.cmd(
        "blockdev-mirror",
        serde_json::json!({"job-id": "sync", "device": "image", "target": "nbd",
            "sync": "full"}),
    )?;
    let ev = src.wait_event(&["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"])?;
    let secs = t.elapsed().as_secs_f64();
    let cpu1 = process_ticks(&tproc) + process_ticks(&sproc);
    let threads = format!(
        "CPU s by thread: source [{}]; target [{}]",
        thread_delta(&st0, &thread_ticks(sproc.child.id())),
        thread_delta(&tt0, &thread_ticks(tproc.child.id()))
    );
    if ev["event"] != "BLOCK_JOB_READY" {
        return Err(format!("{label}: the mirror job did not get ready: {ev}"));
    }
    let len = ev["data"]["len"].as_u64().unwrap_or(0);
    src.cmd("block-job-cancel", serde_json::json!({"device": "sync"}))?;
    let end = src.wait_event(&["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"])?;
    if end["data"].get("error").is_some() {
        return Err(format!(
            "{label}: the mirror job ended with an error: {end}"
        ));
    }
    let _ = src.cmd("quit", serde_json::json!({}));
    let _ = tgt.cmd("quit", serde_json::json!({}));
    drop((sproc, tproc));
    compare(image, copy).map_err(|e| format!("{label}: {e}"))?;
    let _ = std::fs::remove_file(copy);
    Ok(Sample {
        secs,
        wire: None,
        cpu_secs: cpu1.saturating_sub(cpu0) as f64 / clock_ticks(),
        note: format!("job len {} MiB; {threads}", len / MIB),
    })
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|k| k.parse::<u64>().ok())
                })
        })
        .map(|kib| format!("{:.0} GiB", kib as f64 / (1 << 20) as f64))
        .unwrap_or_default();
    let pvm = if Path::new("/sys/module/kvm_pvm").exists() {
        ", nested kvm_pvm"
    } else {
        ""
    };
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!(
        "machine: {model}, {cores} cores, {mem_gib}{pvm}; Linux {kernel}; load average at start \
         {load}"
    )
}

fn qemu_version() -> Res<String> {
    let out = Command::new(QEMU)
        .arg("--version")
        .output()
        .map_err(|e| format!("{QEMU}: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

struct Row {
    case: String,
    samples: Vec<Sample>,
    errors: Vec<String>,
}

impl Row {
    fn new(case: &str) -> Self {
        Row {
            case: case.to_string(),
            samples: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn push(&mut self, r: Res<Sample>) {
        match r {
            Ok(s) => {
                eprintln!(
                    "  {}: {:.2} s, cpu {:.2} s{}{}",
                    self.case,
                    s.secs,
                    s.cpu_secs,
                    s.wire
                        .map(|w| format!(", wire {:.1} MiB", w as f64 / MIB as f64))
                        .unwrap_or_default(),
                    if s.note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", s.note)
                    }
                );
                self.samples.push(s);
            }
            Err(e) => {
                eprintln!("  {}: FAILED: {e}", self.case);
                self.errors.push(e.lines().next().unwrap_or("").to_string());
            }
        }
    }

    fn secs(&self) -> f64 {
        median(self.samples.iter().map(|s| s.secs).collect())
    }
}

fn print_table(title: &str, rows: &[&Row], data: u64, size: u64) {
    println!("\n{title}");
    let ours = rows
        .iter()
        .find(|r| r.case.starts_with("ours"))
        .map(|r| r.secs());
    println!(
        "{:<30} {:>5} {:>9} {:>12} {:>12} {:>9} {:>11} {:>10}  all runs (s)",
        "case", "runs", "median s", "data MiB/s", "image MiB/s", "CPU s", "wire MiB", "ours/this"
    );
    for r in rows {
        if r.samples.is_empty() {
            println!(
                "{:<30} {:>5} FAILED: {}",
                r.case,
                0,
                r.errors.first().map(String::as_str).unwrap_or("")
            );
            continue;
        }
        let s = r.secs();
        let cpu = median(r.samples.iter().map(|x| x.cpu_secs).collect());
        let wires: Vec<f64> = r
            .samples
            .iter()
            .filter_map(|x| x.wire)
            .map(|w| w as f64 / MIB as f64)
            .collect();
        let wire = if wires.is_empty() {
            "n/a".to_string()
        } else {
            format!("{:.1}", median(wires))
        };
        let ratio = match ours {
            Some(o) if !o.is_nan() => format!("{:.2}", o / s),
            _ => "-".into(),
        };
        let all = r
            .samples
            .iter()
            .map(|x| format!("{:.2}", x.secs))
            .collect::<Vec<_>>()
            .join(" ");
        let data_rate = if data == 0 {
            "-".to_string()
        } else {
            format!("{:.1}", data as f64 / MIB as f64 / s)
        };
        println!(
            "{:<30} {:>5} {:>9.2} {:>12} {:>12.1} {:>9.2} {:>11} {:>10}  {all}{}",
            r.case,
            r.samples.len(),
            s,
            data_rate,
            size as f64 / MIB as f64 / s,
            cpu,
            wire,
            ratio,
            if r.errors.is_empty() {
                String::new()
            } else {
                format!(" ({} failed: {})", r.errors.len(), r.errors[0])
            }
        );
    }
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench_disk_sync: {e}");
            std::process::exit(2);
        }
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if o.ours {
        if let Err(why) = kvm_available() {
            println!("SKIP: bench_disk_sync: {why} - nothing was measured");
            return;
        }
        if !root {
            println!("SKIP: bench_disk_sync: needs root - nothing was measured");
            return;
        }
    }
    let qemu_ok = if o.qemu {
        qemu_version()
    } else {
        Err("--no-qemu".into())
    };
    let mut failed = false;
    if o.ours {
        // Build (or find) the binaries before anything is timed.
        if let Err(e) = vmm_binary().and_then(|_| test_guest()) {
            eprintln!("bench_disk_sync: {e}");
            std::process::exit(2);
        }
    }
    let dir = match TempDir::new("bench_disk_sync") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("bench_disk_sync: {e}");
            std::process::exit(2);
        }
    };
    let size = o.size_mib * MIB;
    let data_mib = o.size_mib * o.data_pct / 100;
    let image = dir.join("image.raw");
    let t = Instant::now();
    let alloc = match make_image(&image, o.size_mib, data_mib) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_disk_sync: {e}");
            drop(dir);
            std::process::exit(2);
        }
    };
    let data = data_mib * MIB;
    println!(
        "image: {} MiB raw, {data_mib} MiB of random data in 1 MiB runs at seeded places, the rest \
         holes ({:.1} MiB allocated; made in {:.1} s); copies start as blank sparse files; \
         loopback TCP",
        o.size_mib,
        alloc as f64 / MIB as f64,
        t.elapsed().as_secs_f64()
    );
    let vmm_path = vmm_binary()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!(
        "ours: {vmm_path}; test guest workload=hello exit=halt, 1 vCPU, 64 MiB, vCPU thread {}; \
         epochs 10 ms",
        if o.vcpu_idle {
            "in SCHED_IDLE"
        } else {
            "at normal priority"
        }
    );
    match &qemu_ok {
        Ok(v) => println!(
            "qemu: {v}; -machine none (no guest), blockdev-mirror sync=full (default \
             granularity and buffer) to nbd-server-add writable=true of a second QEMU"
        ),
        Err(e) => println!("qemu: not run ({e})"),
    }
    println!("{}", machine());

    let copy = dir.join("copy.raw");
    let mut port = o.port;
    let mut next_port = || {
        port = port.wrapping_add(1);
        port
    };
    let mut ours_row = Row::new("ours: enable-ft replicated");
    let mut qemu_row = Row::new("qemu: blockdev-mirror to NBD");
    for run in 1..=o.runs {
        eprintln!("run {run}/{}", o.runs);
        if o.ours {
            ours_row.push(ours(
                &o,
                &dir,
                &image,
                &copy,
                next_port(),
                &format!("o{run}"),
            ));
        }
        if qemu_ok.is_ok() {
            qemu_row.push(qemu(&dir, &image, &copy, &format!("q{run}")));
        }
    }
    failed |= !ours_row.errors.is_empty() || !qemu_row.errors.is_empty();
    let mut rows = Vec::new();
    if o.ours {
        rows.push(&ours_row);
    }
    if qemu_ok.is_ok() {
        rows.push(&qemu_row);
    }
    print_table(
        &format!(
            "initial sync of a {} MiB image with {data_mib} MiB of data (median of {} runs; \
             ours/this = ours' median time / this case's: below 1 means ours is faster)",
            o.size_mib, o.runs
        ),
        &rows,
        data,
        size,
    );

    if o.baseline {
        eprintln!("baseline: an image of holes only");
        let empty = dir.join("empty.raw");
        let mut ours_empty = Row::new("ours: enable-ft, empty image");
        let mut qemu_empty = Row::new("qemu: mirror, empty image");
        if let Err(e) = blank_image(&empty, size) {
            eprintln!("bench_disk_sync: {e}");
            drop(dir);
            std::process::exit(2);
        }
        if o.ours {
            ours_empty.push(ours(&o, &dir, &empty, &copy, next_port(), "oe"));
        }
        if qemu_ok.is_ok() {
            qemu_empty.push(qemu(&dir, &empty, &copy, "qe"));
        }
        failed |= !ours_empty.errors.is_empty() || !qemu_empty.errors.is_empty();
        let mut rows = Vec::new();
        if o.ours {
            rows.push(&ours_empty);
        }
        if qemu_ok.is_ok() {
            rows.push(&qemu_empty);
        }
        print_table(
            &format!(
                "baseline: the same {} MiB size, all holes (1 run each): fixed costs (ours: the \
                 guest's 64 MiB of memory, the protocol, the scan of holes)",
                o.size_mib
            ),
            &rows,
            0,
            size,
        );
    }
    println!(
        "\nCPU s: user+system time of both sides' processes during the timed span (ours: \
         primary VMM without its vCPU thread + backup VMM; qemu: source + target); wire: the \
         primary's ft-status bytes after enable-ft (n/a for QEMU)"
    );
    // exit() skips destructors: remove the images first.
    drop(dir);
    if failed {
        std::process::exit(1);
    }
}
