//! The original client of a request behind trusted proxies: Istio's `numTrustedProxies`
//! (`gatewayTopology` of the mesh config's `defaultConfig`, or of the gateway's
//! `proxy.istio.io/config` annotation), which Istio turns into Envoy's
//! `xff_num_trusted_hops` with `use_remote_address`. The address found is `remote.ip`
//! and what `remoteIpBlocks` match; `source.ip` and `ipBlocks` stay the direct peer.
//!
//! Envoy's rule, followed exactly: with `N` trusted hops (N > 0) the client is the
//! `N`th address from the right of `X-Forwarded-For` as received (before the waypoint
//! appends its peer). When the header is absent, holds fewer than `N` addresses, or
//! the entry there is not a bare IP address (after trimming whitespace; no port, no
//! brackets), the client is the direct peer. A client cannot make itself look like a
//! trusted proxy's client by writing the header: the entries it wrote sit left of the
//! ones the trusted proxies appended.
//!
//! Pure: values in, values out.
use std::net::IpAddr;

use http::HeaderMap;
use mesh_common::config::{
    Config,
    gateway::GATEWAY_NAME_LABEL,
    mesh::{PROXY_CONFIG_ANNOTATION, ProxyConfigError, annotation_trusted_proxies},
};

/// The client's address from `X-Forwarded-For` values (`xff`, every value of the
/// header in order) past `trusted_hops` trusted proxies; `peer` when none are trusted
/// or the header does not name a client there.
pub fn client_address<'a>(xff: impl IntoIterator<Item = &'a [u8]>, trusted_hops: u32, peer: IpAddr) -> IpAddr {
    if trusted_hops == 0 {
        return peer;
    }
    // Repeated header lines are one list, as Envoy joins them.
    let mut joined: Vec<u8> = Vec::new();
    let mut any = false;
    for value in xff {
        if any {
            joined.push(b',');
        }
        joined.extend_from_slice(value);
        any = true;
    }
    if !any {
        return peer;
    }
    nth_from_right(&joined, trusted_hops).unwrap_or(peer)
}

/// The `n`th (1-based) comma-separated entry from the right, as an IP address.
fn nth_from_right(list: &[u8], n: u32) -> Option<IpAddr> {
    let mut rest = list;
    for _ in 1..n {
        let comma = rest.iter().rposition(|&b| b == b',')?;
        rest = &rest[..comma];
    }
    // What follows the last comma; the whole when there is none, or when the comma is
    // last (then the entry is empty and does not parse, as in Envoy).
    let entry = match rest.iter().rposition(|&b| b == b',') {
        Some(comma) if comma + 1 < rest.len() => &rest[comma + 1..],
        _ => rest,
    };
    std::str::from_utf8(entry.trim_ascii()).ok()?.parse().ok()
}

/// [`client_address`] from a request's headers.
pub fn remote_ip(headers: &HeaderMap, trusted_hops: u32, peer: IpAddr) -> IpAddr {
    client_address(headers.get_all("x-forwarded-for").iter().map(http::HeaderValue::as_bytes), trusted_hops, peer)
}

/// A `proxy.istio.io/config` annotation of the waypoint that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{object}: its {PROXY_CONFIG_ANNOTATION:?} annotation is skipped")]
pub struct AnnotationProblem {
    /// `Gateway/ns/name` (with where on it) or `Pod/ns/name`.
    pub object: String,
    #[source]
    pub source: ProxyConfigError,
}

/// How many trusted proxies stand in front of waypoint `namespace/name`: the
/// `gatewayTopology.numTrustedProxies` of the `proxy.istio.io/config` annotation of its
/// `Gateway` (`spec.infrastructure.annotations`, then `metadata.annotations`: Istio
/// copies both onto the waypoint's pods) or of its pods (label
/// `gateway.networking.k8s.io/gateway-name`, the first by name that has it); else the
/// mesh config's `defaultConfig`; else 0. An unreadable annotation is reported and
/// skipped.
pub fn trusted_proxies(config: &Config, namespace: &str, name: &str) -> (u32, Vec<AnnotationProblem>) {
    let fallback = config.mesh.num_trusted_proxies();
    let mut candidates: Vec<(String, String)> = Vec::new();
    if let Some(gateway) = config.gateways.iter().find(|g| g.metadata.namespace == namespace && g.metadata.name == name)
    {
        let object = format!("Gateway/{namespace}/{name}");
        let infrastructure = gateway
            .spec
            .infrastructure
            .as_ref()
            .and_then(|i| i["annotations"][PROXY_CONFIG_ANNOTATION].as_str())
            .map(str::to_owned);
        candidates.extend(infrastructure.map(|text| (format!("{object} spec.infrastructure.annotations"), text)));
        candidates.extend(gateway.metadata.annotations.get(PROXY_CONFIG_ANNOTATION).map(|t| (object, t.clone())));
    }
    let mut pods: Vec<_> = config
        .pods
        .iter()
        .filter(|p| {
            p.metadata.namespace == namespace
                && p.metadata.labels.get(GATEWAY_NAME_LABEL).is_some_and(|gateway| gateway == name)
        })
        .filter_map(|p| {
            Some((
                format!("Pod/{namespace}/{}", p.metadata.name),
                p.metadata.annotations.get(PROXY_CONFIG_ANNOTATION)?.clone(),
            ))
        })
        .collect();
    pods.sort();
    candidates.extend(pods);
    let mut problems = Vec::new();
    for (object, text) in candidates {
        match annotation_trusted_proxies(&text) {
            Ok(Some(hops)) => return (hops, problems),
            Ok(None) => {}
            Err(source) => problems.push(AnnotationProblem { object, source }),
        }
    }
    (fallback, problems)
}

#[cfg(test)]
mod tests;
