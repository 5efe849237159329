use serde_json::json;

use super::*;

fn telemetry(namespace: &str, name: &str, spec: Value) -> Telemetry {
    let mut object = json!({"metadata": {"name": name, "namespace": namespace}});
    object["spec"] = spec;
    serde_json::from_value(object).unwrap()
}

fn labels() -> Labels {
    [("gateway.networking.k8s.io/gateway-name".to_string(), "waypoint".to_string())].into_iter().collect()
}

fn resolve_for(ts: &[Telemetry], service: Option<(&str, &str)>) -> Resolved {
    let l = labels();
    let subject = Subject {
        root_namespace: "istio-system",
        waypoint_namespace: "shop",
        waypoint_name: "waypoint",
        waypoint_labels: &l,
        service,
    };
    let defaults = Defaults { sampling_percent: 1.0, ..Defaults::default() };
    resolve(ts, &subject, &defaults)
}

fn mesh_tracing() -> Telemetry {
    telemetry(
        "istio-system",
        "mesh-default",
        json!({"tracing": [{"providers": [{"name": "otel"}], "randomSamplingPercentage": 10.0,
            "customTags": {"cluster": {"literal": {"value": "east"}}, "team": {"literal": {"value": "mesh"}}}}],
            "accessLogging": [{"providers": [{"name": "envoy"}]}]}),
    )
}

#[test]
fn nothing_configured_means_no_tracing_and_no_logs() {
    let r = resolve_for(&[], None);
    assert_eq!(r.effective.tracing, None);
    assert!(!r.effective.access_log.enabled);
    assert!(r.issues.is_empty());
}

#[test]
fn the_mesh_scope_applies_everywhere() {
    let r = resolve_for(&[mesh_tracing()], Some(("shop", "reviews")));
    let t = r.effective.tracing.unwrap();
    assert_eq!(t.provider, "otel");
    assert!((t.sampling_percent - 10.0).abs() < f64::EPSILON);
    assert_eq!(t.custom_tags["cluster"], CustomTag::Literal("east".into()));
    assert!(r.effective.access_log.enabled);
}

#[test]
fn namespace_then_workload_then_service_override_field_by_field() {
    let ns = telemetry(
        "shop",
        "ns",
        json!({"tracing": [{"randomSamplingPercentage": 50.0,
            "customTags": {"team": {"header": {"name": "X-Team", "defaultValue": "none"}}}}]}),
    );
    let gw = telemetry(
        "shop",
        "gw",
        json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
            "tracing": [{"disableSpanReporting": true}]}),
    );
    let svc = telemetry(
        "shop",
        "svc",
        json!({"targetRefs": [{"kind": "Service", "name": "reviews"}],
            "tracing": [{"randomSamplingPercentage": 100.0}]}),
    );
    let all = [svc.clone(), gw.clone(), ns.clone(), mesh_tracing()];
    let t = resolve_for(&all, Some(("shop", "reviews"))).effective.tracing.unwrap();
    assert_eq!(t.provider, "otel", "inherited from the mesh");
    assert!((t.sampling_percent - 100.0).abs() < f64::EPSILON, "the service scope wins");
    assert!(t.disabled, "from the workload (Gateway) scope");
    assert_eq!(t.custom_tags["team"], CustomTag::Header { name: "x-team".into(), default: Some("none".into()) });
    assert_eq!(t.custom_tags["cluster"], CustomTag::Literal("east".into()), "tags merge by key");

    // Another service: the Service-targeted Telemetry does not apply.
    let t = resolve_for(&all, Some(("shop", "ratings"))).effective.tracing.unwrap();
    assert!((t.sampling_percent - 50.0).abs() < f64::EPSILON);

    // Another namespace's Telemetry does not apply to this waypoint.
    let other = telemetry("other", "ns", json!({"tracing": [{"randomSamplingPercentage": 70.0}]}));
    let t = resolve_for(&[other, mesh_tracing()], None).effective.tracing.unwrap();
    assert!((t.sampling_percent - 10.0).abs() < f64::EPSILON);
}

