//! The waypoint's part of `cargo xtask bench`: 1 KiB HTTP/1.1 requests from the client
//! pod to the server pod's echo server (`mesh-echo http`: `POST /echo` on one keep-alive
//! connection, the body echoed back) over three paths, in alternating rounds:
//!
//! - no mesh: both pods un-enrolled, to the server pod's address;
//! - L4 tunnel: both enrolled, to a Service that opts out of the waypoint
//!   (`istio.io/use-waypoint: none`), carried by the agents' HBONE tunnel;
//! - waypoint: both enrolled, to a Service of the waypoint's namespace, so the client's
//!   agent tunnels to the waypoint, which routes it and tunnels on to the server pod.
//!
//! Per path: p50/p99 at a fixed 1000 requests/s, the highest rate h2load reaches (4
//! connections), the CPU time the waypoint and the agents spend per 1000 requests, and
//! the waypoint's memory idle and at its peak.
use std::{fmt::Write as _, time::Duration};

use anyhow::{Context, bail};
use mesh_lab::{HTTP_PORT, Lab, wait_for, waypoint::waypoint_http};

use super::{CLIENT, SERVER, cpu_ms, exec_bounded, median, rss_mib};

const WAYPOINT_VIP: &str = "10.96.0.40";
const TUNNEL_VIP: &str = "10.96.0.41";

/// Two Services in front of the server pod's HTTP port alone: one through the waypoint
/// (its namespace uses it), one opted out.
fn services() -> String {
    let service = |name: &str, vip: &str, opt_out: bool| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n{}spec:\n  clusterIP: {vip}\n  \
             selector:\n    statefulset.kubernetes.io/pod-name: {SERVER}\n  ports:\n  - name: http\n    port: 80\n    \
             targetPort: {HTTP_PORT}\n",
            if opt_out { "  labels:\n    istio.io/use-waypoint: none\n" } else { "" }
        )
    };
    format!("{}---\n{}", service("bench-l7", WAYPOINT_VIP, false), service("bench-l4", TUNNEL_VIP, true))
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Path {
    NoMesh,
    Tunnel,
    Waypoint,
}

impl Path {
    const ALL: [Path; 3] = [Path::NoMesh, Path::Tunnel, Path::Waypoint];

    fn title(self) -> &'static str {
        match self {
            Self::NoMesh => "no mesh",
            Self::Tunnel => "L4 tunnel",
            Self::Waypoint => "waypoint",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::NoMesh => "no_mesh",
            Self::Tunnel => "l4_tunnel",
            Self::Waypoint => "waypoint",
        }
    }
}

#[derive(Clone, Copy)]
struct Sample {
    p50_us: f64,
    p99_us: f64,
    max_rps: f64,
    waypoint_cpu_ms_per_1000: f64,
    agents_cpu_ms_per_1000: f64,
}

