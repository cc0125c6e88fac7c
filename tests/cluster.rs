//! The fleet on a real multi-node broker: three aedes nodes sharing state through Redis
//! (tests/common/cluster.rs), with devices and operators on different nodes. What a user moving
//! from one Mosquitto to a cluster relies on: the device list, commands queued for an offline
//! device, last wills, and agents moving to another node when theirs dies, with nothing run
//! twice.

mod common;

use common::cluster::Cluster;
use common::raw::RawClient;
use common::*;
use serde_json::{json, Value};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

const CTL_BIN: &str = env!("CARGO_BIN_EXE_tetherctl");
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn ctl(args: &[&str]) -> Output {
    let mut cmd = Command::new(CTL_BIN);
    cmd.args(args).stdin(Stdio::null());
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("TETHER_") || k == "RUST_LOG") {
        cmd.env_remove(key);
    }
    // Devices met in earlier tests had other keys: each run meets them anew.
    let known_devices = tempfile::tempdir().unwrap();
    cmd.env("TETHER_KNOWN_DEVICES", known_devices.path().join("known_devices"));
    cmd.output().unwrap()
}

fn ctl_ok(args: &[&str]) -> String {
    let out = ctl(args);
    assert_eq!(out.status.code(), Some(0), "tetherctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn devices(url: &str) -> Vec<Value> {
    serde_json::from_str(&ctl_ok(&["--broker", url, "devices", "--json"])).expect("JSON")
}

fn online(devices: &[Value], id: &str) -> bool {
    devices.iter().any(|d| d["id"] == id && d["online"] == json!(true) && d["version"] == VERSION)
}

/// The commands the agent started running, from its log (kept across restarts), each checked
/// to have started once; their number.
fn commands_run_once(agent: &Agent) -> usize {
    let mut started = std::collections::BTreeMap::new();
    for line in agent.log().lines() {
        if let Some((rest, _)) = line.split("command ").nth(1).and_then(|r| r.split_once(": executing")) {
            *started.entry(rest.to_string()).or_insert(0) += 1;
        }
    }
    let twice: Vec<_> = started.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "commands run more than once: {twice:?}");
    started.len()
}

/// Agent `device` connected to node 0, and its status watched from node 1 until it is online.
fn online_on_node_0(cluster: &Cluster, device: &str) -> (Agent, Sub) {
    let agent = Agent::start(cluster.agent_config(device, 0));
    let mut status = Sub::builder_at(cluster.port(1), &status_topic(device)).start();
    status.expect_online(device, secs(15));
    (agent, status)
}

/// Waits until each of `devices` has published a status that `pred` accepts, in any order.
fn expect_each(sub: &mut Sub, devices: &[String], what: &str, pred: impl Fn(&Value) -> bool) {
    let mut pending: Vec<&String> = devices.iter().collect();
    sub.expect(&format!("{what} from each of {devices:?}"), secs(15), |m| {
        if serde_json::from_str::<Value>(&m.payload).is_ok_and(|v| pred(&v)) {
            pending.retain(|d| m.topic != status_topic(d));
        }
        pending.is_empty()
    });
}

/// Runs `op` on `device` through node `url`; it must succeed.
fn run_command(url: &str, device: &str, op: &str) {
    let answer: Value = serde_json::from_str(&ctl_ok(&["--broker", url, "cmd", device, op])).expect("JSON");
    assert_eq!(answer["status"], "successful", "{device} {op}: {answer}");
}

/// Each agent is on a different node, tetherctl on each node in turn: every node lists all
/// three, and a fleet of 3,000 more (filled through one node) completely, though aedes streams
/// retained messages from Redis after the SUBACK and in no particular order.
#[test]
fn every_node_lists_every_device_whatever_node_it_is_on() {
    const FLEET: usize = 3_000;
    let cluster = Cluster::start(3);
    let ids: Vec<String> = (0..3).map(|i| format!("dev-on-n{i}")).collect();
    let _agents: Vec<Agent> = (0..3).map(|i| Agent::start(cluster.agent_config(&ids[i], i))).collect();
    let mut fleet = Vec::new();
    for i in 0..FLEET {
        let device = format!("dev-{i:05}");
        let status = json!({"online": false, "version": "0.0.9", "since": 1});
        fleet.push((status_topic(&device), status.to_string().into_bytes()));
        fleet.push((heartbeat_topic(&device), json!({"seq": i, "ts": 1}).to_string().into_bytes()));
    }
    RawClient::connect(cluster.port(0), "filler").publish_all(&fleet, true);

    for node in 0..3 {
        let url = cluster.url(node);
        let mut listed = Vec::new();
        let all_online = wait_until(secs(20), || {
            listed = devices(&url);
            ids.iter().all(|id| online(&listed, id))
        });
        assert!(all_online, "node {node}: the three agents online: {listed:?}");
        assert_eq!(listed.len(), FLEET + 3, "node {node}: every device, once");
        for (i, device) in listed.iter().filter(|d| d["version"] == "0.0.9").enumerate() {
            assert_eq!(device["id"], format!("dev-{i:05}"), "node {node}");
            assert_eq!(device["heartbeat"]["seq"], json!(i), "node {node}: {device}");
        }
    }

    // Over wss too, as an operator behind a web proxy would reach it.
    let ca = cluster.ca_file();
    let out = ctl_ok(&["--broker", &cluster.wss_url(1), "--ca", ca.to_str().unwrap(), "devices", "--json"]);
    let listed: Vec<Value> = serde_json::from_str(&out).expect("JSON");
    assert_eq!(listed.len(), FLEET + 3, "over wss: every device");
}

