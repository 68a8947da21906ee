//! The project's small Linux guest (ci/build-linux-guest; its /init is ci/linux-guest/init.c),
//! as the Linux-tier tests and Kata's call sequence drive it: the assets, the kernel's quirk
//! flags, /init's markers, and the hybrid-vsock echo.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{marker_fields, report, workspace_root, FileLock, NetNs, Vmm};

/// The kernel's quirk flags, shared by all boots: the kernel must not use XSAVE, POPCNT,
/// RDRAND/RDSEED, FSGSBASE, SMAP (stac/clac), PCID/INVPCID: the instruction emulator of the
/// nested KVM on our CI machines, which runs all guest CPL0 code, lacks them (a real KVM host
/// does not mind). `clocksource=kvm-clock`: that nested KVM cannot offset the guest's TSC (the
/// guest reads the host's TSC whatever KVM_SET_MSRS says), so a restored guest on the `tsc`
/// clocksource, which Linux prefers when the TSC is invariant, finds its clock advanced by all
/// the time since the snapshot (RCU stall reports once that passes 21 s); kvm-clock comes back
/// with KVM_SET_CLOCK. On a real KVM host the TSC is restored too and either clocksource
/// continues.
pub const QUIRKS_CMDLINE: &str = "noxsave nofsgsbase nopcid \
     clearcpuid=popcnt,rdrand,rdseed,smap,invpcid clocksource=kvm-clock";

/// The guest's kernel, initramfs and root disk image.
pub struct Assets {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub disk: PathBuf,
}

/// Builds (or finds in the cache) the guest assets with `ci/build-linux-guest`. Not optional:
/// if they cannot be built, the error is the script's one-line reason (stage and log).
pub fn linux_assets() -> Result<Assets, String> {
    let _lock = FileLock::acquire("build-linux-guest.lock").map_err(|e| e.to_string())?;
    let script = workspace_root().join("ci/build-linux-guest");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "ci/build-linux-guest failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    report(&format!(
        "linux_guest: assets ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout).trim()
    ));
    // The resolved directory, so that a concurrent rebuild cannot swap files under us.
    let dir = fs::canonicalize(workspace_root().join("target/linux-guest/current"))
        .map_err(|e| format!("target/linux-guest/current: {e}"))?;
    let assets = Assets {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        disk: dir.join("disk.img"),
    };
    for path in [&assets.vmlinux, &assets.initramfs, &assets.disk] {
        if !path.exists() {
            return Err(format!(
                "ci/build-linux-guest succeeded but {} is missing",
                path.display()
            ));
        }
    }
    Ok(assets)
}

