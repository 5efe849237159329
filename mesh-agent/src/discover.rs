//! Kubernetes mode: the agent enrolls the meshed pods of its node by itself.
//!
//! Which pods: the controller's view of this node lists its pods with their UIDs,
//! labels and namespaces' labels, so "meshed" is decided exactly as everywhere else
//! ([`Config::pod_is_meshed`]). Where they live: every container of a pod runs in a
//! cgroup whose path carries the pod's UID (`.../kubepods-burstable-pod<uid>.slice/...`
//! with the systemd driver, where `-` becomes `_`; `.../pod<uid>/...` with cgroupfs),
//! and all of them share the pod's network namespace, so any such process gives
//! `/proc/<pid>/ns/net`. This finds pods that were running before the agent started
//! and needs no hook in the cluster's CNI chain; a namespace label change enrolls or
//! releases pods in place, without restarting them.
//!
//! Kubelet's health probes come from the node's own addresses; the ports a pod's
//! probes use are exempted from inbound capture for those sources only, so a STRICT
//! pod stays Ready while its probe ports stay closed to plaintext from anyone else.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use mesh_common::config::{Config, k8s::Pod};
use tracing::{debug, info, warn};

use crate::{
    control::ControlClient,
    enroll::{PodSpec, Registry},
    netns::Netns,
    redirect::{self, Redirect},
};

/// How often pods without a process yet are looked for again, and node addresses
/// refreshed.
const RESCAN: Duration = Duration::from_secs(2);

pub struct Discovery {
    pub registry: Arc<Registry>,
    pub redirect: Arc<Redirect>,
    pub client: Arc<ControlClient>,
    pub node: String,
    pub proc_root: PathBuf,
    pub host_netns: PathBuf,
    /// Where the container runtime pins pod network namespaces (`/var/run/netns`):
    /// a pin lives exactly as long as the pod's sandbox, a `/proc/<pid>` path only as
    /// long as that process.
    pub netns_dir: PathBuf,
}

/// A pod of this node that should be enrolled.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    name: String,
    namespace: String,
    service_account: String,
    ips: Vec<IpAddr>,
    probe_ports: Vec<u16>,
}

/// The meshed pods of `node` in the view, by UID: those with an address (the sandbox
/// exists) that have not ended.
fn wanted(config: &Config, node: &str) -> BTreeMap<String, Wanted> {
    config
        .pods
        .iter()
        .filter(|pod| pod.spec.node_name.as_deref() == Some(node) && !pod.metadata.uid.is_empty())
        .filter(|pod| !pod.has_ended())
        .filter(|pod| config.pod_is_meshed(pod))
        .filter_map(|pod| {
            let ips: Vec<IpAddr> = pod.ips().iter().filter_map(|ip| ip.parse().ok()).collect();
            (!ips.is_empty()).then(|| (pod.metadata.uid.clone(), wanted_pod(pod, ips)))
        })
        .collect()
}

fn wanted_pod(pod: &Pod, ips: Vec<IpAddr>) -> Wanted {
    Wanted {
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        service_account: pod.spec.service_account().to_owned(),
        ips,
        probe_ports: pod.probe_ports(),
    }
}

/// Whether a `/proc/<pid>/cgroup` text puts the process in the pod `uid`: the pod
/// level of kubelet's hierarchy, i.e. the first component below `kubepods` (and its
/// `QoS` level) that names a pod (cgroupfs: `kubepods/<qos>/pod<uid>`; systemd:
/// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`). Deeper
/// components are the containers' and never decide, so a pod that can write its own
/// cgroups cannot pass for another one.
///
/// Seen from inside the agent's own cgroup namespace, paths are relative to the
/// agent's container (`/../../pod<uid>/<container>` for a pod of the agent's `QoS`
/// class under cgroupfs, `/../../../pod<uid>/...` for a guaranteed one): there the
/// first component after the `..` that names a pod is the pod level (the components
/// above the agent's own cgroup are kubelet's, no pod writes them).
pub fn cgroup_has_pod(cgroup: &str, uid: &str) -> bool {
    let systemd = uid.replace('-', "_");
    cgroup.lines().any(|line| {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        // A relative path's first component is already below kubepods.
        let mut below_kubepods = path.trim_start_matches('/').starts_with("../");
        for part in path.split('/').filter(|p| !p.is_empty() && *p != "..") {
            if part.starts_with("kubepods")
                && let Some((_, slice_pod)) = part.strip_suffix(".slice").and_then(|s| s.rsplit_once("-pod"))
            {
                return slice_pod == systemd || slice_pod == uid;
            }
            if part.starts_with("kubepods") || matches!(part, "besteffort" | "burstable" | "guaranteed") {
                below_kubepods = true;
                continue;
            }
            if below_kubepods {
                return part.strip_prefix("pod").is_some_and(|rest| rest == uid);
            }
        }
        false
    })
}

