//! `tetherctl` end to end: the real binary against a real Mosquitto and the real agent.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

const CTL_BIN: &str = env!("CARGO_BIN_EXE_tetherctl");
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs tetherctl to completion (killed after 60 s), with a clean TETHER_* environment.
fn ctl_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = ctl_command(args, env).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    thread::spawn(move || {
        if !wait_until(secs(60), || flag.load(Ordering::SeqCst)) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::SeqCst);
    out
}

fn ctl(args: &[&str]) -> Output {
    ctl_env(args, &[])
}

fn ctl_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(CTL_BIN);
    cmd.args(args).stdin(Stdio::null());
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("TETHER_") || k == "RUST_LOG") {
        cmd.env_remove(key);
    }
    cmd.envs(env.iter().copied());
    cmd
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}: {}\n{}", describe(&out.status), output_text(out));
}

/// A broker with agent `dev1` on it, online and heartbeating.
fn fleet_of_one() -> (Broker, Agent) {
    let broker = Broker::start_default();
    let mut sub = Sub::new(&broker, "tether/dev1/#");
    let agent = Agent::start(broker.agent_config("dev1"));
    sub.expect_online("dev1", secs(15));
    sub.expect_live_heartbeat("dev1", secs(15));
    (broker, agent)
}

/// What is retained on `filter` now: (topic, payload), empty payloads left out.
fn retained(broker: &Broker, filter: &str) -> Vec<(String, String)> {
    let mut sub = Sub::new(broker, filter);
    let msgs = sub.collect(Duration::from_millis(500));
    msgs.into_iter().filter(|m| m.retained && !m.payload.is_empty()).map(|m| (m.topic, m.payload)).collect()
}

#[test]
fn devices_lists_the_agent_online_with_version_and_heartbeat_age() {
    let (broker, _agent) = fleet_of_one();
    let url = broker.url(Listener::Plain);

    let out = ctl(&["--broker", &url, "devices"]);
    assert_exit(&out, 0, "devices");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("VERSION"), "{text}");
    let row: Vec<&str> =
        lines.iter().find(|l| l.starts_with("dev1 ")).expect("a dev1 row").split_whitespace().collect();
    assert_eq!(row[1], "yes", "online: {text}");
    assert!(row[2].ends_with('s') && row[2].trim_end_matches('s').parse::<u64>().is_ok(), "age: {text}");
    assert!(row[3].ends_with('%') && row[4].ends_with('%') && row[5].ends_with('%'), "cpu mem disk: {text}");
    assert_eq!(row[6], VERSION, "{text}");

    let out = ctl(&["devices", "--json", "--broker", &url]);
    assert_exit(&out, 0, "devices --json");
    let devices: Value = serde_json::from_slice(&out.stdout).expect("devices --json prints JSON");
    let dev1 = devices.as_array().unwrap().iter().find(|d| d["id"] == "dev1").expect("dev1 in the JSON");
    assert_eq!(dev1["online"], json!(true));
    assert_eq!(dev1["version"], json!(VERSION));
    assert!(dev1["heartbeat_age_s"].as_u64().is_some_and(|age| age < 10), "{dev1}");
    assert!(dev1["mem_used_pct"].is_number() && dev1["cpu_pct"].is_number(), "{dev1}");
    assert_eq!(dev1["status"]["online"], json!(true));
    assert!(dev1["heartbeat"]["seq"].is_u64(), "{dev1}");
}

/// Reads the lines a child prints, in a thread, so the test can wait with a timeout.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Lines until `pred` holds of one, within `timeout`; panics with what came otherwise.
fn wait_line(
    rx: &mpsc::Receiver<String>,
    timeout: Duration,
    seen: &mut Vec<String>,
    pred: impl Fn(&str) -> bool,
) {
    let end = Instant::now() + timeout;
    while let Ok(line) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
        seen.push(line);
        if pred(seen.last().unwrap()) {
            return;
        }
    }
    panic!("no such line within {timeout:?}; got:\n{}", seen.join("\n"));
}

