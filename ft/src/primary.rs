//! The primary's side: initial synchronisation, epochs (pause, capture into staging, resume),
//! the sender thread that ships epochs while the next one runs, and the acknowledgement
//! thread that commits each acknowledged epoch's held output.
//!
//! Threads and who owns what:
//! - control loop (this module's [`Primary`]): pauses and resumes the VM, copies the epoch's
//!   dirty pages into the staging memory, captures device and vCPU state, starts the next
//!   epoch in every output gate;
//! - `ft-sender`: mirrors the frames the NICs delivered to the guest as they arrive (input
//!   log), encodes the staged epoch (zero pages elided, deltas against the backup's copy of
//!   each page, LZ4) and writes it, or a heartbeat when nothing was sent for an epoch's length;
//! - `ft-acks`: reads the backup's answers; an `Ack{E}` commits E in every gate (held frames
//!   and shared-disk writes leave, in order); an `InputAck{seq}` lets the guest's pure TCP
//!   ACKs that cover no input beyond `seq` leave early. A silent or broken link wakes the
//!   control loop.
//!
//! One staging memory is enough for the pipeline: epoch E is sent from it while E+1 runs; if
//! E is still being sent when E+1 ends, E+1 simply runs on until the sender is free.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::gate::{EpochError, FirstHeld, GateMode, InputLog, LoggedFrame, RecordedWrite};
use vmm::config::VmConfig;
use vmm::control::{EnableFtRequest, FtDiskMode, FtHealth, FtRole, FtStatus, VmmError};
use vmm::device_manager::FtGates;
use vmm::fault_tolerance::{PrimaryEvent, PrimaryFt, ReplicableVm, StopReason};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::live;
use vmm::migration::memory::DirtyPages;
use vmm::migration::protocol::{
    encode_frame, DeltaBase, FrameReader, FrameSink, FrameType, Message, ProtocolError, Sender,
    SenderOptions,
};
use vmm::migration::{InputPieces, Lane};
use vmm::progress::TransferProgress;
use vmm::vm::{Vm, VmSnapshotState};
use vmm_sys_util::eventfd::EventFd;

use crate::disk_sync::DiskSync;
use crate::etcd_fence::LeaseHold;
use crate::fault::{crash_point, Phase};
use crate::fence;
use crate::fence::Fencing;
use crate::group::{GroupTiming, PrimaryMember, PrimaryMsg};
use crate::link::{channel_security, FtStream};
use crate::stats::{DurationStats, GuestPauses};
use crate::wire::{
    encode_disk_writes, encode_input_frames, input_batch_parts, input_batches, Control, EpochClock,
    MAX_INPUT_LEN,
};
use transport::Security;

mod early_staging;
mod group_member;
mod hot_pages;
mod kept_input;
pub mod staging;
use early_staging::EarlyStaging;
use group_member::{GroupEnd, GroupLink, GroupOrder};
use hot_pages::HotPages;
use kept_input::KeptInput;
use staging::StagingCopier;

/// Longest and shortest epochs `vm.enable-ft` accepts.
pub const MAX_EPOCH_MS: u64 = 1000;
/// The shortest epoch bounded-latency execution cuts an epoch down to.
const MIN_CUT_EPOCH: Duration = Duration::from_millis(1);
/// How long a StandDown may wait behind an epoch still queued for the sender.
const STAND_DOWN_QUEUE_WAIT: Duration = Duration::from_millis(500);
/// The shortest wait the epoch timer is armed with (zero would disarm it).
const MIN_TIMER: Duration = Duration::from_micros(100);
/// How long held output (shared-disk writes) may keep failing to reach the image before this
/// primary gives the VM to its backup (this host's path to the storage is broken). Meanwhile
/// the backup keeps the writes and the guest runs on (its new writes wait behind the failed
/// ones, up to the gate's hold limits). A full storage (ENOSPC, EDQUOT) is retried without end
/// instead: the backup writes to the same storage.
pub const COMMIT_FAILURE_GRACE: Duration = Duration::from_secs(5);
/// How often an unprotected primary on etcd checks its lease (well under the lease's safety
/// margin, a tenth of its TTL).
const LEASE_WATCH: Duration = Duration::from_millis(50);
/// How long a member whose group link broke waits for the coordinator's order saying why.
const GROUP_ORDER_GRACE: Duration = Duration::from_millis(200);
/// How often writes held when protection ended, which could not reach the image then, are
/// retried without waiting for the guest's next write.
const STRANDED_RETRY: Duration = Duration::from_millis(500);
/// Pages per MemoryPages frame of a protected epoch (see `start_threads`).
const EPOCH_FRAME_PAGES: usize = 64;
/// The most encoder threads an operator may ask for.
pub const MAX_ENCODE_THREADS: u32 = 16;
/// Most TCP connections one session opens to its backup (`streams`).
pub const MAX_STREAMS: u32 = 8;
/// The most encoder threads the default gives: beyond a few, one TCP stream is the limit.
const DEFAULT_MAX_ENCODE_THREADS: usize = 4;
/// How often a commit that keeps failing is logged (it is retried at every epoch).
const COMMIT_FAILURE_REPORT: Duration = Duration::from_secs(10);
/// How long the initial synchronisation may wait for the backup's answer to epoch 0.
const SYNC_ACK_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The heartbeat timeout when the request gives none: five epochs, at least 100 ms (a
/// loaded host can stall a process for tens of milliseconds; a false failover costs a
/// witness round trip and the backup, a missed one only detection time). A killed process
/// is detected at once anyway: its connection closes.
/// Encoder threads beside the sender when the operator does not say: the cores left once
/// each vCPU and the sender have one, at most [`DEFAULT_MAX_ENCODE_THREADS`]. A pool that
/// competes with the guest's vCPUs for cores slows the guest more than it speeds the epoch.
pub fn default_encode_threads(vcpus: u8) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores
        .saturating_sub(usize::from(vcpus) + 1)
        .min(DEFAULT_MAX_ENCODE_THREADS)
}

pub fn default_heartbeat_timeout(epoch: Duration) -> Duration {
    (epoch * 5).max(Duration::from_millis(100))
}

/// `HOST:PORT` or `tcp:HOST:PORT`.
pub fn parse_peer(peer: &str) -> Result<String, VmmError> {
    let addr = peer.strip_prefix("tcp:").unwrap_or(peer);
    let valid = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if valid {
        Ok(addr.to_string())
    } else {
        Err(VmmError::InvalidConfig(format!(
            "peer \"{peer}\" is not HOST:PORT"
        )))
    }
}

/// Checks a request before anything is connected.
pub fn validate(request: &EnableFtRequest) -> Result<(String, Duration, Duration), VmmError> {
    let peer = parse_peer(&request.peer)?;
    if let Some(n) = request.encode_threads.filter(|&n| n > MAX_ENCODE_THREADS) {
        return Err(VmmError::InvalidConfig(format!(
            "encode_threads {n} is outside 0..={MAX_ENCODE_THREADS}"
        )));
    }
    if let Some(n) = request.streams.filter(|&n| n == 0 || n > MAX_STREAMS) {
        return Err(VmmError::InvalidConfig(format!(
            "streams {n} is outside 1..={MAX_STREAMS}"
        )));
    }
    if let (Some(streams @ 2..), Some(threads @ 1..)) = (request.streams, request.encode_threads) {
        return Err(VmmError::InvalidConfig(format!(
            "streams {streams} and encode_threads {threads}: each of several streams has an \
             encoder thread of its own; ask for one or the other"
        )));
    }
    if request.epoch_ms == 0 || request.epoch_ms > MAX_EPOCH_MS {
        return Err(VmmError::InvalidConfig(format!(
            "epoch_ms {} is outside 1..={MAX_EPOCH_MS}",
            request.epoch_ms
        )));
    }
    let epoch = Duration::from_millis(request.epoch_ms);
    let timeout = match request.heartbeat_timeout_ms {
        Some(0) => {
            return Err(VmmError::InvalidConfig(
                "heartbeat_timeout_ms must be at least 1".into(),
            ))
        }
        Some(ms) if ms < request.epoch_ms => {
            return Err(VmmError::InvalidConfig(format!(
                "heartbeat_timeout_ms {ms} is shorter than one epoch ({} ms)",
                request.epoch_ms
            )))
        }
        Some(ms) => Duration::from_millis(ms),
        None => default_heartbeat_timeout(epoch),
    };
    if let Some(witness) = &request.witness {
        parse_peer(witness).map_err(|_| {
            VmmError::InvalidConfig(format!("witness \"{witness}\" is not HOST:PORT"))
        })?;
    }
    Ok((peer, epoch, timeout))
}

/// Who ends an epoch.
#[derive(Debug, PartialEq, Eq)]
enum Cut {
    /// This VM's own epoch timer.
    Own,
    /// The FT group's coordinator; with `barrier`, every member stays paused until all have
    /// paused.
    Group { epoch: u64, barrier: bool },
}

/// An epoch captured by the control loop, for the sender thread.
struct EpochJob {
    epoch: u64,
    /// When it was captured, on the session clock (see `Shared::session_start`).
    captured_ns: u64,
    /// The group epoch it ends (FT groups only).
    group_epoch: Option<u64>,
    /// The pages its pause sends (those sent while the guest ran are not repeated).
    dirty: DirtyPages,
    /// The pages the guest dirtied in it, both passes.
    pages: u64,
    state: Box<VmSnapshotState>,
    disk_writes: Vec<Vec<RecordedWrite>>,
    /// How long the guest ran in it (zero when not known: group epochs).
    ran: Duration,
}

enum Job {
    Epoch(EpochJob),
    /// The pages early staging copied into the staging memory while epoch `epoch` still runs
    /// (its first memory pass).
    EarlyPages {
        epoch: u64,
        pages: DirtyPages,
    },
    /// Frames wait in the input log.
    Input,
    StandDown {
        guest_shutdown: bool,
        reprotect: bool,
        reason: String,
    },
}

/// Wakes the sender for input the NICs recorded. The log asks each time its queue fills after
/// being emptied, and the page frames of an epoch empty it too, so many asks can come while
/// the sender sends one epoch: at most one `Job::Input` waits in the channel, which has room
/// for one epoch, one StandDown and one wake-up (an epoch that finds it full counts as a dead
/// sender). Only the log holds it: its job sender must go with the log's notify for the
/// channel to close and the sender thread to end (see `close`); the sender thread holds the
/// flag alone ([`InputTaken`]).
struct InputWake {
    jobs: SyncSender<Job>,
    queued: Arc<AtomicBool>,
}

impl InputWake {
    fn notify(&self) {
        if !self.queued.swap(true, Ordering::SeqCst) && self.jobs.try_send(Job::Input).is_err() {
            self.queued.store(false, Ordering::SeqCst);
        }
    }
}

/// The sender thread's side of [`InputWake`].
struct InputTaken(Arc<AtomicBool>);

