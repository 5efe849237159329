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
        RateLimitError::Unsupported {
            path: "spec.configPatches[0].patch.value.name".into(),
            found: "\"envoy.filters.http.lua\"".into()
        }
    );
    assert!(err.to_string().contains("only the local rate limit filter is supported"));

    let mut cluster = documented();
    cluster["spec"]["configPatches"][0]["applyTo"] = json!("CLUSTER");
    assert!(matches!(parse_local_rate_limit(&cluster), Err(RateLimitError::Unsupported { path, .. })
        if path == "spec.configPatches[0].applyTo"));

    let mut global = documented();
    global["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["type_url"] =
        json!("type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit");
    assert!(matches!(parse_local_rate_limit(&global), Err(RateLimitError::Unsupported { path, .. })
        if path == "spec.configPatches[0].patch.value.typed_config.type_url"));

    let mut extra = documented();
    extra["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["value"]["descriptors"] = json!([]);
    assert!(matches!(parse_local_rate_limit(&extra), Err(RateLimitError::Unsupported { path, .. })
        if path == "spec.configPatches[0].patch.value.typed_config.value.descriptors"));

    let mut outbound = documented();
    outbound["spec"]["configPatches"][0]["match"]["context"] = json!("SIDECAR_OUTBOUND");
    assert!(parse_local_rate_limit(&outbound).is_err());

    assert!(matches!(parse_local_rate_limit(&json!({"kind": "Sidecar", "spec": {}})),
        Err(RateLimitError::Invalid { path, .. }) if path == "kind"));
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
            Err(RateLimitError::Invalid { path, value: v, reason: r }) => {
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
    let bucket = Bucket::new(cfg);
    assert_eq!(bucket.try_take(0, 0), Decision::Skipped);
}

fn config(max: u32, per_fill: u32, interval_ms: u64) -> BucketConfig {
    BucketConfig {
        stat_prefix: "t".into(),
        max_tokens: max,
        tokens_per_fill: per_fill,
        fill_interval: Duration::from_millis(interval_ms),
        enabled: Fraction::ALL,
        enforced: Fraction::ALL,
        response_headers: vec![("x-local-rate-limit".into(), "true".into())],
    }
}

const MS: u64 = 1_000_000;

#[test]
fn the_bucket_starts_full_and_refills_per_interval() {
    let b = Bucket::new(config(2, 1, 100));
    assert_eq!(b.try_take(5 * MS, 0), Decision::Allow);
    assert_eq!(b.try_take(6 * MS, 0), Decision::Allow);
    assert_eq!(
        b.try_take(7 * MS, 0),
        Decision::Limited {
            headers: vec![("x-envoy-ratelimited".into(), "true".into()), ("x-local-rate-limit".into(), "true".into())]
        }
    );
    assert!(matches!(b.try_take(104 * MS, 0), Decision::Limited { .. }), "the first fill is at origin + 100ms");
    assert_eq!(b.try_take(105 * MS, 0), Decision::Allow);
    assert!(matches!(b.try_take(106 * MS, 0), Decision::Limited { .. }));
    // After a long idle time the bucket is full, not more.
    assert_eq!(b.try_take(10_000 * MS, 0), Decision::Allow);
    assert_eq!(b.try_take(10_000 * MS, 0), Decision::Allow);
    assert!(matches!(b.try_take(10_000 * MS, 0), Decision::Limited { .. }));
    // Time going backwards adds nothing.
    assert!(matches!(b.try_take(MS, 0), Decision::Limited { .. }));
}

#[test]
fn concurrent_takers_never_share_a_token() {
    let b = std::sync::Arc::new(Bucket::new(config(1000, 1, 1000)));
    let allowed: usize = std::thread::scope(|s| {
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                s.spawn(move || (0..600).filter(|_| b.try_take(MS, 0) == Decision::Allow).count())
            })
            .collect();
        takers.into_iter().map(|t| t.join().unwrap()).sum()
    });
    assert_eq!(allowed, 1000);
}

#[test]
fn enabled_and_enforced_fractions_use_the_roll() {
    let mut c = config(1, 1, 1000);
    c.enabled = Fraction { numerator: 50, denominator: 100 };
    c.enforced = Fraction::NONE;
    let b = Bucket::new(c);
    assert_eq!(b.try_take(0, u32::MAX), Decision::Skipped);
    assert_eq!(b.try_take(0, 0), Decision::Allow);
    assert_eq!(b.try_take(0, 0), Decision::NotEnforced);
    assert!(Fraction { numerator: 1, denominator: 1_000_000 }.hits(0));
    assert!(!Fraction { numerator: 1, denominator: 1_000_000 }.hits(u32::MAX / 1000));
}

proptest! {
    #[test]
    fn allowed_never_exceeds_capacity_plus_fills(
        max in 1u32..20,
        per_fill in 1u32..10,
        interval_ms in 50u64..500,
        times in proptest::collection::vec(0u64..5_000, 1..200),
    ) {
        let b = Bucket::new(config(max, per_fill, interval_ms));
        let times: Vec<u64> = times.into_iter().map(|t| t * MS).collect();
        let allowed = times.iter().filter(|t| b.try_take(**t, 0) == Decision::Allow).count() as u64;
        let first = times[0];
        let latest = times.iter().copied().max().unwrap();
        let fills = (latest - first.min(latest)) / (interval_ms * MS);
        prop_assert!(allowed <= u64::from(max) + fills * u64::from(per_fill),
            "allowed {} > {} + {} * {}", allowed, max, fills, per_fill);
    }

    #[test]
    fn a_steady_monotonic_stream_gets_exactly_its_share(max in 1u32..20, per_fill in 1u32..10) {
        // 10 requests per 100ms interval over 1s, asking far more than the bucket gives.
        let b = Bucket::new(config(max, per_fill, 100));
        let allowed = (0..100u64).filter(|i| b.try_take(i * 10 * MS, 0) == Decision::Allow).count() as u64;
        let expected: u64 = (0..10u64).fold((u64::from(max), 0u64), |(tokens, total), interval| {
            let t = if interval == 0 { tokens } else { (tokens + u64::from(per_fill)).min(u64::from(max)) };
            let used = t.min(10);
            (t - used, total + used)
        }).1;
        prop_assert_eq!(allowed, expected);
    }

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
