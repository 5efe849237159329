//! Trace context propagation and the waypoint's span per request, as pure functions:
//! W3C Trace Context (`traceparent`, `tracestate`) and Zipkin's B3 (the single `b3`
//! header and the `x-b3-*` multi-header form) in, the upstream headers and a [`Span`]
//! record out. Randomness (ids, the sampling roll) and times are inputs, so every
//! decision here is reproducible in a test.
//!
//! What we send upstream follows Envoy's OpenTelemetry tracer, which reads and writes
//! W3C only: we always send a version-00 `traceparent` carrying our span id and pass
//! `tracestate` through unchanged. Envoy's OpenTelemetry tracer leaves B3 headers
//! alone (they reach the app stale); we go one step further and, when the request
//! came with B3, rewrite B3 in the same form (single or multi) with our span id, so
//! that B3-only applications keep one trace through the waypoint.
use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};

pub use mesh_proxy::otlp::{AttrValue, Span, SpanId, SpanKind, TraceId};

/// Why a trace header was not used. The request still flows; the waypoint starts a
/// new trace (as Envoy does with an invalid `traceparent`) and may log this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("header {header}: value {value:?} is not valid: {reason}")]
    Invalid { header: &'static str, value: String, reason: &'static str },
}

fn invalid(header: &'static str, value: &str, reason: &'static str) -> TraceError {
    TraceError::Invalid { header, value: value.chars().take(128).collect(), reason }
}

/// The header form a trace context arrived in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// The sampling decision carried by a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// No decision: the receiver decides.
    Defer,
    Accept,
    Deny,
    /// B3 debug (`d`, or `x-b3-flags: 1`): accept, and ask everyone downstream to.
    Debug,
}

impl Sampling {
    /// The decision if one was made.
    pub fn decided(self) -> Option<bool> {
        match self {
            Sampling::Defer => None,
            Sampling::Accept | Sampling::Debug => Some(true),
            Sampling::Deny => Some(false),
        }
    }
}

/// A parsed `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Traceparent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    /// The `trace-flags` byte; bit 0 is `sampled`.
    pub flags: u8,
}

impl Traceparent {
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The version-00 text form.
    pub fn to_header(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags)
    }
}

fn hex_lower(s: &str, out: &mut [u8]) -> bool {
    let b = s.as_bytes();
    if b.len() != out.len() * 2 {
        return false;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (i, o) in out.iter_mut().enumerate() {
        match (nib(b[2 * i]), nib(b[2 * i + 1])) {
            (Some(h), Some(l)) => *o = h << 4 | l,
            _ => return false,
        }
    }
    true
}

/// Parses a `traceparent` per W3C Trace Context level 1: version `00` must be exactly
/// 55 characters; a higher version (not `ff`) is read by its version-00 prefix and
/// may carry more fields after a `-`. Hex must be lowercase; all-zero ids are invalid.
pub fn parse_traceparent(value: &str) -> Result<Traceparent, TraceError> {
    const H: &str = "traceparent";
    let v = value.trim_matches(|c| c == ' ' || c == '\t');
    if !v.is_ascii() {
        return Err(invalid(H, value, "not ASCII"));
    }
    let mut version = [0u8; 1];
    if v.len() < 2 || !hex_lower(&v[..2], &mut version) {
        return Err(invalid(H, value, "version is not two lowercase hex digits"));
    }
    match version[0] {
        0xff => return Err(invalid(H, value, "version ff is forbidden")),
        0 if v.len() != 55 => return Err(invalid(H, value, "version 00 must be 55 characters")),
        0 => {}
        _ if v.len() < 55 => return Err(invalid(H, value, "shorter than 55 characters")),
        _ if v.len() > 55 && v.as_bytes()[55] != b'-' => {
            return Err(invalid(H, value, "a future version's extra fields must follow a '-'"));
        }
        _ => {}
    }
    let b = v.as_bytes();
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return Err(invalid(H, value, "fields are not separated by '-'"));
    }
    let (mut trace, mut span, mut flags) = ([0u8; 16], [0u8; 8], [0u8; 1]);
    if !hex_lower(&v[3..35], &mut trace) {
        return Err(invalid(H, value, "trace-id is not 32 lowercase hex digits"));
    }
    if !hex_lower(&v[36..52], &mut span) {
        return Err(invalid(H, value, "parent-id is not 16 lowercase hex digits"));
    }
    if !hex_lower(&v[53..55], &mut flags) {
        return Err(invalid(H, value, "trace-flags is not two lowercase hex digits"));
    }
    if trace == [0; 16] {
        return Err(invalid(H, value, "trace-id is all zeros"));
    }
    if span == [0; 8] {
        return Err(invalid(H, value, "parent-id is all zeros"));
    }
    // A future version's flags are read for the bits this version knows only.
    let flags = if version[0] == 0 { flags[0] } else { flags[0] & 1 };
    Ok(Traceparent { trace_id: TraceId(trace), parent_id: SpanId(span), flags })
}

