//! Delivering a connection to the application from the caller's own address, as
//! Istio ambient does: the agent's socket inside the pod is transparent
//! (`IP_TRANSPARENT`), bound to the caller's address and marked [`DELIVER_MARK`].
//! The application sees the real caller, and every caller gets a 4-tuple space of
//! its own (with the pod's own address as the source, all callers of a port shared
//! one and ran out of ports under churn).
//!
//! The replies must come back to the agent instead of leaving the pod for the
//! caller's real address. Installed in the pod's namespace at enrollment:
//! - `net.ipv4.tcp_fwmark_accept=1`: the application's accepted socket takes the
//!   mark of the SYN, so all its packets on that connection carry [`DELIVER_MARK`];
//! - `net.ipv4.fwmark_reflect=1` and `net.ipv6.fwmark_reflect=1`: the kernel's own
//!   replies that belong to no socket (the RST of a closed port) take the mark of
//!   the packet they answer, so a delivery to a port nobody listens on is refused at
//!   once instead of waiting out the connect timeout (the RST would otherwise go to
//!   the caller's real address);
//! - a rule `fwmark DELIVER_MARK lookup DELIVER_TABLE` and, in that table, `local
//!   default dev lo` (IPv4 and IPv6): marked packets are delivered locally, to the
//!   agent's transparent socket;
//! - `net.ipv4.conf.lo.src_valid_mark=1`: the reverse-path check of those packets
//!   on `lo` uses the mark, so a pod with `rp_filter` on accepts them.
//!
//! The kernel must not steer these connections back to the agent: `connect` marks
//! the socket (`DELIVER_PENDING`, by cookie), `sock_ops` records its 4-tuple when
//! the port is chosen (`DELIVER_CONNS`, until it closes), and `sk_lookup` lets a SYN
//! with a recorded 4-tuple pass. (Its ingress interface cannot tell: the kernel
//! reports the device of the pod's address even for packets looped over `lo`.) No
//! iptables, no conntrack.
//!
//! The source port is ours to choose, and one choice is wrong: the port of a plaintext
//! connection from the same caller to the same address that the agent itself holds
//! (accepted on 15006, where `sk_lookup` sent it). The kernel checks a new 4-tuple
//! only against sockets of the same direction, so it would happily pick that port;
//! the delivery's SYN would then meet the agent's established socket (a challenge
//! ACK, a reset) instead of the application. So a delivery picks its port itself:
//! of the parity Linux's `connect()` avoids (so a Linux caller's own connections,
//! held now or made later, do not use it), skipping the ports [`Held`] lists.
use std::{
    collections::HashSet,
    hash::BuildHasher as _,
    io,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_common::{BYPASS_MARK, DELIVER_MARK};
use tokio::net::TcpStream;

use crate::enroll::Pod;

/// The routing table of the rule (a number no distribution uses by default).
pub const DELIVER_TABLE: u32 = 0x53a;
/// The rule's priority: before the main table (32766), after `local` (0).
const RULE_PRIORITY: u32 = 32_700;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_LOCAL: u8 = 2;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const LOOPBACK_IFINDEX: u32 = 1;

/// Installs the return path in the calling thread's network namespace (call it
/// inside [`crate::netns::Netns::run`]). Idempotent. IPv6 is skipped when the
/// namespace has none.
pub fn install() -> io::Result<()> {
    write_sysctl("net/ipv4/tcp_fwmark_accept", "1")?;
    write_sysctl("net/ipv4/fwmark_reflect", "1")?;
    // A namespace without IPv6 has no such setting.
    let _ = write_sysctl("net/ipv6/fwmark_reflect", "1");
    write_sysctl("net/ipv4/conf/lo/src_valid_mark", "1")?;
    let socket = Netlink::open()?;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let result = socket
            .request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &rule(family))
            .and_then(|()| socket.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &route(family)));
        match result {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            // A namespace without IPv6 (disabled) takes no IPv6 rule.
            Err(e) if family == libc::AF_INET6 as u8 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes what [`install`] added (the sysctls stay: they only matter for marked
/// packets, and nothing marks packets without the agent). Missing entries are fine.
pub fn uninstall() -> io::Result<()> {
    let socket = Netlink::open()?;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for (kind, message) in [(RTM_DELRULE, rule(family)), (RTM_DELROUTE, route(family))] {
            match socket.request(kind, 0, &message) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH | libc::EAFNOSUPPORT)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The host's `/proc/sys/net` as the `DaemonSet` mounts it. In a container that is not
/// `privileged` the runtime mounts `/proc/sys` read-only; a path under this mount
/// still names the setting of the writing thread's network namespace, as one under
/// `/proc/sys/net` does (the kernel resolves net sysctls by the caller's namespace).
const HOST_PROC_SYS_NET: &str = "/host/proc/sys/net";

/// Where the setting `name` (`net/...`) is written: under [`HOST_PROC_SYS_NET`] when
/// it is mounted, else under `/proc/sys` (an agent running on the host).
fn sysctl_path(name: &str, host_mounted: bool) -> String {
    match name.strip_prefix("net/") {
        Some(rest) if host_mounted => format!("{HOST_PROC_SYS_NET}/{rest}"),
        _ => format!("/proc/sys/{name}"),
    }
}

fn write_sysctl(name: &str, value: &str) -> io::Result<()> {
    static HOST_MOUNTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let host_mounted = *HOST_MOUNTED.get_or_init(|| std::path::Path::new(HOST_PROC_SYS_NET).is_dir());
    let path = sysctl_path(name, host_mounted);
    std::fs::write(&path, value).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EROFS) {
            format!(" (in a container, mount the host's /proc/sys/net at {HOST_PROC_SYS_NET})")
        } else {
            String::new()
        };
        io::Error::new(e.kind(), format!("write {path}: {e}{hint}"))
    })
}

