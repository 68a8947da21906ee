//! Epoch-holding output gates: output commit, the core promise of fault tolerance. No frame or
//! shared-disk write produced in epoch E may leave before `commit(E)`, and what leaves is always
//! the committed prefix of what was produced, in production order.

use std::io;
use std::sync::{Arc, Mutex};

use devices::gate::*;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Recording inner gates.

/// A network gate that records what it was given; can be told to refuse frames.
#[derive(Clone, Default)]
struct RecNet {
    state: Arc<Mutex<RecNetState>>,
}

#[derive(Default)]
struct RecNetState {
    frames: Vec<Vec<u8>>,
    refuse: bool,
}

impl RecNet {
    fn frames(&self) -> Vec<Vec<u8>> {
        self.state.lock().unwrap().frames.clone()
    }
    fn refuse(&self, refuse: bool) {
        self.state.lock().unwrap().refuse = refuse;
    }
}

impl NetOutputGate for RecNet {
    fn transmit(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if s.refuse {
            return Err(io::Error::other("refused"));
        }
        s.frames.push(frame.to_vec());
        Ok(())
    }
}

fn net_gate(first: u64) -> (EpochNetGate, EpochControl, RecNet) {
    let rec = RecNet::default();
    let (gate, ctl) = EpochNetGate::new(Box::new(rec.clone()), first);
    (gate, ctl, rec)
}

fn frame(tag: u32) -> Vec<u8> {
    tag.to_le_bytes().to_vec()
}

fn frames(tags: &[u32]) -> Vec<Vec<u8>> {
    tags.iter().map(|t| frame(*t)).collect()
}

/// What reached an in-memory disk, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DiskEvent {
    Write(u64, Vec<u8>),
    Flush,
}

#[derive(Clone, Default)]
struct RecDisk {
    state: Arc<Mutex<RecDiskState>>,
}

#[derive(Default)]
struct RecDiskState {
    image: Vec<u8>,
    log: Vec<DiskEvent>,
    fail_writes: bool,
}

impl RecDisk {
    fn with_size(size: usize) -> Self {
        let d = Self::default();
        d.state.lock().unwrap().image = vec![0; size];
        d
    }
    fn image(&self) -> Vec<u8> {
        self.state.lock().unwrap().image.clone()
    }
    fn log(&self) -> Vec<DiskEvent> {
        self.state.lock().unwrap().log.clone()
    }
    fn fail_writes(&self, fail: bool) {
        self.state.lock().unwrap().fail_writes = fail;
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.state.lock().unwrap();
        let at = offset as usize;
        buf.copy_from_slice(&s.image[at..at + buf.len()]);
        Ok(())
    }
}

impl DiskOutputGate for RecDisk {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if s.fail_writes {
            return Err(io::Error::other("write refused"));
        }
        let at = offset as usize;
        if s.image.len() < at + data.len() {
            s.image.resize(at + data.len(), 0);
        }
        s.image[at..at + data.len()].copy_from_slice(data);
        s.log.push(DiskEvent::Write(offset, data.to_vec()));
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.state.lock().unwrap().log.push(DiskEvent::Flush);
        Ok(())
    }
}

fn disk_gate(size: usize, first: u64) -> (EpochDiskGate, EpochControl, RecDisk) {
    let rec = RecDisk::with_size(size);
    let (gate, ctl) = EpochDiskGate::new(Box::new(rec.clone()), first);
    (gate, ctl, rec)
}

/// The guest's view: the image read through the gate.
fn guest_read(gate: &EpochDiskGate, rec: &RecDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    gate.read_through(offset, &mut buf, &mut |b| rec.read(offset, b))
        .unwrap();
    buf
}

// ---------------------------------------------------------------------------------------------
// Network gate.

