//! The control loop: owns the VM, waits for the events that end or restart a run, and (later)
//! for API requests. Nothing else touches the VM.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::{ConsoleOutputMode, VmConfig};
use crate::seccomp::SeccompMode;
use crate::vm::{self, Vm, VmError, VmEvents};

#[derive(Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off.
    GuestShutdown,
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
    #[error("guest stopped: {0}")]
    VcpuFailed(String),
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
}

/// Boots the VM described by `config` and runs it until the guest shuts down. A guest reset
/// reboots the VM in place, as Cloud Hypervisor does.
pub fn run(config: &VmConfig, seccomp: SeccompMode) -> Result<ExitReason, RunError> {
    let kvm = vm::open_kvm()?;
    let serial = serial_output(config)?;
    let events = VmEvents::new()?;
    let epoll = Epoll::new().map_err(RunError::Epoll)?;
    for (fd, wake) in [
        (events.exit.as_raw_fd(), Wake::Exit),
        (events.reset.as_raw_fd(), Wake::Reset),
        (events.vcpu_failure.as_raw_fd(), Wake::VcpuFailure),
    ] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, wake as u64),
            )
            .map_err(RunError::Epoll)?;
    }

    let boot = || {
        let out = serial.clone().map(|w| Box::new(w) as Box<dyn Write + Send>);
        Vm::boot(&kvm, config, out, &events, seccomp)
    };
    let mut vm = boot()?;
    let mut ready = [EpollEvent::default(); 4];
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
        match event.data() {
            d if d == Wake::Exit as u64 => {
                let _ = events.exit.read();
                vm.shutdown();
                log::info!("guest shut down");
                return Ok(ExitReason::GuestShutdown);
            }
            d if d == Wake::Reset as u64 => {
                let _ = events.reset.read();
                log::info!("guest reset: rebooting the VM");
                vm.shutdown();
                drop(vm);
                vm = boot()?;
            }
            _ => {
                let _ = events.vcpu_failure.read();
                let failures = vm.vcpus().shared().take_failures();
                vm.shutdown();
                let message = failures
                    .iter()
                    .map(|f| match f {
                        crate::vcpu::VcpuExitReason::Failed { message, .. } => message.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(RunError::VcpuFailed(message));
            }
        }
    }
}
