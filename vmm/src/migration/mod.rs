//! Byte formats of VM state transfer, independent of KVM: the snapshot directory written by
//! `vm.snapshot` and read by `vm.restore`, and the framed stream used by live migration (and,
//! later, by fault-tolerant epoch replication).
//!
//! Both are generic over the state type (`S: Serialize + DeserializeOwned`): the caller decides
//! what the VM state is; this module decides how it travels, checks it, and never writes
//! anything into a VM before the data it received or read has been verified as far as it can be.

use crate::config::VmConfig;

pub mod live;
pub mod memory;
pub mod protocol;
pub mod receive;
pub mod snapshot;

pub use memory::{DirtyPages, DirtyPagesError, PAGE_SIZE};
pub use protocol::{
    ProtocolError, Receiver, Sender, SenderOptions, TransferStats, PROTOCOL_VERSION,
};
pub use snapshot::{
    parse_file_url, read_snapshot, write_snapshot, MemoryImage, MemoryRange, SnapshotError,
    SNAPSHOT_VERSION,
};

/// Why a VM with this configuration cannot be protected by fault tolerance (yet), or None.
/// Checked by the primary before anything moves and by the backup before it builds a standby
/// VM (which must never bind the primary's vsock socket path).
pub fn ft_refusal(config: &VmConfig) -> Option<String> {
    if let Some(vsock) = &config.vsock {
        return Some(format!(
            "vsock ({}): bytes to the host socket leave the VM at once, past the output gate \
             that holds output until the backup has the epoch, and a backup could not take \
             over the host's connections; fault tolerance is not available for a VM with a \
             vsock device",
            vsock.socket.display()
        ));
    }
    if let Some(pmem) = config.pmem.iter().flatten().next() {
        return Some(format!(
            "pmem ({}): the region's contents are not replicated to the backup yet; fault \
             tolerance is not available for a VM with a pmem device",
            pmem.file.display()
        ));
    }
    None
}

/// Why a VM with this configuration cannot be live-migrated (yet), or None. A writable pmem
/// file travels as a disk image does (shared storage, synced at the final stop); the guest's
/// changes to a `discard_writes` region exist only in this VMM's memory.
pub fn migration_refusal(config: &VmConfig) -> Option<String> {
    config
        .pmem
        .iter()
        .flatten()
        .find(|pmem| pmem.discard_writes)
        .map(|pmem| {
            format!(
                "pmem ({}, discard_writes=on): the guest's changes to the region exist only in \
                 this VMM's memory and live migration does not carry them yet",
                pmem.file.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PmemConfig, VsockConfig};

    #[test]
    fn ft_and_migration_refusals_name_the_device() {
        let mut config = VmConfig::default();
        assert_eq!(ft_refusal(&config), None);
        assert_eq!(migration_refusal(&config), None);
        config.pmem = Some(vec![PmemConfig::new("/img")]);
        assert!(ft_refusal(&config).unwrap().starts_with("pmem (/img)"));
        assert_eq!(migration_refusal(&config), None);
        config.pmem = Some(vec![PmemConfig {
            discard_writes: true,
            ..PmemConfig::new("/img")
        }]);
        assert!(migration_refusal(&config)
            .unwrap()
            .starts_with("pmem (/img, discard_writes=on)"));
        config.vsock = Some(VsockConfig::new(3, "/run/v.sock"));
        assert!(ft_refusal(&config)
            .unwrap()
            .starts_with("vsock (/run/v.sock)"));
    }
}
