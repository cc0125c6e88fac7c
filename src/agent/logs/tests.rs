//! Sources read for real: files in temporary directories, followed through renames and
//! truncations, and processes.

use super::time::tests::local_texts;
use super::watch::Watch;
use super::*;
use crate::config::{LogInput, LogSource, LogsConfig};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PATIENCE: Duration = Duration::from_secs(10);

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn query(lines: Option<usize>, since: Option<&str>, grep: Option<&str>, follow: bool) -> Query {
    Query::new(lines, since, grep, follow, now()).unwrap()
}

fn last(n: usize) -> Query {
    query(Some(n), None, None, false)
}

/// A file of `content` in a new temporary directory.
fn log_file(content: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    std::fs::write(&path, content).unwrap();
    (dir, path)
}

fn append(path: &Path, text: &str) {
    OpenOptions::new().append(true).create(true).open(path).unwrap().write_all(text.as_bytes()).unwrap();
}

/// What a read that does not follow gives.
fn read_file(path: &Path, query: &Query) -> String {
    let mut log = FileLog::open(path, query).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while log.read(&mut out).unwrap() != Status::End {
        assert!(Instant::now() < deadline, "no end");
    }
    String::from_utf8(out).unwrap()
}

fn tail(content: &str, query: &Query) -> String {
    let (_dir, path) = log_file(content.as_bytes());
    read_file(&path, query)
}

/// A log being followed, its descriptor in a mio Poll as the agent would have it.
struct Followed {
    log: FileLog,
    poll: Poll,
    events: Events,
    /// Lines so far, and `== NOTICE ==` lines for notices.
    text: String,
}

impl Followed {
    fn open(path: &Path, query: &Query) -> Followed {
        Followed::with(FileLog::open(path, query).unwrap())
    }

    fn with(log: FileLog) -> Followed {
        let poll = Poll::new().unwrap();
        poll.registry().register(&mut SourceFd(&log.fd().unwrap()), Token(0), Interest::READABLE).unwrap();
        let mut followed = Followed { log, poll, events: Events::with_capacity(8), text: String::new() };
        followed.read_all();
        followed
    }

    /// Reads until the log says Wait.
    fn read_all(&mut self) {
        let mut out = Vec::new();
        loop {
            match self.log.read(&mut out).unwrap() {
                Status::More => {}
                Status::Wait => break,
                Status::End => panic!("a followed file does not end"),
                Status::Notice(notice) => {
                    self.text.push_str(&String::from_utf8(std::mem::take(&mut out)).unwrap());
                    self.text.push_str(&format!("== {notice:?} ==\n"));
                }
            }
        }
        self.text.push_str(&String::from_utf8(out).unwrap());
    }

    /// Waits for events and reads until the text so far ends with `wanted`.
    fn until(&mut self, wanted: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        while !self.text.ends_with(wanted) {
            assert!(Instant::now() < deadline, "waited for {wanted:?}, have {:?}", self.text);
            wait(&mut self.poll, &mut self.events, Duration::from_millis(500));
            self.read_all();
        }
        std::mem::take(&mut self.text)
    }

    /// Whether a poll of `timeout` sees an event.
    fn woken_within(&mut self, timeout: Duration) -> bool {
        wait(&mut self.poll, &mut self.events, timeout);
        !self.events.is_empty()
    }
}

/// A poll; a signal (other tests in this process watch some) wakes it like an empty event list.
fn wait(poll: &mut Poll, events: &mut Events, timeout: Duration) {
    match poll.poll(events, Some(timeout)) {
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => events.clear(),
        result => result.unwrap(),
    }
}

#[test]
fn tail_n_on_small_files() {
    let five = "1\n2\n3\n4\n5\n";
    assert_eq!(tail(five, &last(2)), "4\n5\n");
    assert_eq!(tail(five, &last(5)), five);
    assert_eq!(tail(five, &last(50)), five);
    assert_eq!(tail(five, &last(0)), "");
    assert_eq!(tail(five, &Query::default()), five);
    assert_eq!(tail("a\nb\nc", &last(2)), "b\nc\n", "no newline at the end");
    assert_eq!(tail("a\r\nb\r\nc\r\n", &last(2)), "b\nc\n", "CRLF");
    assert_eq!(tail("", &last(3)), "");
    assert_eq!(tail("\n\n\n", &last(2)), "\n\n", "empty lines count");
    assert_eq!(tail("x\n", &last(1)), "x\n");
}

