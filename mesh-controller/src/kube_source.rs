//! The Kubernetes source: watches the kinds the mesh serves on the API server and feeds
//! them, as documents, to the same loader and validation as the YAML directory.
//!
//! Each watched object becomes one document named `Kind/namespace/name`, reduced to the
//! fields the mesh reads (no `managedFields`, no last-applied annotation, only the
//! routing and identity parts of pods and services; Istio and Gateway API objects keep
//! their whole `spec`, which is what validation is about). The watch code path is the
//! same for a live cluster and for recorded API objects: [`Store::apply`] takes
//! kube-runtime watcher events, wherever they come from.
//!
//! Unlike the directory source, an invalid object does not hold up the others: it is
//! left out (or its last accepted version keeps serving) and the rest applies
//! ([`Admission`]); its problems are reported on the object by the elected leader
//! (an Event, and a status condition on the Istio kinds).
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use futures_util::{
    StreamExt,
    stream::{self, BoxStream},
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use mesh_common::config::{Config, Problem, Report, Source, load};
use serde_json::{Map, Value, json};
use tracing::{debug, info, warn};

use crate::server::Controller;

/// One kind the controller watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchedKind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// Installed by a CRD that may be absent (then the kind is simply empty).
    pub optional: bool,
    /// Has a `status` subresource the controller writes validation results to.
    pub status: bool,
    /// A field selector the list and the watch carry: the controller reads only the
    /// objects of the kind that match it.
    pub fields: Option<&'static str>,
}

const fn core(kind: &'static str, plural: &'static str) -> WatchedKind {
    WatchedKind { group: "", version: "v1", kind, plural, optional: false, status: false, fields: None }
}

const fn istio(group: &'static str, kind: &'static str, plural: &'static str) -> WatchedKind {
    WatchedKind { group, version: "v1", kind, plural, optional: true, status: true, fields: None }
}

/// The field selector of the mesh config's `ConfigMap`
/// ([`mesh_common::config::mesh::CONFIG_MAP_NAME`] in the namespace the loader reads
/// it from).
pub const MESH_CONFIG_FIELDS: &str = "metadata.namespace=istio-system,metadata.name=istio";

/// Every kind the controller watches. RBAC (`deploy/templates/rbac-controller.yaml`)
/// grants list and watch on exactly these.
pub const WATCHED: &[WatchedKind] = &[
    core("Namespace", "namespaces"),
    core("Pod", "pods"),
    core("Service", "services"),
    // Istio's mesh config: the `ConfigMap` `istio` (its `mesh` key), read in the root
    // namespace by the loader; no other ConfigMap is listed.
    WatchedKind {
        group: "",
        version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        optional: false,
        status: false,
        fields: Some(MESH_CONFIG_FIELDS),
    },
    WatchedKind {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        optional: false,
        status: false,
        fields: None,
    },
    istio("security.istio.io", "AuthorizationPolicy", "authorizationpolicies"),
    istio("security.istio.io", "PeerAuthentication", "peerauthentications"),
    istio("security.istio.io", "RequestAuthentication", "requestauthentications"),
    istio("networking.istio.io", "VirtualService", "virtualservices"),
    istio("networking.istio.io", "DestinationRule", "destinationrules"),
    istio("networking.istio.io", "ServiceEntry", "serviceentries"),
    istio("networking.istio.io", "WorkloadEntry", "workloadentries"),
    istio("telemetry.istio.io", "Telemetry", "telemetries"),
    // Istio serves EnvoyFilter in v1alpha3 only; the loader accepts the local rate
    // limit shape and reports any other on the object's status.
    WatchedKind {
        group: "networking.istio.io",
        version: "v1alpha3",
        kind: "EnvoyFilter",
        plural: "envoyfilters",
        optional: true,
        status: true,
        fields: None,
    },
    WatchedKind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "HTTPRoute",
        plural: "httproutes",
        optional: true,
        status: false,
        fields: None,
    },
    WatchedKind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "GRPCRoute",
        plural: "grpcroutes",
        optional: true,
        status: false,
        fields: None,
    },
    WatchedKind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "Gateway",
        plural: "gateways",
        optional: true,
        status: false,
        fields: None,
    },
];

