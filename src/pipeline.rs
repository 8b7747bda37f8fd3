//! The one parallel chunk pipeline: a producer thread fills buffers in order, worker threads
//! transform them in any order, and the calling thread consumes them back in order.
//!
//! Why one primitive: the bundle reader (read frame → decompress and hash → write) and the
//! bundle writer (read image → hash and compress → write frame) have the same shape, and the
//! hard parts — bounded memory, no deadlock when any stage stops, and which error wins — must
//! be right once, with tests of their own, not twice by hand.
//!
//! How it stays bounded: `in_flight` slots are made up front and circulate producer → worker →
//! consumer → producer; nothing else allocates per item, so memory is `in_flight` slots however
//! many items pass. How it never hangs: only the workers hold the work queue's receiver, so if
//! the consumer stops, the workers end, the producer's next send fails and it ends too; a
//! producer that stops drops its sender, and the workers and then the consumer see the end.
//!
//! Which error wins: the consumer's own error is the most specific one (it saw the item that
//! failed), unless it only saw its input end early; then the producer's error, then the
//! workers' in order. A panicking thread becomes an error naming the thread.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::ScopedJoinHandle;

/// A failure of the pipeline machinery itself, not of any stage's work. The caller's error
/// type converts it (see [`Stages::Error`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineFault {
    /// A stage's thread panicked; the string names it.
    #[error("{0} panicked")]
    Panicked(&'static str),
    /// Every stage ended, none with an error, before all items were consumed.
    #[error("{0} stopped without an error")]
    StoppedWithoutError(&'static str),
    /// A worker panicked while holding the work queue.
    #[error("work queue lock poisoned")]
    Poisoned,
}

/// A worker's result for one item: the item's index and its slot, or the error.
type Done<S, E> = Result<(u32, S), E>;

/// The consumer: called on the calling thread with each item in index order.
pub type Consume<'a, S, E> = dyn FnMut(u32, &mut S) -> Result<(), E> + 'a;

/// Names used in [`PipelineFault`] messages.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    /// The pipeline as a whole ("parallel reader").
    pub pipeline: &'static str,
    /// The producer thread ("bundle reader thread").
    pub producer: &'static str,
    /// A worker thread ("decode worker").
    pub worker: &'static str,
}

/// The three stages of one pipeline run over items `0..count`.
pub trait Stages: Sync {
    /// The buffers that circulate.
    type Slot: Send;
    /// Per-worker state (a decompressor, a compressor).
    type Worker;
    /// The error of every stage.
    type Error: Send + From<PipelineFault>;

    /// Makes one of the `in_flight` slots.
    fn new_slot(&self) -> Self::Slot;
    /// Makes one worker's state, on that worker's thread.
    fn new_worker(&self) -> Result<Self::Worker, Self::Error>;
    /// Transforms item `index` in place, on a worker thread, in any order.
    fn work(
        &self,
        worker: &mut Self::Worker,
        index: u32,
        slot: &mut Self::Slot,
    ) -> Result<(), Self::Error>;
}

/// The producer: runs on its own thread and fills slots for items in order.
pub trait Producer<S>: Send {
    /// What it returns at the end (a stream position, a hash).
    type Output;
    /// The error type.
    type Error;
    /// Fills `slot` with item `index`.
    fn fill(&mut self, index: u32, slot: &mut S) -> Result<(), Self::Error>;
    /// Called once every item was filled; its result is [`Producer::Output`].
    fn finish(self) -> Result<Self::Output, Self::Error>;
}