#[test]
fn tail_n_on_a_file_of_many_blocks_with_grep() {
    let text: String = (1..=200_000).map(|i| format!("line {i}\n")).collect();
    let (_dir, path) = log_file(text.as_bytes());
    assert_eq!(read_file(&path, &last(3)), "line 199998\nline 199999\nline 200000\n");
    let many = read_file(&path, &last(150_000));
    assert_eq!(many.lines().count(), 150_000);
    assert!(many.starts_with("line 50001\n"));
    let grep = query(Some(2), None, Some("^line 1[0-9]*7$"), false);
    assert_eq!(read_file(&path, &grep), "line 199987\nline 199997\n");
    let all_matching = read_file(&path, &query(None, None, Some("^line 1999[0-9]7$"), false));
    let expected: String = (0..10).map(|i| format!("line 1999{i}7\n")).collect();
    assert_eq!(all_matching, expected);
}

#[test]
fn tail_of_a_1_gib_file_reads_only_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.log");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(1 << 30).unwrap(); // sparse: one 1 GiB "line" of NULs
    append(&path, "\nlast one\nlast two\n");
    let started = Instant::now();
    assert_eq!(read_file(&path, &last(2)), "last one\nlast two\n");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn long_lines_are_cut_and_say_how_much() {
    let long = "y".repeat(100_000);
    let content = format!("short\n{long}\nend\n");
    let expected_long = format!("{} [{} more bytes cut]\n", &long[..LINE_MAX], 100_000 - LINE_MAX);
    assert_eq!(tail(&content, &last(2)), format!("{expected_long}end\n"));
    assert_eq!(tail(&content, &query(Some(1), None, Some("^y+$"), false)), expected_long);
    // The \r of a cut line is in the part cut.
    let crlf = tail(&format!("{long}\r\n"), &last(1));
    assert!(
        crlf.ends_with(&format!("y [{} more bytes cut]\n", 100_000 - LINE_MAX + 1)),
        "CRLF after a cut line"
    );
}

/// Lines stamped 3 h, 2 h, 1 h and 10 min ago, each followed by a line without a time.
fn stamped_log(stamp: impl Fn(i64) -> String) -> String {
    let now = now();
    [(3 * 3600, "three"), (2 * 3600, "two"), (3600, "one"), (600, "ten")]
        .iter()
        .map(|(ago, name)| format!("{} host app: {name} ago\n  continued {name}\n", stamp(now - ago)))
        .collect()
}

fn check_since(log: &str) {
    let since = |text, lines| tail(log, &query(lines, Some(text), None, false));
    let from_one = "host app: one ago\n  continued one\n";
    let from_ten = "host app: ten ago\n  continued ten\n";
    let got = since("90m", None);
    assert!(got.contains(from_one) && got.ends_with(from_ten), "{got}");
    assert!(!got.contains("two") && !got.contains("three"), "{got}");
    assert_eq!(got.lines().count(), 4);
    assert_eq!(since("90m", Some(1)), "  continued ten\n");
    assert_eq!(since("90m", Some(100)).lines().count(), 4);
    assert_eq!(since("1d", None), log);
    assert_eq!(since("1m", None), "");
    assert_eq!(since("15m", Some(5)).lines().count(), 2);
    // Read forward, as a command's output is.
    let mut filter = lines::LineFilter::new(query(None, Some("90m"), None, false).since, None);
    let kept: Vec<&str> = log.lines().filter(|line| filter.keep(line.as_bytes())).collect();
    assert_eq!(kept.len(), 4);
    assert!(kept[0].ends_with("one ago"), "{kept:?}");
}

#[test]
fn since_with_syslog_stamps() {
    check_since(&stamped_log(|unix| local_texts(unix).0));
}

#[test]
fn since_with_iso_stamps() {
    check_since(&stamped_log(|unix| crate::logging::utc_time(unix as u64)));
    check_since(&stamped_log(|unix| local_texts(unix).1));
}

#[test]
fn since_leaves_out_lines_before_the_first_time_and_with_grep_counts_kept_lines() {
    let log = format!("no time here\n{}", stamped_log(|unix| local_texts(unix).0));
    let all = tail(&log, &query(None, Some("1d"), None, false));
    assert!(!all.contains("no time here") && all.contains("three ago"), "{all}");
    let grep = tail(&log, &query(Some(1), Some("150m"), Some("continued"), false));
    assert_eq!(grep, "  continued ten\n");
    let grep = tail(&log, &query(Some(5), Some("150m"), Some("ago"), false));
    assert_eq!(grep.lines().count(), 3, "{grep}");
}

#[test]
fn follow_shows_appended_lines_and_holds_a_partial_one() {
    let (_dir, path) = log_file(b"old 1\nold 2\n");
    let mut followed = Followed::open(&path, &query(Some(1), None, None, true));
    assert_eq!(followed.until("old 2\n"), "old 2\n");
    append(&path, "new 1\nnew ");
    assert_eq!(followed.until("new 1\n"), "new 1\n");
    append(&path, "2\n");
    assert_eq!(followed.until("new 2\n"), "new 2\n");
}

