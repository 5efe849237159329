//! Request-target and host normalization, before policy and routing, as Istio's
//! `meshConfig.pathNormalization` defines it on Envoy's HTTP connection manager.
//!
//! | option | what happens to the path |
//! | --- | --- |
//! | `NONE` | nothing (Istio's warning applies: policies see what the backend sees, `/a/../admin` included) |
//! | `BASE` (default) | Envoy's `normalize_path`: percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) decoded, other escapes' hex uppercased, `\` -> `/`, dot segments removed (RFC 3986 section 5.2.4) |
//! | `MERGE_SLASHES` | `BASE`, then runs of `/` merged (Envoy's `merge_slashes`) |
//! | `DECODE_AND_MERGE_SLASHES` | `%2F` and `%5C` decoded first (Envoy's `UNESCAPE_AND_FORWARD`, which Istio sets for this option), then `MERGE_SLASHES` |
//!
//! Under every option the fragment is stripped (Envoy strips it before anything looks
//! at the path) and the target is checked: origin form (`/path?query`), absolute form
//! (`http://host/path`, whose authority then replaces `Host`, RFC 9112 section 3.2.2)
//! or `*` for `OPTIONS`; no control characters, no bytes outside ASCII, no space, and
//! every `%` followed by two hex digits. `CONNECT` is refused: the waypoint's HTTP
//! routing does not tunnel (the HBONE `CONNECT` that carries the request ends before
//! this). The query is kept as sent.
//!
//! Methods are left as sent: Istio compares them case-sensitively (`get` is not
//! `GET`), as RFC 9110 does. Hosts are lowercased, lose a trailing dot and the default
//! port (`:80`, or `:443` for an `https` absolute form), so `Example.COM.:80` and
//! `example.com` are one host for policies.
use std::fmt;

use mesh_common::config::mesh::PathNormalization;

/// A normalized request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Normalized {
    /// Starts with `/` (or is `*` for `OPTIONS *`); no fragment, no query.
    pub path: String,
    /// The query without its `?`, as sent.
    pub query: Option<String>,
    /// Lowercase, no trailing dot, no default port.
    pub host: String,
}

impl Normalized {
    /// The path and query, as forwarded upstream.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Why a request was refused before policy and routing. The proxy answers
/// [`Reject::status`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("CONNECT to `{authority}` is not allowed through the waypoint")]
    Connect { authority: String },
    #[error("request target `{target}` is not in origin form (`/path`), absolute form or `*` for OPTIONS")]
    NotOriginForm { target: String },
    #[error("request target has {what} at byte {position}")]
    InvalidCharacter { what: Char, position: usize },
    #[error("request target has a `%` not followed by two hex digits at byte {position}")]
    BadPercentEncoding { position: usize },
    #[error("request has no host (`Host` or `:authority`)")]
    MissingHost,
    #[error("host `{host}` is not a valid host[:port]")]
    InvalidHost { host: String },
    #[error("request names two hosts, `{first}` and `{second}`")]
    ConflictingHosts { first: String, second: String },
}

/// A byte a request target must not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Char(pub u8);

impl fmt::Display for Char {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b' ' => f.write_str("a space"),
            b if b.is_ascii_control() => write!(f, "control character 0x{b:02x}"),
            b => write!(f, "non-ASCII byte 0x{b:02x}"),
        }
    }
}

impl Reject {
    /// 403 for `CONNECT` (a refusal), 400 for a malformed request.
    pub fn status(&self) -> u16 {
        match self {
            Self::Connect { .. } => 403,
            _ => 400,
        }
    }
}

/// The one host of a request: `:authority` (HTTP/2, or the request line's absolute
/// form) and every `Host` header value must agree (RFC 9112 section 3.2 refuses
/// several `Host` lines; RFC 9113 section 8.3.1 a `Host` naming another entity than
/// `:authority`). Compared after [`normalize_host`], so `Example.com` and `example.com.`
/// are the same host.
pub fn request_host<'a>(authority: Option<&'a str>, host_headers: &[&'a str]) -> Result<&'a str, Reject> {
    let mut chosen: Option<(&str, String)> = None;
    for candidate in authority.into_iter().chain(host_headers.iter().copied()) {
        let normalized = normalize_host(candidate, false)?;
        match &chosen {
            None => chosen = Some((candidate, normalized)),
            Some((first, n)) if *n != normalized => {
                return Err(Reject::ConflictingHosts { first: (*first).into(), second: candidate.into() });
            }
            Some(_) => {}
        }
    }
    chosen.map(|(host, _)| host).ok_or(Reject::MissingHost)
}

/// Normalizes one request under `option` (see the module documentation). `host` is
/// the request's host ([`request_host`]); an absolute-form target's authority wins
/// over it.
pub fn normalize(method: &str, target: &str, host: &str, option: PathNormalization) -> Result<Normalized, Reject> {
    if method == "CONNECT" {
        return Err(Reject::Connect { authority: target.into() });
    }
    check_bytes(target)?;
    // The fragment never reaches anything.
    let target = target.split_once('#').map_or(target, |(before, _)| before);
    let (host, https, target) = match split_absolute(target) {
        Some((scheme_https, authority, rest)) => (authority, scheme_https, rest),
        None => (host, false, target),
    };
    let host = normalize_host(host, https)?;
    if target == "*" && method == "OPTIONS" {
        return Ok(Normalized { path: "*".into(), query: None, host });
    }
    if !target.starts_with('/') {
        return Err(Reject::NotOriginForm { target: target.into() });
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_string())),
        None => (target, None),
    };
    check_escapes(path)?;
    let path = normalize_path(path, option);
    Ok(Normalized { path, query, host })
}

