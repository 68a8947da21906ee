//! Kata Containers' calls against our VMM, in the order and shape of Kata's runtime
//! (`src/runtime/virtcontainers/clh.go`), which drives Cloud Hypervisor through the Go client
//! generated from CH's OpenAPI description: one `http.Client` whose transport keeps a single
//! HTTP/1.1 connection to the API socket alive between calls.
//!
//! Kata's sandbox life, as `clh.go` makes it:
//!   - launch `cloud-hypervisor --api-socket PATH` (inside the sandbox's network namespace) and
//!     poll `vmm.ping` until it answers;
//!   - `vm.create` with a body from the client's constructors (every defaulted member present),
//!     then `vm.info` (state must be `Created`);
//!   - `vm.add-net` for each NIC, the TAP passed as a descriptor (SCM_RIGHTS) with the request
//!     (Kata writes that one request itself, with `WriteMsgUnix`, on a connection of its own;
//!     here it goes on the shared connection, after other requests, the harder case);
//!   - `vm.boot`, then `vm.info` (state must be `Running`);
//!   - the agent over the hybrid vsock: `CONNECT <port>` on the vsock's Unix socket;
//!   - per container: `vm.add-disk` (Kata turns the answer's `bdf` into a PCI path and refuses
//!     anything but `0000:00:XX.0`), `vm.info` + `vm.resize` with `desired_vcpus` (equal to the
//!     current count for a container without a CPU limit), `vm.remove-device` at its end;
//!   - `vmm.shutdown`, then the VMM process must be gone within 3 s (`clhStopSandboxTimeout`).
//!
//! Two generations of `vm.create` body: up to Kata 3.26 the guest's root file system is a
//! virtio-pmem device (`pmem: [{file, discard_writes: true}]`), from 3.27 a read-only raw disk
//! (`disks: [{path, readonly: true}]`). The 3.27 generation runs the whole sequence against the
//! project's small Linux guest (ci/build-linux-guest; its /init is ci/linux-guest/init.c), which
//! also shows the hot-plugged disk from inside the guest; the 3.26 generation boots, answers
//! `vm.info`, serves the vsock and shuts down. A third part feeds the `vm.info` configuration of
//! the booted VM into a fresh VMM's `vm.create` (CH answers 204).
//!
//! Everything Kata needs that differs from Cloud Hypervisor is printed as a `FINDING:` line (and
//! worked around so the rest of the sequence still runs).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration::{
    kvm_serial_guard, marker_fields, report, require_kvm, require_netns, wait_for_api_socket,
    workspace_root, FileLock, NetNs, TempDir, Vmm,
};

/// The kernel's quirk flags (see linux_guest.rs): the nested KVM of the CI machines emulates
/// guest CPL0 code and lacks these instructions; kvm-clock because that KVM cannot offset the
/// guest's TSC. A real KVM host does not mind them.
const QUIRKS_CMDLINE: &str =
    "noxsave nofsgsbase nopcid clearcpuid=popcnt,rdrand,rdseed,smap,invpcid \
     clocksource=kvm-clock";
/// Kata's kernel parameters for Cloud Hypervisor (`clhKernelParams`) and, in debug mode, the
/// serial console (`clhDebugKernelParams`, `clhDebugKernelParamsCommon`).
const KATA_PARAMS: &str = "panic=1 no_timer_check noreplace-smp console=ttyS0,115200n8 \
                           systemd.log_target=console";
/// `GetKernelRootParams` for an ext4 image on a virtio-blk disk (3.27) or virtio-pmem (3.26).
/// Our guest runs from its initramfs, whose /init the kernel prefers to `root=`.
const ROOT_PARAMS_DISK: &str =
    "root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4";
const ROOT_PARAMS_PMEM: &str =
    "root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4";

/// The TAP Kata's network set-up makes in the sandbox's namespace (`tap0_kata`).
const TAP: &str = "tap0_kata";
/// The host end of the guest's network. Deliberately not 192.168.249.1, the `ip` every
/// generated-client NetConfig carries: a TAP passed by descriptor is its owner's to configure,
/// and Cloud Hypervisor leaves its address alone.
const HOST_IP: &str = "192.168.249.3";
const GUEST_IP: &str = "192.168.249.2";
const GUEST_MAC: &str = "12:34:56:78:9a:c1";
/// /init's control service port (`tg.ctl=`).
const CTL_PORT: u16 = 5001;
/// The agent's vsock port in Kata (`vSockPort`); the guest's /init listens there (`tg.vport=`).
const AGENT_VSOCK_PORT: u32 = 1024;
const VSOCK_BYTES: usize = 64 << 10;

/// Kata's deadlines (clh.go): ordinary API calls, hot-plug calls, and the VMM's exit after
/// `vmm.shutdown`.
const KATA_API_TIMEOUT: Duration = Duration::from_secs(1);
const KATA_HOTPLUG_TIMEOUT: Duration = Duration::from_secs(5);
const KATA_STOP_TIMEOUT: Duration = Duration::from_secs(3);

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// Guest assets and console
// ---------------------------------------------------------------------------------------------

struct Assets {
    vmlinux: PathBuf,
    initramfs: PathBuf,
    disk: PathBuf,
}