/// For each UID, a process of that pod in its own network namespace (not the host's).
fn find_processes(proc_root: &Path, uids: &BTreeSet<&str>, host_netns: Option<u64>) -> HashMap<String, u32> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_root) else { return found };
    let mut pids: Vec<u32> = entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    // The oldest process of a pod is its sandbox (pause), which lives as long as it.
    pids.sort_unstable();
    for pid in pids {
        if found.len() == uids.len() {
            break;
        }
        let Ok(cgroup) = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")) else { continue };
        let Some(uid) = uids.iter().find(|uid| !found.contains_key(**uid) && cgroup_has_pod(&cgroup, uid)) else {
            continue;
        };
        let netns = netns_inode(&proc_root.join(pid.to_string()).join("ns/net"));
        if netns.is_some() && netns != host_netns {
            found.insert((*uid).to_owned(), pid);
        }
    }
    found
}

fn netns_inode(path: &Path) -> Option<u64> {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).ok()?).into()
}

/// The runtime's pin of the network namespace `inode` in `dir`, if there is one.
fn pinned_netns(dir: &Path, inode: u64) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().map(|entry| entry.path()).find(|path| netns_inode(path) == Some(inode))
}

impl Discovery {
    pub async fn run(self) {
        let mut updates = self.client.subscribe();
        let mut tick = tokio::time::interval(RESCAN);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        let mut reported: HashMap<String, String> = HashMap::new();
        let mut owned: BTreeSet<String> = BTreeSet::new();
        loop {
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            // The restore check runs with the first view, whenever that comes.
            if self.reconcile(first, &mut reported, &mut owned).await {
                first = false;
            }
        }
    }

