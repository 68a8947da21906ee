//! A hostile or broken peer: random frame sequences (well-formed frames with any type, random
//! payloads, and well-formed Control messages with any numbers, in any order) sent to a real
//! backup (after a valid Hello) and to a real primary (after its initial synchronisation).
//! Each side must end with a clear error or a decision, never panic (the test build aborts on
//! panic, killing this test), and a primary must count the link broken without releasing
//! anything it was not told the backup holds.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ft::backup::Backup;
use ft::link::FtStream;
use ft::wire::Control;
use proptest::prelude::*;
use vmm::config::VmConfig;
use vmm::control::{FtDiskMode, FtHealth, ReceiveFtRequest};
use vmm::fault_tolerance::{BackupEvent, BackupFt};
use vmm::migration::protocol::{encode_frame, FrameType, Sender, FLAG_DELTA, FLAG_LZ4};
use vmm_sys_util::eventfd::EventFd;

mod common;

const MEMORY: u64 = 4 << 20;

/// One frame a hostile peer may send.
#[derive(Clone, Debug)]
enum Hostile {
    Raw {
        kind: u8,
        payload: Vec<u8>,
    },
    Control(Control),
    /// A delta MemoryPages frame: per entry a page number and, for a delta, its runs (else a
    /// whole page); the announced records length off by `skew`; flagged LZ4 if `lz4`.
    Deltas {
        entries: Vec<(u64, Option<Vec<u8>>)>,
        skew: i8,
        lz4: bool,
    },
    /// A MemoryDone naming data streams: `pages`, and per stream its frames and digest.
    Done {
        pages: u64,
        lanes: Vec<(u32, u32)>,
    },
}

fn control() -> impl Strategy<Value = Control> {
    let n = prop_oneof![Just(0u64), Just(1), Just(2), Just(u64::MAX), any::<u64>()];
    prop_oneof![
        (n.clone(), n.clone(), proptest::option::of(n.clone())).prop_map(
            |(epoch, released_through, group_epoch)| Control::EpochEnd {
                epoch,
                released_through,
                group_epoch,
                clock: None,
            }
        ),
        n.clone().prop_map(|epoch| Control::Ack { epoch }),
        n.clone().prop_map(|seq| Control::InputAck { seq }),
        n.clone().prop_map(|epoch| Control::Heartbeat { epoch }),
        (any::<bool>(), any::<bool>()).prop_map(|(guest_shutdown, reprotect)| {
            Control::StandDown {
                guest_shutdown,
                reason: "fuzz".into(),
                reprotect,
            }
        }),
        (n.clone(), n).prop_map(|(disk, offset)| Control::DiskZero {
            disk: disk as u32,
            offset,
            len: 4096,
        }),
    ]
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let entry = (
        0u64..2048,
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..24)),
    );
    prop_oneof![
        (1u8..=12, proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(kind, payload)| Hostile::Raw { kind, payload }),
        control().prop_map(Hostile::Control),
        (
            proptest::collection::vec(entry, 1..4),
            prop_oneof![Just(0i8), any::<i8>()],
            any::<bool>()
        )
            .prop_map(|(entries, skew, lz4)| Hostile::Deltas { entries, skew, lz4 }),
        (
            0u64..4,
            proptest::collection::vec((0u32..4, any::<u32>()), 0..4)
        )
            .prop_map(|(pages, lanes)| Hostile::Done { pages, lanes }),
    ]
}

