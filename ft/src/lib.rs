//! Fault tolerance after Cuju: a running VM replicated epoch by epoch to a hot backup on
//! another host, with output commit (network frames and shared-disk writes leave only once the
//! backup holds their epoch), heartbeats, failover with disk I/O retry, and fencing through a
//! witness.
//!
//! The control loop of `vmm` drives it through the traits of `vmm::fault_tolerance`;
//! [`TandemFt`] is the implementation the binary plugs in. Modules:
//! - [`primary`]: initial sync, epochs, sender and acknowledgement threads;
//! - [`backup`]: receiver thread, epoch staging, takeover;
//! - [`input_store`]: the backup's copy of the input the guest received (TCP at full speed);
//! - [`output_store`]: the backup's copy of the output held when each epoch ended, sent again
//!   at a takeover;
//! - [`wire`]: the Control, DiskWrites, InputFrames and OutputFrames messages added to the
//!   migration stream;
//! - [`group`]: fate sharing, several VMs cut, committed and failed over together;
//! - [`fence`] / [`witness`]: who may run after a partition.

pub mod backup;
pub mod disk_sync;
pub mod etcd_fence;
pub mod fault;
pub mod fence;
pub mod group;
pub mod input_store;
pub mod link;
pub mod output_store;
pub mod primary;
pub mod stats;
pub mod wire;
pub mod witness;

use std::sync::Arc;

use vmm::config::VmConfig;
use vmm::control::{EnableFtRequest, ReceiveFtRequest, VmmError};
use vmm::fault_tolerance::{BackupFt, FtProvider, PrimaryFt};
use vmm::progress::TransferProgress;
use vmm::vm::Vm;
use vmm_sys_util::eventfd::EventFd;

/// The fault-tolerance implementation for `vmm::VmmOptions::ft`.
#[derive(Default)]
pub struct TandemFt;

impl FtProvider for TandemFt {
    fn enable(
        &mut self,
        vm: &mut Vm,
        config: &VmConfig,
        request: &EnableFtRequest,
        wake: Arc<EventFd>,
        progress: Arc<TransferProgress>,
    ) -> Result<Box<dyn PrimaryFt>, VmmError> {
        Ok(Box::new(primary::Primary::enable(
            vm,
            config,
            request,
            wake,
            Some(progress),
        )?))
    }

    fn receive(
        &mut self,
        request: &ReceiveFtRequest,
        wake: Arc<EventFd>,
    ) -> Result<Box<dyn BackupFt>, VmmError> {
        Ok(Box::new(backup::Backup::start(request, wake)?))
    }
}
