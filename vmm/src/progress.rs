//! Progress of the long transfers an operator waits for: the FT initial synchronisation
//! (`vm.enable-ft`) and live migration (`vm.send-migration`).
//!
//! Both run on the control loop, which owns the VM and is therefore busy until they end, so
//! API requests queued behind them would wait too. The [`ProgressBoard`] is the one piece of
//! state the API threads read without the control loop: the sending code updates a
//! [`TransferProgress`] with atomics as frames leave, and `vm.progress` (and `vm.ft-status`
//! while a sync runs) answer from it at once. It also reports progress on the event monitor,
//! at most once per [`EVENT_INTERVAL`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::event_monitor::EventMonitor;

/// Progress events on the event monitor are at most this frequent.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// Which long operation a [`TransferProgress`] follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    EnableFt,
    SendMigration,
}

impl Operation {
    /// The event monitor's name for this operation's progress events.
    fn event(self) -> &'static str {
        match self {
            Operation::EnableFt => "ft-sync-progress",
            Operation::SendMigration => "migration-progress",
        }
    }
}

/// Where a transfer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Connecting, exchanging parameters, syncing disks.
    Starting,
    /// Sending memory while the guest runs (pre-copy passes).
    Copying,
    /// The guest is paused for the last pages and the device state.
    Finishing,
    Done,
    Failed,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Phase::Starting,
            1 => Phase::Copying,
            2 => Phase::Finishing,
            3 => Phase::Done,
            _ => Phase::Failed,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Phase::Starting => 0,
            Phase::Copying => 1,
            Phase::Finishing => 2,
            Phase::Done => 3,
            Phase::Failed => 4,
        }
    }
}

/// `GET vm.progress` (Tandem's extension): a point-in-time view of a transfer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgressReport {
    pub operation: Operation,
    pub phase: Phase,
    /// 1 for the full first pass over memory, then one per pass over what the guest dirtied.
    pub pass: u32,
    /// Pages sent in this pass, and the pass's size (the first pass is all of guest memory).
    pub pages_done: u64,
    pub pages_total: u64,
    /// Pages sent over all passes.
    pub pages_sent: u64,
    /// Bytes on the wire so far (all frames).
    pub bytes: u64,
    /// Guest memory size: what a first pass has to cover.
    pub memory_bytes: u64,
    pub elapsed_ms: u64,
    /// Bytes per second over the whole transfer so far.
    pub rate_bytes_per_s: u64,
    /// Time left in this pass at the rate so far (later passes are smaller, and one more
    /// short one follows in the final pause).
    pub eta_ms: Option<u64>,
    /// Why the transfer failed (phase `failed`).
    pub error: Option<String>,
}

/// One transfer's live counters, updated by the sender as frames leave.
#[derive(Debug)]
pub struct TransferProgress {
    operation: Operation,
    started: Instant,
    memory_bytes: u64,
    phase: AtomicU8,
    pass: AtomicU32,
    pages_done: AtomicU64,
    pages_total: AtomicU64,
    pages_sent: AtomicU64,
    bytes: AtomicU64,
    error: Mutex<Option<String>>,
    events: Mutex<EventThrottle>,
}

#[derive(Debug)]
struct EventThrottle {
    monitor: Option<Arc<EventMonitor>>,
    last: Option<Instant>,
}

impl TransferProgress {
    pub fn new(operation: Operation, memory_bytes: u64) -> Self {
        Self {
            operation,
            started: Instant::now(),
            memory_bytes,
            phase: AtomicU8::new(Phase::Starting.as_u8()),
            pass: AtomicU32::new(0),
            pages_done: AtomicU64::new(0),
            pages_total: AtomicU64::new(0),
            pages_sent: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            error: Mutex::new(None),
            events: Mutex::new(EventThrottle {
                monitor: None,
                last: None,
            }),
        }
    }

    /// Reports progress on `monitor` too (throttled).
    pub fn with_monitor(self, monitor: Option<Arc<EventMonitor>>) -> Self {
        if let Ok(mut events) = self.events.lock() {
            events.monitor = monitor;
        }
        self
    }

    pub fn operation(&self) -> Operation {
        self.operation
    }

    /// A new pass over `pages` pages begins.
    pub fn begin_pass(&self, pages: u64) {
        self.phase.store(Phase::Copying.as_u8(), Ordering::Relaxed);
        self.pass.fetch_add(1, Ordering::Relaxed);
        self.pages_total.store(pages, Ordering::Relaxed);
        self.pages_done.store(0, Ordering::Relaxed);
        self.maybe_emit(false);
    }

    /// The guest is paused for the last pass.
    pub fn finishing(&self) {
        self.phase
            .store(Phase::Finishing.as_u8(), Ordering::Relaxed);
        self.maybe_emit(true);
    }

