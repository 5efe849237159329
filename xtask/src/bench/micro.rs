//! `cargo xtask bench micro`: the decisions every connection makes, on their own and
//! in process, on a generated mesh (10,000 services, 50,000 workloads, 1,000
//! authorization policies; `--quick`: 2,000 / 10,000 / 200): L4 policy evaluation,
//! the destination lookup, and building the workload index from a view (what an agent
//! does on every configuration change). Medians of several timed batches.
use std::{
    fmt::Write as _,
    fs,
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Instant,
};

use mesh_common::{config::meta::Labels, policy};
use mesh_controller::source;
use mesh_proxy::workloads::{Index, Route};

const DIR: &str = "/tmp/mesh-bench-micro";

/// Removes the generated configuration, also on error.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(DIR);
    }
}

/// Median time per call, in nanoseconds, of `batches` batches of `per_batch` calls.
fn per_call(batches: usize, per_batch: usize, mut call: impl FnMut(usize)) -> f64 {
    let mut samples: Vec<f64> = (0..batches)
        .map(|_| {
            let start = Instant::now();
            for i in 0..per_batch {
                call(i);
            }
            start.elapsed().as_nanos() as f64 / per_batch as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

pub fn bench(quick: bool) -> anyhow::Result<()> {
    let (services, workloads, policies) = if quick { (2_000, 10_000, 200) } else { (10_000, 50_000, 1_000) };
    let _cleanup = Cleanup;
    let dir = std::path::Path::new(DIR);
    println!("==> generating {services} services, {workloads} workloads, {policies} authorization policies");
    super::control::generate(dir, 20, services, workloads)?;
    let mut yaml = String::new();
    for p in 0..policies {
        let _ = write!(
            yaml,
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-{p}\n  namespace: ns-{}\nspec:\n  selector:\n    matchLabels:\n      app: app-{p}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/ns-1/sa/sa-{}\"]\n    to:\n    - operation:\n        ports: [\"8080\"]\n---\n",
            p % 100,
            p % 20
        );
    }
    fs::write(dir.join("policies.yaml"), yaml)?;
    let config = source::load(dir, "cluster.local", "istio-system").map_err(|r| anyhow::anyhow!("{r}"))?;

    println!("==> building the workload index (5 times)");
    let build_ms = per_call(5, 1, |_| {
        black_box(Index::build(black_box(&config)));
    }) / 1e6;
    let index = Index::build(&config).at(1);

    println!("==> destination lookups");
    let vip = |i: usize| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)), 80);
    let pod = |i: usize| {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 100 + (i / 65536) as u8, ((i / 256) % 256) as u8, (i % 256) as u8)),
            8080,
        )
    };
    let mut tunneled = 0usize;
    let route_service_ns = per_call(9, 20_000, |i| {
        let route = index.route(vip((i * 7919) % services), "ns-0");
        tunneled += usize::from(matches!(route, Route::Tunnel { .. }));
    });
    let route_pod_ns = per_call(9, 20_000, |i| {
        black_box(index.route(pod((i * 7919) % workloads), "ns-0"));
    });
    anyhow::ensure!(tunneled > 0, "no service lookup resolved to a meshed endpoint: the generated mesh is wrong");

    println!("==> L4 authorization decisions");
    let mut labels = Labels::new();
    labels.insert("app".into(), "app-5".into());
    let workload = policy::Workload { namespace: "ns-5", labels: &labels };
    let allowed = policy::Connection {
        source_identity: Some("spiffe://cluster.local/ns/ns-1/sa/sa-5"),
        source_ip: IpAddr::V4(Ipv4Addr::new(10, 100, 0, 1)),
        destination_ip: IpAddr::V4(Ipv4Addr::new(10, 100, 0, 5)),
        destination_port: 8080,
    };
    let denied = policy::Connection { source_identity: Some("spiffe://cluster.local/ns/ns-2/sa/other"), ..allowed };
    anyhow::ensure!(
        matches!(policy::authorize(&config, &workload, &allowed), policy::Verdict::Allow { .. })
            && matches!(policy::authorize(&config, &workload, &denied), policy::Verdict::Deny { .. }),
        "the generated policies do not decide as intended"
    );
    let authorize_ns = per_call(9, 2_000, |i| {
        let conn = if i % 2 == 0 { &allowed } else { &denied };
        black_box(policy::authorize(&config, &workload, conn));
    });

    println!();
    println!("| decision | time |");
    println!("| --- | --- |");
    println!("| build the workload index ({services} services, {workloads} workloads) | {build_ms:.1} ms |");
    println!("| destination lookup, service VIP | {route_service_ns:.0} ns |");
    println!("| destination lookup, pod address | {route_pod_ns:.0} ns |");
    println!(
        "| L4 authorization ({policies} policies in the mesh, allow and deny alternating) | {authorize_ns:.0} ns |"
    );
    Ok(())
}
