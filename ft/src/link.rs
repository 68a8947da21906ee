//! The replication connection: mutual TLS between hosts (plain TCP only by the operator's
//! explicit opt-out), or a Unix socket pair, which lets the FT state machines be driven
//! in-process (tests with a fake VM and a frame-mangling link).

pub use transport::Stream as FtStream;
