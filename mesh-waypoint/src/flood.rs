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
//! skipped, nothing is copied). Once the client's budget is spent, it stops reading,
//! lets the stack finish the frame (or header block) it is writing, writes a GOAWAY
//! with `ENHANCE_YOUR_CALM` itself, ends the stream, and then fails the connection's
//! I/O so that the stack closes it (the stack has no way to be told to send that
//! GOAWAY; its own goes out only for errors it finds itself). A client that does not
//! read gets [`CLOSE_WITHIN`] for that, then is cut off without it.
//!
//! A PING that follows DATA or HEADERS the waypoint wrote is free (the frames it
//! writes are read the same way): gRPC clients probe the bandwidth with one after
//! each burst they receive. Other connections are not affected. Rapid reset and
//! CONTINUATION floods are the stack's own limits.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Duration, Instant, Sleep},
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
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// `ENHANCE_YOUR_CALM` (RFC 9113, section 7).
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The GOAWAY's debug data: why, for the client's logs.
const WHY: &[u8] = b"PING/SETTINGS flood";
const GOAWAY_LEN: usize = FRAME_HEADER + 8 + WHY.len();
/// How long the close may wait for the stack's frame under way and for room for the
/// GOAWAY: a client that does not read gets no more, and is cut off without it.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

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
    /// Takes in `bytes`; `header` gets each completed frame header's type, flags and
    /// stream id.
    fn feed(
        &mut self,
        mut bytes: &[u8],
        mut header: impl FnMut(u8, u8, u32) -> Result<(), Flood>,
    ) -> Result<(), Flood> {
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
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                header(head[3], head[4], stream)?;
            }
        }
        Ok(())
    }

    /// Bytes to the end of the current frame (or of its header, while the header is
    /// incomplete): 0 between frames.
    fn to_boundary(&self) -> usize {
        if self.have > 0 { FRAME_HEADER - self.have } else { self.skip }
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
    /// The highest stream the client opened, of the bytes the stack was given: the
    /// GOAWAY's last stream id.
    last_stream: u32,
    /// A header block the stack is writing has not ended: a CONTINUATION follows, and
    /// no other frame may come between (RFC 9113, section 6.10).
    writing_block: bool,
    /// The stack wrote a GOAWAY of its own (a drain): the guard sends none after it,
    /// as a second GOAWAY must not name a higher stream, and the stack's id is unknown.
    wrote_goaway: bool,
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
            last_stream: 0,
            writing_block: false,
            wrote_goaway: false,
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
        // Streams opened in bytes that end in a flood count for nothing: the stack
        // never gets those bytes.
        let mut opened = self.last_stream;
        let Self { read, answered, tokens, refilled, .. } = self;
        read.feed(bytes, |kind, flags, stream| {
            if kind == HEADERS && stream % 2 == 1 {
                opened = opened.max(stream);
            }
            if flags & ACK != 0 {
                return Ok(());
            }
            let free = match kind {
                PING => std::mem::take(answered),
                SETTINGS => false,
                _ => return Ok(()),
            };
            if free { Ok(()) } else { spend(tokens, refilled, now) }
        })?;
        self.last_stream = opened;
        Ok(())
    }

    /// Takes in bytes the waypoint wrote (accepted by the connection).
    pub fn wrote(&mut self, bytes: &[u8]) {
        if self.state != State::Frames {
            return;
        }
        let Self { written, answered, writing_block, wrote_goaway, .. } = self;
        let _ = written.feed(bytes, |kind, flags, _| {
            if matches!(kind, DATA | HEADERS) {
                *answered = true;
            }
            if matches!(kind, HEADERS | PUSH_PROMISE | CONTINUATION) {
                *writing_block = flags & END_HEADERS == 0;
            }
            *wrote_goaway |= kind == GOAWAY;
            Ok(())
        });
    }

    /// Bytes the stack must still write before a frame of the guard's may go: the
    /// rest of the frame under way, or, inside a header block, the next frame's head
    /// (then, from that head, the rest of that frame); 0 between frames.
    fn write_allowance(&self) -> usize {
        match self.written.to_boundary() {
            0 if self.writing_block => FRAME_HEADER,
            n => n,
        }
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
    closing: Option<Closing>,
}

