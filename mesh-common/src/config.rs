//! The mesh's configuration model: Kubernetes-style manifests of the Istio, Gateway API
//! and core kinds the mesh serves, the loader that reads them from YAML/JSON and the
//! validation that both the controller (online) and `meshctl validate` (offline) run.
//!
//! [`load`] reads every document of every source, checks it and returns either the
//! whole [`Config`] or a [`Report`] of every problem found, each naming the file, the
//! object (`Kind/namespace/name`), the field path and the reason. Kinds the mesh does
//! not serve (`Deployment`, `ConfigMap`s other than Istio's mesh config, ...) are recorded in
//! [`Config::ignored`], never rejected, so that whole application manifests can be fed
//! as they are. The model serializes to JSON losslessly: the controller ships it to
//! agents that way.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs, io,
    path::{Path, PathBuf},
    prelude::rust_2024::*,
};

use serde::{Deserialize, Serialize};

pub mod envoy_filter;
pub mod gateway;
pub mod k8s;
pub mod mesh;
pub mod meta;
pub mod networking;
pub mod security;
pub mod telemetry;
pub mod values;

mod parse;
#[cfg(test)]
mod tests;
mod validate;

pub use envoy_filter::EnvoyFilter;
pub use gateway::{Gateway, GatewayClass, GrpcRoute, HttpRoute, ReferenceGrant, TcpRoute, TlsRoute};
pub use k8s::{EndpointSlice, Namespace, Pod, Service};
pub use mesh::MeshConfig;
pub use meta::ObjectMeta;
pub use networking::{DestinationRule, IstioGateway, ServiceEntry, VirtualService, WorkloadEntry};
pub use security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};
pub use telemetry::Telemetry;
pub use values::{IpNet, parse_duration};

/// Fields of the pinned Istio and Gateway API schemas (`deploy/crds`,
/// `deploy/gateway-api`) that the mesh accepts but does not enforce yet: (kind, field
/// path with `[]` for any list item and `*` for any map value). They are set aside
/// before decoding, each occurrence with a warning, so that a manifest Istio accepts
/// is accepted here too and its author learns what has no effect. The schema test
/// (`tests/schemas.rs`) keeps this list and the schemas in step.
pub const NOT_ENFORCED: &[(&str, &str)] = &[
    // Envoy's retry budget (Istio 1.29+): retries are bounded by attempts only.
    ("DestinationRule", "spec.trafficPolicy.retryBudget"),
    ("DestinationRule", "spec.subsets[].trafficPolicy.retryBudget"),
    // Gateway API's Gateway-level TLS (client certificates to backends, frontend
    // validation): the waypoint speaks HBONE, not these.
    ("Gateway", "spec.tls"),
];

/// Namespace whose policies (without a selector) apply to the whole mesh.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// Trust domain of the SPIFFE identities the mesh issues.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The cluster's DNS domain: short host names expand to `name.ns.svc.<domain>`.
pub const DNS_DOMAIN: &str = "cluster.local";

/// One input: a file's text, or an object fetched from the Kubernetes API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The file path (or an object reference) that problems name.
    pub name: String,
    pub text: String,
}

impl Source {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        Self { name: name.into(), text: text.into() }
    }
}

/// One thing wrong with the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub file: String,
    /// `Kind/namespace/name` (`Kind/name` for cluster-scoped kinds), when the problem
    /// belongs to one object.
    pub object: Option<String>,
    /// Field path in the object, such as `spec.http[0].route[1].weight`; empty when the
    /// problem is the document itself (YAML syntax, not an object).
    pub field: String,
    pub reason: String,
}

