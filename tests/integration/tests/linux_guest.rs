//! Slow tier: a small real Linux (Debian's `linux-source-6.1`, built with its busybox initramfs
//! and ext4 disk image by `ci/build-linux-guest`) under our VMM on Cloud Hypervisor's machine:
//! 2 vCPUs, ACPI (hardware-reduced: MADT, MCFG, DSDT with the PCI host bridge, COM1 and a GED
//! power button), and a PCI bus with virtio-pci (MSI-X) devices: a virtio-blk disk, a
//! virtio-net TAP in a namespace made for the test, a virtio-rng, and in one boot a
//! virtio-console as the kernel's console (`console=hvc0`). Linux's own ACPI, PCI and virtio
//! drivers, ext4, TCP/IP stack and tools check our machine, which the project's own test guest
//! cannot do independently (it shares our reading of the specifications).
//!
//! The guest's `/init` (ci/linux-guest/init.c) prints `LINUX-GUEST ...` marker lines, runs the
//! checks named by `tg.checks=` on its command line (`pci`, `rng`, `hvc`, `blk`, `ping`, `tcp`,
//! then `serve` or `wait`), serves line commands on TCP port 5001 (`info`, `ping`, `tcp`,
//! `write`, `read`, `seq`, `klog`, `poweroff`) and powers the VM off with
//! `reboot(RB_POWER_OFF)`: the kernel enters ACPI S5 through the FADT's sleep control register,
//! which ends our VMM with exit code 0. A press of the ACPI power button (`ch-remote
//! power-button`) reaches /init as SIGPWR (the kernel's tiny power-button driver), and /init
//! shuts down the same way: unmount, sync, power off.
//!
//! On this project's CI machines guest CPL0 code is emulated by a nested KVM (DESIGN.md,
//! section 2), so a boot to the ready marker takes about 30 s there. The binary therefore boots
//! Linux once ([`booted`], shared by its tests): that boot runs the cold checks, and the VM is
//! snapshotted while `/init` waits for commands; the other tests restore that snapshot (about
//! a second) instead of booting again: a plain restore, a restore shut down by the power
//! button, and a restore that becomes the primary of a fault-tolerant pair whose primary is then
//! killed. Two more boots: one has its console on the virtio-console; one has a virtio-vsock
//! (Cloud Hypervisor's hybrid vsock, as Kata's agent uses it) and two virtio-pmem devices
//! (writable, and `discard_writes` as Kata's root file system), shared by the vsock and pmem
//! tests.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use integration::linux_guest::{
    check_pci_marker, fnv, linux_assets, new_token, read_line_from, vsock_echo, wait_step, Ctl,
    QUIRKS_CMDLINE,
};
use integration::{
    api_vmm, ch_remote, kvm_serial_guard, marker_fields, report, require_kvm, require_netns,
    scratch_dir, two_hosts, NetNs, TempDir, Vmm, HOST_B,
};

const HOST_IP: &str = "192.168.249.1";
const GUEST_IP: &str = "192.168.249.2";
const GUEST_MAC: &str = "12:34:56:78:9a:bd";
/// The TAP every VM of this file uses: the snapshot's configuration names it, and the FT hosts
/// of `two_hosts` have one by that name.
const TAP: &str = "tapvm";
const TCP_PORT: u16 = 5000;
/// /init's command service (`tg.ctl=`, its default).
const CTL_PORT: u16 = 5001;
/// Bytes the host sends through the guest's TCP echo at the cold boot (every packet is
/// processed by emulated guest kernel code on the CI machines, ~100 KiB/s, so this stays
/// modest), and after a restore.
const TCP_BYTES: usize = 1 << 20;
const RESTORED_TCP_BYTES: usize = 256 << 10;
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// The console of the boot the other tests restore: the serial port (COM1), from the first
/// instruction on (earlyprintk).
const SERIAL_CONSOLE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200";
/// The console as Cloud Hypervisor's users have it: the virtio-console (`--console tty
/// --serial null`).
const HVC_CONSOLE: &str = "console=hvc0";
/// Modern virtio-pci device IDs (0x1040 + the virtio device type).
const VIRTIO_NET_ID: &str = "1041";
const VIRTIO_BLK_ID: &str = "1042";
const VIRTIO_CONSOLE_ID: &str = "1043";
const VIRTIO_RNG_ID: &str = "1044";
const VIRTIO_VSOCK_ID: &str = "1053";
const VIRTIO_PMEM_ID: &str = "105b";
/// Where the VMM's virtio-rng reads its entropy (Cloud Hypervisor's default).
const RNG_ARG: &str = "src=/dev/urandom";
/// Kernel log words that tell of a kernel problem, on the serial console (where /init lets
/// only messages of KERN_ERR and up through once it runs).
const KERNEL_TROUBLE: [&str; 10] = [
    "Kernel panic",
    "Oops",
    "BUG:",
    "WARNING:",
    "Call Trace",
    "soft lockup",
    "detected stall",
    "general protection",
    "emulation failure",
    "LINUX-GUEST FAIL",
];

/// The first console line that tells of a kernel problem, if any.
fn kernel_trouble(console: &str) -> Option<String> {
    console
        .lines()
        .find(|l| KERNEL_TROUBLE.iter().any(|w| l.contains(w)))
        .map(str::to_string)
}

/// Sends `bytes` pseudo-random bytes to the guest's echo and reads them back; returns
/// (FNV-1a of what was sent, of what came back, bytes back, seconds).
fn tcp_echo(bytes: usize) -> Result<(u64, u64, usize, f64), String> {
    let addr: SocketAddr = format!("{GUEST_IP}:{TCP_PORT}").parse().expect("address");
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
        .map_err(|e| format!("connect to the guest: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> Result<u64, String> {
        let mut data = vec![0u8; bytes];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for chunk in data.chunks(16 << 10) {
            writer.write_all(chunk).map_err(|e| format!("send: {e}"))?;
        }
        writer
            .shutdown(Shutdown::Write)
            .map_err(|e| e.to_string())?;
        Ok(fnv(&data, 0xcbf2_9ce4_8422_2325))
    });
    let mut reader = stream;
    let mut back = 0usize;
    let mut sum = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("receive after {back} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        sum = fnv(&buf[..n], sum);
        back += n;
    }
    let sent = sender.join().map_err(|_| "sender panicked".to_string())??;
    Ok((sent, sum, back, start.elapsed().as_secs_f64()))
}

fn ping_from(ns: &NetNs, target: &str) -> std::process::Output {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "ping",
            "-c",
            "3",
            "-W",
            "5",
            target,
        ])
        .output()
        .expect("run ping")
}

/// `debugfs -R "cat PATH" IMAGE`: reads a file of the ext4 image without mounting it.
fn read_from_image(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)");
    assert!(
        out.status.success(),
        "debugfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace whose TAP `tapvm` is the guest's peer at [`HOST_IP`] (the VMM attaches to the
/// TAP by name, as the snapshot's configuration says).
fn guest_namespace(label: &str) -> Result<NetNs, String> {
    let ns = NetNs::new(label).map_err(|e| e.to_string())?;
    for args in [
        &["tuntap", "add", TAP, "mode", "tap", "vnet_hdr"][..],
        &["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP],
        &["link", "set", TAP, "up"],
    ] {
        ns.ip(args).map_err(|e| e.to_string())?;
    }
    Ok(ns)
}

/// Asserts that `reply` starts with `want`, with the VMM's diagnostics otherwise.
fn expect_reply(vmm: &Vmm, reply: Result<String, String>, want: &str) -> String {
    match reply {
        Ok(line) if line.starts_with(want) => line,
        Ok(line) => panic!(
            "{}",
            vmm.diagnose(&format!("expected a reply {want:?}, got {line:?}"))
        ),
        Err(e) => panic!("{}", vmm.diagnose(&e)),
    }
}

/// `tcp` on the control connection, then the echo of `bytes` from `ns`, checksummed on both
/// sides. Returns seconds.
fn tcp_transfer(vmm: &Vmm, ctl: &mut Ctl, ns: &NetNs, bytes: usize) -> f64 {
    expect_reply(vmm, ctl.cmd("tcp"), "tcp listening");
    let (sent, back, back_len, secs) = ns
        .run(move || tcp_echo(bytes))
        .expect("enter the namespace")
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("TCP echo: {e}"))));
    assert_eq!(back_len, bytes, "{}", vmm.diagnose("echoed byte count"));
    assert_eq!(sent, back, "{}", vmm.diagnose("echoed data differs"));
    let done = expect_reply(vmm, ctl.line("tcp"), "tcp ok");
    let fields = marker_fields(&done);
    assert_eq!(
        fields.get("bytes").map(String::as_str),
        Some(bytes.to_string().as_str()),
        "{}",
        vmm.diagnose(&done)
    );
    assert_eq!(
        fields.get("fnv").map(String::as_str),
        Some(format!("{sent:016x}").as_str()),
        "{}",
        vmm.diagnose("the guest's checksum of the received data differs")
    );
    secs
}

/// `info` -> both CPUs online.
fn check_cpus(vmm: &Vmm, ctl: &mut Ctl) -> String {
    let info = expect_reply(vmm, ctl.cmd("info"), "info ");
    let fields = marker_fields(&info);
    assert_eq!(
        (
            fields.get("cpus").map(String::as_str),
            fields.get("online").map(String::as_str)
        ),
        (Some("2"), Some("0-1")),
        "{}",
        vmm.diagnose(&format!("both vCPUs should be online: {info}"))
    );
    info
}

/// The guest's own kernel log holds no oops, BUG, WARNING, stall...
fn check_klog(vmm: &Vmm, ctl: &mut Ctl) {
    expect_reply(vmm, ctl.cmd("klog"), "klog ok");
}

/// `poweroff` -> /init unmounts, syncs and calls reboot(RB_POWER_OFF): the kernel enters ACPI
/// S5 and the VMM exits 0.
fn power_off(vmm: &mut Vmm, ctl: &mut Ctl) {
    expect_reply(vmm, ctl.cmd("poweroff"), "poweroff ok");
    expect_clean_exit(vmm, "the guest's poweroff");
}

/// /init's `DONE failures=0`, then the VMM's exit with code 0 (the guest's ACPI S5).
fn expect_clean_exit(vmm: &mut Vmm, what: &str) {
    let done = wait_step(vmm, "LINUX-GUEST DONE", STEP_TIMEOUT);
    assert!(done.contains("failures=0"), "{}", vmm.diagnose(&done));
    let status = vmm
        .wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        vmm.diagnose(&format!("{what} should end the VMM with exit code 0"))
    );
}

