//! Request telemetry: Istio's standard request metrics with `reporter="waypoint"`
//! (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`) and one access-log event per
//! request.
use std::{net::SocketAddr, time::Duration};

use mesh_proxy::metrics::{Metrics, cluster_of, encode_labels};
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
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let code = self.response_code.to_string();
        // A request to a known service that found no workload is still in the cluster.
        let destination_namespace = if self.destination_workload_namespace.is_empty() {
            &self.destination_service_namespace
        } else {
            &self.destination_workload_namespace
        };
        let pairs: [(&str, &str); 25] = [
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
            ("response_code", &code),
            ("grpc_response_status", &self.grpc_response_status),
            ("response_flags", self.response_flags),
            ("connection_security_policy", "mutual_tls"),
        ];
        encode_labels(&pairs, encoder)
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

    pub fn record(&self, labels: &RequestLabels, duration: Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes.get_or_create(labels).observe(request_bytes as f64);
        self.response_bytes.get_or_create(labels).observe(response_bytes as f64);
    }
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
    use super::*;

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
        requests.record(&served, Duration::from_millis(3), 10, 20);
        requests.record(&unserved, Duration::from_millis(1), 10, 0);
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
