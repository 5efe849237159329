//! Upstream peers: the endpoints of one destination (host, subset, port) with their
//! traffic policy, balancer, outlier state and circuit breaker. The policy and the
//! endpoint list follow the config version; outlier state and breaker counters live
//! across versions, keyed by destination and endpoint.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Instant,
};

use mesh_proxy::{
    dns::Resolver,
    workloads::{Index, Workload},
};
use mesh_waypoint::{
    balance::{
        Balancer, PickContext,
        locality::{Client, EndpointInfo, Locality, LocalityPlan},
    },
    limits::Breaker,
    outlier::{CallResult, Outliers},
    policy::{Missing, Resolved, selects},
};
use tracing::info;

use crate::upstream::Target;

/// (host, subset, port)
pub type Key = (String, Option<String>, u16);

/// What turns the addresses of endpoints known by name into targets.
pub struct Names<'a> {
    pub resolver: &'a Resolver,
    /// The waypoint pod's own addresses (also its address families).
    pub own: &'a [IpAddr],
}

impl Names<'_> {
    /// The target at `addr`, an address of a name whose endpoint is `named`: a pod
    /// there is that pod (its own tunnel and identity); an address that is not one to
    /// send to from here is none: loopback, unspecified, the waypoint's own, a Service
    /// VIP (not routed twice), or of a family the waypoint has no address of.
    fn target(&self, index: &Index, named: &Arc<Workload>, addr: SocketAddr) -> Option<Target> {
        let ip = addr.ip().to_canonical();
        let family = self.own.is_empty() || self.own.iter().any(|own| own.is_ipv6() == ip.is_ipv6());
        if ip.is_loopback() || ip.is_unspecified() || self.own.contains(&ip) || !family || index.service(addr).is_some()
        {
            return None;
        }
        let workload = index.workload(ip).filter(|w| !w.entry).unwrap_or(named).clone();
        Some(Target { workload, addr: SocketAddr::new(ip, addr.port()) })
    }
}

/// The state of a destination that outlives config versions.
pub struct Health {
    pub breaker: Arc<Breaker>,
    outliers: Mutex<Option<(Outliers<String>, Instant)>>,
}

pub struct Destination {
    pub key: Key,
    pub policy: Resolved,
    pub endpoints: Vec<Target>,
    /// The endpoints' keys (address) for outlier state, in `endpoints`' order.
    keys: Vec<String>,
    balancer: Balancer,
    /// Priorities and locality weights seen from the waypoint (`None`: no effect).
    locality: Option<LocalityPlan>,
    active: Vec<AtomicU32>,
    pub health: Arc<Health>,
}

/// What resolving a destination can come to.
pub enum Lookup {
    Found(Arc<Destination>),
    /// No `DestinationRule` defines the subset (503 NR).
    Missing(Missing),
    /// Neither a Service nor its port is known (503 NR).
    Unknown,
}

