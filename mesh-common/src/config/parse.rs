//! From text to typed objects: splits multi-document YAML (JSON is YAML too), tells the
//! kind of each document, decodes it with field paths for every error, and records
//! where each object came from for the checks that follow.
use std::{collections::BTreeMap, fmt, fmt::Write as _, prelude::rust_2024::*};

use serde::{Deserialize, Deserializer, de::IgnoredAny};
use serde_yaml::{Mapping, Value};

use super::{
    Config, Problem, Source,
    envoy_filter::EnvoyFilter,
    gateway::{
        Gateway, GatewayClass, GatewayClassSpec, GatewaySpec, GrpcRoute, GrpcRouteSpec, HttpRoute, HttpRouteSpec,
        L4RouteSpec, ReferenceGrant, ReferenceGrantSpec, TcpRoute, TlsRoute,
    },
    k8s::{EndpointSlice, Namespace, NamespaceSpec, Pod, PodSpec, PodStatus, Service, ServiceSpec},
    mesh,
    meta::{ObjectMeta, nullable},
    networking::{
        DestinationRule, DestinationRuleSpec, IstioGateway, IstioGatewaySpec, ServiceEntry, ServiceEntrySpec,
        VirtualService, VirtualServiceSpec, WorkloadEntry, WorkloadEntrySpec,
    },
    security::{
        AuthorizationPolicy, AuthorizationPolicySpec, PeerAuthentication, PeerAuthenticationSpec,
        RequestAuthentication, RequestAuthenticationSpec,
    },
    telemetry::{Telemetry, TelemetrySpec},
};

/// The kinds the mesh serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Namespace,
    Service,
    EndpointSlice,
    Pod,
    WorkloadEntry,
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    Telemetry,
    HttpRoute,
    GrpcRoute,
    Gateway,
    GatewayClass,
    ReferenceGrant,
    TcpRoute,
    TlsRoute,
    /// Istio's `networking.istio.io` `Gateway` (not Gateway API's).
    IstioGateway,
    /// Only the local rate limit shape (checked in `validate`).
    EnvoyFilter,
}

/// The kinds of Istio's and Gateway API's groups (standard and experimental channels of
/// the pinned releases) that the mesh does not check: named "not checked". A kind of
/// these groups in neither list is a mistake.
const OTHER_KINDS: &[(&str, &[&str])] = &[
    ("networking.istio.io", &["Sidecar", "WorkloadGroup", "ProxyConfig"]),
    ("security.istio.io", &[]),
    ("telemetry.istio.io", &[]),
    ("extensions.istio.io", &["WasmPlugin", "TrafficExtension"]),
    ("gateway.networking.k8s.io", &["UDPRoute", "BackendTLSPolicy", "ListenerSet", "BackendLBPolicy"]),
];

const NETWORKING: &[&str] = &["v1alpha3", "v1beta1", "v1"];
const SECURITY: &[&str] = &["v1beta1", "v1"];

impl Kind {
    const ALL: [Kind; 21] = [
        Kind::Namespace,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::WorkloadEntry,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::ServiceEntry,
        Kind::Telemetry,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::Gateway,
        Kind::GatewayClass,
        Kind::ReferenceGrant,
        Kind::TcpRoute,
        Kind::TlsRoute,
        Kind::IstioGateway,
        Kind::EnvoyFilter,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::Telemetry => "Telemetry",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::Gateway | Kind::IstioGateway => "Gateway",
            Kind::GatewayClass => "GatewayClass",
            Kind::ReferenceGrant => "ReferenceGrant",
            Kind::TcpRoute => "TCPRoute",
            Kind::TlsRoute => "TLSRoute",
            Kind::EnvoyFilter => "EnvoyFilter",
        }
    }

    /// API group (`""` is the core group, written `v1` without a group).
    fn group(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Service | Kind::Pod => "",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::WorkloadEntry
            | Kind::VirtualService
            | Kind::DestinationRule
            | Kind::ServiceEntry
            | Kind::IstioGateway
            | Kind::EnvoyFilter => "networking.istio.io",
            Kind::AuthorizationPolicy | Kind::PeerAuthentication | Kind::RequestAuthentication => "security.istio.io",
            Kind::Telemetry => "telemetry.istio.io",
            Kind::HttpRoute
            | Kind::GrpcRoute
            | Kind::Gateway
            | Kind::GatewayClass
            | Kind::ReferenceGrant
            | Kind::TcpRoute
            | Kind::TlsRoute => "gateway.networking.k8s.io",
        }
    }

    fn versions(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace | Kind::Service | Kind::Pod | Kind::EndpointSlice => &["v1"],
            Kind::WorkloadEntry
            | Kind::VirtualService
            | Kind::DestinationRule
            | Kind::ServiceEntry
            | Kind::IstioGateway => NETWORKING,
            // Istio serves EnvoyFilter in v1alpha3 only.
            Kind::EnvoyFilter => &["v1alpha3"],
            Kind::AuthorizationPolicy | Kind::PeerAuthentication | Kind::RequestAuthentication => SECURITY,
            Kind::Telemetry => &["v1alpha1", "v1"],
            Kind::HttpRoute | Kind::Gateway | Kind::GatewayClass | Kind::ReferenceGrant => &["v1", "v1beta1"],
            Kind::TlsRoute => &["v1", "v1alpha3", "v1alpha2"],
            Kind::GrpcRoute | Kind::TcpRoute => &["v1", "v1alpha2"],
        }
    }

    pub(crate) fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::GatewayClass)
    }

    fn api_versions(self) -> String {
        let group = self.group();
        let all: Vec<String> = self
            .versions()
            .iter()
            .map(|v| if group.is_empty() { (*v).to_string() } else { format!("{group}/{v}") })
            .collect();
        all.join(", ")
    }
}

