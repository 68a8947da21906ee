//! virtio-fs (virtio 1.x, 5.11 File System Device) served by a vhost-user backend such as
//! virtiofsd, as Cloud Hypervisor offers it (`--fs tag=,socket=,num_queues=,queue_size=`).
//!
//! This process owns the device's identity and configuration space (the mount tag and the
//! number of request queues) and the virtio-pci transport; the backend owns the queues: one
//! high-priority queue and `num_queues` request queues, all handed over at the driver's
//! DRIVER_OK with the guest's memory (see [`super::vhost_user`]). The backend reads the
//! guest's notifications from the queues' KVM ioeventfds and interrupts the guest through the
//! MSI-X vectors' KVM irqfds; where the transport has no irqfd for a queue (INTx, no vector)
//! it signals an eventfd of this device instead, which the device loop relays.
//!
//! Activation happens on a vCPU thread, which only stores the queues and wakes the device loop;
//! the loop talks to the backend (every answer bounded by the handshake timeout). A backend
//! that dies (its socket closes) or breaks the protocol marks the device failed: the error is
//! logged once, the counters show it, the guest's outstanding requests stay unanswered, and the
//! VM and the VMM go on; the device refuses activation from then on.
//!
//! No DAX window (the shared memory region of 5.11.5): the guest's page cache holds file data
//! as with `cache=none` or `cache=auto` backends. Snapshot, live migration and fault tolerance
//! are refused for a VM with this device: the backend's state (its open files, the FUSE
//! session) is outside this process.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::vhost_user::{VhostUserConnection, VhostUserError, VringSetup};
use super::{
    ActivateError, ActiveQueue, InterruptKind, VirtQueueState, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

/// Device ID from the virtio specification (5 Device Types).
pub const VIRTIO_ID_FS: u32 = 26;
/// The `tag` field of the configuration space (5.11.4): UTF-8, NUL-padded, not terminated when
/// it fills all 36 bytes.
pub const TAG_LEN: usize = 36;
/// Config space: tag[36], num_request_queues (le32).
const CONFIG_LEN: usize = TAG_LEN + 4;
/// The high-priority queue comes first, then the request queues.
const HIPRIO_QUEUES: usize = 1;

/// Ring features the backend may offer the driver through us (descriptor layouts and
/// notification suppression are the backend's business).
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const PASSED_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_BACKEND: u32 = 1;
/// Relay eventfd of queue `i`: token `TOKEN_RELAY + i`.
const TOKEN_RELAY: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs {id}: tag \"{tag}\" must be 1 to {TAG_LEN} bytes long")]
    Tag { id: String, tag: String },
    #[error("virtio-fs {id}: at least one request queue is needed")]
    NoRequestQueue { id: String },
    #[error("virtio-fs {id}: cannot create an eventfd: {source}")]
    EventFd {
        id: String,
        #[source]
        source: io::Error,
    },
    #[error("virtio-fs {id}: {source}")]
    Backend {
        id: String,
        #[source]
        source: VhostUserError,
    },
}

/// What the device loop has done, for `vm.counters`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FsCounters {
    /// Times the queues were handed to the backend.
    pub activations: u64,
    /// Backend signals relayed as interrupts (queues without an irqfd of their own).
    pub relayed_interrupts: u64,
    /// 1 once the backend failed (died, broke the protocol, refused a step).
    pub backend_failed: u64,
}

/// The queues the driver set up, until the backend has them (and after, for their state).
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<ActiveQueue>,
    /// Per queue: the transport's irqfd the backend signals directly, or None (relayed).
    direct: Vec<Option<EventFd>>,
    started: bool,
}

pub struct Fs {
    id: String,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    backend: VhostUserConnection,
    activate_evt: EventFd,
    /// One per queue: what the backend signals when the transport has no irqfd for it.
    relays: Vec<EventFd>,
    active: Option<Active>,
    /// The backend still has queues of a driver that reset the device.
    stop_pending: bool,
    /// Why the backend is unusable, once it is.
    failed: Option<String>,
    /// Whether the backend's socket is in the loop (watched for its death).
    watching_backend: bool,
    counters: FsCounters,
}

