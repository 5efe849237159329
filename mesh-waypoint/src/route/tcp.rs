//! L4 routing of a Service port the waypoint relays as TCP: `TCPRoute`s attached to the
//! Service (Gateway API, GAMMA) win; else the `tcp` rules of the `VirtualService`s that
//! name it, in order, first matching rule wins; else the Service itself.
//!
//! A `VirtualService` `tcp` match reads what a TCP connection has: the Service `port`,
//! the caller's `sourceLabels` and `sourceNamespace`, `sourceSubnet` (the client's
//! address) and `destinationSubnets` (the Service address the client dialled);
//! `gateways` must be empty or name `mesh`.
use std::{collections::BTreeMap, net::IpAddr};

use mesh_common::config::{Config, IpNet, networking::L4MatchAttributes};

use super::{Backend, ServiceRef, build};

/// What an L4 match reads of a connection.
#[derive(Clone, Copy, Debug)]
pub struct TcpRequest<'a> {
    /// The Service port.
    pub port: u16,
    /// The Service address the client dialled.
    pub destination: IpAddr,
    pub source: IpAddr,
    pub source_namespace: &'a str,
    pub source_labels: &'a BTreeMap<String, String>,
}

/// One L4 route: the backends a matching connection is spread over by weight.
#[derive(Clone, Debug)]
pub struct TcpRoute {
    /// `VirtualService/ns/name#tcp[0]`, `TCPRoute/ns/name#rules[0]` or `default`.
    pub name: String,
    pub backends: Vec<Backend>,
}

impl TcpRoute {
    /// The backend for a uniform `roll` (see [`super::Route::pick_backend`]).
    pub fn pick_backend(&self, roll: u64) -> Option<&Backend> {
        super::pick_weighted(&self.backends, roll)
    }
}

#[derive(Clone, Debug, Default)]
struct TcpMatch {
    port: Option<u16>,
    destination_subnets: Vec<IpNet>,
    source_subnet: Option<IpNet>,
    source_namespace: Option<String>,
    source_labels: BTreeMap<String, String>,
}

impl TcpMatch {
    fn matches(&self, req: &TcpRequest) -> bool {
        self.port.is_none_or(|p| p == req.port)
            && (self.destination_subnets.is_empty()
                || self.destination_subnets.iter().any(|n| n.contains(&req.destination)))
            && self.source_subnet.as_ref().is_none_or(|n| n.contains(&req.source))
            && self.source_namespace.as_deref().is_none_or(|ns| ns == req.source_namespace)
            && self.source_labels.iter().all(|(k, v)| req.source_labels.get(k) == Some(v))
    }
}

/// The compiled L4 routing of one Service port.
#[derive(Clone, Debug)]
pub struct TcpTable {
    entries: Vec<(TcpMatch, TcpRoute)>,
    configured: bool,
    warnings: Vec<String>,
}

impl TcpTable {
    /// Compiles the L4 routing of `service`; never fails (see [`super::RouteTable::build`]).
    pub fn build(config: &Config, service: &ServiceRef) -> Self {
        let mut warnings = Vec::new();
        let mut entries = Vec::new();
        // Route objects apply even when none of their matches could be kept: then
        // nothing matches (refused), rather than the default route.
        let mut configured = false;
        let index = build::Index::new(config);
        let attached: Vec<_> = config
            .tcp_routes
            .iter()
            .filter(|r| r.spec.parent_refs.iter().any(|p| build::targets_service(p, &r.metadata.namespace, service)))
            .collect();
        if attached.is_empty() {
            for vs in config.virtual_services.iter().filter(|vs| build::vs_applies(vs, service)) {
                let ns = &vs.metadata.namespace;
                let object = format!("VirtualService/{ns}/{}", vs.metadata.name);
                for (i, rule) in vs.spec.tcp.iter().enumerate() {
                    configured = true;
                    let name = format!("{object}#tcp[{i}]");
                    let backends = rule
                        .route
                        .iter()
                        .enumerate()
                        .map(|(k, d)| {
                            let weight = u32::try_from(d.weight).unwrap_or(0);
                            build::destination(&d.destination, ns, weight, &index, &format!("{name}.route[{k}]"))
                        })
                        .collect::<Vec<_>>();
                    let route = TcpRoute { name, backends };
                    if rule.match_.is_empty() {
                        entries.push((TcpMatch::default(), route));
                        continue;
                    }
                    for (k, m) in rule.match_.iter().enumerate() {
                        if !build::for_mesh(&m.gateways) {
                            continue;
                        }
                        let field = format!("{object}: spec.tcp[{i}].match[{k}]");
                        if let Some(matcher) = tcp_match(m, &field, &mut warnings) {
                            entries.push((matcher, route.clone()));
                        }
                    }
                }
            }
        } else {
            let mut attached = attached;
            attached.sort_by(|a, b| {
                (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
            });
            // TCPRoute has no matches: the first rule of the oldest route takes the
            // connection (the model keeps no age: `namespace/name` order).
            configured = true;
            for r in attached {
                let ns = &r.metadata.namespace;
                let object = format!("TCPRoute/{ns}/{}", r.metadata.name);
                for (i, rule) in r.spec.rules.iter().enumerate() {
                    let name = format!("{object}#rules[{i}]");
                    let backends = rule
                        .backend_refs
                        .iter()
                        .enumerate()
                        .map(|(k, b)| {
                            let weight = u32::try_from(b.weight.max(0)).unwrap_or(u32::MAX);
                            build::backend_ref(b, ns, weight, &index, &format!("{name}.backendRefs[{k}]"))
                        })
                        .collect();
                    entries.push((TcpMatch::default(), TcpRoute { name, backends }));
                }
            }
        }
        if !configured {
            let backends = vec![build::default_backend(service)];
            entries.push((TcpMatch::default(), TcpRoute { name: "default".into(), backends }));
        }
        Self { entries, configured, warnings }
    }

    /// The route of the first entry that matches; `None` when routes apply and none
    /// matches (the connection is refused, flag `NR`).
    pub fn select(&self, req: &TcpRequest) -> Option<&TcpRoute> {
        self.entries.iter().find(|(m, _)| m.matches(req)).map(|(_, r)| r)
    }

    /// Whether the routes come from route objects (not the default route).
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// What was left out or cannot match, one line each.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// A `tcp` match, or `None` (with a warning) when it can never match as written.
fn tcp_match(m: &L4MatchAttributes, field: &str, warnings: &mut Vec<String>) -> Option<TcpMatch> {
    let subnet = |s: &str, what: &str, warnings: &mut Vec<String>| match s.parse::<IpNet>() {
        Ok(net) => Some(net),
        Err(error) => {
            warnings.push(format!("{field}.{what}: `{s}` is not an address or CIDR ({error}); match left out"));
            None
        }
    };
    let mut destination_subnets = Vec::new();
    for s in &m.destination_subnets {
        destination_subnets.push(subnet(s, "destinationSubnets", warnings)?);
    }
    let source_subnet = match &m.source_subnet {
        Some(s) => Some(subnet(s, "sourceSubnet", warnings)?),
        None => None,
    };
    Some(TcpMatch {
        port: m.port.and_then(|p| u16::try_from(p).ok()),
        destination_subnets,
        source_subnet,
        source_namespace: m.source_namespace.clone(),
        source_labels: m.source_labels.clone(),
    })
}