#[test]
fn a_selector_matching_the_waypoint_is_workload_scope() {
    let sel = telemetry(
        "shop",
        "sel",
        json!({"selector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
            "tracing": [{"randomSamplingPercentage": 5.0}]}),
    );
    let ns = telemetry("shop", "a-ns", json!({"tracing": [{"randomSamplingPercentage": 50.0}]}));
    let t = resolve_for(&[sel, ns, mesh_tracing()], None).effective.tracing.unwrap();
    assert!((t.sampling_percent - 5.0).abs() < f64::EPSILON);
    let miss = telemetry(
        "shop",
        "sel",
        json!({"selector": {"matchLabels": {"app": "reviews"}}, "tracing": [{"randomSamplingPercentage": 5.0}]}),
    );
    let t = resolve_for(&[miss, mesh_tracing()], None).effective.tracing.unwrap();
    assert!((t.sampling_percent - 10.0).abs() < f64::EPSILON);
}

#[test]
fn two_at_one_scope_the_first_by_name_wins_and_the_other_is_reported() {
    let a = telemetry("shop", "a", json!({"tracing": [{"randomSamplingPercentage": 20.0}]}));
    let b = telemetry("shop", "b", json!({"tracing": [{"randomSamplingPercentage": 30.0}]}));
    let r = resolve_for(&[b, a, mesh_tracing()], None);
    assert!((r.effective.tracing.unwrap().sampling_percent - 20.0).abs() < f64::EPSILON);
    assert_eq!(
        r.issues,
        vec![TelemetryIssue::Shadowed { telemetry: "shop/b".into(), scope: "namespace", winner: "shop/a".into() }]
    );
}

#[test]
fn client_only_entries_do_not_apply_to_the_waypoint() {
    let t = telemetry(
        "shop",
        "ns",
        json!({"tracing": [{"match": {"mode": "CLIENT"}, "randomSamplingPercentage": 99.0},
            {"match": {"mode": "SERVER"}, "randomSamplingPercentage": 33.0}]}),
    );
    let tr = resolve_for(&[t, mesh_tracing()], None).effective.tracing.unwrap();
    assert!((tr.sampling_percent - 33.0).abs() < f64::EPSILON);
}

#[test]
fn access_logging_disable_and_filter_per_scope() {
    let ns = telemetry(
        "shop",
        "ns",
        json!({"accessLogging": [{"filter": {"expression": "response.code >= 400 || response.flags != 0"}}]}),
    );
    let r = resolve_for(&[ns.clone(), mesh_tracing()], None);
    let log = r.effective.access_log;
    assert!(log.enabled);
    let f = log.filter.unwrap();
    assert!(f.accepts(503, "-"));
    assert!(f.accepts(200, "UF"));
    assert!(!f.accepts(200, "-"));

    let off = telemetry(
        "shop",
        "gw",
        json!({"targetRefs": [{"kind": "Gateway", "name": "waypoint"}], "accessLogging": [{"disabled": true}]}),
    );
    assert!(!resolve_for(&[off, ns, mesh_tracing()], None).effective.access_log.enabled);
}

#[test]
fn an_unsupported_filter_is_reported_and_everything_is_logged() {
    let ns =
        telemetry("shop", "ns", json!({"accessLogging": [{"filter": {"expression": "request.headers['x'] == 'y'"}}]}));
    let r = resolve_for(&[ns, mesh_tracing()], None);
    assert!(r.effective.access_log.enabled);
    assert_eq!(r.effective.access_log.filter, None);
    assert!(matches!(&r.issues[0], TelemetryIssue::UnsupportedFilter { telemetry, .. } if telemetry == "shop/ns"));
    // A more specific unsupported filter also replaces an inherited supported one.
    let mesh = telemetry(
        "istio-system",
        "m",
        json!({"accessLogging": [{"providers": [{"name": "envoy"}], "filter": {"expression": "response.code >= 500"}}]}),
    );
    let ns = telemetry("shop", "ns", json!({"accessLogging": [{"filter": {"expression": "size(x) > 1"}}]}));
    assert_eq!(resolve_for(&[ns, mesh], None).effective.access_log.filter, None);
}

