//! `cargo xtask interop --ztunnel PATH [--json PATH]`: our agents against Istio's real
//! ztunnel in the lab, both ways, as a matrix of cases.
//!
//! The lab is bench's (2 nodes, our controller sharing ztunnel's fake CA root, see
//! `ztunnel.rs`); the client pod is `n1-p1`, the server pod `n2-p1`. In each direction
//! one side is our agent (the pod enrolled) and the other a ztunnel in the pod's
//! namespace (the pod un-enrolled):
//!
//! - `ours->ztunnel`: our agent on node 1 captures the client's connection and opens
//!   HBONE to the server pod's ztunnel;
//! - `ztunnel->ours`: the client pod's ztunnel (its outbound TCP redirected into it)
//!   opens HBONE to our agent's 15008 in the server pod.
//!
//! The cases, one line each (`==> interop <case>: ok (...)` or `FAILED (...)`):
//! `ipv4`/`ipv6` (an HTTP request; the server application answered, both proxies
//! counted the connection, and the caller's address reached the server side),
//! `bulk`, `bulk-ipv6` (16 MiB sent, the client's write side shut down, the server
//! reads to the end and only then answers the byte count and SHA-256, which the client
//! checks),
//! `policy-deny`/`policy-allow` at the server (an Istio `AuthorizationPolicy` at our
//! agent, a `policies:` entry in ztunnel's local config: refused by the proxy, which
//! says so, or admitted), and `pqc` (ztunnel with `COMPLIANCE_POLICY=pqc`, which
//! accepts only the X25519MLKEM768 key exchange). Every step is bounded in time.
use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use mesh_lab::{HTTP_PORT, Lab, SINK_PORT, wait_for};

use crate::ztunnel::{self, Action, Launch, Policy, Running, Ztunnel};

const CLIENT: &str = "n1-p1";
const SERVER: &str = "n2-p1";
/// Bytes of the half-closed bulk transfers.
const BULK_BYTES: u64 = 16 << 20;
/// The client's SPIFFE principal (Istio's form, without `spiffe://`).
const CLIENT_PRINCIPAL: &str = "cluster.local/ns/shop/sa/sa-n1-p1";
/// The file the policy cases write into the lab's config directory.
const POLICY_FILE: &str = "interop-policy.yaml";

/// What `cargo xtask interop` was asked for, checked before anything is built.
pub struct Options {
    ztunnel: PathBuf,
    json: Option<PathBuf>,
}

impl Options {
    pub fn new(ztunnel: &Path, json: Option<PathBuf>) -> anyhow::Result<Self> {
        if let Some(path) = &json {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                bail!("--json {}: directory {} does not exist", path.display(), dir.display());
            }
        }
        Ok(Self { ztunnel: ztunnel::check_binary(ztunnel)?, json })
    }
}

/// Who is client and who is server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Direction {
    /// Our agent is the HBONE client, ztunnel the server.
    OursToZtunnel,
    /// ztunnel is the HBONE client, our agent the server.
    ZtunnelToOurs,
}

impl Direction {
    const BOTH: [Self; 2] = [Self::OursToZtunnel, Self::ZtunnelToOurs];

    fn name(self) -> &'static str {
        match self {
            Self::OursToZtunnel => "ours->ztunnel",
            Self::ZtunnelToOurs => "ztunnel->ours",
        }
    }

    /// The pod that runs a ztunnel (not enrolled with our agent).
    fn ztunnel_pod(self) -> &'static str {
        match self {
            Self::OursToZtunnel => SERVER,
            Self::ZtunnelToOurs => CLIENT,
        }
    }

    /// The pod our agent serves.
    fn agent_pod(self) -> &'static str {
        match self {
            Self::OursToZtunnel => CLIENT,
            Self::ZtunnelToOurs => SERVER,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    V4,
    V6,
}

/// `http://<ip>:<port>/`, the IPv6 address in brackets.
fn url(ip: &str, port: u16) -> String {
    if ip.contains(':') { format!("http://[{ip}]:{port}/") } else { format!("http://{ip}:{port}/") }
}

/// `ip:port` as a socket address, the IPv6 address in brackets.
fn socket(ip: &str, port: u16) -> String {
    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
}

