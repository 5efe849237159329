//! Names the data path resolves: the hosts of `ServiceEntry`s of resolution `DNS`
//! (their hostname endpoints, or the entry's host when it lists no endpoint), as
//! Envoy's DNS clusters and ztunnel resolve them.
//!
//! The system resolver answers (`getaddrinfo`: `/etc/hosts`, then the name servers of
//! the proxy's own `/etc/resolv.conf`). An answer is used for [`REFRESH`]; after that
//! the next use still gets it at once while one background query asks again, as
//! Envoy's DNS clusters do, so a request never waits for a refresh. A failed refresh
//! keeps the last answer: a DNS outage costs no destination that worked. A name's
//! first resolution is waited for, one query however many ask; a name that never
//! resolved is an error its caller turns into "no healthy upstream", and is not asked
//! again for [`RETRY`]. The names come from the configuration only (never from a
//! request), and a name unused for [`FORGET`] is forgotten.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

/// How long an answer is used before the name is resolved again.
pub const REFRESH: Duration = Duration::from_secs(30);
/// How long a name that does not resolve is not asked again (each connection to it
/// fails at once meanwhile, without a query of its own).
pub const RETRY: Duration = Duration::from_secs(5);
/// How long one resolution may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How long an answer nobody uses is kept.
pub const FORGET: Duration = Duration::from_mins(10);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot resolve {host}")]
    Failed {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("resolving {host} took longer than {TIMEOUT:?}")]
    Timeout { host: String },
    #[error("{host} has no address")]
    NoAddress { host: String },
    #[error("{host} did not resolve {ago:?} ago: {reason}")]
    Recent { host: String, ago: Duration, reason: String },
}

#[derive(Debug)]
struct Answer {
    /// Sorted, without duplicates; empty while the name never resolved.
    addrs: Arc<[IpAddr]>,
    /// When the name was last asked.
    at: Instant,
    used: Instant,
    /// Why the last resolution failed (logged once, when it starts failing).
    failing: Option<String>,
    /// A background refresh is under way.
    refreshing: bool,
    /// Held by the one lookup that resolves the name the first time.
    first: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, Default)]
struct Inner {
    answers: Mutex<HashMap<String, Answer>>,
    /// Counts changes of any name's addresses.
    generation: AtomicU64,
    /// Round robin over a name's addresses ([`Resolver::pick`]).
    next: AtomicUsize,
}

/// The resolved names, shared by every connection of a proxy.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    inner: Arc<Inner>,
}

impl Resolver {
    /// The addresses of `host` (IPv4 first): the kept answer (refreshed in the
    /// background once it is older than [`REFRESH`]), or for a new name its first
    /// answer.
    pub async fn lookup(&self, host: &str) -> Result<Arc<[IpAddr]>, DnsError> {
        let first = {
            let mut answers = self.inner.answers.lock().expect("lock");
            if !answers.contains_key(host) {
                answers.retain(|_, a| a.used.elapsed() < FORGET);
            }
            let answer = answers.entry(host.to_owned()).or_insert_with(|| Answer {
                addrs: Arc::from(Vec::new()),
                at: Instant::now(),
                used: Instant::now(),
                failing: None,
                refreshing: false,
                first: Arc::default(),
            });
            answer.used = Instant::now();
            if let Some(found) = self.kept(host, answer) {
                return found;
            }
            answer.first.clone()
        };
        // One lookup resolves a new name; the others wait for its answer.
        let _turn = first.lock().await;
        if let Some(answer) = self.inner.answers.lock().expect("lock").get_mut(host)
            && let Some(found) = self.kept(host, answer)
        {
            return found;
        }
        self.inner.refresh(host).await
    }

