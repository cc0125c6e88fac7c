//! `tetherctl` end to end: the real binary against a real Mosquitto and the real agent, or a
//! device the test plays where the agent does not sign yet.

mod common;

use common::raw::RawClient;
use common::ssh::{self, SshAgent};
use common::*;
use serde_json::{json, Map, Value};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};
use tether::trust::{
    check_request, verify_init, Addressed, AgeLimit, Answer as TrustAnswer, AuthorizedKeys, DeviceKey,
    Outcome, Refusal, Verified, CLOCK_SANE_AFTER, UNSIGNED_BY,
};

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
    // Not the user's keys: each run signs with what the test gives it, and meets devices anew.
    cmd.env_remove("SSH_AUTH_SOCK").env("TETHER_KNOWN_DEVICES", fresh_known_devices());
    cmd.envs(env.iter().copied());
    cmd
}

/// A known_devices file no run has used, under the build's scratch directory.
fn fresh_known_devices() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("known_devices-{}-{n}", std::process::id()))
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

#[test]
fn devices_keeps_the_version_of_devices_gone_offline() {
    let (broker, mut stopped) = fleet_of_one();
    let mut sub = Sub::new(&broker, "tether/+/status");
    let mut killed = Agent::start(broker.agent_config("dev2"));
    sub.expect_online("dev2", secs(15));
    assert_eq!(stopped.term().code(), Some(0));
    sub.expect_offline("dev1", secs(5));
    killed.kill9();
    sub.expect_offline("dev2", secs(5));

    let out = ctl(&["--broker", &broker.url(Listener::Plain), "devices"]);
    assert_exit(&out, 0, "devices");
    let text = stdout(&out);
    for device in ["dev1", "dev2"] {
        let row: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with(&format!("{device} ")))
            .unwrap_or_else(|| panic!("a {device} row: {text}"))
            .split_whitespace()
            .collect();
        assert_eq!((row[1], row[6]), ("no", VERSION), "{device} offline, last version kept: {text}");
    }
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
    // ping is instant: straight to its final state, with no executing in between.
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

    // Never reported: said at once, nothing left behind.
    let started = Instant::now();
    let out = ctl(&["--broker", &url, "cmd", "ghost", "ping"]);
    assert_exit(&out, 67, "cmd to a device that has never reported");
    assert!(started.elapsed() < secs(3), "said at once, not after the 30 s timeout: {:?}", started.elapsed());
    let err = stderr(&out);
    assert!(err.contains("ghost has never reported") && err.contains("--queue"), "{err}");
    assert_eq!(retained(&broker, "tether/ghost/cmd/#"), vec![], "no request left");

    // Reported once, offline now: waits, then withdraws.
    publish_json(&broker, &status_topic("sleeper"), &json!({"online": false, "version": VERSION}), true);
    let started = Instant::now();
    let out = ctl(&["--broker", &url, "cmd", "sleeper", "ping", "--timeout", "2"]);
    assert_exit(&out, 2, "cmd to an offline device");
    assert!(started.elapsed() < secs(10), "took {:?}", started.elapsed());
    assert!(stderr(&out).contains("withdrawn"), "{}", stderr(&out));
    assert_eq!(retained(&broker, "tether/sleeper/cmd/#"), vec![], "withdrawn");

    // --queue: left for the device that has never reported, for when it appears.

    let out = ctl(&["--broker", &url, "cmd", "ghost", "ping", "--timeout", "2", "--queue"]);
    assert_exit(&out, 2, "cmd --queue to an absent device");
    assert!(
        stderr(&out).contains("never reported") && stderr(&out).contains("stays queued"),
        "{}",
        stderr(&out)
    );
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

    let out = ctl(&["--broker", &wss, "--ca", ca, "cmd", "dev1", "ping", "--json", "{}"]);
    assert_exit(&out, 0, "cmd over wss");
    assert!(stdout(&out).contains("\"successful\""), "{}", output_text(&out));
    // Parameters reach the agent, which checks them against the op's declaration.
    let out = ctl(&["--broker", &wss, "--ca", ca, "cmd", "dev1", "ping", "--json", r#"{"note":"hi"}"#]);
    assert_exit(&out, 1, "cmd with a parameter ping does not take");
    assert!(
        stdout(&out).contains(r#"unknown parameter \"note\" (ping takes: none)"#),
        "{}",
        output_text(&out)
    );

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
    let closed = format!("mqtt://127.0.0.1:{}", free_port());
    let out = ctl(&["--broker", &closed, "--connect-timeout", "2", "devices"]);
    let took = started.elapsed();
    assert_exit(&out, 3, "a broker port nobody listens on");
    assert!(took >= secs(2) && took < secs(5), "retried for the connect timeout of 2 s, took {took:?}");
    assert!(stderr(&out).contains("connection refused"), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("could not connect to {closed} within 2 s")), "{}", stderr(&out));

    let out = ctl(&["--help"]);
    assert_exit(&out, 0, "--help");
    assert!(stdout(&out).contains("exit status"), "{}", stdout(&out));
    let out = ctl(&["--version"]);
    assert_exit(&out, 0, "--version");
    assert_eq!(stdout(&out).trim(), format!("tetherctl {VERSION}"));
}

/// Retained status and heartbeat for `n` devices `dev-00000`..., published at QoS 1 as agents
/// do, fast: over one raw MQTT connection, all at once, then a PINGREQ. Mosquitto handles a
/// connection's packets in order, so its PINGRESP means it has stored them all.
fn fill_fleet(broker: &Broker, n: usize, heartbeat: impl Fn(usize) -> Value) {
    use mqttbytes::v4::{self, Packet};
    use std::io::{Read, Write};

    let mut stream = std::net::TcpStream::connect(("127.0.0.1", broker.ports.plain)).unwrap();
    let mut out = bytes::BytesMut::new();
    let mut connect = v4::Connect::new(format!("filler-{}", std::process::id()));
    if let Some((user, password)) = broker.admin() {
        connect.login = Some(v4::Login::new(user, password));
    }
    connect.write(&mut out).unwrap();
    let status = json!({"online": true, "version": VERSION, "arch": "x86_64-unknown-linux-musl", "since": 1});
    let mut pkid = 0u16;
    for i in 0..n {
        let device = format!("dev-{i:05}");
        for (topic, payload) in [(status_topic(&device), &status), (heartbeat_topic(&device), &heartbeat(i))]
        {
            let mut publish = v4::Publish::new(topic, mqttbytes::QoS::AtLeastOnce, payload.to_string());
            publish.retain = true;
            pkid = pkid % 65_000 + 1;
            publish.pkid = pkid;
            publish.write(&mut out).unwrap();
        }
    }
    v4::PingReq.write(&mut out).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sending = thread::spawn(move || writer.write_all(&out).unwrap());
    // Read the acknowledgements as they come, so neither side's buffers fill up.
    let mut inbuf = bytes::BytesMut::new();
    let mut chunk = vec![0u8; 64 * 1024];
    stream.set_read_timeout(Some(secs(30))).unwrap();
    'reading: loop {
        let got = stream.read(&mut chunk).expect("the broker answers the filler");
        assert!(got > 0, "the broker closed the filler's connection");
        inbuf.extend_from_slice(&chunk[..got]);
        while let Ok(packet) = v4::read(&mut inbuf, 1 << 20) {
            if packet == Packet::PingResp {
                break 'reading;
            }
        }
    }
    sending.join().unwrap();
}

