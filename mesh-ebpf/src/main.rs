//! Kernel side of capture: outbound (`connect4/6` + `sock_ops`) and inbound
//! plaintext (`sk_lookup`).
//!
//! `connect4`/`connect6` run for every `connect()` below the agent's cgroup root. For a
//! TCP socket in an enrolled pod's network namespace that is not the agent's own
//! (bypass mark), not to loopback and not excluded, they record the original
//! destination under the socket cookie and rewrite the destination to the agent's
//! in-pod listener (`127.0.0.1:15001` / `[::1]:15001`). `sock_ops` then sees the
//! connection's local port at `TCP_CONNECT_CB` (before the SYN leaves) and moves the
//! record to a key the agent can build from the accepted connection: (netns cookie,
//! client port, family).
//!
//! `sk_lookup`, attached to each enrolled pod's network namespace, runs when a TCP
//! SYN arrives there and the kernel looks for a listener. For a pod IP under inbound
//! capture it selects the agent's in-pod 15006 listener instead of the application's,
//! except for the agent's own ports, exempt ports and connections from the pod to
//! itself (which is how the agent delivers inbound traffic to the application), and
//! kubelet probes: a connection from one of the node's own addresses to a port
//! registered as a probe port of that pod IP.
#![no_std]
#![no_main]

mod maps;

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sk_lookup,
        bpf_sock_addr, bpf_sock_ops, sk_action,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, sk_lookup, sock_ops},
    maps::lpm_trie::Key,
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use maps::{
    DELIVER_CONNS, DELIVER_PENDING, ENROLLED, EXCLUDED_PORTS, EXCLUDED_V4, EXCLUDED_V6, INBOUND_ADDRS,
    INBOUND_EXCLUDED_PORTS, INBOUND_PROBE_PORTS, INBOUND_SOCKETS, INBOUND_STRICT, ORIG_DST, PENDING, PROBE_CONNS,
    PROBE_SOURCES, STATS,
};
use mesh_common::{
    AF_INET, AF_INET6, BYPASS_MARK, DELIVER_MARK, HBONE_PORT, INBOUND_PLAINTEXT_PORT, InboundKey, OUTBOUND_PORT,
    OrigDst, OrigDstKey, ProbeConnKey, ProbeKey, stat,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Return value of `cgroup/connect*` that lets the connect proceed.
const ALLOW: i32 = 1;
/// What `SockHash::redirect_sk_lookup` returns when the key has no socket.
const NO_SOCKET: i32 = -2; // -ENOENT
/// What `bpf_sk_assign` returns when an earlier `sk_lookup` program in the netns
/// already selected a socket.
const ALREADY_SELECTED: i32 = -17; // -EEXIST

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, AF_INET6);
    ALLOW
}

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        hand_over(&ctx);
        note_probe(&ctx);
        note_delivery(&ctx);
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        if let Some(key) = probe_conn_key(&ctx) {
            let _ = PROBE_CONNS.remove(&key);
            let _ = DELIVER_CONNS.remove(&key);
        }
    }
    1
}

