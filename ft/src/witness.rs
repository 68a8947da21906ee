//! Fencing witness: decides which side of a partitioned primary/backup pair may go on, so two
//! copies of one VM never both release output (split brain).
//!
//! # Model
//!
//! A witness is a small TCP service on a third host. Each protected pair has a `pair_id` (a `u64`
//! the primary picks when FT is enabled and tells the backup). A side that loses its peer asks the
//! witness to *claim* the pair before it releases any more output:
//!
//! - the first claim for a `pair_id` wins and is recorded (role, epoch, claimant, time);
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
//! # Authentication (mutual TLS)
//!
//! Whoever can claim a pair decides which copy of a VM lives, so the witness only listens to
//! peers it can authenticate. With [`Security::Tls`] every accepted connection must complete a
//! mutual TLS handshake (see `transport::tls`: a client certificate chaining to the witness's
//! CA) on its own connection thread before a single byte of it is parsed; a peer that fails the
//! handshake is logged at warn and dropped. The client checks that the witness's certificate
//! names the host it dialled, and a TLS failure is [`WitnessError::Tls`] (fenced, like every
//! error). [`Security::InsecurePlaintext`] serves plain TCP, only when the operator asked for it
//! in so many words.
//!
//! # Wire format
//!
//! One JSON object per line (`\n`, an optional `\r` before it is ignored), at most [`MAX_LINE`]
//! bytes, inside the TLS session (or over plain TCP); several requests may share a connection.
//!
//! ```text
//! -> {"claim":{"pair_id":7,"role":"primary","epoch":42,"claimant":"host-a"}}
//! <- {"granted":true,"winner":"primary","epoch":42}
//! -> {"status":{"pair_id":7}}
//! <- {"pair_id":7,"decision":{"winner":"primary","epoch":42,"claimant":"host-a"}}
//! <- {"pair_id":8,"decision":null}                        (nothing decided yet)
//! <- {"error":"malformed request: ..."}                   (then the witness closes)
//! <- {"error":"busy"}              (over a connection cap, plaintext only, then the witness closes)
//! ```
//!
//! Unknown fields, wrong types, an over-long line or a connection idle past the timeout end the
//! connection (after an `{"error":..}` line where there is something to answer); they never
//! change the recorded decisions.
//!
//! # Limits
//!
//! At most [`WitnessConfig::max_connections`] connections are served at once, and at most
//! [`WitnessConfig::max_connections_per_ip`] from one source address, so one host cannot take
//! every slot. A connection over a cap is closed from the accept thread: over plaintext after a
//! `busy` line; over TLS without a word, since answering would mean a handshake (the costly
//! part) for a peer we are refusing. Either way the client gets an error, so it is fenced.
//!
//! # Persistence
//!
//! With a state file, a new decision is written (temporary file, fsync, rename, directory fsync)
//! before it is answered, so a restarted witness never reverses one; if that write fails the
//! claim is answered with an error and nothing is recorded. A state file that exists but cannot
//! be read stops the witness from starting rather than starting empty. Without a state file the
//! decisions live in memory only, and a restarted witness could grant a pair to the side it
//! denied before: that is for tests. One witness process per state file.
//!
//! # Pruning
//!
//! Each decision records when it was made (unix seconds; entries of a version 1 state file,
//! which has no time, count as made when they are first loaded). With a retention
//! ([`WitnessConfig::retention`]), decisions older than it are dropped when the state is loaded
//! and whenever a new decision is written, and the pruned state is written as above. A decision
//! is therefore honoured for at least the retention: it must exceed the time any fenced side
//! could still come back and claim its pair (a denied side must be stopped or torn down well
//! within it). No retention keeps decisions forever.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;
/// How the witness channel is secured (re-exported for the binary, which needs no `transport`).
pub use transport::Security;
use transport::Stream;

/// The longest request or response line, without its newline.
pub const MAX_LINE: usize = 4096;
/// Default time a connection may take to deliver each request line (and its TLS handshake).
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of connections served at once; more are refused.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default number of connections served at once from one source address. Every pair of a host
/// that loses its network claims at once, so this must exceed the FT pairs one host runs.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 16;
/// Default age after which a decision is pruned.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Where the `tandem-witness` binary keeps its decisions unless told otherwise.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/tandem-witness/decisions.json";

