//! Which `RequestAuthentication` objects a waypoint enforces for one destination.
//!
//! Istio's policy attachment for waypoints (ambient): a policy applies at a waypoint
//! only through `targetRef` / `targetRefs`:
//! - `kind: Gateway`, group `gateway.networking.k8s.io`, naming the waypoint, from the
//!   waypoint's namespace: every destination the waypoint serves;
//! - `kind: GatewayClass`, group `gateway.networking.k8s.io`, naming the waypoint's
//!   class (`istio-waypoint`), from the root namespace: every waypoint of the mesh;
//! - `kind: Service` (group `""` or `core`) or `kind: ServiceEntry` (group
//!   `networking.istio.io`) naming the destination, from the destination's namespace.
//!
//! A policy with a `selector`, or with neither selector nor target (namespace- or
//! mesh-wide), selects workloads: it is enforced by the node agents for the pods it
//! selects, never by a waypoint. A `targetRef` naming another namespace does not
//! attach (Istio accepts only local references).
use mesh_common::config::{Config, meta::PolicyTargetReference, security::RequestAuthentication};

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";

/// The waypoint doing the enforcing: its `Gateway`'s namespace, name and class.
#[derive(Clone, Copy, Debug)]
pub struct Waypoint<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// `gatewayClassName`; `istio-waypoint` for every waypoint this mesh runs.
    pub class: &'a str,
}

/// What kind of object the request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationKind {
    Service,
    ServiceEntry,
}

/// The destination a request goes to at the waypoint.
#[derive(Clone, Copy, Debug)]
pub struct Destination<'a> {
    pub kind: DestinationKind,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// The policies of `config` that `waypoint` enforces for `destination`, in config order.
pub fn applicable<'a>(
    config: &'a Config,
    waypoint: Waypoint<'_>,
    destination: Destination<'_>,
) -> Vec<&'a RequestAuthentication> {
    config
        .request_authentications
        .iter()
        .filter(|policy| {
            let spec = &policy.spec;
            let namespace = policy.metadata.namespace.as_str();
            spec.target_ref
                .iter()
                .chain(&spec.target_refs)
                .any(|target| attaches(target, namespace, &config.root_namespace, waypoint, destination))
        })
        .collect()
}

fn attaches(
    target: &PolicyTargetReference,
    policy_namespace: &str,
    root_namespace: &str,
    waypoint: Waypoint<'_>,
    destination: Destination<'_>,
) -> bool {
    if !target.namespace.is_empty() && target.namespace != policy_namespace {
        return false;
    }
    let core = target.group.is_empty() || target.group == "core";
    match target.kind.as_str() {
        "Gateway" => {
            target.group == GATEWAY_GROUP && policy_namespace == waypoint.namespace && target.name == waypoint.name
        }
        "GatewayClass" => {
            target.group == GATEWAY_GROUP && policy_namespace == root_namespace && target.name == waypoint.class
        }
        "Service" => {
            core && destination.kind == DestinationKind::Service
                && policy_namespace == destination.namespace
                && target.name == destination.name
        }
        "ServiceEntry" => {
            target.group == ISTIO_NETWORKING_GROUP
                && destination.kind == DestinationKind::ServiceEntry
                && policy_namespace == destination.namespace
                && target.name == destination.name
        }
        _ => false,
    }
}
