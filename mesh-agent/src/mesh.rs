//! What the secure data path shares: the configuration and its index, the
//! certificates, the tunnel pool, the policies and the metrics.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use mesh_common::{
    config::{Config, meta::Labels, security::MtlsMode},
    policy,
};
use mesh_proxy::{
    dns::Resolver,
    tunnel::{HBONE_PORT, POOL_IDLE, POOL_SPARE_IDLE, client::Pool},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    control::ControlClient,
    enroll::Pod,
    identity::CertStore,
    metrics::{Metrics, TcpLabels, flags},
    relay,
    telemetry::{Counters, Limits},
    workloads::{Index, ServicePort, Workload},
};

pub struct Mesh {
    pub control: Arc<ControlClient>,
    pub certs: Arc<CertStore>,
    index: watch::Receiver<Arc<Index>>,
    pub pool: Pool,
    /// The names of `DNS` `ServiceEntry` endpoints, resolved as connections use them.
    pub resolver: Resolver,
    pub metrics: Arc<Metrics>,
    pub counters: Arc<Counters>,
    pub connect_timeout: Duration,
    pub limits: Limits,
    /// Other trust domains whose identities are accepted (migrations, renames).
    pub trust_domain_aliases: Vec<String>,
    /// The pods enrolled on this node, by address: a connection between two of them is
    /// delivered without the tunnel (see [`Mesh::same_node`]).
    local: RwLock<HashMap<IpAddr, Arc<Pod>>>,
    /// Carry connections between pods of this node through the tunnel too.
    tunnel_same_node: bool,
}

/// The agent's flags the secure data path follows.
pub struct Settings {
    pub connect_timeout: Duration,
    pub limits: Limits,
    pub trust_domain_aliases: Vec<String>,
    pub tunnel_same_node: bool,
}

