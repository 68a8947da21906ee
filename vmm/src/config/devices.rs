//! Device configuration, with Cloud Hypervisor's JSON field names and defaults: disks and
//! NICs (`--disk`, `--net`), the devices being wired next (`--vsock`, `--pmem`, `--fs`), and
//! the device kinds Tandem does not have, typed so that Cloud Hypervisor's bodies parse.
//!
//! Every PCI device of Cloud Hypervisor carries `id`, `iommu`, `pci_segment` and
//! `pci_device_id`; they are spelled out per struct (serde cannot combine a flattened common
//! part with `deny_unknown_fields`) and checked by [`validate_pci_common`].

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::platform::{non_empty, RateLimiterConfig};
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

/// The JSON names of a device's PCI placement fields, so errors name the right one.
pub(crate) struct PciFields {
    pub iommu: &'static str,
    pub pci_segment: &'static str,
    pub pci_device_id: &'static str,
}

/// [`PciFields`] of the device array or object `$device` (`"disks"`, `"vsock"`, ...).
macro_rules! pci_fields {
    ($device:literal) => {
        $crate::config::devices::PciFields {
            iommu: concat!($device, ".iommu"),
            pci_segment: concat!($device, ".pci_segment"),
            pci_device_id: concat!($device, ".pci_device_id"),
        }
    };
}
pub(crate) use pci_fields;

/// The PCI placement fields every device shares: Tandem has no vIOMMU and one PCI segment;
/// `pci_device_id` places a device (see `config::placement`).
pub(crate) fn validate_pci_common(
    fields: &PciFields,
    iommu: bool,
    pci_segment: u16,
    pci_device_id: Option<u8>,
) -> Result<(), ValidationError> {
    if iommu {
        return Err(unsupported(fields.iommu, "a virtual IOMMU (iommu=true)"));
    }
    if pci_segment != 0 {
        return Err(unsupported(
            fields.pci_segment,
            format!("PCI segment {pci_segment} (devices sit on segment 0)"),
        ));
    }
    // Checked with every other device's number (`VmConfig::validate_pci_placement`).
    let _ = (fields.pci_device_id, pci_device_id);
    Ok(())
}

/// `disks.image_type`, spelled as Cloud Hypervisor serializes it. `Unknown` (the default)
/// means "find out from the file"; Tandem reads every image as raw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    FlatVmdk,
    FixedVhd,
    Qcow2,
    Raw,
    Vhdx,
    #[default]
    Unknown,
}

/// `disks.lock_granularity`. Tandem locks a whole image with `flock(2)` either way, so both
/// are accepted; what the guest sees does not depend on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockGranularity {
    #[default]
    ByteRange,
    Full,
}

