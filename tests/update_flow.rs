//! Update flows (docs/updates.md) end to end: `tetherctl cmd DEV update` through a real
//! Mosquitto over wss + TLS, artifacts from a real nginx over HTTPS, the real agent installing
//! files, running commands and init scripts, rebooting through a command the test controls, and
//! killed with SIGKILL at every point a flow can be cut.

mod common;

use common::http::Nginx;
use common::remote::{text, Setup};
use common::{secs, wait_until, Listener};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Instant;

const APP_1: &[u8] = b"#!/bin/sh\necho app 1\n";
const APP_2: &[u8] = b"#!/bin/sh\necho app 2\n";

/// A device whose updates trust nginx's CA, with its own init.d, root for installed files and
/// reboot command.
struct Device {
    s: Setup,
    /// Where flows install files.
    root: tempfile::TempDir,
    /// Its init scripts (kept for the device's life): `app` records each action in
    /// `root/actions`.
    _init_dir: tempfile::TempDir,
    hold_file: PathBuf,
}

fn device(name: &str, nginx: &Nginx, env: &[(&str, &str)], reboot_command: Option<Vec<String>>) -> Device {
    let root = tempfile::tempdir().unwrap();
    let init_dir = tempfile::tempdir().unwrap();
    let actions = root.path().join("actions");
    write_script(&init_dir.path().join("app"), &format!("#!/bin/sh\necho \"$1\" >> {}\n", actions.display()));
    let hold_file = root.path().join("hold");
    let mut sections = json!({
        "updates": { "ca_file": nginx.ca_file(), "init_dir": init_dir.path(), "hold_file": hold_file },
    });
    if let Some(command) = reboot_command {
        sections["reboot_command"] = json!(command);
    }
    let s = Setup::with_sections_env(name, sections, Listener::Wss, env);
    Device { s, root, _init_dir: init_dir, hold_file }
}

