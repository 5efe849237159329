//! Thread per core, as Envoy runs its workers: a shard is one thread with its own
//! single-threaded runtime. A connection handed to a shard stays there with
//! everything it causes (its streams, its relays, the tunnel connections it opens:
//! the waypoint keeps one set of upstream pools per shard), so moving its bytes wakes
//! no other thread.
//!
//! Measured at 1000 requests/s through the waypoint on tokio's work-stealing runtime
//! with 2 workers: about 4 futex calls and 4.8 context switches per request (workers
//! waking each other to steal), against none and 2.7 on one thread. The waypoint gives
//! each shard a listener of its own ([`listener`], `SO_REUSEPORT`). The node agent
//! does not use shards yet (see ARCHITECTURE.md, "Threads").
use std::cell::Cell;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The shard the current thread serves (0 on threads outside the shards).
pub fn current() -> usize {
    SHARD.with(Cell::get)
}

/// Marks the current thread as shard `index`.
pub fn enter(index: usize) {
    SHARD.with(|s| s.set(index));
}

/// A listener on `addr` that other shards' listeners may share (`SO_REUSEPORT`).
pub fn listener(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `[::]` takes IPv4 too, as a single listener does.
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}
