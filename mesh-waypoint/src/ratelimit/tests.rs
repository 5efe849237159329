use std::time::Duration;

use proptest::prelude::*;

use super::*;

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
}

// ---------------------------------------------------------------------------------
// Selection: which filters apply at a waypoint, and which bucket a route takes.

mod selection {
    use std::fmt::Write as _;

    use mesh_common::config::{Config, Source, load};

    use super::*;
    use crate::route::ServiceRef;

    const BASE: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {ports: [{port: 9080, name: http}], selector: {app: reviews}}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec: {ports: [{port: 9080, name: http}], selector: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: limited
    match: [{uri: {prefix: /slow}}]
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
";

    fn config(yaml: &str) -> Config {
        load(&[Source::new("t.yaml", format!("{BASE}{yaml}"))]).unwrap_or_else(|report| panic!("{report}"))
    }

    /// A local rate limit `EnvoyFilter` `ns/name` with `scope` (YAML lines under
    /// `spec:`), a filter-wide bucket of `filter_max` tokens (none when 0) and, when
    /// `route` is given, a per-route bucket of 1 token for that `vhost.route` match.
    fn filter(ns: &str, name: &str, scope: &str, filter_max: u32, route: Option<&str>) -> String {
        let bucket = |max: u32| {
            format!(
                "{{stat_prefix: rl, token_bucket: {{max_tokens: {max}, fill_interval: 60s}}, \
                 filter_enabled: {{default_value: {{numerator: 100}}}}, filter_enforced: {{default_value: {{numerator: 100}}}}}}"
            )
        };
        let filter_value = if filter_max == 0 { "{stat_prefix: rl}".to_string() } else { bucket(filter_max) };
        let ty = "'@type': type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
        let mut out = format!(
            "---\napiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{scope}  configPatches:\n  - applyTo: HTTP_FILTER\n    patch:\n      operation: INSERT_BEFORE\n      value:\n        name: envoy.filters.http.local_ratelimit\n        typed_config: {{udpa: 1}}\n"
        );
        out = out.replace("{udpa: 1}", &format!("{{{ty}, {}}}", &filter_value[1..filter_value.len() - 1]));
        if let Some(route) = route {
            let one = bucket(1);
            write!(
                out,
                "  - applyTo: HTTP_ROUTE\n    match:\n      routeConfiguration: {{vhost: {route}}}\n    patch:\n      operation: MERGE\n      value:\n        typed_per_filter_config:\n          envoy.filters.http.local_ratelimit: {{{ty}, {}}}\n",
                &one[1..one.len() - 1]
            )
            .expect("writes to a String");
        }
        out
    }

    const TO_WAYPOINT: &str = "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n";

    fn limits(config: &Config, service: &str) -> RateLimits {
        let labels = WaypointRef::labels_of("waypoint");
        let waypoint = WaypointRef { namespace: "shop", name: "waypoint", labels: &labels };
        RateLimits::for_destination(config, waypoint, &ServiceRef::new("shop", service, 9080))
    }

    fn ids(limits: &RateLimits) -> Vec<&str> {
        limits.filter_ids().collect()
    }

    const HTTP0: &str = "VirtualService/shop/reviews#http[0]";
    const HTTP1: &str = "VirtualService/shop/reviews#http[1]";

    #[test]
    fn scopes_select_the_filters_of_the_waypoint_and_destination() {
        let yaml = [
            filter("shop", "to-waypoint", TO_WAYPOINT, 5, None),
            filter("shop", "to-other-waypoint", &TO_WAYPOINT.replace("name: waypoint", "name: other"), 5, None),
            filter("shop", "to-reviews", "  targetRefs: [{kind: Service, group: '', name: reviews}]\n", 5, None),
            filter("istio-system", "mesh-wide", "", 5, None),
            filter("shop", "namespace-wide", "", 5, None),
            filter("other", "other-namespace", "", 5, None),
            filter(
                "shop",
                "by-label",
                "  workloadSelector: {labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\n",
                5,
                None,
            ),
            filter("shop", "label-of-a-sidecar", "  workloadSelector: {labels: {app: productpage}}\n", 5, None),
        ]
        .concat();
        let config = config(&yaml);
        assert_eq!(
            ids(&limits(&config, "reviews")),
            ["istio-system/mesh-wide", "shop/by-label", "shop/namespace-wide", "shop/to-reviews", "shop/to-waypoint"]
        );
        assert_eq!(
            ids(&limits(&config, "ratings")),
            ["istio-system/mesh-wide", "shop/by-label", "shop/namespace-wide", "shop/to-waypoint"]
        );
    }

    #[test]
    fn a_listener_port_limits_the_filter_to_that_service_port() {
        let with_port = filter("shop", "p", TO_WAYPOINT, 5, None).replace(
            "  - applyTo: HTTP_FILTER\n",
            "  - applyTo: HTTP_FILTER\n    match: {listener: {portNumber: 8080}}\n",
        );
        assert!(limits(&config(&with_port), "reviews").is_empty());
        let with_port = with_port.replace("portNumber: 8080", "portNumber: 9080");
        assert_eq!(ids(&limits(&config(&with_port), "reviews")), ["shop/p"]);
    }

    #[test]
    fn a_named_route_takes_its_own_bucket_and_the_others_the_filters() {
        let yaml = filter("shop", "rl", TO_WAYPOINT, 3, Some("{name: 'inbound|http|9080', route: {name: limited}}"));
        let limits = limits(&config(&yaml), "reviews");
        // http[0] (`name: limited`): its own bucket of 1.
        assert_eq!(limits.decide(HTTP0, 0, 0), Decision::Allow);
        assert!(matches!(limits.decide(HTTP0, 1, 0), Decision::Limited { .. }));
        // http[1] (unnamed): the filter-wide bucket of 3, untouched by http[0].
        for t in 0..3 {
            assert_eq!(limits.decide(HTTP1, t, 0), Decision::Allow, "request {t}");
        }
        let Decision::Limited { headers } = limits.decide(HTTP1, 4, 0) else { panic!("not limited") };
        assert_eq!(headers[0], ("x-envoy-ratelimited".to_string(), "true".to_string()));
    }

    #[test]
    fn route_action_any_gives_every_route_its_own_bucket() {
        let yaml = filter("shop", "rl", TO_WAYPOINT, 0, Some("{name: 'inbound|http|9080', route: {action: ANY}}"));
        let limits = limits(&config(&yaml), "reviews");
        for route in [HTTP0, HTTP1] {
            assert_eq!(limits.decide(route, 0, 0), Decision::Allow, "{route}");
            assert!(matches!(limits.decide(route, 1, 0), Decision::Limited { .. }), "{route}");
        }
        // A route name the destination does not have: no per-route bucket, and the
        // filter has none of its own.
        assert_eq!(limits.decide("VirtualService/shop/other#http[0]", 2, 0), Decision::Skipped);
    }

    #[test]
    fn the_default_route_and_waypoint_vhost_names_match() {
        for vhost in [
            "{name: 'inbound-vip|9080|http|ratings.shop.svc.cluster.local', route: {name: default}}",
            "{name: 'ratings.shop.svc.cluster.local:9080'}",
        ] {
            let yaml = filter("shop", "rl", TO_WAYPOINT, 0, Some(vhost));
            let limits = limits(&config(&yaml), "ratings");
            assert_eq!(limits.decide("default", 0, 0), Decision::Allow, "{vhost}");
            assert!(matches!(limits.decide("default", 1, 0), Decision::Limited { .. }), "{vhost}");
        }
        // Another service's vhost: nothing for ratings.
        let yaml = filter("shop", "rl", TO_WAYPOINT, 0, Some("{name: 'inbound|http|8080'}"));
        assert_eq!(limits(&config(&yaml), "ratings").decide("default", 0, 0), Decision::Skipped);
    }

    #[test]
    fn buckets_survive_a_config_push_when_their_settings_do_not_change() {
        let yaml = filter("shop", "rl", TO_WAYPOINT, 2, Some("{route: {name: limited}}"));
        let first = limits(&config(&yaml), "reviews");
        first.decide(HTTP0, 0, 0);
        first.decide(HTTP1, 0, 0);
        first.decide(HTTP1, 0, 0);
        // The same filter again (another object changed): both buckets stay empty.
        let other = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: unrelated}\n";
        let second = limits(&config(&format!("{yaml}{other}")), "reviews").carry_over(&first);
        assert!(matches!(second.decide(HTTP0, 1, 0), Decision::Limited { .. }));
        assert!(matches!(second.decide(HTTP1, 1, 0), Decision::Limited { .. }));
        // New filter-wide settings: that bucket starts full; the route's is kept.
        let changed = yaml.replace("max_tokens: 2", "max_tokens: 5");
        let third = limits(&config(&changed), "reviews").carry_over(&second);
        assert_eq!(third.decide(HTTP1, 2, 0), Decision::Allow);
        assert!(matches!(third.decide(HTTP0, 2, 0), Decision::Limited { .. }));
        // Without carrying over, everything starts full.
        assert_eq!(limits(&config(&yaml), "reviews").decide(HTTP0, 3, 0), Decision::Allow);
    }

    #[test]
    fn filters_chain_and_the_first_that_limits_answers() {
        let yaml =
            [filter("istio-system", "wide", "", 1, None), filter("shop", "narrow", TO_WAYPOINT, 5, None)].concat();
        let limits = limits(&config(&yaml), "reviews");
        assert_eq!(ids(&limits), ["istio-system/wide", "shop/narrow"]);
        assert_eq!(limits.decide(HTTP1, 0, 0), Decision::Allow);
        assert!(matches!(limits.decide(HTTP1, 1, 0), Decision::Limited { .. }));
        assert!(RateLimits::default().is_empty());
        assert_eq!(RateLimits::default().decide(HTTP1, 0, 0), Decision::Skipped);
    }
}