/// A heartbeat whose numbers say which device sent it: cpu `i % 100` %, memory and disk used
/// `(i * 7) % 100` and `(i * 3) % 100` %.
fn numbered_heartbeat(i: usize) -> Value {
    json!({
        "seq": i, "ts": unix_ms(), "machine": "x86_64", "uptime_s": 100 + i, "load": [0.1, 0.2, 0.3],
        "cpu_pct": (i % 100) as f64,
        "mem": {"total_kb": 100_000, "available_kb": 100_000 - 1000 * ((i * 7) % 100)},
        "disks": [{"mount": "/", "total_kb": 1_000_000, "free_kb": 1_000_000 - 10_000 * ((i * 3) % 100)}],
        "net": [{"iface": "eth0", "rx_bytes": 123_456, "tx_bytes": 65_432}],
        "processes": [{"name": "sshd", "running": true, "pid": 311, "rss_kb": 2100, "cpu_pct": 0.0}],
        "custom": {"firmware": "2.4.1"},
        "dropped": 0
    })
}

/// Mosquitto queues at most 1000 QoS 1 messages for a client (`max_queued_messages`): a QoS 1
/// snapshot of this fleet would stop at ~510 devices. Stock settings here.
#[test]
fn devices_lists_ten_thousand_devices_completely() {
    const FLEET: usize = 10_000;
    let broker = Broker::start_default();
    let url = broker.url(Listener::Plain);
    let started = Instant::now();
    fill_fleet(&broker, FLEET, numbered_heartbeat);
    println!("filled the broker with {FLEET} devices' status and heartbeat in {:?}", started.elapsed());

    let started = Instant::now();
    let out = ctl(&["--broker", &url, "devices", "--json"]);
    let took = started.elapsed();
    println!("tetherctl devices --json: {FLEET} devices in {took:?}");
    assert_exit(&out, 0, "devices --json");
    let devices: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(devices.len(), FLEET, "every device, once");
    for (i, device) in devices.iter().enumerate() {
        assert_eq!(device["id"], format!("dev-{i:05}"));
        assert_eq!(device["online"], json!(true), "{device}");
        assert_eq!(device["version"], json!(VERSION), "{device}");
        assert_eq!(device["heartbeat"]["seq"], json!(i), "{device}");
        assert_eq!(device["cpu_pct"], json!((i % 100) as f64), "{device}");
        assert_eq!(device["mem_used_pct"], json!(((i * 7) % 100) as f64), "{device}");
        assert_eq!(device["disk_used_pct"], json!(((i * 3) % 100) as f64), "{device}");
    }

    let started = Instant::now();
    let out = ctl(&["--broker", &url, "devices"]);
    let took = started.elapsed();
    println!("tetherctl devices: {FLEET} devices in {took:?}");
    assert_exit(&out, 0, "devices");
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), FLEET, "one row per device");
    for (i, row) in rows.iter().enumerate() {
        let expected = [
            format!("dev-{i:05}"),
            "yes".into(),
            row[2].to_string(),
            format!("{}%", i % 100),
            format!("{}%", (i * 7) % 100),
            format!("{}%", (i * 3) % 100),
            VERSION.into(),
            "-".into(),
        ];
        assert_eq!(row, &expected, "row {i}");
        assert!(row[2].ends_with('s') || row[2].ends_with('m'), "heartbeat age: {row:?}");
    }
}

