//! The controller's state and its two listeners: the agents' control endpoint (HTTP/2
//! over mutual TLS, 15012) and a local status/metrics endpoint.
use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_common::{
    config::Config,
    control::{
        ACK_PATH, Ack, CERTIFICATE_PATH, CONFIG_PATH, CertificateRequest, CertificateResponse, ConfigMessage, Objects,
        WAYPOINT_HEADER, parse_node_identity,
    },
    tls::uri_sans,
};
use serde::Serialize;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::{
    ca::Ca,
    jwks,
    node_auth::{AuthError, Client, NodeAuthenticator},
    settings::{self, Conflict, Flags},
    view,
};

type Body = BoxBody<Bytes, Infallible>;

/// One accepted configuration.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    pub config: Config,
    pub objects: Objects,
    pub index: view::ViewIndex,
    /// The version this one replaced and the keys that changed since.
    pub changed_since: Option<(u64, Vec<String>)>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentStatus {
    pub connected: bool,
    /// Open configuration streams (a restarted agent's new stream can open before the
    /// old one is noticed gone).
    pub streams: u64,
    pub sent_version: u64,
    pub acked_version: u64,
    pub objects: usize,
    pub certificates_issued: u64,
    pub certificates_refused: u64,
}

/// A waypoint's sync state, next to what identifies it (`meshctl status`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct WaypointStatus {
    pub namespace: String,
    /// Its Gateway's name.
    pub name: String,
    /// The SPIFFE identity it may obtain.
    pub identity: String,
    /// The node whose view it gets (the last one a replica connected from).
    pub node: String,
    #[serde(flatten)]
    pub sync: AgentStatus,
}

pub struct Controller {
    snapshot: watch::Sender<Arc<Snapshot>>,
    ca: Ca,
    cert_lifetime: Duration,
    trust_domain_aliases: Vec<String>,
    /// The trust domain and root namespace flags ([`settings`]); without them (tests)
    /// configurations are served as given.
    flags: Option<Flags>,
    /// Whether the running trust domain is settled (by the first configuration
    /// served); until then an applied configuration may set it.
    settled: AtomicBool,
    /// Setting conflicts already logged (each is logged once).
    conflicts_logged: Mutex<BTreeSet<Conflict>>,
    agents: Mutex<BTreeMap<String, AgentStatus>>,
    /// By `namespace/name`: every replica of a waypoint shares one entry.
    waypoints: Mutex<BTreeMap<String, WaypointStatus>>,
    rejections: AtomicU64,
    last_rejection: Mutex<Option<String>>,
    /// Fetched `jwksUri` key sets, written into the configuration on every apply.
    jwks: Mutex<jwks::Cache>,
    /// The configuration as its source gave it (before key sets were written in),
    /// kept only while some rule names a `jwksUri`: a fetch re-applies it.
    unkeyed: Mutex<Option<Config>>,
    /// Whether the control port accepts agents (`/ready`): in Kubernetes mode only
    /// once the cluster has been listed.
    serving: AtomicBool,
}

impl Controller {
    pub fn new(mut config: Config, ca: Ca, cert_lifetime: Duration, trust_domain_aliases: Vec<String>) -> Self {
        let unkeyed = (!jwks::wanted(&config).is_empty()).then(|| config.clone());
        jwks::inline(&mut config, &jwks::Cache::new());
        let objects = view::all_objects(&config);
        // Versions start at the wall clock in milliseconds so that they keep growing
        // across controller restarts.
        let version = u64::try_from(now_unix()).unwrap_or(1) * 1000;
        let index = view::ViewIndex::new(&config);
        let (snapshot, _) = watch::channel(Arc::new(Snapshot { version, config, objects, index, changed_since: None }));
        Self {
            snapshot,
            ca,
            cert_lifetime,
            trust_domain_aliases,
            flags: None,
            settled: AtomicBool::new(true),
            conflicts_logged: Mutex::default(),
            agents: Mutex::new(BTreeMap::new()),
            waypoints: Mutex::new(BTreeMap::new()),
            rejections: AtomicU64::new(0),
            last_rejection: Mutex::new(None),
            jwks: Mutex::new(jwks::Cache::new()),
            unkeyed: Mutex::new(unkeyed),
            serving: AtomicBool::new(false),
        }
    }

