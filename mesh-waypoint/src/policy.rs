//! Which `DestinationRule` applies to a request's destination, and the traffic policy it
//! gives one subset on one port, as typed settings the balancer, the outlier detector
//! and the circuit breaker take.
//!
//! # Lookup (Istio's `PushContext.destinationRule`, `pilot/pkg/model/push_context.go`)
//! The waypoint is the client proxy, so the "client namespace" is the waypoint's own
//! namespace (Istio's `proxy.ConfigNamespace`). In that order:
//! 1. rules in the client namespace that are visible there (`exportTo` empty, `*`, `.`
//!    or that namespace) — when the client namespace is the root namespace, only the
//!    root namespace's private rules (`exportTo: [.]`) are looked at here;
//! 2. rules in the service's namespace (the `Service`'s, or the `ServiceEntry`'s that
//!    declares the host) that are exported (not `.`-only) to the client namespace;
//! 3. rules in the root namespace exported to the client namespace.
//!
//! Within a namespace an exact host beats wildcards, and the longest matching wildcard
//! beats shorter ones (Istio's `MostSpecificHostMatch`); the visibility check is made
//! on the most specific match only, so a hidden exact rule is not replaced by a visible
//! wildcard of the same namespace. A short host (`reviews`) means `reviews.<rule's
//! namespace>.svc.cluster.local`. `exportTo: [~]` hides a rule everywhere. Several rules
//! for the same host in one namespace merge as Istio's `mergeDestinationRule` does:
//! subsets are concatenated (the first of a name wins) and the first top-level traffic
//! policy wins; "first" is configuration order, which the loader makes creation time
//! (Istio's order; objects from files have none: file order). Rules with a `workloadSelector` select client workloads' sidecars,
//! never a waypoint: they are skipped.
//!
//! # Merging (Istio's `MergeSubsetTrafficPolicy`, pilot/pkg/networking/util/util.go)
//! A `portLevelSettings` entry for the port replaces its policy's `loadBalancer`,
//! `connectionPool`, `outlierDetection` and `tls` as a whole: what the port entry omits
//! falls back to the defaults, not to the top level. The subset's policy (after its own
//! port-level step) then overrides the rule's field by field; when the subset has a
//! port-level entry for the port, all four fields come from it.
use std::{collections::BTreeMap, fmt, time::Duration};

use mesh_common::config::{
    Config, DNS_DOMAIN,
    meta::Labels,
    networking::{
        ConnectionPoolSettings, DestinationRule, LoadBalancerSettings, OutlierDetection, SimpleLb, Subset,
        TrafficPolicy,
    },
    parse_duration,
};
use serde_json::Value;

use crate::balance::locality::LocalitySetting;

/// The traffic policy of one destination (host, subset, port), ready to use.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// The rule that applied, if any (none: Istio's defaults everywhere).
    pub rule: Option<RuleRef>,
    /// The subset's label selector; empty selects every endpoint of the host.
    pub labels: Labels,
    pub lb: LbPolicy,
    /// `localityLbSetting`; `None` when disabled (`enabled: false`). Unset is Istio's
    /// mesh default, enabled with no `distribute` or `failover` (the mesh config's own
    /// `localityLbSetting` is not modelled).
    pub locality: Option<LocalitySetting>,
    pub limits: Limits,
    /// `None`: no `outlierDetection`, nothing is ever ejected.
    pub outlier: Option<OutlierConfig>,
    /// Settings that could not be interpreted and were replaced by their defaults (the
    /// shared validation leaves `consistentHash` untyped); for the log, not for failing.
    pub problems: Vec<Invalid>,
}

/// `namespace/name` of a `DestinationRule`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A route named a subset that no applicable `DestinationRule` defines: the proxy answers
/// 503 with flag `NR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub host: String,
    pub subset: String,
    /// The rule that applied but lacks the subset (`None`: no rule applied at all).
    pub rule: Option<RuleRef>,
    /// The namespaces searched, in lookup order.
    pub searched: Vec<String>,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(rule) => {
                write!(f, "subset `{}` of host `{}` is not defined in DestinationRule {rule}", self.subset, self.host)
            }
            None => write!(
                f,
                "subset `{}` of host `{}`: no DestinationRule for the host in namespaces {}",
                self.subset,
                self.host,
                self.searched.join(", ")
            ),
        }
    }
}

