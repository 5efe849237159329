//! Known bypass classes of proxies: for each, a crafted request against a `DENY`
//! policy, normalized the way the waypoint normalizes, under each `pathNormalization`
//! option. Where Istio itself lets the request through (paths are case-sensitive;
//! `NONE` normalizes nothing; `BASE` keeps `//` and `%2F`), the test pins that truth
//! and the option that closes the gap.
use mesh_common::{
    config::{
        Config, Source, load,
        mesh::PathNormalization::{self, Base, DecodeAndMergeSlashes, MergeSlashes, None as Off},
    },
    policy::{Target, TargetKind, Waypoint, WaypointPolicies, WaypointVerdict},
};

use super::{Request, check};
use crate::normalize::Reject;

const ALL: [PathNormalization; 4] = [Off, Base, MergeSlashes, DecodeAndMergeSlashes];
const WAYPOINT: Waypoint<'static> = Waypoint { namespace: "shop", name: "waypoint", class: "istio-waypoint" };
const API: Target<'static> = Target { kind: TargetKind::Service, namespace: "shop", name: "api" };

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Allowed,
    Denied,
    /// Refused before policy (400, or 403 for CONNECT): the request never gets through.
    Refused,
}
use Outcome::{Allowed, Denied, Refused};

/// A DENY policy bound to the waypoint, with `rule` as YAML flow.
fn deny(rule: &str) -> WaypointPolicies {
    let text = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny, namespace: shop}}\n\
         spec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  \
         action: DENY\n  rules: [{rule}]\n"
    );
    let config: Config = load(&[Source::new("deny.yaml", text)]).unwrap_or_else(|r| panic!("{r}"));
    WaypointPolicies::new(&config, &WAYPOINT)
}

struct Req<'a> {
    method: &'a str,
    target: &'a str,
    authority: Option<&'a str>,
    hosts: Vec<&'a str>,
    headers: Vec<(&'a str, &'a str)>,
}

fn get(target: &str) -> Req<'_> {
    Req { method: "GET", target, authority: None, hosts: vec!["public.example.com"], headers: vec![] }
}

fn outcome(policies: &WaypointPolicies, option: PathNormalization, req: &Req) -> Outcome {
    let request = Request {
        method: req.method,
        target: req.target,
        authority: req.authority,
        host_headers: &req.hosts,
        headers: &req.headers,
        source_identity: Some("spiffe://cluster.local/ns/shop/sa/web"),
        source_ip: "10.1.2.3".parse().unwrap(),
        remote_ip: "10.1.2.3".parse().unwrap(),
        destination_ip: "10.0.0.2".parse().unwrap(),
        destination_port: 8080,
        auth: None,
        sni: None,
    };
    match check(policies, option, Some(&API), &request) {
        Ok(checked) => match checked.verdict {
            WaypointVerdict::Deny { .. } => Denied,
            WaypointVerdict::Allow { .. } => Allowed,
            WaypointVerdict::Custom { .. } => panic!("no CUSTOM policy here"),
        },
        Err(_) => Refused,
    }
}

/// The outcome of `target` under `NONE`, `BASE`, `MERGE_SLASHES`, `DECODE_AND_MERGE_SLASHES`.
fn under_each(policies: &WaypointPolicies, target: &str) -> [Outcome; 4] {
    ALL.map(|option| outcome(policies, option, &get(target)))
}

#[test]
fn the_plain_request_is_denied_and_another_is_not() {
    let admin = deny("{to: [{operation: {paths: ['/admin*']}}]}");
    assert_eq!(under_each(&admin, "/admin"), [Denied; 4]);
    assert_eq!(under_each(&admin, "/public"), [Allowed; 4]);
}

#[test]
fn dot_segments() {
    let admin = deny("{to: [{operation: {paths: ['/admin*']}}]}");
    // NONE normalizes nothing (Istio documents the risk); every other option removes them.
    for target in ["/./admin", "/public/../admin", "/public/%2e%2E/admin", "/../admin", "/public/..\\admin"] {
        assert_eq!(under_each(&admin, target), [Allowed, Denied, Denied, Denied], "{target}");
    }
}