    /// What a lookup gets without resolving (`None`: the name's first resolution, to
    /// wait for): a kept answer, or the failure of a name that never resolved; either
    /// way a background query asks again when it is due ([`REFRESH`], [`RETRY`]).
    fn kept(&self, host: &str, answer: &mut Answer) -> Option<Result<Arc<[IpAddr]>, DnsError>> {
        let age = answer.at.elapsed();
        let (due, found) = match &answer.failing {
            _ if !answer.addrs.is_empty() => (age >= REFRESH, Ok(answer.addrs.clone())),
            Some(reason) => {
                (age >= RETRY, Err(DnsError::Recent { host: host.to_owned(), ago: age, reason: reason.clone() }))
            }
            None => return None,
        };
        if due && !answer.refreshing {
            answer.refreshing = true;
            let (inner, host) = (self.inner.clone(), host.to_owned());
            tokio::spawn(async move {
                let _ = inner.refresh(&host).await;
            });
        }
        Some(found)
    }

    /// The kept answer for `host`, fresh or not, without resolving.
    pub fn cached(&self, host: &str) -> Option<Arc<[IpAddr]>> {
        self.inner.answers.lock().expect("lock").get(host).map(|a| a.addrs.clone()).filter(|a| !a.is_empty())
    }

    /// Moves whenever a name's addresses change: what was built from earlier answers
    /// (a waypoint's endpoint lists) is rebuilt when it moves.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Relaxed)
    }

    /// One of `addrs` in turn, of the IPv6 family when `v6` and there is one (else of
    /// the other); `None` only for no address at all.
    pub fn pick(&self, addrs: &[IpAddr], v6: bool) -> Option<IpAddr> {
        let family: Vec<IpAddr> = addrs.iter().copied().filter(|ip| ip.is_ipv6() == v6).collect();
        let choices = if family.is_empty() { addrs } else { &family };
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed);
        choices.get(i % choices.len().max(1)).copied()
    }
}

impl Inner {
    /// Resolves `host` and keeps the answer (a failure keeps the last good one).
    async fn refresh(&self, host: &str) -> Result<Arc<[IpAddr]>, DnsError> {
        let resolved = resolve(host).await;
        let mut answers = self.answers.lock().expect("lock");
        let Some(answer) = answers.get_mut(host) else {
            return resolved.map(Arc::from);
        };
        answer.at = Instant::now();
        answer.refreshing = false;
        match resolved {
            Ok(addrs) => {
                if answer.failing.take().is_some() {
                    info!(host, "name resolves again");
                }
                if *answer.addrs != *addrs {
                    info!(host, ?addrs, "name resolves to new addresses");
                    self.generation.fetch_add(1, Ordering::Relaxed);
                    answer.addrs = addrs.into();
                }
                Ok(answer.addrs.clone())
            }
            Err(error) => {
                let reason = crate::telemetry::error_chain(&error);
                if answer.failing.is_none() {
                    warn!(host, error = %reason, kept = ?answer.addrs, "name resolution failed");
                }
                answer.failing = Some(reason);
                if answer.addrs.is_empty() { Err(error) } else { Ok(answer.addrs.clone()) }
            }
        }
    }
}