impl std::error::Error for Missing {}

/// A setting that could not be interpreted: `field` is the path in the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub rule: RuleRef,
    pub field: String,
    pub reason: String,
}

/// The load-balancing algorithm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    /// Envoy's `LEAST_REQUEST` with equal weights: the less busy of two random choices.
    /// Istio's default when nothing is set (`defaultLBAlgorithm`), and what `LEAST_CONN`
    /// (deprecated) means.
    LeastRequest,
    Random,
    ConsistentHash(ConsistentHash),
}

/// `consistentHash`: what to hash and how to map hashes to endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsistentHash {
    pub key: HashKey,
    pub algo: HashAlgo,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// `httpHeaderName` (lower-cased).
    Header(http::HeaderName),
    /// `httpCookie`; with a `ttl`, a missing cookie is generated (`Some(ZERO)`: a session
    /// cookie without `Max-Age`), as Envoy does.
    Cookie { name: String, path: Option<String>, ttl: Option<Duration> },
    /// `useSourceIp`.
    SourceIp,
    /// `httpQueryParameterName`.
    QueryParam(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlgo {
    /// Envoy's ring hash (`ringHash.minimumRingSize`, default 1024).
    RingHash { min_ring_size: u64 },
    /// Envoy's Maglev (`maglev.tableSize`, a prime, default 65537).
    Maglev { table_size: u64 },
}

/// Envoy's default minimum ring size (Istio sets it too when `consistentHash` names none).
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;
/// Envoy's default Maglev table size.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;
/// The largest ring and table Envoy accepts (`minimum_ring_size`, Maglev's
/// `table_size`): a `DestinationRule` cannot make the waypoint build a table of
/// gigabytes on its request path.
pub const MAX_RING_SIZE: u64 = 8_388_608;
pub const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;

/// `connectionPool`, with Istio's defaults: Istio programs Envoy's circuit-breaker
/// thresholds as `2^32-1` ("unlimited", `getDefaultCircuitBreakerThresholds`) rather than
/// Envoy's own 1024/1024/1024/3, so an unset or zero limit is `u32::MAX` here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `tcp.maxConnections`: connections to all endpoints of the destination.
    pub max_connections: u32,
    /// `tcp.connectTimeout`; unset, the waypoint's own (`--connect-timeout-ms`, Istio's
    /// mesh default 10 s).
    pub connect_timeout: Option<Duration>,
    /// `tcp.maxConnectionDuration` (unset: none).
    pub max_connection_duration: Option<Duration>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    pub max_pending_requests: u32,
    /// `http.http2MaxRequests`: requests in flight to the destination.
    pub max_requests: u32,
    /// `http.maxRequestsPerConnection` (`None`: unlimited, Istio's 0).
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: retries in flight to the destination.
    pub max_retries: u32,
    /// `http.idleTimeout` (else `tcp.idleTimeout`), default 1 h as Istio documents;
    /// `Duration::MAX` for 0 (none).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: u32::MAX,
            connect_timeout: None,
            max_connection_duration: None,
            max_pending_requests: u32::MAX,
            max_requests: u32::MAX,
            max_requests_per_connection: None,
            max_retries: u32::MAX,
            idle_timeout: Duration::from_hours(1),
        }
    }
}

/// `outlierDetection` as Istio programs Envoy (`applyOutlierDetection`): success-rate
/// ejection off; `consecutive5xxErrors` unset keeps Envoy's 5, 0 disables it;
/// `consecutiveGatewayErrors` is off unless set above 0 (Envoy enforces it at 0 % by
/// default); local-origin failures count on their own only with
/// `splitExternalLocalOriginErrors`, else they count as 503s; `minHealthPercent` is
/// Istio's panic threshold, 0 (never panic) unless set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierConfig {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub split_local_origin: bool,
    pub consecutive_local_origin: Option<u32>,
    /// How often the proxy should call [`crate::outlier::Outliers::sweep`] (default 10 s).
    pub interval: Duration,
    /// Default 30 s; an endpoint stays out `base x times ejected`, at most `max`.
    pub base_ejection_time: Duration,
    /// Envoy's `max_ejection_time` (Istio does not set it): 300 s, or the base if larger.
    pub max_ejection_time: Duration,
    /// Default 10.
    pub max_ejection_percent: u32,
    /// Default 0.
    pub min_health_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_5xx: Some(5),
            consecutive_gateway: None,
            split_local_origin: false,
            consecutive_local_origin: None,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_mins(5),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

