//! Creating bundles: parallel chunk compression, hashing, signing, and an
//! atomic write.
//!
//! The header's size is known before compression (the chunk table has a
//! fixed entry size), so the payload is written straight to its final offset
//! in a temporary file next to the output; the header is written last, the
//! file is synced and renamed over the output. Nothing of the compressed
//! image is kept in memory beyond the chunks in flight.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

use super::error::BundleError;
use super::format::{
    check_chunk_size, check_image_size, check_string, BundleHeader, ChunkEntry, Compression,
    Extension, EXT_FIRST_BLOCK_HASHES, EXT_KERNEL, FIRST_BLOCK_HASH_LEN, FIRST_BLOCK_LEN,
    FORMAT_VERSION, MAX_EXTENSIONS_LEN,
};
use super::kernel_part;
use super::keys::KeyId;
use crate::pipeline;

/// zstd level used by [`create_bundle`]: zstd's own default, a good
/// speed/ratio point; bundles are built once but on CI machines that wait.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Everything [`create_bundle_with_options`] needs besides paths and key.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Image version string (1..=255 bytes, no control characters).
    pub version: String,
    /// Compatible string (1..=255 bytes, no control characters).
    pub compatible: String,
    /// Chunk size: power of two, 64 KiB ..= 64 MiB.
    pub chunk_size: u32,
    /// zstd compression level.
    pub zstd_level: i32,
    /// Compression threads; 0 means one per available core.
    pub threads: usize,
    /// Extension records to include (must not be critical: the only critical
    /// extension, the kernel part, is made from [`CreateOptions::kernel`]).
    pub extensions: Vec<Extension>,
    /// A kernel image (the slot's Unified Kernel Image) to sign together with the root image
    /// ([`super::kernel_part`]).
    pub kernel: Option<PathBuf>,
}

impl CreateOptions {
    /// Options with the defaults for everything but the two strings.
    pub fn new(version: &str, compatible: &str) -> CreateOptions {
        CreateOptions {
            version: version.to_owned(),
            compatible: compatible.to_owned(),
            chunk_size: super::format::DEFAULT_CHUNK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            threads: 0,
            extensions: Vec::new(),
            kernel: None,
        }
    }
}

