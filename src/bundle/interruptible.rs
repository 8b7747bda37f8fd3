//! A bundle source that gives up when the interrupt flag is set, however long the source
//! itself blocks.
//!
//! A read from a pipe whose writer went quiet, or from a socket whose server stopped sending
//! (until the read timeout, 60 s by default), cannot be cancelled from another thread. So the
//! source runs on a thread of its own that makes each read or skip when asked; the caller
//! waits for the answer in short slices and checks the flag in between. Once the flag is set,
//! the caller gets an [`Interrupted`] error (the install pipeline then stops and reports the
//! interrupt) and the source thread is left where it blocks: it ends with the process. Nothing
//! is read ahead, so skips (a seek, a new `Range` request), read timeouts and the low-speed
//! check behave exactly as without the wrapper.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use super::{BundleError, BundleSource};

/// How often a waiting caller looks at the flag.
const POLL: Duration = Duration::from_millis(50);
/// Largest read handed to the source thread at once (the caller's reads loop anyway).
const MAX_READ: usize = 1 << 20;

/// The error a read or skip returns once the interrupt flag is set.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by a signal")]
pub struct Interrupted;

enum Call {
    Read(Vec<u8>, usize),
    Skip(u64, Option<u64>),
}

enum Answer {
    Read(Vec<u8>, io::Result<usize>),
    Skip(io::Result<()>),
}

/// A [`BundleSource`] served by its own thread; see the module docs.
pub struct Interruptible {
    calls: Sender<Call>,
    answers: Receiver<Answer>,
    cancel: Arc<AtomicBool>,
    read_through_gap: u64,
    /// Travels to the source thread and back with every read.
    buf: Option<Vec<u8>>,
    /// A call was given up on: its answer may still come, so the position is unknown.
    abandoned: bool,
}

impl Interruptible {
    /// Moves `source` to a new thread; reads and skips then stop waiting when `cancel` is set.
    pub fn new(
        mut source: Box<dyn BundleSource>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self, BundleError> {
        let read_through_gap = source.read_through_gap();
        let (calls, call_rx) = mpsc::channel::<Call>();
        let (answer_tx, answers) = mpsc::channel();
        std::thread::Builder::new()
            .name("bundle source".into())
            .spawn(move || {
                for call in call_rx {
                    let answer = match call {
                        Call::Read(mut buf, want) => {
                            let result = source.read(&mut buf[..want]);
                            Answer::Read(buf, result)
                        }
                        Call::Skip(n, next_read) => Answer::Skip(source.skip_ahead(n, next_read)),
                    };
                    if answer_tx.send(answer).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| BundleError::io("starting the bundle source thread", e))?;
        Ok(Interruptible {
            calls,
            answers,
            cancel,
            read_through_gap,
            buf: Some(vec![0u8; MAX_READ]),
            abandoned: false,
        })
    }

    fn interrupted(&self) -> bool {
        self.abandoned || self.cancel.load(Ordering::Relaxed)
    }

    /// Hands `call` to the source thread and waits for its answer, or for the flag.
    fn call(&mut self, call: Call) -> io::Result<Answer> {
        if self.interrupted() {
            return Err(io::Error::other(Interrupted));
        }
        let gone = || io::Error::other("the bundle source thread stopped");
        self.calls.send(call).map_err(|_| gone())?;
        loop {
            match self.answers.recv_timeout(POLL) {
                Ok(answer) => return Ok(answer),
                Err(RecvTimeoutError::Timeout) if self.cancel.load(Ordering::Relaxed) => {
                    self.abandoned = true;
                    return Err(io::Error::other(Interrupted));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        }
    }
}

impl Read for Interruptible {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mine = self.buf.take().unwrap_or_else(|| vec![0u8; MAX_READ]);
        let want = buf.len().min(mine.len());
        match self.call(Call::Read(mine, want))? {
            Answer::Read(mine, result) => {
                if let Ok(n) = result {
                    buf[..n].copy_from_slice(&mine[..n]);
                }
                self.buf = Some(mine);
                result
            }
            Answer::Skip(_) => Err(io::Error::other(
                "bundle source thread answered out of turn",
            )),
        }
    }
}

impl BundleSource for Interruptible {
    fn skip_ahead(&mut self, n: u64, next_read: Option<u64>) -> io::Result<()> {
        match self.call(Call::Skip(n, next_read))? {
            Answer::Skip(result) => result,
            Answer::Read(..) => Err(io::Error::other(
                "bundle source thread answered out of turn",
            )),
        }
    }

    fn read_through_gap(&self) -> u64 {
        self.read_through_gap
    }
}

/// Runs `f` on a thread of its own and returns what it returns, or `Err(Interrupted)` as soon
/// as `cancel` is set (the thread is then left to finish or block on its own). For a blocking
/// step before the stream exists, such as the first request of a download.
pub fn run_interruptible<T: Send + 'static>(
    cancel: &AtomicBool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Interrupted> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new().spawn(move || {
        let _ = tx.send(f());
    });
    if spawned.is_err() {
        return Err(Interrupted);
    }
    loop {
        match rx.recv_timeout(POLL) {
            Ok(value) => return Ok(value),
            Err(RecvTimeoutError::Timeout) if !cancel.load(Ordering::Relaxed) => {}
            Err(_) => return Err(Interrupted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::time::Instant;

    /// Blocks in `read` until the test ends (the other end of a channel never sends).
    struct Stalled(Receiver<()>);
    impl Read for Stalled {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Ok(0)
        }
    }
    impl BundleSource for Stalled {}

    #[test]
    fn passes_reads_and_skips_through() {
        let data: Vec<u8> = (0..=255u8).cycle().take(3 * MAX_READ).collect();
        let flag = Arc::new(AtomicBool::new(false));
        let mut src = Interruptible::new(Box::new(Cursor::new(data.clone())), flag).unwrap();
        let mut head = [0u8; 10];
        src.read_exact(&mut head).unwrap();
        src.skip_ahead(1000, None).unwrap();
        let mut rest = Vec::new();
        src.read_to_end(&mut rest).unwrap();
        assert_eq!(head, data[..10]);
        assert_eq!(rest, data[1010..]);
    }

    #[test]
    fn a_blocked_read_gives_up_when_the_flag_is_set() {
        let (_keep, rx) = mpsc::channel();
        let flag = Arc::new(AtomicBool::new(false));
        let mut src = Interruptible::new(Box::new(Stalled(rx)), Arc::clone(&flag)).unwrap();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            flag.store(true, Ordering::Relaxed);
        });
        let started = Instant::now();
        let err = src.read(&mut [0u8; 16]).unwrap_err();
        assert!(
            err.get_ref().is_some_and(|e| e.is::<Interrupted>()),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        // The abandoned read may still answer: later calls refuse instead of desynchronising.
        assert!(src.skip_ahead(1, None).is_err());
        setter.join().unwrap();
    }
}
