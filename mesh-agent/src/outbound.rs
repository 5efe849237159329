//! The in-pod outbound listener (15001): accepts connections the kernel captured,
//! recovers where they were going and forwards them from inside the pod's network
//! namespace, so the destination sees the pod's own address.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_common::{AF_INET, AF_INET6, BYPASS_MARK, OrigDst, OrigDstKey};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    drain,
    enroll::Pod,
    netns::NetnsError,
    redirect::Redirect,
    telemetry::{AccessLog, Counters, Outcome, bump},
};

/// Copy buffer per direction: large enough that a bulk transfer moves in few syscalls.
const COPY_BUFFER: usize = 128 * 1024;

/// What every outbound connection needs besides its pod.
pub struct Forwarder {
    pub redirect: Arc<Redirect>,
    pub counters: Arc<Counters>,
    pub connect_timeout: Duration,
}

pub struct Outbound {
    listener: TcpListener,
    pod: Arc<Pod>,
    forwarder: Arc<Forwarder>,
    drain: drain::Watch,
}

impl Outbound {
    /// Binds the listener inside the pod's network namespace.
    pub fn new(
        addr: SocketAddr,
        pod: Arc<Pod>,
        forwarder: Arc<Forwarder>,
        drain: drain::Watch,
    ) -> Result<Self, NetnsError> {
        let std_listener = pod.netns.listen(addr)?;
        let listener = TcpListener::from_std(std_listener)
            .map_err(|source| NetnsError::Socket { path: pod.netns.path().to_owned(), source })?;
        Ok(Self { listener, pod, forwarder, drain })
    }

    pub async fn run(self) {
        let Self { listener, pod, forwarder, mut drain } = self;
        loop {
            tokio::select! {
                () = drain.signaled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let conn = Connection { pod: pod.clone(), forwarder: forwarder.clone(), _drain: drain.clone() };
                        tokio::spawn(conn.forward(stream, peer));
                    }
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(pod = %pod.spec.name, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        debug!(pod = %pod.spec.name, "outbound listener stopped");
    }
}

struct Connection {
    pod: Arc<Pod>,
    forwarder: Arc<Forwarder>,
    /// Held until the connection ends, so a drain waits for it.
    _drain: drain::Watch,
}

impl Connection {
    async fn forward(self, mut client: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let counters = [&*self.forwarder.counters, &self.pod.counters];
        bump(counters, |c| &c.accepted, 1);
        let key = OrigDstKey {
            netns_cookie: self.pod.netns_cookie,
            port: peer.port(),
            family: if peer.is_ipv6() { AF_INET6 } else { AF_INET },
            pad: 0,
        };
        let mut log = AccessLog {
            pod: &self.pod.spec.name,
            namespace: &self.pod.spec.namespace,
            client: peer,
            destination: None,
            bytes_sent: 0,
            bytes_received: 0,
            duration: Duration::ZERO,
            outcome: Outcome::Completed,
        };
        let Some(orig) = self.forwarder.redirect.take_orig_dst(&key) else {
            // Someone connected to 15001 directly, or the record aged out.
            bump(counters, |c| &c.no_orig_dst, 1);
            log.outcome = Outcome::NoOriginalDestination;
            log.duration = start.elapsed();
            log.emit();
            return;
        };
        let dst = orig_dst_addr(&orig);
        log.destination = Some(dst);
        let _ = client.set_nodelay(true);

        let upstream = match self.connect(dst).await {
            Ok(upstream) => upstream,
            Err(error) => {
                debug!(pod = %self.pod.spec.name, %dst, %error, "upstream connect failed");
                bump(counters, |c| &c.connect_failed, 1);
                // Reset the client, as the destination would have done.
                let _ = client.set_zero_linger();
                log.outcome = Outcome::ConnectFailed;
                log.duration = start.elapsed();
                log.emit();
                return;
            }
        };
        bump(counters, |c| &c.forwarded, 1);
        bump(counters, |c| &c.active, 1);
        let mut upstream = upstream;
        let result =
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER).await;
        for c in counters {
            c.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        match result {
            Ok((sent, received)) => {
                log.bytes_sent = sent;
                log.bytes_received = received;
            }
            Err(error) => {
                debug!(pod = %self.pod.spec.name, %dst, %error, "connection reset");
                log.outcome = Outcome::Reset;
            }
        }
        bump(counters, |c| &c.bytes_sent, log.bytes_sent);
        bump(counters, |c| &c.bytes_received, log.bytes_received);
        log.duration = start.elapsed();
        log.emit();
    }

    async fn connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = self.pod.netns.tcp_socket(dst.is_ipv6(), BYPASS_MARK).map_err(std::io::Error::other)?;
        tokio::time::timeout(self.forwarder.connect_timeout, socket.connect(dst))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }
}

pub fn orig_dst_addr(orig: &OrigDst) -> SocketAddr {
    let ip = if orig.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]))
    } else {
        // A v4-mapped destination from an IPv6 socket is still an IPv6 connect.
        IpAddr::V6(Ipv6Addr::from(orig.addr))
    };
    SocketAddr::new(ip, orig.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_destination_decodes_both_families() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 98, 2, 11]);
        let v4 = OrigDst { addr, netns_cookie: 1, port: 8080, family: AF_INET, pad: 0 };
        assert_eq!(orig_dst_addr(&v4), "10.98.2.11:8080".parse().unwrap());
        let ip6: Ipv6Addr = "fd00:98:2::11".parse().unwrap();
        let v6 = OrigDst { addr: ip6.octets(), netns_cookie: 1, port: 80, family: AF_INET6, pad: 0 };
        assert_eq!(orig_dst_addr(&v6), "[fd00:98:2::11]:80".parse().unwrap());
    }
}