    /// Whether agents are served (the control port accepts them).
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Takes the flags' trust domain and root namespace as the defaults where the mesh
    /// config is silent ([`settings`]); `pending` when the configuration given to
    /// [`Self::new`] is a placeholder (Kubernetes mode, before the API server was
    /// read), so that the first applied one settles the trust domain. Logs the
    /// conflicts of the current configuration.
    #[must_use]
    pub fn with_flags(mut self, flags: Flags, pending: bool) -> Self {
        self.settled = AtomicBool::new(!pending);
        if !pending {
            let mut config = self.current().config.clone();
            let conflicts = settings::resolve(&mut config, &flags, None);
            self.log_conflicts(conflicts);
        }
        self.flags = Some(flags);
        self
    }

    /// The running trust domain: identities are issued in it and node credentials
    /// are authenticated with it.
    pub fn trust_domain(&self) -> String {
        self.current().config.trust_domain.clone()
    }

    /// The trust domains a node credential may name: the running one, and the one
    /// of `--trust-domain` (the credentials `meshctl`/`mesh-controller` issues for
    /// nodes name the flag's, which the mesh config may since have overridden).
    pub fn node_trust_domains(&self) -> Vec<String> {
        let mut domains = vec![self.trust_domain()];
        if let Some(flags) = self.flags.as_ref().filter(|f| f.trust_domain != domains[0]) {
            domains.push(flags.trust_domain.clone());
        }
        domains
    }

    /// Logs each conflict the first time it is seen.
    fn log_conflicts(&self, conflicts: Vec<Conflict>) {
        let mut logged = self.conflicts_logged.lock().expect("lock");
        for conflict in conflicts {
            if !logged.contains(&conflict) {
                warn!("mesh settings: {conflict}");
                logged.insert(conflict);
            }
        }
    }

