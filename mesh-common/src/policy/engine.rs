//! The compiled `AuthorizationPolicy` matcher that both layers evaluate: the node agent
//! for a TCP connection (no HTTP attributes) and the waypoint for an HTTP request.
//!
//! [`CompiledPolicy::compile`] turns a policy into matchers once (patterns split into
//! exact/prefix/suffix/any, CIDRs and ports parsed, path templates split into segments,
//! `when` keys resolved), so that evaluation does no parsing. Evaluation is three-valued
//! underneath: an attribute the current layer cannot see (an HTTP attribute on a TCP
//! connection, an unsupported `experimental.*` key anywhere) is *unknown*. The caller
//! says what unknown counts as: `false` for `ALLOW` rules (they cannot admit on what
//! they cannot see), `true` for `DENY`, `AUDIT` and `CUSTOM` rules (they are evaluated
//! on what is visible, fail closed). Since every composition (fields of a source, `from`
//! entries, `to` entries, `when` conditions) is a plain and/or of leaves, substituting
//! at the leaves gives the same answer as Kleene logic would.
use std::{net::IpAddr, prelude::rust_2024::*};

use serde_json::Value;

use crate::config::{
    DEFAULT_TRUST_DOMAIN,
    security::{Action, AuthorizationPolicy, Condition, Operation, Rule, RuleSource},
    values::IpNet,
};

/// What a policy is evaluated against: the connection, and the HTTP request when the
/// layer has one.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    /// The client's SPIFFE identity from its verified certificate
    /// (`spiffe://cluster.local/ns/shop/sa/web`); `None` for plaintext.
    pub source_identity: Option<&'a str>,
    /// The peer's address (`source.ip`, `ipBlocks`). At the waypoint this is the
    /// address of the client as the HBONE tunnel reports it. Without HTTP it is also
    /// `remote.ip` / `remoteIpBlocks`; with HTTP those use [`Http::remote_ip`].
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// `None` at L4: every HTTP attribute is unknown.
    pub http: Option<Http<'a>>,
}

/// The HTTP attributes of one request, as the waypoint saw them after normalization.
#[derive(Clone, Copy, Debug)]
pub struct Http<'a> {
    /// `:method` as sent (Istio matches methods case-sensitively).
    pub method: &'a str,
    /// `:authority` / `Host`, lowercase, without a trailing dot; may carry a port.
    pub host: &'a str,
    /// The normalized path, without query and fragment.
    pub path: &'a str,
    /// Request headers as (lowercase name, value), every value of a repeated header
    /// in order. A `request.headers[name]` condition sees the values joined with `,`,
    /// as Envoy's header matcher does.
    pub headers: &'a [(&'a str, &'a str)],
    /// The validated JWT, if the request carried one.
    pub auth: Option<&'a Auth>,
    /// `connection.sni`: the SNI of the TLS the proxy terminated for this request;
    /// `None` when there was none (so a `values` list does not match).
    pub sni: Option<&'a str>,
    /// `remote.ip` / `remoteIpBlocks`: the original client as `X-Forwarded-For` gives
    /// it past the trusted proxies (Istio's `numTrustedProxies`, Envoy's
    /// `xff_num_trusted_hops`); the direct peer ([`Attributes::source_ip`]) when no
    /// proxy is trusted (Istio's default) or the header does not name a client there.
    pub remote_ip: IpAddr,
}

/// The attributes of a validated JWT (Istio's `request.auth.*`).
#[derive(Clone, Debug, PartialEq)]
pub struct Auth {
    /// `iss/sub`, Istio's request principal.
    pub principal: String,
    /// `aud`.
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// The whole payload, for `request.auth.claims[a][b]`.
    pub claims: Value,
}

/// Istio's string match: `*` alone (anything not empty), `prefix*`, `*suffix` or exact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StrMatch {
    Any,
    Prefix(String),
    Suffix(String),
    Exact(String),
}

impl StrMatch {
    pub(crate) fn new(pattern: &str) -> Self {
        if pattern == "*" {
            Self::Any
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            Self::Suffix(suffix.into())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            Self::Prefix(prefix.into())
        } else {
            Self::Exact(pattern.into())
        }
    }

