//! Parsers for the value syntaxes inside manifests: Istio durations, IP addresses and
//! CIDR blocks, Kubernetes names and labels, host names, wildcard strings, Envoy retry
//! conditions. Pure functions; validation and the data path use the same ones.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    prelude::rust_2024::*,
    str::FromStr,
    time::Duration,
};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("`{0}` is missing a unit (ms, s, m, h, ...)")]
    MissingUnit(String),
    #[error("unknown unit `{unit}` in `{value}` (use ns, us, ms, s, m or h)")]
    UnknownUnit { value: String, unit: String },
    #[error("`{0}` is not a number followed by a unit, like 1.5s or 100ms")]
    Syntax(String),
    #[error("`{0}` is longer than the largest duration, 2562047h (about 292 years)")]
    Overflow(String),
}

/// Parses an Istio/Gateway API duration: one or more `<decimal><unit>` groups with
/// units `ns`, `us` (`µs`), `ms`, `s`, `m`, `h`, as Go's `time.ParseDuration` reads
/// them (`2s`, `1.5s`, `100ms`, `1m`, `1h30m`), without a sign. `0` alone is zero.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let syntax = || DurationError::Syntax(text.into());
    let overflow = || DurationError::Overflow(text.into());
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(syntax());
        }
        let nanos_per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(DurationError::MissingUnit(text.into())),
            _ if unit.chars().all(char::is_alphabetic) => {
                return Err(DurationError::UnknownUnit { value: text.into(), unit: unit.into() });
            }
            _ => return Err(syntax()),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| overflow())? };
        let mut nanos = whole.checked_mul(nanos_per_unit).ok_or_else(overflow)?;
        // The fraction, digit by digit, to nanosecond precision (further digits drop).
        let mut scale = nanos_per_unit;
        for digit in fraction.bytes().take(20) {
            scale /= 10;
            nanos += u128::from(digit - b'0') * scale;
        }
        total = total.checked_add(nanos).ok_or_else(overflow)?;
        rest = after;
    }
    // Go's limit (an i64 of nanoseconds, about 292 years), which Istio's validation
    // applies: larger values would overflow deadlines computed from them.
    if total > i64::MAX as u128 {
        return Err(overflow());
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| overflow())?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// An IP network: an address and a prefix length (a bare address is a /32 or /128).
/// Host bits may be set (`10.0.0.1/24`), as Istio accepts; matching ignores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("`{0}` is not an IP address or CIDR block")]
    Address(String),
    #[error("prefix length `{len}` of `{value}` is not a number in 0..={max}")]
    PrefixLen { value: String, len: String, max: u8 },
}

impl IpNet {
    pub fn max_prefix_len(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    /// Whether `ip` is inside the block (never across address families).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(*ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(*ip) & mask
            }
            _ => false,
        }
    }

    /// The first address of the block (host bits cleared).
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }
}

