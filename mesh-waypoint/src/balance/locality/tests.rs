#![allow(clippy::float_cmp, reason = "shares of exactly all or nothing are exact")]
use proptest::prelude::*;
use serde_json::json;

use super::*;

fn loc(s: &str) -> Locality {
    Locality::parse(s)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
}

/// A plan for endpoints at `localities` (all without labels) seen from `client`.
fn plan(setting: &LocalitySetting, failover: bool, client: &str, localities: &[&str]) -> Option<LocalityPlan> {
    let none = Labels::new();
    let me = loc(client);
    let locs: Vec<Locality> = localities.iter().map(|l| loc(l)).collect();
    let eps: Vec<EndpointInfo> = locs.iter().map(|l| EndpointInfo { locality: l, labels: &none }).collect();
    LocalityPlan::new(Some(setting), failover, Client { locality: &me, labels: &none }, &eps)
}

fn priorities(p: &LocalityPlan, n: usize) -> Vec<u32> {
    (0..n).map(|i| p.priority(i).unwrap()).collect()
}

/// Rolls spread evenly: a uniform roll source, deterministic.
fn rolls(n: u64) -> impl Iterator<Item = u64> {
    (0..n).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i >> 3))
}

#[test]
fn localities_from_labels() {
    assert_eq!(loc("r1.z1.s1"), Locality { region: "r1".into(), zone: "z1".into(), subzone: "s1".into() });
    assert_eq!(loc("r1/z1"), Locality { region: "r1".into(), zone: "z1".into(), subzone: String::new() });
    assert_eq!(
        loc("us-west/us-west1.a"),
        Locality { region: "us-west".into(), zone: "us-west1.a".into(), subzone: String::new() }
    );
    let both = labels(&[(LOCALITY_LABEL, "a.b"), (TOPOLOGY_LOCALITY_LABEL, "c/d")]);
    assert_eq!(Locality::from_labels(&both), loc("c/d"), "the topology label wins");
    assert_eq!(Locality::from_labels(&labels(&[(LOCALITY_LABEL, "a.b")])), loc("a/b"));
    assert_eq!(Locality::from_labels(&Labels::new()), Locality::default());
}

#[test]
fn locality_patterns() {
    let l = loc("r1/z1/s1");
    for yes in ["r1", "r1/z1", "r1/z1/s1", "*", "r1/*", "r1/z1/*", "*/z1"] {
        assert!(l.matches(yes), "{yes}");
    }
    for no in ["r2", "r1/z2", "r1/z1/s2", "r1/*/s2"] {
        assert!(!l.matches(no), "{no}");
    }
}

#[test]
fn settings_are_read_with_field_errors() {
    let s = LocalitySetting::from_istio(&json!({
        "enabled": true,
        "distribute": [{"from": "r1/z1/*", "to": {"r1/z1/*": 80, "r1/z2/*": 20}}],
        "failover": [{"from": "r1", "to": "r2"}],
        "failoverPriority": ["topology.kubernetes.io/region"]
    }))
    .unwrap()
    .unwrap();
    assert_eq!(s.distribute[0].to, [("r1/z1/*".to_string(), 80), ("r1/z2/*".to_string(), 20)]);
    assert_eq!(s.failover, [Failover { from: "r1".into(), to: "r2".into() }]);
    assert_eq!(LocalitySetting::from_istio(&json!({"enabled": false, "failover": []})).unwrap(), None);
    let e = LocalitySetting::from_istio(&json!({"distribute": [{"from": "a", "to": {"b": -1}}]})).unwrap_err();
    assert_eq!(e.0, ".distribute[0].to.b");
    assert_eq!(LocalitySetting::from_istio(&json!({"failover": [{"from": "a"}]})).unwrap_err().0, ".failover[0]");
    assert_eq!(LocalitySetting::from_istio(&json!({"nope": 1})).unwrap_err().0, ".nope");
}

#[test]
fn default_failover_orders_by_subzone_zone_region_and_failover_regions() {
    let eps = ["r1/z1/s1", "r1/z1/s2", "r1/z2/s1", "r2/z1/s1", "r3/z1/s1", "r1/z1/s1"];
    let setting = LocalitySetting::default();
    // Failover only with outlier detection.
    assert_eq!(plan(&setting, false, "r1/z1/s1", &eps), None);
    let p = plan(&setting, true, "r1/z1/s1", &eps).unwrap();
    assert_eq!(priorities(&p, eps.len()), [0, 1, 2, 3, 3, 0]);
    // failover r1 -> r2: other regions after r2.
    let setting =
        LocalitySetting { failover: vec![Failover { from: "r1".into(), to: "r2".into() }], ..Default::default() };
    let p = plan(&setting, true, "r1/z1/s1", &eps).unwrap();
    assert_eq!(priorities(&p, eps.len()), [0, 1, 2, 3, 4, 0]);
    // Everything in one locality (or unlabelled everywhere): nothing to do.
    assert_eq!(plan(&LocalitySetting::default(), true, "", &["", "", ""]), None);
}

