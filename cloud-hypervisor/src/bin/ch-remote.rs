//! `ch-remote`: controls a running VMM through its REST API socket, with Cloud Hypervisor's
//! subcommands and output (pretty JSON for `ping`, `info` and `counters`, nothing for the
//! actions; on failure the server's error messages as a numbered chain and exit code 1).
//!
//! Snapshot, restore and migration take Cloud Hypervisor's arguments:
//!
//! ```text
//! ch-remote snapshot file:///tmp/snap                 (or destination_url=file:///tmp/snap)
//! ch-remote restore source_url=file:///tmp/snap[,prefault=on][,resume=on]   (or a bare URL)
//! ch-remote send-migration destination_url=tcp:HOST:PORT,tls_dir=DIR[,downtime_ms=100][,local=off]
//! ch-remote send-migration [--local] tcp:HOST:PORT|unix:/path          (the older form)
//! ch-remote receive-migration receiver_url=tcp:0.0.0.0:PORT,tls_dir=DIR   (or unix:/path)
//! ```
//!
//! Hot-plug takes the cloud-hypervisor binary's device syntax and prints the VMM's answer
//! (`{"id":"_disk1","bdf":"0000:00:05.0"}`) as Cloud Hypervisor's ch-remote does:
//!
//! ```text
//! ch-remote add-disk path=/x.img,readonly=on      (also add-pmem, add-fs, add-vsock)
//! ch-remote add-net tap=tap1,mac=12:34:56:78:9a:bc
//! ch-remote add-net fd=3,mac=12:34:56:78:9a:bc    (a TAP descriptor of ch-remote, passed along)
//! ch-remote remove-device _disk1
//! ```
//!
//! Over TCP every channel between hosts is mutual TLS with the certificates in `tls_dir`
//! (`--tls-dir`), laid out like QEMU's x509 directory. Plain TCP takes `insecure_plaintext=on`
//! (`--insecure-plaintext`): unsafe, anyone who reaches the port is trusted.
//!
//! `send-migration` and `receive-migration` return when the migration is over.
//!
//! Fault tolerance (Tandem's extension, endpoints `vm.enable-ft`, `vm.receive-ft`,
//! `vm.ft-status`, `vm.disable-ft`):
//!
//! ```text
//! ch-remote receive-ft tcp:HOST:PORT --tls-dir DIR [--disk-path PATH]... [--tap NAME]...
//!                     [--witness HOST:PORT]   (or receiver_url=tcp:HOST:PORT; on the backup's VMM)
//! ch-remote enable-ft --peer HOST:PORT --tls-dir DIR [--epoch-ms N] [--disk-mode replicated|shared]
//!                     [--heartbeat-timeout-ms N] [--witness HOST:PORT | --fencing etcd://HOST:PORT,...]
//!                     [--compress] [--no-hot-pages] [--no-early-staging] [--no-early-send]
//!                     [--no-stage-helper] [--no-early-acks]
//!                     [--no-resend-output]
//!                     [--latency-mode] [--encode-threads N | --streams N]
//! ch-remote ft-status [--json|--summary]  (a summary on a terminal; the FtStatus JSON with
//!                                     --json or when stdout is not a terminal)
//! ch-remote progress                  (the running enable-ft sync or send-migration, JSON)
//! ch-remote disable-ft
//! ```
//!
//! While `enable-ft` and `send-migration` wait, they show the transfer's progress on stderr
//! (read from `vm.progress` on a second connection): one line redrawn in place on a
//! terminal, a plain line every few seconds otherwise; `--no-progress` shows none.
//!
//! `receive-ft` returns as soon as the backup's VMM listens (`ft-status` then shows
//! `waiting_for_primary`, later `protected`); `enable-ft` returns once the initial
//! synchronisation with the backup is over, which can take minutes for a big guest. Malformed
//! flags are refused before anything is sent, with one line on stderr and exit code 2.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::os::fd::{BorrowedFd, RawFd};

use api::client::{self, ApiResponse, ClientError};
use clap::builder::PossibleValuesParser;
use clap::{Arg, ArgAction, ArgMatches, Command};
use cloud_hypervisor::cli::{self, CliError};
use cloud_hypervisor::option_parser::{ByteSize, OptionParser, OptionValue};
use vmm::config::NetConfig;
use vmm::control::{
    EnableFtRequest, FtDiskMode, FtHealth, FtRole, FtStatus, ReceiveFtRequest,
    ReceiveMigrationRequest, RemoveDeviceRequest, RestoreRequest, SendMigrationRequest,
    SnapshotRequest, VmResizeRequest,
};
use vmm::progress::ProgressReport;