/// A B3 context (either form).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct B3 {
    pub trace_id: TraceId,
    /// Whether the trace id came as 64 bits (16 hex digits); we answer in kind.
    pub trace_id_64: bool,
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub sampling: Sampling,
}

fn b3_trace_id(header: &'static str, whole: &str, s: &str) -> Result<(TraceId, bool), TraceError> {
    let lower = s.to_ascii_lowercase();
    let mut id = [0u8; 16];
    let short = match lower.len() {
        32 => false,
        16 => true,
        _ => return Err(invalid(header, whole, "trace id is not 16 or 32 hex digits")),
    };
    let ok = if short { hex_lower(&lower, &mut id[8..]) } else { hex_lower(&lower, &mut id) };
    if !ok {
        return Err(invalid(header, whole, "trace id is not hex"));
    }
    if id == [0; 16] {
        return Err(invalid(header, whole, "trace id is all zeros"));
    }
    Ok((TraceId(id), short))
}

fn b3_span_id(header: &'static str, whole: &str, s: &str) -> Result<SpanId, TraceError> {
    let mut id = [0u8; 8];
    if !hex_lower(&s.to_ascii_lowercase(), &mut id) {
        return Err(invalid(header, whole, "span id is not 16 hex digits"));
    }
    if id == [0; 8] {
        return Err(invalid(header, whole, "span id is all zeros"));
    }
    Ok(SpanId(id))
}

/// Parses the single `b3` header: `{trace}-{span}[-{sampled}[-{parent}]]`, or a bare
/// sampling state (`0`, `1`, `d`), which yields `Ok(None)` with that decision only.
pub fn parse_b3_single(value: &str) -> Result<(Option<B3>, Sampling), TraceError> {
    const H: &str = "b3";
    let v = value.trim();
    let sampling_of = |s: &str| match s {
        "1" => Ok(Sampling::Accept),
        "0" => Ok(Sampling::Deny),
        "d" => Ok(Sampling::Debug),
        _ => Err(invalid(H, value, "sampling state is not 0, 1 or d")),
    };
    let parts: Vec<&str> = v.split('-').collect();
    if parts.len() == 1 {
        return Ok((None, sampling_of(parts[0])?));
    }
    if parts.len() > 4 {
        return Err(invalid(H, value, "more than four fields"));
    }
    let (trace_id, trace_id_64) = b3_trace_id(H, value, parts[0])?;
    let span_id = b3_span_id(H, value, parts[1])?;
    let sampling = match parts.get(2) {
        Some(s) => sampling_of(s)?,
        None => Sampling::Defer,
    };
    let parent_id = parts.get(3).map(|p| b3_span_id(H, value, p)).transpose()?;
    let b3 = B3 { trace_id, trace_id_64, span_id, parent_id, sampling };
    Ok((Some(b3), sampling))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, TraceError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| invalid(name, "<non-ASCII>", "not visible ASCII")),
    }
}

