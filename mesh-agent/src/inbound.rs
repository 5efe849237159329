//! The in-pod plaintext listener (15006): the kernel's `sk_lookup` program hands it
//! every plaintext TCP connection addressed to the pod (except the tunnel port and
//! exempt ports). `PeerAuthentication` decides: STRICT refuses, PERMISSIVE applies the
//! L4 policies it can (there is no client identity) and forwards to the application.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::{
    drain,
    enroll::Pod,
    mesh::Mesh,
    metrics::flags,
    netns::NetnsError,
    relay::{self, Counted},
    telemetry::{AccessLog, Active, Outcome, bump},
};

pub const INBOUND_PORT: u16 = 15006;

pub struct Plaintext {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// What the connections share (not the listener, so that none keeps the port bound).
struct Shared {
    pod: Arc<Pod>,
    mesh: Arc<Mesh>,
    drain: drain::Watch,
}

impl Plaintext {
    /// Serves `listener`: 15006 in the pod's namespace, for both families when it has
    /// IPv6 (see `Netns::listen_dual_stack`), or inherited.
    pub fn new(
        listener: std::net::TcpListener,
        pod: Arc<Pod>,
        mesh: Arc<Mesh>,
        drain: drain::Watch,
    ) -> Result<Self, NetnsError> {
        let listener = pod.netns.tokio_listener(listener)?;
        Ok(Self { listener, shared: Arc::new(Shared { pod, mesh, drain }) })
    }

    /// The listening socket (what the kernel's socket map holds).
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    pub async fn run(self) {
        let Self { listener, shared } = self;
        let drain = shared.drain.clone();
        drain::accept_until_drained(listener, drain, &shared.pod.spec.name, "inbound", |stream, peer| {
            // A v4 client on the dual-stack listener shows as `::ffff:a.b.c.d`.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            tokio::spawn(shared.clone().serve(stream, peer));
        })
        .await;
    }
}

impl Shared {
    async fn serve(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
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
        let source = self.mesh.index().workload(peer.ip()).cloned();
        let mut log = AccessLog {
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
        let labels = self.mesh.inbound_labels(&self.pod, source.as_deref(), None, "none");
        let refuse = |flag, outcome, reason: String, mut log: AccessLog| {
            self.mesh.metrics.refused(&labels, flag);
            let _ = client.set_zero_linger();
            log.outcome = Some(outcome);
            log.reason = Some(reason);
            log.duration = start.elapsed();
            log.emit();
        };
        if crate::own::MESH_PORTS.contains(&target.port()) {
            // Straight to one of the agent's listeners (not steered here by the
            // kernel): forwarding it would connect the agent to itself.
            bump(counters, |c| &c.self_target, 1);
            let reason = format!("{target} is a listener of the mesh agent");
            info!(pod = %self.pod.spec.name, %peer, %target, reason, "inbound connection refused");
            refuse(flags::NO_ROUTE, Outcome::SelfTarget, reason, log);
            return;
        }
        if let Some(reason) = self.mesh.limits.reached(&self.mesh.counters, &self.pod.counters) {
            bump(counters, |c| &c.limited, 1);
            refuse(flags::OVERFLOW, Outcome::Limited, reason, log);
            return;
        }
        if !self.mesh.has_view() {
            bump(counters, |c| &c.no_view, 1);
            refuse(flags::NO_ROUTE, Outcome::NoView, "no view from the controller yet".into(), log);
            return;
        }
        let (strict, policy) = self.mesh.plaintext_refused(&self.pod, target.port());
        if strict {
            bump(counters, |c| &c.plaintext_refused, 1);
            let reason = format!(
                "plaintext refused: PeerAuthentication {} is STRICT",
                policy.as_deref().unwrap_or("(mesh default)")
            );
            info!(pod = %self.pod.spec.name, %peer, %target, reason, "inbound connection refused");
            refuse(flags::PLAINTEXT_REFUSED, Outcome::PlaintextRefused, reason, log);
            return;
        }
        if let Err(reason) = self.mesh.authorize(&self.pod, None, peer.ip(), target) {
            bump(counters, |c| &c.denied, 1);
            info!(pod = %self.pod.spec.name, %peer, %target, reason, "inbound plaintext connection denied");
            refuse(flags::DENIED, Outcome::Denied, reason, log);
            return;
        }
        let upstream = match crate::deliver::deliver(&self.pod, peer.ip(), target, self.mesh.connect_timeout).await {
            Ok(upstream) => upstream,
            Err(error) => {
                bump(counters, |c| &c.connect_failed, 1);
                refuse(flags::UPSTREAM_FAILURE, Outcome::ConnectFailed, error.to_string(), log);
                return;
            }
        };
        self.mesh.metrics.opened(&labels);
        let active = Active::enter(counters);
        let recheck = self.mesh.recheck(&self.pod, None, peer.ip(), target);
        let report = relay::run(Counted::new(client), upstream, Some(recheck), &self.mesh.metrics, &labels).await;
        drop(active);
        self.mesh.metrics.closed(&labels);
        report.fill(&mut log);
        log.duration = start.elapsed();
        log.emit();
    }
}
