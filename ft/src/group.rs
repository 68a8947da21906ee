//! FT groups (fate sharing, after Cuju): VMs that talk to each other are protected as one.
//!
//! A group is named by a Unix socket path on each side: the primaries of the members (on one
//! host) meet at one path, their backups (on the other host) at another. Every member, on
//! both sides, talks to that side's coordinator over the socket (one JSON object per line).
//!
//! Who coordinates: the coordinator role of a side belongs to whichever member holds an
//! exclusive `flock` on the lock file next to the socket (`<path>.lock`, mode 0600, never
//! removed: removing it would let two processes lock two different files). The holder runs
//! the coordinator thread in its VMM, removes whatever stale socket is at the path (only the
//! holder may) and binds it anew; the others connect. The kernel drops the lock when its
//! process dies, so a crash hands the role on as well as a member leaving on purpose, and
//! two coordinators of one side never run at once: a coordinator stops serving (closes the
//! socket and every connection) before it lets go of the lock. A member whose connection to
//! the coordinator closes without an ending order (Fail, Degrade, TakeOver) tries the lock
//! and connects again, and rejoins with its own state: the coordinator keeps nothing that
//! the members cannot tell it again. Nothing a peer sends names a path.
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
//!   every member runs on unprotected and tells its backup to stand down;
//! - a member leaving on purpose (`Leave`) leaves the others protected. When it hosts the
//!   coordinator, the coordinator drops it from the group (releasing a barrier that waited
//!   only for it, committing what the rest hold), then stops; the rest rejoin the next
//!   holder of the lock. Each rejoins (`Rejoin`) with the newest group epoch it was cut at,
//!   whether it is still pausing or paused for it, what it has sent and what its backup
//!   holds, the newest commit it got and the protected members it knows of. The new
//!   coordinator waits (half a second, a heartbeat timeout at most) for every member someone
//!   knows of: one that does not come back was lost with the old coordinator's VMM, so the
//!   group fails as for any lost primary. It need not wait when a member saw that VMM's
//!   process end (a pidfd of the socket peer's process) and says so in its Rejoin: the member
//!   that VMM hosted is lost, and the group fails at once (a coordinator handing the role on
//!   says `HandOff` first, so the end of its connections is not mistaken for a death).
//!   Otherwise it goes on numbering after the newest cut,
//!   finishes a cut that was under way (cutting those the old coordinator had not reached)
//!   and commits only what every protected member's backup reports holding.
//!
//! A member joining afresh while the role is between two holders lets the rejoining members
//! take it first ([`FRESH_GRACE`]); should it still win, they find a group they do not belong
//! to and run on unprotected (they are told Degrade): safe, if unlucky.
//!
//! Backup side ([`BackupCoordinator`]): a backup keeps complete epochs beyond the group's
//! commit point aside instead of applying them. When its primary is lost it reports the
//! newest group epoch it holds; the coordinator waits for every member (freezing those whose
//! primaries still send, after a grace period), and all resume from the oldest of the reported
//! epochs. Every member holds that epoch: the group committed nothing newer than it, and a
//! member acknowledges an epoch only when it holds it completely. The backup hosting the
//! coordinator standing down or exiting hands the role on like the primaries'; members that
//! had reported their primary lost report it again to the next coordinator.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The longest message line.
const MAX_LINE: usize = 64 * 1024;
/// How long a member waits for the coordinator's answer to its Join, and at most for a
/// coordinator to connect to (a new one to bind the path, after a hand-off).
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A write to a peer on the group socket taking longer than this means the peer is stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the acceptor checks whether the coordinator has ended.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// How often a member retries the lock and the path while no coordinator answers.
const CONNECT_RETRY: Duration = Duration::from_millis(5);
/// How long a new coordinator waits for the members to rejoin (at most a heartbeat timeout).
/// A live member is back within milliseconds; one still missing then was lost with the old
/// coordinator's VMM, and every moment waited is added to the group's failover.
const REJOIN_WAIT: Duration = Duration::from_millis(500);
/// How long a member whose coordinator's connection closed without an ending order or a
/// hand-off waits to see the coordinator's process end: a dying process's sockets close just
/// before the kernel reports it gone.
const DEATH_WAIT: Duration = Duration::from_millis(50);
/// How long a member joining afresh finds no coordinator before it takes the role itself.
const FRESH_GRACE: Duration = Duration::from_millis(50);
/// At most this many group epochs are cut but not yet committed: the pipeline of a single
/// pair (one epoch on the wire, one running) with one epoch of slack for the slowest member.
const PIPELINE_DEPTH: u64 = 3;

/// Where a member stands in the barrier of the newest cut it got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Barrier {
    /// Resumed (or cut without a barrier): the cut is over for it.
    #[default]
    Done,
    /// Told to cut, not yet paused: it says Paused once it has.
    Pausing,
    /// Paused, waiting for Resume.
    Paused,
}

/// Primary side, both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PrimaryMsg {
    /// member -> coordinator, first: the member's id in the group (chosen at random by the
    /// member) and its NICs' MAC addresses.
    Join { id: u64, macs: Vec<[u8; 6]> },
    /// member -> coordinator, first, to a new coordinator (see the module doc): the member's
    /// state, from which the coordinator resumes the group.
    Rejoin {
        id: u64,
        group_id: u64,
        macs: Vec<[u8; 6]>,
        ready: bool,
        /// The newest group epoch it was cut at, and where it stands in that cut's barrier.
        cut: Option<u64>,
        barrier: Barrier,
        sent: u64,
        acked: u64,
        /// The newest commit it got.
        committed: u64,
        /// The protected members it was told of (the newest Peers).
        known: Vec<u64>,
        /// It lost its backup and told the old coordinator (which may not have read it).
        degrade: Option<String>,
        /// Members it saw end with a coordinator's process (see
        /// [`Link::lost_with_coordinator`]): none of them will come back.
        #[serde(default)]
        lost: Vec<u64>,
    },
    /// coordinator -> member: the group's identity (the witness pair id of every member) and
    /// timing.
    Welcome {
        group_id: u64,
        epoch_ms: u64,
        heartbeat_timeout_ms: u64,
    },
    /// member: the initial synchronisation is done; cut me from now on.
    Ready,
    /// coordinator: the MACs of the protected members, how many there are and their ids,
    /// and the member whose VMM runs the coordinator.
    Peers {
        macs: Vec<[u8; 6]>,
        members: u64,
        ids: Vec<u64>,
        #[serde(default)]
        coordinator: u64,
    },
    /// coordinator -> all, last: its member `leaver` left on purpose and the role passes on.
    /// The connection's end that follows is not its VMM's death.
    HandOff { leaver: u64 },
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
    /// member -> coordinator, first: its id (random) and, to a new coordinator, the members
    /// it was told of (the new one waits for them before it decides anything).
    Join { id: u64, known: Vec<u64> },
    /// coordinator -> all: the ids of the members.
    Members { ids: Vec<u64> },
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

/// The coordinator role of one side of a group: an exclusive `flock` on the lock file next to
/// the socket, held as long as this value lives (or its process).
struct Role {
    file: File,
    #[cfg(test)]
    path: PathBuf,
}

impl Role {
    /// Takes the role of the group at `path` if nobody holds it.
    fn try_take(path: &Path) -> std::io::Result<Option<Role>> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        // No symlinks: the file is ours to create (0600) or to find; it is never written.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(lock_path)?;
        // SAFETY: flock on a descriptor this function owns; it touches no memory.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        #[cfg(test)]
        roles::taken(path);
        Ok(Some(Role {
            file,
            #[cfg(test)]
            path: path.to_path_buf(),
        }))
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        #[cfg(test)]
        roles::released(&self.path);
        // Closing the descriptor (after this) releases the lock; say so explicitly anyway.
        // SAFETY: flock on the descriptor this value owns.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Tests: how many coordinators of each path run at once (never more than one).
#[cfg(test)]
mod roles {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static HOLDERS: Mutex<BTreeMap<PathBuf, (usize, usize, usize)>> = Mutex::new(BTreeMap::new());

    pub(super) fn taken(path: &Path) {
        let mut holders = HOLDERS.lock().unwrap_or_else(|p| p.into_inner());
        let entry = holders.entry(path.to_path_buf()).or_default();
        entry.0 += 1;
        entry.2 += 1;
        entry.1 = entry.1.max(entry.0);
    }

    pub(super) fn released(path: &Path) {
        let mut holders = HOLDERS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = holders.get_mut(path) {
            entry.0 = entry.0.saturating_sub(1);
        }
    }

