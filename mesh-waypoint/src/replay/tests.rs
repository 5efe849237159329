use std::{
    collections::VecDeque,
    sync::atomic::{AtomicUsize, Ordering},
};

use http::HeaderMap;
use http_body::Body as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::*;

/// A chunked upload: frames ready one after the other, its length unknown, and a
/// count of the frames read from it (the source must be read once, whatever the tries).
struct Chunks {
    parts: VecDeque<Bytes>,
    reads: Arc<AtomicUsize>,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let next = this.parts.pop_front();
        if next.is_some() {
            this.reads.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(next.map(|b| Ok(Frame::data(b))))
    }
}

fn chunks(parts: &[&[u8]]) -> (Body, Arc<AtomicUsize>) {
    let reads = Arc::new(AtomicUsize::new(0));
    let body = Chunks { parts: parts.iter().map(|p| Bytes::copy_from_slice(p)).collect(), reads: reads.clone() };
    (body.boxed(), reads)
}

/// Reads `n` frames of `body` (a try that failed part way through the upload).
async fn read_frames(body: &mut Body, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n {
        match body.frame().await {
            Some(Ok(frame)) => out.extend_from_slice(frame.data_ref().map_or(&[][..], |d| d)),
            Some(Err(e)) => panic!("{e}"),
            None => break,
        }
    }
    out
}

#[tokio::test]
async fn a_retry_after_a_partly_sent_body_gets_all_of_it_once() {
    let (body, reads) = chunks(&[b"ab", b"cd", b"ef"]);
    let recording = Recording::new(body, MAX_KEPT);
    let mut first = recording.next_try().unwrap();
    assert_eq!(read_frames(&mut first, 2).await, b"abcd");
    drop(first); // the upstream failed
    assert!(recording.can_replay());
    let second = recording.next_try().unwrap();
    assert_eq!(second.collect().await.unwrap().to_bytes(), "abcdef");
    assert_eq!(reads.load(Ordering::Relaxed), 3, "each frame read once from the source");
}

#[tokio::test]
async fn trailers_are_replayed() {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-timeout", "1S".parse().unwrap());
    let (tx, rx) = mpsc::unbounded_channel::<Frame<Bytes>>();
    tx.send(Frame::data(Bytes::from_static(b"msg"))).unwrap();
    tx.send(Frame::trailers(trailers.clone())).unwrap();
    drop(tx);
    let recording = Recording::new(Channel(rx).boxed(), MAX_KEPT);
    let first = recording.next_try().unwrap().collect().await.unwrap();
    assert_eq!(first.trailers(), Some(&trailers));
    let second = recording.next_try().unwrap().collect().await.unwrap();
    assert_eq!(second.trailers(), Some(&trailers));
    assert_eq!(second.to_bytes(), "msg");
}

#[tokio::test]
async fn a_body_over_the_bound_is_sent_whole_and_not_retried() {
    let (body, _) = chunks(&[b"0123456789", b"0123456789", b"0123456789"]);
    let recording = Recording::new(body, 25);
    let first = recording.next_try().unwrap();
    assert_eq!(first.collect().await.unwrap().to_bytes().len(), 30, "the try itself is not cut short");
    assert!(recording.overflowed());
    assert!(!recording.can_replay());
    assert!(recording.next_try().is_none());
    // Exactly at the bound: kept.
    let (body, _) = chunks(&[b"0123456789", b"01234"]);
    let recording = Recording::new(body, 15);
    recording.next_try().unwrap().collect().await.unwrap();
    assert!(recording.can_replay());
    assert_eq!(recording.next_try().unwrap().collect().await.unwrap().to_bytes(), "012345678901234");
}

#[tokio::test]
async fn a_superseded_try_ends_with_an_error() {
    let (tx, rx) = mpsc::unbounded_channel::<Frame<Bytes>>();
    tx.send(Frame::data(Bytes::from_static(b"ab"))).unwrap();
    let recording = Recording::new(Channel(rx).boxed(), MAX_KEPT);
    let mut first = recording.next_try().unwrap();
    assert_eq!(read_frames(&mut first, 1).await, b"ab");
    // The first try waits for more of the upload when the retry starts: it is woken
    // and ends, so a connection still sending it lets go.
    let waiting = tokio::spawn(async move { first.frame().await.map(|r| r.map(|_| ())) });
    tokio::task::yield_now().await;
    let second = recording.next_try().unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
    let err = ended.unwrap().unwrap_err();
    assert!(err.to_string().contains("superseded"), "{err}");
    tx.send(Frame::data(Bytes::from_static(b"cd"))).unwrap();
    drop(tx);
    assert_eq!(second.collect().await.unwrap().to_bytes(), "abcd");
}

#[tokio::test]
async fn a_failed_upload_is_not_retried() {
    let (tx, rx) = mpsc::unbounded_channel::<Frame<Bytes>>();
    tx.send(Frame::data(Bytes::from_static(b"ab"))).unwrap();
    drop(tx);
    let recording = Recording::new(Failing(Some(Channel(rx))).boxed(), MAX_KEPT);
    assert!(recording.next_try().unwrap().collect().await.is_err());
    assert!(!recording.can_replay());
    assert!(recording.next_try().is_none());
}

