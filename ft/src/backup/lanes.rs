//! The backup's data streams (`enable-ft --streams N`): the N - 1 connections beside the
//! first that carry the page frames of each epoch. Each joins by repeating the pair and the
//! random token of the session's Params, is read by a thread of its own (`ft-lane-N`, which
//! checks its frames and sequence numbers), and hands its frames to the receive loop, which
//! takes exactly as many from each stream as the pass's MemoryDone names.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::migration::protocol::{
    FrameReader, FrameType, Message, HEADER_LEN, MAX_LANES, TRAILER_LEN,
};

use super::{accept_one, primary_gone, Shared, SETUP_TIMEOUT};
use crate::link::FtStream;
use crate::wire::Control;

/// Where the data streams come from: the backup's listener, or connected in-process.
pub(super) enum LaneSource {
    Listen(TcpListener),
    Connected(std::vec::IntoIter<FtStream>),
}

/// One page frame read from a data stream.
pub(super) struct LaneFrame {
    pub flags: u8,
    pub payload: Vec<u8>,
    /// Its checksum (MemoryDone's digest covers it).
    pub crc: u32,
}

/// Why a data stream failed: `gone` when the primary's end closed or went silent (as for the
/// first connection), otherwise the stream broke the protocol.
pub(super) struct LaneFailure {
    pub gone: bool,
    pub reason: String,
}

/// The session's data streams and their reader threads; dropping it closes them.
pub(super) struct LaneSet {
    frames: Vec<mpsc::Receiver<Result<LaneFrame, LaneFailure>>>,
    streams: Vec<FtStream>,
    threads: Vec<JoinHandle<()>>,
    /// Bytes read by the threads and not yet taken, bounded by one epoch.
    buffered: Arc<AtomicU64>,
}

/// The identity a data stream must repeat.
pub(super) struct Session {
    pub pair_id: u64,
    pub token: u64,
    pub lanes: u32,
}

