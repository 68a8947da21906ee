//! A real backup driven by a hand-written primary: its data streams (`enable-ft --streams N`:
//! who may join a session as its data stream, and which page frames a pass may take from
//! one) and the order of its answers. No KVM: the backup's standby memory is plain memory.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::gate::LoggedFrame;
use ft::backup::Backup;
use ft::link::FtStream;
use ft::wire::{encode_input_frames, Control};
use vmm::config::VmConfig;
use vmm::control::{FtDiskMode, ReceiveFtRequest};
use vmm::fault_tolerance::{BackupEvent, BackupFt};
use vmm::migration::protocol::{encode_frame, FrameReader, FrameType, LaneDigest, Message, Sender};
use vmm_sys_util::eventfd::EventFd;

mod common;

const MEMORY: u64 = 4 << 20;
const PAIR: u64 = 7;
const TOKEN: u64 = 0x5eed_0fda_7a57;
const TIMEOUT: Duration = Duration::from_secs(10);
/// The VM's one NIC, as the backup's operator names it (never opened: the standby VM here is
/// its memory alone).
const TAP: &str = "standby-tap0";

fn request(receiver_url: String) -> ReceiveFtRequest {
    ReceiveFtRequest {
        receiver_url,
        disk_paths: vec![],
        taps: vec![TAP.into()],
        witness: None,
        fencing: None,
        group: None,
        tls_dir: None,
        insecure_plaintext: true,
    }
}

/// The backup's control-loop half on a thread: prepares the standby memory, and returns the
/// event that ends the session (or None when told to stop first).
fn control_loop(
    mut backup: Backup,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Option<String>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let _ = wake.read();
            match backup.poll() {
                BackupEvent::None => std::thread::sleep(Duration::from_millis(1)),
                BackupEvent::Prepare { config, reply } => {
                    let memory = vmm::memory::create(config.memory.size);
                    let _ = reply.send(memory.map_err(|e| e.to_string()));
                }
                other => {
                    let event = match other {
                        BackupEvent::Failed(e) => format!("Failed: {e}"),
                        BackupEvent::TakeOver { .. } => "TakeOver".into(),
                        _ => "StandDown".into(),
                    };
                    Box::new(backup).stop();
                    return Some(event);
                }
            }
        }
        Box::new(backup).stop();
        None
    })
}

/// A backup on an in-process link, its control loop running: the primary's end of the link,
/// the control loop, and what stops it.
fn connected_backup() -> (UnixStream, JoinHandle<Option<String>>, Arc<AtomicBool>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let backup = Backup::start_connected(
        FtStream::Unix(theirs),
        &request("tcp:127.0.0.1:1".into()),
        wake.clone(),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    (ours, control_loop(backup, wake, stop.clone()), stop)
}

/// The backup answers with `why` and its session ends as failed.
fn refused<S: Read + Write>(main: &mut Main<S>, control: JoinHandle<Option<String>>, why: &str) {
    let answer = main.answer();
    assert!(answer.contains(why), "the backup's answer: {answer}");
    let event = control.join().unwrap();
    assert!(
        event.as_deref().is_some_and(|e| e.contains("Failed")),
        "the backup went on: {event:?}"
    );
}

/// The primary's first connection, written by hand (frames 0, 1, ... in order).
struct Main<S: Read + Write> {
    sender: Sender<S>,
    read_half: S,
    reader: FrameReader,
}

impl<S: Read + Write> Main<S> {
    /// Hello, then Params announcing `lanes` data streams.
    fn open(stream: S, read_half: S, lanes: u32) -> Self {
        let mut sender = Sender::new(stream);
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "memory": {"size": MEMORY},
            "net": [{"tap": "primary-tap0"}],
        }))
        .unwrap();
        sender.send_hello(&config).unwrap();
        let params = Control::Params {
            pair_id: PAIR,
            epoch_ms: 10,
            heartbeat_timeout_ms: 5000,
            disk_mode: FtDiskMode::Shared,
            witness: None,
            fencing: None,
            disk_sizes: Vec::new(),
            lanes,
            lane_token: TOKEN,
        };
        sender
            .send_frame(FrameType::Control, &params.encode())
            .unwrap();
        Self {
            sender,
            read_half,
            reader: FrameReader::new(),
        }
    }

    /// MemoryDone (`pages` in the pass, and the data streams' part of it), State, EpochEnd.
    fn end_epoch(&mut self, epoch: u64, pages: u64, lanes: &[LaneDigest]) {
        let mut done = Vec::new();
        done.extend_from_slice(&epoch.wrapping_sub(1).to_le_bytes()[..4]);
        done.extend_from_slice(&(lanes.len() as u32).to_le_bytes());
        done.extend_from_slice(&pages.to_le_bytes());
        for lane in lanes {
            let lane = lane.finish();
            done.extend_from_slice(&lane.frames.to_le_bytes());
            done.extend_from_slice(&lane.digest.to_le_bytes());
        }
        // A backup that refuses the pass closes the connection at once, so the writes after
        // it may fail: its answer (see `answer`) says what happened.
        let end = Control::EpochEnd {
            epoch,
            released_through: epoch,
            group_epoch: None,
            clock: None,
        };
        let _ = self
            .sender
            .send_frame(FrameType::MemoryDone, &done)
            .and_then(|()| self.sender.send_state(&common::blank_state()))
            .and_then(|()| self.sender.send_frame(FrameType::Control, &end.encode()));
    }

    /// The backup's answer to an epoch: "Ack N" or the text of its Error.
    fn answer(&mut self) -> String {
        self.answers().pop().unwrap_or_default()
    }

    /// The backup's answers up to its answer to an epoch, in order: "InputAck N" for input,
    /// then "Ack N" or the text of its Error (heartbeats left out).
    fn answers(&mut self) -> Vec<String> {
        let mut answers = Vec::new();
        loop {
            let frame = match self.reader.read_frame(&mut self.read_half) {
                Ok(frame) => frame,
                Err(e) => break answers.push(format!("(closed: {e})")),
            };
            match Message::parse(&frame) {
                Ok(Message::Error { message }) => break answers.push(message),
                Ok(Message::Control { payload }) => match Control::decode(payload) {
                    Ok(Control::Ack { epoch }) => break answers.push(format!("Ack {epoch}")),
                    Ok(Control::InputAck { seq }) => answers.push(format!("InputAck {seq}")),
                    Ok(_) => continue,
                    Err(e) => break answers.push(format!("(bad control: {e})")),
                },
                other => break answers.push(format!("(unexpected {other:?})")),
            }
        }
        answers
    }
}

