//! The part of Istio's `MeshConfig` the mesh uses, read the way Istio users supply it:
//! the `ConfigMap` named `istio` in the root namespace, whose `data.mesh` key holds the
//! YAML (what `istioctl install --set meshConfig...` and the Helm chart write).
//!
//! Modelled: `rootNamespace`, `trustDomain` (both also set [`Config::root_namespace`]
//! and [`Config::trust_domain`](super::Config::trust_domain), so the two never
//! disagree), `pathNormalization`, `extensionProviders` (`ext_authz` over HTTP and gRPC,
//! OpenTelemetry, Prometheus, file access log, Zipkin), `defaultProviders`, and of
//! `defaultConfig` (Istio's `ProxyConfig`) only `gatewayTopology.numTrustedProxies`.
//! `MeshConfig` has many more fields: they are accepted with a warning that they have
//! no effect, never rejected. A value of the wrong type, or one outside its range, is
//! an error naming `data.mesh.<field>`.
//!
//! [`Config::root_namespace`]: super::Config::root_namespace
use std::{collections::BTreeMap, prelude::rust_2024::*, time::Duration};

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use super::values::{self, parse_duration};

/// Name of the `ConfigMap` holding the mesh config.
pub const CONFIG_MAP_NAME: &str = "istio";
/// Its key holding the YAML.
pub const CONFIG_MAP_KEY: &str = "mesh";
/// Istio's default timeout of an `ext_authz` check.
pub const DEFAULT_EXT_AUTHZ_TIMEOUT: Duration = Duration::from_mins(10);

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshConfig {
    /// As written; the effective value is [`super::Config::root_namespace`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_namespace: Option<String>,
    /// As written; the effective value is [`super::Config::trust_domain`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_normalization: Option<PathNormalizationSettings>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extension_providers: Vec<ExtensionProvider>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_providers: Option<DefaultProviders>,
    /// The mesh-wide proxy settings (a gateway's `proxy.istio.io/config` annotation
    /// overrides them for that gateway).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_config: Option<ProxyConfig>,
}

/// The annotation of a gateway (or its pods) that overrides `defaultConfig` for it.
pub const PROXY_CONFIG_ANNOTATION: &str = "proxy.istio.io/config";

/// The part of Istio's `ProxyConfig` the mesh uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_topology: Option<Topology>,
}

/// Istio's `Topology`: where a gateway sits behind other proxies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Topology {
    /// How many trusted proxies stand in front of the gateway: the client's address
    /// (`remote.ip`, `remoteIpBlocks`) is read from `X-Forwarded-For` past that many
    /// hops. 0 (Istio's default): the direct peer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_trusted_proxies: Option<u32>,
}

impl ProxyConfig {
    fn num_trusted_proxies(&self) -> Option<u32> {
        self.gateway_topology.as_ref().and_then(|t| t.num_trusted_proxies)
    }
}

/// Why a `proxy.istio.io/config` annotation could not be read.
#[derive(Debug, thiserror::Error)]
#[error("annotation {PROXY_CONFIG_ANNOTATION:?}: not a ProxyConfig")]
pub struct ProxyConfigError {
    #[source]
    pub source: serde_yaml::Error,
}

/// The `gatewayTopology.numTrustedProxies` of a `proxy.istio.io/config` annotation
/// value (YAML or JSON; other `ProxyConfig` fields are ignored); `None` when unset.
pub fn annotation_trusted_proxies(text: &str) -> Result<Option<u32>, ProxyConfigError> {
    let config: Option<ProxyConfig> = serde_yaml::from_str(text).map_err(|source| ProxyConfigError { source })?;
    Ok(config.and_then(|c| c.num_trusted_proxies()))
}

impl MeshConfig {
    /// Whether nothing was set (no mesh config, or an empty one).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The path normalization in force (Istio's default: `BASE`).
    pub fn path_normalization(&self) -> PathNormalization {
        self.path_normalization.as_ref().map_or(PathNormalization::Base, |p| p.normalization)
    }

    /// The names of the `ext_authz` providers (HTTP or gRPC), for `CUSTOM` policies.
    pub fn ext_authz_providers(&self) -> Vec<&str> {
        self.extension_providers.iter().filter(|p| p.ext_authz().is_some()).map(|p| p.name.as_str()).collect()
    }

