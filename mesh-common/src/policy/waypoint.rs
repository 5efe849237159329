//! The `AuthorizationPolicy` objects a waypoint enforces, compiled once per
//! configuration version, and the per-request verdict.
//!
//! # Binding (Istio's `targetRefs` rules for waypoints)
//! Only policies with `targetRef`/`targetRefs` apply at a waypoint (selector policies
//! stay with the node agents, which in turn never apply `targetRef` policies). A
//! reference binds when it names:
//! - the waypoint's `Gateway` (`group: gateway.networking.k8s.io`, `kind: Gateway`) in
//!   the policy's namespace: every request through the waypoint;
//! - the waypoint's `GatewayClass` (`kind: GatewayClass`, same group), from a policy in
//!   the root namespace only: every waypoint of that class, mesh-wide;
//! - a `Service` (`group: ""` or `core`) or a `ServiceEntry`
//!   (`group: networking.istio.io`) in the policy's namespace: the requests whose
//!   destination is that service.
//!
//! A reference's own `namespace`, when set, must be the policy's (Istio's rule);
//! otherwise it binds nothing.
//!
//! # Order (Istio's)
//! `CUSTOM` policies first: when one matches, its external authorizer decides
//! ([`WaypointVerdict::Custom`]); when it allows, the waypoint goes on with
//! [`WaypointPolicies::evaluate_after_ext_authz`] (`DENY`, then `AUDIT`, then `ALLOW`,
//! as [`decide`](super::decide) does), on the request as the authorizer left it.
//! A `CUSTOM` policy whose provider the mesh config does not declare denies every
//! request it matches (Istio fails closed the same way). When several `CUSTOM`
//! policies match, the first by `namespace/name` decides (Istio supports one provider
//! per workload).
use std::{collections::BTreeMap, prelude::rust_2024::*};

use super::{Attributes, CompiledPolicy, Peer, Verdict, decide};
use crate::config::{Config, meta::PolicyTargetReference, security::Action};

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";

/// The waypoint doing the enforcement: its `Gateway`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waypoint<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// `spec.gatewayClassName` (`istio-waypoint`).
    pub class: &'a str,
}

/// What a service-bound policy names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TargetKind {
    Service,
    ServiceEntry,
}

/// The destination of one request, as the waypoint's routing resolved it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub kind: TargetKind,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// The waypoint's verdict on one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaypointVerdict {
    /// The `AUDIT` policies that matched, sorted.
    Allow { audited_by: Vec<String> },
    /// Answer 403 `RBAC: access denied`, response flag `RBAC`.
    Deny { policy: Option<String>, reason: String },
    /// Ask the external authorizer `provider` (a declared `extensionProviders` entry);
    /// its denial is answered with flag `UAEX`. When it allows, call
    /// [`WaypointPolicies::evaluate_after_ext_authz`].
    Custom { provider: String, policy: String },
}

/// Every policy bound to one waypoint, compiled. Build it once per configuration
/// version; evaluating a request parses nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointPolicies {
    /// Sorted by id.
    policies: Vec<CompiledPolicy>,
    /// Indexes of the policies bound to the waypoint itself (every request).
    everywhere: Vec<usize>,
    /// Indexes of the policies bound to one destination.
    by_target: BTreeMap<(TargetKind, String, String), Vec<usize>>,
    /// `CUSTOM` providers that are not declared as `ext_authz` providers.
    undeclared: Vec<String>,
    trust_domain: String,
}

impl WaypointPolicies {
    /// Selects and compiles the policies of `config` that bind to `waypoint`. A
    /// `CUSTOM` policy's provider must be one of the `ext_authz` `extensionProviders`
    /// of [`Config::mesh`].
    pub fn new(config: &Config, waypoint: &Waypoint) -> Self {
        let ext_authz_providers = config.mesh.ext_authz_providers();
        let mut out = Self { trust_domain: config.trust_domain.clone(), ..Self::default() };
        let mut bound: Vec<_> = config
            .authorization_policies
            .iter()
            .filter_map(|p| {
                let ns = p.metadata.namespace.as_str();
                let refs: Vec<&PolicyTargetReference> = p.spec.target_ref.iter().chain(&p.spec.target_refs).collect();
                let mut everywhere = false;
                let mut targets = Vec::new();
                for r in refs {
                    match binding(r, ns, &config.root_namespace, waypoint) {
                        Some(Binding::Waypoint) => everywhere = true,
                        Some(Binding::Target(kind)) => targets.push((kind, ns.to_string(), r.name.clone())),
                        None => {}
                    }
                }
                (everywhere || !targets.is_empty()).then(|| (CompiledPolicy::compile(p), everywhere, targets))
            })
            .collect();
        bound.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        for (index, (policy, everywhere, targets)) in bound.into_iter().enumerate() {
            if let Some(provider) = policy.provider.as_ref().filter(|_| policy.action == Action::Custom)
                && !ext_authz_providers.contains(&provider.as_str())
                && !out.undeclared.contains(provider)
            {
                out.undeclared.push(provider.clone());
            }
            if everywhere {
                out.everywhere.push(index);
            } else {
                for target in targets {
                    out.by_target.entry(target).or_default().push(index);
                }
            }
            out.policies.push(policy);
        }
        out
    }

