//! Fencing on etcd: a pair's right to run is one etcd key, `/tandem/ft/<pair id>`, attached to
//! a lease that the side holding it keeps alive.
//!
//! # Model
//! - The primary grants a lease of TTL seconds and creates the key in a transaction that
//!   succeeds only if the key is absent (`create_revision == 0`), attached to that lease; a key
//!   already naming the primary role (an earlier run of the primary) is moved onto the new lease.
//!   A key naming the backup means the backup took over: the primary gets an error.
//! - The fencing thread renews the lease every TTL/3. A [`LeaseHold`] counts itself alive until
//!   a local deadline: the instant the last successful keepalive *request was sent*, plus the TTL
//!   the server returned for it, minus a safety margin. A keepalive answered with TTL <= 0, an
//!   unknown lease, or a deadline that passed makes the hold lost for good.
//! - The backup wins only through the same create-if-absent transaction, so only once the key
//!   is gone: the primary released it, or the server expired the primary's lease. It retries
//!   until its deadline; on winning it holds the key with a lease of its own (it is the primary
//!   now, and the key still names the backup role so the old primary cannot take it back).
//!
//! # Why it is safe
//! The server renews a lease when it *receives* a keepalive, which is no earlier than the
//! instant we sent it; so the primary's local deadline comes no later than the server's expiry
//! (the margin covers clock-rate drift), and etcd never revives an expired lease. The key can
//! only vanish when the lease expired or was revoked, and the backup can only create it after
//! that. Hence whenever the backup holds the key, the old primary's `is_alive()` is already
//! false: two copies never both believe they own the pair. No answer counts as a refusal.
//!
//! # Cost
//! A backup takes over no sooner than TTL after the primary's last successful renewal (plus up
//! to etcd's expiry sweep, about 0.5 s, and one poll interval). The TTL is whole seconds and
//! etcd raises it to its minimum (1.5 x election timeout, 2 s with default etcd settings).
//!
//! The API is synchronous: a current-thread tokio runtime runs in a thread named `ft-fencing`
//! that this module spawns, and callers talk to it over channels.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Identity, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc as amsc;

/// Default lease TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(2);

/// Files of a QEMU-style x509 directory used for etcd.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
pub const CLIENT_KEY_FILE: &str = "client-key.pem";

/// How long a clean release may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);
/// Slack on top of the worker's own deadline before a caller gives up on the reply.
const REPLY_SLACK: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EtcdFenceError {
    #[error("bad etcd fencing spec {spec:?} (want etcd://HOST:PORT[,HOST:PORT...]): {reason}")]
    BadSpec { spec: String, reason: String },
    #[error("etcd TLS file {} unreadable: {source}", path.display())]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd client setup for {endpoints} failed: {cause}")]
    Setup { endpoints: String, cause: String },
    #[error("etcd unreachable at {endpoints}: {cause}")]
    Unreachable { endpoints: String, cause: String },
    #[error("etcd at {endpoints} gave no answer within {waited:?} while {during}")]
    Timeout {
        endpoints: String,
        waited: Duration,
        during: &'static str,
    },
    #[error("etcd at {endpoints} refused {during}: {cause}")]
    Refused {
        endpoints: String,
        during: &'static str,
        cause: String,
    },
    #[error("etcd lease {lease:#x} on {key} lost: {reason}")]
    LeaseLost {
        key: String,
        lease: i64,
        reason: String,
    },
    #[error("etcd key {key} is held by the {role} ({claimant:?}); this side is fenced")]
    HeldByOther {
        key: String,
        role: Role,
        claimant: String,
    },
    #[error("etcd key {key} still held by the {role} ({claimant:?}) after waiting {waited:?}; this side is fenced")]
    StillHeld {
        key: String,
        role: Role,
        claimant: String,
        waited: Duration,
    },
    #[error("the etcd fencing thread is gone")]
    ThreadGone,
    #[error("cannot start the etcd fencing thread: {0}")]
    Spawn(std::io::Error),
}

/// Which side of the pair a key names (the witness's roles, spelled the same on the wire).
pub use crate::witness::Role;

/// The value stored under a pair's key.
#[derive(Debug, Serialize, Deserialize)]
struct Claim {
    role: Role,
    claimant: String,
}

/// The etcd key of a pair.
pub fn pair_key(pair_id: u64) -> String {
    format!("/tandem/ft/{pair_id:016x}")
}

