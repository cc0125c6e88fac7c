//! Command-line flags and configuration errors.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Writes `config` to a file in `dir`; returns its path.
fn config_file(dir: &Path, config: &Value) -> PathBuf {
    let path = dir.join("agent.json");
    write_file(&path, &serde_json::to_string_pretty(config).unwrap());
    path
}

/// A valid config that points at nothing in particular (no broker needed).
fn offline_config(dir: &Path) -> Value {
    json!({
        "broker": {"url": "mqtt://127.0.0.1:9"},
        "device_id": "dev-cfg",
        "state_dir": dir.join("state"),
    })
}

/// `--check-config` and a normal start both exit 1, saying `needle`.
fn assert_rejected(config: &Value, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(dir.path(), config);
    let path = path.to_str().unwrap();
    for args in [&["--config", path, "--check-config"][..], &["--config", path][..]] {
        let out = run_agent(args);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?} did not refuse a bad config ({needle}): {text}");
        assert!(text.contains(needle), "{args:?}: the message does not say {needle:?}: {text}");
        assert_eq!(text.matches(needle).count(), 1, "{args:?}: said more than once: {text}");
    }
}

/// The agent with `args` and RUST_LOG set to `rust_log`.
fn run_agent_with_rust_log(args: &[&str], rust_log: &str) -> std::process::Output {
    std::process::Command::new(AGENT_BIN).args(args).env("RUST_LOG", rust_log).output().unwrap()
}

#[test]
fn version_flag() {
    let out = run_agent(&["--version"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("tether-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn arch_flag_matches_the_status() {
    let out = run_agent(&["--arch"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let arch = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!arch.is_empty() && !arch.contains(char::is_whitespace), "--arch printed {arch:?}");

    let broker = Broker::start_default();
    let mut sub = Sub::new(&broker, &status_topic("dev-arch"));
    let _agent = Agent::start(broker.agent_config("dev-arch"));
    let status = sub.expect_online("dev-arch", secs(15));
    assert_eq!(status["arch"], arch.as_str(), "status: {status}");
}

#[test]
fn check_config_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    write_file(&pw, "secret");
    let mut config = offline_config(dir.path());
    merge(
        &mut config,
        json!({
            "broker": {"url": "wss://broker.example:443/mqtt", "username": "dev-cfg", "password_file": pw,
                       "proxy": "http://127.0.0.1:3128", "keepalive_s": 30},
            "topic_root": "fleet",
            "heartbeat": {"interval_s": 5, "disks": ["/"], "processes": [{"name": "sshd"}],
                          "custom": {"fw": {"command": ["/bin/echo", "1"], "timeout_s": 2}}},
            "reconnect": {"min_s": 1, "max_s": 60},
            "offline_buffer": {"max_messages": 10, "max_bytes": 65536},
            "reboot_command": ["/sbin/reboot"],
        }),
    );
    let path = config_file(dir.path(), &config);
    let out = run_agent(&["--config", path.to_str().unwrap(), "--check-config"]);
    assert!(out.status.success(), "--check-config refused a good config: {}", output_text(&out));
}

#[test]
fn unknown_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = offline_config(dir.path());
    config["heartbeat"] = json!({"intervl_s": 5});
    assert_rejected(&config, "intervl_s");
    let mut config = offline_config(dir.path());
    config["colour"] = json!("blue");
    assert_rejected(&config, "colour");
}

/// A value that breaks the rules is quoted as written, with plain quotes, and a control
/// character in it shown escaped rather than breaking the message.
#[test]
fn bad_device_id_and_topic_root_are_quoted_as_people_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = offline_config(dir.path());
    config["device_id"] = json!("dev+1\n");
    assert_rejected(&config, "device_id: \"dev+1\\n\": only letters, digits and - _ . : are allowed");
    let mut config = offline_config(dir.path());
    config["topic_root"] = json!("fleet/#");
    assert_rejected(&config, "topic_root: \"#\": only letters, digits and - _ . : are allowed");
}

#[test]
fn bad_broker_url_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = offline_config(dir.path());
    config["broker"]["url"] = json!("ftp://x");
    assert_rejected(&config, "broker.url");
}

