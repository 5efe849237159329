//! From the configuration to a [`RouteTable`]: which objects apply to the Service
//! port, in which order, and the conversion of each rule.
//!
//! Decisions, with their sources:
//! - **Both kinds on one Service**: Gateway API routes win and the `VirtualServices` are
//!   left out (with a warning). Istio's ambient documentation calls mixing them for one
//!   workload unsupported ("Migrate policies": "Mixing `VirtualService` and `HTTPRoute` for
//!   the same workload is not supported and leads to undefined behavior") and allows a
//!   `VirtualService` "as long as the configured `hosts` do not conflict with the
//!   `parentRefs` of any Gateway API route" (istio/istio.io#16670, "L7 features");
//!   `HTTPRoute` is the recommended, stable API, so it is the one kept.
//! - **Several `VirtualServices` for one host**: merged, their rules concatenated in
//!   configuration order, first match wins. Sidecars use only one `VirtualService` per
//!   host (Istio's "Multiple virtual services and destination rules for the same host"
//!   says merging is for gateways), but waypoints merge them like gateways since
//!   istio/istio#59484 (fixing #59483: "waypoint ignores additional virtualservice").
//!   Istio orders them by creation time, and so does the loader (objects from files
//!   have none: file order).
//! - **Gateway API precedence** across every attached `HTTPRoute` and `GRPCRoute` rule
//!   match, as Istio sorts them (`sortHTTPRoutes` in its Gateway API conversion), which
//!   follows the spec: exact path, then prefix (longer first), then regex; then a
//!   method match; then more header matches; then more query matches; ties keep route
//!   order (oldest first, then `namespace/name` alphabetical, the spec's next
//!   criterion), then rule and match order. `GRPCRoute`
//!   method matches become paths as Istio converts them (`/svc/m` exact, `/svc/`
//!   prefix, a regex otherwise).
//! - **Delegates** (`http[].delegate`): merged as Istio's `MergeHTTPRoutes` does, one
//!   level, a missing or hidden delegate leaving only its root rule out; see
//!   [`super::delegate`]. Route names read `<root>#http[i]><delegate>#http[j]`.
//! - **A `VirtualService` without `http` rules** (only `tcp`/`tls`) does not route HTTP:
//!   the Service keeps its default route.
//! - **Hosts**: a short name is relative to the object's namespace; `name.ns` and
//!   `name.ns.svc` also name a Service (the cluster DNS search forms clients use).
//!   `exportTo` is read from the Service's namespace (the waypoint serves Services of
//!   its own namespace in the usual setup). A match's `gateways` must be empty or name
//!   `mesh`, like the `VirtualService`'s.
//! - **`hostnames` of a route attached to a Service** are not used: the parent Service
//!   already names the host the waypoint found (Istio does the same for Service
//!   parents).
//! - **The waypoint `Gateway` as a parent** (`kind: Gateway`, group
//!   `gateway.networking.k8s.io`, the default kind and group of a `parentRef`) attaches
//!   nothing: such a reference is left out and [`waypoint_parent_warnings`] names it.
//!   Istio's Gateway API controller gives a waypoint's listener (port 15008, protocol
//!   `HBONE`) an empty `supportedKinds` (`GenerateGatewaySupportedKinds` lists route kinds
//!   only for HTTP, HTTPS, TCP and TLS listeners; its `waypoint.status.yaml.golden` shows
//!   `supportedKinds: []`), so the route's parent status is `Accepted: False` ("kind ...
//!   is not allowed") and nothing is generated for the waypoint. A waypoint is programmed
//!   only from mesh routes, i.e. `parentRefs` to a Service or `ServiceEntry`. The same
//!   route's Service parents still attach.
//! - **Unresolved backends**: a host that is no Service nor `ServiceEntry` host, a
//!   Service port it does not have, or a subset no `DestinationRule` of the host defines
//!   keeps its share of the weight and carries the reason: the proxy answers 503 `NR`.
use std::collections::{BTreeMap, BTreeSet};

use http::{HeaderName, HeaderValue};
use mesh_common::config::{
    Config, DNS_DOMAIN, GrpcRoute, HttpRoute, VirtualService,
    gateway::{BackendRef, HttpRouteMatch, NameMatch, ParentReference, RouteFilter},
    meta::Percent,
    networking::{Destination, HeaderOperations, Headers, HttpFaultInjection, HttpMatchRequest, HttpRule},
    parse_duration,
};
use serde_json::Value;

use super::{
    Action, Backend, Route, RouteTable, ServiceKind, ServiceRef, WaypointGateway, delegate,
    filters::{Abort, Cors, Fault, HeaderOps, Mirror, PathRewrite, Redirect, RedirectPort},
    matcher::{Matcher, PathMatch, StrMatch, compile_anchored},
};
use crate::retry::RetryPolicy;

pub(super) fn build(config: &Config, service: &ServiceRef) -> RouteTable {
    let index = Index::new(config);
    let mut warnings = Vec::new();
    let gateway = gateway_entries(config, service, &index, &mut warnings);
    let virtual_services: Vec<&VirtualService> =
        config.virtual_services.iter().filter(|vs| !vs.spec.http.is_empty() && vs_applies(vs, service)).collect();
    let entries = if gateway.is_some() {
        for vs in &virtual_services {
            warnings.push(format!(
                "VirtualService/{}/{}: left out for {}:{}: HTTPRoute/GRPCRoute objects attach to this Service, and Gateway API routes win over VirtualServices",
                vs.metadata.namespace, vs.metadata.name, service.hostname, service.port
            ));
        }
        gateway
    } else if virtual_services.is_empty() {
        None
    } else {
        let mut entries = Vec::new();
        for vs in virtual_services {
            vs_entries(vs, config, &index, &mut entries, &mut warnings);
        }
        Some(entries)
    };
    match entries {
        Some(entries) => RouteTable { entries, configured: true, warnings },
        None => RouteTable { entries: vec![(Matcher::any(), default_route(service))], configured: false, warnings },
    }
}

/// The route of a Service without route objects: to itself, same port, Istio's default
/// retries, no timeout.
fn default_route(service: &ServiceRef) -> Route {
    Route {
        name: "default".into(),
        action: Action::Forward { backends: vec![default_backend(service)] },
        rewrite: None,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        timeout: None,
        retry: RetryPolicy::istio_default(),
        fault: None,
        mirrors: Vec::new(),
        cors: None,
    }
}

