//! Trust on a broker the device need not trust (docs/protocol.md, "Signed requests and
//! answers"): through a real Mosquitto and the real agent, a request runs only when signed by a
//! key in the device's authorized_keys and allowed its op (ping and heartbeat may come
//! unsigned); every refusal names its cause; the final state says who asked; the device shows
//! the key it made at its first start.

mod common;

use common::ssh::{keygen, public_line, SshAgent};
use common::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use tether::trust::{DeviceKey, Request, REQUEST_NAMESPACE};

/// Agent `device` with these `trust` settings, online, and a watch on its topics.
fn online_trusting(broker: &Broker, device: &str, trust: Value) -> (Agent, Sub) {
    let mut config = broker.agent_config(device);
    merge(&mut config, json!({ "trust": trust }));
    let mut sub = Sub::new(broker, &format!("tether/{device}/#"));
    let agent = Agent::start(config);
    sub.expect_online(device, secs(15));
    (agent, sub)
}

fn final_state(sub: &mut Sub, topic: &str) -> Value {
    sub.expect_json(topic, "a final state", secs(15), |v| {
        v["status"] == "successful" || v["status"] == "failed"
    })
}

/// A request signed by `key`, with `request` as the signed text's fields.
fn signed_by(key: &DeviceKey, request: &Request) -> Vec<u8> {
    let text = request.to_text();
    let sig = key.sign_sshsig(REQUEST_NAMESPACE, text.as_bytes());
    json!({"status": "init", "request": text, "sig": sig}).to_string().into_bytes()
}

fn request(device: &str, op: &str, id: &str) -> Request {
    Request::new(device, op, id, unix_s(), Default::default())
}

fn other_key() -> DeviceKey {
    DeviceKey::load(&DeviceKey::generate().unwrap()).unwrap()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (is openssh-client installed?)"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What docs/protocol.md shows a third party: `ssh-keygen -Y sign` and `mosquitto_pub` alone.
#[test]
fn a_request_made_with_ssh_keygen_and_mosquitto_pub_runs_and_says_who_asked() {
    let broker = Broker::start_default();
    let d = "dev-sshkeygen";
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ops_key");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice@ops", "-f"])
        .arg(&key));
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let authorized = dir.path().join("authorized_keys");
    write_file(&authorized, &public);
    let (_agent, mut sub) = online_trusting(&broker, d, json!({"authorized_keys": authorized}));

    let topic = cmd_topic(d, "config", "c1");
    let script = documented_example()
        .replace("~/.ssh/id_ed25519", key.to_str().unwrap())
        .replace("dev1", d)
        .replace("mosquitto_pub ", &format!("mosquitto_pub -p {} ", broker.ports.plain));
    run(Command::new("sh").args(["-euc", &script]).current_dir(dir.path()));

    let state = final_state(&mut sub, &topic);
    assert_eq!(state["status"], "successful", "{state}");
    let fingerprint = run(Command::new("ssh-keygen").args(["-l", "-f"]).arg(key.with_extension("pub")));
    let fingerprint = fingerprint.split_whitespace().nth(1).unwrap_or_default().to_string();
    assert_eq!(state["by"], format!("alice@ops {fingerprint}"), "{state}");
}

