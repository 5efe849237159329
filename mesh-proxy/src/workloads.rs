//! The node view, indexed for the data path: every workload by IP and every service
//! by VIP and port. Rebuilt once per configuration version; connections look up an
//! immutable snapshot.
//!
//! Workloads are pods, `WorkloadEntry`s (VMs) and the endpoints a `ServiceEntry` writes
//! inline; services are Kubernetes Services and the hosts of `ServiceEntry`s of
//! resolution `STATIC` or `DNS`, as Istio's ambient index builds them. A `DNS` entry's
//! hostname endpoints (or its host, when it lists none) are [`Named`] endpoints, which
//! the proxies resolve when they use them ([`crate::dns`]). A `ServiceEntry` with
//! resolution `NONE` is no service here: its traffic goes to the address it was sent
//! to, as before the entry existed.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use mesh_common::config::{
    Config, DNS_DOMAIN,
    gateway::{GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL, WAYPOINT_PORT},
    k8s::{EndpointSlice, Pod, ServicePort as ServicePortSpec},
    meta::{IntOrString, Labels, ObjectMeta},
    networking::{Resolution, ServiceEntry, WorkloadEntrySpec},
};

/// Istio's label for a workload outside Kubernetes that terminates HBONE itself.
pub const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";
/// Istio's annotation that puts a `WorkloadEntry` or `ServiceEntry` endpoint in the mesh.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// A workload the node view knows (a pod of any node).
#[derive(Debug)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    /// SPIFFE identity.
    pub identity: String,
    /// Captured by the mesh: reached through the tunnel on its port 15008.
    pub meshed: bool,
    pub labels: mesh_common::config::meta::Labels,
    pub ips: Vec<IpAddr>,
    /// Takes service traffic (its `Ready` condition is not false): a pod that is
    /// starting or failing its readiness probe keeps its identity but gets no traffic
    /// through service VIPs.
    pub ready: bool,
    /// Container port names -> numbers, to resolve named service target ports; for a
    /// workload outside Kubernetes, its `ports` map.
    ports: Vec<(String, u16)>,
    /// A `WorkloadEntry` or a `ServiceEntry`'s inline endpoint, not a pod: never an
    /// enrolled pod's workload nor a waypoint instance.
    pub entry: bool,
}

impl Workload {
    /// The workload's "canonical" name for telemetry: its `app` label, else its name.
    pub fn app(&self) -> &str {
        self.labels
            .get("app.kubernetes.io/name")
            .or_else(|| self.labels.get("app"))
            .map_or(self.name.as_str(), String::as_str)
    }

    /// The workload's canonical revision for telemetry, as Istio derives it:
    /// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else
    /// `version`, else `latest`. Kiali's graph names versioned app nodes by it.
    pub fn revision(&self) -> &str {
        self.labels
            .get("service.istio.io/canonical-revision")
            .or_else(|| self.labels.get("app.kubernetes.io/version"))
            .or_else(|| self.labels.get("version"))
            .map_or("latest", String::as_str)
    }

    /// The port named `name` (a container port, or a `WorkloadEntry`'s `ports` key).
    fn port_named(&self, name: &str) -> Option<u16> {
        self.ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p)
    }

    /// The port this workload serves a Kubernetes Service port on: a number as it
    /// is, a name looked up in the workload's ports (no such port: no endpoint).
    fn target_port(&self, target: Option<&IntOrString>, number: u16) -> Option<u16> {
        match target {
            None => Some(number),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(wanted)) => self.port_named(wanted),
        }
    }
}

/// What declared a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// A Kubernetes `Service`.
    Service,
    /// A host of an Istio `ServiceEntry`.
    ServiceEntry,
}

#[derive(Debug)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub port: u16,
}

impl Endpoint {
    /// The workload and its address (of the IPv6 family when `v6` and it has one).
    fn addr(&self, v6: bool) -> Option<(Arc<Workload>, SocketAddr)> {
        let ips = &self.workload.ips;
        let ip = ips.iter().find(|ip| ip.is_ipv6() == v6).or_else(|| ips.first())?;
        Some((self.workload.clone(), SocketAddr::new(*ip, self.port)))
    }
}

/// An endpoint known by name: a hostname endpoint of a `ServiceEntry` of resolution
/// `DNS`, or the entry's host itself when it lists no endpoint. Its addresses are the
/// name's ([`crate::dns::Resolver`]); `workload` stands for every one of them (the
/// endpoint's labels for subsets, its identity, whether it is in the mesh) and has no
/// address of its own.
#[derive(Debug)]
pub struct Named {
    pub host: String,
    pub port: u16,
    pub workload: Arc<Workload>,
}

