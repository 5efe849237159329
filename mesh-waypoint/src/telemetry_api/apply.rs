//! What the waypoint does with the resolved Telemetry on each request: whether the
//! access log line is written ([`LogPlan`]) and which request metric families are
//! recorded under which labels ([`MetricPlan`]); for the connections relayed on
//! TCP-routed ports, which TCP families ([`TcpMetricPlan`]). Built once per service port and
//! config version; applied per request without allocating when nothing is overridden.
//!
//! Providers. Access logs: the built-in `envoy` provider and any `envoyFileAccessLog`
//! provider of the mesh config write the waypoint's access log on its stdout (a file
//! path other than `/dev/stdout` is reported, the line still goes to stdout); other
//! kinds are reported and get nothing. Metrics: the built-in `prometheus` provider and
//! any `prometheus` provider of the mesh config are the waypoint's `:15020/metrics`;
//! when the effective providers name none of them, no request metric is recorded.
//!
//! With no Telemetry and no mesh `defaultProviders`, the defaults are `envoy` and
//! `prometheus`: every request is logged and counted, as with Istio's demo profile
//! (`accessLogFile: /dev/stdout`) and its default metrics provider.
//!
//! Tag overrides (`tagOverrides`) are CEL in Istio; the values evaluated here are a
//! quoted literal and these request attributes (Envoy's attribute names):
//! `request.host`, `request.method`, `request.path` (with the query, as in Envoy),
//! `request.url_path` (without), `request.scheme`, `request.protocol`, `request.id`,
//! `request.useragent`, `request.referer`, `request.headers['name']`,
//! `destination.port` and `response.code` (each also inside `string(..)`); the TCP
//! families read `destination.port` only, a request attribute being reported there.
//! Anything else is reported and leaves the label as it is; so is a tag that cannot name a
//! Prometheus label. Overrides apply per family (`match.metric`), so families may
//! carry different labels; equal rewrites are shared and computed once per request.
use std::{collections::BTreeMap, sync::Arc};

use mesh_common::config::mesh::{ExtensionProvider, MeshConfig};

use super::{AccessLog, Defaults, LogFilter, Metric, Metrics, TagOverride};

/// The built-in access-log provider: the waypoint's stdout log.
pub const ENVOY_LOG_PROVIDER: &str = "envoy";
/// The built-in metrics provider: the waypoint's Prometheus endpoint.
pub const PROMETHEUS_PROVIDER: &str = "prometheus";
/// Where a file access log provider writes what the waypoint writes.
const STDOUT: &str = "/dev/stdout";

impl Defaults {
    /// The defaults of the mesh config: its `defaultProviders`, or `envoy` for access
    /// logs and `prometheus` for metrics when it names none, and 1% sampling.
    pub fn from_mesh(mesh: &MeshConfig) -> Defaults {
        let defaults = mesh.default_providers.as_ref();
        let or = |list: Option<&Vec<String>>, builtin: &str| match list {
            Some(l) if !l.is_empty() => l.clone(),
            _ => vec![builtin.to_string()],
        };
        Defaults {
            tracing_providers: defaults.map(|d| d.tracing.clone()).unwrap_or_default(),
            access_log_providers: or(defaults.map(|d| &d.access_logging), ENVOY_LOG_PROVIDER),
            metrics_providers: or(defaults.map(|d| &d.metrics), PROMETHEUS_PROVIDER),
            sampling_percent: 1.0,
        }
    }
}

/// Something a plan cannot do as configured; the lead logs each once per config version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyIssue {
    #[error(
        "access log provider {provider}: path {path:?} is not written; the waypoint writes its access log to stdout"
    )]
    LogPathNotStdout { provider: String, path: String },
    #[error("{block} provider {provider}: a {kind} provider is not supported there by the waypoint; ignored")]
    UnsupportedProvider { block: &'static str, provider: String, kind: &'static str },
    #[error("{block} provider {provider}: not in the mesh config's extensionProviders; ignored")]
    UnknownProvider { block: &'static str, provider: String },
    #[error(
        "metrics tag override {tag}: expression {expression:?} is not supported ({reason}); the label is left as is"
    )]
    UnsupportedTagExpression { tag: String, expression: String, reason: String },
    #[error("metrics tag override {tag:?}: not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*); ignored")]
    InvalidTagName { tag: String },
}