/// `Kind/namespace/name`, or `Kind/name` for a cluster-scoped object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub(crate) fn of(kind: Kind, meta: &ObjectMeta) -> Self {
        Self { kind, namespace: meta.namespace.clone(), name: meta.name.clone() }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        object_id(f, self.kind.name(), &self.namespace, &self.name)
    }
}

fn object_id(f: &mut fmt::Formatter, kind: &str, namespace: &str, name: &str) -> fmt::Result {
    let name = if name.is_empty() { "\"\"" } else { name };
    if namespace.is_empty() { write!(f, "{kind}/{name}") } else { write!(f, "{kind}/{namespace}/{name}") }
}

struct Id<'a>(&'a str, &'a str, &'a str);

impl fmt::Display for Id<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        object_id(f, self.0, self.1, self.2)
    }
}

/// Where an object was read: the file, and the document's position in the whole
/// input (problems are reported in that order).
#[derive(Clone, Debug)]
pub(crate) struct Origin {
    pub file: String,
    pub seq: usize,
}

/// A problem and the input position it sorts by.
pub(crate) type Found = Vec<(usize, Problem)>;

/// What the parse produced, for validation: the objects, where each came from, and
/// the hosts of `DestinationRule`s that could not be decoded (references to their
/// subsets are not reported: the rule's own problem is the one to fix).
#[derive(Default)]
pub(crate) struct Loaded {
    pub config: Config,
    pub origins: BTreeMap<ObjectKey, Origin>,
    pub broken_destination_rules: Vec<(String, String)>,
    /// Warnings found while decoding (fields accepted but not enforced).
    pub warnings: Found,
    /// Documents read so far, across sources.
    documents: usize,
    /// The file the mesh config `ConfigMap` came from.
    mesh_source: Option<String>,
}

impl Loaded {
    /// The file, the `Kind/namespace/name` and the input position of an object.
    pub(crate) fn origin(&self, kind: Kind, meta: &ObjectMeta) -> (&str, String, usize) {
        let key = ObjectKey::of(kind, meta);
        let (file, seq) = self.origins.get(&key).map_or(("", 0), |o| (o.file.as_str(), o.seq));
        (file, key.to_string(), seq)
    }
}

/// Every Kubernetes object: `apiVersion`, `kind`, `metadata`, `spec`; `status` is
/// tolerated (exported objects carry it) and read only where the mesh needs it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[serde(bound(deserialize = "S: Deserialize<'de> + Default, T: Deserialize<'de>"))]
struct Envelope<S, T = IgnoredAny> {
    #[serde(rename = "apiVersion")]
    _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    spec: S,
    #[serde(default)]
    status: Option<T>,
}

/// A decoding failure: the field path and the reason (with the line when known), and
/// where in the document it is, to set that part aside and look for more.
struct DecodeError {
    field: String,
    reason: String,
    line: Option<usize>,
    /// The path serde reports: the failing value, or the object missing a field.
    at: Vec<Step>,
}

/// One step of a path into a document.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

fn decode<'de, T, D>(deserializer: D) -> Result<T, DecodeError>
where
    T: Deserialize<'de>,
    D: Deserializer<'de, Error = serde_yaml::Error>,
{
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let at = e
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
                serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
                _ => None,
            })
            .collect::<Vec<_>>();
        let error = e.into_inner();
        let (field, reason) = describe(&at, &error);
        DecodeError { field, reason, line: error.location().map(|l| l.line()), at }
    })
}