/// One port of one service VIP.
#[derive(Debug)]
pub struct ServicePort {
    pub kind: ServiceKind,
    /// The `Service`'s or `ServiceEntry`'s name.
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`, or the `ServiceEntry`'s host.
    pub hostname: String,
    /// The service port number.
    pub port: u16,
    /// The port's `appProtocol`, else its name (Istio reads the protocol from the
    /// name's prefix: `http`, `http2`, `grpc`, `tcp`, ...).
    pub protocol: String,
    pub endpoints: Vec<Endpoint>,
    /// Endpoints resolved by name when used (a `DNS` `ServiceEntry`'s).
    pub names: Vec<Named>,
    /// The waypoint the service's traffic goes through (`istio.io/use-waypoint` on the
    /// Service, else on its namespace).
    pub waypoint: Option<Arc<Waypoint>>,
    /// A `ServiceEntry`'s `exportTo` (empty: every namespace).
    export_to: Vec<String>,
    next: AtomicUsize,
}

/// A waypoint (a Gateway of class `istio-waypoint`) and its pods.
#[derive(Debug)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    /// Its ready pods: the tunnel goes to one of them on port 15008.
    pub pods: Vec<Arc<Workload>>,
    next: AtomicUsize,
}

impl Waypoint {
    /// Round robin over the waypoint's pods: the pod and its HBONE address.
    pub fn pick(&self, v6: bool) -> Option<(Arc<Workload>, SocketAddr)> {
        let n = self.pods.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|i| {
            let pod = &self.pods[(start + i) % n];
            let ip = pod.ips.iter().find(|ip| ip.is_ipv6() == v6).or_else(|| pod.ips.first())?;
            Some((pod.clone(), SocketAddr::new(*ip, WAYPOINT_PORT)))
        })
    }
}

impl ServicePort {
    /// Does a client in namespace `ns` see this service (`exportTo`: `*`, `.` for the
    /// service's own namespace, a namespace by name, `~` for none)?
    pub fn visible_to(&self, ns: &str) -> bool {
        self.export_to.is_empty()
            || self.export_to.iter().any(|e| e == "*" || e == ns || (e == "." && ns == self.namespace))
    }

    /// The `destination_service_name` of a waypoint's request telemetry: the Service's
    /// name, or the `ServiceEntry`'s host, as Istio's waypoint (Envoy) reports it.
    /// (ztunnel, and so the agent, reports the entry's name.)
    pub fn telemetry_name(&self) -> &str {
        match self.kind {
            ServiceKind::Service => &self.name,
            ServiceKind::ServiceEntry => &self.hostname,
        }
    }

    /// Round robin over the endpoints with an address, preferring an IPv6 address when
    /// `v6`.
    pub fn pick(&self, v6: bool) -> Option<(Arc<Workload>, SocketAddr)> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|i| self.endpoints[(start + i) % n].addr(v6))
    }

    /// Round robin over all endpoints: one with an address, or (`Err(i)`) the endpoint
    /// known by name `names[i]`.
    fn pick_any(&self, v6: bool) -> Option<Result<(Arc<Workload>, SocketAddr), usize>> {
        let n = self.endpoints.len() + self.names.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|k| {
            let i = (start + k) % n;
            match i.checked_sub(self.endpoints.len()) {
                Some(name) => Some(Err(name)),
                None => self.endpoints[i].addr(v6).map(Ok),
            }
        })
    }
}

/// The indexed node view.
#[derive(Debug, Default)]
pub struct Index {
    /// The view's version (0: no view; every lookup then says "unknown").
    pub version: u64,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: HashMap<SocketAddr, Arc<ServicePort>>,
    /// The same service ports by (hostname, port).
    by_host: HashMap<(String, u16), Arc<ServicePort>>,
}

/// Where an outbound connection goes.
#[derive(Debug)]
pub enum Route {
    /// To the endpoint `service.names[name]`, once its name is resolved (which the
    /// index, a snapshot without I/O, leaves to the caller).
    Resolve { service: Arc<ServicePort>, name: usize },
    /// Through the tunnel, to the proxy at `hbone` (port 15008), which presents
    /// `workload`'s identity, asking for `addr`: a meshed workload's IP and target
    /// port, or a service VIP and port when `hbone` is the service's waypoint.
    Tunnel { workload: Arc<Workload>, addr: SocketAddr, hbone: SocketAddr, service: Option<Arc<ServicePort>> },
    /// The service uses a waypoint that has no ready pod: refused, never bypassed.
    NoWaypoint { service: Arc<ServicePort> },
    /// Straight to `addr` (unmeshed or unknown destination).
    Direct { addr: SocketAddr, workload: Option<Arc<Workload>>, service: Option<Arc<ServicePort>> },
    /// A service VIP without any endpoint.
    NoEndpoint { service: Arc<ServicePort> },
}

impl Index {
    /// The index marked as built from view `version`.
    #[must_use]
    pub fn at(mut self, version: u64) -> Self {
        self.version = version;
        self
    }

    pub fn build(config: &Config) -> Self {
        let mut by_ip = HashMap::new();
        let mut workloads = Vec::new();
        for pod in &config.pods {
            let Some(workload) = workload_of(config, pod) else { continue };
            let workload = Arc::new(workload);
            for ip in &workload.ips {
                by_ip.insert(*ip, workload.clone());
            }
            workloads.push(workload);
        }
        // Workloads outside Kubernetes; an address a pod has stays the pod's.
        for entry in &config.workload_entries {
            let (meta, spec) = (&entry.metadata, &entry.spec);
            // The spec's labels and the object's, the object's winning (as Istio merges them).
            let mut labels = spec.labels.clone();
            labels.extend(meta.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            // Only an IP address makes a workload (the mesh resolves a `ServiceEntry`'s
            // names, not a `WorkloadEntry`'s).
            let Ok(ip) = spec.address.parse::<IpAddr>() else { continue };
            let workload = entry_workload(config, meta, spec, labels, vec![ip]);
            let workload = Arc::new(workload);
            if !claims(&by_ip, &workload) {
                continue;
            }
            for ip in &workload.ips {
                by_ip.insert(*ip, workload.clone());
            }
            workloads.push(workload);
        }
        // Grouped once, so that each service looks only at its own namespace's pods and
        // its own slices (not at every pod and slice of the mesh).
        let mut by_namespace: HashMap<&str, Vec<&Arc<Workload>>> = HashMap::new();
        for workload in &workloads {
            by_namespace.entry(workload.namespace.as_str()).or_default().push(workload);
        }
        let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for slice in &config.endpoint_slices {
            if let Some(service) = slice.service_name() {
                slices_of.entry((slice.metadata.namespace.as_str(), service)).or_default().push(slice);
            }
        }
        let waypoints = waypoints(config, &by_namespace);
        let mut services = HashMap::new();
        let mut by_host = HashMap::new();
        for service in &config.services {
            let spec = &service.spec;
            let vips: Vec<IpAddr> = spec
                .cluster_ip
                .iter()
                .chain(&spec.cluster_ips)
                .filter_map(|ip| ip.parse().ok())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if vips.is_empty() {
                continue;
            }
            let ns = &service.metadata.namespace;
            let name = &service.metadata.name;
            // The cluster's EndpointSlices when there are any (they also list endpoints
            // outside the view and endpoints of Services without a selector), else the
            // pods the selector picks; and the `WorkloadEntry`s the selector picks
            // either way (Kubernetes lists no such endpoint; Istio adds them).
            let slices = slices_of.get(&(ns.as_str(), name.as_str())).map_or(&[][..], Vec::as_slice);
            let members: Vec<&Arc<Workload>> = match &spec.selector {
                Some(selector) if !selector.is_empty() => by_namespace
                    .get(ns.as_str())
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .copied()
                    .filter(|w| w.ready && (w.entry || slices.is_empty()))
                    .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                    .collect(),
                _ => Vec::new(),
            };
            for port in &spec.ports {
                if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                    continue;
                }
                let mut endpoints: Vec<Endpoint> = members
                    .iter()
                    .filter_map(|w| {
                        let target = w.target_port(port.target_port.as_ref(), port.port as u16)?;
                        Some(Endpoint { workload: (*w).clone(), port: target })
                    })
                    .collect();
                for slice in slices {
                    endpoints.extend(slice_endpoints(slice, port, &by_ip, ns));
                }
                let entry = Arc::new(ServicePort {
                    kind: ServiceKind::Service,
                    name: service.metadata.name.clone(),
                    namespace: ns.clone(),
                    hostname: format!("{}.{ns}.svc.{DNS_DOMAIN}", service.metadata.name),
                    port: port.port as u16,
                    protocol: port.app_protocol.clone().or_else(|| port.name.clone()).unwrap_or_default(),
                    endpoints,
                    names: Vec::new(),
                    waypoint: waypoint_of(config, &service.metadata, &waypoints),
                    export_to: Vec::new(),
                    next: AtomicUsize::new(0),
                });
                by_host.insert((entry.hostname.clone(), entry.port), entry.clone());
                for vip in &vips {
                    services.insert(SocketAddr::new(*vip, port.port as u16), entry.clone());
                }
            }
        }
        // A Service's VIP or host stays the Service's.
        let taken = services.keys().map(SocketAddr::ip).collect();
        for entry in &config.service_entries {
            let Some(ports) = entry_service(config, entry, &mut by_ip, &by_namespace, &waypoints, &taken) else {
                continue;
            };
            for (vips, port) in ports {
                by_host.entry((port.hostname.clone(), port.port)).or_insert_with(|| port.clone());
                for vip in vips {
                    services.entry(SocketAddr::new(vip, port.port)).or_insert_with(|| port.clone());
                }
            }
        }
        Self { version: 0, by_ip, services, by_host }
    }

    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// The pod that has any of `ips` (an enrolled pod as the config knows it): never a
    /// workload outside Kubernetes at a pod's address.
    pub fn workload_of(&self, ips: &[IpAddr]) -> Option<&Arc<Workload>> {
        ips.iter().find_map(|ip| self.by_ip.get(ip)).filter(|w| !w.entry)
    }

    /// The service port at a VIP and port.
    pub fn service(&self, vip: SocketAddr) -> Option<&Arc<ServicePort>> {
        self.services.get(&vip)
    }

    /// The service port of `hostname` (`name.namespace.svc.cluster.local`) and `port`.
    pub fn service_by_host(&self, hostname: &str, port: u16) -> Option<&Arc<ServicePort>> {
        self.by_host.get(&(hostname.to_owned(), port))
    }

    /// Decides how to reach `dst` (an original destination of a captured connection
    /// of a client in namespace `from`; a service not exported there is not seen).
    /// An IPv4-mapped IPv6 destination (a dual-stack socket connecting to an IPv4
    /// address, as gRPC and Java clients do) is the IPv4 address.
    pub fn route(&self, dst: SocketAddr, from: &str) -> Route {
        let dst = match dst {
            SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().map_or(dst, |v4| SocketAddr::new(v4.into(), v6.port())),
            SocketAddr::V4(_) => dst,
        };
        if let Some(service) = self.services.get(&dst).filter(|s| s.visible_to(from)) {
            if let Some(waypoint) = &service.waypoint {
                return match waypoint.pick(dst.is_ipv6()) {
                    Some((workload, hbone)) => {
                        Route::Tunnel { workload, addr: dst, hbone, service: Some(service.clone()) }
                    }
                    None => Route::NoWaypoint { service: service.clone() },
                };
            }
            return match service.pick_any(dst.is_ipv6()) {
                Some(Ok((workload, addr))) => to_endpoint(service, workload, addr),
                Some(Err(name)) => Route::Resolve { service: service.clone(), name },
                None => Route::NoEndpoint { service: service.clone() },
            };
        }
        match self.by_ip.get(&dst.ip()) {
            Some(workload) if workload.meshed => {
                Route::Tunnel { workload: workload.clone(), addr: dst, hbone: hbone_of(dst), service: None }
            }
            workload => Route::Direct { addr: dst, workload: workload.cloned(), service: None },
        }
    }
}

impl Index {
    /// The route to `addr`, an address the endpoint `service.names[name]` resolved to
    /// for a client in namespace `from`: a pod there keeps its own tunnel and identity;
    /// a Service's VIP is that Service's, routed as the index routes it (through its
    /// waypoint); a `ServiceEntry`'s VIP is not followed (no endpoint); any other
    /// address is the named endpoint's (through the tunnel when its entry is in the
    /// mesh), also one another entry claims (an entry of any namespace cannot take
    /// over, or downgrade, traffic to a name it does not own).
    pub fn resolved(&self, service: &Arc<ServicePort>, name: usize, addr: SocketAddr, from: &str) -> Route {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        if let Some(other) = self.services.get(&addr) {
            return match other.kind {
                ServiceKind::Service => self.route(addr, from),
                ServiceKind::ServiceEntry => Route::NoEndpoint { service: service.clone() },
            };
        }
        match self.by_ip.get(&addr.ip()) {
            Some(pod) if !pod.entry => to_endpoint(service, pod.clone(), addr),
            _ => match service.names.get(name) {
                Some(named) => to_endpoint(service, named.workload.clone(), addr),
                None => Route::NoEndpoint { service: service.clone() },
            },
        }
    }

    /// A route to one of `service`'s endpoints with an address (when the endpoint name
    /// a connection picked does not resolve), or none.
    pub fn by_address(service: &Arc<ServicePort>, v6: bool) -> Route {
        match service.pick(v6) {
            Some((workload, addr)) => to_endpoint(service, workload, addr),
            None => Route::NoEndpoint { service: service.clone() },
        }
    }
}

/// To `workload` at `addr`, an endpoint of `service`: through the tunnel when it is
/// in the mesh, else directly.
fn to_endpoint(service: &Arc<ServicePort>, workload: Arc<Workload>, addr: SocketAddr) -> Route {
    if workload.meshed {
        Route::Tunnel { workload, addr, hbone: hbone_of(addr), service: Some(service.clone()) }
    } else {
        Route::Direct { addr, workload: Some(workload), service: Some(service.clone()) }
    }
}

/// A meshed workload's tunnel address: its IP on port 15008.
fn hbone_of(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), WAYPOINT_PORT)
}

/// The waypoints the config declares, by (namespace, name), with their ready pods.
fn waypoints(
    config: &Config,
    by_namespace: &HashMap<&str, Vec<&Arc<Workload>>>,
) -> HashMap<(String, String), Arc<Waypoint>> {
    config
        .gateways
        .iter()
        .filter(|g| g.is_waypoint() && matches!(g.waypoint_for(), "service" | "all"))
        .map(|g| {
            let (ns, name) = (&g.metadata.namespace, &g.metadata.name);
            let pods = by_namespace
                .get(ns.as_str())
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .filter(|w| w.ready && !w.entry && w.labels.get(GATEWAY_NAME_LABEL) == Some(name))
                .map(|w| (*w).clone())
                .collect();
            let waypoint = Waypoint { name: name.clone(), namespace: ns.clone(), pods, next: AtomicUsize::new(0) };
            ((ns.clone(), name.clone()), Arc::new(waypoint))
        })
        .collect()
}

/// A `WorkloadEntry`'s (or inline endpoint's) ports: name -> number.
type PortMap = std::collections::BTreeMap<String, u32>;

/// Whether `workload` (outside Kubernetes) may take its addresses in `by_ip`: a pod's
/// address stays the pod's; between entries a meshed one wins (its tunnel and identity
/// must not be lost to a plaintext entry at the same address).
fn claims(by_ip: &HashMap<IpAddr, Arc<Workload>>, workload: &Workload) -> bool {
    workload.ips.iter().all(|ip| by_ip.get(ip).is_none_or(|held| held.entry && !held.meshed && workload.meshed))
}

/// The ports of the hosts of `ServiceEntry` `entry`, each with its VIPs, or `None`
/// when the entry is no service of the data path: resolution `NONE`, unless the entry
/// uses a waypoint (then it is a service without endpoints: its traffic goes to the
/// waypoint, which refuses what it cannot route, instead of around it). A `DNS`
/// entry's hostname endpoints, or its hosts when it lists no endpoint, are [`Named`]
/// endpoints, resolved when used. An inline endpoint at a pod's address
/// is that pod; any other is a workload of the entry's own (its labels for subsets,
/// its service account, in the mesh when the entry is labelled or annotated for it).
/// With a `workloadSelector`, the endpoints are the ready pods and `WorkloadEntry`s of
/// the entry's namespace that it picks. An address that is a workload's or a
/// Service's (`taken`) is no VIP of the entry: an entry does not take over traffic
/// that has an owner.
fn entry_service(
    config: &Config,
    entry: &ServiceEntry,
    by_ip: &mut HashMap<IpAddr, Arc<Workload>>,
    by_namespace: &HashMap<&str, Vec<&Arc<Workload>>>,
    waypoints: &HashMap<(String, String), Arc<Waypoint>>,
    taken: &std::collections::HashSet<IpAddr>,
) -> Option<Vec<(Vec<IpAddr>, Arc<ServicePort>)>> {
    let (meta, spec) = (&entry.metadata, &entry.spec);
    let ns = meta.namespace.as_str();
    let dns = matches!(spec.resolution, Resolution::Dns | Resolution::DnsRoundRobin);
    // A `DNS` entry's hostname endpoints, or its hosts when it lists no endpoint:
    // (name, its workload, the endpoint's own port map when written inline).
    let by_name: Vec<(Option<&str>, Arc<Workload>, Option<&PortMap>)> = if !dns || spec.workload_selector.is_some() {
        Vec::new()
    } else if spec.endpoints.is_empty() {
        let anyone = WorkloadEntrySpec::default();
        let workload = entry_workload(config, meta, &anyone, Labels::new(), Vec::new());
        vec![(None, Arc::new(workload), None)]
    } else {
        spec.endpoints
            .iter()
            .filter(|e| {
                !e.address.is_empty() && !e.address.starts_with("unix://") && e.address.parse::<IpAddr>().is_err()
            })
            .map(|e| {
                let workload = entry_workload(config, meta, e, e.labels.clone(), Vec::new());
                (Some(e.address.as_str()), Arc::new(workload), Some(&e.ports))
            })
            .collect()
    };
    // (workload, the endpoint's own port map when written inline)
    let members: Vec<(Arc<Workload>, Option<&PortMap>)> = match &spec.workload_selector {
        Some(selector) => by_namespace
            .get(ns)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .filter(|w| w.ready && selector.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .map(|w| ((*w).clone(), None))
            .collect(),
        None => spec
            .endpoints
            .iter()
            .filter_map(|endpoint| {
                let ip: IpAddr = endpoint.address.parse().ok()?;
                let workload = match by_ip.get(&ip) {
                    Some(pod) if !pod.entry => pod.clone(),
                    _ => {
                        let workload =
                            Arc::new(entry_workload(config, meta, endpoint, endpoint.labels.clone(), vec![ip]));
                        if claims(by_ip, &workload) {
                            by_ip.insert(ip, workload.clone());
                        }
                        workload
                    }
                };
                Some((workload, Some(&endpoint.ports)))
            })
            .collect(),
    };
    let waypoint = waypoint_of(config, meta, waypoints);
    let resolved = !matches!(spec.resolution, Resolution::None);
    if !resolved && waypoint.is_none() {
        return None;
    }
    // Single addresses are VIPs; a CIDR (`NONE`/`STATIC` only) names no one address.
    let vips: Vec<IpAddr> = spec
        .addresses
        .iter()
        .filter_map(|a| {
            let (ip, len) = a.split_once('/').unwrap_or((a, ""));
            let ip: IpAddr = ip.parse().ok()?;
            let full = if ip.is_ipv4() { "32" } else { "128" };
            (len.is_empty() || len == full).then_some(ip)
        })
        .filter(|ip| !taken.contains(ip) && by_ip.get(ip).is_none_or(|w| w.entry))
        .collect();
    let mut ports = Vec::new();
    for host in spec.hosts.iter().filter(|h| !h.contains('*')) {
        let host = host.strip_suffix('.').unwrap_or(host);
        for port in &spec.ports {
            let Ok(number) = u16::try_from(port.number) else { continue };
            if port.protocol.as_deref().is_some_and(|p| p.eq_ignore_ascii_case("UDP")) {
                continue;
            }
            let target = port.target_port.and_then(|t| u16::try_from(t).ok()).unwrap_or(number);
            // The endpoint's (or `WorkloadEntry`'s) port of this port's name, else the
            // target port.
            let port_of = |inline: Option<&PortMap>, workload: &Workload| {
                let own = match inline {
                    Some(map) => map.get(&port.name).and_then(|p| u16::try_from(*p).ok()),
                    None => workload.entry.then(|| workload.port_named(&port.name)).flatten(),
                };
                own.unwrap_or(target)
            };
            let names = by_name
                .iter()
                .map(|(name, workload, inline)| Named {
                    host: name.unwrap_or(host).to_owned(),
                    port: port_of(*inline, workload),
                    workload: workload.clone(),
                })
                .collect();
            let endpoints = if resolved {
                members
                    .iter()
                    .map(|(workload, inline)| Endpoint { workload: workload.clone(), port: port_of(*inline, workload) })
                    .collect()
            } else {
                Vec::new()
            };
            let protocol = port.protocol.as_deref().map_or_else(|| port.name.clone(), str::to_ascii_lowercase);
            let service = ServicePort {
                kind: ServiceKind::ServiceEntry,
                name: meta.name.clone(),
                namespace: ns.to_owned(),
                hostname: host.to_owned(),
                port: number,
                protocol,
                endpoints,
                names,
                waypoint: waypoint.clone(),
                export_to: spec.export_to.clone(),
                next: AtomicUsize::new(0),
            };
            ports.push((vips.clone(), Arc::new(service)));
        }
    }
    Some(ports)
}

/// A workload outside Kubernetes at `ips`: a `WorkloadEntry`, or an endpoint a
/// `ServiceEntry` writes inline (none for one known by name, see [`Named`]). It is
/// in the mesh (reached through the tunnel on its port 15008) when its object is
/// labelled `networking.istio.io/tunnel: http` or annotated
/// `ambient.istio.io/redirection: enabled`, as Istio reads it; else it is reached
/// directly.
fn entry_workload(
    config: &Config,
    object: &ObjectMeta,
    spec: &WorkloadEntrySpec,
    labels: Labels,
    ips: Vec<IpAddr>,
) -> Workload {
    let meshed = object.labels.get(TUNNEL_LABEL).is_some_and(|v| v == "http")
        || object.annotations.get(REDIRECTION_ANNOTATION).is_some_and(|v| v == "enabled");
    Workload {
        name: object.name.clone(),
        namespace: object.namespace.clone(),
        identity: config.spiffe_id(&object.namespace, spec.service_account.as_deref().unwrap_or("default")),
        meshed,
        labels,
        ips,
        ready: true,
        ports: spec.ports.iter().filter_map(|(n, p)| Some((n.clone(), u16::try_from(*p).ok()?))).collect(),
        entry: true,
    }
}

/// The waypoint a Service or `ServiceEntry` uses: its own `istio.io/use-waypoint`
/// label, else its namespace's (`none` opts out). A label naming no declared waypoint
/// is ignored, as Istio does (the service is then reached directly).
fn waypoint_of(
    config: &Config,
    service: &mesh_common::config::meta::ObjectMeta,
    waypoints: &HashMap<(String, String), Arc<Waypoint>>,
) -> Option<Arc<Waypoint>> {
    if waypoints.is_empty() {
        return None;
    }
    let ns = &service.namespace;
    let namespace = config.namespaces.iter().find(|n| n.metadata.name == *ns);
    let labels =
        if service.labels.contains_key(USE_WAYPOINT_LABEL) { &service.labels } else { &namespace?.metadata.labels };
    let name = labels.get(USE_WAYPOINT_LABEL).filter(|name| *name != "none")?;
    let waypoint_ns = labels.get(USE_WAYPOINT_NAMESPACE_LABEL).unwrap_or(ns);
    waypoints.get(&(waypoint_ns.clone(), name.clone())).cloned()
}

/// The ready endpoints of `slice` for the Service port `port` (the slice port of the
/// same name): the workload the view knows at each address, else an endpoint outside
/// the mesh's view (an unmeshed pod of another node, a VM), reached directly.
fn slice_endpoints(
    slice: &EndpointSlice,
    port: &ServicePortSpec,
    by_ip: &HashMap<IpAddr, Arc<Workload>>,
    namespace: &str,
) -> Vec<Endpoint> {
    let wanted = port.name.as_deref().unwrap_or("");
    let Some(number) = slice
        .ports
        .iter()
        .find(|p| p.name.as_deref().unwrap_or("") == wanted && p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
    else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.ready != Some(false))
        .flat_map(|e| &e.addresses)
        .filter_map(|address| address.parse::<IpAddr>().ok())
        .map(|ip| {
            let workload = by_ip.get(&ip).cloned().unwrap_or_else(|| {
                Arc::new(Workload {
                    name: "unknown".into(),
                    namespace: namespace.to_owned(),
                    identity: String::new(),
                    meshed: false,
                    labels: mesh_common::config::meta::Labels::new(),
                    ips: vec![ip],
                    ready: true,
                    ports: Vec::new(),
                    entry: false,
                })
            });
            Endpoint { workload, port: number }
        })
        .collect()
}

fn workload_of(config: &Config, pod: &Pod) -> Option<Workload> {
    let ips: Vec<IpAddr> = pod.ips().iter().filter_map(|ip| ip.parse().ok()).collect();
    if ips.is_empty() || pod.spec.host_network {
        return None;
    }
    // A pod that has ended is gone; one still `Pending` (an image still pulling, a
    // native sidecar starting) may already serve on its IP and is a workload like any
    // other, with its identity and labels, as istiod keeps it: dropping it would send
    // traffic to it in plaintext and judge traffic to it without its labels.
    if pod.has_ended() {
        return None;
    }
    let running = pod.status.phase.as_deref().is_none_or(|phase| phase == "Running");
    let service_account = pod.spec.service_account();
    Some(Workload {
        identity: config.spiffe_id(&pod.metadata.namespace, service_account),
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        meshed: config.pod_is_meshed(pod),
        labels: pod.metadata.labels.clone(),
        ips,
        ready: running && pod.is_ready(),
        ports: pod
            .spec
            .containers
            .iter()
            .chain(&pod.spec.init_containers)
            .flat_map(|c| &c.ports)
            .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
            .collect(),
        entry: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        mesh_common::config::load(&[mesh_common::config::Source::new("t.yaml", yaml)]).expect("valid")
    }

    const YAML: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: web}]
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop, labels: {app: echo}}
spec: {serviceAccountName: sa-a, containers: [{name: c, ports: [{name: web, containerPort: 8080}]}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: shop, labels: {app: echo, istio.io/dataplane-mode: none}}
spec: {containers: [{name: c, ports: [{name: web, containerPort: 9090}]}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: shop, labels: {app: echo}}
spec: {}
status: {podIP: 10.0.0.3, phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: shop, labels: {app: echo}}
spec: {containers: [{name: c, ports: [{name: web, containerPort: 8080}]}]}
status: {podIP: 10.0.0.4, phase: Running, conditions: [{type: Ready, status: 'False'}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: sql, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-x1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
- addresses: [192.0.2.7]
- addresses: [10.0.0.9]
  conditions: {ready: false, terminating: true}
ports: [{name: sql, port: 15432, protocol: TCP}]
";

    #[test]
    fn revision_follows_istios_label_order_and_defaults_to_latest() {
        let workload = |labels: &[(&str, &str)]| Workload {
            name: "w".into(),
            namespace: "shop".into(),
            identity: String::new(),
            meshed: true,
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ips: Vec::new(),
            ready: true,
            ports: Vec::new(),
            entry: false,
        };
        assert_eq!(workload(&[]).revision(), "latest");
        assert_eq!(workload(&[("version", "v2")]).revision(), "v2");
        assert_eq!(workload(&[("version", "v2"), ("app.kubernetes.io/version", "1.4")]).revision(), "1.4");
        let all =
            [("version", "v2"), ("app.kubernetes.io/version", "1.4"), ("service.istio.io/canonical-revision", "c")];
        assert_eq!(workload(&all).revision(), "c");
    }

    #[test]
    fn services_balance_over_running_endpoints_and_pick_the_path() {
        let index = Index::build(&config(YAML));
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            match index.route(vip, "shop") {
                Route::Tunnel { workload, addr, service, .. } => {
                    assert_eq!(workload.identity, "spiffe://cluster.local/ns/shop/sa/sa-a");
                    assert_eq!(service.unwrap().hostname, "echo.shop.svc.cluster.local");
                    seen.push(addr);
                }
                Route::Direct { addr, workload, .. } => {
                    assert!(!workload.unwrap().meshed);
                    seen.push(addr);
                }
                Route::NoEndpoint { .. } | Route::NoWaypoint { .. } | Route::Resolve { .. } => {
                    panic!("endpoints exist")
                }
            }
        }
        seen.sort();
        seen.dedup();
        // Named target port resolved per pod; the pending pod and the unready one are
        // no endpoints, but the unready one keeps its identity for direct traffic.
        assert_eq!(seen, vec!["10.0.0.1:8080".parse().unwrap(), "10.0.0.2:9090".parse().unwrap()]);
        assert!(matches!(index.route("10.0.0.1:8080".parse().unwrap(), "shop"), Route::Tunnel { .. }));
        assert!(matches!(
            index.route("10.0.0.2:8080".parse().unwrap(), "shop"),
            Route::Direct { workload: Some(_), .. }
        ));
        assert!(matches!(index.route("192.0.2.1:80".parse().unwrap(), "shop"), Route::Direct { workload: None, .. }));
        assert!(matches!(index.route("10.0.0.4:8080".parse().unwrap(), "shop"), Route::Tunnel { .. }));
        // The pending pod is no endpoint, but traffic to it is tunneled to its identity.
        assert!(matches!(
            index.route("10.0.0.3:8080".parse().unwrap(), "shop"),
            Route::Tunnel { workload, .. } if workload.identity == "spiffe://cluster.local/ns/shop/sa/default"
        ));
        // A dual-stack socket's IPv4-mapped destination is the IPv4 service.
        assert!(matches!(
            index.route("[::ffff:10.96.0.10]:80".parse().unwrap(), "shop"),
            Route::Tunnel { .. } | Route::Direct { workload: Some(_), .. }
        ));
        assert!(
            matches!(index.route("[::ffff:10.0.0.1]:8080".parse().unwrap(), "shop"), Route::Tunnel { addr, .. } if addr.is_ipv4())
        );
    }

    #[test]
    fn endpoint_slices_give_the_endpoints_of_services_without_a_selector() {
        let index = Index::build(&config(YAML));
        let vip: SocketAddr = "10.96.0.20:5432".parse().unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            match index.route(vip, "shop") {
                // A meshed pod the view knows: through the tunnel.
                Route::Tunnel { workload, addr, .. } => {
                    assert_eq!(workload.name, "a");
                    seen.push(addr);
                }
                // An address outside the view: directly.
                Route::Direct { addr, workload, .. } => {
                    assert!(!workload.unwrap().meshed);
                    seen.push(addr);
                }
                Route::NoEndpoint { .. } | Route::NoWaypoint { .. } | Route::Resolve { .. } => {
                    panic!("endpoints exist")
                }
            }
        }
        seen.sort();
        seen.dedup();
        // The endpoint that is not ready is left out; the slice's port is used.
        assert_eq!(seen, vec!["10.0.0.1:15432".parse().unwrap(), "192.0.2.7:15432".parse().unwrap()]);
    }

    /// The waypoint `waypoint` of namespace `shop`, and its pod.
    const WAYPOINT: &str = "\
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
";
    const WAYPOINT_POD: &str = "\
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: waypoint}
status: {podIP: 10.0.0.50}
";

    /// [`YAML`] with namespace `shop` using the waypoint.
    fn labelled_for_waypoint() -> String {
        YAML.replace(
            "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}",
            "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}",
        )
    }

    #[test]
    fn services_that_use_a_waypoint_go_to_it_and_fail_closed_without_it() {
        let waypoint = format!(
            "{WAYPOINT}\
---
apiVersion: v1
kind: Service
metadata: {{name: opted-out, namespace: shop, labels: {{istio.io/use-waypoint: none}}}}
spec: {{clusterIP: 10.96.0.30, selector: {{app: echo}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
"
        );
        let pod = WAYPOINT_POD;
        let labelled = labelled_for_waypoint();
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let index = Index::build(&config(&format!("{labelled}{waypoint}{pod}")));
        let Route::Tunnel { workload, addr, hbone, service } = index.route(vip, "shop") else { panic!("not tunneled") };
        assert_eq!(workload.identity, "spiffe://cluster.local/ns/shop/sa/waypoint");
        assert_eq!((addr, hbone), (vip, "10.0.0.50:15008".parse().unwrap()), "authority is the VIP");
        assert_eq!(service.unwrap().protocol, "http");
        // The Service's own label wins over its namespace's.
        let Route::Tunnel { hbone, .. } = index.route("10.96.0.30:80".parse().unwrap(), "shop") else { panic!() };
        assert_eq!(hbone.port(), 15008);
        assert_ne!(hbone.ip(), "10.0.0.50".parse::<IpAddr>().unwrap());
        // Declared, but no pod: refused.
        let index = Index::build(&config(&format!("{labelled}{waypoint}")));
        assert!(matches!(index.route(vip, "shop"), Route::NoWaypoint { .. }));
        // A label naming no declared waypoint is ignored (as Istio does).
        let index = Index::build(&config(&format!("{labelled}{pod}")));
        assert!(
            matches!(index.route(vip, "shop"), Route::Tunnel { hbone, .. } if hbone.ip() != "10.0.0.50".parse::<IpAddr>().unwrap())
        );
    }

    const ENTRIES: &str = "\
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: shop, labels: {networking.istio.io/tunnel: http}}
spec: {address: 10.1.0.5, labels: {app: echo}, ports: {http: 7070, web: 7071}, serviceAccount: vm}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-2, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: echo}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [240.0.0.10/32, 10.96.0.10]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1}
  - {address: 192.0.2.50, labels: {version: v9}, ports: {http: 9443}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echoes, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec:
  hosts: [echoes.internal]
  addresses: [240.0.0.11]
  ports: [{number: 80, name: http, targetPort: 8080}]
  resolution: STATIC
  workloadSelector: {labels: {app: echo}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-name, namespace: shop}
spec:
  hosts: [db.example.com]
  addresses: [240.0.0.12]
  ports: [{number: 5432, name: tcp-sql}]
  resolution: DNS
  endpoints: [{address: db-1.example.com, labels: {role: primary}}, {address: 192.0.2.70, ports: {tcp-sql: 6432}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: shop}
spec:
  hosts: [api.external.example]
  addresses: [240.0.0.15]
  ports: [{number: 443, name: tls, protocol: TLS, targetPort: 8443}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: shop}
spec:
  hosts: [any.example.com]
  addresses: [240.0.0.13]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: shop, labels: {networking.istio.io/tunnel: http}}
spec:
  hosts: [private.internal]
  addresses: [240.0.0.14, 10.0.0.2]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  exportTo: [.]
  endpoints: [{address: 192.0.2.60, serviceAccount: private}]
";

    /// Every address the service at `vip` balances over, by rounds of picks.
    fn picks(index: &Index, vip: &str) -> Vec<(String, SocketAddr, bool)> {
        let mut seen: Vec<_> = (0..8)
            .filter_map(|_| match index.route(vip.parse().unwrap(), "shop") {
                Route::Tunnel { workload, addr, .. } => Some((workload.name.clone(), addr, true)),
                Route::Direct { workload: Some(workload), addr, .. } => Some((workload.name.clone(), addr, false)),
                _ => None,
            })
            .collect();
        seen.sort();
        seen.dedup();
        seen
    }

    #[test]
    fn service_and_workload_entries_are_services_and_workloads_of_the_data_path() {
        let index = Index::build(&config(&format!("{YAML}{ENTRIES}")));
        // Inline endpoints: a pod the view knows keeps its identity (tunneled, the
        // entry's target port); an address outside it is reached directly on the
        // endpoint's own port for the port's name.
        assert_eq!(
            picks(&index, "240.0.0.10:80"),
            vec![
                ("a".into(), "10.0.0.1:8080".parse().unwrap(), true),
                ("api".into(), "192.0.2.50:9443".parse().unwrap(), false),
            ]
        );
        let api = index.service_by_host("api.example.com", 80).expect("the entry's host");
        assert_eq!((api.kind, api.name.as_str(), api.protocol.as_str()), (ServiceKind::ServiceEntry, "api", "http"));
        let outside = &api.endpoints[1].workload;
        assert_eq!(outside.labels.get("version").map(String::as_str), Some("v9"), "endpoint labels, for subsets");
        // A Service's VIP stays the Service's.
        assert_eq!(index.service("10.96.0.10:80".parse().unwrap()).unwrap().kind, ServiceKind::Service);
        // A workload selector picks the ready pods and the WorkloadEntries of the
        // entry's namespace; a WorkloadEntry labelled for the tunnel is reached through
        // it with its own identity and its port for the port's name.
        assert_eq!(
            picks(&index, "240.0.0.11:80"),
            vec![
                ("a".into(), "10.0.0.1:8080".parse().unwrap(), true),
                ("b".into(), "10.0.0.2:8080".parse().unwrap(), false),
                ("vm-1".into(), "10.1.0.5:7070".parse().unwrap(), true),
            ]
        );
        let vm = index.workload("10.1.0.5".parse().unwrap()).expect("the WorkloadEntry");
        assert_eq!(vm.identity, "spiffe://cluster.local/ns/shop/sa/vm");
        // A WorkloadEntry with a pod's address is not a second workload there.
        assert_eq!(index.workload("10.0.0.1".parse().unwrap()).unwrap().name, "a");
        // Kubernetes Services select WorkloadEntries too, as Istio does, at the entry's
        // port of the target port's name (an entry without it is no endpoint).
        assert!(picks(&index, "10.96.0.10:80").contains(&("vm-1".into(), "10.1.0.5:7071".parse().unwrap(), true)));
        // `exportTo: [.]`: the entry is seen from its own namespace only; an entry
        // labelled for the tunnel reaches its endpoints through it, with the endpoint's
        // service account; a pod's address is no entry's VIP.
        let private: SocketAddr = "240.0.0.14:80".parse().unwrap();
        assert!(matches!(
            index.route(private, "shop"),
            Route::Tunnel { workload, addr, .. }
                if addr == "192.0.2.60:80".parse().unwrap() && workload.identity == "spiffe://cluster.local/ns/shop/sa/private"
        ));
        assert!(matches!(index.route(private, "other"), Route::Direct { addr, service: None, .. } if addr == private));
        assert!(matches!(
            index.route("10.0.0.2:80".parse().unwrap(), "shop"),
            Route::Direct { workload: Some(w), service: None, .. } if w.name == "b"
        ));
        // An entry's endpoint at a pod's address is not the pod's workload for the
        // pod's own policies, and a WorkloadEntry is never an enrolled pod.
        assert!(index.workload_of(&["10.1.0.5".parse().unwrap()]).is_none());
        // A DNS entry: its IP endpoints as any, its hostname endpoints by name (round
        // robin over both), its host itself when it lists no endpoint.
        let db: SocketAddr = "240.0.0.12:5432".parse().unwrap();
        let service = index.service(db).unwrap();
        assert_eq!(service.endpoints.len(), 1);
        assert_eq!(service.endpoints[0].port, 6432);
        let [named] = &service.names[..] else { panic!("{:?}", service.names) };
        assert_eq!((named.host.as_str(), named.port), ("db-1.example.com", 5432));
        assert!(named.workload.ips.is_empty() && !named.workload.meshed);
        assert_eq!(named.workload.labels.get("role").map(String::as_str), Some("primary"));
        let routes: Vec<Route> = (0..4).map(|_| index.route(db, "shop")).collect();
        assert_eq!(routes.iter().filter(|r| matches!(r, Route::Resolve { name: 0, .. })).count(), 2, "{routes:?}");
        assert_eq!(
            routes
                .iter()
                .filter(|r| matches!(r, Route::Direct { addr, .. } if *addr == "192.0.2.70:6432".parse().unwrap()))
                .count(),
            2
        );
        let external = index.service_by_host("api.external.example", 443).unwrap();
        let [named] = &external.names[..] else { panic!("{:?}", external.names) };
        assert_eq!((named.host.as_str(), named.port), ("api.external.example", 8443));
        assert!(matches!(index.route("240.0.0.15:443".parse().unwrap(), "shop"), Route::Resolve { name: 0, .. }));
        // NONE is passthrough: connections go where they were sent, as without the entry.
        let dst: SocketAddr = "240.0.0.13:443".parse().unwrap();
        assert!(
            matches!(index.route(dst, "shop"), Route::Direct { addr, workload: None, service: None } if addr == dst)
        );
        assert!(index.service_by_host("any.example.com", 443).is_none());
    }

    #[test]
    fn a_resolved_address_is_routed_as_the_mesh_knows_it() {
        let index = Index::build(&config(&format!("{YAML}{ENTRIES}")));
        let db = index.service("240.0.0.12:5432".parse().unwrap()).unwrap().clone();
        let at = |addr: &str| index.resolved(&db, 0, addr.parse().unwrap(), "shop");
        // A meshed pod keeps its tunnel and identity; an unmeshed one is reached as
        // itself; both count as endpoints of the entry.
        assert!(matches!(at("10.0.0.1:5432"),
            Route::Tunnel { workload, service: Some(s), .. } if workload.name == "a" && s.hostname == "db.example.com"));
        assert!(matches!(at("10.0.0.2:5432"), Route::Direct { workload: Some(w), .. } if w.name == "b"));
        // An address another entry claims (here a meshed inline endpoint) is still the
        // named endpoint's: no entry takes over a name it does not own.
        assert!(matches!(at("192.0.2.60:5432"),
            Route::Direct { workload: Some(w), addr, .. } if w.name == "by-name" && addr.port() == 5432));
        // A Service's VIP is that Service's; another entry's VIP is not followed.
        assert!(matches!(at("10.96.0.10:80"),
            Route::Tunnel { service: Some(s), .. } | Route::Direct { service: Some(s), .. } if s.name == "echo"));
        assert!(matches!(at("240.0.0.11:80"), Route::NoEndpoint { service } if service.name == "by-name"));
        // Anywhere else: the named endpoint, directly (its entry is not in the mesh),
        // an IPv4-mapped answer as IPv4.
        assert!(matches!(at("[::ffff:198.51.100.1]:5432"),
            Route::Direct { workload: Some(w), addr, .. } if w.name == "by-name" && addr == "198.51.100.1:5432".parse().unwrap()));
        // A name that does not resolve: the entry's endpoint with an address.
        assert!(matches!(Index::by_address(&db, false),
            Route::Direct { addr, .. } if addr == "192.0.2.70:6432".parse().unwrap()));
    }

    #[test]
    fn service_entries_use_their_waypoint_or_their_namespaces() {
        let labelled = labelled_for_waypoint();
        let index = Index::build(&config(&format!("{labelled}{ENTRIES}{WAYPOINT}{WAYPOINT_POD}")));
        let vip: SocketAddr = "240.0.0.10:80".parse().unwrap();
        let Route::Tunnel { addr, hbone, service, .. } = index.route(vip, "shop") else {
            panic!("not to the waypoint")
        };
        assert_eq!((addr, hbone), (vip, "10.0.0.50:15008".parse().unwrap()));
        assert_eq!(service.unwrap().hostname, "api.example.com");
        // `istio.io/use-waypoint: none` on the entry opts it out.
        assert_eq!(
            picks(&index, "240.0.0.11:80").iter().map(|(name, _, _)| name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "vm-1"]
        );
        // Resolution NONE through a waypoint: to the waypoint (which refuses what it
        // cannot route), never around it.
        assert!(matches!(
            index.route("240.0.0.13:443".parse().unwrap(), "shop"),
            Route::Tunnel { hbone, .. } if hbone == "10.0.0.50:15008".parse().unwrap()
        ));
    }
}
