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

use crate::config::placement::default_id;
use crate::config::{DiskConfig, NetConfig, VmConfig};
use crate::control::{HotplugRequest, VmmError};
use crate::vm::Vm;

/// A checked hot-plug: the configuration with the device in it, and what to build.
pub struct HotplugPlan {
    pub config: VmConfig,
    pub id: String,
    device: Planned,
    /// A TAP passed with `vm.add-net`: the caller keeps it open while the NIC exists.
    pub passed_fd: Option<OwnedFd>,
}

enum Planned {
    Disk(DiskConfig),
    Net(NetConfig),
    /// Accepted into the configuration of a VM that has not booted; not hot-pluggable.
    ConfigOnly(&'static str),
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
            next.pmem.get_or_insert_with(Vec::new).push(pmem);
            (id, Planned::ConfigOnly("pmem"))
        }
        HotplugRequest::Fs(mut fs) => {
            let id = choose("fs", &fs.id)?;
            fs.id = Some(id.clone());
            next.fs.get_or_insert_with(Vec::new).push(fs);
            (id, Planned::ConfigOnly("virtio-fs"))
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
            next.vsock = Some(vsock);
            (id, Planned::ConfigOnly("vsock"))
        }
    };
    next.validate()
        .map_err(|e| VmmError::InvalidConfig(e.to_string()))?;
    Ok(HotplugPlan {
        config: next,
        id,
        device,
        passed_fd,
    })
}

/// Builds the planned device and hot-plugs it into `vm`; returns its device number.
pub fn attach(vm: &mut Vm, plan: &mut HotplugPlan) -> Result<u8, String> {
    let handle = match std::mem::replace(&mut plan.device, Planned::ConfigOnly("")) {
        Planned::Disk(disk) => {
            crate::vm::new_disk(&disk, &plan.id, false).map_err(|e| e.to_string())?
        }
        Planned::Net(net) => crate::vm::new_net(&net, &plan.id).map_err(|e| e.to_string())?,
        Planned::ConfigOnly(kind) => {
            return Err(format!(
                "hot-plugging {kind} into a running VM is not supported; give it at vm.create \
                 (or add it before vm.boot)"
            ))
        }
    };
    let (device_manager, vm_fd, _) = vm.hotplug_parts();
    device_manager
        .hotplug_virtio_device(vm_fd, plan.id.clone(), handle)
        .map_err(|e| e.to_string())
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
