//! In-process authorizers on loopback: an HTTP one (hyper), a gRPC one (hyper on h2
//! serving our own encoded `CheckResponse`), and, when Python's `grpcio` is importable,
//! a real gRPC server whose messages are declared at run time with Envoy's field
//! numbers.
use std::{
    convert::Infallible,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    pin::Pin,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderMap, Method, Version};
use http_body::Frame;
use hyper::{server::conn, service::service_fn};
use mesh_common::config::mesh::{ExtAuthzGrpc, ExtAuthzHttp};
use mesh_waypoint::custom::proto::{Reader, Value, Writer};
use tokio::net::TcpListener;

use super::*;

/// What the HTTP authorizer saw: method, target and headers of each check.
type Seen = Arc<Mutex<Vec<(Method, String, HeaderMap)>>>;

struct HttpAuthorizer {
    addr: SocketAddr,
    seen: Seen,
    connections: Arc<AtomicUsize>,
}

/// Allows when the check has `x-ext-authz: allow` (answering
/// `x-ext-authz-check-result: allowed`), fails (500) on `x-ext-authz: fail`, else 403
/// `denied by ext_authz`.
async fn http_authorizer() -> HttpAuthorizer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let connections = Arc::new(AtomicUsize::new(0));
    let (seen2, connections2) = (seen.clone(), connections.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            connections2.fetch_add(1, Ordering::SeqCst);
            let seen = seen2.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push((
                            request.method().clone(),
                            request.uri().to_string(),
                            request.headers().clone(),
                        ));
                        let verdict = request.headers().get("x-ext-authz").cloned();
                        let response = if verdict.as_ref().is_some_and(|v| v == "fail") {
                            Response::builder().status(500).body(Full::new(Bytes::from_static(b"authorizer broken")))
                        } else if verdict.is_some_and(|v| v == "allow") {
                            Response::builder()
                                .header("x-ext-authz-check-result", "allowed")
                                .header("x-not-copied", "1")
                                .body(Full::new(Bytes::new()))
                        } else {
                            Response::builder()
                                .status(403)
                                .header("x-ext-authz-check-result", "denied")
                                .header("x-not-copied", "1")
                                .body(Full::new(Bytes::from_static(b"denied by ext_authz")))
                        };
                        Ok::<_, Infallible>(response.unwrap())
                    }
                });
                let _ = conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    HttpAuthorizer { addr, seen, connections }
}

/// A listener that accepts and never answers.
async fn silent_authorizer() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            held.push(stream);
        }
    });
    (addr, task)
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A gRPC answer body: one message, then trailers.
struct GrpcBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// The `attributes.request.http.headers` map of an encoded `CheckRequest`.
fn check_request_headers(message: &[u8]) -> Vec<(String, String)> {
    fn sub(data: &[u8], field: u32) -> Vec<&[u8]> {
        Reader::new(data)
            .filter_map(|f| match f.unwrap() {
                (n, Value::Len(b)) if n == field => Some(b),
                _ => None,
            })
            .collect()
    }
    let http = sub(sub(sub(message, 1)[0], 4)[0], 2)[0];
    sub(http, 3)
        .into_iter()
        .map(|entry| {
            let text = |f| String::from_utf8(sub(entry, f).first().copied().unwrap_or_default().to_vec()).unwrap();
            (text(1), text(2))
        })
        .collect()
}

/// How the gRPC test authorizer answers.
#[derive(Clone, Copy)]
enum GrpcMode {
    /// Allow on `x-ext-authz: allow`, else deny 403 with a body and header.
    Decide,
    /// A 200 with grpc-status 0 and a body that is not a gRPC frame.
    Garbage,
    /// grpc-status 14 (UNAVAILABLE), no message.
    Unavailable,
}

fn check_response(allow: bool) -> Bytes {
    let mut w = Writer::new();
    let header = |o: &mut Writer, name: &str, value: &str| {
        o.message(1, |h| {
            h.string(1, name).string(2, value);
        });
    };
    if allow {
        w.message(3, |ok| {
            ok.message(2, |o| header(o, "x-ext-authz-check-result", "allowed"));
            ok.string(5, "cookie");
        });
    } else {
        w.message(1, |s| {
            s.uint(1, 7);
        });
        w.message(2, |d| {
            d.message(1, |s| {
                s.uint(1, 403);
            });
            d.message(2, |o| header(o, "x-ext-authz-check-result", "denied"));
            d.string(3, "denied by ext_authz");
        });
    }
    w.finish()
}

