//! Fault tolerance (Cuju-style epoch replication): epochs, dirty harvest, staging, wire
//! protocol, compression, backup, output commit, heartbeat and failover, groups.
//!
//! Empty until the fault-tolerance work lands; the crate exists so the layout and the
//! dependency direction (binaries -> api/ft -> vmm -> devices) are fixed from the start.