/// The Service itself, same port: where traffic goes without route objects.
pub(super) fn default_backend(service: &ServiceRef) -> Backend {
    Backend {
        host: service.hostname.clone(),
        namespace: service.namespace.clone(),
        port: Some(service.port),
        subset: None,
        weight: 100,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        unresolved: None,
        unresolved_status: 503,
    }
}

/// A host as written in an object of namespace `ns`, made fully qualified: a short
/// name is `name.ns.svc.<domain>`; a trailing dot goes.
pub(super) fn fqdn(host: &str, ns: &str) -> String {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.contains('.') || host.contains('*') { host.to_string() } else { format!("{host}.{ns}.svc.{DNS_DOMAIN}") }
}

/// Whether `VirtualService` host `host` (of namespace `ns`) names `service`.
fn host_names_service(host: &str, ns: &str, service: &ServiceRef) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host == "*" {
        return true;
    }
    if let Some(suffix) = host.strip_prefix('*') {
        return service.hostname.ends_with(suffix);
    }
    fqdn(host, ns) == service.hostname
        || service.kind == ServiceKind::Service && host == format!("{}.{}", service.name, service.namespace)
        || service.kind == ServiceKind::Service && host == format!("{}.{}.svc", service.name, service.namespace)
}

pub(super) fn for_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

pub(super) fn vs_applies(vs: &VirtualService, service: &ServiceRef) -> bool {
    let ns = &vs.metadata.namespace;
    let export = &vs.spec.export_to;
    let exported = export.is_empty()
        || export.iter().any(|e| e == "*" || *e == service.namespace || (e == "." && *ns == service.namespace));
    exported && for_mesh(&vs.spec.gateways) && vs.spec.hosts.iter().any(|h| host_names_service(h, ns, service))
}

/// What backends are checked against: Services, `ServiceEntry` hosts, subsets.
pub(super) struct Index {
    /// FQDN -> (namespace, ports).
    services: BTreeMap<String, (String, Vec<u16>)>,
    /// `ServiceEntry` host -> namespace; wildcard hosts as (`.suffix`, namespace).
    entries: BTreeMap<String, String>,
    wildcard_entries: Vec<(String, String)>,
    /// `DestinationRule` host -> subset names; wildcard hosts as (`.suffix`, names).
    subsets: BTreeMap<String, BTreeSet<String>>,
    wildcard_subsets: Vec<(String, BTreeSet<String>)>,
}

impl Index {
    pub(super) fn new(config: &Config) -> Self {
        let mut index = Self {
            services: BTreeMap::new(),
            entries: BTreeMap::new(),
            wildcard_entries: Vec::new(),
            subsets: BTreeMap::new(),
            wildcard_subsets: Vec::new(),
        };
        for svc in &config.services {
            let ports = svc.spec.ports.iter().filter_map(|p| u16::try_from(p.port).ok()).collect();
            index
                .services
                .insert(fqdn(&svc.metadata.name, &svc.metadata.namespace), (svc.metadata.namespace.clone(), ports));
        }
        for se in &config.service_entries {
            for host in &se.spec.hosts {
                let host = fqdn(host, &se.metadata.namespace);
                match host.strip_prefix('*') {
                    Some(suffix) => index.wildcard_entries.push((suffix.to_string(), se.metadata.namespace.clone())),
                    None => {
                        index.entries.entry(host).or_insert_with(|| se.metadata.namespace.clone());
                    }
                }
            }
        }
        for dr in &config.destination_rules {
            let host = fqdn(&dr.spec.host, &dr.metadata.namespace);
            let names = dr.spec.subsets.iter().map(|s| s.name.clone());
            match host.strip_prefix('*') {
                Some(suffix) => index.wildcard_subsets.push((suffix.to_string(), names.collect())),
                None => index.subsets.entry(host).or_default().extend(names),
            }
        }
        index
    }

    /// The backend for `host` as written in an object of namespace `ns`; `place` names
    /// where it was written, for the unresolved reason.
    fn backend(
        &self,
        host: &str,
        ns: &str,
        port: Option<u16>,
        subset: Option<&str>,
        weight: u32,
        place: &str,
    ) -> Backend {
        let mut host = fqdn(host, ns);
        // `name.ns` and `name.ns.svc` name a Service too.
        for candidate in [format!("{host}.svc.{DNS_DOMAIN}"), format!("{host}.{DNS_DOMAIN}")] {
            if !self.services.contains_key(&host) && self.services.contains_key(&candidate) {
                host = candidate;
            }
        }
        let mut unresolved = None;
        let mut port = port;
        let namespace = if let Some((svc_ns, ports)) = self.services.get(&host) {
            // No port written: a Service's only port, as Istio picks it; with several,
            // the port the request came to (left `None`).
            if let ([only], None) = (ports.as_slice(), port) {
                port = Some(*only);
            }
            if let Some(p) = port.filter(|p| !ports.contains(p)) {
                unresolved = Some(format!("Service `{host}` has no port {p} (referenced by {place})"));
            }
            svc_ns.clone()
        } else if let Some(se_ns) = self.entries.get(&host) {
            se_ns.clone()
        } else if let Some((_, se_ns)) =
            self.wildcard_entries.iter().find(|(suffix, _)| host.ends_with(suffix.as_str()))
        {
            se_ns.clone()
        } else {
            unresolved = Some(format!(
                "host `{host}` is neither a Service nor a ServiceEntry host (referenced by {place}; Services and ServiceEntries of the configuration searched)"
            ));
            ns.to_string()
        };
        if let Some(subset) = subset
            && unresolved.is_none()
        {
            let mut found_rule = false;
            let mut defined = false;
            if let Some(names) = self.subsets.get(&host) {
                found_rule = true;
                defined |= names.contains(subset);
            }
            for (suffix, names) in &self.wildcard_subsets {
                if host.ends_with(suffix.as_str()) {
                    found_rule = true;
                    defined |= names.contains(subset);
                }
            }
            if !found_rule {
                unresolved = Some(format!(
                    "subset `{subset}` is not defined: no DestinationRule for host `{host}` (referenced by {place})"
                ));
            } else if !defined {
                unresolved = Some(format!(
                    "subset `{subset}` is not defined by any DestinationRule for host `{host}` (referenced by {place})"
                ));
            }
        }
        Backend {
            host,
            namespace,
            port,
            subset: subset.map(str::to_string),
            weight,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            unresolved,
            unresolved_status: 503,
        }
    }
}

// ---------------------------------------------------------------------------------
// VirtualService

