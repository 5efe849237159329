//! HTTP/2 control-frame floods on downstream connections: a client sending PING or
//! SETTINGS frames faster than [`RATE`] per second, beyond a burst of [`BURST`],
//! has its connection closed (the "ping flood" and "settings flood" of
//! CVE-2019-9512 and CVE-2019-9515).
//!
//! The HTTP/2 stack answers each such frame (a PING ACK, a SETTINGS ACK) and never
//! queues the answers without bound: a client that does not read stalls its own
//! connection. But a client that reads can keep the waypoint answering at the speed
//! of its link for as long as it likes, which costs the waypoint as much CPU as the
//! client and gives it nothing. The stack has no limit of its own for this, so the
//! guard reads the frame headers as they pass (nine bytes a frame, the payloads are
//! skipped, nothing is copied) and ends the connection with an error once the
//! client's budget is spent; the stack then closes it. A PING that follows DATA or
//! HEADERS the waypoint wrote is free (the frames it writes are read the same way):
//! gRPC clients probe the bandwidth with one after each burst they receive. Other connections are not
//! affected. Rapid reset and CONTINUATION floods are the stack's own limits.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};
use tracing::warn;

/// PING and SETTINGS frames a connection may send at once.
pub const BURST: f64 = 1000.0;
/// ... and per second after that (keepalive PINGs stay far below it; a PING that
/// follows data the waypoint sent is free, see [`Scan`]).
pub const RATE: f64 = 100.0;

/// The client connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Splits a byte stream into HTTP/2 frames: yields each frame header, skips the
/// payloads (split anywhere across calls).
#[derive(Debug, Default)]
struct Frames {
    /// The frame header being read, and how many of its bytes arrived.
    head: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
}

impl Frames {
    /// Takes in `bytes`; `header` gets each completed frame header's type and flags.
    fn feed(&mut self, mut bytes: &[u8], mut header: impl FnMut(u8, u8) -> Result<(), Flood>) -> Result<(), Flood> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME_HEADER {
                self.have = 0;
                let head = self.head;
                self.skip = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
                header(head[3], head[4])?;
            }
        }
        Ok(())
    }
}

/// Counts a connection's PING and SETTINGS frames; see the module docs.
#[derive(Debug)]
pub struct Scan {
    state: State,
    read: Frames,
    written: Frames,
    /// Whether the waypoint wrote DATA or HEADERS since the client's last PING: a
    /// PING that follows data is a bandwidth probe (gRPC sends one per burst it
    /// receives, as often as every message) and costs nothing, as gRPC servers'
    /// own ping policy has it.
    answered: bool,
    tokens: f64,
    refilled: Instant,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// This many bytes of the preface matched so far.
    Preface(usize),
    Frames,
    /// Not HTTP/2 (HTTP/1.1): nothing to count.
    Off,
}

/// The budget is spent.
#[derive(Debug, PartialEq, Eq)]
pub struct Flood;

impl Scan {
    pub fn new(now: Instant) -> Self {
        Self {
            state: State::Preface(0),
            read: Frames::default(),
            written: Frames::default(),
            answered: false,
            tokens: BURST,
            refilled: now,
        }
    }

    /// Takes in bytes the client sent.
    pub fn saw(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), Flood> {
        if let State::Preface(matched) = self.state {
            let n = (PREFACE.len() - matched).min(bytes.len());
            self.state = if bytes[..n] != PREFACE[matched..matched + n] {
                State::Off
            } else if matched + n == PREFACE.len() {
                State::Frames
            } else {
                State::Preface(matched + n)
            };
            bytes = &bytes[n..];
        }
        if self.state != State::Frames {
            return Ok(());
        }
        let Self { read, answered, tokens, refilled, .. } = self;
        read.feed(bytes, |kind, flags| {
            if flags & ACK != 0 {
                return Ok(());
            }
            let free = match kind {
                PING => std::mem::take(answered),
                SETTINGS => false,
                _ => return Ok(()),
            };
            if free { Ok(()) } else { spend(tokens, refilled, now) }
        })
    }

    /// Takes in bytes the waypoint wrote (accepted by the connection).
    pub fn wrote(&mut self, bytes: &[u8]) {
        if self.state != State::Frames {
            return;
        }
        let Self { written, answered, .. } = self;
        let _ = written.feed(bytes, |kind, _| {
            if matches!(kind, DATA | HEADERS) {
                *answered = true;
            }
            Ok(())
        });
    }
}

/// Takes a token, refilled at [`RATE`] up to [`BURST`].
fn spend(tokens: &mut f64, refilled: &mut Instant, now: Instant) -> Result<(), Flood> {
    let elapsed = now.saturating_duration_since(*refilled).as_secs_f64();
    *refilled = now;
    *tokens = (*tokens + elapsed * RATE).min(BURST);
    if *tokens < 1.0 {
        return Err(Flood);
    }
    *tokens -= 1.0;
    Ok(())
}