/// The kind of an extension provider, for messages.
fn kind_of(p: &ExtensionProvider) -> &'static str {
    if p.envoy_file_access_log.is_some() {
        "envoyFileAccessLog"
    } else if p.prometheus.is_some() {
        "prometheus"
    } else if p.opentelemetry.is_some() {
        "opentelemetry"
    } else if p.zipkin.is_some() {
        "zipkin"
    } else if p.ext_authz().is_some() {
        "ext_authz"
    } else {
        "unknown"
    }
}

/// Whether an access-log line is written for a request of one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPlan {
    /// A provider that writes the stdout log is in force and logging is not disabled.
    pub enabled: bool,
    /// Only the requests it accepts are logged.
    pub filter: Option<LogFilter>,
}

impl Default for LogPlan {
    /// Every request logged: the plan of a request no service could be found for.
    fn default() -> Self {
        LogPlan { enabled: true, filter: None }
    }
}

impl LogPlan {
    /// The plan for the effective access logging, with the providers looked up in `mesh`.
    pub fn new(log: &AccessLog, mesh: &MeshConfig) -> (LogPlan, Vec<ApplyIssue>) {
        let mut issues = Vec::new();
        let mut stdout = false;
        for name in &log.providers {
            match mesh.provider(name) {
                Some(p) => match &p.envoy_file_access_log {
                    Some(file) => {
                        stdout = true;
                        if !file.path.is_empty() && file.path != STDOUT {
                            issues
                                .push(ApplyIssue::LogPathNotStdout { provider: name.clone(), path: file.path.clone() });
                        }
                    }
                    None => issues.push(ApplyIssue::UnsupportedProvider {
                        block: "access log",
                        provider: name.clone(),
                        kind: kind_of(p),
                    }),
                },
                None if name == ENVOY_LOG_PROVIDER => stdout = true,
                None => issues.push(ApplyIssue::UnknownProvider { block: "access log", provider: name.clone() }),
            }
        }
        (LogPlan { enabled: log.enabled && stdout, filter: log.filter.clone() }, issues)
    }

    /// Whether a request answered with `code` and `flags` (`-` for none) is logged.
    pub fn logs(&self, code: u16, flags: &str) -> bool {
        self.enabled && self.filter.as_ref().is_none_or(|f| f.accepts(code, flags))
    }
}

/// The request metric families the waypoint records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestFamily {
    /// `istio_requests_total` (`REQUEST_COUNT`).
    Count = 0,
    /// `istio_request_duration_milliseconds` (`REQUEST_DURATION`).
    Duration = 1,
    /// `istio_request_bytes` (`REQUEST_SIZE`).
    RequestSize = 2,
    /// `istio_response_bytes` (`RESPONSE_SIZE`).
    ResponseSize = 3,
}

impl RequestFamily {
    pub const ALL: [RequestFamily; 4] =
        [RequestFamily::Count, RequestFamily::Duration, RequestFamily::RequestSize, RequestFamily::ResponseSize];

    fn metric(self) -> Metric {
        match self {
            RequestFamily::Count => Metric::RequestCount,
            RequestFamily::Duration => Metric::RequestDuration,
            RequestFamily::RequestSize => Metric::RequestSize,
            RequestFamily::ResponseSize => Metric::ResponseSize,
        }
    }
}

/// A request attribute a label can take its value from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    Host,
    Method,
    /// The path with its query.
    Path,
    /// The path without its query.
    UrlPath,
    Scheme,
    Protocol,
    /// A request header, by lower-case name (`request.id`, `request.useragent` and
    /// `request.referer` are headers too).
    Header(String),
    DestinationPort,
    ResponseCode,
}

