//! Each thread role's seccomp filter traps a call outside its role and lets the role's own
//! calls through. Every case runs in a child process (this test binary again, with one role
//! named in the environment): a trapped call ends that process with the VMM's SIGSYS report.

use std::process::Command;

use vmm::seccomp::{self, ThreadRole};
use vmm::SeccompMode;

const CHILD_ENV: &str = "TANDEM_SECCOMP_ROLE_CASE";

/// What a child does: install `role`'s filter, then make one call.
#[derive(Clone, Copy, Debug)]
enum Call {
    /// `getcpu` as a system call (normally answered by the vDSO): in no role's list, and
    /// harmless if it were let through.
    Getcpu,
    /// `openat` of /dev/null.
    Open,
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
        seccompiler::apply_filter(&program).expect("install");
    } else {
        seccomp::apply(role).expect("install");
    }
    call(call_named(what), fds[0]);
    // Still alive: the call was allowed.
    std::process::exit(0);
}

/// Runs one case; true when the call was trapped.
fn trapped(role: &str, what: &str) -> bool {
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
    assert!(
        was_trapped || out.status.code() == Some(0),
        "{role}:{what}: neither trapped nor allowed: {:?}\n{stderr}",
        out.status
    );
    if was_trapped {
        assert_eq!(out.status.code(), Some(1), "{role}:{what}: {stderr}");
    }
    was_trapped
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
        assert!(
            trapped(role, forbidden),
            "{role}: {forbidden} was not trapped"
        );
        assert!(!trapped(role, allowed), "{role}: {allowed} was trapped");
    }
}
