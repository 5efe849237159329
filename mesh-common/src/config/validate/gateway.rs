//! Checks of the Gateway API route kinds (what their CRDs' schemas and CEL rules
//! enforce, for the parts the mesh uses).
use std::prelude::rust_2024::*;

use super::Obj;
use crate::config::{
    gateway::{
        BackendRef, Gateway, GatewayClass, GrpcRoute, HttpRoute, L4RouteSpec, NameMatch, ParentReference,
        ReferenceGrant, RouteFilter, WAYPOINT_PORT,
    },
    values,
};

const HTTP_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
const HTTP_FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "RequestRedirect",
    "URLRewrite",
    "CORS",
    "ExternalAuth",
    "ExtensionRef",
];
const GRPC_FILTERS: &[&str] = &["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "ExtensionRef"];
/// Gateway API's upper bound of a backend weight.
const MAX_WEIGHT: i64 = 1_000_000;

pub(super) fn http_route(o: &mut Obj, route: &HttpRoute) {
    let spec = &route.spec;
    parents(o, &spec.parent_refs);
    hostnames(o, &spec.hostnames);
    for (i, rule) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let field = format!("{field}.matches[{j}]");
            if let Some(path) = &m.path {
                let type_ = path.type_.as_deref().unwrap_or("PathPrefix");
                let value = path.value.as_deref().unwrap_or("/");
                match type_ {
                    "Exact" | "PathPrefix" => path_value(o, &format!("{field}.path.value"), value),
                    "RegularExpression" => {
                        if value.is_empty() {
                            o.err(format!("{field}.path.value"), "must not be empty");
                        } else {
                            o.regex(&format!("{field}.path.value"), value);
                        }
                    }
                    _ => o.err(
                        format!("{field}.path.type"),
                        format!("`{type_}` is not Exact, PathPrefix or RegularExpression"),
                    ),
                }
            }
            name_matches(o, &format!("{field}.headers"), &m.headers);
            name_matches(o, &format!("{field}.queryParams"), &m.query_params);
            if let Some(method) = &m.method
                && !HTTP_METHODS.contains(&method.as_str())
            {
                o.err(format!("{field}.method"), format!("`{method}` is not one of {}", HTTP_METHODS.join(", ")));
            }
        }
        for (j, m) in rule.matches.iter().enumerate() {
            if rule.matches[..j].contains(m) {
                o.err(format!("{field}.matches[{j}]"), "duplicate of an earlier match of this rule");
            }
        }
        filters(o, &format!("{field}.filters"), &rule.filters, HTTP_FILTERS);
        if !rule.backend_refs.is_empty() && rule.filters.iter().any(|f| f.type_ == "RequestRedirect") {
            o.err(format!("{field}.filters"), "a RequestRedirect filter must not be used together with backendRefs");
        }
        backends(o, &format!("{field}.backendRefs"), &rule.backend_refs, HTTP_FILTERS);
        if let Some(timeouts) = &rule.timeouts {
            let request = duration(o, &format!("{field}.timeouts.request"), timeouts.request.as_ref());
            let backend = duration(o, &format!("{field}.timeouts.backendRequest"), timeouts.backend_request.as_ref());
            if let (Some(request), Some(backend)) = (request, backend)
                && !request.is_zero()
                && backend > request
            {
                o.err(format!("{field}.timeouts.backendRequest"), "must not be longer than timeouts.request");
            }
        }
    }
}

pub(super) fn grpc_route(o: &mut Obj, route: &GrpcRoute) {
    let spec = &route.spec;
    parents(o, &spec.parent_refs);
    hostnames(o, &spec.hostnames);
    for (i, rule) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let field = format!("{field}.matches[{j}]");
            if let Some(method) = &m.method {
                let type_ = method.type_.as_deref().unwrap_or("Exact");
                if !matches!(type_, "Exact" | "RegularExpression") {
                    o.err(format!("{field}.method.type"), format!("`{type_}` is not Exact or RegularExpression"));
                }
                let empty = |s: &Option<String>| s.as_deref().is_none_or(str::is_empty);
                if empty(&method.service) && empty(&method.method) {
                    o.err(format!("{field}.method"), "at least one of service and method must be set");
                }
                if type_ == "RegularExpression" {
                    for (name, value) in [("service", &method.service), ("method", &method.method)] {
                        if let Some(value) = value {
                            o.regex(&format!("{field}.method.{name}"), value);
                        }
                    }
                }
            }
            name_matches(o, &format!("{field}.headers"), &m.headers);
        }
        filters(o, &format!("{field}.filters"), &rule.filters, GRPC_FILTERS);
        backends(o, &format!("{field}.backendRefs"), &rule.backend_refs, GRPC_FILTERS);
    }
}