impl Fs {
    /// Connects to the backend at `socket` and negotiates with it (bounded by `timeout` per
    /// answer): a device with `tag`, one high-priority queue and `request_queues` request
    /// queues of `queue_size` entries. `thread_start` runs first on the connection's watchdog
    /// thread (see [`VhostUserConnection::connect`]).
    pub fn new(
        id: String,
        tag: &str,
        request_queues: usize,
        queue_size: u16,
        socket: &Path,
        timeout: Duration,
        thread_start: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag {
                id,
                tag: tag.to_string(),
            });
        }
        if request_queues == 0 {
            return Err(FsError::NoRequestQueue { id });
        }
        let queues = HIPRIO_QUEUES + request_queues;
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&(request_queues as u32).to_le_bytes());
        let evt = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| FsError::EventFd {
                id: id.clone(),
                source,
            })
        };
        let activate_evt = evt()?;
        let relays = (0..queues).map(|_| evt()).collect::<Result<Vec<_>, _>>()?;
        let backend = VhostUserConnection::connect(socket, queues, timeout, thread_start).map_err(
            |source| FsError::Backend {
                id: id.clone(),
                source,
            },
        )?;
        let avail_features = backend.backend_features() & PASSED_FEATURES;
        Ok(Self {
            id,
            queue_sizes: vec![queue_size; queues],
            avail_features,
            acked_features: 0,
            config,
            backend,
            activate_evt,
            relays,
            active: None,
            stop_pending: false,
            failed: None,
            watching_backend: false,
            counters: FsCounters::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Why the backend is unusable, if it is.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let c = &self.counters;
        BTreeMap::from([
            ("activations", c.activations),
            ("relayed_interrupts", c.relayed_interrupts),
            ("backend_failed", c.backend_failed),
        ])
    }

    /// Marks the backend unusable (once) and stops watching its socket.
    fn fail(&mut self, why: String, ops: &mut EventOps) {
        if self.failed.is_none() {
            error!(
                "{}: virtio-fs backend failed: {why}; the device stops serving (the guest's \
                 requests to it stay unanswered), the VM goes on",
                self.id
            );
            self.failed = Some(why);
            self.counters.backend_failed = 1;
        }
        if self.watching_backend {
            self.watching_backend = false;
            if let Err(e) = ops.remove(Events::with_data(
                &self.backend,
                TOKEN_BACKEND,
                EventSet::IN | EventSet::HANG_UP | EventSet::ERROR,
            )) {
                warn!(
                    "{}: cannot stop watching the backend socket: {e:?}",
                    self.id
                );
            }
        }
    }

    /// The loop's part of activation and reset: take the queues back from the backend after
    /// a reset, hand the new ones over after an activation.
    fn sync_backend(&mut self, ops: &mut EventOps) {
        if self.failed.is_some() {
            return;
        }
        if std::mem::take(&mut self.stop_pending) {
            if let Err(e) = self.backend.stop() {
                self.fail(e.to_string(), ops);
                return;
            }
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.started {
            return;
        }
        let vrings: Vec<VringSetup<'_>> = active
            .queues
            .iter()
            .zip(&active.direct)
            .zip(&self.relays)
            .map(|((q, direct), relay)| VringSetup {
                queue: &q.queue,
                kick: q.notify.as_ref(),
                call: direct.as_ref().unwrap_or(relay),
            })
            .collect();
        let result = self
            .backend
            .start(&active.mem, self.acked_features, &vrings);
        match result {
            Ok(()) => {
                active.started = true;
                self.counters.activations += 1;
                let relayed = active.direct.iter().filter(|d| d.is_none()).count();
                info!(
                    "{}: virtio-fs queues handed to the backend at {} ({relayed} of {} \
                     interrupts relayed)",
                    self.id,
                    self.backend.path().display(),
                    active.queues.len()
                );
            }
            Err(e) => self.fail(e.to_string(), ops),
        }
    }

    fn relay(&mut self, index: usize) {
        let Some(relay) = self.relays.get(index) else {
            return;
        };
        let _ = relay.read();
        let Some(active) = &self.active else {
            return;
        };
        self.counters.relayed_interrupts += 1;
        if let Err(e) = active.interrupt.trigger(InterruptKind::Queue(index as u16)) {
            error!("{}: cannot interrupt the guest: {e}", self.id);
        }
    }
}

impl VirtioDevice for Fs {
    virtio_device_basics!(VIRTIO_ID_FS);

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The config space is read-only for the driver.
        log::debug!(
            "{}: ignoring a {}-byte config write at {offset:#x}",
            self.id,
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if let Some(why) = &self.failed {
            return Err(ActivateError::Device(format!(
                "{}: the vhost-user backend failed earlier: {why}",
                self.id
            )));
        }
        super::check_active_queues(&queues, &mem, self.queue_sizes.len())?;
        super::vhost_user::check_shared_memory(&mem)
            .map_err(|e| ActivateError::Device(format!("{}: {e}", self.id)))?;
        let direct = (0..queues.len())
            .map(|i| interrupt.notifier(InterruptKind::Queue(i as u16)))
            .collect();
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
            direct,
            started: false,
        });
        self.activate_evt.write(1).map_err(|e| {
            self.active = None;
            ActivateError::Device(format!("{}: cannot signal the event loop: {e}", self.id))
        })
    }

    fn active_queue_states(&self) -> Vec<VirtQueueState> {
        // The backend has the queues' progress; this is where the driver put them.
        self.active.as_ref().map_or_else(Vec::new, |a| {
            a.queues
                .iter()
                .map(|q| VirtQueueState::from(q.queue.state()))
                .collect()
        })
    }

    fn reset(&mut self) {
        // A stop already owed (a reset the loop has not seen) stays owed.
        if self.active.take().is_some_and(|a| a.started) {
            self.stop_pending = true;
        }
        self.acked_features = 0;
        if let Err(e) = self.activate_evt.write(1) {
            error!(
                "{}: cannot signal the event loop of the reset: {e}",
                self.id
            );
        }
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            error!("{}: cannot register the activation eventfd: {e:?}", self.id);
        }
        for (i, relay) in self.relays.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(
                relay,
                TOKEN_RELAY + i as u32,
                EventSet::IN,
            )) {
                error!("{}: cannot register relay eventfd {i}: {e:?}", self.id);
            }
        }
        // Between requests the backend never writes on this socket: readability or a hang-up
        // means it died (or broke the protocol).
        if self.failed.is_none() && !self.watching_backend {
            match ops.add(Events::with_data(
                &self.backend,
                TOKEN_BACKEND,
                EventSet::IN | EventSet::HANG_UP | EventSet::ERROR,
            )) {
                Ok(()) => self.watching_backend = true,
                Err(e) => error!("{}: cannot watch the backend socket: {e:?}", self.id),
            }
        }
        if self.active.as_ref().is_some_and(|a| !a.started) || self.stop_pending {
            if let Err(e) = self.activate_evt.write(1) {
                error!("{}: cannot schedule the activation: {e}", self.id);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.sync_backend(ops);
            }
            TOKEN_BACKEND => {
                let set = events.event_set();
                let why = if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    format!(
                        "the backend at {} closed its socket (it exited or crashed)",
                        self.backend.path().display()
                    )
                } else {
                    format!(
                        "the backend at {} sent a message nobody asked for (or closed its \
                         socket)",
                        self.backend.path().display()
                    )
                };
                self.fail(why, ops);
            }
            token if token >= TOKEN_RELAY => self.relay((token - TOKEN_RELAY) as usize),
            other => warn!("{}: unexpected event token {other}", self.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixListener;
    use std::process::{Child, Command, Stdio};
    use std::sync::Mutex;
    use std::time::Instant;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

    use super::*;

    const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
    const MEM: usize = 4 << 20;

    struct NoIrq;
    impl VirtioInterrupt for NoIrq {
        fn trigger(&self, _kind: InterruptKind) -> io::Result<()> {
            Ok(())
        }
    }

    fn no_filter() -> Arc<dyn Fn() -> bool + Send + Sync> {
        Arc::new(|| true)
    }

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Guest RAM in a memfd mapped shared, as `--memory shared=on` makes it.
    fn shared_memory() -> GuestMemoryMmap {
        // SAFETY: a valid NUL-terminated name; the fd is checked and owned by the File.
        let fd = unsafe { libc::memfd_create(c"fs-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(MEM as u64).unwrap();
        let region = MmapRegionBuilder::new_with_bitmap(MEM, Default::default())
            .with_file_offset(FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .unwrap();
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap()
    }

    #[test]
    fn a_missing_refused_or_mute_backend_is_a_clear_error() {
        let d = dir("errors");
        let missing = d.join("missing.sock");
        let new = |socket: &Path| {
            Fs::new(
                "fs0".into(),
                "t",
                1,
                128,
                socket,
                Duration::from_millis(300),
                no_filter(),
            )
        };
        let e = new(&missing).err().unwrap().to_string();
        assert!(
            e.contains("cannot connect") && e.contains("missing.sock"),
            "{e}"
        );
        let refused = d.join("refused.sock");
        drop(UnixListener::bind(&refused).unwrap());
        let e = new(&refused).err().unwrap().to_string();
        assert!(e.contains("refused"), "{e}");
        let mute = d.join("mute.sock");
        let _listener = UnixListener::bind(&mute).unwrap();
        let started = Instant::now();
        let e = new(&mute).err().unwrap().to_string();
        assert!(
            e.contains("gave no answer to GET_FEATURES within 300ms"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let e = Fs::new(
            "fs0".into(),
            "",
            1,
            128,
            &mute,
            Duration::from_millis(300),
            no_filter(),
        );
        assert!(e.err().unwrap().to_string().contains("tag"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    struct Backend(Child);
    impl Drop for Backend {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Against QEMU's virtiofsd (skipped without it): the handshake, the config space, the
    /// queues handed over at activation, and the backend's death seen by the device loop.
    #[test]
    fn virtiofsd_takes_the_queues_and_its_death_marks_the_device_failed() {
        if !Path::new(VIRTIOFSD).exists() {
            eprintln!("SKIPPED: {VIRTIOFSD} is not installed");
            return;
        }
        let d = dir("virtiofsd");
        let socket = d.join("fs.sock");
        let mut backend = Backend(
            Command::new(VIRTIOFSD)
                .arg(format!("--socket-path={}", socket.display()))
                .args(["-o", &format!("source={}", d.display()), "-o", "cache=none"])
                .arg("-o")
                .arg("sandbox=chroot")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut fs = Fs::new(
            "fs0".into(),
            "myfs",
            1,
            128,
            &socket,
            HANDSHAKE,
            no_filter(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fs.device_type(), VIRTIO_ID_FS);
        assert_eq!(fs.queue_max_sizes(), &[128, 128]);
        assert_ne!(fs.avail_features() & VIRTIO_F_VERSION_1, 0);
        let mut config = [0u8; CONFIG_LEN];
        fs.read_config(0, &mut config);
        assert_eq!(&config[..5], b"myfs\0");
        assert_eq!(&config[TAG_LEN..], &1u32.to_le_bytes());
        fs.ack_features(VIRTIO_F_VERSION_1);

        let mem = shared_memory();
        let queues = (0..2u64)
            .map(|i| {
                let mut q = Queue::new(128).unwrap();
                let base = 0x10000 * (i + 1);
                q.set_desc_table_address(Some(base as u32), Some(0));
                q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
                q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
                q.set_ready(true);
                ActiveQueue {
                    queue: q,
                    notify: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                }
            })
            .collect();
        let fs = Arc::new(Mutex::new(fs));
        let mut manager: EventManager<Arc<Mutex<Fs>>> = EventManager::new().unwrap();
        manager.add_subscriber(fs.clone());
        super::super::core::lock(&fs)
            .activate(mem, Arc::new(NoIrq), queues)
            .unwrap();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(super::super::core::lock(&fs).counters()["activations"], 1);
        assert_eq!(super::super::core::lock(&fs).failure(), None);

        let _ = backend.0.kill();
        let _ = backend.0.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while super::super::core::lock(&fs).failure().is_none() && Instant::now() < deadline {
            manager.run_with_timeout(100).unwrap();
        }
        let fs = super::super::core::lock(&fs);
        assert!(fs
            .failure()
            .unwrap_or_default()
            .contains("closed its socket"));
        assert_eq!(fs.counters()["backend_failed"], 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    const HANDSHAKE: Duration = super::super::vhost_user::HANDSHAKE_TIMEOUT;
}
