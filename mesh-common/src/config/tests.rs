//! Unit and property tests of the loader, the checks and the value parsers. The
//! corpora of whole manifests are in `tests/corpus.rs`.
use std::{
    fmt::Write as _,
    format,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    string::{String, ToString},
    time::Duration,
    vec,
    vec::Vec,
};

use proptest::prelude::*;

use super::{
    Config, Problem, Report, Source, load,
    values::{IpNet, label_key_error, label_value_error, parse_duration, retry_on_error, wildcard_error},
};

fn load_one(text: &str) -> Result<Config, Report> {
    load(&[Source::new("test.yaml", text)])
}

/// The warnings of a configuration that loads.
fn warnings(text: &str) -> Vec<Problem> {
    load_one(text).unwrap_or_else(|report| panic!("rejected: {report}")).warnings
}

fn problems(text: &str) -> Vec<Problem> {
    match load_one(text) {
        Ok(config) => panic!("accepted: {config:#?}"),
        Err(report) => report.0,
    }
}

#[test]
fn durations_istio_writes() {
    let ms = Duration::from_millis;
    for (text, want) in [
        ("2s", ms(2000)),
        ("1.5s", ms(1500)),
        ("100ms", ms(100)),
        ("1m", ms(60_000)),
        ("1h", ms(3_600_000)),
        ("1h30m", ms(5_400_000)),
        ("0s", Duration::ZERO),
        ("0", Duration::ZERO),
        (".5s", ms(500)),
        ("250us", Duration::from_micros(250)),
        ("10ns", Duration::from_nanos(10)),
        ("0.001s", ms(1)),
    ] {
        assert_eq!(parse_duration(text), Ok(want), "{text}");
    }
}

#[test]
fn durations_that_are_not() {
    for text in
        ["", "2x", "2", "1.5", "s", "-1s", "1.2.3s", "1 s", "1s ", "abc", ".s", "1S", "99999999999999999999999h"]
    {
        assert!(parse_duration(text).is_err(), "{text} was accepted");
    }
    assert_eq!(parse_duration("2x").unwrap_err().to_string(), "unknown unit `x` in `2x` (use ns, us, ms, s, m or h)");
    // Go's limit: 2562047h47m16.854775807s is the largest; a deadline from it fits.
    assert_eq!(parse_duration("2562047h47m16.854775807s"), Ok(Duration::from_nanos(i64::MAX as u64)));
    assert_eq!(
        parse_duration("10000000000000000000s").unwrap_err().to_string(),
        "`10000000000000000000s` is longer than the largest duration, 2562047h (about 292 years)"
    );
    assert!(parse_duration("2562047h47m16.854775808s").is_err());
}

#[test]
fn cidrs_and_addresses() {
    let net: IpNet = "10.1.2.0/24".parse().unwrap();
    assert!(net.contains(&IpAddr::V4(Ipv4Addr::new(10, 1, 2, 200))));
    assert!(!net.contains(&IpAddr::V4(Ipv4Addr::new(10, 1, 3, 1))));
    assert!(!net.contains(&"::ffff:10.1.2.1".parse().unwrap()), "never across families");
    let host: IpNet = "192.0.2.7".parse().unwrap();
    assert_eq!(host.prefix_len, 32);
    let v6: IpNet = "2001:db8::/32".parse().unwrap();
    assert!(v6.contains(&"2001:db8:ffff::1".parse().unwrap()));
    assert!("0.0.0.0/0".parse::<IpNet>().unwrap().contains(&"203.0.113.9".parse().unwrap()));
    assert_eq!("10.0.0.1/24".parse::<IpNet>().unwrap().network(), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)));
    for bad in [
        "10.0.0.0/33",
        "::/129",
        "10.0.0.300",
        "10.0.0.0/",
        "10.0.0.0/-1",
        "10.0.0.0/+8",
        "10.0.0.0/08",
        "",
        "foo",
        "10.0.0/8",
        " 10.0.0.1",
    ] {
        assert!(bad.parse::<IpNet>().is_err(), "{bad} was accepted");
    }
}

