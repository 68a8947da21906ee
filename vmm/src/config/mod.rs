// SPDX-License-Identifier: Apache-2.0

//! VM configuration.
//!
//! The field names, enum spellings and defaults follow Cloud Hypervisor's
//! `VmConfig` JSON (its OpenAPI specification and `vm_config.rs`, as of
//! [`crate::control::CLOUD_HYPERVISOR_VERSION`]) so that a `vm.create` body
//! written for Cloud Hypervisor, or Cloud Hypervisor's own `vm.info`,
//! deserializes here unchanged. Every member parses; a value that changes
//! nothing Tandem lacks (a default, `null`, `false`, an empty list) is
//! accepted, and `VmConfig::validate` names the field and the value as soon as
//! one asks for something Tandem does not do. Keys Cloud Hypervisor does not
//! have are refused (`deny_unknown_fields`), so a typo is never ignored.

use std::path::PathBuf;

pub(crate) mod devices;
mod localize;
pub mod placement;
mod platform;
pub use devices::*;
pub use localize::{HostResources, LocalizeError};
use platform::non_empty;
pub use platform::*;

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

/// The full configuration of one VM: every member of Cloud Hypervisor's `VmConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub payload: Option<PayloadConfig>,
    #[serde(default)]
    pub rate_limit_groups: Option<Vec<RateLimitGroupConfig>>,
    #[serde(default)]
    pub disks: Option<Vec<DiskConfig>>,
    #[serde(default)]
    pub net: Option<Vec<NetConfig>>,
    #[serde(default)]
    pub rng: RngConfig,
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    /// Spelled `generic-vhost-user` in Cloud Hypervisor 53's specification.
    #[serde(default, alias = "generic-vhost-user")]
    pub generic_vhost_user: Option<Vec<GenericVhostUserConfig>>,
    #[serde(default)]
    pub fs: Option<Vec<FsConfig>>,
    #[serde(default)]
    pub pmem: Option<Vec<PmemConfig>>,
    #[serde(default = "ConsoleConfig::default_serial")]
    pub serial: ConsoleConfig,
    #[serde(default = "ConsoleConfig::default_console")]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub debug_console: DebugConsoleConfig,
    #[serde(default)]
    pub devices: Option<Vec<VfioDeviceConfig>>,
    #[serde(default)]
    pub user_devices: Option<Vec<UserDeviceConfig>>,
    #[serde(default)]
    pub vdpa: Option<Vec<VdpaConfig>>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub pvmemcontrol: Option<PvmemcontrolConfig>,
    #[serde(default)]
    pub pvpanic: bool,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub numa: Option<Vec<NumaConfig>>,
    #[serde(default)]
    pub watchdog: bool,
    #[serde(default)]
    pub rtc: Option<RtcConfig>,
    #[serde(default)]
    pub gdb: bool,
    #[serde(default)]
    pub pci_segments: Option<Vec<PciSegmentConfig>>,
    #[serde(default)]
    pub platform: Option<PlatformConfig>,
    #[serde(default)]
    pub tpm: Option<TpmConfig>,
    #[serde(default)]
    pub landlock_enable: bool,
    #[serde(default)]
    pub landlock_rules: Option<Vec<LandlockConfig>>,
    #[serde(default)]
    pub ivshmem: Option<IvshmemConfig>,
    /// Older specifications only (Cloud Hypervisor dropped SGX); left out when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sgx_epc: Option<Vec<SgxEpcConfig>>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: None,
            rate_limit_groups: None,
            disks: None,
            net: None,
            rng: RngConfig::default(),
            balloon: None,
            generic_vhost_user: None,
            fs: None,
            pmem: None,
            serial: ConsoleConfig::default_serial(),
            console: ConsoleConfig::default_console(),
            debug_console: DebugConsoleConfig::default(),
            devices: None,
            user_devices: None,
            vdpa: None,
            vsock: None,
            pvmemcontrol: None,
            pvpanic: false,
            iommu: false,
            numa: None,
            watchdog: false,
            rtc: None,
            gdb: false,
            pci_segments: None,
            platform: None,
            tpm: None,
            landlock_enable: false,
            landlock_rules: None,
            ivshmem: None,
            sgx_epc: None,
        }
    }
}

/// Cloud Hypervisor's default entropy source.
pub const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";

/// The device id the entropy device always has here (as in Cloud Hypervisor).
pub const RNG_ID: &str = "_rng";

/// The device id the virtio console always has here (as in Cloud Hypervisor).
pub const CONSOLE_ID: &str = "__console";

/// The virtio-rng device (`--rng`); present by default, as in Cloud Hypervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    pub src: PathBuf,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
}

impl Default for RngConfig {
    fn default() -> Self {
        Self {
            src: PathBuf::from(DEFAULT_RNG_SOURCE),
            iommu: false,
            id: None,
            pci_segment: 0,
            pci_device_id: None,
        }
    }
}

/// `cpus.topology`: how `max_vcpus` splits into threads, cores, dies and packages.
///
/// Accepted when the parts multiply to `cpus.max_vcpus` (each at least 1), echoed by
/// `vm.info`, and otherwise not presented: the guest always sees every vCPU as a core of its
/// own (one thread per core) in one die of one package, with APIC ID = vCPU index (CPUID
/// leaves 0x1, 0x4, 0xb and 0x1f, and the MP/ACPI tables, say so). For the topology
/// orchestrators send (`threads_per_core=1, dies_per_package=1, packages=1,
/// cores_per_die=max_vcpus`) that is exactly what they asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTopology {
    pub threads_per_core: u16,
    pub cores_per_die: u16,
    pub dies_per_package: u16,
    pub packages: u16,
}

