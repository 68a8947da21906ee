//! Fault injection against fault tolerance, with the guest's `workload=ft` under a combined
//! load (pages dirtied continuously, a disk record written per request, a client issuing
//! requests back to back over TCP from a third namespace).
//!
//! Invariants checked after every fault: the client's sequence continues with no gap and no
//! repeat (nothing acknowledged is lost, no output from a rolled-back state was seen), the
//! same TCP connection keeps working, exactly one copy runs, and at the end the guest's own
//! check of its memory pattern and of the disk against its sequence passes.
//!
//! `a_chain_of_random_kills...` runs `TANDEM_FT_KILLS` faults (default 50) from the schedule
//! seeded by `TANDEM_FT_SEED` (printed; default: the clock). For 1000:
//! `TANDEM_FT_KILLS=1000 cargo test -p integration --test ft_faults a_chain -- --nocapture`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::ft::{
    ft_status, receive_ft_args, start_witness, wait_for_event, wait_status, witness_addr, Load,
    Rng, SeqClient,
};
use integration::{
    api_vmm, ch_remote, guest_vm_args, kvm_serial_guard, report, require_kvm, require_netns,
    test_guest, two_hosts, NetNs, TempDir, TwoHosts, Vmm, HOST_A, HOST_B,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const GUEST_MAC: &str = "12:34:56:78:9a:bc";
const FT_PORT: u16 = 7100;

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
    fn ns(self, hosts: &TwoHosts) -> &NetNs {
        match self {
            Side::A => &hosts.a,
            Side::B => &hosts.b,
        }
    }
}

/// One VMM process and what the test planned for it.
struct Node {
    vmm: Vmm,
    socket: PathBuf,
    /// Its `--event-monitor` file.
    events: PathBuf,
    side: Side,
    /// `TANDEM_FT_CRASH` given to this process (it aborts there once it is a primary).
    crash: Option<String>,
}

struct Pair {
    hosts: TwoHosts,
    dir: TempDir,
    kernel: String,
    disk: String,
    image: String,
    started: u32,
}