/// Runs items `0..count` through the pipeline with `workers` worker threads and `in_flight`
/// slots, handing each item to `consume` on the calling thread in index order. Returns the
/// producer's output once every item was consumed and every thread ended without error.
pub fn run<St, P>(
    stages: &St,
    names: Names,
    count: u32,
    workers: usize,
    in_flight: usize,
    producer: P,
    consume: &mut Consume<'_, St::Slot, St::Error>,
) -> Result<P::Output, St::Error>
where
    St: Stages,
    P: Producer<St::Slot, Error = St::Error>,
    P::Output: Send,
{
    let workers = workers.max(1);
    let in_flight = in_flight.max(1);
    let (free_tx, free_rx) = mpsc::sync_channel::<St::Slot>(in_flight);
    for _ in 0..in_flight {
        free_tx
            .send(stages.new_slot())
            .expect("the free-slot channel holds in_flight slots");
    }
    let (work_tx, work_rx) = mpsc::sync_channel::<(u32, St::Slot)>(in_flight);
    // Only the workers may hold the work receiver: if the consumer stops, the workers exit and
    // the producer's send must then fail instead of blocking on a receiver nobody drains.
    let work_rx = Arc::new(Mutex::new(work_rx));
    let worker_rxs: Vec<_> = (0..workers).map(|_| Arc::clone(&work_rx)).collect();
    drop(work_rx);
    let (done_tx, done_rx) = mpsc::sync_channel::<Done<St::Slot, St::Error>>(in_flight);

    let (consumed, produced, worker_results) = std::thread::scope(|s| {
        let producer = s.spawn(move || produce(producer, count, free_rx, work_tx));
        let handles: Vec<_> = worker_rxs
            .into_iter()
            .map(|rx| {
                let done_tx = done_tx.clone();
                s.spawn(move || work_loop(stages, names.worker, &rx, &done_tx))
            })
            .collect();
        drop(done_tx);
        let consumed = consume_in_order(count, done_rx, free_tx, consume);
        let produced = join(producer, names.producer);
        let worker_results: Vec<_> = handles.into_iter().map(|h| join(h, names.worker)).collect();
        (consumed, produced, worker_results)
    });

    match consumed {
        Ok(()) => {}
        Err(Some(e)) => return Err(e),
        Err(None) => {
            produced?;
            for r in worker_results {
                r?;
            }
            return Err(PipelineFault::StoppedWithoutError(names.pipeline).into());
        }
    }
    let output = produced?.ok_or(PipelineFault::StoppedWithoutError(names.pipeline))?;
    for r in worker_results {
        r?;
    }
    Ok(output)
}

/// Joins a stage's thread; a panic becomes [`PipelineFault::Panicked`] naming it.
fn join<T, E: From<PipelineFault>>(
    handle: ScopedJoinHandle<'_, Result<T, E>>,
    what: &'static str,
) -> Result<T, E> {
    handle
        .join()
        .unwrap_or_else(|_| Err(PipelineFault::Panicked(what).into()))
}

/// Producer thread. `Ok(None)`: the consumer stopped first (it reports why).
fn produce<S, P: Producer<S>>(
    mut producer: P,
    count: u32,
    free_rx: Receiver<S>,
    work_tx: SyncSender<(u32, S)>,
) -> Result<Option<P::Output>, P::Error> {
    for index in 0..count {
        let Ok(mut slot) = free_rx.recv() else {
            return Ok(None);
        };
        producer.fill(index, &mut slot)?;
        if work_tx.send((index, slot)).is_err() {
            return Ok(None);
        }
    }
    producer.finish().map(Some)
}

/// Worker thread: transforms slots until the work queue closes.
fn work_loop<St: Stages>(
    stages: &St,
    name: &'static str,
    work_rx: &Mutex<Receiver<(u32, St::Slot)>>,
    done_tx: &SyncSender<Done<St::Slot, St::Error>>,
) -> Result<(), St::Error> {
    let mut worker = stages.new_worker()?;
    loop {
        let next = match work_rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return Err(PipelineFault::Poisoned.into()),
        };
        let Ok((index, mut slot)) = next else {
            return Ok(());
        };
        // A panic is caught and sent on as an error: the consumer would otherwise wait forever
        // for the item this worker held while the other workers fill every slot.
        let worked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            stages.work(&mut worker, index, &mut slot)
        }));
        let (message, panicked) = match worked {
            Ok(result) => (result.map(|()| (index, slot)), false),
            Err(_) => (Err(PipelineFault::Panicked(name).into()), true),
        };
        if done_tx.send(message).is_err() || panicked {
            return Ok(());
        }
    }
}