#[test]
fn net_frames_leave_only_after_their_epoch_is_committed() {
    let (mut gate, ctl, rec) = net_gate(1);
    assert_eq!(ctl.current_epoch(), 1);
    gate.transmit(&frame(1)).unwrap();
    gate.transmit(&frame(2)).unwrap();
    assert!(rec.frames().is_empty(), "held while epoch 1 runs");
    ctl.begin_epoch(2).unwrap();
    gate.transmit(&frame(3)).unwrap();
    assert!(
        rec.frames().is_empty(),
        "held after epoch 1 ended, not yet acknowledged"
    );
    let stats = ctl.commit(1).unwrap();
    assert_eq!(rec.frames(), frames(&[1, 2]), "epoch 2's frame stays held");
    assert_eq!(stats.items, 2);
    assert_eq!(stats.bytes, 8);
    assert_eq!(ctl.last_committed(), Some(1));
    ctl.begin_epoch(3).unwrap();
    ctl.commit(2).unwrap();
    assert_eq!(rec.frames(), frames(&[1, 2, 3]));
    let s = ctl.stats();
    assert_eq!((s.held_items, s.held_bytes), (0, 0));
    assert_eq!(s.released.items, 3);
}

#[test]
fn net_frames_to_group_members_leave_at_once_and_others_wait_for_commit() {
    let (gate, ctl, rec) = net_gate(1);
    let peers = GroupPeers::default();
    let mut gate = gate.with_group_peers(peers.clone());
    let member = [0x52, 0x54, 0, 0, 0, 0x22];
    let outside = [0x52, 0x54, 0, 0, 0, 0x99];
    let to = |mac: [u8; 6], tag: u8| {
        let mut f = mac.to_vec();
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 0x21, 0x08, 0x00, tag]);
        f
    };
    // Outside a group (empty list) every frame is held.
    gate.transmit(&to(member, 1)).unwrap();
    assert!(rec.frames().is_empty());
    peers.set(vec![member]);
    gate.transmit(&to(member, 2)).unwrap();
    gate.transmit(&to(outside, 3)).unwrap();
    gate.transmit(&[0xff; 4]).unwrap(); // too short to carry a destination: held
    assert_eq!(rec.frames(), vec![to(member, 2)]);
    ctl.begin_epoch(2).unwrap();
    ctl.commit(1).unwrap();
    assert_eq!(
        rec.frames(),
        vec![to(member, 2), to(member, 1), to(outside, 3), vec![0xff; 4]]
    );
    assert_eq!(ctl.stats().passed_items, 1);
}

#[test]
fn net_commit_releases_the_epoch_and_all_earlier_ones_in_order() {
    let (mut gate, ctl, rec) = net_gate(10);
    let mut tag = 0;
    for epoch in 10..14 {
        if epoch > 10 {
            ctl.begin_epoch(epoch).unwrap();
        }
        for _ in 0..3 {
            gate.transmit(&frame(tag)).unwrap();
            tag += 1;
        }
    }
    ctl.begin_epoch(14).unwrap();
    let stats = ctl.commit(12).unwrap();
    assert_eq!(stats.items, 9);
    assert_eq!(rec.frames(), frames(&(0..9).collect::<Vec<_>>()));
    assert_eq!(ctl.stats().held_items, 3);
    ctl.commit(13).unwrap();
    assert_eq!(rec.frames(), frames(&(0..12).collect::<Vec<_>>()));
}

#[test]
fn net_commit_of_an_older_epoch_after_a_newer_one_is_a_no_op() {
    let (mut gate, ctl, rec) = net_gate(1);
    gate.transmit(&frame(1)).unwrap();
    ctl.begin_epoch(2).unwrap();
    gate.transmit(&frame(2)).unwrap();
    ctl.begin_epoch(3).unwrap();
    gate.transmit(&frame(3)).unwrap();
    ctl.begin_epoch(4).unwrap();
    ctl.commit(2).unwrap();
    assert_eq!(rec.frames(), frames(&[1, 2]));
    assert_eq!(ctl.commit(1).unwrap(), ReleaseStats::default());
    assert_eq!(ctl.commit(2).unwrap(), ReleaseStats::default());
    assert_eq!(rec.frames(), frames(&[1, 2]));
    assert_eq!(ctl.last_committed(), Some(2));
    ctl.commit(3).unwrap();
    assert_eq!(rec.frames(), frames(&[1, 2, 3]));
}

