//! Dashboards that work unchanged: Prometheus (Debian's package) scrapes the lab's
//! agents and waypoint, and the `PromQL` that Kiali's traffic graph and Istio's Grafana
//! dashboards issue, copied verbatim with only their variables filled in, returns the
//! lab's traffic with the labels those tools read.
//!
//! Sources of the query strings:
//! - Kiali: `kiali/kiali` `graph/telemetry/istio/istio.go` (commit 7545877), the
//!   namespace graph's queries for namespace `shop`, ambient traffic "total"
//!   (`util.GetReporter` gives `reporter=~"waypoint|<reporter>"`, `util.GetApp`
//!   nothing), 60 s window, idle edges hidden (`> 0`), wrapped in `round(…,0.001)` as
//!   `util.PromQuery` does. Kiali drops a series that lacks any of the canonical
//!   service/revision labels, or whose namespace is known but cluster `unknown`.
//! - Grafana: `istio/istio` `manifests/addons/dashboards/istio-workload-dashboard.json`
//!   (commit 0b5918e) and `istio-service-dashboard.json` (commit 1272e6d). `$qrep` is
//!   `waypoint` for HTTP (the reporter of L7 in ambient mode) and `destination` for
//!   TCP; `$__rate_interval` is `1m`.
use std::time::Duration;

use mesh_lab::{
    Lab,
    prometheus::{Prometheus, Sample},
    wait_for,
    waypoint::{HTTPBIN, HTTPBIN_URL, shop_pods, start_httpbin, waypoint_version},
};

use super::{controller_version, wait_agents_at, with_lab_spec};

const SERVICE: &str = "httpbin.shop.svc.cluster.local";
/// The HTTP client (node 1) and the L4 client/server pair (node 1 -> node 2).
const CLIENT: &str = "n1-p1";
const TCP_SERVER: &str = "n2-p2";

/// Kiali's `groupBy` for `istio_requests_total`.
const KIALI_HTTP_GROUP_BY: &str = "source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision,request_protocol,response_code,grpc_response_status,response_flags";
/// Kiali's `groupBy` for the TCP byte counters.
const KIALI_TCP_GROUP_BY: &str = "app,source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision,response_flags";
/// The labels without which Kiali's `populateTrafficMap` skips a series.
const KIALI_REQUIRED: [&str; 12] = [
    "source_workload_namespace",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_service_namespace",
    "destination_service",
    "destination_service_name",
    "destination_workload_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "response_flags",
];

fn apply(lab: &Lab, name: &str, yaml: &str) {
    let before = controller_version(lab);
    std::fs::write(lab.config_dir().join(name), yaml).unwrap();
    wait_for(Duration::from_secs(5), || controller_version(lab) > before).expect("controller applied the config");
    let version = controller_version(lab);
    wait_agents_at(lab, version);
    wait_for(Duration::from_secs(10), || waypoint_version(lab) >= version)
        .unwrap_or_else(|_| panic!("waypoint not at version {version}: {}", lab.log_of("waypoint")));
}

/// Polls `promql` until its result passes `check` (at most 20 s); the result, or a
/// panic with the last result and the check's complaint.
fn until(prom: &Prometheus, promql: &str, check: impl Fn(&[Sample]) -> Result<(), String>) -> Vec<Sample> {
    let mut last = (Vec::new(), String::new());
    let ok = wait_for(Duration::from_secs(20), || match prom.query(promql) {
        Ok(samples) => match check(&samples) {
            Ok(()) => {
                last = (samples, String::new());
                true
            }
            Err(why) => {
                last = (samples, why);
                false
            }
        },
        Err(e) => {
            last = (Vec::new(), format!("{e:#}"));
            false
        }
    });
    assert!(ok.is_ok(), "query {promql}\n  did not pass: {}\n  last result: {:#?}", last.1, last.0);
    last.0
}

fn nonempty(samples: &[Sample]) -> Result<(), String> {
    if samples.is_empty() { Err("no series".into()) } else { Ok(()) }
}

