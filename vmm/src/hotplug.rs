//! `vm.add-disk`, `vm.add-net`, ... and `vm.remove-device`: what a device hot-plug changes in
//! the configuration and how the new device reaches the running VM (the PCI and ACPI side is
//! the device manager's and `devices::pci::hotplug`'s).
//!
//! The configuration stays the truth: an added device joins its kind's list with its id, a
//! removed one leaves it, and every device's number is pinned afterwards
//! (`VmConfig::pin_devices`), so a snapshot, a migration or a restart puts each device where
//! the guest saw it.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

use devices::virtio::fs::FsError;
use devices::virtio::pmem::PmemError;
use devices::virtio::vhost_user::VhostUserError;
use devices::virtio::vsock::VsockError;

use crate::config::placement::default_id;
use crate::config::{DiskConfig, FsConfig, NetConfig, PmemConfig, VmConfig, VsockConfig};
use crate::control::{HotplugRequest, VmmError};
use crate::device_manager::DeviceManagerError;
use crate::vm::{Vm, VmError};

/// A checked hot-plug: the configuration with the device in it, and what to build.
pub struct HotplugPlan {
    pub config: VmConfig,
    pub id: String,
    /// What to build (taken by [`attach`]).
    device: Option<Planned>,
    /// A TAP passed with `vm.add-net`: the caller keeps it open while the NIC exists.
    pub passed_fd: Option<OwnedFd>,
}

enum Planned {
    Disk(DiskConfig),
    Net(NetConfig),
    Pmem(PmemConfig),
    Fs(FsConfig),
    Vsock(VsockConfig),
}

