//! `tetherctl get / put` when things go wrong, through a real Mosquitto over wss + TLS, the real
//! agent and tetherctl (docs/protocol.md, "Files"): the agent killed mid-put, a full disk, a
//! directory swapped for a link to outside the chroot mid-transfer, the broker restarted or away
//! long enough for the device to drop the tunnel. Each transfer is slowed by the device's rate
//! limits so that the fault lands in its middle; each test checks that it did.

mod common;

use common::files::{
    device, device_temp_len, device_temps, device_with, failed_with, names_in, ok, random_bytes, sha256_file,
    str_of, summary, write_random_file, Transfer,
};
use common::remote::text;
use common::{secs, wait_until, Sub};
use serde_json::json;
use std::fs;
use std::io::{Seek, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

/// tetherctl's window (the device takes it as is): what a put sends before the device's
/// rate-limited acknowledgements hold it back. A temp file longer than this has been paced.
const WINDOW: u64 = 256 << 10;

fn len(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

#[test]
fn a_put_cut_by_kill_9_leaves_the_target_as_it_was_and_its_temp_file_goes_at_restart() {
    // 17 KiB/s for the two puts together: the window's worth (256 KiB) comes at once, the
    // rest of a MiB takes a minute, so that both are under way whenever each starts.
    let (mut s, root) = device("dev-kill", json!({ "max_bytes_rx_per_minute": 1 << 20 }));
    let dir = root.path().join("data");
    fs::create_dir(&dir).unwrap();
    let old = random_bytes(100_000);
    fs::write(dir.join("kept"), &old).unwrap();
    let here = tempfile::tempdir().unwrap();
    let new = here.path().join("new");
    fs::write(&new, random_bytes(1 << 20)).unwrap();

    let replace = Transfer::start(s.tetherctl(&["put", str_of(&new), &s.device, "/data/kept"]));
    let create = Transfer::start(s.tetherctl(&["put", str_of(&new), &s.device, "/data/fresh"]));
    let paced = wait_until(secs(30), || {
        let temps = device_temps(&dir);
        temps.len() == 2 && temps.iter().all(|t| len(t) > WINDOW)
    });
    assert!(paced, "both puts under way: {:?}", names_in(&dir));
    s.agent.kill9();

    let temps = device_temps(&dir);
    assert_eq!(temps.len(), 2, "the agent died mid-put: {:?}", names_in(&dir));
    assert!(temps.iter().all(|t| len(t) < 1 << 20), "neither put had all its bytes");
    assert!(fs::read(dir.join("kept")).unwrap() == old, "the replaced file keeps its old bytes");
    assert!(!dir.join("fresh").exists(), "a new file does not appear half written");
    // No retry: the operator gave up too.
    replace.kill();
    create.kill();

    s.agent.restart();
    // The temp files go first, then the journal: wait for both (a loaded machine may run the
    // test between the two).
    let journal = s.agent.state_dir().join("file-puts.json");
    let cleaned = wait_until(secs(15), || device_temps(&dir).is_empty() && !journal.exists());
    assert!(cleaned, "the restarted agent removes the temp files, then their journal: {:?}", names_in(&dir));
    assert_eq!(names_in(&dir), ["kept"]);
    assert!(fs::read(dir.join("kept")).unwrap() == old);
}

#[test]
fn a_put_retried_across_a_kill_9_of_the_agent_starts_over_and_lands_whole() {
    let (mut s, root) = device("dev-kill-retry", json!({ "max_bytes_rx_per_minute": 6 << 20 }));
    let old = random_bytes(100_000);
    fs::write(root.path().join("kept"), &old).unwrap();
    let here = tempfile::tempdir().unwrap();
    let new = here.path().join("new");
    let size = 1 << 20;
    let sha256 = write_random_file(&new, size);

    let put = s.tetherctl(&["put", str_of(&new), &s.device, "/kept", "--json", "--timeout", "60"]);
    let put = Transfer::start(put);
    let paced = wait_until(secs(30), || device_temp_len(root.path()) > WINDOW);
    assert!(paced, "the put under way: {:?}", names_in(root.path()));
    s.agent.kill9();
    assert!(device_temp_len(root.path()) < size, "the agent died mid-put");
    assert!(fs::read(root.path().join("kept")).unwrap() == old);

    s.agent.restart();
    let out = put.finish(secs(90));
    let summary = summary(&out);
    assert!(text(&out.stderr).contains("resuming"), "{}", text(&out.stderr));
    assert_eq!(sha256_file(&root.path().join("kept")), sha256, "the new file, whole");
    assert_eq!(summary["sha256"].as_str(), Some(sha256.as_str()));
    assert_eq!(names_in(root.path()), ["kept"], "no temp file left");
    // The restarted agent removed the temp file of the agent killed, and never takes one it did
    // not make for the start of the operator's file (src/agent/files/journal.rs): from zero.
    let log = s.agent.log();
    let after_restart = log.rsplit("restarting the agent").next().unwrap();
    assert!(after_restart.contains("removed the temp file of an unfinished put"), "{after_restart}");
    assert!(after_restart.contains(&format!("put received {size} bytes from offset 0")), "{after_restart}");
    assert_eq!(summary["resumed_from"].as_u64(), Some(0));
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// None, having said why, where this machine does not let the test mount (not root, or a
    /// container without CAP_SYS_ADMIN).
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tether-test", str_of(path)])
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Tmpfs(path.to_path_buf())),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs to fill (this test needs root): {}",
                    text(&out.stderr)
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount to make a small filesystem: {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(&self.0).status().is_ok_and(|s| s.success())
        };
        if !umount(false) && !umount(true) {
            eprintln!("could not unmount {}", self.0.display());
        }
    }
}