fn vs_entries(
    vs: &VirtualService,
    config: &Config,
    index: &Index,
    entries: &mut Vec<(Matcher, Route)>,
    warnings: &mut Vec<String>,
) {
    let ns = &vs.metadata.namespace;
    let object = format!("VirtualService/{ns}/{}", vs.metadata.name);
    for (i, rule) in vs.spec.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        let name = format!("{object}#http[{i}]");
        let Some(reference) = &rule.delegate else {
            rule_entries(rule, &name, ns, index, entries, &mut |f, why| {
                warnings.push(format!("{object}: {field}{f}: {why}"));
            });
            continue;
        };
        let delegate_vs = match delegate::find(config, reference, ns) {
            Ok(found) => found,
            Err(e) => {
                warnings.push(format!("{object}: {field}.delegate: {e}"));
                continue;
            }
        };
        let root = delegate::qualified(rule, ns);
        let d_ns = &delegate_vs.metadata.namespace;
        let d_object = format!("VirtualService/{d_ns}/{}", delegate_vs.metadata.name);
        for (j, d_rule) in delegate_vs.spec.http.iter().enumerate() {
            let d_field = format!("spec.http[{j}]");
            let mut warn = |f: &str, why: String| {
                warnings.push(format!("{d_object}: {d_field}{f}: {why} (delegated from {object} {field})"));
            };
            if d_rule.delegate.is_some() {
                warn(
                    ".delegate",
                    "a delegate VirtualService must not delegate again (one level only); rule left out".into(),
                );
                continue;
            }
            let Some(merged) = delegate::merge_rule(&root, &delegate::qualified(d_rule, d_ns)) else {
                warn(
                    ".match",
                    format!(
                        "not a subset of the root rule's matches ({object} {field}.match); rule left out, as Istio does"
                    ),
                );
                continue;
            };
            rule_entries(&merged, &format!("{name}>{d_object}#http[{j}]"), d_ns, index, entries, &mut warn);
        }
    }
}

/// The entries of one `VirtualService` rule (one per match for the mesh, or one that
/// matches everything); `ns` is where short hosts are resolved.
fn rule_entries(
    rule: &HttpRule,
    name: &str,
    ns: &str,
    index: &Index,
    entries: &mut Vec<(Matcher, Route)>,
    warn: &mut dyn FnMut(&str, String),
) {
    let Some(route) = vs_route(rule, name, ns, index, warn) else {
        return;
    };
    if rule.match_.is_empty() {
        let route = with_path_rewrite(route, rule, None, warn);
        entries.push((Matcher::any(), route));
        return;
    }
    for (k, m) in rule.match_.iter().enumerate() {
        if !for_mesh(&m.gateways) {
            continue;
        }
        let mut warn_match = |f: &str, why: String| warn(&format!(".match[{k}]{f}"), why);
        let matcher = vs_matcher(m, &mut warn_match);
        let route = with_path_rewrite(route.clone(), rule, Some(m), &mut warn_match);
        entries.push((matcher, route));
    }
}

fn vs_matcher(m: &HttpMatchRequest, warn: &mut dyn FnMut(&str, String)) -> Matcher {
    let mut matcher = Matcher::any();
    let mut never = false;
    let mut str_match = |f: &str, sm, never: &mut bool| {
        let compiled = StrMatch::from_istio(sm, &mut |why| warn(f, why));
        *never |= matches!(compiled, StrMatch::Never);
        compiled
    };
    if let Some(uri) = &m.uri {
        matcher.path = PathMatch::Str { m: str_match(".uri", uri, &mut never), ignore_case: m.ignore_uri_case };
    }
    matcher.scheme = m.scheme.as_ref().map(|s| str_match(".scheme", s, &mut never));
    matcher.method = m.method.as_ref().map(|s| str_match(".method", s, &mut never));
    matcher.authority = m.authority.as_ref().map(|s| str_match(".authority", s, &mut never));
    for (name, sm) in &m.headers {
        let f = format!(".headers.{name}");
        let compiled = str_match(&f, sm, &mut never);
        match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            Ok(h) => matcher.headers.push((h, compiled)),
            Err(_) => never = true,
        }
    }
    for (name, sm) in &m.without_headers {
        let f = format!(".withoutHeaders.{name}");
        let compiled = str_match(&f, sm, &mut never);
        // A header that cannot exist is always absent: nothing to exclude.
        if let Ok(h) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            matcher.without_headers.push((h, compiled));
        }
    }
    for (name, sm) in &m.query_params {
        let f = format!(".queryParams.{name}");
        // Istio turns `exact: ""` into a presence match.
        let compiled = if sm.exact.as_deref() == Some("") { StrMatch::Any } else { str_match(&f, sm, &mut never) };
        matcher.query.push((name.clone(), compiled));
    }
    if let Some(port) = m.port {
        match u16::try_from(port) {
            Ok(p) => matcher.port = Some(p),
            Err(_) => never = true,
        }
    }
    matcher.source_labels.clone_from(&m.source_labels);
    matcher.source_namespace.clone_from(&m.source_namespace);
    if never {
        warn("", "this match can never match".into());
    }
    matcher.never = never;
    matcher
}