/// Whether the document decodes as `kind`, and the first error if not.
fn check<'de, D>(kind: Kind, value: D) -> Result<(), DecodeError>
where
    D: Deserializer<'de, Error = serde_yaml::Error>,
{
    macro_rules! envelope {
        ($spec:ty) => {
            decode::<Envelope<$spec>, _>(value).map(drop)
        };
    }
    match kind {
        Kind::Namespace => envelope!(NamespaceSpec),
        Kind::Service => envelope!(ServiceSpec),
        Kind::EndpointSlice => decode::<EndpointSlice, _>(value).map(drop),
        Kind::Pod => decode::<Envelope<PodSpec, PodStatus>, _>(value).map(drop),
        Kind::WorkloadEntry => envelope!(WorkloadEntrySpec),
        Kind::AuthorizationPolicy => envelope!(AuthorizationPolicySpec),
        Kind::PeerAuthentication => envelope!(PeerAuthenticationSpec),
        Kind::RequestAuthentication => envelope!(RequestAuthenticationSpec),
        Kind::VirtualService => envelope!(VirtualServiceSpec),
        Kind::DestinationRule => envelope!(DestinationRuleSpec),
        Kind::ServiceEntry => envelope!(ServiceEntrySpec),
        Kind::Telemetry => envelope!(TelemetrySpec),
        Kind::HttpRoute => envelope!(HttpRouteSpec),
        Kind::GrpcRoute => envelope!(GrpcRouteSpec),
        Kind::Gateway => envelope!(GatewaySpec),
        Kind::GatewayClass => envelope!(GatewayClassSpec),
        Kind::ReferenceGrant => envelope!(ReferenceGrantSpec),
        Kind::TcpRoute | Kind::TlsRoute => envelope!(L4RouteSpec),
        Kind::IstioGateway => envelope!(IstioGatewaySpec),
        Kind::EnvoyFilter => envelope!(serde_json::Value),
    }
}

/// The decoding errors after `first`: each round sets aside the part that failed
/// (removes the key, or nulls the list item) and decodes again. An error on a path
/// already reported (the key just removed is now "missing") is a consequence, not
/// another problem, and is not repeated.
fn more_decode_errors(kind: Kind, document: &Value, first: &DecodeError) -> Vec<DecodeError> {
    let mut value = document.clone();
    let mut reported = vec![first.field.clone()];
    let mut found = Vec::new();
    let mut at = first.at.clone();
    // Each round removes something, so this ends; the bound keeps a huge document cheap.
    for _ in 0..64 {
        // Set aside the failing part, or a larger one when that changes nothing.
        while !set_aside(&mut value, &at) {
            if at.pop().is_none() {
                return found;
            }
        }
        match check(kind, value.clone()) {
            Ok(()) => break,
            Err(next) => {
                let related = |r: &String| is_within(&next.field, r) || is_within(r, &next.field);
                if reported.iter().any(related) {
                    at = next.at;
                } else {
                    reported.push(next.field.clone());
                    at.clone_from(&next.at);
                    found.push(next);
                }
            }
        }
    }
    found
}