impl WatchedKind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_owned() } else { format!("{}/{}", self.group, self.version) }
    }

    pub fn api_resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.to_owned(),
            version: self.version.to_owned(),
            api_version: self.api_version(),
            kind: self.kind.to_owned(),
            plural: self.plural.to_owned(),
        }
    }

    /// The watched kind called `kind`.
    pub fn named(kind: &str) -> Option<&'static WatchedKind> {
        WATCHED.iter().find(|k| k.kind == kind)
    }
}

/// Annotations that are large and of no use to the mesh.
const DROPPED_ANNOTATIONS: &[&str] = &["kubectl.kubernetes.io/last-applied-configuration"];

/// Copies `keys` of `from` (those present) into a new object.
fn pick(from: &Value, keys: &[&str]) -> Value {
    let mut out = Map::new();
    for key in keys {
        if let Some(value) = from.get(*key).filter(|v| !v.is_null()) {
            out.insert((*key).to_owned(), value.clone());
        }
    }
    Value::Object(out)
}

/// [`pick`] applied to every element of the array `from[list]` (none when absent).
fn pick_each(from: &Value, list: &str, keys: &[&str]) -> Vec<Value> {
    from.get(list).and_then(Value::as_array).into_iter().flatten().map(|item| pick(item, keys)).collect()
}

/// The document the loader reads for one API object, and its key
/// (`Kind/namespace/name`, `Kind/name` when cluster-scoped). `None` for an object
/// without a name (never sent by a real API server).
pub fn document(kind: &WatchedKind, object: &Value) -> Option<(String, Value)> {
    let meta = object.get("metadata")?;
    let name = meta.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
    let mut metadata =
        pick(meta, &["name", "namespace", "uid", "labels", "annotations", "generation", "creationTimestamp"]);
    if let Some(annotations) = metadata.get_mut("annotations").and_then(Value::as_object_mut) {
        for dropped in DROPPED_ANNOTATIONS {
            annotations.remove(*dropped);
        }
        if annotations.is_empty() {
            metadata.as_object_mut().expect("object").remove("annotations");
        }
    }
    // `generation` is for status reporting only; the loader does not read it.
    let generation = metadata.as_object_mut().expect("object").remove("generation");
    let mut doc = json!({ "apiVersion": kind.api_version(), "kind": kind.kind, "metadata": metadata });
    let spec = object.get("spec").unwrap_or(&Value::Null);
    match kind.kind {
        "Namespace" => {}
        "ConfigMap" => {
            // The mesh config only: other keys (`meshNetworks`, ...) are not read.
            let key = mesh_common::config::mesh::CONFIG_MAP_KEY;
            if let Some(mesh) = object.get("data").and_then(|d| d.get(key)).filter(|v| !v.is_null()) {
                doc["data"] = json!({ key: mesh });
            }
        }
        "Pod" => {
            let mut pod_spec = pick(spec, &["serviceAccountName", "serviceAccount", "nodeName", "hostNetwork"]);
            let container = ["name", "ports", "livenessProbe", "readinessProbe", "startupProbe"];
            pod_spec["containers"] = Value::Array(pick_each(spec, "containers", &container));
            let init = pick_each(spec, "initContainers", &container);
            if !init.is_empty() {
                pod_spec["initContainers"] = Value::Array(init);
            }
            doc["spec"] = pod_spec;
            let status = object.get("status").unwrap_or(&Value::Null);
            let mut pod_status = pick(status, &["podIP", "podIPs", "hostIP", "phase"]);
            let conditions = pick_each(status, "conditions", &["type", "status"]);
            if !conditions.is_empty() {
                pod_status["conditions"] = Value::Array(conditions);
            }
            doc["status"] = pod_status;
        }
        "Service" => {
            let mut service_spec = pick(spec, &["type", "clusterIP", "clusterIPs", "selector", "externalName"]);
            let port = ["name", "port", "targetPort", "protocol", "appProtocol"];
            service_spec["ports"] = Value::Array(pick_each(spec, "ports", &port));
            doc["spec"] = service_spec;
        }
        "EndpointSlice" => {
            for key in ["addressType", "endpoints", "ports"] {
                if let Some(value) = object.get(key).filter(|v| !v.is_null()) {
                    doc[key] = value.clone();
                }
            }
        }
        // Istio and Gateway API kinds: the whole spec, as the user wrote it.
        _ => doc["spec"] = spec.clone(),
    }
    let key = if namespace.is_empty() {
        format!("{}/{name}", kind.kind)
    } else {
        format!("{}/{namespace}/{name}", kind.kind)
    };
    if let Some(generation) = generation {
        doc["metadata"]["generation"] = generation;
    }
    Some((key, doc))
}

