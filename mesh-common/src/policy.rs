//! Authorization: Istio's `AuthorizationPolicy` and `PeerAuthentication`, evaluated at
//! L4 the way ztunnel enforces them in ambient mode, and at L7 by the waypoint, with one
//! compiled matcher ([`CompiledPolicy`], in `engine`) for both.
//!
//! Pure logic over the [`Config`] model: [`authorize`] decides whether a connection may
//! reach a workload, [`mtls_mode`] whether the workload's port accepts plaintext,
//! [`WaypointPolicies`] (built once per configuration version) decides on an HTTP
//! request at a waypoint. All return what decided, so that callers can log and count it.
//!
//! Which `AuthorizationPolicy` objects apply to a workload at L4: those of the root
//! namespace without a selector (mesh-wide), those of the root namespace whose selector
//! matches the workload (in any namespace), and those of the workload's namespace
//! without a selector or with a matching one (`matchLabels` a subset of the workload's
//! labels). Policies with `targetRef`/`targetRefs` bind to waypoints (see `waypoint`)
//! and are not applied here; `CUSTOM` policies (external authorizers) are enforced by
//! waypoints, never at L4, and are skipped as well.
//!
//! The decision ([`decide`]): a matching `DENY` policy denies; otherwise the matching
//! `AUDIT` policies are recorded (they never change the decision); otherwise the
//! request is allowed when no `ALLOW` policy applies, and when one does, only if some
//! `ALLOW` policy matches. A policy matches when one of its rules does (so an `ALLOW`
//! policy without rules admits nothing, Istio's "deny all"); a rule matches when one of
//! its `from` entries (if any), one of its `to` entries (if any) and all its `when`
//! conditions match; in a source or an operation, every field that is set must match.
//!
//! Attributes that only exist at L7 (`requestPrincipals`, `hosts`, `methods`, `paths`,
//! `request.*` and `connection.sni` conditions) cannot be checked on a TCP connection,
//! and `experimental.*` keys are checked nowhere. As Istio does when it builds TCP
//! filters, the evaluation errs on the side of denying: an `ALLOW` rule that needs an
//! unknown attribute never matches (it cannot admit anything), and a `DENY` (or `AUDIT`)
//! rule is evaluated on its other parts alone, matching when they do. Either way the
//! verdict's reason names the policy, the rule and the attribute.
use std::{net::IpAddr, prelude::rust_2024::*};

use crate::config::{
    Config,
    meta::{Labels, ObjectMeta, WorkloadSelector},
    security::{Action, AuthorizationPolicy, MtlsMode, PeerAuthentication},
};

mod engine;
mod waypoint;

use engine::Peer;
#[cfg(test)]
use engine::wildcard_matches;
pub use engine::{Attributes, Auth, CompiledPolicy, Http, header_value};
pub use waypoint::{Target, TargetKind, Waypoint, WaypointPolicies, WaypointVerdict};

/// The inbound connection being authorized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection<'a> {
    /// The client's SPIFFE identity from its verified certificate, such as
    /// `spiffe://cluster.local/ns/shop/sa/web`; `None` for a plaintext connection.
    pub source_identity: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

/// The workload the connection is for: what selects the policies that apply to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub labels: &'a Labels,
}

/// The outcome of [`authorize`]. Policies are named `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow {
        /// The `AUDIT` policies that matched, sorted.
        audited_by: Vec<String>,
    },
    Deny {
        /// The `DENY` policy that matched; `None` when the connection is denied because
        /// `ALLOW` policies apply and none of them matched.
        policy: Option<String>,
        /// One line for the access log, such as `denied by DENY policy shop/deny-legacy
        /// (rule 0)` or `no ALLOW policy matched (policies: shop/allow-web)`, followed by
        /// the rules that needed L7 attributes.
        reason: String,
    },
}

impl Verdict {
    pub fn is_allow(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }
}

/// The `PeerAuthentication` mode in force on one port of a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectiveMtls {
    /// `Strict`, `Permissive` or `Disable`; never `Unset`.
    pub mode: MtlsMode,
    /// The policy (`namespace/name`) that set the mode; `None` for the mesh default,
    /// `PERMISSIVE`.
    pub policy: Option<String>,
}

impl EffectiveMtls {
    /// Whether a plaintext connection is accepted: in every mode but `STRICT`.
    pub fn accepts_plaintext(&self) -> bool {
        self.mode != MtlsMode::Strict
    }
}