/// Whether `path` is `outer` or inside it (`a.b` is within `a`, `a[0]` too, `ab` not).
fn is_within(path: &str, outer: &str) -> bool {
    path.strip_prefix(outer).is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// Removes the key (or nulls the list item) at `at`; false when nothing changed.
fn set_aside(value: &mut Value, at: &[Step]) -> bool {
    let Some((last, parents)) = at.split_last() else { return false };
    let mut node = value;
    for step in parents {
        let next = match (step, node) {
            (Step::Key(k), Value::Mapping(m)) => m.get_mut(k.as_str()),
            (Step::Index(i), Value::Sequence(s)) => s.get_mut(*i),
            _ => None,
        };
        match next {
            Some(next) => node = next,
            None => return false,
        }
    }
    match (last, node) {
        (Step::Key(k), Value::Mapping(m)) => m.remove(k.as_str()).is_some(),
        // Removing an item would renumber the ones after it.
        (Step::Index(i), Value::Sequence(s)) => match s.get_mut(*i) {
            Some(item) if !item.is_null() => {
                *item = Value::Null;
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// Splits serde's message into a field path and a reason a person reads: the path of
/// a missing or unknown field ends with that field, `serde_yaml`'s own path prefix and
/// position suffix are dropped and the line is said once at the end.
fn describe(at: &[Step], error: &serde_yaml::Error) -> (String, String) {
    let mut message = error.to_string();
    if let Some(location) = error.location()
        && let Some(at) = message.rfind(" at line ")
        && message[at..].ends_with(&format!("column {}", location.column()))
    {
        message.truncate(at);
    }
    if let Some((prefix, rest)) = message.split_once(": ")
        && !prefix.contains(char::is_whitespace)
        && !prefix.contains('`')
    {
        message = rest.to_string();
    }
    let mut field = field_path(at);
    let quoted = |m: &str, lead: &str| -> Option<String> {
        let rest = m.strip_prefix(lead)?;
        let end = rest.find('`')?;
        Some(rest[..end].to_string())
    };
    if let Some(missing) = quoted(&message, "missing field `") {
        field = join(&field, &missing);
        message = "required field is missing".into();
    } else if let Some(unknown) = quoted(&message, "unknown field `") {
        if !field.ends_with(&unknown) {
            field = join(&field, &unknown);
        }
        if let Some((_, expected)) = message.split_once(", expected ") {
            message = format!("unknown field (expected {expected})");
        } else {
            message = "unknown field".into();
        }
    }
    message = plain_types(&message).replace("unit value", "null");
    (field, message)
}

/// serde names the Rust type it expected (`expected u32`, `expected struct HttpRule`);
/// say what a manifest author writes instead.
fn plain_types(message: &str) -> String {
    let Some((head, expected)) = message.rsplit_once(", expected ") else {
        return message.to_string();
    };
    let plain = match expected {
        "i64" | "i32" => "an integer",
        "u32" | "u64" | "u16" | "u8" => "a non-negative integer",
        "f64" | "f32" => "a number",
        "a boolean" => "true or false",
        _ if expected.starts_with("struct ") || expected.starts_with("a map") => "a mapping",
        _ => expected,
    };
    format!("{head}, expected {plain}")
}

/// Fields whose values are maps with keys the user chose (labels, header names,
/// ports): a key under one is written `["key"]`, not `.key`.
const MAP_FIELDS: &[&str] = &[
    "labels",
    "annotations",
    "matchLabels",
    "sourceLabels",
    "headers",
    "queryParams",
    "withoutHeaders",
    "portLevelMtls",
    "set",
    "add",
    "ports",
];

/// A path as the messages write it: `spec.http[0].match[1].headers["x-user"].exact`.
fn field_path(at: &[Step]) -> String {
    let mut out = String::new();
    let mut previous: Option<&Step> = None;
    for step in at {
        match step {
            Step::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
            // A VirtualService rule's `headers` holds `request`/`response`, not names.
            Step::Key(k)
                if matches!(previous, Some(Step::Key(p)) if MAP_FIELDS.contains(&p.as_str())
                    && !(p == "headers" && matches!(k.as_str(), "request" | "response"))) =>
            {
                let _ = write!(out, "[{k:?}]");
            }
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
        }
        previous = Some(step);
    }
    out
}

fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() { child.to_string() } else { format!("{parent}.{child}") }
}

/// Parses one source into `loaded`, adding what is wrong to `problems`.
pub(crate) fn parse_source(source: &Source, loaded: &mut Loaded, problems: &mut Found) {
    let text = kubectl_flow_scalars(&source.text);
    let source = &Source { name: source.name.clone(), text: text.into_owned() };
    // First pass: the documents as generic values, to tell their kind and to find
    // syntax errors (after one, libyaml cannot go on in that file).
    let mut values = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&source.text) {
        match Value::deserialize(document) {
            Ok(value) => values.push(value),
            Err(e) => {
                let at =
                    e.location().map(|l| format!(" (line {}, column {})", l.line(), l.column())).unwrap_or_default();
                let mut message = e.to_string();
                if let Some(i) = message.find(" at line ") {
                    message.truncate(i);
                }
                let problem = Problem::new(&source.name, None, "", format!("YAML syntax error: {message}{at}"));
                problems.push((loaded.documents + values.len(), problem));
                break;
            }
        }
    }
    // Second pass: decode each object straight from the text, so that errors carry
    // line numbers.
    let documents = serde_yaml::Deserializer::from_str(&source.text);
    for (index, (value, document)) in values.iter().zip(documents).enumerate() {
        let seq = loaded.documents + index;
        let mut doc = Doc { source, index, seq, problems, loaded };
        doc.document(value, document);
    }
    // One more for a syntax error, so that the next file's problems sort after it.
    loaded.documents += values.len() + 1;
}

struct Doc<'a> {
    source: &'a Source,
    index: usize,
    seq: usize,
    problems: &'a mut Found,
    loaded: &'a mut Loaded,
}

impl Doc<'_> {
    fn problem(&mut self, object: Option<String>, field: impl Into<String>, reason: impl Into<String>) {
        self.problems.push((self.seq, Problem::new(&self.source.name, object, field, reason)));
    }

    fn document(&mut self, value: &Value, document: serde_yaml::Deserializer<'_>) {
        match value {
            // An empty document (a trailing `---`, only comments).
            Value::Null => {}
            Value::Mapping(map) => {
                if is_list(map) {
                    self.list(map);
                } else {
                    self.object(map, "", document);
                }
            }
            _ => {
                let n = self.index + 1;
                self.problem(
                    None,
                    "",
                    format!("document {n} is not a Kubernetes object (a mapping with apiVersion and kind)"),
                );
            }
        }
    }

    /// `kind: List` (what `kubectl get -o yaml` prints): each item is an object.
    fn list(&mut self, map: &Mapping) {
        let items = match map.get("items") {
            Some(Value::Sequence(items)) => items,
            None | Some(Value::Null) => return,
            Some(_) => return self.problem(Some("List".into()), "items", "must be a list of objects"),
        };
        for (i, item) in items.iter().enumerate() {
            let prefix = format!("items[{i}].");
            match item {
                Value::Mapping(object) => self.object(object, &prefix, item.clone()),
                _ => self.problem(Some("List".into()), format!("items[{i}]"), "is not a Kubernetes object"),
            }
        }
    }

    fn object<'de, D>(&mut self, map: &Mapping, prefix: &str, deserializer: D)
    where
        D: Deserializer<'de, Error = serde_yaml::Error>,
    {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        let metadata = map.get("metadata");
        let name = text(metadata.and_then(|m| m.get("name"))).unwrap_or_default();
        let namespace = text(metadata.and_then(|m| m.get("namespace"))).unwrap_or_default();
        let api_version = text(map.get("apiVersion"));
        let Some(kind_name) = text(map.get("kind")) else {
            let why = if map.contains_key("kind") { "must be a string" } else { "required field is missing" };
            let n = self.index + 1;
            let object = if name.is_empty() { format!("document {n}") } else { format!("?/{name}") };
            return self.problem(Some(object), format!("{prefix}kind"), why);
        };
        // Two kinds share the name `Gateway`: the group tells which.
        let (group, _) = api_version.as_deref().map_or(("", ""), |v| v.rsplit_once('/').unwrap_or(("", v)));
        let named = || Kind::ALL.into_iter().filter(|k| k.name() == kind_name);
        let served = named().find(|k| k.group() == group).or_else(|| named().next());
        // Same kind name in another project's API group (Knative's `Service`): not ours.
        // In one of our groups, it is a mistake in the apiVersion.
        let (group, version) = match &api_version {
            Some(v) => v.rsplit_once('/').unwrap_or(("", v.as_str())),
            None => ("", ""),
        };
        let ours = Kind::ALL.iter().any(|k| k.group() == group);
        let served = served.filter(|k| api_version.is_none() || k.group() == group || ours);
        let scoped_ns = match served {
            Some(kind) if kind.namespaced() && namespace.is_empty() => "default".to_string(),
            Some(kind) if !kind.namespaced() => String::new(),
            _ => namespace.clone(),
        };
        let id = Id(&kind_name, &scoped_ns, &name).to_string();
        if kind_name == "ConfigMap"
            && api_version.as_deref() == Some("v1")
            && name == mesh::CONFIG_MAP_NAME
            && namespace == super::DEFAULT_ROOT_NAMESPACE
        {
            return self.mesh_config(map, &id, prefix);
        }
        let Some(api_version) = &api_version else {
            if served.is_some() {
                let why = if map.contains_key("apiVersion") { "must be a string" } else { "required field is missing" };
                return self.problem(Some(id), format!("{prefix}apiVersion"), why);
            }
            return self.ignore(&id, "no apiVersion", "kind not served by this mesh");
        };
        let Some(kind) = served else {
            // In Istio's and Gateway API's groups the kinds are known: another name is a
            // typo the API server would refuse (no such resource), not a kind to skip.
            if let Some((_, kinds)) = OTHER_KINDS.iter().find(|(g, _)| *g == group)
                && !kinds.contains(&kind_name.as_str())
            {
                let mut known: Vec<&str> = Kind::ALL
                    .iter()
                    .filter(|k| k.group() == group)
                    .map(|k| k.name())
                    .chain(kinds.iter().copied())
                    .collect();
                known.sort_unstable();
                known.dedup();
                let known = known.join(", ");
                return self.problem(
                    Some(id),
                    format!("{prefix}kind"),
                    format!("`{kind_name}` is not a kind of {group} (its kinds: {known})"),
                );
            }
            return self.ignore(&id, api_version, "kind not served by this mesh");
        };
        if kind.group() != group || !kind.versions().contains(&version) {
            let supported = kind.api_versions();
            return self.problem(
                Some(id),
                format!("{prefix}apiVersion"),
                format!("apiVersion `{api_version}` is not supported for {kind_name} (supported: {supported})"),
            );
        }
        // What decoding cannot see: a map present but empty.
        if kind == Kind::PeerAuthentication
            && map
                .get("spec")
                .and_then(|s| s.get("portLevelMtls"))
                .and_then(Value::as_mapping)
                .is_some_and(Mapping::is_empty)
        {
            self.problem(Some(id.clone()), format!("{prefix}spec.portLevelMtls"), "must not be empty when present");
        }
        // Decoded from the YAML value, whose scalars are typed as kubectl types them
        // (`123` is a number, `~` is null); serde_yaml decoding straight from the text
        // would take any plain scalar as a string where a string is expected.
        let mut document = Value::Mapping(map.clone());
        // Fields of the schema the mesh does not enforce yet: set aside, with a warning.
        // (The list's `Gateway` is Gateway API's, not Istio's of the same name.)
        for (not_kind, pattern) in super::NOT_ENFORCED {
            if *not_kind != kind.name() || kind == Kind::IstioGateway {
                continue;
            }
            let steps: Vec<&str> = pattern.split('.').flat_map(|s| s.split_inclusive("[]")).collect();
            let mut found = Vec::new();
            set_aside_all(&mut document, &steps, "", &mut found);
            for path in found {
                let warning = Problem::new(
                    &self.source.name,
                    Some(id.clone()),
                    format!("{prefix}{path}"),
                    "accepted but not enforced by this mesh yet: it has no effect",
                );
                self.loaded.warnings.push((self.seq, warning));
            }
        }
        if let Err(mut e) = self.decode_into(kind, &scoped_ns, document.clone()) {
            // The line, from the text, when the text fails at the same place.
            if let Err(in_text) = check(kind, deserializer)
                && in_text.field == e.field
            {
                e.line = in_text.line;
            }
            if kind == Kind::DestinationRule
                && let Some(host) = map.get("spec").and_then(|s| s.get("host")).and_then(Value::as_str)
            {
                self.loaded.broken_destination_rules.push((scoped_ns.clone(), host.to_string()));
            }
            // serde stops at the first error: find the others by setting aside what
            // failed and decoding again, so that one run reports them all.
            let more = more_decode_errors(kind, &document, &e);
            for e in std::iter::once(e).chain(more) {
                let field = if e.field.is_empty() { String::new() } else { format!("{prefix}{}", e.field) };
                let reason = match e.line {
                    Some(line) => format!("{} (line {line})", e.reason),
                    None => e.reason,
                };
                self.problem(Some(id.clone()), field, reason);
            }
        }
    }

    /// Istio's mesh config: the `ConfigMap` `istio` of the root namespace, its YAML in
    /// `data.mesh` (see [`mesh`]). Its `rootNamespace` and `trustDomain` become the
    /// config's.
    fn mesh_config(&mut self, map: &Mapping, id: &str, prefix: &str) {
        if let Some(first) = &self.loaded.mesh_source {
            let why = format!("a second mesh config (the first is in {first}); Istio reads one");
            return self.problem(Some(id.into()), format!("{prefix}metadata.name"), why);
        }
        self.loaded.mesh_source = Some(self.source.name.clone());
        let field = format!("{prefix}data.{}", mesh::CONFIG_MAP_KEY);
        let text = match map.get("data").and_then(|d| d.get(mesh::CONFIG_MAP_KEY)) {
            Some(Value::String(text)) => text.clone(),
            None | Some(Value::Null) => {
                let warning =
                    Problem::new(&self.source.name, Some(id.into()), field, "missing: Istio's defaults apply");
                return self.loaded.warnings.push((self.seq, warning));
            }
            Some(_) => return self.problem(Some(id.into()), field, "must be a string holding the MeshConfig YAML"),
        };
        let (mesh, read) = mesh::read(&text);
        let at = |f: &str| if f.is_empty() { field.clone() } else { format!("{field}.{f}") };
        for (f, reason) in &read.errors {
            self.problem(Some(id.into()), at(f), reason.clone());
        }
        for (f, reason) in read.warnings {
            let warning = Problem::new(&self.source.name, Some(id.into()), at(&f), reason);
            self.loaded.warnings.push((self.seq, warning));
        }
        if read.errors.is_empty() {
            let config = &mut self.loaded.config;
            if let Some(root) = &mesh.root_namespace {
                root.clone_into(&mut config.root_namespace);
            }
            if let Some(td) = &mesh.trust_domain {
                td.clone_into(&mut config.trust_domain);
            }
            config.mesh = mesh;
        }
    }

    fn ignore(&mut self, id: &str, api_version: &str, why: &str) {
        let file = &self.source.name;
        self.loaded.config.ignored.push(format!("{id} ({api_version}) in {file}: {why}"));
    }

    fn decode_into<'de, D>(&mut self, kind: Kind, namespace: &str, de: D) -> Result<(), DecodeError>
    where
        D: Deserializer<'de, Error = serde_yaml::Error>,
    {
        macro_rules! plain {
            ($spec:ty, $ty:ident, $list:ident) => {{
                let e: Envelope<$spec> = decode(de)?;
                let metadata = with_namespace(e.metadata, namespace);
                let key = ObjectKey::of(kind, &metadata);
                self.add(key, $ty { metadata, spec: e.spec }, |c| &mut c.$list);
            }};
        }
        match kind {
            Kind::Namespace => plain!(NamespaceSpec, Namespace, namespaces),
            Kind::Service => plain!(ServiceSpec, Service, services),
            Kind::EndpointSlice => {
                let slice: EndpointSlice = decode(de)?;
                let metadata = with_namespace(slice.metadata, namespace);
                let key = ObjectKey::of(kind, &metadata);
                self.add(key, EndpointSlice { metadata, ..slice }, |c| &mut c.endpoint_slices);
            }
            Kind::Pod => {
                let e: Envelope<PodSpec, PodStatus> = decode(de)?;
                let metadata = with_namespace(e.metadata, namespace);
                let key = ObjectKey::of(kind, &metadata);
                let pod = Pod { metadata, spec: e.spec, status: e.status.unwrap_or_default() };
                self.add(key, pod, |c| &mut c.pods);
            }
            Kind::WorkloadEntry => plain!(WorkloadEntrySpec, WorkloadEntry, workload_entries),
            Kind::AuthorizationPolicy => plain!(AuthorizationPolicySpec, AuthorizationPolicy, authorization_policies),
            Kind::PeerAuthentication => plain!(PeerAuthenticationSpec, PeerAuthentication, peer_authentications),
            Kind::RequestAuthentication => {
                plain!(RequestAuthenticationSpec, RequestAuthentication, request_authentications);
            }
            Kind::VirtualService => plain!(VirtualServiceSpec, VirtualService, virtual_services),
            Kind::DestinationRule => plain!(DestinationRuleSpec, DestinationRule, destination_rules),
            Kind::ServiceEntry => plain!(ServiceEntrySpec, ServiceEntry, service_entries),
            Kind::Telemetry => plain!(TelemetrySpec, Telemetry, telemetries),
            Kind::HttpRoute => plain!(HttpRouteSpec, HttpRoute, http_routes),
            Kind::GrpcRoute => plain!(GrpcRouteSpec, GrpcRoute, grpc_routes),
            Kind::Gateway => plain!(GatewaySpec, Gateway, gateways),
            Kind::GatewayClass => plain!(GatewayClassSpec, GatewayClass, gateway_classes),
            Kind::ReferenceGrant => plain!(ReferenceGrantSpec, ReferenceGrant, reference_grants),
            Kind::TcpRoute => plain!(L4RouteSpec, TcpRoute, tcp_routes),
            Kind::TlsRoute => plain!(L4RouteSpec, TlsRoute, tls_routes),
            Kind::IstioGateway => plain!(IstioGatewaySpec, IstioGateway, istio_gateways),
            Kind::EnvoyFilter => plain!(serde_json::Value, EnvoyFilter, envoy_filters),
        }
        Ok(())
    }

    /// Adds an object unless one of the same kind, namespace and name exists already.
    fn add<T>(&mut self, key: ObjectKey, object: T, list: impl FnOnce(&mut Config) -> &mut Vec<T>) {
        if let Some(first) = self.loaded.origins.get(&key) {
            let first = if first.file == self.source.name {
                "earlier in the same file".to_string()
            } else {
                format!("in {}", first.file)
            };
            let reason = format!("duplicate object: {key} is already defined {first}");
            return self.problem(Some(key.to_string()), "metadata.name", reason);
        }
        self.loaded.origins.insert(key, Origin { file: self.source.name.clone(), seq: self.seq });
        list(&mut self.loaded.config).push(object);
    }
}

fn with_namespace(mut metadata: ObjectMeta, namespace: &str) -> ObjectMeta {
    namespace.clone_into(&mut metadata.namespace);
    metadata
}

fn is_list(map: &Mapping) -> bool {
    map.get("kind").and_then(Value::as_str) == Some("List")
        && map.get("apiVersion").and_then(Value::as_str) == Some("v1")
}

/// Reads flow collections as kubectl (go-yaml) does. libyaml rejects a plain scalar in
/// a flow collection that holds a `:` right before `,`, `]` or `}` ("found unexpected
/// ':'", as in `addresses: [2001:db8::, 10.0.0.1]`); go-yaml takes the `:` as part of
/// the scalar, so the list is two strings. Each such scalar is quoted, which keeps
/// every line where it was for the messages; other text is returned as is (and is
/// not parsed here unless it holds `:,`, `:]` or `:}` somewhere).
fn kubectl_flow_scalars(text: &str) -> std::borrow::Cow<'_, str> {
    let mut text = std::borrow::Cow::Borrowed(text);
    if ![":,", ":]", ":}"].iter().any(|p| text.contains(p)) {
        return text;
    }
    // Each round quotes one scalar; a bound keeps a pathological input cheap.
    for _ in 0..64 {
        let error = serde_yaml::Deserializer::from_str(&text).find_map(|d| Value::deserialize(d).err());
        let Some(error) = error.filter(|e| e.to_string().contains("found unexpected ':'")) else { break };
        let Some(at) = error.location().map(|l| (l.line(), l.column())) else { break };
        match quote_flow_scalar(&text, at) {
            Some(quoted) => text = std::borrow::Cow::Owned(quoted),
            None => break,
        }
    }
    text
}