impl Pair {
    fn new(tag: &str, disk_mib: usize) -> Self {
        let hosts = two_hosts(tag);
        let dir = TempDir::new(&format!("ft_{tag}")).expect("temp dir");
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![0u8; disk_mib << 20]).expect("image");
        let kernel = test_guest().expect("guest").display().to_string();
        let disk = format!("path={}", image.display());
        Self {
            hosts,
            dir,
            kernel,
            disk,
            image: image.display().to_string(),
            started: 0,
        }
    }

    /// `receive-ft URL` for the backup: the shared image, the TAP in host B's namespace, the
    /// witness (`disk`: another image for replicated mode; no witness where the primary has
    /// none).
    fn receive_ft(&self, url: &str, disk: Option<&str>, witness: bool) -> Vec<String> {
        let witness = witness.then(witness_addr);
        let image = disk.unwrap_or(&self.image);
        receive_ft_args(url, &[image], &["tapvm"], witness.as_deref())
    }

    fn spawn(&mut self, side: Side, crash: Option<String>, boot: Option<&[&str]>) -> Node {
        self.started += 1;
        let socket = self.dir.join(&format!("vmm{}.sock", self.started));
        let events = self.dir.join(&format!("vmm{}-events.json", self.started));
        let name = format!("ft_vmm{}_{side:?}", self.started);
        let mut args: Vec<String> = vec![
            "-v".into(),
            "--event-monitor".into(),
            format!("path={}", events.display()),
        ];
        if let Some(extra) = boot {
            args.extend(extra.iter().map(|s| s.to_string()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let vmm = match &crash {
            // api_vmm has no environment; build the crash-armed node by hand.
            Some(spec) => {
                let mut vmm = Vmm::builder(&name)
                    .wrapped_in(side.ns(&self.hosts).exec_prefix())
                    .env("TANDEM_FT_CRASH", spec)
                    .args(["--api-socket", socket.to_str().expect("path")])
                    .args(&args)
                    .spawn()
                    .expect("start a VMM");
                integration::wait_for_api_socket(&mut vmm, &socket, TIMEOUT);
                vmm
            }
            None => api_vmm(TIMEOUT, &name, side.ns(&self.hosts), &socket, &args),
        };
        Node {
            vmm,
            socket,
            events,
            side,
            crash,
        }
    }

    fn boot_primary(&mut self, cmdline: &str, memory: &str) -> Node {
        let net = format!("tap=tapvm,mac={GUEST_MAC}");
        let (kernel, disk) = (self.kernel.clone(), self.disk.clone());
        let boot = guest_vm_args(&kernel, cmdline, memory, &net, &["--disk", &disk]);
        let boot: Vec<&str> = boot.iter().map(String::as_str).collect();
        let mut node = self.spawn(Side::A, None, Some(&boot));
        node.vmm
            .wait_for("ft: ready", TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        node
    }
}

/// The common start: a pair with a witness in the client namespace, the guest booted with
/// `cmdline` (64 MiB) on host A, and a VMM on host B that is not yet its backup.
fn start(tag: &str, cmdline: &str) -> (Pair, Vmm, Node, Node) {
    let mut pair = Pair::new(tag, 8);
    let witness = start_witness(&pair.hosts.client);
    let primary = pair.boot_primary(cmdline, "size=64M");
    let backup = pair.spawn(Side::B, None, None);
    (pair, witness, primary, backup)
}

fn ok(out: std::process::Output, what: &str) -> Result<(), String> {
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// Protects `primary` with the backup listening at `peer` (shared disk, the witness, 10 ms
/// epochs, plus `extra` flags); returns when the initial synchronisation is over.
fn enable(primary: &Node, peer: &str, extra: &[&str]) -> Result<(), String> {
    let witness = witness_addr();
    let mut args = vec![
        "enable-ft",
        "--peer",
        peer,
        "--disk-mode",
        "shared",
        "--witness",
        &witness,
    ];
    args.extend_from_slice(extra);
    ok(ch_remote(&primary.socket, &args, None), "enable-ft")
}

/// Makes `backup` the hot backup of `primary` and waits until the primary is protected.
fn protect(pair: &Pair, primary: &Node, backup: &Node, extra: &[&str]) -> Result<(), String> {
    let url = format!("tcp:{}:{FT_PORT}", backup.side.addr());
    ok(
        ch_remote(
            &backup.socket,
            &args(&pair.receive_ft(&url, None, true)),
            None,
        ),
        "receive-ft",
    )?;
    let peer = format!("{}:{FT_PORT}", backup.side.addr());
    let mut args = vec!["--heartbeat-timeout-ms", "1000"];
    args.extend_from_slice(extra);
    enable(primary, &peer, &args)?;
    wait_status(&primary.socket, "health", &["protected"], TIMEOUT)?;
    Ok(())
}

fn args(owned: &[String]) -> Vec<&str> {
    owned.iter().map(String::as_str).collect()
}

fn diagnose(nodes: &[&Node], what: &str) -> String {
    nodes
        .iter()
        .map(|n| n.vmm.diagnose(what))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_chain_of_random_kills_loses_nothing_a_client_saw() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let kills: u32 = std::env::var("TANDEM_FT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut rng = Rng::from_env();
    // 1 MiB (256 pages) rewritten at 20000 pages/s: every page changes about once an epoch,
    // so the primary keeps them writable (hot pages) and finds changes by comparing; the
    // guest's own check after each failover catches any change that was not sent.
    let (mut pair, _witness, mut primary, mut backup) = start(
        "k",
        "workload=ft net.ip=192.168.249.2/24 ft.dirty_rate=20000 ft.dirty_mib=1",
    );
    protect(&pair, &primary, &backup, &[]).unwrap_or_else(|e| panic!("{e}"));
    let load = Load::start(SeqClient::connect(&pair.hosts.client).expect("client"));
    load.wait_progress(20, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    // The region is hot: the primary keeps it writable and finds its changes by comparing
    // (this host's KVM has manual dirty-log re-arming).
    let status = ft_status(&primary.socket);
    assert!(
        status["hot_page_hits"].as_u64().unwrap_or(0) > 0 && status["hot_pages"].as_u64() > Some(0),
        "no hot pages on a guest rewriting 256 pages every 12 ms: {status}"
    );
    report(&format!(
        "hot pages: {} kept, {} changes found by compare",
        status["hot_pages"], status["hot_page_hits"]
    ));

    let mut failovers = Vec::new();
    let mut kinds = std::collections::BTreeMap::<String, u32>::new();
    for round in 0..kills {
        let kill_backup = primary.crash.is_none() && rng.below(10) < 3;
        let kind;
        if kill_backup {
            kind = "kill -9 backup".to_string();
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            backup.vmm.kill();
            wait_status(&primary.socket, "health", &["degraded"], TIMEOUT).unwrap_or_else(|e| {
                panic!(
                    "round {round}: {e}\n{}",
                    diagnose(&[&primary], "after killing the backup")
                )
            });
        } else {
            let killed = if let Some(spec) = &primary.crash {
                kind = format!("crash at {}", spec.split(':').next().unwrap_or(spec));
                primary
                    .vmm
                    .wait_exit(TIMEOUT)
                    .unwrap_or_else(|e| panic!("round {round}: armed crash never came: {e}"));
                Instant::now()
            } else {
                kind = "kill -9 primary".to_string();
                std::thread::sleep(Duration::from_millis(rng.below(400)));
                primary.vmm.kill();
                Instant::now()
            };
            let status = wait_status(&backup.socket, "health", &["took_over", "failed"], TIMEOUT)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(
                status["health"],
                "took_over",
                "round {round} ({kind}): {status}\n{}",
                diagnose(&[&backup], "backup")
            );
            load.wait_progress(3, TIMEOUT).unwrap_or_else(|e| {
                panic!(
                    "round {round} ({kind}): {e}\n{}",
                    diagnose(&[&backup], "after the failover")
                )
            });
            failovers.push((killed.elapsed(), status["last_failover_ms"].as_u64()));
            primary = backup;
        }
        *kinds.entry(kind.clone()).or_default() += 1;
        // A new backup on the other host; some are armed to crash once they are primaries.
        let crash = match rng.below(10) {
            0 => Some(format!("pause:{}", 3 + rng.below(30))),
            1 => Some(format!("transfer:{}", 3 + rng.below(30))),
            2 => Some(format!("release:{}", 3 + rng.below(30))),
            _ => None,
        };
        backup = pair.spawn(primary.side.other(), crash, None);
        // Half the sessions end epochs early while output waits; a third encode each epoch
        // on two threads beside the sender, a third send its pages on two data streams
        // beside the first connection (each its own TLS session), and the rest stage each
        // pause without the helper thread.
        let mut extra: Vec<&str> = Vec::new();
        if rng.below(2) == 0 {
            extra.push("--latency-mode");
        }
        match round % 3 {
            0 => extra.extend(["--encode-threads", "2"]),
            1 => extra.extend(["--streams", "3"]),
            _ => extra.push("--no-stage-helper"),
        }
        protect(&pair, &primary, &backup, &extra).unwrap_or_else(|e| {
            panic!(
                "round {round}: {e}\n{}",
                diagnose(&[&primary, &backup], "re-protect")
            )
        });
        load.wait_progress(5, TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "round {round} ({kind}): {e}\n{}",
                diagnose(&[&primary, &backup], "load")
            )
        });
    }
    let mut client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let check = client.command("check").expect("check");
    assert!(check.starts_with("ok "), "guest self-check: {check}");
    let mut ms: Vec<u64> = failovers.iter().filter_map(|f| f.1).collect();
    ms.sort_unstable();
    report(&format!(
        "ft faults: {kills} faults {kinds:?}; client seq reached {} with no gap or repeat; guest {check}; takeover ms (detection->running) median {} max {}",
        client.last,
        ms.get(ms.len() / 2).copied().unwrap_or(0),
        ms.last().copied().unwrap_or(0)
    ));
}

fn tc(ns: &NetNs, args: &[&str]) {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns.name(), "tc"]).args(args);
    let out = cmd.output().expect("tc");
    assert!(
        out.status.success(),
        "tc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_cut_replication_link_leaves_exactly_one_copy_running() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let (pair, _witness, primary, backup) = start(
        "p",
        "workload=ft net.ip=192.168.249.2/24 ft.dirty_rate=1000",
    );
    protect(&pair, &primary, &backup, &[]).unwrap_or_else(|e| panic!("{e}"));
    let load = Load::start(SeqClient::connect(&pair.hosts.client).expect("client"));
    load.wait_progress(20, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    // Partition: the hosts no longer reach each other, both still reach the witness.
    pair.hosts
        .a
        .ip(&["link", "set", "hlinka", "down"])
        .expect("cut the link");
    let p = wait_status(&primary.socket, "health", &["degraded", "fenced"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let b = wait_status(&backup.socket, "health", &["took_over", "failed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let primary_runs = p["health"] == "degraded";
    let backup_runs = b["health"] == "took_over";
    assert!(
        primary_runs != backup_runs,
        "exactly one copy must run: primary {p}, backup {b}"
    );
    // Each side's event monitor tells its operator which way it went, once.
    let (primary_event, backup_event) = if primary_runs {
        ("ft-degraded", "ft-failed")
    } else {
        ("ft-fenced", "ft-failover")
    };
    for (node, event) in [(&primary, primary_event), (&backup, backup_event)] {
        let events = wait_for_event(&node.events, event, TIMEOUT);
        let count = events.iter().filter(|(e, _)| e == event).count();
        assert_eq!(count, 1, "{event} reported {count} times: {events:?}");
    }
    load.wait_progress(20, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&primary, &backup], "partition")));
    // The losing side cannot be booted into a second copy of the VM: a fenced primary keeps
    // its configuration but refuses `boot` (the backup owns the VM and its disks now); a
    // backup that did not take over has no VM at all.
    let loser = if primary_runs { &backup } else { &primary };
    let boot = ch_remote(&loser.socket, &["boot"], None);
    let said = String::from_utf8_lossy(&boot.stderr).to_string();
    assert!(
        !boot.status.success(),
        "the losing side booted a second copy of the VM"
    );
    if !primary_runs {
        assert!(said.contains("fenced"), "boot of a fenced primary: {said}");
    }
    let mut client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let check = client.command("check").expect("check");
    assert!(check.starts_with("ok "), "guest self-check: {check}");
    report(&format!(
        "ft partition: {} runs on, the other is {}; client seq {} consistent; {check}",
        if primary_runs { "primary" } else { "backup" },
        if primary_runs {
            &b["health"]
        } else {
            &p["health"]
        },
        client.last
    ));
}

#[test]
fn a_killed_backup_degrades_the_primary_and_says_so_once() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let (pair, _witness, primary, mut backup) = start(
        "d",
        "workload=ft net.ip=192.168.249.2/24 ft.dirty_rate=1000",
    );
    protect(&pair, &primary, &backup, &[]).unwrap_or_else(|e| panic!("{e}"));
    let load = Load::start(SeqClient::connect(&pair.hosts.client).expect("client"));
    load.wait_progress(20, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    backup.vmm.kill();
    wait_status(&primary.socket, "health", &["degraded"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&primary], "after killing the backup")));
    // The primary runs on, unprotected, for many control-loop polls: one event, not one per
    // poll.
    load.wait_progress(50, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&primary], "degraded")));
    std::thread::sleep(Duration::from_secs(1));
    let events = wait_for_event(&primary.events, "ft-degraded", TIMEOUT);
    let count = events.iter().filter(|(e, _)| e == "ft-degraded").count();
    assert_eq!(count, 1, "ft-degraded reported {count} times: {events:?}");
    let status = ft_status(&primary.socket);
    assert_eq!(status["health"], "degraded", "{status}");
    let mut client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let check = client.command("check").expect("check");
    assert!(check.starts_with("ok "), "guest self-check: {check}");
}