#[test]
fn net_running_epoch_cannot_be_committed_and_epochs_must_grow() {
    let (mut gate, ctl, rec) = net_gate(5);
    gate.transmit(&frame(1)).unwrap();
    assert!(matches!(
        ctl.commit(5),
        Err(EpochError::NotEnded {
            epoch: 5,
            current: 5
        })
    ));
    assert!(matches!(ctl.commit(9), Err(EpochError::NotEnded { .. })));
    assert!(matches!(
        ctl.begin_epoch(5),
        Err(EpochError::NotIncreasing {
            current: 5,
            next: 5
        })
    ));
    assert!(matches!(
        ctl.begin_epoch(4),
        Err(EpochError::NotIncreasing { .. })
    ));
    assert!(rec.frames().is_empty(), "refused calls released nothing");
    // Epoch numbers may skip (an epoch without output needs no queue).
    ctl.begin_epoch(8).unwrap();
    ctl.commit(7).unwrap();
    assert_eq!(rec.frames(), frames(&[1]));
}

#[test]
fn net_passthrough_releases_held_frames_first_then_passes_new_ones() {
    let (mut gate, ctl, rec) = net_gate(1);
    gate.transmit(&frame(1)).unwrap();
    ctl.begin_epoch(2).unwrap();
    gate.transmit(&frame(2)).unwrap();
    assert_eq!(ctl.mode(), GateMode::Hold);
    // The backup died: everything held leaves (even the running epoch's), in order.
    let stats = ctl.passthrough().unwrap();
    assert_eq!(stats.items, 2);
    assert_eq!(ctl.mode(), GateMode::PassThrough);
    assert_eq!(rec.frames(), frames(&[1, 2]));
    gate.transmit(&frame(3)).unwrap();
    assert_eq!(rec.frames(), frames(&[1, 2, 3]), "passed straight through");
    assert_eq!(ctl.stats().passed_items, 1);
    // A new backup: holding resumes in the current epoch.
    ctl.begin_epoch(3).unwrap();
    ctl.set_mode(GateMode::Hold).unwrap();
    gate.transmit(&frame(4)).unwrap();
    assert_eq!(rec.frames(), frames(&[1, 2, 3]));
    ctl.begin_epoch(4).unwrap();
    ctl.commit(3).unwrap();
    assert_eq!(rec.frames(), frames(&[1, 2, 3, 4]));
}

#[test]
fn net_over_the_byte_limit_the_newest_frame_is_dropped_and_counted() {
    let rec = RecNet::default();
    let limits = HoldLimits {
        max_bytes: 10,
        max_items: 100,
    };
    let (mut gate, ctl) = EpochNetGate::with_limits(Box::new(rec.clone()), 1, limits);
    gate.transmit(&[1; 4]).unwrap();
    gate.transmit(&[2; 4]).unwrap();
    // 8 held + 4 > 10: dropped, but reported as sent (a lost packet, not a device error).
    gate.transmit(&[3; 4]).unwrap();
    gate.transmit(&[4; 2]).unwrap(); // exactly 10: fits
    let s = ctl.stats();
    assert_eq!((s.over_limit_items, s.over_limit_bytes), (1, 4));
    assert_eq!((s.held_items, s.held_bytes), (3, 10));
    ctl.begin_epoch(2).unwrap();
    ctl.commit(1).unwrap();
    assert_eq!(rec.frames(), vec![vec![1; 4], vec![2; 4], vec![4; 2]]);
    // Room again after the release.
    gate.transmit(&[5; 10]).unwrap();
    assert_eq!(ctl.stats().held_bytes, 10);
}

#[test]
fn net_over_the_item_limit_frames_are_dropped_even_if_empty() {
    let rec = RecNet::default();
    let limits = HoldLimits {
        max_bytes: 1 << 20,
        max_items: 2,
    };
    let (mut gate, ctl) = EpochNetGate::with_limits(Box::new(rec.clone()), 1, limits);
    for _ in 0..5 {
        gate.transmit(&[]).unwrap();
    }
    assert_eq!(ctl.stats().held_items, 2);
    assert_eq!(ctl.stats().over_limit_items, 3);
}

#[test]
fn net_discard_drops_held_frames_which_never_leave() {
    let (mut gate, ctl, rec) = net_gate(1);
    gate.transmit(&frame(1)).unwrap();
    ctl.begin_epoch(2).unwrap();
    gate.transmit(&[9; 7]).unwrap();
    ctl.begin_epoch(3).unwrap();
    let dropped = ctl.discard_uncommitted();
    assert_eq!(
        dropped,
        DiscardStats {
            items: 2,
            bytes: 11
        }
    );
    assert_eq!(ctl.commit(2).unwrap(), ReleaseStats::default());
    assert!(rec.frames().is_empty());
    let s = ctl.stats();
    assert_eq!(
        (s.held_items, s.discarded_items, s.discarded_bytes),
        (0, 2, 11)
    );
}

