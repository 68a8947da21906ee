//! The frontend side of vhost-user: a device whose queues another process (the backend, e.g.
//! virtiofsd) serves. This process keeps the virtio-pci transport and the configuration space;
//! the backend maps guest RAM (the memfds of `--memory shared=on`), reads the rings and
//! descriptors itself, waits on the queues' notification eventfds (KVM ioeventfds) and
//! signals used buffers on eventfds that are the MSI-X vectors' KVM irqfds, so the data path
//! never passes through this process.
//!
//! The protocol itself is rust-vmm's `vhost` crate (`vhost-user-frontend`). What this module
//! adds: a bounded wait for every answer (the socket has read and write timeouts, so a backend
//! that never answers is an error after [`HANDSHAKE_TIMEOUT`], not a hang), errors that say
//! which step failed at which socket, and the message sequence Cloud Hypervisor uses:
//! - [`VhostUserConnection::connect`] (VM creation): SET_OWNER, GET_FEATURES,
//!   GET/SET_PROTOCOL_FEATURES (MQ, REPLY_ACK), GET_QUEUE_NUM;
//! - [`VhostUserConnection::start`] (the driver's DRIVER_OK): SET_FEATURES, SET_MEM_TABLE, and
//!   per queue SET_VRING_NUM, _ADDR, _BASE, _CALL, _KICK, _ENABLE;
//! - [`VhostUserConnection::stop`] (the driver's reset): per queue SET_VRING_ENABLE 0 and
//!   GET_VRING_BASE, after which the backend no longer touches the rings.
//!
//! With REPLY_ACK negotiated every message is acknowledged, so a request the backend refuses
//! is seen at the step that caused it.
//!
//! The bound on waiting: the `vhost` crate retries a receive that times out (`EAGAIN` from
//! `SO_RCVTIMEO`) forever, so a socket timeout alone cannot end the wait. Each connection
//! therefore has a watchdog thread: a step arms it with a deadline, and if the answer has not
//! come by then the watchdog shuts the socket down, which ends the crate's receive with an
//! error; the connection is then unusable and the step reports the timeout.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

/// How long any one answer of the backend may take, at VM creation and at activation.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often, and how far apart, a refused connection is tried again: a backend started just
/// before the VMM may not listen yet (the `vhost` crate's own connect does the same).
const CONNECT_ATTEMPTS: u32 = 5;
const CONNECT_RETRY: Duration = Duration::from_millis(100);

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a virtio feature bit only the two vhost-user ends see.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// The protocol features this frontend uses: MQ (the backend says how many queues it serves)
/// and REPLY_ACK (every request is acknowledged, so a refusal shows at its step).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error(
        "cannot connect to the vhost-user backend at {path}: {source} (is the backend, e.g. \
         virtiofsd, running and listening there?)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the watchdog thread of the vhost-user socket {path}: {source}")]
    Watchdog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the vhost-user socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the vhost-user backend at {path} gave no answer to {step} within {timeout:?}")]
    Timeout {
        path: PathBuf,
        step: &'static str,
        timeout: Duration,
    },
    #[error("the vhost-user backend at {path} failed {step}: {source}")]
    Protocol {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error(
        "the vhost-user backend at {path} does not offer VIRTIO_F_VERSION_1 (features {features:#x})"
    )]
    NoVersion1 { path: PathBuf, features: u64 },
    #[error("the vhost-user backend at {path} serves {have} queues but the device needs {want}")]
    QueueCount {
        path: PathBuf,
        have: u64,
        want: usize,
    },
    #[error(
        "guest memory at {addr:#x} is not shared with other processes, so the vhost-user \
         backend cannot map it (memory.shared=on or memory.hugepages=on is required)"
    )]
    MemoryNotShared { addr: u64 },
    #[error("queue {index}: its rings are not in guest memory")]
    RingOutsideMemory { index: usize },
}

/// One queue as the backend gets it: the driver's ring addresses and progress, the eventfd the
/// guest's notifications arrive on (kick) and the eventfd that interrupts the guest (call).
pub struct VringSetup<'a> {
    pub queue: &'a Queue,
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
}

/// What the watchdog thread and the steps share.
#[derive(Default)]
struct WatchState {
    deadline: Option<Instant>,
    expired: bool,
    quit: bool,
}

/// Shuts the socket down when an armed deadline passes (see the module's documentation).
struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

