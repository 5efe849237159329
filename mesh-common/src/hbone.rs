//! What an HBONE server accepts as a tunnel request, as a pure function of the
//! request's method and `:authority` and the destination pod's addresses.
use std::{
    format,
    net::{IpAddr, SocketAddr},
    string::String,
};

use crate::MESH_PORTS;

/// The target of a tunnel request: a `CONNECT` whose authority is `ip:port`, one of
/// the pod's addresses, and not a port of the agent itself. The error is the reason
/// for the 400 answer.
pub fn connect_target(method: &str, authority: Option<&str>, pod_ips: &[IpAddr]) -> Result<SocketAddr, String> {
    if method != "CONNECT" {
        return Err(format!("method {method} is not CONNECT"));
    }
    let authority = authority.ok_or("CONNECT without :authority")?;
    let target: SocketAddr = authority.parse().map_err(|_| format!("authority `{authority}` is not IP:port"))?;
    pod_target(target, pod_ips)
}

/// Whether `target` may be delivered to in a pod with `pod_ips`: one of its addresses,
/// and not a port of the agent itself. The error is the reason.
pub fn pod_target(target: SocketAddr, pod_ips: &[IpAddr]) -> Result<SocketAddr, String> {
    if !pod_ips.contains(&target.ip()) {
        return Err(format!("authority {target} is not an address of the pod"));
    }
    // The agent's own listeners are never a tunnel target: a stream to one would
    // come back to the agent.
    if MESH_PORTS.contains(&target.port()) || target.port() == 0 {
        return Err(format!("port {} is reserved for the mesh", target.port()));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connect_to_a_pod_address_and_an_application_port() {
        let ips: [IpAddr; 2] = ["10.98.2.11".parse().unwrap(), "fd00:98:2::11".parse().unwrap()];
        assert_eq!(connect_target("CONNECT", Some("10.98.2.11:8080"), &ips), Ok("10.98.2.11:8080".parse().unwrap()));
        assert!(connect_target("CONNECT", Some("[fd00:98:2::11]:80"), &ips).is_ok());
        assert!(connect_target("GET", Some("10.98.2.11:8080"), &ips).unwrap_err().contains("not CONNECT"));
        assert!(connect_target("CONNECT", None, &ips).is_err());
        assert!(connect_target("CONNECT", Some("echo.shop:8080"), &ips).unwrap_err().contains("not IP:port"));
        assert!(connect_target("CONNECT", Some("10.98.2.12:8080"), &ips).unwrap_err().contains("not an address"));
        for port in MESH_PORTS {
            let authority = std::format!("10.98.2.11:{port}");
            assert!(connect_target("CONNECT", Some(&authority), &ips).unwrap_err().contains("reserved"));
        }
    }
}
