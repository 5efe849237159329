//! The Telemetry API (`telemetry.istio.io` `Telemetry`) resolved for one waypoint and
//! one destination service: which tracing provider and sampling, whether to write
//! access logs (and which responses), and which metrics are off or relabelled.
//!
//! Scopes, from the least to the most specific (each overrides what the previous set):
//! 1. mesh: a `Telemetry` in the root namespace with no `selector` and no `targetRefs`;
//! 2. namespace: one in the waypoint's namespace with neither;
//! 3. workload: one in the waypoint's namespace whose `selector` matches the
//!    waypoint's labels, or whose `targetRef(s)` names the waypoint's `Gateway`;
//! 4. service: one in the service's namespace whose `targetRef(s)` names the
//!    destination `Service` (Istio applies these at the waypoint serving it).
//!
//! As in Istio, one `Telemetry` counts per scope: when several apply at the same scope
//! the first by name wins (Istio takes the oldest; the mesh has no creation times)
//! and the others are reported. Within the entries of a block, only those whose
//! `match.mode` is absent, `CLIENT_AND_SERVER` or `SERVER` apply: the waypoint is the
//! server side of the requests it receives.
//!
//! Merging, field by field: tracing's `providers`, `randomSamplingPercentage` and
//! `disableSpanReporting` come from the most specific scope that sets them and
//! `customTags` merge key by key; access logging's `providers`, `disabled` and
//! `filter` likewise; metrics `overrides` apply in scope order, so a more specific
//! `disabled` or tag override wins.
//!
//! Access-log filters are CEL in Istio; this module evaluates a documented subset:
//! comparisons (`==`, `!=`, `>=`, `>`, `<=`, `<`) of `response.code` with an integer
//! and `response.flags` with `0` (none) combined by `&&`, `||`, `!` and parentheses.
//! Anything else is reported as unsupported and the filter is dropped, so every
//! request is logged: nothing is ever dropped silently.
use std::collections::BTreeMap;

use mesh_common::config::{Telemetry, meta::Labels};
use serde_json::Value;

pub use crate::trace::CustomTag;

pub mod apply;

/// The waypoint and the request's destination the Telemetry is resolved for.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub root_namespace: &'a str,
    pub waypoint_namespace: &'a str,
    /// The waypoint's `Gateway` name.
    pub waypoint_name: &'a str,
    pub waypoint_labels: &'a Labels,
    /// The destination `Service` as (namespace, name).
    pub service: Option<(&'a str, &'a str)>,
}

/// The mesh config's defaults (`defaultProviders`, the default sampling).
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    pub tracing_providers: Vec<String>,
    pub access_log_providers: Vec<String>,
    pub metrics_providers: Vec<String>,
    /// The sampling percentage when no Telemetry sets one (Istio's default is 1).
    pub sampling_percent: f64,
}

/// The effective tracing of the waypoint for the destination.
#[derive(Clone, Debug, PartialEq)]
pub struct Tracing {
    /// An `extensionProviders` name (the lead looks up its `opentelemetry` block).
    pub provider: String,
    pub sampling_percent: f64,
    pub custom_tags: BTreeMap<String, CustomTag>,
    /// `disableSpanReporting`: propagate headers, export nothing.
    pub disabled: bool,
}

/// The effective access logging.
#[derive(Clone, Debug, PartialEq)]
pub struct AccessLog {
    pub enabled: bool,
    pub providers: Vec<String>,
    /// Log only the requests it accepts; `None` logs every request.
    pub filter: Option<LogFilter>,
}

/// Istio's standard metrics (`match.metric`) or a custom one (`match.customMetric`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    All,
    RequestCount,
    RequestDuration,
    RequestSize,
    ResponseSize,
    TcpOpenedConnections,
    TcpClosedConnections,
    TcpSentBytes,
    TcpReceivedBytes,
    GrpcRequestMessages,
    GrpcResponseMessages,
    Custom(String),
}

