//! Per-node views: what one node's agent needs of the whole configuration. Pure
//! functions of the config (no I/O), so they are cheap to test and to benchmark.
//!
//! A view holds every object needed to route anywhere in the mesh (namespaces,
//! services, meshed pods on every node, service entries, routes, `EnvoyFilter`s: a
//! waypoint takes its node's view and may serve other namespaces), the node's own pods
//! (meshed or not: the agent enrolls and identifies them), the security policies that
//! can apply to the node's pods (those in the root namespace and in the namespaces of
//! its pods), and every policy bound by `targetRef`/`targetRefs`: those are enforced
//! by waypoints, and a waypoint may serve a namespace with no pods on its node (were
//! such a `DENY` missing there, the waypoint would fail open). Istio's waypoints
//! enforce only `targetRefs` policies, never selector or namespace-wide ones (those
//! stay with the node agents), so no other policy needs to travel.
//!
//! Pushing a change costs O(changed objects) per node, not O(view): the changed keys
//! are computed once per accepted configuration ([`changed_keys`]) and each node's
//! stream only tests those against its filter ([`node_update`]). A node falls back to
//! a full comparison only when the change can move *unchanged* objects in or out of
//! its view (a namespace's labels, the set of namespaces its pods live in) or when its
//! stream skipped a version.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use mesh_common::{
    config::Config,
    control::{ConfigMessage, Objects, parse_workload_identity},
};
use serde::Serialize;
use serde_json::Value;

pub use mesh_common::control::{all_objects, materialize};

fn meta<'a>(object: &'a Value, field: &str) -> &'a str {
    object["metadata"][field].as_str().unwrap_or("")
}

fn kind_of(key: &str) -> &str {
    key.split('/').next().unwrap_or("")
}

/// Kinds whose objects only matter where they can select a local pod (unless they are
/// bound by `targetRefs`: see [`is_target_bound`]).
const POLICY_KINDS: &[&str] = &["AuthorizationPolicy", "PeerAuthentication"];

/// Is the policy `object` bound by `spec.targetRef` or a non-empty `spec.targetRefs`
/// (a waypoint's policy, in every node's view)? Depends on the object alone, so a
/// change of binding is a change of that object's key and incremental updates stay
/// exact.
fn is_target_bound(object: &Value) -> bool {
    let spec = &object["spec"];
    !spec["targetRef"].is_null() || spec["targetRefs"].as_array().is_some_and(|refs| !refs.is_empty())
}

/// What the view filter needs to know about a whole configuration, computed once.
#[derive(Debug, Default)]
pub struct ViewIndex {
    /// `Pod/ns/name` keys of meshed pods and of waypoint pods: every node's view has them.
    meshed: HashSet<String>,
    /// Namespaces each node's pods live in, plus the root namespace.
    node_namespaces: HashMap<String, BTreeSet<String>>,
    root_namespace: String,
}

impl ViewIndex {
    pub fn new(config: &Config) -> Self {
        let mut node_namespaces: HashMap<String, BTreeSet<String>> = HashMap::new();
        let mut meshed = HashSet::new();
        for pod in &config.pods {
            if let Some(node) = &pod.spec.node_name {
                node_namespaces.entry(node.clone()).or_default().insert(pod.metadata.namespace.clone());
            }
            // Waypoint pods are not captured but every node tunnels to them.
            if config.pod_is_meshed(pod)
                || pod.metadata.labels.contains_key(mesh_common::config::gateway::GATEWAY_NAME_LABEL)
            {
                meshed.insert(format!("Pod/{}/{}", pod.metadata.namespace, pod.metadata.name));
            }
        }
        Self { meshed, node_namespaces, root_namespace: config.root_namespace.clone() }
    }

    /// Does object `key` belong in `node`'s view?
    pub fn in_view(&self, node: &str, key: &str, object: &Value) -> bool {
        let kind = kind_of(key);
        if kind == "Pod" {
            object["spec"]["nodeName"].as_str() == Some(node) || self.meshed.contains(key)
        } else if POLICY_KINDS.contains(&kind) {
            let ns = meta(object, "namespace");
            is_target_bound(object)
                || ns == self.root_namespace
                || self.node_namespaces.get(node).is_some_and(|set| set.contains(ns))
        } else {
            true
        }
    }
}