fn interrupt_and_wait(child: &mut Child) -> std::process::ExitStatus {
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let end = Instant::now() + secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("tetherctl watch did not exit within 5 s of SIGINT");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn watch_prints_heartbeats_as_they_come_and_stops_cleanly_on_ctrl_c() {
    let (broker, _agent) = fleet_of_one();
    let url = broker.url(Listener::Plain);

    let mut child = ctl_command(&["--broker", &url, "watch", "dev1", "--json"], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut child);
    let mut seen = Vec::new();
    let mut live_seqs = Vec::new();
    let end = Instant::now() + secs(15);
    while live_seqs.len() < 2 && Instant::now() < end {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(v["device"], "dev1", "{line}");
        assert!(v["topic"].as_str().unwrap().starts_with("tether/dev1/"), "{line}");
        if v["kind"] == "heartbeat" && v["retained"] == json!(false) {
            live_seqs.push(v["payload"]["seq"].as_u64().unwrap());
        }
        seen.push(line);
    }
    assert!(live_seqs.len() >= 2 && live_seqs[1] > live_seqs[0], "two heartbeats, seq rising: {seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains("\"kind\":\"status\"")),
        "the retained status at start: {seen:#?}"
    );
    let status = interrupt_and_wait(&mut child);
    assert_eq!(status.code(), Some(0), "watch after SIGINT: {}", describe(&status));

    // The readable form: the retained status first, marked so, then heartbeat lines.
    let mut child = ctl_command(&["--broker", &url, "watch"], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut child);
    let mut seen = Vec::new();
    let online = format!(" dev1 online v{VERSION} ");
    wait_line(&rx, secs(10), &mut seen, |l| l.contains(&online) && l.ends_with("(retained)"));
    wait_line(&rx, secs(10), &mut seen, |l| {
        l.contains(" dev1 #") && l.contains(" cpu ") && l.contains(" mem ") && !l.ends_with("(retained)")
    });
    assert_eq!(interrupt_and_wait(&mut child).code(), Some(0));
}

#[test]
fn cmd_ping_succeeds_and_leaves_nothing_retained() {
    let (broker, _agent) = fleet_of_one();
    let url = broker.url(Listener::Plain);

    let out = ctl(&["--broker", &url, "cmd", "dev1", "ping"]);
    assert_exit(&out, 0, "cmd dev1 ping");
    let answer: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    assert_eq!(answer["status"], "successful");
    assert_eq!(answer["result"]["version"], VERSION);
    assert!(stderr(&out).contains("executing"), "progress on stderr: {}", stderr(&out));
    assert_eq!(retained(&broker, "tether/dev1/cmd/ping/+"), vec![], "the command topic is cleared");

    let out = ctl(&["--broker", &url, "cmd", "dev1", "nope"]);
    assert_exit(&out, 1, "cmd dev1 nope");
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["status"], "failed");
    assert!(answer["reason"].as_str().unwrap().contains("unknown op"), "{answer}");
    assert!(stderr(&out).contains("unknown op"), "{}", stderr(&out));
    assert_eq!(retained(&broker, "tether/dev1/cmd/nope/+"), vec![]);

    let out = ctl(&["--broker", &url, "ops", "dev1"]);
    assert_exit(&out, 0, "ops dev1");
    let ops: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert!(ops.contains(&"ping") && ops.contains(&"reboot"), "{ops:?}");
}

#[test]
fn cmd_to_an_absent_device_times_out_and_is_withdrawn_unless_queued() {
    let broker = Broker::start_default();
    let url = broker.url(Listener::Plain);

    let started = Instant::now();
    let out = ctl(&["--broker", &url, "cmd", "ghost", "ping", "--timeout", "2"]);
    assert_exit(&out, 2, "cmd to an absent device");
    assert!(started.elapsed() < secs(10), "took {:?}", started.elapsed());
    assert!(stderr(&out).contains("withdrawn"), "{}", stderr(&out));
    assert_eq!(retained(&broker, "tether/ghost/cmd/#"), vec![], "withdrawn");

    let out = ctl(&["--broker", &url, "cmd", "ghost", "ping", "--timeout", "2", "--queue"]);
    assert_exit(&out, 2, "cmd --queue to an absent device");
    let topic = stdout(&out).trim().to_string();
    assert!(topic.starts_with("tether/ghost/cmd/ping/"), "prints the topic: {}", output_text(&out));
    let queued = retained(&broker, "tether/ghost/cmd/#");
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(queued[0].0, topic);
    assert_eq!(serde_json::from_str::<Value>(&queued[0].1).unwrap(), json!({"status": "init"}));

    // When the device comes, it runs the queued command.
    let mut sub = Sub::new(&broker, &topic);
    let _agent = Agent::start(broker.agent_config("ghost"));
    sub.expect_json(&topic, "the queued ping answered", secs(15), |v| v["status"] == "successful");
}