impl FromStr for IpNet {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Address(text.into()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max && !len.starts_with('+') && !(len.len() > 1 && len.starts_with('0')))
                .ok_or_else(|| CidrError::PrefixLen { value: text.into(), len: len.into(), max })?,
        };
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A DNS-1123 label: the name of a namespace (and of most Kubernetes objects' parts).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: the name of most Kubernetes and Istio objects.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Why a label key or value is not one Kubernetes accepts, or `None`.
pub fn label_key_error(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && !is_dns_subdomain(prefix)
    {
        return Some(format!(
            "label key `{key}`: prefix `{prefix}` must be a DNS subdomain (lowercase letters, digits, '-', '.')"
        ));
    }
    if name.is_empty() {
        return Some(format!("label key `{key}` has an empty name"));
    }
    label_name_error(name).map(|why| format!("label key `{key}`: {why}"))
}

pub fn label_value_error(value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    label_name_error(value).map(|why| format!("label value `{value}`: {why}"))
}

fn label_name_error(name: &str) -> Option<String> {
    if name.len() > 63 {
        return Some("must be at most 63 characters".into());
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || !edge_ok(name.chars().next())
        || !edge_ok(name.chars().last())
    {
        return Some("must be letters, digits, '-', '_' or '.', beginning and ending with a letter or digit".into());
    }
    None
}

/// An Istio host: a DNS name (short or fully qualified), optionally with a leading
/// wildcard label (`*.example.com`), or `*` alone.
pub fn host_error(host: &str) -> Option<String> {
    if host.is_empty() {
        return Some("host must not be empty".into());
    }
    if host == "*" {
        return None;
    }
    // Istio's first label may be `*`, or `*` before a label (`*foo`, `*-foo`).
    let name = host
        .strip_prefix('*')
        .map_or(host, |rest| rest.strip_prefix('.').or_else(|| rest.strip_prefix('-')).unwrap_or(rest));
    let name = if name.is_empty() { "x" } else { name };
    if host.len() > 255 {
        return Some(format!("host `{host}` is longer than 255 characters"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    // A trailing dot (absolute name) is allowed.
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.split('.').all(label_ok) {
        None
    } else if host.contains('*') {
        Some(format!(
            "host `{host}`: a wildcard is only allowed at the start of the first label (`*.example.com`, `*foo.example.com`)"
        ))
    } else {
        Some(format!("host `{host}` is not a valid DNS name"))
    }
}

/// Istio's rule for principals, namespaces and other matched strings: not empty, and
/// `*` only alone, as a prefix (`*-admin`) or as a suffix (`ns/prod/*`), once.
pub fn wildcard_error(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("must not be empty".into());
    }
    let stars = value.matches('*').count();
    if stars == 0 || value == "*" {
        return None;
    }
    if stars == 1 && (value.starts_with('*') || value.ends_with('*')) {
        return None;
    }
    Some(format!("`{value}`: `*` is only allowed alone, as a prefix or as a suffix"))
}

/// Envoy's `x-envoy-retry-on` / `x-envoy-retry-grpc-on` conditions that Istio passes on.
pub const RETRY_ON_TOKENS: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Why one `retryOn` token is not an Envoy retry condition nor an HTTP status code.
pub fn retry_on_error(token: &str) -> Option<String> {
    let token = token.trim();
    if RETRY_ON_TOKENS.contains(&token) {
        return None;
    }
    if !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
        return match token.parse::<u16>() {
            Ok(100..=599) => None,
            _ => Some(format!("`{token}` is not an HTTP status code (100..=599)")),
        };
    }
    Some(format!(
        "unknown retry condition `{token}` (expected one of {}, or an HTTP status code)",
        RETRY_ON_TOKENS.join(", ")
    ))
}

/// A port number as Istio writes it in strings (`"8080"`), or why not.
pub fn port_str_error(port: &str) -> Option<String> {
    match port.parse::<u32>() {
        Ok(n) => port_error(n),
        Err(_) => Some(format!("`{port}` is not a port number")),
    }
}

pub fn port_error(port: u32) -> Option<String> {
    if (1..=65535).contains(&port) { None } else { Some(format!("port {port} is out of range 1..=65535")) }
}

/// Why `pattern` is not a regex RE2 (Istio's and Envoy's engine) accepts, or `None`.
/// RE2 has no look-around and no backreferences; neither has the `regex` crate's
/// syntax, which is the check.
pub fn regex_error(pattern: &str) -> Option<String> {
    match regex_syntax::Parser::new().parse(pattern) {
        Ok(_) => None,
        Err(e) => {
            let why = match &e {
                regex_syntax::Error::Parse(e) => e.kind().to_string(),
                regex_syntax::Error::Translate(e) => e.kind().to_string(),
                _ => e.to_string(),
            };
            Some(format!("`{pattern}` is not an RE2 regular expression: {why}"))
        }
    }
}

/// Whether two Istio hosts overlap: equal, or one's wildcard covers the other
/// (`*.example.com` and `api.example.com`, `*.com` and `*.example.com`, `*` and any).
pub fn hosts_overlap(a: &str, b: &str) -> bool {
    let covers = |wild: &str, other: &str| {
        wild == "*"
            || wild.strip_prefix('*').is_some_and(|suffix| other.ends_with(suffix) && other.len() > suffix.len())
    };
    a == b || covers(a, b) || covers(b, a)
}

/// Istio's rule for durations of timeouts and delays: at least 1 ms, in whole ms.
pub fn millis_duration_error(text: &str) -> Option<String> {
    let d = parse_duration(text).ok()?;
    if d < Duration::from_millis(1) {
        Some(format!("`{text}` is shorter than 1ms (the shortest duration Istio accepts here)"))
    } else if d.subsec_nanos() % 1_000_000 != 0 {
        Some(format!("`{text}` is not a whole number of milliseconds"))
    } else {
        None
    }
}