fn write_script(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn sha256(bytes: &[u8]) -> String {
    tether::trust::sha256_hex(bytes)
}

/// A download step of what nginx serves as `name`.
fn download(nginx: &Nginx, name: &str, path: &str, bytes: &[u8]) -> Value {
    json!({"name": name, "type": "download", "url": nginx.https_url(path), "sha256": sha256(bytes), "size": bytes.len()})
}

fn flow(steps: Value, rollback: Value) -> Value {
    json!({"name": "app", "version": "2.0.0", "steps": steps, "rollback": rollback})
}

impl Device {
    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn cmd(&self, flow: &Value) -> std::process::Command {
        let params = json!({ "flow": flow }).to_string();
        self.s.tetherctl(&["cmd", &self.s.device, "update", "--json", &params, "--timeout", "120"])
    }

    /// Sends the flow and waits for its final state: (exit code, the state as JSON).
    fn update(&self, flow: &Value) -> (i32, Value) {
        outcome(&self.cmd(flow).output().unwrap())
    }

    fn spawn_update(&self, flow: &Value) -> Child {
        self.cmd(flow).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    fn journal(&self) -> PathBuf {
        self.s.agent.state_dir().join("update").join("flow.json")
    }

    fn actions(&self) -> String {
        fs::read_to_string(self.path("actions")).unwrap_or_default()
    }

    /// Files beside the installed ones other than `expected`.
    fn leftovers(&self, expected: &[&str]) -> Vec<String> {
        let names =
            fs::read_dir(self.root.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap());
        names.filter(|n| !expected.contains(&n.as_str())).collect()
    }

    fn downloads(&self) -> Vec<String> {
        let dir = self.s.agent.state_dir().join("downloads");
        let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
        entries.map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
    }
}

fn outcome(out: &Output) -> (i32, Value) {
    let state = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no JSON state: {}\n{}", text(&out.stdout), text(&out.stderr)));
    (out.status.code().unwrap_or(-1), state)
}

#[test]
fn a_flow_downloads_installs_runs_and_restarts() {
    let nginx = Nginx::start();
    nginx.put("app-2", APP_2);
    let d = device("dev-up-ok", &nginx, &[], None);
    let (app, conf) = (d.path("app"), d.path("app.conf"));
    write_script(&app, std::str::from_utf8(APP_1).unwrap());
    let steps = json!([
        download(&nginx, "fetch", "app-2", APP_2),
        {"name": "bin", "type": "install", "artifact": "fetch", "path": app, "mode": "0750"},
        {"name": "conf", "type": "install", "artifact": "fetch", "path": conf},
        {"name": "check", "type": "run", "argv": [app], "env": {"MODE": "check"}},
        {"type": "service", "name": "app", "action": "restart"}
    ]);
    let (code, state) = d.update(&flow(steps, json!([])));
    assert_eq!(code, 0, "{state}");
    let result = &state["result"];
    assert_eq!((result["flow"].as_str(), result["version"].as_str()), (Some("app"), Some("2.0.0")));
    let statuses: Vec<&str> =
        result["steps"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["successful"; 5]);
    assert_eq!(result["steps"][3]["output"], "app 2\n");
    assert_eq!(fs::read(&app).unwrap(), APP_2);
    assert_eq!(fs::metadata(&app).unwrap().permissions().mode() & 0o777, 0o750);
    assert_eq!(fs::read(&conf).unwrap(), APP_2);
    assert_eq!(fs::metadata(&conf).unwrap().permissions().mode() & 0o777, 0o644);
    assert_eq!(d.actions(), "restart\n");
    assert_eq!(
        d.leftovers(&["app", "app.conf", "actions"]),
        Vec::<String>::new(),
        "previous versions removed"
    );
    assert!(!d.journal().exists(), "the journal goes with the flow");
    assert_eq!(d.downloads(), Vec::<String>::new(), "the artifacts go with the flow");
}

#[test]
fn a_failed_check_rolls_back_byte_for_byte() {
    let nginx = Nginx::start();
    nginx.put("app-2", APP_2);
    let d = device("dev-up-rollback", &nginx, &[], None);
    let (app, conf) = (d.path("app"), d.path("app.conf"));
    write_script(&app, std::str::from_utf8(APP_1).unwrap());
    let inode = fs::metadata(&app).unwrap().ino();
    let marker = d.path("rolled-back");
    let steps = json!([
        download(&nginx, "fetch", "app-2", APP_2),
        {"name": "bin", "type": "install", "artifact": "fetch", "path": app, "mode": "0755"},
        {"name": "conf", "type": "install", "artifact": "fetch", "path": conf},
        {"name": "check", "type": "run", "argv": ["sh", "-c", "echo self-test broken; exit 4"], "on_fail": "rollback"},
        {"name": "never", "type": "run", "argv": ["touch", d.path("never")]}
    ]);
    let rollback = json!([{"type": "run", "argv": ["touch", marker]}, {"type": "service", "name": "app"}]);
    let (code, state) = d.update(&flow(steps, rollback));
    assert_eq!(code, 1, "{state}");
    assert_eq!(
        state["reason"],
        "step 4 of 5 (check) failed: sh exited with 4 (its last line: self-test broken); rolled back"
    );
    assert_eq!(fs::read(&app).unwrap(), APP_1, "the previous version, byte for byte");
    assert_eq!(fs::metadata(&app).unwrap().ino(), inode, "the very file, with its owner and mode");
    assert!(!conf.exists(), "a file the flow created is removed");
    assert!(marker.exists() && !d.path("never").exists());
    assert_eq!(d.actions(), "restart\n");
    assert_eq!(d.leftovers(&["app", "actions", "rolled-back"]), Vec::<String>::new());
}

#[test]
fn download_failures_go_by_on_fail() {
    let nginx = Nginx::start();
    nginx.put("app-2", APP_2);
    let d = device("dev-up-dlfail", &nginx, &[], None);
    let app = d.path("app");
    write_script(&app, std::str::from_utf8(APP_1).unwrap());
    let install = json!({"type": "install", "artifact": "fetch", "path": app});

    let mut wrong_hash = download(&nginx, "fetch", "app-2", APP_2);
    wrong_hash["sha256"] = json!(sha256(b"something else"));
    let (code, state) = d.update(&flow(json!([wrong_hash, install]), json!([])));
    assert_eq!(code, 1);
    let reason = state["reason"].as_str().unwrap();
    assert!(reason.starts_with("step 1 of 2 (fetch) failed: ") && reason.contains("sha256"), "{reason}");
    assert_eq!(fs::read(&app).unwrap(), APP_1);

    let missing = download(&nginx, "fetch", "nothing-here", APP_2);
    let mut continued = missing.clone();
    continued["on_fail"] = json!("continue");
    let steps = json!([continued, {"type": "run", "argv": ["true"]}]);
    let (code, state) = d.update(&flow(steps, json!([])));
    assert_eq!(code, 0, "{state}");
    assert_eq!(state["result"]["steps"][0]["status"], "failed");
    assert!(state["result"]["steps"][0]["reason"].as_str().unwrap().contains("404"), "{state}");

    let told = d.path("told");
    let mut on_fail_run = missing;
    on_fail_run["on_fail"] = json!({"run": ["touch", told]});
    let (code, state) = d.update(&flow(json!([on_fail_run]), json!([])));
    assert_eq!(code, 1);
    assert!(state["reason"].as_str().unwrap().contains("404"), "{state}");
    assert!(told.exists(), "the on_fail command ran");
    assert_eq!(d.downloads(), Vec::<String>::new());
}

#[test]
fn a_step_over_its_time_is_stopped_and_handled_by_its_on_fail() {
    let nginx = Nginx::start();
    let d = device("dev-up-watchdog", &nginx, &[], None);
    let pid_file = d.path("pid");
    let script = format!("echo $$ > {}; exec sleep 60", pid_file.display());
    let steps = json!([{"name": "stuck", "type": "run", "argv": ["sh", "-c", script], "timeout_s": 1}]);
    let started = Instant::now();
    let (code, state) = d.update(&flow(steps, json!([])));
    assert_eq!(code, 1);
    assert_eq!(state["reason"], "step 1 of 1 (stuck) failed: timed out after 1 s (its timeout_s)");
    assert!(started.elapsed() < secs(15), "{:?}", started.elapsed());
    let pid = fs::read_to_string(&pid_file).unwrap().trim().to_string();
    assert!(
        wait_until(secs(10), || !Path::new(&format!("/proc/{pid}")).exists()),
        "the step's process lives on"
    );
}

#[test]
fn a_hold_file_keeps_the_flow_waiting_and_one_flow_runs_at_a_time() {
    let nginx = Nginx::start();
    let d = device("dev-up-hold", &nginx, &[], None);
    fs::write(&d.hold_file, b"busy").unwrap();
    let done = d.path("done");
    let mut first = d.spawn_update(&flow(json!([{"type": "run", "argv": ["touch", done]}]), json!([])));
    assert!(d.s.agent.wait_log("held while", secs(20)), "{}", d.s.agent.log());
    std::thread::sleep(secs(2));
    assert!(!done.exists(), "no step runs while held");

    // Another flow meanwhile is refused, and nothing of it runs.
    let (code, state) =
        d.update(&flow(json!([{"type": "run", "argv": ["touch", d.path("second")]}]), json!([])));
    assert_eq!(code, 1);
    assert!(state["reason"].as_str().unwrap().starts_with("an update is under way"), "{state}");

    fs::remove_file(&d.hold_file).unwrap();
    let out = common::wait_child_output(&mut first, secs(30));
    assert_eq!(outcome(&out).0, 0, "{}", text(&out.stderr));
    assert!(done.exists() && !d.path("second").exists());
}

#[test]
fn a_bad_flow_is_refused_before_anything_runs() {
    let nginx = Nginx::start();
    nginx.put("app-2", APP_2);
    let d = device("dev-up-bad", &nginx, &[], None);
    let mut fetch = download(&nginx, "fetch", "app-2", APP_2);
    fetch["sha256"] = json!("not a hash");
    let (code, state) =
        d.update(&flow(json!([fetch, {"type": "run", "argv": ["touch", d.path("ran")]}]), json!([])));
    assert_eq!(code, 1);
    assert_eq!(state["reason"], "flow: steps[0].sha256: must be 64 hex digits");
    assert!(nginx.served().is_empty() && !d.path("ran").exists());
}

/// The reboot command stands in for a reboot: it changes the boot id the agent reads and kills
/// the agent, which the test then starts again, as init would after a boot.
#[test]
fn a_reboot_step_goes_on_after_the_boot_and_fails_without_one() {
    let nginx = Nginx::start();
    let boot = tempfile::tempdir().unwrap();
    let boot_file = boot.path().join("boot_id");
    fs::write(&boot_file, "boot-1\n").unwrap();
    let reboot = boot.path().join("reboot");
    write_script(&reboot, &format!("#!/bin/sh\necho boot-2 > {}\nkill -9 $PPID\n", boot_file.display()));
    let env = [("TETHER_BOOT_ID_FILE", boot_file.to_str().unwrap())];
    let mut d = device("dev-up-reboot", &nginx, &env, Some(vec![reboot.display().to_string()]));
    let after = d.path("after-boot");
    let steps = json!([{"type": "reboot"}, {"name": "after", "type": "run", "argv": ["touch", after]}]);
    let mut waiting = d.spawn_update(&flow(steps.clone(), json!([])));
    assert!(d.s.agent.wait_exit(secs(30)).is_some(), "the reboot command stopped the agent");
    d.s.agent.restart();
    let out = common::wait_child_output(&mut waiting, secs(60));
    let (code, state) = outcome(&out);
    assert_eq!(code, 0, "{state}");
    assert!(after.exists());

    // A reboot command that returns without a reboot: at the agent's next start, the step failed.
    write_script(&reboot, "#!/bin/sh\nkill -9 $PPID\n");
    let mut waiting = d.spawn_update(&flow(steps, json!([])));
    assert!(d.s.agent.wait_exit(secs(30)).is_some());
    fs::remove_file(&after).unwrap();
    d.s.agent.restart();
    let (code, state) = outcome(&common::wait_child_output(&mut waiting, secs(60)));
    assert_eq!(code, 1);
    assert_eq!(
        state["reason"],
        "step 1 of 2 (1 reboot) failed: the agent restarted but the system did not reboot"
    );
    assert!(!after.exists());
}

/// Counts the journal's writes (each an atomic rename onto `update/flow.json`) and kills the
/// agent with SIGKILL right after the `nth`: every point where a task begins or has ended, as
/// a power cut would find it. Returns whether the kill happened.
fn kill_after_journal_write(d: &mut Device, dir: &Path, nth: usize) -> bool {
    // SAFETY: inotify_init1 takes flags only; the descriptor is owned below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    assert!(fd >= 0);
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid descriptor and a NUL-terminated path.
    assert!(
        unsafe {
            libc::inotify_add_watch(std::os::fd::AsRawFd::as_raw_fd(&fd), c_dir.as_ptr(), libc::IN_MOVED_TO)
        } >= 0
    );
    let mut file = std::fs::File::from(fd);
    let mut seen = 0;
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + secs(30);
    while Instant::now() < deadline {
        let n = match std::io::Read::read(&mut file, &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_micros(200));
                continue;
            }
            Err(e) => panic!("inotify: {e}"),
        };
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
            let name = &buf[at + 16..at + 16 + len];
            if name.starts_with(b"flow.json\0") {
                seen += 1;
                if seen == nth {
                    d.s.agent.kill9();
                    return true;
                }
            }
            at += 16 + len;
        }
    }
    false
}

