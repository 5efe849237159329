//! Checks of the `networking.istio.io` kinds, and the one cross-object check: a route
//! to a subset needs a `DestinationRule` of that host that defines the subset.
use std::{
    collections::{BTreeMap, BTreeSet},
    prelude::rust_2024::*,
};

use super::Obj;
use crate::config::{
    DNS_DOMAIN,
    networking::{
        ClientTlsSettings, ConnectionPoolSettings, Destination, DestinationRule, HttpRule, IstioGateway,
        LoadBalancerSettings, OutlierDetection, Resolution, RouteDestination, ServiceEntry, StringMatch, TlsMode,
        TrafficPolicy, VirtualService, WorkloadEntry, WorkloadEntrySpec,
    },
    parse::Loaded,
    values,
};

/// A host as Istio resolves it for a rule in namespace `ns`: a short name (no dot) is
/// `name.ns.svc.cluster.local`; anything else stays as written.
pub(crate) fn fqdn(host: &str, ns: &str) -> String {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.contains('.') || host.contains('*') { host.to_string() } else { format!("{host}.{ns}.svc.{DNS_DOMAIN}") }
}

/// The subsets each host's `DestinationRule`s define, and which rules those are.
pub(super) struct SubsetIndex {
    exact: BTreeMap<String, Rules>,
    /// `*.example.com` rules, as (`.example.com`, rules); `*` alone is (`""`, rules).
    wildcard: Vec<(String, Rules)>,
    /// Hosts of rules that could not be decoded: their subsets are unknown.
    broken: BTreeSet<String>,
    /// How many rules were looked through, for the messages.
    count: usize,
}

#[derive(Default)]
struct Rules {
    subsets: BTreeSet<String>,
    /// `namespace/name` of each rule.
    names: Vec<String>,
}

enum Lookup<'a> {
    Defined { subsets: BTreeSet<&'a str>, rules: Vec<&'a str> },
    NoRule,
    Unknown,
}

impl SubsetIndex {
    pub(super) fn new(loaded: &Loaded) -> Self {
        let rules = &loaded.config.destination_rules;
        let mut index =
            Self { exact: BTreeMap::new(), wildcard: Vec::new(), broken: BTreeSet::new(), count: rules.len() };
        for dr in rules {
            let host = fqdn(&dr.spec.host, &dr.metadata.namespace);
            let name = format!("{}/{}", dr.metadata.namespace, dr.metadata.name);
            let entry = if let Some(suffix) = host.strip_prefix('*') {
                index.wildcard.push((suffix.to_string(), Rules::default()));
                &mut index.wildcard.last_mut().expect("just pushed").1
            } else {
                index.exact.entry(host).or_default()
            };
            entry.subsets.extend(dr.spec.subsets.iter().map(|s| s.name.clone()));
            entry.names.push(name);
        }
        for (ns, host) in &loaded.broken_destination_rules {
            index.broken.insert(fqdn(host, ns));
        }
        index
    }

    fn lookup(&self, host: &str) -> Lookup<'_> {
        if self.broken.contains(host) {
            return Lookup::Unknown;
        }
        let matching = self
            .exact
            .get(host)
            .into_iter()
            .chain(self.wildcard.iter().filter(|(suffix, _)| host.ends_with(suffix.as_str())).map(|(_, r)| r));
        let mut found = false;
        let (mut subsets, mut rules) = (BTreeSet::new(), Vec::new());
        for r in matching {
            found = true;
            subsets.extend(r.subsets.iter().map(String::as_str));
            rules.extend(r.names.iter().map(String::as_str));
        }
        if found { Lookup::Defined { subsets, rules } } else { Lookup::NoRule }
    }
}

