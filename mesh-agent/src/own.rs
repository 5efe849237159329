//! The agent's own listeners, which no connection the agent makes may target. A
//! forwarded connection to one of them comes back to the agent, which would forward
//! it again, without end: one plaintext connection to a pod's 15006 once made the
//! agent connect to itself until it ran out of file descriptors.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::RwLock,
};

pub use mesh_common::MESH_PORTS;

/// The node's ports that forward or administer. Metrics (15020) and readiness (15021)
/// on the node's addresses stay reachable through the mesh: they answer and never
/// forward, and a meshed Prometheus scrapes them.
const NODE_PORTS: [u16; 4] = [15000, 15001, 15006, 15008];

/// Whether `dst` is a listener of the agent: any mesh port on a loopback or
/// unspecified address or on an address `is_pod` says is a pod's (the agent listens
/// in every enrolled pod, and other agents in theirs), or a forwarding port on an
/// address `is_node` says is the node's.
pub fn is_agent_listener(dst: SocketAddr, is_pod: impl Fn(IpAddr) -> bool, is_node: impl Fn(IpAddr) -> bool) -> bool {
    let ip = dst.ip().to_canonical();
    let port = dst.port();
    if !MESH_PORTS.contains(&port) {
        return false;
    }
    ip.is_loopback() || ip.is_unspecified() || is_pod(ip) || (NODE_PORTS.contains(&port) && is_node(ip))
}

/// The addresses of the enrolled pods and of the node.
#[derive(Debug, Default)]
pub struct OwnAddrs {
    pods: RwLock<HashSet<IpAddr>>,
    node: RwLock<HashSet<IpAddr>>,
}

impl OwnAddrs {
    pub fn add_pod(&self, ips: &[IpAddr]) {
        self.pods.write().expect("lock").extend(ips.iter().map(IpAddr::to_canonical));
    }

    pub fn remove_pod(&self, ips: &[IpAddr]) {
        let mut pods = self.pods.write().expect("lock");
        for ip in ips {
            pods.remove(&ip.to_canonical());
        }
    }

    pub fn set_node(&self, ips: &[IpAddr]) {
        *self.node.write().expect("lock") = ips.iter().map(IpAddr::to_canonical).collect();
    }

    /// Whether `dst` is one of this agent's listeners, or a mesh port of a pod
    /// `is_meshed` says another agent serves.
    pub fn targets_agent(&self, dst: SocketAddr, is_meshed: impl Fn(IpAddr) -> bool) -> bool {
        let pods = self.pods.read().expect("lock");
        let node = self.node.read().expect("lock");
        is_agent_listener(dst, |ip| pods.contains(&ip) || is_meshed(ip), |ip| node.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
            // Addresses near the interesting ones, so that hits are frequent.
            (0u8..4).prop_map(|i| IpAddr::V4(Ipv4Addr::new(10, 98, 1, 10 + i))),
            (0u8..4).prop_map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x98, 1, 0, 0, 0, 0, 10 + u16::from(i)))),
            (0u8..4).prop_map(|i| IpAddr::V6(Ipv4Addr::new(10, 98, 1, 10 + i).to_ipv6_mapped())),
            Just(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Just(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            Just(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        ]
    }

    fn port() -> impl Strategy<Value = u16> {
        prop_oneof![any::<u16>(), prop::sample::select(MESH_PORTS.to_vec()), 14_990u16..15_030]
    }

    proptest! {
        /// Every socket address the agent listens on is refused as a destination, in
        /// either family spelling, and nothing else on a pod port range is.
        #[test]
        fn every_listener_of_the_agent_is_refused(
            pods in prop::collection::vec(ip(), 0..4),
            node in prop::collection::vec(ip(), 0..3),
            dst_ip in ip(),
            dst_port in port(),
        ) {
            let own = OwnAddrs::default();
            own.add_pod(&pods);
            own.set_node(&node);
            let dst = SocketAddr::new(dst_ip, dst_port);
            // The listeners the agent actually binds: 15001 on loopback, 15006 and
            // 15008 on every address of every enrolled pod, admin/metrics/readiness on
            // the node (15000 on loopback, 15020/15021 on every node address).
            let canonical = dst_ip.to_canonical();
            let listener = (canonical.is_loopback() && MESH_PORTS.contains(&dst_port))
                || (pods.iter().any(|p| p.to_canonical() == canonical) && [15006, 15008].contains(&dst_port));
            let refused = own.targets_agent(dst, |_| false);
            if listener {
                prop_assert!(refused, "{dst} is a listener of the agent but was allowed");
            }
            if !MESH_PORTS.contains(&dst_port) {
                prop_assert!(!refused, "{dst} is no mesh port but was refused");
            }
            let unrelated = !canonical.is_loopback() && !canonical.is_unspecified()
                && !pods.iter().chain(&node).any(|p| p.to_canonical() == canonical);
            if unrelated {
                prop_assert!(!refused, "{dst} is no address of the agent but was refused");
            }
        }
    }

    #[test]
    fn node_metrics_stay_reachable_but_forwarding_ports_do_not() {
        let own = OwnAddrs::default();
        let node: IpAddr = "10.98.0.1".parse().unwrap();
        own.set_node(&[node]);
        assert!(!own.targets_agent(SocketAddr::new(node, 15020), |_| false));
        assert!(own.targets_agent(SocketAddr::new(node, 15006), |_| false));
        let meshed: IpAddr = "10.98.2.11".parse().unwrap();
        assert!(own.targets_agent(SocketAddr::new(meshed, 15008), |ip| ip == meshed));
        assert!(!own.targets_agent(SocketAddr::new(meshed, 8080), |ip| ip == meshed));
    }
}