/// Why a device could not be hot-plugged into the running VM (which is left as it was).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Building the device model or reaching its host resources.
    #[error("{0}")]
    Device(#[from] VmError),
    /// Placing it on the bus, in KVM or in the device loop.
    #[error("{0}")]
    Placement(#[from] DeviceManagerError),
}

impl AttachError {
    /// The API's error: 400 when the request is what must change (a file too small for its
    /// size, a socket path in use, nothing listening where the backend should be...), 500
    /// otherwise.
    pub fn into_vmm_error(self, action: &'static str) -> VmmError {
        if self.is_refusal() {
            VmmError::InvalidConfig(self.to_string())
        } else {
            VmmError::Failed {
                action,
                message: self.to_string(),
            }
        }
    }

    fn is_refusal(&self) -> bool {
        match self {
            AttachError::Device(e) => match e {
                VmError::Pmem { source, .. } => !matches!(
                    source,
                    PmemError::Mmap { .. } | PmemError::Sync { .. } | PmemError::EventFd { .. }
                ),
                VmError::FsMemory { .. } => true,
                VmError::Fs { source, .. } => matches!(
                    source,
                    FsError::Tag { .. }
                        | FsError::NoRequestQueue { .. }
                        | FsError::Backend {
                            source: VhostUserError::Connect { .. }
                                | VhostUserError::QueueCount { .. }
                                | VhostUserError::NoVersion1 { .. },
                            ..
                        }
                ),
                VmError::Vsock { source, .. } => matches!(
                    source,
                    VsockError::InvalidCid { .. } | VsockError::Bind { .. }
                ),
                VmError::DeviceManager(e) => placement_refusal(e),
                _ => false,
            },
            AttachError::Placement(e) => placement_refusal(e),
        }
    }
}

fn placement_refusal(e: &DeviceManagerError) -> bool {
    match e {
        DeviceManagerError::DuplicateId(_)
        | DeviceManagerError::Placement { .. }
        | DeviceManagerError::PmemNoRoom { .. } => true,
        DeviceManagerError::Pmem(e) => !matches!(e, PmemError::EventFd { .. }),
        _ => false,
    }
}

/// Checks `request` against `config`: a unique id (given, or Cloud Hypervisor's `_disk<N>`
/// style with the lowest free N), and the whole configuration valid with the device in it.
pub fn plan_add(config: &VmConfig, request: HotplugRequest) -> Result<HotplugPlan, VmmError> {
    let taken = config.device_ids();
    let choose = |prefix: &str, id: &Option<String>| -> Result<String, VmmError> {
        match id {
            Some(id) if taken.contains(id) => Err(VmmError::InvalidConfig(format!(
                "a device with id {id} exists already"
            ))),
            Some(id) => Ok(id.clone()),
            None => Ok((0..)
                .map(|n| default_id(prefix, n, &None))
                .find(|candidate| !taken.contains(candidate))
                .unwrap_or_default()),
        }
    };
    let mut next = config.clone();
    let mut passed_fd = None;
    let (id, device) = match request {
        HotplugRequest::Disk(mut disk) => {
            let id = choose("disk", &disk.id)?;
            disk.id = Some(id.clone());
            next.disks.get_or_insert_with(Vec::new).push(disk.clone());
            (id, Planned::Disk(disk))
        }
        HotplugRequest::Net { mut config, fds } => {
            if fds.len() > 1 {
                return Err(VmmError::InvalidConfig(format!(
                    "{} TAP descriptors passed; a device has one queue pair here, so one",
                    fds.len()
                )));
            }
            let id = choose("net", &config.id)?;
            config.id = Some(id.clone());
            let fd = fds.into_iter().next();
            if let Some(fd) = &fd {
                // The control loop keeps the passed descriptor open while the NIC exists, so
                // a reboot rebuilds the NIC from this number as from an inherited one.
                config.fds = Some(vec![fd.as_raw_fd()]);
            }
            next.net.get_or_insert_with(Vec::new).push(config.clone());
            // Held by the plan from here on, whether the NIC is built now or at boot.
            passed_fd = fd;
            (id, Planned::Net(config))
        }
        HotplugRequest::Pmem(mut pmem) => {
            let id = choose("pmem", &pmem.id)?;
            pmem.id = Some(id.clone());
            next.pmem.get_or_insert_with(Vec::new).push(pmem.clone());
            (id, Planned::Pmem(pmem))
        }
        HotplugRequest::Fs(mut fs) => {
            let id = choose("fs", &fs.id)?;
            fs.id = Some(id.clone());
            next.fs.get_or_insert_with(Vec::new).push(fs.clone());
            (id, Planned::Fs(fs))
        }
        HotplugRequest::Vsock(mut vsock) => {
            if config.vsock.is_some() {
                return Err(VmmError::InvalidConfig(
                    "the VM has a vsock device already (one per VM)".into(),
                ));
            }
            let id = vsock
                .id
                .clone()
                .unwrap_or_else(|| crate::config::placement::VSOCK_ID.to_string());
            if taken.contains(&id) {
                return Err(VmmError::InvalidConfig(format!(
                    "a device with id {id} exists already"
                )));
            }
            vsock.id = Some(id.clone());
            next.vsock = Some(vsock.clone());
            (id, Planned::Vsock(vsock))
        }
    };
    next.validate()
        .map_err(|e| VmmError::InvalidConfig(e.to_string()))?;
    Ok(HotplugPlan {
        config: next,
        id,
        device: Some(device),
        passed_fd,
    })
}

/// Builds the planned device and hot-plugs it into `vm`; returns its device number. Host
/// resources are opened first (the image, TAP, pmem file, vsock socket, vhost-user backend),
/// so a request that cannot work fails before the VM changes.
pub fn attach(vm: &mut Vm, plan: &mut HotplugPlan) -> Result<u8, AttachError> {
    let Some(device) = plan.device.take() else {
        return Err(VmError::Device(format!("{}: already attached", plan.id)).into());
    };
    let id = plan.id.clone();
    let (device_manager, vm_fd, memory) = vm.hotplug_parts();
    let handle = match device {
        Planned::Disk(disk) => crate::vm::new_disk(&disk, &id, false)?,
        Planned::Net(net) => crate::vm::new_net(&net, &id)?,
        Planned::Pmem(pmem) => {
            // Its region needs guest physical space and a KVM slot besides the PCI function.
            let backing = crate::vm::open_pmem(&pmem, &id)?;
            return Ok(device_manager.hotplug_pmem(vm_fd, id, backing)?);
        }
        // The backend gets the guest memory table when the guest's driver activates the device.
        Planned::Fs(fs) => crate::vm::new_fs(&fs, &id, memory)?,
        Planned::Vsock(vsock) => crate::vm::new_vsock(&vsock, &id)?,
    };
    Ok(device_manager.hotplug_virtio_device(vm_fd, id, handle)?)
}

/// Takes device `id` out of `config` after pinning every device where it sits
/// (`placement`: the running VM's; None before boot, when nothing is placed yet).
pub fn forget(
    config: &mut VmConfig,
    id: &str,
    placement: Option<&BTreeMap<String, u8>>,
) -> Result<(), String> {
    // Default ids are positional: pin them before a removal shifts the list.
    config.pin_devices(placement.unwrap_or(&BTreeMap::new()));
    let named = |own: &Option<String>| own.as_deref() == Some(id);
    let mut found = false;
    for list in [&mut config.disks] {
        if let Some(list) = list.as_mut() {
            let before = list.len();
            list.retain(|d| !named(&d.id));
            found |= list.len() != before;
        }
    }
    if let Some(list) = config.net.as_mut() {
        let before = list.len();
        list.retain(|d| !named(&d.id));
        found |= list.len() != before;
    }
    if let Some(list) = config.pmem.as_mut() {
        let before = list.len();
        list.retain(|d| !named(&d.id));
        found |= list.len() != before;
    }
    if let Some(list) = config.fs.as_mut() {
        let before = list.len();
        list.retain(|d| !named(&d.id));
        found |= list.len() != before;
    }
    if config.vsock.as_ref().is_some_and(|v| named(&v.id)) {
        config.vsock = None;
        found = true;
    }
    if found {
        Ok(())
    } else {
        Err(format!(
            "device {id} cannot be removed (the console and the entropy device stay)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::PmemConfig;

    fn status_of(e: AttachError) -> &'static str {
        match e.into_vmm_error("vm.add-pmem") {
            VmmError::InvalidConfig(_) => "400",
            VmmError::Failed { .. } => "500",
            _ => "other",
        }
    }

    #[test]
    fn pmem_fs_and_vsock_are_planned_for_a_running_vm_and_a_second_vsock_is_refused() {
        let config = VmConfig {
            payload: Some(crate::config::PayloadConfig {
                kernel: Some(PathBuf::from("/vmlinux")),
                ..Default::default()
            }),
            ..VmConfig::default()
        };
        let plan = plan_add(&config, HotplugRequest::Pmem(PmemConfig::new("/p.img"))).unwrap();
        assert_eq!(plan.id, "_pmem0");
        assert!(matches!(plan.device, Some(Planned::Pmem(_))));
        let plan = plan_add(
            &config,
            HotplugRequest::Vsock(VsockConfig::new(3, "/run/v.sock")),
        )
        .unwrap();
        assert_eq!(plan.id, "_vsock0");
        assert!(matches!(plan.device, Some(Planned::Vsock(_))));
        let e = plan_add(
            &plan.config,
            HotplugRequest::Vsock(VsockConfig::new(4, "/run/w.sock")),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("one per VM"), "{e}");
        // virtio-fs needs shared memory, as at vm.create.
        let e = plan_add(
            &config,
            HotplugRequest::Fs(FsConfig::new("myfs", "/run/fs.sock")),
        )
        .err()
        .unwrap();
        assert!(matches!(e, VmmError::InvalidConfig(_)), "{e}");
        assert!(e.to_string().contains("memory.shared"), "{e}");
    }

    #[test]
    fn what_the_request_must_change_is_a_400_the_rest_a_500() {
        let path = PathBuf::from("/p.img");
        let pmem = |source| {
            AttachError::Device(VmError::Pmem {
                field: "pmem.size",
                id: "_pmem0".into(),
                source,
            })
        };
        let small = pmem(PmemError::FileTooSmall {
            path: path.clone(),
            file_size: 2 << 20,
            size: 4 << 20,
        });
        assert!(small
            .to_string()
            .contains("smaller than the requested size"));
        assert_eq!(status_of(small), "400");
        assert_eq!(
            status_of(pmem(PmemError::Sync {
                path,
                source: std::io::Error::other("EIO"),
            })),
            "500"
        );
        assert_eq!(
            status_of(AttachError::Placement(DeviceManagerError::PmemNoRoom {
                id: "_pmem0".into(),
                size: 1 << 40,
                start: 0,
                limit: 1 << 39,
            })),
            "400"
        );
        assert_eq!(
            status_of(AttachError::Placement(DeviceManagerError::TooManyDevices)),
            "500"
        );
    }
}