    /// Makes the enrolled pods those the view wants. `verify`: also check that every
    /// pod restored from the state file still has a process of its own behind its
    /// namespace path (a PID may have been reused while the agent was down).
    /// `owned`: the pods this reconciler enrolled (pods enrolled through the
    /// enrollment socket for UIDs the view does not know are left alone). Returns
    /// false when there was no view to reconcile with.
    async fn reconcile(
        &self,
        verify: bool,
        reported: &mut HashMap<String, String>,
        owned: &mut BTreeSet<String>,
    ) -> bool {
        let state = self.client.current();
        if state.version == 0 {
            // No view yet (controller not reached): change nothing.
            return false;
        }
        let wanted = wanted(&state.config, &self.node);
        debug!(version = state.version, pods = state.config.pods.len(), wanted = wanted.len(), "reconciling");
        reported.retain(|uid, _| wanted.contains_key(uid));
        let node_pods: BTreeSet<&str> = state
            .config
            .pods
            .iter()
            .filter(|p| p.spec.node_name.as_deref() == Some(self.node.as_str()))
            .map(|p| p.metadata.uid.as_str())
            .collect();
        let enrolled = self.registry.list().await;
        for pod in &enrolled {
            let uid = pod.spec.uid.as_str();
            if !owned.contains(uid) && !node_pods.contains(uid) {
                continue;
            }
            let restored_elsewhere = verify && !self.still_in_pod(&pod.spec);
            // The pod's addresses changed (a recreated sandbox keeps the UID): enroll
            // it again with the new ones.
            let moved = wanted.get(uid).is_some_and(|w| {
                let mut now = w.ips.clone();
                let mut then = pod.spec.ips.clone();
                now.sort_unstable();
                then.sort_unstable();
                now != then || w.service_account != pod.spec.service_account
            });
            let gone = !wanted.contains_key(uid);
            if gone || restored_elsewhere || moved {
                owned.remove(uid);
                if let Err(error) = self.redirect.clear_probe_ports(&pod.spec.ips) {
                    warn!(pod = %pod.spec.name, %error, "cannot remove the probe exemptions");
                }
                match self.registry.remove(&pod.spec.uid).await {
                    Ok(_) if gone => {
                        info!(pod = %pod.spec.name, namespace = %pod.spec.namespace, uid = %pod.spec.uid, "pod released: no longer meshed or no longer on this node");
                    }
                    Ok(_) => {
                        info!(pod = %pod.spec.name, uid = %pod.spec.uid, "pod's addresses, account or process changed; enrolling it again");
                    }
                    Err(error) => warn!(pod = %pod.spec.name, %error, "cannot release pod"),
                }
            }
        }
        let enrolled: BTreeSet<String> = self.registry.list().await.into_iter().map(|p| p.spec.uid).collect();
        let missing: BTreeSet<&str> =
            wanted.keys().filter(|uid| !enrolled.contains(*uid)).map(String::as_str).collect();
        if !missing.is_empty() {
            let (proc_root, host) = (self.proc_root.clone(), netns_inode(&self.host_netns));
            let uids: BTreeSet<String> = missing.iter().map(|s| (*s).to_owned()).collect();
            let found = tokio::task::spawn_blocking(move || {
                let uids: BTreeSet<&str> = uids.iter().map(String::as_str).collect();
                find_processes(&proc_root, &uids, host)
            })
            .await
            .unwrap_or_default();
            for uid in missing {
                let pod = &wanted[uid];
                let Some(pid) = found.get(uid) else {
                    debug!(pod = %pod.name, uid, "no process of the pod yet");
                    continue;
                };
                let proc_path = self.proc_root.join(pid.to_string()).join("ns/net");
                let netns =
                    netns_inode(&proc_path).and_then(|inode| pinned_netns(&self.netns_dir, inode)).unwrap_or(proc_path);
                // The namespace must hold the pod's addresses: what the view says and
                // what the process tree found agree.
                let holds = Netns::open(&netns).and_then(|ns| ns.run(redirect::local_addresses));
                if !holds.as_ref().is_ok_and(|addrs| pod.ips.iter().any(|ip| addrs.contains(ip))) {
                    let text =
                        format!("its network namespace {} does not hold {:?} ({holds:?})", netns.display(), pod.ips);
                    if reported.get(uid) != Some(&text) {
                        warn!(pod = %pod.name, uid, "not enrolled: {text}");
                        reported.insert(uid.to_owned(), text);
                    }
                    continue;
                }
                let spec = PodSpec {
                    uid: uid.to_owned(),
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    service_account: pod.service_account.clone(),
                    ips: pod.ips.clone(),
                    netns,
                };
                match self.registry.add(spec).await {
                    Ok(_) => {
                        owned.insert(uid.to_owned());
                        reported.remove(uid);
                        info!(pod = %pod.name, namespace = %pod.namespace, uid, pid, "pod enrolled from the node's process tree");
                    }
                    Err(error) => {
                        let text = error.to_string();
                        if reported.get(uid) != Some(&text) {
                            warn!(pod = %pod.name, uid, %error, "cannot enroll pod; retrying");
                            reported.insert(uid.to_owned(), text);
                        }
                    }
                }
            }
        }
        self.exempt_probes(&wanted);
        true
    }

    fn still_in_pod(&self, spec: &PodSpec) -> bool {
        let Some(pid_dir) = spec.netns.parent().and_then(Path::parent) else { return true };
        if !pid_dir.starts_with(&self.proc_root) {
            return true;
        }
        std::fs::read_to_string(pid_dir.join("cgroup")).is_ok_and(|cgroup| cgroup_has_pod(&cgroup, &spec.uid))
    }

