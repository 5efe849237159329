//! Network namespaces: creating sockets inside a pod's namespace from the agent.
//!
//! A socket belongs to the namespace its creating thread was in at `socket()` time,
//! and stays there. So the agent switches the current thread into the pod's namespace
//! only for the `socket()` (and `bind()` for listeners) call, then switches back; the
//! socket is then driven by the ordinary tokio runtime. Sockets for outgoing
//! connections are made a batch at a time and kept spare, so a connection does not
//! pay for two `setns` calls.
use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::Mutex,
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

/// Sockets made per trip into a namespace (per family).
const SPARE_BATCH: usize = 16;

/// An open handle to a network namespace, remembered by path and inode so that a
/// namespace that was deleted (or replaced under the same path) can be detected.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// Unconnected TCP sockets made in the namespace, IPv4 and IPv6.
    spare: Mutex<[Vec<Socket>; 2]>,
}

thread_local! {
    /// The namespace this thread returns to after a `setns` (the agent's own).
    static HOME: std::cell::OnceCell<File> = const { std::cell::OnceCell::new() };
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
        let ns = Self { file, path: path.to_owned(), dev: meta.dev(), ino: meta.ino(), spare: Mutex::default() };
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
        HOME.with(|home| {
            let home = if let Some(home) = home.get() {
                home
            } else {
                let file = File::open("/proc/thread-self/ns/net")
                    .map_err(|source| NetnsError::Open { path: "/proc/thread-self/ns/net".into(), source })?;
                home.get_or_init(|| file)
            };
            setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|source| NetnsError::Enter { path: self.path.clone(), source })?;
            let result = f();
            // A thread left in a pod's namespace would silently create later sockets in
            // the wrong place; there is no sane way to continue.
            setns(home.as_fd(), CloneFlags::CLONE_NEWNET).expect("restore the thread's network namespace");
            result.map_err(|source| NetnsError::Socket { path: self.path.clone(), source })
        })
    }

    /// A new non-blocking TCP socket of this namespace: a spare one, or the first of a
    /// new batch (made non-blocking at creation: no `fcntl` per connection).
    fn fresh_socket(&self, ipv6: bool) -> Result<Socket, NetnsError> {
        let family = usize::from(ipv6);
        if let Some(socket) = self.spare.lock().expect("lock")[family].pop() {
            return Ok(socket);
        }
        let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
        let mut batch = self.run(|| {
            (0..SPARE_BATCH)
                .map(|_| Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)))
                .collect::<io::Result<Vec<_>>>()
        })?;
        let socket = batch.pop().expect("a batch has sockets");
        self.spare.lock().expect("lock")[family].extend(batch);
        Ok(socket)
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
            // One listener per shard: the kernel spreads connections over the group.
            socket.set_reuse_port(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
    }

    /// A listener on `port` for both families (`[::]` with `IPV6_V6ONLY` off), or on
    /// `0.0.0.0` when the namespace has no IPv6. Returns whether it takes IPv6.
    pub fn listen_dual_stack(&self, port: u16) -> Result<(std::net::TcpListener, bool), NetnsError> {
        match self.listen_dual(port) {
            Ok(listener) => Ok((listener, true)),
            Err(_) => Ok((self.listen(SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)))?, false)),
        }
    }

    /// A listener on `[::]:port` taking both families (`IPV6_V6ONLY` off).
    pub fn listen_dual(&self, port: u16) -> Result<std::net::TcpListener, NetnsError> {
        self.run(|| {
            let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_only_v6(false)?;
            socket.set_nonblocking(true)?;
            socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
    }

    /// An unconnected TCP socket inside this namespace to deliver a connection to the
    /// application from the caller's address `source` (port 0: the kernel's choice at
    /// connect; see `deliver`).
    pub fn delivery_socket(&self, source: SocketAddr) -> Result<tokio::net::TcpSocket, NetnsError> {
        let socket = self.fresh_socket(source.is_ipv6())?;
        let setup = || {
            crate::deliver::bind_transparent(&socket, source)?;
            socket.set_nodelay(true)
        };
        setup().map_err(|source| NetnsError::Socket { path: self.path.clone(), source })?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// An unconnected TCP socket inside this namespace, carrying `mark` so the
    /// capture programs leave it alone.
    pub fn tcp_socket(&self, ipv6: bool, mark: u32) -> Result<tokio::net::TcpSocket, NetnsError> {
        let socket = self.fresh_socket(ipv6)?;
        let setup = || {
            socket.set_mark(mark)?;
            socket.set_nodelay(true)
        };
        setup().map_err(|source| NetnsError::Socket { path: self.path.clone(), source })?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }
}

/// The namespace file itself: what `setns` and the kernel's per-netns attach points
/// (`sk_lookup`) take.
impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

pub use mesh_proxy::socket::netns_cookie;
