//! Istio's standard TCP metrics, with Istio's names and labels so existing dashboards
//! work: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`.
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// One label set. `reporter` is `source` on the client's agent and `destination` on
/// the server's; unknown values are `unknown`, as in Istio.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    /// The source's canonical revision ([`crate::workloads::Workload::revision`]).
    pub source_revision: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_revision: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
    /// Envoy-style flags, see [`flags`]: `-` (none), `UF` (upstream connect failure),
    /// `UH` (no healthy upstream), `RBAC` (denied by policy), `PA` (plaintext refused).
    pub response_flags: &'static str,
}

/// Response flags used by the agent.
pub mod flags {
    pub const NONE: &str = "-";
    /// Upstream connection failure.
    pub const UPSTREAM_FAILURE: &str = "UF";
    /// No healthy upstream (a service without endpoints).
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    /// Refused by authorization policy (Envoy's "RBAC access denied").
    pub const DENIED: &str = "RBAC";
    /// Refused by `PeerAuthentication` STRICT (plaintext to a strict workload).
    pub const PLAINTEXT_REFUSED: &str = "PA";
    /// Upstream overflow: a connection limit was reached.
    pub const OVERFLOW: &str = "UO";
    /// No route: no view yet, or a destination that is one of the agent's listeners.
    pub const NO_ROUTE: &str = "NR";
}

pub const UNKNOWN: &str = "unknown";

/// The cluster every workload is reported in (`source_cluster`, `destination_cluster`):
/// Istio's default cluster ID. Kiali drops series whose namespace is known but whose
/// cluster is `unknown`, so a known workload must carry a real cluster name.
pub const CLUSTER: &str = "Kubernetes";

/// The cluster of a workload whose namespace is `namespace`: [`CLUSTER`] when the
/// workload is known, else empty (reported as `unknown`).
pub fn cluster_of(namespace: &str) -> &'static str {
    if namespace.is_empty() || namespace == UNKNOWN { "" } else { CLUSTER }
}

/// A label value as the text formats want it (the encoder writes values as given).
pub fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n").into()
    } else {
        value.into()
    }
}

impl TcpLabels {
    /// Istio's labels in order, with the canonical-service labels Istio derives from
    /// `app` and `request_protocol="tcp"`; empty values are reported as `unknown`.
    pub fn pairs(&self) -> [(&'static str, &str); 23] {
        // A request to a known service that found no workload is still in the cluster.
        let destination_namespace = if self.destination_workload_namespace.is_empty() {
            &self.destination_service_namespace
        } else {
            &self.destination_workload_namespace
        };
        [
            ("reporter", self.reporter),
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
            ("connection_security_policy", self.connection_security_policy),
            ("response_flags", self.response_flags),
            ("request_protocol", "tcp"),
        ]
    }
}

/// Istio's labels ([`TcpLabels::pairs`]).
impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_labels(&self.pairs(), encoder)
    }
}

/// Writes label pairs, empty values as `unknown` (Istio's convention).
pub fn encode_labels(pairs: &[(&str, &str)], encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
    for (key, value) in pairs {
        let value = if value.is_empty() { UNKNOWN } else { value };
        (*key, escape(value).as_ref()).encode(encoder.encode_label())?;
    }
    Ok(())
}

/// One series of the TCP families: Istio's label set, shared by the connections that
/// report it, or the labels as a Telemetry `tagOverrides` rewrote them (the waypoint's;
/// then these are the only labels, so that series differing only in a removed label
/// are one series).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TcpSeries {
    Standard(Arc<TcpLabels>),
    Rewritten(Arc<[(String, String)]>),
}

impl EncodeLabelSet for TcpSeries {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match self {
            TcpSeries::Standard(labels) => labels.encode(encoder),
            TcpSeries::Rewritten(pairs) => {
                let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                encode_labels(&pairs, encoder)
            }
        }
    }
}

/// Istio's four TCP families (the discriminant indexes per-family tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpFamily {
    /// `istio_tcp_connections_opened_total`.
    Opened = 0,
    /// `istio_tcp_connections_closed_total`.
    Closed = 1,
    /// `istio_tcp_sent_bytes_total`.
    Sent = 2,
    /// `istio_tcp_received_bytes_total`.
    Received = 3,
}

impl TcpFamily {
    pub const ALL: [TcpFamily; 4] = [TcpFamily::Opened, TcpFamily::Closed, TcpFamily::Sent, TcpFamily::Received];
}

type TcpCounters = Family<TcpSeries, Counter>;