/// Parses the multi-header B3 form. `Ok(None)` with a decision when only
/// `x-b3-sampled`/`x-b3-flags` are present (a sampling-only request).
pub fn parse_b3_multi(headers: &HeaderMap) -> Result<(Option<B3>, Sampling), TraceError> {
    let flags = header_str(headers, "x-b3-flags")?;
    let sampled = header_str(headers, "x-b3-sampled")?;
    let sampling = if flags.map(str::trim) == Some("1") {
        Sampling::Debug
    } else {
        match sampled.map(str::trim) {
            None => Sampling::Defer,
            Some("1" | "true") => Sampling::Accept,
            Some("0" | "false") => Sampling::Deny,
            Some(other) => return Err(invalid("x-b3-sampled", other, "is not 0 or 1")),
        }
    };
    let trace = header_str(headers, "x-b3-traceid")?;
    let span = header_str(headers, "x-b3-spanid")?;
    let (trace, span) = match (trace, span) {
        (None, None) => return Ok((None, sampling)),
        (Some(t), Some(s)) => (t.trim(), s.trim()),
        (Some(t), None) => return Err(invalid("x-b3-spanid", t, "missing while x-b3-traceid is set")),
        (None, Some(s)) => return Err(invalid("x-b3-traceid", s, "missing while x-b3-spanid is set")),
    };
    let (trace_id, trace_id_64) = b3_trace_id("x-b3-traceid", trace, trace)?;
    let span_id = b3_span_id("x-b3-spanid", span, span)?;
    let parent_id =
        header_str(headers, "x-b3-parentspanid")?.map(|p| b3_span_id("x-b3-parentspanid", p, p.trim())).transpose()?;
    Ok((Some(B3 { trace_id, trace_id_64, span_id, parent_id, sampling }), sampling))
}

/// The incoming trace context of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: TraceId,
    /// The caller's span: our span's parent.
    pub parent_id: SpanId,
    pub sampling: Sampling,
    /// The context's form (W3C wins when both are present, as with Envoy's
    /// OpenTelemetry tracer).
    pub format: Format,
    /// Whether the request also carried B3 (we rewrite it upstream, see the module doc).
    pub b3: Option<Format>,
    pub trace_id_64: bool,
    /// `tracestate`, passed through unchanged (several headers joined with `,`).
    pub tracestate: Option<String>,
}

/// What [`extract`] found: the context if any header was usable, a sampling-only
/// decision (B3 `b3: 0` or `x-b3-sampled` without ids), and the errors of the headers
/// that were present but unusable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    pub context: Option<Incoming>,
    pub sampling_only: Option<Sampling>,
    pub errors: Vec<TraceError>,
}

/// Reads the trace context of a request: W3C first, then B3 single, then B3 multi.
pub fn extract(headers: &HeaderMap) -> Extracted {
    let mut out = Extracted::default();
    let tracestate = {
        let parts: Vec<&str> =
            headers.get_all("tracestate").iter().filter_map(|v| v.to_str().ok()).map(str::trim).collect();
        (!parts.is_empty()).then(|| parts.join(","))
    };
    let w3c = match header_str(headers, "traceparent") {
        Ok(Some(v)) => parse_traceparent(v).map_err(|e| out.errors.push(e)).ok(),
        Ok(None) => None,
        Err(e) => {
            out.errors.push(e);
            None
        }
    };
    let single = match header_str(headers, "b3") {
        Ok(Some(v)) => parse_b3_single(v).map_err(|e| out.errors.push(e)).ok(),
        Ok(None) => None,
        Err(e) => {
            out.errors.push(e);
            None
        }
    };
    let multi = parse_b3_multi(headers).map_err(|e| out.errors.push(e)).ok();
    let (b3, b3_format) = match (single, multi) {
        (Some((Some(b), _)), _) => (Some(b), Some(Format::B3Single)),
        (_, Some((Some(b), _))) => (Some(b), Some(Format::B3Multi)),
        (Some((None, s)), _) => {
            out.sampling_only = Some(s);
            (None, Some(Format::B3Single))
        }
        (None, Some((None, s))) if s != Sampling::Defer => {
            out.sampling_only = Some(s);
            (None, Some(Format::B3Multi))
        }
        _ => (None, None),
    };
    out.context = if let Some(tp) = w3c {
        let sampling = if tp.sampled() { Sampling::Accept } else { Sampling::Deny };
        Some(Incoming {
            trace_id: tp.trace_id,
            parent_id: tp.parent_id,
            sampling,
            format: Format::W3c,
            b3: b3_format,
            trace_id_64: false,
            tracestate,
        })
    } else {
        b3.map(|b| Incoming {
            trace_id: b.trace_id,
            parent_id: b.span_id,
            sampling: b.sampling,
            format: b3_format.unwrap_or(Format::B3Single),
            b3: b3_format,
            trace_id_64: b.trace_id_64,
            tracestate,
        })
    };
    out
}

