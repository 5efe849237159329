//! Where a proxy's outgoing sockets come from. The node agent makes them inside the
//! source pod's network namespace (so packets carry the pod's address) with the mark
//! the capture programs skip; the waypoint and in-process tests use the process's own
//! namespace.
use std::io;

use tokio::net::TcpSocket;

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
