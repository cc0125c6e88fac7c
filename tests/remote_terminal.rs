//! The remote terminal as an operator meets it: `tetherctl shell` and `exec -t` on a terminal the
//! test owns, a real agent behind a real Mosquitto over wss (docs/protocol.md, "Tunnels").
//!
//! The terminal is a pseudo-terminal: the test types on its master and reads what appears there;
//! tetherctl runs on its slave, in a session of its own whose controlling terminal it is, as
//! under a terminal emulator. Resizing the master makes the kernel send tetherctl SIGWINCH, as a
//! window resized by the user does. The agent runs on this machine, so what it started on the
//! "device" is found in /proc. Also here: the device's limits on sessions, and who the remote
//! side runs as.

mod common;

use common::remote::{run_with_input, text, Setup};
use common::*;
use serde_json::json;
use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Output the remote side owes us: a round trip through the broker, on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(10);
/// The operator's terminal window when tetherctl starts.
const ROWS: u16 = 30;
const COLS: u16 = 100;
/// What tetherctl exits with when the tunnel ends without the remote program's exit code.
const TUNNEL_LOST: i32 = 255;
/// What tetherctl exits with after SIGTERM, SIGINT or SIGHUP.
const INTERRUPTED: i32 = 130;

/// A pseudo-terminal standing in for the operator's terminal window.
struct Terminal {
    master: OwnedFd,
    slave: OwnedFd,
    /// Everything read from the master, and how much of it `wait_for` has matched already.
    output: Vec<u8>,
    matched: usize,
}

/// A terminal's settings, comparable: what raw mode changes and must change back.
#[derive(Debug, PartialEq, Eq)]
struct TerminalSettings {
    input: libc::tcflag_t,
    output: libc::tcflag_t,
    control: libc::tcflag_t,
    local: libc::tcflag_t,
    characters: [libc::cc_t; libc::NCCS],
    speeds: (libc::speed_t, libc::speed_t),
}

impl TerminalSettings {
    fn is_raw(&self) -> bool {
        self.local & (libc::ICANON | libc::ECHO | libc::ISIG) == 0
    }
}