/// (JSON key, table label, how to read it off a sample, unit)
type Metric = (&'static str, &'static str, fn(&Sample) -> f64, &'static str);

const METRICS: [Metric; 5] = [
    ("http_p50_us", "1 KiB HTTP p50 @1000/s", |s| s.p50_us, "us"),
    ("http_p99_us", "1 KiB HTTP p99 @1000/s", |s| s.p99_us, "us"),
    ("http_max_rps", "h2load max rate (4 conns)", |s| s.max_rps, "/s"),
    ("waypoint_cpu_ms_per_1000_req", "waypoint CPU per 1000 req", |s| s.waypoint_cpu_ms_per_1000, "ms"),
    ("agents_cpu_ms_per_1000_req", "agents' CPU per 1000 req", |s| s.agents_cpu_ms_per_1000, "ms"),
];

/// The waypoint's process.
fn waypoint_pid(lab: &Lab) -> anyhow::Result<u32> {
    let text = std::fs::read_to_string(lab.dir.join(format!("{}.pid", mesh_lab::WAYPOINT)))
        .context("the lab runs no waypoint")?;
    Ok(text.trim().parse()?)
}

/// Requests the waypoint has answered (its `istio_requests_total`, summed).
fn waypoint_requests(lab: &Lab) -> f64 {
    waypoint_http(lab, 15020, "/metrics")
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn http_latency(lab: &Lab, addr: &str, count: u32) -> anyhow::Result<(f64, f64)> {
    let echo = lab.spec.echo_bin.display().to_string();
    let out = exec_bounded(
        lab,
        CLIENT,
        count / 1000 + 60,
        &[&echo, "http", "--addr", addr, "--size", "1024", "--count", &count.to_string(), "--rate", "1000"],
    )?;
    if !out.status.success() {
        bail!("mesh-echo http to {addr}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("mesh-echo http JSON")?;
    if json["bad"].as_u64() != Some(0) {
        bail!("mesh-echo http to {addr}: answers that were not a 200 echo: {json}");
    }
    Ok((json["p50_us"].as_f64().unwrap_or(f64::NAN), json["p99_us"].as_f64().unwrap_or(f64::NAN)))
}

/// h2load over HTTP/1.1, 4 connections, `requests` 1 KiB POSTs: requests per second.
fn max_rate(lab: &Lab, addr: &str, requests: u32) -> anyhow::Result<f64> {
    let body = lab.dir.join("bench-1k.bin");
    std::fs::write(&body, [0x5a_u8; 1024])?;
    let out = exec_bounded(
        lab,
        CLIENT,
        90,
        &[
            "h2load",
            "--h1",
            "-c",
            "4",
            "-n",
            &requests.to_string(),
            "-d",
            &body.display().to_string(),
            "-T",
            "10",
            &format!("http://{addr}/echo"),
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let done = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|part| part.strip_suffix(" succeeded")))
        .and_then(|n| n.parse::<u32>().ok());
    if done != Some(requests) {
        bail!("h2load to {addr}: not every request succeeded:\n{text}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|rate| rate.strip_suffix(" req/s"))
        .and_then(|rate| rate.parse().ok())
        .with_context(|| format!("h2load printed no rate:\n{text}"))
}

fn sample(lab: &Lab, path: Path, count: u32, requests: u32, agents: &[u32], waypoint: u32) -> anyhow::Result<Sample> {
    let addr = match path {
        Path::NoMesh => format!("{}:{HTTP_PORT}", lab.pod(SERVER).ip4),
        Path::Tunnel => format!("{TUNNEL_VIP}:80"),
        Path::Waypoint => format!("{WAYPOINT_VIP}:80"),
    };
    let through_waypoint = waypoint_requests(lab);
    let (cpu_waypoint, cpu_agents) = (cpu_ms(&[waypoint]), cpu_ms(agents));
    let (p50_us, p99_us) = http_latency(lab, &addr, count)?;
    let per_1000 = |ms: f64| ms / f64::from(count) * 1000.0;
    let (waypoint_cpu_ms_per_1000, agents_cpu_ms_per_1000) =
        (per_1000(cpu_ms(&[waypoint]) - cpu_waypoint), per_1000(cpu_ms(agents) - cpu_agents));
    let max_rps = max_rate(lab, &addr, requests)?;
    // Each path must have taken the way it is named for.
    let answered = waypoint_requests(lab) - through_waypoint;
    let expected = f64::from(count + requests);
    match path {
        Path::Waypoint if answered < expected => {
            bail!("the waypoint answered {answered} of the {expected} requests sent through it")
        }
        Path::NoMesh | Path::Tunnel if answered > 0.0 => {
            bail!("{} requests went through the waypoint on the {} path", answered, path.title())
        }
        _ => {}
    }
    let none = |v: f64| if path == Path::NoMesh { f64::NAN } else { v };
    Ok(Sample {
        p50_us,
        p99_us,
        max_rps,
        waypoint_cpu_ms_per_1000: if path == Path::Waypoint { waypoint_cpu_ms_per_1000 } else { f64::NAN },
        agents_cpu_ms_per_1000: none(agents_cpu_ms_per_1000),
    })
}

/// What the waypoint's rounds measured: medians per path, and the waypoint's memory.
pub struct Results {
    samples: Vec<(Path, Vec<Sample>)>,
    rss_idle_mib: f64,
    rss_peak_mib: f64,
}

impl Results {
    fn median(&self, path: Path, f: fn(&Sample) -> f64) -> f64 {
        self.samples.iter().find(|(p, _)| *p == path).map_or(f64::NAN, |(_, s)| median(s.iter().map(f).collect()))
    }

    pub fn table(&self) -> String {
        let mut out = format!("{:<31}", "metric");
        for path in Path::ALL {
            let _ = write!(out, " {:>16}", path.title());
        }
        let _ = writeln!(out, " {:>16} {:>16}", "waypoint-L4", "waypoint-none");
        let cell = |v: f64, unit: &str| if v.is_nan() { "-".to_owned() } else { format!("{v:.1} {unit}") };
        for (_, label, f, unit) in METRICS {
            let _ = write!(out, "{label:<31}");
            for path in Path::ALL {
                let _ = write!(out, " {:>16}", cell(self.median(path, f), unit));
            }
            let wp = self.median(Path::Waypoint, f);
            let compare = |base: f64| match unit {
                _ if wp.is_nan() || base.is_nan() => String::new(),
                "us" => format!("{:+.1} us", wp - base),
                _ => format!("{:.2}x", wp / base),
            };
            let _ = writeln!(
                out,
                " {:>16} {:>16}",
                compare(self.median(Path::Tunnel, f)),
                compare(self.median(Path::NoMesh, f))
            );
        }
        let _ = writeln!(out, "{:<31} {:>16}", "waypoint RSS idle", cell(self.rss_idle_mib, "MiB"));
        let _ = write!(out, "{:<31} {:>16}", "waypoint RSS peak", cell(self.rss_peak_mib, "MiB"));
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let mut results = serde_json::Map::new();
        for path in Path::ALL {
            let mut values = serde_json::Map::new();
            for (key, _, f, _) in METRICS {
                let v = self.median(path, f);
                values.insert(key.into(), if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null });
            }
            results.insert(path.key().into(), values.into());
        }
        serde_json::json!({ "paths": results, "waypoint_rss_idle_mib": self.rss_idle_mib, "waypoint_rss_peak_mib": self.rss_peak_mib })
    }
}

/// Declares the benchmark's Services and waits until a request through the waypoint
/// reaches the server pod. Needs both pods enrolled.
pub fn prepare(lab: &Lab) -> anyhow::Result<()> {
    std::fs::write(lab.config_dir().join("bench-http.yaml"), services())?;
    for vip in [WAYPOINT_VIP, TUNNEL_VIP] {
        wait_for(Duration::from_secs(20), || {
            lab.curl(CLIENT, &format!("http://{vip}/")).is_ok_and(|body| body.contains(&format!("pod={SERVER} ")))
        })
        .with_context(|| format!("http://{vip}/ does not reach {SERVER}; waypoint log:\n{}", lab.log_of("waypoint")))?;
    }
    Ok(())
}

/// `rounds` rounds of every path in turn; `enroll(true|false)` enrolls or un-enrolls
/// the client and server pods.
pub fn run(
    lab: &Lab,
    rounds: u32,
    count: u32,
    requests: u32,
    agents: &[u32],
    enroll: &mut dyn FnMut(bool) -> anyhow::Result<()>,
) -> anyhow::Result<Results> {
    let waypoint = waypoint_pid(lab)?;
    let rss_idle_mib = rss_mib(&[waypoint]).0;
    let mut samples: Vec<(Path, Vec<Sample>)> = Path::ALL.iter().map(|p| (*p, Vec::new())).collect();
    for round in 1..=rounds {
        for path in Path::ALL {
            enroll(path != Path::NoMesh)?;
            if path != Path::NoMesh {
                lab.wait_certificates()?;
            }
            let s = sample(lab, path, count, requests, agents, waypoint)
                .with_context(|| format!("waypoint bench, {} path", path.title()))?;
            println!(
                "  round {round}/{rounds} HTTP {}: p50/p99 {:.0}/{:.0} us, max {:.0} req/s",
                path.title(),
                s.p50_us,
                s.p99_us,
                s.max_rps
            );
            if let Some((_, list)) = samples.iter_mut().find(|(p, _)| *p == path) {
                list.push(s);
            }
        }
    }
    Ok(Results { samples, rss_idle_mib, rss_peak_mib: rss_mib(&[waypoint]).1 })
}
