//! Seccomp filters per thread role, as Firecracker and Cloud Hypervisor do. Every thread of
//! the VMM installs the filter of its role when it starts ([`apply`]); a thread spawned later
//! also keeps the filter of the thread that spawned it (filters stack: a call must pass all
//! of them), so the control loop's filter is the broadest and each role narrows it.
//!
//! Roles and why they need what they need:
//! - control loop (`Vmm`): creates the VM (KVM ioctls of every kind), opens images, TAPs and
//!   sockets, spawns the other threads; it also builds and drops the devices hot-plugged at run
//!   time (a pmem file's mapping and KVM slot, a vsock's listener and its socket file, a
//!   vhost-user backend's connection and watchdog thread), with the same calls as at boot;
//! - `vcpu<N>`: runs the guest and guest-driven port/MMIO emulation: KVM ioctls, eventfds;
//! - `device-loop`: guest-driven virtio queues: epoll, eventfds, image and TAP reads and
//!   writes, the console's input and output and its socket client (accept4), entropy reads;
//!   no ioctl at all;
//! - `http-server` / `http-conn`: the API socket: accept, read, write, spawn a thread per
//!   connection; ioctl only to make a socket (non-)blocking;
//! - replication (`ft-*`, `migration-rx`): network streams, the witness, disk images (the
//!   backup's copies, the shared-disk retry), thread spawning for FT groups;
//! - `serial-socket`: accepts the console client and writes to it;
//! - the witness process: its sockets and its state file.
//!
//! The process mode is set once by the binary ([`set_process_mode`]); without it (libraries,
//! tests) [`apply`] installs nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a filter does with a system call outside its list (`--seccomp true|false|log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filter.
    Off,
    /// The call raises SIGSYS; the VMM reports it and exits.
    #[default]
    Trap,
    /// The call proceeds and the kernel logs it (for finding missing entries).
    Log,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(seccompiler::BackendError),
    #[error("cannot install the SIGSYS handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    #[error("cannot install the seccomp filter of the {role:?} thread: {source}")]
    Apply {
        role: ThreadRole,
        source: seccompiler::Error,
    },
}

/// What a thread does, which decides its filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRole {
    /// The control loop (the main thread of `cloud-hypervisor`).
    Vmm,
    Vcpu,
    DeviceLoop,
    /// The REST API server and its connection threads.
    Api,
    /// FT replication (sender, acks, receiver, groups) and live migration streams.
    Replication,
    SerialSocket,
    /// The `tandem-witness` process.
    Witness,
    /// The event monitor's writer: writes to its file or pipe, nothing else.
    EventMonitor,
    /// A vhost-user connection's watchdog: waits for a deadline and shuts the socket down.
    VhostUserWatchdog,
}

/// What every thread needs: memory, futexes, time, signals, its own exit, logging (the
/// SIGSYS report writes to stderr), and `abort` on a panic (`tgkill`, `rt_sigaction`).
const COMMON: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
];

/// Starting threads (the new thread runs under its parent's filter until it installs its own).
const SPAWN: &[libc::c_long] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    // A new vCPU thread pins itself (`cpus.affinity`) under the inherited filter.
    libc::SYS_sched_setaffinity,
    // A new thread installs its own filter under the inherited one.
    libc::SYS_seccomp,
    libc::SYS_set_robust_list,
];

/// Stream sockets (TCP and Unix) and waiting on them.
const NETWORK: &[libc::c_long] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_connect,
    libc::SYS_fcntl,
    // Peer credential checks (FT group): compare SO_PEERCRED with our own uid.
    libc::SYS_geteuid,
    libc::SYS_getpeername,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_listen,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_socket,
    libc::SYS_socketpair,
];

/// FT group members (joining on the control loop, rejoining on a replication thread): a pidfd
/// of the coordinator's process (`SO_PEERCRED`'s pid), polled (`poll`, in [`NETWORK`]) to tell
/// its VMM's death from a hand-off.
const GROUP_MEMBER: &[libc::c_long] = &[libc::SYS_pidfd_open];

/// Files: images, state and log files, sockets' paths.
const FILES: &[libc::c_long] = &[
    // `unix_socket::bind_owner_only` (API, FT group sockets): umask around bind, then chmod.
    libc::SYS_chmod,
    libc::SYS_fallocate,
    libc::SYS_fcntl,
    libc::SYS_fchmodat,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_lseek,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_read,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_statx,
    libc::SYS_umask,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// Event loops: epoll, eventfds, timers.
const EVENTS: &[libc::c_long] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_read,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
];

/// The control loop's extras: the process-wide work (KVM, TAP set-up, signals, pipes).
const VMM_EXTRA: &[libc::c_long] = &[
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_getuid,
    libc::SYS_ioctl,
    libc::SYS_kill,
    libc::SYS_memfd_create,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_pipe2,
    libc::SYS_prlimit64,
    libc::SYS_sysinfo,
    libc::SYS_tkill,
    libc::SYS_uname,
];

