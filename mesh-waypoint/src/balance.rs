//! Endpoint selection: given the [`LbPolicy`] a `DestinationRule` resolved to and the
//! endpoints of the destination (as indexes into the caller's list), pick one.
//!
//! Everything that varies per request comes in through [`PickContext`]: the request's
//! hash (from [`HashKey::hash`]), a random `roll`, the in-flight count per endpoint and
//! which endpoints may be used (not ejected; see [`crate::outlier::Outliers::eligible`],
//! which already accounts for panic mode). The only state inside is round robin's
//! counter. Weights are all 1 (Kubernetes endpoints carry none).
//!
//! Consistent hashing follows Envoy: the ring hash puts `ceil(min_ring_size / n)` points
//! (rounded up to a power of two, see [`ring`]) per endpoint at `xxh64("<key>_<i>")` and a request goes to the first point at or
//! after its hash; Maglev fills a prime-sized table from per-endpoint permutations
//! (`offset = xxh64(key, 0) % M`, `skip = xxh64(key, 1) % (M - 1) + 1`) and a request
//! goes to `table[hash % M]`. Envoy rebuilds both without ejected hosts; here an
//! ineligible endpoint's keys move to the next eligible point of the ring (what a
//! rebuilt ring does) or the next slot of the table, so the other endpoints keep theirs.
use std::{
    fmt::Write as _,
    net::IpAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use http::{HeaderMap, HeaderValue, header};

use crate::policy::{HashAlgo, HashKey, LbPolicy};

pub mod locality;
mod xxhash;
pub use xxhash::xxh64;

/// Envoy's `max_ring_size` default: the ring never grows beyond 8 Mi points.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

/// What one pick needs to know about the request and the endpoints' state now.
pub struct PickContext<'a> {
    /// The request's hash key ([`HashKey::hash`]); consistent hashing without one (the
    /// header is absent) picks at random, as Envoy does.
    pub hash: Option<u64>,
    /// A random number, fresh for each pick.
    pub roll: u64,
    /// Requests in flight per endpoint (for least request).
    pub active: &'a dyn Fn(usize) -> u32,
    /// Whether an endpoint may be picked (not ejected, or panic mode).
    pub eligible: &'a dyn Fn(usize) -> bool,
}

/// Picks endpoints `0..len` of one destination by one policy.
#[derive(Debug)]
pub struct Balancer {
    len: usize,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    RoundRobin(AtomicUsize),
    LeastRequest,
    Random,
    /// Sorted (point hash, endpoint).
    Ring(Vec<(u64, u32)>),
    /// Slot -> endpoint.
    Maglev(Vec<u32>),
}