pub(super) fn virtual_service(o: &mut Obj, vs: &VirtualService, subsets: &SubsetIndex) {
    let spec = &vs.spec;
    // No hosts: a delegate, included by a root VirtualService's `http[].delegate`.
    let delegate = spec.hosts.is_empty();
    if delegate {
        if !spec.gateways.is_empty() {
            o.err("spec.gateways", "a delegate VirtualService (no hosts) must not name gateways");
        }
        if !spec.tcp.is_empty() {
            o.err("spec.tcp", "a delegate VirtualService (no hosts) must not have tcp routes");
        }
        if !spec.tls.is_empty() {
            o.err("spec.tls", "a delegate VirtualService (no hosts) must not have tls routes");
        }
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        o.err("spec", "a VirtualService needs http, tcp or tls routes");
    }
    let mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
    for (i, host) in spec.hosts.iter().enumerate() {
        o.host(&format!("spec.hosts[{i}]"), host);
        if host == "*" && mesh {
            o.err(format!("spec.hosts[{i}]"), "host `*` is not allowed for rules that apply to the mesh");
        }
    }
    // Istio: `*.example.com` next to `api.example.com` (or the same host twice) is a duplicate.
    if spec.hosts.iter().all(|h| values::host_error(h).is_none()) {
        for (i, a) in spec.hosts.iter().enumerate() {
            for b in &spec.hosts[i + 1..] {
                if values::hosts_overlap(a, b) {
                    o.err("spec.hosts", format!("duplicate hosts: `{a}` and `{b}` overlap"));
                }
            }
        }
    }
    for (i, gateway) in spec.gateways.iter().enumerate() {
        let name = gateway.split_once('/').map_or(gateway.as_str(), |(ns, name)| {
            if !values::is_dns_label(ns) {
                o.err(format!("spec.gateways[{i}]"), format!("`{ns}` is not a namespace name"));
            }
            name
        });
        if gateway != "mesh" && !values::is_dns_subdomain(name) {
            o.err(format!("spec.gateways[{i}]"), format!("`{gateway}` is not `mesh` nor a Gateway name"));
        }
    }
    o.export_to("spec.exportTo", &spec.export_to);
    for (i, rule) in spec.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        if delegate && rule.delegate.is_some() {
            o.err(format!("{field}.delegate"), "a delegate VirtualService must not delegate again");
        }
        http_rule(o, &field, rule, subsets);
    }
    for (i, rule) in spec.tcp.iter().enumerate() {
        let field = format!("spec.tcp[{i}]");
        for (j, m) in rule.match_.iter().enumerate() {
            let field = format!("{field}.match[{j}]");
            for (k, subnet) in m.destination_subnets.iter().enumerate() {
                o.ip_or_cidr(&format!("{field}.destinationSubnets[{k}]"), subnet);
            }
            if let Some(subnet) = &m.source_subnet {
                o.ip_or_cidr(&format!("{field}.sourceSubnet"), subnet);
            }
            if let Some(port) = m.port {
                o.port(&format!("{field}.port"), port);
            }
            o.labels(&format!("{field}.sourceLabels"), &m.source_labels);
        }
        route_destinations(o, &format!("{field}.route"), &rule.route, subsets);
    }
    for (i, rule) in spec.tls.iter().enumerate() {
        let field = format!("spec.tls[{i}]");
        if rule.match_.is_empty() {
            o.err(format!("{field}.match"), "a TLS route needs at least one match");
        }
        for (j, m) in rule.match_.iter().enumerate() {
            let field = format!("{field}.match[{j}]");
            if m.sni_hosts.is_empty() {
                o.err(format!("{field}.sniHosts"), "a TLS match needs at least one SNI host");
            }
            for (k, host) in m.sni_hosts.iter().enumerate() {
                o.host(&format!("{field}.sniHosts[{k}]"), host);
            }
            for (k, subnet) in m.destination_subnets.iter().enumerate() {
                o.ip_or_cidr(&format!("{field}.destinationSubnets[{k}]"), subnet);
            }
            if let Some(port) = m.port {
                o.port(&format!("{field}.port"), port);
            }
            o.labels(&format!("{field}.sourceLabels"), &m.source_labels);
        }
        route_destinations(o, &format!("{field}.route"), &rule.route, subsets);
    }
}

fn route_destinations(o: &mut Obj, field: &str, route: &[RouteDestination], subsets: &SubsetIndex) {
    if route.is_empty() {
        o.err(field, "at least one route destination is required");
    }
    for (k, r) in route.iter().enumerate() {
        destination(o, &format!("{field}[{k}].destination"), &r.destination, subsets);
    }
    weights(o, field, &route.iter().map(|r| r.weight).collect::<Vec<_>>());
}

