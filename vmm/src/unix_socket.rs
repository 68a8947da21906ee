//! Unix sockets only this user may connect to.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Mutex;

/// Serialises our own umask swaps, so two binds at once cannot restore each other's mask.
static UMASK: Mutex<()> = Mutex::new(());

/// Binds a listening socket at `path` whose file has mode 0600 whatever the process umask.
///
/// Connecting to a Unix socket needs write permission on its file, and `bind(2)` creates that
/// file with `0777 & !umask`. Changing the mode only after `bind` would leave a window in
/// which anyone could connect, so the mask is 0o077 during the `bind` (the file is born 0700,
/// owner only) and the mode is then narrowed to the conventional 0600. The umask is
/// process-wide: a file or directory another thread creates during this short window gets no
/// group or other permission bits, which errs on the safe side.
pub fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    let bound = {
        let _serial = UMASK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: umask only swaps the process's file-creation mask; it cannot fail or touch
        // memory.
        let old = unsafe { libc::umask(0o077) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, putting back the mask found.
        unsafe { libc::umask(old) };
        bound
    };
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
