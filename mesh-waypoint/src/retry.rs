//! Retry decisions, as Envoy makes them for the policies Istio writes: which outcomes
//! of a try may be retried (`retryOn`), how many times, and how long to wait between
//! tries. Pure: the proxy reports what happened and passes in its own random roll.
//!
//! Sources: Envoy's router filter documentation (`x-envoy-retry-on`,
//! `x-envoy-retry-grpc-on`, "fully jittered exponential back-off"), Istio's
//! `HTTPRetry` reference and its default policy (what `istioctl proxy-config routes`
//! shows for a route without `retries`: `num_retries: 2`, `retry_on:
//! connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`,
//! `retriable_status_codes: [503]`, previous-hosts predicate).
use std::time::Duration;

use mesh_common::config::{networking::HttpRetry, parse_duration};

/// Envoy's default back-off base interval; the maximum is ten times the base.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);

/// When and how often a request is tried again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try (Envoy's `num_retries`); `0` disables retries.
    pub attempts: u32,
    /// Deadline of each try; `None`: only the route's timeout bounds a try.
    pub per_try_timeout: Option<Duration>,
    /// The outcomes that may be retried.
    pub conditions: RetryOn,
    /// Whether retries may go to endpoints in other localities.
    pub retry_remote_localities: bool,
    /// Whether a retry avoids the endpoints already tried (Istio's default: yes).
    pub retry_ignore_previous_hosts: bool,
    /// Base of the jittered exponential back-off between tries.
    pub backoff_base: Duration,
    /// Upper bound of one back-off (Envoy: ten times the base unless configured).
    pub backoff_max: Duration,
}

/// The conditions of Istio's `retryOn` (Envoy's `x-envoy-retry-on` and
/// `x-envoy-retry-grpc-on` names), and the status codes that `retriable-status-codes`
/// retries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools, reason = "one flag per Envoy retry condition, as Envoy names them")]
pub struct RetryOn {
    /// `5xx`: any 5xx response, or no response at all (reset, connect failure,
    /// refused stream, per-try timeout).
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504, or no response at all.
    pub gateway_error: bool,
    /// `reset`: no response at all (disconnect, reset, per-try timeout).
    pub reset: bool,
    /// `connect-failure`: the connection to the endpoint failed.
    pub connect_failure: bool,
    /// `envoy-ratelimited`: the response carries `x-envoy-ratelimited`.
    pub envoy_ratelimited: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    /// `refused-stream`: the endpoint refused the HTTP/2 stream (`REFUSED_STREAM`).
    pub refused_stream: bool,
    /// `retriable-status-codes`: a status in [`RetryOn::status_codes`].
    pub retriable_status_codes: bool,
    /// `retriable-headers`: Istio has no way to configure the headers, so this never
    /// fires; kept so that the parsed policy says what was written.
    pub retriable_headers: bool,
    /// gRPC `cancelled` (1).
    pub grpc_cancelled: bool,
    /// gRPC `deadline-exceeded` (4).
    pub grpc_deadline_exceeded: bool,
    /// gRPC `internal` (13).
    pub grpc_internal: bool,
    /// gRPC `resource-exhausted` (8).
    pub grpc_resource_exhausted: bool,
    /// gRPC `unavailable` (14).
    pub grpc_unavailable: bool,
    /// The numbers of the `retryOn` list: Istio turns them into Envoy's
    /// `retriable_status_codes` and adds `retriable-status-codes`.
    pub status_codes: Vec<u16>,
    /// Tokens that are not Envoy conditions (validation rejects them; kept to report).
    pub unknown: Vec<String>,
}

