//! Per-node views: what one node's agent needs of the whole configuration. Pure
//! functions of the config (no I/O), so they are cheap to test and to benchmark.
//!
//! A view holds every object needed to route anywhere in the mesh (namespaces,
//! services, meshed pods on every node, service entries, routes), the node's own pods
//! (meshed or not: the agent enrolls and identifies them), and only the security
//! policies that can apply to the node's pods (those in the root namespace and in the
//! namespaces of its pods).
use std::collections::BTreeSet;

use mesh_common::{
    config::Config,
    control::{Objects, parse_workload_identity},
};
use serde_json::Value;

pub use mesh_common::control::{all_objects, materialize};

fn meta<'a>(object: &'a Value, field: &str) -> &'a str {
    object["metadata"][field].as_str().unwrap_or("")
}

/// Kinds whose objects only matter where they can select a local pod.
const POLICY_KINDS: &[&str] = &["AuthorizationPolicy", "PeerAuthentication"];

/// The view of node `node`.
pub fn node_view(config: &Config, all: &Objects, node: &str) -> Objects {
    let local_pods: Vec<&mesh_common::config::Pod> =
        config.pods.iter().filter(|p| p.spec.node_name.as_deref() == Some(node)).collect();
    let mut local_namespaces: BTreeSet<&str> = local_pods.iter().map(|p| p.metadata.namespace.as_str()).collect();
    local_namespaces.insert(config.root_namespace.as_str());
    let meshed: BTreeSet<(String, String)> = config
        .pods
        .iter()
        .filter(|p| config.pod_is_meshed(p))
        .map(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()))
        .collect();
    all.iter()
        .filter(|(key, object)| {
            let kind = key.split('/').next().unwrap_or("");
            let ns = meta(object, "namespace");
            if kind == "Pod" {
                object["spec"]["nodeName"].as_str() == Some(node)
                    || meshed.contains(&(ns.to_owned(), meta(object, "name").to_owned()))
            } else if POLICY_KINDS.contains(&kind) {
                local_namespaces.contains(ns)
            } else {
                true
            }
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// May node `node` obtain a certificate for `identity`? Only for the identity of a
/// pod the config places on that node, in the mesh's trust domain.
pub fn may_issue(config: &Config, node: &str, identity: &str) -> bool {
    let Some((td, ns, sa)) = parse_workload_identity(identity) else { return false };
    td == config.trust_domain
        && config.pods.iter().any(|p| {
            p.spec.node_name.as_deref() == Some(node)
                && p.metadata.namespace.as_str() == ns
                && p.spec.service_account_name.as_deref().or(p.spec.service_account.as_deref()).unwrap_or("default")
                    == sa
        })
}
