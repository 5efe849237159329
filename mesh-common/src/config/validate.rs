//! The checks that run on decoded objects: each object on its own (values, ranges,
//! exclusive fields), then across objects (a route's subset must be defined by a
//! `DestinationRule` of its host). Duplicates and decoding errors are found earlier,
//! by the parser. Every check reports through [`Obj::err`], which names the file, the
//! object and the field.
use std::{prelude::rust_2024::*, str::FromStr};

use super::{
    Problem,
    meta::{Labels, ObjectMeta, Percent, PolicyTargetReference, WorkloadSelector},
    parse::{Found, Kind, Loaded},
    values::{self, IpNet},
};

mod gateway;
mod k8s;
mod networking;
mod security;

pub(crate) fn validate(loaded: &Loaded, problems: &mut Found, warnings: &mut Found) {
    let c = &loaded.config;
    let subsets = networking::SubsetIndex::new(loaded);
    macro_rules! each {
        ($list:ident, $kind:expr, $check:expr) => {
            for object in &c.$list {
                let mut o = Obj::new(loaded, $kind, &object.metadata, problems, warnings);
                o.metadata(&object.metadata, $kind);
                #[allow(clippy::redundant_closure_call)]
                ($check)(&mut o, object);
            }
        };
    }
    each!(namespaces, Kind::Namespace, k8s::namespace);
    each!(services, Kind::Service, k8s::service);
    each!(pods, Kind::Pod, k8s::pod);
    each!(workload_entries, Kind::WorkloadEntry, networking::workload_entry);
    each!(authorization_policies, Kind::AuthorizationPolicy, security::authorization_policy);
    each!(peer_authentications, Kind::PeerAuthentication, security::peer_authentication);
    each!(request_authentications, Kind::RequestAuthentication, security::request_authentication);
    each!(virtual_services, Kind::VirtualService, |o: &mut Obj, vs| networking::virtual_service(o, vs, &subsets));
    each!(destination_rules, Kind::DestinationRule, networking::destination_rule);
    each!(service_entries, Kind::ServiceEntry, networking::service_entry);
    each!(telemetries, Kind::Telemetry, security::telemetry);
    each!(http_routes, Kind::HttpRoute, gateway::http_route);
    each!(grpc_routes, Kind::GrpcRoute, gateway::grpc_route);
    each!(gateways, Kind::Gateway, gateway::gateway);
    each!(gateway_classes, Kind::GatewayClass, gateway::gateway_class);
    each!(reference_grants, Kind::ReferenceGrant, gateway::reference_grant);
    each!(tcp_routes, Kind::TcpRoute, |o: &mut Obj, r: &crate::config::TcpRoute| gateway::l4_route(o, &r.spec, false));
    each!(tls_routes, Kind::TlsRoute, |o: &mut Obj, r: &crate::config::TlsRoute| gateway::l4_route(o, &r.spec, true));
    each!(istio_gateways, Kind::IstioGateway, networking::istio_gateway);
    each!(envoy_filters, Kind::EnvoyFilter, |o: &mut Obj, f: &crate::config::EnvoyFilter| {
        if let Err(e) = f.local_rate_limit() {
            o.err(e.field(), e.reason());
        }
    });
    // A CUSTOM policy needs an ext_authz provider of the mesh config; Istio admits the
    // policy and denies the requests it matches: a warning, and the waypoint fails closed.
    let providers = c.mesh.ext_authz_providers();
    for policy in &c.authorization_policies {
        if let Some(provider) = &policy.spec.provider
            && policy.spec.action == crate::config::security::Action::Custom
            && !provider.name.is_empty()
            && !providers.contains(&provider.name.as_str())
        {
            let mut o = Obj::new(loaded, Kind::AuthorizationPolicy, &policy.metadata, problems, warnings);
            o.warn(
                "spec.provider.name",
                format!(
                    "`{}` is not an ext_authz provider of the mesh config's extensionProviders (ConfigMap {}/{} \
                     key {}): the requests this policy matches are denied",
                    provider.name,
                    super::DEFAULT_ROOT_NAMESPACE,
                    super::mesh::CONFIG_MAP_NAME,
                    super::mesh::CONFIG_MAP_KEY
                ),
            );
        }
    }
}

/// The object being checked and where its problems go.
pub(super) struct Obj<'a> {
    file: String,
    id: String,
    seq: usize,
    pub namespace: String,
    problems: &'a mut Found,
    warnings: &'a mut Found,
}

impl<'a> Obj<'a> {
    fn new(loaded: &Loaded, kind: Kind, meta: &ObjectMeta, problems: &'a mut Found, warnings: &'a mut Found) -> Self {
        let (file, id, seq) = loaded.origin(kind, meta);
        Self { file: file.to_string(), id, seq, namespace: meta.namespace.clone(), problems, warnings }
    }

    pub fn err(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.problems.push((self.seq, Problem::new(self.file.clone(), Some(self.id.clone()), field, reason)));
    }

    /// Something Istio accepts but `istioctl analyze` would point out: reported, not
    /// rejected.
    pub fn warn(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.warnings.push((self.seq, Problem::new(self.file.clone(), Some(self.id.clone()), field, reason)));
    }

