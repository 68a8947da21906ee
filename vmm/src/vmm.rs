//! The control loop: owns the VM, waits for the events that end or restart a run, and (later)
//! for API requests. Nothing else touches the VM.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{ConsoleOutputMode, HostResources, VmConfig};
use crate::control::{
    ApiMessage, ReceiveMigrationRequest, RestoreRequest, SendMigrationRequest, SnapshotRequest,
    VmInfoResponse, VmResizeRequest, VmState, VmmError, VmmPingResponse, VmmRequest, VmmResponse,
    VmmResult,
};
use crate::control::{EnableFtRequest, FtHealth, FtRole, FtStatus, ReceiveFtRequest};
use crate::control::{HotplugRequest, PciDeviceInfo, RemoveDeviceRequest};
use crate::event_monitor::EventMonitor;
use crate::fault_tolerance::{
    BackupEvent, BackupFt, FtProvider, PrimaryEvent, PrimaryFt, ReplicableVm, StopReason,
};
use crate::hotplug;
use crate::migration::receive::{IncomingEvent, IncomingMigration, ReceiveError, ReceiveTimeouts};
use crate::migration::{live, snapshot, TransferStats};
use crate::progress::{Operation, Phase, ProgressBoard, TransferProgress};
use crate::seccomp::SeccompMode;
use crate::vm::{self, Vm, VmError, VmEvents};
use crate::vm::{PrepareOptions, PreparedVm, RestoredMemory, Start, VmSnapshotState};