impl Problem {
    pub fn new(
        file: impl Into<String>,
        object: Option<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self { file: file.into(), object, field: field.into(), reason: reason.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: ", self.file)?;
        // Objects from the Kubernetes API are their own source: named once.
        if let Some(object) = self.object.as_ref().filter(|o| **o != self.file) {
            write!(f, "{object}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.reason)
    }
}

/// Every problem of a configuration that was rejected, in input order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report(pub Vec<Problem>);

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Report {}

/// The validated configuration: every object the mesh serves, by kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Config {
    pub root_namespace: String,
    pub trust_domain: String,
    pub namespaces: Vec<Namespace>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    pub workload_entries: Vec<WorkloadEntry>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub request_authentications: Vec<RequestAuthentication>,
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub service_entries: Vec<ServiceEntry>,
    pub telemetries: Vec<Telemetry>,
    pub http_routes: Vec<HttpRoute>,
    pub grpc_routes: Vec<GrpcRoute>,
    pub gateways: Vec<Gateway>,
    /// Validated, not served: what users write next to routes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gateway_classes: Vec<GatewayClass>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reference_grants: Vec<ReferenceGrant>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tcp_routes: Vec<TcpRoute>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_routes: Vec<TlsRoute>,
    /// Istio's `networking.istio.io` `Gateway`s (ingress/egress gateway servers).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub istio_gateways: Vec<IstioGateway>,
    /// `EnvoyFilter`s, each the local rate limit shape (the loader rejects others);
    /// [`EnvoyFilter::local_rate_limit`] is the typed view the waypoint enforces.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub envoy_filters: Vec<EnvoyFilter>,
    /// Istio's mesh config (the `ConfigMap` `istio` of the root namespace, key
    /// `mesh`); defaults when there is none.
    #[serde(skip_serializing_if = "MeshConfig::is_default")]
    pub mesh: MeshConfig,
    /// What is accepted but deserves a look, in input order: references to objects
    /// that are not loaded (a route's subset whose `DestinationRule` is in another
    /// file or not applied yet: at run time such requests get 503 with response flag
    /// `NR`, as in Istio), fields accepted but not enforced yet, deprecated fields.
    /// `meshctl validate` prints them (and fails on them with `--strict`); the
    /// controller logs them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Problem>,
    /// Documents accepted but not served, one line each:
    /// `Kind/namespace/name (apiVersion) in FILE: why` (`Kind/name` when the document
    /// names no namespace). The kind is everything before the first `/`.
    pub ignored: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            namespaces: Vec::new(),
            services: Vec::new(),
            endpoint_slices: Vec::new(),
            pods: Vec::new(),
            workload_entries: Vec::new(),
            authorization_policies: Vec::new(),
            peer_authentications: Vec::new(),
            request_authentications: Vec::new(),
            virtual_services: Vec::new(),
            destination_rules: Vec::new(),
            service_entries: Vec::new(),
            telemetries: Vec::new(),
            http_routes: Vec::new(),
            grpc_routes: Vec::new(),
            gateways: Vec::new(),
            gateway_classes: Vec::new(),
            reference_grants: Vec::new(),
            tcp_routes: Vec::new(),
            tls_routes: Vec::new(),
            istio_gateways: Vec::new(),
            envoy_filters: Vec::new(),
            mesh: MeshConfig::default(),
            warnings: Vec::new(),
            ignored: Vec::new(),
        }
    }
}

impl Config {
    /// A namespace is meshed when its `Namespace` object carries
    /// `istio.io/dataplane-mode: ambient`.
    pub fn namespace_is_meshed(&self, ns: &str) -> bool {
        self.namespaces.iter().any(|n| {
            n.metadata.name == ns && n.metadata.labels.get(k8s::DATAPLANE_MODE_LABEL).is_some_and(|m| m == "ambient")
        })
    }

    /// A pod is meshed when it opts in itself (`istio.io/dataplane-mode: ambient`) or
    /// its namespace is meshed and it does not opt out (`istio.io/dataplane-mode: none`).
    /// Host-network pods and pods running an Istio sidecar are never captured, as in
    /// Istio's ambient mode.
    pub fn pod_is_meshed(&self, pod: &Pod) -> bool {
        if pod.spec.host_network || pod.metadata.annotations.contains_key(k8s::SIDECAR_STATUS_ANNOTATION) {
            return false;
        }
        match pod.metadata.labels.get(k8s::DATAPLANE_MODE_LABEL).map(String::as_str) {
            Some("none") => false,
            Some("ambient") => true,
            _ => self.namespace_is_meshed(&pod.metadata.namespace),
        }
    }