/// Each weight within 0..=100; with more than one destination they add up to 100
/// (a single destination may leave its weight out).
/// Weights are relative (`weight / sum`), as in Istio: any non-negative 32-bit value;
/// the data plane normalizes. Several destinations must not all weigh 0.
fn weights(o: &mut Obj, field: &str, weights: &[i64]) {
    for (k, weight) in weights.iter().enumerate() {
        if *weight < 0 {
            o.err(format!("{field}[{k}].weight"), format!("weight {weight} is negative"));
        } else if *weight > i64::from(i32::MAX) {
            o.err(format!("{field}[{k}].weight"), format!("weight {weight} is above {}", i32::MAX));
        }
    }
    if weights.len() > 1 && weights.iter().all(|w| *w == 0) {
        o.err(field, format!("the {} destinations all have weight 0", weights.len()));
    }
}

fn destination(o: &mut Obj, field: &str, d: &Destination, subsets: &SubsetIndex) {
    if d.host.is_empty() {
        o.err(format!("{field}.host"), "must not be empty");
    } else {
        o.host(&format!("{field}.host"), &d.host);
    }
    if let Some(port) = &d.port {
        o.port(&format!("{field}.port.number"), port.number);
    }
    let Some(subset) = &d.subset else { return };
    if !values::is_dns_label(subset) {
        return o.err(format!("{field}.subset"), format!("`{subset}` is not a valid subset name"));
    }
    if d.host.is_empty() {
        return;
    }
    let host = fqdn(&d.host, &o.namespace);
    // A reference to another object, which may be in another file or not applied yet:
    // Istio admits it and `istioctl analyze` warns (IST0101); requests get 503 (NR).
    let consequence = "until it is defined, requests routed to it get 503 (response flag NR)";
    match subsets.lookup(&host) {
        Lookup::NoRule => {
            let n = subsets.count;
            let looked = match n {
                0 => "no DestinationRule was loaded".to_string(),
                1 => "looked through the 1 DestinationRule loaded, by exact and wildcard host".to_string(),
                n => format!("looked through the {n} DestinationRules loaded, by exact and wildcard host"),
            };
            o.warn(
                format!("{field}.subset"),
                format!(
                    "subset `{subset}` is not defined: no DestinationRule for host `{host}` ({looked}); {consequence}"
                ),
            );
        }
        Lookup::Defined { subsets: defined, rules } if !defined.contains(subset.as_str()) => {
            let defined: Vec<&str> = defined.into_iter().collect();
            let defined = if defined.is_empty() { "none".to_string() } else { defined.join(", ") };
            o.warn(
                format!("{field}.subset"),
                format!(
                    "subset `{subset}` is not defined in the DestinationRules for host `{host}` ({}; defined: {defined}); {consequence}",
                    rules.join(", ")
                ),
            );
        }
        Lookup::Defined { .. } | Lookup::Unknown => {}
    }
}

fn string_match(o: &mut Obj, field: &str, m: &StringMatch, required: bool) {
    let set = [&m.exact, &m.prefix, &m.regex].iter().filter(|v| v.is_some()).count();
    if set > 1 {
        o.err(field, "set only one of exact, prefix, regex");
    } else if set == 0 && required {
        o.err(field, "set one of exact, prefix, regex");
    }
    match m.regex.as_deref() {
        Some("") => o.err(format!("{field}.regex"), "must not be empty"),
        Some(regex) => o.regex(&format!("{field}.regex"), regex),
        None => {}
    }
}