async fn grpc_authorizer(mode: GrpcMode) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| async move {
                    assert_eq!(request.uri().path(), custom::GRPC_CHECK_PATH);
                    assert_eq!(request.headers()["content-type"], "application/grpc");
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    let message = custom::grpc_unframe(&body).unwrap();
                    let allow = check_request_headers(message).contains(&("x-ext-authz".into(), "allow".into()));
                    let mut trailers = HeaderMap::new();
                    let data = match mode {
                        GrpcMode::Decide => {
                            trailers.insert("grpc-status", HeaderValue::from_static("0"));
                            custom::grpc_frame(&check_response(allow))
                        }
                        GrpcMode::Garbage => {
                            trailers.insert("grpc-status", HeaderValue::from_static("0"));
                            Bytes::from_static(b"this is not a gRPC frame")
                        }
                        GrpcMode::Unavailable => {
                            trailers.insert("grpc-status", HeaderValue::from_static("14"));
                            Bytes::new()
                        }
                    };
                    let response = Response::builder()
                        .header("content-type", "application/grpc")
                        .body(GrpcBody { data: Some(data), trailers: Some(trailers) })
                        .unwrap();
                    Ok::<_, Infallible>(response)
                });
                let _ = conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn request_headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    map
}

fn check_request(headers: &HeaderMap) -> CheckRequest<'_> {
    CheckRequest {
        method: &Method::GET,
        path: "/api/items?x=1",
        host: "shop.example:8080",
        scheme: "http",
        version: Version::HTTP_11,
        headers,
        source_principal: "spiffe://cluster.local/ns/a/sa/client",
        source_addr: "10.0.0.1:40000".parse().unwrap(),
        destination_addr: "10.96.0.10:8080".parse().unwrap(),
        destination_principal: "spiffe://cluster.local/ns/a/sa/waypoint",
        request_id: "req-1",
    }
}

/// A resolver that knows one service.
fn resolver(addr: SocketAddr) -> impl Fn(&str, u16) -> Option<Endpoint<'static>> {
    move |host, port| {
        (host == "ext-authz.foo.svc.cluster.local" && port == addr.port()).then_some(Endpoint::Plain(addr))
    }
}

fn http_provider(addr: SocketAddr) -> ExtAuthzHttp {
    ExtAuthzHttp {
        service: "ext-authz.foo.svc.cluster.local".into(),
        port: u32::from(addr.port()),
        path_prefix: Some("/authz".into()),
        include_request_headers_in_check: vec!["x-ext-authz".into()],
        headers_to_upstream_on_allow: vec!["x-ext-authz-check-result".into()],
        headers_to_downstream_on_deny: vec!["x-ext-authz-check-result".into()],
        ..ExtAuthzHttp::default()
    }
}

fn grpc_provider(addr: SocketAddr) -> ExtAuthzGrpc {
    ExtAuthzGrpc {
        service: "ext-authz.foo.svc.cluster.local".into(),
        port: u32::from(addr.port()),
        ..ExtAuthzGrpc::default()
    }
}

fn counts(client: &ExtAuthzClient) -> [u64; 4] {
    let c = client.counters();
    [&c.ok, &c.denied, &c.error, &c.failed_open].map(prometheus_client::metrics::counter::Counter::get)
}

fn assert_allowed_with_result(decision: &Decision) {
    let Decision::Allow { upstream_headers, .. } = decision else { panic!("expected allow: {decision:?}") };
    assert_eq!(upstream_headers.len(), 1, "{upstream_headers:?}");
    assert_eq!(upstream_headers[0].name, "x-ext-authz-check-result");
    assert_eq!(upstream_headers[0].value, "allowed");
}

fn assert_denied_by_authorizer(decision: &Decision) {
    let Decision::Deny { status, headers, body } = decision else { panic!("expected deny: {decision:?}") };
    assert_eq!(*status, StatusCode::FORBIDDEN);
    assert_eq!(body, "denied by ext_authz");
    let names: Vec<(&str, &[u8])> = headers.iter().map(|e| (e.name.as_str(), e.value.as_bytes())).collect();
    assert_eq!(names, [("x-ext-authz-check-result", &b"denied"[..])]);
}