/// The address the echo server says it saw the request come from (`peer=<ip:port>`).
fn peer_ip(body: &str) -> Option<IpAddr> {
    let peer = body.split_whitespace().find_map(|w| w.strip_prefix("peer="))?;
    peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

/// The outcome of every case, in the order they ran.
#[derive(Default)]
struct Report {
    cases: Vec<(String, Result<String, String>)>,
}

impl Report {
    /// Records a case and prints its line.
    fn record(&mut self, name: &str, outcome: anyhow::Result<String>) {
        let outcome = outcome.map_err(|e| format!("{e:#}"));
        match &outcome {
            Ok(detail) => println!("==> interop {name}: ok ({detail})"),
            Err(why) => println!("==> interop {name}: FAILED ({why})"),
        }
        self.cases.push((name.to_owned(), outcome));
    }

    fn passed(&self) -> usize {
        self.cases.iter().filter(|(_, o)| o.is_ok()).count()
    }

    /// `{"cases": {"<name>": "ok" | "failed: <reason>"}}`.
    fn json(&self) -> serde_json::Value {
        let cases: serde_json::Map<String, serde_json::Value> = self
            .cases
            .iter()
            .map(|(name, outcome)| {
                let value = match outcome {
                    Ok(_) => "ok".to_owned(),
                    Err(why) => format!("failed: {why}"),
                };
                (name.clone(), value.into())
            })
            .collect();
        serde_json::json!({ "cases": cases })
    }
}

/// Which of the two pods are enrolled with our agents (the lab enrolls both).
struct Enrolled<'l> {
    lab: &'l Lab,
    client: bool,
    server: bool,
}

impl<'l> Enrolled<'l> {
    fn new(lab: &'l Lab) -> Self {
        Self { lab, client: true, server: true }
    }

    fn set(&mut self, pod: &str, on: bool) -> anyhow::Result<()> {
        let state = if pod == CLIENT { &mut self.client } else { &mut self.server };
        if *state != on {
            if on {
                self.lab.enroll(pod)?;
            } else {
                self.lab.unenroll(pod)?;
            }
            *state = on;
        }
        Ok(())
    }

    /// Both pods enrolled, with their certificates.
    fn restore(&mut self) -> anyhow::Result<()> {
        self.set(CLIENT, true)?;
        self.set(SERVER, true)?;
        self.lab.wait_certificates()
    }
}

/// Prepares `direction`: the ztunnel pod un-enrolled, our agent's pod enrolled, a
/// ztunnel started with `policies` and `env`, certificates issued.
fn session<'l>(
    lab: &'l Lab,
    zt: &Ztunnel,
    pods: &mut Enrolled<'_>,
    direction: Direction,
    policies: &[Policy],
    env: &[&str],
) -> anyhow::Result<Running<'l>> {
    pods.set(direction.ztunnel_pod(), false)?;
    pods.set(direction.agent_pod(), true)?;
    let redirect = (direction == Direction::ZtunnelToOurs).then_some(CLIENT);
    let launch = Launch { workloads: &[CLIENT, SERVER], pods: &[direction.ztunnel_pod()], redirect, policies, env };
    let running = zt.start(lab, &launch)?;
    lab.wait_certificates()?;
    Ok(running)
}

/// Connections our agent on the node of `direction`'s agent pod has carried through
/// HBONE (client side: tunneled; server side: accepted).
fn agent_count(lab: &Lab, direction: Direction) -> anyhow::Result<u64> {
    let stats = lab.agent_stats(lab.pod(direction.agent_pod()).node)?;
    Ok(stats["agent"]["tunneled"].as_u64().unwrap_or(0) + stats["agent"]["inbound_accepted"].as_u64().unwrap_or(0))
}

fn agent_denied(lab: &Lab) -> anyhow::Result<u64> {
    Ok(lab.agent_stats(lab.pod(SERVER).node)?["agent"]["denied"].as_u64().unwrap_or(0))
}

/// Both proxies' connection counters around `f`: fails unless each grew.
fn through_both<T>(
    lab: &Lab,
    direction: Direction,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, String)> {
    let zt_pod = direction.ztunnel_pod();
    let (agent_before, zt_before) = (agent_count(lab, direction)?, Running::connections(lab, zt_pod));
    let value = f()?;
    let (agent_after, zt_after) = (agent_count(lab, direction)?, Running::connections(lab, zt_pod));
    if agent_after <= agent_before || zt_after <= zt_before {
        bail!(
            "not through both proxies: our agent's HBONE connections {agent_before} -> {agent_after}, ztunnel's \
             {zt_before} -> {zt_after}"
        );
    }
    Ok((value, format!("agent +{}, ztunnel +{}", agent_after - agent_before, zt_after - zt_before)))
}