impl Terminal {
    fn new(rows: u16, cols: u16) -> Terminal {
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: openpty writes two descriptors, which the OwnedFds then own; it reads `size`.
        let (master, slave) = unsafe {
            let opened =
                libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size);
            assert_eq!(opened, 0, "openpty: {}", io::Error::last_os_error());
            (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave))
        };
        // Tests run in parallel: a process another test spawns must not inherit the terminal (it
        // would hold it open, and the kernel would not see tetherctl's leave it).
        for fd in [&master, &slave] {
            // SAFETY: fcntl on a descriptor we own, with a flag argument only.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        Terminal { master, slave, output: Vec::new(), matched: 0 }
    }

    /// Starts `command` on the terminal: its stdin, stdout and stderr, and its controlling
    /// terminal in a session of its own, so that the kernel signals it as a terminal does.
    fn start(&self, mut command: Command) -> Running {
        let slave = || Stdio::from(self.slave.try_clone().unwrap());
        // The device's terminal is of this type: one every full-screen program knows.
        command.stdin(slave()).stdout(slave()).stderr(slave()).env("TERM", "xterm");
        // SAFETY: between fork and exec, only async-signal-safe calls that allocate nothing.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
        Running(command.spawn().expect("tetherctl starts"))
    }

    /// The settings as tetherctl, on the slave side, has them.
    fn settings(&self) -> TerminalSettings {
        // SAFETY: tcgetattr fills the zeroed termios or fails; cfget*speed only read it.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(self.slave.as_raw_fd(), &mut t), 0, "tcgetattr");
            TerminalSettings {
                input: t.c_iflag,
                output: t.c_oflag,
                control: t.c_cflag,
                local: t.c_lflag,
                characters: t.c_cc,
                speeds: (libc::cfgetispeed(&t), libc::cfgetospeed(&t)),
            }
        }
    }

    /// The user resizes the window: the kernel sends SIGWINCH to the terminal's foreground group.
    fn resize(&self, rows: u16, cols: u16) {
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize, which `size` is.
        assert_eq!(unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) }, 0);
    }

    /// Keys typed, as the terminal sends them (Enter is `\r`).
    fn type_keys(&self, keys: &str) {
        let mut rest = keys.as_bytes();
        while !rest.is_empty() {
            // SAFETY: writing from a buffer of the given length.
            let n = unsafe { libc::write(self.master.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            assert!(n > 0, "typing on the terminal: {}", io::Error::last_os_error());
            rest = &rest[n as usize..];
        }
    }

    /// Reads what the terminal shows, waiting up to `timeout` for something to come.
    fn read_some(&mut self, timeout: Duration) {
        let mut poll_fd = libc::pollfd { fd: self.master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll_fd, 1, timeout.as_millis() as libc::c_int) } <= 0 {
            return;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a buffer of its own length; poll said it will not block.
        let n = unsafe { libc::read(self.master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            self.output.extend_from_slice(&buf[..n as usize]);
        }
    }

    /// Reads until `find` locates `what` in the output not matched yet (returning where it
    /// ends); returns that output up to there. Panics with the output after `timeout`.
    fn wait_for(&mut self, what: &str, timeout: Duration, find: impl Fn(&[u8]) -> Option<usize>) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let unmatched = &self.output[self.matched..];
            if let Some(end) = find(unmatched) {
                let seen = text(&unmatched[..end]);
                self.matched += end;
                return seen;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the terminal never showed {what} in {timeout:?}; it shows: {unmatched:?}",
                unmatched = text(unmatched)
            );
            self.read_some(left.min(Duration::from_millis(200)));
        }
    }

    fn expect(&mut self, needle: &str) -> String {
        self.wait_for(&format!("{needle:?}"), PATIENCE, |out| end_of(out, needle.as_bytes()))
    }

    /// A shell prompt, waiting for input: the output ends with `$ ` or `# `.
    fn expect_prompt(&mut self) {
        self.wait_for("a shell prompt", PATIENCE, |out| {
            (out.ends_with(b"$ ") || out.ends_with(b"# ")).then_some(out.len())
        });
    }

    /// The number printed right after `marker` (`marker` followed by digits).
    fn expect_number_after(&mut self, marker: &str) -> u32 {
        let found = self.wait_for(&format!("{marker:?} and a number"), PATIENCE, |out| {
            let start = out.windows(marker.len()).enumerate().find_map(|(i, w)| {
                (w == marker.as_bytes() && out.get(i + marker.len()).is_some_and(u8::is_ascii_digit))
                    .then_some(i + marker.len())
            })?;
            let digits = out[start..].iter().take_while(|b| b.is_ascii_digit()).count();
            // Only once the number is whole: something that is not a digit follows it.
            (start + digits < out.len()).then_some(start + digits)
        });
        found.rsplit_once(marker).unwrap().1.parse().unwrap()
    }

    /// Waits for tetherctl to exit, reading the terminal meanwhile (a full terminal would hold
    /// its last words back).
    fn wait_exit(&mut self, tetherctl: &mut Running, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = tetherctl.0.try_wait().unwrap() {
                self.read_some(Duration::ZERO);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tetherctl still runs after {timeout:?}; the terminal shows: {:?}",
                text(&self.output[self.matched..])
            );
            self.read_some(Duration::from_millis(50));
        }
    }

    /// Everything shown that no `wait_for` matched yet.
    fn rest(&self) -> String {
        text(&self.output[self.matched..])
    }
}

/// Where `needle` first ends in `haystack`.
fn end_of(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle).map(|i| i + needle.len())
}

/// tetherctl, killed should the test end before it does (in a session of its own, nothing
/// else would stop it).
struct Running(Child);

impl Running {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

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