impl Balancer {
    /// `keys` name the endpoints stably (`"10.1.2.3:8080"`): consistent hashing places
    /// them by key, so an endpoint keeps its share when others come and go.
    pub fn new<K: AsRef<str>>(policy: &LbPolicy, keys: &[K]) -> Self {
        let kind = match policy {
            LbPolicy::RoundRobin => Kind::RoundRobin(AtomicUsize::new(0)),
            LbPolicy::LeastRequest => Kind::LeastRequest,
            LbPolicy::Random => Kind::Random,
            LbPolicy::ConsistentHash(ch) => match ch.algo {
                HashAlgo::RingHash { min_ring_size } => Kind::Ring(ring(keys, min_ring_size)),
                HashAlgo::Maglev { table_size } => Kind::Maglev(maglev(keys, table_size)),
            },
        };
        Self { len: keys.len(), kind }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An eligible endpoint, or `None` when there is none (the proxy answers 503 `UH`).
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<usize> {
        let eligible = (0..self.len).filter(|&i| (ctx.eligible)(i)).count();
        if eligible == 0 {
            return None;
        }
        match &self.kind {
            Kind::RoundRobin(next) => {
                // The k-th eligible endpoint, so that ejections do not skew the rotation
                // towards the endpoint after an ejected one.
                let k = next.fetch_add(1, Ordering::Relaxed) % eligible;
                self.nth_eligible(ctx, k)
            }
            Kind::Random => self.nth_eligible(ctx, (ctx.roll % eligible as u64) as usize),
            Kind::LeastRequest => {
                // Power of two choices (Envoy's default choice_count 2), two distinct draws.
                let a = (ctx.roll % eligible as u64) as usize;
                if eligible == 1 {
                    return self.nth_eligible(ctx, a);
                }
                let mut b = ((ctx.roll >> 32) % (eligible as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let (a, b) = (self.nth_eligible(ctx, a)?, self.nth_eligible(ctx, b)?);
                Some(if (ctx.active)(b) < (ctx.active)(a) { b } else { a })
            }
            Kind::Ring(points) => {
                let hash = ctx.hash.unwrap_or(ctx.roll);
                let start = points.partition_point(|(h, _)| *h < hash);
                (0..points.len()).map(|i| points[(start + i) % points.len()].1 as usize).find(|&e| (ctx.eligible)(e))
            }
            Kind::Maglev(table) => {
                let hash = ctx.hash.unwrap_or(ctx.roll);
                let start = (hash % table.len() as u64) as usize;
                (0..table.len())
                    .map(|i| table[(start + i) % table.len()] as usize)
                    .find(|&e| (ctx.eligible)(e))
                    // A table smaller than the endpoint list leaves some out of it.
                    .or_else(|| self.nth_eligible(ctx, (hash % eligible as u64) as usize))
            }
        }
    }

    fn nth_eligible(&self, ctx: &PickContext<'_>, k: usize) -> Option<usize> {
        (0..self.len).filter(|&i| (ctx.eligible)(i)).nth(k)
    }
}

/// Envoy's `RingHashLoadBalancer::Ring` with equal weights.
fn ring<K: AsRef<str>>(keys: &[K], min_ring_size: u64) -> Vec<(u64, u32)> {
    if keys.is_empty() {
        return Vec::new();
    }
    let n = keys.len() as u64;
    // Envoy: ceil(min_ring_size / n) points per endpoint (equal weights). Rounded up to a
    // power of two here, so that the count (and with it the placement of other
    // endpoints' keys) changes only when n crosses a power of two, not with every
    // endpoint that comes or goes; the ring is between 1 and 2 times the minimum.
    let per_endpoint = min_ring_size.div_ceil(n).max(1).next_power_of_two().min((MAX_RING_SIZE / n).max(1));
    let mut points = Vec::with_capacity((per_endpoint * n) as usize);
    for (e, key) in keys.iter().enumerate() {
        let mut buf = String::with_capacity(key.as_ref().len() + 8);
        for i in 0..per_endpoint {
            buf.clear();
            buf.push_str(key.as_ref());
            buf.push('_');
            buf.push_str(&i.to_string());
            points.push((xxh64(buf.as_bytes(), 0), e as u32));
        }
    }
    points.sort_unstable();
    points
}

/// Envoy's `MaglevTable` with equal weights. `table_size` is prime (checked by
/// [`crate::policy::consistent_hash`]), so every permutation visits every slot.
fn maglev<K: AsRef<str>>(keys: &[K], table_size: u64) -> Vec<u32> {
    if keys.is_empty() {
        return Vec::new();
    }
    let m = table_size.max(2);
    let perms: Vec<(u64, u64)> = keys
        .iter()
        .map(|k| {
            let k = k.as_ref().as_bytes();
            (xxh64(k, 0) % m, xxh64(k, 1) % (m - 1) + 1)
        })
        .collect();
    let mut next = vec![0u64; keys.len()];
    let mut table = vec![u32::MAX; m as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (e, &(offset, skip)) in perms.iter().enumerate() {
            let mut slot = ((offset + skip * next[e]) % m) as usize;
            while table[slot] != u32::MAX {
                next[e] += 1;
                slot = ((offset + skip * next[e]) % m) as usize;
            }
            table[slot] = e as u32;
            next[e] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

impl HashKey {
    /// The request's hash for consistent hashing, and the `Set-Cookie` value to add to
    /// the response when the key is a cookie with a `ttl` that the request lacks or
    /// sends empty (Envoy then makes one up from `seed`, one per downstream connection,
    /// and the request is hashed by it).
    /// `None` when the request carries no key: the balancer then picks at random.
    pub fn hash(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        source_ip: IpAddr,
        seed: u64,
    ) -> (Option<u64>, Option<HeaderValue>) {
        match self {
            HashKey::Header(name) => {
                let mut values = headers.get_all(name).iter().peekable();
                if values.peek().is_none() {
                    return (None, None);
                }
                // Several values hash as one, joined as a list would be.
                let joined: Vec<&[u8]> = values.map(HeaderValue::as_bytes).collect();
                (Some(xxh64(&joined.join(&b","[..]), 0)), None)
            }
            HashKey::SourceIp => (Some(xxh64(source_ip.to_string().as_bytes(), 0)), None),
            HashKey::QueryParam(name) => {
                let value = query.and_then(|q| {
                    q.split('&').find_map(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        (k == name).then_some(v)
                    })
                });
                (value.map(|v| xxh64(v.as_bytes(), 0)), None)
            }
            HashKey::Cookie { name, path, ttl } => {
                if let Some(value) = cookie_value(headers, name) {
                    return (Some(xxh64(value.as_bytes(), 0)), None);
                }
                let Some(ttl) = ttl else { return (None, None) };
                let value = format!("{:016x}", xxh64(&seed.to_le_bytes(), 0));
                // Envoy's `makeSetCookieValue`: quoted value, Max-Age unless a session
                // cookie (ttl 0), Path when set, HttpOnly.
                let mut set = format!("{name}=\"{value}\"");
                // Whole seconds; under one second is a session cookie, not `Max-Age=0`
                // (which would delete it at once).
                if ttl.as_secs() > 0 {
                    let _ = write!(set, "; Max-Age={}", ttl.as_secs());
                }
                if let Some(path) = path {
                    let _ = write!(set, "; Path={path}");
                }
                set.push_str("; HttpOnly");
                // The name and path were checked to be header-safe when the policy was read.
                let set_cookie = HeaderValue::from_str(&set).ok();
                (Some(xxh64(value.as_bytes(), 0)), set_cookie)
            }
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers, quotes removed (as
/// Envoy's `parseCookieValue` does); an empty value counts as none.
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| {
        line.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            (k == name && !v.is_empty()).then_some(v)
        })
    })
}

#[cfg(test)]
mod tests;