/// Writes to a new file in `dir` until its filesystem is full.
fn fill(dir: &Path) {
    let mut filler = fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0x55u8; 4096];
    loop {
        match filler.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
}

#[test]
fn a_full_disk_fails_the_put_with_its_reason_and_leaves_the_target_and_no_temp_file() {
    // 20 KiB/s: a put of 700 KiB is under way for half a minute past its first window.
    let (s, root) = device("dev-full", json!({ "max_bytes_rx_per_minute": 1200 << 10 }));
    let full = root.path().join("full");
    let Some(_tmpfs) = Tmpfs::mount(&full, "1m") else { return };
    let old = random_bytes(10_000);
    fs::write(full.join("kept"), &old).unwrap();
    let here = tempfile::tempdir().unwrap();

    // Too big for the space there: refused before a byte is sent.
    let big = here.path().join("big");
    fs::write(&big, random_bytes(2 << 20)).unwrap();
    let out = s.tetherctl(&["put", str_of(&big), &s.device, "/full/kept"]).output().unwrap();
    failed_with(&out, "not enough space in /full");
    assert!(text(&out.stderr).contains("2097152 needed"), "{}", text(&out.stderr));
    assert_eq!(names_in(&full), ["kept"]);
    assert!(fs::read(full.join("kept")).unwrap() == old);

    // Fits when it starts; the disk fills while it is written.
    let fits = here.path().join("fits");
    fs::write(&fits, random_bytes(700 << 10)).unwrap();
    let put = Transfer::start(s.tetherctl(&["put", str_of(&fits), &s.device, "/full/kept"]));
    let started = wait_until(secs(30), || device_temp_len(&full) > 0);
    assert!(started, "the put under way: {:?}", names_in(&full));
    fill(&full);
    assert!(device_temp_len(&full) < 700 << 10, "filled before the put had all its bytes");
    let out = put.finish(secs(60));
    failed_with(&out, "/full/kept: No space left on device");
    assert!(fs::read(full.join("kept")).unwrap() == old, "the target as it was");
    assert_eq!(names_in(&full), ["filler", "kept"], "no temp file left");
}