/// The route of a `VirtualService` rule, without its path rewrite (which depends on the
/// match); `None` when the rule has nothing to do.
fn vs_route(rule: &HttpRule, name: &str, ns: &str, index: &Index, warn: &mut dyn FnMut(&str, String)) -> Option<Route> {
    let action = if let Some(r) = &rule.redirect {
        let port = match (r.port, r.derive_port.as_deref()) {
            (Some(p), _) => RedirectPort::Set(u16::try_from(p).unwrap_or(u16::MAX)),
            (None, Some("FROM_PROTOCOL_DEFAULT")) => RedirectPort::ProtocolDefault,
            (None, Some("FROM_REQUEST_PORT")) => RedirectPort::RequestPort,
            _ => RedirectPort::Keep,
        };
        Action::Redirect(Redirect {
            scheme: r.scheme.clone(),
            host: r.authority.clone(),
            port,
            path: r.uri.clone().map(PathRewrite::Full),
            code: r.redirect_code.and_then(|c| u16::try_from(c).ok()).unwrap_or(301),
        })
    } else if let Some(direct) = &rule.direct_response {
        direct_response(direct, &mut |why| warn(".directResponse", why))?
    } else if rule.route.is_empty() {
        warn("", "no route, redirect nor directResponse; rule left out".into());
        return None;
    } else {
        let backends = rule
            .route
            .iter()
            .enumerate()
            .map(|(k, r)| {
                let place = format!("{name} route[{k}]");
                let weight = u32::try_from(r.weight.max(0)).unwrap_or(u32::MAX);
                let mut b = destination(&r.destination, ns, weight, index, &place);
                if let Some(h) = &r.headers {
                    let (req, resp) = istio_headers(h, &mut |f, why| warn(&format!(".route[{k}].headers{f}"), why));
                    b.request_headers = req;
                    b.response_headers = resp;
                }
                b
            })
            .collect();
        Action::Forward { backends }
    };
    let (request_headers, response_headers) = match &rule.headers {
        Some(h) => istio_headers(h, &mut |f, why| warn(&format!(".headers{f}"), why)),
        None => Default::default(),
    };
    let authority = rule.rewrite.as_ref().and_then(|r| r.authority.clone());
    let mut mirrors = Vec::new();
    if let Some(m) = &rule.mirror {
        let percent = match (&rule.mirror_percentage, rule.mirror_percent) {
            (Some(p), _) => p.value,
            (None, Some(p)) => f64::from(p),
            (None, None) => 100.0,
        };
        mirrors.push(Mirror { backend: destination(m, ns, 0, index, &format!("{name} mirror")), percent });
    }
    for (k, m) in rule.mirrors.iter().enumerate() {
        let percent = m.percentage.as_ref().map_or(100.0, |p| p.value);
        mirrors.push(Mirror {
            backend: destination(&m.destination, ns, 0, index, &format!("{name} mirrors[{k}]")),
            percent,
        });
    }
    Some(Route {
        name: name.to_string(),
        action,
        rewrite: authority.map(|a| super::Rewrite { path: None, authority: Some(a) }),
        request_headers,
        response_headers,
        timeout: rule.timeout.as_deref().and_then(|t| parse_duration(t).ok()).filter(|t| !t.is_zero()),
        retry: RetryPolicy::from_istio(rule.retries.as_ref()),
        fault: rule.fault.as_ref().and_then(|f| istio_fault(f, &mut |why| warn(".fault", why))),
        mirrors,
        cors: rule.cors_policy.as_ref().map(|c| istio_cors(c, &mut |why| warn(".corsPolicy", why))),
    })
}

/// Sets the path rewrite of a `VirtualService` rule for one of its matches: `rewrite.uri`
/// replaces a matched prefix (Envoy's `prefix_rewrite`, as Istio writes it; no `uri`
/// match is the prefix `/`) and the whole path of an exact or regex match;
/// `uriRegexRewrite` rewrites by regex.
fn with_path_rewrite(
    mut route: Route,
    rule: &HttpRule,
    m: Option<&HttpMatchRequest>,
    warn: &mut dyn FnMut(&str, String),
) -> Route {
    let Some(rewrite) = &rule.rewrite else {
        return route;
    };
    let path = if let Some(regex) = &rewrite.uri_regex_rewrite {
        let pattern = regex.get("match").and_then(Value::as_str);
        let substitution = regex.get("rewrite").and_then(Value::as_str);
        if let (Some(p), Some(s)) = (pattern, substitution) {
            PathRewrite::regex(p, s).map_err(|why| warn(".rewrite.uriRegexRewrite", format!("{why}; no rewrite"))).ok()
        } else {
            warn(".rewrite.uriRegexRewrite", "needs `match` and `rewrite` strings; no rewrite".into());
            None
        }
    } else if let Some(uri) = &rewrite.uri {
        let uri_match = m.and_then(|m| m.uri.as_ref());
        match uri_match {
            Some(sm) if sm.prefix.is_some() => {
                Some(PathRewrite::Prefix { prefix: sm.prefix.clone().unwrap_or_default(), replacement: uri.clone() })
            }
            Some(sm) if sm.exact.is_some() || sm.regex.is_some() => Some(PathRewrite::Full(uri.clone())),
            _ => Some(PathRewrite::Prefix { prefix: "/".into(), replacement: uri.clone() }),
        }
    } else {
        None
    };
    if path.is_some() {
        let rw = route.rewrite.get_or_insert(super::Rewrite { path: None, authority: None });
        rw.path = path;
    }
    route
}

pub(super) fn destination(d: &Destination, ns: &str, weight: u32, index: &Index, place: &str) -> Backend {
    let port = d.port.as_ref().and_then(|p| u16::try_from(p.number).ok());
    index.backend(&d.host, ns, port, d.subset.as_deref(), weight, place)
}

fn istio_headers(h: &Headers, warn: &mut dyn FnMut(&str, String)) -> (HeaderOps, HeaderOps) {
    let ops = |o: &Option<HeaderOperations>, f: &str, warn: &mut dyn FnMut(&str, String)| {
        o.as_ref().map_or_else(HeaderOps::default, |o| {
            let mut w = |why| warn(f, why);
            HeaderOps {
                set: header_pairs(o.set.iter().map(|(k, v)| (k.as_str(), v.as_str())), &mut w),
                add: header_pairs(o.add.iter().map(|(k, v)| (k.as_str(), v.as_str())), &mut w),
                remove: header_names(o.remove.iter().map(String::as_str), &mut w),
            }
        })
    };
    (ops(&h.request, ".request", warn), ops(&h.response, ".response", warn))
}

fn header_pairs<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
    warn: &mut dyn FnMut(String),
) -> Vec<(HeaderName, HeaderValue)> {
    pairs
        .filter_map(|(k, v)| {
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                Some((name, value))
            } else {
                warn(format!("header `{k}: {v}` is not a valid HTTP header; left out"));
                None
            }
        })
        .collect()
}

fn header_names<'a>(names: impl Iterator<Item = &'a str>, warn: &mut dyn FnMut(String)) -> Vec<HeaderName> {
    names
        .filter_map(|k| {
            HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| warn(format!("`{k}` is not a valid header name; left out")))
                .ok()
        })
        .collect()
}

/// Istio `directResponse`: `{status, body: {string} | {bytes: base64}}`.
fn direct_response(v: &Value, warn: &mut dyn FnMut(String)) -> Option<Action> {
    let Some(status) = v.get("status").and_then(Value::as_u64).and_then(|s| u16::try_from(s).ok()) else {
        warn("needs a `status`; rule left out".into());
        return None;
    };
    let body = match v.get("body") {
        Some(b) => {
            if let Some(s) = b.get("string").and_then(Value::as_str) {
                Some(s.as_bytes().to_vec())
            } else if let Some(s) = b.get("bytes").and_then(Value::as_str) {
                let bytes = base64_decode(s);
                if bytes.is_none() {
                    warn("body.bytes is not base64; empty body".into());
                }
                bytes
            } else {
                None
            }
        }
        None => None,
    };
    Some(Action::DirectResponse { status, body })
}

