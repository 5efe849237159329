//! A downstream HTTP connection's two timeouts, told apart:
//! - the **header timeout** (no slowloris): a request's head must arrive whole within
//!   [`HEADER_TIMEOUT`] of its first byte (the first request's, of the connection's
//!   start);
//! - the **idle timeout**: a connection without a request in flight is closed after
//!   [`IDLE_TIMEOUT`] (Envoy's default for the HTTP connection manager, 1 h).
//!
//! hyper's own header timeout is armed whenever it waits for a request head, idle
//! keep-alive included, so it closed every HTTP/1.1 connection idle for 10 s: a client
//! polling every 10 s raced the close and lost requests. Here the connection's reads
//! ([`Timed`]) and its requests ([`Clock::request`], held until the response body is
//! done) are seen together.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// A client has this long to send a request's head, from its first byte.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request in flight is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_hours(1);

/// What the requests of one connection tell its reads.
#[derive(Debug)]
pub struct Clock {
    /// Requests in flight (their responses not done).
    active: AtomicUsize,
    /// Requests begun: a change means the head being timed arrived whole.
    begun: AtomicU64,
    /// When the last request in flight ended.
    idle_since: Mutex<Instant>,
    /// The connection was upgraded (WebSocket): its bytes are no longer HTTP.
    upgraded: AtomicBool,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// The connection's reader, woken when the last request in flight ends: the idle
    /// timeout starts then, and a read already waiting must arm it.
    reader: Mutex<Option<Waker>>,
}

impl Clock {
    /// A connection's clock with [`HEADER_TIMEOUT`] and [`IDLE_TIMEOUT`].
    pub fn new() -> Arc<Self> {
        Self::with(HEADER_TIMEOUT, IDLE_TIMEOUT)
    }

    fn with(header_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            begun: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
            upgraded: AtomicBool::new(false),
            header_timeout,
            idle_timeout,
            reader: Mutex::new(None),
        })
    }

    /// A request's head arrived; it is in flight until the guard drops (with its
    /// response body).
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.begun.fetch_add(1, Ordering::AcqRel);
        self.active.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// A request in flight on its connection.
#[derive(Debug)]
pub struct InFlight(Arc<Clock>);

impl InFlight {
    /// The connection switched protocols: no more timeouts of HTTP's.
    pub fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::Release);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Under the lock a reader takes to read `idle_since` after seeing no request
        // in flight: it never pairs "none in flight" with the previous idle start.
        let mut idle_since = self.0.idle_since.lock().expect("lock");
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *idle_since = Instant::now();
            drop(idle_since);
            if let Some(reader) = self.0.reader.lock().expect("lock").take() {
                reader.wake();
            }
        }
    }
}

/// A response body that keeps its request in flight until it is done or dropped.
pub struct Held<B> {
    pub inner: B,
    pub _in_flight: InFlight,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Held<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The HTTP/2 connection preface's start, enough to tell it from a request line.
const PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// The protocol a connection turned out to speak, from its first bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Spoken {
    Unknown,
    Http1,
    /// HTTP/2 has no request heads to time at this level (its floods are hyper's).
    Http2,
}

/// A downstream connection whose reads enforce the [`Clock`]'s timeouts: a read
/// fails with `TimedOut` when one passes, and hyper closes the connection.
pub struct Timed<S> {
    inner: S,
    clock: Arc<Clock>,
    spoken: Spoken,
    /// How many of the first bytes matched the HTTP/2 preface while `spoken` is unknown.
    seen: usize,
    /// The head being timed: requests begun when its first byte came, and its deadline.
    head: Option<(u64, Instant)>,
    timer: Pin<Box<Sleep>>,
}

