//! The L7 features the waypoint bench prices, each bound to a Service of its own (its
//! own VIP) so that every leg exists at once and a leg is only a different address:
//!
//! - `bench-authz`: an ALLOW `AuthorizationPolicy` of a few rules (methods, paths,
//!   principals, namespaces) whose last rule the bench's `POST /echo` matches, and a
//!   DENY it does not match, so every request is evaluated against both;
//! - `bench-jwt`: a `RequestAuthentication` (RS256, an inline JWKS made here) and an
//!   ALLOW requiring a request principal; every request carries the bearer token;
//! - `bench-trace`: a `Telemetry` with 100 % sampling to an OpenTelemetry provider, a
//!   sink in the server pod that accepts OTLP/HTTP, counts the spans and discards them.
//!
//! [`Features::prepare`] writes the config, starts the sink and checks that each
//! feature really applies before anything is measured.
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_lab::{Lab, wait_for};

use super::{CLIENT, SERVER};

pub const AUTHZ_VIP: &str = "10.96.0.42";
pub const JWT_VIP: &str = "10.96.0.43";
pub const TRACING_VIP: &str = "10.96.0.44";
const OTLP_VIP: &str = "10.96.0.45";
const OTLP_PORT: u16 = 4318;
/// The sink's process name in the lab (its log is `<name>.log`).
const SINK: &str = "bench-otlp";

/// Makes an RSA key with `cryptography` and a token with `pyjwt` (both installed by
/// `cargo xtask setup`): prints `{"jwks": "<JWKS JSON>", "token": "<JWT>"}`. The token
/// lives a day, longer than any bench run.
const TOKEN: &str = "\
import json, time, jwt
from cryptography.hazmat.primitives.asymmetric import rsa
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
jwk.update(kid='bench', alg='RS256', use='sig')
now = int(time.time())
claims = dict(iss='https://issuer.bench', sub='bench-client', aud='bench', iat=now, exp=now + 86400)
token = jwt.encode(claims, key, algorithm='RS256', headers={'kid': 'bench'})
print(json.dumps({'jwks': json.dumps({'keys': [jwk]}), 'token': token}))
";

/// An OTLP/HTTP sink on OpenTelemetry's protocol definitions (`opentelemetry-proto`):
/// decodes each export request, prints `spans N`, answers an empty success.
const OTLP_SINK: &str = "\
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
ANSWER = ExportTraceServiceResponse().SerializeToString()
class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers['content-length'])))
        spans = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        print(f'spans {spans}', flush=True)
        self.send_response(200)
        self.send_header('content-type', 'application/x-protobuf')
        self.send_header('content-length', str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(('0.0.0.0', 4318), Sink).serve_forever()
";

/// The client pod's SPIFFE principal as `AuthorizationPolicy` writes it.
fn client_principal() -> String {
    format!("cluster.local/ns/shop/sa/sa-{CLIENT}")
}

/// A Service of namespace `shop` in front of the server pod's `target_port` alone;
/// `opt_out` labels it `istio.io/use-waypoint: none`.
pub fn service(name: &str, vip: &str, port: u16, target_port: u16, opt_out: bool) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n{}spec:\n  clusterIP: {vip}\n  \
         selector:\n    statefulset.kubernetes.io/pod-name: {SERVER}\n  ports:\n  - name: http\n    port: {port}\n    \
         targetPort: {target_port}\n",
        if opt_out { "  labels:\n    istio.io/use-waypoint: none\n" } else { "" }
    )
}