#[test]
fn merged_slashes() {
    let admin = deny("{to: [{operation: {paths: ['/admin*']}}]}");
    // BASE keeps `//` as Envoy's normalize_path does: MERGE_SLASHES is Istio's answer.
    assert_eq!(under_each(&admin, "//admin"), [Allowed, Allowed, Denied, Denied]);
    assert_eq!(under_each(&admin, "///admin/x"), [Allowed, Allowed, Denied, Denied]);
    // A backslash becomes a slash, so `/\admin` is `//admin`.
    assert_eq!(under_each(&admin, "/\\admin"), [Allowed, Allowed, Denied, Denied]);
}

#[test]
fn percent_encoded_unreserved_characters() {
    let admin = deny("{to: [{operation: {paths: ['/admin*']}}]}");
    assert_eq!(under_each(&admin, "/%61dmin"), [Allowed, Denied, Denied, Denied]);
    assert_eq!(under_each(&admin, "/%61%64%6D%69%6E"), [Allowed, Denied, Denied, Denied]);
    // An invalid escape is refused whatever the option.
    assert_eq!(under_each(&admin, "/%6xdmin"), [Refused; 4]);
}

#[test]
fn escaped_slashes() {
    // `/admin*` is a prefix: an escaped slash after it changes nothing.
    let admin = deny("{to: [{operation: {paths: ['/admin*']}}]}");
    assert_eq!(under_each(&admin, "/admin%2Fx"), [Denied; 4]);
    // `/admin/*` needs the slash: only DECODE_AND_MERGE_SLASHES decodes `%2F` (and
    // `%5C`); the others forward it escaped, as Envoy keeps it unchanged by default.
    let dir = deny("{to: [{operation: {paths: ['/admin/*']}}]}");
    assert_eq!(under_each(&dir, "/admin%2Fx"), [Allowed, Allowed, Allowed, Denied]);
    assert_eq!(under_each(&dir, "/admin%2fx"), [Allowed, Allowed, Allowed, Denied]);
    assert_eq!(under_each(&dir, "/admin%5Cx"), [Allowed, Allowed, Allowed, Denied]);
    assert_eq!(under_each(&dir, "/public%2F..%2Fadmin/x"), [Allowed, Allowed, Allowed, Denied]);
}

#[test]
fn fragments() {
    let admin = deny("{to: [{operation: {paths: ['/admin*']}}]}");
    assert_eq!(under_each(&admin, "/admin#x"), [Denied; 4]);
    // What follows `#` is never sent upstream either: `/public` is what is served.
    assert_eq!(under_each(&admin, "/public#/../admin"), [Allowed; 4]);
    let exact = deny("{to: [{operation: {paths: ['/admin']}}]}");
    assert_eq!(under_each(&exact, "/admin#x"), [Denied; 4]);
}

#[test]
fn backslash_and_other_non_origin_targets_are_refused() {
    let admin = deny("{to: [{operation: {paths: ['/admin*']}}]}");
    assert_eq!(under_each(&admin, "\\admin"), [Refused; 4]);
    assert_eq!(under_each(&admin, "admin"), [Refused; 4]);
    assert_eq!(under_each(&admin, "/admin\t"), [Refused; 4]);
    assert_eq!(under_each(&admin, "/ad min"), [Refused; 4]);
}

#[test]
fn path_case_is_istio_case() {
    // Istio's `paths` are case-sensitive (Envoy's path matcher without ignore_case):
    // `/Admin` is another path. A backend that folds case needs a pattern for each
    // spelling or an ALLOW policy instead.
    let admin = deny("{to: [{operation: {paths: ['/admin*']}}]}");
    assert_eq!(under_each(&admin, "/Admin"), [Allowed; 4]);
    assert_eq!(under_each(&admin, "/%41dmin"), [Allowed; 4]);
    let allow = {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow, namespace: shop}\n\
                    spec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  \
                    rules: [{to: [{operation: {paths: ['/public*']}}]}]\n";
        WaypointPolicies::new(&load(&[Source::new("allow.yaml", text)]).unwrap(), &WAYPOINT)
    };
    assert_eq!(under_each(&allow, "/Admin"), [Denied; 4]);
    assert_eq!(under_each(&allow, "/public/../Admin"), [Allowed, Denied, Denied, Denied]);
}

