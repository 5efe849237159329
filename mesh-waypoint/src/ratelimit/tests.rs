use std::time::Duration;

use proptest::prelude::*;

use super::*;

fn config(max: u32, per_fill: u32, interval_ms: u64) -> BucketConfig {
    BucketConfig {
        stat_prefix: "t".into(),
        max_tokens: max,
        tokens_per_fill: per_fill,
        fill_interval: Duration::from_millis(interval_ms),
        enabled: Fraction::ALL,
        enforced: Fraction::ALL,
        response_headers: vec![("x-local-rate-limit".into(), "true".into())],
    }
}

const MS: u64 = 1_000_000;

#[test]
fn the_bucket_starts_full_and_refills_per_interval() {
    let b = Bucket::new(config(2, 1, 100));
    assert_eq!(b.try_take(5 * MS, 0), Decision::Allow);
    assert_eq!(b.try_take(6 * MS, 0), Decision::Allow);
    assert_eq!(
        b.try_take(7 * MS, 0),
        Decision::Limited {
            headers: vec![("x-envoy-ratelimited".into(), "true".into()), ("x-local-rate-limit".into(), "true".into())]
        }
    );
    assert!(matches!(b.try_take(104 * MS, 0), Decision::Limited { .. }), "the first fill is at origin + 100ms");
    assert_eq!(b.try_take(105 * MS, 0), Decision::Allow);
    assert!(matches!(b.try_take(106 * MS, 0), Decision::Limited { .. }));
    // After a long idle time the bucket is full, not more.
    assert_eq!(b.try_take(10_000 * MS, 0), Decision::Allow);
    assert_eq!(b.try_take(10_000 * MS, 0), Decision::Allow);
    assert!(matches!(b.try_take(10_000 * MS, 0), Decision::Limited { .. }));
    // Time going backwards adds nothing.
    assert!(matches!(b.try_take(MS, 0), Decision::Limited { .. }));
}

#[test]
fn concurrent_takers_never_share_a_token() {
    let b = std::sync::Arc::new(Bucket::new(config(1000, 1, 1000)));
    let allowed: usize = std::thread::scope(|s| {
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                s.spawn(move || (0..600).filter(|_| b.try_take(MS, 0) == Decision::Allow).count())
            })
            .collect();
        takers.into_iter().map(|t| t.join().unwrap()).sum()
    });
    assert_eq!(allowed, 1000);
}

#[test]
fn enabled_and_enforced_fractions_use_the_roll() {
    let mut c = config(1, 1, 1000);
    c.enabled = Fraction { numerator: 50, denominator: 100 };
    c.enforced = Fraction::NONE;
    let b = Bucket::new(c);
    assert_eq!(b.try_take(0, u32::MAX), Decision::Skipped);
    assert_eq!(b.try_take(0, 0), Decision::Allow);
    assert_eq!(b.try_take(0, 0), Decision::NotEnforced);
    assert!(Fraction { numerator: 1, denominator: 1_000_000 }.hits(0));
    assert!(!Fraction { numerator: 1, denominator: 1_000_000 }.hits(u32::MAX / 1000));
}

proptest! {
    #[test]
    fn allowed_never_exceeds_capacity_plus_fills(
        max in 1u32..20,
        per_fill in 1u32..10,
        interval_ms in 50u64..500,
        times in proptest::collection::vec(0u64..5_000, 1..200),
    ) {
        let b = Bucket::new(config(max, per_fill, interval_ms));
        let times: Vec<u64> = times.into_iter().map(|t| t * MS).collect();
        let allowed = times.iter().filter(|t| b.try_take(**t, 0) == Decision::Allow).count() as u64;
        let first = times[0];
        let latest = times.iter().copied().max().unwrap();
        let fills = (latest - first.min(latest)) / (interval_ms * MS);
        prop_assert!(allowed <= u64::from(max) + fills * u64::from(per_fill),
            "allowed {} > {} + {} * {}", allowed, max, fills, per_fill);
    }

    #[test]
    fn a_steady_monotonic_stream_gets_exactly_its_share(max in 1u32..20, per_fill in 1u32..10) {
        // 10 requests per 100ms interval over 1s, asking far more than the bucket gives.
        let b = Bucket::new(config(max, per_fill, 100));
        let allowed = (0..100u64).filter(|i| b.try_take(i * 10 * MS, 0) == Decision::Allow).count() as u64;
        let expected: u64 = (0..10u64).fold((u64::from(max), 0u64), |(tokens, total), interval| {
            let t = if interval == 0 { tokens } else { (tokens + u64::from(per_fill)).min(u64::from(max)) };
            let used = t.min(10);
            (t - used, total + used)
        }).1;
        prop_assert_eq!(allowed, expected);
    }
}