/// `ch-remote power-button` -> /init sees the press (SIGPWR from the kernel's ACPI power-button
/// driver), unmounts, syncs and powers off: the VMM exits 0.
fn power_button(vmm: &mut Vmm, socket: &Path) {
    let out = ch_remote(socket, &["power-button"], None);
    assert!(
        out.status.success(),
        "{}",
        vmm.diagnose(&format!(
            "ch-remote power-button: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    );
    wait_step(vmm, "LINUX-GUEST POWER-BUTTON pressed", STEP_TIMEOUT);
    expect_clean_exit(vmm, "a power-button press");
}

/// The ext4 image was unmounted cleanly: its journal needs no recovery (a mounted ext4, or one
/// whose guest stopped without unmounting it, has the `needs_recovery` feature set).
fn assert_cleanly_unmounted(image: &Path) {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .expect("run dumpe2fs (e2fsprogs)");
    let text = String::from_utf8_lossy(&out.stdout);
    let features = text
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_else(|| panic!("dumpe2fs -h {}: no features line: {text}", image.display()));
    assert!(
        !features.contains("needs_recovery"),
        "{}: the guest did not unmount its ext4 cleanly ({features})",
        image.display()
    );
}

/// /init's `RNG` marker: 64 bytes of /dev/hwrng from the virtio-rng, not constant.
fn check_rng_marker(line: &str) {
    let fields = marker_fields(line);
    assert!(line.contains("RNG ok"), "{line}");
    assert_eq!(
        fields.get("bytes").map(String::as_str),
        Some("64"),
        "{line}"
    );
    let distinct: usize = fields
        .get("distinct")
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    assert!(distinct >= 16, "/dev/hwrng bytes look constant: {line}");
    assert!(
        fields
            .get("current")
            .is_some_and(|c| c.starts_with("virtio_rng")),
        "/dev/hwrng is not the virtio-rng: {line}"
    );
}

// ---------------------------------------------------------------------------------------------
// The one boot of this binary
// ---------------------------------------------------------------------------------------------

/// Creates this process's snapshot directory (`linux-snap-<pid>` under the scratch
/// directory): removed when the process exits, and by the next run if this one was killed.
fn make_snapshot_home() -> Result<PathBuf, String> {
    let scratch = scratch_dir();
    fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let home = integration::process_dir(&scratch, "linux-snap-");
    let _ = fs::remove_dir_all(&home);
    fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
    Ok(home)
}

/// The snapshot of a booted Linux, and what its boot measured.
struct Booted {
    /// `file://` URL of the snapshot directory.
    url: String,
    /// The disk image path the snapshot's configuration names (every restore uses it).
    disk: PathBuf,
    /// A copy of that image made while the VM was paused for the snapshot.
    disk_at_snapshot: PathBuf,
    /// The token the boot's `blk` check wrote into `/guest.txt` before the snapshot.
    token: String,
    home: PathBuf,
    /// VMM start -> `LINUX-GUEST READY`, and -> the command service listening.
    ready: Duration,
    serving: Duration,
    /// The guest's uptime when the snapshot was taken (as the pause returned; the snapshot
    /// reads the guest's clock right after).
    uptime_at_snapshot: Duration,
    /// /init's `PCI` and `RNG` marker lines of the boot.
    pci: String,
    rng: String,
}

impl Booted {
    /// Puts the disk image back as it was at the snapshot (the boot, and every restore, wrote to
    /// it after that). Call it while holding the KVM boot lock, before starting a restore.
    fn reset_disk(&self) {
        fs::copy(&self.disk_at_snapshot, &self.disk).expect("put the snapshot's disk image back");
    }
}

/// Boots Linux once per test binary (the first test to get here does it; the others wait) and
/// snapshots it. The boot checks the guest on its way, like any test: a failure is recorded
/// and every test that needs the snapshot fails with it.
fn booted() -> &'static Result<Booted, String> {
    static BOOTED: OnceLock<Result<Booted, String>> = OnceLock::new();
    BOOTED.get_or_init(|| {
        std::panic::catch_unwind(boot_and_snapshot).unwrap_or_else(|panic| {
            Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the boot panicked".into()))
        })
    })
}

/// Boots Linux with 2 vCPUs, checks it (CPUs, virtio devices on PCI, /dev/hwrng, ext4 on
/// virtio-blk, ping both ways, TCP with checksums), snapshots it while /init waits for commands, resumes it, checks it again and
/// powers it off (exit code 0, the guest's writes in the image).
fn boot_and_snapshot() -> Result<Booted, String> {
    let assets = linux_assets()?;
    let home = make_snapshot_home()?;
    let disk = home.join("disk.img");
    fs::copy(&assets.disk, &disk).map_err(|e| format!("copy the disk image: {e}"))?;
    let _boot = kvm_serial_guard();
    let ns = guest_namespace("lg")?;
    let token = new_token("boot");
    let cmdline = format!(
        "{SERIAL_CONSOLE} {QUIRKS_CMDLINE} tg.ip={GUEST_IP}/24 tg.peer={HOST_IP} \
         tg.port={TCP_PORT} tg.ctl={CTL_PORT} tg.token={token} \
         tg.checks=pci,rng,blk,ping,tcp,serve"
    );
    let socket = home.join("boot.sock");
    let initramfs_arg = assets.initramfs.display().to_string();
    let disk_arg = format!("path={}", disk.display());
    let net_arg = format!("tap={TAP},mac={GUEST_MAC}");
    let mut vmm = Vmm::builder("linux_guest")
        .wrapped_in(ns.exec_prefix())
        .kernel(&assets.vmlinux)
        .args(["--initramfs", initramfs_arg.as_str()])
        .cmdline(&cmdline)
        .cpus(2)
        .memory("256M")
        .serial_tty()
        .args(["--disk", disk_arg.as_str(), "--net", net_arg.as_str()])
        .args(["--rng", RNG_ARG])
        .args(["--api-socket", socket.to_str().expect("path")])
        .spawn()
        .map_err(|e| e.to_string())?;

    // Both CPUs online (Linux's own count, from /sys/devices/system/cpu/online).
    let ready = wait_step(&mut vmm, "LINUX-GUEST READY", BOOT_TIMEOUT);
    let ready_after = vmm.elapsed();
    report(&format!(
        "linux_guest: '{ready}' after {} ms",
        ready_after.as_millis()
    ));
    let fields = marker_fields(&ready);
    assert_eq!(
        fields.get("cpus").map(String::as_str),
        Some("2"),
        "{}",
        vmm.diagnose("both vCPUs should be online")
    );

    // The devices as the guest found them on PCI, and /dev/hwrng: asserted by their own tests
    // (linux_guest_finds_*), which read these lines.
    let pci = wait_step(&mut vmm, "LINUX-GUEST PCI", STEP_TIMEOUT);
    report(&format!("linux_guest: {pci}"));
    let rng = wait_step(&mut vmm, "LINUX-GUEST RNG", STEP_TIMEOUT);

    let net = wait_step(&mut vmm, "LINUX-GUEST NET", STEP_TIMEOUT);
    assert!(net.contains(GUEST_MAC), "{}", vmm.diagnose(&net));

    // ext4 on virtio-blk: the file the build put in the image is read by the guest.
    let blk = wait_step(&mut vmm, "LINUX-GUEST BLK", STEP_TIMEOUT);
    assert!(
        blk.contains("BLK ok") && blk.contains("hello from the host image"),
        "{}",
        vmm.diagnose(&blk)
    );

    // busybox ping in the guest -> the namespace's TAP address.
    let ping = wait_step(&mut vmm, "LINUX-GUEST PING", STEP_TIMEOUT);
    assert!(ping.contains("PING ok"), "{}", vmm.diagnose(&ping));

    wait_step(&mut vmm, "LINUX-GUEST TCP listening", STEP_TIMEOUT);
    // Linux's ping in the namespace -> the guest kernel.
    let out = ping_from(&ns, GUEST_IP);
    assert!(
        out.status.success(),
        "ping of the guest failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        vmm.diagnose("ping from the namespace")
    );

    // TCP through the guest's echo, checksummed on both sides.
    let (sent, back, back_len, secs) = ns
        .run(|| tcp_echo(TCP_BYTES))
        .map_err(|e| e.to_string())?
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("TCP echo: {e}"))));
    assert_eq!(back_len, TCP_BYTES, "{}", vmm.diagnose("echoed byte count"));
    assert_eq!(sent, back, "{}", vmm.diagnose("echoed data differs"));
    let tcp = wait_step(&mut vmm, "LINUX-GUEST TCP ok", STEP_TIMEOUT);
    let fields = marker_fields(&tcp);
    assert_eq!(
        fields.get("bytes").map(String::as_str),
        Some(TCP_BYTES.to_string().as_str()),
        "{}",
        vmm.diagnose(&tcp)
    );
    assert_eq!(
        fields.get("fnv").map(String::as_str),
        Some(format!("{sent:016x}").as_str()),
        "{}",
        vmm.diagnose("the guest's checksum of the received data differs")
    );
    report(&format!(
        "linux_guest: TCP echo of {} KiB in {secs:.1} s ({:.0} KiB/s each way)",
        TCP_BYTES >> 10,
        (TCP_BYTES >> 10) as f64 / secs
    ));

    // /init synced its disk and waits for commands: snapshot it there (pause, snapshot, copy
    // the disk image as the paused guest left it, resume).
    let listening = wait_step(&mut vmm, "LINUX-GUEST SERVE listening", STEP_TIMEOUT);
    let serving = vmm.elapsed();
    let serve_uptime = marker_fields(&listening)
        .get("uptime_ms")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_else(|| panic!("{}", vmm.diagnose(&format!("no uptime in {listening:?}"))));
    let snap = home.join("snap");
    let url = format!("file://{}", snap.display());
    let disk_at_snapshot = home.join("disk-at-snapshot.img");
    let snapshot_started = Instant::now();
    let mut uptime_at_snapshot = Duration::ZERO;
    for args in [&["pause"][..], &["snapshot", &url]] {
        let out = ch_remote(&socket, args, None);
        assert!(
            out.status.success(),
            "{}",
            vmm.diagnose(&format!(
                "ch-remote {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        );
        if args == ["pause"] {
            // The guest printed its uptime just before the marker arrived; the snapshot reads
            // the guest's clock right after the pause.
            uptime_at_snapshot = serve_uptime + (vmm.elapsed() - serving);
        }
    }
    fs::copy(&disk, &disk_at_snapshot).map_err(|e| format!("copy the disk image: {e}"))?;
    let out = ch_remote(&socket, &["resume"], None);
    assert!(out.status.success(), "{}", vmm.diagnose("ch-remote resume"));
    report(&format!(
        "linux_guest: paused, snapshotted (256 MiB) and resumed in {:.1} s",
        snapshot_started.elapsed().as_secs_f64()
    ));

    // The resumed guest goes on: both CPUs, a file written, a clean kernel log, poweroff.
    let mut ctl = Ctl::connect(&ns, (GUEST_IP, CTL_PORT), STEP_TIMEOUT)?;
    check_cpus(&vmm, &mut ctl);
    let after = new_token("resumed");
    expect_reply(
        &vmm,
        ctl.cmd(&format!("write resumed.txt {after}")),
        "write ok",
    );
    check_klog(&vmm, &mut ctl);
    power_off(&mut vmm, &mut ctl);
    report(&format!(
        "linux_guest: ready after {:.1} s, serving commands after {:.1} s, powered off after {:.1} s",
        ready_after.as_secs_f64(),
        serving.as_secs_f64(),
        vmm.elapsed().as_secs_f64()
    ));
    if let Some(line) = kernel_trouble(&vmm.console()) {
        panic!("{}", vmm.diagnose(&format!("kernel trouble: {line}")));
    }

    // What the guest wrote is in the host's image after the VMM stopped.
    let written = read_from_image(&disk, "/guest.txt");
    assert!(
        written.contains(&format!("token={token}")),
        "/guest.txt in the image holds {written:?}, expected the token {token}"
    );
    assert_eq!(read_from_image(&disk, "/resumed.txt").trim(), after);
    assert_cleanly_unmounted(&disk);
    Ok(Booted {
        url,
        disk,
        disk_at_snapshot,
        token,
        home,
        ready: ready_after,
        serving,
        uptime_at_snapshot,
        pci,
        rng,
    })
}

fn booted_or_panic() -> &'static Booted {
    match booted() {
        Ok(b) => b,
        Err(e) => panic!("the boot this test starts from failed: {e}"),
    }
}

#[test]
fn linux_guest_boots_two_cpus_uses_ext4_disk_and_tcp_and_powers_off() {
    require_kvm!();
    require_netns!();
    // The checks run in the boot that every test of this file shares.
    let booted = booted_or_panic();
    assert!(booted.home.join("snap/state.json").exists());
}

#[test]
fn linux_guest_finds_virtio_blk_net_and_rng_on_pci_with_msix() {
    require_kvm!();
    require_netns!();
    let booted = booted_or_panic();
    check_pci_marker(&booted.pci, &[VIRTIO_NET_ID, VIRTIO_BLK_ID, VIRTIO_RNG_ID])
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn linux_guest_reads_random_bytes_from_the_virtio_rng() {
    require_kvm!();
    require_netns!();
    let booted = booted_or_panic();
    check_rng_marker(&booted.rng);
}

// ---------------------------------------------------------------------------------------------
// The virtio-console as the kernel's console, and the power button
// ---------------------------------------------------------------------------------------------

/// A boot as Cloud Hypervisor's users boot: `--console tty --serial null`, `console=hvc0`.
/// The kernel's log and /init's markers reach the VMM's stdout through the virtio-console
/// only; /init finds the console and rng on PCI, then waits for the power button, whose press
/// shuts the guest down cleanly (VMM exit code 0).
#[test]
fn linux_guest_console_on_hvc0_and_power_button_shut_down_cleanly() {
    require_kvm!();
    let assets = linux_assets().unwrap_or_else(|e| panic!("{e}"));
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("linux_hvc").expect("temp dir");
    let socket = dir.join("api.sock");
    let cmdline = format!("{HVC_CONSOLE} {QUIRKS_CMDLINE} tg.checks=pci,rng,hvc,wait");
    let initramfs_arg = assets.initramfs.display().to_string();
    let mut vmm = Vmm::builder("linux_hvc")
        .kernel(&assets.vmlinux)
        .args(["--initramfs", initramfs_arg.as_str()])
        .cmdline(&cmdline)
        .cpus(2)
        .memory("256M")
        // The console on stdout (where Vmm::wait_for reads) is the virtio-console.
        .args(["--console", "tty", "--serial", "null"])
        .args(["--rng", RNG_ARG])
        .args(["--api-socket", socket.to_str().expect("path")])
        .spawn()
        .expect("start the VMM");

    let ready = wait_step(&mut vmm, "LINUX-GUEST READY", BOOT_TIMEOUT);
    report(&format!(
        "linux_guest: console=hvc0: '{ready}' after {} ms",
        vmm.elapsed().as_millis()
    ));
    let hvc = wait_step(&mut vmm, "LINUX-GUEST HVC ok", STEP_TIMEOUT);
    assert!(
        marker_fields(&hvc)
            .get("consoles")
            .is_some_and(|c| c.split(',').any(|c| c == "hvc0")),
        "{}",
        vmm.diagnose(&format!("hvc0 should be the kernel's console: {hvc}"))
    );
    wait_step(
        &mut vmm,
        "LINUX-GUEST HVC written to /dev/hvc0",
        STEP_TIMEOUT,
    );
    // The kernel's own log comes through the virtio-console too, from the moment hvc0 is
    // registered (Linux 6.1's virtio-console drops the replay of the earlier log: the port
    // joins its console list only after the console registered, so the banner is not there).
    assert!(
        vmm.stdout().contains("Run /init as init process"),
        "{}",
        vmm.diagnose("no kernel log on the virtio-console")
    );
    let pci = wait_step(&mut vmm, "LINUX-GUEST PCI", STEP_TIMEOUT);
    check_pci_marker(&pci, &[VIRTIO_CONSOLE_ID, VIRTIO_RNG_ID])
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
    let rng = wait_step(&mut vmm, "LINUX-GUEST RNG", STEP_TIMEOUT);
    check_rng_marker(&rng);

    wait_step(&mut vmm, "LINUX-GUEST WAIT power-button", STEP_TIMEOUT);
    power_button(&mut vmm, &socket);
    if let Some(line) = kernel_trouble(&vmm.console()) {
        panic!("{}", vmm.diagnose(&format!("kernel trouble: {line}")));
    }
    report(&format!(
        "linux_guest: console=hvc0 boot shut down by the power button after {:.1} s",
        vmm.elapsed().as_secs_f64()
    ));
}

/// A restored guest (serving commands, its ext4 mounted and just written) shut down by the
/// power button: /init unmounts and syncs, the VMM exits 0, the image is clean and holds the
/// write.
#[test]
fn linux_guest_restored_shuts_down_cleanly_on_the_power_button() {
    require_kvm!();
    require_netns!();
    let booted = booted_or_panic();
    let _boot = kvm_serial_guard();
    booted.reset_disk();
    let ns = guest_namespace("lp").expect("namespace");
    let dir = TempDir::new("linux_pwrbtn").expect("temp dir");
    let socket = dir.join("api.sock");
    let restore = format!("source_url={},resume=on", booted.url);
    let mut vmm = Vmm::builder("linux_power_button")
        .wrapped_in(ns.exec_prefix())
        .args(["--restore", restore.as_str(), "-v"])
        .args(["--api-socket", socket.to_str().expect("path")])
        .spawn()
        .expect("start the restoring VMM");
    let mut ctl = Ctl::connect(&ns, (GUEST_IP, CTL_PORT), STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("restored guest: {e}"))));
    check_cpus(&vmm, &mut ctl);
    let token = new_token("button");
    expect_reply(
        &vmm,
        ctl.cmd(&format!("write button.txt {token}")),
        "write ok",
    );
    power_button(&mut vmm, &socket);
    if let Some(line) = kernel_trouble(&vmm.console()) {
        panic!("{}", vmm.diagnose(&format!("kernel trouble: {line}")));
    }
    assert_eq!(read_from_image(&booted.disk, "/button.txt").trim(), token);
    assert_cleanly_unmounted(&booted.disk);
    report(&format!(
        "linux_guest: restored guest shut down by the power button after {:.1} s",
        vmm.elapsed().as_secs_f64()
    ));
}

