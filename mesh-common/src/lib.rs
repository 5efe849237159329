//! Types shared by the mesh's kernel programs (`mesh-ebpf`) and the node agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding so that the kernel and user
//! space agree on the layout of every map key and value byte for byte. The crate is
//! `no_std`; the `user` feature adds the `aya::Pod` impls the agent needs, and the
//! `config` feature the Istio-compatible configuration model with its loader and
//! validation (`config`), shared by the controller, `meshctl` and the agents.
#![no_std]

#[cfg(any(feature = "user", feature = "config"))]
extern crate std;

#[cfg(feature = "config")]
pub mod config;
#[cfg(feature = "control")]
pub mod control;
#[cfg(feature = "config")]
pub mod enroll;
#[cfg(feature = "config")]
pub mod hbone;
#[cfg(feature = "user")]
pub mod host;
#[cfg(feature = "config")]
pub mod policy;
#[cfg(feature = "control")]
pub mod tls;

/// `SO_MARK` set on the agent's own sockets. The capture programs never redirect a
/// socket carrying it, which is what keeps the agent's upstream connections from
/// being captured again (no loop).
pub const BYPASS_MARK: u32 = 0x539;

/// `SO_MARK` of the sockets the agent delivers connections to an application with,
/// bound to the caller's address (transparent). The capture programs leave them
/// alone as they do [`BYPASS_MARK`]; inside each enrolled pod, the application's
/// accepted socket inherits the mark (`tcp_fwmark_accept`) and a routing rule for
/// it sends the replies back to the agent's socket instead of out of the pod.
pub const DELIVER_MARK: u32 = 0x53a;

/// In-pod listener for captured outbound connections (loopback of the pod's netns).
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod listener for plaintext inbound connections.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// In-pod HBONE (mTLS) listener.
pub const HBONE_PORT: u16 = 15008;
/// Agent admin API (node netns, localhost).
pub const ADMIN_PORT: u16 = 15000;
/// Prometheus metrics.
pub const METRICS_PORT: u16 = 15020;
/// Readiness probe (`/healthz/ready`).
pub const READINESS_PORT: u16 = 15021;
/// Every port an agent listens on, in a pod or on the node: no connection the agent
/// makes may target one of them on its own addresses (it would loop back to itself).
pub const MESH_PORTS: [u16; 6] =
    [ADMIN_PORT, OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT, METRICS_PORT, READINESS_PORT];

/// Address families as the kernel numbers them (`AF_INET`, `AF_INET6`).
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Value of the enrollment map, keyed by the pod's network-namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    /// Agent-local pod number, for correlating kernel statistics with pods.
    pub id: u32,
    /// Reserved for per-pod capture options; zero today.
    pub flags: u32,
}

/// The destination an application asked for before `connect4`/`connect6` rewrote it.
///
/// `addr` holds the IPv4 address in its first four bytes (network order) or the
/// whole IPv6 address; `port` is in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: [u8; 16],
    /// Cookie of the network namespace the connecting socket lives in.
    pub netns_cookie: u64,
    pub port: u16,
    pub family: u16,
    pub pad: u32,
}

/// Key under which the agent finds a captured connection's original destination:
/// the pod's netns cookie and the client's ephemeral (loopback) port, which is what
/// the agent sees as the peer of the accepted connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstKey {
    pub netns_cookie: u64,
    /// Client's local port, host order.
    pub port: u16,
    pub family: u16,
    pub pad: u32,
}

/// Key of the inbound-capture maps: a pod IP the pod's `sk_lookup` program steers.
///
/// `family` is `AF_INET` or `AF_INET6` widened to 32 bits (as `bpf_sk_lookup.family`
/// carries it); `addr` holds an IPv4 address in its first four bytes (network order,
/// the other twelve zero) or the whole IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundKey {
    pub family: u32,
    pub addr: [u8; 16],
}

