//! A downstream HTTP connection's two timeouts, told apart:
//! - the **header timeout** (no slowloris): a request's head must arrive whole within
//!   [`HEADER_TIMEOUT`] of its first byte (the first request's, of the connection's
//!   start);
//! - the **idle timeout**: a connection without a request in flight is closed after
//!   [`IDLE_TIMEOUT`] (Envoy's default for the HTTP connection manager, 1 h),
//!   gracefully, as is every connection when the waypoint drains ([`serve`]): HTTP/2
//!   gets `GOAWAY`, so a client knows which of its requests were not taken and may
//!   send them elsewhere; HTTP/1.1 closes once idle, and a response still in flight
//!   says `connection: close`.
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
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{Notify, watch},
    time::{Instant, Sleep},
};

use crate::upstream::BoxError;

/// Serves one downstream connection with `handle`, under a [`Clock`] of the
/// waypoint's timeouts: a slow head is cut; a connection idle for the idle timeout,
/// or any connection once `draining` turns true, is shut down gracefully (HTTP/2
/// `GOAWAY`, letting streams in flight finish; HTTP/1.1 closed once its response in
/// flight, if any, is done, with `connection: close` on it).
pub async fn serve<I, H, F, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    clock: Arc<Clock>,
    mut draining: watch::Receiver<bool>,
    handle: H,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let io = TokioIo::new(Timed::new(io, clock.clone()));
    let requests = clock.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let in_flight = requests.request();
        let http1 = request.version() < http::Version::HTTP_2;
        let response = handle(request);
        async move {
            let mut response = response.await;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                in_flight.upgraded();
            } else if http1 && in_flight.0.closing.load(Ordering::Acquire) {
                // Draining: hyper closes the connection after this response.
                response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(response.map(|inner| Held { inner, _in_flight: in_flight }))
        }
    });
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let drained = async move { draining.wait_for(|draining| *draining).await.is_ok() };
    tokio::select! {
        result = connection.as_mut() => return result,
        () = clock.idle.notified() => {}
        true = drained => {
            clock.closing.store(true, Ordering::Release);
            // hyper-util drops a connection whose protocol it has not read yet when
            // told to shut down, losing the request on its way: a connection that has
            // begun no request gets until its first one begins (within the header
            // timeout), which is then answered.
            tokio::select! {
                result = connection.as_mut() => return result,
                _ = tokio::time::timeout(clock.header_timeout, clock.first_request()) => {}
            }
        }
    }
    connection.as_mut().graceful_shutdown();
    connection.await
}

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
    /// Told when the idle timeout passes: the connection is shut down gracefully.
    idle: Notify,
    /// Told when the first request begins.
    first: Notify,
    /// The connection is being shut down: HTTP/1.1 responses say `connection: close`.
    closing: AtomicBool,
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
            idle: Notify::new(),
            first: Notify::new(),
            closing: AtomicBool::new(false),
        })
    }

    /// Resolves once the connection's first request has begun.
    async fn first_request(&self) {
        // `notify_one` leaves a permit when no one waits: no wake-up is lost.
        if self.begun.load(Ordering::Acquire) == 0 {
            self.first.notified().await;
        }
    }

    /// A request's head arrived; it is in flight until the guard drops (with its
    /// response body).
    pub fn request(self: &Arc<Self>) -> InFlight {
        if self.begun.fetch_add(1, Ordering::AcqRel) == 0 {
            self.first.notify_one();
        }
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

/// A downstream connection whose reads enforce the [`Clock`]'s timeouts: past the
/// header timeout a read fails with `TimedOut` (hyper closes the connection); past
/// the idle timeout the clock tells [`serve`], which shuts the connection down
/// gracefully.
struct Timed<S> {
    inner: S,
    clock: Arc<Clock>,
    spoken: Spoken,
    /// How many of the first bytes matched the HTTP/2 preface while `spoken` is unknown.
    seen: usize,
    /// The head being timed: requests begun when its first byte came, and its deadline.
    head: Option<(u64, Instant)>,
    /// The idle timeout passed (and [`serve`] was told): no more idle deadline.
    idle_over: bool,
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
            idle_over: false,
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
        if self.idle_over || self.clock.active.load(Ordering::Acquire) > 0 {
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
            Poll::Ready(()) if self.head.is_some() => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "timed out waiting for the request head")))
            }
            Poll::Ready(()) => {
                // Idle: a graceful shutdown rather than a failed read (HTTP/2 clients
                // get GOAWAY).
                self.idle_over = true;
                self.clock.idle.notify_one();
                Poll::Pending
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
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// Serves `io` as the waypoint serves a downstream connection: every request gets
    /// 200 with a small body (after `/slow`'s 300 ms). Returns when the connection ends.
    async fn serve_until(io: DuplexStream, draining: watch::Receiver<bool>) {
        let clock = Clock::with(HEADER, IDLE);
        let builder = auto::Builder::new(TokioExecutor::new());
        let _ = super::serve(&builder, io, clock, draining, |request: Request<Incoming>| async move {
            if request.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Response::new(Full::new(Bytes::from_static(b"ok")))
        })
        .await;
    }

    async fn serve(io: DuplexStream) {
        let (_keep, draining) = watch::channel(false);
        serve_until(io, draining).await;
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

    /// An HTTP/2 client (h2's, which answers pings) connected to `serve_until`
    /// through a tap that records what the server sends: the client's request
    /// sender, its connection's task, and the tap's record.
    async fn tapped_h2_client(
        draining: watch::Receiver<bool>,
    ) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>, Arc<Mutex<Vec<u8>>>) {
        let (client, tap_client) = tokio::io::duplex(64 << 10);
        let (tap_server, server) = tokio::io::duplex(64 << 10);
        tokio::spawn(serve_until(server, draining));
        let record = Arc::new(Mutex::new(Vec::new()));
        let (mut from_client, mut to_client) = tokio::io::split(tap_client);
        let (mut from_server, mut to_server) = tokio::io::split(tap_server);
        tokio::spawn(async move { tokio::io::copy(&mut from_client, &mut to_server).await });
        let recorded = record.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                if to_client.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = to_client.shutdown().await;
        });
        let (sender, connection) = h2::client::handshake(client).await.expect("h2 handshake");
        (sender, tokio::spawn(connection), record)
    }

    /// Whether HTTP/2 frames (a server's, no preface) include a GOAWAY.
    fn has_goaway(bytes: &[u8]) -> bool {
        const GOAWAY: u8 = 0x7;
        let mut rest = bytes;
        while rest.len() >= 9 {
            if rest[3] == GOAWAY {
                return true;
            }
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            rest = &rest[(9 + len).min(rest.len())..];
        }
        false
    }

    /// An HTTP/2 connection idle for the idle timeout gets GOAWAY before it ends,
    /// not a bare close.
    #[tokio::test]
    async fn an_idle_http2_connection_gets_goaway() {
        let (_keep, draining) = watch::channel(false);
        let (mut sender, connection, record) = tapped_h2_client(draining.clone()).await;
        let (response, _) = sender.send_request(Request::get("http://a/").body(()).unwrap(), true).unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
        let idle = Instant::now();
        let ended = tokio::time::timeout(IDLE * 2, connection).await.expect("closed after the idle timeout").unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        assert!(has_goaway(&record.lock().unwrap()), "no GOAWAY before the close");
        assert!(idle.elapsed() + Duration::from_millis(50) >= IDLE, "{:?}", idle.elapsed());
    }

    /// Draining: an idle HTTP/1.1 connection is closed at once; one with a response
    /// in flight gets it, with `connection: close`, and is closed after it; an
    /// HTTP/2 connection gets GOAWAY while its stream in flight finishes.
    #[tokio::test]
    async fn draining_closes_connections_gracefully() {
        let (drain, draining) = watch::channel(false);
        let (mut idle, server) = tokio::io::duplex(4096);
        tokio::spawn(serve_until(server, draining.clone()));
        idle.write_all(GET).await.unwrap();
        assert!(response(&mut idle).await.starts_with("HTTP/1.1 200"));
        let (mut busy, server) = tokio::io::duplex(4096);
        tokio::spawn(serve_until(server, draining.clone()));
        busy.write_all(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
        let (mut sender, connection, record) = tapped_h2_client(draining.clone()).await;
        let (slow, _) = sender.send_request(Request::get("http://a/slow").body(()).unwrap(), true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;

        let start = Instant::now();
        drain.send(true).unwrap();
        let soon = Duration::from_secs(1);
        assert!(tokio::time::timeout(soon, closed(&mut idle)).await.unwrap_or(false), "the idle connection is closed");
        assert!(start.elapsed() < Duration::from_millis(100), "{:?}", start.elapsed());
        let answer = response(&mut busy).await.to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 200") && answer.contains("connection: close"), "{answer}");
        assert!(tokio::time::timeout(soon, closed(&mut busy)).await.unwrap_or(false), "closed after its response");
        // A connection that arrives while draining is still answered (hyper-util would
        // drop it before it knew its protocol), then closed.
        let (mut late, server) = tokio::io::duplex(4096);
        tokio::spawn(serve_until(server, draining));
        tokio::time::sleep(Duration::from_millis(50)).await;
        late.write_all(GET).await.unwrap();
        let answer = response(&mut late).await.to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 200") && answer.contains("connection: close"), "{answer}");
        assert!(tokio::time::timeout(soon, closed(&mut late)).await.unwrap_or(false), "closed after its response");
        assert_eq!(slow.await.expect("the stream in flight finishes").status(), 200);
        let ended = tokio::time::timeout(Duration::from_secs(1), connection).await.expect("then it ends").unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        assert!(has_goaway(&record.lock().unwrap()), "no GOAWAY before the close");
        assert!(start.elapsed() < HEADER, "{:?}", start.elapsed());
    }
}
