//! The pod side of HBONE: a listener on 15008 inside every enrolled pod's network
//! namespace, served by the library's tunnel server with the pod's certificate; each
//! CONNECT is checked (target, limits, view, authorization policies) and delivered
//! to the pod's application from the caller's address.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use http::StatusCode;
use mesh_proxy::tunnel::server::{Connect, Handler, Server};
pub use mesh_proxy::tunnel::{HBONE_PORT, HboneError, connect_request};
use tokio::net::TcpListener;
use tracing::info;

use crate::{
    deliver, drain,
    enroll::Pod,
    identity::WorkloadCert,
    mesh::Mesh,
    metrics::flags,
    netns::NetnsError,
    relay::{self, Counted},
    telemetry::{AccessLog, Active, Outcome, bump},
};

/// The inbound tunnel listener of one pod (15008 in the pod's namespace).
pub struct Inbound {
    listener: TcpListener,
    server: Arc<Server<PodTunnel>>,
}

/// What the tunnel connections of one pod share. It does not hold the listener: a
/// pooled connection may outlive the pod's enrollment, and must not keep the port
/// bound.
pub struct PodTunnel {
    pod: Arc<Pod>,
    mesh: Arc<Mesh>,
    drain: drain::Watch,
}

impl Inbound {
    /// Serves `listener`, bound inside the pod's network namespace (or inherited).
    pub fn new(
        listener: std::net::TcpListener,
        pod: Arc<Pod>,
        mesh: Arc<Mesh>,
        drain: drain::Watch,
    ) -> Result<Self, NetnsError> {
        let listener = pod.netns.tokio_listener(listener)?;
        Ok(Self { listener, server: Server::new(Arc::new(PodTunnel { pod, mesh, drain })) })
    }

    pub async fn run(self) {
        let Self { listener, server } = self;
        let tunnel = server.handler().clone();
        drain::accept_until_drained(listener, tunnel.drain.clone(), &tunnel.pod.spec.name, "tunnel", |stream, peer| {
            // GOAWAY when the pod leaves or the agent drains: streams in flight finish,
            // the peer's pool opens new connections (to wherever the pod is now).
            let mut removed = tunnel.pod.removed.subscribe();
            let mut drain = tunnel.drain.clone();
            let shutdown = async move {
                tokio::select! {
                    _ = removed.wait_for(|removed| *removed) => {}
                    () = drain.signaled() => {}
                }
            };
            tokio::spawn(server.clone().serve(stream, peer, shutdown));
        })
        .await;
    }
}

impl Handler for PodTunnel {
    fn certificate(&self) -> Result<Arc<WorkloadCert>, HboneError> {
        let identity = self.pod.identity();
        self.mesh.certs.get(&identity).ok_or_else(|| HboneError::NoCertificate { identity: identity.to_string() })
    }

    fn trusts(&self, identity: &str) -> bool {
        self.mesh.trusts(identity)
    }

    fn refused(&self, peer: SocketAddr, reason: &str) {
        bump([&*self.mesh.counters, &self.pod.counters], |c| &c.inbound_tls_failed, 1);
        info!(pod = %self.pod.spec.name, %peer, reason, "tunnel connection refused");
    }

    async fn serve(self: Arc<Self>, connect: Connect) {
        self.handle(connect).await;
    }
}

