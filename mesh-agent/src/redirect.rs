//! Loads the capture programs, attaches them (outbound: to the cgroup root; inbound:
//! to each enrolled pod's network namespace), pins them and owns their maps.
//!
//! Restart behaviour (fail-closed): programs, links and maps are pinned under the
//! agent's bpffs directory, so capture stays in force while the agent is down. An
//! enrolled pod's new connections are then refused at its in-pod listener address
//! (nothing listens there) instead of leaving the pod in clear text. A restarted agent
//! reuses the pinned maps, attaches its programs before detaching the old ones (no
//! gap), and re-opens the listeners of the pods recorded in its state file.
//!
//! Inbound plaintext capture fails closed the same way: a pod's `sk_lookup` link is
//! pinned under `<pin_dir>/inbound/<netns cookie>` and its pod IPs stay in the pinned
//! `INBOUND_ADDRS`, while the kernel drops the pod's entry from `INBOUND_SOCKETS` when
//! the agent's 15006 listener closes; the program then refuses new plaintext
//! connections to the pod (`SK_DROP`: the SYN is answered with a reset) until a
//! restarted agent inserts its new listener.
//! `mesh-agent uninstall` removes the pin directory (including `inbound/`), which
//! detaches capture.
//!
//! Kubelet probes are plaintext from the node, so under a STRICT policy the agent
//! would refuse them and the pod would go unready. A pod IP's probe ports
//! (`INBOUND_PROBE_PORTS`, [`Redirect::set_probe_ports`]) are therefore passed to the
//! application uncaptured, but only for connections from one of the node's own
//! addresses (`PROBE_SOURCES`, [`Redirect::set_probe_sources`], [`local_addresses`]):
//! the kubelet runs in the host network namespace, other pods do not.
use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, SockHash, lpm_trie::Key},
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{AF_INET, AF_INET6, EnrolledPod, InboundKey, OrigDst, OrigDstKey, ProbeKey, stat};

