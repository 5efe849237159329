//! Istio's ztunnel, a binary the user provides, in the lab next to our agents: the
//! third leg of `cargo xtask bench --ztunnel PATH` and the peer of `cargo xtask interop`.
//!
//! - One ztunnel per pod, inside the pod's network namespace and cgroup, in its
//!   dedicated mode (`PROXY_MODE=dedicated`, the pod named by `PROXY_WORKLOAD_INFO`),
//!   with no istiod: `XDS_ADDRESS` empty and a local config (`LOCAL_XDS_PATH`) listing
//!   the lab's pods as HBONE workloads with the identities our controller gives them
//!   (`spiffe://cluster.local/ns/shop/sa/sa-<pod>`), and optionally authorization
//!   policies ([`Policy`], ztunnel's `policies:` entries).
//! - Certificates from ztunnel's built-in fake CA (`FAKE_CA=true`, present only in a
//!   binary built with `--features testing`). Its root certificate and key are in the
//!   binary; [`Ztunnel::prepare`] finds the pair and hands it to our controller as the
//!   lab's CA root, so both meshes share one root and their identities line up.
//! - The client pod's outbound TCP, IPv4 and IPv6 (not on `lo`, not marked by
//!   ztunnel's `PACKET_MARK=1337`) is redirected to ztunnel's 15001 by an nftables NAT
//!   rule in that pod, as ztunnel's dedicated mode expects; the server pod's ztunnel
//!   receives HBONE on 15008 and connects to the application from its own address
//!   (`ENABLE_ORIG_SRC=false`: the application sees the pod's own address, the caller
//!   shows in ztunnel's access log).
//! - `MESH_BENCH_ZTUNNEL_ENV="KEY=VALUE ..."` passes more settings to every ztunnel,
//!   e.g. `COMPLIANCE_POLICY=pqc` (X25519MLKEM768 only) or `ZTUNNEL_WORKER_THREADS=1`;
//!   [`Launch::env`] adds settings to one start.
//!
//! The ztunnels run only while a [`Running`] lives (our agents' listeners take the same
//! pod ports otherwise); dropping it removes the redirect and stops them, and the lab
//! stops them with everything else on any failure.
use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use mesh_lab::{Lab, wait_for};
use rcgen::PublicKeyData as _;

/// ztunnel's mark on its own sockets, which the redirect lets through.
const MARK: &str = "0x539";
/// The nftables table the redirect lives in (inside the client pod's namespace); an
/// `inet` table, so one rule takes IPv4 and IPv6.
const NFT_TABLE: &str = "mesh_bench_ztunnel";

/// `--ztunnel PATH` as an absolute path to an executable file, or an error saying what
/// is wrong with it.
pub fn check_binary(path: &Path) -> anyhow::Result<PathBuf> {
    let absolute = fs::canonicalize(path).with_context(|| format!("--ztunnel {}: no such file", path.display()))?;
    let meta = fs::metadata(&absolute).with_context(|| format!("--ztunnel {}", path.display()))?;
    if !meta.is_file() {
        bail!("--ztunnel {}: not a file", path.display());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        bail!("--ztunnel {}: not executable (chmod +x it)", path.display());
    }
    Ok(absolute)
}

/// A ztunnel binary ready for the lab, and the CA root it shares with our controller.
pub struct Ztunnel {
    binary: PathBuf,
    /// `root-cert.pem` and `root-key.pem`: ztunnel's fake CA root, for our controller.
    pub ca_dir: PathBuf,
    pub root_subject: String,
    extra_env: Vec<String>,
}

/// The PEM blocks of one kind (`CERTIFICATE`, `PRIVATE KEY`) found in `bytes`.
fn pem_blocks(bytes: &[u8], label: &str) -> Vec<String> {
    let (begin, end) = (format!("-----BEGIN {label}-----"), format!("-----END {label}-----"));
    let mut blocks = Vec::new();
    let mut rest = bytes;
    while let Some(start) = find(rest, begin.as_bytes()) {
        let after = &rest[start..];
        let Some(stop) = find(after, end.as_bytes()) else { break };
        let block = &after[..stop + end.len()];
        if let Ok(text) = std::str::from_utf8(block) {
            blocks.push(format!("{text}\n"));
        }
        rest = &after[stop + end.len()..];
    }
    blocks
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The self-signed CA certificate in `binary` whose private key is in it too.
fn fake_ca_root(binary: &Path) -> anyhow::Result<(String, String, String)> {
    let bytes = fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let keys: Vec<(String, rcgen::KeyPair)> = pem_blocks(&bytes, "PRIVATE KEY")
        .into_iter()
        .filter_map(|pem| rcgen::KeyPair::from_pem(&pem).ok().map(|k| (pem, k)))
        .collect();
    let mut found = Vec::new();
    for cert_pem in pem_blocks(&bytes, "CERTIFICATE") {
        let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else { continue };
        let Ok(cert) = pem.parse_x509() else { continue };
        let is_ca = cert.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca);
        if !is_ca || cert.subject().as_raw() != cert.issuer().as_raw() {
            continue;
        }
        let public = cert.public_key().subject_public_key.data.as_ref();
        if let Some((key_pem, _)) = keys.iter().find(|(_, k)| k.der_bytes() == public) {
            found.push((cert_pem.clone(), key_pem.clone(), cert.subject().to_string()));
        }
    }
    found.dedup_by(|a, b| a.0 == b.0);
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "--ztunnel {}: no CA certificate with its key inside; the bench needs ztunnel's fake CA \
             (FAKE_CA=true): build ztunnel with `--features testing`",
            binary.display()
        ),
        n => bail!("--ztunnel {}: {n} candidate CA roots inside, cannot tell its fake CA's", binary.display()),
    }
}