/// Waits for a `LINUX-GUEST` marker, failing at once on a failure line of /init or a kernel
/// panic instead of waiting out the timeout.
pub fn wait_step(vmm: &mut Vmm, marker: &str, timeout: Duration) -> String {
    try_wait_step(vmm, marker, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// [`wait_step`] that returns the failure (with the VMM's diagnostics) instead of panicking.
pub fn try_wait_step(vmm: &mut Vmm, marker: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match vmm.wait_for(marker, Duration::from_secs(1)) {
            Ok(found) => return Ok(found.line),
            Err(e) => {
                let console = vmm.console();
                for bad in ["LINUX-GUEST FAIL", "Kernel panic", "emulation failure"] {
                    if let Some(line) = console.lines().find(|l| l.contains(bad)) {
                        return Err(vmm
                            .diagnose(&format!("waiting for {marker:?}, the guest said: {line}")));
                    }
                }
                if vmm.poll_exit().is_some() || Instant::now() >= deadline {
                    return Err(e.to_string());
                }
            }
        }
    }
}

/// The first `len` bytes of the stream /init's `tsource` sends: xorshift64 from
/// 0x9e37_79b9_7f4a_7c15 (`x ^= x << 13; x ^= x >> 7; x ^= x << 17`), each `x` as 8
/// little-endian bytes.
pub fn source_stream(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    data
}

/// Whether /init's `PCI` marker `line` holds each of `want` among its virtio device IDs, with
/// every virtio function bound to virtio-pci and given MSI-X vectors (Err: what is wrong).
pub fn check_pci_marker(line: &str, want: &[&str]) -> Result<(), String> {
    let fields = marker_fields(line);
    let field = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let virtio = field("virtio");
    let found: Vec<&str> = virtio.split(',').collect();
    if let Some(id) = want.iter().find(|id| !found.contains(id)) {
        return Err(format!(
            "virtio device {id} not on the guest's PCI bus: {line}"
        ));
    }
    if !line.contains("PCI ok") {
        return Err(format!("the guest's PCI check failed: {line}"));
    }
    if field("bound") != found.len().to_string() {
        return Err(format!(
            "a virtio function is not bound to virtio-pci: {line}"
        ));
    }
    if field("msix") != found.len().to_string() {
        return Err(format!("a virtio function has no MSI-X vectors: {line}"));
    }
    Ok(())
}

/// A marker no earlier run of a test can have left behind.
pub fn new_token(label: &str) -> String {
    format!(
        "{label}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

/// FNV-1a over `data`, continuing from `h` (start: 0xcbf2_9ce4_8422_2325), as /init computes it.
pub fn fnv(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// One line (without its `\n`, at most 512 bytes) read byte by byte, so nothing after it is
/// consumed.
pub fn read_line_from(stream: &mut impl Read) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 512 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => {
                return Err(format!(
                    "read after {:?}: {e}",
                    String::from_utf8_lossy(&line)
                ))
            }
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// A round trip through the guest's vsock echo on `port` over the hybrid vsock's Unix socket:
/// `CONNECT <port>`, then `bytes` pseudo-random bytes sent while the echo is read back, and the
/// write side shut down. Returns the `OK` line, the FNV of what was sent and of what came back,
/// and how many bytes came back.
pub fn vsock_echo(
    socket: &Path,
    port: u32,
    bytes: usize,
    timeout: Duration,
) -> Result<(String, u64, u64, usize), String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("connect to {}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("send CONNECT: {e}"))?;
    let ok = read_line_from(&mut stream)?;
    if !ok.starts_with("OK ") {
        return Err(format!("CONNECT {port} was answered {ok:?}"));
    }
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || -> Result<u64, String> {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id());
        let data: Vec<u8> = (0..bytes)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for chunk in data.chunks(4096) {
            writer.write_all(chunk).map_err(|e| format!("send: {e}"))?;
        }
        writer
            .shutdown(Shutdown::Write)
            .map_err(|e| e.to_string())?;
        Ok(fnv(&data, 0xcbf2_9ce4_8422_2325))
    });
    let (mut back, mut sum, mut buf) = (0usize, 0xcbf2_9ce4_8422_2325, vec![0u8; 16 << 10]);
    loop {
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("receive after {back} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        sum = fnv(&buf[..n], sum);
        back += n;
    }
    let sent = sender.join().map_err(|_| "sender panicked".to_string())??;
    Ok((ok, sent, sum, back))
}

/// A line-command connection to /init's command service (`tg.ctl=`).
pub struct Ctl {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Ctl {
    /// Connects from `ns` to the guest's `(ip, port)`, retrying until `timeout` (a restored
    /// guest answers after a moment).
    pub fn connect(ns: &NetNs, (ip, port): (&str, u16), timeout: Duration) -> Result<Ctl, String> {
        let target = format!("{ip}:{port}");
        let stream = ns
            .run(move || {
                let addr: SocketAddr = target.parse().map_err(|e| format!("{target}: {e}"))?;
                let deadline = Instant::now() + timeout;
                loop {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(s) => return Ok(s),
                        Err(e) if Instant::now() >= deadline => {
                            return Err(format!("connect to {addr}: {e}"))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
            .map_err(|e| e.to_string())??;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        Ok(Ctl {
            writer: stream,
            reader,
        })
    }

    pub fn send(&mut self, command: &str) -> Result<(), String> {
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|e| format!("{command}: write: {e}"))
    }

    pub fn line(&mut self, command: &str) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(format!("{command}: the guest closed the connection")),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(format!("{command}: read: {e}")),
        }
    }

    /// Sends one command and returns its reply line.
    pub fn cmd(&mut self, command: &str) -> Result<String, String> {
        self.send(command)?;
        self.line(command)
    }
}