impl<S> Timed<S> {
    pub fn new(inner: S, clock: Arc<Clock>) -> Self {
        let deadline = Instant::now() + clock.header_timeout;
        Self {
            inner,
            clock,
            spoken: Spoken::Unknown,
            seen: 0,
            head: Some((0, deadline)),
            timer: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// The deadline now in force, if any.
    fn deadline(&mut self) -> Option<Instant> {
        if self.clock.upgraded.load(Ordering::Acquire) {
            return None;
        }
        let begun = self.clock.begun.load(Ordering::Acquire);
        if let Some((at, deadline)) = self.head {
            if begun == at && self.spoken != Spoken::Http2 {
                return Some(deadline);
            }
            self.head = None;
        }
        if self.clock.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.clock.idle_since.lock().expect("lock") + self.clock.idle_timeout)
    }

    fn saw(&mut self, bytes: &[u8]) {
        if self.spoken == Spoken::Unknown {
            // Told on the preface's first 14 bytes, or its first mismatch: a client
            // that sends "P" and stops is still timed as a head.
            let take = bytes.len().min(PREFACE_START.len() - self.seen);
            let (seen, more) = (self.seen, &bytes[..take]);
            if PREFACE_START[seen..seen + take] != *more {
                self.spoken = Spoken::Http1;
            } else if seen + take == PREFACE_START.len() {
                self.spoken = Spoken::Http2;
            }
            self.seen += take;
        }
        if let Some((at, _)) = self.head
            && at != self.clock.begun.load(Ordering::Acquire)
        {
            // That head arrived whole; these bytes start another.
            self.head = None;
        }
        if self.spoken == Spoken::Http1
            && self.head.is_none()
            && self.clock.active.load(Ordering::Acquire) == 0
            && !self.clock.upgraded.load(Ordering::Acquire)
        {
            // The first byte of the next request's head.
            self.head = Some((self.clock.begun.load(Ordering::Acquire), Instant::now() + self.clock.header_timeout));
        }
    }

    /// `Ready(Err)` once the deadline in force has passed; else registers for it.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Registered before the deadline is read, so a request ending in between
        // still wakes this read.
        let mut reader = self.clock.reader.lock().expect("lock");
        if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *reader = Some(cx.waker().clone());
        }
        drop(reader);
        let Some(deadline) = self.deadline() else { return Poll::Pending };
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let what =
                    if self.head.is_some() { "the request head" } else { "the next request on an idle connection" };
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, format!("timed out waiting for {what}"))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Timed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.saw(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                std::task::ready!(self.poll_deadline(cx))?;
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Timed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::Full;
    use hyper::{Response, service::service_fn};
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::conn::auto,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// Serves `io` as the waypoint serves a downstream connection: every request gets
    /// 200 with a small body. Returns when the connection ends.
    async fn serve(io: DuplexStream) {
        let clock = Clock::with(HEADER, IDLE);
        let io = TokioIo::new(Timed::new(io, clock.clone()));
        let service = service_fn(move |_| {
            let in_flight = clock.request();
            async move {
                let response = Response::new(Full::new(Bytes::from_static(b"ok")));
                Ok::<_, Infallible>(response.map(|inner| Held { inner, _in_flight: in_flight }))
            }
        });
        let _ = auto::Builder::new(TokioExecutor::new()).serve_connection_with_upgrades(io, service).await;
    }

    /// The timeouts, scaled down from 10 s and 1 h.
    const HEADER: Duration = Duration::from_millis(500);
    const IDLE: Duration = Duration::from_secs(2);
    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";

    async fn response(client: &mut DuplexStream) -> String {
        let mut buf = vec![0u8; 1024];
        let n = client.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Whether the server closed the connection (EOF or an error on read).
    async fn closed(client: &mut DuplexStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(client.read(&mut buf).await, Ok(0) | Err(_))
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_outlives_the_header_timeout() {
        let (mut client, server) = tokio::io::duplex(4096);
        let task = tokio::spawn(serve(server));
        client.write_all(GET).await.unwrap();
        assert!(response(&mut client).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(HEADER * 3).await;
        client.write_all(GET).await.unwrap();
        assert!(response(&mut client).await.starts_with("HTTP/1.1 200"), "idle for 3 header timeouts, still served");
        // Idle past the idle timeout: closed.
        let idle = Instant::now();
        assert!(closed(&mut client).await);
        assert!(idle.elapsed() + Duration::from_millis(50) >= IDLE, "{:?}", idle.elapsed());
        tokio::time::timeout(Duration::from_secs(1), task).await.expect("the server let go of the connection").unwrap();
    }

    #[tokio::test]
    async fn a_slow_head_is_cut_at_the_header_timeout() {
        // The first request's head, a line every 100 ms and never its end.
        let (mut client, server) = tokio::io::duplex(4096);
        let task = tokio::spawn(serve(server));
        let start = Instant::now();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut cut = false;
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if task.is_finished() || client.write_all(format!("x-{i}: 1\r\n").as_bytes()).await.is_err() {
                cut = true;
                break;
            }
        }
        let elapsed = start.elapsed();
        assert!(cut && elapsed >= HEADER && elapsed <= HEADER + Duration::from_millis(300), "{elapsed:?}");

        // The same for a later request on a kept-alive connection, timed from its first
        // byte: after 3 header timeouts idle, 60 % of one into a slow head is fine,
        // 120 % is not.
        let (mut client, server) = tokio::io::duplex(4096);
        let task = tokio::spawn(serve(server));
        client.write_all(GET).await.unwrap();
        assert!(response(&mut client).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(HEADER * 3).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(HEADER * 6 / 10).await;
        assert!(!task.is_finished());
        client.write_all(b"host: a\r\n").await.unwrap();
        tokio::time::sleep(HEADER * 6 / 10).await;
        assert!(task.is_finished(), "120 % of the header timeout into a head: cut");
        assert!(closed(&mut client).await);
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout() {
        let (mut client, server) = tokio::io::duplex(4096);
        let start = Instant::now();
        tokio::spawn(serve(server));
        assert!(closed(&mut client).await);
        let waited = start.elapsed();
        assert!(waited >= HEADER && waited < HEADER + Duration::from_millis(300), "{waited:?}");

        // "P" could begin the HTTP/2 preface, whose connections have no head timeout:
        // until the bytes tell, the head is timed.
        let (mut client, server) = tokio::io::duplex(4096);
        let start = Instant::now();
        tokio::spawn(serve(server));
        client.write_all(b"P").await.unwrap();
        assert!(closed(&mut client).await);
        assert!(start.elapsed() < HEADER + Duration::from_millis(300), "{:?}", start.elapsed());
    }
}