/// Listener protocols of Gateway API's core and of Istio's waypoints.
const LISTENER_PROTOCOLS: &[&str] = &["HTTP", "HTTPS", "TLS", "TCP", "UDP", "HBONE"];
const WAYPOINT_FOR: &[&str] = &["service", "workload", "all", "none"];

pub(super) fn gateway(o: &mut Obj, gateway: &Gateway) {
    let spec = &gateway.spec;
    if spec.gateway_class_name.is_empty() {
        o.err("spec.gatewayClassName", "must not be empty");
    }
    if spec.listeners.is_empty() {
        o.err("spec.listeners", "must list at least one listener");
    }
    let mut names = Vec::new();
    for (i, listener) in spec.listeners.iter().enumerate() {
        let field = format!("spec.listeners[{i}]");
        if listener.name.is_empty() {
            o.err(format!("{field}.name"), "must not be empty");
        } else if names.contains(&listener.name.as_str()) {
            o.err(format!("{field}.name"), format!("`{}` names two listeners", listener.name));
        } else {
            names.push(listener.name.as_str());
        }
        o.port(&format!("{field}.port"), listener.port);
        if !LISTENER_PROTOCOLS.contains(&listener.protocol.as_str()) && !listener.protocol.contains('/') {
            o.err(
                format!("{field}.protocol"),
                format!(
                    "`{}` is not one of {} (or a domain-prefixed protocol)",
                    listener.protocol,
                    LISTENER_PROTOCOLS.join(", ")
                ),
            );
        }
        if let Some(host) = &listener.hostname {
            o.host(&format!("{field}.hostname"), host);
        }
    }
    if gateway.is_waypoint() {
        let for_ = gateway.waypoint_for();
        if !WAYPOINT_FOR.contains(&for_) {
            o.err(
                "metadata.labels[\"istio.io/waypoint-for\"]",
                format!("`{for_}` is not one of {}", WAYPOINT_FOR.join(", ")),
            );
        }
        if !spec.listeners.iter().any(|l| l.protocol == "HBONE" && l.port == u32::from(WAYPOINT_PORT)) {
            o.err(
                "spec.listeners",
                format!("a waypoint (gatewayClassName istio-waypoint) needs an HBONE listener on port {WAYPOINT_PORT}"),
            );
        }
    }
}

fn duration(o: &mut Obj, field: &str, value: Option<&String>) -> Option<std::time::Duration> {
    o.duration(field, value);
    value.and_then(|v| values::parse_duration(v).ok())
}

fn parents(o: &mut Obj, parents: &[ParentReference]) {
    for (i, parent) in parents.iter().enumerate() {
        let field = format!("spec.parentRefs[{i}]");
        if parent.name.is_empty() {
            o.err(format!("{field}.name"), "must not be empty");
        }
        if let Some(port) = parent.port {
            o.port(&format!("{field}.port"), port);
        }
    }
}

fn hostnames(o: &mut Obj, hostnames: &[String]) {
    for (i, host) in hostnames.iter().enumerate() {
        let field = format!("spec.hostnames[{i}]");
        if host == "*" {
            o.err(field, "`*` alone is not a hostname (use `*.example.com`)");
        } else if host.parse::<std::net::IpAddr>().is_ok() {
            o.err(field, format!("`{host}` is an IP address, not a hostname"));
        } else {
            o.host(&field, host);
        }
    }
}

fn name_matches(o: &mut Obj, field: &str, matches: &[NameMatch]) {
    for (k, m) in matches.iter().enumerate() {
        let type_ = m.type_.as_deref().unwrap_or("Exact");
        if !matches!(type_, "Exact" | "RegularExpression") {
            o.err(format!("{field}[{k}].type"), format!("`{type_}` is not Exact or RegularExpression"));
        }
        if m.name.is_empty() {
            o.err(format!("{field}[{k}].name"), "must not be empty");
        }
        if type_ == "RegularExpression" {
            o.regex(&format!("{field}[{k}].value"), &m.value);
        }
    }
}