    /// The SPIFFE identity of a service account: `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self, ns: &str, sa: &str) -> String {
        format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain)
    }

    /// How many objects the mesh serves (ignored documents not counted).
    pub fn object_count(&self) -> usize {
        self.namespaces.len()
            + self.services.len()
            + self.endpoint_slices.len()
            + self.pods.len()
            + self.workload_entries.len()
            + self.authorization_policies.len()
            + self.peer_authentications.len()
            + self.request_authentications.len()
            + self.virtual_services.len()
            + self.destination_rules.len()
            + self.service_entries.len()
            + self.telemetries.len()
            + self.http_routes.len()
            + self.grpc_routes.len()
            + self.gateways.len()
            + self.gateway_classes.len()
            + self.reference_grants.len()
            + self.tcp_routes.len()
            + self.tls_routes.len()
            + self.istio_gateways.len()
            + self.envoy_filters.len()
    }

    /// What was read but not checked, by kind: (kind, API group, count) in first-seen
    /// order. The group is `core` for `v1`, `?` when the document names no apiVersion.
    pub fn not_checked(&self) -> Vec<(String, String, usize)> {
        let mut out: Vec<(String, String, usize)> = Vec::new();
        for entry in &self.ignored {
            let kind = entry.split(['/', ' ']).next().unwrap_or(entry);
            let api_version = entry.split_once(" (").and_then(|(_, rest)| rest.split_once(')')).map_or("", |(v, _)| v);
            let group = match api_version.rsplit_once('/') {
                Some((group, _)) => group,
                None if api_version.starts_with('v') => "core",
                None => "?",
            };
            match out.iter_mut().find(|(k, g, _)| k == kind && g == group) {
                Some((_, _, n)) => *n += 1,
                None => out.push((kind.to_string(), group.to_string(), 1)),
            }
        }
        out
    }

    /// [`Config::not_checked`] as a person reads it: `2 Sidecar (networking.istio.io),
    /// 1 Deployment (apps)`; empty when everything was checked.
    pub fn not_checked_summary(&self) -> String {
        let parts: Vec<String> =
            self.not_checked().iter().map(|(kind, group, n)| format!("{n} {kind} ({group})")).collect();
        parts.join(", ")
    }

    /// The kinds of the ignored documents, each once, in first-seen order.
    pub fn ignored_kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = Vec::new();
        for entry in &self.ignored {
            let kind = entry.split(['/', ' ']).next().unwrap_or(entry);
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        kinds
    }
}

/// Parses and validates every document of every source. All problems are reported,
/// not only the first (each object is checked on its own, then against the others:
/// duplicates, references), in input order.
///
/// Warnings (what Istio's admission accepts but `istioctl analyze` reports) do not
/// reject the configuration: they are in [`Config::warnings`].
pub fn load(sources: &[Source]) -> Result<Config, Report> {
    let mut problems = Vec::new();
    let mut loaded = parse::Loaded::default();
    for source in sources {
        parse::parse_source(source, &mut loaded, &mut problems);
    }
    let mut warnings = std::mem::take(&mut loaded.warnings);
    validate::validate(&loaded, &mut problems, &mut warnings);
    // Stable: the problems of one object stay in the order the checks found them.
    problems.sort_by_key(|(seq, _)| *seq);
    warnings.sort_by_key(|(seq, _)| *seq);
    if problems.is_empty() {
        let mut config = loaded.config;
        config.warnings = warnings.into_iter().map(|(_, p)| p).collect();
        // Where Istio merges several objects oldest first (VirtualServices of one host
        // at a waypoint, DestinationRules of one host), configuration order is age
        // order; objects without a creation time (from files) keep their file order.
        config.virtual_services.sort_by(|a, b| a.metadata.creation_timestamp.cmp(&b.metadata.creation_timestamp));
        config.destination_rules.sort_by(|a, b| a.metadata.creation_timestamp.cmp(&b.metadata.creation_timestamp));
        Ok(config)
    } else {
        Err(Report(problems.into_iter().map(|(_, p)| p).collect()))
    }
}