/// Mosquitto drops QoS 0 messages to a client that falls `max_queued_messages` behind, as a
/// tetherctl stalled (here stopped for a second) in a 20,000-message burst does; its end marker
/// is dropped too, so tetherctl reads everything again rather than fail or show a short list.
#[test]
fn devices_reads_again_when_the_broker_dropped_messages_to_a_stalled_tetherctl() {
    const FLEET: usize = 10_000;
    let broker = Broker::start_default();
    let url = broker.url(Listener::Plain);
    fill_fleet(&broker, FLEET, numbered_heartbeat);
    let mut log = broker.watch_log();

    let child = ctl_command(&["--broker", &url, "devices", "--json"], &[("RUST_LOG", "info")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    stall_once_subscribed(&mut log, "tetherctl", child.id(), secs(1));
    let out = child.wait_with_output().unwrap();

    assert_exit(&out, 0, "devices after a stall");
    assert!(broker.log().contains("Outgoing messages are being dropped"), "the broker dropped messages");
    assert!(stderr(&out).contains("reading again"), "{}", stderr(&out));
    let devices: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(devices.len(), FLEET, "every device, once");
    for (i, device) in devices.iter().enumerate() {
        assert_eq!(device["heartbeat"]["seq"], json!(i), "{device}");
    }
}

/// Over WebSockets Mosquitto writes a burst out later, not as it goes, so it drops all but the
/// first `max_queued_messages` (1000) QoS 0 messages of a subscription's retained burst:
/// tetherctl fails clearly and names the setting; with it raised as docs/brokers.md says, the
/// list is complete.
#[test]
fn devices_over_websockets_needs_max_queued_messages_raised_for_a_large_fleet() {
    const FLEET: usize = 2_000;
    for (settings, complete) in [(vec![], false), (vec!["max_queued_messages 0"], true)] {
        let mut opts = BrokerOpts::default();
        for line in settings {
            opts = opts.setting(line);
        }
        let broker = Broker::start(opts);
        fill_fleet(&broker, FLEET, numbered_heartbeat);
        let url = broker.url(Listener::Wss);
        let out = ctl(&["--broker", &url, "--ca", broker.ca_file().to_str().unwrap(), "devices", "--json"]);
        if complete {
            assert_exit(&out, 0, "devices over wss, max_queued_messages 0");
            let devices: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
            assert_eq!(devices.len(), FLEET, "every device, once");
        } else {
            assert_exit(&out, 1, "devices over wss, stock settings");
            assert_eq!(stdout(&out), "", "no partial list");
            assert!(stderr(&out).contains("max_queued_messages"), "{}", stderr(&out));
        }
    }
}

/// tetherctl knows the list is complete when its end marker comes after the retained messages;
/// when it does not (here the ACL lets this user read the fleet but not publish the marker), it
/// says so and fails rather than show a list it cannot vouch for.
#[test]
fn devices_fails_rather_than_show_a_list_it_cannot_know_complete() {
    let acl = "user viewer\ntopic read tether/#\nuser operator\ntopic readwrite #\n";
    let broker = Broker::start(BrokerOpts::default().anonymous(false).user("viewer", "viewer-pw").acl(acl));
    fill_fleet(&broker, 3, numbered_heartbeat);
    let password = broker.dir().join("viewer-password");
    write_file(&password, "viewer-pw");
    let url = broker.url(Listener::Plain);
    let viewer = ["--broker", &url, "--username", "viewer", "--password-file", password.to_str().unwrap()];

    let out = ctl(&[&viewer[..], &["devices"]].concat());
    assert_exit(&out, 1, "devices without its end marker");
    assert_eq!(stdout(&out), "", "no partial table");
    assert!(stderr(&out).contains("incomplete") && stderr(&out).contains("_tetherctl"), "{}", stderr(&out));

    let operator = ["--broker", &url, "--username", ADMIN_USER, "--password-file"];
    let admin_password = broker.dir().join("admin-password");
    write_file(&admin_password, ADMIN_PASSWORD);
    let out = ctl(&[&operator[..], &[admin_password.to_str().unwrap(), "devices"]].concat());
    assert_exit(&out, 0, "devices as the operator");
    assert_eq!(stdout(&out).lines().count(), 4, "a header and 3 devices: {}", stdout(&out));
}

/// A Mosquitto serving `cert`/`key` on a TLS listener of its own; killed on drop.
struct TlsBroker {
    child: Child,
    url: String,
}

impl TlsBroker {
    fn start(dir: &std::path::Path, cert: &str, key: &str) -> TlsBroker {
        let port = free_port();
        let conf = dir.join(format!("{cert}.conf"));
        // As root, Mosquitto would switch to its own user, who cannot read the test's files.
        let user = if unsafe { libc::geteuid() } == 0 { "user root\n" } else { "" };
        write_file(
            &conf,
            &format!(
                "{user}listener {port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\nallow_anonymous true\n"
            ),
        );
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let listening = wait_until(secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(listening, "mosquitto with {cert} is not listening");
        TlsBroker { child, url: format!("mqtts://127.0.0.1:{port}") }
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A certificate signed by the broker's CA for 127.0.0.1 that expired as it was made.
fn expired_certificate(dir: &std::path::Path) -> (&'static str, &'static str) {
    let openssl = |args: &str| {
        let out = Command::new("openssl").args(args.split_whitespace()).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "openssl {args}: {}", output_text(&out));
    };
    openssl(
        "req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout expired.key \
         -out expired.csr -subj /CN=localhost -config openssl.cnf",
    );
    openssl(
        "x509 -req -in expired.csr -CA ca.pem -CAkey ca.key -CAcreateserial -CAserial ca.srl \
         -out expired.pem -days 0 -extfile openssl.cnf -extensions server",
    );
    thread::sleep(Duration::from_millis(1100)); // valid until the second it was made
    ("expired.pem", "expired.key")
}

/// Retrying cannot fix a certificate that fails verification: tetherctl says why at once and
/// exits 78, naming the setting to look at as the user gave it.
#[test]
fn tls_verification_failures_fail_at_once_with_exit_78() {
    let broker = Broker::start_default();
    let ca = broker.ca_file();
    let ca = ca.to_str().unwrap();
    let wrong_ca = broker.wrong_ca_file();
    let wrong_ca = wrong_ca.to_str().unwrap();
    let (cert, key) = expired_certificate(broker.dir());
    let expired = TlsBroker::start(broker.dir(), cert, key);

    let (mqtts, wss, wrong_name) =
        (broker.url(Listener::Mqtts), broker.url(Listener::Wss), broker.url(Listener::WrongName));
    let cases = [
        ("an unknown CA", [&mqtts, wrong_ca], "unknown CA"),
        ("an unknown CA over wss", [&wss, wrong_ca], "unknown CA"),
        ("a certificate for another host", [&wrong_name, ca], "not valid for the broker's host name"),
        ("an expired certificate", [&expired.url, ca], "has expired"),
    ];
    for (what, flags, why) in cases {
        let started = Instant::now();
        let [url, ca] = flags;
        let out = ctl(&["--broker", url, "--ca", ca, "--connect-timeout", "30", "devices"]);
        let took = started.elapsed();
        assert_exit(&out, 78, what);
        assert!(took < secs(3), "{what}: gave up after {took:?}, not at once");
        let err = stderr(&out);
        assert!(err.contains(why) && !err.contains("retrying"), "{what}: {err}");
    }

    // The fix is named as the user gave the CA: flag, variable, or config file.
    let out = ctl(&["--broker", &mqtts, "--ca", wrong_ca, "devices"]);
    assert!(stderr(&out).contains("check --ca"), "{}", stderr(&out));
    let out = ctl_env(&["--broker", &mqtts, "devices"], &[("TETHER_CA", wrong_ca)]);
    assert_exit(&out, 78, "unknown CA from TETHER_CA");
    assert!(stderr(&out).contains("check TETHER_CA"), "{}", stderr(&out));
    let config = broker.dir().join("ctl-wrong-ca.json");
    write_file(&config, &json!({"broker": {"url": mqtts, "ca_file": wrong_ca}}).to_string());
    let out = ctl(&["--config", config.to_str().unwrap(), "devices"]);
    assert_exit(&out, 78, "unknown CA from the config file");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("config {}: ", config.display())) && err.contains("check broker.ca_file"),
        "{err}"
    );
}

/// `cmds`: what is retained for a device, and clearing it by state or id, never an executing
/// command unless asked. States are published here as a device and operators would.
#[test]
fn cmds_lists_and_clears_retained_commands_by_state_or_id() {
    let (broker, _agent) = fleet_of_one();
    let url = broker.url(Listener::Plain);
    let cmds = |args: &[&str]| ctl(&[&["--broker", url.as_str(), "cmds"][..], args].concat());
    let now = unix_ms();
    let states = [
        ("ping", format!("{}-1-0001", now - 3_600_000), json!({"status": "init"})),
        ("reboot", format!("{}-1-0002", now - 600_000), json!({"status": "executing"})),
        ("ping", format!("{}-1-0003", now - 60_000), json!({"status": "successful", "result": {}})),
        ("config", format!("{}-1-0004", now - 5_000), json!({"status": "failed", "reason": "no"})),
    ];
    for (op, id, payload) in &states {
        publish_json(&broker, &cmd_topic("dev9", op, id), payload, true);
    }
    publish(&broker, &cmd_topic("dev9", "ping", "odd-id"), b"{not json", true);
    let id = |i: usize| states[i].1.clone();

    let out = cmds(&["dev9"]);
    assert_exit(&out, 0, "cmds dev9");
    let rows: Vec<Vec<String>> =
        stdout(&out).lines().map(|l| l.split_whitespace().map(String::from).collect()).collect();
    let expected = [
        ["OP", "ID", "STATE", "AGE"].map(String::from),
        ["ping".into(), id(0), "pending".into(), "1h".into()],
        ["reboot".into(), id(1), "executing".into(), "10m".into()],
        ["ping".into(), id(2), "successful".into(), "1m".into()],
        ["config".into(), id(3), "failed".into(), "5s".into()],
        ["ping", "odd-id", "unreadable", "-"].map(String::from),
    ];
    assert_eq!(rows, expected, "oldest first:\n{}", stdout(&out));
    let out = cmds(&["dev9", "--json"]);
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[1]["topic"], cmd_topic("dev9", "reboot", &id(1)));
    assert_eq!(listed[1]["payload"], json!({"status": "executing"}));
    let left = || {
        let mut topics: Vec<String> =
            retained(&broker, "tether/dev9/cmd/#").into_iter().map(|(t, _)| t).collect();
        topics.sort();
        topics
    };
    let topics = |ids: &[(&str, String)]| {
        let mut topics: Vec<String> = ids.iter().map(|(op, id)| cmd_topic("dev9", op, id)).collect();
        topics.sort();
        topics
    };

    // Bad input changes nothing.
    let out = cmds(&["dev9", "--clear", &id(0), "nope-1"]);
    assert_exit(&out, 1, "an id that is not there");
    assert!(
        stderr(&out).contains("no command nope-1") && stderr(&out).contains("nothing cleared"),
        "{}",
        stderr(&out)
    );
    let out = cmds(&["dev9", "--clear", "--all", &id(0)]);
    assert_exit(&out, 64, "--all with ids");
    assert_eq!(left().len(), 5);

    let out = cmds(&["dev9", "--clear", "--final"]);
    assert_exit(&out, 0, "--clear --final");
    let cleared = format!("cleared ping/{} (successful)\ncleared config/{} (failed)\n", id(2), id(3));
    assert_eq!(stdout(&out), cleared);
    assert_eq!(left(), topics(&[("ping", id(0)), ("reboot", id(1)), ("ping", "odd-id".into())]));

    let out = cmds(&["dev9", "--clear"]);
    assert_exit(&out, 0, "--clear");
    assert_eq!(stdout(&out), format!("cleared ping/{} (pending)\ncleared ping/odd-id (unreadable)\n", id(0)));
    assert_eq!(left(), topics(&[("reboot", id(1))]), "the executing command stays");

    let out = cmds(&["dev9", "--clear", &format!("reboot/{}", id(1))]);
    assert_exit(&out, 0, "--clear OP/ID");
    assert_eq!(stdout(&out), format!("cleared reboot/{} (executing)\n", id(1)));
    assert!(stderr(&out).contains("still running"), "{}", stderr(&out));
    assert_eq!(left(), Vec::<String>::new());

    // A real agent's answer that nobody cleared; the ops it advertises are not commands.
    publish_json(&broker, &cmd_topic("dev1", "ping", "left-behind"), &json!({"status": "init"}), true);
    let mut sub = Sub::new(&broker, &cmd_topic("dev1", "ping", "left-behind"));
    sub.expect_json(&cmd_topic("dev1", "ping", "left-behind"), "answered", secs(15), |v| {
        v["status"] == "successful"
    });
    let out = cmds(&["dev1", "--json"]);
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((&listed[0]["id"], &listed[0]["state"]), (&json!("left-behind"), &json!("successful")));
    let out = cmds(&["dev1", "--clear", "left-behind"]);
    assert_exit(&out, 0, "--clear ID");
    assert_eq!(retained(&broker, "tether/dev1/cmd/+/+"), vec![]);
}

#[test]
fn help_for_every_command_and_usage_errors_exit_64() {
    let out = ctl(&["help"]);
    assert_exit(&out, 0, "help");
    assert_eq!(out.stdout, ctl(&["--help"]).stdout, "help and --help say the same");
    for command in ["devices", "watch", "cmd", "cmds", "ops", "known-devices", "completions", "help"] {
        assert!(stdout(&out).contains(&format!("\n  {command} ")), "{command} in the help: {}", stdout(&out));
        for args in [vec!["help", command], vec![command, "--help"]] {
            let one = ctl(&args);
            assert_exit(&one, 0, &args.join(" "));
            assert!(stdout(&one).starts_with(&format!("usage: tetherctl {command} ")), "{}", stdout(&one));
        }
    }
    assert!(stdout(&out).contains("64   bad command line"), "{}", stdout(&out));

    for (args, says) in [
        (vec!["help", "frobnicate"], "unknown command \"frobnicate\""),
        (vec!["frobnicate"], "unknown command \"frobnicate\""),
        (vec!["devices", "--queue"], "devices takes no --queue"),
        (vec!["cmd", "dev1"], "usage: tetherctl cmd DEVICE OP"),
        (vec!["cmds", "dev1", "--final"], "--final goes with --clear"),
        (vec!["completions", "fish"], "bash"),
    ] {
        let out = ctl(&args);
        assert_exit(&out, 64, &args.join(" "));
        assert!(stderr(&out).contains(says) && stderr(&out).contains("--help"), "{}", stderr(&out));
    }
}

/// Runs bash with tetherctl's completion script loaded, completing `line` (cursor at its
/// end); the candidates, one per line.
fn complete(line: &str, env: &[(&str, &str)]) -> Vec<String> {
    let script = ctl(&["completions", "bash"]);
    assert_exit(&script, 0, "completions bash");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tetherctl.bash");
    std::fs::write(&path, &script.stdout).unwrap();
    let program = format!(
        r#"source {script} || exit 9
complete -p tetherctl || exit 8
COMP_LINE=$1 COMP_POINT=${{#1}}
read -ra COMP_WORDS <<< "$1"
[[ $1 == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))
_tetherctl
printf '%s\n' "${{COMPREPLY[@]}}""#,
        script = path.display()
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &program, "bash", line])
        .env("TETHER_KNOWN_DEVICES", fresh_known_devices())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert_exit(&out, 0, &format!("completing {line:?}"));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert!(lines.next().is_some_and(|l| l.starts_with("complete -F _tetherctl")), "{text}");
    lines.filter(|l| !l.is_empty()).map(String::from).collect()
}

#[test]
fn bash_completes_commands_options_devices_and_ops() {
    let (broker, _agent) = fleet_of_one();
    let url = broker.url(Listener::Plain);
    assert_eq!(complete(&format!("{CTL_BIN} c"), &[]), ["cmd", "cmds", "completions"]);
    assert_eq!(complete(&format!("{CTL_BIN} help d"), &[]), ["devices"]);
    assert_eq!(
        complete(&format!("{CTL_BIN} cmds dev1 --c"), &[]),
        ["--ca", "--cert", "--config", "--connect-timeout", "--clear"]
    );
    assert_eq!(complete(&format!("{CTL_BIN} cmd dev1 ping --q"), &[]), ["--queue"]);
    assert_eq!(complete(&format!("{CTL_BIN} known-devices f"), &[]), ["forget"]);
    assert_eq!(complete(&format!("{CTL_BIN} cmd dev1 reboot --i"), &[]), ["--identity"]);
    assert!(complete(&format!("{CTL_BIN} devices --q"), &[]).is_empty(), "devices takes no --queue");
    let dir = tempfile::tempdir().unwrap();
    write_file(&dir.path().join("ca-bundle.pem"), "");
    let prefix = dir.path().join("ca-b");
    assert_eq!(
        complete(&format!("{CTL_BIN} --ca {}", prefix.display()), &[]),
        [dir.path().join("ca-bundle.pem").display().to_string()]
    );

    // Device ids and ops come from the broker, with the connection typed so far or from the
    // environment.
    assert_eq!(complete(&format!("{CTL_BIN} --broker {url} cmd d"), &[]), ["dev1"]);
    assert_eq!(complete(&format!("{CTL_BIN} watch "), &[("TETHER_BROKER", &url)]), ["dev1"]);
    let ops = complete(&format!("{CTL_BIN} --broker {url} cmd dev1 p"), &[]);
    assert_eq!(ops, ["ping", "put"]);
}

#[test]
fn the_agents_config_file_is_a_tetherctl_config_and_errors_name_what_the_user_gave() {
    let (broker, agent) = fleet_of_one();
    let out = ctl(&["--config", agent.config_path().to_str().unwrap(), "ops", "dev1"]);
    assert_exit(&out, 0, "ops with the agent's own config file");
    assert!(stdout(&out).lines().any(|l| l == "ping"), "{}", output_text(&out));

    let mqtts = broker.url(Listener::Mqtts);
    let (cert, key) = broker.client_cert("operator");
    let out = ctl(&["--broker", &mqtts, "--cert", cert.to_str().unwrap(), "devices"]);
    assert_exit(&out, 78, "--cert without --key");
    assert!(stderr(&out).contains("--cert and --key go together"), "{}", stderr(&out));
    let out = ctl_env(&["--broker", &mqtts, "devices"], &[("TETHER_KEY", key.to_str().unwrap())]);
    assert_exit(&out, 78, "TETHER_KEY without a certificate");
    assert!(stderr(&out).contains("--cert and TETHER_KEY go together"), "{}", stderr(&out));
    let password = broker.dir().join("pw");
    write_file(&password, "secret");
    let out = ctl(&["--broker", &mqtts, "--password-file", password.to_str().unwrap(), "devices"]);
    assert_exit(&out, 78, "a password without a user name");
    assert!(stderr(&out).contains("--password-file needs --username"), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------
// Signed requests and answers. The test plays the device: a raw MQTT client with a device key,
// which checks what tetherctl sends as an agent would and answers as the test chooses.

const WEEK: AgeLimit = AgeLimit { max_age_s: 7 * 86_400, clock_sane_after: CLOCK_SANE_AFTER };

/// A device as the broker sees it: its retained status presents `key` (unless made without
/// one), and it reads the requests on its command topics.
struct FakeDevice {
    id: &'static str,
    key: DeviceKey,
    client: RawClient,
    port: u16,
}

/// A request as the device receives it.
struct Incoming {
    topic: String,
    op: String,
    id: String,
    init: Map<String, Value>,
}

impl Incoming {
    fn at(&self) -> Addressed<'_> {
        Addressed { device: "dev1", op: &self.op, id: &self.id }
    }
}

fn device_key() -> DeviceKey {
    DeviceKey::load(&DeviceKey::generate().unwrap()).unwrap()
}

impl FakeDevice {
    fn start(broker: &Broker) -> FakeDevice {
        let port = broker.ports.plain;
        let mut client = RawClient::connect(port, "fake-dev1");
        client.subscribe(&["tether/dev1/cmd/+/+"]);
        let mut device = FakeDevice { id: "dev1", key: device_key(), client, port };
        device.publish_status(true);
        device
    }

    /// Retains the device's status, with its key or as an agent older than device keys.
    fn publish_status(&mut self, with_key: bool) {
        let mut status = json!({"online": true, "version": VERSION});
        if with_key {
            status["key"] = json!(self.key.openssh_public(""));
            status["fingerprint"] = json!(self.key.fingerprint());
        }
        let mut publisher = RawClient::connect(self.port, "fake-dev1-status");
        publisher.publish_all(&[(status_topic(self.id), status.to_string().into_bytes())], true);
    }

    /// A new key, as a re-flashed device (or someone passing for it) would present.
    fn change_key(&mut self) {
        self.key = device_key();
        self.publish_status(true);
    }

    fn next_request(&mut self) -> Incoming {
        let deadline = Instant::now() + secs(20);
        while let Some(m) = self.client.next(deadline.saturating_duration_since(Instant::now())) {
            let Ok(Value::Object(init)) = serde_json::from_slice::<Value>(&m.payload) else { continue };
            let parts: Vec<&str> = m.topic.split('/').collect();
            if init.get("status") == Some(&json!("init")) && parts.len() == 5 {
                return Incoming { op: parts[3].into(), id: parts[4].into(), topic: m.topic, init };
            }
        }
        panic!("no request for dev1 within 20 s");
    }

    /// The request's signer, checked as an agent checks it: by `keys`, for this device, op and
    /// id, and fresh.
    fn verify(&self, request: &Incoming, keys: &AuthorizedKeys) -> Verified {
        let verified = verify_init(&request.init, keys).unwrap_or_else(|r| panic!("{r}: {:?}", request.init));
        let at = request.at();
        check_request(&verified.request, at, unix_s(), WEEK).unwrap_or_else(|r| panic!("{r}"));
        assert_eq!(verified.request.params, Map::new());
        verified
    }

    fn answer(&mut self, request: &Incoming, state: Map<String, Value>) {
        let payload = Value::Object(state).to_string().into_bytes();
        self.client.publish_all(&[(request.topic.clone(), payload)], true);
    }

    /// The device's signed answer, successful, saying who asked.
    fn signed(&self, request: &Incoming, by: &str) -> Map<String, Value> {
        let result = json!({"boot_id": "b-1"});
        TrustAnswer::new(request.at(), Outcome::Successful(result), by).signed_state(&self.key)
    }
}

/// tetherctl in the background, for the test to play the device meanwhile.
fn ctl_in_background(args: &[&str], env: &[(&str, &str)]) -> thread::JoinHandle<Output> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        ctl_env(&args, &env)
    })
}

