//! `tetherctl update` rolls one flow out to 50 real agents behind one Mosquitto, in waves:
//! a wave with failures stops the rollout, an offline device gets the flow queued and runs it
//! when it comes back, and `tetherctl update status ID` finds the rollout again.

mod common;

use common::ssh::{keygen, public_line};
use common::{merge, secs, write_file, Agent, Broker, Listener, Sub};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEVICES: usize = 50;

fn device_name(i: usize) -> String {
    format!("fleet-{i:02}")
}

/// An operator key that the devices trust.
struct Operator {
    dir: tempfile::TempDir,
    key: PathBuf,
    authorized: PathBuf,
}

fn operator() -> Operator {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "operator", &["-t", "ed25519"]);
    let authorized = dir.path().join("authorized_keys");
    write_file(&authorized, &public_line(&key));
    Operator { dir, key, authorized }
}

fn device_config(broker: &Broker, name: &str, authorized: &Path) -> Value {
    let mut config = broker.agent_config(name);
    let url = broker.url(Listener::Mqtts);
    merge(
        &mut config,
        json!({"broker": {"url": url, "ca_file": broker.ca_file()}, "trust": {"authorized_keys": authorized}}),
    );
    config
}

/// tetherctl as the operator, over mqtts, nothing taken from the test's environment.
fn tetherctl(broker: &Broker, dir: &tempfile::TempDir, key: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tetherctl"));
    cmd.env_remove("SSH_AUTH_SOCK")
        .env("TETHER_BROKER", broker.url(Listener::Mqtts))
        .env("TETHER_CA", broker.ca_file())
        .env("TETHER_IDENTITY", key)
        .env("TETHER_KNOWN_DEVICES", dir.path().join("known_devices"))
        .args(args);
    cmd
}