/// An `Exact` or `PathPrefix` path: the Gateway API CRD's pattern and CEL rules.
fn path_value(o: &mut Obj, field: &str, value: &str) {
    if !value.starts_with('/') {
        return o.err(field, format!("`{value}` must start with `/`"));
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(bad) {
            o.err(field, format!("`{value}` must not contain `{bad}`"));
        }
    }
    for bad in ["/..", "/."] {
        if value.ends_with(bad) {
            o.err(field, format!("`{value}` must not end with `{bad}`"));
        }
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            if !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
            {
                return o.err(field, format!("`{value}`: `%` must start a percent-encoded byte (%XX)"));
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&b)) {
            let c = value[i..].chars().next().unwrap_or('?');
            return o.err(field, format!("`{value}`: `{c}` is not allowed in a path (percent-encode it)"));
        }
        i += 1;
    }
}

/// Names of the headers a header modifier filter touches, and where each is named.
fn header_modifier(o: &mut Obj, field: &str, modifier: &serde_json::Value) {
    use serde_json::Value;
    let mut seen: Vec<String> = Vec::new();
    for op in ["set", "add"] {
        for (k, header) in modifier.get(op).and_then(Value::as_array).into_iter().flatten().enumerate() {
            let field = format!("{field}.{op}[{k}]");
            let name = header.get("name").and_then(Value::as_str).unwrap_or("");
            let value = header.get("value").and_then(Value::as_str).unwrap_or("");
            if name.is_empty() {
                o.err(format!("{field}.name"), "must not be empty");
            }
            if value.contains(['\r', '\n']) {
                o.err(format!("{field}.value"), "must not contain CR or LF");
            }
            let lower = name.to_ascii_lowercase();
            if seen.contains(&lower) {
                o.err(format!("{field}.name"), format!("header `{name}` is modified twice by this filter"));
            }
            seen.push(lower);
        }
    }
    for (k, name) in modifier.get("remove").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let name = name.as_str().unwrap_or("");
        let lower = name.to_ascii_lowercase();
        if seen.contains(&lower) {
            o.err(format!("{field}.remove[{k}]"), format!("header `{name}` is modified twice by this filter"));
        }
        seen.push(lower);
    }
}

fn filters(o: &mut Obj, field: &str, filters: &[RouteFilter], allowed: &[&str]) {
    for (k, f) in filters.iter().enumerate() {
        let field = format!("{field}[{k}]");
        if !allowed.contains(&f.type_.as_str()) {
            o.err(format!("{field}.type"), format!("`{}` is not one of {}", f.type_, allowed.join(", ")));
            continue;
        }
        let (block, present) = match f.type_.as_str() {
            "RequestHeaderModifier" => ("requestHeaderModifier", f.request_header_modifier.is_some()),
            "ResponseHeaderModifier" => ("responseHeaderModifier", f.response_header_modifier.is_some()),
            "RequestMirror" => ("requestMirror", f.request_mirror.is_some()),
            "RequestRedirect" => ("requestRedirect", f.request_redirect.is_some()),
            "URLRewrite" => ("urlRewrite", f.url_rewrite.is_some()),
            "CORS" => ("cors", f.cors.is_some()),
            "ExternalAuth" => ("externalAuth", f.external_auth.is_some()),
            _ => ("extensionRef", f.extension_ref.is_some()),
        };
        if !present {
            o.err(format!("{field}.{block}"), format!("required by filter type {}", f.type_));
        }
        // Each of these acts once per request: the CRD's CEL rules forbid repeating them.
        let once = ["RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite", "CORS"];
        if once.contains(&f.type_.as_str()) && filters[..k].iter().any(|g| g.type_ == f.type_) {
            o.err(format!("{field}.type"), format!("{} filter cannot be repeated", f.type_));
        }
        let modifier = match f.type_.as_str() {
            "RequestHeaderModifier" => f.request_header_modifier.as_ref(),
            "ResponseHeaderModifier" => f.response_header_modifier.as_ref(),
            _ => None,
        };
        if let Some(modifier) = modifier {
            header_modifier(o, &format!("{field}.{block}"), modifier);
        }
    }
}