/// `http://authority/rest` or `https://...` (scheme case-insensitive): (https,
/// authority, the rest starting with `/`, or `/` when empty).
fn split_absolute(target: &str) -> Option<(bool, &str, &str)> {
    let (scheme, rest) = target.split_once("://")?;
    let https = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return None,
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let path = if path.is_empty() { "/" } else { path };
    Some((https, authority, path))
}

/// Control characters, spaces and bytes outside ASCII are refused (they have to be
/// percent-encoded in a target).
fn check_bytes(target: &str) -> Result<(), Reject> {
    match target.bytes().position(|b| b.is_ascii_control() || b == b' ' || !b.is_ascii()) {
        Some(position) => Err(Reject::InvalidCharacter { what: Char(target.as_bytes()[position]), position }),
        None => Ok(()),
    }
}

fn check_escapes(path: &str) -> Result<(), Reject> {
    let bytes = path.as_bytes();
    for (position, _) in path.match_indices('%') {
        let hex = |i: usize| bytes.get(position + i).is_some_and(u8::is_ascii_hexdigit);
        if !(hex(1) && hex(2)) {
            return Err(Reject::BadPercentEncoding { position });
        }
    }
    Ok(())
}

/// The path (no query, escapes checked) under `option`.
pub fn normalize_path(path: &str, option: PathNormalization) -> String {
    if option == PathNormalization::None {
        return path.to_string();
    }
    let decode_slashes = option == PathNormalization::DecodeAndMergeSlashes;
    let decoded = decode(path, decode_slashes).replace('\\', "/");
    let mut out = remove_dot_segments(&decoded);
    if matches!(option, PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes) {
        out = merge_slashes(&out);
    }
    out
}

/// Decodes escapes of unreserved characters (and of `/` and `\` when
/// `decode_slashes`); uppercases the hex of the others.
fn decode(path: &str, decode_slashes: bool) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%'
            && let (Some(h), Some(l)) =
                (bytes.get(i + 1).and_then(|b| hex_value(*b)), bytes.get(i + 2).and_then(|b| hex_value(*b)))
        {
            let c = h * 16 + l;
            let unreserved = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~');
            if unreserved || (decode_slashes && matches!(c, b'/' | b'\\')) {
                out.push(char::from(c));
            } else {
                out.push('%');
                out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
            }
            i += 3;
            continue;
        }
        out.push(char::from(b));
        i += 1;
    }
    out
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// RFC 3986 section 5.2.4 on an absolute path: `.` segments dropped, `..` segments
/// drop the segment before them (never above the root). A trailing `.` or `..` leaves
/// a trailing `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let last = parts.len() - 1;
    for (i, part) in parts.into_iter().enumerate() {
        match part {
            "." | ".." => {
                if part == ".." {
                    segments.pop();
                }
                if i == last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// Lowercase, without a trailing dot, without the default port (80, or 443 for
/// `https`). Refuses what is not `host[:port]` (a reg-name, IPv4 or `[IPv6]`).
pub fn normalize_host(host: &str, https: bool) -> Result<String, Reject> {
    let invalid = || Reject::InvalidHost { host: host.into() };
    if host.is_empty() {
        return Err(Reject::MissingHost);
    }
    let (name, port) = if host.starts_with('[') {
        let close = host.find(']').ok_or_else(invalid)?;
        let (name, rest) = host.split_at(close + 1);
        match rest.strip_prefix(':') {
            Some(port) => (name, Some(port)),
            None if rest.is_empty() => (name, None),
            None => return Err(invalid()),
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|_| p.bytes().all(|b| b.is_ascii_digit())).ok_or_else(invalid)?),
        None => None,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let valid = if let Some(literal) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        literal.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        // A reg-name or an IPv4 address, as DNS names are written.
        !name.is_empty()
            && !name.ends_with('.')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    if !valid {
        return Err(invalid());
    }
    let mut out = name.to_ascii_lowercase();
    match port {
        Some(80) if !https => {}
        Some(443) if https => {}
        Some(p) => {
            out.push(':');
            out.push_str(&p.to_string());
        }
        None => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
