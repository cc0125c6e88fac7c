//! `tetherctl ls / get / put` through a real Mosquitto over wss + TLS, the real agent and
//! tetherctl (docs/protocol.md, "Files"): verified copies both ways, the device's limits and
//! refusals, atomic puts, and a get resumed across a broker restart.

mod common;

use common::files::{device, failed_with, ok, random_bytes, str_of};
use common::remote::{run_with_input, text};
use common::secs;
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;

#[test]
fn ls_shows_files_directories_and_links() {
    let (s, root) = device("dev-ls", json!({}));
    fs::write(root.path().join("notes.txt"), b"12345").unwrap();
    fs::create_dir(root.path().join("sub")).unwrap();
    symlink("notes.txt", root.path().join("link")).unwrap();
    let out = s.tetherctl(&["ls", &s.device, "/"]).output().unwrap();
    ok(&out);
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].starts_with('l') && lines[0].ends_with("link -> notes.txt"), "{}", lines[0]);
    assert!(lines[1].starts_with("-rw") && lines[1].contains(" 5 ") && lines[1].ends_with(" notes.txt"));
    assert!(lines[2].starts_with('d') && lines[2].ends_with(" sub"), "{}", lines[2]);

    let out = s.tetherctl(&["ls", &s.device, "/", "--json"]).output().unwrap();
    ok(&out);
    let entries: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["link", "notes.txt", "sub"]);
    assert_eq!((entries[1]["kind"].as_str(), entries[1]["size"].as_u64()), (Some("file"), Some(5)));
}

#[test]
fn get_and_put_copy_files_of_every_size_verified() {
    let (s, root) = device("dev-copy", json!({}));
    let here = tempfile::tempdir().unwrap();
    for size in [0, 1, 5 << 20] {
        let data = random_bytes(size);
        let name = format!("file-{size}");
        fs::write(root.path().join(&name), &data).unwrap();
        let local = here.path().join(&name);
        let out = s.tetherctl(&["get", &s.device, &format!("/{name}"), str_of(&local)]).output().unwrap();
        ok(&out);
        assert!(fs::read(&local).unwrap() == data, "get of {size} bytes");

        let remote = format!("/copy-{size}");
        let out = s.tetherctl(&["put", str_of(&local), &s.device, &remote, "--json"]).output().unwrap();
        ok(&out);
        assert!(fs::read(root.path().join(&remote[1..])).unwrap() == data, "put of {size} bytes");
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["size"].as_u64(), Some(size as u64));
    }
    let leftovers: Vec<PathBuf> = fs::read_dir(here.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(leftovers.len(), 3, "no temp file left here: {leftovers:?}");
}

#[test]
fn get_to_stdout_and_put_from_stdin() {
    let (s, root) = device("dev-stdio", json!({}));
    fs::write(root.path().join("hello"), b"hello, world\n").unwrap();
    let out = s.tetherctl(&["get", &s.device, "/hello", "-"]).output().unwrap();
    ok(&out);
    assert_eq!(text(&out.stdout), "hello, world\n");

    let out = run_with_input(s.tetherctl(&["put", "-", &s.device, "/from-stdin"]), b"piped\n");
    ok(&out);
    assert_eq!(fs::read_to_string(root.path().join("from-stdin")).unwrap(), "piped\n");
}

#[test]
fn escapes_and_refusals_come_with_their_reason_and_write_nothing() {
    let (s, root) = device("dev-refuse", json!({ "allow_overwrite": false }));
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), b"secret").unwrap();
    symlink(outside.path().join("secret"), root.path().join("out-link")).unwrap();
    fs::write(root.path().join("kept"), b"old").unwrap();
    fs::create_dir(root.path().join("dir")).unwrap();
    let here = tempfile::tempdir().unwrap();
    let local = here.path().join("got");

    let out = s.tetherctl(&["get", &s.device, "../etc/passwd", str_of(&local)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("refused the get"), "{}", text(&out.stderr));
    let out = s.tetherctl(&["get", &s.device, "/out-link", str_of(&local)]).output().unwrap();
    failed_with(&out, "symbolic link");
    let out = s.tetherctl(&["get", &s.device, "/dir", str_of(&local)]).output().unwrap();
    failed_with(&out, "is a directory: get takes files");
    assert_eq!(fs::read_dir(here.path()).unwrap().count(), 0, "nothing written locally");

    fs::write(&local, b"new").unwrap();
    let out = s.tetherctl(&["put", str_of(&local), &s.device, "/kept"]).output().unwrap();
    failed_with(&out, "allow_overwrite is false");
    assert_eq!(fs::read_to_string(root.path().join("kept")).unwrap(), "old");
}

#[test]
fn a_get_cut_by_a_broker_restart_resumes_with_the_right_hash() {
    let (mut s, root) = device("dev-resume", json!({ "max_bytes_tx_per_minute": 120 << 20 }));
    let size = 8 << 20;
    let data = random_bytes(size);
    fs::write(root.path().join("big"), &data).unwrap();
    let here = tempfile::tempdir().unwrap();
    let local = here.path().join("big");
    let mut get =
        s.tetherctl(&["get", &s.device, "/big", str_of(&local), "--timeout", "60"]).spawn().unwrap();
    let part = here.path().join(".big.tether-part");
    let started = common::wait_until(secs(20), || fs::metadata(&part).is_ok_and(|m| m.len() > (1 << 20)));
    assert!(started, "the transfer started");
    s.broker.stop();
    std::thread::sleep(secs(2));
    s.broker.start_again();
    let status = common::wait_child(&mut get, secs(90)).expect("get ended");
    assert!(status.success());
    assert!(fs::read(&local).unwrap() == data, "the whole file, verified");
    let log = fs::read_to_string(s.agent.log_path()).unwrap();
    let sent: u64 =
        log.lines().filter_map(|l| l.split(" sent ").nth(1)?.split(' ').next()?.parse::<u64>().ok()).sum();
    assert!(sent < 2 * size as u64, "not restarted from zero: {sent} bytes sent for {size}");
}
