//! The data path the node agent and the waypoint share, in the order a connection
//! meets it: the sockets it leaves by ([`socket`]), the HBONE tunnel ([`tunnel`]:
//! client pool, server, stream), the byte relay ([`relay`]), and around them the
//! certificates ([`identity`]), the view of the mesh ([`control`], [`workloads`],
//! with the names it resolves: [`dns`]),
//! telemetry ([`telemetry`], [`metrics`]), drain, state files and the admin server.
//!
//! Nothing here touches the kernel's capture programs: the library links no eBPF
//! loader and needs no privilege, so its tunnel, pool and policy run in-process in
//! tests over loopback.
pub mod admin;
pub mod control;
pub mod dns;
pub mod drain;
pub mod identity;
pub mod logs;
pub mod metrics;
pub mod otlp;
pub mod relay;
pub mod shard;
pub mod socket;
pub mod state;
pub mod telemetry;
pub mod tunnel;
pub mod workloads;