/// Subcommands: name, help, HTTP method, endpoint. `create` also takes a body.
const COMMANDS: &[(&str, &str, &str, &str)] = &[
    ("add-disk", "Add block device", "PUT", "vm.add-disk"),
    (
        "add-fs",
        "Add virtio-fs backed fs device",
        "PUT",
        "vm.add-fs",
    ),
    ("add-net", "Add network device", "PUT", "vm.add-net"),
    (
        "add-pmem",
        "Add persistent memory device",
        "PUT",
        "vm.add-pmem",
    ),
    ("add-vsock", "Add vsock device", "PUT", "vm.add-vsock"),
    ("boot", "Boot a created VM", "PUT", "vm.boot"),
    ("counters", "Counters from the VM", "GET", "vm.counters"),
    (
        "create",
        "Create VM from a JSON configuration",
        "PUT",
        "vm.create",
    ),
    ("delete", "Delete a VM", "PUT", "vm.delete"),
    (
        "disable-ft",
        "Stop fault tolerance (the backup drops its copy)",
        "PUT",
        "vm.disable-ft",
    ),
    (
        "enable-ft",
        "Protect the running VM with a hot backup (fault tolerance)",
        "PUT",
        "vm.enable-ft",
    ),
    (
        "ft-status",
        "Fault-tolerance status of the VM",
        "GET",
        "vm.ft-status",
    ),
    (
        "progress",
        "Progress of the running enable-ft sync or send-migration",
        "GET",
        "vm.progress",
    ),
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
    (
        "remove-device",
        "Remove VFIO and PCI device",
        "PUT",
        "vm.remove-device",
    ),
    (
        "receive-ft",
        "Become the hot backup of a primary that will connect (fault tolerance)",
        "PUT",
        "vm.receive-ft",
    ),
    (
        "receive-migration",
        "Receive a VM migration",
        "PUT",
        "vm.receive-migration",
    ),
    ("resize", "Resize the VM", "PUT", "vm.resize"),
    ("restore", "Restore VM from a snapshot", "PUT", "vm.restore"),
    ("resume", "Resume the VM", "PUT", "vm.resume"),
    (
        "send-migration",
        "Initiate a VM migration",
        "PUT",
        "vm.send-migration",
    ),
    ("shutdown", "Shutdown the VM", "PUT", "vm.shutdown"),
    ("shutdown-vmm", "Shutdown the VMM", "PUT", "vmm.shutdown"),
    (
        "snapshot",
        "Create a snapshot from VM",
        "PUT",
        "vm.snapshot",
    ),
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
    /// A subcommand argument that cannot be turned into a request body.
    #[error("invalid {command} argument \"{value}\": {reason}")]
    InvalidArgument {
        command: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot encode the request body: {0}")]
    Encode(#[source] serde_json::Error),
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
        let value = |help: &'static str| {
            Arg::new("value")
                .index(1)
                .required(true)
                .value_name("config")
                .help(help)
        };
        command = match *name {
            "create" => command.arg(
                Arg::new("path")
                    .index(1)
                    .default_value("-")
                    .help("VmConfig JSON file; - reads standard input"),
            ),
            // The same syntax as the cloud-hypervisor binary's --disk, --net, ... flags.
            "add-disk" => command.arg(value(
                "path=<disk_image_path>[,readonly=on|off][,direct=on|off][,id=<device_id>]...",
            )),
            "add-net" => command.arg(value(
                "tap=<if_name>|fd=<fd1>|fd=[<fd1>][,mac=<guest_mac>][,ip=..][,mask=..][,mtu=..]\
                 [,id=<device_id>]... (fd: a TAP descriptor of this process, passed to the VMM)",
            )),
            "add-pmem" => command.arg(value(
                "file=<backing_file_path>[,size=<persistent_memory_size>]\
                 [,discard_writes=on|off][,id=<device_id>]...",
            )),
            "add-fs" => command.arg(value(
                "tag=<tag_name>,socket=<socket_path>[,num_queues=<n>][,queue_size=<size>]\
                 [,id=<device_id>]...",
            )),
            "add-vsock" => command.arg(value(
                "cid=<context_id>,socket=<socket_path>[,id=<device_id>]...",
            )),
            "remove-device" => command.arg(value("<device_id>")),
            "snapshot" => command.arg(value("<destination_url> (file:///path/to/dir)")),
            "restore" => command.arg(value(
                "source_url=<source_url>[,prefault=on|off][,resume=on|off]",
            )),
            "send-migration" => command
                .arg(value(
                    "destination_url=<destination_url>[,downtime_ms=<ms>][,local=on|off], \
                     or <destination_url> (tcp:<host>:<port> or unix:<path>)",
                ))
                .arg(
                    Arg::new("local")
                        .long("local")
                        .action(ArgAction::SetTrue)
                        .help("Same-host migration (local=on)"),
                )
                .arg(tls_dir_arg())
                .arg(insecure_plaintext_arg())
                .arg(no_progress_arg()),
            "receive-migration" => command
                .arg(value(
                    "receiver_url=<receiver_url>, or <receiver_url> (tcp:<addr>:<port> or unix:<path>)",
                ))
                .arg(
                    Arg::new("disk-path")
                        .long("disk-path")
                        .value_name("PATH")
                        .action(ArgAction::Append)
                        .value_parser(clap::value_parser!(PathBuf))
                        .help(
                            "This host's image for each disk of the VM, in order (the source's \
                             paths are never opened here)",
                        ),
                )
                .arg(
                    Arg::new("tap")
                        .long("tap")
                        .value_name("NAME")
                        .action(ArgAction::Append)
                        .help(
                            "This host's TAP for each network interface of the VM, in order",
                        ),
                )
                .arg(tls_dir_arg())
                .arg(insecure_plaintext_arg()),
            "enable-ft" => enable_ft_args(command).arg(no_progress_arg()),
            "receive-ft" => receive_ft_args(command),
            "resize" => resize_args(command),
            "ft-status" => command
                .arg(
                    Arg::new("json")
                        .long("json")
                        .action(ArgAction::SetTrue)
                        .help("The FtStatus JSON even on a terminal"),
                )
                .arg(
                    Arg::new("summary")
                        .long("summary")
                        .action(ArgAction::SetTrue)
                        .conflicts_with("json")
                        .help("The summary even when stdout is not a terminal"),
                ),
            _ => command,
        };
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
                _ => eprintln!("{}", one_line(&e.to_string())),
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
    let body = match request_body(name, sub) {
        Ok(body) => body,
        Err(e) => return fail(&e),
    };
    let result = match name {
        "add-net" => match add_net_fds(sub) {
            Ok(fds) => run_with_fds(socket, method, endpoint, body.as_deref(), &fds),
            Err(e) => Err(e),
        },
        "add-disk" | "add-fs" | "add-pmem" | "add-vsock" => {
            run_with_fds(socket, method, endpoint, body.as_deref(), &[])
        }
        "ft-status" => {
            let json = sub.get_flag("json")
                || (!sub.get_flag("summary") && !std::io::stdout().is_terminal());
            ft_status(socket, json)
        }
        "enable-ft" | "send-migration" if !sub.get_flag("no-progress") => {
            with_progress(socket, name, || {
                run(socket, method, endpoint, body.as_deref())
            })
        }
        _ => run(socket, method, endpoint, body.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Http(ClientError::Connect { source, .. })) => {
            eprintln!("Error opening HTTP socket: {source}");
            ExitCode::FAILURE
        }
        Err(e) => fail(&e),
    }
}

/// A clap error as one line: its first line, plus the indented lines right after it that
/// say which argument or value it is about ("the following required arguments were not
/// provided:" / "  --peer <HOST:PORT>"), without the usage and tips that follow.
fn one_line(text: &str) -> String {
    let mut lines = text.lines();
    let mut out = lines
        .next()
        .unwrap_or("error: invalid arguments")
        .to_string();
    for line in lines {
        if line.trim().is_empty() || !line.starts_with(char::is_whitespace) {
            break;
        }
        out.push(' ');
        out.push_str(line.trim());
    }
    out
}

/// The VMM refuses longer epochs (400); checked here too so the mistake is caught at once.
const MAX_EPOCH_MS: u64 = 1000;

/// `--fencing etcd://HOST:PORT[,...]`: fencing on etcd instead of the witness.
fn fencing_arg() -> Arg {
    Arg::new("fencing")
        .long("fencing")
        .value_name("etcd://HOST:PORT[,HOST:PORT...]")
        .value_parser(etcd_spec)
        .conflicts_with("witness")
        .help(
            "Fence on etcd: the primary holds a lease-bound key per pair (TLS with --tls-dir); \
             the backup takes over only once the lease expired",
        )
}

/// `etcd://HOST:PORT[,HOST:PORT...]`, each endpoint checked as `--peer` is.
fn etcd_spec(value: &str) -> Result<String, String> {
    let Some(endpoints) = value.strip_prefix("etcd://") else {
        return Err(format!(
            "\"{value}\" must be etcd://HOST:PORT[,HOST:PORT...]"
        ));
    };
    for endpoint in endpoints.split(',') {
        host_port(endpoint)?;
    }
    Ok(value.to_string())
}

/// `--tls-dir DIR`: mutual TLS credentials for a channel between hosts.
fn tls_dir_arg() -> Arg {
    Arg::new("tls-dir")
        .long("tls-dir")
        .value_name("DIR")
        .value_parser(clap::value_parser!(PathBuf))
        .help(
            "Mutual TLS credentials: ca-cert.pem, server-cert.pem, server-key.pem, \
             client-cert.pem, client-key.pem (QEMU's x509 layout)",
        )
}

/// `--insecure-plaintext`: the explicit opt-out of TLS.
fn insecure_plaintext_arg() -> Arg {
    Arg::new("insecure-plaintext")
        .long("insecure-plaintext")
        .action(ArgAction::SetTrue)
        .conflicts_with("tls-dir")
        .help("UNSAFE: plain TCP; anyone who reaches the port is trusted with the VM")
}

fn enable_ft_args(command: Command) -> Command {
    command
        .arg(tls_dir_arg())
        .arg(insecure_plaintext_arg())
        .arg(fencing_arg())
        .arg(
            Arg::new("peer")
                .long("peer")
                .required(true)
                .value_name("HOST:PORT")
                .value_parser(host_port)
                .help("The backup's address (its receive-ft listener); tcp:HOST:PORT works too"),
        )
        .arg(
            Arg::new("epoch-ms")
                .long("epoch-ms")
                .value_name("MS")
                .value_parser(|v: &str| millis(v, MAX_EPOCH_MS))
                .help(format!(
                    "Epoch length in milliseconds, 1 to {MAX_EPOCH_MS} (default {})",
                    vmm::control::DEFAULT_EPOCH_MS
                )),
        )
        .arg(
            Arg::new("disk-mode")
                .long("disk-mode")
                .value_name("MODE")
                .value_parser(PossibleValuesParser::new(["replicated", "shared"]))
                .help(
                    "replicated: each host has its own image (default); \
                     shared: one image both hosts reach",
                ),
        )
        .arg(
            Arg::new("heartbeat-timeout-ms")
                .long("heartbeat-timeout-ms")
                .value_name("MS")
                .value_parser(|v: &str| millis(v, u64::MAX))
                .help("Missed-heartbeat timeout (default: five epochs, at least 100 ms)"),
        )
        .arg(
            Arg::new("witness")
                .long("witness")
                .value_name("HOST:PORT")
                .value_parser(host_port)
                .help("Fencing witness both hosts ask before taking over or going on alone"),
        )
        .arg(
            Arg::new("compress")
                .long("compress")
                .action(ArgAction::SetTrue)
                .conflicts_with("no-compress")
                .help("LZ4-compress dirty pages: for a replication link slower than about 1 GbE"),
        )
        .arg(
            Arg::new("no-compress")
                .long("no-compress")
                .action(ArgAction::SetTrue)
                .help("Send dirty pages uncompressed (the default; kept for older scripts)"),
        )
        .arg(
            Arg::new("no-hot-pages")
                .long("no-hot-pages")
                .action(ArgAction::SetTrue)
                .help(
                    "Write-protect every dirty page at each checkpoint (by default pages the \
                     guest keeps rewriting stay writable and are compared instead)",
                ),
        )
        .arg(
            Arg::new("no-early-send")
                .long("no-early-send")
                .action(ArgAction::SetTrue)
                .help(
                    "Send the early-staged pages in the pause (by default they leave at once, \
                     while the guest still runs)",
                ),
        )
        .arg(
            Arg::new("no-early-staging")
                .long("no-early-staging")
                .action(ArgAction::SetTrue)
                .help(
                    "Copy every dirty page in the pause (by default most are copied into \
                     staging while the guest still runs, three quarters into the epoch)",
                ),
        )
        .arg(
            Arg::new("no-stage-helper")
                .long("no-stage-helper")
                .action(ArgAction::SetTrue)
                .help(
                    "Stage each checkpoint on the control loop alone (by default a helper \
                     thread shares the compares and copies while the guest is paused)",
                ),
        )
        .arg(
            Arg::new("latency-mode")
                .long("latency-mode")
                .action(ArgAction::SetTrue)
                .help(
                    "End an epoch early once the guest has output waiting and the dirty set is \
                     small (more, shorter checkpoints; less added latency)",
                ),
        )
        .arg(
            Arg::new("encode-threads")
                .long("encode-threads")
                .value_name("N")
                .value_parser(
                    clap::value_parser!(u32).range(0..=i64::from(ft::primary::MAX_ENCODE_THREADS)),
                )
                .help(
                    "Threads encoding each epoch's pages while the sender writes (0: the sender \
                     encodes; default: the cores left after the vCPUs and the sender, at most 4)",
                ),
        )
        .arg(
            Arg::new("streams")
                .long("streams")
                .value_name("N")
                .value_parser(
                    clap::value_parser!(u32).range(1..=i64::from(ft::primary::MAX_STREAMS)),
                )
                .conflicts_with("encode-threads")
                .help(
                    "TCP connections to the backup (default 1); with more, each epoch's pages \
                     travel on the others, each encoded and written by a thread of its own",
                ),
        )
        .arg(
            Arg::new("no-resend-output")
                .long("no-resend-output")
                .action(ArgAction::SetTrue)
                .help(
                    "Do not copy each epoch's held network output to the backup (by default a \
                     backup that takes over sends what the dead primary may still have held)",
                ),
        )
        .arg(
            Arg::new("no-early-acks")
                .long("no-early-acks")
                .action(ArgAction::SetTrue)
                .help(
                    "Hold the guest's TCP ACKs until their epoch commits (by default input is \
                     mirrored to the backup as it arrives and pure ACKs leave once it holds it)",
                ),
        )
        .arg(group_arg(
            "Fate sharing: join (or create) the FT group named by this Unix socket path; \
             members fail over together",
        ))
}

/// `--group PATH` for enable-ft and receive-ft.
fn group_arg(help: &'static str) -> Arg {
    Arg::new("group")
        .long("group")
        .value_name("PATH")
        .value_parser(group_path)
        .help(help)
}

/// A Unix socket path (the kernel limits it to 107 bytes).
fn group_path(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("expected the path of the group's Unix socket".into());
    }
    if value.len() > 107 {
        return Err(format!(
            "a Unix socket path has at most 107 bytes; this one has {}",
            value.len()
        ));
    }
    Ok(value.to_string())
}

