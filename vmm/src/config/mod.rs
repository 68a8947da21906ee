// SPDX-License-Identifier: Apache-2.0

//! VM configuration.
//!
//! The field names, enum spellings and defaults follow Cloud Hypervisor's
//! `VmConfig` JSON so that a `vm.create` body written for Cloud Hypervisor
//! deserializes here unchanged. Fields Cloud Hypervisor knows but Tandem does
//! not implement yet are still accepted at their default values, so that a
//! full configuration serialized by Cloud Hypervisor is not refused for a
//! field that changes nothing; `VmConfig::validate` rejects them by name as
//! soon as they ask for something other than the default.

use std::path::PathBuf;

mod devices;
mod localize;
pub use devices::*;
pub use localize::{HostResources, LocalizeError};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Cloud Hypervisor's default number of boot (and maximum) vCPUs.
pub const DEFAULT_VCPUS: u8 = 1;

/// Cloud Hypervisor's default guest memory size, in MiB.
pub const DEFAULT_MEMORY_MB: u64 = 512;

/// Cloud Hypervisor's default for `cpus.max_phys_bits`: with PVH boot the
/// guest physical address space is limited to 46 bits even on hosts with
/// 5-level paging.
pub const DEFAULT_MAX_PHYS_BITS: u8 = 46;

/// Smallest guest memory accepted.
///
/// An x86_64 vmlinux is linked to run at 16 MiB (the kernel's default
/// `CONFIG_PHYSICAL_START`), so anything up to 16 MiB cannot even hold the
/// kernel image; another 16 MiB is a floor for the image, its page tables
/// and an initramfs. Smaller sizes are certainly typos (`size=16` meaning 16
/// bytes rather than 16M), and catching them here gives a clear message
/// instead of a guest that dies silently before printing anything.
pub const MIN_MEMORY_SIZE: u64 = 32 << 20;

/// Guest memory is mapped into KVM in whole pages.
pub const MEMORY_ALIGNMENT: u64 = 4 << 10;

/// Largest vCPU count: vCPU ids become xAPIC ids, and xAPIC id 0xff is the
/// broadcast address, so at most 255 ids (0..=254) are usable.
pub const MAX_VCPUS: u8 = 254;

fn default_max_phys_bits() -> u8 {
    DEFAULT_MAX_PHYS_BITS
}

fn default_true() -> bool {
    true
}

/// The full configuration of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub payload: Option<PayloadConfig>,
    #[serde(default = "ConsoleConfig::default_serial")]
    pub serial: ConsoleConfig,
    #[serde(default = "ConsoleConfig::default_console")]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub disks: Option<Vec<DiskConfig>>,
    #[serde(default)]
    pub net: Option<Vec<NetConfig>>,
    #[serde(default)]
    pub rng: RngConfig,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: None,
            serial: ConsoleConfig::default_serial(),
            console: ConsoleConfig::default_console(),
            disks: None,
            net: None,
            rng: RngConfig::default(),
        }
    }
}

/// Cloud Hypervisor's default entropy source.
pub const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";

/// The virtio-rng device (`--rng`); present by default, as in Cloud Hypervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    pub src: PathBuf,
    #[serde(default)]
    pub iommu: bool,
}

impl Default for RngConfig {
    fn default() -> Self {
        Self {
            src: PathBuf::from(DEFAULT_RNG_SOURCE),
            iommu: false,
        }
    }
}

/// `cpus.topology`; accepted so Cloud Hypervisor JSON parses, not supported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTopology {
    pub threads_per_core: u8,
    pub cores_per_die: u8,
    pub dies_per_package: u8,
    pub packages: u8,
}

/// One `cpus.affinity` entry; accepted so Cloud Hypervisor JSON parses, not
/// supported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuAffinity {
    pub vcpu: u8,
    pub host_cpus: Vec<u8>,
}

