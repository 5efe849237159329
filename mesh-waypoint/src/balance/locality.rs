//! Locality load balancing: which endpoints of a destination a pick may use, by the
//! localities of the waypoint and of the endpoints, as Istio programs Envoy for a
//! `DestinationRule`'s `localityLbSetting` (`ApplyLocalityLoadBalancer` in
//! `pilot/pkg/networking/core/loadbalancer/loadbalancer.go`) and as Envoy then spreads
//! the load over priorities and localities.
//!
//! # Localities
//! Istio reads a workload's locality from its pod's label `topology.istio.io/locality`,
//! else `istio-locality` (`region.zone.subzone`, `/` accepted too), else from its node's
//! `topology.kubernetes.io/region`/`zone` and `topology.istio.io/subzone` labels. The
//! mesh's config model has no Node objects, so only the two pod labels are read here
//! ([`Locality::from_labels`]); the waypoint's own locality comes the same way from its
//! own pod. Unlabelled workloads have the empty locality, which matches itself: without
//! labels anywhere, everything is one locality and nothing changes.
//!
//! # Priorities (`failover`, `failoverPriority`, Istio's default)
//! Only when failover is on: the destination has `outlierDetection` (Istio: "failover
//! needs outlier detection", and the mesh default `localityLbSetting: {enabled: true}`
//! makes any `outlierDetection` turn it on). Without `failoverPriority`, an endpoint's
//! priority is 0 for the waypoint's region/zone/subzone, 1 for its region/zone, 2 for its
//! region, 3 elsewhere, and 4 for other regions than the `to` of a `failover` entry whose
//! `from` is the waypoint's region. With `failoverPriority` (label names, or
//! `name=value` to compare with a fixed value), the priority is `n - j` for the first
//! label `j` that differs from the waypoint's (a differing leading
//! `topology.istio.io/network` is skipped but costs `n`); `failover` entries then refine
//! each of those priorities as above. Priorities are renumbered 0, 1, 2... without gaps.
//!
//! # Spreading (Envoy)
//! A priority's health is `min(100, 140 x healthy / total)` percent (Envoy's
//! overprovisioning factor 1.4); priorities take the load in order, each its health
//! (normalized when the sum is below 100), so traffic leaves priority 0 gradually as its
//! endpoints are ejected and all of it once none is left.
//!
//! # `distribute`
//! The first entry whose `from` matches the waypoint's locality gives each `to` pattern
//! its weight, split over the localities it matches by their endpoint counts (Istio's
//! `applyLocalityWeights`, rounded up); localities no pattern matches get nothing. A
//! locality is picked by weight times its availability (`min(1, 1.4 x healthy /
//! total)`), then the balancer picks within it. `distribute` and failover exclude each
//! other, as in Istio.
use std::collections::BTreeMap;

use mesh_common::config::meta::Labels;
use serde_json::Value;

/// Istio's pod label for a locality (`region/zone/subzone`), read first.
pub const TOPOLOGY_LOCALITY_LABEL: &str = "topology.istio.io/locality";
/// Istio's legacy pod label for a locality (`region.zone.subzone`).
pub const LOCALITY_LABEL: &str = "istio-locality";
const REGION_LABEL: &str = "topology.kubernetes.io/region";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
const NETWORK_LABEL: &str = "topology.istio.io/network";
/// Envoy's default overprovisioning factor, in percent.
const OVERPROVISIONING: u64 = 140;

/// Where a workload runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// `region/zone/subzone`, or `region.zone.subzone` when it has no `/` (Istio's
    /// `SanitizeLocalityLabel`); missing parts are empty.
    pub fn parse(text: &str) -> Self {
        let sep = if text.contains('/') { '/' } else { '.' };
        let mut parts = text.splitn(3, sep).map(str::to_string);
        Self {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        }
    }

    /// The locality a pod's labels give (see the module documentation).
    pub fn from_labels(labels: &Labels) -> Self {
        labels
            .get(TOPOLOGY_LOCALITY_LABEL)
            .or_else(|| labels.get(LOCALITY_LABEL))
            .map_or_else(Self::default, |l| Self::parse(l))
    }

    /// Istio's `LocalityMatch`: `pattern` is `region[/zone[/subzone]]`, `*` matching any
    /// part and an absent zone or subzone matching any.
    pub fn matches(&self, pattern: &str) -> bool {
        let mut parts = pattern.splitn(3, '/');
        let (region, zone, subzone) =
            (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        (region == "*" || region == self.region)
            && (zone.is_empty() || zone == "*" || zone == self.zone)
            && (subzone.is_empty() || subzone == "*" || subzone == self.subzone)
    }

    /// Istio's `LbPriority`: 0 same subzone, 1 same zone, 2 same region, 3 elsewhere.
    fn distance(&self, other: &Self) -> u32 {
        match (self.region == other.region, self.zone == other.zone, self.subzone == other.subzone) {
            (true, true, true) => 0,
            (true, true, false) => 1,
            (true, false, _) => 2,
            (false, _, _) => 3,
        }
    }

    /// A label of a workload with this locality: its own, else the topology labels
    /// Istio adds from the locality.
    fn label<'a>(&'a self, labels: &'a Labels, name: &str) -> Option<&'a str> {
        if let Some(v) = labels.get(name) {
            return Some(v);
        }
        let derived = match name {
            REGION_LABEL => &self.region,
            ZONE_LABEL => &self.zone,
            SUBZONE_LABEL => &self.subzone,
            _ => return None,
        };
        (!derived.is_empty()).then_some(derived.as_str())
    }
}

