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

use bytes::{BufMut as _, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};

use crate::{
    metrics::{Metrics, TcpLabels},
    telemetry::Outcome,
};

/// Copy buffer sizes per direction: a connection starts with the smallest and moves
/// up one step each time a read fills its buffer, so an idle or chatty connection
/// holds 1 KiB a direction and a bulk transfer still moves in few syscalls.
///
/// The larger steps leave room for the 9-byte head of the HTTP/2 DATA frame a read
/// becomes on a tunnel, so that a frame is a whole number of 16 KiB TLS records.
/// With 128 KiB reads, each frame's last 9 bytes went out as a record and a TCP
/// segment of their own (rustls writes at most 64 KiB at a time): one tiny packet
/// through the whole network path per frame. Without it, one iperf3 stream through
/// both agents moved 9.4 instead of 8.0 Gbit/s, for about 13 % less CPU per byte.
const BUFFER_STEPS: [usize; 3] = [1024, 16 * 1024 - FRAME_HEAD, 128 * 1024 - FRAME_HEAD];
/// The head of an HTTP/2 frame.
const FRAME_HEAD: usize = 9;
/// How often the byte counters of a long connection are added to the metrics.
const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// One side of a relay. A socket is read into the relay's buffer and written from it
/// (the defaults); a tunnel stream hands out the chunks it received and takes owned
/// ones ([`crate::tunnel::stream::H2Stream`]: its HTTP/2 DATA frames), so bytes
/// between a tunnel stream and a socket are not copied once more on the way.
pub trait Side: AsyncRead + AsyncWrite + Unpin {
    /// The next received chunk (empty at end of stream); `None` when this side is
    /// read into a buffer instead.
    fn poll_chunk(&mut self, _cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        None
    }

    /// Writes some of `data` and advances it past what was written.
    fn poll_send_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        let n = std::task::ready!(Pin::new(&mut *self).poll_write(cx, data))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        bytes::Buf::advance(data, n);
        Poll::Ready(Ok(()))
    }
}

impl Side for tokio::net::TcpStream {}
impl Side for tokio::io::DuplexStream {}

impl<S: Side + ?Sized> Side for Box<S> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        (**self).poll_chunk(cx)
    }

    fn poll_send_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        (**self).poll_send_chunk(cx, data)
    }
}

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

    /// Bytes read from and written to the stream so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.read.load(Relaxed), self.written.load(Relaxed))
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

impl<S: Side> Side for Counted<S> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        let poll = self.inner.poll_chunk(cx)?;
        if let Poll::Ready(Ok(chunk)) = &poll {
            self.read.fetch_add(chunk.len() as u64, Relaxed);
        }
        Some(poll)
    }

    fn poll_send_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        let before = data.len();
        let poll = self.inner.poll_send_chunk(cx, data);
        self.written.fetch_add((before - data.len()) as u64, Relaxed);
        poll
    }
}

