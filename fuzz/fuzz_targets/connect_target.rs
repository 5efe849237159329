//! What an HBONE server accepts as a tunnel request: the method and `:authority` come
//! from a peer. Never a panic, and an accepted target is always one of the pod's own
//! addresses on a port that is not the agent's.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesh_common::{MESH_PORTS, hbone::connect_target};

#[derive(Debug, Arbitrary)]
enum Method {
    Connect,
    Other(String),
}

/// Free text exercises the parser; `PodAddress` reaches the accepting branch, which
/// random text almost never would.
#[derive(Debug, Arbitrary)]
enum Authority {
    Missing,
    Text(String),
    PodAddress { index: u8, port: u16 },
}

#[derive(Debug, Arbitrary)]
struct Input {
    method: Method,
    authority: Authority,
    pod_ips: Vec<IpAddr>,
}

fuzz_target!(|input: Input| {
    let Input { method, authority, pod_ips } = input;
    let method = match &method {
        Method::Connect => "CONNECT",
        Method::Other(other) => other.as_str(),
    };
    let expected = match authority {
        Authority::PodAddress { index, port } if !pod_ips.is_empty() => {
            Some(SocketAddr::new(pod_ips[usize::from(index) % pod_ips.len()], port))
        }
        _ => None,
    };
    let text = match authority {
        Authority::Missing => None,
        Authority::Text(text) => Some(text),
        Authority::PodAddress { port, .. } => {
            Some(expected.map_or_else(|| format!("0.0.0.0:{port}"), |a| a.to_string()))
        }
    };
    let result = connect_target(method, text.as_deref(), &pod_ips);
    if let Ok(addr) = result {
        assert!(pod_ips.contains(&addr.ip()), "{addr} is not an address of the pod {pod_ips:?}");
        assert!(!MESH_PORTS.contains(&addr.port()), "{addr} is a port of the agent");
        assert_ne!(addr.port(), 0, "{addr}: port 0");
    }
    // The other direction: a CONNECT to a pod address on an application port is taken.
    if let Some(addr) = expected
        && method == "CONNECT"
        && addr.port() != 0
        && !MESH_PORTS.contains(&addr.port())
    {
        assert_eq!(result, Ok(addr));
    }
});