/// PEM material of the TLS directory, read once at parse time.
#[derive(Clone)]
struct TlsMaterial {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// A connection to etcd for fencing, with its `ft-fencing` thread.
pub struct EtcdFencing {
    endpoints: Vec<String>,
    tls: bool,
    ttl: Duration,
    worker: Arc<Worker>,
}

impl fmt::Debug for EtcdFencing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdFencing")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl EtcdFencing {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...]` and starts the fencing thread (no network yet).
    /// With `tls_dir`, talks https with `ca-cert.pem`, `client-cert.pem` and `client-key.pem`
    /// from it; without, plain http.
    pub fn parse(spec: &str, tls_dir: Option<&Path>) -> Result<EtcdFencing, EtcdFenceError> {
        let endpoints = parse_spec(spec)?;
        let tls = tls_dir.map(read_tls_dir).transpose()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let worker = Worker::spawn(urls, endpoints.join(","), tls.clone())?;
        Ok(EtcdFencing {
            endpoints,
            tls: tls.is_some(),
            ttl: DEFAULT_TTL,
            worker: Arc::new(worker),
        })
    }

    /// Sets the lease TTL (whole seconds, rounded up, at least 1 s; etcd may raise it).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// `HOST:PORT` of each endpoint.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn uses_tls(&self) -> bool {
        self.tls
    }

    /// One status round trip, for use when fencing is enabled.
    pub fn check_reachable(&self, timeout: Duration) -> Result<(), EtcdFenceError> {
        let (reply, rx) = mpsc::channel();
        self.worker.send(Request::Check { timeout, reply })?;
        wait_reply(&rx, timeout)
    }

    /// Takes the pair as the primary: fails if the backup holds the key (it took over).
    pub fn hold_as_primary(
        &self,
        pair_id: u64,
        claimant: &str,
    ) -> Result<LeaseHold, EtcdFenceError> {
        // One attempt; a grant plus two transactions fit easily in a TTL.
        let deadline = self.ttl.max(Duration::from_secs(1)) + Duration::from_secs(1);
        self.claim(Role::Primary, pair_id, claimant, deadline)
    }

    /// Takes the pair as the backup: wins once the key is absent (the primary's lease expired
    /// or was released), or if the key already names this backup and `claimant`. Retries until
    /// `deadline` (something like TTL plus a few seconds).
    pub fn claim_as_backup(
        &self,
        pair_id: u64,
        claimant: &str,
        deadline: Duration,
    ) -> Result<LeaseHold, EtcdFenceError> {
        self.claim(Role::Backup, pair_id, claimant, deadline)
    }

    fn claim(
        &self,
        role: Role,
        pair_id: u64,
        claimant: &str,
        deadline: Duration,
    ) -> Result<LeaseHold, EtcdFenceError> {
        let (reply, rx) = mpsc::channel();
        self.worker.send(Request::Claim {
            role,
            key: pair_key(pair_id),
            claimant: claimant.to_string(),
            ttl_secs: ttl_secs(self.ttl),
            deadline,
            reply,
        })?;
        let parts = wait_reply(&rx, deadline)?;
        Ok(LeaseHold {
            key: parts.key,
            lease: parts.lease,
            role,
            state: parts.state,
            cmds: parts.cmds,
            _worker: self.worker.clone(),
        })
    }
}

/// Whole seconds for etcd, rounded up, at least 1.
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// Local safety margin under the server's TTL (clock-rate drift, scheduling).
fn margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(50))
}

fn wait_reply<T>(
    rx: &mpsc::Receiver<Result<T, EtcdFenceError>>,
    timeout: Duration,
) -> Result<T, EtcdFenceError> {
    // The worker bounds its own work by `timeout`; the slack only guards against a stuck thread.
    match rx.recv_timeout(timeout + REPLY_SLACK) {
        Ok(result) => result,
        Err(_) => Err(EtcdFenceError::ThreadGone),
    }
}

fn parse_spec(spec: &str) -> Result<Vec<String>, EtcdFenceError> {
    let bad = |reason: &str| EtcdFenceError::BadSpec {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let rest = spec
        .strip_prefix("etcd://")
        .ok_or_else(|| bad("it must start with etcd://"))?;
    if rest.is_empty() {
        return Err(bad("no endpoint"));
    }
    let mut endpoints = Vec::new();
    for item in rest.split(',') {
        let (host, port) = item
            .rsplit_once(':')
            .ok_or_else(|| bad(&format!("endpoint {item:?} has no :PORT")))?;
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        };
        if !host_ok {
            return Err(bad(&format!("endpoint {item:?} has a bad host")));
        }
        match port.parse::<u16>() {
            Ok(p) if p != 0 => {}
            _ => return Err(bad(&format!("endpoint {item:?} has a bad port"))),
        }
        endpoints.push(item.to_string());
    }
    Ok(endpoints)
}