impl Ztunnel {
    /// Finds the fake CA's root in the binary and writes it where the lab's controller
    /// will take it from.
    pub fn prepare(binary: &Path) -> anyhow::Result<Self> {
        let (cert, key, root_subject) = fake_ca_root(binary)?;
        let ca_dir = std::env::temp_dir().join("mesh-bench-ztunnel-ca");
        fs::create_dir_all(&ca_dir).with_context(|| format!("create {}", ca_dir.display()))?;
        fs::write(ca_dir.join("root-cert.pem"), cert)?;
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(ca_dir.join("root-key.pem"))
            .and_then(|mut f| f.write_all(key.as_bytes()))
            .with_context(|| format!("write {}", ca_dir.join("root-key.pem").display()))?;
        let extra_env: Vec<String> =
            std::env::var("MESH_BENCH_ZTUNNEL_ENV").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
        if let Some(bad) = extra_env.iter().find(|kv| !kv.contains('=')) {
            bail!("MESH_BENCH_ZTUNNEL_ENV: {bad} is not KEY=VALUE");
        }
        if !extra_env.is_empty() {
            println!("==> ztunnel settings: {}", extra_env.join(" "));
        }
        Ok(Self { binary: binary.to_owned(), ca_dir, root_subject, extra_env })
    }

    /// Starts a ztunnel in each of `launch.pods`, waits until they are ready, then
    /// redirects the outbound TCP of `launch.redirect` (a pod with a ztunnel) into its
    /// ztunnel. Dropping the result stops them.
    pub fn start<'l>(&self, lab: &'l Lab, launch: &Launch) -> anyhow::Result<Running<'l>> {
        let config = lab.dir.join("ztunnel-local.yaml");
        let workloads: Vec<&mesh_lab::Pod> = launch.workloads.iter().map(|name| lab.pod(name)).collect();
        fs::write(&config, local_config(&workloads, launch.policies))?;
        let mut running = Running {
            lab,
            pods: launch.pods.iter().map(|p| (*p).to_owned()).collect(),
            names: Vec::new(),
            pids: Vec::new(),
            redirect: None,
            stopped: false,
        };
        for &name in launch.pods {
            let pod = lab.pod(name);
            let mut argv: Vec<String> = vec![
                "env".into(),
                "PROXY_MODE=dedicated".into(),
                format!("PROXY_WORKLOAD_INFO={}/{name}/sa-{name}", pod.namespace),
                "FAKE_CA=true".into(),
                "XDS_ADDRESS=".into(),
                format!("LOCAL_XDS_PATH={}", config.display()),
                format!("NODE_NAME=node{}", pod.node),
                format!("PACKET_MARK={}", u32::from_str_radix(MARK.trim_start_matches("0x"), 16)?),
                "ENABLE_ORIG_SRC=false".into(),
            ];
            argv.extend(self.extra_env.iter().cloned());
            argv.extend(launch.env.iter().map(|kv| (*kv).to_owned()));
            argv.push(self.binary.display().to_string());
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let process = format!("ztunnel-{name}");
            running.pids.push(lab.spawn_in(name, &process, &argv)?);
            running.names.push(process);
        }
        for ((name, process), pid) in launch.pods.iter().zip(&running.names).zip(&running.pids) {
            let mut exited = false;
            let ready = wait_for(Duration::from_secs(20), || {
                exited = fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map_or(true, |s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')));
                exited
                    || lab
                        .exec(name, &["curl", "-sf", "--max-time", "1", "http://127.0.0.1:15021/healthz/ready"])
                        .is_ok_and(|o| o.status.success())
            });
            if exited || ready.is_err() {
                let log = lab.log_of(process);
                // ztunnel's fatal error line, without the backtrace that follows it.
                if let Some(error) = log.lines().rev().find(|l| l.starts_with("Error:")).filter(|_| exited) {
                    bail!("{process} (in pod {name}) exited: {error}");
                }
                let what = if exited { "exited" } else { "was not ready within 20 s" };
                bail!("{process} (in pod {name}) {what}; its log ends:{}", running.logs());
            }
        }
        if let Some(client) = launch.redirect {
            let file = lab.dir.join("ztunnel-redirect.nft");
            fs::write(&file, redirect_rules())?;
            let out = lab.exec(client, &["nft", "-f", &file.display().to_string()])?;
            if !out.status.success() {
                bail!("nftables redirect in {client}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            running.redirect = Some(client.to_owned());
        }
        Ok(running)
    }
}

/// What one [`Ztunnel::start`] runs.
pub struct Launch<'a> {
    /// The pods the local config lists as HBONE workloads.
    pub workloads: &'a [&'a str],
    /// The pods that get a ztunnel.
    pub pods: &'a [&'a str],
    /// The pod (one of `pods`) whose outbound TCP goes into its ztunnel.
    pub redirect: Option<&'a str>,
    /// Authorization policies in the local config.
    pub policies: &'a [Policy],
    /// More `KEY=VALUE` settings for these ztunnels (after `MESH_BENCH_ZTUNNEL_ENV`).
    pub env: &'a [&'a str],
}