static EMBEDDED_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("this agent was built without its eBPF object; build with `cargo xtask build` or pass --bpf-object")]
    NoObject,
    #[error("cannot read eBPF object {path}")]
    ReadObject {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare bpffs directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount bpffs at /sys/fs/bpf")]
    MountBpffs(#[source] nix::Error),
    #[error("cannot open cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {program} is missing from the object")]
    MissingProgram { program: &'static str },
    #[error("eBPF map {map} is missing from the object")]
    MissingMap { map: &'static str },
    #[error("eBPF program {program} was rejected by the kernel:\n{verifier_log}")]
    Verifier { program: &'static str, verifier_log: String },
    #[error("eBPF program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot pin {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("cannot replace the pinned link {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("eBPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("link of program {program}")]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("cannot read the address of the inbound listener for {ip}")]
    InboundListener {
        ip: IpAddr,
        #[source]
        source: io::Error,
    },
    /// The kernel cannot hand a connection of `ip`'s family to this listener: IPv6
    /// needs an IPv6 listener, IPv4 an IPv4 or dual-stack (`IPV6_V6ONLY` off) one.
    #[error("inbound listener {listener} cannot accept connections to {ip}")]
    InboundListenerFamily { ip: IpAddr, listener: SocketAddr },
}

/// What to load and where to attach it.
#[derive(Clone, Debug)]
pub struct RedirectConfig {
    pub object: Option<PathBuf>,
    pub cgroup_root: PathBuf,
    pub pin_dir: PathBuf,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<(IpAddr, u8)>,
}

/// The loaded capture programs and the maps the agent works with.
pub struct Redirect {
    enrolled: Mutex<HashMap<MapData, u64, EnrolledPod>>,
    orig_dst: Mutex<HashMap<MapData, OrigDstKey, OrigDst>>,
    inbound: Mutex<Inbound>,
    stats: PerCpuArray<MapData, u64>,
    pin_dir: PathBuf,
    /// Owns the programs; the `sk_lookup` one is attached per pod, hence the lock.
    ebpf: Mutex<Ebpf>,
}

/// The inbound-capture maps, locked together: an attach writes both, a detach also
/// clears the pod's probe ports.
struct Inbound {
    addrs: HashMap<MapData, InboundKey, u32>,
    sockets: SockHash<MapData, InboundKey>,
    excluded_ports: HashMap<MapData, u16, u8>,
    probe_ports: HashMap<MapData, ProbeKey, u8>,
    probe_sources: HashMap<MapData, InboundKey, u8>,
    strict: HashMap<MapData, ProbeKey, u8>,
}

impl Inbound {
    fn set_strict(&mut self, ips: &[IpAddr], default: bool, overrides: &[(u16, bool)]) -> Result<(), RedirectError> {
        let map_error = |source| RedirectError::Map { map: "INBOUND_STRICT", source };
        let mut wanted: Vec<(ProbeKey, u8)> = Vec::new();
        for ip in ips {
            // Nothing to write for a pod that refuses nothing anywhere.
            if default || overrides.iter().any(|(_, strict)| *strict) {
                wanted.push((probe_key(*ip, 0), u8::from(default)));
                wanted.extend(overrides.iter().map(|(port, strict)| (probe_key(*ip, *port), u8::from(*strict))));
            }
        }
        for (key, value) in &wanted {
            self.strict.insert(key, value, 0).map_err(map_error)?;
        }
        let stale: Vec<ProbeKey> = self
            .strict
            .keys()
            .filter_map(Result::ok)
            .filter(|key| probe_ip(key).is_some_and(|ip| ips.contains(&ip)) && !wanted.iter().any(|(k, _)| k == key))
            .collect();
        for key in stale {
            match self.strict.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(map_error(source)),
            }
        }
        Ok(())
    }

    /// Removes the probe ports of `ips` for which `keep` is false.
    fn remove_probe_ports(&mut self, ips: &[IpAddr], keep: impl Fn(u16) -> bool) -> Result<(), RedirectError> {
        let stale: Vec<ProbeKey> = self
            .probe_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|key| probe_ip(key).is_some_and(|ip| ips.contains(&ip)) && !keep(key.port))
            .collect();
        for key in stale {
            match self.probe_ports.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(RedirectError::Map { map: "INBOUND_PROBE_PORTS", source }),
            }
        }
        Ok(())
    }
}

const SK_LOOKUP: &str = "mesh_sk_lookup";

/// Cgroup programs are attached as bpf links (Linux >= 5.7), which always coexist
/// with other links and programs; the kernel refuses any attach flag on a link, so
/// the mode must be the one that maps to no flags.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

impl Redirect {
    pub fn load(cfg: &RedirectConfig) -> Result<Self, RedirectError> {
        let object = match &cfg.object {
            Some(path) => {
                std::fs::read(path).map_err(|source| RedirectError::ReadObject { path: path.clone(), source })?
            }
            None if EMBEDDED_OBJECT.is_empty() => return Err(RedirectError::NoObject),
            None => EMBEDDED_OBJECT.to_vec(),
        };
        ensure_bpffs(&cfg.pin_dir)?;
        std::fs::create_dir_all(&cfg.pin_dir)
            .map_err(|source| RedirectError::PinDir { path: cfg.pin_dir.clone(), source })?;
        let mut ebpf =
            EbpfLoader::new().default_map_pin_directory(&cfg.pin_dir).load(&object).map_err(RedirectError::Load)?;
        let cgroup = File::open(&cfg.cgroup_root)
            .map_err(|source| RedirectError::Cgroup { path: cfg.cgroup_root.clone(), source })?;

        // The same load -> attach -> pin sequence for each program; only the program
        // type differs, which aya models as distinct types (hence a macro).
        macro_rules! attach_and_pin {
            ($program:expr, $kind:ty, $link_name:expr) => {{
                let program: &'static str = $program;
                let prog: &mut $kind = ebpf
                    .program_mut(program)
                    .ok_or(RedirectError::MissingProgram { program })?
                    .try_into()
                    .map_err(|source| RedirectError::Program { program, source })?;
                prog.load().map_err(|e| load_error(program, e))?;
                let id =
                    prog.attach(&cgroup, LINK_MODE).map_err(|source| RedirectError::Program { program, source })?;
                let link: FdLink = prog
                    .take_link(id)
                    .map_err(|source| RedirectError::Program { program, source })?
                    .try_into()
                    .map_err(|source| RedirectError::Link { program, source })?;
                replace_pinned_link(link, &cfg.pin_dir.join($link_name))?;
            }};
        }
        attach_and_pin!("mesh_connect4", CgroupSockAddr, "link_connect4");
        attach_and_pin!("mesh_connect6", CgroupSockAddr, "link_connect6");
        attach_and_pin!("mesh_sock_ops", SockOps, "link_sock_ops");
        // Loaded now (a verifier rejection stops startup), attached per pod.
        let sk_lookup: &mut SkLookup = ebpf
            .program_mut(SK_LOOKUP)
            .ok_or(RedirectError::MissingProgram { program: SK_LOOKUP })?
            .try_into()
            .map_err(|source| RedirectError::Program { program: SK_LOOKUP, source })?;
        sk_lookup.load().map_err(|e| load_error(SK_LOOKUP, e))?;

        configure_exclusions(&mut ebpf, cfg)?;
        let enrolled = HashMap::try_from(take_map(&mut ebpf, "ENROLLED")?)
            .map_err(|source| RedirectError::Map { map: "ENROLLED", source })?;
        let orig_dst = HashMap::try_from(take_map(&mut ebpf, "ORIG_DST")?)
            .map_err(|source| RedirectError::Map { map: "ORIG_DST", source })?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, "STATS")?)
            .map_err(|source| RedirectError::Map { map: "STATS", source })?;
        // The inbound maps are pinned and keep what an earlier agent wrote (pod IPs,
        // exempt ports): capture stays in force until this agent re-attaches or
        // detaches each pod.
        let inbound = Inbound {
            addrs: HashMap::try_from(take_map(&mut ebpf, "INBOUND_ADDRS")?)
                .map_err(|source| RedirectError::Map { map: "INBOUND_ADDRS", source })?,
            sockets: SockHash::try_from(take_map(&mut ebpf, "INBOUND_SOCKETS")?)
                .map_err(|source| RedirectError::Map { map: "INBOUND_SOCKETS", source })?,
            excluded_ports: HashMap::try_from(take_map(&mut ebpf, "INBOUND_EXCLUDED_PORTS")?)
                .map_err(|source| RedirectError::Map { map: "INBOUND_EXCLUDED_PORTS", source })?,
            probe_ports: HashMap::try_from(take_map(&mut ebpf, "INBOUND_PROBE_PORTS")?)
                .map_err(|source| RedirectError::Map { map: "INBOUND_PROBE_PORTS", source })?,
            probe_sources: HashMap::try_from(take_map(&mut ebpf, "PROBE_SOURCES")?)
                .map_err(|source| RedirectError::Map { map: "PROBE_SOURCES", source })?,
            strict: HashMap::try_from(take_map(&mut ebpf, "INBOUND_STRICT")?)
                .map_err(|source| RedirectError::Map { map: "INBOUND_STRICT", source })?,
        };
        Ok(Self {
            enrolled: Mutex::new(enrolled),
            orig_dst: Mutex::new(orig_dst),
            inbound: Mutex::new(inbound),
            stats,
            pin_dir: cfg.pin_dir.clone(),
            ebpf: Mutex::new(ebpf),
        })
    }

    // The mutexes below guard one bpf(2) syscall each and are never held across an
    // await point, so a std mutex is the right tool even on async paths.

    pub fn enroll(&self, netns_cookie: u64, pod: EnrolledPod) -> Result<(), RedirectError> {
        let mut map = self.enrolled.lock().expect("enrolled map lock");
        map.insert(netns_cookie, pod, 0).map_err(|source| RedirectError::Map { map: "ENROLLED", source })
    }

    pub fn unenroll(&self, netns_cookie: u64) -> Result<(), RedirectError> {
        let mut map = self.enrolled.lock().expect("enrolled map lock");
        match map.remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(RedirectError::Map { map: "ENROLLED", source }),
        }
    }

    /// Cookies currently in the enrollment map (to reconcile after a restart).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        let map = self.enrolled.lock().expect("enrolled map lock");
        map.keys().filter_map(Result::ok).collect()
    }

    /// Takes (reads and deletes) the original destination of an accepted connection.
    pub fn take_orig_dst(&self, key: &OrigDstKey) -> Option<OrigDst> {
        let mut map = self.orig_dst.lock().expect("orig_dst map lock");
        let value = map.get(key, 0).ok()?;
        let _ = map.remove(key);
        Some(value)
    }

    /// Starts inbound plaintext capture for a pod: TCP connections to `ips` (except
    /// the agent's ports, exempt ports and the pod's connections to itself) are
    /// steered to `listener`, the agent's 15006 listener inside the pod's namespace.
    ///
    /// Idempotent, and the way a restarted agent takes a pod over: the map entries
    /// are overwritten and a link pinned for `cookie` by an earlier agent is replaced
    /// after the new one is attached. The listener must take every family in `ips`:
    /// a pod with IPv4 and IPv6 addresses needs an IPv6 listener with `IPV6_V6ONLY`
    /// off (`Netns::listen` sets it on). On error, capture for the pod may be partly set
    /// up: retry, or call [`Self::detach_inbound`].
    pub fn attach_inbound(
        &self,
        netns: &crate::netns::Netns,
        cookie: u64,
        pod_id: u32,
        ips: &[IpAddr],
        listener: &impl AsFd,
    ) -> Result<(), RedirectError> {
        let socket = socket2::SockRef::from(listener);
        for ip in ips {
            check_listener_family(&socket, *ip)?;
        }
        {
            let mut inbound = self.inbound.lock().expect("inbound maps lock");
            // The socket first: an address in INBOUND_ADDRS without one is dropped.
            for ip in ips {
                inbound
                    .sockets
                    .insert(inbound_key(*ip), listener.as_fd().as_raw_fd(), 0)
                    .map_err(|source| RedirectError::Map { map: "INBOUND_SOCKETS", source })?;
            }
            for ip in ips {
                inbound
                    .addrs
                    .insert(inbound_key(*ip), pod_id, 0)
                    .map_err(|source| RedirectError::Map { map: "INBOUND_ADDRS", source })?;
            }
        }
        let dir = self.inbound_pin_dir();
        std::fs::create_dir_all(&dir).map_err(|source| RedirectError::PinDir { path: dir.clone(), source })?;
        let link: FdLink = {
            let mut ebpf = self.ebpf.lock().expect("ebpf lock");
            let program: &mut SkLookup = ebpf
                .program_mut(SK_LOOKUP)
                .ok_or(RedirectError::MissingProgram { program: SK_LOOKUP })?
                .try_into()
                .map_err(|source| RedirectError::Program { program: SK_LOOKUP, source })?;
            let id = program.attach(netns).map_err(|source| RedirectError::Program { program: SK_LOOKUP, source })?;
            program.take_link(id).map_err(|source| RedirectError::Program { program: SK_LOOKUP, source })?.into()
        };
        replace_pinned_link(link, &dir.join(cookie.to_string()))
    }

    /// Ends inbound capture for a pod: its addresses pass to the ordinary socket
    /// lookup again, its probe ports are forgotten (a later pod may get the same IP)
    /// and its `sk_lookup` link goes. Missing entries are not an error.
    pub fn detach_inbound(&self, cookie: u64, ips: &[IpAddr]) -> Result<(), RedirectError> {
        {
            let mut inbound = self.inbound.lock().expect("inbound maps lock");
            for ip in ips {
                match inbound.addrs.remove(&inbound_key(*ip)) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(source) => return Err(RedirectError::Map { map: "INBOUND_ADDRS", source }),
                }
                match inbound.sockets.remove(&inbound_key(*ip)) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(source) => return Err(RedirectError::Map { map: "INBOUND_SOCKETS", source }),
                }
            }
            inbound.remove_probe_ports(ips, |_| false)?;
            inbound.set_strict(ips, false, &[])?;
        }
        let path = self.inbound_pin_dir().join(cookie.to_string());
        match PinnedLink::from_pin(&path) {
            // Dropping the last reference to the link detaches the program.
            Ok(link) => drop(link.unpin().map_err(|source| RedirectError::Unpin { path: path.clone(), source })?),
            Err(_) => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(RedirectError::Unpin { path, source }),
            },
        }
        Ok(())
    }

    /// Replaces the set of local ports never steered to 15006 (e.g. kubelet probe
    /// ports). The map is pinned: until this is called, a restarted agent keeps the
    /// previous agent's set.
    pub fn set_inbound_excluded_ports(&self, ports: &[u16]) -> Result<(), RedirectError> {
        let mut inbound = self.inbound.lock().expect("inbound maps lock");
        let map = &mut inbound.excluded_ports;
        let stale: Vec<u16> = map.keys().filter_map(Result::ok).filter(|p| !ports.contains(p)).collect();
        for port in ports {
            map.insert(port, 1, 0).map_err(|source| RedirectError::Map { map: "INBOUND_EXCLUDED_PORTS", source })?;
        }
        for port in stale {
            let _ = map.remove(&port);
        }
        Ok(())
    }

    /// Makes the kubelet probe ports of the pod addresses `ips` exactly `ports`: a
    /// connection from one of the node's addresses ([`Self::set_probe_sources`]) to
    /// one of them reaches the application uncaptured, since the kubelet probes in
    /// plaintext and a STRICT pod's agent would refuse it. Any other source is still
    /// captured. Idempotent: the pod's ports not in `ports` are removed (those in it
    /// never are, so an update does not capture a kept port even briefly), and an
    /// empty `ports` clears the pod's entries.
    pub fn set_probe_ports(&self, ips: &[IpAddr], ports: &[u16]) -> Result<(), RedirectError> {
        let mut inbound = self.inbound.lock().expect("inbound maps lock");
        inbound.remove_probe_ports(ips, |port| ports.contains(&port))?;
        for ip in ips {
            for port in ports {
                inbound
                    .probe_ports
                    .insert(probe_key(*ip, *port), 1, 0)
                    .map_err(|source| RedirectError::Map { map: "INBOUND_PROBE_PORTS", source })?;
            }
        }
        Ok(())
    }

    /// Makes `PeerAuthentication` STRICT of the pod addresses `ips` what the kernel
    /// refuses at the door: `default` for every port, `overrides` for single ports
    /// (see [`mesh_common::policy::strict_ports`]). Entries that are wanted are
    /// written before stale ones are removed, so a STRICT port is never open.
    pub fn set_strict(&self, ips: &[IpAddr], default: bool, overrides: &[(u16, bool)]) -> Result<(), RedirectError> {
        self.inbound.lock().expect("inbound maps lock").set_strict(ips, default, overrides)
    }

    /// Forgets every probe port of the pod addresses `ips` (the pod was un-enrolled; a
    /// later pod may get the same address). Also done by [`Self::detach_inbound`].
    pub fn clear_probe_ports(&self, ips: &[IpAddr]) -> Result<(), RedirectError> {
        self.inbound.lock().expect("inbound maps lock").remove_probe_ports(ips, |_| false)
    }

    /// Makes the set of addresses kubelet probes may come from exactly `addrs`: the
    /// node's own addresses ([`local_addresses`] in the host network namespace), since
    /// the kubelet runs there and other pods have addresses of their own. Call again
    /// when the node's addresses change. The map is pinned: until this is called, a
    /// restarted agent keeps the previous agent's set.
    pub fn set_probe_sources(&self, addrs: &[IpAddr]) -> Result<(), RedirectError> {
        let mut inbound = self.inbound.lock().expect("inbound maps lock");
        let map = &mut inbound.probe_sources;
        let wanted: Vec<InboundKey> = addrs.iter().map(|ip| inbound_key(*ip)).collect();
        let stale: Vec<InboundKey> = map.keys().filter_map(Result::ok).filter(|k| !wanted.contains(k)).collect();
        // Stale entries first (none of them is wanted, so nothing wanted is ever
        // missing): the map is small, and new addresses must not be refused for want
        // of room.
        for key in stale {
            match map.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(RedirectError::Map { map: "PROBE_SOURCES", source }),
            }
        }
        for key in wanted {
            map.insert(key, 1, 0).map_err(|source| RedirectError::Map { map: "PROBE_SOURCES", source })?;
        }
        Ok(())
    }

    /// Probe ports by pod address, as the pinned map holds them (to reconcile after a
    /// restart: the entries of pods gone meanwhile are cleared with
    /// [`Self::clear_probe_ports`]).
    pub fn probe_ports(&self) -> Vec<(IpAddr, u16)> {
        let inbound = self.inbound.lock().expect("inbound maps lock");
        let mut ports: Vec<(IpAddr, u16)> = inbound
            .probe_ports
            .keys()
            .filter_map(Result::ok)
            .filter_map(|key| Some((probe_ip(&key)?, key.port)))
            .collect();
        ports.sort_unstable();
        ports
    }

    /// Pod IPs under inbound capture with their pod ids, as the pinned map holds them
    /// (to reconcile after a restart).
    pub fn inbound_addrs(&self) -> Vec<(IpAddr, u32)> {
        let inbound = self.inbound.lock().expect("inbound maps lock");
        inbound.addrs.iter().filter_map(Result::ok).filter_map(|(key, id)| Some((inbound_ip(&key)?, id))).collect()
    }

    /// Netns cookies with a pinned inbound link (to reconcile after a restart).
    pub fn inbound_link_cookies(&self) -> Vec<u64> {
        std::fs::read_dir(self.inbound_pin_dir())
            .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default()
    }

    fn inbound_pin_dir(&self) -> PathBuf {
        self.pin_dir.join("inbound")
    }

    /// Kernel counters summed over CPUs, with their names.
    pub fn kernel_stats(&self) -> Vec<(&'static str, u64)> {
        (0..stat::COUNT)
            .map(|i| {
                let sum = self.stats.get(&i, 0).map_or(0, |v| v.iter().sum());
                (stat::NAMES[i as usize], sum)
            })
            .collect()
    }
}

