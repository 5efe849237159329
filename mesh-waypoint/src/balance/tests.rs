//! Tests of the balancer: each algorithm, eligibility, and consistent hashing's
//! stability and minimal disruption.
use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use http::{HeaderMap, HeaderValue, header};
use proptest::prelude::*;

use super::*;
use crate::policy::{ConsistentHash, HashAlgo, HashKey, LbPolicy};

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250 + 1)).collect()
}

fn all(_: usize) -> bool {
    true
}

fn idle(_: usize) -> u32 {
    0
}

fn pick(b: &Balancer, hash: Option<u64>, roll: u64, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
    b.pick(&PickContext { hash, roll, active: &idle, eligible })
}

fn ring(min_ring_size: u64) -> LbPolicy {
    LbPolicy::ConsistentHash(ConsistentHash { key: HashKey::SourceIp, algo: HashAlgo::RingHash { min_ring_size } })
}

fn maglev(table_size: u64) -> LbPolicy {
    LbPolicy::ConsistentHash(ConsistentHash { key: HashKey::SourceIp, algo: HashAlgo::Maglev { table_size } })
}

/// A cheap deterministic stream of rolls for the tests (splitmix64).
fn rolls(seed: u64) -> impl Iterator<Item = u64> {
    let mut state = seed;
    std::iter::repeat_with(move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

#[test]
fn nothing_to_pick() {
    for policy in [LbPolicy::RoundRobin, LbPolicy::LeastRequest, LbPolicy::Random, ring(16), maglev(7)] {
        let empty = Balancer::new(&policy, &Vec::<String>::new());
        assert!(empty.is_empty());
        assert_eq!(pick(&empty, Some(1), 1, &all), None, "{policy:?}");
        let b = Balancer::new(&policy, &keys(3));
        assert_eq!(pick(&b, Some(1), 1, &|_| false), None, "{policy:?}: nothing eligible");
    }
}

#[test]
fn round_robin_rotates_over_eligible_endpoints() {
    let b = Balancer::new(&LbPolicy::RoundRobin, &keys(3));
    let order: Vec<_> = (0..6).map(|_| pick(&b, None, 0, &all).unwrap()).collect();
    assert_eq!(order, [0, 1, 2, 0, 1, 2]);
    // With endpoint 1 out, 0 and 2 share evenly (no double turn for 2).
    let mut counts = [0; 3];
    for _ in 0..1000 {
        counts[pick(&b, None, 0, &|i| i != 1).unwrap()] += 1;
    }
    assert_eq!(counts, [500, 0, 500]);
}

#[test]
fn least_request_prefers_the_idle_of_two() {
    let b = Balancer::new(&LbPolicy::LeastRequest, &keys(2));
    // With two endpoints both are always drawn: the idle one always wins.
    let busy_zero = |i: usize| if i == 0 { 10 } else { 0 };
    for roll in rolls(1).take(200) {
        assert_eq!(b.pick(&PickContext { hash: None, roll, active: &busy_zero, eligible: &all }), Some(1));
    }
    // With many endpoints, one busy endpoint gets far fewer requests than its share.
    let b = Balancer::new(&LbPolicy::LeastRequest, &keys(4));
    let busy_two = |i: usize| if i == 2 { 5 } else { 1 };
    let mut counts = [0; 4];
    for roll in rolls(2).take(4000) {
        counts[b.pick(&PickContext { hash: None, roll, active: &busy_two, eligible: &all }).unwrap()] += 1;
    }
    // Picked only when drawn twice... never, since the draws are distinct.
    assert_eq!(counts[2], 0, "{counts:?}");
    assert!(counts.iter().enumerate().filter(|(i, _)| *i != 2).all(|(_, c)| *c > 1000), "{counts:?}");
}

#[test]
fn random_spreads_over_eligible_only() {
    let b = Balancer::new(&LbPolicy::Random, &keys(5));
    let mut counts = [0u32; 5];
    for roll in rolls(3).take(10_000) {
        counts[pick(&b, None, roll, &|i| i != 3).unwrap()] += 1;
    }
    assert_eq!(counts[3], 0);
    for (i, c) in counts.iter().enumerate().filter(|(i, _)| *i != 3) {
        assert!((2200..2800).contains(c), "endpoint {i}: {c} of 10000 ({counts:?})");
    }
}

#[test]
fn ring_size_follows_envoy() {
    let b = Balancer::new(&ring(1024), &keys(3));
    let Kind::Ring(points) = &b.kind else { panic!() };
    assert_eq!(points.len(), 3 * 512, "ceil(1024 / 3) points per endpoint, rounded up to a power of two");
    assert!(points.windows(2).all(|w| w[0].0 <= w[1].0), "sorted");
    let b = Balancer::new(&maglev(7), &keys(3));
    let Kind::Maglev(table) = &b.kind else { panic!() };
    let mut per = [0; 3];
    for e in table {
        per[*e as usize] += 1;
    }
    assert_eq!(per, [3, 2, 2], "Maglev fills the table in turns");
}

/// For each of `n` keys, the endpoint it maps to.
fn assignment(b: &Balancer, eligible: &dyn Fn(usize) -> bool, n: u64) -> Vec<usize> {
    (0..n).map(|k| pick(b, Some(xxh64(&k.to_le_bytes(), 7)), 0, eligible).unwrap()).collect()
}

fn check_minimal_disruption(policy: &LbPolicy, n: usize) {
    const KEYS: u64 = 20_000;
    let endpoints = keys(n);
    let before = assignment(&Balancer::new(policy, &endpoints), &all, KEYS);
    // Spread: every endpoint has roughly its share.
    let mut share = vec![0u64; n];
    for e in &before {
        share[*e] += 1;
    }
    let fair = KEYS / n as u64;
    assert!(share.iter().all(|s| *s > fair / 2 && *s < fair * 2), "{policy:?}: uneven shares {share:?}");
    // Remove endpoint 2 from the list (the others keep their keys, indexes shift).
    let mut fewer = endpoints.clone();
    fewer.remove(2);
    let after = assignment(&Balancer::new(policy, &fewer), &all, KEYS);
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| {
            let a_orig = if **a >= 2 { **a + 1 } else { **a };
            **b != a_orig
        })
        .count() as u64;
    // About 1/N of the keys move (those of the removed endpoint), with some slack for
    // Maglev, which moves a few more by design.
    let expected = share[2];
    assert!(moved >= expected, "{policy:?}: {moved} moved, endpoint 2 had {expected}");
    assert!(moved <= expected + KEYS / 50, "{policy:?}: {moved} moved, endpoint 2 had {expected}");
    // Ejecting endpoint 2 (same list, not eligible): only its keys move.
    let b = Balancer::new(policy, &endpoints);
    let ejected = assignment(&b, &|i| i != 2, KEYS);
    for (k, (b, a)) in before.iter().zip(&ejected).enumerate() {
        if *b == 2 {
            assert_ne!(*a, 2);
        } else {
            assert_eq!(b, a, "{policy:?}: key {k} moved although its endpoint stayed");
        }
    }
}

#[test]
fn ring_hash_moves_only_the_removed_endpoints_keys() {
    for n in [3, 5, 10] {
        check_minimal_disruption(&ring(1024), n);
    }
}

#[test]
fn maglev_moves_about_one_nth() {
    for n in [3, 5, 10] {
        check_minimal_disruption(&maglev(65537), n);
    }
}

#[test]
fn consistent_hash_without_a_key_picks_by_roll() {
    let b = Balancer::new(&ring(64), &keys(4));
    let picked: std::collections::BTreeSet<_> = rolls(9).take(200).map(|r| pick(&b, None, r, &all).unwrap()).collect();
    assert_eq!(picked.len(), 4);
}

#[test]
fn header_query_and_source_ip_keys() {
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("x-user", HeaderValue::from_static("alice"));
    let key = HashKey::Header(http::HeaderName::from_static("x-user"));
    assert_eq!(key.hash(&headers, None, ip, 0), (Some(xxh64(b"alice", 0)), None));
    assert_eq!(key.hash(&HeaderMap::new(), None, ip, 0), (None, None));
    assert_eq!(HashKey::SourceIp.hash(&headers, None, ip, 0), (Some(xxh64(b"10.1.2.3", 0)), None));
    let q = HashKey::QueryParam("user".into());
    assert_eq!(q.hash(&headers, Some("a=1&user=bob&x"), ip, 0).0, Some(xxh64(b"bob", 0)));
    assert_eq!(q.hash(&headers, Some("username=bob"), ip, 0).0, None);
    assert_eq!(q.hash(&headers, None, ip, 0).0, None);
}

#[test]
fn cookie_key_reads_and_generates_the_cookie() {
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let key = HashKey::Cookie { name: "sticky".into(), path: Some("/".into()), ttl: Some(Duration::from_mins(1)) };
    // Present (quoted or not): hashed, nothing to set.
    let mut headers = HeaderMap::new();
    headers.insert(header::COOKIE, HeaderValue::from_static("a=1; sticky=\"abc\"; b=2"));
    assert_eq!(key.hash(&headers, None, ip, 5), (Some(xxh64(b"abc", 0)), None));
    headers.insert(header::COOKIE, HeaderValue::from_static("sticky=abc"));
    assert_eq!(key.hash(&headers, None, ip, 5), (Some(xxh64(b"abc", 0)), None));
    // Absent: generated from the roll, and set on the response.
    let (hash, set) = key.hash(&HeaderMap::new(), None, ip, 5);
    let set = set.unwrap();
    let set = set.to_str().unwrap();
    let value = format!("{:016x}", xxh64(&5u64.to_le_bytes(), 0));
    assert_eq!(set, format!("sticky=\"{value}\"; Max-Age=60; Path=/; HttpOnly"));
    assert_eq!(hash, Some(xxh64(value.as_bytes(), 0)));
    // The client sends it back: same hash, so the same endpoint.
    let mut back = HeaderMap::new();
    back.insert(header::COOKIE, HeaderValue::from_str(&format!("sticky=\"{value}\"")).unwrap());
    assert_eq!(key.hash(&back, None, ip, 99).0, hash);
    // Sent empty: as absent (a made-up one), not every such client on one endpoint.
    let mut empty = HeaderMap::new();
    empty.insert(header::COOKIE, HeaderValue::from_static("sticky=; a=1"));
    assert_eq!(key.hash(&empty, None, ip, 5), key.hash(&HeaderMap::new(), None, ip, 5));
    // ttl 0, or under a second: a session cookie, never `Max-Age=0` (deleted at once).
    for ttl in [Duration::ZERO, Duration::from_millis(500)] {
        let session = HashKey::Cookie { name: "s".into(), path: None, ttl: Some(ttl) };
        let set = session.hash(&HeaderMap::new(), None, ip, 1).1.unwrap();
        assert!(!set.to_str().unwrap().contains("Max-Age"), "{set:?}");
    }
    let plain = HashKey::Cookie { name: "s".into(), path: None, ttl: None };
    assert_eq!(plain.hash(&HeaderMap::new(), None, ip, 1), (None, None));
}

fn policies() -> impl Strategy<Value = LbPolicy> {
    prop_oneof![
        Just(LbPolicy::RoundRobin),
        Just(LbPolicy::LeastRequest),
        Just(LbPolicy::Random),
        (1u64..2048).prop_map(ring),
        prop::sample::select(vec![2u64, 3, 7, 13, 251, 1021]).prop_map(maglev),
    ]
}

proptest! {
    /// Whatever the policy, the pick is an eligible endpoint, and there is one whenever
    /// any endpoint is eligible.
    #[test]
    fn picks_only_eligible(policy in policies(), n in 1usize..40, mask in any::<u64>(),
                           hash in any::<Option<u64>>(), roll in any::<u64>(), load in prop::collection::vec(0u32..5, 40)) {
        let b = Balancer::new(&policy, &keys(n));
        let eligible = |i: usize| mask & (1 << (i % 64)) != 0;
        let active = |i: usize| load[i];
        let got = b.pick(&PickContext { hash, roll, active: &active, eligible: &eligible });
        match got {
            Some(e) => prop_assert!(e < n && eligible(e)),
            None => prop_assert!((0..n).all(|i| !eligible(i))),
        }
    }

    /// Round robin: over k full rounds every eligible endpoint gets exactly k picks.
    #[test]
    fn round_robin_is_fair(n in 1usize..30, mask in 1u32.., rounds in 1usize..5) {
        let b = Balancer::new(&LbPolicy::RoundRobin, &keys(n));
        let eligible = |i: usize| mask & (1 << i) != 0;
        let m = (0..n).filter(|&i| eligible(i)).count();
        prop_assume!(m > 0);
        let mut counts = BTreeMap::new();
        for _ in 0..m * rounds {
            *counts.entry(pick(&b, None, 0, &eligible).unwrap()).or_insert(0) += 1;
        }
        prop_assert!(counts.values().all(|c| *c == rounds), "{:?}", counts);
        prop_assert_eq!(counts.len(), m);
    }

    /// Least request never picks an endpoint busier than every other eligible one when
    /// there are exactly two.
    #[test]
    fn least_request_of_two(a in 0u32..10, b in 0u32..10, roll in any::<u64>()) {
        let bal = Balancer::new(&LbPolicy::LeastRequest, &keys(2));
        let active = |i: usize| if i == 0 { a } else { b };
        let got = bal.pick(&PickContext { hash: None, roll, active: &active, eligible: &all }).unwrap();
        prop_assert!(active(got) == a.min(b));
    }

    /// Consistent hashing: the same key on the same endpoints gives the same endpoint,
    /// whatever the roll.
    #[test]
    fn consistent_hash_is_stable(n in 1usize..20, hash in any::<u64>(), r1 in any::<u64>(), r2 in any::<u64>(),
                                 maglev_table in any::<bool>()) {
        let policy = if maglev_table { maglev(251) } else { ring(256) };
        let a = Balancer::new(&policy, &keys(n));
        let b = Balancer::new(&policy, &keys(n));
        prop_assert_eq!(pick(&a, Some(hash), r1, &all), pick(&b, Some(hash), r2, &all));
    }
}