impl PodTunnel {
    async fn handle(self: Arc<Self>, connect: Connect) {
        let _drain = self.drain.clone();
        let (identity, peer) = (connect.identity.clone(), connect.peer);
        let counters = [&*self.mesh.counters, &self.pod.counters];
        let start = Instant::now();
        bump(counters, |c| &c.inbound_accepted, 1);
        let source = self.mesh.index().workload(peer.ip()).cloned();
        let mut log = AccessLog {
            direction: "inbound",
            src_workload: source.as_ref().map_or_else(String::new, |w| w.name.clone()),
            src_namespace: source.as_ref().map_or_else(String::new, |w| w.namespace.clone()),
            src_identity: Some(identity.to_string()),
            src_addr: Some(peer),
            dst_workload: Some(self.pod.spec.name.clone()),
            dst_namespace: Some(self.pod.spec.namespace.clone()),
            dst_identity: Some(self.pod.identity().to_string()),
            security: "mutual_tls",
            ..AccessLog::default()
        };
        if !self.pod.enrolled() {
            // A stream that raced the GOAWAY of an un-enrolled pod.
            log.outcome = Some(Outcome::ConnectFailed);
            log.reason = Some("the pod is no longer enrolled".into());
            log.duration = start.elapsed();
            log.emit();
            return connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
        let target = match self.target(&connect) {
            Ok(target) => target,
            Err(reason) => {
                bump(counters, |c| &c.inbound_bad_request, 1);
                log.outcome = Some(Outcome::BadRequest);
                log.reason = Some(reason);
                log.duration = start.elapsed();
                log.emit();
                return connect.refuse(StatusCode::BAD_REQUEST);
            }
        };
        log.dst_addr = Some(target);
        let labels = self.mesh.inbound_labels(&self.pod, source.as_deref(), Some(&identity), "mutual_tls");
        if let Some(reason) = self.mesh.limits.reached(&self.mesh.counters, &self.pod.counters) {
            bump(counters, |c| &c.limited, 1);
            self.mesh.metrics.refused(&labels, flags::OVERFLOW);
            log.outcome = Some(Outcome::Limited);
            log.reason = Some(reason);
            log.duration = start.elapsed();
            log.emit();
            return connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
        if !self.mesh.has_view() {
            // No policies known: fail closed rather than authorize against nothing.
            bump(counters, |c| &c.no_view, 1);
            self.mesh.metrics.refused(&labels, flags::NO_ROUTE);
            log.outcome = Some(Outcome::NoView);
            log.duration = start.elapsed();
            log.emit();
            return connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
        if let Err(reason) = self.mesh.authorize(&self.pod, Some(&identity), peer.ip(), target) {
            bump(counters, |c| &c.denied, 1);
            self.mesh.metrics.refused(&labels, flags::DENIED);
            info!(pod = %self.pod.spec.name, %identity, %target, reason, "tunnel request denied");
            log.outcome = Some(Outcome::Denied);
            log.reason = Some(reason);
            log.duration = start.elapsed();
            log.emit();
            return connect.refuse(StatusCode::UNAUTHORIZED);
        }
        let upstream = match deliver::deliver(&self.pod, peer.ip(), target, self.mesh.connect_timeout).await {
            Ok(upstream) => upstream,
            Err(error) => {
                bump(counters, |c| &c.connect_failed, 1);
                self.mesh.metrics.refused(&labels, flags::UPSTREAM_FAILURE);
                log.outcome = Some(Outcome::ConnectFailed);
                log.reason = Some(error.to_string());
                log.duration = start.elapsed();
                log.emit();
                return connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
            }
        };
        // Answered 200: the connection counts as opened even if the client resets
        // the stream at once.
        let accepted = connect.accept();
        self.mesh.metrics.opened(&labels);
        match accepted {
            Ok(stream) => {
                let recheck = self.mesh.recheck(&self.pod, Some(identity), peer.ip(), target);
                let active = Active::enter(counters);
                // The client side is the tunnel: bytes read from it were sent by the client.
                let report =
                    relay::run(Counted::new(stream), upstream, Some(recheck), &self.mesh.metrics, &labels).await;
                drop(active);
                report.fill(&mut log);
            }
            Err(error) => {
                log.outcome = Some(Outcome::Reset);
                log.reason = Some(error.to_string());
            }
        }
        self.mesh.metrics.closed(&labels);
        log.duration = start.elapsed();
        log.emit();
    }

    /// The request's target: a CONNECT to one of this pod's addresses.
    fn target(&self, connect: &Connect) -> Result<SocketAddr, String> {
        mesh_common::hbone::connect_target(connect.request.method.as_str(), connect.authority(), self.pod.ips())
            .map_err(|reason| format!("{reason} (pod {})", self.pod.spec.name))
    }
}