fn assert_status(decision: &Decision, expected: u16) {
    let Decision::Deny { status, headers, body } = decision else { panic!("expected deny: {decision:?}") };
    assert_eq!(status.as_u16(), expected);
    assert!(headers.is_empty() && body.is_empty());
}

#[tokio::test]
async fn http_allow_copies_headers_and_sends_prefixed_path_on_one_connection() {
    let authorizer = http_authorizer().await;
    let provider = http_provider(authorizer.addr);
    let client = ExtAuthzClient::new();
    let headers = request_headers(&[("x-ext-authz", "allow"), ("cookie", "secret"), ("authorization", "Bearer t")]);
    for _ in 0..2 {
        let decision =
            client.check(ExtAuthz::Http(&provider), resolver(authorizer.addr), &check_request(&headers)).await.0;
        assert_allowed_with_result(&decision);
    }
    assert_eq!(counts(&client), [2, 0, 0, 0]);
    assert_eq!(authorizer.connections.load(Ordering::SeqCst), 1, "the connection is pooled");
    let seen = authorizer.seen.lock().unwrap();
    let (method, target, check_headers) = &seen[0];
    assert_eq!(method, Method::GET);
    assert_eq!(target, "/authz/api/items?x=1");
    assert_eq!(check_headers["host"], "shop.example:8080");
    assert_eq!(check_headers["authorization"], "Bearer t");
    assert!(check_headers.get("cookie").is_none(), "not listed in includeRequestHeadersInCheck");
}

#[tokio::test]
async fn http_deny_answers_status_body_and_listed_headers() {
    let authorizer = http_authorizer().await;
    let provider = http_provider(authorizer.addr);
    let client = ExtAuthzClient::new();
    let headers = request_headers(&[("x-ext-authz", "deny")]);
    let decision = client.check(ExtAuthz::Http(&provider), resolver(authorizer.addr), &check_request(&headers)).await.0;
    assert_denied_by_authorizer(&decision);
    assert_eq!(counts(&client), [0, 1, 0, 0]);
}

#[tokio::test]
async fn http_5xx_answer_is_a_failure() {
    let authorizer = http_authorizer().await;
    let client = ExtAuthzClient::new();
    let headers = request_headers(&[("x-ext-authz", "fail")]);
    let closed = ExtAuthzHttp { status_on_error: Some("503".into()), ..http_provider(authorizer.addr) };
    let decision = client.check(ExtAuthz::Http(&closed), resolver(authorizer.addr), &check_request(&headers)).await.0;
    assert_status(&decision, 503);
    let open = ExtAuthzHttp { fail_open: true, ..http_provider(authorizer.addr) };
    let decision = client.check(ExtAuthz::Http(&open), resolver(authorizer.addr), &check_request(&headers)).await.0;
    assert_eq!(decision, Decision::allow());
    assert_eq!(counts(&client), [0, 0, 2, 1]);
}

#[tokio::test]
async fn timeout_denies_with_status_on_error() {
    let (addr, _task) = silent_authorizer().await;
    let provider =
        ExtAuthzHttp { timeout: Some("200ms".into()), status_on_error: Some("503".into()), ..http_provider(addr) };
    let client = ExtAuthzClient::new();
    let headers = request_headers(&[("x-ext-authz", "allow")]);
    let started = std::time::Instant::now();
    let decision = client.check(ExtAuthz::Http(&provider), resolver(addr), &check_request(&headers)).await.0;
    assert_status(&decision, 503);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(counts(&client), [0, 0, 1, 0]);
    let error = client.try_check(ExtAuthz::Http(&provider), resolver(addr), &check_request(&headers)).await;
    assert!(matches!(error, Err(CheckError::Timeout { .. })), "{error:?}");
}

