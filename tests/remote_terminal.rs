//! The remote terminal as an operator meets it: `tetherctl shell` and `exec -t` on a terminal the
//! test owns, a real agent behind a real Mosquitto over wss (docs/protocol.md, "Tunnels").
//!
//! The terminal is a pseudo-terminal (tests/common/pty.rs): the test types on its master and
//! reads what appears there; tetherctl runs on its slave, in a session of its own whose
//! controlling terminal it is, as under a terminal emulator. Resizing the master makes the kernel send tetherctl SIGWINCH, as a
//! window resized by the user does. The agent runs on this machine, so what it started on the
//! "device" is found in /proc. Also here: the device's limits on sessions, and who the remote
//! side runs as.

mod common;

use common::pty::{end_of, Running, Terminal, TerminalSettings, PATIENCE};
use common::remote::{run_with_input, text, Setup};
use common::*;
use serde_json::json;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The operator's terminal window when tetherctl starts.
const ROWS: u16 = 30;
const COLS: u16 = 100;
/// What tetherctl exits with when the tunnel ends without the remote program's exit code.
const TUNNEL_LOST: i32 = 255;
/// What tetherctl exits with after SIGTERM, SIGINT or SIGHUP.
const INTERRUPTED: i32 = 130;

/// `tetherctl shell DEVICE` on a fresh terminal of ROWS x COLS, once the remote shell prompts;
/// with the terminal's settings from before tetherctl started.
fn open_shell(s: &Setup) -> (Terminal, Running, TerminalSettings) {
    let mut terminal = Terminal::new(ROWS, COLS);
    let before = terminal.settings();
    let tetherctl = terminal.start(s.tetherctl(&["shell", &s.device]));
    terminal.expect_prompt();
    assert!(terminal.settings().is_raw(), "tetherctl puts the local terminal in raw mode");
    (terminal, tetherctl, before)
}

/// The remote shell's pid, which it prints itself.
fn remote_shell_pid(terminal: &mut Terminal) -> u32 {
    terminal.type_keys("echo shell-pid-$$\r");
    let pid = terminal.expect_number_after("shell-pid-");
    terminal.expect_prompt();
    pid
}

