//! Output gates: the one place through which a device's externally visible output leaves the
//! VM. Without fault tolerance a gate passes output straight through; fault tolerance swaps in
//! a gate that holds each epoch's output until the backup has acknowledged that epoch.
//! Devices know nothing else of fault tolerance.

mod ack_index;
mod epoch;
mod epoch_disk;
mod epoch_net;
mod frame_pool;
mod input_log;
mod record;
mod replay_watch;
mod tcp_ack;

pub use epoch::{
    DiscardStats, EpochControl, EpochError, FirstHeld, GateMode, GateStats, HoldLimits,
    ReleaseStats,
};
pub use epoch_disk::EpochDiskGate;
pub use epoch_net::{EpochNetGate, GroupPeers};
pub use frame_pool::FramePool;
pub use input_log::{InputLog, InputRecorder, LoggedFrame};
pub use record::{DiskWriteLog, RecordedWrite, RecordingDiskGate};
#[cfg(test)]
pub(crate) use replay_watch::tests::segment as tcp_test_segment;
pub use replay_watch::ReplayWatch;
pub use tcp_ack::{is_pure_tcp_ack, tcp_payload, tcp_segment, TcpSegment};

/// Where a network device's transmitted frames go (a TAP device, through the gate).
pub trait NetOutputGate: Send {
    /// Sends one Ethernet frame (without the virtio-net header).
    fn transmit(&mut self, frame: &[u8]) -> std::io::Result<()>;
}

/// Where a network device records each frame it is about to deliver to the guest (the input
/// log of fault tolerance, see [`InputLog`]).
pub trait NetInputRecorder: Send {
    /// Records one frame as the guest's buffer holds it (the 12-byte virtio-net header, then
    /// the Ethernet frame) before the guest may see it. False: the frame must not be
    /// delivered (the device drops it). `placed`: the guest buffer's segments (guest address,
    /// bytes), in order; the frame fills them from the first byte (the last one possibly
    /// not to its end).
    fn record(&mut self, frame: &[u8], placed: &[(vm_memory::GuestAddress, usize)]) -> bool;

    /// [`NetInputRecorder::record`] of `buffer[..len]`. The recorder may keep `buffer` itself
    /// and leave one of the same length in its place.
    fn record_buffer(
        &mut self,
        buffer: &mut Vec<u8>,
        len: usize,
        placed: &[(vm_memory::GuestAddress, usize)],
    ) -> bool {
        self.record(&buffer[..len.min(buffer.len())], placed)
    }
}

/// Where a block device's writes to its disk image go, and through which it reads.
///
/// The device reads every request with [`DiskOutputGate::read_through`], so a gate that holds
/// writes (shared-disk fault tolerance) must make held data visible there: a guest reads its own
/// completed writes even before their epoch commits. The pass-through gate only reads the image.
pub trait DiskOutputGate: Send {
    /// Writes `data` at byte `offset` of the image. With an image opened with `O_DIRECT`, the
    /// block device hands over 4096-byte aligned buffers, offsets and lengths in 512-byte units.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Makes every write accepted so far durable (a guest FLUSH request).
    fn flush(&mut self) -> std::io::Result<()>;

    /// Reads `buf.len()` bytes at `offset` as the guest must see them: `read_image` fills `buf`
    /// from the image, then a holding gate patches in writes it still holds. The image read runs
    /// inside the call so that a holding gate can keep a concurrent commit from moving data
    /// between image and overlay in between. The pass-through gate only reads the image.
    fn read_through(
        &self,
        _offset: u64,
        buf: &mut [u8],
        read_image: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        read_image(buf)
    }
}

/// The pass-through disk gate: writes go straight to the image file.
pub struct FileDiskGate {
    file: std::fs::File,
    direct: bool,
}

/// Alignment `O_DIRECT` needs for memory buffers (the page size covers every logical block size
/// we meet in practice).
pub const DIRECT_IO_ALIGN: usize = 4096;

impl FileDiskGate {
    /// `file` must be open for writing; `direct` says it was opened with `O_DIRECT`, so that an
    /// unaligned buffer is copied into an aligned one first instead of failing with `EINVAL`.
    pub fn new(file: std::fs::File, direct: bool) -> Self {
        Self { file, direct }
    }
}

impl DiskOutputGate for FileDiskGate {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.direct && data.as_ptr().align_offset(DIRECT_IO_ALIGN) != 0 {
            // An aligned window inside an over-allocated vector avoids unsafe allocation code.
            let mut buf = vec![0u8; data.len() + DIRECT_IO_ALIGN];
            let start = buf.as_ptr().align_offset(DIRECT_IO_ALIGN);
            let window = &mut buf[start..start + data.len()];
            window.copy_from_slice(data);
            return self.file.write_all_at(window, offset);
        }
        self.file.write_all_at(data, offset)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}
