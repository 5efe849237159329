//! Checks of the `security.istio.io` kinds (and `Telemetry`, which shares their
//! selector rules), following Istio's own validation.
use std::prelude::rust_2024::*;

use super::Obj;
use crate::config::{
    security::{
        Action, AuthorizationPolicy, Condition, Operation, PeerAuthentication, RequestAuthentication, RuleSource,
    },
    telemetry::Telemetry,
    values,
};

pub(super) fn authorization_policy(o: &mut Obj, policy: &AuthorizationPolicy) {
    let spec = &policy.spec;
    o.targets(spec.selector.as_ref(), spec.target_ref.as_ref(), &spec.target_refs);
    match (spec.action, &spec.provider) {
        (Action::Custom, None) => o.err("spec.provider", "a CUSTOM policy needs a provider"),
        (Action::Custom, Some(p)) if p.name.is_empty() => o.err("spec.provider.name", "must not be empty"),
        (Action::Allow | Action::Deny | Action::Audit, Some(_)) => {
            o.err("spec.provider", "a provider is only allowed with action CUSTOM");
        }
        _ => {}
    }
    if spec.action == Action::Deny && spec.rules.is_empty() {
        o.err("spec.rules", "a DENY policy without rules never matches; add an empty rule `{}` to deny every request");
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let field = format!("{field}.from[{j}].source");
            match &from.source {
                Some(source) if !is_empty_source(source) => self::source(o, &field, source),
                _ => o.err(field, "must not be empty"),
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            let field = format!("{field}.to[{j}].operation");
            match &to.operation {
                Some(operation) if !is_empty_operation(operation) => self::operation(o, &field, operation),
                _ => o.err(field, "must not be empty"),
            }
        }
        for (j, condition) in rule.when.iter().enumerate() {
            self::condition(o, &format!("{field}.when[{j}]"), condition);
        }
    }
}

fn is_empty_source(s: &RuleSource) -> bool {
    [
        &s.principals,
        &s.not_principals,
        &s.request_principals,
        &s.not_request_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.service_accounts,
        &s.not_service_accounts,
        &s.trust_domains,
        &s.not_trust_domains,
        &s.ip_blocks,
        &s.not_ip_blocks,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
    ]
    .iter()
    .all(|v| v.is_empty())
}

fn is_empty_operation(op: &Operation) -> bool {
    [&op.hosts, &op.not_hosts, &op.ports, &op.not_ports, &op.methods, &op.not_methods, &op.paths, &op.not_paths]
        .iter()
        .all(|v| v.is_empty())
}

fn source(o: &mut Obj, field: &str, s: &RuleSource) {
    let wildcards = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ];
    for (name, list) in wildcards {
        for (i, value) in list.iter().enumerate() {
            o.wildcard(&format!("{field}.{name}[{i}]"), value);
        }
    }
    for (name, list) in [("serviceAccounts", &s.service_accounts), ("notServiceAccounts", &s.not_service_accounts)] {
        for (i, value) in list.iter().enumerate() {
            // `name` (in the policy's namespace) or `namespace/name`; no wildcards.
            let ok = match value.split_once('/') {
                Some((ns, sa)) => values::is_dns_label(ns) && values::is_dns_subdomain(sa),
                None => values::is_dns_subdomain(value),
            };
            if !ok {
                o.err(
                    format!("{field}.{name}[{i}]"),
                    format!("`{value}` is not a service account (`name` or `namespace/name`)"),
                );
            }
        }
    }
    if !s.service_accounts.is_empty() && (!s.principals.is_empty() || !s.namespaces.is_empty()) {
        o.err(format!("{field}.serviceAccounts"), "serviceAccounts cannot be set with namespaces or principals");
    }
    let blocks = [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ];
    for (name, list) in blocks {
        for (i, value) in list.iter().enumerate() {
            o.ip_or_cidr(&format!("{field}.{name}[{i}]"), value);
        }
    }
}