impl Metric {
    fn parse(name: &str) -> Option<Metric> {
        Some(match name {
            "ALL_METRICS" => Metric::All,
            "REQUEST_COUNT" => Metric::RequestCount,
            "REQUEST_DURATION" => Metric::RequestDuration,
            "REQUEST_SIZE" => Metric::RequestSize,
            "RESPONSE_SIZE" => Metric::ResponseSize,
            "TCP_OPENED_CONNECTIONS" => Metric::TcpOpenedConnections,
            "TCP_CLOSED_CONNECTIONS" => Metric::TcpClosedConnections,
            "TCP_SENT_BYTES" => Metric::TcpSentBytes,
            "TCP_RECEIVED_BYTES" => Metric::TcpReceivedBytes,
            "GRPC_REQUEST_MESSAGES" => Metric::GrpcRequestMessages,
            "GRPC_RESPONSE_MESSAGES" => Metric::GrpcResponseMessages,
            _ => return None,
        })
    }

    fn covers(&self, metric: &Metric) -> bool {
        self == &Metric::All || self == metric
    }
}

/// What a `tagOverrides` entry does to one label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagOverride {
    Remove,
    /// A quoted CEL string (`"'canary'"`): the label's literal value.
    Literal(String),
    /// Any other CEL expression (`request.host`, `request.headers['x-user']`), kept
    /// as written for the metrics code to evaluate what it supports.
    Expression(String),
}

/// One metrics override, in scope order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricOverride {
    pub metric: Metric,
    pub disabled: Option<bool>,
    pub tags: BTreeMap<String, TagOverride>,
}

/// The effective metrics.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Metrics {
    pub providers: Vec<String>,
    pub overrides: Vec<MetricOverride>,
}

impl Metrics {
    /// Whether `metric` is turned off (the last override that says so wins).
    pub fn disabled(&self, metric: &Metric) -> bool {
        self.overrides.iter().rev().filter(|o| o.metric.covers(metric)).find_map(|o| o.disabled).unwrap_or(false)
    }

    /// The label overrides of `metric`, later (more specific) ones winning.
    pub fn tag_overrides(&self, metric: &Metric) -> BTreeMap<String, TagOverride> {
        let mut out = BTreeMap::new();
        for o in self.overrides.iter().filter(|o| o.metric.covers(metric)) {
            out.extend(o.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        out
    }
}

/// The resolved telemetry of the waypoint for one destination.
#[derive(Clone, Debug, PartialEq)]
pub struct Effective {
    /// `None` when no provider is configured.
    pub tracing: Option<Tracing>,
    pub access_log: AccessLog,
    pub metrics: Metrics,
}

/// Something the resolution ignored; the lead logs these (and `meshctl` can show them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TelemetryIssue {
    #[error("Telemetry {telemetry}: ignored at the {scope} scope, {winner} applies there")]
    Shadowed { telemetry: String, scope: &'static str, winner: String },
    #[error("Telemetry {telemetry}: {path}: {value} is not valid: {reason}")]
    Invalid { telemetry: String, path: String, value: String, reason: &'static str },
    #[error(
        "Telemetry {telemetry}: access log filter {expression:?} is not supported ({reason}); every request is logged"
    )]
    UnsupportedFilter { telemetry: String, expression: String, reason: String },
    #[error("Telemetry {telemetry}: tracing names {count} providers; only the first, {used}, is used")]
    ManyTracingProviders { telemetry: String, count: usize, used: String },
}

/// The result: the effective settings and what was ignored on the way.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub effective: Effective,
    pub issues: Vec<TelemetryIssue>,
}

const SCOPES: [&str; 4] = ["mesh", "namespace", "workload", "service"];

fn id(t: &Telemetry) -> String {
    format!("{}/{}", t.metadata.namespace, t.metadata.name)
}

/// The scope (index into [`SCOPES`]) at which `t` applies to `subject`, if any.
fn scope_of(t: &Telemetry, s: &Subject<'_>) -> Option<usize> {
    let ns = t.metadata.namespace.as_str();
    let refs: Vec<_> = t.spec.target_ref.iter().chain(&t.spec.target_refs).collect();
    if !refs.is_empty() {
        let names = |kind: &str, group: &str, name: &str| {
            refs.iter().any(|r| r.kind == kind && (r.group.is_empty() || r.group == group) && r.name == name)
        };
        if let Some((svc_ns, svc)) = s.service
            && ns == svc_ns
            && names("Service", "", svc)
        {
            return Some(3);
        }
        if ns == s.waypoint_namespace && names("Gateway", "gateway.networking.k8s.io", s.waypoint_name) {
            return Some(2);
        }
        return None;
    }
    if let Some(sel) = &t.spec.selector
        && !sel.match_labels.is_empty()
    {
        let matches = sel.match_labels.iter().all(|(k, v)| s.waypoint_labels.get(k) == Some(v));
        return (ns == s.waypoint_namespace && matches).then_some(2);
    }
    if ns == s.root_namespace {
        Some(0)
    } else if ns == s.waypoint_namespace {
        Some(1)
    } else {
        None
    }
}

