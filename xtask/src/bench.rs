//! `cargo xtask bench`: pod-to-pod throughput, latency, connection rate and agent cost
//! across the lab's two nodes, without the mesh (both pods un-enrolled) and with it
//! (both enrolled: captured and carried through the HBONE tunnel), alternating the two
//! and reporting medians and ratios.
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_lab::{ECHO_PORT, Lab};

use crate::lab_spec;

pub mod control;
pub mod micro;

#[derive(Default)]
struct Sample {
    throughput_1: f64,
    throughput_8: f64,
    /// Back to back on one connection.
    busy_p50_us: f64,
    busy_p99_us: f64,
    /// At a fixed 1000 requests per second on one connection.
    p50_us: f64,
    p99_us: f64,
    connections_per_second: f64,
    /// CPU time of both agents per 1000 new connections (each one 1 KiB exchange).
    cpu_ms_per_1000: f64,
    /// CPU time of both agents per 1000 requests on a persistent connection (@1000/s).
    cpu_ms_per_1000_requests: f64,
}

fn iperf(lab: &Lab, from: &str, server: &str, streams: u32, seconds: u32) -> anyhow::Result<f64> {
    let out = lab.exec(
        from,
        &[
            "iperf3",
            "-c",
            server,
            "-J",
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "--connect-timeout",
            "3000",
        ],
    )?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(error) = json["error"].as_str() {
        bail!("iperf3: {error}");
    }
    json["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 reported no throughput")
}