/// Reads files and directories (recursively: `*.yaml`, `*.yml`, `*.json`, in sorted
/// order). A path given explicitly is read whatever its extension. What cannot be read
/// becomes a problem; the rest is returned.
pub fn read_sources(paths: &[PathBuf]) -> (Vec<Source>, Vec<Problem>) {
    let (files, mut problems) = manifest_files(paths);
    let mut sources = Vec::new();
    for file in files {
        match fs::read_to_string(&file) {
            Ok(text) => sources.push(Source::new(file.display().to_string(), text)),
            Err(e) => problems.push(io_problem(&file, &e)),
        }
    }
    (sources, problems)
}

/// [`read_sources`] then [`load`], with the problems of both in one report.
pub fn load_paths(paths: &[PathBuf]) -> Result<Config, Report> {
    let (sources, mut problems) = read_sources(paths);
    match load(&sources) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(Report(problems)),
        Err(Report(more)) => {
            problems.extend(more);
            Err(Report(problems))
        }
    }
}

/// The manifest files `paths` name: files as given, and below directories every
/// `.yaml`, `.yml` and `.json` file, in name order. Hidden entries (a leading `.`) are
/// skipped: a `ConfigMap` or `Secret` mounted as a volume holds each file twice, as
/// `name.yaml` and inside its `..data` (`..<timestamp>`) directory, and a checkout's
/// `.git` or `.github` holds no manifests.
pub fn manifest_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<Problem>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    let mut visited = BTreeSet::new();
    for path in paths {
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => collect_dir(path, &mut files, &mut problems, &mut visited),
            Ok(_) => files.push(path.clone()),
            Err(e) => problems.push(io_problem(path, &e)),
        }
    }
    (files, problems)
}

/// `visited` holds the canonical paths of the directories read, so that a symbolic
/// link back up the tree does not loop.
fn collect_dir(dir: &Path, files: &mut Vec<PathBuf>, problems: &mut Vec<Problem>, visited: &mut BTreeSet<PathBuf>) {
    if let Ok(canonical) = fs::canonicalize(dir)
        && !visited.insert(canonical)
    {
        return;
    }
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return problems.push(io_problem(dir, &e)),
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) if entry.file_name().as_encoded_bytes().starts_with(b".") => {}
            Ok(entry) => paths.push(entry.path()),
            Err(e) => problems.push(io_problem(dir, &e)),
        }
    }
    paths.sort();
    for path in paths {
        if path.is_dir() {
            collect_dir(&path, files, problems, visited);
        } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json")) {
            files.push(path);
        }
    }
}

fn io_problem(path: &Path, error: &io::Error) -> Problem {
    Problem::new(path.display().to_string(), None, "", format!("cannot read: {error}"))
}

/// Counts by kind of what a [`Config`] holds, for summaries (`meshctl`, logs).
pub fn kind_counts(config: &Config) -> BTreeMap<&'static str, usize> {
    let counts = [
        ("Namespace", config.namespaces.len()),
        ("Service", config.services.len()),
        ("EndpointSlice", config.endpoint_slices.len()),
        ("Pod", config.pods.len()),
        ("WorkloadEntry", config.workload_entries.len()),
        ("AuthorizationPolicy", config.authorization_policies.len()),
        ("PeerAuthentication", config.peer_authentications.len()),
        ("RequestAuthentication", config.request_authentications.len()),
        ("VirtualService", config.virtual_services.len()),
        ("DestinationRule", config.destination_rules.len()),
        ("ServiceEntry", config.service_entries.len()),
        ("Telemetry", config.telemetries.len()),
        ("HTTPRoute", config.http_routes.len()),
        ("GRPCRoute", config.grpc_routes.len()),
        ("Gateway", config.gateways.len()),
        ("GatewayClass", config.gateway_classes.len()),
        ("ReferenceGrant", config.reference_grants.len()),
        ("TCPRoute", config.tcp_routes.len()),
        ("TLSRoute", config.tls_routes.len()),
        ("Gateway.networking.istio.io", config.istio_gateways.len()),
        ("EnvoyFilter", config.envoy_filters.len()),
    ];
    counts.into_iter().filter(|(_, n)| *n > 0).collect()
}
