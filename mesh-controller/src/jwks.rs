//! Key sets of `RequestAuthentication` rules that name a `jwksUri`, or that name only
//! an `issuer` (`OpenID` discovery): fetched by the controller and pushed inline, as
//! istiod does, so waypoints never reach out to an identity provider and keep
//! verifying while it is away.
//!
//! The fetched document is written into the rule's own `jwks` field of the pushed
//! object, in place of its `jwksUri` (only when the user left `jwks` empty: an inline
//! set wins, as in Istio; validation holds the two fields mutually exclusive).
//! That is the least invasive carrier: the control protocol, the agents' view and the
//! waypoint's compile step stay as they are, and a waypoint sees one shape whether the
//! keys were written inline or fetched.
//!
//! A rule with neither `jwks` nor `jwksUri` finds its keys as Istio does: a GET of
//! `<issuer>/.well-known/openid-configuration` (one trailing `/` of the issuer
//! dropped), whose `jwks_uri` string is then fetched. Such a rule is cached under that
//! discovery URL ([`discovery_url`]).
//!
//! Fetching: a configuration's new URIs *before* it is accepted
//! ([`crate::server::Controller::apply_fetching`], at most [`FIRST_FETCH_WAIT`] each,
//! in parallel), so a new `jwksUri` never answers 401 for want of keys while its
//! provider is up; then each URI on its own [`Schedule`]: a good key set again every
//! [`REFRESH`] (istiod's default 20 minutes, `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`); a
//! failing one with exponential backoff, [`FIRST_RETRY`] after the first failure,
//! doubled after each further one, at most [`RETRY_CAP`], back to [`REFRESH`] after a
//! success. (istiod backs off the same way, from 1 minute doubling to 60, but for its
//! whole cache at once, with up to 7 retries 1 s apart inside each fetch; per URI, a
//! failing provider does not change how often the good ones are fetched, and the cap
//! at the refresh period means a provider that comes back is seen within 20 minutes.)
//! Each fetch runs within the rule's `timeout` (default [`DEFAULT_TIMEOUT`]). A failed fetch keeps the last good keys;
//! the failure is logged once per change of its reason, shown in the controller's
//! `/status` and added to `Config::warnings` on the objects that use the URI. A rule
//! whose URI never answered is pushed without keys: waypoints refuse its tokens
//! (fail closed). `http://` and `https://` (rustls, the system's roots) are supported.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, LazyLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use mesh_common::config::{Config, Problem, values::parse_duration};
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use crate::server::{Controller, now_unix};

/// How often every key set is fetched again (istiod's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
pub const REFRESH: Duration = Duration::from_mins(20);
/// Istio's default `JWTRule.timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a new configuration waits for one new key set before it is accepted
/// anyway (its rules then have no keys until a later fetch succeeds).
pub const FIRST_FETCH_WAIT: Duration = Duration::from_secs(5);
/// How soon a URI is fetched again after its first failure in a row (istiod's pause
/// between the retries of one fetch, `JwtPubKeyRetryInterval`).
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two fetches of a failing URI.
pub const RETRY_CAP: Duration = REFRESH;
/// Larger answers are not key sets.
const MAX_BODY: usize = 1 << 20;
/// Appended to an issuer to find its `OpenID` configuration (`OpenID` Connect Discovery 1.0).
const DISCOVERY_SUFFIX: &str = "/.well-known/openid-configuration";

/// How one cache key is fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// The longest `timeout` of the rules that use the key.
    pub timeout: Duration,
    /// The key is an `OpenID` configuration URL, not a key set's.
    pub discover: bool,
}

/// Which cached URIs a [`refresh`] fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due<'a> {
    /// Every wanted URI (the periodic refresh).
    All,
    /// Only URIs the cache does not know (a configuration change).
    New,
    /// URIs the cache does not know and those whose last fetch failed.
    Failed,
    /// These URIs (those a [`Schedule`] says are due).
    Listed(&'a BTreeSet<String>),
}

/// How long after a fetch of a URI the next one is due: [`REFRESH`] after a success
/// (`failures` 0); after the `failures`th failure in a row, [`FIRST_RETRY`] doubled
/// for each failure before it, at most [`RETRY_CAP`].
pub fn next_fetch_in(failures: u32) -> Duration {
    match failures {
        0 => REFRESH,
        n => FIRST_RETRY.saturating_mul(1u32.checked_shl(n - 1).unwrap_or(u32::MAX)).min(RETRY_CAP),
    }
}

