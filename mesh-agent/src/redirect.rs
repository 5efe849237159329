//! Loads the capture programs, attaches them to the cgroup root, pins them and owns
//! their maps.
//!
//! Restart behaviour (fail-closed): programs, links and maps are pinned under the
//! agent's bpffs directory, so capture stays in force while the agent is down. An
//! enrolled pod's new connections are then refused at its in-pod listener address
//! (nothing listens there) instead of leaving the pod in clear text. A restarted agent
//! reuses the pinned maps, attaches its programs before detaching the old ones (no
//! gap), and re-opens the listeners of the pods recorded in its state file.
//! `mesh-agent uninstall` removes the pins, which detaches capture.
use std::{
    fs::File,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{EnrolledPod, OrigDst, OrigDstKey, stat};

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
    stats: PerCpuArray<MapData, u64>,
    _ebpf: Ebpf,
}

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

        configure_exclusions(&mut ebpf, cfg)?;
        let enrolled = HashMap::try_from(take_map(&mut ebpf, "ENROLLED")?)
            .map_err(|source| RedirectError::Map { map: "ENROLLED", source })?;
        let orig_dst = HashMap::try_from(take_map(&mut ebpf, "ORIG_DST")?)
            .map_err(|source| RedirectError::Map { map: "ORIG_DST", source })?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, "STATS")?)
            .map_err(|source| RedirectError::Map { map: "STATS", source })?;
        Ok(Self { enrolled: Mutex::new(enrolled), orig_dst: Mutex::new(orig_dst), stats, _ebpf: ebpf })
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
fn ensure_bpffs(pin_dir: &Path) -> Result<(), RedirectError> {
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