/// What a ztunnel [`Policy`] does with a connection it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// A namespace-scoped L4 authorization policy in ztunnel's local config: what an
/// Istio `AuthorizationPolicy` without a selector in `namespace` becomes, with one
/// rule matching any of `principals` (`<trust domain>/ns/<ns>/sa/<sa>`, no `spiffe://`).
#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub action: Action,
    pub principals: Vec<String>,
}

/// ztunnel's local config (its `LOCAL_XDS_PATH` file) listing `pods` as HBONE
/// workloads of trust domain `cluster.local` and the `policies`. YAML in flow style
/// with every scalar JSON-quoted (so no value needs YAML escaping); a principal is
/// ztunnel's string match `!Exact "<principal>"` (a YAML tag names the variant).
fn local_config(pods: &[&mesh_lab::Pod], policies: &[Policy]) -> String {
    let workloads: Vec<serde_json::Value> = pods
        .iter()
        .map(|pod| {
            serde_json::json!({
                "uid": format!("Kubernetes//Pod/{}/{}", pod.namespace, pod.name),
                "name": pod.name,
                "namespace": pod.namespace,
                "serviceAccount": format!("sa-{}", pod.name),
                "trustDomain": "cluster.local",
                "workloadIps": [pod.ip4, pod.ip6],
                "protocol": "HBONE",
                "node": format!("node{}", pod.node),
                "services": {},
            })
        })
        .collect();
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let mut yaml = format!("workloads: {}\npolicies:", serde_json::Value::from(workloads));
    if policies.is_empty() {
        yaml.push_str(" []");
    }
    for p in policies {
        let principals: Vec<String> = p.principals.iter().map(|id| format!("!Exact {}", quote(id))).collect();
        // rules: any of the rules; a rule: all of its clauses; a clause: any of its matches.
        let _ = write!(
            yaml,
            "\n- name: {}\n  namespace: {}\n  scope: Namespace\n  action: {}\n  dryRun: false\n  \
             rules: [[[{{principals: [{}]}}]]]",
            quote(&p.name),
            quote(&p.namespace),
            match p.action {
                Action::Allow => "Allow",
                Action::Deny => "Deny",
            },
            principals.join(", "),
        );
    }
    yaml.push_str("\nservices: []\n");
    yaml
}

/// The redirect of a pod's outbound TCP (IPv4 and IPv6) into its ztunnel's 15001.
fn redirect_rules() -> String {
    format!(
        "table inet {NFT_TABLE} {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n    \
         oifname \"lo\" return\n    meta mark & 0xfff == {MARK} return\n    \
         meta l4proto tcp redirect to :15001\n  }}\n}}\n"
    )
}

impl Drop for Ztunnel {
    /// Removes the copy of the root (also when the benchmark fails).
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.ca_dir);
    }
}

/// The running ztunnels of one start; dropping it stops them.
pub struct Running<'l> {
    lab: &'l Lab,
    pods: Vec<String>,
    names: Vec<String>,
    pub pids: Vec<u32>,
    /// The pod whose outbound TCP goes into its ztunnel.
    redirect: Option<String>,
    stopped: bool,
}

