//! One tunnel stream as a byte stream: HTTP/2 DATA frames in, DATA frames out, end
//! of stream as a half-close. The relay reads and writes it from its own task; the
//! `h2` connection task only moves frames.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received data not yet read.
    pending: Bytes,
    sent_end: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv, pending: Bytes::new(), sent_end: false }
    }
}

fn into_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        return error.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    let kind = match error.reason() {
        Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, error)
}

impl H2Stream {
    /// The next received DATA (empty at end of stream): the buffered rest first.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(std::mem::take(&mut self.pending)));
        }
        match ready!(self.recv.poll_data(cx)) {
            Some(Ok(data)) => {
                // Return the window to the peer as soon as the bytes are ours: the
                // relay holds at most one read's worth.
                let _ = self.recv.flow_control().release_capacity(data.len());
                Poll::Ready(Ok(data))
            }
            Some(Err(error)) => Poll::Ready(Err(into_io(error))),
            None => Poll::Ready(Ok(Bytes::new())),
        }
    }

    /// Waits for send capacity for up to `len` bytes and returns how many may go.
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(len);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => {}
                Some(Ok(capacity)) => return Poll::Ready(Ok(capacity.min(len))),
                Some(Err(error)) => return Poll::Ready(Err(into_io(error))),
                // The stream was reset or the connection went away.
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut data = ready!(self.poll_data(cx))?;
        let n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        data.advance(n);
        self.pending = data;
        Poll::Ready(Ok(()))
    }
}

/// The relay takes DATA frames as they came and hands owned bytes to `send_data`:
/// no copy between the tunnel and the socket on the other side.
impl crate::relay::Side for H2Stream {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        Some(self.poll_data(cx))
    }

    fn poll_send_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        if data.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(self.poll_send_capacity(cx, data.len()))?;
        self.send.send_data(data.split_to(n), false).map_err(into_io)?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, data.len()))?;
        self.send.send_data(Bytes::copy_from_slice(&data[..n]), false).map_err(into_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames go out as the connection task writes them.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.sent_end {
            self.sent_end = true;
            self.send.send_data(Bytes::new(), true).map_err(into_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
