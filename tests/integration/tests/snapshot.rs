//! Snapshot and restore of a busy test guest: the guest rewrites and checksums memory while it
//! is paused, snapshotted, and restored into a new VMM process; its own verification at the end
//! proves memory and vCPU state came back intact.

use std::time::Duration;

use integration::{
    ch_remote, kvm_serial_guard, report, require_kvm, test_guest, wait_for_api_socket, TempDir, Vmm,
};

const TIMEOUT: Duration = Duration::from_secs(90);

fn ok(vmm: &Vmm, socket: &std::path::Path, args: &[&str]) {
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
fn busy_guest_survives_snapshot_and_restore_into_a_new_process() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("snapshot").expect("temp dir");
    let guest = test_guest().expect("guest");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 8 << 20]).expect("image");
    let socket = dir.join("api.sock");
    let snap = dir.join("snap");
    let disk = format!("path={}", image.display());

    let mut source = Vmm::builder("snapshot_source")
        .kernel(&guest)
        .cmdline("workload=dirty dirty.mib=32 dirty.rate=50 dirty.ms=4000")
        .cpus(2)
        .memory("256M")
        .serial_tty()
        .args(["--disk", disk.as_str()])
        .args(["--api-socket", socket.to_str().expect("path")])
        .spawn()
        .expect("start the source VMM");
    wait_for_api_socket(&mut source, &socket, TIMEOUT);
    source
        .wait_for("DIRTY progress", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    ok(&source, &socket, &["pause"]);
    let url = format!("file://{}", snap.display());
    ok(&source, &socket, &["snapshot", &url]);
    for file in ["config.json", "state.json", "memory-ranges"] {
        assert!(snap.join(file).exists(), "snapshot lacks {file}");
    }
    let before = source.console();
    assert!(
        !before.contains("DIRTY result"),
        "the workload ended before the snapshot"
    );
    source.kill();

    // The same disk image: the source has released its lock by exiting.
    let restore = format!("source_url={url},resume=on");
    let mut restored = Vmm::builder("snapshot_restored")
        .args(["--restore", restore.as_str()])
        .spawn()
        .expect("start the restoring VMM");
    let result = restored
        .wait_for("DIRTY result", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(result.line.contains("verify=ok"), "{}", result.line);
    restored
        .wait_for("TANDEM-GUEST DONE", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = restored.wait_exit(TIMEOUT).expect("restored VMM exits");
    assert_eq!(status.code(), Some(0), "{}", restored.diagnose("exit code"));
    report(&format!(
        "snapshot: restored guest finished: {}",
        result.line.trim()
    ));
}

#[test]
fn damaged_snapshots_are_refused_before_a_vm_exists() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("snapshot_bad").expect("temp dir");
    let guest = test_guest().expect("guest");
    let socket = dir.join("api.sock");
    let snap = dir.join("snap");
    let mut source = Vmm::builder("snapshot_bad_source")
        .kernel(&guest)
        .cmdline("workload=hello exit=halt")
        .memory("64M")
        .serial_tty()
        .args(["--api-socket", socket.to_str().expect("path")])
        .spawn()
        .expect("start");
    wait_for_api_socket(&mut source, &socket, TIMEOUT);
    source
        .wait_for("TANDEM-GUEST DONE", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    // A running VM cannot be snapshotted (CH requires a pause first).
    let out = ch_remote(
        &socket,
        &["snapshot", &format!("file://{}", snap.display())],
        None,
    );
    assert!(!out.status.success(), "snapshot of a running VM must fail");
    ok(&source, &socket, &["pause"]);
    ok(
        &source,
        &socket,
        &["snapshot", &format!("file://{}", snap.display())],
    );
    source.kill();

    let restore_fails = |label: &str, words: &[&str]| {
        let arg = format!("source_url=file://{},resume=on", snap.display());
        let mut vmm = Vmm::builder(label)
            .args(["--restore", arg.as_str()])
            .spawn()
            .expect("start");
        let status = vmm.wait_exit(TIMEOUT).expect("exits");
        let stderr = vmm.stderr();
        assert!(
            !status.success(),
            "{}",
            vmm.diagnose("damaged snapshot accepted")
        );
        assert!(
            words.iter().any(|w| stderr.contains(w)) && !stderr.contains("panicked"),
            "{}",
            vmm.diagnose(&format!("error should mention one of {words:?}"))
        );
    };

    // Truncated memory file.
    let memory = snap.join("memory-ranges");
    let full = std::fs::read(&memory).expect("memory file");
    std::fs::write(&memory, &full[..full.len() / 2]).expect("truncate");
    restore_fails("restore_truncated", &["memory-ranges"]);
    // One flipped byte in memory.
    let mut flipped = full.clone();
    flipped[12345] ^= 0x40;
    std::fs::write(&memory, &flipped).expect("flip");
    restore_fails("restore_flipped", &["checksum"]);
    std::fs::write(&memory, &full).expect("restore memory file");
    // Edited state.
    let state_path = snap.join("state.json");
    let state = std::fs::read_to_string(&state_path).expect("state");
    let edited = state.replacen("\"version\": 2", "\"version\": 7", 1);
    assert_ne!(edited, state, "state.json should name snapshot version 2");
    std::fs::write(&state_path, edited).expect("edit");
    restore_fails("restore_version", &["version"]);
    std::fs::write(&state_path, &state).expect("put state back");
    std::fs::remove_file(snap.join("config.json")).expect("remove config");
    restore_fails("restore_no_config", &["config.json"]);
}

/// Where each device sits, from `vm.info`'s device tree: id -> BDF.
fn placement(vmm: &Vmm, socket: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    let out = ch_remote(socket, &["info"], None);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("vm.info: {e}"))));
    let tree = info["device_tree"].as_object().expect("device_tree");
    tree.values()
        .filter_map(|node| {
            let bdf = node["pci_bdf"].as_str()?;
            let child = node["children"].as_array()?.first()?.as_str()?;
            Some((child.to_string(), bdf.to_string()))
        })
        .collect()
}

