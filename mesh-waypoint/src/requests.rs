//! Request telemetry: Istio's standard request metrics with `reporter="waypoint"`
//! (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`) and one access-log event per
//! request. The Telemetry API decides, per service, which families are recorded and
//! how their labels are rewritten ([`MetricPlan`]), and whether the log line is written
//! (the caller asks its `LogPlan`).
//!
//! Connections relayed on TCP-routed ports are counted in Istio's TCP families
//! (`istio_tcp_*`, `reporter="waypoint"`), under the same Telemetry rules
//! ([`TcpMetricPlan`], [`TcpSeriesSet`]).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use mesh_proxy::metrics::{Metrics, TcpLabels, TcpSeries, cluster_of, encode_labels};
use mesh_waypoint::telemetry_api::apply::{
    MetricPlan, RequestAttributes, RequestFamily, TagRewrite, TcpFamily, TcpMetricPlan,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
};

/// Istio's buckets of `istio_request_duration_milliseconds`.
const DURATION_BUCKETS: [f64; 19] = [
    1.0,
    2.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10000.0,
    30000.0,
    60000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];
/// Istio's buckets of the request and response size histograms.
const SIZE_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100_000.0, 1e6, 1e7, 1e8, 1e9];

/// One label set of the request metrics; empty values are reported as `unknown`.
///
/// A series whose labels a Telemetry `tagOverrides` rewrites carries the rewritten
/// (name, value) list in `rewritten` and leaves every other field at its default, so
/// that series differing only in a removed label are one series.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    /// The source's canonical revision (`Workload::revision`).
    pub source_revision: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_revision: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// The `grpc-status` of a gRPC response, else empty.
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    /// The labels as a Telemetry rewrote them; when set, the only labels encoded.
    pub rewritten: Option<Arc<[(String, String)]>>,
}

impl RequestLabels {
    /// Istio's standard labels, `code` being the response code as text.
    fn pairs<'a>(&'a self, code: &'a str) -> [(&'static str, &'a str); 25] {
        // A request to a known service that found no workload is still in the cluster.
        let destination_namespace = if self.destination_workload_namespace.is_empty() {
            &self.destination_service_namespace
        } else {
            &self.destination_workload_namespace
        };
        [
            ("reporter", "waypoint"),
            ("source_workload", &self.source_workload),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("source_app", &self.source_app),
            ("source_version", &self.source_revision),
            ("source_canonical_service", &self.source_app),
            ("source_canonical_revision", &self.source_revision),
            ("source_cluster", cluster_of(&self.source_workload_namespace)),
            ("destination_workload", &self.destination_workload),
            ("destination_workload_namespace", &self.destination_workload_namespace),
            ("destination_principal", &self.destination_principal),
            ("destination_app", &self.destination_app),
            ("destination_version", &self.destination_revision),
            ("destination_canonical_service", &self.destination_app),
            ("destination_canonical_revision", &self.destination_revision),
            ("destination_cluster", cluster_of(destination_namespace)),
            ("destination_service", &self.destination_service),
            ("destination_service_name", &self.destination_service_name),
            ("destination_service_namespace", &self.destination_service_namespace),
            ("request_protocol", self.request_protocol),
            ("response_code", code),
            ("grpc_response_status", &self.grpc_response_status),
            ("response_flags", self.response_flags),
            ("connection_security_policy", "mutual_tls"),
        ]
    }

    /// The series key of a family whose labels `rewrite` changes.
    pub fn rewrite(&self, rewrite: &TagRewrite, request: &RequestAttributes) -> RequestLabels {
        let code = self.response_code.to_string();
        let labels = rewrite.apply(&self.pairs(&code), request);
        RequestLabels { rewritten: Some(labels.into()), ..RequestLabels::default() }
    }
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        if let Some(labels) = &self.rewritten {
            let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            return encode_labels(&pairs, encoder);
        }
        let code = self.response_code.to_string();
        encode_labels(&self.pairs(&code), encoder)
    }
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
}