/// (rows, columns) of the terminal the remote process `pid` reads, as the device's kernel has it.
fn remote_window_size(pid: u32) -> Option<(u16, u16)> {
    let path = std::fs::read_link(format!("/proc/{pid}/fd/0")).ok()?;
    let terminal = OpenOptions::new().read(true).custom_flags(libc::O_NOCTTY).open(path).ok()?;
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ fills the winsize or fails.
    let read = unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (read == 0).then_some((size.ws_row, size.ws_col))
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// (process group, the foreground process group of its terminal), from /proc/PID/stat.
fn groups_of(pid: u32) -> Option<(i64, i64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // PID (COMM) STATE PPID PGRP SESSION TTY_NR TPGID ...; COMM ends at the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(5)?.parse().ok()?))
}

/// Whether a process the agent started runs `argv` as the foreground job of its terminal: a
/// Ctrl-C typed now reaches it rather than the shell.
fn runs_in_foreground(agent: &Agent, argv: &[&str]) -> bool {
    descendants(agent.pid()).into_iter().any(|pid| {
        cmdline(pid) == argv && groups_of(pid).is_some_and(|(group, foreground)| group == foreground)
    })
}

fn runs(agent: &Agent, argv: &[&str]) -> bool {
    descendants(agent.pid()).into_iter().any(|pid| cmdline(pid) == argv)
}

/// A program on PATH, as the device's shell would find it.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// A full-screen editor to open `file` with: busybox's vi (as in CI), else vi; None when neither.
fn full_screen_editor(file: &Path) -> Option<String> {
    let file = file.display();
    if on_path("busybox").is_some() {
        return Some(format!("busybox vi {file}"));
    }
    on_path("vi").map(|_| format!("vi {file}"))
}

#[test]
fn a_shell_follows_the_window_size_passes_ctrl_c_and_exits_with_the_remote_code() {
    let s = Setup::new("dev-shell", json!({}));
    let (mut terminal, mut tetherctl, before) = open_shell(&s);

    terminal.type_keys("stty size\r");
    terminal.expect(&format!("{ROWS} {COLS}\r\n"));
    terminal.expect_prompt();

    // A resize and keys typed at once may reach the device in either order (ssh's too): the
    // window changes, and only once the device's terminal has changed with it is `stty` typed.
    let shell = remote_shell_pid(&mut terminal);
    terminal.resize(40, 120);
    let resized = wait_until(PATIENCE, || remote_window_size(shell) == Some((40, 120)));
    assert!(resized, "the device's terminal is {:?}, not 40 x 120", remote_window_size(shell));
    terminal.type_keys("stty size\r");
    terminal.expect("40 120\r\n");
    terminal.expect_prompt();

    terminal.type_keys("sleep 100\r");
    assert!(
        wait_until(PATIENCE, || runs_in_foreground(&s.agent, &["sleep", "100"])),
        "sleep 100 runs as the remote terminal's foreground job"
    );
    terminal.type_keys("\x03");
    terminal.type_keys("echo done-$((40+2))\r");
    terminal.expect("done-42");
    terminal.expect_prompt();
    assert!(!runs(&s.agent, &["sleep", "100"]), "Ctrl-C ended sleep 100");

    match full_screen_editor(&s.dir.path().join("edited")) {
        Some(editor) => {
            terminal.type_keys(&format!("{editor}\r"));
            // The alternate screen, or at least a cleared one.
            terminal.wait_for("a full screen", PATIENCE, |out| {
                ["\x1b[?1049h", "\x1b[2J", "\x1b[H\x1b[J"]
                    .iter()
                    .filter_map(|e| end_of(out, e.as_bytes()))
                    .min()
            });
            terminal.type_keys(":q!\r");
            // Not before: the editor may take keys typed ahead as its own, or discard them.
            terminal.expect_prompt();
            terminal.type_keys("echo after-vi-$((2+3))\r");
            terminal.expect("after-vi-5");
            terminal.expect_prompt();
        }
        None => eprintln!("neither busybox nor vi is installed: the full-screen step is skipped"),
    }

    terminal.type_keys("exit 7\r");
    let status = terminal.wait_exit(&mut tetherctl, PATIENCE);
    assert_eq!(status.code(), Some(7), "tetherctl exits with the shell's code; {}", terminal.rest());
    assert_eq!(terminal.settings(), before, "the terminal is as it was before tetherctl");
}

#[test]
fn tilde_dot_disconnects_restores_the_terminal_and_ends_the_remote_shell() {
    let s = Setup::new("dev-escape", json!({}));
    let (mut terminal, mut tetherctl, before) = open_shell(&s);
    let shell = remote_shell_pid(&mut terminal);
    assert!(process_exists(shell), "the remote shell {shell} runs on this machine");

    terminal.type_keys("\r~.");
    let status = terminal.wait_exit(&mut tetherctl, PATIENCE);
    assert_eq!(status.code(), Some(TUNNEL_LOST), "{}", terminal.rest());
    terminal.expect("disconnected");
    assert_eq!(terminal.settings(), before, "the terminal is as it was before tetherctl");
    assert!(wait_until(PATIENCE, || !process_exists(shell)), "the device ended the remote shell {shell}");
}

#[test]
fn sigterm_to_tetherctl_restores_the_terminal_and_ends_the_remote_shell() {
    let s = Setup::new("dev-sigterm", json!({}));
    let (mut terminal, mut tetherctl, before) = open_shell(&s);
    let shell = remote_shell_pid(&mut terminal);

    signal(tetherctl.pid(), libc::SIGTERM);
    let status = terminal.wait_exit(&mut tetherctl, PATIENCE);
    assert_eq!(status.code(), Some(INTERRUPTED), "{}", terminal.rest());
    assert_eq!(terminal.settings(), before, "the terminal is as it was before tetherctl");
    // Sooner than the will's grace (15 s): tetherctl said it was leaving.
    assert!(wait_until(PATIENCE, || !process_exists(shell)), "the device ended the remote shell {shell}");
}

#[test]
fn exec_t_runs_on_a_remote_terminal_of_the_local_size_and_returns_its_code() {
    let s = Setup::new("dev-exec-t", json!({}));
    let mut terminal = Terminal::new(ROWS, COLS);
    let before = terminal.settings();
    let args = ["exec", &s.device, "-t", "--", "sh", "-c", "stty size; exit 3"];
    let mut tetherctl = terminal.start(s.tetherctl(&args));
    let status = terminal.wait_exit(&mut tetherctl, PATIENCE);
    terminal.expect(&format!("{ROWS} {COLS}\r\n"));
    assert_eq!(status.code(), Some(3), "{}", terminal.rest());
    assert_eq!(terminal.settings(), before, "the terminal is as it was before tetherctl");
}

/// tetherctl with its stdin a pipe the test holds open and writes nothing to; its stdout and
/// stderr piped.
fn start_with_idle_stdin(mut command: Command) -> (Running, ChildStdin) {
    let mut child =
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdin = child.stdin.take().unwrap();
    (Running(child), stdin)
}

/// What tetherctl printed and how it exited, once it exits by itself within `timeout`.
fn finish_within(mut tetherctl: Running, timeout: Duration) -> Output {
    let status = wait_child(&mut tetherctl.0, timeout);
    let status = status.unwrap_or_else(|| panic!("tetherctl still runs after {timeout:?}"));
    let stdout = read_all(tetherctl.0.stdout.take());
    let stderr = read_all(tetherctl.0.stderr.take());
    Output { status, stdout, stderr }
}

fn read_all(pipe: Option<impl Read>) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Some(mut pipe) = pipe {
        pipe.read_to_end(&mut bytes).unwrap();
    }
    bytes
}

