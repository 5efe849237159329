//! Istio's `EnvoyFilter` (`networking.istio.io/v1alpha3`), narrowed to the one shape
//! the mesh honours: the local rate limit filter of Istio's documentation (task
//! "Enabling Rate Limits using Envoy", section "Local rate limit"). The mesh has no
//! Envoy to patch, so any other `EnvoyFilter` is rejected by the loader with the JSON
//! path of the field that leaves the shape ("only the local rate limit filter is
//! supported"), never silently ignored.
//!
//! The object keeps its `spec` as the JSON it was written in ([`EnvoyFilter::spec`]):
//! `configPatches[].patch.value` is free-form Envoy configuration (the CRD preserves
//! unknown fields there), so a typed serde model would either lose the author's text
//! or re-implement Envoy's protobuf schema. [`EnvoyFilter::local_rate_limit`] is the
//! typed, validated view ([`LocalRateLimit`]); the loader runs it once per object and
//! reports its error as a problem, so on a loaded [`super::Config`] it always succeeds.
//! The model stays lossless in JSON (the controller ships it to waypoints that way).
//!
//! Accepted shape (`spec`):
//! - `workloadSelector.labels` or `targetRefs`/`targetRef` (a waypoint `Gateway` or a
//!   `Service`), at most one kind of scope; `priority` (read, not used: one rate limit
//!   filter applies per destination, see the waypoint's selection);
//! - `configPatches` of two kinds:
//!   - `applyTo: HTTP_FILTER`, `patch.operation: INSERT_BEFORE` (or `INSERT_FIRST`,
//!     `ADD`), `match.context` `SIDECAR_INBOUND`, `GATEWAY` or `ANY`, optional
//!     `match.listener.portNumber` and `filterChain.filter.name`
//!     (`envoy.filters.network.http_connection_manager`, optional `subFilter.name`),
//!     `patch.value.name: envoy.filters.http.local_ratelimit` and a `typed_config`;
//!   - `applyTo: HTTP_ROUTE`, `patch.operation: MERGE`, `match.routeConfiguration.vhost`
//!     (`name`, optional `route.name` / `route.action: ANY`) and
//!     `patch.value.typed_per_filter_config."envoy.filters.http.local_ratelimit"`.
//! - A `typed_config` is either `udpa.type.v1.TypedStruct` (or `xds.type.v3.TypedStruct`)
//!   with `type_url` of `envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`
//!   and the settings in `value`, or that type directly in `@type`. Settings:
//!   `stat_prefix`, `token_bucket {max_tokens, tokens_per_fill, fill_interval}`,
//!   `filter_enabled`/`filter_enforced` `{runtime_key, default_value {numerator,
//!   denominator}}` and `response_headers_to_add [{append, header {key, value}}]`.
//!   As in Envoy, an absent `filter_enabled` or `filter_enforced` means 0 %, an absent
//!   `tokens_per_fill` means 1, and an `HTTP_FILTER` without `token_bucket` limits
//!   nothing by itself (the per-route settings do).
use std::{collections::BTreeMap, prelude::rust_2024::*, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::meta::ObjectMeta;

pub const FILTER_NAME: &str = "envoy.filters.http.local_ratelimit";
const LOCAL_RATE_LIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const TYPED_STRUCTS: [&str; 2] =
    ["type.googleapis.com/udpa.type.v1.TypedStruct", "type.googleapis.com/xds.type.v3.TypedStruct"];
/// Envoy's lower bound of a local rate limit's `fill_interval`.
const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);

/// Why an `EnvoyFilter` was not accepted; `path` is the JSON path of the field
/// (`spec.configPatches[0].patch.value.name`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvoyFilterError {
    #[error("{path}: {found}: {UNSUPPORTED}")]
    Unsupported { path: String, found: String },
    #[error("{path}: missing")]
    Missing { path: String },
    #[error("{path}: {value}: {reason}")]
    Invalid { path: String, value: String, reason: &'static str },
}

/// The reason given for any field outside the supported shape.
pub const UNSUPPORTED: &str =
    "only the local rate limit filter is supported (Istio's documented local rate limit EnvoyFilter)";

impl EnvoyFilterError {
    /// The field path, for a problem's `field`.
    pub fn field(&self) -> &str {
        match self {
            Self::Unsupported { path, .. } | Self::Missing { path } | Self::Invalid { path, .. } => path,
        }
    }

