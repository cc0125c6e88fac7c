//! `tetherctl logs` through a real Mosquitto over wss + TLS, the real agent and tetherctl
//! (docs/protocol.md, "Logs"): `-n`, `--grep` and `--since` applied on the device, `-f` across a
//! logrotate-style rename and a truncation, command sources, several sources at once, `--list`,
//! and a quiet follower that costs the agent no CPU.

mod common;

use common::remote::{text, Setup};
use common::{cpu_ticks, secs, signal, wait_child, Listener};
use serde_json::{json, Value};
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// A device offering `sources` (its logs.sources), the built-in ones off unless asked.
fn device(name: &str, sources: Value, builtin: bool) -> Setup {
    let logs = json!({ "sources": sources, "builtin_sources": builtin });
    Setup::with_sections(name, json!({ "logs": logs }), Listener::Wss)
}

fn ok(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    text(&out.stdout)
}

fn append(path: &Path, lines: &str) {
    let mut file = OpenOptions::new().create(true).append(true).open(path).unwrap();
    file.write_all(lines.as_bytes()).unwrap();
}

fn numbered(from: usize, to: usize) -> String {
    (from..=to).map(|i| format!("line {i}\n")).collect()
}

/// A running `tetherctl logs -f`: its stdout and stderr lines as they come.
struct Follower {
    child: Child,
    out: Receiver<String>,
    err: Receiver<String>,
}

