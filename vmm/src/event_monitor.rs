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
//! Rust's `Duration`.
//!
//! Emitting never blocks the caller (the control loop, a vCPU, an FT thread): events go into a
//! bounded queue that one `event-monitor` thread writes out in order, so a reader that stops
//! reading a `fd=` pipe stalls only that thread. When the queue is full, events are dropped
//! and counted, and once the writer catches up it reports the count as a `vmm`/`events-dropped`
//! event. A failing write is logged once and otherwise ignored: losing an event must never stop
//! the VMM.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::{FromRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread;
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

/// Events waiting for the writer thread; beyond this many, events are dropped (and counted).
pub const QUEUE_LEN: usize = 4096;

/// How long dropping the monitor waits for queued events to be written.
const DRAIN_ON_DROP: Duration = Duration::from_secs(1);

enum Message {
    Event(String),
    /// Answered once everything queued before it is written.
    Flush(mpsc::Sender<()>),
}

/// Writes events to a file or an inherited file descriptor. Cheap to share (`Arc`).
pub struct EventMonitor {
    queue: Mutex<Option<SyncSender<Message>>>,
    start: Instant,
    /// The writer's copy of `start`, for the events it makes itself.
    writer_start: std::sync::Arc<Mutex<Instant>>,
    dropped: std::sync::Arc<AtomicU64>,
    /// Signalled (by disconnecting) when the writer thread has ended.
    finished: Mutex<Option<Receiver<()>>>,
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
    /// now. Without a writer thread (none can be started) events are dropped and counted.
    pub fn from_writer(out: Box<dyn Write + Send>) -> Self {
        let (queue, pending) = mpsc::sync_channel(QUEUE_LEN);
        let (done, finished) = mpsc::channel();
        let dropped = std::sync::Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let counter = dropped.clone();
        let writer_start = std::sync::Arc::new(Mutex::new(start));
        let clock = writer_start.clone();
        let spawned = thread::Builder::new()
            .name("event-monitor".into())
            .spawn(move || write_events(out, pending, counter, clock, done));
        let queue = match spawned {
            Ok(_) => Some(queue),
            Err(e) => {
                log::error!("event monitor: cannot start its writer thread: {e}");
                None
            }
        };
        Self {
            queue: Mutex::new(queue),
            start,
            writer_start,
            dropped,
            finished: Mutex::new(Some(finished)),
        }
    }

    /// Counts timestamps from `start` (the VMM's start) instead of the monitor's creation.
    pub fn with_start(mut self, start: Instant) -> Self {
        self.start = start;
        *self.writer_start.lock().unwrap_or_else(|p| p.into_inner()) = start;
        self
    }

    /// Reports `event` from `source` (`"vmm"`, `"vm"`, `"vcpu"`, ...) with optional
    /// properties (serialized as a JSON object, or `null`). Never blocks on the reader.
    pub fn emit(&self, source: &str, event: &str, properties: Option<&BTreeMap<String, String>>) {
        let Some(text) = render(self.start.elapsed(), source, event, properties) else {
            return;
        };
        // A poisoned lock only means another emitter panicked; keep reporting.
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let sent = match queue.as_ref() {
            Some(queue) => queue.try_send(Message::Event(text)),
            None => Err(TrySendError::Disconnected(Message::Event(String::new()))),
        };
        if sent.is_err() && self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!(
                "event monitor: its reader is not keeping up; dropping events (first: {source}/{event})"
            );
        }
    }

    /// Events dropped so far because the reader did not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for every event emitted so far to be written; false on timeout.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (ack, acked) = mpsc::channel();
        let mut message = Message::Flush(ack);
        loop {
            let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let Some(q) = queue.as_ref() else {
                return true;
            };
            match q.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return true,
                Err(TrySendError::Full(m)) => message = m,
            }
            drop(queue);
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        acked
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

impl Drop for EventMonitor {
    /// Lets the writer finish what is queued (for a bounded time: a stalled reader must not
    /// hold up the VMM's exit), then closes the output.
    fn drop(&mut self) {
        let queue = self
            .queue
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(queue);
        if let Some(finished) = self
            .finished
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = finished.recv_timeout(DRAIN_ON_DROP);
        }
    }
}

