//! `cargo xtask demo`: runs the mesh in a 2-node lab and shows, step by step, what it
//! does with real requests, then tears the lab down.
use std::{process::Command, time::Duration};

use anyhow::{Context, ensure};
use mesh_lab::{HTTP_PORT, Lab, waypoint};

use crate::lab_spec;

fn step(title: &str) {
    println!("\n\x1b[1m==> {title}\x1b[0m");
}

fn show_cmd(target: &str, cmd: &str) {
    println!("  $ cargo xtask lab exec {target} -- {cmd}");
}

fn counters(lab: &Lab, node: usize) -> anyhow::Result<String> {
    let s = lab.agent_stats(node)?;
    Ok(format!(
        "agent: accepted={} tunneled={} same_node={} passthrough={} inbound={} denied={} plaintext_refused={} | kernel: captured={} inbound_steered={} strict_refused={}",
        s["agent"]["accepted"],
        s["agent"]["tunneled"],
        s["agent"]["same_node"],
        s["agent"]["forwarded"],
        s["agent"]["inbound_accepted"],
        s["agent"]["denied"],
        s["agent"]["plaintext_refused"],
        s["kernel"]["captured"],
        s["kernel"]["inbound_steered"],
        s["kernel"]["inbound_strict_refused"],
    ))
}

/// The last access-log line of node `n`'s agent with all of `needles`, waiting up to
/// 2 s for it: the agent writes its log in batches, shortly after a connection ends.
fn access_log(lab: &Lab, n: usize, needles: &[&str]) -> Option<String> {
    let find = || {
        let log = lab.agent_log(n);
        log.lines()
            .rev()
            .find(|l| l.contains("connection complete") && needles.iter().all(|x| l.contains(x)))
            .map(|l| l.split_once(" access: ").map_or(l, |(_, rest)| rest).to_owned())
    };
    let mut line = None;
    let _ = mesh_lab::wait_for(Duration::from_secs(2), || {
        line = find();
        line.is_some()
    });
    line
}

fn try_curl(lab: &Lab, from: &str, url: &str) -> anyhow::Result<String> {
    let out = lab.exec(from, &["curl", "-sS", "--max-time", "3", url])?;
    Ok(if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    } else {
        format!("refused ({})", String::from_utf8_lossy(&out.stderr).trim())
    })
}

fn apply(lab: &Lab, file: &str, yaml: Option<&str>) -> anyhow::Result<()> {
    let before = lab.controller_version()?;
    let path = lab.config_dir().join(file);
    match yaml {
        Some(yaml) => std::fs::write(&path, yaml)?,
        None => std::fs::remove_file(&path)?,
    }
    mesh_lab::wait_for(Duration::from_secs(10), || {
        let v = lab.controller_version().unwrap_or(0);
        v > before && (1..=lab.nodes.len()).all(|n| lab.agent_config_version(n) == v)
    })
}

const DENY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-n1-p1
  namespace: shop
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/shop/sa/sa-n1-p1\"]
";

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: shop
spec:
  mtls:
    mode: STRICT
";