impl Resolved {
    /// The policy for `host` (a fully qualified name such as
    /// `reviews.shop.svc.cluster.local`) seen from `client_namespace` (the waypoint's
    /// namespace), for `subset` (if the route names one) and the service `port`.
    pub fn for_destination(
        config: &Config,
        host: &str,
        client_namespace: &str,
        subset: Option<&str>,
        port: u16,
    ) -> Result<Resolved, Missing> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let found = find_rule(config, host, client_namespace);
        let rule_ref = found.rule.as_ref().map(|r| r.rule_ref.clone());
        let subset = match subset {
            None => None,
            Some(name) => match found.rule.as_ref().and_then(|r| r.subsets.iter().find(|s| s.name == name)) {
                Some(s) => Some(*s),
                None => {
                    return Err(Missing {
                        host: host.to_string(),
                        subset: name.to_string(),
                        rule: rule_ref,
                        searched: found.searched,
                    });
                }
            },
        };
        let top = found.rule.as_ref().and_then(|r| r.traffic_policy);
        let parts = merge(top, subset.and_then(|s| s.traffic_policy.as_ref()), port);
        let mut problems = Vec::new();
        let rule_for_problems = rule_ref.clone().unwrap_or(RuleRef { namespace: String::new(), name: String::new() });
        let mut note = |field: &str, reason: String| {
            problems.push(Invalid { rule: rule_for_problems.clone(), field: field.to_string(), reason });
        };
        let lb = lb_policy(parts.lb, &mut note);
        let limits = limits(parts.pool, &mut note);
        let outlier = parts.outlier.map(|od| outlier_config(od, &mut note));
        let locality = match parts.lb.and_then(|lb| lb.locality_lb_setting.as_ref()) {
            None => Some(LocalitySetting::default()),
            Some(v) => LocalitySetting::from_istio(v).unwrap_or_else(|(field, reason)| {
                note(&format!("loadBalancer.localityLbSetting{field}"), reason);
                Some(LocalitySetting::default())
            }),
        };
        Ok(Resolved {
            rule: rule_ref,
            labels: subset.map(|s| s.labels.clone()).unwrap_or_default(),
            lb,
            locality,
            limits,
            outlier,
            problems,
        })
    }
}

/// The rule (merged over its namespace) that applies, and where it was looked for.
struct Found<'a> {
    rule: Option<MergedRule<'a>>,
    searched: Vec<String>,
}

struct MergedRule<'a> {
    rule_ref: RuleRef,
    subsets: Vec<&'a Subset>,
    traffic_policy: Option<&'a TrafficPolicy>,
}

fn find_rule<'a>(config: &'a Config, host: &str, client_ns: &str) -> Found<'a> {
    let root = config.root_namespace.as_str();
    let service_ns = service_namespace(config, host);
    let mut searched = vec![client_ns.to_string()];
    let in_ns = |ns: &str| -> Vec<&'a DestinationRule> {
        config.destination_rules.iter().filter(|dr| dr.metadata.namespace == ns).collect()
    };

    // 1. The client's namespace.
    let local: Vec<&DestinationRule> = if client_ns == root {
        in_ns(root).into_iter().filter(|dr| private_only(dr)).collect()
    } else {
        in_ns(client_ns).into_iter().filter(|dr| visible_in_own_namespace(dr)).collect()
    };
    if let Some(rule) = most_specific(&local, host) {
        return Found { rule: Some(rule), searched };
    }
    // 2. The service's namespace, then 3. the root namespace: exported rules only.
    // A namespace is searched for exported rules once; the client's own namespace was
    // searched whole already, except the root namespace (only its private rules were).
    let mut exported_searched: Vec<&str> = Vec::new();
    for ns in service_ns.into_iter().chain([root]) {
        if exported_searched.contains(&ns) || (ns == client_ns && client_ns != root) {
            continue;
        }
        exported_searched.push(ns);
        if !searched.iter().any(|s| s == ns) {
            searched.push(ns.to_string());
        }
        let exported: Vec<&DestinationRule> = in_ns(ns).into_iter().filter(|dr| !private_only(dr)).collect();
        let Some(host_of_match) = most_specific_host(&exported, host) else { continue };
        let visible: Vec<&DestinationRule> = exported
            .iter()
            .copied()
            .filter(|dr| rule_host(dr) == host_of_match && exported_to(dr, client_ns))
            .collect();
        if let Some(rule) = merged(&visible) {
            return Found { rule: Some(rule), searched };
        }
    }
    Found { rule: None, searched }
}

