//! Remote commands: retained `{"status":"init"}` on `tether/D/cmd/OP/ID`, answered on the same
//! topic with `executing` then `successful` or `failed`.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn start(broker: &Broker, device: &str, patch: Value) -> (Agent, Sub) {
    let mut config = broker.agent_config(device);
    merge(&mut config, patch);
    let mut sub = Sub::new(broker, &format!("tether/{device}/#"));
    let agent = Agent::start(config);
    sub.expect_online(device, secs(15));
    (agent, sub)
}

/// Publishes a command (retained `{"status":"init", ...params}`); returns its topic.
/// Sends a request the way tetherctl does: signed by the tests' operator.
fn send(broker: &Broker, device: &str, op: &str, id: &str, params: Value) -> String {
    let topic = cmd_topic(device, op, id);
    publish(broker, &topic, &signed_init(device, op, id, params), true);
    topic
}

fn is_final(v: &Value) -> bool {
    v["status"] == "successful" || v["status"] == "failed"
}

/// Waits for the command's final state.
fn final_state(sub: &mut Sub, topic: &str) -> Value {
    sub.expect_json(topic, "a final status (successful or failed)", secs(15), is_final)
}

/// Waits for `successful`, checking nothing but `executing` came between the request and it
/// (instant ops go straight to their final state); returns the result.
fn expect_successful(sub: &mut Sub, topic: &str) -> Value {
    let state = final_state(sub, topic);
    assert_eq!(state["status"], "successful", "{topic}: {state}");
    let states: Vec<Value> =
        sub.seen().iter().filter(|m| m.topic == topic).filter_map(|m| m.json()).collect();
    let done = states.iter().position(is_final).unwrap();
    let init = states.iter().position(|s| s["status"] == "init");
    let between = &states[init.map_or(0, |i| i + 1)..done];
    assert!(between.iter().all(|s| s["status"] == "executing"), "{topic}: {states:?}");
    state["result"].clone()
}

fn expect_failed(sub: &mut Sub, topic: &str) -> String {
    let state = final_state(sub, topic);
    assert_eq!(state["status"], "failed", "{topic}: {state}");
    let reason = state["reason"].as_str().unwrap_or_else(|| panic!("failed without a reason: {state}"));
    assert!(!reason.is_empty(), "failed with an empty reason");
    reason.to_string()
}

/// After a bad command: the agent still runs, stays online, heartbeats go on, a ping works.
fn assert_unharmed(broker: &Broker, agent: &mut Agent, sub: &mut Sub, device: &str) {
    let a = sub.expect_live_heartbeat(device, secs(5));
    let b = sub.expect_live_heartbeat(device, secs(5));
    assert!(b["seq"].as_u64() > a["seq"].as_u64());
    assert!(agent.running(), "the agent exited");
    assert!(
        !sub.seen().iter().any(|m| m.topic == status_topic(device) && m.payload.contains("\"online\":false")),
        "the device went offline"
    );
    let topic = send(broker, device, "ping", "after-bad-command", json!({}));
    expect_successful(sub, &topic);
}

#[test]
fn advertises_the_supported_ops() {
    let broker = Broker::start_default();
    let (_agent, _sub) = start(&broker, "dev-ops", json!({}));
    let mut late = Sub::new(&broker, "tether/dev-ops/cmd/+");
    for op in ["ping", "heartbeat", "config", "reboot", "keys"] {
        let topic = format!("tether/dev-ops/cmd/{op}");
        let m = late.expect(&format!("the advertisement of {op}"), secs(5), |m| m.topic == topic);
        assert!(m.retained, "{topic} is not retained");
        assert_eq!(m.json(), Some(json!({})), "{topic}");
    }
}

#[test]
fn ping_answers_and_is_cleared_by_the_operator() {
    let broker = Broker::start_default();
    let d = "dev-ping";
    let (_agent, mut sub) = start(&broker, d, json!({}));
    let topic = send(&broker, d, "ping", "p1", json!({}));
    let result = expect_successful(&mut sub, &topic);
    assert_eq!(result["version"], env!("CARGO_PKG_VERSION"), "result: {result}");
    assert!(result["uptime_s"].is_u64(), "result: {result}");

    // The final state is retained.
    let mut late = Sub::new(&broker, &topic);
    let m = late.expect("the retained final state", secs(5), |_| true);
    assert!(m.retained && m.json().unwrap()["status"] == "successful", "{m:?}");
    drop(late);

    // The operator clears it; the agent leaves it cleared.
    publish(&broker, &topic, b"", true);
    sub.expect("the clearing message", secs(5), |m| m.topic == topic && m.payload.is_empty());
    sub.expect_none("the agent answering a cleared command", secs(2), |m| m.topic == topic);
    let mut late = Sub::new(&broker, &topic);
    late.expect_none("a retained message on a cleared command", Duration::from_millis(500), |_| true);
}

