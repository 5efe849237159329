//! What a route does besides choosing a backend: path rewrites, redirects, header
//! operations, faults, mirrors and CORS. Each is a value with a pure method the
//! proxy calls; the conversions from the configuration live in `build`.
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, header};
use regex::Regex;

use super::{Backend, RequestParts, matcher::StrMatch};

/// How a forwarded (or redirected) path is rewritten. The query is always kept.
#[derive(Clone, Debug)]
pub enum PathRewrite {
    /// Replace the matched prefix, as text (Envoy's `prefix_rewrite`, what Istio
    /// writes for `rewrite.uri` on a prefix match): `/api` -> `/v2` turns `/api/x`
    /// into `/v2/x` and `/apix` into `/v2x`.
    Prefix { prefix: String, replacement: String },
    /// Replace the matched prefix by whole segments (Gateway API
    /// `ReplacePrefixMatch`): `/api` -> `/` turns `/api/x` into `/x`, `/api` into `/`.
    Segments { prefix: String, replacement: String },
    /// Replace the whole path (exact matches, Gateway API `ReplaceFullPath`, Istio
    /// redirect `uri`).
    Full(String),
    /// Istio `uriRegexRewrite`: every match of `pattern` in the path is replaced by
    /// `substitution` (RE2 `\1` captures, stored as `${1}`).
    Regex { pattern: Regex, substitution: String },
}

impl PathRewrite {
    /// The rewritten `path?query`.
    pub fn apply(&self, path_and_query: &str) -> String {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let mut out = match self {
            Self::Prefix { prefix, replacement } => match path.get(prefix.len()..) {
                Some(rest) if path.len() >= prefix.len() => format!("{replacement}{rest}"),
                _ => path.to_string(),
            },
            Self::Segments { prefix, replacement } => {
                let prefix = prefix.trim_end_matches('/');
                match path.strip_prefix(prefix) {
                    Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                        let head = if rest.starts_with('/') { replacement.trim_end_matches('/') } else { replacement };
                        let joined = format!("{head}{rest}");
                        if joined.is_empty() { "/".to_string() } else { joined }
                    }
                    _ => path.to_string(),
                }
            }
            Self::Full(full) => full.clone(),
            Self::Regex { pattern, substitution } => pattern.replace_all(path, substitution.as_str()).into_owned(),
        };
        // A full path that brings its own query replaces the request's (Envoy).
        let own_query = matches!(self, Self::Full(full) if full.contains('?'));
        if let Some(q) = query.filter(|_| !own_query) {
            out.push('?');
            out.push_str(q);
        }
        out
    }

    /// An Istio `uriRegexRewrite` (`{match, rewrite}`), unanchored as Envoy's
    /// `regex_rewrite`, with `\N` turned into the regex crate's `${N}`.
    pub(crate) fn regex(pattern: &str, rewrite: &str) -> Result<Self, String> {
        let pattern = Regex::new(pattern).map_err(|e| format!("regex `{pattern}` does not compile: {e}"))?;
        let mut substitution = String::with_capacity(rewrite.len());
        let mut chars = rewrite.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '$' => substitution.push_str("$$"),
                '\\' => match chars.peek() {
                    Some(d) if d.is_ascii_digit() => {
                        let d = *d;
                        chars.next();
                        substitution.push_str("${");
                        substitution.push(d);
                        substitution.push('}');
                    }
                    Some('\\') => {
                        chars.next();
                        substitution.push('\\');
                    }
                    _ => substitution.push('\\'),
                },
                c => substitution.push(c),
            }
        }
        Ok(Self::Regex { pattern, substitution })
    }
}

/// The port of a redirect's `Location`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectPort {
    /// The port of the request's authority, unless the host or the scheme changes.
    Keep,
    Set(u16),
    /// None in the URL: the scheme's default (Istio `FROM_PROTOCOL_DEFAULT`, Gateway
    /// API with a scheme and no port).
    ProtocolDefault,
    /// The port the request came in on (Istio `FROM_REQUEST_PORT`, Gateway API with
    /// neither scheme nor port: the listener's port).
    RequestPort,
}

/// A redirect answer.
#[derive(Clone, Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    /// Replaces the host (Istio `authority`, Gateway API `hostname`).
    pub host: Option<String>,
    pub port: RedirectPort,
    /// The path of the `Location`; `None` keeps the request's.
    pub path: Option<PathRewrite>,
    /// 301 (Istio's default), 302 (Gateway API's), 303, 307, 308.
    pub code: u16,
}

impl Redirect {
    /// The `Location` for `req`. A port that is the scheme's default is left out.
    pub fn location(&self, req: &RequestParts) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(req.scheme);
        let (req_host, req_port) = split_authority(req.authority);
        let host = self.host.as_deref().unwrap_or(req_host);
        let scheme_changed = self.scheme.as_deref().is_some_and(|s| !s.eq_ignore_ascii_case(req.scheme));
        let default_port = |scheme: &str| match scheme.to_ascii_lowercase().as_str() {
            "https" | "wss" => 443,
            _ => 80,
        };
        let port = match self.port {
            RedirectPort::Set(p) => Some(p),
            RedirectPort::RequestPort => Some(req.port),
            // A new scheme keeps a port unless it was the old scheme's default, as
            // Envoy's scheme redirect does (`:8080` stays, `:80` goes).
            RedirectPort::Keep if self.host.is_none() && scheme_changed => {
                req_port.filter(|p| *p != default_port(req.scheme))
            }
            RedirectPort::Keep if self.host.is_none() => req_port,
            RedirectPort::ProtocolDefault | RedirectPort::Keep => None,
        };
        let default_port = default_port(scheme);
        let path = match &self.path {
            Some(rewrite) => rewrite.apply(req.path),
            None => req.path.to_string(),
        };
        match port.filter(|p| *p != default_port) {
            Some(p) => format!("{scheme}://{host}:{p}{path}"),
            None => format!("{scheme}://{host}{path}"),
        }
    }
}