/// Records the 4-tuple of a connection the agent delivers from the caller's address
/// (its socket was noted at connect), until it closes.
#[inline(always)]
fn note_delivery(ctx: &SockOpsContext) {
    // SAFETY: bpf_get_socket_cookie accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast::<c_void>()) };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { DELIVER_PENDING.get(&cookie) }.is_none() {
        return;
    }
    let _ = DELIVER_PENDING.remove(&cookie);
    let Some(key) = probe_conn_key(ctx) else { return };
    if DELIVER_CONNS.insert(&key, &1, 0).is_ok() {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

/// The probe-connection key of a connecting socket (the node's side is `src`).
///
/// Every field is a separate volatile load at a constant offset from the context
/// pointer, for the same reason as in `try_sk_lookup`: otherwise the compiler merges
/// the IPv4 and IPv6 paths into a load through a moved context pointer, which the
/// verifier refuses.
#[inline(always)]
fn probe_conn_key(ctx: &SockOpsContext) -> Option<ProbeConnKey> {
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: the kernel hands every sock_ops program a valid bpf_sock_ops; each read
    // is a 4-byte aligned field this program type may read.
    let field = |f: *const u32| unsafe { read_volatile(f) };
    // SAFETY: as above (only the field addresses are computed here).
    let (family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port) = unsafe {
        (
            &raw const (*ops).family,
            &raw const (*ops).local_ip4,
            &raw const (*ops).remote_ip4,
            (&raw const (*ops).local_ip6).cast::<u32>(),
            (&raw const (*ops).remote_ip6).cast::<u32>(),
            &raw const (*ops).local_port,
            &raw const (*ops).remote_port,
        )
    };
    let family = field(family);
    let v6_local = [
        field(local_ip6),
        field(local_ip6.wrapping_add(1)),
        field(local_ip6.wrapping_add(2)),
        field(local_ip6.wrapping_add(3)),
    ];
    let v6_remote = [
        field(remote_ip6),
        field(remote_ip6.wrapping_add(1)),
        field(remote_ip6.wrapping_add(2)),
        field(remote_ip6.wrapping_add(3)),
    ];
    let (v4_local, v4_remote) = (field(local_ip4), field(remote_ip4));
    let (src, dst) = if family == u32::from(AF_INET) {
        ([v4_local, 0, 0, 0], [v4_remote, 0, 0, 0])
    } else if family == u32::from(AF_INET6) {
        (v6_local, v6_remote)
    } else {
        return None;
    };
    Some(ProbeConnKey {
        family,
        // local_port is in host order; remote_port in network order (upper half).
        src_port: field(local_port) as u16,
        dst_port: u32::from_be(field(remote_port)) as u16,
        src: addr_bytes(src),
        dst: addr_bytes(dst),
    })
}

/// Records a connection the node itself (kubelet) opens from one of its addresses to a
/// pod's probe port, and asks for the socket's state changes so that the record goes
/// when the connection closes.
#[inline(always)]
fn note_probe(ctx: &SockOpsContext) {
    let Some(key) = probe_conn_key(ctx) else { return };
    let source = InboundKey { family: key.family, addr: key.src };
    // SAFETY: read-only lookups of plain values.
    if unsafe { PROBE_SOURCES.get(source) }.is_none()
        || unsafe {
            INBOUND_PROBE_PORTS.get(ProbeKey { family: key.family, port: key.dst_port, pad: 0, addr: key.dst })
        }
        .is_none()
    {
        return;
    }
    if PROBE_CONNS.insert(&key, &1, 0).is_ok() {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, family: u16) {
    // SAFETY: the kernel hands every cgroup/connect program a valid bpf_sock_addr.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return;
    }
    // SAFETY: bpf_get_netns_cookie accepts the sock_addr context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { ENROLLED.get(&netns_cookie) }.is_none() {
        return;
    }
    // SAFETY: `sk` of a sock_addr context is a non-null PTR_TO_SOCKET.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if mark == DELIVER_MARK {
        // The agent delivering a connection from the caller's address: sock_ops
        // records its 4-tuple once the port is chosen, so sk_lookup lets it pass.
        // SAFETY: bpf_get_socket_cookie accepts the sock_addr context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = DELIVER_PENDING.insert(&cookie, &1, 0);
        count(stat::SKIPPED_BYPASS);
        return;
    }
    if mark == BYPASS_MARK {
        count(stat::SKIPPED_BYPASS);
        return;
    }
    let port = u16::from_be(sa.user_port as u16);
    let mut addr = [0u8; 16];
    if family == AF_INET {
        let ip = sa.user_ip4.to_ne_bytes();
        if ip[0] == 127 {
            count(stat::SKIPPED_LOOPBACK);
            return;
        }
        if EXCLUDED_V4.get(Key::new(32, ip)).is_some() {
            count(stat::SKIPPED_EXCLUDED);
            return;
        }
        addr[..4].copy_from_slice(&ip);
    } else {
        let words = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
        let mut i = 0;
        while i < 4 {
            let b = words[i].to_ne_bytes();
            addr[i * 4] = b[0];
            addr[i * 4 + 1] = b[1];
            addr[i * 4 + 2] = b[2];
            addr[i * 4 + 3] = b[3];
            i += 1;
        }
        if is_loopback6(&addr) {
            count(stat::SKIPPED_LOOPBACK);
            return;
        }
        if EXCLUDED_V6.get(Key::new(128, addr)).is_some() {
            count(stat::SKIPPED_EXCLUDED);
            return;
        }
    }
    // SAFETY: read-only lookup of a plain value.
    if unsafe { EXCLUDED_PORTS.get(&port) }.is_some() {
        count(stat::SKIPPED_EXCLUDED);
        return;
    }
    // The value is built on the stack: the verifier refuses map updates whose value
    // points into the context.
    let orig = OrigDst { addr, netns_cookie, port, family, pad: 0 };
    // SAFETY: bpf_get_socket_cookie accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING.insert(&cookie, &orig, 0).is_err() {
        // Without a record the agent could not forward the connection: leave it alone.
        count(stat::RECORD_FAILED);
        return;
    }
    if family == AF_INET {
        sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    } else {
        sa.user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    }
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    count(stat::CAPTURED);
}