impl Running<'_> {
    /// Connections the ztunnel in `pod` has opened, in and out (its
    /// `istio_tcp_connections_opened_total`, summed over labels); 0 when unknown.
    pub fn connections(lab: &Lab, pod: &str) -> u64 {
        let Ok(out) = lab.exec(pod, &["curl", "-sf", "--max-time", "2", "http://127.0.0.1:15020/metrics"]) else {
            return 0;
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Removes the redirect and stops the ztunnels (once; later calls do nothing).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let lab = self.lab;
        if let Some(client) = &self.redirect {
            let out = lab.exec(client, &["nft", "delete", "table", "inet", NFT_TABLE])?;
            if !out.status.success() {
                bail!("remove the nftables redirect in {client}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        for name in &self.names {
            lab.stop_process(name, "KILL")?;
        }
        // The lab sees the process gone once its main thread is a zombie; the other
        // threads may still hold the listeners our agent is about to bind.
        for pod in &self.pods {
            wait_for(Duration::from_secs(10), || {
                lab.exec(pod, &["ss", "-Hltn", "( sport = :15001 or sport = :15006 or sport = :15008 )"])
                    .is_ok_and(|o| o.status.success() && o.stdout.is_empty())
            })
            .with_context(|| format!("ztunnel's listeners in {pod} still open 10 s after it was killed"))?;
        }
        Ok(())
    }

    /// The whole log of the ztunnel in `pod` (since this start).
    pub fn log(&self, pod: &str) -> String {
        self.lab.log_of(&format!("ztunnel-{pod}"))
    }

    /// Where the ztunnels log, and the end of each log (for errors).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in &self.names {
            let log = self.lab.log_of(name);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            let path = self.lab.dir.join(format!("{name}.log"));
            let _ = write!(out, "\n--- {} (last lines) ---\n{}", path.display(), tail.join("\n"));
        }
        out
    }
}

impl Drop for Running<'_> {
    /// Stops the ztunnels and removes the redirect when a case failed before
    /// [`Running::stop`], so the next case starts from our agents alone.
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping ztunnel: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: usize, last: u8) -> mesh_lab::Pod {
        mesh_lab::Pod {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "shop".into(),
            node,
            netns: format!("mesh-{name}"),
            ip4: format!("10.98.{node}.{last}"),
            ip6: format!("fd00:98:{node}::{last}"),
            cgroup: PathBuf::from("/sys/fs/cgroup/x"),
            meshed: true,
        }
    }

    #[test]
    fn local_config_lists_workloads_and_policies_as_ztunnel_reads_them() {
        let (a, b) = (pod("n1-p1", 1, 11), pod("n2-p1", 2, 11));
        let deny = Policy {
            name: "deny-ours".into(),
            namespace: "shop".into(),
            action: Action::Deny,
            principals: vec!["cluster.local/ns/shop/sa/sa-n1-p1".into()],
        };
        let text = local_config(&[&a, &b], &[deny]);
        let config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let workloads = config["workloads"].as_sequence().unwrap();
        assert_eq!(workloads.len(), 2);
        assert_eq!(workloads[1]["uid"], "Kubernetes//Pod/shop/n2-p1");
        assert_eq!(workloads[1]["serviceAccount"], "sa-n2-p1");
        assert_eq!(workloads[1]["workloadIps"][1], "fd00:98:2::11");
        assert_eq!(workloads[0]["node"], "node1");
        let policy = &config["policies"][0];
        assert_eq!(policy["name"], "deny-ours");
        assert_eq!(policy["action"], "Deny");
        assert_eq!(policy["scope"], "Namespace");
        assert_eq!(policy["dryRun"], false);
        // ztunnel reads a string match as an enum variant: the tag `!Exact`.
        let serde_yaml::Value::Tagged(principal) = &policy["rules"][0][0][0]["principals"][0] else {
            panic!("principal without a tag: {text}");
        };
        assert_eq!(principal.tag, "Exact");
        assert_eq!(principal.value, "cluster.local/ns/shop/sa/sa-n1-p1");
        let empty: serde_yaml::Value = serde_yaml::from_str(&local_config(&[&a], &[])).unwrap();
        assert_eq!(empty["policies"].as_sequence().map(Vec::len), Some(0));
        assert_eq!(empty["services"].as_sequence().map(Vec::len), Some(0));
    }

    #[test]
    fn redirect_takes_both_families_and_spares_ztunnel_and_loopback() {
        let rules = redirect_rules();
        assert!(rules.starts_with(&format!("table inet {NFT_TABLE} {{")), "{rules}");
        let skip_lo = rules.find("oifname \"lo\" return").unwrap();
        let skip_mark = rules.find(&format!("meta mark & 0xfff == {MARK} return")).unwrap();
        let redirect = rules.find("redirect to :15001").unwrap();
        assert!(skip_lo < redirect && skip_mark < redirect, "{rules}");
    }
}