    /// Aliases of the trust domain accepted from peers.
    pub fn trust_domain_aliases(&self) -> &[String] {
        &self.trust_domain_aliases
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Makes `config` the running configuration (a new version) unless nothing changed.
    pub fn apply(&self, mut config: Config) -> Option<u64> {
        if let Some(flags) = &self.flags {
            // The running trust domain, once settled, never moves (fail closed on identity).
            let running = self.settled.swap(true, Ordering::SeqCst).then(|| self.trust_domain());
            let conflicts = settings::resolve(&mut config, flags, running.as_deref());
            self.log_conflicts(conflicts);
        }
        *self.unkeyed.lock().expect("lock") = (!jwks::wanted(&config).is_empty()).then(|| config.clone());
        jwks::inline(&mut config, &self.jwks.lock().expect("lock"));
        let current = self.current();
        let objects = view::all_objects(&config);
        if objects == current.objects {
            return None;
        }
        let version = current.version + 1;
        let changed = view::changed_keys(&current.objects, &objects);
        let index = view::ViewIndex::new(&config);
        // Accepted but worth a look (references to objects not applied yet, fields
        // not enforced): once per accepted version, as `meshctl validate` prints them.
        for warning in &config.warnings {
            warn!(version, "configuration warning: {warning}");
        }
        self.snapshot.send_replace(Arc::new(Snapshot {
            version,
            config,
            objects,
            index,
            changed_since: Some((current.version, changed)),
        }));
        info!(version, "configuration accepted");
        Some(version)
    }

    /// Fetches the key sets of `config`'s `jwksUri`s (and `OpenID` discoveries) that the
    /// controller has never fetched, then applies it: a new `jwksUri` is pushed with
    /// its keys, with no window where the waypoints refuse its valid tokens (istiod
    /// fetches before it pushes too). The wait is bounded: all new URIs in parallel,
    /// each within its rule's `timeout` and at most [`jwks::FIRST_FETCH_WAIT`]. A
    /// failure is recorded as any fetch's (warning, `/status`), the configuration is
    /// applied anyway, and the fetch loop retries it with backoff ([`jwks::Schedule`]).
    pub async fn apply_fetching(&self, config: Config) -> Option<u64> {
        let known = self.jwks();
        let new: BTreeMap<String, jwks::Want> = jwks::wanted(&config)
            .into_iter()
            .filter(|(uri, _)| !known.contains_key(uri))
            .map(|(uri, want)| (uri, jwks::Want { timeout: want.timeout.min(jwks::FIRST_FETCH_WAIT), ..want }))
            .collect();
        if !new.is_empty() {
            let fetched = jwks::refresh(&jwks::Cache::new(), &new, jwks::Due::All, &jwks::connector()).await;
            info!(
                fetched = fetched.values().filter(|e| e.keys.is_some()).count(),
                failed = fetched.values().filter(|e| e.error.is_some()).count(),
                "new key sets fetched before the configuration is accepted"
            );
            let mut cache = self.jwks.lock().expect("lock");
            for (uri, entry) in fetched {
                // The fetch loop may have fetched it meanwhile; either is fresh.
                cache.entry(uri).or_insert(entry);
            }
        }
        self.apply(config)
    }

    /// [`Self::apply_fetching`] for the running configuration: at startup, before the
    /// first agent is served.
    pub async fn fetch_running_jwks(&self) -> Option<u64> {
        let unkeyed = self.unkeyed.lock().expect("lock").clone()?;
        self.apply_fetching(unkeyed).await
    }

    /// Notified on every accepted configuration.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// The `jwksUri`s (and discovery URLs) the running configuration fetches.
    pub fn jwks_wanted(&self) -> BTreeMap<String, jwks::Want> {
        self.unkeyed.lock().expect("lock").as_ref().map(jwks::wanted).unwrap_or_default()
    }

    /// What was fetched for each `jwksUri`.
    pub fn jwks(&self) -> jwks::Cache {
        self.jwks.lock().expect("lock").clone()
    }

    /// Records fetched key sets and re-applies the configuration with them (a new
    /// version when a key set changed). Entries of URIs the running configuration no
    /// longer uses are dropped; wanted entries missing from `fetched` (added by
    /// [`Self::apply_fetching`] while `fetched` was being fetched) are kept.
    pub fn set_jwks(&self, mut fetched: jwks::Cache) -> Option<u64> {
        let wanted = self.jwks_wanted();
        fetched.retain(|uri, _| wanted.contains_key(uri));
        {
            let mut cache = self.jwks.lock().expect("lock");
            for (uri, entry) in std::mem::take(&mut *cache) {
                if wanted.contains_key(&uri) && !fetched.contains_key(&uri) {
                    fetched.insert(uri, entry);
                }
            }
            *cache = fetched;
        }
        let unkeyed = self.unkeyed.lock().expect("lock").clone()?;
        self.apply(unkeyed)
    }

    /// Forgets the last rejection (Kubernetes mode: every object is valid again).
    pub fn clear_rejection(&self) {
        *self.last_rejection.lock().expect("lock") = None;
    }

    /// [`Controller::reject`], unless `report` is the rejection in force already.
    pub fn reject_if_new(&self, report: &str) {
        let new = self.last_rejection.lock().expect("lock").as_deref() != Some(report);
        if new {
            self.reject(report);
        }
    }

    /// Records a rejected change; the running configuration stays.
    pub fn reject(&self, report: &str) {
        self.rejections.fetch_add(1, Ordering::Relaxed);
        *self.last_rejection.lock().expect("lock") = Some(report.to_owned());
        warn!(version = self.current().version, "configuration change rejected; keeping the last good one:\n{report}");
    }

    fn agent(&self, node: &str, update: impl FnOnce(&mut AgentStatus)) {
        update(self.agents.lock().expect("lock").entry(node.to_owned()).or_default());
    }

    /// Updates the sync state of `client`: its node's agent entry, or its waypoint's.
    fn client(&self, client: &Client, update: impl FnOnce(&mut AgentStatus)) {
        match client {
            Client::Agent { node } => self.agent(node, update),
            Client::Waypoint(waypoint) => {
                let mut waypoints = self.waypoints.lock().expect("lock");
                let entry = waypoints.entry(format!("{}/{}", waypoint.namespace, waypoint.name)).or_default();
                entry.namespace.clone_from(&waypoint.namespace);
                entry.name.clone_from(&waypoint.name);
                entry.identity = waypoint.identity(&self.trust_domain());
                entry.node.clone_from(&waypoint.node);
                update(&mut entry.sync);
            }
        }
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "version": self.current().version,
            "rejections": self.rejections.load(Ordering::Relaxed),
            "last_rejection": *self.last_rejection.lock().expect("lock"),
            "agents": *self.agents.lock().expect("lock"),
            "jwks": *self.jwks.lock().expect("lock"),
            "waypoints": *self.waypoints.lock().expect("lock"),
        })
    }

    /// Prometheus text (OpenMetrics): the running version, rejections, and every
    /// agent's sync state (what `meshctl status` shows).
    pub fn metrics(self: &Arc<Self>, accept: Option<&str>) -> (&'static str, String) {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ControllerMetrics(self.clone())));
        mesh_proxy::metrics::exposition::encode(&registry, accept)
    }
}

