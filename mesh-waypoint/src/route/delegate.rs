//! Delegate `VirtualService`s: a root rule's `delegate: {name, namespace}` is replaced by
//! the rules of the delegate (a `VirtualService` without `hosts`), each merged with the
//! root rule as Istio merges them (`MergeHTTPRoutes` and `mergeHTTPMatchRequests` in
//! `pilot/pkg/model/virtualservice.go`, the lookup in `virtualservice_controller.go`):
//!
//! - **Lookup**: `namespace` defaults to the root's; only a `VirtualService` without
//!   `hosts` is a delegate; it must be exported to the root's namespace (`exportTo`
//!   empty is public, Istio's default `defaultVirtualServiceExportTo`). Not found or not
//!   exported: only that root rule is left out (Istio logs and skips it).
//! - **Matches**: with no root match the delegate's matches stand; with no delegate match
//!   the root's do. Otherwise every delegate match must find a root match it does not
//!   conflict with (is a subset of); it is merged with each such root match (the
//!   delegate's fields win, maps are unions with the delegate's entries winning, the
//!   root fills what the delegate leaves unset). A delegate match that fits no root
//!   match leaves the whole delegate rule out.
//! - **Conflicts** (Istio's `hasConflict`): a string match conflicts unless one side is
//!   unset, both are the same exact, or the root is a prefix that the delegate's prefix
//!   or exact starts with; a regex on either side conflicts with any other match;
//!   `ignoreUriCase` must be equal; ports and `sourceNamespace` must agree when the root
//!   sets them; `sourceLabels` and `gateways` of the delegate must fit the root's.
//! - **The rest of the rule**: the delegate's `rewrite`, `directResponse`, `timeout`,
//!   `retries`, `fault`, `mirror` (and its percentages), `mirrors`, `corsPolicy` and
//!   `headers`, when unset, come from the root rule; names join as `root-delegate`.
//! - **One level**: a delegate's own `delegate` rules are left out (the loader rejects
//!   them too).
//!
//! Destination hosts are made fully qualified in the namespace of the object that wrote
//! them before merging, so a root's short `mirror` host keeps meaning the root's
//! namespace inside a delegate of another namespace.
use std::collections::BTreeMap;

use mesh_common::config::{
    Config, VirtualService,
    networking::{Destination, HttpMatchRequest, HttpRule, StringMatch},
};
use serde_json::Value;

use super::build::fqdn;

/// Why a root rule's `delegate` gives no rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DelegateError {
    #[error("delegate needs a `name` (got {value})")]
    NoName { value: String },
    #[error(
        "delegate VirtualService {namespace}/{name} not found (a delegate is a VirtualService without hosts); rule left out"
    )]
    NotFound { namespace: String, name: String },
    #[error("delegate VirtualService {namespace}/{name} is not exported to namespace {root_namespace}; rule left out")]
    NotExported { namespace: String, name: String, root_namespace: String },
}

/// The delegate `VirtualService` a root rule (of a `VirtualService` in `root_ns`) names.
pub(super) fn find<'a>(
    config: &'a Config,
    delegate: &Value,
    root_ns: &str,
) -> Result<&'a VirtualService, DelegateError> {
    let Some(name) = delegate.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) else {
        return Err(DelegateError::NoName { value: delegate.to_string() });
    };
    let namespace = delegate.get("namespace").and_then(Value::as_str).filter(|n| !n.is_empty()).unwrap_or(root_ns);
    let found = config
        .virtual_services
        .iter()
        .find(|vs| vs.metadata.namespace == namespace && vs.metadata.name == name && vs.spec.hosts.is_empty())
        .ok_or_else(|| DelegateError::NotFound { namespace: namespace.to_string(), name: name.to_string() })?;
    let export = &found.spec.export_to;
    let exported =
        export.is_empty() || export.iter().any(|e| e == "*" || e == root_ns || (e == "." && namespace == root_ns));
    if !exported {
        return Err(DelegateError::NotExported {
            namespace: namespace.to_string(),
            name: name.to_string(),
            root_namespace: root_ns.to_string(),
        });
    }
    Ok(found)
}

