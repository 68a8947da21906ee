//! `tandem-witness`: the fencing witness for fault-tolerant pairs (see `ft::witness`). Runs on a
//! third host; a primary or backup that lost its peer claims its pair here, and only the first
//! role to claim may go on.
//!
//! ```text
//! tandem-witness --listen 0.0.0.0:7000 (--tls-dir DIR | --insecure-plaintext)
//!                [--state-file FILE | --no-state-file] [--retain-days N]
//!                [--max-connections N] [--max-connections-per-ip N] [-v...] [--log-file FILE]
//! ```
//!
//! Whoever reaches the witness decides which copy of a VM lives, so it speaks mutual TLS
//! (`--tls-dir`, QEMU's x509 layout: the peers need client certificates from its CA) unless the
//! operator opts out with `--insecure-plaintext`. Decisions are kept in a state file
//! (default `/var/lib/tandem-witness/decisions.json`, its directory created 0700) so a restart
//! never reverses one; `--no-state-file` keeps them in memory only, which is unsafe outside
//! tests. Decisions older than `--retain-days` (default 30; 0 keeps them forever) are pruned.
//!
//! Prints `listening on ADDR` on stdout once it serves (so `--listen 127.0.0.1:0` can be used),
//! then runs until killed. Decisions are logged at info level (`-v`).

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Command};
use cloud_hypervisor::logger;
use ft::witness::{
    Security, WitnessConfig, DEFAULT_CONNECTION_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_IP, DEFAULT_STATE_FILE,
};

/// Default of `--retain-days`.
const DEFAULT_RETAIN_DAYS: u64 = 30;
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

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
            Arg::new("tls-dir")
                .long("tls-dir")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .help(
                    "Mutual TLS credentials (ca-cert.pem, server-cert.pem, server-key.pem, \
                     client-cert.pem, client-key.pem); claimants need a client certificate \
                     from this CA",
                ),
        )
        .arg(
            Arg::new("insecure-plaintext")
                .long("insecure-plaintext")
                .action(ArgAction::SetTrue)
                .help(
                    "Serve plain TCP: anyone who reaches the port can decide which copy of a VM \
                     lives",
                ),
        )
        .arg(
            Arg::new("state-file")
                .long("state-file")
                .visible_alias("state")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .conflicts_with("no-state-file")
                .help(format!(
                    "JSON file keeping the decisions across restarts (default: \
                     {DEFAULT_STATE_FILE}; a missing directory is created 0700)"
                )),
        )
        .arg(
            Arg::new("no-state-file")
                .long("no-state-file")
                .action(ArgAction::SetTrue)
                .help(
                    "Keep the decisions in memory only. Unsafe: a restarted witness may grant a \
                     pair to the side it denied before (split brain)",
                ),
        )
        .arg(
            Arg::new("retain-days")
                .long("retain-days")
                .value_name("N")
                .value_parser(clap::value_parser!(u64))
                .default_value(DEFAULT_RETAIN_DAYS.to_string())
                .help(
                    "Prune decisions older than N days; must exceed the time a fenced side may \
                     still claim its pair. 0 keeps them forever",
                ),
        )
        .arg(
            Arg::new("max-connections")
                .long("max-connections")
                .value_name("N")
                .value_parser(clap::value_parser!(usize))
                .default_value(DEFAULT_MAX_CONNECTIONS.to_string())
                .help("Connections served at once"),
        )
        .arg(
            Arg::new("max-connections-per-ip")
                .long("max-connections-per-ip")
                .value_name("N")
                .value_parser(clap::value_parser!(usize))
                .default_value(DEFAULT_MAX_CONNECTIONS_PER_IP.to_string())
                .help(
                    "Connections served at once from one address; must exceed the FT pairs one \
                     host runs (they all claim at once when it loses its network)",
                ),
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

/// The state file: `--state-file`, else the default, unless `--no-state-file`.
fn state_file(matches: &ArgMatches) -> Option<PathBuf> {
    if matches.get_flag("no-state-file") {
        return None;
    }
    Some(
        matches
            .get_one::<PathBuf>("state-file")
            .cloned()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_FILE)),
    )
}

