//! Restarts and upgrades without a refused connection. A starting agent that finds
//! the node owned by a running one asks it, over `STATE_DIR/handover.sock`, for its
//! listening sockets (every pod's 15001/15006/15008 and the node's admin, metrics
//! and readiness ports), passed as file descriptors (`SCM_RIGHTS`), as Envoy's hot
//! restart and pingora's graceful upgrade do. The same sockets keep their backlog
//! throughout: a connection that arrives meanwhile waits in it, never refused.
//!
//! The exchange (`SOCK_SEQPACKET`, one message each):
//! 1. successor -> owner `takeover`; the owner stops changing its pods.
//! 2. owner -> successor `F` messages with up to [`FDS_PER_MESSAGE`] descriptors
//!    each, then `M` messages with the manifest (JSON: what each descriptor is, in
//!    order), then `E`.
//! 3. successor -> owner `got`; the owner lets go of its locks, the successor takes
//!    them, loads the kernel state (pinned, as after any restart) and starts
//!    accepting on the inherited sockets. Until then the owner still accepts.
//! 4. successor -> owner `ready`; the owner stops accepting, sends GOAWAY on its
//!    tunnel connections and drains the rest until `--drain-seconds`, then exits.
//!
//! If the successor goes away before `got`, the owner carries on as before; between
//! `got` and `ready`, it carries on if it can take its locks back.
use std::{
    collections::HashMap,
    io::{IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, accept, bind,
    connect, listen, recvmsg, sendmsg, setsockopt, socket, sockopt,
};
use serde::{Deserialize, Serialize};

pub const SOCKET: &str = "handover.sock";
/// Descriptors per message (the kernel takes at most 253).
const FDS_PER_MESSAGE: usize = 200;
/// Manifest bytes per message.
const MANIFEST_CHUNK: usize = 32 * 1024;
/// How long each side waits for the other's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("no running agent answers on {path}")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("handover socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("the other agent broke off the handover")]
    BrokenOff,
    #[error("unexpected handover message {0:?}")]
    Unexpected(String),
    #[error("the handover manifest is not valid")]
    Manifest(#[source] serde_json::Error),
    #[error("the manifest names {named} sockets, {received} arrived")]
    Count { named: usize, received: usize },
}

/// One listening socket handed over: whose it is (a pod's UID, or empty for the
/// node's own), what it is, where it listens, and which of the `SO_REUSEPORT` group
/// on that address it is (one per shard; 0 in manifests of agents before groups).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ListenerId {
    pub owner: String,
    pub kind: String,
    pub addr: SocketAddr,
    #[serde(default)]
    pub index: usize,
}

/// The listening sockets a successor inherited, taken one by one as it binds.
#[derive(Debug, Default)]
pub struct Inherited(Mutex<HashMap<ListenerId, OwnedFd>>);

impl Inherited {
    /// The inherited socket for `id`, if any (each can be taken once).
    pub fn take(&self, owner: &str, kind: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let id = ListenerId { owner: owner.to_owned(), kind: kind.to_owned(), addr, index: 0 };
        self.0.lock().expect("lock").remove(&id).map(std::net::TcpListener::from)
    }

    /// Every inherited socket of the group at `addr`, in index order. All of them
    /// must be served: the kernel keeps spreading new connections over the whole
    /// group, also when the predecessor ran more shards than this agent does.
    pub fn take_group(&self, owner: &str, kind: &str, addr: SocketAddr) -> Vec<std::net::TcpListener> {
        let mut map = self.0.lock().expect("lock");
        let mut ids: Vec<ListenerId> =
            map.keys().filter(|id| id.owner == owner && id.kind == kind && id.addr == addr).cloned().collect();
        ids.sort_by_key(|id| id.index);
        ids.into_iter().filter_map(|id| map.remove(&id)).map(std::net::TcpListener::from).collect()
    }