#[test]
fn a_slow_link_keeps_protection_and_a_failover_still_loses_nothing() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let (pair, _witness, mut primary, backup) = start(
        "s",
        "workload=ft net.ip=192.168.249.2/24 ft.dirty_rate=2000",
    );
    // The kernel here has no netem: a proxy delays the replication link by 20 ms each way.
    let url = format!("tcp:{HOST_B}:{FT_PORT}");
    ok(
        ch_remote(
            &backup.socket,
            &args(&pair.receive_ft(&url, None, true)),
            None,
        ),
        "receive-ft",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    proxy(
        &pair.hosts.b,
        format!("{HOST_B}:7101"),
        format!("{HOST_B}:{FT_PORT}"),
        Duration::from_millis(20),
        None,
    );
    // LZ4 is for such links (off by default): the failover below restores compressed epochs.
    // The heartbeat timeout is what the runbook asks for on a link slower than a LAN: above one
    // TCP retransmission timeout (200 ms at least) plus a round trip. With the default (100 ms
    // here) a segment the token bucket drops at the tail of an epoch silences the link for
    // longer than that, and protection drops although both sides are alive.
    enable(
        &primary,
        &format!("{HOST_B}:7101"),
        &["--compress", "--heartbeat-timeout-ms", "300"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // A rate limit on the host link as well (tbf; the kernel has no netem).
    tc(
        &pair.hosts.b,
        &[
            "qdisc", "add", "dev", "hlinkb", "root", "tbf", "rate", "200mbit", "burst", "64kb",
            "latency", "100ms",
        ],
    );
    let load = Load::start(SeqClient::connect(&pair.hosts.client).expect("client"));
    let t = Instant::now();
    let before = load.seq.load(std::sync::atomic::Ordering::SeqCst);
    load.wait_progress(30, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let per_req =
        t.elapsed() / (load.seq.load(std::sync::atomic::Ordering::SeqCst) - before).max(1) as u32;
    let status = wait_status(&primary.socket, "health", &["protected"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    primary.vmm.kill();
    wait_status(&backup.socket, "health", &["took_over"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&backup], "slow link failover")));
    load.wait_progress(20, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&backup], "after the failover")));
    let mut client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let check = client.command("check").expect("check");
    assert!(check.starts_with("ok "), "guest self-check: {check}");
    report(&format!(
        "ft slow link (20 ms each way, 200 mbit): {per_req:?} per request while protected (lag {} epochs, {} cut early); failover consistent, seq {}; {check}",
        status["lag_epochs"], status["epochs_cut_early"], client.last
    ));
}