    /// The provider named `name`.
    pub fn provider(&self, name: &str) -> Option<&ExtensionProvider> {
        self.extension_providers.iter().find(|p| p.name == name)
    }

    /// `defaultConfig.gatewayTopology.numTrustedProxies`: 0 when unset (Istio's default).
    pub fn num_trusted_proxies(&self) -> u32 {
        self.default_config.as_ref().and_then(ProxyConfig::num_trusted_proxies).unwrap_or(0)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PathNormalizationSettings {
    pub normalization: PathNormalization,
}

/// Istio's `ProxyPathNormalization.NormalizationType`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// Istio's `DEFAULT`, which means `BASE`; read as `BASE`.
    #[serde(alias = "DEFAULT")]
    #[default]
    Base,
    None,
    MergeSlashes,
    DecodeAndMergeSlashes,
}

/// One `extensionProviders` entry: a name and one provider kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExtensionProvider {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_http: Option<ExtAuthzHttp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opentelemetry: Option<OpenTelemetry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<Empty>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envoy_file_access_log: Option<FileAccessLog>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zipkin: Option<Zipkin>,
}

/// An `ext_authz` provider, whichever protocol it speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtAuthz<'a> {
    Http(&'a ExtAuthzHttp),
    Grpc(&'a ExtAuthzGrpc),
}

impl ExtensionProvider {
    pub fn ext_authz(&self) -> Option<ExtAuthz<'_>> {
        self.envoy_ext_authz_http
            .as_ref()
            .map(ExtAuthz::Http)
            .or(self.envoy_ext_authz_grpc.as_ref().map(ExtAuthz::Grpc))
    }
}

/// A provider kind without settings (`prometheus: {}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// Istio's `EnvoyExternalAuthorizationHttpProvider`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExtAuthzHttp {
    /// `[<namespace>/]<hostname>` of the authorizer's service.
    pub service: String,
    pub port: u32,
    /// An Istio duration; Istio's default 600s ([`ExtAuthzHttp::timeout`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Prepended to the request's path in the check request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Allow the request when the authorizer cannot be reached or fails.
    pub fail_open: bool,
    /// The status answered when the authorizer fails (and `failOpen` is false);
    /// Istio's default 403.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_on_error: Option<String>,
    /// Request headers sent in the check (patterns as Istio's string match), besides
    /// the ones Envoy always sends (`Host`, `Method`, `Path`, `Content-Length`,
    /// `Authorization`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub include_request_headers_in_check: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    /// Authorizer response headers copied onto the request when it allows.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers_to_upstream_on_allow: Vec<String>,
    /// Authorizer response headers copied onto the 403 when it denies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers_to_downstream_on_deny: Vec<String>,
    /// Authorizer response headers copied onto the response when it allows.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers_to_downstream_on_allow: Vec<String>,
    /// Accepted, not enforced (warned): the body is never sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_request_body_in_check: Option<serde_json::Value>,
}

impl ExtAuthzHttp {
    pub fn timeout(&self) -> Duration {
        effective_timeout(self.timeout.as_deref())
    }

    /// The status to answer when the authorizer fails closed.
    pub fn status_on_error(&self) -> u16 {
        effective_status(self.status_on_error.as_deref())
    }
}

/// Istio's `EnvoyExternalAuthorizationGrpcProvider`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExtAuthzGrpc {
    pub service: String,
    pub port: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    pub fail_open: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_on_error: Option<String>,
    /// Accepted, not enforced (warned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_request_body_in_check: Option<serde_json::Value>,
}

impl ExtAuthzGrpc {
    pub fn timeout(&self) -> Duration {
        effective_timeout(self.timeout.as_deref())
    }

    pub fn status_on_error(&self) -> u16 {
        effective_status(self.status_on_error.as_deref())
    }
}

fn effective_timeout(text: Option<&str>) -> Duration {
    text.and_then(|t| parse_duration(t).ok()).unwrap_or(DEFAULT_EXT_AUTHZ_TIMEOUT)
}

fn effective_status(text: Option<&str>) -> u16 {
    text.and_then(|s| s.parse().ok()).unwrap_or(403)
}

