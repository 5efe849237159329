use mesh_common::config::mesh::{DefaultProviders, Empty, FileAccessLog, OpenTelemetry};
use serde_json::json;

use super::*;
use crate::telemetry_api::{Resolved, Subject, resolve};

fn mesh(providers: Vec<ExtensionProvider>, defaults: Option<DefaultProviders>) -> MeshConfig {
    MeshConfig { extension_providers: providers, default_providers: defaults, ..MeshConfig::default() }
}

fn file_log(name: &str, path: &str) -> ExtensionProvider {
    ExtensionProvider {
        name: name.into(),
        envoy_file_access_log: Some(FileAccessLog { path: path.into(), log_format: None }),
        ..ExtensionProvider::default()
    }
}

fn otel(name: &str) -> ExtensionProvider {
    ExtensionProvider {
        name: name.into(),
        opentelemetry: Some(OpenTelemetry::default()),
        ..ExtensionProvider::default()
    }
}

/// Resolves one service-scoped Telemetry (or none) with the defaults of `mesh`.
fn resolved(spec: Option<serde_json::Value>, mesh: &MeshConfig) -> Resolved {
    let telemetries: Vec<mesh_common::config::Telemetry> = spec
        .into_iter()
        .map(|mut spec| {
            spec["targetRefs"] = json!([{"kind": "Service", "name": "reviews"}]);
            serde_json::from_value(json!({"metadata": {"name": "t", "namespace": "shop"}, "spec": spec})).unwrap()
        })
        .collect();
    let labels = mesh_common::config::meta::Labels::default();
    let subject = Subject {
        root_namespace: "istio-system",
        waypoint_namespace: "shop",
        waypoint_name: "waypoint",
        waypoint_labels: &labels,
        service: Some(("shop", "reviews")),
    };
    resolve(&telemetries, &subject, &Defaults::from_mesh(mesh))
}

fn plans(spec: Option<serde_json::Value>, mesh: &MeshConfig) -> (LogPlan, MetricPlan, Vec<ApplyIssue>) {
    let r = resolved(spec, mesh);
    assert!(r.issues.is_empty(), "{:?}", r.issues);
    let (log, mut issues) = LogPlan::new(&r.effective.access_log, mesh);
    let (metrics, more) = MetricPlan::new(&r.effective.metrics, mesh);
    issues.extend(more);
    (log, metrics, issues)
}

#[test]
fn with_nothing_configured_every_request_is_logged_and_counted() {
    let (log, metrics, issues) = plans(None, &MeshConfig::default());
    assert!(issues.is_empty(), "{issues:?}");
    for (code, flags) in [(200, "-"), (404, "-"), (503, "UH")] {
        assert!(log.logs(code, flags), "{code} {flags}");
    }
    assert_eq!(metrics, MetricPlan::default());
    assert!(!metrics.rewrites());
}

#[test]
fn mesh_default_providers_replace_the_builtin_ones() {
    let defaults = DefaultProviders { access_logging: vec!["otel".into()], ..DefaultProviders::default() };
    let m = mesh(vec![otel("otel")], Some(defaults));
    let (log, _, issues) = plans(None, &m);
    assert!(!log.logs(200, "-"), "an OpenTelemetry log provider does not write the stdout log");
    assert_eq!(
        issues,
        [ApplyIssue::UnsupportedProvider { block: "access log", provider: "otel".into(), kind: "opentelemetry" }]
    );
    let defaults = DefaultProviders { access_logging: vec!["stdout".into()], ..DefaultProviders::default() };
    let (log, _, issues) = plans(None, &mesh(vec![file_log("stdout", "/dev/stdout")], Some(defaults)));
    assert!(log.logs(200, "-"));
    assert!(issues.is_empty(), "{issues:?}");
}

#[test]
fn a_file_provider_elsewhere_than_stdout_still_logs_and_is_reported() {
    let m = mesh(vec![file_log("file", "/var/log/access.log")], None);
    let spec = json!({"accessLogging": [{"providers": [{"name": "file"}]}]});
    let (log, _, issues) = plans(Some(spec), &m);
    assert!(log.logs(200, "-"));
    assert_eq!(issues, [ApplyIssue::LogPathNotStdout { provider: "file".into(), path: "/var/log/access.log".into() }]);
}