#[test]
fn net_a_refused_frame_is_counted_and_later_frames_still_leave() {
    let (mut gate, ctl, rec) = net_gate(1);
    gate.transmit(&frame(1)).unwrap();
    ctl.begin_epoch(2).unwrap();
    gate.transmit(&frame(2)).unwrap();
    ctl.begin_epoch(3).unwrap();
    rec.refuse(true);
    let stats = ctl.commit(1).unwrap();
    assert_eq!((stats.items, stats.failed), (0, 1));
    rec.refuse(false);
    ctl.commit(2).unwrap();
    assert_eq!(rec.frames(), frames(&[2]));
    assert_eq!(ctl.stats().held_items, 0);
}

#[test]
fn net_control_handles_are_shared_and_usable_from_another_thread() {
    let (mut gate, ctl, rec) = net_gate(1);
    let remote = ctl.clone();
    gate.transmit(&frame(1)).unwrap();
    remote.begin_epoch(2).unwrap();
    assert_eq!(ctl.current_epoch(), 2);
    std::thread::spawn(move || remote.commit(1).unwrap())
        .join()
        .unwrap();
    assert_eq!(rec.frames(), frames(&[1]));
    assert!(format!("{ctl:?}").contains("current_epoch: 2"));
}

// ---------------------------------------------------------------------------------------------
// Disk gate.

#[test]
fn disk_held_writes_reach_the_image_only_at_commit_but_reads_see_them() {
    let (mut gate, ctl, rec) = disk_gate(64, 1);
    gate.write_at(8, &[1; 8]).unwrap();
    assert_eq!(rec.image(), vec![0; 64], "held: the image is untouched");
    assert_eq!(
        guest_read(&gate, &rec, 8, 8),
        vec![1; 8],
        "but the guest reads it"
    );
    let mut partial = vec![0; 8];
    rec.read(4, &mut partial).unwrap();
    gate.overlay_read(4, &mut partial);
    assert_eq!(partial, [0, 0, 0, 0, 1, 1, 1, 1]);
    ctl.begin_epoch(2).unwrap();
    let stats = ctl.commit(1).unwrap();
    assert_eq!((stats.items, stats.bytes), (1, 8));
    assert_eq!(&rec.image()[8..16], &[1; 8]);
    assert_eq!(guest_read(&gate, &rec, 0, 64), rec.image());
}

