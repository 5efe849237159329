//! The third leg of `cargo xtask bench --ztunnel PATH`: Istio's ztunnel, a binary the
//! user provides, on the same two lab pods as the other legs.
//!
//! - One ztunnel per pod, inside the pod's network namespace and cgroup, in its
//!   dedicated mode (`PROXY_MODE=dedicated`, the pod named by `PROXY_WORKLOAD_INFO`),
//!   with no istiod: `XDS_ADDRESS` empty and a local config (`LOCAL_XDS_PATH`) listing
//!   the two pods as HBONE workloads with the identities our controller gives them
//!   (`spiffe://cluster.local/ns/shop/sa/sa-<pod>`).
//! - Certificates from ztunnel's built-in fake CA (`FAKE_CA=true`, present only in a
//!   binary built with `--features testing`). Its root certificate and key are in the
//!   binary; the bench finds the pair and hands it to our controller as the lab's CA
//!   root, so both meshes share one root and their identities line up.
//! - The client pod's outbound TCP (not on `lo`, not marked by ztunnel's
//!   `PACKET_MARK=1337`) is redirected to ztunnel's 15001 by an nftables NAT rule in
//!   that pod, as ztunnel's dedicated mode expects; the server pod's ztunnel receives
//!   HBONE on 15008 and connects to the application from its own address
//!   (`ENABLE_ORIG_SRC=false`).
//! - `MESH_BENCH_ZTUNNEL_ENV="KEY=VALUE ..."` passes more settings to both ztunnels,
//!   e.g. `COMPLIANCE_POLICY=pqc` (X25519MLKEM768 only) or `ZTUNNEL_WORKER_THREADS=1`.
//!
//! The ztunnels run only during their leg (our agents' listeners take the same pod
//! ports during theirs); the lab stops them with everything else on any failure.
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
/// The nftables table the redirect lives in (inside the client pod's namespace).
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

    /// ztunnel's local config: the two pods as HBONE workloads.
    fn local_config(lab: &Lab, pods: &[&str]) -> String {
        let mut yaml = String::from("workloads:\n");
        for name in pods {
            let pod = lab.pod(name);
            let _ = write!(
                yaml,
                "- uid: Kubernetes//Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: sa-{name}\n  \
                 trustDomain: cluster.local\n  workloadIps: [\"{ip4}\", \"{ip6}\"]\n  protocol: HBONE\n  \
                 node: node{node}\n  services: {{}}\n",
                ns = pod.namespace,
                ip4 = pod.ip4,
                ip6 = pod.ip6,
                node = pod.node,
            );
        }
        yaml.push_str("policies: []\nservices: []\n");
        yaml
    }

    /// Starts a ztunnel in each of `pods` (the local config lists `workloads`), waits
    /// until they are ready, then redirects the outbound TCP of `redirect` (a pod with a
    /// ztunnel) into its ztunnel.
    pub fn start(
        &self,
        lab: &Lab,
        workloads: &[&str],
        pods: &[&str],
        redirect: Option<&str>,
    ) -> anyhow::Result<Running> {
        let config = lab.dir.join("ztunnel-local.yaml");
        fs::write(&config, Self::local_config(lab, workloads))?;
        let mut running = Running {
            pods: pods.iter().map(|p| (*p).to_owned()).collect(),
            names: Vec::new(),
            pids: Vec::new(),
            redirect: None,
        };
        for &name in pods {
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
            argv.push(self.binary.display().to_string());
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let process = format!("ztunnel-{name}");
            running.pids.push(lab.spawn_in(name, &process, &argv)?);
            running.names.push(process);
        }
        for ((name, process), pid) in pods.iter().zip(&running.names).zip(&running.pids) {
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
                let what = if exited { "exited" } else { "was not ready within 20 s" };
                bail!("{process} (in pod {name}) {what}; its log ends:{}", running.logs(lab));
            }
        }
        let rules = format!(
            "table ip {NFT_TABLE} {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n    \
             oifname \"lo\" return\n    meta mark & 0xfff == {MARK} return\n    \
             meta l4proto tcp redirect to :15001\n  }}\n}}\n"
        );
        if let Some(client) = redirect {
            let file = lab.dir.join("ztunnel-redirect.nft");
            fs::write(&file, rules)?;
            let out = lab.exec(client, &["nft", "-f", &file.display().to_string()])?;
            if !out.status.success() {
                bail!("nftables redirect in {client}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            running.redirect = Some(client.to_owned());
        }
        Ok(running)
    }
}

impl Drop for Ztunnel {
    /// Removes the copy of the root (also when the benchmark fails).
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.ca_dir);
    }
}

/// The running ztunnels of one leg.
pub struct Running {
    pods: Vec<String>,
    names: Vec<String>,
    pub pids: Vec<u32>,
    /// The pod whose outbound TCP goes into its ztunnel.
    redirect: Option<String>,
}

impl Running {
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

    /// Removes the redirect and stops the ztunnels.
    pub fn stop(&self, lab: &Lab) -> anyhow::Result<()> {
        if let Some(client) = &self.redirect {
            let out = lab.exec(client, &["nft", "delete", "table", "ip", NFT_TABLE])?;
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

    /// Where the ztunnels log, and the end of each log (for errors).
    pub fn logs(&self, lab: &Lab) -> String {
        let mut out = String::new();
        for name in &self.names {
            let log = lab.log_of(name);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            let path = lab.dir.join(format!("{name}.log"));
            let _ = write!(out, "\n--- {} (last lines) ---\n{}", path.display(), tail.join("\n"));
        }
        out
    }
}
