//! Byte formats of VM state transfer, independent of KVM: the snapshot directory written by
//! `vm.snapshot` and read by `vm.restore`, and the framed stream used by live migration (and,
//! later, by fault-tolerant epoch replication).
//!
//! Both are generic over the state type (`S: Serialize + DeserializeOwned`): the caller decides
//! what the VM state is; this module decides how it travels, checks it, and never writes
//! anything into a VM before the data it received or read has been verified as far as it can be.

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