fn latency(lab: &Lab, from: &str, server: &str, count: u32, rate: u32) -> anyhow::Result<(f64, f64)> {
    let echo = lab.spec.echo_bin.display().to_string();
    let addr = format!("{server}:{ECHO_PORT}");
    let out = lab.exec(
        from,
        &[&echo, "rr", "--addr", &addr, "--size", "1024", "--count", &count.to_string(), "--rate", &rate.to_string()],
    )?;
    if !out.status.success() {
        bail!("mesh-echo rr: {}", String::from_utf8_lossy(&out.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("mesh-echo rr JSON")?;
    Ok((json["p50_us"].as_f64().unwrap_or(f64::NAN), json["p99_us"].as_f64().unwrap_or(f64::NAN)))
}

/// New connections per second from `from` (4 clients), and how many were made.
fn connection_rate(lab: &Lab, from: &str, server: &str, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let echo = lab.spec.echo_bin.display().to_string();
    let addr = format!("{server}:{ECHO_PORT}");
    let out = lab.exec(from, &[&echo, "cps", "--addr", &addr, "--clients", "4", "--seconds", &seconds.to_string()])?;
    if !out.status.success() {
        bail!("mesh-echo cps: {}", String::from_utf8_lossy(&out.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("mesh-echo cps JSON")?;
    if json["failed"].as_u64().unwrap_or(0) > 0 {
        bail!("mesh-echo cps: failed connections: {json}");
    }
    Ok((json["per_second"].as_f64().unwrap_or(f64::NAN), json["connections"].as_f64().unwrap_or(f64::NAN)))
}

/// The agents' pids.
fn agent_pids(lab: &Lab) -> Vec<u32> {
    (1..=lab.nodes.len())
        .filter_map(|n| std::fs::read_to_string(lab.dir.join(format!("agent-node{n}.pid"))).ok())
        .filter_map(|pid| pid.trim().parse().ok())
        .collect()
}

/// User + system CPU time of a process, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ") ".
    let fields: Vec<&str> = stat.rsplit_once(") ").map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |t| t.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    ticks * 1000.0 / hz
}

/// (`VmRSS`, `VmHWM`) of a process in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn sample(lab: &Lab, server: &str, seconds: u32, count: u32) -> anyhow::Result<Sample> {
    let (busy_p50_us, busy_p99_us) = latency(lab, "n1-p1", server, count * 5, 1_000_000)?;
    let pids = agent_pids(lab);
    let cpu_start: f64 = pids.iter().map(|p| cpu_ms(*p)).sum();
    let (p50_us, p99_us) = latency(lab, "n1-p1", server, count, 1000)?;
    let cpu_requests: f64 = pids.iter().map(|p| cpu_ms(*p)).sum::<f64>() - cpu_start;
    let cpu_before: f64 = pids.iter().map(|p| cpu_ms(*p)).sum();
    let (connections_per_second, connections) = connection_rate(lab, "n1-p1", server, seconds)?;
    let cpu_after: f64 = pids.iter().map(|p| cpu_ms(*p)).sum();
    Ok(Sample {
        throughput_1: iperf(lab, "n1-p1", server, 1, seconds)?,
        throughput_8: iperf(lab, "n1-p1", server, 8, seconds)?,
        busy_p50_us,
        busy_p99_us,
        p50_us,
        p99_us,
        connections_per_second,
        cpu_ms_per_1000: (cpu_after - cpu_before) / connections * 1000.0,
        cpu_ms_per_1000_requests: cpu_requests / f64::from(count) * 1000.0,
    })
}

/// (name, how to read it off a sample, unit)
type Metric = (&'static str, fn(&Sample) -> f64, &'static str);

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn bench(quick: bool) -> anyhow::Result<()> {
    let (rounds, seconds, count) = if quick { (1, 2, 1000) } else { (3, 5, 3000) };
    println!(
        "==> bench: 2-node lab; client n1-p1 -> server n2-p1; {rounds} rounds, alternating no mesh (both pods \
         un-enrolled) / mesh (both enrolled: HBONE mTLS tunnel between the agents)"
    );
    let mut spec = lab_spec(2, 2);
    // Extra agent flags for experiments, e.g. MESH_BENCH_AGENT_ARGS="--worker-threads 1".
    spec.agent_args =
        std::env::var("MESH_BENCH_AGENT_ARGS").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
    if !spec.agent_args.is_empty() {
        println!("    agent flags: {}", spec.agent_args.join(" "));
    }
    let lab = Lab::up(spec)?;
    let server = lab.pod("n2-p1").ip4.clone();
    let out = lab.exec("n2-p1", &["iperf3", "-s", "-D"])?;
    if !out.status.success() {
        bail!("iperf3 server: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle: Vec<(f64, f64)> = agent_pids(&lab).into_iter().map(rss_mib).collect();
    let mut baseline = Vec::new();
    let mut meshed = Vec::new();
    for round in 1..=rounds {
        lab.unenroll("n1-p1")?;
        lab.unenroll("n2-p1")?;
        baseline.push(sample(&lab, &server, seconds, count)?);
        lab.enroll("n1-p1")?;
        lab.enroll("n2-p1")?;
        lab.wait_certificates()?;
        let before = lab.agent_stats(1)?["agent"]["tunneled"].as_u64().unwrap_or(0);
        meshed.push(sample(&lab, &server, seconds, count)?);
        let after = lab.agent_stats(1)?["agent"]["tunneled"].as_u64().unwrap_or(0);
        if after <= before {
            bail!("round {round}: the meshed run did not go through the tunnel");
        }
        println!("  round {round} done");
    }
    let m = |set: &[Sample], f: fn(&Sample) -> f64| median(set.iter().map(f).collect());
    let rows: [Metric; 9] = [
        ("throughput, 1 stream", |s| s.throughput_1 / 1e9, "Gbit/s"),
        ("throughput, 8 streams", |s| s.throughput_8 / 1e9, "Gbit/s"),
        ("1 KiB rr p50 back-to-back", |s| s.busy_p50_us, "us"),
        ("1 KiB rr p99 back-to-back", |s| s.busy_p99_us, "us"),
        ("1 KiB rr p50 @1000/s", |s| s.p50_us, "us"),
        ("1 KiB rr p99 @1000/s", |s| s.p99_us, "us"),
        ("new connections/s (4 clients)", |s| s.connections_per_second, "/s"),
        ("agents' CPU per 1000 conns", |s| s.cpu_ms_per_1000, "ms"),
        ("agents' CPU per 1000 requests", |s| s.cpu_ms_per_1000_requests, "ms"),
    ];
    println!("\n{:<30} {:>14} {:>14} {:>9} {:>12}", "metric", "no mesh", "mesh (HBONE)", "ratio", "added");
    for (name, f, unit) in rows {
        let (b, p) = (m(&baseline, f), m(&meshed, f));
        let added = if unit == "us" { format!("{:+.1} us", p - b) } else { String::new() };
        println!("{name:<30} {b:>9.2} {unit:<4} {p:>9.2} {unit:<4} {:>8.2}x {added:>12}", p / b);
    }
    for (n, pid) in agent_pids(&lab).into_iter().enumerate() {
        let (rss, peak) = rss_mib(pid);
        let idle_rss = idle.get(n).map_or(f64::NAN, |i| i.0);
        println!("agent node{}: RSS idle {idle_rss:.1} MiB, now {rss:.1} MiB, peak {peak:.1} MiB", n + 1);
    }
    let agent = lab.agent_stats(1)?;
    println!("agent node1 counters: {}", agent["agent"]);
    println!("agent node1 tunnels: {}", agent["tunnels"]);
    drop(lab);
    Ok(())
}
