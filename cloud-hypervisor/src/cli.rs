// SPDX-License-Identifier: Apache-2.0

//! The `cloud-hypervisor` command line: the same flags and value syntax as
//! Cloud Hypervisor, turned into a [`VmConfig`] plus the options of the
//! process itself.

use std::ffi::OsString;
use std::os::unix::io::RawFd;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Arg, ArgAction, ArgMatches, ColorChoice, Command};
use thiserror::Error;
use vmm::config::{
    ConsoleConfig, ConsoleOutputMode, CoreScheduling, CpuAffinity, CpuTopology, CpusConfig,
    DiskConfig, FsConfig, HotplugMethod, MemoryConfig, NetConfig, PayloadConfig, PmemConfig,
    RngConfig, ValidationError, VmConfig, VsockConfig, DEFAULT_MAX_PHYS_BITS, DEFAULT_MEMORY_MB,
};
use vmm::control::RestoreRequest;

use crate::option_parser::{ByteSize, IndexedLists, IntegerList, OptionParser, OptionParserError};

/// What `parse_args` decided the process should do.
// Built once per process and matched right away, so the size difference
// between the variants costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum CliOutcome {
    /// Start the VMM with these options.
    Run(CliOptions),
    /// Print `text` (it ends with a newline) and exit with `code`: to stdout
    /// when `code` is 0 (`--help`, `--version`), to stderr otherwise (help
    /// shown because no argument was given, which Cloud Hypervisor treats
    /// as a usage error).
    PrintAndExit { text: String, code: i32 },
}

/// Everything the command line configures.
#[derive(Debug, PartialEq, Eq)]
pub struct CliOptions {
    /// The VM to create and boot at start; `None` when no `--kernel` was
    /// given but `--api-socket` was, so the VMM waits for `vm.create`, and
    /// with `--restore`. Already validated.
    pub vm_config: Option<VmConfig>,
    /// `--restore`: the VM comes from this snapshot instead (`vm_config`
    /// is then `None`).
    pub restore: Option<RestoreRequest>,
    pub api_socket: Option<ApiSocket>,
    pub event_monitor: Option<EventMonitor>,
    pub log_file: Option<PathBuf>,
    /// The number of `-v` flags.
    pub verbosity: u8,
    pub seccomp: SeccompAction,
}

/// Where the HTTP API listens (`--api-socket`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiSocket {
    /// A UNIX socket to create at this path.
    Path(PathBuf),
    /// An already bound and listening UNIX socket inherited from the parent.
    Fd(RawFd),
}

/// Where events are reported (`--event-monitor`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventMonitor {
    /// A file to create (or truncate) at this path.
    Path(PathBuf),
    /// An open file descriptor inherited from the parent.
    Fd(RawFd),
}

/// What a seccomp filter does on a forbidden system call (`--seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompAction {
    /// `--seccomp true`, the default: kill the thread with SIGSYS.
    #[default]
    Trap,
    /// `--seccomp false`: install no filter.
    Allow,
    /// `--seccomp log`: allow the call and have the kernel log it.
    Log,
}

/// A command line that cannot be run. The message is one line, naming the
/// flag and the problem.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
    #[error("{flag}: invalid value \"{value}\": {reason}")]
    InvalidValue {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0} is not supported yet")]
    UnsupportedFlag(String),
    #[error("{flag}: {what} is not supported yet")]
    UnsupportedOption { flag: &'static str, what: String },
    #[error("a payload is required: pass --kernel <PATH>, or --api-socket to wait for vm.create")]
    MissingPayload,
    #[error("{0} requires --kernel")]
    NeedsKernel(&'static str),
    #[error("--restore cannot be combined with {0}: the snapshot holds the VM configuration")]
    RestoreConflict(&'static str),
    #[error("{flag}: {source}")]
    Validation {
        flag: &'static str,
        source: ValidationError,
    },
    /// Anything clap itself refuses (unknown flag, missing value, flag given
    /// twice), reduced to its first line.
    #[error("{0}")]
    Usage(String),
}

/// Flags of Cloud Hypervisor that take a value and that Tandem does not
/// implement yet. They are declared (hidden) so that using one gets "not
/// supported yet" rather than clap's "unexpected argument", which would
/// suggest a typo.
const UNSUPPORTED_VALUE_FLAGS: &[&str] = &[
    "balloon",
    "debug-console",
    "device",
    "firmware",
    "gdb",
    "generic-vhost-user",
    "host-data",
    "igvm",
    "landlock-rules",
    "memory-zone",
    "numa",
    "pci-segment",
    "platform",
    "rate-limit-group",
    "sgx-epc",
    "tpm",
    "user-device",
    "vdpa",
];

/// Like [`UNSUPPORTED_VALUE_FLAGS`], for flags that take no value.
const UNSUPPORTED_SWITCHES: &[&str] = &["landlock", "no-shutdown", "pvpanic", "watchdog"];

/// Flags that describe the VM, which need a payload to mean anything.
const VM_FLAGS: &[&str] = &[
    "cmdline",
    "console",
    "cpus",
    "disk",
    "fs",
    "initramfs",
    "memory",
    "net",
    "pmem",
    "rng",
    "serial",
    "vsock",
];

/// The clap definition of the `cloud-hypervisor` command line.
pub fn command() -> Command {
    let mut command = Command::new("cloud-hypervisor")
        .about("Launch a cloud-hypervisor VMM.")
        .color(ColorChoice::Never)
        // Cloud Hypervisor prints "cloud-hypervisor v<version>", which is
        // not clap's "<name> <version>" shape, so the flag is our own.
        .disable_version_flag(true)
        .arg_required_else_help(true)
        .arg(
            Arg::new("api-socket")
                .long("api-socket")
                .value_name("api-socket")
                .help("HTTP API socket (UNIX domain socket): path=</path/to/a/file> or fd=<fd>."),
        )
        .arg(
            Arg::new("cmdline")
                .long("cmdline")
                .value_name("cmdline")
                .help("Kernel command line"),
        )
        .arg(
            Arg::new("console")
                .long("console")
                .value_name("console")
                .help(
                    "Control (virtio) console: \"off|null|pty|tty|file=</path/to/a/file>|\
                     socket=</path/to/a/file>,iommu=on|off\" [default: tty]",
                ),
        )
        .arg(
            Arg::new("cpus")
                .long("cpus")
                .value_name("cpus")
                .help("boot=<boot_vcpus>,max=<max_vcpus> [default: boot=1]"),
        )
        .arg(
            Arg::new("disk")
                .long("disk")
                .value_name("disk")
                .num_args(1..)
                .action(ArgAction::Append)
                .help(
                    "path=<disk_image_path>,readonly=on|off,direct=on|off,\
                     num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,id=<device_id>",
                ),
        )
        .arg(
            Arg::new("event-monitor")
                .long("event-monitor")
                .value_name("event-monitor")
                .help("File to report events on: path=</path/to/a/file> or fd=<fd>"),
        )
        .arg(
            Arg::new("fs")
                .long("fs")
                .value_name("fs")
                .num_args(1..)
                .action(ArgAction::Append)
                .help(
                    "virtio-fs parameters \"tag=<tag_name>,socket=<socket_path>,\
                     num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,\
                     id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\"",
                ),
        )
        .arg(
            Arg::new("initramfs")
                .long("initramfs")
                .value_name("initramfs")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Path to initramfs image"),
        )
        .arg(
            Arg::new("kernel")
                .long("kernel")
                .value_name("kernel")
                .value_parser(clap::value_parser!(PathBuf))
                .help(
                    "Path to kernel to load. This may be a kernel or firmware that supports a \
                     PVH entry point (e.g. vmlinux) or architecture equivalent",
                ),
        )
        .arg(
            Arg::new("log-file")
                .long("log-file")
                .value_name("log-file")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Log file. Standard error is used if not specified"),
        )
        .arg(
            Arg::new("memory")
                .long("memory")
                .value_name("memory")
                .help("Memory parameters \"size=<guest_memory_size>\" [default: size=512M]"),
        )
        .arg(
            Arg::new("net")
                .long("net")
                .value_name("net")
                .num_args(1..)
                .action(ArgAction::Append)
                .help(
                    "tap=<if_name>,ip=<ip_addr>,mask=<net_mask>,mac=<mac_addr>,fd=<fd1,fd2...>,\
                     mtu=<mtu>,num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,\
                     id=<device_id>",
                ),
        )
        .arg(
            Arg::new("pmem")
                .long("pmem")
                .value_name("pmem")
                .num_args(1..)
                .action(ArgAction::Append)
                .help(
                    "Persistent memory parameters \"file=<backing_file_path>,\
                     size=<persistent_memory_size>,iommu=on|off,discard_writes=on|off,\
                     id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\"",
                ),
        )
        .arg(
            Arg::new("restore")
                .long("restore")
                .value_name("restore")
                .help(
                    "Restore from a VM snapshot: \
                     source_url=<source_url>[,prefault=on|off][,resume=on|off]",
                ),
        )
        .arg(
            Arg::new("seccomp")
                .long("seccomp")
                .value_name("seccomp")
                .help("Seccomp filtering: true|false|log [default: true]"),
        )
        .arg(
            Arg::new("rng")
                .long("rng")
                .value_name("rng")
                .help("Random number generator parameters \"src=<entropy_source_path>,iommu=on|off\" [default: src=/dev/urandom]"),
        )
        .arg(Arg::new("serial").long("serial").value_name("serial").help(
            "Control serial port: off|null|tty|file=</path/to/a/file>|\
                     socket=</path/to/a/file> [default: null]",
        ))
        .arg(
            Arg::new("vsock")
                .long("vsock")
                .value_name("vsock")
                .help(
                    "Virtio VSOCK parameters \"cid=<context_id>,socket=<socket_path>,\
                     iommu=on|off,id=<device_id>,pci_segment=<segment_id>,\
                     pci_device_id=<pci_slot>\"",
                ),
        )
        .arg(
            Arg::new("v")
                .short('v')
                .action(ArgAction::Count)
                .help("Sets the level of debugging output"),
        )
        .arg(
            Arg::new("version")
                .short('V')
                .long("version")
                .action(ArgAction::SetTrue)
                .help("Print version"),
        );
    for name in UNSUPPORTED_VALUE_FLAGS {
        command = command.arg(
            Arg::new(*name)
                .long(*name)
                .hide(true)
                // Any number of values, so that even a malformed use is
                // answered with "not supported yet".
                .num_args(0..)
                .action(ArgAction::Append),
        );
    }
    for name in UNSUPPORTED_SWITCHES {
        command = command.arg(
            Arg::new(*name)
                .long(*name)
                .hide(true)
                .action(ArgAction::SetTrue),
        );
    }
    command
}

/// The `--version` text: Cloud Hypervisor's shape (`cloud-hypervisor v<major>.<minor>.<patch>`,
/// which libvirt parses) with the Cloud Hypervisor release Tandem follows, then Tandem's own
/// version in parentheses.
pub fn version_text() -> String {
    format!("cloud-hypervisor {}\n", vmm::control::build_version())
}

/// Parses a full command line (`args` starts with the program name).
pub fn parse_args<I, T>(args: I) -> Result<CliOutcome, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = match command().try_get_matches_from(args) {
        Ok(matches) => matches,
        Err(err) => return clap_error(err),
    };

    if matches.get_flag("version") {
        return Ok(CliOutcome::PrintAndExit {
            text: version_text(),
            code: 0,
        });
    }
    check_unsupported_flags(&matches)?;

    let api_socket = string_arg(&matches, "api-socket")
        .map(parse_api_socket)
        .transpose()?;
    let event_monitor = string_arg(&matches, "event-monitor")
        .map(parse_event_monitor)
        .transpose()?;
    let seccomp = string_arg(&matches, "seccomp")
        .map(parse_seccomp)
        .transpose()?
        .unwrap_or_default();
    let log_file = matches.get_one::<PathBuf>("log-file").cloned();
    let verbosity = matches.get_count("v");

    let restore = string_arg(&matches, "restore")
        .map(parse_restore)
        .transpose()?;
    let vm_config = if restore.is_some() {
        check_restore_conflicts(&matches)?;
        None
    } else {
        build_vm_config(&matches, api_socket.is_some())?
    };

    Ok(CliOutcome::Run(CliOptions {
        vm_config,
        restore,
        api_socket,
        event_monitor,
        log_file,
        verbosity,
        seccomp,
    }))
}

fn clap_error(err: clap::Error) -> Result<CliOutcome, CliError> {
    let text = err.render().to_string();
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            Ok(CliOutcome::PrintAndExit { text, code: 0 })
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            Ok(CliOutcome::PrintAndExit { text, code: 2 })
        }
        _ => {
            let first = text.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            Err(CliError::Usage(first.to_owned()))
        }
    }
}

