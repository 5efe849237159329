//! `meshctl status`: the controllers' `/status` JSON ([`crate::server::Controller::status`])
//! as text. Agents (one per node) and waypoints (one per `Gateway`, replicas together)
//! are listed apart, each with the version it was sent, the one it acknowledged and
//! whether that is the running one.
//!
//! Every controller replica serves the agents and waypoints that connected to it, and
//! each replica numbers its own versions, so a client is in sync when it acknowledged
//! the running version *of the replica it is connected to*. With several replicas
//! ([`render_replicas`]) the lists are merged: a client is shown where it is connected
//! (a restarted agent may still be remembered as gone by the replica it left), with a
//! `CONTROLLER` column naming the replica.
use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::Value;

/// What `meshctl status` prints, and whether every connected client is in sync (its
/// exit status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub in_sync: bool,
}

/// One controller replica's `/status`, or why it could not be read.
#[derive(Clone, Debug)]
pub struct Replica {
    /// The replica's pod name, or the address asked.
    pub name: String,
    pub status: Result<Value, String>,
}

/// Renders one controller's `/status` document. Missing fields read as zero or empty
/// (an older controller has no `waypoints`), never as a failure.
pub fn render(status: &Value) -> Rendered {
    render_replicas(&[Replica { name: String::new(), status: Ok(status.clone()) }])
}

/// One client's row: the replica it is listed by, that replica's running version, and
/// the client's entry.
struct Row<'a> {
    replica: &'a str,
    version: u64,
    client: &'a Value,
}

impl Row<'_> {
    fn connected(&self) -> bool {
        self.client["connected"] == true
    }

    fn acked(&self) -> u64 {
        self.client["acked_version"].as_u64().unwrap_or(0)
    }

    /// STREAM, SENT, ACKED and SYNC.
    fn sync(&self) -> (&'static str, u64, u64, &'static str) {
        (
            if self.connected() { "connected" } else { "gone" },
            self.client["sent_version"].as_u64().unwrap_or(0),
            self.acked(),
            if self.acked() == self.version { "SYNCED" } else { "STALE" },
        )
    }
}

/// The rows of one list (`agents` or `waypoints`) over all replicas, by key: every
/// replica that has the client connected, or else the first that remembers it.
fn merged<'a>(replicas: &'a [(&'a str, &'a Value)], list: &str) -> BTreeMap<&'a str, Vec<Row<'a>>> {
    let mut rows: BTreeMap<&str, Vec<Row>> = BTreeMap::new();
    for &(replica, status) in replicas {
        let version = status["version"].as_u64().unwrap_or(0);
        for (key, client) in status[list].as_object().into_iter().flatten() {
            rows.entry(key.as_str()).or_default().push(Row { replica, version, client });
        }
    }
    for entries in rows.values_mut() {
        if entries.iter().any(Row::connected) {
            entries.retain(Row::connected);
        } else {
            entries.truncate(1);
        }
    }
    rows
}