impl RetryOn {
    /// Parses a comma-separated `retryOn` list. Plain numbers are status codes and
    /// switch on `retriable-status-codes`, as Istio does.
    pub fn parse(list: &str) -> Self {
        let mut on = Self::default();
        for token in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match token {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "reset" | "reset-before-request" => on.reset = true,
                "connect-failure" | "http3-post-connect-failure" => on.connect_failure = true,
                "envoy-ratelimited" => on.envoy_ratelimited = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-status-codes" => on.retriable_status_codes = true,
                "retriable-headers" => on.retriable_headers = true,
                "cancelled" => on.grpc_cancelled = true,
                "deadline-exceeded" => on.grpc_deadline_exceeded = true,
                "internal" => on.grpc_internal = true,
                "resource-exhausted" => on.grpc_resource_exhausted = true,
                "unavailable" => on.grpc_unavailable = true,
                _ => match token.parse::<u16>() {
                    Ok(code) if (100..=599).contains(&code) => {
                        on.retriable_status_codes = true;
                        if !on.status_codes.contains(&code) {
                            on.status_codes.push(code);
                        }
                    }
                    _ => on.unknown.push(token.to_string()),
                },
            }
        }
        on
    }

    /// Istio's default conditions: `connect-failure,refused-stream,unavailable,
    /// cancelled,retriable-status-codes` with 503.
    pub fn istio_default() -> Self {
        Self::parse("connect-failure,refused-stream,unavailable,cancelled,503")
    }

    /// Whether `outcome` is one of these conditions (the attempt budget aside).
    pub fn matches(&self, outcome: &Outcome) -> bool {
        if outcome.overflow {
            // Envoy never retries a try its own circuit breaker refused.
            return false;
        }
        let no_response = outcome.reset || outcome.connect_failure || outcome.refused_stream || outcome.per_try_timeout;
        if no_response {
            // Envoy counts a try without a response as a 5xx / gateway error (it turns
            // into a 503/504), and `reset` covers every way of getting none.
            return self.server_error
                || self.gateway_error
                || self.reset
                || (self.connect_failure && outcome.connect_failure)
                || (self.refused_stream && outcome.refused_stream);
        }
        if let Some(status) = outcome.status {
            if self.server_error && (500..=599).contains(&status) {
                return true;
            }
            if self.gateway_error && matches!(status, 502..=504) {
                return true;
            }
            if self.retriable_4xx && status == 409 {
                return true;
            }
            if self.retriable_status_codes && self.status_codes.contains(&status) {
                return true;
            }
        }
        if self.envoy_ratelimited && outcome.envoy_ratelimited {
            return true;
        }
        // gRPC conditions read `grpc-status` of the response headers (a trailers-only
        // response); a status in the trailers of a streamed body comes too late.
        match outcome.grpc_status {
            Some(1) => self.grpc_cancelled,
            Some(4) => self.grpc_deadline_exceeded,
            Some(8) => self.grpc_resource_exhausted,
            Some(13) => self.grpc_internal,
            Some(14) => self.grpc_unavailable,
            _ => false,
        }
    }
}

/// What one try came to, as the proxy saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools, reason = "independent facts about one try, as Envoy distinguishes them")]
pub struct Outcome {
    /// The response status, when response headers arrived.
    pub status: Option<u16>,
    /// `grpc-status` of the response headers (trailers-only responses).
    pub grpc_status: Option<u32>,
    /// The stream or connection was reset (or closed) before response headers.
    pub reset: bool,
    /// The connection to the endpoint could not be opened.
    pub connect_failure: bool,
    /// The endpoint refused the HTTP/2 stream (`REFUSED_STREAM`).
    pub refused_stream: bool,
    /// The per-try timeout fired before response headers.
    pub per_try_timeout: bool,
    /// The destination's `connectionPool` had no room (`UO`): the try never left.
    pub overflow: bool,
    /// The response carries `x-envoy-ratelimited`.
    pub envoy_ratelimited: bool,
}