impl LaneSet {
    /// A session without data streams.
    pub fn none() -> Self {
        Self {
            frames: Vec::new(),
            streams: Vec::new(),
            threads: Vec::new(),
            buffered: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Starts the readers of the `joined` data streams; `epoch_limit` bounds what they may
    /// buffer.
    pub fn start(shared: &Shared, joined: Joined, epoch_limit: u64) -> Result<Self, String> {
        let mut set = Self::none();
        let buffered = set.buffered.clone();
        for (i, (stream, reader)) in joined.0.into_iter().enumerate() {
            // Idle epochs send nothing here: only the first connection has heartbeats.
            stream.set_read_timeout(None).map_err(|e| e.to_string())?;
            set.streams
                .push(stream.try_clone().map_err(|e| e.to_string())?);
            shared
                .lanes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(stream.try_clone().map_err(|e| e.to_string())?);
            let (tx, rx) = mpsc::channel();
            let buffered = buffered.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ft-lane-{}", i + 1))
                .spawn(move || {
                    if vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Replication) {
                        read_lane(stream, reader, &tx, &buffered, epoch_limit);
                    } else {
                        let _ = tx.send(Err(LaneFailure {
                            gone: false,
                            reason: "a data stream's thread cannot install its seccomp filter"
                                .into(),
                        }));
                    }
                })
                .map_err(|e| format!("data stream thread: {e}"))?;
            set.frames.push(rx);
            set.threads.push(thread);
        }
        Ok(set)
    }
}

/// Data streams that joined, in order, each with the reader that read its JoinLane.
pub(super) struct Joined(Vec<(FtStream, FrameReader)>);

impl Joined {
    /// Waits (at most [`SETUP_TIMEOUT`]) for the session's data streams to join. A connection
    /// that fails the handshake or names another session is turned away and the wait goes on.
    pub fn wait(
        shared: &Shared,
        mut source: LaneSource,
        session: &Session,
    ) -> Result<Self, String> {
        if session.lanes == 0 {
            return Ok(Self(Vec::new()));
        }
        if session.lanes as usize > MAX_LANES {
            return Err(format!(
                "the primary asked for {} data streams, at most {MAX_LANES}",
                session.lanes
            ));
        }
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let mut joined: Vec<Option<(FtStream, FrameReader)>> =
            (0..session.lanes).map(|_| None).collect();
        while joined.iter().any(Option::is_none) {
            if shared.stop.load(Ordering::SeqCst) {
                return Err("stopped while data streams joined".into());
            }
            let (mut stream, from) = match &mut source {
                LaneSource::Listen(listener) => accept_one(shared, listener, Some(deadline))?,
                LaneSource::Connected(streams) => match streams.next() {
                    Some(stream) => (stream, "in-process".to_string()),
                    None => return Err("fewer data streams than the primary announced".into()),
                },
            };
            stream
                .set_read_timeout(Some(SETUP_TIMEOUT.min(
                    deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(1),
                )))
                .map_err(|e| e.to_string())?;
            let mut reader = FrameReader::new();
            match read_join(&mut reader, &mut stream, session) {
                Ok(lane) => match joined.get_mut(lane as usize - 1) {
                    Some(slot @ None) => {
                        log::info!("FT: data stream {lane} joined from {from}");
                        *slot = Some((stream, reader));
                        continue;
                    }
                    _ => log::warn!("FT: refused {from}: data stream {lane} joined already"),
                },
                Err(e) => log::warn!("FT: refused {from} as a data stream: {e}"),
            }
            stream.shutdown();
            if matches!(source, LaneSource::Connected(_)) {
                return Err("an in-process data stream did not join".into());
            }
        }
        Ok(Joined(joined.into_iter().flatten().collect()))
    }
}

impl LaneSet {
    /// The next page frame of data stream `lane` (0-based), waiting at most `wait`.
    pub fn take(&self, lane: usize, wait: Duration) -> Result<LaneFrame, LaneFailure> {
        let Some(frames) = self.frames.get(lane) else {
            return Err(LaneFailure {
                gone: false,
                reason: format!("no data stream {}", lane + 1),
            });
        };
        match frames.recv_timeout(wait) {
            Ok(Ok(frame)) => {
                self.buffered
                    .fetch_sub(wire_len(frame.payload.len()), Ordering::SeqCst);
                Ok(frame)
            }
            Ok(Err(failure)) => Err(failure),
            Err(RecvTimeoutError::Timeout) => Err(LaneFailure {
                gone: true,
                reason: format!("data stream {} silent within the timeout", lane + 1),
            }),
            Err(RecvTimeoutError::Disconnected) => Err(LaneFailure {
                gone: true,
                reason: format!("data stream {} closed", lane + 1),
            }),
        }
    }
}

impl Drop for LaneSet {
    fn drop(&mut self) {
        for stream in &self.streams {
            stream.shutdown();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn wire_len(payload: usize) -> u64 {
    (HEADER_LEN + payload + TRAILER_LEN) as u64
}

/// Reads a data stream's first frame: its JoinLane, which must name this session. Returns
/// the stream's number (1 ..= lanes).
fn read_join(
    reader: &mut FrameReader,
    stream: &mut FtStream,
    session: &Session,
) -> Result<u32, String> {
    let frame = reader.read_frame(stream).map_err(|e| e.to_string())?;
    let Message::Control { payload } = Message::parse(&frame).map_err(|e| e.to_string())? else {
        return Err(format!("its first frame is {}, not JoinLane", frame.kind));
    };
    match Control::decode(payload).map_err(|e| e.to_string())? {
        Control::JoinLane {
            pair_id,
            token,
            lane,
        } if pair_id == session.pair_id && token == session.token => {
            if lane == 0 || lane > session.lanes {
                return Err(format!(
                    "data stream {lane} of a session with {}",
                    session.lanes
                ));
            }
            Ok(lane)
        }
        Control::JoinLane { .. } => Err("it names another session".into()),
        other => Err(format!("expected JoinLane, got {other:?}")),
    }
}

/// A data stream's reader: checked MemoryPages frames to the receive loop until the stream
/// ends, breaks the protocol or buffers more than one epoch.
fn read_lane(
    mut stream: FtStream,
    mut reader: FrameReader,
    frames: &mpsc::Sender<Result<LaneFrame, LaneFailure>>,
    buffered: &AtomicU64,
    epoch_limit: u64,
) {
    loop {
        let failure = match reader.read_frame(&mut stream) {
            Ok(frame) if frame.kind == FrameType::MemoryPages => {
                let len = wire_len(frame.payload.len());
                if buffered.fetch_add(len, Ordering::SeqCst) + len > epoch_limit {
                    LaneFailure {
                        gone: false,
                        reason: format!(
                            "more than an epoch ({epoch_limit} bytes) waits on the data streams"
                        ),
                    }
                } else {
                    let frame = LaneFrame {
                        flags: frame.flags,
                        payload: frame.payload.to_vec(),
                        crc: frame.crc,
                    };
                    if frames.send(Ok(frame)).is_err() {
                        return;
                    }
                    continue;
                }
            }
            Ok(frame) => LaneFailure {
                gone: false,
                reason: format!("a data stream carries only page frames, not {}", frame.kind),
            },
            Err(e) => LaneFailure {
                gone: primary_gone(&e),
                reason: format!("data stream: {e}"),
            },
        };
        let _ = frames.send(Err(failure));
        return;
    }
}