/// A stream whose writes can be held back and then leave in one write, so that the backup
/// finds a whole sequence of frames already there.
struct Corked {
    stream: UnixStream,
    held: Rc<RefCell<Option<Vec<u8>>>>,
}

impl Read for Corked {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for Corked {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self.held.borrow_mut().as_mut() {
            Some(held) => {
                held.extend_from_slice(data);
                Ok(data.len())
            }
            None => self.stream.write(data),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// A data stream's frames, written by hand from its JoinLane on (frame 0).
struct LaneWriter<S: Write> {
    stream: S,
    seq: u32,
    digest: LaneDigest,
}

impl<S: Write> LaneWriter<S> {
    fn join(mut stream: S, pair_id: u64, token: u64) -> std::io::Result<Self> {
        let join = Control::JoinLane {
            pair_id,
            token,
            lane: 1,
        };
        stream.write_all(&encode_frame(FrameType::Control, 0, 0, &join.encode()))?;
        Ok(Self {
            stream,
            seq: 1,
            digest: LaneDigest::default(),
        })
    }

    /// One MemoryPages frame holding page `page` filled with `byte`; counted in the pass's
    /// digest when `counted`.
    fn page(&mut self, page: u64, byte: u8, counted: bool) {
        let mut payload = 1u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&(page * 4096).to_le_bytes());
        payload.extend_from_slice(&[byte; 4096]);
        let frame = encode_frame(FrameType::MemoryPages, 0, self.seq, &payload);
        self.seq += 1;
        let crc = u32::from_le_bytes(frame[frame.len() - 4..].try_into().unwrap());
        if counted {
            self.digest.add(crc);
        }
        self.stream.write_all(&frame).unwrap();
    }

    /// What the pass carried; the next pass starts afresh.
    fn pass(&mut self) -> LaneDigest {
        std::mem::take(&mut self.digest)
    }
}

fn connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect to 127.0.0.1:{port}: {e}"),
        }
    }
}

/// Whether the backup closed `stream` (turned the connection away) within the timeout.
fn closed_by_backup(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(0) | Err(_))
}