#[test]
fn only_ping_and_heartbeat_run_unsigned_unless_configured() {
    let broker = Broker::start_default();
    let d = "dev-unsigned";
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let _agent = Agent::start(broker.agent_config(d));
    sub.expect_online(d, secs(15));

    let ping = cmd_topic(d, "ping", "p1");
    publish_json(&broker, &ping, &json!({"status": "init"}), true);
    let state = final_state(&mut sub, &ping);
    assert_eq!(
        (state["status"].as_str(), state["by"].as_str()),
        (Some("successful"), Some("unsigned")),
        "{state}"
    );

    let config = cmd_topic(d, "config", "c1");
    publish_json(&broker, &config, &json!({"status": "init"}), true);
    let state = final_state(&mut sub, &config);
    assert_eq!(state["status"], "failed", "{state}");
    let reason = state["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("unsigned") && reason.contains("needs a signature"), "{reason}");
}

/// Each way a request can fail to be trusted is refused, with its own reason, and nothing runs.
#[test]
fn every_refusal_names_its_cause() {
    let broker = Broker::start_default();
    let d = "dev-refusals";
    let dir = tempfile::tempdir().unwrap();
    let restricted = other_key();
    let authorized = dir.path().join("authorized_keys");
    write_file(
        &authorized,
        &format!(
            "{}\nops=\"ping\" {}\n",
            operator_key().openssh_public("ops@example"),
            restricted.openssh_public("ci@build")
        ),
    );
    let (agent, mut sub) =
        online_trusting(&broker, d, json!({"authorized_keys": authorized, "max_age_s": 86400}));

    let tampered = {
        let mut init: Value = serde_json::from_slice(&signed_init(d, "config", "t1", json!({}))).unwrap();
        let text = init["request"].as_str().unwrap().replace("\"t1\"", "\"t9\"");
        init["request"] = json!(text);
        init.to_string().into_bytes()
    };
    let mut old = request(d, "config", "o1");
    old.issued -= 2 * 86400;
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        ("config", "u1", signed_by(&other_key(), &request(d, "config", "u1")), "unknown key SHA256:"),
        ("config", "r1", signed_by(&restricted, &request(d, "config", "r1")), "is not allowed op \"config\""),
        ("config", "t9", tampered, "bad signature"),
        ("config", "o1", signed_by(operator_key(), &old), "too old"),
        (
            "config",
            "d1",
            signed_init("dev-elsewhere", "config", "d1", json!({})),
            "signed for another device",
        ),
        ("config", "i2", signed_init(d, "config", "i1", json!({})), "signed for another id"),
        ("reboot", "x1", signed_init(d, "config", "x1", json!({})), "signed for another op"),
        (
            "config",
            "m1",
            b"{\"status\":\"init\",\"request\":\"{}\",\"sig\":\"nope\"}".to_vec(),
            "malformed signature",
        ),
    ];
    for (op, id, payload, reason) in &cases {
        let topic = cmd_topic(d, op, id);
        publish(&broker, &topic, payload, true);
        let state = final_state(&mut sub, &topic);
        assert_eq!(state["status"], "failed", "{op}/{id}: {state}");
        let said = state["reason"].as_str().unwrap_or_default();
        assert!(said.contains(reason), "{op}/{id}: wanted \"{reason}\" in \"{said}\"");
    }
    // The restricted key may run what it is allowed.
    let topic = cmd_topic(d, "ping", "r2");
    publish(&broker, &topic, &signed_by(&restricted, &request(d, "ping", "r2")), true);
    let state = final_state(&mut sub, &topic);
    assert_eq!(state["status"], "successful", "{state}");
    assert!(state["by"].as_str().unwrap_or_default().starts_with("ci@build SHA256:"), "{state}");
    let started =
        agent.log().lines().filter(|l| l.contains("command config/") && l.contains("executing")).count();
    assert_eq!(started, 0, "nothing refused was started:\n{}", agent.log());
}

#[test]
fn operators_keys_are_read_again_on_sighup() {
    let broker = Broker::start_default();
    let d = "dev-rotate";
    let dir = tempfile::tempdir().unwrap();
    let authorized = dir.path().join("authorized_keys");
    let (agent, mut sub) = online_trusting(&broker, d, json!({"authorized_keys": authorized}));

    let first = cmd_topic(d, "config", "c1");
    publish(&broker, &first, &signed_init(d, "config", "c1", json!({})), true);
    let state = final_state(&mut sub, &first);
    assert!(state["reason"].as_str().unwrap_or_default().contains("unknown key"), "{state}");

    write_file(&authorized, &operator_key().openssh_public("ops@example"));
    agent.signal(libc::SIGHUP);
    assert!(agent.wait_log("trusting 1 operator key(s)", secs(10)), "{}", agent.log());
    let second = cmd_topic(d, "config", "c2");
    publish(&broker, &second, &signed_init(d, "config", "c2", json!({})), true);
    assert_eq!(final_state(&mut sub, &second)["status"], "successful");
}

