//! `tetherctl ls / get / put` through a real Mosquitto over wss + TLS, the real agent and
//! tetherctl (docs/protocol.md, "Files"): verified copies both ways, the device's limits and
//! refusals, atomic puts. Faults (a kill -9, a full disk, links swapped in, broker restarts):
//! remote_files_faults.rs.

mod common;

use common::files::{
    device, device_temp_len, failed_with, names_in, ok, random_bytes, sha256_file, str_of, summary,
    write_random_file, Transfer,
};
use common::pty::Terminal;
use common::remote::{run_with_input, text, timed_lines};
use common::{secs, wait_until};
use serde_json::{json, Value};
use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
fn get_of_a_fifo_waits_for_its_bytes_when_special_files_are_allowed() {
    let (s, root) = device("dev-fifo", json!({ "regular_files_only": false }));
    let fifo = root.path().join("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    // Held open for writing (read-write does not wait for a reader): the get meets a FIFO with
    // a writer and nothing in it yet.
    let mut writer = fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
    let get = Transfer::start(s.tetherctl(&["get", &s.device, "/fifo", "-"]));
    let opened = wait_until(secs(30), || s.agent.log().contains("get /fifo opened"));
    assert!(opened, "{}", s.agent.log());
    std::thread::sleep(Duration::from_millis(500));
    writer.write_all(b"first\n").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    writer.write_all(b"second\n").unwrap();
    drop(writer);
    let out = get.finish(secs(30));
    ok(&out);
    assert_eq!(text(&out.stdout), "first\nsecond\n");
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

/// Less than tetherctl's 2 s wait for the device's last acknowledgements, so that waiting it out
/// shows.
const SOON: Duration = Duration::from_millis(1500);

/// A small ls, get or put ends as soon as the device ended its tunnel: tetherctl acknowledges
/// the device's last frames when that is due, and does not wait out its 2 s for them.
#[test]
fn a_small_ls_get_or_put_ends_as_soon_as_the_device_ends_it() {
    let (s, root) = device("dev-quick-files", json!({}));
    fs::write(root.path().join("small"), b"small").unwrap();
    let here = tempfile::tempdir().unwrap();
    let local = here.path().join("small");
    let get = ["get", &s.device, "/small", str_of(&local)];
    let put = ["put", str_of(&local), &s.device, "/copy"];
    for args in [&["ls", &s.device, "/"][..], &get, &put] {
        let mut command = s.tetherctl(args);
        command.env("RUST_LOG", "debug").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut tetherctl = command.spawn().unwrap();
        let log = timed_lines(tetherctl.stderr.take().unwrap());
        let status = tetherctl.wait().unwrap();
        let ended = Instant::now();
        let log = log.join().unwrap();
        assert!(status.success(), "{args:?}: {log:?}");
        let opened = log.iter().find(|(_, line)| line.contains("open to dev-quick-files"));
        let took = ended - opened.unwrap_or_else(|| panic!("tetherctl logs the opening: {log:?}")).0;
        assert!(took < SOON, "{args:?} ended {took:?} after the tunnel opened");
    }
    assert_eq!(fs::read(root.path().join("copy")).unwrap(), b"small");
}

#[test]
fn directories_are_refused_both_ways_there_is_no_recursive_copy() {
    let (s, root) = device("dev-dirs", json!({}));
    fs::create_dir(root.path().join("dir")).unwrap();
    fs::write(root.path().join("dir/inner"), b"inner").unwrap();
    let here = tempfile::tempdir().unwrap();
    let file = here.path().join("file");
    fs::write(&file, b"a file").unwrap();
    let local_dir = here.path().join("local-dir");
    fs::create_dir(&local_dir).unwrap();

    for remote in ["/dir", "/dir/", "/", "/dir/.."] {
        let out =
            s.tetherctl(&["get", &s.device, remote, str_of(&here.path().join("got"))]).output().unwrap();
        failed_with(&out, "is a directory: get takes files");
        let out = s.tetherctl(&["put", str_of(&file), &s.device, remote]).output().unwrap();
        failed_with(&out, "is a directory: put takes files");
    }
    let out = s.tetherctl(&["put", str_of(&local_dir), &s.device, "/copy"]).output().unwrap();
    failed_with(&out, "local-dir is a directory: put takes files");
    assert_eq!(names_in(root.path()), ["dir"], "nothing written on the device");
    assert_eq!(names_in(&root.path().join("dir")), ["inner"]);
    assert_eq!(names_in(here.path()), ["file", "local-dir"], "nothing written here");
    assert_eq!(names_in(&local_dir), Vec::<String>::new());

    for command in ["get", "put"] {
        let out = s.tetherctl(&["help", command]).output().unwrap();
        ok(&out);
        assert!(
            text(&out.stdout).contains("Directories are refused (no recursive copy)"),
            "{}",
            text(&out.stdout)
        );
    }
}

/// One redraw of get's progress line: `DONE / SIZE bytes  RATE MB/s  ETA SECONDS s`.
#[derive(Debug)]
struct ProgressLine {
    done: u64,
    size: u64,
    mb_per_s: f64,
    /// None while the rate is unknown (`ETA ?`).
    eta_s: Option<f64>,
}

fn progress_lines(shown: &str) -> Vec<ProgressLine> {
    let parse = |line: &str| {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            [done, "/", size, "bytes", rate, "MB/s", "ETA", eta, ..] => Some(ProgressLine {
                done: done.parse().ok()?,
                size: size.parse().ok()?,
                mb_per_s: rate.parse().ok()?,
                eta_s: eta.parse().ok(),
            }),
            _ => None,
        }
    };
    shown.split(['\r', '\n']).filter_map(parse).collect()
}

#[test]
fn get_shows_bytes_rate_and_eta_on_a_terminal_and_no_progress_elsewhere() {
    // 1 MiB/s (1.05 MB/s): 4 MiB take 4 s, the line redrawn every half second.
    let (s, root) = device("dev-progress", json!({ "max_bytes_tx_per_minute": 60 << 20 }));
    let size = 4 << 20;
    let data = random_bytes(size);
    fs::write(root.path().join("file"), &data).unwrap();
    let here = tempfile::tempdir().unwrap();

    let mut terminal = Terminal::new(24, 80);
    let on_tty = here.path().join("on-tty");
    let mut get = terminal.start(s.tetherctl(&["get", &s.device, "/file", str_of(&on_tty)]));
    let status = terminal.wait_exit(&mut get, secs(60));
    let shown = terminal.rest();
    assert!(status.success(), "{shown}");
    assert!(fs::read(&on_tty).unwrap() == data);
    let lines = progress_lines(&shown);
    assert!(lines.iter().all(|l| l.size == size as u64), "{shown:?}");
    let last = lines.last().unwrap_or_else(|| panic!("no progress line: {shown:?}"));
    assert_eq!(last.done, size as u64, "the line ends at the whole file: {shown:?}");
    let under_way: Vec<&ProgressLine> = lines.iter().filter(|l| l.done > 0 && l.done < size as u64).collect();
    assert!(under_way.len() >= 3, "redrawn while the file came: {shown:?}");
    assert!(under_way.windows(2).all(|w| w[0].done <= w[1].done), "{under_way:?}");
    for line in &under_way[1..] {
        // The average since the start, which the device's first burst (a second's worth) lifts
        // above its rate for the first seconds.
        assert!((0.7..=3.5).contains(&line.mb_per_s), "about the rate the device allows: {line:?}");
        let eta = line.eta_s.unwrap_or_else(|| panic!("an ETA once the rate is known: {line:?}"));
        let expected = (size as u64 - line.done) as f64 / (line.mb_per_s * 1e6);
        assert!((eta - expected).abs() <= 1.0 + expected * 0.1, "{line:?}: ETA {expected:.1} s");
        assert!(eta <= 5.0, "at most the whole file's time: {line:?}");
    }

    // --json on a terminal: the summary alone.
    let mut terminal = Terminal::new(24, 80);
    let json_tty = here.path().join("json-tty");
    let mut get = terminal.start(s.tetherctl(&["get", &s.device, "/file", str_of(&json_tty), "--json"]));
    let status = terminal.wait_exit(&mut get, secs(60));
    let shown = terminal.rest();
    assert!(status.success(), "{shown}");
    assert!(progress_lines(&shown).is_empty() && !shown.contains("ETA"), "{shown:?}");
    let summary: Value = serde_json::from_str(shown.trim()).unwrap_or_else(|e| panic!("{e}: {shown:?}"));
    assert_eq!(summary["size"].as_u64(), Some(size as u64), "only the summary");

    // Not a terminal: no progress either.
    let piped = here.path().join("piped");
    let out = s.tetherctl(&["get", &s.device, "/file", str_of(&piped)]).output().unwrap();
    ok(&out);
    assert!(fs::read(&piped).unwrap() == data);
    assert_eq!(text(&out.stderr), "", "no progress on a pipe");
    assert_eq!(text(&out.stdout), "");
}

/// tetherctl's window, which the device takes as is: what a put sends before the device's
/// first acknowledgement.
const WINDOW: u64 = 256 << 10;

#[test]
fn the_rate_limits_hold_within_ten_percent_over_a_minute_for_all_transfers_together() {
    // 3 MiB a minute each way: two gets and two puts of 1.5 MiB at once take about a minute.
    let per_minute: u64 = 3 << 20;
    let limits = json!({ "max_bytes_tx_per_minute": per_minute, "max_bytes_rx_per_minute": per_minute });
    let (s, root) = device("dev-rate", limits);
    let here = tempfile::tempdir().unwrap();
    let size: u64 = 1536 << 10;
    let mut commands = Vec::new();
    for n in 0..2 {
        let name = format!("file-{n}");
        let sha256 = write_random_file(&root.path().join(&name), size);
        let got = here.path().join(&name);
        let get = s.tetherctl(&["get", &s.device, &format!("/{name}"), str_of(&got), "--json"]);
        commands.push(("get", get, sha256, got));
        let upload = here.path().join(format!("up-{n}"));
        let sha256 = write_random_file(&upload, size);
        let put = s.tetherctl(&["put", str_of(&upload), &s.device, &format!("/up-{n}"), "--json"]);
        commands.push(("put", put, sha256, root.path().join(format!("up-{n}"))));
    }
    let mut running: Vec<_> = commands
        .into_iter()
        .map(|(op, command, sha256, file)| (op, Transfer::start(command), None, sha256, file))
        .collect();
    // Timed from the first byte each way, not from tetherctl's start (its connection, the
    // tunnel's opening): the limit is on the bytes.
    let (mut first_got, mut first_put) = (None, None);
    let parts = [here.path().join(".file-0.tether-part"), here.path().join(".file-1.tether-part")];
    let all_ended = wait_until(secs(120), || {
        let now = Instant::now();
        if parts.iter().any(|part| fs::metadata(part).is_ok_and(|m| m.len() > 0)) {
            first_got.get_or_insert(now);
        }
        if device_temp_len(root.path()) > 0 {
            first_put.get_or_insert(now);
        }
        for (_, transfer, ended, _, _) in &mut running {
            if ended.is_none() && transfer.exited() {
                *ended = Some(now);
            }
        }
        running.iter().all(|(_, _, ended, _, _)| ended.is_some())
    });
    assert!(all_ended, "all four transfers ended within two minutes");

    // The bucket starts full, with a second's worth; each put has a window on its way before
    // the device acknowledges anything. Each direction's limit is shared: transfers going the
    // same way end together, when it has let all their bytes through.
    let per_second = per_minute as f64 / 60.0;
    let burst = per_second;
    let gets_take = (2 * size) as f64 - burst;
    let puts_take = (2 * (size - WINDOW)) as f64 - burst;
    for (op, transfer, ended, sha256, file) in running {
        let summary = summary(&transfer.finish(secs(1)));
        assert_eq!(summary["sha256"].as_str(), Some(sha256.as_str()), "{op}");
        assert_eq!(sha256_file(&file), sha256, "{op} {}", file.display());
        let (first_byte, take) = if op == "get" { (first_got, gets_take) } else { (first_put, puts_take) };
        let first_byte = first_byte.unwrap_or_else(|| panic!("no {op} seen under way"));
        let (took, expected) = (ended.unwrap() - first_byte, take / per_second);
        eprintln!("{op} of {size} bytes: {took:.1?}, {expected:.1} s expected");
        let ratio = took.as_secs_f64() / expected;
        assert!((0.9..=1.1).contains(&ratio), "{op} took {took:?}, {expected:.1} s expected");
    }
}

#[test]
fn a_512_mib_file_both_ways_verified() {
    let (s, root) = device("dev-big", json!({}));
    let here = tempfile::tempdir().unwrap();
    let size: u64 = 512 << 20;
    let sha256 = write_random_file(&root.path().join("big"), size);
    let got = here.path().join("big");

    let started = Instant::now();
    let out = s.tetherctl(&["get", &s.device, "/big", str_of(&got), "--json"]).output().unwrap();
    let get_took = started.elapsed();
    assert_eq!(summary(&out)["sha256"].as_str(), Some(sha256.as_str()));
    assert_eq!(sha256_file(&got), sha256);
    fs::remove_file(root.path().join("big")).unwrap();

    let started = Instant::now();
    let out = s.tetherctl(&["put", str_of(&got), &s.device, "/back", "--json"]).output().unwrap();
    let put_took = started.elapsed();
    assert_eq!(summary(&out)["sha256"].as_str(), Some(sha256.as_str()));
    assert_eq!(sha256_file(&root.path().join("back")), sha256);
    assert_eq!(names_in(root.path()), ["back"], "no temp file left");
    eprintln!("512 MiB: get {get_took:.1?}, put {put_took:.1?}");
}

/// A fetched file takes the device's mode less the local umask, as cp and scp do.
#[test]
fn get_gives_the_devices_mode_less_the_local_umask() {
    use std::os::unix::fs::PermissionsExt;
    let (s, root) = device("dev-mode", json!({}));
    let script = root.path().join("tool.sh");
    fs::write(&script, b"#!/bin/sh\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o777)).unwrap();
    let here = tempfile::tempdir().unwrap();
    let local = here.path().join("tool.sh");
    let mut get = s.tetherctl(&["get", &s.device, "/tool.sh", str_of(&local)]);
    // SAFETY: umask in the child before exec; it touches no memory.
    unsafe {
        use std::os::unix::process::CommandExt;
        get.pre_exec(|| {
            libc::umask(0o027);
            Ok(())
        });
    }
    ok(&get.output().unwrap());
    assert_eq!(fs::metadata(&local).unwrap().permissions().mode() & 0o777, 0o750);
}