    /// Lowercased, for [`StrMatch::matches_ignore_case`].
    fn lowercase(pattern: &str) -> Self {
        Self::new(&pattern.to_ascii_lowercase())
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => !value.is_empty(),
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
            Self::Exact(e) => value == e,
        }
    }

    /// For a pattern built by [`StrMatch::lowercase`]: ASCII case-insensitive.
    fn matches_ignore_case(&self, value: &str) -> bool {
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        match self {
            Self::Any => !value.is_empty(),
            Self::Prefix(p) => value.get(..p.len()).is_some_and(|head| eq(head, p)),
            Self::Suffix(s) => value.len() >= s.len() && value.get(value.len() - s.len()..).is_some_and(|t| eq(t, s)),
            Self::Exact(e) => eq(value, e),
        }
    }
}

/// `values` and `notValues` of one field: some value must match (when there are any)
/// and no not-value may.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Field<T> {
    values: Vec<T>,
    not_values: Vec<T>,
}

impl<T> Field<T> {
    fn new(values: &[String], not_values: &[String], compile: impl Fn(&str) -> Option<T>) -> Self {
        Self {
            values: values.iter().filter_map(|v| compile(v)).collect(),
            not_values: not_values.iter().filter_map(|v| compile(v)).collect(),
        }
    }

    /// A value that did not compile (validation rejects them) was dropped: a positive
    /// list that lost every value must still match nothing.
    fn new_strict(values: &[String], not_values: &[String], compile: impl Fn(&str) -> Option<T>) -> (Self, bool) {
        let field = Self::new(values, not_values, compile);
        let emptied = !values.is_empty() && field.values.is_empty();
        (field, emptied)
    }

    fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    /// A client without the attribute matches no value: it fails a positive list and
    /// passes a negative one.
    fn matches(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&matches)) && !self.not_values.iter().any(matches)
    }
}

/// Where an attribute is visible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Visibility {
    /// On every connection.
    L4,
    /// Only with an HTTP request.
    Http,
    /// Nowhere (an `experimental.*` key): always unknown.
    Never,
}

/// A `when` key, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Key {
    SourceIp,
    RemoteIp,
    DestinationIp,
    DestinationPort,
    SourceNamespace,
    SourcePrincipal,
    SourceServiceAccount,
    SourceTrustDomain,
    /// Lowercase header name.
    Header(String),
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    /// `request.auth.claims[a][b]`: the path into the payload.
    Claim(Vec<String>),
    Sni,
    Unsupported,
}

impl Key {
    fn parse(key: &str) -> Self {
        let bracketed = |prefix: &str| key.strip_prefix(prefix).and_then(|k| k.strip_suffix(']'));
        match key {
            "source.ip" => Self::SourceIp,
            "remote.ip" => Self::RemoteIp,
            "destination.ip" => Self::DestinationIp,
            "destination.port" => Self::DestinationPort,
            "source.namespace" => Self::SourceNamespace,
            "source.principal" => Self::SourcePrincipal,
            "source.serviceAccount" => Self::SourceServiceAccount,
            "source.trustDomain" => Self::SourceTrustDomain,
            "request.auth.principal" => Self::AuthPrincipal,
            "request.auth.audiences" => Self::AuthAudiences,
            "request.auth.presenter" => Self::AuthPresenter,
            "connection.sni" => Self::Sni,
            _ => {
                if let Some(name) = bracketed("request.headers[") {
                    Self::Header(name.to_ascii_lowercase())
                } else if let Some(path) = bracketed("request.auth.claims[") {
                    Self::Claim(path.split("][").map(str::to_string).collect())
                } else {
                    Self::Unsupported
                }
            }
        }
    }