fn read_tls_dir(dir: &Path) -> Result<TlsMaterial, EtcdFenceError> {
    let read = |name: &str| {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) if !bytes.is_empty() => Ok(bytes),
            Ok(_) => Err(EtcdFenceError::TlsFile {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "empty file"),
            }),
            Err(source) => Err(EtcdFenceError::TlsFile { path, source }),
        }
    };
    Ok(TlsMaterial {
        ca: read(CA_CERT_FILE)?,
        cert: read(CLIENT_CERT_FILE)?,
        key: read(CLIENT_KEY_FILE)?,
    })
}

/// The lease of a pair's key, kept alive by the fencing thread. Dropping it stops the
/// keepalive (the key then expires after TTL); [`LeaseHold::release`] hands the pair back.
pub struct LeaseHold {
    key: String,
    lease: i64,
    role: Role,
    state: Arc<HoldState>,
    cmds: amsc::UnboundedSender<HoldCmd>,
    // Keeps the fencing thread running while the hold exists.
    _worker: Arc<Worker>,
}

impl fmt::Debug for LeaseHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseHold")
            .field("key", &self.key)
            .field("lease", &format_args!("{:#x}", self.lease))
            .field("role", &self.role)
            .field("valid_until", &self.valid_until())
            .finish()
    }
}

impl LeaseHold {
    /// True only while the lease is provably alive on the server; once false, false for good.
    pub fn is_alive(&self) -> bool {
        self.state.valid_until().is_some()
    }

    /// The local deadline of the lease, None once lost.
    pub fn valid_until(&self) -> Option<Instant> {
        self.state.valid_until()
    }

    /// One synchronous keepalive round trip: Ok proves the pair is still ours.
    pub fn confirm(&self, timeout: Duration) -> Result<(), EtcdFenceError> {
        let (reply, rx) = mpsc::channel();
        self.cmds
            .send(HoldCmd::Confirm { timeout, reply })
            .map_err(|_| EtcdFenceError::ThreadGone)?;
        // The task may be mid-renewal; that is bounded by the lease's own deadline.
        let ttl_bound = self
            .valid_until()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        wait_reply(&rx, timeout + ttl_bound)
    }

    /// Stops renewing without revoking, as if this process had died: the lease runs out on
    /// the server after its TTL and `is_alive` turns false at the local deadline.
    pub fn stop_renewing(&self) {
        // A send error means the task already ended: nothing renews anyway.
        let _ = self.cmds.send(HoldCmd::StopRenewing);
    }