#[tokio::test]
async fn grpc_timeout_fails_open_when_asked() {
    let (addr, _task) = silent_authorizer().await;
    let provider = ExtAuthzGrpc { timeout: Some("200ms".into()), fail_open: true, ..grpc_provider(addr) };
    let client = ExtAuthzClient::new();
    let headers = request_headers(&[]);
    let decision = client.check(ExtAuthz::Grpc(&provider), resolver(addr), &check_request(&headers)).await.0;
    assert_eq!(decision, Decision::allow());
    assert_eq!(counts(&client), [0, 0, 1, 1]);
}

#[tokio::test]
async fn unreachable_and_unresolved_fail_closed_or_open() {
    let addr = closed_port().await;
    let client = ExtAuthzClient::new();
    let headers = request_headers(&[("x-ext-authz", "allow")]);
    let closed = http_provider(addr);
    let decision = client.check(ExtAuthz::Http(&closed), resolver(addr), &check_request(&headers)).await.0;
    assert_status(&decision, 403);
    let open = ExtAuthzHttp { fail_open: true, ..http_provider(addr) };
    let decision = client.check(ExtAuthz::Http(&open), resolver(addr), &check_request(&headers)).await.0;
    assert_eq!(decision, Decision::allow());
    let grpc = ExtAuthzGrpc { status_on_error: Some("500".into()), ..grpc_provider(addr) };
    let decision = client.check(ExtAuthz::Grpc(&grpc), resolver(addr), &check_request(&headers)).await.0;
    assert_status(&decision, 500);
    assert_eq!(counts(&client), [0, 0, 3, 1]);
    let error = client.try_check(ExtAuthz::Http(&closed), |_, _| None, &check_request(&headers)).await.unwrap_err();
    assert!(matches!(error, CheckError::Unresolved { .. }), "{error:?}");
    assert!(error.to_string().contains("ext-authz.foo.svc.cluster.local"), "{error}");
    let decision = client.check(ExtAuthz::Http(&closed), |_, _| None, &check_request(&headers)).await.0;
    assert_status(&decision, 403);
}

#[tokio::test]
async fn grpc_allow_and_deny() {
    let addr = grpc_authorizer(GrpcMode::Decide).await;
    let provider = grpc_provider(addr);
    let client = ExtAuthzClient::new();
    let allow = request_headers(&[("x-ext-authz", "allow")]);
    let decision = client.check(ExtAuthz::Grpc(&provider), resolver(addr), &check_request(&allow)).await.0;
    assert_allowed_with_result(&decision);
    let Decision::Allow { remove, .. } = &decision else { unreachable!() };
    assert_eq!(remove, &[http::HeaderName::from_static("cookie")]);
    let deny = request_headers(&[("x-ext-authz", "deny")]);
    let decision = client.check(ExtAuthz::Grpc(&provider), resolver(addr), &check_request(&deny)).await.0;
    assert_denied_by_authorizer(&decision);
    assert_eq!(counts(&client), [1, 1, 0, 0]);
}

#[tokio::test]
async fn grpc_garbage_or_error_status_is_a_failure() {
    let client = ExtAuthzClient::new();
    let headers = request_headers(&[("x-ext-authz", "allow")]);
    let addr = grpc_authorizer(GrpcMode::Garbage).await;
    let provider = ExtAuthzGrpc { status_on_error: Some("502".into()), ..grpc_provider(addr) };
    let error = client.try_check(ExtAuthz::Grpc(&provider), resolver(addr), &check_request(&headers)).await;
    assert!(matches!(error, Err(CheckError::Answer { .. })), "{error:?}");
    let decision = client.check(ExtAuthz::Grpc(&provider), resolver(addr), &check_request(&headers)).await.0;
    assert_status(&decision, 502);
    let addr = grpc_authorizer(GrpcMode::Unavailable).await;
    let provider = grpc_provider(addr);
    let error = client.try_check(ExtAuthz::Grpc(&provider), resolver(addr), &check_request(&headers)).await;
    assert!(matches!(&error, Err(CheckError::GrpcStatus { code, .. }) if code == "14"), "{error:?}");
    // An HTTP/1.1 authorizer named as gRPC: the h2 handshake or exchange fails.
    let http = http_authorizer().await;
    let provider = grpc_provider(http.addr);
    let decision = client.check(ExtAuthz::Grpc(&provider), resolver(http.addr), &check_request(&headers)).await.0;
    assert_status(&decision, 403);
}