#[test]
fn the_device_makes_its_key_once_and_shows_it_in_its_status() {
    let broker = Broker::start_default();
    let d = "dev-key";
    let mut sub = Sub::new(&broker, &status_topic(d));
    let mut agent = Agent::start(broker.agent_config(d));
    let status = sub.expect_online(d, secs(15));
    let key = status["key"].as_str().unwrap_or_default().to_string();
    assert!(key.starts_with("ssh-ed25519 AAAA"), "{status}");
    assert!(status["fingerprint"].as_str().unwrap_or_default().starts_with("SHA256:"), "{status}");

    let file = agent.state_dir().join("device_key");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", file.display());
    assert_same_fingerprint(&key, status["fingerprint"].as_str().unwrap_or_default(), agent.dir());

    agent.kill9();
    sub.expect_offline(d, secs(30));
    agent.restart();
    let again = sub.expect_online(d, secs(15));
    assert_eq!(again["key"], json!(key), "the same key after a restart");
}

/// The shell lines docs/protocol.md gives for signing a request with OpenSSH alone.
fn documented_example() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
    let after = doc.split("with OpenSSH and Mosquitto's clients alone").nth(1).expect("the example");
    let block = after.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("its sh block");
    block.to_string()
}

/// The status's fingerprint is the one `ssh-keygen -l` gives for its key.
fn assert_same_fingerprint(key: &str, fingerprint: &str, dir: &Path) {
    let public = dir.join("device.pub");
    write_file(&public, key);
    let listed = run(Command::new("ssh-keygen").args(["-l", "-f"]).arg(&public));
    assert!(listed.contains(fingerprint), "{listed} vs {fingerprint}");
}

fn tetherctl(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tetherctl"));
    cmd.args(args).stdin(std::process::Stdio::null());
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("TETHER_") || k == "RUST_LOG") {
        cmd.env_remove(key);
    }
    cmd.env_remove("SSH_AUTH_SOCK").envs(env.iter().copied()).output().unwrap()
}

