//! Authorization of one request at the waypoint: pick the request's one host, normalize
//! the target under the mesh config's `pathNormalization`, then evaluate the policies
//! bound to the waypoint with the shared engine ([`mesh_common::policy`]). Routing must
//! use the same [`Normalized`] path and host, so that what was authorized is what is
//! forwarded.
//!
//! Pure: the caller gives the request's parts and gets the verdict. A [`Reject`] is
//! answered with its status (400, or 403 for `CONNECT`) before any policy runs.
use std::net::IpAddr;

use mesh_common::{
    config::mesh::PathNormalization,
    policy::{Attributes, Auth, Http, Target, WaypointPolicies, WaypointVerdict},
};

use crate::normalize::{Normalized, Reject, normalize, request_host};

/// One request as received.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The request target as sent: the request line's (HTTP/1.1) or `:path` (HTTP/2).
    pub target: &'a str,
    /// `:authority` (HTTP/2), or the authority of an absolute-form target.
    pub authority: Option<&'a str>,
    /// Every `Host` header value.
    pub host_headers: &'a [&'a str],
    /// Every header as (lowercase name, value), repeated headers repeated.
    pub headers: &'a [(&'a str, &'a str)],
    /// The client's SPIFFE identity from the HBONE tunnel.
    pub source_identity: Option<&'a str>,
    pub source_ip: IpAddr,
    /// `remote.ip`: the client behind trusted proxies ([`crate::forwarded::remote_ip`]);
    /// `source_ip` when none are trusted.
    pub remote_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// The validated JWT, if any.
    pub auth: Option<&'a Auth>,
    pub sni: Option<&'a str>,
}

/// The normalized request and the verdict on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub normalized: Normalized,
    pub verdict: WaypointVerdict,
}

/// Normalizes `req` under `option` and evaluates `policies` for a request to `target`.
pub fn check(
    policies: &WaypointPolicies,
    option: PathNormalization,
    target: Option<&Target>,
    req: &Request,
) -> Result<Checked, Reject> {
    let host = request_host(req.authority, req.host_headers)?;
    let normalized = normalize(req.method, req.target, host, option)?;
    let attrs = Attributes {
        source_identity: req.source_identity,
        source_ip: req.source_ip,
        destination_ip: req.destination_ip,
        destination_port: req.destination_port,
        http: Some(Http {
            method: req.method,
            host: &normalized.host,
            path: &normalized.path,
            headers: req.headers,
            auth: req.auth,
            sni: req.sni,
            remote_ip: req.remote_ip,
        }),
    };
    let verdict = policies.evaluate(target, &attrs);
    Ok(Checked { normalized, verdict })
}

#[cfg(test)]
mod tests;
