//! The control protocol between the controller and the agents: HTTP/2 over mutual
//! TLS on port 15012.
//!
//! - `GET /v1/config`: a stream of newline-delimited JSON [`ConfigMessage`]s, first a
//!   snapshot of the node's view, then incremental updates, each with a version.
//! - `POST /v1/ack`: the agent acknowledges the version it applied ([`Ack`]).
//! - `POST /v1/certificate`: a CSR for the identity of a pod on the agent's node
//!   ([`CertificateRequest`] -> [`CertificateResponse`]).
//!
//! The agent is authenticated by its node certificate (URI SAN
//! [`node_identity`]); the controller signs workload identities only for pods it
//! knows to be on that node.
use std::{
    boxed::Box,
    collections::BTreeMap,
    format,
    string::{String, ToString},
    vec::Vec,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Config;

pub const CONTROL_PORT: u16 = 15012;
pub const CONFIG_PATH: &str = "/v1/config";
pub const ACK_PATH: &str = "/v1/ack";
pub const CERTIFICATE_PATH: &str = "/v1/certificate";
/// Request header with which a waypoint tells the controller what it is:
/// `<namespace>/<gateway name>/<service account>`. With a node certificate (the lab)
/// it is a claim the controller reports and narrows certificates with; with a token
/// the controller decides from the token and the declared waypoints instead.
pub const WAYPOINT_HEADER: &str = "mesh-waypoint";
/// DNS name in the controller's serving certificate.
pub const CONTROLLER_NAME: &str = "mesh-controller";

/// A node's view: objects keyed by `Kind/namespace/name`, each the JSON form of the
/// typed config object.
pub type Objects = BTreeMap<String, serde_json::Value>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConfigMessage {
    Snapshot { version: u64, objects: Objects },
    Update { version: u64, upserts: Objects, deletes: Vec<String> },
}

impl ConfigMessage {
    pub fn version(&self) -> u64 {
        match self {
            Self::Snapshot { version, .. } | Self::Update { version, .. } => *version,
        }
    }

    /// Applies this message to an agent's copy of its view.
    pub fn apply(self, objects: &mut Objects) {
        match self {
            Self::Snapshot { objects: all, .. } => *objects = all,
            Self::Update { upserts, deletes, .. } => {
                for key in deletes {
                    objects.remove(&key);
                }
                objects.extend(upserts);
            }
        }
    }
}

/// The update that turns `old` into `new` (None when they are equal).
pub fn diff(old: &Objects, new: &Objects, version: u64) -> Option<ConfigMessage> {
    let upserts: Objects =
        new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let deletes: Vec<String> = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
    if upserts.is_empty() && deletes.is_empty() {
        None
    } else {
        Some(ConfigMessage::Update { version, upserts, deletes })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub version: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
    pub identity: String,
    pub csr_pem: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// The leaf first, then intermediates.
    pub chain_pem: Vec<String>,
    pub root_pem: String,
    /// Expiry, seconds since the epoch.
    pub not_after: i64,
}

/// The identity in a node's bootstrap certificate.
pub fn node_identity(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/mesh-node/{node}")
}

/// The node name of a node identity of this trust domain.
pub fn parse_node_identity<'a>(trust_domain: &str, uri: &'a str) -> Option<&'a str> {
    let rest = uri.strip_prefix("spiffe://")?.strip_prefix(trust_domain)?.strip_prefix("/mesh-node/")?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// The value of [`WAYPOINT_HEADER`] for a waypoint.
pub fn waypoint_header(namespace: &str, name: &str, service_account: &str) -> String {
    format!("{namespace}/{name}/{service_account}")
}

/// (namespace, gateway name, service account) of a [`WAYPOINT_HEADER`] value.
pub fn parse_waypoint_header(value: &str) -> Option<(&str, &str, &str)> {
    let mut parts = value.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(ns), Some(name), Some(sa), None) if !ns.is_empty() && !name.is_empty() && !sa.is_empty() => {
            Some((ns, name, sa))
        }
        _ => None,
    }
}

/// (trust domain, namespace, service account) of a workload identity.
pub fn parse_workload_identity(uri: &str) -> Option<(&str, &str, &str)> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    let mut parts = path.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
            Some((td, ns, sa))
        }
        _ => None,
    }
}

