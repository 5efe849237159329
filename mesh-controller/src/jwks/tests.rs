//! A plain hyper server on loopback plays the identity provider.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{Response, service::service_fn};
use mesh_common::config::{
    meta::ObjectMeta,
    security::{JwtRule, RequestAuthentication, RequestAuthenticationSpec},
};
use tokio::net::TcpListener;

use super::*;
use crate::ca::Ca;

const KEYS: &str = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

/// What the test server answers; `None` never answers.
type Answer = Arc<Mutex<Option<(StatusCode, String)>>>;

async fn server(answer: Answer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let answer = answer.lock().unwrap().clone();
                    async move {
                        let Some((status, body)) = answer else {
                            std::future::pending::<()>().await;
                            unreachable!()
                        };
                        Ok::<_, Infallible>(
                            Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap(),
                        )
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

fn answer(status: StatusCode, body: &str) -> Answer {
    Arc::new(Mutex::new(Some((status, body.to_owned()))))
}

fn policy(name: &str, rules: Vec<JwtRule>) -> RequestAuthentication {
    RequestAuthentication {
        metadata: ObjectMeta { name: name.into(), namespace: "shop".into(), ..ObjectMeta::default() },
        spec: RequestAuthenticationSpec { jwt_rules: rules, ..RequestAuthenticationSpec::default() },
    }
}

fn fetching(uri: &str, timeout: Option<&str>) -> JwtRule {
    JwtRule {
        issuer: "https://issuer.example".into(),
        jwks_uri: Some(uri.into()),
        timeout: timeout.map(Into::into),
        ..JwtRule::default()
    }
}

#[test]
fn wanted_uris_and_timeouts() {
    let mut inline_wins = fetching("http://c/keys", None);
    inline_wins.jwks = Some(KEYS.into());
    let config = Config {
        request_authentications: vec![
            policy("a", vec![fetching("http://a/keys", Some("2s")), inline_wins]),
            policy("b", vec![fetching("http://a/keys", Some("7s")), fetching("http://b/keys", Some("bogus"))]),
        ],
        ..Config::default()
    };
    let wanted = wanted(&config);
    assert_eq!(
        wanted.into_iter().collect::<Vec<_>>(),
        [("http://a/keys".to_owned(), Duration::from_secs(7)), ("http://b/keys".to_owned(), DEFAULT_TIMEOUT)]
    );
}

#[test]
fn inline_writes_keys_and_warns_on_failures() {
    let mut config = Config {
        request_authentications: vec![policy(
            "p",
            vec![
                fetching("http://ok/keys", None),
                fetching("http://stale/keys", None),
                fetching("http://never/keys", None),
                fetching("http://unknown/keys", None),
            ],
        )],
        ..Config::default()
    };
    let cache = Cache::from([
        ("http://ok/keys".into(), Entry { keys: Some(KEYS.into()), fetched_at: Some(1), error: None }),
        (
            "http://stale/keys".into(),
            Entry { keys: Some("old".into()), fetched_at: Some(1), error: Some("down".into()) },
        ),
        ("http://never/keys".into(), Entry { keys: None, fetched_at: None, error: Some("refused".into()) }),
    ]);
    inline(&mut config, &cache);
    let rules = &config.request_authentications[0].spec.jwt_rules;
    assert_eq!(rules[0].jwks.as_deref(), Some(KEYS));
    assert_eq!(rules[0].jwks_uri, None, "replaced by the keys");
    assert_eq!(rules[1].jwks.as_deref(), Some("old"));
    assert_eq!(rules[2].jwks, None);
    assert_eq!(rules[2].jwks_uri.as_deref(), Some("http://never/keys"));
    assert_eq!(rules[3].jwks, None, "not fetched yet: no keys, no warning");
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "RequestAuthentication/shop/p: spec.jwtRules[1].jwksUri: down; the last good keys stay in force",
            "RequestAuthentication/shop/p: spec.jwtRules[2].jwksUri: refused; no keys yet: waypoints refuse this issuer's \
         tokens",
        ]
    );
}

