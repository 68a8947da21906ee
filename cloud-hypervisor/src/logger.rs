// SPDX-License-Identifier: Apache-2.0

//! The process logger, writing lines in Cloud Hypervisor's shape:
//!
//! `cloud-hypervisor: 0.012345s: INFO:vmm/src/lib.rs:42 -- message`

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LoggerError {
    #[error("--log-file: cannot create {}: {source}", path.display())]
    CreateLogFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot install the logger: {0}")]
    SetLogger(#[from] log::SetLoggerError),
}

/// The level for a `-v` count, as in Cloud Hypervisor.
pub fn level_for_verbosity(verbosity: u8) -> LevelFilter {
    match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Writes each record as one line to a shared sink.
pub struct Logger {
    level: LevelFilter,
    start: Instant,
    output: Mutex<Box<dyn Write + Send>>,
    line_end: &'static str,
}

impl Logger {
    /// A logger writing records at `level` or more severe to `output`.
    /// `raw_terminal` selects `\r\n` line ends, needed when the output is a
    /// terminal that the serial console may have switched to raw mode, where
    /// a bare `\n` does not return the cursor to the first column.
    pub fn new(level: LevelFilter, output: Box<dyn Write + Send>, raw_terminal: bool) -> Self {
        Self {
            level,
            start: Instant::now(),
            output: Mutex::new(output),
            line_end: if raw_terminal { "\r\n" } else { "\n" },
        }
    }

    fn format(&self, record: &Record) -> String {
        let elapsed = self.start.elapsed().as_secs_f64();
        let location = match (record.file(), record.line()) {
            (Some(file), Some(line)) => format!("{file}:{line}"),
            _ => record.target().to_owned(),
        };
        format!(
            "cloud-hypervisor: {elapsed:.6}s: {}:{location} -- {}{}",
            record.level(),
            record.args(),
            self.line_end
        )
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = self.format(record);
        // A poisoned lock only means another thread panicked mid-write;
        // logging must go on. Write errors are dropped because there is
        // nowhere left to report them.
        let mut output = self
            .output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = output.write_all(line.as_bytes());
        let _ = output.flush();
    }

    fn flush(&self) {
        let mut output = self
            .output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = output.flush();
    }
}

/// Installs the process logger: level from the `-v` count (0 = Warn,
/// 1 = Info, 2 = Debug, 3 or more = Trace), output to `log_file` (created or
/// truncated, as Cloud Hypervisor does) or else to stderr.
pub fn init(verbosity: u8, log_file: Option<&Path>) -> Result<(), LoggerError> {
    let level = level_for_verbosity(verbosity);
    let (output, raw_terminal): (Box<dyn Write + Send>, bool) = match log_file {
        Some(path) => {
            let file = File::create(path).map_err(|source| LoggerError::CreateLogFile {
                path: path.to_owned(),
                source,
            })?;
            (Box::new(file), false)
        }
        None => (Box::new(io::stderr()), io::stderr().is_terminal()),
    };
    log::set_boxed_logger(Box::new(Logger::new(level, output, raw_terminal)))?;
    log::set_max_level(level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Level;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn emit(logger: &Logger, level: Level, message: &str) {
        logger.log(
            &Record::builder()
                .level(level)
                .target("vmm::vcpu")
                .file(Some("vmm/src/vcpu.rs"))
                .line(Some(42))
                .args(format_args!("{message}"))
                .build(),
        );
    }

    #[test]
    fn verbosity_levels() {
        assert_eq!(level_for_verbosity(0), LevelFilter::Warn);
        assert_eq!(level_for_verbosity(1), LevelFilter::Info);
        assert_eq!(level_for_verbosity(2), LevelFilter::Debug);
        assert_eq!(level_for_verbosity(3), LevelFilter::Trace);
        assert_eq!(level_for_verbosity(200), LevelFilter::Trace);
    }

    #[test]
    fn line_format() {
        let sink = Sink::default();
        let logger = Logger::new(LevelFilter::Info, Box::new(sink.clone()), false);
        emit(&logger, Level::Info, "vCPU 0 started");
        let text = sink.text();
        let rest = text.strip_prefix("cloud-hypervisor: ").unwrap();
        let (seconds, rest) = rest.split_once("s: ").unwrap();
        let (whole, decimals) = seconds.split_once('.').unwrap();
        assert!(whole.parse::<u64>().is_ok(), "{text}");
        assert_eq!(decimals.len(), 6, "{text}");
        assert_eq!(rest, "INFO:vmm/src/vcpu.rs:42 -- vCPU 0 started\n");
    }

    #[test]
    fn raw_terminal_line_end() {
        let sink = Sink::default();
        let logger = Logger::new(LevelFilter::Warn, Box::new(sink.clone()), true);
        emit(&logger, Level::Error, "boom");
        assert!(sink
            .text()
            .ends_with("ERROR:vmm/src/vcpu.rs:42 -- boom\r\n"));
    }

    #[test]
    fn filters_by_level() {
        let sink = Sink::default();
        let logger = Logger::new(LevelFilter::Warn, Box::new(sink.clone()), false);
        emit(&logger, Level::Info, "hidden");
        emit(&logger, Level::Debug, "hidden");
        emit(&logger, Level::Warn, "shown");
        let text = sink.text();
        assert_eq!(text.lines().count(), 1);
        assert!(text.contains("WARN:"));
    }

    #[test]
    fn falls_back_to_target_without_location() {
        let sink = Sink::default();
        let logger = Logger::new(LevelFilter::Trace, Box::new(sink.clone()), false);
        logger.log(
            &Record::builder()
                .level(Level::Trace)
                .target("vmm::memory")
                .args(format_args!("x"))
                .build(),
        );
        assert!(sink.text().contains("TRACE:vmm::memory -- x"));
    }

    #[test]
    fn unwritable_log_file_is_reported() {
        let err = init(0, Some(Path::new("/nonexistent-dir/sub/log"))).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("--log-file: cannot create /nonexistent-dir/sub/log"));
    }
}
