//! `cargo xtask demo`: runs the mesh in a 2-node lab and shows, step by step, what it
//! does with real requests, then tears the lab down.
use std::process::Command;

use anyhow::{Context, ensure};
use mesh_lab::{HTTP_PORT, Lab};

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
        "agent: accepted={} forwarded={} bytes_sent={} bytes_received={} | kernel: captured={} skipped_bypass_mark={} skipped_loopback={}",
        s["agent"]["accepted"],
        s["agent"]["forwarded"],
        s["agent"]["bytes_sent"],
        s["agent"]["bytes_received"],
        s["kernel"]["captured"],
        s["kernel"]["skipped_bypass_mark"],
        s["kernel"]["skipped_loopback"]
    ))
}

pub fn demo() -> anyhow::Result<()> {
    step("Bringing up the lab: 2 nodes, 2 pods each, one mesh-agent per node");
    let lab = Lab::up(lab_spec(2, 2))?;
    print!("{}", lab.status());
    let server = lab.pod("n2-p1").clone();
    let url4 = format!("http://{}:{HTTP_PORT}/", server.ip4);
    let url6 = format!("http://[{}]:{HTTP_PORT}/", server.ip6);

    step("A meshed pod (n1-p1, namespace shop) calls a pod on the other node");
    show_cmd("n1-p1", &format!("curl -s {url4}"));
    let before = lab.agent_stats(1)?["agent"]["forwarded"].as_u64().unwrap_or(0);
    let reply = lab.curl("n1-p1", &url4)?;
    print!("  reply: {reply}");
    let after = lab.agent_stats(1)?["agent"]["forwarded"].as_u64().unwrap_or(0);
    ensure!(after == before + 1, "the request did not go through node1's agent");
    println!("  node1 {}", counters(&lab, 1)?);
    println!("  The kernel's connect4 hook sent it to the agent's listener inside n1-p1; the");
    println!("  agent forwarded it from inside the pod, so the server still saw the pod's own address.");
    let log = lab.agent_log(1);
    if let Some(line) = log.lines().rev().find(|l| l.contains("connection complete")) {
        println!("  access log: {line}");
    }

    step("The same over IPv6");
    show_cmd("n1-p1", &format!("curl -s -g {url6}"));
    print!("  reply: {}", lab.curl("n1-p1", &url6)?);
    println!("  node1 {}", counters(&lab, 1)?);

    step("A pod outside the mesh (n1-p2, namespace legacy) is not captured");
    show_cmd("n1-p2", &format!("curl -s {url4}"));
    print!("  reply: {}", lab.curl("n1-p2", &url4)?);
    println!("  node1 {}  (unchanged)", counters(&lab, 1)?);

    step("Un-enrolling n1-p1 stops capture at once; enrolling it again resumes it");
    lab.unenroll("n1-p1")?;
    print!("  after un-enroll, reply: {}", lab.curl("n1-p1", &url4)?);
    println!("  node1 {}", counters(&lab, 1)?);
    lab.enroll("n1-p1")?;
    print!("  after enroll, reply: {}", lab.curl("n1-p1", &url4)?);
    println!("  node1 {}", counters(&lab, 1)?);

    step("Restarting node1's agent: capture fails closed, then resumes with the saved pods");
    lab.stop_agent(1, "KILL")?;
    let out = lab.exec("n1-p1", &["curl", "-sS", "--max-time", "3", &url4])?;
    println!("  agent down, meshed pod: {}", String::from_utf8_lossy(&out.stderr).trim());
    lab.start_agent(1)?;
    print!("  agent back, reply: {}", lab.curl("n1-p1", &url4)?);

    control_plane(&lab)?;

    step("The agent's admin API (node1, 127.0.0.1:15000/pods)");
    let pods: serde_json::Value = serde_json::from_str(&lab.node_http(1, 15000, "/pods")?)?;
    for pod in pods["pods"].as_array().context("pods list")? {
        println!(
            "  {} ns={} identity={} cookie={} listeners={} forwarded={}",
            pod["name"],
            pod["namespace"],
            pod["identity"],
            pod["netns_cookie"],
            pod["listeners"],
            pod["counters"]["forwarded"]
        );
    }

    step("Tearing the lab down");
    drop(lab);
    let netns = Command::new("ip").args(["netns", "list"]).output()?;
    let left: Vec<String> =
        String::from_utf8_lossy(&netns.stdout).lines().filter(|l| l.starts_with("mesh-")).map(str::to_owned).collect();
    println!("  ip netns list: {}", if left.is_empty() { "nothing of the lab".to_owned() } else { left.join(", ") });
    ensure!(mesh_lab::leftovers(crate::LAB_PREFIX).is_empty(), "the lab left something behind");
    println!("\ndemo complete");
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
    let before = lab.controller_version()?;
    let start = std::time::Instant::now();
    std::fs::write(lab.config_dir().join("policy.yaml"), POLICY)?;
    println!("  wrote {}", lab.config_dir().join("policy.yaml").display());
    mesh_lab::wait_for(std::time::Duration::from_secs(10), || {
        let v = lab.controller_version().unwrap_or(0);
        v > before && (1..=lab.nodes.len()).all(|n| lab.agent_config_version(n) == v)
    })?;
    println!("  file written -> both agents running the new version in {:?}", start.elapsed());
    println!("  (the agents hold the policy; L4 enforcement comes with the secure data plane)");
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