/// The close of a flooding connection.
struct Closing {
    /// The GOAWAY and how much of it went out; `None` when the stack sent its own.
    goaway: Option<([u8; GOAWAY_LEN], usize)>,
    /// Past this the connection fails as it stands ([`CLOSE_WITHIN`]).
    deadline: Pin<Box<Sleep>>,
}

impl<I> Guard<I> {
    pub fn new(inner: I) -> Self {
        Self { inner, scan: Scan::new(Instant::now()), closing: None }
    }
}

fn flood_error() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "HTTP/2 PING/SETTINGS flood")
}

/// GOAWAY `ENHANCE_YOUR_CALM` naming `last_stream`, with [`WHY`] as its debug data.
fn goaway(last_stream: u32) -> [u8; GOAWAY_LEN] {
    let mut frame = [0; GOAWAY_LEN];
    frame[..3].copy_from_slice(&((GOAWAY_LEN - FRAME_HEADER) as u32).to_be_bytes()[1..]);
    frame[3] = GOAWAY;
    frame[9..13].copy_from_slice(&last_stream.to_be_bytes());
    frame[13..17].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    frame[17..].copy_from_slice(WHY);
    frame
}

impl<I: AsyncWrite + Unpin> Guard<I> {
    /// Writes the GOAWAY once the stack's writes are between frames (and outside a
    /// header block), ends the stream, and yields the error that fails the
    /// connection. While the stack is mid-frame this is pending: the stack writes the
    /// rest of its frame as it flushes, which it does right after a read that is
    /// pending, and `poll_write` wakes the connection at the boundary; the deadline's
    /// timer wakes it in any case.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(closing) = &mut self.closing else { return Poll::Ready(flood_error()) };
        if closing.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(flood_error());
        }
        if let Some((frame, sent)) = &mut closing.goaway {
            if self.scan.write_allowance() > 0 {
                return Poll::Pending;
            }
            while *sent < frame.len() {
                match std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &frame[*sent..])) {
                    Ok(0) => return Poll::Ready(io::ErrorKind::WriteZero.into()),
                    Ok(n) => *sent += n,
                    Err(error) => return Poll::Ready(error),
                }
            }
        }
        if let Err(error) = std::task::ready!(Pin::new(&mut self.inner).poll_flush(cx)) {
            return Poll::Ready(error);
        }
        // Ended, not dropped: a tunnel stream dropped unended is reset, and a reset
        // stream loses what it still holds, the GOAWAY included.
        let _ = std::task::ready!(Pin::new(&mut self.inner).poll_shutdown(cx));
        Poll::Ready(flood_error())
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guard<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closing.is_some() {
            return this.poll_close(cx).map(Err);
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.scan.state == State::Off {
            return Poll::Ready(Ok(()));
        }
        if this.scan.saw(&buf.filled()[before..], Instant::now()).is_err() {
            warn!(burst = BURST, per_second = RATE, "HTTP/2 PING/SETTINGS flood: GOAWAY, connection closed");
            // The stack never sees the flood's bytes.
            buf.set_filled(before);
            this.closing = Some(Closing {
                goaway: (!this.scan.wrote_goaway).then(|| (goaway(this.scan.last_stream), 0)),
                deadline: Box::pin(tokio::time::sleep(CLOSE_WITHIN)),
            });
            return this.poll_close(cx).map(Err);
        }
        Poll::Ready(Ok(()))
    }
}

