//! The in-pod outbound listener (15001): accepts connections the kernel captured,
//! recovers where they were going and forwards them from inside the pod's network
//! namespace, so the destination sees the pod's own address.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant},
};

use mesh_common::{AF_INET, AF_INET6, OrigDst, OrigDstKey};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::{
    drain,
    enroll::Pod,
    hbone::{self, HboneError},
    mesh::Mesh,
    metrics::{Metrics, TcpLabels, flags},
    netns::NetnsError,
    own::OwnAddrs,
    redirect::Redirect,
    relay::{self, Counted},
    telemetry::{AccessLog, Active, Counters, Limits, Outcome, bump},
    workloads::Route,
};

/// What every outbound connection needs besides its pod.
pub struct Forwarder {
    pub redirect: Arc<Redirect>,
    pub counters: Arc<Counters>,
    pub connect_timeout: Duration,
    /// The secure data path; without a controller every destination is passthrough.
    pub mesh: Option<Arc<Mesh>>,
    /// Istio TCP metrics of outbound connections (exported only with a controller).
    pub metrics: Arc<Metrics>,
    /// The agent's own addresses: a destination that is one of its listeners is refused.
    pub own: Arc<OwnAddrs>,
    pub limits: Limits,
}

pub struct Outbound {
    listener: TcpListener,
    pod: Arc<Pod>,
    forwarder: Arc<Forwarder>,
    drain: drain::Watch,
}

impl Outbound {
    /// Serves `listener`, bound inside the pod's network namespace (or inherited from
    /// the agent this one took over from).
    pub fn new(
        listener: std::net::TcpListener,
        pod: Arc<Pod>,
        forwarder: Arc<Forwarder>,
        drain: drain::Watch,
    ) -> Result<Self, NetnsError> {
        let listener = pod.netns.tokio_listener(listener)?;
        Ok(Self { listener, pod, forwarder, drain })
    }

    pub async fn run(self) {
        let Self { listener, pod, forwarder, drain } = self;
        let watch = drain.clone();
        drain::accept_until_drained(listener, watch, &pod.spec.name, "outbound", |stream, peer| {
            let conn = Connection { pod: pod.clone(), forwarder: forwarder.clone(), _drain: drain.clone() };
            tokio::spawn(conn.forward(stream, peer));
        })
        .await;
    }
}

struct Connection {
    pod: Arc<Pod>,
    forwarder: Arc<Forwarder>,
    /// Held until the connection ends, so a drain waits for it.
    _drain: drain::Watch,
}

