//! The control loop: owns the VM, waits for the events that end or restart a run, and (later)
//! for API requests. Nothing else touches the VM.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConsoleOutputMode, VmConfig};
use crate::control::{
    ApiMessage, ReceiveMigrationRequest, RestoreRequest, SendMigrationRequest, SnapshotRequest,
    VmInfoResponse, VmState, VmmError, VmmPingResponse, VmmRequest, VmmResponse, VmmResult,
};
use crate::event_monitor::EventMonitor;
use crate::migration::{live, snapshot};
use crate::seccomp::SeccompMode;
use crate::vm::{self, Vm, VmError, VmEvents};
use crate::vm::{PrepareOptions, RestoredMemory, Start, VmSnapshotState};

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

/// Serial output to whichever client is connected to the socket; output with no client
/// connected is dropped, as on a real serial line.
struct SocketWriter {
    client: Arc<Mutex<Option<UnixStream>>>,
}

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stream) = client.as_mut() {
            if stream.write_all(buf).is_err() {
                *client = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn serial_socket(path: &Path) -> Result<SocketWriter, RunError> {
    let err = |source| RunError::SerialSocket {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(err)?;
    let client = Arc::new(Mutex::new(None));
    let accepted = client.clone();
    std::thread::Builder::new()
        .name("serial-socket".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                *accepted.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
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
            Box::new(file)
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
}

/// Owns the VM and everything about its lifecycle; runs on the control loop thread only.
struct Vmm {
    kvm: kvm_ioctls::Kvm,
    events: VmEvents,
    seccomp: SeccompMode,
    monitor: Option<Arc<EventMonitor>>,
    /// The created VM's configuration (None before `vm.create` or after `vm.delete`).
    config: Option<VmConfig>,
    /// Console output kept across reboots of the same VM.
    serial: Option<SharedWriter>,
    vm: Option<Vm>,
    state: VmState,
}

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

    fn create(&mut self, config: VmConfig) -> Result<(), VmmError> {
        if self.config.is_some() {
            return Err(VmmError::VmAlreadyCreated);
        }
        config
            .validate()
            .map_err(|e| VmmError::InvalidConfig(e.to_string()))?;
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
        let out = self
            .serial
            .clone()
            .map(|w| Box::new(w) as Box<dyn Write + Send>);
        let vm = Vm::boot(&self.kvm, config, out, &self.events, self.seccomp)?;
        self.vm = Some(vm);
        self.state = VmState::Running;
        self.emit("vm", "booted");
        Ok(())
    }

    fn stop_vm(&mut self) {
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
        self.stop_vm();
        self.boot()?;
        self.emit("vm", "rebooted");
        Ok(())
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

    fn handle_request(&mut self, request: VmmRequest) -> (VmmResult, Option<ExitReason>) {
        let result = match request {
            VmmRequest::Ping => Ok(VmmResponse::Ping(VmmPingResponse {
                build_version: env!("CARGO_PKG_VERSION").to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: i64::from(std::process::id()),
                features: vec!["kvm".to_string()],
            })),
            VmmRequest::ShutdownVmm => {
                self.stop_vm();
                return (Ok(VmmResponse::Empty), Some(ExitReason::VmmShutdown));
            }
            VmmRequest::CreateVm(config) => self.create(*config).map(|_| VmmResponse::Empty),
            VmmRequest::BootVm => self
                .require_state("boot", &[VmState::Created, VmState::Shutdown])
                .and_then(|_| self.boot().map_err(|e| Self::failed("boot", e)))
                .map(|_| VmmResponse::Empty),
            VmmRequest::VmInfo => self.require_state("query", &ALL_STATES).map(|_| {
                let config = self.config.clone().unwrap_or_default();
                VmmResponse::VmInfo(Box::new(VmInfoResponse {
                    memory_actual_size: config.memory.size,
                    config,
                    state: self.state,
                }))
            }),
            VmmRequest::Counters => {
                self.require_state("read the counters of", &ALL_STATES)
                    .map(|_| {
                        VmmResponse::Counters(
                            self.vm.as_ref().map(|vm| vm.counters()).unwrap_or_default(),
                        )
                    })
            }
            VmmRequest::PauseVm => {
                self.require_state("pause", &[VmState::Running])
                    .and_then(|_| {
                        self.emit("vm", "pausing");
                        let vm = self.vm.as_ref().ok_or(VmmError::VmNotCreated)?;
                        vm.vcpus()
                            .pause(crate::vm::PAUSE_TIMEOUT)
                            .map_err(|e| Self::failed("pause", e))?;
                        self.state = VmState::Paused;
                        self.emit("vm", "paused");
                        Ok(VmmResponse::Empty)
                    })
            }
            VmmRequest::ResumeVm => {
                self.require_state("resume", &[VmState::Paused])
                    .and_then(|_| {
                        self.emit("vm", "resuming");
                        let vm = self.vm.as_ref().ok_or(VmmError::VmNotCreated)?;
                        vm.vcpus().resume();
                        self.state = VmState::Running;
                        self.emit("vm", "resumed");
                        Ok(VmmResponse::Empty)
                    })
            }
            // Without an ACPI power button device the press is a forced power-off, which is
            // what holding a PC's power button does; a guest gets no chance to clean up.
            VmmRequest::ShutdownVm | VmmRequest::PowerButton => self
                .require_state("shut down", &[VmState::Running, VmState::Paused])
                .map(|_| {
                    self.stop_vm();
                    self.state = VmState::Shutdown;
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
                    Ok(()) => return (Ok(VmmResponse::Empty), Some(ExitReason::MigratedAway)),
                    Err(e) => Err(e),
                }
            }
            VmmRequest::ReceiveMigration(request) => {
                self.receive_migration(&request).map(|_| VmmResponse::Empty)
            }
            VmmRequest::DeleteVm => self.require_state("delete", &ALL_STATES).map(|_| {
                self.stop_vm();
                self.config = None;
                self.serial = None;
                self.state = VmState::Created;
                self.emit("vm", "deleted");
                VmmResponse::Empty
            }),
        };
        (result, None)
    }

    fn snapshot(&mut self, request: &SnapshotRequest) -> Result<(), VmmError> {
        let dir = snapshot::parse_file_url(&request.destination_url)
            .map_err(|e| VmmError::InvalidConfig(e.to_string()))?;
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
        let stream = live::connect(&url).map_err(|e| {
            Self::failed(
                "migration",
                format!("cannot connect to {}: {e}", request.destination_url),
            )
        })?;
        self.emit("vm", "migrating");
        let vm = self.vm.as_mut().ok_or(VmmError::VmNotCreated)?;
        let report = live::send(
            vm,
            &config,
            stream,
            Duration::from_millis(request.downtime_ms),
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

    /// Waits for an incoming migration and runs the VM it brings.
    fn receive_migration(&mut self, request: &ReceiveMigrationRequest) -> Result<(), VmmError> {
        if self.config.is_some() {
            return Err(VmmError::VmAlreadyCreated);
        }
        let url = live::parse_url(&request.receiver_url).map_err(VmmError::InvalidConfig)?;
        let stream = live::accept(&url).map_err(|e| {
            Self::failed(
                "receiving a migration",
                format!("cannot listen on {}: {e}", request.receiver_url),
            )
        })?;
        self.emit("vm", "receiving");
        let (mut receiver, config) =
            live::receive_config(stream).map_err(|e| Self::failed("receiving a migration", e))?;
        // Everything that does not depend on the VM's contents is built now, during the
        // source's pre-copy, so the downtime window holds only the state restore.
        let prepared = serial_output(&config)
            .map_err(|e| e.to_string())
            .and_then(|serial| {
                let out = serial.clone().map(|w| Box::new(w) as Box<dyn Write + Send>);
                let options = PrepareOptions {
                    memory: None,
                    defer_disk_locks: true,
                };
                Vm::prepare(&self.kvm, &config, out, &self.events, self.seccomp, options)
                    .map(|vm| (vm, serial))
                    .map_err(|e| e.to_string())
            });
        let (prepared, serial) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                let _ = receiver.send_error(&e);
                return Err(Self::failed("receiving a migration", e));
            }
        };
        let state: VmSnapshotState = receiver
            .recv_state(prepared.memory())
            .map_err(|e| Self::failed("receiving a migration", e))?;
        let vm = match prepared.restore(&state, true) {
            Ok(vm) => vm,
            Err(e) => {
                let _ = receiver.send_error(&e.to_string());
                return Err(Self::failed("receiving a migration", e));
            }
        };
        vm.device_manager().announce_nets();
        self.vm = Some(vm);
        self.serial = serial;
        self.config = Some(config);
        self.state = VmState::Running;
        // The source stops for good once it reads this. If the ack is lost, a source with disks
        // stays paused (it cannot take their locks back from us); fencing a disk-less VM
        // against such a split is fault tolerance's job, not migration's.
        receiver
            .send_ack()
            .map_err(|e| Self::failed("receiving a migration", e))?;
        self.emit("vm", "migrated");
        Ok(())
    }

    /// Handles one readiness event of the control loop.
    fn handle_wake(&mut self, wake: u64, api: Option<&ApiReceiver>) -> Result<Next, RunError> {
        match wake {
            w if w == Wake::Exit as u64 => {
                let _ = self.events.exit.read();
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
            _ => {
                let Some(api) = api else {
                    return Ok(Next::Continue);
                };
                let _ = api.wake.read();
                while let Ok(message) = api.requests.try_recv() {
                    let (result, exit) = self.handle_request(message.request);
                    // A client that went away does not care about the answer.
                    let _ = message.reply.send(result);
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
    let mut watched = vec![
        (events.exit.as_raw_fd(), Wake::Exit),
        (events.reset.as_raw_fd(), Wake::Reset),
        (events.vcpu_failure.as_raw_fd(), Wake::VcpuFailure),
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
        config: None,
        serial: None,
        vm: None,
        state: VmState::Created,
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
            return Ok(reason);
        }
    }
}
