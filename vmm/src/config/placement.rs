//! Where each virtio device sits on PCI bus 0, as the configuration says it: Cloud
//! Hypervisor's `pci_device_id` on each device.
//!
//! Without any, devices take 00:01.0 upward in Cloud Hypervisor's order. A hot-plug or an
//! unplug breaks that order, so afterwards every device's id and number are written into the
//! configuration ([`VmConfig::pin_devices`]): a VM built from it again (a restore, a migration's
//! destination, a fault-tolerance backup) puts every device where the guest saw it.

use std::collections::BTreeMap;

use super::{ConsoleOutputMode, ValidationError, VmConfig};

/// The id the VM gives the virtio console and the entropy device (Cloud Hypervisor's).
pub const CONSOLE_ID: &str = "__console";
pub const RNG_ID: &str = "_rng";
/// The default id of the vsock device.
pub const VSOCK_ID: &str = "_vsock0";
/// The highest device number on bus 0 (0 is the host bridge).
const MAX_DEVICE_NUMBER: u8 = 31;

/// The id of the `index`th device of a list whose entries may name themselves: Cloud
/// Hypervisor's `_disk0`, `_net1`, ... when they do not.
pub fn default_id(prefix: &str, index: usize, id: &Option<String>) -> String {
    id.clone().unwrap_or_else(|| format!("_{prefix}{index}"))
}

/// One virtio device of the configuration: its id, the JSON field of its number, and the
/// number (None: placed in order).
struct Slot<'a> {
    id: String,
    field: &'static str,
    number: &'a mut Option<u8>,
    /// Its configured id, to pin (None for the console and the entropy device, whose ids are
    /// fixed).
    id_field: Option<&'a mut Option<String>>,
}

