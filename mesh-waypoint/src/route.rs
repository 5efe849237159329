//! The route phase: the L7 routing configuration of one Service port, compiled once into
//! an immutable [`RouteTable`], and the pure decisions the proxy asks of it: which
//! route a request takes ([`RouteTable::select`]), which backend gets it
//! ([`Route::pick_backend`]), how its path is rewritten, whether a fault or a mirror
//! fires, the CORS answer. Values in, values out: randomness comes in as rolls.
//!
//! Sources, in the order [`RouteTable::build`] consults them:
//! - Gateway API `HTTPRoute` and `GRPCRoute` whose `parentRefs` name the Service (GAMMA);
//!   their rules are ordered as the Gateway API spec orders them (see [`build`]).
//! - Else the `VirtualService`s whose `hosts` name the Service, for the mesh, in order,
//!   first matching rule wins; a rule with `delegate` is replaced, in place, by the
//!   delegate's rules merged with it (see [`delegate`]).
//! - Else one default route to the Service itself with Istio's default retries.
//!
//! When route objects apply but no rule matches, [`RouteTable::select`] answers `None`:
//! the proxy answers 404 with flag `NR`, as Envoy does.
//!
//! Routes whose `parentRefs` name the waypoint's own `Gateway` are not attached, as in
//! Istio (see [`waypoint_parent_warnings`] and the decisions in [`build`]).
use std::{collections::BTreeMap, time::Duration};

use http::HeaderMap;

use crate::retry::RetryPolicy;

mod build;
mod delegate;
mod filters;
mod matcher;
mod tcp;
#[cfg(test)]
mod tests;

pub use delegate::{DelegateError, has_conflict, merge_matches, merge_rule};
pub use filters::{Abort, Cors, Fault, FaultDecision, HeaderOps, Mirror, PathRewrite, Redirect, RedirectPort};
pub use tcp::{TcpRequest, TcpRoute, TcpTable};

use matcher::Matcher;
pub use mesh_proxy::workloads::ServiceKind;

/// The Service port being routed: what the waypoint found by the request's authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub kind: ServiceKind,
    pub namespace: String,
    /// The `Service`'s or `ServiceEntry`'s name.
    pub name: String,
    /// `name.namespace.svc.cluster.local`, or the `ServiceEntry`'s host.
    pub hostname: String,
    pub port: u16,
}

impl ServiceRef {
    /// A Service of the cluster's DNS domain.
    pub fn new(namespace: &str, name: &str, port: u16) -> Self {
        Self {
            kind: ServiceKind::Service,
            namespace: namespace.to_string(),
            name: name.to_string(),
            hostname: format!("{name}.{namespace}.svc.{}", mesh_common::config::DNS_DOMAIN),
            port,
        }
    }

    /// Host `hostname` of `ServiceEntry` `name`.
    pub fn entry(namespace: &str, name: &str, hostname: &str, port: u16) -> Self {
        Self {
            kind: ServiceKind::ServiceEntry,
            namespace: namespace.to_string(),
            name: name.to_string(),
            hostname: hostname.to_string(),
            port,
        }
    }
}

/// The waypoint itself: its `Gateway` (class `istio-waypoint`) by namespace and name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaypointGateway<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

/// One line per `parentRefs` entry of an `HTTPRoute`, `GRPCRoute`, `TCPRoute` or
/// `TLSRoute` that names `waypoint`'s `Gateway`: such a reference attaches nothing (Istio
/// accepts no route kind on a waypoint's HBONE listener), so the route does not apply
/// through it. For the log, once per configuration version.
pub fn waypoint_parent_warnings(config: &mesh_common::config::Config, waypoint: WaypointGateway<'_>) -> Vec<String> {
    build::waypoint_parent_warnings(config, waypoint)
}

/// What matching reads of a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    /// Path and query as received (`/a/b?x=1`); matched without normalization.
    pub path: &'a str,
    /// `:authority` / `Host`, with the port when the client sent one.
    pub authority: &'a str,
    /// `http` or `https` as the client used it.
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    /// The Service port the request came in on.
    pub port: u16,
    /// Namespace of the caller's identity.
    pub source_namespace: &'a str,
    /// Labels of the calling workload.
    pub source_labels: &'a BTreeMap<String, String>,
}

impl RequestParts<'_> {
    /// The path without the query.
    pub fn path_only(&self) -> &str {
        self.path.split_once('?').map_or(self.path, |(p, _)| p)
    }

    /// The query without the `?`, empty when there is none.
    pub fn query(&self) -> &str {
        self.path.split_once('?').map_or("", |(_, q)| q)
    }
}