/// curl from the client pod; (exit code, stdout or stderr, time taken).
fn curl(lab: &Lab, url: &str) -> anyhow::Result<(i32, String, Duration)> {
    let start = Instant::now();
    let out = lab.exec(CLIENT, &["curl", "-sS", "-g", "--max-time", "5", url])?;
    let took = start.elapsed();
    let code = out.status.code().unwrap_or(-1);
    let text = if code == 0 { &out.stdout } else { &out.stderr };
    Ok((code, String::from_utf8_lossy(text).trim().to_owned(), took))
}

fn family_ip(lab: &Lab, pod: &str, family: Family) -> String {
    let pod = lab.pod(pod);
    match family {
        Family::V4 => pod.ip4.clone(),
        Family::V6 => pod.ip6.clone(),
    }
}

/// One HTTP request from the client to the server's echo application over `family`:
/// the server answered, both proxies carried it, and the caller's address reached the
/// server side (in the application's `peer=` behind our agent; in ztunnel's access
/// log, with the caller's identity, behind ztunnel, which connects to the application
/// from the pod's own address).
fn http(lab: &Lab, running: &Running<'_>, direction: Direction, family: Family) -> anyhow::Result<String> {
    let target = url(&family_ip(lab, SERVER, family), HTTP_PORT);
    let caller = family_ip(lab, CLIENT, family);
    let ((body, took), counted) = through_both(lab, direction, || {
        let (code, body, took) = curl(lab, &target)?;
        if code != 0 {
            bail!("curl {target} from {CLIENT} exited {code}: {body}");
        }
        Ok((body, took))
    })?;
    if !body.starts_with(&format!("pod={SERVER} ")) {
        bail!("unexpected answer {body:?}");
    }
    let peer = peer_ip(&body).with_context(|| format!("no peer= in {body:?}"))?;
    let seen = match direction {
        Direction::ZtunnelToOurs => {
            if peer.to_string() != caller {
                bail!("the application saw {peer}, not the caller {caller}");
            }
            format!("app saw caller {peer}")
        }
        Direction::OursToZtunnel => {
            let identity = format!("spiffe://{CLIENT_PRINCIPAL}");
            let log = running.log(SERVER);
            wait_for(Duration::from_secs(3), || {
                running.log(SERVER).lines().any(|l| l.contains(&caller) && l.contains(&identity))
            })
            .with_context(|| {
                format!("ztunnel's log has no line with the caller {caller} and {identity}:{}", tail(&log, 5))
            })?;
            format!("ztunnel logged caller {caller} as {identity}, app saw {peer}")
        }
    };
    Ok(format!("HTTP over {family:?} in {} ms, {seen}; {counted}", took.as_millis()))
}

/// The last `n` lines of a log, indented.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().fold(String::new(), |mut out, l| {
        let _ = write!(out, "\n    {l}");
        out
    })
}

