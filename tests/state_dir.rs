//! The state directory under abuse: full, read-only, deleted while the agent runs, loosely
//! permissioned, owned by someone else, or planted with links by another local user. Heartbeat
//! seqs never repeat through any of it, and the agent never writes through a link.
//!
//! The full and read-only cases mount a small tmpfs, which needs root (as in CI); elsewhere they
//! say they were skipped.

mod common;

use common::*;
use serde_json::json;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of `kb` KiB mounted on a new directory, unmounted on drop.
struct Tmpfs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Tmpfs {
    fn mount(kb: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        std::fs::create_dir(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kb}k,mode=0700"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs { _dir: dir, path })
    }

    fn remount(&self, mode: &str) {
        let status = Command::new("mount").args(["-o", &format!("remount,{mode}")]).arg(&self.path).status();
        assert!(status.unwrap().success(), "remount {mode}");
    }

    fn fill(&self) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4096", "status=none"])
            .arg(format!("of={}", self.path.join("filler").display()))
            .status();
        assert!(std::fs::write(self.path.join("more"), vec![0u8; 8192]).is_err(), "the tmpfs is not full");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn live_seq(sub: &mut Sub, device: &str) -> u64 {
    sub.expect_live_heartbeat(device, secs(10))["seq"].as_u64().unwrap()
}

/// Sends `n` `heartbeat` commands one after another; returns the seqs their results name (a
/// command refused because no seq could be reserved gives none).
fn heartbeats_on_demand(broker: &Broker, sub: &mut Sub, device: &str, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        let topic = cmd_topic(device, "heartbeat", &format!("hb-{}-{i}", unix_ms()));
        publish_json(broker, &topic, &json!({"status": "init"}), true);
        let state = sub.expect_json(&topic, "a final state", secs(10), |v| {
            v["status"] == "successful" || v["status"] == "failed"
        });
        if let Some(seq) = state["result"]["seq"].as_u64() {
            seqs.push(seq);
        }
    }
    seqs
}

fn max_seq_seen(sub: &Sub, device: &str) -> u64 {
    sub.seen()
        .iter()
        .filter(|m| m.topic == heartbeat_topic(device))
        .filter_map(|m| m.json()?["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Runs the agent on `state`, lets `spoil` do its worst, forces more than one seq reservation
/// block of heartbeats, kills the agent with SIGKILL, lets `mend` repair what it can, starts it
/// again: its first heartbeat must come after every one seen before.
fn seqs_never_repeat(d: &str, state: &Path, spoil: impl FnOnce(), mend: impl FnOnce()) {
    let broker = Broker::start_default();
    let mut config = broker.agent_config(d);
    merge(&mut config, json!({"state_dir": state, "heartbeat": {"interval_s": 60}}));
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let mut agent = Agent::start(config);
    sub.expect_online(d, secs(15));
    live_seq(&mut sub, d);
    spoil();
    let answered = heartbeats_on_demand(&broker, &mut sub, d, 120);
    std::thread::sleep(secs(1));
    let before = max_seq_seen(&sub, d);
    println!("{} heartbeat commands answered with a seq; highest seq seen {before}", answered.len());
    agent.kill9();
    mend();
    agent.restart();
    let after = live_seq(&mut sub, d);
    assert!(after > before, "seq {after} after the restart, {before} already seen: a repeat");
}

#[test]
fn seqs_never_repeat_when_the_state_filesystem_is_full() {
    let Some(fs) = Tmpfs::mount(256) else { return };
    seqs_never_repeat("dev-fullfs", &fs.path, || fs.fill(), || {});
}

#[test]
fn seqs_never_repeat_when_the_state_filesystem_turns_read_only() {
    let Some(fs) = Tmpfs::mount(256) else { return };
    seqs_never_repeat("dev-rofs", &fs.path, || fs.remount("ro"), || fs.remount("rw"));
}

#[test]
fn a_state_dir_deleted_under_the_agent_is_made_again_and_seqs_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let gone = state.clone();
    seqs_never_repeat("dev-deleted", &state, move || std::fs::remove_dir_all(&gone).unwrap(), || {});
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    assert!(state.join("heartbeat-seq").exists());
}

#[test]
fn links_planted_in_the_state_dir_are_replaced_never_written_through() {
    let broker = Broker::start_default();
    let d = "dev-links";
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    write_file(&victim, "precious\n");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    for name in [".heartbeat-seq.tmp", "heartbeat-seq", "commands.log", ".commands.log.tmp"] {
        std::os::unix::fs::symlink(&victim, state.join(name)).unwrap();
    }
    let mut config = broker.agent_config(d);
    merge(&mut config, json!({"state_dir": state}));
    let mut sub = Sub::new(&broker, &format!("tether/{d}/#"));
    let _agent = Agent::start(config);
    sub.expect_online(d, secs(15));
    let topic = cmd_topic(d, "ping", "after-links");
    publish_json(&broker, &topic, &json!({"status": "init"}), true);
    sub.expect_json(&topic, "successful", secs(10), |v| v["status"] == "successful");
    live_seq(&mut sub, d);
    assert_eq!(read_to_string(&victim), "precious\n", "the agent wrote through a planted link");
    for name in ["heartbeat-seq", "commands.log"] {
        let meta = std::fs::symlink_metadata(state.join(name)).unwrap();
        assert!(meta.file_type().is_file(), "{name} is still a link");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
    }
}

#[test]
fn a_loose_state_dir_is_made_private_and_one_owned_by_someone_else_is_refused() {
    let broker = Broker::start_default();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut config = broker.agent_config("dev-loose");
    merge(&mut config, json!({"state_dir": state}));
    let mut sub = Sub::new(&broker, &status_topic("dev-loose"));
    let agent = Agent::start(config.clone());
    sub.expect_online("dev-loose", secs(15));
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    assert!(agent.log_contains("mode was 777, now 700"), "{}", agent.log());
    drop(agent);

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return eprintln!("skipped: chown to another user needs root");
    }
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    merge(&mut config, json!({"state_dir": theirs}));
    let mut agent = Agent::start(config);
    let status = agent.wait_exit(secs(10)).expect("the agent should refuse to start");
    assert!(!status.success());
    assert!(agent.log_contains("owned by uid 65534"), "{}", agent.log());
    assert_eq!(std::fs::metadata(&theirs).unwrap().uid(), 65534, "it changed the owner");
}
