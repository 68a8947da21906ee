// SPDX-License-Identifier: Apache-2.0

//! Cloud Hypervisor's event monitor (`--event-monitor path=...|fd=...`).
//!
//! Every event is one JSON object, pretty-printed and followed by a blank line, exactly as Cloud
//! Hypervisor writes them, so that tools parsing its event stream work unchanged:
//!
//! ```text
//! {
//!   "timestamp": {
//!     "secs": 0,
//!     "nanos": 120345
//!   },
//!   "source": "vm",
//!   "event": "booted",
//!   "properties": null
//! }
//!
//! ```
//!
//! The timestamp is the time since the monitor was created (the VMM's start), serialized like
//! Rust's `Duration`. Writes are whole objects under a mutex, so events from several threads
//! never interleave. A failing write is logged once and otherwise ignored: losing an event must
//! never stop the VMM.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::{FromRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EventMonitorError {
    #[error("cannot open event monitor file {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("event monitor fd {fd} is not an open file descriptor: {source}")]
    BadFd { fd: RawFd, source: io::Error },
}

/// One event as Cloud Hypervisor serializes it.
#[derive(Serialize)]
struct Event<'a> {
    timestamp: Duration,
    source: &'a str,
    event: &'a str,
    properties: Option<&'a BTreeMap<String, String>>,
}

/// Writes events to a file or an inherited file descriptor. Cheap to share (`Arc`).
pub struct EventMonitor {
    out: Mutex<Box<dyn Write + Send>>,
    start: Instant,
    warned: AtomicBool,
}

impl std::fmt::Debug for EventMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventMonitor")
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

impl EventMonitor {
    /// Creates (or truncates) `path` and writes events there.
    pub fn from_path(path: &Path) -> Result<Self, EventMonitorError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| EventMonitorError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self::from_writer(Box::new(file)))
    }

    /// Writes events to `fd`, an open descriptor inherited from the parent process (a pipe or
    /// a file). Takes ownership of it: it is closed when the monitor is dropped.
    pub fn from_fd(fd: RawFd) -> Result<Self, EventMonitorError> {
        // SAFETY: F_GETFD only reads the descriptor's flags; it checks that `fd` is open before
        // we take ownership of it.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(EventMonitorError::BadFd {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is open (checked above) and was handed to this process on the command
        // line for the event monitor alone, so nothing else owns or closes it.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Self::from_writer(Box::new(file)))
    }

    /// Same as [`EventMonitor::from_writer`].
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self::from_writer(out)
    }

    /// Writes events to any writer (tests, or an already opened file). Timestamps count from
    /// now.
    pub fn from_writer(out: Box<dyn Write + Send>) -> Self {
        Self {
            out: Mutex::new(out),
            start: Instant::now(),
            warned: AtomicBool::new(false),
        }
    }

    /// Counts timestamps from `start` (the VMM's start) instead of the monitor's creation.
    pub fn with_start(mut self, start: Instant) -> Self {
        self.start = start;
        self
    }

    /// Reports `event` from `source` (`"vmm"`, `"vm"`, `"vcpu"`, ...) with optional
    /// properties (serialized as a JSON object, or `null`).
    pub fn emit(&self, source: &str, event: &str, properties: Option<&BTreeMap<String, String>>) {
        let record = Event {
            timestamp: self.start.elapsed(),
            source,
            event,
            properties,
        };
        let Ok(mut text) = serde_json::to_string_pretty(&record) else {
            return;
        };
        text.push_str("\n\n");
        // A poisoned lock only means another emitter panicked mid-write; keep reporting.
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let result = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        if let Err(e) = result {
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!("event monitor: cannot write event {source}/{event}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn events(text: &str) -> Vec<serde_json::Value> {
        text.split("\n\n")
            .filter(|s| !s.trim().is_empty())
            .map(|s| serde_json::from_str(s).unwrap())
            .collect()
    }

    #[test]
    fn shape_matches_cloud_hypervisor() {
        let sink = Shared::default();
        let monitor = EventMonitor::from_writer(Box::new(sink.clone()));
        monitor.emit("vmm", "starting", None);
        let mut props = BTreeMap::new();
        props.insert("id".to_string(), "0".to_string());
        monitor.emit("vcpu", "create", Some(&props));
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();

        // Pretty-printed objects, each followed by one blank line.
        assert!(
            text.starts_with("{\n  \"timestamp\": {\n    \"secs\": "),
            "{text}"
        );
        assert!(text.ends_with("}\n\n"), "{text}");
        assert_eq!(text.matches("\n\n").count(), 2, "{text}");

        let all = events(&text);
        assert_eq!(all.len(), 2);
        let first = &all[0];
        let keys: Vec<&str> = first
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 4);
        for key in ["timestamp", "source", "event", "properties"] {
            assert!(keys.contains(&key), "{keys:?}");
        }
        assert!(first["timestamp"]["secs"].is_u64());
        assert!(first["timestamp"]["nanos"].is_u64());
        assert_eq!(first["source"], "vmm");
        assert_eq!(first["event"], "starting");
        assert!(first["properties"].is_null());
        assert_eq!(all[1]["properties"], serde_json::json!({"id": "0"}));
        // Field order as Cloud Hypervisor writes it.
        let order: Vec<usize> = ["\"timestamp\"", "\"source\"", "\"event\"", "\"properties\""]
            .iter()
            .map(|k| text.find(k).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn timestamps_are_relative_and_monotonic() {
        let sink = Shared::default();
        let start = Instant::now() - Duration::from_secs(5);
        let monitor = EventMonitor::from_writer(Box::new(sink.clone())).with_start(start);
        monitor.emit("vm", "booting", None);
        monitor.emit("vm", "booted", None);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let all = events(&text);
        let t = |v: &serde_json::Value| {
            Duration::new(
                v["timestamp"]["secs"].as_u64().unwrap(),
                v["timestamp"]["nanos"].as_u64().unwrap() as u32,
            )
        };
        assert!(t(&all[0]) >= Duration::from_secs(5));
        assert!(t(&all[0]) < Duration::from_secs(60));
        assert!(t(&all[1]) >= t(&all[0]));
    }

    #[test]
    fn concurrent_events_do_not_interleave() {
        let sink = Shared::default();
        let monitor = Arc::new(EventMonitor::from_writer(Box::new(sink.clone())));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let m = monitor.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        m.emit("vcpu", &format!("event{i}"), None);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(events(&text).len(), 400);
    }

    #[test]
    fn from_path_and_from_fd() {
        let dir = std::env::temp_dir().join(format!("tandem-evmon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.json");
        std::fs::write(&path, "stale content that must go").unwrap();
        let monitor = EventMonitor::from_path(&path).unwrap();
        monitor.emit("vmm", "starting", None);
        drop(monitor);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(events(&text)[0]["event"], "starting");

        let mut fds = [0; 2];
        // SAFETY: pipe(2) writes two descriptors into the array we own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fds[0] is the read end we just created and own.
        let mut reader = unsafe { File::from_raw_fd(fds[0]) };
        let monitor = EventMonitor::from_fd(fds[1]).unwrap();
        monitor.emit("vm", "paused", None);
        drop(monitor); // closes the write end, so the read below ends
        let mut text = String::new();
        io::Read::read_to_string(&mut reader, &mut text).unwrap();
        assert_eq!(events(&text)[0]["event"], "paused");

        assert!(EventMonitor::from_fd(-1).is_err());
        assert!(EventMonitor::from_path(&dir.join("no/such/dir/x")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