/// One route: what a matching request gets.
#[derive(Clone, Debug)]
pub struct Route {
    /// Stable name for telemetry and logs: `VirtualService/ns/name#http[2]`,
    /// `HTTPRoute/ns/name#rules[0]`, `GRPCRoute/ns/name#rules[1]`, or `default` for the
    /// route of a Service without route objects.
    pub name: String,
    pub action: Action,
    /// Path and authority rewrite before forwarding.
    pub rewrite: Option<Rewrite>,
    /// Header operations on the request. The proxy applies the chosen backend's
    /// operations first, then these: Envoy's order (weighted cluster, then route), so
    /// the route's `set` wins over the backend's.
    pub request_headers: HeaderOps,
    /// Header operations on the response, in the same order.
    pub response_headers: HeaderOps,
    /// Whole-request timeout (`VirtualService` `timeout`, `HTTPRoute` `timeouts.request`);
    /// `None`: no timeout, Istio's default for the mesh.
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    pub cors: Option<Cors>,
}

/// What the proxy does with a matching request.
#[derive(Clone, Debug)]
pub enum Action {
    /// Send it to one of the backends, chosen by weight.
    Forward { backends: Vec<Backend> },
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer directly.
    DirectResponse { status: u16, body: Option<Vec<u8>> },
}

/// A destination of a route: a Service (or `ServiceEntry` host), maybe one subset of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    /// Fully qualified host (`reviews.shop.svc.cluster.local`, `api.example.com`).
    pub host: String,
    /// Namespace of the Service or `ServiceEntry` (the route's when unknown).
    pub namespace: String,
    /// Port; `None`: the port the request came in on.
    pub port: Option<u16>,
    /// A `DestinationRule` subset.
    pub subset: Option<String>,
    /// Relative weight.
    pub weight: u32,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// Why the backend cannot be reached (unknown host, port or subset): the proxy
    /// answers [`Backend::unresolved_status`] with flag `NR` for requests that pick it.
    pub unresolved: Option<String>,
    /// 503 (Istio's answer), or 500 for an `HTTPRoute`'s backendRef (the Gateway API
    /// spec's).
    pub unresolved_status: u16,
}

/// Rewrites applied to a forwarded request.
#[derive(Clone, Debug)]
pub struct Rewrite {
    pub path: Option<PathRewrite>,
    /// New `:authority` / `Host`.
    pub authority: Option<String>,
}

/// The compiled routing of one Service port.
#[derive(Clone, Debug)]
pub struct RouteTable {
    /// (matcher, route) in the order they are tried; the first match wins.
    entries: Vec<(Matcher, Route)>,
    /// Whether route objects applied (else the one entry is the default route).
    configured: bool,
    warnings: Vec<String>,
}

impl RouteTable {
    /// Compiles the routing of `service` from `config`. Never fails: what cannot be
    /// used is left out (or never matches) and reported in [`RouteTable::warnings`].
    pub fn build(config: &mesh_common::config::Config, service: &ServiceRef) -> Self {
        build::build(config, service)
    }

    /// The route of the first entry that matches `req`; `None` when route objects
    /// apply but none matches (404 `NR`).
    pub fn select(&self, req: &RequestParts) -> Option<&Route> {
        self.entries.iter().find(|(m, _)| m.matches(req)).map(|(_, r)| r)
    }

    /// Whether the routes come from route objects (not the default route).
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// Every route, in match order (a rule with several matches appears once per match).
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.entries.iter().map(|(_, r)| r)
    }

    /// What was left out or cannot match, one line each, naming the object and field.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

impl Route {
    /// The backend for a uniform `roll`: backends get `weight / sum` of the rolls; when
    /// all weights are 0 (a single destination without weight) the first gets all.
    /// `None` when the route does not forward.
    pub fn pick_backend(&self, roll: u64) -> Option<&Backend> {
        let Action::Forward { backends } = &self.action else {
            return None;
        };
        pick_weighted(backends, roll)
    }

    /// The rewritten path and query for a forwarded request, or `None` when the route
    /// does not rewrite the path. The query is kept.
    pub fn rewrite_path(&self, path_and_query: &str) -> Option<String> {
        let rewrite = self.rewrite.as_ref()?.path.as_ref()?;
        Some(rewrite.apply(path_and_query))
    }
}

/// The backend for a uniform `roll`: backends get `weight / sum` of the rolls; when all
/// weights are 0 (a single destination without weight) the first gets all.
fn pick_weighted(backends: &[Backend], roll: u64) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return backends.first();
    }
    let mut point = roll % total;
    for backend in backends {
        let weight = u64::from(backend.weight);
        if point < weight {
            return Some(backend);
        }
        point -= weight;
    }
    backends.last()
}
