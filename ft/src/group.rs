//! FT groups (fate sharing, after Cuju): VMs that talk to each other are protected as one.
//!
//! A group is named by a Unix socket path on each side: the primaries of the members (on one
//! host) meet at one path, their backups (on the other host) at another. The first member to
//! arrive on a side binds the path and runs that side's coordinator thread in its VMM; every
//! member, that one included, talks to the coordinator over the socket (one JSON object per
//! line).
//!
//! Primary side ([`PrimaryCoordinator`]):
//! - the coordinator cuts group epoch `g` on its own timer, once every member has sent `g-1`
//!   (as a single pair runs an epoch on while the previous one is still being sent): every
//!   protected member pauses and
//!   says so, and only when all have paused may any resume. No member runs epoch `g+1` while
//!   another still runs `g`, so a frame one member sends another after its cut cannot reach a
//!   member before that one's cut: the members' checkpoints form a consistent cut, and frames
//!   between members need not be held (the NIC gates pass them, see `GroupPeers`);
//! - a member reports `g` acknowledged when its backup holds it; once every member has, the
//!   coordinator commits `g` and each member releases `g`'s output to the outside;
//! - a member whose primary is lost (its connection closes without a goodbye) fails the whole
//!   group: every primary fences itself and every backup takes over;
//! - a member that lost its backup (and may go on, says the witness) degrades the whole group:
//!   every member runs on unprotected and tells its backup to stand down. So does the end of
//!   the member that created the group (its VMM hosts the coordinator).
//!
//! Backup side ([`BackupCoordinator`]): a backup keeps complete epochs beyond the group's
//! commit point aside instead of applying them. When its primary is lost it reports the
//! newest group epoch it holds; the coordinator waits for every member (freezing those whose
//! primaries still send, after a grace period), and all resume from the oldest of the reported
//! epochs. Every member holds that epoch: the group committed nothing newer than it, and a
//! member acknowledges an epoch only when it holds it completely.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The longest message line.
const MAX_LINE: usize = 64 * 1024;
/// How long a member waits for the coordinator's answer to its Join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A write to a peer on the group socket taking longer than this means the peer is stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the acceptor checks whether the coordinator has ended.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// At most this many group epochs are cut but not yet committed: the pipeline of a single
/// pair (one epoch on the wire, one running) with one epoch of slack for the slowest member.
const PIPELINE_DEPTH: u64 = 3;

/// Primary side, both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PrimaryMsg {
    /// member -> coordinator, first: its NICs' MAC addresses.
    Join { macs: Vec<[u8; 6]> },
    /// coordinator -> member: the group's identity (the witness pair id of every member) and
    /// timing.
    Welcome {
        group_id: u64,
        epoch_ms: u64,
        heartbeat_timeout_ms: u64,
    },
    /// member: the initial synchronisation is done; cut me from now on.
    Ready,
    /// coordinator: the MACs of the protected members and how many there are.
    Peers { macs: Vec<[u8; 6]>, members: u64 },
    /// coordinator: end group epoch `epoch` now. With `barrier`, say Paused and wait for
    /// Resume; without (the only member protected), run on at once.
    Cut { epoch: u64, barrier: bool },
    /// member: paused for the cut of `epoch`.
    Paused { epoch: u64 },
    /// coordinator: every member has paused; run on.
    Resume { epoch: u64 },
    /// member: `epoch` is sent (its staging memory is free for the next cut); sending it
    /// took `send_us`.
    Sent { epoch: u64, send_us: u64 },
    /// member: my backup holds `epoch`.
    Acked { epoch: u64 },
    /// coordinator: every member's backup holds `epoch`: release its output.
    Commit { epoch: u64 },
    /// member: protection ends here on purpose (the group goes on without it).
    Leave,
    /// member -> coordinator -> all: a backup is gone; the group runs on unprotected.
    Degrade { reason: String },
    /// coordinator -> all: a member's primary failed; every primary stops.
    Fail { reason: String },
}

/// Backup side, both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BackupMsg {
    /// member -> coordinator, first.
    Join,
    /// member: my primary is gone; the newest group epoch I hold completely (None: none yet).
    /// `grace_ms`: how long the others' primaries may take to be found gone.
    Lost { latest: Option<u64>, grace_ms: u64 },
    /// coordinator: stop receiving from your primary and report (another member's was lost).
    Freeze,
    /// coordinator -> all: resume from group epoch `epoch` (None: no epoch every member holds).
    TakeOver { epoch: Option<u64> },
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("group socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("group {path}: {message}")]
    Protocol { path: String, message: String },
}

