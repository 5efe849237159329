use std::{
    convert::Infallible,
    io::Write,
    process::{Command, Stdio},
    sync::Mutex,
};

use http_body_util::combinators::BoxBody;
use hyper::{Response, body::Incoming, service::service_fn};

use super::*;

fn span(n: u8, error: bool) -> Span {
    Span {
        trace_id: TraceId([n; 16]),
        span_id: SpanId([n + 1; 8]),
        parent_id: n.is_multiple_of(2).then_some(SpanId([0xab; 8])),
        tracestate: Some("vendor=x".into()),
        name: "reviews.default.svc.cluster.local:9080/*".into(),
        kind: SpanKind::Server,
        start_unix_nanos: 1_700_000_000_000_000_000 + u64::from(n),
        end_unix_nanos: 1_700_000_000_500_000_000,
        attributes: vec![
            ("http.method".into(), AttrValue::Str("GET".into())),
            ("retries".into(), AttrValue::Int(-3)),
            ("sampled".into(), AttrValue::Bool(true)),
        ],
        error,
    }
}

fn origin() -> Origin {
    Origin::proxy("waypoint", "default", "mesh-waypoint", "0.1.0")
}

#[test]
fn varints_are_little_endian_base_128() {
    let mut b = BytesMut::new();
    put_varint(&mut b, 300);
    assert_eq!(&b[..], &[0xac, 0x02]);
    let mut b = BytesMut::new();
    put_varint(&mut b, u64::MAX);
    assert_eq!(b.len(), 10);
}

const DECODE: &str = r#"
import sys, json
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
req = ExportTraceServiceRequest.FromString(sys.stdin.buffer.read())
def val(v):
    k = v.WhichOneof("value")
    return getattr(v, k)
out = []
for rs in req.resource_spans:
    res = {a.key: val(a.value) for a in rs.resource.attributes}
    for ss in rs.scope_spans:
        for s in ss.spans:
            out.append({
                "resource": res, "scope": [ss.scope.name, ss.scope.version],
                "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                "parent": s.parent_span_id.hex(), "trace_state": s.trace_state,
                "name": s.name, "kind": s.kind, "start": s.start_time_unix_nano,
                "end": s.end_time_unix_nano, "status": s.status.code,
                "attrs": {a.key: val(a.value) for a in s.attributes},
            })
print(json.dumps(out))
"#;

fn python_has_otel() -> bool {
    Command::new("python3")
        .args(["-c", "import opentelemetry.proto.collector.trace.v1.trace_service_pb2"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_reference_decoder_reads_what_we_encode() {
    if !python_has_otel() {
        println!("skipped: python3 with opentelemetry-proto is not importable (pip install opentelemetry-proto)");
        return;
    }
    let bytes = encode_export_request(&origin(), &[span(2, true), span(3, false)]);
    let mut child =
        Command::new("python3").args(["-c", DECODE]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the decoder failed");
    let spans: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &spans[0];
    assert_eq!(a["resource"]["service.name"], "waypoint.default");
    assert_eq!(a["scope"], serde_json::json!(["mesh-waypoint", "0.1.0"]));
    assert_eq!(a["trace_id"], "02".repeat(16));
    assert_eq!(a["span_id"], "03".repeat(8));
    assert_eq!(a["parent"], "ab".repeat(8));
    assert_eq!(a["trace_state"], "vendor=x");
    assert_eq!(a["name"], "reviews.default.svc.cluster.local:9080/*");
    assert_eq!(a["kind"], 2);
    assert_eq!(a["start"], 1_700_000_000_000_000_002_u64);
    assert_eq!(a["end"], 1_700_000_000_500_000_000_u64);
    assert_eq!(a["status"], 2);
    assert_eq!(a["attrs"]["http.method"], "GET");
    assert_eq!(a["attrs"]["retries"], -3);
    assert_eq!(a["attrs"]["sampled"], true);
    let b = &spans[1];
    assert_eq!(b["parent"], "");
    assert_eq!(b["status"], 0);
    assert_eq!(spans.as_array().unwrap().len(), 2);
}

/// What the fake collector saw: (path, content-type, body) per request.
type Seen = Arc<Mutex<Vec<(String, String, Bytes)>>>;

async fn collector(grpc: bool, grpc_status: &'static str) -> (u16, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let ct = req.headers().get("content-type").unwrap().to_str().unwrap().to_string();
                        assert_eq!(req.headers().get("x-token").unwrap(), "t", "configured headers are sent");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        seen.lock().unwrap().push((path, ct, body));
                        let response: Response<BoxBody<Bytes, Infallible>> = if grpc {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static(grpc_status));
                            Response::builder()
                                .header("content-type", "application/grpc")
                                .body(
                                    Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))
                                        .with_trailers(async move { Some(Ok(trailers)) })
                                        .boxed(),
                                )
                                .unwrap()
                        } else {
                            Response::new(Full::new(Bytes::new()).boxed())
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let io = TokioIo::new(stream);
                if grpc {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                }
            });
        }
    });
    (port, seen)
}