/// The whole loop with the real agent: tetherctl signs with the key in ssh-agent, the device
/// runs the op and signs its answer, tetherctl pins the device's key and believes the answer;
/// when the device comes back with another key (its state wiped), tetherctl stops (exit 4)
/// until the key is forgotten.
#[test]
fn tetherctl_and_the_device_trust_each_other_through_the_broker_only() {
    let broker = Broker::start_default();
    let d = "dev-e2e";
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "alice", &["-t", "ed25519"]);
    let ssh_agent = SshAgent::start(dir.path());
    ssh_agent.add(&key);
    let authorized = dir.path().join("authorized_keys");
    write_file(&authorized, &public_line(&key));
    let (mut agent, _sub) = online_trusting(&broker, d, json!({"authorized_keys": authorized}));

    let known = dir.path().join("known_devices");
    let env = [("SSH_AUTH_SOCK", ssh_agent.socket_text()), ("TETHER_KNOWN_DEVICES", known.to_str().unwrap())];
    let url = broker.url(Listener::Plain);
    let out = tetherctl(&["--broker", &url, "cmd", d, "config"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(answer["status"], "successful", "{answer}");
    assert_eq!(answer["result"]["device_id"], d, "{answer}");
    assert!(stderr.contains("signed its answer"), "{stderr}");
    assert!(read_to_string(&known).starts_with(&format!("{d} ssh-ed25519 ")), "the device's key is pinned");

    agent.kill9();
    std::fs::remove_file(agent.state_dir().join("device_key")).unwrap();
    agent.restart();
    let mut status = Sub::new(&broker, &status_topic(d));
    status.expect_online(d, secs(15));
    let out = tetherctl(&["--broker", &url, "cmd", d, "config"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "a new device key stops tetherctl: {stderr}");
    assert!(stderr.contains("known-devices forget"), "{stderr}");

    let forget = tetherctl(&["known-devices", "forget", d], &env);
    assert_eq!(forget.status.code(), Some(0), "{}", String::from_utf8_lossy(&forget.stderr));
    let out = tetherctl(&["--broker", &url, "cmd", d, "ping"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Operators rotate without re-flashing: `keys` replaces authorized_keys atomically; the old
/// key is refused at once, the new one runs; a set that would lock its sender out of `keys`,
/// or with a line the device cannot honour, is refused and changes nothing, unless forced.
#[test]
fn keys_rotates_the_operators_and_will_not_lock_out_its_sender_unless_forced() {
    let broker = Broker::start_default();
    let d = "dev-keys";
    let dir = tempfile::tempdir().unwrap();
    let authorized = dir.path().join("authorized_keys");
    let old_line = operator_key().openssh_public("old@ops");
    write_file(&authorized, &old_line);
    let (_agent, mut sub) = online_trusting(&broker, d, json!({"authorized_keys": authorized}));
    let new_key = other_key();
    let new_line = new_key.openssh_public("new@ops");
    let send = |sub: &mut Sub, key: &DeviceKey, id: &str, params: Value| {
        let request = Request::new(d, "keys", id, unix_s(), params.as_object().cloned().unwrap_or_default());
        let topic = cmd_topic(d, "keys", id);
        publish(&broker, &topic, &signed_by(key, &request), true);
        final_state(sub, &topic)
    };

    let locked_out = send(&mut sub, operator_key(), "k1", json!({"authorized_keys": new_line}));
    assert!(
        locked_out["reason"].as_str().unwrap_or_default().contains("would not let the key"),
        "{locked_out}"
    );
    let bad = send(
        &mut sub,
        operator_key(),
        "k2",
        json!({"authorized_keys": format!("{old_line}\nfrom=\"x\" {new_line}")}),
    );
    assert!(bad["reason"].as_str().unwrap_or_default().contains("line 2"), "{bad}");
    assert_eq!(read_to_string(&authorized), old_line, "nothing replaced");

    let rotated = send(&mut sub, operator_key(), "k3", json!({"authorized_keys": new_line, "force": true}));
    assert_eq!(rotated["result"], json!({"keys": 1}), "{rotated}");
    assert_eq!(read_to_string(&authorized), new_line);
    let old = cmd_topic(d, "config", "c1");
    publish(&broker, &old, &signed_init(d, "config", "c1", json!({})), true);
    assert!(final_state(&mut sub, &old)["reason"].as_str().unwrap_or_default().contains("unknown key"));
    let new = cmd_topic(d, "config", "c2");
    publish(&broker, &new, &signed_by(&new_key, &request(d, "config", "c2")), true);
    assert_eq!(final_state(&mut sub, &new)["status"], "successful");
}

/// A `keys` command is recorded `executing` before authorized_keys is touched: a crash in
/// between is settled at the next start by what the file holds, so the command ends in the one
/// final state that matches the keys the device trusts.
#[test]
fn a_keys_command_cut_by_a_crash_is_settled_by_what_the_file_holds() {
    let broker = Broker::start_default();
    let d = "dev-keys-cut";
    let dir = tempfile::tempdir().unwrap();
    let authorized = dir.path().join("authorized_keys");
    let old_line = operator_key().openssh_public("old@ops");
    write_file(&authorized, &old_line);
    let (mut agent, mut sub) = online_trusting(&broker, d, json!({"authorized_keys": authorized}));
    agent.kill9();
    sub.expect_offline(d, secs(15));

    // Two commands the previous run recorded executing: one whose keys reached the file before
    // the crash, one whose keys did not.
    let written = format!("{old_line}\n{}", other_key().openssh_public("new@ops"));
    let unwritten = other_key().openssh_public("never@ops");
    let journal = agent.state_dir().join("commands.log");
    let mut lines = read_to_string(&journal);
    for (id, text) in [("written", &written), ("unwritten", &unwritten)] {
        let line = json!({"op": "keys", "id": id, "state": {"status": "executing"},
                          "keys_sha256": tether::trust::sha256_hex(text.as_bytes()), "by": "old@ops SHA256:x"});
        lines.push_str(&format!("{line}\n"));
    }
    write_file(&journal, &lines);
    write_file(&authorized, &written);
    agent.restart();

    let done = final_state(&mut sub, &cmd_topic(d, "keys", "written"));
    assert_eq!((&done["status"], &done["result"]), (&json!("successful"), &json!({"keys": 2})), "{done}");
    let cut = final_state(&mut sub, &cmd_topic(d, "keys", "unwritten"));
    assert_eq!(cut["status"], "failed", "{cut}");
    assert!(cut["reason"].as_str().unwrap_or_default().contains("unchanged"), "{cut}");
    assert_eq!(read_to_string(&authorized), written);
}

/// kill -9 at a different moment each time, from before the request is read to after it is
/// answered: every `keys` command ends in exactly one final state, and the file holds the keys
/// that state says.
#[test]
fn kill_9_at_any_moment_of_a_keys_command_leaves_one_final_state_matching_the_file() {
    let broker = Broker::start_default();
    let d = "dev-keys-kill";
    let dir = tempfile::tempdir().unwrap();
    let authorized = dir.path().join("authorized_keys");
    let operator = operator_key().openssh_public("ops@fleet");
    write_file(&authorized, &operator);
    let (mut agent, mut sub) = online_trusting(&broker, d, json!({"authorized_keys": authorized}));
    let mut trusted = operator.clone();
    for round in 0..12u64 {
        let id = format!("k{round}");
        let topic = cmd_topic(d, "keys", &id);
        let text = format!("{operator}\n{}", other_key().openssh_public(&format!("round{round}@ops")));
        let params = json!({"authorized_keys": text});
        let request = Request::new(d, "keys", &id, unix_s(), params.as_object().cloned().unwrap());
        publish(&broker, &topic, &signed_by(operator_key(), &request), true);
        std::thread::sleep(std::time::Duration::from_millis(round * 4));
        agent.kill9();
        sub.expect_offline(d, secs(15));
        agent.restart();
        sub.expect_online(d, secs(15));

        // It may have come before the kill: among the messages seen so far.
        let state = sub
            .expect_any_time("a final state", secs(15), |m| {
                m.topic == topic
                    && m.json().is_some_and(|v| v["status"] == "successful" || v["status"] == "failed")
            })
            .json()
            .unwrap();
        let on_disk = read_to_string(&authorized);
        match state["status"].as_str() {
            Some("successful") => assert_eq!(on_disk, text, "round {round}: {state}"),
            _ => assert_eq!(on_disk, trusted, "round {round}: {state}"),
        }
        trusted = on_disk;
        sub.expect_none("a second final state", secs(1) / 2, |m| {
            m.topic == topic && m.json().is_some_and(|v| v["status"] != state["status"])
        });
    }
    assert!(agent.running());
}

/// A broker (or anyone who can publish) that kept a signed request cannot have it run again once
/// the operator cleared it: the device keeps the id until the request is too old anyway.
#[test]
fn a_signed_request_replayed_after_it_ran_and_was_cleared_is_refused_across_restarts() {
    let broker = Broker::start_default();
    let d = "dev-replay";
    let (mut agent, mut sub) = online_trusting(&broker, d, json!({}));
    let topic = cmd_topic(d, "config", "r1");
    let captured = signed_init(d, "config", "r1", json!({}));
    publish(&broker, &topic, &captured, true);
    assert_eq!(final_state(&mut sub, &topic)["status"], "successful");
    let clear_and_wait = |agent: &Agent, times: usize| {
        publish(&broker, &topic, b"", true);
        let cleared =
            wait_until(secs(10), || agent.log().matches("command config/r1 cleared").count() >= times);
        assert!(cleared, "{}", agent.log());
    };
    clear_and_wait(&agent, 1);

    for round in ["replayed", "replayed after a restart"] {
        publish(&broker, &topic, &captured, true);
        let state = final_state(&mut sub, &topic);
        assert_eq!(state["status"], "failed", "{round}: {state}");
        let reason = state["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("this id ran already and was cleared"), "{round}: {reason}");
        publish(&broker, &topic, b"", true);
        agent.restart();
        sub.expect_online(d, secs(15));
    }
    assert_eq!(agent.log().matches("command config/r1: executing").count(), 1, "{}", agent.log());
    // A new id runs as ever.
    let fresh = cmd_topic(d, "config", "r2");
    publish(&broker, &fresh, &signed_init(d, "config", "r2", json!({})), true);
    assert_eq!(final_state(&mut sub, &fresh)["status"], "successful");
}