    /// The message without the path, for a problem's `reason`.
    pub fn reason(&self) -> String {
        match self {
            Self::Unsupported { found, .. } => format!("{found}: {UNSUPPORTED}"),
            Self::Missing { .. } => "required field is missing".to_string(),
            Self::Invalid { value, reason, .. } => format!("{value}: {reason}"),
        }
    }
}

type Result<T> = std::result::Result<T, EnvoyFilterError>;

fn unsupported(path: &str, found: &Value) -> EnvoyFilterError {
    EnvoyFilterError::Unsupported { path: path.to_string(), found: short(found) }
}

fn invalid(path: &str, value: &Value, reason: &'static str) -> EnvoyFilterError {
    EnvoyFilterError::Invalid { path: path.to_string(), value: short(value), reason }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 120 { format!("{}...", &s[..s.floor_char_boundary(117)]) } else { s }
}

/// A fraction of requests (Envoy's `FractionalPercent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fraction {
    pub numerator: u32,
    /// 100, 10 000 or 1 000 000.
    pub denominator: u32,
}

impl Fraction {
    pub const NONE: Fraction = Fraction { numerator: 0, denominator: 100 };
    pub const ALL: Fraction = Fraction { numerator: 100, denominator: 100 };

    /// True for a share `numerator/denominator` of the uniform `u32` rolls.
    pub fn hits(self, roll: u32) -> bool {
        ((u64::from(roll) * u64::from(self.denominator)) >> 32) < u64::from(self.numerator)
    }
}

/// The settings of one token bucket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BucketConfig {
    pub stat_prefix: String,
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    /// The share of requests the filter looks at.
    pub enabled: Fraction,
    /// The share of limited requests that are answered 429 (the rest pass, counted).
    pub enforced: Fraction,
    /// Headers added to a 429 answer.
    pub response_headers: Vec<(String, String)>,
}

/// Where a per-route limit applies (Istio's `routeConfiguration` match).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteLimit {
    /// The virtual host name (`inbound|http|9080`); `None` matches any.
    pub vhost: Option<String>,
    /// The route name; `None` (or `action: ANY`) matches any route of the host.
    pub route: Option<String>,
    pub config: BucketConfig,
}

/// The workloads an `EnvoyFilter` applies to.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Scope {
    /// `workloadSelector.labels`; empty with no target refs means every workload of
    /// the namespace (the root namespace: the whole mesh).
    pub selector: BTreeMap<String, String>,
    /// `(kind, name)` of `targetRefs`/`targetRef` (`Gateway`, `Service`).
    pub target_refs: Vec<(String, String)>,
}

/// A parsed local rate limit `EnvoyFilter`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalRateLimit {
    pub scope: Scope,
    /// `match.listener.portNumber` of the `HTTP_FILTER` patch, if any.
    pub port: Option<u16>,
    /// The filter-wide bucket (all routes without their own), if configured.
    pub filter: Option<BucketConfig>,
    pub routes: Vec<RouteLimit>,
}

impl LocalRateLimit {
    /// The bucket settings that apply to a request routed by `vhost`/`route`: the
    /// first matching per-route limit, else the filter-wide one.
    pub fn config_for(&self, vhost: &str, route: &str) -> Option<&BucketConfig> {
        self.routes
            .iter()
            .find(|r| r.vhost.as_deref().is_none_or(|v| v == vhost) && r.route.as_deref().is_none_or(|n| n == route))
            .map(|r| &r.config)
            .or(self.filter.as_ref())
    }
}

fn obj<'a>(v: &'a Value, path: &str) -> Result<&'a serde_json::Map<String, Value>> {
    v.as_object().ok_or_else(|| invalid(path, v, "is not an object"))
}

fn only(map: &serde_json::Map<String, Value>, path: &str, allowed: &[&str]) -> Result<()> {
    match map.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        Some((k, v)) => Err(unsupported(&format!("{path}.{k}"), v)),
        None => Ok(()),
    }
}

fn req<'a>(map: &'a serde_json::Map<String, Value>, path: &str, key: &str) -> Result<&'a Value> {
    map.get(key).ok_or_else(|| EnvoyFilterError::Missing { path: format!("{path}.{key}") })
}

fn string<'a>(v: &'a Value, path: &str) -> Result<&'a str> {
    v.as_str().ok_or_else(|| invalid(path, v, "is not a string"))
}