impl RequestMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
        let request_bytes: HistogramFamily = Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS));
        let response_bytes: HistogramFamily = Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS));
        metrics.register("istio_requests", "Requests handled by the waypoint", requests.clone());
        metrics.register(
            "istio_request_duration_milliseconds",
            "Request duration, until the response's last byte",
            duration.clone(),
        );
        metrics.register("istio_request_bytes", "Request sizes (headers and body)", request_bytes.clone());
        metrics.register("istio_response_bytes", "Response sizes (headers and body)", response_bytes.clone());
        Self { requests, duration, request_bytes, response_bytes }
    }

    /// Records one request in the families `plan` keeps, under the labels it gives
    /// each. `request` is needed only when the plan rewrites labels
    /// ([`MetricPlan::rewrites`]); without it a rewrite reads empty attributes.
    pub fn record(
        &self,
        plan: &MetricPlan,
        labels: &RequestLabels,
        request: Option<&RequestAttributes>,
        sample: Sample,
    ) {
        // The labels of each distinct rewrite, computed once (families share rewrites).
        let mut rewritten: Vec<(&Arc<TagRewrite>, RequestLabels)> = Vec::new();
        let empty = RequestAttributes::default();
        for family in RequestFamily::ALL {
            let how = plan.family(family);
            if !how.recorded {
                continue;
            }
            let key = match &how.rewrite {
                None => labels,
                Some(rewrite) => {
                    let at = if let Some(at) = rewritten.iter().position(|(r, _)| Arc::ptr_eq(r, rewrite)) {
                        at
                    } else {
                        rewritten.push((rewrite, labels.rewrite(rewrite, request.unwrap_or(&empty))));
                        rewritten.len() - 1
                    };
                    &rewritten[at].1
                }
            };
            match family {
                RequestFamily::Count => {
                    self.requests.get_or_create(key).inc();
                }
                RequestFamily::Duration => {
                    self.duration.get_or_create(key).observe(sample.duration.as_secs_f64() * 1000.0);
                }
                RequestFamily::RequestSize => {
                    self.request_bytes.get_or_create(key).observe(sample.request_bytes as f64);
                }
                RequestFamily::ResponseSize => {
                    self.response_bytes.get_or_create(key).observe(sample.response_bytes as f64);
                }
            }
        }
    }
}

/// The series one relayed TCP connection reports in each TCP family, `None` where the
/// plan does not record the family. Computed once per connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSeriesSet([Option<TcpSeries>; 4]);

impl TcpSeriesSet {
    /// The series of a connection with Istio's `labels` to port `port` (what
    /// `destination.port` reads in a tag override), as `plan` says.
    pub fn new(metrics: &Metrics, plan: &TcpMetricPlan, labels: &TcpLabels, port: u16) -> Self {
        let attributes = RequestAttributes { destination_port: port, ..RequestAttributes::default() };
        let mut standard: Option<TcpSeries> = None;
        // One series per distinct rewrite (families share equal rewrites).
        let mut rewritten: Vec<(&Arc<TagRewrite>, TcpSeries)> = Vec::new();
        let series = TcpFamily::ALL.map(|family| {
            let how = plan.family(family);
            if !how.recorded {
                return None;
            }
            Some(match &how.rewrite {
                None => standard.get_or_insert_with(|| TcpSeries::Standard(metrics.intern(labels.clone()))).clone(),
                Some(rewrite) => {
                    if let Some((_, series)) = rewritten.iter().find(|(r, _)| Arc::ptr_eq(r, rewrite)) {
                        series.clone()
                    } else {
                        let series = TcpSeries::Rewritten(rewrite.apply(&labels.pairs(), &attributes).into());
                        rewritten.push((rewrite, series.clone()));
                        series
                    }
                }
            })
        });
        TcpSeriesSet(series)
    }

    /// Adds `by` to `family`, when recorded.
    pub fn add(&self, metrics: &Metrics, family: TcpFamily, by: u64) {
        if let Some(series) = &self.0[family as usize] {
            metrics.add(family, series, by);
        }
    }
}

/// What one request measured.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// One request's access-log event.
#[derive(Debug, Default)]
pub struct RequestLog {
    pub method: String,
    pub authority: String,
    pub path: String,
    pub protocol: &'static str,
    pub request_id: String,
    pub status: u16,
    pub flags: &'static str,
    pub route: String,
    pub upstream: Option<SocketAddr>,
    pub source_identity: String,
    pub source_addr: Option<SocketAddr>,
    pub destination_identity: String,
    pub destination_service: String,
    pub attempts: u32,
    /// Times the request went on another connection because its endpoint closed the
    /// pooled one it took, over all tries (not retries: see
    /// `mesh_waypoint_upstream_rq_resent_total`).
    pub resent: u32,
    pub reason: Option<String>,
}

