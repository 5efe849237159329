//! Checks of the Gateway API route kinds (what their CRDs' schemas and CEL rules
//! enforce, for the parts the mesh uses).
use std::prelude::rust_2024::*;

use super::Obj;
use crate::config::{
    gateway::{BackendRef, Gateway, GrpcRoute, HttpRoute, NameMatch, ParentReference, RouteFilter, WAYPOINT_PORT},
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
                    "Exact" | "PathPrefix" => {
                        if !value.starts_with('/') {
                            o.err(format!("{field}.path.value"), format!("`{value}` must start with `/`"));
                        }
                    }
                    "RegularExpression" => {
                        if value.is_empty() {
                            o.err(format!("{field}.path.value"), "must not be empty");
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
        filters(o, &format!("{field}.filters"), &rule.filters, HTTP_FILTERS);
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
        let service = b.kind.as_deref().is_none_or(|k| k == "Service") && b.group.as_deref().is_none_or(str::is_empty);
        match b.port {
            Some(port) => o.port(&format!("{field}.port"), port),
            None if service => o.err(format!("{field}.port"), "required when the backend is a Service"),
            None => {}
        }
        filters(o, &format!("{field}.filters"), &b.filters, allowed_filters);
    }
}