#[test]
fn heartbeat_command_publishes_one_now() {
    let broker = Broker::start_default();
    let d = "dev-hbcmd";
    let (_agent, mut sub) = start(&broker, d, json!({"heartbeat": {"interval_s": 60}}));
    // Whatever heartbeat it sends on connecting comes within a moment.
    let before = sub.collect(Duration::from_millis(1500));
    let last = before
        .iter()
        .filter(|m| m.topic == heartbeat_topic(d) && !m.retained)
        .filter_map(|m| m.json()?["seq"].as_u64())
        .max();
    let topic = send(&broker, d, "heartbeat", "h1", json!({}));
    let result = expect_successful(&mut sub, &topic);
    // The new heartbeat: already here (before or with the answer), or coming.
    let is_new = |m: &Msg| {
        m.topic == heartbeat_topic(d)
            && !m.retained
            && m.json().and_then(|v| v["seq"].as_u64()).is_some_and(|s| last.is_none_or(|l| s > l))
    };
    let hb = sub.expect_any_time("a new heartbeat", secs(5), is_new);
    let seq = hb.json().unwrap()["seq"].as_u64().unwrap();
    if let Some(s) = result.get("seq") {
        assert_eq!(s.as_u64(), Some(seq), "result: {result}");
    }
}

#[test]
fn config_command_returns_the_config_without_secrets() {
    const SECRET: &str = "pw-7f3e-SECRET-91ab";
    let d = "dev-cfg";
    let broker = Broker::start(BrokerOpts::default().anonymous(false).user(d, SECRET));
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("broker-password");
    write_file(&pw, &format!("{SECRET}\n"));
    let (agent, mut sub) = start(&broker, d, json!({"broker": {"username": d, "password_file": pw}}));
    let topic = send(&broker, d, "config", "c1", json!({}));
    let result = expect_successful(&mut sub, &topic);
    assert_eq!(result["device_id"], d, "result: {result}");
    assert_eq!(result["broker"]["url"], broker.url(Listener::Plain), "result: {result}");
    assert_eq!(result["broker"]["username"], d, "result: {result}");
    assert_eq!(result["heartbeat"]["interval_s"], 1, "result: {result}");
    assert!(!result.to_string().contains(SECRET), "the password is in the config result: {result}");
    sub.expect_live_heartbeat(d, secs(5));
    let leaked: Vec<&Msg> = sub.seen().iter().filter(|m| m.payload.contains(SECRET)).collect();
    assert!(leaked.is_empty(), "the password was published: {leaked:?}");
    assert!(!agent.log_contains(SECRET), "the password is in the agent's log");
}

#[test]
fn reboot_runs_the_command_and_succeeds_after_the_boot_id_changes() {
    let broker = Broker::start_default();
    let d = "dev-reboot";
    let dir = tempfile::tempdir().unwrap();
    let boot_id = dir.path().join("boot_id");
    write_file(&boot_id, "11111111-1111-4111-8111-111111111111\n");
    let marker = dir.path().join("rebooted");
    let mut config = broker.agent_config(d);
    merge(
        &mut config,
        json!({"reboot_command": ["/bin/sh", "-c", format!("echo rebooted >> '{}'", marker.display())]}),
    );
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let boot_env = boot_id.to_str().unwrap();
    let mut agent = Agent::start_with_env(config, &[("TETHER_BOOT_ID_FILE", boot_env)]);
    sub.expect_online(d, secs(15));

    let topic = send(&broker, d, "reboot", "r1", json!({}));
    sub.expect_json(&topic, "executing", secs(10), |v| v["status"] == "executing");
    assert!(
        wait_until(secs(10), || read_to_string(&marker).contains("rebooted")),
        "reboot_command did not run"
    );
    // Not successful yet: that is for the agent after the reboot to say.
    sub.expect_none("a final state before the reboot", secs(1), |m| {
        m.topic == topic && m.json().is_some_and(|v| is_final(&v))
    });

    // "Reboot": a new boot id, a new agent.
    agent.term();
    write_file(&boot_id, "22222222-2222-4222-8222-222222222222\n");
    agent.restart();
    let state = final_state(&mut sub, &topic);
    assert_eq!(state["status"], "successful", "after the reboot: {state}");
    assert_eq!(read_to_string(&marker).lines().count(), 1, "reboot_command ran again");

    // Another restart, same boot: the retained command is not run again.
    agent.restart();
    sub.expect_online(d, secs(15));
    sub.expect_live_heartbeat(d, secs(10));
    sub.expect_live_heartbeat(d, secs(10));
    sub.expect_none("the command answered again", secs(1), |m| m.topic == topic);
    assert_eq!(read_to_string(&marker).lines().count(), 1, "reboot_command ran again");
}

