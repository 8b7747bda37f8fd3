//! The install's local ends: opening a bundle source from a path (or stdin, or a URL) and the
//! reboot-required sentinel.

use std::io::{self, Read};
use std::path::Path;

use crate::bundle::{BundleError, BundleSource};

/// Writes the reboot-required sentinel atomically (temp file + rename).
pub fn write_sentinel(path: &Path, slot: &str, version: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // The temporary name is fresh (pid and a random tag) and created with O_EXCL|O_NOFOLLOW, so
    // a symlink or file planted at a predictable name is never followed or clobbered: the open
    // fails instead. The rename then replaces only the sentinel path itself (a symlink there is
    // replaced, not followed).
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".abupdate-tmp.{}.{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let tmp = path.with_file_name(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(&tmp)?;
    let written = file
        .write_all(
            format!("abupdate: {version} installed in {slot}; reboot to boot it\n").as_bytes(),
        )
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Opens a bundle source: `-` for stdin, an `http://` or `https://` URL (streamed with resume
/// and the default [`crate::fetch::http::FetchOptions`]; see [`crate::fetch::http`]), a block device (read up
/// to the bundle's own declared length, so a bundle on a raw disk may be followed by padding),
/// or a file.
pub fn open_bundle_source(path: &Path) -> Result<Box<dyn BundleSource>, BundleError> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(url) = path.to_str().filter(|s| crate::fetch::http::is_url(s)) {
        let fetch_err = |e| BundleError::Io {
            context: format!("fetching bundle {url}"),
            source: io::Error::other(e),
        };
        let fetcher = crate::fetch::http::Fetcher::new(Default::default()).map_err(fetch_err)?;
        let source = fetcher
            .open(url, 0, Default::default())
            .map_err(fetch_err)?;
        return Ok(Box::new(io::BufReader::with_capacity(
            crate::fetch::http::STREAM_BUFFER,
            source,
        )));
    }
    if path == Path::new("-") {
        return Ok(Box::new(io::BufReader::with_capacity(1 << 20, io::stdin())));
    }
    let io_err = |e| BundleError::Io {
        context: format!("opening bundle {}", path.display()),
        source: e,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let is_block = file
        .metadata()
        .map_err(io_err)?
        .file_type()
        .is_block_device();
    if is_block {
        let header = crate::bundle::read_unverified_header(&mut io::BufReader::new(&file))?;
        let len = header.bundle_len();
        let file = std::fs::File::open(path).map_err(io_err)?;
        return Ok(Box::new(io::BufReader::with_capacity(
            1 << 20,
            file.take(len),
        )));
    }
    Ok(Box::new(io::BufReader::with_capacity(1 << 20, file)))
}