/// What the API server reported for one object, kept for status reporting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    pub kind: &'static WatchedKind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: Option<i64>,
}

/// The objects of every watched kind, as documents.
#[derive(Debug, Default)]
pub struct Store {
    objects: BTreeMap<String, Value>,
    /// Objects of a kind being relisted (between `Init` and `InitDone`).
    relisting: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// Kinds listed completely at least once (or found not installed).
    synced: BTreeSet<&'static str>,
}

impl Store {
    /// Applies one watcher event of `kind`; returns whether the documents changed.
    pub fn apply(&mut self, kind: &'static WatchedKind, event: watcher::Event<DynamicObject>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisting.insert(kind.kind, BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                if let Some((key, doc)) = to_document(kind, &object) {
                    self.relisting.entry(kind.kind).or_default().insert(key, doc);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relisting.remove(kind.kind).unwrap_or_default();
                let prefix = format!("{}/", kind.kind);
                let before: BTreeMap<String, Value> =
                    self.objects.extract_if(.., |k, _| k.starts_with(&prefix)).collect();
                let changed = before != listed || !self.synced.contains(kind.kind);
                self.objects.extend(listed);
                self.synced.insert(kind.kind);
                changed
            }
            watcher::Event::Apply(object) => match to_document(kind, &object) {
                Some((key, doc)) => self.objects.insert(key, doc.clone()).is_none_or(|old| old != doc),
                None => false,
            },
            watcher::Event::Delete(object) => {
                to_document(kind, &object).is_some_and(|(key, _)| self.objects.remove(&key).is_some())
            }
        }
    }

    /// Records that `kind` is not installed on the cluster (its CRD is absent).
    pub fn absent(&mut self, kind: &'static WatchedKind) -> bool {
        let prefix = format!("{}/", kind.kind);
        let removed = self.objects.extract_if(.., |k, _| k.starts_with(&prefix)).count();
        removed > 0 || self.synced.insert(kind.kind)
    }

    /// Every watched kind has been listed (or found absent) once.
    pub fn synced(&self) -> bool {
        WATCHED.iter().all(|k| self.synced.contains(k.kind))
    }

    pub fn documents(&self) -> &BTreeMap<String, Value> {
        &self.objects
    }

    /// The API object behind a key, for reporting.
    pub fn object_ref(&self, key: &str) -> Option<ObjectRef> {
        let doc = self.objects.get(key)?;
        let kind = WatchedKind::named(doc["kind"].as_str()?)?;
        let meta = &doc["metadata"];
        Some(ObjectRef {
            kind,
            namespace: meta["namespace"].as_str().unwrap_or("").to_owned(),
            name: meta["name"].as_str()?.to_owned(),
            uid: meta["uid"].as_str().unwrap_or("").to_owned(),
            generation: meta["generation"].as_i64(),
        })
    }
}

fn to_document(kind: &WatchedKind, object: &DynamicObject) -> Option<(String, Value)> {
    match serde_json::to_value(object) {
        Ok(value) => document(kind, &value),
        Err(error) => {
            warn!(kind = kind.kind, %error, "object from the API server does not serialize; skipped");
            None
        }
    }
}