/// One `disks.queue_affinity` entry: host CPUs for a queue's I/O thread.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtQueueAffinity {
    pub queue_index: u16,
    pub host_cpus: Vec<usize>,
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
    #[serde(default)]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub rate_limit_group: Option<String>,
    #[serde(default)]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    /// Cloud Hypervisor's test switches for its I/O backends; Tandem uses neither io_uring
    /// nor AIO, so both values change nothing.
    #[serde(default)]
    pub disable_io_uring: bool,
    #[serde(default)]
    pub disable_aio: bool,
    #[serde(default)]
    pub queue_affinity: Option<Vec<VirtQueueAffinity>>,
    /// Permission to open a QCOW2 image's backing files; raw images have none.
    #[serde(default)]
    pub backing_files: bool,
    /// Whether discards may punch holes; Tandem offers no discard, so both values are
    /// accepted.
    #[serde(default = "default_true")]
    pub sparse: bool,
    #[serde(default)]
    pub image_type: ImageType,
    #[serde(default)]
    pub lock_granularity: LockGranularity,
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
            pci_device_id: None,
            rate_limit_group: None,
            rate_limiter_config: None,
            disable_io_uring: false,
            disable_aio: false,
            queue_affinity: None,
            backing_files: false,
            sparse: true,
            image_type: ImageType::Unknown,
            lock_granularity: LockGranularity::ByteRange,
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
        validate_pci_common(
            &pci_fields!("disks"),
            self.iommu,
            self.pci_segment,
            self.pci_device_id,
        )?;
        if self.vhost_user || self.vhost_socket.is_some() {
            return Err(unsupported("disks.vhost_user", "vhost-user disks"));
        }
        if !matches!(self.image_type, ImageType::Raw | ImageType::Unknown) {
            return Err(unsupported(
                "disks.image_type",
                format!("{:?} images (raw only)", self.image_type),
            ));
        }
        if self.rate_limit_group.is_some() || self.rate_limiter_config.is_some() {
            return Err(unsupported(
                "disks.rate_limiter_config",
                "I/O rate limiting",
            ));
        }
        if non_empty(&self.queue_affinity) {
            return Err(unsupported(
                "disks.queue_affinity",
                "pinning queue threads to host CPUs",
            ));
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
    /// Offer the guest TCP segments of up to 64 KiB (receive TSO; needs `offload_csum`).
    #[serde(default = "default_true")]
    pub offload_tso: bool,
    /// Accepted for Cloud Hypervisor's sake; UDP fragmentation offload is never offered.
    #[serde(default = "default_true")]
    pub offload_ufo: bool,
    /// Offer the guest frames whose TCP/UDP checksum is left to do (receive checksum offload).
    #[serde(default = "default_true")]
    pub offload_csum: bool,
    /// Only meaningful for vhost-user NICs (refused), so both values are accepted.
    #[serde(default)]
    pub vhost_mode: VhostMode,
    #[serde(default)]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
}

/// `net.vhost_mode`, spelled as Cloud Hypervisor serializes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VhostMode {
    #[default]
    Client,
    Server,
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
            vhost_mode: VhostMode::Client,
            rate_limiter_config: None,
            pci_device_id: None,
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
    /// The TAP descriptors of this NIC (`fds`, an empty list meaning none): numbers of
    /// descriptors open in this VMM process, inherited (`--net fd=N`) or passed with
    /// `vm.add-net`.
    pub fn passed_fds(&self) -> Option<&[i32]> {
        self.fds.as_deref().filter(|fds| !fds.is_empty())
    }

    /// The TAP's host-side address and mask as the VMM applies them (see `ip`). A TAP passed
    /// as a descriptor is its owner's to configure: Cloud Hypervisor ignores `ip` and `mask`
    /// for it, and so does Tandem (its clients send its default address in every body).
    pub fn host_address(&self) -> (Option<Ipv4Addr>, Option<Ipv4Addr>) {
        if self.passed_fds().is_some() {
            (None, None)
        } else if self.tap.is_some() {
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
        validate_pci_common(
            &pci_fields!("net"),
            self.iommu,
            self.pci_segment,
            self.pci_device_id,
        )?;
        if self.vhost_user || self.vhost_socket.is_some() {
            return Err(unsupported("net.vhost_user", "vhost-user networking"));
        }
        if let Some(fds) = self.passed_fds() {
            // As Cloud Hypervisor: one TAP descriptor per queue pair, and never stdio.
            if fds.len() * 2 != self.num_queues {
                return Err(ValidationError::Invalid {
                    field: "net.fds",
                    why: format!(
                        "{} descriptor(s) for num_queues={}: give one TAP descriptor per queue \
                         pair",
                        fds.len(),
                        self.num_queues
                    ),
                });
            }
            if let Some(fd) = fds.iter().find(|&&fd| fd <= 2) {
                return Err(ValidationError::Invalid {
                    field: "net.fds",
                    why: format!("{fd} is a reserved descriptor (0-2 are stdio)"),
                });
            }
            if self.tap.is_some() {
                return Err(ValidationError::Invalid {
                    field: "net.fds",
                    why: "give a TAP by name (tap) or by descriptor (fds), not both".into(),
                });
            }
        }
        if self.rate_limiter_config.is_some() {
            return Err(unsupported("net.rate_limiter_config", "I/O rate limiting"));
        }
        Ok(())
    }
}

