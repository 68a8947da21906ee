//! `cloud-hypervisor`: boots a VM from the command line and/or serves the REST API, with
//! Cloud Hypervisor's flags.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use cloud_hypervisor::cli::{self, ApiSocket, CliOptions, CliOutcome, SeccompAction};
use cloud_hypervisor::logger;
use vmm::control::ApiSender;
use vmm::event_monitor::EventMonitor;
use vmm_sys_util::eventfd::EventFd;

/// How long the answer to `vmm.shutdown` may take to reach its client before the process exits.
const API_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let options = match cli::parse_args(std::env::args_os()) {
        Ok(CliOutcome::Run(options)) => options,
        Ok(CliOutcome::PrintAndExit { text, code }) => {
            if code == 0 {
                print!("{text}");
            } else {
                eprint!("{text}");
            }
            return ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Before the VMM opens anything: a number that is not open now could later name one of
    // the VMM's own files.
    if let Err(e) = claim_inherited_tap_fds(&options) {
        eprintln!("Error: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = logger::init(options.verbosity, options.log_file.as_deref()) {
        eprintln!("Error: {e}");
        return ExitCode::FAILURE;
    }
    let log_to_file = options.log_file.is_some();
    match run(options) {
        Ok(reason) => {
            log::info!("VMM exiting: {reason:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // stderr gets exactly one line; a log file keeps the error too.
            if log_to_file {
                log::error!("{e}");
            }
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--net fd=N`: each N must be a descriptor this process inherited. It stays open for the
/// life of the VMM (every build of the NIC, a reboot's too, uses a duplicate) and is marked
/// close-on-exec so that processes the VMM starts do not inherit it.
fn claim_inherited_tap_fds(options: &CliOptions) -> Result<(), String> {
    let nets = options
        .vm_config
        .iter()
        .flat_map(|c| c.net.iter().flatten());
    for fd in nets.flat_map(|net| net.passed_fds().unwrap_or_default()) {
        // SAFETY: F_GETFD/F_SETFD on a descriptor number; no memory involved, and an unused
        // number only fails with EBADF.
        let flags = unsafe { libc::fcntl(*fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(format!(
                "--net fd={fd}: descriptor {fd} is not open in this process ({})",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: as above.
        unsafe { libc::fcntl(*fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// Removes the API socket file when the VMM exits, as Cloud Hypervisor does.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn run(options: CliOptions) -> Result<vmm::ExitReason, String> {
    let seccomp = match options.seccomp {
        SeccompAction::Trap => vmm::SeccompMode::Trap,
        SeccompAction::Allow => vmm::SeccompMode::Off,
        SeccompAction::Log => vmm::SeccompMode::Log,
    };
    // Before the event monitor: its writer thread installs its filter as it starts.
    vmm::seccomp::set_process_mode(seccomp).map_err(|e| e.to_string())?;
    let event_monitor = match &options.event_monitor {
        Some(cli::EventMonitor::Path(path)) => Some(EventMonitor::from_path(path)),
        Some(cli::EventMonitor::Fd(fd)) => Some(EventMonitor::from_fd(*fd)),
        None => None,
    }
    .transpose()
    .map_err(|e| format!("--event-monitor: {e}"))?
    .map(Arc::new);

    let progress = Arc::new(vmm::progress::ProgressBoard::default());
    let mut socket_file = SocketFile(None);
    let mut server = None;
    let mut api = None;
    if let Some(socket) = &options.api_socket {
        let listener = match socket {
            ApiSocket::Path(path) => {
                let listener = api::bind(path).map_err(|e| format!("--api-socket: {e}"))?;
                socket_file.0 = Some(path.clone());
                listener
            }
            ApiSocket::Fd(fd) => {
                api::listener_from_fd(*fd).map_err(|e| format!("--api-socket: {e}"))?
            }
        };
        let (sender, requests) = mpsc::channel();
        let wake = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| format!("cannot create an eventfd: {e}"))?,
        );
        let backend =
            Arc::new(ApiSender::new(sender, wake.clone()).with_progress(progress.clone()));
        server = Some(
            api::spawn_server(listener, backend, api::ServerOptions::default())
                .map_err(|e| format!("cannot start the API server: {e}"))?,
        );
        api = Some(vmm::ApiReceiver { requests, wake });
    }

    // The control loop's filter; every thread it starts keeps it beneath its own.
    vmm::seccomp::apply(vmm::seccomp::ThreadRole::Vmm).map_err(|e| e.to_string())?;
    let result = vmm::run(vmm::VmmOptions {
        config: options.vm_config,
        restore: options.restore,
        api,
        seccomp,
        event_monitor,
        ft: Some(Box::new(ft::TandemFt)),
        progress,
    });
    if let Some(server) = &server {
        // Let the answer to vmm.shutdown reach the client before the process exits.
        server.wait_idle(API_DRAIN_TIMEOUT);
    }
    result.map_err(|e| e.to_string())
}
