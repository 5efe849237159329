//! Where tunnel streams come in: the waypoint's HBONE [`Handler`]. Each `CONNECT`
//! names a service VIP and port; the stream is refused unless that service uses this
//! waypoint, then served as HTTP ([`crate::proxy`]) or relayed as TCP by the
//! service port's protocol.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use http::StatusCode;
use mesh_common::config::meta::Labels;
use mesh_common::{config::Config, control::parse_workload_identity};
use mesh_common::{
    config::{gateway::WAYPOINT_CLASS, mesh::PathNormalization},
    policy::{self, WaypointPolicies},
};
use mesh_proxy::{
    admin::{self, Body},
    control::ControlClient,
    dns::Resolver,
    identity::{CertStore, WorkloadCert},
    metrics::Metrics,
    otlp,
    tunnel::{
        HboneError,
        server::{Connect, Handler},
    },
    workloads::{Index, ServiceKind, ServicePort, Workload},
};
use mesh_waypoint::{
    balance::locality::{self, Client, Locality},
    forwarded,
    jwt::{self, Authenticator},
    ratelimit::{RateLimits, WaypointRef},
    route::{self, RouteTable, ServiceRef, TcpTable, WaypointGateway},
    telemetry_api::{
        self, Defaults, Effective, Subject,
        apply::{LogPlan, MetricPlan, TcpMetricPlan},
    },
};
use tracing::{debug, info, warn};

use crate::{
    destination::{Destination, Health, Key, Lookup, Names},
    ext_authz::ExtAuthzClient,
    proxy,
    requests::RequestMetrics,
    upstream::Upstreams,
};

pub struct Settings {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub client: Arc<ControlClient>,
    pub certs: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
    pub connect_timeout: Duration,
    /// The waypoint's own pod name (Kubernetes downward API), to find its locality and
    /// labels in the view; `None`: the first pod of the waypoint's Gateway.
    pub pod_name: Option<String>,
    /// Serving threads ([`mesh_proxy::shard`]).
    pub shards: usize,
}

/// What one configuration version gives the waypoint. Route tables and destinations
/// are compiled on first use and kept for the version's life (a destination with
/// endpoints known by name is built again when their answers change).
pub struct Tables {
    pub version: u64,
    pub config: Arc<Config>,
    pub index: Index,
    /// The `AuthorizationPolicy` objects bound to this waypoint, compiled.
    pub policies: WaypointPolicies,
    /// How request paths are normalized before policy and routing (mesh config).
    pub normalization: PathNormalization,
    /// Istio's `numTrustedProxies` for this waypoint: how `remote.ip` is read from
    /// `X-Forwarded-For` ([`crate::forwarded`]).
    pub trusted_proxies: u32,
    routes: Mutex<HashMap<ServiceKey, Arc<RouteTable>>>,
    /// The Telemetry API's effective settings per service port.
    telemetry: Mutex<HashMap<ServiceKey, Arc<Telemetry>>>,
    /// The Telemetry problems already logged for this version (each once, not per service).
    telemetry_warned: Mutex<HashSet<String>>,
    /// `RequestAuthentication` rules per service port.
    authenticators: Mutex<HashMap<ServiceKey, Arc<Authenticator>>>,
    tcp_routes: Mutex<HashMap<ServiceKey, Arc<TcpTable>>>,
    /// With the generation of the resolver's answers they were built from.
    destinations: Mutex<HashMap<Key, (Arc<Destination>, u64)>>,
    /// The waypoint's own locality and pod labels in this view (locality load balancing).
    own_locality: Locality,
    own_labels: Labels,
    /// The waypoint's own pod addresses in this view.
    own_ips: Vec<IpAddr>,
}

