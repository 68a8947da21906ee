//! Guest RAM backed as Cloud Hypervisor backs it on request: `--memory shared=on` (a memfd mapped
//! shared, which a vhost-user backend can map too) and `hugepages=on` (hugetlbfs pages). The test
//! guest rewrites and checksums its memory on each backing, through snapshot/restore and a live
//! migration; hosts without free huge pages get a clear error, never a SIGBUS.
//!
//! Tests that need huge pages reserve them in the kernel's 2 MiB pool (root only) and give the
//! pool back afterwards; where the kernel cannot give them the test says SKIP loudly.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use integration::ft::wait_status;
use integration::{
    api_request, ch_remote, ch_remote_binary, kvm_serial_guard, marker_fields, report, require_kvm,
    skip_or_fail, test_guest, wait_for_api_socket, FileLock, TempDir, Vmm, GUEST_DONE, GUEST_READY,
};

const TIMEOUT: Duration = Duration::from_secs(90);
const MIB: u64 = 1 << 20;
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const POOL_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// The tests of this binary that change the huge page pool take turns.
static POOL_LOCK: Mutex<()> = Mutex::new(());

fn read_number(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0)
}

/// 2 MiB pages free for new mappings (free minus those promised to existing mappings).
fn available_2m() -> u64 {
    read_number(&format!("{POOL_2M}/free_hugepages"))
        .saturating_sub(read_number(&format!("{POOL_2M}/resv_hugepages")))
}

/// The 2 MiB pool changed for one test; its old size comes back on drop.
struct HugepagePool {
    old: u64,
    _lock: std::sync::MutexGuard<'static, ()>,
    _host_lock: FileLock,
}

impl HugepagePool {
    fn take_turn() -> (std::sync::MutexGuard<'static, ()>, FileLock) {
        let lock = POOL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let host = FileLock::acquire("hugepages.lock").expect("take the huge page pool lock");
        (lock, host)
    }

    fn set(pages: u64) -> std::io::Result<()> {
        std::fs::write(NR_HUGEPAGES, format!("{pages}\n"))
    }

    /// Grows the pool by `pages` free pages; None (after a loud SKIP) when it cannot.
    fn reserve(test: &str, pages: u64) -> Option<Self> {
        let (lock, host) = Self::take_turn();
        let old = read_number(NR_HUGEPAGES);
        let pool = Self {
            old,
            _lock: lock,
            _host_lock: host,
        };
        if let Err(e) = Self::set(old + pages) {
            skip_or_fail(
                test,
                &format!("cannot write {NR_HUGEPAGES} ({e}; needs root)"),
            );
            return None;
        }
        let free = available_2m();
        if free < pages {
            skip_or_fail(
                test,
                &format!("the kernel gave only {free} of {pages} free 2 MiB huge pages"),
            );
            return None;
        }
        Some(pool)
    }

    /// Shrinks the pool so that no 2 MiB page is free; None (after a loud SKIP) when it cannot.
    fn exhaust(test: &str) -> Option<Self> {
        let (lock, host) = Self::take_turn();
        let old = read_number(NR_HUGEPAGES);
        let pool = Self {
            old,
            _lock: lock,
            _host_lock: host,
        };
        if read_number(&format!("{POOL_2M}/nr_overcommit_hugepages")) > 0 {
            skip_or_fail(test, "huge page overcommit is on: the pool cannot run dry");
            return None;
        }
        let free = read_number(&format!("{POOL_2M}/free_hugepages"));
        if free > 0 {
            if let Err(e) = Self::set(old.saturating_sub(free)) {
                skip_or_fail(
                    test,
                    &format!("cannot write {NR_HUGEPAGES} ({e}; needs root)"),
                );
                return None;
            }
        }
        if available_2m() > 0 {
            skip_or_fail(test, "the 2 MiB huge page pool would not run dry");
            return None;
        }
        Some(pool)
    }
}

impl Drop for HugepagePool {
    fn drop(&mut self) {
        if let Err(e) = Self::set(self.old) {
            report(&format!(
                "memory_backing: cannot restore {NR_HUGEPAGES} to {}: {e}",
                self.old
            ));
        }
    }
}

