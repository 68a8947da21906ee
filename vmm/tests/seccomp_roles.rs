//! Each thread role's seccomp filter traps a call outside its role and lets the role's own
//! calls through. Every case runs in a child process (this test binary again, with one role
//! named in the environment): a trapped call ends that process with the VMM's SIGSYS report.

use std::process::Command;

use vmm::seccomp::{self, ThreadRole};
use vmm::SeccompMode;

const CHILD_ENV: &str = "TANDEM_SECCOMP_ROLE_CASE";

/// The child's exit code when its call failed with EACCES (refused by the filter, not
/// trapped).
const REFUSED: i32 = 13;

/// How a case's call ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Allowed,
    /// The filter answered EACCES: the thread goes on, nothing was opened.
    Refused,
    Trapped,
}

/// What a child does: install `role`'s filter, then make one call.
#[derive(Clone, Copy, Debug)]
enum Call {
    /// `getcpu` as a system call (normally answered by the vDSO): in no role's list, and
    /// harmless if it were let through.
    Getcpu,
    /// `openat` of /dev/null.
    Open,
    /// What glibc's malloc does from whichever thread first trims a thread arena's heap: read
    /// `/proc/sys/vm/overcommit_memory`. The child exits with [`REFUSED`] when it got EACCES.
    OvercommitRead,
    /// A TCP socket.
    Socket,
    /// `ioctl(FIONBIO)` on a pipe.
    SocketIoctl,
    /// An empty `write` to a pipe.
    Write,
    /// `ioctl(TUNSETIFF)` on a pipe (refused by the kernel, but only after the filter).
    TunIoctl,
}

fn call(call: Call, pipe: i32) -> i64 {
    // SAFETY: each call gets valid arguments or plain numbers; none touches memory of ours
    // beyond the buffers passed, which outlive the call.
    unsafe {
        match call {
            Call::Getcpu => libc::syscall(
                libc::SYS_getcpu,
                std::ptr::null_mut::<u32>(),
                std::ptr::null_mut::<u32>(),
                0,
            ),
            Call::Open => libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/dev/null".as_ptr(),
                libc::O_RDONLY,
            ),
            Call::OvercommitRead => libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/proc/sys/vm/overcommit_memory".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            ),
            Call::Socket => libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0),
            // An empty write: allowed or trapped, it changes nothing.
            Call::Write => libc::syscall(libc::SYS_write, pipe, c"".as_ptr(), 0),
            Call::SocketIoctl | Call::TunIoctl => {
                let request: u64 = match call {
                    Call::SocketIoctl => libc::FIONBIO,
                    _ => 0x4004_54ca,
                };
                let mut on: libc::c_int = 1;
                libc::syscall(libc::SYS_ioctl, pipe, request, &mut on as *mut libc::c_int)
            }
        }
    }
}

fn role_named(name: &str) -> ThreadRole {
    match name {
        "Vmm" => ThreadRole::Vmm,
        "Vcpu" => ThreadRole::Vcpu,
        "DeviceLoop" => ThreadRole::DeviceLoop,
        "Api" => ThreadRole::Api,
        "Replication" => ThreadRole::Replication,
        "SerialSocket" => ThreadRole::SerialSocket,
        "EventMonitor" => ThreadRole::EventMonitor,
        _ => ThreadRole::Witness,
    }
}

fn call_named(name: &str) -> Call {
    match name {
        "Getcpu" => Call::Getcpu,
        "Open" => Call::Open,
        "OvercommitRead" => Call::OvercommitRead,
        "Socket" => Call::Socket,
        "SocketIoctl" => Call::SocketIoctl,
        "Write" => Call::Write,
        _ => Call::TunIoctl,
    }
}

/// The child's side: does nothing unless this process was started as a case.
#[test]
fn child_case() {
    let Ok(case) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (role, what) = case.split_once(':').expect("ROLE:CALL");
    // The descriptor the ioctl cases use exists before the filter does.
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills the two-element array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    seccomp::set_process_mode(SeccompMode::Trap).expect("mode");
    let role = role_named(role);
    // The vCPU filter is installed the way vCPU threads install it.
    if role == ThreadRole::Vcpu {
        let program = seccomp::vcpu_filter(SeccompMode::Trap)
            .expect("filter")
            .expect("a program");
        program.install().expect("install");
    } else {
        seccomp::apply(role).expect("install");
    }
    let result = call(call_named(what), fds[0]);
    if result < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EACCES) {
        std::process::exit(REFUSED);
    }
    // Still alive: the call was allowed.
    std::process::exit(0);
}

/// Runs one case; true when the call was trapped.
fn trapped(role: &str, what: &str) -> bool {
    outcome(role, what) == Outcome::Trapped
}

/// Runs one case.
fn outcome(role: &str, what: &str) -> Outcome {
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([
            "--exact",
            "child_case",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, format!("{role}:{what}"))
        .output()
        .expect("run the case");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let was_trapped = stderr.contains("seccomp filter forbids");
    if was_trapped {
        assert_eq!(out.status.code(), Some(1), "{role}:{what}: {stderr}");
        return Outcome::Trapped;
    }
    match out.status.code() {
        Some(0) => Outcome::Allowed,
        Some(REFUSED) => Outcome::Refused,
        _ => panic!(
            "{role}:{what}: neither trapped, refused nor allowed: {:?}\n{stderr}",
            out.status
        ),
    }
}

#[test]
fn every_role_traps_a_call_outside_it_and_allows_its_own() {
    // (role, a call it must not make, a call it makes)
    let cases = [
        ("Vmm", "Getcpu", "Open"),
        ("Vcpu", "Open", "SocketIoctl"),
        ("DeviceLoop", "Socket", "Open"),
        ("DeviceLoop", "SocketIoctl", "Open"),
        ("Api", "Open", "Socket"),
        ("Replication", "TunIoctl", "Socket"),
        ("SerialSocket", "Open", "SocketIoctl"),
        ("Witness", "TunIoctl", "Open"),
        ("EventMonitor", "Open", "Write"),
        ("EventMonitor", "Socket", "Write"),
    ];
    for (role, forbidden, allowed) in cases {
        // `openat` in a role without files is refused (EACCES) rather than trapped; see
        // the overcommit test below.
        let expected = if forbidden == "Open" {
            Outcome::Refused
        } else {
            Outcome::Trapped
        };
        assert_eq!(outcome(role, forbidden), expected, "{role}: {forbidden}");
        assert!(!trapped(role, allowed), "{role}: {allowed} was trapped");
    }
}

/// glibc's malloc reads `/proc/sys/vm/overcommit_memory` from whichever thread first trims a
/// thread arena's heap (Cloud Hypervisor met the same). In a role without files that read must
/// be refused, not trapped: a trap ends the VMM over a libc detail, and allowing it would let
/// the role open files. glibc takes the refusal as "not strict overcommit" and goes on.
#[test]
fn a_role_without_files_refuses_libc_s_overcommit_read_instead_of_dying() {
    for role in ["Vcpu", "Api", "SerialSocket", "EventMonitor"] {
        assert_eq!(
            outcome(role, "OvercommitRead"),
            Outcome::Refused,
            "{role}: glibc's overcommit read"
        );
    }
    for role in ["Vmm", "DeviceLoop", "Replication", "Witness"] {
        assert_eq!(outcome(role, "OvercommitRead"), Outcome::Allowed, "{role}");
    }
}