fn string_arg<'a>(matches: &'a ArgMatches, id: &str) -> Option<&'a str> {
    matches.get_one::<String>(id).map(String::as_str)
}

/// Reports the unsupported flag that comes first on the command line.
fn check_unsupported_flags(matches: &ArgMatches) -> Result<(), CliError> {
    let given = UNSUPPORTED_VALUE_FLAGS
        .iter()
        .filter(|id| matches.contains_id(id))
        .chain(
            UNSUPPORTED_SWITCHES
                .iter()
                .filter(|id| matches.get_flag(id)),
        );
    match given.min_by_key(|id| matches.index_of(id).unwrap_or(usize::MAX)) {
        Some(id) => Err(CliError::UnsupportedFlag(format!("--{id}"))),
        None => Ok(()),
    }
}

fn invalid(flag: &'static str, value: &str, reason: impl ToString) -> CliError {
    CliError::InvalidValue {
        flag,
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

/// Parses `value` with `parser`, naming `flag` in any error.
fn parse_options(
    parser: &mut OptionParser,
    flag: &'static str,
    value: &str,
) -> Result<(), CliError> {
    parser.parse(value).map_err(|e| invalid(flag, value, e))
}

/// Converts an option, naming `flag` and the whole value in any error.
fn convert<T: crate::option_parser::OptionValue>(
    parser: &OptionParser,
    flag: &'static str,
    value: &str,
    key: &str,
) -> Result<Option<T>, CliError> {
    parser
        .convert::<T>(key)
        .map_err(|e: OptionParserError| invalid(flag, value, e))
}

fn parse_fd(flag: &'static str, value: &str, parser: &OptionParser) -> Result<RawFd, CliError> {
    match convert::<RawFd>(parser, flag, value, "fd")? {
        Some(fd) if fd >= 0 => Ok(fd),
        _ => Err(invalid(flag, value, "fd must be a non-negative integer")),
    }
}

/// `path=<path>`, `fd=<fd>`, or (as Cloud Hypervisor also accepts) a bare
/// path.
fn parse_api_socket(value: &str) -> Result<ApiSocket, CliError> {
    const FLAG: &str = "--api-socket";
    let mut parser = OptionParser::new();
    parser.add("path").add("fd");
    // Cloud Hypervisor falls back to taking the whole value as a path when
    // it is not `path=`/`fd=` syntax; deciding on the prefix keeps that
    // while still reporting mistakes in the keyed form.
    let keyed = ["path=", "fd="]
        .iter()
        .any(|prefix| value.trim_start().starts_with(prefix));
    if !keyed {
        if value.trim().is_empty() {
            return Err(invalid(
                FLAG,
                value,
                "expected path=<path>, fd=<fd> or a path",
            ));
        }
        return Ok(ApiSocket::Path(PathBuf::from(value)));
    }
    parse_options(&mut parser, FLAG, value)?;
    match (parser.is_set("path"), parser.is_set("fd")) {
        (true, true) => Err(invalid(FLAG, value, "give either path or fd, not both")),
        (_, true) => Ok(ApiSocket::Fd(parse_fd(FLAG, value, &parser)?)),
        _ => match parser.get("path") {
            Some(path) => Ok(ApiSocket::Path(PathBuf::from(path))),
            None => Err(invalid(FLAG, value, "path must not be empty")),
        },
    }
}

fn parse_event_monitor(value: &str) -> Result<EventMonitor, CliError> {
    const FLAG: &str = "--event-monitor";
    let mut parser = OptionParser::new();
    parser.add("path").add("fd");
    parse_options(&mut parser, FLAG, value)?;
    match (parser.is_set("path"), parser.is_set("fd")) {
        (true, true) => Err(invalid(FLAG, value, "give either path or fd, not both")),
        (false, false) => Err(invalid(FLAG, value, "path=<path> or fd=<fd> is required")),
        (_, true) => Ok(EventMonitor::Fd(parse_fd(FLAG, value, &parser)?)),
        (true, false) => match parser.get("path") {
            Some(path) => Ok(EventMonitor::Path(PathBuf::from(path))),
            None => Err(invalid(FLAG, value, "path must not be empty")),
        },
    }
}

/// `source_url=file://<dir>[,prefault=on|off][,resume=on|off]`, as Cloud
/// Hypervisor's `--restore`.
fn parse_restore(value: &str) -> Result<RestoreRequest, CliError> {
    const FLAG: &str = "--restore";
    let mut parser = OptionParser::new();
    parser
        .add("source_url")
        .add("prefault")
        .add("resume")
        .add("net_fds")
        .add("memory_restore_mode");
    parse_options(&mut parser, FLAG, value)?;
    for key in ["net_fds", "memory_restore_mode"] {
        if parser.is_set(key) {
            return Err(CliError::UnsupportedOption {
                flag: FLAG,
                what: key.to_owned(),
            });
        }
    }
    let Some(source_url) = parser.get("source_url") else {
        return Err(invalid(
            FLAG,
            value,
            "source_url=file://<snapshot directory> is required",
        ));
    };
    if !source_url.starts_with("file://") || source_url.len() == "file://".len() {
        return Err(invalid(
            FLAG,
            value,
            "source_url must be file://<snapshot directory>",
        ));
    }
    let flag = |key: &str| convert::<bool>(&parser, FLAG, value, key);
    Ok(RestoreRequest {
        source_url: source_url.to_owned(),
        prefault: flag("prefault")?.unwrap_or(false),
        resume: flag("resume")?.unwrap_or(false),
    })
}

/// `--restore` brings the whole VM configuration from the snapshot, so a
/// flag that describes the VM is refused rather than silently ignored; the
/// one that comes first on the command line is named.
fn check_restore_conflicts(matches: &ArgMatches) -> Result<(), CliError> {
    let given = std::iter::once(&"kernel")
        .chain(VM_FLAGS.iter())
        .filter(|id| matches.contains_id(id));
    match given.min_by_key(|id| matches.index_of(id).unwrap_or(usize::MAX)) {
        Some(&"kernel") => Err(CliError::RestoreConflict("--kernel")),
        Some(id) => Err(CliError::RestoreConflict(vm_flag_name(id))),
        None => Ok(()),
    }
}

fn parse_seccomp(value: &str) -> Result<SeccompAction, CliError> {
    match value {
        "true" => Ok(SeccompAction::Trap),
        "false" => Ok(SeccompAction::Allow),
        "log" => Ok(SeccompAction::Log),
        _ => Err(invalid("--seccomp", value, "expected true, false or log")),
    }
}

fn build_vm_config(
    matches: &ArgMatches,
    has_api_socket: bool,
) -> Result<Option<VmConfig>, CliError> {
    // Parse every VM flag first so that a malformed value is reported even
    // when the kernel is missing too.
    let cpus = string_arg(matches, "cpus").map(parse_cpus).transpose()?;
    let memory = string_arg(matches, "memory")
        .map(parse_memory)
        .transpose()?;
    let serial = string_arg(matches, "serial")
        .map(|v| parse_console_flag("--serial", v))
        .transpose()?;
    let console = string_arg(matches, "console")
        .map(|v| parse_console_flag("--console", v))
        .transpose()?;
    let disks = many_args(matches, "disk")
        .map(parse_disk)
        .collect::<Result<Vec<_>, _>>()?;
    let nets = many_args(matches, "net")
        .map(parse_net)
        .collect::<Result<Vec<_>, _>>()?;
    let rng = string_arg(matches, "rng").map(parse_rng).transpose()?;
    let vsock = string_arg(matches, "vsock").map(parse_vsock).transpose()?;
    let pmem = many_args(matches, "pmem")
        .map(parse_pmem)
        .collect::<Result<Vec<_>, _>>()?;
    let fs = many_args(matches, "fs")
        .map(parse_fs)
        .collect::<Result<Vec<_>, _>>()?;

    let Some(kernel) = matches.get_one::<PathBuf>("kernel") else {
        if let Some(flag) = VM_FLAGS.iter().find(|id| matches.contains_id(id)) {
            return Err(CliError::NeedsKernel(vm_flag_name(flag)));
        }
        if has_api_socket {
            return Ok(None);
        }
        return Err(CliError::MissingPayload);
    };

    let config = VmConfig {
        cpus: cpus.unwrap_or_default(),
        memory: memory.unwrap_or_default(),
        payload: Some(PayloadConfig {
            kernel: Some(kernel.clone()),
            cmdline: matches.get_one::<String>("cmdline").cloned(),
            initramfs: matches.get_one::<PathBuf>("initramfs").cloned(),
            ..PayloadConfig::default()
        }),
        serial: serial.unwrap_or_else(ConsoleConfig::default_serial),
        console: console.unwrap_or_else(ConsoleConfig::default_console),
        disks: (!disks.is_empty()).then_some(disks),
        net: (!nets.is_empty()).then_some(nets),
        rng: rng.unwrap_or_default(),
        vsock,
        pmem: (!pmem.is_empty()).then_some(pmem),
        fs: (!fs.is_empty()).then_some(fs),
        ..VmConfig::default()
    };
    config.validate().map_err(|source| CliError::Validation {
        flag: flag_for_validation_error(&source),
        source,
    })?;
    Ok(Some(config))
}

fn vm_flag_name(id: &str) -> &'static str {
    match id {
        "cmdline" => "--cmdline",
        "console" => "--console",
        "cpus" => "--cpus",
        "disk" => "--disk",
        "fs" => "--fs",
        "initramfs" => "--initramfs",
        "memory" => "--memory",
        "net" => "--net",
        "pmem" => "--pmem",
        "rng" => "--rng",
        "vsock" => "--vsock",
        _ => "--serial",
    }
}

/// The flag a configuration field comes from, so validation errors name
/// what the user typed.
fn flag_for_validation_error(err: &ValidationError) -> &'static str {
    let field = match err {
        ValidationError::NoBootVcpus
        | ValidationError::MaxBelowBoot { .. }
        | ValidationError::TooManyVcpus { .. }
        | ValidationError::InconsistentTopology { .. } => "cpus",
        ValidationError::MemoryTooSmall { .. } | ValidationError::MemoryNotAligned { .. } => {
            "memory"
        }
        ValidationError::DoubleTty => return "--serial/--console",
        ValidationError::MissingPath { field, .. }
        | ValidationError::Unsupported { field, .. }
        | ValidationError::Invalid { field, .. }
        | ValidationError::DuplicateId { field, .. } => field,
        ValidationError::KernelMissing => "payload",
        // ValidationError may grow variants; the message still names the
        // field.
        #[allow(unreachable_patterns)]
        _ => "",
    };
    match field.split('.').next().unwrap_or_default() {
        "cpus" => "--cpus",
        "memory" => "--memory",
        "serial" => "--serial",
        "console" => "--console",
        "payload" => "--kernel",
        "disks" => "--disk",
        "net" => "--net",
        "rng" => "--rng",
        "vsock" => "--vsock",
        "pmem" => "--pmem",
        "fs" => "--fs",
        _ => "configuration",
    }
}

