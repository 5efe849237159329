//! Connections to endpoints: HBONE through the endpoint's agent for meshed pods
//! (`:authority` = pod IP:target port, expecting the pod's identity), plain TCP for
//! endpoints outside the mesh; HTTP connections on top, pooled per endpoint.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, combinators::BoxBody};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_proxy::{
    identity::WorkloadCert,
    relay::Side,
    socket::Local,
    tunnel::{
        HBONE_PORT, HboneError, POOL_IDLE, POOL_SPARE_IDLE, client::Pool, client::StreamGuard, connect_request,
        stream::H2Stream,
    },
    workloads::Workload,
};
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

use mesh_waypoint::{
    limits::{Breaker, Guard},
    policy::Limits,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// A body of `bytes` (none: an empty body).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into()).map_err(|never: std::convert::Infallible| match never {}).boxed()
}

/// A copy of a body frame (data or trailers; frames themselves are not `Clone`), for
/// the mirrors' and the retries' copies of a request body. `None` for a frame of
/// another kind.
pub fn copy_frame(frame: &http_body::Frame<Bytes>) -> Option<http_body::Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        Some(http_body::Frame::data(data.clone()))
    } else {
        frame.trailers_ref().map(|trailers| http_body::Frame::trailers(trailers.clone()))
    }
}

/// The data bytes of a frame (0 for trailers).
pub fn frame_len(frame: &http_body::Frame<Bytes>) -> usize {
    frame.data_ref().map_or(0, Bytes::len)
}

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// Pooled connections a request may find closed before it gives up (each hands the
/// request back unsent; a new connection ends the search either way).
const STALE_TRIES: usize = MAX_IDLE_PER_ENDPOINT + 1;

/// Where a request goes: an endpoint's workload and its address (pod IP:target port).
#[derive(Clone, Debug)]
pub struct Target {
    pub workload: Arc<Workload>,
    pub addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("tunnel to {addr} failed")]
    Tunnel {
        addr: SocketAddr,
        #[source]
        source: HboneError,
    },
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("HTTP handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("the upstream connection closed or reset before the response")]
    Reset(#[source] hyper::Error),
    #[error("no response within the per-try timeout")]
    PerTryTimeout,
    #[error("every pooled connection to {addr} was closed")]
    Stale { addr: SocketAddr },
    #[error("no connection to {addr} free and {pending} requests already waiting for one (http1MaxPendingRequests)")]
    Overflow { addr: SocketAddr, pending: u32 },
}

impl UpstreamError {
    /// Envoy's response flag: `UF` for a connection that never came up, `UC` for one
    /// that ended before the response.
    pub fn flag(&self) -> &'static str {
        match self {
            Self::Reset(_) => "UC",
            Self::Overflow { .. } => "UO",
            Self::PerTryTimeout => "UT",
            _ => "UF",
        }
    }

    /// Whether the try ran out of its `perTryTimeout` (504 `UT`).
    pub fn per_try_timeout(&self) -> bool {
        matches!(self, Self::PerTryTimeout)
    }

    /// Whether the connection to the upstream could not be opened (the request never
    /// reached it: safe to retry anywhere).
    pub fn connect_failure(&self) -> bool {
        !matches!(self, Self::Reset(_) | Self::Overflow { .. } | Self::PerTryTimeout)
    }

    /// Whether the destination's `connectionPool` had no room for the request (`UO`).
    /// Nothing went wrong with the endpoint: as in Envoy, such a try is neither retried
    /// nor counted by outlier detection (a breaker that trips must not also eject
    /// healthy endpoints).
    pub fn overflow(&self) -> bool {
        matches!(self, Self::Overflow { .. })
    }

    /// Whether an HTTP/2 upstream refused the stream (`RST_STREAM` with
    /// `REFUSED_STREAM`: it did not process the request), Envoy's `refused-stream`.
    pub fn refused_stream(&self) -> bool {
        let Self::Reset(error) = self else { return false };
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(error) = source {
            if let Some(h2) = error.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            source = error.source();
        }
        false
    }
}

/// How one try of a request is sent.
#[derive(Clone, Copy, Default)]
pub struct Attempt<'a> {
    /// The route's `perTryTimeout` (see [`TryClock`]).
    pub per_try: Option<Duration>,
    /// The request's head, should it need sending again on another connection (see
    /// [`Upstreams::send_h1`]); `None`: it is not sent again.
    pub head: Option<&'a http::request::Parts>,
    /// Counts the times the request went on another connection because its endpoint
    /// closed the pooled one it took, over all its tries (for its access-log line).
    pub resent: Option<&'a AtomicU32>,
}