/// The random inputs of one request's tracing decision.
#[derive(Clone, Copy, Debug)]
pub struct Randomness {
    /// Used only when the request starts a new trace (all-zero is replaced by 1).
    pub trace_id: [u8; 16],
    /// Our span's id (all-zero is replaced by 1).
    pub span_id: [u8; 8],
    /// The sampling roll, uniform over `u32`.
    pub sample: u32,
}

/// The tracing state of one request from the moment its headers are read.
#[derive(Clone, Debug, PartialEq)]
pub struct Started {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub sampled: bool,
    pub tracestate: Option<String>,
    /// The headers to set on the upstream request (replacing any of the same name).
    pub upstream_headers: Vec<(HeaderName, HeaderValue)>,
    /// The names to remove from the upstream request before setting the above (the
    /// B3 form that we do not re-emit, so no stale ids reach the app).
    pub remove: Vec<HeaderName>,
    pub errors: Vec<TraceError>,
}

/// True when a roll of `sample` (uniform `u32`) falls in `percent` (0..=100; NaN and
/// negatives are 0). Resolution is 1/2^32.
pub fn sample(percent: f64, sample: u32) -> bool {
    if percent.is_nan() || percent <= 0.0 {
        return false;
    }
    if percent >= 100.0 {
        return true;
    }
    f64::from(sample) < percent / 100.0 * 4_294_967_296.0
}

fn nonzero<const N: usize>(mut b: [u8; N]) -> [u8; N] {
    if b == [0; N] {
        b[N - 1] = 1;
    }
    b
}

/// Decides tracing for a request: continues the incoming context (respecting its
/// sampled flag; debug forces sampling) or starts a trace, sampled at
/// `sampling_percent` (the Telemetry API's `randomSamplingPercentage`) with the roll in
/// `random`, and computes the headers for upstream.
pub fn start(headers: &HeaderMap, sampling_percent: f64, random: Randomness) -> Started {
    let extracted = extract(headers);
    let span_id = SpanId(nonzero(random.span_id));
    let decided =
        extracted.context.as_ref().map(|c| c.sampling).or(extracted.sampling_only).and_then(Sampling::decided);
    let sampled = decided.unwrap_or_else(|| sample(sampling_percent, random.sample));
    let (trace_id, parent_id, tracestate, b3_form, trace_id_64, debug) = match &extracted.context {
        Some(c) => {
            (c.trace_id, Some(c.parent_id), c.tracestate.clone(), c.b3, c.trace_id_64, c.sampling == Sampling::Debug)
        }
        None => (
            TraceId(nonzero(random.trace_id)),
            None,
            None,
            None,
            false,
            extracted.sampling_only == Some(Sampling::Debug),
        ),
    };
    let mut upstream = Vec::new();
    let mut remove = Vec::new();
    let tp = Traceparent { trace_id, parent_id: span_id, flags: u8::from(sampled) };
    push(&mut upstream, "traceparent", &tp.to_header());
    if let Some(ts) = &tracestate {
        push(&mut upstream, "tracestate", ts);
    }
    let b3_trace = if trace_id_64 { trace_id.to_string()[16..].to_string() } else { trace_id.to_string() };
    let b3_flag = if debug {
        "d"
    } else if sampled {
        "1"
    } else {
        "0"
    };
    // A B3 sampling-only request keeps its form with the decision and our new ids.
    let b3_form = b3_form.or_else(|| {
        headers.contains_key("b3").then_some(Format::B3Single).or_else(|| {
            (headers.contains_key("x-b3-sampled") || headers.contains_key("x-b3-flags")).then_some(Format::B3Multi)
        })
    });
    let multi_names = ["x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"];
    match b3_form {
        Some(Format::B3Single) => {
            let v = match parent_id {
                Some(p) => format!("{b3_trace}-{span_id}-{b3_flag}-{p}"),
                None => format!("{b3_trace}-{span_id}-{b3_flag}"),
            };
            push(&mut upstream, "b3", &v);
            remove.extend(multi_names.into_iter().map(HeaderName::from_static));
        }
        Some(Format::B3Multi) => {
            remove.push(HeaderName::from_static("b3"));
            remove.extend(multi_names.into_iter().map(HeaderName::from_static));
            push(&mut upstream, "x-b3-traceid", &b3_trace);
            push(&mut upstream, "x-b3-spanid", &span_id.to_string());
            if let Some(p) = parent_id {
                push(&mut upstream, "x-b3-parentspanid", &p.to_string());
            }
            if debug {
                push(&mut upstream, "x-b3-flags", "1");
            } else {
                push(&mut upstream, "x-b3-sampled", b3_flag);
            }
        }
        Some(Format::W3c) | None => {}
    }
    Started {
        trace_id,
        span_id,
        parent_id,
        sampled,
        tracestate,
        upstream_headers: upstream,
        remove,
        errors: extracted.errors,
    }
}

