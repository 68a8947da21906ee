//! Seccomp filters per thread kind, as Firecracker and Cloud Hypervisor do: a vCPU thread runs
//! guest-driven device emulation, so it may make only the few system calls that work needs.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

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
}

/// System calls of a vCPU thread: KVM ioctls, futexes for pause/resume, eventfd and console
/// writes, memory management by the allocator, and thread exit.
const VCPU_SYSCALLS: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_ioctl,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_read,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
];

extern "C" fn handle_sigsys(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    const MSG: &[u8] = b"Error: a thread made a system call its seccomp filter forbids \
(run with --seccomp log and check the kernel log to find it)\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe and both are in every filter.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(1);
    }
}

/// The filter for vCPU threads, or None when filtering is off.
pub fn vcpu_filter(mode: SeccompMode) -> Result<Option<Arc<BpfProgram>>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Trap => {
            vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys)
                .map_err(SeccompError::SignalHandler)?;
            SeccompAction::Trap
        }
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        VCPU_SYSCALLS.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    let program = BpfProgram::try_from(filter).map_err(SeccompError::Build)?;
    Ok(Some(Arc::new(program)))
}
