//! Tests of outlier detection with explicit instants.
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::balance::{Balancer, PickContext};
use crate::policy::{LbPolicy, OutlierConfig};

const S: Duration = Duration::from_secs(1);

fn status(code: u16) -> CallResult {
    CallResult { status: Some(code), gateway_error: matches!(code, 502..=504), local_origin_failure: false }
}

fn connect_failure() -> CallResult {
    CallResult { status: None, gateway_error: true, local_origin_failure: true }
}

fn config() -> OutlierConfig {
    OutlierConfig { max_ejection_percent: 100, ..OutlierConfig::default() }
}

fn outliers(n: usize, config: OutlierConfig) -> Outliers<usize> {
    Outliers::new(config, (0..n).collect())
}

#[test]
fn five_consecutive_5xx_eject_for_the_base_time() {
    let t0 = Instant::now();
    let mut o = outliers(4, config());
    for _ in 0..4 {
        assert_eq!(o.record(1, status(500), t0), None);
    }
    let e = o.record(1, status(500), t0).expect("fifth 5xx ejects");
    assert_eq!((e.endpoint, e.reason, e.times, e.until), (1, Reason::Consecutive5xx, 1, t0 + 30 * S));
    assert!(!o.eligible(1, t0 + 29 * S));
    assert!(o.eligible(0, t0));
    assert_eq!(o.sweep(t0 + 29 * S), Vec::<usize>::new());
    // Its time is up: eligible at once, and readmitted by the next sweep.
    assert!(o.eligible(1, t0 + 30 * S));
    assert_eq!(o.sweep(t0 + 30 * S), [1]);
    assert_eq!(o.ejected_count(), 0);
}

#[test]
fn a_success_resets_the_count() {
    let t0 = Instant::now();
    let mut o = outliers(2, config());
    for _ in 0..4 {
        o.record(0, status(503), t0);
    }
    o.record(0, status(200), t0);
    for _ in 0..4 {
        assert_eq!(o.record(0, status(500), t0), None);
    }
    // 4xx are not errors of the endpoint either.
    o.record(0, status(404), t0);
    for _ in 0..4 {
        assert_eq!(o.record(0, status(502), t0), None);
    }
    assert!(o.record(0, status(502), t0).is_some());
}

#[test]
fn gateway_errors_have_their_own_threshold() {
    let t0 = Instant::now();
    let cfg = OutlierConfig { consecutive_gateway: Some(2), consecutive_5xx: None, ..config() };
    let mut o = outliers(3, cfg);
    // A 500 between gateway errors resets the gateway count.
    o.record(0, status(503), t0);
    o.record(0, status(500), t0);
    assert_eq!(o.record(0, status(504), t0), None);
    let e = o.record(0, status(502), t0).unwrap();
    assert_eq!(e.reason, Reason::ConsecutiveGatewayFailure);
    // 5xx ejection disabled: 500s never eject.
    for _ in 0..50 {
        assert_eq!(o.record(1, status(500), t0), None);
    }
    // A connect failure counts as a gateway error (a 503) when not split.
    o.record(2, connect_failure(), t0);
    assert_eq!(o.record(2, connect_failure(), t0).map(|e| e.reason), Some(Reason::ConsecutiveGatewayFailure));
}

#[test]
fn split_local_origin_failures_count_apart() {
    let t0 = Instant::now();
    let cfg = OutlierConfig { split_local_origin: true, consecutive_local_origin: Some(3), ..config() };
    let mut o = outliers(2, cfg);
    // Local failures do not feed the 5xx counter ...
    for _ in 0..2 {
        o.record(0, connect_failure(), t0);
    }
    // ... and a response (even a 5xx) resets the local counter.
    o.record(0, status(500), t0);
    for _ in 0..2 {
        assert_eq!(o.record(0, connect_failure(), t0), None);
    }
    assert_eq!(o.record(0, connect_failure(), t0).map(|e| e.reason), Some(Reason::ConsecutiveLocalOriginFailure));
    // Without a threshold, local failures never eject when split.
    let cfg = OutlierConfig { split_local_origin: true, ..config() };
    let mut o = outliers(2, cfg);
    for _ in 0..50 {
        assert_eq!(o.record(0, connect_failure(), t0), None);
    }
}

#[test]
fn ejection_time_grows_with_each_ejection_and_is_capped() {
    let t0 = Instant::now();
    let cfg = OutlierConfig { consecutive_5xx: Some(1), base_ejection_time: 100 * S, interval: 10 * S, ..config() };
    let mut o = outliers(2, cfg);
    let mut now = t0;
    let mut times = Vec::new();
    for _ in 0..4 {
        let e = o.record(0, status(500), now).unwrap();
        times.push(e.until - now);
        now = e.until;
        assert_eq!(o.sweep(now), [0]);
    }
    // 100, 200, 300 (Envoy's max_ejection_time), 300.
    assert_eq!(times, [100 * S, 200 * S, 300 * S, 300 * S]);
}

