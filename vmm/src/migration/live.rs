//! Live migration on top of the stream protocol: iterative pre-copy with KVM dirty logging OR'd
//! with the device dirty bitmap, a downtime target, then the final pause, state and hand-off.
//! Any failure on the way leaves the source VM running. The destination side is in
//! [`crate::migration::receive`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::VmConfig;
use crate::fault_tolerance::ReplicableVm;
use crate::migration::memory::{DirtyPages, PAGE_SIZE};
use crate::migration::protocol::{Sender, SenderOptions};
use crate::progress::TransferProgress;
use crate::vm::Vm;
use transport::Security;

/// Pre-copy passes before the VM is stopped whatever the dirty rate (bounded migration time).
const MAX_PRECOPY_PASSES: u32 = 30;

/// Passes in a row that leave at least [`STALL_FRACTION`] of the smallest dirty set seen so
/// far: the guest dirties its working set as fast as it is sent, and more passes would only
/// lengthen the migration (each one resends that working set) without shortening the pause.
const STALLED_PASSES: u32 = 3;
const STALL_FRACTION: f64 = 0.9;

/// A migration connection: mutual TLS (or, by explicit opt-out, plain TCP) or a Unix socket.
pub use transport::Stream as MigrationStream;

/// How long connecting to a destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    Tcp(String),
    Unix(std::path::PathBuf),
}

/// `tcp:HOST:PORT` or `unix:/path`.
pub fn parse_url(url: &str) -> Result<MigrationUrl, String> {
    if let Some(addr) = url.strip_prefix("tcp:") {
        let valid = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(format!("\"{url}\" is not tcp:HOST:PORT"));
        }
        return Ok(MigrationUrl::Tcp(addr.to_string()));
    }
    if let Some(path) = url.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(format!("\"{url}\" is not unix:/path"));
        }
        return Ok(MigrationUrl::Unix(path.into()));
    }
    Err(format!("\"{url}\" is neither tcp:HOST:PORT nor unix:/path"))
}

/// How the channel of a migration URL is secured: over TCP, mutual TLS with the credentials in
/// `tls_dir` or plaintext by the operator's explicit `insecure_plaintext`; a Unix socket stays
/// on this host and needs neither (`None`).
pub fn security_for(
    url: &MigrationUrl,
    tls_dir: Option<&Path>,
    insecure_plaintext: bool,
) -> Result<Option<Security>, String> {
    match url {
        MigrationUrl::Tcp(_) => Security::choose(tls_dir, insecure_plaintext, "migration")
            .map(Some)
            .map_err(|e| e.to_string()),
        MigrationUrl::Unix(_) if tls_dir.is_some() || insecure_plaintext => Err(
            "tls_dir and insecure_plaintext apply to tcp: URLs; a unix: socket stays on this host"
                .to_string(),
        ),
        MigrationUrl::Unix(_) => Ok(None),
    }
}

pub fn connect(url: &MigrationUrl, security: Option<&Security>) -> Result<MigrationStream, String> {
    match (url, security) {
        (MigrationUrl::Tcp(addr), Some(security)) => {
            transport::dial(addr, security, CONNECT_TIMEOUT).map_err(|e| e.to_string())
        }
        (MigrationUrl::Tcp(addr), None) => Err(format!("tcp:{addr} needs a security choice")),
        (MigrationUrl::Unix(path), _) => UnixStream::connect(path)
            .map(MigrationStream::Unix)
            .map_err(|e| format!("cannot connect to {}: {e}", path.display())),
    }
}

/// What a finished migration reports.
#[derive(Debug, Clone)]
pub struct MigrationReport {
    pub total: Duration,
    /// From the source's pause to the destination's acknowledgement (it is running then).
    pub downtime: Duration,
    pub passes: u32,
    pub bytes: u64,
}

/// The pages written since the last call (KVM's log OR the device bitmap); dirty logging
/// must be on.
pub fn dirty_since_last<V: ReplicableVm + ?Sized>(vm: &mut V) -> Result<DirtyPages, String> {
    vm.dirty_since_last()
}

/// Sends the running `vm` to a receiver. On success the VM is paused and its disks unlocked
/// (the destination owns it); on failure it runs again as before.
pub fn send(
    vm: &mut Vm,
    config: &VmConfig,
    stream: MigrationStream,
    downtime_target: Duration,
    progress: Option<Arc<TransferProgress>>,
) -> Result<MigrationReport, String> {
    // TLS authenticates every byte: a frame checksum on top of it would check nothing more.
    let options = SenderOptions {
        checksums: !stream.authenticates_bytes(),
        ..SenderOptions::default()
    };
    let mut sender = Sender::with_options(stream, options);
    sender.set_progress(progress);
    let start = Instant::now();
    let mut paused = false;
    let mut unlocked = false;
    let result = precopy_and_handoff(
        vm,
        config,
        &mut sender,
        downtime_target,
        &mut paused,
        &mut unlocked,
    );
    if let Some(progress) = sender.progress() {
        match &result {
            Ok(_) => progress.done(),
            Err(e) => progress.failed(e),
        }
    }
    match result {
        Ok((downtime, passes)) => {
            let _ = vm.set_dirty_logging(false);
            Ok(MigrationReport {
                total: start.elapsed(),
                downtime,
                passes,
                bytes: sender.stats().bytes,
            })
        }
        Err(e) => {
            let _ = sender.abort(&e);
            let _ = vm.set_dirty_logging(false);
            if unlocked {
                if let Err(lock) = vm.device_manager().reacquire_disk_locks() {
                    // Someone else holds the disks now: running on would risk two writers.
                    return Err(format!(
                        "{e}; the VM stays paused because its disks cannot be locked again: {lock}"
                    ));
                }
            }
            if paused {
                vm.resume()
                    .map_err(|r| format!("{e}; resuming failed too: {r}"))?;
            }
            Err(e)
        }
    }
}