    fn metadata(&mut self, meta: &ObjectMeta, kind: Kind) {
        let name = &meta.name;
        if name.is_empty() {
            self.err("metadata.name", "must not be empty");
        } else {
            let why = match kind {
                Kind::Namespace => (!values::is_dns_label(name)).then_some(
                    "is not a valid namespace name: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
                ),
                Kind::Service => (!values::is_dns_label(name) || !name.starts_with(|c: char| c.is_ascii_lowercase())).then_some(
                    "is not a valid Service name: at most 63 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit",
                ),
                _ => (!values::is_dns_subdomain(name)).then_some(
                    "is not a valid name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters",
                ),
            };
            if let Some(why) = why {
                self.err("metadata.name", format!("`{name}` {why}"));
            }
        }
        if !meta.namespace.is_empty() && !values::is_dns_label(&meta.namespace) {
            self.err("metadata.namespace", format!("`{}` is not a valid namespace name", meta.namespace));
        }
        self.labels("metadata.labels", &meta.labels);
        for key in meta.annotations.keys() {
            if let Some(why) = values::label_key_error(key) {
                self.err(format!("metadata.annotations[{key:?}]"), why.replace("label key", "annotation key"));
            }
        }
    }

    pub fn labels(&mut self, field: &str, labels: &Labels) {
        for (key, value) in labels {
            if let Some(why) = values::label_key_error(key).or_else(|| values::label_value_error(value)) {
                self.err(format!("{field}[{key:?}]"), why);
            }
        }
    }

    pub fn selector(&mut self, field: &str, selector: Option<&WorkloadSelector>) {
        if let Some(selector) = selector {
            self.labels(&format!("{field}.matchLabels"), &selector.match_labels);
        }
    }

    /// `selector`, `targetRef` and `targetRefs` choose the workloads a policy applies to
    /// in three exclusive ways.
    pub fn targets(
        &mut self,
        selector: Option<&WorkloadSelector>,
        target_ref: Option<&PolicyTargetReference>,
        target_refs: &[PolicyTargetReference],
    ) {
        self.selector("spec.selector", selector);
        if target_ref.is_some() && !target_refs.is_empty() {
            self.err("spec.targetRefs", "targetRef and targetRefs are mutually exclusive");
        }
        if selector.is_some() && (target_ref.is_some() || !target_refs.is_empty()) {
            self.err("spec.selector", "selector and targetRef(s) are mutually exclusive");
        }
        let all = target_ref
            .map(|t| ("spec.targetRef".to_string(), t))
            .into_iter()
            .chain(target_refs.iter().enumerate().map(|(i, t)| (format!("spec.targetRefs[{i}]"), t)));
        for (field, target) in all {
            if target.kind.is_empty() {
                self.err(format!("{field}.kind"), "must not be empty");
            }
            if target.name.is_empty() {
                self.err(format!("{field}.name"), "must not be empty");
            }
            if !target.namespace.is_empty() && target.namespace != self.namespace {
                self.err(format!("{field}.namespace"), "must be the policy's own namespace (or absent)");
            }
        }
    }

    pub fn duration(&mut self, field: &str, value: Option<&String>) {
        if let Some(value) = value
            && let Err(e) = values::parse_duration(value)
        {
            self.err(field, format!("invalid duration: {e}"));
        }
    }

    /// A duration Istio requires to be at least 1 ms (timeouts, delays).
    pub fn duration_ms(&mut self, field: &str, value: Option<&String>) {
        self.duration(field, value);
        if let Some(why) = value.and_then(|v| values::millis_duration_error(v)) {
            self.err(field, why);
        }
    }

    pub fn regex(&mut self, field: &str, pattern: &str) {
        if let Some(why) = values::regex_error(pattern) {
            self.err(field, why);
        }
    }

    pub fn port(&mut self, field: &str, port: u32) {
        if let Some(why) = values::port_error(port) {
            self.err(field, why);
        }
    }

    pub fn percent(&mut self, field: &str, percent: Option<&Percent>) {
        if let Some(p) = percent
            && !(0.0..=100.0).contains(&p.value)
        {
            self.err(format!("{field}.value"), format!("percentage {} is outside 0..=100", p.value));
        }
    }

    pub fn host(&mut self, field: &str, host: &str) {
        if let Some(why) = values::host_error(host) {
            self.err(field, why);
        }
    }

    pub fn ip_or_cidr(&mut self, field: &str, value: &str) {
        if let Err(e) = IpNet::from_str(value) {
            self.err(field, e.to_string());
        }
    }

    pub fn ip(&mut self, field: &str, value: &str) {
        if value.parse::<std::net::IpAddr>().is_err() {
            self.err(field, format!("`{value}` is not an IP address"));
        }
    }

    pub fn wildcard(&mut self, field: &str, value: &str) {
        if let Some(why) = values::wildcard_error(value) {
            self.err(field, why);
        }
    }

    /// Istio's `exportTo`: `.` (this namespace), `*` (all), `~` (none) or namespace names.
    pub fn export_to(&mut self, field: &str, export_to: &[String]) {
        for (i, to) in export_to.iter().enumerate() {
            if !matches!(to.as_str(), "." | "*" | "~") && !values::is_dns_label(to) {
                self.err(format!("{field}[{i}]"), format!("`{to}` is not `.`, `*`, `~` or a namespace name"));
            }
        }
        if export_to.len() > 1 && export_to.iter().any(|t| t == "*" || t == "~") {
            self.err(field, "`*` and `~` must be the only entry");
        }
    }
}