/// Resolves the Telemetry objects for `subject`.
pub fn resolve(telemetries: &[Telemetry], subject: &Subject<'_>, defaults: &Defaults) -> Resolved {
    let mut issues = Vec::new();
    let mut by_scope: [Option<&Telemetry>; 4] = [None; 4];
    let mut sorted: Vec<&Telemetry> = telemetries.iter().collect();
    sorted.sort_by(|a, b| (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name)));
    for t in sorted {
        let Some(scope) = scope_of(t, subject) else { continue };
        match by_scope[scope] {
            None => by_scope[scope] = Some(t),
            Some(winner) => {
                issues.push(TelemetryIssue::Shadowed { telemetry: id(t), scope: SCOPES[scope], winner: id(winner) });
            }
        }
    }
    let mut providers: Option<Vec<String>> = None;
    let mut sampling: Option<f64> = None;
    let mut disabled: Option<bool> = None;
    let mut custom_tags = BTreeMap::new();
    let mut log_providers: Option<Vec<String>> = None;
    let mut log_disabled: Option<bool> = None;
    let mut log_filter: Option<Option<LogFilter>> = None;
    let mut metrics = Metrics::default();
    let mut metric_providers: Option<Vec<String>> = None;
    for t in by_scope.into_iter().flatten() {
        let mut cx = Cx { telemetry: id(t), issues: &mut issues };
        if let Some((i, entry)) = first_for_server(&t.spec.tracing) {
            let p = format!("tracing[{i}]");
            if let Some(list) = cx.providers(entry, &p) {
                if list.len() > 1 {
                    cx.issues.push(TelemetryIssue::ManyTracingProviders {
                        telemetry: cx.telemetry.clone(),
                        count: list.len(),
                        used: list[0].clone(),
                    });
                }
                providers = Some(list);
            }
            if let Some(v) = entry.get("randomSamplingPercentage") {
                match v.as_f64() {
                    Some(pct) if (0.0..=100.0).contains(&pct) => sampling = Some(pct),
                    _ => cx.invalid(&format!("{p}.randomSamplingPercentage"), v, "is not a number from 0 to 100"),
                }
            }
            if let Some(v) = entry.get("disableSpanReporting") {
                match v.as_bool() {
                    Some(b) => disabled = Some(b),
                    None => cx.invalid(&format!("{p}.disableSpanReporting"), v, "is not a boolean"),
                }
            }
            if let Some(tags) = entry.get("customTags") {
                cx.custom_tags(tags, &format!("{p}.customTags"), &mut custom_tags);
            }
        }
        if let Some((i, entry)) = first_for_server(&t.spec.access_logging) {
            let p = format!("accessLogging[{i}]");
            if let Some(list) = cx.providers(entry, &p) {
                log_providers = Some(list);
            }
            if let Some(v) = entry.get("disabled") {
                match v.as_bool() {
                    Some(b) => log_disabled = Some(b),
                    None => cx.invalid(&format!("{p}.disabled"), v, "is not a boolean"),
                }
            }
            if let Some(f) = entry.get("filter") {
                let expression = f.get("expression").and_then(Value::as_str);
                match expression.map(LogFilter::parse) {
                    Some(Ok(filter)) => log_filter = Some(Some(filter)),
                    Some(Err(reason)) => {
                        cx.issues.push(TelemetryIssue::UnsupportedFilter {
                            telemetry: cx.telemetry.clone(),
                            expression: expression.unwrap_or_default().to_string(),
                            reason,
                        });
                        log_filter = Some(None);
                    }
                    None => cx.invalid(&format!("{p}.filter.expression"), f, "is not a string"),
                }
            }
        }
        for (i, entry) in t.spec.metrics.iter().enumerate() {
            let p = format!("metrics[{i}]");
            if let Some(list) = cx.providers(entry, &p) {
                metric_providers = Some(list);
            }
            if let Some(list) = entry.get("overrides") {
                let Some(list) = list.as_array() else {
                    cx.invalid(&format!("{p}.overrides"), list, "is not a list");
                    continue;
                };
                for (j, o) in list.iter().enumerate() {
                    if let Some(o) = cx.metric_override(o, &format!("{p}.overrides[{j}]")) {
                        metrics.overrides.push(o);
                    }
                }
            }
        }
    }
    let tracing =
        providers.unwrap_or_else(|| defaults.tracing_providers.clone()).into_iter().next().map(|provider| Tracing {
            provider,
            sampling_percent: sampling.unwrap_or(defaults.sampling_percent),
            custom_tags,
            disabled: disabled.unwrap_or(false),
        });
    let log_providers = log_providers.unwrap_or_else(|| defaults.access_log_providers.clone());
    let access_log = AccessLog {
        enabled: !log_providers.is_empty() && !log_disabled.unwrap_or(false),
        providers: log_providers,
        filter: log_filter.flatten(),
    };
    metrics.providers = metric_providers.unwrap_or_else(|| defaults.metrics_providers.clone());
    Resolved { effective: Effective { tracing, access_log, metrics }, issues }
}