/// Loads documents as sources named by their keys; `trust_domain` and
/// `root_namespace` (the flags) apply where the mesh config is silent
/// ([`crate::settings`]).
pub fn load_documents(
    docs: &BTreeMap<String, Value>,
    trust_domain: &str,
    root_namespace: &str,
) -> Result<Config, Report> {
    let sources: Vec<Source> = docs
        .iter()
        .map(|(key, doc)| Source::new(key.clone(), serde_json::to_string(doc).expect("JSON serializes")))
        .collect();
    let mut config = load(&sources)?;
    let flags =
        crate::settings::Flags { trust_domain: trust_domain.to_owned(), root_namespace: root_namespace.to_owned() };
    crate::settings::fill_defaults(&mut config, &flags);
    Ok(config)
}

/// The result of admitting the documents of the cluster.
#[derive(Debug)]
pub struct Admitted {
    pub config: Config,
    /// Problems of the objects as they are now, by object key.
    pub problems: BTreeMap<String, Vec<Problem>>,
    /// Invalid objects whose last accepted version still serves.
    pub held: Vec<String>,
    /// Invalid objects left out (no accepted version).
    pub left_out: Vec<String>,
    /// Invalid security objects with no accepted version, replaced by what denies
    /// ([`fail_closed`]): leaving them out would open what they guard.
    pub denying: Vec<String>,
}

/// Per-object admission: a bad object does not block the others. Remembers the last
/// accepted version of every object.
#[derive(Debug, Default)]
pub struct Admission {
    accepted: BTreeMap<String, Value>,
}

/// Rounds of "set aside what the problems name, load again". Each round moves every
/// named object one step on (its accepted version, then its stand-ins from the
/// narrowest scope to the widest, then out: at most six steps), and cross-object
/// problems (duplicates, references) settle in one or two rounds more.
const MAX_ROUNDS: usize = 16;

impl Admission {
    /// Admits `docs`: every valid object applies; an invalid one is replaced by its
    /// last accepted version, or left out. `Err` only when what remains still does
    /// not load (a problem no object is named in), and then nothing changes.
    pub fn admit(
        &mut self,
        docs: &BTreeMap<String, Value>,
        trust_domain: &str,
        root_namespace: &str,
    ) -> Result<Admitted, Report> {
        let mut candidate = docs.clone();
        let mut problems: BTreeMap<String, Vec<Problem>> = BTreeMap::new();
        let (mut held, mut left_out) = (Vec::new(), Vec::new());
        // Stand-ins in place, by key: the stage of [`fail_closed`] in use.
        let mut stood_in: BTreeMap<String, usize> = BTreeMap::new();
        for round in 0..MAX_ROUNDS {
            match load_documents(&candidate, trust_domain, root_namespace) {
                Ok(config) => {
                    // A stand-in is not the object's accepted version; the object
                    // says first what stands in for it.
                    for key in stood_in.keys() {
                        let Some(doc) = candidate.remove(key) else { continue };
                        let scoped = SCOPE_FIELDS.iter().any(|f| doc["spec"].get(f).is_some());
                        let scope = match doc["metadata"]["namespace"].as_str() {
                            _ if scoped => "what it selects",
                            Some(ns) if ns == root_namespace => "the whole mesh",
                            _ => "its whole namespace",
                        };
                        let what = if doc["kind"] == "PeerAuthentication" {
                            format!("STRICT mTLS applies to {scope} in its place until it is fixed (fail closed)")
                        } else if doc["spec"]["action"] == "DENY" {
                            format!("every request to {scope} is denied in its place until it is fixed (fail closed)")
                        } else {
                            format!(
                                "an ALLOW policy without rules applies to {scope} in its place until it is fixed: only what other ALLOW policies allow gets in (fail closed)"
                            )
                        };
                        let reason = if self.accepted.contains_key(key) {
                            format!("not valid, and its last accepted version no longer fits the rest: {what}")
                        } else {
                            format!("not valid and never accepted: {what}")
                        };
                        problems
                            .entry(key.clone())
                            .or_default()
                            .insert(0, Problem::new(key, Some(key.clone()), "", reason));
                    }
                    self.accepted = candidate;
                    let denying = stood_in.into_keys().collect();
                    return Ok(Admitted { config, problems, held, left_out, denying });
                }
                Err(report) => {
                    let named: BTreeSet<String> =
                        report.0.iter().map(|p| p.file.clone()).filter(|f| candidate.contains_key(f)).collect();
                    if named.is_empty() {
                        return Err(report);
                    }
                    for problem in report.0 {
                        // Problems of a replacement (an accepted version that no longer
                        // fits the others) are not the object's own: report round 0's.
                        if round == 0 {
                            problems.entry(problem.file.clone()).or_default().push(problem);
                        }
                    }
                    for key in named {
                        match self.accepted.get(&key) {
                            Some(previous) if candidate.get(&key) != Some(previous) && !stood_in.contains_key(&key) => {
                                candidate.insert(key.clone(), previous.clone());
                                held.push(key);
                            }
                            _ => {
                                held.retain(|k| *k != key);
                                // The next stand-in: first with the object's scope, then
                                // narrower parts of it, then its whole namespace (for
                                // when the scope itself is what is wrong).
                                let mut stage = stood_in.get(&key).map_or(0, |s| s + 1);
                                let stand_in = loop {
                                    match docs.get(&key).and_then(|doc| fail_closed(doc, stage)) {
                                        Some(doc) if candidate.get(&key) == Some(&doc) => stage += 1,
                                        found => break found,
                                    }
                                };
                                if let Some(doc) = stand_in {
                                    candidate.insert(key.clone(), doc);
                                    stood_in.insert(key, stage);
                                } else {
                                    candidate.remove(&key);
                                    stood_in.remove(&key);
                                    left_out.push(key);
                                }
                            }
                        }
                    }
                }
            }
        }
        Err(Report(problems.into_values().flatten().collect()))
    }
}