pub fn demo() -> anyhow::Result<()> {
    step(
        "Bringing up the lab: 2 nodes, 3 pods each (2 meshed in `shop`, 1 in `legacy`), a controller, one mesh-agent per node",
    );
    let lab = Lab::up(lab_spec(2, 3))?;
    print!("{}", lab.status());
    let server = lab.pod("n2-p1").clone();
    let url4 = format!("http://{}:{HTTP_PORT}/", server.ip4);
    let url6 = format!("http://[{}]:{HTTP_PORT}/", server.ip6);

    step("A meshed pod (n1-p1) calls a meshed pod on the other node: HBONE mTLS tunnel");
    show_cmd("n1-p1", &format!("curl -s {url4}"));
    let before = lab.agent_stats(1)?["agent"]["tunneled"].as_u64().unwrap_or(0);
    println!("  reply: {}", try_curl(&lab, "n1-p1", &url4)?);
    let after = lab.agent_stats(1)?["agent"]["tunneled"].as_u64().unwrap_or(0);
    ensure!(after == before + 1, "the request did not go through the tunnel");
    println!("  node1 {}", counters(&lab, 1)?);
    println!("  node1 (client side): {}", access_log(&lab, 1, &["outbound"]).unwrap_or_default());
    println!("  node2 (server side): {}", access_log(&lab, 2, &["inbound"]).unwrap_or_default());
    println!("  The kernel sent the connection to node1's agent inside n1-p1; the agent opened an HTTP/2");
    println!("  CONNECT over TLS 1.3 to n2-p1:15008 with n1-p1's certificate; node2's agent checked the");
    println!("  SPIFFE identity (src.identity above) and the policies, then connected to the application.");

    step("What the fabric sees: a capture between the nodes");
    let pcap = lab.dir.join("demo.pcap");
    let pcap_arg = pcap.display().to_string();
    lab.spawn_in("fabric", "tcpdump", &["tcpdump", "-i", "n2", "--immediate-mode", "-U", "-w", &pcap_arg, "tcp"])?;
    mesh_lab::wait_for(Duration::from_secs(5), || lab.log_of("tcpdump").contains("listening on"))?;
    // A fresh agent on node1 means a fresh tunnel connection, handshake included.
    lab.stop_agent(1, "TERM")?;
    lab.start_agent(1)?;
    lab.wait_certificates()?;
    let marker = "SECRET-PAYLOAD-0xC0FFEE";
    show_cmd("n1-p1", &format!("curl -s -d {marker} {url4}"));
    lab.exec("n1-p1", &["curl", "-s", "--max-time", "3", "-d", marker, &url4])?;
    std::thread::sleep(Duration::from_millis(300));
    lab.stop_process("tcpdump", "INT")?;
    let captured = std::fs::read(&pcap)?;
    let has = |needle: &[u8]| captured.windows(needle.len()).any(|w| w == needle);
    let summary = Command::new("tcpdump").args(["-nr", &pcap_arg, "-c", "4"]).output()?;
    print!("{}", indent(&String::from_utf8_lossy(&summary.stdout)));
    println!(
        "  {} bytes captured: TLS 1.3 handshake present: {}; payload marker in clear: {}",
        captured.len(),
        has(&[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
        has(marker.as_bytes())
    );
    ensure!(!has(marker.as_bytes()), "the payload crossed the fabric in clear");

    step("The same over IPv6");
    show_cmd("n1-p1", &format!("curl -s -g {url6}"));
    println!("  reply: {}", try_curl(&lab, "n1-p1", &url6)?);

    step("A meshed pod calls a meshed pod of its own node (n1-p1 -> n1-p2): the agent delivers it itself");
    let local_url = format!("http://{}:{HTTP_PORT}/", lab.pod("n1-p2").ip4);
    show_cmd("n1-p1", &format!("curl -s {local_url}"));
    let same_node = || lab.agent_stats(1).map(|s| s["agent"]["same_node"].as_u64().unwrap_or(0));
    let before = same_node()?;
    println!("  reply: {}", try_curl(&lab, "n1-p1", &local_url)?);
    ensure!(same_node()? == before + 1, "the same-node request was not delivered by the agent");
    println!("  node1: {}", access_log(&lab, 1, &["inbound", "same_node"]).unwrap_or_default());
    println!("  No tunnel to itself: the agent ran the destination's identity and policy checks and");
    println!("  delivered from n1-p1's address; no byte left the two pods' namespaces (--tunnel-same-node");
    println!("  would carry it through HBONE like a cross-node call).");

    step("A service VIP (echo.shop, 10.96.0.10:80) is balanced over its endpoints on both nodes");
    show_cmd("n1-p1", "curl -s http://10.96.0.10/   (x6)");
    for _ in 0..6 {
        println!("  reply: {}", try_curl(&lab, "n1-p1", "http://10.96.0.10:80/")?);
    }

    step("A pod outside the mesh (n1-p3, namespace legacy) calls n2-p1 in plaintext");
    show_cmd("n1-p3", &format!("curl -s {url4}"));
    println!("  reply: {}", try_curl(&lab, "n1-p3", &url4)?);
    println!("  node2's sk_lookup program steered it to the agent's 15006 listener in n2-p1; PERMISSIVE");
    println!("  (the default) lets it in: {}", access_log(&lab, 2, &["inbound_plaintext"]).unwrap_or_default());
    println!("  The application sees the real caller (peer=), tunneled or not: the agent delivers from the");
    println!("  caller's address on a transparent socket inside the pod.");

    step("PeerAuthentication STRICT in namespace shop: plaintext is refused, mTLS carries on");
    apply(&lab, "strict.yaml", Some(STRICT))?;
    println!("  n1-p3 (plaintext): {}", try_curl(&lab, "n1-p3", &url4)?);
    println!("  n1-p1 (mesh):      {}", try_curl(&lab, "n1-p1", &url4)?);
    println!("  node2 {}", counters(&lab, 2)?);
    println!("  The kernel refused the plaintext SYN (strict_refused): none of n1-p3's bytes reached node2.");
    apply(&lab, "strict.yaml", None)?;

    step("A DENY policy applied live closes an open connection and refuses new ones");
    let hold = lab.spec.echo_bin.display().to_string();
    let target = format!("{}:{}", server.ip4, mesh_lab::ECHO_PORT);
    lab.spawn_in("n1-p1", "hold", &[&hold, "hold", "--addr", &target, "--seconds", "30"])?;
    mesh_lab::wait_for(Duration::from_secs(5), || lab.log_of("hold").lines().count() > 5)?;
    println!(
        "  n1-p1 holds a connection to n2-p1:{}: {} lines echoed so far",
        mesh_lab::ECHO_PORT,
        lab.log_of("hold").lines().count()
    );
    print!("{}", indent(DENY));
    apply(&lab, "deny.yaml", Some(DENY))?;
    mesh_lab::wait_for(Duration::from_secs(5), || lab.log_of("hold").contains("closed"))?;
    println!("  open connection: {}", lab.log_of("hold").lines().last().unwrap_or_default());
    println!("  new from n1-p1: {}", try_curl(&lab, "n1-p1", &url4)?);
    println!("  new from n1-p2: {}", try_curl(&lab, "n1-p2", &url4)?);
    println!("  node2: {}", access_log(&lab, 2, &["denied"]).unwrap_or_default());
    apply(&lab, "deny.yaml", None)?;

    step("Istio's TCP metrics on node2's :15020/metrics");
    let metrics = lab.node_http(2, 15020, "/metrics")?;
    for line in metrics.lines().filter(|l| l.starts_with("istio_tcp_connections_opened_total{")).take(4) {
        println!("  {line}");
    }

    step("Un-enrolling n1-p1 stops capture at once; enrolling it again resumes it");
    lab.unenroll("n1-p1")?;
    println!("  after un-enroll (direct, not captured): {}", try_curl(&lab, "n1-p1", &url4)?);
    lab.enroll("n1-p1")?;
    lab.wait_certificates()?;
    println!("  after enroll: {}", try_curl(&lab, "n1-p1", &url4)?);
    println!("  node1 {}", counters(&lab, 1)?);

    step("Restarting node1's agent: capture fails closed, then resumes with the saved pods");
    lab.stop_agent(1, "KILL")?;
    println!("  agent down, meshed pod: {}", try_curl(&lab, "n1-p1", &url4)?);
    lab.start_agent(1)?;
    lab.wait_certificates()?;
    println!("  agent back: {}", try_curl(&lab, "n1-p1", &url4)?);

    step("Upgrading node1's agent under load: the new one takes the sockets over, nothing is refused");
    let load_target = format!("{}:{}", server.ip4, mesh_lab::ECHO_PORT);
    show_cmd("n1-p1", &format!("mesh-echo load --addr {load_target} --rate 300 --seconds 5"));
    lab.spawn_in("n1-p1", "load", &[&hold, "load", "--addr", &load_target, "--rate", "300", "--seconds", "5"])?;
    std::thread::sleep(Duration::from_secs(1));
    lab.start_agent(1)?;
    mesh_lab::wait_for(Duration::from_secs(10), || lab.agent_log(1).contains("took the node over"))?;
    mesh_lab::wait_for(Duration::from_secs(15), || lab.log_of("load").contains("connections"))?;
    let report = lab.log_of("load");
    println!("  load: {}", report.trim());
    println!(
        "  new agent: {}",
        lab.agent_log(1).lines().find(|l| l.contains("took the node over")).unwrap_or_default()
    );
    ensure!(report.contains("\"failed\":0"), "connections failed during the upgrade");

    step("The controller is away and node1's agent restarts: it serves on its saved view and certificates");
    lab.stop_controller()?;
    lab.stop_agent(1, "KILL")?;
    lab.start_agent(1)?;
    let dump = lab.config_dump(1)?;
    println!(
        "  restored view: {} (version {}, received {} s ago); agent ready",
        dump["control"]["restored"], dump["control"]["version"], dump["control"]["age_seconds"]
    );
    println!("  n1-p1 -> n2-p1 (still mTLS): {}", try_curl(&lab, "n1-p1", &url4)?);
    lab.start_controller()?;
    lab.wait_agent_ready(1)?;

    control_plane(&lab)?;

    step("The agent's admin API (node1, 127.0.0.1:15000/pods)");
    let pods: serde_json::Value = serde_json::from_str(&lab.node_http(1, 15000, "/pods")?)?;
    for pod in pods["pods"].as_array().context("pods list")? {
        println!(
            "  {} ns={} identity={} cookie={} listeners={}",
            pod["name"], pod["namespace"], pod["identity"], pod["netns_cookie"], pod["listeners"]
        );
    }

    step("Tearing the lab down");
    drop(lab);

    waypoint()?;
    kubernetes_mode()?;

    let netns = Command::new("ip").args(["netns", "list"]).output()?;
    let left: Vec<String> =
        String::from_utf8_lossy(&netns.stdout).lines().filter(|l| l.starts_with("mesh-")).map(str::to_owned).collect();
    println!("  ip netns list: {}", if left.is_empty() { "nothing of the lab".to_owned() } else { left.join(", ") });
    ensure!(mesh_lab::leftovers(crate::LAB_PREFIX).is_empty(), "the lab left something behind");
    println!("\ndemo complete");
    Ok(())
}

/// Writes (or removes) a config file and waits until the agents and the waypoint run it.
fn apply_waypoint(lab: &Lab, file: &str, yaml: &str) -> anyhow::Result<()> {
    apply(lab, file, Some(yaml))?;
    let version = lab.controller_version()?;
    mesh_lab::wait_for(Duration::from_secs(10), || waypoint::waypoint_version(lab) >= version)
}

/// Statuses of `count` requests (one curl, one keep-alive connection).
fn statuses(lab: &Lab, from: &str, url: &str, count: usize, extra: &str) -> anyhow::Result<Vec<String>> {
    let script = format!("for i in $(seq {count}); do curl -s -o /dev/null -w '%{{http_code}} ' {extra} '{url}'; done");
    let out = lab.exec(from, &["sh", "-c", &script])?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect())
}

fn tally(statuses: &[String]) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for s in statuses {
        *counts.entry(s.as_str()).or_default() += 1;
    }
    counts.iter().map(|(s, n)| format!("{n} x {s}")).collect::<Vec<_>>().join(", ")
}