fn expect_str(map: &serde_json::Map<String, Value>, path: &str, key: &str, allowed: &[&str]) -> Result<()> {
    let p = format!("{path}.{key}");
    let v = req(map, path, key)?;
    if allowed.contains(&string(v, &p)?) { Ok(()) } else { Err(unsupported(&p, v)) }
}

/// Reads an integer given as a JSON number or a decimal string (protobuf's JSON
/// form allows both).
fn uint(v: &Value, path: &str) -> Result<u32> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    n.and_then(|n| u32::try_from(n).ok()).ok_or_else(|| invalid(path, v, "is not a non-negative 32-bit integer"))
}

/// Protobuf's JSON `Duration`: decimal seconds with an `s` suffix (`60s`, `0.5s`).
fn proto_duration(v: &Value, path: &str) -> Result<Duration> {
    let bad = || invalid(path, v, "is not a protobuf duration (seconds with an s suffix: 60s, 0.5s)");
    let s = string(v, path)?.strip_suffix('s').ok_or_else(bad)?;
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
        return Err(bad());
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let secs: u64 = whole.parse().map_err(|_| bad())?;
    let nanos: u32 = if frac.is_empty() { 0 } else { format!("{frac:0<9}").parse().map_err(|_| bad())? };
    Ok(Duration::new(secs, nanos))
}

