//! OpenTelemetry trace export (OTLP) for the waypoint's request spans and the agent's
//! connection spans: the span record both share, a hand-written protobuf encoder of
//! `ExportTraceServiceRequest` (no code generator, no protobuf runtime: the message
//! subset is small and its field numbers are fixed by opentelemetry-proto), and an
//! exporter that never slows the request path: spans enter a bounded queue with
//! `try_send` (a full queue drops the span and counts it), and a background task
//! batches them and sends OTLP/HTTP (protobuf) or OTLP/gRPC (h2 cleartext).
//!
//! It lives here, in the shared data path, and not in the waypoint, because the node
//! agent exports connection spans through the same exporter.
use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::telemetry::error_chain;
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{Request, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::TcpStream,
    sync::mpsc,
    time::{Instant, timeout},
};

/// A 16-byte trace id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// The span kind; the values are OTLP's `Span.SpanKind` numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// An attribute value (the `AnyValue` subset the mesh uses).
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// A finished span, ready for export.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    /// W3C `tracestate`, carried as the span's `trace_state`.
    pub tracestate: Option<String>,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// In insertion order; keys are unique.
    pub attributes: Vec<(String, AttrValue)>,
    /// OTLP status `STATUS_CODE_ERROR` when set, else unset.
    pub error: bool,
}

// Protobuf wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn put_key(buf: &mut BytesMut, field: u32, wire: u32) {
    put_varint(buf, u64::from(field << 3 | wire));
}

fn put_bytes(buf: &mut BytesMut, field: u32, bytes: &[u8]) {
    put_key(buf, field, LEN);
    put_varint(buf, bytes.len() as u64);
    buf.put_slice(bytes);
}

/// A nested message: encoded into a scratch buffer, then written length-prefixed.
fn put_message(buf: &mut BytesMut, field: u32, encode: impl FnOnce(&mut BytesMut)) {
    let mut inner = BytesMut::new();
    encode(&mut inner);
    put_bytes(buf, field, &inner);
}

/// `KeyValue { key = 1; AnyValue value = 2 }`, `AnyValue { string_value = 1;
/// bool_value = 2; int_value = 3 }`.
fn put_attribute(buf: &mut BytesMut, field: u32, key: &str, value: &AttrValue) {
    put_message(buf, field, |kv| {
        put_bytes(kv, 1, key.as_bytes());
        put_message(kv, 2, |any| match value {
            AttrValue::Str(s) => put_bytes(any, 1, s.as_bytes()),
            AttrValue::Bool(b) => {
                put_key(any, 2, VARINT);
                put_varint(any, u64::from(*b));
            }
            AttrValue::Int(i) => {
                put_key(any, 3, VARINT);
                put_varint(any, *i as u64);
            }
        });
    });
}

/// Who emits the spans: the `Resource` attributes (`service.name` and friends) and
/// the instrumentation scope.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Origin {
    pub resource: Vec<(String, AttrValue)>,
    pub scope_name: String,
    pub scope_version: String,
}

impl Origin {
    /// The origin of a proxy's spans as Istio names it: `service.name` is
    /// `<canonical service>.<namespace>` (what Jaeger shows as the service).
    pub fn proxy(canonical_service: &str, namespace: &str, scope_name: &str, scope_version: &str) -> Self {
        Self {
            resource: vec![
                ("service.name".to_string(), AttrValue::Str(format!("{canonical_service}.{namespace}"))),
                ("k8s.namespace.name".to_string(), AttrValue::Str(namespace.to_string())),
            ],
            scope_name: scope_name.to_string(),
            scope_version: scope_version.to_string(),
        }
    }
}

/// Encodes `opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest` with one
/// `ResourceSpans` holding one `ScopeSpans`.
pub fn encode_export_request(origin: &Origin, spans: &[Span]) -> Bytes {
    let mut out = BytesMut::new();
    // ExportTraceServiceRequest.resource_spans = 1
    put_message(&mut out, 1, |rs| {
        // ResourceSpans.resource = 1; Resource.attributes = 1
        put_message(rs, 1, |res| {
            for (k, v) in &origin.resource {
                put_attribute(res, 1, k, v);
            }
        });
        // ResourceSpans.scope_spans = 2
        put_message(rs, 2, |ss| {
            // ScopeSpans.scope = 1: InstrumentationScope { name = 1; version = 2 }
            put_message(ss, 1, |scope| {
                put_bytes(scope, 1, origin.scope_name.as_bytes());
                put_bytes(scope, 2, origin.scope_version.as_bytes());
            });
            // ScopeSpans.spans = 2
            for span in spans {
                put_message(ss, 2, |s| encode_span(s, span));
            }
        });
    });
    out.freeze()
}

