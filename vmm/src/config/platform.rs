//! The members of Cloud Hypervisor's `VmConfig` that describe the machine rather than one
//! device: `platform`, `pci_segments`, `numa`, memory zones, rate-limit groups, `tpm`,
//! landlock rules, SGX EPC sections and the debug console. Tandem implements none of them
//! beyond their defaults; they are typed so that a body Cloud Hypervisor accepts parses, and
//! `VmConfig::validate` names whichever one asks for more than the default.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{unsupported, ConsoleOutputMode, ValidationError};

/// Cloud Hypervisor's `platform.num_pci_segments` default.
pub const DEFAULT_NUM_PCI_SEGMENTS: u16 = 1;
/// Cloud Hypervisor's upper bound on `platform.num_pci_segments`.
pub const MAX_NUM_PCI_SEGMENTS: u16 = 96;
/// Cloud Hypervisor's `platform.iommu_address_width_bits` default.
pub const DEFAULT_IOMMU_ADDRESS_WIDTH_BITS: u8 = 64;
/// The I/O port of Cloud Hypervisor's debug console.
pub const DEFAULT_DEBUG_CONSOLE_PORT: u16 = 0xe9;

fn default_num_pci_segments() -> u16 {
    DEFAULT_NUM_PCI_SEGMENTS
}
fn default_iommu_address_width_bits() -> u8 {
    DEFAULT_IOMMU_ADDRESS_WIDTH_BITS
}
fn default_true() -> bool {
    true
}
fn default_aperture_weight() -> u32 {
    1
}

/// `platform`: machine-wide settings (PCI segments, vIOMMU, SMBIOS strings, confidential
/// computing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    /// PCI segments (host bridges). Devices go on segment 0 only; further segments would be
    /// empty, so any count Cloud Hypervisor allows is accepted and the guest sees one.
    #[serde(default = "default_num_pci_segments")]
    pub num_pci_segments: u16,
    #[serde(default)]
    pub iommu_segments: Option<Vec<u16>>,
    /// Only meaningful with a vIOMMU (refused), so any width Cloud Hypervisor allows is
    /// accepted. Older specifications spell it `iommu_address_width`.
    #[serde(
        default = "default_iommu_address_width_bits",
        alias = "iommu_address_width"
    )]
    pub iommu_address_width_bits: u8,
    #[serde(default, alias = "serial_number")]
    pub system_serial_number: Option<String>,
    #[serde(default, alias = "uuid")]
    pub system_uuid: Option<String>,
    #[serde(default)]
    pub oem_strings: Option<Vec<String>>,
    #[serde(default)]
    pub system_manufacturer: Option<String>,
    #[serde(default)]
    pub system_product_name: Option<String>,
    #[serde(default)]
    pub system_version: Option<String>,
    #[serde(default)]
    pub system_family: Option<String>,
    #[serde(default)]
    pub system_sku_number: Option<String>,
    #[serde(default)]
    pub chassis_asset_tag: Option<String>,
    #[serde(default)]
    pub tdx: bool,
    #[serde(default)]
    pub sev_snp: bool,
    #[serde(default)]
    pub iommufd: bool,
    /// A descriptor number is meaningless outside the process that opened it.
    #[serde(default)]
    pub iommufd_fd: Option<i32>,
    /// Peer-to-peer DMA between VFIO devices; there are none, so both values are accepted.
    #[serde(default = "default_true")]
    pub vfio_p2p_dma: bool,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        Self {
            num_pci_segments: DEFAULT_NUM_PCI_SEGMENTS,
            iommu_segments: None,
            iommu_address_width_bits: DEFAULT_IOMMU_ADDRESS_WIDTH_BITS,
            system_serial_number: None,
            system_uuid: None,
            oem_strings: None,
            system_manufacturer: None,
            system_product_name: None,
            system_version: None,
            system_family: None,
            system_sku_number: None,
            chassis_asset_tag: None,
            tdx: false,
            sev_snp: false,
            iommufd: false,
            iommufd_fd: None,
            vfio_p2p_dma: true,
        }
    }
}

/// Whether an optional list asks for anything (`null` and `[]` do not).
pub(crate) fn non_empty<T>(list: &Option<Vec<T>>) -> bool {
    list.as_ref().is_some_and(|l| !l.is_empty())
}

impl PlatformConfig {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !(1..=MAX_NUM_PCI_SEGMENTS).contains(&self.num_pci_segments) {
            return Err(ValidationError::Invalid {
                field: "platform.num_pci_segments",
                why: format!(
                    "{} is outside 1..{MAX_NUM_PCI_SEGMENTS}",
                    self.num_pci_segments
                ),
            });
        }
        if self.iommu_address_width_bits == 0 || self.iommu_address_width_bits > 64 {
            return Err(ValidationError::Invalid {
                field: "platform.iommu_address_width_bits",
                why: format!("{} is outside 1..64", self.iommu_address_width_bits),
            });
        }
        if non_empty(&self.iommu_segments) {
            return Err(unsupported("platform.iommu_segments", "a virtual IOMMU"));
        }
        let smbios = [
            ("platform.system_serial_number", &self.system_serial_number),
            ("platform.system_uuid", &self.system_uuid),
            ("platform.system_manufacturer", &self.system_manufacturer),
            ("platform.system_product_name", &self.system_product_name),
            ("platform.system_version", &self.system_version),
            ("platform.system_family", &self.system_family),
            ("platform.system_sku_number", &self.system_sku_number),
            ("platform.chassis_asset_tag", &self.chassis_asset_tag),
        ];
        for (field, value) in smbios {
            if let Some(value) = value {
                return Err(unsupported(field, format!("SMBIOS (\"{value}\")")));
            }
        }
        if non_empty(&self.oem_strings) {
            return Err(unsupported("platform.oem_strings", "SMBIOS"));
        }
        if self.tdx {
            return Err(unsupported("platform.tdx", "Intel TDX (tdx=true)"));
        }
        if self.sev_snp {
            return Err(unsupported(
                "platform.sev_snp",
                "AMD SEV-SNP (sev_snp=true)",
            ));
        }
        if self.iommufd || self.iommufd_fd.is_some() {
            return Err(unsupported("platform.iommufd", "VFIO through iommufd"));
        }
        Ok(())
    }
}

