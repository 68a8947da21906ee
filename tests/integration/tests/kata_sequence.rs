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
//! Where Kata depends on Cloud Hypervisor's behaviour the test fails; what only a slower machine
//! misses (Kata's deadlines, with guest kernel code emulated here) is printed as a `FINDING:`
//! line.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration::linux_guest::{
    check_pci_marker, linux_assets, new_token, vsock_echo, wait_step, Assets, Ctl, QUIRKS_CMDLINE,
};
use integration::{
    kvm_serial_guard, marker_fields, report, require_kvm, require_netns, wait_for_api_socket,
    NetNs, TempDir, Vmm,
};

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

/// The agent's connection: the guest echoes what the host sends over the hybrid vsock.
fn agent_round_trip(vmm: &mut Vmm, socket: &Path, label: &str) {
    wait_step(vmm, "LINUX-GUEST VSOCK listening", STEP_TIMEOUT);
    let (ok, sent, back, back_len) =
        vsock_echo(socket, AGENT_VSOCK_PORT, VSOCK_BYTES, STEP_TIMEOUT)
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
/// The NIC runs on the TAP descriptor passed with `vm.add-net`.
fn create_and_boot(
    vmm: &Vmm,
    api: &mut KeepAliveClient,
    config: &serde_json::Value,
    tap: &OwnedFd,
) {
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
    let tap_fd = tap.as_fd();
    let net = expect(
        vmm,
        api.call("PUT", "vm.add-net", Some(&net_body), &[tap_fd]),
        204,
        "vm.add-net before boot",
    );
    // CH keeps a TAP descriptor passed before boot open for the boot; every Kata sandbox
    // adds its NICs this way.
    let boot = expect(vmm, api.put("vm.boot", None), 204, "vm.boot");
    let create_to_boot = started.elapsed();
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
    // CH keeps an idle keep-alive connection open; Kata's Go client fails a PUT that races
    // the server's close instead of sending it again.
    assert!(
        api.idle_races.is_empty() && api.idle_closures.is_empty(),
        "{label}: the server closed the idle keep-alive connection: raced {:?}, found closed {:?}",
        api.idle_races,
        api.idle_closures
    );
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
    let assets = linux_assets().unwrap_or_else(|e| panic!("{e}"));
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("kata_disk").expect("temp dir");
    let (ns, tap) = sandbox_namespace("kata");
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
    create_and_boot(&vmm, &mut api, &config, &tap);
    let mut requests = 6;
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
        Ok(Some(after)) => panic!(
            "{}",
            vmm.diagnose(&format!(
                "the server closed an idle keep-alive connection after {:.1} s (CH keeps it \
                 until the client closes it; a PUT racing the close fails in Kata's Go client)",
                after.as_secs_f64()
            ))
        ),
        Ok(None) => report(&format!(
            "{label}: an idle keep-alive connection stayed open for 30 s"
        )),
        Err(e) => panic!("{}", vmm.diagnose(&format!("idle probe: {e}"))),
    }
    // virtio-net, -blk (the rootfs), -rng, -vsock.
    check_pci_marker(&pci, &["1041", "1042", "1044", "1053"])
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
    agent_round_trip(&mut vmm, &vsock, label);
    wait_step(&mut vmm, "LINUX-GUEST SERVE listening", STEP_TIMEOUT);
    let mut ctl = Ctl::connect(&ns, (GUEST_IP, CTL_PORT), STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
    // The guest reached the host over the TAP whose descriptor went with vm.add-net.
    let addresses = tap_addresses(&ns);
    report(&format!(
        "{label}: {TAP} addresses after boot: {addresses:?}"
    ));
    // CH applies a NetConfig's ip/mask only to TAPs it opens itself.
    assert_eq!(
        addresses,
        [format!("{HOST_IP}/24")],
        "{label}: the VMM changed the passed TAP's address"
    );

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
    expect(
        &vmm,
        api.put("vm.create", Some(&config.to_string())),
        204,
        &format!("vm.create with vm.info's configuration (net fds in the body: {fds_in_body})"),
    );
    let info = expect(&vmm, api.get("vm.info"), 200, "vm.info of the fresh VMM");
    assert_eq!(info.json()["state"], "Created", "{}", info.body);
    // CH drops descriptor numbers from a vm.create body: they are the other VMM's.
    let kept_fds = info.json()["config"]["net"][0]["fds"].clone();
    assert!(
        kept_fds.is_null() || kept_fds == serde_json::json!([]),
        "{label}: vm.create kept the body's net fds {kept_fds}"
    );
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
    let assets = linux_assets().unwrap_or_else(|e| panic!("{e}"));
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("kata_pmem").expect("temp dir");
    let (ns, tap) = sandbox_namespace("katap");
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
    create_and_boot(&vmm, &mut api, &config, &tap);
    assert_eq!(
        api.connections, 1,
        "the first requests needed new connections"
    );
    let pci = wait_step(&mut vmm, "LINUX-GUEST PCI", BOOT_TIMEOUT);
    report(&format!("{label}: {pci}"));
    // virtio-net, -rng, -vsock, -pmem (the rootfs).
    check_pci_marker(&pci, &["1041", "1044", "1053", "105b"])
        .unwrap_or_else(|e| panic!("{}", vmm.diagnose(&e)));
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
    // CH drops the VM at vm.shutdown and keeps its configuration: `Created`.
    assert_eq!(state, "Created", "{label}: vm.info after vm.shutdown");
    assert!(
        vmm.poll_exit().is_none(),
        "{}",
        vmm.diagnose("vm.shutdown ended the VMM")
    );
    shutdown_vmm(&mut vmm, &mut api);
    connection_summary(&api, 10);
    assert!(
        fs::read(&rootfs).expect("read the image") == original,
        "the discard_writes rootfs image changed"
    );
}