/// The namespace of the service that owns `host`: a Kubernetes `Service` named by it,
/// else the `ServiceEntry` that declares it, else the `<ns>` of `<name>.<ns>.svc.<domain>`.
fn service_namespace<'a>(config: &'a Config, host: &'a str) -> Option<&'a str> {
    if let Some(svc) = config.services.iter().find(|s| {
        host.strip_prefix(s.metadata.name.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.strip_prefix(s.metadata.namespace.as_str()))
            .is_some_and(|rest| rest == format!(".svc.{DNS_DOMAIN}"))
    }) {
        return Some(svc.metadata.namespace.as_str());
    }
    if let Some(se) = config.service_entries.iter().find(|se| se.spec.hosts.iter().any(|h| h == host)) {
        return Some(se.metadata.namespace.as_str());
    }
    let rest = host.strip_suffix(DNS_DOMAIN)?.strip_suffix(".svc.")?;
    let (_, ns) = rest.rsplit_once('.')?;
    Some(ns)
}

fn rule_host(dr: &DestinationRule) -> String {
    fqdn(&dr.spec.host, &dr.metadata.namespace)
}

/// Istio's `ResolveShortnameToFQDN`: a host without a dot (and not a wildcard) is a
/// service of the rule's namespace.
fn fqdn(host: &str, ns: &str) -> String {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.contains('.') || host.contains('*') { host.to_string() } else { format!("{host}.{ns}.svc.{DNS_DOMAIN}") }
}

fn visible_in_own_namespace(dr: &DestinationRule) -> bool {
    let e = &dr.spec.export_to;
    dr.spec.workload_selector.is_none()
        && (e.is_empty() || e.iter().any(|t| t == "*" || t == "." || *t == dr.metadata.namespace))
}

/// `exportTo` naming only the rule's own namespace (`.` or its name).
fn private_only(dr: &DestinationRule) -> bool {
    let e = &dr.spec.export_to;
    dr.spec.workload_selector.is_some() || (e.len() == 1 && (e[0] == "." || e[0] == dr.metadata.namespace))
}

fn exported_to(dr: &DestinationRule, client_ns: &str) -> bool {
    let e = &dr.spec.export_to;
    dr.spec.workload_selector.is_none() && (e.is_empty() || e.iter().any(|t| t == "*" || t == client_ns))
}

/// Does the rule host `pattern` (an FQDN or `*.suffix` or `*`) cover `host`?
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// The most specific rule host among `rules` that covers `host`: the exact host, else
/// the longest wildcard.
fn most_specific_host(rules: &[&DestinationRule], host: &str) -> Option<String> {
    let hosts = rules.iter().map(|dr| rule_host(dr));
    let mut best: Option<String> = None;
    for candidate in hosts {
        if candidate == host {
            return Some(candidate);
        }
        if host_matches(&candidate, host) && best.as_ref().is_none_or(|b| candidate.len() > b.len()) {
            best = Some(candidate);
        }
    }
    best
}

fn most_specific<'a>(rules: &[&'a DestinationRule], host: &str) -> Option<MergedRule<'a>> {
    let chosen = most_specific_host(rules, host)?;
    let same: Vec<&DestinationRule> = rules.iter().copied().filter(|dr| rule_host(dr) == chosen).collect();
    merged(&same)
}