impl CpuTopology {
    /// The number of logical CPUs it describes.
    pub fn cpu_count(&self) -> u64 {
        [
            self.threads_per_core,
            self.cores_per_die,
            self.dies_per_package,
            self.packages,
        ]
        .iter()
        .map(|&n| u64::from(n))
        .product()
    }
}

/// One `cpus.affinity` entry: host CPUs a vCPU thread may run on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuAffinity {
    pub vcpu: u32,
    pub host_cpus: Vec<usize>,
}

/// `cpus.features`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFeatures {
    #[serde(default)]
    pub amx: bool,
}

/// `cpus.core_scheduling`: Linux core-scheduling cookies for the vCPU threads. Tandem sets
/// none; `Vm` (the default) and `Off` are accepted, `Vcpu` is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoreScheduling {
    #[default]
    Vm,
    Vcpu,
    Off,
}

/// `cpus.profile`: the CPU model presented; the host's is the only one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuProfile {
    #[default]
    Host,
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
    /// Whether the guest may use the host's virtualization extensions. They are passed
    /// through as KVM reports them; hiding them (`false`) is not supported yet.
    #[serde(default = "default_true")]
    pub nested: bool,
    #[serde(default)]
    pub core_scheduling: CoreScheduling,
    #[serde(default)]
    pub profile: CpuProfile,
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
            nested: true,
            core_scheduling: CoreScheduling::Vm,
            profile: CpuProfile::Host,
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
    /// Room reserved for memory a later `vm.resize` would add. Accepted (orchestrators
    /// always send it) and echoed; the guest sees only `size`, and a resize that asks for
    /// more memory is refused because Tandem does not hot-plug memory yet.
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
    #[serde(default)]
    pub reserve: bool,
    #[serde(default)]
    pub zones: Option<Vec<MemoryZoneConfig>>,
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
            reserve: false,
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
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub igvm: Option<PathBuf>,
    /// SEV-SNP host data (64 hex digits).
    #[serde(default)]
    pub host_data: Option<String>,
    /// Cloud Hypervisor's fw_cfg device (not in its API specification, but in its
    /// `vm.info` when built with it); only `null` is accepted, so the raw JSON is enough.
    #[serde(default)]
    pub fw_cfg_config: Option<serde_json::Value>,
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

/// `serial` and `console`. Cloud Hypervisor's `SerialConfig` has only `file`, `mode` and
/// `socket`; the PCI members (`iommu`, `id`, `pci_segment`, `pci_device_id`) belong to the
/// virtio console and are accepted on `serial` at their defaults, as older specifications
/// used one schema for both.
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
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default)]
    pub pci_device_id: Option<u8>,
}

impl ConsoleConfig {
    /// A console in `mode` with no path and no iommu.
    pub fn with_mode(mode: ConsoleOutputMode) -> Self {
        Self {
            file: None,
            mode,
            iommu: false,
            socket: None,
            id: None,
            pci_segment: 0,
            pci_device_id: None,
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
    #[error(
        "cpus.topology: threads_per_core ({threads}) * cores_per_die ({cores}) * \
         dies_per_package ({dies}) * packages ({packages}) = {total}, but cpus.max_vcpus is \
         {max_vcpus}; each part must be at least 1 and the product must equal max_vcpus"
    )]
    InconsistentTopology {
        threads: u16,
        cores: u16,
        dies: u16,
        packages: u16,
        total: u64,
        max_vcpus: u8,
    },
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

/// `cpus.affinity`: each vCPU named once and below `max_vcpus`, each with host CPUs this host
/// has (a vCPU thread pinned to a CPU that does not exist could never be placed).
fn validate_affinity(cpus: &CpusConfig) -> Result<(), ValidationError> {
    let Some(entries) = &cpus.affinity else {
        return Ok(());
    };
    let invalid = |why: String| ValidationError::Invalid {
        field: "cpus.affinity",
        why,
    };
    let host_cpus = host_cpu_count();
    let mut seen = std::collections::BTreeSet::new();
    for entry in entries {
        if entry.vcpu >= u32::from(cpus.max_vcpus) {
            return Err(invalid(format!(
                "vCPU {} is not below max_vcpus ({})",
                entry.vcpu, cpus.max_vcpus
            )));
        }
        if !seen.insert(entry.vcpu) {
            return Err(invalid(format!("vCPU {} is named twice", entry.vcpu)));
        }
        if entry.host_cpus.is_empty() {
            return Err(invalid(format!("vCPU {} has no host CPU", entry.vcpu)));
        }
        if let Some(cpu) = entry.host_cpus.iter().find(|&&cpu| cpu >= host_cpus) {
            return Err(invalid(format!(
                "vCPU {} names host CPU {cpu}, but this host has CPUs 0-{}",
                entry.vcpu,
                host_cpus - 1
            )));
        }
    }
    Ok(())
}

/// The CPUs this host has (online or not), at most what a CPU set holds.
fn host_cpu_count() -> usize {
    // SAFETY: sysconf reads a system value and has no memory effects.
    let configured = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(configured)
        .unwrap_or(1)
        .clamp(1, libc::CPU_SETSIZE as usize)
}

impl CpusConfig {
    /// The host CPUs of vCPU `index` (`cpus.affinity`); empty: the vCPU may run anywhere.
    pub fn host_cpus_of(&self, index: u32) -> Vec<usize> {
        self.affinity
            .iter()
            .flatten()
            .find(|entry| entry.vcpu == index)
            .map(|entry| entry.host_cpus.clone())
            .unwrap_or_default()
    }
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
        self.refuse_unsupported_memory_backing()?;
        self.validate_payload()?;
        self.validate_devices()?;
        self.validate_pci_placement()?;
        self.refuse_unwired_devices()?;
        self.refuse_absent_features()?;
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
        validate_fixed_id("rng.id", &self.rng.id, RNG_ID)?;
        devices::validate_pci_common(
            &devices::pci_fields!("rng"),
            self.rng.iommu,
            self.rng.pci_segment,
            self.rng.pci_device_id,
        )?;
        self.debug_console.validate()?;
        Ok(())
    }