/// Creates a signed bundle of `image` at `out`.
///
/// Chunks are compressed in parallel on all cores with at most a few chunks
/// in flight; `progress(done, total)` is called with uncompressed bytes after
/// each chunk is written. The output appears atomically (temporary file in
/// the same directory, fsync, rename); on error no output is left behind.
pub fn create_bundle(
    image: &Path,
    key: &SigningKey,
    version: &str,
    compatible: &str,
    chunk_size: u32,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BundleHeader, BundleError> {
    let mut options = CreateOptions::new(version, compatible);
    options.chunk_size = chunk_size;
    create_bundle_with_options(image, key, &options, out, progress)
}

/// [`create_bundle`] with every option.
pub fn create_bundle_with_options(
    image: &Path,
    key: &SigningKey,
    options: &CreateOptions,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BundleHeader, BundleError> {
    check_string("image_version", &options.version)?;
    check_string("compatible", &options.compatible)?;
    let chunk_size = check_chunk_size(options.chunk_size as u64)?;
    check_extensions(&options.extensions)?;

    let (mut image_file, image_size) = open_sized(image, "image")?;
    let chunk_count = check_image_size(image_size, chunk_size)?;
    let mut extensions = options.extensions.clone();
    // The kernel part's table is reserved now (its length depends only on the kernel's size)
    // and filled in with the root image's table.
    let mut kernel = match &options.kernel {
        Some(path) => {
            let (file, size) = open_sized(path, "kernel image")?;
            let count = check_image_size(size, chunk_size)?;
            let placeholder = vec![
                ChunkEntry {
                    compressed_len: 0,
                    sha256: [0; 32],
                };
                count as usize
            ];
            extensions.push(Extension {
                tag: EXT_KERNEL,
                value: kernel_part::extension_value(size, [0; 32], &placeholder),
            });
            let total: usize = extensions.iter().map(|e| 4 + e.value.len()).sum();
            if total > MAX_EXTENSIONS_LEN as usize {
                return Err(BundleError::InvalidKernelPart {
                    reason: format!(
                        "a {size}-byte kernel in {chunk_size}-byte chunks needs a {total}-byte extension area, more than {MAX_EXTENSIONS_LEN}; use a larger --chunk-size"
                    ),
                });
            }
            Some((file, path, size))
        }
        None => None,
    };
    if let Some(ext) =
        first_block_hashes(&mut image_file, image, image_size, chunk_size, &extensions)?
    {
        extensions.push(ext);
    }

    // The header, signed later, with placeholder table entries: its length
    // depends only on counts and string lengths, which are final now.
    let mut header = BundleHeader {
        format_version: FORMAT_VERSION,
        image_version: options.version.clone(),
        compatible: options.compatible.clone(),
        image_size,
        image_sha256: [0; 32],
        chunk_size,
        compression: Compression::Zstd,
        signer_key_id: KeyId::of(&key.verifying_key()),
        extensions,
        chunks: vec![
            ChunkEntry {
                compressed_len: 0,
                sha256: [0; 32],
            };
            chunk_count as usize
        ],
        payload_offset: None,
    };
    let header_len = header.header_len();

    let mut temp = TempFile::create(out)?;
    temp.file
        .seek(SeekFrom::Start(header_len))
        .map_err(|e| BundleError::io(format!("seeking in {}", temp.path.display()), e))?;

    let threads = if options.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        options.threads
    };
    let (entries, image_sha256) = compress_chunks(
        &mut image_file,
        image,
        image_size,
        chunk_size,
        options.zstd_level,
        threads,
        &mut temp,
        progress,
    )?;
    header.chunks = entries;
    header.image_sha256 = image_sha256;
    if let Some((file, path, size)) = kernel.as_mut() {
        let (entries, sha256) = compress_chunks(
            file,
            path,
            *size,
            chunk_size,
            options.zstd_level,
            threads,
            &mut temp,
            &mut |_, _| {},
        )?;
        let ext = header
            .extensions
            .iter_mut()
            .find(|e| e.tag == EXT_KERNEL)
            .ok_or_else(|| BundleError::Internal("kernel extension not reserved".into()))?;
        ext.value = kernel_part::extension_value(*size, sha256, &entries);
    }

    let bytes = header.encode_signed(key)?;
    if bytes.len() as u64 != header_len {
        return Err(BundleError::Internal(format!(
            "encoded header is {} bytes, {header_len} were reserved",
            bytes.len()
        )));
    }
    let temp_err =
        |what: &str, path: &Path, e| BundleError::io(format!("{what} {}", path.display()), e);
    temp.file
        .seek(SeekFrom::Start(0))
        .and_then(|_| temp.file.write_all(&bytes))
        .map_err(|e| temp_err("writing the header to", &temp.path, e))?;
    temp.persist(out)?;
    Ok(header)
}

/// The [`EXT_FIRST_BLOCK_HASHES`] extension for `image`, read with one small read per chunk;
/// `None` when the caller set that tag already or it would not fit in the extension area
/// (an image of more than 16 382 chunks: adaptive installs then match chunks at their own
/// offsets only).
fn first_block_hashes(
    image_file: &mut File,
    image: &Path,
    image_size: u64,
    chunk_size: u32,
    existing: &[Extension],
) -> Result<Option<Extension>, BundleError> {
    use std::os::unix::fs::FileExt;
    let chunk_count = image_size.div_ceil(u64::from(chunk_size));
    let used: usize = existing.iter().map(|e| 4 + e.value.len()).sum();
    let len = chunk_count as usize * FIRST_BLOCK_HASH_LEN;
    if existing.iter().any(|e| e.tag == EXT_FIRST_BLOCK_HASHES)
        || used + 4 + len > MAX_EXTENSIONS_LEN as usize
    {
        return Ok(None);
    }
    let mut value = Vec::with_capacity(len);
    let mut block = [0u8; FIRST_BLOCK_LEN];
    for i in 0..chunk_count {
        let offset = i * u64::from(chunk_size);
        let n = (image_size - offset).min(FIRST_BLOCK_LEN as u64) as usize;
        image_file
            .read_exact_at(&mut block[..n], offset)
            .map_err(|e| {
                BundleError::io(format!("reading image {} at {offset}", image.display()), e)
            })?;
        value.extend_from_slice(&Sha256::digest(&block[..n])[..FIRST_BLOCK_HASH_LEN]);
    }
    Ok(Some(Extension {
        tag: EXT_FIRST_BLOCK_HASHES,
        value,
    }))
}

/// Opens an input image and finds its size (by seeking, which also sizes a block device).
fn open_sized(path: &Path, what: &str) -> Result<(File, u64), BundleError> {
    let mut file = File::open(path)
        .map_err(|e| BundleError::io(format!("opening {what} {}", path.display()), e))?;
    let size = file
        .seek(SeekFrom::End(0))
        .and_then(|size| file.seek(SeekFrom::Start(0)).map(|_| size))
        .map_err(|e| {
            BundleError::io(format!("finding the size of {what} {}", path.display()), e)
        })?;
    Ok((file, size))
}

fn check_extensions(extensions: &[Extension]) -> Result<(), BundleError> {
    let total: usize = extensions.iter().map(|e| 4 + e.value.len()).sum();
    if total > MAX_EXTENSIONS_LEN as usize {
        return Err(BundleError::HeaderLimit {
            field: "extensions_len",
            value: total as u64,
            limit: MAX_EXTENSIONS_LEN as u64,
        });
    }
    for (i, ext) in extensions.iter().enumerate() {
        if ext.is_critical() {
            return Err(BundleError::UnknownCriticalExtension { tag: ext.tag });
        }
        if extensions[..i].iter().any(|e| e.tag == ext.tag) {
            return Err(BundleError::DuplicateExtension { tag: ext.tag });
        }
    }
    Ok(())
}

/// A chunk's buffers as they travel image reader → compressor → bundle file; a fixed number
/// exist (see [`crate::pipeline`]), which bounds memory whatever the image size.
struct ChunkSlot {
    data: Vec<u8>,
    compressed: Vec<u8>,
    sha256: [u8; 32],
}

/// Reads the image in order (hashing it whole), compresses and hashes chunks
/// on `threads` workers, and writes frames in order to `temp`. Returns the
/// chunk table and the image hash.
#[allow(clippy::too_many_arguments)]
fn compress_chunks(
    image_file: &mut File,
    image_path: &Path,
    image_size: u64,
    chunk_size: u32,
    level: i32,
    threads: usize,
    temp: &mut TempFile,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Vec<ChunkEntry>, [u8; 32]), BundleError> {
    let chunk_count = image_size.div_ceil(chunk_size as u64) as u32;
    let threads = threads.max(1);
    let reader = ImageReader {
        file: image_file,
        path: image_path,
        image_size,
        chunk_size,
        hasher: Sha256::new(),
    };
    let mut entries = Vec::with_capacity(chunk_count as usize);
    progress(0, image_size);
    let image_sha256 = pipeline::run(
        &CompressStages { level },
        pipeline::Names {
            pipeline: "compression",
            producer: "image reader thread",
            worker: "compression worker",
        },
        chunk_count,
        threads,
        2 * threads + 2,
        reader,
        &mut |index, slot| {
            let compressed_len = u32::try_from(slot.compressed.len())
                .ok()
                .filter(|&l| l <= super::format::max_compressed_len(slot.data.len() as u32))
                .ok_or_else(|| {
                    BundleError::Internal(format!(
                        "chunk {index} compressed to {} bytes, above the format's bound",
                        slot.compressed.len()
                    ))
                })?;
            temp.file.write_all(&slot.compressed).map_err(|e| {
                BundleError::io(
                    format!("writing chunk {index} to {}", temp.path.display()),
                    e,
                )
            })?;
            entries.push(ChunkEntry {
                compressed_len,
                sha256: slot.sha256,
            });
            progress(
                ((index as u64 + 1) * chunk_size as u64).min(image_size),
                image_size,
            );
            Ok(())
        },
    )?;
    Ok((entries, image_sha256))
}

/// The image reader thread of [`compress_chunks`]: chunks in order, hashing the whole image.
struct ImageReader<'a> {
    file: &'a mut File,
    path: &'a Path,
    image_size: u64,
    chunk_size: u32,
    hasher: Sha256,
}