/// The first entry of a block that applies to the server side.
fn first_for_server(entries: &[Value]) -> Option<(usize, &Value)> {
    entries.iter().enumerate().find(|(_, e)| mode_applies(e))
}

fn mode_applies(entry: &Value) -> bool {
    entry.get("match").is_none_or(mode_applies_match)
}

struct Cx<'a> {
    telemetry: String,
    issues: &'a mut Vec<TelemetryIssue>,
}

impl Cx<'_> {
    fn invalid(&mut self, path: &str, value: &Value, reason: &'static str) {
        self.issues.push(TelemetryIssue::Invalid {
            telemetry: self.telemetry.clone(),
            path: path.to_string(),
            value: value.to_string(),
            reason,
        });
    }

    /// `providers: [{name}]`; `None` when absent or empty (inherit).
    fn providers(&mut self, entry: &Value, path: &str) -> Option<Vec<String>> {
        let list = entry.get("providers")?;
        let Some(items) = list.as_array() else {
            self.invalid(&format!("{path}.providers"), list, "is not a list");
            return None;
        };
        let mut names = Vec::new();
        for (i, p) in items.iter().enumerate() {
            match p.get("name").and_then(Value::as_str) {
                Some(n) => names.push(n.to_string()),
                None => self.invalid(&format!("{path}.providers[{i}].name"), p, "is missing or not a string"),
            }
        }
        (!names.is_empty()).then_some(names)
    }

    fn custom_tags(&mut self, tags: &Value, path: &str, out: &mut BTreeMap<String, CustomTag>) {
        let Some(tags) = tags.as_object() else {
            self.invalid(path, tags, "is not a map");
            return;
        };
        for (name, tag) in tags {
            let p = format!("{path}.{name}");
            let field = |kind: &str, key: &str| tag.get(kind).and_then(|k| k.get(key)).and_then(Value::as_str);
            let parsed = if let Some(v) = field("literal", "value") {
                Some(CustomTag::Literal(v.to_string()))
            } else if let Some(n) = field("header", "name") {
                let default = field("header", "defaultValue").map(str::to_string);
                Some(CustomTag::Header { name: n.to_ascii_lowercase(), default })
            } else if let Some(n) = field("environment", "name") {
                let default = field("environment", "defaultValue").map(str::to_string);
                Some(CustomTag::Environment { name: n.to_string(), default })
            } else {
                None
            };
            match parsed {
                Some(t) => {
                    out.insert(name.clone(), t);
                }
                None => self.invalid(&p, tag, "is not literal.value, header.name or environment.name"),
            }
        }
    }

    fn metric_override(&mut self, o: &Value, path: &str) -> Option<MetricOverride> {
        let m = o.get("match");
        if !m.is_none_or(mode_applies_match) {
            return None;
        }
        let metric = match (
            m.and_then(|m| m.get("metric")).and_then(Value::as_str),
            m.and_then(|m| m.get("customMetric")).and_then(Value::as_str),
        ) {
            (Some(name), _) => {
                let Some(metric) = Metric::parse(name) else {
                    self.invalid(
                        &format!("{path}.match.metric"),
                        &Value::String(name.into()),
                        "is not an Istio metric",
                    );
                    return None;
                };
                metric
            }
            (None, Some(custom)) => Metric::Custom(custom.to_string()),
            (None, None) => Metric::All,
        };
        let disabled = match o.get("disabled") {
            None => None,
            Some(v) => {
                let b = v.as_bool();
                if b.is_none() {
                    self.invalid(&format!("{path}.disabled"), v, "is not a boolean");
                }
                b
            }
        };
        let mut tags = BTreeMap::new();
        if let Some(to) = o.get("tagOverrides") {
            let Some(to) = to.as_object() else {
                self.invalid(&format!("{path}.tagOverrides"), to, "is not a map");
                return None;
            };
            for (tag, spec) in to {
                let p = format!("{path}.tagOverrides.{tag}");
                let op = spec.get("operation").and_then(Value::as_str).unwrap_or("UPSERT");
                let value = spec.get("value").and_then(Value::as_str);
                let t = match (op, value) {
                    ("REMOVE", _) => TagOverride::Remove,
                    ("UPSERT", Some(v)) => tag_value(v),
                    ("UPSERT", None) => {
                        self.invalid(&format!("{p}.value"), spec, "is required with UPSERT");
                        continue;
                    }
                    _ => {
                        self.invalid(&format!("{p}.operation"), spec, "is not UPSERT or REMOVE");
                        continue;
                    }
                };
                tags.insert(tag.clone(), t);
            }
        }
        Some(MetricOverride { metric, disabled, tags })
    }
}