/// Decides whether `conn` may reach `workload` under the `AuthorizationPolicy` objects of
/// `config` (see the module documentation for the semantics).
///
/// The policies that apply are compiled on each call ([`NodePolicies`] compiles them
/// once); the evaluation is the one the waypoint runs ([`decide`]), with every HTTP
/// attribute unknown.
pub fn authorize(config: &Config, workload: &Workload, conn: &Connection) -> Verdict {
    let mut policies: Vec<CompiledPolicy> = config
        .authorization_policies
        .iter()
        .filter(|p| applies(config, p, workload))
        .map(CompiledPolicy::compile)
        .collect();
    // Sorted, so that the policy a reason names does not depend on input order.
    policies.sort_by(|a, b| a.id.cmp(&b.id));
    decide(&policies.iter(), &attributes(conn), &config.trust_domain)
}

/// The L4 policies of a configuration compiled once (per configuration version), for
/// a node agent that authorizes many connections: [`NodePolicies::authorize`] decides
/// as [`authorize`] does without compiling anything per connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePolicies {
    /// Sorted by id; each with its selector (`None`: the whole namespace).
    policies: Vec<(CompiledPolicy, String, Option<WorkloadSelector>)>,
    root_namespace: String,
    trust_domain: String,
}

impl NodePolicies {
    pub fn new(config: &Config) -> Self {
        let mut policies: Vec<_> = config
            .authorization_policies
            .iter()
            .filter(|p| is_l4_policy(p))
            .map(|p| (CompiledPolicy::compile(p), p.metadata.namespace.clone(), p.spec.selector.clone()))
            .collect();
        policies.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        Self { policies, root_namespace: config.root_namespace.clone(), trust_domain: config.trust_domain.clone() }
    }

    /// [`authorize`], on the compiled policies.
    pub fn authorize(&self, workload: &Workload, conn: &Connection) -> Verdict {
        let applicable = self
            .policies
            .iter()
            .filter(|(_, ns, selector)| {
                (*ns == self.root_namespace || ns == workload.namespace) && selects(selector.as_ref(), workload.labels)
            })
            .map(|(policy, _, _)| policy);
        decide(&applicable, &attributes(conn), &self.trust_domain)
    }
}

fn attributes<'a>(conn: &Connection<'a>) -> Attributes<'a> {
    Attributes {
        source_identity: conn.source_identity,
        source_ip: conn.source_ip,
        destination_ip: conn.destination_ip,
        destination_port: conn.destination_port,
        http: None,
    }
}

/// The `DENY`, `AUDIT` and `ALLOW` evaluation of `policies` (sorted by id; `CUSTOM`
/// ones are skipped: the caller decides on them first), shared by both layers.
///
/// A matching `DENY` policy denies; otherwise the matching `AUDIT` policies are
/// recorded; otherwise the request is allowed when no `ALLOW` policy applies, and when
/// one does, only if one of them matches. Attributes the layer cannot see count as
/// matching for `DENY`/`AUDIT` rules and as not matching for `ALLOW` rules; the reason
/// names each rule that was affected.
pub fn decide<'p>(
    policies: &(impl Iterator<Item = &'p CompiledPolicy> + Clone),
    attrs: &Attributes,
    trust_domain: &str,
) -> Verdict {
    let peer = Peer::new(attrs, trust_domain);
    let http = attrs.http.is_some();
    let (layer, attribute_kind, parts) =
        if http { ("the waypoint", "unsupported attribute", "other") } else { ("L4", "L7 attribute", "L4") };
    let of_action = |action: Action| policies.clone().filter(move |p| p.action == action);

    for policy in of_action(Action::Deny) {
        if let Some(index) = policy.first_match(&peer, true) {
            let id = &policy.id;
            let reason = match policy.rules[index].unknown_attribute(http) {
                None => format!("denied by DENY policy {id} (rule {index})"),
                Some(attribute) => format!(
                    "denied by DENY policy {id} (rule {index}); DENY policy {id} rule {index} needs {attribute_kind} \
                     `{attribute}`; not enforceable at {layer}, matched on its {parts} parts alone (fail closed)"
                ),
            };
            return Verdict::Deny { policy: Some(id.clone()), reason };
        }
    }

    let audited_by =
        of_action(Action::Audit).filter(|p| p.first_match(&peer, true).is_some()).map(|p| p.id.clone()).collect();

    let mut allow = of_action(Action::Allow).peekable();
    if allow.peek().is_none() {
        return Verdict::Allow { audited_by };
    }
    let mut unenforceable = Vec::new();
    let mut names = Vec::new();
    for policy in allow {
        if policy.first_match(&peer, false).is_some() {
            return Verdict::Allow { audited_by };
        }
        names.push(policy.id.as_str());
        for (index, rule) in policy.rules.iter().enumerate() {
            if let Some(attribute) = rule.unknown_attribute(http) {
                unenforceable.push(format!(
                    "ALLOW policy {} rule {index} needs {attribute_kind} `{attribute}`; not enforceable at {layer}",
                    policy.id
                ));
            }
        }
    }
    let mut reason = format!("no ALLOW policy matched (policies: {})", names.join(", "));
    for line in unenforceable {
        reason.push_str("; ");
        reason.push_str(&line);
    }
    Verdict::Deny { policy: None, reason }
}