/// Parses a local rate limit `EnvoyFilter` (the whole object or its `spec`).
pub fn parse_local_rate_limit(object: &Value) -> Result<LocalRateLimit> {
    let root = obj(object, "")?;
    if let Some(kind) = root.get("kind")
        && kind.as_str() != Some("EnvoyFilter")
    {
        return Err(invalid("kind", kind, "is not EnvoyFilter"));
    }
    let (spec_value, sp) = match root.get("spec") {
        Some(s) => (s, "spec"),
        None => (object, "spec"),
    };
    let spec = obj(spec_value, sp)?;
    only(spec, sp, &["workloadSelector", "targetRefs", "targetRef", "configPatches", "priority"])?;
    let mut scope = Scope::default();
    if let Some(ws) = spec.get("workloadSelector") {
        let p = "spec.workloadSelector";
        let ws = obj(ws, p)?;
        only(ws, p, &["labels"])?;
        if let Some(labels) = ws.get("labels") {
            for (k, v) in obj(labels, "spec.workloadSelector.labels")? {
                let value = string(v, &format!("spec.workloadSelector.labels.{k}"))?;
                scope.selector.insert(k.clone(), value.to_string());
            }
        }
    }
    let mut refs: Vec<(&Value, String)> = Vec::new();
    if let Some(r) = spec.get("targetRef") {
        refs.push((r, "spec.targetRef".into()));
    }
    if let Some(rs) = spec.get("targetRefs") {
        let list = rs.as_array().ok_or_else(|| invalid("spec.targetRefs", rs, "is not a list"))?;
        refs.extend(list.iter().enumerate().map(|(i, r)| (r, format!("spec.targetRefs[{i}]"))));
    }
    for (r, p) in refs {
        let m = obj(r, &p)?;
        only(m, &p, &["group", "kind", "name", "namespace"])?;
        let kind = string(req(m, &p, "kind")?, &format!("{p}.kind"))?;
        if kind != "Gateway" && kind != "Service" {
            return Err(invalid(&format!("{p}.kind"), &m["kind"], "is not Gateway or Service"));
        }
        let name = string(req(m, &p, "name")?, &format!("{p}.name"))?;
        scope.target_refs.push((kind.to_string(), name.to_string()));
    }
    if !scope.selector.is_empty() && !scope.target_refs.is_empty() {
        return Err(invalid(
            "spec.workloadSelector",
            spec_value.get("workloadSelector").unwrap_or(&Value::Null),
            "cannot be combined with targetRefs",
        ));
    }
    let patches = req(spec, sp, "configPatches")?;
    let patches = patches.as_array().ok_or_else(|| invalid("spec.configPatches", patches, "is not a list"))?;
    if patches.is_empty() {
        return Err(EnvoyFilterError::Missing { path: "spec.configPatches[0]".into() });
    }
    let mut out = LocalRateLimit { scope, port: None, filter: None, routes: Vec::new() };
    let mut saw_filter = false;
    for (i, patch) in patches.iter().enumerate() {
        let p = format!("spec.configPatches[{i}]");
        let m = obj(patch, &p)?;
        only(m, &p, &["applyTo", "match", "patch"])?;
        let apply_to = req(m, &p, "applyTo")?;
        let empty = serde_json::Map::new();
        let matcher = match m.get("match") {
            Some(v) => obj(v, &format!("{p}.match"))?,
            None => &empty,
        };
        let mp = format!("{p}.match");
        if let Some(c) = matcher.get("context")
            && !["SIDECAR_INBOUND", "GATEWAY", "ANY"].contains(&string(c, &format!("{mp}.context"))?)
        {
            return Err(unsupported(&format!("{mp}.context"), c));
        }
        let patch = obj(req(m, &p, "patch")?, &format!("{p}.patch"))?;
        let pp = format!("{p}.patch");
        only(patch, &pp, &["operation", "value"])?;
        let value = obj(req(patch, &pp, "value")?, &format!("{pp}.value"))?;
        let vp = format!("{pp}.value");
        match apply_to.as_str() {
            Some("HTTP_FILTER") => {
                only(matcher, &mp, &["context", "listener", "proxy"])?;
                out.port = listener_match(matcher, &mp)?;
                expect_str(patch, &pp, "operation", &["INSERT_BEFORE", "INSERT_FIRST", "ADD"])?;
                only(value, &vp, &["name", "typed_config", "typedConfig"])?;
                expect_str(value, &vp, "name", &[FILTER_NAME])?;
                let (key, tc) = match (value.get("typed_config"), value.get("typedConfig")) {
                    (Some(tc), _) => ("typed_config", tc),
                    (None, Some(tc)) => ("typedConfig", tc),
                    (None, None) => return Err(EnvoyFilterError::Missing { path: format!("{vp}.typed_config") }),
                };
                if saw_filter {
                    return Err(invalid(&p, apply_to, "a second HTTP_FILTER patch (one local rate limit filter)"));
                }
                saw_filter = true;
                out.filter = typed_config(tc, &format!("{vp}.{key}"), false)?;
            }
            Some("HTTP_ROUTE") => {
                only(matcher, &mp, &["context", "routeConfiguration", "proxy"])?;
                expect_str(patch, &pp, "operation", &["MERGE"])?;
                let (vhost, route) = route_match(matcher, &mp)?;
                only(value, &vp, &["typed_per_filter_config", "typedPerFilterConfig"])?;
                let (key, per) = match (value.get("typed_per_filter_config"), value.get("typedPerFilterConfig")) {
                    (Some(v), _) => ("typed_per_filter_config", v),
                    (None, Some(v)) => ("typedPerFilterConfig", v),
                    (None, None) => {
                        return Err(EnvoyFilterError::Missing { path: format!("{vp}.typed_per_filter_config") });
                    }
                };
                let pfp = format!("{vp}.{key}");
                let per = obj(per, &pfp)?;
                only(per, &pfp, &[FILTER_NAME])?;
                let tc = req(per, &pfp, FILTER_NAME)?;
                let config = typed_config(tc, &format!("{pfp}.{FILTER_NAME}"), true)?.ok_or_else(|| {
                    EnvoyFilterError::Missing { path: format!("{pfp}.{FILTER_NAME}.value.token_bucket") }
                })?;
                out.routes.push(RouteLimit { vhost, route, config });
            }
            _ => return Err(unsupported(&format!("{p}.applyTo"), apply_to)),
        }
    }
    if !saw_filter {
        // Envoy needs the filter in the chain for per-route settings to act.
        return Err(invalid(
            "spec.configPatches",
            &spec["configPatches"],
            "needs an HTTP_FILTER patch adding envoy.filters.http.local_ratelimit (Envoy's per-route settings act only through it)",
        ));
    }
    Ok(out)
}

