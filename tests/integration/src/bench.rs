//! What the benchmark binaries share: a SIGINT/SIGTERM that ends the run with partial results,
//! `ch-remote` with a deadline, and the report's tables and machine description.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set by SIGINT, SIGTERM or SIGHUP: the run stops at the next case and reports what it has.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

pub fn check_interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted by a signal".into())
    } else {
        Ok(())
    }
}

/// Runs `ch-remote --api-socket SOCKET ARGS` (the binary at `bin`); its stdout, or an error
/// with its output when it fails or does not answer within `deadline`.
pub fn ch_remote(
    bin: &Path,
    socket: &Path,
    args: &[&str],
    deadline: Duration,
) -> Result<String, String> {
    let mut child = Command::new(bin)
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start ch-remote {}: {e}", args.join(" ")))?;
    let until = Instant::now() + deadline;
    // Its output is a few hundred bytes at most: the pipes cannot fill up while it runs.
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(1)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "ch-remote {} did not answer within {deadline:?}",
                    args.join(" ")
                ));
            }
            Err(e) => return Err(format!("wait for ch-remote: {e}")),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    if !status.success() {
        return Err(format!(
            "ch-remote {} failed ({status}): {}{}",
            args.join(" "),
            stderr.trim(),
            stdout.trim()
        ));
    }
    Ok(stdout)
}

/// A figure with `decimals` decimals, `-` when there is none.
pub fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.decimals$}"),
        _ => "-".into(),
    }
}

/// a / b when both are known and b is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The lines that say which machine the figures come from.
pub fn machine() -> Vec<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let pvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "loaded (guest kernel code emulated)"
    } else {
        "not loaded"
    };
    vec![
        format!("nproc: {cores}"),
        format!("cpu: {cpu}"),
        format!("kernel: {}", read_trimmed("/proc/sys/kernel/osrelease")),
        format!("kvm_pvm: {pvm}"),
    ]
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A table: the first column left-aligned (it names the row), figures right-aligned.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let head = line(header.iter().map(|h| h.to_string()).collect());
    println!("{head}");
    println!("{}", "-".repeat(head.len()));
    for row in rows {
        println!("{}", line(row.clone()));
    }
}
