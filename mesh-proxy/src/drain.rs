//! Graceful shutdown: a trigger held by `main` and watches held by every listener and
//! every open connection. Draining tells listeners to stop accepting and waits, up to
//! a deadline, until every watch has been dropped.
use std::{net::SocketAddr, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{debug, error, warn};

/// The signals that stop a mesh process: SIGTERM (the kubelet's, and as PID 1 of a
/// container nothing else handles it) and SIGINT.
#[derive(Debug)]
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Installs both handlers. Install them early: a signal that comes before
    /// [`StopSignals::recv`] is kept, not lost (nor does it kill the process).
    pub fn install() -> std::io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Waits for either; the name of the one that came.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

pub fn channel() -> (Trigger, Watch) {
    let (signal_tx, signal_rx) = watch::channel(false);
    let (held_tx, held_rx) = mpsc::channel(1);
    (Trigger { signal: signal_tx, released: held_rx }, Watch { signal: signal_rx, _held: held_tx })
}

#[derive(Debug)]
pub struct Trigger {
    signal: watch::Sender<bool>,
    released: mpsc::Receiver<()>,
}

impl Trigger {
    /// Signals the drain and waits until all watches are gone or `deadline` passes.
    /// Returns whether everything finished in time.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        let _ = self.signal.send(true);
        tokio::time::timeout(deadline, self.released.recv()).await.is_ok()
    }
}

#[derive(Clone, Debug)]
pub struct Watch {
    signal: watch::Receiver<bool>,
    _held: mpsc::Sender<()>,
}

impl Watch {
    /// Resolves once draining has started.
    pub async fn signaled(&mut self) {
        let _ = self.signal.wait_for(|draining| *draining).await;
    }
}

/// Accepts on `listener` and hands every connection to `handle` until draining
/// starts. `what` names the listener in logs (`outbound`, `tunnel`, `inbound`). The
/// listener joins the reactor of the runtime this runs on (a shard's, so the
/// connections it accepts are served there).
pub async fn accept_until_drained(
    listener: std::net::TcpListener,
    mut drain: Watch,
    pod: &str,
    what: &'static str,
    mut handle: impl FnMut(TcpStream, SocketAddr),
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => return error!(pod, listener = what, %error, "cannot serve the listener"),
    };
    loop {
        tokio::select! {
            () = drain.signaled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => handle(stream, peer),
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(pod, listener = what, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    debug!(pod, listener = what, "listener stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_watches_then_returns() {
        let (trigger, watch) = channel();
        let mut held = watch.clone();
        drop(watch);
        let task = tokio::spawn(async move {
            held.signaled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        assert!(trigger.drain(Duration::from_secs(5)).await);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn drain_gives_up_at_deadline() {
        let (trigger, watch) = channel();
        let _stuck = watch;
        assert!(!trigger.drain(Duration::from_millis(50)).await);
    }
}