impl pipeline::Producer<ChunkSlot> for ImageReader<'_> {
    type Output = [u8; 32];
    type Error = BundleError;

    fn fill(&mut self, index: u32, slot: &mut ChunkSlot) -> Result<(), BundleError> {
        let offset = index as u64 * self.chunk_size as u64;
        let len = (self.image_size - offset).min(self.chunk_size as u64) as usize;
        slot.data.resize(len, 0);
        self.file.read_exact(&mut slot.data).map_err(|e| {
            BundleError::io(
                format!(
                    "reading chunk {index} ({len} bytes at offset {offset}) of image {} (did it shrink?)",
                    self.path.display()
                ),
                e,
            )
        })?;
        self.hasher.update(&slot.data);
        Ok(())
    }

    fn finish(self) -> Result<[u8; 32], BundleError> {
        Ok(self.hasher.finalize().into())
    }
}

/// The compression stage of [`compress_chunks`]: each chunk hashed and compressed alone.
struct CompressStages {
    level: i32,
}

impl pipeline::Stages for CompressStages {
    type Slot = ChunkSlot;
    type Worker = zstd::bulk::Compressor<'static>;
    type Error = BundleError;

    fn new_slot(&self) -> ChunkSlot {
        ChunkSlot {
            data: Vec::new(),
            compressed: Vec::new(),
            sha256: [0; 32],
        }
    }