/// Version of the state file layout written (2: decisions carry `decided_at`).
const STATE_VERSION: u32 = 2;
/// Layout without `decided_at`, still read.
const STATE_VERSION_UNTIMED: u32 = 1;
/// How long a closing connection may keep draining input so the error line is not lost to a
/// TCP reset (closing with unread input resets the connection).
const LINGER: Duration = Duration::from_millis(500);
/// Over TLS there is no half-close to tell the peer we are done: stop draining once it has been
/// quiet this long.
const TLS_DRAIN_IDLE: Duration = Duration::from_millis(100);
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
    /// The TLS handshake or session failed: the witness is not the one our CA vouches for, or
    /// it refused our certificate, or it does not speak TLS.
    #[error("witness {addr}: {reason}")]
    Tls { addr: String, reason: String },
}

/// Talks to a witness; one connection per call.
#[derive(Clone, Debug)]
pub struct WitnessClient {
    /// `HOST:PORT`. A host name is resolved by the system resolver, which the timeout does not
    /// bound; use an IP address where that matters.
    pub addr: String,
    /// Bound on connect + send + answer for one call.
    pub timeout: Duration,
    /// Mutual TLS, or plaintext by the operator's explicit opt-out.
    pub security: Security,
}

impl WitnessClient {
    pub fn new(addr: impl Into<String>, timeout: Duration, security: Security) -> Self {
        Self {
            addr: addr.into(),
            timeout,
            security,
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

        let mut stream = self.connect(deadline)?;
        let remaining = self.remaining(deadline)?;
        stream
            .set_write_timeout(Some(remaining))
            .and_then(|()| stream.write_all(&line))
            .map_err(|source| {
                self.io_error(&stream, source, |addr, source| WitnessError::Send {
                    addr,
                    source,
                })
            })?;

        match LineBuffer::default().next_line(&mut stream, MAX_LINE, deadline) {
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => Err(WitnessError::Closed {
                addr: self.addr.clone(),
            }),
            Err(LineError::Timeout) => Err(self.timeout_error()),
            Err(LineError::TooLong) => Err(WitnessError::ResponseTooLong {
                addr: self.addr.clone(),
                max: MAX_LINE,
            }),
            Err(LineError::Io(source)) => {
                Err(
                    self.io_error(&stream, source, |addr, source| WitnessError::Receive {
                        addr,
                        source,
                    }),
                )
            }
        }
    }

    /// Classifies an I/O error on an established connection: a timeout, a TLS session error
    /// (e.g. the witness refused our certificate after a TLS 1.3 handshake we thought done), or
    /// an error of `other`'s kind.
    fn io_error(
        &self,
        stream: &Stream,
        source: io::Error,
        other: fn(String, io::Error) -> WitnessError,
    ) -> WitnessError {
        match source.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => self.timeout_error(),
            // The TLS layer reports what the session rejected as invalid data.
            ErrorKind::InvalidData if matches!(stream, Stream::Tls(_)) => WitnessError::Tls {
                addr: self.addr.clone(),
                reason: format!("TLS session failed: {source}"),
            },
            _ => other(self.addr.clone(), source),
        }
    }

    /// Connects and secures the connection, all before `deadline`. Not `transport::dial`: that
    /// allows a handshake at least `transport::HANDSHAKE_TIMEOUT`, longer than a claim may take.
    fn connect(&self, deadline: Instant) -> Result<Stream, WitnessError> {
        let tcp = self.connect_tcp(deadline)?;
        match &self.security {
            Security::InsecurePlaintext => Ok(Stream::Tcp(tcp)),
            Security::Tls(credentials) => {
                let remaining = self.remaining(deadline)?;
                credentials
                    .connect(tcp, transport::host_of(&self.addr), remaining)
                    .map(Stream::Tls)
                    .map_err(|e| WitnessError::Tls {
                        addr: self.addr.clone(),
                        reason: e.to_string(),
                    })
            }
        }
    }