#[test]
fn over_wss_with_a_ca_from_flags_env_or_config_file() {
    let (broker, _agent) = fleet_of_one();
    let wss = broker.url(Listener::Wss);
    let ca = broker.ca_file();
    let ca = ca.to_str().unwrap();

    let out = ctl(&["--broker", &wss, "--ca", ca, "cmd", "dev1", "ping", "--json", r#"{"note":"hi"}"#]);
    assert_exit(&out, 0, "cmd over wss");
    assert!(stdout(&out).contains("\"successful\""), "{}", output_text(&out));

    let out = ctl_env(&["devices"], &[("TETHER_BROKER", &wss), ("TETHER_CA", ca)]);
    assert_exit(&out, 0, "devices with TETHER_BROKER and TETHER_CA");
    assert!(stdout(&out).lines().any(|l| l.starts_with("dev1 ")), "{}", output_text(&out));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tetherctl.json");
    let file = json!({"broker": {"url": wss, "ca_file": ca}, "topic_root": "tether"});
    std::fs::write(&config, file.to_string()).unwrap();
    let out = ctl(&["--config", config.to_str().unwrap(), "ops", "dev1", "--json"]);
    assert_exit(&out, 0, "ops with --config");
    let ops: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(ops.contains(&"ping".to_string()), "{ops:?}");

    // Flags win over the environment: a wrong CA in TETHER_CA does not matter.
    let wrong = broker.wrong_ca_file();
    let out =
        ctl_env(&["--ca", ca, "devices"], &[("TETHER_BROKER", &wss), ("TETHER_CA", wrong.to_str().unwrap())]);
    assert_exit(&out, 0, "--ca over TETHER_CA");
}

#[test]
fn connection_problems_are_reported_with_their_exit_status() {
    let broker = Broker::start_default();

    let out = ctl(&["--broker", "http://127.0.0.1:1", "devices"]);
    assert_exit(&out, 78, "an http:// broker URL");
    assert!(stderr(&out).contains("--broker: unsupported scheme \"http\""), "{}", stderr(&out));

    let out = ctl(&["--broker", &broker.url(Listener::Mqtts), "--ca", "/nonexistent/ca.pem", "devices"]);
    assert_exit(&out, 78, "a CA file that does not exist");
    assert!(stderr(&out).contains("--ca: /nonexistent/ca.pem: "), "names the flag: {}", stderr(&out));
    let not_pem = broker.dir().join("not-a-certificate.txt");
    write_file(&not_pem, "hello\n");
    let out = ctl(&["--broker", &broker.url(Listener::Mqtts), "--ca", not_pem.to_str().unwrap(), "devices"]);
    assert_exit(&out, 78, "a CA file without a certificate");
    assert!(
        stderr(&out).contains("--ca: ") && stderr(&out).contains("no PEM certificate"),
        "{}",
        stderr(&out)
    );

    let out = ctl(&["--broker", "mqtt://127.0.0.1", "devices", "--bogus"]);
    assert_exit(&out, 64, "an unknown option");
    assert!(stderr(&out).contains("--bogus"), "{}", stderr(&out));

    let out = ctl(&["devices"]);
    assert_exit(&out, 64, "no broker at all");
    assert!(stderr(&out).contains("--broker"), "{}", stderr(&out));

    let started = Instant::now();
    let wrong = broker.wrong_ca_file();
    let mqtts = broker.url(Listener::Mqtts);
    let out =
        ctl(&["--broker", &mqtts, "--ca", wrong.to_str().unwrap(), "--connect-timeout", "3", "devices"]);
    let took = started.elapsed();
    assert_exit(&out, 3, "a broker certificate from an unknown CA");
    assert!(took < secs(6), "gave up after {took:?}, the connect timeout is 3 s");
    assert!(stderr(&out).to_lowercase().contains("certificate"), "{}", stderr(&out));
    assert!(stderr(&out).contains("could not connect"), "{}", stderr(&out));

    let out = ctl(&["--help"]);
    assert_exit(&out, 0, "--help");
    assert!(stdout(&out).contains("exit status"), "{}", stdout(&out));
    let out = ctl(&["--version"]);
    assert_exit(&out, 0, "--version");
    assert_eq!(stdout(&out).trim(), format!("tetherctl {VERSION}"));
}