/// The `PeerAuthentication` mode of `workload`'s `port`.
///
/// From the most specific scope to the least: the port's entry in `portLevelMtls`, then
/// `mtls`, of the policy in the workload's namespace whose selector matches it; the
/// namespace's policy without a selector; the root namespace's policy without a
/// selector. `UNSET` (or no `mtls`) inherits from the next scope; the default is
/// `PERMISSIVE`. Root-namespace policies with a selector are ignored, as in Istio.
/// Where a scope has several policies the oldest wins, as in Istio (then the first
/// name; manifests from files have no creation time, so the name alone decides).
pub fn mtls_mode(config: &Config, workload: &Workload, port: u16) -> EffectiveMtls {
    mtls_mode_at(config, workload, Some(port))
}

/// `PeerAuthentication` STRICT as the kernel applies it to a workload: whether
/// plaintext is refused on the ports without a port-level setting, and the ports
/// whose setting says otherwise (each with whether it is STRICT).
pub fn strict_ports(config: &Config, workload: &Workload) -> (bool, Vec<(u16, bool)>) {
    let strict = |m: EffectiveMtls| m.mode == MtlsMode::Strict;
    let default = strict(mtls_mode_at(config, workload, None));
    let mut overrides: Vec<(u16, bool)> = config
        .peer_authentications
        .iter()
        .filter(|pa| pa.metadata.namespace == workload.namespace)
        .flat_map(|pa| pa.spec.port_level_mtls.keys())
        .filter_map(|port| u16::try_from(*port).ok())
        .map(|port| (port, strict(mtls_mode(config, workload, port))))
        .filter(|(_, port_strict)| *port_strict != default)
        .collect();
    overrides.sort_unstable();
    overrides.dedup();
    (default, overrides)
}

/// [`mtls_mode`]; without a port, the mode of the ports no port-level setting names.
fn mtls_mode_at(config: &Config, workload: &Workload, port: Option<u16>) -> EffectiveMtls {
    let has_selector = |pa: &PeerAuthentication| pa.spec.selector.as_ref().is_some_and(|s| !s.match_labels.is_empty());
    let first = |ns: &str, selected: bool| {
        config
            .peer_authentications
            .iter()
            .filter(|pa| pa.metadata.namespace == ns && has_selector(pa) == selected)
            .filter(|pa| !selected || selects(pa.spec.selector.as_ref(), workload.labels))
            .min_by(|a, b| a.metadata.age_order(&b.metadata))
    };
    let workload_policy = first(workload.namespace, true);
    let mode = |pa: &PeerAuthentication| pa.spec.mtls.as_ref().map_or(MtlsMode::Unset, |m| m.mode);
    let port_mode = workload_policy
        .zip(port)
        .and_then(|(pa, port)| pa.spec.port_level_mtls.get(&u32::from(port)).map(|m| (m.mode, pa)));
    let scopes = [
        workload_policy.map(|pa| (mode(pa), pa)),
        first(workload.namespace, false).map(|pa| (mode(pa), pa)),
        first(&config.root_namespace, false).map(|pa| (mode(pa), pa)),
    ];
    port_mode.into_iter().chain(scopes.into_iter().flatten()).find(|(mode, _)| *mode != MtlsMode::Unset).map_or(
        EffectiveMtls { mode: MtlsMode::Permissive, policy: None },
        |(mode, pa)| EffectiveMtls { mode, policy: Some(policy_id(&pa.metadata)) },
    )
}

/// Whether `policy` is one that ztunnel enforces for `workload` (see the module docs).
fn applies(config: &Config, policy: &AuthorizationPolicy, workload: &Workload) -> bool {
    let ns = policy.metadata.namespace.as_str();
    is_l4_policy(policy)
        && (ns == config.root_namespace || ns == workload.namespace)
        && selects(policy.spec.selector.as_ref(), workload.labels)
}

/// Not bound by `targetRef`/`targetRefs` (those are the waypoints'), not `CUSTOM`.
fn is_l4_policy(policy: &AuthorizationPolicy) -> bool {
    let spec = &policy.spec;
    spec.target_ref.is_none() && spec.target_refs.is_empty() && spec.action != Action::Custom
}

/// No selector selects everything; `matchLabels` must be a subset of the labels.
fn selects(selector: Option<&WorkloadSelector>, labels: &Labels) -> bool {
    selector.is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn policy_id(meta: &ObjectMeta) -> String {
    format!("{}/{}", meta.namespace, meta.name)
}

#[cfg(test)]
mod tests;
