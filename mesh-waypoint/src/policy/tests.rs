//! Tests of `DestinationRule` lookup and policy merging, from YAML as users write it.
use std::time::Duration;

use mesh_common::config::{Config, Source, load};

use super::*;

fn config(yaml: &str) -> Config {
    load(&[Source::new("t.yaml", yaml)]).unwrap_or_else(|report| panic!("{report}"))
}

fn dr(ns: &str, name: &str, host: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: {host}\n{extra}"
    )
}

const REVIEWS: &str = "reviews.shop.svc.cluster.local";

fn resolve(c: &Config, host: &str, client: &str) -> Resolved {
    Resolved::for_destination(c, host, client, None, 9080).unwrap()
}

fn rule_of(r: &Resolved) -> Option<String> {
    r.rule.as_ref().map(ToString::to_string)
}

#[test]
fn no_rule_means_istio_defaults() {
    let r = resolve(&Config::default(), REVIEWS, "shop");
    assert_eq!(r.rule, None);
    assert_eq!(r.lb, LbPolicy::LeastRequest, "Istio's default algorithm");
    assert_eq!(r.limits, Limits::default());
    assert_eq!(r.limits.max_connections, u32::MAX);
    assert_eq!(r.limits.connect_timeout, None, "the waypoint's own applies");
    assert_eq!(r.outlier, None);
    assert!(r.labels.is_empty());
}

#[test]
fn lookup_order_client_then_service_then_root() {
    let lb = |simple: &str| format!("  trafficPolicy:\n    loadBalancer: {{simple: {simple}}}\n");
    let all = [
        dr("waypoints", "client", REVIEWS, &lb("RANDOM")),
        dr("shop", "service", "reviews", &lb("ROUND_ROBIN")),
        dr("istio-system", "root", REVIEWS, &lb("LEAST_REQUEST")),
    ];
    let c = config(&all.concat());
    assert_eq!(rule_of(&resolve(&c, REVIEWS, "waypoints")).as_deref(), Some("waypoints/client"));
    assert_eq!(resolve(&c, REVIEWS, "waypoints").lb, LbPolicy::Random);
    // Another client namespace: the service's namespace.
    assert_eq!(rule_of(&resolve(&c, REVIEWS, "other")).as_deref(), Some("shop/service"));
    // Without the service's rule: the root namespace.
    let c = config(&[all[0].clone(), all[2].clone()].concat());
    assert_eq!(rule_of(&resolve(&c, REVIEWS, "other")).as_deref(), Some("istio-system/root"));
}

#[test]
fn short_hosts_are_relative_to_the_rule_namespace() {
    // `reviews` in namespace `other` means reviews.other..., not reviews.shop...
    let c = config(&dr("other", "r", "reviews", ""));
    assert_eq!(resolve(&c, REVIEWS, "other").rule, None);
    assert_eq!(rule_of(&resolve(&c, "reviews.other.svc.cluster.local", "x")).as_deref(), Some("other/r"));
}

#[test]
fn export_to_hides_and_shows() {
    // `.`: only the rule's own namespace sees it.
    let c = config(&dr("shop", "private", "reviews", "  exportTo: [.]\n"));
    assert_eq!(rule_of(&resolve(&c, REVIEWS, "shop")).as_deref(), Some("shop/private"));
    assert_eq!(resolve(&c, REVIEWS, "waypoints").rule, None);
    // Named namespaces.
    let c = config(&dr("shop", "named", "reviews", "  exportTo: [waypoints]\n"));
    assert!(resolve(&c, REVIEWS, "waypoints").rule.is_some());
    assert!(resolve(&c, REVIEWS, "elsewhere").rule.is_none());
    // `~`: nobody.
    let c = config(&dr("shop", "none", "reviews", "  exportTo: [\"~\"]\n"));
    assert!(resolve(&c, REVIEWS, "shop").rule.is_none());
    assert!(resolve(&c, REVIEWS, "waypoints").rule.is_none());
    // A hidden rule in the service namespace lets the root namespace's apply.
    let c = config(
        &[dr("shop", "private", "reviews", "  exportTo: [.]\n"), dr("istio-system", "root", REVIEWS, "")].concat(),
    );
    assert_eq!(rule_of(&resolve(&c, REVIEWS, "waypoints")).as_deref(), Some("istio-system/root"));
}