/// A half-closed bulk transfer to the server's sink: `BULK_BYTES` sent, the client's
/// write side shut, the server's byte count and SHA-256 checked by the client.
fn bulk(lab: &Lab, direction: Direction, family: Family) -> anyhow::Result<String> {
    let addr = socket(&family_ip(lab, SERVER, family), SINK_PORT);
    let echo = lab.spec.echo_bin.display().to_string();
    let (json, counted) = through_both(lab, direction, || {
        let out = crate::bench::exec_bounded(
            lab,
            CLIENT,
            60,
            &[&echo, "bulk", "--addr", &addr, "--bytes", &BULK_BYTES.to_string(), "--seconds", "30"],
        )?;
        if !out.status.success() {
            bail!(
                "mesh-echo bulk: {} {}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice::<serde_json::Value>(&out.stdout).context("mesh-echo bulk JSON")
    })?;
    if json["ok"] != true {
        bail!("digest mismatch: {json}");
    }
    let (send, total) = (json["send_seconds"].as_f64().unwrap_or(0.0), json["total_seconds"].as_f64().unwrap_or(0.0));
    let digest = json["sha256"].as_str().unwrap_or("?");
    Ok(format!(
        "{} MiB over {family:?} sent then half-closed in {send:.2} s, server answered after EOF: {} bytes, sha256 {}... matches, \
         {total:.2} s in all ({:.0} MiB/s); {counted}",
        BULK_BYTES >> 20,
        json["bytes"],
        &digest[..digest.len().min(16)],
        (BULK_BYTES as f64 / 1_048_576.0) / total.max(1e-9),
    ))
}

/// A request the server's proxy must refuse: curl fails well before its 5 s limit
/// (a refusal, not a timeout) and the proxy recorded the refusal (`evidence` grows).
fn refused(lab: &Lab, evidence: impl Fn() -> anyhow::Result<u64>, what: &str) -> anyhow::Result<String> {
    let target = url(&lab.pod(SERVER).ip4, HTTP_PORT);
    let before = evidence()?;
    let (code, out, took) = curl(lab, &target)?;
    if code == 0 {
        bail!("admitted: {out}");
    }
    if took >= Duration::from_secs(4) {
        bail!("curl gave up after {} ms ({out}): a timeout, not a refusal", took.as_millis());
    }
    wait_for(Duration::from_secs(3), || evidence().is_ok_and(|n| n > before))
        .with_context(|| format!("curl failed ({out}) but {what} did not record a refusal"))?;
    Ok(format!("refused in {} ms ({out}); {what} recorded it", took.as_millis()))
}

/// An Istio `AuthorizationPolicy` on the server workload in the lab's config directory
/// while it lives (the agents have applied it when [`OurPolicy::apply`] returns);
/// dropping it removes the file.
struct OurPolicy<'l> {
    lab: &'l Lab,
}

impl<'l> OurPolicy<'l> {
    fn apply(lab: &'l Lab, action: &str) -> anyhow::Result<Self> {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: interop-{}\n  \
             namespace: shop\nspec:\n  selector:\n    matchLabels:\n      statefulset.kubernetes.io/pod-name: \
             {SERVER}\n  action: {action}\n  rules:\n  - from:\n    - source:\n        principals: \
             [\"{CLIENT_PRINCIPAL}\"]\n",
            action.to_ascii_lowercase()
        );
        let guard = Self { lab };
        guard.write(Some(&yaml))?;
        Ok(guard)
    }

    /// Writes (or removes) the policy file and waits until both agents run the
    /// controller's new version.
    fn write(&self, yaml: Option<&str>) -> anyhow::Result<()> {
        let lab = self.lab;
        let before = lab.controller_version()?;
        let path = lab.config_dir().join(POLICY_FILE);
        match yaml {
            Some(yaml) => std::fs::write(&path, yaml).with_context(|| format!("write {}", path.display()))?,
            None => std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?,
        }
        wait_for(Duration::from_secs(10), || lab.controller_version().is_ok_and(|v| v > before)).with_context(
            || format!("the controller did not apply {}: {}", path.display(), tail(&lab.controller_log(), 5)),
        )?;
        let version = lab.controller_version()?;
        wait_for(Duration::from_secs(10), || (1..=lab.nodes.len()).all(|n| lab.agent_config_version(n) >= version))
            .with_context(|| format!("the agents did not reach config version {version}"))
    }
}

impl Drop for OurPolicy<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.write(None) {
            eprintln!("removing the interop policy: {e:#}");
        }
    }
}

/// The lines of `log` that say ztunnel refused a connection by policy.
fn policy_rejections(log: &str) -> u64 {
    log.lines().filter(|l| l.contains("policy rejection")).count() as u64
}

