//! The backup's side: one receiver thread waits for the primary, has the control loop prepare
//! the standby VM, and then keeps that VM's memory at the newest complete epoch.
//!
//! An epoch (after the initial synchronisation) is buffered as it arrives and applied only
//! when its EpochEnd arrives, so a partly received epoch is simply dropped: the memory always
//! holds the last complete epoch, whose state is kept beside it. The backup acknowledges an
//! epoch once it is applied. Replicated disks get the epoch's writes at that point; in
//! shared-disk mode the writes are kept until the primary reports them released, and written
//! again at failover (Cuju's disk I/O retry: re-applying the same writes in order is
//! idempotent).
//!
//! A silent primary (no frame within the heartbeat timeout) or a closed connection means the
//! primary is dead: after the witness agrees, the control loop restores the standby VM from
//! the last complete epoch. A stream that breaks the protocol (bad checksum, bad frame) comes
//! from a live primary: the backup reports the error and gives up without taking over.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::config::{HostResources, VmConfig};
use vmm::control::{FtDiskMode, FtHealth, FtRole, FtStatus, ReceiveFtRequest, VmmError};
use vmm::fault_tolerance::{BackupEvent, BackupFt};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::live::{parse_url, MigrationUrl};
use vmm::migration::memory::PAGE_SIZE;
use vmm::migration::protocol::{
    self, apply_pages, apply_pages_with_input, decode_state, write_frame, Frame, FrameReader,
    FrameType, LaneDigest, Message, ProtocolError, TransferStats, HEADER_LEN, TRAILER_LEN,
};
use vmm::vm::VmSnapshotState;
use vmm_sys_util::eventfd::EventFd;

use crate::disk_sync::ReplicaSet;
use crate::etcd_fence::LeaseHold;
use crate::fence;
use crate::fence::Fencing;
use crate::group::BackupMember;
use crate::input_store::{InputStore, INPUT_STORE_MAX};
use crate::link::{channel_security, FtStream};
use crate::output_store::{EpochOutput, OutputStore, OUTPUT_STORE_MAX};
use crate::wire::{
    decode_disk_writes, decode_input_frames, decode_output_frames, Control, DiskWrite,
};
use lanes::{Joined, LaneSet, LaneSource, Session};
use transport::Security;

mod lanes;

/// How long the backup waits for Hello and Params once a primary has connected, and for the
/// control loop to prepare the standby VM.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a backup waiting for its primary checks whether it was told to stop.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

struct Shared {
    wake: Arc<EventFd>,
    events: Mutex<VecDeque<BackupEvent>>,
    status: Mutex<FtStatus>,
    stop: AtomicBool,
    stream: Mutex<Option<FtStream>>,
    /// The session's data streams (closed with `stream`).
    lanes: Mutex<Vec<FtStream>>,
    /// When the primary was declared dead (for the failover time).
    lost_at: Mutex<Option<Instant>>,
    /// The group's coordinator told this member to stop receiving (another member's primary
    /// was lost).
    frozen: AtomicBool,
    /// The operator's TLS credentials (or plaintext opt-out) for the primary's and the
    /// witness's channels; `None` for an in-process link without a witness.
    security: Option<Security>,
    /// How this backup decides it may take over: its own operator's choice.
    fencing: Fencing,
    /// On etcd, the pair's key this side won at takeover: kept alive while it runs the VM.
    taken: Mutex<Option<LeaseHold>>,
}

impl Shared {
    fn push(&self, event: BackupEvent) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(event);
        let _ = self.wake.write(1);
    }

    fn status(&self) -> std::sync::MutexGuard<'_, FtStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the connections to the primary (the receive loop then ends).
    fn close_links(&self) {
        if let Some(stream) = self
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            stream.shutdown();
        }
        for lane in self.lanes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            lane.shutdown();
        }
    }
}