#[test]
fn a_session_idle_for_expire_after_idle_s_is_ended_by_the_device() {
    let s = Setup::new("dev-idle", json!({"expire_after_idle_s": 2}));
    let started = Instant::now();
    let (tetherctl, _stdin) = start_with_idle_stdin(s.tetherctl(&s.exec_args(&["sleep", "100"])));
    let out = finish_within(tetherctl, secs(20));
    assert_eq!(out.status.code(), Some(TUNNEL_LOST), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("expired") && stderr.contains("expire_after_idle_s"), "{stderr}");
    assert!(started.elapsed() >= secs(2), "not before 2 s of silence");
    assert!(wait_until(PATIENCE, || !runs(&s.agent, &["sleep", "100"])), "the device stopped sleep 100");
}

/// While one session is open, a second is refused with a reason naming `limit`; once the
/// first ends, a new one opens.
fn a_second_session_waits_for_the_first(s: &Setup, limit: &str) {
    let (first, first_stdin) = start_with_idle_stdin(s.tetherctl(&s.exec_args(&["cat"])));
    assert!(wait_until(PATIENCE, || runs(&s.agent, &["cat"])), "the first session is open");

    let refused = s.exec(&["echo", "second"], b"");
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(limit), "the refusal names {limit}: {stderr}");
    assert!(text(&refused.stdout).is_empty(), "nothing ran: {}", text(&refused.stdout));

    drop(first_stdin);
    let first = finish_within(first, PATIENCE);
    assert_eq!(first.status.code(), Some(0), "cat ends with its input: {}", text(&first.stderr));
    let again = s.exec(&["echo", "reopened"], b"");
    assert_eq!(text(&again.stdout), "reopened\n", "{}", text(&again.stderr));
    assert_eq!(again.status.code(), Some(0));
}

#[test]
fn max_sessions_refuses_a_second_session_until_the_first_ends() {
    let s = Setup::new("dev-max", json!({"max_sessions": 1}));
    // The parenthesis closes the reason: not max_sessions_per_key.
    a_second_session_waits_for_the_first(&s, "remote_access.max_sessions)");
}

#[test]
fn max_sessions_per_key_refuses_a_second_session_of_the_same_key_until_the_first_ends() {
    let s = Setup::new("dev-max-key", json!({"max_sessions_per_key": 1}));
    a_second_session_waits_for_the_first(&s, "remote_access.max_sessions_per_key");
}

#[test]
fn a_disabled_terminal_refuses_shell_while_exec_still_runs() {
    let s = Setup::new("dev-no-terminal", json!({"terminal": {"disable": true}}));
    let shell = run_with_input(s.tetherctl(&["shell", &s.device]), b"echo should-not-run\n");
    let stderr = text(&shell.stderr);
    assert_eq!(shell.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("shell is disabled"), "the refusal says why: {stderr}");
    assert!(!text(&shell.stdout).contains("should-not-run"), "{}", text(&shell.stdout));

    let exec = s.exec(&["echo", "exec-runs"], b"");
    assert_eq!(text(&exec.stdout), "exec-runs\n", "{}", text(&exec.stderr));
    assert_eq!(exec.status.code(), Some(0));
}

#[test]
fn commands_run_as_the_configured_terminal_user() {
    let s = Setup::new("dev-nobody", json!({"terminal": {"user": "nobody"}}));
    let out = s.exec(&["id", "-u"], b"");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let nobody = Command::new("id").args(["-u", "nobody"]).output().unwrap();
        assert_eq!(text(&out.stdout), text(&nobody.stdout), "{}", text(&out.stderr));
        assert_eq!(out.status.code(), Some(0));
    } else {
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("cannot run as user nobody") && stderr.contains("not root"), "{stderr}");
    }
}