fn precopy_and_handoff(
    vm: &mut Vm,
    config: &VmConfig,
    sender: &mut Sender<MigrationStream>,
    downtime_target: Duration,
    paused: &mut bool,
    unlocked: &mut bool,
) -> Result<(Duration, u32), String> {
    let e = |e: crate::migration::protocol::ProtocolError| e.to_string();
    sender.send_hello(config).map_err(e)?;
    let (pending, passes) = precopy(vm, sender, downtime_target)?;

    vm.pause().map_err(|e| e.to_string())?;
    *paused = true;
    let downtime_start = Instant::now();
    let mut last = dirty_since_last(vm)?;
    last.union_with(&pending);
    if let Some(progress) = sender.progress() {
        progress.begin_pass(last.count());
        progress.finishing();
    }
    sender.send_memory(vm.memory(), &last).map_err(e)?;
    let state = vm.save_state().map_err(|e| e.to_string())?;
    sender.send_state(&state).map_err(e)?;
    vm.device_manager().release_disk_locks()?;
    *unlocked = true;
    sender.send_complete().map_err(e)?;
    sender.recv_ack().map_err(e)?;
    Ok((downtime_start.elapsed(), passes + 1))
}

/// Iterative pre-copy while the guest runs: switches dirty logging on, sends all memory, then
/// what was dirtied meanwhile, until the rest would fit in `downtime_target` at the measured
/// rate, or the dirty set stops shrinking ([`STALLED_PASSES`]), or [`MAX_PRECOPY_PASSES`] is
/// reached. Returns the pages still to send (after the caller's final pause, together with
/// [`dirty_since_last`]) and the passes made.
pub fn precopy<T: Read + Write, V: ReplicableVm + ?Sized>(
    vm: &mut V,
    sender: &mut Sender<T>,
    downtime_target: Duration,
) -> Result<(DirtyPages, u32), String> {
    let e = |e: crate::migration::protocol::ProtocolError| e.to_string();
    vm.set_dirty_logging(true).map_err(|e| e.to_string())?;
    // Start the dirty sets empty: everything goes in the first full pass.
    dirty_since_last(vm)?;
    let pass_start = Instant::now();
    let all = DirtyPages::all(vm.memory()).map_err(|e| e.to_string())?;
    if let Some(progress) = sender.progress() {
        progress.begin_pass(all.count());
    }
    let first = sender.send_memory(vm.memory(), &all).map_err(e)?;
    let mut rate = first.wire_bytes.max(1) as f64 / pass_start.elapsed().as_secs_f64().max(1e-6);
    let mut passes = 1;
    let mut pending = dirty_since_last(vm)?;
    let mut smallest = pending.count();
    let mut stalled = 0;
    while passes < MAX_PRECOPY_PASSES {
        let estimate = pending.count() as f64 * PAGE_SIZE as f64 / rate;
        if estimate <= downtime_target.as_secs_f64() {
            break;
        }
        if stalled >= STALLED_PASSES {
            log::info!(
                "pre-copy stopped converging after {passes} passes: {} pages left for the pause \
                 (about {:.0} ms, target {} ms)",
                pending.count(),
                estimate * 1e3,
                downtime_target.as_millis()
            );
            break;
        }
        let t = Instant::now();
        if let Some(progress) = sender.progress() {
            progress.begin_pass(pending.count());
        }
        let pass = sender.send_memory(vm.memory(), &pending).map_err(e)?;
        rate = pass.wire_bytes.max(1) as f64 / t.elapsed().as_secs_f64().max(1e-6);
        passes += 1;
        pending = dirty_since_last(vm)?;
        if (pending.count() as f64) < smallest as f64 * STALL_FRACTION {
            stalled = 0;
        } else {
            stalled += 1;
        }
        smallest = smallest.min(pending.count());
    }
    Ok((pending, passes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_manager::FtGates;
    use crate::memory::GuestMemoryMmap;
    use crate::vm::VmSnapshotState;
    use vm_memory::{Bytes, GuestAddress};

    /// A guest that rewrites the pages `dirtied(pass)` names between two harvests.
    struct BusyGuest {
        memory: GuestMemoryMmap,
        harvests: u64,
        dirtied: fn(u64) -> u64,
    }

    impl ReplicableVm for BusyGuest {
        fn pause(&mut self) -> Result<(), String> {
            Ok(())
        }
        fn resume(&mut self) -> Result<(), String> {
            Ok(())
        }
        fn set_dirty_logging(&mut self, _enabled: bool) -> Result<(), String> {
            Ok(())
        }
        fn dirty_since_last(&mut self) -> Result<DirtyPages, String> {
            let pages = (self.dirtied)(self.harvests);
            self.harvests += 1;
            let (set, _) = DirtyPages::from_pages(
                &self.memory,
                (0..pages).map(|p| GuestAddress(p * PAGE_SIZE as u64)),
            )
            .map_err(|e| e.to_string())?;
            for p in 0..pages {
                self.memory
                    .write_obj(self.harvests, GuestAddress(p * PAGE_SIZE as u64))
                    .map_err(|e| e.to_string())?;
            }
            Ok(set)
        }
        fn memory(&self) -> &GuestMemoryMmap {
            &self.memory
        }
        fn save_state(&mut self) -> Result<VmSnapshotState, String> {
            Err("not used by pre-copy".into())
        }
        fn ft_gates(&mut self) -> Result<FtGates, String> {
            Err("not used by pre-copy".into())
        }
    }

    /// Pre-copy of `guest` against a target no pass can meet; the passes it made.
    fn passes_until_stop(dirtied: fn(u64) -> u64) -> (u32, u64) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1024 * PAGE_SIZE)]).unwrap();
        let mut guest = BusyGuest {
            memory,
            harvests: 0,
            dirtied,
        };
        let mut sender = Sender::new(std::io::Cursor::new(Vec::new()));
        sender.send_hello(&VmConfig::default()).unwrap();
        let (pending, passes) = precopy(&mut guest, &mut sender, Duration::ZERO).unwrap();
        (passes, pending.count())
    }

    #[test]
    fn precopy_stops_when_the_dirty_set_stops_shrinking() {
        // A working set rewritten as fast as it is sent: more passes would not shorten the
        // pause, so pre-copy gives up after the stalled passes, not after MAX_PRECOPY_PASSES.
        let (passes, pending) = passes_until_stop(|_| 256);
        assert_eq!(passes, 1 + STALLED_PASSES, "{passes} passes");
        assert_eq!(pending, 256);
        // Shrinking by less than the stall fraction counts as stalled too.
        let (passes, _) = passes_until_stop(|h| 512 - h.min(60));
        assert_eq!(passes, 1 + STALLED_PASSES, "{passes} passes");
    }

    #[test]
    fn precopy_goes_on_while_the_dirty_set_shrinks() {
        // Halving every pass: each pass pays off, down to an empty set (which meets any target).
        let (passes, pending) = passes_until_stop(|h| 512 >> h.min(10));
        assert_eq!(pending, 0);
        assert_eq!(passes, 10, "{passes} passes");
        // One slow pass among shrinking ones does not stop it.
        let (passes, pending) = passes_until_stop(|h| match h {
            0..=2 => 512 >> h,
            3 => 200,
            h => 128 >> (h - 3).min(8),
        });
        assert_eq!(pending, 0);
        assert!(passes > 1 + STALLED_PASSES, "{passes} passes");
        // Capped all the same.
        let (passes, _) = passes_until_stop(|h| (1000.0 * 0.85f64.powi(h as i32)) as u64);
        assert_eq!(passes, MAX_PRECOPY_PASSES, "{passes} passes");
    }

    #[test]
    fn tcp_needs_tls_or_the_opt_out_and_unix_needs_neither() {
        let tcp = parse_url("tcp:10.0.0.2:6000").unwrap();
        let unix = parse_url("unix:/run/m.sock").unwrap();
        let e = security_for(&tcp, None, false).unwrap_err();
        assert!(e.contains("needs mutual TLS"), "{e}");
        assert!(matches!(
            security_for(&tcp, None, true),
            Ok(Some(Security::InsecurePlaintext))
        ));
        let e = security_for(&tcp, Some(Path::new("/nonexistent")), false).unwrap_err();
        assert!(e.contains("/nonexistent/ca-cert.pem"), "{e}");
        assert!(matches!(security_for(&unix, None, false), Ok(None)));
        let e = security_for(&unix, Some(Path::new("/d")), false).unwrap_err();
        assert!(e.contains("apply to tcp:"), "{e}");
        let e = connect(&tcp, None).err().unwrap();
        assert!(e.contains("needs a security choice"), "{e}");
    }

    #[test]
    fn urls_are_parsed_strictly() {
        assert_eq!(
            parse_url("tcp:127.0.0.1:6000"),
            Ok(MigrationUrl::Tcp("127.0.0.1:6000".into()))
        );
        assert_eq!(
            parse_url("unix:/tmp/m.sock"),
            Ok(MigrationUrl::Unix("/tmp/m.sock".into()))
        );
        for bad in [
            "tcp:",
            "tcp:host",
            "tcp::5",
            "tcp:h:99999",
            "unix:",
            "file:///x",
            "x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }
}