impl InputTaken {
    /// The sender took the wake-up; called before it takes the log's queue, so a frame
    /// recorded after the take asks again.
    fn taken(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Epochs whose end went out and that are not committed yet, at most (older ones are not
/// timed: a backup that stops answering ends the session within a heartbeat timeout anyway).
const TIMED_IN_FLIGHT: usize = 4096;

/// How long the recent epochs took to leave: the sender's time per epoch, and each epoch's
/// output commit delay, from its checkpoint (the capture in the pause) to the backup's Ack
/// committing it: how long output the guest sent at the very end of the epoch stayed held.
/// Also, per input frame, how long it waited for the backup to hold it: what the guest's
/// early ACK of it waited.
#[derive(Default)]
struct EpochTimings {
    /// Epochs whose end was sent and not yet committed: (epoch, captured_ns).
    in_flight: VecDeque<(u64, u64)>,
    send: DurationStats,
    commit: DurationStats,
    input_mirror: DurationStats,
}

impl EpochTimings {
    fn ended(&mut self, epoch: u64, captured_ns: u64) {
        if self.in_flight.len() >= TIMED_IN_FLIGHT {
            self.in_flight.pop_front();
        }
        self.in_flight.push_back((epoch, captured_ns));
    }

    /// Epoch `epoch` (and every older one) committed at `now_ns` (the session clock).
    fn committed(&mut self, epoch: u64, now_ns: u64) {
        while let Some(&(e, captured_ns)) = self.in_flight.front() {
            if e > epoch {
                break;
            }
            self.in_flight.pop_front();
            if e == epoch {
                let delay = now_ns.saturating_sub(captured_ns);
                self.commit.record(Duration::from_nanos(delay));
            }
        }
    }
}

/// Held output that keeps failing to leave.
struct CommitFailure {
    since: Instant,
    /// When it was last logged.
    reported: Instant,
    error: String,
    /// The storage is full: failing over would not help (the backup writes to the same
    /// storage), so the primary retries until space is freed.
    no_space: bool,
}

/// What the replication threads and the control loop share.
struct Shared {
    gates: FtGates,
    /// The clock of the times sent with each EpochEnd (the backup moves the guest clock
    /// forward by the time since the capture at failover).
    session_start: Instant,
    wake: Arc<EventFd>,
    /// The sender still reads the staging memory.
    staging_busy: AtomicBool,
    last_acked: AtomicU64,
    /// The epoch the sender is on (for heartbeats).
    last_sent: AtomicU64,
    /// The newest epoch whose EpochEnd went out (set just before it is written): the backup
    /// may acknowledge nothing newer.
    last_ended: AtomicU64,
    /// Held output that keeps failing to leave (a shared image refusing writes): since when,
    /// and why. `last_acked` (the backup's `released_through`) stays behind meanwhile.
    commit_failure: Mutex<Option<CommitFailure>>,
    bytes: AtomicU64,
    /// How long the last epoch took to send, in microseconds.
    last_send_us: AtomicU64,
    /// How long the guest ran in that epoch, in microseconds (0: not known).
    last_ran_us: AtomicU64,
    lost: Mutex<Option<String>>,
    stopping: AtomicBool,
    /// A StandDown was queued for the backup.
    standing_down: AtomicBool,
    /// The backup answered the StandDown: it dropped its copy and cannot take over.
    stood_down: AtomicBool,
    /// The first protected epoch (fault-injection points count from it).
    first_epoch: u64,
    /// The newest input frame sent to the backup.
    input_sent: AtomicU64,
    /// Input frames sent to the backup.
    input_frames_sent: AtomicU64,
    /// Input frames sent, until the pages of their epoch are.
    kept_input: Mutex<KeptInput>,
    /// Dirty pages sent as input frames laid over the backup's copy.
    pages_from_input: AtomicU64,
    /// Held output frames copied to the backup with their epoch.
    output_frames_sent: AtomicU64,
    /// Whether ended epochs' held output is copied to the backup (`resend_output`).
    resend_output: bool,
    /// The running epoch holds output (set by the NIC gates, cleared at each checkpoint).
    output_waiting: AtomicBool,
    /// Threads encoding epochs beside the sender.
    encode_threads: AtomicU64,
    /// TCP connections to the backup: the first and the data streams.
    streams: AtomicU64,

    /// Latency mode shortened the running epoch (see `next_checkpoint`).
    cut_for_output: AtomicBool,
    /// How long the recent epochs took to send and to commit.
    timings: Mutex<EpochTimings>,
    /// Fencing on etcd: this primary's hold on the pair's key. Output leaves only while it
    /// is provably alive.
    lease: Option<LeaseHold>,
    group: Option<GroupLink>,
}

impl Shared {
    /// On etcd: the lease of the pair is no longer provably this primary's.
    fn lease_lapsed(&self) -> bool {
        self.lease.as_ref().is_some_and(|lease| !lease.is_alive())
    }
}

impl Shared {
    fn timings(&self) -> std::sync::MutexGuard<'_, EpochTimings> {
        self.timings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kept_input(&self) -> std::sync::MutexGuard<'_, KeptInput> {
        self.kept_input.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link to the backup failed: record why (first reason wins) and wake the loop.
    fn lose(&self, reason: String) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        if lost.is_none() {
            log::warn!("FT: backup lost: {reason}");
            *lost = Some(reason);
            let _ = self.wake.write(1);
        }
    }
}

pub struct Primary {
    shared: Arc<Shared>,
    jobs: Option<SyncSender<Job>>,
    sender: Option<JoinHandle<()>>,
    acks: Option<JoinHandle<()>>,
    /// Group members: the coordinator's Resume for each cut.
    resumes: Option<Receiver<u64>>,
    stream: FtStream,
    /// The data streams (closed with `stream`).
    lanes: Vec<FtStream>,
    staging: GuestMemoryMmap,
    /// Pages kept writable and compared at each pause instead of write-protected.
    hot: HotPages,
    early: EarlyStaging,
    /// Copies each epoch's pages into `staging` in the pause.
    stager: StagingCopier,
    peer: String,
    pair_id: u64,
    fencing: Fencing,
    disk_mode: FtDiskMode,
    epoch_len: Duration,
    next_len: Duration,
    heartbeat_timeout: Duration,
    /// The epoch now running.
    epoch: u64,
    /// End an epoch early while output waits (see `EnableFtRequest::latency_mode`).
    latency_mode: bool,
    /// Send early-staged pages while the guest runs (see `EnableFtRequest::early_send`).
    early_send: bool,
    pauses: GuestPauses,
    /// When the running epoch's checkpoint started (its length counts from there).
    epoch_started: Instant,
    /// The epoch is over but the sender still ships the previous one: check again shortly.
    waiting_for_sender: bool,
    dirty_pages: u64,
    epochs_cut_early: u64,
    /// Latency mode: epochs ended early because output waited.
    epochs_cut_for_output: u64,
    health: FtHealth,
    last_error: Option<String>,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> VmmError {
    VmmError::Failed {
        action: "enable-ft",
        message: format!("{what}: {e}"),
    }
}

/// The request's channel security (see [`channel_security`]); a witness or etcd is reached
/// over TCP even from an in-process link.
fn security(request: &EnableFtRequest, in_process: bool) -> Result<Option<Security>, VmmError> {
    channel_security(
        request.tls_dir.as_deref(),
        request.insecure_plaintext,
        !in_process || request.witness.is_some() || request.fencing.is_some(),
    )
}

/// A pair identifier for the witness: unique per protection session, never 0 (the
/// reachability check asks about pair 0).
fn new_pair_id() -> u64 {
    random_u64()
}

/// A random non-zero number (the data streams' token is one too).
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        // Unique enough without /dev/urandom: time and process id.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        return (now ^ (u64::from(std::process::id()) << 32)).max(1);
    }
    u64::from_le_bytes(bytes).max(1)
}

/// Opens one more connection to the backup (a data stream).
pub type LaneDialer<'a> = &'a mut dyn FnMut() -> Result<FtStream, String>;

/// Opens `lanes` data streams with `dial`; each first says which session and which stream
/// it is.
fn dial_lanes(
    dial: Option<LaneDialer<'_>>,
    (pair_id, token): (u64, u64),
    lanes: u32,
) -> Result<Vec<FtStream>, String> {
    if lanes == 0 {
        return Ok(Vec::new());
    }
    let Some(dial) = dial else {
        return Err("several streams need a way to reach the backup again".into());
    };
    (1..=lanes)
        .map(|lane| {
            let mut stream = dial().map_err(|e| format!("data stream {lane}: {e}"))?;
            stream
                .set_nodelay()
                .map_err(|e| format!("data stream {lane}: {e}"))?;
            let join = Control::JoinLane {
                pair_id,
                token,
                lane,
            };
            let frame = encode_frame(FrameType::Control, 0, 0, &join.encode());
            stream
                .write_all(&frame)
                .map_err(|e| format!("data stream {lane}: {e}"))?;
            Ok(stream)
        })
        .collect()
}

/// Reads frames until a Control message arrives (the backup sends nothing else but Error).
fn read_control<R: Read>(reader: &mut FrameReader, stream: &mut R) -> Result<Control, String> {
    let frame = reader
        .read_frame(stream)
        .map_err(|e| describe_read_error(&e))?;
    match Message::parse(&frame).map_err(|e| e.to_string())? {
        Message::Control { payload } => Control::decode(payload).map_err(|e| e.to_string()),
        Message::Error { message } => Err(format!("the backup reported: {message}")),
        other => Err(format!("unexpected message from the backup: {other:?}")),
    }
}

fn describe_read_error(e: &ProtocolError) -> String {
    match e {
        ProtocolError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            "no heartbeat from the peer within the timeout".to_string()
        }
        other => other.to_string(),
    }
}

impl Primary {
    /// Connects, synchronises and starts protecting `vm`. On failure the VM runs on as before.
    pub fn enable(
        vm: &mut dyn ReplicableVm,
        config: &VmConfig,
        request: &EnableFtRequest,
        wake: Arc<EventFd>,
        progress: Option<Arc<TransferProgress>>,
    ) -> Result<Self, VmmError> {
        let (peer, _, _) = validate(request)?;
        let Some(security) = security(request, false)? else {
            return Err(VmmError::InvalidConfig("no security choice".into()));
        };
        let stream =
            transport::dial(&peer, &security, CONNECT_TIMEOUT).map_err(|e| io_err("backup", e))?;
        let mut dial =
            || transport::dial(&peer, &security, CONNECT_TIMEOUT).map_err(|e| e.to_string());
        Self::enable_over(vm, config, request, wake, stream, Some(&mut dial), progress)
    }