#[test]
fn a_rollout_goes_in_waves_and_stops_at_max_failures() {
    let broker = Broker::start_default();
    let Operator { dir, key, authorized } = operator();
    // Devices with a file here fail the flow's check.
    let failing = dir.path().join("failing");
    fs::create_dir(&failing).unwrap();
    for i in [21, 24, 27] {
        fs::write(failing.join(device_name(i)), b"").unwrap();
    }
    let mut sub = Sub::new(&broker, "tether/+/status");
    let mut agents: Vec<Agent> =
        (0..DEVICES).map(|i| Agent::start(device_config(&broker, &device_name(i), &authorized))).collect();
    let mut online = std::collections::BTreeSet::new();
    sub.expect("all devices online", secs(120), |m| {
        if m.payload.contains("\"online\":true") {
            online.insert(m.topic.clone());
        }
        online.len() == DEVICES
    });
    // One device goes away before the rollout: its flow waits for it.
    agents[5].term();
    sub.expect_offline(&device_name(5), secs(15));

    let check = format!("[ ! -e {}/$TETHER_DEVICE_ID ]", failing.display());
    let flow = json!({"name": "fleet", "version": "7", "steps": [{"name": "check", "type": "run", "argv": ["sh", "-c", check]}]});
    let flow_file = dir.path().join("flow.json");
    fs::write(&flow_file, flow.to_string()).unwrap();
    let tetherctl = |args: &[&str]| tetherctl(&broker, &dir, &key, args).output().unwrap();
    let out = tetherctl(&[
        "update",
        flow_file.to_str().unwrap(),
        "--all",
        "--batch",
        "10",
        "--max-failures",
        "3",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The last line of each device: where it ended.
    let mut last: BTreeMap<String, Value> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        last.insert(v["device"].as_str().unwrap().to_string(), v);
    }
    for (i, agent) in agents.iter().enumerate() {
        let name = device_name(i);
        let state = last.get(&name).map(|v| v["state"].as_str().unwrap().to_string());
        let expected = match i {
            5 => Some("pending"),
            21 | 24 | 27 => Some("failed"),
            0..=29 => Some("successful"),
            _ => None, // the rollout stopped before their wave
        };
        assert_eq!(state.as_deref(), expected, "{name}: {:?}", last.get(&name));
        if i >= 30 {
            assert!(!agent.log_contains("command update/"), "{name} got the flow");
        }
    }
    assert!(last[&device_name(21)]["reason"].as_str().unwrap().contains("exited with 1"));
    assert!(stderr.contains("3 device(s) failed (--max-failures 3): the rollout stopped"), "{stderr}");
    let id = stderr.split("rollout ").nth(1).unwrap().split(':').next().unwrap().to_string();

    // The device that was away comes back and runs its queued flow.
    agents[5].restart();
    let name = device_name(5);
    assert!(agents[5].wait_log("command update/", secs(30)));
    assert!(agents[5].wait_log(": successful", secs(30)), "{}", agents[5].log());
    let out = tetherctl(&["update", "status", &id, "--json"]);
    let states: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(states.len(), 30, "the devices the rollout reached");
    assert!(states.iter().any(|s| s["device"] == name.as_str() && s["state"] == "successful"), "{states:?}");
    assert_eq!(out.status.code(), Some(1), "three failed");
}

/// On a terminal `tetherctl update` shows a table redrawn in place (device, state, step,
/// progress, reason) rather than JSON lines.
#[test]
fn on_a_terminal_a_rollout_is_a_live_table() {
    let broker = Broker::start_default();
    let Operator { dir, key, authorized } = operator();
    let mut sub = Sub::new(&broker, "tether/+/status");
    let _agents: Vec<Agent> = ["table-a", "table-b"]
        .iter()
        .map(|name| {
            let agent = Agent::start(device_config(&broker, name, &authorized));
            sub.expect_online(name, secs(30));
            agent
        })
        .collect();
    // table-b fails its check, after a moment in which both show as executing.
    let check = "sleep 2; [ \"$TETHER_DEVICE_ID\" = table-a ] || { echo no good; exit 3; }";
    let flow = json!({"name": "table", "version": "1", "steps": [{"name": "check", "type": "run", "argv": ["sh", "-c", check]}]});
    let flow_file = dir.path().join("flow.json");
    fs::write(&flow_file, flow.to_string()).unwrap();
    let cmd = tetherctl(&broker, &dir, &key, &["update", flow_file.to_str().unwrap(), "table-a", "table-b"]);
    let mut terminal = common::pty::Terminal::new(24, 120);
    let mut tetherctl = terminal.start(cmd);
    let status = terminal.wait_exit(&mut tetherctl, secs(60));
    let shown = String::from_utf8_lossy(&terminal.output).to_string();
    assert_eq!(status.code(), Some(1), "one device failed: {shown:?}");
    assert!(!shown.contains("{\"device\""), "no JSON lines on a terminal: {shown:?}");
    // Each redraw moves the cursor up over the table drawn before.
    let frames: Vec<&str> = shown.split("\x1b[3A").collect();
    assert!(frames.len() >= 3, "redrawn in place: {shown:?}");
    let rows = |frame: &str| -> Vec<String> {
        frame
            .split("\x1b[2K")
            .map(|row| row.trim_end().to_string())
            .filter(|row| row.starts_with("table-") || row.starts_with("DEVICE"))
            .collect()
    };
    let executing =
        frames.iter().any(|f| rows(f).iter().any(|r| r.contains("executing") && r.contains("1/1 check")));
    assert!(executing, "a frame shows the step under way: {frames:?}");
    let last = rows(frames.last().unwrap());
    assert_eq!(last.len(), 3, "{last:?}");
    assert!(last[0].starts_with("DEVICE") && last[0].contains("STATE") && last[0].contains("PROGRESS"));
    assert!(last[1].starts_with("table-a") && last[1].contains("successful"), "{last:?}");
    assert!(last[2].starts_with("table-b") && last[2].contains("failed"), "{last:?}");
    assert!(last[2].contains("exited with 3 (its last line: no good)"), "{last:?}");
}

/// `--where` picks devices by what their status and heartbeat say: versions in order (1.10
/// after 1.9), paths into custom values, several tests at once.
#[test]
fn where_chooses_devices_by_their_heartbeat_and_status() {
    let broker = Broker::start_default();
    let Operator { dir, key, authorized } = operator();
    let firmware = ["1.9", "1.10", "2.0"];
    let mut sub = Sub::new(&broker, "tether/+/heartbeat");
    let agents: Vec<Agent> = (0..4)
        .map(|i| {
            let mut config = device_config(&broker, &format!("where-{i}"), &authorized);
            if let Some(version) = firmware.get(i) {
                let file = dir.path().join(format!("firmware-{i}"));
                fs::write(&file, version).unwrap();
                merge(&mut config, json!({"heartbeat": {"custom": {"firmware": {"file": file}}}}));
            }
            Agent::start(config)
        })
        .collect();
    let mut beating = std::collections::BTreeSet::new();
    sub.expect("a heartbeat from each device", secs(60), |m| {
        beating.insert(m.topic.clone());
        beating.len() == agents.len()
    });
    let flow = json!({"name": "where", "version": "1", "steps": [{"name": "nothing", "type": "run", "argv": ["true"]}]});
    let flow_file = dir.path().join("flow.json");
    fs::write(&flow_file, flow.to_string()).unwrap();
    let chosen = |expr: &str| -> Vec<String> {
        let args = ["update", flow_file.to_str().unwrap(), "--where", expr, "--json"];
        let out = tetherctl(&broker, &dir, &key, &args).output().unwrap();
        assert!(out.status.success(), "{expr}: {}", String::from_utf8_lossy(&out.stderr));
        let mut devices: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["device"].as_str().unwrap().to_string())
            .collect();
        devices.sort();
        devices.dedup();
        devices
    };
    assert_eq!(chosen("custom.firmware<1.10"), ["where-0"]);
    assert_eq!(chosen("custom.firmware>=1.10,online=true"), ["where-1", "where-2"]);
    assert_eq!(chosen("custom.firmware!=2.0"), ["where-0", "where-1"], "a device without it is not chosen");
}