fn listener_match(matcher: &serde_json::Map<String, Value>, mp: &str) -> Result<Option<u16>> {
    let Some(l) = matcher.get("listener") else { return Ok(None) };
    let lp = format!("{mp}.listener");
    let l = obj(l, &lp)?;
    only(l, &lp, &["portNumber", "filterChain"])?;
    let port = match l.get("portNumber") {
        Some(v) => Some(
            u16::try_from(uint(v, &format!("{lp}.portNumber"))?)
                .map_err(|_| invalid(&format!("{lp}.portNumber"), v, "is not a port"))?,
        ),
        None => None,
    };
    if let Some(fc) = l.get("filterChain") {
        let fcp = format!("{lp}.filterChain");
        let fc = obj(fc, &fcp)?;
        only(fc, &fcp, &["filter"])?;
        if let Some(f) = fc.get("filter") {
            let fp = format!("{fcp}.filter");
            let f = obj(f, &fp)?;
            only(f, &fp, &["name", "subFilter"])?;
            expect_str(f, &fp, "name", &["envoy.filters.network.http_connection_manager"])?;
            if let Some(sf) = f.get("subFilter") {
                let sfp = format!("{fp}.subFilter");
                let sf = obj(sf, &sfp)?;
                only(sf, &sfp, &["name"])?;
                string(req(sf, &sfp, "name")?, &format!("{sfp}.name"))?;
            }
        }
    }
    Ok(port)
}

fn route_match(matcher: &serde_json::Map<String, Value>, mp: &str) -> Result<(Option<String>, Option<String>)> {
    let rp = format!("{mp}.routeConfiguration");
    let rc = obj(req(matcher, mp, "routeConfiguration")?, &rp)?;
    only(rc, &rp, &["vhost"])?;
    let Some(vh) = rc.get("vhost") else { return Ok((None, None)) };
    let vp = format!("{rp}.vhost");
    let vh = obj(vh, &vp)?;
    only(vh, &vp, &["name", "route"])?;
    let vhost = vh.get("name").map(|n| string(n, &format!("{vp}.name")).map(str::to_string)).transpose()?;
    let route = match vh.get("route") {
        None => None,
        Some(r) => {
            let rtp = format!("{vp}.route");
            let r = obj(r, &rtp)?;
            only(r, &rtp, &["name", "action"])?;
            if let Some(a) = r.get("action")
                && a.as_str() != Some("ANY")
            {
                return Err(unsupported(&format!("{rtp}.action"), a));
            }
            r.get("name").map(|n| string(n, &format!("{rtp}.name")).map(str::to_string)).transpose()?
        }
    };
    Ok((vhost, route))
}

/// Reads a `typed_config`; `None` when it has no `token_bucket` (allowed at the
/// filter level only, `per_route` false).
fn typed_config(tc: &Value, path: &str, per_route: bool) -> Result<Option<BucketConfig>> {
    let m = obj(tc, path)?;
    let ty = string(req(m, path, "@type")?, &format!("{path}.@type"))?;
    let (settings, sp) = if TYPED_STRUCTS.contains(&ty) {
        only(m, path, &["@type", "type_url", "typeUrl", "value"])?;
        let url = m.get("type_url").or_else(|| m.get("typeUrl"));
        let url = url.ok_or_else(|| EnvoyFilterError::Missing { path: format!("{path}.type_url") })?;
        if url.as_str() != Some(LOCAL_RATE_LIMIT_TYPE) {
            return Err(unsupported(&format!("{path}.type_url"), url));
        }
        let value = req(m, path, "value")?;
        (obj(value, &format!("{path}.value"))?.clone(), format!("{path}.value"))
    } else if ty == LOCAL_RATE_LIMIT_TYPE {
        let mut direct = m.clone();
        direct.remove("@type");
        (direct, path.to_string())
    } else {
        return Err(unsupported(&format!("{path}.@type"), &m["@type"]));
    };
    settings_of(&settings, &sp, per_route)
}

