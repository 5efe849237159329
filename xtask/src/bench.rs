//! `cargo xtask bench`: pod-to-pod throughput, latency, connection rate and proxy cost
//! across the lab's two nodes, in alternating rounds of each leg, reporting medians and
//! ratios from one run:
//!
//! - no mesh: both pods un-enrolled, straight pod to pod;
//! - ours: both enrolled, captured and carried through the agents' HBONE tunnel;
//! - ztunnel (with `--ztunnel PATH`): both un-enrolled again, one ztunnel per pod in its
//!   dedicated mode on a local config, the client pod's traffic redirected into it (see
//!   `ztunnel.rs`); first one HTTP request each way between ztunnel and our agents
//!   (`interop::smoke`; `cargo xtask interop` runs the whole matrix).
//!
//! Then the waypoint's cost, HTTP over no mesh, the L4 tunnel and the waypoint, and
//! the cost of L7 authorization, JWT validation and tracing at the waypoint (see
//! `waypoint.rs`).
//!
//! Every load run is bounded in count and in time (`timeout` around each client).
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use mesh_lab::{ECHO_PORT, Lab};

use crate::{lab_spec, ztunnel};

pub mod control;
pub mod micro;
mod waypoint;

/// The client and server pods of every leg.
const CLIENT: &str = "n1-p1";
const SERVER: &str = "n2-p1";
/// The server pod of the L4 legs with `--same-node`: on the client's node.
const SAME_NODE_SERVER: &str = "n1-p2";

/// The sections of the data-plane benchmark: `bench` runs both, `bench l4` and
/// `bench waypoint` one each.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Sections {
    Both,
    /// No mesh, ours (and ztunnel) over TCP.
    L4,
    /// HTTP over no mesh, the L4 tunnel and the waypoint.
    Waypoint,
}

/// What `cargo xtask bench` was asked for, checked before anything is built.
pub struct Options {
    quick: bool,
    json: Option<PathBuf>,
    ztunnel: Option<PathBuf>,
    /// Which sections run.
    sections: Sections,
    /// The L4 legs' server is on the client's node.
    same_node: bool,
}

impl Options {
    pub fn new(
        quick: bool,
        json: Option<PathBuf>,
        ztunnel: Option<PathBuf>,
        sections: Sections,
        same_node: bool,
    ) -> anyhow::Result<Self> {
        if sections == Sections::Waypoint && ztunnel.is_some() {
            bail!("--ztunnel belongs to the L4 legs, not `bench waypoint`");
        }
        if same_node && sections != Sections::L4 {
            bail!("--same-node belongs to the L4 legs: use `bench l4 --same-node`");
        }
        if let Some(path) = &json {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                bail!("--json {}: directory {} does not exist", path.display(), dir.display());
            }
        }
        let ztunnel = ztunnel.map(|path| ztunnel::check_binary(&path)).transpose()?;
        Ok(Self { quick, json, ztunnel, sections, same_node })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Leg {
    NoMesh,
    Ours,
    Ztunnel,
}

impl Leg {
    fn key(self) -> &'static str {
        match self {
            Self::NoMesh => "no_mesh",
            Self::Ours => "ours",
            Self::Ztunnel => "ztunnel",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::NoMesh => "no mesh",
            Self::Ours => "ours (HBONE)",
            Self::Ztunnel => "ztunnel",
        }
    }
}

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
    /// CPU time of the proxies at both ends per 1000 new connections (each one 1 KiB
    /// exchange); NaN without proxies.
    cpu_ms_per_1000_conn: f64,
    /// CPU time of the proxies at both ends per 1000 requests on a persistent
    /// connection (@1000/s); NaN without proxies.
    cpu_ms_per_1000_req: f64,
    /// Resident memory of the proxies at both ends (summed) before this leg's first
    /// traffic, and their high-water mark; NaN without proxies.
    rss_idle_mib: f64,
    rss_peak_mib: f64,
}

/// Runs `argv` in `target` under `timeout` (`limit` seconds, then KILL 5 s later): no
/// load client outlives its budget.
pub fn exec_bounded(lab: &Lab, target: &str, limit: u32, argv: &[&str]) -> anyhow::Result<std::process::Output> {
    let limit = limit.to_string();
    let mut bounded = vec!["timeout", "-k", "5", limit.as_str()];
    bounded.extend_from_slice(argv);
    let out = lab.exec(target, &bounded)?;
    if out.status.code() == Some(124) || out.status.code() == Some(137) {
        bail!("{} did not finish within {limit} s", argv[0]);
    }
    Ok(out)
}