    /// [`Primary::enable`] over a connection already made to the backup; `dial` makes more
    /// (the data streams, when `request.streams` asks for them). `progress` follows the
    /// initial synchronisation for the operator (`vm.progress`).
    pub fn enable_over(
        vm: &mut dyn ReplicableVm,
        config: &VmConfig,
        request: &EnableFtRequest,
        wake: Arc<EventFd>,
        stream: FtStream,
        dial: Option<LaneDialer<'_>>,
        progress: Option<Arc<TransferProgress>>,
    ) -> Result<Self, VmmError> {
        let (peer, mut epoch_len, mut heartbeat_timeout) = validate(request)?;
        let security = security(request, matches!(stream, FtStream::Unix(_)))?;
        let fencing = Fencing::from_operator(
            request.witness.as_deref(),
            request.fencing.as_deref(),
            security.as_ref(),
        )
        .map_err(VmmError::InvalidConfig)?;
        if request.group.is_some() && matches!(fencing, Fencing::Etcd(_)) {
            return Err(VmmError::InvalidConfig(
                "fencing on etcd does not cover FT groups yet; fence a group with the witness"
                    .into(),
            ));
        }
        fencing.check_reachable().map_err(VmmError::InvalidConfig)?;
        let group = match &request.group {
            Some(path) => {
                let gates = vm.ft_gates();
                let macs = gates.map_err(|e| io_err("output gates", e))?.macs;
                let timing = GroupTiming {
                    epoch: epoch_len,
                    heartbeat_timeout,
                };
                let member = PrimaryMember::join(path, macs, timing, new_pair_id())
                    .map_err(|e| io_err("joining the FT group", e))?;
                // The group's timing is its creator's.
                epoch_len = member.timing.epoch;
                heartbeat_timeout = member.timing.heartbeat_timeout;
                Some(member)
            }
            None => None,
        };
        stream
            .set_nodelay()
            .map_err(|e| io_err("socket option", e))?;
        // Private memory whatever backs the guest's: only the sender reads it, and hugepage
        // staging would double what the host must reserve. The layout is the guest's.
        let staging =
            vmm::memory::create(config.memory.size).map_err(|e| io_err("staging memory", e))?;
        // The backup's copy of every page sent so far, for deltas (Cuju keeps the same): only
        // the pages ever dirtied under protection take host memory.
        let base = vmm::memory::create(config.memory.size)
            .map_err(|e| io_err("delta base memory", e))
            .and_then(|mem| DeltaBase::new(mem).map_err(|e| io_err("delta base memory", e)))?;
        // The pause's staging work is shared with a helper thread on the vCPU's idle core.
        let stager = if request.stage_helper {
            StagingCopier::start(vm.memory(), &staging, || {
                vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication)
            })
        } else {
            StagingCopier::alone()
        };
        let mut hot = HotPages::new(vm.memory(), epoch_len)
            .map_err(|e| VmmError::InvalidConfig(format!("guest memory layout: {e}")))?;
        // Every member of a group claims the group at the witness: it fails over as one.
        let pair_id = group.as_ref().map_or_else(new_pair_id, |g| g.group_id);
        // On etcd the pair's key is this primary's before anything is protected.
        let lease = fencing
            .hold_as_primary(pair_id)
            .map_err(|e| io_err("fencing", e))?;
        let write_half = stream.try_clone().map_err(|e| io_err("socket clone", e))?;
        let lanes = request.streams.map_or(0, |n| n.saturating_sub(1));
        let mut sender = Sender::with_options(
            write_half,
            SenderOptions {
                compress: request.compress,
                // Over TLS each record's AEAD tag already rejects any changed byte; the
                // frame CRC would cost both ends as much CPU again (data streams stay
                // checked: their checksums tie each page frame to its pass).
                checksums: !stream.authenticates_bytes(),
                ..SenderOptions::default()
            },
        );
        sender.set_progress(progress.clone());
        let disk_sizes = match request.disk_mode {
            FtDiskMode::Replicated => config
                .disks
                .iter()
                .flatten()
                .zip(0u32..)
                .map(|(d, i)| {
                    crate::disk_sync::image_size_of(i, &d.path.clone().unwrap_or_default())
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| io_err("disk images", e))?,
            FtDiskMode::Shared => Vec::new(),
        };
        let lane_token = if lanes > 0 { random_u64() } else { 0 };
        let params = Control::Params {
            lanes,
            lane_token,
            pair_id,
            epoch_ms: epoch_len.as_millis() as u64,
            heartbeat_timeout_ms: heartbeat_timeout.as_millis() as u64,
            disk_mode: request.disk_mode,
            witness: fencing.announced_witness(),
            fencing: fencing.announced_kind(),
            disk_sizes,
        };
        let mut paused = false;
        // The data streams join right after Params, while the backup still listens.
        let synced = sender
            .send_hello(config)
            .and_then(|()| sender.send_frame(FrameType::Control, &params.encode()))
            .map_err(|e| e.to_string())
            .and_then(|()| dial_lanes(dial, (pair_id, lane_token), lanes))
            .and_then(|lanes| {
                let sync = Self::initial_sync(
                    vm,
                    config,
                    &mut sender,
                    &stream,
                    &params,
                    epoch_len,
                    &mut paused,
                );
                sync.map(|done| (done, lanes))
            });
        // Epochs are counted by the FT status from here on, not by the sync's progress.
        sender.set_progress(None);
        if let Some(progress) = &progress {
            match &synced {
                Ok(_) => progress.done(),
                Err(e) => progress.failed(e),
            }
        }
        let ((gates, first_epoch, reader), lanes) = match synced {
            Ok(done) => done,
            Err(e) => {
                let _ = sender.abort(&e);
                if let Some(group) = &group {
                    group.leave("its initial synchronisation failed");
                }
                let _ = vm.set_dirty_logging(false);
                if paused {
                    if let Err(r) = vm.resume() {
                        log::error!("FT: resuming after a failed sync: {r}");
                    }
                }
                return Err(VmmError::Failed {
                    action: "enable-ft",
                    message: e,
                });
            }
        };
        // The VM is paused here with the gates holding; it runs again below. From the first
        // epoch on, hot pages stay writable where KVM allows it.
        if request.hot_pages {
            match vm.set_manual_rearm(true) {
                Ok(on) => hot.set_enabled(on),
                Err(e) => log::warn!("FT: hot pages stay off (manual dirty-log re-arming: {e})"),
            }
        }
        // Frames delivered from now on are mirrored; what came before is in the first
        // epoch's state (the VM is paused here).
        if let (Some(input), true) = (&gates.input_log, request.early_acks) {
            input.start(first_epoch);
        }
        let shared = Arc::new(Shared {
            gates,
            session_start: Instant::now(),
            wake,
            staging_busy: AtomicBool::new(false),
            last_acked: AtomicU64::new(first_epoch - 1),
            last_sent: AtomicU64::new(first_epoch - 1),
            last_ended: AtomicU64::new(first_epoch - 1),
            commit_failure: Mutex::new(None),
            bytes: AtomicU64::new(sender.stats().bytes),
            last_send_us: AtomicU64::new(0),
            last_ran_us: AtomicU64::new(0),
            lost: Mutex::new(None),
            stopping: AtomicBool::new(false),
            standing_down: AtomicBool::new(false),
            stood_down: AtomicBool::new(false),
            first_epoch,
            input_sent: AtomicU64::new(0),
            input_frames_sent: AtomicU64::new(0),
            kept_input: Mutex::new(KeptInput::default()),
            pages_from_input: AtomicU64::new(0),
            output_frames_sent: AtomicU64::new(0),
            resend_output: request.resend_output,
            output_waiting: AtomicBool::new(false),
            encode_threads: AtomicU64::new(0),
            streams: AtomicU64::new(1),

            cut_for_output: AtomicBool::new(false),
            timings: Mutex::new(EpochTimings::default()),
            lease,
            group: group.map(|member| GroupLink {
                member,
                offset: AtomicI64::new(i64::MIN),
                orders: Mutex::new(VecDeque::new()),
                members: AtomicU64::new(0),
                group_epoch: AtomicU64::new(0),
            }),
        });
        let encode_threads = request.encode_threads.map_or_else(
            || default_encode_threads(config.cpus.boot_vcpus),
            |n| n as usize,
        );
        let start = Self::start_threads(
            &shared,
            sender,
            &stream,
            (staging.clone(), base),
            reader,
            (epoch_len, heartbeat_timeout),
            (encode_threads, &lanes),
        );
        let resumed = vm.resume().map_err(|e| io_err("resume", e));
        let (jobs, sender_thread, ack_thread) = match (start, resumed) {
            (Ok(threads), Ok(())) => threads,
            (Err(e), _) | (_, Err(e)) => {
                shared.stopping.store(true, Ordering::SeqCst);
                stream.shutdown();
                for lane in &lanes {
                    lane.shutdown();
                }
                for gate in shared.gates.all() {
                    let _ = gate.passthrough();
                }
                if let Some(group) = &shared.group {
                    group.member.leave("protection could not start");
                }
                let _ = vm.resume();
                return Err(e);
            }
        };
        let latency_mode = request.latency_mode && shared.group.is_none();
        // A group member's pause comes when the coordinator says, and would wait, paused, for
        // a first pass still leaving staging: members copy early but send in the pause.
        let early_send = request.early_staging && request.early_send && shared.group.is_none();
        if latency_mode {
            // Latency mode: the control loop hears of the first output an epoch holds.
            let s = shared.clone();
            let notify: FirstHeld = Arc::new(move || {
                if !s.output_waiting.swap(true, Ordering::SeqCst) {
                    let _ = s.wake.write(1);
                }
            });
            for gate in &shared.gates.nets {
                gate.set_on_first_held(Some(notify.clone()));
            }
        }
        let resumes = match Self::listen_to_group(&shared) {
            Ok(resumes) => resumes,
            Err(e) => {
                log::error!("FT: {e}; the group will fail this member");
                None
            }
        };
        log::info!(
            "FT: protecting the VM with {peer}: epochs of {} ms, heartbeat timeout {} ms, {:?} disks, pair {pair_id:#x}",
            epoch_len.as_millis(),
            heartbeat_timeout.as_millis(),
            request.disk_mode
        );
        Ok(Self {
            shared,
            jobs: Some(jobs),
            sender: Some(sender_thread),
            acks: Some(ack_thread),
            resumes,
            stream,
            lanes,
            staging,
            hot,
            early: EarlyStaging::new(request.early_staging),
            stager,
            peer,
            pair_id,
            fencing,
            disk_mode: request.disk_mode,
            epoch_len,
            next_len: epoch_len,
            heartbeat_timeout,
            epoch: first_epoch,
            latency_mode,
            early_send,
            pauses: GuestPauses::default(),
            epoch_started: Instant::now(),
            waiting_for_sender: false,
            dirty_pages: 0,
            epochs_cut_early: 0,
            epochs_cut_for_output: 0,
            health: FtHealth::Protected,
            last_error: None,
        })
    }