/// Kills the agent with SIGKILL right after each journal write of a flow in turn (every task
/// begun, every task ended), then starts it again: each time the flow ends with exactly one
/// final state, and the files say the same as that state.
#[test]
fn kill_9_at_every_step_boundary_ends_in_one_final_state() {
    let nginx = Nginx::start();
    nginx.put("app-2", APP_2);
    let mut d = device("dev-up-kill", &nginx, &[], None);
    let app = d.path("app");
    let steps = json!([
        download(&nginx, "fetch", "app-2", APP_2),
        {"name": "bin", "type": "install", "artifact": "fetch", "path": app, "mode": "0755"},
        {"name": "check", "type": "run", "argv": ["sh", "-c", "sleep 0.2"], "on_fail": "rollback"},
        {"type": "service", "name": "app"}
    ]);
    let the_flow = flow(steps, json!([]));
    let update_dir = d.s.agent.state_dir().join("update");
    fs::create_dir_all(&update_dir).unwrap();
    // An uninterrupted flow writes its journal 9 times: once to begin, twice for each task.
    let mut outcomes = Vec::new();
    for nth in 1..=9 {
        write_script(&app, std::str::from_utf8(APP_1).unwrap());
        let _ = fs::remove_file(d.path("actions"));
        let finals_before = final_states(&d.s.agent.log());
        let mut waiting = d.spawn_update(&the_flow);
        assert!(kill_after_journal_write(&mut d, &update_dir, nth), "write {nth} never came");
        d.s.agent.restart();
        let (code, state) = outcome(&common::wait_child_output(&mut waiting, secs(60)));
        assert_eq!(final_states(&d.s.agent.log()), finals_before + 1, "kill {nth}: exactly one final state");
        if code == 0 {
            assert_eq!(fs::read(&app).unwrap(), APP_2, "kill {nth}: {state}");
            assert!(d.actions().starts_with("restart\n"), "kill {nth}");
        } else {
            // Only the check, a command, cannot be run again: cut short, it failed and its
            // on_fail rolled the install back.
            let reason = state["reason"].as_str().unwrap();
            assert_eq!(
                reason,
                "step 3 of 4 (check) failed: interrupted: the agent restarted while it ran; rolled back"
            );
            assert_eq!(fs::read(&app).unwrap(), APP_1, "kill {nth}");
        }
        assert!(!d.journal().exists(), "kill {nth}");
        assert_eq!(d.leftovers(&["app", "actions", "hold"]), Vec::<String>::new(), "kill {nth}");
        assert_eq!(d.downloads(), Vec::<String>::new(), "kill {nth}");
        outcomes.push(code);
    }
    assert!(outcomes.contains(&1) && outcomes.contains(&0), "{outcomes:?}");
}

