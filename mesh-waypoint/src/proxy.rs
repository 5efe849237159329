//! The HTTP proxy of one downstream connection, in the phases pingora names: request
//! filter (limits, forwarding headers) -> route -> upstream peer -> upstream request
//! -> response -> log. Bodies stream through; what a retry needs is buffered only
//! up to a bound.
use std::{
    fmt::Write as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use mesh_proxy::{
    metrics::{TcpLabels, flags},
    otlp,
    relay::{self, Side, copy_bidirectional},
    tunnel::stream::H2Stream,
    workloads::{ServiceKind, ServicePort, Workload},
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tracing::{debug, info};

use http_body_util::Limited;
use mesh_common::{
    config::mesh::ExtensionProvider,
    policy::{self, WaypointVerdict},
};
use mesh_waypoint::{
    authz,
    custom::{self, HeaderEdit},
    forwarded, jwt,
    normalize::Normalized,
    outlier::CallResult,
    policy::LbPolicy,
    ratelimit,
    retry::Outcome,
    route::{Abort, Action, Mirror, RequestParts, Route, TcpRequest},
    sniff::{self, Sniffed},
    telemetry_api::apply::{LogPlan, MetricPlan, RequestAttributes, TcpFamily},
    trace,
};

use crate::{
    destination::Lookup,
    ext_authz::{self, CheckRequest, Decision},
    inbound::{Caller, Protocol, Tables, Telemetry, Waypoint, protocol_of},
    keepalive,
    replay::{self, Recording},
    requests::{RequestLabels, RequestLog, Sample, TcpSeriesSet},
    tee,
    upstream::{Attempt, Body, BoxError, Dial, PoolLimits, Target, UpstreamError, clone_head, full, timed},
};

/// Request bodies of a known length up to this size are read whole before the first
/// try, for retries and mirrors.
const MAX_REPLAY: usize = 64 << 10;

/// How long a mirrored request may take to its response head (Envoy's default route
/// timeout): a shadow that never answers holds no task or connection for long.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);

/// A request body for the tries of one request.
enum Replay {
    Buffered(Bytes),
    /// Streamed, with a copy kept for retries up to [`replay::MAX_KEPT`].
    Recorded(Recording),
    /// Streamed: one try only (no retry policy, or an upgrade).
    Stream(Option<Counted>),
}

impl Replay {
    fn take(&mut self) -> Option<Body> {
        match self {
            Self::Buffered(bytes) => Some(full(bytes.clone())),
            Self::Recorded(recording) => recording.next_try(),
            Self::Stream(body) => body.take().map(http_body_util::BodyExt::boxed),
        }
    }

    fn can_replay(&self) -> bool {
        match self {
            Self::Buffered(_) => true,
            Self::Recorded(recording) => recording.can_replay(),
            Self::Stream(_) => false,
        }
    }

    /// Whether a retry was given up because the body outgrew the kept copy (Envoy's
    /// `retry_or_shadow_abandoned`).
    fn overflowed(&self) -> bool {
        matches!(self, Self::Recorded(recording) if recording.overflowed())
    }

    /// No more tries: a kept copy is released as the last try sends it.
    fn settle(&self) {
        if let Self::Recorded(recording) = self {
            recording.settle();
        }
    }
}

fn parts_query(path: &str) -> Option<&str> {
    path.split_once('?').map(|(_, q)| q)
}

fn roll_u64() -> u64 {
    use std::hash::{BuildHasher as _, RandomState};
    RandomState::new().hash_one(Instant::now())
}

/// Nanoseconds on a monotonic clock (since the first call): the rate limiters' time.
fn monotonic_nanos() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A uniform random number in [0, 1).
fn roll_f64() -> f64 {
    (roll_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Request headers larger than this get 431.
const MAX_HEADERS: usize = 64 << 10;
/// How long the first bytes of a connection on a port of unknown protocol are
/// awaited to tell HTTP from other protocols.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(1);

/// One downstream connection's context.
struct Downstream {
    waypoint: Arc<Waypoint>,
    /// The service VIP and port the tunnel stream asked for.
    target: SocketAddr,
    caller: Caller,
    /// The value a generated sticky cookie gets on this connection: one per connection,
    /// so that requests racing before the client has the cookie (a page's parallel
    /// loads) all get the same one and the same endpoint, as in Envoy.
    cookie_seed: u64,
}

/// Serves a tunnel stream to `service` as HTTP, or as TCP when a port of unknown
/// protocol does not start with HTTP.
pub async fn serve(
    waypoint: Arc<Waypoint>,
    service: Arc<ServicePort>,
    caller: Caller,
    target: SocketAddr,
    stream: H2Stream,
) {
    let mut stream = Prefixed { prefix: Bytes::new(), inner: stream };
    if protocol_of(&service) == Protocol::Unknown {
        // As many bytes as it takes to tell, within the sniffing time: server-first
        // protocols send nothing and are relayed as TCP.
        let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
        let mut first = BytesMut::with_capacity(1024);
        let http = loop {
            match sniff::sniff(&first) {
                Sniffed::Http => break true,
                Sniffed::Other => break false,
                Sniffed::NeedMore => {}
            }
            match tokio::time::timeout_at(deadline, stream.inner.read_buf(&mut first)).await {
                Ok(Ok(0)) | Err(_) => break false,
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return,
            }
        };
        stream.prefix = first.freeze();
        if !http {
            return relay(waypoint, service, caller, target, stream).await;
        }
    }
    let draining = waypoint.draining();
    let downstream = Arc::new(Downstream { waypoint, target, caller, cookie_seed: roll_u64() });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1000)
        .max_header_list_size(MAX_HEADERS as u32)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Duration::from_secs(30));
    // The header and idle timeouts are kept apart (see `keepalive`), not hyper's
    // header timeout, which also closed idle keep-alive connections.
    let handle = move |request| {
        let downstream = downstream.clone();
        async move { downstream.handle(request).await }
    };
    let stream = crate::flood::Guard::new(stream);
    if let Err(error) = keepalive::serve(&builder, stream, keepalive::Clock::new(), draining, handle).await {
        debug!(%error, "downstream HTTP connection ended with an error");
    }
}

/// The Service `service` as the authorization policies bound to it name it.
fn policy_target(service: &ServicePort) -> policy::Target<'_> {
    let kind = match service.kind {
        ServiceKind::Service => policy::TargetKind::Service,
        ServiceKind::ServiceEntry => policy::TargetKind::ServiceEntry,
    };
    policy::Target { kind, namespace: &service.namespace, name: &service.name }
}

/// Relays a tunnel stream to one endpoint as TCP.
pub async fn relay_tcp(
    waypoint: Arc<Waypoint>,
    service: Arc<ServicePort>,
    caller: Caller,
    target: SocketAddr,
    stream: H2Stream,
) {
    relay(waypoint, service, caller, target, Prefixed { prefix: Bytes::new(), inner: stream }).await;
}

/// Relays a connection by the service port's L4 routes: a backend by weight, an
/// endpoint of it by its balancer. A connection the authorization policies deny, or
/// with nothing to route to (no matching route, an unresolved backend, no endpoint),
/// is closed: refused, never bypassed.
async fn relay(
    waypoint: Arc<Waypoint>,
    service: Arc<ServicePort>,
    caller: Caller,
    vip: SocketAddr,
    stream: Prefixed<H2Stream>,
) {
    let tables = waypoint.tables();
    let table = tables.tcp_routes(&service);
    let telemetry = tables.telemetry(&waypoint, &service);
    let source = caller.workload.as_deref();
    let mut labels = TcpLabels {
        reporter: "waypoint",
        source_workload: source.map(|w| w.name.clone()).unwrap_or_default(),
        source_workload_namespace: source.map(|w| w.namespace.clone()).unwrap_or_default(),
        source_principal: caller.identity.to_string(),
        source_app: source.map(|w| w.app().to_owned()).unwrap_or_default(),
        source_revision: source.map(|w| w.revision().to_owned()).unwrap_or_default(),
        destination_service: service.hostname.clone(),
        destination_service_name: service.telemetry_name().to_owned(),
        destination_service_namespace: service.namespace.clone(),
        connection_security_policy: "mutual_tls",
        response_flags: flags::NONE,
        ..TcpLabels::default()
    };
    // A connection refused before any byte moved is opened and closed at once, with
    // its response flag (as Envoy's TCP proxy reports it).
    let refused = |labels: TcpLabels, flag: &'static str| {
        let series = TcpSeriesSet::new(
            &waypoint.metrics,
            &telemetry.tcp_metrics,
            &TcpLabels { response_flags: flag, ..labels },
            vip.port(),
        );
        series.add(&waypoint.metrics, TcpFamily::Opened, 1);
        series.add(&waypoint.metrics, TcpFamily::Closed, 1);
    };
    // The policies bound to the Service or the waypoint, with HTTP attributes unknown
    // as at L4: an ALLOW rule that needs them does not match, a DENY rule that needs
    // them matches.
    let target = policy_target(&service);
    let attrs = policy::Attributes {
        source_identity: Some(&caller.identity),
        source_ip: caller.addr.ip(),
        destination_ip: vip.ip(),
        destination_port: vip.port(),
        http: None,
    };
    let denied = match tables.policies.evaluate(Some(&target), &attrs) {
        WaypointVerdict::Allow { .. } => None,
        WaypointVerdict::Deny { reason, .. } => Some(reason),
        // The external authorizers are asked about HTTP requests only: a TCP
        // connection a CUSTOM policy covers is refused rather than let through unasked.
        WaypointVerdict::Custom { provider, policy } => {
            Some(format!("CUSTOM policy {policy} (provider {provider}) covers it, and TCP is not sent to authorizers"))
        }
    };
    if let Some(reason) = denied {
        info!(service = %service.hostname, caller = %caller.addr, identity = %caller.identity, flags = "RBAC", reason, "TCP connection denied");
        return refused(labels, flags::DENIED);
    }
    let request = TcpRequest {
        port: service.port,
        destination: vip.ip(),
        source: caller.addr.ip(),
        source_namespace: caller.namespace(),
        source_labels: caller.labels(),
    };
    let Some(route) = table.select(&request) else {
        info!(service = %service.hostname, caller = %caller.addr, flags = "NR", "TCP connection refused: no route matched");
        return refused(labels, flags::NO_ROUTE);
    };
    let Some(backend) = route.pick_backend(roll_u64()) else { return refused(labels, flags::NO_ROUTE) };
    if let Some(reason) = &backend.unresolved {
        info!(service = %service.hostname, route = %route.name, flags = "NR", reason, "TCP connection refused");
        return refused(labels, flags::NO_ROUTE);
    }
    let key = (backend.host.clone(), backend.subset.clone(), backend.port.unwrap_or(service.port));
    let Lookup::Found(destination) = tables.destination(&waypoint, &key).await else {
        info!(service = %service.hostname, route = %route.name, destination = ?key, flags = "NR", "TCP connection refused: unknown destination");
        return refused(labels, flags::NO_ROUTE);
    };
    let Some(target) = destination.pick(None, roll_u64(), &[]).and_then(|i| destination.endpoints.get(i)).cloned()
    else {
        info!(service = %service.hostname, destination = ?key, flags = "UH", "TCP connection refused: no healthy endpoint");
        return refused(labels, flags::NO_HEALTHY_UPSTREAM);
    };
    let workload = &target.workload;
    labels.destination_workload.clone_from(&workload.name);
    labels.destination_workload_namespace.clone_from(&workload.namespace);
    labels.destination_principal.clone_from(&workload.identity);
    workload.app().clone_into(&mut labels.destination_app);
    workload.revision().clone_into(&mut labels.destination_revision);
    // No certificate yet: the upstream cannot be reached.
    let Some(dial) = waypoint.dial(&caller) else { return refused(labels, flags::UPSTREAM_FAILURE) };
    match waypoint.upstreams().connect(&target, &dial.dial()).await {
        Ok(mut upstream) => {
            debug!(route = %route.name, endpoint = %target.addr, "TCP relay");
            let series = TcpSeriesSet::new(&waypoint.metrics, &telemetry.tcp_metrics, &labels, vip.port());
            series.add(&waypoint.metrics, TcpFamily::Opened, 1);
            // Client to upstream is "sent" (the request direction), counted also when
            // the relay ends with an error.
            let mut client = relay::Counted::new(stream);
            if let Err(error) = copy_bidirectional(&mut client, &mut upstream).await {
                debug!(%error, "TCP relay ended with an error");
            }
            let (sent, received) = client.counts();
            series.add(&waypoint.metrics, TcpFamily::Sent, sent);
            series.add(&waypoint.metrics, TcpFamily::Received, received);
            series.add(&waypoint.metrics, TcpFamily::Closed, 1);
        }
        Err(error) => {
            debug!(addr = %target.addr, %error, "TCP upstream connect failed");
            refused(labels, flags::UPSTREAM_FAILURE);
        }
    }
}