impl Attribute {
    /// Parses a supported expression; the error says why one is not.
    pub fn parse(expression: &str) -> Result<Attribute, String> {
        let e = expression.trim();
        let inner = e.strip_prefix("string(").and_then(|r| r.strip_suffix(')')).map(str::trim);
        let e = inner.unwrap_or(e);
        if let Some(rest) = e.strip_prefix("request.headers[") {
            let name = rest
                .strip_suffix(']')
                .map(str::trim)
                .and_then(|q| {
                    q.strip_prefix('\'')
                        .and_then(|q| q.strip_suffix('\''))
                        .or_else(|| q.strip_prefix('"').and_then(|q| q.strip_suffix('"')))
                })
                .filter(|n| !n.is_empty() && http::HeaderName::from_bytes(n.as_bytes()).is_ok())
                .ok_or_else(|| "request.headers takes one quoted header name".to_string())?;
            return Ok(Attribute::Header(name.to_ascii_lowercase()));
        }
        Ok(match e {
            "request.host" => Attribute::Host,
            "request.method" => Attribute::Method,
            "request.path" => Attribute::Path,
            "request.url_path" => Attribute::UrlPath,
            "request.scheme" => Attribute::Scheme,
            "request.protocol" => Attribute::Protocol,
            "request.id" => Attribute::Header("x-request-id".into()),
            "request.useragent" => Attribute::Header("user-agent".into()),
            "request.referer" => Attribute::Header("referer".into()),
            "destination.port" => Attribute::DestinationPort,
            "response.code" => Attribute::ResponseCode,
            other => {
                return Err(format!(
                    "{other} is not one of request.host, request.method, request.path, request.url_path, \
                     request.scheme, request.protocol, request.id, request.useragent, request.referer, \
                     request.headers['name'], destination.port, response.code"
                ));
            }
        })
    }
}

impl Attribute {
    /// Parses an expression for a TCP metric: only what exists for a connection
    /// (`destination.port`); a request or response attribute is an error saying so.
    pub fn parse_l4(expression: &str) -> Result<Attribute, String> {
        match Attribute::parse(expression)? {
            Attribute::DestinationPort => Ok(Attribute::DestinationPort),
            _ => Err(format!(
                "{} is not an attribute of a TCP connection; TCP metrics read destination.port only",
                expression.trim()
            )),
        }
    }
}

/// What the metrics' tag overrides may read of one request. Filled only when the
/// plan rewrites labels ([`MetricPlan::rewrites`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestAttributes {
    pub host: String,
    pub method: String,
    /// With the query.
    pub path: String,
    pub scheme: &'static str,
    pub protocol: &'static str,
    /// The headers the plan reads ([`MetricPlan::headers`]), lower-case names.
    pub headers: Vec<(String, String)>,
    pub destination_port: u16,
    pub response_code: u16,
}

impl RequestAttributes {
    fn value(&self, attribute: &Attribute) -> String {
        match attribute {
            Attribute::Host => self.host.clone(),
            Attribute::Method => self.method.clone(),
            Attribute::Path => self.path.clone(),
            Attribute::UrlPath => self.path.split_once('?').map_or(self.path.as_str(), |(p, _)| p).to_string(),
            Attribute::Scheme => self.scheme.to_string(),
            Attribute::Protocol => self.protocol.to_string(),
            Attribute::Header(name) => {
                self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_default()
            }
            Attribute::DestinationPort => self.destination_port.to_string(),
            Attribute::ResponseCode => self.response_code.to_string(),
        }
    }
}

/// What one tag override does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagOp {
    Remove,
    Literal(String),
    Attribute(Attribute),
}

/// The label rewrite of one metric family: overrides by label name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TagRewrite {
    pub ops: BTreeMap<String, TagOp>,
}

