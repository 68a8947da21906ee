//! Fencing witness: decides which side of a partitioned primary/backup pair may go on, so two
//! copies of one VM never both release output (split brain).
//!
//! # Model
//!
//! A witness is a small TCP service on a third host. Each protected pair has a `pair_id` (a `u64`
//! the primary picks when FT is enabled and tells the backup). A side that loses its peer asks the
//! witness to *claim* the pair before it releases any more output:
//!
//! - the first claim for a `pair_id` wins and is recorded (role, epoch, claimant);
//! - a later claim by the same role is granted again (an idempotent retry, e.g. after a lost
//!   answer);
//! - a claim by the other role is denied.
//!
//! So exactly one side goes on: a primary that lost its backup keeps running unprotected only if
//! granted (otherwise the backup is taking over and the primary must stop and drop its held
//! output); a backup that lost its primary resumes only if granted (otherwise the primary is alive
//! and the backup stays passive). A side that cannot get an answer within its timeout must treat
//! that as denied (safety over availability): every [`WitnessError`] means "fenced". Retrying a
//! claim is safe because it is idempotent. A decision is final: after a failover, protecting the
//! survivor with a new backup needs a new `pair_id`. The recorded epoch is the winner's epoch at
//! its claim, for the operator; it plays no part in the decision.
//!
//! # Wire format
//!
//! One JSON object per line (`\n`, an optional `\r` before it is ignored), at most [`MAX_LINE`]
//! bytes, over TCP; several requests may share a connection.
//!
//! ```text
//! -> {"claim":{"pair_id":7,"role":"primary","epoch":42,"claimant":"host-a"}}
//! <- {"granted":true,"winner":"primary","epoch":42}
//! -> {"status":{"pair_id":7}}
//! <- {"pair_id":7,"decision":{"winner":"primary","epoch":42,"claimant":"host-a"}}
//! <- {"pair_id":8,"decision":null}                        (nothing decided yet)
//! <- {"error":"malformed request: ..."}                   (then the witness closes)
//! <- {"error":"busy"}                     (over the connection cap, then the witness closes)
//! ```
//!
//! Unknown fields, wrong types, an over-long line or a connection idle past the timeout end the
//! connection (after an `{"error":..}` line where there is something to answer); they never
//! change the recorded decisions.
//!
//! # Persistence
//!
//! With a state file, a new decision is written (temporary file, fsync, rename, directory fsync)
//! before it is answered, so a restarted witness never reverses one; if that write fails the
//! claim is answered with an error and nothing is recorded. A state file that exists but cannot
//! be read stops the witness from starting rather than starting empty. Without a state file the
//! decisions live in memory only. One witness process per state file.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The longest request or response line, without its newline.
pub const MAX_LINE: usize = 4096;
/// Default time a connection may take to deliver each request line.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of connections served at once; more are answered `busy` and closed.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// Version of the state file layout.
const STATE_VERSION: u32 = 1;
/// How long a closing connection may keep draining input so the error line is not lost to a
/// TCP reset (closing with unread input resets the connection).
const LINGER: Duration = Duration::from_millis(500);
/// At most this much input is drained on close.
const LINGER_BYTES: usize = 256 * 1024;

/// Which side of a pair a claimant is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Backup,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        })
    }
}

/// A request to go on alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    pub pair_id: u64,
    pub role: Role,
    pub epoch: u64,
    pub claimant: String,
}

/// A query of a pair's decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    pub pair_id: u64,
}

/// One request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Claim(ClaimRequest),
    Status(StatusRequest),
}

/// The answer to a claim. `epoch` is the winner's epoch at its (first) claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimOutcome {
    pub granted: bool,
    pub winner: Role,
    pub epoch: u64,
}

/// A recorded decision for one pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub winner: Role,
    pub epoch: u64,
    pub claimant: String,
}

/// The answer to a status query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub pair_id: u64,
    pub decision: Option<Decision>,
}

#[derive(Serialize)]
struct ErrorReply<'a> {
    error: &'a str,
}

