//! Moving bytes between the two sides of a proxied connection, with byte counts that
//! telemetry can read while the connection lives, and (inbound) a re-check of the
//! authorization policies on every configuration change that closes a connection
//! the new policies deny.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};

use crate::{
    control::ConfigState,
    metrics::{Metrics, TcpLabels},
    telemetry::Outcome,
};

/// Copy buffer sizes per direction: a connection starts with the smallest and moves
/// up one step each time a read fills its buffer, so an idle or chatty connection
/// holds 1 KiB a direction and a bulk transfer still moves in few syscalls.
const BUFFER_STEPS: [usize; 3] = [1024, 16 * 1024, 128 * 1024];
/// How often the byte counters of a long connection are added to the metrics.
const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// A stream that counts the bytes read from and written to it.
pub struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<S> Counted<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, read: Arc::default(), written: Arc::default() }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read.fetch_add((buf.filled().len() - before) as u64, Relaxed);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &poll {
            self.written.fetch_add(*n as u64, Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What re-checks a connection's authorization when the configuration changes: a
/// denial closes it. `check` returns the reason of a denial.
pub struct Recheck {
    pub changes: watch::Receiver<Arc<ConfigState>>,
    pub check: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
}

/// How a relay ended.
#[derive(Debug, Default)]
pub struct Report {
    /// Bytes the client sent (towards the server).
    pub sent: u64,
    /// Bytes the client received.
    pub received: u64,
    pub outcome: Option<Outcome>,
    pub reason: Option<String>,
}

/// Relays until both sides are done (or a policy change denies the connection).
/// `client` is the side the connection came from.
pub async fn run<A, B>(
    mut client: Counted<A>,
    mut upstream: B,
    recheck: Option<Recheck>,
    metrics: &Metrics,
    labels: &Arc<TcpLabels>,
) -> Report
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (sent, received) = (client.read.clone(), client.written.clone());
    let mut flushed = (0, 0);
    let flush = |flushed: &mut (u64, u64)| {
        let now = (sent.load(Relaxed), received.load(Relaxed));
        metrics.bytes(labels, now.0 - flushed.0, now.1 - flushed.1);
        *flushed = now;
    };
    let (mut config, check) = match recheck {
        Some(Recheck { changes, check }) => (Some(changes), Some(check)),
        None => (None, None),
    };
    let mut report = Report::default();
    {
        let copy = copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        // The first flush is one period away. (An interval's first tick is "now",
        // which the timer driver rounds up to its next millisecond: awaiting it held
        // every new connection's first bytes back by up to 1 ms and cost a wake-up.)
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + FLUSH_EVERY, FLUSH_EVERY);
        loop {
            tokio::select! {
                result = &mut copy => {
                    if let Err(error) = result {
                        report.outcome = Some(Outcome::Reset);
                        report.reason = Some(error.to_string());
                    }
                    break;
                }
                _ = tick.tick() => flush(&mut flushed),
                changed = async {
                    match config.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if changed.is_err() {
                        config = None;
                        continue;
                    }
                    let Some(check) = &check else { continue };
                    if let Err(reason) = check() {
                        report.outcome = Some(Outcome::Denied);
                        report.reason = Some(format!("closed by a policy change: {reason}"));
                        break;
                    }
                }
            }
        }
    }
    flush(&mut flushed);
    report.sent = flushed.0;
    report.received = flushed.1;
    report
}

/// One direction of a relay: reads into a buffer that grows with the traffic and
/// writes it out; shuts the writer down after the reader's end of stream.
#[derive(Default)]
struct Direction {
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    read_done: bool,
    write_pending_flush: bool,
    done: bool,
}

impl Direction {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.start == self.end && !self.read_done {
                if self.buffer.is_empty() {
                    self.buffer = vec![0; BUFFER_STEPS[0]];
                }
                let mut buf = ReadBuf::new(&mut self.buffer);
                match reader.as_mut().poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len();
                        self.start = 0;
                        self.end = n;
                        if n == 0 {
                            self.read_done = true;
                        } else if n == self.buffer.len()
                            && let Some(next) = BUFFER_STEPS.iter().find(|size| **size > n)
                        {
                            // A full read: the peer has more; the next read takes more.
                            self.buffer.resize(*next, 0);
                        }
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => {
                        if self.write_pending_flush {
                            std::task::ready!(writer.as_mut().poll_flush(cx))?;
                            self.write_pending_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                let n = std::task::ready!(writer.as_mut().poll_write(cx, &self.buffer[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.write_pending_flush = true;
            }
            if self.read_done {
                std::task::ready!(writer.as_mut().poll_flush(cx))?;
                std::task::ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                // Nothing more moves this way: give the buffer back now.
                self.buffer = Vec::new();
            }
        }
    }
}

/// Copies both ways until both readers ended and both writers were shut down (a
/// half-closed connection keeps flowing the other way), with buffers that grow with
/// the traffic.
async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
    std::future::poll_fn(|cx| {
        let forward = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let backward = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        if forward.is_ready() && backward.is_ready() { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
    .await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn copies_both_ways_through_half_close_with_growing_buffers() {
        let (mut client, mut client_side) = tokio::io::duplex(256 * 1024);
        let (mut upstream_side, mut upstream) = tokio::io::duplex(256 * 1024);
        let relay = tokio::spawn(async move { copy_bidirectional(&mut client_side, &mut upstream_side).await });
        // A bulk transfer larger than every buffer step, then the client half-closes.
        let bulk: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
        let sent = bulk.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut received = Vec::new();
        upstream.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, bulk, "every byte, in order, then end of stream");
        // The other direction still flows after the half-close.
        upstream.write_all(b"answer after half-close").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut client = writer.await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer after half-close");
        relay.await.unwrap().unwrap();
    }

    /// A new connection's first bytes move on the relay's first poll: nothing waits
    /// for the timer driver's next tick first.
    #[tokio::test]
    async fn first_bytes_move_on_the_first_poll() {
        let (mut client, client_side) = tokio::io::duplex(1024);
        let (upstream_side, mut upstream) = tokio::io::duplex(1024);
        client.write_all(b"first").await.unwrap();
        let metrics = Metrics::default();
        let labels = Arc::new(TcpLabels::default());
        let relay = run(Counted::new(client_side), upstream_side, None, &metrics, &labels);
        tokio::pin!(relay);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(relay.as_mut().poll(&mut cx).is_pending());
        let mut buf = [0u8; 16];
        let mut read = ReadBuf::new(&mut buf);
        let polled = Pin::new(&mut upstream).poll_read(&mut cx, &mut read);
        assert!(matches!(polled, Poll::Ready(Ok(()))), "{polled:?}");
        assert_eq!(read.filled(), b"first", "relayed before any timer fired");
    }

    #[test]
    fn a_buffer_starts_small_and_grows_only_on_full_reads() {
        let mut direction = Direction::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut reader: &[u8] = &[7u8; 5000];
        let mut writer = Vec::new();
        let poll = direction.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer));
        assert!(poll.is_ready());
        assert_eq!(writer.len(), 5000);
        // 1 KiB full -> 16 KiB; 5000 bytes never filled 16 KiB; freed at the end.
        assert!(direction.done && direction.buffer.is_empty());
        let mut small = Direction::default();
        let mut reader: &[u8] = b"hello";
        let mut writer = Vec::new();
        let _ = small.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer));
        assert_eq!(writer, b"hello");
    }
}
