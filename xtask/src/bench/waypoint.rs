//! The waypoint's part of `cargo xtask bench`: 1 KiB HTTP/1.1 requests from the client
//! pod to the server pod's echo server (`mesh-echo http`: `POST /echo` on one keep-alive
//! connection, the body echoed back) over these paths, in alternating rounds:
//!
//! - no mesh: both pods un-enrolled, to the server pod's address;
//! - L4 tunnel: both enrolled, to a Service that opts out of the waypoint
//!   (`istio.io/use-waypoint: none`), carried by the agents' HBONE tunnel;
//! - waypoint: both enrolled, to a Service of the waypoint's namespace, so the client's
//!   agent tunnels to the waypoint, which routes it and tunnels on to the server pod;
//! - waypoint + L7 authz, + JWT, + tracing: the same through the waypoint, to Services
//!   that each switch one feature on (see `features.rs`), to price each feature against
//!   the plain waypoint. Within a round the four waypoint legs take turns going first.
//!
//! Per path: p50/p99 at a fixed 1000 requests/s, the highest rate h2load reaches (4
//! connections), the CPU time the waypoint and the agents spend per 1000 requests, and
//! the waypoint's memory idle and at its peak.
use std::{fmt::Write as _, time::Duration};

use anyhow::{Context, bail};
use mesh_lab::{HTTP_PORT, Lab, wait_for, waypoint::waypoint_http};

use super::{CLIENT, SERVER, cpu_ms, exec_bounded, median, rss_mib};

mod features;

pub use features::Features;
use features::{AUTHZ_VIP, JWT_VIP, TRACING_VIP, service, spans_received};

const WAYPOINT_VIP: &str = "10.96.0.40";
const TUNNEL_VIP: &str = "10.96.0.41";