/// Sends `cmd dev1 reboot` with `env`; the device checks the request against `keys` and
/// answers it, signed. Returns who signed, and tetherctl's output.
fn signed_reboot(
    broker: &Broker,
    device: &mut FakeDevice,
    keys: &AuthorizedKeys,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Verified, Output) {
    let url = broker.url(Listener::Plain);
    let ctl = ctl_in_background(&[&["--broker", url.as_str(), "cmd", "dev1", "reboot"], extra].concat(), env);
    let request = device.next_request();
    let verified = device.verify(&request, keys);
    device.answer(&request, device.signed(&request, &verified.signer.to_string()));
    let out = ctl.join().unwrap();
    assert_exit(&out, 0, "a signed reboot, answered");
    (verified, out)
}

#[test]
fn cmd_signs_with_the_first_key_in_ssh_agent_that_devices_accept_and_prints_the_signed_answer() {
    let broker = Broker::start_default();
    let mut device = FakeDevice::start(&broker);
    let dir = tempfile::tempdir().unwrap();
    let agent = SshAgent::start(dir.path());
    // Devices refuse P-384: tetherctl passes over it.
    agent.add(&ssh::keygen(dir.path(), "p384", &["-t", "ecdsa", "-b", "384"]));
    let alice = ssh::keygen(dir.path(), "alice", &["-t", "ed25519"]);
    agent.add(&alice);
    let keys = AuthorizedKeys::parse(&ssh::public_line(&alice));

    let (verified, out) =
        signed_reboot(&broker, &mut device, &keys, &[], &[("SSH_AUTH_SOCK", agent.socket_text())]);
    assert_eq!(verified.signer.comment, "alice");
    let answer: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    assert_eq!(answer, json!({"status": "successful", "result": {"boot_id": "b-1"}}));
    let by = format!("dev1 signed its answer: it ran reboot for alice {}", verified.signer.fingerprint);
    assert!(stderr(&out).contains(&by), "{}", stderr(&out));
    assert!(!stderr(&out).contains("unsigned"), "{}", stderr(&out));
    assert_eq!(retained(&broker, "tether/dev1/cmd/reboot/+"), vec![], "the answer read is cleared");
}