impl Tables {
    fn new(version: u64, config: Arc<Config>, index: Index, waypoint: (&str, &str), pod_name: Option<&str>) -> Self {
        let (namespace, name) = waypoint;
        let policies = WaypointPolicies::new(&config, &policy::Waypoint { namespace, name, class: WAYPOINT_CLASS });
        let own = locality::own_pod(&config.pods, namespace, name, pod_name);
        let own_labels = own.map(|pod| pod.metadata.labels.clone()).unwrap_or_default();
        let own_ips = own.map(|pod| pod.ips().iter().filter_map(|ip| ip.parse().ok()).collect()).unwrap_or_default();
        let (trusted_proxies, problems) = forwarded::trusted_proxies(&config, namespace, name);
        for problem in problems {
            warn!(version, problem = %mesh_proxy::telemetry::error_chain(&problem), "numTrustedProxies");
        }
        Self {
            own_locality: Locality::from_labels(&own_labels),
            own_ips,
            own_labels,
            version,
            normalization: config.mesh.path_normalization(),
            trusted_proxies,
            policies,
            authenticators: Mutex::default(),
            telemetry: Mutex::default(),
            telemetry_warned: Mutex::default(),
            config,
            index,
            routes: Mutex::default(),
            tcp_routes: Mutex::default(),
            destinations: Mutex::default(),
        }
    }

    /// The routes of a service port.
    pub fn routes(&self, service: &ServicePort) -> Arc<RouteTable> {
        cached(&self.routes, service_key(service), || {
            let table = RouteTable::build(&self.config, &service_ref(service));
            for warning in table.warnings() {
                warn!(service = %service.hostname, warning, "route configuration");
            }
            table
        })
    }

    /// The JWT rules that apply to requests for `service` at `waypoint`.
    pub fn authenticator(&self, waypoint: &Waypoint, service: &ServicePort) -> Arc<Authenticator> {
        cached(&self.authenticators, service_key(service), || {
            let (authenticator, problems) = Authenticator::for_destination(
                &self.config,
                jwt::select::Waypoint { namespace: &waypoint.namespace, name: &waypoint.name, class: WAYPOINT_CLASS },
                jwt::select::Destination {
                    kind: match service.kind {
                        ServiceKind::Service => jwt::select::DestinationKind::Service,
                        ServiceKind::ServiceEntry => jwt::select::DestinationKind::ServiceEntry,
                    },
                    namespace: &service.namespace,
                    name: &service.name,
                },
                jwt::DEFAULT_CLOCK_SKEW_SECS,
            );
            for problem in problems {
                warn!(service = %service.hostname, %problem, "RequestAuthentication");
            }
            authenticator
        })
    }

    /// What the Telemetry API asks of requests to `service` at `waypoint`, with the
    /// exporter of its tracing provider (started once, see [`Waypoint::exporter`]).
    pub fn telemetry(&self, waypoint: &Waypoint, service: &ServicePort) -> Arc<Telemetry> {
        cached(&self.telemetry, service_key(service), || {
            let labels = WaypointRef::labels_of(&waypoint.name);
            // With no Telemetry and no `defaultProviders`: `envoy` (every request logged
            // on stdout, like Istio's demo profile) and `prometheus`.
            let defaults = Defaults::from_mesh(&self.config.mesh);
            let resolved = telemetry_api::resolve(
                &self.config.telemetries,
                &Subject {
                    root_namespace: &self.config.root_namespace,
                    waypoint_namespace: &waypoint.namespace,
                    waypoint_name: &waypoint.name,
                    waypoint_labels: &labels,
                    // A Telemetry binds to a Service by `targetRefs`, not (yet) to a
                    // `ServiceEntry`.
                    service: (service.kind == ServiceKind::Service).then_some((&service.namespace, &service.name)),
                },
                &defaults,
            );
            for issue in &resolved.issues {
                warn!(service = %service.hostname, %issue, "Telemetry");
            }
            let exporter = resolved
                .effective
                .tracing
                .as_ref()
                .filter(|t| !t.disabled)
                .and_then(|t| waypoint.exporter(self, &t.provider));
            let (log, mut issues) = LogPlan::new(&resolved.effective.access_log, &self.config.mesh);
            let (metrics, more) = MetricPlan::new(&resolved.effective.metrics, &self.config.mesh);
            issues.extend(more);
            let (tcp_metrics, more) = TcpMetricPlan::new(&resolved.effective.metrics, &self.config.mesh);
            issues.extend(more);
            for issue in issues {
                let text = issue.to_string();
                if self.telemetry_warned.lock().expect("lock").insert(text) {
                    warn!(version = self.version, %issue, "Telemetry");
                }
            }
            Telemetry { effective: resolved.effective, exporter, log, metrics, tcp_metrics }
        })
    }

