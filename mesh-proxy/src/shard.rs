//! Thread per core, as Envoy runs its workers: a shard is one thread with its own
//! single-threaded runtime. A connection handed to a shard stays there with
//! everything it causes (its streams, its relays, the tunnel connections it opens:
//! pools are keyed by shard), so moving its bytes wakes no other thread.
//!
//! Measured at 1000 requests/s through the waypoint on tokio's work-stealing runtime
//! with 2 workers: about 4 futex calls and 4.8 context switches per request (workers
//! waking each other to steal), against none and 2.7 on one thread. The node agent
//! and the waypoint give each shard a listener of its own (`SO_REUSEPORT`: the kernel
//! spreads new connections over the group; [`spawn_on`], [`listener`]); a listener
//! that cannot be shared is served on one shard, which hands each connection to the
//! next shard in turn ([`spawn`]).
use std::{
    cell::Cell,
    future::Future,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{net::TcpStream, runtime::Handle};
use tracing::warn;

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

/// How far ahead [`keep_timers_near`] keeps a timer armed.
const NEAR: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs forever on a shard's runtime, keeping a timer armed at most [`NEAR`] ahead.
///
/// Tokio's timer driver writes its eventfd (waking its own thread's `epoll_wait`
/// once more) whenever a timer is armed earlier than the wake it planned when the
/// thread last parked, and with no timer pending that plan is "never". hyper arms a
/// new header-read timer for every HTTP/1 request, so each request through the
/// waypoint cost a `write` and a spurious wake-up (measured: 1 eventfd write per
/// request at 1000 requests/s). With this timer always due within a second, timers
/// armed further ahead (header reads, request and idle timeouts) never need the wake;
/// it costs one wake-up per second per idle shard.
pub async fn keep_timers_near() {
    loop {
        tokio::time::sleep(NEAR).await;
    }
}

/// The running shards; set once per process by [`start`].
static SHARDS: OnceLock<Shards> = OnceLock::new();

struct Shards {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

/// Starts `count` shard threads (at least one), each running a single-threaded
/// runtime until the process exits. Later calls do nothing.
pub fn start(count: usize) -> std::io::Result<()> {
    if SHARDS.get().is_some() {
        return Ok(());
    }
    let mut handles = Vec::new();
    for index in 0..count.max(1) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        handles.push(runtime.handle().clone());
        std::thread::Builder::new().name(format!("shard-{index}")).spawn(move || {
            enter(index);
            runtime.block_on(keep_timers_near());
        })?;
    }
    let _ = SHARDS.set(Shards { handles, next: AtomicUsize::new(0) });
    Ok(())
}

/// How many shards run (1 without shards: tests, tools).
pub fn count() -> usize {
    SHARDS.get().map_or(1, |shards| shards.handles.len())
}

/// Runs `task` on shard `index % count()` (on the caller's runtime without shards).
/// A listener's accept loop spawned this way registers its socket with that shard's
/// reactor on its first poll, so the connections it accepts are served there.
pub fn spawn_on<Fut>(index: usize, task: Fut) -> tokio::task::JoinHandle<()>
where
    Fut: Future<Output = ()> + Send + 'static,
{
    match SHARDS.get() {
        Some(shards) => shards.handles[index % shards.handles.len()].spawn(task),
        None => tokio::spawn(task),
    }
}

/// Serves an accepted connection: on the accepting shard when every shard accepts on
/// a listener of its own (`spread` false), else handed to the next shard in turn
/// ([`spawn`]).
pub fn serve<F, Fut>(spread: bool, stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    if spread {
        spawn(stream, serve);
    } else {
        tokio::spawn(serve(stream));
    }
}

/// Serves the accepted connection `stream` with `serve`, on the next shard in turn:
/// the socket moves to that shard's reactor, and the future is made there. Without
/// shards (tests, tools) it is spawned on the caller's runtime.
pub fn spawn<F, Fut>(stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(shards) = SHARDS.get() else {
        tokio::spawn(serve(stream));
        return;
    };
    let std = match stream.into_std() {
        Ok(std) => std,
        Err(error) => {
            warn!(%error, "cannot hand a connection to a shard");
            return;
        }
    };
    let index = shards.next.fetch_add(1, Ordering::Relaxed) % shards.handles.len();
    shards.handles[index].spawn(async move {
        match TcpStream::from_std(std) {
            Ok(stream) => serve(stream).await,
            Err(error) => warn!(%error, "cannot take a connection into a shard"),
        }
    });
}

/// A listener on `addr` that other shards' listeners may share (`SO_REUSEPORT`);
/// `[::]` takes both families ([`crate::socket::listen`]).
pub fn listener(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    crate::socket::listen(addr, true)
}