fn encode_span(buf: &mut BytesMut, span: &Span) {
    put_bytes(buf, 1, &span.trace_id.0); // trace_id
    put_bytes(buf, 2, &span.span_id.0); // span_id
    if let Some(ts) = &span.tracestate {
        put_bytes(buf, 3, ts.as_bytes()); // trace_state
    }
    if let Some(p) = span.parent_id {
        put_bytes(buf, 4, &p.0); // parent_span_id
    }
    put_bytes(buf, 5, span.name.as_bytes()); // name
    put_key(buf, 6, VARINT); // kind
    put_varint(buf, span.kind as u64);
    put_key(buf, 7, FIXED64); // start_time_unix_nano
    buf.put_u64_le(span.start_unix_nanos);
    put_key(buf, 8, FIXED64); // end_time_unix_nano
    buf.put_u64_le(span.end_unix_nanos);
    for (k, v) in &span.attributes {
        put_attribute(buf, 9, k, v); // attributes
    }
    if span.error {
        // status = 15: Status { code = 3 } with STATUS_CODE_ERROR = 2
        put_message(buf, 15, |st| {
            put_key(st, 3, VARINT);
            put_varint(st, 2);
        });
    }
}

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/HTTP with binary protobuf: `POST {path}` (default `/v1/traces`).
    HttpProtobuf,
    /// OTLP/gRPC over HTTP/2 cleartext.
    Grpc,
}

/// The gRPC method of trace export.
pub const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// The default OTLP/HTTP path of traces.
pub const HTTP_PATH: &str = "/v1/traces";

/// Where and how to export; the lead fills it from `extensionProviders.opentelemetry`.
#[derive(Clone, Debug)]
pub struct ExporterConfig {
    /// The collector's host name or address (`opentelemetry-collector.observability.svc.cluster.local`).
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
    /// The HTTP path (OTLP/HTTP only; gRPC always uses [`GRPC_PATH`]).
    pub path: String,
    /// The time one batch may take, connect included.
    pub timeout: Duration,
    /// Extra request headers (the provider's `http.headers`, or gRPC
    /// `initialMetadata`), such as an authorization token.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Spans waiting for export at most; more are dropped.
    pub queue: usize,
    /// Spans per request at most.
    pub batch: usize,
    /// A partial batch is sent after this long.
    pub interval: Duration,
    pub origin: Origin,
}

impl ExporterConfig {
    /// The defaults of OpenTelemetry's batch span processor (queue 2048, batch 512,
    /// every second), with a 10 s export timeout.
    pub fn new(host: impl Into<String>, port: u16, protocol: Protocol, origin: Origin) -> Self {
        Self {
            host: host.into(),
            port,
            protocol,
            path: HTTP_PATH.to_string(),
            timeout: Duration::from_secs(10),
            headers: Vec::new(),
            queue: 2048,
            batch: 512,
            interval: Duration::from_secs(1),
            origin,
        }
    }
}

/// The exporter's counters, in spans; the lead registers them as metrics.
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Spans a collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped at the full (or closed) queue.
    pub dropped: AtomicU64,
    /// Spans in batches whose export failed.
    pub failed: AtomicU64,
}

/// Why one batch was not exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("connecting to the collector {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("building the export request (is the configured path a valid URI path?)")]
    Request {
        #[source]
        source: http::Error,
    },
    #[error("HTTP exchange with the collector")]
    Http {
        #[source]
        source: hyper::Error,
    },
    #[error("the collector answered HTTP status {status}")]
    Status { status: u16 },
    #[error("the collector answered grpc-status {code}: {message}")]
    Grpc { code: String, message: String },
    #[error("export did not finish within {after:?}")]
    Timeout { after: Duration },
}

/// The request path's handle: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct SpanSender {
    tx: mpsc::Sender<Span>,
    counters: Arc<ExportCounters>,
}

