//! The waypoint, end to end: source agents tunnel a service's traffic to it, it
//! routes with the service's `VirtualService` and `DestinationRule` and tunnels on to the
//! endpoints; the servers are httpbin (Istio's sample app, from `PyPI`, under gunicorn)
//! and the lab's echo server; the clients curl and h2load.
use std::time::Duration;

use mesh_lab::{
    Lab, wait_for,
    waypoint::{
        CANARY, HTTPBIN, HTTPBIN_POLICY, HTTPBIN_ROUTES, HTTPBIN_URL, WAYPOINT_IP, gunicorn_hits, shop_pods,
        start_httpbin, stop_httpbin, waypoint_http, waypoint_version,
    },
};

use super::{controller_version, try_curl, wait_agents_at, with_lab_spec};

/// Writes `yaml` as the config file `name` and waits until the agents and the
/// waypoint run the new version.
fn apply(lab: &Lab, name: &str, yaml: &str) {
    let before = controller_version(lab);
    std::fs::write(lab.config_dir().join(name), yaml).unwrap();
    wait_for(Duration::from_secs(5), || controller_version(lab) > before).expect("controller applied the config");
    let version = controller_version(lab);
    wait_agents_at(lab, version);
    wait_for(Duration::from_secs(10), || waypoint_version(lab) >= version)
        .unwrap_or_else(|_| panic!("waypoint not at version {version}: {}", lab.log_of("waypoint")));
}

/// `count` sequential requests from `from` with curl (a new connection each), the
/// response bodies' first lines (`-w` appends the status).
fn bodies(lab: &Lab, from: &str, url: &str, count: usize, curl_args: &str) -> Vec<String> {
    let script = format!(
        "for i in $(seq {count}); do curl -s --max-time 10 {curl_args} -w ' %{{http_code}}\\n' '{url}' | head -c 200; echo; done"
    );
    let out = lab.exec(from, &["sh", "-c", &script]).expect("curl loop");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

fn metric(lab: &Lab, name: &str, labels: &[(&str, &str)]) -> f64 {
    waypoint_http(lab, 15020, "/metrics")
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A raw HTTP/1.1 client: `GET /delay/2` to httpbin on a connection it keeps open
/// (then it creates the file its argument names), then reads to the connection's
/// end. Prints how long after the response's first bytes the connection closed, and
/// the response head.
const KEEP_ALIVE_DRAIN: &str = r#"
import socket, sys, time
s = socket.create_connection(("10.96.0.20", 8000), timeout=20)
s.sendall(b"GET /delay/2 HTTP/1.1\r\nHost: httpbin\r\n\r\n")
open(sys.argv[1], "w").close()
data, first = b"", None
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    if first is None:
        first = time.monotonic()
    data += chunk
print(round(time.monotonic() - first, 2) if first else "never")
print(data.split(b"\r\n\r\n")[0].decode())
"#;

#[test]
fn waypoint_routes_services_that_opt_in_and_fails_closed() {
    let adjust = |spec: &mut mesh_lab::LabSpec| spec.waypoint_bin = Some(super::waypoint_bin());
    with_lab_spec("mesh-wp", 3, &[], Some(&[]), adjust, |lab| {
        start_httpbin(lab, &shop_pods(lab)).expect("httpbin");
        apply(lab, "httpbin.yaml", HTTPBIN);
        // The echo service (namespace shop opted in): the echo server sees the
        // waypoint as its peer, not the client.
        let (code, text) = try_curl(lab, "n1-p1", "http://10.96.0.10/");
        assert_eq!(code, 0, "{text}\n{}", lab.log_of("waypoint"));
        assert!(text.contains(&format!("peer={WAYPOINT_IP}:")), "not through the waypoint: {text}");
        // httpbin shows what the application sees.
        let (code, text) = try_curl(lab, "n2-p1", &format!("{HTTPBIN_URL}/headers?show_env=1"));
        assert_eq!(code, 0, "{text}");
        let headers: serde_json::Value = serde_json::from_str(&text).expect("httpbin JSON");
        let headers = &headers["headers"];
        assert_eq!(
            headers["X-Forwarded-Client-Cert"],
            "By=spiffe://cluster.local/ns/shop/sa/waypoint;URI=spiffe://cluster.local/ns/shop/sa/sa-n2-p1",
            "{headers}"
        );
        assert_eq!(headers["X-Forwarded-For"], lab.pod("n2-p1").ip4.as_str(), "{headers}");
        assert_eq!(headers["X-Forwarded-Proto"], "http", "{headers}");
        assert_eq!(headers["X-Request-Id"].as_str().map(str::len), Some(36), "{headers}");
        // HTTP/2 cleartext (prior knowledge): h2load, 200 requests on 2 connections.
        let out =
            lab.exec("n1-p1", &["h2load", "-n", "200", "-c", "2", "-m", "10", &format!("{HTTPBIN_URL}/get")]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("200 succeeded, 0 failed") && text.contains("200 2xx"), "{text}");
        // Chunked upload streamed through, Expect: 100-continue answered.
        let out = lab
            .exec("n1-p1", &["sh", "-c", &format!("head -c 300000 /dev/zero | curl -s -H 'Transfer-Encoding: chunked' -H 'Expect: 100-continue' --data-binary @- {HTTPBIN_URL}/post -o /dev/null -w '%{{http_code}}'")])
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
        // Request telemetry, valid for promtool.
        let ok = metric(
            lab,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("response_code", "200"),
                ("destination_service", "httpbin.shop.svc.cluster.local"),
                ("source_principal", "spiffe://cluster.local/ns/shop/sa/sa-n2-p1"),
            ],
        );
        assert!(ok >= 1.0, "{}", waypoint_http(lab, 15020, "/metrics"));
        let metrics = waypoint_http(lab, 15020, "/metrics");
        let file = lab.dir.join("waypoint-metrics.txt");
        std::fs::write(&file, &metrics).unwrap();
        let check = std::process::Command::new("sh")
            .args(["-c", &format!("promtool check metrics < {}", file.display())])
            .output()
            .unwrap();
        // Istio's own name for the duration histogram breaks promtool's base-unit lint;
        // anything else it reports is ours.
        let complaints =
            format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
        let ours: Vec<&str> = complaints
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("istio_request_duration_milliseconds use base unit"))
            .collect();
        assert!(ours.is_empty(), "promtool: {complaints}");
        wait_for(Duration::from_secs(2), || lab.log_of("waypoint").contains("request complete")).expect("access log");
        // A graceful stop (SIGTERM, 5 s drain): a request in flight on a keep-alive
        // connection is answered with `connection: close`, and the connection closes
        // right after it (the client can reconnect elsewhere), not when the drain
        // deadline cuts it.
        let sent = lab.dir.join("drain-request-sent");
        let argv = ["python3", "-c", KEEP_ALIVE_DRAIN, sent.to_str().unwrap()];
        let client = std::thread::scope(|scope| {
            let client = scope.spawn(|| lab.exec("n1-p1", &argv).unwrap());
            wait_for(Duration::from_secs(10), || sent.exists()).expect("the client sent its request");
            // Through the agent and the tunnel to the waypoint, well inside the 2 s.
            std::thread::sleep(Duration::from_millis(300));
            lab.stop_process("waypoint", "TERM").unwrap();
            client.join().unwrap()
        });
        let text = String::from_utf8_lossy(&client.stdout).to_lowercase();
        let (closed_after, head) = text.split_once('\n').unwrap_or_default();
        let log = lab.log_of("waypoint");
        assert!(head.starts_with("http/1.1 200") && head.contains("connection: close"), "{text}\n{log}");
        let closed_after: f64 = closed_after.parse().unwrap_or(f64::MAX);
        assert!(closed_after < 1.0, "closed {closed_after} s after the response: {text}");
        lab.start_waypoint().unwrap();
        // The waypoint down: its services' connections fail, never bypass it.
        lab.stop_process("waypoint", "KILL").unwrap();
        let (code, text) = try_curl(lab, "n1-p1", "http://10.96.0.10/");
        assert_ne!(code, 0, "reached the service without its waypoint: {text}");
        lab.start_waypoint().unwrap();
        let (code, text) = try_curl(lab, "n1-p1", "http://10.96.0.10/");
        assert_eq!(code, 0, "{text}");
    });
}

/// Two `ServiceEntry`s in the lab: one whose only endpoint is an unmeshed pod (reached
/// directly, the entry opted out of the namespace's waypoint), and one whose workload
/// selector picks the `version: v2` pods, through the waypoint with a route and a
/// policy bound to the entry.
fn service_entries(unmeshed_ip: &str) -> String {
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy-echo, namespace: shop, labels: {{istio.io/use-waypoint: none}}}}
spec:
  hosts: [legacy.example.internal]
  addresses: [10.96.1.10]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{{address: {unmeshed_ip}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo-v2, namespace: shop}}
spec:
  hosts: [v2.example.internal]
  addresses: [10.96.1.11]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {{labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo-v2, namespace: shop}}
spec:
  hosts: [v2.example.internal]
  http:
  - match: [{{headers: {{x-fault: {{exact: 'yes'}}}}}}]
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: v2.example.internal}}}}]
  - route: [{{destination: {{host: v2.example.internal}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: echo-v2-deny-n2-p1, namespace: shop}}
spec:
  targetRefs: [{{group: networking.istio.io, kind: ServiceEntry, name: echo-v2}}]
  action: DENY
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/sa-n2-p1]}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external-echo, namespace: shop}}
spec:
  hosts: [echo.external.test]
  addresses: [10.96.1.12]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  location: MESH_EXTERNAL
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: nowhere, namespace: shop}}
spec:
  hosts: [nowhere.invalid]
  addresses: [10.96.1.13]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  location: MESH_EXTERNAL
  resolution: DNS
"
    )
}

