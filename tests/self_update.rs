//! Agent self-update (docs/updates.md, "agent" steps) end to end with real builds: the agent
//! under test runs from a copy that the update replaces; the new binaries are real builds of
//! this crate (tests/common/builds.rs): another version, one that crashes at start, one that
//! never connects and one whose loop hangs once connected, each served by a real nginx over
//! HTTPS. Each time the old agent must be back
//! online with the pid it had, within the probation and 30 s, and the flow must say why; also
//! under the busybox init script, whose status, reload and stop must keep working.

mod common;

use common::builds::agent_build;
use common::http::Nginx;
use common::remote::{text, Setup};
use common::{children, secs, signal, status_topic, wait_until, Listener, Sub, AGENT_BIN};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PROBATION_S: u64 = 4;
const NEXT: &str = "9.9.9-next";

fn good_build() -> PathBuf {
    agent_build("next", &[("TETHER_VERSION", NEXT)])
}

fn crashing_build() -> PathBuf {
    agent_build("crash-at-start", &[("TETHER_VERSION", "9.9.9-crash"), ("TETHER_FAULT", "crash_at_start")])
}

fn silent_build() -> PathBuf {
    agent_build("no-connect", &[("TETHER_VERSION", "9.9.9-silent"), ("TETHER_FAULT", "no_connect")])
}

fn hanging_build() -> PathBuf {
    agent_build("hang", &[("TETHER_VERSION", "9.9.9-hang"), ("TETHER_FAULT", "hang_after_connect")])
}

/// A device whose agent runs from `exe`, a copy of the binary under test that updates replace.
struct Device {
    s: Setup,
    bin_dir: tempfile::TempDir,
    exe: PathBuf,
}