/// `content` in a file followed from its start, read.
fn followed_file(content: &str) -> (tempfile::TempDir, PathBuf, Followed) {
    let (dir, path) = log_file(content.as_bytes());
    let mut followed = Followed::open(&path, &query(None, None, None, true));
    assert_eq!(followed.until(content), content);
    (dir, path, followed)
}

#[test]
fn follow_across_a_rotation_by_rename_loses_no_line() {
    let (dir, path, mut followed) = followed_file("a1\n");
    append(&path, "a2\na3 unfinished");
    std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
    append(&path, "b1\n");
    append(&path, "b2\n");
    assert_eq!(followed.until("b2\n"), "a2\na3 unfinished\n== Replaced ==\nb1\nb2\n");
    append(&path, "b3\n");
    assert_eq!(followed.until("b3\n"), "b3\n");
}

#[test]
fn follow_across_a_rename_before_the_new_file_appears() {
    let (dir, path, mut followed) = followed_file("a1\n");
    std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
    // The writer still has the old file open.
    append(&dir.path().join("app.log.1"), "a2\n");
    assert_eq!(followed.until("a2\n"), "a2\n");
    append(&path, "b1\n");
    assert_eq!(followed.until("b1\n"), "== Replaced ==\nb1\n");
}

#[test]
fn follow_across_a_truncation() {
    let (_dir, path, mut followed) = followed_file("a long first line\nanother long line\n");
    OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
    append(&path, "new 1\n");
    assert_eq!(followed.until("new 1\n"), "== Truncated ==\nnew 1\n");
    append(&path, "new 2\n");
    assert_eq!(followed.until("new 2\n"), "new 2\n");
}

#[test]
fn follow_a_file_deleted_and_made_again() {
    let (_dir, path, mut followed) = followed_file("a1\n");
    std::fs::remove_file(&path).unwrap();
    followed.read_all();
    assert_eq!(followed.text, "");
    append(&path, "c1\n");
    assert_eq!(followed.until("c1\n"), "== Replaced ==\nc1\n");
}

#[test]
fn follow_applies_grep() {
    let (_dir, path) = log_file(b"");
    let mut followed = Followed::open(&path, &query(None, None, Some("ERROR"), true));
    append(&path, "INFO fine\nERROR bad\nINFO fine again\nERROR worse\n");
    assert_eq!(followed.until("worse\n"), "ERROR bad\nERROR worse\n");
}

#[test]
fn a_quiet_followed_file_wakes_nobody() {
    let (_dir, path, mut followed) = followed_file("a1\n");
    assert_eq!(followed.log.watching(), Some(Watching::Inotify));
    assert!(!followed.woken_within(Duration::from_secs(1)), "an event while nothing was written");
    append(&path, "a2\n");
    assert!(followed.woken_within(Duration::from_secs(1)), "no event for a write");
    followed.read_all();
    assert_eq!(followed.text, "a2\n");
}

#[test]
fn without_inotify_a_timer_looks_every_two_seconds() {
    let (dir, path) = log_file(b"a1\n");
    let log = FileLog::open_watched(&path, &query(None, None, None, true), |_| Watch::timer()).unwrap();
    let mut followed = Followed::with(log);
    assert_eq!(followed.log.watching(), Some(Watching::Poll));
    followed.until("a1\n");
    assert!(!followed.woken_within(POLL_INTERVAL / 2));
    std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
    append(&path, "b1\n");
    assert_eq!(followed.until("b1\n"), "== Replaced ==\nb1\n");
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// Everything a command source gives until it ends: its lines, then its complaints.
fn run(argv: &[String], query: &Query) -> String {
    let mut log = CommandLog::spawn(argv, query).unwrap();
    let poll = Poll::new().unwrap();
    for (i, fd) in log.fds().iter().enumerate() {
        poll.registry().register(&mut SourceFd(fd), Token(i), Interest::READABLE).unwrap();
    }
    let mut poll = poll;
    let mut events = Events::with_capacity(4);
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "no end: {}", String::from_utf8_lossy(&out));
        match log.read(&mut out, &mut errors).unwrap() {
            Status::More => {}
            Status::Wait => wait(&mut poll, &mut events, Duration::from_millis(500)),
            Status::End => break,
            Status::Notice(notice) => panic!("a command has no {notice:?}"),
        }
    }
    assert!(log.child().try_wait().is_some() || wait_a_little(&mut log));
    out.extend_from_slice(&errors);
    String::from_utf8(out).unwrap()
}