/// Host and port of an authority (`[v6]:port` keeps its brackets).
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    let (host, port) = if authority.starts_with('[') {
        match authority.rsplit_once("]:") {
            Some((h, p)) => (&authority[..=h.len()], Some(p)),
            None => (authority, None),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    match port.map(str::parse::<u16>) {
        Some(Ok(p)) => (host, Some(p)),
        Some(Err(_)) => (authority, None),
        None => (host, None),
    }
}

/// Header operations, applied as Envoy applies them: removals first, then `set`
/// (replaces every value), then `add` (appends).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    /// This one's operations followed by `other`'s.
    pub(crate) fn extend(&mut self, other: HeaderOps) {
        self.set.extend(other.set);
        self.add.extend(other.add);
        self.remove.extend(other.remove);
    }
}

/// An injected abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// Answer with this HTTP status.
    Http(u16),
    /// Answer a gRPC trailers-only response with this `grpc-status` (HTTP 200).
    Grpc(u32),
}

/// Istio's fault injection on a route.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// A fixed delay before forwarding, on `delay_percent` % of the requests.
    pub delay: Option<Duration>,
    pub delay_percent: f64,
    /// An answer instead of forwarding, on `abort_percent` % of the requests.
    pub abort: Option<Abort>,
    pub abort_percent: f64,
}

/// What a fault does to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultDecision {
    pub delay: Option<Duration>,
    pub abort: Option<Abort>,
}

impl Fault {
    /// Given two independent uniform rolls in `[0, 1)`: the delay fires when
    /// `roll_delay * 100 < delay_percent`, the abort likewise (after the delay).
    pub fn decide(&self, roll_delay: f64, roll_abort: f64) -> FaultDecision {
        FaultDecision {
            delay: self.delay.filter(|_| fires(roll_delay, self.delay_percent)),
            abort: self.abort.filter(|_| fires(roll_abort, self.abort_percent)),
        }
    }
}

fn fires(roll: f64, percent: f64) -> bool {
    roll * 100.0 < percent
}

/// A copy of the request sent, fire and forget, to another backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    pub backend: Backend,
    /// Share of the requests mirrored, 0..=100 (100 when not configured).
    pub percent: f64,
}

impl Mirror {
    /// Whether this request is mirrored, given a uniform roll in `[0, 1)`.
    pub fn fires(&self, roll: f64) -> bool {
        fires(roll, self.percent)
    }
}

/// A CORS policy (Istio `corsPolicy`, Gateway API `CORS` filter).
#[derive(Clone, Debug)]
pub struct Cors {
    pub(crate) origins: Vec<StrMatch>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<Duration>,
    pub allow_credentials: bool,
}

impl Cors {
    /// Whether `origin` is one of the allowed origins. An entry that matches `*` itself
    /// (`exact: "*"`, a regex `.*`) allows every origin, as Envoy reads it.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.origins.iter().any(|m| m.matches("*") || m.matches(origin))
    }

    /// The answer to a preflight (`OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`), or `None` when the origin is not allowed (the
    /// proxy then forwards the request, Istio's `unmatchedPreflights: FORWARD`).
    /// A configured list of `*` echoes what the browser asked for.
    pub fn preflight(&self, origin: &str, method: &str, headers: &str) -> Option<HeaderMap> {
        if !self.allows_origin(origin) {
            return None;
        }
        let mut out = HeaderMap::new();
        insert(&mut out, header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        let methods =
            if self.allow_methods.iter().any(|m| m == "*") { method.to_string() } else { self.allow_methods.join(",") };
        if !methods.is_empty() {
            insert(&mut out, header::ACCESS_CONTROL_ALLOW_METHODS, &methods);
        }
        let allowed = if self.allow_headers.iter().any(|h| h == "*") {
            headers.to_string()
        } else {
            self.allow_headers.join(",")
        };
        if !allowed.is_empty() {
            insert(&mut out, header::ACCESS_CONTROL_ALLOW_HEADERS, &allowed);
        }
        if let Some(age) = self.max_age {
            insert(&mut out, header::ACCESS_CONTROL_MAX_AGE, &age.as_secs().to_string());
        }
        if self.allow_credentials {
            insert(&mut out, header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
        }
        Some(out)
    }

    /// Headers to add to an actual (not preflight) response for `origin`; empty when
    /// the origin is not allowed.
    pub fn response_headers(&self, origin: &str) -> HeaderMap {
        let mut out = HeaderMap::new();
        if !self.allows_origin(origin) {
            return out;
        }
        insert(&mut out, header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.allow_credentials {
            insert(&mut out, header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
        }
        if !self.expose_headers.is_empty() {
            insert(&mut out, header::ACCESS_CONTROL_EXPOSE_HEADERS, &self.expose_headers.join(","));
        }
        out
    }
}

fn insert(map: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        map.insert(name, value);
    }
}