/// Config field holding each kind, in the order the kinds are listed.
const KINDS: &[(&str, &str)] = &[
    ("namespaces", "Namespace"),
    ("services", "Service"),
    ("endpointSlices", "EndpointSlice"),
    ("pods", "Pod"),
    ("workloadEntries", "WorkloadEntry"),
    ("authorizationPolicies", "AuthorizationPolicy"),
    ("peerAuthentications", "PeerAuthentication"),
    ("requestAuthentications", "RequestAuthentication"),
    ("virtualServices", "VirtualService"),
    ("destinationRules", "DestinationRule"),
    ("serviceEntries", "ServiceEntry"),
    ("telemetries", "Telemetry"),
    ("httpRoutes", "HTTPRoute"),
    ("grpcRoutes", "GRPCRoute"),
    ("gateways", "Gateway"),
    ("envoyFilters", "EnvoyFilter"),
];

fn meta<'a>(object: &'a Value, field: &str) -> &'a str {
    object["metadata"][field].as_str().unwrap_or("")
}

/// Every object of the config, keyed `Kind/namespace/name`.
pub fn all_objects(config: &Config) -> Objects {
    let json = serde_json::to_value(config).expect("config serializes");
    let mut objects = Objects::new();
    for (field, kind) in KINDS {
        for object in json[*field].as_array().into_iter().flatten() {
            let key = format!("{kind}/{}/{}", meta(object, "namespace"), meta(object, "name"));
            objects.insert(key, object.clone());
        }
    }
    objects.insert(
        "MeshConfig//mesh".into(),
        serde_json::json!({
            "rootNamespace": config.root_namespace,
            "trustDomain": config.trust_domain,
            "mesh": config.mesh,
        }),
    );
    objects
}

/// An agent's copy of its view: each object kept as its JSON text, which is several
/// times smaller than a parsed `serde_json::Value` tree.
pub type RawObjects = BTreeMap<String, Box<serde_json::value::RawValue>>;

/// A [`ConfigMessage`] read with its objects left as JSON text (a plain struct: raw
/// values cannot pass through serde's internally tagged enums).
#[derive(Debug, Deserialize)]
pub struct RawConfigMessage {
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u64,
    #[serde(default)]
    pub objects: Option<RawObjects>,
    #[serde(default)]
    pub upserts: Option<RawObjects>,
    #[serde(default)]
    pub deletes: Vec<String>,
}

impl RawConfigMessage {
    /// Applies the message in place. A snapshot replaces everything.
    pub fn apply(self, objects: &mut RawObjects) {
        if let Some(all) = self.objects {
            *objects = all;
        }
        for key in &self.deletes {
            objects.remove(key);
        }
        if let Some(upserts) = self.upserts {
            objects.extend(upserts);
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshSettings {
    root_namespace: String,
    trust_domain: String,
    /// Absent from older controllers: the defaults.
    #[serde(default)]
    mesh: crate::config::MeshConfig,
}

/// Rebuilds a typed config from objects given as JSON text, one object at a time
/// (no intermediate tree of the whole view). Kinds this build does not know (from a
/// newer controller) are skipped.
pub fn materialize_raw<'a>(
    objects: impl IntoIterator<Item = (&'a String, &'a str)>,
) -> Result<Config, serde_json::Error> {
    materialize_kinds(objects, materialize_l7)
}

/// [`materialize_raw`] for a node agent: the L7 kinds (routes, destination rules,
/// request authentication, telemetry, filters), which only waypoints act on, stay
/// unparsed. Their parsers then stay out of the agent's binary (most of its JSON
/// parsing code, a fifth of its text), and an L7 object the agent could not parse
/// never holds back the L4 config it needs.
pub fn materialize_node<'a>(
    objects: impl IntoIterator<Item = (&'a String, &'a str)>,
) -> Result<Config, serde_json::Error> {
    materialize_kinds(objects, |_, _, _| Ok(()))
}

/// The L4 kinds and the mesh settings; every other kind goes to `other`.
fn materialize_kinds<'a>(
    objects: impl IntoIterator<Item = (&'a String, &'a str)>,
    mut other: impl FnMut(&mut Config, &str, &str) -> Result<(), serde_json::Error>,
) -> Result<Config, serde_json::Error> {
    use serde_json::from_str;
    let mut config = Config::default();
    for (key, text) in objects {
        match key.split('/').next().unwrap_or("") {
            "Namespace" => config.namespaces.push(from_str(text)?),
            "Service" => config.services.push(from_str(text)?),
            "EndpointSlice" => config.endpoint_slices.push(from_str(text)?),
            "Pod" => config.pods.push(from_str(text)?),
            "WorkloadEntry" => config.workload_entries.push(from_str(text)?),
            "AuthorizationPolicy" => config.authorization_policies.push(from_str(text)?),
            "PeerAuthentication" => config.peer_authentications.push(from_str(text)?),
            "ServiceEntry" => config.service_entries.push(from_str(text)?),
            "Gateway" => config.gateways.push(from_str(text)?),
            "MeshConfig" => {
                let mesh: MeshSettings = from_str(text)?;
                config.root_namespace = mesh.root_namespace;
                config.trust_domain = mesh.trust_domain;
                config.mesh = mesh.mesh;
            }
            kind => other(&mut config, kind, text)?,
        }
    }
    Ok(config)
}