#[inline(always)]
fn is_loopback6(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    // ::1, or an IPv4-mapped 127.0.0.0/8.
    (addr[10] == 0 && addr[11] == 0 && addr[12] == 0 && addr[13] == 0 && addr[14] == 0 && addr[15] == 1)
        || (addr[10] == 0xff && addr[11] == 0xff && addr[12] == 127)
}

#[inline(always)]
fn hand_over(ctx: &SockOpsContext) {
    // SAFETY: bpf_get_socket_cookie accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast::<c_void>()) };
    // SAFETY: read-only lookup; the value is copied to the stack before use.
    let Some(orig) = (unsafe { PENDING.get(&cookie) }).copied() else {
        return;
    };
    let key =
        OrigDstKey { netns_cookie: orig.netns_cookie, port: ctx.local_port() as u16, family: orig.family, pad: 0 };
    if ORIG_DST.insert(&key, &orig, 0).is_ok() {
        count(stat::HANDED_OVER);
    } else {
        count(stat::RECORD_FAILED);
    }
    let _ = PENDING.remove(&cookie);
}

/// Decides one listener lookup. `SK_PASS` without a selection means "the kernel's
/// ordinary lookup", so everything that is not a captured pod IP costs one hash lookup.
#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let lookup: *const bpf_sk_lookup = ctx.lookup;
    // Every context field is read with a volatile load straight from the context
    // pointer: with plain reads the compiler merged the IPv4 and IPv6 paths into a
    // load through a pointer chosen between two fields, and the verifier refuses any
    // load through a context pointer that was moved ("dereference of modified ctx
    // ptr"). Reading all fields up front (eight more loads per SYN) keeps each load
    // at a constant offset.
    // SAFETY: the kernel hands every sk_lookup program a valid bpf_sk_lookup; each
    // read is a 4-byte aligned field the verifier allows for this program type.
    let field = |f: *const u32| unsafe { read_volatile(f) };
    // SAFETY: as above (only the field addresses are computed here).
    let (protocol, family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port) = unsafe {
        (
            &raw const (*lookup).protocol,
            &raw const (*lookup).family,
            &raw const (*lookup).local_ip4,
            &raw const (*lookup).remote_ip4,
            &raw const (*lookup).local_ip6,
            &raw const (*lookup).remote_ip6,
            &raw const (*lookup).local_port,
            // A 2-byte field followed by 2 zero bytes; the kernel accepts a 4-byte load.
            (&raw const (*lookup).remote_port).cast::<u32>(),
        )
    };
    if field(protocol) != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let family = field(family);
    let local6 = local_ip6.cast::<u32>();
    let remote6 = remote_ip6.cast::<u32>();
    // Addresses as the kernel stores them (network order), word by word: the key's
    // bytes and the self-connection test need nothing else.
    let v6_local =
        [field(local6), field(local6.wrapping_add(1)), field(local6.wrapping_add(2)), field(local6.wrapping_add(3))];
    let v6_remote = [
        field(remote6),
        field(remote6.wrapping_add(1)),
        field(remote6.wrapping_add(2)),
        field(remote6.wrapping_add(3)),
    ];
    let (v4_local, v4_remote) = (field(local_ip4), field(remote_ip4));
    let (local, remote) = if family == u32::from(AF_INET) {
        ([v4_local, 0, 0, 0], [v4_remote, 0, 0, 0])
    } else if family == u32::from(AF_INET6) {
        (v6_local, v6_remote)
    } else {
        return sk_action::SK_PASS;
    };
    let key = InboundKey { family, addr: addr_bytes(local) };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { INBOUND_ADDRS.get(key) }.is_none() {
        return sk_action::SK_PASS;
    }
    // Host order, a u32 in the context.
    let port = field(local_port) as u16;
    // A kubelet probe: a connection the node itself opened to a probe port of this pod
    // IP (recorded by sock_ops on the node; see PROBE_CONNS). The key is built on the
    // stack from the words read above (no context pointer in a map key).
    let probe = ProbeConnKey {
        family,
        // Network order in the low 16 bits of the 4-byte load.
        src_port: u16::from_be(field(remote_port) as u16),
        dst_port: port,
        src: addr_bytes(remote),
        dst: key.addr,
    };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { PROBE_CONNS.get(&probe) }.is_some() {
        count(stat::INBOUND_PROBE);
        return sk_action::SK_PASS;
    }
    // The agent delivering a connection it already checked, from the caller's address.
    // SAFETY: read-only lookup of a plain value.
    if unsafe { DELIVER_CONNS.get(&probe) }.is_some() {
        count(stat::INBOUND_DELIVERED);
        return sk_action::SK_PASS;
    }
    // SAFETY: read-only lookup of a plain value.
    if port == HBONE_PORT
        || port == INBOUND_PLAINTEXT_PORT
        || port == OUTBOUND_PORT
        || unsafe { INBOUND_EXCLUDED_PORTS.get(port) }.is_some()
    {
        count(stat::INBOUND_EXEMPT);
        return sk_action::SK_PASS;
    }
    if local == remote {
        count(stat::INBOUND_SELF);
        return sk_action::SK_PASS;
    }
    // STRICT at the door: plaintext to a STRICT port is refused here (the kernel
    // answers the SYN with a reset), so none of the client's data reaches the node.
    let port_key = ProbeKey { family, port, pad: 0, addr: key.addr };
    let pod_key = ProbeKey { port: 0, ..port_key };
    // SAFETY: read-only lookups of plain values.
    let strict = unsafe { INBOUND_STRICT.get(&port_key).or_else(|| INBOUND_STRICT.get(&pod_key)) };
    if strict.is_some_and(|strict| *strict == 1) {
        count(stat::INBOUND_STRICT);
        return sk_action::SK_DROP;
    }
    match INBOUND_SOCKETS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => {
            count(stat::INBOUND_STEERED);
            sk_action::SK_PASS
        }
        // The agent is down (its listener closed, so the kernel dropped the entry):
        // fail closed rather than hand plaintext to a STRICT pod's application.
        Err(NO_SOCKET) => {
            count(stat::INBOUND_NO_LISTENER);
            sk_action::SK_DROP
        }
        // Another program ran first. While a restarted agent replaces its link, that
        // is the previous agent's program, which picked the same socket from this
        // same pinned map; the kernel keeps the earlier selection.
        Err(ALREADY_SELECTED) => sk_action::SK_PASS,
        Err(_) => {
            count(stat::INBOUND_ASSIGN_FAILED);
            sk_action::SK_DROP
        }
    }
}

/// An address as the context holds it (four network-order words) as key bytes.
#[inline(always)]
fn addr_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    addr
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