impl Mesh {
    /// Starts the tasks that keep the index current and release idle tunnels.
    pub fn start(
        control: Arc<ControlClient>,
        certs: Arc<CertStore>,
        metrics: Arc<Metrics>,
        counters: Arc<Counters>,
        settings: Settings,
    ) -> Arc<Self> {
        let Settings { connect_timeout, limits, trust_domain_aliases, tunnel_same_node } = settings;
        let mut updates = control.subscribe();
        let first = updates.borrow_and_update().clone();
        let (index_tx, index) = watch::channel(Arc::new(Index::build(&first.config).at(first.version)));
        tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                let state = updates.borrow_and_update().clone();
                let built = tokio::task::spawn_blocking(move || Index::build(&state.config).at(state.version)).await;
                match built {
                    Ok(index) => {
                        let _ = index_tx.send(Arc::new(index));
                    }
                    Err(error) => warn!(%error, "building the workload index failed"),
                }
            }
        });
        let mesh = Arc::new(Self {
            control,
            certs,
            index,
            pool: Pool::new(connect_timeout),
            resolver: Resolver::default(),
            metrics,
            counters,
            connect_timeout,
            limits,
            trust_domain_aliases,
            local: RwLock::default(),
            tunnel_same_node,
        });
        let weak = Arc::downgrade(&mesh);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(mesh) = weak.upgrade() else { return };
                mesh.pool.release_idle(POOL_IDLE, POOL_SPARE_IDLE);
            }
        });
        mesh
    }

    pub fn index(&self) -> Arc<Index> {
        self.index.borrow().clone()
    }

    /// Notes an enrolled pod (its capture and listeners are up): connections from
    /// the node's other pods may now be delivered to it directly.
    pub fn add_local(&self, pod: &Arc<Pod>) {
        let mut local = self.local.write().expect("local pods lock");
        for ip in pod.ips() {
            local.insert(*ip, pod.clone());
        }
    }

    /// Forgets a pod being un-enrolled (an address another pod took since stays).
    pub fn remove_local(&self, pod: &Arc<Pod>) {
        let mut local = self.local.write().expect("local pods lock");
        for ip in pod.ips() {
            if local.get(ip).is_some_and(|p| Arc::ptr_eq(p, pod)) {
                local.remove(ip);
            }
        }
    }

    /// The pod of this node a tunnel to `workload` at `addr` through `hbone` would
    /// reach, when the connection can be delivered to it directly: the tunnel goes
    /// straight to the pod (not through a waypoint), the pod is enrolled here, and it
    /// has the identity the tunnel would require of it. Both hops of such a
    /// connection stay inside the two pods' network namespaces (application to agent,
    /// agent to application), so no byte of it crosses a link; the agent knows the
    /// source's identity from where it captured the connection, as its certificate
    /// would have told the destination. `--tunnel-same-node` turns this off.
    pub fn same_node(&self, workload: &Workload, addr: SocketAddr, hbone: SocketAddr) -> Option<Arc<Pod>> {
        if self.tunnel_same_node || hbone.port() != HBONE_PORT || hbone.ip() != addr.ip() {
            return None;
        }
        let pod = self.local.read().expect("local pods lock").get(&addr.ip()).cloned()?;
        // The pod the view places at that address (not one whose address moved on
        // while it was being removed), with the identity the tunnel would expect.
        let same = pod.spec.name == workload.name && pod.spec.namespace == workload.namespace;
        (same && pod.enrolled() && *pod.identity() == *workload.identity).then_some(pod)
    }

    /// Whether a view is applied (from the controller or restored from disk). Until
    /// then no destination is known to be meshed or not, and the agent refuses.
    pub fn has_view(&self) -> bool {
        self.index().version > 0
    }

    /// Whether a client identity belongs to a trust domain this mesh accepts.
    pub fn trusts(&self, identity: &str) -> bool {
        let state = self.control.current();
        let Some(rest) = identity.strip_prefix("spiffe://") else { return false };
        let domain = rest.split('/').next().unwrap_or_default();
        domain == state.config.trust_domain || self.trust_domain_aliases.iter().any(|alias| alias == domain)
    }

    /// Evaluates the L4 authorization policies for a connection to `pod`. `Err` holds
    /// the reason of a denial.
    pub fn authorize(
        &self,
        pod: &Pod,
        identity: Option<&str>,
        source_ip: IpAddr,
        target: SocketAddr,
    ) -> Result<(), String> {
        let connection = policy::Connection {
            source_identity: identity,
            source_ip,
            destination_ip: target.ip(),
            destination_port: target.port(),
        };
        let verdict = self.with_workload(pod, |config, workload| policy::authorize(config, workload, &connection))?;
        match verdict {
            policy::Verdict::Allow { audited_by } => {
                for audit in audited_by {
                    info!(target: "audit", policy = audit, pod = %pod.spec.name, source = identity.unwrap_or("-"), %source_ip, %target, "AUDIT policy matched");
                }
                Ok(())
            }
            policy::Verdict::Deny { reason, .. } => Err(reason),
        }
    }

    /// A live connection to `pod` re-authorized on every configuration change (see
    /// [`relay::Recheck`]).
    pub fn recheck(
        self: &Arc<Self>,
        pod: &Arc<Pod>,
        identity: Option<Arc<str>>,
        source_ip: IpAddr,
        target: SocketAddr,
    ) -> relay::Recheck {
        let (mesh, pod) = (self.clone(), pod.clone());
        let check = move || {
            // A plaintext connection (no identity) is held to STRICT as a new one is.
            let verdict = if identity.is_none() { mesh.plaintext_allowed(&pod, target.port()) } else { Ok(()) };
            verdict.and_then(|()| mesh.authorize(&pod, identity.as_deref(), source_ip, target)).inspect_err(|reason| {
                info!(pod = %pod.spec.name, %target, reason, "closing a live connection the new policy denies");
            })
        };
        // Each applied view gives a new index, built after the view: the check sees the
        // new policies with the new labels.
        relay::Recheck { changes: self.subscribe_index(), check: Box::new(check) }
    }

    /// `Err` with the reason when plaintext to `pod` on `port` is refused
    /// (`PeerAuthentication` STRICT), naming the policy that decided.
    pub fn plaintext_allowed(&self, pod: &Pod, port: u16) -> Result<(), String> {
        let effective = self.with_workload(pod, |config, workload| policy::mtls_mode(config, workload, port))?;
        if effective.mode != MtlsMode::Strict {
            return Ok(());
        }
        Err(format!(
            "plaintext refused: PeerAuthentication {} is STRICT",
            effective.policy.as_deref().unwrap_or("(mesh default)")
        ))
    }

    /// `PeerAuthentication` STRICT of `pod` as the kernel applies it (see
    /// [`policy::strict_ports`]); every port STRICT for a pod the view does not know.
    pub fn strict_ports(&self, pod: &Pod) -> (bool, Vec<(u16, bool)>) {
        self.with_workload(pod, policy::strict_ports).unwrap_or((true, Vec::new()))
    }

    /// Runs a policy evaluation for `pod` on the current config: the pod as policies
    /// see it (its namespace and the labels the view gives it). `Err` when a view is
    /// applied and does not know the pod (enrolled before the controller saw its
    /// address, or deleted from the config while it runs): without its labels, the
    /// policies that select it cannot be told, and guessing "none" would let a
    /// selector's DENY or STRICT miss it. Its inbound traffic is refused, as ztunnel
    /// refuses traffic to a workload it does not know.
    fn with_workload<T>(&self, pod: &Pod, evaluate: impl FnOnce(&Config, &policy::Workload) -> T) -> Result<T, String> {
        let state = self.control.current();
        let index = self.index();
        let no_labels = Labels::new();
        let labels = match index.workload_of(pod.ips()) {
            Some(workload) => &workload.labels,
            None if index.version > 0 => {
                return Err(format!(
                    "pod {}/{} is not in the view: the policies that select it cannot be told",
                    pod.spec.namespace, pod.spec.name
                ));
            }
            None => &no_labels,
        };
        Ok(evaluate(&state.config, &policy::Workload { namespace: &pod.spec.namespace, labels }))
    }

    /// A receiver that sees every new index (every applied view).
    pub fn subscribe_index(&self) -> watch::Receiver<Arc<Index>> {
        self.index.clone()
    }

    /// Telemetry labels of a connection this agent receives for `pod`.
    pub fn inbound_labels(
        &self,
        pod: &Pod,
        source: Option<&Workload>,
        source_identity: Option<&str>,
        security: &'static str,
    ) -> Arc<TcpLabels> {
        let index = self.index();
        let destination = index.workload_of(pod.ips()).cloned();
        self.metrics.intern(TcpLabels {
            reporter: "destination",
            source_workload: source.map(|w| w.name.clone()).unwrap_or_default(),
            source_workload_namespace: source.map(|w| w.namespace.clone()).unwrap_or_default(),
            source_principal: source_identity.unwrap_or_default().to_owned(),
            source_app: source.map(|w| w.app().to_owned()).unwrap_or_default(),
            source_revision: source.map(|w| w.revision().to_owned()).unwrap_or_default(),
            destination_workload: pod.spec.name.clone(),
            destination_workload_namespace: pod.spec.namespace.clone(),
            destination_principal: pod.identity().to_string(),
            destination_app: destination.as_ref().map_or_else(|| pod.spec.name.clone(), |w| w.app().to_owned()),
            destination_revision: destination.as_ref().map_or_else(|| "latest".to_owned(), |w| w.revision().to_owned()),
            destination_service: String::new(),
            destination_service_name: String::new(),
            destination_service_namespace: String::new(),
            connection_security_policy: security,
            response_flags: flags::NONE,
        })
    }

    /// Telemetry labels of a connection `pod` opens.
    pub fn outbound_labels(
        pod: &Pod,
        source: Option<&Workload>,
        destination: Option<&Workload>,
        service: Option<&ServicePort>,
        tunneled: bool,
    ) -> TcpLabels {
        TcpLabels {
            reporter: "source",
            source_workload: pod.spec.name.clone(),
            source_workload_namespace: pod.spec.namespace.clone(),
            source_principal: pod.identity().to_string(),
            source_app: source.map_or_else(|| pod.spec.name.clone(), |w| w.app().to_owned()),
            source_revision: source.map_or_else(|| "latest".to_owned(), |w| w.revision().to_owned()),
            destination_workload: destination.map(|w| w.name.clone()).unwrap_or_default(),
            destination_workload_namespace: destination.map(|w| w.namespace.clone()).unwrap_or_default(),
            destination_principal: destination.filter(|_| tunneled).map(|w| w.identity.clone()).unwrap_or_default(),
            destination_app: destination.map(|w| w.app().to_owned()).unwrap_or_default(),
            destination_revision: destination.map(|w| w.revision().to_owned()).unwrap_or_default(),
            destination_service: service.map(|s| s.hostname.clone()).unwrap_or_default(),
            destination_service_name: service.map(|s| s.name.clone()).unwrap_or_default(),
            destination_service_namespace: service.map(|s| s.namespace.clone()).unwrap_or_default(),
            connection_security_policy: if tunneled { "mutual_tls" } else { "none" },
            response_flags: flags::NONE,
        }
    }
}