/// `count` requests to the echo server at `url` from `from`: each answer's first line
/// (`pod=... peer=...`) and status, as `pod=... peer=... local=... 200`.
fn echo_answers(lab: &Lab, from: &str, url: &str, count: usize, curl_args: &str) -> Vec<String> {
    let script = format!(
        "for i in $(seq {count}); do curl -s --max-time 10 {curl_args} -w ' %{{http_code}}' '{url}' | tr -d '\\n'; echo; done"
    );
    let out = lab.exec(from, &["sh", "-c", &script]).expect("curl loop");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn service_entries_reach_their_endpoints_directly_and_through_the_waypoint() {
    let adjust = |spec: &mut mesh_lab::LabSpec| spec.waypoint_bin = Some(super::waypoint_bin());
    with_lab_spec("mesh-se", 3, &[], Some(&[]), adjust, |lab| {
        let unmeshed = lab.pods.iter().find(|p| !p.meshed && p.node == 2).expect("an unmeshed pod on node 2");
        lab.add_host("echo.external.test", &unmeshed.ip4).expect("hosts");
        apply(lab, "entries.yaml", &service_entries(&unmeshed.ip4));
        // The static endpoint outside the mesh: straight to it (the application sees
        // the client, not the waypoint), with the entry's host in the agent's metrics.
        let (code, text) = try_curl(lab, "n1-p1", "http://10.96.1.10/");
        assert_eq!(code, 0, "{text}\n{}", lab.log_of("agent-node1"));
        let client = &lab.pod("n1-p1").ip4;
        assert!(text.starts_with(&format!("pod={} peer={client}:", unmeshed.name)), "{text}");
        let opened = super::metric_lines(lab, 1, "istio_tcp_connections_opened_total");
        assert!(opened.iter().any(|l| l.contains("destination_service=\"legacy.example.internal\"")), "{opened:#?}");
        // The selected pods, through the waypoint: every request answered by a v2 pod,
        // both of them (20 requests: all on one of two is a 1 in 500,000 chance).
        let answers = echo_answers(lab, "n1-p1", "http://10.96.1.11/", 20, "");
        let mut pods: Vec<&str> = answers.iter().filter_map(|l| l.split_whitespace().next()).collect();
        pods.sort_unstable();
        pods.dedup();
        assert_eq!(pods, ["pod=n1-p2", "pod=n2-p2"], "{answers:#?}\n{}", lab.log_of("waypoint"));
        assert!(
            answers.iter().all(|l| l.contains(&format!("peer={WAYPOINT_IP}:")) && l.ends_with(" 200")),
            "{answers:#?}"
        );
        // The entry's route and the policy bound to it.
        let faulted = echo_answers(lab, "n1-p1", "http://10.96.1.11/", 1, "-H 'x-fault: yes'");
        assert!(faulted.last().is_some_and(|l| l.ends_with(" 418")), "{faulted:?}");
        let denied = echo_answers(lab, "n2-p1", "http://10.96.1.11/", 1, "");
        assert!(denied.last().is_some_and(|l| l.ends_with(" 403")), "{denied:?}");
        // The policy is bound to the entry, not to the waypoint: the same client
        // reaches a Service through it.
        let other = echo_answers(lab, "n2-p1", "http://10.96.0.10/", 1, "");
        assert!(other.last().is_some_and(|l| l.ends_with(" 200")), "{other:?}");
        let ok = metric(
            lab,
            "istio_requests_total",
            &[
                ("response_code", "200"),
                ("destination_service", "v2.example.internal"),
                ("destination_service_name", "v2.example.internal"),
            ],
        );
        assert!(ok >= 20.0, "{}", waypoint_http(lab, 15020, "/metrics"));
        // A DNS entry through the waypoint: the waypoint resolves its host (here, by its
        // pod's /etc/hosts) and sends to that address, outside the mesh.
        let answers = echo_answers(lab, "n1-p1", "http://10.96.1.12/", 3, "");
        assert!(
            answers
                .iter()
                .all(|l| l.starts_with(&format!("pod={} peer={WAYPOINT_IP}:", unmeshed.name)) && l.ends_with(" 200")),
            "{answers:#?}\n{}",
            lab.log_of("waypoint")
        );
        let external = metric(
            lab,
            "istio_requests_total",
            &[("response_code", "200"), ("destination_service", "echo.external.test")],
        );
        assert!(external >= 3.0, "{}", waypoint_http(lab, 15020, "/metrics"));
        // A host that does not resolve: no healthy upstream, never a guess.
        let nowhere = echo_answers(lab, "n1-p1", "http://10.96.1.13/", 1, "");
        assert!(nowhere.last().is_some_and(|l| l.ends_with(" 503")), "{nowhere:?}");
        // The entry removed: its address is nobody's, and nothing reaches the pods.
        apply(lab, "entries.yaml", "");
        let (code, text) = try_curl(lab, "n1-p1", "http://10.96.1.11/");
        assert_ne!(code, 0, "still routed without the entry: {text}");
    });
}

#[test]
fn waypoint_canary_retries_faults_timeouts_breaker_and_ejection() {
    let adjust = |spec: &mut mesh_lab::LabSpec| spec.waypoint_bin = Some(super::waypoint_bin());
    with_lab_spec("mesh-wq", 3, &[], Some(&[]), adjust, |lab| {
        start_httpbin(lab, &shop_pods(lab)).expect("httpbin");
        apply(lab, "httpbin.yaml", HTTPBIN);
        apply(lab, "canary.yaml", CANARY);
        // 80/20 over 2000 requests (one keep-alive connection: each request routed).
        let script = "curl -s $(for i in $(seq 2000); do printf 'http://10.96.0.10/ '; done)";
        let out = lab.exec("n1-p1", &["sh", "-c", script]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let v1 = text.lines().filter(|l| l.starts_with("pod=n1-p1 ") || l.starts_with("pod=n2-p1 ")).count();
        let v2 = text.lines().filter(|l| l.starts_with("pod=n1-p2 ") || l.starts_with("pod=n2-p2 ")).count();
        assert_eq!(v1 + v2, 2000, "{}", lab.log_of("waypoint"));
        let share = v1 as f64 / 2000.0;
        eprintln!("canary: v1 {v1}, v2 {v2} ({:.1} % v1)", share * 100.0);
        assert!((0.77..=0.83).contains(&share), "v1 share {share}");
        // The header route.
        let canary = bodies(lab, "n2-p1", "http://10.96.0.10/", 20, "-H 'x-canary: yes'");
        let pods: Vec<&String> = canary.iter().filter(|l| l.starts_with("pod=")).collect();
        assert_eq!(pods.len(), 20, "{canary:?}");
        assert!(pods.iter().all(|l| l.starts_with("pod=n1-p2 ") || l.starts_with("pod=n2-p2 ")), "{canary:?}");

        // A delegate VirtualService: its rules take the place of the root rule that
        // names it, each match narrowed to the root's; a missing delegate costs only
        // its own rule.
        apply(lab, "canary.yaml", DELEGATE);
        let v1 = |l: &&String| l.starts_with("pod=n1-p1 ") || l.starts_with("pod=n2-p1 ");
        let v2 = |l: &&String| l.starts_with("pod=n1-p2 ") || l.starts_with("pod=n2-p2 ");
        for (path, want_v2) in [("/api/v2/x", true), ("/api/x", false), ("/other", false), ("/gone", false)] {
            let out = bodies(lab, "n2-p1", &format!("http://10.96.0.10{path}"), 10, "");
            let hits = out.iter().filter(if want_v2 { v2 } else { v1 }).count();
            assert_eq!(hits, 10, "{path}: {out:?}\n{}", lab.log_of("waypoint"));
        }
        wait_for(Duration::from_secs(2), || lab.log_of("waypoint").contains("shop/nope"))
            .expect("missing delegate warned");

        // A config change never drops a request in flight that still has a route: a
        // 5 s request is answered although new routes were applied under it.
        let slow_url = format!("{HTTPBIN_URL}/delay/5");
        let slow = ["curl", "-sS", "--max-time", "15", "-o", "/dev/null", "-w", "%{http_code}", &slow_url];
        let (status, applied_before) = std::thread::scope(|scope| {
            let request = scope.spawn(|| lab.exec("n1-p1", &slow).unwrap());
            std::thread::sleep(Duration::from_millis(300));
            apply(lab, "httpbin-routes.yaml", HTTPBIN_ROUTES);
            let applied_before = !request.is_finished();
            (String::from_utf8_lossy(&request.join().unwrap().stdout).into_owned(), applied_before)
        });
        assert!(applied_before, "the new routes were applied while the request was in flight");
        assert_eq!(status, "200", "{}", lab.log_of("waypoint"));
        // Retries counted at the upstream: 1 try + 3 retries.
        let before: usize = shop_pods(lab).iter().map(|p| gunicorn_hits(lab, p, "/status/503")).sum();
        let (code, _) = try_curl(lab, "n1-p1", &format!("{HTTPBIN_URL}/status/503"));
        assert_eq!(code, 0);
        wait_for(Duration::from_secs(3), || {
            shop_pods(lab).iter().map(|p| gunicorn_hits(lab, p, "/status/503")).sum::<usize>() - before == 4
        })
        .unwrap_or_else(|_| panic!("retries: {}", lab.log_of("waypoint")));
        wait_for(Duration::from_secs(2), || lab.log_of("waypoint").contains("URX")).expect("retry-exhausted flag");
        // A streamed upload (chunked, 100 KiB: over the 64 KiB read ahead) is retried
        // too, from the copy the waypoint keeps as it passes.
        // POSTs to `path` that reached httpbin in any shop pod.
        let posts = |path: &str| -> usize {
            shop_pods(lab)
                .iter()
                .map(|p| lab.log_of(&format!("httpbin-{p}")).matches(&format!("\"POST {path} ")).count())
                .sum()
        };
        let script = format!(
            "head -c 102400 /dev/zero | curl -s -o /dev/null -w '%{{http_code}}' -T - -X POST {HTTPBIN_URL}/status/503"
        );
        let out = lab.exec("n1-p1", &["sh", "-c", &script]).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "503");
        let retried = || posts("/status/503");
        wait_for(Duration::from_secs(3), || retried() == 4)
            .unwrap_or_else(|_| panic!("chunked upload tried {} times, not 4: {}", retried(), lab.log_of("waypoint")));
        // Over the 1 MiB copy, a retry is given up and counted, as Envoy's
        // `retry_or_shadow_abandoned`. The upstream must read the whole body before it
        // answers (httpbin's `/anything` echoes it; the route retries on 200), so the
        // copy has outgrown its bound by the time a retry is wanted: one try.
        let abandoned = || {
            waypoint_http(lab, 15020, "/metrics").lines().find_map(|l| {
                l.strip_prefix("mesh_waypoint_retry_or_shadow_abandoned_total ")?.trim().parse::<f64>().ok()
            })
        };
        assert_eq!(abandoned(), Some(0.0), "the counter is exported, at 0 before");
        let tries = || posts("/anything/retry-on-200");
        let script = format!(
            "head -c 1572864 /dev/zero | curl -s -o /dev/null -w '%{{http_code}}' -T - -X POST \
             {HTTPBIN_URL}/anything/retry-on-200"
        );
        let out = lab.exec("n1-p1", &["sh", "-c", &script]).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
        wait_for(Duration::from_secs(3), || abandoned() == Some(1.0))
            .unwrap_or_else(|_| panic!("abandoned: {:?}; {}", abandoned(), lab.log_of("waypoint")));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(tries(), 1, "a body over the kept copy is sent once");
        // Under the bound, the same route retries: 1 try + 3 retries.
        let script =
            format!("head -c 102400 /dev/zero | curl -s -o /dev/null -T - -X POST {HTTPBIN_URL}/anything/retry-on-200");
        lab.exec("n1-p1", &["sh", "-c", &script]).unwrap();
        wait_for(Duration::from_secs(3), || tries() == 5)
            .unwrap_or_else(|_| panic!("100 KiB: {} tries in all, not 1 + 4", tries()));
        assert_eq!(abandoned(), Some(1.0));
        // Request timeout: 504 UT.
        let out = bodies(lab, "n1-p1", &format!("{HTTPBIN_URL}/delay/3"), 1, "-o /dev/null");
        assert_eq!(out.iter().map(|l| l.trim()).collect::<Vec<_>>(), ["504"], "{out:?}");
        // It spans the whole response: a body still dripping at 1 s is cut there
        // (curl: 18, transfer closed with outstanding read data).
        let started = std::time::Instant::now();
        let drip = format!("curl -s -o /dev/null -H 'x-timeout: 1' '{HTTPBIN_URL}/drip?duration=4&numbytes=4&delay=0'");
        let out = lab.exec("n1-p1", &["sh", "-c", &drip]).unwrap();
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(18), "a dripping body outlived the route timeout ({took:?})");
        assert!(took < Duration::from_secs(3), "cut after {took:?}");
        // Faults at their percentage, and a delay.
        let faults = bodies(lab, "n1-p1", &format!("{HTTPBIN_URL}/fault"), 200, "-o /dev/null");
        let aborted = faults.iter().filter(|l| l.trim() == "418").count();
        eprintln!("fault: {aborted}/200 aborted");
        assert!((60..=140).contains(&aborted), "{aborted} of 200 aborted at 50 %");
        assert!(faults.iter().all(|l| matches!(l.trim(), "418" | "200")), "{faults:?}");
        // The route's CORS (`exact: '*'`: any origin) and response headers are on the
        // aborted answers too, not only on what the upstream sent.
        let script = format!(
            "for i in $(seq 30); do curl -s -o /dev/null -D - -H 'Origin: https://shop.example' {HTTPBIN_URL}/fault; done"
        );
        let out = lab.exec("n1-p1", &["sh", "-c", &script]).unwrap();
        let heads = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        let heads: Vec<&str> = heads.split("http/1.1 ").filter(|h| !h.is_empty()).collect();
        assert!(heads.iter().any(|h| h.starts_with("418")) && heads.iter().any(|h| h.starts_with("200")), "{heads:?}");
        for head in &heads {
            assert!(
                head.contains("access-control-allow-origin: https://shop.example") && head.contains("x-route: fault"),
                "{head}"
            );
        }
        let out = lab
            .exec("n1-p1", &["curl", "-s", "-o", "/dev/null", "-w", "%{time_total}", &format!("{HTTPBIN_URL}/slow")])
            .unwrap();
        let took: f64 = String::from_utf8_lossy(&out.stdout).parse().unwrap();
        assert!(took >= 0.3, "delay fault: {took} s");
        // Redirect.
        let out = lab
            .exec(
                "n1-p1",
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{redirect_url}",
                    &format!("{HTTPBIN_URL}/moved"),
                ],
            )
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("301 http://10.96.0.20:8000/get"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );

        // A dead endpoint: Istio's default retries hide it, then outlier detection
        // ejects it and readmits it when it is back. gunicorn's workers are children
        // of its master: the whole group is stopped.
        stop_httpbin(lab, "n1-p2").expect("httpbin in n1-p2 stopped");
        // Through the tunnel, a closed port is refused at once (reset), as it would be
        // without the mesh.
        let (code, text) = try_curl(lab, "n2-p1", "http://10.98.1.12:8000/");
        assert!(code != 0 && text.contains("reset"), "closed port: {code} {text}");
        let hidden = bodies(lab, "n2-p1", &format!("{HTTPBIN_URL}/get"), 30, "-o /dev/null");
        assert!(hidden.iter().all(|l| l.trim() == "200"), "{hidden:?}");
        apply(lab, "httpbin-policy.yaml", HTTPBIN_POLICY);
        let _ = bodies(lab, "n2-p1", &format!("{HTTPBIN_URL}/get"), 20, "-o /dev/null");
        wait_for(Duration::from_secs(5), || lab.log_of("waypoint").contains("endpoint ejected"))
            .unwrap_or_else(|_| panic!("no ejection: {}", lab.log_of("waypoint")));
        start_httpbin(lab, &["n1-p2".to_owned()]).expect("httpbin back in n1-p2");
        wait_for(Duration::from_secs(15), || {
            let _ = bodies(lab, "n2-p1", &format!("{HTTPBIN_URL}/get"), 4, "-o /dev/null");
            gunicorn_hits(lab, "n1-p2", "/get") > 0
        })
        .unwrap_or_else(|_| panic!("not readmitted: {}", lab.log_of("waypoint")));
        // An ejection ends by time; the readmission is logged by the next pick's sweep
        // (and the log is written by its own thread): keep a little traffic going.
        wait_for(Duration::from_secs(5), || {
            let _ = bodies(lab, "n2-p1", &format!("{HTTPBIN_URL}/get"), 2, "-o /dev/null");
            lab.log_of("waypoint").contains("endpoint readmitted")
        })
        .unwrap_or_else(|_| panic!("readmission not logged: {}", lab.log_of("waypoint")));
        // 12 concurrent requests for `path`: how many were answered 200 and 503.
        let parallel = |path: &str| {
            let script = format!(
                "curl -s --parallel --parallel-max 12 $(for i in $(seq 12); do printf -- '-o /dev/null -w %%{{http_code}}\\n {HTTPBIN_URL}{path} '; done)"
            );
            let out = lab.exec("n1-p1", &["sh", "-c", &script]).unwrap();
            // Each status is three digits, written back to back.
            let codes = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let codes: Vec<String> = (0..codes.len() / 3).map(|i| codes[3 * i..3 * i + 3].to_owned()).collect();
            let count = |code: &str| codes.iter().filter(|c| *c == code).count();
            (count("200"), count("503"), codes)
        };
        // Circuit breaking: at most 2 requests in flight, the rest 503 UO at once. A
        // request is in flight until its response body ends: `/drip` answers its head
        // at once and its body over a second.
        let (ok, overflow, codes) = parallel("/drip?duration=1&numbytes=4&delay=0");
        eprintln!("breaker: {ok} ok, {overflow} overflow");
        assert!(overflow >= 6 && ok >= 2, "{codes:?}");
        // Connection pool: one connection to the destination (an endpoint without any
        // still gets one, per shard, as in Envoy's per-worker pools: here at most 4
        // endpoints x 2 shards) and one request waiting for a free one; the rest 503
        // UO at once. Without the limits all 12 are served. A refusal of the breaker
        // is no failure of the endpoint: outlier detection, at one 5xx, ejects none.
        apply(lab, "httpbin-policy.yaml", HTTPBIN_POOL);
        let ejections = || lab.log_of("waypoint").matches("endpoint ejected").count();
        let ejected_before = ejections();
        let (ok, overflow, codes) = parallel("/delay/2");
        eprintln!("connection pool: {ok} ok, {overflow} overflow");
        assert!(overflow >= 1 && ok >= 1 && ok + overflow == 12, "{codes:?}\n{}", lab.log_of("waypoint"));
        let _ = bodies(lab, "n2-p1", &format!("{HTTPBIN_URL}/get"), 2, "-o /dev/null");
        assert_eq!(ejections(), ejected_before, "an overflow ejected an endpoint: {}", lab.log_of("waypoint"));
        // Flags in the metrics.
        for flag in ["UO", "FI", "UT", "URX"] {
            assert!(metric(lab, "istio_requests_total", &[("response_flags", flag)]) >= 1.0, "no {flag} in metrics");
        }
    });
}

