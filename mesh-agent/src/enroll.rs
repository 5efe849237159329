//! Pod enrollment: the node-local API (a Unix socket speaking one JSON object per
//! line), the registry of enrolled pods, and the state file that lets a restarted
//! agent pick its pods up again.
//!
//! Requests: `{"op":"add","pod":{...}}`, `{"op":"remove","uid":"..."}`, `{"op":"list"}`.
//! Responses: `{"ok":true,...}` or `{"ok":false,"error":"..."}`, one line each.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use mesh_common::{EnrolledPod, OUTBOUND_PORT, config::Config};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
    task::AbortHandle,
};
use tracing::{info, warn};

use crate::{
    control::ControlClient,
    drain,
    handover::{Inherited, ListenerId},
    identity::CertStore,
    netns::{Netns, NetnsError},
    outbound::{Forwarder, Outbound},
    redirect::{Redirect, RedirectError},
    telemetry::{Counters, CountersSnapshot},
};

/// Largest request accepted on one enrollment connection.
const MAX_REQUEST_BYTES: u64 = 1 << 20;

pub use mesh_common::enroll::PodSpec;
use mesh_common::enroll::Request;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("field pod.{field} must not be empty")]
    EmptyField { field: &'static str },
    #[error("netns path {path} does not exist")]
    NoSuchNetns { path: PathBuf },
    #[error("pod uid {uid} is already enrolled")]
    AlreadyEnrolled { uid: String },
    #[error("network namespace {path} already belongs to enrolled pod {uid}")]
    NetnsInUse { path: PathBuf, uid: String },
    #[error("no enrolled pod has uid {uid}")]
    UnknownPod { uid: String },
    #[error("the agent is shutting down")]
    Draining,
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
}

/// An enrolled pod, shared by its listeners and connections.
#[derive(Debug)]
pub struct Pod {
    pub spec: PodSpec,
    /// SPIFFE identity (from the controller's config when it knows the pod). It
    /// changes in place when the config gives the pod another service account.
    identity: std::sync::RwLock<Arc<str>>,
    pub id: u32,
    pub netns: Netns,
    pub netns_cookie: u64,
    pub counters: Counters,
    /// Set to true when the pod is un-enrolled: its tunnel connections send GOAWAY
    /// and finish their streams, and no new stream is delivered to it.
    pub removed: tokio::sync::watch::Sender<bool>,
    /// The plaintext connections to the pod the agent holds (its 15006 accepts), whose
    /// 4-tuples a delivery must not reuse.
    pub plaintext: Arc<crate::deliver::Held>,
    /// The pod's ephemeral port range at enrollment, where deliveries pick their ports.
    pub delivery_ports: std::ops::RangeInclusive<u16>,
}

/// A pod's outgoing sockets are made in its network namespace, marked so the capture
/// programs leave them alone.
impl mesh_proxy::socket::SocketFactory for Pod {
    fn namespace(&self) -> u64 {
        self.netns_cookie
    }

    fn tcp_socket(&self, ipv6: bool) -> std::io::Result<tokio::net::TcpSocket> {
        self.netns.tcp_socket(ipv6, mesh_common::BYPASS_MARK).map_err(std::io::Error::other)
    }
}

impl Pod {
    /// Whether the pod is still enrolled.
    pub fn enrolled(&self) -> bool {
        !*self.removed.borrow()
    }

    /// The pod's current SPIFFE identity.
    pub fn identity(&self) -> Arc<str> {
        self.identity.read().expect("identity lock").clone()
    }

    /// The pod's addresses, as the enroller gave them.
    pub fn ips(&self) -> &[IpAddr] {
        &self.spec.ips
    }
}

#[derive(Debug, Serialize)]
pub struct PodStatus {
    #[serde(flatten)]
    pub spec: PodSpec,
    pub identity: String,
    /// Agent-local number, also stored in the kernel's enrollment map.
    pub id: u32,
    pub netns_cookie: u64,
    pub listeners: Vec<SocketAddr>,
    pub counters: CountersSnapshot,
}

