//! Reading every controller replica's `/status` for `meshctl status`: from the
//! addresses given, or from the cluster, through the API server's port-forward to
//! each controller pod (as `istioctl proxy-status` reaches each istiod), so that no
//! replica's admin port has to be exposed and no replica is missed behind a Service.
use std::{net::SocketAddr, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::status::Replica;

/// The controller pods' label (`deploy/templates/controller.yaml`).
pub const SELECTOR: &str = "app.kubernetes.io/name=mesh-controller";
/// The admin port of a pod that names none `http-admin`.
pub const ADMIN_PORT: u16 = 15014;
/// How long one replica may take to answer, the connection included.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// The most of a `/status` answer read (thousands of nodes fit).
const MOST: usize = 64 << 20;

/// `GET /status` over a connected stream (`host` for the Host header). The answer ends
/// at its `content-length` (a port-forward need not close when the replica has
/// answered), else at the end of the stream.
pub async fn read_status(mut stream: impl AsyncRead + AsyncWrite + Unpin, host: &str) -> Result<Value, String> {
    let request = format!("GET /status HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("send the request: {e}"))?;
    let mut response = Vec::new();
    let mut chunk = vec![0; 16 * 1024];
    let (head, body_start) = loop {
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            break (String::from_utf8_lossy(&response[..end]).into_owned(), end + 4);
        }
        let n = stream.read(&mut chunk).await.map_err(|e| format!("read the answer: {e}"))?;
        if n == 0 || response.len() > 64 * 1024 {
            return Err(if response.is_empty() {
                "closed without an answer".to_owned()
            } else {
                "malformed HTTP answer".to_owned()
            });
        }
        response.extend_from_slice(&chunk[..n]);
    };
    let status_line = head.lines().next().unwrap_or_default();
    if !(status_line.starts_with("HTTP/1.") && status_line.get(8..12) == Some(" 200")) {
        return Err(format!("answered: {status_line}"));
    }
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
    });
    loop {
        let have = response.len() - body_start;
        if length.is_some_and(|length| have >= length) {
            break;
        }
        if have > MOST {
            return Err(format!("the answer is larger than {} MiB", MOST >> 20));
        }
        match stream.read(&mut chunk).await.map_err(|e| format!("read the answer: {e}"))? {
            0 if length.is_some() => return Err("the answer was cut short".to_owned()),
            0 => break,
            n => response.extend_from_slice(&chunk[..n]),
        }
    }
    let body = &response[body_start..length.map_or(response.len(), |length| body_start + length)];
    serde_json::from_slice(body).map_err(|e| format!("bad status JSON: {e}"))
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
    use super::*;

    async fn answer(bytes: &'static [u8]) -> Result<Value, String> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let serve = tokio::spawn(async move {
            let mut request = [0; 1024];
            let n = server.read(&mut request).await.unwrap();
            assert!(request[..n].starts_with(b"GET /status HTTP/1.1\r\nhost: h\r\n"));
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
        assert_eq!(refused.unwrap_err(), "answered: HTTP/1.1 503 Service Unavailable");
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
        assert_eq!(status.unwrap_err(), "the answer was cut short");
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