/// Bytes of the VMM's address space mapped shared from guest RAM's memfds.
fn shared_guest_ram_bytes(pid: u32) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter(|l| l.contains("/memfd:guest-ram"))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            if !perms.starts_with("rw") || !perms.ends_with('s') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            Some(end - start)
        })
        .sum()
}

/// `vm.info`'s `config.memory`.
fn memory_info(socket: &Path) -> serde_json::Value {
    let (status, body) =
        api_request(socket, "GET", "vm.info", None, TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("vm.info JSON");
    info["config"]["memory"].clone()
}

fn dirty_guest(name: &str, memory: &str, socket: &Path, cmdline: &str) -> Vmm {
    let guest = test_guest().expect("build the test guest");
    let mut vmm = Vmm::builder(name)
        .kernel(&guest)
        .cmdline(cmdline)
        .args(["--memory", memory])
        .serial_tty()
        .args(["--api-socket", socket.to_str().expect("path")])
        .spawn()
        .expect("start the VMM");
    wait_for_api_socket(&mut vmm, socket, TIMEOUT);
    vmm
}

fn expect_verified(vmm: &mut Vmm, what: &str) -> String {
    let result = vmm
        .wait_for("DIRTY result", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        marker_fields(&result.line)
            .get("verify")
            .map(String::as_str),
        Some("ok"),
        "{what}: {}",
        result.line
    );
    result.line.trim().to_string()
}

fn expect_clean_exit(vmm: &mut Vmm) {
    vmm.wait_for(GUEST_DONE, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = vmm.wait_exit(TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(0), "{}", vmm.diagnose("exit code"));
    assert!(!vmm.stderr().contains("panicked"), "{}", vmm.stderr());
}

fn ok(vmm: &Vmm, socket: &Path, args: &[&str]) {
    let out = ch_remote(socket, args, None);
    assert!(
        out.status.success(),
        "{}",
        vmm.diagnose(&format!(
            "ch-remote {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    );
}

#[test]
fn shared_memory_guest_verifies_its_memory_in_a_shared_memfd() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("mem_shared").expect("temp dir");
    let socket = dir.join("api.sock");
    let mut vmm = dirty_guest(
        "mem_shared",
        "size=256M,shared=on",
        &socket,
        "workload=dirty dirty.mib=32 dirty.rate=50 dirty.ms=1000",
    );
    vmm.wait_for(GUEST_READY, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        shared_guest_ram_bytes(vmm.pid()),
        256 * MIB,
        "{}",
        vmm.diagnose("guest RAM is not one shared memfd mapping")
    );
    let memory = memory_info(&socket);
    assert_eq!(memory["shared"], true, "{memory}");
    assert_eq!(memory["hugepages"], false, "{memory}");
    let line = expect_verified(&mut vmm, "shared memory");
    expect_clean_exit(&mut vmm);
    report(&format!("memory_backing: shared=on: {line}"));
}

#[test]
fn hugepage_guest_verifies_its_memory_on_2mib_pages() {
    require_kvm!();
    let test = "hugepage_guest_verifies_its_memory_on_2mib_pages";
    let _boot = kvm_serial_guard();
    // 128 pages for 256 MiB, and some room for anything else that maps a few.
    let Some(_pool) = HugepagePool::reserve(test, 128 + 16) else {
        return;
    };
    let before = available_2m();
    let dir = TempDir::new("mem_huge").expect("temp dir");
    let socket = dir.join("api.sock");
    // Without hugepage_size: the host's default (2 MiB on x86_64).
    let mut vmm = dirty_guest(
        "mem_huge",
        "size=256M,hugepages=on",
        &socket,
        "workload=dirty dirty.mib=32 dirty.rate=50 dirty.ms=1000",
    );
    vmm.wait_for(GUEST_READY, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    // The mapping reserved every page when it was made.
    let taken = before - available_2m();
    assert!(
        taken >= 128,
        "{}",
        vmm.diagnose(&format!("only {taken} huge pages were taken for 256 MiB"))
    );
    assert_eq!(shared_guest_ram_bytes(vmm.pid()), 256 * MIB);
    let memory = memory_info(&socket);
    assert_eq!(memory["hugepages"], true, "{memory}");
    assert_eq!(memory["hugepage_size"], serde_json::Value::Null, "{memory}");
    let line = expect_verified(&mut vmm, "hugepage memory");
    expect_clean_exit(&mut vmm);
    assert_eq!(
        available_2m(),
        before,
        "the pages come back when the VMM exits"
    );
    report(&format!(
        "memory_backing: hugepages=on took {taken} pages of 2 MiB: {line}"
    ));
}

#[test]
fn explicit_hugepage_size_is_echoed_by_vm_info() {
    require_kvm!();
    let test = "explicit_hugepage_size_is_echoed_by_vm_info";
    let Some(_pool) = HugepagePool::reserve(test, 64 + 16) else {
        return;
    };
    let dir = TempDir::new("mem_huge_info").expect("temp dir");
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::builder("mem_huge_info")
        .args(["--api-socket", socket.to_str().expect("path")])
        .spawn()
        .expect("start the VMM");
    wait_for_api_socket(&mut vmm, &socket, TIMEOUT);
    let guest = test_guest().expect("guest");
    let body = serde_json::json!({
        "payload": {"kernel": guest, "cmdline": "workload=hello"},
        "memory": {"size": 128 * MIB, "shared": true, "hugepages": true,
                   "hugepage_size": 2 * MIB},
        "serial": {"mode": "Null"},
        "console": {"mode": "Off"}
    })
    .to_string();
    let (status, answer) = api_request(&socket, "PUT", "vm.create", Some(&body), TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!((200..300).contains(&status), "vm.create: {status} {answer}");
    let memory = memory_info(&socket);
    assert_eq!(memory["shared"], true, "{memory}");
    assert_eq!(memory["hugepages"], true, "{memory}");
    assert_eq!(memory["hugepage_size"], 2 * MIB, "{memory}");
    assert_eq!(memory["size"], 128 * MIB, "{memory}");
}

#[test]
fn shared_memory_vm_survives_snapshot_and_restore() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("mem_shared_snap").expect("temp dir");
    let socket = dir.join("api.sock");
    let snap = dir.join("snap");
    let mut source = dirty_guest(
        "mem_shared_snap_source",
        "size=256M,shared=on",
        &socket,
        "workload=dirty dirty.mib=32 dirty.rate=50 dirty.ms=4000",
    );
    source
        .wait_for("DIRTY progress", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    ok(&source, &socket, &["pause"]);
    let url = format!("file://{}", snap.display());
    ok(&source, &socket, &["snapshot", &url]);
    assert!(
        !source.console().contains("DIRTY result"),
        "the workload ended before the snapshot"
    );
    source.kill();

    let restore_socket = dir.join("restored.sock");
    let restore = format!("source_url={url},resume=on");
    let mut restored = Vmm::builder("mem_shared_snap_restored")
        .args(["--restore", restore.as_str()])
        .args(["--api-socket", restore_socket.to_str().expect("path")])
        .spawn()
        .expect("start the restoring VMM");
    wait_for_api_socket(&mut restored, &restore_socket, TIMEOUT);
    // The configuration travels in the snapshot: the restored VM's RAM is shared too.
    assert_eq!(memory_info(&restore_socket)["shared"], true);
    assert_eq!(
        shared_guest_ram_bytes(restored.pid()),
        256 * MIB,
        "{}",
        restored.diagnose("restored RAM is not shared")
    );
    let line = expect_verified(&mut restored, "restored shared memory");
    expect_clean_exit(&mut restored);
    report(&format!(
        "memory_backing: shared=on snapshot/restore: {line}"
    ));
}

/// Migrates a busy guest with `memory` between two VMM processes over a Unix socket; the
/// destination's RAM is backed the same way and the guest's own check passes there.
fn migrate_busy_guest(name: &str, memory: &str) -> String {
    let dir = TempDir::new(name).expect("temp dir");
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    // Long enough that pre-copy ends before the workload does (as the migration tests).
    let mut source = dirty_guest(
        &format!("{name}_source"),
        memory,
        &sock_a,
        "workload=dirty dirty.mib=64 dirty.rate=20 dirty.ms=30000",
    );
    source
        .wait_for("DIRTY progress", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut destination = Vmm::builder(&format!("{name}_destination"))
        .args(["--api-socket", sock_b.to_str().expect("path")])
        .spawn()
        .expect("destination");
    wait_for_api_socket(&mut destination, &sock_b, TIMEOUT);
    let link = dir.join("migration.sock");
    let url = format!("unix:{}", link.display());
    let mut receiver = Command::new(ch_remote_binary())
        .arg("--api-socket")
        .arg(&sock_b)
        .args(["receive-migration", &url])
        .spawn()
        .expect("start ch-remote receive-migration");
    let deadline = Instant::now() + TIMEOUT;
    while !link.exists() {
        assert!(Instant::now() < deadline, "the receiver never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let source_memory = memory_info(&sock_a);
    let started = Instant::now();
    ok(&source, &sock_a, &["send-migration", &url]);
    let took = started.elapsed();
    assert!(receiver.wait().expect("receiver").success());
    assert_eq!(
        memory_info(&sock_b),
        source_memory,
        "the destination's memory configuration is the source's"
    );
    assert_eq!(
        shared_guest_ram_bytes(destination.pid()),
        256 * MIB,
        "{}",
        destination.diagnose("the destination's RAM is not shared")
    );
    let line = expect_verified(&mut destination, "migrated memory");
    assert!(
        !source.console().contains("DIRTY result"),
        "the workload must finish on the destination (send-migration took {took:?})"
    );
    format!("live migration in {took:?}: {line}")
}

#[test]
fn shared_memory_vm_live_migrates_with_its_memory_intact() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let line = migrate_busy_guest("mem_shared_migrate", "size=256M,shared=on");
    report(&format!("memory_backing: shared=on {line}"));
}

#[test]
fn hugepage_vm_live_migrates_with_its_memory_intact() {
    require_kvm!();
    let test = "hugepage_vm_live_migrates_with_its_memory_intact";
    let _boot = kvm_serial_guard();
    // Source and destination both hold 256 MiB of 2 MiB pages on this one host.
    let Some(_pool) = HugepagePool::reserve(test, 2 * 128 + 16) else {
        return;
    };
    let line = migrate_busy_guest(
        "mem_huge_migrate",
        "size=256M,hugepages=on,hugepage_size=2M",
    );
    report(&format!("memory_backing: hugepages=on {line}"));
}

/// Runs the VMM with `args`; it must exit non-zero without a panic, and its stderr must hold
/// every one of `words`.
fn expect_refused(name: &str, args: &[&str], words: &[&str]) -> String {
    let mut vmm = Vmm::builder(name)
        .args(args)
        .spawn()
        .expect("start the VMM");
    let status = vmm
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("bad input must not hang the VMM: {e}"));
    let stderr = vmm.stderr();
    assert!(
        !status.success() && status.code().is_some(),
        "{}",
        vmm.diagnose("bad memory options must fail with an exit code")
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for word in words {
        assert!(stderr.contains(word), "{}", vmm.diagnose(word));
    }
    stderr
}

#[test]
fn hugepages_without_free_pages_fail_with_the_counts() {
    require_kvm!();
    let test = "hugepages_without_free_pages_fail_with_the_counts";
    let Some(_pool) = HugepagePool::exhaust(test) else {
        return;
    };
    let guest = test_guest().expect("guest");
    let kernel = guest.display().to_string();
    let stderr = expect_refused(
        "mem_huge_none",
        &[
            "--kernel",
            &kernel,
            "--memory",
            "size=256M,hugepages=on,hugepage_size=2M",
            "--serial",
            "null",
            "--console",
            "off",
        ],
        &[
            "128 huge pages of 2048 KiB are needed",
            "but only 0 are free",
            "hugepages-2048kB/free_hugepages",
        ],
    );
    report(&format!(
        "memory_backing: no free huge pages: {}",
        stderr.trim()
    ));

    // Through the API: vm.create says the same, and no VM is left behind.
    let dir = TempDir::new("mem_huge_none_api").expect("temp dir");
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::builder("mem_huge_none_api")
        .args(["--api-socket", socket.to_str().expect("path")])
        .spawn()
        .expect("start the VMM");
    wait_for_api_socket(&mut vmm, &socket, TIMEOUT);
    let body = serde_json::json!({
        "payload": {"kernel": guest},
        "memory": {"size": 256 * MIB, "hugepages": true}
    })
    .to_string();
    let (status, answer) = api_request(&socket, "PUT", "vm.create", Some(&body), TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !(200..300).contains(&status),
        "vm.create: {status} {answer}"
    );
    assert!(
        answer.contains("huge pages of 2048 KiB are needed"),
        "{answer}"
    );
    let (status, _) =
        api_request(&socket, "GET", "vm.info", None, TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !(200..300).contains(&status),
        "a VM exists after the refusal"
    );
}

#[test]
fn odd_hugepage_sizes_and_misaligned_memory_are_refused() {
    let guest = test_guest().expect("guest");
    let kernel = guest.display().to_string();
    for (memory, words) in [
        (
            "size=256M,hugepages=on,hugepage_size=4M",
            &["memory.hugepage_size: 4194304 is not a huge page size"][..],
        ),
        (
            "size=256M,hugepages=on,hugepage_size=1G",
            &["memory.size: 268435456 is not a multiple of the huge page size 1073741824"][..],
        ),
        (
            "size=257M,hugepages=on",
            &["memory.size: 269484032 is not a multiple of the huge page size 2097152"][..],
        ),
        (
            "size=256M,hugepage_size=2M",
            &["memory.hugepage_size: hugepage_size=2097152 needs hugepages=on"][..],
        ),
    ] {
        expect_refused(
            "mem_bad",
            &[
                "--kernel",
                &kernel,
                "--memory",
                memory,
                "--serial",
                "null",
                "--console",
                "off",
            ],
            words,
        );
    }
}

#[test]
fn shared_memory_vm_fails_over_to_its_backup_with_memory_intact() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("mem_shared_ft").expect("temp dir");
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut primary = dirty_guest(
        "mem_shared_ft_primary",
        "size=256M,shared=on",
        &sock_a,
        // A dirty rate the initial sync of a debug build outpaces, so that protection starts.
        "workload=dirty dirty.mib=4 dirty.rate=1 dirty.ms=40000",
    );
    primary
        .wait_for("DIRTY progress", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut backup = Vmm::builder("mem_shared_ft_backup")
        .args(["--api-socket", sock_b.to_str().expect("path")])
        .spawn()
        .expect("backup");
    wait_for_api_socket(&mut backup, &sock_b, TIMEOUT);
    // Over loopback, with the test CA's credentials (added by `ch_remote`).
    let peer = "127.0.0.1:7391";
    ok(&backup, &sock_b, &["receive-ft", &format!("tcp:{peer}")]);
    ok(
        &primary,
        &sock_a,
        &["enable-ft", "--peer", peer, "--heartbeat-timeout-ms", "500"],
    );
    wait_status(&sock_a, "health", &["protected"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", primary.diagnose("primary")));
    // The standby VM was built from the primary's configuration: shared RAM on its host too.
    assert_eq!(
        shared_guest_ram_bytes(backup.pid()),
        256 * MIB,
        "{}",
        backup.diagnose("the standby's RAM is not shared")
    );
    // Some protected epochs with the guest rewriting memory, then the primary dies.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !primary.console().contains("DIRTY result"),
        "the workload ended before the failover"
    );
    primary.kill();
    wait_status(&sock_b, "health", &["took_over"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", backup.diagnose("backup")));
    let line = expect_verified(&mut backup, "memory after the failover");
    report(&format!("memory_backing: shared=on FT failover: {line}"));
    backup.kill();
}