/// `localityLbSetting`, typed. [`LocalitySetting::from_istio`] gives `None` for
/// `enabled: false`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalitySetting {
    pub distribute: Vec<Distribute>,
    pub failover: Vec<Failover>,
    pub failover_priority: Vec<String>,
}

/// `distribute[]`: from the waypoint's locality (pattern), weights per destination pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Distribute {
    pub from: String,
    pub to: Vec<(String, u32)>,
}

/// `failover[]`: from the waypoint's region to another region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    pub from: String,
    pub to: String,
}

/// A field of `localityLbSetting` that could not be read: its path below the setting
/// and why.
pub type FieldError = (String, String);

impl LocalitySetting {
    /// Reads Istio's `LocalityLoadBalancerSetting`; `Ok(None)` when `enabled: false`.
    pub fn from_istio(v: &Value) -> Result<Option<Self>, FieldError> {
        let err = |field: &str, reason: &str| (field.to_string(), reason.to_string());
        let Value::Object(map) = v else { return Err(err("", "not an object")) };
        let mut out = Self::default();
        for (key, value) in map {
            match key.as_str() {
                "enabled" => match value {
                    Value::Bool(false) => return Ok(None),
                    Value::Bool(true) | Value::Null => {}
                    _ => return Err(err(".enabled", "not a boolean")),
                },
                "distribute" => {
                    for (i, d) in value.as_array().ok_or_else(|| err(".distribute", "not a list"))?.iter().enumerate() {
                        let field = format!(".distribute[{i}]");
                        let from = d.get("from").and_then(Value::as_str).unwrap_or("").to_string();
                        let mut to = Vec::new();
                        if let Some(targets) = d.get("to") {
                            let targets =
                                targets.as_object().ok_or_else(|| err(&format!("{field}.to"), "not a map"))?;
                            for (pattern, w) in targets {
                                let weight = w.as_u64().and_then(|w| u32::try_from(w).ok()).ok_or_else(|| {
                                    err(&format!("{field}.to.{pattern}"), &format!("weight {w} is not a whole number"))
                                })?;
                                to.push((pattern.clone(), weight));
                            }
                        }
                        out.distribute.push(Distribute { from, to });
                    }
                }
                "failover" => {
                    for (i, f) in value.as_array().ok_or_else(|| err(".failover", "not a list"))?.iter().enumerate() {
                        let get = |k: &str| f.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                        let (from, to) = (get("from"), get("to"));
                        if from.is_empty() || to.is_empty() {
                            return Err(err(&format!(".failover[{i}]"), "needs `from` and `to` regions"));
                        }
                        out.failover.push(Failover { from, to });
                    }
                }
                "failoverPriority" => {
                    let list = value.as_array().ok_or_else(|| err(".failoverPriority", "not a list"))?;
                    for (i, l) in list.iter().enumerate() {
                        let label =
                            l.as_str().ok_or_else(|| err(&format!(".failoverPriority[{i}]"), "not a string"))?;
                        out.failover_priority.push(label.to_string());
                    }
                }
                other => return Err(err(&format!(".{other}"), "unknown field")),
            }
        }
        Ok(Some(out))
    }
}

/// The waypoint (or any client) the plan is made for.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    pub locality: &'a Locality,
    pub labels: &'a Labels,
}

/// An endpoint as the plan sees it.
#[derive(Clone, Copy, Debug)]
pub struct EndpointInfo<'a> {
    pub locality: &'a Locality,
    pub labels: &'a Labels,
}

/// The priorities and locality weights of one destination's endpoints, for one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityPlan {
    /// Per endpoint: its priority (0 is the best, no gaps).
    priority: Vec<u32>,
    /// Per endpoint: its locality group.
    group: Vec<u32>,
    /// Per group: its `distribute` weight (0: gets nothing); `None`: no weights.
    weights: Option<Vec<u32>>,
    priorities: u32,
}