/// Why a request line was refused.
#[derive(Debug, Error)]
pub enum RequestError {
    #[error("request line of {len} bytes is longer than {max}")]
    TooLong { len: usize, max: usize },
    #[error("malformed request: {0}")]
    Malformed(#[source] serde_json::Error),
}

/// Decodes one request line (without its newline). Never panics, whatever the bytes.
pub fn decode_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_LINE {
        return Err(RequestError::TooLong {
            len: line.len(),
            max: MAX_LINE,
        });
    }
    serde_json::from_slice(line).map_err(RequestError::Malformed)
}

/// Why a client got no usable answer. Every variant means the caller is fenced.
#[derive(Debug, Error)]
pub enum WitnessError {
    #[error("witness {addr}: cannot resolve the address: {source}")]
    Resolve {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("witness {addr}: the address resolves to nothing")]
    NoAddress { addr: String },
    #[error("witness {addr}: cannot connect: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("witness {addr}: no answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("witness {addr}: cannot send the request: {source}")]
    Send {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("witness {addr}: cannot read the answer: {source}")]
    Receive {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("witness {addr}: connection closed without an answer")]
    Closed { addr: String },
    #[error("witness {addr}: answer longer than {max} bytes")]
    ResponseTooLong { addr: String, max: usize },
    #[error("witness {addr}: undecodable answer: {source}")]
    Decode {
        addr: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("witness {addr}: inconsistent answer: {detail}")]
    Inconsistent { addr: String, detail: String },
    #[error("witness {addr} refused the request: {message}")]
    Server { addr: String, message: String },
    #[error("cannot encode the witness request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("witness request of {len} bytes is longer than {max}")]
    RequestTooLong { len: usize, max: usize },
}

/// Talks to a witness; one connection per call.
#[derive(Clone, Debug)]
pub struct WitnessClient {
    /// `HOST:PORT`. A host name is resolved by the system resolver, which the timeout does not
    /// bound; use an IP address where that matters.
    pub addr: String,
    /// Bound on connect + send + answer for one call.
    pub timeout: Duration,
}

impl WitnessClient {
    pub fn new(addr: impl Into<String>, timeout: Duration) -> Self {
        Self {
            addr: addr.into(),
            timeout,
        }
    }

    /// Claims `pair_id` for `role`. `Ok` with `granted: false` means the other side won; an error
    /// means no answer: treat both as fenced.
    pub fn claim(
        &self,
        pair_id: u64,
        role: Role,
        epoch: u64,
        claimant: &str,
    ) -> Result<ClaimOutcome, WitnessError> {
        let request = Request::Claim(ClaimRequest {
            pair_id,
            role,
            epoch,
            claimant: claimant.to_owned(),
        });
        let outcome: ClaimOutcome = self.call(&request)?;
        // A witness that says "granted" to the loser (or the reverse) cannot be trusted.
        if outcome.granted != (outcome.winner == role) {
            return Err(WitnessError::Inconsistent {
                addr: self.addr.clone(),
                detail: format!(
                    "claim by {role}: granted={} but winner={}",
                    outcome.granted, outcome.winner
                ),
            });
        }
        Ok(outcome)
    }

    /// The recorded decision for `pair_id`, if any.
    pub fn status(&self, pair_id: u64) -> Result<Option<Decision>, WitnessError> {
        let response: StatusResponse = self.call(&Request::Status(StatusRequest { pair_id }))?;
        if response.pair_id != pair_id {
            return Err(WitnessError::Inconsistent {
                addr: self.addr.clone(),
                detail: format!(
                    "asked for pair {pair_id}, answer is for {}",
                    response.pair_id
                ),
            });
        }
        Ok(response.decision)
    }

    fn call<T: for<'de> Deserialize<'de>>(&self, request: &Request) -> Result<T, WitnessError> {
        let line = self.exchange(request)?;
        let value: serde_json::Value =
            serde_json::from_slice(&line).map_err(|source| WitnessError::Decode {
                addr: self.addr.clone(),
                source,
            })?;
        if let Some(message) = value.get("error") {
            return Err(WitnessError::Server {
                addr: self.addr.clone(),
                message: message
                    .as_str()
                    .map_or_else(|| message.to_string(), str::to_owned),
            });
        }
        serde_json::from_value(value).map_err(|source| WitnessError::Decode {
            addr: self.addr.clone(),
            source,
        })
    }