fn mode_applies_match(m: &Value) -> bool {
    match m.get("mode").and_then(Value::as_str) {
        None | Some("CLIENT_AND_SERVER" | "SERVER") => true,
        Some(_) => false,
    }
}

fn tag_value(v: &str) -> TagOverride {
    let t = v.trim();
    let quoted = t.len() >= 2
        && ((t.starts_with('\'') && t.ends_with('\'')) || (t.starts_with('"') && t.ends_with('"')))
        && !t[1..t.len() - 1].contains(['\'', '"']);
    if quoted { TagOverride::Literal(t[1..t.len() - 1].to_string()) } else { TagOverride::Expression(t.to_string()) }
}

/// An access-log filter in the supported CEL subset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogFilter {
    Or(Box<LogFilter>, Box<LogFilter>),
    And(Box<LogFilter>, Box<LogFilter>),
    Not(Box<LogFilter>),
    /// `response.code <op> value`.
    Code(Cmp, i64),
    /// `response.flags == 0` (true) or `!= 0` (false): whether the response has no flags.
    NoFlags(bool),
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Ge,
    Gt,
    Le,
    Lt,
}

impl Cmp {
    fn flip(self) -> Cmp {
        match self {
            Cmp::Ge => Cmp::Le,
            Cmp::Gt => Cmp::Lt,
            Cmp::Le => Cmp::Ge,
            Cmp::Lt => Cmp::Gt,
            c => c,
        }
    }

