//! A Prometheus server (Debian's `prometheus` package) as a lab process, scraping
//! every node agent and the waypoint once a second, so that the queries Kiali and
//! Istio's Grafana dashboards issue can be run against the lab's own traffic.
//!
//! It runs in the lab's fabric namespace: from there the nodes are reachable at
//! their fabric addresses (the agents' metrics listen on every node address, :15020)
//! and the waypoint's pod address is routed through its node (see
//! [`Lab::start_waypoint`]). Its HTTP API listens on the fabric's loopback, which no
//! other lab shares, so the port is always free; queries run with curl in the
//! fabric. It is spawned like any lab process (pid file, lab cgroup), so `lab down`
//! and dropping the [`Lab`] stop it.
use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use anyhow::{Context, bail};

use crate::{Lab, wait_for};

/// The API's address in the fabric namespace.
pub const LISTEN: &str = "127.0.0.1:19090";
/// The lab process name (`<lab dir>/prometheus.log`, `.pid`).
pub const PROCESS: &str = "prometheus";
/// The port of the agents' and the waypoint's `/metrics`.
const METRICS_PORT: u16 = 15020;

/// One scrape target: its address and the target labels it gets, standing in for the
/// ones Kubernetes service discovery and Istio's `kubernetes-pods` job would add.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub job: &'static str,
    pub address: String,
    pub labels: BTreeMap<String, String>,
}

/// The lab's scrape targets: each node's agent (`app="ztunnel"`: the node proxy's
/// role, which is what Kiali's ambient filters look for in the `app` label) and the
/// waypoint when the lab runs one.
pub fn targets(lab: &Lab) -> Vec<Target> {
    let mut out: Vec<Target> = lab
        .nodes
        .iter()
        .map(|node| Target {
            job: "mesh-agent",
            address: format!("{}:{METRICS_PORT}", node.ip4),
            labels: BTreeMap::from([
                ("app".to_owned(), "ztunnel".to_owned()),
                ("namespace".to_owned(), "mesh-system".to_owned()),
                ("pod".to_owned(), format!("mesh-agent-{}", node.name)),
                ("node".to_owned(), node.name.clone()),
            ]),
        })
        .collect();
    if let Some(pod) = &lab.waypoint {
        out.push(Target {
            job: "mesh-waypoint",
            address: format!("{}:{METRICS_PORT}", pod.ip4),
            labels: BTreeMap::from([
                ("app".to_owned(), pod.name.clone()),
                ("namespace".to_owned(), pod.namespace.clone()),
                ("pod".to_owned(), pod.name.clone()),
                ("node".to_owned(), lab.node(pod.node).name.clone()),
            ]),
        });
    }
    out
}

/// `prometheus.yml` for `targets`: static configs (one job per kind), scraped and
/// evaluated every second. JSON is YAML, so label values need no YAML quoting rules.
pub fn config(targets: &[Target]) -> String {
    let mut jobs: BTreeMap<&str, Vec<&Target>> = BTreeMap::new();
    for target in targets {
        jobs.entry(target.job).or_default().push(target);
    }
    let mut out = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n");
    out.push_str("scrape_configs:\n");
    for (job, targets) in jobs {
        let _ = writeln!(out, "- job_name: {}", serde_json::Value::from(job));
        out.push_str("  static_configs:\n");
        for target in targets {
            let _ = writeln!(out, "  - targets: [{}]", serde_json::Value::from(target.address.as_str()));
            let _ = writeln!(out, "    labels: {}", serde_json::to_string(&target.labels).expect("strings serialize"));
        }
    }
    out
}

/// One series of an instant query's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, `""` when the series has none.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// The series of an `/api/v1/query` answer whose result is a vector; an error names
/// what is wrong (a failed query carries Prometheus' `errorType` and `error`).
pub fn parse_vector(body: &str) -> anyhow::Result<Vec<Sample>> {
    let answer: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("query answer is not JSON: {body:.200}"))?;
    if answer["status"] != "success" {
        bail!(
            "query failed: status {}, errorType {}, error {}",
            answer["status"],
            answer["errorType"],
            answer["error"]
        );
    }
    let data = &answer["data"];
    if data["resultType"] != "vector" {
        bail!("query result: resultType {} where a vector was expected", data["resultType"]);
    }
    let Some(result) = data["result"].as_array() else {
        bail!("query result: data.result is {} where an array was expected", data["result"]);
    };
    result
        .iter()
        .map(|series| {
            let labels = series["metric"]
                .as_object()
                .with_context(|| format!("series without a metric object: {series}"))?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let value = series["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("series value is not [time, \"number\"]: {}", series["value"]))?;
            Ok(Sample { labels, value })
        })
        .collect()
}

/// A running Prometheus of a lab.
pub struct Prometheus<'a> {
    lab: &'a Lab,
}