#[derive(Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off.
    GuestShutdown,
    /// `vmm.shutdown` was requested through the API.
    VmmShutdown,
    /// The VM now runs on the migration's destination.
    MigratedAway,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("cannot open serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on serial socket {path}: {source}")]
    SerialSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serial mode {0:?} is not supported")]
    SerialMode(ConsoleOutputMode),
    #[error("{0}")]
    Console(#[from] crate::console::ConsoleHostError),
    #[error("control loop epoll failed: {0}")]
    Epoll(std::io::Error),
    #[error("no VM has been created")]
    NoVm,
    #[error("guest stopped: {0}")]
    VcpuFailed(String),
    #[error("invalid VM configuration: {0}")]
    Config(#[from] crate::config::ValidationError),
    #[error("--restore: {0}")]
    Restore(String),
}

/// A writer shared between successive boots of the VM (a reboot keeps the console).
#[derive(Clone)]
struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// The console client connected to a serial socket.
struct SerialClient {
    stream: UnixStream,
    /// Output dropped because the client did not read it fast enough.
    dropped: u64,
}

impl SerialClient {
    /// Makes the stream non-blocking: the vCPU thread writes to it and must never wait for a
    /// client that stopped reading.
    fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self { stream, dropped: 0 })
    }

    /// Writes what the socket takes now and drops the rest. Err on a permanent error.
    fn write_or_drop(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let mut rest = buf;
        while !rest.is_empty() {
            match self.stream.write(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.dropped == 0 {
                        log::warn!("serial socket: the client is not reading; dropping output");
                    }
                    self.dropped += rest.len() as u64;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for SerialClient {
    fn drop(&mut self) {
        if self.dropped > 0 {
            log::info!(
                "serial socket: {} bytes of output were dropped for a slow client",
                self.dropped
            );
        }
    }
}

/// Serial output to whichever client is connected to the socket; output with no client
/// connected is dropped, as on a real serial line.
struct SocketWriter {
    client: Arc<Mutex<Option<SerialClient>>>,
}

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = client.as_mut() {
            if let Err(e) = c.write_or_drop(buf) {
                // Gone (or broken): forget it so that a new client can connect.
                log::info!("serial socket: dropping the client: {e}");
                *client = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Default bound of `--serial file=` output.
pub(crate) const SERIAL_FILE_CAP: u64 = 64 << 20;

/// A writer that stops writing after `cap` bytes, so that a guest printing without end
/// cannot fill the host's disk. Output beyond the cap is reported written and dropped.
pub(crate) struct CappedWriter<W> {
    inner: W,
    written: u64,
    cap: u64,
}

impl<W: Write> CappedWriter<W> {
    pub(crate) fn new(inner: W, cap: u64) -> Self {
        Self {
            inner,
            written: 0,
            cap,
        }
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.cap.saturating_sub(self.written);
        if room == 0 {
            return Ok(buf.len());
        }
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.write(&buf[..take])?;
        self.written += n as u64;
        if self.written >= self.cap {
            log::warn!(
                "serial output reached its cap of {} bytes; further output is dropped",
                self.cap
            );
            // Whatever of `buf` is beyond the cap is dropped, not retried.
            return Ok(buf.len());
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn serial_socket(path: &Path) -> Result<SocketWriter, RunError> {
    let err = |source| RunError::SerialSocket {
        path: path.to_path_buf(),
        source,
    };
    // The console carries the guest's output and input: only this user may connect.
    let listener = crate::unix_socket::bind_owner_only(path).map_err(err)?;
    let client = Arc::new(Mutex::new(None));
    let accepted = client.clone();
    std::thread::Builder::new()
        .name("serial-socket".into())
        .spawn(move || {
            if !crate::seccomp::apply_or_log(crate::seccomp::ThreadRole::SerialSocket) {
                return;
            }
            for stream in listener.incoming().flatten() {
                match SerialClient::new(stream) {
                    Ok(c) => *accepted.lock().unwrap_or_else(|p| p.into_inner()) = Some(c),
                    Err(e) => log::warn!("serial socket: cannot take a client: {e}"),
                }
            }
        })
        .map_err(err)?;
    Ok(SocketWriter { client })
}

fn serial_output(config: &VmConfig) -> Result<Option<SharedWriter>, RunError> {
    let serial = &config.serial;
    let out: Box<dyn Write + Send> = match serial.mode {
        ConsoleOutputMode::Off => return Ok(None),
        ConsoleOutputMode::Null => Box::new(std::io::sink()),
        ConsoleOutputMode::Tty => Box::new(std::io::stdout()),
        ConsoleOutputMode::File => {
            let path = serial.file.clone().unwrap_or_default();
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(|source| RunError::SerialFile { path, source })?;
            Box::new(CappedWriter::new(file, SERIAL_FILE_CAP))
        }
        ConsoleOutputMode::Socket => {
            let path = serial.socket.clone().unwrap_or_default();
            Box::new(serial_socket(&path)?)
        }
        ConsoleOutputMode::Pty => return Err(RunError::SerialMode(serial.mode)),
    };
    Ok(Some(SharedWriter(Arc::new(Mutex::new(out)))))
}

#[derive(Clone, Copy)]
enum Wake {
    Exit = 1,
    Reset = 2,
    VcpuFailure = 3,
    Api = 4,
    /// A fault-tolerance thread needs the control loop.
    Ft = 5,
    /// The running epoch is over: checkpoint.
    Epoch = 6,
    /// The migration receiver thread needs the control loop.
    Migration = 7,
    /// The guest ejected a hot-plugged PCI device.
    PciEject = 8,
}

/// The API side of the control loop: requests arrive on the channel, and the eventfd wakes
/// the loop's epoll when one is queued.
pub struct ApiReceiver {
    pub requests: Receiver<ApiMessage>,
    pub wake: Arc<EventFd>,
}

/// What the VMM process is started with.
pub struct VmmOptions {
    /// A VM to create and boot at once (from the command line).
    pub config: Option<VmConfig>,
    /// A snapshot to restore at once (`--restore`).
    pub restore: Option<RestoreRequest>,
    /// Requests from the API server, when `--api-socket` was given.
    pub api: Option<ApiReceiver>,
    pub seccomp: SeccompMode,
    pub event_monitor: Option<Arc<EventMonitor>>,
    /// Fault tolerance (`vm.enable-ft`, `vm.receive-ft`); None: those requests fail.
    pub ft: Option<Box<dyn FtProvider>>,
    /// Where long transfers publish their progress for the API threads (`vm.progress`).
    pub progress: Arc<ProgressBoard>,
}

/// A `vm.receive-migration` in progress: its `migration-rx` thread does all the network I/O;
/// the control loop builds and restores the VM when the thread asks.
struct Incoming {
    receiver: IncomingMigration,
    /// The request's answer, sent when the receive ends (the client waits, as with Cloud
    /// Hypervisor; the control loop does not).
    reply: mpsc::Sender<VmmResult>,
    /// The VM being filled with the source's memory (built when its Hello arrived).
    prepared: Option<(PreparedVm, Option<SharedWriter>)>,
    /// What this host's operator named for the arriving VM (the source's are never used).
    resources: HostResources,
}

/// A backup's VM, built when the primary connected and kept current by the backup's receiver
/// thread through its memory; it runs only when the backup takes over.
struct Standby {
    vm: PreparedVm,
    serial: Option<SharedWriter>,
}

/// Owns the VM and everything about its lifecycle; runs on the control loop thread only.
struct Vmm {
    kvm: kvm_ioctls::Kvm,
    events: VmEvents,
    seccomp: SeccompMode,
    monitor: Option<Arc<EventMonitor>>,
    progress: Arc<ProgressBoard>,
    /// The primary's health and group size last reported on the event monitor, so that each
    /// change is reported once.
    ft_reported: (FtHealth, u64),
    /// The created VM's configuration (None before `vm.create` or after `vm.delete`).
    config: Option<VmConfig>,
    /// Console output kept across reboots of the same VM.
    serial: Option<SharedWriter>,
    /// The virtio console's host ends (pty, socket, file), kept across reboots likewise.
    console: Option<Arc<crate::console::ConsoleHost>>,
    vm: Option<Vm>,
    state: VmState,
    ft: Option<Box<dyn FtProvider>>,
    ft_wake: Arc<EventFd>,
    epoch_timer: TimerFd,
    primary: Option<Box<dyn PrimaryFt>>,
    /// The VM's count of KVM page faults when `primary` started: `vm.ft-status` reports those
    /// since (None: this kernel does not count them).
    primary_faults_base: Option<u64>,
    backup: Option<Box<dyn BackupFt>>,
    standby: Option<Standby>,
    /// The last status of a protection session that ended (fenced, took over, failed).
    ft_ended: Option<FtStatus>,
    /// Why this copy of the VM was fenced (its backup runs it now): it may not boot again
    /// until the VM is deleted.
    fenced: Option<String>,
    /// TAP descriptors passed with `vm.add-net`, by NIC id: open while the NIC exists (its
    /// configuration names the number, so a reboot rebuilds it).
    passed_taps: BTreeMap<String, std::os::fd::OwnedFd>,
    /// The settings of the running protection (primary) or wait (backup): a guest reset
    /// protects the rebooted VM again with them.
    ft_request: Option<EnableFtRequest>,
    receive_request: Option<ReceiveFtRequest>,
    migration_wake: Arc<EventFd>,
    incoming: Option<Incoming>,
}

/// How long a primary whose guest reset keeps trying to reach its backup again (the backup
/// starts listening anew when it learns of the reset).
const REPROTECT_WINDOW: Duration = Duration::from_secs(5);

enum Next {
    Continue,
    Exit(ExitReason),
}

impl Vmm {
    fn emit(&self, source: &str, event: &str) {
        if let Some(monitor) = &self.monitor {
            monitor.emit(source, event, None);
        }
    }

    /// A VM event (source `vm`, as Cloud Hypervisor's) with its properties: FT and hot-plug.
    fn emit_vm(&self, event: &str, properties: &[(&str, String)]) {
        if let Some(monitor) = &self.monitor {
            let props: BTreeMap<String, String> = properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            monitor.emit("vm", event, (!props.is_empty()).then_some(&props));
        }
    }

    fn create(&mut self, config: VmConfig) -> Result<(), VmmError> {
        if self.config.is_some() {
            return Err(VmmError::VmAlreadyCreated);
        }
        config
            .validate()
            .map_err(|e| VmmError::InvalidConfig(e.to_string()))?;
        // Huge pages the host lacks fail here already (the boot checks again: pages are
        // taken only when the memory is mapped).
        crate::memory::Backing::from_config(&config.memory)
            .and_then(|backing| backing.check_host(config.memory.size))
            .map_err(|e| VmmError::InvalidConfig(format!("--memory: {e}")))?;
        self.config = Some(config);
        self.state = VmState::Created;
        Ok(())
    }

    fn boot(&mut self) -> Result<(), RunError> {
        let config = self.config.as_ref().ok_or(RunError::NoVm)?;
        self.emit("vm", "booting");
        if self.serial.is_none() {
            self.serial = serial_output(config)?;
        }
        if self.console.is_none() {
            self.console = crate::console::ConsoleHost::open(&config.console)?.map(Arc::new);
        }
        let out = self
            .serial
            .clone()
            .map(|w| Box::new(w) as Box<dyn Write + Send>);
        let options = PrepareOptions {
            console: self.console.clone(),
            ..PrepareOptions::default()
        };
        let vm =
            Vm::prepare(&self.kvm, config, out, &self.events, self.seccomp, options)?.boot()?;
        self.vm = Some(vm);
        self.state = VmState::Running;
        self.emit("vm", "booted");
        Ok(())
    }

    /// Ends the primary's protection session, if any, while the VM still exists. False when
    /// this copy was fenced on the way out (the backup may own the VM): the VM is stopped
    /// then, whatever the reason, and must not be started again here.
    fn end_protection(&mut self, reason: StopReason) -> bool {
        let Some(primary) = self.primary.take() else {
            return true;
        };
        let status = primary.status();
        let result = primary.stop(self.vm.as_mut(), reason);
        self.emit_vm(
            "ft-stopped",
            &[("reason", format!("{reason:?}").to_lowercase())],
        );
        self.ft_reported = (FtHealth::Off, 0);
        self.arm_epoch_timer(None);
        let Err(why) = result else {
            return true;
        };
        log::error!("fenced: {why}; this copy of the VM stops");
        self.ft_ended = Some(FtStatus {
            health: FtHealth::Fenced,
            last_error: Some(why.clone()),
            ..status
        });
        if let Some(mut vm) = self.vm.take() {
            vm.shutdown();
        }
        self.state = VmState::Shutdown;
        self.ft_reported = (FtHealth::Fenced, 0);
        self.fenced = Some(why.clone());
        self.emit_vm("ft-fenced", &[("reason", why)]);
        false
    }

    fn stop_vm(&mut self) {
        self.end_protection(StopReason::VmGone);
        if let Some(mut vm) = self.vm.take() {
            vm.shutdown();
        }
        // Drain what a vCPU may have signalled while stopping.
        let _ = self.events.exit.read();
        let _ = self.events.reset.read();
        let _ = self.events.vcpu_failure.read();
    }

    fn reboot(&mut self) -> Result<(), RunError> {
        self.emit("vm", "rebooting");
        let protected = self
            .primary
            .as_ref()
            .is_some_and(|p| p.status().health == FtHealth::Protected);
        let reprotect = if protected {
            self.ft_request.clone()
        } else {
            None
        };
        if !self.end_protection(StopReason::Reset) {
            // The backup may run this VM now: it does not boot again here.
            return Ok(());
        }
        self.stop_vm();
        self.boot()?;
        self.emit("vm", "rebooted");
        if let Some(request) = reprotect {
            self.reprotect(&request);
        }
        Ok(())
    }

    /// Protects the rebooted VM again (its backup stood down and listens anew).
    fn reprotect(&mut self, request: &EnableFtRequest) {
        let deadline = Instant::now() + REPROTECT_WINDOW;
        loop {
            match self.enable_ft(request) {
                Ok(()) => {
                    log::info!("FT: the rebooted VM is protected again");
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    log::debug!("FT: protecting the rebooted VM: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    log::error!("FT: the rebooted VM runs unprotected: {e}");
                    self.emit_vm("ft-reprotect-failed", &[("error", e.to_string())]);
                    return;
                }
            }
        }
    }

    fn require_state(&self, action: &'static str, allowed: &[VmState]) -> Result<(), VmmError> {
        if self.config.is_none() {
            return Err(VmmError::VmNotCreated);
        }
        if allowed.contains(&self.state) {
            Ok(())
        } else {
            Err(VmmError::InvalidState {
                action,
                state: self.state,
            })
        }
    }

    fn failed(action: &'static str, e: impl ToString) -> VmmError {
        VmmError::Failed {
            action,
            message: e.to_string(),
        }
    }

    /// Requests a backup host answers while it holds a standby copy (everything else would
    /// start, change or drop the VM the primary is running).
    fn allowed_on_backup(request: &VmmRequest) -> bool {
        matches!(
            request,
            VmmRequest::Ping
                | VmmRequest::ShutdownVmm
                | VmmRequest::VmInfo
                | VmmRequest::Counters
                | VmmRequest::FtStatus
                | VmmRequest::Progress
                | VmmRequest::DisableFt
        )
    }

    /// Requests answered while a migration is being received (the others would create, start
    /// or drop a VM while the receiver fills one).
    fn allowed_while_receiving(request: &VmmRequest) -> bool {
        matches!(
            request,
            VmmRequest::Ping
                | VmmRequest::ShutdownVmm
                | VmmRequest::VmInfo
                | VmmRequest::Counters
                | VmmRequest::FtStatus
                | VmmRequest::Progress
        )
    }

    /// Handles one API request. The answer is None when it is sent later through `reply`
    /// (`vm.receive-migration`, answered when the receive ends).
    fn handle_request(
        &mut self,
        request: VmmRequest,
        reply: &mpsc::Sender<VmmResult>,
    ) -> (Option<VmmResult>, Option<ExitReason>) {
        if let Some(incoming) = &self.incoming {
            if !Self::allowed_while_receiving(&request) {
                let message = format!(
                    "a migration is already being received on {}; wait until it ends",
                    incoming.receiver.url()
                );
                let action = match request {
                    VmmRequest::ReceiveMigration(_) => "receive-migration",
                    _ => "this request",
                };
                return (Some(Err(VmmError::Failed { action, message })), None);
            }
        }
        if self.backup.is_some() && !Self::allowed_on_backup(&request) {
            return (
                Some(Err(VmmError::Failed {
                    action: "this request",
                    message: "this VMM is the hot backup of a VM running elsewhere; \
                              run `disable-ft` here or on the primary first"
                        .into(),
                })),
                None,
            );
        }
        let protected = self.primary.is_some();
        if protected
            && matches!(
                request,
                VmmRequest::Snapshot(_) | VmmRequest::SendMigration(_) | VmmRequest::Restore(_)
            )
        {
            return (
                Some(Err(VmmError::Failed {
                    action: "this request",
                    message: "the VM is protected by fault tolerance; run `disable-ft` first"
                        .into(),
                })),
                None,
            );
        }
        let result = match request {
            VmmRequest::Ping => Ok(VmmResponse::Ping(VmmPingResponse::current(vec![
                "kvm".to_string()
            ]))),
            VmmRequest::ShutdownVmm => {
                if let Some(backup) = self.backup.take() {
                    backup.stop();
                }
                if let Some(incoming) = self.incoming.take() {
                    let _ = incoming.reply.send(Err(Self::failed(
                        "receiving a migration",
                        "the VMM is shutting down",
                    )));
                }
                self.stop_vm();
                return (Some(Ok(VmmResponse::Empty)), Some(ExitReason::VmmShutdown));
            }
            VmmRequest::CreateVm(config) => self.create(*config).map(|_| VmmResponse::Empty),
            VmmRequest::BootVm => self
                .require_state("boot", &[VmState::Created, VmState::Shutdown])
                .and_then(|_| match &self.fenced {
                    Some(why) => Err(VmmError::Fenced(why.clone())),
                    None => Ok(()),
                })
                .and_then(|_| self.boot().map_err(|e| Self::failed("boot", e)))
                .map(|_| VmmResponse::Empty),
            VmmRequest::VmInfo => self.require_state("query", &ALL_STATES).map(|_| {
                let mut config = self.config.clone().unwrap_or_default();
                // As Cloud Hypervisor: a pty console reports its path as `console.file`.
                if let Some(path) = self.console.as_ref().and_then(|c| c.pty_path()) {
                    config.console.file = Some(path.to_path_buf());
                }
                VmmResponse::VmInfo(Box::new(VmInfoResponse {
                    memory_actual_size: config.memory.size,
                    config,
                    state: self.state,
                    device_tree: self.vm.as_ref().map(|vm| vm.device_tree()),
                }))
            }),
            VmmRequest::Counters => {
                self.require_state("read the counters of", &ALL_STATES)
                    .map(|_| {
                        let mut counters =
                            self.vm.as_ref().map(|vm| vm.counters()).unwrap_or_default();
                        // Next to the devices', so tools that scrape counters see FT too.
                        let ft = self.ft_status();
                        if ft.role != FtRole::None {
                            counters.insert("ft".to_string(), ft.counters());
                        }
                        VmmResponse::Counters(counters)
                    })
            }
            VmmRequest::PauseVm => {
                self.require_state("pause", &[VmState::Running])
                    .and_then(|_| {
                        self.emit("vm", "pausing");
                        let vm = self.vm.as_mut().ok_or(VmmError::VmNotCreated)?;
                        // The device loop stops too: a snapshot of a paused VM must not see a
                        // device move on between its state and its memory being written.
                        vm.pause().map_err(|e| Self::failed("pause", e))?;
                        self.state = VmState::Paused;
                        self.emit("vm", "paused");
                        Ok(VmmResponse::Empty)
                    })
            }
            VmmRequest::ResumeVm => {
                self.require_state("resume", &[VmState::Paused])
                    .and_then(|_| {
                        self.emit("vm", "resuming");
                        let vm = self.vm.as_mut().ok_or(VmmError::VmNotCreated)?;
                        vm.resume().map_err(|e| Self::failed("resume", e))?;
                        self.state = VmState::Running;
                        self.emit("vm", "resumed");
                        Ok(VmmResponse::Empty)
                    })
            }
            // The guest hears an ACPI power-button event and shuts down on its own; its S5
            // write then ends the VM through the exit event. Like Cloud Hypervisor, no monitor
            // event marks the press itself.
            VmmRequest::PowerButton => self
                .require_state(
                    "press the power button of",
                    &[VmState::Running, VmState::Paused],
                )
                .and_then(|_| {
                    let vm = self.vm.as_ref().ok_or(VmmError::VmNotCreated)?;
                    vm.power_button()
                        .map_err(|e| Self::failed("power button", e))
                })
                .map(|_| VmmResponse::Empty),
            VmmRequest::ShutdownVm => self
                .require_state("shut down", &[VmState::Running, VmState::Paused])
                .map(|_| {
                    self.stop_vm();
                    // As in Cloud Hypervisor: the VM is gone, its configuration stays, and
                    // `vm.info` reports it `Created` (ready for `vm.boot`); orchestrators
                    // key on that.
                    self.state = VmState::Created;
                    self.emit("vm", "shutdown");
                    VmmResponse::Empty
                }),
            VmmRequest::RebootVm => self
                .require_state("reboot", &[VmState::Running, VmState::Paused])
                .and_then(|_| self.reboot().map_err(|e| Self::failed("reboot", e)))
                .map(|_| VmmResponse::Empty),
            VmmRequest::Snapshot(request) => self
                .require_state("snapshot", &[VmState::Paused])
                .and_then(|_| self.snapshot(&request))
                .map(|_| VmmResponse::Empty),
            VmmRequest::Restore(request) => self.restore(&request).map(|_| VmmResponse::Empty),
            VmmRequest::SendMigration(request) => {
                match self
                    .require_state("migrate", &[VmState::Running])
                    .and_then(|_| self.send_migration(&request))
                {
                    Ok(()) => {
                        return (Some(Ok(VmmResponse::Empty)), Some(ExitReason::MigratedAway))
                    }
                    Err(e) => Err(e),
                }
            }
            VmmRequest::ReceiveMigration(request) => {
                match self.receive_migration(&request, reply.clone()) {
                    // Answered when the receive ends.
                    Ok(()) => return (None, None),
                    Err(e) => Err(e),
                }
            }
            VmmRequest::EnableFt(request) => self
                .require_state("protect", &[VmState::Running])
                .and_then(|_| self.enable_ft(&request))
                .map(|_| VmmResponse::Empty),
            VmmRequest::ReceiveFt(request) => self.receive_ft(&request).map(|_| VmmResponse::Empty),
            VmmRequest::FtStatus => Ok(VmmResponse::FtStatus(Box::new(self.ft_status()))),
            VmmRequest::Progress => crate::control::progress_response(&self.progress),
            VmmRequest::DisableFt => self.disable_ft().map(|_| VmmResponse::Empty),
            VmmRequest::Resize(request) => self.resize(&request).map(|_| VmmResponse::Empty),
            VmmRequest::AddDevice(request) => self.add_device(*request),
            VmmRequest::RemoveDevice(request) => {
                self.remove_device(&request).map(|_| VmmResponse::Empty)
            }
            VmmRequest::DeleteVm => self.require_state("delete", &ALL_STATES).map(|_| {
                self.stop_vm();
                self.config = None;
                self.fenced = None;
                self.passed_taps.clear();
                self.console = None;
                self.serial = None;
                self.state = VmState::Created;
                self.emit("vm", "deleted");
                VmmResponse::Empty
            }),
        };
        (Some(result), None)
    }

    /// `vm.resize`. Before boot (and after a shutdown) the configuration changes, as in Cloud
    /// Hypervisor; a running VM cannot grow or shrink yet, so there only a request equal to
    /// the current size succeeds (orchestrators send one on every container start).
    fn resize(&mut self, request: &VmResizeRequest) -> Result<(), VmmError> {
        let config = self.config.as_mut().ok_or(VmmError::VmNotCreated)?;
        if request.desired_vcpus == Some(0) {
            return Err(VmmError::InvalidConfig(
                "desired_vcpus must be at least 1".into(),
            ));
        }
        if self.vm.is_none() {
            let mut resized = config.clone();
            if let Some(vcpus) = request.desired_vcpus {
                resized.cpus.boot_vcpus = u8::try_from(vcpus).map_err(|_| {
                    VmmError::InvalidConfig(format!(
                        "desired_vcpus={vcpus} exceeds cpus.max_vcpus ({})",
                        config.cpus.max_vcpus
                    ))
                })?;
            }
            if let Some(ram) = request.desired_ram {
                resized.memory.size = ram;
            }
            if request.desired_balloon.is_some_and(|size| size != 0) {
                return Err(VmmError::InvalidConfig(
                    "desired_balloon: the VM has no balloon device".into(),
                ));
            }
            resized
                .validate()
                .map_err(|e| VmmError::InvalidConfig(e.to_string()))?;
            *config = resized;
            return Ok(());
        }
        let (vcpus, ram) = (u32::from(config.cpus.boot_vcpus), config.memory.size);
        let refuse = |message: String| Err(Self::failed("resize", message));
        match request.desired_vcpus {
            Some(desired) if desired != vcpus => {
                return refuse(format!(
                    "desired_vcpus={desired}: the VM runs {vcpus} vCPUs and hot-plugging \
                     vCPUs is not supported yet"
                ))
            }
            _ => {}
        }
        match request.desired_ram {
            Some(desired) if desired != ram => {
                return refuse(format!(
                    "desired_ram={desired}: the VM has {ram} bytes of RAM and memory hot-plug \
                     is not supported yet"
                ))
            }
            _ => {}
        }
        match request.desired_balloon {
            Some(desired) if desired != 0 => refuse(format!(
                "desired_balloon={desired}: the VM has no balloon device"
            )),
            _ => Ok(()),
        }
    }

    fn snapshot(&mut self, request: &SnapshotRequest) -> Result<(), VmmError> {
        let dir = snapshot::parse_file_url(&request.destination_url)
            .map_err(|e| VmmError::InvalidConfig(e.to_string()))?;
        if let Some(why) = self
            .config
            .as_ref()
            .and_then(crate::migration::snapshot_refusal)
        {
            return Err(Self::failed("snapshot", why));
        }
        self.emit("vm", "snapshotting");
        let config = self.config.as_ref().ok_or(VmmError::VmNotCreated)?;
        let vm = self.vm.as_mut().ok_or(VmmError::VmNotCreated)?;
        let state = vm.save_state().map_err(|e| Self::failed("snapshot", e))?;
        snapshot::write_snapshot(&dir, config, &state, vm.memory())
            .map_err(|e| Self::failed("snapshot", e))?;
        self.emit("vm", "snapshotted");
        Ok(())
    }

    /// Builds a VM from captured state, with its console as the configuration says.
    fn create_restored(
        &self,
        config: &VmConfig,
        state: &VmSnapshotState,
        memory: RestoredMemory,
        resume: bool,
    ) -> Result<(Vm, Option<SharedWriter>), String> {
        let serial = serial_output(config).map_err(|e| e.to_string())?;
        let out = serial.clone().map(|w| Box::new(w) as Box<dyn Write + Send>);
        let vm = Vm::create(
            &self.kvm,
            config,
            out,
            &self.events,
            self.seccomp,
            Start::Restore {
                state,
                memory,
                resume,
            },
        )
        .map_err(|e| e.to_string())?;
        Ok((vm, serial))
    }

    /// Creates this VMM's VM from a snapshot directory; every check of the snapshot happens
    /// before the VM exists.
    fn restore(&mut self, request: &RestoreRequest) -> Result<(), VmmError> {
        if self.config.is_some() {
            return Err(VmmError::VmAlreadyCreated);
        }
        let dir = snapshot::parse_file_url(&request.source_url)
            .map_err(|e| VmmError::InvalidConfig(e.to_string()))?;
        self.emit("vm", "restoring");
        let (config, state, image): (VmConfig, VmSnapshotState, _) =
            snapshot::read_snapshot(&dir).map_err(|e| Self::failed("restore", e))?;
        config
            .validate()
            .map_err(|e| VmmError::InvalidConfig(e.to_string()))?;
        let fill =
            |mem: &crate::memory::GuestMemoryMmap| image.load_into(mem).map_err(|e| e.to_string());
        let (vm, serial) = self
            .create_restored(&config, &state, RestoredMemory::Fill(&fill), request.resume)
            .map_err(|e| Self::failed("restore", e))?;
        self.vm = Some(vm);
        self.serial = serial;
        self.config = Some(config);
        self.state = if request.resume {
            VmState::Running
        } else {
            VmState::Paused
        };
        self.emit("vm", "restored");
        Ok(())
    }

    /// Migrates the running VM away. The control loop is busy meanwhile (API requests wait);
    /// the guest keeps running until the final pause.
    fn send_migration(&mut self, request: &SendMigrationRequest) -> Result<(), VmmError> {
        if request.local {
            return Err(VmmError::InvalidConfig(
                "local (shared-memory) migration is not supported".into(),
            ));
        }
        let url = live::parse_url(&request.destination_url).map_err(VmmError::InvalidConfig)?;
        let config = self.config.clone().ok_or(VmmError::VmNotCreated)?;
        if let Some(why) = crate::migration::migration_refusal(&config) {
            return Err(Self::failed("migration", why));
        }
        let security =
            live::security_for(&url, request.tls_dir.as_deref(), request.insecure_plaintext)
                .map_err(VmmError::InvalidConfig)?;
        let stream =
            live::connect(&url, security.as_ref()).map_err(|e| Self::failed("migration", e))?;
        self.emit("vm", "migrating");
        let progress = Arc::new(
            TransferProgress::new(Operation::SendMigration, config.memory.size)
                .with_monitor(self.monitor.clone()),
        );
        self.progress.start(progress.clone());
        let vm = self.vm.as_mut().ok_or(VmmError::VmNotCreated)?;
        let report = live::send(
            vm,
            &config,
            stream,
            Duration::from_millis(request.downtime_ms),
            Some(progress),
        )
        .map_err(|e| Self::failed("migration", e))?;
        log::info!(
            "migration done in {:?}: downtime {:?}, {} passes, {} bytes",
            report.total,
            report.downtime,
            report.passes,
            report.bytes
        );
        self.stop_vm();
        self.state = VmState::Shutdown;
        self.emit("vm", "migrated");
        Ok(())
    }

    /// Starts receiving a migration on the `migration-rx` thread; the request is answered when
    /// the receive ends ([`Vmm::finish_incoming`]). Meanwhile `vm.info` reports no VM until the
    /// source's Hello, then its configuration in state Created, and Running once restored.
    fn receive_migration(
        &mut self,
        request: &ReceiveMigrationRequest,
        reply: mpsc::Sender<VmmResult>,
    ) -> Result<(), VmmError> {
        if self.config.is_some() {
            return Err(VmmError::VmAlreadyCreated);
        }
        let receiver = IncomingMigration::start(
            &request.receiver_url,
            request.tls_dir.as_deref(),
            request.insecure_plaintext,
            ReceiveTimeouts::default(),
            self.migration_wake.clone(),
        )
        .map_err(|e| match e {
            ReceiveError::Url(message) => VmmError::InvalidConfig(message),
            other => Self::failed("receiving a migration", other),
        })?;
        log::info!("waiting for a migration on {}", request.receiver_url);
        self.incoming = Some(Incoming {
            receiver,
            reply,
            prepared: None,
            resources: HostResources {
                disk_paths: request.disk_paths.clone(),
                taps: request.taps.clone(),
            },
        });
        Ok(())
    }

    /// Serves what the migration receiver thread asks for.
    fn handle_incoming(&mut self) {
        let _ = self.migration_wake.read();
        while let Some(event) = self.incoming.as_ref().and_then(|i| i.receiver.try_next()) {
            match event {
                IncomingEvent::Prepare { config, reply } => {
                    let _ = reply.send(self.prepare_incoming(*config));
                }
                IncomingEvent::Restore { state, reply } => {
                    let _ = reply.send(self.restore_incoming(&state));
                }
                IncomingEvent::Finished(result) => self.finish_incoming(result),
            }
        }
    }

    /// Builds everything of the incoming VM that does not depend on its contents, during the
    /// source's pre-copy, so the downtime window holds only the state restore.
    fn prepare_incoming(
        &mut self,
        config: VmConfig,
    ) -> Result<crate::memory::GuestMemoryMmap, String> {
        let resources = &self
            .incoming
            .as_ref()
            .ok_or("the receive was cancelled")?
            .resources;
        let config = config.localize(resources).map_err(|e| e.to_string())?;
        let serial = serial_output(&config).map_err(|e| e.to_string())?;
        let out = serial.clone().map(|w| Box::new(w) as Box<dyn Write + Send>);
        let console = crate::console::ConsoleHost::open(&config.console)
            .map_err(|e| e.to_string())?
            .map(Arc::new);
        self.console = console.clone();
        let options = PrepareOptions {
            memory: None,
            defer_disk_locks: true,
            console,
        };
        let vm = Vm::prepare(&self.kvm, &config, out, &self.events, self.seccomp, options)
            .map_err(|e| e.to_string())?;
        let memory = vm.memory().clone();
        let incoming = self.incoming.as_mut().ok_or("the receive was cancelled")?;
        incoming.prepared = Some((vm, serial));
        self.config = Some(config);
        self.state = VmState::Created;
        self.emit("vm", "receiving");
        Ok(memory)
    }

    /// Restores the received state into the prepared VM and runs it.
    fn restore_incoming(&mut self, state: &VmSnapshotState) -> Result<(), String> {
        let (prepared, serial) = self
            .incoming
            .as_mut()
            .and_then(|i| i.prepared.take())
            .ok_or("no VM was prepared for the migration")?;
        let vm = prepared.restore(state, true).map_err(|e| e.to_string())?;
        vm.device_manager().announce_nets();
        self.vm = Some(vm);
        self.serial = serial;
        self.state = VmState::Running;
        Ok(())
    }

    /// Answers the `vm.receive-migration` request. A failed receive leaves no VM behind, so
    /// this VMM can receive again.
    fn finish_incoming(&mut self, result: Result<TransferStats, String>) {
        let Some(incoming) = self.incoming.take() else {
            return;
        };
        let answer = match result {
            Ok(stats) => {
                log::info!(
                    "migration received: {} bytes in {} frames, {} memory passes",
                    stats.bytes,
                    stats.frames,
                    stats.iterations
                );
                self.emit("vm", "migrated");
                Ok(VmmResponse::Empty)
            }
            Err(message) => {
                // After a restore only the acknowledgement failed: the VM runs here.
                if self.vm.is_none() {
                    self.config = None;
                    self.serial = None;
                    self.console = None;
                    self.state = VmState::Created;
                }
                self.emit("vm", "receive-failed");
                Err(Self::failed("receiving a migration", message))
            }
        };
        // A client that went away does not care about the answer.
        let _ = incoming.reply.send(answer);
    }

    fn arm_epoch_timer(&mut self, after: Option<Duration>) {
        let result = match after {
            // A zero duration would disarm the timer.
            Some(d) => self
                .epoch_timer
                .reset(d.max(Duration::from_micros(50)), None),
            None => self.epoch_timer.clear(),
        };
        if let Err(e) = result {
            log::error!("cannot set the epoch timer: {e}");
        }
    }

    fn enable_ft(&mut self, request: &EnableFtRequest) -> Result<(), VmmError> {
        if request.peer == DIRTY_LOG_FLOOR_PEER {
            return self.start_dirty_log_floor(request);
        }
        if let Some(why) = self.config.as_ref().and_then(crate::migration::ft_refusal) {
            return Err(Self::failed("enable-ft", why));
        }
        if let Some(primary) = &self.primary {
            if primary.status().health != FtHealth::Degraded {
                return Err(VmmError::Failed {
                    action: "enable-ft",
                    message: "the VM is already protected".into(),
                });
            }
        }
        // A primary that lost its backup gets a new one: the old session ends first.
        if !self.end_protection(StopReason::Disabled) {
            return Err(VmmError::Failed {
                action: "enable-ft",
                message:
                    "this copy of the VM was fenced while its old protection ended (see ft-status)"
                        .into(),
            });
        }
        if self.ft.is_none() {
            return Err(VmmError::Failed {
                action: "enable-ft",
                message: "fault tolerance is not built into this VMM".into(),
            });
        }
        let config = self.config.clone().ok_or(VmmError::VmNotCreated)?;
        if self.vm.is_none() {
            return Err(VmmError::VmNotCreated);
        }
        self.emit_vm("ft-syncing", &[("peer", request.peer.clone())]);
        let progress = Arc::new(
            TransferProgress::new(Operation::EnableFt, config.memory.size)
                .with_monitor(self.monitor.clone()),
        );
        self.progress.start(progress.clone());
        let enabled = match (self.ft.as_mut(), self.vm.as_mut()) {
            (Some(provider), Some(vm)) => {
                provider.enable(vm, &config, request, self.ft_wake.clone(), progress.clone())
            }
            _ => Err(VmmError::VmNotCreated),
        };
        let primary = match enabled {
            Ok(primary) => primary,
            Err(e) => {
                // A failure before memory moved (no backup, fencing) ends the progress too.
                if matches!(progress.phase(), Phase::Starting | Phase::Copying) {
                    progress.failed(&e.to_string());
                }
                self.emit_vm("ft-sync-failed", &[("error", e.to_string())]);
                return Err(e);
            }
        };
        self.arm_epoch_timer(primary.next_checkpoint());
        let status = primary.status();
        self.primary = Some(primary);
        self.primary_faults_base = self.vm.as_ref().and_then(Vm::kvm_page_faults);
        self.ft_request = Some(request.clone());
        self.ft_ended = None;
        self.ft_reported = (status.health, status.group_members);
        let report = progress.report();
        let mut props = vec![
            ("peer", request.peer.clone()),
            ("epoch_ms", status.epoch_ms.to_string()),
            ("sync_ms", report.elapsed_ms.to_string()),
            ("sync_bytes", report.bytes.to_string()),
        ];
        if let Some(group) = &status.group {
            props.push(("group", group.clone()));
            props.push(("group_members", status.group_members.to_string()));
        }
        self.emit_vm("ft-protected", &props);
        Ok(())
    }

    /// The benchmark floor (see [`DirtyLogFloor`]); `vm.disable-ft` ends it, a reboot too.
    fn start_dirty_log_floor(&mut self, request: &EnableFtRequest) -> Result<(), VmmError> {
        if self.primary.is_some() {
            return Err(Self::failed("enable-ft", "the VM is already protected"));
        }
        let vm = self.vm.as_mut().ok_or(VmmError::VmNotCreated)?;
        let floor = DirtyLogFloor::start(vm, request.epoch_ms)
            .map_err(|e| Self::failed("enable-ft", &e))?;
        self.arm_epoch_timer(floor.next_checkpoint());
        self.primary = Some(Box::new(floor));
        self.primary_faults_base = self.vm.as_ref().and_then(Vm::kvm_page_faults);
        self.ft_request = None;
        self.ft_ended = None;
        self.ft_reported = (FtHealth::Off, 0);
        Ok(())
    }

    fn receive_ft(&mut self, request: &ReceiveFtRequest) -> Result<(), VmmError> {
        if self.config.is_some() || self.backup.is_some() {
            return Err(VmmError::VmAlreadyCreated);
        }
        let provider = self.ft.as_mut().ok_or(VmmError::Failed {
            action: "receive-ft",
            message: "fault tolerance is not built into this VMM".into(),
        })?;
        let backup = provider.receive(request, self.ft_wake.clone())?;
        self.backup = Some(backup);
        self.receive_request = Some(request.clone());
        self.ft_ended = None;
        self.emit_vm(
            "ft-waiting",
            &[("receiver_url", request.receiver_url.clone())],
        );
        Ok(())
    }

    /// `vm.add-*`: see [`VmmRequest::AddDevice`].
    fn add_device(&mut self, request: HotplugRequest) -> Result<VmmResponse, VmmError> {
        let action = request.endpoint();
        let config = self.config.clone().ok_or(VmmError::VmNotCreated)?;
        self.refuse_hotplug_while_protected(action)?;
        let mut plan = hotplug::plan_add(&config, request)?;
        let Some(vm) = self.vm.as_mut() else {
            // Before boot the device only joins the configuration, as in Cloud Hypervisor.
            if let Some(fd) = plan.passed_fd.take() {
                self.passed_taps.insert(plan.id.clone(), fd);
            }
            self.config = Some(plan.config);
            return Ok(VmmResponse::Empty);
        };
        let number = hotplug::attach(vm, &mut plan).map_err(|e| e.into_vmm_error(action))?;
        plan.config.pin_devices(&vm.device_manager().placement());
        if let Some(fd) = plan.passed_fd.take() {
            self.passed_taps.insert(plan.id.clone(), fd);
        }
        self.config = Some(plan.config);
        let info = PciDeviceInfo {
            id: plan.id,
            bdf: crate::control::pci_bdf(number),
        };
        log::info!("{action}: {} at {}", info.id, info.bdf);
        self.emit_vm(
            "device-added",
            &[("id", info.id.clone()), ("bdf", info.bdf.clone())],
        );
        Ok(VmmResponse::DeviceAdded(info))
    }

    /// `vm.remove-device`: see [`VmmRequest::RemoveDevice`].
    fn remove_device(&mut self, request: &RemoveDeviceRequest) -> Result<(), VmmError> {
        let config = self.config.as_mut().ok_or(VmmError::VmNotCreated)?;
        let id = request.id.as_str();
        if !config.device_ids().iter().any(|known| known == id) {
            return Err(VmmError::NotFound(format!("no device {id}")));
        }
        self.refuse_hotplug_while_protected("vm.remove-device")?;
        let Some(vm) = self.vm.as_mut() else {
            // Not booted: it only leaves the configuration.
            let config = self.config.as_mut().ok_or(VmmError::VmNotCreated)?;
            return hotplug::forget(config, id, None)
                .map_err(|e| VmmError::InvalidConfig(e.to_string()));
        };
        vm.device_manager()
            .request_unplug(id)
            .map_err(|e| VmmError::InvalidConfig(e.to_string()))?;
        self.emit_vm("device-eject-requested", &[("id", id.to_string())]);
        Ok(())
    }

    /// The guest ejected devices: they leave the bus and the configuration.
    fn handle_pci_eject(&mut self) {
        let _ = self.events.pci_eject.read();
        let Some(vm) = self.vm.as_mut() else {
            return;
        };
        let placement = vm.device_manager().placement();
        let (device_manager, vm_fd, _) = vm.hotplug_parts();
        let removed = device_manager.complete_ejects(vm_fd);
        for id in removed {
            if let Some(config) = self.config.as_mut() {
                if let Err(e) = hotplug::forget(config, &id, Some(&placement)) {
                    log::error!("{id}: {e}");
                }
            }
            self.passed_taps.remove(&id);
            log::info!("{id}: ejected by the guest and removed");
            self.emit_vm("device-removed", &[("id", id)]);
        }
    }

    /// Hot-plug changes the VM the backup mirrors: refused while a backup exists (its
    /// standby VM is built from the configuration at `enable-ft`).
    fn refuse_hotplug_while_protected(&self, action: &'static str) -> Result<(), VmmError> {
        let protected = self
            .primary
            .as_ref()
            .is_some_and(|p| p.status().health != FtHealth::Degraded);
        if protected || self.backup.is_some() {
            return Err(VmmError::Failed {
                action,
                message: "the VM is protected by fault tolerance: its backup's copy cannot \
                          change devices; disable-ft, change the devices, then enable-ft again"
                    .into(),
            });
        }
        Ok(())
    }

    fn disable_ft(&mut self) -> Result<(), VmmError> {
        if self.primary.is_some() {
            let kept = self.end_protection(StopReason::Disabled);
            self.ft_request = None;
            if !kept {
                return Err(VmmError::Failed {
                    action: "disable-ft",
                    message: "the backup did not confirm it stood down and the fencing gave it the VM: this copy stopped (see ft-status)".into(),
                });
            }
            self.ft_ended = None;
            return Ok(());
        }
        if let Some(backup) = self.backup.take() {
            self.receive_request = None;
            backup.stop();
            self.drop_standby();
            self.emit_vm("ft-stopped", &[("reason", "disabled".to_string())]);
            return Ok(());
        }
        Err(VmmError::Failed {
            action: "disable-ft",
            message: "the VM is not protected".into(),
        })
    }

    fn ft_status(&self) -> FtStatus {
        if let Some(primary) = &self.primary {
            let mut status = primary.status();
            status.kvm_page_faults = self.primary_faults_base.and_then(|base| {
                let now = self.vm.as_ref()?.kvm_page_faults()?;
                Some(now.saturating_sub(base))
            });
            return status;
        }
        if let Some(backup) = &self.backup {
            return backup.status();
        }
        self.ft_ended.clone().unwrap_or_default()
    }

    fn drop_standby(&mut self) {
        if self.standby.take().is_some() {
            self.config = None;
            self.state = VmState::Created;
        }
    }

    fn handle_epoch(&mut self) {
        let _ = self.epoch_timer.wait();
        let (Some(primary), Some(vm)) = (self.primary.as_mut(), self.vm.as_mut()) else {
            return;
        };
        if self.state == VmState::Running {
            if let Err(e) = primary.checkpoint(vm) {
                log::error!("checkpoint failed: {e}");
            }
        }
        let next = primary.next_checkpoint();
        self.arm_epoch_timer(next);
    }

    fn handle_ft(&mut self) -> Option<ExitReason> {
        let _ = self.ft_wake.read();
        if let (Some(primary), Some(vm)) = (self.primary.as_mut(), self.vm.as_mut()) {
            let event = primary.poll(vm, self.state == VmState::Running);
            let next = primary.next_checkpoint();
            self.arm_epoch_timer(next);
            if let PrimaryEvent::Fenced(reason) = event {
                log::error!("fenced: {reason}; this copy of the VM stops");
                if let Some(primary) = self.primary.take() {
                    let status = primary.status();
                    // Already fenced: its held output is dropped either way.
                    let _ = primary.stop(self.vm.as_mut(), StopReason::VmGone);
                    self.ft_ended = Some(status);
                }
                self.stop_vm();
                self.state = VmState::Shutdown;
                self.ft_reported = (FtHealth::Fenced, 0);
                self.fenced = Some(reason.clone());
                self.emit_vm("ft-fenced", &[("reason", reason)]);
            } else if let Some(status) = self.primary.as_ref().map(|p| p.status()) {
                self.report_primary_changes(&status);
            }
        }
        loop {
            let backup = self.backup.as_mut()?;
            match backup.poll() {
                BackupEvent::None => return None,
                BackupEvent::Prepare { config, reply } => {
                    let result = self.prepare_standby(*config);
                    let _ = reply.send(result);
                }
                BackupEvent::TakeOver {
                    state,
                    epoch,
                    resend,
                    replay,
                    clock_advance,
                } => self.take_over(*state, epoch, resend, replay, clock_advance),
                BackupEvent::StandDown {
                    guest_shutdown,
                    reprotect,
                } => {
                    if let Some(backup) = self.backup.take() {
                        self.ft_ended = Some(backup.status());
                        backup.stop();
                    }
                    self.drop_standby();
                    self.emit_vm(
                        "ft-stood-down",
                        &[
                            ("guest_shutdown", guest_shutdown.to_string()),
                            ("reprotect", reprotect.to_string()),
                        ],
                    );
                    if guest_shutdown {
                        self.state = VmState::Shutdown;
                        return Some(ExitReason::GuestShutdown);
                    }
                    if let Some(request) = self.receive_request.clone().filter(|_| reprotect) {
                        // The primary's guest reset: wait for the rebooted VM.
                        match self.receive_ft(&request) {
                            Ok(()) => log::info!("FT: waiting for the primary's rebooted VM"),
                            Err(e) => log::error!("FT: cannot wait for the rebooted VM: {e}"),
                        }
                    }
                }
                BackupEvent::Failed(message) => {
                    log::error!("backup failed: {message}");
                    if let Some(backup) = self.backup.take() {
                        self.ft_ended = Some(backup.status());
                        backup.stop();
                    }
                    self.drop_standby();
                    self.emit_vm("ft-failed", &[("error", message)]);
                }
            }
        }
    }

    fn prepare_standby(
        &mut self,
        config: VmConfig,
    ) -> Result<crate::memory::GuestMemoryMmap, String> {
        config.validate().map_err(|e| e.to_string())?;
        // Before anything is built: a standby must never bind the primary's vsock path.
        if let Some(why) = crate::migration::ft_refusal(&config) {
            return Err(why);
        }
        let serial = serial_output(&config).map_err(|e| e.to_string())?;
        let out = serial.clone().map(|w| Box::new(w) as Box<dyn Write + Send>);
        // The disks stay unlocked until takeover: in shared-disk mode the primary holds them.
        let console = crate::console::ConsoleHost::open(&config.console)
            .map_err(|e| e.to_string())?
            .map(Arc::new);
        self.console = console.clone();
        let options = PrepareOptions {
            memory: None,
            defer_disk_locks: true,
            console,
        };
        let vm = Vm::prepare(&self.kvm, &config, out, &self.events, self.seccomp, options)
            .map_err(|e| e.to_string())?;
        let memory = vm.memory().clone();
        self.standby = Some(Standby { vm, serial });
        self.config = Some(config);
        self.state = VmState::Created;
        Ok(memory)
    }

    fn take_over(
        &mut self,
        mut state: VmSnapshotState,
        epoch: u64,
        resend: Vec<(u32, Vec<u8>)>,
        replay: Vec<(u32, Vec<u8>)>,
        clock_advance: Duration,
    ) {
        let Some(standby) = self.standby.take() else {
            if let Some(backup) = self.backup.as_mut() {
                backup.took_over(Err("no standby VM was prepared".into()));
            }
            return;
        };
        // The guest's clock goes on from where the primary's was, not from the capture.
        state.kvm.clock.clock = state
            .kvm
            .clock
            .clock
            .saturating_add(clock_advance.as_nanos() as u64);
        let result = standby.vm.restore(&state, true);
        let outcome = match result {
            Ok(vm) => {
                vm.device_manager().announce_nets();
                // Output of the resumed epoch that the primary may have died holding: the
                // restored guest counts it as sent.
                vm.device_manager().resend_output(resend);
                // Input the primary's guest received after the epoch: clients may have been
                // told it arrived.
                vm.device_manager().replay_input(replay);
                self.vm = Some(vm);
                self.serial = standby.serial;
                self.state = VmState::Running;
                log::warn!("took over the VM at epoch {epoch}");
                Ok(())
            }
            Err(e) => {
                log::error!("takeover failed: {e}");
                self.config = None;
                Err(e.to_string())
            }
        };
        let failed = outcome.as_ref().err().cloned();
        let mut status = None;
        if let Some(mut backup) = self.backup.take() {
            backup.took_over(outcome);
            status = Some(backup.status());
            self.ft_ended = status.clone();
            backup.stop();
        }
        let mut props = vec![("epoch", epoch.to_string())];
        if let Some(status) = &status {
            if let Some(ms) = status.last_failover_ms {
                props.push(("takeover_ms", ms.to_string()));
            }
            if let Some(group) = &status.group {
                props.push(("group", group.clone()));
                props.push(("group_epoch", status.group_epoch.to_string()));
            }
        }
        match failed {
            None => self.emit_vm("ft-failover", &props),
            Some(error) => {
                props.push(("error", error));
                self.emit_vm("ft-failover-failed", &props);
            }
        }
    }

    /// Reports on the event monitor what changed in a protecting primary: losing its backup
    /// (`ft-degraded`) and its FT group growing or shrinking (`ft-group-changed`).
    fn report_primary_changes(&mut self, status: &FtStatus) {
        let (health, members) = self.ft_reported;
        if status.health != health {
            if status.health == FtHealth::Degraded {
                let reason = status.last_error.clone().unwrap_or_default();
                self.emit_vm("ft-degraded", &[("reason", reason)]);
            }
            self.ft_reported.0 = status.health;
        }
        if status.group.is_some() && status.group_members != members {
            self.emit_vm(
                "ft-group-changed",
                &[
                    ("group", status.group.clone().unwrap_or_default()),
                    ("members", status.group_members.to_string()),
                    ("was", members.to_string()),
                ],
            );
            self.ft_reported.1 = status.group_members;
        }
    }

    /// Handles one readiness event of the control loop.
    fn handle_wake(&mut self, wake: u64, api: Option<&ApiReceiver>) -> Result<Next, RunError> {
        match wake {
            w if w == Wake::Exit as u64 => {
                let _ = self.events.exit.read();
                self.end_protection(StopReason::GuestShutdown);
                self.stop_vm();
                self.state = VmState::Shutdown;
                log::info!("guest shut down");
                self.emit("vm", "shutdown");
                Ok(Next::Exit(ExitReason::GuestShutdown))
            }
            w if w == Wake::Reset as u64 => {
                let _ = self.events.reset.read();
                log::info!("guest reset: rebooting the VM");
                self.reboot()?;
                Ok(Next::Continue)
            }
            w if w == Wake::VcpuFailure as u64 => {
                let _ = self.events.vcpu_failure.read();
                let failures = self
                    .vm
                    .as_ref()
                    .map(|vm| vm.vcpus().shared().take_failures())
                    .unwrap_or_default();
                self.stop_vm();
                let message = failures
                    .iter()
                    .map(|f| match f {
                        crate::vcpu::VcpuExitReason::Failed { message, .. } => message.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                Err(RunError::VcpuFailed(message))
            }
            w if w == Wake::Ft as u64 => match self.handle_ft() {
                Some(reason) => Ok(Next::Exit(reason)),
                None => Ok(Next::Continue),
            },
            w if w == Wake::Epoch as u64 => {
                self.handle_epoch();
                Ok(Next::Continue)
            }
            w if w == Wake::Migration as u64 => {
                self.handle_incoming();
                Ok(Next::Continue)
            }
            w if w == Wake::PciEject as u64 => {
                self.handle_pci_eject();
                Ok(Next::Continue)
            }
            _ => {
                let Some(api) = api else {
                    return Ok(Next::Continue);
                };
                let _ = api.wake.read();
                while let Ok(message) = api.requests.try_recv() {
                    let (result, exit) = self.handle_request(message.request, &message.reply);
                    if let Some(result) = result {
                        // A client that went away does not care about the answer.
                        let _ = message.reply.send(result);
                    }
                    if let Some(reason) = exit {
                        return Ok(Next::Exit(reason));
                    }
                }
                Ok(Next::Continue)
            }
        }
    }
}

const ALL_STATES: [VmState; 4] = [
    VmState::Created,
    VmState::Running,
    VmState::Paused,
    VmState::Shutdown,
];

/// Runs the VMM: boots the command-line VM if one was given, serves API requests, and returns
/// when the guest powers off or `vmm.shutdown` is requested. A guest reset reboots the VM in
/// place, as Cloud Hypervisor does.
pub fn run(options: VmmOptions) -> Result<ExitReason, RunError> {
    let kvm = vm::open_kvm()?;
    let events = VmEvents::new()?;
    let epoll = Epoll::new().map_err(RunError::Epoll)?;
    let ft_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(RunError::Epoll)?);
    let epoch_timer = TimerFd::new().map_err(|e| RunError::Epoll(e.into()))?;
    let migration_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(RunError::Epoll)?);
    let mut watched = vec![
        (events.exit.as_raw_fd(), Wake::Exit),
        (events.reset.as_raw_fd(), Wake::Reset),
        (events.vcpu_failure.as_raw_fd(), Wake::VcpuFailure),
        (ft_wake.as_raw_fd(), Wake::Ft),
        (epoch_timer.as_raw_fd(), Wake::Epoch),
        (migration_wake.as_raw_fd(), Wake::Migration),
        (events.pci_eject.as_raw_fd(), Wake::PciEject),
    ];
    if let Some(api) = &options.api {
        watched.push((api.wake.as_raw_fd(), Wake::Api));
    }
    for (fd, wake) in watched {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, wake as u64),
            )
            .map_err(RunError::Epoll)?;
    }
    let mut vmm = Vmm {
        kvm,
        events,
        seccomp: options.seccomp,
        monitor: options.event_monitor,
        progress: options.progress,
        ft_reported: (FtHealth::Off, 0),
        config: None,
        serial: None,
        console: None,
        vm: None,
        state: VmState::Created,
        ft: options.ft,
        ft_wake,
        epoch_timer,
        primary: None,
        primary_faults_base: None,
        backup: None,
        standby: None,
        ft_ended: None,
        fenced: None,
        ft_request: None,
        receive_request: None,
        migration_wake,
        incoming: None,
        passed_taps: BTreeMap::new(),
    };
    vmm.emit("vmm", "starting");
    if let Some(config) = options.config {
        config.validate()?;
        vmm.config = Some(config);
        vmm.boot()?;
    }
    if let Some(request) = options.restore {
        vmm.restore(&request)
            .map_err(|e| RunError::Restore(e.to_string()))?;
    }

    let mut ready = [EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RunError::Epoll(e)),
        };
        // Epoll is level-triggered: events not handled now are returned by the next wait.
        let Some(event) = ready[..n].first() else {
            continue;
        };
        if let Next::Exit(reason) = vmm.handle_wake(event.data(), options.api.as_ref())? {
            vmm.emit("vmm", "shutdown");
            if let Some(monitor) = &vmm.monitor {
                // The process ends next: let the reader have the last events (bounded, so a
                // reader that stopped reading cannot hold the exit up).
                monitor.flush(Duration::from_secs(1));
            }
            return Ok(reason);
        }
    }
}

/// `vm.enable-ft` with this peer protects nothing: it is a benchmark hook (the FT benchmark's
/// floor). Every epoch the control loop harvests and re-arms the dirty log exactly as an FT
/// checkpoint does (`ReplicableVm::dirty_since_last`: `KVM_GET_DIRTY_LOG` per slot, which
/// write-protects the pages again, OR the device bitmap), and nothing else: no pause, no
/// copy, no state capture, no sending. So guest work under it shows what dirty tracking
/// alone costs on this host. `vm.ft-status` reports role primary, health off, this peer, the
/// harvests as epochs and the pages found dirty.
pub const DIRTY_LOG_FLOOR_PEER: &str = "dirty-log-floor";

struct DirtyLogFloor {
    epoch_len: Duration,
    /// When the last harvest started (epochs count from there, as FT's do).
    started: Instant,
    epoch: u64,
    dirty_pages: u64,
}

impl DirtyLogFloor {
    fn start(vm: &mut Vm, epoch_ms: u64) -> Result<Self, String> {
        if epoch_ms == 0 || epoch_ms > 1000 {
            return Err(format!("epoch_ms {epoch_ms}: the floor takes 1 to 1000 ms"));
        }
        ReplicableVm::set_dirty_logging(vm, true)?;
        // What was dirty before it started does not count.
        if let Err(e) = ReplicableVm::dirty_since_last(vm) {
            let _ = ReplicableVm::set_dirty_logging(vm, false);
            return Err(e);
        }
        Ok(Self {
            epoch_len: Duration::from_millis(epoch_ms),
            started: Instant::now(),
            epoch: 0,
            dirty_pages: 0,
        })
    }
}

impl PrimaryFt for DirtyLogFloor {
    fn next_checkpoint(&self) -> Option<Duration> {
        Some(self.epoch_len.saturating_sub(self.started.elapsed()))
    }

    fn checkpoint(&mut self, vm: &mut Vm) -> Result<(), String> {
        self.started = Instant::now();
        let dirty = ReplicableVm::dirty_since_last(vm)?;
        self.dirty_pages += dirty.count();
        self.epoch += 1;
        Ok(())
    }

    fn poll(&mut self, _vm: &mut Vm, _running: bool) -> PrimaryEvent {
        PrimaryEvent::Continue
    }

    fn status(&self) -> FtStatus {
        FtStatus {
            role: FtRole::Primary,
            health: FtHealth::Off,
            peer: Some(DIRTY_LOG_FLOOR_PEER.to_string()),
            epoch_ms: self.epoch_len.as_millis() as u64,
            epoch: self.epoch,
            dirty_pages: self.dirty_pages,
            ..FtStatus::default()
        }
    }

    fn stop(self: Box<Self>, vm: Option<&mut Vm>, _reason: StopReason) -> Result<(), String> {
        // No backup: nothing can own the VM but this side.
        if let Some(vm) = vm {
            if let Err(e) = ReplicableVm::set_dirty_logging(vm, false) {
                log::warn!("dirty-log floor: turning dirty logging off: {e}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serial_socket_client_that_never_reads_does_not_block_writes() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let client = Arc::new(Mutex::new(Some(SerialClient::new(ours).unwrap())));
        let mut writer = SocketWriter {
            client: client.clone(),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let started = Instant::now();
            for _ in 0..(10 << 20) / 4096 {
                writer.write_all(&[b'x'; 4096]).unwrap();
            }
            let _ = tx.send(started.elapsed());
        });
        let took = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("10 MiB of serial output blocked on a client that does not read");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        let guard = client.lock().unwrap();
        let kept = guard.as_ref().expect("a slow client is kept");
        assert!(kept.dropped > 0);
        drop(guard);
        drop(theirs);
    }

    #[test]
    fn a_serial_socket_client_that_went_away_is_dropped() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let client = Arc::new(Mutex::new(Some(SerialClient::new(ours).unwrap())));
        let mut writer = SocketWriter {
            client: client.clone(),
        };
        drop(theirs);
        assert_eq!(writer.write(b"hello").unwrap(), 5);
        assert!(client.lock().unwrap().is_none());
    }

    #[test]
    fn serial_file_output_stops_at_the_cap() {
        let mut w = CappedWriter::new(Vec::new(), 10);
        assert_eq!(w.write(b"0123456").unwrap(), 7);
        // Beyond the cap output is dropped, yet reported written so the guest never stalls.
        assert_eq!(w.write(b"789abc").unwrap(), 6);
        assert_eq!(w.write(b"more").unwrap(), 4);
        w.flush().unwrap();
        assert_eq!(w.inner, b"0123456789");
    }
}