    /// (most holders at once, how many times the role was taken).
    pub(super) fn stats(path: &Path) -> (usize, usize) {
        let holders = HOLDERS.lock().unwrap_or_else(|p| p.into_inner());
        holders.get(path).map_or((0, 0), |e| (e.1, e.2))
    }
}

/// Connects to the coordinator at `path`, or becomes it: takes the role, replaces a stale
/// socket at the path (anything else there is the operator's and stays) and binds it. Returns
/// the listener and the role as well when it became the coordinator. Waits (up to
/// [`JOIN_TIMEOUT`]) while another process holds the role but does not listen yet. A member
/// joining afresh (not `rejoining`) lets the members of a group between two coordinators
/// take the role first ([`FRESH_GRACE`]), so that it joins their group rather than making a
/// new one they would then find at the path.
fn connect_or_bind(
    path: &Path,
    rejoining: bool,
) -> Result<(UnixStream, Option<(UnixListener, Role)>), GroupError> {
    let socket_err = |source| GroupError::Socket {
        path: path.display().to_string(),
        source,
    };
    let start = Instant::now();
    let deadline = start + JOIN_TIMEOUT;
    let lock_from = if rejoining {
        start
    } else {
        start + FRESH_GRACE
    };
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok((stream, None)),
            // Nobody listens (a coordinator between two holders, or a killed one).
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) => {}
            Err(e) => return Err(socket_err(e)),
        }
        let role = if Instant::now() >= lock_from {
            Role::try_take(path).map_err(socket_err)?
        } else {
            None
        };
        if let Some(role) = role {
            match std::fs::symlink_metadata(path) {
                Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                    // The role is ours: nobody serves that socket any more.
                    std::fs::remove_file(path).map_err(socket_err)?;
                }
                Ok(_) => {
                    return Err(GroupError::Protocol {
                        path: path.display().to_string(),
                        message: "the path exists and is not a socket".into(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(socket_err(e)),
            }
            // 0600: only this user's VMMs may join (`Hub::start` also checks each peer's uid).
            let listener = vmm::unix_socket::bind_owner_only(path).map_err(socket_err)?;
            let stream = UnixStream::connect(path).map_err(socket_err)?;
            return Ok((stream, Some((listener, role))));
        }
        if Instant::now() >= deadline {
            return Err(GroupError::Protocol {
                path: path.display().to_string(),
                message: "another process holds the coordinator role but does not listen".into(),
            });
        }
        std::thread::sleep(CONNECT_RETRY);
    }
}

/// The effective uid of the process at the other end of `stream`, as the kernel recorded it
/// when the connection was made (`SO_PEERCRED`).
fn peer_uid(stream: &UnixStream) -> std::io::Result<libc::uid_t> {
    peer_cred(stream).map(|cred| cred.uid)
}

/// A pidfd of the process at the other end of `stream`, when that is another process. The
/// group's coordinator runs in one member's VMM: through this a member tells that VMM's death
/// (its member is lost with it) from the coordinator merely closing. None when unknown.
fn peer_process(stream: &UnixStream) -> Option<OwnedFd> {
    let pid = peer_cred(stream).ok()?.pid;
    if pid <= 0 || pid as u32 == std::process::id() {
        return None;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1. Should
    // the peer have died and been reaped since it connected, the pid may name another
    // process: its death is then not seen, and the group waits for the member as before.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor is new and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the process behind `pidfd` has ended, or ends within `wait` (a pidfd is readable
/// once its process has exited).
fn process_ended(pidfd: &OwnedFd, wait: Duration) -> bool {
    let wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    transport::poll_one(pidfd.as_raw_fd(), libc::POLLIN, wait_ms).unwrap_or(false)
}

/// The credentials of the process at the other end of `stream` (as it connected).
fn peer_cred(stream: &UnixStream) -> std::io::Result<libc::ucred> {
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
    Ok(cred)
}

/// A member's id in its group: random, so that members need no coordinator to number them
/// and a later coordinator cannot hand out one in use.
fn new_member_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNT.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    hasher.write_u128(now.as_nanos());
    hasher.finish()
}

/// What a coordinator's connection threads report.
enum Event<M> {
    Connected(UnixStream),
    Message(usize, M),
    Gone(usize, String),
}

/// How a coordinator thread is told to stop.
#[derive(Default)]
struct Stop {
    /// Hand the role on: stop serving, let the next holder of the lock take over.
    hand_off: AtomicBool,
    /// Tests: vanish as a killed process would (no goodbye, the socket file stays).
    #[cfg(test)]
    vanish: AtomicBool,
}

impl Stop {
    fn vanished(&self) -> bool {
        #[cfg(test)]
        return self.vanish.load(Ordering::SeqCst);
        #[cfg(not(test))]
        false
    }
}

/// The acceptor and per-connection reader threads every coordinator uses.
struct Hub<M> {
    events: Receiver<Event<M>>,
    tx: Sender<Event<M>>,
    writers: BTreeMap<usize, UnixStream>,
    next_id: usize,
    /// Stops the acceptor.
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl<M: DeserializeOwned + Send + 'static> Hub<M> {
    fn start(listener: UnixListener, path: PathBuf) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, events) = mpsc::channel();
        listener.set_nonblocking(true)?;
        let accept_tx = tx.clone();
        let accept_stop = stop.clone();
        let acceptor = std::thread::Builder::new()
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
            acceptor: Some(acceptor),
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

    /// No new members: the acceptor stops (and with it the listening socket closes).
    fn stop_accepting(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }

    /// Ends this coordinator's service: the path is removed (the next member to arrive, or the
    /// next holder of the role, binds it anew) and every connection closed. The caller lets go
    /// of the role only after this.
    fn dissolve(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        self.abandon();
    }

    /// As a killed process would: every connection and the listening socket closed, its file
    /// left behind.
    fn abandon(&mut self) {
        self.stop_accepting();
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

/// The primary side's coordinator, running in the VMM of the member that holds the role.
pub struct PrimaryCoordinator {
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl PrimaryCoordinator {
    /// `host`: the id of this VMM's member; `resuming`: the group exists (this VMM took the
    /// role over): wait for the members to rejoin before cutting again.
    fn start(
        listener: UnixListener,
        role: Role,
        path: &Path,
        group_id: u64,
        timing: GroupTiming,
        host: u64,
        resuming: bool,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(Stop::default());
        let hub = Hub::start(listener, path.to_path_buf())?;
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ft-group".into())
            .spawn(move || {
                // Released when this thread ends, after the coordinator stopped serving.
                let _role = role;
                if !vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    return;
                }
                let now = Instant::now();
                let mut coordinator = Coordinator {
                    hub,
                    group_id,
                    timing,
                    host,
                    members: BTreeMap::new(),
                    last_cut: 0,
                    committed: 0,
                    cut: None,
                    next_tick: now + timing.epoch,
                    slowest_send: Duration::ZERO,
                    stop: s,
                    gathering: resuming.then(|| Gathering {
                        deadline: now + timing.heartbeat_timeout.min(REJOIN_WAIT),
                        expected: BTreeSet::new(),
                        rejoined: BTreeSet::new(),
                        lost: BTreeSet::new(),
                    }),
                };
                coordinator.run();
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// This VMM's member left on purpose: the coordinator drops it from the group and stops;
    /// the other members rejoin the next holder of the role.
    fn hand_off(mut self) {
        self.stop.hand_off.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Tests: the coordinator ends as if its process had been killed.
    #[cfg(test)]
    fn vanish(mut self) {
        self.stop.vanish.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct MemberState {
    /// Its id in the group.
    id: u64,
    ready: bool,
    macs: Vec<[u8; 6]>,
    /// Newest group epoch its backup holds (for a member that joined late: the last epoch cut
    /// before it was ready, which it need not hold).
    acked: u64,
    /// Newest group epoch it has sent (same convention).
    sent: u64,
    /// While a new coordinator gathers the members: the newest cut each was told of, and
    /// where it stands in that cut.
    cut: Option<u64>,
    barrier: Barrier,
    /// The newest commit it said it got (when it rejoined).
    committed: u64,
}

struct Cutting {
    epoch: u64,
    waiting: BTreeSet<usize>,
    participants: Vec<usize>,
    /// Epochs count from one cut's start to the next (pauses do not lengthen them).
    started: Instant,
    deadline: Instant,
}

/// A coordinator that took the role over waits for the members to rejoin.
struct Gathering {
    deadline: Instant,
    /// The protected members the rejoined ones know of.
    expected: BTreeSet<u64>,
    rejoined: BTreeSet<u64>,
    /// Members a rejoined one saw end with the old coordinator's process: none is waited for.
    lost: BTreeSet<u64>,
}

struct Coordinator {
    hub: Hub<PrimaryMsg>,
    group_id: u64,
    timing: GroupTiming,
    /// This VMM's member.
    host: u64,
    members: BTreeMap<usize, MemberState>,
    last_cut: u64,
    committed: u64,
    cut: Option<Cutting>,
    next_tick: Instant,
    slowest_send: Duration,
    stop: Arc<Stop>,
    gathering: Option<Gathering>,
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
            if self.stop.vanished() {
                self.hub.abandon();
                return;
            }
            if self.stop.hand_off.load(Ordering::SeqCst) {
                self.hand_off();
                return;
            }
            let now = Instant::now();
            let wake_at = match (&self.cut, &self.gathering) {
                (_, Some(gathering)) => gathering.deadline,
                (Some(cut), None) => cut.deadline,
                (None, None) if self.can_cut() => self.next_tick,
                (None, None) => now + Duration::from_millis(50),
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
            if let Some(gathering) = &self.gathering {
                if let Some(end) = self.check_gathering(gathering.deadline <= now) {
                    self.finish(end);
                    return;
                }
            } else if let Some(cut) = &self.cut {
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

    /// This VMM's member left: the rest of the group goes on under the next coordinator. What
    /// can be settled here is (a barrier that waited only for the leaver, a commit it held
    /// up); the rest rejoin with their own state.
    fn hand_off(&mut self) {
        let host = self.host;
        if let Some(conn) = self
            .members
            .iter()
            .find(|(_, m)| m.id == host)
            .map(|(c, _)| *c)
        {
            self.members.remove(&conn);
            self.hub.remove(conn);
            if self.gathering.is_none() {
                self.forget_in_cut(conn);
            }
        }
        if let Some(gathering) = &mut self.gathering {
            gathering.expected.remove(&host);
        } else {
            // The others' known members must not name the leaver: none waits for it.
            self.announce_peers();
            self.try_commit();
        }
        log::info!("FT group: this VMM's member left; handing the coordinator role on");
        let all: Vec<usize> = self.members.keys().copied().collect();
        self.hub
            .send_all(all, &PrimaryMsg::HandOff { leaver: host });
        self.hub.dissolve();
    }

    /// While gathering: whether every member someone knows of is back; when the time is up,
    /// those missing are lost (their VMM ended with the old coordinator's, or is stuck).
    fn check_gathering(&mut self, time_up: bool) -> Option<PrimaryMsg> {
        let gathering = self.gathering.as_ref()?;
        let dead: Vec<String> = gathering
            .expected
            .intersection(&gathering.lost)
            .filter(|id| !gathering.rejoined.contains(id))
            .map(|id| format!("{id:x}"))
            .collect();
        if !dead.is_empty() {
            // Nothing to wait for: the process that ran it has ended.
            return Some(PrimaryMsg::Fail {
                reason: format!(
                    "group member(s) {} ended with the group's old coordinator (its VMM's \
                     process ended): their primary was lost",
                    dead.join(", ")
                ),
            });
        }
        let missing: Vec<u64> = gathering
            .expected
            .difference(&gathering.rejoined)
            .copied()
            .collect();
        let complete = missing.is_empty() && !gathering.rejoined.is_empty();
        if !complete && !time_up {
            return None;
        }
        if !missing.is_empty() {
            let missing: Vec<String> = missing.iter().map(|id| format!("{id:x}")).collect();
            return Some(PrimaryMsg::Fail {
                reason: format!(
                    "group member(s) {} did not come back to the group's new coordinator: \
                     their primary was lost",
                    missing.join(", ")
                ),
            });
        }
        self.gathering = None;
        self.resume_group();
        None
    }

    /// Every member is back: the group goes on from the members' own state.
    fn resume_group(&mut self) {
        let newest_cut = self.members.values().filter_map(|m| m.cut).max();
        let last = newest_cut.unwrap_or(0).max(self.last_cut);
        self.last_cut = last;
        let ready = self.ready_ids();
        // A cut under way: someone was told of it and has not resumed.
        let under_way = last > 0
            && self
                .members
                .values()
                .any(|m| m.ready && m.cut == Some(last) && m.barrier != Barrier::Done);
        let now = Instant::now();
        if under_way {
            let mut waiting = BTreeSet::new();
            let mut to_cut = Vec::new();
            for conn in &ready {
                let Some(m) = self.members.get_mut(conn) else {
                    continue;
                };
                if m.cut == Some(last) {
                    if m.barrier != Barrier::Paused {
                        waiting.insert(*conn);
                    }
                    continue;
                }
                // The old coordinator did not reach it: it is cut now, with the others still
                // paused or pausing, so the cut stays consistent.
                waiting.insert(*conn);
                to_cut.push(*conn);
                if m.cut.is_none() {
                    m.acked = m.acked.max(last - 1);
                    m.sent = m.sent.max(last - 1);
                }
            }
            self.hub.send_all(
                to_cut,
                &PrimaryMsg::Cut {
                    epoch: last,
                    barrier: true,
                },
            );
            log::info!("FT group: finishing group epoch {last}'s cut (waiting for {waiting:?})");
            let done = waiting.is_empty();
            self.cut = Some(Cutting {
                epoch: last,
                waiting,
                participants: ready.clone(),
                started: now,
                deadline: now + self.cut_timeout(),
            });
            if done {
                self.finish_cut();
            }
        } else {
            for conn in &ready {
                if let Some(m) = self.members.get_mut(conn) {
                    // Ready but never cut: it joined after the newest cut, as for Ready.
                    if m.cut.is_none() {
                        m.acked = m.acked.max(last);
                    }
                    if m.cut.is_none_or(|c| c < last) {
                        m.sent = m.sent.max(last);
                    }
                }
            }
            self.next_tick = now + self.timing.epoch;
        }
        log::info!(
            "FT group: coordinating from here: {} member(s), newest cut {last}, committed {}",
            ready.len(),
            self.committed
        );
        self.announce_peers();
        // Whoever missed the old coordinator's last commit gets it now.
        let committed = self.committed;
        let behind: Vec<usize> = ready
            .iter()
            .filter(|c| self.members.get(c).is_some_and(|m| m.committed < committed))
            .copied()
            .collect();
        self.hub
            .send_all(behind, &PrimaryMsg::Commit { epoch: committed });
        self.try_commit();
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
        self.gathering.is_none()
            && ready().next().is_some()
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
                            id: 0,
                            ready: false,
                            macs: Vec::new(),
                            acked: 0,
                            sent: 0,
                            cut: None,
                            barrier: Barrier::Done,
                            committed: 0,
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

    /// Whether another connection already speaks for member `member`.
    fn id_taken(&self, conn: usize, member: u64) -> bool {
        self.members
            .iter()
            .any(|(c, m)| *c != conn && m.id == member && m.id != 0)
    }

    fn handle_message(&mut self, id: usize, msg: PrimaryMsg) -> Option<PrimaryMsg> {
        log::trace!("FT group: member {id}: {msg:?}");
        match msg {
            PrimaryMsg::Join { id: member, macs } => {
                if member == 0 || self.id_taken(id, member) {
                    return self.drop_member(id, "joined with an id in use");
                }
                if let Some(m) = self.members.get_mut(&id) {
                    m.id = member;
                    m.macs = macs;
                }
                let welcome = PrimaryMsg::Welcome {
                    group_id: self.group_id,
                    epoch_ms: self.timing.epoch.as_millis() as u64,
                    heartbeat_timeout_ms: self.timing.heartbeat_timeout.as_millis() as u64,
                };
                self.hub.send(id, &welcome);
            }
            PrimaryMsg::Rejoin {
                id: member,
                group_id,
                macs,
                ready,
                cut,
                barrier,
                sent,
                acked,
                committed,
                known,
                degrade,
                lost,
            } => {
                if group_id != self.group_id {
                    // A new group took the path meanwhile (everyone else had gone).
                    self.hub.send(
                        id,
                        &PrimaryMsg::Degrade {
                            reason: "the FT group is gone (a new group took its socket)".into(),
                        },
                    );
                    self.members.remove(&id);
                    self.hub.remove(id);
                    return None;
                }
                if member == 0 || self.id_taken(id, member) {
                    return self.drop_member(id, "rejoined with an id in use");
                }
                let last_cut = self.last_cut;
                let gathering = self.gathering.is_some();
                if !gathering && ready && cut.is_some() {
                    // It was cut with the group, yet nobody who came back knew it: its
                    // state cannot be trusted to be the group's.
                    return Some(PrimaryMsg::Fail {
                        reason: format!(
                            "group member {member:x} came back after the group went on without it"
                        ),
                    });
                }
                if let Some(m) = self.members.get_mut(&id) {
                    m.id = member;
                    m.macs = macs;
                    m.ready = ready;
                    m.cut = cut;
                    m.barrier = barrier;
                    m.committed = committed;
                    m.sent = sent;
                    m.acked = acked;
                    if !gathering && ready {
                        // Never cut: as a member becoming ready now.
                        m.acked = m.acked.max(last_cut);
                        m.sent = m.sent.max(last_cut);
                    }
                }
                self.committed = self.committed.max(committed);
                if let Some(g) = &mut self.gathering {
                    g.rejoined.insert(member);
                    g.expected.extend(known);
                    g.lost.extend(lost);
                } else if ready {
                    self.announce_peers();
                }
                if let Some(reason) = degrade {
                    return Some(PrimaryMsg::Degrade { reason });
                }
            }
            PrimaryMsg::Ready => {
                let last_cut = self.last_cut;
                let gathering = self.gathering.is_some();
                if let Some(member) = self.members.get_mut(&id) {
                    member.ready = true;
                    member.acked = last_cut;
                    member.sent = last_cut;
                    member.cut = None;
                }
                log::info!("FT group: member {id} protected");
                if !gathering {
                    self.announce_peers();
                }
            }
            PrimaryMsg::Paused { epoch } => {
                if self.gathering.is_some() {
                    if let Some(m) = self.members.get_mut(&id) {
                        if m.cut == Some(epoch) {
                            m.barrier = Barrier::Paused;
                        }
                    }
                    return None;
                }
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
                let member = self.members.remove(&id).map(|m| m.id);
                self.hub.remove(id);
                if let Some(g) = &mut self.gathering {
                    if let Some(member) = member {
                        g.expected.remove(&member);
                    }
                    return None;
                }
                self.forget_in_cut(id);
                self.announce_peers();
                self.try_commit();
            }
            PrimaryMsg::Degrade { reason } => return Some(PrimaryMsg::Degrade { reason }),
            other => {
                log::warn!("FT group: member {id} sent {other:?}; dropping it");
                return self.drop_member(id, "broke the protocol");
            }
        }
        None
    }

    /// Drops a connection that misbehaved; a protected member doing so fails the group.
    fn drop_member(&mut self, id: usize, what: &str) -> Option<PrimaryMsg> {
        let was_ready = self.members.remove(&id).is_some_and(|m| m.ready);
        self.hub.remove(id);
        if was_ready {
            return Some(PrimaryMsg::Fail {
                reason: format!("group member {id} {what}"),
            });
        }
        self.forget_in_cut(id);
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
        if self.gathering.is_some() {
            // Not every member's word is in yet.
            return;
        }
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
        let members: Vec<&MemberState> =
            ready.iter().filter_map(|id| self.members.get(id)).collect();
        let msg = PrimaryMsg::Peers {
            macs: members
                .iter()
                .flat_map(|m| m.macs.iter().copied())
                .collect(),
            members: members.len() as u64,
            ids: members.iter().map(|m| m.id).collect(),
            coordinator: self.host,
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
        self.hub.stop_accepting();
        let _ = std::fs::remove_file(&self.hub.path);
        let ready = self.ready_ids();
        self.hub.send_all(ready.iter().copied(), &end);
        // A connection that has not said who it is yet may be a protected member rejoining:
        // it shares the group's end (one joining afresh then fails to join).
        let unknown: Vec<usize> = self
            .members
            .iter()
            .filter(|(_, m)| m.id == 0 && !m.ready)
            .map(|(c, _)| *c)
            .collect();
        self.hub.send_all(unknown.iter().copied(), &end);
        // A member still synchronising is not protected by the group yet: it runs on, alone.
        let syncing: Vec<usize> = self
            .members
            .keys()
            .filter(|id| !ready.contains(id) && !unknown.contains(id))
            .copied()
            .collect();
        let alone = PrimaryMsg::Degrade {
            reason: "the FT group ended before this member's synchronisation finished".into(),
        };
        self.hub.send_all(syncing, &alone);
        self.hub.dissolve();
    }
}

/// What a member tells a new coordinator (see [`PrimaryMsg::Rejoin`]): kept up to date with
/// every message it sends and gets.
#[derive(Clone, Default)]
struct Track {
    ready: bool,
    cut: Option<u64>,
    barrier: Barrier,
    sent: u64,
    acked: u64,
    committed: u64,
    known: Vec<u64>,
    degrade: Option<String>,
    /// The group ended for this member (Fail or Degrade): nothing to rejoin.
    ended: bool,
    /// The member whose VMM runs the current coordinator (from its Peers).
    coordinator_host: Option<u64>,
    /// The current coordinator said HandOff: its connection's end is not its VMM's death.
    handed_off: bool,
    /// Members seen to end with a coordinator's process: told to every later coordinator (a
    /// member may have to rejoin more than once before one decides).
    lost: Vec<u64>,
}

/// A primary member's connection to its coordinator, shared with the thread that listens.
struct Link {
    path: String,
    id: u64,
    macs: Vec<[u8; 6]>,
    group_id: u64,
    timing: GroupTiming,
    /// Lock order: `writer`, then `track`.
    writer: Mutex<UnixStream>,
    track: Mutex<Track>,
    /// The coordinator, while this VMM holds the role.
    coordinator: Mutex<Option<PrimaryCoordinator>>,
    /// The current coordinator's process, when it is another VMM (see [`peer_process`]).
    coordinator_process: Mutex<Option<OwnedFd>>,
    /// Left on purpose: never rejoin.
    left: AtomicBool,
}

impl Link {
    fn track(&self) -> std::sync::MutexGuard<'_, Track> {
        self.track.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection to the coordinator closed without an ending order: the member its VMM
    /// hosted, if that VMM's process has ended (a crash or kill, not a hand-off). Such a member
    /// will never rejoin, and saying so spares the group the new coordinator's rejoin wait.
    fn lost_with_coordinator(&self) -> Option<u64> {
        let (host, handed_off) = {
            let t = self.track();
            (t.coordinator_host, t.handed_off)
        };
        let host = host.filter(|h| *h != self.id && !handed_off)?;
        let process = self
            .coordinator_process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        process_ended(&process, DEATH_WAIT).then_some(host)
    }

    /// Connects to the group's coordinator again, becoming it if the role is free, and
    /// rejoins with this member's state. Returns the new connection's reader.
    fn rejoin(&self) -> Result<LineReader, String> {
        let socket = Path::new(&self.path);
        let (stream, role) = connect_or_bind(socket, true).map_err(|e| e.to_string())?;
        *self
            .coordinator_process
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = peer_process(&stream);
        if let Some((listener, role)) = role {
            log::info!("FT group: coordinating group {} from here", self.path);
            let coordinator = PrimaryCoordinator::start(
                listener,
                role,
                socket,
                self.group_id,
                self.timing,
                self.id,
                true,
            )
            .map_err(|e| format!("group {}: {e}", self.path))?;
            *self.coordinator.lock().unwrap_or_else(|p| p.into_inner()) = Some(coordinator);
            if self.left.load(Ordering::SeqCst) {
                // `leave` ran meanwhile and found no coordinator to hand on.
                if let Some(c) = self
                    .coordinator
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                {
                    c.hand_off();
                }
            }
        }
        let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
        writer
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut current = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if self.left.load(Ordering::SeqCst) {
            // `leave` came first: it must not come back (checked under the writer's lock,
            // which `leave` takes to say Leave).
            return Err("left the group".into());
        }
        let t = {
            let mut t = self.track();
            // Until the new coordinator's Peers.
            t.coordinator_host = None;
            t.handed_off = false;
            t.clone()
        };
        let rejoin = PrimaryMsg::Rejoin {
            id: self.id,
            group_id: self.group_id,
            macs: self.macs.clone(),
            ready: t.ready,
            cut: t.cut,
            barrier: t.barrier,
            sent: t.sent,
            acked: t.acked,
            committed: t.committed,
            known: t.known,
            degrade: t.degrade,
            lost: t.lost,
        };
        send_line(&mut writer, &rejoin).map_err(|e| e.to_string())?;
        // From here on whatever this member says goes to the new coordinator, after Rejoin.
        let _ = current.shutdown(std::net::Shutdown::Both);
        *current = writer;
        Ok(LineReader::new(stream))
    }
}

/// A primary's membership in a group.
pub struct PrimaryMember {
    link: Arc<Link>,
    reader: Mutex<Option<LineReader>>,
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
        let id = new_member_id().max(1);
        let (stream, role) = connect_or_bind(socket, false)?;
        let socket_err = |source| GroupError::Socket {
            path: path.to_string(),
            source,
        };
        let coordinator = match role {
            Some((listener, role)) => {
                log::info!("FT group: creating group {path}");
                Some(
                    PrimaryCoordinator::start(
                        listener,
                        role,
                        socket,
                        new_group_id,
                        timing,
                        id,
                        false,
                    )
                    .map_err(socket_err)?,
                )
            }
            None => None,
        };
        let fail = |message: String| GroupError::Protocol {
            path: path.to_string(),
            message,
        };
        let coordinator_process = peer_process(&stream);
        let mut writer = stream.try_clone().map_err(socket_err)?;
        writer
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(socket_err)?;
        let join = PrimaryMsg::Join {
            id,
            macs: macs.clone(),
        };
        send_line(&mut writer, &join).map_err(socket_err)?;
        stream
            .set_read_timeout(Some(JOIN_TIMEOUT))
            .map_err(socket_err)?;
        let mut reader = LineReader::new(stream);
        let mut known = Vec::new();
        let mut coordinator_host = None;
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
                PrimaryMsg::Peers {
                    ids, coordinator, ..
                } => {
                    known = ids;
                    coordinator_host = Some(coordinator);
                }
                other => return Err(fail(format!("expected Welcome, got {other:?}"))),
            }
        };
        reader
            .reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(socket_err)?;
        Ok(Self {
            link: Arc::new(Link {
                path: path.to_string(),
                id,
                macs,
                group_id,
                timing,
                writer: Mutex::new(writer),
                track: Mutex::new(Track {
                    known,
                    coordinator_host,
                    ..Track::default()
                }),
                coordinator: Mutex::new(coordinator),
                coordinator_process: Mutex::new(coordinator_process),
                left: AtomicBool::new(false),
            }),
            reader: Mutex::new(Some(reader)),
            group_id,
            timing,
        })
    }

    pub fn path(&self) -> &str {
        &self.link.path
    }

    /// Sends `msg` to the coordinator. A connection that broke is not an error here: the
    /// listening thread rejoins the next coordinator with what this member said meanwhile.
    pub fn send(&self, msg: &PrimaryMsg) -> Result<(), String> {
        let mut writer = self.link.writer.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut t = self.link.track();
            match msg {
                PrimaryMsg::Ready => t.ready = true,
                PrimaryMsg::Paused { epoch } if t.cut == Some(*epoch) => {
                    t.barrier = Barrier::Paused
                }
                PrimaryMsg::Sent { epoch, .. } => t.sent = t.sent.max(*epoch),
                PrimaryMsg::Acked { epoch } => t.acked = t.acked.max(*epoch),
                PrimaryMsg::Degrade { reason } => t.degrade = Some(reason.clone()),
                _ => {}
            }
        }
        match send_line(&mut writer, msg) {
            Ok(()) => Ok(()),
            Err(e) if self.link.left.load(Ordering::SeqCst) || self.link.track().ended => {
                Err(format!("group {}: {e}", self.link.path))
            }
            Err(e) => {
                log::info!(
                    "FT group {}: {e}; the next coordinator learns it",
                    self.link.path
                );
                // The listening thread sees the connection end and rejoins.
                let _ = writer.shutdown(std::net::Shutdown::Both);
                Ok(())
            }
        }
    }

    /// Starts the thread that hands every coordinator message to `handle`. When the
    /// coordinator goes without ending the group (it handed the role on, or its VMM ended),
    /// the thread rejoins the next one (see the module doc); when the group ended for this
    /// member or no coordinator can be found, `handle` gets `Err(why)` once and the thread
    /// ends.
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
        let link = self.link.clone();
        std::thread::Builder::new()
            .name("ft-group-member".into())
            .spawn(move || {
                if !vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    return;
                }
                loop {
                    match reader.next::<PrimaryMsg>() {
                        Ok(msg) => {
                            note_received(&link, &msg);
                            if !matches!(msg, PrimaryMsg::HandOff { .. }) {
                                handle(Ok(msg));
                            }
                        }
                        Err(why) => {
                            if link.left.load(Ordering::SeqCst) || link.track().ended {
                                handle(Err(why));
                                return;
                            }
                            match link.lost_with_coordinator() {
                                Some(host) => {
                                    log::warn!(
                                        "FT group {}: the coordinator's VMM ended ({why}), and \
                                         member {host:x} with it; rejoining",
                                        link.path
                                    );
                                    link.track().lost.push(host);
                                }
                                None => log::info!(
                                    "FT group {}: the coordinator went ({why}); rejoining",
                                    link.path
                                ),
                            }
                            match link.rejoin() {
                                Ok(next) => reader = next,
                                Err(e) => {
                                    handle(Err(format!("{why}; no coordinator to rejoin: {e}")));
                                    return;
                                }
                            }
                        }
                    }
                }
            })
            .map_err(|e| format!("group listener thread: {e}"))
    }

    /// Leaves the group on purpose; the others stay protected. When this VMM hosts the
    /// coordinator, the role passes to another member.
    pub fn leave(&self, reason: &str) {
        self.link.left.store(true, Ordering::SeqCst);
        let coordinator = self
            .link
            .coordinator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(coordinator) = coordinator {
            log::info!("FT group: leaving ({reason}); handing the coordinator role on");
            coordinator.hand_off();
        } else {
            let _ = self.send(&PrimaryMsg::Leave);
        }
        let writer = self.link.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writer.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
impl PrimaryMember {
    /// Tests: the member's VMM is killed (no goodbye; its coordinator, if any, ends with it).
    fn die(&self) {
        self.link.left.store(true, Ordering::SeqCst);
        if let Some(c) = self
            .link
            .coordinator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            c.vanish();
        }
        let writer = self.link.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writer.shutdown(std::net::Shutdown::Both);
    }
}

/// Keeps a member's [`Track`] up to date with what its coordinator tells it.
fn note_received(link: &Link, msg: &PrimaryMsg) {
    let mut t = link.track();
    match msg {
        PrimaryMsg::Cut { epoch, barrier } => {
            t.cut = Some(*epoch);
            t.barrier = if *barrier {
                Barrier::Pausing
            } else {
                Barrier::Done
            };
        }
        PrimaryMsg::Resume { epoch } if t.cut == Some(*epoch) => t.barrier = Barrier::Done,
        PrimaryMsg::Commit { epoch } => t.committed = t.committed.max(*epoch),
        PrimaryMsg::Peers {
            ids, coordinator, ..
        } => {
            t.known = ids.clone();
            t.coordinator_host = Some(*coordinator);
        }
        PrimaryMsg::HandOff { leaver } => {
            t.handed_off = true;
            // The next coordinator must not wait for it.
            t.known.retain(|id| id != leaver);
        }
        PrimaryMsg::Fail { .. } | PrimaryMsg::Degrade { .. } => t.ended = true,
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Backup side.

/// The backup side's coordinator, in the VMM of the backup holding the role. It runs until
/// that backup stands down or exits (then the role passes on) or the group has failed over.
pub struct BackupCoordinator {
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

struct BackupCoordination {
    hub: Hub<BackupMsg>,
    stop: Arc<Stop>,
    /// Connection -> member id (0 until it said Join).
    members: BTreeMap<usize, u64>,
    /// A coordinator that took the role over: until this time, or until every member known
    /// to those back is back, it decides nothing (a report must not be decided on alone).
    gathering: Option<(Instant, BTreeSet<u64>)>,
    reports: BTreeMap<usize, Option<u64>>,
    /// When the members not yet reporting are frozen, and when the decision is taken anyway.
    freeze_at: Option<Instant>,
    decide_at: Option<Instant>,
}

/// How long a backup coordinator that took the role over waits for the members to rejoin.
const BACKUP_GATHER: Duration = Duration::from_secs(1);

/// After freezing, how long the frozen members have to report.
const FREEZE_REPORT: Duration = Duration::from_secs(2);

impl BackupCoordinator {
    fn start(
        listener: UnixListener,
        role: Role,
        path: &Path,
        resuming: bool,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(Stop::default());
        let hub = Hub::start(listener, path.to_path_buf())?;
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ft-group-backup".into())
            .spawn(move || {
                // Released when this thread ends, after the coordinator stopped serving.
                let _role = role;
                if !vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    return;
                }
                BackupCoordination {
                    hub,
                    stop: s,
                    members: BTreeMap::new(),
                    gathering: resuming.then(|| (Instant::now() + BACKUP_GATHER, BTreeSet::new())),
                    reports: BTreeMap::new(),
                    freeze_at: None,
                    decide_at: None,
                }
                .run()
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops coordinating here; the other members rejoin the next holder of the role.
    fn hand_off(mut self) {
        self.stop.hand_off.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Tests: the coordinator ends as if its process had been killed.
    #[cfg(test)]
    fn vanish(mut self) {
        self.stop.vanish.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl BackupCoordination {
    fn run(&mut self) {
        loop {
            if self.stop.vanished() {
                self.hub.abandon();
                return;
            }
            if self.stop.hand_off.load(Ordering::SeqCst) {
                log::info!("FT group: this backup leaves; handing the coordinator role on");
                self.hub.dissolve();
                return;
            }
            let now = Instant::now();
            let gather_until = self.gathering.as_ref().map(|(t, _)| *t);
            let wake = [self.freeze_at, self.decide_at, gather_until]
                .into_iter()
                .flatten()
                .min()
                .map_or(Duration::from_millis(50), |t| {
                    t.saturating_duration_since(now)
                })
                .min(Duration::from_millis(50));
            match self.hub.events.recv_timeout(wake) {
                Ok(Event::Connected(stream)) => {
                    if let Some(id) = self.hub.add(stream) {
                        self.members.insert(id, 0);
                    }
                }
                Ok(Event::Gone(id, why)) => {
                    log::info!("FT group: backup member {id} gone ({why})");
                    self.members.remove(&id);
                    self.reports.remove(&id);
                    self.hub.remove(id);
                    self.announce();
                }
                Ok(Event::Message(conn, BackupMsg::Join { id, known })) => {
                    if let Some(m) = self.members.get_mut(&conn) {
                        *m = id;
                    }
                    if let Some((_, expected)) = &mut self.gathering {
                        expected.extend(known);
                    }
                    self.announce();
                }
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
                    self.reports.remove(&id);
                    self.hub.remove(id);
                    self.announce();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            if let Some((until, expected)) = &self.gathering {
                let back: BTreeSet<u64> = self
                    .members
                    .values()
                    .copied()
                    .filter(|id| *id != 0)
                    .collect();
                if now < *until && (back.is_empty() || !expected.is_subset(&back)) {
                    continue;
                }
                // Whoever is not back by now is gone (its primary degrades the group).
                log::info!("FT group: coordinating {} backup(s) from here", back.len());
                self.gathering = None;
            }
            if self.freeze_at.is_some_and(|t| now >= t) && self.decide_at.is_none() {
                let silent: Vec<usize> = self
                    .members
                    .keys()
                    .filter(|id| !self.reports.contains_key(id))
                    .copied()
                    .collect();
                self.hub.send_all(silent, &BackupMsg::Freeze);
                self.decide_at = Some(now + FREEZE_REPORT);
            }
            let everyone = !self.reports.is_empty()
                && self.members.keys().all(|id| self.reports.contains_key(id));
            if everyone || self.decide_at.is_some_and(|t| now >= t) {
                self.decide();
                return;
            }
        }
    }

    /// Tells every member who the members are (for the next coordinator, if any).
    fn announce(&mut self) {
        let ids: Vec<u64> = self
            .members
            .values()
            .copied()
            .filter(|id| *id != 0)
            .collect();
        let all: Vec<usize> = self.members.keys().copied().collect();
        self.hub.send_all(all, &BackupMsg::Members { ids });
    }

    /// Every member resumes from the oldest newest-complete epoch reported.
    fn decide(&mut self) {
        // A member that holds no group epoch yet (it joined during the last epochs) cannot
        // resume; the others still agree among themselves.
        let epoch = self.reports.values().flatten().min().copied();
        log::warn!("FT group: every backup resumes from group epoch {epoch:?}");
        self.hub.stop_accepting();
        let _ = std::fs::remove_file(&self.hub.path);
        let all: Vec<usize> = self.members.keys().copied().collect();
        self.hub.send_all(all, &BackupMsg::TakeOver { epoch });
        self.hub.dissolve();
    }
}

/// A backup member's connection to its coordinator, shared with the thread that listens.
struct BackupLink {
    path: String,
    id: u64,
    /// The members the coordinator named last.
    known: Mutex<Vec<u64>>,
    writer: Mutex<UnixStream>,
    /// The Lost report sent, said again to a new coordinator.
    lost: Mutex<Option<BackupMsg>>,
    coordinator: Mutex<Option<BackupCoordinator>>,
    /// Stood down: never rejoin.
    left: AtomicBool,
}

impl BackupLink {
    /// Connects to the group's coordinator again (becoming it if the role is free), joins,
    /// and reports again a lost primary. Returns the new connection's reader.
    fn rejoin(&self) -> Result<LineReader, String> {
        let socket = Path::new(&self.path);
        let (stream, role) = connect_or_bind(socket, true).map_err(|e| e.to_string())?;
        if let Some((listener, role)) = role {
            log::info!(
                "FT group: coordinating the backups of group {} from here",
                self.path
            );
            let coordinator = BackupCoordinator::start(listener, role, socket, true)
                .map_err(|e| format!("group {}: {e}", self.path))?;
            *self.coordinator.lock().unwrap_or_else(|p| p.into_inner()) = Some(coordinator);
            if self.left.load(Ordering::SeqCst) {
                if let Some(c) = self
                    .coordinator
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                {
                    c.hand_off();
                }
            }
        }
        let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
        writer
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut current = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if self.left.load(Ordering::SeqCst) {
            return Err("left the group".into());
        }
        let join = BackupMsg::Join {
            id: self.id,
            known: self.known.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        send_line(&mut writer, &join).map_err(|e| e.to_string())?;
        if let Some(lost) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            send_line(&mut writer, &lost).map_err(|e| e.to_string())?;
        }
        let _ = current.shutdown(std::net::Shutdown::Both);
        *current = writer;
        Ok(LineReader::new(stream))
    }
}

/// A backup's membership in a group.
pub struct BackupMember {
    link: Arc<BackupLink>,
    reader: Option<LineReader>,
}

impl BackupMember {
    pub fn join(path: &str) -> Result<Self, GroupError> {
        let socket = Path::new(path);
        let (stream, role) = connect_or_bind(socket, false)?;
        let socket_err = |source| GroupError::Socket {
            path: path.to_string(),
            source,
        };
        let coordinator = match role {
            Some((listener, role)) => {
                log::info!("FT group: coordinating the backups of group {path}");
                Some(BackupCoordinator::start(listener, role, socket, false).map_err(socket_err)?)
            }
            None => None,
        };
        let mut writer = stream.try_clone().map_err(socket_err)?;
        writer
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(socket_err)?;
        let id = new_member_id().max(1);
        let join = BackupMsg::Join {
            id,
            known: Vec::new(),
        };
        send_line(&mut writer, &join).map_err(socket_err)?;
        Ok(Self {
            link: Arc::new(BackupLink {
                path: path.to_string(),
                id,
                known: Mutex::new(Vec::new()),
                writer: Mutex::new(writer),
                lost: Mutex::new(None),
                coordinator: Mutex::new(coordinator),
                left: AtomicBool::new(false),
            }),
            reader: Some(LineReader::new(stream)),
        })
    }

    pub fn path(&self) -> &str {
        &self.link.path
    }

    /// Starts the thread that waits for the coordinator: `on_freeze` runs when the member must
    /// stop receiving from its primary; the decision (or why there is none) goes to the
    /// returned channel. A coordinator that goes without a decision is replaced (see the
    /// module doc).
    pub fn listen(
        &mut self,
        on_freeze: impl Fn() + Send + 'static,
    ) -> Result<Receiver<Result<Option<u64>, String>>, String> {
        let mut reader = self
            .reader
            .take()
            .ok_or_else(|| "the group is already being listened to".to_string())?;
        let link = self.link.clone();
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
                        Ok(BackupMsg::Members { ids }) => {
                            *link.known.lock().unwrap_or_else(|p| p.into_inner()) = ids;
                        }
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
                            if link.left.load(Ordering::SeqCst) {
                                return;
                            }
                            match link.rejoin() {
                                Ok(next) => reader = next,
                                Err(e) => {
                                    let _ = tx.send(Err(format!(
                                        "the group's coordinator is gone ({why}) and none could be rejoined: {e}"
                                    )));
                                    return;
                                }
                            }
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
        let mut writer = self.link.writer.lock().unwrap_or_else(|p| p.into_inner());
        *self.link.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
        if let Err(e) = send_line(&mut writer, &msg) {
            // The listening thread rejoins the next coordinator and reports again.
            log::info!(
                "FT group {}: {e}; the next coordinator learns it",
                self.link.path
            );
            let _ = writer.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    }
}

impl Drop for BackupMember {
    fn drop(&mut self) {
        self.link.left.store(true, Ordering::SeqCst);
        let coordinator = self
            .link
            .coordinator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(coordinator) = coordinator {
            coordinator.hand_off();
        }
        let writer = self.link.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writer.shutdown(std::net::Shutdown::Both);
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
                id: 3,
                macs: vec![[1, 2, 3, 4, 5, 6]],
            },
            PrimaryMsg::Rejoin {
                id: 3,
                group_id: 9,
                macs: vec![],
                ready: true,
                cut: Some(4),
                barrier: Barrier::Pausing,
                sent: 3,
                acked: 2,
                committed: 1,
                known: vec![3, 5],
                degrade: None,
                lost: vec![5],
            },
            PrimaryMsg::Peers {
                macs: vec![[1, 2, 3, 4, 5, 6]],
                members: 1,
                ids: vec![3],
                coordinator: 3,
            },
            PrimaryMsg::HandOff { leaver: 3 },
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
        let bound = connect_or_bind(Path::new(&path), false);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let (_stream, listener) = bound.unwrap();
        assert!(listener.is_some());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "group socket mode {mode:o}");
        // The coordinator role's lock file too.
        let lock = std::fs::metadata(format!("{path}.lock")).unwrap();
        assert_eq!(lock.permissions().mode() & 0o777, 0o600);
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
        assert!(a.link.coordinator.lock().unwrap().is_some());
        assert!(b.link.coordinator.lock().unwrap().is_none());
        let ra = listen(&a);
        let rb = listen(&b);
        a.send(&PrimaryMsg::Ready).unwrap();
        b.send(&PrimaryMsg::Ready).unwrap();
        let peers = next_matching(&ra, |m| matches!(m, PrimaryMsg::Peers { members: 2, .. }));
        assert_eq!(
            peers,
            PrimaryMsg::Peers {
                macs: vec![[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]],
                members: 2,
                ids: vec![a.link.id, b.link.id],
                coordinator: a.link.id,
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
        b.die();
        let fail = next_matching(&ra, |m| matches!(m, PrimaryMsg::Fail { .. }));
        assert!(format!("{fail:?}").contains("lost"), "{fail:?}");
        assert!(
            !Path::new(&path).exists(),
            "the dissolved group's socket remains"
        );
    }

    #[test]
    fn the_creator_leaving_hands_off_and_a_joiner_mid_sync_is_not_waited_for() {
        let (_dir, path) = socket_path("leave");
        let a = PrimaryMember::join(&path, vec![], timing(), 1).unwrap();
        let b = PrimaryMember::join(&path, vec![], timing(), 2).unwrap();
        let c = PrimaryMember::join(&path, vec![], timing(), 3).unwrap();
        let rb = listen(&b);
        let _rc = listen(&c);
        b.send(&PrimaryMsg::Ready).unwrap();
        // a and c never say Ready (still synchronising): b is cut alone, without a barrier,
        // and cut again once it has sent the epoch.
        let PrimaryMsg::Cut { epoch, barrier } =
            next_matching(&rb, |m| matches!(m, PrimaryMsg::Cut { .. }))
        else {
            unreachable!()
        };
        assert!(!barrier);
        b.send(&PrimaryMsg::Sent { epoch, send_us: 1 }).unwrap();
        b.send(&PrimaryMsg::Acked { epoch }).unwrap();
        next_matching(&rb, |m| *m == PrimaryMsg::Commit { epoch });
        next_matching(
            &rb,
            |m| matches!(m, PrimaryMsg::Cut { epoch: e, .. } if *e == epoch + 1),
        );
        // The creator leaves: the role passes on, b stays protected, numbering goes on.
        a.leave("disabled");
        b.send(&PrimaryMsg::Sent {
            epoch: epoch + 1,
            send_us: 1,
        })
        .unwrap();
        let next = next_matching(&rb, |m| {
            matches!(
                m,
                PrimaryMsg::Cut { .. } | PrimaryMsg::Degrade { .. } | PrimaryMsg::Fail { .. }
            )
        });
        assert_eq!(
            next,
            PrimaryMsg::Cut {
                epoch: epoch + 2,
                barrier: false
            }
        );
        b.send(&PrimaryMsg::Acked { epoch: epoch + 2 }).unwrap();
        next_matching(&rb, |m| *m == PrimaryMsg::Commit { epoch: epoch + 2 });
        let holders = [&b, &c]
            .iter()
            .filter(|m| m.link.coordinator.lock().unwrap().is_some())
            .count();
        assert_eq!(holders, 1, "one of the remaining members coordinates");
        let (most, taken) = roles::stats(Path::new(&path));
        assert_eq!((most, taken), (1, 2));
    }

    /// Three protected members cut at `epoch`: returns after each got the Cut.
    fn cut_all(rxs: &[&Receiver<Result<PrimaryMsg, String>>], epoch: u64) {
        for rx in rxs {
            next_matching(rx, |m| {
                *m == PrimaryMsg::Cut {
                    epoch,
                    barrier: true,
                }
            });
        }
    }

    fn three(path: &str) -> Vec<PrimaryMember> {
        let slow = GroupTiming {
            epoch: Duration::from_millis(200),
            ..timing()
        };
        (0..3)
            .map(|i| PrimaryMember::join(path, vec![[2, 0, 0, 0, 0, i]], slow, 7).unwrap())
            .collect()
    }

    /// Three members, all protected (the last to hear of it has heard of all three).
    fn three_protected(
        path: &str,
    ) -> (
        Vec<PrimaryMember>,
        Vec<Receiver<Result<PrimaryMsg, String>>>,
    ) {
        let m = three(path);
        let rx: Vec<_> = m.iter().map(listen).collect();
        for member in &m {
            member.send(&PrimaryMsg::Ready).unwrap();
        }
        next_matching(&rx[2], |m| {
            matches!(m, PrimaryMsg::Peers { members: 3, .. })
        });
        (m, rx)
    }

    #[test]
    fn the_coordinator_s_member_leaving_mid_barrier_releases_the_others_and_they_go_on() {
        let (_dir, path) = socket_path("midcut");
        let (m, rx) = three_protected(&path);
        cut_all(&[&rx[0], &rx[1], &rx[2]], 1);
        m[1].send(&PrimaryMsg::Paused { epoch: 1 }).unwrap();
        m[2].send(&PrimaryMsg::Paused { epoch: 1 }).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        // The creator leaves instead of pausing: the others were waiting only for it.
        m[0].leave("disabled");
        next_matching(&rx[1], |m| *m == PrimaryMsg::Resume { epoch: 1 });
        next_matching(&rx[2], |m| *m == PrimaryMsg::Resume { epoch: 1 });
        for i in [1, 2] {
            m[i].send(&PrimaryMsg::Sent {
                epoch: 1,
                send_us: 1,
            })
            .unwrap();
        }
        // The next coordinator goes on at 2, commits 1 only once both hold it.
        cut_all(&[&rx[1], &rx[2]], 2);
        m[1].send(&PrimaryMsg::Acked { epoch: 1 }).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        while let Ok(Ok(msg)) = rx[1].try_recv() {
            assert!(!matches!(msg, PrimaryMsg::Commit { .. }), "{msg:?}");
        }
        m[2].send(&PrimaryMsg::Acked { epoch: 1 }).unwrap();
        next_matching(&rx[1], |m| *m == PrimaryMsg::Commit { epoch: 1 });
        next_matching(&rx[2], |m| *m == PrimaryMsg::Commit { epoch: 1 });
        assert_eq!(roles::stats(Path::new(&path)).0, 1);
    }

    #[test]
    fn a_coordinator_killed_mid_barrier_is_replaced_and_the_cut_completes() {
        let (_dir, path) = socket_path("vanish");
        let (m, rx) = three_protected(&path);
        cut_all(&[&rx[0], &rx[1], &rx[2]], 1);
        m[1].send(&PrimaryMsg::Paused { epoch: 1 }).unwrap();
        m[2].send(&PrimaryMsg::Paused { epoch: 1 }).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        // The coordinator's thread vanishes (its socket file stays); its member lives on.
        let gone = m[0].link.coordinator.lock().unwrap().take().unwrap();
        gone.vanish();
        std::thread::sleep(Duration::from_millis(100));
        while let Ok(Ok(msg)) = rx[1].try_recv() {
            assert!(
                !matches!(msg, PrimaryMsg::Resume { .. } | PrimaryMsg::Cut { .. }),
                "{msg:?} before every member paused"
            );
        }
        // The last member pauses (to whichever coordinator now serves): all resume.
        m[0].send(&PrimaryMsg::Paused { epoch: 1 }).unwrap();
        for r in &rx {
            next_matching(r, |m| *m == PrimaryMsg::Resume { epoch: 1 });
        }
        for member in &m {
            member
                .send(&PrimaryMsg::Sent {
                    epoch: 1,
                    send_us: 1,
                })
                .unwrap();
            member.send(&PrimaryMsg::Acked { epoch: 1 }).unwrap();
        }
        next_matching(&rx[0], |m| *m == PrimaryMsg::Commit { epoch: 1 });
        cut_all(&[&rx[0], &rx[1], &rx[2]], 2);
        let (most, taken) = roles::stats(Path::new(&path));
        assert_eq!((most, taken), (1, 2));
    }

    #[test]
    fn the_coordinator_s_primary_dying_still_fails_the_group() {
        let (_dir, path) = socket_path("hostdies");
        let (m, rx) = three_protected(&path);
        cut_all(&[&rx[0], &rx[1], &rx[2]], 1);
        // Its VMM is killed: the coordinator and its member end at once.
        m[0].die();
        for r in &rx[1..] {
            let fail = next_matching(r, |m| matches!(m, PrimaryMsg::Fail { .. }));
            assert!(format!("{fail:?}").contains("lost"), "{fail:?}");
        }
    }

    /// A protected member rejoining when the group fails may not have said Rejoin yet: it
    /// must fail with the group, not run on alone as a member still synchronising would.
    #[test]
    fn a_connection_that_has_not_said_who_it_is_shares_the_group_s_failure() {
        let (_dir, path) = socket_path("unknown");
        let m: Vec<PrimaryMember> = (0..2)
            .map(|i| PrimaryMember::join(&path, vec![[2, 0, 0, 0, 0, i]], timing(), 7).unwrap())
            .collect();
        let rx: Vec<_> = m.iter().map(listen).collect();
        for member in &m {
            member.send(&PrimaryMsg::Ready).unwrap();
        }
        next_matching(&rx[0], |m| {
            matches!(m, PrimaryMsg::Peers { members: 2, .. })
        });
        let silent = UnixStream::connect(&path).unwrap();
        silent
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // Past the acceptor's poll: the coordinator has registered it.
        std::thread::sleep(ACCEPT_POLL * 5);
        m[1].die();
        let fail = next_matching(&rx[0], |m| matches!(m, PrimaryMsg::Fail { .. }));
        assert_eq!(LineReader::new(silent).next::<PrimaryMsg>(), Ok(fail));
    }

    /// `Rejoin.lost` naming an id no member knows of (a stale or made-up report) fails
    /// nothing: only a protected member that does not come back counts.
    #[test]
    fn a_lost_report_naming_no_member_of_the_group_is_ignored() {
        let (_dir, path) = socket_path("bogus");
        let (m, rx) = three_protected(&path);
        std::thread::sleep(Duration::from_millis(30));
        for r in &rx {
            while r.try_recv().is_ok() {}
        }
        m[1].link.track().lost.push(0xdead);
        // The coordinator's thread vanishes; its member lives on and rejoins with the rest.
        let gone = m[0].link.coordinator.lock().unwrap().take().unwrap();
        gone.vanish();
        // The new coordinator resumes the group (and says who is in it) instead of failing it.
        for r in &rx {
            let next = next_matching(r, |m| {
                matches!(m, PrimaryMsg::Peers { .. } | PrimaryMsg::Fail { .. })
            });
            assert!(
                matches!(next, PrimaryMsg::Peers { members: 3, .. }),
                "{next:?}"
            );
        }
    }

    /// Where [`coordinator_host_process`] creates its group.
    const HOST_PATH_ENV: &str = "FT_GROUP_TEST_HOST_PATH";
    /// What it prints once its member is protected.
    const HOST_READY: &str = "coordinator host ready";

    /// Not a test of its own: the VMM hosting the coordinator in
    /// [`a_coordinator_s_process_ending_fails_the_group_at_once`], run in a process of its own
    /// (this test binary again) so that it can be killed.
    #[test]
    #[ignore]
    fn coordinator_host_process() {
        let Ok(path) = std::env::var(HOST_PATH_ENV) else {
            return;
        };
        let quiet = GroupTiming {
            epoch: Duration::from_secs(60),
            ..timing()
        };
        let member = PrimaryMember::join(&path, vec![[2, 0, 0, 0, 1, 0]], quiet, 7).unwrap();
        assert!(member.link.coordinator.lock().unwrap().is_some());
        let _rx = listen(&member);
        member.send(&PrimaryMsg::Ready).unwrap();
        println!("{HOST_READY}");
        std::thread::sleep(Duration::from_secs(60));
    }

    #[test]
    fn a_coordinator_s_process_ending_fails_the_group_at_once() {
        use std::io::BufRead;
        let (_dir, path) = socket_path("hostproc");
        let mut host = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "group::tests::coordinator_host_process",
                "--ignored",
                "--nocapture",
            ])
            .env(HOST_PATH_ENV, &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(host.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains(HOST_READY) {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "the host process ended"
            );
        }
        let quiet = GroupTiming {
            epoch: Duration::from_secs(60),
            ..timing()
        };
        let m: Vec<PrimaryMember> = (0..2)
            .map(|i| PrimaryMember::join(&path, vec![[2, 0, 0, 0, 0, i]], quiet, 7).unwrap())
            .collect();
        let rx: Vec<_> = m.iter().map(listen).collect();
        for member in &m {
            assert!(member.link.coordinator.lock().unwrap().is_none());
            member.send(&PrimaryMsg::Ready).unwrap();
        }
        for r in &rx {
            next_matching(r, |m| matches!(m, PrimaryMsg::Peers { members: 3, .. }));
        }
        host.kill().unwrap();
        host.wait().unwrap();
        // Both learn it from the one that takes the role over, which need not wait for the
        // lost member to (never) come back.
        for r in &rx {
            let fail = next_matching(r, |m| matches!(m, PrimaryMsg::Fail { .. }));
            assert!(
                format!("{fail:?}").contains("ended with the group's old coordinator"),
                "{fail:?}"
            );
        }
    }

    #[test]
    fn the_backup_coordinator_leaving_hands_off_and_a_later_loss_is_still_one_decision() {
        let (_dir, path) = socket_path("bhand");
        let a = BackupMember::join(&path).unwrap();
        let mut b = BackupMember::join(&path).unwrap();
        let mut c = BackupMember::join(&path).unwrap();
        assert!(a.link.coordinator.lock().unwrap().is_some());
        let rb = b.listen(|| {}).unwrap();
        let (frozen_tx, frozen_rx) = mpsc::channel();
        let rc = c
            .listen(move || {
                let _ = frozen_tx.send(());
            })
            .unwrap();
        // b's primary is lost while the coordinator's host is still there; then the host
        // stands down: b reports again to the next coordinator, c is frozen by it.
        b.report_lost(Some(9), Duration::from_millis(300)).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        drop(a);
        frozen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        c.report_lost(Some(8), Duration::from_millis(300)).unwrap();
        for rx in [&rb, &rc] {
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(5)).unwrap(),
                Ok(Some(8))
            );
        }
        let (most, taken) = roles::stats(Path::new(&path));
        assert_eq!((most, taken), (1, 2));
    }

    #[test]
    fn a_killed_backup_coordinator_is_replaced() {
        let (_dir, path) = socket_path("bvanish");
        let mut m: Vec<BackupMember> = (0..3).map(|_| BackupMember::join(&path).unwrap()).collect();
        let rx: Vec<_> = m.iter_mut().map(|b| b.listen(|| {}).unwrap()).collect();
        let gone = m[0].link.coordinator.lock().unwrap().take().unwrap();
        gone.vanish();
        std::thread::sleep(Duration::from_millis(100));
        for (i, b) in m.iter_mut().enumerate() {
            b.report_lost(Some(20 + i as u64), Duration::from_millis(100))
                .unwrap();
        }
        for r in &rx {
            assert_eq!(
                r.recv_timeout(Duration::from_secs(5)).unwrap(),
                Ok(Some(20))
            );
        }
        let (most, taken) = roles::stats(Path::new(&path));
        assert_eq!((most, taken), (1, 2));
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

    /// What the members of a random run saw, for the invariants.
    #[derive(Default)]
    struct World {
        /// Group epoch -> the members cut at it.
        cuts: Mutex<BTreeMap<u64, BTreeSet<u64>>>,
        /// Member -> the group epochs its backup holds (logged before it says so).
        acks: Mutex<BTreeMap<u64, BTreeSet<u64>>>,
        /// Members that left (before they did).
        left: Mutex<BTreeSet<u64>>,
        commits: AtomicU64,
        errors: Mutex<Vec<String>>,
    }

    impl World {
        fn error(&self, e: String) {
            self.errors.lock().unwrap().push(e);
        }
    }

    /// A tiny deterministic generator (xorshift).
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }

    /// A member run by a thread as a primary's control loop would: pauses for each cut, sends
    /// and acknowledges it a little later, checks each commit it gets.
    struct Bot {
        member: Arc<PrimaryMember>,
        leave: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Bot {
        fn start(path: &str, world: &Arc<World>, seed: u64) -> Bot {
            let member = Arc::new(PrimaryMember::join(path, vec![], timing(), seed).unwrap());
            let leave = Arc::new(AtomicBool::new(false));
            let rx = listen(&member);
            member.send(&PrimaryMsg::Ready).unwrap();
            let (m, l, w) = (member.clone(), leave.clone(), world.clone());
            let thread = std::thread::spawn(move || bot_loop(&m, &l, &w, &rx, Rng(seed | 1)));
            Bot {
                member,
                leave,
                thread: Some(thread),
            }
        }

        fn stop(mut self) {
            self.leave.store(true, Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }

        fn hosts_coordinator(&self) -> bool {
            self.member.link.coordinator.lock().unwrap().is_some()
        }
    }

    fn bot_loop(
        member: &PrimaryMember,
        leave: &AtomicBool,
        world: &World,
        rx: &Receiver<Result<PrimaryMsg, String>>,
        mut rng: Rng,
    ) {
        let me = member.link.id;
        let mut pending: std::collections::VecDeque<(Instant, u64)> = Default::default();
        let mut last_cut: Option<u64> = None;
        let mut last_commit = 0;
        let on_commit = |epoch: u64, last_commit: &mut u64| {
            if epoch <= *last_commit {
                world.error(format!("{me:x}: commit {epoch} after {last_commit}"));
            }
            let cuts = world.cuts.lock().unwrap();
            let acks = world.acks.lock().unwrap();
            let left = world.left.lock().unwrap();
            for (g, cut) in cuts.range(*last_commit + 1..=epoch) {
                for m in cut.difference(&left) {
                    if !acks.get(m).is_some_and(|a| a.contains(g)) {
                        world.error(format!("commit {epoch}: {m:x} did not hold {g}"));
                    }
                }
            }
            if cuts.keys().next_back().is_none_or(|newest| *newest < epoch) {
                world.error(format!("commit {epoch} of an epoch never cut"));
            }
            *last_commit = epoch;
            world.commits.fetch_add(1, Ordering::SeqCst);
        };
        loop {
            if leave.load(Ordering::SeqCst) {
                world.left.lock().unwrap().insert(me);
                member.leave("the test says so");
                return;
            }
            while pending.front().is_some_and(|(at, _)| *at <= Instant::now()) {
                let Some((_, epoch)) = pending.pop_front() else {
                    break;
                };
                world
                    .acks
                    .lock()
                    .unwrap()
                    .entry(me)
                    .or_default()
                    .insert(epoch);
                member.send(&PrimaryMsg::Acked { epoch }).unwrap();
            }
            let msg = match rx.recv_timeout(Duration::from_millis(1)) {
                Ok(Ok(msg)) => msg,
                Ok(Err(e)) => return world.error(format!("{me:x}: {e}")),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            match msg {
                PrimaryMsg::Cut { epoch, barrier } => {
                    if last_cut.is_some_and(|c| epoch != c + 1) {
                        world.error(format!("{me:x}: cut {epoch} after {last_cut:?}"));
                    }
                    last_cut = Some(epoch);
                    world
                        .cuts
                        .lock()
                        .unwrap()
                        .entry(epoch)
                        .or_default()
                        .insert(me);
                    std::thread::sleep(Duration::from_micros(rng.below(2000)));
                    if leave.load(Ordering::SeqCst) {
                        // Leaves instead of pausing (the others may be paused already).
                        continue;
                    }
                    if barrier {
                        member.send(&PrimaryMsg::Paused { epoch }).unwrap();
                        loop {
                            match rx.recv_timeout(Duration::from_secs(5)) {
                                Ok(Ok(PrimaryMsg::Resume { epoch: e })) if e == epoch => break,
                                Ok(Ok(PrimaryMsg::Commit { epoch: c })) => {
                                    on_commit(c, &mut last_commit)
                                }
                                Ok(Ok(PrimaryMsg::Peers { .. })) => {}
                                other => {
                                    return world.error(format!(
                                        "{me:x}: paused for {epoch}, got {other:?}"
                                    ))
                                }
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_micros(rng.below(2000)));
                    member
                        .send(&PrimaryMsg::Sent {
                            epoch,
                            send_us: 100,
                        })
                        .unwrap();
                    // Backups acknowledge in order, now and then slowly.
                    let slow = if rng.below(5) == 0 { 60_000 } else { 8000 };
                    let at = Instant::now() + Duration::from_micros(rng.below(slow));
                    let at = pending.back().map_or(at, |(prev, _)| at.max(*prev));
                    pending.push_back((at, epoch));
                }
                PrimaryMsg::Commit { epoch } => on_commit(epoch, &mut last_commit),
                PrimaryMsg::Fail { .. } | PrimaryMsg::Degrade { .. } => {
                    return world.error(format!("{me:x}: {msg:?}"))
                }
                _ => {}
            }
        }
    }

    /// Members join and leave at random and the coordinator's member leaves or its thread is
    /// killed at random; whatever happens, the group's cuts are numbered 1, 2, 3... with no
    /// gap or repeat, each member's commits rise, every committed epoch is held by every
    /// member cut at it that is still in the group, and one side never has two coordinators.
    #[test]
    fn a_long_random_run_of_members_coming_and_going_keeps_the_invariants() {
        let (_dir, path) = socket_path("random");
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("random run seed {seed}");
        let mut rng = Rng(seed);
        let world = Arc::new(World::default());
        let mut bots = vec![Bot::start(&path, &world, rng.below(u64::MAX) | 1)];
        let (mut hand_offs, mut kills, mut leaves) = (0, 0, 0);
        let end = Instant::now() + Duration::from_secs(8);
        while Instant::now() < end && world.errors.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(40 + rng.below(80)));
            let host = bots.iter().position(Bot::hosts_coordinator);
            match rng.below(10) {
                _ if bots.len() < 2 => {
                    bots.push(Bot::start(&path, &world, rng.below(u64::MAX) | 1))
                }
                0..=2 if bots.len() < 5 => {
                    bots.push(Bot::start(&path, &world, rng.below(u64::MAX) | 1))
                }
                3 | 4 => {
                    let i = rng.below(bots.len() as u64) as usize;
                    leaves += 1;
                    bots.remove(i).stop();
                }
                5 | 6 => {
                    if let Some(i) = host {
                        hand_offs += 1;
                        bots.remove(i).stop();
                    }
                }
                7 => {
                    if let Some(i) = host {
                        let c = bots[i].member.link.coordinator.lock().unwrap().take();
                        if let Some(c) = c {
                            kills += 1;
                            c.vanish();
                        }
                    }
                }
                _ => {}
            }
        }
        let before = world.commits.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            world.commits.load(Ordering::SeqCst) > before,
            "the group stopped committing"
        );
        for bot in bots {
            bot.stop();
        }
        let errors = world.errors.lock().unwrap().clone();
        assert!(errors.is_empty(), "seed {seed}: {errors:#?}");
        let cuts = world.cuts.lock().unwrap();
        let numbers: Vec<u64> = cuts.keys().copied().collect();
        let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
        assert_eq!(numbers, expected, "seed {seed}: cut numbers with a gap");
        let (most, taken) = roles::stats(Path::new(&path));
        assert_eq!(most, 1, "seed {seed}: two coordinators at once");
        eprintln!(
            "random run: {} cuts, {} commits, {leaves} leaves, {hand_offs} hand-offs, {kills} \
             coordinators killed, the role taken {taken} times",
            numbers.len(),
            world.commits.load(Ordering::SeqCst)
        );
        assert!(
            taken > 1 && numbers.len() > 50,
            "seed {seed}: too little happened"
        );
    }
}