    /// Clean stop: deletes the key (if still ours) and revokes the lease.
    pub fn release(self) -> Result<(), EtcdFenceError> {
        let (reply, rx) = mpsc::channel();
        self.cmds
            .send(HoldCmd::Release { reply })
            .map_err(|_| EtcdFenceError::ThreadGone)?;
        wait_reply(&rx, RELEASE_TIMEOUT)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn lease_id(&self) -> i64 {
        self.lease
    }

    /// The role the hold was taken as (a backup that took over keeps `Backup`).
    pub fn role(&self) -> Role {
        self.role
    }
}

/// Liveness of one hold, shared between the caller and the keepalive task.
struct HoldState {
    lost: AtomicBool,
    valid_until: Mutex<Instant>,
}

impl HoldState {
    fn new(valid_until: Instant) -> Self {
        HoldState {
            lost: AtomicBool::new(false),
            valid_until: Mutex::new(valid_until),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Instant> {
        // The guarded value is a plain Instant: a poisoned lock still holds a valid one.
        self.valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn valid_until(&self) -> Option<Instant> {
        let until = *self.lock();
        if self.lost.load(Ordering::SeqCst) {
            return None;
        }
        if Instant::now() >= until {
            self.lost.store(true, Ordering::SeqCst);
            return None;
        }
        Some(until)
    }

    /// Moves the deadline forward after a renewal; refused once lost (no revival).
    fn extend(&self, until: Instant) -> bool {
        let mut guard = self.lock();
        if self.lost.load(Ordering::SeqCst) || Instant::now() >= *guard {
            self.lost.store(true, Ordering::SeqCst);
            return false;
        }
        if until > *guard {
            *guard = until;
        }
        true
    }

    fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// The fencing thread.

enum Request {
    Check {
        timeout: Duration,
        reply: mpsc::Sender<Result<(), EtcdFenceError>>,
    },
    Claim {
        role: Role,
        key: String,
        claimant: String,
        ttl_secs: i64,
        deadline: Duration,
        reply: mpsc::Sender<Result<HoldParts, EtcdFenceError>>,
    },
}

enum HoldCmd {
    Confirm {
        timeout: Duration,
        reply: mpsc::Sender<Result<(), EtcdFenceError>>,
    },
    StopRenewing,
    Release {
        reply: mpsc::Sender<Result<(), EtcdFenceError>>,
    },
}

struct HoldParts {
    key: String,
    lease: i64,
    state: Arc<HoldState>,
    cmds: amsc::UnboundedSender<HoldCmd>,
}

struct Worker {
    requests: amsc::UnboundedSender<Request>,
}

impl Worker {
    fn spawn(
        urls: Vec<String>,
        endpoints: String,
        tls: Option<TlsMaterial>,
    ) -> Result<Worker, EtcdFenceError> {
        let (requests, rx) = amsc::unbounded_channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("ft-fencing".to_string())
            .spawn(move || {
                // Sockets, epoll and timers only: the replication role's filter.
                if vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                    fencing_thread(urls, endpoints, tls, rx, ready_tx);
                } else {
                    let _ = ready_tx.send(Err(EtcdFenceError::Setup {
                        endpoints,
                        cause: "the fencing thread cannot install its seccomp filter".into(),
                    }));
                }
            })
            .map_err(EtcdFenceError::Spawn)?;
        // Setup involves no network: it answers at once.
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Worker { requests }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(EtcdFenceError::ThreadGone),
        }
    }

    fn send(&self, request: Request) -> Result<(), EtcdFenceError> {
        self.requests
            .send(request)
            .map_err(|_| EtcdFenceError::ThreadGone)
    }
}

fn fencing_thread(
    urls: Vec<String>,
    endpoints: String,
    tls: Option<TlsMaterial>,
    mut requests: amsc::UnboundedReceiver<Request>,
    ready: mpsc::Sender<Result<(), EtcdFenceError>>,
) {
    let setup_error = |endpoints: &str, cause: String| EtcdFenceError::Setup {
        endpoints: endpoints.to_string(),
        cause,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(setup_error(&endpoints, format!("tokio runtime: {e}"))));
            return;
        }
    };
    runtime.block_on(async move {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_keep_alive(Duration::from_millis(500), Duration::from_secs(1))
            // A member cut off from the quorum answers at once instead of hanging.
            .with_require_leader(true);
        if let Some(tls) = &tls {
            options = options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(&tls.ca))
                    .identity(Identity::from_pem(&tls.cert, &tls.key)),
            );
        }
        let client = match Client::connect(&urls, Some(options)).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(setup_error(&endpoints, error_chain(&e))));
                return;
            }
        };
        if ready.send(Ok(())).is_err() {
            return;
        }
        let ctx = Arc::new(Ctx {
            client,
            endpoints,
            tls: tls.is_some(),
        });
        // Each request is a task, so a long backup claim does not delay anything else.
        while let Some(request) = requests.recv().await {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                match request {
                    Request::Check { timeout, reply } => {
                        let _ = reply.send(ctx.check(timeout).await);
                    }
                    Request::Claim {
                        role,
                        key,
                        claimant,
                        ttl_secs,
                        deadline,
                        reply,
                    } => {
                        let result = ctx.claim(role, &key, &claimant, ttl_secs, deadline).await;
                        if let Err(mpsc::SendError(Ok(parts))) = reply.send(result) {
                            // The caller gave up: do not leave an orphan holding the pair.
                            parts.state.lose();
                            let _ = ctx.client.lease_client().revoke(parts.lease).await;
                        }
                    }
                }
            });
        }
    });
}

struct Ctx {
    client: Client,
    endpoints: String,
    tls: bool,
}

/// Classified failure of one etcd call.
enum CallError {
    Timeout,
    Unavailable(String),
    LeaseGone(String),
    Other(String),
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// A gRPC status as one short line: its message and the causes under it.
fn status_text(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        let s_text = s.to_string();
        if s_text != "transport error" && !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

fn classify(e: etcd_client::Error) -> CallError {
    use etcd_client::Error as E;
    match &e {
        E::GRpcStatus(status) => {
            let message = status.message();
            if message.contains("lease not found") {
                CallError::LeaseGone(message.to_string())
            } else if matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown
                    // The connection was closed under the call (a member died, or refused
                    // our TLS client certificate after the handshake).
                    | tonic::Code::Cancelled
            ) {
                CallError::Unavailable(status_text(status))
            } else {
                CallError::Other(status_text(status))
            }
        }
        E::LeaseKeepAliveError(m) if m.contains("not found") => CallError::LeaseGone(m.clone()),
        E::TransportError(_) | E::IoError(_) => CallError::Unavailable(error_chain(&e)),
        _ => CallError::Other(error_chain(&e)),
    }
}

/// Pause before retrying a call that found its endpoint unavailable.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// How long one attempt may wait for its answer before it is tried again. A call handed to
/// a member that just died can hang on its connection until keep-alive notices; a retry goes
/// to a live member.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1000);

/// Runs `attempt` until it answers or `limit` passes. The balanced channel hands a call to a
/// dead member as readily as to a live one, so an unavailable endpoint, or an attempt with no
/// answer within [`ATTEMPT_TIMEOUT`], is retried (on another member, likely); every other
/// error is final. Only calls that are safe to repeat go through here (a repeated lease grant
/// leaves an unused lease, which expires).
async fn call<T, F, Fut>(limit: Duration, mut attempt: F) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let end = Instant::now() + limit;
    let mut last: Option<CallError> = None;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last.unwrap_or(CallError::Timeout));
        }
        match tokio::time::timeout(left.min(ATTEMPT_TIMEOUT), attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => match classify(e) {
                CallError::Unavailable(cause) => {
                    last = Some(CallError::Unavailable(cause));
                    tokio::time::sleep(RETRY_PAUSE.min(left)).await;
                }
                other => return Err(other),
            },
            // No answer from that member: try again while time is left (the error, if it
            // comes to that, reports what the failed attempts said: it names the cause).
            Err(_) => {
                if last.is_none() {
                    last = Some(CallError::Timeout);
                }
            }
        }
    }
}