#[test]
fn disk_overlapping_writes_the_newest_wins_in_reads_and_on_the_image() {
    let (mut gate, ctl, rec) = disk_gate(32, 1);
    gate.write_at(0, &[1; 16]).unwrap();
    gate.write_at(4, &[2; 4]).unwrap();
    ctl.begin_epoch(2).unwrap();
    gate.write_at(6, &[3; 4]).unwrap();
    gate.write_at(14, &[4; 4]).unwrap();
    let mut want = vec![0u8; 32];
    want[0..16].fill(1);
    want[4..8].fill(2);
    want[6..10].fill(3);
    want[14..18].fill(4);
    assert_eq!(guest_read(&gate, &rec, 0, 32), want);
    assert_eq!(guest_read(&gate, &rec, 5, 3), &want[5..8]);
    ctl.begin_epoch(3).unwrap();
    ctl.commit(1).unwrap();
    // Epoch 1 on the image, epoch 2 still only in the overlay; the guest view is unchanged.
    assert_eq!(
        &rec.image()[0..16],
        &[1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    );
    assert_eq!(guest_read(&gate, &rec, 0, 32), want);
    ctl.commit(2).unwrap();
    assert_eq!(rec.image(), want);
    assert_eq!(
        rec.log(),
        vec![
            DiskEvent::Write(0, vec![1; 16]),
            DiskEvent::Write(4, vec![2; 4]),
            DiskEvent::Write(6, vec![3; 4]),
            DiskEvent::Write(14, vec![4; 4]),
        ]
    );
}

#[test]
fn disk_flush_is_a_barrier_released_after_the_writes_before_it() {
    let (mut gate, ctl, rec) = disk_gate(16, 1);
    gate.write_at(0, &[1]).unwrap();
    gate.write_at(1, &[2]).unwrap();
    gate.flush().unwrap();
    gate.write_at(2, &[3]).unwrap();
    ctl.begin_epoch(2).unwrap();
    gate.flush().unwrap();
    assert!(rec.log().is_empty(), "flushes are held too");
    let stats = ctl.commit(1).unwrap();
    assert_eq!((stats.items, stats.barriers), (3, 1));
    assert_eq!(
        rec.log(),
        vec![
            DiskEvent::Write(0, vec![1]),
            DiskEvent::Write(1, vec![2]),
            DiskEvent::Flush,
            DiskEvent::Write(2, vec![3]),
        ]
    );
    ctl.begin_epoch(3).unwrap();
    ctl.commit(2).unwrap();
    assert_eq!(rec.log().last(), Some(&DiskEvent::Flush));
}

#[test]
fn disk_commit_of_an_older_epoch_is_a_no_op() {
    let (mut gate, ctl, rec) = disk_gate(8, 1);
    gate.write_at(0, &[1]).unwrap();
    ctl.begin_epoch(2).unwrap();
    gate.write_at(0, &[2]).unwrap();
    ctl.begin_epoch(3).unwrap();
    ctl.commit(1).unwrap();
    assert_eq!(rec.image()[0], 1);
    assert_eq!(ctl.commit(1).unwrap(), ReleaseStats::default());
    assert_eq!(ctl.commit(0).unwrap(), ReleaseStats::default());
    assert_eq!(rec.log().len(), 1);
    assert_eq!(guest_read(&gate, &rec, 0, 1), [2]);
}

#[test]
fn disk_a_failed_release_keeps_the_write_and_later_ones_held_for_retry() {
    let (mut gate, ctl, rec) = disk_gate(8, 1);
    gate.write_at(0, &[1]).unwrap();
    gate.write_at(1, &[2]).unwrap();
    ctl.begin_epoch(2).unwrap();
    gate.write_at(2, &[3]).unwrap();
    ctl.begin_epoch(3).unwrap();
    rec.fail_writes(true);
    assert!(matches!(
        ctl.commit(2),
        Err(EpochError::Release { epoch: 1, .. })
    ));
    assert_eq!(
        ctl.last_committed(),
        None,
        "a failed commit is not recorded"
    );
    assert_eq!(ctl.stats().held_items, 3);
    assert_eq!(
        guest_read(&gate, &rec, 0, 3),
        [1, 2, 3],
        "still visible to the guest"
    );
    rec.fail_writes(false);
    let stats = ctl.commit(2).unwrap();
    assert_eq!(stats.items, 3);
    assert_eq!(&rec.image()[0..3], &[1, 2, 3]);
}

#[test]
fn disk_a_gate_whose_held_writes_fail_when_protection_ends_passes_through_behind_them() {
    let (mut gate, ctl, rec) = disk_gate(8, 1);
    gate.write_at(0, &[1]).unwrap();
    ctl.begin_epoch(2).unwrap();
    gate.write_at(1, &[2]).unwrap();
    rec.fail_writes(true);
    // Protection ends while the image refuses writes: the gate does not stay holding...
    assert!(ctl.passthrough().is_err());
    assert_eq!(ctl.mode(), GateMode::PassThrough);
    assert_eq!(ctl.stats().held_items, 2);
    // ...but a new write may not overtake the held ones: it is refused while they fail.
    assert!(gate.write_at(2, &[3]).is_err());
    assert_eq!(guest_read(&gate, &rec, 0, 3), [1, 2, 0]);
    rec.fail_writes(false);
    // The next write drains the backlog first, in order, then goes straight through.
    gate.write_at(2, &[3]).unwrap();
    assert_eq!(ctl.stats().held_items, 0);
    assert_eq!(&rec.image()[0..3], &[1, 2, 3]);
    let order: Vec<_> = rec
        .log()
        .into_iter()
        .filter_map(|e| match e {
            DiskEvent::Write(offset, _) => Some(offset),
            _ => None,
        })
        .collect();
    assert_eq!(order, [0, 1, 2]);
}

#[test]
fn disk_a_partly_released_epoch_resumes_where_it_stopped() {
    let rec = RecDisk::with_size(8);
    // An inner gate that fails its second write once.
    struct FailSecond {
        rec: RecDisk,
        calls: u32,
    }
    impl DiskOutputGate for FailSecond {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.calls += 1;
            if self.calls == 2 {
                return Err(io::Error::other("transient"));
            }
            self.rec.write_at(offset, data)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.rec.flush()
        }
    }
    let inner = FailSecond {
        rec: rec.clone(),
        calls: 0,
    };
    let (mut gate, ctl) = EpochDiskGate::new(Box::new(inner), 1);
    for i in 0..3u8 {
        gate.write_at(u64::from(i), &[i + 1]).unwrap();
    }
    ctl.begin_epoch(2).unwrap();
    assert!(ctl.commit(1).is_err());
    assert_eq!(rec.log(), vec![DiskEvent::Write(0, vec![1])]);
    assert_eq!(ctl.stats().held_items, 2);
    assert_eq!(guest_read(&gate, &rec, 0, 3), [1, 2, 3]);
    ctl.commit(1).unwrap();
    assert_eq!(
        rec.log(),
        vec![
            DiskEvent::Write(0, vec![1]),
            DiskEvent::Write(1, vec![2]),
            DiskEvent::Write(2, vec![3]),
        ],
        "each write applied exactly once, in order"
    );
}