/// Istio's `OpenTelemetryTracingProvider`: gRPC unless `http` is set (HTTP/protobuf).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OpenTelemetry {
    pub service: String,
    pub port: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tag_length: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<OtelHttp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OtelHttp {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Istio's `HeaderValue` list (`name`, `value`), kept as written.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FileAccessLog {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// `text` or `labels`, kept as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Zipkin {
    pub service: String,
    pub port: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tag_length: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub enable_64bit_trace_id: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DefaultProviders {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tracing: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub access_logging: Vec<String>,
}

/// What reading `data.mesh` found: problems and warnings as (field path under
/// `data.mesh`, reason).
#[derive(Debug, Default)]
pub(crate) struct Read {
    pub(crate) errors: Vec<(String, String)>,
    pub(crate) warnings: Vec<(String, String)>,
}

/// Known fields, by path (`[]` for any list item); a field not listed under its
/// parent is warned about. Provider kinds Istio has and the mesh does not use are in
/// [`UNUSED_PROVIDER_KINDS`].
const KNOWN: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "rootNamespace",
            "trustDomain",
            "pathNormalization",
            "extensionProviders",
            "defaultProviders",
            "defaultConfig",
        ],
    ),
    ("defaultConfig", &["gatewayTopology"]),
    ("defaultConfig.gatewayTopology", &["numTrustedProxies"]),
    ("pathNormalization", &["normalization"]),
    (
        "extensionProviders[]",
        &[
            "name",
            "envoyExtAuthzHttp",
            "envoyExtAuthzGrpc",
            "opentelemetry",
            "prometheus",
            "envoyFileAccessLog",
            "zipkin",
        ],
    ),
    (
        "extensionProviders[].envoyExtAuthzHttp",
        &[
            "service",
            "port",
            "timeout",
            "pathPrefix",
            "failOpen",
            "statusOnError",
            "includeRequestHeadersInCheck",
            "includeAdditionalHeadersInCheck",
            "headersToUpstreamOnAllow",
            "headersToDownstreamOnDeny",
            "headersToDownstreamOnAllow",
            "includeRequestBodyInCheck",
        ],
    ),
    (
        "extensionProviders[].envoyExtAuthzGrpc",
        &["service", "port", "timeout", "failOpen", "statusOnError", "includeRequestBodyInCheck"],
    ),
    ("extensionProviders[].opentelemetry", &["service", "port", "maxTagLength", "http"]),
    ("extensionProviders[].opentelemetry.http", &["path", "timeout", "headers"]),
    ("extensionProviders[].prometheus", &[]),
    ("extensionProviders[].envoyFileAccessLog", &["path", "logFormat"]),
    ("extensionProviders[].zipkin", &["service", "port", "maxTagLength", "enable64bitTraceId", "path"]),
    ("defaultProviders", &["metrics", "tracing", "accessLogging"]),
];

/// Istio's other provider kinds: accepted, unused.
const UNUSED_PROVIDER_KINDS: &[&str] =
    &["envoyOtelAls", "envoyHttpAls", "envoyTcpAls", "stackdriver", "datadog", "lightstep", "skywalking", "sds"];

/// Reads the YAML text of `data.mesh`.
pub(crate) fn read(text: &str) -> (MeshConfig, Read) {
    let mut read = Read::default();
    let value: Value = match serde_yaml::from_str(text) {
        Ok(Value::Null) => return (MeshConfig::default(), read),
        Ok(value) => value,
        Err(e) => {
            read.errors.push((String::new(), format!("YAML syntax error: {e}")));
            return (MeshConfig::default(), read);
        }
    };
    let Value::Mapping(map) = &value else {
        read.errors.push((String::new(), "must be a YAML mapping (MeshConfig)".into()));
        return (MeshConfig::default(), read);
    };
    unknown_fields(map, "", "", &mut read.warnings);
    let mesh: MeshConfig = match serde_path_to_error::deserialize(value.clone()) {
        Ok(mesh) => mesh,
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            read.errors.push((path, e.into_inner().to_string()));
            return (MeshConfig::default(), read);
        }
    };
    validate(&mesh, &mut read);
    (mesh, read)
}

/// [`read`], for tests elsewhere in the crate: the config and whether it had errors.
#[cfg(test)]
pub(crate) fn read_for_tests(text: &str) -> (MeshConfig, bool) {
    let (mesh, found) = read(text);
    (mesh, !found.errors.is_empty())
}