fn receive_ft_args(command: Command) -> Command {
    command
        .arg(tls_dir_arg())
        .arg(insecure_plaintext_arg())
        .arg(fencing_arg())
        .arg(
            Arg::new("receiver_url")
                .index(1)
                .required(true)
                .value_name("receiver_url")
                .value_parser(receive_ft_url)
                .help("Where to wait for the primary: tcp:<addr>:<port>, or receiver_url=tcp:..."),
        )
        .arg(
            Arg::new("disk-path")
                .long("disk-path")
                .value_name("PATH")
                .action(ArgAction::Append)
                .value_parser(clap::value_parser!(PathBuf))
                .help(
                    "This host's image of each disk of the VM, in order: its own copy \
                     (replicated mode) or the shared image as this host reaches it; the \
                     primary's paths are never opened here",
                ),
        )
        .arg(
            Arg::new("tap")
                .long("tap")
                .value_name("NAME")
                .action(ArgAction::Append)
                .help(
                    "This host's TAP for each network interface of the VM, in order (the \
                     primary's TAP names are never used here)",
                ),
        )
        .arg(
            Arg::new("witness")
                .long("witness")
                .value_name("HOST:PORT")
                .value_parser(host_port)
                .help(
                    "The fencing witness as this host reaches it; required when the primary \
                     fences with one (the primary's address is never used)",
                ),
        )
        .arg(group_arg(
            "The backups of one FT group name the same Unix socket path on their host",
        ))
}

/// A whole number of milliseconds from 1 to `max`.
fn millis(value: &str, max: u64) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(ms) if (1..=max).contains(&ms) => Ok(ms),
        _ if max == u64::MAX => Err("expected a whole number of milliseconds, at least 1".into()),
        _ => Err(format!(
            "expected a whole number of milliseconds from 1 to {max}"
        )),
    }
}

/// Checks `HOST:PORT` or `tcp:HOST:PORT` (as the VMM accepts them): a host without blanks
/// (an IPv6 address in brackets) and a port from 1 to 65535. Returns the value unchanged;
/// whether the host resolves is for the VMM to find out.
fn host_port(value: &str) -> Result<String, String> {
    let address = value.strip_prefix("tcp:").unwrap_or(value);
    if value.chars().any(char::is_whitespace) {
        return Err("expected HOST:PORT, without blanks".into());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("expected HOST:PORT".into());
    };
    if host.is_empty() || host == "[]" {
        return Err("expected HOST:PORT; the host is missing".into());
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("expected HOST:PORT; an IPv6 address goes in brackets, [ADDR]:PORT".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(value.to_string()),
        _ => Err(format!(
            "expected HOST:PORT; port \"{port}\" is not a number from 1 to 65535"
        )),
    }
}

/// `tcp:HOST:PORT` or `receiver_url=tcp:HOST:PORT` (the other options are flags).
fn receive_ft_url(value: &str) -> Result<String, String> {
    let url = value.strip_prefix("receiver_url=").unwrap_or(value);
    if url.contains(',') && url.split(',').skip(1).any(|option| option.contains('=')) {
        return Err(
            "receive-ft takes only receiver_url=...; give --disk-path, --tap and --witness as flags"
                .into(),
        );
    }
    let Some(address) = url.strip_prefix("tcp:") else {
        return Err(format!("receiver_url \"{url}\" must be tcp:HOST:PORT"));
    };
    if address.starts_with("tcp:") {
        return Err(format!("receiver_url \"{url}\" must be tcp:HOST:PORT"));
    }
    host_port(address)
        .map(|_| url.to_string())
        .map_err(|e| format!("receiver_url {e}"))
}

/// `enable-ft --peer HOST:PORT [...]`: flags already checked by clap.
fn enable_ft_request(sub: &ArgMatches) -> Result<EnableFtRequest, Error> {
    // The VMM's defaults for what is not given (as the API applies them).
    let defaults: EnableFtRequest =
        serde_json::from_str(r#"{"peer": ""}"#).map_err(Error::Encode)?;
    let disk_mode = match sub.get_one::<String>("disk-mode") {
        Some(mode) => serde_json::from_value::<FtDiskMode>(serde_json::Value::String(mode.clone()))
            .map_err(|e| invalid("enable-ft", mode, e))?,
        None => defaults.disk_mode,
    };
    Ok(EnableFtRequest {
        peer: sub.get_one::<String>("peer").cloned().unwrap_or_default(),
        epoch_ms: sub
            .get_one::<u64>("epoch-ms")
            .copied()
            .unwrap_or(defaults.epoch_ms),
        disk_mode,
        heartbeat_timeout_ms: sub.get_one::<u64>("heartbeat-timeout-ms").copied(),
        witness: sub.get_one::<String>("witness").cloned(),
        fencing: sub.get_one::<String>("fencing").cloned(),
        compress: sub.get_flag("compress") || (defaults.compress && !sub.get_flag("no-compress")),
        hot_pages: defaults.hot_pages && !sub.get_flag("no-hot-pages"),
        stage_helper: defaults.stage_helper && !sub.get_flag("no-stage-helper"),
        early_staging: defaults.early_staging && !sub.get_flag("no-early-staging"),
        early_send: defaults.early_send && !sub.get_flag("no-early-send"),
        early_acks: defaults.early_acks && !sub.get_flag("no-early-acks"),
        resend_output: defaults.resend_output && !sub.get_flag("no-resend-output"),
        latency_mode: sub.get_flag("latency-mode"),
        encode_threads: sub.get_one::<u32>("encode-threads").copied(),
        streams: sub.get_one::<u32>("streams").copied(),
        group: sub.get_one::<String>("group").cloned(),
        tls_dir: sub.get_one::<PathBuf>("tls-dir").cloned(),
        insecure_plaintext: sub.get_flag("insecure-plaintext"),
    })
}

/// `receive-ft tcp:HOST:PORT [--disk-path PATH]... [--tap NAME]... [--witness HOST:PORT]`.
fn receive_ft_request(sub: &ArgMatches) -> ReceiveFtRequest {
    ReceiveFtRequest {
        receiver_url: sub
            .get_one::<String>("receiver_url")
            .cloned()
            .unwrap_or_default(),
        disk_paths: sub
            .get_many::<PathBuf>("disk-path")
            .map(|paths| paths.cloned().collect())
            .unwrap_or_default(),
        taps: sub
            .get_many::<String>("tap")
            .map(|taps| taps.cloned().collect())
            .unwrap_or_default(),
        witness: sub.get_one::<String>("witness").cloned(),
        fencing: sub.get_one::<String>("fencing").cloned(),
        group: sub.get_one::<String>("group").cloned(),
        tls_dir: sub.get_one::<PathBuf>("tls-dir").cloned(),
        insecure_plaintext: sub.get_flag("insecure-plaintext"),
    }
}

/// The JSON body of subcommand `name`, if it takes one.
fn request_body(name: &str, sub: &ArgMatches) -> Result<Option<String>, Error> {
    // Only the subcommands that declare it have a "value" argument.
    let value = sub
        .try_get_one::<String>("value")
        .ok()
        .flatten()
        .map_or("", String::as_str);
    let json = match name {
        "create" => {
            let path = sub.get_one::<String>("path").map_or("-", String::as_str);
            return read_config(path).map(Some);
        }
        "snapshot" => serde_json::to_string(&snapshot_request(value)?),
        "restore" => serde_json::to_string(&restore_request(value)?),
        "send-migration" => {
            let mut request = send_migration_request(value, sub.get_flag("local"))?;
            let security =
                channel_security(sub, request.tls_dir.take(), request.insecure_plaintext);
            (request.tls_dir, request.insecure_plaintext) = security?;
            serde_json::to_string(&request)
        }
        "receive-migration" => {
            let mut request = receive_migration_request(value)?;
            let security =
                channel_security(sub, request.tls_dir.take(), request.insecure_plaintext);
            (request.tls_dir, request.insecure_plaintext) = security?;
            request.disk_paths = sub
                .get_many::<PathBuf>("disk-path")
                .map(|paths| paths.cloned().collect())
                .unwrap_or_default();
            request.taps = sub
                .get_many::<String>("tap")
                .map(|taps| taps.cloned().collect())
                .unwrap_or_default();
            serde_json::to_string(&request)
        }
        "enable-ft" => serde_json::to_string(&enable_ft_request(sub)?),
        "receive-ft" => serde_json::to_string(&receive_ft_request(sub)),
        "resize" => serde_json::to_string(&resize_request(sub)?),
        "add-disk" => serde_json::to_string(&device_config("add-disk", value, cli::parse_disk)?),
        "add-net" => serde_json::to_string(&add_net_request(value)?.0),
        "add-pmem" => serde_json::to_string(&device_config("add-pmem", value, cli::parse_pmem)?),
        "add-fs" => serde_json::to_string(&device_config("add-fs", value, cli::parse_fs)?),
        "add-vsock" => serde_json::to_string(&device_config("add-vsock", value, cli::parse_vsock)?),
        "remove-device" => serde_json::to_string(&RemoveDeviceRequest {
            id: value.to_string(),
        }),
        _ => return Ok(None),
    };
    json.map(Some).map_err(Error::Encode)
}

/// A device configuration in the cloud-hypervisor binary's syntax (its `--disk`, `--net`, ...
/// parser), errors naming the subcommand instead of the flag. Only the syntax is checked here;
/// the VMM judges the values.
fn device_config<T>(
    command: &'static str,
    value: &str,
    parse: fn(&str) -> Result<T, CliError>,
) -> Result<T, Error> {
    parse(value).map_err(|e| {
        let reason = match e {
            CliError::InvalidValue { reason, .. } => reason,
            CliError::UnsupportedOption { what, .. } => format!("{what} is not supported yet"),
            other => other.to_string(),
        };
        invalid(command, value, reason)
    })
}

/// `add-net`: the NetConfig body and the descriptors to pass. As Cloud Hypervisor's ch-remote,
/// `fd=[...]` names descriptors of this process: they travel with the request (SCM_RIGHTS),
/// and the body leaves their numbers out, which would mean nothing in the VMM.
fn add_net_request(value: &str) -> Result<(NetConfig, Vec<RawFd>), Error> {
    let mut config = device_config("add-net", value, cli::parse_net)?;
    let fds = config.fds.take().unwrap_or_default();
    Ok((config, fds))
}

/// The descriptors `add-net` passes, each checked to be open in this process.
fn add_net_fds(sub: &ArgMatches) -> Result<Vec<RawFd>, Error> {
    let value = sub.get_one::<String>("value").map_or("", String::as_str);
    let (_, fds) = add_net_request(value)?;
    for &fd in &fds {
        // SAFETY: F_GETFD on a descriptor number; no memory involved, and a number that is
        // not open only fails with EBADF.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(invalid(
                "add-net",
                value,
                format!("fd {fd} is not an open descriptor of ch-remote"),
            ));
        }
    }
    Ok(fds)
}