/// What a claim transaction found.
enum TxnOutcome {
    Won,
    /// None: the key vanished between the compare and the get.
    Found(Option<KeyValue>),
}

impl Ctx {
    fn error(&self, e: CallError, waited: Duration, during: &'static str) -> EtcdFenceError {
        match e {
            CallError::Timeout => EtcdFenceError::Timeout {
                endpoints: self.endpoints.clone(),
                waited,
                during,
            },
            CallError::Unavailable(cause) => EtcdFenceError::Unreachable {
                endpoints: self.endpoints.clone(),
                cause: self.hint(cause),
            },
            CallError::LeaseGone(cause) | CallError::Other(cause) => EtcdFenceError::Refused {
                endpoints: self.endpoints.clone(),
                during,
                cause,
            },
        }
    }

    /// With TLS 1.3 a rejected client certificate shows up after the handshake, as an alert or
    /// only as a closed connection: say what it likely means.
    fn hint(&self, cause: String) -> String {
        let dropped = ["closed", "alert", "broken pipe"]
            .iter()
            .any(|sign| cause.contains(sign));
        if self.tls && dropped {
            format!(
                "{cause} (the server dropped the TLS connection: does it trust our {CLIENT_CERT_FILE}?)"
            )
        } else {
            cause
        }
    }

    async fn check(&self, timeout: Duration) -> Result<(), EtcdFenceError> {
        call(timeout, || {
            let mut client = self.client.maintenance_client();
            async move { client.status().await }
        })
        .await
        .map(|_| ())
        .map_err(|e| self.error(e, timeout, "checking reachability"))
    }

