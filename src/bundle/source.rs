//! Where bundle bytes come from, and how far ahead a source can jump.
//!
//! An adaptive install (see [`crate::install::adaptive`]) takes some chunks from the running slot
//! instead of the bundle. The frames of those chunks still sit in the stream; a
//! [`BundleSource`] gets past them as cheaply as it can: a file seeks, a download starts a new
//! `Range` request at the next needed frame (so the bytes are never transferred), and a pipe
//! reads them and throws them away (the install still saves their decompression and writes).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Cursor, Read, Seek, Stdin, Take};

use crate::fetch::http::HttpSource;

/// A bundle byte stream that can move forward without delivering bytes.
pub trait BundleSource: Read + Send {
    /// Moves `n` bytes ahead; the caller then reads about `next_read` bytes before it skips
    /// again, when it knows (a download asks for just those). The default reads the skipped
    /// bytes and throws them away.
    fn skip_ahead(&mut self, n: u64, next_read: Option<u64>) -> io::Result<()> {
        let _ = next_read;
        let copied = io::copy(&mut self.take(n), &mut io::sink())?;
        if copied < n {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the bundle ended {} bytes before the skip target",
                    n - copied
                ),
            ));
        }
        Ok(())
    }

    /// Gaps up to this many bytes are cheaper to read through than to skip (a download's
    /// new request costs a round trip), so a caller may ask for the bytes after such a gap
    /// together with the ones before it. 0: skipping is always cheaper.
    fn read_through_gap(&self) -> u64 {
        0
    }
}

/// Seeks forward inside a buffered seekable reader (the buffer is reused when the target
/// lies inside it).
fn seek_ahead<R: Read + Seek>(r: &mut BufReader<R>, n: u64) -> io::Result<()> {
    let delta = i64::try_from(n)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "skip too large"))?;
    r.seek_relative(delta)
}

impl BundleSource for BufReader<File> {
    fn skip_ahead(&mut self, n: u64, _next_read: Option<u64>) -> io::Result<()> {
        seek_ahead(self, n)?;
        // Seeking past the end succeeds silently; a truncated bundle must not.
        let position = self.stream_position()?;
        let len = self.get_ref().metadata()?.len();
        if position > len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the bundle file ends at byte {len}, before byte {position}"),
            ));
        }
        Ok(())
    }
}

impl BundleSource for BufReader<HttpSource> {
    fn skip_ahead(&mut self, n: u64, next_read: Option<u64>) -> io::Result<()> {
        // Drop what is buffered (it is part of the skip, or of it all), then let the
        // download skip the rest with the hint.
        let buffered = self.buffer().len() as u64;
        if n <= buffered {
            self.consume(n as usize);
            return Ok(());
        }
        self.consume(buffered as usize);
        self.get_mut()
            .skip_ahead(n - buffered, next_read)
            .map_err(io::Error::other)
    }
    fn read_through_gap(&self) -> u64 {
        crate::fetch::http::RECONNECT_GAP
    }
}

/// A bundle on a raw block device, read up to its declared length.
impl BundleSource for BufReader<Take<File>> {}
impl BundleSource for BufReader<Stdin> {}
impl BundleSource for &[u8] {}
impl BundleSource for Cursor<Vec<u8>> {}
impl BundleSource for Cursor<&[u8]> {}

impl<S: BundleSource + ?Sized> BundleSource for Box<S> {
    fn skip_ahead(&mut self, n: u64, next_read: Option<u64>) -> io::Result<()> {
        (**self).skip_ahead(n, next_read)
    }
    fn read_through_gap(&self) -> u64 {
        (**self).read_through_gap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_skip_reads_through_and_reports_a_short_stream() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut src = Cursor::new(data);
        src.skip_ahead(10, None).unwrap();
        let mut b = [0u8; 3];
        src.read_exact(&mut b).unwrap();
        assert_eq!(b, [10, 11, 12]);
        let err = src.skip_ahead(1000, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn file_skip_seeks_across_the_buffer_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        std::fs::write(&path, &data).unwrap();
        let mut src = BufReader::with_capacity(4096, File::open(&path).unwrap());
        let mut b = [0u8; 5];
        src.read_exact(&mut b).unwrap();
        src.skip_ahead(100, None).unwrap(); // inside the buffer
        src.read_exact(&mut b).unwrap();
        assert_eq!(b, data[105..110]);
        src.skip_ahead(200_000, None).unwrap(); // past it
        src.read_exact(&mut b).unwrap();
        assert_eq!(b, data[200_110..200_115]);
        let err = src.skip_ahead(100_000, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
