//! Where a proxy's outgoing sockets come from. The node agent makes them inside the
//! source pod's network namespace (so packets carry the pod's address) with the mark
//! the capture programs skip; the waypoint and in-process tests use the process's own
//! namespace.
use std::{io, net::SocketAddr};

use tokio::net::TcpSocket;
use tracing::info;

pub trait SocketFactory: Send + Sync {
    /// Identifies the network namespace the sockets are made in: pooled tunnel
    /// connections are never shared between two of them.
    fn namespace(&self) -> u64;

    /// A new, unconnected, non-blocking TCP socket of the given family.
    fn tcp_socket(&self, ipv6: bool) -> io::Result<TcpSocket>;
}

/// Sockets in the process's own network namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl SocketFactory for Local {
    fn namespace(&self) -> u64 {
        0
    }

    fn tcp_socket(&self, ipv6: bool) -> io::Result<TcpSocket> {
        let socket = if ipv6 { TcpSocket::new_v6()? } else { TcpSocket::new_v4()? };
        socket.set_nodelay(true)?;
        Ok(socket)
    }
}

/// A non-blocking listening socket on `addr`. `[::]` takes both families
/// (`IPV6_V6ONLY` off, whatever `net.ipv6.bindv6only` says), so the defaults serve
/// IPv4, IPv6 and dual-stack clusters alike; on a node without IPv6 sockets at all
/// (booted with `ipv6.disable=1`) it listens on `0.0.0.0` and the same port instead.
/// `shared`: other sockets may listen on the same address (`SO_REUSEPORT`, a
/// shard's listener).
pub fn listen(addr: SocketAddr, shared: bool) -> io::Result<std::net::TcpListener> {
    match listen_exactly(addr, shared) {
        Err(error) => match ipv4_fallback(addr, &error) {
            Some(v4) => {
                info!(%addr, %error, fallback = %v4, "no IPv6 on this node: listening on IPv4 only");
                listen_exactly(v4, shared)
            }
            None => Err(error),
        },
        listening => listening,
    }
}

fn listen_exactly(addr: SocketAddr, shared: bool) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// `0.0.0.0` and the port of `addr` when `addr` is `[::]` and `error` says the node
/// has no IPv6 (no such address family, or no such address).
fn ipv4_fallback(addr: SocketAddr, error: &io::Error) -> Option<SocketAddr> {
    let no_ipv6 = matches!(error.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL));
    (addr.is_ipv6() && addr.ip().is_unspecified() && no_ipv6)
        .then(|| SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port())))
}

/// The cookie the kernel gives a socket's network namespace (`SO_NETNS_COOKIE`).
#[allow(unsafe_code)]
pub fn netns_cookie(socket: &impl std::os::fd::AsFd) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is valid for the borrow; the kernel writes at most `len` bytes
    // into `cookie`, a u64 that lives across the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 { Ok(cookie) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, TcpStream};

    use super::*;

    /// `[::]` takes IPv4 and IPv6 clients (the loopback here has both).
    #[test]
    fn the_ipv6_wildcard_takes_both_families() {
        let listener = listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), false).unwrap();
        // Set, not left to `net.ipv6.bindv6only` (0 here, 1 on some distributions).
        assert_eq!(socket2::SockRef::from(&listener).only_v6().ok(), Some(false));
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(false).unwrap();
        for client in [SocketAddr::from((Ipv4Addr::LOCALHOST, port)), SocketAddr::from((Ipv6Addr::LOCALHOST, port))] {
            let _stream = TcpStream::connect(client).unwrap_or_else(|error| panic!("{client}: {error}"));
            let (_, peer) = listener.accept().unwrap();
            assert_eq!(peer.ip().to_canonical(), client.ip(), "from {client}");
        }
    }

    #[test]
    fn only_the_ipv6_wildcard_falls_back_and_only_without_ipv6() {
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 15020));
        let no_family = io::Error::from_raw_os_error(libc::EAFNOSUPPORT);
        assert_eq!(ipv4_fallback(any6, &no_family), Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15020))));
        let no_address = io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        assert_eq!(ipv4_fallback(any6, &no_address), Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15020))));
        // A port in use is a port in use; an explicit IPv6 address stays IPv6.
        assert_eq!(ipv4_fallback(any6, &io::Error::from_raw_os_error(libc::EADDRINUSE)), None);
        assert_eq!(ipv4_fallback(SocketAddr::from((Ipv6Addr::LOCALHOST, 15020)), &no_family), None);
        assert_eq!(ipv4_fallback(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15020)), &no_family), None);
    }
}