/// Standard base64 (padding optional), as protobuf's JSON mapping writes bytes; the URL
/// alphabet is accepted too.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Istio's percentages: `percentage.value`, else the deprecated integer `percent`;
/// neither: no request (Istio: "If left unspecified, no request will be delayed").
fn percent(p: Option<&Percent>, deprecated: Option<i64>) -> f64 {
    p.map(|p| p.value).or_else(|| deprecated.map(|d| d as f64)).unwrap_or(0.0).clamp(0.0, 100.0)
}

fn istio_fault(f: &HttpFaultInjection, warn: &mut dyn FnMut(String)) -> Option<Fault> {
    let mut fault = Fault { delay: None, delay_percent: 0.0, abort: None, abort_percent: 0.0 };
    if let Some(d) = &f.delay {
        if let Some(fixed) = d.fixed_delay.as_deref().and_then(|t| parse_duration(t).ok()) {
            fault.delay = Some(fixed);
            fault.delay_percent = percent(d.percentage.as_ref(), d.percent);
        } else if d.exponential_delay.is_some() {
            warn("delay.exponentialDelay is not supported (nor by Istio); no delay".into());
        }
    }
    if let Some(a) = &f.abort {
        if let Some(status) = a.http_status {
            fault.abort = u16::try_from(status).ok().map(Abort::Http);
        } else if let Some(code) = &a.grpc_status {
            match grpc_code(code) {
                Some(c) => fault.abort = Some(Abort::Grpc(c)),
                None => warn(format!("abort.grpcStatus `{code}` is not a gRPC status name; no abort")),
            }
        } else if a.http2_error.is_some() {
            warn("abort.http2Error is not supported (nor by Istio); no abort".into());
        }
        fault.abort_percent = percent(a.percentage.as_ref(), None);
    }
    (fault.delay.is_some() || fault.abort.is_some()).then_some(fault)
}

/// A gRPC status by its name (`UNAVAILABLE`, as Istio asks) or number.
fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let upper = name.trim().to_ascii_uppercase();
    NAMES.iter().position(|n| *n == upper).map(|i| i as u32).or_else(|| upper.parse().ok().filter(|c| *c <= 16))
}

