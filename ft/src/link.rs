//! The replication connection: mutual TLS between hosts (plain TCP only by the operator's
//! explicit opt-out), or a Unix socket pair, which lets the FT state machines be driven
//! in-process (tests with a fake VM and a frame-mangling link).

pub use transport::Stream as FtStream;

use std::path::Path;

use transport::Security;
use vmm::control::VmmError;

/// How the replication channel (and the witness's or etcd's) is secured: the operator's TLS
/// credentials or explicit plaintext opt-out. `None` only when nothing goes over TCP (an
/// in-process link without a witness or etcd) and the operator chose nothing.
pub fn channel_security(
    tls_dir: Option<&Path>,
    insecure_plaintext: bool,
    tcp: bool,
) -> Result<Option<Security>, VmmError> {
    if !tcp && tls_dir.is_none() && !insecure_plaintext {
        return Ok(None);
    }
    Security::choose(tls_dir, insecure_plaintext, "FT replication")
        .map(Some)
        .map_err(|e| VmmError::InvalidConfig(e.to_string()))
}