fn push(out: &mut Vec<(HeaderName, HeaderValue)>, name: &'static str, value: &str) {
    // Every value built here is hex, digits and '-', or a tracestate that was
    // already a valid header value.
    if let Ok(v) = HeaderValue::from_str(value) {
        out.push((HeaderName::from_static(name), v));
    }
}

/// Applies [`Started::remove`] and [`Started::upstream_headers`] to a request's headers.
pub fn inject(started: &Started, headers: &mut HeaderMap) {
    for name in &started.remove {
        headers.remove(name);
    }
    for (name, value) in &started.upstream_headers {
        headers.insert(name.clone(), value.clone());
    }
}

/// A Telemetry API `customTags` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CustomTag {
    Literal(String),
    /// A request header; `default` when absent.
    Header {
        name: String,
        default: Option<String>,
    },
    /// A variable of the waypoint's environment; `default` when unset.
    Environment {
        name: String,
        default: Option<String>,
    },
}

/// Everything about the request a span records, gathered by the proxy.
#[derive(Clone, Debug, Default)]
pub struct RequestFacts<'a> {
    /// The route's destination host (`reviews.default.svc.cluster.local`), or the
    /// `VirtualService` name when the route splits across several (see [`span_name`]).
    pub service_host: &'a str,
    pub service_port: u16,
    /// The route's path match, for the span name.
    pub route_path: RoutePath<'a>,
    pub method: &'a str,
    /// The full URL as Envoy's `http.url` tag (scheme, authority, path and query).
    pub url: &'a str,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'a str,
    pub user_agent: Option<&'a str>,
    pub request_id: Option<&'a str>,
    /// 0 when no response was sent (reset).
    pub status: u16,
    /// Envoy's response flags (`-` for none).
    pub response_flags: &'a str,
    /// Envoy's cluster name (`outbound|9080|v1|reviews.default.svc.cluster.local`).
    pub upstream_cluster: &'a str,
    pub upstream_address: Option<&'a str>,
    pub request_size: u64,
    pub response_size: u64,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
}

/// The waypoint's identity, for the attributes Istio adds to every span.
#[derive(Clone, Debug, Default)]
pub struct Node<'a> {
    pub node_id: &'a str,
    pub canonical_service: &'a str,
    pub canonical_revision: &'a str,
    pub namespace: &'a str,
    pub mesh_id: &'a str,
    pub cluster_id: &'a str,
}

