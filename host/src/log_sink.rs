//! Where the process's log lines go: a buffer that a background thread writes out in batches.
//!
//! Every granted or refused request writes an audit line. Handing each line to a writer thread
//! that wakes for it (as `tracing-appender`'s non-blocking writer does) costs the request path a
//! futex wake-up, a context switch and a `write` per line; `make bench` measured that as a
//! large share of `azgate serve`'s CPU time per request. Here a line is appended to a shared
//! buffer under a short lock, and the writer thread wakes every [`FLUSH_INTERVAL`] (or early,
//! once [`HIGH_WATER`] bytes wait) and writes everything in one call. Nothing is ever dropped:
//! a producer that finds [`MAX_BUFFERED`] bytes waiting blocks until the writer has taken them
//! (back-pressure, as audit lines must not be lost), and dropping the [`FlushGuard`] writes
//! what is left before the process exits.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest a line waits in the buffer before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(10);
/// Bytes waiting at which the writer is woken before the interval ends.
pub const HIGH_WATER: usize = 256 * 1024;
/// Bytes waiting at which producers wait for the writer.
pub const MAX_BUFFERED: usize = 8 * 1024 * 1024;

/// The lines waiting, and whether the sink is closing.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    closing: bool,
    /// The writer was already woken for the bytes waiting now.
    woken: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Signals the writer: high water reached, or closing.
    wake: Condvar,
    /// Signals producers: the writer took the bytes.
    drained: Condvar,
}

impl Shared {
    /// The lock, whatever a panicking holder left: the buffer is only bytes, always usable.
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A `tracing_subscriber` writer appending to the batch (cheap to clone: one `Arc`).
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Writes what is left and stops the writer thread when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread writing batches to `output`.
pub fn batched<W: Write + Send + 'static>(
    output: W,
) -> std::io::Result<(BatchedWriter, FlushGuard)> {
    let shared = Arc::new(Shared::default());
    let thread = std::thread::Builder::new()
        .name("azgate-log".into())
        .spawn({
            let shared = shared.clone();
            move || write_batches(&shared, output)
        })?;
    Ok((
        BatchedWriter {
            shared: shared.clone(),
        },
        FlushGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_batches<W: Write>(shared: &Shared, mut output: W) {
    let mut batch = Vec::new();
    loop {
        let closing = {
            let mut pending = shared.lock();
            if !pending.closing && pending.bytes.len() < HIGH_WATER {
                pending = shared
                    .wake
                    .wait_timeout(pending, FLUSH_INTERVAL)
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            }
            std::mem::swap(&mut batch, &mut pending.bytes);
            pending.woken = false;
            pending.closing
        };
        shared.drained.notify_all();
        if !batch.is_empty() {
            // Nowhere to report a failing stderr; the lines are gone either way.
            let _ = output.write_all(&batch).and_then(|()| output.flush());
            batch.clear();
        }
        if closing && shared.lock().bytes.is_empty() {
            return;
        }
    }
}

impl Write for BatchedWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.lock();
        while pending.bytes.len() >= MAX_BUFFERED && !pending.closing {
            pending = self
                .shared
                .drained
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
        pending.bytes.extend_from_slice(bytes);
        if pending.bytes.len() >= HIGH_WATER && !pending.woken {
            pending.woken = true;
            self.shared.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Lines are written within FLUSH_INTERVAL; waiting for that here would put the
        // writer's pace back on the request path.
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedWriter {
    type Writer = BatchedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_in_order_by_the_time_the_guard_is_dropped() {
        let captured = Captured::default();
        let (writer, guard) = batched(captured.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        writer
                            .write_all(format!("thread {t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        for t in 0..4 {
            let lines: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(lines, (0..5000).collect::<Vec<_>>(), "thread {t}");
        }
    }

    #[test]
    fn a_line_is_written_within_the_flush_interval_without_more_traffic() {
        let captured = Captured::default();
        let (mut writer, _guard) = batched(captured.clone()).unwrap();
        writer.write_all(b"one line\n").unwrap();
        let deadline = std::time::Instant::now() + FLUSH_INTERVAL * 50;
        while captured.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(*captured.0.lock().unwrap(), b"one line\n");
    }

    /// An output that holds every write until the test lets it go.
    struct Stalled(Arc<Mutex<Vec<u8>>>, std::sync::mpsc::Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let _ = self.1.recv();
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_buffer_holds_producers_back_instead_of_dropping_lines() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let (release, stalled) = std::sync::mpsc::sync_channel(0);
        let (writer, guard) = batched(Stalled(out.clone(), stalled)).unwrap();
        let line = vec![b'x'; 1024];
        let total = MAX_BUFFERED / line.len() * 3;
        let producer = std::thread::spawn({
            let mut writer = writer.clone();
            let line = line.clone();
            move || {
                for _ in 0..total {
                    writer.write_all(&line).unwrap();
                }
            }
        });
        // With the output stalled the producer cannot finish: at most one batch in the writer's
        // hands plus one full buffer.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!producer.is_finished(), "the producer was never held back");
        // Let every write through.
        std::thread::spawn(move || while release.send(()).is_ok() {});
        producer.join().unwrap();
        drop(guard);
        assert_eq!(out.lock().unwrap().len(), total * line.len());
    }
}