    /// Sends one request line and reads one answer line, all within `self.timeout`.
    fn exchange(&self, request: &Request) -> Result<Vec<u8>, WitnessError> {
        let deadline = Instant::now() + self.timeout;
        let mut line = serde_json::to_vec(request).map_err(WitnessError::Encode)?;
        if line.len() > MAX_LINE {
            return Err(WitnessError::RequestTooLong {
                len: line.len(),
                max: MAX_LINE,
            });
        }
        line.push(b'\n');

        let stream = self.connect(deadline)?;
        let remaining = self.remaining(deadline)?;
        stream
            .set_write_timeout(Some(remaining))
            .and_then(|()| (&stream).write_all(&line))
            .map_err(|source| match source.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => self.timeout_error(),
                _ => WitnessError::Send {
                    addr: self.addr.clone(),
                    source,
                },
            })?;

        match LineReader::new(&stream).next_line(MAX_LINE, deadline) {
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => Err(WitnessError::Closed {
                addr: self.addr.clone(),
            }),
            Err(LineError::Timeout) => Err(self.timeout_error()),
            Err(LineError::TooLong) => Err(WitnessError::ResponseTooLong {
                addr: self.addr.clone(),
                max: MAX_LINE,
            }),
            Err(LineError::Io(source)) => Err(WitnessError::Receive {
                addr: self.addr.clone(),
                source,
            }),
        }
    }

    fn connect(&self, deadline: Instant) -> Result<TcpStream, WitnessError> {
        let addrs: Vec<SocketAddr> = self
            .addr
            .to_socket_addrs()
            .map_err(|source| WitnessError::Resolve {
                addr: self.addr.clone(),
                source,
            })?
            .collect();
        let mut last_error = None;
        for candidate in addrs {
            let remaining = self.remaining(deadline)?;
            match TcpStream::connect_timeout(&candidate, remaining) {
                Ok(stream) => {
                    // Best effort: a request is one small write, latency matters at failover.
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last_error = Some(e),
            }
        }
        match last_error {
            Some(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                Err(self.timeout_error())
            }
            Some(source) => Err(WitnessError::Connect {
                addr: self.addr.clone(),
                source,
            }),
            None => Err(WitnessError::NoAddress {
                addr: self.addr.clone(),
            }),
        }
    }

    fn remaining(&self, deadline: Instant) -> Result<Duration, WitnessError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            Err(self.timeout_error())
        } else {
            Ok(remaining)
        }
    }

    fn timeout_error(&self) -> WitnessError {
        WitnessError::Timeout {
            addr: self.addr.clone(),
            timeout: self.timeout,
        }
    }
}

#[derive(Debug)]
enum LineError {
    TooLong,
    Timeout,
    Io(io::Error),
}

/// Reads `\n`-terminated lines of bounded length against a deadline; keeps bytes read past a
/// newline for the next line.
struct LineReader<'a> {
    stream: &'a TcpStream,
    buf: Vec<u8>,
}

impl<'a> LineReader<'a> {
    fn new(stream: &'a TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// The next line without its `\n` (and a `\r` before it); `None` at a clean end of stream.
    /// Unterminated bytes before the end of stream count as a last line.
    fn next_line(&mut self, max: usize, deadline: Instant) -> Result<Option<Vec<u8>>, LineError> {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return if line.len() > max {
                    Err(LineError::TooLong)
                } else {
                    Ok(Some(line))
                };
            }
            if self.buf.len() > max {
                return Err(LineError::TooLong);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(LineError::Timeout);
            }
            self.stream
                .set_read_timeout(Some(remaining))
                .map_err(LineError::Io)?;
            match (&*self.stream).read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Ok(Some(std::mem::take(&mut self.buf))),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(LineError::Timeout)
                }
                Err(e) => return Err(LineError::Io(e)),
            }
        }
    }
}

/// Why the state file could not be read or written.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("witness state {}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("witness state {}: cannot parse: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("witness state {}: unsupported version {version}", path.display())]
    Version { path: PathBuf, version: u32 },
    #[error("witness state {}: pair {pair_id} recorded twice", path.display())]
    Duplicate { path: PathBuf, pair_id: u64 },
    #[error("witness state {}: cannot encode: {source}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("witness state {}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    decisions: Vec<StateEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateEntry {
    pair_id: u64,
    winner: Role,
    epoch: u64,
    claimant: String,
}