/// Key of the probe-port map: a local port of a captured pod IP that the kubelet
/// probes, passed to the application (uncaptured) when the connection comes from one
/// of the node's own addresses.
///
/// `family` and `addr` are as in [`InboundKey`] (the pod IP); `port` is the local
/// port in host order. `pad` is always zero: the kernel hashes every key byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProbeKey {
    pub family: u32,
    pub port: u16,
    pub pad: u16,
    pub addr: [u8; 16],
}

// No implicit padding: the fields above add up to the size.
const _: () = assert!(core::mem::size_of::<ProbeKey>() == 4 + 2 + 2 + 16);

/// Key of the probe-connection map: one TCP connection a process of the node itself
/// (kubelet) opened to a pod's probe port, as its `sock_ops` program saw it. Addresses
/// as in [`InboundKey`], ports in host order, `src` the node's side. Forwarded traffic
/// (a `NodePort` masqueraded to the node's address) has no socket on the node, so it
/// never gets an entry, whatever its addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProbeConnKey {
    pub family: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<ProbeConnKey>() == 4 + 2 + 2 + 16 + 16);

/// Indexes into the kernel statistics array (one `u64` counter each, per CPU).
pub mod stat {
    /// Connections rewritten to the in-pod listener.
    pub const CAPTURED: u32 = 0;
    /// Enrolled-pod connections skipped because the socket carries the bypass mark.
    pub const SKIPPED_BYPASS: u32 = 1;
    /// Enrolled-pod connections to loopback (never captured).
    pub const SKIPPED_LOOPBACK: u32 = 2;
    /// Enrolled-pod connections to an excluded port or CIDR.
    pub const SKIPPED_EXCLUDED: u32 = 3;
    /// The original destination could not be recorded (map full); the connection
    /// was left alone rather than captured without a way back.
    pub const RECORD_FAILED: u32 = 4;
    /// Original destinations handed over from socket cookie to 4-tuple key.
    pub const HANDED_OVER: u32 = 5;
    /// Inbound plaintext connections steered to the pod's 15006 listener.
    pub const INBOUND_STEERED: u32 = 6;
    /// Inbound connections to a captured pod IP passed through uncaptured: to an
    /// agent port (15001, 15006, 15008) or an exempt port.
    pub const INBOUND_EXEMPT: u32 = 7;
    /// Inbound connections from the pod to itself passed through uncaptured.
    pub const INBOUND_SELF: u32 = 8;
    /// Inbound connections dropped because the pod has no 15006 listener (agent
    /// down): capture fails closed.
    pub const INBOUND_NO_LISTENER: u32 = 9;
    /// Inbound connections dropped because the kernel refused to assign the listener
    /// (for instance an IPv6 connection and an IPv4-only listener).
    pub const INBOUND_ASSIGN_FAILED: u32 = 10;
    /// Inbound connections from one of the node's own addresses to a probe port of
    /// the pod IP (kubelet probes) passed to the application uncaptured.
    pub const INBOUND_PROBE: u32 = 11;
    /// Inbound plaintext connections refused before the handshake because the pod's
    /// port is under `PeerAuthentication` STRICT (the client gets a reset; none of
    /// its data reaches the node).
    pub const INBOUND_STRICT: u32 = 12;
    /// Connections the agent delivered to a pod's application from the caller's
    /// address, passed uncaptured (recorded by `sock_ops` at their connect).
    pub const INBOUND_DELIVERED: u32 = 13;
    pub const COUNT: u32 = 14;
    pub const NAMES: [&str; COUNT as usize] = [
        "captured",
        "skipped_bypass_mark",
        "skipped_loopback",
        "skipped_excluded",
        "record_failed",
        "handed_over",
        "inbound_steered",
        "inbound_exempt",
        "inbound_self",
        "inbound_no_listener",
        "inbound_assign_failed",
        "inbound_probe",
        "inbound_strict_refused",
        "inbound_delivered",
    ];
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod_impls {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte
    // arrays, with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::EnrolledPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDstKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InboundKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProbeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProbeConnKey {}
}