#[test]
fn a_stranger_cannot_join_a_session_as_its_data_stream() {
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let backup = Backup::start(&request(format!("tcp:127.0.0.1:{port}")), wake.clone()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let control = control_loop(backup, wake, stop.clone());

    let stream = connect(port);
    let mut main = Main::open(stream.try_clone().unwrap(), stream, 1);
    // The session's pair with another token, another pair with its token, and a peer that
    // says nothing sensible: each is turned away while the backup waits for its stream.
    for (pair, token) in [(PAIR, TOKEN ^ 1), (PAIR + 1, TOKEN)] {
        let mut stranger = connect(port);
        LaneWriter::join(stranger.try_clone().unwrap(), pair, token).unwrap();
        assert!(
            closed_by_backup(&mut stranger),
            "pair {pair:#x} token {token:#x} joined"
        );
    }
    let mut noise = connect(port);
    noise.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(
        closed_by_backup(&mut noise),
        "a stranger's bytes were taken"
    );

    let mut lane = LaneWriter::join(connect(port), PAIR, TOKEN).unwrap();
    main.end_epoch(1, 0, &[]);
    assert_eq!(main.answer(), "Ack 1");
    // Once its streams joined, the backup no longer listens.
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the backup still accepts connections"
    );
    // A protected epoch's page on the data stream.
    lane.page(3, 0x5a, true);
    main.end_epoch(2, 1, &[lane.pass()]);
    assert_eq!(main.answer(), "Ack 2");

    stop.store(true, Ordering::SeqCst);
    assert_eq!(control.join().unwrap(), None, "the session ended early");
}

#[test]
fn a_pass_takes_only_its_own_frames_from_a_data_stream() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (lane_ours, lane_theirs) = UnixStream::pair().unwrap();
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let backup = Backup::start_connected_with_lanes(
        FtStream::Unix(theirs),
        vec![FtStream::Unix(lane_theirs)],
        &request("tcp:127.0.0.1:1".into()),
        wake.clone(),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let control = control_loop(backup, wake, stop.clone());
    let mut main = Main::open(ours.try_clone().unwrap(), ours, 1);
    let mut lane = LaneWriter::join(lane_ours, PAIR, TOKEN).unwrap();
    main.end_epoch(1, 0, &[]);
    assert_eq!(main.answer(), "Ack 1");
    lane.page(1, 0x11, true);
    main.end_epoch(2, 1, &[lane.pass()]);
    assert_eq!(main.answer(), "Ack 2");
    // Epoch 3's pass names one frame, but the frame waiting on the stream is another of the
    // same size (one that arrived late, or was replayed): taking it would hold page 2 as
    // epoch 3 never had it.
    lane.page(2, 0x22, false);
    let mut expected = LaneDigest::default();
    let other = encode_frame(FrameType::MemoryPages, 0, 2, &{
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&(2u64 * 4096).to_le_bytes());
        p.extend_from_slice(&[0x33; 4096]);
        p
    });
    expected.add(u32::from_le_bytes(
        other[other.len() - 4..].try_into().unwrap(),
    ));
    main.end_epoch(3, 1, &[expected]);
    refused(
        &mut main,
        control,
        "data stream 1 carried other page frames",
    );
}

#[test]
fn a_session_announcing_more_data_streams_than_allowed_is_refused() {
    let (ours, control, _stop) = connected_backup();
    let mut main = Main::open(ours.try_clone().unwrap(), ours, 9);
    refused(
        &mut main,
        control,
        "the primary asked for 9 data streams, at most 8",
    );
}

/// Input read just before an epoch's end is acknowledged before the backup commits the
/// epoch: the primary's guest ACKs wait for that acknowledgement, and a commit can take
/// milliseconds. Input with more of the stream already here waits for it (up to 200 us), so
/// without the answer before the commit it would leave after the epoch's Ack.
#[test]
fn input_read_before_an_epoch_end_is_acknowledged_before_the_commit() {
    let (ours, control, stop) = connected_backup();
    let held = Rc::new(RefCell::new(None));
    let corked = |stream: UnixStream| Corked {
        stream,
        held: held.clone(),
    };
    let mut main = Main::open(corked(ours.try_clone().unwrap()), corked(ours), 0);
    main.end_epoch(1, 0, &[]);
    assert_eq!(main.answers(), ["Ack 1"]);

    for epoch in 2..=4u64 {
        let input = LoggedFrame {
            seq: epoch,
            nic: 0,
            epoch,
            data: vec![0x45; 1514],
            placed: Vec::new(),
        };
        *held.borrow_mut() = Some(Vec::new());
        for payload in encode_input_frames(&[input]) {
            main.sender
                .send_frame(FrameType::InputFrames, &payload)
                .unwrap();
        }
        main.end_epoch(epoch, 0, &[]);
        let frames = held.borrow_mut().take().unwrap();
        main.sender
            .get_ref()
            .stream
            .try_clone()
            .unwrap()
            .write_all(&frames)
            .unwrap();
        assert_eq!(
            main.answers(),
            [format!("InputAck {epoch}"), format!("Ack {epoch}")],
            "epoch {epoch}"
        );
    }

    stop.store(true, Ordering::SeqCst);
    assert_eq!(control.join().unwrap(), None, "the session ended early");
}