/// Cloud Hypervisor's defaults for `fs`.
pub const DEFAULT_FS_NUM_QUEUES: usize = 1;
pub const DEFAULT_FS_QUEUE_SIZE: u16 = 1024;
/// Longest virtio-fs tag (the virtio specification's `tag` field is 36 bytes).
pub const MAX_FS_TAG_LEN: usize = 36;
/// Smallest guest CID; 0-2 are reserved (hypervisor, local, host).
pub const MIN_VSOCK_CID: u32 = 3;
/// virtio-pmem regions are mapped in whole 2 MiB pages.
pub const PMEM_ALIGNMENT: u64 = 2 << 20;

fn default_fs_num_queues() -> usize {
    DEFAULT_FS_NUM_QUEUES
}
fn default_fs_queue_size() -> u16 {
    DEFAULT_FS_QUEUE_SIZE
}

fn require_path(field: &'static str, path: &std::path::Path) -> Result<(), ValidationError> {
    if path.as_os_str().is_empty() {
        return Err(ValidationError::Invalid {
            field,
            why: "a path is required".into(),
        });
    }
    Ok(())
}

/// `vsock` (`--vsock`): a virtio-vsock device whose host side is the Unix socket `socket`
/// (Firecracker's hybrid vsock: a host connection to `socket` sends `CONNECT <port>`, a
/// guest connection to port P reaches `<socket>_P`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub cid: u32,
    pub socket: PathBuf,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub id: Option<String>,
}

impl VsockConfig {
    pub fn new(cid: u32, socket: impl Into<PathBuf>) -> Self {
        Self {
            cid,
            socket: socket.into(),
            iommu: false,
            pci_segment: 0,
            pci_device_id: None,
            id: None,
        }
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.cid < MIN_VSOCK_CID || self.cid == u32::MAX {
            return Err(ValidationError::Invalid {
                field: "vsock.cid",
                why: format!(
                    "{} is reserved: guest CIDs start at {MIN_VSOCK_CID}",
                    self.cid
                ),
            });
        }
        require_path("vsock.socket", &self.socket)?;
        validate_pci_common(
            &pci_fields!("vsock"),
            self.iommu,
            self.pci_segment,
            self.pci_device_id,
        )
    }
}

/// One `pmem` entry (`--pmem`): a virtio-pmem device backed by `file`; `size` defaults to the
/// file's size. `discard_writes` maps the file private, so guest writes never reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemConfig {
    pub file: PathBuf,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub discard_writes: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub id: Option<String>,
}

impl PmemConfig {
    pub fn new(file: impl Into<PathBuf>) -> Self {
        Self {
            file: file.into(),
            size: None,
            iommu: false,
            discard_writes: false,
            pci_segment: 0,
            pci_device_id: None,
            id: None,
        }
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        require_path("pmem.file", &self.file)?;
        if let Some(size) = self.size {
            if size == 0 || size % PMEM_ALIGNMENT != 0 {
                return Err(ValidationError::Invalid {
                    field: "pmem.size",
                    why: format!("{size} bytes is not a non-zero multiple of 2 MiB"),
                });
            }
        }
        validate_pci_common(
            &pci_fields!("pmem"),
            self.iommu,
            self.pci_segment,
            self.pci_device_id,
        )
    }
}

/// One `fs` entry (`--fs`): a virtio-fs device served by the vhost-user daemon at `socket`
/// (virtiofsd), mounted in the guest by `tag`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    pub tag: String,
    pub socket: PathBuf,
    #[serde(default = "default_fs_num_queues")]
    pub num_queues: usize,
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub id: Option<String>,
}