/// The device loop's extras: accepting the virtio console's socket client (its input and
/// output, like stdin, stdout and a pty, are plain `read`/`write`); virtio-vsock's host side:
/// accepting clients on its listening socket, connecting to `PATH_port` listeners (`socket`
/// is allowed for `AF_UNIX` only, see [`DEVICE_LOOP_SOCKET_DOMAIN`]), `send`/`recv` (with
/// MSG_PEEK for the CONNECT line) and half-closing connections; virtio-fs's vhost-user
/// socket: requests carrying file descriptors (guest memory, kick and call eventfds, with
/// SCM_RIGHTS) at activation and reset, and their replies.
const DEVICE_LOOP_EXTRA: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
];

/// The one socket domain the device loop may create sockets in (vsock's Unix connections).
const DEVICE_LOOP_SOCKET_DOMAIN: libc::c_int = libc::AF_UNIX;

/// A vCPU thread: KVM ioctls, futexes for pause/resume, eventfd and console writes.
const VCPU_EXTRA: &[libc::c_long] = &[
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
];

/// A vhost-user watchdog: `shutdown` on the socket whose answer is overdue (its wait is a
/// futex with a timeout, in [`COMMON`]); closing its copy of the socket when it ends (debug
/// builds of std check the descriptor with `fcntl(F_GETFD)` first).
const VHOST_USER_WATCHDOG_EXTRA: &[libc::c_long] = &[libc::SYS_fcntl, libc::SYS_shutdown];

/// The event monitor's writer: closing its file (debug builds of std check the descriptor with
/// `fcntl(F_GETFD)` before closing it).
const EVENT_MONITOR_EXTRA: &[libc::c_long] = &[libc::SYS_fcntl];

/// The requests a socket may use `ioctl` for (`set_nonblocking`, close-on-exec).
const SOCKET_IOCTLS: &[u64] = &[libc::FIONBIO, libc::FIOCLEX];

fn syscalls(role: ThreadRole) -> Vec<&'static [libc::c_long]> {
    match role {
        ThreadRole::Vmm => vec![
            COMMON,
            SPAWN,
            NETWORK,
            FILES,
            EVENTS,
            GROUP_MEMBER,
            VMM_EXTRA,
        ],
        ThreadRole::Vcpu => vec![COMMON, VCPU_EXTRA],
        ThreadRole::DeviceLoop => vec![COMMON, EVENTS, FILES, DEVICE_LOOP_EXTRA],
        ThreadRole::Api => vec![COMMON, SPAWN, NETWORK, EVENTS],
        ThreadRole::Replication => vec![COMMON, SPAWN, NETWORK, FILES, EVENTS, GROUP_MEMBER],
        ThreadRole::SerialSocket => vec![COMMON, NETWORK],
        ThreadRole::Witness => vec![COMMON, SPAWN, NETWORK, FILES],
        ThreadRole::EventMonitor => vec![COMMON, EVENT_MONITOR_EXTRA],
        ThreadRole::VhostUserWatchdog => vec![COMMON, VHOST_USER_WATCHDOG_EXTRA],
    }
}

/// `ioctl` requests a role may make, or None for any (the roles that drive KVM).
fn ioctls(role: ThreadRole) -> Option<&'static [u64]> {
    match role {
        ThreadRole::Vmm | ThreadRole::Vcpu => None,
        ThreadRole::DeviceLoop | ThreadRole::EventMonitor | ThreadRole::VhostUserWatchdog => {
            Some(&[])
        }
        ThreadRole::Api
        | ThreadRole::Replication
        | ThreadRole::SerialSocket
        | ThreadRole::Witness => Some(SOCKET_IOCTLS),
    }
}

extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    const MSG: &[u8] = b"Error: a thread made a system call its seccomp filter forbids \
(run with --seccomp log and check the kernel log to find it): system call ";
    // The kernel's siginfo for SIGSYS carries the call number as an int at offset 24
    // (after signo, errno, code, padding and the calling address).
    let number = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a complete siginfo_t (128 bytes) for SA_SIGINFO handlers.
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<i32>()) }
    };
    let mut digits = [0u8; 12];
    let mut at = digits.len() - 1;
    digits[at] = b'\n';
    let mut n = number.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || at == 1 {
            break;
        }
    }
    if number < 0 {
        at -= 1;
        digits[at] = b'-';
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe and both are in every filter; the
    // buffers outlive the calls.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::write(2, digits[at..].as_ptr().cast(), digits.len() - at);
        libc::_exit(1);
    }
}

static PROCESS_MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Sets the filtering mode of the whole process, once, before its threads start (the
/// `--seccomp` flag); installs the SIGSYS report for [`SeccompMode::Trap`].
pub fn set_process_mode(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Trap {
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys)
            .map_err(SeccompError::SignalHandler)?;
    }
    let _ = PROCESS_MODE.set(mode);
    Ok(())
}