#[test]
fn failover_priority_labels() {
    let setting = LocalitySetting {
        failover_priority: vec![
            "topology.kubernetes.io/region".into(),
            "topology.kubernetes.io/zone".into(),
            "version=v2".into(),
        ],
        ..Default::default()
    };
    let me = loc("r1/z1");
    let my_labels = labels(&[("app", "waypoint")]);
    let eps = [("r1/z1", "v2"), ("r1/z1", "v1"), ("r1/z2", "v2"), ("r2/z1", "v2")];
    let locs: Vec<Locality> = eps.iter().map(|(l, _)| loc(l)).collect();
    let lbls: Vec<Labels> = eps.iter().map(|(_, v)| labels(&[("version", v)])).collect();
    let infos: Vec<EndpointInfo> =
        locs.iter().zip(&lbls).map(|(locality, labels)| EndpointInfo { locality, labels }).collect();
    let p = LocalityPlan::new(Some(&setting), true, Client { locality: &me, labels: &my_labels }, &infos).unwrap();
    // Region differs: 3 - 0; zone differs: 3 - 1; version differs from the fixed v2: 3 - 2.
    assert_eq!(priorities(&p, 4), [0, 1, 2, 3]);
    // A client without labels: Istio skips failoverPriority.
    let none = Labels::new();
    assert_eq!(LocalityPlan::new(Some(&setting), true, Client { locality: &me, labels: &none }, &infos), None);
    // A differing leading network costs the whole list but the rest still orders.
    let net = LocalitySetting {
        failover_priority: vec![NETWORK_LABEL.into(), "topology.kubernetes.io/zone".into()],
        ..Default::default()
    };
    let mine = labels(&[(NETWORK_LABEL, "n1")]);
    let other_net = labels(&[(NETWORK_LABEL, "n2")]);
    let (z1, z2) = (loc("r1/z1"), loc("r1/z2"));
    let infos = [
        EndpointInfo { locality: &z1, labels: &mine },
        EndpointInfo { locality: &z1, labels: &other_net },
        EndpointInfo { locality: &z2, labels: &mine },
        EndpointInfo { locality: &z2, labels: &other_net },
    ];
    let p = LocalityPlan::new(Some(&net), true, Client { locality: &z1, labels: &mine }, &infos).unwrap();
    assert_eq!(priorities(&p, 4), [0, 2, 1, 3]);
}

/// The share of picks per priority over many rolls.
fn priority_shares(p: &LocalityPlan, healthy: &dyn Fn(usize) -> bool) -> Vec<f64> {
    let mut counts = vec![0u32; p.priorities as usize];
    let n = 10_000;
    for roll in rolls(n) {
        let choice = p.choose(healthy, roll).unwrap();
        counts[choice.priority as usize] += 1;
    }
    counts.into_iter().map(|c| f64::from(c) / n as f64).collect()
}

#[test]
fn load_leaves_the_local_priority_as_it_loses_endpoints() {
    // Two local endpoints, two in the next zone.
    let p = plan(&LocalitySetting::default(), true, "r1/z1", &["r1/z1", "r1/z1", "r1/z2", "r1/z2"]).unwrap();
    let all = priority_shares(&p, &|_| true);
    assert_eq!(all[0], 1.0);
    // One local ejected: 1.4 x 50 % = 70 % stays.
    let half = priority_shares(&p, &|i| i != 0);
    assert!((half[0] - 0.70).abs() < 0.02, "{half:?}");
    // Both local ejected: everything fails over.
    let none = priority_shares(&p, &|i| i >= 2);
    assert_eq!(none[0], 0.0);
    // Nothing healthy anywhere: no restriction (the balancer finds none).
    assert_eq!(p.choose(&|_| false, 7), None);
}