/// Istio `corsPolicy`: `allowOrigins` (`StringMatch` list), deprecated `allowOrigin`
/// (exact strings, `*` any), `allowMethods`, `allowHeaders`, `exposeHeaders`, `maxAge`
/// (duration), `allowCredentials`.
fn istio_cors(v: &Value, warn: &mut dyn FnMut(String)) -> Cors {
    let mut origins = Vec::new();
    for o in v.get("allowOrigins").and_then(Value::as_array).into_iter().flatten() {
        match serde_json::from_value(o.clone()) {
            Ok(sm) => origins.push(StrMatch::from_istio(&sm, &mut *warn)),
            Err(e) => warn(format!("allowOrigins entry {o}: {e}")),
        }
    }
    for o in strings(v.get("allowOrigin")) {
        origins.push(if o == "*" { StrMatch::Any } else { StrMatch::Exact(o) });
    }
    Cors {
        origins,
        allow_methods: strings(v.get("allowMethods")),
        allow_headers: strings(v.get("allowHeaders")),
        expose_headers: strings(v.get("exposeHeaders")),
        max_age: v.get("maxAge").and_then(Value::as_str).and_then(|t| parse_duration(t).ok()),
        allow_credentials: v.get("allowCredentials").and_then(Value::as_bool).unwrap_or(false),
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect()
}

// ---------------------------------------------------------------------------------
// Gateway API

/// One rule match of an attached route, with what orders it.
struct GatewayEntry {
    /// Exact 3, prefix 2, regex 1, no path -1 (Istio's `getURIRank`).
    path_rank: i8,
    path_len: usize,
    method: bool,
    headers: usize,
    query: usize,
    matcher: Matcher,
    route: Route,
}

pub(super) fn targets_service(p: &ParentReference, route_ns: &str, service: &ServiceRef) -> bool {
    // `group` must be core ("") for a Service; an absent group is read as core too,
    // since no Gateway API kind is called Service. A `ServiceEntry` is Istio's.
    let kind = match service.kind {
        ServiceKind::Service => {
            p.kind.as_deref() == Some("Service") && p.group.as_deref().is_none_or(|g| g.is_empty() || g == "core")
        }
        ServiceKind::ServiceEntry => {
            p.kind.as_deref() == Some("ServiceEntry") && p.group.as_deref() == Some("networking.istio.io")
        }
    };
    kind && p.name == service.name
        && p.namespace.as_deref().unwrap_or(route_ns) == service.namespace
        && p.port.is_none_or(|port| port == u32::from(service.port))
}

/// Whether `p` (of a route in `route_ns`) names the waypoint's `Gateway`.
fn targets_waypoint(p: &ParentReference, route_ns: &str, waypoint: WaypointGateway<'_>) -> bool {
    p.kind.as_deref().is_none_or(|k| k == "Gateway")
        && p.group.as_deref().is_none_or(|g| g == "gateway.networking.k8s.io")
        && p.name == waypoint.name
        && p.namespace.as_deref().unwrap_or(route_ns) == waypoint.namespace
}

pub(super) fn waypoint_parent_warnings(config: &Config, waypoint: WaypointGateway<'_>) -> Vec<String> {
    let http = config.http_routes.iter().map(|r| ("HTTPRoute", &r.metadata, &r.spec.parent_refs));
    let grpc = config.grpc_routes.iter().map(|r| ("GRPCRoute", &r.metadata, &r.spec.parent_refs));
    let tcp = config.tcp_routes.iter().map(|r| ("TCPRoute", &r.metadata, &r.spec.parent_refs));
    let tls = config.tls_routes.iter().map(|r| ("TLSRoute", &r.metadata, &r.spec.parent_refs));
    let mut warnings = Vec::new();
    for (kind, meta, parents) in http.chain(grpc).chain(tcp).chain(tls) {
        for (i, p) in parents.iter().enumerate() {
            if targets_waypoint(p, &meta.namespace, waypoint) {
                warnings.push(format!(
                    "{kind}/{}/{}: spec.parentRefs[{i}]: names the waypoint Gateway {}/{}, which accepts no routes (as in Istio, its HBONE listener supports no route kinds); this parent is ignored: attach the route to a Service (kind: Service) instead",
                    meta.namespace, meta.name, waypoint.namespace, waypoint.name
                ));
            }
        }
    }
    warnings
}

/// Every rule match of the `HTTPRoutes` and `GRPCRoutes` attached to the Service port, in
/// precedence order; `None` when none attaches.
fn gateway_entries(
    config: &Config,
    service: &ServiceRef,
    index: &Index,
    warnings: &mut Vec<String>,
) -> Option<Vec<(Matcher, Route)>> {
    enum Kind<'a> {
        Http(&'a HttpRoute),
        Grpc(&'a GrpcRoute),
    }
    // (creation time, namespace/name, kind, route): ties go to the oldest route, then
    // `namespace/name`, as the spec orders them.
    let mut attached: Vec<(&str, String, &str, Kind)> = Vec::new();
    for r in &config.http_routes {
        if r.spec.parent_refs.iter().any(|p| targets_service(p, &r.metadata.namespace, service)) {
            let id = format!("{}/{}", r.metadata.namespace, r.metadata.name);
            attached.push((&r.metadata.creation_timestamp, id, "HTTPRoute", Kind::Http(r)));
        }
    }
    for r in &config.grpc_routes {
        if r.spec.parent_refs.iter().any(|p| targets_service(p, &r.metadata.namespace, service)) {
            let id = format!("{}/{}", r.metadata.namespace, r.metadata.name);
            attached.push((&r.metadata.creation_timestamp, id, "GRPCRoute", Kind::Grpc(r)));
        }
    }
    if attached.is_empty() {
        return None;
    }
    attached.sort_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
    let mut entries = Vec::new();
    for (_, id, kind, route) in attached {
        let object = format!("{kind}/{id}");
        let mut warn = |f: &str, why: String| warnings.push(format!("{object}: {f}: {why}"));
        match route {
            Kind::Http(r) => http_route_entries(r, &object, index, &mut entries, &mut warn),
            Kind::Grpc(r) => grpc_route_entries(r, &object, index, &mut entries, &mut warn),
        }
    }
    // Stable: ties keep route, rule and match order.
    entries.sort_by(|a, b| {
        b.path_rank
            .cmp(&a.path_rank)
            .then(b.path_len.cmp(&a.path_len))
            .then(b.method.cmp(&a.method))
            .then(b.headers.cmp(&a.headers))
            .then(b.query.cmp(&a.query))
    });
    Some(entries.into_iter().map(|e| (e.matcher, e.route)).collect())
}

fn http_route_entries(
    r: &HttpRoute,
    object: &str,
    index: &Index,
    entries: &mut Vec<GatewayEntry>,
    warn: &mut dyn FnMut(&str, String),
) {
    let ns = &r.metadata.namespace;
    let default_match = [HttpRouteMatch::default()];
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        let name = format!("{object}#rules[{i}]");
        let mut route = gateway_route(&name, ns, &rule.filters, &rule.backend_refs, index, &field, warn);
        // The spec's answer for a backendRef that cannot be used, and for a rule
        // without backendRefs or a filter that answers: 500.
        match &mut route.action {
            Action::Forward { backends } => backends.iter_mut().for_each(|b| b.unresolved_status = 500),
            Action::DirectResponse { status, body: None } if rule.backend_refs.is_empty() => *status = 500,
            _ => {}
        }
        if let Some(t) = &rule.timeouts {
            route.timeout = t.request.as_deref().and_then(|d| parse_duration(d).ok()).filter(|d| !d.is_zero());
        }
        route.retry = RetryPolicy::from_gateway(rule.retry.as_ref());
        if let Some(per_try) = rule.timeouts.as_ref().and_then(|t| t.backend_request.as_deref()) {
            route.retry.per_try_timeout = parse_duration(per_try).ok().filter(|d| !d.is_zero());
        }
        let rule_matches: &[HttpRouteMatch] = if rule.matches.is_empty() { &default_match } else { &rule.matches };
        for (k, m) in rule_matches.iter().enumerate() {
            let mut warn_match = |f: &str, why: String| warn(&format!("{field}.matches[{k}]{f}"), why);
            let mut matcher = Matcher::any();
            let (type_, value) = m.path.as_ref().map_or(("PathPrefix", "/"), |p| {
                (p.type_.as_deref().unwrap_or("PathPrefix"), p.value.as_deref().unwrap_or("/"))
            });
            let (path_rank, path) = match type_ {
                "Exact" => (3, PathMatch::Str { m: StrMatch::Exact(value.to_string()), ignore_case: false }),
                "RegularExpression" => {
                    let m = StrMatch::regex(value, &mut |why| warn_match(".path", why));
                    matcher.never |= matches!(m, StrMatch::Never);
                    (1, PathMatch::Str { m, ignore_case: false })
                }
                _ => (2, PathMatch::segments(value)),
            };
            matcher.path = path;
            matcher.method = m.method.clone().map(StrMatch::Exact);
            name_matches(&m.headers, &mut matcher, true, &mut |why| warn_match(".headers", why));
            name_matches(&m.query_params, &mut matcher, false, &mut |why| warn_match(".queryParams", why));
            let mut route = route.clone();
            set_prefix_of_match(&mut route, type_, value);
            entries.push(GatewayEntry {
                path_rank,
                // A prefix ranks by what it matches: `/foo/` and `/foo` are one (Istio
                // trims the slash before sorting too).
                path_len: if path_rank == 2 { value.trim_end_matches('/').len() } else { value.len() },
                method: m.method.is_some(),
                headers: m.headers.len(),
                query: m.query_params.len(),
                matcher,
                route,
            });
        }
    }
}

/// `ReplacePrefixMatch` (rewrite or redirect) replaces what this match matched.
fn set_prefix_of_match(route: &mut Route, type_: &str, value: &str) {
    let fix = |p: &mut PathRewrite| {
        if let PathRewrite::Segments { prefix, replacement } = p {
            if type_ == "Exact" {
                *p = PathRewrite::Full(std::mem::take(replacement));
            } else {
                *prefix = value.to_string();
            }
        }
    };
    if let Some(rw) = route.rewrite.as_mut().and_then(|r| r.path.as_mut()) {
        fix(rw);
    }
    if let Action::Redirect(Redirect { path: Some(p), .. }) = &mut route.action {
        fix(p);
    }
}

/// Header (`headers: true`, names case-insensitive) or query parameter matches. The
/// first match of a name counts, as the spec says; later ones are ignored.
fn name_matches(list: &[NameMatch], matcher: &mut Matcher, headers: bool, warn: &mut dyn FnMut(String)) {
    let mut seen = BTreeSet::new();
    for nm in list {
        let key = if headers { nm.name.to_ascii_lowercase() } else { nm.name.clone() };
        if !seen.insert(key.clone()) {
            continue;
        }
        let m = match nm.type_.as_deref() {
            Some("RegularExpression") => StrMatch::regex(&nm.value, &mut *warn),
            _ => StrMatch::Exact(nm.value.clone()),
        };
        matcher.never |= matches!(m, StrMatch::Never);
        if headers {
            if let Ok(h) = HeaderName::from_bytes(key.as_bytes()) {
                matcher.headers.push((h, m));
            } else {
                warn(format!("`{}` is not a valid header name; never matches", nm.name));
                matcher.never = true;
            }
        } else {
            matcher.query.push((key, m));
        }
    }
}

fn grpc_route_entries(
    r: &GrpcRoute,
    object: &str,
    index: &Index,
    entries: &mut Vec<GatewayEntry>,
    warn: &mut dyn FnMut(&str, String),
) {
    let ns = &r.metadata.namespace;
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        let name = format!("{object}#rules[{i}]");
        let route = gateway_route(&name, ns, &rule.filters, &rule.backend_refs, index, &field, warn);
        if rule.matches.is_empty() {
            entries.push(GatewayEntry {
                path_rank: -1,
                path_len: 0,
                method: false,
                headers: 0,
                query: 0,
                matcher: Matcher::any(),
                route,
            });
            continue;
        }
        for (k, m) in rule.matches.iter().enumerate() {
            let mut warn_match = |f: &str, why: String| warn(&format!("{field}.matches[{k}]{f}"), why);
            let mut matcher = Matcher::any();
            let (rank, len) = match &m.method {
                None => (-1, 0),
                Some(mm) => {
                    let svc = mm.service.as_deref().filter(|s| !s.is_empty());
                    let method = mm.method.as_deref().filter(|s| !s.is_empty());
                    let (rank, path_text, path) = if mm.type_.as_deref() == Some("RegularExpression") {
                        let re = format!("/{}/{}", svc.unwrap_or("[^/]+"), method.unwrap_or("[^/]+"));
                        let m = StrMatch::regex(&re, &mut |why| warn_match(".method", why));
                        (1, re, m)
                    } else {
                        match (svc, method) {
                            (Some(s), Some(m)) => (3, format!("/{s}/{m}"), StrMatch::Exact(format!("/{s}/{m}"))),
                            (Some(s), None) => (2, format!("/{s}/"), StrMatch::Prefix(format!("/{s}/"))),
                            (None, Some(m)) => {
                                let re = format!("/[^/]+/{}", regex::escape(m));
                                let compiled = compile_anchored(&re).map_or(StrMatch::Never, StrMatch::Regex);
                                (1, re, compiled)
                            }
                            (None, None) => (2, "/".to_string(), StrMatch::Prefix("/".into())),
                        }
                    };
                    matcher.never |= matches!(path, StrMatch::Never);
                    matcher.path = PathMatch::Str { m: path, ignore_case: false };
                    (rank, path_text.len())
                }
            };
            name_matches(&m.headers, &mut matcher, true, &mut |why| warn_match(".headers", why));
            entries.push(GatewayEntry {
                path_rank: rank,
                path_len: len,
                method: false,
                headers: m.headers.len(),
                query: 0,
                matcher,
                route: route.clone(),
            });
        }
    }
}

