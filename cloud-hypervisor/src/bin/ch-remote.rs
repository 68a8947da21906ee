//! `ch-remote`: controls a running VMM through its REST API socket, with Cloud Hypervisor's
//! subcommands and output (pretty JSON for `ping`, `info` and `counters`, nothing for the
//! actions; on failure the server's error messages as a numbered chain and exit code 1).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use api::client::{self, ApiResponse, ClientError};
use clap::{Arg, Command};

/// Subcommands: name, help, HTTP method, endpoint. `create` also takes a body.
const COMMANDS: &[(&str, &str, &str, &str)] = &[
    ("boot", "Boot a created VM", "PUT", "vm.boot"),
    ("counters", "Counters from the VM", "GET", "vm.counters"),
    (
        "create",
        "Create VM from a JSON configuration",
        "PUT",
        "vm.create",
    ),
    ("delete", "Delete a VM", "PUT", "vm.delete"),
    ("info", "Info on the VM", "GET", "vm.info"),
    ("pause", "Pause the VM", "PUT", "vm.pause"),
    (
        "ping",
        "Ping the VMM to check for API server availability",
        "GET",
        "vmm.ping",
    ),
    (
        "power-button",
        "Trigger a power button in the VM",
        "PUT",
        "vm.power-button",
    ),
    ("reboot", "Reboot the VM", "PUT", "vm.reboot"),
    ("resume", "Resume the VM", "PUT", "vm.resume"),
    ("shutdown", "Shutdown the VM", "PUT", "vm.shutdown"),
    ("shutdown-vmm", "Shutdown the VMM", "PUT", "vmm.shutdown"),
];

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("http client error")]
    Http(#[source] ClientError),
    #[error("Error reading from stdin")]
    ReadingStdin(#[source] std::io::Error),
    #[error("Error reading from file {0}")]
    ReadingFile(String, #[source] std::io::Error),
    /// The server answered with an error status; the body holds its messages.
    #[error("http client error")]
    Server(ApiResponse),
}

fn cli() -> Command {
    let mut app = Command::new("ch-remote")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Remotely control a cloud-hypervisor VMM.")
        .arg_required_else_help(true)
        .subcommand_required(true)
        .arg(
            Arg::new("api-socket")
                .long("api-socket")
                .help("HTTP API socket path (UNIX domain socket).")
                .num_args(1)
                .value_parser(clap::value_parser!(PathBuf)),
        );
    for (name, about, _, _) in COMMANDS {
        let mut command = Command::new(*name).about(*about);
        if *name == "create" {
            command = command.arg(
                Arg::new("path")
                    .index(1)
                    .default_value("-")
                    .help("VmConfig JSON file; - reads standard input"),
            );
        }
        app = app.subcommand(command);
    }
    app
}

fn main() -> ExitCode {
    let matches = match cli().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = u8::try_from(e.exit_code()).unwrap_or(2);
            match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                }
                // One line is enough to say what is wrong; --help has the rest.
                _ => {
                    let text = e.to_string();
                    eprintln!(
                        "{}",
                        text.lines().next().unwrap_or("error: invalid arguments")
                    );
                }
            }
            return ExitCode::from(code);
        }
    };
    let Some(socket) = matches.get_one::<PathBuf>("api-socket") else {
        eprintln!("Error: ch-remote: --api-socket <PATH> is required");
        return ExitCode::FAILURE;
    };
    let Some((name, sub)) = matches.subcommand() else {
        eprintln!("Error: ch-remote: a subcommand is required (see --help)");
        return ExitCode::FAILURE;
    };
    let Some(&(_, _, method, endpoint)) = COMMANDS.iter().find(|c| c.0 == name) else {
        eprintln!("Error: ch-remote: unknown subcommand {name}");
        return ExitCode::FAILURE;
    };
    let body = if name == "create" {
        let path = sub.get_one::<String>("path").map_or("-", String::as_str);
        match read_config(path) {
            Ok(body) => Some(body),
            Err(e) => return fail(&e),
        }
    } else {
        None
    };
    match run(socket, method, endpoint, body.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Http(ClientError::Connect { source, .. })) => {
            eprintln!("Error opening HTTP socket: {source}");
            ExitCode::FAILURE
        }
        Err(e) => fail(&e),
    }
}

fn read_config(path: &str) -> Result<String, Error> {
    if path == "-" {
        let mut data = String::new();
        std::io::stdin()
            .read_to_string(&mut data)
            .map_err(Error::ReadingStdin)?;
        Ok(data)
    } else {
        std::fs::read_to_string(path).map_err(|e| Error::ReadingFile(path.to_string(), e))
    }
}

fn run(socket: &Path, method: &str, endpoint: &str, body: Option<&str>) -> Result<(), Error> {
    let response = client::request(socket, method, endpoint, body).map_err(Error::Http)?;
    if !response.is_success() {
        return Err(Error::Server(response));
    }
    if !response.body.is_empty() {
        // Pretty JSON as Cloud Hypervisor users expect to read it; anything else as is.
        match serde_json::from_str::<serde_json::Value>(&response.body)
            .and_then(|v| serde_json::to_string_pretty(&v))
        {
            Ok(pretty) => println!("{pretty}"),
            Err(_) => println!("{}", response.body),
        }
    }
    Ok(())
}

/// A status name in the spelling of Cloud Hypervisor's client (`Server responded with
/// NotFound`).
fn status_name(status: u16) -> String {
    match status {
        400 => "BadRequest".into(),
        404 => "NotFound".into(),
        405 => "MethodNotAllowed".into(),
        408 => "RequestTimeout".into(),
        411 => "LengthRequired".into(),
        413 => "PayloadTooLarge".into(),
        431 => "RequestHeaderFieldsTooLarge".into(),
        500 => "InternalServerError".into(),
        503 => "ServiceUnavailable".into(),
        other => format!("Unknown({other})"),
    }
}

/// Prints the error chain in Cloud Hypervisor's format and returns exit code 1:
///
/// ```text
/// Error: ch-remote exited with the following chain of errors:
///   0: http client error
///   1: Server responded with MethodNotAllowed
///   2: cannot pause a VM in state Created
/// ```
fn fail(error: &Error) -> ExitCode {
    let mut lines = vec![error.to_string()];
    match error {
        Error::Server(response) => {
            lines.push(format!(
                "Server responded with {}",
                status_name(response.status)
            ));
            lines.extend(response.error_messages());
        }
        _ => {
            let mut source = std::error::Error::source(error);
            while let Some(e) = source {
                lines.push(e.to_string());
                source = e.source();
            }
        }
    }
    if lines.len() == 1 {
        eprintln!("Error: ch-remote exited with the following error:");
        eprintln!("  {}", lines[0]);
    } else {
        eprintln!("Error: ch-remote exited with the following chain of errors:");
        for (level, line) in lines.iter().enumerate() {
            eprintln!("  {level}: {line}");
        }
    }
    ExitCode::FAILURE
}