#[test]
fn labels_principals_retry_conditions() {
    assert_eq!(label_key_error("app"), None);
    assert_eq!(label_key_error("istio.io/dataplane-mode"), None);
    assert_eq!(label_key_error("app.kubernetes.io/name"), None);
    assert!(label_key_error("Istio.IO/rev").is_some());
    assert!(label_key_error("a/b/c").is_some());
    assert!(label_key_error("example.com/").is_some());
    assert!(label_key_error(&"x".repeat(64)).is_some());
    assert_eq!(label_value_error(""), None);
    assert_eq!(label_value_error("v1.2_beta-3"), None);
    assert!(label_value_error("-v1").is_some());
    assert!(label_value_error("a b").is_some());
    for ok in ["*", "cluster.local/ns/default/sa/frontend", "*/sa/admin", "cluster.local/ns/prod/*"] {
        assert_eq!(wildcard_error(ok), None, "{ok}");
    }
    for bad in ["", "cluster.local/ns/*/sa/x", "**", "*a*"] {
        assert!(wildcard_error(bad).is_some(), "{bad}");
    }
    for ok in ["5xx", "gateway-error", "503", " reset", "retriable-status-codes"] {
        assert_eq!(retry_on_error(ok), None, "{ok}");
    }
    for bad in ["5xxx", "", "600", "gateway_error"] {
        assert!(retry_on_error(bad).is_some(), "{bad}");
    }
}

proptest! {
    #[test]
    fn a_formatted_duration_parses_back(n in 0u64..1_000_000, unit in 0usize..6) {
        let (suffix, nanos) = [("ns", 1u64), ("us", 1_000), ("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000), ("h", 3_600_000_000_000)][unit];
        prop_assert_eq!(parse_duration(&format!("{n}{suffix}")), Ok(Duration::from_nanos(n * nanos)));
    }

    #[test]
    fn a_fraction_of_milliseconds_is_exact(whole in 0u64..100_000, tenths in 0u64..10) {
        prop_assert_eq!(parse_duration(&format!("{whole}.{tenths}s")), Ok(Duration::from_millis(whole * 1000 + tenths * 100)));
    }

    #[test]
    fn sums_of_units_add_up(h in 0u64..100, m in 0u64..60, s in 0u64..60) {
        prop_assert_eq!(parse_duration(&format!("{h}h{m}m{s}s")), Ok(Duration::from_secs(h * 3600 + m * 60 + s)));
    }

    #[test]
    fn the_duration_parser_never_panics(text in "\\PC{0,12}") {
        let _ = parse_duration(&text);
    }

    #[test]
    fn an_ipv4_block_contains_its_addresses(addr: u32, len in 0u8..=32, other: u32) {
        let ip = Ipv4Addr::from(addr);
        let net: IpNet = format!("{ip}/{len}").parse().unwrap();
        prop_assert!(net.contains(&IpAddr::V4(ip)));
        prop_assert!(net.contains(&net.network()));
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        prop_assert_eq!(net.contains(&IpAddr::V4(Ipv4Addr::from(other))), addr & mask == other & mask);
        prop_assert_eq!(net.to_string().parse::<IpNet>().unwrap(), net);
    }

    #[test]
    fn an_ipv6_block_contains_its_addresses(addr: u128, len in 0u8..=128) {
        let ip = Ipv6Addr::from(addr);
        let net: IpNet = format!("{ip}/{len}").parse().unwrap();
        prop_assert!(net.contains(&IpAddr::V6(ip)));
        prop_assert_eq!(net.to_string().parse::<IpNet>().unwrap(), net);
    }

    #[test]
    fn a_prefix_longer_than_the_address_is_rejected(addr: u32, len in 33u16..1000) {
        let text = format!("{}/{len}", Ipv4Addr::from(addr));
        prop_assert!(text.parse::<IpNet>().is_err());
    }

    #[test]
    fn the_cidr_parser_never_panics(text in "[0-9a-f:./]{0,20}") {
        let _ = text.parse::<IpNet>();
    }
}

#[test]
fn a_problem_reads_file_object_field_reason() {
    let p = Problem::new(
        "a.yaml",
        Some("VirtualService/default/r".into()),
        "spec.hosts",
        "a VirtualService needs at least one host",
    );
    assert_eq!(p.to_string(), "a.yaml: VirtualService/default/r: spec.hosts: a VirtualService needs at least one host");
    let p = Problem::new("a.yaml", None, "", "YAML syntax error");
    assert_eq!(p.to_string(), "a.yaml: YAML syntax error");
    let report = Report(vec![p.clone(), p]);
    assert_eq!(report.to_string().lines().count(), 2);
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let found = problems(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a}
spec:
  hosts: ['*']
  http:
  - timeout: 2x
    route:
    - destination: {host: a}
      weight: -70
    - destination: {host: b}
      weight: 20
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: b}
spec:
  host: b
  hostt: typo
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c}
spec:
  rules:
  - from:
    - source:
        ipBlocks: [10.0.0.0/8, 1.2.3.4/40, nope]
",
    );
    let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.hosts[0]",
            "spec.http[0].route[0].weight",
            "spec.http[0].timeout",
            "spec.hostt",
            "spec.rules[0].from[0].source.ipBlocks[1]",
            "spec.rules[0].from[0].source.ipBlocks[2]",
        ],
        "{found:#?}"
    );
    assert!(found.iter().all(|p| p.file == "test.yaml" && p.object.is_some()));
}