/// One per-agent gauge, from the agent's status and the running version.
type AgentValue = fn(&AgentStatus, u64) -> i64;

/// Reads the controller's state at scrape time.
#[derive(Debug)]
struct ControllerMetrics(Arc<Controller>);

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("trust_domain", &self.trust_domain()).finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for ControllerMetrics {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use mesh_proxy::admin::encode_family;
        use prometheus_client::metrics::MetricType::{Counter, Gauge};
        let controller = &self.0;
        let version = controller.current().version;
        let agents = controller.agents.lock().expect("lock").clone();
        let connected = agents.values().filter(|a| a.connected).count() as i64;
        let rejections = controller.rejections.load(Ordering::Relaxed) as i64;
        for (name, help, metric_type, value) in [
            ("mesh_controller_config_version", "Version of the running configuration.", Gauge, version as i64),
            ("mesh_controller_config_rejections", "Configuration changes rejected as invalid.", Counter, rejections),
            ("mesh_controller_connected_agents", "Agents with an open configuration stream.", Gauge, connected),
        ] {
            encode_family(&mut encoder, name, help, metric_type, [(Vec::new(), value)])?;
        }
        let per_agent: [(&str, &str, AgentValue); 4] = [
            (
                "mesh_controller_agent_connected",
                "Whether the node's agent has an open configuration stream.",
                |a, _| i64::from(a.connected),
            ),
            (
                "mesh_controller_agent_config_version_sent",
                "Last configuration version sent to the node's agent.",
                |a, _| a.sent_version as i64,
            ),
            (
                "mesh_controller_agent_config_version_acked",
                "Last configuration version the node's agent applied and acknowledged.",
                |a, _| a.acked_version as i64,
            ),
            (
                "mesh_controller_agent_in_sync",
                "Whether the node's agent acknowledged the running configuration version.",
                |a, version| i64::from(a.acked_version == version),
            ),
        ];
        for (name, help, value) in per_agent {
            let samples = agents.iter().map(|(node, agent)| (vec![("node", node.as_str())], value(agent, version)));
            encode_family(&mut encoder, name, help, Gauge, samples)?;
        }
        let certificates = agents.iter().flat_map(|(node, agent)| {
            [("issued", agent.certificates_issued), ("refused", agent.certificates_refused)]
                .map(|(result, count)| (vec![("node", node.as_str()), ("result", result)], count as i64))
        });
        encode_family(
            &mut encoder,
            "mesh_controller_agent_certificates",
            "Workload certificates requested by the node's agent, by result.",
            Counter,
            certificates,
        )?;
        // The same sync state for waypoints, by the Gateway's namespace and name.
        let waypoints = controller.waypoints.lock().expect("lock").clone();
        let per_waypoint: [(&str, &str, AgentValue); 2] = [
            ("mesh_controller_waypoint_connected", "Whether the waypoint has an open configuration stream.", |w, _| {
                i64::from(w.connected)
            }),
            (
                "mesh_controller_waypoint_in_sync",
                "Whether the waypoint acknowledged the running configuration version.",
                |w, version| i64::from(w.acked_version == version),
            ),
        ];
        for (name, help, value) in per_waypoint {
            let samples = waypoints.values().map(|w| {
                (vec![("namespace", w.namespace.as_str()), ("name", w.name.as_str())], value(&w.sync, version))
            });
            encode_family(&mut encoder, name, help, Gauge, samples)?;
        }
        Ok(())
    }
}

