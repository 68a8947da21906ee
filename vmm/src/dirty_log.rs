//! KVM's manual dirty-log re-arming (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), for FT's hot pages.
//!
//! Normally `KVM_GET_DIRTY_LOG` hands over the dirty bitmap and write-protects every page in it
//! again, so the next guest write to each one faults (6-20 us a fault on the nested hosts measured,
//! 1-2 us with EPT; `vm.ft-status` counts them, `kvm_page_faults`). With manual re-arming the
//! harvest only reads the bitmap: a page stays writable, and set in the bitmap, until
//! `KVM_CLEAR_DIRTY_LOG` re-arms it. FT leaves the pages the guest rewrites epoch after epoch
//! writable ("hot") and compares them with its last copy at each checkpoint instead of taking a
//! fault per page per epoch.
//!
//! kvm-ioctls has no wrapper for `KVM_CLEAR_DIRTY_LOG`, hence the raw ioctl here.

use std::io;

use kvm_bindings::{kvm_clear_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

// KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)
ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_clear_dirty_log
);

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: harvests leave pages writable.
const MANUAL_PROTECT_ENABLE: u64 = 1;

/// Whether this host's KVM can re-arm dirty pages on request.
pub fn manual_rearm_supported(vm: &VmFd) -> bool {
    let options = vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    options > 0 && (options as u64) & MANUAL_PROTECT_ENABLE != 0
}

/// Switches manual re-arming on or off for the whole VM. Off, the next harvest re-arms what
/// it reports, as before; pages left writable meanwhile must be re-armed first
/// ([`clear_dirty_log`] with every page reported) or their writes go unlogged.
pub fn set_manual_rearm(vm: &VmFd, on: bool) -> io::Result<()> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = if on { MANUAL_PROTECT_ENABLE } else { 0 };
    vm.enable_cap(&cap).map_err(io::Error::from)
}

/// Re-arms (write-protects, and clears in the dirty bitmap) the pages set in `bitmap` of memory
/// slot `slot`, which holds `pages` pages; `bitmap` covers the whole slot.
pub fn clear_dirty_log(vm: &VmFd, slot: u32, pages: u64, bitmap: &[u64]) -> io::Result<()> {
    let num_pages = u32::try_from(pages)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memory slot too large"))?;
    if (bitmap.len() as u64) * 64 < pages {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "dirty bitmap shorter than its slot",
        ));
    }
    let mut clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page: 0,
        ..Default::default()
    };
    clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
    // SAFETY: the ioctl reads `num_pages` bits from `dirty_bitmap`, which `bitmap` holds (checked
    // above) and which outlives the call; `first_page` 0 with the slot's whole length is the
    // alignment KVM asks for; the VM fd is valid.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
