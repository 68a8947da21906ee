//! One counter of KVM's binary statistics of a vCPU (`KVM_GET_STATS_FD`): how many page faults
//! KVM handled for it (`pf_taken`).
//!
//! With dirty logging on, nearly all of them are the guest's first write to a page after a
//! harvest or a re-arm write-protected it: the cost of dirty tracking (1-2 us each with EPT,
//! 18-19 us of guest time on a nested host without it, as `ci/bench-ft`'s `us/fault floor`
//! measured), which FT's hot pages exist to save. `vm.ft-status`
//! reports them, so an operator (and the FT benchmark) sees what tracking costs a VM.
//!
//! kvm-ioctls has no wrapper for the stats fd, hence the ioctl and the small parser here. The
//! layout (a header, then descriptors each followed by its name, then the data block) is the
//! kernel's documented ABI (Documentation/virt/kvm/api.rst, 4.133 KVM_GET_STATS_FD).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_MASK};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

// KVM_GET_STATS_FD = _IO(KVMIO, 0xce)
ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// The counter read: page faults KVM handled for the vCPU.
const PAGE_FAULTS: &str = "pf_taken";

/// `struct kvm_stats_header`: six u32.
const HEADER_LEN: usize = 24;
/// `struct kvm_stats_desc` before its name.
const DESC_LEN: usize = 16;
/// More descriptors than any kernel has (about 60 per vCPU): a bound on what is read.
const MAX_DESCRIPTORS: u32 = 4096;
/// Longest name field accepted (the kernel's is 48 bytes).
const MAX_NAME: u32 = 256;

/// One cumulative u64 counter of a vCPU's stats fd.
pub struct VcpuCounter {
    stats: File,
    /// Where the value sits in the stats fd.
    at: u64,
}

impl VcpuCounter {
    /// The vCPU's page-fault counter; None when this kernel has no stats fd or no such counter.
    pub fn page_faults(vcpu: &VcpuFd) -> Option<VcpuCounter> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd (or -1), which is
        // owned by the File from here on; the vCPU fd is valid for the call.
        let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            log::debug!(
                "KVM binary statistics unavailable: {}",
                io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let stats = unsafe { File::from_raw_fd(fd) };
        match find_counter(&stats, PAGE_FAULTS) {
            Ok(Some(at)) => Some(VcpuCounter { stats, at }),
            Ok(None) => {
                log::debug!("KVM binary statistics have no {PAGE_FAULTS}");
                None
            }
            Err(e) => {
                log::debug!("KVM binary statistics (fd {}): {e}", stats.as_raw_fd());
                None
            }
        }
    }

    /// The counter's value now.
    pub fn read(&self) -> io::Result<u64> {
        let mut value = [0u8; 8];
        self.stats.read_exact_at(&mut value, self.at)?;
        Ok(u64::from_ne_bytes(value))
    }
}

/// Reads `len` bytes at `offset`, the form [`locate`] asks for them.
fn read_at(stats: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    stats.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn find_counter(stats: &File, name: &str) -> io::Result<Option<u64>> {
    locate(|offset, len| read_at(stats, offset, len), name)
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at + 4)?;
    Some(u32::from_ne_bytes(raw.try_into().ok()?))
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    let raw = bytes.get(at..at + 2)?;
    Some(u16::from_ne_bytes(raw.try_into().ok()?))
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("stats fd: {what}"))
}