fn operation(o: &mut Obj, field: &str, op: &Operation) {
    for (name, list) in [("hosts", &op.hosts), ("notHosts", &op.not_hosts)] {
        for (i, value) in list.iter().enumerate() {
            o.wildcard(&format!("{field}.{name}[{i}]"), value);
        }
    }
    for (name, list) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
        for (i, value) in list.iter().enumerate() {
            if let Some(why) = values::port_str_error(value) {
                o.err(format!("{field}.{name}[{i}]"), why);
            }
        }
    }
    for (name, list) in [("methods", &op.methods), ("notMethods", &op.not_methods)] {
        for (i, value) in list.iter().enumerate() {
            if value.is_empty() {
                o.err(format!("{field}.{name}[{i}]"), "must not be empty");
            }
        }
    }
    for (name, list) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
        for (i, value) in list.iter().enumerate() {
            // Path templates (`/foo/{*}/bar`, `{**}`) have their own wildcard syntax.
            if value.contains(['{', '}']) {
                if let Some(why) = path_template_error(value) {
                    o.err(format!("{field}.{name}[{i}]"), format!("path template `{value}` {why}"));
                }
            } else {
                o.wildcard(&format!("{field}.{name}[{i}]"), value);
            }
        }
    }
}

/// Istio's path template rules: starts with `/`; `{*}` (one segment) and `{**}` (zero
/// or more segments) are whole segments; nothing but literals after `{**}` (it is the
/// last operator); no other braces and no `*` glob beside them.
fn path_template_error(value: &str) -> Option<&'static str> {
    let Some(rest) = value.strip_prefix('/') else { return Some("must start with `/`") };
    let mut after_rest = false;
    for segment in rest.split('/') {
        match segment {
            "{*}" | "{**}" if after_rest => return Some("may have no operator after `{**}`"),
            "{*}" => {}
            "{**}" => after_rest = true,
            s if s.contains(['{', '}']) => return Some("may use `{*}` and `{**}` only as whole segments"),
            s if s.contains('*') => return Some("cannot mix `*` wildcards with `{*}` or `{**}`"),
            _ => {}
        }
    }
    None
}

/// Istio's `when` keys; `[...]` takes a header or claim name.
const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "source.trustDomain",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

fn condition(o: &mut Obj, field: &str, c: &Condition) {
    let key = c.key.as_str();
    let bracketed =
        |prefix: &str| key.strip_prefix(prefix).and_then(|k| k.strip_suffix(']')).is_some_and(|k| !k.is_empty());
    let known = CONDITION_KEYS.contains(&key)
        || bracketed("request.headers[")
        || bracketed("request.auth.claims[")
        || key.starts_with("experimental.envoy.filters.");
    if key.is_empty() {
        o.err(format!("{field}.key"), "must not be empty");
    } else if !known {
        o.err(
            format!("{field}.key"),
            format!(
                "unknown key `{key}` (expected one of {}, request.headers[NAME], request.auth.claims[NAME])",
                CONDITION_KEYS.join(", ")
            ),
        );
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        o.err(format!("{field}.values"), "values or notValues must not both be empty");
    }
    for (name, list) in [("values", &c.values), ("notValues", &c.not_values)] {
        for (i, value) in list.iter().enumerate() {
            let item = format!("{field}.{name}[{i}]");
            match key {
                "source.ip" | "remote.ip" | "destination.ip" => o.ip_or_cidr(&item, value),
                "destination.port" => {
                    if let Some(why) = values::port_str_error(value) {
                        o.err(item, why);
                    }
                }
                _ => {}
            }
        }
    }
}

pub(super) fn peer_authentication(o: &mut Obj, pa: &PeerAuthentication) {
    let spec = &pa.spec;
    o.selector("spec.selector", spec.selector.as_ref());
    let has_selector = spec.selector.as_ref().is_some_and(|s| !s.match_labels.is_empty());
    if !spec.port_level_mtls.is_empty() && !has_selector {
        o.err("spec.portLevelMtls", "portLevelMtls needs a selector (it applies to one workload's ports)");
    }
    for port in spec.port_level_mtls.keys() {
        o.port(&format!("spec.portLevelMtls[\"{port}\"]"), *port);
    }
}