    /// The L4 routes of a service port.
    pub fn tcp_routes(&self, service: &ServicePort) -> Arc<TcpTable> {
        cached(&self.tcp_routes, service_key(service), || {
            let table = TcpTable::build(&self.config, &service_ref(service));
            for warning in table.warnings() {
                warn!(service = %service.hostname, warning, "TCP route configuration");
            }
            table
        })
    }

    /// The endpoints and policy of a destination. Its endpoints known by name are
    /// resolved first (a kept answer while it is fresh, see [`mesh_proxy::dns`]); the
    /// destination is built again when an answer changes.
    pub async fn destination(&self, waypoint: &Waypoint, key: &Key) -> Lookup {
        if let Some(service) = self.index.service_by_host(&key.0, key.2) {
            for named in &service.names {
                if let Err(error) = waypoint.resolver.lookup(&named.host).await {
                    debug!(host = %named.host, error = %mesh_proxy::telemetry::error_chain(&error), "endpoint name does not resolve");
                }
            }
        }
        let generation = waypoint.resolver.generation();
        if let Some((found, built)) = self.destinations.lock().expect("lock").get(key)
            && *built == generation
        {
            return Lookup::Found(found.clone());
        }
        let me = Client { locality: &self.own_locality, labels: &self.own_labels };
        let lookup = Destination::resolve(
            &self.index,
            &self.config,
            &waypoint.namespace,
            me,
            key,
            &waypoint.health,
            &Names { resolver: &waypoint.resolver, own: &self.own_ips },
        );
        if let Lookup::Found(found) = &lookup {
            self.destinations.lock().expect("lock").insert(key.clone(), (found.clone(), generation));
        }
        lookup
    }
}

/// A service port's entry of a cache: a Service by its hostname, a `ServiceEntry`'s
/// host by the entry too (two entries, or an entry and a Service, may name one host).
type ServiceKey = (String, u16);

fn service_key(service: &ServicePort) -> ServiceKey {
    let name = match service.kind {
        ServiceKind::Service => service.hostname.clone(),
        ServiceKind::ServiceEntry => {
            format!("ServiceEntry/{}/{}/{}", service.namespace, service.name, service.hostname)
        }
    };
    (name, service.port)
}

/// The value cached under `key`, built (once per version) on first use.
fn cached<V>(cache: &Mutex<HashMap<ServiceKey, Arc<V>>>, key: ServiceKey, build: impl FnOnce() -> V) -> Arc<V> {
    if let Some(found) = cache.lock().expect("lock").get(&key) {
        return found.clone();
    }
    let value = Arc::new(build());
    cache.lock().expect("lock").insert(key, value.clone());
    value
}

fn service_ref(service: &ServicePort) -> ServiceRef {
    match service.kind {
        ServiceKind::Service => ServiceRef::new(&service.namespace, &service.name, service.port),
        ServiceKind::ServiceEntry => {
            ServiceRef::entry(&service.namespace, &service.name, &service.hostname, service.port)
        }
    }
}

/// The Telemetry API's settings for one destination, and the span exporter of its
/// tracing provider (`None`: no provider, reporting disabled, or the provider is not
/// an `opentelemetry` one of the mesh config).
pub struct Telemetry {
    pub effective: Effective,
    pub exporter: Option<otlp::SpanSender>,
    /// Whether a request's access-log line is written.
    pub log: LogPlan,
    /// Which request metric families are recorded, under which labels.
    pub metrics: MetricPlan,
    /// Which TCP metric families the connections relayed on TCP-routed ports are
    /// recorded in, under which labels.
    pub tcp_metrics: TcpMetricPlan,
}

pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    /// Our pod's name, when the deployment says it.
    pod_name: Option<String>,
    /// Our SPIFFE identity (known once the view names the trust domain).
    identity: RwLock<Option<String>>,
    service_account: String,
    client: Arc<ControlClient>,
    certs: Arc<CertStore>,
    pub requests: RequestMetrics,
    /// The process's metrics: the TCP families of relayed connections.
    pub metrics: Arc<Metrics>,
    /// Upstream pools, one per shard ([`mesh_proxy::shard`]): a request uses its thread's.
    upstreams: Vec<Upstreams>,
    /// The client of the external authorizers `CUSTOM` policies name.
    pub ext_authz: ExtAuthzClient,
    /// Retries given up because the request body outgrew the copy kept for them, and
    /// mirrors aborted for falling too far behind the request
    /// (`mesh_waypoint_retry_or_shadow_abandoned_total`, Envoy's
    /// `retry_or_shadow_abandoned`).
    pub abandoned: prometheus_client::metrics::counter::Counter,
    connect_timeout: Duration,
    tables: RwLock<Arc<Tables>>,
    /// Span exporters by `extensionProviders` name, with the collector they send to.
    exporters: Mutex<HashMap<String, (String, otlp::SpanSender)>>,
    /// Local rate limits per service port, with the config version they were built
    /// for: rebuilt on a new version, keeping the buckets whose settings did not change.
    ratelimits: Mutex<HashMap<ServiceKey, VersionedLimits>>,
    /// Outlier and circuit-breaker state per destination, across config versions.
    pub health: Mutex<HashMap<Key, Arc<Health>>>,
    /// The names of `DNS` `ServiceEntry` endpoints, resolved as requests use them.
    resolver: Resolver,
    /// Turns true when the waypoint drains: downstream HTTP connections are shut
    /// down gracefully (see `keepalive::serve`).
    draining: tokio::sync::watch::Sender<bool>,
}

/// Rate limits and the config version they were built for.
type VersionedLimits = (u64, Arc<RateLimits>);

/// Who sent a request: the tunnel peer's verified identity and the original client.
#[derive(Clone, Debug)]
pub struct Caller {
    pub identity: Arc<str>,
    /// The client's address as the source agent reported it (`forwarded: for=`), else
    /// the tunnel peer's.
    pub addr: SocketAddr,
    pub workload: Option<Arc<Workload>>,
}

impl Caller {
    /// The namespace of the caller's SPIFFE identity ("" when it names none).
    pub fn namespace(&self) -> &str {
        parse_workload_identity(&self.identity).map_or("", |(_, ns, _)| ns)
    }

    /// The calling workload's labels (none when the caller is not in the view).
    pub fn labels(&self) -> &mesh_common::config::meta::Labels {
        static NONE: mesh_common::config::meta::Labels = mesh_common::config::meta::Labels::new();
        self.workload.as_ref().map_or(&NONE, |w| &w.labels)
    }
}

/// How a service port's traffic is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2 (prior knowledge), told apart by the first bytes.
    Http,
    /// Opaque bytes: L4 routing only.
    Tcp,
    /// Not declared: HTTP when the first bytes are, else TCP.
    Unknown,
}

/// The protocol of a service port from its `appProtocol` or name, as Istio reads it:
/// the name's prefix before `-` (`http`, `http-web`, `grpc-api`, `tcp-db`).
pub fn protocol_of(port: &ServicePort) -> Protocol {
    let name = port.protocol.to_ascii_lowercase();
    match name.split(['-', '_']).next().unwrap_or("") {
        "http" | "http2" | "grpc" | "grpc-web" | "kubernetes.io/h2c" | "kubernetes.io/ws" => Protocol::Http,
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "udp" => Protocol::Tcp,
        _ => Protocol::Unknown,
    }
}