impl Connection {
    async fn forward(self, client: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let counters = [&*self.forwarder.counters, &self.pod.counters];
        bump(counters, |c| &c.accepted, 1);
        let key = OrigDstKey {
            netns_cookie: self.pod.netns_cookie,
            port: peer.port(),
            family: if peer.is_ipv6() { AF_INET6 } else { AF_INET },
            pad: 0,
        };
        let source_addr = self
            .pod
            .ips()
            .iter()
            .find(|ip| ip.is_ipv6() == peer.is_ipv6())
            .map_or(peer, |ip| SocketAddr::new(*ip, peer.port()));
        let mut log = AccessLog {
            direction: "outbound",
            src_workload: self.pod.spec.name.clone(),
            src_namespace: self.pod.spec.namespace.clone(),
            src_identity: self.forwarder.mesh.as_ref().map(|_| self.pod.identity().to_string()),
            src_addr: Some(source_addr),
            security: "none",
            ..AccessLog::default()
        };
        let Some(orig) = self.forwarder.redirect.take_orig_dst(&key) else {
            // Someone connected to 15001 directly, or the record aged out.
            bump(counters, |c| &c.no_orig_dst, 1);
            log.outcome = Some(Outcome::NoOriginalDestination);
            log.duration = start.elapsed();
            log.emit();
            return;
        };
        let dst = orig_dst_addr(&orig);
        log.dst_addr = Some(dst);
        let _ = client.set_nodelay(true);
        let refuse = |counter: fn(&Counters) -> &AtomicU64, outcome: Outcome, reason: String, mut log: AccessLog| {
            bump(counters, counter, 1);
            let _ = client.set_zero_linger();
            debug!(pod = %self.pod.spec.name, %dst, reason, "outbound connection refused");
            log.outcome = Some(outcome);
            log.reason = Some(reason);
            log.duration = start.elapsed();
            log.emit();
        };
        let meshed =
            |ip| self.forwarder.mesh.as_ref().is_some_and(|m| m.index().workload(ip).is_some_and(|w| w.meshed));
        if let Some(reason) = self.forwarder.limits.reached(&self.forwarder.counters, &self.pod.counters) {
            refuse(|c| &c.limited, Outcome::Limited, reason, log);
            return;
        }
        if self.forwarder.own.targets_agent(dst, meshed) {
            refuse(|c| &c.self_target, Outcome::SelfTarget, format!("{dst} is a listener of the mesh agent"), log);
            return;
        }

        let Some(mesh) = self.forwarder.mesh.clone() else {
            // No control plane: every destination is passthrough.
            let labels = Arc::new(TcpLabels {
                reporter: "source",
                connection_security_policy: "none",
                response_flags: flags::NONE,
                ..TcpLabels::default()
            });
            self.direct(client, dst, &labels, log, start).await;
            return;
        };
        if !mesh.has_view() {
            // Fail closed: without a view nobody can tell whether the destination is
            // meshed, and sending it in clear could be wrong.
            refuse(|c| &c.no_view, Outcome::NoView, "no view from the controller yet".into(), log);
            return;
        }
        let index = mesh.index();
        let source = index.workload_of(self.pod.ips()).cloned();
        let route = index.route(dst);
        // A service VIP resolves to another address: check that one too (the original
        // destination was checked above).
        if let Route::Tunnel { addr, .. } | Route::Direct { addr, .. } = &route
            && *addr != dst
            && self.forwarder.own.targets_agent(*addr, |ip| index.workload(ip).is_some_and(|w| w.meshed))
        {
            refuse(|c| &c.self_target, Outcome::SelfTarget, format!("{addr} is a listener of the mesh agent"), log);
            return;
        }
        match route {
            Route::Direct { addr, workload, service } => {
                log.dst_addr = Some(addr);
                log.dst_workload = workload.as_ref().map(|w| w.name.clone());
                log.dst_namespace = workload.as_ref().map(|w| w.namespace.clone());
                log.dst_service = service.as_ref().map(|s| s.hostname.clone());
                let labels = self.forwarder.metrics.intern(Mesh::outbound_labels(
                    &self.pod,
                    source.as_deref(),
                    workload.as_deref(),
                    service.as_deref(),
                    false,
                ));
                self.direct(client, addr, &labels, log, start).await;
            }
            Route::NoEndpoint { service } => {
                let labels = Mesh::outbound_labels(&self.pod, source.as_deref(), None, Some(&service), false);
                mesh.metrics.refused(&labels, flags::NO_HEALTHY_UPSTREAM);
                bump(counters, |c| &c.connect_failed, 1);
                let _ = client.set_zero_linger();
                log.dst_service = Some(service.hostname.clone());
                log.outcome = Some(Outcome::NoEndpoint);
                log.duration = start.elapsed();
                log.emit();
            }
            Route::Tunnel { workload, addr, service } => {
                log.dst_addr = Some(addr);
                log.dst_workload = Some(workload.name.clone());
                log.dst_namespace = Some(workload.namespace.clone());
                log.dst_identity = Some(workload.identity.clone());
                log.dst_service = service.as_ref().map(|s| s.hostname.clone());
                log.security = "mutual_tls";
                let labels =
                    Mesh::outbound_labels(&self.pod, source.as_deref(), Some(&workload), service.as_deref(), true);
                // Boxed: the TLS and HTTP/2 handshakes' state is large and needed only
                // while the tunnel is set up, not for the connection's whole life.
                let tunnel = Box::pin(async {
                    let cert = mesh
                        .certs
                        .get(&self.pod.identity())
                        .ok_or_else(|| HboneError::NoCertificate { identity: self.pod.identity().to_string() })?;
                    let baggage = format!(
                        "k8s.namespace.name={},k8s.pod.name={},service.name={},k8s.cluster.name=Kubernetes",
                        self.pod.spec.namespace,
                        self.pod.spec.name,
                        source.as_ref().map_or(self.pod.spec.name.as_str(), |w| w.app())
                    );
                    let request = || hbone::connect_request(addr, source_addr, &baggage);
                    let hbone_addr = SocketAddr::new(addr.ip(), hbone::HBONE_PORT);
                    mesh.pool.connect(&*self.pod, cert, hbone_addr, &workload.identity, request).await
                });
                let setup = Instant::now();
                let tunnel = tunnel.await;
                match tunnel {
                    Ok((upgraded, _stream)) => {
                        mesh.metrics.tunnel_setup.observe(setup.elapsed().as_secs_f64());
                        bump(counters, |c| &c.tunneled, 1);
                        let labels = self.forwarder.metrics.intern(labels);
                        self.relay(client, upgraded, &labels, &mut log).await;
                    }
                    Err(error) => {
                        debug!(pod = %self.pod.spec.name, %addr, %error, "tunnel failed");
                        let flag =
                            if error.outcome() == Outcome::Denied { flags::DENIED } else { flags::UPSTREAM_FAILURE };
                        mesh.metrics.refused(&labels, flag);
                        bump(counters, |c| &c.connect_failed, 1);
                        let _ = client.set_zero_linger();
                        log.outcome = Some(error.outcome());
                        log.reason = Some(error_chain(&error));
                    }
                }
                log.duration = start.elapsed();
                log.emit();
            }
        }
    }