/// `cpus.features`; accepted so Cloud Hypervisor JSON parses, not supported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFeatures {
    #[serde(default)]
    pub amx: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
    #[serde(default)]
    pub topology: Option<CpuTopology>,
    #[serde(default)]
    pub kvm_hyperv: bool,
    #[serde(default = "default_max_phys_bits")]
    pub max_phys_bits: u8,
    #[serde(default)]
    pub affinity: Option<Vec<CpuAffinity>>,
    #[serde(default)]
    pub features: CpuFeatures,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot_vcpus: DEFAULT_VCPUS,
            max_vcpus: DEFAULT_VCPUS,
            topology: None,
            kvm_hyperv: false,
            max_phys_bits: DEFAULT_MAX_PHYS_BITS,
            affinity: None,
            features: CpuFeatures::default(),
        }
    }
}

/// `memory.hotplug_method`, spelled as Cloud Hypervisor serializes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HotplugMethod {
    #[default]
    Acpi,
    VirtioMem,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
    #[serde(default)]
    pub mergeable: bool,
    #[serde(default)]
    pub hotplug_method: HotplugMethod,
    #[serde(default)]
    pub hotplug_size: Option<u64>,
    #[serde(default)]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default)]
    pub hugepage_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
    /// Memory zones are not modelled yet; any non-null value is rejected by
    /// `validate`, so the raw JSON is enough to name the problem.
    #[serde(default)]
    pub zones: Option<serde_json::Value>,
    /// Transparent huge pages for guest RAM; only a performance hint, so
    /// both values are accepted.
    #[serde(default = "default_true")]
    pub thp: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: DEFAULT_MEMORY_MB << 20,
            mergeable: false,
            hotplug_method: HotplugMethod::Acpi,
            hotplug_size: None,
            hotplugged_size: None,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault: false,
            zones: None,
            thp: true,
        }
    }
}