    fn visibility(&self) -> Visibility {
        match self {
            Self::SourceIp
            | Self::RemoteIp
            | Self::DestinationIp
            | Self::DestinationPort
            | Self::SourceNamespace
            | Self::SourcePrincipal
            | Self::SourceServiceAccount
            | Self::SourceTrustDomain => Visibility::L4,
            // ztunnel terminates the tunnel's TLS, not the application's: SNI is L7.
            Self::Header(_)
            | Self::AuthPrincipal
            | Self::AuthAudiences
            | Self::AuthPresenter
            | Self::Claim(_)
            | Self::Sni => Visibility::Http,
            Self::Unsupported => Visibility::Never,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum CondValues {
    Ips(Field<IpNet>),
    Ports(Field<u16>),
    Strings(Field<StrMatch>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CompiledCondition {
    key: Key,
    values: CondValues,
    /// Every positive value failed to compile: the condition matches nothing.
    never: bool,
}

/// A `paths` entry: Istio's string forms or a path template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PathMatch {
    Str(StrMatch),
    Template(Template),
}

/// `/a/{*}/b/{**}/c`: the segments before `{**}`, and when there is one, those after.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Template {
    before: Vec<Segment>,
    /// `Some` when the template has `{**}`: it matches one or more path segments (each
    /// possibly empty, so `/a/{**}` matches `/a/` and `/a/b/c`, not `/a`), then these.
    after: Option<Vec<Segment>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{*}`: exactly one non-empty segment.
    One,
}

impl Segment {
    fn matches(&self, segment: &str) -> bool {
        match self {
            Self::Literal(l) => segment == l,
            Self::One => !segment.is_empty(),
        }
    }
}

impl PathMatch {
    /// `None` for a template Istio rejects (validation reports it).
    fn new(pattern: &str) -> Option<Self> {
        if !pattern.contains(['{', '}']) {
            return Some(Self::Str(StrMatch::new(pattern)));
        }
        let mut template = Template { before: Vec::new(), after: None };
        for segment in pattern.strip_prefix('/')?.split('/') {
            let parsed = match segment {
                "{**}" if template.after.is_none() => {
                    template.after = Some(Vec::new());
                    continue;
                }
                "{*}" => Segment::One,
                s if s.contains(['{', '}', '*']) => return None,
                s => Segment::Literal(s.into()),
            };
            if parsed == Segment::One && template.after.is_some() {
                return None;
            }
            template.after.as_mut().unwrap_or(&mut template.before).push(parsed);
        }
        Some(Self::Template(template))
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Str(m) => m.matches(path),
            Self::Template(t) => {
                let Some(rest) = path.strip_prefix('/') else { return false };
                let segments: Vec<&str> = rest.split('/').collect();
                let head = |n: usize| t.before.iter().zip(&segments[..n]).all(|(s, p)| s.matches(p));
                match &t.after {
                    None => segments.len() == t.before.len() && head(t.before.len()),
                    Some(after) => {
                        segments.len() > t.before.len() + after.len()
                            && head(t.before.len())
                            && after.iter().zip(&segments[segments.len() - after.len()..]).all(|(s, p)| s.matches(p))
                    }
                }
            }
        }
    }
}

/// A `hosts` entry: case-insensitive; without a port it matches the host whatever the
/// request's port (`example.com` matches `example.com:8080`), with one it needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HostMatch {
    pattern: StrMatch,
    has_port: bool,
}

impl HostMatch {
    fn new(pattern: &str) -> Self {
        Self { pattern: StrMatch::lowercase(pattern), has_port: host_port(pattern).1.is_some() }
    }

    fn matches(&self, host: &str) -> bool {
        let host = if self.has_port { host } else { host_port(host).0 };
        self.pattern.matches_ignore_case(host)
    }
}

/// `host[:port]` (an IPv6 literal in brackets keeps its colons).
fn host_port(host: &str) -> (&str, Option<&str>) {
    match host.rsplit_once(':') {
        Some((h, p))
            if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']')) =>
        {
            (h, Some(p))
        }
        _ => (host, None),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CompiledSource {
    /// Principal patterns stay strings: matching maps the default trust domain onto
    /// the mesh's (see [`Peer::principal_matches`]).
    principals: Field<String>,
    request_principals: Field<StrMatch>,
    namespaces: Field<StrMatch>,
    trust_domains: Field<StrMatch>,
    service_accounts: Field<(String, String)>,
    ip_blocks: Field<IpNet>,
    remote_ip_blocks: Field<IpNet>,
    /// A positive list lost every value to compilation: the source matches nothing.
    never: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CompiledOperation {
    hosts: Field<HostMatch>,
    ports: Field<u16>,
    methods: Field<StrMatch>,
    paths: Field<PathMatch>,
    never: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CompiledRule {
    from: Vec<CompiledSource>,
    to: Vec<CompiledOperation>,
    when: Vec<CompiledCondition>,
    /// The first attribute only HTTP can see, named as in the policy
    /// (`to.operation.methods`, `when.request.headers[x-user]`).
    l7_attribute: Option<String>,
    /// The first attribute no layer can see (`when.experimental...`).
    unsupported: Option<String>,
}

/// One `AuthorizationPolicy`, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// `namespace/name`.
    pub id: String,
    pub action: Action,
    /// The provider of a `CUSTOM` policy.
    pub provider: Option<String>,
    pub(crate) rules: Vec<CompiledRule>,
}

impl CompiledPolicy {
    pub fn compile(policy: &AuthorizationPolicy) -> Self {
        let ns = policy.metadata.namespace.as_str();
        Self {
            id: format!("{ns}/{}", policy.metadata.name),
            action: policy.spec.action,
            provider: policy.spec.provider.as_ref().map(|p| p.name.clone()),
            rules: policy.spec.rules.iter().map(|r| compile_rule(r, ns)).collect(),
        }
    }

    /// The index of the first rule that matches, unknown attributes counting as
    /// `unknown` (see the module documentation).
    pub(crate) fn first_match(&self, peer: &Peer, unknown: bool) -> Option<usize> {
        self.rules.iter().position(|r| rule_matches(r, peer, unknown))
    }
}

impl CompiledRule {
    /// The first attribute of the rule the layer cannot see, if any.
    pub(crate) fn unknown_attribute(&self, http: bool) -> Option<&str> {
        if http { self.unsupported.as_deref() } else { self.l7_attribute.as_deref() }
    }
}

fn compile_rule(rule: &Rule, policy_namespace: &str) -> CompiledRule {
    let from =
        rule.from.iter().filter_map(|f| f.source.as_ref()).map(|s| compile_source(s, policy_namespace)).collect();
    let to = rule.to.iter().filter_map(|t| t.operation.as_ref()).map(compile_operation).collect();
    let when: Vec<CompiledCondition> = rule.when.iter().map(compile_condition).collect();
    let unsupported =
        rule.when.iter().find(|c| Key::parse(&c.key) == Key::Unsupported).map(|c| format!("when.{}", c.key));
    CompiledRule { from, to, when, l7_attribute: l7_attribute(rule), unsupported }
}

fn ip(value: &str) -> Option<IpNet> {
    value.parse().ok()
}

fn port(value: &str) -> Option<u16> {
    value.parse().ok()
}

fn compile_source(s: &RuleSource, policy_namespace: &str) -> CompiledSource {
    let service_account = |v: &str| {
        let (ns, sa) = v.split_once('/').unwrap_or((policy_namespace, v));
        Some((ns.to_string(), sa.to_string()))
    };
    let (ip_blocks, e1) = Field::new_strict(&s.ip_blocks, &s.not_ip_blocks, ip);
    let (remote_ip_blocks, e2) = Field::new_strict(&s.remote_ip_blocks, &s.not_remote_ip_blocks, ip);
    let str_match = |v: &str| Some(StrMatch::new(v));
    CompiledSource {
        principals: Field::new(&s.principals, &s.not_principals, |v| Some(v.to_string())),
        request_principals: Field::new(&s.request_principals, &s.not_request_principals, str_match),
        namespaces: Field::new(&s.namespaces, &s.not_namespaces, str_match),
        trust_domains: Field::new(&s.trust_domains, &s.not_trust_domains, str_match),
        service_accounts: Field::new(&s.service_accounts, &s.not_service_accounts, service_account),
        ip_blocks,
        remote_ip_blocks,
        never: e1 || e2,
    }
}

fn compile_operation(o: &Operation) -> CompiledOperation {
    let (ports, e1) = Field::new_strict(&o.ports, &o.not_ports, port);
    let (paths, e2) = Field::new_strict(&o.paths, &o.not_paths, PathMatch::new);
    CompiledOperation {
        hosts: Field::new(&o.hosts, &o.not_hosts, |v| Some(HostMatch::new(v))),
        ports,
        methods: Field::new(&o.methods, &o.not_methods, |v| Some(StrMatch::new(v))),
        paths,
        never: e1 || e2,
    }
}

fn compile_condition(c: &Condition) -> CompiledCondition {
    let key = Key::parse(&c.key);
    let (values, never) = match key {
        Key::SourceIp | Key::RemoteIp | Key::DestinationIp => {
            let (f, never) = Field::new_strict(&c.values, &c.not_values, ip);
            (CondValues::Ips(f), never)
        }
        Key::DestinationPort => {
            let (f, never) = Field::new_strict(&c.values, &c.not_values, port);
            (CondValues::Ports(f), never)
        }
        _ => (CondValues::Strings(Field::new(&c.values, &c.not_values, |v| Some(StrMatch::new(v)))), false),
    };
    CompiledCondition { key, values, never }
}

/// The client as policies see it.
pub(crate) struct Peer<'a> {
    pub(crate) attrs: &'a Attributes<'a>,
    /// The identity without `spiffe://` (Istio writes principals that way); `None` for
    /// plaintext, or for an identity that is not a SPIFFE URI.
    principal: Option<&'a str>,
    /// The `ns` and `sa` of a `<trust domain>/ns/<ns>/sa/<sa>` identity, the only shape
    /// the mesh issues (ztunnel reads no other).
    namespace: Option<&'a str>,
    service_account: Option<&'a str>,
    trust_domain: &'a str,
}

impl<'a> Peer<'a> {
    pub(crate) fn new(attrs: &'a Attributes<'a>, trust_domain: &'a str) -> Self {
        let principal = attrs.source_identity.and_then(|id| id.strip_prefix("spiffe://"));
        let (namespace, service_account) = principal.and_then(workload_identity).unzip();
        Self { attrs, principal, namespace, service_account, trust_domain }
    }

    /// Istio's principal match: `*` matches any authenticated client; otherwise the
    /// pattern (exact, `prefix*` or `*suffix`) is compared with the identity without
    /// `spiffe://`. A pattern in the default trust domain (`cluster.local/...`) stands for
    /// the mesh's own trust domain too, as Istio reads it.
    fn principal_matches(&self, pattern: &str) -> bool {
        if pattern == "*" {
            return self.attrs.source_identity.is_some();
        }
        let Some(principal) = self.principal else { return false };
        if wildcard_matches(pattern, principal) {
            return true;
        }
        if self.trust_domain == DEFAULT_TRUST_DOMAIN {
            return false;
        }
        match (path_in(pattern, DEFAULT_TRUST_DOMAIN), path_in(principal, self.trust_domain)) {
            (Some(pattern), Some(principal)) => wildcard_matches(pattern, principal),
            _ => false,
        }
    }

    /// The trust domain of the peer's identity (the part before `/ns/`).
    fn trust_domain_matches(&self, pattern: &StrMatch) -> bool {
        self.principal.and_then(|p| p.split_once('/')).is_some_and(|(td, _)| pattern.matches(td))
    }

    fn namespace_matches(&self, pattern: &StrMatch) -> bool {
        self.namespace.is_some_and(|ns| pattern.matches(ns))
    }

    /// `ns/sa` (Istio's `serviceAccounts`, resolved against the policy's namespace).
    fn service_account_matches(&self, (ns, sa): &(String, String)) -> bool {
        self.namespace == Some(ns.as_str()) && self.service_account == Some(sa.as_str())
    }
}

/// The path of an identity (or principal pattern) in `trust_domain`: `/ns/...`.
fn path_in<'s>(id: &'s str, trust_domain: &str) -> Option<&'s str> {
    id.strip_prefix(trust_domain).filter(|path| path.starts_with('/'))
}

/// The namespace and service account of `<trust domain>/ns/<ns>/sa/<sa>`.
fn workload_identity(principal: &str) -> Option<(&str, &str)> {
    let (trust_domain, rest) = principal.split_once('/')?;
    let (ns, sa) = rest.strip_prefix("ns/")?.split_once("/sa/")?;
    let segment = |s: &str| !s.is_empty() && !s.contains('/');
    (!trust_domain.is_empty() && segment(ns) && segment(sa)).then_some((ns, sa))
}

/// Istio's string match: `*` alone (anything not empty), `prefix*`, `*suffix` or exact.
pub(crate) fn wildcard_matches(pattern: &str, value: &str) -> bool {
    StrMatch::new(pattern).matches(value)
}

/// One field: matches when empty; unknown (`unknown`) when the layer cannot see it.
fn check<T>(field: &Field<T>, visible: bool, unknown: bool, matches: impl Fn(&T) -> bool) -> bool {
    if field.is_empty() {
        true
    } else if visible {
        field.matches(matches)
    } else {
        unknown
    }
}

fn rule_matches(rule: &CompiledRule, peer: &Peer, unknown: bool) -> bool {
    let from = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, peer, unknown));
    let to = rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, peer, unknown));
    from && to && rule.when.iter().all(|c| condition_matches(c, peer, unknown))
}