/// The decisions, and where they are kept.
struct Registry {
    decisions: BTreeMap<u64, Decision>,
    state_file: Option<PathBuf>,
}

impl Registry {
    fn load(state_file: Option<PathBuf>) -> Result<Self, StateError> {
        let mut decisions = BTreeMap::new();
        if let Some(path) = &state_file {
            match fs::read(path) {
                Ok(bytes) => {
                    let file: StateFile =
                        serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
                            path: path.clone(),
                            source,
                        })?;
                    if file.version != STATE_VERSION {
                        return Err(StateError::Version {
                            path: path.clone(),
                            version: file.version,
                        });
                    }
                    for entry in file.decisions {
                        let decision = Decision {
                            winner: entry.winner,
                            epoch: entry.epoch,
                            claimant: entry.claimant,
                        };
                        if decisions.insert(entry.pair_id, decision).is_some() {
                            return Err(StateError::Duplicate {
                                path: path.clone(),
                                pair_id: entry.pair_id,
                            });
                        }
                    }
                    info!(
                        "witness: {} decision(s) loaded from {}",
                        decisions.len(),
                        path.display()
                    );
                }
                // A first start: nothing decided yet.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StateError::Read {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(Self {
            decisions,
            state_file,
        })
    }

    fn claim(&mut self, request: &ClaimRequest) -> Result<ClaimOutcome, StateError> {
        let ClaimRequest {
            pair_id,
            role,
            epoch,
            claimant,
        } = request;
        if let Some(decision) = self.decisions.get(pair_id) {
            let granted = decision.winner == *role;
            info!(
                "witness: pair {pair_id}: {role} claim by {claimant:?} at epoch {epoch} {} \
                 (decided for {} {:?} at epoch {})",
                if granted { "granted again" } else { "denied" },
                decision.winner,
                decision.claimant,
                decision.epoch
            );
            return Ok(ClaimOutcome {
                granted,
                winner: decision.winner,
                epoch: decision.epoch,
            });
        }
        self.decisions.insert(
            *pair_id,
            Decision {
                winner: *role,
                epoch: *epoch,
                claimant: claimant.clone(),
            },
        );
        // Recorded on disk before anyone hears of it; on failure forget it, so memory and disk
        // agree and the claimant (answered with an error) stays fenced.
        if let Err(e) = self.persist() {
            self.decisions.remove(pair_id);
            warn!("witness: pair {pair_id}: {role} claim by {claimant:?} not recorded: {e}");
            return Err(e);
        }
        info!("witness: pair {pair_id}: {role} claim by {claimant:?} at epoch {epoch} granted (first claim)");
        Ok(ClaimOutcome {
            granted: true,
            winner: *role,
            epoch: *epoch,
        })
    }

    fn status(&self, pair_id: u64) -> StatusResponse {
        StatusResponse {
            pair_id,
            decision: self.decisions.get(&pair_id).cloned(),
        }
    }

    fn persist(&self) -> Result<(), StateError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let file = StateFile {
            version: STATE_VERSION,
            decisions: self
                .decisions
                .iter()
                .map(|(pair_id, d)| StateEntry {
                    pair_id: *pair_id,
                    winner: d.winner,
                    epoch: d.epoch,
                    claimant: d.claimant.clone(),
                })
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|source| StateError::Encode {
            path: path.clone(),
            source,
        })?;
        write_atomically(path, &bytes).map_err(|source| StateError::Write {
            path: path.clone(),
            source,
        })
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).ok_or_else(|| {
        io::Error::new(ErrorKind::InvalidInput, "state file path has no file name")
    })?;
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    // The rename is durable only once the directory is synced.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        warn!("witness: cannot sync directory {}: {e}", dir.display());
    }
    Ok(())
}