#[test]
fn disk_over_the_limit_a_write_is_refused_not_dropped() {
    let rec = RecDisk::with_size(64);
    let limits = HoldLimits {
        max_bytes: 16,
        max_items: 3,
    };
    let (mut gate, ctl) = EpochDiskGate::with_limits(Box::new(rec.clone()), 1, limits);
    gate.write_at(0, &[1; 12]).unwrap();
    let err = gate.write_at(12, &[2; 8]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::OutOfMemory);
    gate.flush().unwrap();
    gate.write_at(12, &[3; 4]).unwrap();
    assert!(gate.flush().is_err(), "the item limit covers barriers");
    let s = ctl.stats();
    assert_eq!((s.over_limit_items, s.over_limit_bytes), (2, 8));
    assert_eq!(&guest_read(&gate, &rec, 12, 4), &[3; 4]);
}

#[test]
fn disk_passthrough_releases_held_then_writes_and_flushes_directly() {
    let (mut gate, ctl, rec) = disk_gate(8, 1);
    gate.write_at(0, &[1]).unwrap();
    gate.flush().unwrap();
    let stats = ctl.passthrough().unwrap();
    assert_eq!((stats.items, stats.barriers), (1, 1));
    gate.write_at(0, &[2]).unwrap();
    gate.flush().unwrap();
    assert_eq!(
        rec.log(),
        vec![
            DiskEvent::Write(0, vec![1]),
            DiskEvent::Flush,
            DiskEvent::Write(0, vec![2]),
            DiskEvent::Flush,
        ]
    );
    assert_eq!(ctl.stats().passed_items, 2);
}

#[test]
fn disk_discard_drops_held_writes_from_image_and_reads() {
    let (mut gate, ctl, rec) = disk_gate(8, 1);
    gate.write_at(0, &[7; 4]).unwrap();
    gate.flush().unwrap();
    assert_eq!(
        ctl.discard_uncommitted(),
        DiscardStats { items: 2, bytes: 4 }
    );
    assert_eq!(guest_read(&gate, &rec, 0, 4), [0; 4]);
    ctl.begin_epoch(2).unwrap();
    ctl.commit(1).unwrap();
    assert!(rec.log().is_empty());
}

#[test]
fn disk_reads_never_miss_data_while_commits_run_concurrently() {
    // The device thread writes value v to byte 0 in epoch v and reads it back at once; the epoch
    // loop commits on another thread. Between image read and overlay there must be no window in
    // which the data has left the overlay but was not yet in the image buffer.
    let (mut gate, ctl, rec) = disk_gate(1, 0);
    let committer = ctl.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let epochs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ended = epochs.clone();
    let loop_thread = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let done = ended.load(std::sync::atomic::Ordering::Acquire);
            if done > 0 {
                committer.commit(done - 1).unwrap();
            }
            std::thread::yield_now();
        }
    });
    for v in 1..=200u8 {
        gate.write_at(0, &[v]).unwrap();
        assert_eq!(guest_read(&gate, &rec, 0, 1), [v]);
        ctl.begin_epoch(u64::from(v)).unwrap();
        epochs.store(u64::from(v), std::sync::atomic::Ordering::Release);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    loop_thread.join().unwrap();
}