fn source_matches(s: &CompiledSource, peer: &Peer, unknown: bool) -> bool {
    let src = peer.attrs.source_ip;
    let http = peer.attrs.http.as_ref();
    let request_principal = http.and_then(|h| h.auth).map(|a| a.principal.as_str());
    !s.never
        && check(&s.principals, true, unknown, |p| peer.principal_matches(p))
        && check(&s.request_principals, http.is_some(), unknown, |p| request_principal.is_some_and(|rp| p.matches(rp)))
        && check(&s.namespaces, true, unknown, |n| peer.namespace_matches(n))
        && check(&s.trust_domains, true, unknown, |t| peer.trust_domain_matches(t))
        && check(&s.service_accounts, true, unknown, |v| peer.service_account_matches(v))
        && check(&s.ip_blocks, true, unknown, |net| net.contains(&src))
        && check(&s.remote_ip_blocks, true, unknown, |net| net.contains(&remote_ip(peer.attrs)))
}

/// `remote.ip`: from the HTTP request when there is one, else the peer.
fn remote_ip(attrs: &Attributes) -> IpAddr {
    attrs.http.as_ref().map_or(attrs.source_ip, |h| h.remote_ip)
}

fn operation_matches(o: &CompiledOperation, peer: &Peer, unknown: bool) -> bool {
    let http = peer.attrs.http.as_ref();
    let visible = http.is_some();
    !o.never
        && check(&o.ports, true, unknown, |p| *p == peer.attrs.destination_port)
        && check(&o.hosts, visible, unknown, |h| http.is_some_and(|r| h.matches(r.host)))
        && check(&o.methods, visible, unknown, |m| http.is_some_and(|r| m.matches(r.method)))
        && check(&o.paths, visible, unknown, |p| http.is_some_and(|r| p.matches(r.path)))
}

