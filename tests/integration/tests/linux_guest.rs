//! Slow tier: a small real Linux (Debian's `linux-source-6.1`, built with its busybox initramfs
//! and ext4 disk image by `ci/build-linux-guest`) under our VMM with 2 vCPUs, a virtio-blk disk
//! and a virtio-net TAP in a namespace made for the test. Linux's own virtio drivers, ext4,
//! TCP/IP stack and tools check our devices, which the project's own test guest cannot do
//! independently (it shares our reading of the specifications).
//!
//! The guest's `/init` (ci/linux-guest/init.c) prints `LINUX-GUEST ...` marker lines, runs the
//! checks named by `tg.checks=` on its command line and powers the VM off through the ACPI S5
//! port (via `/dev/port`), which ends our VMM with exit code 0.
//!
//! On this project's CI machines guest CPL0 code is emulated by a nested KVM (DESIGN.md,
//! section 2), so a boot to the ready marker takes about 30 s there; the timeouts are generous.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::{
    kvm_serial_guard, marker_fields, report, require_kvm, require_netns, workspace_root, FileLock,
    NetNs, TempDir, Vmm,
};

const HOST_IP: &str = "192.168.249.1";
const GUEST_IP: &str = "192.168.249.2";
const GUEST_MAC: &str = "12:34:56:78:9a:bd";
const TCP_PORT: u16 = 5000;
/// Bytes the host sends through the guest's TCP echo (every packet is processed by emulated
/// guest kernel code on the CI machines, so this stays modest).
const TCP_BYTES: usize = 1 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// Command line shared by all boots: serial console; the kernel must not use XSAVE, POPCNT,
/// RDRAND/RDSEED, FSGSBASE, SMAP (stac/clac), PCID/INVPCID: the instruction emulator of the
/// nested KVM on our CI machines, which runs all guest CPL0 code, lacks them (a real KVM host
/// does not mind). `pci=off`: there is no PCI bus (PCI is only configured for /dev/port).
const BASE_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 noxsave nofsgsbase \
     nopcid clearcpuid=popcnt,rdrand,rdseed,smap,invpcid pci=off";

struct Assets {
    vmlinux: PathBuf,
    initramfs: PathBuf,
    disk: PathBuf,
}

/// Builds (or finds in the cache) the guest assets with `ci/build-linux-guest`. Not optional:
/// if they cannot be built, the test fails with the script's one-line reason (stage and log).
fn linux_assets() -> Assets {
    let _lock = FileLock::acquire("build-linux-guest.lock").expect("take the build lock");
    let script = workspace_root().join("ci/build-linux-guest");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "ci/build-linux-guest failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    report(&format!(
        "linux_guest: assets ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout).trim()
    ));
    let dir = workspace_root().join("target/linux-guest/current");
    let assets = Assets {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        disk: dir.join("disk.img"),
    };
    for path in [&assets.vmlinux, &assets.initramfs, &assets.disk] {
        assert!(
            path.exists(),
            "ci/build-linux-guest succeeded but {} is missing",
            path.display()
        );
    }
    assets
}

/// Waits for a `LINUX-GUEST` marker, failing at once on a failure line of /init or a kernel
/// panic instead of waiting out the timeout.
fn wait_step(vmm: &mut Vmm, marker: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        match vmm.wait_for(marker, Duration::from_secs(1)) {
            Ok(found) => return found.line,
            Err(e) => {
                let console = vmm.console();
                for bad in ["LINUX-GUEST FAIL", "Kernel panic", "emulation failure"] {
                    if let Some(line) = console.lines().find(|l| l.contains(bad)) {
                        panic!(
                            "{}",
                            vmm.diagnose(&format!(
                                "waiting for {marker:?}, the guest said: {line}"
                            ))
                        );
                    }
                }
                if vmm.poll_exit().is_some() || Instant::now() >= deadline {
                    panic!("{e}");
                }
            }
        }
    }
}

fn fnv(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Sends `TCP_BYTES` pseudo-random bytes to the guest's echo and reads them back; returns
/// (FNV-1a of what was sent, of what came back, bytes back, seconds).
fn tcp_echo() -> Result<(u64, u64, usize, f64), String> {
    let addr: SocketAddr = format!("{GUEST_IP}:{TCP_PORT}").parse().expect("address");
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
        .map_err(|e| format!("connect to the guest: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> Result<u64, String> {
        let mut data = vec![0u8; TCP_BYTES];
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

#[test]
fn linux_guest_boots_two_cpus_uses_ext4_disk_and_tcp_and_powers_off() {
    require_kvm!();
    require_netns!();
    let assets = linux_assets();
    let _boot = kvm_serial_guard();

    let dir = TempDir::new("linux_guest").expect("temp dir");
    let disk = dir.join("disk.img");
    fs::copy(&assets.disk, &disk).expect("copy the disk image");
    let ns = NetNs::new("lg").expect("create a namespace");
    let token = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let cmdline = format!(
        "{BASE_CMDLINE} tg.ip={GUEST_IP}/24 tg.peer={HOST_IP} tg.port={TCP_PORT} \
         tg.token={token} tg.checks=blk,ping,tcp"
    );
    let initramfs_arg = assets.initramfs.display().to_string();
    let disk_arg = format!("path={}", disk.display());
    let net_arg = format!("ip={HOST_IP},mask=255.255.255.0,mac={GUEST_MAC}");
    let mut vmm = Vmm::builder("linux_guest")
        .wrapped_in(ns.exec_prefix())
        .kernel(&assets.vmlinux)
        .args(["--initramfs", initramfs_arg.as_str()])
        .cmdline(&cmdline)
        .cpus(2)
        .memory("256M")
        .serial_tty()
        .args(["--disk", disk_arg.as_str(), "--net", net_arg.as_str()])
        .spawn()
        .expect("start the VMM");

    // Both CPUs online (Linux's own count, from /sys/devices/system/cpu/online).
    let ready = wait_step(&mut vmm, "LINUX-GUEST READY", BOOT_TIMEOUT);
    let booted = vmm.elapsed();
    report(&format!(
        "linux_guest: '{ready}' after {} ms",
        booted.as_millis()
    ));
    let fields = marker_fields(&ready);
    assert_eq!(
        fields.get("cpus").map(String::as_str),
        Some("2"),
        "{}",
        vmm.diagnose("both vCPUs should be online")
    );

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
        .run(tcp_echo)
        .expect("enter the namespace")
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

    // /init powers off through the ACPI S5 port: the VMM exits 0.
    let done = wait_step(&mut vmm, "LINUX-GUEST DONE", STEP_TIMEOUT);
    assert!(done.contains("failures=0"), "{}", vmm.diagnose(&done));
    let status = vmm
        .wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        vmm.diagnose("the guest's poweroff should end the VMM with exit code 0")
    );
    report(&format!(
        "linux_guest: ready after {:.1} s, powered off after {:.1} s",
        booted.as_secs_f64(),
        vmm.elapsed().as_secs_f64()
    ));

    // What the guest wrote is in the host's image after the VMM stopped.
    let written = read_from_image(&disk, "/guest.txt");
    assert!(
        written.contains(&format!("token={token}")),
        "/guest.txt in the image holds {written:?}, expected the token {token}"
    );
    drop(vmm);
    drop(ns);
    drop(dir);
}