#[test]
fn ambient_enrollment_and_identities() {
    let config = load_one(
        "apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop}
spec: {serviceAccountName: reviews}
---
apiVersion: v1
kind: Pod
metadata:
  name: b
  namespace: shop
  labels: {istio.io/dataplane-mode: none}
---
apiVersion: v1
kind: Pod
metadata:
  name: c
  namespace: legacy
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: e, namespace: shop}
spec: {hostNetwork: true}
",
    )
    .unwrap();
    assert!(config.namespace_is_meshed("shop"));
    assert!(!config.namespace_is_meshed("legacy"));
    assert!(!config.namespace_is_meshed("absent"));
    let meshed: Vec<&str> =
        config.pods.iter().filter(|p| config.pod_is_meshed(p)).map(|p| p.metadata.name.as_str()).collect();
    assert_eq!(meshed, ["a", "c"]);
    assert_eq!(config.pods[0].spec.service_account(), "reviews");
    assert_eq!(config.pods[3].spec.service_account(), "default");
    assert_eq!(config.spiffe_id("shop", "reviews"), "spiffe://cluster.local/ns/shop/sa/reviews");
    assert_eq!(config.root_namespace, "istio-system");
}

#[test]
fn what_real_exports_carry_is_tolerated() {
    let config = load_one(
        r#"{"apiVersion": "v1", "kind": "Service",
  "metadata": {"name": "reviews", "namespace": "shop", "uid": "1", "resourceVersion": "2",
               "managedFields": [{"manager": "kubectl"}], "labels": null, "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
  "spec": {"ports": [{"port": 9080, "targetPort": "http"}], "selector": {"app": "reviews"}, "sessionAffinity": "None",
           "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster"},
  "status": {"loadBalancer": {}}}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: knative}
spec: {template: {}}
---
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  labels:
spec:
  hosts: [reviews]
  gateways:
  http:
  tcp: [{route: [{destination: {host: reviews}}]}]
status: {}
"#,
    )
    .unwrap();
    assert_eq!(config.services.len(), 1);
    assert_eq!(config.virtual_services.len(), 1);
    assert_eq!(config.ignored, ["Service/knative (serving.knative.dev/v1) in test.yaml: kind not served by this mesh"]);
    assert_eq!(config.ignored_kinds(), ["Service"]);
}

#[test]
fn duplicates_in_one_file_and_across_files() {
    let doc = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";
    let report = load(&[Source::new("a.yaml", format!("{doc}---\n{doc}")), Source::new("b.yaml", doc)]).unwrap_err();
    let lines: Vec<String> = report.0.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "a.yaml: PeerAuthentication/istio-system/default: metadata.name: duplicate object: PeerAuthentication/istio-system/default is already defined earlier in the same file",
            "b.yaml: PeerAuthentication/istio-system/default: metadata.name: duplicate object: PeerAuthentication/istio-system/default is already defined in a.yaml",
        ]
    );
}