/// Warns about every field [`KNOWN`] does not list. `pattern` is the path with `[]`
/// for list items, `path` the same with indexes.
fn unknown_fields(map: &Mapping, pattern: &str, path: &str, warnings: &mut Vec<(String, String)>) {
    let Some((_, known)) = KNOWN.iter().find(|(p, _)| *p == pattern) else { return };
    for (key, value) in map {
        let Some(key) = key.as_str() else { continue };
        let field = if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
        let child = if pattern.is_empty() { key.to_string() } else { format!("{pattern}.{key}") };
        if !known.contains(&key) {
            let why = if pattern == "extensionProviders[]" && UNUSED_PROVIDER_KINDS.contains(&key) {
                "provider kind not used by this mesh: the provider is accepted and ignored"
            } else {
                "not used by this mesh: accepted and ignored"
            };
            warnings.push((field, why.into()));
            continue;
        }
        match value {
            Value::Mapping(m) => unknown_fields(m, &child, &field, warnings),
            Value::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Mapping(m) = item {
                        unknown_fields(m, &format!("{child}[]"), &format!("{field}[{i}]"), warnings);
                    }
                }
            }
            _ => {}
        }
    }
}

fn validate(mesh: &MeshConfig, read: &mut Read) {
    let mut err = |field: String, reason: String| read.errors.push((field, reason));
    for (name, value) in [("rootNamespace", &mesh.root_namespace), ("trustDomain", &mesh.trust_domain)] {
        match value.as_deref() {
            Some(v) if name == "rootNamespace" && !values::is_dns_label(v) => {
                err(name.into(), format!("`{v}` is not a namespace name (a DNS label)"));
            }
            Some(v) if name == "trustDomain" && !values::is_dns_subdomain(v) => {
                err(name.into(), format!("`{v}` is not a trust domain (a DNS name)"));
            }
            _ => {}
        }
    }
    let mut names: Vec<&str> = Vec::new();
    for (i, p) in mesh.extension_providers.iter().enumerate() {
        let field = format!("extensionProviders[{i}]");
        if p.name.is_empty() {
            err(format!("{field}.name"), "must not be empty".into());
        } else if names.contains(&p.name.as_str()) {
            err(format!("{field}.name"), format!("duplicate provider name `{}`", p.name));
        }
        names.push(&p.name);
        let kinds = [
            p.envoy_ext_authz_http.is_some(),
            p.envoy_ext_authz_grpc.is_some(),
            p.opentelemetry.is_some(),
            p.prometheus.is_some(),
            p.envoy_file_access_log.is_some(),
            p.zipkin.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            err(field.clone(), "exactly one provider kind may be set".into());
        }
        if let Some(h) = &p.envoy_ext_authz_http {
            let f = format!("{field}.envoyExtAuthzHttp");
            service_port(&f, &h.service, h.port, &mut err);
            timeout(&f, h.timeout.as_deref(), &mut err);
            status(&f, h.status_on_error.as_deref(), &mut err);
            if let Some(prefix) = h.path_prefix.as_deref().filter(|p| !p.starts_with('/')) {
                err(format!("{f}.pathPrefix"), format!("`{prefix}` must start with `/`"));
            }
            for (name, list) in [
                ("includeRequestHeadersInCheck", &h.include_request_headers_in_check),
                ("headersToUpstreamOnAllow", &h.headers_to_upstream_on_allow),
                ("headersToDownstreamOnDeny", &h.headers_to_downstream_on_deny),
                ("headersToDownstreamOnAllow", &h.headers_to_downstream_on_allow),
            ] {
                for (j, header) in list.iter().enumerate() {
                    if header.is_empty() {
                        err(format!("{f}.{name}[{j}]"), "must not be empty".into());
                    }
                }
            }
            for name in h.include_additional_headers_in_check.keys() {
                if !is_header_name(name) {
                    err(format!("{f}.includeAdditionalHeadersInCheck"), format!("`{name}` is not a header name"));
                }
            }
        }
        if let Some(g) = &p.envoy_ext_authz_grpc {
            let f = format!("{field}.envoyExtAuthzGrpc");
            service_port(&f, &g.service, g.port, &mut err);
            timeout(&f, g.timeout.as_deref(), &mut err);
            status(&f, g.status_on_error.as_deref(), &mut err);
        }
        if let Some(o) = &p.opentelemetry {
            let f = format!("{field}.opentelemetry");
            service_port(&f, &o.service, o.port, &mut err);
            if let Some(http) = &o.http {
                timeout(&format!("{f}.http"), http.timeout.as_deref(), &mut err);
            }
        }
        if let Some(z) = &p.zipkin {
            service_port(&format!("{field}.zipkin"), &z.service, z.port, &mut err);
        }
    }
    let include_body = mesh.extension_providers.iter().enumerate().filter_map(|(i, p)| {
        let (kind, body) = match (&p.envoy_ext_authz_http, &p.envoy_ext_authz_grpc) {
            (Some(h), _) => ("envoyExtAuthzHttp", &h.include_request_body_in_check),
            (None, Some(g)) => ("envoyExtAuthzGrpc", &g.include_request_body_in_check),
            (None, None) => return None,
        };
        body.is_some().then(|| format!("extensionProviders[{i}].{kind}.includeRequestBodyInCheck"))
    });
    let mut warnings: Vec<(String, String)> = include_body
        .map(|f| (f, "accepted but not enforced by this mesh yet: the body is not sent to the authorizer".into()))
        .collect();
    if let Some(d) = &mesh.default_providers {
        for (name, list) in [("metrics", &d.metrics), ("tracing", &d.tracing), ("accessLogging", &d.access_logging)] {
            for (i, provider) in list.iter().enumerate() {
                if !names.contains(&provider.as_str()) && !matches!(provider.as_str(), "prometheus" | "envoy") {
                    warnings.push((
                        format!("defaultProviders.{name}[{i}]"),
                        format!("`{provider}` is not a declared extension provider"),
                    ));
                }
            }
        }
    }
    read.warnings.extend(warnings);
}

