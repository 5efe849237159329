//! `cargo xtask bench`: pod-to-pod throughput and latency across the lab's two nodes,
//! without the mesh (client pod not enrolled) and with it (enrolled: captured and
//! forwarded by the agent), alternating the two and reporting medians and ratios.
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_lab::{ECHO_PORT, Lab};

use crate::lab_spec;

pub mod control;

struct Sample {
    throughput_1: f64,
    throughput_8: f64,
    p50_us: f64,
    p99_us: f64,
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

fn latency(lab: &Lab, from: &str, server: &str, count: u32) -> anyhow::Result<(f64, f64)> {
    let echo = lab.spec.echo_bin.display().to_string();
    let addr = format!("{server}:{ECHO_PORT}");
    let out = lab.exec(
        from,
        &[&echo, "rr", "--addr", &addr, "--size", "1024", "--count", &count.to_string(), "--rate", "1000"],
    )?;
    if !out.status.success() {
        bail!("mesh-echo rr: {}", String::from_utf8_lossy(&out.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("mesh-echo rr JSON")?;
    Ok((json["p50_us"].as_f64().unwrap_or(f64::NAN), json["p99_us"].as_f64().unwrap_or(f64::NAN)))
}

fn sample(lab: &Lab, server: &str, seconds: u32, count: u32) -> anyhow::Result<Sample> {
    let (p50_us, p99_us) = latency(lab, "n1-p1", server, count)?;
    Ok(Sample {
        throughput_1: iperf(lab, "n1-p1", server, 1, seconds)?,
        throughput_8: iperf(lab, "n1-p1", server, 8, seconds)?,
        p50_us,
        p99_us,
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
    println!("==> bench: 2-node lab; client n1-p1 -> server n2-p1; {rounds} rounds, alternating no-mesh / mesh");
    let lab = Lab::up(lab_spec(2, 2))?;
    let server = lab.pod("n2-p1").ip4.clone();
    let out = lab.exec("n2-p1", &["iperf3", "-s", "-D"])?;
    if !out.status.success() {
        bail!("iperf3 server: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut baseline = Vec::new();
    let mut meshed = Vec::new();
    for round in 1..=rounds {
        lab.unenroll("n1-p1")?;
        baseline.push(sample(&lab, &server, seconds, count)?);
        lab.enroll("n1-p1")?;
        let before = lab.agent_stats(1)?["agent"]["forwarded"].as_u64().unwrap_or(0);
        meshed.push(sample(&lab, &server, seconds, count)?);
        let after = lab.agent_stats(1)?["agent"]["forwarded"].as_u64().unwrap_or(0);
        if after <= before {
            bail!("round {round}: the meshed run did not go through the agent");
        }
        println!("  round {round} done");
    }
    let m = |set: &[Sample], f: fn(&Sample) -> f64| median(set.iter().map(f).collect());
    let rows: [Metric; 4] = [
        ("throughput, 1 stream", |s| s.throughput_1 / 1e9, "Gbit/s"),
        ("throughput, 8 streams", |s| s.throughput_8 / 1e9, "Gbit/s"),
        ("1 KiB rr p50 @1000/s", |s| s.p50_us, "us"),
        ("1 KiB rr p99 @1000/s", |s| s.p99_us, "us"),
    ];
    println!("\n{:<24} {:>12} {:>12} {:>10} {:>12}", "metric", "no mesh", "passthrough", "ratio", "added");
    for (name, f, unit) in rows {
        let (b, p) = (m(&baseline, f), m(&meshed, f));
        let added = if unit == "us" { format!("{:+.1} us", p - b) } else { String::new() };
        println!("{name:<24} {b:>9.2} {unit:<2} {p:>9.2} {unit:<2} {:>9.2}x {added:>12}", p / b);
    }
    let agent = lab.agent_stats(1)?;
    println!("\nagent node1: {}", agent["agent"]);
    drop(lab);
    Ok(())
}