#[test]
fn distribute_weights_localities() {
    let setting = LocalitySetting {
        distribute: vec![Distribute {
            from: "r1/z1/*".into(),
            to: vec![("r1/z1/*".into(), 80), ("r1/z2/*".into(), 20)],
        }],
        ..Default::default()
    };
    // z1 has one endpoint, z2 three, r2 one (matched by nothing: no traffic).
    let eps = ["r1/z1", "r1/z2", "r1/z2", "r1/z2", "r2/z1"];
    let p = plan(&setting, true, "r1/z1/s9", &eps).unwrap();
    let mut per_endpoint = [0u32; 5];
    for roll in rolls(20_000) {
        let choice = p.choose(&|_| true, roll).unwrap();
        let admitted: Vec<usize> = (0..5).filter(|&i| p.admits(&choice, i)).collect();
        assert!(!admitted.is_empty());
        assert!(!admitted.contains(&4), "r2 gets nothing");
        per_endpoint[admitted[0]] += 1;
    }
    assert!(!p.usable(4) && p.usable(0) && p.usable(1));
    let z1 = f64::from(per_endpoint[0]) / 20_000.0;
    assert!((z1 - 0.8).abs() < 0.02, "z1 share {z1}");
    // A client the `from` does not match: no weights, no plan.
    assert_eq!(plan(&setting, true, "r2/z1", &eps), None);
    // One pattern over two localities splits its weight by their sizes (rounded up).
    let split = LocalitySetting {
        distribute: vec![Distribute { from: "*".into(), to: vec![("r1".into(), 100)] }],
        ..Default::default()
    };
    let p = plan(&split, false, "r1/z1", &["r1/z1", "r1/z2", "r1/z2", "r1/z2"]).unwrap();
    assert_eq!(p.weights, Some(vec![25, 75]));
}

fn arb_endpoints() -> impl Strategy<Value = Vec<(usize, bool)>> {
    prop::collection::vec((0usize..5, any::<bool>()), 1..12)
}

const PLACES: [&str; 5] = ["r1/z1/s1", "r1/z1/s2", "r1/z2/s1", "r2/z1/s1", "r3/z1/s1"];

proptest! {
    /// Whenever a healthy endpoint exists, the choice admits at least one healthy
    /// endpoint: the balancer never has to use an ejected one.
    #[test]
    fn a_choice_always_has_a_healthy_endpoint(
        eps in arb_endpoints(),
        roll in any::<u64>(),
        failover_to in prop::option::of(0usize..5),
        distribute in any::<bool>(),
    ) {
        let mut setting = LocalitySetting::default();
        if let Some(t) = failover_to {
            setting.failover.push(Failover { from: "r1".into(), to: loc(PLACES[t]).region });
        }
        if distribute {
            setting.distribute.push(Distribute { from: "r1".into(), to: vec![("r1/z1".into(), 70), ("r2".into(), 30)] });
        }
        let places: Vec<&str> = eps.iter().map(|(l, _)| PLACES[*l]).collect();
        let healthy = |i: usize| eps[i].1;
        let Some(p) = plan(&setting, true, "r1/z1/s1", &places) else { return Ok(()) };
        let admissible = (0..eps.len()).any(|i| healthy(i) && p.weight_of(i) > 0);
        match p.choose(&healthy, roll) {
            Some(choice) => prop_assert!((0..eps.len()).any(|i| healthy(i) && p.admits(&choice, i)), "{choice:?} {p:?}"),
            None => prop_assert!(!admissible, "no choice although {eps:?} has healthy endpoints"),
        }
    }

    /// With enough healthy endpoints in the best priority (1.4 x share >= 100 %), all
    /// traffic stays there.
    #[test]
    fn a_healthy_local_priority_keeps_all_traffic(local in 1usize..6, remote in 1usize..6, roll in any::<u64>()) {
        let mut places = vec!["r1/z1/s1"; local];
        places.extend(vec!["r2/z1/s1"; remote]);
        let p = plan(&LocalitySetting::default(), true, "r1/z1/s1", &places).unwrap();
        prop_assert_eq!(p.choose(&|_| true, roll).unwrap().priority, 0);
    }

    /// `distribute` weights hold within a tolerance for any split of 100.
    #[test]
    fn distribute_shares_follow_weights(w in 1u32..100, a in 1usize..4, b in 1usize..4) {
        let setting = LocalitySetting {
            distribute: vec![Distribute { from: "*".into(), to: vec![("r1/z1".into(), w), ("r1/z2".into(), 100 - w)] }],
            ..Default::default()
        };
        let mut places = vec!["r1/z1"; a];
        places.extend(vec!["r1/z2"; b]);
        let p = plan(&setting, false, "r1/z1", &places).unwrap();
        let n = 20_000u64;
        let first = rolls(n).filter(|&roll| p.choose(&|_| true, roll).unwrap().group == Some(0)).count();
        let share = first as f64 / n as f64;
        prop_assert!((share - f64::from(w) / 100.0).abs() < 0.03, "w {w}: share {share}");
    }
}
