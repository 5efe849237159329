//! A streamed request body kept for retries, as Envoy's router keeps one: the body goes
//! upstream as it arrives, and a copy of what has passed is kept up to a bound (Envoy's
//! per-request buffer limit, 1 MiB by default). A retry's body is the kept copy, then the
//! rest of the body as it keeps arriving. A body that outgrows the bound is no longer
//! kept and its request is not retried (Envoy counts that as
//! `retry_or_shadow_abandoned`); a body whose source failed is not retried either.
//!
//! Only one try reads at a time: starting the next try ends the previous try's body
//! with an error (and wakes it, so a connection still sending it lets go), and frames
//! the previous try pulled from the source are in the copy, so nothing is lost or sent
//! twice to one try.
use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;

use crate::upstream::{Body, BoxError, copy_frame, frame_len};

/// How much of a request body is kept for retries (Envoy's default buffer limit).
pub const MAX_KEPT: usize = 1 << 20;

/// Why a try's body ended early.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("try {superseded} was superseded by a retry; its body ends here")]
    Superseded { superseded: u64 },
    #[error("the request body failed earlier")]
    SourceFailed,
}

/// A request body shared by the tries of one request.
pub struct Recording {
    state: Arc<Mutex<State>>,
}

/// Whether frames read from the source are kept.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Copying {
    Keeping,
    /// The body outgrew the bound: no copy, no retry.
    Overflowed,
    /// No more tries ([`Recording::settle`]).
    Settled,
}

/// How far the source has been read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Open,
    Done,
    Failed,
}

struct State {
    source: Body,
    read: Source,
    /// Frames read from `source`, while keeping; after, only those the current try has
    /// not sent yet.
    kept: VecDeque<Frame<Bytes>>,
    kept_bytes: usize,
    limit: usize,
    copying: Copying,
    /// The try whose body reads (1 for the first); 0 before the first.
    current: u64,
    /// The next kept frame the current try reads (0 when not keeping: it pops).
    pos: usize,
    /// The waker of the last read that waited, to end a superseded try promptly.
    waiting: Option<Waker>,
}

impl Recording {
    /// Keeps up to `limit` bytes of `body` for retries.
    pub fn new(body: Body, limit: usize) -> Self {
        let state = State {
            source: body,
            kept: VecDeque::new(),
            kept_bytes: 0,
            limit,
            read: Source::Open,
            copying: Copying::Keeping,
            current: 0,
            pos: 0,
            waiting: None,
        };
        Self { state: Arc::new(Mutex::new(state)) }
    }

    /// Whether a next try can have the whole body: nothing was dropped for the bound
    /// and the source has not failed.
    pub fn can_replay(&self) -> bool {
        lock(&self.state).can_replay()
    }

    /// Whether the body outgrew the bound (the request gets no retry).
    pub fn overflowed(&self) -> bool {
        lock(&self.state).copying == Copying::Overflowed
    }

    /// The body of the next try: the kept frames, then the rest of the source. The
    /// previous try's body ends with [`ReplayError::Superseded`]. `None` when a try
    /// already read and [`Recording::can_replay`] is false.
    pub fn next_try(&self) -> Option<Body> {
        let mut state = lock(&self.state);
        if state.current > 0 && !state.can_replay() {
            return None;
        }
        state.current += 1;
        state.pos = 0;
        if let Some(waker) = state.waiting.take() {
            waker.wake();
        }
        Some(TryBody { state: self.state.clone(), attempt: state.current }.boxed())
    }

    /// No more tries: stop keeping. The current try still gets every frame it has not
    /// sent; frames it has sent are released.
    pub fn settle(&self) {
        let mut state = lock(&self.state);
        if state.copying == Copying::Keeping {
            let sent = state.pos;
            state.kept.drain(..sent);
            state.kept_bytes = state.kept.iter().map(frame_len).sum();
            state.pos = 0;
            state.copying = Copying::Settled;
        }
    }
}

/// The shared state; a panic elsewhere while it was held leaves it usable.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    fn can_replay(&self) -> bool {
        self.copying == Copying::Keeping && self.read != Source::Failed
    }
}

/// One try's view of the body.
struct TryBody {
    state: Arc<Mutex<State>>,
    attempt: u64,
}

impl http_body::Body for TryBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // The lock is never held across an await: a poll does not wait.
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        if state.current != self.attempt {
            return Poll::Ready(Some(Err(ReplayError::Superseded { superseded: self.attempt }.into())));
        }
        // Kept frames this try has not sent yet come first.
        if state.copying == Copying::Keeping {
            if let Some(frame) = state.kept.get(state.pos).and_then(copy_frame) {
                state.pos += 1;
                return Poll::Ready(Some(Ok(frame)));
            }
        } else if let Some(frame) = state.kept.pop_front() {
            state.kept_bytes -= frame_len(&frame);
            return Poll::Ready(Some(Ok(frame)));
        }
        match state.read {
            Source::Failed => return Poll::Ready(Some(Err(ReplayError::SourceFailed.into()))),
            Source::Done => return Poll::Ready(None),
            Source::Open => {}
        }
        match Pin::new(&mut state.source).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if state.copying == Copying::Keeping {
                    let len = frame_len(&frame);
                    if state.kept_bytes + len > state.limit {
                        // Every kept frame was sent (the source is read only then):
                        // drop the copy; this request gets no retry.
                        state.kept.clear();
                        state.kept_bytes = 0;
                        state.pos = 0;
                        state.copying = Copying::Overflowed;
                    } else if let Some(kept) = copy_frame(&frame) {
                        state.kept.push_back(kept);
                        state.kept_bytes += len;
                        state.pos += 1;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                state.read = Source::Failed;
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                state.read = Source::Done;
                Poll::Ready(None)
            }
            Poll::Pending => {
                state.waiting = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = lock(&self.state);
        state.current == self.attempt
            && state.pos >= state.kept.len()
            && match state.read {
                Source::Done => true,
                Source::Failed => false,
                Source::Open => state.source.is_end_stream(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        let state = lock(&self.state);
        let unsent: u64 = state.kept.iter().skip(state.pos).map(|k| frame_len(k) as u64).sum();
        if state.read == Source::Done {
            return SizeHint::with_exact(unsent);
        }
        let rest = state.source.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(unsent + rest.lower());
        if let Some(upper) = rest.upper() {
            hint.set_upper(unsent + upper);
        }
        hint
    }
}

#[cfg(test)]
pub(crate) mod tests;