#[tokio::test]
async fn settling_releases_what_was_sent_and_keeps_what_was_not() {
    let (body, _) = chunks(&[b"ab", b"cd", b"ef"]);
    let recording = Recording::new(body, MAX_KEPT);
    let mut first = recording.next_try().unwrap();
    read_frames(&mut first, 3).await;
    drop(first);
    let mut second = recording.next_try().unwrap();
    assert_eq!(read_frames(&mut second, 1).await, b"ab");
    recording.settle();
    assert!(!recording.can_replay(), "no more tries once settled");
    assert_eq!(lock(&recording.state).kept.len(), 2, "the sent frame is released");
    assert_eq!(second.collect().await.unwrap().to_bytes(), "cdef");
    assert_eq!(lock(&recording.state).kept_bytes, 0);
}

#[tokio::test]
async fn size_hints_add_the_unsent_copy_to_the_rest() {
    let body = Full::new(Bytes::from_static(b"abcdef")).map_err(|never| match never {}).boxed();
    let recording = Recording::new(body, MAX_KEPT);
    let first = recording.next_try().unwrap();
    assert_eq!(first.size_hint().exact(), Some(6));
    first.collect().await.unwrap();
    let second = recording.next_try().unwrap();
    assert_eq!(second.size_hint().exact(), Some(6));
    assert!(!second.is_end_stream());
    assert_eq!(second.collect().await.unwrap().to_bytes(), "abcdef");
}

/// Frames from a channel, the end when the sender goes.
pub(crate) struct Channel(pub(crate) mpsc::UnboundedReceiver<Frame<Bytes>>);

impl http_body::Body for Channel {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut().0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// The frames of a channel, then an error (the client went away mid-upload).
struct Failing(Option<Channel>);

impl http_body::Body for Failing {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = &mut this.0 else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.0 = None;
                Poll::Ready(Some(Err("client went away".into())))
            }
            other => other,
        }
    }
}

/// An upstream that reads the request head and part of a chunked body, then closes
/// without answering (a reset before headers).
async fn failing_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0; 64 << 10];
        let _ = socket.read(&mut buf).await;
        let _ = socket.shutdown().await;
    });
    addr
}

/// An upstream that answers each request with its body, and says in `x-chunked`
/// whether it came chunked.
async fn good_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let service = service_fn(|request: Request<Incoming>| async move {
            let chunked = request.headers().contains_key(http::header::TRANSFER_ENCODING);
            let bytes = request.into_body().collect().await?.to_bytes();
            let mut response = Response::new(Full::new(bytes));
            response.headers_mut().insert("x-chunked", if chunked { "yes" } else { "no" }.parse().unwrap());
            Ok::<_, hyper::Error>(response)
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(socket), service).await;
    });
    addr
}

/// Sends one try of `recording` to `addr` with hyper's HTTP/1.1 client.
async fn send(addr: std::net::SocketAddr, recording: &Recording) -> Result<Response<Incoming>, hyper::Error> {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let request = Request::post("/upload").header("host", "up").body(recording.next_try().unwrap()).unwrap();
    sender.send_request(request).await
}

/// A chunked upload of 300 KiB in 1 KiB frames as it arrives from a client, a first
/// upstream that fails part way, then a good one: the retry carries the same bytes,
/// chunked again.
#[tokio::test]
async fn a_streamed_upload_is_retried_on_a_second_upstream_with_the_same_bytes() {
    let (tx, rx) = mpsc::unbounded_channel::<Frame<Bytes>>();
    let upload: Vec<u8> = (0..300u32 << 10).map(|i| u8::try_from(i * 7 % 251).unwrap()).collect();
    let feeder = {
        let upload = upload.clone();
        tokio::spawn(async move {
            for part in upload.chunks(1024) {
                if tx.send(Frame::data(Bytes::copy_from_slice(part))).is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let recording = Recording::new(Channel(rx).boxed(), MAX_KEPT);
    let failed = send(failing_upstream().await, &recording).await;
    assert!(failed.is_err(), "the first upstream answers nothing");
    assert!(recording.can_replay());
    let response = send(good_upstream().await, &recording).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-chunked"], "yes");
    feeder.await.unwrap();
    let answer = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(answer.len(), upload.len());
    assert!(answer == upload, "the retry carried other bytes");
}

proptest! {
    /// Whatever the frames, the bound and how far the first try got: a retry gets
    /// exactly the body when it fits the bound, and no retry is offered when it does not.
    #[test]
    fn a_retry_is_the_whole_body_or_none(
        parts in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..20), 0..12),
        limit in 0usize..150,
        cut in 0usize..14,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let whole: Vec<u8> = parts.concat();
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let (body, reads) = chunks(&refs);
        let recording = Recording::new(body, limit);
        let mut first = recording.next_try().unwrap();
        let sent = runtime.block_on(read_frames(&mut first, cut));
        prop_assert!(whole.starts_with(&sent));
        drop(first);
        let read: usize = parts.iter().take(cut).map(Vec::len).sum();
        if read > limit {
            prop_assert!(recording.next_try().is_none());
        } else {
            let second = recording.next_try().unwrap();
            let bytes = runtime.block_on(second.collect()).unwrap().to_bytes();
            prop_assert_eq!(bytes.len(), whole.len());
            prop_assert_eq!(&bytes[..], &whole[..]);
        }
        prop_assert!(reads.load(Ordering::Relaxed) <= parts.len());
    }
}