fn http_rule(o: &mut Obj, field: &str, rule: &HttpRule, subsets: &SubsetIndex) {
    for (j, m) in rule.match_.iter().enumerate() {
        let field = format!("{field}.match[{j}]");
        for (name, value) in
            [("uri", &m.uri), ("scheme", &m.scheme), ("method", &m.method), ("authority", &m.authority)]
        {
            if let Some(value) = value {
                string_match(o, &format!("{field}.{name}"), value, true);
            }
        }
        for (name, map) in
            [("headers", &m.headers), ("queryParams", &m.query_params), ("withoutHeaders", &m.without_headers)]
        {
            for (key, value) in map {
                if key.is_empty() {
                    o.err(format!("{field}.{name}"), "a name must not be empty");
                }
                string_match(o, &format!("{field}.{name}[{key:?}]"), value, false);
            }
        }
        if let Some(port) = m.port {
            o.port(&format!("{field}.port"), port);
        }
        o.labels(&format!("{field}.sourceLabels"), &m.source_labels);
    }
    // Istio's `validateHTTPRouteConflict`: a root rule (with `delegate`) must not have a
    // `route` or a `redirect`; the rest (`mirror`, `timeout`, ...) fills the delegate's rules.
    if rule.delegate.is_some() {
        for (name, set) in [("route", !rule.route.is_empty()), ("redirect", rule.redirect.is_some())] {
            if set {
                o.err(format!("{field}.delegate"), format!("delegate and {name} are mutually exclusive"));
            }
        }
    }
    if !rule.route.is_empty() && rule.redirect.is_some() {
        o.err(format!("{field}.redirect"), "route and redirect are mutually exclusive");
    }
    if !rule.route.is_empty() && rule.direct_response.is_some() {
        o.err(format!("{field}.directResponse"), "route and directResponse are mutually exclusive");
    }
    if rule.redirect.is_some() && rule.rewrite.is_some() {
        o.err(format!("{field}.rewrite"), "rewrite and redirect are mutually exclusive");
    }
    for (k, r) in rule.route.iter().enumerate() {
        destination(o, &format!("{field}.route[{k}].destination"), &r.destination, subsets);
    }
    weights(o, &format!("{field}.route"), &rule.route.iter().map(|r| r.weight).collect::<Vec<_>>());
    if let Some(redirect) = &rule.redirect {
        if let Some(port) = redirect.port {
            o.port(&format!("{field}.redirect.port"), port);
        }
        if let Some(code) = redirect.redirect_code
            && !matches!(code, 301 | 302 | 303 | 307 | 308)
        {
            o.err(
                format!("{field}.redirect.redirectCode"),
                format!("{code} is not a redirect status (301, 302, 303, 307, 308)"),
            );
        }
        if let Some(derive) = &redirect.derive_port
            && !matches!(derive.as_str(), "FROM_PROTOCOL_DEFAULT" | "FROM_REQUEST_PORT")
        {
            o.err(
                format!("{field}.redirect.derivePort"),
                format!("`{derive}` is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"),
            );
        }
    }
    o.duration(&format!("{field}.timeout"), rule.timeout.as_ref());
    if let Some(rewrite) = &rule.rewrite
        && let Some(regex) = rewrite.uri_regex_rewrite.as_ref().and_then(|r| r.get("match")).and_then(|m| m.as_str())
    {
        o.regex(&format!("{field}.rewrite.uriRegexRewrite.match"), regex);
    }
    if let Some(retries) = &rule.retries {
        let field = format!("{field}.retries");
        if retries.attempts < 0 {
            o.err(format!("{field}.attempts"), format!("{} is negative", retries.attempts));
        }
        o.duration_ms(&format!("{field}.perTryTimeout"), retries.per_try_timeout.as_ref());
        o.duration_ms(&format!("{field}.backoff"), retries.backoff.as_ref());
        // Istio: attempts 0 disables retries, so a policy next to it is a mistake.
        if retries.attempts == 0
            && (retries.per_try_timeout.is_some()
                || retries.retry_on.is_some()
                || retries.retry_remote_localities.is_some())
        {
            o.err(
                format!("{field}.attempts"),
                "a retry policy (perTryTimeout, retryOn, retryRemoteLocalities) is set but attempts is 0, which disables retries",
            );
        }
        if let Some(retry_on) = &retries.retry_on {
            for token in retry_on.split(',') {
                if let Some(why) = values::retry_on_error(token) {
                    o.err(format!("{field}.retryOn"), why);
                }
            }
        }
    }
    if let Some(fault) = &rule.fault {
        let field = format!("{field}.fault");
        if fault.delay.is_none() && fault.abort.is_none() {
            o.err(&field, "a fault needs a delay or an abort");
        }
        if let Some(delay) = &fault.delay {
            let field = format!("{field}.delay");
            if delay.fixed_delay.is_none() && delay.exponential_delay.is_none() {
                o.err(format!("{field}.fixedDelay"), "required field is missing");
            }
            o.duration_ms(&format!("{field}.fixedDelay"), delay.fixed_delay.as_ref());
            o.duration(&format!("{field}.exponentialDelay"), delay.exponential_delay.as_ref());
            o.percent(&format!("{field}.percentage"), delay.percentage.as_ref());
            if let Some(percent) = delay.percent
                && !(0..=100).contains(&percent)
            {
                o.err(format!("{field}.percent"), format!("percentage {percent} is outside 0..=100"));
            }
        }
        if let Some(abort) = &fault.abort {
            let field = format!("{field}.abort");
            if abort.http_status.is_none() && abort.grpc_status.is_none() && abort.http2_error.is_none() {
                o.err(format!("{field}.httpStatus"), "required field is missing");
            }
            if let Some(status) = abort.http_status
                && !(200..=599).contains(&status)
            {
                o.err(format!("{field}.httpStatus"), format!("{status} is not an HTTP status in 200..=599"));
            }
            o.percent(&format!("{field}.percentage"), abort.percentage.as_ref());
        }
    }
    if let Some(mirror) = &rule.mirror {
        destination(o, &format!("{field}.mirror"), mirror, subsets);
    }
    o.percent(&format!("{field}.mirrorPercentage"), rule.mirror_percentage.as_ref());
    if let Some(percent) = rule.mirror_percent
        && percent > 100
    {
        o.err(format!("{field}.mirrorPercent"), format!("percentage {percent} is outside 0..=100"));
    }
    if rule.mirror.is_some() && !rule.mirrors.is_empty() {
        o.err(format!("{field}.mirrors"), "mirror and mirrors are mutually exclusive");
    }
    for (k, mirror) in rule.mirrors.iter().enumerate() {
        destination(o, &format!("{field}.mirrors[{k}].destination"), &mirror.destination, subsets);
        o.percent(&format!("{field}.mirrors[{k}].percentage"), mirror.percentage.as_ref());
    }
}