#[test]
fn a_broken_destination_rule_does_not_also_break_its_routes() {
    let found = problems(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: shop}
spec:
  host: reviews
  subsets:
  - name: v1
    labelz: {version: v1}
",
    );
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].field, "spec.subsets[0].labelz");
}

#[test]
fn subsets_resolve_short_names_and_wildcards() {
    let config = load_one(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [reviews, api.example.com]
  http:
  - route:
    - destination: {host: reviews.shop.svc.cluster.local, subset: v1}
      weight: 50
    - destination: {host: api.example.com, subset: eu}
      weight: 50
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: all-example, namespace: shop}
spec:
  host: '*.example.com'
  subsets: [{name: eu, labels: {region: eu}}]
",
    );
    assert!(config.as_ref().is_ok_and(|c| c.warnings.is_empty()), "{config:#?}");
    // A short name resolves in the VirtualService's namespace, not in another one. A
    // reference Istio cannot resolve is a warning, not an error: the config is served.
    let found = warnings(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: other}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v1}]
",
    );
    assert!(found[0].reason.contains("no DestinationRule for host `reviews.other.svc.cluster.local`"), "{found:#?}");
}

#[test]
fn other_kinds_are_checked_too() {
    let found = problems(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se}
spec:
  hosts: ['*']
  addresses: [10.0.0.0/40]
  ports: [{number: 0, name: http, protocol: HTTPX}]
  resolution: STATIC
  endpoints: [{address: db.example.com}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  rules:
  - matches: [{method: {type: Prefix}}]
    backendRefs: [{name: svc}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt}
spec:
  jwtRules:
  - issuer: ''
    jwksUri: ftp://keys
    timeout: 5y
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm}
spec:
  ports: {http: 70000}
",
    );
    let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.hosts[0]",
            "spec.addresses[0]",
            "spec.ports[0].number",
            "spec.ports[0].protocol",
            "spec.endpoints[0].address",
            "spec.rules[0].matches[0].method.type",
            "spec.rules[0].matches[0].method",
            "spec.rules[0].backendRefs[0].port",
            "spec.jwtRules[0].jwksUri",
            "spec.jwtRules[0].timeout",
            "spec.address",
            "spec.ports[\"http\"]",
        ],
        "{found:#?}"
    );
}

#[test]
fn api_versions_and_kinds() {
    for api_version in ["networking.istio.io/v1alpha3", "networking.istio.io/v1beta1", "networking.istio.io/v1"] {
        let text =
            format!("apiVersion: {api_version}\nkind: DestinationRule\nmetadata: {{name: r}}\nspec: {{host: r}}\n");
        assert!(load_one(&text).is_ok(), "{api_version}");
    }
    let found =
        problems("apiVersion: networking.istio.io/v2\nkind: DestinationRule\nmetadata: {name: r}\nspec: {host: r}\n");
    assert_eq!(found[0].field, "apiVersion");
    assert!(found[0].reason.contains("`networking.istio.io/v2`"));
    let found = problems("just a string\n");
    assert_eq!(
        found[0].to_string(),
        "test.yaml: document 1 is not a Kubernetes object (a mapping with apiVersion and kind)"
    );
}

#[test]
fn a_kind_in_the_wrong_istio_group_is_an_error() {
    let found =
        problems("apiVersion: networking.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {}\n");
    assert_eq!(found[0].field, "apiVersion");
    assert!(found[0].reason.contains("supported: security.istio.io/v1beta1, security.istio.io/v1"), "{found:#?}");
    let found = problems("apiVersion: v1\nkind: VirtualService\nmetadata: {name: p}\nspec: {hosts: [p]}\n");
    assert_eq!(found[0].field, "apiVersion");
}