/// Server limits.
#[derive(Clone, Copy, Debug)]
pub struct WitnessConfig {
    /// Time a connection has to deliver each request line.
    pub connection_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for WitnessConfig {
    fn default() -> Self {
        Self {
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

struct Shared {
    registry: Mutex<Registry>,
    stop: AtomicBool,
    connections: AtomicUsize,
    config: WitnessConfig,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // The registry is changed only after the state is written, so a thread that panicked
        // while holding the lock left it consistent.
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The answer to one line, and whether the connection may go on.
    fn handle(&self, line: &[u8]) -> (String, bool) {
        match decode_request(line) {
            Err(e) => (error_line(&e.to_string()), false),
            Ok(Request::Claim(claim)) => match self.registry().claim(&claim) {
                Ok(outcome) => reply_line(&outcome),
                Err(e) => (error_line(&e.to_string()), false),
            },
            Ok(Request::Status(StatusRequest { pair_id })) => {
                reply_line(&self.registry().status(pair_id))
            }
        }
    }
}

fn error_line(message: &str) -> String {
    serde_json::to_string(&ErrorReply { error: message })
        .unwrap_or_else(|_| r#"{"error":"internal error"}"#.to_owned())
}

fn reply_line<T: Serialize>(reply: &T) -> (String, bool) {
    match serde_json::to_string(reply) {
        Ok(line) => (line, true),
        Err(e) => (error_line(&format!("cannot encode the answer: {e}")), false),
    }
}

/// A running witness server. Dropping it stops it too.
pub struct WitnessHandle {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WitnessHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The recorded decision for `pair_id`, if any.
    pub fn decision(&self, pair_id: u64) -> Option<Decision> {
        self.shared.registry().decisions.get(&pair_id).cloned()
    }

    /// Stops accepting and waits for the accept thread. Open connections close after their
    /// current request.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Blocks until the server stops (for the binary: forever).
    pub fn wait(mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("witness: the accept thread panicked");
            }
        }
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        // accept() blocks; a connection of our own wakes it to see the flag.
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        match TcpStream::connect_timeout(&wake, Duration::from_secs(1)) {
            Ok(_) => {
                if thread.join().is_err() {
                    warn!("witness: the accept thread panicked");
                }
            }
            // Not joined: it would block until the next connection; it exits then.
            Err(e) => warn!("witness: cannot wake the accept thread at {wake}: {e}"),
        }
    }
}

impl Drop for WitnessHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves claims on `listener` with the default limits; see [`spawn_server_with_config`].
pub fn spawn_server(
    listener: TcpListener,
    state_file: Option<PathBuf>,
) -> io::Result<WitnessHandle> {
    spawn_server_with_config(listener, state_file, WitnessConfig::default())
}

/// Loads `state_file` (if given; a missing file is an empty state, an unreadable one an error)
/// and serves claims on `listener` from a background thread, one thread per connection.
pub fn spawn_server_with_config(
    listener: TcpListener,
    state_file: Option<PathBuf>,
    config: WitnessConfig,
) -> io::Result<WitnessHandle> {
    let registry = Registry::load(state_file).map_err(io::Error::other)?;
    let local_addr = listener.local_addr()?;
    listener.set_nonblocking(false)?;
    let shared = Arc::new(Shared {
        registry: Mutex::new(registry),
        stop: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        config,
    });
    let accept_shared = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name("witness-accept".to_owned())
        .spawn(move || {
            // Connection threads inherit this filter.
            if vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Witness) {
                accept_loop(&listener, &accept_shared);
            }
        })?;
    info!("witness: listening on {local_addr}");
    Ok(WitnessHandle {
        local_addr,
        shared,
        thread: Some(thread),
    })
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        match accepted {
            Ok((stream, peer)) => admit(shared, stream, peer),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // E.g. out of file descriptors: back off rather than spin; the state is intact.
                warn!("witness: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Decrements the connection count when a connection ends, however it ends.
struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    if shared.connections.fetch_add(1, Ordering::AcqRel) >= shared.config.max_connections {
        shared.connections.fetch_sub(1, Ordering::AcqRel);
        warn!("witness: too many connections, refusing {peer}");
        // A fresh socket's send buffer takes this line without blocking.
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = (&stream).write_all(format!("{}\n", error_line("busy")).as_bytes());
        // Drain what already arrived (without blocking the accept loop) so the close sends a FIN
        // after the line rather than a reset.
        let _ = stream.shutdown(Shutdown::Write);
        if stream.set_nonblocking(true).is_ok() {
            let mut chunk = [0u8; 4096];
            while matches!((&stream).read(&mut chunk), Ok(n) if n > 0) {}
        }
        return;
    }
    let slot = ConnectionSlot(Arc::clone(shared));
    let spawned = thread::Builder::new()
        .name("witness-conn".to_owned())
        .spawn(move || {
            let shared = Arc::clone(&slot.0);
            serve_connection(&shared, &stream, peer);
            drop(slot);
        });
    if let Err(e) = spawned {
        // The closure (and its slot) is dropped, so the count stays right.
        warn!("witness: cannot start a thread for {peer}: {e}");
    }
}

fn serve_connection(shared: &Shared, stream: &TcpStream, peer: SocketAddr) {
    let timeout = shared.config.connection_timeout;
    if let Err(e) = stream.set_write_timeout(Some(timeout)) {
        debug!("witness: {peer}: {e}");
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut reader = LineReader::new(stream);
    loop {
        let deadline = Instant::now() + timeout;
        let line = match reader.next_line(MAX_LINE, deadline) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(LineError::TooLong) => {
                debug!("witness: {peer}: request line too long");
                let message = format!("request line longer than {MAX_LINE} bytes");
                close_with(stream, &error_line(&message));
                return;
            }
            Err(LineError::Timeout) => {
                debug!("witness: {peer}: idle for {timeout:?}, closing");
                return;
            }
            Err(LineError::Io(e)) => {
                debug!("witness: {peer}: {e}");
                return;
            }
        };
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let (reply, keep_open) = shared.handle(&line);
        if !keep_open {
            debug!("witness: {peer}: {reply}");
            close_with(stream, &reply);
            return;
        }
        if let Err(e) = (&*stream).write_all(format!("{reply}\n").as_bytes()) {
            debug!("witness: {peer}: cannot answer: {e}");
            return;
        }
    }
}

/// Sends a last line and closes, draining input for a moment so unread input does not turn the
/// close into a reset that could destroy the line before the peer reads it.
fn close_with(stream: &TcpStream, line: &str) {
    if (&*stream)
        .write_all(format!("{line}\n").as_bytes())
        .is_err()
    {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut chunk = [0u8; 4096];
    while drained < LINGER_BYTES {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || stream.set_read_timeout(Some(remaining)).is_err() {
            return;
        }
        match (&*stream).read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(pair_id: u64, role: Role, epoch: u64, claimant: &str) -> ClaimRequest {
        ClaimRequest {
            pair_id,
            role,
            epoch,
            claimant: claimant.to_owned(),
        }
    }

    #[test]
    fn decodes_claim_and_status() {
        let line = br#"{"claim":{"pair_id":7,"role":"backup","epoch":3,"claimant":"b"}}"#;
        assert_eq!(
            decode_request(line).unwrap(),
            Request::Claim(claim(7, Role::Backup, 3, "b"))
        );
        assert_eq!(
            decode_request(br#"{"status":{"pair_id":18446744073709551615}}"#).unwrap(),
            Request::Status(StatusRequest { pair_id: u64::MAX })
        );
    }

    #[test]
    fn rejects_bad_requests() {
        for line in [
            &b""[..],
            b"garbage",
            b"{}",
            b"[]",
            br#"{"claim":{"pair_id":"7","role":"primary","epoch":1,"claimant":"a"}}"#,
            br#"{"claim":{"pair_id":7,"role":"leader","epoch":1,"claimant":"a"}}"#,
            br#"{"claim":{"pair_id":7,"role":"primary","epoch":-1,"claimant":"a"}}"#,
            br#"{"claim":{"pair_id":7,"role":"primary","epoch":1}}"#,
            br#"{"claim":{"pair_id":7,"role":"primary","epoch":1,"claimant":"a","x":1}}"#,
            br#"{"claim":{"pair_id":7,"role":"primary","epoch":1,"claimant":"a"},"x":1}"#,
            br#"{"claim":{"pair_id":7,"role":"primary","epoch":1,"claimant":"a"},"status":{"pair_id":7}}"#,
            br#"{"status":{"pair_id":7.5}}"#,
            br#"{"release":{"pair_id":7}}"#,
            b"\xff\xfe",
        ] {
            assert!(
                decode_request(line).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(line)
            );
        }
        assert!(matches!(
            decode_request(&vec![b' '; MAX_LINE + 1]),
            Err(RequestError::TooLong { .. })
        ));
    }

    #[test]
    fn registry_rules() {
        let mut registry = Registry::load(None).unwrap();
        let first = registry.claim(&claim(1, Role::Backup, 9, "b")).unwrap();
        assert_eq!(
            first,
            ClaimOutcome {
                granted: true,
                winner: Role::Backup,
                epoch: 9
            }
        );
        // Same role again (any epoch): granted, the first decision is reported.
        let retry = registry.claim(&claim(1, Role::Backup, 10, "b2")).unwrap();
        assert_eq!(retry, first);
        let other = registry.claim(&claim(1, Role::Primary, 11, "p")).unwrap();
        assert_eq!(
            other,
            ClaimOutcome {
                granted: false,
                winner: Role::Backup,
                epoch: 9
            }
        );
        // Another pair is independent.
        assert!(
            registry
                .claim(&claim(2, Role::Primary, 1, "p"))
                .unwrap()
                .granted
        );
        assert_eq!(
            registry.status(1).decision,
            Some(Decision {
                winner: Role::Backup,
                epoch: 9,
                claimant: "b".to_owned()
            })
        );
        assert_eq!(registry.status(3).decision, None);
    }

    #[test]
    fn failed_persist_records_nothing() {
        let dir = std::env::temp_dir().join(format!("witness-unit-{}", std::process::id()));
        // The parent of the state file does not exist, so the write fails.
        let path = dir.join("missing").join("state.json");
        let mut registry = Registry::load(Some(path)).unwrap();
        assert!(registry.claim(&claim(1, Role::Primary, 1, "p")).is_err());
        assert_eq!(registry.status(1).decision, None);
    }

    #[test]
    fn state_round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("witness-unit-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let _ = fs::remove_file(&path);
        {
            let mut registry = Registry::load(Some(path.clone())).unwrap();
            registry.claim(&claim(5, Role::Primary, 2, "p")).unwrap();
            registry.claim(&claim(6, Role::Backup, 3, "b")).unwrap();
        }
        let registry = Registry::load(Some(path.clone())).unwrap();
        assert_eq!(registry.decisions.len(), 2);
        assert_eq!(registry.status(6).decision.unwrap().winner, Role::Backup);

        fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            Registry::load(Some(path.clone())),
            Err(StateError::Parse { .. })
        ));
        fs::write(&path, br#"{"version":2,"decisions":[]}"#).unwrap();
        assert!(matches!(
            Registry::load(Some(path.clone())),
            Err(StateError::Version { .. })
        ));
        let entry = r#"{"pair_id":1,"winner":"primary","epoch":1,"claimant":"p"}"#;
        fs::write(
            &path,
            format!(r#"{{"version":1,"decisions":[{entry},{entry}]}}"#),
        )
        .unwrap();
        assert!(matches!(
            Registry::load(Some(path.clone())),
            Err(StateError::Duplicate { pair_id: 1, .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn handle_keeps_state_on_bad_input() {
        let shared = Shared {
            registry: Mutex::new(Registry::load(None).unwrap()),
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            config: WitnessConfig::default(),
        };
        let (reply, keep) =
            shared.handle(br#"{"claim":{"pair_id":1,"role":"primary","epoch":4,"claimant":"p"}}"#);
        assert!(keep);
        assert_eq!(reply, r#"{"granted":true,"winner":"primary","epoch":4}"#);
        let (reply, keep) = shared.handle(b"{\"claim\":");
        assert!(!keep);
        assert!(
            reply.starts_with(r#"{"error":"malformed request"#),
            "{reply}"
        );
        let (reply, _) = shared.handle(br#"{"status":{"pair_id":1}}"#);
        assert_eq!(
            reply,
            r#"{"pair_id":1,"decision":{"winner":"primary","epoch":4,"claimant":"p"}}"#
        );
    }
}