#[test]
fn cmd_signs_with_a_key_file_a_pub_whose_key_is_in_ssh_agent_or_a_passphrase_protected_file() {
    let broker = Broker::start_default();
    let mut device = FakeDevice::start(&broker);
    let dir = tempfile::tempdir().unwrap();
    let file = ssh::keygen(dir.path(), "file", &["-t", "ecdsa", "-b", "256"]);
    let (first, second) = (
        ssh::keygen(dir.path(), "first", &["-t", "ed25519"]),
        ssh::keygen(dir.path(), "second", &["-t", "rsa"]),
    );
    let protected = ssh::keygen_with_passphrase(dir.path(), "protected", &["-t", "ed25519"], "open sesame");
    let lines: Vec<String> =
        [&file, &first, &second, &protected].iter().map(|k| ssh::public_line(k)).collect();
    let keys = AuthorizedKeys::parse(&lines.join("\n"));
    let agent = SshAgent::start(dir.path());
    agent.add(&first);
    agent.add(&second);
    let (verified, _) = signed_reboot(&broker, &mut device, &keys, &["-i", file.to_str().unwrap()], &[]);
    assert_eq!(verified.signer.comment, "file");
    // A .pub picks its key out of ssh-agent, the first one or not.
    let second_pub = second.with_extension("pub");
    let via_agent =
        [("SSH_AUTH_SOCK", agent.socket_text()), ("TETHER_IDENTITY", second_pub.to_str().unwrap())];
    let (verified, _) = signed_reboot(&broker, &mut device, &keys, &[], &via_agent);
    assert_eq!(verified.signer.comment, "second");
    // The flag wins over the variable.
    let (verified, _) =
        signed_reboot(&broker, &mut device, &keys, &["--identity", file.to_str().unwrap()], &via_agent);
    assert_eq!(verified.signer.comment, "file");

    let askpass = ssh::askpass(dir.path(), "open sesame");
    let prompted = [("SSH_ASKPASS", askpass.to_str().unwrap()), ("SSH_ASKPASS_REQUIRE", "force")];
    let (verified, _) =
        signed_reboot(&broker, &mut device, &keys, &["-i", protected.to_str().unwrap()], &prompted);
    assert_eq!(verified.signer.comment, "protected");

    // A wrong passphrase: said, and nothing sent.
    let wrong = ssh::askpass(dir.path(), "wrong guess");
    let url = broker.url(Listener::Plain);
    let out = ctl_env(
        &["--broker", &url, "cmd", "dev1", "reboot", "-i", protected.to_str().unwrap()],
        &[("SSH_ASKPASS", wrong.to_str().unwrap()), ("SSH_ASKPASS_REQUIRE", "force")],
    );
    assert_exit(&out, 1, "a wrong passphrase");
    let err = stderr(&out);
    let said = format!("cannot sign the request with --identity {}: ssh-keygen", protected.display());
    assert!(err.contains(&said) && err.contains("nothing was sent"), "{err}");
    assert_eq!(retained(&broker, "tether/dev1/cmd/#"), vec![], "nothing published");
}

