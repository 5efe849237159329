//! The waypoint, end to end: source agents tunnel a service's traffic to it, it
//! routes with the service's VirtualService/DestinationRule and tunnels on to the
//! endpoints; the servers are httpbin (Istio's sample app, from PyPI, under gunicorn)
//! and the lab's echo server; the clients curl and h2load.
use std::{collections::BTreeMap, time::Duration};

use mesh_lab::{Lab, wait_for};

use super::{controller_version, try_curl, wait_agents_at, with_lab_spec};

/// The httpbin Service: a VIP in front of the shop pods' gunicorn on port 8000.
const HTTPBIN: &str = "\
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
const HTTPBIN_URL: &str = "http://10.96.0.20:8000";
const WAYPOINT_IP: &str = "10.98.1.250";

fn shop_pods(lab: &Lab) -> Vec<String> {
    lab.pods.iter().filter(|p| p.meshed).map(|p| p.name.clone()).collect()
}

/// Starts httpbin under gunicorn in every shop pod (threads: concurrent requests)
/// and waits until each answers locally.
fn start_httpbin(lab: &Lab) {
    for pod in shop_pods(lab) {
        lab.spawn_in(
            &pod,
            &format!("httpbin-{pod}"),
            &["python3", "-m", "gunicorn", "-b", "[::]:8000", "-k", "gthread", "--threads", "16", "httpbin:app"],
        )
        .expect("start httpbin");
    }
    for pod in shop_pods(lab) {
        wait_for(Duration::from_secs(30), || {
            lab.exec(&pod, &["curl", "-sf", "http://127.0.0.1:8000/status/200"]).is_ok_and(|o| o.status.success())
        })
        .unwrap_or_else(|_| panic!("httpbin in {pod} did not come up: {}", lab.log_of(&format!("httpbin-{pod}"))));
    }
}

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

fn waypoint_http(lab: &Lab, port: u16, path: &str) -> String {
    let out =
        lab.exec("waypoint", &["curl", "-sS", "--max-time", "5", &format!("http://127.0.0.1:{port}{path}")]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn waypoint_version(lab: &Lab) -> u64 {
    serde_json::from_str::<serde_json::Value>(&waypoint_http(lab, 15000, "/stats"))
        .ok()
        .and_then(|v| v["version"].as_u64())
        .unwrap_or(0)
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

#[test]
fn waypoint_routes_services_that_opt_in_and_fails_closed() {
    let adjust = |spec: &mut mesh_lab::LabSpec| spec.waypoint_bin = Some(super::waypoint_bin());
    with_lab_spec("mesh-wp", 3, &[], Some(&[]), adjust, |lab| {
        start_httpbin(lab);
        apply(lab, "httpbin.yaml", HTTPBIN);
        // The echo service (namespace shop opted in): the echo server sees the
        // waypoint as its peer, not the client.
        let (code, text) = try_curl(lab, "n1-p1", "http://10.96.0.10/");
        assert_eq!(code, 0, "{text}\n{}", lab.log_of("waypoint"));
        assert!(text.contains(&format!("peer={WAYPOINT_IP}:")), "not through the waypoint: {text}");
        // httpbin shows what the application sees.
        let (code, text) = try_curl(lab, "n2-p1", &format!("{HTTPBIN_URL}/headers"));
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
        // HTTP/2 cleartext (prior knowledge) and keep-alive through one connection.
        let out = lab
            .exec(
                "n1-p1",
                &[
                    "curl",
                    "-s",
                    "--http2-prior-knowledge",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_version} %{http_code}\n",
                    &format!("{HTTPBIN_URL}/get"),
                    &format!("{HTTPBIN_URL}/get"),
                ],
            )
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200\n2 200\n");
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
        let check = lab
            .exec(
                "waypoint",
                &["sh", "-c", &format!("printf '%s' '{}' | promtool check metrics", metrics.replace('\'', "'\\''"))],
            )
            .unwrap();
        assert!(check.status.success(), "promtool: {}", String::from_utf8_lossy(&check.stderr));
        assert!(lab.log_of("waypoint").contains("request complete"), "no access log");
        // The waypoint down: its services' connections fail, never bypass it.
        lab.stop_process("waypoint", "KILL").unwrap();
        let (code, text) = try_curl(lab, "n1-p1", "http://10.96.0.10/");
        assert_ne!(code, 0, "reached the service without its waypoint: {text}");
        lab.start_waypoint().unwrap();
        let (code, text) = try_curl(lab, "n1-p1", "http://10.96.0.10/");
        assert_eq!(code, 0, "{text}");
    });
}