/// The waypoint: L7 traffic management for the namespace `shop`.
fn waypoint() -> anyhow::Result<()> {
    step(
        "A waypoint for namespace shop (Gateway istio-waypoint + label istio.io/use-waypoint), httpbin in the shop pods",
    );
    let mut spec = lab_spec(2, 3);
    spec.waypoint_bin = Some(crate::release_bin("mesh-waypoint"));
    let lab = Lab::up(spec)?;
    waypoint::start_httpbin(&lab, &waypoint::shop_pods(&lab))?;
    apply_waypoint(&lab, "httpbin.yaml", waypoint::HTTPBIN)?;
    show_cmd("n1-p1", "curl -s http://10.96.0.10/");
    println!(
        "  {}   <- the echo server sees the waypoint ({}) as its peer",
        try_curl(&lab, "n1-p1", "http://10.96.0.10/")?,
        waypoint::WAYPOINT_IP
    );
    let headers = try_curl(&lab, "n1-p1", &format!("{}/headers", waypoint::HTTPBIN_URL))?;
    let xfcc = serde_json::from_str::<serde_json::Value>(&headers)?["headers"]["X-Forwarded-Client-Cert"].clone();
    println!("  httpbin sees X-Forwarded-Client-Cert: {xfcc}");

    step("The seed's canary: DestinationRule subsets by version, VirtualService 80/20, 1000 requests");
    apply_waypoint(&lab, "canary.yaml", waypoint::CANARY)?;
    let script = "curl -s $(for i in $(seq 1000); do printf 'http://10.96.0.10/ '; done)";
    let out = lab.exec("n1-p1", &["sh", "-c", script])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v1 = text.lines().filter(|l| l.starts_with("pod=n1-p1 ") || l.starts_with("pod=n2-p1 ")).count();
    let v2 = text.lines().filter(|l| l.starts_with("pod=n1-p2 ") || l.starts_with("pod=n2-p2 ")).count();
    println!("  v1: {v1}, v2: {v2} ({:.1} % / {:.1} %)", v1 as f64 / 10.0, v2 as f64 / 10.0);
    let script = "for i in $(seq 20); do curl -s -H 'x-canary: yes' http://10.96.0.10/; done";
    let out = lab.exec("n1-p1", &["sh", "-c", script])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v2 = text.lines().filter(|l| l.starts_with("pod=n1-p2 ") || l.starts_with("pod=n2-p2 ")).count();
    println!("  with the header x-canary: yes, {v2} of 20 requests went to v2 (the header route)");

    step("Routes on httpbin: fault injection (50 % abort 418), a 1 s timeout, retries on 5xx, a redirect");
    apply_waypoint(&lab, "httpbin-routes.yaml", waypoint::HTTPBIN_ROUTES)?;
    let url = waypoint::HTTPBIN_URL;
    println!("  /fault x 100: {}", tally(&statuses(&lab, "n1-p1", &format!("{url}/fault"), 100, "")?));
    println!("  /delay/3 (timeout 1s): {}", tally(&statuses(&lab, "n1-p1", &format!("{url}/delay/3"), 1, "")?));
    let before: usize = waypoint::shop_pods(&lab).iter().map(|p| waypoint::gunicorn_hits(&lab, p, "/status/503")).sum();
    let answer = statuses(&lab, "n1-p1", &format!("{url}/status/503"), 1, "")?;
    std::thread::sleep(Duration::from_millis(300));
    let after: usize = waypoint::shop_pods(&lab).iter().map(|p| waypoint::gunicorn_hits(&lab, p, "/status/503")).sum();
    println!("  /status/503 (3 retries): {} to the client, {} tries seen by httpbin", tally(&answer), after - before);
    let out = lab.exec(
        "n1-p1",
        &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} -> %{redirect_url}", &format!("{url}/moved")],
    )?;
    println!("  /moved: {}", String::from_utf8_lossy(&out.stdout));

    step("A dead endpoint (httpbin in n1-p2 stopped): retries hide it, outlier detection ejects it, it comes back");
    waypoint::stop_httpbin(&lab, "n1-p2")?;
    println!("  30 requests: {}", tally(&statuses(&lab, "n2-p1", &format!("{url}/get"), 30, "")?));
    apply_waypoint(&lab, "httpbin-policy.yaml", waypoint::HTTPBIN_POLICY)?;
    let _ = statuses(&lab, "n2-p1", &format!("{url}/get"), 20, "")?;
    if let Some(line) = lab.log_of("waypoint").lines().find(|l| l.contains("endpoint ejected")) {
        println!("  waypoint: {}", line.split_once(" INFO ").map_or(line, |(_, rest)| rest));
    }
    waypoint::start_httpbin(&lab, &["n1-p2".to_owned()])?;
    mesh_lab::wait_for(Duration::from_secs(15), || {
        let _ = statuses(&lab, "n2-p1", &format!("{url}/get"), 4, "");
        waypoint::gunicorn_hits(&lab, "n1-p2", "/get") > 0
    })?;
    if let Some(line) = lab.log_of("waypoint").lines().find(|l| l.contains("endpoint readmitted")) {
        println!("  waypoint: {}", line.split_once(" INFO ").map_or(line, |(_, rest)| rest));
    }

    step("Circuit breaking (http2MaxRequests: 2): 12 concurrent slow requests");
    let script = format!(
        "curl -s --parallel --parallel-max 12 $(for i in $(seq 12); do printf -- '-o /dev/null -w %%{{http_code}}_ {url}/delay/1 '; done)"
    );
    let out = lab.exec("n1-p1", &["sh", "-c", &script])?;
    let codes: Vec<String> =
        String::from_utf8_lossy(&out.stdout).split('_').filter(|c| !c.is_empty()).map(str::to_owned).collect();
    println!("  {}   (503s carry the response flag UO)", tally(&codes));

    step("Request metrics on the waypoint's :15020/metrics (istio_requests_total, by response code and flag)");
    let metrics = waypoint::waypoint_http(&lab, 15020, "/metrics");
    let mut by_code = std::collections::BTreeMap::<(String, String), f64>::new();
    for line in metrics.lines().filter(|l| l.starts_with("istio_requests_total{")) {
        let label = |key: &str| {
            line.split(&format!("{key}=\"")).nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_owned()
        };
        let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *by_code.entry((label("response_code"), label("response_flags"))).or_default() += value;
    }
    for ((code, flags), n) in by_code {
        println!("  response_code={code} response_flags={flags}: {n}");
    }
    step("Tearing the waypoint lab down");
    drop(lab);
    Ok(())
}