/// The fields that scope a security object (`PeerAuthentication` has the first only).
const SCOPE_FIELDS: [&str; 3] = ["selector", "targetRef", "targetRefs"];

/// What stands in for an invalid security object that has no accepted version when
/// leaving it out would open what it guards: an ALLOW `AuthorizationPolicy` becomes
/// one without rules (it allows nothing more, and what it selects is no longer open to
/// everyone when it was the only ALLOW policy there); a DENY or CUSTOM one with rules
/// (whose checks are not known) becomes a DENY of every request; a `PeerAuthentication`
/// that asks for STRICT (on all ports or on one) becomes STRICT. Istio's admission
/// webhook would have refused such an object; none is installed here, so the API
/// server stores it. `None` where leaving it out opens nothing: AUDIT policies, a DENY
/// without rules (it never matches), a `PeerAuthentication` that asks for no STRICT
/// (its scope inherits from the next one), other kinds.
///
/// `stage` picks the scope, from the narrowest try to the widest: the object's own
/// `selector` and `targetRef(s)`; its `selector` alone; its `targetRef(s)` alone (for
/// when they may not go together); none, the object's whole namespace (the whole mesh
/// in the root namespace), for when the scope itself is what is invalid. `None` past
/// the last.
pub fn fail_closed(doc: &Value, stage: usize) -> Option<Value> {
    let spec = doc.get("spec").unwrap_or(&Value::Null);
    let upper = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_ascii_uppercase);
    let policy_scopes: &[&[&str]] = &[&SCOPE_FIELDS, &["selector"], &["targetRef", "targetRefs"], &[]];
    let (mut stand_in, scopes): (Value, &[&[&str]]) = match doc.get("kind")?.as_str()? {
        "AuthorizationPolicy" => match upper(spec.get("action")).as_deref() {
            Some("AUDIT") => return None,
            // ALLOW policies add up: an empty one allows nothing more, and makes sure
            // an ALLOW policy applies (else everything would be allowed).
            None | Some("ALLOW") => (json!({}), policy_scopes),
            Some("DENY") if spec.get("rules").and_then(Value::as_array).is_none_or(Vec::is_empty) => return None,
            // What it denies is not known: all of it (one empty rule matches all).
            _ => (json!({"action": "DENY", "rules": [{}]}), policy_scopes),
        },
        "PeerAuthentication" => {
            let strict = |v: &Value| upper(v.get("mode")).as_deref() == Some("STRICT");
            let ports = spec.get("portLevelMtls").and_then(Value::as_object);
            if !(spec.get("mtls").is_some_and(strict) || ports.is_some_and(|p| p.values().any(strict))) {
                return None;
            }
            (json!({"mtls": {"mode": "STRICT"}}), &[&["selector"], &[]])
        }
        _ => return None,
    };
    for field in *scopes.get(stage)? {
        if let Some(value) = spec.get(*field) {
            stand_in[*field] = value.clone();
        }
    }
    let mut doc = doc.clone();
    doc["spec"] = stand_in;
    Some(doc)
}