fn condition_matches(c: &CompiledCondition, peer: &Peer, unknown: bool) -> bool {
    if c.never {
        return false;
    }
    let attrs = peer.attrs;
    let visible = match c.key.visibility() {
        Visibility::L4 => true,
        Visibility::Http => attrs.http.is_some(),
        Visibility::Never => false,
    };
    if !visible {
        return unknown;
    }
    match &c.values {
        CondValues::Ips(field) => {
            let ip = match c.key {
                Key::DestinationIp => attrs.destination_ip,
                Key::RemoteIp => remote_ip(attrs),
                _ => attrs.source_ip,
            };
            field.matches(|net| net.contains(&ip))
        }
        CondValues::Ports(field) => field.matches(|p| *p == attrs.destination_port),
        CondValues::Strings(field) => string_condition(&c.key, field, peer),
    }
}

fn string_condition(key: &Key, field: &Field<StrMatch>, peer: &Peer) -> bool {
    let http = peer.attrs.http.as_ref();
    let auth = http.and_then(|h| h.auth);
    match key {
        Key::SourceNamespace => field.matches(|m| peer.namespace_matches(m)),
        Key::SourceTrustDomain => field.matches(|m| peer.trust_domain_matches(m)),
        Key::SourcePrincipal => field.matches(|m| peer.principal_matches(&pattern_text(m))),
        Key::SourceServiceAccount => field.matches(|m| {
            let sa = peer.namespace.zip(peer.service_account).map(|(ns, sa)| format!("{ns}/{sa}"));
            sa.is_some_and(|sa| m.matches(&sa))
        }),
        Key::Header(name) => {
            let value = header_value(http.map_or(&[], |h| h.headers), name);
            // `*` on a header is a presence match: an empty value is still present.
            field.matches(|m| value.as_deref().is_some_and(|v| *m == StrMatch::Any || m.matches(v)))
        }
        Key::AuthPrincipal => field.matches(|m| auth.is_some_and(|a| m.matches(&a.principal))),
        Key::AuthAudiences => field.matches(|m| auth.is_some_and(|a| a.audiences.iter().any(|aud| m.matches(aud)))),
        Key::AuthPresenter => {
            field.matches(|m| auth.and_then(|a| a.presenter.as_deref()).is_some_and(|p| m.matches(p)))
        }
        Key::Claim(path) => {
            let claim = auth.and_then(|a| path.iter().try_fold(&a.claims, |v, step| v.get(step.as_str())));
            field.matches(|m| claim.is_some_and(|c| claim_matches(c, m)))
        }
        Key::Sni => field.matches(|m| http.and_then(|h| h.sni).is_some_and(|s| m.matches(s))),
        // Resolved elsewhere (visibility, typed values).
        Key::SourceIp | Key::RemoteIp | Key::DestinationIp | Key::DestinationPort | Key::Unsupported => false,
    }
}