/// A Python gRPC authorizer (`grpcio`) whose messages are declared at run time with
/// Envoy's field numbers: our encoding is read, and its answer decoded, by a real
/// protobuf implementation.
const PYTHON_AUTHORIZER: &str = r#"
import sys
from concurrent import futures
import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
fdp = descriptor_pb2.FileDescriptorProto(name="ext_authz_test.proto", package="t", syntax="proto3")
def message(name, fields):
    m = fdp.message_type.add(name=name)
    for fname, number, ftype, repeated in fields:
        f = m.field.add(name=fname, number=number, label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
        if isinstance(ftype, str):
            f.type = F.TYPE_MESSAGE
            f.type_name = ".t." + ftype
        else:
            f.type = ftype
S, U32, I32 = F.TYPE_STRING, F.TYPE_UINT32, F.TYPE_INT32
message("SocketAddress", [("address", 2, S, False), ("port_value", 3, U32, False)])
message("Address", [("socket_address", 1, "SocketAddress", False)])
message("Peer", [("address", 1, "Address", False), ("principal", 4, S, False)])
message("Entry", [("key", 1, S, False), ("value", 2, S, False)])
message("HttpRequest", [("id", 1, S, False), ("method", 2, S, False), ("headers", 3, "Entry", True),
    ("path", 4, S, False), ("host", 5, S, False), ("scheme", 6, S, False), ("protocol", 10, S, False)])
message("Request", [("http", 2, "HttpRequest", False)])
message("AttributeContext", [("source", 1, "Peer", False), ("destination", 2, "Peer", False),
    ("request", 4, "Request", False)])
message("CheckRequest", [("attributes", 1, "AttributeContext", False)])
message("Status", [("code", 1, I32, False), ("message", 2, S, False)])
message("HeaderValue", [("key", 1, S, False), ("value", 2, S, False)])
message("HeaderValueOption", [("header", 1, "HeaderValue", False)])
message("HttpStatus", [("code", 1, I32, False)])
message("DeniedHttpResponse", [("status", 1, "HttpStatus", False), ("headers", 2, "HeaderValueOption", True),
    ("body", 3, S, False)])
message("OkHttpResponse", [("headers", 2, "HeaderValueOption", True), ("headers_to_remove", 5, S, True),
    ("response_headers_to_add", 6, "HeaderValueOption", True)])
message("CheckResponse", [("status", 1, "Status", False), ("denied_response", 2, "DeniedHttpResponse", False),
    ("ok_response", 3, "OkHttpResponse", False)])
pool = descriptor_pool.DescriptorPool()
pool.Add(fdp)
CheckRequest = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.CheckRequest"))
CheckResponse = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.CheckResponse"))

def check(request, context):
    a = request.attributes
    http = a.request.http
    headers = {e.key: e.value for e in http.headers}
    response = CheckResponse()
    if headers.get("x-ext-authz") == "allow":
        o = response.ok_response.headers.add()
        o.header.key, o.header.value = "x-ext-authz-check-result", "allowed"
        src = a.source.address.socket_address
        dst = a.destination.address.socket_address
        seen = " ".join([http.id, http.method, http.path, http.host, http.scheme, http.protocol,
            a.source.principal, "%s:%d" % (src.address, src.port_value), "%s:%d" % (dst.address, dst.port_value),
            a.destination.principal])
        o = response.ok_response.response_headers_to_add.add()
        o.header.key, o.header.value = "x-seen", seen
    else:
        response.status.code = 7
        response.denied_response.status.code = 403
        response.denied_response.body = "denied by ext_authz"
        o = response.denied_response.headers.add()
        o.header.key, o.header.value = "x-ext-authz-check-result", "denied"
    return response

server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
handler = grpc.method_handlers_generic_handler("envoy.service.auth.v3.Authorization", {
    "Check": grpc.unary_unary_rpc_method_handler(check, request_deserializer=CheckRequest.FromString,
        response_serializer=CheckResponse.SerializeToString)})
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()
"#;

/// Kills the Python authorizer when the test ends, however it ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn python_grpc_authorizer_reads_our_check_and_we_read_its_answer() {
    let importable = Command::new("python3")
        .args(["-c", "import grpc, google.protobuf"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !importable {
        println!("skipped: python3 with grpcio and protobuf is not importable");
        return;
    }
    let child = Command::new("python3")
        .args(["-u", "-c", PYTHON_AUTHORIZER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    let mut guard = ChildGuard(child);
    let stdout = guard.0.stdout.take().unwrap();
    let port: u16 = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line.trim().parse().unwrap_or_else(|_| panic!("python authorizer printed `{line}`, not a port"))
    })
    .await
    .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let provider = ExtAuthzGrpc { timeout: Some("10s".into()), ..grpc_provider(addr) };
    let client = ExtAuthzClient::new();
    let allow = request_headers(&[("x-ext-authz", "allow")]);
    let decision = client.check(ExtAuthz::Grpc(&provider), resolver(addr), &check_request(&allow)).await.0;
    assert_allowed_with_result(&decision);
    let Decision::Allow { downstream_headers, .. } = &decision else { unreachable!() };
    assert_eq!(
        downstream_headers[0].value,
        "req-1 GET /api/items?x=1 shop.example:8080 http HTTP/1.1 spiffe://cluster.local/ns/a/sa/client \
         10.0.0.1:40000 10.96.0.10:8080 spiffe://cluster.local/ns/a/sa/waypoint"
    );
    let deny = request_headers(&[("x-ext-authz", "deny")]);
    let decision = client.check(ExtAuthz::Grpc(&provider), resolver(addr), &check_request(&deny)).await.0;
    assert_denied_by_authorizer(&decision);
    assert_eq!(counts(&client), [1, 1, 0, 0]);
}

/// The authorizer pod's agent: terminates HBONE with a certificate, records who
/// connected to what, and relays each stream to the authorizer process (plain TCP on
/// loopback, as an agent delivers into its pod).
struct AuthorizerAgent {
    cert: Arc<mesh_proxy::identity::WorkloadCert>,
    authorizer: SocketAddr,
    /// (client identity, CONNECT authority) of each stream.
    streams: Mutex<Vec<(String, String)>>,
}

impl mesh_proxy::tunnel::server::Handler for AuthorizerAgent {
    fn certificate(&self) -> Result<Arc<mesh_proxy::identity::WorkloadCert>, mesh_proxy::tunnel::HboneError> {
        Ok(self.cert.clone())
    }

    fn trusts(&self, identity: &str) -> bool {
        identity.starts_with("spiffe://cluster.local/")
    }

    fn refused(&self, _peer: SocketAddr, _reason: &str) {}

    async fn serve(self: Arc<Self>, connect: mesh_proxy::tunnel::server::Connect) {
        let authority = connect.authority().unwrap_or_default().to_owned();
        self.streams.lock().unwrap().push((connect.identity.to_string(), authority));
        let Ok(mut stream) = connect.accept() else { return };
        let Ok(mut tcp) = tokio::net::TcpStream::connect(self.authorizer).await else { return };
        let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
    }
}

/// A pod address of its own on loopback whose HBONE port (15008) is free, with that
/// port bound; its agent serves there.
async fn pod_with_agent(agent: Arc<AuthorizerAgent>) -> std::net::IpAddr {
    let seed = std::process::id();
    for i in 0..200u32 {
        let n = seed.wrapping_add(i.wrapping_mul(7919));
        let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 99, (n >> 8) as u8, (n as u8).max(1)));
        let Ok(listener) = TcpListener::bind((ip, mesh_proxy::tunnel::HBONE_PORT)).await else { continue };
        let server = mesh_proxy::tunnel::server::Server::new(agent);
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                tokio::spawn(server.clone().serve(tcp, peer, std::future::pending()));
            }
        });
        return ip;
    }
    panic!("no free loopback address for an HBONE port");
}