pub(super) fn destination_rule(o: &mut Obj, dr: &DestinationRule) {
    let spec = &dr.spec;
    if spec.host.is_empty() {
        o.err("spec.host", "required field is missing");
    } else {
        o.host("spec.host", &spec.host);
    }
    o.export_to("spec.exportTo", &spec.export_to);
    o.selector("spec.workloadSelector", spec.workload_selector.as_ref());
    if let Some(tp) = &spec.traffic_policy {
        traffic_policy(o, "spec.trafficPolicy", tp);
    }
    let mut names = BTreeSet::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        if !values::is_dns_label(&subset.name) {
            o.err(format!("{field}.name"), format!("`{}` is not a valid subset name (a DNS label)", subset.name));
        } else if !names.insert(subset.name.as_str()) {
            o.err(format!("{field}.name"), format!("duplicate subset `{}`", subset.name));
        }
        o.labels(&format!("{field}.labels"), &subset.labels);
        if let Some(tp) = &subset.traffic_policy {
            traffic_policy(o, &format!("{field}.trafficPolicy"), tp);
        }
    }
}

/// `warmup` (kept as JSON): a duration of at least 1 ms, `minimumPercent` at most
/// 100, `aggression` at least 1, as Istio checks them.
fn warmup(o: &mut Obj, field: &str, warmup: &serde_json::Value) {
    match warmup.get("duration") {
        Some(serde_json::Value::String(d)) => o.duration_ms(&format!("{field}.duration"), Some(d)),
        Some(_) => o.err(format!("{field}.duration"), "must be a duration such as 10s"),
        None => o.err(format!("{field}.duration"), "required field is missing"),
    }
    let number = |key: &str| warmup.get(key).and_then(serde_json::Value::as_f64);
    if let Some(min) = number("minimumPercent")
        && !(0.0..=100.0).contains(&min)
    {
        o.err(format!("{field}.minimumPercent"), format!("{min} is outside 0..=100"));
    }
    if let Some(aggression) = number("aggression")
        && aggression < 1.0
    {
        o.err(format!("{field}.aggression"), format!("{aggression} is below 1"));
    }
}

fn traffic_policy(o: &mut Obj, field: &str, tp: &TrafficPolicy) {
    let empty = tp.load_balancer.is_none()
        && tp.connection_pool.is_none()
        && tp.outlier_detection.is_none()
        && tp.tls.is_none()
        && tp.port_level_settings.is_empty()
        && tp.tunnel.is_none()
        && tp.proxy_protocol.is_none();
    if empty {
        o.err(field, "a traffic policy needs at least one setting");
    }
    policy_parts(
        o,
        field,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
    );
    for (i, port) in tp.port_level_settings.iter().enumerate() {
        let field = format!("{field}.portLevelSettings[{i}]");
        match &port.port {
            Some(p) => o.port(&format!("{field}.port.number"), p.number),
            None => o.err(format!("{field}.port"), "required field is missing"),
        }
        policy_parts(
            o,
            &field,
            port.load_balancer.as_ref(),
            port.connection_pool.as_ref(),
            port.outlier_detection.as_ref(),
            port.tls.as_ref(),
        );
    }
}

