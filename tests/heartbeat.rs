//! What a heartbeat carries, checked against /proc and the commands the test runs.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Child, Command};

fn meminfo_kb(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn uptime_s() -> f64 {
    std::fs::read_to_string("/proc/uptime").unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

fn uname_m() -> String {
    let out = Command::new("uname").arg("-m").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// (total, available, free) of the file system at `path`, in KiB, as statvfs gives them
/// (available excludes the blocks reserved for root; free includes them).
fn statvfs_kb(path: &str) -> (u64, u64, u64) {
    let c = std::ffi::CString::new(path).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    let kb = |blocks: u64| blocks * s.f_frsize as u64 / 1024;
    (kb(s.f_blocks as u64), kb(s.f_bavail as u64), kb(s.f_bfree as u64))
}

fn close(a: u64, b: u64, tolerance: f64) -> bool {
    (a as f64 - b as f64).abs() <= tolerance * (a.max(b) as f64) + 1.0
}

/// A child process that stays up until dropped.
struct Sleeper(Child);
impl Sleeper {
    fn start() -> Sleeper {
        Sleeper(Command::new("sleep").arg("600").spawn().unwrap())
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}
impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(broker: &Broker, device: &str, patch: Value) -> (Agent, Sub) {
    let mut config = broker.agent_config(device);
    merge(&mut config, patch);
    let mut sub = Sub::new(broker, &format!("tether/{device}/#"));
    let agent = Agent::start(config);
    sub.expect_online(device, secs(15));
    (agent, sub)
}

#[test]
fn heartbeat_fields_match_the_system() {
    let broker = Broker::start_default();
    let (_agent, mut sub) = start(&broker, "dev-fields", json!({}));
    let first = sub.expect_live_heartbeat("dev-fields", secs(10));
    let hb = sub.expect_live_heartbeat("dev-fields", secs(10));
    let third = sub.expect_live_heartbeat("dev-fields", secs(10));
    let seqs = [&first, &hb, &third].map(|h| h["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {h}")));
    assert!(seqs[0] < seqs[1] && seqs[1] < seqs[2], "seq not increasing: {seqs:?}");
    assert_eq!(seqs[2] - seqs[0], 2, "heartbeats skipped a seq: {seqs:?}");

    let ts = hb["ts"].as_u64().unwrap_or_else(|| panic!("no ts: {hb}"));
    assert!(ts.abs_diff(unix_ms()) < 60_000, "ts {ts} is not unix ms about now ({})", unix_ms());
    assert!(third["ts"].as_u64().unwrap() > ts, "ts not increasing");
    assert_eq!(hb["machine"], uname_m(), "{hb}");
    let up = hb["uptime_s"].as_u64().unwrap_or_else(|| panic!("no uptime_s: {hb}"));
    assert!((up as f64 - uptime_s()).abs() < 30.0, "uptime_s {up} vs /proc/uptime {}", uptime_s());
    let load = hb["load"].as_array().unwrap_or_else(|| panic!("no load: {hb}"));
    assert_eq!(load.len(), 3, "{hb}");
    assert!(load.iter().all(|l| l.as_f64().is_some_and(|l| l >= 0.0)), "{hb}");
    let cpu = hb["cpu_pct"].as_f64().unwrap_or_else(|| panic!("no cpu_pct: {hb}"));
    assert!((0.0..=100.0).contains(&cpu), "cpu_pct {cpu}");

    assert_eq!(hb["mem"]["total_kb"].as_u64(), Some(meminfo_kb("MemTotal")), "mem: {}", hb["mem"]);
    let avail = hb["mem"]["available_kb"].as_u64().unwrap_or_else(|| panic!("mem: {}", hb["mem"]));
    assert!(avail > 0 && avail <= meminfo_kb("MemTotal"), "available_kb {avail}");

    let disks = hb["disks"].as_array().unwrap_or_else(|| panic!("no disks: {hb}"));
    let root = disks.iter().find(|d| d["mount"] == "/").unwrap_or_else(|| panic!("no / in disks: {disks:?}"));
    let (total, avail, free) = statvfs_kb("/");
    let (t, f) = (root["total_kb"].as_u64().unwrap(), root["free_kb"].as_u64().unwrap());
    assert!(close(t, total, 0.01), "/ total_kb {t} vs statvfs {total}");
    // Either statvfs figure, give or take what the tests write meanwhile (2 % of the disk).
    let slack = total / 50;
    assert!(
        f <= t && f + slack >= avail && f <= free + slack,
        "/ free_kb {f} vs statvfs available {avail} / free {free} (total {total})"
    );

    let net = hb["net"].as_array().unwrap_or_else(|| panic!("no net: {hb}"));
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap();
    for iface in net {
        let name = iface["iface"].as_str().unwrap_or_else(|| panic!("{iface}"));
        assert!(dev.contains(&format!("{name}:")), "{name} is not in /proc/net/dev");
        assert!(iface["rx_bytes"].is_u64() && iface["tx_bytes"].is_u64(), "{iface}");
    }
    assert!(hb["processes"].is_array(), "{hb}");
    assert!(hb["custom"].is_object(), "{hb}");
    assert_eq!(hb["dropped"], 0, "{hb}");
}

#[test]
fn monitored_processes_running_and_not() {
    let broker = Broker::start_default();
    let sleeper = Sleeper::start();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("worker.pid");
    write_file(&pidfile, &format!("{}\n", sleeper.pid()));
    // A pid file naming a process that has exited.
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let stale = dir.path().join("stale.pid");
    write_file(&stale, &format!("{gone_pid}\n"));

    let (_agent, mut sub) = start(
        &broker,
        "dev-procs",
        json!({"heartbeat": {"processes": [
            {"name": "sleep"},
            {"name": "worker", "pidfile": pidfile},
            {"name": "no-such-process-xq"},
            {"name": "stale", "pidfile": stale},
            {"name": "missing-pidfile", "pidfile": dir.path().join("nope.pid")},
        ]}}),
    );
    let hb = sub.expect_live_heartbeat("dev-procs", secs(10));
    let procs = hb["processes"].as_array().unwrap_or_else(|| panic!("no processes: {hb}"));
    let get = |name: &str| {
        procs.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{name} not reported: {procs:?}"))
    };
    let sleep = get("sleep");
    assert_eq!(sleep["running"], true, "{sleep}");
    assert!(sleep["pid"].as_u64().is_some_and(|p| p > 0), "{sleep}");

    let worker = get("worker");
    assert_eq!(worker["running"], true, "{worker}");
    assert_eq!(worker["pid"].as_u64(), Some(sleeper.pid() as u64), "{worker}");
    assert!(worker["rss_kb"].as_u64().is_some_and(|r| r > 0), "{worker}");
    assert!(worker["cpu_pct"].as_f64().is_some_and(|c| c >= 0.0), "{worker}");

    for name in ["no-such-process-xq", "stale", "missing-pidfile"] {
        assert_eq!(get(name)["running"], false, "{}", get(name));
    }

    // The worker stops: the next heartbeats say so.
    drop(sleeper);
    sub.expect_json(&heartbeat_topic("dev-procs"), "worker not running", secs(10), |hb| {
        hb["processes"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["name"] == "worker" && p["running"] == false))
    });
}

/// How many of the agent's descendants run exactly `argv`.
fn count_started(agent: &Agent, argv: &[&str]) -> usize {
    descendants(agent.pid()).into_iter().filter(|&p| cmdline(p) == argv).count()
}

#[test]
fn custom_values_from_files_and_commands() {
    let broker = Broker::start_default();
    let dir = tempfile::tempdir().unwrap();
    let fw = dir.path().join("fw-version");
    write_file(&fw, "1.2.3\n");
    let json_file = dir.path().join("site.json");
    write_file(&json_file, r#"{"site": "north", "rack": 4}"#);
    let (_agent, mut sub) = start(
        &broker,
        "dev-custom",
        json!({"heartbeat": {"custom": {
            "fw": {"file": fw},
            "site": {"file": json_file},
            "text": {"command": ["/bin/echo", "hello world"]},
            "obj": {"command": ["/bin/sh", "-c", "echo '{\"a\": 1, \"b\": [2, 3]}'"]},
            "num": {"command": ["/bin/sh", "-c", "echo 42"]},
            "version": {"command": ["/bin/echo", "2.10"]},
            "serial": {"command": ["/bin/echo", "12345678901234567890123"]},
            "ratio": {"command": ["/bin/echo", "0.25"]},
        }}}),
    );
    let hb = sub.expect_live_heartbeat("dev-custom", secs(10));
    let custom = &hb["custom"];
    assert_eq!(custom["fw"], "1.2.3", "custom: {custom}");
    assert_eq!(custom["site"], json!({"site": "north", "rack": 4}), "custom: {custom}");
    assert_eq!(custom["text"], "hello world", "custom: {custom}");
    assert_eq!(custom["obj"], json!({"a": 1, "b": [2, 3]}), "custom: {custom}");
    assert_eq!(custom["num"], 42, "custom: {custom}");
    // Numbers that JSON would rewrite are reported as written.
    assert_eq!(custom["version"], "2.10", "custom: {custom}");
    assert_eq!(custom["serial"], "12345678901234567890123", "custom: {custom}");
    assert_eq!(custom["ratio"], 0.25, "custom: {custom}");

    // A changed file shows in a later heartbeat.
    write_file(&fw, "1.2.4\n");
    sub.expect_json(&heartbeat_topic("dev-custom"), "fw 1.2.4", secs(10), |hb| hb["custom"]["fw"] == "1.2.4");
}

#[test]
fn a_custom_file_that_blocks_times_out_costs_one_thread_and_recovers() {
    let broker = Broker::start_default();
    let dir = tempfile::tempdir().unwrap();
    // A FIFO nobody writes to: opening it blocks, as a hung NFS mount or sensor driver would.
    let fifo = dir.path().join("sensor");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let d = "dev-blocked-file";
    let (agent, mut sub) =
        start(&broker, d, json!({"heartbeat": {"custom": {"sensor": {"file": fifo, "timeout_s": 1}}}}));
    let topic = heartbeat_topic(d);
    let error_of = |hb: &Value| hb["custom"]["sensor"]["error"].as_str().unwrap_or("").to_string();
    sub.expect_json(&topic, "a timed out read", secs(10), |hb| error_of(hb) == "timed out after 1 s");
    for _ in 0..3 {
        let hb = sub.expect_live_heartbeat(d, secs(5));
        assert!(error_of(&hb).contains("still blocked"), "custom: {}", hb["custom"]);
    }
    let threads = read_to_string(&std::path::PathBuf::from(format!("/proc/{}/status", agent.pid())))
        .lines()
        .find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().parse::<u32>().unwrap()))
        .unwrap();
    // The loop, the one blocked reader, and at most a heartbeat worker.
    assert!(threads <= 3, "{threads} threads: a blocked file costs more than one");

    // The blocked read returns (a writer comes), and the path now holds a plain file.
    std::fs::OpenOptions::new().write(true).open(&fifo).unwrap().write_all(b"stale").unwrap();
    std::fs::remove_file(&fifo).unwrap();
    write_file(&fifo, "42\n");
    sub.expect_json(&topic, "the file's value", secs(10), |hb| hb["custom"]["sensor"] == 42);
}

#[test]
fn hanging_custom_command_is_killed_and_heartbeats_go_on() {
    let broker = Broker::start_default();
    // A distinctive argv, to find the processes it leaves.
    let hang = ["/bin/sleep", "3017"];
    let (mut agent, mut sub) = start(
        &broker,
        "dev-hang",
        json!({"heartbeat": {"custom": {
            "hang": {"command": hang, "timeout_s": 1},
            "ok": {"command": ["/bin/echo", "fine"]},
        }}}),
    );
    let mut seqs = Vec::new();
    for _ in 0..4 {
        let hb = sub.expect_live_heartbeat("dev-hang", secs(15));
        let err = &hb["custom"]["hang"];
        assert!(
            err.is_object() && err.get("error").is_some(),
            "custom.hang should be {{\"error\":..}}: {hb}"
        );
        assert_eq!(hb["custom"]["ok"], "fine", "{hb}");
        seqs.push(hb["seq"].as_u64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "seqs {seqs:?}");
    // Each timed-out command was killed: they do not pile up (one per heartbeat, 4+ by now, if
    // they were not; the one running now and one being killed at most, if they are).
    let left = count_started(&agent, &hang);
    assert!(left <= 2, "{left} hung commands still running: not killed after timeout_s");
    assert!(agent.running());
}

#[test]
fn print_heartbeat_works_without_a_broker() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.json");
    // Nothing listens on this port (it was free a moment ago).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let fw = dir.path().join("fw");
    write_file(&fw, "7.7.1\n");
    let cfg = json!({
        "broker": {"url": format!("mqtt://127.0.0.1:{port}")},
        "device_id": "dev-print",
        "state_dir": dir.path().join("state"),
        "heartbeat": {"custom": {"fw": {"file": fw}}},
    });
    write_file(&config, &cfg.to_string());
    let out = run_agent(&["--config", config.to_str().unwrap(), "--print-heartbeat"]);
    assert!(out.status.success(), "--print-heartbeat failed: {}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let hb: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("--print-heartbeat did not print one JSON value ({e}): {stdout}"));
    assert_eq!(hb["mem"]["total_kb"].as_u64(), Some(meminfo_kb("MemTotal")), "{hb}");
    assert_eq!(hb["machine"], uname_m(), "{hb}");
    assert_eq!(hb["custom"]["fw"], "7.7.1", "{hb}");
}
