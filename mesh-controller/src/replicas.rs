//! Reading every controller replica's `/status` for `meshctl status`: from the
//! addresses given, or from the cluster, through the API server's port-forward to
//! each controller pod (as `istioctl proxy-status` reaches each istiod), so that no
//! replica's admin port has to be exposed and no replica is missed behind a Service.
use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::{Request, StatusCode, client::conn::http1, header::HOST};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};
use mesh_proxy::telemetry::error_chain;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::status::Replica;

/// The controller pods' label (`deploy/templates/controller.yaml`).
pub const SELECTOR: &str = "app.kubernetes.io/name=mesh-controller";
/// The admin port of a pod that names none `http-admin`.
pub const ADMIN_PORT: u16 = 15014;
/// How long one replica may take to answer, the connection included.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// The most of a `/status` answer read (thousands of nodes fit).
const MOST: usize = 64 << 20;

/// `GET /status` over a connected stream (`host` for the Host header), with hyper's
/// HTTP/1.1 client. The answer ends at its `content-length` (a port-forward need not
/// close when the replica has answered), and is read up to [`MOST`] bytes.
pub async fn read_status(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    host: &str,
) -> Result<Value, String> {
    let failed = |what: &str, e: hyper::Error| format!("{what}: {}", error_chain(&e));
    let (mut sender, connection) =
        http1::handshake(TokioIo::new(stream)).await.map_err(|e| failed("send the request", e))?;
    let exchange = async {
        let request = Request::get("/status")
            .header(HOST, host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("the request: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| failed("send the request", e))?;
        if response.status() != StatusCode::OK {
            return Err(format!("answered: HTTP {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MOST).collect().await.map_err(|e| {
            if e.is::<LengthLimitError>() {
                format!("the answer is larger than {} MiB", MOST >> 20)
            } else {
                format!("read the answer: {}", error_chain(&*e))
            }
        })?;
        serde_json::from_slice(&body.to_bytes()).map_err(|e| format!("bad status JSON: {e}"))
    };
    // The connection is driven here, not spawned, so it ends with this call. It hands
    // its errors to the request waiting on it; one it returns itself ends the call.
    tokio::select! {
        biased;
        result = exchange => result,
        Err(e) = connection => Err(failed("the connection", e)),
    }
}

/// One replica at a known address.
pub async fn at_address(addr: SocketAddr) -> Replica {
    let status = tokio::time::timeout(ANSWER_WITHIN, async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        read_status(stream, &addr.to_string()).await
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {} s", ANSWER_WITHIN.as_secs())));
    Replica { name: addr.to_string(), status }
}

/// Every controller replica of the cluster (pods labelled [`SELECTOR`] in `namespace`),
/// asked in parallel through port-forwards. Pods that are not running are not asked:
/// they are returned as notes (`name: not running (phase)`), not as failures.
pub async fn in_cluster(client: Client, namespace: &str) -> Result<(Vec<Replica>, Vec<String>), String> {
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let listed = pods
        .list(&ListParams::default().labels(SELECTOR))
        .await
        .map_err(|e| format!("cannot list the controller pods ({SELECTOR}) in namespace {namespace}: {e}"))?;
    let mut notes = Vec::new();
    let mut asked = Vec::new();
    for pod in &listed.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("unknown");
        if phase == "Running" {
            asked.push((name, admin_port(pod)));
        } else {
            notes.push(format!("{name}: not running ({phase}), not asked"));
        }
    }
    if asked.is_empty() {
        return Err(format!("no running controller pod ({SELECTOR}) in namespace {namespace}"));
    }
    let replicas = futures_util::future::join_all(asked.into_iter().map(|(name, port)| {
        let pods = pods.clone();
        async move {
            let status = tokio::time::timeout(ANSWER_WITHIN, forwarded(&pods, &name, port))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {} s", ANSWER_WITHIN.as_secs())));
            Replica { name, status }
        }
    }))
    .await;
    Ok((replicas, notes))
}

/// The port of the controller container named `http-admin`, else [`ADMIN_PORT`].
fn admin_port(pod: &Pod) -> u16 {
    let containers = pod.spec.iter().flat_map(|spec| &spec.containers);
    containers
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("http-admin"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(ADMIN_PORT)
}

/// `/status` of one pod through the API server's port-forward.
async fn forwarded(pods: &Api<Pod>, name: &str, port: u16) -> Result<Value, String> {
    let mut forwarder =
        pods.portforward(name, &[port]).await.map_err(|e| format!("port-forward to {name}:{port}: {e}"))?;
    let stream = forwarder.take_stream(port).ok_or_else(|| format!("port-forward to {name}:{port}: no stream"))?;
    // When the pod refuses the connection, the API server says why on the error
    // channel (and may keep the stream open): the reason wins over the answer's wait.
    let errors = forwarder.take_error(port);
    let refused = async {
        if let Some(reason) = match errors {
            Some(errors) => errors.await,
            None => None,
        } {
            return reason;
        }
        std::future::pending().await
    };
    let host = format!("localhost:{port}");
    let status = tokio::select! {
        biased;
        reason = refused => Err(format!("port-forward to {name}:{port}: {}", reason.trim())),
        status = read_status(stream, &host) => status,
    };
    forwarder.abort();
    status
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn answer(bytes: &'static [u8]) -> Result<Value, String> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let serve = tokio::spawn(async move {
            let mut request = [0; 1024];
            let n = server.read(&mut request).await.unwrap();
            assert!(request[..n].starts_with(b"GET /status HTTP/1.1\r\nhost: h\r\n"), "{:?}", &request[..n]);
            server.write_all(bytes).await.unwrap();
            // Kept open, as a port-forward may stay: the answer ends at content-length.
            server
        });
        let status = tokio::time::timeout(Duration::from_secs(5), read_status(client, "h")).await.expect("no hang");
        drop(serve.await.unwrap());
        status
    }

    #[tokio::test]
    async fn the_answer_ends_at_its_length_without_waiting_for_the_stream_to_close() {
        let status = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"version\":7}").await;
        assert_eq!(status.unwrap()["version"], 7);
    }

    #[tokio::test]
    async fn errors_name_what_is_wrong() {
        let refused = answer(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        assert_eq!(refused.unwrap_err(), "answered: HTTP 503 Service Unavailable");
        let garbage = answer(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nnot").await;
        assert!(garbage.unwrap_err().starts_with("bad status JSON"));

        let (client, server) = tokio::io::duplex(1024);
        drop(server);
        assert!(read_status(client, "h").await.unwrap_err().starts_with("send the request"));
    }

    #[tokio::test]
    async fn a_short_answer_is_an_error_not_a_hang() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut request = [0; 1024];
            let _ = server.read(&mut request).await;
            server.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"version\"").await.unwrap();
        });
        let status = tokio::time::timeout(Duration::from_secs(5), read_status(client, "h")).await.expect("no hang");
        let error = status.unwrap_err();
        assert!(error.starts_with("read the answer: "), "{error}");
    }

    #[test]
    fn the_admin_port_is_the_one_named_http_admin() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "mesh-controller-0"},
            "spec": {"containers": [{"name": "controller", "ports": [
                {"name": "grpc-control", "containerPort": 15012}, {"name": "http-admin", "containerPort": 16014}]}]},
        }))
        .unwrap();
        assert_eq!(admin_port(&pod), 16014);
        assert_eq!(admin_port(&Pod::default()), ADMIN_PORT);
    }
}