impl RequestLog {
    pub fn emit(&self, duration: Duration, request_bytes: u64, response_bytes: u64) {
        fn or_dash<T: ToString>(value: Option<&T>) -> String {
            value.map_or_else(|| "-".to_owned(), ToString::to_string)
        }
        tracing::info!(
            target: "access",
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            protocol = self.protocol,
            request_id = %self.request_id,
            status = self.status,
            flags = self.flags,
            route = %self.route,
            upstream = %or_dash(self.upstream.as_ref()),
            src.identity = %self.source_identity,
            src.addr = %or_dash(self.source_addr.as_ref()),
            dst.identity = %if self.destination_identity.is_empty() { "-" } else { &self.destination_identity },
            dst.service = %self.destination_service,
            attempts = self.attempts,
            resent = self.resent,
            bytes_received = request_bytes,
            bytes_sent = response_bytes,
            duration_ms = duration.as_secs_f64() * 1000.0,
            reason = %self.reason.as_deref().unwrap_or("-"),
            "request complete"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_common::config::mesh::MeshConfig;
    use mesh_waypoint::telemetry_api::{Metric, MetricOverride, Metrics as Effective, TagOverride};

    use super::*;

    fn sample(ms: u64) -> Sample {
        Sample { duration: Duration::from_millis(ms), request_bytes: 10, response_bytes: 20 }
    }

    fn labels(code: u16, protocol: &'static str) -> RequestLabels {
        RequestLabels {
            source_workload: "web".into(),
            source_workload_namespace: "shop".into(),
            destination_service: "reviews.shop.svc.cluster.local".into(),
            destination_service_name: "reviews".into(),
            destination_service_namespace: "shop".into(),
            request_protocol: protocol,
            response_code: code,
            response_flags: "-",
            ..RequestLabels::default()
        }
    }

    /// The TCP families follow the plan: a disabled family gets nothing, a rewritten
    /// one its own labels, the others Istio's.
    #[test]
    fn tcp_series_follow_the_plan() {
        let overrides = vec![
            MetricOverride { metric: Metric::TcpReceivedBytes, disabled: Some(true), tags: BTreeMap::new() },
            MetricOverride {
                metric: Metric::TcpSentBytes,
                disabled: None,
                tags: BTreeMap::from([
                    ("source_workload".to_owned(), TagOverride::Remove),
                    ("port".to_owned(), TagOverride::Expression("destination.port".into())),
                ]),
            },
        ];
        let (plan, issues) =
            TcpMetricPlan::new(&Effective { providers: vec!["prometheus".into()], overrides }, &MeshConfig::default());
        assert!(issues.is_empty(), "{issues:?}");
        let metrics = Metrics::default();
        let labels = TcpLabels {
            reporter: "waypoint",
            source_workload: "web".into(),
            destination_service: "db.shop.svc.cluster.local".into(),
            connection_security_policy: "mutual_tls",
            response_flags: "-",
            ..TcpLabels::default()
        };
        let series = TcpSeriesSet::new(&metrics, &plan, &labels, 5432);
        for family in TcpFamily::ALL {
            series.add(&metrics, family, 3);
        }
        let (_, out) = metrics.render(None);
        let line = |name: &str| out.lines().find(|l| l.starts_with(name)).map(str::to_owned);
        let opened = line("istio_tcp_connections_opened_total{").expect("opened");
        assert!(opened.contains("source_workload=\"web\"") && opened.contains("reporter=\"waypoint\""), "{opened}");
        let sent = line("istio_tcp_sent_bytes_total{").expect("sent");
        assert!(!sent.contains("source_workload="), "{sent}");
        assert!(sent.contains("port=\"5432\"") && sent.ends_with(" 3"), "{sent}");
        assert_eq!(line("istio_tcp_received_bytes_total{"), None, "disabled: {out}");
    }

    /// The plan of these overrides, as the Telemetry API resolves them.
    fn plan(overrides: Vec<MetricOverride>) -> MetricPlan {
        let (plan, issues) =
            MetricPlan::new(&Effective { providers: vec!["prometheus".into()], overrides }, &MeshConfig::default());
        assert!(issues.is_empty(), "{issues:?}");
        plan
    }

    fn tags(metric: Metric, tags: &[(&str, TagOverride)]) -> MetricOverride {
        MetricOverride {
            metric,
            disabled: None,
            tags: tags.iter().map(|(k, v)| ((*k).to_string(), v.clone())).collect(),
        }
    }

    /// The rendered series of `family` (the lines that start with it and a brace).
    fn series<'a>(out: &'a str, family: &str) -> Vec<&'a str> {
        out.lines().filter(|l| l.starts_with(&format!("{family}{{"))).collect()
    }

    #[test]
    fn a_removed_label_is_absent_and_its_series_merge() {
        let metrics = Metrics::default();
        let requests = RequestMetrics::new(&metrics);
        let plan = plan(vec![tags(Metric::All, &[("request_protocol", TagOverride::Remove)])]);
        requests.record(&plan, &labels(200, "http"), None, sample(1));
        requests.record(&plan, &labels(200, "grpc"), None, sample(1));
        let (_, out) = metrics.render(None);
        let count = series(&out, "istio_requests_total");
        assert_eq!(count.len(), 1, "{out}");
        assert!(count[0].ends_with(" 2"), "{}", count[0]);
        assert!(!out.contains("request_protocol"), "{out}");
        assert!(count[0].contains("source_workload=\"web\""), "{}", count[0]);
        assert!(count[0].contains("response_code=\"200\""), "{}", count[0]);
    }