/// The agent's (or waypoint's) metrics: Istio's TCP families, tunnel setup times, and
/// whatever collectors the process registers (read at scrape time).
pub struct Metrics {
    registry: Mutex<Registry>,
    opened: TcpCounters,
    closed: TcpCounters,
    sent: TcpCounters,
    received: TcpCounters,
    /// How long outbound tunnel streams took to set up (pooled or new connection).
    pub tunnel_setup: Histogram,
    /// Label sets in use, shared by the connections that report them.
    interned: Mutex<HashSet<Arc<TcpLabels>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let families = [
            ("istio_tcp_connections_opened", "TCP connections opened"),
            ("istio_tcp_connections_closed", "TCP connections closed"),
            ("istio_tcp_sent_bytes", "Bytes sent by the client (request direction)"),
            ("istio_tcp_received_bytes", "Bytes received by the client (response direction)"),
        ]
        .map(|(name, help)| {
            let family = TcpCounters::default();
            registry.register(name, help, family.clone());
            family
        });
        let [opened, closed, sent, received] = families;
        // 100 us .. ~1.6 s: a pooled stream takes a round trip, a new connection a
        // TLS handshake on top.
        let tunnel_setup = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "mesh_agent_tunnel_setup_duration_seconds",
            "Time to open an outbound tunnel stream, until the peer answered",
            tunnel_setup.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            opened,
            closed,
            sent,
            received,
            tunnel_setup,
            interned: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Adds a metric family of the process's own (the waypoint's request metrics).
    pub fn register(&self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        self.registry.lock().expect("lock").register(name, help, metric);
    }

    /// Adds metrics read at scrape time.
    pub fn register_collector(&self, collector: impl Collector) {
        self.registry.lock().expect("lock").register_collector(Box::new(collector));
    }

    /// The shared copy of `labels` when a connection already reported them (most
    /// connections share their label set with many others), else a new one: a
    /// connection then holds one pointer, not a dozen strings of its own.
    pub fn intern(&self, labels: TcpLabels) -> Arc<TcpLabels> {
        let mut interned = self.interned.lock().expect("lock");
        if let Some(shared) = interned.get(&labels) {
            return shared.clone();
        }
        let shared = Arc::new(labels);
        interned.insert(shared.clone());
        shared
    }

    pub fn opened(&self, labels: &Arc<TcpLabels>) {
        self.opened.get_or_create(&TcpSeries::Standard(labels.clone())).inc();
    }

    /// A connection refused or failed before any byte moved: opened and closed at
    /// once, under `labels` with `flag` as its response flags.
    pub fn refused(&self, labels: &TcpLabels, flag: &'static str) {
        let labels = self.intern(TcpLabels { response_flags: flag, ..labels.clone() });
        self.opened(&labels);
        self.closed(&labels);
    }

    /// Adds bytes of a connection still open (long transfers report as they go).
    pub fn bytes(&self, labels: &Arc<TcpLabels>, sent: u64, received: u64) {
        if sent > 0 {
            self.sent.get_or_create(&TcpSeries::Standard(labels.clone())).inc_by(sent);
        }
        if received > 0 {
            self.received.get_or_create(&TcpSeries::Standard(labels.clone())).inc_by(received);
        }
    }

    pub fn closed(&self, labels: &Arc<TcpLabels>) {
        self.closed.get_or_create(&TcpSeries::Standard(labels.clone())).inc();
    }

    /// Adds `by` to one family's series (the waypoint's, which records each family
    /// under the labels its Telemetry plan gives it); nothing when `by` is 0.
    pub fn add(&self, family: TcpFamily, series: &TcpSeries, by: u64) {
        if by == 0 {
            return;
        }
        let family = match family {
            TcpFamily::Opened => &self.opened,
            TcpFamily::Closed => &self.closed,
            TcpFamily::Sent => &self.sent,
            TcpFamily::Received => &self.received,
        };
        family.get_or_create(series).inc_by(by);
    }

    /// Every metric, in the format the scraper asked for (see [`exposition`]).
    pub fn render(&self, accept: Option<&str>) -> (&'static str, String) {
        exposition::encode(&self.registry.lock().expect("lock"), accept)
    }
}

pub mod exposition {
    //! Metrics as a scraper wants them: Prometheus asks for the `OpenMetrics` format, tools such
    //! as curl and promtool read the classic text format.
    use prometheus_client::registry::Registry;

    pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

    /// `registry` in `OpenMetrics` text when `accept` asks for it, else in the
    /// Prometheus text format; with its content type.
    pub fn encode(registry: &Registry, accept: Option<&str>) -> (&'static str, String) {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String");
        if accept.is_some_and(|accept| accept.contains("application/openmetrics-text")) {
            (OPENMETRICS, out)
        } else {
            (PROMETHEUS_TEXT, to_prometheus_text(&out))
        }
    }