/// A command queued through one node while the device is away runs once when the device comes
/// back through another, and its answer is read through the third.
#[test]
fn a_command_queued_for_an_offline_device_runs_once_when_it_comes_back_elsewhere() {
    let cluster = Cluster::start(3);
    let d = "dev-away";
    let (mut agent, mut status) = online_on_node_0(&cluster, d);
    agent.term();
    status.expect_offline(d, secs(10));

    let out = ctl(&["--broker", &cluster.url(1), "cmd", d, "ping", "--timeout", "1", "--queue"]);
    let topic = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(topic.starts_with(&format!("tether/{d}/cmd/ping/")), "queued: {topic:?} {out:?}");

    agent.write_config(cluster.agent_config(d, 2));
    agent.restart();
    let answered = wait_until(secs(20), || {
        let cmds: Value =
            serde_json::from_str(&ctl_ok(&["--broker", &cluster.url(0), "cmds", d, "--json"])).expect("JSON");
        cmds.to_string().contains("successful")
    });
    assert!(answered, "the queued ping answered, read through node 0");

    // Back once more, through node 1: the answered command does not run again.
    agent.write_config(cluster.agent_config(d, 1));
    agent.restart();
    status.expect_online(d, secs(15));
    run_command(&cluster.url(0), d, "ping");
    assert_eq!(commands_run_once(&agent), 2, "the queued ping and the one after");
}

/// An agent killed on one node: operators on the other nodes see it offline, live and retained.
#[test]
fn the_last_will_of_a_device_reaches_operators_on_every_node() {
    let cluster = Cluster::start(3);
    let d = "dev-will";
    let (mut agent, mut live) = online_on_node_0(&cluster, d);
    agent.kill9();
    live.expect_offline(d, secs(15));
    let mut later = Sub::builder_at(cluster.port(2), &status_topic(d)).start();
    let retained = later.expect_offline(d, secs(5));
    assert_eq!(retained["online"], json!(false));
}

/// Every agent is on node 0, which dies: they come back through nodes 1 and 2 within seconds,
/// stay online there though the dead node's wills are published late by the others, keep
/// answering, and no command runs twice.
#[test]
fn agents_move_to_the_other_nodes_when_theirs_dies_and_nothing_runs_twice() {
    let mut cluster = Cluster::start(3);
    let ids: Vec<String> = (0..3).map(|i| format!("dev-move-{i}")).collect();
    let agents: Vec<Agent> = ids.iter().map(|d| Agent::start(cluster.agent_config(d, 0))).collect();
    let mut statuses = Sub::builder_at(cluster.port(2), "tether/+/status").start();
    expect_each(&mut statuses, &ids, "online", |v| v["online"] == json!(true));
    for d in &ids {
        run_command(&cluster.url(1), d, "ping");
    }

    // Reconnecting can be quicker than a second; `since` tells the new connections apart.
    std::thread::sleep(secs(1));
    cluster.kill(0);
    let died = Instant::now();
    let died_s = unix_s();
    expect_each(&mut statuses, &ids, "online again", |v| {
        v["online"] == json!(true) && v["since"].as_u64().is_some_and(|since| since >= died_s)
    });
    println!("every agent back online through the other nodes {:?} after its node died", died.elapsed());

    // The dead node's wills come late from the others; whatever they overwrote is put right.
    std::thread::sleep(secs(8));
    // tetherctl given the nodes as a list, the dead one first, as a cluster's users would.
    let listed = devices(&cluster.urls_from(0).join(","));
    for d in &ids {
        assert!(online(&listed, d), "{d} online on the list 8 s later: {listed:?}");
    }
    for d in &ids {
        run_command(&cluster.url(2), d, "ping");
    }
    for agent in &agents {
        assert_eq!(commands_run_once(agent), 2, "a ping before and one after the move");
    }
}