/// A disk hot-plugged into a running VM keeps its PCI slot when the VM is snapshotted and
/// restored in another process (the configuration pins every device), although built from the
/// configuration in Cloud Hypervisor's order it would come before the entropy device; the
/// restored guest finishes its memory check.
#[test]
fn a_hot_plugged_disk_keeps_its_slot_across_snapshot_and_restore() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("snapshot_hotplug").expect("temp dir");
    let guest = test_guest().expect("guest");
    let (first, second) = (dir.join("first.img"), dir.join("second.img"));
    for image in [&first, &second] {
        std::fs::write(image, vec![0u8; 1 << 20]).expect("image");
    }
    let socket = dir.join("api.sock");
    let snap = dir.join("snap");
    let disk = format!("path={}", first.display());
    let mut source = Vmm::builder("snapshot_hotplug_source")
        .kernel(&guest)
        .cmdline("workload=dirty dirty.mib=16 dirty.rate=50 dirty.ms=3000")
        .memory("128M")
        .serial_tty()
        .args(["--disk", disk.as_str(), "--rng", "src=/dev/urandom"])
        .args(["--api-socket", socket.to_str().expect("path")])
        .spawn()
        .expect("start the source VMM");
    wait_for_api_socket(&mut source, &socket, TIMEOUT);
    source
        .wait_for("DIRTY progress", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let added = format!("path={}", second.display());
    let out = ch_remote(&socket, &["add-disk", added.as_str()], None);
    assert!(out.status.success(), "{}", source.diagnose("add-disk"));
    let before = placement(&source, &socket);
    assert_eq!(
        before.get("_disk1").map(String::as_str),
        Some("0000:00:03.0"),
        "{before:?}"
    );
    assert_eq!(
        before.get("_rng").map(String::as_str),
        Some("0000:00:02.0"),
        "{before:?}"
    );

    ok(&source, &socket, &["pause"]);
    let url = format!("file://{}", snap.display());
    ok(&source, &socket, &["snapshot", &url]);
    source.kill();

    let restored_socket = dir.join("restored.sock");
    let restore = format!("source_url={url},resume=on");
    let mut restored = Vmm::builder("snapshot_hotplug_restored")
        .args(["--restore", restore.as_str()])
        .args(["--api-socket", restored_socket.to_str().expect("path")])
        .spawn()
        .expect("start the restoring VMM");
    wait_for_api_socket(&mut restored, &restored_socket, TIMEOUT);
    let after = placement(&restored, &restored_socket);
    assert_eq!(after, before, "{}", restored.diagnose("device placement"));
    let result = restored
        .wait_for("DIRTY result", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(result.line.contains("verify=ok"), "{}", result.line);
    report(&format!(
        "snapshot: hot-plugged disk kept its slot: {after:?}"
    ));
}
