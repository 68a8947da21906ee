//! Disk and network device configuration, with Cloud Hypervisor's JSON field names and
//! defaults (`--disk`, `--net`, and the `disks`/`net` arrays of `vm.create`).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{unsupported, ValidationError};

/// Cloud Hypervisor's defaults.
pub const DEFAULT_DISK_NUM_QUEUES: usize = 1;
pub const DEFAULT_DISK_QUEUE_SIZE: u16 = 128;
pub const DEFAULT_NET_NUM_QUEUES: usize = 2;
pub const DEFAULT_NET_QUEUE_SIZE: u16 = 256;
pub const DEFAULT_NET_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 249, 1);
pub const DEFAULT_NET_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// Largest virtqueue the virtio specification allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

fn default_disk_num_queues() -> usize {
    DEFAULT_DISK_NUM_QUEUES
}
fn default_disk_queue_size() -> u16 {
    DEFAULT_DISK_QUEUE_SIZE
}
fn default_net_num_queues() -> usize {
    DEFAULT_NET_NUM_QUEUES
}
fn default_net_queue_size() -> u16 {
    DEFAULT_NET_QUEUE_SIZE
}
fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default = "default_disk_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_disk_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub vhost_user: bool,
    #[serde(default)]
    pub vhost_socket: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub serial: Option<String>,
}

impl DiskConfig {
    pub fn with_path(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Some(path.into()),
            readonly: false,
            direct: false,
            iommu: false,
            num_queues: DEFAULT_DISK_NUM_QUEUES,
            queue_size: DEFAULT_DISK_QUEUE_SIZE,
            vhost_user: false,
            vhost_socket: None,
            id: None,
            pci_segment: 0,
            serial: None,
        }
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        match &self.path {
            Some(path) if !path.as_os_str().is_empty() => {}
            _ => {
                return Err(ValidationError::Invalid {
                    field: "disks.path",
                    why: "a disk image path is required".into(),
                })
            }
        }
        validate_queue_size("disks.queue_size", self.queue_size)?;
        if self.num_queues != 1 {
            return Err(unsupported("disks.num_queues", "more than one queue"));
        }
        if self.iommu {
            return Err(unsupported("disks.iommu", "an IOMMU"));
        }
        if self.vhost_user || self.vhost_socket.is_some() {
            return Err(unsupported("disks.vhost_user", "vhost-user disks"));
        }
        if self.pci_segment != 0 {
            return Err(unsupported("disks.pci_segment", "PCI segments"));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing (or to-be-created) TAP by name; none: the VMM creates `vmtapN`.
    #[serde(default)]
    pub tap: Option<String>,
    /// Host-side address of the TAP. When the VMM creates the TAP (no `tap`), Cloud
    /// Hypervisor's 192.168.249.1/24 applies if none is given; a named TAP (often a bridge
    /// port) gets an address only when one is given.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub mask: Option<Ipv4Addr>,
    /// The guest's MAC, `12:34:56:78:9a:bc`; none: a random locally administered one.
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub host_mac: Option<String>,
    #[serde(default)]
    pub mtu: Option<u16>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default = "default_net_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_net_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub vhost_user: bool,
    #[serde(default)]
    pub vhost_socket: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub fds: Option<Vec<i32>>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default = "default_true")]
    pub offload_tso: bool,
    #[serde(default = "default_true")]
    pub offload_ufo: bool,
    #[serde(default = "default_true")]
    pub offload_csum: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            tap: None,
            ip: None,
            mask: None,
            mac: None,
            host_mac: None,
            mtu: None,
            iommu: false,
            num_queues: DEFAULT_NET_NUM_QUEUES,
            queue_size: DEFAULT_NET_QUEUE_SIZE,
            vhost_user: false,
            vhost_socket: None,
            id: None,
            fds: None,
            pci_segment: 0,
            offload_tso: true,
            offload_ufo: true,
            offload_csum: true,
        }
    }
}

