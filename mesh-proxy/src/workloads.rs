//! The node view, indexed for the data path: every workload by IP and every service
//! by VIP and port. Rebuilt once per configuration version; connections look up an
//! immutable snapshot.
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
    meta::IntOrString,
};

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
    /// Container port names -> numbers, to resolve named service target ports.
    ports: Vec<(String, u16)>,
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
}

#[derive(Debug)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub port: u16,
}

/// One port of one service VIP.
#[derive(Debug)]
pub struct ServicePort {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`
    pub hostname: String,
    /// The service port number.
    pub port: u16,
    /// The port's `appProtocol`, else its name (Istio reads the protocol from the
    /// name's prefix: `http`, `http2`, `grpc`, `tcp`, ...).
    pub protocol: String,
    pub endpoints: Vec<Endpoint>,
    /// The waypoint the service's traffic goes through (`istio.io/use-waypoint` on the
    /// Service, else on its namespace).
    pub waypoint: Option<Arc<Waypoint>>,
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
    /// Round robin over the endpoints, preferring an IPv6 address when `v6`.
    pub fn pick(&self, v6: bool) -> Option<(Arc<Workload>, SocketAddr)> {
        if self.endpoints.is_empty() {
            return None;
        }
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let endpoint = &self.endpoints[(start + i) % n];
            let ips = &endpoint.workload.ips;
            if let Some(ip) = ips.iter().find(|ip| ip.is_ipv6() == v6).or_else(|| ips.first()) {
                return Some((endpoint.workload.clone(), SocketAddr::new(*ip, endpoint.port)));
            }
        }
        None
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
            // pods the selector picks.
            let slices = slices_of.get(&(ns.as_str(), name.as_str())).map_or(&[][..], Vec::as_slice);
            let members: Vec<&Arc<Workload>> = match &spec.selector {
                Some(selector) if !selector.is_empty() && slices.is_empty() => by_namespace
                    .get(ns.as_str())
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .copied()
                    .filter(|w| w.ready && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
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
                        let target = match &port.target_port {
                            None => Some(port.port as u16),
                            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                            Some(IntOrString::String(name)) => w.ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p),
                        }?;
                        Some(Endpoint { workload: (*w).clone(), port: target })
                    })
                    .collect();
                for slice in slices {
                    endpoints.extend(slice_endpoints(slice, port, &by_ip, ns));
                }
                let entry = Arc::new(ServicePort {
                    name: service.metadata.name.clone(),
                    namespace: ns.clone(),
                    hostname: format!("{}.{ns}.svc.{DNS_DOMAIN}", service.metadata.name),
                    port: port.port as u16,
                    protocol: port.app_protocol.clone().or_else(|| port.name.clone()).unwrap_or_default(),
                    endpoints,
                    waypoint: waypoint_of(config, service, &waypoints),
                    next: AtomicUsize::new(0),
                });
                by_host.insert((entry.hostname.clone(), entry.port), entry.clone());
                for vip in &vips {
                    services.insert(SocketAddr::new(*vip, port.port as u16), entry.clone());
                }
            }
        }
        Self { version: 0, by_ip, services, by_host }
    }

    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// The workload that has any of `ips` (an enrolled pod as the config knows it).
    pub fn workload_of(&self, ips: &[IpAddr]) -> Option<&Arc<Workload>> {
        ips.iter().find_map(|ip| self.by_ip.get(ip))
    }

    /// The service port at a VIP and port.
    pub fn service(&self, vip: SocketAddr) -> Option<&Arc<ServicePort>> {
        self.services.get(&vip)
    }

    /// The service port of `hostname` (`name.namespace.svc.cluster.local`) and `port`.
    pub fn service_by_host(&self, hostname: &str, port: u16) -> Option<&Arc<ServicePort>> {
        self.by_host.get(&(hostname.to_owned(), port))
    }

    /// Decides how to reach `dst` (an original destination of a captured connection).
    /// An IPv4-mapped IPv6 destination (a dual-stack socket connecting to an IPv4
    /// address, as gRPC and Java clients do) is the IPv4 address.
    pub fn route(&self, dst: SocketAddr) -> Route {
        let dst = match dst {
            SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().map_or(dst, |v4| SocketAddr::new(v4.into(), v6.port())),
            SocketAddr::V4(_) => dst,
        };
        if let Some(service) = self.services.get(&dst) {
            if let Some(waypoint) = &service.waypoint {
                return match waypoint.pick(dst.is_ipv6()) {
                    Some((workload, hbone)) => {
                        Route::Tunnel { workload, addr: dst, hbone, service: Some(service.clone()) }
                    }
                    None => Route::NoWaypoint { service: service.clone() },
                };
            }
            return match service.pick(dst.is_ipv6()) {
                Some((workload, addr)) if workload.meshed => {
                    Route::Tunnel { workload, addr, hbone: hbone_of(addr), service: Some(service.clone()) }
                }
                Some((workload, addr)) => {
                    Route::Direct { addr, workload: Some(workload), service: Some(service.clone()) }
                }
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
                .filter(|w| w.ready && w.labels.get(GATEWAY_NAME_LABEL) == Some(name))
                .map(|w| (*w).clone())
                .collect();
            let waypoint = Waypoint { name: name.clone(), namespace: ns.clone(), pods, next: AtomicUsize::new(0) };
            ((ns.clone(), name.clone()), Arc::new(waypoint))
        })
        .collect()
}

/// The waypoint a Service uses: its own `istio.io/use-waypoint` label, else its
/// namespace's (`none` opts out). A label naming no declared waypoint is ignored, as
/// Istio does (the Service is then reached directly).
fn waypoint_of(
    config: &Config,
    service: &mesh_common::config::Service,
    waypoints: &HashMap<(String, String), Arc<Waypoint>>,
) -> Option<Arc<Waypoint>> {
    if waypoints.is_empty() {
        return None;
    }
    let ns = &service.metadata.namespace;
    let namespace = config.namespaces.iter().find(|n| n.metadata.name == *ns);
    let labels = if service.metadata.labels.contains_key(USE_WAYPOINT_LABEL) {
        &service.metadata.labels
    } else {
        &namespace?.metadata.labels
    };
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
            match index.route(vip) {
                Route::Tunnel { workload, addr, service, .. } => {
                    assert_eq!(workload.identity, "spiffe://cluster.local/ns/shop/sa/sa-a");
                    assert_eq!(service.unwrap().hostname, "echo.shop.svc.cluster.local");
                    seen.push(addr);
                }
                Route::Direct { addr, workload, .. } => {
                    assert!(!workload.unwrap().meshed);
                    seen.push(addr);
                }
                Route::NoEndpoint { .. } | Route::NoWaypoint { .. } => panic!("endpoints exist"),
            }
        }
        seen.sort();
        seen.dedup();
        // Named target port resolved per pod; the pending pod and the unready one are
        // no endpoints, but the unready one keeps its identity for direct traffic.
        assert_eq!(seen, vec!["10.0.0.1:8080".parse().unwrap(), "10.0.0.2:9090".parse().unwrap()]);
        assert!(matches!(index.route("10.0.0.1:8080".parse().unwrap()), Route::Tunnel { .. }));
        assert!(matches!(index.route("10.0.0.2:8080".parse().unwrap()), Route::Direct { workload: Some(_), .. }));
        assert!(matches!(index.route("192.0.2.1:80".parse().unwrap()), Route::Direct { workload: None, .. }));
        assert!(matches!(index.route("10.0.0.4:8080".parse().unwrap()), Route::Tunnel { .. }));
        // The pending pod is no endpoint, but traffic to it is tunneled to its identity.
        assert!(matches!(
            index.route("10.0.0.3:8080".parse().unwrap()),
            Route::Tunnel { workload, .. } if workload.identity == "spiffe://cluster.local/ns/shop/sa/default"
        ));
        // A dual-stack socket's IPv4-mapped destination is the IPv4 service.
        assert!(matches!(
            index.route("[::ffff:10.96.0.10]:80".parse().unwrap()),
            Route::Tunnel { .. } | Route::Direct { workload: Some(_), .. }
        ));
        assert!(
            matches!(index.route("[::ffff:10.0.0.1]:8080".parse().unwrap()), Route::Tunnel { addr, .. } if addr.is_ipv4())
        );
    }

    #[test]
    fn endpoint_slices_give_the_endpoints_of_services_without_a_selector() {
        let index = Index::build(&config(YAML));
        let vip: SocketAddr = "10.96.0.20:5432".parse().unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            match index.route(vip) {
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
                Route::NoEndpoint { .. } | Route::NoWaypoint { .. } => panic!("endpoints exist"),
            }
        }
        seen.sort();
        seen.dedup();
        // The endpoint that is not ready is left out; the slice's port is used.
        assert_eq!(seen, vec!["10.0.0.1:15432".parse().unwrap(), "192.0.2.7:15432".parse().unwrap()]);
    }

    #[test]
    fn services_that_use_a_waypoint_go_to_it_and_fail_closed_without_it() {
        let waypoint = "\
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: opted-out, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.30, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}]}
";
        let pod = "\
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: waypoint}
status: {podIP: 10.0.0.50}
";
        let labelled = YAML.replace(
            "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}",
            "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}",
        );
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let index = Index::build(&config(&format!("{labelled}{waypoint}{pod}")));
        let Route::Tunnel { workload, addr, hbone, service } = index.route(vip) else { panic!("not tunneled") };
        assert_eq!(workload.identity, "spiffe://cluster.local/ns/shop/sa/waypoint");
        assert_eq!((addr, hbone), (vip, "10.0.0.50:15008".parse().unwrap()), "authority is the VIP");
        assert_eq!(service.unwrap().protocol, "http");
        // The Service's own label wins over its namespace's.
        let Route::Tunnel { hbone, .. } = index.route("10.96.0.30:80".parse().unwrap()) else { panic!() };
        assert_eq!(hbone.port(), 15008);
        assert_ne!(hbone.ip(), "10.0.0.50".parse::<IpAddr>().unwrap());
        // Declared, but no pod: refused.
        let index = Index::build(&config(&format!("{labelled}{waypoint}")));
        assert!(matches!(index.route(vip), Route::NoWaypoint { .. }));
        // A label naming no declared waypoint is ignored (as Istio does).
        let index = Index::build(&config(&format!("{labelled}{pod}")));
        assert!(
            matches!(index.route(vip), Route::Tunnel { hbone, .. } if hbone.ip() != "10.0.0.50".parse::<IpAddr>().unwrap())
        );
    }
}
