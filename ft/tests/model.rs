//! The FT primary and backup state machines driven without KVM: a fake VM (guest memory,
//! a "register", a NIC and a disk behind the real output gates), the real `Primary` and
//! `Backup`, an in-process link (Unix socket pairs) through a proxy that observes and mangles
//! frames, and the real witness. Long random runs inject one or two faults each (a side killed
//! at any frame, a partition, frames dropped, duplicated, reordered, truncated or corrupted,
//! forged acknowledgements, disk writes that fail); after every run the invariants of the FT
//! protocol are checked:
//! - output commit: no frame or shared-disk write of epoch E leaves before the backup holds E
//!   (checked at the moment it leaves), unless the witness gave the VM to the primary alone;
//! - the backup resumes exactly the last epoch delivered to it completely, with that epoch's
//!   memory and state;
//! - nothing acknowledged is lost: at takeover the disk holds exactly the writes of the epochs
//!   up to the resumed one;
//! - TCP at full speed: the guest's pure ACKs (which acknowledge the input frames delivered
//!   before them) leave before their epoch is held only once the backup holds that input; at
//!   takeover the backup delivers again every input frame of a later epoch that an ACK which
//!   left covered, and none of an epoch it resumed;
//! - no held output is lost at failover: every frame of an epoch up to the resumed one left
//!   the primary or is sent again by the backup, which sends nothing of a later epoch;
//! - never two live primaries.
//!
//! `FT_MODEL_RUNS` sets the number of runs per disk mode, `FT_MODEL_SEED` replays one run.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::gate::{
    is_pure_tcp_ack, DiskOutputGate, EpochDiskGate, EpochNetGate, GateMode, InputLog,
    InputRecorder, NetInputRecorder, NetOutputGate, RecordingDiskGate,
};
use ft::backup::Backup;
use ft::link::FtStream;
use ft::primary::Primary;
use ft::wire::Control;
use ft::witness::{Role, WitnessHandle};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::config::VmConfig;
use vmm::control::{EnableFtRequest, FtDiskMode, FtHealth, ReceiveFtRequest};
use vmm::device_manager::FtGates;
use vmm::fault_tolerance::{BackupEvent, BackupFt, ReplicableVm, StopReason};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::memory::DirtyPages;
use vmm::migration::protocol::{encode_frame, FrameReader, FrameType};
use vmm::vm::VmSnapshotState;
use vmm_sys_util::eventfd::EventFd;

mod common;

const MEMORY: u64 = 4 << 20;
const PAGE: u64 = 4096;
const BLOCK: u64 = 4096;
const DISK_BLOCKS: u64 = 64;
const EPOCH_MS: u64 = 2;
const HEARTBEAT_MS: u64 = 250;
/// The heartbeat timeout of a run without faults (see [`run_with`]).
const NO_FAULT_HEARTBEAT_MS: u64 = 3000;
/// How long a run goes on after a forged acknowledgement for the primary to act on it.
const FORGERY_GRACE: Duration = Duration::from_secs(1);
/// Checkpoints a run drives at most.
const CHECKPOINTS: u64 = 40;

// ------------------------------------------------------------------------------------------
// Randomness with a printed seed, so that a failing run can be replayed.

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ------------------------------------------------------------------------------------------
// The outside world: what left the primary, checked as it leaves.

#[derive(Default)]
struct World {
    /// A killed primary releases nothing more (its process is gone).
    primary_dead: AtomicBool,
    /// A killed backup reaches nobody any more.
    backup_dead: AtomicBool,
    /// Protection was ended on purpose (the backup stood down): held output may leave.
    ended: AtomicBool,
    /// The newest epoch the real backup acknowledged (seen on the link before the primary).
    backup_holds: AtomicU64,
    /// The newest input frame the real backup said it holds (seen on the link likewise).
    backup_holds_input: AtomicU64,
    /// The newest input frame covered by a guest ACK that left.
    input_acked_out: AtomicU64,
    /// The registers (ids) of the guest's data frames that left the primary.
    frames_left: Mutex<std::collections::HashSet<u64>>,
    pair_id: AtomicU64,
    witness: Mutex<Option<Arc<WitnessHandle>>>,
    violations: Mutex<Vec<String>>,
    frames_out: AtomicU64,
    /// The epoch the primary runs, stored by the run loop after every call that may end one
    /// (so it is at most one behind: a forged Ack `ahead` >= 1 past it is past every ended
    /// epoch).
    primary_epoch: AtomicU64,
    /// The next this many writes to the disk image fail with EIO.
    disk_failures: AtomicU32,
    /// Microseconds the link takes to carry each MemoryPages frame (a slow link: epochs
    /// take long to send, and input arrives between their frames).
    page_frame_us: AtomicU64,
    /// One guest step in this many dirties a burst of pages (0: one in 40).
    burst_every: AtomicU64,
}

impl World {
    fn primary_alone(&self) -> bool {
        let witness = self.witness.lock().unwrap();
        let Some(witness) = witness.as_ref() else {
            return false;
        };
        witness
            .decision(self.pair_id.load(Ordering::SeqCst))
            .is_some_and(|d| d.winner == Role::Primary)
    }

    /// Output tagged with epoch `tag` leaves now: the backup must hold that epoch.
    fn leaves(&self, what: &str, tag: u64) {
        let holds = self.backup_holds.load(Ordering::SeqCst);
        let ended = self.ended.load(Ordering::SeqCst);
        if tag != 0 && tag > holds && !ended && !self.primary_alone() {
            self.violations.lock().unwrap().push(format!(
                "output commit: {what} of epoch {tag} left while the backup holds epoch {holds}"
            ));
        }
    }
}

struct WorldNet(Arc<World>);

impl World {
    /// A guest ACK of epoch `tag` covering input frames up to `covers` leaves now: the backup
    /// must hold that epoch or that input.
    fn ack_leaves(&self, tag: u64, covers: u64) {
        let holds = self.backup_holds.load(Ordering::SeqCst);
        let holds_input = self.backup_holds_input.load(Ordering::SeqCst);
        let ended = self.ended.load(Ordering::SeqCst);
        if tag != 0 && tag > holds && covers > holds_input && !ended && !self.primary_alone() {
            self.violations.lock().unwrap().push(format!(
                "early ACK: an ACK of epoch {tag} covering input {covers} left while the backup holds epoch {holds} and input {holds_input}"
            ));
        }
        self.input_acked_out.fetch_max(covers, Ordering::SeqCst);
    }
}