#[test]
fn the_multiplier_stops_at_the_cap_and_a_huge_base_time_does_not_overflow() {
    let t0 = Instant::now();
    let cfg = OutlierConfig { consecutive_5xx: Some(1), base_ejection_time: 100 * S, interval: 10 * S, ..config() };
    let mut o = outliers(2, cfg);
    let mut now = t0;
    let mut times = Vec::new();
    for _ in 0..10 {
        let e = o.record(0, status(500), now).unwrap();
        times.push(e.times);
        now = e.until;
        o.sweep(now);
    }
    // 100, 200, 300 s: the multiplier stays at 3, so three healthy intervals undo it.
    assert_eq!(times, [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]);

    // A time no `Instant` can add (manifests cannot hold it, the parser caps them):
    // ejected for a year instead of a panic.
    let cfg = OutlierConfig { consecutive_5xx: Some(1), base_ejection_time: Duration::MAX, ..config() };
    let mut o = outliers(2, cfg);
    let e = o.record(0, status(500), t0).unwrap();
    assert!(e.until > t0 + 364 * 24 * 3600 * S);
    assert!(o.is_ejected(0, t0 + 364 * 24 * 3600 * S));
}

#[test]
fn a_readmitted_endpoint_starts_with_clean_counters() {
    let t0 = Instant::now();
    // Gateway errors eject first; the 5xx counter had reached its threshold too.
    let cfg = OutlierConfig {
        consecutive_5xx: Some(5),
        consecutive_gateway: Some(5),
        base_ejection_time: 30 * S,
        ..config()
    };
    let mut o = outliers(2, cfg);
    let mut ejection = None;
    for _ in 0..5 {
        ejection = o.record(0, status(503), t0);
    }
    let e = ejection.unwrap();
    assert_eq!(e.reason, Reason::ConsecutiveGatewayFailure);
    assert_eq!(o.sweep(e.until), [0]);
    // One more 5xx after readmission does not eject it again.
    assert_eq!(o.record(0, status(500), e.until), None);
    assert!(!o.is_ejected(0, e.until));
}

#[test]
fn the_multiplier_decays_while_healthy() {
    let t0 = Instant::now();
    let cfg = OutlierConfig { consecutive_5xx: Some(1), base_ejection_time: 30 * S, interval: 10 * S, ..config() };
    let mut o = outliers(2, cfg);
    let e = o.record(0, status(500), t0).unwrap();
    o.sweep(e.until);
    let e = o.record(0, status(500), e.until).unwrap();
    assert_eq!(e.times, 2);
    let back = e.until;
    assert_eq!(o.sweep(back), [0]);
    // Two healthy intervals bring the multiplier from 2 to 0: the next ejection is 30 s.
    o.sweep(back + 10 * S);
    o.sweep(back + 20 * S);
    let e = o.record(0, status(500), back + 21 * S).unwrap();
    assert_eq!((e.times, e.until), (1, back + 51 * S));
}

#[test]
fn max_ejection_percent_bounds_ejections() {
    let t0 = Instant::now();
    // Istio's default 10 %: with 3 endpoints the first ejection happens, the second not.
    let cfg = OutlierConfig { consecutive_5xx: Some(1), ..OutlierConfig::default() };
    let mut o = outliers(3, cfg);
    assert!(o.record(0, status(500), t0).is_some());
    assert!(o.record(1, status(500), t0).is_none());
    assert!(o.eligible(1, t0));
    // 50 % of 4: two ejections.
    let mut o = outliers(4, OutlierConfig { max_ejection_percent: 50, ..cfg });
    let ejected: Vec<bool> = (0..4).map(|i| o.record(i, status(500), t0).is_some()).collect();
    assert_eq!(ejected, [true, true, false, false]);
    // When one comes back, another may go.
    let later = t0 + 30 * S;
    assert_eq!(o.sweep(later), [0, 1]);
    assert!(o.record(2, status(500), later).is_some());
}