pub(super) fn request_authentication(o: &mut Obj, ra: &RequestAuthentication) {
    let spec = &ra.spec;
    o.targets(spec.selector.as_ref(), spec.target_ref.as_ref(), &spec.target_refs);
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        let field = format!("spec.jwtRules[{i}]");
        if rule.issuer.is_empty() && rule.jwks_uri.is_none() {
            o.err(format!("{field}.issuer"), "issuer or jwksUri is required");
        }
        if let Some(uri) = &rule.jwks_uri {
            let rest = uri.strip_prefix("https://").or_else(|| uri.strip_prefix("http://"));
            if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                o.err(format!("{field}.jwksUri"), format!("`{uri}` is not an http(s) URL"));
            }
        }
        if let Some(jwks) = &rule.jwks
            && let Err(e) = serde_json::from_str::<serde_json::Value>(jwks)
        {
            o.err(format!("{field}.jwks"), format!("not a JSON Web Key Set: {e}"));
        }
        if rule.jwks.is_some() && rule.jwks_uri.is_some() {
            o.err(format!("{field}.jwks"), "jwks and jwksUri are mutually exclusive");
        }
        for (j, audience) in rule.audiences.iter().enumerate() {
            if audience.is_empty() {
                o.err(format!("{field}.audiences[{j}]"), "must not be empty");
            }
        }
        for (j, claim) in rule.space_delimited_claims.iter().enumerate() {
            if claim.is_empty() {
                o.err(format!("{field}.spaceDelimitedClaims[{j}]"), "must not be empty");
            }
        }
        if !rule.space_delimited_claims.is_empty() {
            o.warn(
                format!("{field}.spaceDelimitedClaims"),
                "accepted but not enforced by this mesh yet: it has no effect",
            );
        }
        for (j, cookie) in rule.from_cookies.iter().enumerate() {
            if cookie.is_empty() {
                o.err(format!("{field}.fromCookies[{j}]"), "must not be empty");
            }
        }
        for (j, header) in rule.from_headers.iter().enumerate() {
            if header.name.is_empty() {
                o.err(format!("{field}.fromHeaders[{j}].name"), "must not be empty");
            }
        }
        for (j, param) in rule.from_params.iter().enumerate() {
            if param.is_empty() {
                o.err(format!("{field}.fromParams[{j}]"), "must not be empty");
            }
        }
        for (j, claim) in rule.output_claim_to_headers.iter().enumerate() {
            if claim.header.is_empty() {
                o.err(format!("{field}.outputClaimToHeaders[{j}].header"), "must not be empty");
            } else if claim.header.starts_with(':') {
                o.err(
                    format!("{field}.outputClaimToHeaders[{j}].header"),
                    format!("`{}` is a pseudo-header; a claim goes to a regular header", claim.header),
                );
            }
            if claim.claim.is_empty() {
                o.err(format!("{field}.outputClaimToHeaders[{j}].claim"), "must not be empty");
            }
        }
        o.duration(&format!("{field}.timeout"), rule.timeout.as_ref());
    }
}

pub(super) fn telemetry(o: &mut Obj, telemetry: &Telemetry) {
    use serde_json::Value;
    let spec = &telemetry.spec;
    o.targets(spec.selector.as_ref(), spec.target_ref.as_ref(), &spec.target_refs);
    let providers = |o: &mut Obj, field: &str, block: &Value| {
        for (k, p) in block.get("providers").and_then(Value::as_array).into_iter().flatten().enumerate() {
            if p.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
                o.err(format!("{field}.providers[{k}].name"), "must not be empty");
            }
        }
    };
    for (i, metrics) in spec.metrics.iter().enumerate() {
        let field = format!("spec.metrics[{i}]");
        providers(o, &field, metrics);
        for (j, over) in metrics.get("overrides").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let field = format!("{field}.overrides[{j}]");
            if over.pointer("/match/customMetric").is_some_and(|m| m.as_str().is_none_or(str::is_empty)) {
                o.err(format!("{field}.match.customMetric"), "must not be empty");
            }
            for (name, tag) in over.get("tagOverrides").and_then(Value::as_object).into_iter().flatten() {
                let field = format!("{field}.tagOverrides[{name:?}]");
                let operation = tag.get("operation").and_then(Value::as_str).unwrap_or("UPSERT");
                let value = tag.get("value").and_then(Value::as_str).unwrap_or("");
                match operation {
                    "UPSERT" if value.is_empty() => o.err(format!("{field}.value"), "required with operation UPSERT"),
                    "REMOVE" if !value.is_empty() => {
                        o.err(format!("{field}.value"), "only allowed with operation UPSERT");
                    }
                    "UPSERT" | "REMOVE" => {}
                    other => o.err(format!("{field}.operation"), format!("`{other}` is not UPSERT or REMOVE")),
                }
            }
        }
    }
    for (i, tracing) in spec.tracing.iter().enumerate() {
        let field = format!("spec.tracing[{i}]");
        providers(o, &field, tracing);
        if let Some(p) = tracing.get("randomSamplingPercentage").and_then(Value::as_f64)
            && !(0.0..=100.0).contains(&p)
        {
            o.err(format!("{field}.randomSamplingPercentage"), format!("{p} is outside 0..=100"));
        }
    }
    for (i, logging) in spec.access_logging.iter().enumerate() {
        providers(o, &format!("spec.accessLogging[{i}]"), logging);
    }
}