    async fn claim(
        &self,
        role: Role,
        key: &str,
        claimant: &str,
        ttl_secs: i64,
        deadline: Duration,
    ) -> Result<HoldParts, EtcdFenceError> {
        let start = Instant::now();
        let end = start + deadline;
        let value = serde_json::to_string(&Claim {
            role,
            claimant: claimant.to_string(),
        })
        .map_err(|e| EtcdFenceError::Setup {
            endpoints: self.endpoints.clone(),
            cause: e.to_string(),
        })?;
        let poll = (Duration::from_secs(ttl_secs.unsigned_abs()) / 10)
            .clamp(Duration::from_millis(50), Duration::from_millis(250));
        // (lease id, server TTL, instant the grant was sent)
        let mut lease: Option<(i64, Duration, Instant)> = None;
        // The last holder seen says more than any failed call: a claim that saw the key held
        // and then lost a member is denied, not merely unlucky.
        let mut held: Option<Claim> = None;
        let mut last_error: Option<EtcdFenceError> = None;
        let outcome = loop {
            let now = Instant::now();
            if now >= end {
                break Err(match held {
                    Some(found) => EtcdFenceError::StillHeld {
                        key: key.to_string(),
                        role: found.role,
                        claimant: found.claimant,
                        waited: start.elapsed(),
                    },
                    None => last_error.unwrap_or(EtcdFenceError::Timeout {
                        endpoints: self.endpoints.clone(),
                        waited: deadline,
                        during: "claiming the pair",
                    }),
                });
            }
            let left = end - now;
            // A lease too close to its expiry is not worth attaching the key to.
            if let Some((id, ttl, sent)) = lease {
                if now + margin(ttl) * 2 >= sent + ttl {
                    self.revoke_quietly(id).await;
                    lease = None;
                }
            }
            let (id, ttl, sent) = match lease {
                Some(l) => l,
                None => {
                    let sent = Instant::now();
                    let grant = call(left, || {
                        let mut leases = self.client.lease_client();
                        async move { leases.grant(ttl_secs, None).await }
                    });
                    match grant.await {
                        Ok(resp) if resp.ttl() > 0 => {
                            let l = (
                                resp.id(),
                                Duration::from_secs(resp.ttl().unsigned_abs()),
                                sent,
                            );
                            lease = Some(l);
                            l
                        }
                        Ok(resp) => {
                            last_error = Some(EtcdFenceError::Refused {
                                endpoints: self.endpoints.clone(),
                                during: "granting a lease",
                                cause: resp.error().to_string(),
                            });
                            tokio::time::sleep(poll.min(left)).await;
                            continue;
                        }
                        Err(CallError::Timeout) if last_error.is_some() => continue,
                        Err(e) => {
                            last_error = Some(self.error(e, deadline, "granting a lease"));
                            tokio::time::sleep(poll.min(left)).await;
                            continue;
                        }
                    }
                }
            };
            match self.try_take(key, &value, role, claimant, id, left).await {
                Ok(true) => break Ok((id, ttl, sent)),
                Ok(false) => {}
                Err(TakeError::Denied(found)) => {
                    if role == Role::Primary {
                        break Err(EtcdFenceError::HeldByOther {
                            key: key.to_string(),
                            role: found.role,
                            claimant: found.claimant,
                        });
                    }
                    held = Some(found);
                }
                Err(TakeError::Call(CallError::LeaseGone(_))) => {
                    // Our fresh lease expired before it was used: grant another.
                    lease = None;
                    continue;
                }
                // A last attempt cut short by the deadline says less than what came before.
                Err(TakeError::Call(CallError::Timeout)) if last_error.is_some() => {}
                Err(TakeError::Call(e)) => {
                    last_error = Some(self.error(e, deadline, "claiming the pair"));
                }
            }
            tokio::time::sleep(poll.min(end.saturating_duration_since(Instant::now()))).await;
        };
        match outcome {
            Ok((id, ttl, sent)) => {
                let state = Arc::new(HoldState::new(sent + ttl - margin(ttl)));
                let (cmds, cmd_rx) = amsc::unbounded_channel();
                let keeper = KeepAlive {
                    client: self.client.clone(),
                    endpoints: self.endpoints.clone(),
                    key: key.to_string(),
                    lease: id,
                    ttl,
                    last_sent: sent,
                    stream: None,
                    state: state.clone(),
                };
                tokio::spawn(keeper.run(cmd_rx));
                Ok(HoldParts {
                    key: key.to_string(),
                    lease: id,
                    state,
                    cmds,
                })
            }
            Err(e) => {
                if let Some((id, _, _)) = lease {
                    self.revoke_quietly(id).await;
                }
                Err(e)
            }
        }
    }

    /// One attempt: create the key if absent, or move it onto our lease if it is ours already.
    /// Ok(false): the key changed under us, try again.
    async fn try_take(
        &self,
        key: &str,
        value: &str,
        role: Role,
        claimant: &str,
        lease: i64,
        limit: Duration,
    ) -> Result<bool, TakeError> {
        let create = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let found = match self.txn(create, limit).await? {
            TxnOutcome::Won => return Ok(true),
            TxnOutcome::Found(Some(kv)) => kv,
            // Free now: try again.
            TxnOutcome::Found(None) => return Ok(false),
        };
        let current: Claim = serde_json::from_slice(found.value()).unwrap_or(Claim {
            role: Role::Primary,
            claimant: String::from_utf8_lossy(found.value()).into_owned(),
        });
        // The primary takes back a key naming the primary (its earlier run); the backup only
        // its own earlier claim. Anything else belongs to the other side.
        let ours = match role {
            Role::Primary => current.role == Role::Primary,
            Role::Backup => current.role == Role::Backup && current.claimant == claimant,
        };
        if !ours {
            return Err(TakeError::Denied(current));
        }
        if found.lease() == lease {
            return Ok(true);
        }
        let moved = Txn::new()
            .when([Compare::mod_revision(
                key,
                CompareOp::Equal,
                found.mod_revision(),
            )])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        match self.txn(moved, limit).await? {
            TxnOutcome::Won => {
                // The earlier hold is superseded: its lease going makes it lost, not alive.
                if found.lease() != 0 {
                    self.revoke_quietly(found.lease()).await;
                }
                Ok(true)
            }
            TxnOutcome::Found(_) => Ok(false),
        }
    }

    async fn txn(&self, txn: Txn, limit: Duration) -> Result<TxnOutcome, TakeError> {
        // Retrying is safe: a create or move that did apply is recognised as ours next time.
        let resp = call(limit, || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
        .map_err(TakeError::Call)?;
        if resp.succeeded() {
            return Ok(TxnOutcome::Won);
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                return Ok(TxnOutcome::Found(get.kvs().first().cloned()));
            }
        }
        Ok(TxnOutcome::Found(None))
    }