    /// After Hello and Params: pre-copy while the guest runs, then the final pause: the rest of the
    /// memory, the state, EpochEnd and the backup's Ack. Leaves the VM paused with the output
    /// gates holding the next epoch. Returns the gates and the first protected epoch.
    fn initial_sync(
        vm: &mut dyn ReplicableVm,
        config: &VmConfig,
        sender: &mut Sender<FtStream>,
        stream: &FtStream,
        params: &Control,
        epoch_len: Duration,
        paused: &mut bool,
    ) -> Result<(FtGates, u64, FrameReader), String> {
        let e = |e: ProtocolError| e.to_string();
        let replicated = matches!(
            params,
            Control::Params {
                disk_mode: FtDiskMode::Replicated,
                ..
            }
        );
        let mut disks = if replicated {
            Self::start_disk_sync(vm, config, sender)?
        } else {
            None
        };
        let (pending, _) = live::precopy(vm, sender, epoch_len)?;
        if let Some(disks) = disks.as_mut() {
            let mut send = |kind: FrameType, payload: &[u8]| sender.send_frame(kind, payload);
            disks.catch_up(&mut send).map_err(|e| e.to_string())?;
        }
        vm.pause().map_err(|e| e.to_string())?;
        *paused = true;
        let mut last = live::dirty_since_last(vm)?;
        last.union_with(&pending);
        if let Some(progress) = sender.progress() {
            progress.begin_pass(last.count());
            progress.finishing();
        }
        sender.send_memory(vm.memory(), &last).map_err(e)?;
        if let Some(mut disks) = disks.take() {
            let mut send = |kind: FrameType, payload: &[u8]| sender.send_frame(kind, payload);
            disks.finish_paused(&mut send).map_err(|e| e.to_string())?;
        }
        let state = vm.save_state().map_err(|e| e.to_string())?;
        sender.send_state(&state).map_err(e)?;
        let gates = vm.ft_gates()?;
        // Gates kept from an earlier session go on counting: epochs only grow.
        let sync_epoch = gates.all().map(|g| g.current_epoch()).max().unwrap_or(0) + 1;
        let end = Control::EpochEnd {
            epoch: sync_epoch,
            released_through: sync_epoch,
            group_epoch: None,
            // The backup learns the primary's clock from the protected epochs.
            clock: None,
        };
        sender
            .send_frame(FrameType::Control, &end.encode())
            .map_err(e)?;
        let mut read_half = stream.try_clone().map_err(|e| e.to_string())?;
        read_half
            .set_read_timeout(Some(SYNC_ACK_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut reader = FrameReader::new();
        match read_control(&mut reader, &mut read_half)? {
            Control::Ack { epoch } if epoch == sync_epoch => {}
            other => return Err(format!("expected Ack({sync_epoch}), got {other:?}")),
        }
        let shared_disks = matches!(
            params,
            Control::Params {
                disk_mode: FtDiskMode::Shared,
                ..
            }
        );
        for gate in &gates.nets {
            gate.set_mode(GateMode::Hold).map_err(|e| e.to_string())?;
            gate.begin_epoch(sync_epoch + 1)
                .map_err(|e| e.to_string())?;
        }
        for gate in &gates.disks {
            let mode = if shared_disks {
                GateMode::Hold
            } else {
                GateMode::PassThrough
            };
            gate.set_mode(mode).map_err(|e| e.to_string())?;
            gate.begin_epoch(sync_epoch + 1)
                .map_err(|e| e.to_string())?;
        }
        for log in &gates.disk_logs {
            // Writes of the sync epoch itself reached the image before the backup's copy
            // was made, so only what comes after is shipped.
            let _ = log.take();
            log.set_recording(true);
        }
        Ok((gates, sync_epoch + 1, reader))
    }

    /// Replicated disks: starts tracking written blocks and copies every image whole while
    /// the guest runs (the backup's image may start blank or stale; see [`DiskSync`]).
    fn start_disk_sync(
        vm: &mut dyn ReplicableVm,
        config: &VmConfig,
        sender: &mut Sender<FtStream>,
    ) -> Result<Option<DiskSync>, String> {
        let paths: Vec<_> = config
            .disks
            .iter()
            .flatten()
            .map(|d| d.path.clone().unwrap_or_default())
            .collect();
        if paths.is_empty() {
            return Ok(None);
        }
        // The gates (and their write logs) are installed with the device loop stopped.
        vm.pause()?;
        let gates = vm.ft_gates();
        vm.resume()?;
        let gates = gates?;
        if gates.disk_logs.len() != paths.len() {
            return Err(format!(
                "{} disks configured, {} write logs",
                paths.len(),
                gates.disk_logs.len()
            ));
        }
        let mut disks =
            DiskSync::start(paths.into_iter().zip(gates.disk_logs)).map_err(|e| e.to_string())?;
        let mut send = |kind: FrameType, payload: &[u8]| sender.send_frame(kind, payload);
        disks.copy_live(&mut send).map_err(|e| e.to_string())?;
        Ok(Some(disks))
    }

    #[allow(clippy::type_complexity)]
    fn start_threads(
        shared: &Arc<Shared>,
        mut sender: Sender<FtStream>,
        stream: &FtStream,
        (staging, base): (GuestMemoryMmap, DeltaBase),
        reader: FrameReader,
        (epoch_len, heartbeat_timeout): (Duration, Duration),
        (encode_threads, lanes): (usize, &[FtStream]),
    ) -> Result<(SyncSender<Job>, JoinHandle<()>, JoinHandle<()>), VmmError> {
        let read_half = stream.try_clone().map_err(|e| io_err("socket clone", e))?;
        read_half
            .set_read_timeout(Some(heartbeat_timeout))
            .map_err(|e| io_err("socket option", e))?;
        // A backup that stops reading must not block the sender (or a data stream's
        // thread) forever.
        let write_timeout = Some(heartbeat_timeout.max(Duration::from_secs(1)));
        for s in std::iter::once(stream).chain(lanes) {
            s.set_write_timeout(write_timeout)
                .map_err(|e| io_err("socket option", e))?;
        }
        // Room for one epoch, one StandDown and one input wake-up (see `InputWake`).
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(3);
        // Input also goes out between the page frames of an epoch, which are kept small
        // enough (256 KiB) that it waits for well under a millisecond of sending.
        sender.set_batch_pages(EPOCH_FRAME_PAGES);
        // SAFETY: the staging memory is written only in a pause (`capture`) or by early
        // staging, and both first wait until the sender is done with the pass it holds
        // (`staging_busy`, set when an epoch or an early pass is handed over, cleared when
        // that pass has ended); a pause that waits in vain gives the session up without
        // writing staging, and early staging skips its copy. The model's slow-link test
        // fails when either pass clears it early.
        unsafe { sender.send_pages_in_place() };
        let seccomp = || vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication);
        if !lanes.is_empty() {
            let writers = lanes
                .iter()
                .map(|lane| {
                    Ok(Lane {
                        out: Box::new(lane.try_clone()?),
                        // Its JoinLane was frame 0.
                        next_seq: 1,
                    })
                })
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| io_err("socket clone", e))?;
            sender
                .start_lanes(writers, &staging, &base, seccomp)
                .map_err(|e| io_err("data stream threads", e))?;
        } else if encode_threads > 0 {
            sender
                .start_encode_pool(encode_threads, &staging, &base, seccomp)
                .map_err(|e| io_err("encoder threads", e))?;
        }
        shared
            .streams
            .store(1 + sender.lanes() as u64, Ordering::Relaxed);
        shared
            .encode_threads
            .store(sender.encode_threads() as u64, Ordering::Relaxed);
        let s = shared.clone();
        let mut scratch = Vec::new();
        sender.set_interleave(Some(Box::new(move |sink| {
            send_input(&s, sink, &mut scratch)
        })));
        let queued = Arc::new(AtomicBool::new(false));
        let taken = InputTaken(queued.clone());
        if let Some(input) = &shared.gates.input_log {
            let wake = InputWake {
                jobs: jobs.clone(),
                queued,
            };
            input.set_notify(Box::new(move || wake.notify()));
        }
        let s = shared.clone();
        let heartbeat_every = epoch_len.min(heartbeat_timeout / 3);
        let sender_thread = std::thread::Builder::new()
            .name("ft-sender".into())
            .spawn(move || {
                if vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    let jobs = (&job_rx, &taken);
                    send_loop(&s, sender, (&staging, base), jobs, heartbeat_every);
                } else {
                    s.lose("the sender thread cannot install its seccomp filter".into());
                }
            })
            .map_err(|e| io_err("sender thread", e))?;
        let s = shared.clone();
        let ack_thread = std::thread::Builder::new()
            .name("ft-acks".into())
            .spawn(move || {
                if vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    ack_loop(&s, read_half, reader);
                } else {
                    s.lose("the ack thread cannot install its seccomp filter".into());
                }
            })
            .map_err(|e| io_err("ack thread", e))?;
        Ok((jobs, sender_thread, ack_thread))
    }

    /// Ends the running epoch, for a single VM and a group member alike: pause (if running),
    /// wait for the sender to free the staging memory, capture, resume, record the pause. A
    /// group member tells the coordinator it paused and resumes only when told (so the cut is
    /// consistent across the group). None: nothing was captured and nothing is wrong here (the
    /// link was lost meanwhile, or the group went on unprotected); `poll` handles what follows.
    fn cut(
        &mut self,
        vm: &mut dyn ReplicableVm,
        cut: &Cut,
        running: bool,
    ) -> Result<Option<EpochJob>, String> {
        self.pauses.settle(vm.last_stop(), true);
        let start = Instant::now();
        if running {
            vm.pause()?;
        }
        if self.shared.staging_busy.load(Ordering::SeqCst) {
            if *cut == Cut::Own {
                // Bounded latency (Cuju): the sender cannot keep up with the guest's dirty
                // rate; the guest waits, paused, for it rather than growing the epoch (and
                // the wait of its output) without bound.
                self.epochs_cut_early += 1;
            }
            // A sender stuck for a heartbeat timeout has lost its backup.
            if !self.wait_for_staging() {
                let resumed = if running { vm.resume() } else { Ok(()) };
                self.pauses.ended(start, start.elapsed(), running);
                resumed?;
                return match cut {
                    Cut::Group { epoch, .. } if !self.lost() => Err(format!(
                        "group epoch {epoch}: the previous epoch is still being sent"
                    )),
                    _ => Ok(None),
                };
            }
        }
        let told = self.group_paused(cut);
        let captured = self.capture(vm);
        crash_point(Phase::Pause, self.epoch - self.shared.first_epoch);
        let go = self.group_resume(cut, told);
        let resumed = if running { vm.resume() } else { Ok(()) };
        self.pauses.ended(start, start.elapsed(), running);
        resumed?;
        if let Err(e) = go {
            let degrading = self
                .shared
                .group
                .as_ref()
                .is_some_and(|g| g.degrade_pending());
            // The group ran on unprotected while this member was in the cut: the epoch is
            // dropped and the Degrade order, next in line, ends protection.
            return if degrading { Ok(None) } else { Err(e) };
        }
        captured.map(Some)
    }

    /// Waits until the sender has shipped the previous epoch out of the staging memory.
    /// False when the link is lost meanwhile, or when the sender is stuck for a heartbeat
    /// timeout (then the link counts as lost).
    fn wait_for_staging(&self) -> bool {
        let deadline = Instant::now() + self.heartbeat_timeout;
        while self.shared.staging_busy.load(Ordering::SeqCst) {
            if self.lost() {
                return false;
            }
            if Instant::now() >= deadline {
                self.shared.lose(format!(
                    "no epoch sent within the heartbeat timeout ({:?})",
                    self.heartbeat_timeout
                ));
                return false;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        true
    }

    /// The pages early staging just copied go to the sender while the guest runs on (see
    /// `early_staging`). Should the sender not take them, the pause sends them.
    fn send_early(&mut self) {
        let (Some(pages), Some(jobs)) = (self.early.unsent(), &self.jobs) else {
            return;
        };
        let job = Job::EarlyPages {
            epoch: self.epoch,
            pages,
        };
        // Set before the sender can see the job: it clears it when the pass has left.
        self.shared.staging_busy.store(true, Ordering::SeqCst);
        match jobs.try_send(job) {
            Ok(()) => self.early.mark_sent(),
            Err(_) => self.shared.staging_busy.store(false, Ordering::SeqCst),
        }
    }

    /// The captured epoch goes to the sender; the next one runs.
    fn hand_over(&mut self, job: EpochJob) {
        self.dirty_pages += job.pages;
        self.epoch += 1;
        self.shared.staging_busy.store(true, Ordering::SeqCst);
        if let Some(jobs) = &self.jobs {
            if let Err(e) = jobs.try_send(Job::Epoch(job)) {
                self.shared.staging_busy.store(false, Ordering::SeqCst);
                self.shared.lose(match e {
                    TrySendError::Full(_) => "the sender's queue is full".to_string(),
                    TrySendError::Disconnected(_) => "the sender thread is gone".to_string(),
                });
            }
        }
    }

    /// Disk writes held when protection ended that could not reach the image yet.
    fn stranded_writes(&self) -> u64 {
        self.shared
            .gates
            .disks
            .iter()
            .map(|g| g.stats().held_items)
            .sum()
    }

    /// What `ft-status` says while writes held when protection ended cannot reach the image.
    fn stranded_report(&self) -> Option<String> {
        if self.health == FtHealth::Protected {
            return None;
        }
        let stranded = self.stranded_writes();
        (stranded > 0).then(|| {
            format!(
                "{stranded} disk writes held when protection ended cannot reach the image yet (retrying every {STRANDED_RETRY:?}; new writes wait behind them)"
            )
        })
    }

    /// Retries the stranded writes (in order; new guest writes wait behind them).
    fn drain_stranded(&mut self) {
        for gate in &self.shared.gates.disks {
            if gate.stats().held_items == 0 {
                continue;
            }
            match gate.drain() {
                Ok(stats) if stats.items > 0 => {
                    log::warn!("FT: {} held writes reached the image", stats.items)
                }
                Ok(_) => {}
                Err(e) => log::debug!("FT: held writes still cannot leave: {e}"),
            }
        }
    }

    /// Held output that could not leave for [`COMMIT_FAILURE_GRACE`] while protected.
    fn commit_failing_too_long(&self) -> Option<String> {
        if self.health != FtHealth::Protected {
            return None;
        }
        let failure = self
            .shared
            .commit_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let failure = failure.as_ref()?;
        (!failure.no_space && failure.since.elapsed() >= COMMIT_FAILURE_GRACE).then(|| {
            format!(
                "held output could not leave for {:?} ({})",
                failure.since.elapsed(),
                failure.error
            )
        })
    }

    fn lost(&self) -> bool {
        self.shared
            .lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The part of a checkpoint that runs while the VM is paused: the epoch's pages into the
    /// staging memory (hot pages only if they changed; the rest re-armed), then the state.
    fn capture(&mut self, vm: &mut dyn ReplicableVm) -> Result<EpochJob, String> {
        let mut reported = live::dirty_since_last(vm)?;
        let early = self.early.take();
        if let Some(uncopied) = early.as_ref().and_then(|e| e.uncopied.as_ref()) {
            reported.union_with(uncopied);
        }
        let mut dirty = self
            .hot
            .stage(vm.memory(), &self.staging, reported, &mut self.stager)?;
        let pages = match early {
            None => {
                self.hot.update(self.epoch, &dirty, vm.guest_written());
                dirty.count()
            }
            Some(early) => {
                let written = early_staging::union_known(early.guest_written, vm.guest_written());
                if let Some(copied) = &early.copied {
                    self.early.learn(copied, &dirty);
                }
                match early.copied {
                    // Already on their way but those held back: this pass sends them and
                    // what changed since.
                    Some(mut epoch_pages) if early.sent => {
                        if let Some(held) = &early.held_back {
                            dirty.union_with(held);
                        }
                        epoch_pages.union_with(&dirty);
                        self.hot.update(self.epoch, &epoch_pages, written.as_ref());
                        epoch_pages.count()
                    }
                    copied => {
                        if let Some(copied) = &copied {
                            dirty.union_with(copied);
                        }
                        self.hot.update(self.epoch, &dirty, written.as_ref());
                        dirty.count()
                    }
                }
            }
        };
        vm.rearm_dirty_log(self.hot.kept())?;
        let state = vm.save_state().map_err(|e| e.to_string())?;
        let disk_writes = self
            .shared
            .gates
            .disk_logs
            .iter()
            .map(|l| l.take())
            .collect();
        let next = self.epoch + 1;
        for gate in self.shared.gates.all() {
            gate.begin_epoch(next).map_err(|e| e.to_string())?;
        }
        if let Some(input) = &self.shared.gates.input_log {
            input.begin_epoch(next);
        }
        Ok(EpochJob {
            epoch: self.epoch,
            captured_ns: self.shared.session_start.elapsed().as_nanos() as u64,
            group_epoch: None,
            dirty,
            pages,
            state: Box::new(state),
            disk_writes,
            ran: Duration::ZERO,
        })
    }

    fn status_now(&self) -> FtStatus {
        let s = &self.shared;
        let last_acked = s.last_acked.load(Ordering::SeqCst);
        // Read out before any other lock is taken (`commit_epoch` takes it under one).
        let (send_us, commit_us, input_mirror_us) = {
            let t = s.timings();
            let p50_p99 = |d: &DurationStats| (d.percentile_us(50.0), d.percentile_us(99.0));
            (
                p50_p99(&t.send),
                p50_p99(&t.commit),
                p50_p99(&t.input_mirror),
            )
        };
        let mut status = FtStatus {
            role: FtRole::Primary,
            health: self.health,
            peer: Some(self.peer.clone()),
            disk_mode: Some(self.disk_mode),
            epoch_ms: self.epoch_len.as_millis() as u64,
            heartbeat_timeout_ms: self.heartbeat_timeout.as_millis() as u64,
            fencing: self.fencing.describe(),
            epoch: self.epoch,
            last_committed_epoch: last_acked,
            lag_epochs: self.epoch.saturating_sub(last_acked.saturating_add(1)),
            bytes: s.bytes.load(Ordering::Relaxed),
            dirty_pages: self.dirty_pages,
            pause_us_last: self.pauses.stats().last_us(),
            pause_us_p50: self.pauses.stats().percentile_us(50.0),
            pause_us_p99: self.pauses.stats().percentile_us(99.0),
            pause_us_max: self.pauses.stats().max_us(),
            send_us_p50: send_us.0,
            send_us_p99: send_us.1,
            commit_us_p50: commit_us.0,
            commit_us_p99: commit_us.1,
            input_mirror_us_p50: input_mirror_us.0,
            input_mirror_us_p99: input_mirror_us.1,
            epochs_cut_early: self.epochs_cut_early,
            pages_staged_early: self.early.pages_copied(),
            pages_sent_early: self.early.pages_sent(),
            pages_held_for_pause: self.early.pages_held_back(),
            epochs_cut_for_output: self.epochs_cut_for_output,
            encode_threads: s.encode_threads.load(Ordering::Relaxed),
            streams: s.streams.load(Ordering::Relaxed),
            hot_pages: self.hot.kept().count(),
            hot_page_hits: self.hot.hits(),
            last_error: self
                .stranded_report()
                .or_else(|| self.last_error.clone())
                .or_else(|| {
                    s.commit_failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .map(|f| format!("held output cannot leave (retrying): {}", f.error))
                }),
            ..FtStatus::default()
        };
        if let Some(group) = &s.group {
            status.group = Some(group.member.path().to_string());
            status.group_members = group.members.load(Ordering::SeqCst);
            status.group_epoch = group.group_epoch.load(Ordering::SeqCst);
        }
        for gate in &s.gates.nets {
            let g = gate.stats();
            status.held_packets += g.held_items + g.lane_held;
            status.released_packets += g.released.items + g.passed_items + g.early_released;
            status.acks_released_early += g.early_released;
        }
        status.input_frames_mirrored = s.input_frames_sent.load(Ordering::Relaxed);
        status.pages_from_input = s.pages_from_input.load(Ordering::Relaxed);
        status.output_frames_mirrored = s.output_frames_sent.load(Ordering::Relaxed);
        for gate in &s.gates.disks {
            status.held_disk_writes += gate.stats().held_items;
        }
        status
    }

    /// Stops the replication threads (after `job`, if any, is sent) and closes the link.
    fn close(&mut self, job: Option<Job>) {
        // Set by `stop`, which needs the backup's answer.
        let standing_down = self.shared.standing_down.load(Ordering::SeqCst);
        for gate in &self.shared.gates.nets {
            // Its callback holds the shared state (a cycle through the gates otherwise).
            gate.set_on_first_held(None);
        }
        if let Some(input) = &self.shared.gates.input_log {
            // Its wake-up holds a sender of the job channel, which must close for the sender
            // thread to end.
            input.stop();
            input.set_notify(Box::new(|| {}));
        }
        if let Some(jobs) = self.jobs.take() {
            if let Some(mut job) = job {
                // Behind at most one queued epoch; a sender that is gone (or stuck on a dead
                // link) misses it.
                let deadline = Instant::now() + STAND_DOWN_QUEUE_WAIT;
                loop {
                    match jobs.try_send(job) {
                        Err(TrySendError::Full(again)) if Instant::now() < deadline => {
                            job = again;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        _ => break,
                    }
                }
            }
            drop(jobs);
        }
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
        if standing_down {
            // The backup's answer proves it will not take over; a backup that is gone or
            // already taking over never sends it (`stop` then asks the fencing).
            let deadline = Instant::now() + self.heartbeat_timeout;
            while !self.shared.stood_down.load(Ordering::SeqCst)
                && self.acks.as_ref().is_some_and(|t| !t.is_finished())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.stream.shutdown();
        for lane in &self.lanes {
            lane.shutdown();
        }
        if let Some(t) = self.acks.take() {
            let _ = t.join();
        }
        for log in &self.shared.gates.disk_logs {
            log.set_recording(false);
        }
    }
}

fn send_loop(
    shared: &Shared,
    mut sender: Sender<FtStream>,
    (staging, mut base): (&GuestMemoryMmap, DeltaBase),
    (jobs, wake): (&mpsc::Receiver<Job>, &InputTaken),
    heartbeat_every: Duration,
) {
    let mut input_scratch = Vec::new();
    loop {
        let job = match jobs.recv_timeout(heartbeat_every) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                let beat = Control::Heartbeat {
                    epoch: shared.last_sent.load(Ordering::SeqCst),
                };
                if let Err(e) = sender.send_frame(FrameType::Control, &beat.encode()) {
                    shared.lose(format!("sending a heartbeat: {e}"));
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if matches!(job, Job::Input) {
            wake.taken();
        }
        // Input first: an epoch's frames must reach the backup before its EpochEnd.
        if let Err(e) = send_input(shared, &mut sender, &mut input_scratch) {
            shared.lose(format!("mirroring input: {e}"));
            return;
        }
        let result = match job {
            Job::Input => Ok(()),
            Job::EarlyPages { epoch, pages } => {
                let sent =
                    send_early_pages(shared, &mut sender, (staging, &mut base), epoch, &pages);
                shared.staging_busy.store(false, Ordering::SeqCst);
                sent
            }
            Job::Epoch(job) => {
                let t = Instant::now();
                let (epoch, group_epoch, ran) = (job.epoch, job.group_epoch, job.ran);
                let released = shared.last_acked.load(Ordering::SeqCst);
                let sent = send_epoch(shared, &mut sender, (staging, &mut base), job, released);
                let took = t.elapsed();
                let send_us = took.as_micros() as u64;
                shared.last_send_us.store(send_us, Ordering::Relaxed);
                shared
                    .last_ran_us
                    .store(ran.as_micros() as u64, Ordering::Relaxed);
                if sent.is_ok() {
                    shared.timings().send.record(took);
                }
                shared.last_sent.store(epoch, Ordering::SeqCst);
                shared.staging_busy.store(false, Ordering::SeqCst);
                if let (Some(group), Some(epoch), true) = (&shared.group, group_epoch, sent.is_ok())
                {
                    // The group's next cut waits for every member's staging memory.
                    if let Err(e) = group.member.send(&PrimaryMsg::Sent { epoch, send_us }) {
                        log::warn!("FT group: {e}");
                    }
                }
                sent
            }
            Job::StandDown {
                guest_shutdown,
                reprotect,
                reason,
            } => {
                let msg = Control::StandDown {
                    guest_shutdown,
                    reason,
                    reprotect,
                };
                let _ = sender.send_frame(FrameType::Control, &msg.encode());
                return;
            }
        };
        shared.bytes.store(sender.stats().bytes, Ordering::Relaxed);
        shared
            .pages_from_input
            .store(sender.stats().input_pages, Ordering::Relaxed);
        if let Err(e) = result {
            shared.lose(format!("sending an epoch: {e}"));
            return;
        }
    }
}

/// The frames the NICs delivered since the last call, counted as sent: the backup's answer
/// may arrive before the caller's `send_frame` returns. The caller keeps them for their
/// epoch's pages (`kept_input`) once encoded.
fn take_input(shared: &Shared) -> Option<(&InputLog, Vec<LoggedFrame>)> {
    let input = shared.gates.input_log.as_ref()?;
    let frames = input.take_pending();
    let last = frames.last()?;
    shared.input_sent.fetch_max(last.seq, Ordering::SeqCst);
    shared
        .input_frames_sent
        .fetch_add(frames.len() as u64, Ordering::Relaxed);
    Some((input, frames))
}

/// What the NICs still hold of ended epoch `epoch`, as OutputFrames payloads. Read on the
/// sender thread, after the pause: an epoch's frames stay held at least until its Ack, which
/// only an EpochEnd sent after this can bring. (A gate that switched to pass-through released
/// them already, and protection is over then.)
fn output_payloads(shared: &Shared, epoch: u64) -> Vec<Vec<u8>> {
    if !shared.resend_output {
        return Vec::new();
    }
    let mut frames: Vec<LoggedFrame> = Vec::new();
    for (nic, gate) in shared.gates.nets.iter().enumerate() {
        gate.for_each_held(epoch, &mut |data| {
            // Never larger from a virtio-net device; the backup would refuse the stream.
            if data.is_empty() || data.len() > MAX_INPUT_LEN {
                return;
            }
            let seq = frames.len() as u64 + 1;
            frames.push(LoggedFrame {
                seq,
                nic: nic as u32,
                epoch,
                data: data.to_vec(),
                placed: Vec::new(),
            });
        });
    }
    shared
        .output_frames_sent
        .fetch_add(frames.len() as u64, Ordering::Relaxed);
    encode_input_frames(&frames)
}

/// Sends the frames the NICs delivered since the last call (between epochs, and between the
/// page frames of an epoch), each batch written from where the frames lie: only the entry
/// headers and small frames are copied, into `scratch`.
fn send_input(
    shared: &Shared,
    sink: &mut dyn FrameSink,
    scratch: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    let Some((input, frames)) = take_input(shared) else {
        return Ok(());
    };
    for (batch, _) in input_batches(&frames) {
        sink.send_parts(FrameType::InputFrames, &input_batch_parts(batch, scratch))?;
    }
    shared.kept_input().keep(input, frames);
    Ok(())
}

/// Sends `pages` of the staging memory as a memory pass of epoch `epoch`: each page as a
/// delta against the backup's copy where that is smaller (an epoch the backup does not apply
/// ends the session, and `base` with it), a receive buffer's page as the epoch's input frames
/// the backup holds laid over that copy. Returns those frames.
fn send_pages(
    shared: &Shared,
    sender: &mut Sender<FtStream>,
    (staging, base): (&GuestMemoryMmap, &mut DeltaBase),
    epoch: u64,
    pages: &DirtyPages,
) -> Result<Option<Arc<InputPieces>>, ProtocolError> {
    let input = shared
        .gates
        .input_log
        .as_ref()
        .and_then(|log| shared.kept_input().take_epoch(log, epoch));
    match &input {
        Some(pieces) => sender.send_memory_delta_with_input(staging, pages, base, pieces),
        None => sender.send_memory_delta(staging, pages, base),
    }?;
    Ok(input)
}

/// The first memory pass of epoch `epoch`, sent while it still runs: the pages early staging
/// copied. The input frames it named are kept for the pause's pass.
fn send_early_pages(
    shared: &Shared,
    sender: &mut Sender<FtStream>,
    staging: (&GuestMemoryMmap, &mut DeltaBase),
    epoch: u64,
    pages: &DirtyPages,
) -> Result<(), ProtocolError> {
    if let Some(pieces) = send_pages(shared, sender, staging, epoch, pages)? {
        shared.kept_input().put_back(pieces);
    }
    Ok(())
}

fn send_epoch(
    shared: &Shared,
    sender: &mut Sender<FtStream>,
    (staging, base): (&GuestMemoryMmap, &mut DeltaBase),
    job: EpochJob,
    released_through: u64,
) -> Result<(), ProtocolError> {
    let input = send_pages(shared, sender, (staging, base), job.epoch, &job.dirty)?;
    if let (Some(log), Some(pieces)) = (&shared.gates.input_log, input) {
        kept_input::give_back(log, pieces);
    }
    crash_point(Phase::Transfer, job.epoch - shared.first_epoch);
    for (disk, writes) in job.disk_writes.iter().enumerate() {
        for frame in encode_disk_writes(disk as u32, writes) {
            sender.send_frame(FrameType::DiskWrites, &frame)?;
        }
    }
    for payload in output_payloads(shared, job.epoch) {
        sender.send_frame(FrameType::OutputFrames, &payload)?;
    }
    sender.send_state(&job.state)?;
    shared.timings().ended(job.epoch, job.captured_ns);
    shared.last_ended.fetch_max(job.epoch, Ordering::SeqCst);
    let end = Control::EpochEnd {
        epoch: job.epoch,
        // The ack thread commits an epoch (its shared-disk writes reach the image) before it
        // counts it as acknowledged.
        released_through,
        group_epoch: job.group_epoch,
        clock: Some(EpochClock {
            captured_ns: job.captured_ns,
            sent_ns: shared.session_start.elapsed().as_nanos() as u64,
        }),
    };
    sender.send_frame(FrameType::Control, &end.encode())
}

fn ack_loop(shared: &Shared, mut stream: FtStream, mut reader: FrameReader) {
    // Acks come once per epoch, in order, and only for epochs whose end was sent: anything
    // else (a confused or forged peer) must not release output, so it breaks the link.
    let mut last_ack = shared.last_acked.load(Ordering::SeqCst);
    let mut input_waits = Vec::new();
    loop {
        match read_control(&mut reader, &mut stream) {
            Ok(Control::Ack { epoch }) => {
                let ended = shared.last_ended.load(Ordering::SeqCst);
                if epoch <= last_ack || epoch > ended {
                    shared.lose(format!(
                        "the backup acknowledged epoch {epoch}; the only epochs it may acknowledge are {}..={ended}",
                        last_ack.saturating_add(1)
                    ));
                    return;
                }
                last_ack = epoch;
                if let Some(group) = &shared.group {
                    // A member's output waits for the whole group (see commit_group_epoch).
                    if let Some(group_epoch) = group.group_epoch_of(epoch) {
                        let acked = PrimaryMsg::Acked { epoch: group_epoch };
                        if let Err(e) = group.member.send(&acked) {
                            log::warn!("FT group: {e}");
                        }
                    }
                    continue;
                }
                commit_epoch(shared, epoch);
            }
            Ok(Control::InputAck { seq }) => {
                // Only frames that were sent can be held: a larger seq would release ACKs
                // for input the backup never saw.
                let sent = shared.input_sent.load(Ordering::SeqCst);
                if seq > sent {
                    shared.lose(format!(
                        "the backup acknowledged input frame {seq}; only {sent} were sent"
                    ));
                    return;
                }
                if let Some(input) = &shared.gates.input_log {
                    input.mirrored_through(seq, |waited| input_waits.push(waited));
                }
                if !input_waits.is_empty() {
                    // Recorded after the input log's lock is let go.
                    let mut timings = shared.timings();
                    for waited in input_waits.drain(..) {
                        timings.input_mirror.record(waited);
                    }
                }
                for gate in &shared.gates.nets {
                    gate.input_mirrored(seq);
                }
            }
            Ok(Control::Heartbeat { .. }) => {}
            Ok(Control::StoodDown) if shared.standing_down.load(Ordering::SeqCst) => {
                shared.stood_down.store(true, Ordering::SeqCst);
                return;
            }
            Ok(other) => {
                shared.lose(format!("unexpected message from the backup: {other:?}"));
                return;
            }
            Err(e) => {
                shared.lose(e);
                return;
            }
        }
    }
}

/// The backup holds `epoch`: its held output leaves, in order, through every gate. Only when
/// every gate released it completely does `last_acked` (the backup's `released_through`, after
/// which it forgets the epoch's disk writes) move on; a failed release stays held and is
/// retried by the next commit.
fn commit_epoch(shared: &Shared, epoch: u64) {
    crash_point(Phase::Release, epoch.saturating_sub(shared.first_epoch));
    if shared.lease_lapsed() {
        // The backup may own the pair by now: nothing more leaves (the loop fences).
        shared.lose("the etcd lease of the pair is no longer provably alive".to_string());
        return;
    }
    let mut failed = None;
    for gate in shared.gates.all() {
        // The other gates still release: the backup holds the epoch, so they may.
        if let Err(e) = gate.commit(epoch) {
            let no_space = matches!(&e, EpochError::Release { source, .. }
                if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)));
            failed = Some((e.to_string(), no_space));
        }
    }
    let mut failure = shared
        .commit_failure
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    match failed {
        None => {
            if failure.take().is_some() {
                log::warn!("FT: held output leaves again (epoch {epoch} committed)");
            }
            shared.last_acked.fetch_max(epoch, Ordering::SeqCst);
            let now_ns = shared.session_start.elapsed().as_nanos() as u64;
            shared.timings().committed(epoch, now_ns);
        }
        Some((error, no_space)) => {
            // Retried at every epoch: logged when it starts and then now and then.
            let reported = failure.as_ref().map(|f| f.reported);
            let reported = match reported {
                Some(at) if at.elapsed() < COMMIT_FAILURE_REPORT => at,
                _ => {
                    log::error!(
                        "FT: committing epoch {epoch}: {error}; the backup keeps its copy, retrying"
                    );
                    Instant::now()
                }
            };
            let since = failure.as_ref().map_or_else(Instant::now, |f| f.since);
            *failure = Some(CommitFailure {
                since,
                reported,
                error,
                no_space,
            });
            drop(failure);
            let _ = shared.wake.write(1);
        }
    }
}

/// How long output waits if the epoch is cut after `ran` of guest time: what the sender still
/// has of the previous epoch (handed over when this one began; `sending`: not done yet), then
/// this epoch's pages. Both come from the last epoch's send time (`send_us`, after
/// `last_ran_us` of guest time; 0: not known), this epoch's scaled by its run time, the guest
/// dirtying pages at about the same rate: an epoch cut early is judged by the pages it would
/// have, not by a whole epoch's.
fn output_wait_if_cut(send_us: u64, last_ran_us: u64, ran: Duration, sending: bool) -> Duration {
    let send = Duration::from_micros(send_us);
    let previous = if sending {
        send.saturating_sub(ran)
    } else {
        Duration::ZERO
    };
    let this = if last_ran_us == 0 {
        send
    } else {
        let scaled = u128::from(send_us)
            .checked_mul(ran.as_micros())
            .map_or(u128::MAX, |product| product / u128::from(last_ran_us));
        Duration::from_micros(u64::try_from(scaled).unwrap_or(u64::MAX))
    };
    previous.saturating_add(this)
}

impl Primary {
    /// See [`PrimaryFt::next_checkpoint`].
    pub fn next_checkpoint(&self) -> Option<Duration> {
        self.early.disarm();
        if self.health == FtHealth::Degraded && self.shared.lease.is_some() {
            // Unprotected on etcd: the lease is watched so that this copy stops before the
            // server can expire it.
            return Some(LEASE_WATCH);
        }
        if self.health != FtHealth::Protected {
            // Unprotected with writes that could not leave: the timer retries them.
            return (self.stranded_writes() > 0).then_some(STRANDED_RETRY);
        }
        // A group's coordinator decides when its members checkpoint; a member still stages
        // early, three quarters of the group's epoch after its last cut.
        if self.shared.group.is_some() {
            return self
                .early
                .due_in(self.epoch_len, self.epoch_started.elapsed(), MIN_TIMER);
        }
        if self.waiting_for_sender {
            return Some(MIN_CUT_EPOCH);
        }
        // Epochs are measured from one checkpoint's start to the next, so the pause does not
        // lengthen them.
        let mut len = self.next_len;
        if self.latency_mode && self.shared.output_waiting.load(Ordering::SeqCst) {
            // Output waits: end the epoch as soon as allowed, unless the output would still
            // wait long for the sender (then a shorter epoch would not bring it out sooner).
            let cut_at = self.epoch_started.elapsed().max(MIN_CUT_EPOCH);
            if self.output_wait_if_cut(cut_at) <= self.epoch_len / 4 && MIN_CUT_EPOCH < len {
                len = MIN_CUT_EPOCH;
                self.shared.cut_for_output.store(true, Ordering::SeqCst);
            }
        }
        let ran = self.epoch_started.elapsed();
        // An epoch ended early for waiting output is cut at once: staging early would only
        // delay it.
        if len == self.next_len {
            if let Some(due) = self.early.due_in(len, ran, MIN_TIMER) {
                return Some(due);
            }
        }
        Some(len.saturating_sub(ran).max(MIN_TIMER))
    }

    fn output_wait_if_cut(&self, ran: Duration) -> Duration {
        output_wait_if_cut(
            self.shared.last_send_us.load(Ordering::Relaxed),
            self.shared.last_ran_us.load(Ordering::Relaxed),
            ran,
            self.shared.staging_busy.load(Ordering::SeqCst),
        )
    }

    /// See [`PrimaryFt::checkpoint`].
    pub fn checkpoint(&mut self, vm: &mut dyn ReplicableVm) -> Result<(), String> {
        if self.shared.lease_lapsed() {
            // `poll` fences.
            let _ = self.shared.wake.write(1);
            return Ok(());
        }
        if self.health == FtHealth::Degraded {
            self.drain_stranded();
            return Ok(());
        }
        if self.health != FtHealth::Protected || self.lost() {
            return Ok(());
        }
        if self.early.timer_fired() {
            let busy = self.shared.staging_busy.load(Ordering::SeqCst);
            let kept = self.hot.kept();
            self.early
                .stage(vm, &self.staging, kept, &mut self.stager, busy)?;
            if self.early_send {
                self.send_early();
            }
            return Ok(());
        }
        if self.shared.group.is_some() {
            // Its cuts come from the coordinator (`poll`).
            return Ok(());
        }
        let busy = self.shared.staging_busy.load(Ordering::SeqCst);
        self.waiting_for_sender = busy && self.epoch_started.elapsed() < self.epoch_len * 2;
        if self.waiting_for_sender {
            // The previous epoch is still on the wire: this one runs on a little.
            return Ok(());
        }
        // Latency mode ends this epoch before its time because output waits.
        let for_output = self.shared.cut_for_output.swap(false, Ordering::SeqCst)
            && self.epoch_started.elapsed() + MIN_TIMER < self.next_len;
        let ran = self.epoch_started.elapsed();
        self.epoch_started = Instant::now();
        // Output from here on belongs to the next epoch (the NIC gates say so again).
        self.shared.output_waiting.store(false, Ordering::SeqCst);
        let Some(mut job) = self.cut(vm, &Cut::Own, true)? else {
            return Ok(());
        };
        job.ran = ran;
        self.epochs_cut_for_output += u64::from(for_output);
        // Bounded latency: when sending an epoch takes longer than running one, output waits
        // for both, so shorten the next epoch in proportion (fewer pages to send).
        let send = Duration::from_micros(self.shared.last_send_us.load(Ordering::Relaxed));
        self.next_len = if send > self.epoch_len {
            self.epochs_cut_early += 1;
            let scaled =
                self.epoch_len.as_secs_f64() * self.epoch_len.as_secs_f64() / send.as_secs_f64();
            Duration::from_secs_f64(scaled).max(MIN_CUT_EPOCH)
        } else {
            self.epoch_len
        };
        self.hand_over(job);
        Ok(())
    }

    /// See [`PrimaryFt::poll`].
    pub fn poll(&mut self, vm: &mut dyn ReplicableVm, running: bool) -> PrimaryEvent {
        self.pauses.settle(vm.last_stop(), false);
        if matches!(self.health, FtHealth::Protected | FtHealth::Degraded)
            && self.shared.lease_lapsed()
        {
            // etcd may give the pair to the backup once the lease expires: stop first.
            let reason = "the etcd lease of the pair is no longer provably alive (etcd \
                          unreachable or too slow)"
                .to_string();
            log::error!("FT: {reason}; fencing this primary");
            self.close(None);
            for gate in self.shared.gates.all() {
                gate.discard_uncommitted();
            }
            self.health = FtHealth::Fenced;
            self.last_error = Some(reason.clone());
            return PrimaryEvent::Fenced(reason);
        }
        if let Some(reason) = self.commit_failing_too_long() {
            // Hand the VM to the backup, which holds every write not yet on the image and
            // re-issues them from its host (Cuju's disk I/O retry).
            log::error!("FT: {reason}; fencing this primary so that the backup takes over");
            return self.fail_with_group(reason);
        }
        while self.health == FtHealth::Protected {
            let Some(order) = self.next_group_order() else {
                break;
            };
            match order {
                GroupOrder::Cut { epoch, barrier } => {
                    if self.lost() {
                        // Handled below: the group learns it from this member.
                        break;
                    }
                    if let Err(e) = self.group_checkpoint(vm, epoch, barrier, running) {
                        match self.group_end_after(e, GROUP_ORDER_GRACE) {
                            GroupEnd::Fail(reason) => return self.fail_with_group(reason),
                            GroupEnd::Degrade(reason) => self.degrade_with_group(reason),
                        }
                    }
                }
                GroupOrder::Fail(reason) => return self.fail_with_group(reason),
                GroupOrder::Degrade(reason) => self.degrade_with_group(reason),
            }
        }
        let reason = self
            .shared
            .lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(reason) = reason else {
            return PrimaryEvent::Continue;
        };
        if self.health != FtHealth::Protected {
            return PrimaryEvent::Continue;
        }
        self.last_error = Some(reason.clone());
        let last = self.shared.last_acked.load(Ordering::SeqCst);
        match self.fencing.claim(
            self.pair_id,
            fence::Role::Primary,
            last,
            self.shared.lease.as_ref(),
        ) {
            Ok(_) => {
                // Told, a backup that is alive after all (a false detection) stands down
                // instead of taking over when the connection closes.
                self.close(Some(Job::StandDown {
                    guest_shutdown: false,
                    reprotect: false,
                    reason: format!("the primary gave up on its backup ({reason})"),
                }));
                if let Some(group) = &self.shared.group {
                    // The whole group runs on unprotected.
                    let degrade = PrimaryMsg::Degrade {
                        reason: reason.clone(),
                    };
                    if let Err(e) = group.member.send(&degrade) {
                        log::warn!("FT group: {e}");
                    }
                    self.shared.gates.group_peers.set(Vec::new());
                }
                // A dead backup never stops the primary: everything held goes out now.
                for gate in self.shared.gates.all() {
                    if let Err(e) = gate.passthrough() {
                        log::error!("FT: releasing held output: {e}");
                    }
                }
                self.health = FtHealth::Degraded;
                log::warn!("FT: running unprotected ({reason})");
                PrimaryEvent::Continue
            }
            Err(fenced) => {
                self.close(None);
                for gate in self.shared.gates.all() {
                    gate.discard_uncommitted();
                }
                self.health = FtHealth::Fenced;
                PrimaryEvent::Fenced(format!("{reason}; {fenced}"))
            }
        }
    }

    pub fn status(&self) -> FtStatus {
        self.status_now()
    }

    /// See [`PrimaryFt::stop`].
    /// Err(why) when this side may not release its held output (the backup may own the VM):
    /// the held output is discarded and the caller must stop the VM.
    pub fn stop(
        mut self,
        vm: Option<&mut dyn ReplicableVm>,
        reason: StopReason,
    ) -> Result<(), String> {
        let job = match reason {
            StopReason::Disabled => Job::StandDown {
                guest_shutdown: false,
                reprotect: false,
                reason: "protection disabled on the primary".into(),
            },
            StopReason::GuestShutdown => Job::StandDown {
                guest_shutdown: true,
                reprotect: false,
                reason: "the guest powered off".into(),
            },
            StopReason::VmGone => Job::StandDown {
                guest_shutdown: false,
                reprotect: false,
                reason: "the primary's VM was stopped".into(),
            },
            StopReason::Reset => Job::StandDown {
                guest_shutdown: false,
                reprotect: true,
                reason: "the guest reset; the primary protects the rebooted VM again".into(),
            },
        };
        let was_protected = self.health == FtHealth::Protected;
        if let Some(group) = &self.shared.group {
            group.member.leave(&format!("{reason:?}"));
            self.shared.gates.group_peers.set(Vec::new());
        }
        self.shared
            .standing_down
            .store(was_protected, Ordering::SeqCst);
        self.close(Some(job));
        let outcome = match self.health {
            FtHealth::Fenced => Err(self
                .last_error
                .clone()
                .unwrap_or_else(|| "this primary was fenced".to_string())),
            // A backup that timed out before the StandDown reached it may be taking over
            // right now: held output (epochs it never acknowledged) must not reach a shared
            // image it is about to write, so the fencing decides, as at a link loss.
            FtHealth::Protected if !self.shared.stood_down.load(Ordering::SeqCst) => self
                .fence_for_stop()
                .map_err(|fenced| format!("the backup did not confirm it stood down and {fenced}")),
            // It stood down, or protection had already ended with this side going on alone.
            _ => Ok(()),
        };
        match &outcome {
            Ok(()) => {
                for gate in self.shared.gates.all() {
                    if let Err(e) = gate.passthrough() {
                        log::error!("FT: releasing held output: {e}");
                    }
                }
            }
            Err(reason) => {
                log::error!("FT: {reason}; this primary's held output is discarded");
                for gate in self.shared.gates.all() {
                    gate.discard_uncommitted();
                }
                self.health = FtHealth::Fenced;
            }
        }
        if let Some(vm) = vm {
            // Pages kept writable are re-armed first: nothing later may miss a write.
            if let Err(e) = vm.set_manual_rearm(false) {
                log::warn!("FT: switching manual dirty-log re-arming off: {e}");
            }
            if let Err(e) = vm.set_dirty_logging(false) {
                log::warn!("FT: switching dirty logging off: {e}");
            }
        }
        if was_protected {
            log::info!(
                "FT: protection ended ({reason:?}); hot pages: {}",
                self.hot.summary()
            );
        }
        outcome
    }

    /// Protection ends without the backup's word: this side may release held output only
    /// once the fencing proves the backup cannot take over.
    fn fence_for_stop(&self) -> Result<(), String> {
        let last = self.shared.last_acked.load(Ordering::SeqCst);
        self.fencing
            .claim(
                self.pair_id,
                fence::Role::Primary,
                last,
                self.shared.lease.as_ref(),
            )
            .map_err(|e| format!("the fencing refuses this primary: {e}"))?;
        if let Some(window) = self.fencing.stop_lease_window(self.heartbeat_timeout) {
            // On etcd a backup takes over once the lease expires: it stays alive for as
            // long as a backup that timed out may still be waiting to claim the pair.
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("ft-lease-linger".into())
                .spawn(move || {
                    std::thread::sleep(window);
                    drop(shared);
                });
            if let Err(e) = spawned {
                return Err(format!("keeping the etcd lease alive: {e}"));
            }
        }
        Ok(())
    }
}

impl PrimaryFt for Primary {
    fn next_checkpoint(&self) -> Option<Duration> {
        Primary::next_checkpoint(self)
    }

    fn checkpoint(&mut self, vm: &mut Vm) -> Result<(), String> {
        Primary::checkpoint(self, vm)
    }

    fn poll(&mut self, vm: &mut Vm, running: bool) -> PrimaryEvent {
        Primary::poll(self, vm, running)
    }

    fn status(&self) -> FtStatus {
        self.status_now()
    }

    fn stop(self: Box<Self>, vm: Option<&mut Vm>, reason: StopReason) -> Result<(), String> {
        Primary::stop(*self, vm.map(|vm| vm as &mut dyn ReplicableVm), reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Latency mode judges an early cut by the pages it would send and by what the sender
    /// still has of the previous epoch: a whole epoch that took longer than a quarter epoch to
    /// send does not stop a cut after a tenth of one, a sender busy for most of the epoch does.
    #[test]
    fn an_early_cut_is_judged_by_the_wait_it_would_leave() {
        let ms = Duration::from_millis;
        let quarter = ms(10) / 4;
        // 250 pages in 10 ms took 2.6 ms to send: cut after 1 ms, about 0.26 ms.
        assert_eq!(
            output_wait_if_cut(2_600, 10_000, ms(1), false),
            Duration::from_micros(260)
        );
        // ... after 1.6 ms more of the previous epoch if it is still on the wire.
        assert_eq!(
            output_wait_if_cut(2_600, 10_000, ms(1), true),
            Duration::from_micros(1_600 + 260)
        );
        assert!(output_wait_if_cut(2_600, 10_000, ms(1), true) <= quarter);
        // Cut late, the estimate is a whole epoch's again.
        assert!(output_wait_if_cut(2_600, 10_000, ms(10), false) > quarter);
        // 1000 pages took 6 ms: the sender is busy for most of the epoch, and once it is
        // done, the pages dirtied meanwhile take long too.
        for ran in [1, 2, 3, 4, 5] {
            assert!(
                output_wait_if_cut(6_000, 10_000, ms(ran), true) > quarter,
                "{ran}"
            );
        }
        assert!(output_wait_if_cut(6_000, 10_000, ms(6), false) > quarter);
        // A sender slower than the guest: even a short epoch takes long.
        assert!(output_wait_if_cut(30_000, 10_000, ms(1), false) > quarter);
        // Nothing known about the run: the send time as it was.
        assert_eq!(
            output_wait_if_cut(2_600, 0, ms(1), false),
            Duration::from_micros(2_600)
        );
        // No overflow, whatever the numbers.
        assert_eq!(
            output_wait_if_cut(u64::MAX, 1, Duration::MAX, true),
            Duration::from_micros(u64::MAX)
        );
        assert_eq!(
            output_wait_if_cut(u64::MAX, 0, ms(1), true),
            Duration::from_micros(u64::MAX).saturating_add(Duration::from_micros(u64::MAX) - ms(1))
        );
    }

    #[test]
    fn commit_delays_count_each_acknowledged_epoch_once() {
        let mut t = EpochTimings::default();
        let ms = |n: u64| n * 1_000_000;
        t.ended(7, ms(100));
        t.ended(8, ms(110));
        t.ended(9, ms(120));
        // An Ack for 8 commits 7 too (acks are cumulative): only 8 has a known delay.
        t.committed(8, ms(113));
        assert_eq!(t.commit.percentile_us(50.0), 3_000);
        assert_eq!(t.in_flight.len(), 1);
        t.committed(9, ms(125));
        assert_eq!(t.commit.percentile_us(99.0), 5_000);
        assert!(t.in_flight.is_empty());
        // A repeated or stale commit times nothing.
        t.committed(9, ms(500));
        assert_eq!(t.commit.max_us(), 5_000);
        for epoch in 0..TIMED_IN_FLIGHT as u64 + 10 {
            t.ended(epoch + 10, 0);
        }
        assert_eq!(t.in_flight.len(), TIMED_IN_FLIGHT);
    }

    #[test]
    fn many_input_wake_ups_leave_room_for_the_epoch() {
        let (jobs, rx) = mpsc::sync_channel::<Job>(3);
        let queued = Arc::new(AtomicBool::new(false));
        let wake = InputWake {
            jobs: jobs.clone(),
            queued: queued.clone(),
        };
        let sender_side = InputTaken(queued);
        // The log empties and fills again between every page frame of a long epoch.
        for _ in 0..10 {
            wake.notify();
        }
        assert!(jobs.try_send(Job::Input).is_ok(), "no room for the epoch");
        assert!(matches!(rx.try_recv(), Ok(Job::Input)));
        assert!(matches!(rx.try_recv(), Ok(Job::Input)));
        assert!(rx.try_recv().is_err());
        // Taken: the next frame asks again.
        sender_side.taken();
        wake.notify();
        assert!(matches!(rx.try_recv(), Ok(Job::Input)));
        // With the log's wake-up and the primary's sender gone, the sender thread sees the
        // channel close (it holds no sender of its own).
        drop((wake, jobs));
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(1)),
            Err(RecvTimeoutError::Disconnected)
        ));
    }

    fn request(json: serde_json::Value) -> EnableFtRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn encode_threads_beyond_the_limit_are_refused_by_name() {
        let ok = request(serde_json::json!({"peer": "b:1", "encode_threads": 16}));
        assert!(validate(&ok).is_ok());
        let zero = request(serde_json::json!({"peer": "b:1", "encode_threads": 0}));
        assert!(validate(&zero).is_ok());
        let over = request(serde_json::json!({"peer": "b:1", "encode_threads": 17}));
        let err = validate(&over).unwrap_err().to_string();
        assert!(err.contains("encode_threads 17 is outside 0..=16"), "{err}");
    }

    #[test]
    fn streams_outside_the_limit_or_beside_encoder_threads_are_refused() {
        for ok in [
            serde_json::json!({"peer": "b:1", "streams": 1, "encode_threads": 2}),
            serde_json::json!({"peer": "b:1", "streams": 8}),
            serde_json::json!({"peer": "b:1", "streams": 3, "encode_threads": 0}),
        ] {
            assert!(validate(&request(ok.clone())).is_ok(), "{ok}");
        }
        for (bad, why) in [
            (
                serde_json::json!({"peer": "b:1", "streams": 0}),
                "streams 0 is outside 1..=8",
            ),
            (
                serde_json::json!({"peer": "b:1", "streams": 9}),
                "streams 9 is outside 1..=8",
            ),
            (
                serde_json::json!({"peer": "b:1", "streams": 2, "encode_threads": 1}),
                "ask for one or the other",
            ),
        ] {
            let err = validate(&request(bad)).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn the_default_leaves_a_core_per_vcpu_and_one_for_the_sender() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(default_encode_threads(1), cores.saturating_sub(2).min(4));
        assert_eq!(default_encode_threads(u8::MAX), 0);
    }
}