/// Every series carries the labels Kiali needs, and a known namespace comes with a
/// known cluster (Kiali's `IsBadSourceTelemetry` / `IsBadDestTelemetry`).
fn kiali_usable(samples: &[Sample]) -> Result<(), String> {
    nonempty(samples)?;
    for s in samples {
        if let Some(missing) = KIALI_REQUIRED.iter().find(|l| !s.labels.contains_key(**l)) {
            return Err(format!("series without {missing}: {:?}", s.labels));
        }
        for side in ["source", "destination"] {
            let namespace = if side == "source" {
                s.label("source_workload_namespace")
            } else {
                s.label("destination_service_namespace")
            };
            if namespace != "unknown" && s.label(&format!("{side}_cluster")) == "unknown" {
                return Err(format!("{side} namespace {namespace} with cluster unknown: {:?}", s.labels));
            }
        }
    }
    Ok(())
}

fn has(samples: &[Sample], labels: &[(&str, &str)]) -> bool {
    samples.iter().any(|s| labels.iter().all(|(k, v)| s.label(k) == *v))
}

#[test]
fn dashboards_kiali_and_istio_grafana_queries_return_the_labs_traffic() {
    let adjust = |spec: &mut mesh_lab::LabSpec| spec.waypoint_bin = Some(super::waypoint_bin());
    with_lab_spec("mesh-pd", 3, &[], Some(&[]), adjust, |lab| {
        start_httpbin(lab, &shop_pods(lab)).expect("httpbin");
        apply(lab, "httpbin.yaml", HTTPBIN);
        let prom = Prometheus::start(lab).expect("prometheus");
        prom.wait_targets_up(Duration::from_secs(15)).expect("targets up");

        // Traffic that keeps flowing while the queries run (the dashboards' irate
        // looks at the last two samples): HTTP through the waypoint with 200, 404
        // and 503 answers, and plain L4 pod to pod (HTTP to the echo port, which no
        // waypoint handles: only service traffic opted in).
        let http = format!(
            "while true; do for p in status/200 get status/404 status/503; do \
             curl -s -o /dev/null --max-time 5 {HTTPBIN_URL}/$p; done; sleep 0.05; done"
        );
        lab.spawn_in(CLIENT, "traffic-http", &["sh", "-c", &http]).unwrap();
        let tcp = format!(
            "while true; do curl -s -o /dev/null --max-time 5 http://{}:{}/; sleep 0.05; done",
            lab.pod(TCP_SERVER).ip4,
            mesh_lab::HTTP_PORT
        );
        lab.spawn_in(CLIENT, "traffic-tcp", &["sh", "-c", &tcp]).unwrap();

        // Kiali, namespace graph, query 2: incoming requests reported by the
        // waypoint (or a destination proxy).
        let incoming = until(
            &prom,
            &format!(
                "round(sum(rate(istio_requests_total{{reporter=~\"waypoint|destination\",destination_workload_namespace=\"shop\"}} [60s])) by ({KIALI_HTTP_GROUP_BY}) > 0,0.001)"
            ),
            |s| {
                kiali_usable(s)?;
                for code in ["200", "404", "503"] {
                    let want = [
                        ("source_workload", CLIENT),
                        ("source_workload_namespace", "shop"),
                        ("source_canonical_service", "echo"),
                        ("source_canonical_revision", "v1"),
                        ("source_cluster", "Kubernetes"),
                        ("destination_service", SERVICE),
                        ("destination_service_name", "httpbin"),
                        ("destination_service_namespace", "shop"),
                        ("destination_canonical_service", "echo"),
                        ("destination_cluster", "Kubernetes"),
                        ("request_protocol", "http"),
                        ("response_code", code),
                    ];
                    if !has(s, &want) {
                        return Err(format!("no series with {want:?}"));
                    }
                }
                Ok(())
            },
        );
        // A destination workload that answered the client, for the workload dashboard.
        let workload = incoming
            .iter()
            .find(|s| s.label("source_workload") == CLIENT && s.label("response_code") == "200")
            .map(|s| s.label("destination_workload").to_owned())
            .expect("a workload answered 200");
        assert!(lab.pods.iter().any(|p| p.name == workload), "destination_workload {workload} is not a lab pod");
        let revision = incoming.iter().find(|s| s.label("destination_workload") == workload).unwrap();
        assert!(["v1", "v2"].contains(&revision.label("destination_canonical_revision")), "{:?}", revision.labels);

        // Kiali, query 3: outgoing requests of the namespace's workloads.
        until(
            &prom,
            &format!(
                "round(sum(rate(istio_requests_total{{reporter=~\"waypoint|source\",source_workload_namespace=\"shop\"}} [60s])) by ({KIALI_HTTP_GROUP_BY}) > 0,0.001)"
            ),
            |s| {
                kiali_usable(s)?;
                if has(s, &[("source_workload", CLIENT), ("destination_service", SERVICE)]) {
                    Ok(())
                } else {
                    Err("no series from the client to httpbin".into())
                }
            },
        );

        // Kiali, TCP bytes ("total": both counters), incoming and outgoing.
        for metric in ["istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"] {
            for (reporter, side) in [("destination", "destination"), ("source", "source")] {
                until(
                    &prom,
                    &format!(
                        "round(sum(rate({metric}{{reporter=~\"waypoint|{reporter}\",{side}_workload_namespace=\"shop\"}} [60s])) by ({KIALI_TCP_GROUP_BY}) > 0,0.001)"
                    ),
                    |s| {
                        kiali_usable(s)?;
                        let want = [
                            ("source_workload", CLIENT),
                            ("destination_workload", TCP_SERVER),
                            ("destination_canonical_revision", "v2"),
                            ("app", "ztunnel"),
                        ];
                        if has(s, &want) { Ok(()) } else { Err(format!("no series with {want:?}")) }
                    },
                );
            }
        }

        // Istio's workload dashboard, $namespace=shop, $workload=the answering pod.
        let w = |q: &str| q.replace("$qrep", "waypoint").replace("$namespace", "shop").replace("$workload", &workload);
        let volume = w(
            "round(sum(irate(istio_requests_total{reporter=\"$qrep\",destination_workload_namespace=~\"$namespace\",destination_workload=~\"$workload\"}[5m])), 0.001)",
        );
        until(&prom, &volume, |s| match s {
            [one] if one.value > 0.0 => Ok(()),
            _ => Err("want one positive rate".into()),
        });
        let success = w(
            "sum(irate(istio_requests_total{reporter=\"$qrep\",destination_workload_namespace=~\"$namespace\",destination_workload=~\"$workload\",response_code!~\"5.*\"}[5m])) / sum(irate(istio_requests_total{reporter=\"$qrep\",destination_workload_namespace=~\"$namespace\",destination_workload=~\"$workload\"}[5m]))",
        );
        until(&prom, &success, |s| match s {
            // 503s are a quarter of the client's requests: some, not all, fail.
            [one] if one.value > 0.0 && one.value < 1.0 => Ok(()),
            _ => Err("want one success rate strictly between 0 and 1".into()),
        });
        for quantile in ["0.50", "0.90", "0.99"] {
            let duration = w(&format!(
                "(histogram_quantile({quantile}, sum(irate(istio_request_duration_milliseconds_bucket{{reporter=\"$qrep\",destination_workload=~\"$workload\", destination_workload_namespace=~\"$namespace\"}}[1m])) by (le)) / 1000) or histogram_quantile({quantile}, sum(irate(istio_request_duration_seconds_bucket{{reporter=\"$qrep\",destination_workload=~\"$workload\", destination_workload_namespace=~\"$namespace\"}}[1m])) by (le))"
            ));
            until(&prom, &duration, |s| match s {
                // Seconds; a lab request takes well under the 5 s curl timeout.
                [one] if one.value > 0.0 && one.value < 5.0 => Ok(()),
                _ => Err("want one duration in (0, 5) s".into()),
            });
        }
        // The mTLS split ("Incoming Request Size By Source", the 🔐mTLS series).
        let mtls = w(
            "histogram_quantile(0.50, sum(irate(istio_request_bytes_bucket{reporter=\"$qrep\", connection_security_policy=\"mutual_tls\", destination_workload=~\"$workload\", destination_workload_namespace=~\"$namespace\", source_workload=~\"$srcwl\", source_workload_namespace=~\"$srcns\"}[1m])) by (source_workload, source_workload_namespace, le))",
        )
        .replace("$srcwl", CLIENT)
        .replace("$srcns", "shop");
        until(&prom, &mtls, |s| {
            if has(s, &[("source_workload", CLIENT), ("source_workload_namespace", "shop")]) {
                Ok(())
            } else {
                Err(format!("no mTLS series from {CLIENT}"))
            }
        });
        // TCP server traffic of the L4 server, reported by its agent.
        let tcp_server = "sum(irate(istio_tcp_sent_bytes_total{reporter=\"$qrep\", destination_workload_namespace=~\"$namespace\", destination_workload=~\"$workload\"}[1m])) + sum(irate(istio_tcp_received_bytes_total{reporter=\"$qrep\", destination_workload_namespace=~\"$namespace\", destination_workload=~\"$workload\"}[1m]))"
            .replace("$qrep", "destination")
            .replace("$namespace", "shop")
            .replace("$workload", TCP_SERVER);
        until(&prom, &tcp_server, |s| match s {
            [one] if one.value > 0.0 => Ok(()),
            _ => Err("want one positive byte rate".into()),
        });
        // The agents report the L4 connection as mutual TLS.
        until(
            &prom,
            &format!(
                "sum by (connection_security_policy) (rate(istio_tcp_connections_opened_total{{reporter=\"destination\", destination_workload=\"{TCP_SERVER}\"}}[1m]))"
            ),
            |s| match s {
                [one] if one.label("connection_security_policy") == "mutual_tls" => Ok(()),
                _ => Err("want only mutual_tls".into()),
            },
        );

        // Istio's service dashboard, $service=httpbin, $qrep=waypoint.
        let s = |q: &str| q.replace("$qrep", "waypoint").replace("$service", SERVICE).replace("$__rate_interval", "1m");
        let client_volume = s(
            "round(sum(irate(istio_requests_total{reporter=~\"$qrep\",destination_service=\"$service\"}[$__rate_interval])), 0.001)",
        );
        until(&prom, &client_volume, |s| match s {
            [one] if one.value > 0.0 => Ok(()),
            _ => Err("want one positive rate".into()),
        });
        let client_success = s(
            "sum(irate(istio_requests_total{reporter=~\"$qrep\",destination_service=\"$service\",response_code!~\"5.*\"}[$__rate_interval])) / (sum(irate(istio_requests_total{reporter=~\"$qrep\",destination_service=\"$service\"}[$__rate_interval])) or on () vector(1))",
        );
        until(&prom, &client_success, |s| match s {
            [one] if one.value > 0.0 && one.value < 1.0 => Ok(()),
            _ => Err("want one success rate strictly between 0 and 1".into()),
        });
        let client_p99 = s(
            "(histogram_quantile(0.99, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~\"$qrep\",destination_service=\"$service\"}[$__rate_interval])) by (le)) / 1000) or histogram_quantile(0.99, sum(irate(istio_request_duration_seconds_bucket{reporter=~\"$qrep\",destination_service=\"$service\"}[$__rate_interval])) by (le))",
        );
        until(&prom, &client_p99, |s| match s {
            [one] if one.value > 0.0 && one.value < 5.0 => Ok(()),
            _ => Err("want one duration in (0, 5) s".into()),
        });

        // The queries of deploy/grafana/mesh-http-dashboard.json.
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../deploy/grafana/mesh-http-dashboard.json"))
                .expect("dashboard JSON");
        let vars = [
            ("$__rate_interval", "1m"),
            ("$__range", "1m"),
            ("$service", SERVICE),
            ("$source_workload", CLIENT),
            ("$destination_workload", ".+"),
            ("$namespace", "shop"),
        ];
        let mut checked = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let Some(expr) = target["expr"].as_str() else { continue };
                let expr = vars.iter().fold(expr.to_owned(), |e, (k, v)| e.replace(k, v));
                assert!(!expr.contains('$'), "unsubstituted variable in {expr}");
                until(&prom, &expr, nonempty);
                checked += 1;
            }
        }
        assert!(checked >= 8, "only {checked} queries in the HTTP dashboard");
    });
}