    /// Devices that are parsed and checked (their own `validate`) but not built yet. Lift an
    /// entry here when its device is wired into the VM.
    fn refuse_unwired_devices(&self) -> Result<(), ValidationError> {
        Ok(())
    }

    /// Guest-memory backings: private, shared (memfd) and hugetlbfs memory are offered; huge
    /// pages only in the sizes x86_64 has and for a whole number of pages. Whether the host
    /// has the pages free is checked when the memory is made (`memory::Backing`).
    fn refuse_unsupported_memory_backing(&self) -> Result<(), ValidationError> {
        let memory = &self.memory;
        let invalid = |field, why| Err(ValidationError::Invalid { field, why });
        if let Some(size) = memory.hugepage_size {
            // Cloud Hypervisor refuses a page size without huge pages too.
            if !memory.hugepages {
                return invalid(
                    "memory.hugepage_size",
                    format!("hugepage_size={size} needs hugepages=on"),
                );
            }
            if size != 2 << 20 && size != 1 << 30 {
                return invalid(
                    "memory.hugepage_size",
                    format!("{size} is not a huge page size of x86_64 (2 MiB or 1 GiB)"),
                );
            }
        }
        // Without hugepage_size the host's default applies: at least 2 MiB on x86_64 (the
        // memory code checks the actual default).
        let page = memory.hugepage_size.unwrap_or(2 << 20);
        if memory.hugepages && memory.size & (page - 1) != 0 {
            return invalid(
                "memory.size",
                format!(
                    "{} is not a multiple of the huge page size {page}",
                    memory.size
                ),
            );
        }
        Ok(())
    }