impl SpanSender {
    /// Queues a span; false (and counted as dropped) when the queue is full or the
    /// exporter has stopped.
    pub fn send(&self, span: Span) -> bool {
        if self.tx.try_send(span).is_ok() {
            true
        } else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    pub fn counters(&self) -> &Arc<ExportCounters> {
        &self.counters
    }
}

/// The background half: owns the queue's receiver and the collector connection.
#[derive(Debug)]
pub struct Exporter {
    rx: mpsc::Receiver<Span>,
    config: ExporterConfig,
    counters: Arc<ExportCounters>,
}

/// Creates the queue: the sender for the request path and the exporter to spawn
/// (`tokio::spawn(exporter.run())`).
pub fn exporter(config: ExporterConfig) -> (SpanSender, Exporter) {
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let counters = Arc::new(ExportCounters::default());
    (SpanSender { tx, counters: counters.clone() }, Exporter { rx, config, counters })
}

enum Connection {
    Http1(conn::http1::SendRequest<Full<Bytes>>),
    Http2(conn::http2::SendRequest<Full<Bytes>>),
}

/// How often a failure is logged at most; the rest are counted and summarized.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Exporter {
    /// Batches and exports until every [`SpanSender`] is dropped, then flushes what
    /// is left and returns.
    pub async fn run(mut self) {
        let batch_max = self.config.batch.max(1);
        let mut connection: Option<Connection> = None;
        let mut last_log: Option<Instant> = None;
        let mut suppressed = 0u64;
        let mut open = true;
        while open {
            let mut batch = Vec::with_capacity(batch_max);
            match self.rx.recv().await {
                Some(span) => batch.push(span),
                None => break,
            }
            let deadline = Instant::now() + self.config.interval;
            while batch.len() < batch_max {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(span)) => batch.push(span),
                    Ok(None) => {
                        open = false;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let n = batch.len() as u64;
            let body = encode_export_request(&self.config.origin, &batch);
            let result = match timeout(self.config.timeout, self.send(&mut connection, body)).await {
                Ok(r) => r,
                Err(_) => Err(ExportError::Timeout { after: self.config.timeout }),
            };
            match result {
                Ok(()) => {
                    self.counters.exported.fetch_add(n, Ordering::Relaxed);
                }
                Err(error) => {
                    connection = None;
                    self.counters.failed.fetch_add(n, Ordering::Relaxed);
                    let now = Instant::now();
                    if last_log.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
                        tracing::warn!(
                            error = %error_chain(&error),
                            spans = n,
                            failures_not_logged = suppressed,
                            "trace export failed"
                        );
                        last_log = Some(now);
                        suppressed = 0;
                    } else {
                        suppressed += 1;
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Connection, ExportError> {
        let (host, port) = (self.config.host.clone(), self.config.port);
        let stream = TcpStream::connect((host.as_str(), port)).await.map_err(|source| ExportError::Connect {
            host: host.clone(),
            port,
            source,
        })?;
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let http = |source| ExportError::Http { source };
        Ok(match self.config.protocol {
            Protocol::HttpProtobuf => {
                let (sender, conn) = conn::http1::handshake(io).await.map_err(http)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Connection::Http1(sender)
            }
            Protocol::Grpc => {
                let (sender, conn) = conn::http2::handshake(TokioExecutor::new(), io).await.map_err(http)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Connection::Http2(sender)
            }
        })
    }

    async fn send(&self, connection: &mut Option<Connection>, body: Bytes) -> Result<(), ExportError> {
        let alive = match connection {
            Some(Connection::Http1(s)) => !s.is_closed() && s.ready().await.is_ok(),
            Some(Connection::Http2(s)) => !s.is_closed() && s.ready().await.is_ok(),
            None => false,
        };
        let connection = match connection.take() {
            Some(c) if alive => connection.insert(c),
            _ => connection.insert(self.connect().await?),
        };
        let authority = if self.config.host.contains(':') {
            format!("[{}]:{}", self.config.host, self.config.port)
        } else {
            format!("{}:{}", self.config.host, self.config.port)
        };
        let http = |source| ExportError::Http { source };
        match connection {
            Connection::Http1(sender) => {
                let mut request = Request::post(self.config.path.as_str())
                    .header(http::header::HOST, authority)
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(body))
                    .map_err(|source| ExportError::Request { source })?;
                request.headers_mut().extend(self.config.headers.iter().cloned());
                let response = sender.send_request(request).await.map_err(http)?;
                let status = response.status();
                // Read the body to keep the connection reusable.
                response.into_body().collect().await.map_err(http)?;
                if !status.is_success() {
                    return Err(ExportError::Status { status: status.as_u16() });
                }
                Ok(())
            }
            Connection::Http2(sender) => {
                let mut framed = BytesMut::with_capacity(body.len() + 5);
                framed.put_u8(0); // not compressed
                framed.put_u32(body.len() as u32);
                framed.put_slice(&body);
                let uri = format!("http://{authority}{GRPC_PATH}");
                let mut request = Request::post(uri)
                    .header(http::header::CONTENT_TYPE, "application/grpc")
                    .header(http::header::TE, "trailers")
                    .body(Full::new(framed.freeze()))
                    .map_err(|source| ExportError::Request { source })?;
                request.headers_mut().extend(self.config.headers.iter().cloned());
                let response = sender.send_request(request).await.map_err(http)?;
                let status = response.status();
                let (head, body) = response.into_parts();
                let collected = body.collect().await.map_err(http)?;
                if !status.is_success() {
                    return Err(ExportError::Status { status: status.as_u16() });
                }
                // A trailers-only answer carries grpc-status in the headers.
                let trailers = collected.trailers().cloned().unwrap_or_default();
                let code = trailers.get("grpc-status").or_else(|| head.headers.get("grpc-status"));
                match code.map(|v| v.to_str().unwrap_or("?")) {
                    Some("0") => Ok(()),
                    code => {
                        let message = trailers
                            .get("grpc-message")
                            .or_else(|| head.headers.get("grpc-message"))
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        Err(ExportError::Grpc { code: code.unwrap_or("missing").to_string(), message })
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
