//! The lab's waypoint scenario, shared by the end-to-end tests and the demo: httpbin
//! (Istio's sample app, from `PyPI`, under gunicorn) in the shop pods behind a Service,
//! the seed's canary, and the route and policy objects the scenario applies.
use std::time::Duration;

use crate::{Lab, wait_for};

/// The httpbin Service: a VIP in front of the shop pods' gunicorn on port 8000.
pub const HTTPBIN: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: httpbin
  namespace: shop
spec:
  clusterIP: 10.96.0.20
  selector:
    app: echo
  ports:
  - name: http
    port: 8000
    targetPort: 8000
";
pub const HTTPBIN_URL: &str = "http://10.96.0.20:8000";
pub const WAYPOINT_IP: &str = "10.98.1.250";

pub fn shop_pods(lab: &Lab) -> Vec<String> {
    lab.pods.iter().filter(|p| p.meshed).map(|p| p.name.clone()).collect()
}

/// Starts httpbin under gunicorn (threads: concurrent requests, an access log) in
/// `pods` and waits until each answers locally.
pub fn start_httpbin(lab: &Lab, pods: &[String]) -> anyhow::Result<()> {
    let argv = [
        "python3",
        "-m",
        "gunicorn",
        "-b",
        "[::]:8000",
        "-k",
        "gthread",
        "--threads",
        "16",
        "--access-logfile",
        "-",
        "httpbin:app",
    ];
    for pod in pods {
        lab.spawn_in(pod, &format!("httpbin-{pod}"), &argv)?;
    }
    for pod in pods {
        wait_for(Duration::from_secs(30), || {
            lab.exec(pod, &["curl", "-sf", "http://127.0.0.1:8000/status/200"]).is_ok_and(|o| o.status.success())
        })
        .map_err(|_| anyhow::anyhow!("httpbin in {pod} did not come up: {}", lab.log_of(&format!("httpbin-{pod}"))))?;
    }
    Ok(())
}

pub fn waypoint_http(lab: &Lab, port: u16, path: &str) -> String {
    let out =
        lab.exec("waypoint", &["curl", "-sS", "--max-time", "5", &format!("http://127.0.0.1:{port}{path}")]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn waypoint_version(lab: &Lab) -> u64 {
    serde_json::from_str::<serde_json::Value>(&waypoint_http(lab, 15000, "/stats"))
        .ok()
        .and_then(|v| v["version"].as_u64())
        .unwrap_or(0)
}

/// The seed's canary: subsets by the `version` label, 80/20 by weight, and a header
/// route to v2.
pub const CANARY: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: shop}
spec:
  host: echo
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: shop}
spec:
  hosts: [echo]
  http:
  - match: [{headers: {x-canary: {exact: \"yes\"}}}]
    route: [{destination: {host: echo, subset: v2}}]
  - route:
    - destination: {host: echo, subset: v1}
      weight: 80
    - destination: {host: echo, subset: v2}
      weight: 20
";

pub const HTTPBIN_ROUTES: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: shop}
spec:
  hosts: [httpbin.shop.svc.cluster.local]
  http:
  - match: [{uri: {exact: /fault}}]
    fault:
      abort: {httpStatus: 418, percentage: {value: 50}}
    rewrite: {uri: /get}
    corsPolicy: {allowOrigins: [{exact: '*'}]}
    headers: {response: {set: {x-route: fault}}}
    route: [{destination: {host: httpbin}}]
  - match: [{uri: {exact: /slow}}]
    fault:
      delay: {fixedDelay: 300ms, percentage: {value: 100}}
    rewrite: {uri: /get}
    route: [{destination: {host: httpbin}}]
  - match: [{uri: {prefix: /delay/3}}]
    timeout: 1s
    route: [{destination: {host: httpbin}}]
  - match: [{uri: {prefix: /drip}, headers: {x-timeout: {exact: '1'}}}]
    timeout: 1s
    route: [{destination: {host: httpbin}}]
  - match: [{uri: {prefix: /status/503}}]
    retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: httpbin}}]
  - match: [{uri: {prefix: /anything/retry-on-200}}]
    retries: {attempts: 3, retryOn: '200'}
    route: [{destination: {host: httpbin}}]
  - match: [{uri: {prefix: /moved}}]
    redirect: {uri: /get}
  - route: [{destination: {host: httpbin}}]
";

pub const HTTPBIN_POLICY: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: shop}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      http: {http2MaxRequests: 2}
    outlierDetection:
      consecutiveGatewayErrors: 1
      interval: 1s
      baseEjectionTime: 3s
      maxEjectionPercent: 100
";

/// Requests for `path` in pod `pod`'s gunicorn access log.
pub fn gunicorn_hits(lab: &Lab, pod: &str, path: &str) -> usize {
    lab.log_of(&format!("httpbin-{pod}")).lines().filter(|l| l.contains(&format!("\"GET {path} "))).count()
}

/// Stops pod `pod`'s httpbin: its whole process group (gunicorn's workers are
/// children of its master).
pub fn stop_httpbin(lab: &Lab, pod: &str) -> anyhow::Result<()> {
    let pid = std::fs::read_to_string(lab.dir.join(format!("httpbin-{pod}.pid")))?;
    std::process::Command::new("kill").args(["-KILL", "--", &format!("-{}", pid.trim())]).status()?;
    wait_for(Duration::from_secs(5), || {
        !lab.exec(pod, &["curl", "-sf", "http://127.0.0.1:8000/status/200"]).is_ok_and(|o| o.status.success())
    })
}