#[test]
fn port_level_mtls_keys_are_integers_or_strings() {
    // `kubectl get -o yaml` and the Kubernetes API write the keys as strings.
    for key in ["8080", "\"8080\"", "'8080'"] {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: shop}}\n\
             spec:\n  selector: {{matchLabels: {{app: echo}}}}\n  portLevelMtls:\n    {key}: {{mode: DISABLE}}\n"
        );
        let config = load_one(&text).unwrap_or_else(|r| panic!("{key}: {r}"));
        let ports: Vec<u32> = config.peer_authentications[0].spec.port_level_mtls.keys().copied().collect();
        assert_eq!(ports, [8080], "{key}");
    }
    let json = r#"{"apiVersion":"security.istio.io/v1","kind":"PeerAuthentication","metadata":{"name":"p"},
        "spec":{"selector":{"matchLabels":{"app":"echo"}},"portLevelMtls":{"8080":{"mode":"DISABLE"}}}}"#;
    assert!(load_one(json).is_ok());
}

#[test]
fn service_entry_selectors_take_labels() {
    let se = |selector: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se}}\nspec:\n  hosts: [api.internal]\n  \
             location: MESH_INTERNAL\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  workloadSelector: {selector}\n"
        )
    };
    let config = load_one(&se("{labels: {app: vm}}")).unwrap();
    let selector = config.service_entries[0].spec.workload_selector.as_ref().unwrap();
    assert_eq!(selector.labels.get("app").map(String::as_str), Some("vm"));
    let wrong = problems(&se("{matchLabels: {app: vm}}"));
    assert_eq!(wrong[0].field, "spec.workloadSelector.matchLabels", "{wrong:?}");
}

#[test]
fn weights_are_relative_and_delegates_have_no_hosts() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r]\n  http:\n  \
              - route:\n    - {destination: {host: a}, weight: 1}\n    - {destination: {host: b}, weight: 3}\n";
    assert!(load_one(vs).is_ok());
    let delegate = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: d}\nspec:\n  http:\n  \
                    - route:\n    - destination: {host: a}\n";
    assert!(load_one(delegate).is_ok());
}

#[test]
fn jwks_uri_alone_and_the_newer_when_keys() {
    let ra = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: j}\nspec:\n  jwtRules:\n  \
              - jwksUri: https://example.com/.well-known/jwks.json\n";
    assert!(load_one(ra).is_ok());
    let ap = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  rules:\n  - when:\n    \
              - {key: source.serviceAccount, values: [default/sleep]}\n    - {key: source.trustDomain, values: [cluster.local]}\n";
    assert!(load_one(ap).is_ok());
}

#[test]
fn plain_scalars_read_as_kubectl_reads_them() {
    // kubectl (sigs.k8s.io/yaml) reads these plain scalars as strings.
    let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec:\n  hosts: [a.example]\n  \
              addresses: [1.2.3.4, 2001:db8::, 001:db8::, 10.0.0.0/8]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  \
              endpoints: [{address: 1.2.3.4}]\n";
    let config = load_one(se).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.service_entries[0].spec.addresses, ["1.2.3.4", "2001:db8::", "001:db8::", "10.0.0.0/8"]);
}

#[test]
fn every_decoding_problem_of_an_object_in_one_run() {
    let found = problems(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r}
spec:
  hosts: [r, ~]
  http:
  - match:
    - headers: {x-user: {exactt: bob}}
    route:
    - destination: {host: a, port: {number: http}}
    - destination: {host: b}
      weight: many
    timeoutt: 2s
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: p}
spec:
  selector: {matchLabels: {app: a}}
  portLevelMtls:
    \"80\": {mode: STRIKT}
    \"81\": DISABLE
",
    );
    let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.hosts[1]",
            "spec.http[0].match[0].headers[\"x-user\"].exactt",
            "spec.http[0].route[0].destination.port.number",
            "spec.http[0].route[1].weight",
            "spec.http[0].timeoutt",
            "spec.portLevelMtls[\"80\"].mode",
            "spec.portLevelMtls[\"81\"]",
        ],
        "{found:#?}"
    );
    // `null`, not serde's "unit value".
    assert!(found[0].reason.starts_with("invalid type: null, expected a string"), "{found:#?}");
    // The first problem of an object carries its line (when the text fails there too:
    // read as text, serde_yaml would take `~` for the string "~").
    assert!(found[5].reason.ends_with("(line 21)"), "{found:#?}");
    assert!(found[6].reason.starts_with("invalid type: string \"DISABLE\", expected a mapping"), "{found:#?}");
}