impl Attempt<'_> {
    /// Notes a request moved to another connection, in the pool's counter and the
    /// request's own.
    fn count_resend(&self, pool: &Counter) {
        pool.inc();
        if let Some(resent) = self.resent {
            resent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A try's `perTryTimeout`, as Envoy runs it: the clock starts once the request has
/// a connection and its body has ended. Time spent waiting for a free connection
/// under `maxConnections`, connecting (bounded by `connectTimeout`), or uploading is
/// not the endpoint's slowness; counting it would fail slow uploads and let outlier
/// detection eject healthy endpoints of a busy destination. The route's timeout
/// bounds the whole.
struct TryClock {
    per_try: Option<Duration>,
    /// Told when a body still arriving has ended (or failed).
    body_end: Option<tokio::sync::oneshot::Receiver<()>>,
    expiry: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl TryClock {
    /// The clock of `request`'s try; a body still to come is watched for its end.
    fn new(per_try: Option<Duration>, request: &mut Request<Body>) -> Self {
        let mut body_end = None;
        if per_try.is_some() && !http_body::Body::is_end_stream(request.body()) {
            let (told, end) = tokio::sync::oneshot::channel();
            let body = std::mem::replace(request.body_mut(), full(Bytes::new()));
            *request.body_mut() = Ended { inner: body, told: Some(told) }.boxed();
            body_end = Some(end);
        }
        Self { per_try, body_end, expiry: None }
    }

    /// The request has a connection: the clock starts (once the body has ended).
    fn start(&mut self) {
        if self.expiry.is_none()
            && let Some(limit) = self.per_try
        {
            let body_end = self.body_end.take();
            self.expiry = Some(Box::pin(async move {
                if let Some(end) = body_end {
                    let _ = end.await;
                }
                tokio::time::sleep(limit).await;
            }));
        }
    }

    /// Waits for `response` until the clock runs out.
    async fn run<T>(&mut self, response: impl Future<Output = T>) -> Result<T, UpstreamError> {
        match &mut self.expiry {
            Some(expiry) => tokio::select! {
                response = response => Ok(response),
                () = expiry.as_mut() => Err(UpstreamError::PerTryTimeout),
            },
            None => Ok(response.await),
        }
    }
}

/// A request body that tells its end (its last frame, or a failure).
struct Ended {
    inner: Body,
    told: Option<tokio::sync::oneshot::Sender<()>>,
}

impl http_body::Body for Ended {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers() || self.inner.is_end_stream(),
            Poll::Ready(_) => true,
            Poll::Pending => false,
        };
        if ended && let Some(told) = self.told.take() {
            let _ = told.send(());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Waits for `response` at most `per_try` (for an upgrade, which has a connection of
/// its own).
pub async fn timed<T>(per_try: Option<Duration>, response: impl Future<Output = T>) -> Result<T, UpstreamError> {
    match per_try {
        Some(limit) => tokio::time::timeout(limit, response).await.map_err(|_| UpstreamError::PerTryTimeout),
        None => Ok(response.await),
    }
}

/// Runs an upstream connection's task, which holds `slot` (its places under the
/// pool's limits) until the connection ends.
fn drive(
    addr: SocketAddr,
    protocol: &'static str,
    slot: impl Send + 'static,
    connection: impl Future<Output = Result<(), hyper::Error>> + Send + 'static,
) {
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(error) = connection.await {
            debug!(%addr, protocol, %error, "upstream connection ended");
        }
    });
}

/// A copy of a request's head (method, URI, version, headers; not its extensions).
pub fn clone_head(head: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    request.into_parts().0
}

/// Whether a request may be sent again after its connection closed without a
/// response: a safe method (or an `Idempotency-Key`), and no body.
fn replayable<B: http_body::Body>(request: &Request<B>) -> bool {
    use http::Method;
    let safe = [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(request.method())
        || request.headers().contains_key("idempotency-key");
    safe && request.body().is_end_stream()
}

/// Whether an HTTP/1.1 exchange failed because the connection closed (end of stream,
/// reset, broken pipe) before the response's head arrived.
fn closed_before_response(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
            );
        }
        source = error.source();
    }
    false
}

/// A tunnel stream that keeps its pooled connection's stream slot while it lives.
struct Tunneled {
    stream: H2Stream,
    _slot: StreamGuard,
}

impl AsyncRead for Tunneled {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

/// A TCP route's relay moves the tunnel's DATA frames without copying them.
impl Side for Tunneled {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        self.stream.poll_chunk(cx)
    }

    fn poll_send_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        self.stream.poll_send_chunk(cx, data)
    }
}

impl AsyncWrite for Tunneled {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

pub trait Io: Side + Send + 'static {}
impl<T: Side + Send + 'static> Io for T {}

/// What a connection is opened with.
pub struct Dial<'a> {
    /// The waypoint's certificate (HBONE client side).
    pub cert: Arc<WorkloadCert>,
    /// The original client, for the tunnel's `forwarded` header.
    pub client: SocketAddr,
    pub baggage: &'a str,
    pub connect_timeout: Duration,
}

/// The circuit breaker and `connectionPool` limits of the destination a request
/// goes to.
pub struct PoolLimits<'a> {
    pub breaker: &'a Arc<Breaker>,
    pub limits: &'a Limits,
}

/// A pooled connection and the requests it has carried (`maxRequestsPerConnection`).
struct Pooled<S> {
    sender: S,
    requests: u32,
    /// When its bytes last moved.
    activity: Arc<Activity>,
    opened: Instant,
    /// The `connectionPool` of the destination that opened it (for sweeps; a request
    /// judges a connection by its own destination's, so a changed rule applies).
    limits: Limits,
}

impl<S> Pooled<S> {
    fn new(sender: S, activity: Arc<Activity>, limits: &Limits) -> Self {
        Self { sender, requests: 0, activity, opened: Instant::now(), limits: *limits }
    }

    /// Whether the connection may take no new request: idle for `idleTimeout`, or open
    /// for `maxConnectionDuration`. Envoy closes such a connection; here the pool lets
    /// go of it, and it closes once its requests are done. Reusing a connection the
    /// endpoint is about to close as idle is how requests die with `UC` (a server's
    /// keep-alive timeout shorter than the proxy's is the classic case), and setting
    /// `idleTimeout` below the server's is Istio's remedy.
    fn expired(&self, now: Instant, limits: &Limits) -> bool {
        self.activity.idle(now) >= limits.idle_timeout
            || limits.max_connection_duration.is_some_and(|max| now.saturating_duration_since(self.opened) >= max)
    }
}