fn many_args<'a>(matches: &'a ArgMatches, id: &str) -> impl Iterator<Item = &'a str> {
    matches
        .get_many::<String>(id)
        .into_iter()
        .flatten()
        .map(String::as_str)
}

pub fn parse_disk(value: &str) -> Result<DiskConfig, CliError> {
    const FLAG: &str = "--disk";
    let mut parser = OptionParser::new();
    parser
        .add("path")
        .add("readonly")
        .add("direct")
        .add("iommu")
        .add("num_queues")
        .add("queue_size")
        .add("vhost_user")
        .add("socket")
        .add("id")
        .add("pci_segment")
        .add("serial");
    parse_options(&mut parser, FLAG, value)?;
    let Some(path) = parser.get("path") else {
        return Err(invalid(FLAG, value, "path=<disk image> is required"));
    };
    let mut disk = DiskConfig::with_path(path);
    let flag = |key: &str| convert::<bool>(&parser, FLAG, value, key);
    disk.readonly = flag("readonly")?.unwrap_or(false);
    disk.direct = flag("direct")?.unwrap_or(false);
    disk.iommu = flag("iommu")?.unwrap_or(false);
    disk.vhost_user = flag("vhost_user")?.unwrap_or(false);
    disk.vhost_socket = parser.get("socket").map(str::to_owned);
    disk.num_queues =
        convert::<usize>(&parser, FLAG, value, "num_queues")?.unwrap_or(disk.num_queues);
    disk.queue_size =
        convert::<u16>(&parser, FLAG, value, "queue_size")?.unwrap_or(disk.queue_size);
    disk.pci_segment = convert::<u16>(&parser, FLAG, value, "pci_segment")?.unwrap_or(0);
    disk.id = parser.get("id").map(str::to_owned);
    disk.serial = parser.get("serial").map(str::to_owned);
    Ok(disk)
}

pub fn parse_net(value: &str) -> Result<NetConfig, CliError> {
    const FLAG: &str = "--net";
    let mut parser = OptionParser::new();
    parser
        .add("tap")
        .add("ip")
        .add("mask")
        .add("mac")
        .add("host_mac")
        .add("mtu")
        .add("iommu")
        .add("num_queues")
        .add("queue_size")
        .add("vhost_user")
        .add("socket")
        .add("id")
        .add("fd")
        .add("pci_segment")
        .add("offload_tso")
        .add("offload_ufo")
        .add("offload_csum");
    parse_options(&mut parser, FLAG, value)?;
    let mut net = NetConfig::default();
    let ip = |key: &str| -> Result<Option<std::net::Ipv4Addr>, CliError> {
        parser
            .get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| invalid(FLAG, value, format!("{key} must be an IPv4 address")))
            })
            .transpose()
    };
    let flag = |key: &str| convert::<bool>(&parser, FLAG, value, key);
    net.tap = parser.get("tap").map(str::to_owned);
    net.ip = ip("ip")?;
    net.mask = ip("mask")?;
    net.mac = parser.get("mac").map(str::to_owned);
    net.host_mac = parser.get("host_mac").map(str::to_owned);
    net.mtu = convert::<u16>(&parser, FLAG, value, "mtu")?;
    net.iommu = flag("iommu")?.unwrap_or(false);
    net.num_queues =
        convert::<usize>(&parser, FLAG, value, "num_queues")?.unwrap_or(net.num_queues);
    net.queue_size = convert::<u16>(&parser, FLAG, value, "queue_size")?.unwrap_or(net.queue_size);
    net.vhost_user = flag("vhost_user")?.unwrap_or(false);
    net.vhost_socket = parser.get("socket").map(str::to_owned);
    net.id = parser.get("id").map(str::to_owned);
    net.fds = parse_net_fds(&parser, value)?;
    net.pci_segment = convert::<u16>(&parser, FLAG, value, "pci_segment")?.unwrap_or(0);
    net.offload_tso = flag("offload_tso")?.unwrap_or(true);
    net.offload_ufo = flag("offload_ufo")?.unwrap_or(true);
    net.offload_csum = flag("offload_csum")?.unwrap_or(true);
    Ok(net)
}

