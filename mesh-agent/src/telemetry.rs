//! Counters and access logs of the forwarding path.
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
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
        }
    }
}

/// Bumps the same counter in each of the given sets.
pub fn bump(sets: [&Counters; 2], field: fn(&Counters) -> &AtomicU64, by: u64) {
    for set in sets {
        field(set).fetch_add(by, Relaxed);
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
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::ConnectFailed => "connect_failed",
            Self::NoOriginalDestination => "no_original_destination",
            Self::Reset => "reset",
        }
    }
}

/// One access-log event for one proxied connection.
pub struct AccessLog<'a> {
    pub pod: &'a str,
    pub namespace: &'a str,
    pub client: SocketAddr,
    pub destination: Option<SocketAddr>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration: Duration,
    pub outcome: Outcome,
}

impl AccessLog<'_> {
    pub fn emit(&self) {
        tracing::info!(
            target: "access",
            direction = "outbound",
            src.workload = self.pod,
            src.namespace = self.namespace,
            src.addr = %self.client,
            dst.addr = %self.destination.map_or_else(|| "-".to_owned(), |d| d.to_string()),
            bytes_sent = self.bytes_sent,
            bytes_received = self.bytes_received,
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            result = self.outcome.as_str(),
            "connection complete"
        );
    }
}