    fn new_worker(&self) -> Result<Self::Worker, BundleError> {
        zstd::bulk::Compressor::new(self.level)
            .map_err(|e| BundleError::io("creating a zstd compressor", e))
    }

    fn work(
        &self,
        compressor: &mut Self::Worker,
        _index: u32,
        slot: &mut ChunkSlot,
    ) -> Result<(), BundleError> {
        slot.sha256 = Sha256::digest(&slot.data).into();
        slot.compressed.clear();
        slot.compressed
            .reserve(zstd::zstd_safe::compress_bound(slot.data.len()));
        // One independent frame per chunk (with its content size), so a
        // reader can start at any chunk and decode chunks in parallel.
        compressor
            .compress_to_buffer(&slot.data, &mut slot.compressed)
            .map(|_| ())
            .map_err(|e| BundleError::io("compressing a chunk with zstd", e))
    }
}

/// A temporary file next to the output, removed on drop unless persisted.
struct TempFile {
    file: File,
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    fn create(out: &Path) -> Result<TempFile, BundleError> {
        let dir = parent_dir(out);
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bundle".into());
        // Same directory as the output, so the final rename is atomic.
        let path = dir.join(format!(
            ".{name}.tmp-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|e| {
                BundleError::io(format!("creating temporary file {}", path.display()), e)
            })?;
        Ok(TempFile {
            file,
            path,
            persisted: false,
        })
    }

    fn persist(mut self, out: &Path) -> Result<(), BundleError> {
        self.file
            .sync_all()
            .map_err(|e| BundleError::io(format!("syncing {}", self.path.display()), e))?;
        fs::rename(&self.path, out).map_err(|e| {
            BundleError::io(
                format!("renaming {} to {}", self.path.display(), out.display()),
                e,
            )
        })?;
        self.persisted = true;
        // The rename is durable only once the directory is synced.
        let dir = parent_dir(out);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| BundleError::io(format!("syncing directory {}", dir.display()), e))?;
        Ok(())
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            // Best effort: the error that got us here matters more.
            let _ = fs::remove_file(&self.path);
        }
    }
}