fn inbound_key(ip: IpAddr) -> InboundKey {
    let mut addr = [0; 16];
    match ip {
        IpAddr::V4(ip) => {
            addr[..4].copy_from_slice(&ip.octets());
            InboundKey { family: u32::from(AF_INET), addr }
        }
        IpAddr::V6(ip) => InboundKey { family: u32::from(AF_INET6), addr: ip.octets() },
    }
}

fn probe_key(ip: IpAddr, port: u16) -> ProbeKey {
    let InboundKey { family, addr } = inbound_key(ip);
    ProbeKey { family, port, pad: 0, addr }
}

fn probe_ip(key: &ProbeKey) -> Option<IpAddr> {
    inbound_ip(&InboundKey { family: key.family, addr: key.addr })
}

/// The addresses of the calling thread's network namespace that a connection can come
/// from, without duplicates: those of the interfaces that are up, except loopback
/// addresses and IPv6 link-local ones. Called by the agent in the host namespace to
/// learn the kubelet's possible probe sources ([`Redirect::set_probe_sources`]).
///
/// Interfaces that are down are left out because kube-proxy in IPVS mode puts every
/// Service's cluster IP on its (down) `kube-ipvs0` interface, which would overflow
/// the probe-source map and exempt addresses that are not the node's. IPv6 link-local
/// addresses are left out because a probe to a pod's routable address never comes
/// from one, and any pod on a link can claim the same link-local address.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    use nix::net::if_::InterfaceFlags;
    let mut addrs = Vec::new();
    for ifaddr in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        if !ifaddr.flags.contains(InterfaceFlags::IFF_UP) {
            continue;
        }
        let Some(address) = ifaddr.address else { continue };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
        if ip.is_loopback() || link_local || addrs.contains(&ip) {
            continue;
        }
        addrs.push(ip);
    }
    Ok(addrs)
}