    /// Members that ask for a device or feature Tandem does not have; their defaults are
    /// accepted.
    fn refuse_absent_features(&self) -> Result<(), ValidationError> {
        let absent = [
            ("balloon", self.balloon.is_some(), "a virtio-balloon device"),
            (
                "generic_vhost_user",
                non_empty(&self.generic_vhost_user),
                "generic vhost-user",
            ),
            ("devices", non_empty(&self.devices), "VFIO passthrough"),
            ("user_devices", non_empty(&self.user_devices), "vfio-user"),
            ("vdpa", non_empty(&self.vdpa), "vDPA"),
            (
                "pvmemcontrol",
                self.pvmemcontrol.is_some(),
                "a pvmemcontrol device",
            ),
            ("pvpanic", self.pvpanic, "a pvpanic device (pvpanic=true)"),
            ("iommu", self.iommu, "a virtual IOMMU (iommu=true)"),
            ("numa", non_empty(&self.numa), "a guest NUMA topology"),
            (
                "watchdog",
                self.watchdog,
                "a watchdog device (watchdog=true)",
            ),
            ("rtc", self.rtc.is_some(), "a PCI RTC device"),
            ("gdb", self.gdb, "the gdb stub (gdb=true)"),
            (
                "pci_segments",
                non_empty(&self.pci_segments),
                "weighting PCI segment apertures",
            ),
            ("tpm", self.tpm.is_some(), "a TPM device"),
            (
                "landlock_enable",
                self.landlock_enable,
                "Landlock sandboxing (landlock_enable=true)",
            ),
            (
                "landlock_rules",
                non_empty(&self.landlock_rules),
                "Landlock",
            ),
            ("ivshmem", self.ivshmem.is_some(), "an ivshmem device"),
            ("sgx_epc", non_empty(&self.sgx_epc), "SGX enclave memory"),
            (
                "rate_limit_groups",
                non_empty(&self.rate_limit_groups),
                "I/O rate limiting",
            ),
        ];
        if let Some((field, _, what)) = absent.into_iter().find(|(_, asked, _)| *asked) {
            return Err(unsupported(field, what));
        }
        if let Some(platform) = &self.platform {
            platform.validate()?;
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
        if let Some(t) = &cpus.topology {
            let total = t.cpu_count();
            if total != u64::from(cpus.max_vcpus) {
                return Err(ValidationError::InconsistentTopology {
                    threads: t.threads_per_core,
                    cores: t.cores_per_die,
                    dies: t.dies_per_package,
                    packages: t.packages,
                    total,
                    max_vcpus: cpus.max_vcpus,
                });
            }
        }
        if cpus.kvm_hyperv {
            return Err(unsupported(
                "cpus.kvm_hyperv",
                "Hyper-V emulation (kvm_hyperv=true)",
            ));
        }
        if cpus.max_phys_bits != DEFAULT_MAX_PHYS_BITS {
            return Err(unsupported(
                "cpus.max_phys_bits",
                format!(
                    "max_phys_bits={} (only {DEFAULT_MAX_PHYS_BITS})",
                    cpus.max_phys_bits
                ),
            ));
        }
        validate_affinity(cpus)?;
        if cpus.features.amx {
            return Err(unsupported("cpus.features", "AMX (amx=true)"));
        }
        if !cpus.nested {
            return Err(unsupported(
                "cpus.nested",
                "hiding virtualization extensions (nested=false)",
            ));
        }
        if cpus.core_scheduling == CoreScheduling::Vcpu {
            return Err(unsupported(
                "cpus.core_scheduling",
                "per-vCPU core scheduling (Vcpu)",
            ));
        }
        Ok(())
    }

    fn validate_memory(&self) -> Result<(), ValidationError> {
        let memory = &self.memory;
        // Before the size: with zones, `size` is 0 and the zones are what matters.
        if non_empty(&memory.zones) {
            return Err(unsupported("memory.zones", "splitting memory into zones"));
        }
        if memory.size < MIN_MEMORY_SIZE {
            return Err(ValidationError::MemoryTooSmall { size: memory.size });
        }
        // A mask rather than `is_multiple_of`, which is newer than the
        // workspace's minimum Rust version; the alignment is a power of two.
        if memory.size & (MEMORY_ALIGNMENT - 1) != 0 {
            return Err(ValidationError::MemoryNotAligned { size: memory.size });
        }
        if memory.mergeable {
            return Err(unsupported(
                "memory.mergeable",
                "KSM-mergeable memory (mergeable=true)",
            ));
        }
        if memory.prefault {
            return Err(unsupported(
                "memory.prefault",
                "prefaulting guest memory (prefault=true)",
            ));
        }
        if memory.reserve {
            return Err(unsupported(
                "memory.reserve",
                "reserving swap for guest memory (reserve=true)",
            ));
        }
        if let Some(size) = memory.hotplugged_size.filter(|&size| size != 0) {
            return Err(unsupported(
                "memory.hotplugged_size",
                format!("memory hot-plugged at boot (hotplugged_size={size})"),
            ));
        }
        if memory.hotplug_method == HotplugMethod::VirtioMem && memory.hotplug_size.is_some() {
            return Err(unsupported(
                "memory.hotplug_method",
                "a virtio-mem device (VirtioMem)",
            ));
        }
        Ok(())
    }

    fn validate_devices(&self) -> Result<(), ValidationError> {
        let mut ids = std::collections::BTreeSet::new();
        let mut claim = |field: &'static str, id: &Option<String>| match id {
            Some(id) if !ids.insert(id.clone()) => Err(ValidationError::DuplicateId {
                field,
                id: id.clone(),
            }),
            _ => Ok(()),
        };
        for disk in self.disks.iter().flatten() {
            disk.validate()?;
            claim("disks.id", &disk.id)?;
        }
        for net in self.net.iter().flatten() {
            net.validate()?;
            claim("net.id", &net.id)?;
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
            claim("vsock.id", &vsock.id)?;
        }
        for pmem in self.pmem.iter().flatten() {
            pmem.validate()?;
            claim("pmem.id", &pmem.id)?;
        }
        for fs in self.fs.iter().flatten() {
            fs.validate()?;
            if fs.num_queues > usize::from(self.cpus.boot_vcpus) {
                return Err(ValidationError::Invalid {
                    field: "fs.num_queues",
                    why: format!(
                        "{} request queues for {} boot vCPUs (at most one per vCPU)",
                        fs.num_queues, self.cpus.boot_vcpus
                    ),
                });
            }
            claim("fs.id", &fs.id)?;
        }
        // As Cloud Hypervisor: a vhost-user backend maps guest RAM, so it must be a shared
        // (memfd or hugetlbfs) mapping.
        if non_empty(&self.fs) && !self.memory.shared && !self.memory.hugepages {
            return Err(ValidationError::Invalid {
                field: "memory.shared",
                why: "virtio-fs (fs) is served by a vhost-user backend, which must map guest \
                      memory: set shared=on (or hugepages=on)"
                    .into(),
            });
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
        if let Some(igvm) = &payload.igvm {
            return Err(unsupported(
                "payload.igvm",
                format!("IGVM payloads ({})", igvm.display()),
            ));
        }
        if payload.host_data.is_some() {
            return Err(unsupported("payload.host_data", "SEV-SNP host data"));
        }
        if payload.fw_cfg_config.is_some() {
            return Err(unsupported("payload.fw_cfg_config", "the fw_cfg device"));
        }
        match &payload.kernel {
            Some(kernel) if !kernel.as_os_str().is_empty() => Ok(()),
            _ => Err(ValidationError::KernelMissing),
        }
    }
}

/// A device whose id is fixed here: none (the default) or that id.
fn validate_fixed_id(
    field: &'static str,
    id: &Option<String>,
    fixed: &str,
) -> Result<(), ValidationError> {
    match id {
        Some(id) if id != fixed => Err(unsupported(
            field,
            format!("naming this device (\"{id}\"; it is always \"{fixed}\")"),
        )),
        _ => Ok(()),
    }
}

/// The JSON names of one console's fields, so errors name the right one.
struct ConsoleFields {
    mode: &'static str,
    file: &'static str,
    socket: &'static str,
    id: &'static str,
    /// The device id it always has here (Cloud Hypervisor's).
    fixed_id: &'static str,
    pci: devices::PciFields,
}

const SERIAL_FIELDS: ConsoleFields = ConsoleFields {
    mode: "serial.mode",
    file: "serial.file",
    socket: "serial.socket",
    id: "serial.id",
    fixed_id: "__serial",
    pci: devices::pci_fields!("serial"),
};

const CONSOLE_FIELDS: ConsoleFields = ConsoleFields {
    mode: "console.mode",
    file: "console.file",
    socket: "console.socket",
    id: "console.id",
    fixed_id: CONSOLE_ID,
    pci: devices::pci_fields!("console"),
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
    validate_fixed_id(fields.id, &config.id, fields.fixed_id)?;
    devices::validate_pci_common(
        &fields.pci,
        config.iommu,
        config.pci_segment,
        config.pci_device_id,
    )
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
            ..ConsoleConfig::with_mode(ConsoleOutputMode::File)
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
            ("memory.mergeable", Box::new(|c| c.memory.mergeable = true)),
            ("memory.prefault", Box::new(|c| c.memory.prefault = true)),
            ("memory.reserve", Box::new(|c| c.memory.reserve = true)),
            (
                "memory.hotplugged_size",
                Box::new(|c| c.memory.hotplugged_size = Some(1 << 30)),
            ),
            (
                "memory.hotplug_method",
                Box::new(|c| {
                    c.memory.hotplug_method = HotplugMethod::VirtioMem;
                    c.memory.hotplug_size = Some(1 << 30);
                }),
            ),
            (
                "memory.zones",
                Box::new(|c| {
                    c.memory.zones = Some(vec![serde_json::from_value(
                        serde_json::json!({"id": "mem0", "size": 1u64 << 30}),
                    )
                    .unwrap()])
                }),
            ),
            ("cpus.kvm_hyperv", Box::new(|c| c.cpus.kvm_hyperv = true)),
            (
                "cpus.max_phys_bits",
                Box::new(|c| c.cpus.max_phys_bits = 40),
            ),
            ("cpus.features", Box::new(|c| c.cpus.features.amx = true)),
            ("cpus.nested", Box::new(|c| c.cpus.nested = false)),
            (
                "cpus.core_scheduling",
                Box::new(|c| c.cpus.core_scheduling = CoreScheduling::Vcpu),
            ),
            (
                "payload.igvm",
                Box::new(|c| {
                    if let Some(p) = c.payload.as_mut() {
                        p.igvm = Some(PathBuf::from("/x.igvm"));
                    }
                }),
            ),
            (
                "payload.host_data",
                Box::new(|c| {
                    if let Some(p) = c.payload.as_mut() {
                        p.host_data = Some("00".into());
                    }
                }),
            ),
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
    fn vcpu_affinity_names_vcpus_and_host_cpus_that_exist() {
        let pin = |vcpu, host_cpus: Vec<usize>| CpuAffinity { vcpu, host_cpus };
        let mut config = bootable();
        config.cpus.boot_vcpus = 2;
        config.cpus.max_vcpus = 2;
        config.cpus.affinity = Some(vec![pin(0, vec![0]), pin(1, vec![0])]);
        config.validate().unwrap();
        assert_eq!(config.cpus.host_cpus_of(1), vec![0]);
        assert!(config.cpus.host_cpus_of(5).is_empty());
        let cases = [
            (vec![pin(2, vec![0])], "vCPU 2 is not below max_vcpus (2)"),
            (
                vec![pin(0, vec![0]), pin(0, vec![0])],
                "vCPU 0 is named twice",
            ),
            (vec![pin(1, vec![])], "vCPU 1 has no host CPU"),
            (vec![pin(0, vec![usize::MAX])], "names host CPU"),
        ];
        for (affinity, why) in cases {
            config.cpus.affinity = Some(affinity);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.starts_with("cpus.affinity: "), "{err}");
            assert!(err.contains(why), "{err}");
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
            serde_json::json!({"src": "/dev/urandom", "iommu": false, "id": null,
                               "pci_segment": 0, "pci_device_id": null})
        );
        let parsed: VmConfig = serde_json::from_str(r#"{"rng": {"src": "/dev/random"}}"#).unwrap();
        assert_eq!(parsed.rng.src, PathBuf::from("/dev/random"));
        assert!(serde_json::from_str::<VmConfig>(r#"{"rng": {"src": "/x", "bogus": 1}}"#).is_err());

        let mut config = bootable();
        config.rng.iommu = true;
        let err = config.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "rng.iommu: a virtual IOMMU (iommu=true) is not supported yet"
        );
        config.rng = RngConfig {
            src: PathBuf::new(),
            ..RngConfig::default()
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

    /// Every member of Cloud Hypervisor's `VmConfig` at the value that asks for nothing
    /// Tandem lacks: it all parses, and validates.
    fn cloud_hypervisor_defaults_json() -> serde_json::Value {
        serde_json::json!({
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "topology": null, "kvm_hyperv": false,
                     "max_phys_bits": 46, "affinity": [], "features": {"amx": false},
                     "nested": true, "core_scheduling": "Vm", "profile": "Host"},
            "memory": {"size": 1073741824u64, "mergeable": false, "hotplug_method": "Acpi",
                       "hotplug_size": null, "hotplugged_size": 0, "shared": false,
                       "hugepages": false, "hugepage_size": null, "prefault": false,
                       "reserve": false, "zones": [], "thp": true},
            "payload": {"firmware": null, "kernel": "/k", "cmdline": "console=hvc0",
                        "initramfs": null, "igvm": null, "host_data": null,
                        "fw_cfg_config": null},
            "rate_limit_groups": [],
            "disks": [{"path": "/d.img", "readonly": false, "direct": false, "iommu": false,
                       "num_queues": 1, "queue_size": 128, "vhost_user": false,
                       "vhost_socket": null, "rate_limiter_config": null, "pci_segment": 0,
                       "pci_device_id": null, "id": "_disk0", "serial": "s1",
                       "rate_limit_group": null, "queue_affinity": [], "backing_files": false,
                       "sparse": true, "image_type": "Raw", "lock_granularity": "ByteRange",
                       "disable_io_uring": false, "disable_aio": false}],
            "net": [{"tap": "tap0", "ip": "192.168.249.1", "mask": "255.255.255.0",
                     "mac": "12:34:56:78:9a:bc", "host_mac": null, "mtu": 1500,
                     "iommu": false, "num_queues": 2, "queue_size": 256, "vhost_user": false,
                     "vhost_socket": null, "vhost_mode": "Client", "id": "_net1",
                     "fds": null, "rate_limiter_config": null, "pci_segment": 0,
                     "pci_device_id": null, "offload_tso": true, "offload_ufo": true,
                     "offload_csum": true}],
            "rng": {"src": "/dev/urandom", "iommu": false, "id": null, "pci_segment": 0,
                    "pci_device_id": null},
            "balloon": null, "generic_vhost_user": [], "fs": [], "pmem": [],
            "serial": {"file": null, "socket": null, "mode": "Null"},
            "console": {"file": null, "socket": null, "mode": "Off", "iommu": false,
                        "id": null, "pci_segment": 0, "pci_device_id": null},
            "debug_console": {"file": null, "mode": "Off", "iobase": 233},
            "devices": [], "user_devices": [], "vdpa": [], "vsock": null,
            "pvmemcontrol": null, "pvpanic": false, "iommu": false, "numa": [],
            "watchdog": false, "rtc": null, "gdb": false, "pci_segments": [],
            "platform": {"num_pci_segments": 2, "iommu_segments": [],
                         "iommu_address_width_bits": 64, "system_serial_number": null,
                         "system_uuid": null, "oem_strings": [], "tdx": false,
                         "sev_snp": false, "iommufd": false, "vfio_p2p_dma": true},
            "tpm": null, "landlock_enable": false, "landlock_rules": [], "ivshmem": null,
            "sgx_epc": []
        })
    }

    #[test]
    fn every_cloud_hypervisor_member_parses_and_defaults_validate() {
        let config: VmConfig = serde_json::from_value(cloud_hypervisor_defaults_json()).unwrap();
        config.validate().unwrap();
        let platform = config.platform.as_ref().unwrap();
        assert_eq!(platform.num_pci_segments, 2);
        assert_eq!(config.disks.as_ref().unwrap()[0].image_type, ImageType::Raw);
        // An unknown key is refused at every new level too.
        for (pointer, member) in [
            ("", "bogus"),
            ("/platform", "bogus"),
            ("/debug_console", "bogus"),
            ("/disks/0", "bogus"),
            ("/net/0", "bogus"),
            ("/rng", "bogus"),
        ] {
            let mut json = cloud_hypervisor_defaults_json();
            json.pointer_mut(pointer)
                .and_then(|v| v.as_object_mut())
                .unwrap()
                .insert(member.into(), serde_json::json!(1));
            let err = serde_json::from_value::<VmConfig>(json).unwrap_err();
            assert!(
                err.to_string().contains("unknown field `bogus`"),
                "{pointer}: {err}"
            );
        }
    }

    #[test]
    fn each_member_asking_for_more_is_named() {
        let cases: &[(&str, serde_json::Value, &str)] = &[
            ("/balloon", serde_json::json!({"size": 0}), "balloon"),
            ("/pvpanic", serde_json::json!(true), "pvpanic"),
            ("/iommu", serde_json::json!(true), "iommu"),
            ("/watchdog", serde_json::json!(true), "watchdog"),
            ("/gdb", serde_json::json!(true), "gdb"),
            (
                "/landlock_enable",
                serde_json::json!(true),
                "landlock_enable",
            ),
            ("/tpm", serde_json::json!({"socket": "/tpm.sock"}), "tpm"),
            ("/rtc", serde_json::json!({}), "rtc"),
            ("/pvmemcontrol", serde_json::json!({}), "pvmemcontrol"),
            ("/numa", serde_json::json!([{"guest_numa_id": 0}]), "numa"),
            (
                "/vdpa",
                serde_json::json!([{"path": "/dev/vhost-vdpa-0"}]),
                "vdpa",
            ),
            (
                "/devices",
                serde_json::json!([{"path": "/sys/bus/pci/x"}]),
                "devices",
            ),
            (
                "/user_devices",
                serde_json::json!([{"socket": "/u"}]),
                "user_devices",
            ),
            (
                "/generic_vhost_user",
                serde_json::json!([{"socket": "/g", "queue_sizes": [256], "device_type": 2}]),
                "generic_vhost_user",
            ),
            (
                "/ivshmem",
                serde_json::json!({"path": "/dev/shm/x", "size": 1048576}),
                "ivshmem",
            ),
            (
                "/pci_segments",
                serde_json::json!([{"pci_segment": 1}]),
                "pci_segments",
            ),
            (
                "/landlock_rules",
                serde_json::json!([{"path": "/", "access": "r"}]),
                "landlock_rules",
            ),
            (
                "/sgx_epc",
                serde_json::json!([{"id": "e", "size": 1}]),
                "sgx_epc",
            ),
            (
                "/rate_limit_groups",
                serde_json::json!([{"id": "g", "rate_limiter_config": {}}]),
                "rate_limit_groups",
            ),
            (
                "/debug_console/mode",
                serde_json::json!("Tty"),
                "debug_console.mode",
            ),
            (
                "/disks/0/image_type",
                serde_json::json!("Qcow2"),
                "disks.image_type",
            ),
            (
                "/disks/0/pci_segment",
                serde_json::json!(1),
                "disks.pci_segment",
            ),
            (
                "/disks/0/rate_limiter_config",
                serde_json::json!({"ops": {"size": 10, "refill_time": 100}}),
                "disks.rate_limiter_config",
            ),
            (
                "/disks/0/queue_affinity",
                serde_json::json!([{"queue_index": 0, "host_cpus": [1]}]),
                "disks.queue_affinity",
            ),
            ("/net/0/iommu", serde_json::json!(true), "net.iommu"),
            ("/rng/id", serde_json::json!("myrng"), "rng.id"),
            (
                "/console/pci_segment",
                serde_json::json!(1),
                "console.pci_segment",
            ),
            ("/platform/tdx", serde_json::json!(true), "platform.tdx"),
            (
                "/payload/firmware",
                serde_json::json!("/fw"),
                "payload.firmware",
            ),
            (
                "/payload/fw_cfg_config",
                serde_json::json!({}),
                "payload.fw_cfg_config",
            ),
        ];
        for (pointer, value, field) in cases {
            let mut json = cloud_hypervisor_defaults_json();
            *json.pointer_mut(pointer).unwrap() = value.clone();
            let config: VmConfig = serde_json::from_value(json).unwrap();
            let err = config.validate().unwrap_err();
            assert!(
                matches!(&err, ValidationError::Unsupported { field: f, .. } if f == field),
                "{pointer}: {err}"
            );
        }
    }

    #[test]
    fn not_yet_wired_devices_are_refused_by_name_after_their_own_checks() {
        let mut config = bootable();
        // vsock and pmem are wired: accepted once their own checks pass.
        config.vsock = Some(VsockConfig::new(3, "/run/vsock.sock"));
        config.validate().unwrap();
        config.vsock = Some(VsockConfig::new(2, "/run/vsock.sock"));
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("vsock.cid: 2 is reserved"));
        config.vsock = None;
        config.pmem = Some(vec![PmemConfig::new("/img")]);
        config.validate().unwrap();
        config.pmem = Some(vec![PmemConfig {
            size: Some(1 << 20),
            ..PmemConfig::new("/img")
        }]);
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("pmem.size"));
        config.pmem = Some(Vec::new());
        config.fs = Some(vec![FsConfig::new("myfs", "/run/fs.sock")]);
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("memory.shared: virtio-fs (fs) is served by a vhost-user backend"));
        config.memory.shared = true;
        config.validate().unwrap();
        config.fs = Some(vec![FsConfig {
            pci_segment: 1,
            ..FsConfig::new("myfs", "/run/fs.sock")
        }]);
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "fs.pci_segment: PCI segment 1 (devices sit on segment 0) is not supported yet"
        );
        config.fs = Some(vec![FsConfig::new("", "/run/fs.sock")]);
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("fs.tag"));
        config.fs = Some(Vec::new());
        config.validate().unwrap();
    }

    #[test]
    fn memory_backings_are_accepted_and_odd_hugepages_refused() {
        type Change = Box<dyn Fn(&mut MemoryConfig)>;
        let accepted: [Change; 4] = [
            Box::new(|m| m.shared = true),
            Box::new(|m| m.hugepages = true),
            Box::new(|m| {
                m.hugepages = true;
                m.hugepage_size = Some(2 << 20);
            }),
            Box::new(|m| {
                m.size = 2 << 30;
                m.hugepages = true;
                m.shared = true;
                m.hugepage_size = Some(1 << 30);
            }),
        ];
        for change in accepted {
            let mut config = bootable();
            change(&mut config.memory);
            config.validate().unwrap();
        }
        let refused: [(Change, &str); 4] = [
            (
                Box::new(|m| m.hugepage_size = Some(2 << 20)),
                "memory.hugepage_size: hugepage_size=2097152 needs hugepages=on",
            ),
            (
                Box::new(|m| {
                    m.hugepages = true;
                    m.hugepage_size = Some(4 << 20);
                }),
                "memory.hugepage_size: 4194304 is not a huge page size of x86_64 (2 MiB or 1 GiB)",
            ),
            (
                Box::new(|m| {
                    m.size = (64 << 20) + 4096;
                    m.hugepages = true;
                }),
                "memory.size: 67112960 is not a multiple of the huge page size 2097152",
            ),
            (
                Box::new(|m| {
                    m.size = 1536 << 20;
                    m.hugepages = true;
                    m.hugepage_size = Some(1 << 30);
                }),
                "memory.size: 1610612736 is not a multiple of the huge page size 1073741824",
            ),
        ];
        for (change, message) in refused {
            let mut config = bootable();
            change(&mut config.memory);
            assert_eq!(config.validate().unwrap_err().to_string(), message);
        }
        let mut config = bootable();
        config.memory.hotplug_size = Some(8 << 30);
        config.memory.hotplugged_size = Some(0);
        config.validate().unwrap();
    }

    #[test]
    fn topology_must_multiply_to_max_vcpus() {
        let mut config = bootable();
        config.cpus.boot_vcpus = 2;
        config.cpus.max_vcpus = 8;
        let topology = |t, c, d, p| CpuTopology {
            threads_per_core: t,
            cores_per_die: c,
            dies_per_package: d,
            packages: p,
        };
        for ok in [
            topology(1, 8, 1, 1),
            topology(2, 2, 1, 2),
            topology(1, 4, 2, 1),
        ] {
            config.cpus.topology = Some(ok);
            config.validate().unwrap();
        }
        for bad in [
            topology(1, 4, 1, 1),
            topology(0, 8, 1, 1),
            topology(2, 8, 1, 1),
        ] {
            config.cpus.topology = Some(bad);
            let err = config.validate().unwrap_err();
            assert!(
                matches!(
                    err,
                    ValidationError::InconsistentTopology { max_vcpus: 8, .. }
                ),
                "{err}"
            );
            assert!(err.to_string().starts_with("cpus.topology: "), "{err}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    /// A configuration with as many members away from their defaults as the types allow.
    fn busy_config() -> VmConfig {
        let mut json = cloud_hypervisor_defaults_json();
        let set = |json: &mut serde_json::Value, pointer: &str, value: serde_json::Value| {
            *json.pointer_mut(pointer).unwrap() = value;
        };
        set(&mut json, "/cpus/max_vcpus", serde_json::json!(4));
        set(
            &mut json,
            "/cpus/topology",
            serde_json::json!({"threads_per_core": 1, "cores_per_die": 4,
                               "dies_per_package": 1, "packages": 1}),
        );
        set(&mut json, "/cpus/core_scheduling", serde_json::json!("Off"));
        set(
            &mut json,
            "/memory/hotplug_size",
            serde_json::json!(4u64 << 30),
        );
        set(&mut json, "/memory/thp", serde_json::json!(false));
        set(&mut json, "/payload/initramfs", serde_json::json!("/i"));
        set(&mut json, "/disks/0/readonly", serde_json::json!(true));
        set(&mut json, "/disks/0/sparse", serde_json::json!(false));
        set(
            &mut json,
            "/disks/0/lock_granularity",
            serde_json::json!("Full"),
        );
        set(
            &mut json,
            "/disks/0/disable_io_uring",
            serde_json::json!(true),
        );
        set(&mut json, "/net/0/vhost_mode", serde_json::json!("Server"));
        set(&mut json, "/net/0/offload_tso", serde_json::json!(false));
        set(
            &mut json,
            "/serial",
            serde_json::json!({"mode": "File", "file": "/s.log"}),
        );
        set(
            &mut json,
            "/console",
            serde_json::json!({"mode": "Pty", "file": "/dev/pts/3"}),
        );
        set(&mut json, "/debug_console/mode", serde_json::json!("Null"));
        set(
            &mut json,
            "/platform",
            serde_json::json!({"num_pci_segments": 2, "iommu_address_width": 48,
                               "vfio_p2p_dma": false}),
        );
        set(
            &mut json,
            "/vsock",
            serde_json::json!({"cid": 3, "socket": "/v.sock", "id": "vsock0"}),
        );
        set(
            &mut json,
            "/pmem",
            serde_json::json!([{"file": "/p.img", "size": 2097152, "discard_writes": true}]),
        );
        set(
            &mut json,
            "/fs",
            serde_json::json!([{"tag": "t", "socket": "/fs.sock", "num_queues": 1,
                                "queue_size": 1024}]),
        );
        set(
            &mut json,
            "/balloon",
            serde_json::json!({"size": 0, "free_page_reporting": true}),
        );
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn vm_info_round_trips_into_vm_create() {
        let config = busy_config();
        let info = crate::control::VmInfoResponse {
            memory_actual_size: config.memory.size,
            config: config.clone(),
            state: crate::control::VmState::Running,
            device_tree: Some(Default::default()),
        };
        // What a client reads from vm.info and sends back to vm.create.
        let text = serde_json::to_string(&info).unwrap();
        let read: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(read["memory_actual_size"], 1u64 << 30);
        let back: VmConfig = serde_json::from_value(read["config"].clone()).unwrap();
        assert_eq!(back, config);
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&config).unwrap()
        );
        // And so does the default.
        let default: VmConfig =
            serde_json::from_str(&serde_json::to_string(&bootable()).unwrap()).unwrap();
        assert_eq!(default, bootable());
    }

    /// `vm.create` as Kata Containers' `clh.go` sends it through the generated client: every
    /// member the client's constructors default, the CPU topology, two PCI segments, hotplug
    /// room, a vsock for the agent. Older Kata booted the rootfs image from virtio-pmem, newer
    /// Kata from a read-only disk.
    fn kata_body(pmem_rootfs: bool, virtio_fs: bool) -> serde_json::Value {
        let image = "/opt/kata/share/kata-containers/kata-containers.img";
        let mut body = serde_json::json!({
            "payload": {"kernel": "/opt/kata/share/kata-containers/vmlinux.container",
                        "cmdline": "root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro \
                                    rootfstype=ext4 console=hvc0 console=hvc1 quiet \
                                    systemd.show_status=false panic=1 nr_cpus=4 selinux=0"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 4, "kvm_hyperv": false, "nested": true,
                     "topology": {"threads_per_core": 1, "cores_per_die": 4,
                                  "dies_per_package": 1, "packages": 1}},
            "memory": {"size": 2147483648u64, "mergeable": false, "hotplug_method": "Acpi",
                       "shared": virtio_fs, "hugepages": false, "prefault": false,
                       "thp": true, "hotplug_size": 25769803776u64},
            "rng": {"src": "/dev/urandom", "iommu": false},
            "serial": {"mode": "Off", "iommu": false},
            "console": {"mode": "Off", "iommu": false},
            "iommu": false, "watchdog": false, "pvpanic": false, "landlock_enable": false,
            "platform": {"num_pci_segments": 2, "tdx": false, "sev_snp": false},
            "vsock": {"cid": 3, "socket": "/run/vc/vm/0123/clh.sock", "iommu": false}
        });
        if pmem_rootfs {
            body["pmem"] = serde_json::json!([{"file": image, "iommu": false,
                                               "discard_writes": true}]);
        } else {
            body["disks"] = serde_json::json!([{"path": image, "readonly": true,
                "direct": false, "iommu": false, "num_queues": 1, "queue_size": 128,
                "vhost_user": false, "backing_files": false, "sparse": true,
                "image_type": "Raw"}]);
        }
        if virtio_fs {
            body["fs"] = serde_json::json!([{"tag": "kataShared",
                "socket": "/run/vc/vm/0123/vhost-fs.sock", "num_queues": 1,
                "queue_size": 1024, "pci_segment": 1}]);
        }
        body
    }

    #[test]
    fn kata_bodies_parse_and_only_unwired_devices_are_refused() {
        for (pmem_rootfs, virtio_fs, refused) in [
            (false, false, &[][..]),
            (true, false, &[][..]),
            (false, true, &["fs.pci_segment"][..]),
        ] {
            let mut config: VmConfig =
                serde_json::from_value(kata_body(pmem_rootfs, virtio_fs)).unwrap();
            let mut named = Vec::new();
            // Take away whatever is refused, one at a time, until the rest validates.
            while let Err(err) = config.validate() {
                let ValidationError::Unsupported { field, .. } = err else {
                    panic!("{pmem_rootfs} {virtio_fs}: {err}");
                };
                assert!(err.to_string().ends_with("is not supported yet"), "{err}");
                named.push(field);
                match field {
                    "vsock" => config.vsock = None,
                    "pmem" => config.pmem = None,
                    "fs" | "fs.pci_segment" => config.fs = None,
                    _ => panic!("unexpected refusal: {err}"),
                }
            }
            named.sort_unstable();
            let mut expected = refused.to_vec();
            expected.sort_unstable();
            assert_eq!(named, expected, "pmem {pmem_rootfs}, virtio-fs {virtio_fs}");
        }
    }
}