/// The route of a Gateway API rule: its filters and backends. Timeouts and retries are
/// set by the caller (`HTTPRoute` only).
fn gateway_route(
    name: &str,
    ns: &str,
    filters: &[RouteFilter],
    backend_refs: &[BackendRef],
    index: &Index,
    field: &str,
    warn: &mut dyn FnMut(&str, String),
) -> Route {
    let mut route = Route {
        name: name.to_string(),
        action: Action::Forward { backends: Vec::new() },
        rewrite: None,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        timeout: None,
        retry: RetryPolicy::istio_default(),
        fault: None,
        mirrors: Vec::new(),
        cors: None,
    };
    let mut redirect = None;
    for (k, f) in filters.iter().enumerate() {
        let f_field = format!("{field}.filters[{k}]");
        let mut w = |why: String| warn(&f_field, why);
        match f.type_.as_str() {
            "RequestHeaderModifier" => {
                route.request_headers.extend(gateway_header_ops(f.request_header_modifier.as_ref(), &mut w));
            }
            "ResponseHeaderModifier" => {
                route.response_headers.extend(gateway_header_ops(f.response_header_modifier.as_ref(), &mut w));
            }
            "RequestRedirect" => redirect = f.request_redirect.as_ref().map(gateway_redirect),
            "URLRewrite" => {
                if let Some(v) = &f.url_rewrite {
                    route.rewrite = Some(super::Rewrite {
                        path: v.get("path").and_then(gateway_path_modifier),
                        authority: v.get("hostname").and_then(Value::as_str).map(str::to_string),
                    });
                }
            }
            "RequestMirror" => {
                if let Some(v) = &f.request_mirror
                    && let Some(m) = gateway_mirror(v, ns, index, &format!("{name} {f_field}"), &mut w)
                {
                    route.mirrors.push(m);
                }
            }
            "CORS" => route.cors = f.cors.as_ref().map(gateway_cors),
            other => w(format!("filter type {other} is not supported by the waypoint; ignored")),
        }
    }
    if let Some(redirect) = redirect {
        route.action = Action::Redirect(redirect);
        return route;
    }
    if backend_refs.is_empty() {
        // No backends and no filter that answers: nothing to send to (500 for an
        // HTTPRoute, set by its caller).
        route.action = Action::DirectResponse { status: 404, body: None };
        return route;
    }
    let mut backends = Vec::new();
    for (k, b) in backend_refs.iter().enumerate() {
        let place = format!("{name} backendRefs[{k}]");
        let weight = u32::try_from(b.weight.max(0)).unwrap_or(u32::MAX);
        let mut backend = backend_ref(b, ns, weight, index, &place);
        for (j, f) in b.filters.iter().enumerate() {
            let mut w = |why: String| warn(&format!("{field}.backendRefs[{k}].filters[{j}]"), why);
            match f.type_.as_str() {
                "RequestHeaderModifier" => {
                    backend.request_headers.extend(gateway_header_ops(f.request_header_modifier.as_ref(), &mut w));
                }
                "ResponseHeaderModifier" => {
                    backend.response_headers.extend(gateway_header_ops(f.response_header_modifier.as_ref(), &mut w));
                }
                other => w(format!("backend filter type {other} is not supported by the waypoint; ignored")),
            }
        }
        backends.push(backend);
    }
    if backends.iter().all(|b| b.weight == 0) {
        // Gateway API: when every backend has weight 0, answer 500.
        route.action = Action::DirectResponse { status: 500, body: None };
    } else {
        route.action = Action::Forward { backends };
    }
    route
}