impl<'a> Prometheus<'a> {
    /// Writes the config, starts the server in the fabric namespace with its storage
    /// in the lab directory, and waits (at most 20 s) until it is ready.
    pub fn start(lab: &'a Lab) -> anyhow::Result<Self> {
        let dir = lab.dir.join(PROCESS);
        std::fs::create_dir_all(dir.join("data"))?;
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config(&targets(lab)))?;
        let argv = [
            "prometheus".to_owned(),
            format!("--config.file={}", config_file.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            "--storage.tsdb.retention.time=1d".to_owned(),
            format!("--web.listen-address={LISTEN}"),
            "--log.level=warn".to_owned(),
        ];
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        lab.spawn_in("fabric", PROCESS, &argv)?;
        let prometheus = Self { lab };
        wait_for(Duration::from_secs(20), || prometheus.get("/-/ready").is_ok())
            .with_context(|| format!("prometheus not ready; log:\n{}", lab.log_of(PROCESS)))?;
        Ok(prometheus)
    }

    fn curl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = vec!["curl", "-sS", "--fail-with-body", "--max-time", "10"];
        command.extend_from_slice(args);
        let out = self.lab.exec("fabric", &command)?;
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("curl {args:?}: {} {body}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(body)
    }

    fn get(&self, path: &str) -> anyhow::Result<String> {
        self.curl(&[&format!("http://{LISTEN}{path}")])
    }

    /// An instant query (`/api/v1/query`) at the current time.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<Sample>> {
        let body =
            self.curl(&["--data-urlencode", &format!("query={promql}"), &format!("http://{LISTEN}/api/v1/query")])?;
        parse_vector(&body).with_context(|| format!("query {promql}"))
    }

    /// Waits until every target has been scraped successfully (`up == 1` for each).
    pub fn wait_targets_up(&self, timeout: Duration) -> anyhow::Result<()> {
        let want = targets(self.lab).len();
        wait_for(timeout, || self.query("up == 1").is_ok_and(|up| up.len() == want)).with_context(|| {
            format!(
                "not every target is up: {}\nlog:\n{}",
                self.get("/api/v1/targets").unwrap_or_default(),
                self.lab.log_of(PROCESS)
            )
        })
    }

    /// Waits until `promql` returns at least one series, and returns them.
    pub fn query_nonempty(&self, promql: &str, timeout: Duration) -> anyhow::Result<Vec<Sample>> {
        let mut last = Ok(Vec::new());
        let _ = wait_for(timeout, || {
            last = self.query(promql);
            last.as_ref().is_ok_and(|s| !s.is_empty())
        });
        let samples = last?;
        if samples.is_empty() {
            bail!("no series after {timeout:?} for {promql}");
        }
        Ok(samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(job: &'static str, address: &str, pod: &str) -> Target {
        Target { job, address: address.into(), labels: BTreeMap::from([("pod".to_owned(), pod.to_owned())]) }
    }

    #[test]
    fn config_groups_targets_by_job_with_their_labels() {
        let text = config(&[
            target("mesh-agent", "10.99.0.1:15020", "a1"),
            target("mesh-waypoint", "10.98.1.250:15020", "wp"),
            target("mesh-agent", "10.99.0.2:15020", "a\"2"),
        ]);
        assert!(text.starts_with("global:\n  scrape_interval: 1s\n"), "{text}");
        let agent = text.find("- job_name: \"mesh-agent\"").expect("agent job");
        let waypoint = text.find("- job_name: \"mesh-waypoint\"").expect("waypoint job");
        let second = text.find("10.99.0.2:15020").expect("second agent");
        assert!(agent < second && second < waypoint, "{text}");
        assert!(text.contains("    labels: {\"pod\":\"a\\\"2\"}\n"), "{text}");
        assert_eq!(text.matches("- job_name").count(), 2, "{text}");
    }

    #[test]
    fn parses_a_vector_answer() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"response_code":"200","source_workload":"n1-p1"},"value":[1700000000.1,"0.5"]},
            {"metric":{},"value":[1700000000.1,"NaN"]}]}}"#;
        let samples = parse_vector(body).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].label("response_code"), "200");
        assert_eq!(samples[0].label("missing"), "");
        assert!((samples[0].value - 0.5).abs() < f64::EPSILON);
        assert!(samples[1].value.is_nan());
    }

    #[test]
    fn a_failed_or_odd_answer_is_an_error_that_says_why() {
        let failed = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        let e = parse_vector(failed).unwrap_err().to_string();
        assert!(e.contains("bad_data") && e.contains("parse error at char 5"), "{e}");
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse_vector(matrix).unwrap_err().to_string().contains("\"matrix\""));
        let bad_value = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,2]}]}}"#;
        assert!(parse_vector(bad_value).unwrap_err().to_string().contains("[1,2]"));
        assert!(parse_vector("<html>").unwrap_err().to_string().contains("not JSON"));
    }
}