fn policy_parts(
    o: &mut Obj,
    field: &str,
    lb: Option<&LoadBalancerSettings>,
    pool: Option<&ConnectionPoolSettings>,
    outlier: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
) {
    if let Some(lb) = lb {
        if lb.simple.is_some() && lb.consistent_hash.is_some() {
            o.err(format!("{field}.loadBalancer"), "simple and consistentHash are mutually exclusive");
        }
        o.duration(&format!("{field}.loadBalancer.warmupDurationSecs"), lb.warmup_duration_secs.as_ref());
        if let Some(warmup) = &lb.warmup {
            self::warmup(o, &format!("{field}.loadBalancer.warmup"), warmup);
        }
    }
    if let Some(pool) = pool {
        if pool.tcp.is_none() && pool.http.is_none() {
            o.err(format!("{field}.connectionPool"), "a connection pool needs tcp or http settings");
        }
        if let Some(tcp) = &pool.tcp {
            let field = format!("{field}.connectionPool.tcp");
            o.duration_ms(&format!("{field}.connectTimeout"), tcp.connect_timeout.as_ref());
            o.duration(&format!("{field}.maxConnectionDuration"), tcp.max_connection_duration.as_ref());
            o.duration(&format!("{field}.idleTimeout"), tcp.idle_timeout.as_ref());
        }
        if let Some(http) = &pool.http {
            let field = format!("{field}.connectionPool.http");
            o.duration(&format!("{field}.idleTimeout"), http.idle_timeout.as_ref());
            if let Some(policy) = &http.h2_upgrade_policy
                && !matches!(policy.as_str(), "DEFAULT" | "DO_NOT_UPGRADE" | "UPGRADE")
            {
                o.err(
                    format!("{field}.h2UpgradePolicy"),
                    format!("`{policy}` is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
                );
            }
        }
    }
    if let Some(od) = outlier {
        let field = format!("{field}.outlierDetection");
        o.duration(&format!("{field}.interval"), od.interval.as_ref());
        o.duration(&format!("{field}.baseEjectionTime"), od.base_ejection_time.as_ref());
        for (name, value) in
            [("maxEjectionPercent", od.max_ejection_percent), ("minHealthPercent", od.min_health_percent)]
        {
            if let Some(v) = value
                && !(0..=100).contains(&v)
            {
                o.err(format!("{field}.{name}"), format!("percentage {v} is outside 0..=100"));
            }
        }
    }
    if let Some(tls) = tls
        && tls.mode == TlsMode::Mutual
        && tls.credential_name.is_none()
        && (tls.client_certificate.is_none() || tls.private_key.is_none())
    {
        o.err(format!("{field}.tls"), "MUTUAL needs clientCertificate and privateKey, or credentialName");
    }
}

const SERVICE_ENTRY_PROTOCOLS: &[&str] =
    &["HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "MYSQL", "REDIS", "TCP", "TLS", "UDP", "HBONE"];

pub(super) fn service_entry(o: &mut Obj, se: &ServiceEntry) {
    let spec = &se.spec;
    if spec.hosts.is_empty() {
        o.err("spec.hosts", "a ServiceEntry needs at least one host");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        o.host(&format!("spec.hosts[{i}]"), host);
        if host == "*" {
            o.err(format!("spec.hosts[{i}]"), "host `*` is not allowed in a ServiceEntry");
        } else if host.contains('*') && !host.starts_with("*.") {
            // Istio admits it with the same warning.
            o.warn(
                format!("spec.hosts[{i}]"),
                format!("partial wildcard `{host}`: only `*.` prefixes match as wildcards"),
            );
        }
    }
    for (i, address) in spec.addresses.iter().enumerate() {
        o.ip_or_cidr(&format!("spec.addresses[{i}]"), address);
        if address.contains('/') && !matches!(spec.resolution, Resolution::None | Resolution::Static) {
            o.err(format!("spec.addresses[{i}]"), "CIDR addresses are allowed only with resolution NONE or STATIC");
        }
    }
    match spec.resolution {
        Resolution::None if !spec.endpoints.is_empty() => {
            o.err("spec.endpoints", "resolution NONE takes no endpoints (traffic goes to the address it was sent to)");
        }
        Resolution::DnsRoundRobin if spec.endpoints.len() > 1 => {
            o.err("spec.endpoints", "resolution DNS_ROUND_ROBIN takes at most 1 endpoint");
        }
        _ => {}
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        o.port(&format!("{field}.number"), port.number);
        if let Some(target) = port.target_port {
            o.port(&format!("{field}.targetPort"), target);
        }
        if !values::is_dns_label(&port.name) {
            o.err(format!("{field}.name"), format!("`{}` is not a valid port name (a DNS label)", port.name));
        } else if !names.insert(port.name.as_str()) {
            o.err(format!("{field}.name"), format!("duplicate port name `{}`", port.name));
        }
        if !numbers.insert(port.number) {
            o.err(format!("{field}.number"), format!("duplicate port {}", port.number));
        }
        if let Some(protocol) = &port.protocol
            && !SERVICE_ENTRY_PROTOCOLS.iter().any(|p| p.eq_ignore_ascii_case(protocol))
        {
            o.err(
                format!("{field}.protocol"),
                format!("unknown protocol `{protocol}` (expected one of {})", SERVICE_ENTRY_PROTOCOLS.join(", ")),
            );
        }
    }
    o.export_to("spec.exportTo", &spec.export_to);
    if let Some(selector) = &spec.workload_selector {
        o.labels("spec.workloadSelector.labels", &selector.labels);
    }
    if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
        o.err("spec.workloadSelector", "workloadSelector and endpoints are mutually exclusive");
    }
    service_entry_data_path(o, se);
    for (i, endpoint) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        workload(o, &field, endpoint);
        let address = endpoint.address.as_str();
        let literal = address.parse::<std::net::IpAddr>().is_ok() || address.starts_with("unix://");
        let resolution = match spec.resolution {
            Resolution::Static => Some("STATIC"),
            Resolution::None => Some("NONE"),
            Resolution::Dns | Resolution::DnsRoundRobin => None,
        };
        if let Some(resolution) = resolution
            && !address.is_empty()
            && !literal
        {
            o.err(
                format!("{field}.address"),
                format!("`{address}` must be an IP address (or unix:// path) with resolution {resolution}"),
            );
        }
        for name in endpoint.ports.keys() {
            if !spec.ports.is_empty() && !spec.ports.iter().any(|p| &p.name == name) {
                o.err(format!("{field}.ports[{name:?}]"), format!("port `{name}` is not defined in spec.ports"));
            }
        }
    }
}