fn iperf(lab: &Lab, server: &str, streams: u32, seconds: u32) -> anyhow::Result<f64> {
    let out = exec_bounded(
        lab,
        CLIENT,
        seconds + 20,
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

fn latency(lab: &Lab, server: &str, count: u32, rate: u32) -> anyhow::Result<(f64, f64)> {
    let echo = lab.spec.echo_bin.display().to_string();
    let addr = format!("{server}:{ECHO_PORT}");
    // Paced runs take count/rate seconds; back-to-back ones well under a millisecond each.
    let limit = count / rate.max(1) + 60;
    let out = exec_bounded(
        lab,
        CLIENT,
        limit,
        &[&echo, "rr", "--addr", &addr, "--size", "1024", "--count", &count.to_string(), "--rate", &rate.to_string()],
    )?;
    if !out.status.success() {
        bail!("mesh-echo rr: {}", String::from_utf8_lossy(&out.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("mesh-echo rr JSON")?;
    Ok((json["p50_us"].as_f64().unwrap_or(f64::NAN), json["p99_us"].as_f64().unwrap_or(f64::NAN)))
}

/// New connections per second from the client (4 clients), and how many were made.
fn connection_rate(lab: &Lab, server: &str, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let echo = lab.spec.echo_bin.display().to_string();
    let addr = format!("{server}:{ECHO_PORT}");
    let out = exec_bounded(
        lab,
        CLIENT,
        seconds + 30,
        &[&echo, "cps", "--addr", &addr, "--clients", "4", "--seconds", &seconds.to_string()],
    )?;
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
    (1..=lab.nodes.len()).filter_map(|n| lab.agent_pid(n).ok()).collect()
}

/// User + system CPU time of processes, in milliseconds.
fn cpu_ms(pids: &[u32]) -> f64 {
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    let ticks = |pid: &u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may contain spaces) start at ") ".
        let fields: Vec<&str> = stat.rsplit_once(") ").map_or("", |(_, rest)| rest).split_whitespace().collect();
        fields.get(11..13).map_or(0.0, |t| t.iter().filter_map(|v| v.parse::<f64>().ok()).sum::<f64>())
    };
    pids.iter().map(ticks).sum::<f64>() * 1000.0 / hz
}

/// (`VmRSS`, `VmHWM`) of processes in MiB, summed.
fn rss_mib(pids: &[u32]) -> (f64, f64) {
    let mut total = (0.0, 0.0);
    for pid in pids {
        let field = |name| mesh_lab::proc_status_kib(*pid, name).map_or(f64::NAN, |kib| kib as f64 / 1024.0);
        total.0 += field("VmRSS");
        total.1 += field("VmHWM");
    }
    total
}

/// One sample of every metric; `proxies` are the processes whose CPU time is the
/// leg's cost (none for no mesh).
fn sample(lab: &Lab, server: &str, seconds: u32, count: u32, proxies: &[u32]) -> anyhow::Result<Sample> {
    let cost = |ms: f64, per: f64| if proxies.is_empty() { f64::NAN } else { ms / per * 1000.0 };
    let (busy_p50_us, busy_p99_us) = latency(lab, server, count * 5, 1_000_000)?;
    let cpu_start = cpu_ms(proxies);
    let (p50_us, p99_us) = latency(lab, server, count, 1000)?;
    let cpu_requests = cpu_ms(proxies) - cpu_start;
    let cpu_before = cpu_ms(proxies);
    let (connections_per_second, connections) = connection_rate(lab, server, seconds)?;
    let cpu_connections = cpu_ms(proxies) - cpu_before;
    Ok(Sample {
        throughput_1: iperf(lab, server, 1, seconds)?,
        throughput_8: iperf(lab, server, 8, seconds)?,
        busy_p50_us,
        busy_p99_us,
        p50_us,
        p99_us,
        connections_per_second,
        cpu_ms_per_1000_conn: cost(cpu_connections, connections),
        cpu_ms_per_1000_req: cost(cpu_requests, f64::from(count)),
        rss_idle_mib: f64::NAN,
        rss_peak_mib: f64::NAN,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// (JSON key or "" for table-only rows, table label, how to read it off a sample, unit)
type Metric = (&'static str, &'static str, fn(&Sample) -> f64, &'static str);

const METRICS: [Metric; 11] = [
    ("throughput_1_gbps", "throughput, 1 stream", |s| s.throughput_1 / 1e9, "Gbit/s"),
    ("throughput_8_gbps", "throughput, 8 streams", |s| s.throughput_8 / 1e9, "Gbit/s"),
    ("", "1 KiB rr p50 back-to-back", |s| s.busy_p50_us, "us"),
    ("", "1 KiB rr p99 back-to-back", |s| s.busy_p99_us, "us"),
    ("rr_p50_us", "1 KiB rr p50 @1000/s", |s| s.p50_us, "us"),
    ("rr_p99_us", "1 KiB rr p99 @1000/s", |s| s.p99_us, "us"),
    ("conn_per_s", "new connections/s (4 clients)", |s| s.connections_per_second, "/s"),
    ("cpu_ms_per_1000_req", "proxies' CPU per 1000 requests", |s| s.cpu_ms_per_1000_req, "ms"),
    ("cpu_ms_per_1000_conn", "proxies' CPU per 1000 conns", |s| s.cpu_ms_per_1000_conn, "ms"),
    ("rss_idle_mib", "proxies' RSS idle (sum)", |s| s.rss_idle_mib, "MiB"),
    ("rss_peak_mib", "proxies' RSS peak (sum)", |s| s.rss_peak_mib, "MiB"),
];

struct Results {
    legs: Vec<(Leg, Vec<Sample>)>,
}

impl Results {
    fn median(&self, leg: Leg, f: fn(&Sample) -> f64) -> f64 {
        self.legs.iter().find(|(l, _)| *l == leg).map_or(f64::NAN, |(_, s)| median(s.iter().map(f).collect()))
    }

    fn table(&self) -> String {
        let has_zt = self.legs.iter().any(|(l, _)| *l == Leg::Ztunnel);
        let mut out = format!("{:<31}", "metric");
        for (leg, _) in &self.legs {
            let _ = write!(out, " {:>16}", leg.title());
        }
        let _ = write!(out, " {:>14}", "ours/no mesh");
        if has_zt {
            let _ = write!(out, " {:>14} {:>14}", "ztunnel/no mesh", "ours/ztunnel");
        }
        out.push('\n');
        let cell = |v: f64, unit: &str| if v.is_nan() { "-".to_owned() } else { format!("{v:.2} {unit}") };
        // Latency: the time added over no mesh; everything else: a ratio.
        let compare = |v: f64, base: f64, unit: &str| {
            if v.is_nan() || base.is_nan() {
                String::new()
            } else if unit == "us" {
                format!("{:+.1} us", v - base)
            } else {
                format!("{:.2}x", v / base)
            }
        };
        for (_, label, f, unit) in METRICS {
            let _ = write!(out, "{label:<31}");
            for (leg, _) in &self.legs {
                let _ = write!(out, " {:>16}", cell(self.median(*leg, f), unit));
            }
            let (none, ours, zt) =
                (self.median(Leg::NoMesh, f), self.median(Leg::Ours, f), self.median(Leg::Ztunnel, f));
            let _ = write!(out, " {:>14}", compare(ours, none, unit));
            if has_zt {
                let _ = write!(out, " {:>14} {:>14}", compare(zt, none, unit), compare(ours, zt, unit));
            }
            out.push('\n');
        }
        out
    }

    fn json(&self, rounds: u32) -> serde_json::Value {
        let mut results = serde_json::Map::new();
        for (leg, _) in &self.legs {
            let mut values = serde_json::Map::new();
            for (key, _, f, _) in METRICS {
                if !key.is_empty() {
                    let v = self.median(*leg, f);
                    values
                        .insert(key.into(), if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null });
                }
            }
            results.insert(leg.key().into(), values.into());
        }
        serde_json::json!({ "rounds": rounds, "results": results })
    }
}

fn one_line(s: &Sample) -> String {
    format!(
        "{:.2}/{:.2} Gbit/s, rr p50/p99 {:.0}/{:.0} us, {:.0} conn/s",
        s.throughput_1 / 1e9,
        s.throughput_8 / 1e9,
        s.p50_us,
        s.p99_us,
        s.connections_per_second
    )
}

pub fn bench(options: &Options) -> anyhow::Result<()> {
    let (rounds, seconds, count): (u32, u32, u32) = if options.quick { (1, 2, 1000) } else { (3, 5, 3000) };
    let legs: &[Leg] = if options.sections == Sections::Waypoint {
        &[]
    } else if options.ztunnel.is_some() {
        &[Leg::NoMesh, Leg::Ours, Leg::Ztunnel]
    } else {
        &[Leg::NoMesh, Leg::Ours]
    };
    let (server_pod, where_) =
        if options.same_node { (SAME_NODE_SERVER, "same node") } else { (SERVER, "across nodes") };
    println!(
        "==> bench: 2-node lab, client {CLIENT} -> server {server_pod} ({where_}); {rounds} round(s) of {} in turn; \
         medians",
        legs.iter().map(|l| l.title()).collect::<Vec<_>>().join(" / ")
    );
    // A third pod per node makes the second one meshed (the last is not).
    let mut spec = lab_spec(2, if options.same_node { 3 } else { 2 });
    spec.waypoint_bin = Some(crate::release_bin("mesh-waypoint"));
    // Extra agent flags for experiments, e.g. MESH_BENCH_AGENT_ARGS="--worker-threads 1".
    spec.agent_args =
        std::env::var("MESH_BENCH_AGENT_ARGS").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
    if !spec.agent_args.is_empty() {
        println!("==> agent flags: {}", spec.agent_args.join(" "));
    }
    if std::env::var_os("MESH_AGENT_BIN").is_some() {
        println!("==> agent binary: {} (MESH_AGENT_BIN)", spec.agent_bin.display());
    }
    let ztunnel = match &options.ztunnel {
        Some(binary) => {
            let zt = ztunnel::Ztunnel::prepare(binary)?;
            println!(
                "==> ztunnel {}: our controller's CA uses its fake CA's root ({})",
                binary.display(),
                zt.root_subject
            );
            spec.ca_root = Some(zt.ca_dir.clone());
            Some(zt)
        }
        None => None,
    };
    println!("==> lab up (controller, 2 agents, {} pods, a waypoint)", 2 * spec.pods_per_node);
    let lab = Lab::up(spec)?;
    waypoint::prepare(&lab)?;
    let features = if options.sections == Sections::L4 { None } else { Some(waypoint::Features::prepare(&lab)?) };
    let server = lab.pod(server_pod).ip4.clone();
    // With the default (2: loopback only) TIME_WAIT sockets fill the ephemeral ports
    // of a connection-rate run within a second and the baseline collapses.
    for pod in &lab.pods {
        let out = lab.exec(&pod.name, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        if !out.status.success() {
            bail!("sysctl tcp_tw_reuse in {}: {}", pod.name, String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    println!(
        "==> net.ipv4.tcp_tw_reuse=1 in the pod namespaces ({}) for the connection-rate runs",
        lab.pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(" ")
    );
    let out = lab.exec(server_pod, &["iperf3", "-s", "-D"])?;
    if !out.status.success() {
        bail!("iperf3 server: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::thread::sleep(Duration::from_millis(300));
    let agents = agent_pids(&lab);
    let agents_idle = rss_mib(&agents).0;
    if let Some(zt) = &ztunnel {
        crate::interop::smoke(&lab, zt)?;
    }
    let mut results = Results { legs: legs.iter().map(|l| (*l, Vec::new())).collect() };
    let mut ztunnel_idle = f64::NAN;
    // The lab enrolls the meshed pods; only the "ours" leg runs with them enrolled.
    let mut enrolled = true;
    let mut enroll = |on: bool| -> anyhow::Result<()> {
        if on != enrolled {
            for pod in [CLIENT, server_pod] {
                if on { lab.enroll(pod).map(drop)? } else { lab.unenroll(pod).map(drop)? }
            }
            enrolled = on;
        }
        Ok(())
    };
    for round in 1..=rounds {
        for &leg in legs {
            enroll(leg == Leg::Ours)?;
            let sample = match leg {
                Leg::NoMesh => sample(&lab, &server, seconds, count, &[])?,
                Leg::Ours => {
                    lab.wait_certificates()?;
                    // Tunneled, or (same node) delivered by the agent without the tunnel.
                    let carried = |lab: &Lab| -> anyhow::Result<u64> {
                        let stats = lab.agent_stats(1)?;
                        let count = |key: &str| stats["agent"][key].as_u64().unwrap_or(0);
                        Ok(count("tunneled") + count("same_node"))
                    };
                    let before = carried(&lab)?;
                    let mut s = sample(&lab, &server, seconds, count, &agents)?;
                    if carried(&lab)? <= before {
                        bail!("round {round}: the run through our agents did not go through them");
                    }
                    s.rss_idle_mib = agents_idle;
                    s.rss_peak_mib = rss_mib(&agents).1;
                    s
                }
                Leg::Ztunnel => {
                    let zt = ztunnel.as_ref().context("no ztunnel")?;
                    let mut running = zt.start(
                        &lab,
                        &ztunnel::Launch {
                            workloads: &[CLIENT, server_pod],
                            pods: &[CLIENT, server_pod],
                            redirect: Some(CLIENT),
                            policies: &[],
                            env: &[],
                        },
                    )?;
                    if ztunnel_idle.is_nan() {
                        ztunnel_idle = rss_mib(&running.pids).0;
                    }
                    let before = ztunnel::Running::connections(&lab, server_pod);
                    let measured = sample(&lab, &server, seconds, count, &running.pids);
                    let after = ztunnel::Running::connections(&lab, server_pod);
                    let peak = rss_mib(&running.pids).1;
                    running.stop()?;
                    let mut s = measured.map_err(|e| e.context(format!("ztunnel leg: {}", running.logs())))?;
                    if after <= before {
                        bail!(
                            "round {round}: the ztunnel run did not reach the server's ztunnel ({before} -> {after} \
                             inbound connections); {}",
                            running.logs()
                        );
                    }
                    s.rss_idle_mib = ztunnel_idle;
                    s.rss_peak_mib = peak;
                    s
                }
            };
            println!("  round {round}/{rounds} {}: {}", leg.title(), one_line(&sample));
            if let Some((_, samples)) = results.legs.iter_mut().find(|(l, _)| *l == leg) {
                samples.push(sample);
            }
        }
    }
    let requests = if options.quick { 5_000 } else { 20_000 };
    // Paced HTTP requests per leg: at least 3 s at 1000/s, since CPU time comes from
    // /proc in 10 ms ticks and an L7 feature costs a few ms per 1000 requests.
    let http_count = if options.quick { 3_000 } else { 5_000 };
    let http = if options.sections == Sections::L4 {
        None
    } else {
        println!(
            "==> waypoint: 1 KiB HTTP/1.1 {CLIENT} -> {SERVER}, {http_count} at 1000/s and {requests} with h2load per \
             leg; {rounds} round(s) of no mesh / L4 tunnel / waypoint / waypoint + L7 authz / + JWT / + tracing"
        );
        let features = features.as_ref().context("the L7 features were not prepared")?;
        Some(waypoint::run(&lab, rounds, http_count, requests, &agents, features, &mut enroll)?)
    };
    // The peak is the highest high-water mark of the whole run.
    for (_, samples) in &mut results.legs {
        let peak = samples.iter().map(|s| s.rss_peak_mib).fold(f64::NAN, f64::max);
        for s in samples.iter_mut() {
            s.rss_peak_mib = peak;
        }
    }
    if !legs.is_empty() {
        println!("\n{}", results.table());
        println!("(CPU and RSS: both ends' proxies summed: the two node agents, or the two pods' ztunnels)");
    }
    if let Some(http) = &http {
        println!("\n{}", http.table());
        println!("(agents: both nodes' agents summed; the waypoint runs on node1 with the client)");
    }
    let agent = lab.agent_stats(1)?;
    println!("agent node1 counters: {}", agent["agent"]);
    if let Some(path) = &options.json {
        let mut json = results.json(rounds);
        if let Some(http) = &http {
            json["waypoint"] = http.json();
        }
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
        println!("==> medians written to {}", path.display());
    }
    drop(lab);
    drop(ztunnel);
    Ok(())
}