fn config(matches: &ArgMatches) -> WitnessConfig {
    let retain_days = matches
        .get_one::<u64>("retain-days")
        .copied()
        .unwrap_or(DEFAULT_RETAIN_DAYS);
    WitnessConfig {
        connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
        max_connections: matches
            .get_one::<usize>("max-connections")
            .copied()
            .unwrap_or(DEFAULT_MAX_CONNECTIONS),
        max_connections_per_ip: matches
            .get_one::<usize>("max-connections-per-ip")
            .copied()
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP),
        // 0 days keeps forever; a huge count saturates rather than overflowing.
        retention: (retain_days > 0)
            .then(|| DAY.saturating_mul(u32::try_from(retain_days).unwrap_or(u32::MAX))),
    }
}

/// Creates the state file's directory (0700: the decisions are the witness's alone) if missing.
fn prepare_state_dir(state_file: &Path) -> Result<(), String> {
    let Some(dir) = state_file.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create the state directory {}: {e}", dir.display()))
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
    let security = match Security::choose(
        matches.get_one::<PathBuf>("tls-dir").map(PathBuf::as_path),
        matches.get_flag("insecure-plaintext"),
        "the fencing witness",
    ) {
        Ok(security) => security,
        Err(e) => {
            eprintln!("Error: tandem-witness: {e}");
            return ExitCode::FAILURE;
        }
    };
    match &security {
        Security::Tls(_) => log::info!("witness: connections use {}", security.describe()),
        Security::InsecurePlaintext => log::warn!(
            "witness: connections use {}: anyone who reaches the port can claim any pair",
            security.describe()
        ),
    }

    let state = state_file(&matches);
    match &state {
        Some(path) => {
            // Before the seccomp filter, which does not allow mkdir.
            if let Err(e) = prepare_state_dir(path) {
                eprintln!("Error: tandem-witness: {e}");
                return ExitCode::FAILURE;
            }
            log::info!("witness: decisions kept in {}", path.display());
        }
        None => log::warn!(
            "witness: decisions kept in memory only: a restarted witness may reverse one \
             (split brain)"
        ),
    }
    let config = config(&matches);

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
    let handle = match ft::witness::spawn_server_with_config(listener, security, state, config) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ArgMatches {
        let mut argv = vec!["tandem-witness", "--listen", "127.0.0.1:0"];
        argv.extend(args);
        cli().try_get_matches_from(argv).unwrap()
    }

    #[test]
    fn decisions_are_persisted_by_default() {
        let matches = parse(&["--insecure-plaintext"]);
        assert_eq!(
            state_file(&matches),
            Some(PathBuf::from(DEFAULT_STATE_FILE))
        );
        let matches = parse(&["--insecure-plaintext", "--state-file", "/tmp/w.json"]);
        assert_eq!(state_file(&matches), Some(PathBuf::from("/tmp/w.json")));
        let matches = parse(&["--insecure-plaintext", "--state", "/tmp/w.json"]);
        assert_eq!(state_file(&matches), Some(PathBuf::from("/tmp/w.json")));
        assert_eq!(state_file(&parse(&["--no-state-file"])), None);
        assert!(cli()
            .try_get_matches_from([
                "tandem-witness",
                "--listen",
                "127.0.0.1:0",
                "--no-state-file",
                "--state-file",
                "/tmp/w.json",
            ])
            .is_err());
    }

    #[test]
    fn retention_and_limits() {
        let config = config(&parse(&[]));
        assert_eq!(config.retention, Some(DAY * 30));
        assert_eq!(config.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            config.max_connections_per_ip,
            DEFAULT_MAX_CONNECTIONS_PER_IP
        );
        assert_eq!(
            super::config(&parse(&["--retain-days", "0"])).retention,
            None
        );
        assert_eq!(
            super::config(&parse(&["--retain-days", "7"])).retention,
            Some(DAY * 7)
        );
        let config = super::config(&parse(&["--max-connections-per-ip", "3"]));
        assert_eq!(config.max_connections_per_ip, 3);
    }

    #[test]
    fn the_state_directory_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("tandem-witness-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        prepare_state_dir(&root.join("state").join("decisions.json")).unwrap();
        let mode = std::fs::metadata(root.join("state"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
