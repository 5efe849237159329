//! The circuit breaker of one destination (Envoy's cluster circuit-breaker thresholds,
//! Istio's `connectionPool`): counters shared by every request to it. The proxy holds an
//! `Arc<Breaker>` per destination and asks before each request, wait for a connection,
//! connection and retry; over a limit the answer is `None` and the proxy answers 503 with
//! flag `UO` at once (nothing queues without bound). A granted slot is a guard that gives
//! it back when dropped.
use std::sync::{
    Arc,
    atomic::{AtomicU32, AtomicU64, Ordering},
};

use crate::policy::Limits;

/// The four resources Envoy's thresholds bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// Requests in flight (`http2MaxRequests`).
    Requests,
    /// Requests waiting for a connection (`http1MaxPendingRequests`).
    Pending,
    /// Upstream connections (`tcp.maxConnections`).
    Connections,
    /// Retries in flight (`maxRetries`).
    Retries,
}

const RESOURCES: usize = 4;

impl Resource {
    fn index(self) -> usize {
        self as usize
    }

    fn limit(self, limits: &Limits) -> u32 {
        match self {
            Resource::Requests => limits.max_requests,
            Resource::Pending => limits.max_pending_requests,
            Resource::Connections => limits.max_connections,
            Resource::Retries => limits.max_retries,
        }
    }
}

/// Counters of one destination.
#[derive(Debug, Default)]
pub struct Breaker {
    active: [AtomicU32; RESOURCES],
    /// Times a resource was refused (Envoy's `upstream_rq_pending_overflow` and kin).
    overflows: [AtomicU64; RESOURCES],
    /// Woken when a connection of the destination may have become free (a response
    /// ended, a connection closed), for requests waiting for one.
    freed: tokio::sync::Notify,
}

/// A snapshot of the counters, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u32,
    pub pending: u32,
    pub connections: u32,
    pub retries: u32,
    pub overflows: u64,
}

/// One granted slot of a resource, given back on drop.
#[derive(Debug)]
pub struct Guard {
    breaker: Arc<Breaker>,
    resource: Resource,
}

impl Guard {
    pub fn resource(&self) -> Resource {
        self.resource
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.breaker.active[self.resource.index()].fetch_sub(1, Ordering::AcqRel);
        if self.resource == Resource::Connections {
            self.breaker.notify_freed();
        }
    }
}