/// A `backendRef` (or mirror `backendRef`): a core Service (`name.ns.svc...`), or
/// Istio's `networking.istio.io` `Hostname` (the name is the host, a Service or
/// `ServiceEntry` host). Other kinds are unresolved.
pub(super) fn backend_ref(b: &BackendRef, route_ns: &str, weight: u32, index: &Index, place: &str) -> Backend {
    let ns = b.namespace.as_deref().unwrap_or(route_ns);
    let port = b.port.and_then(|p| u16::try_from(p).ok());
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    match (group, kind) {
        ("" | "core", "Service") | ("networking.istio.io", "Hostname") => {
            index.backend(&b.name, ns, port, None, weight, place)
        }
        _ => {
            let mut backend = index.backend(&b.name, ns, port, None, weight, place);
            backend.unresolved =
                Some(format!("backendRef kind `{group}/{kind}` is not supported (referenced by {place})"));
            backend
        }
    }
}

/// `{set: [{name, value}], add: [...], remove: [name]}`.
fn gateway_header_ops(v: Option<&Value>, warn: &mut dyn FnMut(String)) -> HeaderOps {
    let Some(v) = v else {
        return HeaderOps::default();
    };
    let pairs = |key: &str| -> Vec<(String, String)> {
        v.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p.get("name")?.as_str()?.to_string(), p.get("value")?.as_str()?.to_string())))
            .collect()
    };
    let set = pairs("set");
    let add = pairs("add");
    let remove = strings(v.get("remove"));
    HeaderOps {
        set: header_pairs(set.iter().map(|(k, v)| (k.as_str(), v.as_str())), warn),
        add: header_pairs(add.iter().map(|(k, v)| (k.as_str(), v.as_str())), warn),
        remove: header_names(remove.iter().map(String::as_str), warn),
    }
}

/// `{type: ReplaceFullPath, replaceFullPath}` / `{type: ReplacePrefixMatch,
/// replacePrefixMatch}`; the prefix is filled in per match.
fn gateway_path_modifier(v: &Value) -> Option<PathRewrite> {
    match v.get("type").and_then(Value::as_str)? {
        "ReplaceFullPath" => Some(PathRewrite::Full(v.get("replaceFullPath")?.as_str()?.to_string())),
        "ReplacePrefixMatch" => Some(PathRewrite::Segments {
            prefix: "/".into(),
            replacement: v.get("replacePrefixMatch")?.as_str()?.to_string(),
        }),
        _ => None,
    }
}

/// `{scheme, hostname, path, port, statusCode}`. Without a port: the scheme's default
/// when a scheme is given, else the listener's (the Service port), as the spec says.
fn gateway_redirect(v: &Value) -> Redirect {
    let scheme = v.get("scheme").and_then(Value::as_str).map(str::to_string);
    let port = match v.get("port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()) {
        Some(p) => RedirectPort::Set(p),
        None if scheme.is_some() => RedirectPort::ProtocolDefault,
        None => RedirectPort::RequestPort,
    };
    Redirect {
        scheme,
        host: v.get("hostname").and_then(Value::as_str).map(str::to_string),
        port,
        path: v.get("path").and_then(gateway_path_modifier),
        code: v.get("statusCode").and_then(Value::as_u64).and_then(|c| u16::try_from(c).ok()).unwrap_or(302),
    }
}

/// `{backendRef, percent | fraction: {numerator, denominator (100)}}`; neither: 100 %.
fn gateway_mirror(v: &Value, ns: &str, index: &Index, place: &str, warn: &mut dyn FnMut(String)) -> Option<Mirror> {
    let Some(reference) = v.get("backendRef").and_then(|b| serde_json::from_value::<BackendRef>(b.clone()).ok()) else {
        warn("requestMirror needs a backendRef with a name; no mirror".into());
        return None;
    };
    let percent = if let Some(p) = v.get("percent").and_then(Value::as_f64) {
        p
    } else if let Some(f) = v.get("fraction") {
        let numerator = f.get("numerator").and_then(Value::as_f64).unwrap_or(0.0);
        let denominator = f.get("denominator").and_then(Value::as_f64).unwrap_or(100.0);
        if denominator > 0.0 { numerator * 100.0 / denominator } else { 0.0 }
    } else {
        100.0
    };
    Some(Mirror { backend: backend_ref(&reference, ns, 0, index, place), percent: percent.clamp(0.0, 100.0) })
}

/// Gateway API `CORS` filter: `allowOrigins` (`*`, or `scheme://host[:port]` with a
/// leading `*` label), `allowMethods`, `allowHeaders`, `exposeHeaders`, `maxAge`
/// (seconds, default 5), `allowCredentials`.
fn gateway_cors(v: &Value) -> Cors {
    let origins = strings(v.get("allowOrigins"))
        .into_iter()
        .map(|o| {
            if o == "*" {
                StrMatch::Any
            } else if o.contains('*') {
                let re = regex::escape(&o).replace(r"\*", "[^/]+");
                compile_anchored(&re).map_or(StrMatch::Never, StrMatch::Regex)
            } else {
                StrMatch::Exact(o)
            }
        })
        .collect();
    Cors {
        origins,
        allow_methods: strings(v.get("allowMethods")),
        allow_headers: strings(v.get("allowHeaders")),
        expose_headers: strings(v.get("exposeHeaders")),
        max_age: Some(std::time::Duration::from_secs(v.get("maxAge").and_then(Value::as_u64).unwrap_or(5))),
        allow_credentials: v.get("allowCredentials").and_then(Value::as_bool).unwrap_or(false),
    }
}