/// What re-checks a connection's authorization when the configuration changes: a
/// denial closes it. `check` returns the reason of a denial.
pub struct Recheck {
    /// Every new workload index (built once per applied configuration).
    pub changes: watch::Receiver<Arc<crate::workloads::Index>>,
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
/// `client` is the side the connection came from; its bytes are added to each of
/// `series` (one per reporter: a connection between two pods of the node is reported
/// by both ends).
pub async fn run<A, B>(
    mut client: Counted<A>,
    mut upstream: B,
    recheck: Option<Recheck>,
    series: &[(&Metrics, &Arc<TcpLabels>)],
) -> Report
where
    A: Side,
    B: Side,
{
    let (sent, received) = (client.read.clone(), client.written.clone());
    let mut flushed = (0, 0);
    let flush = |flushed: &mut (u64, u64)| {
        let now = (sent.load(Relaxed), received.load(Relaxed));
        for (metrics, labels) in series {
            metrics.bytes(labels, now.0 - flushed.0, now.1 - flushed.1);
        }
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

/// One direction of a relay: takes the reader's chunks, or reads into a buffer that
/// grows with the traffic, and writes them out; shuts the writer down after the
/// reader's end of stream.
// Independent facts of one way's progress, not one state in disguise.
#[allow(clippy::struct_excessive_bools)]
#[derive(Default)]
struct Direction {
    /// Where a reader without chunks is read into; what was read is split off.
    buffer: BytesMut,
    /// The current step of [`BUFFER_STEPS`].
    step: usize,
    /// Read, not yet written.
    pending: Bytes,
    /// The reader ended, or failed.
    read_done: bool,
    write_pending_flush: bool,
    done: bool,
    /// Ended by an error.
    failed: bool,
}

impl Direction {
    /// Moves what the reader has to the writer; ready at the end (the writer shut
    /// down) or at an error, after which this way is done.
    fn poll_copy<R: Side + ?Sized, W: Side + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        let poll = self.poll_move(cx, reader, writer);
        if let Poll::Ready(Err(_)) = poll {
            self.done = true;
            self.failed = true;
            self.pending = Bytes::new();
            self.buffer = BytesMut::new();
        }
        poll
    }

    /// After the other way failed: ends this way once it would wait for its reader
    /// (its writer flushed and shut down; an error there ends it too). Whether it has
    /// ended.
    fn poll_end<W: Side + ?Sized>(&mut self, cx: &mut Context<'_>, writer: &mut W) -> bool {
        if self.done {
            return true;
        }
        if !self.awaits_reader() {
            return false;
        }
        let ended = match Pin::new(&mut *writer).poll_flush(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut *writer).poll_shutdown(cx).map(drop),
            Poll::Ready(Err(_)) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        };
        self.done = ended.is_ready();
        self.done
    }

    /// A failed way's reader, read and thrown away until its end or its error: a
    /// socket closed with unread input is reset by Linux, which also drops what the
    /// other way wrote into it and the peer has not read yet. Whether it has ended
    /// (true at once for a way that did not fail or whose reader failed).
    fn poll_discard<R: Side + ?Sized>(&mut self, cx: &mut Context<'_>, reader: &mut R) -> bool {
        // Bounded per poll, so a peer that keeps sending cannot hold the task.
        for _ in 0..64 {
            if !self.failed || self.read_done {
                return true;
            }
            let read = match reader.poll_chunk(cx) {
                Some(poll) => poll,
                None => self.poll_read(cx, reader),
            };
            match read {
                Poll::Ready(Ok(chunk)) => self.read_done = chunk.is_empty(),
                Poll::Ready(Err(_)) => self.read_done = true,
                Poll::Pending => return false,
            }
        }
        cx.waker().wake_by_ref();
        false
    }

    /// Whether this way, not done, waits for its reader with everything read so far
    /// written and flushed (after a [`Poll::Pending`] of [`Direction::poll_copy`]).
    fn awaits_reader(&self) -> bool {
        !self.done && !self.read_done && self.pending.is_empty() && !self.write_pending_flush
    }

    fn poll_move<R: Side + ?Sized, W: Side + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.pending.is_empty() && !self.read_done {
                let read = match reader.poll_chunk(cx) {
                    Some(poll) => poll,
                    None => self.poll_read(cx, reader),
                };
                match read {
                    Poll::Ready(Ok(chunk)) if chunk.is_empty() => self.read_done = true,
                    Poll::Ready(Ok(chunk)) => self.pending = chunk,
                    Poll::Ready(Err(error)) => {
                        self.read_done = true;
                        return Poll::Ready(Err(error));
                    }
                    Poll::Pending => {
                        if self.write_pending_flush {
                            std::task::ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.write_pending_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while !self.pending.is_empty() {
                std::task::ready!(writer.poll_send_chunk(cx, &mut self.pending))?;
                self.write_pending_flush = true;
            }
            // Written out: let go of the allocation, so the next read can reuse it.
            self.pending = Bytes::new();
            if self.read_done {
                std::task::ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                std::task::ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                // Nothing more moves this way: give the buffer back now.
                self.buffer = BytesMut::new();
            }
        }
    }

    /// Reads into the buffer and splits off what was read. A read that fills its
    /// step means the peer has more: the next read takes the next step.
    #[allow(unsafe_code)]
    fn poll_read<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
    ) -> Poll<io::Result<Bytes>> {
        let want = BUFFER_STEPS[self.step];
        // Reuses the allocation once the writer let go of what was split off before.
        self.buffer.reserve(want);
        let spare = &mut self.buffer.spare_capacity_mut()[..want];
        let mut buf = ReadBuf::uninit(spare);
        let start = buf.filled().as_ptr();
        std::task::ready!(Pin::new(reader).poll_read(cx, &mut buf))?;
        // A reader may not swap the buffer it was given.
        assert_eq!(start, buf.filled().as_ptr());
        let n = buf.filled().len();
        // SAFETY: `ReadBuf` counts as filled only bytes the reader initialised, and
        // they are the first `n` of the buffer's spare capacity.
        unsafe { self.buffer.advance_mut(n) };
        if n == want && self.step + 1 < BUFFER_STEPS.len() {
            self.step += 1;
        }
        Poll::Ready(Ok(self.buffer.split().freeze()))
    }
}

/// How long a relay may go on after one way failed: the other way delivering what it
/// had received, then the lingering close.
pub const DELIVER_AFTER_ERROR: Duration = Duration::from_secs(2);

/// Copies both ways until both readers ended and both writers were shut down (a
/// half-closed connection keeps flowing the other way), with buffers that grow with
/// the traffic.
///
/// An error either way ends the relay, but when the other way was still going it
/// first delivers what it has already received: a server may end its response and
/// then reset the rest of the request (RFC 9113, section 8.1, does this with
/// `RST_STREAM` `NO_ERROR`), and the response still reaches the client although the
/// request can no longer be written. That way then ends as soon as it would wait for
/// its reader (its writer shut down), and the failed way's reader is read to its end
/// and thrown away (a lingering close, as web servers do: Linux resets a socket
/// closed with unread input, dropping what its peer has not read yet, however long
/// ago it was written). All of it within [`DELIVER_AFTER_ERROR`]; both ways failed,
/// or a failed way whose reader failed (a reset peer), end the relay at once.
pub async fn copy_bidirectional<A: Side + ?Sized, B: Side + ?Sized>(a: &mut A, b: &mut B) -> io::Result<()> {
    copy_both(a, b, DELIVER_AFTER_ERROR).await
}

async fn copy_both<A: Side + ?Sized, B: Side + ?Sized>(a: &mut A, b: &mut B, grace: Duration) -> io::Result<()> {
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
    // The first error, and the deadline of what follows it.
    let mut failure: Option<(io::Error, Pin<Box<tokio::time::Sleep>>)> = None;
    std::future::poll_fn(|cx| {
        if failure.is_none() {
            let forward = a_to_b.poll_copy(cx, &mut *a, &mut *b);
            let backward = b_to_a.poll_copy(cx, &mut *b, &mut *a);
            let ended = forward.is_ready() && backward.is_ready();
            let error = match (forward, backward) {
                (Poll::Ready(Err(error)), _) | (_, Poll::Ready(Err(error))) => error,
                _ if ended => return Poll::Ready(Ok(())),
                _ => return Poll::Pending,
            };
            // Both failed: nothing to deliver, no one to linger for.
            if a_to_b.failed && b_to_a.failed {
                return Poll::Ready(Err(error));
            }
            failure = Some((error, Box::pin(tokio::time::sleep(grace))));
        } else {
            let _ = a_to_b.poll_copy(cx, &mut *a, &mut *b);
            let _ = b_to_a.poll_copy(cx, &mut *b, &mut *a);
        }
        let (_, deadline) = failure.as_mut().expect("set above");
        let over = (a_to_b.failed && b_to_a.failed) || deadline.as_mut().poll(cx).is_ready() || {
            // Both polled, for their wakers.
            let ended = a_to_b.poll_end(cx, &mut *b) & b_to_a.poll_end(cx, &mut *a);
            ended && a_to_b.poll_discard(cx, &mut *a) & b_to_a.poll_discard(cx, &mut *b)
        };
        if over { Poll::Ready(Err(failure.take().expect("set above").0)) } else { Poll::Pending }
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
        let series = [(&metrics, &labels)];
        let relay = run(Counted::new(client_side), upstream_side, None, &series);
        tokio::pin!(relay);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(relay.as_mut().poll(&mut cx).is_pending());
        let mut buf = [0u8; 16];
        let mut read = ReadBuf::new(&mut buf);
        let polled = Pin::new(&mut upstream).poll_read(&mut cx, &mut read);
        assert!(matches!(polled, Poll::Ready(Ok(()))), "{polled:?}");
        assert_eq!(read.filled(), b"first", "relayed before any timer fired");
    }

    /// A side in memory: reads from `input` (as chunks when `chunks`), records the
    /// size of every read and the pointer of every chunk it is given.
    // A test side's switches.
    #[allow(clippy::struct_excessive_bools)]
    #[derive(Default)]
    struct Mem {
        input: Bytes,
        chunks: bool,
        /// At most this much per read (0: no limit).
        max_read: usize,
        reads: Vec<usize>,
        output: Vec<u8>,
        given: Vec<*const u8>,
        /// Writes fail (a stream reset by the peer).
        reset: bool,
        /// The input has not ended: once it is read, reads wait (and are never woken).
        open: bool,
        /// This many writes wait first (each waking its task at once: a slow writer).
        stall_writes: usize,
        /// Reads fail (a connection reset by the peer).
        fail_reads: bool,
    }

    impl AsyncRead for Mem {
        fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if self.fail_reads {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            if self.open && self.input.is_empty() {
                return Poll::Pending;
            }
            let limit = if self.max_read == 0 { buf.remaining() } else { self.max_read.min(buf.remaining()) };
            let n = self.input.len().min(limit);
            self.reads.push(buf.remaining());
            buf.put_slice(&self.input.split_to(n));
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Mem {
        fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            self.output.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Side for Mem {
        fn poll_chunk(&mut self, _cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
            // Hands out 3000-byte chunks of its input.
            if self.fail_reads {
                return self.chunks.then(|| Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())));
            }
            let n = self.input.len().min(3000);
            if self.open && n == 0 {
                return self.chunks.then_some(Poll::Pending);
            }
            self.chunks.then(|| Poll::Ready(Ok(self.input.split_to(n))))
        }

        fn poll_send_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
            if self.reset {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if self.stall_writes > 0 {
                self.stall_writes -= 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.given.push(data.as_ptr());
            self.output.extend_from_slice(data);
            data.clear();
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_buffer_starts_small_and_grows_only_on_full_reads() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let input: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut reader = Mem { input: Bytes::from(input.clone()), ..Mem::default() };
        let mut writer = Mem::default();
        let mut direction = Direction::default();
        assert!(direction.poll_copy(&mut cx, &mut reader, &mut writer).is_ready());
        assert_eq!(writer.output, input);
        // 1 KiB full -> 16 KiB full -> 128 KiB (the last step), until the end.
        assert_eq!(reader.reads[..4], [1024, 16 * 1024 - 9, 128 * 1024 - 9, 128 * 1024 - 9]);
        // Freed at the end of stream.
        assert!(direction.done && direction.buffer.capacity() == 0);
        let mut reader = Mem { input: Bytes::from_static(b"hello"), ..Mem::default() };
        let mut writer = Mem::default();
        let _ = Direction::default().poll_copy(&mut cx, &mut reader, &mut writer);
        assert_eq!(writer.output, b"hello");
        assert_eq!(reader.reads, [1024, 1024], "a short read does not grow the buffer");
    }

    /// Once written, a read's bytes give their memory back: the next read of the same
    /// size goes into the same allocation, not a new one.
    #[test]
    fn a_written_buffer_is_reused_by_the_next_read() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let input = Bytes::from(vec![5u8; 5000]);
        let mut reader = Mem { input: input.clone(), max_read: 1000, ..Mem::default() };
        let mut writer = Mem::default();
        assert!(Direction::default().poll_copy(&mut cx, &mut reader, &mut writer).is_ready());
        assert_eq!(writer.output, input);
        assert_eq!(writer.given.len(), 5);
        assert!(writer.given.windows(2).all(|w| w[0] == w[1]), "{:?}", writer.given);
    }

    #[test]
    fn chunks_pass_from_reader_to_writer_without_a_copy() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let input = Bytes::from((0..10_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let mut reader = Mem { input: input.clone(), chunks: true, ..Mem::default() };
        let mut writer = Mem::default();
        assert!(Direction::default().poll_copy(&mut cx, &mut reader, &mut writer).is_ready());
        assert_eq!(writer.output, input);
        // Each chunk the writer got is the reader's own memory, not a copy of it.
        let offsets: Vec<usize> = writer.given.iter().map(|p| *p as usize - input.as_ptr() as usize).collect();
        assert_eq!(offsets, [0, 3000, 6000, 9000]);
        assert!(reader.reads.is_empty(), "a chunked reader is never read into a buffer");
    }

    /// A response that ended before its stream was reset reaches the client, though
    /// the rest of the request fails to go out first.
    #[tokio::test]
    async fn what_was_received_is_delivered_when_the_other_way_fails() {
        let mut client = Mem { input: Bytes::from_static(b"the rest of an upload"), ..Mem::default() };
        let mut tunnel =
            Mem { input: Bytes::from_static(b"HTTP/1.1 413\r\n\r\n"), chunks: true, reset: true, ..Mem::default() };
        let error = copy_bidirectional(&mut client, &mut tunnel).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(client.output, b"HTTP/1.1 413\r\n\r\n");
    }

    /// The other way's writer is slow: what was received still reaches it.
    #[tokio::test]
    async fn a_slow_writer_gets_what_was_received_when_the_other_way_fails() {
        let mut client = Mem { input: Bytes::from_static(b"the rest of an upload"), stall_writes: 3, ..Mem::default() };
        let answer: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut tunnel = Mem { input: Bytes::from(answer.clone()), chunks: true, reset: true, ..Mem::default() };
        let error = copy_bidirectional(&mut client, &mut tunnel).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(client.output, answer, "every chunk, the stalled ones too");
    }

    /// Nothing more was received the other way: that way ends at once (the client
    /// reads the end of the stream), and the relay ends when the client closes, not at
    /// the deadline.
    #[tokio::test]
    async fn after_a_failure_the_other_way_ends_when_it_would_wait_and_the_client_s_close_ends_the_relay() {
        let (mut client, mut client_side) = tokio::io::duplex(1024);
        let mut tunnel = Mem { chunks: true, reset: true, open: true, ..Mem::default() };
        client.write_all(b"upload").await.unwrap();
        let relay = async {
            let ended = copy_both(&mut client_side, &mut tunnel, Duration::from_mins(1)).await;
            (ended, std::time::Instant::now())
        };
        let client_closes = async move {
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(client);
            std::time::Instant::now()
        };
        let both = async { tokio::join!(relay, client_closes) };
        let ((ended, ended_at), closed_at) =
            tokio::time::timeout(Duration::from_secs(5), both).await.expect("ended without the deadline");
        assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert!(ended_at >= closed_at, "the relay lingered until the client closed");
    }

    /// A way that failed on its reader has nothing to drain: no lingering.
    #[tokio::test]
    async fn a_reset_reader_ends_the_relay_at_once() {
        let mut client = Mem { open: true, ..Mem::default() };
        let mut tunnel = Mem { chunks: true, fail_reads: true, ..Mem::default() };
        let relay = copy_both(&mut client, &mut tunnel, Duration::from_mins(1));
        let ended = tokio::time::timeout(Duration::from_secs(5), relay).await.expect("ended without the deadline");
        assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }

    /// Real sockets: an answer still in the kernel's send queue (the client reads
    /// slowly, its receive buffer is small) reaches a client that is still uploading
    /// when the other way fails. Without the lingering close, the client's unread
    /// upload makes Linux reset the connection and drop that queue.
    #[tokio::test]
    async fn a_queued_answer_reaches_a_slow_client_that_is_still_uploading() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(16 * 1024).unwrap();
            let (mut read, mut write) = socket.connect(addr).await.unwrap().into_split();
            let upload = tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                for _ in 0..32 {
                    if write.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                let _ = write.shutdown().await;
            });
            // A slow reader: the relay has long written the answer into the kernel.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut got = Vec::new();
            let read = read.read_to_end(&mut got).await;
            let _ = upload.await;
            (read, got)
        });
        let (mut server_side, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&server_side).set_send_buffer_size(1 << 20).unwrap();
        let answer: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut tunnel = Mem { input: Bytes::from(answer.clone()), chunks: true, reset: true, ..Mem::default() };
        let relay = copy_both(&mut server_side, &mut tunnel, Duration::from_secs(5));
        let ended = tokio::time::timeout(Duration::from_secs(10), relay).await.expect("ended");
        assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        drop(server_side);
        let (read, got) = client.await.unwrap();
        read.unwrap_or_else(|e| panic!("the answer, then the end of stream, not {e} after {} bytes", got.len()));
        assert!(got == answer, "{} of {} bytes", got.len(), answer.len());
    }

    /// A writer that takes nothing holds the relay only until the deadline.
    #[tokio::test]
    async fn a_writer_that_takes_nothing_is_given_up_at_the_deadline() {
        let mut client = Mem { input: Bytes::from_static(b"upload"), stall_writes: usize::MAX, ..Mem::default() };
        let mut tunnel = Mem { input: Bytes::from_static(b"answer"), chunks: true, reset: true, ..Mem::default() };
        let started = std::time::Instant::now();
        let relay = copy_both(&mut client, &mut tunnel, Duration::from_millis(50));
        let error = tokio::time::timeout(Duration::from_secs(5), relay).await.expect("ended").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(client.output.is_empty());
    }
}
