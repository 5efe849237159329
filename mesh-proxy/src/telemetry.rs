//! Counters and access logs of the forwarding path.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use crate::{
    metrics::{Metrics, TcpLabels},
    relay::{self, Counted, Recheck, Report},
};

use serde::Serialize;

/// Connection counters, kept agent-wide and per pod.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub forwarded: AtomicU64,
    pub active: AtomicU64,
    pub connect_failed: AtomicU64,
    pub no_orig_dst: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub tunneled: AtomicU64,
    /// Captured connections delivered to another pod of this node without the tunnel.
    pub same_node: AtomicU64,
    pub inbound_accepted: AtomicU64,
    pub inbound_tls_failed: AtomicU64,
    pub inbound_bad_request: AtomicU64,
    pub denied: AtomicU64,
    pub plaintext_refused: AtomicU64,
    /// Captured connections refused because no view has been applied yet.
    pub no_view: AtomicU64,
    /// Connections refused because they targeted one of the agent's own listeners.
    pub self_target: AtomicU64,
    /// Connections refused at the per-pod or per-agent connection limit.
    pub limited: AtomicU64,
}

#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy, Default)]
pub struct CountersSnapshot {
    pub accepted: u64,
    pub forwarded: u64,
    pub active: u64,
    pub connect_failed: u64,
    pub no_orig_dst: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub tunneled: u64,
    pub same_node: u64,
    pub inbound_accepted: u64,
    pub inbound_tls_failed: u64,
    pub inbound_bad_request: u64,
    pub denied: u64,
    pub plaintext_refused: u64,
    pub no_view: u64,
    pub self_target: u64,
    pub limited: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            accepted: self.accepted.load(Relaxed),
            forwarded: self.forwarded.load(Relaxed),
            active: self.active.load(Relaxed),
            connect_failed: self.connect_failed.load(Relaxed),
            no_orig_dst: self.no_orig_dst.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            tunneled: self.tunneled.load(Relaxed),
            same_node: self.same_node.load(Relaxed),
            inbound_accepted: self.inbound_accepted.load(Relaxed),
            inbound_tls_failed: self.inbound_tls_failed.load(Relaxed),
            inbound_bad_request: self.inbound_bad_request.load(Relaxed),
            denied: self.denied.load(Relaxed),
            plaintext_refused: self.plaintext_refused.load(Relaxed),
            no_view: self.no_view.load(Relaxed),
            self_target: self.self_target.load(Relaxed),
            limited: self.limited.load(Relaxed),
        }
    }
}

/// Bumps the same counter in each of the given sets.
pub fn bump(sets: [&Counters; 2], field: Counter, by: u64) {
    for set in sets {
        field(set).fetch_add(by, Relaxed);
    }
}

/// Counts a connection as active (in each set) for as long as it is held.
pub struct Active<'a>([&'a Counters; 2]);

impl<'a> Active<'a> {
    pub fn enter(sets: [&'a Counters; 2]) -> Self {
        bump(sets, |c| &c.active, 1);
        Self(sets)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        for set in self.0 {
            set.active.fetch_sub(1, Relaxed);
        }
    }
}

/// Most connections relayed at once, per pod and for the whole agent. Beyond them a
/// new connection is refused (reset, or 503 on the tunnel), counted in `limited`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_pod: u64,
    pub per_agent: u64,
}

impl Limits {
    /// Why a new connection must be refused now, if it must.
    pub fn reached(&self, agent: &Counters, pod: &Counters) -> Option<String> {
        let (pod_active, agent_active) = (pod.active.load(Relaxed), agent.active.load(Relaxed));
        if pod_active >= self.per_pod {
            Some(format!("the pod has {pod_active} open connections, its limit (--max-connections-per-pod)"))
        } else if agent_active >= self.per_agent {
            Some(format!("the agent has {agent_active} open connections, its limit (--max-connections)"))
        } else {
            None
        }
    }
}

/// How a proxied connection ended, as written to the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Upstream refused, unreachable or timed out.
    ConnectFailed,
    /// The kernel left no record of where the connection was going.
    NoOriginalDestination,
    /// An I/O error after the connection was established.
    Reset,
    /// Refused (or closed) by an authorization policy.
    Denied,
    /// Plaintext to a workload whose `PeerAuthentication` is STRICT.
    PlaintextRefused,
    /// A service VIP without endpoints.
    NoEndpoint,
    /// The source pod has no workload certificate (yet).
    NoCertificate,
    /// The tunnel to the destination could not be set up (TLS, HTTP/2, peer status).
    TunnelFailed,
    /// A tunnel request that is not a valid CONNECT to this pod.
    BadRequest,
    /// No view applied yet: the destination cannot be told meshed or not.
    NoView,
    /// The destination is one of the agent's own listeners.
    SelfTarget,
    /// The pod's or the agent's connection limit was reached.
    Limited,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::ConnectFailed => "connect_failed",
            Self::NoOriginalDestination => "no_original_destination",
            Self::Reset => "reset",
            Self::Denied => "denied",
            Self::PlaintextRefused => "plaintext_refused",
            Self::NoEndpoint => "no_endpoint",
            Self::NoCertificate => "no_certificate",
            Self::TunnelFailed => "tunnel_failed",
            Self::BadRequest => "bad_request",
            Self::NoView => "no_view",
            Self::SelfTarget => "self_target",
            Self::Limited => "connection_limit",
        }
    }
}