fn lock_state(m: &Mutex<WatchState>) -> std::sync::MutexGuard<'_, WatchState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Watchdog {
    /// Starts the thread; it runs `thread_start` first (its seccomp filter) and ends at once
    /// if that says no (then no step is bounded; `thread_start` logged why).
    fn start(
        socket: UnixStream,
        thread_start: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> io::Result<Self> {
        let shared = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-watch".into())
            .spawn(move || {
                if !thread_start() {
                    return;
                }
                let (state, wake) = &*theirs;
                let mut s = lock_state(state);
                while !s.quit {
                    match s.deadline {
                        Some(at) if Instant::now() >= at => {
                            s.deadline = None;
                            s.expired = true;
                            let _ = socket.shutdown(std::net::Shutdown::Both);
                        }
                        Some(at) => {
                            let wait = at.saturating_duration_since(Instant::now());
                            s = wake
                                .wait_timeout(s, wait)
                                .map_or_else(|p| p.into_inner().0, |r| r.0);
                        }
                        None => s = wake.wait(s).unwrap_or_else(|p| p.into_inner()),
                    }
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    fn arm(&self, timeout: Duration) {
        let (state, wake) = &*self.shared;
        lock_state(state).deadline = Some(Instant::now() + timeout);
        wake.notify_one();
    }

    /// Disarms; true if the deadline passed (the socket is shut down).
    fn disarm(&self) -> bool {
        let (state, _) = &*self.shared;
        let mut s = lock_state(state);
        s.deadline = None;
        s.expired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (state, wake) = &*self.shared;
        lock_state(state).quit = true;
        wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A connected, negotiated vhost-user backend.
pub struct VhostUserConnection {
    path: PathBuf,
    frontend: Frontend,
    watchdog: Watchdog,
    timeout: Duration,
    /// The virtio features the backend offers (GET_FEATURES).
    backend_features: u64,
    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was negotiated: rings then start disabled and
    /// are switched with SET_VRING_ENABLE.
    protocol_features: bool,
    /// Queues handed to the backend by the last [`VhostUserConnection::start`].
    started: usize,
}

impl std::fmt::Debug for VhostUserConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserConnection")
            .field("path", &self.path)
            .field("backend_features", &self.backend_features)
            .field("started", &self.started)
            .finish()
    }
}

impl VhostUserConnection {
    /// Connects to the backend listening at `path` and negotiates what does not depend on the
    /// guest's driver; the backend must serve at least `queues` queues. Every answer must come
    /// within `timeout`. `thread_start` runs first on the connection's watchdog thread (the
    /// caller's seccomp filter for it) and says whether the thread may go on.
    pub fn connect(
        path: &Path,
        queues: usize,
        timeout: Duration,
        thread_start: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Result<Self, VhostUserError> {
        let stream = connect_with_retry(path)?;
        let socket_err = |source| VhostUserError::Socket {
            path: path.to_path_buf(),
            source,
        };
        let watched = stream.try_clone().map_err(socket_err)?;
        let watchdog =
            Watchdog::start(watched, thread_start).map_err(|source| VhostUserError::Watchdog {
                path: path.to_path_buf(),
                source,
            })?;
        let mut conn = Self {
            path: path.to_path_buf(),
            frontend: Frontend::from_stream(stream, queues as u64),
            watchdog,
            timeout,
            backend_features: 0,
            protocol_features: false,
            started: 0,
        };
        conn.negotiate(queues)?;
        Ok(conn)
    }

    fn negotiate(&mut self, queues: usize) -> Result<(), VhostUserError> {
        let frontend = self.frontend.clone();
        self.step("SET_OWNER", || frontend.set_owner())?;
        self.backend_features = self.step("GET_FEATURES", || frontend.get_features())?;
        if self.backend_features & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserError::NoVersion1 {
                path: self.path.clone(),
                features: self.backend_features,
            });
        }
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            // A backend without protocol features serves as many queues as it is given.
            return Ok(());
        }
        self.protocol_features = true;
        let mut frontend = self.frontend.clone();
        let offered = self.step("GET_PROTOCOL_FEATURES", || frontend.get_protocol_features())?;
        let acked = offered & wanted_protocol_features();
        self.step("SET_PROTOCOL_FEATURES", || {
            frontend.set_protocol_features(acked)
        })?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            let have = self.step("GET_QUEUE_NUM", || frontend.get_queue_num())?;
            if have < queues as u64 {
                return Err(VhostUserError::QueueCount {
                    path: self.path.clone(),
                    have,
                    want: queues,
                });
            }
        }
        Ok(())
    }

    /// Runs one protocol step, naming it (and a missing answer) in the error.
    fn step<T>(
        &self,
        step: &'static str,
        f: impl FnOnce() -> vhost::Result<T>,
    ) -> Result<T, VhostUserError> {
        self.watchdog.arm(self.timeout);
        let result = f();
        let expired = self.watchdog.disarm();
        result.map_err(|source| {
            if expired || is_timeout(&source) {
                VhostUserError::Timeout {
                    path: self.path.clone(),
                    step,
                    timeout: self.timeout,
                }
            } else {
                VhostUserError::Protocol {
                    path: self.path.clone(),
                    step,
                    source,
                }
            }
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The virtio features the backend offers.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Hands guest memory and the queues to the backend, which serves them from then on.
    /// `acked_features` are the driver's (a subset of the backend's).
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        acked_features: u64,
        vrings: &[VringSetup<'_>],
    ) -> Result<(), VhostUserError> {
        let regions = memory_regions(mem)?;
        let features = (acked_features & self.backend_features)
            | (self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES);
        let frontend = self.frontend.clone();
        let mut frontend_mut = self.frontend.clone();
        self.step("SET_FEATURES", || frontend.set_features(features))?;
        self.step("SET_MEM_TABLE", || {
            frontend.set_mem_table(&regions).map(drop)
        })?;
        for (index, vring) in vrings.iter().enumerate() {
            let q = vring.queue;
            let host = |addr: u64| {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| VhostUserError::RingOutsideMemory { index })
            };
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            self.started = self.started.max(index + 1);
            self.step("SET_VRING_NUM", || frontend.set_vring_num(index, q.size()))?;
            self.step("SET_VRING_ADDR", || frontend.set_vring_addr(index, &config))?;
            self.step("SET_VRING_BASE", || {
                frontend.set_vring_base(index, q.next_avail())
            })?;
            self.step("SET_VRING_CALL", || {
                frontend.set_vring_call(index, vring.call)
            })?;
            self.step("SET_VRING_KICK", || {
                frontend.set_vring_kick(index, vring.kick)
            })?;
            if self.protocol_features {
                self.step("SET_VRING_ENABLE", || {
                    frontend_mut.set_vring_enable(index, true)
                })?;
            }
        }
        Ok(())
    }

    /// Takes the queues back from the backend (the driver reset the device): it stops
    /// touching the rings once it answered GET_VRING_BASE. Stops at the first failure.
    pub fn stop(&mut self) -> Result<(), VhostUserError> {
        let frontend = self.frontend.clone();
        let mut frontend_mut = self.frontend.clone();
        let started = std::mem::take(&mut self.started);
        for index in 0..started {
            if self.protocol_features {
                self.step("SET_VRING_ENABLE", || {
                    frontend_mut.set_vring_enable(index, false)
                })?;
            }
            self.step("GET_VRING_BASE", || frontend.get_vring_base(index))?;
        }
        Ok(())
    }
}

impl AsRawFd for VhostUserConnection {
    fn as_raw_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }
}

/// Connects to a Unix socket, trying again for a moment while nobody accepts yet.
fn connect_with_retry(path: &Path) -> Result<UnixStream, VhostUserError> {
    let mut attempt = 1;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused && attempt < CONNECT_ATTEMPTS =>
            {
                attempt += 1;
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(source) => {
                return Err(VhostUserError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Whether a `vhost` error is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` expired).
fn is_timeout(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as Vu;
    matches!(
        e,
        vhost::Error::VhostUserProtocol(Vu::SocketRetry(io) | Vu::SocketError(io))
            if io.kind() == io::ErrorKind::WouldBlock || io.kind() == io::ErrorKind::TimedOut
    )
}

/// Every region of guest RAM as the backend maps it: its memfd, offset and addresses. Private
/// memory is refused: the backend would map pages the guest never sees.
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserError> {
    mem.iter()
        .map(|region| {
            let addr = region.start_addr().0;
            if region.flags() & libc::MAP_SHARED == 0 || region.file_offset().is_none() {
                return Err(VhostUserError::MemoryNotShared { addr });
            }
            VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|_| VhostUserError::MemoryNotShared { addr })
        })
        .collect()
}

/// Whether `mem` can be handed to a vhost-user backend (every region a shared file mapping).
pub fn check_shared_memory(mem: &GuestMemoryMmap) -> Result<(), VhostUserError> {
    memory_regions(mem).map(drop)
}
