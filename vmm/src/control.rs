//! Messages between the API thread and the control loop. The API thread turns an HTTP request
//! into a [`VmmRequest`], sends it with a reply channel through an [`ApiSender`], and turns the
//! [`VmmResponse`] or [`VmmError`] back into HTTP. Only the control loop touches the VM.

use std::collections::BTreeMap;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;

/// What the API (or ch-remote through it) asks the VMM to do.
#[derive(Debug)]
pub enum VmmRequest {
    /// `GET vmm.ping`
    Ping,
    /// `PUT vmm.shutdown`: stop the VM if any and exit the VMM process.
    ShutdownVmm,
    /// `PUT vm.create`
    CreateVm(Box<VmConfig>),
    /// `PUT vm.boot`
    BootVm,
    /// `GET vm.info`
    VmInfo,
    /// `GET vm.counters`
    Counters,
    /// `PUT vm.pause`
    PauseVm,
    /// `PUT vm.resume`
    ResumeVm,
    /// `PUT vm.shutdown`
    ShutdownVm,
    /// `PUT vm.reboot`
    RebootVm,
    /// `PUT vm.delete`
    DeleteVm,
    /// `PUT vm.power-button`
    PowerButton,
    /// `PUT vm.snapshot`: write the paused VM's complete state to `destination_url`.
    Snapshot(SnapshotRequest),
    /// `PUT vm.restore`: create this VMM's VM from a snapshot (no VM may exist yet).
    Restore(RestoreRequest),
    /// `PUT vm.send-migration`: live-migrate the running VM to a receiving VMM.
    SendMigration(SendMigrationRequest),
    /// `PUT vm.receive-migration`: wait for an incoming migration (no VM may exist yet).
    ReceiveMigration(ReceiveMigrationRequest),
}

/// `vm.snapshot` body (Cloud Hypervisor's `VmSnapshotConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// `file:///path/to/dir`
    pub destination_url: String,
}

/// `vm.restore` body (Cloud Hypervisor's `RestoreConfig`), also `--restore source_url=...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// `file:///path/to/dir`
    pub source_url: String,
    #[serde(default)]
    pub prefault: bool,
    /// Resume the VM once restored (`--restore ...,resume=on`); the API leaves it paused.
    #[serde(default)]
    pub resume: bool,
}

/// `vm.send-migration` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationRequest {
    /// `tcp:HOST:PORT` or `unix:/path`
    pub destination_url: String,
    /// Same-host migration with shared memory (not supported; must be false).
    #[serde(default)]
    pub local: bool,
    /// Target downtime: pre-copy iterates until the rest can be sent within this time.
    #[serde(default = "default_downtime_ms", alias = "downtime")]
    pub downtime_ms: u64,
}

fn default_downtime_ms() -> u64 {
    300
}

/// `vm.receive-migration` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationRequest {
    /// `tcp:ADDR:PORT` (listen) or `unix:/path`
    pub receiver_url: String,
}

/// VM lifecycle states, spelled as Cloud Hypervisor's `VmInfo.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    BreakPoint,
}

/// `GET vmm.ping` body (Cloud Hypervisor's `VmmPingResponse`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

/// `GET vm.info` body (Cloud Hypervisor's `VmInfo`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfoResponse {
    pub config: VmConfig,
    pub state: VmState,
    pub memory_actual_size: u64,
}

/// `GET vm.counters` body: device id -> counter name -> value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

/// A successful answer from the control loop.
#[derive(Debug, PartialEq)]
pub enum VmmResponse {
    /// 204 No Content.
    Empty,
    Ping(VmmPingResponse),
    VmInfo(Box<VmInfoResponse>),
    Counters(VmCounters),
}

/// How an error maps onto HTTP (the API layer picks the status code from this).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request itself is wrong.
    BadRequest,
    /// 404: there is no VM (not created yet, or deleted).
    NotFound,
    /// 405: the action is not allowed in the VM's current state.
    WrongState,
    /// 500: the action was allowed but failed.
    Internal,
}

/// Why the control loop refused or failed a request. Messages are one line.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("no VM has been created")]
    VmNotCreated,
    #[error("a VM has already been created")]
    VmAlreadyCreated,
    #[error("cannot {action} a VM in state {state:?}")]
    InvalidState {
        action: &'static str,
        state: VmState,
    },
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    #[error("{action} failed: {message}")]
    Failed {
        action: &'static str,
        message: String,
    },
}

impl VmmError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            VmmError::VmNotCreated => ErrorKind::NotFound,
            VmmError::VmAlreadyCreated | VmmError::InvalidConfig(_) => ErrorKind::BadRequest,
            VmmError::InvalidState { .. } => ErrorKind::WrongState,
            VmmError::Failed { .. } => ErrorKind::Internal,
        }
    }
}

pub type VmmResult = Result<VmmResponse, VmmError>;

/// One request in flight: what to do and where to send the answer.
pub struct ApiMessage {
    pub request: VmmRequest,
    pub reply: mpsc::Sender<VmmResult>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the VMM control loop has stopped")]
    ControlLoopGone,
    #[error("cannot wake the VMM control loop: {0}")]
    Wake(std::io::Error),
}

/// The API thread's handle on the control loop: a channel plus an eventfd that wakes the
/// loop's epoll (a channel alone cannot be waited on with epoll).
#[derive(Clone)]
pub struct ApiSender {
    sender: mpsc::Sender<ApiMessage>,
    wake: std::sync::Arc<EventFd>,
}

impl ApiSender {
    pub fn new(sender: mpsc::Sender<ApiMessage>, wake: std::sync::Arc<EventFd>) -> Self {
        Self { sender, wake }
    }

    /// Sends `request` and waits for the control loop's answer.
    pub fn call(&self, request: VmmRequest) -> Result<VmmResult, SendError> {
        let (reply, answer) = mpsc::channel();
        self.sender
            .send(ApiMessage { request, reply })
            .map_err(|_| SendError::ControlLoopGone)?;
        self.wake.write(1).map_err(SendError::Wake)?;
        answer.recv().map_err(|_| SendError::ControlLoopGone)
    }
}
