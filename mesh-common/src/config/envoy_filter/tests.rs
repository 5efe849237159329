use std::panic;

use proptest::prelude::*;
use serde_json::json;

use super::*;

fn settings(max: u32, per_fill: u32, interval: &str) -> Value {
    json!({
        "stat_prefix": "http_local_rate_limiter",
        "token_bucket": {"max_tokens": max, "tokens_per_fill": per_fill, "fill_interval": interval},
        "filter_enabled": {"runtime_key": "local_rate_limit_enabled",
            "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"runtime_key": "local_rate_limit_enforced",
            "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "response_headers_to_add": [{"append": false, "header": {"key": "x-local-rate-limit", "value": "true"}}]
    })
}

fn typed(value: Value) -> Value {
    let mut t = json!({
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
    });
    t["value"] = value;
    t
}

/// Istio's documented filter-wide example.
fn documented() -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": "filter-local-ratelimit-svc", "namespace": "istio-system"},
        "spec": {
            "workloadSelector": {"labels": {"app": "productpage"}},
            "configPatches": [{
                "applyTo": "HTTP_FILTER",
                "match": {"context": "SIDECAR_INBOUND", "listener": {"filterChain": {"filter": {
                    "name": "envoy.filters.network.http_connection_manager"}}}},
                "patch": {"operation": "INSERT_BEFORE", "value": {
                    "name": "envoy.filters.http.local_ratelimit",
                    "typed_config": typed(settings(4, 4, "60s"))}}
            }]
        }
    })
}

/// Istio's documented per-route example, aimed at a waypoint by `targetRefs`.
fn per_route() -> Value {
    json!({
        "kind": "EnvoyFilter",
        "spec": {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
            "configPatches": [{
                "applyTo": "HTTP_FILTER",
                "match": {"context": "SIDECAR_INBOUND", "listener": {"filterChain": {"filter": {
                    "name": "envoy.filters.network.http_connection_manager"}}}},
                "patch": {"operation": "INSERT_BEFORE", "value": {
                    "name": "envoy.filters.http.local_ratelimit",
                    "typed_config": typed(json!({"stat_prefix": "http_local_rate_limiter"}))}}
            }, {
                "applyTo": "HTTP_ROUTE",
                "match": {"context": "SIDECAR_INBOUND", "routeConfiguration": {"vhost": {
                    "name": "inbound|http|9080", "route": {"action": "ANY"}}}},
                "patch": {"operation": "MERGE", "value": {"typed_per_filter_config": {
                    "envoy.filters.http.local_ratelimit": typed(settings(10, 5, "1.5s"))}}}
            }]
        }
    })
}

#[test]
fn istios_documented_filter_parses() {
    let rl = parse_local_rate_limit(&documented()).unwrap();
    assert_eq!(rl.scope.selector.get("app").map(String::as_str), Some("productpage"));
    let f = rl.filter.unwrap();
    assert_eq!((f.max_tokens, f.tokens_per_fill, f.fill_interval), (4, 4, Duration::from_mins(1)));
    assert_eq!(f.enabled, Fraction::ALL);
    assert_eq!(f.enforced, Fraction::ALL);
    assert_eq!(f.response_headers, vec![("x-local-rate-limit".to_string(), "true".to_string())]);
    assert!(rl.routes.is_empty());
}

#[test]
fn the_per_route_shape_parses_and_applies_to_its_vhost_only() {
    let rl = parse_local_rate_limit(&per_route()).unwrap();
    assert_eq!(rl.scope.target_refs, vec![("Gateway".to_string(), "waypoint".to_string())]);
    assert!(rl.filter.is_none());
    let c = rl.config_for("inbound|http|9080", "default").unwrap();
    assert_eq!((c.max_tokens, c.tokens_per_fill, c.fill_interval), (10, 5, Duration::from_millis(1500)));
    assert!(rl.config_for("inbound|http|8080", "default").is_none());
}

#[test]
fn other_envoy_filters_are_rejected_by_path() {
    let mut lua = documented();
    lua["spec"]["configPatches"][0]["patch"]["value"]["name"] = json!("envoy.filters.http.lua");
    let err = parse_local_rate_limit(&lua).unwrap_err();
    assert_eq!(
        err,
        EnvoyFilterError::Unsupported {
            path: "spec.configPatches[0].patch.value.name".into(),
            found: "\"envoy.filters.http.lua\"".into()
        }
    );
    assert!(err.to_string().contains("only the local rate limit filter is supported"));

    let mut cluster = documented();
    cluster["spec"]["configPatches"][0]["applyTo"] = json!("CLUSTER");
    assert!(matches!(parse_local_rate_limit(&cluster), Err(EnvoyFilterError::Unsupported { path, .. })
        if path == "spec.configPatches[0].applyTo"));

    let mut global = documented();
    global["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["type_url"] =
        json!("type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit");
    assert!(matches!(parse_local_rate_limit(&global), Err(EnvoyFilterError::Unsupported { path, .. })
        if path == "spec.configPatches[0].patch.value.typed_config.type_url"));

    let mut extra = documented();
    extra["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["value"]["descriptors"] = json!([]);
    assert!(matches!(parse_local_rate_limit(&extra), Err(EnvoyFilterError::Unsupported { path, .. })
        if path == "spec.configPatches[0].patch.value.typed_config.value.descriptors"));

    let mut outbound = documented();
    outbound["spec"]["configPatches"][0]["match"]["context"] = json!("SIDECAR_OUTBOUND");
    assert!(parse_local_rate_limit(&outbound).is_err());

    assert!(matches!(parse_local_rate_limit(&json!({"kind": "Sidecar", "spec": {}})),
        Err(EnvoyFilterError::Invalid { path, .. }) if path == "kind"));
}

#[test]
fn bad_values_name_the_field_and_value() {
    let cases = [
        ("max_tokens", json!(0), "must be at least 1"),
        ("max_tokens", json!(-1), "is not a non-negative 32-bit integer"),
        ("fill_interval", json!("1m"), "is not a protobuf duration (seconds with an s suffix: 60s, 0.5s)"),
        ("fill_interval", json!("0.01s"), "must be at least 50ms (Envoy's minimum)"),
    ];
    for (field, value, reason) in cases {
        let mut f = documented();
        f["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["value"]["token_bucket"][field] = value.clone();
        match parse_local_rate_limit(&f) {
            Err(EnvoyFilterError::Invalid { path, value: v, reason: r }) => {
                assert_eq!(path, format!("spec.configPatches[0].patch.value.typed_config.value.token_bucket.{field}"));
                assert_eq!(v, value.to_string());
                assert_eq!(r, reason);
            }
            other => panic!("{field}={value}: {other:?}"),
        }
    }
}

#[test]
fn absent_enabled_and_enforced_are_zero_percent_as_in_envoy() {
    let mut f = documented();
    let v = &mut f["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["value"];
    v.as_object_mut().unwrap().remove("filter_enabled");
    v.as_object_mut().unwrap().remove("filter_enforced");
    let cfg = parse_local_rate_limit(&f).unwrap().filter.unwrap();
    assert_eq!(cfg.enabled.numerator, 0);
    assert_eq!(cfg.enforced, Fraction::NONE);
}

proptest! {
    #[test]
    fn parsing_arbitrary_json_never_panics(s in "\\PC{0,40}", n in any::<i64>()) {
        let mut f = documented();
        f["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["value"]["token_bucket"]["fill_interval"] = json!(s);
        let _ = parse_local_rate_limit(&f);
        let mut f = documented();
        f["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["value"]["token_bucket"]["max_tokens"] = json!(n);
        let _ = parse_local_rate_limit(&f);
    }
}