/// The final states the agent logged (`command update/ID: successful` or `failed`).
fn final_states(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("command update/") && (l.contains(": successful") || l.contains(": failed")))
        .count()
}

/// A download cut by the agent's death resumes from its bytes on disk with a Range request.
#[test]
fn a_download_cut_by_kill_9_resumes_with_range() {
    let nginx = Nginx::start();
    let big: Vec<u8> = (0..(1536 * 1024)).map(|i| (i % 251) as u8).collect();
    nginx.put("big", &big);
    let mut d = device("dev-up-resume", &nginx, &[], None);
    let target = d.path("big");
    let steps = json!([
        download(&nginx, "fetch", "slow/big", &big),
        {"type": "install", "artifact": "fetch", "path": target}
    ]);
    let mut progress = common::Sub::new(&d.s.broker, &format!("tether/{}/cmd/update/+", d.s.device));
    let mut waiting = d.spawn_update(&flow(steps, json!([])));
    // While it downloads, the command's retained state says how far it is.
    let size = big.len() as u64;
    let report = progress.expect("download progress", secs(30), |m| {
        m.json().is_some_and(|v| {
            v["status"] == "executing" && v["progress"]["done"].as_u64().is_some_and(|d| d > 0)
        })
    });
    let report = report.json().unwrap();
    assert_eq!(report["progress"]["total"], size, "{report}");
    assert_eq!(
        (report["progress"]["step"].as_u64(), report["progress"]["steps"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(report["progress"]["name"], "fetch");
    let downloads = d.s.agent.state_dir().join("downloads");
    let partial_grew = wait_until(secs(30), || {
        fs::read_dir(&downloads)
            .is_ok_and(|entries| entries.flatten().any(|e| e.metadata().is_ok_and(|m| m.len() > 300_000)))
    });
    assert!(partial_grew, "the download began");
    d.s.agent.kill9();
    d.s.agent.restart();
    let (code, state) = outcome(&common::wait_child_output(&mut waiting, secs(60)));
    assert_eq!(code, 0, "{state}");
    assert_eq!(fs::read(&target).unwrap(), big);
    let served = nginx.served();
    let resumed = served.iter().find(|s| s.status == 206).expect("a Range request after the restart");
    assert!(resumed.range.starts_with("bytes=") && !resumed.range.starts_with("bytes=0-"), "{served:?}");
    let sent: u64 = served.iter().map(|s| s.bytes).sum();
    assert!(sent < big.len() as u64 + 300_000, "not restarted from zero: {sent} bytes served");
}

/// A flow tampered with after it was signed, signed for another device, or signed by a key the
/// device does not know: refused, and none of its steps runs.
#[test]
fn a_flow_not_signed_for_this_device_by_a_known_key_runs_nothing() {
    let nginx = Nginx::start();
    let d = device("dev-up-trust", &nginx, &[], None);
    // The device trusts the harness's operator key too (read again on SIGHUP).
    let keys = d.s.dir.path().join("authorized_keys");
    let mut text = fs::read_to_string(&keys).unwrap().trim_end().to_string();
    text.push_str(&format!("\n{}\n", common::operator_key().openssh_public("harness")));
    fs::write(&keys, text).unwrap();
    d.s.agent.signal(libc::SIGHUP);
    assert!(d.s.agent.wait_log("config reloaded", secs(10)));

    let ran = d.path("ran");
    let params = json!({"flow": flow(json!([{"type": "run", "argv": ["touch", ran]}]), json!([]))});
    let dev = d.s.device.as_str();
    let tampered = {
        let mut init: Value =
            serde_json::from_slice(&common::signed_init(dev, "update", "t1", params.clone())).unwrap();
        let text = init["request"]
            .as_str()
            .unwrap()
            .replace("\"ran\"", "\"ran2\"")
            .replace("/ran\"", "/ran-elsewhere\"");
        assert_ne!(text, init["request"].as_str().unwrap());
        init["request"] = json!(text);
        init.to_string().into_bytes()
    };
    let stranger = {
        let pkcs8 = tether::trust::DeviceKey::generate().unwrap();
        let key = tether::trust::DeviceKey::load(&pkcs8).unwrap();
        let params = params.as_object().cloned().unwrap();
        let text = tether::trust::Request::new(dev, "update", "u1", common::unix_s(), params).to_text();
        let sig = key.sign_sshsig(tether::trust::REQUEST_NAMESPACE, text.as_bytes());
        json!({"status": "init", "request": text, "sig": sig}).to_string().into_bytes()
    };
    let cases = [
        ("t1", tampered, "bad signature"),
        (
            "e1",
            common::signed_init("dev-elsewhere", "update", "e1", params.clone()),
            "signed for another device",
        ),
        ("u1", stranger, "unknown key"),
    ];
    let mut sub = common::Sub::new(&d.s.broker, &format!("tether/{dev}/cmd/update/+"));
    for (id, payload, reason) in cases {
        let topic = common::cmd_topic(dev, "update", id);
        common::publish(&d.s.broker, &topic, &payload, true);
        let state = sub.expect_json(&topic, "a final state", secs(15), |v| {
            v["status"] == "failed" || v["status"] == "successful"
        });
        assert_eq!(state["status"], "failed", "{id}: {state}");
        assert!(state["reason"].as_str().unwrap().contains(reason), "{id}: {state}");
    }
    assert!(!ran.exists() && !d.path("ran-elsewhere").exists(), "a step ran");
    assert!(
        !d.s.agent.log_contains("update t1") && !d.s.agent.log_contains("flow app"),
        "{}",
        d.s.agent.log()
    );
}