    /// Passthrough: connects from inside the pod, so the destination sees the pod.
    async fn direct(
        self,
        client: TcpStream,
        dst: SocketAddr,
        labels: &Arc<TcpLabels>,
        mut log: AccessLog,
        start: Instant,
    ) {
        let counters = [&*self.forwarder.counters, &self.pod.counters];
        let upstream = match crate::deliver::connect_in(&self.pod, dst, self.forwarder.connect_timeout).await {
            Ok(upstream) => upstream,
            Err(error) => {
                debug!(pod = %self.pod.spec.name, %dst, %error, "upstream connect failed");
                bump(counters, |c| &c.connect_failed, 1);
                self.forwarder.metrics.refused(labels, flags::UPSTREAM_FAILURE);
                // Reset the client, as the destination would have done.
                let _ = client.set_zero_linger();
                log.outcome = Some(Outcome::ConnectFailed);
                log.reason = Some(error.to_string());
                log.duration = start.elapsed();
                log.emit();
                return;
            }
        };
        bump(counters, |c| &c.forwarded, 1);
        self.relay(client, upstream, labels, &mut log).await;
        log.duration = start.elapsed();
        log.emit();
    }

    /// Relays an established connection, with the active count, the metrics and the
    /// byte counters kept.
    async fn relay<U>(&self, client: TcpStream, upstream: U, labels: &Arc<TcpLabels>, log: &mut AccessLog)
    where
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let counters = [&*self.forwarder.counters, &self.pod.counters];
        let metrics = &self.forwarder.metrics;
        let active = Active::enter(counters);
        metrics.opened(labels);
        let report = relay::run(Counted::new(client), upstream, None, metrics, labels).await;
        metrics.closed(labels);
        drop(active);
        bump(counters, |c| &c.bytes_sent, report.sent);
        bump(counters, |c| &c.bytes_received, report.received);
        report.fill(log);
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

pub fn orig_dst_addr(orig: &OrigDst) -> SocketAddr {
    let ip = if orig.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]))
    } else {
        // A v4-mapped destination from an IPv6 socket is still an IPv6 connect.
        IpAddr::V6(Ipv6Addr::from(orig.addr))
    };
    SocketAddr::new(ip, orig.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_destination_decodes_both_families() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 98, 2, 11]);
        let v4 = OrigDst { addr, netns_cookie: 1, port: 8080, family: AF_INET, pad: 0 };
        assert_eq!(orig_dst_addr(&v4), "10.98.2.11:8080".parse().unwrap());
        let ip6: Ipv6Addr = "fd00:98:2::11".parse().unwrap();
        let v6 = OrigDst { addr: ip6.octets(), netns_cookie: 1, port: 80, family: AF_INET6, pad: 0 };
        assert_eq!(orig_dst_addr(&v6), "[fd00:98:2::11]:80".parse().unwrap());
    }
}