/// What one pick may use: a priority, and a locality group of it under `distribute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub priority: u32,
    pub group: Option<u32>,
}

impl LocalityPlan {
    /// The plan for `endpoints` seen from `client`; `None` when locality changes nothing
    /// (disabled, failover off without `distribute`, or a single priority).
    /// `failover` says whether the destination has outlier detection.
    pub fn new(
        setting: Option<&LocalitySetting>,
        failover: bool,
        client: Client<'_>,
        endpoints: &[EndpointInfo<'_>],
    ) -> Option<Self> {
        let setting = setting?;
        // Locality groups, in first-seen order.
        let mut groups: Vec<&Locality> = Vec::new();
        let group: Vec<u32> = endpoints
            .iter()
            .map(|e| {
                let at = groups.iter().position(|g| *g == e.locality).unwrap_or_else(|| {
                    groups.push(e.locality);
                    groups.len() - 1
                });
                u32::try_from(at).unwrap_or(u32::MAX)
            })
            .collect();
        let mut priority = vec![0u32; endpoints.len()];
        let mut weights = None;
        if !setting.distribute.is_empty() {
            weights = distribute_weights(&setting.distribute, client.locality, &groups, &group);
        } else if failover {
            if !setting.failover_priority.is_empty() && !client.labels.is_empty() {
                for (p, e) in priority.iter_mut().zip(endpoints) {
                    *p = label_priority(&setting.failover_priority, client, e);
                }
                compact(&mut priority);
            }
            if setting.failover_priority.is_empty() || !setting.failover.is_empty() {
                for (p, e) in priority.iter_mut().zip(endpoints) {
                    *p = *p * 5 + region_priority(&setting.failover, client.locality, e.locality);
                }
                compact(&mut priority);
            }
        }
        let priorities = priority.iter().max().map_or(0, |m| m + 1);
        (priorities > 1 || weights.is_some()).then_some(Self { priority, group, weights, priorities })
    }

    /// The priority of endpoint `i`.
    pub fn priority(&self, i: usize) -> Option<u32> {
        self.priority.get(i).copied()
    }

    /// What a pick may use, given which endpoints are `healthy` now and a uniform
    /// `roll` (the request's hash for consistent hashing, so a key keeps its priority);
    /// `None`: no restriction (nothing is healthy: the balancer finds no endpoint).
    pub fn choose(&self, healthy: &dyn Fn(usize) -> bool, roll: u64) -> Option<Choice> {
        let n = self.priority.len();
        let counts = |admit: &dyn Fn(usize) -> bool| -> Vec<(u64, u64)> {
            let mut per = vec![(0u64, 0u64); self.priorities as usize];
            for i in (0..n).filter(|&i| admit(i)) {
                let slot = &mut per[self.priority[i] as usize];
                slot.0 += 1;
                slot.1 += u64::from(healthy(i));
            }
            per
        };
        let per_priority = counts(&|i| self.weight_of(i) > 0);
        let health: Vec<u64> = per_priority.iter().map(|&(total, ok)| availability(total, ok)).collect();
        let sum: u64 = health.iter().sum();
        if sum == 0 {
            return None;
        }
        let normalized = sum.min(100);
        let mut loads: Vec<u64> = Vec::with_capacity(health.len());
        let mut remaining = 100u64;
        for h in &health {
            let load = (h * 100 / normalized).min(remaining);
            remaining -= load;
            loads.push(load);
        }
        if remaining > 0
            && let Some(first) = health.iter().position(|h| *h > 0)
        {
            loads[first] += remaining;
        }
        let mut point = roll % 100;
        let mut chosen = 0;
        for (p, load) in loads.iter().enumerate() {
            if point < *load {
                chosen = p;
                break;
            }
            point -= load;
        }
        let priority = u32::try_from(chosen).unwrap_or(0);
        let group = self.weights.as_ref().and_then(|weights| {
            // Each group of the priority by weight x availability.
            let mut effective: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
            for i in (0..n).filter(|&i| self.priority[i] == priority) {
                let g = self.group[i];
                let entry = effective.entry(g).or_insert((u64::from(weights[g as usize]), 0, 0));
                entry.1 += 1;
                entry.2 += u64::from(healthy(i));
            }
            let scored: Vec<(u32, u64)> =
                effective.into_iter().map(|(g, (w, total, ok))| (g, w * availability(total, ok))).collect();
            let total: u64 = scored.iter().map(|(_, s)| s).sum();
            if total == 0 {
                return None;
            }
            // Another part of the roll than the priority's.
            let mut point = roll.rotate_right(17).wrapping_mul(0x9E37_79B9_7F4A_7C15) % total;
            scored.into_iter().find_map(|(g, s)| {
                if point < s {
                    Some(g)
                } else {
                    point -= s;
                    None
                }
            })
        });
        Some(Choice { priority, group })
    }

    /// Whether `choice` lets a pick use endpoint `i`.
    pub fn admits(&self, choice: &Choice, i: usize) -> bool {
        self.priority.get(i) == Some(&choice.priority)
            && self.weight_of(i) > 0
            && choice.group.is_none_or(|g| self.group.get(i) == Some(&g))
    }

    /// Whether endpoint `i` may get traffic at all: not in a locality `distribute`
    /// gives nothing (Istio removes those endpoints from the load assignment).
    pub fn usable(&self, i: usize) -> bool {
        self.weight_of(i) > 0
    }

    /// Endpoint `i`'s locality weight (1 without `distribute`).
    fn weight_of(&self, i: usize) -> u32 {
        self.weights.as_ref().map_or(1, |w| self.group.get(i).and_then(|g| w.get(*g as usize)).copied().unwrap_or(0))
    }
}

/// Envoy's availability of a set of hosts, in percent: `min(100, 1.4 x healthy / total)`.
fn availability(total: u64, healthy: u64) -> u64 {
    (OVERPROVISIONING * healthy).checked_div(total).map_or(0, |a| a.min(100))
}

/// Renumbers priorities 0, 1, 2... keeping their order.
fn compact(priority: &mut [u32]) {
    let mut seen: Vec<u32> = priority.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for p in priority.iter_mut() {
        *p = u32::try_from(seen.partition_point(|s| s < p)).unwrap_or(u32::MAX);
    }
}

/// Istio's `applyLocalityFailover` for one endpoint.
fn region_priority(failover: &[Failover], client: &Locality, endpoint: &Locality) -> u32 {
    let distance = client.distance(endpoint);
    if distance == 3
        && let Some(f) = failover.iter().find(|f| f.from == client.region)
        && endpoint.region != f.to
    {
        return 4;
    }
    distance
}

/// Istio's `applyFailoverPriorityPerLocality` for one endpoint.
fn label_priority(labels: &[String], client: Client<'_>, endpoint: &EndpointInfo<'_>) -> u32 {
    let n = u32::try_from(labels.len()).unwrap_or(u32::MAX);
    let includes_network = labels.first().is_some_and(|l| l == NETWORK_LABEL);
    let mut adjust = 0;
    for (j, entry) in labels.iter().enumerate() {
        let (name, fixed) = match entry.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (entry.as_str(), None),
        };
        let wanted = fixed.or_else(|| client.locality.label(client.labels, name));
        if wanted != endpoint.locality.label(endpoint.labels, name) {
            if j == 0 && includes_network {
                adjust = n;
                continue;
            }
            return n - u32::try_from(j).unwrap_or(0) + adjust;
        }
    }
    adjust
}