/// Where the cumulative single-value counter `name` lives in a stats fd read through `read`
/// (offset, length -> bytes). None: no such counter, or not one u64 that only grows.
fn locate(
    mut read: impl FnMut(u64, usize) -> io::Result<Vec<u8>>,
    name: &str,
) -> io::Result<Option<u64>> {
    let header = read(0, HEADER_LEN)?;
    let field = |i: usize| u32_at(&header, 4 * i).ok_or_else(|| malformed("short header"));
    let (name_size, num_desc, desc_offset, data_offset) =
        (field(1)?, field(2)?, field(4)?, field(5)?);
    if num_desc > MAX_DESCRIPTORS || name_size > MAX_NAME {
        return Err(malformed("implausible header"));
    }
    let stride = DESC_LEN + name_size as usize;
    let descriptors = read(u64::from(desc_offset), stride * num_desc as usize)?;
    for desc in descriptors.chunks_exact(stride) {
        let raw_name = &desc[DESC_LEN..];
        let len = raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len());
        if &raw_name[..len] != name.as_bytes() {
            continue;
        }
        let flags = u32_at(desc, 0).ok_or_else(|| malformed("short descriptor"))?;
        let size = u16_at(desc, 6).ok_or_else(|| malformed("short descriptor"))?;
        let offset = u32_at(desc, 8).ok_or_else(|| malformed("short descriptor"))?;
        if flags & KVM_STATS_TYPE_MASK != KVM_STATS_TYPE_CUMULATIVE || size != 1 {
            return Ok(None);
        }
        return Ok(Some(u64::from(data_offset) + u64::from(offset)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stats fd's bytes: header, descriptors (name field `name_size` long), data.
    fn stats_blob(name_size: u32, descs: &[(&str, u32, u16, u32)], data: &[u64]) -> Vec<u8> {
        let desc_offset = 64u32;
        let stride = DESC_LEN as u32 + name_size;
        let data_offset = desc_offset + stride * descs.len() as u32;
        let mut blob = Vec::new();
        for v in [
            0,
            name_size,
            descs.len() as u32,
            HEADER_LEN as u32,
            desc_offset,
            data_offset,
        ] {
            blob.extend(v.to_ne_bytes());
        }
        blob.resize(desc_offset as usize, 0);
        for (name, flags, size, offset) in descs {
            blob.extend(flags.to_ne_bytes());
            blob.extend(0i16.to_ne_bytes());
            blob.extend(size.to_ne_bytes());
            blob.extend(offset.to_ne_bytes());
            blob.extend(0u32.to_ne_bytes());
            let mut field = name.as_bytes().to_vec();
            field.resize(name_size as usize, 0);
            blob.extend(field);
        }
        for v in data {
            blob.extend(v.to_ne_bytes());
        }
        blob
    }

    fn reader(blob: &[u8]) -> impl FnMut(u64, usize) -> io::Result<Vec<u8>> + '_ {
        move |offset, len| {
            let start = offset as usize;
            blob.get(start..start + len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
        }
    }

    #[test]
    fn finds_a_cumulative_counter_by_name() {
        let blob = stats_blob(
            48,
            &[
                ("halt_exits", 0, 1, 0),
                ("pf_taken", 0, 1, 8),
                ("hist", 0x4, 32, 16),
            ],
            &[5, 1234],
        );
        let at = locate(reader(&blob), "pf_taken").unwrap().unwrap();
        let value = &blob[at as usize..at as usize + 8];
        assert_eq!(u64::from_ne_bytes(value.try_into().unwrap()), 1234);
        assert_eq!(locate(reader(&blob), "pf_fixed").unwrap(), None);
    }

    #[test]
    fn a_counter_that_is_not_one_growing_value_is_not_used() {
        // An instant value (type 1) and a histogram (size 32) are not page-fault counts.
        let blob = stats_blob(48, &[("pf_taken", 1, 1, 0)], &[7]);
        assert_eq!(locate(reader(&blob), "pf_taken").unwrap(), None);
        let blob = stats_blob(48, &[("pf_taken", 0, 32, 0)], &[7]);
        assert_eq!(locate(reader(&blob), "pf_taken").unwrap(), None);
    }

    #[test]
    fn a_truncated_or_implausible_fd_is_an_error_not_a_panic() {
        let blob = stats_blob(48, &[("pf_taken", 0, 1, 0)], &[7]);
        for cut in [0, 10, HEADER_LEN, 70] {
            assert!(
                locate(reader(&blob[..cut]), "pf_taken").is_err(),
                "cut at {cut}"
            );
        }
        let mut huge = blob.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(locate(reader(&huge), "pf_taken").is_err());
    }

    proptest::proptest! {
        /// Whatever a stats fd holds, the parser answers (an offset, none or an error) without
        /// panicking or asking for an unbounded read.
        #[test]
        fn arbitrary_stats_bytes_are_parsed_safely(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            flips in proptest::collection::vec((0usize..400, proptest::num::u8::ANY), 0..8),
        ) {
            let mut valid = stats_blob(48, &[("a", 0, 1, 0), ("pf_taken", 0, 1, 8)], &[1, 2]);
            for (at, value) in flips {
                if let Some(b) = valid.get_mut(at) {
                    *b = value;
                }
            }
            for blob in [bytes, valid] {
                let mut largest = 0;
                let read = |offset: u64, len: usize| {
                    largest = largest.max(len);
                    reader(&blob)(offset, len)
                };
                let _ = locate(read, "pf_taken");
                let bound = HEADER_LEN.max((DESC_LEN + MAX_NAME as usize) * MAX_DESCRIPTORS as usize);
                proptest::prop_assert!(largest <= bound);
            }
        }
    }

    #[test]
    fn this_hosts_vcpus_count_page_faults() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIP this_hosts_vcpus_count_page_faults: no /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        match VcpuCounter::page_faults(&vcpu) {
            // A vCPU that never ran has taken none.
            Some(counter) => assert_eq!(counter.read().unwrap(), 0),
            None => eprintln!("SKIP: this kernel has no vCPU pf_taken statistic"),
        }
    }
}