impl Pooled<http1::SendRequest<Body>> {
    /// Whether the pool keeps the connection: open, and not expired once free (the
    /// request on it finishes first).
    fn keep(&self, now: Instant, limits: &Limits) -> bool {
        !(self.sender.is_closed() || (self.sender.is_ready() && self.expired(now, limits)))
    }
}

impl Pooled<http2::SendRequest<Body>> {
    /// Whether the pool keeps the connection for new streams: open and not expired
    /// (its streams finish on it either way).
    fn keep(&self, now: Instant, limits: &Limits) -> bool {
        !self.sender.is_closed() && !self.expired(now, limits)
    }
}

/// When a connection's bytes last moved, for its idle timeout.
pub struct Activity {
    /// Nanoseconds after `epoch`.
    last: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self { last: AtomicU64::new(0), epoch: Instant::now() })
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    fn idle(&self, now: Instant) -> Duration {
        let last = self.epoch + Duration::from_nanos(self.last.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }
}

/// A connection whose reads and writes stamp its [`Activity`].
struct Stamped<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Stamped<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if result.is_ready() {
            self.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stamped<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if result.is_ready() {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if result.is_ready() {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One of an endpoint's open connections, counted until dropped.
pub struct OpenCount(Arc<AtomicUsize>);

impl Drop for OpenCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How often a request waiting for an HTTP/1.1 connection looks again without being
/// woken: a connection turns ready a moment after its response's end wakes waiters.
const PENDING_RECHECK: Duration = Duration::from_millis(5);

/// An endpoint's HTTP/1.1 connections: the idle (and busy ones already handed back,
/// ready again when their response ends) and how many are open in all.
#[derive(Default)]
struct Http1Endpoint {
    pooled: Vec<Pooled<http1::SendRequest<Body>>>,
    open: Arc<AtomicUsize>,
}

pub struct Upstreams {
    tunnels: Pool,
    http1: Mutex<HashMap<SocketAddr, Http1Endpoint>>,
    http2: Mutex<HashMap<SocketAddr, Pooled<http2::SendRequest<Body>>>>,
    /// When the whole pool was last swept (see [`Upstreams::sweep`]).
    swept: Mutex<Instant>,
    /// Requests that went on another connection because their endpoint closed the
    /// pooled one they took (see [`Upstreams::send_h1`]).
    resent: Counter,
}

/// How often a request also sweeps the pool's other endpoints.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often idle connections are let go without requests (see [`Upstreams::release_idle`]).
pub const RELEASE_EVERY: Duration = Duration::from_secs(5);

impl Upstreams {
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            tunnels: Pool::new(connect_timeout),
            http1: Mutex::default(),
            http2: Mutex::default(),
            swept: Mutex::new(Instant::now()),
            resent: Counter::default(),
        }
    }

    /// Counts into `counter` the requests that go on another connection because their
    /// endpoint closed the pooled one they took.
    pub fn counting_resent(mut self, counter: Counter) -> Self {
        self.resent = counter;
        self
    }

    /// Lets go of the idle connections that expired at every endpoint, and forgets
    /// endpoints left without connections (pods come and go; their entries must
    /// not pile up). A request's own endpoint is checked when it takes a
    /// connection; this runs at most once every [`SWEEP_EVERY`] from requests, and
    /// from [`Upstreams::release_idle`] when none come.
    fn sweep(&self, now: Instant) {
        {
            let mut swept = self.swept.lock().expect("lock");
            if now.saturating_duration_since(*swept) < SWEEP_EVERY {
                return;
            }
            *swept = now;
        }
        self.sweep_now(now);
    }

    /// The periodic pass (every [`RELEASE_EVERY`] from the waypoint's control
    /// runtime): the sweep, so that a waypoint no request reaches still closes the
    /// HTTP connections past their `idleTimeout`, and then the tunnel connections
    /// that carried nothing for [`POOL_IDLE`] (those of endpoints that are gone
    /// included), as the agent's pool does.
    pub fn release_idle(&self) {
        self.sweep_now(Instant::now());
        self.tunnels.release_idle(POOL_IDLE, POOL_SPARE_IDLE);
    }

    fn sweep_now(&self, now: Instant) {
        self.http1.lock().expect("lock").retain(|_, endpoint| {
            endpoint.pooled.retain(|p| p.keep(now, &p.limits));
            // A request about to open a connection holds a clone of `open` too.
            !endpoint.pooled.is_empty() || Arc::strong_count(&endpoint.open) > 1
        });
        self.http2.lock().expect("lock").retain(|_, p| p.keep(now, &p.limits));
    }

    /// Pooled HTTP connections (HTTP/1.1, HTTP/2) and endpoints with an HTTP/1.1 entry.
    #[cfg(test)]
    fn pooled(&self) -> (usize, usize, usize) {
        let http1 = self.http1.lock().expect("lock");
        let h1 = http1.values().map(|e| e.pooled.len()).sum();
        (h1, self.http2.lock().expect("lock").len(), http1.len())
    }

    /// Tunnel connections open now.
    pub fn tunnels(&self) -> usize {
        self.tunnels.connections()
    }

    /// A byte stream to `target`: through its agent when it is meshed.
    pub async fn connect(&self, target: &Target, dial: &Dial<'_>) -> Result<Box<dyn Io>, UpstreamError> {
        let addr = target.addr;
        let connect = async {
            if target.workload.meshed {
                let hbone = SocketAddr::new(addr.ip(), HBONE_PORT);
                let request = || connect_request(addr, dial.client, dial.baggage);
                let (stream, slot) = self
                    .tunnels
                    .connect(&Local, dial.cert.clone(), hbone, &target.workload.identity, request)
                    .await
                    .map_err(|source| UpstreamError::Tunnel { addr, source })?;
                Ok(Box::new(Tunneled { stream, _slot: slot }) as Box<dyn Io>)
            } else {
                let tcp = TcpStream::connect(addr).await.map_err(|source| UpstreamError::Connect { addr, source })?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp) as Box<dyn Io>)
            }
        };
        tokio::time::timeout(dial.connect_timeout, connect).await.map_err(|_| UpstreamError::ConnectTimeout { addr })?
    }

    /// A byte stream to `target` (see [`Upstreams::connect`]) whose reads and writes
    /// stamp the returned [`Activity`], for its idle timeout.
    async fn connect_stamped(
        &self,
        target: &Target,
        dial: &Dial<'_>,
    ) -> Result<(TokioIo<Stamped<Box<dyn Io>>>, Arc<Activity>), UpstreamError> {
        let activity = Activity::new();
        let io = Stamped { inner: self.connect(target, dial).await?, activity: activity.clone() };
        Ok((TokioIo::new(io), activity))
    }

    /// Sends `request` to `target` over a pooled HTTP/2 (`h2`) or HTTP/1.1 connection,
    /// within the destination's `connectionPool` limits, as `attempt` says.
    pub async fn send(
        &self,
        target: &Target,
        h2: bool,
        request: Request<Body>,
        dial: &Dial<'_>,
        limited: &PoolLimits<'_>,
        attempt: &Attempt<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.sweep(Instant::now());
        if h2 {
            self.send_h2(target, request, dial, limited, attempt).await
        } else {
            self.send_h1(target, request, dial, limited, attempt).await
        }
    }

    /// One multiplexed connection per endpoint (and shard), so it is opened even over
    /// `maxConnections`; after `maxRequestsPerConnection` streams the next request
    /// opens a new one and the old one ends with its streams. A pooled connection
    /// that turns out closed before the request left (a `GOAWAY` or a close its task
    /// had not yet seen) is dropped and the request goes on a new one: it never
    /// reached the endpoint, so this is not a retry.
    async fn send_h2(
        &self,
        target: &Target,
        mut request: Request<Body>,
        dial: &Dial<'_>,
        limited: &PoolLimits<'_>,
        attempt: &Attempt<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut clock = TryClock::new(attempt.per_try, &mut request);
        for _ in 0..STALE_TRIES {
            let (mut sender, pooled) = self.checkout_h2(target, dial, limited).await?;
            clock.start();
            match clock.run(sender.try_send_request(request)).await? {
                Ok(response) => return Ok(response),
                Err(mut error) => match (error.take_message(), pooled) {
                    (Some(unsent), Some(activity)) => {
                        debug!(addr = %target.addr, error = %error.error(), "pooled HTTP/2 connection closed; the request goes on a new one");
                        self.forget_h2(target.addr, &activity);
                        attempt.count_resend(&self.resent);
                        request = unsent;
                    }
                    _ => return Err(UpstreamError::Reset(error.into_error())),
                },
            }
        }
        Err(UpstreamError::Stale { addr: target.addr })
    }

    /// The endpoint's pooled HTTP/2 connection (with its activity, which tells it
    /// apart), else a new one.
    async fn checkout_h2(
        &self,
        target: &Target,
        dial: &Dial<'_>,
        limited: &PoolLimits<'_>,
    ) -> Result<(http2::SendRequest<Body>, Option<Arc<Activity>>), UpstreamError> {
        let max = limited.limits.max_requests_per_connection;
        let now = Instant::now();
        {
            let mut pool = self.http2.lock().expect("lock");
            if let Some(pooled) = pool.get_mut(&target.addr).filter(|pooled| pooled.keep(now, limited.limits)) {
                pooled.requests += 1;
                let taken = (pooled.sender.clone(), Some(pooled.activity.clone()));
                if max.is_some_and(|max| pooled.requests >= max) {
                    pool.remove(&target.addr);
                }
                return Ok(taken);
            }
        }
        let slot = limited.breaker.try_connection(limited.limits).unwrap_or_else(|| limited.breaker.force_connection());
        let (io, activity) = self.connect_stamped(target, dial).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Handshake { addr: target.addr, source })?;
        drive(target.addr, "HTTP/2", slot, connection);
        if max.is_none_or(|max| max > 1) {
            // Replacing an expired entry lets its connection end with its streams.
            let pooled = Pooled { requests: 1, ..Pooled::new(sender.clone(), activity, limited.limits) };
            self.http2.lock().expect("lock").insert(target.addr, pooled);
        }
        Ok((sender, None))
    }

    /// Drops the endpoint's pooled HTTP/2 connection if it is still the `closed` one
    /// (another request may have replaced it already).
    fn forget_h2(&self, addr: SocketAddr, closed: &Arc<Activity>) {
        let mut pool = self.http2.lock().expect("lock");
        if pool.get(&addr).is_some_and(|pooled| Arc::ptr_eq(&pooled.activity, closed)) {
            pool.remove(&addr);
        }
    }

    /// A request takes an idle connection, else opens one within `maxConnections`
    /// (an endpoint without any gets one regardless), else waits for one to turn
    /// idle, if fewer than `http1MaxPendingRequests` already wait: over that it fails
    /// at once (503 `UO`), nothing queues without bound.
    ///
    /// An idle connection can be closed by its endpoint just as a request takes it
    /// (the endpoint's keep-alive timeout ran out; gunicorn's is 2 s): the classic
    /// source of 503 `UC` behind a proxy. When the connection's task saw the close
    /// first, the request comes back unsent and goes on another connection. When the
    /// request was written and the connection then closed without a byte of response,
    /// a safe request without a body (GET, HEAD, OPTIONS, TRACE, or one with an
    /// `Idempotency-Key`) is sent once more on another connection, as RFC 9112 allows
    /// a client to and as HTTP clients such as Go's do; a request cut off again is
    /// the try's failure (`UC`). Neither is one of the route's retries, and the try's
    /// per-try clock runs on across them. A connection opened for the request ends
    /// the search: its failure is the request's.
    async fn send_h1(
        &self,
        target: &Target,
        mut request: Request<Body>,
        dial: &Dial<'_>,
        limited: &PoolLimits<'_>,
        attempt: &Attempt<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut clock = TryClock::new(attempt.per_try, &mut request);
        // The error of the one time the request was sent again.
        let mut cut_off: Option<hyper::Error> = None;
        for _ in 0..STALE_TRIES {
            let (mut pooled, reused) = self.checkout_h1(target, dial, limited).await?;
            pooled.requests += 1;
            clock.start();
            let again = attempt.head.filter(|_| reused && cut_off.is_none() && replayable(&request));
            let response = match clock.run(pooled.sender.try_send_request(request)).await? {
                Ok(response) => response,
                Err(mut error) => {
                    let unsent = error.take_message();
                    let error = error.into_error();
                    request = match (unsent, again) {
                        (Some(unsent), _) if reused => unsent,
                        (None, Some(head)) if closed_before_response(&error) => {
                            let request = Request::from_parts(clone_head(head), full(Bytes::new()));
                            debug!(addr = %target.addr, %error, "pooled HTTP/1.1 connection closed under the request; sent again on another");
                            cut_off = Some(error);
                            request
                        }
                        _ => return Err(UpstreamError::Reset(error)),
                    };
                    attempt.count_resend(&self.resent);
                    continue;
                }
            };
            // Back to the pool at once: it is ready again when the response body is
            // done. A connection that carried `maxRequestsPerConnection` is not: it
            // closes.
            if limited.limits.max_requests_per_connection.is_none_or(|max| pooled.requests < max) {
                let mut pool = self.http1.lock().expect("lock");
                let senders = &mut pool.entry(target.addr).or_default().pooled;
                if senders.len() < MAX_IDLE_PER_ENDPOINT {
                    senders.push(pooled);
                }
            }
            return Ok(response);
        }
        // Only if every pooled connection handed the request back: a request written
        // once is no connect failure.
        Err(cut_off.map_or(UpstreamError::Stale { addr: target.addr }, UpstreamError::Reset))
    }

    /// An idle HTTP/1.1 connection to the endpoint, else a new one, else (see
    /// [`Upstreams::send_h1`]) one that turns idle; and whether it was pooled.
    async fn checkout_h1(
        &self,
        target: &Target,
        dial: &Dial<'_>,
        limited: &PoolLimits<'_>,
    ) -> Result<(Pooled<http1::SendRequest<Body>>, bool), UpstreamError> {
        let breaker = limited.breaker;
        let mut pending = None;
        loop {
            let freed = breaker.freed();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            let (idle, open) = {
                let now = Instant::now();
                let mut pool = self.http1.lock().expect("lock");
                let endpoint = pool.entry(target.addr).or_default();
                let senders = &mut endpoint.pooled;
                senders.retain(|p| p.keep(now, limited.limits));
                let idle = senders.iter().position(|p| p.sender.is_ready()).map(|i| senders.swap_remove(i));
                (idle, endpoint.open.clone())
            };
            if let Some(idle) = idle {
                return Ok((idle, true));
            }
            let slot = match breaker.try_connection(limited.limits) {
                None if open.load(Ordering::Acquire) == 0 => Some(breaker.force_connection()),
                slot => slot,
            };
            if let Some(slot) = slot {
                // Counted open from now, so that concurrent requests do not each
                // take an endpoint's first connection over the limit.
                open.fetch_add(1, Ordering::AcqRel);
                let opened = OpenCount(open);
                let (sender, activity) = self.open_h1(target, dial, false, Some((slot, opened))).await?;
                return Ok((Pooled::new(sender, activity, limited.limits), false));
            }
            if pending.is_none() {
                let overflow =
                    || UpstreamError::Overflow { addr: target.addr, pending: limited.limits.max_pending_requests };
                pending = Some(breaker.try_pending(limited.limits).ok_or_else(overflow)?);
            }
            tokio::select! {
                () = freed => {}
                () = tokio::time::sleep(PENDING_RECHECK) => {}
            }
        }
    }

    /// A new HTTP/1.1 connection and when its bytes last moved; `upgrades` keeps it
    /// usable for `Upgrade` (WebSocket). It holds `slot` (its place under
    /// `maxConnections`, its count among its endpoint's connections) until it closes.
    pub async fn open_h1(
        &self,
        target: &Target,
        dial: &Dial<'_>,
        upgrades: bool,
        slot: Option<(Guard, OpenCount)>,
    ) -> Result<(http1::SendRequest<Body>, Arc<Activity>), UpstreamError> {
        let (io, activity) = self.connect_stamped(target, dial).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Handshake { addr: target.addr, source })?;
        drive(target.addr, "HTTP/1.1", slot, async move {
            if upgrades { connection.with_upgrades().await } else { connection.await }
        });
        Ok((sender, activity))
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Empty};

    use super::*;

    /// A server on loopback that hands each connection to `serve`: its address and
    /// how many connections it accepted.
    async fn loopback_server<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp));
            }
        });
        (addr, accepted)
    }

    /// Serves HTTP/1.1 on `tcp`: every request gets "ok", after 300 ms for `/slow`,
    /// and once its body (an upload) is whole.
    async fn serve_ok(tcp: TcpStream) {
        let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
            if request.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let _ = request.into_body().collect().await;
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(Bytes::from("ok"))))
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
    }

    /// An HTTP/1.1 server on loopback: its address and how many connections it
    /// accepted and saw end.
    async fn counting_server() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let ended = Arc::new(AtomicUsize::new(0));
        let counted = ended.clone();
        let (addr, accepted) = loopback_server(move |tcp| {
            let counted = counted.clone();
            async move {
                serve_ok(tcp).await;
                counted.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await;
        (addr, accepted, ended)
    }

    /// A pod outside the mesh at 127.0.0.1, reached in plain TCP.
    fn loopback_target(addr: SocketAddr) -> Target {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: web}\n\
                    spec: {nodeName: node1}\nstatus: {phase: Running, podIP: '127.0.0.1'}\n";
        let config = mesh_common::config::load(&[mesh_common::config::Source::new("view.yaml", text.to_owned())])
            .unwrap_or_else(|r| panic!("{r}"));
        let index = mesh_proxy::workloads::Index::build(&config);
        let workload = index.workload(addr.ip()).expect("the pod is in the view").clone();
        assert!(!workload.meshed);
        Target { workload, addr }
    }

    /// What the waypoint dials with (plain TCP to a pod outside the mesh needs no more).
    fn dial() -> Dial<'static> {
        let ca = mesh_proxy::identity::testing::Ca::new();
        Dial {
            cert: ca.cert("spiffe://cluster.local/ns/web/sa/waypoint"),
            client: "10.0.0.1:40000".parse().unwrap(),
            baggage: "",
            connect_timeout: Duration::from_secs(2),
        }
    }

    /// `idleTimeout` and `maxConnectionDuration` of `connectionPool`: a connection idle
    /// or open longer takes no new request and is closed; within them it is reused;
    /// and the pool forgets endpoints left without connections.
    #[tokio::test]
    async fn idle_and_old_connections_are_not_reused() {
        let (addr, accepted, ended) = counting_server().await;
        let target = loopback_target(addr);
        let (dial, upstreams, breaker) = (dial(), Upstreams::new(Duration::from_secs(2)), Breaker::new());
        let get = async |limits: &Limits| {
            let request = Request::get("http://web/").body(Empty::new().map_err(BoxError::from).boxed()).unwrap();
            let limited = PoolLimits { breaker: &breaker, limits };
            let response = upstreams
                .send(&target, false, request, &dial, &limited, &Attempt::default())
                .await
                .expect("a response");
            assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "ok");
            // The connection turns ready for the next request once its task sees the end.
            tokio::time::sleep(Duration::from_millis(30)).await;
        };
        let connections = || accepted.load(Ordering::SeqCst);

        let default = Limits::default();
        for _ in 0..3 {
            get(&default).await;
        }
        assert_eq!(connections(), 1, "kept alive and reused (idle timeout 1 h)");

        let idle = Limits { idle_timeout: Duration::from_millis(300), ..Limits::default() };
        get(&idle).await;
        assert_eq!(connections(), 1, "idle for 30 ms: reused");
        tokio::time::sleep(Duration::from_millis(400)).await;
        get(&idle).await;
        assert_eq!(connections(), 2, "idle for 400 ms: a new connection");

        let old = Limits { max_connection_duration: Some(Duration::from_millis(300)), ..Limits::default() };
        for _ in 0..12 {
            get(&old).await;
        }
        assert!((3..=4).contains(&connections()), "12 requests 30 ms apart, 300 ms per connection: {}", connections());

        // Past the sweep interval, a request to another endpoint lets go of this
        // endpoint's expired connection: it closes, and the next sweep forgets the
        // endpoint.
        let (other, _, _) = counting_server().await;
        let other = loopback_target(other);
        for _ in 0..2 {
            tokio::time::sleep(SWEEP_EVERY).await;
            let request = Request::get("http://web/").body(Empty::new().map_err(BoxError::from).boxed()).unwrap();
            let limited = PoolLimits { breaker: &breaker, limits: &default };
            upstreams.send(&other, false, request, &dial, &limited, &Attempt::default()).await.expect("a response");
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(ended.load(Ordering::SeqCst), connections(), "every connection to the first endpoint closed");
        }
        assert_eq!(upstreams.pooled(), (1, 0, 1), "only the other endpoint's connection is left");
    }

    /// Without any request, the periodic pass closes a connection past its
    /// `idleTimeout` and forgets its endpoint: a waypoint whose traffic stopped
    /// does not hold every endpoint's connection until the endpoint closes it.
    #[tokio::test]
    async fn the_periodic_pass_closes_idle_connections_without_traffic() {
        let (addr, accepted, ended) = counting_server().await;
        let target = loopback_target(addr);
        let (dial, upstreams, breaker) = (dial(), Upstreams::new(Duration::from_secs(2)), Breaker::new());
        let limits = Limits { idle_timeout: Duration::from_millis(500), ..Limits::default() };
        let request = Request::get("http://web/").body(Empty::new().map_err(BoxError::from).boxed()).unwrap();
        let limited = PoolLimits { breaker: &breaker, limits: &limits };
        let response =
            upstreams.send(&target, false, request, &dial, &limited, &Attempt::default()).await.expect("a response");
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "ok");
        tokio::time::sleep(Duration::from_millis(30)).await;
        upstreams.release_idle();
        assert_eq!(upstreams.pooled(), (1, 0, 1), "idle for 30 ms of 500: kept");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(ended.load(Ordering::SeqCst), 0, "nothing closes it before the pass");
        upstreams.release_idle();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!((accepted.load(Ordering::SeqCst), ended.load(Ordering::SeqCst)), (1, 1), "its connection closed");
        // Its task held the endpoint's entry until it ended: the next pass forgets it.
        upstreams.release_idle();
        assert_eq!(upstreams.pooled(), (0, 0, 0), "the endpoint is forgotten");
    }

    /// Sends a GET to a server that then closes the idle keep-alive connection, and
    /// `second` on it before the connection's task can read the close (blocking
    /// waits keep this runtime's only thread busy meanwhile): as when a server's
    /// keep-alive timeout runs out just as a request takes the connection. The second
    /// request's result, and the connections the server accepted after the first.
    async fn on_a_connection_closed_under_it(second: Request<Body>) -> (Result<Bytes, UpstreamError>, usize, u64) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (close, closing) = std::sync::mpsc::channel::<()>();
        let (closed, was_closed) = std::sync::mpsc::channel::<()>();
        let (stop, stopping) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let answer = |mut tcp: std::net::TcpStream| {
                tcp.set_nonblocking(false).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8];
                while !head.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                tcp
            };
            let first = answer(listener.accept().unwrap().0);
            closing.recv().unwrap();
            first.shutdown(std::net::Shutdown::Both).unwrap();
            drop(first);
            closed.send(()).unwrap();
            listener.set_nonblocking(true).unwrap();
            let mut later = Vec::new();
            while stopping.try_recv().is_err() {
                match listener.accept() {
                    Ok((tcp, _)) => later.push(answer(tcp)),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            later.len()
        });
        let target = loopback_target(addr);
        let (dial, upstreams, breaker) = (dial(), Upstreams::new(Duration::from_secs(2)), Breaker::new());
        let limits = Limits::default();
        let limited = PoolLimits { breaker: &breaker, limits: &limits };

        let first = Request::get("http://web/").body(Empty::new().map_err(BoxError::from).boxed()).unwrap();
        let response =
            upstreams.send(&target, false, first, &dial, &limited, &Attempt::default()).await.expect("a response");
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "ok");
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(upstreams.pooled().0, 1, "kept alive");
        close.send(()).unwrap();
        was_closed.recv().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // The head the proxy keeps for its tries, to send the request again.
        let (head, body) = second.into_parts();
        let kept = clone_head(&head);
        let resent = AtomicU32::new(0);
        let attempt = Attempt { per_try: None, head: Some(&kept), resent: Some(&resent) };
        let second = Request::from_parts(head, body);
        let result = match upstreams.send(&target, false, second, &dial, &limited, &attempt).await {
            Ok(response) => Ok(response.into_body().collect().await.unwrap().to_bytes()),
            Err(error) => Err(error),
        };
        stop.send(()).unwrap();
        // The try's own count (its access-log line) is the pool's.
        assert_eq!(u64::from(resent.load(Ordering::Relaxed)), upstreams.resent.get());
        (result, server.join().unwrap(), upstreams.resent.get())
    }

    /// The request is written before the connection's task reads the close (tokio
    /// has not polled the socket's readiness since): a GET goes again on a new
    /// connection (no `UC`); a POST with a body may have been acted on and is not sent
    /// twice. (The other order, a request handed back unsent, is hyper's
    /// `try_send_request` contract; this runtime cannot stage it.)
    #[tokio::test]
    async fn a_request_cut_off_on_a_connection_the_endpoint_closed() {
        let get = Request::get("http://web/").body(Empty::new().map_err(BoxError::from).boxed()).unwrap();
        let (result, later, resent) = on_a_connection_closed_under_it(get).await;
        assert_eq!(result.expect("a response, not UC"), "ok");
        assert_eq!((later, resent), (1, 1), "sent again on a second connection, and counted");

        let body = http_body_util::Full::new(Bytes::from("order")).map_err(BoxError::from).boxed();
        let post = Request::post("http://web/").body(body).unwrap();
        let (result, later, resent) = on_a_connection_closed_under_it(post).await;
        let error = result.expect_err("cut off");
        assert_eq!(error.flag(), "UC", "{error:?}");
        assert_eq!((later, resent), (0, 0), "not sent again");
    }

    /// A request cut off on one pooled connection, then on the one it was sent again
    /// on (each endpoint worker dies on it, as gunicorn's do at their timeout), fails
    /// with `UC`: it is sent again once, not on connection after connection.
    #[tokio::test]
    async fn a_request_is_sent_again_once() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let cut = Arc::new(AtomicUsize::new(0));
        let counted = cut.clone();
        // Each connection answers its first request and dies on its second.
        let (addr, accepted) = loopback_server(move |tcp| {
            let counted = counted.clone();
            async move {
                let mut tcp = BufReader::new(tcp);
                for answered in [true, false] {
                    let mut line = String::new();
                    while tcp.read_line(&mut line).await.unwrap_or(0) > 0 && !line.ends_with("\r\n\r\n") {}
                    if answered {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        tcp.get_mut().write_all(ok).await.unwrap();
                    } else {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
        .await;
        let target = loopback_target(addr);
        let (dial, upstreams, breaker) = (dial(), Upstreams::new(Duration::from_secs(2)), Breaker::new());
        let limits = Limits::default();
        let limited = PoolLimits { breaker: &breaker, limits: &limits };
        let get = || Request::get("http://web/").body(Empty::new().map_err(BoxError::from).boxed()).unwrap();
        let send = async || {
            let response = upstreams.send(&target, false, get(), &dial, &limited, &Attempt::default()).await;
            response.expect("a response").into_body().collect().await.unwrap();
        };
        // Two requests at once: two pooled connections.
        tokio::join!(send(), send());
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!((accepted.load(Ordering::SeqCst), upstreams.pooled().0), (2, 2));

        let (head, body) = get().into_parts();
        let kept = clone_head(&head);
        let attempt = Attempt { per_try: None, head: Some(&kept), resent: None };
        let result = upstreams.send(&target, false, Request::from_parts(head, body), &dial, &limited, &attempt).await;
        let error = result.expect_err("cut off twice");
        assert_eq!(error.flag(), "UC", "{error:?}");
        assert_eq!(cut.load(Ordering::SeqCst), 2, "tried on both pooled connections");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "not sent on a third");
    }

    /// `perTryTimeout` times the endpoint, not the wait for a connection nor the
    /// upload: under `maxConnections: 1`, a request queued 250 ms behind a slow one
    /// still gets its (fast) answer within a 150 ms per-try timeout, while the slow
    /// answer itself runs out of it; so does an answer to a 400 ms upload.
    #[tokio::test]
    async fn the_per_try_timeout_starts_once_the_request_has_a_connection() {
        let (addr, _) = loopback_server(serve_ok).await;
        let target = loopback_target(addr);
        let (dial, upstreams, breaker) = (dial(), Upstreams::new(Duration::from_secs(2)), Breaker::new());
        let limits = Limits { max_connections: 1, ..Limits::default() };
        let limited = PoolLimits { breaker: &breaker, limits: &limits };
        let get = |path: &str| {
            Request::get(format!("http://web{path}")).body(Empty::new().map_err(BoxError::from).boxed()).unwrap()
        };
        let per_try = Some(Duration::from_millis(150));

        let slow = async {
            let response =
                upstreams.send(&target, false, get("/slow"), &dial, &limited, &Attempt::default()).await.expect("slow");
            response.into_body().collect().await.unwrap();
        };
        let queued = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let started = Instant::now();
            let result = upstreams
                .send(&target, false, get("/"), &dial, &limited, &Attempt { per_try, ..Attempt::default() })
                .await;
            (result.map(|_| ()), started.elapsed())
        };
        let ((), (result, waited)) = tokio::join!(slow, queued);
        result.expect("answered within its per-try timeout once it had the connection");
        assert!(waited >= Duration::from_millis(200), "it waited for the only connection: {waited:?}");

        let error = upstreams
            .send(&target, false, get("/slow"), &dial, &limited, &Attempt { per_try, ..Attempt::default() })
            .await
            .expect_err("too slow");
        assert!(error.per_try_timeout() && error.flag() == "UT" && !error.connect_failure(), "{error:?}");

        // An upload that takes 400 ms: the clock starts at its end, and the answer
        // that follows at once is in time.
        let (frames, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for _ in 0..4 {
                let _ = frames.send(http_body::Frame::data(Bytes::from_static(b"part")));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let upload = crate::replay::tests::Channel(rx).boxed();
        let upload = Request::post("http://web/upload").body(upload).unwrap();
        let started = Instant::now();
        let result =
            upstreams.send(&target, false, upload, &dial, &limited, &Attempt { per_try, ..Attempt::default() }).await;
        result.expect("answered within its per-try timeout after the upload's end");
        assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
    }

    /// `refused-stream` retries need an upstream's `REFUSED_STREAM` told apart from any
    /// other reset: hyper reports both as an error whose source is h2's.
    #[tokio::test]
    async fn an_upstream_refusing_a_stream_is_told_apart_from_a_reset() {
        for (reason, refused) in [(h2::Reason::REFUSED_STREAM, true), (h2::Reason::INTERNAL_ERROR, false)] {
            let (client_io, server_io) = tokio::io::duplex(64 << 10);
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(server_io).await.expect("h2 server handshake");
                while let Some(Ok((_, mut respond))) = connection.accept().await {
                    respond.send_reset(reason);
                }
            });
            let (mut sender, connection) =
                http2::handshake(TokioExecutor::new(), TokioIo::new(client_io)).await.expect("h2 client handshake");
            tokio::spawn(connection);
            let request = Request::get("http://upstream/").body(Empty::<Bytes>::new()).unwrap();
            let error = UpstreamError::Reset(sender.send_request(request).await.expect_err("the stream was reset"));
            assert_eq!(error.refused_stream(), refused, "{reason:?}: {error:?}");
            assert!(!error.connect_failure());
        }
    }

    #[test]
    fn an_overflow_is_neither_a_connect_failure_nor_a_reset() {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let overflow = UpstreamError::Overflow { addr, pending: 2 };
        assert!(overflow.overflow() && !overflow.connect_failure() && !overflow.refused_stream());
        assert_eq!(overflow.flag(), "UO");
        let timeout = UpstreamError::ConnectTimeout { addr };
        assert!(timeout.connect_failure() && !timeout.overflow());
        assert_eq!(timeout.flag(), "UF");
    }
}
