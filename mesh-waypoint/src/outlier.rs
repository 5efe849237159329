//! Outlier detection for one destination: consecutive-error counters per endpoint,
//! ejection and readmission, as Envoy's `DetectorImpl` does with Istio's settings
//! ([`OutlierConfig`]). Time comes in as arguments; nothing here reads a clock.
//!
//! - A response of 500-599 counts towards `consecutive5xxErrors`; 502/503/504 (or what
//!   the caller calls a gateway error) also towards `consecutiveGatewayErrors`, and any
//!   other 5xx resets that one. Anything else resets both.
//! - A local-origin failure (connect failure, reset, timeout) counts as a 503 unless
//!   `splitExternalLocalOriginErrors`, when it counts towards
//!   `consecutiveLocalOriginFailures` alone, and a response resets that counter.
//! - When a counter reaches its threshold it resets, and the endpoint is ejected if
//!   fewer than `maxEjectionPercent` of the endpoints are ejected now (Envoy's
//!   `ejected_percent < max_ejection_percent` test: with 10 % and 3 endpoints the first
//!   ejection happens, the second does not).
//! - An ejected endpoint is out for `baseEjectionTime x times ejected`, at most
//!   `max_ejection_time` (Envoy's 300 s, or the base if larger); the multiplier stops
//!   growing at that cap. A readmitted endpoint starts with clean counters. Each [`Outliers::sweep`]
//!   (every `interval`) readmits those whose time is up and lowers the multiplier of
//!   endpoints that stayed in for a whole interval, as Envoy does since 1.19.
//! - Panic mode: while fewer than `minHealthPercent` of the endpoints are in,
//!   [`Outliers::eligible`] says yes for all (Envoy's `healthy_panic_threshold`; Istio's
//!   default 0 never panics).
//! - Results for an endpoint while it is ejected (requests still in flight) are ignored.
use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

use crate::policy::OutlierConfig;

/// Past this an ejection is as good as forever (a year); only reached when `now` plus
/// the configured time does not fit an `Instant`.
const MAX_EJECTION_SECS: u64 = 365 * 24 * 3600;

/// How one call to an endpoint ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallResult {
    /// The upstream's HTTP status, if a response came.
    pub status: Option<u16>,
    /// 502, 503, 504, or a connect failure, reset or timeout.
    pub gateway_error: bool,
    /// The failure happened here (connect failure, reset, timeout), not at the upstream.
    pub local_origin_failure: bool,
}

/// Which counter ejected the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
}

/// An endpoint was ejected (for the log and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    pub endpoint: usize,
    pub reason: Reason,
    /// How many times it has been ejected, this time included (the multiplier).
    pub times: u32,
    pub until: Instant,
}

#[derive(Clone, Debug, Default)]
struct Host {
    five_xx: u32,
    gateway: u32,
    local_origin: u32,
    /// The ejection multiplier.
    times: u32,
    ejected_until: Option<Instant>,
    /// When it was last readmitted (or last lowered its multiplier).
    since: Option<Instant>,
}

/// Outlier state of endpoints `0..len`, named by stable keys `K` so that state survives
/// endpoint list changes ([`Outliers::set_endpoints`]).
#[derive(Clone, Debug)]
pub struct Outliers<K> {
    config: OutlierConfig,
    keys: Vec<K>,
    hosts: Vec<Host>,
}

impl<K: Eq + Hash + Clone> Outliers<K> {
    pub fn new(config: OutlierConfig, keys: Vec<K>) -> Self {
        let hosts = vec![Host::default(); keys.len()];
        Self { config, keys, hosts }
    }

    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    /// The endpoints changed: index `i` now names `keys[i]`. Endpoints that stay keep
    /// their counters and ejection; new ones start clean; gone ones are forgotten.
    pub fn set_endpoints(&mut self, keys: Vec<K>) {
        let mut old: HashMap<K, Host> = self.keys.drain(..).zip(self.hosts.drain(..)).collect();
        self.hosts = keys.iter().map(|k| old.remove(k).unwrap_or_default()).collect();
        self.keys = keys;
    }