#[test]
fn missing_password_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("password");
    let mut config = offline_config(dir.path());
    merge(&mut config, json!({"broker": {"username": "dev-cfg", "password_file": missing}}));
    assert_rejected(&config, missing.to_str().unwrap());
}

#[test]
fn unreadable_config_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.json");
    write_file(&path, "{ \"broker\": ");
    let out = run_agent(&["--config", path.to_str().unwrap(), "--check-config"]);
    assert!(!out.status.success(), "accepted truncated JSON: {}", output_text(&out));
    let missing = dir.path().join("absent.json");
    let out = run_agent(&["--config", missing.to_str().unwrap(), "--check-config"]);
    assert!(!out.status.success());
    assert!(output_text(&out).contains("absent.json"), "{}", output_text(&out));
}

#[test]
fn print_id_prints_the_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(dir.path(), &offline_config(dir.path()));
    let out = run_agent(&["--config", path.to_str().unwrap(), "--print-id"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "dev-cfg");
}

#[test]
fn without_device_id_the_printed_id_is_used_on_the_topics() {
    let broker = Broker::start_default();
    let mut config = broker.agent_config("unused");
    config.as_object_mut().unwrap().remove("device_id");
    let dir = tempfile::tempdir().unwrap();
    config["state_dir"] = json!(dir.path().join("state"));
    let path = config_file(dir.path(), &config);
    let out = run_agent(&["--config", path.to_str().unwrap(), "--print-id"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)),
        "--print-id printed {id:?}"
    );
    let mut sub = Sub::new(&broker, &status_topic(&id));
    let _agent = Agent::start(config);
    sub.expect_online(&id, secs(15));
}

#[test]
fn topic_root_is_honoured() {
    let broker = Broker::start_default();
    let mut config = broker.agent_config("dev-root");
    config["topic_root"] = json!("fleet/site-1");
    let mut sub = Sub::builder(&broker, "fleet/site-1/dev-root/#").also("tether/#").start();
    let _agent = Agent::start(config);
    sub.expect_json("fleet/site-1/dev-root/status", "online", secs(15), |v| v["online"] == true);
    sub.expect_json("fleet/site-1/dev-root/heartbeat", "a heartbeat", secs(10), |v| v["seq"].is_u64());
    assert!(
        !sub.seen().iter().any(|m| m.topic.starts_with("tether/")),
        "published under tether/ despite topic_root: {:?}",
        sub.seen().iter().filter(|m| m.topic.starts_with("tether/")).collect::<Vec<_>>()
    );
}

#[test]
fn log_level_flag_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(dir.path(), &offline_config(dir.path()));
    let out = run_agent(&["--config", path.to_str().unwrap(), "--log-level", "warn", "--check-config"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out =
        run_agent_with_rust_log(&["--config", path.to_str().unwrap(), "--check-config"], "warn,tether=debug");
    assert!(out.status.success(), "RUST_LOG directives refused: {}", output_text(&out));
}

/// env_logger takes a word that is no level for a module name: the agent would log nothing.
#[test]
fn a_log_level_that_would_silence_the_agent_is_refused_wherever_it_comes_from() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = offline_config(dir.path());
    config["log_level"] = json!("loud");
    assert_rejected(
        &config,
        "log_level: \"loud\" is not a log level: use error, warn, info, debug, trace or off",
    );

    let path = config_file(dir.path(), &offline_config(dir.path()));
    let path = path.to_str().unwrap();
    for args in [
        &["--config", path, "--log-level", "bogus", "--check-config"][..],
        &["--config", path, "--log-level", "bogus"][..],
    ] {
        let out = run_agent(args);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {text}");
        assert!(text.contains("--log-level: \"bogus\" is not a log level"), "{args:?}: {text}");
    }
    let out = run_agent_with_rust_log(&["--config", path, "--check-config"], "bogus");
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "RUST_LOG=bogus: {text}");
    assert!(text.contains("RUST_LOG: \"bogus\" is not a log level"), "RUST_LOG=bogus: {text}");
}

