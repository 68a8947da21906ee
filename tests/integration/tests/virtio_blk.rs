//! virtio-blk end to end: the test guest's driver writes sequence-numbered, checksummed
//! sectors through our virtio-pci transport and block device; the host reads the image file
//! and checks every sector; a second boot verifies the data survived; the image lock keeps a
//! second VMM out.

use std::time::Duration;

use integration::{kvm_serial_guard, report, require_kvm, test_guest, TempDir, Vmm};

const TIMEOUT: Duration = Duration::from_secs(120);
const SECTOR: usize = 512;
const MAGIC: u64 = u64::from_le_bytes(*b"TANDEMBK");

fn sector_checksum(words: &[u64; 64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, &x) in words.iter().enumerate() {
        if i != 3 {
            h = (h ^ x).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Checks the guest's sector format (guest/README.md) for `sectors` sectors from the start.
fn verify_image(image: &[u8], sectors: usize, seq: u64) {
    for lba in 0..sectors {
        let bytes = &image[lba * SECTOR..(lba + 1) * SECTOR];
        let words: [u64; 64] = std::array::from_fn(|i| {
            u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        });
        assert_eq!(words[0], MAGIC, "sector {lba}: magic");
        assert_eq!(words[1], lba as u64, "sector {lba}: sector number");
        assert_eq!(words[2], seq, "sector {lba}: run number");
        assert_eq!(words[3], sector_checksum(&words), "sector {lba}: checksum");
    }
}

fn blk_vmm(name: &str, image: &std::path::Path, cmdline: &str, dir: Option<TempDir>) -> Vmm {
    let guest = test_guest().expect("build the test guest");
    let disk = format!("path={},id=disk0", image.display());
    let mut builder = Vmm::builder(name)
        .kernel(&guest)
        .cmdline(cmdline)
        .memory("512M")
        .serial_tty()
        .args(["--disk", disk.as_str()]);
    if let Some(dir) = dir {
        builder = builder.temp_dir(dir);
    }
    builder.spawn().expect("start the VMM")
}

fn expect_exit_zero(vmm: &mut Vmm) {
    let status = vmm.wait_exit(Duration::from_secs(30)).expect("VMM exits");
    assert_eq!(status.code(), Some(0), "{}", vmm.diagnose("VMM exit code"));
}

#[test]
fn guest_disk_writes_reach_the_image_and_survive_a_restart() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("blk_restart").expect("temp dir");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .expect("create image");

    let mut vmm = blk_vmm(
        "blk_write",
        &image,
        "workload=blk blk.mib=16 blk.seq=7 blk.req_kib=64",
        None,
    );
    let result = vmm
        .wait_for("BLK result", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(result.line.contains("verify=ok"), "{}", result.line);
    let id = vmm
        .wait_for("BLK id=", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        id.line.contains("disk0"),
        "GET_ID should return the disk id: {}",
        id.line
    );
    report(&format!("blk_write: {}", result.line.trim()));
    expect_exit_zero(&mut vmm);

    // The host sees exactly what the guest wrote, sector by sector.
    let bytes = std::fs::read(&image).expect("read image");
    verify_image(&bytes, (16 << 20) / SECTOR, 7);
    assert!(
        bytes[(16 << 20)..].iter().all(|&b| b == 0),
        "nothing past the written region may change"
    );

    // A fresh VMM process reads the same data back through the device.
    let mut vmm = blk_vmm(
        "blk_verify",
        &image,
        "workload=blk blk.mib=16 blk.seq=7 blk.verify_only=1",
        Some(dir),
    );
    let result = vmm
        .wait_for("BLK result", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(result.line.contains("verify=ok"), "{}", result.line);
    expect_exit_zero(&mut vmm);
}

#[test]
fn a_second_vmm_cannot_open_a_disk_image_in_use() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("blk_lock").expect("temp dir");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(8 << 20))
        .expect("create image");
    let mut first = blk_vmm("blk_lock_first", &image, "workload=hello exit=halt", None);
    first
        .wait_for("TANDEM-GUEST READY", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut second = blk_vmm("blk_lock_second", &image, "workload=hello", Some(dir));
    let status = second
        .wait_exit(Duration::from_secs(30))
        .expect("second VMM exits");
    assert!(
        !status.success(),
        "{}",
        second.diagnose("second VMM must fail")
    );
    let stderr = second.stderr();
    assert!(
        stderr.contains("locked") && !stderr.contains("panicked"),
        "{}",
        second.diagnose("the error must say the image is locked")
    );
    first.kill();
}

#[test]
fn readonly_disk_refuses_guest_writes() {
    require_kvm!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("blk_ro").expect("temp dir");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0xa5u8; 4 << 20]).expect("create image");
    let guest = test_guest().expect("guest");
    let disk = format!("path={},readonly=on", image.display());
    let mut vmm = Vmm::builder("blk_ro")
        .kernel(&guest)
        .cmdline("workload=blk blk.mib=1")
        .memory("512M")
        .serial_tty()
        .args(["--disk", disk.as_str()])
        .spawn()
        .expect("start");
    let line = vmm
        .wait_for("BLK ", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    // The guest sees the RO feature (or its write fails); either way the image is untouched.
    let _ = vmm.wait_for("TANDEM-GUEST DONE", TIMEOUT);
    assert!(
        vmm.console().contains("ro=1") || !vmm.console().contains("verify=ok"),
        "guest wrote to a read-only disk: {}",
        line.line
    );
    let bytes = std::fs::read(&image).expect("read image");
    assert!(
        bytes.iter().all(|&b| b == 0xa5),
        "read-only image was modified"
    );
}