#[test]
fn an_empty_name_reads_as_quotes() {
    let found = problems("apiVersion: v1\nkind: Namespace\nmetadata: {name: ''}\n");
    assert_eq!(found[0].object.as_deref(), Some("Namespace/\"\""), "{found:#?}");
}

#[test]
fn a_number_where_a_string_belongs_is_rejected_as_the_api_server_does() {
    // kubectl sends `123` as a number; a CRD's `type: string` rejects it.
    let found = problems(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r]\n  \
         http:\n  - timeout: 10\n    route: [{destination: {host: r}}]\n",
    );
    assert_eq!(found[0].field, "spec.http[0].timeout", "{found:#?}");
    assert!(found[0].reason.starts_with("invalid type: integer `10`, expected a string"), "{found:#?}");
}

#[test]
fn kinds_not_served_are_named_not_checked_with_their_group() {
    let config = load_one(
        "apiVersion: networking.istio.io/v1alpha3\nkind: Sidecar\nmetadata: {name: a}\nspec: {}\n---\n\
         apiVersion: networking.istio.io/v1alpha3\nkind: Sidecar\nmetadata: {name: b}\nspec: {}\n---\n\
         apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: w}\nspec: {}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec:\n  selector: {istio: ingressgateway}\n  \
         servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]\n",
    )
    .unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.not_checked_summary(), "2 Sidecar (networking.istio.io), 1 WasmPlugin (extensions.istio.io)");
    // Istio's Gateway is checked (and told from Gateway API's by its group).
    assert_eq!((config.istio_gateways.len(), config.gateways.len()), (1, 0));
}

#[test]
fn fields_not_enforced_are_accepted_with_a_warning_and_aliases_read() {
    let found = warnings(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r}
spec:
  host: reviews
  subsets:
  - name: v1
    trafficPolicy: {retryBudget: {percent: {value: 20}}, connectionPool: {tcp: {maxConnections: 10}}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: j}
spec:
  jwtRules:
  - jwks_uri: https://example.com/jwks.json
    spaceDelimitedClaims: [scope]
",
    );
    let fields: Vec<&str> = found.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(fields, ["spec.subsets[0].trafficPolicy.retryBudget", "spec.jwtRules[0].spaceDelimitedClaims"]);
    assert!(found.iter().all(|w| w.reason.contains("not enforced")), "{found:#?}");
}

/// The objects of a configuration written back as manifests (the Istio kinds the
/// generator below produces).
fn written_back(config: &Config) -> String {
    let mut docs = Vec::new();
    for vs in &config.virtual_services {
        let mut doc = serde_json::to_value(vs).unwrap();
        doc["apiVersion"] = "networking.istio.io/v1".into();
        doc["kind"] = "VirtualService".into();
        docs.push(serde_yaml::to_string(&doc).unwrap());
    }
    for pa in &config.peer_authentications {
        let mut doc = serde_json::to_value(pa).unwrap();
        doc["apiVersion"] = "security.istio.io/v1".into();
        doc["kind"] = "PeerAuthentication".into();
        docs.push(serde_yaml::to_string(&doc).unwrap());
    }
    docs.join("---\n")
}

proptest! {
    /// Whatever the model accepts of these generated manifests, written back as YAML,
    /// is accepted again and means the same (weights, hosts, ports as keys, strings
    /// that look like numbers or addresses).
    #[test]
    fn accepted_manifests_round_trip_through_yaml(
        hosts in proptest::collection::vec("[a-c]{1,3}(\\.[a-c]{1,2})?|\\*\\.[a-c]{1,2}", 1..3),
        weights in proptest::collection::vec(-1i64..1000, 1..4),
        timeout in "[0-9]{1,3}(ms|s)|0",
        header in "[0-9:.a-f]{1,8}",
        ports in proptest::collection::btree_map(0u32..70000, 0usize..4, 0..3),
    ) {
        let mut routes = String::new();
        for (i, w) in weights.iter().enumerate() {
            let _ = writeln!(routes, "    - destination: {{host: svc{i}}}\n      weight: {w}");
        }
        let modes = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];
        let mut port_lines = String::new();
        for (p, m) in &ports {
            let _ = writeln!(port_lines, "    \"{p}\": {{mode: {}}}", modes[*m]);
        }
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: {hosts:?}\n  \
             gateways: [istio-system/gw]\n  http:\n  - match: [{{headers: {{x-id: {{exact: '{header}'}}}}}}]\n    timeout: {timeout}\n    \
             route:\n{routes}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p}}\nspec:\n  \
             selector: {{matchLabels: {{app: a}}}}\n  portLevelMtls:\n{port_lines}"
        );
        if let Ok(first) = load_one(&text) {
            let yaml = written_back(&first);
            let again = load(&[Source::new("again.yaml", yaml.clone())]);
            prop_assert!(again.is_ok(), "{text}\nwritten back as\n{yaml}\nrejected: {}", again.unwrap_err());
            let again = again.unwrap();
            prop_assert_eq!(&again.virtual_services, &first.virtual_services);
            prop_assert_eq!(&again.peer_authentications, &first.peer_authentications);
        }
    }
}