/// Consumer (calling thread): restores index order, consumes, recycles slots. `Err(None)`: the
/// input ended before the last item (the cause is in another stage).
fn consume_in_order<S, E>(
    count: u32,
    done_rx: Receiver<Done<S, E>>,
    free_tx: SyncSender<S>,
    consume: &mut Consume<'_, S, E>,
) -> Result<(), Option<E>> {
    let mut pending: BTreeMap<u32, S> = BTreeMap::new();
    let mut next = 0;
    while next < count {
        let mut slot = match pending.remove(&next) {
            Some(slot) => slot,
            None => {
                let (index, slot) = done_rx.recv().map_err(|_| None)?.map_err(Some)?;
                if index != next {
                    pending.insert(index, slot);
                    continue;
                }
                slot
            }
        };
        consume(next, &mut slot).map_err(Some)?;
        next += 1;
        // The producer may already have finished; a closed channel is fine.
        let _ = free_tx.send(slot);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[derive(Debug, PartialEq, Eq)]
    enum TestError {
        Fault(PipelineFault),
        Stage(&'static str, u32),
    }

    impl From<PipelineFault> for TestError {
        fn from(f: PipelineFault) -> Self {
            TestError::Fault(f)
        }
    }

    const NAMES: Names = Names {
        pipeline: "test pipeline",
        producer: "test producer",
        worker: "test worker",
    };

    /// Squares numbers; fails or panics at chosen items; counts live slots.
    struct Square {
        slots_made: AtomicUsize,
        fail_work_at: Option<u32>,
        panic_work_at: Option<u32>,
    }

    impl Square {
        fn new() -> Self {
            Square {
                slots_made: AtomicUsize::new(0),
                fail_work_at: None,
                panic_work_at: None,
            }
        }
    }

    impl Stages for Square {
        type Slot = Vec<u64>;
        type Worker = ();
        type Error = TestError;
        fn new_slot(&self) -> Vec<u64> {
            self.slots_made.fetch_add(1, Ordering::SeqCst);
            Vec::new()
        }
        fn new_worker(&self) -> Result<(), TestError> {
            Ok(())
        }
        fn work(&self, _: &mut (), index: u32, slot: &mut Vec<u64>) -> Result<(), TestError> {
            // Later items finish first, so the consumer must reorder.
            std::thread::sleep(Duration::from_micros(u64::from(50 - index % 50)));
            if self.fail_work_at == Some(index) {
                return Err(TestError::Stage("work", index));
            }
            if self.panic_work_at == Some(index) {
                panic!("worker panics at {index}");
            }
            slot[0] *= slot[0];
            Ok(())
        }
    }

    struct Counter {
        sum: u64,
        fail_at: Option<u32>,
    }

    impl Producer<Vec<u64>> for Counter {
        type Output = u64;
        type Error = TestError;
        fn fill(&mut self, index: u32, slot: &mut Vec<u64>) -> Result<(), TestError> {
            if self.fail_at == Some(index) {
                return Err(TestError::Stage("produce", index));
            }
            slot.clear();
            slot.push(u64::from(index));
            self.sum += u64::from(index);
            Ok(())
        }
        fn finish(self) -> Result<u64, TestError> {
            Ok(self.sum)
        }
    }

    fn counter() -> Counter {
        Counter {
            sum: 0,
            fail_at: None,
        }
    }

    #[test]
    fn items_come_back_in_order_and_memory_is_the_slots() {
        for workers in [1, 2, 3, 8] {
            let stages = Square::new();
            let mut seen = Vec::new();
            let sum = run(
                &stages,
                NAMES,
                500,
                workers,
                2 * workers + 2,
                counter(),
                &mut |i, s| {
                    seen.push((i, s[0]));
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(sum, (0..500u64).sum::<u64>());
            let expected: Vec<_> = (0..500u32)
                .map(|i| (i, u64::from(i) * u64::from(i)))
                .collect();
            assert_eq!(seen, expected, "{workers} workers");
            assert_eq!(stages.slots_made.load(Ordering::SeqCst), 2 * workers + 2);
        }
    }

    #[test]
    fn zero_items_still_finishes_the_producer() {
        let stages = Square::new();
        let out = run(&stages, NAMES, 0, 2, 4, counter(), &mut |_, _| {
            panic!("nothing to consume")
        });
        assert_eq!(out, Ok(0));
    }

    #[test]
    fn the_consumer_error_wins_and_nothing_hangs() {
        let stages = Square::new();
        let mut consumed = 0;
        let out = run(&stages, NAMES, 10_000, 2, 6, counter(), &mut |i, _| {
            consumed += 1;
            if i == 7 {
                return Err(TestError::Stage("consume", i));
            }
            Ok(())
        });
        assert_eq!(out, Err(TestError::Stage("consume", 7)));
        assert_eq!(consumed, 8);
    }

    #[test]
    fn a_producer_error_is_reported_after_the_items_before_it() {
        let stages = Square::new();
        let mut consumed = Vec::new();
        let producer = Counter {
            sum: 0,
            fail_at: Some(40),
        };
        let out = run(&stages, NAMES, 100, 2, 6, producer, &mut |i, _| {
            consumed.push(i);
            Ok(())
        });
        assert_eq!(out, Err(TestError::Stage("produce", 40)));
        assert_eq!(consumed, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn a_worker_error_reaches_the_caller() {
        let mut stages = Square::new();
        stages.fail_work_at = Some(13);
        let out = run(&stages, NAMES, 100, 3, 8, counter(), &mut |_, _| Ok(()));
        assert_eq!(out, Err(TestError::Stage("work", 13)));
    }

    #[test]
    fn a_worker_panic_becomes_an_error_naming_the_worker() {
        let mut stages = Square::new();
        stages.panic_work_at = Some(5);
        let out = run(&stages, NAMES, 100, 2, 6, counter(), &mut |_, _| Ok(()));
        assert_eq!(
            out,
            Err(TestError::Fault(PipelineFault::Panicked("test worker")))
        );
    }
}