impl Waypoint {
    /// The upstream pools of the current thread's shard.
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams[mesh_proxy::shard::current() % self.upstreams.len()]
    }

    pub fn new(settings: Settings) -> Arc<Self> {
        let requests = RequestMetrics::new(&settings.metrics);
        let ext_authz = ExtAuthzClient::new();
        ext_authz.counters().register(&settings.metrics);
        let resent = prometheus_client::metrics::counter::Counter::default();
        settings.metrics.register(
            "mesh_waypoint_upstream_rq_resent",
            "Requests sent on another connection because their endpoint closed the pooled one they took (a keep-alive race; not route retries)",
            resent.clone(),
        );
        let abandoned = prometheus_client::metrics::counter::Counter::default();
        settings.metrics.register(
            "mesh_waypoint_retry_or_shadow_abandoned",
            "Retries and mirrors given up because the request body outgrew their buffer",
            abandoned.clone(),
        );
        let tables = Tables::new(0, Arc::default(), Index::default(), (&settings.namespace, &settings.name), None);
        Arc::new(Self {
            namespace: settings.namespace,
            name: settings.name,
            pod_name: settings.pod_name,
            identity: RwLock::new(None),
            service_account: settings.service_account,
            client: settings.client,
            certs: settings.certs,

            requests,
            metrics: settings.metrics.clone(),
            upstreams: (0..settings.shards.max(1))
                .map(|_| Upstreams::new(settings.connect_timeout).counting_resent(resent.clone()))
                .collect(),
            ext_authz,
            abandoned,
            ratelimits: Mutex::default(),
            exporters: Mutex::default(),
            connect_timeout: settings.connect_timeout,
            tables: RwLock::new(Arc::new(tables)),
            health: Mutex::default(),
            resolver: Resolver::default(),
            draining: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Starts the drain of downstream HTTP connections: HTTP/2 ones get `GOAWAY`,
    /// HTTP/1.1 ones close once their response in flight is done (`connection:
    /// close`), so that clients move to another waypoint before the drain deadline
    /// cuts what is left.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Lets idle upstream connections go, on every shard (see
    /// [`Upstreams::release_idle`]).
    pub fn release_idle(&self) {
        for upstreams in &self.upstreams {
            upstreams.release_idle();
        }
    }

    /// Whether the waypoint drains, for a downstream connection to watch.
    pub fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.draining.subscribe()
    }

    pub fn tables(&self) -> Arc<Tables> {
        self.tables.read().expect("lock").clone()
    }

    /// The exporter of the `opentelemetry` provider `name` of the mesh config, started
    /// on first use (and again when the provider's collector changes). `None` when the
    /// mesh config has no such provider.
    pub fn exporter(&self, tables: &Tables, name: &str) -> Option<otlp::SpanSender> {
        let provider = tables.config.mesh.provider(name)?.opentelemetry.as_ref()?;
        let (_, host) = mesh_waypoint::custom::service_host(&provider.service);
        let port = u16::try_from(provider.port).ok()?;
        // A Service of the view is reached at one of its endpoints; any other host by name.
        let address = tables
            .index
            .service_by_host(host, port)
            .and_then(|s| s.pick(false))
            .map_or_else(|| host.to_string(), |(_, addr)| addr.ip().to_string());
        let protocol = if provider.http.is_some() { otlp::Protocol::HttpProtobuf } else { otlp::Protocol::Grpc };
        let key = format!("{address}:{port} {protocol:?} {:?}", provider.http);
        let mut exporters = self.exporters.lock().expect("lock");
        if let Some((current, sender)) = exporters.get(name)
            && *current == key
        {
            return Some(sender.clone());
        }
        let origin = otlp::Origin::proxy(&self.name, &self.namespace, "mesh-waypoint", env!("CARGO_PKG_VERSION"));
        let mut config = otlp::ExporterConfig::new(address, port, protocol, origin);
        if let Some(http) = &provider.http
            && !http.path.is_empty()
        {
            config.path.clone_from(&http.path);
        }
        let (sender, exporter) = otlp::exporter(config);
        tokio::spawn(exporter.run());
        info!(provider = name, collector = %key, "span exporter started");
        exporters.insert(name.to_string(), (key, sender.clone()));
        Some(sender)
    }

    /// The local rate limits (`EnvoyFilter`) for requests to `service`.
    pub fn rate_limits(&self, tables: &Tables, service: &ServicePort) -> Arc<RateLimits> {
        let key = service_key(service);
        let mut all = self.ratelimits.lock().expect("lock");
        if let Some((version, limits)) = all.get(&key)
            && *version == tables.version
        {
            return limits.clone();
        }
        let labels = WaypointRef::labels_of(&self.name);
        let waypoint = WaypointRef { namespace: &self.namespace, name: &self.name, labels: &labels };
        let fresh = RateLimits::for_destination(&tables.config, waypoint, &service_ref(service));
        let fresh = Arc::new(match all.get(&key) {
            Some((_, old)) => fresh.carry_over(old),
            None => fresh,
        });
        if !fresh.is_empty() {
            info!(service = %service.hostname, filters = ?fresh.filter_ids().collect::<Vec<_>>(), "local rate limits");
        }
        all.insert(key, (tables.version, fresh.clone()));
        fresh
    }

    pub fn certificate_of(&self, identity: &str) -> Option<Arc<WorkloadCert>> {
        self.certs.get(identity)
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    pub fn identity(&self) -> Option<String> {
        self.identity.read().expect("lock").clone()
    }

    /// Rebuilds the tables on every new view; the first one also asks for the
    /// waypoint's certificate. `ready` is dropped once both are there.
    pub async fn follow_config(self: Arc<Self>, ready: admin::ReadyGuard) {
        let mut updates = self.client.subscribe();
        let mut ready = Some(ready);
        loop {
            let state = updates.borrow_and_update().clone();
            if state.version > 0 {
                let config = Arc::new(state.config.clone());
                let identity = config.spiffe_id(&self.namespace, &self.service_account);
                let changed = self.identity.read().expect("lock").as_deref() != Some(identity.as_str());
                if changed {
                    if let Some(old) = self.identity.write().expect("lock").replace(identity.clone()) {
                        self.certs.release(&old);
                    }
                    self.certs.acquire(&identity);
                }
                let index = Index::build(&config).at(state.version);
                let me = WaypointGateway { namespace: &self.namespace, name: &self.name };
                for warning in route::waypoint_parent_warnings(&config, me) {
                    warn!(warning, "route configuration");
                }
                let tables =
                    Tables::new(state.version, config, index, (&self.namespace, &self.name), self.pod_name.as_deref());
                *self.tables.write().expect("lock") = Arc::new(tables);
                info!(version = state.version, "view applied");
                if ready.is_some() && self.certs.get(&identity).is_some() {
                    ready = None;
                }
            }
            if ready.is_some() {
                // Waiting for the certificate: look again shortly.
                let _ = tokio::time::timeout(Duration::from_millis(200), updates.changed()).await;
            } else if updates.changed().await.is_err() {
                return;
            }
        }
    }

    /// Does `service` send its traffic through this waypoint?
    fn serves(&self, service: &ServicePort) -> bool {
        service.waypoint.as_ref().is_some_and(|w| w.name == self.name && w.namespace == self.namespace)
    }

    /// The admin endpoint: the config dump and the certificate's state.
    pub fn admin(&self, req: &http::Request<hyper::body::Incoming>) -> http::Response<Body> {
        match req.uri().path() {
            "/config_dump" => admin::json(&admin::control_dump(&self.client, &self.certs)),
            "/stats" => admin::json(&serde_json::json!({
                "version": self.tables().version,
                "identity": self.identity(),
                "upstream_tunnels": self.upstreams.iter().map(Upstreams::tunnels).sum::<usize>(),
            })),
            _ => admin::reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}

/// The client address in a `forwarded` header (`for="10.0.0.1:3456"`, `for=10.0.0.1`,
/// `for="[fd00::1]:80"`).
fn forwarded_for(value: &str) -> Option<SocketAddr> {
    let value = value.split([';', ',']).find_map(|part| part.trim().strip_prefix("for="))?.trim_matches('"');
    value.parse::<SocketAddr>().ok().or_else(|| {
        let ip = value.trim_start_matches('[').trim_end_matches(']');
        ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
    })
}

impl Handler for Waypoint {
    fn certificate(&self) -> Result<Arc<WorkloadCert>, HboneError> {
        let identity = self.identity().unwrap_or_default();
        self.certs.get(&identity).ok_or(HboneError::NoCertificate { identity })
    }

    fn trusts(&self, identity: &str) -> bool {
        let tables = self.tables();
        parse_workload_identity(identity).is_some_and(|(td, _, _)| td == tables.config.trust_domain)
    }

    fn refused(&self, peer: SocketAddr, reason: &str) {
        debug!(%peer, reason, "tunnel connection refused");
    }

    async fn serve(self: Arc<Self>, connect: Connect) {
        let tables = self.tables();
        let Some(target) = connect.authority().and_then(|a| a.parse::<SocketAddr>().ok()) else {
            debug!(authority = connect.authority(), "CONNECT without an ip:port authority");
            return connect.refuse(StatusCode::BAD_REQUEST);
        };
        // Fail closed: only the services that use this waypoint, and only with a view.
        let Some(service) = tables.index.service(target).filter(|s| self.serves(s)).cloned() else {
            debug!(%target, "CONNECT to a service that does not use this waypoint");
            return connect.refuse(StatusCode::SERVICE_UNAVAILABLE);
        };
        let addr = connect
            .request
            .headers
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .and_then(forwarded_for)
            .unwrap_or(connect.peer);
        let workload = tables.index.workload(addr.ip()).cloned();
        let caller = Caller { identity: connect.identity.clone(), addr, workload };
        let Ok(stream) = connect.accept() else { return };
        match protocol_of(&service) {
            Protocol::Http | Protocol::Unknown => proxy::serve(self, service, caller, target, stream).await,
            Protocol::Tcp => proxy::relay_tcp(self, service, caller, target, stream).await,
        }
    }
}

/// The span exporters' counters as `mesh_waypoint_spans{provider, result}`, so that
/// spans dropped at a full queue or lost to a failing collector are seen on the
/// metrics endpoint (export never waits for the collector, so this is where it shows).
pub struct SpanMetrics(pub Arc<Waypoint>);

impl std::fmt::Debug for SpanMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanMetrics").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for SpanMetrics {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let counters: Vec<(String, Arc<otlp::ExportCounters>)> = {
            let exporters = self.0.exporters.lock().expect("lock");
            exporters.iter().map(|(name, (_, sender))| (name.clone(), sender.counters().clone())).collect()
        };
        let samples: Vec<(&str, &str, u64)> = counters
            .iter()
            .flat_map(|(name, c)| {
                [
                    (name.as_str(), "exported", c.exported.load(Relaxed)),
                    (name.as_str(), "dropped", c.dropped.load(Relaxed)),
                    (name.as_str(), "failed", c.failed.load(Relaxed)),
                ]
            })
            .collect();
        admin::encode_family(
            &mut encoder,
            "mesh_waypoint_spans",
            "Spans by export result (exported, dropped at the full queue, failed), by tracing provider.",
            prometheus_client::metrics::MetricType::Counter,
            samples.iter().map(|(provider, result, n)| (vec![("provider", *provider), ("result", *result)], *n as i64)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_reads_the_forms_agents_send() {
        assert_eq!(forwarded_for("for=\"10.0.0.1:3456\""), Some("10.0.0.1:3456".parse().unwrap()));
        assert_eq!(forwarded_for("for=10.0.0.1"), Some("10.0.0.1:0".parse().unwrap()));
        assert_eq!(forwarded_for("for=\"[fd00::1]:80\""), Some("[fd00::1]:80".parse().unwrap()));
        assert_eq!(forwarded_for("proto=http;for=\"[fd00::1]\""), Some("[fd00::1]:0".parse().unwrap()));
        assert_eq!(forwarded_for("by=x"), None);
    }
}