/// One `pci_segments` entry: how a segment's share of the MMIO apertures is weighted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciSegmentConfig {
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default = "default_aperture_weight")]
    pub mmio32_aperture_weight: u32,
    #[serde(default = "default_aperture_weight")]
    pub mmio64_aperture_weight: u32,
}

/// One `memory.zones` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryZoneConfig {
    pub id: String,
    pub size: u64,
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default)]
    pub hugepage_size: Option<u64>,
    #[serde(default)]
    pub host_numa_node: Option<u32>,
    #[serde(default)]
    pub hotplug_size: Option<u64>,
    #[serde(default)]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub reserve: bool,
    #[serde(default)]
    pub mergeable: bool,
}

/// Cloud Hypervisor's `TokenBucket`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

/// Cloud Hypervisor's `RateLimiterConfig` (a disk's or NIC's, or a group's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default)]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default)]
    pub ops: Option<TokenBucket>,
}

/// One `rate_limit_groups` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitGroupConfig {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub rate_limiter_config: RateLimiterConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumaDistance {
    #[serde(default)]
    pub destination: u32,
    #[serde(default)]
    pub distance: u8,
}

/// One `numa` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumaConfig {
    pub guest_numa_id: u32,
    #[serde(default)]
    pub cpus: Option<Vec<u32>>,
    #[serde(default)]
    pub distances: Option<Vec<NumaDistance>>,
    #[serde(default)]
    pub memory_zones: Option<Vec<String>>,
    #[serde(default)]
    pub pci_segments: Option<Vec<u16>>,
    #[serde(default)]
    pub device_id: Option<String>,
    /// Older specifications (SGX was removed from Cloud Hypervisor later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sgx_epc_sections: Option<Vec<String>>,
}

/// One `sgx_epc` entry of older Cloud Hypervisor specifications.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgxEpcConfig {
    pub id: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub prefault: bool,
}

/// `tpm`: a TPM emulated by swtpm behind `socket`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    pub socket: PathBuf,
}

/// One `landlock_rules` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandlockConfig {
    pub path: PathBuf,
    pub access: String,
}

/// `debug_console`: Cloud Hypervisor's port-0xe9 output device; off by default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugConsoleConfig {
    #[serde(default)]
    pub file: Option<PathBuf>,
    pub mode: ConsoleOutputMode,
    #[serde(default)]
    pub iobase: Option<u16>,
}

impl Default for DebugConsoleConfig {
    fn default() -> Self {
        Self {
            file: None,
            mode: ConsoleOutputMode::Off,
            iobase: Some(DEFAULT_DEBUG_CONSOLE_PORT),
        }
    }
}

impl DebugConsoleConfig {
    /// Off and Null both mean that nothing the guest writes to the port goes anywhere,
    /// which is what the port does here.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self.mode {
            ConsoleOutputMode::Off | ConsoleOutputMode::Null => Ok(()),
            mode => Err(unsupported(
                "debug_console.mode",
                format!("the debug console port (mode {mode:?})"),
            )),
        }
    }
}

/// Parses to an empty object only, so that `{}` is accepted and anything else named.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PvmemcontrolConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_defaults_and_aliases() {
        let p: PlatformConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(p, PlatformConfig::default());
        p.validate().unwrap();
        let p: PlatformConfig = serde_json::from_str(
            r#"{"num_pci_segments": 2, "iommu_address_width": 48, "tdx": false,
                "sev_snp": false, "iommu_segments": []}"#,
        )
        .unwrap();
        assert_eq!(p.iommu_address_width_bits, 48);
        p.validate().unwrap();
        let p: PlatformConfig = serde_json::from_str(r#"{"serial_number": "x"}"#).unwrap();
        assert_eq!(p.system_serial_number.as_deref(), Some("x"));
        let err = p.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("platform.system_serial_number") && err.contains("\"x\""),
            "{err}"
        );
    }

    #[test]
    fn platform_refusals_name_the_field() {
        for (json, field) in [
            (r#"{"num_pci_segments": 0}"#, "platform.num_pci_segments"),
            (r#"{"num_pci_segments": 97}"#, "platform.num_pci_segments"),
            (r#"{"iommu_segments": [0]}"#, "platform.iommu_segments"),
            (r#"{"tdx": true}"#, "platform.tdx"),
            (r#"{"sev_snp": true}"#, "platform.sev_snp"),
            (r#"{"iommufd": true}"#, "platform.iommufd"),
            (r#"{"oem_strings": ["a"]}"#, "platform.oem_strings"),
        ] {
            let p: PlatformConfig = serde_json::from_str(json).unwrap();
            let err = p.validate().unwrap_err().to_string();
            assert!(err.starts_with(field), "{json}: {err}");
        }
    }

    #[test]
    fn debug_console_default_is_off_at_port_0xe9() {
        let d = DebugConsoleConfig::default();
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"file": null, "mode": "Off", "iobase": 233})
        );
        d.validate().unwrap();
        let tty = DebugConsoleConfig {
            mode: ConsoleOutputMode::Tty,
            ..d
        };
        assert!(tty
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("debug_console.mode"));
    }
}