/// Whether `value` is written `key=...` with one of `keys` (Cloud Hypervisor's option
/// syntax) rather than as a bare URL.
fn is_keyed(value: &str, keys: &[&str]) -> bool {
    let value = value.trim_start();
    keys.iter().any(|key| {
        value
            .strip_prefix(key)
            .is_some_and(|rest| rest.starts_with('='))
    })
}

/// Parses `key=value,...` with `keys`, naming `command` and the value in any error.
fn parse_options(command: &'static str, value: &str, keys: &[&str]) -> Result<OptionParser, Error> {
    let mut parser = OptionParser::new();
    for key in keys {
        parser.add(key);
    }
    parser
        .parse(value)
        .map_err(|e| invalid(command, value, e))?;
    Ok(parser)
}

fn convert<T: OptionValue>(
    parser: &OptionParser,
    command: &'static str,
    value: &str,
    key: &str,
) -> Result<Option<T>, Error> {
    parser
        .convert::<T>(key)
        .map_err(|e| invalid(command, value, e))
}

fn invalid(command: &'static str, value: &str, reason: impl ToString) -> Error {
    Error::InvalidArgument {
        command,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// The URL under `key` (keyed form) or the whole value (bare form), checked to be non-empty,
/// free of blanks and to start with one of `schemes`.
fn url(
    command: &'static str,
    value: &str,
    parser: Option<&OptionParser>,
    key: &str,
    schemes: &[&str],
) -> Result<String, Error> {
    let url = match parser {
        Some(parser) => parser.get(key).unwrap_or_default(),
        None => value.trim(),
    };
    if parser.is_none() {
        if let Some((_, rest)) = url.split_once(',') {
            if rest.split(',').any(|option| option.contains('=')) {
                return Err(invalid(
                    command,
                    value,
                    format!("options need the {key}=<url>,<option>=<value> form"),
                ));
            }
        }
    }
    let expected = || {
        schemes
            .iter()
            .map(|s| format!("{s}..."))
            .collect::<Vec<_>>()
            .join(" or ")
    };
    if url.is_empty() {
        return Err(invalid(
            command,
            value,
            format!("{key} is required ({})", expected()),
        ));
    }
    if url.chars().any(char::is_whitespace) {
        return Err(invalid(
            command,
            value,
            format!("{key} must not contain blanks"),
        ));
    }
    match schemes.iter().find(|s| url.starts_with(*s)) {
        Some(scheme) if url.len() > scheme.len() => Ok(url.to_string()),
        Some(_) => Err(invalid(
            command,
            value,
            format!("{key} {url:?} lacks an address after the scheme"),
        )),
        None => Err(invalid(
            command,
            value,
            format!("{key} {url:?} must be {}", expected()),
        )),
    }
}

const SNAPSHOT_SCHEMES: &[&str] = &["file://"];
const MIGRATION_SCHEMES: &[&str] = &["tcp:", "unix:"];

/// `snapshot <destination_url>` or `snapshot destination_url=<destination_url>`.
fn snapshot_request(value: &str) -> Result<SnapshotRequest, Error> {
    const COMMAND: &str = "snapshot";
    const KEYS: &[&str] = &["destination_url"];
    let parser = is_keyed(value, KEYS)
        .then(|| parse_options(COMMAND, value, KEYS))
        .transpose()?;
    Ok(SnapshotRequest {
        destination_url: url(COMMAND, value, parser.as_ref(), KEYS[0], SNAPSHOT_SCHEMES)?,
    })
}

/// `restore source_url=<url>[,prefault=on|off][,resume=on|off]` or `restore <url>`.
fn restore_request(value: &str) -> Result<RestoreRequest, Error> {
    const COMMAND: &str = "restore";
    const KEYS: &[&str] = &["source_url", "prefault", "resume"];
    let parser = is_keyed(value, KEYS)
        .then(|| parse_options(COMMAND, value, KEYS))
        .transpose()?;
    let flag = |key: &str| match &parser {
        Some(parser) => convert::<bool>(parser, COMMAND, value, key).map(Option::unwrap_or_default),
        None => Ok(false),
    };
    Ok(RestoreRequest {
        source_url: url(COMMAND, value, parser.as_ref(), KEYS[0], SNAPSHOT_SCHEMES)?,
        prefault: flag("prefault")?,
        resume: flag("resume")?,
    })
}

/// The channel's security from the keyed value (`tls_dir=`, `insecure_plaintext=`) and the
/// flags (`--tls-dir`, `--insecure-plaintext`); one way of giving each.
fn channel_security(
    sub: &ArgMatches,
    key_dir: Option<PathBuf>,
    key_plaintext: bool,
) -> Result<(Option<PathBuf>, bool), Error> {
    let flag_dir = sub.get_one::<PathBuf>("tls-dir").cloned();
    if key_dir.is_some() && flag_dir.is_some() {
        return Err(invalid(
            "migration",
            "tls_dir",
            "give tls_dir= or --tls-dir, not both",
        ));
    }
    Ok((
        key_dir.or(flag_dir),
        key_plaintext || sub.get_flag("insecure-plaintext"),
    ))
}

/// `send-migration destination_url=<url>[,downtime_ms=<ms>][,local=on|off]`, or the older
/// `send-migration [--local] <url>`.
fn send_migration_request(value: &str, local_flag: bool) -> Result<SendMigrationRequest, Error> {
    const COMMAND: &str = "send-migration";
    // `downtime` is the spelling of the API body's alias.
    const KEYS: &[&str] = &[
        "destination_url",
        "downtime_ms",
        "downtime",
        "local",
        "tls_dir",
        "insecure_plaintext",
    ];
    let defaults: SendMigrationRequest =
        serde_json::from_str(r#"{"destination_url": ""}"#).map_err(Error::Encode)?;
    let Some(parser) = is_keyed(value, KEYS)
        .then(|| parse_options(COMMAND, value, KEYS))
        .transpose()?
    else {
        return Ok(SendMigrationRequest {
            destination_url: url(COMMAND, value, None, KEYS[0], MIGRATION_SCHEMES)?,
            local: local_flag,
            ..defaults
        });
    };
    let downtime_ms = convert::<u64>(&parser, COMMAND, value, "downtime_ms")?;
    let downtime = convert::<u64>(&parser, COMMAND, value, "downtime")?;
    if downtime_ms.is_some() && downtime.is_some() {
        return Err(invalid(
            COMMAND,
            value,
            "give downtime_ms or downtime, not both",
        ));
    }
    let local = match (
        convert::<bool>(&parser, COMMAND, value, "local")?,
        local_flag,
    ) {
        (Some(false), true) => {
            return Err(invalid(COMMAND, value, "local=off contradicts --local"));
        }
        (local, flag) => local.unwrap_or(false) || flag,
    };
    Ok(SendMigrationRequest {
        destination_url: url(COMMAND, value, Some(&parser), KEYS[0], MIGRATION_SCHEMES)?,
        local,
        downtime_ms: downtime_ms.or(downtime).unwrap_or(defaults.downtime_ms),
        tls_dir: convert::<String>(&parser, COMMAND, value, "tls_dir")?.map(PathBuf::from),
        insecure_plaintext: convert::<bool>(&parser, COMMAND, value, "insecure_plaintext")?
            .unwrap_or(false),
    })
}

/// `receive-migration receiver_url=<url>` or `receive-migration <url>`.
fn receive_migration_request(value: &str) -> Result<ReceiveMigrationRequest, Error> {
    const COMMAND: &str = "receive-migration";
    const KEYS: &[&str] = &["receiver_url", "tls_dir", "insecure_plaintext"];
    let parser = is_keyed(value, KEYS)
        .then(|| parse_options(COMMAND, value, KEYS))
        .transpose()?;
    let (tls_dir, insecure_plaintext) = match &parser {
        Some(parser) => (
            convert::<String>(parser, COMMAND, value, "tls_dir")?.map(PathBuf::from),
            convert::<bool>(parser, COMMAND, value, "insecure_plaintext")?.unwrap_or(false),
        ),
        None => (None, false),
    };
    Ok(ReceiveMigrationRequest {
        receiver_url: url(COMMAND, value, parser.as_ref(), KEYS[0], MIGRATION_SCHEMES)?,
        disk_paths: Vec::new(),
        taps: Vec::new(),
        tls_dir,
        insecure_plaintext,
    })
}

/// `resize --cpus N --memory SIZE --balloon SIZE` (Cloud Hypervisor's flags; sizes in bytes
/// with an optional K/M/G suffix). Flags left out stay out of the body.
fn resize_args(command: Command) -> Command {
    command
        .arg(
            Arg::new("cpus")
                .long("cpus")
                .value_name("N")
                .value_parser(clap::value_parser!(u32))
                .help("New vCPUs count"),
        )
        .arg(
            Arg::new("memory")
                .long("memory")
                .value_name("SIZE")
                .help("New memory size in bytes (supports K/M/G suffix)"),
        )
        .arg(
            Arg::new("balloon")
                .long("balloon")
                .value_name("SIZE")
                .help("New balloon size in bytes (supports K/M/G suffix)"),
        )
}

fn resize_request(sub: &ArgMatches) -> Result<VmResizeRequest, Error> {
    let size = |flag: &'static str| -> Result<Option<u64>, Error> {
        sub.get_one::<String>(flag)
            .map(|value| {
                ByteSize::parse_option(value)
                    .map(|ByteSize(bytes)| bytes)
                    .map_err(|reason| invalid("resize", value, format!("--{flag}: {reason}")))
            })
            .transpose()
    };
    Ok(VmResizeRequest {
        desired_vcpus: sub.get_one::<u32>("cpus").copied(),
        desired_ram: size("memory")?,
        desired_balloon: size("balloon")?,
    })
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

/// A hot-plug request, with `fds` passed along (SCM_RIGHTS). The answer (`PciDeviceInfo`) is
/// printed as the VMM sent it, as Cloud Hypervisor's ch-remote does; before boot there is none.
fn run_with_fds(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    fds: &[RawFd],
) -> Result<(), Error> {
    // SAFETY: each descriptor was checked open (`add_net_fds`) and nothing in this process
    // closes it before the request is sent.
    let borrowed: Vec<BorrowedFd<'_>> = fds
        .iter()
        .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
        .collect();
    let response =
        client::request_with_fds(socket, method, endpoint, body, &borrowed).map_err(Error::Http)?;
    if !response.is_success() {
        return Err(Error::Server(response));
    }
    if !response.body.is_empty() {
        println!("{}", response.body);
    }
    Ok(())
}

fn no_progress_arg() -> Arg {
    Arg::new("no-progress")
        .long("no-progress")
        .action(ArgAction::SetTrue)
        .help("Show no progress while waiting")
}

/// How often the progress is read while a transfer runs.
const PROGRESS_POLL: Duration = Duration::from_millis(250);
/// Without a terminal, a plain progress line at most this often.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Runs `wait` (the request that returns when the transfer is over) while a second thread
/// shows the transfer's progress on stderr.
fn with_progress(
    socket: &Path,
    command: &str,
    wait: impl FnOnce() -> Result<(), Error>,
) -> Result<(), Error> {
    // Dropping `done` ends the watcher at once (it must not delay our exit by a poll period:
    // scripts act on the transfer's end as soon as the command returns).
    let (done, finished) = mpsc::channel::<()>();
    let terminal = std::io::stderr().is_terminal();
    let watcher = {
        let socket = socket.to_path_buf();
        let command = command.to_string();
        std::thread::spawn(move || watch_progress(&socket, &command, terminal, &finished))
    };
    let result = wait();
    drop(done);
    let last = watcher.join().ok().flatten();
    if terminal {
        // Replace the redrawn line with how it ended.
        let mut line = String::from("\r\x1b[2K");
        if let (Ok(()), Some(report)) = (&result, last) {
            line.push_str(&format!(
                "{command}: done in {:.1} s, {} sent\n",
                report.elapsed_ms as f64 / 1000.0,
                human_bytes(report.bytes)
            ));
        }
        eprint!("{line}");
    }
    result
}

/// Polls `vm.progress` until `finished` disconnects; returns the last report of this transfer.
fn watch_progress(
    socket: &Path,
    command: &str,
    terminal: bool,
    finished: &mpsc::Receiver<()>,
) -> Option<ProgressReport> {
    let started = Instant::now();
    let mut last_plain: Option<Instant> = None;
    let mut last = None;
    while let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(PROGRESS_POLL) {
        let Ok(response) = client::request(socket, "GET", "vm.progress", None) else {
            continue;
        };
        let Ok(report) = serde_json::from_str::<ProgressReport>(&response.body) else {
            continue;
        };
        // A report from an earlier transfer is older than this command.
        if Duration::from_millis(report.elapsed_ms) > started.elapsed() + PROGRESS_POLL {
            continue;
        }
        let line = progress_line(command, &report);
        if terminal {
            eprint!("\r\x1b[2K{line}");
        } else if last_plain.is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY) {
            eprintln!("{line}");
            last_plain = Some(Instant::now());
        }
        last = Some(report);
    }
    last
}

/// One line: `enable-ft: copying, pass 1: 12000/32768 pages (36%), 47.0 MiB sent at
/// 120.3 MiB/s, about 1 s left`.
fn progress_line(command: &str, r: &ProgressReport) -> String {
    let phase = serde_json::to_value(r.phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut line = format!("{command}: {phase}");
    if r.pass > 0 {
        let percent = (r.pages_done * 100)
            .checked_div(r.pages_total)
            .unwrap_or(100);
        line.push_str(&format!(
            ", pass {}: {}/{} pages ({percent}%)",
            r.pass, r.pages_done, r.pages_total
        ));
    }
    line.push_str(&format!(
        ", {} sent at {}/s",
        human_bytes(r.bytes),
        human_bytes(r.rate_bytes_per_s)
    ));
    if let Some(eta) = r.eta_ms {
        line.push_str(&format!(", about {} s left", eta.div_ceil(1000)));
    }
    if let Some(error) = &r.error {
        line.push_str(&format!(": {error}"));
    }
    line
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `ft-status`: the JSON (for tools), or a short summary for a person at a terminal.
fn ft_status(socket: &Path, json: bool) -> Result<(), Error> {
    if json {
        return run(socket, "GET", "vm.ft-status", None);
    }
    let response = client::request(socket, "GET", "vm.ft-status", None).map_err(Error::Http)?;
    if !response.is_success() {
        return Err(Error::Server(response));
    }
    match serde_json::from_str::<FtStatus>(&response.body) {
        Ok(status) => print!("{}", ft_summary(&status)),
        // A newer VMM's status this ch-remote cannot read: show it as it came.
        Err(_) => println!("{}", response.body),
    }
    Ok(())
}

/// An enum value as serde spells it, with spaces for underscores (`took over`).
fn words(value: serde_json::Result<serde_json::Value>) -> String {
    value
        .ok()
        .and_then(|v| v.as_str().map(|s| s.replace('_', " ")))
        .unwrap_or_else(|| "?".into())
}

fn micros(us: u64) -> String {
    if us >= 1000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} us")
    }
}

/// What `ft-status` shows a person: role, health (and what it means), peer, lag, the last
/// pause, the last failover.
fn ft_summary(s: &FtStatus) -> String {
    let mut out = String::new();
    let mut row = |name: &str, value: String| {
        out.push_str(&format!("{name:<12} {value}\n"));
    };
    row("role:", words(serde_json::to_value(s.role)));
    row(
        "health:",
        format!(
            "{} ({})",
            words(serde_json::to_value(s.health)),
            health_meaning(s.health)
        ),
    );
    if let Some(sync) = &s.sync {
        row("sync:", progress_line("enable-ft", sync));
    }
    if s.role == FtRole::None && s.health == FtHealth::Off {
        return out;
    }
    if let Some(peer) = &s.peer {
        row("peer:", peer.clone());
    }
    if s.epoch_ms > 0 {
        let epoch = match s.role {
            FtRole::Backup => format!("{} received ({} ms epochs)", s.epoch, s.epoch_ms),
            _ => format!(
                "{} running, {} committed, lag {} ({} ms epochs)",
                s.epoch, s.last_committed_epoch, s.lag_epochs, s.epoch_ms
            ),
        };
        row("epoch:", epoch);
    }
    if s.role == FtRole::Primary && s.pause_us_p50 > 0 {
        row(
            "last pause:",
            format!(
                "{} (p50 {}, p99 {}, max {})",
                micros(s.pause_us_last),
                micros(s.pause_us_p50),
                micros(s.pause_us_p99),
                micros(s.pause_us_max)
            ),
        );
        if s.commit_us_p50 > 0 {
            row(
                "commit:",
                format!(
                    "p50 {}, p99 {} after the checkpoint (sending p50 {}, p99 {})",
                    micros(s.commit_us_p50),
                    micros(s.commit_us_p99),
                    micros(s.send_us_p50),
                    micros(s.send_us_p99)
                ),
            );
        }
        if s.input_frames_mirrored > 0 {
            row(
                "input:",
                format!(
                    "{} frames mirrored, held by the backup p50 {}, p99 {} after delivery; {} ACKs left early",
                    s.input_frames_mirrored,
                    micros(s.input_mirror_us_p50),
                    micros(s.input_mirror_us_p99),
                    s.acks_released_early
                ),
            );
        }
        row(
            "output:",
            format!(
                "{} packets held, {} released, {} disk writes held",
                s.held_packets, s.released_packets, s.held_disk_writes
            ),
        );
    }
    if s.bytes > 0 {
        row("replicated:", human_bytes(s.bytes));
    }
    if let Some(mode) = &s.disk_mode {
        row("disks:", words(serde_json::to_value(mode)));
    }
    row("fencing:", s.fencing.clone());
    if let Some(group) = &s.group {
        row(
            "group:",
            format!(
                "{group}, {} members, group epoch {}",
                s.group_members, s.group_epoch
            ),
        );
    }
    let failover = match s.last_failover_ms {
        Some(ms) => format!("{} (the last took {ms} ms)", s.failovers),
        None => s.failovers.to_string(),
    };
    row("failovers:", failover);
    if let Some(error) = &s.last_error {
        row("last error:", error.clone());
    }
    out
}

/// One phrase per health state, and what to do about it (the runbook has more).
fn health_meaning(health: FtHealth) -> &'static str {
    match health {
        FtHealth::Off => "not protected: protect it with enable-ft",
        FtHealth::Syncing => "initial synchronisation with the backup is running",
        FtHealth::Protected => "a live backup holds every committed epoch",
        FtHealth::WaitingForPrimary => "backup listening; the primary has not connected yet",
        FtHealth::Degraded => {
            "the backup is gone and the VM runs unprotected: enable-ft to a new backup"
        }
        FtHealth::Fenced => "this copy lost the right to run and is stopped: do not restart it",
        FtHealth::TookOver => {
            "this host runs the VM after a failover, unprotected: enable-ft to a new backup"
        }
        FtHealth::Failed => "the backup stopped receiving without taking over: see last error",
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ft_status_summary_reads_as_a_person_needs_it() {
        let off = ft_summary(&FtStatus::default());
        assert_eq!(
            off,
            "role:        none\nhealth:      off (not protected: protect it with enable-ft)\n"
        );
        let primary = FtStatus {
            role: FtRole::Primary,
            health: FtHealth::Degraded,
            peer: Some("10.0.0.2:7000".into()),
            disk_mode: Some(FtDiskMode::Replicated),
            epoch_ms: 10,
            fencing: "witness 10.0.0.9:7100".into(),
            epoch: 5120,
            last_committed_epoch: 5119,
            lag_epochs: 1,
            bytes: 3 << 30,
            pause_us_last: 812,
            pause_us_p50: 790,
            pause_us_p99: 2100,
            pause_us_max: 4000,
            send_us_p50: 640,
            send_us_p99: 1900,
            commit_us_p50: 1300,
            commit_us_p99: 3400,
            input_frames_mirrored: 9120,
            input_mirror_us_p50: 420,
            input_mirror_us_p99: 2600,
            acks_released_early: 3100,
            released_packets: 48210,
            last_error: Some("no heartbeat from the peer within the timeout".into()),
            ..FtStatus::default()
        };
        let text = ft_summary(&primary);
        for line in [
            "role:        primary\n",
            "health:      degraded (the backup is gone and the VM runs unprotected: enable-ft to a new backup)\n",
            "peer:        10.0.0.2:7000\n",
            "epoch:       5120 running, 5119 committed, lag 1 (10 ms epochs)\n",
            "last pause:  812 us (p50 790 us, p99 2.1 ms, max 4.0 ms)\n",
            "commit:      p50 1.3 ms, p99 3.4 ms after the checkpoint (sending p50 640 us, p99 1.9 ms)\n",
            "input:       9120 frames mirrored, held by the backup p50 420 us, p99 2.6 ms after delivery; 3100 ACKs left early\n",
            "output:      0 packets held, 48210 released, 0 disk writes held\n",
            "replicated:  3.0 GiB\n",
            "disks:       replicated\n",
            "fencing:     witness 10.0.0.9:7100\n",
            "failovers:   0\n",
            "last error:  no heartbeat from the peer within the timeout\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        let survivor = FtStatus {
            role: FtRole::Backup,
            health: FtHealth::TookOver,
            epoch_ms: 10,
            epoch: 240,
            failovers: 1,
            last_failover_ms: Some(6),
            ..FtStatus::default()
        };
        let text = ft_summary(&survivor);
        assert!(
            text.contains("health:      took over (this host runs the VM"),
            "{text}"
        );
        assert!(text.contains("epoch:       240 received"), "{text}");
        assert!(
            text.contains("failovers:   1 (the last took 6 ms)"),
            "{text}"
        );
    }

    #[test]
    fn progress_lines() {
        let mut report = ProgressReport {
            operation: vmm::progress::Operation::EnableFt,
            phase: vmm::progress::Phase::Copying,
            pass: 1,
            pages_done: 12000,
            pages_total: 32768,
            pages_sent: 12000,
            bytes: 47 << 20,
            memory_bytes: 128 << 20,
            elapsed_ms: 400,
            rate_bytes_per_s: 120 << 20,
            eta_ms: Some(600),
            error: None,
        };
        assert_eq!(
            progress_line("enable-ft", &report),
            "enable-ft: copying, pass 1: 12000/32768 pages (36%), 47.0 MiB sent at 120.0 MiB/s, about 1 s left"
        );
        report.phase = vmm::progress::Phase::Failed;
        report.eta_ms = None;
        report.error = Some("the backup closed the connection".into());
        assert!(progress_line("send-migration", &report)
            .ends_with("sent at 120.0 MiB/s: the backup closed the connection"));
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn ft_status_and_transfers_take_their_output_flags() {
        for args in [
            &["ft-status", "--json"][..],
            &["ft-status", "--summary"],
            &[
                "enable-ft",
                "--peer",
                "b:1",
                "--insecure-plaintext",
                "--no-progress",
            ],
            &[
                "send-migration",
                "tcp:b:1",
                "--insecure-plaintext",
                "--no-progress",
            ],
        ] {
            let mut argv = vec!["ch-remote", "--api-socket", "/s"];
            argv.extend_from_slice(args);
            assert!(cli().try_get_matches_from(&argv).is_ok(), "{args:?}");
        }
        let both = [
            "ch-remote",
            "--api-socket",
            "/s",
            "ft-status",
            "--json",
            "--summary",
        ];
        assert!(cli().try_get_matches_from(both).is_err());
    }

    /// The body ch-remote sends for a command line (after `ch-remote --api-socket S`).
    fn body_of(args: &[&str]) -> Result<Option<serde_json::Value>, String> {
        let mut argv = vec!["ch-remote", "--api-socket", "/s"];
        argv.extend_from_slice(args);
        let matches = cli()
            .try_get_matches_from(argv)
            .map_err(|e| e.to_string())?;
        let (name, sub) = matches.subcommand().unwrap();
        let body = request_body(name, sub).map_err(|e| e.to_string())?;
        Ok(body.map(|b| serde_json::from_str(&b).unwrap()))
    }

    fn body(args: &[&str]) -> serde_json::Value {
        body_of(args).unwrap().unwrap()
    }

    fn error(args: &[&str]) -> String {
        body_of(args).unwrap_err()
    }

    #[test]
    fn command_definition_is_consistent() {
        cli().debug_assert();
    }

    #[test]
    fn resize_forms() {
        assert_eq!(
            body(&["resize", "--cpus", "2"]),
            serde_json::json!({"desired_vcpus": 2, "desired_ram": null, "desired_balloon": null})
        );
        assert_eq!(
            body(&["resize", "--memory", "1G", "--balloon", "512M"]),
            serde_json::json!({"desired_vcpus": null, "desired_ram": 1u64 << 30,
                               "desired_balloon": 512u64 << 20})
        );
        assert_eq!(
            body(&["resize"]),
            serde_json::json!({"desired_vcpus": null, "desired_ram": null, "desired_balloon": null})
        );
        let err = error(&["resize", "--memory", "lots"]);
        assert!(err.contains("--memory"), "{err}");
        assert!(arg_error(&["resize", "--cpus", "two"]).contains("--cpus"));
    }

    #[test]
    fn actions_without_a_body() {
        for name in [
            "boot",
            "pause",
            "resume",
            "shutdown",
            "info",
            "ping",
            "ft-status",
            "disable-ft",
        ] {
            assert_eq!(body_of(&[name]).unwrap(), None, "{name}");
        }
    }

    #[test]
    fn snapshot_forms() {
        let expected = serde_json::json!({"destination_url": "file:///tmp/snap"});
        assert_eq!(body(&["snapshot", "file:///tmp/snap"]), expected);
        assert_eq!(
            body(&["snapshot", "destination_url=file:///tmp/snap"]),
            expected
        );
        assert_eq!(
            body(&["snapshot", "file:///tmp/a,b"]),
            serde_json::json!({"destination_url": "file:///tmp/a,b"})
        );
        assert!(error(&["snapshot"]).contains("<config>"));
        assert_eq!(
            error(&["snapshot", "/tmp/snap"]),
            "invalid snapshot argument \"/tmp/snap\": destination_url \"/tmp/snap\" must be file://..."
        );
        assert_eq!(
            error(&["snapshot", "destination_url="]),
            "invalid snapshot argument \"destination_url=\": destination_url is required (file://...)"
        );
        assert!(error(&["snapshot", "file://"]).ends_with("lacks an address after the scheme"));
        assert!(error(&["snapshot", "destination_url=file:///a,x=1"])
            .contains("unknown option \"x\" (valid options: destination_url)"));
    }

    #[test]
    fn restore_forms() {
        assert_eq!(
            body(&["restore", "source_url=file:///tmp/snap"]),
            serde_json::json!({"source_url": "file:///tmp/snap", "prefault": false, "resume": false})
        );
        assert_eq!(
            body(&[
                "restore",
                "source_url=file:///tmp/snap,prefault=on,resume=true"
            ]),
            serde_json::json!({"source_url": "file:///tmp/snap", "prefault": true, "resume": true})
        );
        assert_eq!(
            body(&["restore", "prefault=off,source_url=\"file:///tmp/a,b\""]),
            serde_json::json!({"source_url": "file:///tmp/a,b", "prefault": false, "resume": false})
        );
        assert_eq!(
            body(&["restore", "file:///tmp/snap"]),
            serde_json::json!({"source_url": "file:///tmp/snap", "prefault": false, "resume": false})
        );
        assert_eq!(
            error(&["restore", "source_url=file:///s,prefault=maybe"]),
            "invalid restore argument \"source_url=file:///s,prefault=maybe\": prefault must be on, off, true or false"
        );
        assert!(error(&["restore", "prefault=on"]).ends_with("source_url is required (file://...)"));
        assert!(error(&["restore", "source_url=file:///s,net_fds=[3]"])
            .contains("unknown option \"net_fds\""));
        assert!(
            error(&["restore", "source_url=file:///s,prefault=on,prefault=off"])
                .contains("given more than once")
        );
        assert!(error(&["restore", "file:///s,prefault=on"])
            .ends_with("options need the source_url=<url>,<option>=<value> form"));
        assert!(error(&["restore", "tcp:h:1"]).contains("must be file://"));
    }

    #[test]
    fn send_migration_forms() {
        let json = |url: &str, local: bool, downtime: u64| serde_json::json!({"destination_url": url, "local": local, "downtime_ms": downtime});
        assert_eq!(
            body(&["send-migration", "tcp:10.0.0.2:6000"]),
            json("tcp:10.0.0.2:6000", false, 300)
        );
        assert_eq!(
            body(&["send-migration", "--local", "unix:/tmp/mig.sock"]),
            json("unix:/tmp/mig.sock", true, 300)
        );
        assert_eq!(
            body(&["send-migration", "unix:/tmp/mig.sock", "--local"]),
            json("unix:/tmp/mig.sock", true, 300)
        );
        assert_eq!(
            body(&[
                "send-migration",
                "destination_url=tcp:10.0.0.2:6000,downtime_ms=100"
            ]),
            json("tcp:10.0.0.2:6000", false, 100)
        );
        assert_eq!(
            body(&[
                "send-migration",
                "destination_url=tcp:h:6000,downtime_ms=100,local=off"
            ]),
            json("tcp:h:6000", false, 100)
        );
        assert_eq!(
            body(&[
                "send-migration",
                "local=on,destination_url=unix:/m,downtime=50"
            ]),
            json("unix:/m", true, 50)
        );
        assert_eq!(
            body(&["send-migration", "--local", "destination_url=unix:/m"]),
            json("unix:/m", true, 300)
        );

        assert_eq!(
            error(&["send-migration", "destination_url=tcp:h:1,downtime_ms=fast"]),
            "invalid send-migration argument \"destination_url=tcp:h:1,downtime_ms=fast\": downtime_ms must be an integer"
        );
        assert!(
            error(&["send-migration", "destination_url=tcp:h:1,downtime_ms=-5"])
                .ends_with("downtime_ms must be an integer from 0 to 18446744073709551615")
        );
        assert!(error(&[
            "send-migration",
            "destination_url=tcp:h:1,downtime_ms=1,downtime=2"
        ])
        .ends_with("give downtime_ms or downtime, not both"));
        assert!(error(&[
            "send-migration",
            "--local",
            "destination_url=tcp:h:1,local=off"
        ])
        .ends_with("local=off contradicts --local"));
        assert!(error(&["send-migration", "downtime_ms=5"])
            .ends_with("destination_url is required (tcp:... or unix:...)"));
        assert_eq!(
            error(&["send-migration", "10.0.0.2:6000"]),
            "invalid send-migration argument \"10.0.0.2:6000\": destination_url \"10.0.0.2:6000\" must be tcp:... or unix:..."
        );
        assert!(error(&["send-migration", "tcp:"]).ends_with("lacks an address after the scheme"));
        assert!(error(&["send-migration", "tcp:h:1,downtime_ms=5"])
            .ends_with("options need the destination_url=<url>,<option>=<value> form"));
        assert!(error(&[
            "send-migration",
            "destination_url=tcp:h:1,migration_timeout=5"
        ])
        .contains("unknown option \"migration_timeout\""));
        assert!(
            error(&["send-migration", "destination_url=tcp:h:1,local=yes"])
                .ends_with("local must be on, off, true or false")
        );
        assert!(error(&["send-migration"]).contains("<config>"));
    }

    #[test]
    fn receive_migration_forms() {
        let json = |url: &str| serde_json::json!({"receiver_url": url});
        assert_eq!(
            body(&["receive-migration", "receiver_url=tcp:0.0.0.0:6000"]),
            json("tcp:0.0.0.0:6000")
        );
        assert_eq!(
            body(&["receive-migration", "tcp:0.0.0.0:6000"]),
            json("tcp:0.0.0.0:6000")
        );
        assert_eq!(
            body(&["receive-migration", "unix:/tmp/mig.sock"]),
            json("unix:/tmp/mig.sock")
        );
        assert!(error(&["receive-migration", "receiver_url="])
            .ends_with("receiver_url is required (tcp:... or unix:...)"));
        assert!(error(&["receive-migration", "file:///x"]).contains("must be tcp:... or unix:..."));
        assert!(error(&["receive-migration", "unix:/a b"])
            .ends_with("receiver_url must not contain blanks"));
        assert!(error(&["receive-migration", "receiver_url=unix:/m,x=1"])
            .contains("unknown option \"x\""));
        assert!(error(&["receive-migration", "--local", "unix:/m"]).contains("--local"));
        assert_eq!(
            body(&[
                "receive-migration",
                "tcp:0.0.0.0:6000",
                "--disk-path",
                "/srv/b.img",
                "--tap",
                "tap0",
            ]),
            serde_json::json!({"receiver_url": "tcp:0.0.0.0:6000", "disk_paths": ["/srv/b.img"],
                "taps": ["tap0"]})
        );
    }

    /// The one line ch-remote prints for a command line clap refuses.
    fn arg_error(args: &[&str]) -> String {
        let mut argv = vec!["ch-remote", "--api-socket", "/s"];
        argv.extend_from_slice(args);
        match cli().try_get_matches_from(argv) {
            Ok(_) => panic!("{args:?} accepted"),
            Err(e) => one_line(&e.to_string()),
        }
    }

    #[test]
    fn enable_ft_forms() {
        let long_path = format!("/{}", "g".repeat(119));
        assert_eq!(
            body(&["enable-ft", "--peer", "10.0.0.2:7000"]),
            serde_json::json!({"peer": "10.0.0.2:7000", "epoch_ms": 10, "disk_mode": "replicated",
                "heartbeat_timeout_ms": null, "witness": null, "compress": false, "hot_pages": true,
                "stage_helper": true, "early_staging": true, "early_send": true, "early_acks": true,
                "resend_output": true, "latency_mode": false, "group": null})
        );
        // LZ4 is off unless asked for (a link slower than the sender compresses).
        let lz4 = body(&["enable-ft", "--peer", "b:1", "--compress"]);
        assert_eq!(lz4["compress"], serde_json::json!(true));
        assert_eq!(
            body(&[
                "enable-ft",
                "--epoch-ms",
                "25",
                "--peer=tcp:backup.example:7000",
                "--disk-mode",
                "shared",
                "--heartbeat-timeout-ms",
                "300",
                "--witness",
                "tcp:[fd00::3]:7100",
                "--no-compress",
                "--no-hot-pages",
                "--no-stage-helper",
                "--no-early-staging",
                "--no-early-send",
                "--no-early-acks",
                "--no-resend-output",
                "--latency-mode",
                "--encode-threads",
                "2",
                "--group",
                "/run/tandem/web.sock",
            ]),
            serde_json::json!({"peer": "tcp:backup.example:7000", "epoch_ms": 25,
                "disk_mode": "shared", "heartbeat_timeout_ms": 300,
                "witness": "tcp:[fd00::3]:7100", "compress": false, "hot_pages": false,
                "stage_helper": false, "early_staging": false, "early_send": false, "early_acks": false,
                "resend_output": false,
                "latency_mode": true, "encode_threads": 2,
                "group": "/run/tandem/web.sock"})
        );
        // What ch-remote sends is what the API accepts.
        let sent = body(&["enable-ft", "--peer", "b:1", "--disk-mode", "replicated"]);
        let request: EnableFtRequest = serde_json::from_value(sent).unwrap();
        assert_eq!(request.disk_mode, FtDiskMode::Replicated);

        let cases = [
            (
                vec!["enable-ft"],
                "error: the following required arguments were not provided: --peer <HOST:PORT>",
            ),
            (
                vec!["enable-ft", "--peer", "10.0.0.2"],
                "error: invalid value '10.0.0.2' for '--peer <HOST:PORT>': expected HOST:PORT",
            ),
            (
                vec!["enable-ft", "--peer", ":7000"],
                "error: invalid value ':7000' for '--peer <HOST:PORT>': expected HOST:PORT; the host is missing",
            ),
            (
                vec!["enable-ft", "--peer", "b:70000"],
                "error: invalid value 'b:70000' for '--peer <HOST:PORT>': expected HOST:PORT; port \"70000\" is not a number from 1 to 65535",
            ),
            (
                vec!["enable-ft", "--peer", "b:0"],
                "port \"0\" is not a number from 1 to 65535",
            ),
            (
                vec!["enable-ft", "--peer", "fd00::2:7000"],
                "an IPv6 address goes in brackets, [ADDR]:PORT",
            ),
            (
                vec!["enable-ft", "--peer", "b :7000"],
                "expected HOST:PORT, without blanks",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--no-early-send=yes"],
                "error: unexpected value 'yes' for '--no-early-send' found; no more were expected",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--epoch-ms", "0"],
                "error: invalid value '0' for '--epoch-ms <MS>': expected a whole number of milliseconds from 1 to 1000",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--epoch-ms", "1001"],
                "from 1 to 1000",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--epoch-ms", "fast"],
                "error: invalid value 'fast' for '--epoch-ms <MS>': expected a whole number of milliseconds from 1 to 1000",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--disk-mode", "mirrored"],
                "error: invalid value 'mirrored' for '--disk-mode <MODE>' [possible values: replicated, shared]",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--heartbeat-timeout-ms", "0"],
                "error: invalid value '0' for '--heartbeat-timeout-ms <MS>': expected a whole number of milliseconds, at least 1",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--witness", "w"],
                "error: invalid value 'w' for '--witness <HOST:PORT>': expected HOST:PORT",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--streams", "9"],
                "error: invalid value '9' for '--streams <N>': 9 is not in 1..=8",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--streams", "0"],
                "error: invalid value '0' for '--streams <N>': 0 is not in 1..=8",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--streams", "2", "--encode-threads", "1"],
                "error: the argument '--streams <N>' cannot be used with '--encode-threads <N>'",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--encode-threads", "17"],
                "error: invalid value '17' for '--encode-threads <N>': 17 is not in 0..=16",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--encode-threads", "-1"],
                "error: unexpected argument '-1' found",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--compress", "--no-compress"],
                "error: the argument '--compress' cannot be used with '--no-compress'",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--peer", "c:1"],
                "error: the argument '--peer <HOST:PORT>' cannot be used multiple times",
            ),
            (
                vec!["enable-ft", "b:1"],
                "error: unexpected argument 'b:1' found",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--group", ""],
                "error: invalid value '' for '--group <PATH>': expected the path of the group's Unix socket",
            ),
            (
                vec!["enable-ft", "--peer", "b:1", "--group", &long_path],
                "a Unix socket path has at most 107 bytes; this one has 120",
            ),
        ];
        for (args, expected) in cases {
            let line = arg_error(&args);
            assert!(line.ends_with(expected), "{args:?}: {line}");
            assert!(!line.contains('\n'));
        }
    }

    #[test]
    fn receive_ft_forms() {
        assert_eq!(
            body(&["receive-ft", "tcp:0.0.0.0:7000"]),
            serde_json::json!({"receiver_url": "tcp:0.0.0.0:7000", "disk_paths": [], "taps": [],
                "witness": null, "group": null})
        );
        assert_eq!(
            body(&[
                "receive-ft",
                "receiver_url=tcp:[::]:7000",
                "--disk-path",
                "/var/b/disk0.img",
                "--witness",
                "w.example:7100",
                "--disk-path=/var/b/disk 1.img",
                "--group",
                "/run/tandem/web-b.sock",
                "--tap",
                "tap0",
            ]),
            serde_json::json!({"receiver_url": "tcp:[::]:7000",
                "disk_paths": ["/var/b/disk0.img", "/var/b/disk 1.img"], "taps": ["tap0"],
                "witness": "w.example:7100", "group": "/run/tandem/web-b.sock"})
        );
        let cases = [
            (
                vec!["receive-ft"],
                "error: the following required arguments were not provided: <receiver_url>",
            ),
            (
                vec!["receive-ft", "0.0.0.0:7000"],
                "error: invalid value '0.0.0.0:7000' for '<receiver_url>': receiver_url \"0.0.0.0:7000\" must be tcp:HOST:PORT",
            ),
            (
                vec!["receive-ft", "unix:/tmp/ft.sock"],
                "must be tcp:HOST:PORT",
            ),
            (
                vec!["receive-ft", "tcp:0.0.0.0"],
                "error: invalid value 'tcp:0.0.0.0' for '<receiver_url>': receiver_url expected HOST:PORT",
            ),
            (
                vec!["receive-ft", "receiver_url=tcp:0.0.0.0:7000,witness=w:1"],
                "receive-ft takes only receiver_url=...; give --disk-path, --tap and --witness as flags",
            ),
            (
                vec!["receive-ft", "tcp:0.0.0.0:7000", "--witness", "w"],
                "error: invalid value 'w' for '--witness <HOST:PORT>': expected HOST:PORT",
            ),
            (
                vec!["receive-ft", "tcp:0.0.0.0:7000", "--disk-path"],
                "error: a value is required for '--disk-path <PATH>' but none was supplied",
            ),
            (
                vec!["receive-ft", "tcp:0.0.0.0:7000", "tcp:0.0.0.0:7001"],
                "error: unexpected argument 'tcp:0.0.0.0:7001' found",
            ),
        ];
        for (args, expected) in cases {
            let line = arg_error(&args);
            assert!(line.ends_with(expected), "{args:?}: {line}");
        }
    }

    #[test]
    fn channel_security_forms() {
        // FT: a flag each; both at once is a clap conflict.
        let sent = body(&["enable-ft", "--peer", "b:1", "--tls-dir", "/etc/tandem/tls"]);
        assert_eq!(sent["tls_dir"], "/etc/tandem/tls");
        assert!(sent.get("insecure_plaintext").is_none(), "{sent}");
        let sent = body(&["receive-ft", "tcp:0.0.0.0:1", "--insecure-plaintext"]);
        assert_eq!(sent["insecure_plaintext"], true);
        assert!(sent.get("tls_dir").is_none(), "{sent}");
        let line = arg_error(&[
            "enable-ft",
            "--peer",
            "b:1",
            "--tls-dir",
            "/d",
            "--insecure-plaintext",
        ]);
        assert!(line.contains("cannot be used with"), "{line}");
        // Migration: Cloud Hypervisor's key, or the flag; not both.
        assert_eq!(
            body(&["send-migration", "destination_url=tcp:h:1,tls_dir=/etc/tls"])["tls_dir"],
            "/etc/tls"
        );
        assert_eq!(
            body(&["send-migration", "tcp:h:1", "--tls-dir", "/etc/tls"])["tls_dir"],
            "/etc/tls"
        );
        assert_eq!(
            body(&[
                "receive-migration",
                "receiver_url=tcp:0.0.0.0:1,insecure_plaintext=on"
            ])["insecure_plaintext"],
            true
        );
        assert_eq!(
            body(&["receive-migration", "receiver_url=tcp:0.0.0.0:1,tls_dir=/t"])["tls_dir"],
            "/t"
        );
        assert!(error(&[
            "send-migration",
            "destination_url=tcp:h:1,tls_dir=/a",
            "--tls-dir",
            "/b"
        ])
        .contains("not both"));
        // A body without a choice stays Cloud Hypervisor's (the VMM refuses it over TCP).
        let sent = body(&["receive-migration", "tcp:0.0.0.0:1"]);
        assert_eq!(sent, serde_json::json!({"receiver_url": "tcp:0.0.0.0:1"}));
    }

    #[test]
    fn etcd_fencing_forms() {
        let sent = body(&[
            "enable-ft",
            "--peer",
            "b:1",
            "--fencing",
            "etcd://e1:2379,10.0.0.9:2379",
        ]);
        assert_eq!(sent["fencing"], "etcd://e1:2379,10.0.0.9:2379");
        let sent = body(&["receive-ft", "tcp:0.0.0.0:1", "--fencing", "etcd://e:2379"]);
        assert_eq!(sent["fencing"], "etcd://e:2379");
        let line = arg_error(&["enable-ft", "--peer", "b:1", "--fencing", "zk://e:1"]);
        assert!(line.contains("must be etcd://"), "{line}");
        let line = arg_error(&["enable-ft", "--peer", "b:1", "--fencing", "etcd://e"]);
        assert!(line.contains("expected HOST:PORT"), "{line}");
        let line = arg_error(&[
            "enable-ft",
            "--peer",
            "b:1",
            "--fencing",
            "etcd://e:1",
            "--witness",
            "w:1",
        ]);
        assert!(line.contains("cannot be used with"), "{line}");
    }

    #[test]
    fn hotplug_forms_use_the_cloud_hypervisor_device_syntax() {
        let disk = body(&["add-disk", "path=/x.img,readonly=on,id=_disk1"]);
        assert_eq!(
            (&disk["path"], &disk["readonly"], &disk["id"]),
            (
                &serde_json::json!("/x.img"),
                &serde_json::json!(true),
                &serde_json::json!("_disk1")
            )
        );
        // The body is the whole DiskConfig, Cloud Hypervisor's defaults included.
        assert_eq!(disk["queue_size"], 128);
        let net = body(&["add-net", "tap=tap1,mac=12:34:56:78:9a:bc"]);
        assert_eq!(
            (&net["tap"], &net["fds"]),
            (&serde_json::json!("tap1"), &serde_json::Value::Null)
        );
        assert_eq!(net["mac"], "12:34:56:78:9a:bc");
        let pmem = body(&["add-pmem", "file=/p,size=4M,discard_writes=on"]);
        assert_eq!(
            (&pmem["file"], &pmem["size"]),
            (&serde_json::json!("/p"), &serde_json::json!(4u64 << 20))
        );
        assert_eq!(
            body(&["add-fs", "tag=myfs,socket=/run/fs.sock"])["tag"],
            "myfs"
        );
        let vsock = body(&["add-vsock", "cid=3,socket=/run/v.sock"]);
        assert_eq!(
            (&vsock["cid"], &vsock["socket"]),
            (&serde_json::json!(3), &serde_json::json!("/run/v.sock"))
        );
        assert_eq!(
            body(&["remove-device", "_disk1"]),
            serde_json::json!({"id": "_disk1"})
        );

        assert_eq!(
            error(&["add-disk", "readonly=on"]),
            "invalid add-disk argument \"readonly=on\": path=<disk image> is required"
        );
        assert!(error(&["add-disk", "path=/a,bogus=1"]).contains("bogus"));
        assert!(error(&["add-vsock", "socket=/v"]).contains("cid=<context id> is required"));
        assert!(error(&["add-net", "ip=1.2.3"]).contains("ip must be an IPv4 address"));
        assert_eq!(
            error(&["add-fs", "tag=t,socket=/s,dax=on"]),
            "invalid add-fs argument \"tag=t,socket=/s,dax=on\": a DAX window (dax=, \
             cache_size=) is not supported yet"
        );
        assert!(arg_error(&["add-disk"]).contains("required arguments"));
        assert!(arg_error(&["remove-device"]).contains("required arguments"));
    }

    #[test]
    fn add_net_passes_its_descriptors_instead_of_their_numbers() {
        for (value, fds) in [
            ("fd=3,mac=12:34:56:78:9a:bc", vec![3]),
            ("fd=[4]", vec![4]),
            ("tap=t", vec![]),
        ] {
            let (config, passed) = add_net_request(value).unwrap();
            assert_eq!(passed, fds, "{value}");
            // The numbers are ch-remote's: they never reach the body.
            assert_eq!(config.fds, None, "{value}");
            assert_eq!(body(&["add-net", value])["fds"], serde_json::Value::Null);
        }
        let matches = |value: &str| {
            cli()
                .try_get_matches_from(["ch-remote", "--api-socket", "/s", "add-net", value])
                .unwrap()
        };
        // A descriptor ch-remote does not have is refused before anything is sent.
        let m = matches("fd=1000000");
        let (_, sub) = m.subcommand().unwrap();
        let e = add_net_fds(sub).unwrap_err().to_string();
        assert!(
            e.contains("fd 1000000 is not an open descriptor of ch-remote"),
            "{e}"
        );
        let (read, _write) = std::io::pipe().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&read);
        let m = matches(&format!("fd={fd}"));
        let (_, sub) = m.subcommand().unwrap();
        assert_eq!(add_net_fds(sub).unwrap(), [fd]);
    }

    #[test]
    fn clap_errors_fit_on_one_line() {
        assert_eq!(
            arg_error(&["snapshot"]),
            "error: the following required arguments were not provided: <config>"
        );
        assert_eq!(
            arg_error(&["nope"]),
            "error: unrecognized subcommand 'nope'"
        );
    }

    #[test]
    fn argument_errors_are_reported_as_a_chain() {
        let e = receive_migration_request("nope").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid receive-migration argument \"nope\": receiver_url \"nope\" must be tcp:... or unix:..."
        );
    }
}