#[test]
fn a_directory_swapped_for_a_link_out_of_the_chroot_mid_transfer_leads_nowhere_outside() {
    // 50 KiB/s each way: 400 KiB take 8 s to get, 3 s to put past its first window.
    let limits = json!({ "max_bytes_tx_per_minute": 3 << 20, "max_bytes_rx_per_minute": 3 << 20 });
    let (s, root) = device("dev-swap", limits);
    let outside = tempfile::tempdir().unwrap();
    let secret = random_bytes(400 << 10);
    let victim = random_bytes(1000);
    fs::write(outside.path().join("file"), &secret).unwrap();
    fs::write(outside.path().join("target"), &victim).unwrap();
    let dir = root.path().join("dir");
    fs::create_dir(&dir).unwrap();
    let data = random_bytes(400 << 10);
    fs::write(dir.join("file"), &data).unwrap();
    fs::write(dir.join("target"), b"old").unwrap();
    let here = tempfile::tempdir().unwrap();
    let (got, upload) = (here.path().join("got"), here.path().join("upload"));
    let upload_sha256 = write_random_file(&upload, 400 << 10);

    let get = Transfer::start(s.tetherctl(&["get", &s.device, "/dir/file", str_of(&got)]));
    let put = Transfer::start(s.tetherctl(&["put", str_of(&upload), &s.device, "/dir/target"]));
    let part = here.path().join(".got.tether-part");
    let started = wait_until(secs(30), || len(&part) > 0 && device_temp_len(&dir) > 0);
    assert!(started, "both transfers under way");
    // A local user swaps the directory for a link to outside, and the put's target for a
    // link to a file outside.
    let moved = root.path().join("dir.orig");
    fs::rename(&dir, &moved).unwrap();
    symlink(outside.path(), &dir).unwrap();
    fs::remove_file(moved.join("target")).unwrap();
    symlink(outside.path().join("target"), moved.join("target")).unwrap();
    assert!(len(&part) < 400 << 10 && !device_temps(&moved).is_empty(), "swapped mid-transfer");

    // Both go on with the directory they had opened: the get reads the file it opened, the put
    // renames its temp file over the link (not through it).
    ok(&get.finish(secs(60)));
    ok(&put.finish(secs(60)));
    assert!(fs::read(&got).unwrap() == data, "the file the get opened, nothing from outside");
    assert!(fs::symlink_metadata(moved.join("target")).unwrap().is_file());
    assert_eq!(sha256_file(&moved.join("target")), upload_sha256);
    assert_eq!(names_in(&moved), ["file", "target"], "no temp file left");
    assert_eq!(names_in(outside.path()), ["file", "target"], "nothing written outside");
    assert!(fs::read(outside.path().join("file")).unwrap() == secret);
    assert!(fs::read(outside.path().join("target")).unwrap() == victim);

    // A new transfer meets the link, and is refused.
    let again = here.path().join("again");
    let out = s.tetherctl(&["get", &s.device, "/dir/file", str_of(&again)]).output().unwrap();
    failed_with(&out, "/dir is a symbolic link");
    assert!(!again.exists());
    let out = s.tetherctl(&["put", str_of(&upload), &s.device, "/dir/new"]).output().unwrap();
    failed_with(&out, "/dir is a symbolic link");
    assert_eq!(names_in(outside.path()), ["file", "target"]);
}

/// 136 KiB/s each way: 2 MiB take 15 s, time enough for both transfers to be under way
/// together however late tetherctl starts on a loaded machine.
const BOTH_WAYS_RATE: u64 = 8 << 20;

/// A file for each direction: `big` on the device, `up` here, `size` bytes each.
struct BothWays {
    here: tempfile::TempDir,
    size: u64,
    down_sha256: String,
    up_sha256: String,
}

impl BothWays {
    fn new(root: &Path, size: u64) -> BothWays {
        let here = tempfile::tempdir().unwrap();
        let down_sha256 = write_random_file(&root.join("big"), size);
        let up_sha256 = write_random_file(&here.path().join("up"), size);
        BothWays { here, size, down_sha256, up_sha256 }
    }

    fn local(&self, name: &str) -> PathBuf {
        self.here.path().join(name)
    }