fn meshctl(lab: &Lab, args: &[&str]) -> anyhow::Result<String> {
    let bin = crate::release_bin("meshctl").display().to_string();
    let mut command = vec![bin.as_str()];
    command.extend(args);
    let out = lab.exec("fabric", &command)?;
    Ok(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn indent(text: &str) -> String {
    text.lines().flat_map(|l| ["    ", l, "\n"]).collect()
}

const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: only-shop
  namespace: shop
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/shop/sa/sa-n1-p1\"]
";

const BROKEN: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: echo
  namespace: shop
spec:
  hosts: [echo]
  http:
  - timeout: 2x
    route:
    - destination:
        host: echo
        subset: v3
";

/// The controller: config stream, identities, a live change, a rejected change.
fn control_plane(lab: &Lab) -> anyhow::Result<()> {
    step("The controller serves the lab's YAML to both agents over mTLS (meshctl status)");
    print!("{}", indent(&meshctl(lab, &["status"])?));
    let dump = lab.config_dump(1)?;
    println!("  node1's view: {} objects {}", dump["control"]["objects"], dump["control"]["kinds"]);
    for (identity, status) in dump["control"]["certificates"].as_object().into_iter().flatten() {
        println!("  certificate {identity}: expires at {}, issued {} time(s)", status["not_after"], status["renewals"]);
    }

    step("Applying an AuthorizationPolicy live: the agents pick it up");
    let start = std::time::Instant::now();
    apply(lab, "policy.yaml", Some(POLICY))?;
    println!("  wrote {}", lab.config_dir().join("policy.yaml").display());
    println!("  file written -> both agents running the new version in {:?}", start.elapsed());
    let url = format!("http://{}:{HTTP_PORT}/", lab.pod("n2-p1").ip4);
    println!("  enforced at once: n1-p1 -> n2-p1: {}", try_curl(lab, "n1-p1", &url)?);
    println!("                    n1-p2 -> n2-p1: {}", try_curl(lab, "n1-p2", &url)?);
    print!("{}", indent(&meshctl(lab, &["status"])?));

    step("A broken edit is rejected as a whole; the running configuration stays");
    let broken = lab.config_dir().join("broken.yaml");
    std::fs::write(&broken, BROKEN)?;
    println!("  meshctl validate (offline, same checks as the controller):");
    print!("{}", indent(&meshctl(lab, &["validate", &lab.config_dir().display().to_string()])?));
    mesh_lab::wait_for(std::time::Duration::from_secs(10), || {
        lab.controller_status().is_ok_and(|s| s["rejections"].as_u64().unwrap_or(0) > 0)
    })?;
    print!("{}", indent(&meshctl(lab, &["status"])?));
    std::fs::remove_file(&broken)?;
    Ok(())
}

fn enrolled(lab: &Lab, node: usize) -> anyhow::Result<Vec<String>> {
    let dump = lab.config_dump(node)?;
    Ok(dump["pods"].as_array().into_iter().flatten().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect())
}

fn wait_enrolled(lab: &Lab, node: usize, count: usize) -> anyhow::Result<()> {
    mesh_lab::wait_for(Duration::from_secs(15), || enrolled(lab, node).is_ok_and(|p| p.len() == count))
        .with_context(|| format!("node{node}'s agent did not reach {count} enrolled pods"))
}

/// Kubernetes mode: the controller on an API server (the test double serving recorded
/// API objects rewritten to the lab's pods), token-authenticated agents that find their
/// pods themselves, labels that enroll and release pods in place, problems reported on
/// the objects.
fn kubernetes_mode() -> anyhow::Result<()> {
    step("Kubernetes mode: the controller watches an API server, agents enroll their node's pods themselves");
    println!("  (no cluster here: tests/fake-apiserver.py serves recorded API objects rewritten to the lab's pods,");
    println!("   speaking the API's list/watch/patch protocol to the controller's kube-rs watchers)");
    let mut spec = lab_spec(2, 2);
    spec.kubernetes = true;
    let lab = Lab::up(spec)?;
    for n in 1..=2 {
        println!("  node{n}'s agent enrolled, without any enrollment call: {:?}", enrolled(&lab, n)?);
    }
    let controller = lab.controller_log();
    for needle in ["cluster listed", "leading", "certificate issued"] {
        if let Some(line) = controller.lines().find(|l| l.contains(needle)) {
            println!("  controller: {}", line.split_once("  ").map_or(line, |(_, rest)| rest.trim()));
        }
    }
    println!("  agents authenticated with their ServiceAccount tokens (TokenReview); each got certificates");
    println!("  only for the pods of its own node.");

    step("kubectl label namespace legacy istio.io/dataplane-mode=ambient: its running pods join in place");
    let pid = std::fs::read_to_string(lab.dir.join("n1-p2.pid"))?;
    let label = r#"{"metadata":{"labels":{"istio.io/dataplane-mode":"ambient"}}}"#;
    lab.api("PATCH", "/api/v1/namespaces/legacy", "application/merge-patch+json", label)?;
    wait_enrolled(&lab, 1, 2)?;
    println!("  node1 now: {:?} (n1-p2's process is still pid {}, not restarted)", enrolled(&lab, 1)?, pid.trim());
    let unlabel = r#"{"metadata":{"labels":{"istio.io/dataplane-mode":null}}}"#;
    lab.api("PATCH", "/api/v1/namespaces/legacy", "application/merge-patch+json", unlabel)?;
    wait_enrolled(&lab, 1, 1)?;
    println!("  label removed: node1 back to {:?}", enrolled(&lab, 1)?);

    step("Mesh-wide STRICT: kubelet's probes (from the node, to the pod's probe port) still reach the pod");
    let before = lab.controller_version()?;
    let strict = r#"{"apiVersion":"security.istio.io/v1","kind":"PeerAuthentication","metadata":{"name":"default","namespace":"istio-system"},"spec":{"mtls":{"mode":"STRICT"}}}"#;
    lab.api(
        "POST",
        "/apis/security.istio.io/v1/namespaces/istio-system/peerauthentications",
        "application/json",
        strict,
    )?;
    mesh_lab::wait_for(Duration::from_secs(10), || {
        let v = lab.controller_version().unwrap_or(0);
        v > before && (1..=2).all(|n| lab.agent_config_version(n) == v)
    })?;
    let url = format!("http://{}:{HTTP_PORT}/", lab.pod("n1-p1").ip4);
    println!("  kubelet (node1) -> n1-p1:{HTTP_PORT} (readiness probe port): {}", try_curl(&lab, "node1", &url)?);
    println!("  n1-p2 (legacy, plaintext) -> n1-p1:{HTTP_PORT}:            {}", try_curl(&lab, "n1-p2", &url)?);
    println!(
        "  n1-p1 -> n2-p1 (mTLS): {}",
        try_curl(&lab, "n1-p1", &format!("http://{}:{HTTP_PORT}/", lab.pod("n2-p1").ip4))?
    );

    step("An invalid VirtualService is reported on the object; everything else keeps applying");
    let broken = r#"{"apiVersion":"networking.istio.io/v1","kind":"VirtualService","metadata":{"name":"broken","namespace":"shop"},"spec":{"hosts":["echo"],"http":[{"timeout":"2x","route":[{"destination":{"host":"echo"},"weight":70}]}]}}"#;
    lab.api("POST", "/apis/networking.istio.io/v1/namespaces/shop/virtualservices", "application/json", broken)?;
    let find = |kind: &str| {
        lab.api_state()["objects"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(_, o)| o.clone())
            .find(|o| o["kind"] == kind && (kind != "VirtualService" || o["status"]["conditions"].is_array()))
    };
    mesh_lab::wait_for(Duration::from_secs(15), || find("Event").is_some() && find("VirtualService").is_some())
        .context("no Event and status for the invalid VirtualService")?;
    let event = find("Event").context("event")?;
    println!(
        "  Event {} {} on {}/{}: {}",
        event["type"], event["reason"], event["regarding"]["kind"], event["regarding"]["name"], event["note"]
    );
    let vs = find("VirtualService").context("vs")?;
    println!("  status.conditions[0]: {}", vs["status"]["conditions"][0]);
    let kubeconfig = format!("KUBECONFIG={}", lab.api_dir().join("kubeconfig").display());
    let meshctl = crate::release_bin("meshctl").display().to_string();
    let out = lab.exec("fabric", &["env", &kubeconfig, &meshctl, "validate", "--kubernetes"])?;
    println!("  meshctl validate --kubernetes:");
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));

    step("Tearing the Kubernetes-mode lab down");
    drop(lab);
    ensure!(mesh_lab::leftovers(crate::LAB_PREFIX).is_empty(), "the lab left something behind");
    Ok(())
}