/// The view: namespace `foo` in the mesh, its authorizer pod at `ip` (service account
/// `authz`), and the Service `ext-authz` on `port` with target port 8000.
fn view_with_authorizer(ip: std::net::IpAddr, port: u16) -> mesh_proxy::workloads::Index {
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: foo, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: authz-1, namespace: foo, labels: {{app: authz}}}}\n\
         spec: {{nodeName: node1, serviceAccountName: authz}}\nstatus: {{phase: Running, podIP: '{ip}'}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: ext-authz, namespace: foo}}\n\
         spec: {{clusterIP: 10.96.0.50, selector: {{app: authz}}, ports: [{{name: http, port: {port}, targetPort: 8000}}]}}\n"
    );
    let config = mesh_common::config::load(&[mesh_common::config::Source::new("view.yaml", text)])
        .unwrap_or_else(|r| panic!("{r}"));
    mesh_proxy::workloads::Index::build(&config)
}

const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";

/// A meshed authorizer is checked through HBONE: its agent sees the waypoint's
/// identity and the pod's address as the CONNECT authority, the connection is pooled,
/// and an authorizer pod presenting another identity than the view's is refused
/// (the provider's failure policy decides: 403 here).
#[tokio::test]
async fn a_meshed_authorizer_is_reached_through_hbone() {
    let ca = mesh_proxy::identity::testing::Ca::new();
    let authorizer = http_authorizer().await;
    let agent = Arc::new(AuthorizerAgent {
        cert: ca.cert("spiffe://cluster.local/ns/foo/sa/authz"),
        authorizer: authorizer.addr,
        streams: Mutex::default(),
    });
    let ip = pod_with_agent(agent.clone()).await;
    let provider = http_provider(authorizer.addr);
    let index = view_with_authorizer(ip, authorizer.addr.port());
    let upstreams = Upstreams::new(Duration::from_secs(2));
    let waypoint_cert = ca.cert(WAYPOINT_ID);
    let resolve = |host: &str, port: u16| {
        let (workload, addr) = index.service_by_host(host, port)?.pick(false)?;
        assert!(workload.meshed, "the authorizer pod is in the mesh");
        let dial = Dial {
            cert: waypoint_cert.clone(),
            client: "10.0.0.1:40000".parse().unwrap(),
            baggage: "",
            connect_timeout: Duration::from_secs(2),
        };
        Some(Endpoint::Mesh { workload, addr, upstreams: &upstreams, dial })
    };
    let client = ExtAuthzClient::new();
    let headers = request_headers(&[("x-ext-authz", "allow")]);
    for _ in 0..2 {
        let decision = client.check(ExtAuthz::Http(&provider), &resolve, &check_request(&headers)).await.0;
        assert_allowed_with_result(&decision);
    }
    let deny = request_headers(&[("x-ext-authz", "deny")]);
    assert_denied_by_authorizer(&client.check(ExtAuthz::Http(&provider), &resolve, &check_request(&deny)).await.0);
    assert_eq!(
        *agent.streams.lock().unwrap(),
        [(WAYPOINT_ID.to_owned(), format!("{ip}:8000"))],
        "one tunnel stream, pooled, with the waypoint's identity to the pod's target port"
    );
    assert_eq!(authorizer.seen.lock().unwrap().len(), 3);
    assert_eq!(counts(&client), [2, 1, 0, 0]);

    // A pod whose agent presents an identity the view does not give it.
    let impostor = Arc::new(AuthorizerAgent {
        cert: ca.cert("spiffe://cluster.local/ns/foo/sa/impostor"),
        authorizer: authorizer.addr,
        streams: Mutex::default(),
    });
    let ip = pod_with_agent(impostor.clone()).await;
    let index = view_with_authorizer(ip, authorizer.addr.port());
    let resolve = |host: &str, port: u16| {
        let (workload, addr) = index.service_by_host(host, port)?.pick(false)?;
        let dial = Dial {
            cert: waypoint_cert.clone(),
            client: "10.0.0.1:40000".parse().unwrap(),
            baggage: "",
            connect_timeout: Duration::from_secs(2),
        };
        Some(Endpoint::Mesh { workload, addr, upstreams: &upstreams, dial })
    };
    let error = client.try_check(ExtAuthz::Http(&provider), &resolve, &check_request(&headers)).await.unwrap_err();
    assert!(matches!(error, CheckError::Mesh { .. }), "{error:?}");
    assert_status(&client.check(ExtAuthz::Http(&provider), &resolve, &check_request(&headers)).await.0, 403);
    assert!(impostor.streams.lock().unwrap().is_empty(), "no request reached the impostor");
    assert_eq!(authorizer.seen.lock().unwrap().len(), 3);
}
