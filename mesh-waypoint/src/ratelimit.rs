//! Local rate limits at the waypoint: which `EnvoyFilter`s (Istio's documented local
//! rate limit shape, parsed and validated by `mesh_common::config::envoy_filter`) apply
//! to a destination ([`applies`]), the token buckets that enforce them
//! ([`RateLimits`], [`Bucket`]) and the decision for one request
//! ([`RateLimits::decide`]). Pure: the caller passes the clock reading and a random
//! roll.
//!
//! Which filters apply at a waypoint for a destination Service (Istio's `EnvoyFilter`
//! reference: `targetRefs` is how a policy reaches a waypoint; a `workloadSelector`
//! selects pods by label in the filter's namespace; a filter without either applies to
//! every proxy of its namespace, and in the root namespace to the whole mesh):
//! - `targetRefs` naming the waypoint's `Gateway` (same namespace): every Service the
//!   waypoint serves;
//! - `targetRefs` naming the destination `Service` (same namespace): that Service only
//!   (as Istio's waypoint attachment of Service-targeted policies);
//! - `workloadSelector.labels`, all present on the waypoint's pod labels, in the
//!   waypoint's namespace or the root namespace (so Istio's documented example, which
//!   selects a sidecar's `app` label, applies when written against the waypoint's
//!   `gateway.networking.k8s.io/gateway-name` label);
//! - neither: in the waypoint's namespace, or the root namespace (mesh-wide).
//!
//! An `HTTP_FILTER` patch's `match.listener.portNumber`, when set, must equal the
//! destination's Service port (the waypoint has one inbound listener; the Service port
//! is what tells its filter chains apart).
//!
//! Buckets and route names. Envoy gives each filter instance its own bucket and each
//! route that carries a per-route config (`HTTP_ROUTE` `MERGE` of
//! `typed_per_filter_config`) its own bucket, used instead of the filter's. Here a
//! filter instance is one filter at one destination (Istio's waypoint builds one
//! filter chain per Service), and a route is the waypoint's route
//! ([`crate::route::Route::name`], `VirtualService/ns/name#http[i]`). Envoy's
//! `routeConfiguration.vhost.route.name` matches the route `name` Istio gives Envoy:
//! the `name` field of the `VirtualService`'s `http[i]` (of the Gateway API rule's `name`
//! for `HTTPRoute`/`GRPCRoute` `rules[i]`), and `default` for the route of a Service
//! without route objects; `route.action: ANY` or no `route` matches every route.
//! `vhost.name` matches the destination when it is one of the names Istio gives that
//! virtual host: `inbound|http|<port>` (sidecar, as in Istio's documentation),
//! `inbound-vip|<port>|http|<host>` (waypoint), `<host>:<port>` or `<host>`.
//!
//! Several filters at one destination run in a chain as Envoy's would: each takes its
//! token in turn and the first that limits answers.
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

pub use mesh_common::config::envoy_filter::{BucketConfig, Fraction, LocalRateLimit, RouteLimit, Scope};
use mesh_common::config::{Config, EnvoyFilter};

use crate::route::{RouteTable, ServiceKind, ServiceRef};

/// The waypoint whose limits are computed: its `Gateway` and its pods' labels.
#[derive(Clone, Copy, Debug)]
pub struct WaypointRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// The labels of the waypoint's pods (at least
    /// `gateway.networking.k8s.io/gateway-name: <name>`, see [`WaypointRef::labels_of`]).
    pub labels: &'a BTreeMap<String, String>,
}

impl WaypointRef<'_> {
    /// The labels every waypoint pod carries: `gateway.networking.k8s.io/gateway-name`.
    pub fn labels_of(name: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(mesh_common::config::gateway::GATEWAY_NAME_LABEL.to_string(), name.to_string())])
    }
}

/// Whether `filter` (with its parsed `limit`) applies at `waypoint` for `service`
/// (see the module doc for the rules). `root` is the mesh's root namespace.
pub fn applies(
    filter: &EnvoyFilter,
    limit: &LocalRateLimit,
    root: &str,
    waypoint: WaypointRef,
    service: &ServiceRef,
) -> bool {
    let ns = filter.metadata.namespace.as_str();
    if limit.port.is_some_and(|p| p != service.port) {
        return false;
    }
    let scope = &limit.scope;
    if !scope.target_refs.is_empty() {
        return scope.target_refs.iter().any(|(kind, name)| match kind.as_str() {
            "Gateway" => ns == waypoint.namespace && name == waypoint.name,
            "Service" => service.kind == ServiceKind::Service && ns == service.namespace && *name == service.name,
            "ServiceEntry" => {
                service.kind == ServiceKind::ServiceEntry && ns == service.namespace && *name == service.name
            }
            _ => false,
        });
    }
    let in_scope = ns == waypoint.namespace || ns == root;
    in_scope && scope.selector.iter().all(|(k, v)| waypoint.labels.get(k) == Some(v))
}

