//! The command path's promises under load and attack, through a real Mosquitto with stock
//! settings: every command runs once and gets exactly one final state, whatever the burst,
//! the outbox bound, and restarts of broker and agent; a burst never delays a heartbeat; hostile
//! ids and payloads cost nothing lasting; heartbeat seqs never repeat, even on a full or
//! read-only state filesystem.

mod common;

use common::raw::{RawClient, RawMsg};
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn init(params: Value) -> Vec<u8> {
    let mut payload = json!({"status": "init"});
    merge(&mut payload, params);
    payload.to_string().into_bytes()
}

fn pings(device: &str, ids: impl Iterator<Item = String>) -> Vec<(String, Vec<u8>)> {
    ids.map(|id| (cmd_topic(device, "ping", &id), init(json!({})))).collect()
}

fn states(broker: &Broker, device: &str) -> BTreeMap<String, Value> {
    RawClient::retained(broker.ports.plain, &format!("tether/{device}/cmd/+/+"))
        .into_iter()
        .map(|(topic, payload)| {
            let value = serde_json::from_slice(&payload).unwrap_or(Value::String(format!("{payload:?}")));
            (topic, value)
        })
        .collect()
}

fn is_final(v: &Value) -> bool {
    v["status"] == "successful" || v["status"] == "failed"
}