/// Writes one message line.
fn send_line<T: Serialize>(stream: &mut UnixStream, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// Reads message lines from a group socket, refusing over-long and malformed ones.
struct LineReader {
    reader: BufReader<UnixStream>,
    line: Vec<u8>,
}

impl LineReader {
    fn new(stream: UnixStream) -> Self {
        Self {
            reader: BufReader::new(stream),
            line: Vec::new(),
        }
    }

    /// The next message; Err when the peer closed, went silent past the read timeout, or sent
    /// something that is not a message.
    fn next<T: DeserializeOwned>(&mut self) -> Result<T, String> {
        self.line.clear();
        let mut limited = (&mut self.reader).take(MAX_LINE as u64 + 1);
        match limited.read_until(b'\n', &mut self.line) {
            Ok(0) => return Err("closed".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
        if self.line.last() != Some(&b'\n') {
            return Err(if self.line.len() > MAX_LINE {
                "a message longer than the limit".into()
            } else {
                "closed in the middle of a message".into()
            });
        }
        serde_json::from_slice(&self.line).map_err(|e| format!("malformed message: {e}"))
    }
}

/// Connects to the coordinator at `path`, or becomes it: binds the path (removing a socket
/// file nobody listens on) and returns the listener as well.
fn connect_or_bind(path: &Path) -> Result<(UnixStream, Option<UnixListener>), GroupError> {
    let socket_err = |source| GroupError::Socket {
        path: path.display().to_string(),
        source,
    };
    for _ in 0..3 {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok((stream, None)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                // A coordinator that ended without cleaning up (its VMM was killed); anything
                // but a socket at the path is the operator's and stays.
                let is_socket = std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
                if !is_socket {
                    return Err(GroupError::Protocol {
                        path: path.display().to_string(),
                        message: "the path exists and is not a socket".into(),
                    });
                }
                let _ = std::fs::remove_file(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(socket_err(e)),
        }
        // 0600: only this user's VMMs may join (`Hub::start` also checks each peer's uid).
        match vmm::unix_socket::bind_owner_only(path) {
            Ok(listener) => {
                let stream = UnixStream::connect(path).map_err(socket_err)?;
                return Ok((stream, Some(listener)));
            }
            // Another member bound it first: connect to that one.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(socket_err(e)),
        }
    }
    Err(GroupError::Protocol {
        path: path.display().to_string(),
        message: "neither a coordinator to join nor a path to create one at".into(),
    })
}

/// The effective uid of the process at the other end of `stream`, as the kernel recorded it
/// when the connection was made (`SO_PEERCRED`).
fn peer_uid(stream: &UnixStream) -> std::io::Result<libc::uid_t> {
    // SAFETY: an all-zero `ucred` is a valid value of this plain C struct.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own; the descriptor
    // is borrowed from a live stream.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// What a coordinator's connection threads report.
enum Event<M> {
    Connected(UnixStream),
    Message(usize, M),
    Gone(usize, String),
}

/// The acceptor and per-connection reader threads every coordinator uses.
struct Hub<M> {
    events: Receiver<Event<M>>,
    tx: Sender<Event<M>>,
    writers: BTreeMap<usize, UnixStream>,
    next_id: usize,
    stop: Arc<AtomicBool>,
    path: PathBuf,
}

impl<M: DeserializeOwned + Send + 'static> Hub<M> {
    fn start(
        listener: UnixListener,
        path: PathBuf,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let (tx, events) = mpsc::channel();
        listener.set_nonblocking(true)?;
        let accept_tx = tx.clone();
        let accept_stop = stop.clone();
        std::thread::Builder::new()
            .name("ft-group-accept".into())
            .spawn(move || {
                if !vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    return;
                }
                // SAFETY: geteuid only reads the process's credentials.
                let own_uid = unsafe { libc::geteuid() };
                while !accept_stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            // A member of the group can make every VM in it cut, fail or
                            // freeze: only processes of the same user may take part, even if
                            // the socket's mode was loosened.
                            match peer_uid(&stream) {
                                Ok(uid) if uid == own_uid => {}
                                Ok(uid) => {
                                    log::warn!(
                                        "FT group: refusing a connection from uid {uid} \
                                         (this VMM runs as uid {own_uid})"
                                    );
                                    continue;
                                }
                                Err(e) => {
                                    log::warn!("FT group: refusing a connection: SO_PEERCRED: {e}");
                                    continue;
                                }
                            }
                            if stream.set_nonblocking(false).is_ok()
                                && accept_tx.send(Event::Connected(stream)).is_err()
                            {
                                return;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(ACCEPT_POLL)
                        }
                        Err(e) => {
                            log::error!("FT group: accepting a member: {e}");
                            return;
                        }
                    }
                }
            })?;
        Ok(Self {
            events,
            tx,
            writers: BTreeMap::new(),
            next_id: 0,
            stop,
            path,
        })
    }

    /// Registers a new connection; its messages arrive as events under the returned id.
    fn add(&mut self, stream: UnixStream) -> Option<usize> {
        let id = self.next_id;
        self.next_id += 1;
        let reader = stream.try_clone().ok()?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT)).ok()?;
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("ft-group-rx".into())
            .spawn(move || {
                if !vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    return;
                }
                let mut lines = LineReader::new(reader);
                loop {
                    match lines.next::<M>() {
                        Ok(msg) => {
                            if tx.send(Event::Message(id, msg)).is_err() {
                                return;
                            }
                        }
                        Err(why) => {
                            let _ = tx.send(Event::Gone(id, why));
                            return;
                        }
                    }
                }
            });
        if spawned.is_err() {
            return None;
        }
        self.writers.insert(id, stream);
        Some(id)
    }

    fn send<T: Serialize>(&mut self, id: usize, msg: &T) {
        if let Some(stream) = self.writers.get_mut(&id) {
            if let Err(e) = send_line(stream, msg) {
                // The reader side reports the member gone.
                log::warn!("FT group: writing to member {id}: {e}");
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn send_all<T: Serialize>(&mut self, ids: impl IntoIterator<Item = usize>, msg: &T) {
        for id in ids {
            self.send(id, msg);
        }
    }

    fn remove(&mut self, id: usize) {
        if let Some(stream) = self.writers.remove(&id) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// No new members: the acceptor stops and the path is removed (so that the next member
    /// to arrive creates a new group).
    fn close_door(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
    }

    /// Ends the group: no new members, every connection closed.
    fn dissolve(&mut self) {
        self.close_door();
        for (_, stream) in std::mem::take(&mut self.writers) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Primary side.

/// The group's timing, fixed by the member that creates it.
#[derive(Clone, Copy, Debug)]
pub struct GroupTiming {
    pub epoch: Duration,
    pub heartbeat_timeout: Duration,
}

/// The primary side's coordinator, running in the VMM of the member that created the group.
pub struct PrimaryCoordinator {
    stop: Arc<AtomicBool>,
    /// Why the group ends when this VMM's member leaves (sent to the others as Degrade).
    farewell: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl PrimaryCoordinator {
    fn start(
        listener: UnixListener,
        path: &Path,
        group_id: u64,
        timing: GroupTiming,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let farewell = Arc::new(Mutex::new(None));
        let hub = Hub::start(listener, path.to_path_buf(), stop.clone())?;
        let f = farewell.clone();
        let thread = std::thread::Builder::new()
            .name("ft-group".into())
            .spawn(move || {
                if !vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    return;
                }
                let mut coordinator = Coordinator {
                    hub,
                    group_id,
                    timing,
                    members: BTreeMap::new(),
                    last_cut: 0,
                    committed: 0,
                    cut: None,
                    next_tick: Instant::now() + timing.epoch,
                    slowest_send: Duration::ZERO,
                    farewell: f,
                };
                coordinator.run();
            })?;
        Ok(Self {
            stop,
            farewell,
            thread: Some(thread),
        })
    }

    /// Ends the group (the other members run on unprotected, told `reason`).
    fn end(mut self, reason: &str) {
        *self.farewell.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct MemberState {
    ready: bool,
    macs: Vec<[u8; 6]>,
    /// Newest group epoch its backup holds (for a member that joined late: the last epoch cut
    /// before it was ready, which it need not hold).
    acked: u64,
    /// Newest group epoch it has sent (same convention).
    sent: u64,
}

struct Cutting {
    epoch: u64,
    waiting: BTreeSet<usize>,
    participants: Vec<usize>,
    /// Epochs count from one cut's start to the next (pauses do not lengthen them).
    started: Instant,
    deadline: Instant,
}

struct Coordinator {
    hub: Hub<PrimaryMsg>,
    group_id: u64,
    timing: GroupTiming,
    members: BTreeMap<usize, MemberState>,
    last_cut: u64,
    committed: u64,
    cut: Option<Cutting>,
    next_tick: Instant,
    slowest_send: Duration,
    farewell: Arc<Mutex<Option<String>>>,
}

/// The shortest group epoch bounded-latency execution cuts to.
const MIN_GROUP_EPOCH: Duration = Duration::from_millis(1);

impl Coordinator {
    fn ready_ids(&self) -> Vec<usize> {
        self.members
            .iter()
            .filter(|(_, m)| m.ready)
            .map(|(id, _)| *id)
            .collect()
    }

    fn run(&mut self) {
        loop {
            if self.hub.stop.load(Ordering::SeqCst) {
                let reason = self
                    .farewell
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_else(|| "the group was dissolved".into());
                self.hub.close_door();
                let all: Vec<usize> = self.members.keys().copied().collect();
                self.hub.send_all(all, &PrimaryMsg::Degrade { reason });
                self.hub.dissolve();
                return;
            }
            let now = Instant::now();
            let wake_at = match &self.cut {
                Some(cut) => cut.deadline,
                None if self.can_cut() => self.next_tick,
                None => now + Duration::from_millis(50),
            };
            let wait = wake_at
                .saturating_duration_since(now)
                .min(Duration::from_millis(50));
            match self.hub.events.recv_timeout(wait) {
                Ok(event) => {
                    if let Some(end) = self.handle(event) {
                        self.finish(end);
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            if let Some(cut) = &self.cut {
                if now >= cut.deadline {
                    let late: Vec<String> = cut.waiting.iter().map(|id| id.to_string()).collect();
                    self.finish(PrimaryMsg::Fail {
                        reason: format!(
                            "group member(s) {} did not pause for group epoch {} within {:?}",
                            late.join(", "),
                            cut.epoch,
                            self.cut_timeout()
                        ),
                    });
                    return;
                }
            } else if self.can_cut() && now >= self.next_tick {
                self.start_cut();
            }
        }
    }

    fn cut_timeout(&self) -> Duration {
        // A member may first wait a heartbeat timeout for its sender (an overdue cut).
        self.timing.heartbeat_timeout * 2 + Duration::from_millis(500)
    }

    /// Whether the next cut may start: every member has sent the last epoch (so its
    /// staging memory is free), or the epoch has run twice its length (then the members
    /// wait for their senders with the guest paused: bounded latency, as for one VM).
    fn can_cut(&self) -> bool {
        let ready = || self.members.values().filter(|m| m.ready);
        let all_sent = ready().all(|m| m.sent >= self.last_cut);
        let overdue = Instant::now() >= self.next_tick + self.timing.epoch;
        ready().next().is_some()
            && (all_sent || overdue)
            && self.last_cut.saturating_sub(self.committed) < PIPELINE_DEPTH
    }

    fn start_cut(&mut self) {
        self.last_cut += 1;
        let participants = self.ready_ids();
        let epoch = self.last_cut;
        let barrier = participants.len() > 1;
        log::trace!("FT group: cutting group epoch {epoch} of {participants:?}");
        self.hub.send_all(
            participants.iter().copied(),
            &PrimaryMsg::Cut { epoch, barrier },
        );
        if !barrier {
            // Nobody to wait for: the member resumes by itself.
            self.next_tick = Instant::now() + self.next_epoch_len();
            return;
        }
        self.cut = Some(Cutting {
            epoch,
            waiting: participants.iter().copied().collect(),
            participants,
            started: Instant::now(),
            deadline: Instant::now() + self.cut_timeout(),
        });
    }

    /// Handles one event; Some(message) ends the group with that message to every member.
    fn handle(&mut self, event: Event<PrimaryMsg>) -> Option<PrimaryMsg> {
        match event {
            Event::Connected(stream) => {
                if let Some(id) = self.hub.add(stream) {
                    self.members.insert(
                        id,
                        MemberState {
                            ready: false,
                            macs: Vec::new(),
                            acked: 0,
                            sent: 0,
                        },
                    );
                }
            }
            Event::Gone(id, why) => {
                let was_ready = self.members.remove(&id).is_some_and(|m| m.ready);
                self.hub.remove(id);
                if was_ready {
                    return Some(PrimaryMsg::Fail {
                        reason: format!("group member {id}'s primary was lost ({why})"),
                    });
                }
                self.forget_in_cut(id);
            }
            Event::Message(id, msg) => return self.handle_message(id, msg),
        }
        None
    }

    fn handle_message(&mut self, id: usize, msg: PrimaryMsg) -> Option<PrimaryMsg> {
        log::trace!("FT group: member {id}: {msg:?}");
        match msg {
            PrimaryMsg::Join { macs } => {
                if let Some(member) = self.members.get_mut(&id) {
                    member.macs = macs;
                }
                let welcome = PrimaryMsg::Welcome {
                    group_id: self.group_id,
                    epoch_ms: self.timing.epoch.as_millis() as u64,
                    heartbeat_timeout_ms: self.timing.heartbeat_timeout.as_millis() as u64,
                };
                self.hub.send(id, &welcome);
            }
            PrimaryMsg::Ready => {
                let last_cut = self.last_cut;
                if let Some(member) = self.members.get_mut(&id) {
                    member.ready = true;
                    member.acked = last_cut;
                    member.sent = last_cut;
                }
                log::info!("FT group: member {id} protected");
                self.announce_peers();
            }
            PrimaryMsg::Paused { epoch } => {
                let done = match &mut self.cut {
                    Some(cut) if cut.epoch == epoch => {
                        cut.waiting.remove(&id);
                        cut.waiting.is_empty()
                    }
                    _ => false,
                };
                if done {
                    self.finish_cut();
                }
            }
            PrimaryMsg::Sent { epoch, send_us } => {
                if let Some(member) = self.members.get_mut(&id) {
                    member.sent = member.sent.max(epoch);
                }
                self.slowest_send = self.slowest_send.max(Duration::from_micros(send_us));
            }
            PrimaryMsg::Acked { epoch } => {
                if let Some(member) = self.members.get_mut(&id) {
                    member.acked = member.acked.max(epoch);
                }
                self.try_commit();
            }
            PrimaryMsg::Leave => {
                self.members.remove(&id);
                self.hub.remove(id);
                self.forget_in_cut(id);
                self.announce_peers();
                self.try_commit();
            }
            PrimaryMsg::Degrade { reason } => return Some(PrimaryMsg::Degrade { reason }),
            other => {
                log::warn!("FT group: member {id} sent {other:?}; dropping it");
                let was_ready = self.members.remove(&id).is_some_and(|m| m.ready);
                self.hub.remove(id);
                if was_ready {
                    return Some(PrimaryMsg::Fail {
                        reason: format!("group member {id} broke the protocol"),
                    });
                }
            }
        }
        None
    }

    /// A member left during a cut: the others need not wait for it.
    fn forget_in_cut(&mut self, id: usize) {
        let done = match &mut self.cut {
            Some(cut) => {
                cut.participants.retain(|p| *p != id);
                cut.waiting.remove(&id);
                cut.waiting.is_empty()
            }
            None => false,
        };
        if done {
            self.finish_cut();
        }
    }

    fn finish_cut(&mut self) {
        let Some(cut) = self.cut.take() else {
            return;
        };
        self.hub.send_all(
            cut.participants.iter().copied(),
            &PrimaryMsg::Resume { epoch: cut.epoch },
        );
        self.next_tick = cut.started + self.next_epoch_len();
    }

    /// Bounded latency for the group: when the slowest member takes longer to send an epoch
    /// than to run one, the next epoch is cut shorter in proportion.
    fn next_epoch_len(&mut self) -> Duration {
        let epoch = self.timing.epoch;
        let next = if self.slowest_send > epoch {
            Duration::from_secs_f64(
                epoch.as_secs_f64() * epoch.as_secs_f64() / self.slowest_send.as_secs_f64(),
            )
            .max(MIN_GROUP_EPOCH)
        } else {
            epoch
        };
        self.slowest_send = Duration::ZERO;
        next
    }

    fn try_commit(&mut self) {
        let Some(newest) = self
            .members
            .values()
            .filter(|m| m.ready)
            .map(|m| m.acked)
            .min()
        else {
            return;
        };
        let newest = newest.min(self.last_cut);
        if newest > self.committed {
            self.committed = newest;
            let ready = self.ready_ids();
            self.hub
                .send_all(ready, &PrimaryMsg::Commit { epoch: newest });
        }
    }

    fn announce_peers(&mut self) {
        let ready = self.ready_ids();
        let macs: Vec<[u8; 6]> = ready
            .iter()
            .filter_map(|id| self.members.get(id))
            .flat_map(|m| m.macs.iter().copied())
            .collect();
        let msg = PrimaryMsg::Peers {
            macs,
            members: ready.len() as u64,
        };
        let all: Vec<usize> = self.members.keys().copied().collect();
        self.hub.send_all(all, &msg);
    }

    /// Tells every member how the group ends, and dissolves it.
    fn finish(&mut self, end: PrimaryMsg) {
        match &end {
            PrimaryMsg::Fail { reason } => log::error!("FT group: failing every member: {reason}"),
            PrimaryMsg::Degrade { reason } => log::warn!("FT group: unprotected: {reason}"),
            _ => {}
        }
        self.hub.close_door();
        let ready = self.ready_ids();
        self.hub.send_all(ready.iter().copied(), &end);
        // A member still synchronising is not protected by the group yet: it runs on, alone.
        let syncing: Vec<usize> = self
            .members
            .keys()
            .filter(|id| !ready.contains(id))
            .copied()
            .collect();
        let alone = PrimaryMsg::Degrade {
            reason: "the FT group ended before this member's synchronisation finished".into(),
        };
        self.hub.send_all(syncing, &alone);
        self.hub.dissolve();
    }
}

/// A primary's membership in a group.
pub struct PrimaryMember {
    path: String,
    writer: Mutex<UnixStream>,
    reader: Mutex<Option<LineReader>>,
    coordinator: Mutex<Option<PrimaryCoordinator>>,
    pub group_id: u64,
    pub timing: GroupTiming,
}

impl PrimaryMember {
    /// Joins the group at `path`, creating it (with `timing`) when nobody has yet.
    pub fn join(
        path: &str,
        macs: Vec<[u8; 6]>,
        timing: GroupTiming,
        new_group_id: u64,
    ) -> Result<Self, GroupError> {
        let socket = Path::new(path);
        let (stream, listener) = connect_or_bind(socket)?;
        let socket_err = |source| GroupError::Socket {
            path: path.to_string(),
            source,
        };
        let coordinator = match listener {
            Some(listener) => {
                log::info!("FT group: creating group {path}");
                Some(
                    PrimaryCoordinator::start(listener, socket, new_group_id, timing)
                        .map_err(socket_err)?,
                )
            }
            None => None,
        };
        let fail = |message: String| GroupError::Protocol {
            path: path.to_string(),
            message,
        };
        let mut writer = stream.try_clone().map_err(socket_err)?;
        writer
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(socket_err)?;
        send_line(&mut writer, &PrimaryMsg::Join { macs }).map_err(socket_err)?;
        stream
            .set_read_timeout(Some(JOIN_TIMEOUT))
            .map_err(socket_err)?;
        let mut reader = LineReader::new(stream);
        let (group_id, timing) = loop {
            match reader.next::<PrimaryMsg>().map_err(&fail)? {
                PrimaryMsg::Welcome {
                    group_id,
                    epoch_ms,
                    heartbeat_timeout_ms,
                } => {
                    break (
                        group_id,
                        GroupTiming {
                            epoch: Duration::from_millis(epoch_ms.max(1)),
                            heartbeat_timeout: Duration::from_millis(heartbeat_timeout_ms.max(1)),
                        },
                    )
                }
                // Sent to every member, also those still joining.
                PrimaryMsg::Peers { .. } => continue,
                other => return Err(fail(format!("expected Welcome, got {other:?}"))),
            }
        };
        reader
            .reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(socket_err)?;
        Ok(Self {
            path: path.to_string(),
            writer: Mutex::new(writer),
            reader: Mutex::new(Some(reader)),
            coordinator: Mutex::new(coordinator),
            group_id,
            timing,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Sends `msg` to the coordinator.
    pub fn send(&self, msg: &PrimaryMsg) -> Result<(), String> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        send_line(&mut writer, msg).map_err(|e| format!("group {}: {e}", self.path))
    }

    /// Starts the thread that hands every coordinator message to `handle`; when the
    /// coordinator is gone, `handle` gets `Err(why)` once and the thread ends.
    pub fn listen(
        &self,
        mut handle: impl FnMut(Result<PrimaryMsg, String>) + Send + 'static,
    ) -> Result<JoinHandle<()>, String> {
        let mut reader = self
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| "the group is already being listened to".to_string())?;
        std::thread::Builder::new()
            .name("ft-group-member".into())
            .spawn(move || {
                if !vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    return;
                }
                loop {
                    match reader.next::<PrimaryMsg>() {
                        Ok(msg) => handle(Ok(msg)),
                        Err(why) => {
                            handle(Err(why));
                            return;
                        }
                    }
                }
            })
            .map_err(|e| format!("group listener thread: {e}"))
    }

    /// Leaves the group on purpose. The member that created the group ends it: the others
    /// run on unprotected.
    pub fn leave(&self, reason: &str) {
        let coordinator = self
            .coordinator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(coordinator) = coordinator {
            coordinator.end(&format!("the member that created the group left: {reason}"));
        } else {
            let _ = self.send(&PrimaryMsg::Leave);
        }
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writer.shutdown(std::net::Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------------------------
// Backup side.

/// The backup side's coordinator, in the VMM of the first backup of the group. It lives as
/// long as that VMM (a member leaving does not end it) or until the group has failed over.
pub struct BackupCoordinator;

struct BackupCoordination {
    hub: Hub<BackupMsg>,
    members: BTreeSet<usize>,
    reports: BTreeMap<usize, Option<u64>>,
    /// When the members not yet reporting are frozen, and when the decision is taken anyway.
    freeze_at: Option<Instant>,
    decide_at: Option<Instant>,
}

/// After freezing, how long the frozen members have to report.
const FREEZE_REPORT: Duration = Duration::from_secs(2);

impl BackupCoordinator {
    fn start(listener: UnixListener, path: &Path) -> std::io::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let hub = Hub::start(listener, path.to_path_buf(), stop)?;
        std::thread::Builder::new()
            .name("ft-group-backup".into())
            .spawn(move || {
                if !vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    return;
                }
                BackupCoordination {
                    hub,
                    members: BTreeSet::new(),
                    reports: BTreeMap::new(),
                    freeze_at: None,
                    decide_at: None,
                }
                .run()
            })?;
        Ok(())
    }
}

impl BackupCoordination {
    fn run(&mut self) {
        loop {
            let now = Instant::now();
            let wake = [self.freeze_at, self.decide_at]
                .into_iter()
                .flatten()
                .min()
                .map_or(Duration::from_millis(100), |t| {
                    t.saturating_duration_since(now)
                });
            match self.hub.events.recv_timeout(wake) {
                Ok(Event::Connected(stream)) => {
                    if let Some(id) = self.hub.add(stream) {
                        self.members.insert(id);
                    }
                }
                Ok(Event::Gone(id, why)) => {
                    log::info!("FT group: backup member {id} gone ({why})");
                    self.members.remove(&id);
                    self.reports.remove(&id);
                    self.hub.remove(id);
                }
                Ok(Event::Message(_, BackupMsg::Join)) => {}
                Ok(Event::Message(id, BackupMsg::Lost { latest, grace_ms })) => {
                    self.reports.insert(id, latest);
                    if self.freeze_at.is_none() {
                        log::warn!(
                            "FT group: backup member {id} lost its primary; waiting up to {grace_ms} ms for the others"
                        );
                        self.freeze_at = Some(Instant::now() + Duration::from_millis(grace_ms));
                    }
                }
                Ok(Event::Message(id, other)) => {
                    log::warn!("FT group: backup member {id} sent {other:?}; dropping it");
                    self.members.remove(&id);
                    self.hub.remove(id);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            if self.freeze_at.is_some_and(|t| now >= t) && self.decide_at.is_none() {
                let silent: Vec<usize> = self
                    .members
                    .iter()
                    .filter(|id| !self.reports.contains_key(id))
                    .copied()
                    .collect();
                self.hub.send_all(silent, &BackupMsg::Freeze);
                self.decide_at = Some(now + FREEZE_REPORT);
            }
            let everyone = !self.reports.is_empty()
                && self.members.iter().all(|id| self.reports.contains_key(id));
            if everyone || self.decide_at.is_some_and(|t| now >= t) {
                self.decide();
                return;
            }
        }
    }

    /// Every member resumes from the oldest newest-complete epoch reported.
    fn decide(&mut self) {
        // A member that holds no group epoch yet (it joined during the last epochs) cannot
        // resume; the others still agree among themselves.
        let epoch = self.reports.values().flatten().min().copied();
        log::warn!("FT group: every backup resumes from group epoch {epoch:?}");
        self.hub.close_door();
        let all: Vec<usize> = self.members.iter().copied().collect();
        self.hub.send_all(all, &BackupMsg::TakeOver { epoch });
        self.hub.dissolve();
    }
}

/// A backup's membership in a group.
pub struct BackupMember {
    path: String,
    writer: UnixStream,
    reader: Option<LineReader>,
}

impl BackupMember {
    pub fn join(path: &str) -> Result<Self, GroupError> {
        let socket = Path::new(path);
        let (stream, listener) = connect_or_bind(socket)?;
        let socket_err = |source| GroupError::Socket {
            path: path.to_string(),
            source,
        };
        if let Some(listener) = listener {
            log::info!("FT group: coordinating the backups of group {path}");
            BackupCoordinator::start(listener, socket).map_err(socket_err)?;
        }
        let mut writer = stream.try_clone().map_err(socket_err)?;
        writer
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(socket_err)?;
        send_line(&mut writer, &BackupMsg::Join).map_err(socket_err)?;
        Ok(Self {
            path: path.to_string(),
            writer,
            reader: Some(LineReader::new(stream)),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Starts the thread that waits for the coordinator: `on_freeze` runs when the member must
    /// stop receiving from its primary; the decision (or why there is none) goes to the
    /// returned channel.
    pub fn listen(
        &mut self,
        on_freeze: impl Fn() + Send + 'static,
    ) -> Result<Receiver<Result<Option<u64>, String>>, String> {
        let mut reader = self
            .reader
            .take()
            .ok_or_else(|| "the group is already being listened to".to_string())?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("ft-group-member".into())
            .spawn(move || {
                if !vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    return;
                }
                loop {
                    match reader.next::<BackupMsg>() {
                        Ok(BackupMsg::Freeze) => on_freeze(),
                        Ok(BackupMsg::TakeOver { epoch }) => {
                            let _ = tx.send(Ok(epoch));
                            return;
                        }
                        Ok(other) => {
                            let _ =
                                tx.send(Err(format!("unexpected {other:?} from the coordinator")));
                            return;
                        }
                        Err(why) => {
                            let _ =
                                tx.send(Err(format!("the group's coordinator is gone ({why})")));
                            return;
                        }
                    }
                }
            })
            .map_err(|e| format!("group listener thread: {e}"))?;
        Ok(rx)
    }

    /// Reports this member's primary lost.
    pub fn report_lost(&mut self, latest: Option<u64>, grace: Duration) -> Result<(), String> {
        let msg = BackupMsg::Lost {
            latest,
            grace_ms: grace.as_millis() as u64,
        };
        send_line(&mut self.writer, &msg).map_err(|e| format!("group {}: {e}", self.path))
    }
}

impl Drop for BackupMember {
    fn drop(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket path in a directory removed when the returned guard drops.
    struct SocketDir(PathBuf);

    impl Drop for SocketDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn socket_path(name: &str) -> (SocketDir, String) {
        let dir = std::env::temp_dir().join(format!("ftg-{}-{name}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("g.sock").display().to_string();
        (SocketDir(dir), path)
    }

    #[test]
    fn messages_round_trip_and_bad_lines_are_refused() {
        for msg in [
            PrimaryMsg::Join {
                macs: vec![[1, 2, 3, 4, 5, 6]],
            },
            PrimaryMsg::Cut {
                epoch: 7,
                barrier: true,
            },
            PrimaryMsg::Fail { reason: "x".into() },
        ] {
            let text = serde_json::to_string(&msg).unwrap();
            assert_eq!(serde_json::from_str::<PrimaryMsg>(&text).unwrap(), msg);
        }
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"{\"cut\":{\"epoch\":1,\"extra\":2}}\n")
            .unwrap();
        b.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        let mut reader = LineReader::new(a);
        assert!(reader
            .next::<PrimaryMsg>()
            .unwrap_err()
            .starts_with("malformed"));
        assert!(reader.next::<PrimaryMsg>().unwrap_err().contains("longer"));
        drop(b);
    }

    proptest::proptest! {
        /// Whatever a peer writes on a group socket, reading it gives a message or an error.
        #[test]
        fn group_lines_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let (a, mut b) = UnixStream::pair().unwrap();
            b.write_all(&bytes).unwrap();
            b.write_all(b"\n").unwrap();
            drop(b);
            let mut reader = LineReader::new(a);
            let _ = reader.next::<PrimaryMsg>();
            let (c, mut d) = UnixStream::pair().unwrap();
            d.write_all(&bytes).unwrap();
            d.write_all(b"\n").unwrap();
            drop(d);
            let _ = LineReader::new(c).next::<BackupMsg>();
        }
    }

    #[test]
    fn the_group_socket_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, path) = socket_path("mode");
        // SAFETY: umask only swaps this process's file-creation mask; it touches no memory.
        let old = unsafe { libc::umask(0) };
        let bound = connect_or_bind(Path::new(&path));
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let (_stream, listener) = bound.unwrap();
        assert!(listener.is_some());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "group socket mode {mode:o}");
    }

    #[test]
    fn peers_of_this_user_are_recognised() {
        let (a, _b) = UnixStream::pair().unwrap();
        // SAFETY: geteuid only reads the process's credentials.
        let me = unsafe { libc::geteuid() };
        assert_eq!(peer_uid(&a).unwrap(), me);
    }

    /// Only as root (which can take another uid): a process of another user that reaches the
    /// socket despite its mode is dropped at once.
    #[test]
    fn peers_of_another_user_are_dropped() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid only reads the process's credentials.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let (_dir, path) = socket_path("peer");
        let _member = BackupMember::join(&path).unwrap();
        // As if an operator had loosened the mode.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        // Everything the child needs is prepared before fork: it makes raw calls only.
        // SAFETY: an all-zero sockaddr_un is a valid value of this plain C struct.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
            *d = *s as libc::c_char;
        }
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: the child only makes async-signal-safe system calls on memory prepared
        // above and leaves with _exit; the parent waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: raw system calls on the child's own copies of `addr` and `timeout`.
            unsafe {
                if libc::setuid(65534) != 0 {
                    libc::_exit(3);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if fd < 0 || libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0
                {
                    libc::_exit(4);
                }
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                );
                let mut byte = 0u8;
                // 0: the coordinator closed the connection; -1 (timeout): it kept it.
                let n = libc::read(fd, (&mut byte as *mut u8).cast(), 1);
                libc::_exit(if n == 0 { 0 } else { 2 });
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above; writes only `status`.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "the other user's connection was kept"
        );
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_refused_and_kept() {
        let (_dir, path) = socket_path("file");
        std::fs::write(&path, b"precious").unwrap();
        let err = PrimaryMember::join(&path, vec![], timing(), 1)
            .err()
            .expect("a regular file is no group");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        // A socket left by a killed coordinator is replaced.
        let (_dir2, stale) = socket_path("stale");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(BackupMember::join(&stale).is_ok());
    }

    fn timing() -> GroupTiming {
        GroupTiming {
            epoch: Duration::from_millis(5),
            heartbeat_timeout: Duration::from_millis(500),
        }
    }

    /// Collects what a member's listener receives.
    fn listen(member: &PrimaryMember) -> Receiver<Result<PrimaryMsg, String>> {
        let (tx, rx) = mpsc::channel();
        member
            .listen(move |m| {
                let _ = tx.send(m);
            })
            .unwrap();
        rx
    }

    fn next_matching(
        rx: &Receiver<Result<PrimaryMsg, String>>,
        want: impl Fn(&PrimaryMsg) -> bool,
    ) -> PrimaryMsg {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(m)) if want(&m) => return m,
                Ok(Ok(_)) => continue,
                other => panic!("no matching message: {other:?}"),
            }
        }
    }

    #[test]
    fn members_cut_together_commit_when_all_acked_and_fail_together() {
        let (_dir, path) = socket_path("cut");
        // Long enough for both to be ready before the first cut.
        let slow = GroupTiming {
            epoch: Duration::from_millis(300),
            ..timing()
        };
        let a = PrimaryMember::join(&path, vec![[2, 0, 0, 0, 0, 1]], slow, 99).unwrap();
        let b = PrimaryMember::join(&path, vec![[2, 0, 0, 0, 0, 2]], timing(), 5).unwrap();
        assert_eq!(
            b.timing.epoch, slow.epoch,
            "the group's timing is its creator's"
        );
        assert_eq!((a.group_id, b.group_id), (99, 99));
        assert!(a.coordinator.lock().unwrap().is_some());
        assert!(b.coordinator.lock().unwrap().is_none());
        let ra = listen(&a);
        let rb = listen(&b);
        a.send(&PrimaryMsg::Ready).unwrap();
        b.send(&PrimaryMsg::Ready).unwrap();
        let peers = next_matching(&ra, |m| matches!(m, PrimaryMsg::Peers { members: 2, .. }));
        assert_eq!(
            peers,
            PrimaryMsg::Peers {
                macs: vec![[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]],
                members: 2
            }
        );
        // A cut of both: nobody resumes before both paused.
        let epoch = 1;
        next_matching(&ra, |m| {
            *m == PrimaryMsg::Cut {
                epoch,
                barrier: true,
            }
        });
        next_matching(&rb, |m| {
            *m == PrimaryMsg::Cut {
                epoch,
                barrier: true,
            }
        });
        a.send(&PrimaryMsg::Paused { epoch }).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(ra.try_recv().is_err(), "resumed before every member paused");
        b.send(&PrimaryMsg::Paused { epoch }).unwrap();
        next_matching(&ra, |m| *m == PrimaryMsg::Resume { epoch });
        next_matching(&rb, |m| *m == PrimaryMsg::Resume { epoch });
        // No next cut before both have sent this epoch.
        a.send(&PrimaryMsg::Sent { epoch, send_us: 1 }).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        while let Ok(Ok(m)) = ra.try_recv() {
            assert!(!matches!(m, PrimaryMsg::Cut { .. }), "{m:?}");
        }
        b.send(&PrimaryMsg::Sent { epoch, send_us: 1 }).unwrap();
        next_matching(
            &ra,
            |m| matches!(m, PrimaryMsg::Cut { epoch: e, .. } if *e == epoch + 1),
        );
        // Commit only once both backups hold the epoch.
        a.send(&PrimaryMsg::Acked { epoch }).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        while let Ok(Ok(m)) = ra.try_recv() {
            assert!(!matches!(m, PrimaryMsg::Commit { .. }), "{m:?}");
        }
        b.send(&PrimaryMsg::Acked { epoch }).unwrap();
        next_matching(&rb, |m| *m == PrimaryMsg::Commit { epoch });
        // b's primary dies (its socket closes): a is failed too.
        let _ = b.writer.lock().unwrap().shutdown(std::net::Shutdown::Both);
        let fail = next_matching(&ra, |m| matches!(m, PrimaryMsg::Fail { .. }));
        assert!(format!("{fail:?}").contains("lost"), "{fail:?}");
        assert!(
            !Path::new(&path).exists(),
            "the dissolved group's socket remains"
        );
    }

    #[test]
    fn the_creator_leaving_degrades_the_rest_and_a_joiner_mid_sync_is_not_waited_for() {
        let (_dir, path) = socket_path("leave");
        let a = PrimaryMember::join(&path, vec![], timing(), 1).unwrap();
        let b = PrimaryMember::join(&path, vec![], timing(), 2).unwrap();
        let rb = listen(&b);
        b.send(&PrimaryMsg::Ready).unwrap();
        // a never says Ready (still synchronising): b is cut alone, without a barrier, and
        // cut again once it has sent the epoch.
        let PrimaryMsg::Cut { epoch, barrier } =
            next_matching(&rb, |m| matches!(m, PrimaryMsg::Cut { .. }))
        else {
            unreachable!()
        };
        assert!(!barrier);
        b.send(&PrimaryMsg::Sent { epoch, send_us: 1 }).unwrap();
        next_matching(
            &rb,
            |m| matches!(m, PrimaryMsg::Cut { epoch: e, .. } if *e == epoch + 1),
        );
        a.leave("disabled");
        let end = next_matching(&rb, |m| matches!(m, PrimaryMsg::Degrade { .. }));
        assert!(format!("{end:?}").contains("created the group"), "{end:?}");
    }

    #[test]
    fn backups_resume_from_the_oldest_epoch_reported_and_silent_ones_are_frozen() {
        let (_dir, path) = socket_path("backup");
        let mut a = BackupMember::join(&path).unwrap();
        let mut b = BackupMember::join(&path).unwrap();
        let mut c = BackupMember::join(&path).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let ra = a.listen(|| {}).unwrap();
        let rb = b.listen(|| {}).unwrap();
        let (frozen_tx, frozen_rx) = mpsc::channel();
        let rc = c
            .listen(move || {
                let _ = frozen_tx.send(());
            })
            .unwrap();
        a.report_lost(Some(12), Duration::from_millis(100)).unwrap();
        b.report_lost(Some(11), Duration::from_millis(100)).unwrap();
        // c's primary still sends: it is frozen, then reports.
        frozen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        c.report_lost(Some(13), Duration::from_millis(100)).unwrap();
        for rx in [&ra, &rb, &rc] {
            let decision = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(decision, Ok(Some(11)));
        }
    }
}