/// Where one URI stands in the fetch schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    /// Failed fetches in a row (0 after a success).
    failures: u32,
    /// When the next fetch is due, on the caller's clock.
    due: Duration,
}

/// When each wanted URI is fetched next. Pure: the caller passes the time (any
/// monotonic clock's reading as a `Duration` since an epoch of its choosing) and the
/// fetch outcomes; the schedule answers which URIs are due and how long to sleep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    slots: BTreeMap<String, Slot>,
}

impl Schedule {
    /// The URIs of `wanted` due at `now`: those whose time has come, and those the
    /// schedule does not know yet and `cache` has no entry for (a URI fetched before
    /// its configuration was accepted is adopted by [`Self::adopt`] instead). URIs no
    /// longer wanted are forgotten.
    pub fn due(&mut self, wanted: &BTreeMap<String, Want>, now: Duration) -> BTreeSet<String> {
        self.slots.retain(|uri, _| wanted.contains_key(uri));
        wanted.keys().filter(|uri| self.slots.get(*uri).is_none_or(|slot| slot.due <= now)).cloned().collect()
    }

    /// Takes on the URIs of `wanted` that `cache` knows and the schedule does not,
    /// from their last outcome there as if fetched at `now` (a failure counts as the
    /// first in a row).
    pub fn adopt(&mut self, wanted: &BTreeMap<String, Want>, cache: &Cache, now: Duration) {
        for (uri, entry) in cache.iter().filter(|(uri, _)| wanted.contains_key(*uri)) {
            if !self.slots.contains_key(uri) {
                self.record(uri, entry.error.is_none(), now);
            }
        }
    }

    /// Records the outcome of a fetch of `uri` at `now`.
    pub fn record(&mut self, uri: &str, ok: bool, now: Duration) {
        let failures = if ok { 0 } else { self.slots.get(uri).map_or(0, |s| s.failures).saturating_add(1) };
        self.slots.insert(uri.to_owned(), Slot { failures, due: now.saturating_add(next_fetch_in(failures)) });
    }

    /// How long from `now` until the next URI is due (zero when one is already),
    /// [`REFRESH`] when there is none.
    pub fn sleep(&self, now: Duration) -> Duration {
        self.slots.values().map(|slot| slot.due.saturating_sub(now)).min().unwrap_or(REFRESH)
    }

    /// Failed fetches in a row of `uri` (0 when unknown or after a success).
    pub fn failures(&self, uri: &str) -> u32 {
        self.slots.get(uri).map_or(0, |s| s.failures)
    }
}

/// What the controller knows of one URI.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// The last good key set (JSON text).
    pub keys: Option<String>,
    /// Unix seconds of the last good fetch.
    pub fetched_at: Option<i64>,
    /// Why the last fetch failed; `None` after a success.
    pub error: Option<String>,
    /// The key set's URI as the issuer's `OpenID` configuration named it (discovery only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
}

/// URI -> what was fetched.
pub type Cache = BTreeMap<String, Entry>;

/// Why one fetch failed. Each names the URI (a key set's, or an `OpenID` configuration's).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET {uri:?}: not an absolute http or https URI")]
    BadUri { uri: String },
    #[error("GET {uri:?}: connecting failed")]
    Connect {
        uri: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GET {uri:?}: HTTP exchange failed")]
    Http {
        uri: String,
        #[source]
        source: hyper::Error,
    },
    #[error("GET {uri:?}: the answer was {status}")]
    Status { uri: String, status: StatusCode },
    #[error("GET {uri:?}: the body was unreadable or larger than {MAX_BODY} bytes")]
    Body { uri: String },
    #[error("GET {uri:?}: no answer within {timeout:?}")]
    Timeout { uri: String, timeout: Duration },
    #[error("GET {uri:?}: the answer is not a key set (a JSON object with a \"keys\" array)")]
    NotJwks { uri: String },
    #[error("GET {uri:?}: the answer is not an OpenID configuration (a JSON object with a \"jwks_uri\" string)")]
    NotDiscovery { uri: String },
}

/// Where `issuer`'s `OpenID` configuration is (Istio drops one trailing `/` first).
pub fn discovery_url(issuer: &str) -> String {
    format!("{}{DISCOVERY_SUFFIX}", issuer.strip_suffix('/').unwrap_or(issuer))
}

/// The cache key of `rule`'s keys and whether it is found by discovery; `None` when
/// the rule carries its keys inline.
fn key_source(rule: &mesh_common::config::security::JwtRule) -> Option<(String, bool)> {
    match (&rule.jwks, &rule.jwks_uri) {
        (Some(_), _) => None,
        (None, Some(uri)) => Some((uri.clone(), false)),
        (None, None) => Some((discovery_url(&rule.issuer), true)),
    }
}