/// The broker settings of docs/protocol.md include `set_tcp_nodelay true` (the test brokers use
/// them): without it about a third of the commands wait ~40 ms in the broker for the TCP
/// acknowledgement of the packet before (Nagle's algorithm meeting delayed ACKs).
#[test]
fn commands_are_not_held_back_by_nagle_in_the_broker() {
    let broker = Broker::start_default();
    let d = "dev-nodelay";
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let _agent = Agent::start(broker.agent_config(d));
    sub.expect_online(d, secs(15));
    let mut round_trips = Vec::new();
    for i in 0..30 {
        let topic = cmd_topic(d, "ping", &format!("p{i}"));
        publish_json(&broker, &topic, &json!({"status": "init"}), true);
        // mosquitto_pub has its PUBACK: the broker holds the request from here on.
        let published = std::time::Instant::now();
        let done = sub.expect(&format!("successful on {topic}"), secs(10), |m| {
            m.topic == topic && m.json().is_some_and(|v| v["status"] == "successful")
        });
        round_trips.push(done.at.saturating_duration_since(published));
    }
    let slow = round_trips.iter().filter(|t| t.as_millis() >= 30).count();
    assert!(slow <= 3, "{slow} of 30 commands took 30 ms or more: {round_trips:?}");
}

#[test]
fn a_bad_command_line_exits_64_and_says_what_is_wrong() {
    for (args, needle) in [
        (&["--colour"][..], "unknown argument --colour"),
        (&["--config"][..], "--config needs a value"),
        (&["--check-config", "--log-level"][..], "--log-level needs a value"),
    ] {
        let out = run_agent(args);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: not EX_USAGE: {text}");
        assert!(text.contains(needle), "{args:?}: no {needle:?} in: {text}");
        assert!(text.contains("usage: tether-agent"), "{args:?}: no usage in: {text}");
    }
}

#[test]
fn wrong_types_name_the_key_and_say_what_it_wants() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = offline_config(dir.path());
    config["broker"]["keepalive_s"] = json!("x");
    assert_rejected(
        &config,
        "broker.keepalive_s: must be a whole number of seconds from 5 to 65535, got \"x\"",
    );
    let mut config = offline_config(dir.path());
    config["heartbeat"] = json!({"custom": {"modem": {"command": "/usr/bin/modem-status --json"}}});
    assert_rejected(&config, "heartbeat.custom.modem.command: must be a list of strings");
}

#[test]
fn durations_and_sizes_that_make_no_sense_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (patch, needle) in [
        (
            json!({"broker": {"connect_timeout_s": 0}}),
            "broker.connect_timeout_s: must be a whole number of seconds from 1 to 3600, got 0",
        ),
        (
            json!({"heartbeat": {"interval_s": 0}}),
            "heartbeat.interval_s: must be a whole number of seconds from 1",
        ),
        (
            json!({"heartbeat": {"custom": {"fw": {"file": "/etc/hostname", "timeout_s": 0}}}}),
            "heartbeat.custom.fw.timeout_s: must be a whole number of seconds from 1",
        ),
        (
            json!({"heartbeat": {"custom": {"fw": {"file": "/etc/hostname", "max_bytes": 0}}}}),
            "heartbeat.custom.fw.max_bytes: must be a whole number of bytes from 1",
        ),
        (
            json!({"reconnect": {"min_s": 30, "max_s": 10}}),
            "reconnect.min_s (30) must not be more than reconnect.max_s (10)",
        ),
        (
            json!({"reconnect": {"max_s": 1e12}}),
            "reconnect.max_s: must be a whole number of seconds from 1 to 86400",
        ),
        (
            json!({"offline_buffer": {"max_bytes": 0}}),
            "offline_buffer.max_bytes: must be a whole number of bytes from 1",
        ),
        (
            json!({"file_transfer": {"umask": "0999"}}),
            "file_transfer.umask: must be octal permission bits from \"0000\" to \"0777\"",
        ),
        (json!({"file_transfer": {"chroot": "data"}}), "file_transfer.chroot: must be an absolute path"),
    ] {
        let mut config = offline_config(dir.path());
        merge(&mut config, patch);
        assert_rejected(&config, needle);
    }
}