/// Owned parts of a [`Dial`].
pub struct DialParts {
    cert: Arc<mesh_proxy::identity::WorkloadCert>,
    client: SocketAddr,
    baggage: String,
    connect_timeout: Duration,
}

impl DialParts {
    pub fn dial(&self) -> Dial<'_> {
        Dial {
            cert: self.cert.clone(),
            client: self.client,
            baggage: &self.baggage,
            connect_timeout: self.connect_timeout,
        }
    }
}

impl Waypoint {
    /// How upstream connections for `caller` are made; None without a certificate.
    pub fn dial(&self, caller: &Caller) -> Option<DialParts> {
        let identity = self.identity()?;
        let cert = self.certificate_of(&identity)?;
        Some(DialParts {
            cert,
            client: caller.addr,
            baggage: format!(
                "k8s.namespace.name={},k8s.deployment.name={},service.name={},k8s.cluster.name=Kubernetes",
                self.namespace, self.name, self.name
            ),
            connect_timeout: self.connect_timeout(),
        })
    }
}

/// A generated sticky-session cookie on its way to the response (`Set-Cookie`).
#[derive(Clone)]
struct StickyCookie(HeaderValue);

/// A locally generated answer.
struct Reply {
    status: StatusCode,
    flags: &'static str,
    body: Bytes,
    headers: HeaderMap,
    reason: Option<String>,
}

impl Reply {
    fn new(status: StatusCode, flags: &'static str, body: &'static str) -> Self {
        Self { status, flags, body: Bytes::from_static(body.as_bytes()), headers: HeaderMap::new(), reason: None }
    }

    fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    fn with_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    fn with_header(mut self, name: http::HeaderName, value: &str) -> Self {
        if let Ok(value) = HeaderValue::from_str(value) {
            self.headers.append(name, value);
        }
        self
    }
}