/// Every URI to fetch (a `jwksUri`, or an issuer's [`discovery_url`]), with the
/// longest `timeout` of the rules that use it. Rules with inline `jwks` are not
/// fetched (the inline set wins).
pub fn wanted(config: &Config) -> BTreeMap<String, Want> {
    let mut uris = BTreeMap::new();
    for policy in &config.request_authentications {
        for rule in &policy.spec.jwt_rules {
            let Some((uri, discover)) = key_source(rule) else { continue };
            let timeout = rule.timeout.as_deref().and_then(|t| parse_duration(t).ok()).unwrap_or(DEFAULT_TIMEOUT);
            let slot: &mut Want = uris.entry(uri).or_insert(Want { timeout, discover });
            slot.timeout = slot.timeout.max(timeout);
            // A `jwksUri` that happens to be a discovery URL is fetched as one.
            slot.discover |= discover;
        }
    }
    uris
}

/// Writes the cached key sets into the rules that fetch them, and a warning on each
/// object whose URI failed its last fetch (with or without older keys in force).
pub fn inline(config: &mut Config, cache: &Cache) {
    for policy in &mut config.request_authentications {
        let object = format!("RequestAuthentication/{}/{}", policy.metadata.namespace, policy.metadata.name);
        for (index, rule) in policy.spec.jwt_rules.iter_mut().enumerate() {
            let Some((uri, discover)) = key_source(rule) else { continue };
            let entry = cache.get(&uri);
            if let Some(error) = entry.and_then(|e| e.error.as_ref()) {
                let kept = if entry.is_some_and(|e| e.keys.is_some()) {
                    "the last good keys stay in force"
                } else {
                    "no keys yet: waypoints refuse this issuer's tokens"
                };
                let field = if discover { "issuer" } else { "jwksUri" };
                config.warnings.push(Problem::new(
                    object.clone(),
                    Some(object.clone()),
                    format!("spec.jwtRules[{index}].{field}"),
                    format!("{error}; {kept}"),
                ));
            }
            if let Some(keys) = entry.and_then(|e| e.keys.clone()) {
                rule.jwks = Some(keys);
                // Validation holds `jwks` and `jwksUri` mutually exclusive; the pushed
                // object stays valid. Without keys the URI stays, for the waypoint's
                // "not fetched" report.
                rule.jwks_uri = None;
            }
        }
    }
}

/// A TLS client trusting the system's roots (none found: https fetches fail, http works).
pub fn connector() -> TlsConnector {
    static CONFIG: LazyLock<Arc<rustls::ClientConfig>> = LazyLock::new(|| {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            warn!("no system root certificates: https jwksUri fetches will fail");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    });
    TlsConnector::from(CONFIG.clone())
}

/// GETs `uri` within `timeout` and checks that the answer looks like a key set.
pub async fn fetch(uri: &str, timeout: Duration, tls: &TlsConnector) -> Result<String, FetchError> {
    within(uri, timeout, fetch_keys(uri, tls)).await
}

/// `OpenID` discovery within `timeout` (both GETs together): the key set's URI named by
/// the configuration at `discovery` ([`discovery_url`]), and the key set.
pub async fn discover(discovery: &str, timeout: Duration, tls: &TlsConnector) -> Result<(String, String), FetchError> {
    within(discovery, timeout, async {
        let body = get_text(discovery, tls).await?;
        let document = serde_json::from_str::<serde_json::Value>(&body).ok();
        let Some(uri) = document.as_ref().and_then(|d| d["jwks_uri"].as_str()) else {
            return Err(FetchError::NotDiscovery { uri: discovery.to_owned() });
        };
        let keys = fetch_keys(uri, tls).await?;
        Ok((uri.to_owned(), keys))
    })
    .await
}

async fn within<T>(
    uri: &str,
    timeout: Duration,
    work: impl Future<Output = Result<T, FetchError>>,
) -> Result<T, FetchError> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(FetchError::Timeout { uri: uri.to_owned(), timeout }))
}

async fn fetch_keys(uri: &str, tls: &TlsConnector) -> Result<String, FetchError> {
    let keys = get_text(uri, tls).await?;
    let is_jwks = serde_json::from_str::<serde_json::Value>(&keys).is_ok_and(|v| v["keys"].is_array());
    if !is_jwks {
        return Err(FetchError::NotJwks { uri: uri.to_owned() });
    }
    Ok(keys)
}