/// Istio's `mergeDestinationRule` over rules of one host in one namespace.
fn merged<'a>(rules: &[&'a DestinationRule]) -> Option<MergedRule<'a>> {
    let first = rules.first()?;
    let mut subsets: Vec<&Subset> = Vec::new();
    let mut traffic_policy = None;
    for dr in rules {
        for subset in &dr.spec.subsets {
            if !subsets.iter().any(|s| s.name == subset.name) {
                subsets.push(subset);
            }
        }
        if traffic_policy.is_none() {
            traffic_policy = dr.spec.traffic_policy.as_ref();
        }
    }
    Some(MergedRule {
        rule_ref: RuleRef { namespace: first.metadata.namespace.clone(), name: first.metadata.name.clone() },
        subsets,
        traffic_policy,
    })
}

/// The three parts of a traffic policy the waypoint uses.
#[derive(Clone, Copy, Default)]
struct Parts<'a> {
    lb: Option<&'a LoadBalancerSettings>,
    pool: Option<&'a ConnectionPoolSettings>,
    outlier: Option<&'a OutlierDetection>,
}

/// Istio's `GetPortLevelTrafficPolicy`: the port's entry replaces the policy whole.
fn for_port(policy: Option<&TrafficPolicy>, port: u16) -> (Option<Parts<'_>>, bool) {
    let Some(policy) = policy else { return (None, false) };
    match policy.port_level_settings.iter().find(|p| p.port.as_ref().is_some_and(|p| p.number == u32::from(port))) {
        Some(p) => (
            Some(Parts {
                lb: p.load_balancer.as_ref(),
                pool: p.connection_pool.as_ref(),
                outlier: p.outlier_detection.as_ref(),
            }),
            true,
        ),
        None => (
            Some(Parts {
                lb: policy.load_balancer.as_ref(),
                pool: policy.connection_pool.as_ref(),
                outlier: policy.outlier_detection.as_ref(),
            }),
            false,
        ),
    }
}

/// Istio's `MergeSubsetTrafficPolicy`.
fn merge<'a>(top: Option<&'a TrafficPolicy>, subset: Option<&'a TrafficPolicy>, port: u16) -> Parts<'a> {
    let (original, _) = for_port(top, port);
    let (sub, sub_has_port) = for_port(subset, port);
    match (original, sub) {
        (original, None) => original.unwrap_or_default(),
        (None, Some(sub)) => sub,
        (Some(orig), Some(sub)) => Parts {
            lb: if sub.lb.is_some() || sub_has_port { sub.lb } else { orig.lb },
            pool: if sub.pool.is_some() || sub_has_port { sub.pool } else { orig.pool },
            outlier: if sub.outlier.is_some() || sub_has_port { sub.outlier } else { orig.outlier },
        },
    }
}

type Note<'n> = dyn FnMut(&str, String) + 'n;

fn lb_policy(lb: Option<&LoadBalancerSettings>, note: &mut Note<'_>) -> LbPolicy {
    let Some(lb) = lb else { return LbPolicy::LeastRequest };
    if let Some(hash) = &lb.consistent_hash {
        match consistent_hash(hash) {
            Ok(ch) => return LbPolicy::ConsistentHash(ch),
            Err((field, reason)) => {
                note(&format!("loadBalancer.consistentHash{field}"), reason);
                return LbPolicy::LeastRequest;
            }
        }
    }
    match lb.simple.unwrap_or_default() {
        SimpleLb::Unspecified | SimpleLb::LeastConn | SimpleLb::LeastRequest => LbPolicy::LeastRequest,
        SimpleLb::Random => LbPolicy::Random,
        // PASSTHROUGH is Envoy's ORIGINAL_DST: forward to the address the client dialled.
        // A waypoint is dialled at the Service VIP, which has no endpoint of its own, so it
        // balances over the Service's endpoints instead.
        SimpleLb::RoundRobin | SimpleLb::Passthrough => LbPolicy::RoundRobin,
    }
}

type FieldError = (String, String);