/// A listener's accept loop, not yet spawned.
type AcceptLoop = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Most listening sockets per pod and address (one per shard up to this): enough to
/// keep a pod's accepts off the hand-off on common nodes without a pod costing
/// hundreds of descriptors on large ones. Pods' groups start on different shards.
const MAX_GROUP: usize = 8;

/// The listening sockets of one pod address (see `Registry::listeners`).
struct Group {
    listeners: Vec<std::net::TcpListener>,
    addr: SocketAddr,
    /// The group is one socket that cannot be shared: it hands every connection to
    /// the shards in turn.
    spread: bool,
}

impl Group {
    /// One accept loop per socket of the group, made by `run(socket, spread)`.
    fn accept_loops<Fut>(
        self,
        run: impl Fn(std::net::TcpListener, bool) -> Fut,
    ) -> impl Iterator<Item = (SocketAddr, AcceptLoop)>
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Self { listeners, addr, spread } = self;
        listeners.into_iter().map(move |listener| (addr, Box::pin(run(listener, spread)) as AcceptLoop))
    }
}

struct Entry {
    pod: Arc<Pod>,
    listeners: Vec<(SocketAddr, AbortHandle)>,
    /// The listening sockets (a second descriptor of each), for a handover.
    sockets: Vec<(ListenerId, OwnedFd)>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        for (_, handle) in &self.listeners {
            handle.abort();
        }
    }
}

struct Inner {
    pods: BTreeMap<String, Entry>,
    /// Taken away when draining starts, so no new listener holds up the drain.
    drain: Option<drain::Watch>,
    /// A successor is taking the node over: no pod may be added or removed (the
    /// kernel state and the sockets are about to be its).
    frozen: bool,
}

/// Every enrolled pod of this node.
pub struct Registry {
    inner: Mutex<Inner>,
    redirect: Arc<Redirect>,
    forwarder: Arc<Forwarder>,
    state_file: PathBuf,
    next_id: AtomicU32,
    control: Option<(Arc<ControlClient>, Arc<CertStore>)>,
    /// Listening sockets inherited from the agent this one took over from.
    inherited: Arc<Inherited>,
}