#[test]
fn root_namespace_client_prefers_private_then_service_namespace() {
    let c = config(
        &[dr("istio-system", "catch-all", "\"*.cluster.local\"", ""), dr("shop", "svc", "reviews", "")].concat(),
    );
    // A client in the root namespace (a gateway there) sees the service's own rule first.
    assert_eq!(rule_of(&resolve(&c, REVIEWS, "istio-system")).as_deref(), Some("shop/svc"));
    let c =
        config(&[dr("istio-system", "mine", REVIEWS, "  exportTo: [.]\n"), dr("shop", "svc", "reviews", "")].concat());
    assert_eq!(rule_of(&resolve(&c, REVIEWS, "istio-system")).as_deref(), Some("istio-system/mine"));
}

#[test]
fn exact_beats_wildcard_and_longer_wildcard_beats_shorter() {
    let c = config(
        &[
            dr("shop", "star", "\"*.svc.cluster.local\"", ""),
            dr("shop", "shop-star", "\"*.shop.svc.cluster.local\"", ""),
            dr("shop", "exact", "reviews", ""),
        ]
        .concat(),
    );
    assert_eq!(rule_of(&resolve(&c, REVIEWS, "shop")).as_deref(), Some("shop/exact"));
    assert_eq!(rule_of(&resolve(&c, "ratings.shop.svc.cluster.local", "shop")).as_deref(), Some("shop/shop-star"));
    assert_eq!(rule_of(&resolve(&c, "db.data.svc.cluster.local", "shop")).as_deref(), Some("shop/star"));
    assert_eq!(resolve(&c, "example.com", "shop").rule, None);
}

#[test]
fn rules_for_one_host_merge_subsets_and_first_policy_wins() {
    let c = config(
        &[
            dr("shop", "a", "reviews", "  subsets:\n  - name: v1\n    labels: {version: v1}\n"),
            dr(
                "shop",
                "b",
                "reviews",
                "  trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n  subsets:\n  - name: v1\n    labels: {version: other}\n  - name: v2\n    labels: {version: v2}\n",
            ),
            dr("shop", "c", "reviews", "  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n"),
        ]
        .concat(),
    );
    let v1 = Resolved::for_destination(&c, REVIEWS, "shop", Some("v1"), 9080).unwrap();
    assert_eq!(v1.labels.get("version").map(String::as_str), Some("v1"), "the first v1 wins");
    let v2 = Resolved::for_destination(&c, REVIEWS, "shop", Some("v2"), 9080).unwrap();
    assert_eq!(v2.labels.get("version").map(String::as_str), Some("v2"));
    assert_eq!(v2.lb, LbPolicy::Random, "the first rule with a policy");
}

#[test]
fn a_missing_subset_names_where_it_looked() {
    let c = config(&dr("shop", "r", "reviews", "  subsets:\n  - name: v1\n    labels: {version: v1}\n"));
    let err = Resolved::for_destination(&c, REVIEWS, "waypoints", Some("v3"), 9080).unwrap_err();
    assert_eq!(err.rule.as_ref().map(ToString::to_string).as_deref(), Some("shop/r"));
    assert_eq!(err.to_string(), format!("subset `v3` of host `{REVIEWS}` is not defined in DestinationRule shop/r"));
    let err = Resolved::for_destination(&Config::default(), REVIEWS, "waypoints", Some("v1"), 9080).unwrap_err();
    assert_eq!(err.rule, None);
    assert_eq!(err.searched, ["waypoints", "shop", "istio-system"]);
    assert!(err.to_string().contains("no DestinationRule"), "{err}");
}

const LAYERED: &str = "  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 2s}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 50, maxRetries: 4, idleTimeout: 30s}
    outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50}
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool:
        tcp: {maxConnections: 7}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 9080}
        outlierDetection: {consecutiveGatewayErrors: 2}
";