/// Interprets Istio's `ConsistentHashLB` (the shared model keeps it as JSON).
pub fn consistent_hash(value: &Value) -> Result<ConsistentHash, FieldError> {
    let err = |field: &str, reason: &str| (field.to_string(), reason.to_string());
    let Value::Object(map) = value else { return Err(err("", "not an object")) };
    let mut keys = Vec::new();
    for (name, v) in map {
        let key = match name.as_str() {
            "httpHeaderName" => {
                let name = v.as_str().ok_or_else(|| err(".httpHeaderName", "not a string"))?;
                let header = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| err(".httpHeaderName", "not a header name"))?;
                Some(HashKey::Header(header))
            }
            "httpCookie" => Some(cookie(v)?),
            "useSourceIp" => match v.as_bool() {
                Some(true) => Some(HashKey::SourceIp),
                Some(false) => None,
                None => return Err(err(".useSourceIp", "not a boolean")),
            },
            "httpQueryParameterName" => {
                let name = v.as_str().filter(|s| !s.is_empty());
                Some(HashKey::QueryParam(
                    name.ok_or_else(|| err(".httpQueryParameterName", "not a non-empty string"))?.to_string(),
                ))
            }
            "ringHash" | "maglev" | "minimumRingSize" => None,
            other => return Err(err(&format!(".{other}"), "unknown field")),
        };
        keys.extend(key);
    }
    let key = match keys.len() {
        1 => keys.pop().expect("one key"),
        0 => {
            return Err(err("", "names no hash key (httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName)"));
        }
        _ => return Err(err("", "names more than one hash key")),
    };
    let size = |v: &Value, field: &str| -> Result<Option<u64>, FieldError> {
        match v {
            Value::Null => Ok(None),
            Value::Number(n) => n.as_u64().map(|n| (n > 0).then_some(n)).ok_or_else(|| err(field, "not a count")),
            // proto3 JSON writes uint64 as a string.
            Value::String(s) => s.parse::<u64>().map(|n| (n > 0).then_some(n)).map_err(|_| err(field, "not a count")),
            _ => Err(err(field, "not a count")),
        }
    };
    let ring_size = |v: Option<&Value>, field: &str| -> Result<u64, FieldError> {
        let n = size(v.unwrap_or(&Value::Null), field)?.unwrap_or(DEFAULT_MIN_RING_SIZE);
        if n > MAX_RING_SIZE {
            return Err(err(field, "must be at most 8388608 (Envoy's limit)"));
        }
        Ok(n)
    };
    let algo = match (map.get("maglev"), map.get("ringHash")) {
        (Some(_), Some(_)) => return Err(err("", "ringHash and maglev are mutually exclusive")),
        (Some(m), None) => {
            let table_size = size(m.get("tableSize").unwrap_or(&Value::Null), ".maglev.tableSize")?
                .unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE);
            if table_size > MAX_MAGLEV_TABLE_SIZE {
                return Err(err(".maglev.tableSize", "must be at most 5000011 (Envoy's limit)"));
            }
            if !is_prime(table_size) {
                return Err(err(".maglev.tableSize", "must be a prime number (Envoy's rule)"));
            }
            HashAlgo::Maglev { table_size }
        }
        (None, Some(r)) => {
            HashAlgo::RingHash { min_ring_size: ring_size(r.get("minimumRingSize"), ".ringHash.minimumRingSize")? }
        }
        (None, None) => {
            HashAlgo::RingHash { min_ring_size: ring_size(map.get("minimumRingSize"), ".minimumRingSize")? }
        }
    };
    Ok(ConsistentHash { key, algo })
}

fn cookie(v: &Value) -> Result<HashKey, FieldError> {
    let err = |field: &str, reason: &str| (format!(".httpCookie{field}"), reason.to_string());
    let Value::Object(c) = v else { return Err(err("", "not an object")) };
    let name =
        c.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()).ok_or_else(|| err(".name", "required"))?;
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
        return Err(err(".name", "not a cookie name (an HTTP token)"));
    }
    let path = match c.get("path") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if p.is_empty() => None,
        Some(Value::String(p)) if p.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b';') => Some(p.clone()),
        Some(_) => return Err(err(".path", "not a cookie path")),
    };
    let ttl = match c.get("ttl") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(parse_duration(t).map_err(|e| err(".ttl", &e.to_string()))?),
        Some(_) => return Err(err(".ttl", "not a duration")),
    };
    Ok(HashKey::Cookie { name: name.to_string(), path, ttl })
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d <= n / d {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// A positive count, or the default for unset and 0 (Istio treats 0 as unset).
fn count(value: Option<u32>, default: u32) -> u32 {
    value.filter(|v| *v > 0).unwrap_or(default)
}

fn duration(value: Option<&String>, default: Duration, field: &str, note: &mut Note<'_>) -> Duration {
    match value.map(|v| parse_duration(v)) {
        None => default,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            note(field, e.to_string());
            default
        }
    }
}