/// Quotes the plain scalar of a flow collection that holds the `:` at or before
/// (1-based) `line`, `column`, or `None` when there is none to quote.
fn quote_flow_scalar(text: &str, (line_no, column): (usize, usize)) -> Option<String> {
    let line_start = if line_no <= 1 { 0 } else { text.match_indices('\n').nth(line_no - 2).map(|(i, _)| i + 1)? };
    let line_end = text[line_start..].find('\n').map_or(text.len(), |i| line_start + i);
    let line = &text[line_start..line_end];
    // The column counts characters; the offending `:` is the last one up to it that a
    // flow indicator follows.
    let offset = line.char_indices().nth(column).map_or(line.len(), |(i, _)| i);
    let colon = line
        .char_indices()
        .filter(|(i, c)| *c == ':' && *i <= offset && line[i + 1..].starts_with([',', ']', '}']))
        .map(|(i, _)| i)
        .next_back()?;
    let start = line[..colon].rfind(['[', '{', ',']).map_or(0, |i| i + 1);
    let start = start + line[start..].len() - line[start..].trim_start().len();
    let end = line[colon + 1..].find([',', ']', '}']).map_or(line.len(), |i| colon + 1 + i);
    let scalar = line[start..end].trim_end();
    if scalar.is_empty() || scalar.starts_with(['\'', '"']) {
        return None;
    }
    let quoted = format!("'{}'", scalar.replace('\'', "''"));
    let mut out = String::with_capacity(text.len() + quoted.len());
    out.push_str(&text[..line_start + start]);
    out.push_str(&quoted);
    out.push_str(&text[line_start + start + scalar.len()..]);
    Some(out)
}

/// Removes every field at `steps` (`spec`, `subsets[]`, `trafficPolicy`, ...: a step
/// ending in `[]` is each item of a list, `*` each value of a map), recording the path
/// of each one removed.
fn set_aside_all(value: &mut Value, steps: &[&str], path: &str, found: &mut Vec<String>) {
    let Some((step, rest)) = steps.split_first() else { return };
    let Value::Mapping(map) = value else { return };
    let join = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    if *step == "*" {
        for (key, child) in map.iter_mut() {
            let key = key.as_str().unwrap_or("?");
            set_aside_all(child, rest, &format!("{path}[{key:?}]"), found);
        }
    } else if let Some(list) = step.strip_suffix("[]") {
        if let Some(Value::Sequence(items)) = map.get_mut(list) {
            for (i, item) in items.iter_mut().enumerate() {
                set_aside_all(item, rest, &format!("{}[{i}]", join(list)), found);
            }
        }
    } else if rest.is_empty() {
        if map.remove(*step).is_some() {
            found.push(join(step));
        }
    } else if let Some(child) = map.get_mut(*step) {
        set_aside_all(child, rest, &join(step), found);
    }
}
