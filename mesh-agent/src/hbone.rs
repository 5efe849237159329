//! The pod side of HBONE: a listener on 15008 inside every enrolled pod's network
//! namespace, served by the library's tunnel server with the pod's certificate; each
//! CONNECT is checked (target, limits, view, authorization policies) and delivered
//! to the pod's application from the caller's address.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::StatusCode;
use mesh_proxy::tunnel::server::{Connect, Handler, Server};
pub use mesh_proxy::tunnel::{HBONE_PORT, HboneError, connect_request};
use tokio::net::TcpStream;
use tracing::info;

use crate::{
    deliver, drain,
    enroll::Pod,
    identity::WorkloadCert,
    mesh::Mesh,
    metrics::flags,
    telemetry::{AccessLog, Outcome, Record, bump},
    workloads::Workload,
};

/// The inbound tunnel listeners of one pod (a group on 15008 in the pod's
/// namespace, per family); each socket is served by [`Inbound::run`] on its own shard.
#[derive(Clone)]
pub struct Inbound {
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
    pub fn new(pod: Arc<Pod>, mesh: Arc<Mesh>, drain: drain::Watch) -> Self {
        Self { server: Server::new(Arc::new(PodTunnel { pod, mesh, drain })) }
    }

    /// Serves `listener`, bound inside the pod's network namespace (or inherited), on
    /// the runtime this runs on; with `spread`, handing each connection to the shards
    /// in turn.
    pub async fn run(self, listener: std::net::TcpListener, spread: bool) {
        let Self { server } = self;
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
            let server = server.clone();
            mesh_proxy::shard::serve(spread, stream, move |stream| server.serve(stream, peer, shutdown));
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
        bump(counters, |c| &c.inbound_accepted, 1);
        let source = self.mesh.index().workload(peer.ip()).cloned();
        let log = inbound_log(&self.pod, source.as_deref(), &identity, peer, "mutual_tls");
        let mut record = Record::new(log, counters, &self.mesh.metrics);
        let target = match self.target(&connect) {
            Ok(target) => target,
            Err(reason) => {
                record.refuse(Some(|c| &c.inbound_bad_request), Outcome::BadRequest, flags::NONE, Some(reason));
                return connect.refuse(StatusCode::BAD_REQUEST);
            }
        };
        record.log.dst_addr = Some(target);
        record.set_labels(self.mesh.inbound_labels(&self.pod, source.as_deref(), Some(&identity), "mutual_tls"));
        let upstream = match admit(&self.pod, &self.mesh, &mut record, &identity, peer.ip(), target).await {
            Ok(upstream) => upstream,
            Err(status) => return connect.refuse(status),
        };
        match connect.accept() {
            Ok(stream) => {
                let recheck = self.mesh.recheck(&self.pod, Some(identity), peer.ip(), target);
                // The client side is the tunnel: bytes read from it were sent by the client.
                record.relay(stream, upstream, Some(recheck)).await;
            }
            // Answered 200 but gone: opened and closed at once.
            Err(error) => record.refuse(None, Outcome::Reset, flags::NONE, Some(error.to_string())),
        }
    }

    /// The request's target: a CONNECT to one of this pod's addresses.
    fn target(&self, connect: &Connect) -> Result<SocketAddr, String> {
        mesh_common::hbone::connect_target(connect.request.method.as_str(), connect.authority(), self.pod.ips())
            .map_err(|reason| format!("{reason} (pod {})", self.pod.spec.name))
    }
}

/// The access-log event of a connection to `pod` from `identity` at `peer`.
pub fn inbound_log(
    pod: &Pod,
    source: Option<&Workload>,
    identity: &str,
    peer: SocketAddr,
    security: &'static str,
) -> AccessLog {
    AccessLog {
        direction: "inbound",
        src_workload: source.map_or_else(String::new, |w| w.name.clone()),
        src_namespace: source.map_or_else(String::new, |w| w.namespace.clone()),
        src_identity: Some(identity.to_owned()),
        src_addr: Some(peer),
        dst_workload: Some(pod.spec.name.clone()),
        dst_namespace: Some(pod.spec.namespace.clone()),
        dst_identity: Some(pod.identity().to_string()),
        security,
        ..AccessLog::default()
    }
}

/// What the destination end checks of a connection from an authenticated `identity`
/// at `source_ip` to `target` in `pod`, then delivers it from the caller's address:
/// the pod is still enrolled, the connection limits, a view, the authorization
/// policies. A refusal is recorded in `record` and comes back as the status a
/// tunnel answers with.
pub async fn admit(
    pod: &Pod,
    mesh: &Mesh,
    record: &mut Record<'_>,
    identity: &str,
    source_ip: IpAddr,
    target: SocketAddr,
) -> Result<TcpStream, StatusCode> {
    if !pod.enrolled() {
        // A stream that raced the GOAWAY of an un-enrolled pod.
        let reason = "the pod is no longer enrolled".to_owned();
        record.refuse(None, Outcome::ConnectFailed, flags::NONE, Some(reason));
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    if let Some(reason) = mesh.limits.reached(&mesh.counters, &pod.counters) {
        record.refuse(Some(|c| &c.limited), Outcome::Limited, flags::OVERFLOW, Some(reason));
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    if !mesh.has_view() {
        // No policies known: fail closed rather than authorize against nothing.
        record.refuse(Some(|c| &c.no_view), Outcome::NoView, flags::NO_ROUTE, None);
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    if let Err(reason) = mesh.authorize(pod, Some(identity), source_ip, target) {
        info!(pod = %pod.spec.name, %identity, %target, reason, "tunnel request denied");
        record.refuse(Some(|c| &c.denied), Outcome::Denied, flags::DENIED, Some(reason));
        return Err(StatusCode::UNAUTHORIZED);
    }
    deliver::deliver(pod, source_ip, target, mesh.connect_timeout).await.map_err(|error| {
        let reason = Some(error.to_string());
        record.refuse(Some(|c| &c.connect_failed), Outcome::ConnectFailed, flags::UPSTREAM_FAILURE, reason);
        StatusCode::SERVICE_UNAVAILABLE
    })
}