fn wait_a_little(log: &mut CommandLog) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while log.child().try_wait().is_none() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[test]
fn a_command_source_yields_its_lines() {
    assert_eq!(run(&sh("echo a; echo b"), &Query::default()), "a\nb\n");
    assert_eq!(run(&sh("printf 'a\\r\\nb'"), &Query::default()), "a\nb\n");
    assert_eq!(run(&sh("seq 1 100000"), &last(2)), "99999\n100000\n");
    assert_eq!(run(&sh("seq 1 30"), &query(Some(2), None, Some("^1"), false)), "18\n19\n");
    assert_eq!(run(&sh("echo why >&2; echo a"), &query(None, None, Some("b"), false)), "why\n");
    assert_eq!(run(&sh("echo a; sleep 0.3; echo b"), &query(None, None, None, true)), "a\nb\n");
}

#[test]
fn a_command_source_with_since() {
    let log = stamped_log(|unix| local_texts(unix).0);
    let (_dir, path) = log_file(log.as_bytes());
    let cat = ["cat".to_string(), path.display().to_string()];
    let got = run(&cat, &query(Some(3), Some("90m"), None, false));
    assert_eq!(got, format!("  continued one\n{}\n  continued ten\n", log.lines().nth(6).unwrap()));
}

#[test]
fn logread_and_journalctl_get_the_query_as_options() {
    let argv = |words: &[&str], query: &Query| {
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        command_argv(&words, query).join(" ")
    };
    let since = Since::parse("2026-05-01T12:00:00Z", now()).unwrap();
    let journal = ["journalctl", "-o", "short", "--no-pager"];
    let with_since = Query { since: Some(since), ..last(20) };
    assert_eq!(argv(&journal, &with_since), "journalctl -o short --no-pager -n 20 --since @1777636800");
    assert_eq!(argv(&journal, &query(None, None, None, true)), "journalctl -o short --no-pager -f -n all");
    assert_eq!(argv(&journal, &query(Some(5), None, None, true)), "journalctl -o short --no-pager -f -n 5");
    assert_eq!(argv(&journal, &query(Some(5), None, Some("x"), false)), "journalctl -o short --no-pager");
    assert_eq!(argv(&journal, &Query::default()), "journalctl -o short --no-pager");
    assert_eq!(argv(&["/sbin/logread"], &last(5)), "/sbin/logread");
    assert_eq!(argv(&["logread"], &query(Some(5), None, None, true)), "logread -F");
    assert_eq!(argv(&["logread"], &query(Some(0), None, None, true)), "logread -f");
    assert_eq!(argv(&["logread", "-f"], &last(5)), "logread", "a source's own -f");
    assert_eq!(argv(&["logread", "-f"], &query(None, None, None, true)), "logread -F");
    assert_eq!(argv(&["journalctl", "--follow", "-k"], &last(5)), "journalctl -k -n 5");
    assert_eq!(argv(&["my-log", "-x"], &query(Some(5), None, None, true)), "my-log -x");
}

#[test]
fn sources_and_list() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.log"), "a\n").unwrap();
    let pattern = dir.path().join("*.log").display().to_string();
    let configured = vec![
        LogSource { name: "app".into(), input: LogInput::Files(vec![pattern.clone()]) },
        LogSource { name: "gone".into(), input: LogInput::Files(vec!["/nonexistent/x.log".into()]) },
        LogSource { name: "syslog".into(), input: LogInput::Command(sh("echo mine")) },
        LogSource { name: "nothing".into(), input: LogInput::Command(vec!["no-such-program-here".into()]) },
    ];
    let config = LogsConfig { sources: configured.clone(), builtin_sources: false };
    assert_eq!(sources(&config), configured);
    let listed = list(&config);
    assert_eq!(
        listed[0],
        SourceInfo {
            name: "app".into(),
            kind: "files",
            reads: vec![pattern],
            found: vec![dir.path().join("a.log").display().to_string()],
            available: true
        }
    );
    assert!(!listed[1].available && listed[1].found.is_empty());
    assert_eq!(
        (listed[2].kind, listed[2].available, listed[2].found.clone()),
        ("command", true, vec!["/bin/sh".into()])
    );
    assert!(!listed[3].available);

    let with_builtin = LogsConfig { sources: configured, builtin_sources: true };
    let names: Vec<String> = sources(&with_builtin).into_iter().map(|s| s.name).collect();
    assert_eq!(names[..5], ["app", "gone", "syslog", "nothing", "agent"]);
    assert_eq!(
        names.iter().filter(|n| *n == "syslog").count(),
        1,
        "the configured syslog replaces the built-in"
    );
    assert_eq!(source(&with_builtin, "syslog").unwrap().input, LogInput::Command(sh("echo mine")));
    let builtin = sources(&LogsConfig::default());
    assert_eq!(builtin[0].input, LogInput::Files(vec!["/var/log/syslog".into(), "/var/log/messages".into()]));
    let journal = builtin.iter().find(|s| s.name == "journal");
    assert_eq!(journal.is_some(), find_program("journalctl").is_some());
}