    /// `get /big` and `put up /up`, --json, retried for up to a minute.
    fn start(&self, s: &common::remote::Setup) -> (Transfer, Transfer) {
        let got = self.local("got");
        let get = ["get", &s.device, "/big", str_of(&got), "--json", "--timeout", "60"];
        let up = self.local("up");
        let put = ["put", str_of(&up), &s.device, "/up", "--json", "--timeout", "60"];
        (Transfer::start(s.tetherctl(&get)), Transfer::start(s.tetherctl(&put)))
    }

    /// Both past their first window (the device paces them).
    fn wait_under_way(&self, root: &Path) {
        let part = self.local(".got.tether-part");
        let paced = wait_until(secs(30), || len(&part) > WINDOW && device_temp_len(root) > WINDOW);
        assert!(paced, "both transfers under way");
    }

    /// Neither has all its bytes yet (with the broker away, nothing moves).
    fn assert_unfinished(&self, root: &Path) {
        let (got, put) = (len(&self.local(".got.tether-part")), device_temp_len(root));
        assert!(got < self.size && put < self.size, "cut mid-transfer: {got} and {put} bytes there");
    }

    /// Both done, each file whole; the summaries of the get and the put.
    fn finish(&self, root: &Path, get: Transfer, put: Transfer) -> (serde_json::Value, serde_json::Value) {
        let (got, put) = (summary(&get.finish(secs(90))), summary(&put.finish(secs(90))));
        assert_eq!(got["sha256"].as_str(), Some(self.down_sha256.as_str()));
        assert_eq!(sha256_file(&self.local("got")), self.down_sha256, "the whole file, got");
        assert_eq!(put["sha256"].as_str(), Some(self.up_sha256.as_str()));
        assert_eq!(sha256_file(&root.join("up")), self.up_sha256, "the whole file, put");
        assert!(device_temps(root).is_empty() && !self.local(".got.tether-part").exists());
        (got, put)
    }
}

/// Bytes moved by each tunnel of `op` in the agent's log: (sent or received, from offset).
fn moved_by_tunnels(log: &str, op: &str) -> Vec<(u64, u64)> {
    let word = if op == "put" { "put received" } else { "get sent" };
    let numbers = |line: &str| {
        let rest = line.split(&format!(" {word} ")).nth(1)?;
        let mut words = rest.split(' ');
        let bytes = words.next()?.parse().ok()?;
        let offset = words.nth(3)?.parse().ok()?;
        Some((bytes, offset))
    };
    log.lines().filter_map(numbers).collect()
}

#[test]
fn a_broker_restart_does_not_cut_a_get_or_a_put() {
    let limits =
        json!({ "max_bytes_tx_per_minute": BOTH_WAYS_RATE, "max_bytes_rx_per_minute": BOTH_WAYS_RATE });
    let (mut s, root) = device("dev-restart", limits);
    let files = BothWays::new(root.path(), 2 << 20);
    let (get, put) = files.start(&s);
    files.wait_under_way(root.path());
    s.broker.stop();
    files.assert_unfinished(root.path());
    s.broker.start_again();
    let (got, put) = files.finish(root.path(), get, put);
    // The tunnels lived on (frames resent after the reconnect): one each, from byte 0.
    let log = s.agent.log();
    assert_eq!(moved_by_tunnels(&log, "get"), [(files.size, 0)]);
    assert_eq!(moved_by_tunnels(&log, "put"), [(files.size, 0)]);
    assert_eq!((got["resumed_from"].as_u64(), put["resumed_from"].as_u64()), (Some(0), Some(0)));
}