    /// Kubelet probes: the node's addresses are the only sources that may reach a
    /// pod's probe ports without the mesh.
    fn exempt_probes(&self, wanted: &BTreeMap<String, Wanted>) {
        match Netns::open(&self.host_netns).and_then(|ns| ns.run(redirect::local_addresses)) {
            Ok(addrs) => {
                if let Err(error) = self.redirect.set_probe_sources(&addrs) {
                    warn!(%error, "cannot set the probe source addresses");
                }
            }
            Err(error) => warn!(netns = %self.host_netns.display(), %error, "cannot read the node's addresses"),
        }
        for pod in wanted.values() {
            if let Err(error) = self.redirect.set_probe_ports(&pod.ips, &pod.probe_ports) {
                warn!(pod = %pod.name, %error, "cannot exempt the pod's probe ports");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_recognised_in_both_cgroup_layouts() {
        let uid = "5f0b9c3e-1a2b-4c5d-8e9f-0123456789ab";
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f0b9c3e_1a2b_4c5d_8e9f_0123456789ab.slice/cri-containerd-0f3e.scope\n";
        let cgroupfs = "0::/kubepods/besteffort/pod5f0b9c3e-1a2b-4c5d-8e9f-0123456789ab/0f3e\n";
        // Seen from inside the agent's own cgroup namespace.
        let relative =
            "0::/../../kubepods-besteffort-pod5f0b9c3e_1a2b_4c5d_8e9f_0123456789ab.slice/cri-containerd-1.scope\n";
        let v1 = "12:pids:/kubepods/pod5f0b9c3e-1a2b-4c5d-8e9f-0123456789ab/0f3e\n1:name=systemd:/x\n";
        // cgroupfs, from an agent at kubepods/burstable/pod<agent>/<container>: a
        // burstable pod, a guaranteed one, a best-effort one.
        let burstable = "0::/../../pod5f0b9c3e-1a2b-4c5d-8e9f-0123456789ab/0f3e\n";
        let guaranteed = "0::/../../../pod5f0b9c3e-1a2b-4c5d-8e9f-0123456789ab/0f3e\n";
        let besteffort = "0::/../../../besteffort/pod5f0b9c3e-1a2b-4c5d-8e9f-0123456789ab/0f3e\n";
        for text in [systemd, cgroupfs, relative, v1, burstable, guaranteed, besteffort] {
            assert!(cgroup_has_pod(text, uid), "{text}");
        }
        assert!(!cgroup_has_pod(systemd, "5f0b9c3e-1a2b-4c5d-8e9f-0123456789ac"));
        assert!(!cgroup_has_pod("0::/kubepods/besteffort/pod5f0b9c3e-1a2b-4c5d-8e9f-0123456789abc/x\n", uid));
        assert!(!cgroup_has_pod("0::/system.slice/containerd.service\n", uid));
        // A pod that made a cgroup named after another pod below its own is still itself.
        let nested = "0::/kubepods/besteffort/pod11111111-2222-3333-4444-555555555555/c1/pod5f0b9c3e-1a2b-4c5d-8e9f-0123456789ab\n";
        assert!(!cgroup_has_pod(nested, uid));
        let nested_systemd = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod11111111_2222_3333_4444_555555555555.slice/cri-containerd-1.scope/kubepods-besteffort-pod5f0b9c3e_1a2b_4c5d_8e9f_0123456789ab.slice\n";
        assert!(!cgroup_has_pod(nested_systemd, uid));
        // Relative, but the pod level names another pod: a cgroup below it decides nothing.
        assert!(!cgroup_has_pod(
            "0::/../../pod11111111-2222-3333-4444-555555555555/c1/pod5f0b9c3e-1a2b-4c5d-8e9f-0123456789ab\n",
            uid
        ));
        // The agent's own container, seen from inside: no pod level at all.
        assert!(!cgroup_has_pod("0::/\n", uid));
        // Not below kubepods at all.
        assert!(!cgroup_has_pod("0::/user.slice/pod5f0b9c3e-1a2b-4c5d-8e9f-0123456789ab\n", uid));
    }

    #[test]
    fn only_meshed_pods_of_this_node_with_addresses_are_wanted() {
        let yaml = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop, uid: u-a}
spec:
  nodeName: n1
  containers:
  - name: c
    ports: [{name: health, containerPort: 8081}]
    readinessProbe: {httpGet: {path: /ready, port: health}, periodSeconds: 5}
    livenessProbe: {tcpSocket: {port: 8080}}
    startupProbe: {grpc: {port: 9090}}
status: {podIP: 10.0.0.1, phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: shop, uid: u-b}
spec: {nodeName: n2}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: legacy, uid: u-c}
spec: {nodeName: n1}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: shop, uid: u-d, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: e, namespace: shop, uid: u-e}
spec: {nodeName: n1}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: f, namespace: shop, uid: u-f}
spec: {nodeName: n1}
status: {podIP: 10.0.0.6, phase: Succeeded}
";
        let config = mesh_common::config::load(&[mesh_common::config::Source::new("t.yaml", yaml)]).expect("valid");
        let wanted = wanted(&config, "n1");
        assert_eq!(wanted.keys().collect::<Vec<_>>(), ["u-a"]);
        assert_eq!(wanted["u-a"].probe_ports, [8080, 8081, 9090]);
        assert_eq!(wanted["u-a"].service_account, "default");
    }
}
