//! `cloud-hypervisor`: boots a VM from the command line, with Cloud Hypervisor's flags.

use std::process::ExitCode;

use cloud_hypervisor::cli::{self, CliOutcome, SeccompAction};
use cloud_hypervisor::logger;

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
    if let Err(e) = logger::init(options.verbosity, options.log_file.as_deref()) {
        eprintln!("Error: {e}");
        return ExitCode::FAILURE;
    }
    let log_to_file = options.log_file.is_some();
    if options.vm_config.is_none() {
        eprintln!(
            "Error: waiting for vm.create on --api-socket is not available yet; pass --kernel"
        );
        return ExitCode::FAILURE;
    }
    let seccomp = match options.seccomp {
        SeccompAction::Trap => vmm::SeccompMode::Trap,
        SeccompAction::Allow => vmm::SeccompMode::Off,
        SeccompAction::Log => vmm::SeccompMode::Log,
    };
    let event_monitor = match options
        .event_monitor
        .as_ref()
        .map(open_event_monitor)
        .transpose()
    {
        Ok(monitor) => monitor,
        Err(e) => {
            eprintln!("Error: --event-monitor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let vmm_options = vmm::VmmOptions {
        config: options.vm_config,
        api: None,
        seccomp,
        event_monitor,
    };
    match vmm::run(vmm_options) {
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

fn open_event_monitor(
    target: &cli::EventMonitor,
) -> std::io::Result<std::sync::Arc<vmm::event_monitor::EventMonitor>> {
    use std::os::fd::FromRawFd;
    let file = match target {
        cli::EventMonitor::Path(path) => std::fs::File::create(path)?,
        // SAFETY: the fd was handed to us on the command line for this purpose and nothing
        // else in the process uses it.
        cli::EventMonitor::Fd(fd) => unsafe { std::fs::File::from_raw_fd(*fd) },
    };
    Ok(std::sync::Arc::new(vmm::event_monitor::EventMonitor::new(
        Box::new(file),
    )))
}