#[test]
fn panic_mode_below_min_health_percent() {
    let t0 = Instant::now();
    let cfg = OutlierConfig { consecutive_5xx: Some(1), max_ejection_percent: 100, min_health_percent: 50, ..config() };
    let mut o = outliers(4, cfg);
    o.record(0, status(500), t0);
    o.record(1, status(500), t0);
    // 2 of 4 healthy: 50 %, not below: ejections hold.
    assert!(!o.panic(t0));
    assert!(!o.eligible(0, t0));
    o.record(2, status(500), t0);
    // 1 of 4: panic, everyone is eligible.
    assert!(o.panic(t0));
    assert!((0..4).all(|i| o.eligible(i, t0)));
    // Istio's default 0 never panics, even with all ejected.
    let mut o = outliers(2, OutlierConfig { min_health_percent: 0, ..cfg });
    o.record(0, status(500), t0);
    o.record(1, status(500), t0);
    assert!(!o.panic(t0));
    assert!(!o.eligible(0, t0) && !o.eligible(1, t0));
}

#[test]
fn results_while_ejected_are_ignored() {
    let t0 = Instant::now();
    let mut o = outliers(2, OutlierConfig { consecutive_5xx: Some(1), ..config() });
    let first = o.record(0, status(500), t0).unwrap();
    assert_eq!(o.record(0, status(500), t0 + S), None);
    assert_eq!(o.sweep(first.until), [0]);
}

#[test]
fn state_follows_endpoints_across_list_changes() {
    let t0 = Instant::now();
    let cfg = OutlierConfig { consecutive_5xx: Some(2), ..config() };
    let mut o: Outliers<&str> = Outliers::new(cfg, vec!["a", "b", "c"]);
    o.record(1, status(500), t0);
    o.record(1, status(500), t0); // b ejected
    o.record(2, status(500), t0); // c one error
    o.set_endpoints(vec!["c", "d", "b"]);
    assert_eq!(o.len(), 3);
    assert!(o.is_ejected(2, t0), "b kept its ejection at its new index");
    assert!(!o.is_ejected(1, t0), "d is new");
    assert!(o.record(0, status(500), t0).is_some(), "c kept its one error");
    // A request routed by the old list (c at 2) finds c where it is now.
    assert_eq!(o.position(2, &"c"), Some(0));
    assert_eq!(o.position(2, &"b"), Some(2));
    assert_eq!(o.position(0, &"a"), None, "a is gone");
    o.set_endpoints(vec!["d"]);
    assert_eq!(o.ejected_count(), 0, "gone endpoints are forgotten");
}

#[test]
fn ejected_endpoints_get_no_traffic_and_return() {
    let t0 = Instant::now();
    let mut o = outliers(3, OutlierConfig { consecutive_5xx: Some(3), ..config() });
    let b = Balancer::new(&LbPolicy::RoundRobin, &["a", "b", "c"]);
    let idle = |_: usize| 0;
    for _ in 0..3 {
        o.record(1, status(503), t0);
    }
    let eligible = |i: usize| o.eligible(i, t0 + S);
    for _ in 0..30 {
        let e = b.pick(&PickContext { hash: None, roll: 0, active: &idle, eligible: &eligible }).unwrap();
        assert_ne!(e, 1);
    }
    let later = t0 + 31 * S;
    let eligible = |i: usize| o.eligible(i, later);
    let picked: Vec<usize> = (0..3)
        .map(|_| b.pick(&PickContext { hash: None, roll: 0, active: &idle, eligible: &eligible }).unwrap())
        .collect();
    assert!(picked.contains(&1), "back after its ejection time: {picked:?}");
}

proptest! {
    /// Whatever the results, never more endpoints ejected than maxEjectionPercent allows
    /// (plus the one Envoy's strict-less-than test lets through), and sweeps readmit every
    /// endpoint once its time is up.
    #[test]
    fn ejections_stay_within_bounds(n in 1usize..20, pct in 0u32..=100,
                                    events in prop::collection::vec((0usize..20, 0u16..4, 0u64..50), 0..300)) {
        let t0 = Instant::now();
        let cfg = OutlierConfig { consecutive_5xx: Some(2), max_ejection_percent: pct, ..OutlierConfig::default() };
        let mut o = outliers(n, cfg);
        let mut now = t0;
        for (endpoint, kind, step) in events {
            now += Duration::from_secs(step);
            let result = match kind { 0 => status(200), 1 => status(500), 2 => status(503), _ => connect_failure() };
            o.record(endpoint % n, result, now);
            let max = (pct as usize * n).div_ceil(100);
            prop_assert!(o.ejected_count() <= max.max(usize::from(pct > 0)), "{} ejected of {n} at {pct}%", o.ejected_count());
            if step % 10 == 0 {
                o.sweep(now);
            }
        }
        o.sweep(now + Duration::from_secs(301));
        prop_assert_eq!(o.ejected_count(), 0);
    }
}
