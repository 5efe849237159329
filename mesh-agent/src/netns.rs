//! Network namespaces: creating sockets inside a pod's namespace from the agent.
//!
//! A socket belongs to the namespace its creating thread was in at `socket()` time,
//! and stays there. So the agent switches the current thread into the pod's namespace
//! only for the `socket()` (and `bind()` for listeners) call, then switches back; the
//! socket is then driven by the ordinary tokio runtime.
use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path} cannot be opened")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("cannot enter network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("socket operation in network namespace {path} failed: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An open handle to a network namespace, remembered by path and inode so that a
/// namespace that was deleted (or replaced under the same path) can be detected.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
        let meta = file.metadata().map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
        // A network namespace file is an nsfs inode; a regular file or directory is a
        // user error that `setns` would only report later and less clearly.
        if meta.is_dir() || meta.len() != 0 {
            return Err(NetnsError::NotNetns { path: path.to_owned() });
        }
        let ns = Self { file, path: path.to_owned(), dev: meta.dev(), ino: meta.ino() };
        ns.run(|| Ok(())).map_err(|_| NetnsError::NotNetns { path: path.to_owned() })?;
        Ok(ns)
    }

    /// True while the path still names the namespace we opened. The open handle keeps
    /// the namespace itself alive, so the path is what tells whether the pod is gone.
    pub fn still_exists(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }

    /// Runs `f` with the current thread inside this namespace, then restores the
    /// thread's previous namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> Result<T, NetnsError> {
        let home = File::open("/proc/thread-self/ns/net")
            .map_err(|source| NetnsError::Open { path: "/proc/thread-self/ns/net".into(), source })?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetnsError::Enter { path: self.path.clone(), source })?;
        let result = f();
        // A thread left in a pod's namespace would silently create later sockets in the
        // wrong place; there is no sane way to continue.
        setns(home.as_fd(), CloneFlags::CLONE_NEWNET).expect("restore the thread's network namespace");
        result.map_err(|source| NetnsError::Socket { path: self.path.clone(), source })
    }

    /// The namespace's cookie (the key of the kernel's enrollment map).
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        let probe = self.run(|| Socket::new(Domain::IPV4, Type::DGRAM, None))?;
        netns_cookie(&probe).map_err(|source| NetnsError::Socket { path: self.path.clone(), source })
    }

    /// A listening TCP socket bound inside this namespace.
    pub fn listen(&self, addr: SocketAddr) -> Result<std::net::TcpListener, NetnsError> {
        self.run(|| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
    }

    /// A listener created in this namespace, handed to the tokio runtime.
    pub fn tokio_listener(&self, listener: std::net::TcpListener) -> Result<tokio::net::TcpListener, NetnsError> {
        tokio::net::TcpListener::from_std(listener)
            .map_err(|source| NetnsError::Socket { path: self.path.clone(), source })
    }

    /// A listener on `port` for both families (`[::]` with `IPV6_V6ONLY` off), or on
    /// `0.0.0.0` when the namespace has no IPv6. Returns whether it takes IPv6.
    pub fn listen_dual_stack(&self, port: u16) -> Result<(std::net::TcpListener, bool), NetnsError> {
        let dual = self.run(|| {
            let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.set_only_v6(false)?;
            socket.set_nonblocking(true)?;
            socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        });
        match dual {
            Ok(listener) => Ok((listener, true)),
            Err(_) => Ok((self.listen(SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)))?, false)),
        }
    }

    /// An unconnected TCP socket inside this namespace to deliver a connection to the
    /// application from the caller's address `source` (see `deliver`).
    pub fn delivery_socket(&self, source: IpAddr) -> Result<tokio::net::TcpSocket, NetnsError> {
        let std_stream: std::net::TcpStream = self.run(|| {
            let socket =
                Socket::new(Domain::for_address(SocketAddr::new(source, 0)), Type::STREAM, Some(Protocol::TCP))?;
            crate::deliver::bind_transparent(&socket, source)?;
            socket.set_nonblocking(true)?;
            socket.set_nodelay(true)?;
            Ok(socket.into())
        })?;
        Ok(tokio::net::TcpSocket::from_std_stream(std_stream))
    }

    /// An unconnected TCP socket inside this namespace, carrying `mark` so the
    /// capture programs leave it alone.
    pub fn tcp_socket(&self, ipv6: bool, mark: u32) -> Result<tokio::net::TcpSocket, NetnsError> {
        let std_stream: std::net::TcpStream = self.run(|| {
            let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
            let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_mark(mark)?;
            socket.set_nonblocking(true)?;
            socket.set_nodelay(true)?;
            Ok(socket.into())
        })?;
        Ok(tokio::net::TcpSocket::from_std_stream(std_stream))
    }
}

/// The namespace file itself: what `setns` and the kernel's per-netns attach points
/// (`sk_lookup`) take.
impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The cookie the kernel gives a socket's network namespace (`SO_NETNS_COOKIE`), the
/// key of the enrollment map.
#[allow(unsafe_code)]
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
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
