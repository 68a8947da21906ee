//! The control loop's view of fault tolerance. The `ft` crate implements these traits and the
//! binary plugs it in through [`crate::VmmOptions`], so `vmm` never depends on `ft`
//! (dependencies point down: binaries -> ft -> vmm -> devices).
//!
//! Threads: the control loop calls these hooks (it owns the VM); the implementation runs its
//! own sender/receiver threads and wakes the loop through the `wake` eventfd it was given when
//! something needs the VM (backup lost, primary dead, a standby VM to prepare).

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::control::{EnableFtRequest, FtStatus, ReceiveFtRequest, VmmError};
use crate::device_manager::FtGates;
use crate::memory::GuestMemoryMmap;
use crate::migration::memory::DirtyPages;
use crate::progress::TransferProgress;
use crate::vm::{Vm, VmSnapshotState};

/// What fault tolerance (and pre-copy) needs of a VM, and nothing more, in the spirit of
/// Cloud Hypervisor's `Pausable` / `Snapshottable` / `Migratable`. The FT primary runs against
/// this trait only, so its state machine can be driven without KVM by a fake VM.
pub trait ReplicableVm {
    /// Stops the guest and the device loop: neither changes memory, state or output until
    /// [`ReplicableVm::resume`].
    fn pause(&mut self) -> Result<(), String>;
    fn resume(&mut self) -> Result<(), String>;
    /// The latest pause as the guest saw it: when it was asked for, and how long until every
    /// vCPU ran again. None until they all have (or when not known).
    fn last_stop(&self) -> Option<(Instant, Duration)> {
        None
    }
    fn set_dirty_logging(&mut self, enabled: bool) -> Result<(), String>;
    /// Pages written since the last call (by the guest or by devices); starts a new set. With
    /// manual re-arming on, the pages not re-armed since are reported too.
    fn dirty_since_last(&mut self) -> Result<DirtyPages, String>;
    /// Of the pages the last [`ReplicableVm::dirty_since_last`] reported, those the guest
    /// wrote itself (its dirty log), as opposed to devices writing through the VMM. Only a
    /// guest write can fault, so only these are worth keeping writable. None: not known
    /// (every reported page counts).
    fn guest_written(&self) -> Option<&DirtyPages> {
        None
    }
    /// FT's hot pages: turns manual re-arming of the dirty log on (false if this VM cannot) or
    /// off (then every page is re-armed, and harvests re-arm what they report, as before).
    fn set_manual_rearm(&mut self, _on: bool) -> Result<bool, String> {
        Ok(false)
    }
    /// With manual re-arming on: write-protects again every page reported so far except
    /// `keep`; kept pages stay writable, unlogged, and in every harvest until re-armed.
    fn rearm_dirty_log(&mut self, _keep: &DirtyPages) -> Result<(), String> {
        Ok(())
    }
    fn memory(&self) -> &GuestMemoryMmap;
    /// The state of a paused VM (vCPUs, in-kernel devices, device models).
    fn save_state(&mut self) -> Result<VmSnapshotState, String>;
    /// The devices' FT output gates (installed on the first call, in pass-through mode).
    fn ft_gates(&mut self) -> Result<FtGates, String>;
}

