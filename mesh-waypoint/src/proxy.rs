//! The HTTP proxy of one downstream connection, in the phases pingora names: request
//! filter (limits, forwarding headers) -> route -> upstream peer -> upstream request
//! -> response -> log. Bodies stream through; what a retry needs is buffered only
//! up to a bound.
use std::{
    convert::Infallible,
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

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use mesh_proxy::{
    tunnel::stream::H2Stream,
    workloads::{ServicePort, Workload},
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tracing::debug;

use crate::{
    inbound::{Caller, Protocol, Tables, Waypoint, protocol_of},
    requests::{RequestLabels, RequestLog},
    upstream::{Body, BoxError, Dial, Target, UpstreamError},
};

/// Request headers larger than this get 431.
const MAX_HEADERS: usize = 64 << 10;
/// A client has this long to send a request's headers (no slowloris).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the first bytes of a connection on a port of unknown protocol are
/// awaited to tell HTTP from other protocols.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(1);

/// One downstream connection's context.
struct Downstream {
    waypoint: Arc<Waypoint>,
    /// The service VIP and port the tunnel stream asked for.
    target: SocketAddr,
    caller: Caller,
}

/// Serves a tunnel stream to `service` as HTTP, or as TCP when a port of unknown
/// protocol does not start with HTTP.
pub async fn serve(
    waypoint: Arc<Waypoint>,
    tables: Arc<Tables>,
    service: Arc<ServicePort>,
    caller: Caller,
    target: SocketAddr,
    stream: H2Stream,
) {
    let mut stream = Prefixed { prefix: Bytes::new(), inner: stream };
    if protocol_of(&service) == Protocol::Unknown {
        let mut first = vec![0u8; 24];
        let n = match tokio::time::timeout(SNIFF_TIMEOUT, stream.inner.read(&mut first)).await {
            Ok(Ok(n)) => n,
            // Server-first protocols send nothing: relay them as TCP.
            Ok(Err(_)) => return,
            Err(_) => 0,
        };
        first.truncate(n);
        let http = looks_like_http(&first);
        stream.prefix = first.into();
        if !http {
            return relay(waypoint, tables, service, caller, stream).await;
        }
    }
    let downstream = Arc::new(Downstream { waypoint, target, caller });
    let service = service_fn(move |request| {
        let downstream = downstream.clone();
        async move { Ok::<_, Infallible>(downstream.handle(request).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1000)
        .max_header_list_size(MAX_HEADERS as u32)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Duration::from_secs(30));
    if let Err(error) = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await {
        debug!(%error, "downstream HTTP connection ended with an error");
    }
}

/// Whether the first bytes of a connection are an HTTP/1 request line or the
/// HTTP/2 connection preface.
fn looks_like_http(first: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] =
        [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"CONNECT "];
    first.starts_with(b"PRI * HTTP/2.0") || METHODS.iter().any(|m| first.starts_with(m))
}

/// Relays a tunnel stream to one endpoint as TCP.
pub async fn relay_tcp(
    waypoint: Arc<Waypoint>,
    tables: Arc<Tables>,
    service: Arc<ServicePort>,
    caller: Caller,
    stream: H2Stream,
) {
    relay(waypoint, tables, service, caller, Prefixed { prefix: Bytes::new(), inner: stream }).await;
}

async fn relay(
    waypoint: Arc<Waypoint>,
    tables: Arc<Tables>,
    service: Arc<ServicePort>,
    caller: Caller,
    mut stream: Prefixed<H2Stream>,
) {
    let _ = tables;
    let Some((workload, addr)) = service.pick(caller.addr.is_ipv6()) else {
        debug!(service = %service.hostname, "no endpoint for a TCP connection");
        return;
    };
    let Some(dial) = waypoint.dial(&caller) else { return };
    let target = Target { workload, addr };
    match waypoint.upstreams.connect(&target, &dial.dial()).await {
        Ok(mut upstream) => {
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
        }
        Err(error) => debug!(%addr, %error, "TCP upstream connect failed"),
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

/// A locally generated answer.
struct Reply {
    status: StatusCode,
    flags: &'static str,
    body: &'static str,
    reason: Option<String>,
}

impl Reply {
    fn new(status: StatusCode, flags: &'static str, body: &'static str) -> Self {
        Self { status, flags, body, reason: None }
    }

    fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed()
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

/// Counts a body's bytes and calls `done` once at its end (or when dropped early),
/// with the byte count and a `grpc-status` seen in its trailers.
struct Counted {
    inner: Body,
    bytes: Arc<AtomicU64>,
    grpc_status: Option<String>,
    done: Option<Box<dyn FnOnce(u64, Option<String>) + Send + Sync>>,
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
            request_protocol: if grpc { "grpc" } else { "http" },
            ..RequestLabels::default()
        };
        if let Some(service) = &service {
            labels.destination_service = service.hostname.clone();
            labels.destination_service_name = service.name.clone();
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
        let outcome = match &service {
            Some(service) => self.forward(service, request, &request_bytes, &mut log, &mut labels).await,
            None => Err(Reply::new(StatusCode::SERVICE_UNAVAILABLE, "NR", "no route\n")
                .because("the service is gone from the view")),
        };
        let response = match outcome {
            Ok(response) => response,
            Err(reply) => {
                log.reason = reply.reason;
                log.flags = reply.flags;
                Response::builder()
                    .status(reply.status)
                    .header(header::CONTENT_TYPE, "text/plain")
                    .body(full(reply.body))
                    .expect("static parts")
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
            labels.grpc_response_status = status.to_owned();
        }
        let waypoint = self.waypoint.clone();
        let response_bytes = Arc::new(AtomicU64::new(header_bytes(&parts.headers)));
        let done = move |bytes: u64, grpc_status: Option<String>| {
            if let Some(status) = grpc_status {
                labels.grpc_response_status = status;
            }
            let duration = start.elapsed();
            let sent = request_bytes.load(Ordering::Relaxed);
            waypoint.requests.record(&labels, duration, sent, bytes);
            log.emit(duration, sent, bytes);
        };
        let body = Counted { inner: body, bytes: response_bytes, grpc_status: None, done: Some(Box::new(done)) };
        Response::from_parts(parts, body.boxed())
    }

    async fn forward(
        &self,
        service: &Arc<ServicePort>,
        mut request: Request<Incoming>,
        request_bytes: &Arc<AtomicU64>,
        log: &mut RequestLog,
        labels: &mut RequestLabels,
    ) -> Result<Response<Body>, Reply> {
        let dial = self
            .waypoint
            .dial(&self.caller)
            .ok_or_else(|| Reply::new(StatusCode::SERVICE_UNAVAILABLE, "UF", "no certificate yet\n"))?;
        let Some((workload, addr)) = service.pick(self.caller.addr.is_ipv6()) else {
            return Err(Reply::new(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream\n"));
        };
        self.describe_upstream(&workload, addr, log, labels);
        let target = Target { workload, addr };
        let upgrade = request.version() == Version::HTTP_11
            && request.headers().get(header::UPGRADE).is_some()
            && request
                .headers()
                .get(header::CONNECTION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"));
        let h2 = !upgrade && (request.version() == Version::HTTP_2 || wants_h2(service));
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        self.forwarding_headers(&mut parts.headers, upgrade);
        let authority = log.authority.clone();
        if h2 {
            parts.version = Version::HTTP_2;
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            parts.uri = format!("http://{authority}{path}").parse().unwrap_or(parts.uri);
            parts.headers.remove(header::HOST);
        } else {
            parts.version = Version::HTTP_11;
            if !parts.headers.contains_key(header::HOST)
                && let Ok(host) = HeaderValue::from_str(&authority)
            {
                parts.headers.insert(header::HOST, host);
            }
            if let Some(path) = parts.uri.path_and_query().cloned() {
                parts.uri = http::Uri::from(path);
            }
        }
        let body = Counted {
            inner: body.map_err(BoxError::from).boxed(),
            bytes: request_bytes.clone(),
            grpc_status: None,
            done: None,
        };
        let upstream_request = Request::from_parts(parts, body.boxed());
        log.attempts = 1;
        let sent = if let Some(downstream) = downstream_upgrade {
            let mut sender =
                self.waypoint.upstreams.open_h1(&target, &dial.dial(), true).await.map_err(upstream_reply)?;
            let mut response =
                sender.send_request(upstream_request).await.map_err(|e| upstream_reply(UpstreamError::Reset(e)))?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                let upstream = hyper::upgrade::on(&mut response);
                tokio::spawn(async move {
                    if let (Ok(a), Ok(b)) = (downstream.await, upstream.await) {
                        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
                    }
                });
            }
            response
        } else {
            self.waypoint.upstreams.send(&target, h2, upstream_request, &dial.dial()).await.map_err(upstream_reply)?
        };
        let (mut parts, body) = sent.into_parts();
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(&mut parts.headers, false);
        }
        Ok(Response::from_parts(parts, body.map_err(BoxError::from).boxed()))
    }

    fn describe_upstream(
        &self,
        workload: &Workload,
        addr: SocketAddr,
        log: &mut RequestLog,
        labels: &mut RequestLabels,
    ) {
        log.upstream = Some(addr);
        log.destination_identity.clone_from(&workload.identity);
        labels.destination_workload.clone_from(&workload.name);
        labels.destination_workload_namespace.clone_from(&workload.namespace);
        labels.destination_principal.clone_from(&workload.identity);
        labels.destination_app = workload.app().to_owned();
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

fn upstream_reply(error: UpstreamError) -> Reply {
    let reason = mesh_proxy_error_chain(&error);
    let body = if error.connect_failure() {
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure\n"
    } else {
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination\n"
    };
    Reply::new(StatusCode::SERVICE_UNAVAILABLE, error.flag(), body).because(reason)
}

fn mesh_proxy_error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
    fn sniffing_tells_http_from_other_protocols() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!looks_like_http(b"\x16\x03\x01\x02\x00"));
        assert!(!looks_like_http(b"GETX"));
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