const LOCAL_RATE_LIMIT: &str = "apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: rl, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_INBOUND
      listener: {filterChain: {filter: {name: envoy.filters.network.http_connection_manager}}}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          '@type': type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value:
            stat_prefix: http_local_rate_limiter
            token_bucket: {max_tokens: 4, tokens_per_fill: 4, fill_interval: 60s}
            filter_enabled: {runtime_key: e, default_value: {numerator: 100, denominator: HUNDRED}}
            filter_enforced: {runtime_key: f, default_value: {numerator: 100, denominator: HUNDRED}}
";

#[test]
fn the_local_rate_limit_envoy_filter_loads_with_its_typed_view() {
    let config = load_one(LOCAL_RATE_LIMIT).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.envoy_filters.len(), 1);
    assert!(config.ignored.is_empty(), "{:?}", config.ignored);
    let limit = config.envoy_filters[0].local_rate_limit().expect("validated");
    let bucket = limit.filter.expect("filter-wide bucket");
    assert_eq!((bucket.max_tokens, bucket.tokens_per_fill), (4, 4));
    assert_eq!(bucket.fill_interval, std::time::Duration::from_mins(1));
    assert_eq!(limit.scope.target_refs, vec![("Gateway".to_string(), "waypoint".to_string())]);
    // Lossless through the JSON the controller ships.
    let json = serde_json::to_string(&config).expect("serializes");
    let back: Config = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back.envoy_filters, config.envoy_filters);
}

#[test]
fn other_envoy_filters_are_rejected_naming_the_field_and_value() {
    let lua = LOCAL_RATE_LIMIT.replace("name: envoy.filters.http.local_ratelimit", "name: envoy.filters.http.lua");
    let found = problems(&lua);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].object.as_deref(), Some("EnvoyFilter/shop/rl"));
    assert_eq!(found[0].field, "spec.configPatches[0].patch.value.name");
    assert!(found[0].reason.starts_with("\"envoy.filters.http.lua\": only the local rate limit filter is supported"));

    let v1 = LOCAL_RATE_LIMIT.replace("v1alpha3", "v1");
    assert!(problems(&v1)[0].reason.contains("supported: networking.istio.io/v1alpha3"));

    let no_patches = "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: e}\nspec: {}\n";
    let found = problems(no_patches);
    assert_eq!(
        (found[0].field.as_str(), found[0].reason.as_str()),
        ("spec.configPatches", "required field is missing")
    );
}

#[test]
fn a_service_entry_for_a_waypoint_needs_addresses() {
    let entry = |addresses: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: egress, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [api.example.com]
  {addresses}
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: DNS
"
        )
    };
    let found = warnings(&entry(""));
    assert_eq!(found.iter().map(|p| p.field.as_str()).collect::<Vec<_>>(), ["spec.addresses"], "{found:#?}");
    assert!(found[0].reason.contains("around the waypoint"), "{found:#?}");
    assert!(warnings(&entry("addresses: [240.0.0.1]")).is_empty());
    // Opted out of waypoints: a client's own resolution is what it asked for.
    assert!(warnings(&entry("").replace("use-waypoint: waypoint", "use-waypoint: none")).is_empty());
}