/// `fwmark DELIVER_MARK/0xffffffff lookup DELIVER_TABLE pref RULE_PRIORITY`.
fn rule(family: u8) -> Vec<u8> {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
    let mut message = vec![family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    attribute(&mut message, FRA_PRIORITY, RULE_PRIORITY);
    attribute(&mut message, FRA_FWMARK, DELIVER_MARK);
    attribute(&mut message, FRA_FWMASK, u32::MAX);
    attribute(&mut message, FRA_TABLE, DELIVER_TABLE);
    message
}

/// `local default dev lo table DELIVER_TABLE`.
fn route(family: u8) -> Vec<u8> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let mut message = vec![family, 0, 0, 0, 0, RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL, 0, 0, 0, 0];
    attribute(&mut message, RTA_OIF, LOOPBACK_IFINDEX);
    attribute(&mut message, RTA_TABLE, DELIVER_TABLE);
    message
}

/// A netlink attribute holding one u32 (already 4-byte aligned).
fn attribute(message: &mut Vec<u8>, kind: u16, value: u32) {
    message.extend_from_slice(&8u16.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&value.to_ne_bytes());
}

/// A `NETLINK_ROUTE` socket of the calling thread's network namespace.
struct Netlink(OwnedFd);

impl Netlink {
    #[allow(unsafe_code)]
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends one request and waits for the kernel's acknowledgement.
    #[allow(unsafe_code)]
    fn request(&self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        let length = 16 + payload.len();
        let mut message = Vec::with_capacity(length);
        message.extend_from_slice(&(length as u32).to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        message.extend_from_slice(payload);
        // SAFETY: the kernel address is a zeroed sockaddr_nl with its family set; the
        // buffer is valid for its length.
        let sent = unsafe {
            let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
            kernel.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.0.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 1024];
        // SAFETY: the buffer is valid for writes of its length.
        let received = unsafe { libc::recv(self.0.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let reply = &reply[..received as usize];
        let kind = reply.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        let error = reply.get(16..20).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        match (kind, error) {
            (Some(NLMSG_ERROR), Some(0)) => Ok(()),
            (Some(NLMSG_ERROR), Some(errno)) => Err(io::Error::from_raw_os_error(-errno)),
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected netlink reply")),
        }
    }
}

/// Makes `socket` transparent and binds it to `source`, marked so that capture leaves
/// it alone and the replies come back. Port 0: the kernel picks one at connect, per
/// 4-tuple; another port is shared with other deliveries (`SO_REUSEADDR`), connect
/// then refuses a 4-tuple in use (`EADDRNOTAVAIL`).
#[allow(unsafe_code)]
pub fn bind_transparent(socket: &socket2::Socket, source: SocketAddr) -> io::Result<()> {
    let (level, option) = match source {
        SocketAddr::V4(_) => (libc::SOL_IP, libc::IP_TRANSPARENT),
        SocketAddr::V6(_) => (libc::SOL_IPV6, libc::IPV6_TRANSPARENT),
    };
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid descriptor and a c_int that lives across the call.
    let rc = unsafe {
        libc::setsockopt(socket.as_raw_fd(), level, option, (&raw const on).cast(), size_of::<libc::c_int>() as u32)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if source.port() == 0 {
        // SAFETY: as above.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    } else {
        socket.set_reuse_address(true)?;
    }
    socket.set_mark(DELIVER_MARK)?;
    socket.bind(&source.into())
}

/// Linux's default ephemeral port range (`net.ipv4.ip_local_port_range`).
const DEFAULT_PORTS: RangeInclusive<u16> = 32768..=60999;
/// Ports a delivery tries before it leaves the choice to the kernel.
const ATTEMPTS: usize = 16;

/// The calling thread's namespace's ephemeral port range, where deliveries pick
/// their source ports as the kernel would (Linux's default when it cannot be read).
pub fn local_port_range() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_port_range(&text))
        .unwrap_or(DEFAULT_PORTS)
}

/// `ip_local_port_range`'s text: two numbers, the first not above the second.
fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high)), None) = (numbers.next(), numbers.next(), numbers.next()) else {
        return None;
    };
    (0 < low && low <= high).then_some(low..=high)
}