#[test]
fn top_level_policy_typed() {
    let c = config(&dr("shop", "r", "reviews", LAYERED));
    let r = resolve(&c, REVIEWS, "shop");
    assert_eq!(r.lb, LbPolicy::RoundRobin);
    assert_eq!(r.limits.max_connections, 100);
    assert_eq!(r.limits.connect_timeout, Some(Duration::from_secs(2)));
    assert_eq!(r.limits.max_pending_requests, 10);
    assert_eq!(r.limits.max_requests, 50);
    assert_eq!(r.limits.max_retries, 4);
    assert_eq!(r.limits.idle_timeout, Duration::from_secs(30));
    assert_eq!(r.limits.max_requests_per_connection, None);
    let od = r.outlier.unwrap();
    assert_eq!(od.consecutive_5xx, Some(3));
    assert_eq!(od.consecutive_gateway, None);
    assert_eq!(od.interval, Duration::from_secs(5));
    assert_eq!(od.base_ejection_time, Duration::from_mins(1));
    assert_eq!(od.max_ejection_time, Duration::from_mins(5));
    assert_eq!((od.max_ejection_percent, od.min_health_percent), (50, 0));
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

#[test]
fn port_level_settings_replace_the_top_level_whole() {
    let c = config(&dr("shop", "r", "reviews", LAYERED));
    let r = Resolved::for_destination(&c, REVIEWS, "shop", None, 8080).unwrap();
    assert_eq!(r.lb, LbPolicy::Random);
    // Not inherited from the top level: defaults.
    assert_eq!(r.limits, Limits::default());
    assert_eq!(r.outlier, None);
}

#[test]
fn subset_policy_overrides_field_by_field() {
    let c = config(&dr("shop", "r", "reviews", LAYERED));
    let v1 = Resolved::for_destination(&c, REVIEWS, "shop", Some("v1"), 9080).unwrap();
    assert_eq!(v1.labels.get("version").map(String::as_str), Some("v1"));
    // connectionPool replaced as a whole by the subset's ...
    assert_eq!(v1.limits.max_connections, 7);
    assert_eq!(v1.limits.max_requests, u32::MAX);
    // ... the rest inherited.
    assert_eq!(v1.lb, LbPolicy::RoundRobin);
    assert_eq!(v1.outlier.unwrap().consecutive_5xx, Some(3));
    // On port 8080 the top level's port entry applies, then the subset's pool.
    let v1_8080 = Resolved::for_destination(&c, REVIEWS, "shop", Some("v1"), 8080).unwrap();
    assert_eq!(v1_8080.lb, LbPolicy::Random);
    assert_eq!(v1_8080.limits.max_connections, 7);
    assert_eq!(v1_8080.outlier, None);
}

#[test]
fn subset_port_level_entry_takes_all_four_fields() {
    let c = config(&dr("shop", "r", "reviews", LAYERED));
    let v2 = Resolved::for_destination(&c, REVIEWS, "shop", Some("v2"), 9080).unwrap();
    let od = v2.outlier.unwrap();
    assert_eq!(od.consecutive_gateway, Some(2));
    assert_eq!(od.consecutive_5xx, Some(5), "Envoy's default, not the top level's 3");
    assert_eq!(v2.lb, LbPolicy::LeastRequest, "the default: the port entry names no loadBalancer");
    assert_eq!(v2.limits, Limits::default());
    // Another port: the subset has no entry and no fields, the top level applies.
    let v2_other = Resolved::for_destination(&c, REVIEWS, "shop", Some("v2"), 9999).unwrap();
    assert_eq!(v2_other.lb, LbPolicy::RoundRobin);
    assert_eq!(v2_other.limits.max_connections, 100);
}

#[test]
fn outlier_detection_as_istio_programs_envoy() {
    let od = |yaml: &str| {
        let c = config(&dr("shop", "r", "reviews", &format!("  trafficPolicy:\n    outlierDetection: {yaml}\n")));
        resolve(&c, REVIEWS, "shop").outlier.unwrap()
    };
    assert_eq!(od("{}"), OutlierConfig::default());
    assert_eq!(od("{consecutive5xxErrors: 0}").consecutive_5xx, None, "0 disables");
    let local = od("{consecutiveLocalOriginFailures: 4}");
    assert_eq!(local.consecutive_local_origin, None, "only with splitExternalLocalOriginErrors");
    let split = od("{splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 4}");
    assert!(split.split_local_origin);
    assert_eq!(split.consecutive_local_origin, Some(4));
    // The deprecated consecutiveErrors: gateway errors only, unless the new fields say.
    let old = od("{consecutiveErrors: 1}");
    assert_eq!((old.consecutive_gateway, old.consecutive_5xx), (Some(1), None));
    let both = od("{consecutiveErrors: 1, consecutive5xxErrors: 7, consecutiveGatewayErrors: 3}");
    assert_eq!((both.consecutive_gateway, both.consecutive_5xx), (Some(3), Some(7)));
    let long = od("{baseEjectionTime: 10m, minHealthPercent: 40}");
    assert_eq!(long.max_ejection_time, Duration::from_mins(10), "the cap is at least the base");
    assert_eq!(long.min_health_percent, 40);
}

#[test]
fn consistent_hash_keys_and_algorithms() {
    let lb = |yaml: &str| {
        let c = config(&dr(
            "shop",
            "r",
            "reviews",
            &format!("  trafficPolicy:\n    loadBalancer:\n      consistentHash: {yaml}\n"),
        ));
        resolve(&c, REVIEWS, "shop")
    };
    let hash = |yaml: &str| match lb(yaml).lb {
        LbPolicy::ConsistentHash(ch) => ch,
        other => panic!("{yaml}: {other:?}"),
    };
    assert_eq!(
        hash("{httpHeaderName: X-User}"),
        ConsistentHash {
            key: HashKey::Header(http::HeaderName::from_static("x-user")),
            algo: HashAlgo::RingHash { min_ring_size: 1024 }
        }
    );
    assert_eq!(hash("{useSourceIp: true, maglev: {}}").algo, HashAlgo::Maglev { table_size: 65537 });
    assert_eq!(hash("{useSourceIp: true, maglev: {tableSize: 251}}").algo, HashAlgo::Maglev { table_size: 251 });
    assert_eq!(
        hash("{useSourceIp: true, maglev: {tableSize: 5000011}}").algo,
        HashAlgo::Maglev { table_size: 5_000_011 }
    );
    assert_eq!(
        hash("{useSourceIp: true, ringHash: {minimumRingSize: 64}}").algo,
        HashAlgo::RingHash { min_ring_size: 64 }
    );
    assert_eq!(hash("{useSourceIp: true, minimumRingSize: 32}").algo, HashAlgo::RingHash { min_ring_size: 32 });
    assert_eq!(hash("{httpQueryParameterName: user}").key, HashKey::QueryParam("user".into()));
    assert_eq!(
        hash("{httpCookie: {name: session, path: /, ttl: 1h}}").key,
        HashKey::Cookie { name: "session".into(), path: Some("/".into()), ttl: Some(Duration::from_hours(1)) }
    );
    assert_eq!(hash("{httpCookie: {name: s}}").key, HashKey::Cookie { name: "s".into(), path: None, ttl: None });
    // What cannot be read falls back to the default algorithm, with the reason.
    for bad in [
        "{}",
        "{httpHeaderName: a, useSourceIp: true}",
        "{useSourceIp: true, maglev: {tableSize: 1000}}",
        // Primes, but over Envoy's limits: a table of gigabytes, built per request.
        "{useSourceIp: true, maglev: {tableSize: 1000000007}}",
        "{useSourceIp: true, maglev: {tableSize: 18446744073709551557}}",
        "{useSourceIp: true, ringHash: {minimumRingSize: 8388609}}",
        "{useSourceIp: true, minimumRingSize: 1000000000000}",
        "{httpCookie: {ttl: 1s}}",
        "{httpCookie: {name: \"a b\"}}",
        "{useSourceIp: true, ringHash: {}, maglev: {}}",
        "{httpHeaderName: \"bad header\"}",
        "{useSourceIp: true, surprise: 1}",
    ] {
        let r = lb(bad);
        assert_eq!(r.lb, LbPolicy::LeastRequest, "{bad}");
        assert_eq!(r.problems.len(), 1, "{bad}: {:?}", r.problems);
        assert!(r.problems[0].field.starts_with("loadBalancer.consistentHash"), "{:?}", r.problems);
        assert_eq!(r.problems[0].rule.to_string(), "shop/r");
    }
}

#[test]
fn simple_algorithms() {
    for (simple, want) in [
        ("ROUND_ROBIN", LbPolicy::RoundRobin),
        ("LEAST_REQUEST", LbPolicy::LeastRequest),
        ("LEAST_CONN", LbPolicy::LeastRequest),
        ("RANDOM", LbPolicy::Random),
        ("PASSTHROUGH", LbPolicy::RoundRobin),
        ("UNSPECIFIED", LbPolicy::LeastRequest),
    ] {
        let c =
            config(&dr("shop", "r", "reviews", &format!("  trafficPolicy:\n    loadBalancer: {{simple: {simple}}}\n")));
        assert_eq!(resolve(&c, REVIEWS, "shop").lb, want, "{simple}");
    }
}

#[test]
fn locality_settings_are_read() {
    let c = config(&dr(
        "shop",
        "r",
        "reviews",
        "  trafficPolicy:\n    loadBalancer:\n      localityLbSetting: {enabled: true, failover: [{from: a, to: b}]}\n",
    ));
    let r = resolve(&c, REVIEWS, "shop");
    assert_eq!(r.locality.unwrap().failover[0].to, "b");
    // Unset: Istio's mesh default, enabled; `enabled: false`: off.
    let c = config(&dr("shop", "r", "reviews", ""));
    assert_eq!(resolve(&c, REVIEWS, "shop").locality, Some(crate::balance::locality::LocalitySetting::default()));
    let c = config(&dr(
        "shop",
        "r",
        "reviews",
        "  trafficPolicy:\n    loadBalancer:\n      localityLbSetting: {enabled: false, failover: [{from: a, to: b}]}\n",
    ));
    assert_eq!(resolve(&c, REVIEWS, "shop").locality, None);
}

#[test]
fn service_entry_hosts_look_in_the_entry_namespace() {
    let se = "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: ext}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: TLS}]\n  resolution: DNS\n";
    let c = config(&[se.to_string(), dr("ext", "api", "api.example.com", "")].concat());
    assert_eq!(rule_of(&resolve(&c, "api.example.com", "waypoints")).as_deref(), Some("ext/api"));
}

#[test]
fn selectors_match_subsets_of_labels() {
    let labels = |pairs: &[(&str, &str)]| -> Labels { pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect() };
    assert!(selects(&labels(&[]), &labels(&[("app", "x")])));
    assert!(selects(&labels(&[("version", "v1")]), &labels(&[("app", "x"), ("version", "v1")])));
    assert!(!selects(&labels(&[("version", "v1")]), &labels(&[("version", "v2")])));
    assert!(!selects(&labels(&[("version", "v1")]), &labels(&[])));
}

#[test]
fn rules_with_a_workload_selector_are_for_sidecars() {
    let c = config(
        &[
            dr("waypoints", "selected", REVIEWS, "  workloadSelector:\n    matchLabels: {app: client}\n"),
            dr("shop", "svc", "reviews", ""),
        ]
        .concat(),
    );
    assert_eq!(rule_of(&resolve(&c, REVIEWS, "waypoints")).as_deref(), Some("shop/svc"));
}

/// `idleTimeout: 0s` turns the idle timeout off, as in Envoy; it does not mean
/// "close every connection once it is free".
#[test]
fn a_zero_idle_timeout_is_none() {
    let pool = "  trafficPolicy:\n    connectionPool:\n      http: {idleTimeout: 0s}\n";
    let r = resolve(&config(&dr("shop", "r", "reviews", pool)), REVIEWS, "shop");
    assert_eq!(r.limits.idle_timeout, Duration::MAX);
}