/// The agents' endpoint: TLS 1.3 with client certificates, HTTP/2.
pub struct ControlServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    controller: Arc<Controller>,
    /// Kubernetes mode: agents without a node certificate authenticate each request
    /// with their projected `ServiceAccount` token.
    tokens: Option<Arc<NodeAuthenticator>>,
}

impl ControlServer {
    /// Listens on `addr` (`[::]`: both families); within a Tokio runtime.
    pub fn bind(addr: SocketAddr, tls: rustls::ServerConfig, controller: Arc<Controller>) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::from_std(mesh_proxy::socket::listen(addr, false)?)?,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            controller,
            tokens: None,
        })
    }

    /// Also accepts agents that authenticate with a token (the TLS config must then
    /// let clients come without a certificate).
    #[must_use]
    pub fn with_tokens(mut self, tokens: Arc<NodeAuthenticator>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        self.controller.serving.store(true, Ordering::Relaxed);
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = self.acceptor.clone();
            let controller = self.controller.clone();
            let tokens = self.tokens.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        debug!(%peer, %error, "control TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let domains = controller.node_trust_domains();
                let node = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(uri_sans)
                    .unwrap_or_default()
                    .iter()
                    .find_map(|uri| domains.iter().find_map(|td| parse_node_identity(td, uri)).map(str::to_owned));
                if node.is_none() && tokens.is_none() {
                    warn!(%peer, "control client presented no node identity; closing");
                    return;
                }
                let service = service_fn(move |req| {
                    let controller = controller.clone();
                    let node = node.clone();
                    let tokens = tokens.clone();
                    async move {
                        let client = match (node, tokens) {
                            (Some(node), _) => {
                                let header = req.headers().get(WAYPOINT_HEADER).and_then(|v| v.to_str().ok());
                                Client::from_node(&node, header)
                            }
                            (None, Some(tokens)) => match authenticate(&tokens, &controller, &req).await {
                                Ok(client) => client,
                                Err(error) => {
                                    warn!(%peer, %error, "control client refused");
                                    return Ok(full(StatusCode::UNAUTHORIZED, format!("{error}\n")));
                                }
                            },
                            (None, None) => unreachable!("checked before serving"),
                        };
                        Ok::<_, Infallible>(handle(&controller, &client, req).await)
                    }
                });
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder.timer(TokioTimer::new());
                builder.keep_alive_interval(Some(Duration::from_secs(15))).keep_alive_timeout(Duration::from_secs(10));
                if let Err(error) = builder.serve_connection(TokioIo::new(tls), service).await {
                    debug!(%peer, %error, "control connection ended");
                }
            });
        }
    }
}

/// Who a token-authenticated request speaks for (the running configuration declares
/// the waypoints).
async fn authenticate(
    tokens: &NodeAuthenticator,
    controller: &Controller,
    req: &Request<Incoming>,
) -> Result<Client, AuthError> {
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AuthError::NotAuthenticated("no client certificate and no bearer token".into()))?;
    tokens.client(token, &controller.current().config).await
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder().status(status).body(Full::new(body.into()).boxed()).expect("valid response")
}