fn limits(pool: Option<&ConnectionPoolSettings>, note: &mut Note<'_>) -> Limits {
    let mut out = Limits::default();
    let Some(pool) = pool else { return out };
    if let Some(tcp) = &pool.tcp {
        out.max_connections = count(tcp.max_connections, out.max_connections);
        out.connect_timeout = tcp
            .connect_timeout
            .as_ref()
            .map(|d| duration(Some(d), Duration::ZERO, "connectionPool.tcp.connectTimeout", note))
            .filter(|d| !d.is_zero());
        out.max_connection_duration = tcp
            .max_connection_duration
            .as_ref()
            .map(|d| duration(Some(d), Duration::ZERO, "connectionPool.tcp.maxConnectionDuration", note))
            .filter(|d| !d.is_zero());
        out.idle_timeout =
            duration(tcp.idle_timeout.as_ref(), out.idle_timeout, "connectionPool.tcp.idleTimeout", note);
    }
    if let Some(h) = &pool.http {
        out.max_pending_requests = count(h.http1_max_pending_requests, out.max_pending_requests);
        out.max_requests = count(h.http2_max_requests, out.max_requests);
        out.max_requests_per_connection = h.max_requests_per_connection.filter(|v| *v > 0);
        out.max_retries = count(h.max_retries, out.max_retries);
        // The HTTP idle timeout wins over the TCP one (Istio applies it after).
        out.idle_timeout = duration(h.idle_timeout.as_ref(), out.idle_timeout, "connectionPool.http.idleTimeout", note);
    }
    if out.idle_timeout.is_zero() {
        // 0 disables the idle timeout, as in Envoy (it does not mean "never reuse").
        out.idle_timeout = Duration::MAX;
    }
    out
}

fn outlier_config(od: &OutlierDetection, note: &mut Note<'_>) -> OutlierConfig {
    let mut out = OutlierConfig::default();
    // The deprecated `consecutiveErrors` counts gateway errors and turns the 5xx
    // counter off, as Istio maps it; the fields that replaced it win when also set.
    if let Some(v) = od.consecutive_errors.filter(|v| *v > 0) {
        out.consecutive_gateway = Some(v);
        out.consecutive_5xx = None;
    }
    if let Some(v) = od.consecutive_5xx_errors {
        out.consecutive_5xx = (v > 0).then_some(v);
    }
    if let Some(v) = od.consecutive_gateway_errors {
        out.consecutive_gateway = (v > 0).then_some(v);
    }
    out.split_local_origin = od.split_external_local_origin_errors.unwrap_or(false);
    if out.split_local_origin {
        out.consecutive_local_origin = od.consecutive_local_origin_failures.filter(|v| *v > 0);
    }
    out.interval = duration(od.interval.as_ref(), out.interval, "outlierDetection.interval", note);
    out.base_ejection_time =
        duration(od.base_ejection_time.as_ref(), out.base_ejection_time, "outlierDetection.baseEjectionTime", note);
    out.max_ejection_time = out.max_ejection_time.max(out.base_ejection_time);
    if let Some(p) = od.max_ejection_percent.filter(|p| *p > 0) {
        out.max_ejection_percent = p.clamp(0, 100) as u32;
    }
    if let Some(p) = od.min_health_percent {
        out.min_health_percent = p.clamp(0, 100) as u32;
    }
    out
}

/// A subset selector matches an endpoint when every label it names has the same value.
pub fn selects(selector: &Labels, endpoint_labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| endpoint_labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests;