/// The name Istio gives the Envoy route of waypoint route `route_name`: the rule's
/// `name` field (`None` when it has none), `default` for the default route.
fn envoy_route_name<'a>(config: &'a Config, route_name: &'a str) -> Option<&'a str> {
    if route_name == "default" {
        return Some("default");
    }
    let (object, section) = route_name.split_once('#')?;
    let mut parts = object.splitn(3, '/');
    let (kind, ns, name) = (parts.next()?, parts.next()?, parts.next()?);
    let index = |prefix: &str| section.strip_prefix(prefix)?.strip_suffix(']')?.parse::<usize>().ok();
    let is = |m: &mesh_common::config::ObjectMeta| m.namespace == ns && m.name == name;
    match kind {
        "VirtualService" => {
            let vs = config.virtual_services.iter().find(|v| is(&v.metadata))?;
            vs.spec.http.get(index("http[")?)?.name.as_deref()
        }
        "HTTPRoute" => {
            let r = config.http_routes.iter().find(|r| is(&r.metadata))?;
            r.spec.rules.get(index("rules[")?)?.name.as_deref()
        }
        "GRPCRoute" => {
            let r = config.grpc_routes.iter().find(|r| is(&r.metadata))?;
            r.spec.rules.get(index("rules[")?)?.name.as_deref()
        }
        _ => None,
    }
}

/// Whether an `HTTP_ROUTE` patch's virtual host name is the destination's.
fn vhost_matches(vhost: &str, service: &ServiceRef) -> bool {
    let (host, port) = (service.hostname.as_str(), service.port);
    vhost == format!("inbound|http|{port}")
        || vhost == format!("inbound-vip|{port}|http|{host}")
        || vhost == format!("{host}:{port}")
        || vhost == host
}

/// The buckets of one filter at one destination.
#[derive(Debug)]
struct FilterBuckets {
    /// `namespace/name` of the `EnvoyFilter`.
    id: String,
    /// For routes without a per-route limit; `None`: they are not limited.
    filter: Option<Arc<Bucket>>,
    /// By waypoint route name: the routes with a per-route limit.
    routes: BTreeMap<String, Arc<Bucket>>,
}

/// The local rate limits of one destination Service at one waypoint.
#[derive(Debug, Default)]
pub struct RateLimits {
    /// In chain order: root-namespace filters first, then by namespace and name
    /// (Istio orders patches by priority, then namespace; `priority` is not read).
    filters: Vec<FilterBuckets>,
}

impl RateLimits {
    /// The filters of `config` that apply at `waypoint` for `service`, with fresh
    /// buckets for each (see [`RateLimits::carry_over`] to keep the previous ones).
    /// The routes are those [`RouteTable::build`] gives the destination.
    pub fn for_destination(config: &Config, waypoint: WaypointRef, service: &ServiceRef) -> Self {
        let mut applying: Vec<(&EnvoyFilter, LocalRateLimit)> = config
            .envoy_filters
            .iter()
            // The loader validated every filter: an error here means a config that
            // did not pass through it, and such a filter limits nothing.
            .filter_map(|f| f.local_rate_limit().ok().map(|l| (f, l)))
            .filter(|(f, l)| applies(f, l, &config.root_namespace, waypoint, service))
            .collect();
        if applying.is_empty() {
            return Self::default();
        }
        applying.sort_by_key(|(f, _)| {
            (f.metadata.namespace != config.root_namespace, f.metadata.namespace.clone(), f.metadata.name.clone())
        });
        let table = RouteTable::build(config, service);
        let routes: Vec<(&str, Option<&str>)> =
            table.routes().map(|r| (r.name.as_str(), envoy_route_name(config, &r.name))).collect();
        let filters = applying
            .into_iter()
            .map(|(f, limit)| {
                let mut per_route = BTreeMap::new();
                for (route, envoy_name) in &routes {
                    let found = limit.routes.iter().find(|r| {
                        r.vhost.as_deref().is_none_or(|v| vhost_matches(v, service))
                            && r.route.as_deref().is_none_or(|n| Some(n) == *envoy_name)
                    });
                    if let Some(r) = found {
                        per_route.insert((*route).to_string(), Arc::new(Bucket::new(r.config.clone())));
                    }
                }
                FilterBuckets {
                    id: format!("{}/{}", f.metadata.namespace, f.metadata.name),
                    filter: limit.filter.map(|c| Arc::new(Bucket::new(c))),
                    routes: per_route,
                }
            })
            .collect();
        Self { filters }
    }

    /// Keeps the buckets of `previous` (the same destination's limits of the last
    /// config version) whose filter, route and settings are unchanged, so that a
    /// config push does not refill them; the others start full.
    #[must_use]
    pub fn carry_over(mut self, previous: &RateLimits) -> Self {
        let same = |new: &mut Arc<Bucket>, old: Option<&Arc<Bucket>>| {
            if let Some(old) = old.filter(|o| o.config == new.config) {
                *new = Arc::clone(old);
            }
        };
        for f in &mut self.filters {
            let Some(old) = previous.filters.iter().find(|o| o.id == f.id) else { continue };
            if let Some(bucket) = &mut f.filter {
                same(bucket, old.filter.as_ref());
            }
            for (route, bucket) in &mut f.routes {
                same(bucket, old.routes.get(route));
            }
        }
        self
    }