/// People put tokens in custom commands' arguments: the `config` command shows the program
/// only, unless the entry is marked public.
#[test]
fn config_command_shows_custom_command_arguments_only_when_public() {
    const TOKEN: &str = "tok-5e1f-SECRET-0b7a";
    let broker = Broker::start_default();
    let d = "dev-cfg-argv";
    let mut config = broker.agent_config(d);
    merge(
        &mut config,
        json!({"heartbeat": {"custom": {
            // The token is $0 of the script: it reaches the command, never its output.
            "modem": {"command": ["/bin/sh", "-c", "echo 3", format!("--token={TOKEN}")]},
            "uptime": {"command": ["/bin/echo", "up"], "public": true},
        }}}),
    );
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let _agent = Agent::start(config);
    sub.expect_online(d, secs(15));
    let hb = sub.expect_live_heartbeat(d, secs(10));
    assert_eq!(hb["custom"]["modem"], 3, "the command did not run with its arguments: {hb}");

    let topic = cmd_topic(d, "config", "c1");
    publish(&broker, &topic, &signed_init(d, "config", "c1", json!({})), true);
    let state = sub.expect_json(&topic, "successful", secs(15), |v| v["status"] == "successful");
    let custom = &state["result"]["heartbeat"]["custom"];
    assert_eq!(custom["modem"]["command"], json!(["/bin/sh", "…"]), "result: {state}");
    assert_eq!(custom["uptime"]["command"], json!(["/bin/echo", "up"]), "result: {state}");
    assert_eq!(custom["uptime"]["public"], true, "result: {state}");
    let leaked: Vec<&Msg> = sub.seen().iter().filter(|m| m.payload.contains(TOKEN)).collect();
    assert!(leaked.is_empty(), "the token was published: {leaked:?}");
}

/// The init script runs `--check-config` before it starts the agent: a state_dir the agent
/// cannot create or write must fail there, not in the agent after start.
#[test]
fn check_config_creates_the_state_dir_and_proves_it_writable() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = offline_config(dir.path());
    let state = dir.path().join("var").join("tether");
    config["state_dir"] = json!(state);
    let path = config_file(dir.path(), &config);
    let out = run_agent(&["--config", path.to_str().unwrap(), "--check-config"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&state).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "state_dir made with mode {mode:o}");
    let left: Vec<_> = std::fs::read_dir(&state).unwrap().collect();
    assert!(left.is_empty(), "--check-config left files in state_dir: {left:?}");

    // Under a file: it cannot be created, whoever runs the agent.
    let file = dir.path().join("a-file");
    write_file(&file, "");
    config["state_dir"] = json!(file.join("state"));
    assert_rejected(
        &config,
        &format!("state_dir: {}: cannot create it: Not a directory", file.join("state").display()),
    );
    // sysfs takes no new files, not even from root.
    config["state_dir"] = json!("/sys");
    let path = config_file(dir.path(), &config);
    let out = run_agent(&["--config", path.to_str().unwrap(), "--check-config"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("state_dir: /sys: cannot write in it: Permission denied"), "{text}");
}

/// An init script's pre-start check shows the operators' key lines the agent will skip, and a
/// missing file, as warnings: the agent still starts (it answers the unsigned ops, and `keys`
/// can mend the file).
#[test]
fn check_config_warns_of_operator_keys_the_agent_will_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let authorized = dir.path().join("authorized_keys");
    let mut config = offline_config(dir.path());
    config["trust"] = json!({ "authorized_keys": authorized });
    let path = config_file(dir.path(), &config);
    let check = || run_agent(&["--config", path.to_str().unwrap(), "--check-config"]);

    let out = check();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("no such file: only unsigned ops (ping, heartbeat) will run"),
        "{}",
        output_text(&out)
    );

    let good = tether::trust::DeviceKey::load(&tether::trust::DeviceKey::generate().unwrap())
        .unwrap()
        .openssh_public("ops@fleet");
    std::fs::write(&authorized, format!("{good}\nfrom=\"10.0.0.1\" {good}\n")).unwrap();
    let out = check();
    assert!(out.status.success(), "{}", output_text(&out));
    let text = output_text(&out);
    assert!(text.contains("warning:") && text.contains("line 2") && text.contains("\"from\""), "{text}");
    assert!(!text.contains("line 1"), "{text}");
}