/// A request's span in the making (see `Downstream::start_span`).
struct Span {
    started: trace::Started,
    /// Sampled and a provider to export to (else the context only propagates).
    report: bool,
    /// The destination's telemetry: custom tags and the exporter.
    telemetry: Arc<Telemetry>,
    /// The request headers, kept only when custom tags read them.
    headers: HeaderMap,
    user_agent: Option<String>,
    port: u16,
    start_unix_nanos: u64,
}

impl Span {
    /// Records the span and queues it for export (never waits).
    fn finish(self, waypoint: &Waypoint, log: &RequestLog, labels: &RequestLabels, sent: u64, received: u64) {
        let (true, Some(sender), Some(tracing)) =
            (self.report, &self.telemetry.exporter, &self.telemetry.effective.tracing)
        else {
            return;
        };
        let url = format!("http://{}{}", log.authority, log.path);
        let cluster = format!("outbound|{}||{}", self.port, labels.destination_service);
        let upstream = log.upstream.map(|a| a.to_string());
        let facts = trace::RequestFacts {
            service_host: &labels.destination_service,
            service_port: self.port,
            route_path: trace::RoutePath::Any,
            method: &log.method,
            url: &url,
            protocol: log.protocol,
            user_agent: self.user_agent.as_deref(),
            request_id: Some(&log.request_id),
            status: log.status,
            response_flags: log.flags,
            upstream_cluster: &cluster,
            upstream_address: upstream.as_deref(),
            request_size: sent,
            response_size: received,
            start_unix_nanos: self.start_unix_nanos,
            end_unix_nanos: unix_nanos(),
        };
        let node = trace::Node {
            node_id: &waypoint.name,
            canonical_service: &waypoint.name,
            canonical_revision: "latest",
            namespace: &waypoint.namespace,
            mesh_id: mesh_common::config::DEFAULT_TRUST_DOMAIN,
            cluster_id: mesh_proxy::metrics::CLUSTER,
        };
        let env = |name: &str| std::env::var(name).ok();
        let span = trace::finish(
            &self.started,
            otlp::SpanKind::Server,
            &facts,
            &node,
            &self.headers,
            &tracing.custom_tags,
            &env,
        );
        sender.send(span);
    }
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Every header as (lowercase name, value), repeated headers repeated, values that are
/// not text read lossily (a policy must see them, not skip them); and the `Host` values.
fn header_values(headers: &HeaderMap) -> (Vec<(&str, std::borrow::Cow<'_, str>)>, Vec<&str>) {
    let values: Vec<_> = headers.iter().map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v.as_bytes()))).collect();
    let hosts = headers.get_all(header::HOST).iter().filter_map(|v| v.to_str().ok()).collect();
    (values, hosts)
}

/// A request id for requests that come without one (a random UUID, version 4).
fn request_id() -> String {
    use std::hash::{BuildHasher as _, RandomState};
    let a = RandomState::new().hash_one(Instant::now());
    let b = RandomState::new().hash_one(a);
    let (a, b) = ((a & !0xf000) | 0x4000, (b & !(0b11 << 62)) | (0b10 << 62));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// Hop-by-hop headers, never forwarded (RFC 9110, 7.6.1).
const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "proxy-authorization"];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect();
    let trailers = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in HOP_BY_HOP.iter().copied().chain(named.iter().map(String::as_str)) {
        if keep_upgrade && (name == "upgrade" || name == "connection") {
            continue;
        }
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A local answer to a gRPC request as Envoy gives it: trailers-only (HTTP 200, no
/// body) with the `grpc-status` the HTTP status maps to (gRPC's HTTP-to-gRPC table)
/// and the answer's text as `grpc-message`, so that gRPC clients see a gRPC error
/// ("UNAVAILABLE: no healthy upstream") rather than a malformed response.
fn grpc_reply(status: StatusCode, text: &[u8]) -> Response<Body> {
    let code = match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    };
    grpc_trailers_only(code, text)
}

/// A trailers-only gRPC answer (HTTP 200, no body) with `grpc-status` `code` and
/// `text` as `grpc-message`, percent-encoded as gRPC requires.
fn grpc_trailers_only(code: u32, text: &[u8]) -> Response<Body> {
    let mut message = String::new();
    for &b in text.trim_ascii() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            message.push(char::from(b));
        } else {
            let _ = write!(message, "%{b:02X}");
        }
    }
    let mut response = Response::new(full(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(message) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", message);
    }
    response
}

