//! A plain hyper server on loopback plays the identity provider.
use std::{
    collections::BTreeMap,
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
        [
            ("http://a/keys".to_owned(), Want { timeout: Duration::from_secs(7), discover: false }),
            ("http://b/keys".to_owned(), Want { timeout: DEFAULT_TIMEOUT, discover: false })
        ]
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
        ("http://ok/keys".into(), Entry { keys: Some(KEYS.into()), fetched_at: Some(1), ..Entry::default() }),
        (
            "http://stale/keys".into(),
            Entry { keys: Some("old".into()), fetched_at: Some(1), error: Some("down".into()), jwks_uri: None },
        ),
        ("http://never/keys".into(), Entry { error: Some("refused".into()), ..Entry::default() }),
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
        format!("GET \"http://{html}/jwks\": the answer is not a key set (a JSON object with a \"keys\" array)")
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
    let cache = refresh(&controller.jwks(), &controller.jwks_wanted(), Due::New, &tls).await;
    assert_eq!(controller.set_jwks(cache), Some(first + 1));
    assert_eq!(pushed(&controller), Some(serde_json::json!(KEYS)));
    assert_eq!(controller.current().objects[key]["spec"]["jwtRules"][0].get("jwksUri"), None);
    // Nothing new to fetch on the next change.
    let cache = refresh(&controller.jwks(), &controller.jwks_wanted(), Due::New, &tls).await;
    assert_eq!(controller.set_jwks(cache), None);

    // The provider fails: the periodic refresh keeps the last good keys and reports.
    *served.lock().unwrap() = Some((StatusCode::SERVICE_UNAVAILABLE, String::new()));
    let cache = refresh(&controller.jwks(), &controller.jwks_wanted(), Due::All, &tls).await;
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
    let cache = refresh(&controller.jwks(), &controller.jwks_wanted(), Due::All, &tls).await;
    assert_eq!(controller.set_jwks(cache), Some(before + 1));
    assert_eq!(pushed(&controller), Some(serde_json::json!(rotated)));
    assert_eq!(controller.status()["jwks"][&uri]["error"], serde_json::Value::Null);

    // The rule goes away: its URI is forgotten.
    controller.apply(Config::default());
    assert!(controller.jwks_wanted().is_empty());
    assert!(refresh(&controller.jwks(), &controller.jwks_wanted(), Due::All, &tls).await.is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

/// Path -> answer; other paths get 404.
type Routes = Arc<Mutex<BTreeMap<String, (StatusCode, String)>>>;

/// A server answering by path, and its address (to write URIs into its answers).
async fn routed() -> (SocketAddr, Routes) {
    let routes = Routes::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let table = routes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let table = table.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (status, body) = table
                        .lock()
                        .unwrap()
                        .get(req.uri().path())
                        .cloned()
                        .unwrap_or((StatusCode::NOT_FOUND, String::new()));
                    async move {
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
    (addr, routes)
}

fn controller(config: Config, tag: &str) -> (Controller, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("mesh-jwks-ca-{tag}-{}", std::process::id()));
    let ca = Ca::load_or_create(&dir, "cluster.local").unwrap();
    (Controller::new(config, ca, Duration::from_hours(1), Vec::new()), dir)
}

fn discovering(issuer: &str) -> JwtRule {
    JwtRule { issuer: issuer.into(), ..JwtRule::default() }
}

#[test]
fn discovery_urls_and_wanted_discoveries() {
    assert_eq!(discovery_url("https://idp.example"), "https://idp.example/.well-known/openid-configuration");
    assert_eq!(discovery_url("https://idp.example/"), "https://idp.example/.well-known/openid-configuration");
    assert_eq!(
        discovery_url("https://idp.example/realms/shop"),
        "https://idp.example/realms/shop/.well-known/openid-configuration"
    );
    let mut inline_wins = discovering("https://inline.example");
    inline_wins.jwks = Some(KEYS.into());
    let config = Config {
        request_authentications: vec![policy(
            "p",
            vec![discovering("https://idp.example/"), inline_wins, fetching("http://a/keys", None)],
        )],
        ..Config::default()
    };
    assert_eq!(
        wanted(&config).into_iter().collect::<Vec<_>>(),
        [
            ("http://a/keys".to_owned(), Want { timeout: DEFAULT_TIMEOUT, discover: false }),
            (
                "https://idp.example/.well-known/openid-configuration".to_owned(),
                Want { timeout: DEFAULT_TIMEOUT, discover: true }
            ),
        ]
    );
}

#[tokio::test]
async fn openid_discovery_finds_the_keys() {
    let tls = connector();
    let (addr, routes) = routed().await;
    let issuer = format!("http://{addr}/realms/shop");
    let discovery = discovery_url(&issuer);
    let keys_uri = format!("http://{addr}/certs");
    routes.lock().unwrap().insert(
        "/realms/shop/.well-known/openid-configuration".into(),
        (StatusCode::OK, serde_json::json!({"issuer": issuer, "jwks_uri": keys_uri}).to_string()),
    );
    // The configuration names a key set the provider does not serve yet.
    let error = discover(&discovery, DEFAULT_TIMEOUT, &tls).await.unwrap_err();
    assert!(matches!(&error, FetchError::Status { uri, status: StatusCode::NOT_FOUND } if *uri == keys_uri), "{error}");
    routes.lock().unwrap().insert("/certs".into(), (StatusCode::OK, KEYS.into()));
    assert_eq!(discover(&discovery, DEFAULT_TIMEOUT, &tls).await.unwrap(), (keys_uri.clone(), KEYS.to_owned()));

    // Not an OpenID configuration.
    for body in ["{}", r#"{"jwks_uri": 7}"#, "<html>"] {
        routes.lock().unwrap().insert("/bad/.well-known/openid-configuration".into(), (StatusCode::OK, body.into()));
        let error = discover(&discovery_url(&format!("http://{addr}/bad")), DEFAULT_TIMEOUT, &tls).await.unwrap_err();
        assert!(matches!(error, FetchError::NotDiscovery { .. }), "{body}: {error}");
    }
    // No configuration at all, or an issuer that is no URL (Istio's sample issuer).
    let error = discover(&discovery_url(&format!("http://{addr}/none")), DEFAULT_TIMEOUT, &tls).await.unwrap_err();
    assert!(matches!(error, FetchError::Status { status: StatusCode::NOT_FOUND, .. }), "{error}");
    let error = discover(&discovery_url("testing@secure.istio.io"), DEFAULT_TIMEOUT, &tls).await.unwrap_err();
    assert!(matches!(error, FetchError::BadUri { .. }), "{error}");

    // Through the controller: the rule is pushed with the discovered keys.
    let config = Config { request_authentications: vec![policy("p", vec![discovering(&issuer)])], ..Config::default() };
    let (controller, dir) = controller(config, "discovery");
    let key = "RequestAuthentication/shop/p";
    assert!(controller.current().objects[key]["spec"]["jwtRules"][0].get("jwks").is_none());
    assert!(controller.fetch_running_jwks().await.is_some());
    let rule = &controller.current().objects[key]["spec"]["jwtRules"][0];
    assert_eq!(rule["jwks"], serde_json::json!(KEYS));
    assert_eq!(rule.get("jwksUri"), None, "discovery writes no jwksUri");
    assert_eq!(controller.status()["jwks"][&discovery]["jwks_uri"], serde_json::json!(keys_uri));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_failed_discovery_warns_on_the_issuer() {
    let mut config = Config {
        request_authentications: vec![policy("p", vec![discovering("https://idp.example")])],
        ..Config::default()
    };
    let cache = Cache::from([(
        discovery_url("https://idp.example"),
        Entry { error: Some("GET x: the answer was 503".into()), ..Entry::default() },
    )]);
    inline(&mut config, &cache);
    assert_eq!(config.request_authentications[0].spec.jwt_rules[0].jwks, None);
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        ["RequestAuthentication/shop/p: spec.jwtRules[0].issuer: GET x: the answer was 503; no keys yet: waypoints \
          refuse this issuer's tokens"]
    );
}

/// A new `jwksUri` is fetched before its configuration is accepted: the first version
/// that has the rule already carries the keys (no 401 window).
#[tokio::test]
async fn new_uris_are_fetched_before_the_configuration_is_accepted() {
    let served = answer(StatusCode::OK, KEYS);
    let addr = server(served.clone()).await;
    let uri = format!("http://{addr}/jwks");
    let (controller, dir) = controller(Config::default(), "before");
    let mut versions = controller.subscribe();
    let config = Config { request_authentications: vec![policy("p", vec![fetching(&uri, None)])], ..Config::default() };
    let version = controller.apply_fetching(config).await.expect("a new version");
    assert!(versions.has_changed().unwrap());
    let snapshot = versions.borrow_and_update().clone();
    assert_eq!(snapshot.version, version, "one version, not one without keys and one with");
    let key = "RequestAuthentication/shop/p";
    assert_eq!(snapshot.objects[key]["spec"]["jwtRules"][0]["jwks"], serde_json::json!(KEYS));
    let _ = std::fs::remove_dir_all(dir);
}

/// A provider that does not answer delays the configuration by the bounded wait only;
/// it is applied without keys, the failure is reported, and the retry picks it up.
#[tokio::test]
async fn an_unreachable_new_uri_delays_the_configuration_only_boundedly() {
    let served: Answer = Arc::new(Mutex::new(None));
    let addr = server(served.clone()).await;
    let uri = format!("http://{addr}/jwks");
    let (controller, dir) = controller(Config::default(), "bounded");
    let config =
        Config { request_authentications: vec![policy("p", vec![fetching(&uri, Some("300ms"))])], ..Config::default() };
    let started = std::time::Instant::now();
    assert!(controller.apply_fetching(config).await.is_some(), "applied anyway");
    assert!(started.elapsed() < Duration::from_secs(3), "waited {:?}", started.elapsed());
    let key = "RequestAuthentication/shop/p";
    let pushed = |c: &Controller| c.current().objects[key]["spec"]["jwtRules"][0].get("jwks").cloned();
    assert_eq!(pushed(&controller), None);
    let error = controller.status()["jwks"][&uri]["error"].as_str().unwrap().to_owned();
    assert!(error.contains("no answer within 300ms"), "{error}");
    assert!(controller.current().config.warnings.iter().any(|w| w.to_string().contains("no answer")));

    // The provider is back: the retry of failed URIs fetches it; `New` would not.
    *served.lock().unwrap() = Some((StatusCode::OK, KEYS.into()));
    let tls = connector();
    let unchanged = refresh(&controller.jwks(), &controller.jwks_wanted(), Due::New, &tls).await;
    assert_eq!(unchanged, controller.jwks());
    let cache = refresh(&controller.jwks(), &controller.jwks_wanted(), Due::Failed, &tls).await;
    assert!(controller.set_jwks(cache).is_some());
    assert_eq!(pushed(&controller), Some(serde_json::json!(KEYS)));
    let _ = std::fs::remove_dir_all(dir);
}

/// The fetch loop's result, computed before a configuration brought a new URI, does
/// not erase that URI's keys fetched meanwhile; URIs no longer wanted are dropped.
#[tokio::test]
async fn a_stale_loop_result_keeps_keys_fetched_meanwhile() {
    let addr = server(answer(StatusCode::OK, KEYS)).await;
    let (old, new) = (format!("http://{addr}/old"), format!("http://{addr}/new"));
    let with = |uris: &[&String]| Config {
        request_authentications: vec![policy("p", uris.iter().map(|u| fetching(u, None)).collect())],
        ..Config::default()
    };
    let (controller, dir) = controller(with(&[&old]), "stale");
    controller.fetch_running_jwks().await;
    let tls = connector();
    // The loop starts a periodic refresh of the old configuration ...
    let stale = refresh(&controller.jwks(), &controller.jwks_wanted(), Due::All, &tls).await;
    // ... while a configuration with a second URI is fetched and accepted.
    controller.apply_fetching(with(&[&old, &new])).await;
    controller.set_jwks(stale);
    assert_eq!(controller.jwks().keys().collect::<Vec<_>>(), [&new, &old]);
    let rules = &controller.current().objects["RequestAuthentication/shop/p"]["spec"]["jwtRules"];
    assert_eq!(rules[1]["jwks"], serde_json::json!(KEYS), "the new URI keeps its keys");
    // The old URI goes away: a later loop result drops it.
    controller.apply_fetching(with(&[&new])).await;
    let stale = refresh(&controller.jwks(), &wanted(&with(&[&old, &new])), Due::New, &tls).await;
    controller.set_jwks(stale);
    assert_eq!(controller.jwks().keys().collect::<Vec<_>>(), [&new]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn backoff_doubles_from_the_first_retry_up_to_the_cap_and_success_means_refresh() {
    assert_eq!(next_fetch_in(0), REFRESH);
    assert_eq!(next_fetch_in(1), FIRST_RETRY);
    assert_eq!(next_fetch_in(2), FIRST_RETRY * 2);
    assert_eq!(next_fetch_in(5), FIRST_RETRY * 16);
    assert_eq!(next_fetch_in(12), RETRY_CAP, "2048 s is past the cap");
    assert_eq!(next_fetch_in(40), RETRY_CAP, "no overflow");
    assert_eq!(next_fetch_in(u32::MAX), RETRY_CAP);
    for n in 1..64 {
        assert!(next_fetch_in(n) <= next_fetch_in(n + 1), "{n}");
    }
}

fn want() -> Want {
    Want { timeout: DEFAULT_TIMEOUT, discover: false }
}

#[test]
fn schedule_retries_a_failing_uri_with_backoff_and_refreshes_a_good_one() {
    let secs = Duration::from_secs;
    let wanted: BTreeMap<String, Want> = [("good".to_owned(), want()), ("bad".to_owned(), want())].into();
    let mut schedule = Schedule::default();
    let set = |uris: &[&str]| uris.iter().map(|u| (*u).to_owned()).collect::<BTreeSet<_>>();

    // Unknown URIs are due at once.
    assert_eq!(schedule.due(&wanted, secs(0)), set(&["bad", "good"]));
    schedule.record("good", true, secs(0));
    schedule.record("bad", false, secs(0));
    assert_eq!(schedule.sleep(secs(0)), FIRST_RETRY);
    assert!(schedule.due(&wanted, secs(0)).is_empty());

    // The bad one: 1 s, then 2 s, then 4 s later; the good one only after REFRESH.
    let mut now = secs(0);
    for expected_wait in [1, 2, 4, 8] {
        now += secs(expected_wait);
        assert_eq!(schedule.due(&wanted, now.saturating_sub(secs(1) / 2)), set(&[]), "not before {now:?}");
        assert_eq!(schedule.due(&wanted, now), set(&["bad"]));
        schedule.record("bad", false, now);
    }
    assert_eq!(schedule.failures("bad"), 5);
    assert_eq!(schedule.sleep(now), secs(16));

    // A success resets: next fetch after REFRESH, and a later failure starts over at FIRST_RETRY.
    schedule.record("bad", true, now);
    assert_eq!(schedule.failures("bad"), 0);
    assert_eq!(schedule.due(&wanted, REFRESH), set(&["good"]));
    schedule.record("good", true, REFRESH);
    assert_eq!(schedule.due(&wanted, now + REFRESH), set(&["bad"]));
    schedule.record("bad", false, now + REFRESH);
    assert_eq!(schedule.sleep(now + REFRESH), FIRST_RETRY);
}

#[test]
fn schedule_adopts_what_was_fetched_before_acceptance_and_forgets_unwanted_uris() {
    let secs = Duration::from_secs;
    let mut wanted: BTreeMap<String, Want> = [("a".to_owned(), want()), ("b".to_owned(), want())].into();
    let cache: Cache = [
        ("a".to_owned(), Entry { keys: Some(KEYS.into()), ..Entry::default() }),
        ("b".to_owned(), Entry { error: Some("503".into()), ..Entry::default() }),
    ]
    .into();
    let mut schedule = Schedule::default();
    schedule.adopt(&wanted, &cache, secs(10));
    assert!(schedule.due(&wanted, secs(10)).is_empty(), "both just fetched");
    assert_eq!(schedule.failures("b"), 1);
    assert_eq!(schedule.sleep(secs(10)), FIRST_RETRY);
    wanted.remove("b");
    assert_eq!(schedule.due(&wanted, secs(11)), BTreeSet::new(), "b is no longer wanted");
    assert_eq!(schedule.sleep(secs(11)), REFRESH.saturating_sub(secs(1)));
    assert_eq!(Schedule::default().sleep(secs(0)), REFRESH, "nothing scheduled");
}

#[tokio::test]
async fn listed_refresh_fetches_only_the_listed_uris() {
    let served = answer(StatusCode::OK, KEYS);
    let addr = server(served.clone()).await;
    let (one, two) = (format!("http://{addr}/one"), format!("http://{addr}/two"));
    let wanted: BTreeMap<String, Want> = [(one.clone(), want()), (two.clone(), want())].into();
    let tls = connector();
    let cache = refresh(&Cache::new(), &wanted, Due::All, &tls).await;
    *served.lock().unwrap() = Some((StatusCode::SERVICE_UNAVAILABLE, String::new()));
    let listed: BTreeSet<String> = [two.clone()].into();
    let after = refresh(&cache, &wanted, Due::Listed(&listed), &tls).await;
    assert_eq!(after[&one], cache[&one], "not fetched");
    assert!(after[&two].error.is_some(), "fetched: {after:?}");
    assert_eq!(after[&two].keys.as_deref(), Some(KEYS), "last good keys kept");
}