    async fn revoke_quietly(&self, lease: i64) {
        // Best effort: an unrevoked lease simply expires after its TTL.
        let _ = call(Duration::from_secs(1), || {
            let mut leases = self.client.lease_client();
            async move { leases.revoke(lease).await }
        })
        .await;
    }
}

enum TakeError {
    Denied(Claim),
    Call(CallError),
}

/// The keepalive task of one hold.
struct KeepAlive {
    client: Client,
    endpoints: String,
    key: String,
    lease: i64,
    ttl: Duration,
    last_sent: Instant,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    state: Arc<HoldState>,
}

impl KeepAlive {
    async fn run(mut self, mut cmds: amsc::UnboundedReceiver<HoldCmd>) {
        let mut next = self.last_sent + self.ttl / 3;
        let mut renewing = true;
        loop {
            if self.state.valid_until().is_none() {
                renewing = false;
            }
            let cmd = if renewing {
                let wait = next.saturating_duration_since(Instant::now());
                match tokio::time::timeout(wait, cmds.recv()).await {
                    Ok(cmd) => cmd,
                    Err(_) => {
                        next = match self.renew().await {
                            Ok(()) => self.last_sent + self.ttl / 3,
                            // Retry soon on another connection, while the deadline allows.
                            Err(_) => {
                                Instant::now() + (self.ttl / 10).max(Duration::from_millis(50))
                            }
                        };
                        continue;
                    }
                }
            } else {
                cmds.recv().await
            };
            match cmd {
                // The hold was dropped: stop renewing, the lease runs out on the server.
                None => return,
                Some(HoldCmd::StopRenewing) => {
                    renewing = false;
                    self.stream = None;
                }
                Some(HoldCmd::Confirm { timeout, reply }) => {
                    let result = if renewing {
                        self.confirm(timeout).await
                    } else {
                        Err(self.lost("renewal stopped or deadline passed"))
                    };
                    if result.is_ok() {
                        next = self.last_sent + self.ttl / 3;
                    }
                    let _ = reply.send(result);
                }
                Some(HoldCmd::Release { reply }) => {
                    let _ = reply.send(self.release().await);
                    return;
                }
            }
        }
    }

    fn lost(&self, reason: &str) -> EtcdFenceError {
        self.state.lose();
        EtcdFenceError::LeaseLost {
            key: self.key.clone(),
            lease: self.lease,
            reason: reason.to_string(),
        }
    }

    async fn confirm(&mut self, timeout: Duration) -> Result<(), EtcdFenceError> {
        match self.renew_within(timeout).await {
            Ok(()) => Ok(()),
            Err(CallError::LeaseGone(reason)) => Err(self.lost(&reason)),
            Err(e) => {
                let endpoints = self.endpoints.clone();
                Err(match e {
                    CallError::Timeout => EtcdFenceError::Timeout {
                        endpoints,
                        waited: timeout,
                        during: "confirming the lease",
                    },
                    CallError::Unavailable(cause) => {
                        EtcdFenceError::Unreachable { endpoints, cause }
                    }
                    CallError::Other(cause) | CallError::LeaseGone(cause) => {
                        EtcdFenceError::Refused {
                            endpoints,
                            during: "confirming the lease",
                            cause,
                        }
                    }
                })
            }
        }
    }

    async fn renew(&mut self) -> Result<(), CallError> {
        let limit = self
            .state
            .valid_until()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        let result = self.renew_within(limit).await;
        if let Err(CallError::LeaseGone(reason)) = &result {
            let reason = reason.clone();
            self.lost(&reason);
        }
        result
    }

    /// One keepalive round trip; on success the deadline moves to send time + server TTL.
    async fn renew_within(&mut self, limit: Duration) -> Result<(), CallError> {
        if self.state.valid_until().is_none() {
            return Err(CallError::LeaseGone("local deadline passed".to_string()));
        }
        let end = Instant::now() + limit;
        if let Some((keeper, responses)) = self.stream.as_mut() {
            // Taken before anything is sent: the server's renewal happens no earlier.
            let sent = Instant::now();
            let round = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            match tokio::time::timeout(limit, round).await {
                Ok(Ok(Some(resp))) => return self.renewed(sent, resp.ttl()),
                Ok(Err(e)) => {
                    if let CallError::LeaseGone(reason) = classify(e) {
                        return Err(CallError::LeaseGone(reason));
                    }
                }
                Ok(Ok(None)) | Err(_) => {}
            }
            // A failed stream may still deliver a stale answer: open another one instead.
            self.stream = None;
        }
        let sent = Instant::now();
        let lease = self.lease;
        let left = end.saturating_duration_since(sent);
        let opened = call(left, || {
            let mut leases = self.client.lease_client();
            async move { leases.keep_alive(lease).await }
        })
        .await?;
        self.stream = Some(opened);
        // Opening the stream is itself a round, answered with TTL > 0 (checked by the client)
        // and renewed to the lease's TTL, which the server fixed at grant time.
        let ttl_secs = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        self.renewed(sent, ttl_secs)
    }

