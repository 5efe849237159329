//! Compiled request matches: one [`Matcher`] is one `VirtualService` `HTTPMatchRequest`
//! or one Gateway API match, all its conditions must hold. Regexes are compiled once, anchored
//! (RE2 semantics: the whole value must match); one that does not compile makes its
//! matcher never match.
use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName};
use mesh_common::config::networking::StringMatch;
use regex::Regex;

use super::RequestParts;

/// A compiled Istio `StringMatch` (or a Gateway API value match).
#[derive(Clone, Debug)]
pub(crate) enum StrMatch {
    /// No condition on the value (presence only, where a value is looked up).
    Any,
    Exact(String),
    Prefix(String),
    /// Anchored: matches the whole value.
    Regex(Regex),
    /// A regex that did not compile: never matches.
    Never,
}

impl StrMatch {
    /// From an Istio `StringMatch`; `warn` receives why a regex is unusable.
    pub(crate) fn from_istio(m: &StringMatch, warn: &mut dyn FnMut(String)) -> Self {
        if let Some(exact) = &m.exact {
            Self::Exact(exact.clone())
        } else if let Some(prefix) = &m.prefix {
            Self::Prefix(prefix.clone())
        } else if let Some(re) = &m.regex {
            Self::regex(re, warn)
        } else {
            Self::Any
        }
    }

    pub(crate) fn regex(re: &str, warn: &mut dyn FnMut(String)) -> Self {
        match compile_anchored(re) {
            Ok(re) => Self::Regex(re),
            Err(why) => {
                warn(why);
                Self::Never
            }
        }
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(e) => value == e,
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Regex(re) => re.is_match(value),
            Self::Never => false,
        }
    }

    /// ASCII case-insensitive for exact and prefix (Istio's `ignoreUriCase`, which
    /// leaves regexes as written).
    fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            Self::Exact(e) => value.eq_ignore_ascii_case(e),
            Self::Prefix(p) => value.get(..p.len()).is_some_and(|head| head.eq_ignore_ascii_case(p)),
            _ => self.matches(value),
        }
    }
}

/// `^(?:re)$`, so that a regex matches the whole value as RE2's `FullMatch` does.
pub(crate) fn compile_anchored(re: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("regex `{re}` does not compile: {e}"))
}

/// How the path (without the query) is matched.
#[derive(Clone, Debug)]
pub(crate) enum PathMatch {
    Any,
    /// Istio `uri` (with `ignoreUriCase`), `GRPCRoute` methods, `HTTPRoute` Exact/regex.
    Str {
        m: StrMatch,
        ignore_case: bool,
    },
    /// Gateway API `PathPrefix`: whole segments (`/foo` matches `/foo`, `/foo/bar`, not
    /// `/foobar`); stored without a trailing slash (`/` stays `/`).
    Segments(String),
}

impl PathMatch {
    pub(crate) fn segments(prefix: &str) -> Self {
        let trimmed = prefix.trim_end_matches('/');
        Self::Segments(if trimmed.is_empty() { "/".into() } else { trimmed.into() })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Str { m, ignore_case: false } => m.matches(path),
            Self::Str { m, ignore_case: true } => m.matches_ignore_case(path),
            Self::Segments(p) if p == "/" => path.starts_with('/'),
            Self::Segments(p) => {
                path.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        }
    }
}

/// One match: every condition must hold.
#[derive(Clone, Debug)]
pub(crate) struct Matcher {
    pub(crate) path: PathMatch,
    pub(crate) scheme: Option<StrMatch>,
    pub(crate) method: Option<StrMatch>,
    pub(crate) authority: Option<StrMatch>,
    /// Header name (lowercase) -> value match; `Any` tests presence.
    pub(crate) headers: Vec<(HeaderName, StrMatch)>,
    /// Headers whose match must fail (absent, or present with another value).
    pub(crate) without_headers: Vec<(HeaderName, StrMatch)>,
    /// Query parameter -> match of its (decoded) first value; `Any` tests presence.
    pub(crate) query: Vec<(String, StrMatch)>,
    pub(crate) port: Option<u16>,
    pub(crate) source_labels: BTreeMap<String, String>,
    pub(crate) source_namespace: Option<String>,
    /// A condition could not be compiled (bad header name, regex): never matches.
    pub(crate) never: bool,
}

impl Matcher {
    /// Matches every request.
    pub(crate) fn any() -> Self {
        Self {
            path: PathMatch::Any,
            scheme: None,
            method: None,
            authority: None,
            headers: Vec::new(),
            without_headers: Vec::new(),
            query: Vec::new(),
            port: None,
            source_labels: BTreeMap::new(),
            source_namespace: None,
            never: false,
        }
    }

    pub(crate) fn matches(&self, req: &RequestParts) -> bool {
        if self.never {
            return false;
        }
        if self.port.is_some_and(|p| p != req.port) {
            return false;
        }
        if self.source_namespace.as_deref().is_some_and(|ns| ns != req.source_namespace) {
            return false;
        }
        if !self.source_labels.iter().all(|(k, v)| req.source_labels.get(k) == Some(v)) {
            return false;
        }
        if !self.path.matches(req.path_only()) {
            return false;
        }
        let opt = |m: &Option<StrMatch>, v: &str| m.as_ref().is_none_or(|m| m.matches(v));
        if !opt(&self.method, req.method) || !opt(&self.scheme, req.scheme) || !opt(&self.authority, req.authority) {
            return false;
        }
        if !self.headers.iter().all(|(name, m)| header_value(req.headers, name).is_some_and(|v| m.matches(&v))) {
            return false;
        }
        if self.without_headers.iter().any(|(name, m)| header_value(req.headers, name).is_some_and(|v| m.matches(&v))) {
            return false;
        }
        if !self.query.is_empty() {
            let query = req.query();
            if !self.query.iter().all(|(name, m)| query_value(query, name).is_some_and(|v| m.matches(&v))) {
                return false;
            }
        }
        true
    }
}

/// A header's value; several fields of one name are joined with `,` as Envoy's
/// header matcher sees them. Bytes that are not UTF-8 are replaced.
fn header_value(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut joined = String::from_utf8_lossy(first.as_bytes()).into_owned();
    for v in values {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(joined)
}

/// The first value of query parameter `name`, percent-decoded (`+` stays `+`, as in
/// Envoy's query parameter matcher); a parameter without `=` has the empty value.
pub(crate) fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').filter(|p| !p.is_empty()).find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes; malformed escapes stay as written.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    if !bytes.contains(&b'%') {
        return s.to_string();
    }
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