fn settings_of(m: &serde_json::Map<String, Value>, path: &str, per_route: bool) -> Result<Option<BucketConfig>> {
    only(m, path, &["stat_prefix", "token_bucket", "filter_enabled", "filter_enforced", "response_headers_to_add"])?;
    let stat_prefix = string(req(m, path, "stat_prefix")?, &format!("{path}.stat_prefix"))?.to_string();
    let Some(tb) = m.get("token_bucket") else {
        if per_route {
            return Err(EnvoyFilterError::Missing { path: format!("{path}.token_bucket") });
        }
        return Ok(None);
    };
    let tp = format!("{path}.token_bucket");
    let tb = obj(tb, &tp)?;
    only(tb, &tp, &["max_tokens", "tokens_per_fill", "fill_interval"])?;
    let max_tokens = uint(req(tb, &tp, "max_tokens")?, &format!("{tp}.max_tokens"))?;
    if max_tokens == 0 {
        return Err(invalid(&format!("{tp}.max_tokens"), &tb["max_tokens"], "must be at least 1"));
    }
    let tokens_per_fill = match tb.get("tokens_per_fill") {
        Some(v) => uint(v, &format!("{tp}.tokens_per_fill"))?,
        None => 1,
    };
    if tokens_per_fill == 0 {
        return Err(invalid(&format!("{tp}.tokens_per_fill"), &tb["tokens_per_fill"], "must be at least 1"));
    }
    let fip = format!("{tp}.fill_interval");
    let fill_interval = proto_duration(req(tb, &tp, "fill_interval")?, &fip)?;
    if fill_interval < MIN_FILL_INTERVAL {
        return Err(invalid(&fip, &tb["fill_interval"], "must be at least 50ms (Envoy's minimum)"));
    }
    let enabled = fraction(m.get("filter_enabled"), &format!("{path}.filter_enabled"))?;
    let enforced = fraction(m.get("filter_enforced"), &format!("{path}.filter_enforced"))?;
    let mut response_headers = Vec::new();
    if let Some(list) = m.get("response_headers_to_add") {
        let lp = format!("{path}.response_headers_to_add");
        let list = list.as_array().ok_or_else(|| invalid(&lp, list, "is not a list"))?;
        for (i, h) in list.iter().enumerate() {
            let hp = format!("{lp}[{i}]");
            let h = obj(h, &hp)?;
            only(h, &hp, &["append", "append_action", "header", "keep_empty_value"])?;
            let kv = obj(req(h, &hp, "header")?, &format!("{hp}.header"))?;
            only(kv, &format!("{hp}.header"), &["key", "value"])?;
            let key = string(req(kv, &hp, "key")?, &format!("{hp}.header.key"))?;
            let value = kv.get("value").map_or(Ok(""), |v| string(v, &format!("{hp}.header.value")))?;
            if !is_header_name(key) {
                return Err(invalid(&format!("{hp}.header.key"), &kv["key"], "is not a header name"));
            }
            if !is_header_value(value) {
                return Err(invalid(&format!("{hp}.header.value"), &kv["value"], "is not a header value"));
            }
            response_headers.push((key.to_ascii_lowercase(), value.to_string()));
        }
    }
    Ok(Some(BucketConfig {
        stat_prefix,
        max_tokens,
        tokens_per_fill,
        fill_interval,
        enabled,
        enforced,
        response_headers,
    }))
}

/// `{runtime_key, default_value {numerator, denominator}}`; absent is 0 % (Envoy's
/// default "for safety"). The runtime key is accepted and ignored: the mesh has no
/// Envoy runtime.
fn fraction(v: Option<&Value>, path: &str) -> Result<Fraction> {
    let Some(v) = v else { return Ok(Fraction::NONE) };
    let m = obj(v, path)?;
    only(m, path, &["runtime_key", "default_value"])?;
    let dp = format!("{path}.default_value");
    let d = obj(req(m, path, "default_value")?, &dp)?;
    only(d, &dp, &["numerator", "denominator"])?;
    let numerator = d.get("numerator").map_or(Ok(0), |n| uint(n, &format!("{dp}.numerator")))?;
    let denominator = match d.get("denominator") {
        None => 100,
        Some(den) => match den.as_str() {
            Some("HUNDRED") => 100,
            Some("TEN_THOUSAND") => 10_000,
            Some("MILLION") => 1_000_000,
            _ => {
                return Err(invalid(&format!("{dp}.denominator"), den, "is not HUNDRED, TEN_THOUSAND or MILLION"));
            }
        },
    };
    // Envoy caps a numerator above its denominator at 100 %.
    Ok(Fraction { numerator: numerator.min(denominator), denominator })
}

/// An `EnvoyFilter` as written: its `spec` kept as JSON (see the module doc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnvoyFilter {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
}

impl EnvoyFilter {
    /// The typed view of the spec: the local rate limit it configures, or why it is
    /// not the one supported shape.
    pub fn local_rate_limit(&self) -> Result<LocalRateLimit> {
        parse_local_rate_limit(&serde_json::json!({ "spec": self.spec }))
    }
}

/// RFC 9110 `token`: what Envoy (and the `http` crate) accept as a header name.
fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Visible ASCII, space and tab, or bytes above 0x7f (obs-text); no CR, LF or NUL.
fn is_header_value(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

#[cfg(test)]
mod tests;
