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

    step("The agent's admin API (node1, 127.0.0.1:15000/pods)");
    let pods: serde_json::Value = serde_json::from_str(&lab.node_http(1, 15000, "/pods")?)?;
    for pod in pods["pods"].as_array().context("pods list")? {
        println!(
            "  {} ns={} cookie={} listeners={} forwarded={}",
            pod["name"], pod["namespace"], pod["netns_cookie"], pod["listeners"], pod["counters"]["forwarded"]
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