/// Builds (or finds in the cache) the Linux guest with `ci/build-linux-guest`.
fn linux_assets() -> Assets {
    let _lock = FileLock::acquire("build-linux-guest.lock").expect("build lock");
    let out = Command::new("bash")
        .arg(workspace_root().join("ci/build-linux-guest"))
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .expect("run ci/build-linux-guest");
    assert!(
        out.status.success(),
        "ci/build-linux-guest failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The resolved directory, so that a concurrent rebuild cannot swap files under us.
    let dir = fs::canonicalize(workspace_root().join("target/linux-guest/current"))
        .expect("target/linux-guest/current");
    let assets = Assets {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        disk: dir.join("disk.img"),
    };
    for path in [&assets.vmlinux, &assets.initramfs, &assets.disk] {
        assert!(path.exists(), "{} is missing", path.display());
    }
    assets
}

/// Waits for a `LINUX-GUEST` marker, failing at once on a failure line or a kernel panic.
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

/// /init's `PCI` marker holds each of `want` among its virtio device IDs, every virtio function
/// bound to virtio-pci with MSI-X.
fn check_pci_marker(vmm: &Vmm, line: &str, want: &[&str]) {
    let fields = marker_fields(line);
    let field = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let virtio = field("virtio");
    let found: Vec<&str> = virtio.split(',').collect();
    for id in want {
        assert!(
            found.contains(id),
            "{}",
            vmm.diagnose(&format!(
                "virtio device {id} not on the guest's PCI bus: {line}"
            ))
        );
    }
    assert!(line.contains("PCI ok"), "{}", vmm.diagnose(line));
    assert_eq!(field("bound"), found.len().to_string(), "{line}");
    assert_eq!(field("msix"), found.len().to_string(), "{line}");
}

fn new_token(label: &str) -> String {
    format!(
        "{label}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

fn fnv(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------------------------------------
// The API client: one keep-alive HTTP/1.1 connection, as Go's http.Transport keeps it
// ---------------------------------------------------------------------------------------------

struct Reply {
    status: u16,
    body: String,
    content_type: Option<String>,
    elapsed: Duration,
    /// Which connection of the client carried the request (1 = the first).
    connection: usize,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// A minimal HTTP/1.1 client over the API socket that keeps its connection open between
/// requests (`Connection: keep-alive`) and frames every response by its `Content-Length`, the
/// way the Go client Kata generates from CH's OpenAPI description talks to Cloud Hypervisor.
/// A connection the server closed while idle is noticed before the next request (Go's
/// transport notices it too, from its background read) and replaced; each such closure is
/// recorded, with how long the connection had been idle.
struct KeepAliveClient {
    socket: PathBuf,
    stream: Option<UnixStream>,
    /// Bytes read past the end of the last response (there should be none).
    pending: Vec<u8>,
    connections: usize,
    last_used: Instant,
    /// (idle time, the request that found the connection closed) for each idle closure.
    idle_closures: Vec<(Duration, String)>,
    /// Requests that found their reused connection closed under them (idle time, error).
    idle_races: Vec<(Duration, String)>,
    /// Responses that asked to close the connection (`Connection: close`).
    close_requests: Vec<String>,
    log_label: &'static str,
}

impl KeepAliveClient {
    fn new(socket: &Path, log_label: &'static str) -> KeepAliveClient {
        KeepAliveClient {
            socket: socket.to_path_buf(),
            stream: None,
            pending: Vec::new(),
            connections: 0,
            last_used: Instant::now(),
            idle_closures: Vec::new(),
            idle_races: Vec::new(),
            close_requests: Vec::new(),
            log_label,
        }
    }

    /// The open connection, or a new one (the old one closed by the server while idle).
    fn connection(&mut self, what: &str) -> Result<&mut UnixStream, String> {
        if let Some(stream) = &self.stream {
            let mut byte = [0u8; 1];
            // SAFETY: recv into a live one-byte buffer on our open socket; MSG_PEEK leaves
            // any data queued, MSG_DONTWAIT keeps it from blocking.
            let n = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    byte.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            let idle = self.last_used.elapsed();
            if n == 0 {
                self.idle_closures.push((idle, what.to_string()));
                self.stream = None;
            } else if n > 0 {
                return Err(format!(
                    "the server sent unsolicited bytes on the idle connection after {idle:?}"
                ));
            }
        }
        if self.stream.is_none() {
            let stream = UnixStream::connect(&self.socket)
                .map_err(|e| format!("connect {}: {e}", self.socket.display()))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .map_err(|e| e.to_string())?;
            self.stream = Some(stream);
            self.pending.clear();
            self.connections += 1;
        }
        Ok(self.stream.as_mut().expect("connected"))
    }

    fn get(&mut self, endpoint: &str) -> Result<Reply, String> {
        self.call("GET", endpoint, None, &[])
    }

    fn put(&mut self, endpoint: &str, body: Option<&str>) -> Result<Reply, String> {
        self.call("PUT", endpoint, body, &[])
    }

    /// One request: the headers Go's client sends (a PUT without a body has
    /// `Content-Length: 0`, a GET none), `fds` passed with the first bytes (SCM_RIGHTS).
    fn call(
        &mut self,
        method: &str,
        endpoint: &str,
        body: Option<&str>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, String> {
        let what = format!("{method} {endpoint}");
        let mut request = format!(
            "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n\
             User-Agent: OpenAPI-Generator/1.0.0/go\r\nAccept: application/json\r\n\
             Connection: keep-alive\r\n"
        );
        match body {
            Some(body) => request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )),
            None if method == "PUT" => request.push_str("Content-Length: 0\r\n\r\n"),
            None => request.push_str("\r\n"),
        }
        let started = Instant::now();
        let idle = self.last_used.elapsed();
        let (reply, close) = match self.attempt(&what, request.as_bytes(), fds, started) {
            Ok(done) => done,
            // A reused connection the server closed just as the request went out (its idle
            // timeout): Go's transport would fail a PUT here; record it and try once more on
            // a new connection so that the rest of the sequence runs.
            Err((true, e)) => {
                self.idle_races.push((idle, format!("{what}: {e}")));
                self.attempt(&what, request.as_bytes(), fds, Instant::now())
                    .map_err(|(_, e)| e)?
            }
            Err((false, e)) => return Err(e),
        };
        if close {
            self.close_requests.push(what.clone());
            self.stream = None;
        }
        report(&format!(
            "{}: [connection {}] {what} -> {} in {} ms{}",
            self.log_label,
            reply.connection,
            reply.status,
            reply.elapsed.as_millis(),
            if reply.body.is_empty() || reply.body.len() > 160 {
                String::new()
            } else {
                format!(" {}", reply.body)
            }
        ));
        Ok(reply)
    }

    /// Sends one request and reads its response. The error says whether it may be the race
    /// with the server's closing of an idle connection: a reused connection, nothing received.
    fn attempt(
        &mut self,
        what: &str,
        request: &[u8],
        fds: &[BorrowedFd<'_>],
        started: Instant,
    ) -> Result<(Reply, bool), (bool, String)> {
        let before = self.connections;
        self.connection(what).map_err(|e| (false, e))?;
        let reused = self.connections == before;
        let stream = self.stream.as_mut().expect("connected");
        let sent = if fds.is_empty() {
            stream.write_all(request)
        } else {
            send_with_fds(stream, request, fds)
        };
        let result = match sent {
            Ok(()) => self.read_reply(what, started),
            Err(e) => Err((true, format!("{what}: send: {e}"))),
        };
        self.last_used = Instant::now();
        result.map_err(|(nothing_received, e)| {
            self.stream = None;
            (reused && nothing_received, e)
        })
    }

    /// Reads one response, framed by `Content-Length` (none in a 204). Returns it and whether
    /// the server asked to close the connection.
    fn read_reply(
        &mut self,
        what: &str,
        started: Instant,
    ) -> Result<(Reply, bool), (bool, String)> {
        let connection = self.connections;
        let stream = self.stream.as_mut().expect("connected");
        let mut chunk = [0u8; 4096];
        let mut buf = std::mem::take(&mut self.pending);
        let mut fill = |buf: &mut Vec<u8>| -> Result<(), (bool, String)> {
            let n = stream
                .read(&mut chunk)
                .map_err(|e| (buf.is_empty(), format!("{what}: read: {e}")))?;
            if n == 0 {
                return Err((
                    buf.is_empty(),
                    format!(
                        "{what}: the server closed the connection before a complete response \
                     (had {:?})",
                        String::from_utf8_lossy(buf)
                    ),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        };
        loop {
            let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                fill(&mut buf)?;
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            if !status_line.starts_with("HTTP/1.1 ") {
                return Err((
                    false,
                    format!("{what}: not an HTTP/1.1 status line: {status_line:?}"),
                ));
            }
            let status: u16 = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| (false, format!("{what}: bad status line {status_line:?}")))?;
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let header = |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            if status == 100 {
                buf.drain(..head_end + 4);
                continue;
            }
            let length = match (header("content-length"), status) {
                (Some(v), _) => v
                    .parse::<usize>()
                    .map_err(|_| (false, format!("{what}: bad Content-Length {v:?}")))?,
                (None, 204 | 304) => 0,
                (None, _) => {
                    return Err((
                        false,
                        format!(
                            "{what}: a {status} response without Content-Length cannot be \
                             framed on a keep-alive connection"
                        ),
                    ))
                }
            };
            let total = head_end + 4 + length;
            while buf.len() < total {
                fill(&mut buf)?;
            }
            let body = String::from_utf8_lossy(&buf[head_end + 4..total]).into_owned();
            buf.drain(..total);
            self.pending = buf;
            let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
            return Ok((
                Reply {
                    status,
                    body,
                    content_type: header("content-type"),
                    elapsed: started.elapsed(),
                    connection,
                },
                close,
            ));
        }
    }
}

/// Writes `data` with `fds` attached to its first bytes (one `sendmsg`), the rest plainly.
fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // u64 storage keeps the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 16];
    // SAFETY: CMSG_SPACE and CMSG_LEN are pure computations on their argument.
    let (space, len) = unsafe {
        (
            libc::CMSG_SPACE(payload as u32) as usize,
            libc::CMSG_LEN(payload as u32),
        )
    };
    assert!(space <= std::mem::size_of_val(&control), "too many fds");
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `control`, which has room for one header and `payload` bytes
    // (asserted above); CMSG_FIRSTHDR is non-null for it and CMSG_DATA points inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        assert!(!cmsg.is_null());
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = len as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), payload);
    }
    // SAFETY: `msg` points at `iov` (covering `data`) and `control`, alive for the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    (&*stream).write_all(&data[n as usize..])
}

/// Asserts the status (with the VMM's diagnostics otherwise) and, for a body, the
/// `application/json` content type Go's generated client needs to decode it.
fn expect(vmm: &Vmm, reply: Result<Reply, String>, status: u16, what: &str) -> Reply {
    let reply = reply.unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("{what}: {e}"))));
    assert_eq!(
        reply.status,
        status,
        "{}",
        vmm.diagnose(&format!(
            "{what}: answered {}: {}",
            reply.status, reply.body
        ))
    );
    if !reply.body.is_empty() && reply.status < 300 {
        assert!(
            reply
                .content_type
                .as_deref()
                .is_some_and(|t| t.contains("application/json")),
            "{what}: Go's generated client decodes only a JSON content type, got {:?}",
            reply.content_type
        );
    }
    reply
}