/// The body of a successful GET of `text`, as UTF-8.
async fn get_text(text: &str, tls: &TlsConnector) -> Result<String, FetchError> {
    let bad = || FetchError::BadUri { uri: text.to_owned() };
    let uri: Uri = text.parse().map_err(|_| bad())?;
    let secure = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad()),
    };
    let host = uri.host().ok_or_else(bad)?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let connect = |source| FetchError::Connect { uri: text.to_owned(), source };
    let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(connect)?;
    if secure {
        let name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
        let stream = tls.connect(name, tcp).await.map_err(connect)?;
        get(text, &uri, stream).await
    } else {
        get(text, &uri, tcp).await
    }
}

async fn get<S>(text: &str, uri: &Uri, stream: S) -> Result<String, FetchError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http = |source| FetchError::Http { uri: text.to_owned(), source };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    let driver = tokio::spawn(connection);
    let authority = uri.authority().map(ToString::to_string).unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|_| FetchError::BadUri { uri: text.to_owned() })?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    if !status.is_success() {
        driver.abort();
        return Err(FetchError::Status { uri: text.to_owned(), status });
    }
    let body = Limited::new(response.into_body(), MAX_BODY).collect().await;
    driver.abort();
    let body = body.map_err(|_| FetchError::Body { uri: text.to_owned() })?.to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| FetchError::Body { uri: text.to_owned() })
}

/// Fetches the URIs of `wanted` that are `due` and returns the updated cache: URIs
/// no longer wanted are dropped, a failure keeps the last good keys. Logs a failure
/// once per change of its reason.
pub async fn refresh(cache: &Cache, wanted: &BTreeMap<String, Want>, due: Due<'_>, tls: &TlsConnector) -> Cache {
    let mut next: Cache =
        cache.iter().filter(|(uri, _)| wanted.contains_key(*uri)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let due: Vec<(&String, &Want)> = wanted
        .iter()
        .filter(|(uri, _)| match (due, next.get(*uri)) {
            (Due::All, _) | (_, None) => true,
            (Due::New, Some(_)) => false,
            (Due::Failed, Some(entry)) => entry.error.is_some(),
            (Due::Listed(listed), Some(_)) => listed.contains(*uri),
        })
        .collect();
    let results = futures_util::future::join_all(due.iter().map(|(uri, want)| async move {
        if want.discover {
            discover(uri, want.timeout, tls).await.map(|(found, keys)| (Some(found), keys))
        } else {
            fetch(uri, want.timeout, tls).await.map(|keys| (None, keys))
        }
    }))
    .await;
    for ((uri, _), result) in due.into_iter().zip(results) {
        let entry = next.entry(uri.clone()).or_default();
        match result {
            Ok((found, keys)) => {
                if entry.error.is_some() {
                    info!(uri, "jwksUri reachable again");
                }
                entry.keys = Some(keys);
                entry.fetched_at = Some(now_unix());
                entry.error = None;
                entry.jwks_uri = found;
            }
            Err(error) => {
                let reason = error.to_string();
                if entry.error.as_ref() != Some(&reason) {
                    warn!(uri, kept_last_good = entry.keys.is_some(), "{reason}");
                }
                entry.error = Some(reason);
            }
        }
    }
    next
}

/// The controller's fetch loop: each URI when its [`Schedule`] says, and on every
/// configuration change the URIs it brought (usually fetched already, before it was
/// accepted: then adopted, not fetched again); a changed cache is pushed as a new
/// configuration version.
pub async fn run(controller: Arc<Controller>) {
    let tls = connector();
    let mut changes = controller.subscribe();
    let start = tokio::time::Instant::now();
    let mut schedule = Schedule::default();
    loop {
        let wanted = controller.jwks_wanted();
        let cache = controller.jwks();
        let now = start.elapsed();
        schedule.adopt(&wanted, &cache, now);
        let due = schedule.due(&wanted, now);
        if !due.is_empty() {
            let fetched = refresh(&cache, &wanted, Due::Listed(&due), &tls).await;
            let now = start.elapsed();
            for uri in &due {
                let ok = fetched.get(uri).is_some_and(|e| e.error.is_none());
                schedule.record(uri, ok, now);
                if !ok {
                    let failures = schedule.failures(uri);
                    tracing::debug!(uri, failures, retry_in = ?next_fetch_in(failures), "jwksUri fetch failed");
                }
            }
            if fetched != cache {
                controller.set_jwks(fetched);
            }
        }
        let sleep = schedule.sleep(start.elapsed());
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            notified = changes.changed() => {
                if notified.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