/// The policies of the authz leg. The ALLOW's rules are tried in turn and only the
/// last matches the bench's requests (`POST /echo` from the client pod).
fn authz_policies() -> String {
    let principal = client_principal();
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: bench-authz-deny, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: bench-authz}}]
  action: DENY
  rules:
  - to: [{{operation: {{paths: ['/admin*', '/internal/*']}}}}]
  - from: [{{source: {{notNamespaces: [shop]}}}}]
    to: [{{operation: {{methods: [DELETE, PUT, PATCH]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: bench-authz-allow, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: bench-authz}}]
  action: ALLOW
  rules:
  - from: [{{source: {{namespaces: [shop, monitoring]}}}}]
    to: [{{operation: {{methods: [GET, HEAD], paths: ['/healthz', '/status/*']}}}}]
  - from: [{{source: {{principals: ['cluster.local/ns/ops/sa/admin']}}}}]
    to: [{{operation: {{paths: ['/debug/*']}}}}]
  - from: [{{source: {{principals: ['{principal}'], namespaces: [shop]}}}}]
    to: [{{operation: {{methods: [POST], paths: ['/echo', '/api/v1/*']}}}}]
"
    )
}

/// The JWT leg's `RequestAuthentication` with the inline `jwks`, and the ALLOW that
/// requires a request principal.
fn jwt_policies(jwks: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: bench-jwt, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: bench-jwt}}]
  jwtRules:
  - issuer: https://issuer.bench
    audiences: [bench]
    jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: bench-jwt-require, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: bench-jwt}}]
  action: ALLOW
  rules:
  - from: [{{source: {{requestPrincipals: ['*']}}}}]
"
    )
}

/// The tracing leg: the mesh config's OpenTelemetry provider (the sink, behind a
/// Service that bypasses the waypoint) and a `Telemetry` bound to `bench-trace` only.
fn tracing_config() -> String {
    format!(
        "apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    extensionProviders:
    - name: bench-otel
      opentelemetry:
        service: bench-otel.shop.svc.cluster.local
        port: {OTLP_PORT}
        http: {{path: /v1/traces}}
---
{}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: bench-trace, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: bench-trace}}]
  tracing:
  - providers: [{{name: bench-otel}}]
    randomSamplingPercentage: 100
",
        service("bench-otel", OTLP_VIP, OTLP_PORT, OTLP_PORT, true)
    )
}

/// What the feature legs need while measuring.
pub struct Features {
    /// `Authorization: Bearer ...` for the JWT leg.
    pub bearer: String,
}