/// Istio's `applyLocalityWeights`: per group its weight, `None` when no entry is `from`
/// the client's locality (then `distribute` changes nothing).
fn distribute_weights(
    distribute: &[Distribute],
    client: &Locality,
    groups: &[&Locality],
    group_of: &[u32],
) -> Option<Vec<u32>> {
    let entry = distribute.iter().find(|d| client.matches(&d.from))?;
    let size = |g: usize| group_of.iter().filter(|&&x| x as usize == g).count() as u64;
    let mut weights = vec![0u32; groups.len()];
    let mut matched = vec![false; groups.len()];
    for (pattern, weight) in &entry.to {
        let hits: Vec<usize> = (0..groups.len()).filter(|&g| !matched[g] && groups[g].matches(pattern)).collect();
        let total: u64 = hits.iter().map(|&g| size(g)).sum();
        for &g in &hits {
            matched[g] = true;
            if total > 0 {
                weights[g] = u32::try_from((size(g) * u64::from(*weight)).div_ceil(total)).unwrap_or(u32::MAX);
            }
        }
    }
    Some(weights)
}

/// The waypoint's own pod among `pods`: the one named `pod_name` in `namespace` when
/// given (the deployment passes its name), else the first pod of the waypoint's
/// Gateway (label `gateway.networking.k8s.io/gateway-name`), which is right as long as
/// the waypoint's replicas share a locality.
pub fn own_pod<'a>(
    pods: &'a [mesh_common::config::Pod],
    namespace: &str,
    name: &str,
    pod_name: Option<&str>,
) -> Option<&'a mesh_common::config::Pod> {
    let mut in_ns = pods.iter().filter(|p| p.metadata.namespace == namespace);
    match pod_name {
        Some(pod) => in_ns.find(|p| p.metadata.name == pod),
        None => in_ns.find(|p| {
            p.metadata.labels.get("gateway.networking.k8s.io/gateway-name").map(String::as_str) == Some(name)
        }),
    }
}

#[cfg(test)]
mod tests;