/// httpbin's connection pool as Istio's circuit-breaking task sets it, and an
/// outlier detection that ejects at the first 5xx.
const HTTPBIN_POOL: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: shop}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 30s}
";

/// A root `VirtualService` for `echo` that hands `/api` to a delegate (v2 for
/// `/api/v2`, v1 for the rest of `/api`), names a delegate that does not exist for
/// `/gone`, and sends everything else to v1.
const DELEGATE: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: shop}
spec:
  host: echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: shop}
spec:
  hosts: [echo]
  http:
  - name: api
    match: [{uri: {prefix: /api}}]
    delegate: {name: echo-api}
  - name: missing
    match: [{uri: {prefix: /gone}}]
    delegate: {name: nope}
  - route: [{destination: {host: echo, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-api, namespace: shop}
spec:
  http:
  - match: [{uri: {prefix: /api/v2}}]
    route: [{destination: {host: echo, subset: v2}}]
  - route: [{destination: {host: echo, subset: v1}}]
";

/// A WebSocket echo server and gRPC's health service (both from `PyPI`) behind
/// Services that use the waypoint.
const WS_AND_GRPC: &str = "\
apiVersion: v1
kind: Service
metadata: {name: ws, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  selector: {app: echo}
  ports: [{name: http-ws, port: 8765, targetPort: 8765}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: shop}
spec:
  clusterIP: 10.96.0.31
  selector: {app: echo}
  ports: [{name: grpc, port: 9090, targetPort: 9090}]
";

const WS_SERVER: &str = "\
from websockets.sync.server import serve
def echo(ws):
    for message in ws:
        ws.send(message)
with serve(echo, '0.0.0.0', 8765) as server:
    server.serve_forever()
";

const WS_CLIENT: &str = "\
from websockets.sync.client import connect
with connect('ws://10.96.0.30:8765/') as ws:
    for i in range(3):
        ws.send(f'hello {i}')
        print(ws.recv())
";

const GRPC_SERVER: &str = "\
import concurrent.futures, grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
server = grpc.server(concurrent.futures.ThreadPoolExecutor(8))
servicer = health.HealthServicer()
servicer.set('shop', health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port('[::]:9090')
server.start()
server.wait_for_termination()
";

const GRPC_CLIENT: &str = "\
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel('10.96.0.31:9090'))
print('check', health_pb2.HealthCheckResponse.ServingStatus.Name(stub.Check(health_pb2.HealthCheckRequest(service='shop'), timeout=5).status))
try:
    stub.Check(health_pb2.HealthCheckRequest(service='nope'), timeout=5)
except grpc.RpcError as e:
    print('unknown', e.code().name)
watch = stub.Watch(health_pb2.HealthCheckRequest(service='shop'), timeout=5)
print('watch', health_pb2.HealthCheckResponse.ServingStatus.Name(next(watch).status))
watch.cancel()
";

#[test]
fn waypoint_websocket_and_grpc() {
    let adjust = |spec: &mut mesh_lab::LabSpec| spec.waypoint_bin = Some(super::waypoint_bin());
    with_lab_spec("mesh-wg", 3, &[], Some(&[]), adjust, |lab| {
        apply(lab, "ws-grpc.yaml", WS_AND_GRPC);
        for pod in shop_pods(lab) {
            lab.spawn_in(&pod, &format!("ws-{pod}"), &["python3", "-c", WS_SERVER]).unwrap();
            lab.spawn_in(&pod, &format!("grpc-{pod}"), &["python3", "-c", GRPC_SERVER]).unwrap();
        }
        for pod in shop_pods(lab) {
            wait_for(Duration::from_secs(20), || {
                let ports = lab.exec(&pod, &["ss", "-ltn"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
                ports.is_ok_and(|p| p.contains(":8765") && p.contains(":9090"))
            })
            .unwrap_or_else(|_| {
                panic!("servers in {pod}: {} {}", lab.log_of(&format!("ws-{pod}")), lab.log_of(&format!("grpc-{pod}")))
            });
        }
        // WebSocket: the upgrade goes through the waypoint and the frames both ways.
        let out = lab.exec("n1-p1", &["python3", "-c", WS_CLIENT]).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello 0\nhello 1\nhello 2\n",
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            lab.log_of("waypoint")
        );
        // A grpcio client script from n2-p1 prints `expected`; each status in
        // `counted` is in the waypoint's request metrics.
        let grpc = |script: &str, expected: &str, counted: &[&str]| {
            let out = lab.exec("n2-p1", &["python3", "-c", script]).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                expected,
                "{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                lab.log_of("waypoint")
            );
            for status in counted {
                let labels = [("request_protocol", "grpc"), ("grpc_response_status", *status)];
                assert!(metric(lab, "istio_requests_total", &labels) >= 1.0, "grpc-status {status} not counted");
            }
        };
        // gRPC: unary, a status in trailers, and a server stream.
        grpc(GRPC_CLIENT, "check SERVING\nunknown NOT_FOUND\nwatch SERVING\n", &["5", "0"]);
        // The waypoint's own answers to gRPC requests are gRPC errors, as Envoy's are:
        // a denied call is PERMISSION_DENIED with the reason as its message.
        apply(lab, "grpc-deny.yaml", GRPC_DENY);
        grpc(GRPC_DENIED_CLIENT, "PERMISSION_DENIED RBAC: access denied\n", &["7"]);
    });
}

/// Denies every call to the gRPC Service at the waypoint.
const GRPC_DENY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: grpc-deny, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: grpc}]
  action: DENY
  rules: [{to: [{operation: {paths: [/grpc.health.v1.Health/*]}}]}]
";

const GRPC_DENIED_CLIENT: &str = "\
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel('10.96.0.31:9090'))
try:
    stub.Check(health_pb2.HealthCheckRequest(service='shop'), timeout=5)
    print('allowed')
except grpc.RpcError as e:
    print(e.code().name, e.details())
";

/// A mirror to the v2 pods, and the echo server's HTTP port declared as TCP with a
/// `VirtualService` `tcp` route to v2 only.
const MIRROR_AND_TCP: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: shop}
spec:
  host: httpbin
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: shop}
spec:
  hosts: [httpbin]
  http:
  - match: [{uri: {prefix: /anything/mirrored}}]
    route: [{destination: {host: httpbin, subset: v1}}]
    mirror: {host: httpbin, subset: v2}
    mirrorPercentage: {value: 100}
  - route: [{destination: {host: httpbin}}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin-plain, namespace: shop}
spec:
  clusterIP: 10.96.0.15
  selector: {app: echo}
  ports: [{port: 8001, targetPort: 8000}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-tcp, namespace: shop}
spec:
  clusterIP: 10.96.0.12
  selector: {app: echo}
  ports: [{name: tcp-echo, port: 81, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo-tcp, namespace: shop}
spec:
  host: echo-tcp
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-tcp, namespace: shop}
spec:
  hosts: [echo-tcp]
  tcp:
  - match: [{port: 81}]
    route: [{destination: {host: echo-tcp, subset: v2}}]
";

/// An `AuthorizationPolicy` bound to the `echo-tcp` Service with one rule.
fn tcp_policy(action: &str, rule: &str) -> String {
    format!(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: echo-tcp, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: echo-tcp}}]
  action: {action}
  rules: [{{{rule}}}]
"
    )
}

/// Sends `request` on a new connection to httpbin's VIP and returns what came back
/// until the server closed (or 5 s of silence).
const RAW_HTTP: &str = "\
import socket, sys
s = socket.create_connection(('10.96.0.20', 8000), timeout=5)
s.sendall(sys.argv[1].encode().decode('unicode_escape').encode('latin-1'))
data = b''
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except socket.timeout:
    pass
print(data.split(b'\\r\\n')[0].decode('latin-1', 'replace'))
";

/// Slowloris: a header line every second, never the end of the headers. Prints how
/// long the server let it go on.
const SLOWLORIS: &str = "\
import socket, time
s = socket.create_connection(('10.96.0.20', 8000), timeout=30)
start = time.monotonic()
s.sendall(b'GET /get HTTP/1.1\\r\\nHost: httpbin\\r\\n')
try:
    for i in range(30):
        time.sleep(1)
        s.sendall(b'x-slow-%d: 1\\r\\n' % i)
    print('still open after', round(time.monotonic() - start), 's')
except OSError as e:
    print('closed after', round(time.monotonic() - start), 's')
";

/// A request to httpbin's Service port without a protocol, its first two bytes apart
/// from the rest. Prints the status line and whether the waypoint added the caller's
/// identity (`x-forwarded-client-cert`, which httpbin echoes).
const SPLIT_REQUEST: &str = "\
import socket, time
s = socket.create_connection(('10.96.0.15', 8001), timeout=10)
s.sendall(b'GE')
time.sleep(0.3)
s.sendall(b'T /headers HTTP/1.1\\r\\nHost: httpbin-plain\\r\\nConnection: close\\r\\n\\r\\n')
data = b''
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.split(b'\\r\\n')[0].decode('latin-1', 'replace'), '|', b'X-Forwarded-Client-Cert' in data)
";

/// Two requests on one connection, 12 s apart. Prints both status lines.
const KEEP_ALIVE: &str = "\
import socket, time
s = socket.create_connection(('10.96.0.20', 8000), timeout=30)
def get():
    s.sendall(b'GET /get HTTP/1.1\\r\\nHost: httpbin\\r\\n\\r\\n')
    data = b''
    while b'\\r\\n\\r\\n' not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 'closed'
        data += chunk
    head, _, body = data.partition(b'\\r\\n\\r\\n')
    lines = head.split(b'\\r\\n')
    length = int([l.split(b':')[1] for l in lines if l.lower().startswith(b'content-length')][0])
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            return 'closed'
        body += chunk
    return lines[0].decode()
first = get()
time.sleep(12)
try:
    second = get()
except OSError as e:
    second = 'error ' + str(e)
print(first, '|', second)
";

/// HTTP/2 rapid reset (CVE-2023-44487): 2000 streams opened and reset at once on one
/// connection. Prints how the server ended the connection, and how many of its
/// answers came back.
const RAPID_RESET: &str = "\
import select, socket, h2.connection, h2.config, h2.events, h2.errors
s = socket.create_connection(('10.96.0.20', 8000), timeout=10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
outcome, answers, ended = 'no goaway', 0, False
def send():
    global ended
    try:
        s.sendall(c.data_to_send())
    except (BrokenPipeError, ConnectionResetError):
        ended = True
def read():
    # Takes in what the server sent; False at the end of the connection.
    global outcome, answers
    try:
        data = s.recv(65536)
    except (socket.timeout, ConnectionResetError):
        return False
    if not data:
        return False
    for e in c.receive_data(data):
        if isinstance(e, h2.events.ResponseReceived):
            answers += 1
        if isinstance(e, h2.events.ConnectionTerminated):
            outcome = 'goaway ' + h2.errors.ErrorCodes(e.error_code).name
    return True
send()
for i in range(2000):
    if ended or outcome != 'no goaway':
        break
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(':method', 'GET'), (':path', '/delay/2'), (':scheme', 'http'), (':authority', 'httpbin')], end_stream=True)
    c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    if i % 100 == 99:
        send()
        # The server may stop the flood before it ends: take in what it answered.
        while not ended and outcome == 'no goaway' and select.select([s], [], [], 0)[0]:
            ended = not read()
if outcome == 'no goaway':
    send()
while outcome == 'no goaway' and read():
    send()
print(outcome if outcome != 'no goaway' or not ended else 'closed', answers)
";

/// HTTP/2 floods other than rapid reset, on one connection (argument: `continuation`,
/// `ping` or `settings`): sent as fast as the connection takes them, unread, then what
/// the server answered: `goaway <code>`, `closed`, `reset` or `open`, and the count of
/// frames sent, PING ACKs and SETTINGS frames received.
const H2_FLOOD: &str = "\
import socket, struct, sys, time
kind = sys.argv[1]
def frame(t, flags, sid, payload=b''):
    return struct.pack('>I', len(payload))[1:] + bytes([t, flags]) + struct.pack('>I', sid) + payload
s = socket.create_connection(('10.96.0.20', 8000), timeout=2)
s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' + frame(4, 0, 0))
if kind == 'continuation':
    # A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION
    # frames of one byte each of a header name 126 bytes long (the decoder waits).
    frames = [frame(1, 0, 1, b'\\x00\\x7e')] + [frame(9, 0, 1, b'a')] * 100000
elif kind == 'ping':
    frames = [frame(6, 0, 0, struct.pack('>Q', i)) for i in range(300000)]
else:
    frames = [frame(4, 0, 0, struct.pack('>HI', 3, 100))] * 300000
data, sent = b''.join(frames), 0
start = time.time()
try:
    while sent < len(data) and time.time() - start < 10:
        sent += s.send(data[sent:sent + 65536])
except (socket.timeout, BrokenPipeError, ConnectionResetError):
    pass
# What the server sent back: its frames, up to a GOAWAY or the end.
got, outcome = b'', 'open'
s.settimeout(3)
try:
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            outcome = 'closed'
            break
        got += chunk
except socket.timeout:
    pass
except ConnectionResetError:
    outcome = 'reset'
i, counts = 0, {}
while i + 9 <= len(got):
    n, t = int.from_bytes(got[i:i + 3], 'big'), got[i + 3]
    counts[t] = counts.get(t, 0) + 1
    if t == 7 and i + 17 <= len(got):
        outcome = 'goaway %d' % int.from_bytes(got[i + 13:i + 17], 'big')
    i += 9 + n
print(outcome, 'sent=%d' % (sent * len(frames) // len(data)), 'pongs=%d' % counts.get(6, 0), 'settings=%d' % counts.get(4, 0))
";

#[test]
fn waypoint_mirror_tcp_routes_and_bad_input() {
    let adjust = |spec: &mut mesh_lab::LabSpec| spec.waypoint_bin = Some(super::waypoint_bin());
    with_lab_spec("mesh-wm", 3, &[], Some(&[]), adjust, |lab| {
        start_httpbin(lab, &shop_pods(lab)).expect("httpbin");
        apply(lab, "httpbin.yaml", HTTPBIN);
        apply(lab, "mirror-tcp.yaml", MIRROR_AND_TCP);
        // Mirror: every request answered by v1 is also received by a v2 pod.
        let answers = bodies(lab, "n1-p1", &format!("{HTTPBIN_URL}/anything/mirrored"), 10, "-o /dev/null");
        assert!(answers.iter().all(|l| l.trim() == "200"), "{answers:?}");
        let hits = |pods: &[&str]| pods.iter().map(|p| gunicorn_hits(lab, p, "/anything/mirrored")).sum::<usize>();
        assert_eq!(hits(&["n1-p1", "n2-p1"]), 10, "primary requests at v1");
        wait_for(Duration::from_secs(5), || hits(&["n1-p2", "n2-p2"]) == 10)
            .unwrap_or_else(|_| panic!("mirrored: {} of 10; {}", hits(&["n1-p2", "n2-p2"]), lab.log_of("waypoint")));
        // A 2 MiB upload without Content-Length (chunked): the primary answers with
        // all of it (httpbin echoes the body as `data`), and the shadow receives all of
        // it too (its echo, logged by gunicorn as the response size, holds the 2 MiB).
        let script = "head -c 2097152 /dev/zero | tr '\\0' a \\
            | curl -s --max-time 20 -T - -X POST -H 'content-type: text/plain' http://10.96.0.20:8000/anything/mirrored/big \\
            | python3 -c 'import json, sys; print(len(json.load(sys.stdin)[\"data\"]))'";
        let out = lab.exec("n1-p1", &["sh", "-c", script]).unwrap();
        let echoed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(echoed, "2097152", "primary's echo of the upload: {}", String::from_utf8_lossy(&out.stderr));
        let big_sizes = |pods: &[&str]| -> Vec<u64> {
            pods.iter()
                .flat_map(|p| {
                    lab.log_of(&format!("httpbin-{p}"))
                        .lines()
                        .filter(|l| l.contains("\"POST /anything/mirrored/big "))
                        .filter_map(|l| l.split("\" ").nth(1)?.split(' ').nth(1)?.parse().ok())
                        .collect::<Vec<u64>>()
                })
                .collect()
        };
        let primary = big_sizes(&["n1-p1", "n2-p1"]);
        assert!(primary.len() == 1 && primary[0] > 2 << 20, "primary: {primary:?}");
        wait_for(Duration::from_secs(10), || big_sizes(&["n1-p2", "n2-p2"]).len() == 1)
            .unwrap_or_else(|_| panic!("large body not mirrored: {}", lab.log_of("waypoint")));
        let shadow = big_sizes(&["n1-p2", "n2-p2"]);
        eprintln!("2 MiB chunked upload: primary answered {primary:?} bytes, shadow {shadow:?}");
        assert!(shadow[0] > 2 << 20, "the shadow got less than the upload: {shadow:?} (primary {primary:?})");
        // TCP route: the HTTP port declared `tcp-`: relayed as bytes by the waypoint
        // (the server sees it as the peer), to v2 pods only.
        let tcp: Vec<String> = bodies(lab, "n1-p1", "http://10.96.0.12:81/", 12, "")
            .into_iter()
            .filter(|l| l.starts_with("pod="))
            .collect();
        assert_eq!(tcp.len(), 12, "{tcp:?}\n{}", lab.log_of("waypoint"));
        for line in &tcp {
            assert!(line.starts_with("pod=n1-p2 ") || line.starts_with("pod=n2-p2 "), "not v2: {line}");
            assert!(line.contains(&format!("peer={WAYPOINT_IP}:")), "not relayed by the waypoint: {line}");
        }
        // L4 authorization at the waypoint: a DENY on n1-p1's principal, bound to the
        // Service, refuses its TCP connections and no one else's.
        apply(
            lab,
            "tcp-authz.yaml",
            &tcp_policy("DENY", "from: [{source: {principals: [cluster.local/ns/shop/sa/sa-n1-p1]}}]"),
        );
        let (code, text) = try_curl(lab, "n1-p1", "http://10.96.0.12:81/");
        assert!(code != 0 && !text.contains("pod="), "a denied caller got through: {text}");
        let (code, text) = try_curl(lab, "n2-p1", "http://10.96.0.12:81/");
        assert!(code == 0 && text.starts_with("pod="), "{text}\n{}", lab.log_of("waypoint"));
        let tcp_denied = [("reporter", "waypoint"), ("response_flags", "RBAC")];
        assert!(metric(lab, "istio_tcp_connections_opened_total", &tcp_denied) >= 1.0);
        // An ALLOW whose only rule needs HTTP attributes matches no TCP connection:
        // with it in force, every caller is refused.
        apply(lab, "tcp-authz.yaml", &tcp_policy("ALLOW", "to: [{operation: {methods: [GET]}}]"));
        let (code, text) = try_curl(lab, "n2-p1", "http://10.96.0.12:81/");
        assert!(code != 0 && !text.contains("pod="), "an HTTP-only ALLOW let TCP through: {text}");
        // Bad input: clear 4xx answers, and the waypoint keeps serving.
        let raw = |request: &str| {
            let out = lab.exec("n1-p1", &["python3", "-c", RAW_HTTP, request]).unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        // A port that declares no protocol is sniffed: a request line sent in pieces
        // (2 bytes, then the rest 300 ms later) is still HTTP, served by the waypoint
        // (httpbin echoes the caller identity it added).
        let out = lab.exec("n1-p1", &["python3", "-c", SPLIT_REQUEST]).unwrap();
        let split = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(split, "HTTP/1.1 200 OK | True", "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            raw("GET /get HTTP/1.1\\r\\nHost: httpbin\\r\\nno colon here\\r\\n\\r\\n"),
            "HTTP/1.1 400 Bad Request"
        );
        assert_eq!(
            raw("GET /get HTTP/1.1\\r\\nHost: httpbin\\r\\nContent-Length: x\\r\\n\\r\\n"),
            "HTTP/1.1 400 Bad Request"
        );
        assert_eq!(raw("BREW /get HTCPCP/1.0\\r\\n\\r\\n"), "HTTP/1.1 400 Bad Request");
        let big = format!("x-big: {}", "a".repeat(100 << 10));
        let out = bodies(lab, "n1-p1", &format!("{HTTPBIN_URL}/get"), 1, &format!("-o /dev/null -H '{big}'"));
        assert_eq!(out.iter().map(|l| l.trim()).collect::<Vec<_>>(), ["431"], "100 KiB header");
        let many: String = (0..150).fold(String::new(), |mut s, i| {
            let _ = std::fmt::Write::write_fmt(&mut s, format_args!(" -H 'x-h{i}: 1'"));
            s
        });
        let out = bodies(lab, "n1-p1", &format!("{HTTPBIN_URL}/get"), 1, &format!("-o /dev/null{many}"));
        assert_eq!(out.iter().map(|l| l.trim()).collect::<Vec<_>>(), ["431"], "150 headers");
        // Meanwhile, a kept-alive connection idle for 12 s (past the 10 s header
        // timeout) still carries its next request: only a request's head is timed.
        let (out, kept) = std::thread::scope(|scope| {
            let kept = scope.spawn(|| lab.exec("n2-p1", &["python3", "-c", KEEP_ALIVE]).unwrap());
            (lab.exec("n1-p1", &["python3", "-c", SLOWLORIS]).unwrap(), kept.join().unwrap())
        });
        let kept = String::from_utf8_lossy(&kept.stdout).trim().to_owned();
        assert_eq!(kept, "HTTP/1.1 200 OK | HTTP/1.1 200 OK", "keep-alive after 12 s idle");
        let slow = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let after: u64 = slow.rsplit(' ').nth(1).and_then(|n| n.parse().ok()).unwrap_or(99);
        assert!(slow.starts_with("closed after") && (9..=15).contains(&after), "slowloris: {slow}");
        let out = lab.exec("n1-p1", &["python3", "-c", RAPID_RESET]).unwrap();
        let reset = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        eprintln!("rapid reset: {reset} {}", String::from_utf8_lossy(&out.stderr));
        assert!(reset.starts_with("goaway ENHANCE_YOUR_CALM"), "rapid reset: {reset}");
        // httpbin got at most a bounded share of the 2000 reset streams.
        let flood: usize = shop_pods(lab).iter().map(|p| gunicorn_hits(lab, p, "/delay/2")).sum();
        eprintln!("rapid reset: {flood} of 2000 reset requests reached httpbin");
        // A header block that never ends gets GOAWAY ENHANCE_YOUR_CALM (11) from the
        // HTTP/2 stack; a client sending PINGs or SETTINGS beyond its budget gets the
        // same from the flood guard, and the waypoint logs why; each time, the next
        // client is served.
        let flood = |kind: &str| {
            let out = lab.exec("n1-p1", &["python3", "-c", H2_FLOOD, kind]).unwrap();
            let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            eprintln!("{kind} flood: {text} {}", String::from_utf8_lossy(&out.stderr));
            let (code, served) = try_curl(lab, "n2-p1", &format!("{HTTPBIN_URL}/get"));
            assert_eq!(code, 0, "after the {kind} flood: {served}");
            text
        };
        for kind in ["continuation", "ping", "settings"] {
            let outcome = flood(kind);
            assert!(outcome.starts_with("goaway 11 "), "{kind} flood: {outcome}");
        }
        let cut = lab.log_of("waypoint").matches("HTTP/2 PING/SETTINGS flood: GOAWAY, connection closed").count();
        assert_eq!(cut, 2, "{}", lab.log_of("waypoint"));
        let (code, text) = try_curl(lab, "n2-p1", &format!("{HTTPBIN_URL}/get"));
        assert_eq!(code, 0, "after the bad input: {text}\n{}", lab.log_of("waypoint"));
    });
}

/// `echo`'s endpoints by locality: `distribute` from the waypoint's zone, 80 % to it
/// and 20 % to the other.
const LOCALITY_DISTRIBUTE: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: shop}
spec:
  host: echo
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        distribute:
        - from: region1/zone1/*
          to: {region1/zone1/*: 80, region1/zone2/*: 20}
";

/// Outlier detection, which turns on Istio's default locality failover: the
/// waypoint's zone first, the rest of its region when that zone's endpoints are gone.
const LOCALITY_FAILOVER: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: shop}
spec:
  host: echo
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 2m, maxEjectionPercent: 100}
";

/// Pods of node 1 (and the waypoint, on node 1) are in `region1/zone1`, those of node 2
/// in `region1/zone2` (the pods' `istio-locality` label).
#[test]
fn waypoint_locality_failover_and_distribute() {
    let adjust = |spec: &mut mesh_lab::LabSpec| spec.waypoint_bin = Some(super::waypoint_bin());
    with_lab_spec("mesh-wl", 3, &[], Some(&[]), adjust, |lab| {
        let mut yaml = std::fs::read_to_string(lab.config_dir().join("lab.yaml")).unwrap();
        for pod in &lab.pods {
            let line = format!("    statefulset.kubernetes.io/pod-name: {}\n", pod.name);
            assert!(yaml.contains(&line), "no label line for {} in the lab's YAML", pod.name);
            yaml = yaml.replace(&line, &format!("{line}    istio-locality: region1.zone{}\n", pod.node));
        }
        let line = format!("    gateway.networking.k8s.io/gateway-name: {}\n", mesh_lab::WAYPOINT);
        assert!(yaml.contains(&line), "no waypoint pod in the lab's YAML");
        yaml = yaml.replace(&line, &format!("{line}    istio-locality: region1.zone1\n"));
        apply(lab, "lab.yaml", &yaml);
        // One keep-alive connection, `count` requests: how many each zone answered.
        let by_zone = |count: usize| -> (usize, usize, String) {
            let script = format!("curl -s $(for i in $(seq {count}); do printf 'http://10.96.0.10/ '; done)");
            let out = lab.exec("n1-p1", &["sh", "-c", &script]).unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let zone1 = text.lines().filter(|l| l.starts_with("pod=n1-")).count();
            let zone2 = text.lines().filter(|l| l.starts_with("pod=n2-")).count();
            (zone1, zone2, text)
        };

        apply(lab, "echo-dr.yaml", LOCALITY_DISTRIBUTE);
        let (zone1, zone2, _) = by_zone(200);
        eprintln!("distribute: zone1 {zone1}, zone2 {zone2}");
        assert_eq!(zone1 + zone2, 200, "{}", lab.log_of("waypoint"));
        assert!((140..=180).contains(&zone1), "80/20 by locality: zone1 {zone1}, zone2 {zone2}");

        apply(lab, "echo-dr.yaml", LOCALITY_FAILOVER);
        let (zone1, zone2, _) = by_zone(40);
        assert_eq!((zone1, zone2), (40, 0), "all in the waypoint's zone\n{}", lab.log_of("waypoint"));
        // Zone 1's servers stop: outlier detection ejects them (retries hide the
        // failures meanwhile), and the traffic fails over to zone 2.
        for pod in ["n1-p1", "n1-p2"] {
            lab.stop_process(pod, "KILL").expect("echo server stopped");
        }
        wait_for(Duration::from_secs(10), || {
            let _ = by_zone(10);
            lab.log_of("waypoint").matches("endpoint ejected").count() >= 2
        })
        .unwrap_or_else(|_| panic!("zone 1 not ejected: {}", lab.log_of("waypoint")));
        let (zone1, zone2, text) = by_zone(40);
        eprintln!("failover: zone1 {zone1}, zone2 {zone2}");
        assert_eq!((zone1, zone2), (0, 40), "all failed over to zone 2: {text}\n{}", lab.log_of("waypoint"));
    });
}

/// Makes an RSA key, its JWKS and tokens with pyjwt: prints them as one JSON object.
const TOKENS: &str = "\
import json, time, jwt
from cryptography.hazmat.primitives.asymmetric import rsa
key, other = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
jwk.update(kid='lab', alg='RS256', use='sig')
now = int(time.time())
def token(signer, **claims):
    body = dict(iss='https://issuer.lab', sub='alice', aud='httpbin', iat=now, exp=now + 600)
    body.update(claims)
    return jwt.encode(body, signer, algorithm='RS256', headers={'kid': 'lab'})
print(json.dumps({
    'jwks': json.dumps({'keys': [jwk]}),
    'admin': token(key, groups=['admins']),
    'user': token(key, groups=['users']),
    'expired': token(key, groups=['admins'], exp=now - 3600),
    'forged': token(other, groups=['admins']),
}))
";

/// L7 policies bound to the httpbin Service: a DENY on a path, and an ALLOW that lets
/// `/anything/private*` through only for a JWT of the lab's issuer in group `admins`.
fn security_policies(jwks: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: httpbin, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: httpbin}}]
  jwtRules:
  - issuer: https://issuer.lab
    audiences: [httpbin]
    jwks: '{jwks}'
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: httpbin-deny, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: httpbin}}]
  action: DENY
  rules:
  - to: [{{operation: {{paths: ['/anything/admin*']}}}}]
  - to: [{{operation: {{methods: [DELETE]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: httpbin-allow, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: httpbin}}]
  action: ALLOW
  rules:
  - to: [{{operation: {{notPaths: ['/anything/private*']}}}}]
  - from: [{{source: {{requestPrincipals: ['https://issuer.lab/*']}}}}]
    to: [{{operation: {{paths: ['/anything/private*']}}}}]
    when: [{{key: 'request.auth.claims[groups]', values: [admins]}}]
"
    )
}

#[test]
fn waypoint_l7_authorization_and_jwt() {
    let adjust = |spec: &mut mesh_lab::LabSpec| spec.waypoint_bin = Some(super::waypoint_bin());
    with_lab_spec("mesh-wa", 2, &[], Some(&[]), adjust, |lab| {
        start_httpbin(lab, &shop_pods(lab)).expect("httpbin");
        apply(lab, "httpbin.yaml", HTTPBIN);
        let out = lab.exec("n1-p1", &["python3", "-c", TOKENS]).unwrap();
        let tokens: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        apply(lab, "security.yaml", &security_policies(tokens["jwks"].as_str().unwrap()));
        let status = |path: &str, args: &str| {
            let out =
                bodies(lab, "n1-p1", &format!("{HTTPBIN_URL}{path}"), 1, &format!("-o /dev/null --path-as-is {args}"));
            out.first().map(|l| l.trim().to_owned()).unwrap_or_default()
        };
        let bearer = |name: &str| format!("-H 'Authorization: Bearer {}'", tokens[name].as_str().unwrap());
        // The DENY, and each way of writing the path a normalizing proxy must see through.
        assert_eq!(status("/anything/ok", ""), "200");
        for path in
            ["/anything/admin", "/anything/./admin", "/anything/x/../admin", "/anything/%61dmin", "/anything/admin%23x"]
        {
            assert_eq!(status(path, ""), "403", "{path} must be denied\n{}", lab.log_of("waypoint"));
        }
        assert_eq!(status("/anything/ok", "-X DELETE"), "403");
        let out = lab.exec("n1-p1", &["curl", "-s", &format!("{HTTPBIN_URL}/anything/admin")]).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "RBAC: access denied");
        // Two different hosts in one request: refused before any policy.
        let out = lab
            .exec(
                "n1-p1",
                &["python3", "-c", RAW_HTTP, "GET /anything/ok HTTP/1.1\\r\\nHost: a\\r\\nHost: b\\r\\n\\r\\n"],
            )
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "HTTP/1.1 400 Bad Request");
        // JWT: no token, a user's, an admin's, an expired and a forged one.
        assert_eq!(status("/anything/private", ""), "403");
        assert_eq!(status("/anything/private", &bearer("user")), "403");
        assert_eq!(status("/anything/private", &bearer("admin")), "200");
        assert_eq!(status("/anything/private", &bearer("expired")), "401");
        assert_eq!(status("/anything/private", &bearer("forged")), "401");
        assert_eq!(status("/anything/ok", &bearer("forged")), "401", "an invalid token is refused anywhere");
        assert_eq!(status("/anything/admin", &bearer("admin")), "403", "DENY wins over a valid token");
        // What the application sees: the claim as a header, the token removed.
        let out = lab
            .exec("n1-p1", &["sh", "-c", &format!("curl -s {} {HTTPBIN_URL}/anything/private", bearer("admin"))])
            .unwrap();
        let seen: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(seen["headers"]["X-Jwt-Sub"], "alice", "{seen}");
        assert!(seen["headers"].get("Authorization").is_none(), "token forwarded: {seen}");
        assert!(metric(lab, "istio_requests_total", &[("response_code", "403"), ("response_flags", "RBAC")]) >= 1.0);
        super::wait_logged(|| lab.log_of("waypoint"), "flags=\"RBAC\"");

        // CUSTOM: an external authorizer (Python's HTTP server) in n2-p1, declared in
        // the mesh config as Istio users declare it.
        lab.spawn_in("n2-p1", "ext-authz", &["python3", "-c", EXT_AUTHZ]).unwrap();
        wait_for(Duration::from_secs(10), || {
            lab.exec("n2-p1", &["ss", "-ltn"]).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(":9191"))
        })
        .unwrap_or_else(|_| panic!("authorizer: {}", lab.log_of("ext-authz")));
        apply(lab, "ext-authz.yaml", CUSTOM_POLICY);
        assert_eq!(status("/anything/custom", "-H 'x-ext-authz: allow'"), "200", "{}", lab.log_of("waypoint"));
        let out = lab
            .exec("n1-p1", &["curl", "-s", "-i", &format!("{HTTPBIN_URL}/anything/custom"), "-H", "x-ext-authz: no"])
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("HTTP/1.1 403"), "{text}");
        assert!(text.contains("x-ext-authz-check-result: denied") && text.ends_with("denied by ext_authz"), "{text}");
        let out = lab
            .exec("n1-p1", &["curl", "-s", &format!("{HTTPBIN_URL}/anything/custom"), "-H", "x-ext-authz: allow"])
            .unwrap();
        let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(seen["headers"]["X-Ext-Authz-Check-Result"], "allowed", "{seen}");
        assert_eq!(status("/anything/other", ""), "200", "paths the CUSTOM policy does not name");
        super::wait_logged(|| lab.log_of("waypoint"), "flags=\"UAEX\"");
        // The authorizer down: denied (statusOnError), never allowed.
        lab.stop_process("ext-authz", "KILL").unwrap();
        assert_eq!(status("/anything/custom", "-H 'x-ext-authz: allow'"), "403");
        assert!(waypoint_http(lab, 15020, "/metrics").contains("mesh_waypoint_ext_authz_error_total 1"));

        // The authorizer's pod is meshed: the check went through the tunnel, with the
        // waypoint's identity (its agent logged the inbound stream on port 9191).
        wait_for(Duration::from_secs(2), || {
            lab.agent_log(2).lines().any(|l| {
                l.contains("direction=\"inbound\"")
                    && l.contains("src.identity=spiffe://cluster.local/ns/shop/sa/waypoint")
                    && l.contains(":9191")
            })
        })
        .unwrap_or_else(|_| panic!("no tunneled check at node2's agent: {}", lab.agent_log(2)));

        // X-Forwarded-For with one trusted proxy (the mesh config's
        // gatewayTopology.numTrustedProxies): remoteIpBlocks sees the client the proxy
        // named, ipBlocks the direct peer.
        apply(lab, "remote-ip.yaml", REMOTE_IP_POLICY);
        let xff = |value: &str| status("/anything/xff", &format!("-H 'X-Forwarded-For: {value}'"));
        assert_eq!(xff("203.0.113.7"), "403", "{}", lab.log_of("waypoint"));
        assert_eq!(xff("203.0.113.7, 198.51.100.1"), "200", "only the rightmost entry is trusted");
        assert_eq!(xff("garbage"), "200");
        assert_eq!(status("/anything/xff", ""), "200");

        // A policy of a namespace with no pod on the waypoint's node still reaches the
        // waypoint: without it this service's requests would get 503 (no endpoints),
        // not the DENY's 403.
        apply(lab, "ghost.yaml", GHOST);
        let out = lab.exec("n1-p1", &["curl", "-s", "-m", "5", "-w", " %{http_code}", "http://10.96.0.14/x"]).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "RBAC: access denied 403", "{}", lab.log_of("waypoint"));

        // A local rate limit, the EnvoyFilter of Istio's documentation bound to the
        // Service: 4 tokens a minute, then 429 with flag RL and the configured header.
        apply(lab, "ratelimit.yaml", RATE_LIMIT);
        let codes = bodies(lab, "n1-p1", &format!("{HTTPBIN_URL}/anything/ok"), 10, "-o /dev/null");
        let codes: Vec<&str> = codes.iter().map(|l| l.trim()).collect();
        assert_eq!(
            codes,
            ["200", "200", "200", "200", "429", "429", "429", "429", "429", "429"],
            "{}",
            lab.log_of("waypoint")
        );
        let out = lab.exec("n1-p1", &["curl", "-s", "-i", &format!("{HTTPBIN_URL}/anything/ok")]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("HTTP/1.1 429") && text.contains("x-local-rate-limit: true"), "{text}");
        assert!(metric(lab, "istio_requests_total", &[("response_code", "429"), ("response_flags", "RL")]) >= 7.0);
    });
}

const RATE_LIMIT: &str = "\
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: httpbin-ratelimit, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: httpbin}]
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_INBOUND
      listener: {filterChain: {filter: {name: envoy.filters.network.http_connection_manager}}}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          '@type': type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value:
            stat_prefix: http_local_rate_limiter
            token_bucket: {max_tokens: 4, tokens_per_fill: 4, fill_interval: 60s}
            filter_enabled: {runtime_key: local_rate_limit_enabled, default_value: {numerator: 100, denominator: HUNDRED}}
            filter_enforced: {runtime_key: local_rate_limit_enforced, default_value: {numerator: 100, denominator: HUNDRED}}
            response_headers_to_add:
            - append: false
              header: {key: x-local-rate-limit, value: 'true'}
";

/// DENY by the client's address as a trusted proxy reports it (`remoteIpBlocks`), and
/// by the direct peer (`ipBlocks`, which no X-Forwarded-For can change).
const REMOTE_IP_POLICY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-remote-ip, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: httpbin}]
  action: DENY
  rules:
  - from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]
  - from: [{source: {ipBlocks: [203.0.113.0/24]}}]
";

/// A Service of a namespace without pods (so without pods on the waypoint's node),
/// served by the `shop` waypoint, and a DENY bound to it.
const GHOST: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: ghost}
---
apiVersion: v1
kind: Service
metadata:
  name: ghost
  namespace: ghost
  labels: {istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: shop}
spec:
  clusterIP: 10.96.0.14
  selector: {app: nobody}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ghost-deny, namespace: ghost}
spec:
  targetRefs: [{kind: Service, group: '', name: ghost}]
  action: DENY
  rules: [{to: [{operation: {paths: ['/x']}}]}]
";

/// An HTTP authorizer: allows requests with `x-ext-authz: allow` (and says so in a
/// header for upstream), denies the rest with a body and a header.
const EXT_AUTHZ: &str = "\
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Check(BaseHTTPRequestHandler):
    def answer(self):
        allowed = self.headers.get('x-ext-authz') == 'allow'
        body = b'' if allowed else b'denied by ext_authz'
        self.send_response(200 if allowed else 403)
        self.send_header('x-ext-authz-check-result', 'allowed' if allowed else 'denied')
        self.send_header('content-length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = answer
ThreadingHTTPServer(('0.0.0.0', 9191), Check).serve_forever()
";

const CUSTOM_POLICY: &str = "\
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    defaultConfig:
      gatewayTopology: {numTrustedProxies: 1}
    extensionProviders:
    - name: lab-authz
      envoyExtAuthzHttp:
        service: ext-authz.shop.svc.cluster.local
        port: 9191
        includeRequestHeadersInCheck: [x-ext-authz]
        headersToUpstreamOnAllow: [x-ext-authz-check-result]
        headersToDownstreamOnDeny: [x-ext-authz-check-result]
---
apiVersion: v1
kind: Service
metadata: {name: ext-authz, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec:
  clusterIP: 10.96.0.13
  selector: {statefulset.kubernetes.io/pod-name: n2-p1}
  ports: [{name: http, port: 9191, targetPort: 9191}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-custom, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: httpbin}]
  action: CUSTOM
  provider: {name: lab-authz}
  rules: [{to: [{operation: {paths: ['/anything/custom*']}}]}]
";

/// An OTLP/HTTP receiver on OpenTelemetry's own protocol definitions
/// (`opentelemetry-proto`): prints one JSON line per span received.
const OTLP_RECEIVER: &str = "\
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
def value(v):
    return v.string_value or v.int_value or v.bool_value
class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers['content-length']))
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            resource = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    print(json.dumps({'path': self.path, 'service': resource.get('service.name'), 'trace_id': s.trace_id.hex(),
                        'span_id': s.span_id.hex(), 'parent_span_id': s.parent_span_id.hex(), 'name': s.name, 'kind': s.kind,
                        'attributes': {a.key: value(a.value) for a in s.attributes}}), flush=True)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header('content-type', 'application/x-protobuf')
        self.send_header('content-length', str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(('0.0.0.0', 4318), Receiver).serve_forever()
";

const TRACING: &str = "\
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: lab-otel
      opentelemetry:
        service: otel.shop.svc.cluster.local
        port: 4318
        http: {path: /v1/traces}
---
apiVersion: v1
kind: Service
metadata: {name: otel, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec:
  clusterIP: 10.96.0.14
  selector: {statefulset.kubernetes.io/pod-name: n2-p1}
  ports: [{name: http, port: 4318, targetPort: 4318}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: lab-otel}]
    randomSamplingPercentage: 100
    customTags:
      lab: {literal: {value: waypoint-e2e}}
      client: {header: {name: x-client, defaultValue: none}}
";

#[test]
fn waypoint_traces_to_an_otlp_receiver() {
    let adjust = |spec: &mut mesh_lab::LabSpec| spec.waypoint_bin = Some(super::waypoint_bin());
    with_lab_spec("mesh-wt", 2, &[], Some(&[]), adjust, |lab| {
        start_httpbin(lab, &shop_pods(lab)).expect("httpbin");
        apply(lab, "httpbin.yaml", HTTPBIN);
        lab.spawn_in("n2-p1", "otlp", &["python3", "-c", OTLP_RECEIVER]).unwrap();
        wait_for(Duration::from_secs(10), || {
            lab.exec("n2-p1", &["ss", "-ltn"]).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(":4318"))
        })
        .unwrap_or_else(|_| panic!("receiver: {}", lab.log_of("otlp")));
        apply(lab, "tracing.yaml", TRACING);
        let headers_seen = |args: &[&str]| -> serde_json::Value {
            let mut argv = vec!["curl", "-s"];
            argv.extend_from_slice(args);
            let url = format!("{HTTPBIN_URL}/headers");
            argv.push(&url);
            let out = lab.exec("n1-p1", &argv).unwrap();
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))["headers"]
                .clone()
        };
        // W3C: the trace goes on with the waypoint's span as the parent upstream.
        let seen = headers_seen(&[
            "-H",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "-H",
            "x-client: e2e",
        ]);
        let upstream = seen["Traceparent"].as_str().unwrap_or_else(|| panic!("no traceparent upstream: {seen}"));
        let parts: Vec<&str> = upstream.split('-').collect();
        assert_eq!((parts[0], parts[1], parts[3]), ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01"), "{upstream}");
        let waypoint_span = parts[2].to_owned();
        assert_ne!(waypoint_span, "00f067aa0ba902b7", "the waypoint's own span id");
        // B3 (single header): the same trace id upstream.
        let seen = headers_seen(&["-H", "b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"]);
        assert!(seen.to_string().contains("80f198ee56343ba864fe8b2a57d3eff7"), "B3 not propagated: {seen}");
        // The span, exported over OTLP/HTTP, with its parent link and tags.
        let span = || {
            lab.log_of("otlp")
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|s| s["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736")
        };
        wait_for(Duration::from_secs(10), || span().is_some())
            .unwrap_or_else(|_| panic!("no span: {}\n{}", lab.log_of("otlp"), lab.log_of("waypoint")));
        let span = span().unwrap();
        assert_eq!(span["parent_span_id"], "00f067aa0ba902b7", "{span}");
        assert_eq!(span["span_id"], waypoint_span.as_str(), "{span}");
        assert_eq!(span["path"], "/v1/traces");
        assert_eq!(span["name"], "httpbin.shop.svc.cluster.local:8000/*", "{span}");
        assert_eq!(span["kind"], 2, "SERVER: {span}");
        assert_eq!(span["attributes"]["http.status_code"], "200", "{span}");
        assert_eq!(span["attributes"]["lab"], "waypoint-e2e", "{span}");
        assert_eq!(span["attributes"]["client"], "e2e", "{span}");
        assert_eq!(span["service"], "waypoint.shop", "{span}");
        let b3 = lab.log_of("otlp").contains("80f198ee56343ba864fe8b2a57d3eff7");
        wait_for(Duration::from_secs(5), || lab.log_of("otlp").contains("80f198ee56343ba864fe8b2a57d3eff7"))
            .unwrap_or_else(|_| panic!("no span for the B3 request (seen before wait: {b3})"));

        // The Telemetry API's access-log filter and metric overrides, on httpbin only;
        // echo keeps the defaults (every request logged, standard labels).
        let httpbin = [("destination_service_name", "httpbin")];
        let request_bytes_before = metric(lab, "istio_request_bytes_count", &httpbin);
        apply(lab, "telemetry.yaml", TELEMETRY);
        let ok = bodies(lab, "n1-p1", &format!("{HTTPBIN_URL}/get?tel=ok"), 5, "-o /dev/null");
        let missing = bodies(lab, "n1-p1", &format!("{HTTPBIN_URL}/status/404?tel=nf"), 5, "-o /dev/null");
        let echo = bodies(lab, "n1-p1", "http://10.96.0.10/?tel=echo", 3, "-o /dev/null");
        assert!(ok.iter().chain(&echo).all(|l| l.trim() == "200"), "{ok:?} {echo:?}");
        assert!(missing.iter().all(|l| l.trim() == "404"), "{missing:?}");
        let logged = |marker: &str| {
            lab.log_of("waypoint").lines().filter(|l| l.contains("request complete") && l.contains(marker)).count()
        };
        wait_for(Duration::from_secs(5), || logged("tel=nf") == 5 && logged("tel=echo") == 3).unwrap_or_else(|_| {
            panic!("nf {} echo {}: {}", logged("tel=nf"), logged("tel=echo"), lab.log_of("waypoint"))
        });
        assert_eq!(logged("tel=ok"), 0, "200s are filtered out of httpbin's log");
        let canary = |code: &str| {
            metric(
                lab,
                "istio_requests_total",
                &[httpbin[0], ("response_code", code), ("lane", "canary"), ("request_host", "10.96.0.20:8000")],
            )
        };
        let metrics = waypoint_http(lab, 15020, "/metrics");
        assert!((canary("200") - 5.0).abs() < 0.5 && (canary("404") - 5.0).abs() < 0.5, "{metrics}");
        let lines =
            |family: &str| metrics.lines().filter(move |l| l.starts_with(&format!("{family}{{"))).collect::<Vec<_>>();
        let with_lane: Vec<_> = lines("istio_requests_total").into_iter().filter(|l| l.contains("lane=")).collect();
        assert!(!with_lane.is_empty() && with_lane.iter().all(|l| !l.contains("request_protocol=")), "{with_lane:?}");
        assert!(
            lines("istio_requests_total")
                .iter()
                .any(|l| l.contains("destination_service_name=\"echo\"") && l.contains("request_protocol=\"http\"")),
            "echo keeps its labels"
        );
        assert!(lines("istio_request_duration_milliseconds_count").iter().all(|l| !l.contains("lane=")));
        let request_bytes = metric(lab, "istio_request_bytes_count", &httpbin);
        assert!((request_bytes - request_bytes_before).abs() < 0.5, "REQUEST_SIZE disabled: {request_bytes}");
        // The span exporter's counters are on the metrics endpoint: spans were exported,
        // none dropped.
        let spans = |result: &str| metric(lab, "mesh_waypoint_spans_total", &[("result", result)]);
        assert!(
            spans("exported") >= 1.0 && spans("dropped") == 0.0,
            "{}",
            lines("mesh_waypoint_spans_total").join("\n")
        );
    });
}

/// httpbin's access log keeps only errors; its request count drops
/// `request_protocol` and gains `request_host` and a literal `lane`; its request
/// sizes are not recorded.
const TELEMETRY: &str = "\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: httpbin-errors-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: httpbin}]
  accessLogging:
  - filter: {expression: 'response.code >= 400'}
  metrics:
  - overrides:
    - match: {metric: REQUEST_COUNT}
      tagOverrides:
        request_protocol: {operation: REMOVE}
        request_host: {value: request.host}
        lane: {value: \"'canary'\"}
    - match: {metric: REQUEST_SIZE}
      disabled: true
";