    fn eval(self, a: i64, b: i64) -> bool {
        match self {
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
            Cmp::Ge => a >= b,
            Cmp::Gt => a > b,
            Cmp::Le => a <= b,
            Cmp::Lt => a < b,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Attr(String),
    Int(i64),
    Op(Cmp),
    And,
    Or,
    Not,
    Open,
    Close,
}

fn lex(text: &str) -> Result<Vec<Tok>, String> {
    let (s, b) = (text, text.as_bytes());
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let two = b.get(i..i + 2).unwrap_or(&[]);
        let (tok, len) = match (b[i], two) {
            (b' ' | b'\t' | b'\n', _) => {
                i += 1;
                continue;
            }
            (_, b"&&") => (Tok::And, 2),
            (_, b"||") => (Tok::Or, 2),
            (_, b"==") => (Tok::Op(Cmp::Eq), 2),
            (_, b"!=") => (Tok::Op(Cmp::Ne), 2),
            (_, b">=") => (Tok::Op(Cmp::Ge), 2),
            (_, b"<=") => (Tok::Op(Cmp::Le), 2),
            (b'>', _) => (Tok::Op(Cmp::Gt), 1),
            (b'<', _) => (Tok::Op(Cmp::Lt), 1),
            (b'!', _) => (Tok::Not, 1),
            (b'(', _) => (Tok::Open, 1),
            (b')', _) => (Tok::Close, 1),
            (b'0'..=b'9', _) => {
                let end = b[i..].iter().position(|c| !c.is_ascii_digit()).map_or(b.len(), |p| i + p);
                let n = s[i..end].parse().map_err(|_| format!("number {} is too large", &s[i..end]))?;
                (Tok::Int(n), end - i)
            }
            (c, _) if c.is_ascii_alphabetic() || c == b'_' => {
                let end = b[i..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.'))
                    .map_or(b.len(), |p| i + p);
                (Tok::Attr(s[i..end].to_string()), end - i)
            }
            _ => {
                let rest: String = s[i..].chars().take(10).collect();
                return Err(format!("unexpected {rest:?}"));
            }
        };
        out.push(tok);
        i += len;
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn or(&mut self, depth: usize) -> Result<LogFilter, String> {
        let mut left = self.and(depth)?;
        while self.peek() == Some(&Tok::Or) {
            self.at += 1;
            left = LogFilter::Or(Box::new(left), Box::new(self.and(depth)?));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<LogFilter, String> {
        let mut left = self.unary(depth)?;
        while self.peek() == Some(&Tok::And) {
            self.at += 1;
            left = LogFilter::And(Box::new(left), Box::new(self.unary(depth)?));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<LogFilter, String> {
        if depth > 32 {
            return Err("nested too deeply".into());
        }
        match self.peek() {
            Some(Tok::Not) => {
                self.at += 1;
                Ok(LogFilter::Not(Box::new(self.unary(depth + 1)?)))
            }
            Some(Tok::Open) => {
                self.at += 1;
                let inner = self.or(depth + 1)?;
                match self.next() {
                    Some(Tok::Close) => Ok(inner),
                    _ => Err("missing ')'".into()),
                }
            }
            _ => self.comparison(),
        }
    }

    fn comparison(&mut self) -> Result<LogFilter, String> {
        let (attr, op, n) = match (self.next(), self.next(), self.next()) {
            (Some(Tok::Attr(a)), Some(Tok::Op(op)), Some(Tok::Int(n))) => (a, op, n),
            (Some(Tok::Int(n)), Some(Tok::Op(op)), Some(Tok::Attr(a))) => (a, op.flip(), n),
            _ => return Err("expected a comparison of response.code or response.flags with an integer".into()),
        };
        match (attr.as_str(), op, n) {
            ("response.code", op, n) => Ok(LogFilter::Code(op, n)),
            ("response.flags", Cmp::Eq, 0) => Ok(LogFilter::NoFlags(true)),
            ("response.flags", Cmp::Ne, 0) => Ok(LogFilter::NoFlags(false)),
            ("response.flags", ..) => Err("response.flags compares only with == 0 or != 0".into()),
            (other, ..) => Err(format!("attribute {other} is not supported (response.code, response.flags)")),
        }
    }
}

impl LogFilter {
    /// Parses the supported subset; the error says why an expression is not in it.
    pub fn parse(expression: &str) -> Result<LogFilter, String> {
        let mut p = Parser { toks: lex(expression)?, at: 0 };
        let f = p.or(0)?;
        if p.at != p.toks.len() {
            return Err("unexpected text after the expression".into());
        }
        Ok(f)
    }

    /// Whether a request with this response is logged. `response_flags` is the
    /// proxy's flags string (`-` or empty for none).
    pub fn accepts(&self, response_code: u16, response_flags: &str) -> bool {
        match self {
            LogFilter::Or(a, b) => a.accepts(response_code, response_flags) || b.accepts(response_code, response_flags),
            LogFilter::And(a, b) => {
                a.accepts(response_code, response_flags) && b.accepts(response_code, response_flags)
            }
            LogFilter::Not(a) => !a.accepts(response_code, response_flags),
            LogFilter::Code(op, n) => op.eval(i64::from(response_code), *n),
            LogFilter::NoFlags(none) => (response_flags.is_empty() || response_flags == "-") == *none,
        }
    }
}

#[cfg(test)]
mod tests;