fn service_port(field: &str, service: &str, port: u32, err: &mut impl FnMut(String, String)) {
    let host = service.split_once('/').map_or(service, |(_, host)| host);
    if service.is_empty() {
        err(format!("{field}.service"), "required field is missing".into());
    } else if let Some(why) = values::host_error(host) {
        err(format!("{field}.service"), format!("`{service}` is not `[<namespace>/]<hostname>`: {why}"));
    }
    if port == 0 || port > 65535 {
        err(format!("{field}.port"), format!("{port} is not a port number (1-65535)"));
    }
}

fn timeout(field: &str, text: Option<&str>, err: &mut impl FnMut(String, String)) {
    if let Some(text) = text
        && let Err(e) = parse_duration(text)
    {
        err(format!("{field}.timeout"), e.to_string());
    }
}

fn status(field: &str, text: Option<&str>, err: &mut impl FnMut(String, String)) {
    if let Some(text) = text
        && !text.parse::<u16>().is_ok_and(|s| (100..=599).contains(&s))
    {
        err(format!("{field}.statusOnError"), format!("`{text}` is not an HTTP status code (100-599)"));
    }
}

/// An HTTP header name (RFC 9110 token).
fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use std::{
        string::{String, ToString},
        vec::Vec,
    };

    use super::{PathNormalization, read};

    fn fields(list: &[(String, String)]) -> Vec<&str> {
        list.iter().map(|(f, _)| f.as_str()).collect()
    }

    #[test]
    fn reads_providers_and_normalization() {
        let (mesh, found) = read(
            "pathNormalization: {normalization: MERGE_SLASHES}
accessLogFile: /dev/stdout
extensionProviders:
- name: opa
  envoyExtAuthzGrpc: {service: opa.opa.svc.cluster.local, port: 9191, timeout: 2s, failOpen: true}
- name: oauth
  envoyExtAuthzHttp:
    service: oauth2-proxy/oauth2-proxy.oauth2-proxy.svc.cluster.local
    port: 4180
    includeRequestHeadersInCheck: [authorization, cookie]
    headersToUpstreamOnAllow: [x-auth-request-user]
    headersToDownstreamOnDeny: [set-cookie, content-type]
    includeRequestBodyInCheck: {maxRequestBytes: 1024}
    statusOnError: '503'
- name: otel
  opentelemetry: {service: otel.observability.svc.cluster.local, port: 4318, http: {path: /v1/traces, timeout: 5s}}
- name: sky
  skywalking: {service: sky.svc, port: 11800}
",
        );
        assert!(found.errors.is_empty(), "{:?}", found.errors);
        assert_eq!(
            fields(&found.warnings),
            [
                "accessLogFile",
                "extensionProviders[3].skywalking",
                "extensionProviders[1].envoyExtAuthzHttp.includeRequestBodyInCheck"
            ]
        );
        assert_eq!(mesh.path_normalization(), PathNormalization::MergeSlashes);
        assert_eq!(mesh.ext_authz_providers(), ["opa", "oauth"]);
        let Some(super::ExtAuthz::Http(http)) = mesh.provider("oauth").and_then(super::ExtensionProvider::ext_authz)
        else {
            panic!("oauth is not HTTP ext_authz")
        };
        assert_eq!((http.timeout().as_secs(), http.status_on_error()), (600, 503));
        assert!(mesh.provider("opa").and_then(|p| p.envoy_ext_authz_grpc.as_ref()).is_some_and(|g| g.fail_open));
    }

    #[test]
    fn trusted_proxies_from_default_config_and_annotations() {
        let (mesh, found) = read(
            "defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
  gatewayTopology: {numTrustedProxies: 2, forwardClientCertDetails: SANITIZE}
",
        );
        assert!(found.errors.is_empty(), "{:?}", found.errors);
        assert_eq!(
            fields(&found.warnings),
            ["defaultConfig.discoveryAddress", "defaultConfig.gatewayTopology.forwardClientCertDetails"]
        );
        assert_eq!(mesh.num_trusted_proxies(), 2);
        assert_eq!(read("").0.num_trusted_proxies(), 0);
        assert_eq!(read("defaultConfig: {}").0.num_trusted_proxies(), 0);
        let (_, found) = read("defaultConfig: {gatewayTopology: {numTrustedProxies: -1}}");
        assert_eq!(fields(&found.errors), ["defaultConfig.gatewayTopology.numTrustedProxies"]);

        // The annotation as Istio's docs write it (JSON), or as YAML.
        let json = r#"{"gatewayTopology" : { "numTrustedProxies": 1, "forwardClientCertDetails": "SANITIZE" } }"#;
        assert_eq!(super::annotation_trusted_proxies(json).unwrap(), Some(1));
        assert_eq!(super::annotation_trusted_proxies("gatewayTopology:\n  numTrustedProxies: 3\n").unwrap(), Some(3));
        assert_eq!(super::annotation_trusted_proxies("holdApplicationUntilProxyStarts: true").unwrap(), None);
        assert_eq!(super::annotation_trusted_proxies("").unwrap(), None);
        for bad in [r#"{"gatewayTopology": {"numTrustedProxies": "two"}}"#, "[1, 2]", "{"] {
            let error = super::annotation_trusted_proxies(bad).unwrap_err();
            assert!(error.to_string().contains("proxy.istio.io/config"), "{bad}: {error}");
        }
    }

    #[test]
    fn default_is_base() {
        let (mesh, found) = read("");
        assert!(found.errors.is_empty() && found.warnings.is_empty());
        assert_eq!(mesh.path_normalization(), PathNormalization::Base);
        let (mesh, _) = read("pathNormalization: {normalization: DEFAULT}");
        assert_eq!(mesh.path_normalization(), PathNormalization::Base);
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("pathNormalization: {normalization: FANCY}", "pathNormalization.normalization"),
            (
                "extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: x.svc, port: 0}}]",
                "extensionProviders[0].envoyExtAuthzGrpc.port",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzGrpc: {service: x.svc, port: 1, timeout: 3}}]",
                "extensionProviders[0].envoyExtAuthzGrpc.timeout",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzHttp: {port: 80}}]",
                "extensionProviders[0].envoyExtAuthzHttp.service",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzHttp: {service: a.b, port: 80, pathPrefix: x}}]",
                "extensionProviders[0].envoyExtAuthzHttp.pathPrefix",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzHttp: {service: a.b, port: 80, statusOnError: '700'}}]",
                "extensionProviders[0].envoyExtAuthzHttp.statusOnError",
            ),
            (
                "extensionProviders: [{name: a, prometheus: {}}, {name: a, prometheus: {}}]",
                "extensionProviders[1].name",
            ),
            (
                "extensionProviders: [{name: a, envoyExtAuthzHttp: {service: a.b, port: eighty}}]",
                "extensionProviders[0].envoyExtAuthzHttp.port",
            ),
            ("rootNamespace: Istio_System", "rootNamespace"),
            ("- a list", ""),
        ];
        for (text, field) in cases {
            let (_, found) = read(text);
            assert_eq!(fields(&found.errors), [field], "{text}: {:?}", found.errors);
        }
    }
}