/// The cases of one direction with a plain ztunnel: IPv4, IPv6 and bulk over both, and (with
/// our agent as server) its policies.
fn plain_cases(report: &mut Report, lab: &Lab, zt: &Ztunnel, pods: &mut Enrolled<'_>, direction: Direction) {
    let d = direction.name();
    let mut names = vec![format!("ipv4 {d}"), format!("ipv6 {d}"), format!("bulk {d}"), format!("bulk-ipv6 {d}")];
    if direction == Direction::ZtunnelToOurs {
        names.extend([format!("policy-deny {d}"), format!("policy-allow {d}")]);
    }
    let mut running = match session(lab, zt, pods, direction, &[], &[]) {
        Ok(running) => running,
        Err(e) => {
            for name in &names {
                report.record(name, Err(anyhow::anyhow!("setup: {e:#}")));
            }
            return;
        }
    };
    report.record(&names[0], http(lab, &running, direction, Family::V4));
    report.record(&names[1], http(lab, &running, direction, Family::V6));
    report.record(&names[2], bulk(lab, direction, Family::V4));
    report.record(&names[3], bulk(lab, direction, Family::V6));
    if direction == Direction::ZtunnelToOurs {
        let deny = OurPolicy::apply(lab, "DENY").and_then(|_policy| {
            refused(lab, || agent_denied(lab), "our agent's `denied` counter")
                .map(|d| format!("AuthorizationPolicy DENY {CLIENT_PRINCIPAL} on {SERVER}: {d}"))
        });
        report.record(&names[4], deny);
        let allow = OurPolicy::apply(lab, "ALLOW").and_then(|_policy| {
            http(lab, &running, direction, Family::V4)
                .map(|d| format!("AuthorizationPolicy ALLOW {CLIENT_PRINCIPAL} on {SERVER}: {d}"))
        });
        report.record(&names[5], allow);
    }
    if let Err(e) = running.stop() {
        println!("==> interop: stopping ztunnel after {d}: {e:#}");
    }
}

/// ztunnel as the server with a policy on our client's principal in its local config:
/// DENY refuses (ztunnel logs the policy rejection), ALLOW admits.
fn ztunnel_policy_case(lab: &Lab, zt: &Ztunnel, pods: &mut Enrolled<'_>, action: Action) -> anyhow::Result<String> {
    let direction = Direction::OursToZtunnel;
    let policy = Policy {
        name: format!("interop-{action:?}").to_ascii_lowercase(),
        namespace: lab.pod(SERVER).namespace.clone(),
        action,
        principals: vec![CLIENT_PRINCIPAL.into()],
    };
    let mut running = session(lab, zt, pods, direction, std::slice::from_ref(&policy), &[])?;
    let what = format!("ztunnel policy {action:?} {CLIENT_PRINCIPAL} in namespace {}", policy.namespace);
    let outcome = match action {
        Action::Deny => refused(lab, || Ok(policy_rejections(&running.log(SERVER))), "ztunnel's log").map(|d| {
            let line = running.log(SERVER).lines().find(|l| l.contains("policy rejection")).map(str::to_owned);
            format!("{what}: {d}: {}", line.as_deref().map_or("", |l| l.split_once("error=").map_or(l, |(_, e)| e)))
        }),
        Action::Allow => http(lab, &running, direction, Family::V4).map(|d| format!("{what}: {d}")),
    };
    running.stop()?;
    outcome
}

/// ztunnel with `COMPLIANCE_POLICY=pqc` (X25519MLKEM768 only) in `direction`.
fn pqc_case(lab: &Lab, zt: &Ztunnel, pods: &mut Enrolled<'_>, direction: Direction) -> anyhow::Result<String> {
    let mut running = session(lab, zt, pods, direction, &[], &["COMPLIANCE_POLICY=pqc"])?;
    let outcome = http(lab, &running, direction, Family::V4).map_err(|e| {
        let log = running.log(direction.ztunnel_pod());
        let cause = log.lines().rev().find_map(|l| l.split_once("error=").map(|(_, e)| e.to_owned()));
        e.context(cause.unwrap_or_default())
    });
    running.stop()?;
    outcome.map(|d| format!("COMPLIANCE_POLICY=pqc (X25519MLKEM768 only): {d}"))
}

/// The IPv4 HTTP case in both directions, for `cargo xtask bench --ztunnel` (a check
/// that the ztunnel leg is comparable, not a benchmark): prints the lines, leaves both
/// pods enrolled and no ztunnel running; an error only when the lab itself fails.
pub fn smoke(lab: &Lab, zt: &Ztunnel) -> anyhow::Result<()> {
    let mut report = Report::default();
    let mut pods = Enrolled::new(lab);
    for direction in Direction::BOTH {
        let outcome = session(lab, zt, &mut pods, direction, &[], &[]).and_then(|mut running| {
            let outcome = http(lab, &running, direction, Family::V4);
            running.stop()?;
            outcome
        });
        report.record(&format!("ipv4 {}", direction.name()), outcome);
    }
    pods.restore()
}