impl Follower {
    fn start(s: &Setup, args: &[&str]) -> Follower {
        let mut child = s.tetherctl(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let out = lines_of(child.stdout.take().unwrap());
        let err = lines_of(child.stderr.take().unwrap());
        Follower { child, out, err }
    }

    /// The next stdout lines, until `last` (all of them, in order).
    fn expect(&self, expected: &[&str]) {
        for want in expected {
            let got = self.out.recv_timeout(secs(20)).unwrap_or_else(|_| panic!("{want:?} never came"));
            assert_eq!(got, *want);
        }
    }

    /// Waits for a stderr line containing `needle`.
    fn expect_notice(&self, needle: &str) {
        let deadline = Instant::now() + secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.err.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no notice {needle:?} on stderr");
    }

    fn nothing_more(&self, wait: Duration) {
        if let Ok(line) = self.out.recv_timeout(wait) {
            panic!("unexpected line {line:?}");
        }
    }

    /// Ctrl-C: it stops, as `tail -f` does.
    fn interrupt(mut self) -> i32 {
        signal(self.child.id(), libc::SIGINT);
        let status = wait_child(&mut self.child, secs(10)).expect("tetherctl logs -f stops on SIGINT");
        status.code().unwrap_or(-1)
    }
}

fn lines_of(pipe: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn n_grep_and_since_are_applied_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.log");
    append(&app, &numbered(1, 5000));
    let s = device("dev-logs-n", json!([{ "name": "app", "files": [app] }]), false);

    let out = ok(&s.tetherctl(&["logs", &s.device, "app", "-n", "3"]).output().unwrap());
    assert_eq!(out, "line 4998\nline 4999\nline 5000\n");

    let out = ok(&s.tetherctl(&["logs", &s.device, "app", "--grep", "^line 49[0-9]7$"]).output().unwrap());
    assert_eq!(out, "line 4907\nline 4917\nline 4927\nline 4937\nline 4947\nline 4957\nline 4967\nline 4977\nline 4987\nline 4997\n");
    let out = ok(&s.tetherctl(&["logs", &s.device, "app", "--grep", "7$", "-n", "2"]).output().unwrap());
    assert_eq!(out, "line 4987\nline 4997\n");
    // Without -n: the whole file.
    let out = ok(&s.tetherctl(&["logs", &s.device, "app"]).output().unwrap());
    assert_eq!(out, numbered(1, 5000));

    // --since, on ISO times with offsets and on classic syslog times (the device's local time).
    let now = common::unix_s() as i64;
    let iso = |ago: i64| tether::logging::utc_time((now - ago) as u64);
    let stamped = dir.path().join("stamped.log");
    append(&stamped, &format!("{} old iso\n{} new iso\n{} newest iso\n", iso(7200), iso(600), iso(5)));
    let s2 = device("dev-logs-since", json!([{ "name": "stamped", "files": [stamped] }]), false);
    let out = ok(&s2.tetherctl(&["logs", &s2.device, "stamped", "--since", "30m"]).output().unwrap());
    assert_eq!(out, format!("{} new iso\n{} newest iso\n", iso(600), iso(5)));
    let since = iso(60);
    let out = ok(&s2.tetherctl(&["logs", &s2.device, "stamped", "--since", &since]).output().unwrap());
    assert_eq!(out, format!("{} newest iso\n", iso(5)));

    let bad = s2.tetherctl(&["logs", &s2.device, "stamped", "--since", "yesterday-ish"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("is not a time"), "{}", text(&bad.stderr));
    let bad = s2.tetherctl(&["logs", &s2.device, "stamped", "--grep", "(unclosed"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("--grep"), "{}", text(&bad.stderr));
}

#[test]
fn follows_across_a_rename_rotation_and_a_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.log");
    append(&app, &numbered(1, 10));
    let s = device("dev-logs-f", json!([{ "name": "app", "files": [app] }]), false);
    let follower = Follower::start(&s, &["logs", &s.device, "app", "-f", "-n", "2"]);
    follower.expect(&["line 9", "line 10"]);

    append(&app, "written while followed\n");
    follower.expect(&["written while followed"]);

    // logrotate without copytruncate: the old file renamed, still written a little by the
    // program holding it open, then a new file at the path.
    let rotated = dir.path().join("app.log.1");
    fs::rename(&app, &rotated).unwrap();
    append(&rotated, "late line in the old file\n");
    append(&app, "first line of the new file\n");
    follower.expect(&["late line in the old file", "first line of the new file"]);
    follower.expect_notice("file replaced");

    // copytruncate: the same file emptied, then written again from its start.
    fs::OpenOptions::new().write(true).truncate(true).open(&app).unwrap();
    append(&app, "after the truncation\n");
    follower.expect(&["after the truncation"]);
    follower.expect_notice("file truncated");
    follower.nothing_more(Duration::from_millis(500));
    assert_eq!(follower.interrupt(), 130);
}

#[test]
fn a_quiet_follower_costs_the_agent_no_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("quiet.log");
    append(&app, "one\n");
    let s = device("dev-logs-idle", json!([{ "name": "quiet", "files": [app] }]), false);
    let follower = Follower::start(&s, &["logs", &s.device, "quiet", "-f"]);
    follower.expect(&["one"]);
    std::thread::sleep(secs(1));
    let before = cpu_ticks(s.agent.pid());
    std::thread::sleep(secs(5));
    let used = cpu_ticks(s.agent.pid()) - before;
    // A tick is 10 ms: a poll every 100 ms would cost tens of them in 5 s.
    assert!(used <= 3, "the agent used {used} ticks of CPU in 5 s while following a quiet file");
    append(&app, "two\n");
    follower.expect(&["two"]);
    follower.interrupt();
    assert!(s.agent.log_contains("logs quiet -f opened"), "{}", s.agent.log());
}

#[test]
fn command_sources_and_several_sources_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.log");
    append(&app, "from the file\n");
    let script = "printf 'boot\\nready\\nsteady\\n'; echo complaint >&2";
    let sources = json!([
        { "name": "app", "files": [app] },
        { "name": "ring", "command": ["sh", "-c", script] },
        { "name": "broken", "command": ["sh", "-c", "echo partial; exit 3"] },
        { "name": "gone", "files": [dir.path().join("never.log")] },
    ]);
    let s = device("dev-logs-cmd", sources, false);

