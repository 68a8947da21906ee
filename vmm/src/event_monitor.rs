//! Cloud Hypervisor style event reporting (`--event-monitor`).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

pub struct EventMonitor {
    out: Mutex<Box<dyn Write + Send>>,
    start: Instant,
}

impl EventMonitor {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out: Mutex::new(out),
            start: Instant::now(),
        }
    }

    pub fn emit(&self, source: &str, event: &str, properties: Option<&BTreeMap<String, String>>) {
        let elapsed = self.start.elapsed();
        let value = serde_json::json!({
            "timestamp": {"secs": elapsed.as_secs(), "nanos": elapsed.subsec_nanos()},
            "source": source,
            "event": event,
            "properties": properties,
        });
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = writeln!(out, "{value}\n").and_then(|_| out.flush()) {
            log::warn!("cannot write event {event}: {e}");
        }
    }
}