/// Lists every watched kind once (`meshctl validate --kubernetes`): the same
/// documents the controller's watchers would build.
pub async fn list_cluster(client: &Client) -> Result<Store, kube::Error> {
    let mut store = Store::default();
    for kind in WATCHED {
        if kind.optional && !installed(client, kind).await? {
            store.absent(kind);
            continue;
        }
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.api_resource());
        store.apply(kind, watcher::Event::Init);
        let mut params = ListParams::default().limit(500);
        if let Some(fields) = kind.fields {
            params = params.fields(fields);
        }
        loop {
            let list = api.list(&params).await?;
            for object in list.items {
                store.apply(kind, watcher::Event::InitApply(object));
            }
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        store.apply(kind, watcher::Event::InitDone);
    }
    Ok(store)
}

/// What the source needs from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    pub trust_domain: String,
    pub root_namespace: String,
    /// Quiet time after a change before the set is loaded again (changes arrive in
    /// bursts: a rollout touches many pods).
    pub debounce: Duration,
}

/// A kind's watcher event, or the news that the kind is not installed.
enum Update {
    Event(&'static WatchedKind, Box<watcher::Event<DynamicObject>>),
    Absent(&'static WatchedKind),
}

/// Whether an optional kind is installed: a one-item list answers 404 when its CRD is
/// absent.
async fn installed(client: &Client, kind: &WatchedKind) -> Result<bool, kube::Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.api_resource());
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(error) => Err(error),
    }
}