#[tokio::test]
async fn fetch_answers_and_failures() {
    let tls = connector();
    let ok = server(answer(StatusCode::OK, KEYS)).await;
    assert_eq!(fetch(&format!("http://{ok}/jwks"), DEFAULT_TIMEOUT, &tls).await.unwrap(), KEYS);

    let missing = server(answer(StatusCode::NOT_FOUND, "no")).await;
    let error = fetch(&format!("http://{missing}/jwks"), DEFAULT_TIMEOUT, &tls).await.unwrap_err();
    assert!(matches!(error, FetchError::Status { status: StatusCode::NOT_FOUND, .. }), "{error}");

    let html = server(answer(StatusCode::OK, "<html>")).await;
    let error = fetch(&format!("http://{html}/jwks"), DEFAULT_TIMEOUT, &tls).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("jwksUri \"http://{html}/jwks\": the answer is not a key set (a JSON object with a \"keys\" array)")
    );

    let silent = server(Arc::new(Mutex::new(None))).await;
    let error = fetch(&format!("http://{silent}/jwks"), Duration::from_millis(200), &tls).await.unwrap_err();
    assert!(matches!(error, FetchError::Timeout { .. }), "{error}");

    // A port nobody listens on (bound, then closed).
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let error = fetch(&format!("http://{closed}/jwks"), DEFAULT_TIMEOUT, &tls).await.unwrap_err();
    assert!(matches!(error, FetchError::Connect { .. }), "{error}");

    for bad in ["ftp://x/keys", "/keys", "not a uri"] {
        let error = fetch(bad, DEFAULT_TIMEOUT, &tls).await.unwrap_err();
        assert!(matches!(error, FetchError::BadUri { .. }), "{bad}: {error}");
    }
}

#[tokio::test]
async fn controller_pushes_fetched_keys_and_keeps_them_when_unreachable() {
    let served = answer(StatusCode::OK, KEYS);
    let addr = server(served.clone()).await;
    let uri = format!("http://{addr}/jwks");
    let config = Config { request_authentications: vec![policy("p", vec![fetching(&uri, None)])], ..Config::default() };
    let dir = std::env::temp_dir().join(format!("mesh-jwks-ca-{}", std::process::id()));
    let ca = Ca::load_or_create(&dir, "cluster.local").unwrap();
    let controller = Controller::new(config, ca, Duration::from_hours(1), Vec::new());
    let key = "RequestAuthentication/shop/p";
    let pushed = |c: &Controller| c.current().objects[key]["spec"]["jwtRules"][0].get("jwks").cloned();
    assert_eq!(pushed(&controller), None, "nothing fetched yet");
    let tls = connector();

    // First fetch (a configuration change): the keys travel inline in a new version.
    let first = controller.current().version;
    let cache = refresh(&controller.jwks(), &controller.jwks_wanted(), false, &tls).await;
    assert_eq!(controller.set_jwks(cache), Some(first + 1));
    assert_eq!(pushed(&controller), Some(serde_json::json!(KEYS)));
    assert_eq!(controller.current().objects[key]["spec"]["jwtRules"][0].get("jwksUri"), None);
    // Nothing new to fetch on the next change.
    let cache = refresh(&controller.jwks(), &controller.jwks_wanted(), false, &tls).await;
    assert_eq!(controller.set_jwks(cache), None);

    // The provider fails: the periodic refresh keeps the last good keys and reports.
    *served.lock().unwrap() = Some((StatusCode::SERVICE_UNAVAILABLE, String::new()));
    let cache = refresh(&controller.jwks(), &controller.jwks_wanted(), true, &tls).await;
    assert_eq!(cache[&uri].keys.as_deref(), Some(KEYS));
    assert!(cache[&uri].error.as_deref().unwrap().contains("503"), "{cache:?}");
    controller.set_jwks(cache);
    assert_eq!(pushed(&controller), Some(serde_json::json!(KEYS)));
    let status = controller.status();
    assert!(status["jwks"][&uri]["error"].as_str().unwrap().contains("503 Service Unavailable"), "{status}");
    assert_eq!(status["jwks"][&uri]["keys"], KEYS);

    // A changed key set is a new version.
    let rotated = KEYS.replace("11qY", "22qY");
    *served.lock().unwrap() = Some((StatusCode::OK, rotated.clone()));
    let before = controller.current().version;
    let cache = refresh(&controller.jwks(), &controller.jwks_wanted(), true, &tls).await;
    assert_eq!(controller.set_jwks(cache), Some(before + 1));
    assert_eq!(pushed(&controller), Some(serde_json::json!(rotated)));
    assert_eq!(controller.status()["jwks"][&uri]["error"], serde_json::Value::Null);

    // The rule goes away: its URI is forgotten.
    controller.apply(Config::default());
    assert!(controller.jwks_wanted().is_empty());
    assert!(refresh(&controller.jwks(), &controller.jwks_wanted(), true, &tls).await.is_empty());
    let _ = std::fs::remove_dir_all(dir);
}