/// Copies `from` to `to`, each chunk `delay` after it arrived, flipping the byte at offset
/// `corrupt_at` of the stream if given.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    delay: Duration,
    corrupt_at: Option<usize>,
) {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
    let mut seen = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(at) = corrupt_at {
            if seen <= at && at < seen + n {
                buf[at - seen] ^= 0x5a;
            }
        }
        seen += n;
        if tx
            .send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// A TCP proxy inside `ns` for the replication link: one connection from `listen` to
/// `target`, each direction delayed by `delay`, optionally corrupting one byte of the
/// primary's stream.
fn proxy(ns: &NetNs, listen: String, target: String, delay: Duration, corrupt_at: Option<usize>) {
    let _ = ns.run(move || {
        let listener = std::net::TcpListener::bind(&listen).expect("proxy bind");
        std::thread::spawn(move || {
            let Ok((from, _)) = listener.accept() else {
                return;
            };
            let Ok(to) = std::net::TcpStream::connect(&target) else {
                return;
            };
            let _ = (from.set_nodelay(true), to.set_nodelay(true));
            let (Ok(back_from), Ok(back_to)) = (to.try_clone(), from.try_clone()) else {
                return;
            };
            std::thread::spawn(move || pump(back_from, back_to, delay, None));
            pump(from, to, delay, corrupt_at);
        });
    });
}

#[test]
fn a_corrupt_stream_makes_the_backup_give_up_without_taking_over() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let (pair, _witness, primary, backup) = start(
        "c",
        "workload=ft net.ip=192.168.249.2/24 ft.dirty_rate=1000",
    );
    let url = format!("tcp:{HOST_B}:{FT_PORT}");
    ok(
        ch_remote(
            &backup.socket,
            &args(&pair.receive_ft(&url, None, true)),
            None,
        ),
        "receive-ft",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // 70 MB in: past the initial copy of 64 MiB, inside the epochs.
    proxy(
        &pair.hosts.b,
        format!("{HOST_B}:7101"),
        format!("{HOST_B}:{FT_PORT}"),
        Duration::ZERO,
        Some(70_000_000),
    );
    let load = Load::start(SeqClient::connect(&pair.hosts.client).expect("client"));
    enable(&primary, &format!("{HOST_B}:7101"), &[]).unwrap_or_else(|e| panic!("{e}"));
    let b = wait_status(&backup.socket, "health", &["failed", "took_over"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b["health"], "failed", "{b}");
    let p = wait_status(&primary.socket, "health", &["degraded"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    load.wait_progress(20, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let check = client.command("check").expect("check");
    assert!(check.starts_with("ok "), "{check}");
    report(&format!(
        "ft corrupt stream: backup gave up ({}), primary runs on ({}); seq {} consistent",
        b["last_error"], p["last_error"], client.last
    ));
}

#[test]
fn replicated_disks_fail_over_with_the_backup_image_consistent() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let mut pair = Pair::new("r", 8);
    let primary_image = pair.dir.join("disk.img");
    let backup_image: PathBuf = pair.dir.join("backup.img");
    std::fs::copy(&primary_image, &backup_image).expect("copy the image");
    let mut primary = pair.boot_primary(
        "workload=ft net.ip=192.168.249.2/24 ft.dirty_rate=1000",
        "size=64M",
    );
    let backup = pair.spawn(Side::B, None, None);
    let url = format!("tcp:{HOST_B}:{FT_PORT}");
    let backup_disk = backup_image.display().to_string();
    ok(
        ch_remote(
            &backup.socket,
            &args(&pair.receive_ft(&url, Some(&backup_disk), false)),
            None,
        ),
        "receive-ft",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let peer = format!("{HOST_B}:{FT_PORT}");
    ok(
        ch_remote(&primary.socket, &["enable-ft", "--peer", &peer], None),
        "enable-ft",
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nbackup: {}",
            integration::ft::ft_status(&backup.socket)
        )
    });
    let load = Load::start(SeqClient::connect(&pair.hosts.client).expect("client"));
    load.wait_progress(200, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    primary.vmm.kill();
    wait_status(&backup.socket, "health", &["took_over"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&backup], "replicated failover")));
    load.wait_progress(50, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    // The guest checks its records against the backup's own image now.
    let check = client.command("check").expect("check");
    assert!(check.starts_with("ok "), "{check}");
    assert!(check.contains("disk=1"), "{check}");
    report(&format!(
        "ft replicated disks: failover onto the backup's own image, seq {}; {check}",
        client.last
    ));
    let _ = Path::new(&backup_disk);
}

/// How many times the console holds `marker`.
fn occurrences(vmm: &Vmm, marker: &str) -> usize {
    vmm.console().matches(marker).count()
}

#[test]
fn a_guest_reset_is_protected_again_and_still_fails_over() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    // `poweroff` ends the workload; `exit=reset` makes that a reset (a reboot of the VM).
    let (pair, _witness, primary, backup) = start(
        "rs",
        "workload=ft net.ip=192.168.249.2/24 ft.dirty_rate=500 ft.dirty_mib=4 exit=reset",
    );
    protect(&pair, &primary, &backup, &[]).unwrap_or_else(|e| panic!("{e}"));
    let first = wait_status(&backup.socket, "health", &["protected"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut client = SeqClient::connect(&pair.hosts.client).expect("client");
    for _ in 0..5 {
        client.req().unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(client.command("poweroff").as_deref(), Ok("bye"));
    drop(client);

    // The VM reboots; the primary protects it again and the backup follows.
    let deadline = Instant::now() + TIMEOUT;
    while occurrences(&primary.vmm, "ft: ready") < 2 {
        assert!(
            Instant::now() < deadline,
            "{}",
            diagnose(&[&primary], "the guest did not come back after its reset")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let p = integration::ft::ft_status(&primary.socket);
        let b = integration::ft::ft_status(&backup.socket);
        // A new session: the backup's epochs start again from the rebooted VM's sync.
        if p["health"] == "protected" && b["health"] == "protected" && b["bytes"] != first["bytes"]
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not protected again after the reset: primary {p}\nbackup {b}\n{}",
            diagnose(&[&primary, &backup], "re-protect")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let load = Load::start(SeqClient::connect(&pair.hosts.client).expect("client"));
    load.wait_progress(20, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut primary = primary;
    primary.vmm.kill();
    let status = wait_status(&backup.socket, "health", &["took_over", "failed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status["health"],
        "took_over",
        "{status}\n{}",
        diagnose(&[&backup], "backup")
    );
    load.wait_progress(20, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&backup], "after the failover")));
    let mut client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let check = client.command("check").expect("check");
    assert!(check.starts_with("ok "), "guest self-check: {check}");
    report(&format!(
        "ft reset: the guest reset while protected, was protected again after its reboot, and failed over; the rebooted guest's seq reached {} with no gap or repeat",
        client.last
    ));
}

/// A client streaming pseudo-random bytes to the guest's sink (TCP 7001) from its own thread,
/// hashing what it sends as the sink does (FNV-1a 64).
struct Streamer {
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<(std::net::TcpStream, u64, u64), String>>,
}

impl Streamer {
    fn start(client: &NetNs, addr: &str, seed: u64) -> Self {
        use std::io::Write;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let addr: std::net::SocketAddr = addr.parse().expect("address");
        let mut stream = client
            .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
            .expect("namespace thread")
            .expect("connect to the sink");
        // A failover stalls the stream for far less; a lost byte stalls it for good.
        stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopping) = (sent.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut state = seed | 1;
            let mut fnv = 0xcbf2_9ce4_8422_2325u64;
            let mut chunk = vec![0u8; 16 << 10];
            let mut total = 0u64;
            while !stopping.load(Ordering::SeqCst) {
                for word in chunk.chunks_exact_mut(8) {
                    // xorshift64
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    word.copy_from_slice(&state.to_le_bytes());
                }
                stream
                    .write_all(&chunk)
                    .map_err(|e| format!("sending after {total} bytes: {e}"))?;
                for &b in &chunk {
                    fnv = (fnv ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
                }
                total += chunk.len() as u64;
                counter.store(total, Ordering::SeqCst);
            }
            Ok((stream, total, fnv))
        });
        Self { sent, stop, thread }
    }

    /// Waits until `more` bytes beyond now were sent.
    fn wait_sent(&self, more: u64, timeout: Duration) -> Result<u64, String> {
        use std::sync::atomic::Ordering;
        let target = self.sent.load(Ordering::SeqCst) + more;
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.sent.load(Ordering::SeqCst);
            if now >= target {
                return Ok(now);
            }
            if self.thread.is_finished() || Instant::now() >= deadline {
                return Err(format!(
                    "the stream stalled at {now} bytes (waiting for {target})"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops sending, half-closes and returns what was sent (bytes, hash) and the sink's reply.
    fn finish(self) -> Result<(u64, u64, String), String> {
        use std::io::Read;
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (mut stream, total, fnv) = self
            .thread
            .join()
            .map_err(|_| "the streaming thread panicked".to_string())??;
        stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("half-close: {e}"))?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .map_err(|e| format!("the sink's reply: {e}"))?;
        Ok((total, fnv, reply.trim().to_string()))
    }
}

/// TCP at full speed: while a client streams to the guest's sink, the guest's pure ACKs leave
/// as soon as the backup holds the input they acknowledge, before their epoch commits. The
/// primary is killed at a random point of the stream, three times (the roles swap each time):
/// the client has then been told about bytes the resumed epoch never received, and the backup
/// must deliver them to the guest again. The sink's count and hash of what it received must be
/// exactly what the client sent (a lost byte stalls the stream for good: the client never
/// resends what was acknowledged).
#[test]
fn a_stream_acknowledged_early_survives_kills_of_the_primary() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let mut rng = Rng::from_env();
    let (mut pair, _witness, mut primary, mut backup) = start(
        "t",
        "workload=ft net.ip=192.168.249.2/24 ft.dirty_rate=1000",
    );
    protect(&pair, &primary, &backup, &[]).unwrap_or_else(|e| panic!("{e}"));
    let streamer = Streamer::start(&pair.hosts.client, "192.168.249.2:7001", rng.next_u64());
    let mut replayed = Vec::new();
    // Receive buffers written again before the pause are sent there, not early: a page the
    // pause fails to send would show in the sink's hash after the failover.
    let mut held_for_pause = Vec::new();
    for round in 0..3 {
        streamer
            .wait_sent((1 + rng.below(4)) << 20, TIMEOUT)
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", diagnose(&[&primary], "stream")));
        let status = ft_status(&primary.socket);
        assert!(
            status["acks_released_early"].as_u64() > Some(0)
                && status["input_frames_mirrored"].as_u64() > Some(0),
            "round {round}: no early ACKs while a client streams to the guest: {status}"
        );
        // Each frame waits at least the replication link's round trip for the backup.
        let mirror_us = |key: &str| status[key].as_u64().unwrap_or(0);
        assert!(
            0 < mirror_us("input_mirror_us_p50")
                && mirror_us("input_mirror_us_p50") <= mirror_us("input_mirror_us_p99"),
            "round {round}: input waits for the backup not reported: {status}"
        );
        std::thread::sleep(Duration::from_millis(rng.below(200)));
        held_for_pause.push(
            ft_status(&primary.socket)["pages_held_for_pause"]
                .as_u64()
                .unwrap_or(0),
        );
        primary.vmm.kill();
        let status = wait_status(&backup.socket, "health", &["took_over", "failed"], TIMEOUT)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(
            status["health"],
            "took_over",
            "round {round}: {status}\n{}",
            diagnose(&[&backup], "backup")
        );
        replayed.push(status["input_frames_replayed"].as_u64().unwrap_or(0));
        // The same connection goes on against the survivor.
        streamer.wait_sent(1 << 20, TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "round {round}: after the failover {e}\n{}",
                diagnose(&[&backup], "after the failover")
            )
        });
        primary = backup;
        backup = pair.spawn(primary.side.other(), None, None);
        protect(&pair, &primary, &backup, &[]).unwrap_or_else(|e| {
            panic!(
                "round {round}: {e}\n{}",
                diagnose(&[&primary, &backup], "re-protect")
            )
        });
    }
    let (sent, fnv, reply) = streamer
        .finish()
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&primary], "finish")));
    assert_eq!(
        reply,
        format!("got {sent} fnv {fnv:016x}"),
        "the sink did not receive exactly the stream (input frames re-delivered after each failover: {replayed:?})"
    );
    let check = SeqClient::connect(&pair.hosts.client)
        .and_then(|mut c| c.command("check"))
        .expect("check");
    assert!(check.starts_with("ok "), "guest self-check: {check}");
    report(&format!(
        "early ACKs: {sent} bytes streamed across 3 kills of the primary, received exactly (FNV {fnv:016x}); input frames delivered again per failover: {replayed:?}; pages held for the pause per primary: {held_for_pause:?}"
    ));
}

/// Output commit holds the guest's reply to a request until the backup holds the reply's
/// epoch. The primary is made to die right then (`release`: the backup's Ack arrived, nothing
/// released yet), so the reply never leaves it while the guest the backup restores counts it
/// as sent. The backup must send the epoch's held output itself at the takeover: the reply
/// reaches the client at once, not at the guest's retransmission timeout (a second for the
/// test guest's TCP stack), and exactly once in the client's sequence.
#[test]
fn a_reply_held_when_the_primary_dies_reaches_the_client_from_the_backup() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    const EPOCH_MS: u64 = 500;
    // A fresh VM's initial synchronisation is epoch 1, so protected epoch N is epoch N + 2.
    const CRASH_AFTER: u64 = 8;
    let target = CRASH_AFTER + 2;
    let mut pair = Pair::new("h", 8);
    let _witness = start_witness(&pair.hosts.client);
    let net = format!("tap=tapvm,mac={GUEST_MAC}");
    let (kernel, disk) = (pair.kernel.clone(), pair.disk.clone());
    let boot = guest_vm_args(
        &kernel,
        "workload=ft net.ip=192.168.249.2/24",
        "size=64M",
        &net,
        &["--disk", &disk],
    );
    let boot: Vec<&str> = boot.iter().map(String::as_str).collect();
    let crash = format!("release:{CRASH_AFTER}");
    let mut primary = pair.spawn(Side::A, Some(crash), Some(&boot));
    primary
        .vmm
        .wait_for("ft: ready", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let backup = pair.spawn(Side::B, None, None);
    let epoch_ms = EPOCH_MS.to_string();
    protect(&pair, &primary, &backup, &["--epoch-ms", &epoch_ms]).unwrap_or_else(|e| panic!("{e}"));
    let mut client = SeqClient::connect(&pair.hosts.client).expect("client");
    let first = client.req().expect("a request before the crash");
    // The request goes out as the target epoch begins, so the reply is produced and held in it.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let epoch = ft_status(&primary.socket)["epoch"].as_u64().unwrap_or(0);
        assert!(
            epoch <= target,
            "epoch {epoch} is past the armed crash at epoch {target}: {}",
            diagnose(&[&primary], "waiting for the epoch")
        );
        if epoch == target {
            break;
        }
        assert!(Instant::now() < deadline, "epoch {target} never began");
        std::thread::sleep(Duration::from_millis(2));
    }
    let asked = Instant::now();
    let request = std::thread::spawn(move || {
        let seq = client.req();
        (seq, Instant::now())
    });
    primary
        .vmm
        .wait_exit(TIMEOUT)
        .unwrap_or_else(|e| panic!("the armed crash never came: {e}"));
    let (seq, answered) = request.join().expect("client thread");
    let seq = seq.unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&backup], "the request")));
    assert_eq!(seq, first + 1, "the reply's place in the client's sequence");
    let status = wait_status(&backup.socket, "health", &["took_over", "failed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status["health"], "took_over", "{status}");
    assert_eq!(
        status["epoch"].as_u64(),
        Some(target),
        "the backup resumed another epoch than the one holding the reply: {status}"
    );
    assert!(
        status["output_frames_resent"].as_u64() > Some(0),
        "the backup sent no held output again: {status}"
    );
    // The reply waited for its epoch to end (the primary died then); the takeover takes
    // milliseconds more, the guest's own retransmission would take a second.
    let waited = answered.duration_since(asked);
    assert!(
        waited < Duration::from_millis(EPOCH_MS + 300),
        "the reply came {waited:?} after the request, in an epoch of {EPOCH_MS} ms: {status}"
    );
    report(&format!(
        "held reply: answered {} ms after the request, in an epoch of {EPOCH_MS} ms whose end the primary did not survive ({} held frames sent again by the backup, takeover {} ms)",
        waited.as_millis(),
        status["output_frames_resent"],
        status["last_failover_ms"]
    ));
}