#[test]
fn a_done_command_is_not_run_again_after_a_restart() {
    let broker = Broker::start_default();
    let d = "dev-rerun";
    let (mut agent, mut sub) = start(&broker, d, json!({}));
    let topic = send(&broker, d, "ping", "once", json!({}));
    expect_successful(&mut sub, &topic);
    agent.restart();
    sub.expect_online(d, secs(15));
    sub.expect_live_heartbeat(d, secs(10));
    sub.expect_live_heartbeat(d, secs(10));
    sub.expect_none("the command answered again", secs(1), |m| m.topic == topic);
}

#[test]
fn a_command_sent_while_the_agent_is_down_runs_when_it_comes_up() {
    let mut broker = Broker::start_default();
    let d = "dev-late";
    let (mut agent, mut sub) = start(&broker, d, json!({}));
    agent.term();
    sub.expect_offline(d, secs(5));
    let topic = send(&broker, d, "ping", "while-down", json!({}));
    // The broker restarts too: the retained command persists.
    drop(sub);
    broker.stop();
    broker.start_again();
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let m = sub.expect("the retained command", secs(5), |m| m.topic == topic);
    assert!(m.retained && m.json().unwrap()["status"] == "init");
    agent.restart();
    let result = expect_successful(&mut sub, &topic);
    assert!(result["uptime_s"].is_u64(), "result: {result}");
}

#[test]
fn unknown_op_fails_naming_it() {
    let broker = Broker::start_default();
    let d = "dev-unknown";
    let (mut agent, mut sub) = start(&broker, d, json!({}));
    let topic = send(&broker, d, "frobnicate", "u1", json!({"level": 3}));
    let reason = expect_failed(&mut sub, &topic);
    assert!(reason.contains("frobnicate"), "reason: {reason}");
    assert_unharmed(&broker, &mut agent, &mut sub, d);
}

#[test]
fn malformed_json_fails() {
    let broker = Broker::start_default();
    let d = "dev-malformed";
    let (mut agent, mut sub) = start(&broker, d, json!({}));
    let topic = cmd_topic(d, "ping", "m1");
    publish(&broker, &topic, b"{\"status\": \"init\", oops", true);
    expect_failed(&mut sub, &topic);
    assert_unharmed(&broker, &mut agent, &mut sub, d);
}

#[test]
fn oversized_payload_fails_mentioning_its_size() {
    let broker = Broker::start_default();
    let d = "dev-big";
    let (mut agent, mut sub) = start(&broker, d, json!({}));
    let topic = cmd_topic(d, "ping", "big1");
    let payload = json!({"status": "init", "pad": "x".repeat(1024 * 1024)}).to_string();
    publish(&broker, &topic, payload.as_bytes(), true);
    let reason = expect_failed(&mut sub, &topic).to_lowercase();
    assert!(
        ["size", "large", "big", "bytes", "limit", "kib"].iter().any(|w| reason.contains(w)),
        "the reason does not mention the size: {reason}"
    );
    assert_unharmed(&broker, &mut agent, &mut sub, d);
}

#[test]
fn an_oversized_retained_command_over_wss_is_refused_without_dropping_the_link() {
    // Over the agent's packet bound (256 KiB), so it is skipped as it streams in through the
    // WebSocket frames. Mosquitto 2.0 sends big messages over websockets at ~40 KB/s, so it
    // takes longer than the keepalive to pass: the bytes themselves must count as life.
    let broker = Broker::start_default();
    let d = "dev-huge";
    let wss =
        json!({"broker": {"url": broker.url(Listener::Wss), "ca_file": broker.ca_file(), "keepalive_s": 5}});
    let (mut agent, mut sub) = start(&broker, d, wss);
    let topic = cmd_topic(d, "ping", "huge1");
    let payload = json!({"status": "init", "pad": "x".repeat(400 * 1024)}).to_string();
    publish(&broker, &topic, payload.as_bytes(), true);
    let state = sub.expect_json(&topic, "a final status", secs(30), is_final);
    assert_eq!(state["status"], "failed", "{state}");
    assert!(state["reason"].as_str().is_some_and(|r| r.contains("too large")), "{state}");
    assert_unharmed(&broker, &mut agent, &mut sub, d);
    let connects = agent.log().matches("connected to wss://").count();
    assert_eq!(connects, 1, "the agent reconnected {} time(s)", connects.saturating_sub(1));
}