#[test]
fn an_unknown_log_provider_logs_nothing() {
    let spec = json!({"accessLogging": [{"providers": [{"name": "nowhere"}]}]});
    let (log, _, issues) = plans(Some(spec), &MeshConfig::default());
    assert!(!log.logs(500, "-"));
    assert_eq!(issues, [ApplyIssue::UnknownProvider { block: "access log", provider: "nowhere".into() }]);
}

#[test]
fn disabled_access_logging_stops_the_log() {
    let spec = json!({"accessLogging": [{"disabled": true}]});
    let (log, _, _) = plans(Some(spec), &MeshConfig::default());
    assert!(!log.logs(200, "-"));
    assert!(!log.logs(500, "UF"));
}

#[test]
fn a_filter_logs_only_the_matching_requests() {
    let spec = json!({"accessLogging": [{"filter": {"expression": "response.code >= 400"}}]});
    let (log, _, _) = plans(Some(spec), &MeshConfig::default());
    assert!(!log.logs(200, "-"));
    assert!(!log.logs(302, "-"));
    assert!(log.logs(400, "-"));
    assert!(log.logs(503, "UH"));
}

#[test]
fn disabled_families_are_not_recorded() {
    let spec = json!({"metrics": [{"overrides": [
        {"match": {"metric": "REQUEST_DURATION"}, "disabled": true},
        {"match": {"metric": "RESPONSE_SIZE"}, "disabled": true}]}]});
    let (_, metrics, _) = plans(Some(spec), &MeshConfig::default());
    let recorded: Vec<_> = RequestFamily::ALL.iter().map(|f| metrics.family(*f).recorded).collect();
    assert_eq!(recorded, [true, false, true, false]);

    let spec = json!({"metrics": [{"overrides": [
        {"match": {"metric": "ALL_METRICS"}, "disabled": true},
        {"match": {"metric": "REQUEST_COUNT"}, "disabled": false}]}]});
    let (_, metrics, _) = plans(Some(spec), &MeshConfig::default());
    let recorded: Vec<_> = RequestFamily::ALL.iter().map(|f| metrics.family(*f).recorded).collect();
    assert_eq!(recorded, [true, false, false, false]);
}

#[test]
fn metrics_only_go_to_a_prometheus_provider() {
    let spec = json!({"metrics": [{"providers": [{"name": "otel"}]}]});
    let (_, metrics, issues) = plans(Some(spec), &mesh(vec![otel("otel")], None));
    assert!(RequestFamily::ALL.iter().all(|f| !metrics.family(*f).recorded));
    assert_eq!(
        issues,
        [ApplyIssue::UnsupportedProvider { block: "metrics", provider: "otel".into(), kind: "opentelemetry" }]
    );
    let prom = ExtensionProvider { name: "prom".into(), prometheus: Some(Empty {}), ..ExtensionProvider::default() };
    let spec = json!({"metrics": [{"providers": [{"name": "prom"}]}]});
    let (_, metrics, issues) = plans(Some(spec), &mesh(vec![prom], None));
    assert!(RequestFamily::ALL.iter().all(|f| metrics.family(*f).recorded));
    assert!(issues.is_empty());
}

#[test]
fn families_with_equal_overrides_share_one_rewrite() {
    let spec = json!({"metrics": [{"overrides": [
        {"tagOverrides": {"request_protocol": {"operation": "REMOVE"}}},
        {"match": {"metric": "REQUEST_COUNT"}, "tagOverrides": {"host": {"value": "request.host"}}}]}]});
    let (_, metrics, issues) = plans(Some(spec), &MeshConfig::default());
    assert!(issues.is_empty(), "{issues:?}");
    let rewrite = |f: RequestFamily| metrics.family(f).rewrite.clone().unwrap();
    let count = rewrite(RequestFamily::Count);
    assert_eq!(count.ops["host"], TagOp::Attribute(Attribute::Host));
    assert_eq!(count.ops["request_protocol"], TagOp::Remove);
    let duration = rewrite(RequestFamily::Duration);
    assert!(!duration.ops.contains_key("host"));
    assert!(!Arc::ptr_eq(&count, &duration));
    assert!(Arc::ptr_eq(&duration, &rewrite(RequestFamily::RequestSize)));
    assert!(Arc::ptr_eq(&duration, &rewrite(RequestFamily::ResponseSize)));
    assert!(metrics.rewrites());
}