/// Waits until every one of `topics` holds a final state; returns them all.
fn wait_all_final(
    broker: &Broker,
    device: &str,
    topics: &[String],
    timeout: Duration,
) -> BTreeMap<String, Value> {
    let end = Instant::now() + timeout;
    loop {
        let now = states(broker, device);
        let pending: Vec<&String> = topics.iter().filter(|t| !now.get(*t).is_some_and(is_final)).collect();
        if pending.is_empty() {
            return now;
        }
        assert!(
            Instant::now() < end,
            "{} of {} commands without a final state after {timeout:?}, e.g. {} = {:?}",
            pending.len(),
            topics.len(),
            pending[0],
            now.get(pending[0])
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A reboot command that only writes down which command asked for it, in `marker`; the boot
/// id the agent reads is in `boot_id`.
struct FakeReboot {
    config: Value,
    marker: std::path::PathBuf,
    boot_id: std::path::PathBuf,
}

impl FakeReboot {
    fn new(dir: &Path) -> FakeReboot {
        let marker = dir.join("reboots");
        let boot_id = dir.join("boot_id");
        write_file(&boot_id, "11111111-1111-4111-8111-111111111111\n");
        let script = format!("echo \"$TETHER_COMMAND_ID\" >> '{}'", marker.display());
        FakeReboot { config: json!({"reboot_command": ["/bin/sh", "-c", script]}), marker, boot_id }
    }

    /// The agent's environment: where it reads the boot id.
    fn env(&self) -> [(&str, &str); 1] {
        [("TETHER_BOOT_ID_FILE", self.boot_id.to_str().unwrap())]
    }

    /// The system "reboots": a new boot id.
    fn new_boot(&self) {
        write_file(&self.boot_id, "22222222-2222-4222-8222-222222222222\n");
    }
}

#[test]
fn a_burst_of_600_commands_runs_each_once_across_broker_and_agent_restarts() {
    let mut broker = Broker::start_default();
    let d = "dev-burst600";
    let dir = tempfile::tempdir().unwrap();
    let reboot = FakeReboot::new(dir.path());
    let marker = &reboot.marker;
    let mut config = broker.agent_config(d);
    merge(&mut config, reboot.config.clone());
    // A tiny outbox: before, its bound dropped final states, and their commands ran again.
    merge(&mut config, json!({"offline_buffer": {"max_messages": 10}}));
    let mut sub = Sub::new(&broker, &status_topic(d));
    let mut agent = Agent::start_with_env(config, &reboot.env());
    sub.expect_online(d, secs(15));
    // Results carry agent_uptime_s: a command run again after a restart would show a smaller one.
    std::thread::sleep(secs(3));

    let mut burst = pings(d, (0..600).map(|i| format!("p{i:04}")));
    burst.insert(300, (cmd_topic(d, "reboot", "r1"), signed_init(d, "reboot", "r1", json!({}))));
    let topics: Vec<String> = burst.iter().map(|(t, _)| t.clone()).collect();
    RawClient::connect(broker.ports.plain, "operator").publish_all(&burst, true);
    let reboot_topic = cmd_topic(d, "reboot", "r1");
    let ping_topics: Vec<String> = topics.iter().filter(|t| **t != reboot_topic).cloned().collect();
    let first = wait_all_final(&broker, d, &ping_topics, secs(60));
    assert!(wait_until(secs(10), || read_to_string(marker).lines().count() == 1), "the reboot did not run");

    // The broker restarts, the agent is killed and restarts, the broker restarts again.
    drop(sub);
    broker.stop();
    broker.start_again();
    let mut sub = Sub::new(&broker, &status_topic(d));
    sub.expect_online(d, secs(30));
    agent.kill9();
    agent.restart();
    sub.expect_online(d, secs(30));
    drop(sub);
    broker.stop();
    broker.start_again();
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    sub.expect_online(d, secs(30));
    sub.expect_live_heartbeat(d, secs(10));
    sub.expect_live_heartbeat(d, secs(10));

    let after = wait_all_final(&broker, d, &topics, secs(30));
    for topic in &ping_topics {
        assert_eq!(after[topic], first[topic], "{topic}: its final state changed: it ran again");
    }
    assert_eq!(after[&reboot_topic]["status"], "failed", "{}", after[&reboot_topic]);
    assert_eq!(read_to_string(marker).lines().collect::<Vec<_>>(), ["r1"], "the reboot command ran again");
    let inits = after.values().filter(|v| v["status"] == "init").count();
    assert_eq!(inits, 0, "commands left unanswered");
}

#[test]
fn a_burst_of_5000_commands_never_delays_a_heartbeat_nor_costs_the_connection() {
    let mut broker = Broker::start_default();
    let d = "dev-burst5000";
    let mut config = broker.agent_config(d);
    merge(&mut config, json!({"broker": {"keepalive_s": 5}}));
    let mut sub = Sub::new(&broker, &status_topic(d));
    let mut agent = Agent::start(config);
    sub.expect_online(d, secs(15));
    std::thread::sleep(secs(3));

    // Heartbeats and status changes as they arrive, watched from another connection.
    let (tx, rx) = mpsc::channel::<RawMsg>();
    let mut watcher = RawClient::connect(broker.ports.plain, "watcher");
    watcher.subscribe(&[&heartbeat_topic(d), &status_topic(d)]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_watch = stop.clone();
    let watch = std::thread::spawn(move || {
        while !stop_watch.load(std::sync::atomic::Ordering::SeqCst) {
            if let Some(m) = watcher.next(Duration::from_millis(200)) {
                let _ = tx.send(m);
            }
        }
    });

    let burst = pings(d, (0..5000).map(|i| format!("b{i:05}")));
    let topics: Vec<String> = burst.iter().map(|(t, _)| t.clone()).collect();
    let started = Instant::now();
    RawClient::connect(broker.ports.plain, "operator").publish_all(&burst, true);
    // Each ran once; the broker keeps the newest 1,000 final states (the op history: the device
    // clears older ones no one cleared).
    let newest = &topics[topics.len() - 1000..];
    assert!(
        wait_until(secs(120), || finals_logged(&agent.log()).len() == 5000),
        "{} of 5000 commands finished",
        finals_logged(&agent.log()).len()
    );
    let took = started.elapsed();
    let first = wait_all_final(&broker, d, newest, secs(30));
    let once = finals_logged(&agent.log());
    assert!(once.values().all(|&n| n == 1), "a command finished twice");
    assert!(
        wait_until(secs(10), || states(&broker, d).len() <= 1100),
        "the history is bounded: {} states kept",
        states(&broker, d).len()
    );
    assert!(!states(&broker, d).contains_key(&topics[0]), "the oldest final state was cleared");
    std::thread::sleep(secs(3));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    watch.join().unwrap();
    let seen: Vec<RawMsg> = rx.try_iter().collect();
    let beats: Vec<Instant> =
        seen.iter().filter(|m| m.topic == heartbeat_topic(d) && !m.retained).map(|m| m.at).collect();
    let worst = beats.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    println!(
        "5000 commands answered in {took:.1?} ({:.0}/s); {} heartbeats meanwhile, worst gap {worst:.2?}",
        5000.0 / took.as_secs_f64(),
        beats.len()
    );
    assert!(beats.len() as u64 >= took.as_secs(), "{} heartbeats in {took:?}", beats.len());
    assert!(worst < Duration::from_millis(2000), "a heartbeat was delayed: gap {worst:?} at 1 s interval");
    let offline =
        seen.iter().filter(|m| m.topic == status_topic(d) && m.payload.starts_with(b"{\"online\":false"));
    assert_eq!(offline.count(), 0, "the broker gave the device up during the burst");
    assert_eq!(agent.log().matches("connected to").count(), 1, "the connection dropped");

    // Nothing runs again after a restart of both.
    agent.term();
    drop(sub);
    broker.stop();
    broker.start_again();
    let mut sub = Sub::new(&broker, &status_topic(d));
    agent.restart();
    sub.expect_online(d, secs(30));
    std::thread::sleep(secs(3));
    let after = wait_all_final(&broker, d, newest, secs(30));
    let changed = newest.iter().filter(|t| after[*t] != first[*t]).count();
    assert_eq!(changed, 0, "commands ran again after the restarts");
    assert_eq!(finals_logged(&agent.log()), once, "commands ran again after the restarts");
}

/// How many times the agent logged each ping's final state (`command ping/ID: successful`).
fn finals_logged(log: &str) -> BTreeMap<String, usize> {
    let mut finals = BTreeMap::new();
    for line in log.lines() {
        let Some(rest) = line.split("command ping/").nth(1) else { continue };
        if let Some((id, _)) = rest.split_once(": successful") {
            *finals.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    finals
}

#[test]
fn long_ids_are_refused_without_being_stored() {
    let broker = Broker::start_default();
    let d = "dev-longids";
    let config = broker.agent_config(d);
    let mut sub = Sub::builder(&broker, &status_topic(d)).also(&heartbeat_topic(d)).start();
    let agent = Agent::start(config);
    sub.expect_online(d, secs(15));
    sub.expect_live_heartbeat(d, secs(5));
    let rss_before = vm_rss_kb(agent.pid());

    let burst = pings(d, (0..200).map(|i| format!("{i:03}{}", "x".repeat(60_000))));
    let topics: Vec<String> = burst.iter().map(|(t, _)| t.clone()).collect();
    RawClient::connect(broker.ports.plain, "operator").publish_all(&burst, true);
    let after = wait_all_final(&broker, d, &topics, secs(60));
    for topic in &topics {
        assert_eq!(after[topic]["status"], "failed");
        let reason = after[topic]["reason"].as_str().unwrap();
        assert!(reason.contains("id too long") && reason.contains("128"), "{reason}");
    }
    sub.expect_live_heartbeat(d, secs(5));
    let rss_after = vm_rss_kb(agent.pid());
    let state_bytes: u64 = std::fs::read_dir(agent.state_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    println!("RSS {rss_before} kB before, {rss_after} kB after; state files {state_bytes} bytes");
    assert!(state_bytes < 4096, "the ids were stored: {state_bytes} bytes in the state dir");
    // Before: 200 such ids took RSS from 3.3 to 48 MB for good.
    assert!(rss_after < rss_before + 3072, "RSS grew from {rss_before} kB to {rss_after} kB");
    let longest = agent.log().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1000, "a log line of {longest} bytes");
}

#[test]
fn garbage_on_a_known_commands_topic_changes_nothing() {
    let broker = Broker::start_default();
    let d = "dev-garbage";
    let dir = tempfile::tempdir().unwrap();
    let reboot = FakeReboot::new(dir.path());
    let marker = &reboot.marker;
    let mut config = broker.agent_config(d);
    merge(&mut config, reboot.config.clone());
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let mut agent = Agent::start_with_env(config, &reboot.env());
    sub.expect_online(d, secs(15));

    let reboot_topic = cmd_topic(d, "reboot", "r1");
    publish(&broker, &reboot_topic, &signed_init(d, "reboot", "r1", json!({})), true);
    sub.expect_json(&reboot_topic, "executing", secs(10), |v| v["status"] == "executing");
    assert!(wait_until(secs(10), || read_to_string(marker).contains("r1")), "the reboot did not run");
    let ping_topic = cmd_topic(d, "ping", "p1");
    publish(&broker, &ping_topic, &init(json!({})), true);
    sub.expect_json(&ping_topic, "successful", secs(10), |v| v["status"] == "successful");

    for topic in [&reboot_topic, &ping_topic] {
        publish(&broker, topic, b"{\"status\": garbage", true);
        publish(&broker, topic, b"\x00\xff not json", true);
    }
    sub.expect_none("an answer to garbage", secs(2), |m| {
        (m.topic == reboot_topic || m.topic == ping_topic) && m.json().is_some()
    });

    // The reboot happens: the next agent still confirms it.
    agent.term();
    reboot.new_boot();
    agent.restart();
    let state = sub.expect_json(&reboot_topic, "the reboot confirmed", secs(15), is_final);
    assert_eq!(state["status"], "successful", "{state}");
    assert_eq!(read_to_string(marker).lines().count(), 1);
}

#[test]
fn bad_parameters_and_long_ids_are_refused_with_a_reason() {
    let broker = Broker::start_default();
    let d = "dev-params";
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let _agent = Agent::start(broker.agent_config(d));
    sub.expect_online(d, secs(15));
    let topic = cmd_topic(d, "ping", "extra");
    publish(&broker, &topic, &init(json!({"force": true})), true);
    let state = sub.expect_json(&topic, "failed", secs(10), is_final);
    assert_eq!(state["reason"], "unknown parameter \"force\" (ping takes: none)", "{state}");
    // Cleared and sent again as it was: a new request, answered again.
    publish(&broker, &topic, b"", true);
    publish(&broker, &topic, &init(json!({"force": true})), true);
    let again = sub.expect_json(&topic, "failed again", secs(10), is_final);
    assert_eq!(again, state);
    let topic = cmd_topic(d, "ping", &"y".repeat(129));
    publish(&broker, &topic, &init(json!({})), true);
    let state = sub.expect_json(&topic, "failed", secs(10), is_final);
    assert_eq!(state["reason"], "command id too long: 129 bytes (limit 128)", "{state}");
    let topic = cmd_topic(d, "ping", &"z".repeat(128));
    publish(&broker, &topic, &init(json!({})), true);
    let state = sub.expect_json(&topic, "successful", secs(10), is_final);
    assert_eq!(state["status"], "successful", "{state}");
}

#[test]
fn a_final_state_lost_in_a_crash_is_published_by_the_next_start() {
    // A command answered just before kill -9, with the broker down: the answer was only in
    // memory. The next start must publish it, and not run the command again.
    let mut broker = Broker::start_default();
    let d = "dev-lostfinal";
    let dir = tempfile::tempdir().unwrap();
    let reboot = FakeReboot::new(dir.path());
    let marker = &reboot.marker;
    let mut config = broker.agent_config(d);
    merge(&mut config, reboot.config.clone());
    let env = reboot.env();
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let mut agent = Agent::start_with_env(config, &env);
    sub.expect_online(d, secs(15));
    let topic = cmd_topic(d, "reboot", "r1");
    publish(&broker, &topic, &signed_init(d, "reboot", "r1", json!({})), true);
    sub.expect_json(&topic, "executing", secs(10), |v| v["status"] == "executing");
    drop(sub);
    broker.stop();
    // The "reboot" happens while the broker is away; the new agent settles it, then dies.
    agent.term();
    reboot.new_boot();
    agent.restart();
    assert!(agent.wait_log("reboot/r1: successful", secs(10)), "the reboot was not settled");
    agent.kill9();
    broker.start_again();
    agent.restart();
    let mut sub = Sub::new(&broker, &topic);
    let state = sub.expect_json(&topic, "the final state", secs(15), is_final);
    assert_eq!(state["status"], "successful", "{state}");
    assert_eq!(read_to_string(marker).lines().count(), 1, "the reboot command ran again");
}
