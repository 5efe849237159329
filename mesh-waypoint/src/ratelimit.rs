//! Local rate limits at the waypoint: which `EnvoyFilter`s (Istio's documented local
//! rate limit shape, parsed and validated by `mesh_common::config::envoy_filter`) apply
//! to a destination, the token buckets that enforce them, and the decision for one
//! request. Pure: the caller passes the clock reading and a random roll.
use std::sync::atomic::{AtomicU64, Ordering};

pub use mesh_common::config::envoy_filter::{BucketConfig, Fraction, LocalRateLimit, RouteLimit, Scope};

/// What the limiter says about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The filter is not enabled for this request (`filter_enabled`); no token taken.
    Skipped,
    /// A token was taken.
    Allow,
    /// Out of tokens and enforced: answer 429 with response flag `RL` and these
    /// headers (`x-envoy-ratelimited: true`, as Envoy's filter sets, then the
    /// configured `response_headers_to_add`).
    Limited { headers: Vec<(String, String)> },
    /// Out of tokens but not enforced for this request (`filter_enforced`): let it
    /// pass, count it as rate limited.
    NotEnforced,
}

/// A token bucket, lock-free: one atomic word holds the fill count (high 32 bits,
/// wrapping) and the tokens (low 32 bits). It starts full at its first use and gains
/// `tokens_per_fill` (up to `max_tokens`) at each `fill_interval` boundary counted
/// from that first use, as Envoy's timer-driven bucket does. Time going backwards
/// adds nothing.
#[derive(Debug)]
pub struct Bucket {
    config: BucketConfig,
    /// The first use in nanoseconds, `u64::MAX` before it.
    origin: AtomicU64,
    state: AtomicU64,
}

impl Bucket {
    pub fn new(config: BucketConfig) -> Self {
        let state = u64::from(config.max_tokens);
        Self { config, origin: AtomicU64::new(u64::MAX), state: AtomicU64::new(state) }
    }

    pub fn config(&self) -> &BucketConfig {
        &self.config
    }

    /// Decides one request at `now_nanos` (any monotonic clock) with a uniform
    /// `random` roll. The roll decides `filter_enabled`; a mix of it decides
    /// `filter_enforced`.
    pub fn try_take(&self, now_nanos: u64, random: u32) -> Decision {
        if !self.config.enabled.hits(random) {
            return Decision::Skipped;
        }
        let origin = match self.origin.compare_exchange(u64::MAX, now_nanos, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => now_nanos,
            Err(o) => o,
        };
        let interval = self.config.fill_interval.as_nanos().max(1) as u64;
        let fill_now = (now_nanos.saturating_sub(origin) / interval) as u32;
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let (fill_then, tokens) = ((current >> 32) as u32, current as u32);
            let fills = fill_now.wrapping_sub(fill_then);
            // A difference past half the range means the clock went back.
            let (fills, fill_next) = if fills > u32::MAX / 2 { (0, fill_then) } else { (fills, fill_now) };
            let refilled = (u64::from(tokens) + u64::from(fills) * u64::from(self.config.tokens_per_fill))
                .min(u64::from(self.config.max_tokens));
            let taken = refilled.checked_sub(1);
            let next = u64::from(fill_next) << 32 | taken.unwrap_or(refilled);
            match self.state.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) if taken.is_some() => return Decision::Allow,
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        if self.config.enforced.hits(random.wrapping_mul(0x9E37_79B9).rotate_left(16)) {
            let mut headers = Vec::with_capacity(self.config.response_headers.len() + 1);
            headers.push((RATELIMITED_HEADER.to_string(), "true".to_string()));
            headers.extend(self.config.response_headers.iter().cloned());
            Decision::Limited { headers }
        } else {
            Decision::NotEnforced
        }
    }
}

/// The response flag of a rate-limited request.
pub const RESPONSE_FLAG: &str = "RL";
/// The header Envoy's local rate limit filter sets on its 429.
pub const RATELIMITED_HEADER: &str = "x-envoy-ratelimited";

#[cfg(test)]
mod tests;