/// A request answered later than Kata's deadline for it would fail in Kata.
fn within_kata_deadline(label: &str, what: &str, reply: &Reply, limit: Duration) {
    if reply.elapsed > limit {
        report(&format!(
            "{label}: FINDING: {what} took {} ms, past Kata's {} ms deadline",
            reply.elapsed.as_millis(),
            limit.as_millis()
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Kata's bodies
// ---------------------------------------------------------------------------------------------

/// `vm.create` as clh.go builds it with the generated client's constructors (every defaulted
/// member present): 1 boot vCPU of at most 4 with Kata's topology, shared memory with room to
/// hot-plug, the entropy device, no serial and console except the serial port in Kata's debug
/// mode (which is how this test reads the guest), two PCI segments, the agent's hybrid vsock.
/// `pmem_rootfs`: Kata up to 3.26 (the image on virtio-pmem, `discard_writes`); otherwise 3.27
/// on (a read-only raw disk). Memory is smaller than Kata's 2 GiB default to keep the emulated
/// boot short. Kata also puts a virtio-fs share (`kataShared`) on PCI segment 1, which this
/// VMM refuses (`fs.pci_segment`), so it is left out of the body here.
fn kata_vm_config(
    assets: &Assets,
    rootfs: &Path,
    pmem_rootfs: bool,
    vsock_socket: &Path,
    cmdline: &str,
) -> serde_json::Value {
    let mut body = serde_json::json!({
        "payload": {"kernel": assets.vmlinux, "initramfs": assets.initramfs,
                    "cmdline": cmdline},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 4, "kvm_hyperv": false, "nested": true,
                 "topology": {"threads_per_core": 1, "cores_per_die": 4,
                              "dies_per_package": 1, "packages": 1}},
        "memory": {"size": 512u64 << 20, "mergeable": false, "hotplug_method": "Acpi",
                   "shared": true, "hugepages": false, "prefault": false, "thp": true,
                   "hotplug_size": 4u64 << 30},
        "rng": {"src": "/dev/urandom", "iommu": false},
        "serial": {"mode": "Tty", "iommu": false},
        "console": {"mode": "Off", "iommu": false},
        "iommu": false, "watchdog": false, "pvpanic": false, "landlock_enable": false,
        "platform": {"num_pci_segments": 2, "tdx": false, "sev_snp": false},
        "vsock": {"cid": 3, "socket": vsock_socket, "iommu": false}
    });
    if pmem_rootfs {
        body["pmem"] = serde_json::json!([{"file": rootfs, "iommu": false,
                                           "discard_writes": true}]);
    } else {
        body["disks"] = serde_json::json!([{"path": rootfs, "readonly": true,
            "direct": false, "iommu": false, "num_queues": 1, "queue_size": 128,
            "vhost_user": false, "backing_files": false, "sparse": true,
            "image_type": "Raw"}]);
    }
    body
}

/// `vm.add-net` as Kata's `addNet` makes it: `NewNetConfig()` (its defaults, among them CH's
/// old host address 192.168.249.1) with the MAC; the TAP goes as a descriptor.
fn kata_net_body() -> String {
    serde_json::json!({"ip": "192.168.249.1", "mask": "255.255.255.0", "mac": GUEST_MAC,
                       "iommu": false, "num_queues": 2, "queue_size": 256,
                       "vhost_user": false, "vhost_mode": "Client"})
    .to_string()
}

/// `vm.add-disk` as `hotplugAddBlockDevice` makes it: `NewDiskConfig(path)`, readonly as the
/// drive, no vhost-user, one queue per boot vCPU, queue size 1024.
fn kata_disk_body(path: &Path) -> String {
    serde_json::json!({"path": path, "readonly": false, "direct": false, "iommu": false,
                       "num_queues": 1, "queue_size": 1024, "vhost_user": false,
                       "backing_files": false, "sparse": true, "image_type": "Raw"})
    .to_string()
}

/// Kata's `clhPciInfoToPath`: the answer's `bdf` must be `0000:00:XX.0`; XX is the slot.
fn kata_pci_path(bdf: &str) -> Result<u8, String> {
    let tokens: Vec<&str> = bdf.split(':').collect();
    if tokens.len() != 3 || tokens[0] != "0000" || tokens[1] != "00" {
        return Err(format!("Unexpected PCI address {bdf:?} from clh hotplug"));
    }
    let tokens: Vec<&str> = tokens[2].split('.').collect();
    if tokens.len() != 2 || tokens[1] != "0" || tokens[0].len() != 2 {
        return Err(format!("Unexpected PCI address {bdf:?} from clh hotplug"));
    }
    u8::from_str_radix(tokens[0], 16).map_err(|e| format!("{bdf}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The sandbox's network namespace, its TAP, the guest's control service
// ---------------------------------------------------------------------------------------------

/// The sandbox's namespace with Kata's TAP opened in it (TUNSETIFF with IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR on /dev/net/tun), addressed [`HOST_IP`]/24 and up. The TAP lives as long as
/// the returned descriptor (and the VMM's copies of it).
fn sandbox_namespace(label: &str) -> (NetNs, OwnedFd) {
    let ns = NetNs::new(label).expect("network namespace");
    let tap = ns
        .run(|| -> Result<OwnedFd, String> {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(|e| format!("open /dev/net/tun: {e}"))?;
            // SAFETY: ifreq is a plain C struct for which all-zero bytes are valid.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (dst, src) in ifr.ifr_name.iter_mut().zip(TAP.bytes()) {
                *dst = src as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, `ifr`, live and
            // exclusively borrowed across the call, on an open tun descriptor.
            let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
            if ret < 0 {
                return Err(format!(
                    "TUNSETIFF {TAP}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(OwnedFd::from(file))
        })
        .expect("enter the namespace")
        .unwrap_or_else(|e| panic!("{e}"));
    for args in [
        &["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP][..],
        &["link", "set", TAP, "up"],
    ] {
        ns.ip(args).expect("configure the TAP");
    }
    (ns, tap)
}

/// The TAP's IPv4 addresses (`ip -4 -o addr show`), as `A.B.C.D/N`.
fn tap_addresses(ns: &NetNs) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-4", "-o", "addr", "show", "dev", TAP])
        .output()
        .expect("run ip addr show");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "inet")
        .map(|w| w[1].to_string())
        .collect()
}

/// A line-command connection to /init's control service.
struct Ctl {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Ctl {
    fn connect(ns: &NetNs, timeout: Duration) -> Result<Ctl, String> {
        let stream = ns
            .run(move || {
                let addr: SocketAddr = format!("{GUEST_IP}:{CTL_PORT}").parse().expect("address");
                let deadline = Instant::now() + timeout;
                loop {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(s) => return Ok(s),
                        Err(e) if Instant::now() >= deadline => {
                            return Err(format!("connect to {addr}: {e}"))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
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

    fn cmd(&mut self, command: &str) -> Result<String, String> {
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|e| format!("{command}: write: {e}"))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(format!("{command}: the guest closed the connection")),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(format!("{command}: read: {e}")),
        }
    }
}

/// The guest's `pcidev BDF` answer, polled until `done` accepts it; with the time it took.
fn poll_pcidev(
    vmm: &Vmm,
    ctl: &mut Ctl,
    bdf: &str,
    done: impl Fn(&str) -> bool,
) -> (String, Duration) {
    let start = Instant::now();
    loop {
        let reply = ctl
            .cmd(&format!("pcidev {bdf}"))
            .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
        assert!(reply.starts_with("pcidev "), "{}", vmm.diagnose(&reply));
        if done(&reply) {
            return (reply, start.elapsed());
        }
        assert!(
            start.elapsed() < STEP_TIMEOUT,
            "{}",
            vmm.diagnose(&format!("{bdf}: the guest still says {reply:?}"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// The hybrid vsock: Kata's runtime reaching its agent
// ---------------------------------------------------------------------------------------------

fn read_line_from(stream: &mut impl Read) -> Result<String, String> {
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

/// `CONNECT <port>\n` on the vsock's Unix socket, `OK <host port>\n` back, then the guest's
/// echo of [`VSOCK_BYTES`] bytes: (the OK line, FNV-1a sent, FNV-1a back, bytes back).
fn vsock_echo(socket: &Path) -> Result<(String, u64, u64, usize), String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("connect to {}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes())
        .map_err(|e| format!("send CONNECT: {e}"))?;
    let ok = read_line_from(&mut stream)?;
    if !ok.starts_with("OK ") {
        return Err(format!("CONNECT {AGENT_VSOCK_PORT} was answered {ok:?}"));
    }
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || -> Result<u64, String> {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id());
        let data: Vec<u8> = (0..VSOCK_BYTES)
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

/// The agent's connection: the guest echoes what the host sends over the hybrid vsock.
fn agent_round_trip(vmm: &mut Vmm, socket: &Path, label: &str) {
    wait_step(vmm, "LINUX-GUEST VSOCK listening", STEP_TIMEOUT);
    let (ok, sent, back, back_len) = vsock_echo(socket)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("vsock round trip: {e}"))));
    assert_eq!(
        back_len,
        VSOCK_BYTES,
        "{}",
        vmm.diagnose("vsock bytes back")
    );
    assert_eq!(sent, back, "{}", vmm.diagnose("the vsock echo differs"));
    let echo = wait_step(vmm, "LINUX-GUEST VSOCK echo", STEP_TIMEOUT);
    assert!(
        echo.contains(&format!("bytes={VSOCK_BYTES} fnv={sent:016x}")),
        "{}",
        vmm.diagnose(&echo)
    );
    report(&format!(
        "{label}: vsock: CONNECT {AGENT_VSOCK_PORT} answered {ok:?}; {VSOCK_BYTES} bytes echoed \
         by the guest"
    ));
}

// ---------------------------------------------------------------------------------------------
// The sequence
// ---------------------------------------------------------------------------------------------

/// Starts the VMM as Kata's `launchClh` does (only `--api-socket`), inside the sandbox's
/// namespace, and waits for its socket.
fn launch_vmm(name: &str, ns: &NetNs, api: &Path) -> Vmm {
    let mut vmm = Vmm::builder(name)
        .wrapped_in(ns.exec_prefix())
        .args(["--api-socket", api.to_str().expect("path")])
        .spawn()
        .expect("start the VMM");
    wait_for_api_socket(&mut vmm, api, Duration::from_secs(30));
    vmm
}

/// `vmm.ping`, `vm.create`, `vm.info` (Created), `vm.add-net` with the TAP's descriptor,
/// `vm.boot`, `vm.info` (Running), as `bootVM` runs them; all on the client's connection.
/// Returns whether the NIC runs on the descriptor passed with `vm.add-net`: when `vm.boot`
/// finds that descriptor gone (a finding), the NIC is given again by the TAP's name (the TAP
/// made persistent and `tap` closed) so that the rest of the sequence can run.
fn create_and_boot(
    vmm: &Vmm,
    api: &mut KeepAliveClient,
    config: &serde_json::Value,
    tap: &mut Option<OwnedFd>,
) -> bool {
    let label = api.log_label;
    let ping = expect(vmm, api.get("vmm.ping"), 200, "vmm.ping");
    assert!(ping.json()["version"].is_string(), "{}", ping.body);
    within_kata_deadline(label, "vmm.ping", &ping, KATA_API_TIMEOUT);

    // `StartVM` gives `bootVM` one deadline (clhAPITimeout) for vm.create through vm.boot.
    let started = Instant::now();
    let create = expect(
        vmm,
        api.put("vm.create", Some(&config.to_string())),
        204,
        "vm.create",
    );
    let info = expect(vmm, api.get("vm.info"), 200, "vm.info after vm.create");
    assert_eq!(info.json()["state"], "Created", "{}", info.body);
    let net_body = kata_net_body();
    let tap_fd = tap.as_ref().expect("the TAP's descriptor").as_fd();
    let net = expect(
        vmm,
        api.call("PUT", "vm.add-net", Some(&net_body), &[tap_fd]),
        204,
        "vm.add-net before boot",
    );
    let mut boot = api
        .put("vm.boot", None)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("vm.boot: {e}"))));
    let create_to_boot = started.elapsed();
    let mut on_passed_fd = true;
    if boot.status == 500 && boot.body.contains("descriptor passed for net") {
        on_passed_fd = false;
        report(&format!(
            "{label}: FINDING: vm.boot after vm.add-net with a TAP descriptor on the created VM \
             answered 500 {}: the descriptor passed before boot is not kept open for the boot \
             (CH keeps it; every Kata sandbox adds its NICs this way)",
            boot.body
        ));
        // Fallback: the NIC again, by the TAP's name.
        let info = expect(
            vmm,
            api.get("vm.info"),
            200,
            "vm.info after the failed boot",
        );
        let id = info.json()["config"]["net"][0]["id"].clone();
        let remove = serde_json::json!({ "id": id }).to_string();
        expect(
            vmm,
            api.put("vm.remove-device", Some(&remove)),
            204,
            "vm.remove-device",
        );
        let fd = tap.take().expect("the TAP's descriptor");
        // SAFETY: TUNSETPERSIST takes an integer argument by value on our open tun descriptor.
        let ret =
            unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST as _, 1 as libc::c_ulong) };
        assert_eq!(ret, 0, "TUNSETPERSIST: {}", std::io::Error::last_os_error());
        drop(fd);
        // No `ip`/`mask` this time: the VMM would set them on a TAP it opens by name.
        let by_name = serde_json::json!({"tap": TAP, "mac": GUEST_MAC, "iommu": false,
            "num_queues": 2, "queue_size": 256, "vhost_user": false, "vhost_mode": "Client"});
        expect(
            vmm,
            api.put("vm.add-net", Some(&by_name.to_string())),
            204,
            "vm.add-net by name (fallback)",
        );
        boot = api
            .put("vm.boot", None)
            .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&format!("vm.boot: {e}"))));
    }
    let boot = expect(vmm, Ok(boot), 204, "vm.boot");
    let info = expect(vmm, api.get("vm.info"), 200, "vm.info after vm.boot");
    assert_eq!(info.json()["state"], "Running", "{}", info.body);
    let nets = info.json()["config"]["net"].clone();
    assert_eq!(nets.as_array().map(Vec::len), Some(1), "{nets}");
    assert_eq!(nets[0]["mac"], GUEST_MAC, "{nets}");
    report(&format!(
        "{label}: vm.create {} ms, vm.add-net {} ms, vm.boot {} ms; vm.create through vm.boot \
         {} ms (Kata's deadline {} ms)",
        create.elapsed.as_millis(),
        net.elapsed.as_millis(),
        boot.elapsed.as_millis(),
        create_to_boot.as_millis(),
        KATA_API_TIMEOUT.as_millis()
    ));
    if create_to_boot > KATA_API_TIMEOUT {
        report(&format!(
            "{label}: FINDING: vm.create through vm.boot took {} ms; Kata's bootVM runs them \
             under one {} ms deadline",
            create_to_boot.as_millis(),
            KATA_API_TIMEOUT.as_millis()
        ));
    }
    on_passed_fd
}

/// `vmm.shutdown` (Kata's `terminate`), then the process must be gone within 3 s, exit 0.
fn shutdown_vmm(vmm: &mut Vmm, api: &mut KeepAliveClient) {
    let label = api.log_label;
    let reply = expect(vmm, api.put("vmm.shutdown", None), 204, "vmm.shutdown");
    within_kata_deadline(label, "vmm.shutdown", &reply, KATA_STOP_TIMEOUT);
    let t = Instant::now();
    let status = vmm
        .wait_exit(KATA_STOP_TIMEOUT)
        .unwrap_or_else(|e| panic!("the VMM outlived Kata's {KATA_STOP_TIMEOUT:?}: {e}"));
    assert!(
        status.success(),
        "{}",
        vmm.diagnose(&format!(
            "vmm.shutdown should end the VMM with 0, got {status}"
        ))
    );
    report(&format!(
        "{label}: vmm.shutdown: the VMM exited ({status}) {} ms after its answer",
        t.elapsed().as_millis()
    ));
}

/// How the connection fared: every idle closure is a finding (Cloud Hypervisor's server keeps
/// a keep-alive connection open until the client closes it; Go's transport copes with a
/// closed idle connection, but a PUT it sends at the moment of the closure is not retried and
/// fails). A closure after a short idle time, or a server asking to close, fails the test.
fn connection_summary(api: &KeepAliveClient, requests: usize) {
    let label = api.log_label;
    report(&format!(
        "{label}: {requests} API requests over {} connection(s) (one more for the vsock)",
        api.connections
    ));
    assert!(
        api.close_requests.is_empty(),
        "the server answered with `Connection: close` to {:?} on a keep-alive connection",
        api.close_requests
    );
    for (idle, what) in &api.idle_races {
        report(&format!(
            "{label}: FINDING: a request raced the server's closing of the connection after \
             {:.1} s idle and was sent again on a new one ({what}); Kata's Go client fails a \
             PUT so",
            idle.as_secs_f64()
        ));
    }
    for (idle, what) in &api.idle_closures {
        report(&format!(
            "{label}: FINDING: the keep-alive connection was found closed by the server after \
             {:.1} s idle, before {what} (CH keeps it open; a PUT racing the close fails in \
             Kata's Go client)",
            idle.as_secs_f64()
        ));
        assert!(
            *idle >= Duration::from_secs(5),
            "the server closed a keep-alive connection after only {idle:?} idle"
        );
    }
}

/// How long the server keeps an idle keep-alive connection open: one `vmm.ping` on a
/// connection of its own, then the time until the server closes it (none within `limit`).
fn idle_close_probe(
    socket: PathBuf,
    limit: Duration,
) -> std::thread::JoinHandle<Result<Option<Duration>, String>> {
    std::thread::spawn(move || {
        let mut client = KeepAliveClient::new(&socket, "kata_sequence(idle probe)");
        let reply = client.get("vmm.ping")?;
        if reply.status != 200 {
            return Err(format!("vmm.ping answered {}", reply.status));
        }
        let answered = Instant::now();
        let stream = client.stream.as_mut().ok_or("the server closed at once")?;
        stream
            .set_read_timeout(Some(limit))
            .map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => Ok(Some(answered.elapsed())),
            Ok(_) => Err("unsolicited bytes on the idle connection".into()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    })
}

/// Kata from 3.27 on (rootfs on a read-only disk): the whole sandbox life, then `vm.info`'s
/// configuration into a fresh VMM's `vm.create`.
#[test]
fn kata_3_27_disk_rootfs_sequence_over_one_keep_alive_connection() {
    require_kvm!();
    require_netns!();
    let label = "kata_sequence(3.27 disk)";
    let assets = linux_assets();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("kata_disk").expect("temp dir");
    let (ns, tap) = sandbox_namespace("kata");
    let mut tap = Some(tap);
    let rootfs = dir.join("kata-containers.img");
    fs::copy(&assets.disk, &rootfs).expect("copy the image");
    let token = new_token("kata");
    let added = dir.join("container.img");
    let marker = format!("kata-container-disk-{token}");
    let mut image = format!("{marker}\n").into_bytes();
    image.resize(1 << 20, 0);
    fs::write(&added, &image).expect("write the container's disk");
    let vsock = dir.join("clh.sock");
    let api_path = dir.join("clh-api.sock");
    let cmdline = format!(
        "{ROOT_PARAMS_DISK} {KATA_PARAMS} {QUIRKS_CMDLINE} tg.ip={GUEST_IP}/24 \
         tg.peer={HOST_IP} tg.ctl={CTL_PORT} tg.vport={AGENT_VSOCK_PORT} tg.token={token} \
         tg.checks=pci,vsock,serve"
    );
    let config = kata_vm_config(&assets, &rootfs, false, &vsock, &cmdline);

    let mut vmm = launch_vmm("kata_disk", &ns, &api_path);
    let mut api = KeepAliveClient::new(&api_path, label);
    let on_passed_fd = create_and_boot(&vmm, &mut api, &config, &mut tap);
    let mut requests = if on_passed_fd { 6 } else { 10 };
    // The first burst, back to back as Kata sends it, shares one connection.
    assert_eq!(
        api.connections, 1,
        "the first requests needed new connections"
    );

    // While the guest boots: does an idle keep-alive connection stay open?
    let probe = idle_close_probe(api_path.clone(), Duration::from_secs(30));
    let pci = wait_step(&mut vmm, "LINUX-GUEST PCI", BOOT_TIMEOUT);
    report(&format!("{label}: {pci}"));
    match probe.join().expect("the idle probe panicked") {
        Ok(Some(after)) => report(&format!(
            "{label}: FINDING: the server closes an idle keep-alive connection after {:.1} s \
             (CH's keeps it until the client closes it)",
            after.as_secs_f64()
        )),
        Ok(None) => report(&format!(
            "{label}: an idle keep-alive connection stayed open for 30 s"
        )),
        Err(e) => panic!("{}", vmm.diagnose(&format!("idle probe: {e}"))),
    }
    // virtio-net, -blk (the rootfs), -rng, -vsock.
    check_pci_marker(&vmm, &pci, &["1041", "1042", "1044", "1053"]);
    agent_round_trip(&mut vmm, &vsock, label);
    wait_step(&mut vmm, "LINUX-GUEST SERVE listening", STEP_TIMEOUT);
    let mut ctl =
        Ctl::connect(&ns, STEP_TIMEOUT).unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
    // The guest reached the host over the TAP whose descriptor went with vm.add-net.
    let addresses = tap_addresses(&ns);
    report(&format!(
        "{label}: {TAP} addresses after boot: {addresses:?}"
    ));
    if on_passed_fd && addresses != [format!("{HOST_IP}/24")] {
        report(&format!(
            "{label}: FINDING: the VMM changed the passed TAP's address to {addresses:?} (the \
             NetConfig's ip/mask apply only to TAPs the VMM opens itself in CH)"
        ));
    }

    // A container: its block device hot-plugged.
    let info = expect(&vmm, api.get("vm.info"), 200, "vm.info");
    requests += 1;
    assert_eq!(info.json()["state"], "Running");
    let add = expect(
        &vmm,
        api.put("vm.add-disk", Some(&kata_disk_body(&added))),
        200,
        "vm.add-disk",
    );
    requests += 1;
    within_kata_deadline(label, "vm.add-disk", &add, KATA_HOTPLUG_TIMEOUT);
    let device = add.json();
    let id = device["id"].as_str().expect("id").to_string();
    let bdf = device["bdf"].as_str().expect("bdf").to_string();
    let slot = kata_pci_path(&bdf).unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
    let (present, seen) = poll_pcidev(&vmm, &mut ctl, &bdf, |r| {
        r.contains("driver=virtio-pci") && !r.contains("block=-")
    });
    let block = marker_fields(&present)
        .get("block")
        .cloned()
        .expect("block field");
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
        "{label}: vm.add-disk: {id} at {bdf} (Kata's PCI path {slot:02x}); the guest read \
         /dev/{block} {} ms later",
        seen.as_millis()
    ));

    // Kata's ResizeVCPUs: vm.info for the current count, then vm.resize to the same count.
    let info = expect(&vmm, api.get("vm.info"), 200, "vm.info");
    requests += 1;
    let cpus = &info.json()["config"]["cpus"];
    let boot_vcpus = cpus["boot_vcpus"].as_u64().expect("boot_vcpus");
    assert_eq!(
        (boot_vcpus, cpus["max_vcpus"].as_u64()),
        (1, Some(4)),
        "{cpus}"
    );
    let disks = info.json()["config"]["disks"].clone();
    let entry = disks
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("vm.info lacks {id}: {disks}"))
        .clone();
    assert_eq!(
        entry["pci_device_id"].as_u64(),
        Some(u64::from(slot)),
        "{entry}"
    );
    // CH's device tree: the virtio device's parent, its PCI transport, holds the BDF.
    let tree = &info.json()["device_tree"];
    let transport = tree[id.as_str()]["parent"].as_str().unwrap_or_default();
    assert_eq!(tree[transport]["pci_bdf"], bdf.as_str(), "{}", info.body);
    let resize_body = serde_json::json!({"desired_vcpus": boot_vcpus}).to_string();
    let resize = expect(
        &vmm,
        api.put("vm.resize", Some(&resize_body)),
        204,
        "vm.resize",
    );
    requests += 1;
    within_kata_deadline(label, "vm.resize", &resize, KATA_API_TIMEOUT);

    // The container ends: its disk is removed; the guest ejects it.
    let remove_body = serde_json::json!({"id": id}).to_string();
    let remove = expect(
        &vmm,
        api.put("vm.remove-device", Some(&remove_body)),
        204,
        "vm.remove-device",
    );
    requests += 1;
    within_kata_deadline(label, "vm.remove-device", &remove, KATA_HOTPLUG_TIMEOUT);
    let (gone, gone_after) = poll_pcidev(&vmm, &mut ctl, &bdf, |r| r.contains("absent"));
    assert_eq!(gone, "pcidev absent");
    let deadline = Instant::now() + STEP_TIMEOUT;
    let final_info = loop {
        let info = expect(&vmm, api.get("vm.info"), 200, "vm.info");
        requests += 1;
        let still = info.json()["config"]["disks"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["id"] == id.as_str()));
        if !still {
            break info.json();
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            vmm.diagnose("the ejected disk stays in the configuration")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    report(&format!(
        "{label}: vm.remove-device {id}: gone from the guest {} ms later",
        gone_after.as_millis()
    ));
    let klog = ctl
        .cmd("klog")
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
    assert!(klog.starts_with("klog ok"), "{}", vmm.diagnose(&klog));

    // The sandbox stops.
    shutdown_vmm(&mut vmm, &mut api);
    requests += 1;
    connection_summary(&api, requests);
    drop(vmm);

    // vm.info's configuration into a fresh VMM's vm.create.
    info_to_create_round_trip(label, &dir, final_info["config"].clone());
}

/// Feeds `config` (from `vm.info`) to a fresh VMM's `vm.create`: Cloud Hypervisor answers 204
/// (it ignores the `fds` of a NIC in a `vm.create` body: descriptor numbers of another
/// process mean nothing here).
fn info_to_create_round_trip(label: &'static str, dir: &TempDir, config: serde_json::Value) {
    let api_path = dir.join("fresh-api.sock");
    let mut vmm = Vmm::builder("kata_round_trip")
        .args(["--api-socket", api_path.to_str().expect("path")])
        .spawn()
        .expect("start a fresh VMM");
    wait_for_api_socket(&mut vmm, &api_path, Duration::from_secs(30));
    let mut api = KeepAliveClient::new(&api_path, label);
    let fds_in_body = config["net"][0]["fds"].clone();
    let first = api
        .put("vm.create", Some(&config.to_string()))
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
    if first.status != 204 {
        report(&format!(
            "{label}: FINDING: vm.create with vm.info's configuration answered {}: {} (net fds \
             in the body: {fds_in_body}; CH ignores them and answers 204); retried without them",
            first.status, first.body
        ));
        let mut stripped = config.clone();
        if let Some(nets) = stripped["net"].as_array_mut() {
            for net in nets {
                net["fds"] = serde_json::Value::Null;
            }
        }
        expect(
            &vmm,
            api.put("vm.create", Some(&stripped.to_string())),
            204,
            "vm.create with vm.info's configuration, net fds removed",
        );
    }
    let info = expect(&vmm, api.get("vm.info"), 200, "vm.info of the fresh VMM");
    assert_eq!(info.json()["state"], "Created", "{}", info.body);
    let kept_fds = info.json()["config"]["net"][0]["fds"].clone();
    if !kept_fds.is_null() && kept_fds != serde_json::json!([]) {
        report(&format!(
            "{label}: FINDING: vm.create kept the body's net fds {kept_fds} (numbers of the \
             other VMM's descriptors; CH drops fds from a vm.create body, and a boot here would \
             use whatever this process has open under those numbers)"
        ));
    }
    let mut differences = Vec::new();
    diff_json("", &config, &info.json()["config"], &mut differences);
    if differences.is_empty() {
        report(&format!(
            "{label}: vm.info -> vm.create: 204, the fresh VMM reports the same configuration"
        ));
    } else {
        report(&format!(
            "{label}: vm.info -> vm.create: 204; the fresh VMM's configuration differs at {}",
            differences.join(", ")
        ));
    }
    shutdown_vmm(&mut vmm, &mut api);
}

/// JSON pointers where `a` and `b` differ.
fn diff_json(at: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            for key in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let null = serde_json::Value::Null;
                diff_json(
                    &format!("{at}/{key}"),
                    x.get(key).unwrap_or(&null),
                    y.get(key).unwrap_or(&null),
                    out,
                );
            }
        }
        (serde_json::Value::Array(x), serde_json::Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff_json(&format!("{at}/{i}"), p, q, out);
            }
        }
        _ if a != b => out.push(format!("{at} ({a} vs {b})")),
        _ => {}
    }
}

/// Kata up to 3.26 (rootfs on virtio-pmem with `discard_writes`): create, NIC, boot, info, the
/// agent's vsock; then `vm.shutdown` and `vmm.shutdown`.
#[test]
fn kata_3_26_pmem_rootfs_boots_and_serves_the_agent() {
    require_kvm!();
    require_netns!();
    let label = "kata_sequence(3.26 pmem)";
    let assets = linux_assets();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("kata_pmem").expect("temp dir");
    let (ns, tap) = sandbox_namespace("katap");
    let mut tap = Some(tap);
    let rootfs = dir.join("kata-containers.img");
    fs::copy(&assets.disk, &rootfs).expect("copy the image");
    let original = fs::read(&rootfs).expect("read the image");
    let token = new_token("katap");
    let vsock = dir.join("clh.sock");
    let api_path = dir.join("clh-api.sock");
    // `wait`: /init stays up (for the power button) after the vsock check.
    let cmdline = format!(
        "{ROOT_PARAMS_PMEM} {KATA_PARAMS} {QUIRKS_CMDLINE} tg.ip={GUEST_IP}/24 \
         tg.vport={AGENT_VSOCK_PORT} tg.token={token} tg.checks=pci,vsock,wait"
    );
    let config = kata_vm_config(&assets, &rootfs, true, &vsock, &cmdline);

    let mut vmm = launch_vmm("kata_pmem", &ns, &api_path);
    let mut api = KeepAliveClient::new(&api_path, label);
    let on_passed_fd = create_and_boot(&vmm, &mut api, &config, &mut tap);
    assert_eq!(
        api.connections, 1,
        "the first requests needed new connections"
    );
    let pci = wait_step(&mut vmm, "LINUX-GUEST PCI", BOOT_TIMEOUT);
    report(&format!("{label}: {pci}"));
    // virtio-net, -rng, -vsock, -pmem (the rootfs).
    check_pci_marker(&vmm, &pci, &["1041", "1044", "1053", "105b"]);
    agent_round_trip(&mut vmm, &vsock, label);
    let info = expect(&vmm, api.get("vm.info"), 200, "vm.info");
    let pmem = info.json()["config"]["pmem"].clone();
    assert_eq!(pmem[0]["discard_writes"], true, "{pmem}");

    // vm.shutdown stops the VM and leaves the VMM serving; vmm.shutdown ends it.
    expect(&vmm, api.put("vm.shutdown", None), 204, "vm.shutdown");
    let after = expect(&vmm, api.get("vm.info"), 200, "vm.info after vm.shutdown");
    let state = after.json()["state"].clone();
    report(&format!(
        "{label}: vm.info after vm.shutdown: state {state}"
    ));
    if state != "Created" {
        // CH drops the VM at vm.shutdown and keeps its configuration: `Created`.
        report(&format!(
            "{label}: FINDING: vm.info after vm.shutdown says {state}; CH says \"Created\""
        ));
    }
    assert!(
        vmm.poll_exit().is_none(),
        "{}",
        vmm.diagnose("vm.shutdown ended the VMM")
    );
    shutdown_vmm(&mut vmm, &mut api);
    connection_summary(&api, if on_passed_fd { 10 } else { 14 });
    assert!(
        fs::read(&rootfs).expect("read the image") == original,
        "the discard_writes rootfs image changed"
    );
}
