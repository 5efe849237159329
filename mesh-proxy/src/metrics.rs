//! Istio's standard TCP metrics, with Istio's names and labels so existing dashboards
//! work: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
};

/// One label set. `reporter` is `source` on the client's agent and `destination` on
/// the server's; unknown values are `unknown`, as in Istio.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
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

#[derive(Debug, Default, Clone, Copy)]
struct TcpCounts {
    opened: u64,
    closed: u64,
    sent: u64,
    received: u64,
}

/// A metric family: name, help, and the count it reports.
type Family = (&'static str, &'static str, fn(&TcpCounts) -> u64);

#[derive(Debug, Default)]
pub struct Metrics {
    tcp: Mutex<BTreeMap<Arc<TcpLabels>, TcpCounts>>,
}

impl Metrics {
    /// The shared copy of `labels` when a connection already reported them (most
    /// connections share their label set with many others), else a new one: a
    /// connection then holds one pointer, not a dozen strings of its own.
    pub fn intern(&self, labels: TcpLabels) -> Arc<TcpLabels> {
        let tcp = self.tcp.lock().expect("lock");
        tcp.get_key_value(&labels).map_or_else(|| Arc::new(labels), |(shared, _)| shared.clone())
    }

    pub fn opened(&self, labels: &Arc<TcpLabels>) {
        self.tcp.lock().expect("lock").entry(labels.clone()).or_default().opened += 1;
    }

    /// A connection refused or failed before any byte moved: opened and closed at
    /// once, under `labels` with `flag` as its response flags.
    pub fn refused(&self, labels: &TcpLabels, flag: &'static str) {
        let labels = Arc::new(TcpLabels { response_flags: flag, ..labels.clone() });
        self.opened(&labels);
        self.closed(&labels);
    }

    /// Adds bytes of a connection still open (long transfers report as they go).
    pub fn bytes(&self, labels: &Arc<TcpLabels>, sent: u64, received: u64) {
        let mut tcp = self.tcp.lock().expect("lock");
        let counts = tcp.entry(labels.clone()).or_default();
        counts.sent += sent;
        counts.received += received;
    }

    pub fn closed(&self, labels: &Arc<TcpLabels>) {
        self.tcp.lock().expect("lock").entry(labels.clone()).or_default().closed += 1;
    }

    /// Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let tcp = self.tcp.lock().expect("lock").clone();
        let families: [Family; 4] = [
            ("istio_tcp_connections_opened_total", "TCP connections opened.", |c| c.opened),
            ("istio_tcp_connections_closed_total", "TCP connections closed.", |c| c.closed),
            ("istio_tcp_sent_bytes_total", "Bytes sent by the client (request direction).", |c| c.sent),
            ("istio_tcp_received_bytes_total", "Bytes received by the client (response direction).", |c| c.received),
        ];
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (labels, counts) in &tcp {
                let _ = writeln!(out, "{name}{{{}}} {}", render_labels(labels), value(counts));
            }
        }
    }
}

fn render_labels(l: &TcpLabels) -> String {
    let pairs: [(&str, &str); 16] = [
        ("reporter", l.reporter),
        ("source_workload", &l.source_workload),
        ("source_workload_namespace", &l.source_workload_namespace),
        ("source_principal", &l.source_principal),
        ("source_app", &l.source_app),
        ("source_canonical_service", &l.source_app),
        ("destination_workload", &l.destination_workload),
        ("destination_workload_namespace", &l.destination_workload_namespace),
        ("destination_principal", &l.destination_principal),
        ("destination_app", &l.destination_app),
        ("destination_canonical_service", &l.destination_app),
        ("destination_service", &l.destination_service),
        ("destination_service_name", &l.destination_service_name),
        ("destination_service_namespace", &l.destination_service_namespace),
        ("connection_security_policy", l.connection_security_policy),
        ("response_flags", l.response_flags),
    ];
    let mut out = String::new();
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let value = if value.is_empty() { UNKNOWN } else { value };
        let _ = write!(out, "{key}=\"{}\"", escape(value));
    }
    out.push_str(",request_protocol=\"tcp\"");
    out
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
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
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(out.contains("# TYPE istio_tcp_sent_bytes_total counter"));
        assert!(out.contains("source_workload=\"web\\\"1\""), "{out}");
        assert!(out.contains("destination_workload=\"unknown\""));
        let sent = out.lines().find(|l| l.starts_with("istio_tcp_sent_bytes_total{")).unwrap();
        assert!(sent.ends_with(" 10"), "{sent}");
        let received = out.lines().find(|l| l.starts_with("istio_tcp_received_bytes_total{")).unwrap();
        assert!(received.ends_with(" 20"), "{received}");
    }
}