fn json<T: Serialize>(value: &T) -> Response<Body> {
    full(StatusCode::OK, serde_json::to_vec(value).expect("serializable"))
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Body>> {
    let bytes = http_body_util::Limited::new(req.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| full(StatusCode::BAD_REQUEST, format!("unreadable body: {e}\n")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| full(StatusCode::BAD_REQUEST, format!("bad request: {e}\n")))
}

async fn handle(controller: &Arc<Controller>, client: &Client, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, CONFIG_PATH) => config_stream(controller.clone(), client.clone()),
        (&Method::POST, ACK_PATH) => match read_json::<Ack>(req).await {
            Ok(ack) => {
                controller.client(client, |a| a.acked_version = a.acked_version.max(ack.version));
                debug!(?client, version = ack.version, "client acknowledged");
                full(StatusCode::NO_CONTENT, "")
            }
            Err(response) => response,
        },
        (&Method::POST, CERTIFICATE_PATH) => match read_json::<CertificateRequest>(req).await {
            Ok(request) => certificate(controller, client, &request),
            Err(response) => response,
        },
        _ => full(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn certificate(controller: &Controller, client: &Client, request: &CertificateRequest) -> Response<Body> {
    let snapshot = controller.current();
    let node = client.node();
    if !client.may_issue(&snapshot.config, &request.identity) {
        controller.client(client, |a| a.certificates_refused += 1);
        let reason = match client {
            Client::Agent { node } => format!("node {node} runs no pod with identity {}", request.identity),
            Client::Waypoint(waypoint) => format!(
                "waypoint {}/{} on node {node} may only obtain {} (with a waypoint pod of that account on its node), \
                 not {}",
                waypoint.namespace,
                waypoint.name,
                waypoint.identity(&snapshot.config.trust_domain),
                request.identity
            ),
        };
        warn!(identity = %request.identity, "certificate refused: {reason}");
        return full(StatusCode::FORBIDDEN, format!("{reason}\n"));
    }
    match controller.ca.sign_csr(&request.csr_pem, &request.identity, controller.cert_lifetime) {
        Ok(issued) => {
            controller.client(client, |a| a.certificates_issued += 1);
            info!(node, identity = %request.identity, not_after = %issued.not_after, "certificate issued");
            let mut chain_pem = vec![issued.cert_pem];
            let root_pem = issued.chain_pem.last().cloned().unwrap_or_default();
            chain_pem.extend(issued.chain_pem.into_iter().filter(|c| *c != root_pem));
            json(&CertificateResponse { chain_pem, root_pem, not_after: issued.not_after.unix_timestamp() })
        }
        Err(error) => {
            controller.client(client, |a| a.certificates_refused += 1);
            full(StatusCode::BAD_REQUEST, format!("{error}\n"))
        }
    }
}

/// A response body fed by a channel: one frame per message.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|item| item.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn encode(message: &ConfigMessage) -> Bytes {
    let mut line = serde_json::to_vec(message).expect("messages serialize");
    line.push(b'\n');
    Bytes::from(line)
}

fn config_stream(controller: Arc<Controller>, client: Client) -> Response<Body> {
    let (tx, rx) = mpsc::channel(16);
    let node = client.node().to_owned();
    tokio::spawn(async move {
        let mut updates = controller.snapshot.subscribe();
        let mut sent = updates.borrow_and_update().clone();
        let line = view::encode_snapshot(&sent.index, &sent.objects, &node, sent.version);
        let objects = view::node_view_keys(&sent.index, &sent.objects, &node).len();
        info!(?client, version = sent.version, objects, bytes = line.len(), "client connected; sending snapshot");
        controller.client(&client, |a| {
            a.streams += 1;
            a.connected = true;
            a.sent_version = sent.version;
            a.objects = objects;
        });
        let mut ok = tx.send(Bytes::from(line)).await.is_ok();
        while ok && updates.changed().await.is_ok() {
            let next = updates.borrow_and_update().clone();
            // The precomputed change list only helps when this stream saw the version
            // it replaced; otherwise compare everything.
            let changed =
                next.changed_since.as_ref().filter(|(from, _)| *from == sent.version).map(|(_, keys)| keys.as_slice());
            // An update is sent even when this node's view did not change, so that
            // every agent converges on the same version number.
            let message = view::node_update(
                &view::Side { index: &sent.index, objects: &sent.objects },
                &view::Side { index: &next.index, objects: &next.objects },
                changed,
                &node,
                next.version,
            );
            ok = tx.send(encode(&message)).await.is_ok();
            sent = next;
            controller.client(&client, |a| a.sent_version = sent.version);
        }
        controller.client(&client, |a| {
            a.streams = a.streams.saturating_sub(1);
            a.connected = a.streams > 0;
        });
        info!(?client, "client disconnected");
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(ChannelBody(rx).boxed())
        .expect("valid response")
}

/// Local status (`/status`, JSON) and Prometheus metrics (`/metrics`), plain HTTP.
pub async fn serve_admin(listener: TcpListener, controller: Arc<Controller>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let controller = controller.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let controller = controller.clone();
                async move {
                    Ok::<_, Infallible>(match req.uri().path() {
                        "/status" => json(&controller.status()),
                        // The readiness probe: a replica still listing the cluster
                        // serves no agent and takes no traffic from the Service.
                        "/ready" if controller.serving() => full(StatusCode::OK, "ready\n"),
                        "/ready" => full(StatusCode::SERVICE_UNAVAILABLE, "not serving agents yet\n"),
                        "/metrics" => {
                            let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
                            let (content_type, body) = controller.metrics(accept);
                            let mut response = full(StatusCode::OK, body);
                            response
                                .headers_mut()
                                .insert("content-type", content_type.parse().expect("a valid header"));
                            response
                        }
                        _ => full(StatusCode::NOT_FOUND, "GET /status, /ready or /metrics\n"),
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Seconds since the epoch.
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use mesh_common::config::{Source, load};

    use super::*;

    /// A configuration as a source loads it, with a mesh config naming `trust_domain`
    /// (none: silent) and a namespace that makes each one differ.
    fn with_mesh(trust_domain: Option<&str>, namespace: &str) -> Config {
        let mesh = trust_domain.map_or_else(String::new, |td| format!("trustDomain: {td}"));
        let text = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\n\
             data:\n  mesh: \"{mesh}\"\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"
        );
        let mut config = load(&[Source { name: "mesh.yaml".into(), text }]).unwrap();
        crate::settings::fill_defaults(&mut config, &flags());
        config
    }

    fn flags() -> Flags {
        Flags { trust_domain: "flag.example".into(), root_namespace: "istio-system".into() }
    }

    #[test]
    fn the_running_trust_domain_never_moves_and_nodes_may_name_the_flags() {
        let dir = std::env::temp_dir().join(format!("mesh-td-ca-{}", std::process::id()));
        let ca = Ca::load_or_create(&dir, "flag.example").unwrap();
        // File mode: the loaded configuration's mesh config names the trust domain.
        let controller = Controller::new(with_mesh(Some("mesh.example"), "a"), ca, Duration::from_hours(1), Vec::new())
            .with_flags(flags(), false);
        assert_eq!(controller.trust_domain(), "mesh.example", "the mesh config wins over the flag");
        assert_eq!(controller.node_trust_domains(), ["mesh.example", "flag.example"]);
        // The mesh config later names another trust domain: served, pinned, logged once.
        assert!(controller.apply(with_mesh(Some("other.example"), "b")).is_some());
        assert_eq!(controller.trust_domain(), "mesh.example");
        assert_eq!(controller.current().config.mesh.trust_domain.as_deref(), Some("other.example"));
        assert!(controller.apply(with_mesh(None, "c")).is_some());
        assert_eq!(controller.trust_domain(), "mesh.example", "nor does a silent mesh config move it");
        let logged = controller.conflicts_logged.lock().unwrap().clone();
        assert!(logged.contains(&Conflict::TrustDomainChanged {
            wanted: "other.example".into(),
            running: "mesh.example".into()
        }));
        assert!(
            logged.contains(&Conflict::TrustDomainFlag { mesh: "mesh.example".into(), flag: "flag.example".into() })
        );

        // Kubernetes mode: a placeholder until the first configuration is read.
        let ca = Ca::load_or_create(&dir, "flag.example").unwrap();
        let mut placeholder = Config::default();
        crate::settings::fill_defaults(&mut placeholder, &flags());
        let controller =
            Controller::new(placeholder, ca, Duration::from_hours(1), Vec::new()).with_flags(flags(), true);
        assert_eq!(controller.trust_domain(), "flag.example");
        controller.apply(with_mesh(Some("mesh.example"), "a"));
        assert_eq!(controller.trust_domain(), "mesh.example", "the first configuration read settles it");
        controller.apply(with_mesh(Some("other.example"), "b"));
        assert_eq!(controller.trust_domain(), "mesh.example");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn metrics_show_every_agents_sync_state() {
        let dir = std::env::temp_dir().join(format!("mesh-metrics-ca-{}", std::process::id()));
        let ca = Ca::load_or_create(&dir, "cluster.local").unwrap();
        let config = load(&[Source { name: "empty.yaml".into(), text: String::new() }]).unwrap();
        let controller = Arc::new(Controller::new(config, ca, Duration::from_hours(1), Vec::new()));
        let version = controller.current().version;
        controller.agent("node1", |a| {
            a.connected = true;
            a.sent_version = version;
            a.acked_version = version;
            a.certificates_issued = 3;
        });
        controller.agent("node2", |a| {
            a.connected = true;
            a.sent_version = version;
            a.acked_version = version - 1;
        });
        let (content_type, text) = controller.metrics(None);
        assert!(content_type.starts_with("text/plain"));
        let has = |line: &str| text.lines().any(|l| l == line);
        assert!(has("mesh_controller_connected_agents 2"), "{text}");
        assert!(has("mesh_controller_agent_in_sync{node=\"node1\"} 1"), "{text}");
        assert!(has("mesh_controller_agent_in_sync{node=\"node2\"} 0"), "{text}");
        assert!(
            has(&format!("mesh_controller_agent_config_version_acked{{node=\"node2\"}} {}", version - 1)),
            "{text}"
        );
        assert!(has("mesh_controller_agent_certificates_total{node=\"node1\",result=\"issued\"} 3"), "{text}");
        assert!(has("# TYPE mesh_controller_agent_certificates_total counter"), "{text}");
        let (content_type, open) = controller.metrics(Some("application/openmetrics-text; version=1.0.0"));
        assert!(content_type.starts_with("application/openmetrics-text") && open.ends_with("# EOF\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn waypoints_are_reported_apart_from_the_agent_of_their_node() {
        let dir = std::env::temp_dir().join(format!("mesh-status-ca-{}", std::process::id()));
        let ca = Ca::load_or_create(&dir, "cluster.local").unwrap();
        let config = load(&[Source { name: "empty.yaml".into(), text: String::new() }]).unwrap();
        let controller = Arc::new(Controller::new(config, ca, Duration::from_hours(1), Vec::new()));
        let version = controller.current().version;
        let agent = Client::Agent { node: "node2".into() };
        let waypoint = Client::from_node("node2", Some("shop/waypoint/waypoint-sa"));
        controller.client(&agent, |a| {
            a.connected = true;
            a.acked_version = version;
        });
        // Two replicas of one waypoint: one entry, two streams.
        for _ in 0..2 {
            controller.client(&waypoint, |a| {
                a.streams += 1;
                a.connected = true;
                a.sent_version = version;
                a.acked_version = version - 1;
            });
        }
        let status = controller.status();
        assert_eq!(status["agents"].as_object().unwrap().len(), 1, "{status}");
        assert_eq!(status["agents"]["node2"]["acked_version"], version);
        let entry = &status["waypoints"]["shop/waypoint"];
        assert_eq!(entry["namespace"], "shop");
        assert_eq!(entry["name"], "waypoint");
        assert_eq!(entry["node"], "node2");
        assert_eq!(entry["identity"], "spiffe://cluster.local/ns/shop/sa/waypoint-sa");
        assert_eq!((entry["streams"].as_u64(), entry["acked_version"].as_u64()), (Some(2), Some(version - 1)));
        // What `meshctl status` makes of it.
        let rendered = crate::status::render(&status);
        assert!(rendered.text.contains("\nWAYPOINTS\n") && !rendered.in_sync, "{}", rendered.text);
        let (_, text) = controller.metrics(None);
        let has = |line: &str| text.lines().any(|l| l == line);
        assert!(has("mesh_controller_waypoint_in_sync{namespace=\"shop\",name=\"waypoint\"} 0"), "{text}");
        assert!(has("mesh_controller_waypoint_connected{namespace=\"shop\",name=\"waypoint\"} 1"), "{text}");
        assert!(has("mesh_controller_connected_agents 1"), "a waypoint is not an agent: {text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