fn render(
    timestamp: Duration,
    source: &str,
    event: &str,
    properties: Option<&BTreeMap<String, String>>,
) -> Option<String> {
    let record = Event {
        timestamp,
        source,
        event,
        properties,
    };
    let mut text = serde_json::to_string_pretty(&record).ok()?;
    text.push_str("\n\n");
    Some(text)
}

/// The writer thread: writes queued events in order until the monitor is dropped.
fn write_events(
    mut out: Box<dyn Write + Send>,
    pending: Receiver<Message>,
    dropped: std::sync::Arc<AtomicU64>,
    start: std::sync::Arc<Mutex<Instant>>,
    _done: mpsc::Sender<()>,
) {
    if !crate::seccomp::apply_or_log(crate::seccomp::ThreadRole::EventMonitor) {
        return;
    }
    let mut warned = false;
    let mut reported_drops = 0;
    let mut write = |out: &mut Box<dyn Write + Send>, text: &str| {
        let result = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        if let Err(e) = result {
            if !warned {
                warned = true;
                log::warn!("event monitor: cannot write events: {e}");
            }
        }
    };
    while let Ok(message) = pending.recv() {
        match message {
            Message::Event(text) => write(&mut out, &text),
            Message::Flush(ack) => {
                let _ = ack.send(());
            }
        }
        // The reader takes events again after the queue overflowed: say how many it missed.
        let lost = dropped.load(Ordering::Relaxed);
        if lost > reported_drops {
            let mut props = BTreeMap::new();
            props.insert("count".to_string(), (lost - reported_drops).to_string());
            let elapsed = start.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
            if let Some(text) = render(elapsed, "vmm", "events-dropped", Some(&props)) {
                write(&mut out, &text);
            }
            reported_drops = lost;
        }
    }
    // `_done` is dropped here: [`EventMonitor`]'s drop stops waiting.
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
        assert!(monitor.flush(Duration::from_secs(5)));
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
        assert!(monitor.flush(Duration::from_secs(5)));
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
        assert!(monitor.flush(Duration::from_secs(5)));
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

    /// A reader that stops reading must not stall whoever emits (the control loop): events are
    /// dropped and counted instead, and the count is reported once the reader reads again.
    #[test]
    fn a_reader_that_stops_reading_does_not_block_emitters() {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) writes two descriptors into the array we own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fds[0] is the read end we just created and own.
        let mut reader = unsafe { File::from_raw_fd(fds[0]) };
        let monitor = EventMonitor::from_fd(fds[1]).unwrap();
        // A pipe holds 64 KiB; each event is ~130 bytes: far more than pipe and queue hold.
        let count = 3 * QUEUE_LEN as u64 + 2000;
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        for i in 0..count {
            let t = Instant::now();
            monitor.emit("vm", &format!("e{i}"), None);
            slowest = slowest.max(t.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "emitting {count} events took {:?}",
            started.elapsed()
        );
        assert!(
            slowest < Duration::from_millis(500),
            "one emit took {slowest:?}"
        );
        assert!(
            !monitor.flush(Duration::from_millis(50)),
            "nobody reads: cannot flush"
        );
        let dropped = monitor.dropped();
        assert!(dropped > 0);
        // The reader comes back: everything still queued arrives in order, then the count.
        let reading = std::thread::spawn(move || {
            let mut text = String::new();
            io::Read::read_to_string(&mut reader, &mut text).unwrap();
            text
        });
        assert!(monitor.flush(Duration::from_secs(10)));
        monitor.emit("vm", "after", None);
        assert!(monitor.flush(Duration::from_secs(10)));
        assert_eq!(monitor.dropped(), dropped);
        drop(monitor);
        let all = events(&reading.join().unwrap());
        let names: Vec<&str> = all.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(names[0], "e0");
        let numbered: Vec<u64> = names
            .iter()
            .filter_map(|n| n.strip_prefix('e').and_then(|n| n.parse().ok()))
            .collect();
        assert!(numbered.windows(2).all(|w| w[0] < w[1]), "out of order");
        let reported: u64 = all
            .iter()
            .filter(|e| e["event"] == "events-dropped")
            .map(|e| {
                e["properties"]["count"]
                    .as_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum();
        assert_eq!(reported, dropped);
        assert_eq!(numbered.len() as u64 + dropped, count);
        assert_eq!(*names.last().unwrap(), "after");
    }
}