    /// A node listener (admin, metrics, readiness) passed on by the predecessor, if
    /// it is in this process's network namespace: a successor in another one (a new
    /// pod beside the old one) listens in its own, where it is reached.
    ///
    /// A predecessor that listened on `0.0.0.0` where this agent has `[::]` on the
    /// same port (the defaults moved) passes that socket on: it holds the port, so
    /// this agent could not listen beside it. It stays in use through later
    /// handovers; a start without a predecessor listens on `[::]`. (Not the other way:
    /// an agent configured for IPv4 is never given a socket that takes IPv6.)
    pub fn take_node(&self, kind: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let same_netns = |listener: &std::net::TcpListener| {
            let probe = std::net::UdpSocket::bind(("127.0.0.1", 0));
            probe.is_ok_and(|probe| {
                mesh_proxy::socket::netns_cookie(&probe).ok() == mesh_proxy::socket::netns_cookie(listener).ok()
            })
        };
        let listener = self.take("", kind, addr).or_else(|| {
            if !(addr.is_ipv6() && addr.ip().is_unspecified()) {
                return None;
            }
            let ipv4_wildcard = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            let listener = self.take("", kind, ipv4_wildcard)?;
            tracing::info!(
                %kind,
                configured = %addr,
                inherited = %ipv4_wildcard,
                "keeping the running agent's listening socket (a start without a predecessor listens as configured)"
            );
            Some(listener)
        });
        listener.filter(same_netns)
    }

    /// How many were not taken (their pod is gone, or this agent does not serve them).
    pub fn left(&self) -> usize {
        self.0.lock().expect("lock").len()
    }
}

/// The starting side, after it received the sockets.
pub struct Successor {
    conn: OwnedFd,
    pub inherited: std::sync::Arc<Inherited>,
}

impl Successor {
    /// Asks the agent that owns `state_dir` for its sockets.
    pub fn take_over(state_dir: &Path) -> Result<Self, HandoverError> {
        let path = state_dir.join(SOCKET);
        let socket_error = |source| HandoverError::Socket { path: path.clone(), source };
        let conn =
            socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(socket_error)?;
        let addr = UnixAddr::new(&path).map_err(socket_error)?;
        connect(conn.as_raw_fd(), &addr).map_err(|source| HandoverError::Unreachable { path: path.clone(), source })?;
        set_timeouts(&conn).map_err(socket_error)?;
        send(&conn, b"takeover", &[])?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut manifest = Vec::new();
        loop {
            let (message, received) = receive(&conn)?;
            fds.extend(received);
            match message.split_first() {
                Some((b'F', _)) => {}
                Some((b'M', chunk)) => manifest.extend_from_slice(chunk),
                Some((b'E', _)) => break,
                _ => return Err(HandoverError::Unexpected(String::from_utf8_lossy(&message).into_owned())),
            }
        }
        let ids: Vec<ListenerId> = serde_json::from_slice(&manifest).map_err(HandoverError::Manifest)?;
        if ids.len() != fds.len() {
            return Err(HandoverError::Count { named: ids.len(), received: fds.len() });
        }
        let inherited = std::sync::Arc::new(Inherited(Mutex::new(ids.into_iter().zip(fds).collect())));
        Ok(Self { conn, inherited })
    }

    /// Step 3: the sockets arrived; the owner may let go of its locks.
    pub fn got(&self) -> Result<(), HandoverError> {
        send(&self.conn, b"got", &[])
    }

    /// Step 4: this agent accepts on every inherited socket now.
    pub fn ready(self) -> Result<(), HandoverError> {
        send(&self.conn, b"ready", &[])
    }
}

/// The running agent's side: what it must do at each step.
pub trait Owner: Send + Sync + 'static {
    /// Stop changing pods (no enrollment, no removal, no kernel change) and return
    /// every listening socket (duplicated) with what it is.
    fn freeze(&self) -> Vec<(ListenerId, OwnedFd)>;
    /// Undo `freeze`: the successor went away.
    fn thaw(&self);
    /// Let go of the node's locks (the successor takes them).
    fn release_locks(&self);
    /// Take the locks back; false when the successor holds them.
    fn retake_locks(&self) -> bool;
    /// Stop accepting and drain: the successor serves everything new.
    fn hand_over(&self);
}