/// Warnings for what the data path does not do with a valid `ServiceEntry`: a
/// wildcard host and a CIDR name no one address to balance, and an entry for a
/// waypoint without addresses is never sent to it. (The hostname endpoints of a `DNS`
/// entry, or its host when it lists none, are resolved by the proxies.)
fn service_entry_data_path(o: &mut Obj, se: &ServiceEntry) {
    let spec = &se.spec;
    let waypoint = se.metadata.labels.get(crate::config::gateway::USE_WAYPOINT_LABEL).is_some_and(|w| w != "none");
    if waypoint && spec.addresses.is_empty() {
        o.warn(
            "spec.addresses",
            "no addresses: a client resolves the entry's host itself and connects where that points, around the waypoint (this mesh hands out no addresses for hosts); give the entry the addresses its clients reach it by",
        );
    }
    for (i, host) in spec.hosts.iter().enumerate().filter(|(_, h)| h.contains('*')) {
        o.warn(
            format!("spec.hosts[{i}]"),
            format!("wildcard host `{host}` is a name for routes only: the data path balances no traffic for it"),
        );
    }
    for (i, address) in spec.addresses.iter().enumerate() {
        if let Some((ip, len)) = address.split_once('/')
            && len != if ip.contains(':') { "128" } else { "32" }
        {
            o.warn(
                format!("spec.addresses[{i}]"),
                format!("CIDR `{address}` is no service address here: connections into it go to the address they were sent to"),
            );
        }
    }
}

pub(super) fn workload_entry(o: &mut Obj, we: &WorkloadEntry) {
    workload(o, "spec", &we.spec);
    if we.spec.address.parse::<std::net::IpAddr>().is_err() && !we.spec.address.is_empty() {
        o.warn(
            "spec.address",
            format!(
                "`{}` is not an IP address: the mesh resolves the names of ServiceEntry endpoints, not of WorkloadEntries, so the entry is no workload here",
                we.spec.address
            ),
        );
    }
}