/// `rule` with every destination host fully qualified in namespace `ns`.
pub(super) fn qualified(rule: &HttpRule, ns: &str) -> HttpRule {
    let fix = |d: &mut Destination| d.host = fqdn(&d.host, ns);
    let mut rule = rule.clone();
    rule.route.iter_mut().for_each(|r| fix(&mut r.destination));
    if let Some(m) = rule.mirror.as_mut() {
        fix(m);
    }
    rule.mirrors.iter_mut().for_each(|m| fix(&mut m.destination));
    rule
}

/// The delegate rule merged into the root rule, or `None` when a delegate match is not a
/// subset of any root match (Istio then ignores the delegate rule).
pub fn merge_rule(root: &HttpRule, delegate: &HttpRule) -> Option<HttpRule> {
    let mut out = delegate.clone();
    out.match_ = merge_matches(&root.match_, &delegate.match_)?;
    out.name = join_names(root.name.as_deref(), delegate.name.as_deref());
    out.delegate = None;
    fill(&mut out.rewrite, root.rewrite.as_ref());
    fill(&mut out.direct_response, root.direct_response.as_ref());
    fill(&mut out.timeout, root.timeout.as_ref());
    fill(&mut out.retries, root.retries.as_ref());
    fill(&mut out.fault, root.fault.as_ref());
    fill(&mut out.mirror, root.mirror.as_ref());
    fill(&mut out.mirror_percent, root.mirror_percent.as_ref());
    fill(&mut out.mirror_percentage, root.mirror_percentage.as_ref());
    fill(&mut out.cors_policy, root.cors_policy.as_ref());
    fill(&mut out.headers, root.headers.as_ref());
    if out.mirrors.is_empty() {
        out.mirrors.clone_from(&root.mirrors);
    }
    Some(out)
}

/// `mine` when set, else `root`'s.
fn fill<T: Clone>(mine: &mut Option<T>, root: Option<&T>) {
    if mine.is_none() {
        *mine = root.cloned();
    }
}

/// Istio's `mergeHTTPMatchRequests`; `None` on a conflict.
pub fn merge_matches(root: &[HttpMatchRequest], delegate: &[HttpMatchRequest]) -> Option<Vec<HttpMatchRequest>> {
    if root.is_empty() {
        return Some(delegate.to_vec());
    }
    if delegate.is_empty() {
        return Some(root.to_vec());
    }
    let mut out = Vec::new();
    for leaf in delegate {
        let before = out.len();
        out.extend(root.iter().filter(|r| !has_conflict(r, leaf)).map(|r| merge_match(r, leaf)));
        if out.len() == before {
            return None;
        }
    }
    Some(out)
}

fn join_names(root: Option<&str>, delegate: Option<&str>) -> Option<String> {
    match (root.filter(|r| !r.is_empty()), delegate.filter(|d| !d.is_empty())) {
        (Some(r), Some(d)) => Some(format!("{r}-{d}")),
        (r, d) => d.or(r).map(str::to_string),
    }
}