/// The (caller, local address) pairs of the plaintext connections the agent holds
/// for one pod, while they are open.
#[derive(Debug, Default)]
pub struct Held(Mutex<HashSet<(SocketAddr, SocketAddr)>>);

impl Held {
    /// Notes a connection from `caller` to `local` until the guard is dropped.
    pub fn hold(self: &Arc<Self>, caller: SocketAddr, local: SocketAddr) -> HeldGuard {
        self.lock().insert((caller, local));
        HeldGuard { held: self.clone(), key: (caller, local) }
    }

    fn holds(&self, caller: SocketAddr, local: SocketAddr) -> bool {
        self.lock().contains(&(caller, local))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(SocketAddr, SocketAddr)>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes its connection from [`Held`] when dropped.
#[derive(Debug)]
pub struct HeldGuard {
    held: Arc<Held>,
    key: (SocketAddr, SocketAddr),
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.held.lock().remove(&self.key);
    }
}

/// The source ports a delivery tries: up to [`ATTEMPTS`] consecutive ports of
/// `ports` from `start` (wrapping) among those of the other parity than its first port,
/// without those `held` says a held connection uses. Linux's `connect()` prefers
/// ports of the first port's parity (and `bind()` to port 0 the other), so a Linux
/// caller's own connections, captured or not yet made, almost never use these.
fn candidate_ports(ports: &RangeInclusive<u16>, start: u64, held: impl Fn(u16) -> bool) -> impl Iterator<Item = u16> {
    let low = *ports.start();
    let count = u64::from(ports.end().saturating_sub(low)).div_ceil(2);
    let start = start % count.max(1);
    (0..(ATTEMPTS as u64).min(count))
        .map(move |i| u16::try_from(u64::from(low) + 1 + 2 * ((start + i) % count)).unwrap_or(low))
        .filter(move |&port| !held(port))
}

/// A TCP connection from inside `pod`'s network namespace, with the bypass mark so
/// the capture programs leave it alone.
pub async fn connect_in(pod: &Pod, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = pod.netns.tcp_socket(dst.is_ipv6(), BYPASS_MARK).map_err(io::Error::other)?;
    connect_within(socket, dst, timeout).await
}

/// A connection to `pod`'s application at `dst` that shows `caller` as its source;
/// from the pod's own address when the caller is the pod itself or of the other
/// family. The source port is one no plaintext connection the agent holds for the
/// pod uses with `dst` (see the module's notes); when every port tried is taken the
/// kernel picks one.
pub async fn deliver(pod: &Pod, caller: IpAddr, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let caller = caller.to_canonical();
    if caller.is_ipv6() != dst.is_ipv6() || pod.ips().contains(&caller) || caller.is_loopback() {
        return connect_in(pod, dst, timeout).await;
    }
    let start = std::collections::hash_map::RandomState::new().hash_one((caller, dst));
    let held = |port| pod.plaintext.holds(SocketAddr::new(caller, port), dst);
    for port in candidate_ports(&pod.delivery_ports, start, held) {
        let socket = match pod.netns.delivery_socket(SocketAddr::new(caller, port)) {
            Ok(socket) => socket,
            // Bound by a listener of the pod (or a socket without SO_REUSEADDR).
            Err(crate::netns::NetnsError::Socket { source, .. }) if source.raw_os_error() == Some(libc::EADDRINUSE) => {
                continue;
            }
            Err(error) => return Err(io::Error::other(error)),
        };
        let result = connect_within(socket, dst, timeout).await;
        // EADDRNOTAVAIL: this 4-tuple is in use (or in TIME_WAIT), try the next port.
        if !matches!(&result, Err(error) if error.raw_os_error() == Some(libc::EADDRNOTAVAIL)) {
            return result;
        }
    }
    let socket = pod.netns.delivery_socket(SocketAddr::new(caller, 0)).map_err(io::Error::other)?;
    connect_within(socket, dst, timeout).await
}

async fn connect_within(socket: tokio::net::TcpSocket, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    tokio::time::timeout(timeout, socket.connect(dst)).await.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_go_through_the_host_mount_when_there_is_one() {
        let name = "net/ipv4/conf/lo/src_valid_mark";
        assert_eq!(sysctl_path(name, true), "/host/proc/sys/net/ipv4/conf/lo/src_valid_mark");
        assert_eq!(sysctl_path(name, false), "/proc/sys/net/ipv4/conf/lo/src_valid_mark");
    }

    #[test]
    fn candidate_ports_are_of_the_other_parity_skip_held_ones_and_wrap() {
        let held: Arc<Held> = Arc::default();
        let (caller, local) = ("10.0.0.1".parse().unwrap(), "10.0.0.2:8080".parse().unwrap());
        let guard = held.hold(SocketAddr::new(caller, 32771), local);
        let is_held = |port| held.holds(SocketAddr::new(caller, port), local);
        let ports: Vec<u16> = candidate_ports(&DEFAULT_PORTS, 0, is_held).collect();
        assert_eq!(ports.len(), ATTEMPTS - 1);
        assert_eq!(&ports[..3], &[32769, 32773, 32775]);
        // The same caller port towards another destination does not conflict.
        let other: SocketAddr = "10.0.0.2:9090".parse().unwrap();
        let to_other = |port| held.holds(SocketAddr::new(caller, port), other);
        assert!(candidate_ports(&DEFAULT_PORTS, 0, to_other).any(|p| p == 32771));
        // Starting near the end wraps to the start of the range; any start stays in it
        // and on the odd ports (the default range starts even).
        let odd = u64::from(DEFAULT_PORTS.end() - DEFAULT_PORTS.start()).div_ceil(2);
        let wrapped: Vec<u16> = candidate_ports(&DEFAULT_PORTS, odd - 1, |_| false).take(2).collect();
        assert_eq!(wrapped, [60999, 32769]);
        assert!(candidate_ports(&DEFAULT_PORTS, u64::MAX, |_| false).all(|p| DEFAULT_PORTS.contains(&p) && p % 2 == 1));
        // Narrow ranges: two ports give the second; one port gives none (the kernel picks).
        assert_eq!(candidate_ports(&(40000..=40001), 7, |_| false).collect::<Vec<_>>(), [40001]);
        assert_eq!(candidate_ports(&(40001..=40003), 7, |_| false).collect::<Vec<_>>(), [40002]);
        assert_eq!(candidate_ports(&(40000..=40000), 7, |_| false).count(), 0);
        assert_eq!(candidate_ports(&(1..=u16::MAX), u64::MAX, |_| false).count(), ATTEMPTS);
        drop(guard);
        assert!(!held.holds(SocketAddr::new(caller, 32771), local), "the guard releases the port");
    }

    #[test]
    fn port_ranges_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("40000 40000"), Some(40000..=40000));
        for bad in ["", "40000", "2 1", "0 10", "1 2 3", "a b", "1 70000"] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn messages_have_the_kernel_layout() {
        let rule = rule(libc::AF_INET as u8);
        assert_eq!(rule.len(), 12 + 4 * 8, "header and four u32 attributes");
        assert_eq!(rule[7], FR_ACT_TO_TBL);
        assert_eq!(&rule[12..14], &8u16.to_ne_bytes());
        assert_eq!(&rule[14..16], &FRA_PRIORITY.to_ne_bytes());
        let route = route(libc::AF_INET6 as u8);
        assert_eq!(route[0], libc::AF_INET6 as u8);
        assert_eq!(route[7], RTN_LOCAL);
        assert_eq!(route.len(), 12 + 2 * 8);
    }
}
