//! Kernel side of outbound capture.
//!
//! `connect4`/`connect6` run for every `connect()` below the agent's cgroup root. For a
//! TCP socket in an enrolled pod's network namespace that is not the agent's own
//! (bypass mark), not to loopback and not excluded, they record the original
//! destination under the socket cookie and rewrite the destination to the agent's
//! in-pod listener (`127.0.0.1:15001` / `[::1]:15001`). `sock_ops` then sees the
//! connection's local port at `TCP_CONNECT_CB` (before the SYN leaves) and moves the
//! record to a key the agent can build from the accepted connection: (netns cookie,
//! client port, family).
#![no_std]
#![no_main]

mod maps;

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, sock_ops},
    maps::lpm_trie::Key,
    programs::{SockAddrContext, SockOpsContext},
};
use maps::{ENROLLED, EXCLUDED_PORTS, EXCLUDED_V4, EXCLUDED_V6, ORIG_DST, PENDING, STATS};
use mesh_common::{AF_INET, AF_INET6, BYPASS_MARK, OUTBOUND_PORT, OrigDst, OrigDstKey, stat};

const SOCK_STREAM: u32 = 1;
/// Return value of `cgroup/connect*` that lets the connect proceed.
const ALLOW: i32 = 1;

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
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        hand_over(&ctx);
    }
    1
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