impl ReplicableVm for Vm {
    fn pause(&mut self) -> Result<(), String> {
        Vm::pause(self).map_err(|e| e.to_string())
    }
    fn resume(&mut self) -> Result<(), String> {
        Vm::resume(self).map_err(|e| e.to_string())
    }
    fn last_stop(&self) -> Option<(Instant, Duration)> {
        Vm::last_stop(self)
    }
    fn set_dirty_logging(&mut self, enabled: bool) -> Result<(), String> {
        Vm::set_dirty_logging(self, enabled).map_err(|e| e.to_string())
    }
    fn dirty_since_last(&mut self) -> Result<DirtyPages, String> {
        let kvm = self.take_dirty_log().map_err(|e| e.to_string())?;
        // Only FT's hot pages (manual re-arming) ask which pages the guest wrote; a migration
        // pass or the dirty-log floor does not pay for a second set. Taken before the device
        // bitmap is harvested into `pages` (which resets it).
        let guest = if self.manual_rearm_on() {
            Some(
                DirtyPages::from_bitmaps(&kvm, Vm::memory(self), false)
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let pages =
            DirtyPages::from_bitmaps(&kvm, Vm::memory(self), true).map_err(|e| e.to_string())?;
        self.note_reported(&pages, guest);
        Ok(pages)
    }
    fn guest_written(&self) -> Option<&DirtyPages> {
        Vm::guest_written(self)
    }
    fn set_manual_rearm(&mut self, on: bool) -> Result<bool, String> {
        Vm::set_manual_rearm(self, on).map_err(|e| e.to_string())
    }
    fn rearm_dirty_log(&mut self, keep: &DirtyPages) -> Result<(), String> {
        Vm::rearm_dirty_log(self, keep).map_err(|e| e.to_string())
    }
    fn memory(&self) -> &GuestMemoryMmap {
        Vm::memory(self)
    }
    fn save_state(&mut self) -> Result<VmSnapshotState, String> {
        Vm::save_state(self).map_err(|e| e.to_string())
    }
    fn ft_gates(&mut self) -> Result<FtGates, String> {
        self.device_manager_mut().ft_gates(0)
    }
}

/// Creates protection sessions (one at a time per VMM).
pub trait FtProvider: Send {
    /// Protects the running `vm`: connects to the backup, runs the initial synchronisation
    /// (the guest keeps running until its final pause) and installs the output gates.
    /// Returns once the backup holds epoch 0; reports how far it got in `progress`.
    fn enable(
        &mut self,
        vm: &mut Vm,
        config: &VmConfig,
        request: &EnableFtRequest,
        wake: Arc<EventFd>,
        progress: Arc<TransferProgress>,
    ) -> Result<Box<dyn PrimaryFt>, VmmError>;

    /// Starts waiting for a primary (in the background) to become its backup.
    fn receive(
        &mut self,
        request: &ReceiveFtRequest,
        wake: Arc<EventFd>,
    ) -> Result<Box<dyn BackupFt>, VmmError>;
}

/// What the primary's session asks of the control loop after [`PrimaryFt::poll`].
#[derive(Debug, PartialEq, Eq)]
pub enum PrimaryEvent {
    /// Nothing for the loop to do (the status may have changed: e.g. running unprotected).
    Continue,
    /// The witness gave the VM to the backup: this copy must stop and release nothing more.
    Fenced(String),
}

/// Why the primary's protection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `vm.disable-ft`: the backup drops its copy; the VM runs on unprotected.
    Disabled,
    /// The guest powered off: the backup must not bring it back.
    GuestShutdown,
    /// The VM is stopped or the VMM shuts down: the backup stands down.
    VmGone,
    /// The guest reset: the backup stands down and waits for the rebooted VM, which the
    /// primary protects again with the same settings.
    Reset,
}

pub trait PrimaryFt: Send {
    /// How long the guest runs before the next checkpoint; None when no checkpoint is due
    /// (the backup is gone).
    fn next_checkpoint(&self) -> Option<Duration>;

    /// Ends the running epoch: pause, capture, resume, hand the epoch to the sender. The VM is
    /// running when this returns (also on error).
    fn checkpoint(&mut self, vm: &mut Vm) -> Result<(), String>;

    /// Handles what the replication threads reported through `wake` (for a member of an FT
    /// group this includes the group's checkpoints; `running` says whether the guest runs,
    /// so that a checkpoint of a paused VM leaves it paused).
    fn poll(&mut self, vm: &mut Vm, running: bool) -> PrimaryEvent;

    fn status(&self) -> FtStatus;

    /// Ends protection (see [`StopReason`]); with a VM, held output is committed first where
    /// the backup still acknowledges, else released (disable) or dropped (fenced).
    /// Err(why): the backup may own the VM (it did not confirm standing down and the fencing
    /// refused this side); the held output was dropped and this copy must stop.
    fn stop(self: Box<Self>, vm: Option<&mut Vm>, reason: StopReason) -> Result<(), String>;
}

/// What a backup asks of the control loop.
pub enum BackupEvent {
    /// Nothing for the loop to do.
    None,
    /// A primary connected: build the standby VM from its configuration (disk paths already
    /// mapped to this host) and answer with its memory, which the backup keeps up to date.
    Prepare {
        config: Box<VmConfig>,
        reply: mpsc::Sender<Result<GuestMemoryMmap, String>>,
    },
    /// The primary is dead and this host won the right to run the VM: restore the standby VM
    /// from `state` (memory already holds the same epoch) and run it.
    TakeOver {
        state: Box<VmSnapshotState>,
        epoch: u64,
        /// Frames the primary's guest sent in `epoch` or before and that it may not have
        /// released (NIC index, Ethernet frame): send them again first, the restored guest
        /// counts them as sent.
        resend: Vec<(u32, Vec<u8>)>,
        /// Frames the primary's guest received after `epoch` (NIC index, Ethernet frame), to
        /// deliver again in order: clients may have been told they arrived.
        replay: Vec<(u32, Vec<u8>)>,
        /// How far to move the guest clock forward: the time since the primary captured
        /// `epoch`, so that the guest's TCP timestamps do not go back.
        clock_advance: std::time::Duration,
    },
    /// The primary ended protection: drop the standby VM. With `guest_shutdown` the VM powered
    /// off, so this VMM ends as the primary's does; with `reprotect` the guest reset and the
    /// primary protects the rebooted VM again, so this VMM waits for it anew.
    StandDown {
        guest_shutdown: bool,
        reprotect: bool,
    },
    /// Receiving failed without a reason to take over (e.g. a corrupt stream from a live
    /// primary): drop the standby VM.
    Failed(String),
}

pub trait BackupFt: Send {
    fn poll(&mut self) -> BackupEvent;
    fn status(&self) -> FtStatus;
    /// `vm.disable-ft` on the backup or VMM shutdown: stop receiving (the primary then runs
    /// unprotected).
    fn stop(self: Box<Self>);
    /// The control loop restored the VM after [`BackupEvent::TakeOver`] (Ok) or could not.
    fn took_over(&mut self, result: Result<(), String>);
}