    #[test]
    fn upserts_set_and_add_labels_per_family() {
        let metrics = Metrics::default();
        let requests = RequestMetrics::new(&metrics);
        let plan = plan(vec![
            tags(Metric::All, &[("destination_service_name", TagOverride::Literal("canary".into()))]),
            tags(
                Metric::RequestCount,
                &[
                    ("request_host", TagOverride::Expression("request.host".into())),
                    ("user", TagOverride::Expression("request.headers['x-user']".into())),
                ],
            ),
        ]);
        let request = RequestAttributes {
            host: "reviews:9080".into(),
            headers: vec![("x-user".into(), "alice".into())],
            ..RequestAttributes::default()
        };
        requests.record(&plan, &labels(200, "http"), Some(&request), sample(1));
        let (_, out) = metrics.render(None);
        let count = series(&out, "istio_requests_total");
        assert_eq!(count.len(), 1, "{out}");
        for pair in ["destination_service_name=\"canary\"", "request_host=\"reviews:9080\"", "user=\"alice\""] {
            assert!(count[0].contains(pair), "{pair} missing: {}", count[0]);
        }
        // The added labels come after Istio's, in name order.
        assert!(count[0].find("connection_security_policy").unwrap() < count[0].find("request_host").unwrap());
        let bytes = series(&out, "istio_request_bytes_bucket");
        assert!(!bytes.is_empty(), "{out}");
        assert!(bytes.iter().all(|l| l.contains("destination_service_name=\"canary\"") && !l.contains("request_host")));
    }

    #[test]
    fn disabled_families_are_not_recorded() {
        let metrics = Metrics::default();
        let requests = RequestMetrics::new(&metrics);
        let off = |metric| MetricOverride { metric, disabled: Some(true), tags: BTreeMap::new() };
        let plan = plan(vec![off(Metric::RequestDuration), off(Metric::RequestSize)]);
        requests.record(&plan, &labels(200, "http"), None, sample(1));
        let (_, out) = metrics.render(None);
        assert_eq!(series(&out, "istio_requests_total").len(), 1, "{out}");
        assert!(series(&out, "istio_request_duration_milliseconds_bucket").is_empty(), "{out}");
        assert!(series(&out, "istio_request_bytes_bucket").is_empty(), "{out}");
        assert!(!series(&out, "istio_response_bytes_bucket").is_empty(), "{out}");
        let plan = MetricPlan::new(
            &Effective { providers: vec![], overrides: vec![off(Metric::All)] },
            &MeshConfig::default(),
        )
        .0;
        assert!(RequestFamily::ALL.iter().all(|f| !plan.family(*f).recorded));
    }

    /// The labels Kiali's graph needs: canonical revisions on both sides, and a real
    /// cluster wherever the namespace is known (also for a request no workload served).
    #[test]
    fn request_series_carry_revisions_and_clusters() {
        let metrics = Metrics::default();
        let requests = RequestMetrics::new(&metrics);
        let served = RequestLabels {
            source_workload: "web".into(),
            source_workload_namespace: "shop".into(),
            source_app: "web".into(),
            source_revision: "v1".into(),
            destination_workload: "httpbin-1".into(),
            destination_workload_namespace: "shop".into(),
            destination_app: "httpbin".into(),
            destination_revision: "latest".into(),
            destination_service: "httpbin.shop.svc.cluster.local".into(),
            destination_service_name: "httpbin".into(),
            destination_service_namespace: "shop".into(),
            request_protocol: "http",
            response_code: 404,
            response_flags: "-",
            ..RequestLabels::default()
        };
        let unserved = RequestLabels {
            destination_workload: String::new(),
            destination_workload_namespace: String::new(),
            destination_revision: String::new(),
            response_code: 503,
            response_flags: "UH",
            ..served.clone()
        };
        let plan = MetricPlan::default();
        requests.record(&plan, &served, None, sample(3));
        requests.record(&plan, &unserved, None, sample(1));
        let (_, out) = metrics.render(None);
        let line = |code: &str| {
            out.lines()
                .find(|l| l.starts_with("istio_requests_total{") && l.contains(&format!("response_code=\"{code}\"")))
                .unwrap_or_else(|| panic!("no {code} series in {out}"))
                .to_owned()
        };
        let served = line("404");
        for pair in [
            "reporter=\"waypoint\"",
            "source_canonical_revision=\"v1\"",
            "source_cluster=\"Kubernetes\"",
            "destination_canonical_revision=\"latest\"",
            "destination_cluster=\"Kubernetes\"",
            "destination_version=\"latest\"",
        ] {
            assert!(served.contains(pair), "{pair} missing: {served}");
        }
        let unserved = line("503");
        assert!(unserved.contains("destination_workload=\"unknown\""), "{unserved}");
        assert!(unserved.contains("destination_canonical_revision=\"unknown\""), "{unserved}");
        assert!(unserved.contains("destination_cluster=\"Kubernetes\""), "{unserved}");
    }
}
