//! Every map of the capture programs. All but the statistics are pinned by name under
//! the agent's bpffs directory, so enrollment survives an agent restart.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
};
use mesh_common::{EnrolledPod, InboundKey, OrigDst, OrigDstKey, ProbeConnKey, ProbeKey, stat};

/// Enrolled pods, keyed by network-namespace cookie. Written by the agent only.
#[map]
pub static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(16_384, 0);

/// Original destinations by socket cookie, from `connect4/6` until `sock_ops` sees the
/// connection's local port. LRU so that connects that never reach SYN age out.
#[map]
pub static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65_536, 0);

/// Original destinations by (netns cookie, client port, family): what the agent looks
/// up for an accepted connection, and deletes once read.
#[map]
pub static ORIG_DST: LruHashMap<OrigDstKey, OrigDst> = LruHashMap::pinned(65_536, 0);

/// Destination ports never captured (host order).
#[map]
pub static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(1024, 0);

/// Destination CIDRs never captured.
#[map]
pub static EXCLUDED_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(1024, 0);
#[map]
pub static EXCLUDED_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(1024, 0);

/// Pod IPs under inbound capture, with the agent-local pod id. Written by the agent
/// only. An address in here and not in `INBOUND_SOCKETS` means "agent down": drop.
#[map]
pub static INBOUND_ADDRS: HashMap<InboundKey, u32> = HashMap::pinned(16_384, 0);

/// Each captured pod IP's 15006 listener (a socket in that pod's netns). The kernel
/// removes an entry when its socket closes, which is what makes capture fail closed
/// while the agent is down.
#[map]
pub static INBOUND_SOCKETS: SockHash<InboundKey> = SockHash::pinned(16_384, 0);

/// Local ports of every captured pod never steered to 15006 (host order), from
/// whatever source. Prefer `INBOUND_PROBE_PORTS` for kubelet probes.
#[map]
pub static INBOUND_EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(1024, 0);

/// Kubelet probe ports of each captured pod IP. A connection to one of them is passed
/// to the application uncaptured only when the node itself opened it (`PROBE_CONNS`):
/// under a STRICT policy the agent refuses plaintext, and kubelet's probes are
/// plaintext.
#[map]
pub static INBOUND_PROBE_PORTS: HashMap<ProbeKey, u8> = HashMap::pinned(16_384, 0);

/// The node's own addresses (`family` and `addr` as in `InboundKey`). The kubelet runs
/// in the host network namespace, so its probes come from one of these; other pods
/// have addresses of their own.
#[map]
pub static PROBE_SOURCES: HashMap<InboundKey, u8> = HashMap::pinned(256, 0);

/// Connections a local process of the node (kubelet) opened from one of its
/// `PROBE_SOURCES` to a pod's probe port, recorded by `sock_ops` when the connect
/// starts and removed when the socket closes. Traffic forwarded through the node and
/// masqueraded to its address (NodePort, LoadBalancer) has the same addresses but no
/// local socket, so it is never in here and stays captured.
#[map]
pub static PROBE_CONNS: LruHashMap<ProbeConnKey, u8> = LruHashMap::pinned(16_384, 0);

/// Counters, indexed by `mesh_common::stat`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// `PeerAuthentication` STRICT of each captured pod IP: `port` 0 is the pod's mode
/// for every port, another port an override (`portLevelMtls`). Value 1: plaintext is
/// refused in the kernel, before the handshake; 0: steered to 15006. Written by the
/// agent on every view change.
#[map]
pub static INBOUND_STRICT: HashMap<ProbeKey, u8> = HashMap::pinned(16_384, 0);

/// Sockets of the agent that deliver a connection to an application from the
/// caller's address (`DELIVER_MARK`), by socket cookie, from their `connect` until
/// `sock_ops` knows their 4-tuple.
#[map]
pub static DELIVER_PENDING: LruHashMap<u64, u8> = LruHashMap::pinned(16_384, 0);

/// The 4-tuples of those connections (the agent's side, the caller's address, is
/// `src`), until they close. Their SYN reaches the application uncaptured; an
/// outside SYN with the same addresses cannot exist while the agent's socket holds
/// the 4-tuple, and the entry goes when it closes.
#[map]
pub static DELIVER_CONNS: LruHashMap<ProbeConnKey, u8> = LruHashMap::pinned(65_536, 0);
