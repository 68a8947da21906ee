//! A hot-plugged device survives live migration and fault-tolerance failover.
//!
//! After a hot-plug or an unplug the configuration pins every device's id and
//! `pci_device_id`, so whatever builds the VM again from it (a migration's destination, an FT
//! standby) must put each device where the guest saw it and match device state by id; built in
//! Cloud Hypervisor's order instead, a hot-plugged disk would move in front of the NICs and
//! the guest would drive the wrong function.
//!
//! The guest is the test guest's `workload=ft` service (`guest/src/ft.rs`): `attach <n>` makes
//! the virtio disk at PCI device `n` (hot-plugged after boot) its disk, so every `req` writes
//! its record through the hot-plugged device; `eject` does what ACPI PCI hot-plug has a guest
//! do when the VMM asks a device back. Records are deterministic, so the test checks the
//! images from the host as well as through the guest's own `check`.
//!
//! Network: two "hosts" and a client as network namespaces ([`two_hosts`]); the migration
//! and replication streams run over the hosts' own link.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use integration::ft::{ft_status, wait_status, Load, SeqClient};
use integration::{
    api_vmm, ch_remote, ch_remote_binary, guest_vm_args, kvm_serial_guard, marker_fields, report,
    require_kvm, require_netns, test_guest, tls_dir, two_hosts, NetNs, TempDir, TwoHosts, Vmm,
    HOST_B,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const GUEST_MAC: &str = "12:34:56:78:9a:bc";
/// The NIC hot-plugged in the migration test (on the hosts' second TAP).
const ADDED_MAC: &str = "12:34:56:78:9a:be";
const CMDLINE: &str = "workload=ft net.ip=192.168.249.2/24 ft.dirty_rate=500 ft.dirty_mib=4";
const FT_PORT: u16 = 7100;
/// Between a paced client's requests.
const PACE: Duration = Duration::from_millis(5);
const MIGRATION_PORT: u16 = 6000;
/// Every image: room for the guest's records (2048 sectors) and `rw` rounds.
const IMAGE_BYTES: usize = 2 << 20;

/// The guest's disk records (`guest/src/ft.rs`): request `seq` in sector `seq % 2048`.
const SLOTS: u64 = 2048;
const SECTOR: usize = 512;
const MAGIC: u64 = u64::from_le_bytes(*b"TANDEMFT");

// ---------------------------------------------------------------------------------------------
// VMMs and the API
// ---------------------------------------------------------------------------------------------

fn diagnose(nodes: &[&Vmm], what: &str) -> String {
    nodes
        .iter()
        .map(|n| n.diagnose(what))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `ch-remote ARGS` must succeed; returns its stdout.
fn ok(socket: &Path, args: &[&str], nodes: &[&Vmm]) -> String {
    let out = ch_remote(socket, args, None);
    assert!(
        out.status.success(),
        "ch-remote {args:?}: {}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        diagnose(nodes, "ch-remote")
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A zeroed image of [`IMAGE_BYTES`].
fn new_image(dir: &TempDir, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![0u8; IMAGE_BYTES]).expect("create an image");
    path
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Boots the `workload=ft` guest on `host` with a disk per image in `disks` (the first is the
/// service's disk at boot); returns the VMM and the guest's run id.
fn boot(name: &str, host: &NetNs, socket: &Path, disks: &[&Path]) -> (Vmm, u64) {
    let kernel = test_guest().expect("guest").display().to_string();
    let net = format!("tap=tapvm,mac={GUEST_MAC}");
    let specs: Vec<String> = disks
        .iter()
        .map(|d| format!("path={}", d.display()))
        .collect();
    let mut extra = vec!["-v"];
    for spec in &specs {
        extra.extend(["--disk", spec.as_str()]);
    }
    let args = guest_vm_args(&kernel, CMDLINE, "size=64M", &net, &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vmm = api_vmm(TIMEOUT, name, host, socket, &args);
    let ready = vmm
        .wait_for("ft: ready", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let fields = marker_fields(&ready.line);
    assert_eq!(fields["disk"], "1", "{}", ready.line);
    let run = u64::from_str_radix(&fields["run"], 16).expect("run id in hex");
    (vmm, run)
}

fn info(socket: &Path, nodes: &[&Vmm]) -> serde_json::Value {
    let text = ok(socket, &["info"], nodes);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("vm.info is not JSON ({e}): {text}"))
}

/// Where each device sits, from `vm.info`'s device tree: id -> device number on bus 0.
fn placement(socket: &Path, nodes: &[&Vmm]) -> BTreeMap<String, u8> {
    let info = info(socket, nodes);
    let tree = info["device_tree"].as_object().expect("device_tree");
    tree.values()
        .filter_map(|node| {
            let bdf = node["pci_bdf"].as_str()?;
            let child = node["children"].as_array()?.first()?.as_str()?;
            Some((child.to_string(), slot_of(bdf)))
        })
        .collect()
}

/// The device number of a `0000:00:NN.0` BDF.
fn slot_of(bdf: &str) -> u8 {
    bdf.strip_prefix("0000:00:")
        .and_then(|rest| rest.strip_suffix(".0"))
        .and_then(|n| u8::from_str_radix(n, 16).ok())
        .unwrap_or_else(|| panic!("not a bus-0 BDF: {bdf}"))
}

/// What `vm.info`'s configuration pins: each disk's and NIC's (id, `pci_device_id`, MAC) and
/// the entropy device's number.
fn pinned(socket: &Path, nodes: &[&Vmm]) -> Vec<(String, Option<u64>, Option<String>)> {
    let info = info(socket, nodes);
    let config = &info["config"];
    let mut devices = Vec::new();
    for list in ["disks", "net"] {
        for device in config[list].as_array().into_iter().flatten() {
            devices.push((
                device["id"].as_str().unwrap_or("(no id)").to_string(),
                device["pci_device_id"].as_u64(),
                device["mac"].as_str().map(str::to_string),
            ));
        }
    }
    devices.push((
        "_rng".to_string(),
        config["rng"]["pci_device_id"].as_u64(),
        None,
    ));
    devices
}

/// `add-disk` / `add-net`: the new device's id and device number.
fn hot_plug(socket: &Path, args: &[&str], nodes: &[&Vmm]) -> (String, u8) {
    let text = ok(socket, args, nodes);
    let answer: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{args:?} answer is not JSON ({e}): {text}"));
    let id = answer["id"].as_str().expect("id").to_string();
    let bdf = answer["bdf"].as_str().expect("bdf");
    (id, slot_of(bdf))
}

/// `remove-device ID`, the guest's eject (it must be asked for exactly `id`'s slot), and the
/// device gone from the bus and the configuration.
fn unplug(socket: &Path, ctl: &mut SeqClient, id: &str, slot: u8, nodes: &[&Vmm]) {
    ok(socket, &["remove-device", id], nodes);
    let reply = ctl
        .command("eject")
        .unwrap_or_else(|e| panic!("eject: {e}"));
    assert_eq!(reply, format!("eject slots=0x{:x}", 1u32 << slot));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let gone_from_bus = !placement(socket, nodes).contains_key(id);
        let gone_from_config = !pinned(socket, nodes).iter().any(|(d, _, _)| d == id);
        if gone_from_bus && gone_from_config {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            diagnose(nodes, &format!("{id} stays after the guest ejected it"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `attach <slot>`: the guest's service writes its records to that disk from the returned
/// request number on.
fn attach(ctl: &mut SeqClient, slot: u8, nodes: &[&Vmm]) -> u64 {
    let reply = ctl
        .command(&format!("attach {slot}"))
        .unwrap_or_else(|e| panic!("attach: {e}"));
    assert!(
        reply.starts_with(&format!("attach ok pci=00:{slot:02x}.0 ")),
        "{reply}\n{}",
        diagnose(nodes, "attach")
    );
    marker_fields(&reply)["from"]
        .parse()
        .expect("attach names the first request")
}

fn reqs(ctl: &mut SeqClient, n: u64) {
    for _ in 0..n {
        ctl.req().unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The guest's own check (pages, and its records read back through its disk).
fn guest_check(ctl: &mut SeqClient, disk: bool, nodes: &[&Vmm]) -> String {
    let check = ctl
        .command("check")
        .unwrap_or_else(|e| panic!("check: {e}\n{}", diagnose(nodes, "check")));
    let want = format!("disk={}", u8::from(disk));
    assert!(
        check.starts_with("ok ") && check.ends_with(&want),
        "the guest's check: {check}\n{}",
        diagnose(nodes, "check")
    );
    check
}

// ---------------------------------------------------------------------------------------------
// The records on an image
// ---------------------------------------------------------------------------------------------

/// Requests in `from..=last` whose record `image` lacks (only the newest 2048 can be there).
fn missing_records(image: &Path, from: u64, last: u64, run: u64) -> Vec<u64> {
    let data = std::fs::read(image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    (from.max(last.saturating_sub(SLOTS - 1))..=last)
        .filter(|&seq| {
            let lba = (seq % SLOTS) as usize;
            let Some(sector) = data.get(lba * SECTOR..(lba + 1) * SECTOR) else {
                return true;
            };
            let word = |j: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&sector[j * 8..j * 8 + 8]);
                u64::from_le_bytes(w)
            };
            (word(0), word(1), word(2), word(4)) != (MAGIC, lba as u64, seq, run)
        })
        .collect()
}

fn assert_records(image: &Path, from: u64, last: u64, run: u64, what: &str) {
    let missing = missing_records(image, from, last, run);
    assert!(
        missing.is_empty(),
        "{what}: {} of the records {from}..={last} are not on {} (first: {:?})",
        missing.len(),
        image.display(),
        missing.first()
    );
}

// ---------------------------------------------------------------------------------------------
// Fault tolerance
// ---------------------------------------------------------------------------------------------

/// The backup VMM on host `b`, waiting for its primary with these images and TAPs.
fn backup_vmm(hosts: &TwoHosts, socket: &Path, disks: &[&Path], name: &str) -> Vmm {
    let backup = api_vmm(TIMEOUT, name, &hosts.b, socket, &["-v"]);
    receive_ft(&backup, socket, disks);
    backup
}

/// `receive-ft` with this host's images and TAP; retried while the VMM still drops the copy
/// of an earlier protection (it stands down in its own time after `disable-ft`).
fn receive_ft(backup: &Vmm, socket: &Path, disks: &[&Path]) {
    let url = format!("tcp:{HOST_B}:{FT_PORT}");
    let mut args = vec!["receive-ft", url.as_str()];
    for disk in disks {
        args.extend(["--disk-path", path_str(disk)]);
    }
    args.extend(["--tap", "tapvm"]);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let out = ch_remote(socket, &args, None);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "receive-ft: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            backup.diagnose("receive-ft")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `enable-ft` with replicated disks (the backup's images start blank: the initial sync
/// copies every disk, the hot-plugged ones included); waits until both sides are protected.
fn protect(sock_a: &Path, sock_b: &Path, nodes: &[&Vmm]) -> serde_json::Value {
    let peer = format!("{HOST_B}:{FT_PORT}");
    ok(
        sock_a,
        &[
            "enable-ft",
            "--peer",
            &peer,
            "--disk-mode",
            "replicated",
            "--heartbeat-timeout-ms",
            "1000",
        ],
        nodes,
    );
    wait_status(sock_b, "health", &["protected"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(nodes, "backup protection")));
    let status = wait_status(sock_a, "health", &["protected"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(nodes, "protection")));
    assert_eq!(status["disk_mode"], "replicated", "{status}");
    status
}

fn committed(status: &serde_json::Value) -> u64 {
    status["last_committed_epoch"].as_u64().unwrap_or(0)
}

/// Waits until the primary at `socket` committed `more` epochs past `from`.
fn wait_epochs(socket: &Path, from: u64, more: u64, nodes: &[&Vmm]) -> serde_json::Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let status = ft_status(socket);
        if committed(&status) >= from + more {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "no epoch committed past {from} + {more}: {status}\n{}",
            diagnose(nodes, "epochs")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the primary (SIGKILL) and waits until the backup took over; returns its status.
fn kill_primary(primary: &mut Vmm, sock_b: &Path, backup: &Vmm) -> serde_json::Value {
    primary.kill();
    let status = wait_status(sock_b, "health", &["took_over", "failed"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[backup], "failover")));
    assert_eq!(
        status["health"],
        "took_over",
        "{status}\n{}",
        diagnose(&[backup], "failover")
    );
    status
}

/// The guest keeps being served after the failover (the sequence checks each answer: no
/// acknowledged request lost, none answered twice); returns the client and its last `seq`.
fn continue_after_failover(load: Load, backup: &Vmm) -> (SeqClient, u64) {
    load.wait_progress(30, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[backup], "after the failover")));
    let client = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let last = client.last;
    (client, last)
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// Live migration of a VM whose devices no longer sit in Cloud Hypervisor's order: a disk and
/// a NIC hot-plugged, a boot disk unplugged (slots 1, 3, 4, 5, 6 taken, 2 free). The guest
/// writes through the hot-plugged disk before and during the move; on the destination every
/// device is at the same BDF, `vm.info` pins the same devices, the guest's disk I/O goes on
/// and reads back what it wrote before the move, and the hot-plugged disk can be removed.
#[test]
fn a_hot_plugged_disk_and_nic_survive_live_migration() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let hosts = two_hosts("hm");
    let dir = TempDir::new("hotplug_migration").expect("temp dir");
    let (boot_disk, spare, added) = (
        new_image(&dir, "boot.img"),
        new_image(&dir, "spare.img"),
        new_image(&dir, "added.img"),
    );
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let (mut source, run) = boot(
        "hp_migration_source",
        &hosts.a,
        &sock_a,
        &[&boot_disk, &spare],
    );
    let mut ctl = SeqClient::connect(&hosts.client).unwrap_or_else(|e| panic!("{e}"));
    reqs(&mut ctl, 20);

    // Boot order: _disk0 1, _disk1 2, _net0 3, _rng 4. Then a disk and a NIC in the first free
    // slots, and the spare boot disk out.
    let disk_spec = format!("path={}", added.display());
    let (disk_id, disk_slot) = hot_plug(&sock_a, &["add-disk", &disk_spec], &[&source]);
    assert_eq!((disk_id.as_str(), disk_slot), ("_disk2", 5));
    let net_spec = format!("tap=tapvm2,mac={ADDED_MAC}");
    let (net_id, net_slot) = hot_plug(&sock_a, &["add-net", &net_spec], &[&source]);
    assert_eq!((net_id.as_str(), net_slot), ("_net1", 6));
    unplug(&sock_a, &mut ctl, "_disk1", 2, &[&source]);
    let before = placement(&sock_a, &[&source]);
    let want: BTreeMap<String, u8> = [
        ("_disk0", 1),
        ("_net0", 3),
        ("_rng", 4),
        ("_disk2", 5),
        ("_net1", 6),
    ]
    .into_iter()
    .map(|(id, n)| (id.to_string(), n))
    .collect();
    assert_eq!(before, want, "{}", source.diagnose("placement"));
    let pinned_before = pinned(&sock_a, &[&source]);
    assert!(
        pinned_before.iter().all(|(_, n, _)| n.is_some()),
        "every device pinned after the hot-plug: {pinned_before:?}"
    );

    // The guest's records go to the hot-plugged disk from here on.
    let from = attach(&mut ctl, disk_slot, &[&source]);
    assert_eq!(from, 21);
    reqs(&mut ctl, 30);
    guest_check(&mut ctl, true, &[&source]);

    // The destination names its images (shared storage: the same files) and TAPs, in the
    // order of the VM's configuration.
    let mut destination = api_vmm(
        TIMEOUT,
        "hp_migration_destination",
        &hosts.b,
        &sock_b,
        &["-v"],
    );
    let url = format!("tcp:{HOST_B}:{MIGRATION_PORT}");
    let mut receiver = Command::new(ch_remote_binary())
        .arg("--api-socket")
        .arg(&sock_b)
        .args(["receive-migration", &url])
        .args(["--disk-path", path_str(&boot_disk)])
        .args(["--disk-path", path_str(&added)])
        .args(["--tap", "tapvm", "--tap", "tapvm2"])
        .arg("--tls-dir")
        .arg(tls_dir())
        .spawn()
        .expect("start ch-remote receive-migration");
    let deadline = Instant::now() + TIMEOUT;
    while !destination.stderr().contains("waiting for a migration on") {
        assert!(
            Instant::now() < deadline,
            "{}",
            destination.diagnose("the destination never listened")
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // A client keeps the guest writing through the move, paced so that the records written
    // before it are still the newest in their sectors when the guest checks them.
    let load = Load::start_with(ctl, |c: &mut SeqClient| {
        std::thread::sleep(PACE);
        c.req()
    });
    load.wait_progress(10, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let before_move = load.seq.load(Ordering::SeqCst);
    let started = Instant::now();
    ok(
        &sock_a,
        &[
            "send-migration",
            &format!("destination_url={url},downtime_ms=100"),
        ],
        &[&source, &destination],
    );
    let took = started.elapsed();
    let received = receiver.wait().expect("receive-migration");
    assert!(
        received.success(),
        "{}",
        destination.diagnose("receive-migration")
    );
    load.wait_progress(50, TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "{e}\n{}",
            destination.diagnose("disk I/O after the migration")
        )
    });
    let mut ctl = load.stop().unwrap_or_else(|e| panic!("{e}"));
    let status = source
        .wait_exit(TIMEOUT)
        .expect("the source exits after the move");
    assert_eq!(status.code(), Some(0), "{}", source.diagnose("source exit"));

    // Same BDFs, same pinned configuration; the guest reads back every record it wrote
    // through the hot-plugged disk, before the move included.
    let after = placement(&sock_b, &[&destination]);
    assert_eq!(after, before, "{}", destination.diagnose("placement"));
    assert_eq!(pinned(&sock_b, &[&destination]), pinned_before);
    let check = guest_check(&mut ctl, true, &[&destination]);
    let last = ctl.last;
    assert!(
        last < from + SLOTS,
        "{} requests since the attach: the records from before the move were overwritten",
        last + 1 - from
    );
    assert_records(&added, from, last, run, "the hot-plugged disk");
    assert_records(&boot_disk, 1, from - 1, run, "the boot disk");
    assert!(
        missing_records(&added, 1, from - 1, run).len() == (from - 1) as usize,
        "records from before the attach reached the hot-plugged disk"
    );

    // A later unplug on the destination: the guest lets go, the device leaves.
    unplug(&sock_b, &mut ctl, &disk_id, disk_slot, &[&destination]);
    let mut left = before.clone();
    left.remove(&disk_id);
    assert_eq!(placement(&sock_b, &[&destination]), left);
    reqs(&mut ctl, 5);
    guest_check(&mut ctl, false, &[&destination]);
    report(&format!(
        "hotplug migration: {after:?} kept; send-migration took {took:?} with the guest at seq \
         {before_move} and writing; records {from}..={last} on the hot-plugged disk; guest \
         {check}; {disk_id} then removed on the destination"
    ));
    destination.kill();
}

/// A disk hot-plugged before `enable-ft` is part of what the backup mirrors: the guest writes
/// through it across epochs, the primary is killed, and on the backup the disk sits at the
/// same BDF, holds every record the client saw acknowledged (output commit: an answer left
/// only after its epoch, and so the write, was on the backup), and takes further writes.
#[test]
fn a_hot_plugged_disk_survives_ft_failover_with_every_acknowledged_write() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let hosts = two_hosts("hf");
    let dir = TempDir::new("hotplug_failover").expect("temp dir");
    let (boot_a, added_a) = (
        new_image(&dir, "boot-a.img"),
        new_image(&dir, "added-a.img"),
    );
    let (boot_b, added_b) = (
        new_image(&dir, "boot-b.img"),
        new_image(&dir, "added-b.img"),
    );
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let (mut primary, run) = boot("hp_ft_primary", &hosts.a, &sock_a, &[&boot_a]);
    let mut ctl = SeqClient::connect(&hosts.client).unwrap_or_else(|e| panic!("{e}"));
    reqs(&mut ctl, 10);

    // Boot order: _disk0 1, _net0 2, _rng 3; the hot-plugged disk takes 4 (built in Cloud
    // Hypervisor's order it would be 2).
    let disk_spec = format!("path={}", added_a.display());
    let (disk_id, disk_slot) = hot_plug(&sock_a, &["add-disk", &disk_spec], &[&primary]);
    assert_eq!((disk_id.as_str(), disk_slot), ("_disk1", 4));
    let from = attach(&mut ctl, disk_slot, &[&primary]);
    reqs(&mut ctl, 20);
    let before = placement(&sock_a, &[&primary]);

    let backup = backup_vmm(&hosts, &sock_b, &[&boot_b, &added_b], "hp_ft_backup");
    let protected = protect(&sock_a, &sock_b, &[&primary, &backup]);
    let load = Load::start(ctl);
    load.wait_progress(100, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&[&primary, &backup], "protected load")));
    let status = wait_epochs(&sock_a, committed(&protected), 20, &[&primary, &backup]);
    let acked = load.seq.load(Ordering::SeqCst);
    let took_over = kill_primary(&mut primary, &sock_b, &backup);
    let (mut ctl, last) = continue_after_failover(load, &backup);

    let after = placement(&sock_b, &[&backup]);
    assert_eq!(after, before, "{}", backup.diagnose("placement"));
    let check = guest_check(&mut ctl, true, &[&backup]);
    // Everything acknowledged before the kill, and what the guest wrote since, is on the
    // backup's own image of the hot-plugged disk; the boot disk's records came with the sync.
    assert_records(&added_b, from, acked, run, "acknowledged before the kill");
    assert_records(&added_b, from, last, run, "the backup's hot-plugged disk");
    assert_records(&boot_b, 1, from - 1, run, "the backup's boot disk");
    report(&format!(
        "hotplug failover: {after:?} kept; {} epochs committed while the guest wrote through \
         {disk_id}; killed with seq {acked} acknowledged; took over at epoch {}; records \
         {from}..={last} on the backup's image; guest {check}",
        committed(&status) - committed(&protected),
        took_over["epoch"]
    ));
}

/// While FT protects the VM, `add-disk` and `remove-device` are refused with the reason and
/// what to do instead, and protection goes on undisturbed (still protected, epochs keep
/// committing, the guest's requests keep their sequence). A disk unplugged before `enable-ft`
/// does not come back with the failover, nor does the refused one.
#[test]
fn hot_plug_while_protected_is_refused_and_an_unplugged_disk_stays_gone_after_failover() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let hosts = two_hosts("hr");
    let dir = TempDir::new("hotplug_refused").expect("temp dir");
    let (disk_a, spare_a, refused) = (
        new_image(&dir, "disk-a.img"),
        new_image(&dir, "spare-a.img"),
        new_image(&dir, "refused.img"),
    );
    let disk_b = new_image(&dir, "disk-b.img");
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let (mut primary, run) = boot(
        "hp_refused_primary",
        &hosts.a,
        &sock_a,
        &[&disk_a, &spare_a],
    );
    let mut ctl = SeqClient::connect(&hosts.client).unwrap_or_else(|e| panic!("{e}"));
    reqs(&mut ctl, 10);
    // _disk0 1, _disk1 2, _net0 3, _rng 4: the spare goes before protection.
    unplug(&sock_a, &mut ctl, "_disk1", 2, &[&primary]);
    let before = placement(&sock_a, &[&primary]);
    let pinned_before = pinned(&sock_a, &[&primary]);

    let backup = backup_vmm(&hosts, &sock_b, &[&disk_b], "hp_refused_backup");
    let nodes = [&primary, &backup];
    let protected = protect(&sock_a, &sock_b, &nodes);
    let load = Load::start(ctl);
    load.wait_progress(20, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let refused_at = committed(&ft_status(&sock_a));

    let disk_spec = format!("path={}", refused.display());
    for args in [
        &["add-disk", disk_spec.as_str()][..],
        &["remove-device", "_disk0"],
        &["remove-device", "_net0"],
    ] {
        let out: Output = ch_remote(&sock_a, args, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted while protected");
        assert!(
            stderr.contains("protected by fault tolerance") && stderr.contains("disable-ft"),
            "{args:?}: no reason given: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // Nothing changed, and the protection goes on: epochs keep committing, the guest keeps
    // answering in sequence.
    assert_eq!(placement(&sock_a, &nodes), before);
    assert_eq!(pinned(&sock_a, &nodes), pinned_before);
    let status = wait_epochs(&sock_a, refused_at, 20, &nodes);
    assert_eq!(status["health"], "protected", "{status}");
    assert!(status["last_error"].is_null(), "{status}");
    let backup_status = ft_status(&sock_b);
    assert_eq!(backup_status["health"], "protected", "{backup_status}");
    load.wait_progress(50, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&nodes, "load after the refusals")));
    let acked = load.seq.load(Ordering::SeqCst);

    let took_over = kill_primary(&mut primary, &sock_b, &backup);
    let (mut ctl, last) = continue_after_failover(load, &backup);
    // The backup was built from the configuration at enable-ft: no spare, no refused disk.
    assert_eq!(placement(&sock_b, &[&backup]), before);
    assert_eq!(pinned(&sock_b, &[&backup]), pinned_before);
    let check = guest_check(&mut ctl, true, &[&backup]);
    assert_records(&disk_b, 1, acked, run, "acknowledged before the kill");
    assert_records(&disk_b, 1, last, run, "the backup's disk");
    report(&format!(
        "hotplug refused while protected (epochs: {} at enable-ft, {refused_at} at the \
         refusals, {} after them); failover at epoch {} kept {before:?} without the unplugged \
         disk; guest {check}",
        committed(&protected),
        committed(&status),
        took_over["epoch"]
    ));
}

/// What the refusal tells the operator to do: `disable-ft`, change the devices, `enable-ft`
/// again. The second protection must mirror the VM as it is then: the disk hot-plugged in
/// between is synchronised and its writes replicated, the disk unplugged in between is gone.
#[test]
fn devices_changed_between_two_protections_are_what_the_second_backup_mirrors() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let hosts = two_hosts("hc");
    let dir = TempDir::new("hotplug_reprotect").expect("temp dir");
    let (disk_a, spare_a, added_a) = (
        new_image(&dir, "disk-a.img"),
        new_image(&dir, "spare-a.img"),
        new_image(&dir, "added-a.img"),
    );
    let (disk_b, spare_b, added_b) = (
        new_image(&dir, "disk-b.img"),
        new_image(&dir, "spare-b.img"),
        new_image(&dir, "added-b.img"),
    );
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let (mut primary, run) = boot(
        "hp_reprotect_primary",
        &hosts.a,
        &sock_a,
        &[&disk_a, &spare_a],
    );
    let mut ctl = SeqClient::connect(&hosts.client).unwrap_or_else(|e| panic!("{e}"));
    reqs(&mut ctl, 10);

    // First protection with both boot disks; then it ends on purpose.
    let backup = backup_vmm(&hosts, &sock_b, &[&disk_b, &spare_b], "hp_reprotect_backup");
    protect(&sock_a, &sock_b, &[&primary, &backup]);
    reqs(&mut ctl, 10);
    ok(&sock_a, &["disable-ft"], &[&primary, &backup]);

    // _disk0 1, _disk1 2, _net0 3, _rng 4: a disk in, the spare out.
    let disk_spec = format!("path={}", added_a.display());
    let (disk_id, disk_slot) = hot_plug(&sock_a, &["add-disk", &disk_spec], &[&primary]);
    assert_eq!((disk_id.as_str(), disk_slot), ("_disk2", 5));
    unplug(&sock_a, &mut ctl, "_disk1", 2, &[&primary]);
    let from = attach(&mut ctl, disk_slot, &[&primary]);
    reqs(&mut ctl, 10);
    let before = placement(&sock_a, &[&primary]);

    // Second protection, the same backup VMM with images for the disks the VM has now.
    receive_ft(&backup, &sock_b, &[&disk_b, &added_b]);
    let nodes = [&primary, &backup];
    let protected = protect(&sock_a, &sock_b, &nodes);
    let load = Load::start(ctl);
    load.wait_progress(100, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnose(&nodes, "protected load")));
    wait_epochs(&sock_a, committed(&protected), 10, &nodes);
    let acked = load.seq.load(Ordering::SeqCst);
    let took_over = kill_primary(&mut primary, &sock_b, &backup);
    let (mut ctl, last) = continue_after_failover(load, &backup);

    assert_eq!(placement(&sock_b, &[&backup]), before);
    let check = guest_check(&mut ctl, true, &[&backup]);
    assert_records(&added_b, from, acked, run, "acknowledged before the kill");
    assert_records(&added_b, from, last, run, "the backup's hot-plugged disk");
    assert_records(&disk_b, 1, from - 1, run, "the backup's boot disk");
    report(&format!(
        "hotplug between protections: {before:?} mirrored by the second backup; took over at \
         epoch {}; records {from}..={last} on its image of {disk_id}; guest {check}",
        took_over["epoch"]
    ));
}
