//! Copies of a streamed request body for mirrors, as Envoy's shadowing does: the
//! request goes on at its own pace and each mirror gets the same frames as they pass.
//! A mirror that falls behind by more than a bound (Envoy resets a shadow stream whose
//! buffer overflows) or a request body that fails makes that copy end with an error, so
//! the mirror request is aborted, never sent truncated as if complete.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as _, Frame};
use http_body_util::BodyExt as _;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::upstream::{Body, BoxError, copy_frame, frame_len};

/// How far a mirror may fall behind the request, in bytes (Envoy's default
/// per-connection buffer limit).
pub const MAX_BEHIND: usize = 1 << 20;

/// Why a mirror's copy of the body ended early.
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    #[error("the mirror fell more than {limit} bytes behind the request; mirror aborted")]
    Overflow { limit: usize },
    #[error("the request body failed; mirror aborted")]
    Source,
}

/// `body` for the request, and `copies` bodies that yield the same frames.
/// A copy that falls too far behind is counted in `abandoned` (Envoy's
/// `retry_or_shadow_abandoned`).
pub fn tee(body: Body, copies: usize, max_behind: usize, abandoned: &Counter) -> (Body, Vec<Body>) {
    let mut taps = Vec::with_capacity(copies);
    let mut outs = Vec::with_capacity(copies);
    for _ in 0..copies {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            failed: AtomicU8::new(OK),
            max_behind,
            abandoned: abandoned.clone(),
        });
        taps.push(Tap { tx: Some(tx), shared: shared.clone() });
        outs.push(Copy { rx, shared }.boxed());
    }
    (Tee { inner: body, taps }.boxed(), outs)
}

const OK: u8 = 0;
const OVERFLOW: u8 = 1;
const SOURCE: u8 = 2;

struct Shared {
    /// Bytes sent to the copy and not yet read from it.
    queued: AtomicUsize,
    /// Set before the sender goes when the copy must end with an error: [`OVERFLOW`]
    /// or [`SOURCE`] ([`OK`]: not failed).
    failed: AtomicU8,
    max_behind: usize,
    abandoned: Counter,
}

struct Tap {
    tx: Option<mpsc::UnboundedSender<Frame<Bytes>>>,
    shared: Arc<Shared>,
}

impl Tap {
    fn send(&mut self, frame: &Frame<Bytes>) {
        let Some(tx) = &self.tx else { return };
        let Some(copy) = copy_frame(frame) else { return };
        let len = frame_len(&copy);
        if self.shared.queued.fetch_add(len, Ordering::Relaxed) + len > self.shared.max_behind {
            self.shared.abandoned.inc();
            return self.fail(OVERFLOW);
        }
        if tx.send(copy).is_err() {
            // The mirror request is gone (it failed or finished): nothing to feed.
            self.tx = None;
        }
    }

    fn fail(&mut self, why: u8) {
        self.shared.failed.store(why, Ordering::Release);
        self.tx = None;
    }
}

/// The request's body, feeding the taps.
struct Tee {
    inner: Body,
    taps: Vec<Tap>,
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => this.taps.iter_mut().for_each(|t| t.send(frame)),
            Poll::Ready(Some(Err(_))) => this.taps.iter_mut().for_each(|t| t.fail(SOURCE)),
            // The end: dropping the senders ends the copies cleanly.
            Poll::Ready(None) => this.taps.iter_mut().for_each(|t| t.tx = None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    /// A request abandoned before its end leaves its copies incomplete.
    fn drop(&mut self) {
        if !self.inner.is_end_stream() {
            self.taps.iter_mut().filter(|t| t.tx.is_some()).for_each(|t| t.fail(SOURCE));
        }
    }
}

/// One mirror's copy.
struct Copy {
    rx: mpsc::UnboundedReceiver<Frame<Bytes>>,
    shared: Arc<Shared>,
}

impl http_body::Body for Copy {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.shared.queued.fetch_sub(data.len(), Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => match this.shared.failed.load(Ordering::Acquire) {
                OK => Poll::Ready(None),
                OVERFLOW => Poll::Ready(Some(Err(TeeError::Overflow { limit: this.shared.max_behind }.into()))),
                _ => Poll::Ready(Some(Err(TeeError::Source.into()))),
            },
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body_util::Full;

    use super::*;

    /// Frames ready one after the other, the end not announced early (like a
    /// chunked upload).
    struct Chunks(VecDeque<Bytes>);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunks(parts: &[&'static [u8]]) -> Body {
        Chunks(parts.iter().map(|p| Bytes::from_static(p)).collect()).boxed()
    }

    #[tokio::test]
    async fn copies_get_every_frame() {
        let (main, copies) = tee(chunks(&[b"ab", b"cd", b"ef"]), 2, MAX_BEHIND, &Counter::default());
        assert_eq!(main.collect().await.unwrap().to_bytes(), "abcdef");
        for copy in copies {
            assert_eq!(copy.collect().await.unwrap().to_bytes(), "abcdef");
        }
    }

    #[tokio::test]
    async fn a_copy_too_far_behind_fails_instead_of_ending_short() {
        let abandoned = Counter::default();
        let (main, mut copies) = tee(chunks(&[b"0123456789", b"0123456789"]), 1, 15, &abandoned);
        assert_eq!(main.collect().await.unwrap().to_bytes().len(), 20, "the request is not held back");
        let err = copies.pop().unwrap().collect().await.unwrap_err();
        assert!(err.to_string().contains("fell more than 15 bytes behind"), "{err}");
        assert_eq!(abandoned.get(), 1, "counted once");
    }

    #[tokio::test]
    async fn an_abandoned_request_fails_its_copies() {
        let (main, mut copies) = tee(chunks(&[b"ab", b"cd"]), 1, MAX_BEHIND, &Counter::default());
        drop(main);
        let err = copies.pop().unwrap().collect().await.unwrap_err();
        assert!(err.to_string().contains("request body failed"), "{err}");
        // A complete empty body is not abandoned.
        let empty = Full::new(Bytes::new()).map_err(|never| match never {}).boxed();
        let (main, mut copies) = tee(empty, 1, MAX_BEHIND, &Counter::default());
        drop(main);
        assert!(copies.pop().unwrap().collect().await.is_ok());
    }
}
