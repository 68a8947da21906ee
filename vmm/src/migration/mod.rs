//! Byte formats of VM state transfer, independent of KVM: the snapshot directory written by
//! `vm.snapshot` and read by `vm.restore`, and the framed stream used by live migration (and,
//! later, by fault-tolerant epoch replication).
//!
//! Both are generic over the state type (`S: Serialize + DeserializeOwned`): the caller decides
//! what the VM state is; this module decides how it travels, checks it, and never writes
//! anything into a VM before the data it received or read has been verified as far as it can be.

use crate::config::VmConfig;

mod input_pieces;
pub mod live;
pub mod memory;
mod page_encoder;
pub mod protocol;
pub mod receive;
pub mod snapshot;

pub use input_pieces::InputPieces;
pub use memory::{DirtyPages, DirtyPagesError, PAGE_SIZE};
pub use page_encoder::{EncodePool, Lane};
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
    fs_refusal(config, "fault tolerance")
}

/// Why a VM with a virtio-fs device cannot be captured, moved or protected: its vhost-user
/// backend (virtiofsd) serves the queues and keeps the file system session (open files, FUSE
/// state) outside this process, and writes guest memory where no dirty log sees it. Cloud
/// Hypervisor refuses migration of such a VM too.
fn fs_refusal(config: &VmConfig, what: &str) -> Option<String> {
    config.fs.iter().flatten().next().map(|fs| {
        format!(
            "fs (tag {}, socket {}): a vhost-user backend serves the device and keeps its state \
             (open files, the FUSE session) outside the VMM; {what} is not available for a VM \
             with a virtio-fs device",
            fs.tag,
            fs.socket.display()
        )
    })
}

/// Why a VM with this configuration cannot be snapshotted (yet), or None.
pub fn snapshot_refusal(config: &VmConfig) -> Option<String> {
    fs_refusal(config, "a snapshot")
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
        .or_else(|| fs_refusal(config, "live migration"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FsConfig, PmemConfig, VsockConfig};

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

    #[test]
    fn a_virtio_fs_device_refuses_snapshot_migration_and_ft() {
        let mut config = VmConfig::default();
        assert_eq!(snapshot_refusal(&config), None);
        config.fs = Some(vec![FsConfig::new("myfs", "/run/fs.sock")]);
        for (why, what) in [
            (snapshot_refusal(&config), "a snapshot is not available"),
            (
                migration_refusal(&config),
                "live migration is not available",
            ),
            (ft_refusal(&config), "fault tolerance is not available"),
        ] {
            let why = why.expect("refused");
            assert!(
                why.starts_with("fs (tag myfs, socket /run/fs.sock)"),
                "{why}"
            );
            assert!(why.contains(what), "{why}");
        }
    }
}