/// The Services in front of the server pod's HTTP port alone: one through the waypoint
/// (its namespace uses it), one opted out, and one per L7 feature leg.
fn services() -> String {
    [
        service("bench-l7", WAYPOINT_VIP, 80, HTTP_PORT, false),
        service("bench-l4", TUNNEL_VIP, 80, HTTP_PORT, true),
        service("bench-authz", AUTHZ_VIP, 80, HTTP_PORT, false),
        service("bench-jwt", JWT_VIP, 80, HTTP_PORT, false),
        service("bench-trace", TRACING_VIP, 80, HTTP_PORT, false),
    ]
    .join("---\n")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Path {
    NoMesh,
    Tunnel,
    Waypoint,
    /// The waypoint with an L7 `AuthorizationPolicy` on the Service.
    Authz,
    /// The waypoint with a `RequestAuthentication` and a policy requiring a principal.
    Jwt,
    /// The waypoint exporting a span per request.
    Tracing,
}

impl Path {
    const ALL: [Path; 6] = [Path::NoMesh, Path::Tunnel, Path::Waypoint, Path::Authz, Path::Jwt, Path::Tracing];
    /// The paths of the main table.
    const BASE: [Path; 3] = [Path::NoMesh, Path::Tunnel, Path::Waypoint];
    /// The legs priced against the plain waypoint.
    const FEATURES: [Path; 3] = [Path::Authz, Path::Jwt, Path::Tracing];

    fn title(self) -> &'static str {
        match self {
            Self::NoMesh => "no mesh",
            Self::Tunnel => "L4 tunnel",
            Self::Waypoint => "waypoint",
            Self::Authz => "waypoint + L7 authz",
            Self::Jwt => "waypoint + JWT",
            Self::Tracing => "waypoint + tracing",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::NoMesh => "no_mesh",
            Self::Tunnel => "l4_tunnel",
            Self::Waypoint => "waypoint",
            Self::Authz => "waypoint_authz",
            Self::Jwt => "waypoint_jwt",
            Self::Tracing => "waypoint_tracing",
        }
    }

    fn through_waypoint(self) -> bool {
        !matches!(self, Self::NoMesh | Self::Tunnel)
    }

    /// The order of one round: no mesh, the L4 tunnel, then the four waypoint legs
    /// rotated by the round, so that none always runs first (or right after the
    /// un-enrolled leg).
    fn round(round: u32) -> Vec<Path> {
        let mut waypoint = [Path::Waypoint, Path::Authz, Path::Jwt, Path::Tracing];
        let turn = (round as usize).saturating_sub(1) % waypoint.len();
        waypoint.rotate_left(turn);
        [Path::NoMesh, Path::Tunnel].into_iter().chain(waypoint).collect()
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

/// `count` requests at 1000/s with `headers` (`name: value`): (p50, p99) in us.
fn http_latency(lab: &Lab, addr: &str, count: u32, headers: &[&str]) -> anyhow::Result<(f64, f64)> {
    let echo = lab.spec.echo_bin.display().to_string();
    let count_arg = count.to_string();
    let mut argv =
        vec![echo.as_str(), "http", "--addr", addr, "--size", "1024", "--count", &count_arg, "--rate", "1000"];
    for header in headers {
        argv.extend_from_slice(&["--header", header]);
    }
    let out = exec_bounded(lab, CLIENT, count / 1000 + 60, &argv)?;
    if !out.status.success() {
        bail!("mesh-echo http to {addr}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("mesh-echo http JSON")?;
    if json["bad"].as_u64() != Some(0) {
        bail!("mesh-echo http to {addr}: answers that were not a 200 echo: {json}");
    }
    Ok((json["p50_us"].as_f64().unwrap_or(f64::NAN), json["p99_us"].as_f64().unwrap_or(f64::NAN)))
}

/// h2load over HTTP/1.1, 4 connections, `requests` 1 KiB POSTs with `headers`:
/// requests per second.
fn max_rate(lab: &Lab, addr: &str, requests: u32, headers: &[&str]) -> anyhow::Result<f64> {
    let body = lab.dir.join("bench-1k.bin");
    std::fs::write(&body, [0x5a_u8; 1024])?;
    let (requests_arg, body_arg, url) =
        (requests.to_string(), body.display().to_string(), format!("http://{addr}/echo"));
    let mut argv = vec!["h2load", "--h1", "-c", "4", "-n", &requests_arg, "-d", &body_arg, "-T", "10"];
    for header in headers {
        argv.extend_from_slice(&["-H", header]);
    }
    argv.push(&url);
    let out = exec_bounded(lab, CLIENT, 90, &argv)?;
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

struct Setup<'a> {
    agents: &'a [u32],
    waypoint: u32,
    features: &'a Features,
}

fn sample(lab: &Lab, path: Path, count: u32, requests: u32, setup: &Setup) -> anyhow::Result<Sample> {
    let addr = match path {
        Path::NoMesh => format!("{}:{HTTP_PORT}", lab.pod(SERVER).ip4),
        Path::Tunnel => format!("{TUNNEL_VIP}:80"),
        Path::Waypoint => format!("{WAYPOINT_VIP}:80"),
        Path::Authz => format!("{AUTHZ_VIP}:80"),
        Path::Jwt => format!("{JWT_VIP}:80"),
        Path::Tracing => format!("{TRACING_VIP}:80"),
    };
    let headers: &[&str] = if path == Path::Jwt { &[setup.features.bearer.as_str()] } else { &[] };
    let (agents, waypoint) = (setup.agents, setup.waypoint);
    let through_waypoint = waypoint_requests(lab);
    let spans_before = spans_received(lab);
    let (cpu_waypoint, cpu_agents) = (cpu_ms(&[waypoint]), cpu_ms(agents));
    let (p50_us, p99_us) = http_latency(lab, &addr, count, headers)?;
    if path == Path::Tracing {
        // The last batch of spans leaves up to a second (the exporter's interval) after
        // the last request; its cost belongs to these requests.
        wait_for(Duration::from_secs(5), || spans_received(lab) >= spans_before + u64::from(count)).with_context(
            || {
                format!(
                    "the OTLP sink got {} spans for the {count} requests of the tracing leg",
                    spans_received(lab) - spans_before
                )
            },
        )?;
    }
    let per_1000 = |ms: f64| ms / f64::from(count) * 1000.0;
    let (waypoint_cpu_ms_per_1000, agents_cpu_ms_per_1000) =
        (per_1000(cpu_ms(&[waypoint]) - cpu_waypoint), per_1000(cpu_ms(agents) - cpu_agents));
    let max_rps = max_rate(lab, &addr, requests, headers)?;
    // Each path must have taken the way it is named for.
    let answered = waypoint_requests(lab) - through_waypoint;
    let expected = f64::from(count + requests);
    if path.through_waypoint() && answered < expected {
        bail!("the waypoint answered {answered} of the {expected} requests sent through it");
    }
    if !path.through_waypoint() && answered > 0.0 {
        bail!("{} requests went through the waypoint on the {} path", answered, path.title());
    }
    let none = |v: f64| if path == Path::NoMesh { f64::NAN } else { v };
    Ok(Sample {
        p50_us,
        p99_us,
        max_rps,
        waypoint_cpu_ms_per_1000: if path.through_waypoint() { waypoint_cpu_ms_per_1000 } else { f64::NAN },
        agents_cpu_ms_per_1000: none(agents_cpu_ms_per_1000),
    })
}

/// What the waypoint's rounds measured: the samples per path, and the waypoint's memory.
pub struct Results {
    samples: Vec<(Path, Vec<Sample>)>,
    rss_idle_mib: f64,
    rss_peak_mib: f64,
}

/// A feature leg's cost over the plain waypoint leg.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cost {
    /// The feature leg's value minus the plain leg's.
    over: f64,
    /// The feature leg's value over the plain leg's.
    ratio: f64,
}

/// The cost of a feature from the two legs' values round by round (`plain[i]` and
/// `feature[i]` come from round `i`, so a round the whole machine was slow in moves
/// both): the medians of the per-round differences and ratios. NaN when no round has
/// both values (a ratio also needs a positive plain value).
fn cost(plain: &[f64], feature: &[f64]) -> Cost {
    let pairs: Vec<(f64, f64)> =
        plain.iter().zip(feature).filter(|(p, f)| p.is_finite() && f.is_finite()).map(|(p, f)| (*p, *f)).collect();
    let median_or_nan = |values: Vec<f64>| if values.is_empty() { f64::NAN } else { median(values) };
    Cost {
        over: median_or_nan(pairs.iter().map(|(p, f)| f - p).collect()),
        ratio: median_or_nan(pairs.iter().filter(|(p, _)| *p > 0.0).map(|(p, f)| f / p).collect()),
    }
}

impl Results {
    fn values(&self, path: Path, f: fn(&Sample) -> f64) -> Vec<f64> {
        self.samples.iter().find(|(p, _)| *p == path).map_or_else(Vec::new, |(_, s)| s.iter().map(f).collect())
    }

    fn median(&self, path: Path, f: fn(&Sample) -> f64) -> f64 {
        let values = self.values(path, f);
        if values.is_empty() { f64::NAN } else { median(values) }
    }

    /// The feature leg's waypoint CPU per 1000 requests over the plain waypoint leg's.
    fn cpu_cost(&self, path: Path) -> Cost {
        let cpu: fn(&Sample) -> f64 = |s| s.waypoint_cpu_ms_per_1000;
        cost(&self.values(Path::Waypoint, cpu), &self.values(path, cpu))
    }

    pub fn table(&self) -> String {
        let mut out = format!("{:<31}", "metric");
        for path in Path::BASE {
            let _ = write!(out, " {:>16}", path.title());
        }
        let _ = writeln!(out, " {:>16} {:>16}", "waypoint-L4", "waypoint-none");
        let cell = |v: f64, unit: &str| if v.is_nan() { "-".to_owned() } else { format!("{v:.1} {unit}") };
        for (_, label, f, unit) in METRICS {
            let _ = write!(out, "{label:<31}");
            for path in Path::BASE {
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
        let _ = writeln!(out, "{:<31} {:>16}", "waypoint RSS peak", cell(self.rss_peak_mib, "MiB"));
        out.push('\n');
        out.push_str(&self.features_table());
        out
    }

    /// The L7 feature legs next to the plain waypoint: the waypoint's CPU per 1000
    /// requests at 1000/s and its cost over the plain leg, latency, h2load's rate.
    fn features_table(&self) -> String {
        let mut out = format!(
            "{:<22} {:>16} {:>12} {:>8} {:>12} {:>12} {:>12} {:>14} {:>16}\n",
            "L7 feature leg",
            "waypoint CPU",
            "over plain",
            "ratio",
            "p50 @1000/s",
            "p99 @1000/s",
            "p50 - plain",
            "h2load max",
            "agents' CPU"
        );
        let cell = |v: f64, text: String| if v.is_nan() { "-".to_owned() } else { text };
        let plain_p50 = self.median(Path::Waypoint, |s| s.p50_us);
        for path in std::iter::once(Path::Waypoint).chain(Path::FEATURES) {
            let cpu = self.median(path, |s| s.waypoint_cpu_ms_per_1000);
            let p50 = self.median(path, |s| s.p50_us);
            let p99 = self.median(path, |s| s.p99_us);
            let rate = self.median(path, |s| s.max_rps);
            let agents = self.median(path, |s| s.agents_cpu_ms_per_1000);
            let (over, ratio, p50_over) = if path == Path::Waypoint {
                ("-".to_owned(), "-".to_owned(), "-".to_owned())
            } else {
                let c = self.cpu_cost(path);
                (
                    cell(c.over, format!("{:+.1} ms", c.over)),
                    cell(c.ratio, format!("{:.2}x", c.ratio)),
                    cell(p50 - plain_p50, format!("{:+.0} us", p50 - plain_p50)),
                )
            };
            let _ = writeln!(
                out,
                "{:<22} {:>16} {over:>12} {ratio:>8} {:>12} {:>12} {p50_over:>12} {:>14} {:>16}",
                path.title(),
                cell(cpu, format!("{cpu:.1} ms/1000")),
                cell(p50, format!("{p50:.0} us")),
                cell(p99, format!("{p99:.0} us")),
                cell(rate, format!("{rate:.0} req/s")),
                cell(agents, format!("{agents:.1} ms/1000")),
            );
        }
        out.push_str(
            "(CPU per 1000 requests at 1000/s; over plain and ratio: the waypoint's CPU against the plain waypoint leg \
             of the same round, median over rounds)",
        );
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let finite = |v: f64| if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null };
        let mut results = serde_json::Map::new();
        for path in Path::ALL {
            let mut values = serde_json::Map::new();
            for (key, _, f, _) in METRICS {
                values.insert(key.into(), finite(self.median(path, f)));
            }
            results.insert(path.key().into(), values.into());
        }
        let mut costs = serde_json::Map::new();
        for path in Path::FEATURES {
            let c = self.cpu_cost(path);
            costs.insert(
                path.key().into(),
                serde_json::json!({
                    "waypoint_cpu_ms_per_1000_req_over_waypoint": finite(c.over),
                    "waypoint_cpu_ratio_to_waypoint": finite(c.ratio),
                }),
            );
        }
        serde_json::json!({
            "paths": results,
            "l7_cost": costs,
            "waypoint_rss_idle_mib": self.rss_idle_mib,
            "waypoint_rss_peak_mib": self.rss_peak_mib,
        })
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

/// `rounds` rounds of every path in turn (see [`Path::round`]); `enroll(true|false)`
/// enrolls or un-enrolls the client and server pods; `features` from
/// [`Features::prepare`].
pub fn run(
    lab: &Lab,
    rounds: u32,
    count: u32,
    requests: u32,
    agents: &[u32],
    features: &Features,
    enroll: &mut dyn FnMut(bool) -> anyhow::Result<()>,
) -> anyhow::Result<Results> {
    let waypoint = waypoint_pid(lab)?;
    let rss_idle_mib = rss_mib(&[waypoint]).0;
    let setup = Setup { agents, waypoint, features };
    let mut samples: Vec<(Path, Vec<Sample>)> = Path::ALL.iter().map(|p| (*p, Vec::new())).collect();
    for round in 1..=rounds {
        for path in Path::round(round) {
            enroll(path != Path::NoMesh)?;
            if path != Path::NoMesh {
                lab.wait_certificates()?;
            }
            let s = sample(lab, path, count, requests, &setup)
                .with_context(|| format!("waypoint bench, {} path", path.title()))?;
            println!(
                "  round {round}/{rounds} HTTP {}: p50/p99 {:.0}/{:.0} us, max {:.0} req/s, waypoint CPU {:.0} ms/1000 req",
                path.title(),
                s.p50_us,
                s.p99_us,
                s.max_rps,
                s.waypoint_cpu_ms_per_1000
            );
            if let Some((_, list)) = samples.iter_mut().find(|(p, _)| *p == path) {
                list.push(s);
            }
        }
    }
    Ok(Results { samples, rss_idle_mib, rss_peak_mib: rss_mib(&[waypoint]).1 })
}

#[cfg(test)]
mod tests {
    use super::{Path, cost};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn cost_pairs_rounds_and_takes_medians() {
        // Round 2 was slow for both legs: paired, it costs what the others do.
        let c = cost(&[50.0, 90.0, 52.0], &[60.0, 100.0, 63.0]);
        assert!(close(c.over, 10.0) && close(c.ratio, 1.2), "{c:?}");
        // A feature that saves CPU has a negative cost.
        let c = cost(&[50.0], &[40.0]);
        assert!(close(c.over, -10.0) && close(c.ratio, 0.8), "{c:?}");
    }

    #[test]
    fn cost_without_pairs_is_nan() {
        for (plain, feature) in [(vec![], vec![]), (vec![f64::NAN], vec![5.0]), (vec![5.0], vec![])] {
            let c = cost(&plain, &feature);
            assert!(c.over.is_nan() && c.ratio.is_nan(), "{plain:?} {feature:?}: {c:?}");
        }
        let c = cost(&[0.0], &[5.0]);
        assert!(close(c.over, 5.0) && c.ratio.is_nan(), "no ratio to a zero: {c:?}");
    }

    #[test]
    fn rounds_rotate_the_waypoint_legs() {
        let firsts: Vec<Path> = (1..=4).map(|r| Path::round(r)[2]).collect();
        assert_eq!(firsts, [Path::Waypoint, Path::Authz, Path::Jwt, Path::Tracing]);
        for round in 1..=5 {
            let order = Path::round(round);
            assert_eq!(order.len(), Path::ALL.len());
            assert!(Path::ALL.iter().all(|p| order.contains(p)), "round {round}: {}", order.len());
            assert_eq!(&order[..2], [Path::NoMesh, Path::Tunnel]);
        }
    }
}