fn inbound_ip(key: &InboundKey) -> Option<IpAddr> {
    if key.family == u32::from(AF_INET) {
        Some(Ipv4Addr::new(key.addr[0], key.addr[1], key.addr[2], key.addr[3]).into())
    } else if key.family == u32::from(AF_INET6) {
        Some(Ipv6Addr::from(key.addr).into())
    } else {
        None
    }
}

/// Mirrors the kernel's check in `bpf_sk_assign` for `sk_lookup`, which would
/// otherwise show up only as dropped connections.
fn check_listener_family(socket: &socket2::SockRef<'_>, ip: IpAddr) -> Result<(), RedirectError> {
    let local = socket
        .local_addr()
        .map_err(|source| RedirectError::InboundListener { ip, source })?
        .as_socket()
        .ok_or_else(|| RedirectError::InboundListener { ip, source: io::ErrorKind::InvalidInput.into() })?;
    let fits = match (ip, local) {
        (IpAddr::V4(_), SocketAddr::V4(_)) | (IpAddr::V6(_), SocketAddr::V6(_)) => true,
        (IpAddr::V4(_), SocketAddr::V6(_)) => {
            !socket.only_v6().map_err(|source| RedirectError::InboundListener { ip, source })?
        }
        (IpAddr::V6(_), SocketAddr::V4(_)) => false,
    };
    if fits { Ok(()) } else { Err(RedirectError::InboundListenerFamily { ip, listener: local }) }
}