fn backends(o: &mut Obj, field: &str, backends: &[BackendRef], allowed_filters: &[&str]) {
    for (k, b) in backends.iter().enumerate() {
        let field = format!("{field}[{k}]");
        if b.name.is_empty() {
            o.err(format!("{field}.name"), "must not be empty");
        }
        if b.weight < 0 {
            o.err(format!("{field}.weight"), format!("weight {} is negative", b.weight));
        } else if b.weight > MAX_WEIGHT {
            o.err(format!("{field}.weight"), format!("weight {} is above {MAX_WEIGHT}", b.weight));
        }
        if let Some(group) = b.group.as_deref()
            && !group.is_empty()
            && !values::is_dns_subdomain(group)
        {
            o.err(
                format!("{field}.group"),
                format!("`{group}` is not an API group (a DNS subdomain, or empty for core)"),
            );
        }
        if let Some(kind) = b.kind.as_deref()
            && !is_kind(kind)
        {
            o.err(
                format!("{field}.kind"),
                format!("`{kind}` is not a kind name (a letter, then letters, digits, '-')"),
            );
        }
        let service = b.kind.as_deref().is_none_or(|k| k == "Service") && b.group.as_deref().is_none_or(str::is_empty);
        match b.port {
            Some(port) => o.port(&format!("{field}.port"), port),
            None if service => o.err(format!("{field}.port"), "required when the backend is a Service"),
            None => {}
        }
        filters(o, &format!("{field}.filters"), &b.filters, allowed_filters);
    }
}

/// Gateway API's `Kind`: `^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$`, at most 63 characters.
pub(super) fn is_kind(kind: &str) -> bool {
    kind.len() <= 63
        && kind.starts_with(|c: char| c.is_ascii_alphabetic())
        && !kind.ends_with('-')
        && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `controllerName`: a domain-prefixed path (`istio.io/gateway-controller`).
pub(super) fn gateway_class(o: &mut Obj, class: &GatewayClass) {
    let name = &class.spec.controller_name;
    let valid = name.split_once('/').is_some_and(|(domain, path)| {
        values::is_dns_subdomain(domain)
            && !path.is_empty()
            && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-._~%!$&'()*+,;=:".contains(&b))
    });
    if !valid {
        o.err(
            "spec.controllerName",
            format!("`{name}` is not a domain-prefixed path such as `istio.io/gateway-controller`"),
        );
    }
    if let Some(params) = &class.spec.parameters_ref {
        if !is_kind(&params.kind) {
            o.err("spec.parametersRef.kind", format!("`{}` is not a kind name", params.kind));
        }
        if params.name.is_empty() {
            o.err("spec.parametersRef.name", "must not be empty");
        }
    }
}

/// `from` and `to`: 1 to 16 entries each, with kind names and namespaces.
pub(super) fn reference_grant(o: &mut Obj, grant: &ReferenceGrant) {
    let spec = &grant.spec;
    for (name, len) in [("from", spec.from.len()), ("to", spec.to.len())] {
        if !(1..=16).contains(&len) {
            o.err(format!("spec.{name}"), format!("needs 1 to 16 entries, has {len}"));
        }
    }
    for (i, from) in spec.from.iter().enumerate() {
        if !is_kind(&from.kind) {
            o.err(format!("spec.from[{i}].kind"), format!("`{}` is not a kind name", from.kind));
        }
        if !values::is_dns_label(&from.namespace) {
            o.err(format!("spec.from[{i}].namespace"), format!("`{}` is not a namespace name", from.namespace));
        }
        group(o, &format!("spec.from[{i}].group"), &from.group);
    }
    for (i, to) in spec.to.iter().enumerate() {
        if !is_kind(&to.kind) {
            o.err(format!("spec.to[{i}].kind"), format!("`{}` is not a kind name", to.kind));
        }
        group(o, &format!("spec.to[{i}].group"), &to.group);
    }
}

fn group(o: &mut Obj, field: &str, group: &str) {
    if !group.is_empty() && !values::is_dns_subdomain(group) {
        o.err(field, format!("`{group}` is not an API group (a DNS subdomain, or empty for core)"));
    }
}

/// `TCPRoute` and `TLSRoute` (`tls`): rules of backends; a `TLSRoute` matches SNI
/// hostnames and has one rule.
pub(super) fn l4_route(o: &mut Obj, spec: &L4RouteSpec, tls: bool) {
    parents(o, &spec.parent_refs);
    if tls {
        if spec.hostnames.is_empty() {
            o.err("spec.hostnames", "a TLSRoute needs at least one hostname (matched against SNI)");
        }
        hostnames(o, &spec.hostnames);
    } else if !spec.hostnames.is_empty() {
        o.err("spec.hostnames", "unknown field (a TCPRoute has no hostnames)");
    }
    let max = if tls { 1 } else { 16 };
    if spec.rules.is_empty() || spec.rules.len() > max {
        o.err("spec.rules", format!("needs 1 to {max} rules, has {}", spec.rules.len()));
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}].backendRefs");
        if rule.backend_refs.is_empty() {
            o.err(&field, "at least one backend is required");
        }
        backends(o, &field, &rule.backend_refs, &[]);
    }
}