pub struct Backup {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Backup {
    pub fn start(request: &ReceiveFtRequest, wake: Arc<EventFd>) -> Result<Self, VmmError> {
        let url = parse_url(&request.receiver_url).map_err(VmmError::InvalidConfig)?;
        let MigrationUrl::Tcp(addr) = url else {
            return Err(VmmError::InvalidConfig(format!(
                "\"{}\": fault tolerance replicates over tcp:HOST:PORT",
                request.receiver_url
            )));
        };
        let security =
            channel_security(request.tls_dir.as_deref(), request.insecure_plaintext, true)?
                .ok_or_else(|| VmmError::InvalidConfig("no security choice".into()))?;
        let fencing = operator_fencing(request, Some(&security))?;
        let listener = TcpListener::bind(&addr).map_err(|e| VmmError::Failed {
            action: "receive-ft",
            message: format!("cannot listen on {addr}: {e}"),
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VmmError::Failed {
                action: "receive-ft",
                message: format!("socket option: {e}"),
            })?;
        log::info!(
            "FT: waiting for a primary on {addr} ({})",
            security.describe()
        );
        Self::start_with(
            Source::Listen(listener),
            Some(security),
            fencing,
            request,
            wake,
        )
    }

    /// A backup for a primary that is already connected (in-process links).
    pub fn start_connected(
        stream: FtStream,
        request: &ReceiveFtRequest,
        wake: Arc<EventFd>,
    ) -> Result<Self, VmmError> {
        Self::start_connected_with_lanes(stream, Vec::new(), request, wake)
    }

    /// [`Backup::start_connected`] with the data streams the primary will use (in the order
    /// it numbers them; each still has to join).
    pub fn start_connected_with_lanes(
        stream: FtStream,
        lanes: Vec<FtStream>,
        request: &ReceiveFtRequest,
        wake: Arc<EventFd>,
    ) -> Result<Self, VmmError> {
        // An in-process link has no TCP to secure; a witness or etcd still does.
        let security = channel_security(
            request.tls_dir.as_deref(),
            request.insecure_plaintext,
            request.witness.is_some() || request.fencing.is_some(),
        )?;
        let fencing = operator_fencing(request, security.as_ref())?;
        let source = Source::Connected(stream, lanes);
        Self::start_with(source, security, fencing, request, wake)
    }

    fn start_with(
        source: Source,
        security: Option<Security>,
        fencing: Fencing,
        request: &ReceiveFtRequest,
        wake: Arc<EventFd>,
    ) -> Result<Self, VmmError> {
        let shared = Arc::new(Shared {
            wake,
            events: Mutex::new(VecDeque::new()),
            status: Mutex::new(FtStatus {
                role: FtRole::Backup,
                health: FtHealth::WaitingForPrimary,
                fencing: fencing.describe(),
                ..FtStatus::default()
            }),
            stop: AtomicBool::new(false),
            stream: Mutex::new(None),
            lanes: Mutex::new(Vec::new()),
            lost_at: Mutex::new(None),
            frozen: AtomicBool::new(false),
            security,
            fencing,
            taken: Mutex::new(None),
        });
        let group = match &request.group {
            Some(path) => {
                let mut member = BackupMember::join(path).map_err(|e| VmmError::Failed {
                    action: "receive-ft",
                    message: format!("joining the FT group: {e}"),
                })?;
                let s = shared.clone();
                let decision = member
                    .listen(move || {
                        s.frozen.store(true, Ordering::SeqCst);
                        s.close_links();
                    })
                    .map_err(|message| VmmError::Failed {
                        action: "receive-ft",
                        message,
                    })?;
                shared.status().group = Some(path.clone());
                Some(GroupSide { member, decision })
            }
            None => None,
        };
        let s = shared.clone();
        let request = request.clone();
        let thread = std::thread::Builder::new()
            .name("ft-receiver".into())
            .spawn(move || {
                let event = if vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    receive(&s, source, &request, group)
                } else {
                    Err("the receiver thread cannot install its seccomp filter".to_string())
                };
                let event = match event {
                    Ok(event) => event,
                    Err(e) => BackupEvent::Failed(e),
                };
                if let BackupEvent::Failed(message) = &event {
                    let mut status = s.status();
                    status.health = FtHealth::Failed;
                    status.last_error = Some(message.clone());
                }
                if !s.stop.load(Ordering::SeqCst) {
                    s.push(event);
                }
            })
            .map_err(|e| VmmError::Failed {
                action: "receive-ft",
                message: format!("receiver thread: {e}"),
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }
}

impl BackupFt for Backup {
    fn poll(&mut self) -> BackupEvent {
        self.shared
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .unwrap_or(BackupEvent::None)
    }

    fn status(&self) -> FtStatus {
        self.shared.status().clone()
    }

    fn stop(mut self: Box<Self>) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.close_links();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn took_over(&mut self, result: Result<(), String>) {
        let lost_at = *self
            .shared
            .lost_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut status = self.shared.status();
        match result {
            Ok(()) => {
                status.health = FtHealth::TookOver;
                status.failovers += 1;
                status.last_failover_ms = lost_at.map(|t| t.elapsed().as_millis() as u64);
            }
            Err(e) => {
                status.health = FtHealth::Failed;
                status.last_error = Some(format!("takeover failed: {e}"));
            }
        }
    }
}

/// A backup's membership in an FT group: the coordinator's decision arrives on `decision`.
struct GroupSide {
    member: BackupMember,
    decision: mpsc::Receiver<Result<Option<u64>, String>>,
}

/// How long a member waits for the group's decision after reporting its primary lost.
fn group_decision_timeout(grace: Duration) -> Duration {
    grace + Duration::from_secs(5)
}

/// Where the primary's connections come from.
enum Source {
    Listen(TcpListener),
    /// The first connection and the data streams.
    Connected(FtStream, Vec<FtStream>),
}

/// Waits for a connection from the primary that passes the handshake (until a stop request
/// or `deadline`); returns it and where it came from.
fn accept_one(
    shared: &Shared,
    listener: &TcpListener,
    deadline: Option<Instant>,
) -> Result<(FtStream, String), String> {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Err("stopped while waiting for the primary".into());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err("the primary's data streams did not join in time".into());
        }
        match listener.accept() {
            Ok((stream, from)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                let Some(security) = &shared.security else {
                    return Err("a TCP listener without a security choice".into());
                };
                // A stranger that fails the handshake is turned away; the backup goes on
                // waiting for its primary.
                match security.accept(stream, transport::HANDSHAKE_TIMEOUT) {
                    Ok(stream) => return Ok((stream, from.to_string())),
                    Err(e) => log::warn!("FT: refused {from}: {e}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => return Err(format!("accepting the primary: {e}")),
        }
    }
}

/// The protection parameters the primary sent.
struct Params {
    pair_id: u64,
    heartbeat_timeout: Duration,
    epoch_ms: u64,
    disk_mode: FtDiskMode,
    disk_sizes: Vec<u64>,
    /// The VM's NICs (input frames name one).
    nics: usize,
    /// Data streams beside the first connection, and what each must repeat to join.
    lanes: u32,
    lane_token: u64,
}

/// One epoch being received: kept aside until its EpochEnd.
#[derive(Default)]
struct PendingEpoch {
    /// MemoryPages frames: flags and payload.
    pages: Vec<(u8, Vec<u8>)>,
    disk_writes: Vec<(usize, DiskWrite)>,
    /// The frames the primary's NICs still held when the epoch ended.
    output: EpochOutput,
    state: Option<Vec<u8>>,
    /// Page entries of the memory pass in progress (checked against MemoryDone).
    pass_pages: u64,
    /// Bytes buffered so far (bounded by [`Replica::epoch_limit`]).
    bytes: u64,
    /// When the primary captured it, on the primary's session clock.
    captured_ns: Option<u64>,
}

impl PendingEpoch {
    /// Counts `len` more buffered bytes; a primary that sends more than one epoch can hold
    /// (all of guest RAM, the disk writes, the state) breaks the stream instead of this
    /// host's memory.
    fn account(&mut self, len: usize, limit: u64) -> Result<(), String> {
        self.bytes = self.bytes.saturating_add(len as u64);
        if self.bytes > limit {
            return Err(format!(
                "an epoch of more than {limit} bytes (guest RAM, disk writes and state) arrived"
            ));
        }
        Ok(())
    }
}

/// What one epoch may carry besides guest RAM: disk writes, held output and the VM state.
const EPOCH_DISK_WRITES_MAX: u64 = 256 << 20;
/// The primary's hold limit (64 MiB, 1 Mi frames) with the frames' headers.
const EPOCH_OUTPUT_MAX: u64 = 96 << 20;
const EPOCH_STATE_MAX: u64 = vmm::migration::protocol::MAX_STATE_BYTES as u64;

fn epoch_limit(memory: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let ram: u64 = memory.iter().map(|r| r.len()).sum();
    // An epoch's pages may travel twice: once while it still ran (early sending), then what
    // changed after. Page entries carry a small header each; compressed pages are never much
    // larger.
    let pages = ram.saturating_mul(2);
    pages
        .saturating_add(pages / 64)
        .saturating_add(EPOCH_DISK_WRITES_MAX)
        .saturating_add(EPOCH_OUTPUT_MAX)
        .saturating_add(EPOCH_STATE_MAX)
}

/// What the receive loop ends with: the primary's departure or death.
enum Ending {
    StandDown {
        guest_shutdown: bool,
        reprotect: bool,
    },
    PrimaryLost(String),
}

/// Classifies a read error: the primary is gone (closed, silent, truncated mid-frame), or the
/// stream itself is bad (then the primary is alive and must be told). Over TLS a damaged
/// record fails its integrity check (`InvalidData`) before any frame check sees it: that is
/// a bad stream too, not a dead primary.
fn primary_gone(e: &ProtocolError) -> bool {
    match e {
        ProtocolError::Closed | ProtocolError::Truncated { .. } => true,
        ProtocolError::Io(io) => io.kind() != std::io::ErrorKind::InvalidData,
        _ => false,
    }
}

struct Link {
    stream: FtStream,
    reader: FrameReader,
    seq: u32,
    stats: TransferStats,
    /// A write to the primary failed (see [`Link::answer`]).
    broken: bool,
}

impl Link {
    fn send(&mut self, kind: FrameType, payload: &[u8]) -> std::io::Result<()> {
        write_frame(
            &mut self.stream,
            &mut self.seq,
            &mut self.stats,
            kind,
            payload,
        )
    }

    fn send_control(&mut self, control: &Control) -> std::io::Result<()> {
        self.send(FrameType::Control, &control.encode())
    }

    /// Answers the primary. A failed write means the primary's end is closing (it died, or
    /// it stands this backup down): that is not this side's error to report. Reading on
    /// finds out which (StandDown, or the connection's end), so the write error is only
    /// remembered and later answers are skipped.
    fn answer(&mut self, control: &Control) {
        if self.broken {
            return;
        }
        if let Err(e) = self.send_control(control) {
            log::debug!("FT: answering the primary: {e}; reading on");
            self.broken = true;
        }
    }
}

fn receive(
    shared: &Shared,
    source: Source,
    request: &ReceiveFtRequest,
    mut group: Option<GroupSide>,
) -> Result<BackupEvent, String> {
    let (stream, lane_source) = match source {
        Source::Listen(listener) => {
            let (stream, from) = accept_one(shared, &listener, None)?;
            log::info!("FT: primary connected from {from}");
            (stream, LaneSource::Listen(listener))
        }
        Source::Connected(stream, lanes) => (stream, LaneSource::Connected(lanes.into_iter())),
    };
    *shared.stream.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(stream.try_clone().map_err(|e| e.to_string())?);
    stream
        .set_read_timeout(Some(SETUP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    // Hello is the migration protocol's (version, page size, configuration): its receiver
    // reads it, then hands over the stream for the FT frames that follow.
    let authenticated = stream.authenticates_bytes();
    let mut receiver = protocol::Receiver::new(stream);
    receiver.set_authenticated(authenticated);
    let config = match receiver.recv_hello() {
        Ok(config) => config,
        Err(e) => {
            let e = e.to_string();
            let _ = receiver.send_error(&e);
            return Err(e);
        }
    };
    let (stream, reader, seq, stats) = receiver.into_parts();
    let mut link = Link {
        stream,
        reader,
        seq,
        stats,
        broken: false,
    };
    let result = setup(shared, &mut link, request, config, lane_source);
    let (params, memory, disks, joined) = match result {
        Ok(ok) => ok,
        Err(e) => {
            let _ = link.send(FrameType::Error, e.as_bytes());
            return Err(e);
        }
    };
    {
        let mut status = shared.status();
        status.peer = link.stream.peer();
        status.disk_mode = Some(params.disk_mode);
        status.epoch_ms = params.epoch_ms;
        status.heartbeat_timeout_ms = params.heartbeat_timeout.as_millis() as u64;
    }
    let mut replica = Replica {
        epoch_limit: epoch_limit(&memory),
        memory,
        disks,
        disk_mode: params.disk_mode,
        grouped: group.is_some(),
        complete: VecDeque::new(),
        committed: None,
        committed_group: None,
        retained: Vec::new(),
        scratch: Vec::new(),
        probe: vec![0; PAGE_SIZE],
        page_buffers: PageBuffers::default(),
        stats: TransferStats::default(),
        input: InputStore::new(params.nics, INPUT_STORE_MAX),
        output: OutputStore::new(OUTPUT_STORE_MAX),
        nics: params.nics,
        clock: PrimaryClock::new(),
    };
    let lanes = match LaneSet::start(shared, joined, replica.epoch_limit) {
        Ok(lanes) => lanes,
        Err(e) => {
            let _ = link.send(FrameType::Error, e.as_bytes());
            return Err(e);
        }
    };
    shared.status().streams = 1 + lanes.len() as u64;
    let ending = receive_epochs(
        shared,
        (&mut link, &lanes),
        &mut replica,
        params.heartbeat_timeout,
    );
    // The data streams' readers end before a takeover.
    drop(lanes);
    match ending {
        Ok(Ending::StandDown {
            guest_shutdown,
            reprotect,
        }) => {
            shared.status().health = FtHealth::Off;
            Ok(BackupEvent::StandDown {
                guest_shutdown,
                reprotect,
            })
        }
        Ok(Ending::PrimaryLost(_)) if shared.stop.load(Ordering::SeqCst) => {
            // Stopped on this side (its connection closed by `stop`): no claim, no takeover.
            Ok(BackupEvent::StandDown {
                guest_shutdown: false,
                reprotect: false,
            })
        }
        Ok(Ending::PrimaryLost(reason)) => {
            *shared.lost_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            let reason = if shared.frozen.load(Ordering::SeqCst) {
                "another member of the FT group lost its primary".to_string()
            } else {
                reason
            };
            if let Some(group) = group.as_mut() {
                // Every member claims the group's id: a grant here is the whole group's, and
                // a refusal (the primaries run on, degraded) must not freeze the others.
                let newest = replica.newest_complete().unwrap_or(0);
                claim(shared, params.pair_id, newest).map_err(|fenced| {
                    format!("primary lost ({reason}) but not taking over: {fenced}")
                })?;
                agree_with_group(shared, group, &params, &mut replica, &reason)?;
            }
            take_over(shared, &params, &mut replica, &reason)
        }
        Err(e) => {
            let _ = link.send(FrameType::Error, e.as_bytes());
            Err(e)
        }
    }
}

/// Params (after Hello), the data streams, then the standby VM prepared by the control loop.
fn setup(
    shared: &Shared,
    link: &mut Link,
    request: &ReceiveFtRequest,
    config: VmConfig,
    lane_source: LaneSource,
) -> Result<(Params, GuestMemoryMmap, Vec<File>, Joined), String> {
    let frame = link
        .reader
        .read_frame(&mut link.stream)
        .map_err(|e| e.to_string())?;
    let params = match Message::parse(&frame).map_err(|e| e.to_string())? {
        Message::Control { payload } => {
            match Control::decode(payload).map_err(|e| e.to_string())? {
                Control::Params {
                    pair_id,
                    epoch_ms,
                    heartbeat_timeout_ms,
                    disk_mode,
                    witness,
                    fencing,
                    disk_sizes,
                    lanes,
                    lane_token,
                } => {
                    shared
                        .fencing
                        .agree(witness.as_deref(), fencing.as_deref())?;
                    Params {
                        pair_id,
                        heartbeat_timeout: Duration::from_millis(heartbeat_timeout_ms.max(1)),
                        epoch_ms,
                        disk_mode,
                        disk_sizes,
                        nics: config.net.as_ref().map_or(0, Vec::len),
                        lanes,
                        lane_token,
                    }
                }
                other => return Err(format!("expected Params, got {other:?}")),
            }
        }
        other => return Err(format!("expected Params, got {other:?}")),
    };
    // The primary dials its data streams right after Params, before anything else.
    let session = Session {
        pair_id: params.pair_id,
        token: params.lane_token,
        lanes: params.lanes,
    };
    let joined = Joined::wait(shared, lane_source, &session)?;
    // Only what this host's operator named is opened here (the peer's configuration only
    // says how many disks and NICs the VM has).
    let local = HostResources {
        disk_paths: request.disk_paths.clone(),
        taps: request.taps.clone(),
    };
    let config = config.localize(&local).map_err(|e| e.to_string())?;
    let mut disks = Vec::new();
    for disk in config.disks.iter().flatten() {
        let path = disk.path.clone().unwrap_or_default();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("disk {}: {e}", path.display()))?;
        disks.push(file);
    }
    if params.disk_mode == FtDiskMode::Replicated {
        // The standby VM's disks take their capacity from the images when they are built,
        // before the initial sync copies the primary's: size them to the primary's first.
        if params.disk_sizes.len() != disks.len() {
            return Err(format!(
                "the primary sent the sizes of {} images for a VM with {} disks",
                params.disk_sizes.len(),
                disks.len()
            ));
        }
        for ((file, &size), disk) in disks.iter().zip(&params.disk_sizes).zip(0u32..) {
            crate::disk_sync::size_image(disk, file, size).map_err(|e| e.to_string())?;
        }
    }
    let (reply, answer) = mpsc::channel();
    shared.push(BackupEvent::Prepare {
        config: Box::new(config),
        reply,
    });
    let memory = answer
        .recv_timeout(SETUP_TIMEOUT)
        .map_err(|_| "the control loop did not prepare the standby VM".to_string())?
        .map_err(|e| format!("cannot prepare the standby VM: {e}"))?;
    Ok((params, memory, disks, joined))
}

/// The operator's fencing for this backup (`--witness` or `--fencing etcd://`), asked once
/// now so that an unreachable decider is an error at `receive-ft`, not at the first fault.
fn operator_fencing(
    request: &ReceiveFtRequest,
    security: Option<&Security>,
) -> Result<Fencing, VmmError> {
    let fencing = Fencing::from_operator(
        request.witness.as_deref(),
        request.fencing.as_deref(),
        security,
    )
    .map_err(VmmError::InvalidConfig)?;
    if request.group.is_some() && matches!(fencing, Fencing::Etcd(_)) {
        return Err(VmmError::InvalidConfig(
            "fencing on etcd does not cover FT groups yet; fence a group with the witness".into(),
        ));
    }
    fencing.check_reachable().map_err(VmmError::InvalidConfig)?;
    Ok(fencing)
}

/// Asks this side's fencing whether the backup may take over; on etcd the won key is kept
/// alive while this side runs the VM.
fn claim(shared: &Shared, pair_id: u64, epoch: u64) -> Result<(), String> {
    let hold = shared
        .fencing
        .claim(pair_id, fence::Role::Backup, epoch, None)?;
    if hold.is_some() {
        *shared.taken.lock().unwrap_or_else(|p| p.into_inner()) = hold;
    }
    Ok(())
}

/// A complete epoch of a group member, kept aside until the group has committed it.
struct CompleteEpoch {
    epoch: u64,
    group_epoch: u64,
    pending: PendingEpoch,
    released_through: u64,
}

/// The backup's copy of the VM: memory, disks and the last complete epoch's state.
struct Replica {
    memory: GuestMemoryMmap,
    /// Most bytes one epoch may buffer before its EpochEnd.
    epoch_limit: u64,
    disks: Vec<File>,
    disk_mode: FtDiskMode,
    /// A member of an FT group: complete epochs wait in `complete` until the group commits
    /// them (the primary's `released_through`) or the group picks its failover epoch.
    grouped: bool,
    complete: VecDeque<CompleteEpoch>,
    committed: Option<(u64, Box<VmSnapshotState>)>,
    committed_group: Option<u64>,
    /// Shared-disk mode: writes of epochs the primary may not have written yet.
    retained: Vec<(u64, Vec<(usize, DiskWrite)>)>,
    scratch: Vec<u8>,
    probe: Vec<u8>,
    /// The buffers of applied page frames, for the next epoch's frames to be read into.
    page_buffers: PageBuffers,
    stats: TransferStats,
    /// The input the primary's guest received in epochs not held yet.
    input: InputStore,
    /// The output of held epochs the primary may not have released.
    output: OutputStore,
    nics: usize,
    clock: PrimaryClock,
}

/// Most bytes of page-frame buffers kept between epochs (an epoch of 4000 pages).
const PAGE_BUFFERS_MAX: usize = 32 << 20;

/// Buffers of page frames already applied: the next epoch's frames are read into them, then
/// kept as they are until their EpochEnd. Without them each frame was read into the link's
/// buffer and copied out (every page byte once more on this side).
#[derive(Default)]
struct PageBuffers {
    free: Vec<Vec<u8>>,
    bytes: usize,
}

impl PageBuffers {
    /// A buffer to read the next frame into (empty when none is free).
    fn take(&mut self) -> Vec<u8> {
        let buffer = self.free.pop().unwrap_or_default();
        self.bytes -= buffer.capacity();
        buffer
    }

    fn give_back(&mut self, buffer: Vec<u8>) {
        if self.bytes + buffer.capacity() <= PAGE_BUFFERS_MAX {
            self.bytes += buffer.capacity();
            self.free.push(buffer);
        }
    }
}

/// The primary's session clock as seen from here, to move the guest clock forward at
/// failover by the time since the resumed epoch was captured: a guest whose clock stood
/// still would stamp its TCP segments older than the ones the primary's guest already sent
/// (early ACKs), and clients drop such segments (PAWS).
struct PrimaryClock {
    start: Instant,
    /// The smallest (arrival here - departure there) seen: the clocks' offset plus the
    /// fastest transfer, so times converted with it are, if anything, late.
    offset_ns: Option<i128>,
    /// When the held epoch was captured, on the primary's clock.
    held_captured_ns: Option<u64>,
}

/// Added to the estimate: the fastest transfer the offset includes, and the timestamp
/// granularity of a TCP peer (1 ms in Linux).
const CLOCK_MARGIN: Duration = Duration::from_millis(2);

impl PrimaryClock {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            offset_ns: None,
            held_captured_ns: None,
        }
    }

    fn now_ns(&self) -> i128 {
        self.start.elapsed().as_nanos() as i128
    }

    /// An EpochEnd left the primary at `sent_ns` and arrived now.
    fn observe(&mut self, sent_ns: u64) {
        let offset = self.now_ns() - sent_ns as i128;
        self.offset_ns = Some(self.offset_ns.map_or(offset, |o| o.min(offset)));
    }

    /// How far the guest clock moves at a takeover now (zero without timing from the
    /// primary).
    fn advance(&self) -> Duration {
        match (self.held_captured_ns, self.offset_ns) {
            (Some(captured), Some(offset)) => {
                let since = self.now_ns() - (captured as i128 + offset);
                Duration::from_nanos(since.clamp(0, u64::MAX as i128) as u64) + CLOCK_MARGIN
            }
            _ => Duration::ZERO,
        }
    }
}

impl Replica {
    fn apply_frame(&mut self, flags: u8, payload: &[u8]) -> Result<u64, String> {
        let frame = Frame {
            kind: FrameType::MemoryPages,
            flags,
            seq: 0,
            payload,
            crc: 0,
        };
        match Message::parse(&frame).map_err(|e| e.to_string())? {
            Message::MemoryPages(batch) => {
                apply_pages_with_input(
                    &self.memory,
                    &batch,
                    Some(&self.input),
                    &mut self.scratch,
                    &mut self.probe,
                    &mut self.stats,
                )
                .map_err(|e| e.to_string())?;
                Ok(batch.len() as u64)
            }
            _ => Err("not a page frame".into()),
        }
    }

    fn write_disks(&self, writes: &[(usize, DiskWrite)]) -> Result<(), DiskWriteFailure> {
        for (disk, w) in writes {
            let file = self.disks.get(*disk).ok_or_else(|| DiskWriteFailure {
                message: format!("write to disk {disk}, the VM has {}", self.disks.len()),
                no_space: false,
            })?;
            file.write_all_at(&w.data, w.offset)
                .map_err(|e| DiskWriteFailure::new(format!("disk {disk} at {}", w.offset), &e))?;
        }
        if !writes.is_empty() {
            for file in &self.disks {
                file.sync_data()
                    .map_err(|e| DiskWriteFailure::new("disk sync".to_string(), &e))?;
            }
        }
        Ok(())
    }

    /// Makes `pending` (epoch `epoch`, complete) the backup's copy.
    fn commit(
        &mut self,
        epoch: u64,
        pending: PendingEpoch,
        released_through: u64,
    ) -> Result<(), String> {
        let encoded = pending
            .state
            .ok_or_else(|| format!("epoch {epoch} ended without its state"))?;
        let state: VmSnapshotState =
            decode_state(&encoded).map_err(|e| format!("epoch {epoch} state: {e}"))?;
        for (flags, payload) in pending.pages {
            self.apply_frame(flags, &payload)?;
            self.page_buffers.give_back(payload);
        }
        match self.disk_mode {
            FtDiskMode::Replicated => self
                .write_disks(&pending.disk_writes)
                .map_err(|e| e.message)?,
            FtDiskMode::Shared => {
                self.retained.retain(|(e, _)| *e > released_through);
                if !pending.disk_writes.is_empty() {
                    self.retained.push((epoch, pending.disk_writes));
                }
            }
        }
        self.committed = Some((epoch, Box::new(state)));
        self.input.epoch_held(epoch);
        self.output.keep(epoch, pending.output, released_through);
        self.clock.held_captured_ns = pending.captured_ns;
        Ok(())
    }

    /// The newest epoch held completely (applied or kept aside).
    fn newest_complete(&self) -> Option<u64> {
        self.complete
            .back()
            .map(|c| c.epoch)
            .or(self.committed.as_ref().map(|(e, _)| *e))
    }

    fn newest_complete_group_epoch(&self) -> Option<u64> {
        self.complete
            .back()
            .map(|c| c.group_epoch)
            .or(self.committed_group)
    }

    /// Applies the kept-aside epochs up to local epoch `through`, or group epoch
    /// `group_through`.
    fn apply_complete(&mut self, through: u64, group_through: u64) -> Result<(), String> {
        while let Some(next) = self.complete.front() {
            if next.epoch > through && next.group_epoch > group_through {
                break;
            }
            let Some(next) = self.complete.pop_front() else {
                break;
            };
            self.commit(next.epoch, next.pending, next.released_through)?;
            self.committed_group = Some(next.group_epoch);
        }
        Ok(())
    }
}

/// The primary is gone: report to the group and resume from the epoch every member holds.
fn agree_with_group(
    shared: &Shared,
    group: &mut GroupSide,
    params: &Params,
    replica: &mut Replica,
    reason: &str,
) -> Result<(), String> {
    let latest = replica.newest_complete_group_epoch();
    let grace = params.heartbeat_timeout * 2 + Duration::from_millis(200);
    log::warn!("FT group: primary lost ({reason}); holding group epochs through {latest:?}");
    group.member.report_lost(latest, grace)?;
    let decision = group
        .decision
        .recv_timeout(group_decision_timeout(grace))
        .map_err(|_| "no decision from the group's coordinator".to_string())??;
    let Some(target) = decision else {
        return Err("the group has no epoch every member holds".into());
    };
    replica.apply_complete(0, target)?;
    replica.complete.clear();
    if replica.committed_group != Some(target) {
        return Err(format!(
            "the group resumes from group epoch {target}, this member holds {:?}",
            replica.committed_group
        ));
    }
    shared.status().group_epoch = target;
    Ok(())
}

/// The primary counts its backup dead after a heartbeat timeout of silence: while a long
/// epoch streams in (no EpochEnd to acknowledge yet), say something now and then.
struct KeepAlive {
    last_answer: Instant,
    every: Duration,
}

impl KeepAlive {
    fn answer_if_quiet(&mut self, link: &mut Link, replica: &Replica) {
        if self.last_answer.elapsed() >= self.every {
            let epoch = replica.newest_complete().unwrap_or(0);
            link.answer(&Control::Heartbeat { epoch });
            self.last_answer = Instant::now();
        }
    }
}

/// How long an input acknowledgement may wait for more of the stream already here.
const INPUT_ACK_DELAY: Duration = Duration::from_micros(200);

/// Input acknowledgements, coalesced: while more of the primary's stream is already here,
/// the answer waits (at most [`INPUT_ACK_DELAY`]) and then covers every frame read meanwhile.
/// One answer per burst instead of one per InputFrames message: each costs a TLS record and
/// a send here, a wake-up and a read on the primary.
#[derive(Default)]
struct InputAcks {
    owed_since: Option<Instant>,
}

impl InputAcks {
    fn owe(&mut self) {
        self.owed_since.get_or_insert_with(Instant::now);
    }

    fn answer_unless_more_is_here(&mut self, link: &mut Link, input: &mut InputStore) {
        let Some(since) = self.owed_since else {
            return;
        };
        if since.elapsed() < INPUT_ACK_DELAY && link.stream.readable_now() {
            return;
        }
        self.answer_now(link, input);
    }

    /// Answers what is owed without waiting for more: before work that keeps this thread
    /// from reading (an epoch's commit), during which the guest's ACKs would wait.
    fn answer_now(&mut self, link: &mut Link, input: &mut InputStore) {
        if self.owed_since.take().is_none() {
            return;
        }
        if let Some(seq) = input.ack_due() {
            link.answer(&Control::InputAck { seq });
        }
    }
}

/// A checked MemoryPages frame: written at once during the initial synchronisation, kept for
/// its EpochEnd afterwards.
fn receive_pages(
    replica: &mut Replica,
    pending: &mut PendingEpoch,
    initial: bool,
    flags: u8,
    payload: Cow<'_, [u8]>,
) -> Result<(), String> {
    let frame = Frame {
        kind: FrameType::MemoryPages,
        flags,
        seq: 0,
        payload: &payload,
        crc: 0,
    };
    let Message::MemoryPages(batch) = Message::parse(&frame).map_err(|e| e.to_string())? else {
        return Err("a page frame that is not one".into());
    };
    pending.pass_pages += batch.len() as u64;
    if initial {
        return apply_pages(
            &replica.memory,
            &batch,
            &mut replica.scratch,
            &mut replica.probe,
            &mut replica.stats,
        )
        .map_err(|e| e.to_string());
    }
    // Checked now, applied at EpochEnd.
    pending.account(payload.len(), replica.epoch_limit)?;
    pending.pages.push((flags, payload.into_owned()));
    Ok(())
}

fn receive_epochs(
    shared: &Shared,
    (link, lanes): (&mut Link, &LaneSet),
    replica: &mut Replica,
    heartbeat_timeout: Duration,
) -> Result<Ending, String> {
    // The initial synchronisation is written straight into memory: there is no earlier
    // epoch to keep intact.
    let mut initial = true;
    // Replicated disks: the images arrive whole during the initial synchronisation and are
    // written at once (there is no earlier copy to keep intact), then checked by digest.
    let mut images = match replica.disk_mode {
        FtDiskMode::Replicated => {
            let files: Result<Vec<File>, _> = replica.disks.iter().map(File::try_clone).collect();
            Some(ReplicaSet::new(
                files.map_err(|e| format!("disk images: {e}"))?,
            ))
        }
        FtDiskMode::Shared => None,
    };
    let mut pending = PendingEpoch::default();
    let mut received = 0u64;
    let mut quiet = KeepAlive {
        last_answer: Instant::now(),
        every: heartbeat_timeout / 4,
    };
    let mut input_acks = InputAcks::default();
    loop {
        if !initial {
            quiet.answer_if_quiet(link, replica);
            input_acks.answer_unless_more_is_here(link, &mut replica.input);
        }
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(Ending::StandDown {
                guest_shutdown: false,
                reprotect: false,
            });
        }
        let frame = match link.reader.read_frame(&mut link.stream) {
            Ok(frame) => frame,
            Err(e) if primary_gone(&e) => {
                let reason = match &e {
                    ProtocolError::Io(io)
                        if matches!(
                            io.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        "no heartbeat from the primary within the timeout".to_string()
                    }
                    other => other.to_string(),
                };
                return Ok(Ending::PrimaryLost(reason));
            }
            Err(e) => return Err(e.to_string()),
        };
        let (kind, flags) = (frame.kind, frame.flags);
        received += (HEADER_LEN + frame.payload.len() + TRAILER_LEN) as u64;
        if kind == FrameType::MemoryPages {
            if initial {
                let payload = Cow::Borrowed(frame.payload);
                receive_pages(replica, &mut pending, initial, flags, payload)?;
            } else {
                // Kept until the epoch's end: the read buffer itself is kept, not a copy.
                let len = frame.payload.len();
                let spare = replica.page_buffers.take();
                let payload = Cow::Owned(link.reader.take_payload(len, spare));
                receive_pages(replica, &mut pending, initial, flags, payload)?;
            }
            continue;
        }
        match Message::parse(&frame).map_err(|e| e.to_string())? {
            Message::MemoryDone {
                pages,
                lanes: passes,
                ..
            } => {
                // A pass the primary sent on this connection alone names no data streams.
                if !passes.is_empty() && passes.len() != lanes.len() {
                    return Err(format!(
                        "a memory pass on {} data streams, the session has {}",
                        passes.len(),
                        lanes.len()
                    ));
                }
                for (lane, pass) in passes.iter().enumerate() {
                    let mut digest = LaneDigest::default();
                    for _ in 0..pass.frames {
                        if !initial {
                            quiet.answer_if_quiet(link, replica);
                        }
                        let frame = match lanes.take(lane, heartbeat_timeout) {
                            Ok(frame) => frame,
                            Err(failure) if failure.gone => {
                                return Ok(Ending::PrimaryLost(failure.reason))
                            }
                            Err(failure) => return Err(failure.reason),
                        };
                        received += (HEADER_LEN + frame.payload.len() + TRAILER_LEN) as u64;
                        digest.add(frame.crc);
                        let payload = Cow::Owned(frame.payload);
                        receive_pages(replica, &mut pending, initial, frame.flags, payload)?;
                    }
                    // Frames of another pass (a damaged or replayed stream) do not match.
                    if digest.finish() != *pass {
                        return Err(format!(
                            "data stream {} carried other page frames than the pass it ended",
                            lane + 1
                        ));
                    }
                }
                if pages != pending.pass_pages {
                    return Err(format!(
                        "memory pass of {pages} pages, {} arrived",
                        pending.pass_pages
                    ));
                }
                pending.pass_pages = 0;
            }
            Message::DiskWrites { payload } if initial && images.is_some() => {
                if let Some(images) = images.as_mut() {
                    images
                        .apply_disk_writes(payload)
                        .map_err(|e| e.to_string())?;
                }
            }
            Message::DiskWrites { payload } => {
                pending.account(payload.len(), replica.epoch_limit)?;
                let (disk, writes) = decode_disk_writes(payload).map_err(|e| e.to_string())?;
                let disk = disk as usize;
                if disk >= replica.disks.len() {
                    return Err(format!(
                        "writes for disk {disk}, the VM has {}",
                        replica.disks.len()
                    ));
                }
                pending
                    .disk_writes
                    .extend(writes.into_iter().map(|w| (disk, w)));
            }
            Message::OutputFrames { payload } => {
                pending.account(payload.len(), replica.epoch_limit)?;
                let frames = decode_output_frames(payload).map_err(|e| e.to_string())?;
                pending.output.receive(frames, replica.nics)?;
            }
            Message::State { state, compressed } => {
                let state = Message::state_bytes(state, compressed).map_err(|e| e.to_string())?;
                pending.account(state.len(), replica.epoch_limit)?;
                pending.state = Some(state.into_owned());
            }
            Message::Control { payload } => {
                let control = Control::decode(payload).map_err(|e| e.to_string())?;
                if let (true, Some(images)) = (initial, images.as_mut()) {
                    if images.apply_control(&control).map_err(|e| e.to_string())? {
                        continue;
                    }
                }
                match control {
                    Control::EpochEnd {
                        epoch,
                        released_through,
                        group_epoch,
                        clock,
                    } => {
                        if let Some(clock) = clock {
                            replica.clock.observe(clock.sent_ns);
                            pending.captured_ns = Some(clock.captured_ns);
                        }
                        if initial {
                            if let Some(images) = images.take() {
                                // A copy that does not match refuses protection.
                                images.verify_all().map_err(|e| e.to_string())?;
                            }
                        }
                        if pending.pass_pages != 0 {
                            return Err(format!("epoch {epoch} ended inside a memory pass"));
                        }
                        pending.output.check_epoch(epoch)?;
                        if let Some(last) = replica.newest_complete() {
                            if epoch <= last {
                                return Err(format!("epoch {epoch} after epoch {last}"));
                            }
                        }
                        input_acks.answer_now(link, &mut replica.input);
                        let done = std::mem::take(&mut pending);
                        match group_epoch {
                            Some(group_epoch) if replica.grouped => {
                                replica.complete.push_back(CompleteEpoch {
                                    epoch,
                                    group_epoch,
                                    pending: done,
                                    released_through,
                                });
                                replica.apply_complete(released_through, 0)?;
                                link.answer(&Control::Ack { epoch });
                            }
                            _ if initial => {
                                replica.commit(epoch, done, released_through)?;
                                // Heartbeats start with protection; the initial copy may
                                // pause longer between frames (first touch of every page).
                                link.stream
                                    .set_read_timeout(Some(heartbeat_timeout))
                                    .map_err(|e| e.to_string())?;
                                initial = false;
                                link.answer(&Control::Ack { epoch });
                            }
                            _ => {
                                // Acknowledged before it is applied, so that the primary's
                                // output waits for the stream, not for this copy: every frame
                                // was checked on arrival, nothing can resume meanwhile (this
                                // thread applies it before it reads on), and an epoch that
                                // fails to apply ends this backup (`Failed`, never a
                                // takeover), as its death would.
                                link.answer(&Control::Ack { epoch });
                                replica.commit(epoch, done, released_through)?;
                            }
                        }
                        if let Some(seq) = replica.input.ack_due() {
                            link.answer(&Control::InputAck { seq });
                        }
                        quiet.last_answer = Instant::now();
                        let mut status = shared.status();
                        status.health = FtHealth::Protected;
                        status.epoch = epoch;
                        status.last_committed_epoch = epoch;
                        if let Some(group_epoch) = replica.newest_complete_group_epoch() {
                            status.group_epoch = group_epoch;
                        }
                        status.bytes = received;
                        status.dirty_pages = replica.stats.pages;
                    }
                    Control::Heartbeat { epoch } => {
                        link.answer(&Control::Heartbeat { epoch });
                        quiet.last_answer = Instant::now();
                    }
                    Control::StandDown {
                        guest_shutdown,
                        reason,
                        reprotect,
                    } => {
                        log::info!("FT: the primary ended protection: {reason}");
                        // Told before this side lets go: the primary releases its held
                        // output only once it knows no takeover can follow.
                        link.answer(&Control::StoodDown);
                        return Ok(Ending::StandDown {
                            guest_shutdown,
                            reprotect,
                        });
                    }
                    other => return Err(format!("unexpected {other:?} from the primary")),
                }
            }
            Message::InputFrames { payload } => {
                if initial {
                    return Err("input frames during the initial synchronisation".into());
                }
                let frames = decode_input_frames(payload, replica.input.pool())
                    .map_err(|e| e.to_string())?;
                replica.input.receive(frames)?;
                input_acks.owe();
            }
            Message::Abort { message } => {
                return Err(format!("the primary aborted: {message}"));
            }
            _ => return Err(format!("unexpected {kind} frame from the primary")),
        }
    }
}

/// How long a backup that won the witness waits for the old primary to let go of the
/// shared disk images.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Exclusive `flock`s on the shared images (the lock the block device takes), held while the
/// retained writes are re-issued.
struct SharedDiskLocks<'a>(&'a [File]);

impl<'a> SharedDiskLocks<'a> {
    fn acquire(files: &'a [File], wait: Duration) -> Result<Self, String> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + wait;
        for file in files {
            loop {
                // SAFETY: flock on a descriptor we own; it touches no memory.
                let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                if ret == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the shared disk is still locked by another process after {wait:?}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(Self(files))
    }
}

impl Drop for SharedDiskLocks<'_> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        for file in self.0 {
            // SAFETY: flock on a descriptor we own; it touches no memory.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

/// A write to an image that failed.
#[derive(Debug)]
struct DiskWriteFailure {
    message: String,
    /// The storage is full (ENOSPC, EDQUOT): it may take the write once space is freed.
    no_space: bool,
}

impl DiskWriteFailure {
    fn new(what: String, e: &std::io::Error) -> Self {
        Self {
            message: format!("{what}: {e}"),
            no_space: matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)),
        }
    }
}

/// How often a takeover that waits for space on the shared disk retries.
const REISSUE_RETRY: Duration = Duration::from_millis(200);
/// How often it says so in the log meanwhile.
const REISSUE_REPORT: Duration = Duration::from_secs(10);

/// Re-issues the writes the old primary may not have written. A full storage is waited for
/// (the writes are the only copy of what the guest saw complete; giving up would lose them):
/// the takeover completes once space is freed, and `ft-status` says why it waits. Any other
/// error fails the takeover.
fn reissue(
    shared: &Shared,
    replica: &Replica,
    writes: &[(usize, DiskWrite)],
) -> Result<(), String> {
    let mut reported: Option<Instant> = None;
    loop {
        match replica.write_disks(writes) {
            Ok(()) => {
                if reported.is_some() {
                    log::warn!("FT: the held shared-disk writes reached the image");
                    shared.status().last_error = None;
                }
                return Ok(());
            }
            Err(e) if e.no_space && !shared.stop.load(Ordering::SeqCst) => {
                if reported.is_none_or(|t| t.elapsed() >= REISSUE_REPORT) {
                    log::error!(
                        "FT: re-issuing {} held writes: {}; the storage is full, retrying until space is freed",
                        writes.len(),
                        e.message
                    );
                    reported = Some(Instant::now());
                }
                shared.status().last_error = Some(format!(
                    "the takeover waits for space on the shared disk (retrying): {}",
                    e.message
                ));
                std::thread::sleep(REISSUE_RETRY);
            }
            Err(e) => return Err(e.message),
        }
    }
}

/// The primary is gone: ask the witness, re-issue shared-disk writes, and hand the last
/// complete epoch to the control loop.
fn take_over(
    shared: &Shared,
    params: &Params,
    replica: &mut Replica,
    reason: &str,
) -> Result<BackupEvent, String> {
    let Some((epoch, state)) = replica.committed.take() else {
        return Err(format!(
            "the primary was lost during the initial synchronisation ({reason}); nothing to take over"
        ));
    };
    log::warn!("FT: primary lost ({reason}); taking over at epoch {epoch}");
    claim(shared, params.pair_id, epoch)
        .map_err(|fenced| format!("primary lost ({reason}) but not taking over: {fenced}"))?;
    if params.disk_mode == FtDiskMode::Shared {
        // A fenced primary that is still alive lets go of the shared images only once the
        // witness has told it so; its lock is the second fence.
        let locks = SharedDiskLocks::acquire(&replica.disks, LOCK_WAIT)?;
        let retained = std::mem::take(&mut replica.retained);
        let writes: Vec<(usize, DiskWrite)> = retained.into_iter().flat_map(|(_, w)| w).collect();
        log::info!("FT: re-issuing {} shared-disk writes", writes.len());
        reissue(shared, replica, &writes)?;
        // Released just before the restored VM takes the locks for good.
        drop(locks);
    }
    shared.status().last_error = Some(reason.to_string());
    let replay = replica.input.replay();
    let resend = replica.output.take();
    let clock_advance = replica.clock.advance();
    {
        let mut status = shared.status();
        status.input_frames_replayed = replay.len() as u64;
        status.output_frames_resent = resend.len() as u64;
    }
    log::info!(
        "FT: {} held output frames to send again, {} input frames to deliver again, guest clock {clock_advance:?} forward",
        resend.len(),
        replay.len()
    );
    Ok(BackupEvent::TakeOver {
        state,
        epoch,
        resend,
        replay,
        clock_advance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A primary that streams an epoch without end (frames, no EpochEnd) is cut off at the
    /// bound instead of growing this host's memory (twice the guest's RAM plus disk writes and
    /// state per epoch).
    #[test]
    fn an_epoch_is_bounded_by_guest_ram_disk_writes_and_state() {
        let memory = vmm::memory::create(32 << 20).unwrap();
        let limit = epoch_limit(&memory);
        assert!(
            limit > 64 << 20 && limit < (64 << 20) + (512 << 20),
            "{limit}"
        );
        let mut pending = PendingEpoch::default();
        let frame = 16 << 20;
        let mut sent = 0u64;
        let err = loop {
            match pending.account(frame, limit) {
                Ok(()) => sent += frame as u64,
                Err(e) => break e,
            }
            assert!(
                sent <= limit,
                "accepted {sent} bytes past the limit {limit}"
            );
        };
        assert!(err.contains("more than"), "{err}");
        // Nothing overflows, whatever a peer claims.
        let mut pending = PendingEpoch {
            bytes: u64::MAX - 1,
            ..PendingEpoch::default()
        };
        assert!(pending.account(usize::MAX, limit).is_err());
    }

    /// Buffers of applied frames come back for the next frames, up to a bound.
    #[test]
    fn page_buffers_are_reused_up_to_their_bound() {
        let mut buffers = PageBuffers::default();
        assert_eq!(buffers.take().capacity(), 0, "none free yet");
        buffers.give_back(Vec::with_capacity(PAGE_BUFFERS_MAX / 2));
        buffers.give_back(Vec::with_capacity(PAGE_BUFFERS_MAX / 2));
        buffers.give_back(Vec::with_capacity(1));
        assert_eq!(buffers.free.len(), 2, "beyond the bound a buffer is let go");
        assert!(buffers.take().capacity() >= PAGE_BUFFERS_MAX / 2);
        assert_eq!(buffers.bytes, PAGE_BUFFERS_MAX / 2);
        buffers.give_back(Vec::with_capacity(4096));
        assert_eq!(buffers.free.len(), 2);
    }

    /// Input acknowledgements wait while more of the stream is already here (at most
    /// INPUT_ACK_DELAY), then one covers every frame read meanwhile; with nothing more here
    /// the answer leaves at once.
    #[test]
    fn an_input_ack_waits_for_the_stream_already_here_then_covers_it() {
        use devices::gate::LoggedFrame;
        use std::io::Write;
        use std::os::unix::net::UnixStream;

        let (ours, mut primary) = UnixStream::pair().unwrap();
        let mut link = Link {
            stream: FtStream::Unix(ours),
            reader: FrameReader::new(),
            seq: 0,
            stats: TransferStats::default(),
            broken: false,
        };
        let mut input = InputStore::new(1, 1 << 20);
        let frame = |seq| LoggedFrame {
            seq,
            epoch: 1,
            nic: 0,
            data: vec![7; 64],
            placed: Vec::new(),
        };
        let mut acks = InputAcks::default();
        let mut answers = FrameReader::new();
        let mut answered = |primary: &mut UnixStream| -> Vec<u64> {
            primary.set_nonblocking(true).unwrap();
            let mut seqs = Vec::new();
            while let Ok(frame) = answers.read_frame(primary) {
                match Control::decode(frame.payload).unwrap() {
                    Control::InputAck { seq } => seqs.push(seq),
                    other => panic!("{other:?}"),
                }
            }
            primary.set_nonblocking(false).unwrap();
            seqs
        };

        // Nothing more here: the answer leaves at once.
        input.receive(vec![frame(1)]).unwrap();
        acks.owe();
        acks.answer_unless_more_is_here(&mut link, &mut input);
        assert_eq!(answered(&mut primary), vec![1]);

        // More of the stream is here: the answer waits for it.
        input.receive(vec![frame(2)]).unwrap();
        acks.owe();
        primary.write_all(b"next frame").unwrap();
        acks.answer_unless_more_is_here(&mut link, &mut input);
        assert_eq!(answered(&mut primary), Vec::<u64>::new());
        input.receive(vec![frame(3)]).unwrap();
        acks.owe();
        acks.answer_unless_more_is_here(&mut link, &mut input);
        assert_eq!(answered(&mut primary), Vec::<u64>::new());
        // ... but not longer than INPUT_ACK_DELAY, and then covers both frames.
        std::thread::sleep(INPUT_ACK_DELAY);
        acks.answer_unless_more_is_here(&mut link, &mut input);
        assert_eq!(answered(&mut primary), vec![3]);
        // Nothing owed: nothing said.
        acks.answer_unless_more_is_here(&mut link, &mut input);
        assert_eq!(answered(&mut primary), Vec::<u64>::new());

        // Before a commit the answer leaves at once, more of the stream here or not.
        input.receive(vec![frame(4)]).unwrap();
        acks.owe();
        primary.write_all(b"more").unwrap();
        acks.answer_now(&mut link, &mut input);
        assert_eq!(answered(&mut primary), vec![4]);
        acks.answer_now(&mut link, &mut input);
        assert_eq!(answered(&mut primary), Vec::<u64>::new());
    }
}