/// Checks the `aa:bb:cc:dd:ee:ff` shape (six hex octets).
pub fn is_valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl NetConfig {
    /// The TAP's host-side address and mask as the VMM applies them (see `ip`).
    pub fn host_address(&self) -> (Option<Ipv4Addr>, Option<Ipv4Addr>) {
        if self.tap.is_some() {
            (self.ip, self.mask)
        } else {
            (
                Some(self.ip.unwrap_or(DEFAULT_NET_IP)),
                Some(self.mask.unwrap_or(DEFAULT_NET_MASK)),
            )
        }
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(mac) = &self.mac {
            if !is_valid_mac(mac) {
                return Err(ValidationError::Invalid {
                    field: "net.mac",
                    why: format!("\"{mac}\" is not a MAC address like 12:34:56:78:9a:bc"),
                });
            }
        }
        if let Some(tap) = &self.tap {
            // IFNAMSIZ is 16 including the terminating NUL.
            if tap.is_empty() || tap.len() > 15 || tap.contains(['/', ' ', '\0']) {
                return Err(ValidationError::Invalid {
                    field: "net.tap",
                    why: format!("\"{tap}\" is not a valid interface name"),
                });
            }
        }
        if let Some(mtu) = self.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(ValidationError::Invalid {
                    field: "net.mtu",
                    why: format!("{mtu} is outside 68..65535"),
                });
            }
        }
        validate_queue_size("net.queue_size", self.queue_size)?;
        if self.num_queues != 2 {
            return Err(unsupported(
                "net.num_queues",
                "multiqueue (num_queues other than 2)",
            ));
        }
        if self.host_mac.is_some() {
            return Err(unsupported("net.host_mac", "setting the TAP's MAC"));
        }
        if self.iommu {
            return Err(unsupported("net.iommu", "an IOMMU"));
        }
        if self.vhost_user || self.vhost_socket.is_some() {
            return Err(unsupported("net.vhost_user", "vhost-user networking"));
        }
        if self.fds.is_some() {
            return Err(unsupported("net.fds", "TAP file descriptors passed in"));
        }
        if self.pci_segment != 0 {
            return Err(unsupported("net.pci_segment", "PCI segments"));
        }
        Ok(())
    }
}

fn validate_queue_size(field: &'static str, size: u16) -> Result<(), ValidationError> {
    if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
        return Err(ValidationError::Invalid {
            field,
            why: format!("{size} is not a power of two between 1 and {MAX_QUEUE_SIZE}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_hypervisor_disk_json_parses_with_defaults() {
        let disk: DiskConfig =
            serde_json::from_str(r#"{"path": "/img", "readonly": true}"#).unwrap();
        assert_eq!(disk.queue_size, 128);
        assert_eq!(disk.num_queues, 1);
        disk.validate().unwrap();
        let err =
            serde_json::from_str::<DiskConfig>(r#"{"path": "/img", "bogus": 1}"#).unwrap_err();
        assert!(err.to_string().contains("bogus"));
    }

    #[test]
    fn disk_rules() {
        let mut disk = DiskConfig::with_path("/img");
        disk.queue_size = 100;
        assert!(disk
            .validate()
            .unwrap_err()
            .to_string()
            .contains("disks.queue_size"));
        disk.queue_size = 0;
        assert!(disk.validate().is_err());
        let mut disk = DiskConfig::with_path("");
        assert!(disk
            .validate()
            .unwrap_err()
            .to_string()
            .contains("disks.path"));
        disk.path = Some("/x".into());
        disk.num_queues = 4;
        assert!(disk
            .validate()
            .unwrap_err()
            .to_string()
            .contains("num_queues"));
    }

    #[test]
    fn net_defaults_match_cloud_hypervisor_and_rules_hold() {
        let net: NetConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(
            net.host_address(),
            (Some(DEFAULT_NET_IP), Some(DEFAULT_NET_MASK))
        );
        let named: NetConfig = serde_json::from_str(r#"{"tap": "tap0"}"#).unwrap();
        assert_eq!(named.host_address(), (None, None));
        assert_eq!((net.num_queues, net.queue_size), (2, 256));
        net.validate().unwrap();
        let bad_mac = NetConfig {
            mac: Some("12:34:56:78:9a".into()),
            ..Default::default()
        };
        assert!(bad_mac
            .validate()
            .unwrap_err()
            .to_string()
            .contains("net.mac"));
        let long_tap = NetConfig {
            tap: Some("a-very-long-tap-name".into()),
            ..Default::default()
        };
        assert!(long_tap
            .validate()
            .unwrap_err()
            .to_string()
            .contains("net.tap"));
        assert!(is_valid_mac("12:34:56:78:9A:bc"));
        assert!(!is_valid_mac("12:34:56:78:9a:bcd"));
    }
}