/// A downstream connection under a [`Scan`].
pub struct Guard<I> {
    inner: I,
    scan: Scan,
}

impl<I> Guard<I> {
    pub fn new(inner: I) -> Self {
        Self { inner, scan: Scan::new(Instant::now()) }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Guard<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.scan.state == State::Off {
            return Poll::Ready(Ok(()));
        }
        if this.scan.saw(&buf.filled()[before..], Instant::now()).is_err() {
            warn!(burst = BURST, per_second = RATE, "HTTP/2 PING/SETTINGS flood: connection closed");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "HTTP/2 PING/SETTINGS flood")));
        }
        Poll::Ready(Ok(()))
    }
}

/// Not vectored: the keepalive timer around the guard writes one buffer at a time
/// anyway, and the default vectored write comes through [`Self::poll_write`], so every
/// byte written is scanned there.
impl<I: AsyncWrite + Unpin> AsyncWrite for Guard<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        this.scan.wrote(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len().to_be_bytes();
        let mut out = vec![len[5], len[6], len[7], kind, flags, 0, 0, 0, 0];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_ping_flood_is_stopped_after_the_burst_and_a_steady_rate_is_not() {
        let start = Instant::now();
        let mut scan = Scan::new(start);
        scan.saw(PREFACE, start).unwrap();
        scan.saw(&frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100]), start).unwrap();
        let ping = frame(PING, 0, &[7; 8]);
        // The burst, less the SETTINGS frame, passes; the next PING does not.
        for _ in 1..BURST as usize {
            scan.saw(&ping, start).unwrap();
        }
        assert_eq!(scan.saw(&ping, start), Err(Flood));
        // At the sustained rate, a connection goes on for ever.
        let mut scan = Scan::new(start);
        scan.saw(PREFACE, start).unwrap();
        for i in 0..10 * BURST as u64 {
            let now = start + Duration::from_millis(i * 1000 / RATE as u64);
            scan.saw(&ping, now).unwrap();
        }
    }

    /// gRPC's bandwidth probe: a PING after each message the waypoint sends, far
    /// beyond the budget, is never cut off; PINGs with no data between them are.
    #[test]
    fn a_ping_after_each_burst_of_data_the_waypoint_sent_is_free() {
        let start = Instant::now();
        let mut scan = Scan::new(start);
        scan.saw(PREFACE, start).unwrap();
        scan.wrote(&frame(SETTINGS, 0, &[]));
        let ping = frame(PING, 0, &[7; 8]);
        let message = [frame(HEADERS, 0x4, &[0x88]), frame(DATA, 0, &[0; 20])].concat();
        for _ in 0..10 * BURST as usize {
            // Written in pieces, as a connection may accept them.
            let (a, b) = message.split_at(5);
            scan.wrote(a);
            scan.wrote(b);
            scan.saw(&ping, start).unwrap();
        }
        // One message, then PINGs only: the first is free, the burst follows.
        scan.wrote(&message);
        for _ in 0..=BURST as usize {
            scan.saw(&ping, start).unwrap();
        }
        assert_eq!(scan.saw(&ping, start), Err(Flood));
    }

    #[test]
    fn acks_data_and_headers_cost_nothing_whatever_the_read_boundaries() {
        let start = Instant::now();
        let mut scan = Scan::new(start);
        let mut stream = PREFACE.to_vec();
        for _ in 0..3 * BURST as usize {
            stream.extend(frame(PING, ACK, &[1; 8]));
            stream.extend(frame(SETTINGS, ACK, &[]));
            // DATA whose payload looks like PING frame headers: skipped, not read.
            stream.extend(frame(0x0, 0, &frame(PING, 0, &[2; 8])));
            stream.extend(frame(0x1, 0x4, &[0x82]));
        }
        stream.extend(frame(PING, 0, &[3; 8]));
        // Fed one to 13 bytes at a time: frame headers split anywhere.
        let mut rest = &stream[..];
        let mut step = 1;
        while !rest.is_empty() {
            let n = step.min(rest.len());
            scan.saw(&rest[..n], start).unwrap();
            rest = &rest[n..];
            step = step % 13 + 1;
        }
        assert!((scan.tokens - (BURST - 1.0)).abs() < 1e-9, "only the last, unacknowledged PING counted");
    }

    #[test]
    fn http1_is_not_scanned() {
        let start = Instant::now();
        let mut scan = Scan::new(start);
        scan.saw(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", start).unwrap();
        assert_eq!(scan.state, State::Off);
        // A preface split across reads is still found.
        let mut scan = Scan::new(start);
        scan.saw(&PREFACE[..5], start).unwrap();
        scan.saw(&PREFACE[5..], start).unwrap();
        assert_eq!(scan.state, State::Frames);
    }
}
