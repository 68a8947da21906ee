//! `tandem-witness`: the fencing witness for fault-tolerant pairs (see `ft::witness`). Runs on a
//! third host; a primary or backup that lost its peer claims its pair here, and only the first
//! role to claim may go on.
//!
//! ```text
//! tandem-witness --listen 0.0.0.0:7000 [--state /var/lib/tandem/witness.json] [-v...] [--log-file FILE]
//! ```
//!
//! Prints `listening on ADDR` on stdout once it serves (so `--listen 127.0.0.1:0` can be used),
//! then runs until killed. Decisions are logged at info level (`-v`).

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Arg, ArgAction, Command};
use cloud_hypervisor::logger;

fn cli() -> Command {
    Command::new("tandem-witness")
        .version(env!("CARGO_PKG_VERSION"))
        .arg_required_else_help(true)
        .about("Fencing witness: decides which side of a partitioned FT pair may go on.")
        .arg(
            Arg::new("listen")
                .long("listen")
                .required(true)
                .value_name("HOST:PORT")
                .help("TCP address to serve claims on"),
        )
        .arg(
            Arg::new("state")
                .long("state")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("JSON file keeping the decisions across restarts (default: memory only)"),
        )
        .arg(
            Arg::new("log-file")
                .long("log-file")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Log file (default: stderr)"),
        )
        .arg(
            Arg::new("v")
                .short('v')
                .action(ArgAction::Count)
                .help("Sets the level of debugging output"),
        )
}

fn main() -> ExitCode {
    let matches = match cli().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            // Help and version go to stdout, usage errors (naming the missing flag) to stderr.
            let code = u8::try_from(e.exit_code()).unwrap_or(2);
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let verbosity = matches.get_count("v");
    let log_file = matches.get_one::<PathBuf>("log-file");
    if let Err(e) = logger::init(verbosity, log_file.map(PathBuf::as_path)) {
        eprintln!("Error: tandem-witness: {e}");
        return ExitCode::FAILURE;
    }
    let Some(listen) = matches.get_one::<String>("listen") else {
        eprintln!("Error: tandem-witness: --listen <HOST:PORT> is required");
        return ExitCode::FAILURE;
    };
    let state = matches.get_one::<PathBuf>("state").cloned();

    let listener = match TcpListener::bind(listen.as_str()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("Error: tandem-witness: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The witness is reached over the network: its threads run filtered (the accept thread
    // installs the witness filter, its connection threads inherit it).
    if let Err(e) = vmm::seccomp::set_process_mode(vmm::SeccompMode::Trap) {
        eprintln!("Error: tandem-witness: {e}");
        return ExitCode::FAILURE;
    }
    let handle = match ft::witness::spawn_server(listener, state) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("Error: tandem-witness: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Not println!: a closed stdout must not bring the witness down.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on {}", handle.local_addr());
    let _ = stdout.flush();
    handle.wait();
    ExitCode::SUCCESS
}