/// The kinds only a waypoint (or the controller) turns into typed objects.
fn materialize_l7(config: &mut Config, kind: &str, text: &str) -> Result<(), serde_json::Error> {
    use serde_json::from_str;
    match kind {
        "RequestAuthentication" => config.request_authentications.push(from_str(text)?),
        "VirtualService" => config.virtual_services.push(from_str(text)?),
        "DestinationRule" => config.destination_rules.push(from_str(text)?),
        "Telemetry" => config.telemetries.push(from_str(text)?),
        "HTTPRoute" => config.http_routes.push(from_str(text)?),
        "GRPCRoute" => config.grpc_routes.push(from_str(text)?),
        "EnvoyFilter" => config.envoy_filters.push(from_str(text)?),
        _ => {}
    }
    Ok(())
}

/// Rebuilds a typed config from a view of parsed objects.
pub fn materialize(objects: &Objects) -> Result<Config, serde_json::Error> {
    let texts: Vec<(&String, String)> = objects.iter().map(|(k, v)| (k, v.to_string())).collect();
    materialize_raw(texts.iter().map(|(k, t)| (*k, t.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_reject_lookalikes() {
        let id = Config::default().spiffe_id("shop", "web");
        assert_eq!(parse_workload_identity(&id), Some(("cluster.local", "shop", "web")));
        assert_eq!(parse_workload_identity("spiffe://cluster.local/ns/shop/sa/web/extra"), None);
        assert_eq!(parse_workload_identity("spiffe://cluster.local/ns//sa/web"), None);
        assert_eq!(parse_workload_identity("https://cluster.local/ns/a/sa/b"), None);
        let header = waypoint_header("shop", "waypoint", "waypoint-sa");
        assert_eq!(parse_waypoint_header(&header), Some(("shop", "waypoint", "waypoint-sa")));
        for bad in ["", "shop/waypoint", "shop//sa", "a/b/c/d", "/b/c"] {
            assert_eq!(parse_waypoint_header(bad), None, "{bad}");
        }
        let node = node_identity("cluster.local", "node1");
        assert_eq!(parse_node_identity("cluster.local", &node), Some("node1"));
        assert_eq!(parse_node_identity("other.local", &node), None);
        assert_eq!(parse_node_identity("cluster.local", "spiffe://cluster.local/mesh-node/a/b"), None);
    }

    #[test]
    fn every_kind_survives_the_trip_to_an_agent() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/valid/mesh-everything.yaml");
        let mut config = crate::config::load_paths(&[path]).expect("valid manifest");
        let objects = all_objects(&config);
        let kinds: std::collections::BTreeSet<&str> = objects.keys().filter_map(|k| k.split('/').next()).collect();
        assert_eq!(kinds.len(), KINDS.len() + 1, "kinds seen: {kinds:?}");
        let json = serde_json::to_string(&ConfigMessage::Snapshot { version: 1, objects: objects.clone() }).unwrap();
        let ConfigMessage::Snapshot { objects: received, .. } = serde_json::from_str(&json).unwrap() else {
            panic!("not a snapshot")
        };
        let mut rebuilt = materialize(&received).expect("materializes");
        // The agent's path: objects kept as JSON text.
        let raw: RawConfigMessage = serde_json::from_str(&json).unwrap();
        let mut raw_objects = RawObjects::new();
        raw.apply(&mut raw_objects);
        let from_raw = materialize_raw(raw_objects.iter().map(|(k, v)| (k, v.get()))).unwrap();
        assert_eq!(all_objects(&from_raw), objects);
        // Only served objects travel; the order of objects within a kind may change.
        config.ignored.clear();
        assert_eq!(all_objects(&rebuilt), objects);
        rebuilt.ignored.clear();
        assert_eq!(rebuilt.trust_domain, config.trust_domain);
        assert_eq!(rebuilt.pods.len(), config.pods.len());
    }

    #[test]
    fn a_node_types_the_l4_kinds_and_leaves_the_l7_ones_unparsed() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/valid/mesh-everything.yaml");
        let config = crate::config::load_paths(&[path]).expect("valid manifest");
        let texts: Vec<(String, String)> =
            all_objects(&config).iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
        let node = materialize_node(texts.iter().map(|(k, t)| (k, t.as_str()))).expect("materializes");
        let all = materialize_raw(texts.iter().map(|(k, t)| (k, t.as_str()))).expect("materializes");
        let l7 = [
            "RequestAuthentication",
            "VirtualService",
            "DestinationRule",
            "Telemetry",
            "HTTPRoute",
            "GRPCRoute",
            "EnvoyFilter",
        ];
        let node_counts = crate::config::kind_counts(&node);
        let all_counts = crate::config::kind_counts(&all);
        for kind in l7 {
            assert!(all_counts.contains_key(kind), "the manifest has no {kind}");
            assert!(!node_counts.contains_key(kind), "{kind} typed on a node");
        }
        for (kind, count) in all_counts.iter().filter(|(kind, _)| !l7.contains(kind)) {
            assert_eq!(node_counts.get(kind), Some(count), "{kind}");
        }
        assert_eq!(node.trust_domain, all.trust_domain);
        assert_eq!(node.mesh, all.mesh);
        // An L7 object this build cannot parse costs a waypoint the view, never a node.
        let bad = [(String::from("VirtualService/shop/bad"), String::from(r#"{"spec": 7}"#))];
        let with_bad = || texts.iter().chain(&bad).map(|(k, t)| (k, t.as_str()));
        assert!(materialize_raw(with_bad()).is_err());
        assert_eq!(materialize_node(with_bad()).expect("L4 view").pods.len(), all.pods.len());
    }

    #[test]
    fn the_mesh_config_travels_with_the_view() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/valid/mesh-config.yaml");
        let config = crate::config::load_paths(&[path]).expect("valid manifest");
        assert!(!config.mesh.extension_providers.is_empty());
        let rebuilt = materialize(&all_objects(&config)).expect("materializes");
        assert_eq!(rebuilt.mesh, config.mesh);
        // A controller that sends no mesh config: the defaults.
        let old = serde_json::json!({"rootNamespace": "istio-system", "trustDomain": "cluster.local"}).to_string();
        let key = "MeshConfig//mesh".to_string();
        let rebuilt = materialize_raw([(&key, old.as_str())]).expect("materializes");
        assert!(rebuilt.mesh.is_default());
    }

    #[test]
    fn diff_then_apply_reaches_the_new_view() {
        let mut old = Objects::new();
        old.insert("Pod/a/x".into(), serde_json::json!({"v": 1}));
        old.insert("Pod/a/y".into(), serde_json::json!({"v": 1}));
        let mut new = old.clone();
        new.remove("Pod/a/x");
        new.insert("Pod/a/y".into(), serde_json::json!({"v": 2}));
        new.insert("Pod/a/z".into(), serde_json::json!({"v": 1}));
        let update = diff(&old, &new, 7).unwrap();
        assert_eq!(update.version(), 7);
        let mut applied = old.clone();
        update.apply(&mut applied);
        assert_eq!(applied, new);
        assert_eq!(diff(&new, &new, 8), None);
    }
}
