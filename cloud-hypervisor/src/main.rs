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
    let Some(config) = options.vm_config else {
        eprintln!(
            "Error: waiting for vm.create on --api-socket is not available yet; pass --kernel"
        );
        return ExitCode::FAILURE;
    };
    let seccomp = match options.seccomp {
        SeccompAction::Trap => vmm::SeccompMode::Trap,
        SeccompAction::Allow => vmm::SeccompMode::Off,
        SeccompAction::Log => vmm::SeccompMode::Log,
    };
    match vmm::run(&config, seccomp) {
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