fn load_error(program: &'static str, error: ProgramError) -> RedirectError {
    match error {
        ProgramError::LoadError { io_error, verifier_log } => {
            RedirectError::Verifier { program, verifier_log: format!("{io_error}\n{verifier_log}") }
        }
        source => RedirectError::Program { program, source },
    }
}

fn take_map(ebpf: &mut Ebpf, map: &'static str) -> Result<aya::maps::Map, RedirectError> {
    ebpf.take_map(map).ok_or(RedirectError::MissingMap { map })
}

/// Pins `link` at `path`, first releasing whatever link an earlier agent pinned
/// there. The new program is attached before the old one goes, so capture has no gap.
fn replace_pinned_link(link: FdLink, path: &Path) -> Result<(), RedirectError> {
    if path.exists() {
        match PinnedLink::from_pin(path) {
            Ok(old) => {
                let old = old.unpin().map_err(|source| RedirectError::Unpin { path: path.to_owned(), source })?;
                drop(old);
            }
            Err(_) => {
                std::fs::remove_file(path).map_err(|source| RedirectError::Unpin { path: path.to_owned(), source })?;
            }
        }
    }
    link.pin(path).map_err(|source| RedirectError::Pin { path: path.to_owned(), source })?;
    Ok(())
}

fn configure_exclusions(ebpf: &mut Ebpf, cfg: &RedirectConfig) -> Result<(), RedirectError> {
    let mut ports: HashMap<_, u16, u8> =
        HashMap::try_from(ebpf.map_mut("EXCLUDED_PORTS").ok_or(RedirectError::MissingMap { map: "EXCLUDED_PORTS" })?)
            .map_err(|source| RedirectError::Map { map: "EXCLUDED_PORTS", source })?;
    let stale: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
    for port in stale {
        let _ = ports.remove(&port);
    }
    for port in &cfg.exclude_ports {
        ports.insert(port, 1, 0).map_err(|source| RedirectError::Map { map: "EXCLUDED_PORTS", source })?;
    }

    let mut v4: LpmTrie<_, [u8; 4], u8> =
        LpmTrie::try_from(ebpf.map_mut("EXCLUDED_V4").ok_or(RedirectError::MissingMap { map: "EXCLUDED_V4" })?)
            .map_err(|source| RedirectError::Map { map: "EXCLUDED_V4", source })?;
    let stale: Vec<Key<[u8; 4]>> = v4.keys().filter_map(Result::ok).collect();
    for key in stale {
        let _ = v4.remove(&key);
    }
    for (ip, prefix) in &cfg.exclude_cidrs {
        if let IpAddr::V4(ip) = ip {
            v4.insert(&Key::new(u32::from(*prefix), ip.octets()), 1, 0)
                .map_err(|source| RedirectError::Map { map: "EXCLUDED_V4", source })?;
        }
    }

    let mut v6: LpmTrie<_, [u8; 16], u8> =
        LpmTrie::try_from(ebpf.map_mut("EXCLUDED_V6").ok_or(RedirectError::MissingMap { map: "EXCLUDED_V6" })?)
            .map_err(|source| RedirectError::Map { map: "EXCLUDED_V6", source })?;
    let stale: Vec<Key<[u8; 16]>> = v6.keys().filter_map(Result::ok).collect();
    for key in stale {
        let _ = v6.remove(&key);
    }
    for (ip, prefix) in &cfg.exclude_cidrs {
        if let IpAddr::V6(ip) = ip {
            v6.insert(&Key::new(u32::from(*prefix), ip.octets()), 1, 0)
                .map_err(|source| RedirectError::Map { map: "EXCLUDED_V6", source })?;
        }
    }
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf when `pin_dir` lies below it and nothing is mounted
/// there yet (a fresh VM, a node without systemd's mount).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), RedirectError> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) {
        return Ok(());
    }
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(mesh_common::host::parse_mountinfo_line)
        .any(|(mount_point, fstype)| mount_point == "/sys/fs/bpf" && fstype == "bpf");
    if !mounted {
        std::fs::create_dir_all(root).map_err(|source| RedirectError::PinDir { path: root.to_owned(), source })?;
        nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(RedirectError::MountBpffs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
        path::Path,
        process::Command,
        time::{Duration, Instant},
    };

    use socket2::{Domain, Protocol, Socket, Type};

    use super::*;
    use crate::netns::{Netns, NetnsError};

    /// Removes the test's namespaces, pin directory and cgroup even when an assertion
    /// fails. Declared before the `Redirect`, so it runs after the programs are gone.
    struct Scratch {
        netns: Vec<String>,
        pin_dir: PathBuf,
        cgroup: PathBuf,
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            for netns in &self.netns {
                let _ = Command::new("ip").args(["netns", "del", netns]).status();
            }
            let _ = std::fs::remove_dir_all(&self.pin_dir);
            let _ = std::fs::remove_dir(&self.cgroup);
        }
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
        })
    }

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("run ip");
        assert!(status.success(), "ip {}: {status}", args.join(" "));
    }

    /// A TCP connection from `src` (any port) to `dst`, made inside `ns`.
    fn connect(ns: &Netns, src: Ipv4Addr, dst: SocketAddr) -> io::Result<Socket> {
        ns.run(|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            socket.bind(&SocketAddr::from((src, 0)).into())?;
            socket.connect_timeout(&dst.into(), Duration::from_millis(500))?;
            Ok(socket)
        })
        .map_err(|e| match e {
            NetnsError::Socket { source, .. } => source,
            other => io::Error::other(other),
        })
    }

    /// The next connection `listener` accepts within `wait` (the final ACK of a
    /// loopback handshake may be processed just after `connect` returns).
    fn accept(listener: &TcpListener, wait: Duration) -> Option<(TcpStream, SocketAddr)> {
        let deadline = Instant::now() + wait;
        loop {
            match listener.accept() {
                Ok(accepted) => return Some(accepted),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return None,
            }
        }
    }

    /// A connection from a process of the node (in `cgroup`, where the programs are
    /// attached, and in network namespace `netns`), as kubelet makes its probes; the
    /// process holds it for a moment.
    fn probe_from_node(cgroup: &Path, netns: &str, dst: SocketAddr) -> std::process::Child {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{netns} bash -c 'exec 3<>/dev/tcp/{}/{}; sleep 0.5'",
            cgroup.display(),
            dst.ip(),
            dst.port()
        );
        std::process::Command::new("sh")
            .args(["-c", &script])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start a probe process")
    }

    const WAIT: Duration = Duration::from_millis(500);
    const NOTHING: Duration = Duration::from_millis(100);

    #[test]
    #[allow(clippy::too_many_lines, reason = "one scenario, step by step, on one set of scratch resources")]
    fn inbound_capture_steers_plaintext_to_15006_in_a_real_netns() {
        if !is_root() {
            eprintln!("SKIPPED inbound_capture_steers_plaintext_to_15006_in_a_real_netns: needs root");
            return;
        }
        if EMBEDDED_OBJECT.is_empty() {
            eprintln!(
                "SKIPPED inbound_capture_steers_plaintext_to_15006_in_a_real_netns: no embedded eBPF object \
                 (run `cargo xtask build` first)"
            );
            return;
        }
        let pid = std::process::id();
        let name = format!("mesh-skl-test-{pid}");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
        let cgroup2 = mesh_common::host::find_cgroup2_mount(&mountinfo).expect("a cgroup2 mount");
        let scratch = Scratch {
            netns: vec![name.clone()],
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{name}")),
            cgroup: cgroup2.join(&name),
        };
        std::fs::create_dir(&scratch.cgroup).expect("create an empty cgroup");
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        // A veth pair with both ends inside: the pod's interface. (Not a dummy
        // interface: the kernels this runs on need not ship the dummy driver.)
        ip(&["-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"]);
        ip(&["-n", &name, "addr", "add", "10.123.0.2/24", "dev", "eth0"]);
        ip(&["-n", &name, "addr", "add", "10.123.0.3/24", "dev", "eth0"]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "peer0", "up"]);
        let ns = Netns::open(&Path::new("/run/netns").join(&name)).expect("open the netns");
        let cookie = ns.cookie().expect("netns cookie");

        let redirect = Redirect::load(&RedirectConfig {
            object: None,
            cgroup_root: scratch.cgroup.clone(),
            pin_dir: scratch.pin_dir.clone(),
            exclude_ports: vec![],
            exclude_cidrs: vec![],
        })
        .expect("load the capture programs");
        redirect.set_inbound_excluded_ports(&[9090]).expect("exempt port 9090");

        let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let capture = ns.listen(any(15006)).expect("bind 15006");
        let app = ns.listen(any(8080)).expect("bind 8080");
        let probe = ns.listen(any(9090)).expect("bind 9090");
        let pod = Ipv4Addr::new(10, 123, 0, 2);
        let peer = Ipv4Addr::new(10, 123, 0, 3);
        let to = |port| SocketAddr::from((pod, port));
        let pod_ips = [IpAddr::V4(pod)];

        redirect.attach_inbound(&ns, cookie, 7, &pod_ips, &capture).expect("attach inbound capture");
        assert_eq!(redirect.inbound_link_cookies(), vec![cookie]);
        assert_eq!(redirect.inbound_addrs(), vec![(IpAddr::V4(pod), 7)]);

        // A plaintext connection from another address goes to 15006, which sees the
        // original destination as its local address.
        let _client = connect(&ns, peer, to(8080)).expect("connect to the app port");
        let (steered, from) = accept(&capture, WAIT).expect("15006 accepts the plaintext connection");
        assert_eq!(steered.local_addr().unwrap(), to(8080), "original destination");
        assert_eq!(from.ip(), IpAddr::V4(peer));
        assert!(accept(&app, NOTHING).is_none(), "the app must not see a captured connection");
        eprintln!("steered: {from} -> {} accepted on 15006", steered.local_addr().unwrap());

        // An exempt port (kubelet probe) reaches its listener directly.
        let _client = connect(&ns, peer, to(9090)).expect("connect to the exempt port");
        assert!(accept(&probe, WAIT).is_some(), "the exempt port's own listener accepts");
        assert!(accept(&capture, NOTHING).is_none());

        // 15008 is passed to the ordinary lookup: nothing listens there, so refused.
        let err = connect(&ns, peer, to(15008)).expect_err("nothing listens on 15008");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        assert!(accept(&capture, NOTHING).is_none(), "15008 must not be steered");

        // The pod talking to itself (how the agent delivers to the app) is not captured.
        let _client = connect(&ns, pod, to(8080)).expect("connect from the pod IP to itself");
        let (_, from) = accept(&app, WAIT).expect("the app accepts a connection from the pod itself");
        assert_eq!(from.ip(), IpAddr::V4(pod));
        assert!(accept(&capture, NOTHING).is_none());

        let stats: std::collections::HashMap<_, _> = redirect.kernel_stats().into_iter().collect();
        eprintln!("kernel stats: {stats:?}");
        assert_eq!(stats["inbound_steered"], 1);
        assert_eq!(stats["inbound_exempt"], 2);
        assert_eq!(stats["inbound_self"], 1);

        // Agent down: its listener closes, the kernel drops the socket from the map,
        // and the pod's IP stays captured: the connection fails, the app sees nothing.
        drop(steered);
        drop(capture);
        // SK_DROP fails the kernel's listener lookup, so the SYN is answered like one
        // to a closed port: a reset, not silence.
        let err = connect(&ns, peer, to(8080)).expect_err("no plaintext while the agent is down");
        eprintln!("with the 15006 listener closed, connect to :8080 failed: {err}");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        assert!(accept(&app, NOTHING).is_none(), "fail closed: the app must not see plaintext");
        assert_eq!(redirect.kernel_stats().into_iter().find(|(n, _)| *n == "inbound_no_listener").unwrap().1, 1);

        // A restarted agent binds a new listener and re-attaches: the pinned link is
        // replaced, capture resumes.
        let capture = ns.listen(any(15006)).expect("bind 15006 again");
        redirect.attach_inbound(&ns, cookie, 7, &pod_ips, &capture).expect("re-attach inbound capture");
        assert_eq!(redirect.inbound_link_cookies(), vec![cookie]);
        let _client = connect(&ns, peer, to(8080)).expect("connect after re-attach");
        assert!(accept(&capture, WAIT).is_some(), "15006 accepts again after re-attach");
        assert!(accept(&app, NOTHING).is_none());

        // Detached: the app gets plaintext directly again.
        redirect.detach_inbound(cookie, &pod_ips).expect("detach inbound capture");
        assert!(redirect.inbound_link_cookies().is_empty());
        assert!(redirect.inbound_addrs().is_empty());
        let _client = connect(&ns, peer, to(8080)).expect("connect after detach");
        assert!(accept(&app, WAIT).is_some(), "the app accepts after detach");
        assert!(accept(&capture, NOTHING).is_none());

        // `mesh-agent uninstall` (remove the pin directory with the agent stopped)
        // also ends inbound capture.
        redirect.attach_inbound(&ns, cookie, 7, &pod_ips, &capture).expect("attach before uninstall");
        drop(redirect);
        std::fs::remove_dir_all(&scratch.pin_dir).expect("remove the pin directory");
        // Unlinking the last pin releases the link from a kernel work item: retry briefly.
        let deadline = Instant::now() + WAIT;
        loop {
            let _client = connect(&ns, peer, to(8080)).expect("connect after uninstall");
            if accept(&app, NOTHING).is_some() {
                break;
            }
            assert!(accept(&capture, NOTHING).is_some(), "a connection went nowhere");
            assert!(Instant::now() < deadline, "inbound capture still active after uninstall");
        }
    }

    #[test]
    fn kubelet_probes_from_the_node_reach_the_app_uncaptured_in_real_netns() {
        if !is_root() {
            eprintln!("SKIPPED kubelet_probes_from_the_node_reach_the_app_uncaptured_in_real_netns: needs root");
            return;
        }
        if EMBEDDED_OBJECT.is_empty() {
            eprintln!(
                "SKIPPED kubelet_probes_from_the_node_reach_the_app_uncaptured_in_real_netns: no embedded eBPF \
                 object (run `cargo xtask build` first)"
            );
            return;
        }
        // Three namespaces on one bridge, as a bridge CNI wires them: the node's (the
        // kubelet's, holding the bridge and its address), the captured pod's and
        // another pod's.
        let pid = std::process::id();
        let (node, pod_ns, other) =
            (format!("mesh-prb-node-{pid}"), format!("mesh-prb-pod-{pid}"), format!("mesh-prb-other-{pid}"));
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
        let cgroup2 = mesh_common::host::find_cgroup2_mount(&mountinfo).expect("a cgroup2 mount");
        let scratch = Scratch {
            netns: vec![node.clone(), pod_ns.clone(), other.clone()],
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/mesh-prb-test-{pid}")),
            cgroup: cgroup2.join(format!("mesh-prb-test-{pid}")),
        };
        std::fs::create_dir(&scratch.cgroup).expect("create an empty cgroup");
        for ns in &scratch.netns {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &node, "addr", "add", "10.124.0.1/24", "dev", "br0"]);
        ip(&["-n", &node, "link", "set", "br0", "up"]);
        for (ns, veth, addr) in [(&pod_ns, "vpod", "10.124.0.2/24"), (&other, "vother", "10.124.0.3/24")] {
            ip(&["-n", &node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns]);
            ip(&["-n", &node, "link", "set", veth, "master", "br0", "up"]);
            ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        let open = |name: &str| Netns::open(&Path::new("/run/netns").join(name)).expect("open a netns");
        let (node_ns, ns, other_ns) = (open(&node), open(&pod_ns), open(&other));
        let cookie = ns.cookie().expect("netns cookie");

        let redirect = Redirect::load(&RedirectConfig {
            object: None,
            cgroup_root: scratch.cgroup.clone(),
            pin_dir: scratch.pin_dir.clone(),
            exclude_ports: vec![],
            exclude_cidrs: vec![],
        })
        .expect("load the capture programs");

        let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let capture = ns.listen(any(15006)).expect("bind 15006");
        let app = ns.listen(any(8080)).expect("bind 8080");
        let health = ns.listen(any(8081)).expect("bind 8081");
        let pod = Ipv4Addr::new(10, 124, 0, 2);
        let node_ip = Ipv4Addr::new(10, 124, 0, 1);
        let other_ip = Ipv4Addr::new(10, 124, 0, 3);
        let to = |port| SocketAddr::from((pod, port));
        let pod_ips = [IpAddr::V4(pod)];
        redirect.attach_inbound(&ns, cookie, 7, &pod_ips, &capture).expect("attach inbound capture");

        // The node's addresses, as the agent learns them in the host namespace: the
        // bridge's (not loopback, not the veths' IPv6 link-local ones).
        let sources = node_ns.run(local_addresses).expect("the node namespace's addresses");
        assert_eq!(sources, vec![IpAddr::V4(node_ip)]);
        redirect.set_probe_sources(&sources).expect("set the probe sources");
        // Exactly the ports given, however often: 9999 goes again.
        redirect.set_probe_ports(&pod_ips, &[8081, 9999]).expect("set probe ports");
        redirect.set_probe_ports(&pod_ips, &[8081]).expect("set probe ports again");
        redirect.set_probe_ports(&pod_ips, &[8081]).expect("set probe ports once more");
        assert_eq!(redirect.probe_ports(), vec![(IpAddr::V4(pod), 8081)]);

        // The kubelet's probe (a process of the node, in the attached cgroup, from the
        // node's address to the probe port) reaches the application's own listener.
        let probe = probe_from_node(&scratch.cgroup, &node, to(8081));
        let (_, from) = accept(&health, WAIT).expect("the health port's own listener accepts the probe");
        assert_eq!(from.ip(), IpAddr::V4(node_ip));
        assert!(accept(&capture, NOTHING).is_none(), "a probe must not be steered");
        assert!(probe.wait_with_output().expect("probe process").status.success());

        // The same addresses without a socket of the node's own behind them (traffic
        // forwarded through the node and masqueraded to its address, as a NodePort's
        // is) are captured.
        let _client = connect(&node_ns, node_ip, to(8081)).expect("forwarded-like connection from the node");
        let (steered, from) = accept(&capture, WAIT).expect("15006 accepts a connection the node did not open");
        assert_eq!((steered.local_addr().unwrap(), from.ip()), (to(8081), IpAddr::V4(node_ip)));
        assert!(accept(&health, NOTHING).is_none(), "no plaintext to the probe port without a node socket");

        // The same port from another pod is captured.
        let _client = connect(&other_ns, other_ip, to(8081)).expect("connect from another pod");
        let (steered, from) = accept(&capture, WAIT).expect("15006 accepts another pod's connection");
        assert_eq!((steered.local_addr().unwrap(), from.ip()), (to(8081), IpAddr::V4(other_ip)));
        assert!(accept(&health, NOTHING).is_none(), "the health port must not see another pod's plaintext");

        // A port that is not a probe port is captured, even from the node.
        let _client = connect(&node_ns, node_ip, to(8080)).expect("connect from the node to the app port");
        let (steered, from) = accept(&capture, WAIT).expect("15006 accepts the node's non-probe connection");
        assert_eq!((steered.local_addr().unwrap(), from.ip()), (to(8080), IpAddr::V4(node_ip)));
        assert!(accept(&app, NOTHING).is_none());

        let stats: std::collections::HashMap<_, _> = redirect.kernel_stats().into_iter().collect();
        eprintln!("kernel stats: {stats:?}");
        assert_eq!((stats["inbound_probe"], stats["inbound_steered"]), (1, 3));

        // Un-enrolled: the probe port is forgotten and the node's probe is captured again.
        redirect.clear_probe_ports(&pod_ips).expect("clear probe ports");
        assert!(redirect.probe_ports().is_empty());
        let mut after_clear = probe_from_node(&scratch.cgroup, &node, to(8081));
        let (steered, _) = accept(&capture, WAIT).expect("15006 accepts the probe port after clear");
        assert_eq!(steered.local_addr().unwrap(), to(8081));
        assert!(accept(&health, NOTHING).is_none());

        // A node address that is no longer the node's stops being a probe source.
        redirect.set_probe_ports(&pod_ips, &[8081]).expect("set probe ports after clear");
        redirect.set_probe_sources(&[]).expect("empty the probe sources");
        let mut no_source = probe_from_node(&scratch.cgroup, &node, to(8081));
        assert!(accept(&capture, WAIT).is_some(), "no probe source, no exemption");
        assert!(accept(&health, NOTHING).is_none());
        // The probe processes leave the scratch cgroup before it is removed.
        let _ = (after_clear.wait(), no_source.wait());

        // Detaching leaves no probe port behind.
        redirect.detach_inbound(cookie, &pod_ips).expect("detach inbound capture");
        assert!(redirect.probe_ports().is_empty(), "detach must clear the pod's probe ports");
        assert_eq!(redirect.kernel_stats().into_iter().find(|(n, _)| *n == "inbound_probe").unwrap().1, 1);
    }
}