/// A response body that ends in an error at `deadline` if it has not ended before.
struct Deadline {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err("upstream request timeout: the route's timeout passed".into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Called once at a body's end with its byte count and `grpc-status`.
type Done = Box<dyn FnOnce(u64, Option<String>) + Send + Sync>;

/// Counts a body's bytes and calls `done` once at its end (or when dropped early),
/// with the byte count and a `grpc-status` seen in its trailers.
struct Counted {
    inner: Body,
    bytes: Arc<AtomicU64>,
    grpc_status: Option<String>,
    done: Option<Done>,
}

impl Counted {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.bytes.load(Ordering::Relaxed), self.grpc_status.take());
        }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(status) = trailers.get("grpc-status").and_then(|v| v.to_str().ok())
                {
                    this.grpc_status = Some(status.to_owned());
                }
            }
            Poll::Ready(None | Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The request attributes the metric tag overrides of `plan` read: authority and path
/// as logged (the caller updates the path once normalized), and only the headers named.
fn request_attributes(
    plan: &MetricPlan,
    request: &Request<Incoming>,
    log: &RequestLog,
    port: u16,
) -> RequestAttributes {
    let headers = plan
        .headers()
        .into_iter()
        .filter_map(|name| {
            let value = request.headers().get(name)?.to_str().ok()?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect();
    RequestAttributes {
        host: log.authority.clone(),
        method: log.method.clone(),
        path: log.path.clone(),
        scheme: "http",
        protocol: log.protocol,
        headers,
        destination_port: port,
        response_code: 0,
    }
}

fn header_bytes(headers: &HeaderMap) -> u64 {
    headers.iter().map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64).sum()
}

impl Downstream {
    async fn handle(self: Arc<Self>, mut request: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let tables = self.waypoint.tables();
        let service = tables.index.service(self.target).cloned();
        let grpc =
            request.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let request_id = match request.headers().get("x-request-id").and_then(|v| v.to_str().ok()) {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => {
                let id = request_id();
                request.headers_mut().insert("x-request-id", HeaderValue::from_str(&id).expect("hex is a valid value"));
                id
            }
        };
        let source = self.caller.workload.as_deref();
        let mut labels = RequestLabels {
            source_workload: source.map(|w| w.name.clone()).unwrap_or_default(),
            source_workload_namespace: source.map(|w| w.namespace.clone()).unwrap_or_default(),
            source_principal: self.caller.identity.to_string(),
            source_app: source.map(|w| w.app().to_owned()).unwrap_or_default(),
            source_revision: source.map(|w| w.revision().to_owned()).unwrap_or_default(),
            request_protocol: if grpc { "grpc" } else { "http" },
            ..RequestLabels::default()
        };
        if let Some(service) = &service {
            labels.destination_service = service.hostname.clone();
            labels.destination_service_name = service.telemetry_name().to_owned();
            labels.destination_service_namespace = service.namespace.clone();
        }
        let mut log = RequestLog {
            method: request.method().to_string(),
            authority: request
                .uri()
                .authority()
                .map(ToString::to_string)
                .or_else(|| request.headers().get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_owned))
                .unwrap_or_default(),
            path: request.uri().path_and_query().map_or_else(|| "/".to_owned(), ToString::to_string),
            protocol: match request.version() {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            request_id,
            source_identity: self.caller.identity.to_string(),
            source_addr: Some(self.caller.addr),
            destination_service: labels.destination_service.clone(),
            ..RequestLog::default()
        };
        let request_bytes = Arc::new(AtomicU64::new(header_bytes(request.headers())));
        let telemetry = service.as_ref().map(|service| tables.telemetry(&self.waypoint, service));
        // What metric tag overrides read (headers before the security phase edits them).
        let mut attributes = match (&telemetry, &service) {
            (Some(t), Some(service)) if t.metrics.rewrites() => {
                Some(request_attributes(&t.metrics, &request, &log, service.port))
            }
            _ => None,
        };
        let span = telemetry.as_ref().zip(service.as_ref()).and_then(|(t, s)| Self::start_span(t, s, &mut request));
        let outcome = match &service {
            Some(service) => match self.secure(&tables, service, &mut request, &mut log).await {
                Ok(response_edits) => {
                    let forwarded =
                        self.forward(&tables, service, request, &request_bytes, &mut log, &mut labels).await;
                    forwarded.map(|mut response| {
                        HeaderEdit::apply_all(&response_edits, response.headers_mut());
                        response
                    })
                }
                Err(reply) => Err(reply),
            },
            None => Err(Reply::new(StatusCode::SERVICE_UNAVAILABLE, "NR", "no route\n")
                .because("the service is gone from the view")),
        };
        let response = match outcome {
            Ok(response) => response,
            Err(reply) => {
                log.reason = reply.reason;
                log.flags = reply.flags;
                let mut response = if grpc {
                    grpc_reply(reply.status, &reply.body)
                } else {
                    Response::builder()
                        .status(reply.status)
                        .header(header::CONTENT_TYPE, "text/plain")
                        .body(full(reply.body))
                        .expect("static parts")
                };
                response.headers_mut().extend(reply.headers);
                response
            }
        };
        if log.flags.is_empty() {
            log.flags = "-";
        }
        labels.response_code = response.status().as_u16();
        labels.response_flags = log.flags;
        log.status = labels.response_code;
        let (parts, body) = response.into_parts();
        if let Some(status) = parts.headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
            status.clone_into(&mut labels.grpc_response_status);
        }
        let waypoint = self.waypoint.clone();
        let response_bytes = Arc::new(AtomicU64::new(header_bytes(&parts.headers)));
        if let Some(attributes) = &mut attributes {
            attributes.response_code = labels.response_code;
            // Normalized by the security phase, as Envoy normalizes before its filters.
            attributes.path.clone_from(&log.path);
        }
        let done = move |bytes: u64, grpc_status: Option<String>| {
            if let Some(status) = grpc_status {
                labels.grpc_response_status = status;
            }
            let duration = start.elapsed();
            let sent = request_bytes.load(Ordering::Relaxed);
            // No service, no Telemetry: every family recorded, every request logged.
            let fallback;
            let (log_plan, metric_plan) = if let Some(t) = &telemetry {
                (&t.log, &t.metrics)
            } else {
                fallback = (LogPlan::default(), MetricPlan::default());
                (&fallback.0, &fallback.1)
            };
            let sample = Sample { duration, request_bytes: sent, response_bytes: bytes };
            waypoint.requests.record(metric_plan, &labels, attributes.as_ref(), sample);
            if log_plan.logs(log.status, log.flags) {
                log.emit(duration, sent, bytes);
            }
            if let Some(span) = span {
                span.finish(&waypoint, &log, &labels, sent, bytes);
            }
        };
        let body = Counted { inner: body, bytes: response_bytes, grpc_status: None, done: Some(Box::new(done)) };
        Response::from_parts(parts, body.boxed())
    }

    /// Tracing: when the Telemetry API gives the service a tracing provider, the trace
    /// context is read (W3C or B3), a span id made and the headers for upstream set on
    /// the request; the span is exported when the request is done, if sampled.
    fn start_span(telemetry: &Arc<Telemetry>, service: &ServicePort, request: &mut Request<Incoming>) -> Option<Span> {
        let tracing = telemetry.effective.tracing.as_ref()?;
        let (a, b) = (roll_u64(), roll_u64());
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&a.to_le_bytes());
        trace_id[8..].copy_from_slice(&b.to_le_bytes());
        let randomness =
            trace::Randomness { trace_id, span_id: roll_u64().to_le_bytes(), sample: (roll_u64() >> 32) as u32 };
        let started = trace::start(request.headers(), tracing.sampling_percent, randomness);
        trace::inject(&started, request.headers_mut());
        let report = started.sampled && telemetry.exporter.is_some();
        let headers =
            if report && !tracing.custom_tags.is_empty() { request.headers().clone() } else { HeaderMap::new() };
        Some(Span {
            started,
            report,
            headers,
            user_agent: request.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned),
            port: service.port,
            start_unix_nanos: unix_nanos(),
            telemetry: telemetry.clone(),
        })
    }

    /// The security phase, before routing: JWT authentication (`RequestAuthentication`),
    /// path and host normalization, then L7 authorization (`AuthorizationPolicy` bound
    /// to this waypoint or the Service). On success the request carries the normalized
    /// path, so that what was authorized is what is routed and forwarded.
    async fn secure(
        &self,
        tables: &Tables,
        service: &ServicePort,
        request: &mut Request<Incoming>,
        log: &mut RequestLog,
    ) -> Result<Vec<HeaderEdit>, Reply> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let auth = match tables.authenticator(&self.waypoint, service).authenticate(
            request.headers(),
            request.uri().query(),
            now,
        ) {
            jwt::Outcome::Anonymous => None,
            jwt::Outcome::Authenticated { auth, edits } => {
                edits.apply(request.headers_mut());
                Some(auth)
            }
            jwt::Outcome::Denied(denied) => {
                let realm = format!("http://{}{}", log.authority, request.uri().path());
                return Err(Reply::new(jwt::Denied::STATUS, "-", "")
                    .with_body(denied.body())
                    .with_header(header::WWW_AUTHENTICATE, &jwt::Denied::www_authenticate(&realm))
                    .because(format!("JWT: {}", denied.body())));
            }
        };
        let target = policy_target(service);
        // `remote.ip`, from `X-Forwarded-For` as received (before ext_authz edits).
        let remote_ip = forwarded::remote_ip(request.headers(), tables.trusted_proxies, self.caller.addr.ip());
        let path_and_query = request.uri().path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let (normalized, verdict) = {
            let (values, hosts) = header_values(request.headers());
            let headers: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_ref())).collect();
            let checked = authz::check(
                &tables.policies,
                tables.normalization,
                Some(&target),
                &authz::Request {
                    method: request.method().as_str(),
                    target: &path_and_query,
                    authority: request.uri().authority().map(http::uri::Authority::as_str),
                    host_headers: &hosts,
                    headers: &headers,
                    source_identity: Some(&self.caller.identity),
                    source_ip: self.caller.addr.ip(),
                    remote_ip,
                    destination_ip: self.target.ip(),
                    destination_port: self.target.port(),
                    auth: auth.as_ref(),
                    sni: None,
                },
            )
            .map_err(|reject| {
                let status = StatusCode::from_u16(reject.status()).unwrap_or(StatusCode::BAD_REQUEST);
                Reply::new(status, "-", "").with_body(format!("{reject}\n")).because(reject.to_string())
            })?;
            (checked.normalized, checked.verdict)
        };
        let mut response_edits = Vec::new();
        let verdict = match verdict {
            WaypointVerdict::Custom { provider, policy } => {
                let (decision, failure) = self.ext_authz(tables, &provider, request, log, &normalized).await;
                match decision {
                    Decision::Deny { status, headers, body } => {
                        let why = failure.map_or_else(String::new, |f| format!(": check failed: {f}"));
                        let mut reply = Reply::new(status, "UAEX", "").with_body(body).because(format!(
                            "denied by the external authorizer {provider} (CUSTOM policy {policy}){why}"
                        ));
                        HeaderEdit::apply_all(&headers, &mut reply.headers);
                        return Err(reply);
                    }
                    Decision::Allow { upstream_headers, downstream_headers, remove } => {
                        for name in &remove {
                            request.headers_mut().remove(name);
                        }
                        HeaderEdit::apply_all(&upstream_headers, request.headers_mut());
                        response_edits = downstream_headers;
                        // Then DENY, AUDIT and ALLOW, with the headers the authorizer set.
                        let (values, _) = header_values(request.headers());
                        let headers: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_ref())).collect();
                        let attrs = policy::Attributes {
                            source_identity: Some(&self.caller.identity),
                            source_ip: self.caller.addr.ip(),
                            destination_ip: self.target.ip(),
                            destination_port: self.target.port(),
                            http: Some(policy::Http {
                                method: request.method().as_str(),
                                host: &normalized.host,
                                path: &normalized.path,
                                headers: &headers,
                                auth: auth.as_ref(),
                                sni: None,
                                remote_ip,
                            }),
                        };
                        match tables.policies.evaluate_after_ext_authz(Some(&target), &attrs) {
                            policy::Verdict::Allow { audited_by } => WaypointVerdict::Allow { audited_by },
                            policy::Verdict::Deny { policy, reason } => WaypointVerdict::Deny { policy, reason },
                        }
                    }
                }
            }
            verdict => verdict,
        };
        match verdict {
            WaypointVerdict::Allow { audited_by } => {
                if !audited_by.is_empty() {
                    info!(request_id = %log.request_id, policies = ?audited_by, "request audited");
                }
            }
            WaypointVerdict::Deny { reason, .. } => {
                return Err(Reply::new(StatusCode::FORBIDDEN, "RBAC", "RBAC: access denied").because(reason));
            }
            WaypointVerdict::Custom { .. } => unreachable!("CUSTOM was decided above"),
        }
        let forwarded = normalized.path_and_query();
        if forwarded != path_and_query {
            let mut parts = request.uri().clone().into_parts();
            parts.path_and_query = forwarded.parse().ok();
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
        log.path = forwarded;
        Ok(response_edits)
    }

    /// Asks the `ext_authz` provider `name` about the request; an undeclared provider
    /// denies (fail closed).
    async fn ext_authz(
        &self,
        tables: &Tables,
        name: &str,
        request: &Request<Incoming>,
        log: &RequestLog,
        normalized: &Normalized,
    ) -> (Decision, Option<String>) {
        let Some(provider) = tables.config.mesh.provider(name).and_then(ExtensionProvider::ext_authz) else {
            let deny = Decision::Deny {
                status: StatusCode::FORBIDDEN,
                headers: Vec::new(),
                body: Bytes::from_static(b"RBAC: access denied"),
            };
            return (deny, Some(format!("no ext_authz provider {name} in the mesh config")));
        };
        let identity = self.waypoint.identity().unwrap_or_default();
        let check = CheckRequest {
            method: request.method(),
            path: &normalized.path_and_query(),
            host: &normalized.host,
            scheme: "http",
            version: request.version(),
            headers: request.headers(),
            source_principal: &self.caller.identity,
            // The direct peer, not `remote.ip`: Envoy's `source.address` is the
            // connection's remote address even with trusted XFF hops.
            source_addr: self.caller.addr,
            destination_addr: self.target,
            destination_principal: &identity,
            request_id: &log.request_id,
        };
        let v6 = self.caller.addr.is_ipv6();
        // A meshed authorizer is reached through HBONE, like any upstream (no
        // certificate yet: it does not resolve, and the failure policy decides).
        let dial = self.waypoint.dial(&self.caller);
        let resolve = |service: &str, port: u16| {
            let (_, host) = custom::service_host(service);
            let (workload, addr) = tables.index.service_by_host(host, port).and_then(|s| s.pick(v6))?;
            if !workload.meshed {
                return Some(ext_authz::Endpoint::Plain(addr));
            }
            let dial = dial.as_ref()?.dial();
            Some(ext_authz::Endpoint::Mesh { workload, addr, upstreams: self.waypoint.upstreams(), dial })
        };
        self.waypoint.ext_authz.check(provider, resolve, &check).await
    }

    /// What route matching and redirects read of a request.
    fn request_parts<'a>(
        &'a self,
        request: &'a Request<Incoming>,
        path: &'a str,
        authority: &'a str,
        port: u16,
    ) -> RequestParts<'a> {
        RequestParts {
            method: request.method().as_str(),
            path,
            authority,
            scheme: "http",
            headers: request.headers(),
            port,
            source_namespace: self.caller.namespace(),
            source_labels: self.caller.labels(),
        }
    }

    async fn forward(
        &self,
        tables: &Tables,
        service: &Arc<ServicePort>,
        request: Request<Incoming>,
        request_bytes: &Arc<AtomicU64>,
        log: &mut RequestLog,
        labels: &mut RequestLabels,
    ) -> Result<Response<Body>, Reply> {
        let dial = self
            .waypoint
            .dial(&self.caller)
            .ok_or_else(|| Reply::new(StatusCode::SERVICE_UNAVAILABLE, "UF", "no certificate yet\n"))?;
        // Route.
        let table = tables.routes(service);
        let path_and_query = log.path.clone();
        let parts = self.request_parts(&request, &path_and_query, &log.authority, service.port);
        let Some(route) = table.select(&parts) else {
            return Err(Reply::new(StatusCode::NOT_FOUND, "NR", "route not found\n").because("no route matched"));
        };
        log.route.clone_from(&route.name);
        let origin = request.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut answer =
            self.forward_on(tables, service, route, dial, request, origin.as_deref(), request_bytes, log, labels).await;
        // The route's response headers and CORS go on every answer once a route is
        // chosen, the proxy's own included (a redirect, a fault, a 503), as Envoy's
        // router and CORS filter add them: else a browser sees a CORS error instead.
        let headers = match &mut answer {
            Ok(response) => response.headers_mut(),
            Err(reply) => &mut reply.headers,
        };
        route.response_headers.apply(headers);
        if let (Some(cors), Some(origin)) = (&route.cors, &origin) {
            headers.extend(cors.response_headers(origin));
        }
        if let Ok(response) = &mut answer
            && let Some(StickyCookie(cookie)) = response.extensions_mut().remove()
        {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        answer
    }

    /// [`Downstream::forward`] once `route` is chosen: rate limits, preflight, faults,
    /// redirects and direct responses, then the backend and its upstream exchange (with retries).
    #[allow(clippy::too_many_arguments)]
    async fn forward_on(
        &self,
        tables: &Tables,
        service: &Arc<ServicePort>,
        route: &Route,
        dial: DialParts,
        mut request: Request<Incoming>,
        origin: Option<&str>,
        request_bytes: &Arc<AtomicU64>,
        log: &mut RequestLog,
        labels: &mut RequestLabels,
    ) -> Result<Response<Body>, Reply> {
        let limits = self.waypoint.rate_limits(tables, service);
        if !limits.is_empty()
            && let ratelimit::Decision::Limited { headers } =
                limits.decide(&route.name, monotonic_nanos(), (roll_u64() >> 32) as u32)
        {
            let mut reply = Reply::new(StatusCode::TOO_MANY_REQUESTS, "RL", "local_rate_limited")
                .because(format!("local rate limit ({})", limits.filter_ids().collect::<Vec<_>>().join(", ")));
            for (name, value) in headers {
                if let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) {
                    reply = reply.with_header(name, &value);
                }
            }
            return Err(reply);
        }
        let path_and_query = log.path.clone();
        // CORS preflight, answered here when the policy allows the origin.
        if let (Some(cors), Some(origin)) = (&route.cors, &origin)
            && request.method() == http::Method::OPTIONS
            && let Some(method) = request.headers().get("access-control-request-method").and_then(|v| v.to_str().ok())
        {
            let asked =
                request.headers().get("access-control-request-headers").and_then(|v| v.to_str().ok()).unwrap_or("");
            if let Some(headers) = cors.preflight(origin, method, asked) {
                let mut response = Response::new(full(Bytes::new()));
                *response.headers_mut() = headers;
                return Ok(response);
            }
        }
        // Faults.
        if let Some(fault) = &route.fault {
            let decision = fault.decide(roll_f64(), roll_f64());
            if let Some(delay) = decision.delay {
                tokio::time::sleep(delay).await;
                log.flags = "DI";
            }
            match decision.abort {
                Some(Abort::Http(status)) => {
                    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    return Err(Reply::new(status, "FI", "fault filter abort").because("fault injection"));
                }
                Some(Abort::Grpc(code)) => {
                    log.flags = "FI";
                    return Ok(grpc_trailers_only(code, b"fault filter abort"));
                }
                None => {}
            }
        }
        match &route.action {
            Action::Redirect(redirect) => {
                let parts = self.request_parts(&request, &path_and_query, &log.authority, service.port);
                let location = redirect.location(&parts);
                let mut response = Response::new(full(Bytes::new()));
                *response.status_mut() = StatusCode::from_u16(redirect.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
                if let Ok(value) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, value);
                }
                return Ok(response);
            }
            Action::DirectResponse { status, body } => {
                let mut response = Response::new(full(body.clone().unwrap_or_default()));
                *response.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                return Ok(response);
            }
            Action::Forward { .. } => {}
        }
        let Some(backend) = route.pick_backend(roll_u64()) else {
            return Err(Reply::new(StatusCode::SERVICE_UNAVAILABLE, "NR", "no backend\n"));
        };
        if let Some(reason) = &backend.unresolved {
            let status = StatusCode::from_u16(backend.unresolved_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Err(Reply::new(status, "NR", "no route to the backend\n").because(reason.clone()));
        }
        let key = (backend.host.clone(), backend.subset.clone(), backend.port.unwrap_or(service.port));
        let destination = match tables.destination(&self.waypoint, &key).await {
            Lookup::Found(destination) => destination,
            Lookup::Missing(missing) => {
                return Err(Reply::new(StatusCode::SERVICE_UNAVAILABLE, "NR", "no healthy upstream\n")
                    .because(missing.to_string()));
            }
            Lookup::Unknown => {
                let reason = format!("no service {}:{}", key.0, key.2);
                return Err(
                    Reply::new(StatusCode::SERVICE_UNAVAILABLE, "NR", "no route to the backend\n").because(reason)
                );
            }
        };
        if destination.endpoints.is_empty() {
            return Err(Reply::new(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream\n"));
        }
        // The request goes upstream: forwarding headers, rewrites, header operations.
        let upgrade = request.version() == Version::HTTP_11
            && request.headers().get(header::UPGRADE).is_some()
            && request
                .headers()
                .get(header::CONNECTION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"));
        let grpc = labels.request_protocol == "grpc";
        // Upstream HTTP/2 for ports declared HTTP/2 or gRPC and for gRPC requests; the
        // downstream's protocol on ports of unknown protocol; else HTTP/1.1 (Istio's
        // default without `h2UpgradePolicy`).
        let sniffed = protocol_of(service) == Protocol::Unknown && request.version() == Version::HTTP_2;
        let h2 = !upgrade && (grpc || sniffed || wants_h2(service));
        let mut downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let hash = match &destination.policy.lb {
            LbPolicy::ConsistentHash(ch) => {
                let query = parts_query(&path_and_query);
                ch.key.hash(request.headers(), query, self.caller.addr.ip(), self.cookie_seed)
            }
            _ => (None, None),
        };
        let (mut head, body) = request.into_parts();
        self.forwarding_headers(&mut head.headers, upgrade);
        let mut authority = log.authority.clone();
        let mut path = path_and_query.clone();
        if let Some(rewrite) = &route.rewrite {
            if let Some(new) = route.rewrite_path(&path) {
                path = new;
            }
            if let Some(new) = &rewrite.authority {
                authority.clone_from(new);
                if let Ok(value) = HeaderValue::from_str(new) {
                    head.headers.insert(header::HOST, value);
                }
            }
        }
        backend.request_headers.apply(&mut head.headers);
        route.request_headers.apply(&mut head.headers);
        if h2 {
            head.version = Version::HTTP_2;
            head.uri = format!("http://{authority}{path}").parse().unwrap_or(head.uri);
            head.headers.remove(header::HOST);
        } else {
            head.version = Version::HTTP_11;
            if !head.headers.contains_key(header::HOST)
                && let Ok(host) = HeaderValue::from_str(&authority)
            {
                head.headers.insert(header::HOST, host);
            }
            head.uri = path.parse().unwrap_or(head.uri);
        }
        // Retries and mirrors need the body again: buffered when small, else the
        // request goes once.
        let retry = &route.retry;
        let replayable = retry.attempts > 0 || !route.mirrors.is_empty();
        let small = http_body::Body::is_end_stream(&body)
            || http_body::Body::size_hint(&body).upper().is_some_and(|upper| upper <= MAX_REPLAY as u64);
        let body: Replay = if replayable && !upgrade && small {
            match Limited::new(body, MAX_REPLAY).collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    request_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    Replay::Buffered(bytes)
                }
                Err(_) => return Err(Reply::new(StatusCode::PAYLOAD_TOO_LARGE, "-", "payload too large\n")),
            }
        } else {
            Replay::Stream(Some(Counted {
                inner: body.map_err(BoxError::from).boxed(),
                bytes: request_bytes.clone(),
                grpc_status: None,
                done: None,
            }))
        };
        let mut body = body;
        // Mirrors: fire and forget, with `-shadow` appended to the host, as Envoy does; a
        // streamed body is copied to them as it passes (see `tee`).
        let fired: Vec<&Mirror> = route.mirrors.iter().filter(|m| m.fires(roll_f64())).collect();
        match &mut body {
            Replay::Buffered(bytes) => {
                for mirror in fired {
                    self.mirror(service, mirror, &head, full(bytes.clone()), &authority, &path, h2);
                }
            }
            Replay::Stream(Some(counted)) if !fired.is_empty() && !upgrade => {
                let (request, copies) = tee::tee(
                    std::mem::replace(&mut counted.inner, full(Bytes::new())),
                    fired.len(),
                    tee::MAX_BEHIND,
                    &self.waypoint.abandoned,
                );
                counted.inner = request;
                for (mirror, copy) in fired.into_iter().zip(copies) {
                    self.mirror(service, mirror, &head, copy, &authority, &path, h2);
                }
            }
            Replay::Stream(_) | Replay::Recorded(_) => {}
        }
        // A streamed body is kept (up to a bound) for retries only when there may be
        // retries: no retry policy, no copy.
        if retry.attempts > 0
            && !upgrade
            && let Replay::Stream(Some(counted)) = body
        {
            body = Replay::Recorded(Recording::new(counted.boxed(), replay::MAX_KEPT));
        }
        let limits = destination.policy.limits;
        let limited = PoolLimits { breaker: &destination.health.breaker, limits: &limits };
        let mut dial = dial;
        if let Some(timeout) = limits.connect_timeout {
            // The DestinationRule's `tcp.connectTimeout`; else the waypoint's default.
            dial.connect_timeout = timeout;
        }
        let Some(request_slot) = destination.health.breaker.try_request(&limits) else {
            return Err(Reply::new(StatusCode::SERVICE_UNAVAILABLE, "UO", OVERFLOW_REPLY));
        };
        // Sends moved to another connection by the pool, over all tries.
        let resent = std::sync::atomic::AtomicU32::new(0);
        let attempts = async {
            let mut tried: Vec<usize> = Vec::new();
            let mut attempt = 0u32;
            let mut retry_slot = None;
            loop {
                attempt += 1;
                log.attempts = attempt;
                let Some(i) =
                    destination.pick(hash.0, roll_u64(), if retry.retry_ignore_previous_hosts { &tried } else { &[] })
                else {
                    return Err(Reply::new(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream\n"));
                };
                tried.push(i);
                let target = destination.endpoints[i].clone();
                Self::describe_upstream(&target.workload, target.addr, log, labels);
                let Some(attempt_body) = body.take() else {
                    return Err(Reply::new(StatusCode::SERVICE_UNAVAILABLE, "UC", "upstream reset\n"));
                };
                let upstream_request = Request::from_parts(clone_head(&head), attempt_body);
                let active = destination.start(i);
                let per_try = retry.per_try_timeout;
                let result = if let Some(downstream) = downstream_upgrade.take() {
                    // An upgrade has a connection of its own: the try's clock runs
                    // from its connect.
                    timed(per_try, self.upgrade(&target, &dial, upstream_request, downstream)).await.and_then(|r| r)
                } else {
                    let attempt = Attempt { per_try, head: Some(&head), resent: Some(&resent) };
                    self.waypoint
                        .upstreams()
                        .send(&target, h2, upstream_request, &dial.dial(), &limited, &attempt)
                        .await
                };
                let outcome = match &result {
                    Ok(response) => Outcome {
                        status: Some(response.status().as_u16()),
                        grpc_status: response.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok()),
                        envoy_ratelimited: response.headers().contains_key("x-envoy-ratelimited"),
                        ..Outcome::default()
                    },
                    Err(error) if error.per_try_timeout() => Outcome { per_try_timeout: true, ..Outcome::default() },
                    Err(error) => Outcome {
                        connect_failure: error.connect_failure(),
                        refused_stream: error.refused_stream(),
                        overflow: error.overflow(),
                        reset: !error.connect_failure() && !error.refused_stream() && !error.overflow(),
                        ..Outcome::default()
                    },
                };
                let status = outcome.status;
                if !outcome.overflow {
                    destination.record(
                        i,
                        CallResult {
                            status,
                            gateway_error: status.is_none_or(|s| matches!(s, 502..=504)),
                            local_origin_failure: status.is_none(),
                        },
                    );
                }
                let wanted = retry.should_retry(attempt, &outcome);
                let again = wanted && body.can_replay() && {
                    // Retries in flight to the destination are bounded too (`maxRetries`):
                    // a request holds one slot, its latest retry's (Envoy's `resetRetry`).
                    drop(retry_slot.take());
                    retry_slot = destination.health.breaker.try_retry(&limits);
                    retry_slot.is_some()
                };
                if !again {
                    body.settle();
                    if wanted && body.overflowed() {
                        self.waypoint.abandoned.inc();
                        debug!(
                            attempt,
                            ?outcome,
                            limit = replay::MAX_KEPT,
                            "no retry: the request body outgrew the copy kept for retries"
                        );
                    }
                    let exhausted = attempt > 1 && retry.conditions.matches(&outcome);
                    return match result {
                        Ok(response) => {
                            if exhausted {
                                log.flags = "URX";
                            }
                            Ok((response, active))
                        }
                        Err(error) => {
                            let mut reply = upstream_reply(error);
                            if exhausted {
                                reply.flags = "URX";
                            }
                            Err(reply)
                        }
                    };
                }
                debug!(attempt, ?outcome, "retrying");
                tokio::time::sleep(retry.backoff(attempt, roll_f64())).await;
            }
        };
        let deadline = route.timeout.map(|limit| tokio::time::Instant::now() + limit);
        let sent = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, attempts)
                .await
                .map_err(|_| Reply::new(StatusCode::GATEWAY_TIMEOUT, "UT", TIMEOUT_REPLY)),
            None => Ok(attempts.await),
        };
        // Also when the route's timeout cut a send short.
        log.resent = resent.load(std::sync::atomic::Ordering::Relaxed);
        let (sent, active) = sent??;
        let (mut parts, body) = sent.into_parts();
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(&mut parts.headers, false);
        }
        backend.response_headers.apply(&mut parts.headers);
        if let Some(cookie) = hash.1 {
            // Set after the route's own header edits ([`Downstream::forward`]), which
            // must not strip it.
            parts.extensions.insert(StickyCookie(cookie));
        }
        // The request counts against `http2MaxRequests` and its endpoint's load (least
        // request) until its response body ends, as in Envoy: a stream or a long
        // download is in flight while its body flows, not only until its head.
        // Its end may free an HTTP/1.1 connection that requests wait for.
        let breaker = destination.health.breaker.clone();
        let mut body = body.map_err(BoxError::from).boxed();
        if let Some(deadline) = deadline {
            // The route's timeout covers the whole response, as Envoy's does: a body
            // still flowing at the deadline is cut (the stream reset, the HTTP/1.1
            // connection closed).
            body = Deadline { inner: body, deadline: Box::pin(tokio::time::sleep_until(deadline)) }.boxed();
        }
        let body = Counted {
            inner: body,
            bytes: Arc::default(),
            grpc_status: None,
            done: Some(Box::new(move |_, _| {
                drop((request_slot, active));
                breaker.notify_freed();
            })),
        };
        Ok(Response::from_parts(parts, body.boxed()))
    }

    /// Sends a WebSocket (or other `Upgrade`) request on a connection of its own and
    /// joins the two upgraded connections when the upstream switches protocols.
    async fn upgrade(
        &self,
        target: &Target,
        dial: &DialParts,
        request: Request<Body>,
        downstream: hyper::upgrade::OnUpgrade,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (mut sender, _) = self.waypoint.upstreams().open_h1(target, &dial.dial(), true, None).await?;
        let mut response = sender.send_request(request).await.map_err(UpstreamError::Reset)?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                if let (Ok(a), Ok(b)) = (downstream.await, upstream.await) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
                }
            });
        }
        Ok(response)
    }

    /// Sends a copy of a request to a mirror backend; its answer is dropped.
    #[allow(clippy::too_many_arguments, reason = "one call site; the parts of one request")]
    fn mirror(
        &self,
        service: &ServicePort,
        mirror: &Mirror,
        head: &http::request::Parts,
        body: Body,
        authority: &str,
        path: &str,
        h2: bool,
    ) {
        let key =
            (mirror.backend.host.clone(), mirror.backend.subset.clone(), mirror.backend.port.unwrap_or(service.port));
        let Some(dial) = self.waypoint.dial(&self.caller) else { return };
        let mut head = clone_head(head);
        let host =
            authority.split_once(':').map_or_else(|| format!("{authority}-shadow"), |(h, p)| format!("{h}-shadow:{p}"));
        if h2 {
            head.uri = format!("http://{host}{path}").parse().unwrap_or(head.uri);
        } else if let Ok(value) = HeaderValue::from_str(&host) {
            head.headers.insert(header::HOST, value);
        }
        let waypoint = self.waypoint.clone();
        tokio::spawn(async move {
            // The tables of now (a mirror may find its endpoints' names to resolve).
            let Lookup::Found(destination) = waypoint.tables().destination(&waypoint, &key).await else { return };
            let Some(i) = destination.pick(None, roll_u64(), &[]) else { return };
            let target = destination.endpoints[i].clone();
            let request = Request::from_parts(head, body);
            let limited = PoolLimits { breaker: &destination.health.breaker, limits: &destination.policy.limits };
            let dial = dial.dial();
            let attempt = Attempt::default();
            let send = waypoint.upstreams().send(&target, h2, request, &dial, &limited, &attempt);
            match tokio::time::timeout(MIRROR_TIMEOUT, send).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => debug!(%error, "mirror request failed"),
                Err(_) => debug!(timeout = ?MIRROR_TIMEOUT, "mirror request timed out"),
            }
        });
    }

    fn describe_upstream(workload: &Workload, addr: SocketAddr, log: &mut RequestLog, labels: &mut RequestLabels) {
        log.upstream = Some(addr);
        log.destination_identity.clone_from(&workload.identity);
        labels.destination_workload.clone_from(&workload.name);
        labels.destination_workload_namespace.clone_from(&workload.namespace);
        labels.destination_principal.clone_from(&workload.identity);
        workload.app().clone_into(&mut labels.destination_app);
        workload.revision().clone_into(&mut labels.destination_revision);
    }

    /// What Envoy adds: `x-forwarded-for` (the client's address appended),
    /// `x-forwarded-proto`, and the caller's verified identity in
    /// `x-forwarded-client-cert` (any value the client sent is replaced).
    fn forwarding_headers(&self, headers: &mut HeaderMap, upgrade: bool) {
        strip_hop_by_hop(headers, upgrade);
        let ip = self.caller.addr.ip().to_string();
        let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(existing) if !existing.is_empty() => format!("{existing}, {ip}"),
            _ => ip,
        };
        if let Ok(value) = HeaderValue::from_str(&xff) {
            headers.insert("x-forwarded-for", value);
        }
        if !headers.contains_key("x-forwarded-proto") {
            headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        }
        let by = self.waypoint.identity().unwrap_or_default();
        if let Ok(value) = HeaderValue::from_str(&format!("By={by};URI={}", self.caller.identity)) {
            headers.insert("x-forwarded-client-cert", value);
        }
    }
}