impl Registry {
    pub fn new(
        redirect: Arc<Redirect>,
        forwarder: Arc<Forwarder>,
        state_dir: &Path,
        drain: drain::Watch,
        control: Option<(Arc<ControlClient>, Arc<CertStore>)>,
        inherited: Arc<Inherited>,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner { pods: BTreeMap::new(), drain: Some(drain), frozen: false }),
            redirect,
            forwarder,
            state_file: state_dir.join("pods.json"),
            next_id: AtomicU32::new(1),
            control,
            inherited,
        }
    }

    /// The pod's SPIFFE identity. The controller's config is the authority on a pod's
    /// service account; for a pod it does not know, the identity the pod had before
    /// a restart (`saved`) stands, else the enrollment request's service account.
    fn identity_of(&self, spec: &PodSpec, saved: Option<&str>) -> String {
        let Some((client, _)) = &self.control else {
            return Config::default().spiffe_id(&spec.namespace, &spec.service_account);
        };
        let state = client.current();
        let config = &state.config;
        let Some(known) = Self::configured_account(config, spec) else {
            return saved.map_or_else(|| config.spiffe_id(&spec.namespace, &spec.service_account), str::to_owned);
        };
        if known != spec.service_account {
            warn!(pod = %spec.name, requested = %spec.service_account, configured = %known, "service account differs from the config; using the config's");
        }
        config.spiffe_id(&spec.namespace, known)
    }

    /// The service account the view gives the pod, when the view knows it.
    fn configured_account<'c>(config: &'c Config, spec: &PodSpec) -> Option<&'c str> {
        config
            .pods
            .iter()
            .find(|p| p.metadata.name == spec.name && p.metadata.namespace == spec.namespace)
            .map(|p| p.spec.service_account())
    }

    /// Gives every enrolled pod the identity the current view says it has: a pod
    /// restored with an identity the controller no longer agrees with (or enrolled
    /// before the view named its service account) changes identity in place, its
    /// capture never interrupted; its old certificate is released and the new one
    /// requested. Called on every view change.
    pub async fn reconcile_identities(&self) {
        let Some((client, certs)) = &self.control else { return };
        let state = client.current();
        if state.version == 0 {
            return;
        }
        let inner = self.inner.lock().await;
        if inner.frozen {
            return;
        }
        let mut changed = false;
        for entry in inner.pods.values() {
            let pod = &entry.pod;
            let Some(account) = Self::configured_account(&state.config, &pod.spec) else { continue };
            let wanted: Arc<str> = state.config.spiffe_id(&pod.spec.namespace, account).into();
            let current = pod.identity();
            if wanted == current {
                continue;
            }
            info!(pod = %pod.spec.name, from = %current, to = %wanted, "the view gives the pod another identity; re-enrolled with it");
            *pod.identity.write().expect("identity lock") = wanted.clone();
            certs.acquire(&wanted);
            certs.release(&current);
            changed = true;
        }
        if changed {
            self.persist(&inner).await;
        }
    }

    /// Writes every enrolled pod's `PeerAuthentication` STRICT to the kernel (called
    /// on every new view).
    pub async fn apply_strict(&self) {
        let Some(mesh) = &self.forwarder.mesh else { return };
        let inner = self.inner.lock().await;
        if inner.frozen {
            return;
        }
        for entry in inner.pods.values() {
            let (strict, overrides) = mesh.strict_ports(&entry.pod);
            if let Err(error) = self.redirect.set_strict(entry.pod.ips(), strict, &overrides) {
                warn!(pod = %entry.pod.spec.name, %error, "cannot write the pod's STRICT ports to the kernel");
            }
        }
    }

    pub async fn add(&self, spec: PodSpec) -> Result<PodStatus, EnrollError> {
        self.add_with(spec, None).await
    }

    /// The listening sockets of `pod` for `kind`, on one address: a group sharing it
    /// (`SO_REUSEPORT`), one socket per shard up to [`MAX_GROUP`], so that each shard
    /// accepts its own connections. The group inherited at one of `addrs` from the
    /// agent this one took over from is served whole (and completed up to the shard
    /// count); else a new one from `bind` (`None`: the first socket, choosing the
    /// address; `Some(addr)`: another one joining it). An inherited socket that is not
    /// shareable (from an agent before groups) is served alone, handing connections
    /// to the shards in turn. A second descriptor of each socket goes to `sockets`
    /// (what a successor of this agent would inherit).
    fn listeners(
        &self,
        pod: &Pod,
        kind: &'static str,
        addrs: &[SocketAddr],
        bind: impl Fn(Option<SocketAddr>) -> Result<(std::net::TcpListener, SocketAddr), NetnsError>,
        sockets: &mut Vec<(ListenerId, OwnedFd)>,
    ) -> Result<Group, NetnsError> {
        let inherited = addrs.iter().find_map(|addr| {
            let group = self.inherited.take_group(&pod.spec.uid, kind, *addr);
            (!group.is_empty()).then_some((group, *addr))
        });
        let (mut listeners, addr) = if let Some(found) = inherited {
            found
        } else {
            let (listener, addr) = bind(None)?;
            (vec![listener], addr)
        };
        let shared = socket2::SockRef::from(&listeners[0]).reuse_port().unwrap_or(false);
        let wanted = mesh_proxy::shard::count().min(MAX_GROUP);
        while shared && listeners.len() < wanted {
            match bind(Some(addr)) {
                Ok((listener, _)) => listeners.push(listener),
                Err(error) => {
                    warn!(pod = %pod.spec.name, listener = kind, %addr, %error, "cannot add a listener to the group; fewer shards accept");
                    break;
                }
            }
        }
        for (index, listener) in listeners.iter().enumerate() {
            let copy =
                listener.try_clone().map_err(|source| NetnsError::Socket { path: pod.spec.netns.clone(), source })?;
            let id = ListenerId { owner: pod.spec.uid.clone(), kind: kind.to_owned(), addr, index };
            sockets.push((id, OwnedFd::from(copy)));
        }
        Ok(Group { listeners, addr, spread: !shared })
    }

    /// For a handover: stops every change of pods and returns a second descriptor of
    /// every pod's listening sockets.
    pub async fn freeze(&self) -> Vec<(ListenerId, OwnedFd)> {
        let mut inner = self.inner.lock().await;
        inner.frozen = true;
        inner
            .pods
            .values()
            .flat_map(|e| &e.sockets)
            .filter_map(|(id, fd)| Some((id.clone(), fd.try_clone().ok()?)))
            .collect()
    }

    /// The handover did not happen: pods may change again.
    pub async fn thaw(&self) {
        self.inner.lock().await.frozen = false;
    }

    async fn add_with(&self, spec: PodSpec, saved_identity: Option<&str>) -> Result<PodStatus, EnrollError> {
        validate(&spec)?;
        let mut inner = self.inner.lock().await;
        let drain = inner.drain.clone().filter(|_| !inner.frozen).ok_or(EnrollError::Draining)?;
        if inner.pods.contains_key(&spec.uid) {
            return Err(EnrollError::AlreadyEnrolled { uid: spec.uid });
        }
        let netns = Netns::open(&spec.netns)?;
        let cookie = netns.cookie()?;
        if let Some(other) = inner.pods.values().find(|e| e.pod.netns_cookie == cookie) {
            return Err(EnrollError::NetnsInUse { path: spec.netns.clone(), uid: other.pod.spec.uid.clone() });
        }
        let delivery_ports = netns.run(|| Ok(crate::deliver::local_port_range()))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let identity: Arc<str> = self.identity_of(&spec, saved_identity).into();
        let pod = Arc::new(Pod {
            spec,
            identity: std::sync::RwLock::new(identity),
            id,
            netns,
            netns_cookie: cookie,
            counters: Counters::default(),
            removed: tokio::sync::watch::Sender::new(false),
            plaintext: Arc::default(),
            delivery_ports,
        });

        // Accept loops start only once everything else succeeded (and the pod has its
        // certificate, when one was saved): a failed enrollment leaves nothing running.
        let mut listeners: Vec<(SocketAddr, AcceptLoop)> = Vec::new();
        let mut sockets = Vec::new();
        for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
            let addr = SocketAddr::new(ip, OUTBOUND_PORT);
            let group =
                self.listeners(&pod, "outbound", &[addr], |_| pod.netns.listen(addr).map(|l| (l, addr)), &mut sockets);
            match group {
                Ok(group) => {
                    let outbound = Outbound::new(pod.clone(), self.forwarder.clone(), drain.clone());
                    listeners.extend(group.accept_loops(|socket, spread| outbound.clone().run(socket, spread)));
                }
                // A pod without IPv6 (disabled, or no ::1) just has no v6 capture.
                Err(error) if ip.is_ipv6() => {
                    warn!(pod = %pod.spec.name, %error, "no IPv6 outbound listener");
                }
                Err(error) => return Err(error.into()),
            }
        }
        if let Some(mesh) = &self.forwarder.mesh {
            for ip in [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)] {
                let addr = SocketAddr::new(ip, crate::hbone::HBONE_PORT);
                let group = self.listeners(
                    &pod,
                    "tunnel",
                    &[addr],
                    |_| pod.netns.listen(addr).map(|l| (l, addr)),
                    &mut sockets,
                );
                match group {
                    Ok(group) => {
                        let tunnel = crate::hbone::Inbound::new(pod.clone(), mesh.clone(), drain.clone());
                        listeners.extend(group.accept_loops(|socket, spread| tunnel.clone().run(socket, spread)));
                    }
                    Err(error) if ip.is_ipv6() => warn!(pod = %pod.spec.name, %error, "no IPv6 tunnel listener"),
                    Err(error) => return Err(error.into()),
                }
            }
        }
        if let Some(mesh) = &self.forwarder.mesh {
            // The return path for connections delivered from the caller's address.
            pod.netns.run(crate::deliver::install)?;
            let port = crate::inbound::INBOUND_PORT;
            let dual = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
            let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
            let group = self.listeners(
                &pod,
                "inbound",
                &[dual, v4],
                |at| match at {
                    None => {
                        let (listener, ipv6) = pod.netns.listen_dual_stack(port)?;
                        Ok((listener, if ipv6 { dual } else { v4 }))
                    }
                    Some(at) if at.is_ipv6() => pod.netns.listen_dual(port).map(|l| (l, at)),
                    Some(at) => pod.netns.listen(at).map(|l| (l, at)),
                },
                &mut sockets,
            )?;
            let plaintext = crate::inbound::Plaintext::new(pod.clone(), mesh.clone(), drain.clone());
            let ipv6 = group.addr.is_ipv6();
            let inbound_ips: Vec<IpAddr> = pod.ips().iter().copied().filter(|ip| ipv6 || ip.is_ipv4()).collect();
            // The kernel's socket map holds the group's first socket; its lookup then
            // picks a member of the group.
            self.redirect.attach_inbound(&pod.netns, cookie, id, &inbound_ips, &group.listeners[0])?;
            listeners.extend(group.accept_loops(|socket, spread| plaintext.clone().run(socket, spread)));
            let (strict, overrides) = mesh.strict_ports(&pod);
            self.redirect.set_strict(pod.ips(), strict, &overrides)?;
        }
        // Capture starts only once the listeners exist.
        self.redirect.enroll(cookie, EnrolledPod { id, flags: 0 })?;
        self.forwarder.own.add_pod(pod.ips());
        if let Some(mesh) = &self.forwarder.mesh {
            mesh.add_local(&pod);
        }
        if let Some((_, certs)) = &self.control {
            certs.acquire(&pod.identity());
        }
        // Each socket of a group is accepted on by its own shard; pods start on
        // different shards, so single-socket groups spread too.
        let listeners = listeners
            .into_iter()
            .enumerate()
            .map(|(i, (addr, run))| (addr, mesh_proxy::shard::spawn_on(id as usize + i, run).abort_handle()))
            .collect();
        let entry = Entry { pod: pod.clone(), listeners, sockets };
        let status = status(&entry);
        inner.pods.insert(pod.spec.uid.clone(), entry);
        self.persist(&inner).await;
        info!(uid = %pod.spec.uid, pod = %pod.spec.name, identity = %pod.identity(), namespace = %pod.spec.namespace, netns = %pod.spec.netns.display(), cookie, "pod enrolled");
        Ok(status)
    }

    pub async fn remove(&self, uid: &str) -> Result<PodStatus, EnrollError> {
        let mut inner = self.inner.lock().await;
        if inner.frozen {
            return Err(EnrollError::Draining);
        }
        let entry = inner.pods.remove(uid).ok_or_else(|| EnrollError::UnknownPod { uid: uid.to_owned() })?;
        // First of all, whatever fails below: the pod takes no new connection, from a
        // tunnel or from a pod of this node.
        if let Some(mesh) = &self.forwarder.mesh {
            mesh.remove_local(&entry.pod);
        }
        entry.pod.removed.send_replace(true);
        // Stop capture first; then the listeners close (dropping the entry aborts
        // their accept loops). Connections already open run to completion.
        self.redirect.unenroll(entry.pod.netns_cookie)?;
        if self.forwarder.mesh.is_some() {
            self.redirect.detach_inbound(entry.pod.netns_cookie, entry.pod.ips())?;
            if entry.pod.netns.still_exists()
                && let Err(error) = entry.pod.netns.run(crate::deliver::uninstall)
            {
                warn!(uid, %error, "cannot remove the return path from the pod's namespace");
            }
        }
        let status = status(&entry);
        if let Some((_, certs)) = &self.control {
            certs.release(&entry.pod.identity());
        }
        self.forwarder.own.remove_pod(entry.pod.ips());
        if let Some(mesh) = &self.forwarder.mesh {
            mesh.pool.forget(entry.pod.netns_cookie);
        }
        drop(entry);
        self.persist(&inner).await;
        info!(uid, "pod removed");
        Ok(status)
    }

    pub async fn list(&self) -> Vec<PodStatus> {
        self.inner.lock().await.pods.values().map(status).collect()
    }

    /// Stops handing drain watches to new listeners (draining has begun).
    pub async fn close(&self) {
        self.inner.lock().await.drain = None;
    }

    /// Removes pods whose network namespace has disappeared.
    pub async fn collect_garbage(&self) {
        let gone: Vec<String> = {
            let inner = self.inner.lock().await;
            if inner.frozen {
                return;
            }
            inner.pods.values().filter(|e| !e.pod.netns.still_exists()).map(|e| e.pod.spec.uid.clone()).collect()
        };
        for uid in gone {
            warn!(%uid, "pod network namespace is gone; removing the pod");
            if let Err(error) = self.remove(&uid).await {
                warn!(%uid, %error, "removing a vanished pod failed");
            }
        }
    }

    /// Re-enrolls the pods recorded by an earlier run, and drops kernel enrollment
    /// entries that belong to no pod any more.
    pub async fn restore(&self) {
        let saved: Vec<SavedPod> = match tokio::fs::read(&self.state_file).await {
            Ok(bytes) => serde_json::from_slice::<SavedPods>(&bytes).map_or_else(
                |error| {
                    warn!(file = %self.state_file.display(), %error, "ignoring unreadable state file");
                    Vec::new()
                },
                SavedPods::into_pods,
            ),
            Err(_) => Vec::new(),
        };
        for SavedPod { pod: spec, identity } in saved {
            let uid = spec.uid.clone();
            match self.add_with(spec, identity.as_deref()).await {
                Ok(_) => info!(%uid, "pod restored from state file"),
                Err(error) => warn!(%uid, %error, "pod from state file not restored"),
            }
        }
        let live: Vec<u64> = self.inner.lock().await.pods.values().map(|e| e.pod.netns_cookie).collect();
        for cookie in self.redirect.enrolled_cookies() {
            if !live.contains(&cookie) {
                info!(cookie, "removing stale enrollment left by an earlier run");
                let _ = self.redirect.unenroll(cookie);
            }
        }
        // Inbound capture an earlier run set up for pods that are gone.
        let (live_cookies, live_ips): (Vec<u64>, Vec<IpAddr>) = {
            let inner = self.inner.lock().await;
            let cookies = inner.pods.values().map(|e| e.pod.netns_cookie).collect();
            let ips = inner
                .pods
                .values()
                .filter(|_| self.forwarder.mesh.is_some())
                .flat_map(|e| e.pod.ips().to_vec())
                .collect();
            (cookies, ips)
        };
        let stale_ips: Vec<IpAddr> =
            self.redirect.inbound_addrs().into_iter().map(|(ip, _)| ip).filter(|ip| !live_ips.contains(ip)).collect();
        for cookie in self.redirect.inbound_link_cookies() {
            if !live_cookies.contains(&cookie) || self.forwarder.mesh.is_none() {
                info!(cookie, "removing stale inbound capture left by an earlier run");
                let _ = self.redirect.detach_inbound(cookie, &[]);
            }
        }
        if !stale_ips.is_empty() {
            let _ = self.redirect.detach_inbound(0, &stale_ips);
        }
        let inner = self.inner.lock().await;
        self.persist(&inner).await;
    }

    async fn persist(&self, inner: &Inner) {
        let pods: Vec<SavedPod> = inner
            .pods
            .values()
            .map(|e| SavedPod { pod: e.pod.spec.clone(), identity: Some(e.pod.identity().to_string()) })
            .collect();
        let json = serde_json::to_vec_pretty(&SavedPods::Current { format: crate::state::FORMAT, pods })
            .expect("pod specs serialize");
        let path = self.state_file.clone();
        let result = tokio::task::spawn_blocking(move || crate::state::write_atomic(&path, &json, 0o600)).await;
        if let Ok(Err(error)) = result {
            warn!(file = %self.state_file.display(), %error, "cannot write state file");
        }
    }
}