#[test]
fn a_get_and_a_put_resume_where_they_were_once_the_device_dropped_their_tunnels() {
    // The broker stays away until the device ends the tunnels as idle: tetherctl opens new
    // ones that go on from where the old ones were.
    let limits =
        json!({ "max_bytes_tx_per_minute": BOTH_WAYS_RATE, "max_bytes_rx_per_minute": BOTH_WAYS_RATE });
    let (mut s, root) =
        device_with("dev-resume", limits, json!({"remote_access": {"expire_after_idle_s": 2}}));
    let files = BothWays::new(root.path(), 2 << 20);
    let (get, put) = files.start(&s);
    files.wait_under_way(root.path());
    s.broker.stop();
    files.assert_unfinished(root.path());
    let dropped = wait_until(secs(20), || {
        s.agent.log().matches("expired: nothing from the operator for 2 s").count() == 2
    });
    assert!(dropped, "the device ended both tunnels");
    s.broker.start_again();
    let (got, put) = files.finish(root.path(), get, put);

    let log = s.agent.log();
    for (op, summary) in [("get", &got), ("put", &put)] {
        let resumed_from = summary["resumed_from"].as_u64().unwrap();
        assert!(resumed_from > WINDOW && resumed_from < files.size, "{op} resumed from {resumed_from}");
        // Only the first tunnel's bytes are left out of the log (it did not end by itself):
        // the second one moved the rest, from where the first had got to.
        let moved = moved_by_tunnels(&log, op);
        assert_eq!(moved, [(files.size - resumed_from, resumed_from)], "{op}");
    }
}

/// Bytes a second this machine hashes a sparse file in `dir` at, as the agent does (same code):
/// a file that takes it a few seconds is big on one machine and small on another.
fn hash_rate(dir: &Path) -> f64 {
    let path = dir.join("rate");
    fs::File::create(&path).unwrap().set_len(256 << 20).unwrap();
    let file = fs::File::open(&path).unwrap();
    let started = std::time::Instant::now();
    tether::agent::files::sha256_prefix(&file, 256 << 20).unwrap();
    let rate = (256 << 20) as f64 / started.elapsed().as_secs_f64();
    fs::remove_file(path).unwrap();
    rate
}

#[test]
fn a_get_resumed_deep_into_a_big_file_hashes_what_it_skips_while_the_device_answers() {
    let (s, root) = device("dev-deep", json!({ "max_file_size": 0 }));
    // About 6 s of hashing for the agent (sparse: no disk space, no time to write).
    let mib = ((hash_rate(root.path()) * 6.0) as u64 >> 20).clamp(256, 8 << 10);
    let (size, tail) = (mib << 20, random_bytes(1 << 20));
    let skipped = size - tail.len() as u64;
    let big = root.path().join("big");
    let file = fs::File::create(&big).unwrap();
    file.set_len(skipped).unwrap();
    (&file).seek(std::io::SeekFrom::End(0)).unwrap();
    (&file).write_all(&tail).unwrap();
    let here = tempfile::tempdir().unwrap();
    let got = here.path().join("got");
    // What an earlier run got: the zeros before the tail.
    fs::File::create(here.path().join(".got.tether-part")).unwrap().set_len(skipped).unwrap();

    let mut requests = Sub::new(&s.broker, &format!("tether/{}/cmd/get/+", s.device));
    let get = Transfer::start(s.tetherctl(&["get", &s.device, "/big", str_of(&got), "--json"]));
    requests.expect("the get's request", secs(30), |_| true);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let asked = std::time::Instant::now();
    ok(&s.tetherctl(&["cmd", &s.device, "ping", "--timeout", "30"]).output().unwrap());
    let answered = asked.elapsed();
    let hashed_after = wait_until(secs(60), || s.agent.log().contains("before the offset hashed"));
    assert!(hashed_after, "the agent hashed the {skipped} bytes: {}", s.agent.log());
    let hashing = asked.elapsed();
    assert!(
        answered.as_secs_f64() < hashing.as_secs_f64() / 2.0,
        "a ping is answered in {answered:?} while the get hashes ({hashing:?} more)"
    );

    let out = get.finish(secs(120));
    ok(&out);
    assert_eq!(summary(&out)["resumed_from"].as_u64(), Some(skipped));
    let mut end = vec![0u8; tail.len()];
    let got = fs::File::open(&got).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&got, &mut end, skipped).unwrap();
    assert!(end == tail && got.metadata().unwrap().len() == size, "the file, whole");
}