fn workload(o: &mut Obj, field: &str, spec: &WorkloadEntrySpec) {
    let address = spec.address.as_str();
    if address.is_empty() {
        if spec.network.is_none() {
            o.err(format!("{field}.address"), "an address is required unless a network is named");
        }
    } else if let Some(path) = address.strip_prefix("unix://") {
        // An abstract socket (`@name`) or an absolute path to a file.
        if path.is_empty() || !(path.starts_with('@') || (path.starts_with('/') && !path.ends_with('/'))) {
            o.err(format!("{field}.address"), format!("`{address}` is not unix:// and an absolute path to a socket"));
        }
        if !spec.ports.is_empty() {
            o.err(format!("{field}.ports"), "a unix socket endpoint has no ports");
        }
    } else if address.parse::<std::net::IpAddr>().is_err() {
        o.host(&format!("{field}.address"), address);
    }
    for (name, port) in &spec.ports {
        o.port(&format!("{field}.ports[{name:?}]"), *port);
        // The CRD's rule: under 63 letters, digits and '-', not starting or ending with '-'.
        let valid = !name.is_empty()
            && name.len() < 63
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !valid {
            o.err(format!("{field}.ports[{name:?}]"), format!("`{name}` is not a valid port name"));
        }
    }
    o.labels(&format!("{field}.labels"), &spec.labels);
    if let Some(sa) = &spec.service_account
        && !values::is_dns_subdomain(sa)
    {
        o.err(format!("{field}.serviceAccount"), format!("`{sa}` is not a valid service account name"));
    }
}

/// Server protocols of Istio's `Gateway` (case-insensitive).
const SERVER_PROTOCOLS: &[&str] = &["HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS"];
const SERVER_TLS_MODES: &[&str] =
    &["PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"];

/// Istio's `Gateway`, as Istio validates it: servers with a port, hosts as `host` or
/// `namespace/host`, TLS settings for HTTPS, unique server names and ports.
pub(super) fn istio_gateway(o: &mut Obj, gateway: &IstioGateway) {
    let spec = &gateway.spec;
    o.labels("spec.selector", &spec.selector);
    if spec.servers.is_empty() {
        o.err("spec.servers", "a Gateway needs at least one server");
    }
    let mut names = BTreeSet::new();
    for (i, server) in spec.servers.iter().enumerate() {
        let field = format!("spec.servers[{i}]");
        o.port(&format!("{field}.port.number"), server.port.number);
        if let Some(target) = server.port.target_port {
            o.port(&format!("{field}.port.targetPort"), target);
        }
        let protocol = server.port.protocol.to_ascii_uppercase();
        if !SERVER_PROTOCOLS.contains(&protocol.as_str()) {
            o.err(
                format!("{field}.port.protocol"),
                format!(
                    "unknown protocol `{}` (expected one of {})",
                    server.port.protocol,
                    SERVER_PROTOCOLS.join(", ")
                ),
            );
        }
        if let Some(name) = &server.name
            && !names.insert(name.as_str())
        {
            o.err(format!("{field}.name"), format!("duplicate server name `{name}`"));
        }
        if server.hosts.is_empty() {
            o.err(format!("{field}.hosts"), "a server needs at least one host");
        }
        for (j, host) in server.hosts.iter().enumerate() {
            let field = format!("{field}.hosts[{j}]");
            let name = match host.split_once('/') {
                Some((ns, name)) => {
                    if !matches!(ns, "." | "*" | "~") && !values::is_dns_label(ns) {
                        o.err(&field, format!("`{ns}` is not `.`, `*`, `~` or a namespace name"));
                    }
                    name
                }
                None => host.as_str(),
            };
            o.host(&field, name);
        }
        let mode = server.tls.as_ref().and_then(|t| t.get("mode")).and_then(serde_json::Value::as_str);
        let redirect = server.tls.as_ref().and_then(|t| t.get("httpsRedirect")).and_then(serde_json::Value::as_bool);
        if let Some(mode) = mode
            && !SERVER_TLS_MODES.contains(&mode)
        {
            o.err(
                format!("{field}.tls.mode"),
                format!("unknown TLS mode `{mode}` (expected one of {})", SERVER_TLS_MODES.join(", ")),
            );
        }
        if protocol == "HTTPS" && server.tls.is_none() {
            o.err(format!("{field}.tls"), "an HTTPS server needs tls settings");
        }
        if protocol == "HTTP" && server.tls.is_some() && redirect != Some(true) {
            o.err(format!("{field}.tls"), "an HTTP server takes tls only for httpsRedirect");
        }
    }
}