/// `fd=3` or `fd=[3,4]` (Cloud Hypervisor's syntax): TAP descriptors this process inherited,
/// one per queue pair (validation checks the count).
fn parse_net_fds(parser: &OptionParser, value: &str) -> Result<Option<Vec<i32>>, CliError> {
    const FLAG: &str = "--net";
    let Some(IntegerList(list)) = convert::<IntegerList>(parser, FLAG, value, "fd")? else {
        return Ok(None);
    };
    list.into_iter()
        .map(|fd| {
            i32::try_from(fd)
                .map_err(|_| invalid(FLAG, value, format!("fd {fd} is not a descriptor number")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn parse_cpus(value: &str) -> Result<CpusConfig, CliError> {
    const FLAG: &str = "--cpus";
    let mut parser = OptionParser::new();
    parser
        .add("boot")
        .add("max")
        .add("topology")
        .add("kvm_hyperv")
        .add("max_phys_bits")
        .add("affinity")
        .add("features")
        .add("nested")
        .add("core_scheduling");
    parse_options(&mut parser, FLAG, value)?;

    if parser.get("features").is_some() {
        return Err(CliError::UnsupportedOption {
            flag: FLAG,
            what: "features".to_owned(),
        });
    }
    if convert::<bool>(&parser, FLAG, value, "kvm_hyperv")? == Some(true) {
        return Err(CliError::UnsupportedOption {
            flag: FLAG,
            what: "kvm_hyperv=on".to_owned(),
        });
    }
    if convert::<bool>(&parser, FLAG, value, "nested")? == Some(false) {
        return Err(CliError::UnsupportedOption {
            flag: FLAG,
            what: "nested=off".to_owned(),
        });
    }
    let max_phys_bits = convert::<u8>(&parser, FLAG, value, "max_phys_bits")?;
    if max_phys_bits.is_some_and(|bits| bits != DEFAULT_MAX_PHYS_BITS) {
        return Err(CliError::UnsupportedOption {
            flag: FLAG,
            what: format!("max_phys_bits other than {DEFAULT_MAX_PHYS_BITS}"),
        });
    }

    let mut cpus = CpusConfig::default();
    if let Some(topology) = parser.get("topology") {
        cpus.topology = Some(parse_topology(topology).map_err(|why| invalid(FLAG, value, why))?);
    }
    if let Some(IndexedLists(pairs)) = convert::<IndexedLists>(&parser, FLAG, value, "affinity")? {
        let affinity = pairs
            .into_iter()
            .map(|(vcpu, cpus)| {
                let host_cpus = cpus
                    .into_iter()
                    .map(usize::try_from)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| invalid(FLAG, value, "a host CPU number is too large"))?;
                Ok(CpuAffinity { vcpu, host_cpus })
            })
            .collect::<Result<Vec<_>, CliError>>()?;
        cpus.affinity = Some(affinity);
    }
    cpus.core_scheduling = match parser.get("core_scheduling") {
        None => CoreScheduling::default(),
        Some(mode) if mode.eq_ignore_ascii_case("vm") => CoreScheduling::Vm,
        Some(mode) if mode.eq_ignore_ascii_case("vcpu") => CoreScheduling::Vcpu,
        Some(mode) if mode.eq_ignore_ascii_case("off") => CoreScheduling::Off,
        Some(_) => {
            return Err(invalid(
                FLAG,
                value,
                "core_scheduling must be vm, vcpu or off",
            ))
        }
    };
    let boot = convert::<u8>(&parser, FLAG, value, "boot")?;
    let max = convert::<u8>(&parser, FLAG, value, "max")?;
    // As in Cloud Hypervisor, max defaults to boot and boot to 1.
    cpus.boot_vcpus = boot.unwrap_or(cpus.boot_vcpus);
    cpus.max_vcpus = max.unwrap_or(cpus.boot_vcpus);
    Ok(cpus)
}

/// `topology=<threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>`.
fn parse_topology(value: &str) -> Result<CpuTopology, String> {
    let parts = value
        .split(':')
        .map(|part| part.trim().parse::<u16>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            "topology must be <threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>"
                .to_string()
        })?;
    match parts.as_slice() {
        &[threads_per_core, cores_per_die, dies_per_package, packages] => Ok(CpuTopology {
            threads_per_core,
            cores_per_die,
            dies_per_package,
            packages,
        }),
        _ => Err(
            "topology must be <threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>"
                .to_string(),
        ),
    }
}

fn parse_memory(value: &str) -> Result<MemoryConfig, CliError> {
    const FLAG: &str = "--memory";
    let mut parser = OptionParser::new();
    parser
        .add("size")
        .add("mergeable")
        .add("shared")
        .add("hugepages")
        .add("hugepage_size")
        .add("hotplug_method")
        .add("hotplug_size")
        .add("hotplugged_size")
        .add("prefault")
        .add("thp");
    parse_options(&mut parser, FLAG, value)?;

    let flag = |key: &str| convert::<bool>(&parser, FLAG, value, key);
    let size = |key: &str| {
        convert::<ByteSize>(&parser, FLAG, value, key).map(|size| size.map(|ByteSize(n)| n))
    };
    let hotplug_method = match parser.get("hotplug_method") {
        None => HotplugMethod::default(),
        Some(method) if method.eq_ignore_ascii_case("acpi") => HotplugMethod::Acpi,
        Some(method) if method.eq_ignore_ascii_case("virtio-mem") => HotplugMethod::VirtioMem,
        Some(_) => {
            return Err(invalid(
                FLAG,
                value,
                "hotplug_method must be acpi or virtio-mem",
            ))
        }
    };
    let defaults = MemoryConfig::default();
    Ok(MemoryConfig {
        size: size("size")?.unwrap_or(DEFAULT_MEMORY_MB << 20),
        mergeable: flag("mergeable")?.unwrap_or(defaults.mergeable),
        hotplug_method,
        hotplug_size: size("hotplug_size")?,
        hotplugged_size: size("hotplugged_size")?,
        shared: flag("shared")?.unwrap_or(defaults.shared),
        hugepages: flag("hugepages")?.unwrap_or(defaults.hugepages),
        hugepage_size: size("hugepage_size")?,
        prefault: flag("prefault")?.unwrap_or(defaults.prefault),
        thp: flag("thp")?.unwrap_or(defaults.thp),
        ..defaults
    })
}

/// `--serial` / `--console`: exactly one of `off`, `null`, `pty`, `tty`,
/// `file=<path>`, `socket=<path>`, plus `iommu=on|off`.
fn parse_console_flag(flag: &'static str, value: &str) -> Result<ConsoleConfig, CliError> {
    let mut parser = OptionParser::new();
    parser
        .add_valueless("off")
        .add_valueless("null")
        .add_valueless("pty")
        .add_valueless("tty")
        .add("file")
        .add("socket")
        .add("iommu");
    parse_options(&mut parser, flag, value)?;

    let modes: Vec<&str> = ["off", "null", "pty", "tty", "file", "socket"]
        .into_iter()
        .filter(|key| parser.is_set(key))
        .collect();
    let mode = match modes.as_slice() {
        [mode] => *mode,
        [] => {
            return Err(invalid(
                flag,
                value,
                "expected one of off, null, pty, tty, file=<path>, socket=<path>",
            ))
        }
        _ => {
            return Err(invalid(
                flag,
                value,
                format!("only one of {} may be given", modes.join(", ")),
            ))
        }
    };
    let path = |key: &str| match parser.get(key) {
        Some(path) => Ok(Some(PathBuf::from(path))),
        None => Err(invalid(
            flag,
            value,
            format!("{key} needs a path: {key}=<path>"),
        )),
    };
    let mut config = ConsoleConfig::with_mode(match mode {
        "off" => ConsoleOutputMode::Off,
        "null" => ConsoleOutputMode::Null,
        "pty" => ConsoleOutputMode::Pty,
        "tty" => ConsoleOutputMode::Tty,
        "file" => ConsoleOutputMode::File,
        _ => ConsoleOutputMode::Socket,
    });
    match config.mode {
        ConsoleOutputMode::File => config.file = path("file")?,
        ConsoleOutputMode::Socket => config.socket = path("socket")?,
        _ => {}
    }
    config.iommu = convert::<bool>(&parser, flag, value, "iommu")?.unwrap_or(false);

    let unsupported = match (flag, config.mode) {
        ("--serial", ConsoleOutputMode::Pty) => Some("pty"),
        _ if config.iommu => Some("iommu=on"),
        _ => None,
    };
    match unsupported {
        Some(what) => Err(CliError::UnsupportedOption {
            flag,
            what: what.to_owned(),
        }),
        None => Ok(config),
    }
}

/// The PCI placement options Cloud Hypervisor's devices share (`id`, `iommu`, `pci_segment`,
/// `pci_device_id`), for [`VmConfig::validate`] to judge.
struct PciOptions {
    id: Option<String>,
    iommu: bool,
    pci_segment: u16,
    pci_device_id: Option<u8>,
}

fn pci_options(
    parser: &OptionParser,
    flag: &'static str,
    value: &str,
) -> Result<PciOptions, CliError> {
    Ok(PciOptions {
        id: parser.get("id").map(str::to_owned),
        iommu: convert::<bool>(parser, flag, value, "iommu")?.unwrap_or(false),
        pci_segment: convert::<u16>(parser, flag, value, "pci_segment")?.unwrap_or(0),
        pci_device_id: convert::<u8>(parser, flag, value, "pci_device_id")?,
    })
}

/// A path option that must be given.
fn required_path(
    parser: &OptionParser,
    flag: &'static str,
    value: &str,
    key: &str,
) -> Result<PathBuf, CliError> {
    parser
        .get(key)
        .map(PathBuf::from)
        .ok_or_else(|| invalid(flag, value, format!("{key}=<path> is required")))
}

/// `--vsock cid=<cid>,socket=<path>[,iommu=on|off][,id=..][,pci_segment=..][,pci_device_id=..]`.
pub fn parse_vsock(value: &str) -> Result<VsockConfig, CliError> {
    const FLAG: &str = "--vsock";
    let mut parser = OptionParser::new();
    parser
        .add("cid")
        .add("socket")
        .add("iommu")
        .add("id")
        .add("pci_segment")
        .add("pci_device_id");
    parse_options(&mut parser, FLAG, value)?;
    let socket = required_path(&parser, FLAG, value, "socket")?;
    let Some(cid) = convert::<u32>(&parser, FLAG, value, "cid")? else {
        return Err(invalid(FLAG, value, "cid=<context id> is required"));
    };
    let pci = pci_options(&parser, FLAG, value)?;
    Ok(VsockConfig {
        iommu: pci.iommu,
        pci_segment: pci.pci_segment,
        pci_device_id: pci.pci_device_id,
        id: pci.id,
        ..VsockConfig::new(cid, socket)
    })
}

/// `--pmem file=<path>[,size=<size>][,discard_writes=on|off][,iommu=on|off][,id=..]...`.
pub fn parse_pmem(value: &str) -> Result<PmemConfig, CliError> {
    const FLAG: &str = "--pmem";
    let mut parser = OptionParser::new();
    parser
        .add("file")
        .add("size")
        .add("discard_writes")
        .add("iommu")
        .add("id")
        .add("pci_segment")
        .add("pci_device_id");
    parse_options(&mut parser, FLAG, value)?;
    let file = required_path(&parser, FLAG, value, "file")?;
    let size = convert::<ByteSize>(&parser, FLAG, value, "size")?.map(|ByteSize(n)| n);
    let discard_writes = convert::<bool>(&parser, FLAG, value, "discard_writes")?.unwrap_or(false);
    let pci = pci_options(&parser, FLAG, value)?;
    Ok(PmemConfig {
        size,
        discard_writes,
        iommu: pci.iommu,
        pci_segment: pci.pci_segment,
        pci_device_id: pci.pci_device_id,
        id: pci.id,
        ..PmemConfig::new(file)
    })
}

/// `--fs tag=<tag>,socket=<path>[,num_queues=N][,queue_size=N][,id=..][,pci_segment=..]...`.
pub fn parse_fs(value: &str) -> Result<FsConfig, CliError> {
    const FLAG: &str = "--fs";
    let mut parser = OptionParser::new();
    parser
        .add("tag")
        .add("socket")
        .add("num_queues")
        .add("queue_size")
        .add("id")
        .add("pci_segment")
        .add("pci_device_id")
        // Older Cloud Hypervisor releases' DAX window; named so the refusal says what it is.
        .add("dax")
        .add("cache_size");
    parse_options(&mut parser, FLAG, value)?;
    if parser.is_set("dax") || parser.is_set("cache_size") {
        return Err(CliError::UnsupportedOption {
            flag: FLAG,
            what: "a DAX window (dax=, cache_size=)".into(),
        });
    }
    let Some(tag) = parser.get("tag") else {
        return Err(invalid(FLAG, value, "tag=<tag> is required"));
    };
    let socket = required_path(&parser, FLAG, value, "socket")?;
    let mut fs = FsConfig::new(tag, socket);
    fs.num_queues = convert::<usize>(&parser, FLAG, value, "num_queues")?.unwrap_or(fs.num_queues);
    fs.queue_size = convert::<u16>(&parser, FLAG, value, "queue_size")?.unwrap_or(fs.queue_size);
    fs.id = parser.get("id").map(str::to_owned);
    fs.pci_segment = convert::<u16>(&parser, FLAG, value, "pci_segment")?.unwrap_or(0);
    fs.pci_device_id = convert::<u8>(&parser, FLAG, value, "pci_device_id")?;
    Ok(fs)
}

/// `--rng src=<path>,iommu=on|off` (Cloud Hypervisor's syntax; only `iommu=off` here).
fn parse_rng(value: &str) -> Result<RngConfig, CliError> {
    const FLAG: &str = "--rng";
    let mut parser = OptionParser::new();
    parser.add("src").add("iommu");
    parse_options(&mut parser, FLAG, value)?;
    let mut rng = RngConfig::default();
    if parser.is_set("src") {
        let Some(src) = parser.get("src") else {
            return Err(invalid(FLAG, value, "src needs a path: src=<path>"));
        };
        rng.src = PathBuf::from(src);
    }
    rng.iommu = convert::<bool>(&parser, FLAG, value, "iommu")?.unwrap_or(false);
    if rng.iommu {
        return Err(CliError::UnsupportedOption {
            flag: FLAG,
            what: "iommu=on (there is no virtual IOMMU)".to_owned(),
        });
    }
    Ok(rng)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<CliOptions, CliError> {
        let mut argv = vec!["cloud-hypervisor"];
        argv.extend_from_slice(args);
        match parse_args(argv)? {
            CliOutcome::Run(options) => Ok(options),
            other => panic!("expected Run, got {other:?}"),
        }
    }

    fn config(args: &[&str]) -> VmConfig {
        let mut full = vec!["--kernel", "/path/to/kernel"];
        full.extend_from_slice(args);
        run(&full).unwrap().vm_config.unwrap()
    }

    fn error(args: &[&str]) -> String {
        run(args).unwrap_err().to_string()
    }

    fn kernel_error(args: &[&str]) -> String {
        let mut full = vec!["--kernel", "/k"];
        full.extend_from_slice(args);
        error(&full)
    }

    #[test]
    fn kernel_alone_gives_cloud_hypervisor_defaults() {
        let options = run(&["--kernel", "/path/to/kernel"]).unwrap();
        let expected: VmConfig =
            serde_json::from_str(r#"{"payload": {"kernel": "/path/to/kernel"}}"#).unwrap();
        assert_eq!(options.vm_config, Some(expected));
        assert_eq!(options.api_socket, None);
        assert_eq!(options.event_monitor, None);
        assert_eq!(options.log_file, None);
        assert_eq!(options.verbosity, 0);
        assert_eq!(options.seccomp, SeccompAction::Trap);
    }

    #[test]
    fn full_command_line_matches_json() {
        let cli = config(&[
            "--cpus",
            "boot=2,max=4",
            "--memory",
            "size=1G",
            "--cmdline",
            "console=ttyS0 reboot=k panic=1",
            "--initramfs",
            "/path/to/initrd",
            "--serial",
            "tty",
            "--console",
            "off",
        ]);
        let json: VmConfig = serde_json::from_str(
            r#"{
                "cpus": {"boot_vcpus": 2, "max_vcpus": 4},
                "memory": {"size": 1073741824},
                "payload": {"kernel": "/path/to/kernel", "initramfs": "/path/to/initrd",
                            "cmdline": "console=ttyS0 reboot=k panic=1"},
                "serial": {"mode": "Tty"},
                "console": {"mode": "Off"}
            }"#,
        )
        .unwrap();
        assert_eq!(cli, json);
    }

    #[test]
    fn cpus() {
        assert_eq!(config(&["--cpus", "boot=3"]).cpus.max_vcpus, 3);
        let cpus = config(&["--cpus", "max=4"]).cpus;
        assert_eq!((cpus.boot_vcpus, cpus.max_vcpus), (1, 4));
        let cpus = config(&["--cpus", "boot=2,max=4,kvm_hyperv=off,max_phys_bits=46"]).cpus;
        assert_eq!((cpus.boot_vcpus, cpus.max_vcpus), (2, 4));

        assert_eq!(
            kernel_error(&["--cpus", "boot=x"]),
            "--cpus: invalid value \"boot=x\": boot must be an integer"
        );
        assert_eq!(
            kernel_error(&["--cpus", "boot=300"]),
            "--cpus: invalid value \"boot=300\": boot must be an integer from 0 to 255"
        );
        assert!(kernel_error(&["--cpus", "cores=2"])
            .starts_with("--cpus: invalid value \"cores=2\": unknown option \"cores\" (valid options: boot, max,"));
        assert_eq!(
            kernel_error(&["--cpus", "boot=1,boot=2"]),
            "--cpus: invalid value \"boot=1,boot=2\": option \"boot\" is given more than once"
        );
        assert_eq!(
            kernel_error(&["--cpus", "boot=4,max=2"]),
            "--cpus: cpus.max_vcpus (2) must be at least cpus.boot_vcpus (4)"
        );
        assert_eq!(
            kernel_error(&["--cpus", "boot=0"]),
            "--cpus: cpus.boot_vcpus must be at least 1"
        );
        assert_eq!(
            kernel_error(&["--cpus", "boot=1,topology=1:2:1:1"]),
            "--cpus: cpus.topology: threads_per_core (1) * cores_per_die (2) * \
             dies_per_package (1) * packages (1) = 2, but cpus.max_vcpus is 1; each part must \
             be at least 1 and the product must equal max_vcpus"
        );
        assert_eq!(
            kernel_error(&["--cpus", "boot=1,topology=1:2"]),
            "--cpus: invalid value \"boot=1,topology=1:2\": topology must be \
             <threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>"
        );
        assert_eq!(
            kernel_error(&["--cpus", "affinity=[0@[0-3]"]),
            "--cpus: invalid value \"affinity=[0@[0-3]\": unbalanced \"[\" and \"]\""
        );
        assert_eq!(
            kernel_error(&["--cpus", "boot=1,affinity=[1@[0]]"]),
            "--cpus: cpus.affinity: vCPU 1 is not below max_vcpus (1)"
        );
        assert_eq!(
            kernel_error(&["--cpus", "kvm_hyperv=on"]),
            "--cpus: kvm_hyperv=on is not supported yet"
        );
        assert_eq!(
            kernel_error(&["--cpus", "features=amx"]),
            "--cpus: features is not supported yet"
        );
    }

    #[test]
    fn memory() {
        assert_eq!(config(&["--memory", "size=1G"]).memory.size, 1 << 30);
        assert_eq!(
            config(&["--memory", "size=1073741824"]).memory.size,
            1 << 30
        );
        assert_eq!(
            config(&["--memory", "size=128M,shared=off,hugepages=false"])
                .memory
                .size,
            128 << 20
        );
        assert!(!config(&["--memory", "size=256M,thp=off"]).memory.thp);
        assert_eq!(
            config(&["--memory", "hugepages=off"]).memory.size,
            512 << 20
        );

        assert_eq!(
            kernel_error(&["--memory", "size=lots"]),
            "--memory: invalid value \"size=lots\": size must be a size in bytes, optionally with a K, M, G or T suffix"
        );
        let memory = config(&[
            "--memory",
            "size=1G,shared=on,hugepages=on,hugepage_size=2M",
        ])
        .memory;
        assert!(memory.shared && memory.hugepages);
        assert_eq!(memory.hugepage_size, Some(2 << 20));
        assert_eq!(
            kernel_error(&["--memory", "size=1G,hugepages=on,hugepage_size=4M"]),
            "--memory: memory.hugepage_size: 4194304 is not a huge page size of x86_64 (2 MiB or 1 GiB)"
        );
        assert_eq!(
            kernel_error(&["--memory", "size=1G,shared=maybe"]),
            "--memory: invalid value \"size=1G,shared=maybe\": shared must be on, off, true or false"
        );
        assert!(kernel_error(&["--memory", "size=16M"]).starts_with("--memory: memory.size"));
        assert!(
            kernel_error(&["--memory", "size=1000000000"]).contains("must be a multiple of 4 KiB")
        );
        assert!(kernel_error(&["--memory", "size=1G,hotplug_method=dimm"])
            .ends_with("hotplug_method must be acpi or virtio-mem"));
        // Room for a later resize: accepted and echoed; the resize itself is refused.
        assert_eq!(
            config(&["--memory", "size=1G,hotplug_size=1G"])
                .memory
                .hotplug_size,
            Some(1 << 30)
        );
        assert!(kernel_error(&["--memory", "size=1G,hotplugged_size=1G"])
            .ends_with("is not supported yet"));
    }

    #[test]
    fn serial_modes() {
        let serial = |v: &str| config(&["--serial", v, "--console", "off"]).serial;
        assert_eq!(serial("off").mode, ConsoleOutputMode::Off);
        assert_eq!(serial("null").mode, ConsoleOutputMode::Null);
        assert_eq!(serial("tty").mode, ConsoleOutputMode::Tty);
        let file = serial("file=/tmp/serial.log");
        assert_eq!(file.mode, ConsoleOutputMode::File);
        assert_eq!(file.file, Some(PathBuf::from("/tmp/serial.log")));
        let socket = serial("socket=/tmp/serial.sock");
        assert_eq!(socket.mode, ConsoleOutputMode::Socket);
        assert_eq!(socket.socket, Some(PathBuf::from("/tmp/serial.sock")));
        assert_eq!(
            serial("file=\"/tmp/a,b\"").file,
            Some(PathBuf::from("/tmp/a,b"))
        );

        assert_eq!(
            kernel_error(&["--serial", "pty"]),
            "--serial: pty is not supported yet"
        );
        assert_eq!(
            kernel_error(&["--serial", "file="]),
            "--serial: invalid value \"file=\": file needs a path: file=<path>"
        );
        assert_eq!(
            kernel_error(&["--serial", "tty,off"]),
            "--serial: invalid value \"tty,off\": only one of off, tty may be given"
        );
        assert!(kernel_error(&["--serial", "bogus"]).starts_with(
            "--serial: invalid value \"bogus\": unknown option \"bogus\" (valid options: off, null, pty, tty, file, socket, iommu)"
        ));
        assert_eq!(
            kernel_error(&["--serial", "off,iommu=on"]),
            "--serial: iommu=on is not supported yet"
        );
        assert!(kernel_error(&["--serial", ""]).contains("expected one of off, null"));
    }

    #[test]
    fn serial_tty_keeps_default_console_and_conflicts() {
        assert_eq!(
            kernel_error(&["--serial", "tty"]),
            "--serial/--console: serial.mode and console.mode cannot both be Tty"
        );
        assert_eq!(
            config(&["--serial", "tty", "--console", "null"])
                .console
                .mode,
            ConsoleOutputMode::Null
        );
    }

    #[test]
    fn console_modes() {
        for (value, mode) in [
            ("off", ConsoleOutputMode::Off),
            ("null", ConsoleOutputMode::Null),
            ("tty", ConsoleOutputMode::Tty),
        ] {
            assert_eq!(config(&["--console", value]).console.mode, mode);
        }
        assert_eq!(
            config(&["--console", "pty"]).console.mode,
            ConsoleOutputMode::Pty
        );
        let file = config(&["--console", "file=/tmp/c"]).console;
        assert_eq!(file.mode, ConsoleOutputMode::File);
        assert_eq!(file.file, Some(PathBuf::from("/tmp/c")));
        let socket = config(&["--console", "socket=/tmp/c.sock"]).console;
        assert_eq!(socket.mode, ConsoleOutputMode::Socket);
        assert_eq!(socket.socket, Some(PathBuf::from("/tmp/c.sock")));
        assert_eq!(
            kernel_error(&["--console", "tty,iommu=on"]),
            "--console: iommu=on is not supported yet"
        );
        // Cloud Hypervisor's defaults, and the harness's explicit form.
        assert_eq!(config(&[]).console.mode, ConsoleOutputMode::Tty);
        assert_eq!(config(&[]).serial.mode, ConsoleOutputMode::Null);
        let explicit = config(&["--serial", "tty", "--console", "off"]);
        assert_eq!(explicit.serial.mode, ConsoleOutputMode::Tty);
        assert_eq!(explicit.console.mode, ConsoleOutputMode::Off);
    }

    #[test]
    fn rng_flag() {
        assert_eq!(config(&[]).rng, RngConfig::default());
        assert_eq!(config(&[]).rng.src, PathBuf::from("/dev/urandom"));
        let rng = config(&["--rng", "src=/dev/random"]).rng;
        assert_eq!(rng.src, PathBuf::from("/dev/random"));
        assert!(!rng.iommu);
        assert_eq!(
            config(&["--rng", "src=/dev/hwrng,iommu=off"]).rng.src,
            PathBuf::from("/dev/hwrng")
        );
        assert_eq!(
            kernel_error(&["--rng", "src=/dev/urandom,iommu=on"]),
            "--rng: iommu=on (there is no virtual IOMMU) is not supported yet"
        );
        assert!(kernel_error(&["--rng", "source=/dev/urandom"]).starts_with("--rng: "));
        assert!(kernel_error(&["--rng", "src="]).starts_with("--rng: "));
        assert_eq!(
            error(&["--rng", "src=/dev/urandom"]),
            "--rng requires --kernel"
        );
    }

    #[test]
    fn payload_flags() {
        let config = config(&[
            "--cmdline",
            "root=/dev/vda1 console=hvc0",
            "--initramfs",
            "/i",
        ]);
        let payload = config.payload.unwrap();
        assert_eq!(payload.kernel, Some(PathBuf::from("/path/to/kernel")));
        assert_eq!(
            payload.cmdline.as_deref(),
            Some("root=/dev/vda1 console=hvc0")
        );
        assert_eq!(payload.initramfs, Some(PathBuf::from("/i")));
    }

    #[test]
    fn kernel_or_api_socket_required() {
        assert_eq!(
            error(&["-v"]),
            "a payload is required: pass --kernel <PATH>, or --api-socket to wait for vm.create"
        );
        assert_eq!(run(&["-v"]).unwrap_err(), CliError::MissingPayload);
        let options = run(&["--api-socket", "/tmp/ch.sock"]).unwrap();
        assert_eq!(options.vm_config, None);
        assert_eq!(
            options.api_socket,
            Some(ApiSocket::Path(PathBuf::from("/tmp/ch.sock")))
        );
        assert_eq!(
            error(&["--api-socket", "/tmp/ch.sock", "--cpus", "boot=2"]),
            "--cpus requires --kernel"
        );
        assert_eq!(error(&["--cmdline", "x"]), "--cmdline requires --kernel");
    }

    #[test]
    fn api_socket_forms() {
        let socket = |v: &str| run(&["--api-socket", v]).unwrap().api_socket;
        assert_eq!(
            socket("path=/run/ch.sock"),
            Some(ApiSocket::Path("/run/ch.sock".into()))
        );
        assert_eq!(socket("fd=3"), Some(ApiSocket::Fd(3)));
        assert_eq!(socket("/tmp/a=b"), Some(ApiSocket::Path("/tmp/a=b".into())));
        assert_eq!(
            error(&["--api-socket", "fd=x"]),
            "--api-socket: invalid value \"fd=x\": fd must be an integer"
        );
        assert_eq!(
            error(&["--api-socket", "fd=-1"]),
            "--api-socket: invalid value \"fd=-1\": fd must be a non-negative integer"
        );
        assert_eq!(
            error(&["--api-socket", "path=/a,fd=3"]),
            "--api-socket: invalid value \"path=/a,fd=3\": give either path or fd, not both"
        );
        assert!(error(&["--api-socket", "path=/a,mode=1"]).contains("unknown option \"mode\""));
        assert!(error(&["--api-socket", ""]).starts_with("--api-socket: invalid value"));
    }

    #[test]
    fn event_monitor_forms() {
        let monitor = |v: &str| {
            run(&["--kernel", "/k", "--event-monitor", v])
                .unwrap()
                .event_monitor
        };
        assert_eq!(
            monitor("path=/tmp/ev"),
            Some(EventMonitor::Path("/tmp/ev".into()))
        );
        assert_eq!(monitor("fd=4"), Some(EventMonitor::Fd(4)));
        assert!(kernel_error(&["--event-monitor", "/tmp/ev"])
            .starts_with("--event-monitor: invalid value \"/tmp/ev\": unknown option"));
        assert!(kernel_error(&["--event-monitor", "path="]).ends_with("path must not be empty"));
    }

    #[test]
    fn process_options() {
        let options = run(&[
            "--kernel",
            "/k",
            "-vvv",
            "--log-file",
            "/tmp/ch.log",
            "--seccomp",
            "log",
        ])
        .unwrap();
        assert_eq!(options.verbosity, 3);
        assert_eq!(options.log_file, Some(PathBuf::from("/tmp/ch.log")));
        assert_eq!(options.seccomp, SeccompAction::Log);
        assert_eq!(run(&["--kernel", "/k", "-v", "-v"]).unwrap().verbosity, 2);
        assert_eq!(
            run(&["--kernel", "/k", "--seccomp", "false"])
                .unwrap()
                .seccomp,
            SeccompAction::Allow
        );
        assert_eq!(
            run(&["--kernel", "/k", "--seccomp", "true"])
                .unwrap()
                .seccomp,
            SeccompAction::Trap
        );
        assert_eq!(
            kernel_error(&["--seccomp", "maybe"]),
            "--seccomp: invalid value \"maybe\": expected true, false or log"
        );
    }

    #[test]
    fn unsupported_flags_are_named() {
        for flag in UNSUPPORTED_VALUE_FLAGS {
            let long = format!("--{flag}");
            assert_eq!(
                kernel_error(&[&long, "path=/x"]),
                format!("--{flag} is not supported yet")
            );
            assert_eq!(
                kernel_error(&[&long]),
                format!("--{flag} is not supported yet")
            );
        }
        for flag in UNSUPPORTED_SWITCHES {
            let long = format!("--{flag}");
            assert_eq!(
                kernel_error(&[&long]),
                format!("--{flag} is not supported yet")
            );
        }
        assert_eq!(
            kernel_error(&[
                "--rng",
                "src=/dev/urandom",
                "--platform",
                "num_pci_segments=2"
            ]),
            "--platform is not supported yet"
        );
    }

    #[test]
    fn restore_takes_the_vm_from_a_snapshot() {
        let options = run(&["--restore", "source_url=file:///tmp/snap"]).unwrap();
        assert_eq!(options.vm_config, None);
        assert_eq!(
            options.restore,
            Some(RestoreRequest {
                source_url: "file:///tmp/snap".into(),
                prefault: false,
                resume: false,
            })
        );
        let options = run(&[
            "--api-socket",
            "/tmp/ch.sock",
            "--restore",
            "source_url=\"file:///tmp/a,b\",prefault=on,resume=true",
            "-v",
            "--seccomp",
            "false",
            "--event-monitor",
            "path=/tmp/ev",
            "--log-file",
            "/tmp/log",
        ])
        .unwrap();
        assert_eq!(options.vm_config, None);
        assert_eq!(
            options.restore,
            Some(RestoreRequest {
                source_url: "file:///tmp/a,b".into(),
                prefault: true,
                resume: true,
            })
        );
        assert_eq!(
            options.api_socket,
            Some(ApiSocket::Path("/tmp/ch.sock".into()))
        );
        assert_eq!(options.seccomp, SeccompAction::Allow);
        assert_eq!(run(&["--kernel", "/k"]).unwrap().restore, None);
        assert_eq!(
            run(&["--restore", "source_url=file:///s,resume=off"])
                .unwrap()
                .restore
                .map(|r| r.resume),
            Some(false)
        );
    }

    #[test]
    fn restore_refuses_vm_flags_and_bad_values() {
        let restore = ["--restore", "source_url=file:///tmp/snap"];
        let with = |flags: &[&str]| {
            let mut args = restore.to_vec();
            args.extend_from_slice(flags);
            error(&args)
        };
        assert_eq!(
            with(&["--kernel", "/k"]),
            "--restore cannot be combined with --kernel: the snapshot holds the VM configuration"
        );
        assert_eq!(
            error(&["--kernel", "/k", "--restore", "source_url=file:///s"]),
            "--restore cannot be combined with --kernel: the snapshot holds the VM configuration"
        );
        for (flag, value) in [
            ("--cpus", "boot=2"),
            ("--memory", "size=1G"),
            ("--cmdline", "x"),
            ("--initramfs", "/i"),
            ("--disk", "path=/d"),
            ("--net", "tap=t0"),
            ("--serial", "tty"),
            ("--console", "off"),
        ] {
            assert_eq!(
                with(&[flag, value]),
                format!("--restore cannot be combined with {flag}: the snapshot holds the VM configuration")
            );
        }
        assert_eq!(
            with(&["--memory", "size=1G", "--kernel", "/k"]),
            "--restore cannot be combined with --memory: the snapshot holds the VM configuration"
        );
        assert_eq!(
            error(&["--restore", "prefault=on"]),
            "--restore: invalid value \"prefault=on\": source_url=file://<snapshot directory> is required"
        );
        assert_eq!(
            error(&["--restore", "source_url=/tmp/snap"]),
            "--restore: invalid value \"source_url=/tmp/snap\": source_url must be file://<snapshot directory>"
        );
        assert!(error(&["--restore", "source_url=file://"])
            .ends_with("source_url must be file://<snapshot directory>"));
        assert!(error(&["--restore", "file:///tmp/snap"])
            .starts_with("--restore: invalid value \"file:///tmp/snap\": unknown option"));
        assert_eq!(
            error(&["--restore", "source_url=file:///s,prefault=yes"]),
            "--restore: invalid value \"source_url=file:///s,prefault=yes\": prefault must be on, off, true or false"
        );
        assert!(error(&["--restore", "source_url=file:///s,bogus=1"])
            .contains("unknown option \"bogus\" (valid options: source_url, prefault, resume,"));
        assert_eq!(
            error(&["--restore", "source_url=file:///s,net_fds=[net0@[3]]"]),
            "--restore: net_fds is not supported yet"
        );
        assert!(error(&["--restore"]).contains("--restore"));
        let err = error(&[
            "--restore",
            "source_url=file:///a",
            "--restore",
            "source_url=file:///b",
        ]);
        assert!(err.contains("--restore") && !err.contains('\n'), "{err}");
    }

    #[test]
    fn disks_and_nets_parse_with_cloud_hypervisor_syntax() {
        let cfg = config(&[
            "--disk",
            "path=/a,readonly=on,id=d0",
            "path=\"/b,c\",queue_size=64",
            "--net",
            "tap=tap0,mac=12:34:56:78:9a:bc,ip=10.1.2.1,mask=255.255.0.0,mtu=1400",
        ]);
        let disks = cfg.disks.unwrap();
        assert_eq!(disks.len(), 2);
        assert!(disks[0].readonly);
        assert_eq!(disks[0].id.as_deref(), Some("d0"));
        assert_eq!(disks[1].path.as_deref(), Some(std::path::Path::new("/b,c")));
        assert_eq!(disks[1].queue_size, 64);
        let net = &cfg.net.unwrap()[0];
        assert_eq!(net.tap.as_deref(), Some("tap0"));
        assert_eq!(net.ip.map(|ip| ip.to_string()).as_deref(), Some("10.1.2.1"));
        assert_eq!(net.mtu, Some(1400));
        assert!(kernel_error(&["--disk", "readonly=on"]).contains("path=<disk image> is required"));
        assert!(kernel_error(&["--disk", "path=/a,queue_size=3"]).contains("--disk"));
        assert!(kernel_error(&["--disk", "path=/a,bogus=1"]).contains("bogus"));
        assert!(kernel_error(&["--net", "mac=12:34"]).starts_with("--net: net.mac"));
        assert!(kernel_error(&["--net", "ip=1.2.3"]).contains("ip must be an IPv4 address"));
        // Cloud Hypervisor's TAP descriptors: one per queue pair, and we have one pair.
        let with_fd = |fd: &str| config(&["--net", fd]).net.unwrap()[0].fds.clone().unwrap();
        assert_eq!(with_fd("fd=3"), [3]);
        assert_eq!(with_fd("fd=[7],mac=12:34:56:78:9a:bc"), [7]);
        assert_eq!(
            kernel_error(&["--net", "fd=[3,4]"]),
            "--net: net.fds: 2 descriptor(s) for num_queues=2: give one TAP descriptor per queue \
             pair"
        );
        assert!(kernel_error(&["--net", "fd=[3,4],num_queues=4"]).contains("multiqueue"));
        assert!(kernel_error(&["--net", "fd=2"]).contains("reserved descriptor"));
        assert!(kernel_error(&["--net", "fd=3,tap=tap0"]).contains("not both"));
        assert!(kernel_error(&["--net", "fd=x"]).contains("a list of integers"));
        assert!(kernel_error(&["--net", "fd=4294967296"]).contains("not a descriptor number"));
        assert!(kernel_error(&["--disk", "path=/a,id=x", "--net", "id=x"])
            .contains("used by more than one"));
        assert_eq!(error(&["--disk", "path=/a"]), "--disk requires --kernel");
    }

    #[test]
    fn clap_errors_are_one_line() {
        let err = kernel_error(&["--bogus"]);
        assert!(err.contains("--bogus"), "{err}");
        assert!(!err.contains('\n'));
        let err = kernel_error(&["--cpus", "boot=1", "--cpus", "boot=2"]);
        assert!(err.contains("--cpus"), "{err}");
        assert!(!err.contains('\n'));
        let err = error(&["--kernel"]);
        assert!(err.contains("--kernel"), "{err}");
    }

    #[test]
    fn help_and_version() {
        match parse_args(["cloud-hypervisor", "--version"]).unwrap() {
            CliOutcome::PrintAndExit { text, code } => {
                assert_eq!(code, 0);
                assert_eq!(
                    text,
                    format!(
                        "cloud-hypervisor v53.0.0 (tandem {})\n",
                        env!("CARGO_PKG_VERSION")
                    )
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_args(["cloud-hypervisor", "-V"]).unwrap(),
            CliOutcome::PrintAndExit {
                text: version_text(),
                code: 0
            }
        );
        for flag in ["-h", "--help"] {
            match parse_args(["cloud-hypervisor", flag]).unwrap() {
                CliOutcome::PrintAndExit { text, code } => {
                    assert_eq!(code, 0);
                    assert!(text.contains("Usage: cloud-hypervisor"), "{text}");
                    assert!(text.contains("--kernel"));
                    assert!(!text.contains("--tpm"), "unsupported flags stay hidden");
                    assert!(text.contains("--vsock") && text.contains("--pmem"));
                    assert!(text.ends_with('\n'));
                }
                other => panic!("{other:?}"),
            }
        }
        match parse_args(["cloud-hypervisor"]).unwrap() {
            CliOutcome::PrintAndExit { text, code } => {
                assert_eq!(code, 2);
                assert!(text.contains("Usage: cloud-hypervisor"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn vsock_pmem_and_fs_parse_in_cloud_hypervisor_syntax() {
        let options = run(&[
            "--kernel",
            "/k",
            "--vsock",
            "cid=3,socket=/run/v.sock,id=vsock0",
            "--pmem",
            "file=/img,size=2M,discard_writes=on",
            "file=/b",
            "--fs",
            "tag=myfs,socket=/run/fs.sock,num_queues=1,queue_size=512",
        ]);
        // virtio-fs needs guest memory its vhost-user backend can map.
        assert_eq!(
            options.unwrap_err().to_string(),
            "--memory: memory.shared: virtio-fs (fs) is served by a vhost-user backend, which \
             must map guest memory: set shared=on (or hugepages=on)"
        );
        assert_eq!(
            parse_vsock("cid=3,socket=/run/v.sock,id=vsock0").unwrap(),
            VsockConfig {
                id: Some("vsock0".into()),
                ..VsockConfig::new(3, "/run/v.sock")
            }
        );
        assert_eq!(
            parse_pmem("file=/img,size=2M,discard_writes=on").unwrap(),
            PmemConfig {
                size: Some(2 << 20),
                discard_writes: true,
                ..PmemConfig::new("/img")
            }
        );
        let fs = parse_fs("tag=myfs,socket=/run/fs.sock,queue_size=512,pci_segment=1").unwrap();
        assert_eq!(
            (
                fs.tag.as_str(),
                fs.queue_size,
                fs.num_queues,
                fs.pci_segment
            ),
            ("myfs", 512, 1, 1)
        );
        // vsock and pmem are wired: the flags alone give a valid configuration.
        assert!(run(&["--kernel", "/k", "--pmem", "file=/img"]).is_ok());
        assert!(run(&["--kernel", "/k", "--vsock", "cid=3,socket=/run/v.sock"]).is_ok());
        assert!(run(&[
            "--kernel",
            "/k",
            "--memory",
            "size=512M,shared=on",
            "--fs",
            "tag=t,socket=/s"
        ])
        .is_ok());
        assert_eq!(
            kernel_error(&[
                "--memory",
                "shared=on",
                "--fs",
                "tag=t,socket=/s,pci_segment=1"
            ]),
            "--fs: fs.pci_segment: PCI segment 1 (devices sit on segment 0) is not supported yet"
        );
        assert_eq!(
            kernel_error(&["--fs", "tag=t,socket=/s,dax=on,cache_size=8G"]),
            "--fs: a DAX window (dax=, cache_size=) is not supported yet"
        );
        assert_eq!(
            kernel_error(&["--vsock", "socket=/s"]),
            "--vsock: invalid value \"socket=/s\": cid=<context id> is required"
        );
        assert_eq!(
            kernel_error(&["--vsock", "cid=2,socket=/s"]),
            "--vsock: vsock.cid: 2 is reserved: guest CIDs start at 3"
        );
        assert_eq!(
            kernel_error(&["--pmem", "size=2M"]),
            "--pmem: invalid value \"size=2M\": file=<path> is required"
        );
        assert_eq!(
            kernel_error(&["--fs", "socket=/s"]),
            "--fs: invalid value \"socket=/s\": tag=<tag> is required"
        );
        assert!(kernel_error(&["--vsock", "cid=3,socket=/s,bogus=1"]).contains("bogus"));
        assert_eq!(
            error(&["--vsock", "cid=3,socket=/s"]),
            "--vsock requires --kernel"
        );
    }

    #[test]
    fn consistent_topology_is_accepted() {
        let config = config(&[
            "--cpus",
            "boot=2,max=4,topology=1:4:1:1,core_scheduling=off",
        ]);
        assert_eq!(
            config.cpus.topology,
            Some(CpuTopology {
                threads_per_core: 1,
                cores_per_die: 4,
                dies_per_package: 1,
                packages: 1,
            })
        );
        assert_eq!(config.cpus.core_scheduling, CoreScheduling::Off);
        let config = self::config(&["--cpus", "boot=4,topology=2:1:1:2"]);
        assert_eq!(config.cpus.topology.map(|t| t.cpu_count()), Some(4));
    }

    #[test]
    fn command_definition_is_consistent() {
        command().debug_assert();
    }
}