impl RetryPolicy {
    /// Istio's policy for a route that says nothing about retries: 2 retries on
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`
    /// (503), other hosts preferred, Envoy's default back-off.
    pub fn istio_default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            conditions: RetryOn::istio_default(),
            retry_remote_localities: false,
            retry_ignore_previous_hosts: true,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_BASE * 10,
        }
    }

    /// No retries (`attempts: 0`).
    pub fn none() -> Self {
        Self { attempts: 0, conditions: RetryOn::default(), ..Self::istio_default() }
    }

    /// A `VirtualService`'s `retries`, as Istio translates it: absent -> the default;
    /// `attempts` 0 (or less) -> none; `retryOn` replaces the default conditions when
    /// given (numbers in it are retriable status codes); `backoff` sets the base.
    pub fn from_istio(retry: Option<&HttpRetry>) -> Self {
        let Some(retry) = retry else {
            return Self::istio_default();
        };
        if retry.attempts <= 0 {
            return Self::none();
        }
        let mut policy = Self::istio_default();
        policy.attempts = u32::try_from(retry.attempts).unwrap_or(u32::MAX);
        if let Some(on) = retry.retry_on.as_deref().filter(|s| !s.trim().is_empty()) {
            policy.conditions = RetryOn::parse(on);
        }
        policy.per_try_timeout = retry.per_try_timeout.as_deref().and_then(|d| parse_duration(d).ok());
        policy.retry_remote_localities = retry.retry_remote_localities.unwrap_or(false);
        policy.retry_ignore_previous_hosts = retry.retry_ignore_previous_hosts.unwrap_or(true);
        if let Some(base) = retry.backoff.as_deref().and_then(|d| parse_duration(d).ok()).filter(|d| !d.is_zero()) {
            policy.backoff_base = base;
            policy.backoff_max = base * 10;
        }
        policy
    }

    /// Gateway API's `HTTPRouteRetry` (`{codes, attempts, backoff}`, GEP-1731): absent
    /// -> Istio's default; `attempts` (default 2, Istio's) retries on the listed status
    /// codes and on connection errors: connect failures, refused streams, gRPC
    /// `unavailable`/`cancelled` (Istio's defaults), and resets and per-try timeouts
    /// (`reset`), which GEP-1731's conformance feature `HTTPRouteRetryConnectionError`
    /// tests and its `backendRequest` text asks for (the API comment warns that a reset
    /// after the request was sent is unsafe for non-idempotent requests: documented
    /// here as it asks). `attempts: 0` disables retries.
    pub fn from_gateway(retry: Option<&serde_json::Value>) -> Self {
        let Some(retry) = retry.filter(|v| v.is_object()) else {
            return Self::istio_default();
        };
        let attempts = retry.get("attempts").and_then(serde_json::Value::as_u64).unwrap_or(2);
        if attempts == 0 {
            return Self::none();
        }
        let mut policy = Self::istio_default();
        policy.attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
        let mut conditions = RetryOn::parse("connect-failure,refused-stream,reset,unavailable,cancelled");
        if let Some(codes) = retry.get("codes").and_then(serde_json::Value::as_array) {
            for code in codes.iter().filter_map(serde_json::Value::as_u64) {
                if let Ok(code @ 100..=599) = u16::try_from(code) {
                    conditions.retriable_status_codes = true;
                    if !conditions.status_codes.contains(&code) {
                        conditions.status_codes.push(code);
                    }
                }
            }
        }
        policy.conditions = conditions;
        if let Some(base) = retry
            .get("backoff")
            .and_then(serde_json::Value::as_str)
            .and_then(|d| parse_duration(d).ok())
            .filter(|d| !d.is_zero())
        {
            policy.backoff_base = base;
            policy.backoff_max = base * 10;
        }
        policy
    }

    /// Whether to try again after `attempt_done` tries (1 after the first try) ended
    /// with `outcome`: the retry budget (`attempts` retries) is not spent and the
    /// outcome is one of the conditions.
    pub fn should_retry(&self, attempt_done: u32, outcome: &Outcome) -> bool {
        attempt_done >= 1 && attempt_done <= self.attempts && self.conditions.matches(outcome)
    }

    /// How long to wait before retry number `attempt` (1 for the first retry), given a
    /// uniform `roll` in `[0, 1)`: Envoy's fully jittered exponential back-off, a
    /// uniform delay in `[0, (2^attempt - 1) * base)`, the bound capped at the maximum
    /// (25 ms base: 0-25 ms, 0-75 ms, 0-175 ms, then 0-250 ms).
    pub fn backoff(&self, attempt: u32, roll: f64) -> Duration {
        let factor = 1u64.checked_shl(attempt.max(1)).map_or(u64::MAX, |p| p - 1);
        let base_nanos = self.backoff_base.as_nanos();
        let bound = base_nanos.saturating_mul(u128::from(factor)).min(self.backoff_max.as_nanos());
        let roll = if roll.is_finite() { roll.clamp(0.0, 1.0) } else { 0.0 };
        let nanos = (bound as f64 * roll) as u128;
        Duration::from_nanos(u64::try_from(nanos.min(bound.saturating_sub(1))).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Outcome {
        Outcome { status: Some(code), ..Outcome::default() }
    }

    fn grpc(code: u32) -> Outcome {
        Outcome { status: Some(200), grpc_status: Some(code), ..Outcome::default() }
    }

    fn policy(on: &str) -> RetryPolicy {
        RetryPolicy { attempts: 3, conditions: RetryOn::parse(on), ..RetryPolicy::istio_default() }
    }

    #[test]
    fn istio_default_policy() {
        let p = RetryPolicy::istio_default();
        assert_eq!(p.attempts, 2);
        assert!(p.should_retry(1, &status(503)));
        assert!(p.should_retry(2, &status(503)));
        assert!(!p.should_retry(3, &status(503)), "two retries, three tries in all");
        assert!(!p.should_retry(1, &status(500)));
        assert!(!p.should_retry(1, &status(502)));
        assert!(p.should_retry(1, &Outcome { connect_failure: true, ..Outcome::default() }));
        assert!(p.should_retry(1, &Outcome { refused_stream: true, ..Outcome::default() }));
        assert!(!p.should_retry(1, &Outcome { reset: true, ..Outcome::default() }), "a plain reset is not retried");
        assert!(!p.should_retry(1, &Outcome { per_try_timeout: true, ..Outcome::default() }));
        assert!(p.should_retry(1, &grpc(14)));
        assert!(p.should_retry(1, &grpc(1)));
        assert!(!p.should_retry(1, &grpc(13)));
        assert!(!p.should_retry(1, &status(200)));
        assert!(p.retry_ignore_previous_hosts);
        assert!(!p.should_retry(0, &status(503)), "nothing to retry before a try");
    }

    /// A try the destination's circuit breaker refused (`UO`) is retried under no
    /// condition, as in Envoy: retrying would only add load where there is no room.
    #[test]
    fn an_overflow_is_never_retried() {
        let overflow = Outcome { overflow: true, ..Outcome::default() };
        for on in ["5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "503", "retriable-4xx"] {
            assert!(!policy(on).should_retry(1, &overflow), "{on}");
        }
        assert!(!RetryPolicy::istio_default().should_retry(1, &overflow));
    }

    #[test]
    fn each_condition() {
        let reset = Outcome { reset: true, ..Outcome::default() };
        let connect = Outcome { connect_failure: true, ..Outcome::default() };
        let refused = Outcome { refused_stream: true, ..Outcome::default() };
        let timeout = Outcome { per_try_timeout: true, ..Outcome::default() };
        let limited = Outcome { status: Some(429), envoy_ratelimited: true, ..Outcome::default() };

        let p = policy("5xx");
        for o in
            [status(500), status(503), status(599), reset.clone(), connect.clone(), refused.clone(), timeout.clone()]
        {
            assert!(p.should_retry(1, &o), "5xx retries {o:?}");
        }
        for o in [status(200), status(404), status(409), grpc(14)] {
            assert!(!p.should_retry(1, &o), "5xx does not retry {o:?}");
        }

        let p = policy("gateway-error");
        for o in [status(502), status(503), status(504), reset.clone(), timeout.clone(), connect.clone()] {
            assert!(p.should_retry(1, &o), "gateway-error retries {o:?}");
        }
        for o in [status(500), status(501), status(505)] {
            assert!(!p.should_retry(1, &o), "gateway-error does not retry {o:?}");
        }

        let p = policy("reset");
        for o in [reset.clone(), timeout.clone(), connect.clone(), refused.clone()] {
            assert!(p.should_retry(1, &o), "reset retries {o:?}");
        }
        assert!(!p.should_retry(1, &status(503)));

        let p = policy("connect-failure");
        assert!(p.should_retry(1, &connect));
        assert!(!p.should_retry(1, &reset));
        assert!(!p.should_retry(1, &refused));
        assert!(!p.should_retry(1, &status(503)));

        let p = policy("refused-stream");
        assert!(p.should_retry(1, &refused));
        assert!(!p.should_retry(1, &reset));
        assert!(!p.should_retry(1, &connect));

        let p = policy("retriable-4xx");
        assert!(p.should_retry(1, &status(409)));
        assert!(!p.should_retry(1, &status(404)));
        assert!(!p.should_retry(1, &status(500)));

        let p = policy("envoy-ratelimited");
        assert!(p.should_retry(1, &limited));
        assert!(!p.should_retry(1, &status(429)));

        let p = policy("retriable-status-codes,418,500");
        assert!(p.should_retry(1, &status(418)));
        assert!(p.should_retry(1, &status(500)));
        assert!(!p.should_retry(1, &status(503)));
        // A number alone switches the condition on, as Istio does.
        assert!(policy("418").should_retry(1, &status(418)));
        // The condition without codes retries nothing.
        assert!(!policy("retriable-status-codes").should_retry(1, &status(503)));

        assert!(!policy("retriable-headers").should_retry(1, &status(503)));

        for (name, code) in [
            ("cancelled", 1),
            ("deadline-exceeded", 4),
            ("resource-exhausted", 8),
            ("internal", 13),
            ("unavailable", 14),
        ] {
            let p = policy(name);
            assert!(p.should_retry(1, &grpc(code)), "{name}");
            for other in [0, 1, 2, 4, 8, 13, 14].into_iter().filter(|c| *c != code) {
                assert!(!p.should_retry(1, &grpc(other)), "{name} does not retry grpc {other}");
            }
            assert!(!p.should_retry(1, &status(503)), "{name} is not an HTTP condition");
        }
    }

    #[test]
    fn parse_keeps_unknown_and_codes() {
        let on = RetryOn::parse(" 5xx , 503,bogus,503,99");
        assert!(on.server_error && on.retriable_status_codes);
        assert_eq!(on.status_codes, vec![503]);
        assert_eq!(on.unknown, vec!["bogus".to_string(), "99".to_string()]);
    }

    #[test]
    fn from_istio() {
        assert_eq!(RetryPolicy::from_istio(None), RetryPolicy::istio_default());
        let off = RetryPolicy::from_istio(Some(&HttpRetry { attempts: 0, ..HttpRetry::default() }));
        assert_eq!(off.attempts, 0);
        assert!(!off.should_retry(1, &status(503)));
        let p = RetryPolicy::from_istio(Some(&HttpRetry {
            attempts: 3,
            per_try_timeout: Some("2s".into()),
            retry_on: Some("gateway-error,connect-failure".into()),
            backoff: Some("100ms".into()),
            retry_remote_localities: Some(true),
            ..HttpRetry::default()
        }));
        assert_eq!(p.attempts, 3);
        assert_eq!(p.per_try_timeout, Some(Duration::from_secs(2)));
        assert!(p.conditions.gateway_error && p.conditions.connect_failure && !p.conditions.grpc_unavailable);
        assert!(p.retry_remote_localities);
        assert_eq!(p.backoff_base, Duration::from_millis(100));
        assert_eq!(p.backoff_max, Duration::from_secs(1));
        // Attempts without retryOn keep the default conditions.
        let p = RetryPolicy::from_istio(Some(&HttpRetry { attempts: 5, ..HttpRetry::default() }));
        assert_eq!(p.conditions, RetryOn::istio_default());
    }

    #[test]
    fn from_gateway() {
        let p = RetryPolicy::from_gateway(Some(
            &serde_json::json!({"codes": [500, 502], "attempts": 4, "backoff": "50ms"}),
        ));
        assert_eq!(p.attempts, 4);
        assert!(p.should_retry(1, &status(500)));
        assert!(p.should_retry(4, &status(502)));
        assert!(!p.should_retry(5, &status(502)));
        assert!(!p.should_retry(1, &status(503)), "only the listed codes");
        assert!(p.should_retry(1, &Outcome { connect_failure: true, ..Outcome::default() }));
        assert!(p.should_retry(1, &Outcome { reset: true, ..Outcome::default() }));
        assert!(p.should_retry(1, &Outcome { per_try_timeout: true, ..Outcome::default() }));
        assert!(p.should_retry(1, &grpc(14)));
        assert_eq!(p.backoff_base, Duration::from_millis(50));
        assert_eq!(RetryPolicy::from_gateway(Some(&serde_json::json!({"attempts": 0}))).attempts, 0);
        assert_eq!(RetryPolicy::from_gateway(Some(&serde_json::json!({}))).attempts, 2);
        assert_eq!(RetryPolicy::from_gateway(None), RetryPolicy::istio_default());
    }

    #[test]
    fn backoff_is_fully_jittered_and_capped() {
        let p = RetryPolicy::istio_default();
        let ms = Duration::from_millis;
        assert_eq!(p.backoff(1, 0.0), Duration::ZERO);
        assert!(p.backoff(1, 0.999_999) < ms(25));
        assert_eq!(p.backoff(1, 0.5), Duration::from_micros(12_500));
        assert_eq!(p.backoff(2, 0.5), Duration::from_micros(37_500));
        assert_eq!(p.backoff(3, 0.5), Duration::from_micros(87_500));
        assert_eq!(p.backoff(4, 0.5), ms(125), "capped at 250 ms");
        assert!(p.backoff(64, 1.0) < ms(250));
        assert!(p.backoff(u32::MAX, 1.0) < ms(250));
        assert_eq!(p.backoff(2, f64::NAN), Duration::ZERO);
    }
}