#[test]
fn file_gate_reads_through_the_image_only() {
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gate-epochs-file.img");
    std::fs::write(&path, [5u8; 16]).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let reader = file.try_clone().unwrap();
    let gate = FileDiskGate::new(file, false);
    let mut buf = [0u8; 4];
    gate.read_through(2, &mut buf, &mut |b| {
        use std::os::unix::fs::FileExt;
        reader.read_exact_at(b, 2)
    })
    .unwrap();
    assert_eq!(buf, [5; 4]);
    let _ = std::fs::remove_file(&path);
}

// ---------------------------------------------------------------------------------------------
// Random interleavings against a model.

#[derive(Clone, Debug)]
enum NetOp {
    Transmit(usize),
    Begin,
    /// Commit the epoch this many before the current one (clamped to what exists).
    Commit(u64),
    PassThrough,
    Hold,
}

fn net_op() -> impl Strategy<Value = NetOp> {
    prop_oneof![
        6 => (0usize..24).prop_map(NetOp::Transmit),
        3 => Just(NetOp::Begin),
        3 => (1u64..5).prop_map(NetOp::Commit),
        1 => Just(NetOp::PassThrough),
        1 => Just(NetOp::Hold),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The inner gate's output is always exactly the released prefix of the production sequence:
    /// in hold mode, frames of epochs up to the newest commit (minus frames refused over the
    /// limit); pass-through releases everything.
    #[test]
    fn net_output_is_the_committed_prefix(
        ops in proptest::collection::vec(net_op(), 1..120),
        max_bytes in 16usize..200,
        max_items in 1usize..12,
    ) {
        let rec = RecNet::default();
        let limits = HoldLimits { max_bytes, max_items };
        let (mut gate, ctl) = EpochNetGate::with_limits(Box::new(rec.clone()), 1, limits);

        // Model.
        let mut produced: Vec<(u64, Vec<u8>)> = Vec::new(); // accepted frames, with epoch
        let mut released = 0usize; // prefix of `produced` that has left
        let mut current = 1u64;
        let mut committed: Option<u64> = None;
        let mut passthrough = false;
        let mut ever_passthrough = false;
        let mut dropped = 0u64;
        let mut seq = 0u32;

        for op in ops {
            match op {
                NetOp::Transmit(len) => {
                    let mut f = seq.to_le_bytes().to_vec();
                    f.resize(4 + len, seq as u8);
                    seq += 1;
                    gate.transmit(&f).unwrap();
                    if passthrough {
                        produced.push((current, f));
                        released = produced.len();
                    } else {
                        let held = &produced[released..];
                        let held_bytes: usize = held.iter().map(|(_, f)| f.len()).sum();
                        if held_bytes + f.len() > max_bytes || held.len() >= max_items {
                            dropped += 1;
                        } else {
                            produced.push((current, f));
                        }
                    }
                }
                NetOp::Begin => {
                    current += 1;
                    ctl.begin_epoch(current).unwrap();
                }
                NetOp::Commit(back) => {
                    let epoch = current.saturating_sub(back);
                    if epoch == 0 {
                        continue;
                    }
                    ctl.commit(epoch).unwrap();
                    if committed.is_none_or(|c| c < epoch) {
                        committed = Some(epoch);
                        let upto = produced.iter().take_while(|(e, _)| *e <= epoch).count();
                        released = released.max(upto);
                    }
                }
                NetOp::PassThrough => {
                    ctl.passthrough().unwrap();
                    passthrough = true;
                    ever_passthrough = true;
                    released = produced.len();
                }
                NetOp::Hold => {
                    ctl.set_mode(GateMode::Hold).unwrap();
                    passthrough = false;
                }
            }
            let want: Vec<Vec<u8>> = produced[..released].iter().map(|(_, f)| f.clone()).collect();
            prop_assert_eq!(rec.frames(), want);
            let s = ctl.stats();
            prop_assert_eq!(s.held_items as usize, produced.len() - released);
            prop_assert_eq!(s.over_limit_items, dropped);
            // Output commit, stated directly: until pass-through was ever used, every frame that
            // left belongs to a committed epoch.
            if !ever_passthrough {
                for (e, _) in &produced[..released] {
                    prop_assert!(committed.is_some_and(|c| *e <= c));
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
enum DiskOpGen {
    Write(u64, usize),
    Flush,
    Begin,
    Commit(u64),
    Read(u64, usize),
    PassThrough,
}

const DISK: usize = 128;

fn disk_op() -> impl Strategy<Value = DiskOpGen> {
    prop_oneof![
        6 => (0u64..DISK as u64 - 1, 1usize..24)
            .prop_map(|(o, l)| DiskOpGen::Write(o, l.min(DISK - o as usize))),
        1 => Just(DiskOpGen::Flush),
        3 => Just(DiskOpGen::Begin),
        3 => (1u64..5).prop_map(DiskOpGen::Commit),
        3 => (0u64..DISK as u64 - 1, 1usize..40)
            .prop_map(|(o, l)| DiskOpGen::Read(o, l.min(DISK - o as usize))),
        1 => Just(DiskOpGen::PassThrough),
    ]
}

fn apply(image: &mut [u8], event: &DiskEvent) {
    if let DiskEvent::Write(at, data) = event {
        image[*at as usize..*at as usize + data.len()].copy_from_slice(data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// After any interleaving: the inner disk saw exactly the committed prefix of the produced
    /// writes and flushes, in order; its bytes equal that prefix applied to the initial image;
    /// the guest's reads equal all produced writes applied.
    #[test]
    fn disk_image_is_the_committed_prefix_and_reads_see_everything(
        ops in proptest::collection::vec(disk_op(), 1..120),
    ) {
        let (mut gate, ctl, rec) = disk_gate(DISK, 1);
        let mut produced: Vec<(u64, DiskEvent)> = Vec::new();
        let mut released = 0usize;
        let mut current = 1u64;
        let mut committed: Option<u64> = None;
        let mut seq = 0u8;

        for op in ops {
            match op {
                DiskOpGen::Write(at, len) => {
                    seq = seq.wrapping_add(1);
                    let data = vec![seq; len];
                    gate.write_at(at, &data).unwrap();
                    produced.push((current, DiskEvent::Write(at, data)));
                }
                DiskOpGen::Flush => {
                    gate.flush().unwrap();
                    produced.push((current, DiskEvent::Flush));
                }
                DiskOpGen::Begin => {
                    current += 1;
                    ctl.begin_epoch(current).unwrap();
                }
                DiskOpGen::Commit(back) => {
                    let epoch = current.saturating_sub(back);
                    if epoch == 0 {
                        continue;
                    }
                    ctl.commit(epoch).unwrap();
                    if committed.is_none_or(|c| c < epoch) {
                        committed = Some(epoch);
                        let upto = produced.iter().take_while(|(e, _)| *e <= epoch).count();
                        released = released.max(upto);
                    }
                }
                DiskOpGen::Read(at, len) => {
                    let mut view = vec![0u8; DISK];
                    for (_, e) in &produced {
                        apply(&mut view, e);
                    }
                    prop_assert_eq!(
                        guest_read(&gate, &rec, at, len),
                        &view[at as usize..at as usize + len]
                    );
                }
                DiskOpGen::PassThrough => {
                    // Pass-through for the rest of the run: the model then releases all.
                    ctl.passthrough().unwrap();
                    released = produced.len();
                    // Keep the model simple: later writes leave at once, as if committed.
                    committed = Some(u64::MAX);
                }
            }
            if committed == Some(u64::MAX) {
                released = produced.len();
            }
            let want_log: Vec<DiskEvent> =
                produced[..released].iter().map(|(_, e)| e.clone()).collect();
            prop_assert_eq!(rec.log(), want_log.clone());
            let mut want_image = vec![0u8; DISK];
            for e in &want_log {
                apply(&mut want_image, e);
            }
            prop_assert_eq!(rec.image(), want_image);
        }
    }
}