impl VmConfig {
    /// Every virtio device, in Cloud Hypervisor's creation order.
    fn slots(&mut self) -> Vec<Slot<'_>> {
        let mut slots = Vec::new();
        if self.console.mode != ConsoleOutputMode::Off {
            slots.push(Slot {
                id: CONSOLE_ID.to_string(),
                field: "console.pci_device_id",
                number: &mut self.console.pci_device_id,
                id_field: None,
            });
        }
        for (index, disk) in self.disks.iter_mut().flatten().enumerate() {
            slots.push(Slot {
                id: default_id("disk", index, &disk.id),
                field: "disks.pci_device_id",
                number: &mut disk.pci_device_id,
                id_field: Some(&mut disk.id),
            });
        }
        for (index, net) in self.net.iter_mut().flatten().enumerate() {
            slots.push(Slot {
                id: default_id("net", index, &net.id),
                field: "net.pci_device_id",
                number: &mut net.pci_device_id,
                id_field: Some(&mut net.id),
            });
        }
        slots.push(Slot {
            id: RNG_ID.to_string(),
            field: "rng.pci_device_id",
            number: &mut self.rng.pci_device_id,
            id_field: None,
        });
        for (index, fs) in self.fs.iter_mut().flatten().enumerate() {
            slots.push(Slot {
                id: default_id("fs", index, &fs.id),
                field: "fs.pci_device_id",
                number: &mut fs.pci_device_id,
                id_field: Some(&mut fs.id),
            });
        }
        for (index, pmem) in self.pmem.iter_mut().flatten().enumerate() {
            slots.push(Slot {
                id: default_id("pmem", index, &pmem.id),
                field: "pmem.pci_device_id",
                number: &mut pmem.pci_device_id,
                id_field: Some(&mut pmem.id),
            });
        }
        if let Some(vsock) = self.vsock.as_mut() {
            slots.push(Slot {
                id: vsock.id.clone().unwrap_or_else(|| VSOCK_ID.to_string()),
                field: "vsock.pci_device_id",
                number: &mut vsock.pci_device_id,
                id_field: Some(&mut vsock.id),
            });
        }
        slots
    }

    /// The devices whose number the configuration fixes, by id.
    pub fn pci_placement(&self) -> BTreeMap<String, u8> {
        let mut config = self.clone();
        config
            .slots()
            .into_iter()
            .filter_map(|slot| slot.number.map(|n| (slot.id, n)))
            .collect()
    }

    /// The ids of every virtio device.
    pub fn device_ids(&self) -> Vec<String> {
        self.clone().slots().into_iter().map(|s| s.id).collect()
    }

    /// Writes each device's id and its number in `placement` (the running VM's) into the
    /// configuration; see the module's comment.
    pub fn pin_devices(&mut self, placement: &BTreeMap<String, u8>) {
        for slot in self.slots() {
            if let Some(&number) = placement.get(&slot.id) {
                *slot.number = Some(number);
            }
            if let Some(id) = slot.id_field {
                *id = Some(slot.id.clone());
            }
        }
    }

    /// `pci_device_id`s are device numbers of bus 0 (1..=31), each used once; the serial port
    /// is not a PCI device.
    pub(crate) fn validate_pci_placement(&self) -> Result<(), ValidationError> {
        if let Some(number) = self.serial.pci_device_id {
            return Err(ValidationError::Invalid {
                field: "serial.pci_device_id",
                why: format!("{number}: the serial port is not a PCI device"),
            });
        }
        let mut config = self.clone();
        let mut taken: BTreeMap<u8, String> = BTreeMap::new();
        for slot in config.slots() {
            let Some(number) = *slot.number else {
                continue;
            };
            if number == 0 || number > MAX_DEVICE_NUMBER {
                return Err(ValidationError::Invalid {
                    field: slot.field,
                    why: format!(
                        "{number}: device numbers of bus 0 go from 1 to {MAX_DEVICE_NUMBER} (0 is the host bridge)"
                    ),
                });
            }
            if let Some(other) = taken.insert(number, slot.id.clone()) {
                return Err(ValidationError::Invalid {
                    field: slot.field,
                    why: format!("{number} is {other}'s too (device {})", slot.id),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> VmConfig {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn pinning_names_and_places_every_device() {
        let mut c = config(serde_json::json!({
            "memory": {"size": 1 << 30},
            "disks": [{"path": "/a"}, {"path": "/b", "id": "data"}],
            "net": [{"tap": "t0"}],
        }));
        assert!(c.pci_placement().is_empty());
        let placement: BTreeMap<String, u8> = [
            ("__console", 1),
            ("_disk0", 2),
            ("data", 5),
            ("_net0", 4),
            ("_rng", 3),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        c.pin_devices(&placement);
        let disks = c.disks.clone().unwrap();
        assert_eq!(disks[0].id.as_deref(), Some("_disk0"));
        assert_eq!(disks[0].pci_device_id, Some(2));
        assert_eq!(disks[1].pci_device_id, Some(5));
        assert_eq!(c.rng.pci_device_id, Some(3));
        assert_eq!(c.pci_placement(), placement);
        c.validate_pci_placement().unwrap();
        // Removing the first disk keeps the others' ids and numbers.
        c.disks.as_mut().unwrap().remove(0);
        assert_eq!(c.pci_placement().get("data"), Some(&5));
        assert!(!c.device_ids().contains(&"_disk0".to_string()));
    }

    #[test]
    fn numbers_are_checked() {
        let mut c = config(serde_json::json!({
            "memory": {"size": 1 << 30},
            "disks": [{"path": "/a", "pci_device_id": 3}, {"path": "/b", "pci_device_id": 3}],
        }));
        let e = c.validate_pci_placement().unwrap_err().to_string();
        assert!(e.contains("disks.pci_device_id") && e.contains("3"), "{e}");
        c.disks.as_mut().unwrap()[1].pci_device_id = Some(0);
        let e = c.validate_pci_placement().unwrap_err().to_string();
        assert!(e.contains("host bridge"), "{e}");
        c.disks.as_mut().unwrap()[1].pci_device_id = Some(32);
        assert!(c.validate_pci_placement().is_err());
        c.disks.as_mut().unwrap()[1].pci_device_id = None;
        c.serial.pci_device_id = Some(4);
        let e = c.validate_pci_placement().unwrap_err().to_string();
        assert!(e.contains("serial.pci_device_id"), "{e}");
    }
}
