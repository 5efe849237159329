//! The in-pod plaintext listener (15006): the kernel's `sk_lookup` program hands it
//! every plaintext TCP connection addressed to the pod (except the tunnel port and
//! exempt ports). `PeerAuthentication` decides: STRICT refuses, PERMISSIVE applies the
//! L4 policies it can (there is no client identity) and forwards to the application.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::{Instrument as _, debug, info};

use crate::{
    drain,
    enroll::Pod,
    mesh::Mesh,
    metrics::flags,
    telemetry::{AccessLog, Counter, Outcome, Record, bump},
};

pub const INBOUND_PORT: u16 = 15006;

/// The plaintext listeners of one pod (a group on 15006 in its namespace); each
/// socket is served by [`Plaintext::run`] on its own shard.
#[derive(Clone)]
pub struct Plaintext {
    shared: Arc<Shared>,
}

/// What the connections share (not the listener, so that none keeps the port bound).
struct Shared {
    pod: Arc<Pod>,
    mesh: Arc<Mesh>,
    drain: drain::Watch,
}

impl Plaintext {
    pub fn new(pod: Arc<Pod>, mesh: Arc<Mesh>, drain: drain::Watch) -> Self {
        Self { shared: Arc::new(Shared { pod, mesh, drain }) }
    }

    /// Serves `listener`: 15006 in the pod's namespace, for both families when it has
    /// IPv6 (see `Netns::listen_dual_stack`), or inherited; on the runtime this runs
    /// on, with `spread` handing each connection to the shards in turn.
    pub async fn run(self, listener: std::net::TcpListener, spread: bool) {
        let Self { shared } = self;
        let drain = shared.drain.clone();
        drain::accept_until_drained(listener, drain, &shared.pod.spec.name, "inbound", |stream, peer| {
            // A v4 client on the dual-stack listener shows as `::ffff:a.b.c.d`.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            let span = tracing::debug_span!("inbound_plaintext", pod = %shared.pod.spec.name, %peer);
            let shared = shared.clone();
            mesh_proxy::shard::serve(spread, stream, move |stream| shared.serve(stream, peer).instrument(span));
        })
        .await;
    }
}

impl Shared {
    async fn serve(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let _drain = self.drain.clone();
        let counters = [&*self.mesh.counters, &self.pod.counters];
        bump(counters, |c| &c.inbound_accepted, 1);
        // sk_lookup keeps the address the client asked for as the local address.
        let target = match client.local_addr() {
            // A v4 connection on the dual-stack listener shows as `::ffff:a.b.c.d`.
            Ok(target) => SocketAddr::new(target.ip().to_canonical(), target.port()),
            Err(error) => {
                debug!(%error, "accepted socket without local address");
                return;
            }
        };
        let _ = client.set_nodelay(true);
        // While this connection is open, no delivery from `peer`'s address may use its
        // port towards `target` (see `deliver`).
        let _held = self.pod.plaintext.hold(peer, target);
        let source = self.mesh.index().workload(peer.ip()).cloned();
        let log = AccessLog {
            direction: "inbound_plaintext",
            src_workload: source.as_ref().map_or_else(String::new, |w| w.name.clone()),
            src_namespace: source.as_ref().map_or_else(String::new, |w| w.namespace.clone()),
            src_addr: Some(peer),
            dst_workload: Some(self.pod.spec.name.clone()),
            dst_namespace: Some(self.pod.spec.namespace.clone()),
            dst_identity: Some(self.pod.identity().to_string()),
            dst_addr: Some(target),
            security: "none",
            ..AccessLog::default()
        };
        let mut record = Record::new(log, counters, &self.mesh.metrics);
        record.set_labels(self.mesh.inbound_labels(&self.pod, source.as_deref(), None, "none"));
        let refused = |record: &mut Record, counter, outcome, flag, reason: String| {
            let _ = client.set_zero_linger();
            record.refuse(Some(counter), outcome, flag, Some(reason));
        };
        if crate::own::MESH_PORTS.contains(&target.port()) {
            // Straight to one of the agent's listeners (not steered here by the
            // kernel): forwarding it would connect the agent to itself.
            let reason = format!("{target} is a listener of the mesh agent");
            info!(pod = %self.pod.spec.name, %peer, %target, reason, "inbound connection refused");
            return refused(&mut record, |c| &c.self_target, Outcome::SelfTarget, flags::NO_ROUTE, reason);
        }
        if let Some(reason) = self.mesh.limits.reached(&self.mesh.counters, &self.pod.counters) {
            return refused(&mut record, |c| &c.limited, Outcome::Limited, flags::OVERFLOW, reason);
        }
        if !self.mesh.has_view() {
            let reason = "no view from the controller yet".to_owned();
            return refused(&mut record, |c| &c.no_view, Outcome::NoView, flags::NO_ROUTE, reason);
        }
        if let Err(reason) = self.mesh.plaintext_allowed(&self.pod, target.port()) {
            info!(pod = %self.pod.spec.name, %peer, %target, reason, "inbound connection refused");
            let counter: Counter = |c| &c.plaintext_refused;
            return refused(&mut record, counter, Outcome::PlaintextRefused, flags::PLAINTEXT_REFUSED, reason);
        }
        if let Err(reason) = self.mesh.authorize(&self.pod, None, peer.ip(), target) {
            info!(pod = %self.pod.spec.name, %peer, %target, reason, "inbound plaintext connection denied");
            return refused(&mut record, |c| &c.denied, Outcome::Denied, flags::DENIED, reason);
        }
        let upstream = match crate::deliver::deliver(&self.pod, peer.ip(), target, self.mesh.connect_timeout).await {
            Ok(upstream) => upstream,
            Err(error) => {
                let counter: Counter = |c| &c.connect_failed;
                return refused(
                    &mut record,
                    counter,
                    Outcome::ConnectFailed,
                    flags::UPSTREAM_FAILURE,
                    error.to_string(),
                );
            }
        };
        let recheck = self.mesh.recheck(&self.pod, None, peer.ip(), target);
        record.relay(client, upstream, Some(recheck)).await;
    }
}
