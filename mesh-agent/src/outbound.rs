//! The in-pod outbound listener (15001): accepts connections the kernel captured,
//! recovers where they were going and forwards them from inside the pod's network
//! namespace, so the destination sees the pod's own address.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_common::{AF_INET, AF_INET6, OrigDst, OrigDstKey};
use tokio::net::TcpStream;
use tracing::{Instrument as _, debug};

use crate::{
    drain,
    enroll::Pod,
    hbone::{self, HboneError},
    mesh::Mesh,
    metrics::{Metrics, TcpLabels, flags},
    own::OwnAddrs,
    redirect::Redirect,
    relay::Report,
    telemetry::{AccessLog, Counter, Counters, Limits, Outcome, Record, bump},
    workloads::{Index, Route, Workload},
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

/// The outbound listeners of one pod (a group on each of `127.0.0.1:15001` and
/// `[::1]:15001`); each socket is served by [`Outbound::run`] on its own shard.
#[derive(Clone)]
pub struct Outbound {
    pod: Arc<Pod>,
    forwarder: Arc<Forwarder>,
    drain: drain::Watch,
}

impl Outbound {
    pub fn new(pod: Arc<Pod>, forwarder: Arc<Forwarder>, drain: drain::Watch) -> Self {
        Self { pod, forwarder, drain }
    }

    /// Serves `listener`, bound inside the pod's network namespace (or inherited from
    /// the agent this one took over from), on the runtime this runs on; with `spread`,
    /// handing each connection to the shards in turn.
    pub async fn run(self, listener: std::net::TcpListener, spread: bool) {
        let Self { pod, forwarder, drain } = self;
        let watch = drain.clone();
        drain::accept_until_drained(listener, watch, &pod.spec.name, "outbound", |stream, peer| {
            let conn = Connection { pod: pod.clone(), forwarder: forwarder.clone(), _drain: drain.clone() };
            let span = tracing::debug_span!("outbound", pod = %pod.spec.name, %peer);
            mesh_proxy::shard::serve(spread, stream, move |stream| conn.forward(stream, peer).instrument(span));
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
        let log = AccessLog {
            direction: "outbound",
            src_workload: self.pod.spec.name.clone(),
            src_namespace: self.pod.spec.namespace.clone(),
            src_identity: self.forwarder.mesh.as_ref().map(|_| self.pod.identity().to_string()),
            src_addr: Some(source_addr),
            security: "none",
            ..AccessLog::default()
        };
        let mut record = Record::new(log, counters, &self.forwarder.metrics);
        let Some(orig) = self.forwarder.redirect.take_orig_dst(&key) else {
            // Someone connected to 15001 directly, or the record aged out.
            return record.refuse(Some(|c| &c.no_orig_dst), Outcome::NoOriginalDestination, flags::NO_ROUTE, None);
        };
        let dst = orig_dst_addr(&orig);
        record.log.dst_addr = Some(dst);
        let _ = client.set_nodelay(true);
        let refused = |record: &mut Record, counter: Counter, outcome: Outcome, flag, reason: Option<String>| {
            self.refuse(record, &client, dst, counter, outcome, flag, reason);
        };
        let meshed =
            |ip| self.forwarder.mesh.as_ref().is_some_and(|m| m.index().workload(ip).is_some_and(|w| w.meshed));
        if let Some(reason) = self.forwarder.limits.reached(&self.forwarder.counters, &self.pod.counters) {
            return refused(&mut record, |c| &c.limited, Outcome::Limited, flags::OVERFLOW, Some(reason));
        }
        if self.forwarder.own.targets_agent(dst, meshed) {
            let reason = format!("{dst} is a listener of the mesh agent");
            return refused(&mut record, |c| &c.self_target, Outcome::SelfTarget, flags::NO_ROUTE, Some(reason));
        }

        let Some(mesh) = self.forwarder.mesh.clone() else {
            // No control plane: every destination is passthrough.
            record.set_labels(Arc::new(TcpLabels {
                reporter: "source",
                connection_security_policy: "none",
                response_flags: flags::NONE,
                ..TcpLabels::default()
            }));
            return self.direct(&mut record, client, dst).await;
        };
        if !mesh.has_view() {
            // Fail closed: without a view nobody can tell whether the destination is
            // meshed, and sending it in clear could be wrong.
            let reason = Some("no view from the controller yet".to_owned());
            return refused(&mut record, |c| &c.no_view, Outcome::NoView, flags::NO_ROUTE, reason);
        }
        let index = mesh.index();
        let source = index.workload_of(self.pod.ips()).cloned();
        // Why a service has no endpoint for this connection, when there is more to say.
        let mut why = None;
        let route = match index.route(dst, &self.pod.spec.namespace) {
            Route::Resolve { service, name } => {
                let (named, v6) = (&service.names[name], dst.ip().to_canonical().is_ipv6());
                match mesh.resolver.lookup(&named.host).await {
                    Ok(addrs) => match mesh.resolver.pick(&addrs, v6) {
                        Some(ip) => {
                            index.resolved(&service, name, SocketAddr::new(ip, named.port), &self.pod.spec.namespace)
                        }
                        None => Route::NoEndpoint { service },
                    },
                    // Another endpoint, one with an address, if the service has one.
                    Err(error) => {
                        why = Some(error_chain(&error));
                        Index::by_address(&service, v6)
                    }
                }
            }
            route => route,
        };
        // A service VIP resolves to another address: check that one too (the original
        // destination was checked above).
        if let Route::Tunnel { addr, .. } | Route::Direct { addr, .. } = &route
            && *addr != dst
            && self.forwarder.own.targets_agent(*addr, |ip| index.workload(ip).is_some_and(|w| w.meshed))
        {
            let reason = format!("{addr} is a listener of the mesh agent");
            return refused(&mut record, |c| &c.self_target, Outcome::SelfTarget, flags::NO_ROUTE, Some(reason));
        }
        match route {
            Route::Direct { addr, workload, service } => {
                record.log.dst_addr = Some(addr);
                record.log.dst_workload = workload.as_ref().map(|w| w.name.clone());
                record.log.dst_namespace = workload.as_ref().map(|w| w.namespace.clone());
                record.log.dst_service = service.as_ref().map(|s| s.hostname.clone());
                record.set_labels(self.forwarder.metrics.intern(Mesh::outbound_labels(
                    &self.pod,
                    source.as_deref(),
                    workload.as_deref(),
                    service.as_deref(),
                    false,
                )));
                self.direct(&mut record, client, addr).await;
            }
            // (`Resolve` was resolved above.)
            Route::NoEndpoint { service } | Route::Resolve { service, .. } => {
                record.log.dst_service = Some(service.hostname.clone());
                let labels = Mesh::outbound_labels(&self.pod, source.as_deref(), None, Some(&service), false);
                record.set_labels(self.forwarder.metrics.intern(labels));
                refused(&mut record, |c| &c.connect_failed, Outcome::NoEndpoint, flags::NO_HEALTHY_UPSTREAM, why);
            }
            Route::NoWaypoint { service } => {
                // Fail closed: the service's traffic must pass its waypoint.
                record.log.dst_service = Some(service.hostname.clone());
                let labels = Mesh::outbound_labels(&self.pod, source.as_deref(), None, Some(&service), true);
                record.set_labels(self.forwarder.metrics.intern(labels));
                let reason =
                    service.waypoint.as_ref().map(|w| format!("waypoint {}/{} has no ready pod", w.namespace, w.name));
                refused(&mut record, |c| &c.connect_failed, Outcome::NoEndpoint, flags::NO_HEALTHY_UPSTREAM, reason);
            }
            Route::Tunnel { workload, addr, hbone: hbone_addr, service } => {
                record.log.dst_addr = Some(addr);
                record.log.dst_workload = Some(workload.name.clone());
                record.log.dst_namespace = Some(workload.namespace.clone());
                record.log.dst_identity = Some(workload.identity.clone());
                record.log.dst_service = service.as_ref().map(|s| s.hostname.clone());
                record.log.security = "mutual_tls";
                let labels =
                    Mesh::outbound_labels(&self.pod, source.as_deref(), Some(&workload), service.as_deref(), true);
                record.set_labels(self.forwarder.metrics.intern(labels));
                // The caller as a tunnel's destination would see it: the pod's address
                // of the target's family (an IPv4-mapped connect from an IPv6 socket
                // arrives here from ::1 and goes to an IPv4 target).
                let caller = self.pod.ips().iter().find(|ip| ip.is_ipv6() == addr.is_ipv6());
                if let Some(caller) = caller
                    && let Some(pod) = mesh.same_node(&workload, addr, hbone_addr)
                {
                    let (source, caller) = (source.as_deref(), SocketAddr::new(*caller, peer.port()));
                    return self.same_node(&mut record, client, &mesh, &pod, source, caller, addr).await;
                }
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
                    mesh.pool.connect(&*self.pod, cert, hbone_addr, &workload.identity, request).await
                });
                let setup = Instant::now();
                match tunnel.await {
                    Ok((stream, _slot)) => {
                        mesh.metrics.tunnel_setup.observe(setup.elapsed().as_secs_f64());
                        record.count(|c| &c.tunneled);
                        self.relay(&mut record, client, stream).await;
                    }
                    Err(error) => {
                        debug!(pod = %self.pod.spec.name, %addr, %error, "tunnel failed");
                        let flag =
                            if error.outcome() == Outcome::Denied { flags::DENIED } else { flags::UPSTREAM_FAILURE };
                        refused(&mut record, |c| &c.connect_failed, error.outcome(), flag, Some(error_chain(&error)));
                    }
                }
            }
        }
    }

    /// Passthrough: connects from inside the pod, so the destination sees the pod.
    async fn direct(&self, record: &mut Record<'_>, client: TcpStream, dst: SocketAddr) {
        match crate::deliver::connect_in(&self.pod, dst, self.forwarder.connect_timeout).await {
            Ok(upstream) => {
                record.count(|c| &c.forwarded);
                self.relay(record, client, upstream).await;
            }
            Err(error) => {
                let reason = Some(error.to_string());
                let (outcome, flag) = (Outcome::ConnectFailed, flags::UPSTREAM_FAILURE);
                self.refuse(record, &client, dst, |c| &c.connect_failed, outcome, flag, reason);
            }
        }
    }

    /// A connection to another pod of this node, delivered without the tunnel (see
    /// [`Mesh::same_node`]): the checks the destination's end of a tunnel makes run
    /// here, and the agent reports the connection as both ends, as the two ends of a
    /// tunnel would (`reporter` source and destination).
    #[allow(clippy::too_many_arguments)]
    async fn same_node(
        &self,
        record: &mut Record<'_>,
        client: TcpStream,
        mesh: &Arc<Mesh>,
        pod: &Arc<Pod>,
        source: Option<&Workload>,
        caller: SocketAddr,
        target: SocketAddr,
    ) {
        record.log.security = SAME_NODE;
        let refuse = |record: &mut Record, outcome: Outcome, flag, reason: String| {
            self.refuse(record, &client, target, |c| &c.connect_failed, outcome, flag, Some(reason));
        };
        let identity = self.pod.identity();
        // What the tunnel's server checks of a client's identity.
        if !mesh.trusts(&identity) {
            let reason = format!("{identity} is outside the trust domain and its aliases");
            return refuse(record, Outcome::Denied, flags::DENIED, reason);
        }
        // A tunnel needs both ends' certificates; an identity the CA has not
        // certified gets no traffic this way either.
        if let Some(missing) = [&identity, &pod.identity()].into_iter().find(|id| mesh.certs.get(id).is_none()) {
            let reason = format!("no certificate for {missing} yet");
            return refuse(record, Outcome::NoCertificate, flags::UPSTREAM_FAILURE, reason);
        }
        if let Err(reason) = mesh_common::hbone::pod_target(target, pod.ips()) {
            return refuse(record, Outcome::BadRequest, flags::NO_ROUTE, reason);
        }
        let log = hbone::inbound_log(pod, source, &identity, caller, SAME_NODE);
        let mut inbound = Record::new(log, [&*mesh.counters, &pod.counters], &mesh.metrics);
        inbound.log.dst_addr = Some(target);
        inbound.set_labels(mesh.inbound_labels(pod, source, Some(&identity), "mutual_tls"));
        inbound.count(|c| &c.inbound_accepted);
        match hbone::admit(pod, mesh, &mut inbound, &identity, caller.ip(), target).await {
            Ok(upstream) => {
                record.count(|c| &c.same_node);
                let recheck = mesh.recheck(pod, Some(identity), caller.ip(), target);
                let report = record.relay_both(&mut inbound, client, upstream, Some(recheck)).await;
                self.count_bytes(&report);
            }
            Err(status) => {
                let (outcome, flag) = if status == http::StatusCode::UNAUTHORIZED {
                    (Outcome::Denied, flags::DENIED)
                } else {
                    (Outcome::ConnectFailed, flags::UPSTREAM_FAILURE)
                };
                let reason = inbound.log.reason.clone().unwrap_or_else(|| format!("refused by {}", pod.spec.name));
                refuse(record, outcome, flag, reason);
            }
        }
    }

    /// Relays an established connection; the bytes count in the agent's counters.
    async fn relay<U: mesh_proxy::relay::Side>(&self, record: &mut Record<'_>, client: TcpStream, upstream: U) {
        let report = record.relay(client, upstream, None).await;
        self.count_bytes(&report);
    }

    fn count_bytes(&self, report: &Report) {
        let counters = [&*self.forwarder.counters, &self.pod.counters];
        bump(counters, |c| &c.bytes_sent, report.sent);
        bump(counters, |c| &c.bytes_received, report.received);
    }

    /// Refuses a connection before any byte of it moved: the client gets a reset, as
    /// from the destination or a refused tunnel, and `record` counts and logs it.
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &self,
        record: &mut Record<'_>,
        client: &TcpStream,
        dst: SocketAddr,
        counter: Counter,
        outcome: Outcome,
        flag: &'static str,
        reason: Option<String>,
    ) {
        let _ = client.set_zero_linger();
        debug!(pod = %self.pod.spec.name, %dst, ?outcome, ?reason, "outbound connection refused");
        record.refuse(Some(counter), outcome, flag, reason);
    }
}

pub use mesh_proxy::telemetry::error_chain;

/// The access log's `security` of a connection between two pods of this node that
/// the agent delivered itself: identities checked as on the tunnel, no TLS, since no
/// byte of it leaves the two pods' network namespaces.
const SAME_NODE: &str = "same_node";

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