#[test]
fn host_case_trailing_dot_and_port() {
    let host = deny("{to: [{operation: {hosts: [admin.example.com]}}]}");
    for spelling in [
        "admin.example.com",
        "Admin.Example.COM",
        "admin.example.com.",
        "ADMIN.example.com.:80",
        "admin.example.com:8080",
    ] {
        let req = Req { hosts: vec![spelling], ..get("/") };
        for option in ALL {
            assert_eq!(outcome(&host, option, &req), Denied, "{spelling} {option:?}");
        }
    }
    // The absolute form's authority is the host, whatever `Host` says.
    let req = Req { hosts: vec!["public.example.com"], ..get("http://Admin.example.com./x") };
    assert_eq!(outcome(&host, Base, &req), Denied);
    assert_eq!(outcome(&host, Base, &get("/")), Allowed);
}

#[test]
fn several_hosts_are_refused() {
    let host = deny("{to: [{operation: {hosts: [admin.example.com]}}]}");
    let two = Req { hosts: vec!["public.example.com", "admin.example.com"], ..get("/") };
    assert_eq!(outcome(&host, Base, &two), Refused);
    let mismatch = Req { authority: Some("public.example.com"), hosts: vec!["admin.example.com"], ..get("/") };
    assert_eq!(outcome(&host, Base, &mismatch), Refused);
    let none = Req { hosts: vec![], ..get("/") };
    assert_eq!(outcome(&host, Base, &none), Refused);
    // The same host twice, spelled differently, is one host.
    let same = Req { authority: Some("admin.example.com"), hosts: vec!["ADMIN.example.com.:80"], ..get("/") };
    assert_eq!(outcome(&host, Base, &same), Denied);
}

#[test]
fn header_name_case_and_duplicates() {
    let header = deny("{when: [{key: 'request.headers[X-Role]', values: [admin]}]}");
    for name in ["x-role", "X-Role", "X-ROLE"] {
        let req = Req { headers: vec![(name, "admin")], ..get("/") };
        assert_eq!(outcome(&header, Base, &req), Denied, "{name}");
    }
    // Istio (Envoy) joins a repeated header's values with `,`: `user,admin` is not the
    // exact value `admin`, so an exact DENY misses it. A suffix or prefix pattern, or
    // an ALLOW policy on the expected value, does not.
    let dup = Req { headers: vec![("x-role", "user"), ("X-Role", "admin")], ..get("/") };
    assert_eq!(outcome(&header, Base, &dup), Allowed);
    let suffix = deny("{when: [{key: 'request.headers[x-role]', values: ['*admin']}]}");
    assert_eq!(outcome(&suffix, Base, &dup), Denied);
    let allow_user = {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: users, namespace: shop}\n\
                    spec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  \
                    rules: [{when: [{key: 'request.headers[x-role]', values: [user]}]}]\n";
        WaypointPolicies::new(&load(&[Source::new("users.yaml", text)]).unwrap(), &WAYPOINT)
    };
    assert_eq!(outcome(&allow_user, Base, &dup), Denied);
    assert_eq!(outcome(&allow_user, Base, &Req { headers: vec![("x-role", "user")], ..get("/") }), Allowed);
}

#[test]
fn connect_is_refused() {
    let admin = deny("{to: [{operation: {paths: ['/admin*']}}]}");
    let connect = Req { method: "CONNECT", ..get("admin.example.com:443") };
    for option in ALL {
        assert_eq!(outcome(&admin, option, &connect), Refused);
    }
    let request = Request {
        method: "CONNECT",
        target: "admin.example.com:443",
        authority: Some("admin.example.com:443"),
        host_headers: &[],
        headers: &[],
        source_identity: None,
        source_ip: "10.1.2.3".parse().unwrap(),
        remote_ip: "10.1.2.3".parse().unwrap(),
        destination_ip: "10.0.0.2".parse().unwrap(),
        destination_port: 8080,
        auth: None,
        sni: None,
    };
    let refused = check(&admin, Base, Some(&API), &request).unwrap_err();
    assert_eq!(refused, Reject::Connect { authority: "admin.example.com:443".into() });
    assert_eq!(refused.status(), 403);
}

#[test]
fn method_case_is_istio_case() {
    // Methods are case-sensitive in HTTP and in Istio: `delete` is not `DELETE`.
    let delete = deny("{to: [{operation: {methods: [DELETE]}}]}");
    assert_eq!(outcome(&delete, Base, &Req { method: "DELETE", ..get("/") }), Denied);
    assert_eq!(outcome(&delete, Base, &Req { method: "delete", ..get("/") }), Allowed);
}