/// Not vectored: the keepalive timer around the guard writes one buffer at a time
/// anyway, and the default vectored write comes through [`Self::poll_write`], so every
/// byte written is scanned there. Once closing, the stack's writes are admitted to the
/// end of its frame under way (and of its header block) only.
impl<I: AsyncWrite + Unpin> AsyncWrite for Guard<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let mut allowed = data.len();
        if let Some(closing) = &this.closing {
            allowed = if closing.goaway.is_some() { this.scan.write_allowance() } else { 0 };
            if allowed == 0 {
                return this.poll_close(cx).map(Err);
            }
        }
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, &data[..allowed.min(data.len())]))?;
        this.scan.wrote(&data[..n]);
        if this.closing.is_some() && this.scan.write_allowance() == 0 {
            // The stack may have nothing more to write: the read side sends the GOAWAY.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closing.is_some() {
            return self.poll_close(cx).map(Err);
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closing.is_some() {
            return self.poll_close(cx).map(Err);
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::Wake,
    };

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        frame_on(0, kind, flags, payload)
    }

    /// A frame on stream `stream`.
    fn frame_on(stream: u32, kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len().to_be_bytes();
        let mut out = vec![len[5], len[6], len[7], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
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

    /// Reads from a guarded connection until it fails; returns the error.
    async fn read_until_error<I: AsyncRead + AsyncWrite + Unpin>(guard: &mut Guard<I>) -> io::Error {
        let mut buf = [0; 4096];
        loop {
            match guard.read(&mut buf).await {
                Ok(0) => panic!("end of stream, no error"),
                Ok(_) => {}
                Err(error) => return error,
            }
        }
    }

    /// What a client flooding `guard` reads back once cut off (`preface`: it has not
    /// sent the preface yet).
    async fn flood_then_read_back(client: &mut tokio::io::DuplexStream, preface: bool) -> Vec<u8> {
        let mut flood = if preface { PREFACE.to_vec() } else { Vec::new() };
        flood.extend(frame_on(7, HEADERS, 0x5, &[0x82]));
        for _ in 0..2 * BURST as usize {
            flood.extend(frame(PING, 0, &[7; 8]));
        }
        client.write_all(&flood).await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        back
    }

    /// Past the budget the client reads a GOAWAY `ENHANCE_YOUR_CALM` naming its last
    /// stream, then the end of the stream; the stack reads an error.
    #[tokio::test]
    async fn a_flooding_client_gets_a_goaway_and_the_end_of_the_stream() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guard = Guard::new(server);
        let both = async { tokio::join!(flood_then_read_back(&mut client, true), read_until_error(&mut guard)) };
        let (back, error) = tokio::time::timeout(Duration::from_secs(10), both).await.expect("cut off and ended");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert_eq!(back, goaway(7), "{back:?}");
        assert_eq!(&back[..9], &[0, 0, 27, GOAWAY, 0, 0, 0, 0, 0]);
        assert_eq!(&back[9..17], &[0, 0, 0, 7, 0, 0, 0, 11]);
    }

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A flood found while the stack is mid-frame (`under_way` written, `rest` of it
    /// not yet): the read waits, the stack's write is admitted to the end of that
    /// frame only, which wakes the connection, and the GOAWAY follows it.
    async fn goaway_after(under_way: &[u8], rest: &[u8]) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guard = Guard::new(server);
        let settings = frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100]);
        client.write_all(PREFACE).await.unwrap();
        let mut preface = [0; 24];
        guard.read_exact(&mut preface).await.unwrap();
        guard.write_all(&settings).await.unwrap();
        guard.write_all(under_way).await.unwrap();
        let back = tokio::spawn(async move { flood_then_read_back(&mut client, false).await });
        let waiting = tokio::time::timeout(Duration::from_millis(200), read_until_error(&mut guard)).await;
        assert!(waiting.is_err(), "the read waits for the frame under way");
        // The rest goes out, the next frame does not; reaching the boundary wakes the
        // connection, whose read then sends the GOAWAY.
        let next = [rest, &frame(PING, ACK, &[7; 8])[..]].concat();
        let counter = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&counter));
        let mut cx = Context::from_waker(&waker);
        let mut written = 0;
        while written < rest.len() {
            match Pin::new(&mut guard).poll_write(&mut cx, &next[written..]) {
                Poll::Ready(Ok(n)) => written += n,
                other => panic!("{other:?} after {written} bytes"),
            }
        }
        assert_eq!(written, rest.len(), "admitted to the end of the frame, no further");
        assert_eq!(counter.0.load(Ordering::Relaxed), 1, "woken at the boundary");
        assert_eq!(guard.write(&next[written..]).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(read_until_error(&mut guard).await.kind(), io::ErrorKind::InvalidData);
        let back = tokio::time::timeout(Duration::from_secs(10), back).await.expect("ended").unwrap();
        assert_eq!(back, [&settings[..], under_way, rest, &goaway(7)[..]].concat());
    }

    #[tokio::test]
    async fn the_goaway_waits_for_the_frame_being_written() {
        let data = frame(DATA, 0, &[1; 40]);
        goaway_after(&data[..20], &data[20..]).await;
        // Mid-head, too.
        goaway_after(&data[..4], &data[4..]).await;
    }

    /// A header block is one frame to the guard: no GOAWAY between a HEADERS without
    /// `END_HEADERS` and its CONTINUATIONs, however the writes fall.
    #[tokio::test]
    async fn the_goaway_waits_for_the_header_block_being_written() {
        let headers = frame(HEADERS, 0, &[0x88; 30]);
        let continuation = frame(CONTINUATION, 0, &[0x88; 12]);
        let last = frame(CONTINUATION, END_HEADERS, &[0x88; 7]);
        goaway_after(&headers, &[&continuation[..], &last[..]].concat()).await;
        goaway_after(&[&headers[..], &continuation[..5]].concat(), &[&continuation[5..], &last[..]].concat()).await;
        let mut scan = Scan::new(Instant::now());
        scan.saw(PREFACE, Instant::now()).unwrap();
        scan.wrote(&headers);
        assert_eq!(scan.write_allowance(), FRAME_HEADER);
        scan.wrote(&last[..FRAME_HEADER]);
        assert_eq!(scan.write_allowance(), 7);
        scan.wrote(&last[FRAME_HEADER..]);
        assert_eq!(scan.write_allowance(), 0);
    }

    /// The stack's own GOAWAY (a drain) gets none after it; streams opened in the
    /// bytes that held the flood are not named, the stack never got them.
    #[tokio::test]
    async fn no_second_goaway_and_only_streams_the_stack_got() {
        let start = Instant::now();
        let mut scan = Scan::new(start);
        scan.saw(PREFACE, start).unwrap();
        scan.saw(&frame_on(3, HEADERS, END_HEADERS, &[0x82]), start).unwrap();
        let mut flood = frame_on(5, HEADERS, END_HEADERS, &[0x82]);
        for _ in 0..2 * BURST as usize {
            flood.extend(frame(PING, 0, &[7; 8]));
        }
        assert_eq!(scan.saw(&flood, start), Err(Flood));
        assert_eq!(scan.last_stream, 3);
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guard = Guard::new(server);
        client.write_all(PREFACE).await.unwrap();
        let mut preface = [0; 24];
        guard.read_exact(&mut preface).await.unwrap();
        let drain = frame(GOAWAY, 0, &[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        guard.write_all(&drain).await.unwrap();
        let both = async { tokio::join!(flood_then_read_back(&mut client, false), read_until_error(&mut guard)) };
        let (back, error) = tokio::time::timeout(Duration::from_secs(10), both).await.expect("cut off and ended");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert_eq!(back, drain, "the stack's GOAWAY only");
    }

    /// A client that does not read cannot hold the close: past [`CLOSE_WITHIN`] the
    /// connection fails without the GOAWAY.
    #[tokio::test]
    async fn a_client_that_does_not_read_is_cut_off_without_the_goaway() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut guard = Guard::new(server);
        client.write_all(PREFACE).await.unwrap();
        let mut preface = [0; 24];
        guard.read_exact(&mut preface).await.unwrap();
        // The stack's frames fill what the client would read.
        guard.write_all(&frame(DATA, 0, &[1; 55])).await.unwrap();
        let flooding = tokio::spawn(async move {
            let mut flood = Vec::new();
            for _ in 0..2 * BURST as usize {
                flood.extend(frame(PING, 0, &[7; 8]));
            }
            let _ = client.write_all(&flood).await;
            client
        });
        let started = std::time::Instant::now();
        let error = tokio::time::timeout(Duration::from_secs(10), read_until_error(&mut guard)).await.expect("cut off");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(started.elapsed() + Duration::from_millis(50) >= CLOSE_WITHIN, "{:?}", started.elapsed());
        flooding.abort();
    }
}