pub fn interop(options: &Options) -> anyhow::Result<()> {
    let zt = Ztunnel::prepare(&options.ztunnel)?;
    println!(
        "==> interop: ztunnel {} against our agents; client {CLIENT}, server {SERVER}; our controller's CA uses \
         ztunnel's fake CA root ({})",
        options.ztunnel.display(),
        zt.root_subject
    );
    let mut spec = crate::lab_spec(2, 2);
    spec.ca_root = Some(zt.ca_dir.clone());
    println!("==> lab up (controller, 2 agents, 4 pods)");
    let lab = Lab::up(spec)?;
    let started = Instant::now();
    let mut report = Report::default();
    let mut pods = Enrolled::new(&lab);
    for direction in Direction::BOTH {
        plain_cases(&mut report, &lab, &zt, &mut pods, direction);
    }
    let d = Direction::OursToZtunnel.name();
    for action in [Action::Deny, Action::Allow] {
        let name = format!("policy-{} {d}", format!("{action:?}").to_ascii_lowercase());
        report.record(&name, ztunnel_policy_case(&lab, &zt, &mut pods, action));
    }
    for direction in Direction::BOTH {
        report.record(&format!("pqc {}", direction.name()), pqc_case(&lab, &zt, &mut pods, direction));
    }
    let restored = pods.restore();
    let (passed, total) = (report.passed(), report.cases.len());
    println!("==> interop: {passed}/{total} cases passed in {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.json())? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
        println!("==> results written to {}", path.display());
    }
    drop(lab);
    drop(zt);
    restored?;
    if passed < total {
        bail!("{} of {total} interop cases failed", total - passed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_bracket_ipv6() {
        assert_eq!(url("10.98.2.11", 8080), "http://10.98.2.11:8080/");
        assert_eq!(url("fd00:98:2::11", 8080), "http://[fd00:98:2::11]:8080/");
        assert_eq!(socket("fd00:98:2::11", 9001), "[fd00:98:2::11]:9001");
        assert_eq!(socket("10.98.2.11", 9001), "10.98.2.11:9001");
    }

    #[test]
    fn peer_from_the_echo_answer() {
        let v4 = "pod=n2-p1 peer=10.98.1.11:40000 local=10.98.2.11:8080";
        assert_eq!(peer_ip(v4), Some("10.98.1.11".parse().unwrap()));
        let v6 = "pod=n2-p1 peer=[fd00:98:1::11]:40000 local=[fd00:98:2::11]:8080";
        assert_eq!(peer_ip(v6).map(|ip| ip.to_string()).as_deref(), Some("fd00:98:1::11"));
        assert_eq!(peer_ip("pod=n2-p1"), None);
        assert_eq!(peer_ip("peer=nonsense"), None);
    }

    #[test]
    fn directions_name_client_first_and_put_ztunnel_on_the_other_pod() {
        for direction in Direction::BOTH {
            assert_ne!(direction.ztunnel_pod(), direction.agent_pod());
        }
        assert_eq!(Direction::OursToZtunnel.name(), "ours->ztunnel");
        assert_eq!(Direction::OursToZtunnel.agent_pod(), CLIENT);
        assert_eq!(Direction::ZtunnelToOurs.ztunnel_pod(), CLIENT);
    }

    #[test]
    fn report_json_and_count() {
        let mut report = Report::default();
        report.record("ipv4 ours->ztunnel", Ok("fine".into()));
        report.record("pqc ztunnel->ours", Err(anyhow::anyhow!("handshake").context("curl")));
        assert_eq!(report.passed(), 1);
        assert_eq!(
            report.json(),
            serde_json::json!({ "cases": {
                "ipv4 ours->ztunnel": "ok",
                "pqc ztunnel->ours": "failed: curl: handshake",
            }})
        );
    }

    #[test]
    fn rejections_are_counted_by_line() {
        let log = "a\nerror access connection complete error=\"connection closed due to policy rejection: x\"\nb\n";
        assert_eq!(policy_rejections(log), 1);
        assert_eq!(policy_rejections("nothing"), 0);
    }
}