#[test]
fn cmd_without_an_identity_sends_the_request_unsigned_and_says_so_for_ops_that_need_one() {
    let broker = Broker::start_default();
    let mut device = FakeDevice::start(&broker);
    let url = broker.url(Listener::Plain);
    for (op, noted) in [("reboot", true), ("ping", false)] {
        let ctl = ctl_in_background(&["--broker", &url, "cmd", "dev1", op], &[]);
        let request = device.next_request();
        assert_eq!(request.init, json!({"status": "init"}).as_object().cloned().unwrap(), "{op}: unsigned");
        assert_eq!(verify_init(&request.init, &AuthorizedKeys::default()).unwrap_err(), Refusal::Unsigned);
        device.answer(&request, device.signed(&request, UNSIGNED_BY));
        let out = ctl.join().unwrap();
        assert_exit(&out, 0, op);
        let err = stderr(&out);
        let note = format!("sending {op} unsigned (no -i FILE or TETHER_IDENTITY, and no ssh-agent");
        assert_eq!(err.matches(&note).count(), usize::from(noted), "{op}: {err}");
        assert!(err.contains(&format!("it ran {op} for an unsigned request")), "{op}: {err}");
    }
}

#[test]
fn first_contact_records_the_device_key_and_a_changed_key_stops_tetherctl_until_forgotten() {
    let broker = Broker::start_default();
    let mut device = FakeDevice::start(&broker);
    let url = broker.url(Listener::Plain);
    let dir = tempfile::tempdir().unwrap();
    let known_devices = dir.path().join("tether").join("known_devices");
    let file = known_devices.to_str().unwrap();
    let with_file = [("TETHER_KNOWN_DEVICES", file)];
    let first = device.key.fingerprint();

    let out = ctl_env(&["--broker", &url, "devices", "--json"], &with_file);
    assert_exit(&out, 0, "devices, meeting dev1");
    let devices: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(devices[0]["fingerprint"], json!(first), "{devices}");
    assert!(stderr(&out).contains(&format!("dev1 is a new device: recorded its key {first} in {file}")));
    let recorded = std::fs::read_to_string(&known_devices).unwrap();
    assert_eq!(recorded, format!("dev1 {}\n", device.key.openssh_public("")));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&known_devices), mode(known_devices.parent().unwrap())), (0o600, 0o700));
    let out = ctl_env(&["--broker", &url, "devices"], &with_file);
    assert_exit(&out, 0, "devices, dev1 known");
    assert!(!stderr(&out).contains("new device"), "{}", stderr(&out));
    let short: String = first.chars().take(15).collect();
    assert!(stdout(&out).lines().nth(1).unwrap().ends_with(&format!(" {short}")), "{}", stdout(&out));

    device.change_key();
    let second = device.key.fingerprint();
    let out = ctl_env(&["--broker", &url, "cmd", "dev1", "reboot"], &with_file);
    assert_exit(&out, 4, "cmd to a device whose key changed");
    let err = stderr(&out);
    assert!(err.contains("THE KEY OF DEVICE dev1 HAS CHANGED!") && err.contains("nothing was sent"), "{err}");
    assert!(err.contains(&first) && err.contains(&second), "both fingerprints: {err}");
    assert_eq!(retained(&broker, "tether/dev1/cmd/#"), vec![], "nothing sent");
    let out = ctl_env(&["--broker", &url, "devices"], &with_file);
    assert_exit(&out, 4, "devices with a changed key");
    assert!(stdout(&out).lines().nth(1).unwrap().ends_with(" CHANGED"), "{}", stdout(&out));
    assert!(stderr(&out).contains("HAS CHANGED!"), "{}", stderr(&out));

    // The command the warning gives, as given.
    let accept =
        err.lines().map(str::trim).find(|l| l.starts_with("tetherctl ")).expect("the command to run");
    assert_eq!(accept, "tetherctl known-devices forget dev1");
    let words: Vec<&str> = accept.split_whitespace().skip(1).collect();
    let out = ctl_env(&words, &with_file);
    assert_exit(&out, 0, accept);
    assert_eq!(stdout(&out), "forgot the key of dev1\n");
    let ctl = ctl_in_background(&["--broker", &url, "cmd", "dev1", "reboot"], &with_file);
    let request = device.next_request();
    device.answer(&request, device.signed(&request, UNSIGNED_BY));
    let out = ctl.join().unwrap();
    assert_exit(&out, 0, "cmd after forgetting the old key");
    assert!(stderr(&out).contains(&format!("dev1 is a new device: recorded its key {second}")));
    let out = ctl_env(&["known-devices"], &with_file);
    assert_eq!(stdout(&out), format!("dev1 {second}\n"));
    let out = ctl_env(&["--known-devices", file, "known-devices", "forget", "dev2"], &[]);
    assert_exit(&out, 1, "forgetting a device never met");
    assert!(stderr(&out).contains("no key is recorded for dev2"), "{}", stderr(&out));
}