#[test]
fn an_unsupported_expression_leaves_the_label_and_is_reported_once() {
    let spec = json!({"metrics": [{"overrides": [
        {"tagOverrides": {"destination_port": {"value": "upstream_peer.port + 1"},
            "team": {"value": "'payments'"}}}]}]});
    let (_, metrics, issues) = plans(Some(spec), &MeshConfig::default());
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert!(matches!(&issues[0], ApplyIssue::UnsupportedTagExpression { tag, .. } if tag == "destination_port"));
    let rewrite = metrics.family(RequestFamily::Count).rewrite.clone().unwrap();
    assert_eq!(rewrite.ops.keys().collect::<Vec<_>>(), ["team"]);
}

#[test]
fn a_tag_that_cannot_name_a_label_is_reported_and_skipped() {
    let spec = json!({"metrics": [{"overrides": [
        {"tagOverrides": {"request-host": {"value": "request.host"}, "__name": {"value": "'x'"},
            "ok_1": {"value": "'y'"}}}]}]});
    let (_, metrics, issues) = plans(Some(spec), &MeshConfig::default());
    assert_eq!(
        issues,
        [
            ApplyIssue::InvalidTagName { tag: "__name".into() },
            ApplyIssue::InvalidTagName { tag: "request-host".into() }
        ]
    );
    let rewrite = metrics.family(RequestFamily::Count).rewrite.clone().unwrap();
    assert_eq!(rewrite.ops.keys().collect::<Vec<_>>(), ["ok_1"]);
}

#[test]
fn attributes_parse_as_envoy_names_them() {
    for (text, attribute) in [
        ("request.host", Attribute::Host),
        (" request.method ", Attribute::Method),
        ("request.path", Attribute::Path),
        ("request.url_path", Attribute::UrlPath),
        ("request.headers['X-User']", Attribute::Header("x-user".into())),
        ("request.headers[\"x-user\"]", Attribute::Header("x-user".into())),
        ("request.useragent", Attribute::Header("user-agent".into())),
        ("string(destination.port)", Attribute::DestinationPort),
        ("string(response.code)", Attribute::ResponseCode),
    ] {
        assert_eq!(Attribute::parse(text), Ok(attribute), "{text}");
    }
    for text in ["request.headers[x-user]", "request.headers['']", "request.size", "source.workload", "1 + 1"] {
        assert!(Attribute::parse(text).is_err(), "{text}");
    }
}

#[test]
fn a_rewrite_removes_replaces_and_adds_labels_in_order() {
    let rewrite = TagRewrite {
        ops: [
            ("b".to_string(), TagOp::Remove),
            ("c".to_string(), TagOp::Literal("canary".into())),
            ("path".to_string(), TagOp::Attribute(Attribute::UrlPath)),
            ("user".to_string(), TagOp::Attribute(Attribute::Header("x-user".into()))),
            ("gone".to_string(), TagOp::Remove),
        ]
        .into_iter()
        .collect(),
    };
    let request = RequestAttributes {
        path: "/items?page=2".into(),
        headers: vec![("x-user".into(), "alice".into())],
        ..RequestAttributes::default()
    };
    let out = rewrite.apply(&[("a", "1"), ("b", "2"), ("c", "3")], &request);
    let out: Vec<(&str, &str)> = out.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(out, [("a", "1"), ("c", "canary"), ("path", "/items"), ("user", "alice")]);
}

#[test]
fn header_names_the_rewrites_read_are_listed_once() {
    let spec = json!({"metrics": [{"overrides": [
        {"tagOverrides": {"user": {"value": "request.headers['x-user']"}}},
        {"match": {"metric": "REQUEST_COUNT"}, "tagOverrides": {"agent": {"value": "request.useragent"}}}]}]});
    let (_, metrics, _) = plans(Some(spec), &MeshConfig::default());
    assert_eq!(metrics.headers(), ["user-agent", "x-user"]);
}