/// Istio's `mergeHTTPMatchRequest`: the delegate's match, completed by the root's.
fn merge_match(root: &HttpMatchRequest, leaf: &HttpMatchRequest) -> HttpMatchRequest {
    fn union<V: Clone>(root: &BTreeMap<String, V>, leaf: &BTreeMap<String, V>) -> BTreeMap<String, V> {
        let mut out = root.clone();
        out.extend(leaf.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }
    let mut out = leaf.clone();
    out.name = join_names(root.name.as_deref(), leaf.name.as_deref());
    fill(&mut out.uri, root.uri.as_ref());
    fill(&mut out.scheme, root.scheme.as_ref());
    fill(&mut out.method, root.method.as_ref());
    fill(&mut out.authority, root.authority.as_ref());
    out.headers = union(&root.headers, &leaf.headers);
    out.without_headers = union(&root.without_headers, &leaf.without_headers);
    out.query_params = union(&root.query_params, &leaf.query_params);
    out.source_labels = union(&root.source_labels, &leaf.source_labels);
    if out.port.is_none_or(|p| p == 0) {
        out.port = root.port;
    }
    if out.source_namespace.as_deref().is_none_or(str::is_empty) {
        out.source_namespace.clone_from(&root.source_namespace);
    }
    if out.gateways.is_empty() {
        out.gateways.clone_from(&root.gateways);
    }
    if out.stat_prefix.as_deref().is_none_or(str::is_empty) {
        out.stat_prefix.clone_from(&root.stat_prefix);
    }
    out
}

/// Istio's `hasConflict`: whether `leaf` is not a subset of `root`.
pub fn has_conflict(root: &HttpMatchRequest, leaf: &HttpMatchRequest) -> bool {
    let pairs = [
        (&root.uri, &leaf.uri),
        (&root.scheme, &leaf.scheme),
        (&root.method, &leaf.method),
        (&root.authority, &leaf.authority),
    ];
    if pairs.iter().any(|(r, l)| string_match_conflict(r.as_ref(), l.as_ref())) {
        return true;
    }
    let map_conflict = |root: &BTreeMap<String, StringMatch>, leaf: &BTreeMap<String, StringMatch>| {
        leaf.iter().any(|(k, l)| string_match_conflict(root.get(k), Some(l)))
    };
    // `withoutHeaders` means the opposite (the header must not match), so a narrower
    // leaf match there widens the root's: any difference is a conflict.
    let without_conflict =
        leaf.without_headers.iter().any(|(k, l)| root.without_headers.get(k).is_some_and(|r| r != l));
    if map_conflict(&root.headers, &leaf.headers)
        || without_conflict
        || map_conflict(&root.query_params, &leaf.query_params)
    {
        return true;
    }
    if root.ignore_uri_case != leaf.ignore_uri_case {
        return true;
    }
    if let (Some(r), Some(l)) = (root.port.filter(|p| *p > 0), leaf.port.filter(|p| *p > 0))
        && r != l
    {
        return true;
    }
    if let Some(ns) = root.source_namespace.as_deref().filter(|ns| !ns.is_empty())
        && leaf.source_namespace.as_deref() != Some(ns)
    {
        return true;
    }
    if leaf.source_labels.iter().any(|(k, v)| root.source_labels.get(k).is_some_and(|r| r != v)) {
        return true;
    }
    if !root.gateways.is_empty() && !leaf.gateways.is_empty() {
        return leaf.gateways.iter().any(|g| !root.gateways.contains(g));
    }
    false
}

/// Istio's `stringMatchConflict` (an empty string counts as unset, as in protobuf).
fn string_match_conflict(root: Option<&StringMatch>, leaf: Option<&StringMatch>) -> bool {
    let (Some(root), Some(leaf)) = (root, leaf) else { return false };
    let get = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    let (r_exact, r_prefix, r_regex) = (get(&root.exact), get(&root.prefix), get(&root.regex));
    let (l_exact, l_prefix, l_regex) = (get(&leaf.exact), get(&leaf.prefix), get(&leaf.regex));
    if r_regex.is_some() && (l_regex.is_some() || l_prefix.is_some() || l_exact.is_some()) {
        return true;
    }
    if l_regex.is_some() && (r_regex.is_some() || r_prefix.is_some() || r_exact.is_some()) {
        return true;
    }
    if let Some(exact) = r_exact {
        return l_prefix.is_some() || l_exact.as_deref() != Some(exact.as_str());
    }
    if let Some(prefix) = r_prefix {
        // A leaf that tests only presence under a prefix would widen the root's match
        // (the merge keeps the leaf's): refused, where Istio would widen.
        return l_prefix.or(l_exact).is_none_or(|l| !l.starts_with(&prefix));
    }
    // A root that tests only presence holds any leaf; a regex root would be widened
    // by a leaf that tests only presence (the merge keeps the leaf's).
    r_regex.is_some()
}