    /// The ids of the policies that apply to a request for `target` (`None`: a
    /// destination that is neither a `Service` nor a `ServiceEntry`), sorted.
    pub fn applicable(&self, target: Option<&Target>) -> impl Iterator<Item = &CompiledPolicy> + Clone {
        let by_target = target
            .and_then(|t| self.by_target.get(&(t.kind, t.namespace.to_string(), t.name.to_string())))
            .map_or(&[][..], Vec::as_slice);
        // Both lists are sorted (indexes follow the sorted policies): merge them.
        let (mut a, mut b) = (self.everywhere.as_slice(), by_target);
        let mut merged = Vec::with_capacity(a.len() + b.len());
        while let (Some(&x), Some(&y)) = (a.first(), b.first()) {
            if x <= y {
                merged.push(x);
                a = &a[1..];
                if x == y {
                    b = &b[1..];
                }
            } else {
                merged.push(y);
                b = &b[1..];
            }
        }
        merged.extend_from_slice(a);
        merged.extend_from_slice(b);
        merged.into_iter().map(|i| &self.policies[i])
    }

    /// The verdict on one request (`attrs.http` set; without it, HTTP attributes are
    /// unknown as at L4). See the module documentation for the order.
    pub fn evaluate(&self, target: Option<&Target>, attrs: &Attributes) -> WaypointVerdict {
        let policies = self.applicable(target);
        let peer = Peer::new(attrs, &self.trust_domain);
        // A CUSTOM rule that cannot be fully evaluated still sends the request to the
        // authorizer: the stricter of the two outcomes.
        let custom = policies.clone().filter(|p| p.action == Action::Custom).find_map(|p| {
            let index = p.first_match(&peer, true)?;
            Some((p, index))
        });
        if let Some((policy, index)) = custom {
            let provider = policy.provider.clone().unwrap_or_default();
            if provider.is_empty() || self.undeclared.contains(&provider) {
                return WaypointVerdict::Deny {
                    policy: Some(policy.id.clone()),
                    reason: format!(
                        "denied by CUSTOM policy {} (rule {index}): provider `{provider}` is not an ext_authz provider \
                         of the mesh config's extensionProviders (fail closed)",
                        policy.id
                    ),
                };
            }
            return WaypointVerdict::Custom { provider, policy: policy.id.clone() };
        }
        match self.evaluate_after_ext_authz(target, attrs) {
            Verdict::Allow { audited_by } => WaypointVerdict::Allow { audited_by },
            Verdict::Deny { policy, reason } => WaypointVerdict::Deny { policy, reason },
        }
    }

    /// `DENY`, `AUDIT`, then `ALLOW`: the verdict without `CUSTOM` policies, for a
    /// request the external authorizer allowed (with the headers it added).
    pub fn evaluate_after_ext_authz(&self, target: Option<&Target>, attrs: &Attributes) -> Verdict {
        decide(&self.applicable(target), attrs, &self.trust_domain)
    }

    /// Providers named by `CUSTOM` policies that the mesh config does not declare.
    pub fn undeclared_providers(&self) -> &[String] {
        &self.undeclared
    }
}

enum Binding {
    Waypoint,
    Target(TargetKind),
}

fn binding(r: &PolicyTargetReference, policy_ns: &str, root_ns: &str, waypoint: &Waypoint) -> Option<Binding> {
    if !r.namespace.is_empty() && r.namespace != policy_ns {
        return None;
    }
    match (r.group.as_str(), r.kind.as_str()) {
        (GATEWAY_GROUP, "Gateway") => {
            (policy_ns == waypoint.namespace && r.name == waypoint.name).then_some(Binding::Waypoint)
        }
        (GATEWAY_GROUP, "GatewayClass") => {
            (policy_ns == root_ns && r.name == waypoint.class).then_some(Binding::Waypoint)
        }
        ("" | "core", "Service") => Some(Binding::Target(TargetKind::Service)),
        (ISTIO_NETWORKING_GROUP, "ServiceEntry") => Some(Binding::Target(TargetKind::ServiceEntry)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
