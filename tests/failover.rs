//! `broker.url` as a list: the nodes of one broker, tried in turn. When the node an agent is on
//! dies, it comes back through another within seconds, and goes on working there.
//!
//! The two "nodes" here are independent Mosquittos: what is tested is the agent's side (it
//! moves, with its state, and nothing runs twice); what a cluster shares between its nodes is
//! the cluster's part.

mod common;

use common::*;
use serde_json::json;
use std::time::Instant;

#[test]
fn an_agent_moves_to_the_next_node_when_its_node_dies_and_stays_there() {
    let mut first = Broker::start_default();
    let second = Broker::start_default();
    let d = "dev-failover";
    let mut config = first.agent_config(d);
    let urls = json!([first.url(Listener::Plain), second.url(Listener::Plain)]);
    merge(
        &mut config,
        json!({"broker": {"url": urls, "keepalive_s": 5}, "reconnect": {"min_s": 1, "max_s": 30}}),
    );
    let mut on_first = Sub::new(&first, &format!("tether/{d}/#"));
    let mut on_second = Sub::new(&second, &format!("tether/{d}/#"));
    let agent = Agent::start(config);
    on_first.expect_online(d, secs(15));
    on_first.expect_live_heartbeat(d, secs(5));
    on_second.expect_none("the agent on the second node while the first is up", secs(2), |m| {
        m.topic == status_topic(d)
    });

    drop(on_first);
    let killed = Instant::now();
    first.stop();
    on_second.expect_online(d, secs(10));
    let moved = killed.elapsed();
    println!("back online through the second node {moved:.1?} after the first died");
    assert!(moved < secs(5), "took {moved:?}");
    on_second.expect_live_heartbeat(d, secs(5));

    let topic = cmd_topic(d, "ping", "on-second");
    publish_json(&second, &topic, &json!({"status": "init"}), true);
    on_second.expect_json(&topic, "successful", secs(10), |v| v["status"] == "successful");

    // The first node comes back: the agent stays where it is (no flapping back).
    first.start_again();
    on_second.expect_none("a disconnect from the second node", secs(3), |m| {
        m.topic == status_topic(d) && m.payload.contains("\"online\":false")
    });
    let log = agent.log();
    assert!(log.contains(&format!("retrying at {}", second.url(Listener::Plain))), "{log}");
    assert_eq!(log.matches("connected to").count(), 2, "{log}");
}

#[test]
fn every_url_of_the_list_is_checked_and_named_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.json");
    let config = json!({"broker": {"url": ["mqtt://a.example", "http://b.example"]}, "state_dir": dir.path().join("s")});
    write_file(&path, &config.to_string());
    let out = run_agent(&["--config", path.to_str().unwrap(), "--check-config"]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(output_text(&out).contains("broker.url[1]:"), "{}", output_text(&out));
    write_file(&path, &json!({"broker": {"url": []}, "state_dir": dir.path().join("s")}).to_string());
    let out = run_agent(&["--config", path.to_str().unwrap(), "--check-config"]);
    assert!(
        output_text(&out).contains("broker.url: must be a URL, or a list of URLs"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn a_late_will_that_shows_a_connected_device_offline_is_corrected() {
    // On a cluster, a device that moved to another node can have its old connection's will
    // published after its new "online": the device itself must put it right.
    let broker = Broker::start_default();
    let d = "dev-latewill";
    let mut sub = Sub::new(&broker, &status_topic(d));
    let mut agent = Agent::start(broker.agent_config(d));
    let online = sub.expect_online(d, secs(15));
    let late_will = json!({"online": false, "version": env!("CARGO_PKG_VERSION")});
    publish_json(&broker, &status_topic(d), &late_will, true);
    sub.expect_offline(d, secs(5));
    let again = sub.expect_online(d, secs(5));
    assert_eq!(again["since"], online["since"], "the same connection: {again}");
    let mut late = Sub::new(&broker, &status_topic(d));
    let retained = late.expect("the retained status", secs(5), |_| true);
    assert_eq!(retained.json().unwrap()["online"], true, "{retained:?}");

    // Its own clean stop is not undone.
    drop(late);
    agent.term();
    sub.expect_offline(d, secs(5));
    sub.expect_none("an online status after the stop", secs(2), |m| m.payload.contains("\"online\":true"));
}
