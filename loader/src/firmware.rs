//! The firmware side of the loader: whole disks through the UEFI Block I/O protocol, starting
//! a kernel image with its command line, and resetting the machine. The only module with
//! `unsafe`.
//!
//! Why Block I/O and not a file system: the slot attributes live in the GPT itself, and the
//! loader must read and rewrite exactly the bytes `abupdate boot` does (through the same core
//! code), so it needs sector access to the whole disk, not files.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use uefi::boot::{self, OpenProtocolAttributes, OpenProtocolParams, ScopedProtocol};
use uefi::proto::loaded_image::LoadedImage;
use uefi::proto::media::block::BlockIO;
use uefi::{Handle, Status};

/// A whole disk (not a partition) seen through Block I/O.
pub struct Disk {
    io: ScopedProtocol<BlockIO>,
    media_id: u32,
    /// Bytes per logical block.
    pub block_size: u32,
    /// Number of blocks.
    pub blocks: u64,
    read_only: bool,
    align: usize,
}

/// A Block I/O failure, with where it happened.
#[derive(Debug, Clone, Copy)]
pub struct DiskError {
    /// What was being done.
    pub what: &'static str,
    /// The first block involved.
    pub lba: u64,
    /// The firmware's status.
    pub status: Status,
}

impl core::fmt::Display for DiskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} at LBA {}: {:?}", self.what, self.lba, self.status)
    }
}

/// Every whole disk with media present, in handle order.
pub fn whole_disks() -> Vec<Disk> {
    let Ok(handles) = boot::find_handles::<BlockIO>() else {
        return Vec::new();
    };
    handles.into_iter().filter_map(open_disk).collect()
}

fn open_disk(handle: Handle) -> Option<Disk> {
    // Opened with GET_PROTOCOL, not exclusively: an exclusive open would disconnect the drivers
    // above the disk (the partition and FAT drivers of the ESP this loader was read from).
    // SAFETY: the handle came from the firmware's own handle database, the agent is this
    // image, and the protocol is dropped (closed) before this image exits or starts another.
    let io = unsafe {
        boot::open_protocol::<BlockIO>(
            OpenProtocolParams {
                handle,
                agent: boot::image_handle(),
                controller: None,
            },
            OpenProtocolAttributes::GetProtocol,
        )
    }
    .ok()?;
    let media = io.media();
    if !media.is_media_present() || media.is_logical_partition() || media.block_size() == 0 {
        return None;
    }
    let (media_id, block_size, blocks, read_only, align) = (
        media.media_id(),
        media.block_size(),
        media.last_block() + 1,
        media.is_read_only(),
        (media.io_align() as usize).max(1),
    );
    Some(Disk {
        io,
        media_id,
        block_size,
        blocks,
        read_only,
        align,
    })
}

/// A buffer whose data starts at an `align`-byte boundary, as Block I/O may require.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, align: usize) -> Self {
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align);
        Aligned {
            storage,
            start,
            len,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

impl Disk {
    /// Reads whole blocks starting at `lba` into `buf` (a multiple of the block size).
    pub fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let mut tmp = Aligned::new(buf.len(), self.align);
        self.io
            .read_blocks(self.media_id, lba, tmp.bytes())
            .map_err(|e| DiskError {
                what: "read",
                lba,
                status: e.status(),
            })?;
        buf.copy_from_slice(tmp.bytes());
        Ok(())
    }

    /// Writes whole blocks at `lba`.
    pub fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError {
                what: "write (read-only media)",
                lba,
                status: Status::WRITE_PROTECTED,
            });
        }
        let mut tmp = Aligned::new(data.len(), self.align);
        tmp.bytes().copy_from_slice(data);
        self.io
            .write_blocks(self.media_id, lba, tmp.bytes())
            .map_err(|e| DiskError {
                what: "write",
                lba,
                status: e.status(),
            })
    }

    /// Makes every write so far durable.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        self.io.flush_blocks().map_err(|e| DiskError {
            what: "flush",
            lba: 0,
            status: e.status(),
        })
    }
}

/// Waits `seconds`, then resets the machine (a cold reset: firmware starts over).
pub fn reset_after(seconds: u32) -> ! {
    boot::stall(seconds as usize * 1_000_000);
    uefi::runtime::reset(uefi::runtime::ResetType::COLD, Status::ABORTED, None)
}

/// Powers the machine off (used by the test build's "stop after choosing" mode).
pub fn power_off() -> ! {
    uefi::runtime::reset(uefi::runtime::ResetType::SHUTDOWN, Status::SUCCESS, None)
}

/// Loads `image` (a UEFI application: the slot's Unified Kernel Image) from memory and starts
/// it with `cmdline` as its load options (UCS-2, as the systemd stub reads them). Returns only
/// when the firmware refuses the image or the image exits: either way the slot did not boot.
pub fn start_image(image: &[u8], cmdline: &str) -> Result<(), String> {
    let handle = boot::load_image(
        boot::image_handle(),
        boot::LoadImageSource::FromBuffer {
            buffer: image,
            file_path: None,
        },
    )
    .map_err(|e| alloc::format!("the firmware refused to load it: {:?}", e.status()))?;
    let mut options: Vec<u16> = cmdline.encode_utf16().chain(core::iter::once(0)).collect();
    {
        let mut loaded = boot::open_protocol_exclusive::<LoadedImage>(handle).map_err(|e| {
            let _ = boot::unload_image(handle);
            alloc::format!("its LoadedImage protocol: {:?}", e.status())
        })?;
        let size = u32::try_from(options.len() * 2).unwrap_or(u32::MAX);
        // SAFETY: `options` outlives the started image's use of it: it is dropped only after
        // `start_image` returns, i.e. after the image exited (a kernel that booted never
        // returns here), and it is not moved or changed in between.
        unsafe { loaded.set_load_options(options.as_mut_ptr().cast::<u8>(), size) };
    }
    let started = boot::start_image(handle);
    drop(options);
    match started {
        Ok(()) => Err("it returned to the loader".into()),
        Err(e) => Err(alloc::format!("it failed to start: {:?}", e.status())),
    }
}

/// Whether the firmware enforces Secure Boot (the global `SecureBoot` variable is 1): then it
/// has checked this loader's signature, and `LoadImage` checks the kernel image's.
pub fn secure_boot() -> bool {
    let mut value = [0u8; 1];
    uefi::runtime::get_variable(
        uefi::cstr16!("SecureBoot"),
        &uefi::runtime::VariableVendor::GLOBAL_VARIABLE,
        &mut value,
    )
    .is_ok_and(|(v, _)| v == [1])
}