/// One resolution through the system resolver: the addresses sorted (IPv4 first) and
/// without duplicates, so that an answer whose order rotates (as DNS servers' round
/// robin does) is the same answer.
async fn resolve(host: &str) -> Result<Vec<IpAddr>, DnsError> {
    let found = tokio::time::timeout(TIMEOUT, tokio::net::lookup_host((host, 0)))
        .await
        .map_err(|_| DnsError::Timeout { host: host.to_owned() })?
        .map_err(|source| DnsError::Failed { host: host.to_owned(), source })?;
    let mut addrs: Vec<IpAddr> = found.map(|a| a.ip()).collect();
    addrs.sort_unstable();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(DnsError::NoAddress { host: host.to_owned() });
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(resolver: &Resolver, host: &str, by: Duration) {
        let mut answers = resolver.inner.answers.lock().unwrap();
        let answer = answers.get_mut(host).unwrap();
        answer.at = Instant::now().checked_sub(by).unwrap();
    }

    /// Waits (bounded) for the background query of `host` to end.
    async fn settle(resolver: &Resolver, host: &str) {
        for _ in 0..400 {
            if !resolver.inner.answers.lock().unwrap()[host].refreshing {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the refresh of {host} did not end");
    }

    #[tokio::test]
    async fn names_resolve_once_per_refresh_and_a_failure_keeps_the_last_answer() {
        let resolver = Resolver::default();
        // Concurrent first lookups: one query, one answer for all.
        let (a, b) = tokio::join!(resolver.lookup("localhost"), resolver.lookup("localhost"));
        let first = a.expect("localhost resolves");
        assert!(Arc::ptr_eq(&first, &b.unwrap()));
        assert!(first.iter().any(IpAddr::is_loopback), "{first:?}");
        assert!(first.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates: {first:?}");
        assert_eq!(resolver.generation(), 1);
        assert_eq!(resolver.cached("localhost").as_deref(), Some(&*first));
        // Fresh: the kept answer, no new resolution, no new generation.
        let again = resolver.lookup("localhost").await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(resolver.generation(), 1);

        // A name that never resolved is an error, and nothing is kept for it; asked
        // again, it fails at once, also once a retry is due (which runs behind).
        let error = resolver.lookup("no-such-host.invalid").await.unwrap_err();
        assert!(error.to_string().contains("no-such-host.invalid"), "{error}");
        assert!(resolver.cached("no-such-host.invalid").is_none());
        let error = resolver.lookup("no-such-host.invalid").await.unwrap_err();
        assert!(matches!(error, DnsError::Recent { .. }), "{error}");
        age(&resolver, "no-such-host.invalid", RETRY * 2);
        let error = resolver.lookup("no-such-host.invalid").await.unwrap_err();
        assert!(matches!(error, DnsError::Recent { .. }), "{error}");
        settle(&resolver, "no-such-host.invalid").await;
        assert_eq!(resolver.generation(), 1);

        // A stale answer is used at once while a background query refreshes it; one
        // that resolves to other addresses moves the generation.
        let other: Arc<[IpAddr]> = vec!["192.0.2.7".parse().unwrap()].into();
        resolver.inner.answers.lock().unwrap().get_mut("localhost").unwrap().addrs = other.clone();
        age(&resolver, "localhost", REFRESH * 2);
        assert_eq!(resolver.lookup("localhost").await.unwrap(), other, "stale, used at once");
        settle(&resolver, "localhost").await;
        assert_eq!(resolver.generation(), 2);
        assert_eq!(resolver.cached("localhost"), Some(first.clone()));

        // An answer kept for a name that stops resolving outlives its refresh.
        {
            let mut answers = resolver.inner.answers.lock().unwrap();
            let answer = answers.get_mut("no-such-host.invalid").unwrap();
            answer.addrs = other.clone();
        }
        age(&resolver, "no-such-host.invalid", REFRESH * 2);
        assert_eq!(resolver.lookup("no-such-host.invalid").await.unwrap(), other);
        settle(&resolver, "no-such-host.invalid").await;
        assert_eq!(resolver.cached("no-such-host.invalid"), Some(other));
    }

    #[test]
    fn picks_rotate_within_the_wanted_family() {
        let resolver = Resolver::default();
        let addrs: Vec<IpAddr> = ["192.0.2.1", "192.0.2.2", "2001:db8::1"].iter().map(|a| a.parse().unwrap()).collect();
        let mut v4: Vec<IpAddr> = (0..4).filter_map(|_| resolver.pick(&addrs, false)).collect();
        v4.sort_unstable();
        v4.dedup();
        assert_eq!(v4, addrs[..2]);
        assert_eq!(resolver.pick(&addrs, true), Some(addrs[2]));
        // No address of the wanted family: the other.
        assert_eq!(resolver.pick(&addrs[2..], false), Some(addrs[2]));
        assert_eq!(resolver.pick(&[], false), None);
    }
}