/// The enrolled pods as the state directory keeps them.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum SavedPods {
    Current {
        format: u32,
        pods: Vec<SavedPod>,
    },
    /// Written by agents before identities were kept: the specs alone.
    Specs(Vec<PodSpec>),
}

impl SavedPods {
    fn into_pods(self) -> Vec<SavedPod> {
        match self {
            Self::Current { pods, .. } => pods,
            Self::Specs(specs) => specs.into_iter().map(|pod| SavedPod { pod, identity: None }).collect(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedPod {
    pod: PodSpec,
    /// The identity the pod had, kept until the view says otherwise.
    identity: Option<String>,
}

fn status(entry: &Entry) -> PodStatus {
    PodStatus {
        spec: entry.pod.spec.clone(),
        identity: entry.pod.identity().to_string(),
        id: entry.pod.id,
        netns_cookie: entry.pod.netns_cookie,
        listeners: {
            let mut addrs: Vec<SocketAddr> = entry.listeners.iter().map(|(addr, _)| *addr).collect();
            addrs.dedup();
            addrs
        },
        counters: entry.pod.counters.snapshot(),
    }
}

fn validate(spec: &PodSpec) -> Result<(), EnrollError> {
    mesh_common::enroll::check_fields(spec).map_err(|field| EnrollError::EmptyField { field })?;
    if !spec.netns.exists() {
        return Err(EnrollError::NoSuchNetns { path: spec.netns.clone() });
    }
    Ok(())
}

/// The enrollment API's Unix-socket listener.
pub struct EnrollApi {
    listener: UnixListener,
    registry: Arc<Registry>,
}

impl EnrollApi {
    pub fn new(path: &Path, registry: Arc<Registry>) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A socket file left by a previous run would make bind fail.
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        Ok(Self { listener, registry })
    }

    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, self.registry.clone()));
                }
                Err(error) => {
                    warn!(%error, "enrollment accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn serve(stream: UnixStream, registry: Arc<Registry>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_REQUEST_BYTES));
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) => {
                let reply = error_reply(&EnrollError::InvalidRequest(format!("unreadable request: {error}")));
                let _ = write.write_all(reply.as_bytes()).await;
                return;
            }
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = match handle(line.trim(), &registry).await {
            Ok(value) => {
                let mut value = value;
                value["ok"] = true.into();
                format!("{value}\n")
            }
            Err(error) => {
                warn!(%error, "enrollment request refused");
                error_reply(&error)
            }
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn error_reply(error: &EnrollError) -> String {
    format!("{}\n", serde_json::json!({ "ok": false, "error": error.to_string() }))
}

async fn handle(line: &str, registry: &Registry) -> Result<serde_json::Value, EnrollError> {
    let request = mesh_common::enroll::parse_request(line).map_err(EnrollError::InvalidRequest)?;
    Ok(match request {
        Request::Add { pod } => serde_json::json!({ "pod": registry.add(pod).await? }),
        Request::Remove { uid } => serde_json::json!({ "pod": registry.remove(&uid).await? }),
        Request::List => serde_json::json!({ "pods": registry.list().await }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let spec = PodSpec {
            uid: " ".into(),
            name: "p".into(),
            namespace: "n".into(),
            service_account: "default".into(),
            ips: vec![],
            netns: "/definitely/not/here".into(),
        };
        assert_eq!(validate(&spec).unwrap_err().to_string(), "field pod.uid must not be empty");
        let spec = PodSpec { uid: "u".into(), ..spec };
        assert_eq!(validate(&spec).unwrap_err().to_string(), "netns path /definitely/not/here does not exist");
    }
}