/// Whether a role may open files (its lists include [`FILES`]).
fn opens_files(role: ThreadRole) -> bool {
    syscalls(role)
        .iter()
        .any(|list| list.contains(&libc::SYS_openat))
}

/// A role's filter: the role's own program, and for a role without files a second one that
/// answers `openat` with EACCES. glibc's malloc reads `/proc/sys/vm/overcommit_memory` from
/// whichever thread first trims a thread arena's heap (Cloud Hypervisor met the same); trapping
/// that would end the VMM over a libc detail, allowing it would let the role open files.
/// Refused, glibc assumes no strict overcommit and goes on. Filters stack and the kernel takes
/// the strictest answer, so the role's program lets `openat` through to the other one.
pub struct RoleFilter {
    programs: Vec<BpfProgram>,
}

impl RoleFilter {
    /// Installs the filter on the calling thread.
    pub fn install(&self) -> Result<(), seccompiler::Error> {
        for program in &self.programs {
            seccompiler::apply_filter(program)?;
        }
        Ok(())
    }
}

fn build(role: ThreadRole, mode: SeccompMode) -> Result<Option<RoleFilter>, SeccompError> {
    let Some(main) = build_program(role, mode)? else {
        return Ok(None);
    };
    let mut programs = Vec::new();
    if !opens_files(role) {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        rules.insert(libc::SYS_openat, Vec::new());
        let refuse = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            TargetArch::x86_64,
        )
        .map_err(SeccompError::Build)?;
        programs.push(BpfProgram::try_from(refuse).map_err(SeccompError::Build)?);
    }
    // Installed last: the role's own program may not allow installing another one.
    programs.push(main);
    Ok(Some(RoleFilter { programs }))
}

fn build_program(role: ThreadRole, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Trap => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for list in syscalls(role) {
        for &nr in list {
            rules.insert(nr, Vec::new());
        }
    }
    if !opens_files(role) {
        // Answered by the second program (see `RoleFilter`).
        rules.insert(libc::SYS_openat, Vec::new());
    }
    if role == ThreadRole::DeviceLoop {
        let unix = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            DEVICE_LOOP_SOCKET_DOMAIN as u64,
        )
        .map_err(SeccompError::Build)?;
        rules.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![unix]).map_err(SeccompError::Build)?],
        );
    }
    if let Some(allowed) = ioctls(role) {
        let mut ioctl_rules = Vec::new();
        for &request in allowed {
            let request =
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                    .map_err(SeccompError::Build)?;
            ioctl_rules.push(SeccompRule::new(vec![request]).map_err(SeccompError::Build)?);
        }
        if ioctl_rules.is_empty() {
            rules.remove(&libc::SYS_ioctl);
        } else {
            rules.insert(libc::SYS_ioctl, ioctl_rules);
        }
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    BpfProgram::try_from(filter)
        .map(Some)
        .map_err(SeccompError::Build)
}

/// Installs the filter of `role` on the calling thread (nothing when the process mode is
/// off or unset). A thread that cannot install its filter must not go on.
pub fn apply(role: ThreadRole) -> Result<(), SeccompError> {
    let Some(&mode) = PROCESS_MODE.get() else {
        return Ok(());
    };
    let Some(program) = compiled(role, mode)? else {
        return Ok(());
    };
    program
        .install()
        .map_err(|source| SeccompError::Apply { role, source })
}

/// Each role's filter, compiled once: the process mode is set once, and the device loop
/// starts anew at every epoch boundary, where compiling its filter again would lengthen the
/// checkpoint's tail.
static COMPILED: [OnceLock<Option<Arc<RoleFilter>>>; ROLES] = [const { OnceLock::new() }; ROLES];
const ROLES: usize = 9;

fn compiled(role: ThreadRole, mode: SeccompMode) -> Result<Option<Arc<RoleFilter>>, SeccompError> {
    let slot = &COMPILED[role as usize];
    if let Some(program) = slot.get() {
        return Ok(program.clone());
    }
    let program = build(role, mode)?.map(Arc::new);
    Ok(slot.get_or_init(|| program).clone())
}

/// [`apply`] for a thread body: false (and the reason logged) when the thread must not go on.
pub fn apply_or_log(role: ThreadRole) -> bool {
    match apply(role) {
        Ok(()) => true,
        Err(e) => {
            log::error!("{e}");
            false
        }
    }
}

/// The filter for vCPU threads, or None when filtering is off.
pub fn vcpu_filter(mode: SeccompMode) -> Result<Option<Arc<RoleFilter>>, SeccompError> {
    if mode == SeccompMode::Trap {
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys)
            .map_err(SeccompError::SignalHandler)?;
    }
    Ok(build(ThreadRole::Vcpu, mode)?.map(Arc::new))
}