impl MemoryConfig {
    /// A default memory configuration of `size` bytes.
    pub fn with_size(size: u64) -> Self {
        Self {
            size,
            ..Self::default()
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// Firmware boot is not supported; accepted so Cloud Hypervisor JSON
    /// with `"firmware": null` parses.
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
}

/// Where a serial port or console is connected, spelled as in Cloud
/// Hypervisor's JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

impl ConsoleOutputMode {
    #[cfg(test)]
    fn as_str(self) -> &'static str {
        match self {
            Self::Off => "Off",
            Self::Pty => "Pty",
            Self::Tty => "Tty",
            Self::File => "File",
            Self::Socket => "Socket",
            Self::Null => "Null",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    #[serde(default)]
    pub file: Option<PathBuf>,
    pub mode: ConsoleOutputMode,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

impl ConsoleConfig {
    /// A console in `mode` with no path and no iommu.
    pub fn with_mode(mode: ConsoleOutputMode) -> Self {
        Self {
            file: None,
            mode,
            iommu: false,
            socket: None,
        }
    }

    /// Cloud Hypervisor's default for `serial`: present but discarding output.
    pub fn default_serial() -> Self {
        Self::with_mode(ConsoleOutputMode::Null)
    }

    /// Cloud Hypervisor's default for `console`: the virtio console on the
    /// controlling terminal.
    pub fn default_console() -> Self {
        Self::with_mode(ConsoleOutputMode::Tty)
    }
}

/// A configuration that cannot be booted. Each message is one line naming
/// the offending field.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("cpus.boot_vcpus must be at least 1")]
    NoBootVcpus,
    #[error("cpus.max_vcpus ({max}) must be at least cpus.boot_vcpus ({boot})")]
    MaxBelowBoot { boot: u8, max: u8 },
    #[error("cpus.max_vcpus ({max}) must be at most {MAX_VCPUS}")]
    TooManyVcpus { max: u8 },
    #[error("memory.size ({size} bytes) must be at least {} MiB", MIN_MEMORY_SIZE >> 20)]
    MemoryTooSmall { size: u64 },
    #[error("memory.size ({size} bytes) must be a multiple of 4 KiB")]
    MemoryNotAligned { size: u64 },
    #[error("serial.mode and console.mode cannot both be Tty")]
    DoubleTty,
    #[error("{field} must be set when {mode_field} is {mode}")]
    MissingPath {
        field: &'static str,
        mode_field: &'static str,
        mode: &'static str,
    },
    #[error("payload.kernel is required: a kernel to boot must be given")]
    KernelMissing,
    #[error("{field}: {what} is not supported yet")]
    Unsupported { field: &'static str, what: String },
    #[error("{field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("{field}: id \"{id}\" is used by more than one device")]
    DuplicateId { field: &'static str, id: String },
}

pub(crate) fn unsupported(field: &'static str, what: impl Into<String>) -> ValidationError {
    ValidationError::Unsupported {
        field,
        what: what.into(),
    }
}

impl VmConfig {
    /// Checks that this configuration describes a VM Tandem can boot.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.validate_cpus()?;
        self.validate_memory()?;
        self.validate_payload()?;
        self.validate_devices()?;
        validate_console(&SERIAL_FIELDS, &self.serial)?;
        validate_console(&CONSOLE_FIELDS, &self.console)?;
        if self.serial.mode == ConsoleOutputMode::Tty && self.console.mode == ConsoleOutputMode::Tty
        {
            // Two devices reading the same terminal would steal each
            // other's input; Cloud Hypervisor refuses this too.
            return Err(ValidationError::DoubleTty);
        }
        if self.serial.mode == ConsoleOutputMode::Pty {
            return Err(unsupported("serial.mode", "Pty"));
        }
        if self.rng.src.as_os_str().is_empty() {
            return Err(ValidationError::Invalid {
                field: "rng.src",
                why: "an entropy source path is required".into(),
            });
        }
        if self.rng.iommu {
            return Err(unsupported("rng.iommu", "a virtual IOMMU"));
        }
        Ok(())
    }

    fn validate_cpus(&self) -> Result<(), ValidationError> {
        let cpus = &self.cpus;
        if cpus.boot_vcpus == 0 {
            return Err(ValidationError::NoBootVcpus);
        }
        if cpus.max_vcpus < cpus.boot_vcpus {
            return Err(ValidationError::MaxBelowBoot {
                boot: cpus.boot_vcpus,
                max: cpus.max_vcpus,
            });
        }
        if cpus.max_vcpus > MAX_VCPUS {
            return Err(ValidationError::TooManyVcpus {
                max: cpus.max_vcpus,
            });
        }
        if cpus.topology.is_some() {
            return Err(unsupported("cpus.topology", "a CPU topology"));
        }
        if cpus.kvm_hyperv {
            return Err(unsupported("cpus.kvm_hyperv", "Hyper-V emulation"));
        }
        if cpus.max_phys_bits != DEFAULT_MAX_PHYS_BITS {
            return Err(unsupported(
                "cpus.max_phys_bits",
                format!("a value other than {DEFAULT_MAX_PHYS_BITS}"),
            ));
        }
        if cpus.affinity.is_some() {
            return Err(unsupported("cpus.affinity", "vCPU affinity"));
        }
        if cpus.features.amx {
            return Err(unsupported("cpus.features", "AMX"));
        }
        Ok(())
    }

    fn validate_memory(&self) -> Result<(), ValidationError> {
        let memory = &self.memory;
        if memory.size < MIN_MEMORY_SIZE {
            return Err(ValidationError::MemoryTooSmall { size: memory.size });
        }
        // A mask rather than `is_multiple_of`, which is newer than the
        // workspace's minimum Rust version; the alignment is a power of two.
        if memory.size & (MEMORY_ALIGNMENT - 1) != 0 {
            return Err(ValidationError::MemoryNotAligned { size: memory.size });
        }
        if memory.shared {
            return Err(unsupported("memory.shared", "shared guest memory"));
        }
        if memory.hugepages || memory.hugepage_size.is_some() {
            return Err(unsupported("memory.hugepages", "hugepage-backed memory"));
        }
        if memory.mergeable {
            return Err(unsupported("memory.mergeable", "KSM-mergeable memory"));
        }
        if memory.prefault {
            return Err(unsupported("memory.prefault", "prefaulting guest memory"));
        }
        if memory.hotplug_method != HotplugMethod::Acpi
            || memory.hotplug_size.is_some()
            || memory.hotplugged_size.is_some()
        {
            return Err(unsupported("memory.hotplug_size", "memory hotplug"));
        }
        if memory.zones.is_some() {
            return Err(unsupported("memory.zones", "memory zones"));
        }
        Ok(())
    }

    fn validate_devices(&self) -> Result<(), ValidationError> {
        let mut ids = std::collections::BTreeSet::new();
        for disk in self.disks.iter().flatten() {
            disk.validate()?;
            if let Some(id) = &disk.id {
                if !ids.insert(id.clone()) {
                    return Err(ValidationError::DuplicateId {
                        field: "disks.id",
                        id: id.clone(),
                    });
                }
            }
        }
        for net in self.net.iter().flatten() {
            net.validate()?;
            if let Some(id) = &net.id {
                if !ids.insert(id.clone()) {
                    return Err(ValidationError::DuplicateId {
                        field: "net.id",
                        id: id.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn validate_payload(&self) -> Result<(), ValidationError> {
        let Some(payload) = &self.payload else {
            return Err(ValidationError::KernelMissing);
        };
        if payload.firmware.is_some() {
            return Err(unsupported("payload.firmware", "firmware boot"));
        }
        match &payload.kernel {
            Some(kernel) if !kernel.as_os_str().is_empty() => Ok(()),
            _ => Err(ValidationError::KernelMissing),
        }
    }
}

/// The JSON names of one console's fields, so errors name the right one.
struct ConsoleFields {
    mode: &'static str,
    file: &'static str,
    socket: &'static str,
    iommu: &'static str,
}

const SERIAL_FIELDS: ConsoleFields = ConsoleFields {
    mode: "serial.mode",
    file: "serial.file",
    socket: "serial.socket",
    iommu: "serial.iommu",
};

const CONSOLE_FIELDS: ConsoleFields = ConsoleFields {
    mode: "console.mode",
    file: "console.file",
    socket: "console.socket",
    iommu: "console.iommu",
};

fn validate_console(fields: &ConsoleFields, config: &ConsoleConfig) -> Result<(), ValidationError> {
    let missing = |path: &Option<PathBuf>| path.as_ref().is_none_or(|p| p.as_os_str().is_empty());
    match config.mode {
        ConsoleOutputMode::File if missing(&config.file) => {
            return Err(ValidationError::MissingPath {
                field: fields.file,
                mode_field: fields.mode,
                mode: "File",
            });
        }
        ConsoleOutputMode::Socket if missing(&config.socket) => {
            return Err(ValidationError::MissingPath {
                field: fields.socket,
                mode_field: fields.mode,
                mode: "Socket",
            });
        }
        _ => {}
    }
    if config.iommu {
        return Err(unsupported(fields.iommu, "a virtual IOMMU"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootable() -> VmConfig {
        VmConfig {
            payload: Some(PayloadConfig {
                kernel: Some(PathBuf::from("/boot/vmlinux")),
                ..PayloadConfig::default()
            }),
            ..VmConfig::default()
        }
    }

    #[test]
    fn defaults_match_cloud_hypervisor() {
        let config = VmConfig::default();
        assert_eq!(config.cpus.boot_vcpus, 1);
        assert_eq!(config.cpus.max_vcpus, 1);
        assert_eq!(config.cpus.max_phys_bits, 46);
        assert_eq!(config.memory.size, 512 << 20);
        assert!(config.memory.thp);
        assert!(!config.memory.shared && !config.memory.hugepages);
        assert_eq!(config.serial.mode, ConsoleOutputMode::Null);
        assert_eq!(config.console.mode, ConsoleOutputMode::Tty);
        assert_eq!(config.payload, None);
    }

    #[test]
    fn minimal_json_gets_defaults() {
        let config: VmConfig =
            serde_json::from_str(r#"{"payload": {"kernel": "/path/to/kernel"}}"#).unwrap();
        assert_eq!(config, bootable_with_kernel("/path/to/kernel"));
        config.validate().unwrap();
    }

    fn bootable_with_kernel(kernel: &str) -> VmConfig {
        let mut config = bootable();
        config.payload = Some(PayloadConfig {
            kernel: Some(PathBuf::from(kernel)),
            ..PayloadConfig::default()
        });
        config
    }

    #[test]
    fn cloud_hypervisor_style_json_parses() {
        let json = r#"{
            "cpus": {"boot_vcpus": 2, "max_vcpus": 4, "topology": null, "kvm_hyperv": false,
                     "max_phys_bits": 46, "affinity": null, "features": {"amx": false}},
            "memory": {"size": 1073741824, "mergeable": false, "hotplug_method": "Acpi",
                       "hotplug_size": null, "hotplugged_size": null, "shared": false,
                       "hugepages": false, "hugepage_size": null, "prefault": false,
                       "zones": null, "thp": true},
            "payload": {"firmware": null, "kernel": "/k", "cmdline": "console=ttyS0",
                        "initramfs": "/i"},
            "serial": {"file": null, "mode": "Tty", "iommu": false, "socket": null},
            "console": {"file": null, "mode": "Off", "iommu": false}
        }"#;
        let config: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.cpus.boot_vcpus, 2);
        assert_eq!(config.cpus.max_vcpus, 4);
        assert_eq!(config.memory.size, 1 << 30);
        let payload = config.payload.as_ref().unwrap();
        assert_eq!(payload.cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!(payload.initramfs, Some(PathBuf::from("/i")));
        assert_eq!(config.serial.mode, ConsoleOutputMode::Tty);
        assert_eq!(config.console.mode, ConsoleOutputMode::Off);
        config.validate().unwrap();
    }

    #[test]
    fn json_round_trip() {
        let mut config = bootable();
        config.cpus.boot_vcpus = 3;
        config.cpus.max_vcpus = 8;
        config.memory.size = 2 << 30;
        config.memory.thp = false;
        config.serial = ConsoleConfig {
            file: Some(PathBuf::from("/tmp/serial.log")),
            mode: ConsoleOutputMode::File,
            iommu: false,
            socket: None,
        };
        config.console = ConsoleConfig::with_mode(ConsoleOutputMode::Off);
        if let Some(payload) = config.payload.as_mut() {
            payload.cmdline = Some("console=ttyS0 quiet".to_owned());
            payload.initramfs = Some(PathBuf::from("/boot/initrd"));
        }
        let json = serde_json::to_string(&config).unwrap();
        let back: VmConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);

        let default_json = serde_json::to_string(&VmConfig::default()).unwrap();
        let back: VmConfig = serde_json::from_str(&default_json).unwrap();
        assert_eq!(back, VmConfig::default());
    }

    #[test]
    fn modes_serialize_like_cloud_hypervisor() {
        for (mode, name) in [
            (ConsoleOutputMode::Off, "\"Off\""),
            (ConsoleOutputMode::Pty, "\"Pty\""),
            (ConsoleOutputMode::Tty, "\"Tty\""),
            (ConsoleOutputMode::File, "\"File\""),
            (ConsoleOutputMode::Socket, "\"Socket\""),
            (ConsoleOutputMode::Null, "\"Null\""),
        ] {
            assert_eq!(serde_json::to_string(&mode).unwrap(), name);
            assert_eq!(
                serde_json::from_str::<ConsoleOutputMode>(name).unwrap(),
                mode
            );
            assert_eq!(format!("\"{}\"", mode.as_str()), name);
        }
        assert!(serde_json::from_str::<ConsoleOutputMode>("\"tty\"").is_err());
    }

    #[test]
    fn unknown_fields_rejected_at_every_level() {
        for json in [
            r#"{"payload": {"kernel": "/k"}, "bogus": 1}"#,
            r#"{"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "bogus": 1}}"#,
            r#"{"memory": {"size": 1073741824, "bogus": 1}}"#,
            r#"{"payload": {"kernel": "/k", "bogus": 1}}"#,
            r#"{"serial": {"mode": "Null", "bogus": 1}}"#,
            r#"{"console": {"mode": "Tty", "bogus": 1}}"#,
            r#"{"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "features": {"bogus": true}}}"#,
        ] {
            let err = serde_json::from_str::<VmConfig>(json).unwrap_err();
            assert!(err.to_string().contains("unknown field `bogus`"), "{err}");
        }
    }

    #[test]
    fn required_fields_as_in_cloud_hypervisor() {
        assert!(serde_json::from_str::<VmConfig>(r#"{"memory": {}}"#).is_err());
        assert!(serde_json::from_str::<VmConfig>(r#"{"cpus": {"boot_vcpus": 1}}"#).is_err());
        assert!(serde_json::from_str::<VmConfig>(r#"{"serial": {}}"#).is_err());
        assert_eq!(
            serde_json::from_str::<VmConfig>("{}").unwrap(),
            VmConfig::default()
        );
    }

    #[test]
    fn default_with_kernel_is_valid() {
        bootable().validate().unwrap();
    }

    #[test]
    fn kernel_is_required() {
        assert_eq!(
            VmConfig::default().validate(),
            Err(ValidationError::KernelMissing)
        );
        let mut config = bootable();
        config.payload = Some(PayloadConfig::default());
        assert_eq!(config.validate(), Err(ValidationError::KernelMissing));
        config.payload = Some(PayloadConfig {
            kernel: Some(PathBuf::new()),
            ..PayloadConfig::default()
        });
        assert_eq!(config.validate(), Err(ValidationError::KernelMissing));
    }

    #[test]
    fn vcpu_rules() {
        let mut config = bootable();
        config.cpus.boot_vcpus = 0;
        config.cpus.max_vcpus = 0;
        assert_eq!(config.validate(), Err(ValidationError::NoBootVcpus));

        config.cpus.boot_vcpus = 4;
        config.cpus.max_vcpus = 2;
        let err = config.validate().unwrap_err();
        assert_eq!(err, ValidationError::MaxBelowBoot { boot: 4, max: 2 });
        assert_eq!(
            err.to_string(),
            "cpus.max_vcpus (2) must be at least cpus.boot_vcpus (4)"
        );

        config.cpus.max_vcpus = 255;
        assert_eq!(
            config.validate(),
            Err(ValidationError::TooManyVcpus { max: 255 })
        );
        config.cpus.max_vcpus = 254;
        config.validate().unwrap();
    }

    #[test]
    fn memory_rules() {
        let mut config = bootable();
        config.memory.size = 16 << 20;
        let err = config.validate().unwrap_err();
        assert_eq!(err, ValidationError::MemoryTooSmall { size: 16 << 20 });
        assert!(err.to_string().starts_with("memory.size"));

        config.memory.size = (64 << 20) + 512;
        assert_eq!(
            config.validate(),
            Err(ValidationError::MemoryNotAligned {
                size: (64 << 20) + 512
            })
        );

        config.memory.size = MIN_MEMORY_SIZE;
        config.validate().unwrap();
        config.memory.size = (1 << 30) + 4096;
        config.validate().unwrap();
    }

    type Mutation = Box<dyn Fn(&mut VmConfig)>;

    #[test]
    fn unsupported_memory_and_cpu_features_are_named() {
        let cases: Vec<(&str, Mutation)> = vec![
            ("memory.shared", Box::new(|c| c.memory.shared = true)),
            ("memory.hugepages", Box::new(|c| c.memory.hugepages = true)),
            ("memory.mergeable", Box::new(|c| c.memory.mergeable = true)),
            ("memory.prefault", Box::new(|c| c.memory.prefault = true)),
            (
                "memory.hotplug_size",
                Box::new(|c| c.memory.hotplug_size = Some(1 << 30)),
            ),
            (
                "memory.zones",
                Box::new(|c| c.memory.zones = Some(serde_json::json!([]))),
            ),
            ("cpus.kvm_hyperv", Box::new(|c| c.cpus.kvm_hyperv = true)),
            (
                "cpus.max_phys_bits",
                Box::new(|c| c.cpus.max_phys_bits = 40),
            ),
            (
                "cpus.affinity",
                Box::new(|c| c.cpus.affinity = Some(Vec::new())),
            ),
            (
                "cpus.topology",
                Box::new(|c| {
                    c.cpus.topology = Some(CpuTopology {
                        threads_per_core: 1,
                        cores_per_die: 1,
                        dies_per_package: 1,
                        packages: 1,
                    })
                }),
            ),
            ("cpus.features", Box::new(|c| c.cpus.features.amx = true)),
            (
                "payload.firmware",
                Box::new(|c| {
                    if let Some(p) = c.payload.as_mut() {
                        p.firmware = Some(PathBuf::from("/fw"));
                    }
                }),
            ),
            ("serial.iommu", Box::new(|c| c.serial.iommu = true)),
            (
                "serial.mode",
                Box::new(|c| c.serial.mode = ConsoleOutputMode::Pty),
            ),
        ];
        for (field, change) in cases {
            let mut config = bootable();
            change(&mut config);
            let err = config.validate().unwrap_err();
            assert!(
                matches!(err, ValidationError::Unsupported { field: f, .. } if f == field),
                "{field}: {err}"
            );
            assert!(err.to_string().starts_with(field), "{err}");
            assert!(err.to_string().ends_with("is not supported yet"), "{err}");
        }
    }

    #[test]
    fn both_tty_rejected() {
        let mut config = bootable();
        config.serial.mode = ConsoleOutputMode::Tty;
        assert_eq!(config.validate(), Err(ValidationError::DoubleTty));
        config.console.mode = ConsoleOutputMode::Off;
        config.validate().unwrap();
    }

    #[test]
    fn file_and_socket_modes_need_paths() {
        let mut config = bootable();
        config.serial.mode = ConsoleOutputMode::File;
        let err = config.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "serial.file must be set when serial.mode is File"
        );
        config.serial.file = Some(PathBuf::from("/tmp/out"));
        config.validate().unwrap();

        config.serial = ConsoleConfig::with_mode(ConsoleOutputMode::Socket);
        let err = config.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "serial.socket must be set when serial.mode is Socket"
        );
        config.serial.socket = Some(PathBuf::from("/tmp/serial.sock"));
        config.validate().unwrap();

        config.console = ConsoleConfig::with_mode(ConsoleOutputMode::File);
        let err = config.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "console.file must be set when console.mode is File"
        );
    }

    #[test]
    fn every_console_mode_is_accepted() {
        let mut config = bootable();
        for mode in [
            ConsoleOutputMode::Off,
            ConsoleOutputMode::Null,
            ConsoleOutputMode::Tty,
            ConsoleOutputMode::Pty,
        ] {
            config.console = ConsoleConfig::with_mode(mode);
            config.validate().unwrap();
        }
        config.console = ConsoleConfig::with_mode(ConsoleOutputMode::File);
        config.console.file = Some(PathBuf::from("/tmp/c"));
        config.validate().unwrap();
        config.console = ConsoleConfig::with_mode(ConsoleOutputMode::Socket);
        config.console.socket = Some(PathBuf::from("/tmp/c.sock"));
        config.validate().unwrap();
        config.console.iommu = true;
        assert!(matches!(
            config.validate(),
            Err(ValidationError::Unsupported {
                field: "console.iommu",
                ..
            })
        ));
    }

    #[test]
    fn rng_defaults_and_json_shape_match_cloud_hypervisor() {
        let config = VmConfig::default();
        assert_eq!(config.rng.src, PathBuf::from("/dev/urandom"));
        assert!(!config.rng.iommu);
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(
            json["rng"],
            serde_json::json!({"src": "/dev/urandom", "iommu": false})
        );
        let parsed: VmConfig = serde_json::from_str(r#"{"rng": {"src": "/dev/random"}}"#).unwrap();
        assert_eq!(parsed.rng.src, PathBuf::from("/dev/random"));
        assert!(serde_json::from_str::<VmConfig>(r#"{"rng": {"src": "/x", "bogus": 1}}"#).is_err());

        let mut config = bootable();
        config.rng.iommu = true;
        let err = config.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "rng.iommu: a virtual IOMMU is not supported yet"
        );
        config.rng = RngConfig {
            src: PathBuf::new(),
            iommu: false,
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("rng.src"));
    }

    #[test]
    fn messages_are_one_line() {
        let errors = [
            ValidationError::NoBootVcpus,
            ValidationError::MaxBelowBoot { boot: 2, max: 1 },
            ValidationError::TooManyVcpus { max: 255 },
            ValidationError::MemoryTooSmall { size: 1 },
            ValidationError::MemoryNotAligned { size: 1 },
            ValidationError::DoubleTty,
            ValidationError::KernelMissing,
            unsupported("memory.shared", "shared guest memory"),
        ];
        for err in errors {
            let text = err.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(
                text.starts_with("cpus.")
                    || text.starts_with("memory.")
                    || text.starts_with("serial.")
                    || text.starts_with("payload."),
                "{text}"
            );
        }
    }
}
