//! Process logs (access logs included): formatted on the thread where they happen,
//! written to stdout by a thread of their own, in batches.
//!
//! A proxy logs one access-log line per connection or request. Handing each line to
//! a writer thread through a channel costs a futex wake-up, a context switch and a
//! `write` per line; at 1000 requests/s that was a fifth of the waypoint's CPU. Here
//! lines are appended to a shared buffer under a short lock, and the writer is woken
//! only when the buffer goes from empty to non-empty while it waits. A line logged
//! when nothing else is being logged is written at once; under load, the writer
//! takes a batch, writes it with one call, then waits [`BATCH_WINDOW`] so the next
//! batch gathers. A slow reader of stdout never stalls a connection: beyond
//! [`MAX_BUFFERED`] bytes, lines are dropped and counted ([`DroppedLines`]).
use std::{
    io::Write,
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use tracing_subscriber::{EnvFilter, fmt::MakeWriter, layer::SubscriberExt, reload, util::SubscriberInitExt};

use crate::admin::SetLogLevel;

/// How long the writer lets lines gather after writing a batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Bytes waiting to be written beyond which new lines are dropped.
pub const MAX_BUFFERED: usize = 8 << 20;
/// A spare buffer larger than this is given back after a burst.
const KEEP_CAPACITY: usize = 256 << 10;

/// Lines dropped because the writer fell behind (read by the admin's metrics).
#[derive(Clone, Debug, Default)]
pub struct DroppedLines(Arc<AtomicU64>);

impl DroppedLines {
    pub fn dropped_lines(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Pending {
    buffer: Vec<u8>,
    /// The writer is blocked waiting for a first line.
    waiting: bool,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
    dropped: DroppedLines,
}

/// The `MakeWriter` given to `tracing_subscriber`: every event is one `write_all`
/// of a formatted line, appended whole or dropped whole.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

impl Write for &BatchWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.closed || pending.buffer.len() + line.len() > MAX_BUFFERED {
            self.shared.dropped.0.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        pending.buffer.extend_from_slice(line);
        if pending.waiting {
            pending.waiting = false;
            self.shared.ready.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = &'a BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Flushes what is buffered and stops the writer thread when dropped (keep it alive
/// for the life of the process).
pub struct WriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.shared.pending.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        self.shared.ready.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A batching writer to `out` and the guard that owns its thread.
pub fn batch_writer<W: Write + Send + 'static>(out: W, window: Duration) -> (BatchWriter, WriterGuard) {
    let shared = Arc::new(Shared::default());
    let writer_side = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_batches(&writer_side, out, window))
        .expect("spawn the log writer thread");
    (BatchWriter { shared: Arc::clone(&shared) }, WriterGuard { shared, thread: Some(thread) })
}

fn write_batches<W: Write>(shared: &Shared, mut out: W, window: Duration) {
    let mut batch = Vec::new();
    loop {
        let closed = {
            let mut pending = shared.pending.lock().unwrap_or_else(PoisonError::into_inner);
            while pending.buffer.is_empty() && !pending.closed {
                pending.waiting = true;
                pending = shared.ready.wait(pending).unwrap_or_else(PoisonError::into_inner);
            }
            std::mem::swap(&mut pending.buffer, &mut batch);
            pending.closed
        };
        // A reader that went away loses the lines; the proxy goes on.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > KEEP_CAPACITY {
            batch = Vec::new();
        }
        if closed {
            return;
        }
        let pending = shared.pending.lock().unwrap_or_else(PoisonError::into_inner);
        // Let lines gather, unless the process is stopping.
        drop(shared.ready.wait_timeout_while(pending, window, |p| !p.closed));
    }
}

/// What [`init`] hands back: the level setter for the admin, the writer's guard and
/// its drop counter.
pub struct Logging {
    pub set_level: SetLogLevel,
    pub guard: WriterGuard,
    pub dropped: DroppedLines,
}

/// Installs the process's subscriber: `filter` (an `EnvFilter` directive), `json` or
/// text lines, to stdout through a [`BatchWriter`].
pub fn init(filter: &str, json: bool) -> Result<Logging, String> {
    let directives = EnvFilter::try_new(filter).map_err(|e| format!("--log: invalid filter '{filter}': {e}"))?;
    let (directives, handle) = reload::Layer::new(directives);
    let (writer, guard) = batch_writer(std::io::stdout(), BATCH_WINDOW);
    let dropped = writer.shared.dropped.clone();
    let registry = tracing_subscriber::registry().with(directives);
    if json {
        registry.with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(writer)).init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer)).init();
    }
    let set_level: SetLogLevel = Arc::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| format!("invalid log filter '{level}': {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    Ok(Logging { set_level, guard, dropped })
}

#[cfg(test)]
mod tests;