impl Breaker {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A slot of `resource` if fewer than its limit are taken.
    pub fn try_acquire(self: &Arc<Self>, resource: Resource, limits: &Limits) -> Option<Guard> {
        let limit = resource.limit(limits);
        let counter = &self.active[resource.index()];
        if counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then(|| n + 1)).is_ok() {
            Some(Guard { breaker: Arc::clone(self), resource })
        } else {
            self.overflows[resource.index()].fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// A request in flight (`http2MaxRequests`).
    pub fn try_request(self: &Arc<Self>, limits: &Limits) -> Option<Guard> {
        self.try_acquire(Resource::Requests, limits)
    }

    /// A request waiting for a connection (`http1MaxPendingRequests`).
    pub fn try_pending(self: &Arc<Self>, limits: &Limits) -> Option<Guard> {
        self.try_acquire(Resource::Pending, limits)
    }

    /// A new upstream connection (`tcp.maxConnections`).
    pub fn try_connection(self: &Arc<Self>, limits: &Limits) -> Option<Guard> {
        self.try_acquire(Resource::Connections, limits)
    }

    /// A new upstream connection over the limit: an endpoint with no connection at
    /// all gets one anyway (as Envoy's pools do), else its requests could only wait
    /// for connections to other endpoints to close.
    pub fn force_connection(self: &Arc<Self>) -> Guard {
        self.active[Resource::Connections.index()].fetch_add(1, Ordering::AcqRel);
        Guard { breaker: Arc::clone(self), resource: Resource::Connections }
    }

    /// Wakes the requests waiting for a connection to check again.
    pub fn notify_freed(&self) {
        self.freed.notify_waiters();
    }

    /// Resolves at the next [`Breaker::notify_freed`] after it is enabled (pin it and
    /// call `enable` before checking for a free connection: no wake-up is lost).
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// A retry in flight (`maxRetries`); refused, the proxy returns the last answer.
    pub fn try_retry(self: &Arc<Self>, limits: &Limits) -> Option<Guard> {
        self.try_acquire(Resource::Retries, limits)
    }

    pub fn active(&self, resource: Resource) -> u32 {
        self.active[resource.index()].load(Ordering::Acquire)
    }

    pub fn overflows(&self, resource: Resource) -> u64 {
        self.overflows[resource.index()].load(Ordering::Relaxed)
    }

    pub fn counts(&self) -> Counts {
        Counts {
            requests: self.active(Resource::Requests),
            pending: self.active(Resource::Pending),
            connections: self.active(Resource::Connections),
            retries: self.active(Resource::Retries),
            overflows: self.overflows.iter().map(|o| o.load(Ordering::Relaxed)).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Barrier, Mutex},
        thread,
    };

    use super::*;

    fn limits(n: u32) -> Limits {
        Limits { max_requests: n, max_pending_requests: n, max_connections: n, max_retries: n, ..Limits::default() }
    }

    #[tokio::test]
    async fn forced_connections_count_and_a_closed_one_wakes_the_waiting() {
        let breaker = Breaker::new();
        let first = breaker.try_connection(&limits(1)).expect("under the limit");
        assert!(breaker.try_connection(&limits(1)).is_none());
        let forced = breaker.force_connection();
        assert_eq!(breaker.counts().connections, 2);
        let freed = breaker.freed();
        let mut freed = std::pin::pin!(freed);
        freed.as_mut().enable();
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), freed).await.expect("the waiting request is woken");
        drop(forced);
        assert_eq!(breaker.counts().connections, 0);
        assert!(breaker.try_connection(&limits(1)).is_some());
    }

    #[test]
    fn a_limit_is_a_limit_and_guards_give_back() {
        let breaker = Breaker::new();
        let l = limits(2);
        let a = breaker.try_request(&l).unwrap();
        let b = breaker.try_request(&l).unwrap();
        assert!(breaker.try_request(&l).is_none());
        assert_eq!(breaker.counts().requests, 2);
        assert_eq!(breaker.overflows(Resource::Requests), 1);
        // Resources are independent.
        let _p = breaker.try_pending(&l).unwrap();
        let _c = breaker.try_connection(&l).unwrap();
        let _r = breaker.try_retry(&l).unwrap();
        drop(a);
        assert_eq!(breaker.active(Resource::Requests), 1);
        let _again = breaker.try_request(&l).unwrap();
        drop(b);
        let counts = breaker.counts();
        assert_eq!((counts.requests, counts.pending, counts.connections, counts.retries), (1, 1, 1, 1));
    }

    #[test]
    fn defaults_are_unlimited_and_zero_refuses() {
        let breaker = Breaker::new();
        let guards: Vec<Guard> = (0..10_000).map(|_| breaker.try_retry(&Limits::default()).unwrap()).collect();
        assert_eq!(breaker.active(Resource::Retries), 10_000);
        drop(guards);
        assert_eq!(breaker.active(Resource::Retries), 0);
        assert!(breaker.try_request(&limits(0)).is_none());
    }

    #[test]
    fn never_more_than_the_limit_under_concurrency() {
        const THREADS: usize = 8;
        const LIMIT: u32 = 3;
        let breaker = Breaker::new();
        let l = limits(LIMIT);
        let start = Arc::new(Barrier::new(THREADS));
        let max_seen = Arc::new(Mutex::new(0u32));
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (breaker, start, max_seen) = (Arc::clone(&breaker), Arc::clone(&start), Arc::clone(&max_seen));
                thread::spawn(move || {
                    start.wait();
                    let (mut granted, mut refused) = (0u32, 0u32);
                    for _ in 0..2_000 {
                        match breaker.try_request(&l) {
                            Some(guard) => {
                                granted += 1;
                                let now = breaker.active(Resource::Requests);
                                assert!(now <= LIMIT, "{now} in flight over a limit of {LIMIT}");
                                let mut m = max_seen.lock().unwrap();
                                *m = (*m).max(now);
                                drop(m);
                                thread::yield_now();
                                drop(guard);
                            }
                            None => refused += 1,
                        }
                    }
                    (granted, refused)
                })
            })
            .collect();
        let (mut granted, mut refused) = (0, 0);
        for h in handles {
            let (g, r) = h.join().unwrap();
            granted += g;
            refused += r;
        }
        assert_eq!(granted + refused, 16_000);
        assert!(granted > 0);
        assert_eq!(u64::from(refused), breaker.overflows(Resource::Requests));
        assert_eq!(breaker.active(Resource::Requests), 0, "every guard gave its slot back");
        assert!(*max_seen.lock().unwrap() <= LIMIT);
    }
}