/// The path part of a route's match, as Istio names the route's operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RoutePath<'a> {
    /// No path match (or the default route): `/*`.
    #[default]
    Any,
    /// A prefix match: the prefix followed by `*`.
    Prefix(&'a str),
    /// An exact match: the path.
    Exact(&'a str),
    /// A regex match: the regex.
    Regex(&'a str),
}

/// The span name Istio gives a routed request, its route decorator's operation:
/// `<host>:<port><path>` with the path as in [`RoutePath`]. `host` is the route's one
/// destination host, or the `VirtualService`'s name when the route splits across
/// several destinations (Istio's choice when the destination is not one host).
pub fn span_name(host: &str, port: u16, path: RoutePath<'_>) -> String {
    match path {
        RoutePath::Any => format!("{host}:{port}/*"),
        RoutePath::Prefix(p) => format!("{host}:{port}{p}*"),
        RoutePath::Exact(p) | RoutePath::Regex(p) => format!("{host}:{port}{p}"),
    }
}

/// Builds the span of one request. Attribute names and their string values follow
/// Envoy's HTTP tracing tags (`http.status_code` is a string in Envoy, kept so), plus
/// Istio's `istio.*` tags and the `custom_tags` (resolved against the request
/// `headers` and `env`, a lookup the caller backs with the process environment).
pub fn finish(
    started: &Started,
    kind: SpanKind,
    facts: &RequestFacts<'_>,
    node: &Node<'_>,
    headers: &HeaderMap,
    custom_tags: &BTreeMap<String, CustomTag>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Span {
    let mut attrs: Vec<(String, AttrValue)> = Vec::new();
    let mut put = |k: &str, v: String| {
        if let Some(slot) = attrs.iter_mut().find(|(key, _)| key == k) {
            slot.1 = AttrValue::Str(v);
        } else {
            attrs.push((k.to_string(), AttrValue::Str(v)));
        }
    };
    put("node_id", node.node_id.to_string());
    put("component", "proxy".into());
    put("http.method", facts.method.to_string());
    put("http.url", facts.url.to_string());
    put("http.protocol", facts.protocol.to_string());
    put("upstream_cluster", facts.upstream_cluster.to_string());
    put("upstream_cluster.name", facts.upstream_cluster.to_string());
    if let Some(a) = facts.upstream_address {
        put("upstream_address", a.to_string());
    }
    if let Some(ua) = facts.user_agent {
        put("user_agent", ua.to_string());
    }
    if let Some(id) = facts.request_id {
        put("guid:x-request-id", id.to_string());
    }
    put("request_size", facts.request_size.to_string());
    put("response_size", facts.response_size.to_string());
    put("http.status_code", facts.status.to_string());
    put("response_flags", facts.response_flags.to_string());
    put("istio.canonical_service", node.canonical_service.to_string());
    put("istio.canonical_revision", node.canonical_revision.to_string());
    put("istio.namespace", node.namespace.to_string());
    put("istio.mesh_id", node.mesh_id.to_string());
    put("istio.cluster_id", node.cluster_id.to_string());
    let error = facts.status == 0 || facts.status >= 500;
    if error {
        put("error", "true".into());
    }
    for (tag, how) in custom_tags {
        let value = match how {
            CustomTag::Literal(v) => Some(v.clone()),
            CustomTag::Header { name, default } => {
                headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(str::to_string).or_else(|| default.clone())
            }
            CustomTag::Environment { name, default } => env(name).or_else(|| default.clone()),
        };
        if let Some(v) = value {
            put(tag, v);
        }
    }
    Span {
        trace_id: started.trace_id,
        span_id: started.span_id,
        parent_id: started.parent_id,
        tracestate: started.tracestate.clone(),
        name: span_name(facts.service_host, facts.service_port, facts.route_path),
        kind,
        start_unix_nanos: facts.start_unix_nanos,
        end_unix_nanos: facts.end_unix_nanos.max(facts.start_unix_nanos),
        attributes: attrs,
        error,
    }
}

#[cfg(test)]
mod tests;