/// Renders the `/status` of every replica asked (one, without the `CONTROLLER` column,
/// is what a single controller shows). The check fails on a connected client that is
/// not in sync with its replica, and on a replica that could not be read.
pub fn render_replicas(replicas: &[Replica]) -> Rendered {
    let several = replicas.len() > 1;
    let mut text = String::new();
    let mut in_sync = true;
    let mut answered = Vec::new();
    for replica in replicas {
        let name = if replica.name.is_empty() { String::new() } else { format!(" {}", replica.name) };
        match &replica.status {
            Ok(status) => {
                let version = status["version"].as_u64().unwrap_or(0);
                let _ = writeln!(
                    text,
                    "controller{name}: config version {version}, {} rejected changes",
                    status["rejections"]
                );
                if let Some(reason) = status["last_rejection"].as_str() {
                    let _ = writeln!(text, "last rejection{}:\n{reason}", if several { name.as_str() } else { "" });
                }
                answered.push((replica.name.as_str(), status));
            }
            Err(error) => {
                in_sync = false;
                let _ = writeln!(text, "controller{name}: not read: {error}");
            }
        }
    }
    if answered.is_empty() {
        return Rendered { text, in_sync: false };
    }
    let controller = |row: &Row| if several { format!("{:<20} ", row.replica) } else { String::new() };
    let column = if several { format!("{:<20} ", "CONTROLLER") } else { String::new() };
    let _ = writeln!(
        text,
        "{:<16} {column}{:<10} {:>15} {:>15} {:>8} {:>6}  SYNC",
        "NODE", "STREAM", "SENT", "ACKED", "OBJECTS", "CERTS"
    );
    for (node, rows) in merged(&answered, "agents") {
        for row in rows {
            let (stream, sent, acked, synced) = row.sync();
            in_sync &= synced == "SYNCED" || !row.connected();
            let _ = writeln!(
                text,
                "{node:<16} {}{stream:<10} {sent:>15} {acked:>15} {:>8} {:>6}  {synced}",
                controller(&row),
                row.client["objects"].as_u64().unwrap_or(0),
                row.client["certificates_issued"].as_u64().unwrap_or(0),
            );
        }
    }
    let waypoints = merged(&answered, "waypoints");
    if !waypoints.is_empty() {
        let _ = writeln!(text, "\nWAYPOINTS");
        let _ = writeln!(
            text,
            "{:<16} {:<20} {column}{:<10} {:>15} {:>15}  {:<5} {:<16} IDENTITY",
            "NAMESPACE", "NAME", "STREAM", "SENT", "ACKED", "SYNC", "NODE"
        );
        for row in waypoints.into_values().flatten() {
            let (stream, sent, acked, synced) = row.sync();
            in_sync &= synced == "SYNCED" || !row.connected();
            let field = |key: &str| row.client[key].as_str().unwrap_or("-").to_owned();
            let _ = writeln!(
                text,
                "{:<16} {:<20} {}{stream:<10} {sent:>15} {acked:>15}  {synced:<5} {:<16} {}",
                field("namespace"),
                field("name"),
                controller(&row),
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

    /// Two replicas with their own versions: node1 restarted and reconnected to `b`,
    /// `a` still remembers its old stream; node2 was only ever on `a`.
    fn two_replicas() -> Vec<Replica> {
        let mut a = status();
        a["waypoints"] = json!({});
        a["agents"]["node1"]["connected"] = false.into();
        a["agents"]["node1"]["acked_version"] = 5.into();
        a["agents"]["node2"] = a["agents"]["node1"].clone();
        a["agents"]["node2"]["connected"] = true.into();
        a["agents"]["node2"]["acked_version"] = 7.into();
        let mut b = status();
        b["version"] = 9.into();
        b["agents"]["node1"]["acked_version"] = 9.into();
        b["waypoints"]["shop/waypoint"]["acked_version"] = 9.into();
        vec![
            Replica { name: "controller-a".into(), status: Ok(a) },
            Replica { name: "controller-b".into(), status: Ok(b) },
        ]
    }

    fn rows<'t>(text: &'t str, first: &str) -> Vec<Vec<&'t str>> {
        text.lines().filter(|l| l.starts_with(first)).map(|l| l.split_whitespace().collect()).collect()
    }

    #[test]
    fn replicas_are_merged_each_client_checked_against_its_own_replica() {
        let rendered = render_replicas(&two_replicas());
        let text = &rendered.text;
        assert!(
            text.starts_with(
                "controller controller-a: config version 7, 0 rejected changes
"
            ),
            "{text}"
        );
        assert!(text.contains("\ncontroller controller-b: config version 9, 0 rejected changes\n"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("NODE ") && l.contains(" CONTROLLER ")), "{text}");
        // node1 is shown where it is connected, not as gone at the replica it left.
        assert_eq!(rows(text, "node1 "), [["node1", "controller-b", "connected", "7", "9", "12", "3", "SYNCED"]]);
        // node2 acknowledged a's version 7: in sync there, though b runs 9.
        assert_eq!(rows(text, "node2 "), [["node2", "controller-a", "connected", "7", "7", "12", "3", "SYNCED"]]);
        let waypoint = rows(text, "shop ");
        assert_eq!(waypoint.len(), 1, "{text}");
        assert_eq!(waypoint[0][..6], ["shop", "waypoint", "controller-b", "connected", "7", "9"]);
        assert!(rendered.in_sync, "{text}");

        // The same client stale at its replica fails the check.
        let mut replicas = two_replicas();
        replicas[1].status.as_mut().unwrap()["agents"]["node1"]["acked_version"] = 8.into();
        assert!(!render_replicas(&replicas).in_sync);
    }

    #[test]
    fn a_client_gone_everywhere_is_shown_once_and_an_unread_replica_fails_the_check() {
        let mut replicas = two_replicas();
        replicas[1].status.as_mut().unwrap()["agents"]["node1"]["connected"] = false.into();
        let rendered = render_replicas(&replicas);
        assert_eq!(rows(&rendered.text, "node1 ").len(), 1, "{}", rendered.text);
        assert_eq!(rows(&rendered.text, "node1 ")[0][1..3], ["controller-a", "gone"]);
        assert!(rendered.in_sync, "{}", rendered.text);

        replicas.push(Replica { name: "controller-c".into(), status: Err("connect 10.0.0.3:15014: refused".into()) });
        let rendered = render_replicas(&replicas);
        assert!(!rendered.in_sync);
        assert!(rendered.text.contains("\ncontroller controller-c: not read: connect 10.0.0.3:15014: refused\n"));
        // Still lists what the others said.
        assert_eq!(rows(&rendered.text, "node2 ").len(), 1, "{}", rendered.text);
    }

    #[test]
    fn one_replica_renders_without_the_controller_column() {
        let text = render(&status()).text;
        assert!(text.starts_with("controller: config version 7, 0 rejected changes\n"), "{text}");
        assert!(!text.contains("CONTROLLER"), "{text}");
        assert_eq!(rows(&text, "node1 "), [["node1", "connected", "7", "7", "12", "3", "SYNCED"]]);
    }
}