impl FsConfig {
    pub fn new(tag: impl Into<String>, socket: impl Into<PathBuf>) -> Self {
        Self {
            tag: tag.into(),
            socket: socket.into(),
            num_queues: DEFAULT_FS_NUM_QUEUES,
            queue_size: DEFAULT_FS_QUEUE_SIZE,
            pci_segment: 0,
            pci_device_id: None,
            id: None,
        }
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.tag.is_empty() || self.tag.len() > MAX_FS_TAG_LEN {
            return Err(ValidationError::Invalid {
                field: "fs.tag",
                why: format!("\"{}\" must be 1 to {MAX_FS_TAG_LEN} bytes long", self.tag),
            });
        }
        require_path("fs.socket", &self.socket)?;
        if self.num_queues == 0 {
            return Err(ValidationError::Invalid {
                field: "fs.num_queues",
                why: "at least one request queue is needed".into(),
            });
        }
        validate_queue_size("fs.queue_size", self.queue_size)?;
        // No `iommu` member: Cloud Hypervisor's virtio-fs cannot sit behind a vIOMMU.
        validate_pci_common(
            &pci_fields!("fs"),
            false,
            self.pci_segment,
            self.pci_device_id,
        )
    }
}

/// `balloon`: a virtio-balloon device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    pub size: u64,
    #[serde(default)]
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub free_page_reporting: bool,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub id: Option<String>,
}

/// One `generic_vhost_user` entry: any vhost-user device by virtio device type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericVhostUserConfig {
    pub socket: PathBuf,
    pub queue_sizes: Vec<u16>,
    pub device_type: u32,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub id: Option<String>,
}

/// One `devices` entry: a VFIO passthrough device (Cloud Hypervisor's `DeviceConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfioDeviceConfig {
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A descriptor number is meaningless outside the process that opened it.
    #[serde(default)]
    pub fd: Option<i32>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub x_nv_gpudirect_clique: Option<u8>,
    #[serde(default)]
    pub x_exclude_mmap_bars: Vec<u64>,
}

/// One `user_devices` entry: a vfio-user device served at `socket`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDeviceConfig {
    pub socket: PathBuf,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub id: Option<String>,
}

/// One `vdpa` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VdpaConfig {
    pub path: PathBuf,
    #[serde(default = "default_vdpa_num_queues")]
    pub num_queues: usize,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub id: Option<String>,
}

fn default_vdpa_num_queues() -> usize {
    1
}

/// `rtc`: Cloud Hypervisor's optional PCI real-time-clock device (the PC's CMOS clock is
/// always there and is not this).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtcConfig {
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub id: Option<String>,
}

/// `ivshmem`: an inter-VM shared-memory PCI device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IvshmemConfig {
    pub path: PathBuf,
    pub size: usize,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub id: Option<String>,
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
    }

    #[test]
    fn net_fds_follow_cloud_hypervisor_rules() {
        let passed = |fds: Vec<i32>| NetConfig {
            fds: Some(fds),
            ..Default::default()
        };
        passed(vec![3]).validate().unwrap();
        // An empty list is no descriptor at all.
        assert_eq!(passed(vec![]).passed_fds(), None);
        passed(vec![]).validate().unwrap();
        let message = |config: NetConfig| config.validate().unwrap_err().to_string();
        assert_eq!(
            message(passed(vec![3, 4])),
            "net.fds: 2 descriptor(s) for num_queues=2: give one TAP descriptor per queue pair"
        );
        assert!(message(passed(vec![1])).contains("reserved descriptor"));
        assert!(message(NetConfig {
            tap: Some("tap0".into()),
            ..passed(vec![3])
        })
        .contains("not both"));
        // A passed TAP is its owner's to configure: no default address is applied to it.
        let with_ip = NetConfig {
            ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..passed(vec![3])
        };
        assert_eq!(with_ip.host_address(), (None, None));
        assert!(!is_valid_mac("12:34:56:78:9a:bcd"));
    }
}