    /// `OpenMetrics` text as Prometheus text 0.0.4: a counter's HELP and TYPE name it
    /// with its `_total` suffix; no UNIT lines and no `# EOF`.
    pub fn to_prometheus_text(openmetrics: &str) -> String {
        let counters: std::collections::HashSet<&str> =
            openmetrics.lines().filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
        let mut out = String::with_capacity(openmetrics.len());
        for line in openmetrics.lines() {
            if line == "# EOF" || line.starts_with("# UNIT ") {
                continue;
            }
            let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
                let rest = line.strip_prefix(prefix)?;
                let (name, tail) = rest.split_once(' ')?;
                counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
            });
            match renamed {
                Some(line) => out.push_str(&line),
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_escaped_labels() {
        let metrics = Metrics::default();
        let labels = Arc::new(TcpLabels {
            reporter: "source",
            source_workload: "web\"1".into(),
            connection_security_policy: "mutual_tls",
            response_flags: flags::NONE,
            ..TcpLabels::default()
        });
        metrics.opened(&labels);
        metrics.bytes(&labels, 10, 20);
        metrics.closed(&labels);
        let (content_type, out) = metrics.render(None);
        assert_eq!(content_type, exposition::PROMETHEUS_TEXT);
        assert!(out.contains("# TYPE istio_tcp_sent_bytes_total counter"), "{out}");
        assert!(!out.contains("# EOF"));
        assert!(out.contains("source_workload=\"web\\\"1\""), "{out}");
        assert!(out.contains("destination_workload=\"unknown\""));
        let sent = out.lines().find(|l| l.starts_with("istio_tcp_sent_bytes_total{")).unwrap();
        assert!(sent.ends_with(" 10"), "{sent}");
        let received = out.lines().find(|l| l.starts_with("istio_tcp_received_bytes_total{")).unwrap();
        assert!(received.ends_with(" 20"), "{received}");
        let (content_type, open) = metrics.render(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"));
        assert_eq!(content_type, exposition::OPENMETRICS);
        assert!(open.contains("# TYPE istio_tcp_sent_bytes counter") && open.ends_with("# EOF\n"), "{open}");
        // The histogram is there from the start, empty.
        assert!(out.contains("mesh_agent_tunnel_setup_duration_seconds_count 0"), "{out}");
    }

    /// A rewritten series carries exactly its pairs, in the family it was added to.
    #[test]
    fn rewritten_series_are_encoded_as_given() {
        let metrics = Metrics::default();
        let series = TcpSeries::Rewritten(
            vec![("reporter".to_owned(), "waypoint".to_owned()), ("team".to_owned(), String::new())].into(),
        );
        metrics.add(TcpFamily::Sent, &series, 7);
        metrics.add(TcpFamily::Opened, &series, 0);
        let (_, out) = metrics.render(None);
        assert!(out.contains("istio_tcp_sent_bytes_total{reporter=\"waypoint\",team=\"unknown\"} 7"), "{out}");
        assert!(!out.lines().any(|l| l.starts_with("istio_tcp_connections_opened_total{")), "{out}");
    }

    /// Kiali skips series without the canonical revision labels, and those whose
    /// namespace is known but whose cluster is `unknown`.
    #[test]
    fn labels_carry_revisions_and_the_cluster_of_known_workloads() {
        let metrics = Metrics::default();
        let known = Arc::new(TcpLabels {
            reporter: "destination",
            source_workload: "web".into(),
            source_workload_namespace: "shop".into(),
            source_revision: "v1".into(),
            destination_workload: "db".into(),
            destination_workload_namespace: "data".into(),
            destination_revision: "latest".into(),
            connection_security_policy: "mutual_tls",
            response_flags: flags::NONE,
            ..TcpLabels::default()
        });
        let service_only = Arc::new(TcpLabels {
            reporter: "source",
            destination_service_namespace: "shop".into(),
            response_flags: flags::NO_HEALTHY_UPSTREAM,
            ..TcpLabels::default()
        });
        metrics.opened(&known);
        metrics.opened(&service_only);
        let (_, out) = metrics.render(None);
        let line = |reporter: &str| {
            out.lines()
                .find(|l| l.starts_with("istio_tcp_connections_opened_total{") && l.contains(reporter))
                .unwrap_or_else(|| panic!("no {reporter} line in {out}"))
                .to_owned()
        };
        let known = line("reporter=\"destination\"");
        for pair in [
            "source_canonical_revision=\"v1\"",
            "source_version=\"v1\"",
            "source_cluster=\"Kubernetes\"",
            "destination_canonical_revision=\"latest\"",
            "destination_version=\"latest\"",
            "destination_cluster=\"Kubernetes\"",
        ] {
            assert!(known.contains(pair), "{pair} missing: {known}");
        }
        let unknown = line("reporter=\"source\"");
        assert!(unknown.contains("source_cluster=\"unknown\""), "{unknown}");
        assert!(unknown.contains("source_canonical_revision=\"unknown\""), "{unknown}");
        // No workload, but a known service namespace: still in the cluster.
        assert!(unknown.contains("destination_cluster=\"Kubernetes\""), "{unknown}");
    }
}