impl Destination {
    /// `me` is the waypoint as a client of the destination: its locality and labels.
    pub fn resolve(
        index: &Index,
        config: &mesh_common::config::Config,
        waypoint_namespace: &str,
        me: Client<'_>,
        key: &Key,
        health: &Mutex<HashMap<Key, Arc<Health>>>,
        names: &Names<'_>,
    ) -> Lookup {
        let (host, subset, port) = key;
        let Some(service) = index.service_by_host(host, *port) else { return Lookup::Unknown };
        let policy = match Resolved::for_destination(config, host, waypoint_namespace, subset.as_deref(), *port) {
            Ok(policy) => policy,
            Err(missing) => return Lookup::Missing(missing),
        };
        let mut endpoints: Vec<Target> = service
            .endpoints
            .iter()
            .filter(|e| selects(&policy.labels, &e.workload.labels))
            .filter_map(|e| {
                let ip = e.workload.ips.first()?;
                Some(Target { workload: e.workload.clone(), addr: SocketAddr::new(*ip, e.port) })
            })
            .collect();
        // An endpoint known by name stands for every address its name resolves to
        // (those resolved so far: see `Tables::destination`).
        for named in service.names.iter().filter(|n| selects(&policy.labels, &n.workload.labels)) {
            for ip in names.resolver.cached(&named.host).iter().flat_map(|addrs| addrs.iter()) {
                let addr = SocketAddr::new(*ip, named.port);
                if let Some(target) = names.target(index, &named.workload, addr)
                    && !endpoints.iter().any(|t| t.addr == addr)
                {
                    endpoints.push(target);
                }
            }
        }
        let keys: Vec<String> = endpoints.iter().map(|t| t.addr.to_string()).collect();
        let balancer = Balancer::new(&policy.lb, &keys);
        let localities: Vec<Locality> = endpoints.iter().map(|t| Locality::from_labels(&t.workload.labels)).collect();
        let infos: Vec<EndpointInfo> = endpoints
            .iter()
            .zip(&localities)
            .map(|(t, locality)| EndpointInfo { locality, labels: &t.workload.labels })
            .collect();
        let locality = LocalityPlan::new(policy.locality.as_ref(), policy.outlier.is_some(), me, &infos);
        let health = health
            .lock()
            .expect("lock")
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Health { breaker: Breaker::new(), outliers: Mutex::new(None) }))
            .clone();
        {
            let mut outliers = health.outliers.lock().expect("lock");
            match (&policy.outlier, outliers.as_mut()) {
                (Some(config), Some((state, _))) if state.config() == config => state.set_endpoints(keys.clone()),
                (Some(config), _) => *outliers = Some((Outliers::new(*config, keys.clone()), Instant::now())),
                (None, _) => *outliers = None,
            }
        }
        let active = endpoints.iter().map(|_| AtomicU32::new(0)).collect();
        Lookup::Found(Arc::new(Self { key: key.clone(), policy, endpoints, keys, balancer, locality, active, health }))
    }

    /// An endpoint for one try, avoiding `tried` when others are eligible.
    pub fn pick(&self, hash: Option<u64>, roll: u64, tried: &[usize]) -> Option<usize> {
        let now = Instant::now();
        let outliers = self.sweep(now);
        let eligible_now = |i: usize| {
            outliers
                .as_ref()
                .is_none_or(|(o, _)| self.keys.get(i).and_then(|k| o.position(i, k)).is_none_or(|j| o.eligible(j, now)))
        };
        let active = |i: usize| self.active.get(i).map_or(0, |a| a.load(Ordering::Relaxed));
        // Locality first: the priority (and locality) this pick may use; the request's
        // hash keeps a key in its priority, else a roll independent of the balancer's.
        let choice = self.locality.as_ref().and_then(|plan| {
            plan.choose(&eligible_now, hash.unwrap_or_else(|| mesh_waypoint::balance::xxh64(&roll.to_le_bytes(), 7)))
        });
        let in_plan = |i: usize| {
            self.locality.as_ref().is_none_or(|plan| plan.usable(i) && choice.is_none_or(|c| plan.admits(&c, i)))
        };
        let fresh = |i: usize| eligible_now(i) && !tried.contains(&i) && in_plan(i);
        let usable = |i: usize| eligible_now(i) && in_plan(i);
        let picked = self.balancer.pick(&PickContext { hash, roll, active: &active, eligible: &fresh });
        picked.or_else(|| self.balancer.pick(&PickContext { hash, roll, active: &active, eligible: &usable }))
    }

    /// Readmits endpoints whose ejection is over, at most once per interval.
    fn sweep(&self, now: Instant) -> std::sync::MutexGuard<'_, Option<(Outliers<String>, Instant)>> {
        let mut outliers = self.health.outliers.lock().expect("lock");
        if let Some((state, last)) = outliers.as_mut()
            && now.duration_since(*last) >= state.config().interval.min(std::time::Duration::from_secs(1))
        {
            *last = now;
            for i in state.sweep(now) {
                info!(destination = ?self.key, endpoint = ?self.endpoints.get(i).map(|t| t.addr), "endpoint readmitted");
            }
        }
        outliers
    }

    /// Counts a request in flight to endpoint `i` (least request) until the guard drops.
    pub fn start(self: &Arc<Self>, i: usize) -> ActiveGuard {
        if let Some(a) = self.active.get(i) {
            a.fetch_add(1, Ordering::Relaxed);
        }
        ActiveGuard { destination: Arc::clone(self), i }
    }

    /// Feeds outlier detection with how a call to endpoint `i` ended.
    pub fn record(&self, i: usize, result: CallResult) {
        let mut outliers = self.health.outliers.lock().expect("lock");
        if let Some((state, _)) = outliers.as_mut()
            && let Some(j) = self.keys.get(i).and_then(|k| state.position(i, k))
            && let Some(ejection) = state.record(j, result, Instant::now())
        {
            info!(destination = ?self.key, endpoint = ?self.endpoints.get(i).map(|t| t.addr), reason = ?ejection.reason, times = ejection.times, "endpoint ejected");
        }
    }
}

pub struct ActiveGuard {
    destination: Arc<Destination>,
    i: usize,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(a) = self.destination.active.get(self.i) {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