/// The stream of one kind: its watcher, or (optional kind not installed) a single
/// [`Update::Absent`] and a check every minute until it appears.
fn watch_kind(client: Client, kind: &'static WatchedKind) -> BoxStream<'static, Update> {
    stream::once(async move {
        if kind.optional {
            loop {
                match installed(&client, kind).await {
                    Ok(true) => break,
                    Ok(false) => {
                        if kind.group.ends_with("istio.io") {
                            // Old Istio CRDs (before 1.22) do not serve v1: their policies
                            // would silently not apply.
                            warn!(kind = kind.kind, api_version = %kind.api_version(), "kind not served by this cluster: objects of it are NOT applied (install the mesh's CRDs, which serve v1); watching for it");
                        } else {
                            info!(kind = kind.kind, "kind not installed on this cluster; watching for it");
                        }
                        return stream::once(async move { Update::Absent(kind) })
                            .chain(
                                stream::once(async move {
                                    tokio::time::sleep(Duration::from_mins(1)).await;
                                    watch_kind(client, kind)
                                })
                                .flatten(),
                            )
                            .boxed();
                    }
                    Err(error) => {
                        warn!(kind = kind.kind, %error, "cannot query the API server; retrying");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        }
        let api: Api<DynamicObject> = Api::all_with(client, &kind.api_resource());
        let mut config = watcher::Config::default().any_semantic();
        if let Some(fields) = kind.fields {
            config = config.fields(fields);
        }
        watcher(api, config)
            .default_backoff()
            .filter_map(move |event| async move {
                match event {
                    Ok(event) => Some(Update::Event(kind, Box::new(event))),
                    Err(error) => {
                        warn!(kind = kind.kind, %error, "watch failed; retrying");
                        None
                    }
                }
            })
            .boxed()
    })
    .flatten()
    .boxed()
}

/// Watches every kind forever and keeps the controller's configuration current.
/// Validation problems go to `problems_out` (the reporter writes them to the objects).
pub async fn run(
    client: Client,
    controller: Arc<Controller>,
    settings: Settings,
    problems_out: tokio::sync::watch::Sender<Reported>,
    mut synced: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let mut updates = stream::select_all(WATCHED.iter().map(|kind| watch_kind(client.clone(), kind)));
    let mut store = Store::default();
    let mut admission = Admission::default();
    // When the first change not yet loaded arrived: changes are loaded after a quiet
    // `debounce`, and at the latest `MAX_DELAY` after the first one (steady churn, such
    // as a large rollout, must not postpone them forever).
    let mut dirty: Option<tokio::time::Instant> = None;
    loop {
        let next = if let Some(since) = dirty.filter(|_| store.synced()) {
            let wait = settings.debounce.min(MAX_DELAY.saturating_sub(since.elapsed()));
            if let Ok(next) = tokio::time::timeout(wait, updates.next()).await {
                next
            } else {
                dirty = None;
                let admitted = admit(&store, &mut admission, &controller, &settings, &problems_out).await;
                // Agents are served only once a configuration of the cluster applied.
                if admitted && let Some(synced) = synced.take() {
                    info!(objects = store.documents().len(), "cluster listed");
                    let _ = synced.send(());
                }
                continue;
            }
        } else {
            updates.next().await
        };
        let Some(update) = next else { return };
        let changed = match update {
            Update::Event(kind, event) => store.apply(kind, *event),
            Update::Absent(kind) => store.absent(kind),
        };
        if changed && dirty.is_none() {
            dirty = Some(tokio::time::Instant::now());
        }
    }
}

/// The longest a change waits for the set to be loaded.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// Problems to report on objects: key -> (object, problems).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reported(pub BTreeMap<String, (ObjectRef, Vec<Problem>)>);

/// Admits the store's documents; false when nothing could be applied. New key sets
/// are fetched before the configuration is applied ([`Controller::apply_fetching`]).
async fn admit(
    store: &Store,
    admission: &mut Admission,
    controller: &Controller,
    settings: &Settings,
    problems_out: &tokio::sync::watch::Sender<Reported>,
) -> bool {
    match admission.admit(store.documents(), &settings.trust_domain, &settings.root_namespace) {
        Ok(admitted) => {
            let reported = Reported(
                admitted
                    .problems
                    .iter()
                    .filter_map(|(key, problems)| Some((key.clone(), (store.object_ref(key)?, problems.clone()))))
                    .collect(),
            );
            // Counted and logged once per change, not again at every reload while the
            // same objects stay invalid (other objects applied).
            if admitted.problems.is_empty() {
                controller.clear_rejection();
            } else {
                let report = Report(admitted.problems.values().flatten().cloned().collect());
                controller.reject_if_new(&format!(
                    "{report}\n(held at their last accepted version: {:?}; left out: {:?}; denying in their place: {:?}; the rest applies)",
                    admitted.held, admitted.left_out, admitted.denying
                ));
            }
            problems_out.send_if_modified(|current| {
                let changed = *current != reported;
                *current = reported;
                changed
            });
            if let Some(version) = controller.apply_fetching(admitted.config).await {
                debug!(version, objects = store.documents().len(), "cluster configuration applied");
            }
            true
        }
        Err(report) => {
            controller.reject(&report.to_string());
            false
        }
    }
}

/// The condition written to the status of an Istio object.
pub fn status_patch(object: &ObjectRef, problems: &[Problem], now: &str) -> Value {
    let (status, reason, message) = if problems.is_empty() {
        ("True", "Accepted", "accepted by the mesh controller".to_owned())
    } else {
        ("False", "Invalid", problem_text(problems))
    };
    let mut patch = json!({
        "status": {
            "conditions": [{
                "type": "Accepted",
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
            }],
        }
    });
    if let Some(generation) = object.generation {
        patch["status"]["observedGeneration"] = json!(generation);
        patch["status"]["conditions"][0]["observedGeneration"] = json!(generation);
    }
    patch
}

/// The problems of one object as one message (at most 1 KiB, the Events API's limit).
pub fn problem_text(problems: &[Problem]) -> String {
    let mut text = problems
        .iter()
        .map(|p| if p.field.is_empty() { p.reason.clone() } else { format!("{}: {}", p.field, p.reason) })
        .collect::<Vec<_>>()
        .join("; ");
    if text.len() > 1000 {
        let mut end = 1000;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" ...");
    }
    text
}

/// Writes validation results to the objects while this replica leads: a Warning Event
/// per invalid object (`kubectl describe` shows it) and, on the Istio kinds, an
/// `Accepted` status condition (False with the problems, True again once fixed).
pub async fn report(
    client: Client,
    instance: String,
    mut problems: tokio::sync::watch::Receiver<Reported>,
    mut leader: tokio::sync::watch::Receiver<bool>,
) {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let recorder =
        Recorder::new(client.clone(), Reporter { controller: "mesh-controller".into(), instance: Some(instance) });
    let mut written = Reported::default();
    let mut failed: BTreeSet<String> = BTreeSet::new();
    loop {
        if *leader.borrow_and_update() {
            let current = problems.borrow_and_update().clone();
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            for (key, (object, list)) in &current.0 {
                if written.0.get(key).is_some_and(|(_, w)| w == list) {
                    continue;
                }
                let reference = k8s_openapi::api::core::v1::ObjectReference {
                    api_version: Some(object.kind.api_version()),
                    kind: Some(object.kind.kind.to_owned()),
                    name: Some(object.name.clone()),
                    namespace: (!object.namespace.is_empty()).then(|| object.namespace.clone()),
                    uid: (!object.uid.is_empty()).then(|| object.uid.clone()),
                    ..Default::default()
                };
                let event = Event {
                    type_: EventType::Warning,
                    reason: "InvalidConfiguration".into(),
                    note: Some(problem_text(list)),
                    action: "Validate".into(),
                    secondary: None,
                };
                let published = recorder.publish(&event, &reference).await;
                if let Err(error) = &published {
                    warn!(object = %key, %error, "cannot write the validation Event; will retry");
                }
                let patched = patch_status(&client, object, list, &now, key).await;
                if published.is_err() || !patched {
                    failed.insert(key.clone());
                }
            }
            // Objects fixed since: their condition turns back to Accepted.
            for (key, (object, _)) in &written.0 {
                if !current.0.contains_key(key) {
                    patch_status(&client, object, &[], &now, key).await;
                }
            }
            // What could not be written is tried again on the next round.
            written = Reported(current.0.into_iter().filter(|(k, _)| !failed.contains(k)).collect());
        } else {
            // A replica that leads again writes everything again.
            written = Reported::default();
        }
        let retry = !failed.is_empty();
        failed.clear();
        tokio::select! {
            changed = problems.changed() => if changed.is_err() { return },
            changed = leader.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(30)), if retry => {}
        }
    }
}

/// Writes the `Accepted` condition; false when the API refused it.
async fn patch_status(client: &Client, object: &ObjectRef, problems: &[Problem], now: &str, key: &str) -> bool {
    if !object.kind.status {
        return true;
    }
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &object.namespace, &object.kind.api_resource());
    let patch = status_patch(object, problems, now);
    match api.patch_status(&object.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => true,
        // Deleted meanwhile: nothing to report on.
        Err(kube::Error::Api(status)) if status.code == 404 => true,
        Err(error) => {
            warn!(object = %key, %error, "cannot write the status condition; will retry");
            false
        }
    }
}