    /// No filter applies: every request passes untouched.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// `namespace/name` of the filters that apply, in chain order.
    pub fn filter_ids(&self) -> impl Iterator<Item = &str> {
        self.filters.iter().map(|f| f.id.as_str())
    }

    /// The bucket that limits `route_name` in each applying filter, in chain order
    /// (a filter without one for this route is left out).
    fn buckets_for<'a>(&'a self, route_name: &'a str) -> impl Iterator<Item = &'a Arc<Bucket>> {
        self.filters.iter().filter_map(move |f| f.routes.get(route_name).or(f.filter.as_ref()))
    }

    /// Decides one request routed by `route_name` (the waypoint's
    /// [`crate::route::Route::name`]) at `now_nanos` (a monotonic clock) with a
    /// uniform `random` roll: each applying filter in turn; the first `Limited`
    /// answers; else `NotEnforced` if any filter was out of tokens, `Allow` if any
    /// took a token, `Skipped` when none looked at the request.
    pub fn decide(&self, route_name: &str, now_nanos: u64, random: u32) -> Decision {
        let mut outcome = Decision::Skipped;
        for (i, bucket) in self.buckets_for(route_name).enumerate() {
            // A roll per filter: independent filters see independent shares.
            let roll = random.wrapping_add((i as u32).wrapping_mul(0x9E37_79B9));
            match bucket.try_take(now_nanos, roll) {
                limited @ Decision::Limited { .. } => return limited,
                Decision::NotEnforced => outcome = Decision::NotEnforced,
                Decision::Allow if outcome == Decision::Skipped => outcome = Decision::Allow,
                Decision::Allow | Decision::Skipped => {}
            }
        }
        outcome
    }
}

/// What the limiter says about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The filter is not enabled for this request (`filter_enabled`); no token taken.
    Skipped,
    /// A token was taken.
    Allow,
    /// Out of tokens and enforced: answer 429 with response flag `RL` and these
    /// headers (`x-envoy-ratelimited: true`, as Envoy's filter sets, then the
    /// configured `response_headers_to_add`).
    Limited { headers: Vec<(String, String)> },
    /// Out of tokens but not enforced for this request (`filter_enforced`): let it
    /// pass, count it as rate limited.
    NotEnforced,
}

/// A token bucket, lock-free: one atomic word holds the fill count (high 32 bits,
/// wrapping) and the tokens (low 32 bits). It starts full at its first use and gains
/// `tokens_per_fill` (up to `max_tokens`) at each `fill_interval` boundary counted
/// from that first use, as Envoy's timer-driven bucket does. Time going backwards
/// adds nothing.
#[derive(Debug)]
pub struct Bucket {
    config: BucketConfig,
    /// The first use in nanoseconds, `u64::MAX` before it.
    origin: AtomicU64,
    state: AtomicU64,
}

impl Bucket {
    pub fn new(config: BucketConfig) -> Self {
        let state = u64::from(config.max_tokens);
        Self { config, origin: AtomicU64::new(u64::MAX), state: AtomicU64::new(state) }
    }

    pub fn config(&self) -> &BucketConfig {
        &self.config
    }

    /// Decides one request at `now_nanos` (any monotonic clock) with a uniform
    /// `random` roll. The roll decides `filter_enabled`; a mix of it decides
    /// `filter_enforced`.
    pub fn try_take(&self, now_nanos: u64, random: u32) -> Decision {
        if !self.config.enabled.hits(random) {
            return Decision::Skipped;
        }
        let origin = match self.origin.compare_exchange(u64::MAX, now_nanos, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => now_nanos,
            Err(o) => o,
        };
        let interval = self.config.fill_interval.as_nanos().max(1) as u64;
        let fill_now = (now_nanos.saturating_sub(origin) / interval) as u32;
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let (fill_then, tokens) = ((current >> 32) as u32, current as u32);
            let fills = fill_now.wrapping_sub(fill_then);
            // A difference past half the range means the clock went back.
            let (fills, fill_next) = if fills > u32::MAX / 2 { (0, fill_then) } else { (fills, fill_now) };
            let refilled = (u64::from(tokens) + u64::from(fills) * u64::from(self.config.tokens_per_fill))
                .min(u64::from(self.config.max_tokens));
            let taken = refilled.checked_sub(1);
            let next = u64::from(fill_next) << 32 | taken.unwrap_or(refilled);
            match self.state.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) if taken.is_some() => return Decision::Allow,
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        if self.config.enforced.hits(random.wrapping_mul(0x9E37_79B9).rotate_left(16)) {
            let mut headers = Vec::with_capacity(self.config.response_headers.len() + 1);
            headers.push((RATELIMITED_HEADER.to_string(), "true".to_string()));
            headers.extend(self.config.response_headers.iter().cloned());
            Decision::Limited { headers }
        } else {
            Decision::NotEnforced
        }
    }
}

/// The response flag of a rate-limited request.
pub const RESPONSE_FLAG: &str = "RL";
/// The header Envoy's local rate limit filter sets on its 429.
pub const RATELIMITED_HEADER: &str = "x-envoy-ratelimited";

#[cfg(test)]
mod tests;