/// The keys of `node`'s view.
pub fn node_view_keys<'a>(index: &ViewIndex, all: &'a Objects, node: &str) -> Vec<&'a String> {
    all.iter().filter(|(key, object)| index.in_view(node, key, object)).map(|(k, _)| k).collect()
}

/// The view of node `node` (owned; for tests and tools).
pub fn node_view(config: &Config, all: &Objects, node: &str) -> Objects {
    let index = ViewIndex::new(config);
    node_view_keys(&index, all, node).into_iter().map(|k| (k.clone(), all[k].clone())).collect()
}

/// Keys whose object was added, changed or removed between two configurations.
pub fn changed_keys(old: &Objects, new: &Objects) -> Vec<String> {
    let mut keys: Vec<String> = new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, _)| k.clone()).collect();
    keys.extend(old.keys().filter(|k| !new.contains_key(*k)).cloned());
    keys
}

/// A snapshot message serialized from borrowed objects (no copy of the view); the
/// same JSON as [`ConfigMessage::Snapshot`].
#[derive(Serialize)]
struct SnapshotRef<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    version: u64,
    objects: BTreeMap<&'a String, &'a Value>,
}

/// The snapshot line for `node`.
pub fn encode_snapshot(index: &ViewIndex, all: &Objects, node: &str, version: u64) -> Vec<u8> {
    let objects = all.iter().filter(|(key, object)| index.in_view(node, key, object)).collect();
    let mut line = serde_json::to_vec(&SnapshotRef { kind: "snapshot", version, objects }).expect("serializes");
    line.push(b'\n');
    line
}

/// One side of a view transition.
pub struct Side<'a> {
    pub index: &'a ViewIndex,
    pub objects: &'a Objects,
}

/// The update that takes `node` from `old` to `new`. `changed` lists the keys that
/// differ between the two, or is `None` when unknown (the stream skipped a version).
pub fn node_update(
    old: &Side<'_>,
    new: &Side<'_>,
    changed: Option<&[String]>,
    node: &str,
    version: u64,
) -> ConfigMessage {
    let reshaped = changed.is_none_or(|keys| keys.iter().any(|k| kind_of(k) == "Namespace"))
        || old.index.node_namespaces.get(node) != new.index.node_namespaces.get(node)
        || old.index.root_namespace != new.index.root_namespace;
    let all_keys: Vec<&String>;
    let candidates: Box<dyn Iterator<Item = &String>> = if reshaped {
        all_keys = old.objects.keys().chain(new.objects.keys().filter(|k| !old.objects.contains_key(*k))).collect();
        Box::new(all_keys.into_iter())
    } else {
        Box::new(changed.unwrap_or_default().iter())
    };
    let mut upserts = Objects::new();
    let mut deletes = Vec::new();
    for key in candidates {
        let was = old.objects.get(key).filter(|v| old.index.in_view(node, key, v));
        let is = new.objects.get(key).filter(|v| new.index.in_view(node, key, v));
        match (was, is) {
            (_, Some(value)) if was != Some(value) => {
                upserts.insert(key.clone(), value.clone());
            }
            (Some(_), None) => deletes.push(key.clone()),
            _ => {}
        }
    }
    ConfigMessage::Update { version, upserts, deletes }
}

/// May node `node` obtain a certificate for `identity`? Only for the identity of a
/// pod the config places on that node, in the mesh's trust domain.
pub fn may_issue(config: &Config, node: &str, identity: &str) -> bool {
    let Some((td, ns, sa)) = parse_workload_identity(identity) else { return false };
    td == config.trust_domain
        && config.pods.iter().any(|p| {
            p.spec.node_name.as_deref() == Some(node)
                && p.metadata.namespace.as_str() == ns
                && p.spec.service_account() == sa
                // A finished pod (a completed Job's, kept for days) runs nothing to
                // identify, and a host-network pod is never captured.
                && !p.has_ended()
                && !p.spec.host_network
        })
}

#[cfg(test)]
mod tests;