    /// Where endpoint `endpoint` of a list made with `key` at that place is now: the
    /// same index unless the endpoints changed since ([`Outliers::set_endpoints`]),
    /// then its key's new place; `None` once it is gone. A request routed by an older
    /// list reports its result for the endpoint it used, not for whichever now sits
    /// at its index.
    pub fn position(&self, endpoint: usize, key: &K) -> Option<usize> {
        if self.keys.get(endpoint) == Some(key) { Some(endpoint) } else { self.keys.iter().position(|k| k == key) }
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Endpoints ejected now (their time may be up without a sweep yet).
    pub fn ejected_count(&self) -> usize {
        self.hosts.iter().filter(|h| h.ejected_until.is_some()).count()
    }

    pub fn is_ejected(&self, endpoint: usize, now: Instant) -> bool {
        self.hosts.get(endpoint).and_then(|h| h.ejected_until).is_some_and(|until| now < until)
    }

    /// Whether the balancer may pick `endpoint`: not ejected, or panic mode.
    pub fn eligible(&self, endpoint: usize, now: Instant) -> bool {
        !self.is_ejected(endpoint, now) || self.panic(now)
    }

    /// Fewer than `minHealthPercent` of the endpoints are in.
    pub fn panic(&self, now: Instant) -> bool {
        let n = self.hosts.len();
        let healthy = (0..n).filter(|&i| !self.is_ejected(i, now)).count();
        n > 0 && healthy * 100 < self.config.min_health_percent as usize * n
    }

    /// Counts one call's result; ejects the endpoint if a counter reached its threshold.
    pub fn record(&mut self, endpoint: usize, result: CallResult, now: Instant) -> Option<Ejection> {
        let config = self.config;
        let host = self.hosts.get_mut(endpoint)?;
        if host.ejected_until.is_some() {
            return None;
        }
        let (five_xx, gateway) = if result.local_origin_failure {
            if config.split_local_origin {
                host.local_origin += 1;
                if config.consecutive_local_origin.is_some_and(|t| host.local_origin >= t) {
                    host.local_origin = 0;
                    return self.eject(endpoint, Reason::ConsecutiveLocalOriginFailure, now);
                }
                return None;
            }
            // Envoy maps a local-origin failure to a 503 when not split.
            (true, true)
        } else {
            let five_xx = result.status.is_some_and(|s| (500..600).contains(&s));
            (five_xx, five_xx && (result.gateway_error || matches!(result.status, Some(502..=504))))
        };
        if !result.local_origin_failure {
            // A response (or a clean close) means the connection worked.
            host.local_origin = 0;
        }
        if !five_xx {
            host.five_xx = 0;
            host.gateway = 0;
            return None;
        }
        host.five_xx += 1;
        host.gateway = if gateway { host.gateway + 1 } else { 0 };
        // Envoy checks the gateway counter first.
        if config.consecutive_gateway.is_some_and(|t| host.gateway >= t) {
            host.gateway = 0;
            return self.eject(endpoint, Reason::ConsecutiveGatewayFailure, now);
        }
        if config.consecutive_5xx.is_some_and(|t| host.five_xx >= t) {
            host.five_xx = 0;
            return self.eject(endpoint, Reason::Consecutive5xx, now);
        }
        None
    }

    fn eject(&mut self, endpoint: usize, reason: Reason, now: Instant) -> Option<Ejection> {
        let ejected = self.ejected_count();
        if ejected * 100 >= self.config.max_ejection_percent as usize * self.hosts.len() {
            return None;
        }
        let cap = self.cap();
        let host = &mut self.hosts[endpoint];
        // The multiplier stops growing once the time is at its cap (Envoy's backoff),
        // so a host that flapped many times is not held at the cap for as many intervals.
        if self.config.base_ejection_time.saturating_mul(host.times) < cap {
            host.times += 1;
        }
        let duration = self.config.base_ejection_time.saturating_mul(host.times).min(cap);
        let until = now.checked_add(duration).unwrap_or(now + cap.min(Duration::from_secs(MAX_EJECTION_SECS)));
        host.ejected_until = Some(until);
        Some(Ejection { endpoint, reason, times: host.times, until })
    }

    /// The longest an ejection lasts: `max_ejection_time`, or the base if larger.
    fn cap(&self) -> Duration {
        self.config.max_ejection_time.max(self.config.base_ejection_time)
    }

    /// The periodic pass (every `interval`): readmits endpoints whose ejection is over
    /// and returns them; lowers the multiplier of endpoints in for a whole interval.
    pub fn sweep(&mut self, now: Instant) -> Vec<usize> {
        let interval = self.config.interval;
        let mut readmitted = Vec::new();
        for (i, host) in self.hosts.iter_mut().enumerate() {
            match host.ejected_until {
                Some(until) if now >= until => {
                    host.ejected_until = None;
                    // Back with clean counters, so that a few new errors do not eject
                    // it again (Envoy's `checkHostForUneject`).
                    (host.five_xx, host.gateway, host.local_origin) = (0, 0, 0);
                    host.since = Some(now);
                    readmitted.push(i);
                }
                None if host.times > 0 && host.since.is_none_or(|s| now.saturating_duration_since(s) >= interval) => {
                    host.times -= 1;
                    host.since = Some(now);
                }
                Some(_) | None => {}
            }
        }
        readmitted
    }
}

#[cfg(test)]
mod tests;
