//! `meshctl status`: the controller's `/status` JSON ([`crate::server::Controller::status`])
//! as text. Agents (one per node) and waypoints (one per `Gateway`, replicas together)
//! are listed apart, each with the version it was sent, the one it acknowledged and
//! whether that is the running one.
use std::fmt::Write as _;

use serde_json::Value;

/// What `meshctl status` prints, and whether every connected client is in sync (its
/// exit status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub in_sync: bool,
}

/// Renders a `/status` document. Missing fields read as zero or empty (an older
/// controller has no `waypoints`), never as a failure.
pub fn render(status: &Value) -> Rendered {
    let version = status["version"].as_u64().unwrap_or(0);
    let mut text = String::new();
    let _ = writeln!(text, "controller: config version {version}, {} rejected changes", status["rejections"]);
    if let Some(reason) = status["last_rejection"].as_str() {
        let _ = writeln!(text, "last rejection:\n{reason}");
    }
    let mut in_sync = true;
    let mut sync = |client: &Value| {
        let acked = client["acked_version"].as_u64().unwrap_or(0);
        let connected = client["connected"] == true;
        let synced = acked == version;
        in_sync &= synced || !connected;
        (
            if connected { "connected" } else { "gone" },
            client["sent_version"].as_u64().unwrap_or(0),
            acked,
            if synced { "SYNCED" } else { "STALE" },
        )
    };
    let _ = writeln!(
        text,
        "{:<16} {:<10} {:>15} {:>15} {:>8} {:>6}  SYNC",
        "NODE", "STREAM", "SENT", "ACKED", "OBJECTS", "CERTS"
    );
    for (node, agent) in status["agents"].as_object().into_iter().flatten() {
        let (stream, sent, acked, synced) = sync(agent);
        let _ = writeln!(
            text,
            "{node:<16} {stream:<10} {sent:>15} {acked:>15} {:>8} {:>6}  {synced}",
            agent["objects"].as_u64().unwrap_or(0),
            agent["certificates_issued"].as_u64().unwrap_or(0),
        );
    }
    let waypoints = status["waypoints"].as_object().filter(|w| !w.is_empty());
    if let Some(waypoints) = waypoints {
        let _ = writeln!(text, "\nWAYPOINTS");
        let _ = writeln!(
            text,
            "{:<16} {:<20} {:<10} {:>15} {:>15}  {:<5} {:<16} IDENTITY",
            "NAMESPACE", "NAME", "STREAM", "SENT", "ACKED", "SYNC", "NODE"
        );
        for waypoint in waypoints.values() {
            let (stream, sent, acked, synced) = sync(waypoint);
            let field = |key: &str| waypoint[key].as_str().unwrap_or("-").to_owned();
            let _ = writeln!(
                text,
                "{:<16} {:<20} {stream:<10} {sent:>15} {acked:>15}  {synced:<5} {:<16} {}",
                field("namespace"),
                field("name"),
                field("node"),
                field("identity"),
            );
        }
    }
    Rendered { text, in_sync }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn status() -> Value {
        json!({
            "version": 7,
            "rejections": 0,
            "last_rejection": null,
            "agents": {
                "node1": {"connected": true, "streams": 1, "sent_version": 7, "acked_version": 7, "objects": 12,
                          "certificates_issued": 3, "certificates_refused": 0},
            },
            "waypoints": {
                "shop/waypoint": {"namespace": "shop", "name": "waypoint", "node": "node2",
                                  "identity": "spiffe://cluster.local/ns/shop/sa/waypoint",
                                  "connected": true, "streams": 2, "sent_version": 7, "acked_version": 6,
                                  "objects": 12, "certificates_issued": 1, "certificates_refused": 0},
            },
        })
    }

    #[test]
    fn waypoints_are_listed_apart_with_identity_and_sync_state() {
        let rendered = render(&status());
        let lines: Vec<&str> = rendered.text.lines().collect();
        let section = lines.iter().position(|l| *l == "WAYPOINTS").expect("a WAYPOINTS section");
        let agents = &lines[..section];
        assert!(agents.iter().any(|l| l.starts_with("node1 ") && l.ends_with("SYNCED")), "{}", rendered.text);
        assert!(!agents.iter().any(|l| l.contains("waypoint")), "a waypoint is no node: {}", rendered.text);
        assert!(lines[section + 1].starts_with("NAMESPACE") && lines[section + 1].ends_with("IDENTITY"));
        let row: Vec<&str> = lines[section + 2].split_whitespace().collect();
        assert_eq!(
            row,
            ["shop", "waypoint", "connected", "7", "6", "STALE", "node2", "spiffe://cluster.local/ns/shop/sa/waypoint"]
        );
        // A connected waypoint that has not acknowledged the running version fails the check.
        assert!(!rendered.in_sync);
    }

    #[test]
    fn a_gone_waypoint_does_not_fail_the_check_and_no_waypoints_means_no_section() {
        let mut status = status();
        status["waypoints"]["shop/waypoint"]["connected"] = false.into();
        let rendered = render(&status);
        assert!(rendered.in_sync, "{}", rendered.text);
        assert!(rendered.text.contains(" gone "), "{}", rendered.text);
        status["waypoints"] = json!({});
        assert!(!render(&status).text.contains("WAYPOINTS"));
        status.as_object_mut().unwrap().remove("waypoints");
        let rendered = render(&status);
        assert!(!rendered.text.contains("WAYPOINTS") && rendered.in_sync, "{}", rendered.text);
    }

    #[test]
    fn a_stale_agent_fails_the_check() {
        let mut status = status();
        status["waypoints"] = json!({});
        status["agents"]["node1"]["acked_version"] = 6.into();
        let rendered = render(&status);
        assert!(!rendered.in_sync);
        assert!(rendered.text.lines().any(|l| l.starts_with("node1 ") && l.ends_with("STALE")), "{}", rendered.text);
    }
}