/// Listens on `STATE_DIR/handover.sock` (on a thread of its own: the exchange is a
/// few blocking steps) and serves one successor at a time.
pub fn serve(state_dir: &Path, owner: impl Owner) -> Result<(), HandoverError> {
    let path = state_dir.join(SOCKET);
    let socket_error = |source| HandoverError::Socket { path: path.clone(), source };
    let _ = std::fs::remove_file(&path);
    let listener =
        socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(socket_error)?;
    bind(listener.as_raw_fd(), &UnixAddr::new(&path).map_err(socket_error)?).map_err(socket_error)?;
    listen(&listener, Backlog::new(4).map_err(socket_error)?).map_err(socket_error)?;
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            loop {
                let conn = match accept(listener.as_raw_fd()) {
                    // SAFETY: accept returned a new descriptor that nobody else owns.
                    #[allow(unsafe_code)]
                    Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                    Err(error) => {
                        tracing::warn!(%error, "handover accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match exchange(&conn, &owner) {
                    Ok(()) => return,
                    Err(error) => tracing::warn!(%error, "handover did not complete; still serving"),
                }
            }
        })
        .map_err(|e| socket_error(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    Ok(())
}

fn exchange(conn: &OwnedFd, owner: &impl Owner) -> Result<(), HandoverError> {
    let _ = set_timeouts(conn);
    let (request, _) = receive(conn)?;
    if request != b"takeover" {
        return Err(HandoverError::Unexpected(String::from_utf8_lossy(&request).into_owned()));
    }
    tracing::info!("a new agent asks to take over; handing over the listening sockets");
    let listeners = owner.freeze();
    let sent = send_listeners(conn, &listeners);
    drop(listeners);
    if let Err(error) = sent.and_then(|()| expect(conn, b"got")) {
        owner.thaw();
        return Err(error);
    }
    owner.release_locks();
    if let Err(error) = expect(conn, b"ready") {
        if owner.retake_locks() {
            owner.thaw();
            return Err(error);
        }
        tracing::warn!(%error, "the new agent holds the node but did not say it is ready; handing over anyway");
    }
    tracing::info!("the new agent is ready; no longer accepting, draining");
    owner.hand_over();
    Ok(())
}

fn send_listeners(conn: &OwnedFd, listeners: &[(ListenerId, OwnedFd)]) -> Result<(), HandoverError> {
    for chunk in listeners.chunks(FDS_PER_MESSAGE) {
        let fds: Vec<RawFd> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        send(conn, b"F", &fds)?;
    }
    let ids: Vec<&ListenerId> = listeners.iter().map(|(id, _)| id).collect();
    let manifest = serde_json::to_vec(&ids).expect("listener ids serialize");
    for chunk in manifest.chunks(MANIFEST_CHUNK) {
        let mut message = Vec::with_capacity(chunk.len() + 1);
        message.push(b'M');
        message.extend_from_slice(chunk);
        send(conn, &message, &[])?;
    }
    send(conn, b"E", &[])
}

fn expect(conn: &OwnedFd, wanted: &[u8]) -> Result<(), HandoverError> {
    let (message, _) = receive(conn)?;
    if message == wanted {
        Ok(())
    } else {
        Err(HandoverError::Unexpected(String::from_utf8_lossy(&message).into_owned()))
    }
}

fn set_timeouts(conn: &OwnedFd) -> nix::Result<()> {
    let timeout = nix::sys::time::TimeVal::new(STEP_TIMEOUT.as_secs() as _, 0);
    setsockopt(conn, sockopt::ReceiveTimeout, &timeout)?;
    setsockopt(conn, sockopt::SendTimeout, &timeout)
}

fn send(conn: &OwnedFd, message: &[u8], fds: &[RawFd]) -> Result<(), HandoverError> {
    let control = [ControlMessage::ScmRights(fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &control };
    sendmsg::<()>(conn.as_fd().as_raw_fd(), &[IoSlice::new(message)], control, MsgFlags::empty(), None)
        .map_err(|_| HandoverError::BrokenOff)?;
    Ok(())
}

fn receive(conn: &OwnedFd) -> Result<(Vec<u8>, Vec<OwnedFd>), HandoverError> {
    let mut buffer = vec![0u8; MANIFEST_CHUNK + 16];
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(&mut buffer)];
    let message = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|_| HandoverError::BrokenOff)?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs().map_err(|_| HandoverError::BrokenOff)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel installed these descriptors in this process for us;
            // nothing else owns them.
            #[allow(unsafe_code)]
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let length = message.bytes;
    if length == 0 {
        return Err(HandoverError::BrokenOff);
    }
    buffer.truncate(length);
    Ok((buffer, fds))
}

#[cfg(test)]
mod tests {
    use std::{
        net::TcpListener,
        sync::{Arc, atomic::AtomicBool},
    };

    use super::*;

    struct TestOwner {
        listener: TcpListener,
        released: Arc<AtomicBool>,
        handed_over: Arc<AtomicBool>,
    }

    impl Owner for TestOwner {
        fn freeze(&self) -> Vec<(ListenerId, OwnedFd)> {
            let id = ListenerId {
                owner: "uid-1".into(),
                kind: "outbound".into(),
                addr: self.listener.local_addr().unwrap(),
                index: 0,
            };
            vec![(id, OwnedFd::from(self.listener.try_clone().unwrap()))]
        }
        fn thaw(&self) {}
        fn release_locks(&self) {
            self.released.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        fn retake_locks(&self) -> bool {
            false
        }
        fn hand_over(&self) {
            self.handed_over.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_successor_inherits_the_same_listening_socket() {
        let dir = std::env::temp_dir().join(format!("mesh-handover-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (released, handed_over) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        serve(&dir, TestOwner { listener, released: released.clone(), handed_over: handed_over.clone() }).unwrap();
        // A client queued in the backlog before the handover is accepted by the successor.
        let client = std::net::TcpStream::connect(addr).unwrap();
        let successor = Successor::take_over(&dir).unwrap();
        let inherited = successor.inherited.take("uid-1", "outbound", addr).expect("inherited listener");
        assert_eq!(successor.inherited.left(), 0);
        successor.got().unwrap();
        successor.ready().unwrap();
        let (accepted, peer) = inherited.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        drop(accepted);
        for _ in 0..100 {
            if handed_over.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(released.load(std::sync::atomic::Ordering::SeqCst));
        assert!(handed_over.load(std::sync::atomic::Ordering::SeqCst));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_group_is_taken_whole_in_index_order() {
        let addr: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let other: SocketAddr = "[::1]:15001".parse().unwrap();
        let mut map = HashMap::new();
        let mut ports = Vec::new();
        for (index, at) in [(2, addr), (0, addr), (1, addr), (0, other)] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            if at == addr {
                ports.push((index, listener.local_addr().unwrap()));
            }
            let id = ListenerId { owner: "uid-1".into(), kind: "outbound".into(), addr: at, index };
            map.insert(id, OwnedFd::from(listener));
        }
        let inherited = Inherited(Mutex::new(map));
        ports.sort();
        let group = inherited.take_group("uid-1", "outbound", addr);
        let got: Vec<SocketAddr> = group.iter().map(|l| l.local_addr().unwrap()).collect();
        assert_eq!(got, ports.iter().map(|(_, a)| *a).collect::<Vec<_>>());
        assert!(inherited.take_group("uid-1", "outbound", addr).is_empty(), "taken once");
        assert_eq!(inherited.left(), 1, "the other address's group stays");
        // A manifest of an agent from before groups has no index: it is socket 0.
        let old: ListenerId = serde_json::from_str(r#"{"owner":"u","kind":"tunnel","addr":"0.0.0.0:15008"}"#).unwrap();
        assert_eq!(old.index, 0);
    }

    /// A node listener on `0.0.0.0:port` passes on to a successor configured with
    /// `[::]:port`, and only then: not to another kind, port or address, not from a
    /// pod's listener, not from `[::]` to `0.0.0.0`.
    #[test]
    fn a_node_listener_on_the_ipv4_wildcard_is_passed_on_to_the_ipv6_one() {
        let mut map = HashMap::new();
        for (owner, kind, at) in [
            ("", "metrics", "0.0.0.0:15020"),
            ("", "admin", "127.0.0.1:15000"),
            ("", "readiness", "0.0.0.0:15099"),
            ("uid-1", "ready", "0.0.0.0:15021"),
            ("", "health", "[::]:15030"),
        ] {
            let id = ListenerId { owner: owner.into(), kind: kind.into(), addr: at.parse().unwrap(), index: 0 };
            map.insert(id, OwnedFd::from(TcpListener::bind("127.0.0.1:0").unwrap()));
        }
        let inherited = Inherited(Mutex::new(map));
        let take = |kind: &str, at: &str| inherited.take_node(kind, at.parse().unwrap()).is_some();
        assert!(!take("readiness", "[::]:15020"), "another kind");
        assert!(!take("admin", "[::]:15000"), "not a wildcard");
        assert!(!take("readiness", "[::]:15021"), "another port");
        assert!(!take("ready", "[::]:15021"), "a pod's");
        assert!(!take("health", "0.0.0.0:15030"), "IPv6 to an IPv4 agent");
        assert!(!take("metrics", "[::1]:15020"), "not the wildcard");
        assert!(take("metrics", "[::]:15020"));
        assert_eq!(inherited.left(), 4);
    }
}