fn device(name: &str, nginx: &Nginx) -> Device {
    let bin_dir = tempfile::tempdir().unwrap();
    let exe = bin_dir.path().join("tether-agent");
    fs::copy(AGENT_BIN, &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let sections = json!({"updates": {"ca_file": nginx.ca_file(), "probation_s": PROBATION_S}});
    let s = Setup::with_agent_bin(name, sections, Listener::Wss, &[], &exe);
    Device { s, bin_dir, exe }
}

/// A flow of one agent step, its binary for this target served by nginx as `name`.
fn agent_flow(nginx: &Nginx, name: &str, binary: &Path, force: bool) -> Value {
    let bytes = fs::read(binary).unwrap();
    nginx.put(name, &bytes);
    let sha256 = tether::trust::sha256_hex(&bytes);
    let target = json!({"url": nginx.https_url(name), "sha256": sha256, "size": bytes.len()});
    json!({"name": "agent", "version": name, "steps": [
        {"type": "agent", "force": force, "binaries": {tether::TARGET: target}}
    ]})
}

impl Device {
    fn update(&self, flow: &Value) -> (i32, Value) {
        let params = json!({ "flow": flow }).to_string();
        let out = self.s.tetherctl(&["cmd", &self.s.device, "update", "--json", &params, "--timeout", "240"]);
        outcome(&run(out))
    }

    fn spawn_update(&self, flow: &Value) -> std::process::Child {
        let params = json!({ "flow": flow }).to_string();
        let mut cmd =
            self.s.tetherctl(&["cmd", &self.s.device, "update", "--json", &params, "--timeout", "240"]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// The version in the device's retained status, once it is online.
    fn online_version(&self) -> String {
        let mut sub = Sub::new(&self.s.broker, &status_topic(&self.s.device));
        let status = sub.expect_online(&self.s.device, secs(30));
        status["version"].as_str().unwrap_or_default().to_string()
    }

    /// The old agent runs on: the same process, the binary at its path unchanged.
    fn assert_old_agent_back(&self, pid: u32) {
        assert_eq!(self.online_version(), tether::VERSION);
        assert_eq!(exe_of(pid), self.exe, "the same pid runs the binary at the same path");
        assert!(fs::read(&self.exe).unwrap() == fs::read(AGENT_BIN).unwrap(), "the old binary is in place");
        assert!(children(pid).is_empty(), "no new agent left: {:?}", children(pid));
        assert_eq!(downloads(&self.s), Vec::<String>::new(), "the staged binary is gone");
    }
}

fn run(mut cmd: Command) -> Output {
    cmd.output().unwrap()
}

fn outcome(out: &Output) -> (i32, Value) {
    let state = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no JSON state: {}\n{}", text(&out.stdout), text(&out.stderr)));
    (out.status.code().unwrap_or(-1), state)
}

fn reason(state: &Value) -> String {
    state["reason"].as_str().unwrap_or_default().to_string()
}

fn exe_of(pid: u32) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

fn downloads(s: &Setup) -> Vec<String> {
    let Ok(entries) = fs::read_dir(s.agent.state_dir().join("downloads")) else { return Vec::new() };
    entries.map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

#[test]
fn a_good_build_passes_its_probation_and_runs_with_the_same_pid() {
    let nginx = Nginx::start();
    let next = good_build();
    let d = device("dev-self-ok", &nginx);
    let pid = d.s.agent.pid();
    let flow = agent_flow(&nginx, "next", &next, false);
    let mut status = Sub::new(&d.s.broker, &status_topic(&d.s.device));
    status.expect_online(&d.s.device, secs(10));

    let started = Instant::now();
    let (code, state) = d.update(&flow);
    assert_eq!(code, 0, "{state}");
    let output = state["result"]["steps"][0]["output"].as_str().unwrap_or_default();
    assert_eq!(output, format!("tether-agent {NEXT} passed its probation and runs"), "{state}");
    assert!(started.elapsed() < secs(PROBATION_S + 30), "took {:?}", started.elapsed());
    assert_eq!(d.online_version(), NEXT);
    status.drain(secs(2));
    let offline: Vec<_> = status.seen().iter().filter(|m| m.payload.contains("\"online\":false")).collect();
    assert!(offline.is_empty(), "the device never showed offline: {offline:?}");
    assert_eq!(exe_of(pid), d.exe, "the pid the init script knows runs the new binary");
    assert!(fs::read(&d.exe).unwrap() == fs::read(&next).unwrap(), "the new binary is in place");
    let previous = d.bin_dir.path().join(".tether-agent.previous");
    assert!(fs::read(previous).unwrap() == fs::read(AGENT_BIN).unwrap(), "the previous binary is kept");
    assert!(children(pid).is_empty());
    assert!(d.s.agent.log_contains("the new agent connected to the broker"));

    // The same flow again: that binary runs already, nothing is downloaded or restarted.
    let (code, state) = d.update(&flow);
    assert_eq!(code, 0, "{state}");
    let output = state["result"]["steps"][0]["output"].as_str().unwrap_or_default();
    assert!(output.contains("is the binary named: nothing to do"), "{state}");
    assert_eq!(d.s.agent.pid(), pid);
}

/// The old agent killed with SIGKILL during the probation (the power going would do the same):
/// the new one goes with it, and the next start begins the probation again; the flow ends once,
/// successful.
#[test]
fn a_kill_9_of_the_guard_during_the_probation_begins_it_again_at_the_next_start() {
    let nginx = Nginx::start();
    let next = good_build();
    let mut d = device("dev-self-kill", &nginx);
    let mut update = d.spawn_update(&agent_flow(&nginx, "next", &next, false));
    assert!(d.s.agent.wait_log("the new agent connected to the broker", secs(60)), "the new agent connected");
    let new_agent = children(d.s.agent.pid());
    assert_eq!(new_agent.len(), 1, "one new agent: {new_agent:?}");
    d.s.agent.kill9();
    assert!(
        wait_until(secs(15), || !Path::new(&format!("/proc/{}", new_agent[0])).exists()),
        "the new agent went with its guard"
    );
    assert!(fs::read(&d.exe).unwrap() == fs::read(AGENT_BIN).unwrap(), "the old binary still in place");

    d.s.agent.restart();
    let (code, state) = outcome(&common::wait_child_output(&mut update, secs(120)));
    assert_eq!(code, 0, "{state}");
    assert_eq!(d.online_version(), NEXT);
    assert!(fs::read(&d.exe).unwrap() == fs::read(&next).unwrap(), "the new binary is in place");
    let log = d.s.agent.log();
    let finals = log
        .lines()
        .filter(|l| l.contains("command update/") && (l.contains(": successful") || l.contains(": failed")))
        .count();
    assert_eq!(finals, 1, "exactly one final state");
    assert_eq!(log.matches("starts its probation").count(), 2, "the probation began again");
}

#[test]
fn builds_that_fail_their_probation_leave_the_old_agent_running() {
    let nginx = Nginx::start();
    let (crashing, silent, hanging, next) = (crashing_build(), silent_build(), hanging_build(), good_build());
    let d = device("dev-self-bad", &nginx);
    let pid = d.s.agent.pid();
    let within = secs(PROBATION_S + 30);

    // Crashes at start.
    let crash_flow = agent_flow(&nginx, "crash", &crashing, false);
    let started = Instant::now();
    let (code, state) = d.update(&crash_flow);
    assert_eq!(code, 1, "{state}");
    assert!(reason(&state).contains("the new agent was killed by signal 6 (SIGABRT)"), "{state}");
    assert!(started.elapsed() < within, "took {:?}", started.elapsed());
    d.assert_old_agent_back(pid);

    // Starts, never connects.
    let started = Instant::now();
    let (code, state) = d.update(&agent_flow(&nginx, "silent", &silent, false));
    assert_eq!(code, 1, "{state}");
    let expected =
        format!("the new agent did not connect to the broker within its probation of {PROBATION_S} s");
    assert!(reason(&state).contains(&expected), "{state}");
    assert!(started.elapsed() < within, "took {:?}", started.elapsed());
    d.assert_old_agent_back(pid);

    // Connects, then its loop hangs: it cannot hand the connection back.
    let started = Instant::now();
    let (code, state) = d.update(&agent_flow(&nginx, "hang", &hanging, false));
    assert_eq!(code, 1, "{state}");
    assert!(reason(&state).contains("did not hand the connection back within 10 s"), "{state}");
    assert!(started.elapsed() < within, "took {:?}", started.elapsed());
    d.assert_old_agent_back(pid);

    // Connects, then is killed during its probation.
    let started = Instant::now();
    let connected = |log: String| log.matches("the new agent connected to the broker").count();
    let before = connected(d.s.agent.log());
    let mut update = d.spawn_update(&agent_flow(&nginx, "next", &next, false));
    assert!(wait_until(secs(60), || connected(d.s.agent.log()) > before), "the new agent connected");
    let new_agent = children(pid);
    assert_eq!(new_agent.len(), 1, "one new agent: {new_agent:?}");
    signal(new_agent[0], libc::SIGKILL);
    let (code, state) = outcome(&common::wait_child_output(&mut update, secs(120)));
    assert_eq!(code, 1, "{state}");
    assert!(reason(&state).contains("the new agent was killed by signal 9 (SIGKILL)"), "{state}");
    assert!(started.elapsed() < within, "took {:?}", started.elapsed());
    d.assert_old_agent_back(pid);

    // A binary that failed is not tried again, unless forced.
    let (code, state) = d.update(&crash_flow);
    assert_eq!(code, 1, "{state}");
    assert!(reason(&state).contains("failed its probation here before"), "{state}");
    assert!(reason(&state).contains("SIGABRT"), "{state}");
    let (code, state) = d.update(&agent_flow(&nginx, "crash", &crashing, true));
    assert_eq!(code, 1, "{state}");
    assert!(reason(&state).contains("SIGABRT"), "forced, it ran again: {state}");
    d.assert_old_agent_back(pid);
}

/// The init script as busybox runs it (busybox sh, start-stop-daemon and applets first in PATH).
struct InitScript {
    dir: tempfile::TempDir,
    applets: PathBuf,
    exe: PathBuf,
    config: PathBuf,
}

impl InitScript {
    fn new(exe: &Path, config: &Path) -> InitScript {
        let dir = tempfile::tempdir().unwrap();
        let applets = dir.path().join("busybox");
        fs::create_dir(&applets).unwrap();
        let busybox = which("busybox");
        let list = Command::new(&busybox).arg("--list").output().unwrap();
        for applet in text(&list.stdout).lines() {
            let _ = std::os::unix::fs::symlink(&busybox, applets.join(applet));
        }
        InitScript { dir, applets, exe: exe.to_path_buf(), config: config.to_path_buf() }
    }

    fn run(&self, action: &str) -> (i32, String) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("init.d/tether-agent");
        let path = format!("{}:{}", self.applets.display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new(self.applets.join("sh"))
            .arg(script)
            .arg(action)
            .env("PATH", path)
            .env("DEFAULTS_FILE", self.dir.path().join("no-defaults"))
            .env("DAEMON", &self.exe)
            .env("DAEMON_ARGS", format!("--config {}", self.config.display()))
            .env("PIDFILE", self.dir.path().join("tether-agent.pid"))
            .env("LOGFILE", self.log_path())
            .env("LOG_TARGET", "file")
            .env("WRAPPER_SH", self.applets.join("sh"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), format!("{}{}", text(&out.stdout), text(&out.stderr)))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tether-agent.log")
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().matches(needle).count() >= count)
    }

    fn pid(&self) -> u32 {
        fs::read_to_string(self.dir.path().join("tether-agent.pid")).unwrap().trim().parse().unwrap()
    }

    /// Whatever still runs from the binary's directory (on a failure: the test must not leave
    /// agents behind).
    fn kill_leftovers(&self) {
        let dir = self.exe.parent().unwrap();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            if fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(dir)) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for InitScript {
    fn drop(&mut self) {
        self.kill_leftovers();
        if std::thread::panicking() {
            eprintln!("----- init script agent log -----\n{}\n-----", self.log());
        }
    }
}

fn which(program: &str) -> PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not installed (tests/setup-deps installs it)"))
}

#[test]
fn under_the_busybox_init_script_status_reload_and_stop_keep_working() {
    let nginx = Nginx::start();
    let (crashing, next) = (crashing_build(), good_build());
    let mut d = device("dev-self-init", &nginx);
    // The init script runs the agent from now on, with the same config and state.
    d.s.agent.term();
    let init = InitScript::new(&d.exe, &d.s.agent.config_path());
    let (code, said) = init.run("start");
    assert_eq!(code, 0, "{said}");
    let pid = init.pid();
    assert_eq!(d.online_version(), tether::VERSION);

    // A build that crashes: the same pid runs the old agent again, init has nothing to do.
    let (code, state) = d.update(&agent_flow(&nginx, "crash", &crashing, false));
    assert_eq!(code, 1, "{state}");
    assert!(reason(&state).contains("SIGABRT"), "{state}");
    assert_eq!(init.run("status"), (0, format!("tether-agent: running (pid {pid})\n")));
    assert_eq!(d.online_version(), tether::VERSION);

    // A good build: during its probation the init script still sees the agent, and a reload
    // reaches the new agent.
    let mut update = d.spawn_update(&agent_flow(&nginx, "next", &next, false));
    assert!(init.wait_log("the new agent connected to the broker", 1, secs(60)), "{}", init.log());
    assert_eq!(init.run("status"), (0, format!("tether-agent: running (pid {pid})\n")));
    let reloads = init.log().matches("reload requested").count();
    let (code, said) = init.run("reload");
    assert_eq!(code, 0, "{said}");
    assert!(init.wait_log("reload requested", reloads + 1, secs(10)), "the new agent got SIGHUP");
    let (code, state) = outcome(&common::wait_child_output(&mut update, secs(120)));
    assert_eq!(code, 0, "{state}");
    assert_eq!(d.online_version(), NEXT);
    assert_eq!(init.run("status"), (0, format!("tether-agent: running (pid {pid})\n")));
    assert_eq!(exe_of(pid), d.exe);

    // Reload and stop reach the new binary under the same pid.
    let reloads = init.log().matches("reload requested").count();
    assert_eq!(init.run("reload").0, 0);
    assert!(init.wait_log("reload requested", reloads + 1, secs(10)));
    let (code, said) = init.run("stop");
    assert_eq!((code, said.as_str()), (0, "tether-agent: stopped\n"));
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || children(pid).is_empty());
    assert_eq!(init.run("status").0, 3, "not running");
}