/// One access-log event for one proxied connection.
#[derive(Debug, Default)]
pub struct AccessLog {
    /// `outbound` (captured on 15001), `inbound` (HBONE on 15008) or
    /// `inbound_plaintext` (captured on 15006).
    pub direction: &'static str,
    pub src_workload: String,
    pub src_namespace: String,
    pub src_identity: Option<String>,
    pub src_addr: Option<SocketAddr>,
    pub dst_workload: Option<String>,
    pub dst_namespace: Option<String>,
    pub dst_identity: Option<String>,
    pub dst_service: Option<String>,
    pub dst_addr: Option<SocketAddr>,
    /// `mutual_tls` or `none`.
    pub security: &'static str,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration: Duration,
    pub outcome: Option<Outcome>,
    pub reason: Option<String>,
}

impl AccessLog {
    pub fn emit(&self) {
        fn or_dash<T: ToString>(value: Option<&T>) -> String {
            value.map_or_else(|| "-".to_owned(), ToString::to_string)
        }
        tracing::info!(
            target: "access",
            direction = self.direction,
            src.workload = %self.src_workload,
            src.namespace = %self.src_namespace,
            src.identity = %or_dash(self.src_identity.as_ref()),
            src.addr = %or_dash(self.src_addr.as_ref()),
            dst.workload = %or_dash(self.dst_workload.as_ref()),
            dst.namespace = %or_dash(self.dst_namespace.as_ref()),
            dst.identity = %or_dash(self.dst_identity.as_ref()),
            dst.service = %or_dash(self.dst_service.as_ref()),
            dst.addr = %or_dash(self.dst_addr.as_ref()),
            security = self.security,
            bytes_sent = self.bytes_sent,
            bytes_received = self.bytes_received,
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            result = self.outcome.unwrap_or(Outcome::Completed).as_str(),
            reason = %self.reason.as_deref().unwrap_or("-"),
            "connection complete"
        );
    }
}

/// Picks one counter of a set.
pub type Counter = fn(&Counters) -> &AtomicU64;

/// One proxied connection's result, reported once: its counters, Istio's metrics and
/// its access log line are all written from here, and the line when the record is
/// dropped, whichever way the connection ended.
pub struct Record<'a> {
    pub log: AccessLog,
    counters: [&'a Counters; 2],
    metrics: &'a Metrics,
    labels: Option<Arc<TcpLabels>>,
    start: Instant,
}

impl<'a> Record<'a> {
    /// Starts the record of a connection just accepted.
    pub fn new(log: AccessLog, counters: [&'a Counters; 2], metrics: &'a Metrics) -> Self {
        Self { log, counters, metrics, labels: None, start: Instant::now() }
    }

    pub fn count(&self, counter: Counter) {
        bump(self.counters, counter, 1);
    }

    /// The connection's metric labels, once known.
    pub fn set_labels(&mut self, labels: Arc<TcpLabels>) {
        self.labels = Some(labels);
    }

    /// Ends a connection refused or failed before any byte moved: `counter` (if any)
    /// counts it; the metrics count it opened and closed with `flag` as its response
    /// flags once its labels are known; the log line gets `outcome` and `reason`.
    pub fn refuse(&mut self, counter: Option<Counter>, outcome: Outcome, flag: &'static str, reason: Option<String>) {
        if let Some(counter) = counter {
            self.count(counter);
        }
        if let Some(labels) = &self.labels {
            self.metrics.refused(labels, flag);
        }
        self.log.outcome = Some(outcome);
        self.log.reason = reason;
    }

    /// Relays an established connection (`client` is the side it came from) with its
    /// labels (set before), active for as long as it lasts.
    pub async fn relay<A: relay::Side, B: relay::Side>(
        &mut self,
        client: A,
        upstream: B,
        recheck: Option<Recheck>,
    ) -> Report {
        self.relay_reported(None, client, upstream, recheck).await
    }

    /// Relays a connection between two pods of this node, which the agent reports as
    /// both ends: this record is the source's, `destination` the destination's; both
    /// get the connection's bytes, metrics and active count.
    pub async fn relay_both<A: relay::Side, B: relay::Side>(
        &mut self,
        destination: &mut Record<'_>,
        client: A,
        upstream: B,
        recheck: Option<Recheck>,
    ) -> Report {
        self.relay_reported(Some(destination), client, upstream, recheck).await
    }

    async fn relay_reported<A: relay::Side, B: relay::Side>(
        &mut self,
        other: Option<&mut Record<'_>>,
        client: A,
        upstream: B,
        recheck: Option<Recheck>,
    ) -> Report {
        let labels = self.labels.clone().unwrap_or_default();
        // The other record's metrics, labels and counters (copied out: its log is
        // written at the end).
        let other_side = other.as_ref().map(|o| (o.metrics, o.labels.clone().unwrap_or_default(), o.counters));
        let (one, both);
        let series: &[(&Metrics, &Arc<TcpLabels>)] = if let Some((metrics, other_labels, _)) = &other_side {
            both = [(self.metrics, &labels), (*metrics, other_labels)];
            &both
        } else {
            one = [(self.metrics, &labels)];
            &one
        };
        let active =
            (Active::enter(self.counters), other_side.as_ref().map(|(_, _, counters)| Active::enter(*counters)));
        for (metrics, labels) in series {
            metrics.opened(labels);
        }
        let report = relay::run(Counted::new(client), upstream, recheck, series).await;
        drop(active);
        for (metrics, labels) in series {
            metrics.closed(labels);
        }
        for log in std::iter::once(&mut self.log).chain(other.map(|o| &mut o.log)) {
            log.bytes_sent = report.sent;
            log.bytes_received = report.received;
            if report.outcome.is_some() {
                log.outcome = report.outcome;
                log.reason.clone_from(&report.reason);
            }
        }
        report
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        self.log.duration = self.start.elapsed();
        self.log.emit();
    }
}

/// An error with its causes, for logs (`a: b: c`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