/// Ports declared HTTP/2 or gRPC are spoken to in HTTP/2 upstream; others in the
/// downstream's protocol.
fn wants_h2(service: &ServicePort) -> bool {
    let name = service.protocol.to_ascii_lowercase();
    matches!(name.split(['-', '_']).next(), Some("http2" | "grpc")) || name == "kubernetes.io/h2c"
}

/// Envoy's body for a request its circuit breaker refused.
const OVERFLOW_REPLY: &str = "upstream connect error or disconnect/reset before headers. reset reason: overflow\n";

/// Envoy's body for a request that ran out of its route's or its try's timeout.
const TIMEOUT_REPLY: &str = "upstream request timeout\n";

#[allow(clippy::needless_pass_by_value, reason = "a map_err function: it takes the error it is given")]
fn upstream_reply(error: UpstreamError) -> Reply {
    if error.per_try_timeout() {
        return Reply::new(StatusCode::GATEWAY_TIMEOUT, error.flag(), TIMEOUT_REPLY);
    }
    let reason = mesh_proxy::telemetry::error_chain(&error);
    let body = if error.overflow() {
        OVERFLOW_REPLY
    } else if error.connect_failure() {
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure\n"
    } else {
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination\n"
    };
    Reply::new(StatusCode::SERVICE_UNAVAILABLE, error.flag(), body).because(reason)
}