    // The command's stderr comes to stderr, neither filtered nor cut.
    let out = s.tetherctl(&["logs", &s.device, "ring"]).output().unwrap();
    assert_eq!(ok(&out), "boot\nready\nsteady\n");
    assert!(text(&out.stderr).contains("is a new device: recorded its key"), "first contact");
    let out = s.tetherctl(&["logs", &s.device, "ring"]).output().unwrap();
    assert_eq!((ok(&out).as_str(), text(&out.stderr).as_str()), ("boot\nready\nsteady\n", "complaint\n"));
    let out = s.tetherctl(&["logs", &s.device, "ring", "-n", "1", "--grep", "^[bs]"]).output().unwrap();
    assert_eq!((ok(&out).as_str(), text(&out.stderr).as_str()), ("steady\n", "complaint\n"));

    let both =
        ok(&s.tetherctl(&["logs", &s.device, "app", "ring", "--grep", "file|ready"]).output().unwrap());
    assert_eq!(both, "app: from the file\nring: ready\n");

    // A command that fails, a file that does not exist: said on stderr, exit 1, the rest given.
    let out = s.tetherctl(&["logs", &s.device, "broken", "gone", "app"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "broken: partial\napp: from the file\n");
    let err = text(&out.stderr);
    assert!(err.contains("broken: the command exited with 3"), "{err}");
    assert!(err.contains("gone: no such file"), "{err}");

    let out = s.tetherctl(&["logs", &s.device, "nonesuch"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("no log source named nonesuch here (the sources: app, ring, broken, gone)"),
        "{err}"
    );
}

#[test]
fn list_shows_the_sources_and_the_builtin_ones() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.log");
    append(&app, "x\n");
    let pattern = dir.path().join("*.log");
    let s = device("dev-logs-list", json!([{ "name": "apps", "files": [pattern] }]), true);
    let out = ok(&s.tetherctl(&["logs", &s.device, "--list"]).output().unwrap());
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("SOURCE"), "{out}");
    assert!(
        lines[1].starts_with("apps ") && lines[1].contains(" yes ") && lines[1].contains("*.log"),
        "{out}"
    );
    assert!(lines.iter().any(|l| l.starts_with("agent ")), "{out}");
    assert!(lines.iter().any(|l| l.starts_with("syslog ")), "{out}");

    let out = ok(&s.tetherctl(&["logs", &s.device, "--list", "--json"]).output().unwrap());
    let sources: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(sources[0]["name"], "apps");
    assert_eq!(sources[0]["found"], json!([app]));

    let usage = s.tetherctl(&["logs", &s.device, "apps", "--list"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(64), "{}", text(&usage.stderr));
}

#[test]
fn a_followed_command_runs_until_the_operator_stops() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("ticker.pid");
    let script = format!(
        "echo $$ > {}; i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done",
        pid_file.display()
    );
    let s = device("dev-logs-cmd-f", json!([{ "name": "ticker", "command": ["sh", "-c", script] }]), false);
    let follower = Follower::start(&s, &["logs", &s.device, "ticker", "-f"]);
    follower.expect(&["tick 1", "tick 2", "tick 3"]);
    let pid = fs::read_to_string(&pid_file).unwrap().trim().to_string();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(follower.interrupt(), 130);
    // The operator's End (or its will) stops the command, and the agent reaps it.
    let gone = common::wait_until(secs(20), || !Path::new(&format!("/proc/{pid}")).exists());
    assert!(gone, "the command source {pid} outlived its tunnel");
}

/// The agent's own log, as the init script keeps it in a file, named here in a source given by
/// a config reload (SIGHUP): what an operator reads first when a device misbehaves.
#[test]
fn the_agents_own_log_is_a_source() {
    let s = device("dev-logs-agent", json!([]), false);
    let mut config: Value = serde_json::from_slice(&fs::read(s.agent.config_path()).unwrap()).unwrap();
    config["logs"]["sources"] = json!([{ "name": "agent", "files": [s.agent.log_path()] }]);
    s.agent.write_config(config);
    s.agent.signal(libc::SIGHUP);
    assert!(s.agent.wait_log("config reloaded", secs(10)));
    let out = ok(&s.tetherctl(&["logs", &s.device, "agent", "--grep", "config reloaded"]).output().unwrap());
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("config reloaded"), "{out}");
}