/// The fake peer's input frame `seq`: the seq in the first 8 bytes (where a NIC logs its
/// virtio-net header), then a TCP segment to the guest (the reverse of [`guest_ack`]'s
/// connection) whose one byte is byte `seq - 1` of the stream, so that an ACK number of
/// `covers` acknowledges input frames `1..=covers`.
fn input_frame(seq: u64) -> Vec<u8> {
    let mut f = vec![0u8; 12 + 14 + 41];
    f[..8].copy_from_slice(&seq.to_le_bytes());
    let eth = &mut f[12..];
    eth[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    eth[14] = 0x45;
    eth[16..18].copy_from_slice(&41u16.to_be_bytes());
    eth[22] = 64;
    eth[23] = 6;
    eth[38..42].copy_from_slice(&((seq - 1) as u32).to_be_bytes());
    eth[46] = 5 << 4;
    eth[47] = 0x18;
    f
}

/// The fake guest's pure TCP ACK: IPv4, no options; the epoch in the sequence number, the
/// input frames it covers in the acknowledgement number.
fn guest_ack(epoch: u64, covers: u64) -> Vec<u8> {
    let mut f = vec![0u8; 54];
    f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&40u16.to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[46] = 5 << 4;
    f[47] = 0x10;
    f[38..42].copy_from_slice(&(epoch as u32).to_be_bytes());
    f[42..46].copy_from_slice(&(covers as u32).to_be_bytes());
    f
}

impl NetOutputGate for WorldNet {
    fn transmit(&mut self, frame: &[u8]) -> std::io::Result<()> {
        if self.0.primary_dead.load(Ordering::SeqCst) {
            return Ok(());
        }
        if is_pure_tcp_ack(frame) {
            let epoch = u32::from_be_bytes(frame[38..42].try_into().unwrap());
            let covers = u32::from_be_bytes(frame[42..46].try_into().unwrap());
            self.0.ack_leaves(epoch.into(), covers.into());
            self.0.frames_out.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        let tag = u64::from_le_bytes(frame[..8].try_into().unwrap());
        self.0.leaves("a frame", tag);
        let id = u64::from_le_bytes(frame[8..16].try_into().unwrap());
        self.0.frames_left.lock().unwrap().insert(id);
        self.0.frames_out.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The primary's disk image (shared or its own), behind the output gates.
struct WorldDisk {
    file: File,
    world: Arc<World>,
    /// Only a shared image is output; a replicated image is this host's own.
    shared: bool,
}

impl DiskOutputGate for WorldDisk {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if self.world.primary_dead.load(Ordering::SeqCst) {
            return Ok(());
        }
        let failing = self.world.disk_failures.load(Ordering::SeqCst);
        if failing > 0 {
            self.world
                .disk_failures
                .store(failing - 1, Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        let tag = u64::from_le_bytes(data[..8].try_into().unwrap());
        if self.shared {
            self.world.leaves("a disk write", tag);
        }
        self.file.write_all_at(data, offset)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn read_through(
        &self,
        _offset: u64,
        buf: &mut [u8],
        read_image: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        read_image(buf)
    }
}

// ------------------------------------------------------------------------------------------
// The fake VM.

struct Capture {
    register: u64,
    memory: u64,
}

struct FakeVm {
    memory: GuestMemoryMmap,
    world: Arc<World>,
    disk_path: PathBuf,
    shared_disk: bool,
    gates: Option<FtGates>,
    nic: Option<Box<dyn NetOutputGate>>,
    /// The NIC's receive side: frames it delivers to the guest go to the input log.
    input: Option<(InputRecorder, Arc<InputLog>)>,
    /// Every input frame recorded: (seq, the epoch that received it).
    inputs: Vec<(u64, u64)>,
    /// Every data frame the NIC took from the guest: (epoch, register = the frame's id).
    outputs: Vec<(u64, u64)>,
    disk: Option<Box<dyn DiskOutputGate>>,
    paused: bool,
    register: u64,
    /// One per `save_state`: capture #n (from 1) ends epoch n (the sync epoch is 1).
    captures: Vec<Capture>,
    /// Every disk write the guest saw complete: (epoch, offset, data).
    completed_writes: Vec<(u64, u64, Vec<u8>)>,
    rng: Rng,
    /// Whether this fake offers manual dirty-log re-arming (hot pages), as KVM may or not.
    rearm_capable: bool,
    /// With manual re-arming on: the pages reported and not re-armed yet (KVM keeps them set
    /// in its bitmap, so every harvest reports them again).
    manual_rearm: Option<DirtyPages>,
}

fn memory_hash(mem: &GuestMemoryMmap) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut page = vec![0u8; PAGE as usize];
    let mut addr = 0;
    while addr < MEMORY {
        mem.read_slice(&mut page, GuestAddress(addr)).unwrap();
        for chunk in page.chunks_exact(8) {
            hash = (hash ^ u64::from_le_bytes(chunk.try_into().unwrap()))
                .wrapping_mul(0x100_0000_01b3);
        }
        addr += PAGE;
    }
    hash
}

impl FakeVm {
    fn new(world: Arc<World>, disk_path: PathBuf, shared_disk: bool, seed: u64) -> Self {
        Self {
            memory: vmm::memory::create(MEMORY).unwrap(),
            world,
            disk_path,
            shared_disk,
            gates: None,
            nic: None,
            input: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
            disk: None,
            paused: false,
            register: 0,
            captures: Vec::new(),
            completed_writes: Vec::new(),
            rng: Rng(seed | 1),
            rearm_capable: seed & 2 != 0,
            manual_rearm: None,
        }
    }

    /// The epoch output produced now belongs to (0: not protected yet).
    fn epoch(&self) -> u64 {
        match self.captures.len() as u64 {
            0 => 0,
            n => n + 1,
        }
    }

    /// The guest runs a little: pages, a frame, sometimes a disk write.
    fn step(&mut self) {
        assert!(!self.paused, "the guest ran while paused");
        self.register += 1;
        // Now and then a burst: an epoch of several page frames, between which the sender
        // takes the input that arrived meanwhile.
        let every = match self.world.burst_every.load(Ordering::Relaxed) {
            0 => 40,
            n => n,
        };
        let pages = if self.rng.below(every) == 0 {
            300
        } else {
            1 + self.rng.below(4)
        };
        for _ in 0..pages {
            let page = self.rng.below(MEMORY / PAGE);
            let at = GuestAddress(page * PAGE + 8 * self.rng.below(512));
            // Sometimes a write that changes nothing (a hot page found unchanged).
            let value = if self.rng.below(4) == 0 {
                self.memory.read_obj::<u64>(at).unwrap()
            } else {
                self.register ^ (page << 32)
            };
            self.memory.write_obj(value, at).unwrap();
        }
        let epoch = self.epoch();
        if let Some((recorder, log)) = self.input.as_mut() {
            // A frame arrives; the guest's stack acknowledges now and then.
            if self.rng.below(2) == 0 {
                let seq = log.delivered() + 1;
                let frame = input_frame(seq);
                // Where the NIC puts it: a receive buffer anywhere (often across a page
                // boundary), sometimes in two pieces. The primary may then send the page as
                // this frame laid over the backup's copy.
                let at = self.rng.below(MEMORY - frame.len() as u64);
                let cut = if self.rng.below(3) == 0 {
                    1 + self.rng.below(frame.len() as u64 - 1) as usize
                } else {
                    frame.len()
                };
                let mut placed = vec![(GuestAddress(at), cut)];
                if cut < frame.len() {
                    let rest = frame.len() - cut;
                    placed.push((GuestAddress(self.rng.below(MEMORY - rest as u64)), rest));
                }
                if recorder.record(&frame, &placed) {
                    let mut done = 0;
                    for &(addr, len) in &placed {
                        self.memory
                            .write_slice(&frame[done..done + len], addr)
                            .unwrap();
                        done += len;
                    }
                    if !log.is_stopped() {
                        self.inputs.push((seq, epoch));
                    }
                }
            }
            // Mostly everything delivered so far; sometimes not the newest frames yet (the
            // guest has not read them): the ACK must not wait for those.
            let covers = log.delivered().saturating_sub(self.rng.below(3));
            if self.rng.below(2) == 0 {
                if let Some(nic) = self.nic.as_mut() {
                    let _ = nic.transmit(&guest_ack(epoch, covers));
                }
            }
        }
        if let Some(nic) = self.nic.as_mut() {
            let mut frame = vec![0u8; 60];
            frame[..8].copy_from_slice(&epoch.to_le_bytes());
            frame[8..16].copy_from_slice(&self.register.to_le_bytes());
            if nic.transmit(&frame).is_ok() {
                self.outputs.push((epoch, self.register));
            }
        }
        if self.rng.below(3) == 0 {
            if let Some(disk) = self.disk.as_mut() {
                let offset = self.rng.below(DISK_BLOCKS) * BLOCK;
                let mut data = vec![(self.register % 251) as u8; BLOCK as usize];
                data[..8].copy_from_slice(&epoch.to_le_bytes());
                data[8..16].copy_from_slice(&self.register.to_le_bytes());
                if disk.write_at(offset, &data).is_ok() {
                    self.completed_writes.push((epoch, offset, data));
                }
            }
        }
    }

    /// The disk as it must be once every write of epochs `<= epoch` reached it.
    fn expected_disk(&self, epoch: u64) -> Vec<u8> {
        let mut image = vec![FIRST_BYTE; (DISK_BLOCKS * BLOCK) as usize];
        for (e, offset, data) in &self.completed_writes {
            if *e <= epoch {
                image[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
        }
        image
    }
}

impl ReplicableVm for FakeVm {
    fn pause(&mut self) -> Result<(), String> {
        self.paused = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.paused = false;
        Ok(())
    }
    fn set_dirty_logging(&mut self, _enabled: bool) -> Result<(), String> {
        Ok(())
    }
    fn dirty_since_last(&mut self) -> Result<DirtyPages, String> {
        if !self.paused {
            // The guest runs between the passes of the initial synchronisation too.
            for _ in 0..3 {
                self.step();
            }
        }
        // Every write of the fake goes through vm-memory, so the device bitmap is the log.
        let mut pages =
            DirtyPages::from_bitmaps(&[], &self.memory, true).map_err(|e| e.to_string())?;
        if let Some(reported) = self.manual_rearm.as_mut() {
            reported.union_with(&pages);
            pages = reported.clone();
        }
        Ok(pages)
    }
    fn set_manual_rearm(&mut self, on: bool) -> Result<bool, String> {
        if !on {
            self.manual_rearm = None;
            return Ok(false);
        }
        if !self.rearm_capable {
            return Ok(false);
        }
        if self.manual_rearm.is_none() {
            self.manual_rearm = Some(DirtyPages::empty(&self.memory).map_err(|e| e.to_string())?);
        }
        Ok(true)
    }
    fn rearm_dirty_log(&mut self, keep: &DirtyPages) -> Result<(), String> {
        let Some(reported) = self.manual_rearm.as_ref() else {
            return Ok(());
        };
        let mut rearm = reported.clone();
        rearm.subtract(keep);
        if !self.paused {
            // The guest runs between a harvest and the re-arm (FT's early staging), and
            // re-arming a page drops from the log what was written to it meanwhile, as
            // KVM_CLEAR_DIRTY_LOG does: re-armed pages must be copied after the re-arm.
            self.step();
            for gpa in rearm.iter() {
                let (region, offset) = self
                    .memory
                    .to_region_addr(gpa)
                    .ok_or_else(|| format!("{gpa:?} outside guest memory"))?;
                (**region)
                    .bitmap()
                    .reset_addr_range(offset.0 as usize, PAGE as usize);
            }
        }
        if let Some(reported) = self.manual_rearm.as_mut() {
            reported.subtract(&rearm);
        }
        Ok(())
    }
    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
    fn save_state(&mut self) -> Result<VmSnapshotState, String> {
        if !self.paused {
            return Err("state captured from a running VM".into());
        }
        self.captures.push(Capture {
            register: self.register,
            memory: memory_hash(&self.memory),
        });
        let mut state = common::blank_state();
        // The "register" travels in the state: the backup must resume with the captured one.
        state.kvm.clock.clock = self.register;
        Ok(state)
    }
    fn ft_gates(&mut self) -> Result<FtGates, String> {
        self.gates.clone().ok_or_else(|| "no gates".to_string())
    }
}

impl FakeVm {
    /// The devices' gates exist from the start, in pass-through mode, as in the real VM.
    fn install_gates(&mut self) -> Result<(), String> {
        let (nic, net_control) = EpochNetGate::new(Box::new(WorldNet(self.world.clone())), 0);
        // Stopped until protection starts it, as in the real VM.
        let input_log = InputLog::new(0, 1 << 20);
        input_log.stop();
        let nic = nic.with_input_log(input_log.clone());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.disk_path)
            .map_err(|e| e.to_string())?;
        let image = WorldDisk {
            file,
            world: self.world.clone(),
            shared: self.shared_disk,
        };
        let (held, disk_control) = EpochDiskGate::new(Box::new(image), 0);
        let (recorder, log) = RecordingDiskGate::new(Box::new(held));
        let gates = FtGates {
            nets: vec![net_control],
            disks: vec![disk_control],
            disk_logs: vec![log],
            macs: vec![[2, 0, 0, 0, 0, 1]],
            group_peers: Default::default(),
            input_log: Some(input_log.clone()),
        };
        for gate in gates.all() {
            gate.set_mode(GateMode::PassThrough)
                .map_err(|e| e.to_string())?;
        }
        self.nic = Some(Box::new(nic));
        self.input = Some((InputRecorder::new(input_log.clone(), 0), input_log));
        self.disk = Some(Box::new(recorder));
        self.gates = Some(gates);
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Faults.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Primary to backup.
    Forward,
    /// Backup to primary.
    Back,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The primary's host dies when the link carries frame `at`.
    KillPrimary {
        at: u64,
    },
    /// The backup's host dies when the link carries frame `at`.
    KillBackup {
        at: u64,
    },
    /// The link is cut (both sides live on; the witness decides).
    Partition {
        at: u64,
    },
    Drop {
        dir: Dir,
        at: u64,
    },
    Duplicate {
        dir: Dir,
        at: u64,
    },
    /// Frame `at` goes after the next one.
    Reorder {
        dir: Dir,
        at: u64,
    },
    /// Half of frame `at` arrives, then the link is cut.
    Truncate {
        dir: Dir,
        at: u64,
    },
    /// A byte of frame `at` is flipped (its checksum no longer matches).
    Corrupt {
        dir: Dir,
        at: u64,
    },
    /// An Ack for an epoch the primary has not ended yet (`ahead` past the one running)
    /// reaches the primary at frame `at`. An Ack for an epoch whose end was sent is not one
    /// the protocol can tell from the backup's own: the transport authenticates the backup
    /// (mutual TLS), so the model forges only what the primary itself must refuse.
    ForgeAck {
        at: u64,
        ahead: u64,
    },
    /// From frame `at` on, nothing the primary sends reaches the backup (the backup's answers
    /// still do): the backup times out and takes over while the primary, still hearing it,
    /// counts itself protected. The run then stops the primary's VM as soon as the backup
    /// has decided, before the primary notices.
    Silence {
        at: u64,
    },
    /// The next `count` writes to the disk image fail, from checkpoint `at` on.
    FailDisk {
        at: u64,
        count: u32,
    },
}

impl Fault {
    fn random(rng: &mut Rng) -> Self {
        // A run carries about 1200 frames (sync, epochs, acks and heartbeats).
        let at = rng.below(1200);
        let dir = if rng.below(2) == 0 {
            Dir::Forward
        } else {
            Dir::Back
        };
        match rng.below(11) {
            0 => Fault::KillPrimary { at },
            1 => Fault::KillBackup { at },
            2 => Fault::Partition { at },
            3 => Fault::Drop { dir, at },
            4 => Fault::Duplicate { dir, at },
            5 => Fault::Reorder { dir, at },
            6 => Fault::Truncate { dir, at },
            7 => Fault::Corrupt { dir, at },
            8 => Fault::ForgeAck {
                at,
                ahead: 1 + rng.below(3),
            },
            9 => Fault::Silence { at },
            _ => Fault::FailDisk {
                at: rng.below(CHECKPOINTS),
                count: 1 + rng.below(6) as u32,
            },
        }
    }
}

// ------------------------------------------------------------------------------------------
// The link: a proxy between two socket pairs that sees every frame.

#[derive(Default)]
struct LinkState {
    /// Frames carried so far (both directions): the clock faults are scheduled on.
    frames: AtomicU64,
    /// The newest EpochEnd written completely to the backup.
    delivered: AtomicU64,
    cut: AtomicBool,
    kill: Mutex<Option<Side>>,
    forged: AtomicBool,
    /// Page frames carried on data streams.
    lane_pages: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Primary,
    Backup,
}

/// Every connection between the two sides (the first and the data streams) goes through
/// the proxy; faults are scheduled on the frames of all of them together, and a cut (or a
/// dead host) closes them all.
struct Link {
    state: Arc<LinkState>,
    /// The proxy's ends of every connection.
    proxy_ends: Arc<Vec<UnixStream>>,
    _threads: Vec<JoinHandle<()>>,
}

fn cut_all(state: &LinkState, proxy_ends: &[UnixStream]) {
    state.cut.store(true, Ordering::SeqCst);
    for end in proxy_ends {
        let _ = end.shutdown(std::net::Shutdown::Both);
    }
}

impl Link {
    fn cut(&self) {
        cut_all(&self.state, &self.proxy_ends);
    }
}

fn shrink_send_buffer(socket: &UnixStream) {
    let size: libc::c_int = 4096;
    // SAFETY: a valid socket descriptor, and an option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_SNDBUF: {}", std::io::Error::last_os_error());
}

/// Returns the link and, per connection (the first, then `lanes` data streams), the ends
/// for the primary and the backup.
fn link(
    world: Arc<World>,
    faults: Vec<Fault>,
    lanes: usize,
) -> (Link, Vec<(UnixStream, UnixStream)>) {
    let mut ends = Vec::new();
    let mut proxy = Vec::new();
    for _ in 0..=lanes {
        let (primary_end, to_primary) = UnixStream::pair().unwrap();
        if world.page_frame_us.load(Ordering::Relaxed) > 0 {
            // A slow link slows the sender too: its frames wait in a small socket buffer
            // rather than all of an epoch leaving at once into a large one.
            shrink_send_buffer(&primary_end);
        }
        let (backup_end, to_backup) = UnixStream::pair().unwrap();
        ends.push((primary_end, backup_end));
        proxy.push((to_primary, to_backup));
    }
    let proxy_ends: Arc<Vec<UnixStream>> = Arc::new(
        proxy
            .iter()
            .flat_map(|(p, b)| [p.try_clone().unwrap(), b.try_clone().unwrap()])
            .collect(),
    );
    let state = Arc::new(LinkState::default());
    let mut threads = Vec::new();
    for (index, (to_primary, to_backup)) in proxy.iter().enumerate() {
        for dir in [Dir::Forward, Dir::Back] {
            let (from, to) = match dir {
                Dir::Forward => (
                    to_primary.try_clone().unwrap(),
                    to_backup.try_clone().unwrap(),
                ),
                Dir::Back => (
                    to_backup.try_clone().unwrap(),
                    to_primary.try_clone().unwrap(),
                ),
            };
            let (state, world, faults) = (state.clone(), world.clone(), faults.clone());
            let proxy_ends = proxy_ends.clone();
            threads.push(std::thread::spawn(move || {
                let cut = || cut_all(&state, &proxy_ends);
                carry((dir, index > 0), from, to, &state, &world, &faults, &cut);
            }));
        }
    }
    (
        Link {
            state,
            proxy_ends,
            _threads: threads,
        },
        ends,
    )
}

#[allow(clippy::too_many_arguments)]
fn carry(
    (dir, lane): (Dir, bool),
    mut from: UnixStream,
    mut to: UnixStream,
    state: &LinkState,
    world: &World,
    faults: &[Fault],
    cut: &dyn Fn(),
) {
    let mut reader = FrameReader::new();
    // Frames are re-sequenced, so that dropped, repeated or forged frames are well-formed
    // at the frame layer and must be caught by the protocol above it.
    let mut seq = 0u32;
    let mut held_back: Option<Vec<u8>> = None;
    loop {
        let (kind, flags, payload) = match reader.read_frame(&mut from) {
            Ok(frame) => (frame.kind, frame.flags, frame.payload.to_vec()),
            Err(_) => {
                cut();
                return;
            }
        };
        if state.cut.load(Ordering::SeqCst) {
            return;
        }
        let at = state.frames.fetch_add(1, Ordering::SeqCst);
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut frame = |payload: &[u8], kind: FrameType| {
            let f = encode_frame(kind, flags, seq, payload);
            seq = seq.wrapping_add(1);
            f
        };
        let mut cut_after = false;
        let mut forward = true;
        for fault in faults {
            match *fault {
                Fault::KillPrimary { at: t } if t == at => {
                    *state.kill.lock().unwrap() = Some(Side::Primary);
                    world.primary_dead.store(true, Ordering::SeqCst);
                    cut();
                    return;
                }
                Fault::KillBackup { at: t } if t == at => {
                    *state.kill.lock().unwrap() = Some(Side::Backup);
                    world.backup_dead.store(true, Ordering::SeqCst);
                    cut();
                    return;
                }
                Fault::Partition { at: t } if t == at => {
                    cut();
                    return;
                }
                Fault::Drop { dir: d, at: t } if d == dir && t == at => forward = false,
                Fault::Silence { at: t } if dir == Dir::Forward && at >= t => forward = false,
                Fault::Duplicate { dir: d, at: t } if d == dir && t == at => {
                    out.push(frame(&payload, kind));
                }
                Fault::Truncate { dir: d, at: t } if d == dir && t == at => {
                    let whole = frame(&payload, kind);
                    let _ = to.write_all(&whole[..whole.len() / 2]);
                    cut();
                    return;
                }
                Fault::Corrupt { dir: d, at: t } if d == dir && t == at => {
                    let mut bad = frame(&payload, kind);
                    let i = bad.len() / 2;
                    bad[i] ^= 0x40;
                    out.push(bad);
                    forward = false;
                }
                // The first answer from the backup at or after frame `t`.
                Fault::ForgeAck { at: t, ahead }
                    if dir == Dir::Back
                        && at >= t
                        && !state.forged.swap(true, Ordering::SeqCst) =>
                {
                    let running = world.primary_epoch.load(Ordering::SeqCst);
                    let holds = world.backup_holds.load(Ordering::SeqCst);
                    let forged = Control::Ack {
                        epoch: running.max(holds).saturating_add(ahead),
                    };
                    out.push(frame(&forged.encode(), FrameType::Control));
                }
                Fault::Reorder { dir: d, at: t } if d == dir && t == at => {
                    held_back = Some(frame(&payload, kind));
                    forward = false;
                }
                _ => {}
            }
        }
        let mut epoch_end = None;
        if forward {
            if kind == FrameType::Control {
                if let Ok(control) = Control::decode(&payload) {
                    match (dir, control) {
                        (Dir::Forward, Control::Params { pair_id, .. }) => {
                            world.pair_id.store(pair_id, Ordering::SeqCst)
                        }
                        (Dir::Forward, Control::EpochEnd { epoch, .. }) => epoch_end = Some(epoch),
                        // Observed before the primary sees it: output of `epoch` may leave.
                        (Dir::Back, Control::Ack { epoch }) => {
                            world.backup_holds.fetch_max(epoch, Ordering::SeqCst);
                        }
                        (Dir::Back, Control::InputAck { seq }) => {
                            world.backup_holds_input.fetch_max(seq, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
            }
            if kind == FrameType::MemoryPages {
                if lane {
                    state.lane_pages.fetch_add(1, Ordering::Relaxed);
                }
                let us = world.page_frame_us.load(Ordering::Relaxed);
                if us > 0 {
                    std::thread::sleep(Duration::from_micros(us));
                }
            }
            out.push(frame(&payload, kind));
            if let Some(late) = held_back.take() {
                // The late frame keeps its (now out-of-order) sequence number.
                out.push(late);
                cut_after = false;
            }
        }
        for bytes in out {
            if to.write_all(&bytes).is_err() {
                cut();
                return;
            }
        }
        if let Some(epoch) = epoch_end {
            state.delivered.fetch_max(epoch, Ordering::SeqCst);
        }
        if cut_after {
            cut();
            return;
        }
    }
}

// ------------------------------------------------------------------------------------------
// The witness, reached by each side through a relay that dies with its side.

struct Relay {
    addr: String,
}

/// A side's way to the witness; it goes dead with the side (the proxy marks the kill).
fn relay(target: std::net::SocketAddr, world: Arc<World>, side: Side) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let dead = match side {
                Side::Primary => &world.primary_dead,
                Side::Backup => &world.backup_dead,
            };
            if dead.load(Ordering::SeqCst) {
                continue; // dropped: the claimant sees the connection close
            }
            let Ok(mut server) = TcpStream::connect(target) else {
                continue;
            };
            let mut c2 = client.try_clone().unwrap();
            let mut s2 = server.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server, &mut client);
            });
        }
    });
    Relay { addr }
}

// ------------------------------------------------------------------------------------------
// One run.

#[derive(Debug, Default)]
struct BackupOutcome {
    took_over: Option<(u64, u64, u64)>,
    /// The seqs of the input frames the takeover delivers again.
    replayed: Vec<u64>,
    /// The (epoch, id) of the held output frames the takeover sends again.
    resent: Vec<(u64, u64)>,
    stood_down: bool,
    failed: Option<String>,
}

fn scratch_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ft-model-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What the primary's image holds before the guest writes.
const FIRST_BYTE: u8 = 0x11;

fn image(path: &Path, byte: u8) {
    std::fs::write(path, vec![byte; (DISK_BLOCKS * BLOCK) as usize]).unwrap();
}

fn read_image(path: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    File::open(path).unwrap().read_to_end(&mut data).unwrap();
    data
}

/// Runs the backup's half of a control loop: prepares the standby memory, records the
/// outcome.
fn backup_loop(
    mut backup: Backup,
    wake: Arc<EventFd>,
    done: Arc<AtomicBool>,
) -> (Backup, BackupOutcome) {
    let mut memory: Option<GuestMemoryMmap> = None;
    let mut outcome = BackupOutcome::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = wake.read();
        match backup.poll() {
            BackupEvent::None => {
                if done.load(Ordering::SeqCst) || Instant::now() > deadline {
                    return (backup, outcome);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            BackupEvent::Prepare { config, reply } => {
                let mem = vmm::memory::create(config.memory.size).map_err(|e| e.to_string());
                memory = mem.as_ref().ok().cloned();
                let _ = reply.send(mem);
            }
            BackupEvent::TakeOver {
                state,
                epoch,
                resend,
                replay,
                ..
            } => {
                outcome.resent = resend
                    .iter()
                    .map(|(_, frame)| {
                        let word =
                            |at: usize| u64::from_le_bytes(frame[at..at + 8].try_into().unwrap());
                        (word(0), word(8))
                    })
                    .collect();
                let hash = memory.as_ref().map(memory_hash).unwrap_or_default();
                outcome.took_over = Some((epoch, state.kvm.clock.clock, hash));
                outcome.replayed = replay
                    .iter()
                    .map(|(_, frame)| u64::from_le_bytes(frame[..8].try_into().unwrap()))
                    .collect();
                backup.took_over(Ok(()));
                return (backup, outcome);
            }
            BackupEvent::StandDown { .. } => {
                outcome.stood_down = true;
                return (backup, outcome);
            }
            BackupEvent::Failed(e) => {
                outcome.failed = Some(e);
                return (backup, outcome);
            }
        }
    }
}

struct Report {
    summary: String,
    primary_health: Option<FtHealth>,
    acked: u64,
    /// The newest epoch the primary had committed (its output released) while protected.
    committed: u64,
    /// Frames that left while the primary was protected.
    frames_released: u64,
    /// Guest ACKs that left before their epoch was held (their input was).
    early_acks: u64,
    /// Epochs latency mode ended early because output waited.
    cut_for_output: u64,
    frames: u64,
    took_over: bool,
    /// Page frames the data streams carried.
    lane_pages: u64,
    /// Pages the primary sent as input frames laid over the backup's copy.
    pages_from_input: u64,
    /// Pages the primary copied into staging while the guest ran.
    pages_staged_early: u64,
    /// Of them, pages it sent while the guest ran.
    pages_sent_early: u64,
    /// Of them, pages written again before the last pause, left to the pause.
    pages_held_for_pause: u64,
}

fn run(seed: u64, mode: FtDiskMode, faults: Vec<Fault>, witness: &Arc<WitnessHandle>) -> Report {
    run_with(seed, mode, faults, witness, HEARTBEAT_MS, Knobs::default())
}

/// What a run varies besides its seed, disk mode, faults and heartbeat.
#[derive(Clone, Copy, Debug, Default)]
struct Knobs {
    /// The primary in latency mode.
    latency_mode: bool,
    /// See [`World::page_frame_us`].
    page_frame_us: u64,
    /// See [`World::burst_every`].
    burst_every: u64,
    /// Data streams beside the first connection (None: 0, 1 or 2 by seed).
    lanes: Option<usize>,
    /// The epoch length (None: [`EPOCH_MS`]).
    epoch_ms: Option<u64>,
}

/// [`run`] with its own heartbeat timeout: a run without faults has nothing to detect, so it
/// gets one a loaded 2-core host cannot miss (the model's tests run in parallel there).
fn run_with(
    seed: u64,
    mode: FtDiskMode,
    faults: Vec<Fault>,
    witness: &Arc<WitnessHandle>,
    heartbeat_ms: u64,
    knobs: Knobs,
) -> Report {
    let Knobs {
        latency_mode,
        page_frame_us,
        burst_every,
        lanes,
        epoch_ms,
    } = knobs;
    // Several streams or one: the backup must hold the same either way.
    let lanes = lanes.unwrap_or((seed / 3 % 3) as usize);
    let context =
        format!("seed {seed:#x}, {mode:?} disks, {lanes} data streams, faults {faults:?}");
    let dir = scratch_dir();
    let primary_disk = dir.join("primary.img");
    let backup_disk = dir.join("backup.img");
    image(&primary_disk, FIRST_BYTE);
    // A replicated backup starts from a stale copy (shorter for odd seeds): the initial sync
    // must size and overwrite it.
    image(&backup_disk, 0xaa);
    if seed % 2 == 1 {
        let f = OpenOptions::new().write(true).open(&backup_disk).unwrap();
        f.set_len(DISK_BLOCKS * BLOCK / 2).unwrap();
    }
    let world = Arc::new(World::default());
    world.page_frame_us.store(page_frame_us, Ordering::Relaxed);
    world.burst_every.store(burst_every, Ordering::Relaxed);
    *world.witness.lock().unwrap() = Some(witness.clone());
    let primary_witness = relay(witness.local_addr(), world.clone(), Side::Primary);
    let backup_witness = relay(witness.local_addr(), world.clone(), Side::Backup);

    let (link, mut ends) = link(world.clone(), faults.clone(), lanes);
    let (primary_end, backup_end) = ends.remove(0);
    let (mut primary_lanes, backup_lanes): (Vec<_>, Vec<_>) = ends
        .into_iter()
        .map(|(p, b)| (FtStream::Unix(p), FtStream::Unix(b)))
        .unzip();
    let backup_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let request = ReceiveFtRequest {
        receiver_url: "tcp:127.0.0.1:1".into(),
        disk_paths: match mode {
            FtDiskMode::Replicated => vec![backup_disk.clone()],
            FtDiskMode::Shared => vec![primary_disk.clone()],
        },
        taps: vec!["tapmodel".into()],
        witness: Some(backup_witness.addr.clone()),
        fencing: None,
        group: None,
        tls_dir: None,
        // The witness in these tests listens on plain TCP.
        insecure_plaintext: true,
    };
    let backup = Backup::start_connected_with_lanes(
        FtStream::Unix(backup_end),
        backup_lanes,
        &request,
        backup_wake.clone(),
    )
    .unwrap();
    let backup_done = Arc::new(AtomicBool::new(false));
    let backup_thread = {
        let (wake, done) = (backup_wake.clone(), backup_done.clone());
        std::thread::spawn(move || backup_loop(backup, wake, done))
    };

    let mut vm = FakeVm::new(
        world.clone(),
        primary_disk.clone(),
        mode == FtDiskMode::Shared,
        seed,
    );
    vm.install_gates().unwrap();
    for _ in 0..20 {
        vm.step();
    }
    let config: VmConfig = serde_json::from_value(serde_json::json!({
        "memory": {"size": MEMORY},
        "disks": [{"path": primary_disk}],
        // The fake's NIC (input frames name it); no TAP is opened in the model.
        "net": [{"tap": "tapmodel", "mac": "02:00:00:00:00:01"}],
    }))
    .unwrap();
    let enable = EnableFtRequest {
        peer: "127.0.0.1:1".into(),
        epoch_ms: epoch_ms.unwrap_or(EPOCH_MS),
        disk_mode: mode,
        heartbeat_timeout_ms: Some(heartbeat_ms),
        witness: Some(primary_witness.addr.clone()),
        fencing: None,
        compress: true,
        hot_pages: true,
        stage_helper: true,
        early_staging: true,
        early_send: true,
        early_acks: true,
        resend_output: true,
        latency_mode,
        // The sender alone, or 1 or 2 encoder threads: the pipeline may not change what the
        // backup holds.
        encode_threads: (lanes == 0).then_some((seed % 3) as u32),
        streams: (lanes > 0).then_some(lanes as u32 + 1),
        group: None,
        tls_dir: None,
        // The witness in these tests listens on plain TCP.
        insecure_plaintext: true,
    };
    let primary_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let progress = Arc::new(vmm::progress::TransferProgress::new(
        vmm::progress::Operation::EnableFt,
        config.memory.size,
    ));
    let enabled = Primary::enable_over(
        &mut vm,
        &config,
        &enable,
        primary_wake,
        FtStream::Unix(primary_end),
        Some(&mut || {
            // The data streams in the order the primary dials them.
            (!primary_lanes.is_empty())
                .then(|| primary_lanes.remove(0))
                .ok_or_else(|| "no more in-process data streams".to_string())
        }),
        Some(progress.clone()),
    );
    // The operator's progress ends as the sync does: done with protection, failed without.
    let phase = progress.report().phase;
    match &enabled {
        Ok(_) => assert_eq!(phase, vmm::progress::Phase::Done),
        Err(e) => {
            // A failure before the stream opened (fencing, group) leaves the sync unstarted.
            assert!(
                matches!(
                    phase,
                    vmm::progress::Phase::Failed | vmm::progress::Phase::Starting
                ),
                "{phase:?} after {e}"
            );
        }
    }
    // None: a fault during the sync, protection never started.
    let mut primary = enabled.ok();
    let kill_seen = |link: &Link| *link.state.kill.lock().unwrap();
    let mut checkpoints = 0;
    let mut fenced = false;
    if let Some(p) = primary.as_mut() {
        world
            .primary_epoch
            .store(p.status().epoch, Ordering::SeqCst);
        let mut last = Instant::now();
        // A run goes on until its link fault has happened.
        let fault_frame = faults
            .iter()
            .filter_map(|f| match *f {
                Fault::FailDisk { .. } => None,
                Fault::KillPrimary { at }
                | Fault::KillBackup { at }
                | Fault::Partition { at }
                | Fault::Silence { at }
                | Fault::Drop { at, .. }
                | Fault::Duplicate { at, .. }
                | Fault::Reorder { at, .. }
                | Fault::Truncate { at, .. }
                | Fault::Corrupt { at, .. }
                | Fault::ForgeAck { at, .. } => Some(at + 1),
            })
            .max()
            .unwrap_or(0);
        let started = Instant::now();
        let silenced = faults.iter().any(|f| matches!(f, Fault::Silence { .. }));
        let forges = faults.iter().any(|f| matches!(f, Fault::ForgeAck { .. }));
        // When the forgery went out (first seen by this loop).
        let forged_at = std::cell::Cell::new(None::<Instant>);
        let forged_since = |link: &Link| {
            if forged_at.get().is_none() && link.state.forged.load(Ordering::SeqCst) {
                forged_at.set(Some(Instant::now()));
            }
            forged_at.get()
        };
        while checkpoints < CHECKPOINTS
            // A forged acknowledgement: the run lasts until it was sent and the primary
            // acted on it (input mirroring adds frames, so frame `at` may come late).
            || (forges
                && forged_since(&link).is_none_or(|t| t.elapsed() < FORGERY_GRACE)
                && p.status().health == FtHealth::Protected
                && started.elapsed() < Duration::from_secs(20))
            // A killed backup: the primary must notice (a heartbeat timeout at most) before
            // the run ends, however late in it the kill came.
            || (kill_seen(&link) == Some(Side::Backup)
                && p.status().health == FtHealth::Protected
                && started.elapsed() < Duration::from_secs(20))
            || (silenced
                && !backup_thread.is_finished()
                && started.elapsed() < Duration::from_secs(20))
            || (link.state.frames.load(Ordering::SeqCst) < fault_frame
                && p.status().health == FtHealth::Protected
                && started.elapsed() < Duration::from_secs(20))
        {
            if kill_seen(&link) == Some(Side::Primary) {
                break;
            }
            if silenced && backup_thread.is_finished() {
                // The backup decided; the primary has not noticed yet: its VM stops now.
                break;
            }
            for fault in &faults {
                if let Fault::FailDisk { at, count } = *fault {
                    if at == checkpoints {
                        world.disk_failures.store(count, Ordering::SeqCst);
                    }
                }
            }
            vm.step();
            std::thread::sleep(Duration::from_micros(300));
            match p.next_checkpoint() {
                Some(wait) if last.elapsed() >= wait => {
                    p.checkpoint(&mut vm)
                        .unwrap_or_else(|e| panic!("{context}: {e}"));
                    world
                        .primary_epoch
                        .store(p.status().epoch, Ordering::SeqCst);
                    last = Instant::now();
                    checkpoints += 1;
                }
                Some(_) => {}
                // Unprotected: the guest runs on for a while.
                None => checkpoints += 1,
            }
            let committed = p.status().last_committed_epoch;
            let holds = world.backup_holds.load(Ordering::SeqCst);
            if committed > holds && p.status().health == FtHealth::Protected {
                world.violations.lock().unwrap().push(format!(
                    "the primary counts epoch {committed} committed, the backup holds {holds}"
                ));
            }
            if silenced {
                // A starved control loop: the primary does not act on its link's loss before
                // its VM is stopped.
                continue;
            }
            let event = p.poll(&mut vm, true);
            world
                .primary_epoch
                .store(p.status().epoch, Ordering::SeqCst);
            if let vmm::fault_tolerance::PrimaryEvent::Fenced(_) = event {
                fenced = true;
                break;
            }
        }
    }
    // The run ends: a killed side is gone; otherwise protection ends on purpose.
    let killed = kill_seen(&link);
    let primary_health = primary.as_ref().map(|p| p.status().health);
    let committed = primary
        .as_ref()
        .map_or(0, |p| p.status().last_committed_epoch);
    let cut_for_output = primary
        .as_ref()
        .map_or(0, |p| p.status().epochs_cut_for_output);
    let pages_from_input = primary.as_ref().map_or(0, |p| p.status().pages_from_input);
    let pages_staged_early = primary
        .as_ref()
        .map_or(0, |p| p.status().pages_staged_early);
    let pages_sent_early = primary.as_ref().map_or(0, |p| p.status().pages_sent_early);
    let pages_held_for_pause = primary
        .as_ref()
        .map_or(0, |p| p.status().pages_held_for_pause);
    let frames_released = world.frames_out.load(Ordering::SeqCst);
    let early_acks = vm
        .gates
        .as_ref()
        .map_or(0, |g| g.nets.iter().map(|n| n.stats().early_released).sum());
    if killed == Some(Side::Primary) {
        // Its threads may still run in this process: nothing they do leaves any more.
        world.primary_dead.store(true, Ordering::SeqCst);
        drop(primary.take());
    }
    // Let the survivor notice and decide.
    let (backup, outcome) = if killed == Some(Side::Backup) {
        link.cut();
        backup_done.store(true, Ordering::SeqCst);
        backup_thread.join().unwrap()
    } else {
        let start = Instant::now();
        if killed.is_none() && primary_health != Some(FtHealth::Protected) {
            // Wait for the backup to decide on its own.
            while !backup_thread.is_finished() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if killed.is_none() {
            if let Some(p) = primary.take() {
                let health = p.status().health;
                if health == FtHealth::Protected {
                    world.ended.store(true, Ordering::SeqCst);
                    // Refused when the backup did not confirm standing down and won the
                    // witness: then it must take over.
                    if p.stop(Some(&mut vm), StopReason::VmGone).is_err() {
                        fenced = true;
                    }
                } else {
                    std::mem::forget(p);
                }
            }
        }
        let start = Instant::now();
        while !backup_thread.is_finished() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        backup_done.store(true, Ordering::SeqCst);
        backup_thread.join().unwrap()
    };
    let acked = world.backup_holds.load(Ordering::SeqCst);
    let delivered = link.state.delivered.load(Ordering::SeqCst);
    // A killed backup's process is gone: its late decisions do not count.
    let took_over = if killed == Some(Side::Backup) {
        None
    } else {
        outcome.took_over
    };

    // Invariants.
    let mut violations = std::mem::take(&mut *world.violations.lock().unwrap());
    if let Some((epoch, register, memory)) = took_over {
        // Its restore point is the newest epoch it committed: never older than one it
        // acknowledged (that output may have left), never newer than the link carried. A
        // backup that timed out (a starved primary) may leave delivered epochs unread.
        if epoch < acked || epoch > delivered {
            violations.push(format!(
                "the backup resumed epoch {epoch}; it acknowledged {acked}, the link carried {delivered}"
            ));
        }
        match vm.captures.get(epoch as usize - 1) {
            Some(capture) => {
                if capture.register != register {
                    violations.push(format!(
                        "epoch {epoch}: state register {register}, captured {}",
                        capture.register
                    ));
                }
                if capture.memory != memory {
                    violations.push(format!("epoch {epoch}: the backup's memory differs"));
                }
            }
            None => violations.push(format!("the backup resumed epoch {epoch}, never captured")),
        }
        let image = match mode {
            FtDiskMode::Shared => read_image(&primary_disk),
            FtDiskMode::Replicated => read_image(&backup_disk),
        };
        if image != vm.expected_disk(epoch) {
            let differ = image
                .chunks(BLOCK as usize)
                .zip(vm.expected_disk(epoch).chunks(BLOCK as usize))
                .position(|(a, b)| a != b);
            violations.push(format!(
                "after failover to epoch {epoch} the disk differs from the writes of epochs <= {epoch} (block {differ:?})"
            ));
        }
        // Input: every frame of a later epoch that an ACK which left covered is delivered
        // again, in order, and nothing the resumed epoch already holds.
        let acked_out = world.input_acked_out.load(Ordering::SeqCst);
        let epoch_of = |seq: u64| vm.inputs.iter().find(|(s, _)| *s == seq).map(|(_, e)| *e);
        for &seq in &outcome.replayed {
            match epoch_of(seq) {
                Some(e) if e > epoch => {}
                other => violations.push(format!(
                    "after failover to epoch {epoch} the backup delivers input {seq} again, received in epoch {other:?}"
                )),
            }
        }
        if !outcome.replayed.windows(2).all(|w| w[0] < w[1]) {
            violations.push(format!(
                "input delivered again out of order: {:?}",
                outcome.replayed
            ));
        }
        for &(seq, e) in &vm.inputs {
            if e > epoch && seq <= acked_out && !outcome.replayed.contains(&seq) {
                violations.push(format!(
                    "after failover to epoch {epoch} input {seq} (epoch {e}), acknowledged to the client (ACKs covered input up to {acked_out}), is lost"
                ));
            }
        }
        // Output: the held frames sent again belong to epochs the backup resumed, in
        // production order, and no frame of those epochs is lost (it left the primary or is
        // sent again).
        if let Some((e, id)) = outcome.resent.iter().find(|(e, _)| *e > epoch || *e == 0) {
            violations.push(format!(
                "output commit: after failover to epoch {epoch} the backup sends frame {id} of epoch {e}"
            ));
        }
        if !outcome.resent.windows(2).all(|w| w[0].1 < w[1].1) {
            violations.push(format!(
                "held output sent again out of order: {:?}",
                outcome.resent
            ));
        }
        let left = world.frames_left.lock().unwrap();
        let lost: Vec<(u64, u64)> = vm
            .outputs
            .iter()
            .filter(|(e, id)| {
                (1..=epoch).contains(e)
                    && !left.contains(id)
                    && !outcome.resent.iter().any(|(_, r)| r == id)
            })
            .copied()
            .collect();
        if !lost.is_empty() {
            violations.push(format!(
                "after failover to epoch {epoch} output frames (epoch, id) {lost:?} neither left the primary nor were sent again"
            ));
        }
        drop(left);
        if primary_health == Some(FtHealth::Degraded) && killed.is_none() {
            violations
                .push("two live primaries: the backup took over and the primary runs on".into());
        }
    }
    if fenced && took_over.is_none() && killed.is_none() && outcome.failed.is_none() {
        violations.push("the primary was fenced but the backup did not take over".into());
    }
    drop(backup);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        violations.is_empty(),
        "{context}:\n  {}\n  (backup: {outcome:?}, primary: {primary_health:?}, acked {acked}, delivered {delivered})",
        violations.join("\n  ")
    );
    Report {
        primary_health,
        committed,
        frames_released,
        early_acks,
        pages_from_input,
        pages_staged_early,
        pages_sent_early,
        pages_held_for_pause,
        cut_for_output,
        summary: format!("backup {outcome:?}, primary {primary_health:?}, killed {killed:?}"),
        acked,
        frames: link.state.frames.load(Ordering::SeqCst),
        took_over: took_over.is_some(),
        lane_pages: link.state.lane_pages.load(Ordering::Relaxed),
    }
}

fn runs() -> u64 {
    std::env::var("FT_MODEL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

fn witness() -> Arc<WitnessHandle> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    Arc::new(
        ft::witness::spawn_server(listener, ft::witness::Security::InsecurePlaintext, None)
            .unwrap(),
    )
}

fn random_runs(mode: FtDiskMode, base_seed: u64) {
    let witness = witness();
    let seeds: Vec<u64> = match std::env::var("FT_MODEL_SEED") {
        Ok(seed) => vec![u64::from_str_radix(seed.trim_start_matches("0x"), 16).unwrap()],
        Err(_) => (0..runs())
            .map(|i| base_seed.wrapping_add(i * 0x9e37_79b9))
            .collect(),
    };
    let mut takeovers = 0;
    for seed in seeds {
        let mut rng = Rng(seed | 1);
        let mut faults = vec![Fault::random(&mut rng)];
        if rng.below(3) == 0 {
            faults.push(Fault::random(&mut rng));
        }
        // A third of the runs cut epochs early whenever output waits (latency mode).
        let latency_mode = rng.below(3) == 0;
        let knobs = Knobs {
            latency_mode,
            ..Knobs::default()
        };
        let report = run_with(seed, mode, faults, &witness, HEARTBEAT_MS, knobs);
        takeovers += report.took_over as u64;
    }
    eprintln!("{mode:?}: {takeovers} takeovers checked");
}

#[test]
fn no_fault_run_replicates_and_releases_everything() {
    let witness = witness();
    // One connection, then the first and two data streams.
    for (mode, lanes) in [(FtDiskMode::Shared, 0), (FtDiskMode::Replicated, 2)] {
        // 10 ms epochs, not the model's usual 2: early staging, three quarters into an epoch,
        // must happen in this run, and a loaded 2-core host running the model's other tests
        // can leave a 2 ms epoch no room for it (the sender still busy at that point).
        let knobs = Knobs {
            lanes: Some(lanes),
            epoch_ms: Some(10),
            ..Knobs::default()
        };
        let report = run_with(1, mode, Vec::new(), &witness, NO_FAULT_HEARTBEAT_MS, knobs);
        assert_eq!(
            report.lane_pages > 0,
            lanes > 0,
            "{mode:?}: {} page frames on {lanes} data streams",
            report.lane_pages
        );
        assert!(
            report.acked > 10,
            "{mode:?}: only {} epochs acknowledged",
            report.acked
        );
        // Liveness: acknowledged output leaves (a gate stuck in one epoch holds it forever).
        assert!(
            report.committed + 3 >= report.acked,
            "{mode:?}: the backup acknowledged epoch {}, the primary committed only {}",
            report.acked,
            report.committed
        );
        assert!(
            report.frames_released > 2 * report.acked,
            "{mode:?}: {} frames left over {} epochs",
            report.frames_released,
            report.acked
        );
        assert!(!report.took_over);
        assert!(
            report.early_acks > 0,
            "{mode:?}: no ACK left before its epoch was held"
        );
        assert!(
            report.pages_from_input > 0,
            "{mode:?}: no page went as the input frames it received"
        );
        assert!(
            report.pages_staged_early > 0,
            "{mode:?}: no page was staged while the guest ran"
        );
        assert!(
            report.pages_sent_early > 0,
            "{mode:?}: no page was sent while the guest ran"
        );
        eprintln!(
            "{mode:?}: {} frames ({} page frames on {lanes} data streams), {} epochs \
             acknowledged, {} ACKs left early, {} pages sent as input, {} staged early, {} \
             sent early, {} held for the pause",
            report.frames,
            report.lane_pages,
            report.acked,
            report.early_acks,
            report.pages_from_input,
            report.pages_staged_early,
            report.pages_sent_early,
            report.pages_held_for_pause
        );
    }
}

/// Latency mode: with output waiting every step, epochs end early, and nothing else changes.
#[test]
fn latency_mode_ends_epochs_early_while_output_waits() {
    let witness = witness();
    // Latency mode ends an epoch early only when the last one took at most a quarter of an
    // epoch to send: 2.5 ms here, which a loaded 2-core host running the model's other tests
    // still meets (half a millisecond, at the model's usual 2 ms, it may not).
    let knobs = Knobs {
        latency_mode: true,
        epoch_ms: Some(10),
        ..Knobs::default()
    };
    let report = run_with(
        2,
        FtDiskMode::Shared,
        Vec::new(),
        &witness,
        NO_FAULT_HEARTBEAT_MS,
        knobs,
    );
    assert!(
        report.acked > 10,
        "only {} epochs acknowledged",
        report.acked
    );
    assert!(
        report.cut_for_output > 0,
        "no epoch ended early: {}",
        report.summary
    );
    assert!(!report.took_over);
}

/// A slow link: epochs of several page frames take long to send, and the input that arrives
/// meanwhile goes out between their frames. The wake-ups that input leaves for the sender must
/// not crowd the next epoch out of its queue (the primary then counted its backup as lost and
/// ran on unprotected).
#[test]
fn input_between_the_frames_of_long_epochs_keeps_protection() {
    let witness = witness();
    let knobs = Knobs {
        page_frame_us: 1500,
        burst_every: 3,
        ..Knobs::default()
    };
    for seed in [3, 4] {
        let report = run_with(
            seed,
            FtDiskMode::Replicated,
            Vec::new(),
            &witness,
            NO_FAULT_HEARTBEAT_MS,
            knobs,
        );
        assert_eq!(
            report.primary_health,
            Some(FtHealth::Protected),
            "seed {seed}: {}",
            report.summary
        );
        assert!(report.acked > 10, "seed {seed}: {}", report.summary);
        assert!(!report.took_over);
    }
}

/// A slow link with the primary killed mid-run: the sender is still reading a pass out of the
/// staging memory when early staging or the next pause would write into it. The copy the
/// backup resumes must still be exactly the captured epoch.
#[test]
fn a_slow_link_keeps_staging_for_the_pass_being_sent() {
    let witness = witness();
    let knobs = Knobs {
        page_frame_us: 1500,
        burst_every: 3,
        ..Knobs::default()
    };
    // The sender is busy most of the time here, so only some epochs stage early: counted over
    // every run, not per run (a loaded host may leave one run without any).
    let (mut sent_early, mut held_for_pause) = (0, 0);
    for (seed, mode) in [(5, FtDiskMode::Shared), (6, FtDiskMode::Replicated)] {
        let report = run_with(
            seed,
            mode,
            Vec::new(),
            &witness,
            NO_FAULT_HEARTBEAT_MS,
            knobs,
        );
        sent_early += report.pages_sent_early;
        held_for_pause += report.pages_held_for_pause;
        // A kill every few epochs from the second on: the takeover compares the whole copy.
        for step in 2..=13 {
            let at = report.frames * step / 14;
            let faults = vec![Fault::KillPrimary { at }];
            let killed = run_with(seed + step, mode, faults, &witness, HEARTBEAT_MS, knobs);
            assert!(
                killed.took_over,
                "{mode:?}: no takeover after a kill at frame {at}: {}",
                killed.summary
            );
            sent_early += killed.pages_sent_early;
            held_for_pause += killed.pages_held_for_pause;
        }
    }
    assert!(sent_early > 0, "no page left while the guest ran");
    // Bursts rewrite pages after early staging, so first passes hold some back; how many
    // depends on how often the loaded sender lets early staging run, so it is only reported
    // (a pause that drops them fails the checks above: the copy the backup resumes differs).
    eprintln!("{sent_early} pages sent early, {held_for_pause} held back for the pause");
}

#[test]
fn failover_keeps_every_acknowledged_epoch() {
    let witness = witness();
    for mode in [FtDiskMode::Shared, FtDiskMode::Replicated] {
        let frames = run(1, mode, Vec::new(), &witness).frames;
        for at in [frames / 4, frames / 2, frames * 3 / 4] {
            let report = run(at, mode, vec![Fault::KillPrimary { at }], &witness);
            assert!(
                report.took_over,
                "{mode:?}: no takeover after a kill at frame {at}: {}",
                report.summary
            );
        }
    }
}

#[test]
fn random_faults_shared_disk() {
    random_runs(FtDiskMode::Shared, 0x5eed_0001);
}

#[test]
fn random_faults_replicated_disk() {
    random_runs(FtDiskMode::Replicated, 0x5eed_1001);
}

/// The VM is stopped on the primary while its backup, deaf to it for a heartbeat timeout,
/// has already taken over: the primary's held output (epochs the backup never got) must not
/// reach the disk the backup now owns, and the stop must report this copy fenced.
#[test]
fn a_stop_racing_a_takeover_leaves_the_backup_its_disk() {
    let witness = witness();
    for mode in [FtDiskMode::Shared, FtDiskMode::Replicated] {
        for at in [400, 700] {
            let report = run(at, mode, vec![Fault::Silence { at }], &witness);
            assert!(
                report.took_over,
                "{mode:?}: the deaf backup did not take over: {}",
                report.summary
            );
        }
    }
}

/// An acknowledgement the primary never asked for (a forged or confused backup) must not
/// release anything: the link counts as broken.
#[test]
fn forged_acks_release_nothing() {
    let witness = witness();
    for mode in [FtDiskMode::Shared, FtDiskMode::Replicated] {
        for at in [300, 600, 900] {
            for ahead in [1_000, u64::MAX] {
                let faults = vec![Fault::ForgeAck { at, ahead }];
                let report = run(at, mode, faults, &witness);
                assert_ne!(
                    report.primary_health,
                    Some(FtHealth::Protected),
                    "{mode:?}: an Ack {ahead} epochs ahead at frame {at} did not break the link: {}",
                    report.summary
                );
            }
        }
    }
}

/// A shared-disk write that fails to reach the image stays the backup's to re-issue: the
/// primary dies while its commits fail, and the backup's takeover must still hold every
/// acknowledged write.
#[test]
fn failed_disk_commits_are_kept_by_the_backup() {
    let witness = witness();
    for (i, at) in [5u64, 15, 25].into_iter().enumerate() {
        let faults = vec![
            Fault::FailDisk { at, count: 1_000 },
            Fault::KillPrimary {
                at: 300 + 200 * i as u64 + at * 25,
            },
        ];
        run(at, FtDiskMode::Shared, faults, &witness);
    }
}

/// Either side killed at each frame of a stretch of consecutive frames (every message of a
/// few epochs: pages, disk writes, state, EpochEnd, Ack, heartbeats).
#[test]
fn kill_either_side_at_every_protocol_step() {
    let witness = witness();
    let mut takeovers = 0;
    for at in 700..724 {
        for (i, fault) in [Fault::KillPrimary { at }, Fault::KillBackup { at }]
            .into_iter()
            .enumerate()
        {
            let mode = if at % 2 == 0 {
                FtDiskMode::Shared
            } else {
                FtDiskMode::Replicated
            };
            let report = run(at * 2 + i as u64, mode, vec![fault], &witness);
            takeovers += report.took_over as u64;
            if let Fault::KillBackup { .. } = fault {
                // A dead backup never stops the primary: it runs on unprotected.
                assert_eq!(
                    report.primary_health,
                    Some(FtHealth::Degraded),
                    "backup killed at frame {at}: {}",
                    report.summary
                );
            }
        }
    }
    assert!(
        takeovers >= 20,
        "only {takeovers} of 24 primary kills taken over"
    );
}