/// The HTTP status of one request with curl from the client pod (`-H` for each
/// header; a 1 KiB body for `POST`), or what went wrong.
fn status(lab: &Lab, method: &str, url: &str, headers: &[&str]) -> String {
    let mut argv = vec!["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "-X", method];
    for header in headers {
        argv.extend_from_slice(&["-H", header]);
    }
    let body = "z".repeat(1024);
    if method == "POST" {
        argv.extend_from_slice(&["--data-binary", &body]);
    }
    argv.push(url);
    match lab.exec(CLIENT, &argv) {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Err(e) => format!("{e:#}"),
    }
}

/// Spans the sink has received so far.
pub fn spans_received(lab: &Lab) -> u64 {
    lab.log_of(SINK).lines().filter_map(|l| l.strip_prefix("spans ")?.trim().parse::<u64>().ok()).sum()
}

/// The last lines of the waypoint's log, for an error message.
fn waypoint_log(lab: &Lab) -> String {
    let log = lab.log_of("waypoint");
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Features {
    /// Makes the key and token, starts the OTLP sink, writes the features' config and
    /// waits until each applies: the authz leg refuses a request its ALLOW does not
    /// name and one its DENY names, the JWT leg refuses a request without a token (403)
    /// and with a bad one (401) but takes the bench's, and the tracing leg's requests
    /// reach the sink as spans. Needs both pods enrolled and the Services declared.
    pub fn prepare(lab: &Lab) -> anyhow::Result<Self> {
        let out = lab.exec(CLIENT, &["python3", "-c", TOKEN])?;
        let made: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("making the JWT: {}", String::from_utf8_lossy(&out.stderr).trim()))?;
        let (Some(jwks), Some(token)) = (made["jwks"].as_str(), made["token"].as_str()) else {
            bail!("making the JWT: no jwks or token in {made}");
        };
        lab.spawn_in(SERVER, SINK, &["python3", "-c", OTLP_SINK])?;
        wait_for(Duration::from_secs(10), || {
            lab.exec(SERVER, &["ss", "-ltn"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(":{OTLP_PORT}")))
        })
        .with_context(|| format!("the OTLP sink does not listen: {}", lab.log_of(SINK)))?;
        let config = [authz_policies(), jwt_policies(jwks), tracing_config()].join("---\n");
        std::fs::write(lab.config_dir().join("bench-l7-features.yaml"), config)?;
        let bearer = format!("Authorization: Bearer {token}");

        // Authz: applied once a request no ALLOW rule names is refused.
        let url = |vip: &str, path: &str| format!("http://{vip}{path}");
        wait_for(Duration::from_secs(20), || status(lab, "GET", &url(AUTHZ_VIP, "/"), &[]) == "403").with_context(
            || {
                format!(
                    "the authz leg's ALLOW does not apply: GET http://{AUTHZ_VIP}/ answered {}; waypoint log:\n{}",
                    status(lab, "GET", &url(AUTHZ_VIP, "/"), &[]),
                    waypoint_log(lab)
                )
            },
        )?;
        for (method, path, expected, why) in [
            ("POST", "/echo", "200", "the bench's request"),
            ("POST", "/admin/echo", "403", "a path the DENY names"),
            ("GET", "/echo", "403", "a method the ALLOW does not name"),
        ] {
            let got = status(lab, method, &url(AUTHZ_VIP, path), &[]);
            if got != expected {
                bail!(
                    "authz leg: {method} {path} ({why}) answered {got}, not {expected}; waypoint log:\n{}",
                    waypoint_log(lab)
                );
            }
        }

        // JWT: applied once a request without a token is refused.
        wait_for(Duration::from_secs(20), || status(lab, "POST", &url(JWT_VIP, "/echo"), &[]) == "403").with_context(
            || {
                format!(
                    "the JWT leg's policy does not apply: POST http://{JWT_VIP}/echo without a token answered {}; \
                     waypoint log:\n{}",
                    status(lab, "POST", &url(JWT_VIP, "/echo"), &[]),
                    waypoint_log(lab)
                )
            },
        )?;
        let forged = format!("{}x", bearer.trim_end_matches(|c: char| c != '.'));
        for (header, expected, why) in
            [(bearer.as_str(), "200", "the bench's token"), (forged.as_str(), "401", "a token with a bad signature")]
        {
            let got = status(lab, "POST", &url(JWT_VIP, "/echo"), &[header]);
            if got != expected {
                bail!(
                    "JWT leg: POST /echo with {why} answered {got}, not {expected}; waypoint log:\n{}",
                    waypoint_log(lab)
                );
            }
        }

        // Tracing: applied once the leg's requests come back as spans.
        let before = spans_received(lab);
        wait_for(Duration::from_secs(20), || {
            status(lab, "POST", &url(TRACING_VIP, "/echo"), &[]) == "200" && {
                std::thread::sleep(Duration::from_millis(200));
                spans_received(lab) > before
            }
        })
        .with_context(|| {
            format!(
                "the tracing leg exports no spans: the sink got {} in 20 s; sink log:\n{}\nwaypoint log:\n{}",
                spans_received(lab) - before,
                lab.log_of(SINK),
                waypoint_log(lab)
            )
        })?;
        // The other legs must not trace.
        std::thread::sleep(Duration::from_millis(1500));
        let before = spans_received(lab);
        for vip in [super::WAYPOINT_VIP, AUTHZ_VIP] {
            status(lab, "POST", &url(vip, "/echo"), &[]);
        }
        std::thread::sleep(Duration::from_millis(1500));
        if spans_received(lab) != before {
            bail!("requests to the plain waypoint and authz legs were traced too");
        }
        println!(
            "==> L7 features apply: authz ({AUTHZ_VIP}) refuses what its policies do not allow, JWT ({JWT_VIP}) \
             refuses no token (403) and a bad one (401), tracing ({TRACING_VIP}) exports spans to the OTLP sink"
        );
        Ok(Self { bearer })
    }
}