#[test]
fn the_filter_subset() {
    let f = LogFilter::parse("!(response.code == 200) && 500 > response.code").unwrap();
    assert!(f.accepts(404, "-"));
    assert!(!f.accepts(200, "-"));
    assert!(!f.accepts(503, "-"));
    let f = LogFilter::parse("response.flags == 0").unwrap();
    assert!(f.accepts(200, ""));
    assert!(!f.accepts(200, "RL"));
    for bad in [
        "response.code >= ",
        "response.code >= 400 &&",
        "response.flags == 2",
        "request.path == 1",
        "response.code >= '400'",
        "(response.code == 1",
        "response.code == 1 response.code == 2",
        "response.code == 99999999999999999999999",
    ] {
        assert!(LogFilter::parse(bad).is_err(), "{bad}");
    }
    assert!(LogFilter::parse(&"(".repeat(100)).is_err());
}

#[test]
fn metrics_overrides_apply_in_scope_order() {
    let mesh = telemetry(
        "istio-system",
        "m",
        json!({"metrics": [{"providers": [{"name": "prometheus"}], "overrides": [
            {"match": {"metric": "ALL_METRICS"}, "tagOverrides": {"request_protocol": {"operation": "REMOVE"}}},
            {"match": {"metric": "REQUEST_COUNT"}, "disabled": true}]}]}),
    );
    let ns = telemetry(
        "shop",
        "ns",
        json!({"metrics": [{"overrides": [
            {"match": {"metric": "REQUEST_COUNT", "mode": "SERVER"}, "disabled": false,
             "tagOverrides": {"team": {"value": "'blue'"}, "host": {"operation": "UPSERT", "value": "request.host"}}},
            {"match": {"metric": "REQUEST_DURATION", "mode": "CLIENT"}, "disabled": true},
            {"match": {"metric": "NOT_A_METRIC"}, "disabled": true}]}]}),
    );
    let r = resolve_for(&[ns, mesh], None);
    let m = &r.effective.metrics;
    assert_eq!(m.providers, vec!["prometheus".to_string()]);
    assert!(!m.disabled(&Metric::RequestCount), "the namespace re-enables it");
    assert!(!m.disabled(&Metric::RequestDuration), "a CLIENT override does not apply");
    let tags = m.tag_overrides(&Metric::RequestCount);
    assert_eq!(tags["request_protocol"], TagOverride::Remove);
    assert_eq!(tags["team"], TagOverride::Literal("blue".into()));
    assert_eq!(tags["host"], TagOverride::Expression("request.host".into()));
    assert!(!m.tag_overrides(&Metric::ResponseSize).contains_key("team"));
    assert!(
        matches!(&r.issues[0], TelemetryIssue::Invalid { path, .. } if path == "metrics[0].overrides[2].match.metric")
    );
}

#[test]
fn bad_values_are_reported_with_their_path() {
    let ns = telemetry("shop", "ns", json!({"tracing": [{"randomSamplingPercentage": 150}]}));
    let r = resolve_for(&[ns, mesh_tracing()], None);
    assert!((r.effective.tracing.unwrap().sampling_percent - 10.0).abs() < f64::EPSILON);
    assert_eq!(
        r.issues,
        vec![TelemetryIssue::Invalid {
            telemetry: "shop/ns".into(),
            path: "tracing[0].randomSamplingPercentage".into(),
            value: "150".into(),
            reason: "is not a number from 0 to 100",
        }]
    );
}

proptest::proptest! {
    #[test]
    fn filter_parsing_never_panics(s in "[ -~]{0,60}") {
        let _ = LogFilter::parse(&s);
    }

    #[test]
    fn code_comparisons_agree_with_integers(n in 0i64..1000, code in 0u16..1000) {
        for (op, f) in [(">=", i64::ge as fn(&i64, &i64) -> bool), ("<", i64::lt), ("==", i64::eq), ("!=", i64::ne)] {
            let filter = LogFilter::parse(&format!("response.code {op} {n}")).unwrap();
            proptest::prop_assert_eq!(filter.accepts(code, "-"), f(&i64::from(code), &n));
        }
    }
}