fn config(port: u16, protocol: Protocol) -> ExporterConfig {
    let mut c = ExporterConfig::new("127.0.0.1", port, protocol, origin());
    c.batch = 3;
    c.interval = Duration::from_millis(50);
    c.timeout = Duration::from_secs(5);
    c.headers = vec![(http::HeaderName::from_static("x-token"), http::HeaderValue::from_static("t"))];
    c
}

async fn wait_for(counters: &ExportCounters, exported: u64, failed: u64) {
    for _ in 0..200 {
        if counters.exported.load(Ordering::Relaxed) >= exported && counters.failed.load(Ordering::Relaxed) >= failed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("exported {} failed {}", counters.exported.load(Ordering::Relaxed), counters.failed.load(Ordering::Relaxed));
}

#[tokio::test]
async fn http_export_batches_spans_and_posts_protobuf() {
    let (port, seen) = collector(false, "0").await;
    let (sender, exporter) = exporter(config(port, Protocol::HttpProtobuf));
    let task = tokio::spawn(exporter.run());
    for n in 0..4 {
        assert!(sender.send(span(n, false)));
    }
    wait_for(sender.counters(), 4, 0).await;
    let seen = seen.lock().unwrap().clone();
    // A full batch of 3, then the fourth span after the interval.
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0, "/v1/traces");
    assert_eq!(seen[0].1, "application/x-protobuf");
    assert_eq!(seen[0].2, encode_export_request(&origin(), &[span(0, false), span(1, false), span(2, false)]));
    assert_eq!(seen[1].2, encode_export_request(&origin(), &[span(3, false)]));
    drop(sender);
    task.await.unwrap();
}

#[tokio::test]
async fn grpc_export_frames_the_message_and_reads_grpc_status() {
    let (port, seen) = collector(true, "0").await;
    let (sender, exporter) = exporter(config(port, Protocol::Grpc));
    let task = tokio::spawn(exporter.run());
    sender.send(span(1, false));
    wait_for(sender.counters(), 1, 0).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].0, GRPC_PATH);
    assert_eq!(seen[0].1, "application/grpc");
    let message = encode_export_request(&origin(), &[span(1, false)]);
    assert_eq!(seen[0].2[0], 0);
    assert_eq!(&seen[0].2[1..5], &(message.len() as u32).to_be_bytes());
    assert_eq!(&seen[0].2[5..], &message[..]);
    drop(sender);
    task.await.unwrap();
}

#[tokio::test]
async fn a_grpc_error_status_counts_as_failed() {
    let (port, _) = collector(true, "14").await;
    let (sender, exporter) = exporter(config(port, Protocol::Grpc));
    let task = tokio::spawn(exporter.run());
    sender.send(span(1, false));
    sender.send(span(2, false));
    wait_for(sender.counters(), 0, 2).await;
    assert_eq!(sender.counters().exported.load(Ordering::Relaxed), 0);
    drop(sender);
    task.await.unwrap();
}

#[tokio::test]
async fn an_unreachable_collector_counts_as_failed() {
    // Bind then drop, so the port is (almost certainly) closed.
    let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let (sender, exporter) = exporter(config(port, Protocol::HttpProtobuf));
    let task = tokio::spawn(exporter.run());
    sender.send(span(1, false));
    wait_for(sender.counters(), 0, 1).await;
    drop(sender);
    task.await.unwrap();
}

#[tokio::test]
async fn a_bad_path_fails_the_batch_without_panicking() {
    let (port, _) = collector(false, "0").await;
    let mut c = config(port, Protocol::HttpProtobuf);
    c.path = "no spaces allowed".into();
    let (sender, exporter) = exporter(c);
    let task = tokio::spawn(exporter.run());
    sender.send(span(1, false));
    wait_for(sender.counters(), 0, 1).await;
    drop(sender);
    task.await.unwrap();
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_blocking() {
    let mut c = config(1, Protocol::HttpProtobuf);
    c.queue = 4;
    // The exporter is not running: nothing drains the queue.
    let (sender, _exporter) = exporter(c);
    let started = std::time::Instant::now();
    let accepted = (0..100).filter(|n| sender.send(span(*n, false))).count();
    assert_eq!(accepted, 4);
    assert_eq!(sender.counters().dropped.load(Ordering::Relaxed), 96);
    assert!(started.elapsed() < Duration::from_secs(1), "send blocked");
}