// ---------------------------------------------------------------------------------------------
// Restore
// ---------------------------------------------------------------------------------------------

#[test]
fn linux_guest_restored_from_a_snapshot_works_without_booting_again() {
    require_kvm!();
    require_netns!();
    let booted = booted_or_panic();
    let _boot = kvm_serial_guard();
    booted.reset_disk();
    let ns = guest_namespace("lr").expect("namespace");
    let restore = format!("source_url={},resume=on", booted.url);
    let mut vmm = Vmm::builder("linux_restored")
        .wrapped_in(ns.exec_prefix())
        .args(["--restore", restore.as_str(), "-v"])
        .spawn()
        .expect("start the restoring VMM");

    // Restore start -> the guest answering on the connection made after the restore.
    let mut ctl = Ctl::connect(&ns, (GUEST_IP, CTL_PORT), STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("restored guest: {e}"))));
    let info = check_cpus(&vmm, &mut ctl);
    let answered = vmm.elapsed();
    // The guest's clock goes on from the snapshot (kvm-clock state): it has run for at most
    // as long as this VMM, whatever time passed between the snapshot and the restore.
    let uptime = marker_fields(&info)
        .get("uptime_ms")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .expect("uptime in the info reply");
    let ran = uptime.saturating_sub(booted.uptime_at_snapshot);
    assert!(
        uptime
            >= booted
                .uptime_at_snapshot
                .saturating_sub(Duration::from_secs(1))
            && ran <= answered + Duration::from_secs(2),
        "{}",
        vmm.diagnose(&format!(
            "the guest's uptime was {:?} at the snapshot and is {uptime:?} {answered:?} after \
             the restore: its clock did not go on from the snapshot",
            booted.uptime_at_snapshot
        ))
    );
    report(&format!(
        "linux_guest: restore answered after {:.2} s ({info}; uptime at the snapshot {:.1} s); \
         cold boot: READY after {:.1} s, commands after {:.1} s ({:.0}x the restore)",
        answered.as_secs_f64(),
        booted.uptime_at_snapshot.as_secs_f64(),
        booted.ready.as_secs_f64(),
        booted.serving.as_secs_f64(),
        booted.serving.as_secs_f64() / answered.as_secs_f64()
    ));
    check_klog(&vmm, &mut ctl);

    // Ping both ways: the namespace -> the guest, the guest's busybox -> the namespace.
    let out = ping_from(&ns, GUEST_IP);
    assert!(
        out.status.success(),
        "ping of the restored guest failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        vmm.diagnose("ping from the namespace")
    );
    let mut ping = ctl.cmd(&format!("ping {HOST_IP}"));
    if let Some(line) = ping.as_ref().ok().filter(|l| l.contains("signal=")) {
        // Seen once on a heavily loaded CI machine, in a VM that was never paused: busybox
        // died of a #GP on a %fs-relative load (its TLS pointer read back as garbage), a quirk
        // of the nested KVM there. Not what this test is about: say so and try once more.
        report(&format!(
            "linux_guest: NOTE: busybox ping in the restored guest was killed ({line}); \
             trying once more"
        ));
        ping = ctl.cmd(&format!("ping {HOST_IP}"));
    }
    expect_reply(&vmm, ping, "ping ok");

    // TCP through the guest's echo, checksummed on both sides.
    let secs = tcp_transfer(&vmm, &mut ctl, &ns, RESTORED_TCP_BYTES);
    report(&format!(
        "linux_guest: restored guest: TCP echo of {} KiB in {secs:.1} s",
        RESTORED_TCP_BYTES >> 10
    ));

    // ext4 still usable: what the guest wrote before the snapshot is there, a new file goes
    // to the disk and reads back; the host sees both in the image after the poweroff.
    let token = new_token("restored");
    expect_reply(
        &vmm,
        ctl.cmd(&format!("write restored.txt {token}")),
        "write ok",
    );
    let back = expect_reply(&vmm, ctl.cmd("read restored.txt"), "read ok");
    assert_eq!(back, format!("read ok {token}"));
    let before = expect_reply(&vmm, ctl.cmd("read guest.txt"), "read ok");
    assert!(before.contains(&booted.token), "{before}");
    check_cpus(&vmm, &mut ctl);
    check_klog(&vmm, &mut ctl);
    power_off(&mut vmm, &mut ctl);
    if let Some(line) = kernel_trouble(&vmm.console()) {
        panic!("{}", vmm.diagnose(&format!("kernel trouble: {line}")));
    }
    assert_eq!(read_from_image(&booted.disk, "/restored.txt").trim(), token);
    assert!(read_from_image(&booted.disk, "/guest.txt").contains(&booted.token));
    report(&format!(
        "linux_guest: restored guest powered off after {:.1} s",
        vmm.elapsed().as_secs_f64()
    ));
}