    fn renewed(&mut self, sent: Instant, ttl_secs: i64) -> Result<(), CallError> {
        if ttl_secs <= 0 {
            self.stream = None;
            return Err(CallError::LeaseGone(
                "the server answered TTL 0 (lease expired or revoked)".to_string(),
            ));
        }
        let ttl = Duration::from_secs(ttl_secs.unsigned_abs());
        if !self.state.extend(sent + ttl - margin(ttl)) {
            self.stream = None;
            return Err(CallError::LeaseGone(
                "local deadline passed before the renewal".to_string(),
            ));
        }
        self.ttl = ttl;
        self.last_sent = sent;
        Ok(())
    }

    async fn release(&mut self) -> Result<(), EtcdFenceError> {
        self.state.lose();
        self.stream = None;
        let delete = Txn::new()
            .when([Compare::lease(
                self.key.clone(),
                CompareOp::Equal,
                self.lease,
            )])
            .and_then([TxnOp::delete(self.key.clone(), None)]);
        let endpoints = self.endpoints.clone();
        let map = |e: CallError| match e {
            CallError::Timeout => EtcdFenceError::Timeout {
                endpoints: endpoints.clone(),
                waited: RELEASE_TIMEOUT,
                during: "releasing the pair",
            },
            CallError::Unavailable(cause) => EtcdFenceError::Unreachable {
                endpoints: endpoints.clone(),
                cause,
            },
            CallError::Other(cause) | CallError::LeaseGone(cause) => EtcdFenceError::Refused {
                endpoints: endpoints.clone(),
                during: "releasing the pair",
                cause,
            },
        };
        call(RELEASE_TIMEOUT / 2, || {
            let mut kv = self.client.kv_client();
            let delete = delete.clone();
            async move { kv.txn(delete).await }
        })
        .await
        .map_err(map)?;
        let lease = self.lease;
        let revoke = call(RELEASE_TIMEOUT / 2, || {
            let mut leases = self.client.lease_client();
            async move { leases.revoke(lease).await }
        });
        match revoke.await {
            // Already gone: nothing left to revoke.
            Ok(_) | Err(CallError::LeaseGone(_)) => Ok(()),
            Err(e) => Err(map(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        let ok = parse_spec("etcd://127.0.0.1:2379,etcd-b.example:2379,[::1]:2379").unwrap();
        assert_eq!(ok, ["127.0.0.1:2379", "etcd-b.example:2379", "[::1]:2379"]);
        for bad in [
            "",
            "etcd://",
            "http://127.0.0.1:2379",
            "etcd://127.0.0.1",
            "etcd://127.0.0.1:0",
            "etcd://127.0.0.1:99999",
            "etcd://127.0.0.1:2379,",
            "etcd://127.0.0.1:2379/path",
            "etcd://user@host:2379",
            "etcd://[nope]:2379",
        ] {
            let e = parse_spec(bad).unwrap_err();
            assert!(e.to_string().contains("etcd://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn key_and_ttl() {
        assert_eq!(pair_key(0xab), "/tandem/ft/00000000000000ab");
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::ZERO), 1);
        assert_eq!(ttl_secs(Duration::from_secs(2)), 2);
        assert!(margin(Duration::from_secs(2)) < Duration::from_secs(1));
    }

    #[test]
    fn hold_state_never_revives() {
        let state = HoldState::new(Instant::now() + Duration::from_millis(20));
        assert!(state.valid_until().is_some());
        assert!(state.extend(Instant::now() + Duration::from_secs(5)));
        state.lose();
        assert!(state.valid_until().is_none());
        assert!(!state.extend(Instant::now() + Duration::from_secs(5)));
        assert!(state.valid_until().is_none());

        let expired = HoldState::new(Instant::now());
        assert!(expired.valid_until().is_none());
        assert!(!expired.extend(Instant::now() + Duration::from_secs(5)));
    }

    #[test]
    fn missing_tls_file_is_named() {
        let dir = std::env::temp_dir().join(format!("etcd-fence-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CA_CERT_FILE), "x").unwrap();
        let e = EtcdFencing::parse("etcd://127.0.0.1:2379", Some(&dir)).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(e.to_string().contains(CLIENT_CERT_FILE), "{e}");
    }
}