/// Makes a final state that is not the device's answer to the request.
type Forge<'a> = &'a dyn Fn(&FakeDevice, &Incoming) -> Map<String, Value>;

#[test]
fn forged_answers_are_rejected_and_their_result_not_shown() {
    let broker = Broker::start_default();
    let mut device = FakeDevice::start(&broker);
    let url = broker.url(Listener::Plain);
    let dir = tempfile::tempdir().unwrap();
    let known_devices = dir.path().join("known_devices");
    let with_file = [("TETHER_KNOWN_DEVICES", known_devices.to_str().unwrap())];
    let stranger = device_key();
    let forgeries: [(&str, Forge, &str); 4] = [
        (
            "signed by another key",
            &|_, req| {
                TrustAnswer::new(req.at(), Outcome::Successful(json!({"boot_id": "forged"})), "x")
                    .signed_state(&stranger)
            },
            "signed by another key",
        ),
        (
            "signed by the device for another id",
            &|device, req| {
                let other = Addressed { id: "1-other", ..req.at() };
                TrustAnswer::new(other, Outcome::Successful(json!({"boot_id": "forged"})), "x")
                    .signed_state(&device.key)
            },
            "signed as the answer for id \"1-other\"",
        ),
        (
            "unsigned, from a device whose key is known",
            &|_, _| {
                json!({"status": "successful", "result": {"boot_id": "forged"}}).as_object().cloned().unwrap()
            },
            "the answer is not signed",
        ),
        (
            "a signed failure relabelled successful",
            &|device, req| {
                let mut state =
                    TrustAnswer::new(req.at(), Outcome::Failed("no".into()), "x").signed_state(&device.key);
                state.insert("status".into(), json!("successful"));
                state.insert("result".into(), json!({"boot_id": "forged"}));
                state
            },
            "for status \"failed\", not \"successful\"",
        ),
    ];
    for (what, forge, why) in forgeries {
        let ctl = ctl_in_background(&["--broker", &url, "cmd", "dev1", "reboot"], &with_file);
        let request = device.next_request();
        device.answer(&request, forge(&device, &request));
        let out = ctl.join().unwrap();
        assert_exit(&out, 5, what);
        assert!(!stdout(&out).contains("forged"), "{what}: the result is not shown: {}", stdout(&out));
        let err = stderr(&out);
        assert!(err.contains("REJECTED a forged answer") && err.contains(why), "{what}: {err}");
        assert!(err.contains(&device.key.fingerprint()), "{what}: names the device's key: {err}");
    }

    // The genuine answer to the same kind of request is shown.
    let ctl = ctl_in_background(&["--broker", &url, "cmd", "dev1", "reboot"], &with_file);
    let request = device.next_request();
    device.answer(&request, device.signed(&request, UNSIGNED_BY));
    let out = ctl.join().unwrap();
    assert_exit(&out, 0, "the genuine answer");
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["result"], json!({"boot_id": "b-1"}));
}

#[test]
fn a_device_without_a_key_is_answered_with_a_warning() {
    let broker = Broker::start_default();
    let mut device = FakeDevice::start(&broker);
    device.publish_status(false);
    let url = broker.url(Listener::Plain);
    let ctl = ctl_in_background(&["--broker", &url, "cmd", "dev1", "ping"], &[]);
    let request = device.next_request();
    device.answer(
        &request,
        json!({"status": "successful", "result": {"old": true}}).as_object().cloned().unwrap(),
    );
    let out = ctl.join().unwrap();
    assert_exit(&out, 0, "an answer from an agent without a key");
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["result"], json!({"old": true}));
    let err = stderr(&out);
    assert_eq!(err.matches("has no device key").count(), 1, "{err}");
}