// ---------------------------------------------------------------------------------------------
// Fault tolerance
// ---------------------------------------------------------------------------------------------

/// One `seq` exchange as the client saw it.
struct Exchange {
    n: u64,
    at: Instant,
}

/// A client exchanging numbered lines (`seq N` -> `seq N count=N`) back to back on one
/// connection, in a thread, until told to stop or a reply is wrong.
struct Numbered {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Exchange>>>,
    thread: Option<std::thread::JoinHandle<(Ctl, Result<(), String>)>>,
}

impl Numbered {
    fn start(mut ctl: Ctl) -> Numbered {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, l) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                // The guest counts `seq` commands since boot (and the snapshot holds none):
                // a repeated count would be output of a rolled-back guest, a gap a lost line.
                let want = format!("seq {n} count={n}");
                match ctl.cmd(&format!("seq {n}")) {
                    Ok(reply) if reply == want => {
                        l.lock().unwrap_or_else(|p| p.into_inner()).push(Exchange {
                            n,
                            at: Instant::now(),
                        })
                    }
                    Ok(reply) => return (ctl, Err(format!("sent seq {n}, got {reply:?}"))),
                    Err(e) => return (ctl, Err(e)),
                }
            }
            (ctl, Ok(()))
        });
        Numbered {
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn last(&self) -> u64 {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.last().map_or(0, |e| e.n)
    }

    fn first_after(&self, t: Instant) -> Option<Duration> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().find(|e| e.at > t).map(|e| e.at - t)
    }

    /// The longest time without a reply from the last reply before `t` on (a reply the
    /// primary released just before its death can arrive right after the kill; the silence
    /// is the failover as the client sees it).
    fn longest_silence_around(&self, t: Instant) -> Duration {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let from = log.iter().rposition(|e| e.at <= t).unwrap_or(0);
        log[from..]
            .windows(2)
            .map(|w| w[1].at - w[0].at)
            .max()
            .unwrap_or_default()
    }

    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits until `n` lines were answered (or the client failed).
    fn wait_for(&self, n: u64, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while self.last() < n {
            if self.finished() {
                return Err(format!("the client stopped at line {}", self.last()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "line {n} not answered within {timeout:?} (last {})",
                    self.last()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn stop(mut self) -> (Ctl, Result<(), String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("started")
            .join()
            .expect("client thread")
    }
}

#[test]
fn linux_guest_keeps_a_tcp_connection_across_the_kill_of_its_ft_primary() {
    require_kvm!();
    require_netns!();
    let booted = booted_or_panic();
    let _boot = kvm_serial_guard();
    // Replicated disks: the primary's image is the one the snapshot names, the backup's is a
    // copy of it (identical at the start, as receive-ft --disk-path requires).
    booted.reset_disk();
    let dir = TempDir::new("linux_ft").expect("temp dir");
    let backup_disk = dir.join("disk-b.img");
    fs::copy(&booted.disk_at_snapshot, &backup_disk).expect("copy the backup's disk");
    let hosts = two_hosts("lx");
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let restore = format!("source_url={},resume=on", booted.url);
    let mut primary = api_vmm(
        STEP_TIMEOUT,
        "linux_ft_primary",
        &hosts.a,
        &sock_a,
        &["--restore", &restore, "-v"],
    );
    let mut backup = api_vmm(STEP_TIMEOUT, "linux_ft_backup", &hosts.b, &sock_b, &["-v"]);
    let url = format!("tcp:{HOST_B}:7300");
    let backup_disk_arg = backup_disk.display().to_string();
    let out = ch_remote(
        &sock_b,
        &[
            "receive-ft",
            &url,
            "--disk-path",
            &backup_disk_arg,
            "--tap",
            TAP,
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        backup.diagnose(&format!(
            "receive-ft: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    );
    let sync_started = Instant::now();
    let out = ch_remote(
        &sock_a,
        &[
            "enable-ft",
            "--peer",
            &format!("{HOST_B}:7300"),
            "--heartbeat-timeout-ms",
            "1000",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "enable-ft: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        primary.diagnose("primary"),
        backup.diagnose("backup")
    );
    let sync = sync_started.elapsed();
    integration::ft::wait_status(&sock_a, "health", &["protected"], STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", primary.diagnose("primary")));

    // One connection from the client namespace, kept for the whole test.
    let mut ctl = Ctl::connect(&hosts.client, (GUEST_IP, CTL_PORT), STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}", primary.diagnose(&e)));
    check_cpus(&primary, &mut ctl);
    let client = Numbered::start(ctl);
    client
        .wait_for(40, STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}", primary.diagnose(&e)));
    let protected = integration::ft::ft_status(&sock_a);
    assert!(
        protected["last_committed_epoch"].as_u64().unwrap_or(0) > 1,
        "{protected}"
    );

    primary.kill();
    let killed = Instant::now();
    let at_kill = client.last();
    if let Some(line) = kernel_trouble(&primary.console()) {
        panic!("{}", primary.diagnose(&format!("kernel trouble: {line}")));
    }
    let took_over = integration::ft::wait_status(&sock_b, "health", &["took_over"], STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", backup.diagnose("backup")));
    client
        .wait_for(at_kill + 40, STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}", backup.diagnose(&format!("after the failover: {e}"))));
    let first_reply = client.first_after(killed).expect("a reply after the kill");
    let silence = client.longest_silence_around(killed);
    let lines = client.last();
    let (mut ctl, result) = client.stop();
    result.unwrap_or_else(|e| panic!("{}", backup.diagnose(&e)));

    // The same connection goes on against the backup: the guest is whole.
    check_cpus(&backup, &mut ctl);
    check_klog(&backup, &mut ctl);
    let token = new_token("failover");
    expect_reply(
        &backup,
        ctl.cmd(&format!("write failover.txt {token}")),
        "write ok",
    );
    if let Some(line) = kernel_trouble(&backup.console()) {
        panic!("{}", backup.diagnose(&format!("kernel trouble: {line}")));
    }
    report(&format!(
        "linux_guest: FT: initial sync {:.1} s; numbered lines 1..={at_kill} before the kill \
         of the primary, up to {lines} after, all consistent; first reply {:.0} ms after the \
         kill, longest silence around it {:.0} ms (backup: took over after {} ms); {} epochs \
         committed before",
        sync.as_secs_f64(),
        first_reply.as_secs_f64() * 1000.0,
        silence.as_secs_f64() * 1000.0,
        took_over["last_failover_ms"],
        protected["last_committed_epoch"]
    ));
    power_off(&mut backup, &mut ctl);
    assert_eq!(read_from_image(&backup_disk, "/failover.txt").trim(), token);
}

// ---------------------------------------------------------------------------------------------
// virtio-vsock and virtio-pmem (one boot, shared by their tests)
// ---------------------------------------------------------------------------------------------

/// The guest's vsock port (`tg.vport=`) and the host port it connects to (`tg.vhost=`).
const VSOCK_GUEST_PORT: u32 = 1234;
const VSOCK_HOST_PORT: u32 = 5555;
/// Bytes sent through the guest's vsock echo.
const VSOCK_BYTES: usize = 64 << 10;
/// Size of each pmem file (the smallest region: 2 MiB).
const PMEM_SIZE: usize = 2 << 20;
/// Where /init writes into each pmem device.
const PMEM_GUEST_OFFSET: usize = 4096;

/// What the vsock/pmem boot observed, for its tests to assert.
struct VsockPmemRun {
    token: String,
    pci: String,
    /// /init's `PMEM ok` lines, then its `PMEM done` line.
    pmem_lines: Vec<String>,
    pmem_done: String,
    /// The writable file's and the discard_writes file's contents after the guest's fsync.
    rw_file: Vec<u8>,
    discard_file: Vec<u8>,
    rw_marker: String,
    discard_marker: String,
    discard_original: Vec<u8>,
    /// `ch-remote counters` and `ch-remote info` while the guest ran.
    counters: serde_json::Value,
    info: String,
    /// FNV-1a of the bytes sent to the guest's echo and of those that came back, and the count.
    echo: (u64, u64, usize),
    /// The first line of the host client's `OK <port>` answer.
    connect_answer: String,
    vsock_echo_line: String,
    /// What the guest sent on its own connection to the host's port, and its marker line.
    from_guest: String,
    vsock_connect_line: String,
    /// The host's answer the guest received.
    host_answer: String,
    /// The VMM removed its vsock socket when the guest powered off.
    socket_removed: bool,
}

static VSOCK_PMEM: OnceLock<Result<VsockPmemRun, String>> = OnceLock::new();

fn vsock_pmem_run() -> &'static VsockPmemRun {
    let run = VSOCK_PMEM.get_or_init(|| {
        // A failed step panics with the VMM's diagnosis: keep that message for both tests
        // rather than booting again.
        std::panic::catch_unwind(boot_with_vsock_and_pmem).unwrap_or_else(|panic| {
            Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the vsock/pmem boot panicked".into()))
        })
    });
    match run {
        Ok(run) => run,
        Err(e) => panic!("the vsock/pmem boot this test reads failed: {e}"),
    }
}

/// A 2 MiB file that starts with `marker` and a newline, the rest a byte pattern.
fn pmem_file(path: &Path, marker: &str) -> Vec<u8> {
    let mut data: Vec<u8> = (0..PMEM_SIZE).map(|i| (i % 251) as u8).collect();
    let line = format!("{marker}\n");
    data[..line.len()].copy_from_slice(line.as_bytes());
    fs::write(path, &data).expect("write a pmem file");
    data
}

/// Serves one guest-initiated connection on `listener` (the VMM connects to `PATH_port` for
/// the guest): reads the guest's line, answers one line and closes. Returns what it read.
fn serve_guest_connection(
    listener: &std::os::unix::net::UnixListener,
    answer: &str,
) -> Result<String, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err("the guest did not connect to the host's port".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let line = read_line_from(&mut stream)?;
    stream
        .write_all(format!("{answer}\n").as_bytes())
        .map_err(|e| format!("answer the guest: {e}"))?;
    Ok(line)
}

/// Boots Linux with `--vsock cid=3,socket=PATH` and two `--pmem` files (the second with
/// `discard_writes=on`); /init runs its `pci`, `pmem` and `vsock` checks and powers off.
fn boot_with_vsock_and_pmem() -> Result<VsockPmemRun, String> {
    let assets = linux_assets()?;
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("linux_vsock_pmem").map_err(|e| e.to_string())?;
    let token = new_token("vp");
    let rw_path = dir.join("pmem-rw.img");
    let discard_path = dir.join("pmem-discard.img");
    let rw_marker = format!("pmem-marker-rw-{token}");
    let discard_marker = format!("pmem-marker-discard-{token}");
    pmem_file(&rw_path, &rw_marker);
    let discard_original = pmem_file(&discard_path, &discard_marker);
    let socket = dir.join("vsock.sock");
    // The guest's connection to host port P reaches the Unix socket PATH_P.
    let host_port_path = PathBuf::from(format!("{}_{VSOCK_HOST_PORT}", socket.display()));
    let host_listener = std::os::unix::net::UnixListener::bind(&host_port_path)
        .map_err(|e| format!("listen on {}: {e}", host_port_path.display()))?;
    let api = dir.join("api.sock");
    let cmdline = format!(
        "{SERIAL_CONSOLE} {QUIRKS_CMDLINE} tg.token={token} tg.vport={VSOCK_GUEST_PORT} \
         tg.vhost={VSOCK_HOST_PORT} tg.checks=pci,vsock,pmem"
    );
    let initramfs_arg = assets.initramfs.display().to_string();
    let rw_arg = format!("file={}", rw_path.display());
    let discard_arg = format!("file={},discard_writes=on", discard_path.display());
    let vsock_arg = format!("cid=3,socket={}", socket.display());
    let mut vmm = Vmm::builder("linux_vsock_pmem")
        .kernel(&assets.vmlinux)
        .args(["--initramfs", initramfs_arg.as_str()])
        .cmdline(&cmdline)
        .cpus(1)
        .memory("256M")
        .serial_tty()
        .args(["--pmem", rw_arg.as_str(), "--pmem", discard_arg.as_str()])
        .args(["--vsock", vsock_arg.as_str()])
        .args(["--api-socket", api.to_str().expect("path")])
        .spawn()
        .map_err(|e| e.to_string())?;

    let ready = wait_step(&mut vmm, "LINUX-GUEST READY", BOOT_TIMEOUT);
    report(&format!(
        "linux_guest: vsock/pmem boot: '{ready}' after {} ms",
        vmm.elapsed().as_millis()
    ));
    let pci = wait_step(&mut vmm, "LINUX-GUEST PCI", STEP_TIMEOUT);
    report(&format!("linux_guest: {pci}"));
    wait_step(&mut vmm, "LINUX-GUEST VSOCK listening", STEP_TIMEOUT);
    let (connect_answer, sent, back, back_len) =
        vsock_echo(&socket, VSOCK_GUEST_PORT, VSOCK_BYTES, STEP_TIMEOUT)
            .map_err(|e| vmm.diagnose(&format!("vsock echo through {}: {e}", socket.display())))?;
    let vsock_echo_line = wait_step(&mut vmm, "LINUX-GUEST VSOCK echo", STEP_TIMEOUT);
    let host_answer = format!("hello from the host token={token}");
    let from_guest = serve_guest_connection(&host_listener, &host_answer)
        .map_err(|e| vmm.diagnose(&format!("guest-initiated vsock connection: {e}")))?;
    let vsock_connect_line = wait_step(&mut vmm, "LINUX-GUEST VSOCK connect", STEP_TIMEOUT);
    // While the guest still runs (its pmem check is next).
    let counters_out = ch_remote(&api, &["counters"], None);
    let counters: serde_json::Value = serde_json::from_slice(&counters_out.stdout)
        .map_err(|e| vmm.diagnose(&format!("ch-remote counters: {e}")))?;
    let info_out = ch_remote(&api, &["info"], None);
    let info = String::from_utf8_lossy(&info_out.stdout).into_owned();

    // The pmem check runs last and is read from the console, so that its outcome is the pmem
    // test's to judge, not the vsock test's.
    vmm.wait_for("LINUX-GUEST DONE", STEP_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let status = vmm
        .wait_exit(Duration::from_secs(120))
        .map_err(|e| e.to_string())?;
    if status.code() != Some(0) {
        return Err(vmm.diagnose("the guest's poweroff should end the VMM with exit code 0"));
    }
    let console = vmm.console();
    let pmem_done = console
        .lines()
        .find(|l| l.contains("LINUX-GUEST PMEM done"))
        .unwrap_or("no PMEM done line")
        .to_string();
    let pmem_lines: Vec<String> = console
        .lines()
        .filter(|l| l.contains("LINUX-GUEST PMEM") && !l.contains("PMEM done"))
        .map(str::to_string)
        .collect();
    let rw_file = fs::read(&rw_path).map_err(|e| e.to_string())?;
    let discard_file = fs::read(&discard_path).map_err(|e| e.to_string())?;
    // Kernel trouble (the last word, /init's FAIL lines, is the pmem test's to judge).
    if let Some(line) = console.lines().find(|l| {
        KERNEL_TROUBLE[..KERNEL_TROUBLE.len() - 1]
            .iter()
            .any(|w| l.contains(w))
    }) {
        return Err(vmm.diagnose(&format!("kernel trouble: {line}")));
    }
    report(&format!(
        "linux_guest: vsock/pmem boot done after {:.1} s",
        vmm.elapsed().as_secs_f64()
    ));
    Ok(VsockPmemRun {
        token,
        pci,
        pmem_lines,
        pmem_done,
        rw_file,
        discard_file,
        rw_marker,
        discard_marker,
        discard_original,
        counters,
        info,
        echo: (sent, back, back_len),
        connect_answer,
        vsock_echo_line,
        from_guest,
        vsock_connect_line,
        host_answer,
        socket_removed: !socket.exists(),
    })
}

/// Host -> guest: a `CONNECT <port>` client of the VMM's vsock socket reaches a listening
/// `AF_VSOCK` socket of Linux, and 64 KiB go through its echo and back intact. Guest -> host:
/// Linux's `connect()` to host port P reaches the Unix socket `PATH_P`, a line each way. The
/// device shows in `vm.info` and `vm.counters`, and its socket goes with the VMM.
#[test]
fn linux_guest_vsock_round_trips_both_ways_through_the_hybrid_socket() {
    require_kvm!();
    let run = vsock_pmem_run();
    check_pci_marker(&run.pci, &[VIRTIO_VSOCK_ID, VIRTIO_PMEM_ID])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        run.vsock_echo_line.contains("VSOCK echo ok"),
        "{}",
        run.vsock_echo_line
    );
    assert!(
        run.connect_answer.starts_with("OK "),
        "{}",
        run.connect_answer
    );
    let (sent, back, back_len) = run.echo;
    assert_eq!(back_len, VSOCK_BYTES, "bytes echoed through vsock");
    assert_eq!(sent, back, "the vsock echo changed the data");
    let fields = marker_fields(&run.vsock_echo_line);
    assert_eq!(
        fields.get("bytes").map(String::as_str),
        Some(VSOCK_BYTES.to_string().as_str()),
        "{}",
        run.vsock_echo_line
    );
    assert_eq!(
        fields.get("fnv"),
        Some(&format!("{sent:016x}")),
        "{}",
        run.vsock_echo_line
    );
    assert_eq!(
        run.from_guest,
        format!("hello from the guest token={}", run.token)
    );
    assert_eq!(
        marker_fields(&run.vsock_connect_line).get("reply"),
        Some(&run.host_answer),
        "{}",
        run.vsock_connect_line
    );
    assert!(run.info.contains("_vsock0"), "vm.info: {}", run.info);
    let vsock = &run.counters["_vsock0"];
    assert!(
        vsock["host_connections"].as_u64() >= Some(1)
            && vsock["tx_bytes"].as_u64() >= Some(VSOCK_BYTES as u64),
        "vm.counters: {}",
        run.counters
    );
    assert!(
        run.socket_removed,
        "the VMM should remove its vsock socket when it ends"
    );
}

/// Linux's pmem driver over virtio-pmem: /dev/pmem0 and /dev/pmem1 show the markers the host
/// wrote into the files; the guest's write + fsync (a virtio-pmem FLUSH) reaches the writable
/// file, and leaves the `discard_writes` file byte for byte as it was.
#[test]
fn linux_guest_pmem_writes_reach_the_file_and_discard_writes_leaves_it_unchanged() {
    require_kvm!();
    let run = vsock_pmem_run();
    assert!(
        run.pmem_done.contains("devices=2"),
        "{}: {:?}",
        run.pmem_done,
        run.pmem_lines
    );
    let device_of = |marker: &str| {
        run.pmem_lines
            .iter()
            .filter(|l| l.contains("PMEM ok"))
            .find(|l| marker_fields(l).get("marker").map(String::as_str) == Some(marker))
            .and_then(|l| marker_fields(l).get("dev").cloned())
            .unwrap_or_else(|| panic!("no PMEM line with marker {marker}: {:?}", run.pmem_lines))
    };
    let rw_dev = device_of(&run.rw_marker);
    device_of(&run.discard_marker);
    let wrote = format!("guest wrote {rw_dev} token={}\n", run.token);
    assert_eq!(
        String::from_utf8_lossy(&run.rw_file[PMEM_GUEST_OFFSET..PMEM_GUEST_OFFSET + wrote.len()]),
        wrote,
        "the guest's fsync'd write should be in the writable file"
    );
    assert!(
        run.discard_file == run.discard_original,
        "a discard_writes file must not change"
    );
    assert!(run.info.contains("_pmem0") && run.info.contains("_pmem1"));
    for id in ["_pmem0", "_pmem1"] {
        assert_eq!(
            run.counters[id]["errors"].as_u64(),
            Some(0),
            "{id}: vm.counters: {}",
            run.counters
        );
    }
}

// ---------------------------------------------------------------------------------------------
// virtio-fs through vhost-user (QEMU's virtiofsd as the backend)
// ---------------------------------------------------------------------------------------------

/// The vhost-user virtio-fs backend shipped with QEMU 7.2 (Debian's qemu-system-common).
const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
/// Modern virtio-pci device ID of virtio-fs (0x1040 + 26).
const VIRTIO_FS_ID: &str = "105a";
/// Size of the file the host shares with the guest.
const FS_HOST_BYTES: usize = 300_000;

/// A backend process, killed when the test ends however it ends.
struct Backend(std::process::Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts virtiofsd sharing `dir` (`cache=none`: every guest read and write reaches the
/// host's file) on `socket`; waits until it listens.
fn start_virtiofsd(socket: &Path, dir: &Path, log: &Path) -> Result<Backend, String> {
    let log = fs::File::create(log).map_err(|e| e.to_string())?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(VIRTIOFSD)
        .arg(format!("--socket-path={}", socket.display()))
        .args([
            "-o",
            &format!("source={}", dir.display()),
            "-o",
            "cache=none",
        ])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("start {VIRTIOFSD}: {e}"))?;
    let backend = Backend(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(format!("{VIRTIOFSD} did not create {}", socket.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(backend)
}

/// Linux mounts a virtio-fs (`--fs tag=myfs,socket=...` on `--memory shared=on`) served by
/// virtiofsd: it reads the file the host wrote (same size and FNV-1a as the host's), writes one
/// the host then reads, the device shows in `vm.counters`. Then the backend is killed while the
/// VM runs: the VMM logs it, marks the device failed (`backend_failed`), keeps answering the
/// API, and the guest still shuts down cleanly on the power button.
#[test]
fn linux_guest_mounts_virtio_fs_from_virtiofsd_and_survives_the_backend_dying() {
    require_kvm!();
    if !Path::new(VIRTIOFSD).exists() {
        report(&format!("SKIPPED: {VIRTIOFSD} is not installed"));
        return;
    }
    let assets = linux_assets().unwrap_or_else(|e| panic!("{e}"));
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("linux_virtiofs").expect("temp dir");
    let share = dir.join("share");
    fs::create_dir_all(&share).expect("share dir");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let host_data: Vec<u8> = (0..FS_HOST_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(share.join("host.bin"), &host_data).expect("write host.bin");
    let socket = dir.join("virtiofsd.sock");
    let backend_log = dir.join("virtiofsd.log");
    let mut backend =
        start_virtiofsd(&socket, &share, &backend_log).unwrap_or_else(|e| panic!("{e}"));
    let token = new_token("fs");
    let api = dir.join("api.sock");
    let cmdline =
        format!("{SERIAL_CONSOLE} {QUIRKS_CMDLINE} tg.token={token} tg.checks=pci,fs,wait");
    let initramfs_arg = assets.initramfs.display().to_string();
    let fs_arg = format!("tag=myfs,socket={}", socket.display());
    let mut vmm = Vmm::builder("linux_virtiofs")
        .kernel(&assets.vmlinux)
        .args(["--initramfs", initramfs_arg.as_str()])
        .cmdline(&cmdline)
        .cpus(1)
        .memory("256M,shared=on")
        .serial_tty()
        .args(["--fs", fs_arg.as_str()])
        .args(["--api-socket", api.to_str().expect("path")])
        .spawn()
        .expect("start the VMM");

    let ready = wait_step(&mut vmm, "LINUX-GUEST READY", BOOT_TIMEOUT);
    report(&format!(
        "linux_guest: virtio-fs boot: '{ready}' after {} ms",
        vmm.elapsed().as_millis()
    ));
    let pci = wait_step(&mut vmm, "LINUX-GUEST PCI", STEP_TIMEOUT);
    assert!(pci.contains(VIRTIO_FS_ID), "{}", vmm.diagnose(&pci));
    let read = wait_step(&mut vmm, "LINUX-GUEST FS read", STEP_TIMEOUT);
    let want = format!(
        "bytes={FS_HOST_BYTES} fnv={:016x}",
        fnv(&host_data, 0xcbf2_9ce4_8422_2325)
    );
    assert!(
        read.contains(&want),
        "{}",
        vmm.diagnose(&format!("{read} (want {want})"))
    );
    let done = wait_step(&mut vmm, "LINUX-GUEST FS done", STEP_TIMEOUT);
    assert!(done.contains("ok=1"), "{}", vmm.diagnose(&done));
    assert_eq!(
        fs::read_to_string(share.join("guest.txt")).unwrap_or_default(),
        format!("guest wrote virtiofs token={token}\n"),
        "{}",
        vmm.diagnose("the guest's file in the shared directory")
    );
    wait_step(&mut vmm, "LINUX-GUEST WAIT", STEP_TIMEOUT);
    let counters = |vmm: &Vmm| -> serde_json::Value {
        let out = ch_remote(&api, &["counters"], None);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("ch-remote counters: {e}"))))
    };
    let before = counters(&vmm);
    assert_eq!(before["_fs0"]["activations"], 1, "{before}");
    assert_eq!(before["_fs0"]["backend_failed"], 0, "{before}");

    // The backend dies while the VM runs.
    let _ = backend.0.kill();
    let _ = backend.0.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let now = counters(&vmm);
        if now["_fs0"]["backend_failed"] == 1 || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        after["_fs0"]["backend_failed"],
        1,
        "{}",
        vmm.diagnose(&after.to_string())
    );
    let info = ch_remote(&api, &["info"], None);
    assert!(
        info.status.success(),
        "{}",
        vmm.diagnose("ch-remote info after the backend died")
    );
    power_button(&mut vmm, &api);
    assert!(
        vmm.stderr().contains("virtio-fs backend failed"),
        "{}",
        vmm.diagnose("the VMM should log the backend's death")
    );
    report(&format!(
        "linux_guest: virtio-fs boot done after {:.1} s",
        vmm.elapsed().as_secs_f64()
    ));
}

/// The guest's answer to `pcidev BDF`, polled until `done` accepts it; returns it with the
/// time it took.
fn poll_pcidev(
    vmm: &Vmm,
    ctl: &mut Ctl,
    bdf: &str,
    done: impl Fn(&str) -> bool,
) -> (String, Duration) {
    let start = Instant::now();
    loop {
        let reply = expect_reply(vmm, ctl.cmd(&format!("pcidev {bdf}")), "pcidev ");
        if done(&reply) {
            return (reply, start.elapsed());
        }
        if start.elapsed() > STEP_TIMEOUT {
            panic!(
                "{}",
                vmm.diagnose(&format!("{bdf}: the guest still says {reply:?}"))
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// ACPI PCI hot-plug as Cloud Hypervisor offers it, with Linux's own `acpiphp` driver:
/// `ch-remote add-disk` answers `{id, bdf}`, the guest finds the function at that BDF, binds
/// virtio-pci and reads the new disk; `add-net` brings a NIC; `remove-device` makes the guest
/// eject the disk, after which it is gone from the guest, the bus and the configuration.
/// Prints the hot-plug latencies (API call to the guest's block device).
#[test]
fn linux_guest_hot_plugs_a_disk_and_a_nic_and_ejects_the_disk() {
    require_kvm!();
    require_netns!();
    let assets = linux_assets().unwrap_or_else(|e| panic!("{e}"));
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("linux_hotplug").expect("temp dir");
    let ns = guest_namespace("lhp").unwrap_or_else(|e| panic!("{e}"));
    let second_tap = "taphp";
    for args in [
        &["tuntap", "add", second_tap, "mode", "tap", "vnet_hdr"][..],
        &["link", "set", second_tap, "up"],
    ] {
        ns.ip(args).expect("second TAP");
    }
    let token = new_token("hp");
    let boot_disk = dir.join("disk.img");
    fs::copy(&assets.disk, &boot_disk).expect("copy the disk image");
    let added = dir.join("added.img");
    let marker = format!("hot-plugged-disk-{token}");
    let mut image = format!("{marker}\n").into_bytes();
    image.resize(1 << 20, 0);
    fs::write(&added, &image).expect("write the disk to add");
    let api = dir.join("api.sock");
    let cmdline = format!(
        "{SERIAL_CONSOLE} {QUIRKS_CMDLINE} tg.ip={GUEST_IP}/24 tg.peer={HOST_IP} \
         tg.ctl={CTL_PORT} tg.token={token} tg.checks=pci,serve"
    );
    let initramfs_arg = assets.initramfs.display().to_string();
    let disk_arg = format!("path={}", boot_disk.display());
    let net_arg = format!("tap={TAP},mac={GUEST_MAC}");
    let mut vmm = Vmm::builder("linux_hotplug")
        .wrapped_in(ns.exec_prefix())
        .kernel(&assets.vmlinux)
        .args(["--initramfs", initramfs_arg.as_str()])
        .cmdline(&cmdline)
        .cpus(1)
        .memory("256M")
        .serial_tty()
        .args(["--disk", disk_arg.as_str(), "--net", net_arg.as_str()])
        .args(["--api-socket", api.to_str().expect("path")])
        .spawn()
        .expect("start the VMM");
    wait_step(&mut vmm, "LINUX-GUEST SERVE listening", BOOT_TIMEOUT);
    let mut ctl = Ctl::connect(&ns, (GUEST_IP, CTL_PORT), STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));

    // add-disk: CH's answer, the BDF Kata checks the shape of, and the guest's disk.
    let disk_spec = format!("path={}", added.display());
    let t = Instant::now();
    let out = ch_remote(&api, &["add-disk", disk_spec.as_str()], None);
    let api_ms = t.elapsed().as_millis();
    assert!(
        out.status.success(),
        "{}",
        vmm.diagnose(&String::from_utf8_lossy(&out.stderr))
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("add-disk answer: {e}"))));
    let id = info["id"].as_str().expect("id").to_string();
    let bdf = info["bdf"].as_str().expect("bdf").to_string();
    assert_eq!(id, "_disk1", "{info}");
    assert!(
        bdf.starts_with("0000:00:") && bdf.ends_with(".0") && bdf.len() == 12,
        "{bdf}"
    );
    let (present, seen) = poll_pcidev(&vmm, &mut ctl, &bdf, |r| {
        r.contains("driver=virtio-pci") && !r.contains("block=-")
    });
    let block = marker_fields(&present)
        .get("block")
        .cloned()
        .expect("block field");
    // The block device node may appear a moment before the disk is ready to open.
    let head_deadline = Instant::now() + Duration::from_secs(30);
    let head = loop {
        let reply = ctl
            .cmd(&format!("head {block}"))
            .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
        if reply.starts_with("head ok") || Instant::now() > head_deadline {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(head.contains(&marker), "{}", vmm.diagnose(&head));
    report(&format!(
        "linux_guest: hot-plug: add-disk answered in {api_ms} ms; the guest had /dev/{block} \
         at {bdf} {} ms later",
        seen.as_millis()
    ));

    // add-net by TAP name: a second NIC bound to virtio-pci.
    let net_spec = format!("tap={second_tap},mac=12:34:56:78:9a:be");
    let out = ch_remote(&api, &["add-net", net_spec.as_str()], None);
    assert!(
        out.status.success(),
        "{}",
        vmm.diagnose(&String::from_utf8_lossy(&out.stderr))
    );
    let net_info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("add-net answer");
    let net_bdf = net_info["bdf"].as_str().expect("bdf").to_string();
    assert_ne!(net_bdf, bdf);
    let (net_present, net_seen) = poll_pcidev(&vmm, &mut ctl, &net_bdf, |r| {
        r.contains("driver=virtio-pci")
    });
    report(&format!(
        "linux_guest: hot-plug: add-net at {net_bdf}: {net_present} after {} ms",
        net_seen.as_millis()
    ));

    // vm.info: both devices in the configuration, pinned to where the guest saw them.
    let info_out = ch_remote(&api, &["info"], None);
    let vm_info: serde_json::Value = serde_json::from_slice(&info_out.stdout).expect("vm.info");
    let disks = vm_info["config"]["disks"].as_array().expect("disks");
    let added_entry = disks
        .iter()
        .find(|d| d["id"] == id.as_str())
        .unwrap_or_else(|| panic!("vm.info lacks {id}: {vm_info}"));
    let slot = u64::from_str_radix(&bdf[8..10], 16).expect("slot");
    assert_eq!(
        added_entry["pci_device_id"].as_u64(),
        Some(slot),
        "{vm_info}"
    );
    assert_eq!(vm_info["config"]["net"].as_array().map(Vec::len), Some(2));

    // Bad input leaves the VM alone: an unknown id, the console-less entropy device.
    let out = ch_remote(&api, &["remove-device", "no-such-device"], None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-device"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ch_remote(&api, &["remove-device", "_rng"], None);
    assert!(!out.status.success(), "the entropy device was removed");

    // remove-device: the guest ejects it; it leaves the guest, the bus and the configuration.
    let t = Instant::now();
    let out = ch_remote(&api, &["remove-device", id.as_str()], None);
    assert!(
        out.status.success(),
        "{}",
        vmm.diagnose(&String::from_utf8_lossy(&out.stderr))
    );
    let (gone, gone_after) = poll_pcidev(&vmm, &mut ctl, &bdf, |r| r.contains("absent"));
    assert_eq!(gone, "pcidev absent");
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let out = ch_remote(&api, &["info"], None);
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("vm.info");
        let still = info["config"]["disks"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["id"] == id.as_str()));
        if !still {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            vmm.diagnose("the ejected disk stays in the configuration")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    report(&format!(
        "linux_guest: hot-plug: remove-device {id}: gone from the guest after {} ms (total {} ms)",
        gone_after.as_millis(),
        t.elapsed().as_millis()
    ));
    // The guest still works and its kernel log is clean.
    check_klog(&vmm, &mut ctl);
    power_off(&mut vmm, &mut ctl);
}

/// `ch-remote ARGS` (an `add-*`) on `api`: the `{id, bdf}` it answered.
fn add_device(vmm: &Vmm, api: &Path, args: &[&str]) -> (String, String) {
    let out = ch_remote(api, args, None);
    assert!(
        out.status.success(),
        "{}",
        vmm.diagnose(&format!(
            "ch-remote {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{}",
            vmm.diagnose(&format!(
                "{args:?} answered {:?}: {e}",
                String::from_utf8_lossy(&out.stdout)
            ))
        )
    });
    let id = info["id"].as_str().expect("id").to_string();
    let bdf = info["bdf"].as_str().expect("bdf").to_string();
    assert!(
        bdf.starts_with("0000:00:") && bdf.ends_with(".0") && bdf.len() == 12,
        "{bdf}"
    );
    (id, bdf)
}

/// The ids in `vm.info`'s configuration, each with its `pci_device_id`.
fn configured_devices(vmm: &Vmm, api: &Path) -> Vec<(String, Option<u64>)> {
    let out = ch_remote(api, &["info"], None);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("vm.info: {e}"))));
    let config = &info["config"];
    let mut devices = Vec::new();
    for list in ["disks", "net", "pmem", "fs"] {
        for device in config[list].as_array().into_iter().flatten() {
            if let Some(id) = device["id"].as_str() {
                devices.push((id.to_string(), device["pci_device_id"].as_u64()));
            }
        }
    }
    if let Some(id) = config["vsock"]["id"].as_str() {
        devices.push((id.to_string(), config["vsock"]["pci_device_id"].as_u64()));
    }
    devices
}

/// The device is in the configuration, pinned to the slot the guest found it at.
fn assert_pinned(vmm: &Vmm, api: &Path, id: &str, bdf: &str) {
    let slot = u64::from_str_radix(&bdf[8..10], 16).expect("slot");
    let devices = configured_devices(vmm, api);
    assert!(
        devices.contains(&(id.to_string(), Some(slot))),
        "{}",
        vmm.diagnose(&format!(
            "{id} should be pinned to slot {slot}: {devices:?}"
        ))
    );
}

/// `remove-device ID`: the guest ejects it (the function leaves its PCI bus), and it leaves
/// the configuration. Returns how long the guest took.
fn eject(vmm: &Vmm, ctl: &mut Ctl, api: &Path, id: &str, bdf: &str) -> Duration {
    let out = ch_remote(api, &["remove-device", id], None);
    assert!(
        out.status.success(),
        "{}",
        vmm.diagnose(&format!(
            "remove-device {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    );
    let (gone, after) = poll_pcidev(vmm, ctl, bdf, |r| r.contains("absent"));
    assert_eq!(gone, "pcidev absent");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while configured_devices(vmm, api).iter().any(|(d, _)| d == id) {
        assert!(
            Instant::now() < deadline,
            "{}",
            vmm.diagnose(&format!("{id} stays in the configuration after its eject"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    after
}

/// Whether process `pid` maps `path` (a pmem file's mapping, as /proc/PID/maps names it).
fn maps_file(pid: u32, path: &Path) -> bool {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|maps| maps.contains(&path.display().to_string()))
        .unwrap_or(false)
}

/// Waits until process `pid` no longer maps `path`.
fn wait_unmapped(vmm: &Vmm, pid: u32, path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while maps_file(pid, path) {
        assert!(
            Instant::now() < deadline,
            "{}",
            vmm.diagnose(&format!(
                "{} stays mapped after its pmem device was ejected",
                path.display()
            ))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guest's /dev/pmemN whose first line is `marker` (polled: libnvdimm registers a
/// hot-plugged region's disk asynchronously).
fn pmem_dev_with(vmm: &Vmm, ctl: &mut Ctl, marker: &str) -> String {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        for n in 0..4 {
            let reply = expect_reply(vmm, ctl.cmd(&format!("head pmem{n}")), "head ");
            if reply == format!("head ok {marker}") {
                return format!("pmem{n}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            vmm.diagnose(&format!("no /dev/pmemN shows {marker}"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Cloud Hypervisor's hot-plug of the devices Kata adds at run time, into a Linux booted with
/// none of them: `add-vsock` (a round trip both ways through the hybrid socket), `add-fs`
/// (virtiofsd's share mounted, a host file read, a file written), two `add-pmem`s (the markers
/// read from /dev/pmemN, the guest's writes reaching the files). Each answers `{id, bdf}` and
/// is pinned in the configuration. `remove-device` of each: the guest ejects it and the VMM
/// lets go of its host side (the vsock socket file removed, virtiofsd's connection closed, the
/// pmem file unmapped). A third pmem reuses the first's freed guest-physical range, so a
/// snapshot of the VM has its two regions where a fresh boot would not place them: the restore
/// puts them back where the guest had them, and the guest reads both and ejects them.
#[test]
fn linux_guest_hot_plugs_vsock_fs_and_pmem_and_ejects_them() {
    require_kvm!();
    require_netns!();
    if !Path::new(VIRTIOFSD).exists() {
        integration::skip_or_fail(
            integration::function_name!(),
            &format!("{VIRTIOFSD} is not installed"),
        );
        return;
    }
    let assets = linux_assets().unwrap_or_else(|e| panic!("{e}"));
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("linux_hotplug_kata").expect("temp dir");
    let ns = guest_namespace("lhk").unwrap_or_else(|e| panic!("{e}"));
    let token = new_token("hk");
    let api = dir.join("api.sock");
    let socket = dir.join("vsock.sock");
    let host_port_path = PathBuf::from(format!("{}_{VSOCK_HOST_PORT}", socket.display()));
    let host_listener = std::os::unix::net::UnixListener::bind(&host_port_path)
        .unwrap_or_else(|e| panic!("listen on {}: {e}", host_port_path.display()));
    let share = dir.join("share");
    fs::create_dir_all(&share).expect("share dir");
    let host_data: Vec<u8> = (0..FS_HOST_BYTES).map(|i| (i * 7 % 253) as u8).collect();
    fs::write(share.join("host.bin"), &host_data).expect("write host.bin");
    let fs_socket = dir.join("virtiofsd.sock");
    let mut backend = start_virtiofsd(&fs_socket, &share, &dir.join("virtiofsd.log"))
        .unwrap_or_else(|e| panic!("{e}"));
    let pmem_paths: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|n| dir.join(&format!("pmem-{n}.img")))
        .collect();
    let markers: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("pmem-marker-{n}-{token}"))
        .collect();
    for (path, marker) in pmem_paths.iter().zip(&markers) {
        pmem_file(path, marker);
    }

    let cmdline = format!(
        "{SERIAL_CONSOLE} {QUIRKS_CMDLINE} tg.ip={GUEST_IP}/24 tg.peer={HOST_IP} \
         tg.ctl={CTL_PORT} tg.token={token} tg.vport={VSOCK_GUEST_PORT} \
         tg.vhost={VSOCK_HOST_PORT} tg.checks=pci,serve"
    );
    let initramfs_arg = assets.initramfs.display().to_string();
    let net_arg = format!("tap={TAP},mac={GUEST_MAC}");
    let mut vmm = Vmm::builder("linux_hotplug_kata")
        .wrapped_in(ns.exec_prefix())
        .kernel(&assets.vmlinux)
        .args(["--initramfs", initramfs_arg.as_str()])
        .cmdline(&cmdline)
        .cpus(1)
        // Shared: virtio-fs's backend maps guest memory.
        .memory("256M,shared=on")
        .serial_tty()
        .args(["--net", net_arg.as_str()])
        .args(["--api-socket", api.to_str().expect("path")])
        .spawn()
        .expect("start the VMM");
    wait_step(&mut vmm, "LINUX-GUEST SERVE listening", BOOT_TIMEOUT);
    let pci = wait_step(&mut vmm, "LINUX-GUEST PCI", STEP_TIMEOUT);
    for absent in [VIRTIO_VSOCK_ID, VIRTIO_PMEM_ID, VIRTIO_FS_ID] {
        assert!(!pci.contains(absent), "{}", vmm.diagnose(&pci));
    }
    let mut ctl = Ctl::connect(&ns, (GUEST_IP, CTL_PORT), STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
    let pid = vmm.pid();

    // vsock: host -> guest echo, then guest -> host.
    let vsock_spec = format!("cid=3,socket={}", socket.display());
    let t = Instant::now();
    let (vsock_id, vsock_bdf) = add_device(&vmm, &api, &["add-vsock", vsock_spec.as_str()]);
    assert_eq!(vsock_id, "_vsock0");
    let (_, seen) = poll_pcidev(&vmm, &mut ctl, &vsock_bdf, |r| {
        r.contains("driver=virtio-pci")
    });
    report(&format!(
        "linux_guest: hot-plug: add-vsock at {vsock_bdf}, bound in the guest after {} ms \
         (API call included: {} ms)",
        seen.as_millis(),
        t.elapsed().as_millis()
    ));
    ctl.send("check vsock").expect("send");
    wait_step(&mut vmm, "LINUX-GUEST VSOCK listening", STEP_TIMEOUT);
    let (ok, sent, back, back_len) =
        vsock_echo(&socket, VSOCK_GUEST_PORT, VSOCK_BYTES, STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("vsock echo: {e}"))));
    assert!(ok.starts_with("OK "), "{ok}");
    assert_eq!((back_len, back), (VSOCK_BYTES, sent), "the vsock echo");
    let echo = wait_step(&mut vmm, "LINUX-GUEST VSOCK echo", STEP_TIMEOUT);
    assert_eq!(
        marker_fields(&echo).get("fnv"),
        Some(&format!("{sent:016x}")),
        "{echo}"
    );
    let answer = format!("hello from the host token={token}");
    let from_guest = serve_guest_connection(&host_listener, &answer)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
    assert_eq!(from_guest, format!("hello from the guest token={token}"));
    let connect = wait_step(&mut vmm, "LINUX-GUEST VSOCK connect", STEP_TIMEOUT);
    assert_eq!(
        marker_fields(&connect).get("reply"),
        Some(&answer),
        "{connect}"
    );
    expect_reply(&vmm, ctl.line("check"), "check done vsock failures=0");
    assert_pinned(&vmm, &api, &vsock_id, &vsock_bdf);

    // virtio-fs: mount the share, read the host's file, write one.
    let fs_spec = format!("tag=myfs,socket={}", fs_socket.display());
    let (fs_id, fs_bdf) = add_device(&vmm, &api, &["add-fs", fs_spec.as_str()]);
    poll_pcidev(&vmm, &mut ctl, &fs_bdf, |r| r.contains("driver=virtio-pci"));
    ctl.send("check fs").expect("send");
    let read = wait_step(&mut vmm, "LINUX-GUEST FS read", STEP_TIMEOUT);
    let want = format!(
        "bytes={FS_HOST_BYTES} fnv={:016x}",
        fnv(&host_data, 0xcbf2_9ce4_8422_2325)
    );
    assert!(read.contains(&want), "{}", vmm.diagnose(&read));
    expect_reply(&vmm, ctl.line("check"), "check done fs failures=0");
    assert_eq!(
        fs::read_to_string(share.join("guest.txt")).unwrap_or_default(),
        format!("guest wrote virtiofs token={token}\n"),
        "{}",
        vmm.diagnose("the guest's file in the shared directory")
    );
    assert_pinned(&vmm, &api, &fs_id, &fs_bdf);
    // The backend's watchdog thread, started by the hot-plug, runs filtered like the rest.
    assert!(
        integration::thread_seccomp(pid)
            .iter()
            .any(|(name, _)| name == "vhost-user-watc"),
        "{:?}",
        integration::thread_seccomp(pid)
    );
    integration::assert_every_thread_filtered(pid, "after the virtio-fs hot-plug");

    // Two pmem regions: each marker read by the guest, each guest write in its file.
    let mut pmem = Vec::new();
    for path in &pmem_paths[..2] {
        let spec = format!("file={}", path.display());
        let (id, bdf) = add_device(&vmm, &api, &["add-pmem", spec.as_str()]);
        poll_pcidev(&vmm, &mut ctl, &bdf, |r| r.contains("driver=virtio-pci"));
        assert!(
            maps_file(pid, path),
            "{}",
            vmm.diagnose("pmem file not mapped")
        );
        pmem.push((id, bdf));
    }
    expect_reply(&vmm, ctl.cmd("check pmem"), "check done pmem failures=0");
    let console = vmm.console();
    let done = console
        .lines()
        .find(|l| l.contains("LINUX-GUEST PMEM done"))
        .unwrap_or_default();
    assert!(done.contains("devices=2"), "{}", vmm.diagnose(done));
    let mut pmem_devs = Vec::new();
    for (path, marker) in pmem_paths.iter().zip(&markers).take(2) {
        let line = console
            .lines()
            .filter(|l| l.contains("LINUX-GUEST PMEM ok"))
            .find(|l| marker_fields(l).get("marker") == Some(marker))
            .unwrap_or_else(|| panic!("{}", vmm.diagnose(&format!("no PMEM line for {marker}"))));
        let dev = marker_fields(line)["dev"].clone();
        let data = fs::read(path).expect("read a pmem file");
        let wrote = format!("guest wrote {dev} token={token}\n");
        assert_eq!(
            &data[PMEM_GUEST_OFFSET..PMEM_GUEST_OFFSET + wrote.len()],
            wrote.as_bytes(),
            "{}",
            vmm.diagnose(&format!("{} lacks the guest's write", path.display()))
        );
        pmem_devs.push(dev);
    }
    for (id, bdf) in &pmem {
        assert_pinned(&vmm, &api, id, bdf);
    }

    // Ejects: each leaves the guest, the configuration and its host resources.
    let fs_gone = eject(&vmm, &mut ctl, &api, &fs_id, &fs_bdf);
    let deadline = Instant::now() + Duration::from_secs(30);
    // virtiofsd ends when its frontend's connection closes.
    while backend.0.try_wait().ok().flatten().is_none() {
        assert!(
            Instant::now() < deadline,
            "{}",
            vmm.diagnose("virtiofsd still runs: the VMM kept its vhost-user connection")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let vsock_gone = eject(&vmm, &mut ctl, &api, &vsock_id, &vsock_bdf);
    assert!(
        !socket.exists(),
        "{}",
        vmm.diagnose("the vsock socket file stays after its device was ejected")
    );
    let pmem_gone = eject(&vmm, &mut ctl, &api, &pmem[0].0, &pmem[0].1);
    wait_unmapped(&vmm, pid, &pmem_paths[0]);
    let reply = expect_reply(&vmm, ctl.cmd(&format!("head {}", pmem_devs[0])), "head ");
    assert!(reply.starts_with("head fail"), "{}", vmm.diagnose(&reply));
    assert!(maps_file(pid, &pmem_paths[1]), "the other pmem stays");
    report(&format!(
        "linux_guest: hot-plug: ejected by the guest after {} ms (fs), {} ms (vsock), {} ms \
         (pmem)",
        fs_gone.as_millis(),
        vsock_gone.as_millis(),
        pmem_gone.as_millis()
    ));

    // A third region takes the first's place, before the second's: not where a boot from the
    // configuration (second, third) would put them.
    let spec = format!("file={}", pmem_paths[2].display());
    let (third_id, third_bdf) = add_device(&vmm, &api, &["add-pmem", spec.as_str()]);
    poll_pcidev(&vmm, &mut ctl, &third_bdf, |r| {
        r.contains("driver=virtio-pci")
    });
    let third_dev = pmem_dev_with(&vmm, &mut ctl, &markers[2]);
    check_klog(&vmm, &mut ctl);

    // Snapshot, and restore it in a new VMM.
    let snap = dir.join("snap");
    let url = format!("file://{}", snap.display());
    for args in [&["pause"][..], &["snapshot", &url]] {
        let out = ch_remote(&api, args, None);
        assert!(
            out.status.success(),
            "{}",
            vmm.diagnose(&format!(
                "ch-remote {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        );
    }
    vmm.kill();
    drop(ctl);
    let restore = format!("source_url={url},resume=on");
    let api2 = dir.join("api2.sock");
    let mut vmm = Vmm::builder("linux_hotplug_kata_restored")
        .wrapped_in(ns.exec_prefix())
        .args(["--restore", restore.as_str()])
        .args(["--api-socket", api2.to_str().expect("path")])
        .spawn()
        .expect("start the restoring VMM");
    let mut ctl = Ctl::connect(&ns, (GUEST_IP, CTL_PORT), STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("restored guest: {e}"))));
    let pid = vmm.pid();
    for (dev, marker) in [(&pmem_devs[1], &markers[1]), (&third_dev, &markers[2])] {
        expect_reply(
            &vmm,
            ctl.cmd(&format!("head {dev}")),
            &format!("head ok {marker}"),
        );
    }
    for (id, bdf) in [(&pmem[1].0, &pmem[1].1), (&third_id, &third_bdf)] {
        assert_pinned(&vmm, &api2, id, bdf);
    }
    eject(&vmm, &mut ctl, &api2, &third_id, &third_bdf);
    wait_unmapped(&vmm, pid, &pmem_paths[2]);
    eject(&vmm, &mut ctl, &api2, &pmem[1].0, &pmem[1].1);
    wait_unmapped(&vmm, pid, &pmem_paths[1]);
    check_klog(&vmm, &mut ctl);
    power_off(&mut vmm, &mut ctl);
    if let Some(line) = kernel_trouble(&vmm.console()) {
        panic!("{}", vmm.diagnose(&format!("kernel trouble: {line}")));
    }
}