proptest::proptest! {
    /// Whatever the overrides, a removed label never appears, no label appears twice,
    /// and a standard label nobody overrides keeps its value.
    #[test]
    fn rewrites_keep_labels_unique_and_removed_ones_out(
        ops in proptest::collection::btree_map("[a-e]", proptest::option::of("[a-z]{0,3}"), 0..6),
    ) {
        let standard = [("a", "1"), ("b", "2"), ("c", "3")];
        let rewrite = TagRewrite {
            ops: ops
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().map_or(TagOp::Remove, TagOp::Literal)))
                .collect(),
        };
        let out = rewrite.apply(&standard, &RequestAttributes::default());
        let mut names: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        for (name, op) in &ops {
            proptest::prop_assert_eq!(names.contains(&name.as_str()), op.is_some(), "{}", name);
        }
        for (name, value) in standard {
            if !ops.contains_key(name) {
                proptest::prop_assert!(out.contains(&(name.to_string(), value.to_string())));
            }
        }
        let len = names.len();
        names.sort_unstable();
        names.dedup();
        proptest::prop_assert_eq!(names.len(), len);
    }
}

fn tcp_plan(spec: serde_json::Value, mesh: &MeshConfig) -> (TcpMetricPlan, Vec<ApplyIssue>) {
    let r = resolved(Some(spec), mesh);
    assert!(r.issues.is_empty(), "{:?}", r.issues);
    TcpMetricPlan::new(&r.effective.metrics, mesh)
}

#[test]
fn tcp_families_are_all_recorded_by_default() {
    let r = resolved(None, &MeshConfig::default());
    let (plan, issues) = TcpMetricPlan::new(&r.effective.metrics, &MeshConfig::default());
    assert_eq!(plan, TcpMetricPlan::default());
    assert!(issues.is_empty(), "{issues:?}");
}

#[test]
fn tcp_families_follow_disabled_overrides_by_name_and_all_metrics() {
    let spec = json!({"metrics": [{"overrides": [
        {"match": {"metric": "TCP_SENT_BYTES"}, "disabled": true},
        {"match": {"metric": "REQUEST_COUNT"}, "disabled": true}]}]});
    let (plan, _) = tcp_plan(spec, &MeshConfig::default());
    let recorded: Vec<_> = TcpFamily::ALL.iter().map(|f| plan.family(*f).recorded).collect();
    assert_eq!(recorded, [true, true, false, true], "a request family's override leaves the TCP ones");

    let spec = json!({"metrics": [{"overrides": [
        {"match": {"metric": "ALL_METRICS"}, "disabled": true},
        {"match": {"metric": "TCP_CLOSED_CONNECTIONS"}, "disabled": false}]}]});
    let (plan, _) = tcp_plan(spec, &MeshConfig::default());
    let recorded: Vec<_> = TcpFamily::ALL.iter().map(|f| plan.family(*f).recorded).collect();
    assert_eq!(recorded, [false, true, false, false]);

    let spec = json!({"metrics": [{"providers": [{"name": "otel"}]}]});
    let (plan, _) = tcp_plan(spec, &mesh(vec![otel("otel")], None));
    assert!(TcpFamily::ALL.iter().all(|f| !plan.family(*f).recorded), "no Prometheus provider, no TCP metric");
}

#[test]
fn tcp_tag_overrides_remove_and_upsert_l4_values_and_report_request_attributes() {
    let spec = json!({"metrics": [{"overrides": [
        {"match": {"metric": "TCP_OPENED_CONNECTIONS"}, "tagOverrides": {
            "source_principal": {"operation": "REMOVE"},
            "team": {"value": "'payments'"},
            "port": {"value": "destination.port"},
            "host": {"value": "request.host"}}}]}]});
    let (plan, issues) = tcp_plan(spec, &MeshConfig::default());
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert!(
        matches!(&issues[0], ApplyIssue::UnsupportedTagExpression { tag, expression, .. }
            if tag == "host" && expression == "request.host"),
        "{issues:?}"
    );
    assert!(plan.family(TcpFamily::Closed).rewrite.is_none(), "the override names one family");
    let rewrite = plan.family(TcpFamily::Opened).rewrite.clone().unwrap();
    let attrs = RequestAttributes { destination_port: 9000, ..RequestAttributes::default() };
    let labels = rewrite.apply(&[("reporter", "waypoint"), ("source_principal", "spiffe://x")], &attrs);
    assert_eq!(
        labels,
        [("reporter", "waypoint"), ("port", "9000"), ("team", "payments")].map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
}

#[test]
fn l4_expressions_are_the_connection_ones() {
    assert_eq!(Attribute::parse_l4("string(destination.port)"), Ok(Attribute::DestinationPort));
    for e in ["request.path", "response.code", "request.headers['x']", "source.ip"] {
        assert!(Attribute::parse_l4(e).is_err(), "{e}");
    }
}