    /// `pages` more pages (and `bytes` wire bytes) went out.
    pub fn sent(&self, pages: u64, bytes: u64) {
        self.pages_done.fetch_add(pages, Ordering::Relaxed);
        self.pages_sent.fetch_add(pages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.maybe_emit(false);
    }

    /// Wire bytes outside page frames (configuration, state, disk data).
    pub fn sent_bytes(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn done(&self) {
        self.phase.store(Phase::Done.as_u8(), Ordering::Relaxed);
        self.maybe_emit(true);
    }

    pub fn failed(&self, error: &str) {
        if let Ok(mut slot) = self.error.lock() {
            *slot = Some(error.to_string());
        }
        self.phase.store(Phase::Failed.as_u8(), Ordering::Relaxed);
        self.maybe_emit(true);
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    pub fn report(&self) -> ProgressReport {
        let elapsed = self.started.elapsed();
        let bytes = self.bytes.load(Ordering::Relaxed);
        let pages_done = self.pages_done.load(Ordering::Relaxed);
        let pages_total = self.pages_total.load(Ordering::Relaxed);
        let pages_sent = self.pages_sent.load(Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            (bytes as f64 / secs) as u64
        } else {
            0
        };
        let phase = self.phase();
        // Bytes per page so far (compression and zero pages make it far less than a page).
        let eta_ms = (phase == Phase::Copying && rate > 0 && pages_sent > 0).then(|| {
            let per_page = bytes as f64 / pages_sent as f64;
            let left = pages_total.saturating_sub(pages_done) as f64 * per_page;
            (left / rate as f64 * 1000.0) as u64
        });
        ProgressReport {
            operation: self.operation,
            phase,
            pass: self.pass.load(Ordering::Relaxed),
            pages_done,
            pages_total,
            pages_sent,
            bytes,
            memory_bytes: self.memory_bytes,
            elapsed_ms: elapsed.as_millis() as u64,
            rate_bytes_per_s: rate,
            eta_ms,
            error: self.error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn maybe_emit(&self, always: bool) {
        let Ok(mut events) = self.events.try_lock() else {
            return;
        };
        let Some(monitor) = events.monitor.clone() else {
            return;
        };
        let now = Instant::now();
        if !always && events.last.is_some_and(|t| now - t < EVENT_INTERVAL) {
            return;
        }
        events.last = Some(now);
        drop(events);
        let report = self.report();
        monitor.emit("vm", self.operation.event(), Some(&report.properties()));
    }
}

impl ProgressReport {
    /// The report as event-monitor properties (strings, as Cloud Hypervisor's events carry).
    pub fn properties(&self) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        let phase = serde_json::to_value(self.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        p.insert("phase".into(), phase);
        p.insert("pass".into(), self.pass.to_string());
        p.insert("pages_done".into(), self.pages_done.to_string());
        p.insert("pages_total".into(), self.pages_total.to_string());
        p.insert("bytes".into(), self.bytes.to_string());
        p.insert("rate_bytes_per_s".into(), self.rate_bytes_per_s.to_string());
        if let Some(eta) = self.eta_ms {
            p.insert("eta_ms".into(), eta.to_string());
        }
        if let Some(error) = &self.error {
            p.insert("error".into(), error.clone());
        }
        p
    }
}

/// The transfer now running, or the last one, shared between the control loop (which starts
/// transfers) and the API threads (which read them).
#[derive(Debug, Default)]
pub struct ProgressBoard {
    current: Mutex<Option<Arc<TransferProgress>>>,
}

impl ProgressBoard {
    /// Publishes a new transfer; it replaces the previous one.
    pub fn start(&self, progress: Arc<TransferProgress>) {
        if let Ok(mut current) = self.current.lock() {
            *current = Some(progress);
        }
    }

    /// The running or last transfer.
    pub fn current(&self) -> Option<Arc<TransferProgress>> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// The running transfer of `operation`, if one is running now.
    pub fn running(&self, operation: Operation) -> Option<Arc<TransferProgress>> {
        self.current().filter(|p| {
            p.operation() == operation
                && matches!(
                    p.phase(),
                    Phase::Starting | Phase::Copying | Phase::Finishing
                )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_pass_reports_counts_rate_and_eta() {
        let p = TransferProgress::new(Operation::EnableFt, 1 << 30);
        assert_eq!(p.report().phase, Phase::Starting);
        assert_eq!(p.report().eta_ms, None);
        p.begin_pass(1000);
        std::thread::sleep(Duration::from_millis(5));
        p.sent(250, 250 * 4096);
        let r = p.report();
        assert_eq!((r.pass, r.pages_done, r.pages_total), (1, 250, 1000));
        assert_eq!(r.bytes, 250 * 4096);
        assert!(r.rate_bytes_per_s > 0);
        let eta = r.eta_ms.expect("an eta while copying");
        // 750 pages left at the rate that sent 250 in the elapsed time: about 3x elapsed.
        assert!(eta >= 3 * 5 - 1, "{r:?}");
        p.begin_pass(10);
        let r = p.report();
        assert_eq!(
            (r.pass, r.pages_done, r.pages_total, r.pages_sent),
            (2, 0, 10, 250)
        );
        p.failed("the backup went away");
        let r = p.report();
        assert_eq!(r.phase, Phase::Failed);
        assert_eq!(r.error.as_deref(), Some("the backup went away"));
        assert_eq!(r.eta_ms, None);
    }

    #[test]
    fn the_board_tells_running_from_finished() {
        let board = ProgressBoard::default();
        assert!(board.current().is_none());
        let p = Arc::new(TransferProgress::new(Operation::SendMigration, 4096));
        board.start(p.clone());
        assert!(board.running(Operation::SendMigration).is_some());
        assert!(board.running(Operation::EnableFt).is_none());
        p.done();
        assert!(board.running(Operation::SendMigration).is_none());
        assert_eq!(board.current().map(|p| p.phase()), Some(Phase::Done));
    }

    #[test]
    fn progress_events_are_throttled_but_ends_always_reported() {
        let out = Shared::default();
        let monitor = Arc::new(EventMonitor::from_writer(Box::new(out.clone())));
        let p =
            TransferProgress::new(Operation::EnableFt, 4096).with_monitor(Some(monitor.clone()));
        p.begin_pass(100_000);
        for _ in 0..1000 {
            p.sent(100, 409_600);
        }
        p.finishing();
        p.done();
        monitor.flush(Duration::from_secs(5));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&text)
            .into_iter()
            .map(|v| v.unwrap())
            .collect();
        assert!(events.len() <= 4, "{} events: {text}", events.len());
        let last = events.last().unwrap();
        assert_eq!(last["event"], "ft-sync-progress");
        assert_eq!(last["source"], "vm");
        assert_eq!(last["properties"]["phase"], "done");
        assert_eq!(last["properties"]["pages_done"], "100000");
    }

    /// While a sync runs the control loop is busy with it: `vm.ft-status` and `vm.progress`
    /// are answered by the API thread from the board; once it is over they go to the loop.
    #[test]
    fn the_api_answers_status_and_progress_from_the_board_during_a_sync() {
        use crate::control::{ApiSender, FtHealth, FtRole, VmmRequest, VmmResponse};
        let (tx, rx) = std::sync::mpsc::channel();
        let wake = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let board = Arc::new(ProgressBoard::default());
        let api = ApiSender::new(tx, wake).with_progress(board.clone());
        // Nothing has run: 404, and the loop is not asked.
        let e = api.call(VmmRequest::Progress).unwrap().unwrap_err();
        assert!(
            e.to_string().contains("no enable-ft or send-migration"),
            "{e}"
        );
        let sync = Arc::new(TransferProgress::new(Operation::EnableFt, 1 << 20));
        board.start(sync.clone());
        sync.begin_pass(256);
        sync.sent(64, 64 * 4096);
        match api.call(VmmRequest::FtStatus).unwrap() {
            Ok(VmmResponse::FtStatus(status)) => {
                assert_eq!(
                    (status.role, status.health),
                    (FtRole::Primary, FtHealth::Syncing)
                );
                let report = status.sync.expect("the sync's progress");
                assert_eq!((report.pages_done, report.pages_total), (64, 256));
            }
            other => panic!("{other:?}"),
        }
        match api.call(VmmRequest::Progress).unwrap() {
            Ok(VmmResponse::Progress(report)) => assert_eq!(report.phase, Phase::Copying),
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_err(), "the busy control loop was asked");
        // Over: the status is the loop's again (answered here by a stand-in loop).
        sync.done();
        let responder = std::thread::spawn(move || {
            let message = rx.recv().unwrap();
            assert!(matches!(message.request, VmmRequest::FtStatus));
            let _ = message
                .reply
                .send(Ok(VmmResponse::FtStatus(Box::default())));
        });
        match api.call(VmmRequest::FtStatus).unwrap() {
            Ok(VmmResponse::FtStatus(status)) => assert!(status.sync.is_none()),
            other => panic!("{other:?}"),
        }
        responder.join().unwrap();
        match api.call(VmmRequest::Progress).unwrap() {
            Ok(VmmResponse::Progress(report)) => assert_eq!(report.phase, Phase::Done),
            other => panic!("{other:?}"),
        }
    }
}