impl TagRewrite {
    /// The family's labels: `standard` (name, value) in order, less the removed ones,
    /// with the overridden values, then the added labels by name.
    pub fn apply(&self, standard: &[(&str, &str)], request: &RequestAttributes) -> Vec<(String, String)> {
        let value = |op: &TagOp| match op {
            TagOp::Remove => None,
            TagOp::Literal(v) => Some(v.clone()),
            TagOp::Attribute(a) => Some(request.value(a)),
        };
        let mut out = Vec::with_capacity(standard.len() + self.ops.len());
        for (name, v) in standard {
            match self.ops.get(*name) {
                None => out.push(((*name).to_string(), (*v).to_string())),
                Some(op) => out.extend(value(op).map(|v| ((*name).to_string(), v))),
            }
        }
        for (name, op) in &self.ops {
            if !standard.iter().any(|(n, _)| n == name) {
                out.extend(value(op).map(|v| (name.clone(), v)));
            }
        }
        out
    }
}

/// Whether `name` can name a Prometheus label (and is not reserved, `__` first).
fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// How one family is recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FamilyPlan {
    pub recorded: bool,
    /// `None`: the standard labels. Families with equal rewrites share one `Arc`, so
    /// the labels are computed once per distinct rewrite ([`Arc::ptr_eq`]).
    pub rewrite: Option<Arc<TagRewrite>>,
}

/// Which request metric families are recorded for one service, and their labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricPlan {
    /// Indexed by [`RequestFamily`].
    pub families: [FamilyPlan; 4],
}

impl Default for MetricPlan {
    /// Every family recorded with the standard labels.
    fn default() -> Self {
        let standard = FamilyPlan { recorded: true, rewrite: None };
        MetricPlan { families: [standard.clone(), standard.clone(), standard.clone(), standard] }
    }
}

/// Whether the effective metrics providers name the waypoint's Prometheus endpoint;
/// the providers it cannot serve are reported.
fn prometheus_in_force(metrics: &Metrics, mesh: &MeshConfig, issues: &mut Vec<ApplyIssue>) -> bool {
    let mut prometheus = false;
    for name in &metrics.providers {
        match mesh.provider(name) {
            Some(p) if p.prometheus.is_some() => prometheus = true,
            Some(p) => {
                issues.push(ApplyIssue::UnsupportedProvider {
                    block: "metrics",
                    provider: name.clone(),
                    kind: kind_of(p),
                });
            }
            None if name == PROMETHEUS_PROVIDER => prometheus = true,
            None => issues.push(ApplyIssue::UnknownProvider { block: "metrics", provider: name.clone() }),
        }
    }
    prometheus
}

/// How each of `families` (Istio's metric names) is recorded: kept when Prometheus is
/// in force and no override disables it; its tag overrides with the expressions
/// `parse` understands (the others, and bad label names, reported once each). Families
/// with equal rewrites share one `Arc`.
fn family_plans<const N: usize>(
    metrics: &Metrics,
    prometheus: bool,
    families: [Metric; N],
    parse: fn(&str) -> Result<Attribute, String>,
    issues: &mut Vec<ApplyIssue>,
) -> [FamilyPlan; N] {
    let mut report = |issue: ApplyIssue| {
        if !issues.contains(&issue) {
            issues.push(issue);
        }
    };
    let mut rewrites: Vec<Arc<TagRewrite>> = Vec::new();
    families.map(|metric| {
        let mut rewrite = TagRewrite::default();
        for (tag, o) in metrics.tag_overrides(&metric) {
            if !is_label_name(&tag) {
                report(ApplyIssue::InvalidTagName { tag });
                continue;
            }
            let op = match o {
                TagOverride::Remove => TagOp::Remove,
                TagOverride::Literal(v) => TagOp::Literal(v),
                TagOverride::Expression(e) => match parse(&e) {
                    Ok(a) => TagOp::Attribute(a),
                    Err(reason) => {
                        report(ApplyIssue::UnsupportedTagExpression { tag, expression: e, reason });
                        continue;
                    }
                },
            };
            rewrite.ops.insert(tag, op);
        }
        let rewrite = if rewrite.ops.is_empty() {
            None
        } else if let Some(shared) = rewrites.iter().find(|r| ***r == rewrite) {
            Some(shared.clone())
        } else {
            let shared = Arc::new(rewrite);
            rewrites.push(shared.clone());
            Some(shared)
        };
        FamilyPlan { recorded: prometheus && !metrics.disabled(&metric), rewrite }
    })
}