/// A string claim matches itself; a list of strings matches when one element does
/// (Istio supports no other claim types).
fn claim_matches(claim: &Value, m: &StrMatch) -> bool {
    match claim {
        Value::String(s) => m.matches(s),
        Value::Array(items) => items.iter().any(|i| i.as_str().is_some_and(|s| m.matches(s))),
        _ => false,
    }
}

/// The pattern as written, for the principal match (which reads prefix and suffix
/// forms itself, to map trust domains).
fn pattern_text(m: &StrMatch) -> String {
    match m {
        StrMatch::Any => "*".into(),
        StrMatch::Prefix(p) => format!("{p}*"),
        StrMatch::Suffix(s) => format!("*{s}"),
        StrMatch::Exact(e) => e.clone(),
    }
}

/// Every value of header `name` joined with `,`, as Envoy's header matcher sees a
/// repeated header; `None` when absent. Names compare case-insensitively.
pub fn header_value(headers: &[(&str, &str)], name: &str) -> Option<String> {
    let mut out: Option<String> = None;
    for (_, value) in headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)) {
        match &mut out {
            Some(joined) => {
                joined.push(',');
                joined.push_str(value);
            }
            None => out = Some((*value).to_string()),
        }
    }
    out
}

/// The `when` keys evaluated at L4.
fn is_l4_key(key: &str) -> bool {
    Key::parse(key).visibility() == Visibility::L4
}

/// The first attribute of `rule` that only L7 can check, named as in the policy
/// (`to.operation.methods`, `when.request.headers[x-user]`), or `None`.
fn l7_attribute(rule: &Rule) -> Option<String> {
    let sources = rule.from.iter().filter_map(|f| f.source.as_ref());
    for s in sources {
        for (name, list) in
            [("requestPrincipals", &s.request_principals), ("notRequestPrincipals", &s.not_request_principals)]
        {
            if !list.is_empty() {
                return Some(format!("from.source.{name}"));
            }
        }
    }
    for o in rule.to.iter().filter_map(|t| t.operation.as_ref()) {
        let l7 = [
            ("hosts", &o.hosts),
            ("notHosts", &o.not_hosts),
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            ("paths", &o.paths),
            ("notPaths", &o.not_paths),
        ];
        if let Some((name, _)) = l7.into_iter().find(|(_, list)| !list.is_empty()) {
            return Some(format!("to.operation.{name}"));
        }
    }
    rule.when.iter().find(|c| !is_l4_key(&c.key)).map(|c| format!("when.{}", c.key))
}