    fn connect_tcp(&self, deadline: Instant) -> Result<TcpStream, WitnessError> {
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

/// A connection whose reads can be bounded in time.
trait TimedRead: Read {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedRead for Stream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        Stream::set_read_timeout(self, timeout)
    }
}

/// Reads `\n`-terminated lines of bounded length against a deadline; keeps bytes read past a
/// newline for the next line. Holds no stream, so the caller can write between reads.
#[derive(Default)]
struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    /// The next line without its `\n` (and a `\r` before it); `None` at a clean end of stream.
    /// Unterminated bytes before the end of stream count as a last line.
    fn next_line<R: TimedRead>(
        &mut self,
        stream: &mut R,
        max: usize,
        deadline: Instant,
    ) -> Result<Option<Vec<u8>>, LineError> {
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
            stream
                .set_read_timeout(Some(remaining))
                .map_err(LineError::Io)?;
            let read = match stream.read(&mut chunk) {
                // A TLS peer that closes without close_notify: the end of its stream all the
                // same (a truncated JSON line does not parse, so nothing is lost silently).
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(0),
                read => read,
            };
            match read {
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
    /// Unix seconds; absent in version 1 files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decided_at: Option<u64>,
}

/// A decision and when it was made (unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Recorded {
    decision: Decision,
    decided_at: u64,
}

/// Seconds since the epoch; 0 for a clock before 1970, which makes nothing look old.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The pairs whose decision is older than `retention` at `now`. A decision "made" in the future
/// (the clock went back) is not old. No retention, or a zero one, keeps everything.
fn expired(decisions: &BTreeMap<u64, Recorded>, retention: Option<Duration>, now: u64) -> Vec<u64> {
    let Some(max_age) = retention.map(|r| r.as_secs()).filter(|&s| s > 0) else {
        return Vec::new();
    };
    decisions
        .iter()
        .filter(|(_, r)| now.saturating_sub(r.decided_at) > max_age)
        .map(|(pair_id, _)| *pair_id)
        .collect()
}

/// The decisions, and where they are kept.
struct Registry {
    decisions: BTreeMap<u64, Recorded>,
    state_file: Option<PathBuf>,
    retention: Option<Duration>,
}

impl Registry {
    /// Loads the state (if any) as of `now`, drops the decisions older than `retention`, and
    /// writes the state back if that (or stamping version 1 entries) changed it.
    fn load(
        state_file: Option<PathBuf>,
        retention: Option<Duration>,
        now: u64,
    ) -> Result<Self, StateError> {
        let mut registry = Self {
            decisions: BTreeMap::new(),
            state_file,
            retention,
        };
        let Some(path) = registry.state_file.clone() else {
            return Ok(registry);
        };
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            // A first start: nothing decided yet.
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(registry),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let file: StateFile =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
                path: path.clone(),
                source,
            })?;
        if file.version != STATE_VERSION && file.version != STATE_VERSION_UNTIMED {
            return Err(StateError::Version {
                path,
                version: file.version,
            });
        }
        let mut stamped = 0usize;
        for entry in file.decisions {
            // Untimed entries start their retention now rather than being pruned at once.
            let decided_at = entry.decided_at.unwrap_or_else(|| {
                stamped += 1;
                now
            });
            let recorded = Recorded {
                decision: Decision {
                    winner: entry.winner,
                    epoch: entry.epoch,
                    claimant: entry.claimant,
                },
                decided_at,
            };
            if registry.decisions.insert(entry.pair_id, recorded).is_some() {
                return Err(StateError::Duplicate {
                    path,
                    pair_id: entry.pair_id,
                });
            }
        }
        let pruned = registry.prune(now);
        info!(
            "witness: {} decision(s) loaded from {}, {} older than the retention pruned",
            registry.decisions.len(),
            path.display(),
            pruned.len()
        );
        if !pruned.is_empty() || stamped > 0 || file.version != STATE_VERSION {
            registry.persist()?;
        }
        Ok(registry)
    }

    /// Forgets the decisions older than the retention; returns their pairs.
    fn prune(&mut self, now: u64) -> Vec<u64> {
        let pruned = expired(&self.decisions, self.retention, now);
        for pair_id in &pruned {
            if let Some(old) = self.decisions.remove(pair_id) {
                info!(
                    "witness: pair {pair_id}: decision for {} {:?} made at {} pruned (older \
                     than the retention)",
                    old.decision.winner, old.decision.claimant, old.decided_at
                );
            }
        }
        pruned
    }

    fn decision(&self, pair_id: u64) -> Option<Decision> {
        self.decisions.get(&pair_id).map(|r| r.decision.clone())
    }

    fn claim(&mut self, request: &ClaimRequest, now: u64) -> Result<ClaimOutcome, StateError> {
        let ClaimRequest {
            pair_id,
            role,
            epoch,
            claimant,
        } = request;
        if let Some(Recorded { decision, .. }) = self.decisions.get(pair_id) {
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
        // The state is written anyway: drop what is old in the same write. Pruned decisions
        // stay forgotten even if the write fails; they were due to go.
        self.prune(now);
        self.decisions.insert(
            *pair_id,
            Recorded {
                decision: Decision {
                    winner: *role,
                    epoch: *epoch,
                    claimant: claimant.clone(),
                },
                decided_at: now,
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
            decision: self.decision(pair_id),
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
                .map(|(pair_id, r)| StateEntry {
                    pair_id: *pair_id,
                    winner: r.decision.winner,
                    epoch: r.decision.epoch,
                    claimant: r.decision.claimant.clone(),
                    decided_at: Some(r.decided_at),
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

/// Server limits and retention.
#[derive(Clone, Copy, Debug)]
pub struct WitnessConfig {
    /// Time a connection has for its TLS handshake, and then for each request line.
    pub connection_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one source address.
    pub max_connections_per_ip: usize,
    /// Decisions older than this are pruned; `None` (or zero) keeps them forever.
    pub retention: Option<Duration>,
}

impl Default for WitnessConfig {
    fn default() -> Self {
        Self {
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            retention: Some(DEFAULT_RETENTION),
        }
    }
}

struct Shared {
    registry: Mutex<Registry>,
    stop: AtomicBool,
    connections: AtomicUsize,
    /// Connections being served, by source address (only addresses with at least one).
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    security: Security,
    config: WitnessConfig,
}

impl Shared {
    fn new(registry: Registry, security: Security, config: WitnessConfig) -> Self {
        Self {
            registry: Mutex::new(registry),
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            security,
            config,
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // The registry is changed only after the state is written, so a thread that panicked
        // while holding the lock left it consistent.
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn per_ip(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Plain counters, updated in one step each: consistent even after a panic.
        self.per_ip
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The answer to one line, and whether the connection may go on.
    fn handle(&self, line: &[u8]) -> (String, bool) {
        match decode_request(line) {
            Err(e) => (error_line(&e.to_string()), false),
            Ok(Request::Claim(claim)) => match self.registry().claim(&claim, unix_now()) {
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
        self.shared.registry().decision(pair_id)
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

/// Serves claims on `listener` with the default limits and retention; see
/// [`spawn_server_with_config`].
pub fn spawn_server(
    listener: TcpListener,
    security: Security,
    state_file: Option<PathBuf>,
) -> io::Result<WitnessHandle> {
    spawn_server_with_config(listener, security, state_file, WitnessConfig::default())
}

/// Loads `state_file` (if given; a missing file is an empty state, an unreadable one an error),
/// prunes it, and serves claims on `listener` from a background thread, one thread per
/// connection, each connection secured as `security` says.
pub fn spawn_server_with_config(
    listener: TcpListener,
    security: Security,
    state_file: Option<PathBuf>,
    config: WitnessConfig,
) -> io::Result<WitnessHandle> {
    let registry =
        Registry::load(state_file, config.retention, unix_now()).map_err(io::Error::other)?;
    let local_addr = listener.local_addr()?;
    listener.set_nonblocking(false)?;
    let description = security.describe();
    let shared = Arc::new(Shared::new(registry, security, config));
    let accept_shared = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name("witness-accept".to_owned())
        .spawn(move || {
            // Connection threads inherit this filter.
            if vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Witness) {
                accept_loop(&listener, &accept_shared);
            }
        })?;
    info!("witness: listening on {local_addr}, {description}");
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

/// One served connection's place in both caps, given back when it ends, however it ends.
struct ConnectionSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl ConnectionSlot {
    /// A slot for a connection from `ip`, or why there is none.
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Result<Self, &'static str> {
        let config = &shared.config;
        if shared.connections.fetch_add(1, Ordering::AcqRel) >= config.max_connections {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            return Err("too many connections");
        }
        let mut per_ip = shared.per_ip();
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= config.max_connections_per_ip {
            if *count == 0 {
                per_ip.remove(&ip);
            }
            drop(per_ip);
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            return Err("too many connections from this address");
        }
        *count += 1;
        Ok(Self {
            shared: Arc::clone(shared),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        {
            let mut per_ip = self.shared.per_ip();
            if let Some(count) = per_ip.get_mut(&self.ip) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    // An IPv4 peer on a dual-stack socket counts as its IPv4 address.
    let slot = match ConnectionSlot::take(shared, peer.ip().to_canonical()) {
        Ok(slot) => slot,
        Err(why) => {
            warn!("witness: {why}, refusing {peer}");
            refuse_busy(shared, &stream);
            return;
        }
    };
    let spawned = thread::Builder::new()
        .name("witness-conn".to_owned())
        .spawn(move || {
            let shared = Arc::clone(&slot.shared);
            serve_connection(&shared, stream, peer);
            drop(slot);
        });
    if let Err(e) = spawned {
        // The closure (and its slot) is dropped, so the counts stay right.
        warn!("witness: cannot start a thread for {peer}: {e}");
    }
}

/// Closes a connection over a cap from the accept thread, which must not block. Over plaintext
/// a `busy` line says why; over TLS nothing can be said before a handshake, which is the
/// expensive part we are refusing, so the connection just closes.
fn refuse_busy(shared: &Shared, stream: &TcpStream) {
    if !shared.security.is_tls() {
        // A fresh socket's send buffer takes this line without blocking.
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = (&*stream).write_all(format!("{}\n", error_line("busy")).as_bytes());
    }
    // Drain what already arrived (without blocking the accept loop) so the close sends a FIN
    // after the line rather than a reset.
    let _ = stream.shutdown(Shutdown::Write);
    if stream.set_nonblocking(true).is_ok() {
        let mut chunk = [0u8; 4096];
        while matches!((&*stream).read(&mut chunk), Ok(n) if n > 0) {}
    }
}

fn serve_connection(shared: &Shared, tcp: TcpStream, peer: SocketAddr) {
    let timeout = shared.config.connection_timeout;
    // Here, not on the accept thread: a slow handshaker holds only its own slot. Nothing a peer
    // sends is parsed before it proved itself.
    let mut stream = match shared.security.accept(tcp, timeout) {
        Ok(stream) => stream,
        Err(e) => {
            warn!("witness: connection from {peer} refused: {e}");
            return;
        }
    };
    if let Err(e) = stream.set_write_timeout(Some(timeout)) {
        debug!("witness: {peer}: {e}");
        return;
    }
    let _ = stream.set_nodelay();
    let mut reader = LineBuffer::default();
    loop {
        let deadline = Instant::now() + timeout;
        let line = match reader.next_line(&mut stream, MAX_LINE, deadline) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(LineError::TooLong) => {
                debug!("witness: {peer}: request line too long");
                let message = format!("request line longer than {MAX_LINE} bytes");
                close_with(&mut stream, &error_line(&message));
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
            close_with(&mut stream, &reply);
            return;
        }
        if let Err(e) = stream.write_all(format!("{reply}\n").as_bytes()) {
            debug!("witness: {peer}: cannot answer: {e}");
            return;
        }
    }
}

/// Sends a last line and closes, draining input for a moment so unread input does not turn the
/// close into a reset that could destroy the line before the peer reads it.
fn close_with(stream: &mut Stream, line: &str) {
    if stream.write_all(format!("{line}\n").as_bytes()).is_err() {
        return;
    }
    // Plain TCP half-closes, so the peer sees the end and closes too. A TLS session here has no
    // half-close: stop once the peer goes quiet instead.
    let idle = match stream {
        Stream::Tcp(tcp) => {
            let _ = tcp.shutdown(Shutdown::Write);
            LINGER
        }
        Stream::Tls(_) | Stream::Unix(_) => TLS_DRAIN_IDLE,
    };
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut chunk = [0u8; 4096];
    while drained < LINGER_BYTES {
        let remaining = deadline.saturating_duration_since(Instant::now()).min(idle);
        if remaining.is_zero() || stream.set_read_timeout(Some(remaining)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
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

    const NOW: u64 = 1_700_000_000;
    const DAY: u64 = 24 * 60 * 60;

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
        let mut registry = Registry::load(None, None, NOW).unwrap();
        let first = registry
            .claim(&claim(1, Role::Backup, 9, "b"), NOW)
            .unwrap();
        assert_eq!(
            first,
            ClaimOutcome {
                granted: true,
                winner: Role::Backup,
                epoch: 9
            }
        );
        // Same role again (any epoch): granted, the first decision is reported.
        let retry = registry
            .claim(&claim(1, Role::Backup, 10, "b2"), NOW)
            .unwrap();
        assert_eq!(retry, first);
        let other = registry
            .claim(&claim(1, Role::Primary, 11, "p"), NOW)
            .unwrap();
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
                .claim(&claim(2, Role::Primary, 1, "p"), NOW)
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
        let mut registry = Registry::load(Some(path), None, NOW).unwrap();
        assert!(registry
            .claim(&claim(1, Role::Primary, 1, "p"), NOW)
            .is_err());
        assert_eq!(registry.status(1).decision, None);
    }

    #[test]
    fn state_round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("witness-unit-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let _ = fs::remove_file(&path);
        {
            let mut registry = Registry::load(Some(path.clone()), None, NOW).unwrap();
            registry
                .claim(&claim(5, Role::Primary, 2, "p"), NOW)
                .unwrap();
            registry
                .claim(&claim(6, Role::Backup, 3, "b"), NOW)
                .unwrap();
        }
        let registry = Registry::load(Some(path.clone()), None, NOW).unwrap();
        assert_eq!(registry.decisions.len(), 2);
        assert_eq!(registry.status(6).decision.unwrap().winner, Role::Backup);

        fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            Registry::load(Some(path.clone()), None, NOW),
            Err(StateError::Parse { .. })
        ));
        fs::write(&path, br#"{"version":3,"decisions":[]}"#).unwrap();
        assert!(matches!(
            Registry::load(Some(path.clone()), None, NOW),
            Err(StateError::Version { .. })
        ));
        let entry = r#"{"pair_id":1,"winner":"primary","epoch":1,"claimant":"p"}"#;
        fs::write(
            &path,
            format!(r#"{{"version":1,"decisions":[{entry},{entry}]}}"#),
        )
        .unwrap();
        assert!(matches!(
            Registry::load(Some(path.clone()), None, NOW),
            Err(StateError::Duplicate { pair_id: 1, .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn handle_keeps_state_on_bad_input() {
        let shared = Shared::new(
            Registry::load(None, None, NOW).unwrap(),
            Security::InsecurePlaintext,
            WitnessConfig::default(),
        );
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

    fn recorded(decided_at: u64) -> Recorded {
        Recorded {
            decision: Decision {
                winner: Role::Primary,
                epoch: 1,
                claimant: "p".to_owned(),
            },
            decided_at,
        }
    }

    #[test]
    fn expired_takes_only_what_is_older_than_the_retention() {
        let decisions: BTreeMap<u64, Recorded> = [
            (1, recorded(NOW - 31 * DAY)),
            (2, recorded(NOW - 30 * DAY)),
            (3, recorded(NOW - DAY)),
            // Made "in the future": the clock went back; not old.
            (4, recorded(NOW + 10 * DAY)),
            (5, recorded(0)),
        ]
        .into_iter()
        .collect();
        let thirty_days = Some(Duration::from_secs(30 * DAY));
        assert_eq!(expired(&decisions, thirty_days, NOW), vec![1, 5]);
        // No retention, or a zero one, keeps everything.
        assert!(expired(&decisions, None, NOW).is_empty());
        assert!(expired(&decisions, Some(Duration::ZERO), NOW).is_empty());
        // A clock before 1970 reads as 0: nothing looks old.
        assert!(expired(&decisions, thirty_days, 0).is_empty());
    }

    #[test]
    fn a_new_decision_prunes_old_ones_and_persists_the_result() {
        let dir = std::env::temp_dir().join(format!("witness-unit-prune-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let _ = fs::remove_file(&path);
        let retention = Some(Duration::from_secs(30 * DAY));
        let mut registry = Registry::load(Some(path.clone()), retention, NOW).unwrap();
        registry
            .claim(&claim(1, Role::Primary, 1, "p"), NOW - 40 * DAY)
            .unwrap();
        // Status and repeated claims do not prune: the old decision is still honoured.
        assert!(
            registry
                .claim(&claim(1, Role::Primary, 2, "p"), NOW)
                .unwrap()
                .granted
        );
        assert!(registry.status(1).decision.is_some());
        // The next new decision's write drops it.
        registry
            .claim(&claim(2, Role::Backup, 1, "b"), NOW - DAY)
            .unwrap();
        assert_eq!(registry.status(1).decision, None);
        registry
            .claim(&claim(3, Role::Backup, 1, "b"), NOW)
            .unwrap();
        assert!(registry.status(2).decision.is_some());

        let reloaded = Registry::load(Some(path.clone()), None, NOW).unwrap();
        let pairs: Vec<u64> = reloaded.decisions.keys().copied().collect();
        assert_eq!(pairs, [2, 3]);
        assert_eq!(reloaded.decisions[&2].decided_at, NOW - DAY);
        assert_eq!(reloaded.decisions[&3].decided_at, NOW);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_prunes_and_stamps_untimed_entries() {
        let dir =
            std::env::temp_dir().join(format!("witness-unit-load-prune-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let old = NOW - 45 * DAY;
        let fresh = NOW - 2 * DAY;
        fs::write(
            &path,
            format!(
                r#"{{"version":2,"decisions":[
                {{"pair_id":1,"winner":"primary","epoch":1,"claimant":"p","decided_at":{old}}},
                {{"pair_id":2,"winner":"backup","epoch":2,"claimant":"b","decided_at":{fresh}}}]}}"#
            ),
        )
        .unwrap();
        let retention = Some(Duration::from_secs(30 * DAY));
        let registry = Registry::load(Some(path.clone()), retention, NOW).unwrap();
        assert_eq!(registry.status(1).decision, None);
        assert_eq!(registry.status(2).decision.unwrap().winner, Role::Backup);
        // The pruned state was written back.
        let on_disk = fs::read_to_string(&path).unwrap();
        assert!(!on_disk.contains("\"pair_id\": 1,"), "{on_disk}");
        assert!(
            on_disk.contains(&format!("\"decided_at\": {fresh}")),
            "{on_disk}"
        );

        // A version 1 file (no times): kept, its retention starting at this load.
        fs::write(
            &path,
            r#"{"version":1,"decisions":[{"pair_id":7,"winner":"primary","epoch":3,"claimant":"p"}]}"#,
        )
        .unwrap();
        let registry = Registry::load(Some(path.clone()), retention, NOW).unwrap();
        assert_eq!(registry.decisions[&7].decided_at, NOW);
        let later = Registry::load(Some(path.clone()), retention, NOW + 29 * DAY).unwrap();
        assert_eq!(later.decisions[&7].decided_at, NOW);
        let much_later = Registry::load(Some(path.clone()), retention, NOW + 31 * DAY).unwrap();
        assert!(much_later.decisions.is_empty());
        assert!(fs::read_to_string(&path)
            .unwrap()
            .contains("\"version\": 2"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