impl MetricPlan {
    /// The plan for the effective metrics, with the providers looked up in `mesh`.
    pub fn new(metrics: &Metrics, mesh: &MeshConfig) -> (MetricPlan, Vec<ApplyIssue>) {
        let mut issues = Vec::new();
        let prometheus = prometheus_in_force(metrics, mesh, &mut issues);
        let families = family_plans(
            metrics,
            prometheus,
            RequestFamily::ALL.map(RequestFamily::metric),
            Attribute::parse,
            &mut issues,
        );
        (MetricPlan { families }, issues)
    }

    /// How `family` is recorded.
    pub fn family(&self, family: RequestFamily) -> &FamilyPlan {
        &self.families[family as usize]
    }

    /// Whether any recorded family rewrites its labels (then the request's
    /// [`RequestAttributes`] are needed).
    pub fn rewrites(&self) -> bool {
        self.families.iter().any(|f| f.recorded && f.rewrite.is_some())
    }

    /// The request headers the rewrites read (lower-case names).
    pub fn headers(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .families
            .iter()
            .filter(|f| f.recorded)
            .filter_map(|f| f.rewrite.as_deref())
            .flat_map(|r| r.ops.values())
            .filter_map(|op| match op {
                TagOp::Attribute(Attribute::Header(name)) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// Istio's TCP metric families (recorded by the waypoint for the connections it relays
/// on TCP-routed ports), as the metrics define them.
pub use mesh_proxy::metrics::TcpFamily;

/// The Telemetry API's name of a TCP family.
fn tcp_metric(family: TcpFamily) -> Metric {
    match family {
        TcpFamily::Opened => Metric::TcpOpenedConnections,
        TcpFamily::Closed => Metric::TcpClosedConnections,
        TcpFamily::Sent => Metric::TcpSentBytes,
        TcpFamily::Received => Metric::TcpReceivedBytes,
    }
}

/// Which TCP metric families are recorded for one service, and their labels: the
/// same `disabled` and `tagOverrides` rules as [`MetricPlan`], with the expressions of
/// [`Attribute::parse_l4`] (a request attribute is reported and skipped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpMetricPlan {
    /// Indexed by [`TcpFamily`].
    pub families: [FamilyPlan; 4],
}

impl Default for TcpMetricPlan {
    /// Every family recorded with the standard labels.
    fn default() -> Self {
        let standard = FamilyPlan { recorded: true, rewrite: None };
        TcpMetricPlan { families: [standard.clone(), standard.clone(), standard.clone(), standard] }
    }
}

impl TcpMetricPlan {
    /// The plan for the effective metrics, with the providers looked up in `mesh`.
    pub fn new(metrics: &Metrics, mesh: &MeshConfig) -> (TcpMetricPlan, Vec<ApplyIssue>) {
        let mut issues = Vec::new();
        let prometheus = prometheus_in_force(metrics, mesh, &mut issues);
        let families =
            family_plans(metrics, prometheus, TcpFamily::ALL.map(tcp_metric), Attribute::parse_l4, &mut issues);
        (TcpMetricPlan { families }, issues)
    }

    /// How `family` is recorded.
    pub fn family(&self, family: TcpFamily) -> &FamilyPlan {
        &self.families[family as usize]
    }
}

#[cfg(test)]
mod tests;