/// The payload of [`Hostile::Deltas`] (the layout of vmm's protocol module header).
fn delta_frame(entries: &[(u64, Option<Vec<u8>>)], skew: i8, lz4: bool) -> (u8, Vec<u8>) {
    let mut records = Vec::new();
    let mut p = (entries.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for (page, delta) in entries {
        let gpa = page * 4096;
        match delta {
            Some(d) => {
                p.extend_from_slice(&(gpa | 2).to_le_bytes());
                records.extend_from_slice(&(d.len() as u16).to_le_bytes());
                records.extend_from_slice(d);
            }
            None => {
                p.extend_from_slice(&gpa.to_le_bytes());
                records.extend_from_slice(&[0x5a; 4096]);
            }
        }
    }
    let announced = (records.len() as i64 + i64::from(skew)).max(0) as u32;
    p[4..8].copy_from_slice(&announced.to_le_bytes());
    // With the LZ4 flag the records themselves pose as the LZ4 block (mostly invalid LZ4,
    // found only when the epoch is applied).
    let flags = if lz4 {
        FLAG_DELTA | FLAG_LZ4
    } else {
        FLAG_DELTA
    };
    p.extend_from_slice(&records);
    (flags, p)
}

fn encode(frame: &Hostile, seq: u32) -> Vec<u8> {
    match frame {
        Hostile::Raw { kind, payload } => {
            let kind = FrameType::from_u8(*kind).unwrap_or(FrameType::Control);
            encode_frame(kind, 0, seq, payload)
        }
        Hostile::Control(c) => encode_frame(FrameType::Control, 0, seq, &c.encode()),
        Hostile::Deltas { entries, skew, lz4 } => {
            let (flags, payload) = delta_frame(entries, *skew, *lz4);
            encode_frame(FrameType::MemoryPages, flags, seq, &payload)
        }
        Hostile::Done { pages, lanes } => {
            let mut p = 0u32.to_le_bytes().to_vec();
            p.extend_from_slice(&(lanes.len() as u32).to_le_bytes());
            p.extend_from_slice(&pages.to_le_bytes());
            for (frames, digest) in lanes {
                p.extend_from_slice(&frames.to_le_bytes());
                p.extend_from_slice(&digest.to_le_bytes());
            }
            encode_frame(FrameType::MemoryDone, 0, seq, &p)
        }
    }
}

/// A backup's request for an in-process link.
fn backup_request() -> ReceiveFtRequest {
    ReceiveFtRequest {
        receiver_url: "tcp:127.0.0.1:1".into(),
        disk_paths: Vec::new(),
        taps: Vec::new(),
        witness: None,
        fencing: None,
        group: None,
        tls_dir: None,
        insecure_plaintext: false,
    }
}

/// Frames 0 and 1 of a valid session on `stream`: Hello and Params announcing `lanes` data
/// streams (whose JoinLane must repeat pair 7 and token 99). Returns the sender, to go on.
fn open_session(stream: &UnixStream, lanes: u32) -> Sender<UnixStream> {
    let config: VmConfig =
        serde_json::from_value(serde_json::json!({"memory": {"size": MEMORY}})).unwrap();
    let mut sender = Sender::new(stream.try_clone().unwrap());
    sender.send_hello(&config).unwrap();
    let params = Control::Params {
        pair_id: 7,
        epoch_ms: 10,
        heartbeat_timeout_ms: 200,
        disk_mode: FtDiskMode::Shared,
        witness: None,
        fencing: None,
        disk_sizes: Vec::new(),
        lanes,
        lane_token: if lanes > 0 { 99 } else { 0 },
    };
    sender
        .send_frame(FrameType::Control, &params.encode())
        .unwrap();
    sender
}

/// Writes `frames` after Hello and Params (frames 0 and 1), then closes the connection.
fn send_after_params(mut stream: UnixStream, frames: &[Hostile]) {
    for (seq, frame) in (2u32..).zip(frames) {
        if stream.write_all(&encode(frame, seq)).is_err() {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Runs the backup's control-loop half until it reports an outcome.
fn outcome(mut backup: Backup, wake: &EventFd) -> Option<BackupEvent> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let _ = wake.read();
        match backup.poll() {
            BackupEvent::None => std::thread::sleep(Duration::from_millis(1)),
            BackupEvent::Prepare { config, reply } => {
                let _ =
                    reply.send(vmm::memory::create(config.memory.size).map_err(|e| e.to_string()));
            }
            other => {
                if let BackupEvent::TakeOver { .. } = other {
                    backup.took_over(Ok(()));
                }
                Box::new(backup).stop();
                return Some(other);
            }
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// The same with two data streams: each joins (or fails to) and then carries any frames,
    /// while the first connection names any number of them in its MemoryDones.
    #[test]
    fn a_hostile_primary_on_several_streams_gets_a_clear_error(
        frames in proptest::collection::vec(hostile(), 1..16),
        lanes in proptest::collection::vec(
            (any::<bool>(), proptest::collection::vec(hostile(), 0..6)),
            2,
        ),
    ) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let request = backup_request();
        let (lane_ends, lane_theirs): (Vec<_>, Vec<_>) =
            (0..2).map(|_| UnixStream::pair().unwrap()).unzip();
        let backup = Backup::start_connected_with_lanes(
            FtStream::Unix(theirs),
            lane_theirs.into_iter().map(FtStream::Unix).collect(),
            &request,
            wake.clone(),
        )
        .unwrap();
        let _ = open_session(&ours, 2);
        let mut writers = Vec::new();
        for (lane, (mut end, (joins, lane_frames))) in lane_ends.into_iter().zip(lanes).enumerate() {
            let join = Control::JoinLane {
                pair_id: 7,
                token: if joins { 99 } else { 98 },
                lane: lane as u32 + 1,
            };
            writers.push(std::thread::spawn(move || {
                let _ = end.write_all(&encode_frame(FrameType::Control, 0, 0, &join.encode()));
                for (seq, frame) in (1u32..).zip(&lane_frames) {
                    if end.write_all(&encode(frame, seq)).is_err() {
                        break;
                    }
                }
                // Left open: a silent stream must not hold the backup beyond its timeout.
                end
            }));
        }
        send_after_params(ours, &frames);
        let event = outcome(backup, &wake);
        let _lanes: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        prop_assert!(event.is_some(), "the backup never decided");
    }

    #[test]
    fn a_hostile_primary_gets_a_clear_error(frames in proptest::collection::vec(hostile(), 1..24)) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let request = backup_request();
        let backup = Backup::start_connected(FtStream::Unix(theirs), &request, wake.clone()).unwrap();
        let _ = open_session(&ours, 0);
        send_after_params(ours, &frames);
        let event = outcome(backup, &wake);
        prop_assert!(event.is_some(), "the backup never decided");
    }
}

/// A backup that answers the primary's epochs with nonsense: the primary counts the link
/// broken, releases nothing the backup did not acknowledge, and keeps running.
#[test]
fn a_hostile_backup_breaks_the_link_and_the_primary_runs_on() {
    use vmm::migration::protocol::FrameReader;
    let answers: Vec<Vec<Hostile>> = vec![
        vec![Hostile::Control(Control::Ack { epoch: u64::MAX })],
        vec![Hostile::Control(Control::Ack { epoch: 0 })],
        // Input the primary never sent: early ACKs must not leave on its word.
        vec![Hostile::Control(Control::InputAck { seq: u64::MAX })],
        vec![Hostile::Control(Control::EpochEnd {
            epoch: 3,
            released_through: 3,
            group_epoch: None,
            clock: None,
        })],
        vec![Hostile::Raw {
            kind: 2,
            payload: vec![0xff; 40],
        }],
        vec![Hostile::Raw {
            kind: 7,
            payload: b"no".to_vec(),
        }],
    ];
    for answer in answers {
        let input_ack = matches!(
            answer.first(),
            Some(Hostile::Control(Control::InputAck { .. }))
        );
        let (primary_end, backup_end) = UnixStream::pair().unwrap();
        // A fake backup: reads the sync, acknowledges it, then answers with `answer`.
        let fake = std::thread::spawn(move || {
            let mut stream = backup_end;
            let mut reader = FrameReader::new();
            let mut seq = 0u32;
            let mut sync_done = false;
            let mut answered = false;
            loop {
                let frame = match reader.read_frame(&mut stream) {
                    Ok(f) => (f.kind, f.payload.to_vec()),
                    Err(_) => return,
                };
                if frame.0 != FrameType::Control {
                    continue;
                }
                if let Ok(Control::EpochEnd { epoch, .. }) = Control::decode(&frame.1) {
                    if !sync_done {
                        sync_done = true;
                        let ack = Control::Ack { epoch }.encode();
                        let _ = stream.write_all(&encode_frame(FrameType::Control, 0, seq, &ack));
                        seq += 1;
                    } else if !answered {
                        answered = true;
                        for f in &answer {
                            let _ = stream.write_all(&encode(f, seq));
                            seq += 1;
                        }
                    }
                }
            }
        });
        let mut vm = fake_vm::FakeVm::new();
        let config: VmConfig =
            serde_json::from_value(serde_json::json!({"memory": {"size": MEMORY}})).unwrap();
        let request = vmm::control::EnableFtRequest {
            peer: "127.0.0.1:1".into(),
            epoch_ms: 2,
            disk_mode: FtDiskMode::Shared,
            heartbeat_timeout_ms: Some(500),
            witness: None,
            fencing: None,
            compress: true,
            hot_pages: true,
            stage_helper: true,
            early_staging: true,
            early_send: true,
            early_acks: true,
            resend_output: true,
            latency_mode: false,
            encode_threads: None,
            streams: None,
            group: None,
            tls_dir: None,
            insecure_plaintext: false,
        };
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut primary = ft::primary::Primary::enable_over(
            &mut vm,
            &config,
            &request,
            wake,
            FtStream::Unix(primary_end),
            None,
            None,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while primary.status().health == FtHealth::Protected && Instant::now() < deadline {
            if let Some(wait) = primary.next_checkpoint() {
                std::thread::sleep(wait.min(Duration::from_millis(2)));
                primary.checkpoint(&mut vm).unwrap();
            }
            let _ = primary.poll(&mut vm, true);
        }
        let status = primary.status();
        assert_eq!(status.health, FtHealth::Degraded, "{status:?}");
        assert!(
            status.last_committed_epoch <= 2,
            "committed {} on a hostile answer",
            status.last_committed_epoch
        );
        assert!(status.last_error.is_some());
        if input_ack {
            let error = status.last_error.clone().unwrap_or_default();
            assert!(
                error.contains("acknowledged input frame"),
                "an InputAck for input never sent: {error}"
            );
        }
        let _ = primary.stop(Some(&mut vm), vmm::fault_tolerance::StopReason::VmGone);
        let _ = fake.join();
    }
}

/// The smallest VM the primary can protect: memory and pass-through gates, no devices.
mod fake_vm {
    use vmm::device_manager::FtGates;
    use vmm::fault_tolerance::ReplicableVm;
    use vmm::memory::GuestMemoryMmap;
    use vmm::migration::memory::DirtyPages;
    use vmm::vm::VmSnapshotState;

    pub struct FakeVm {
        memory: GuestMemoryMmap,
    }

    impl FakeVm {
        pub fn new() -> Self {
            Self {
                memory: vmm::memory::create(super::MEMORY).unwrap(),
            }
        }
    }

    impl ReplicableVm for FakeVm {
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
            DirtyPages::from_bitmaps(&[], &self.memory, true).map_err(|e| e.to_string())
        }
        fn memory(&self) -> &GuestMemoryMmap {
            &self.memory
        }
        fn save_state(&mut self) -> Result<VmSnapshotState, String> {
            Ok(crate::common::blank_state())
        }
        fn ft_gates(&mut self) -> Result<FtGates, String> {
            Ok(FtGates::default())
        }
    }
}

/// An epoch is acknowledged before it is applied: one that then fails to apply (here its state
/// does not decode) must end the backup as a failure, never leave it to take over with a copy
/// half of one epoch and half of the next when the primary goes.
#[test]
fn an_epoch_that_fails_to_apply_after_its_ack_ends_the_backup() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let backup =
        Backup::start_connected(FtStream::Unix(theirs), &backup_request(), wake.clone()).unwrap();
    let mut sender = open_session(&ours, 0);
    let end = |epoch| Control::EpochEnd {
        epoch,
        released_through: 0,
        group_epoch: None,
        clock: None,
    };
    // The initial synchronisation: epoch 0, applied as it arrives.
    sender.send_state(&common::blank_state()).unwrap();
    sender
        .send_frame(FrameType::Control, &end(0).encode())
        .unwrap();
    // Epoch 1: its state is no state.
    sender.send_frame(FrameType::State, &[0xff; 64]).unwrap();
    sender
        .send_frame(FrameType::Control, &end(1).encode())
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let _ = ours.shutdown(std::net::Shutdown::Both);
    match outcome(backup, &wake) {
        Some(BackupEvent::Failed(reason)) => {
            assert!(reason.contains("epoch 1 state"), "{reason}")
        }
        Some(BackupEvent::TakeOver { .. }) => panic!("the backup took over a half-applied copy"),
        Some(_) => panic!("the backup must fail"),
        None => panic!("the backup never decided"),
    }
}