/// A stream with bytes already read from it in front.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// The bytes read to sniff the protocol go first, as one chunk.
impl<S: Side> Side for Prefixed<S> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        if !self.prefix.is_empty() {
            return Some(Poll::Ready(Ok(std::mem::take(&mut self.prefix))));
        }
        self.inner.poll_chunk(cx)
    }

    fn poll_send_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        self.inner.poll_send_chunk(cx, data)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
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
    use super::*;

    #[test]
    fn local_answers_to_grpc_are_trailers_only_with_the_mapped_status() {
        for (status, code, text, message) in [
            (StatusCode::SERVICE_UNAVAILABLE, "14", &b"no healthy upstream\n"[..], "no healthy upstream"),
            (StatusCode::FORBIDDEN, "7", b"RBAC: access denied", "RBAC: access denied"),
            (StatusCode::UNAUTHORIZED, "16", b"Jwt is missing", "Jwt is missing"),
            (StatusCode::GATEWAY_TIMEOUT, "14", b"upstream request timeout\n", "upstream request timeout"),
            (StatusCode::TOO_MANY_REQUESTS, "14", b"local_rate_limited", "local_rate_limited"),
            (StatusCode::BAD_REQUEST, "13", b"100% bad\tinput \xc3\xa9", "100%25 bad%09input %C3%A9"),
            (StatusCode::IM_A_TEAPOT, "2", b"", ""),
        ] {
            let response = grpc_reply(status, text);
            assert_eq!(response.status(), StatusCode::OK, "{status}");
            let headers = response.headers();
            assert_eq!(headers[header::CONTENT_TYPE], "application/grpc");
            assert_eq!(headers["grpc-status"], code, "{status}");
            assert_eq!(headers["grpc-message"], message, "{status}");
            assert!(http_body::Body::is_end_stream(response.body()), "a trailers-only answer has no body");
        }
    }

    /// A TCP relay sends the bytes read to sniff the protocol first, then the rest,
    /// and counts them all.
    #[tokio::test]
    async fn a_tcp_relay_sends_the_sniffed_prefix_first() {
        use tokio::io::AsyncWriteExt as _;
        let (mut caller, caller_side) = tokio::io::duplex(1024);
        let (upstream_side, mut upstream) = tokio::io::duplex(1024);
        caller.write_all(b" rest").await.unwrap();
        caller.shutdown().await.unwrap();
        let mut client =
            relay::Counted::new(Prefixed { prefix: Bytes::from_static(b"\x16\x03first"), inner: caller_side });
        let mut upstream_side = upstream_side;
        let relay = tokio::spawn(async move {
            let result = copy_bidirectional(&mut client, &mut upstream_side).await;
            (result.is_ok(), client.counts())
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"\x16\x03first rest");
        upstream.shutdown().await.unwrap();
        assert_eq!(relay.await.unwrap(), (true, (12, 0)));
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<&str> = headers.keys().map(http::HeaderName::as_str).collect();
        assert_eq!(names, vec!["x-kept", "te"]);
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(id, request_id());
    }
}
