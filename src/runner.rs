//! Runs an external program to completion on the calling (worker) thread: heartbeat custom
//! commands, update flow `run` steps, the firewall tools. The program leads its own process
//! group (or session), and that whole group is ended when the program exits, overruns its
//! timeout or is stopped, so a background child can neither hold up the result nor outlive it.
//! The leader is only reaped after that group kill: until then its pid, which is the group id,
//! cannot be reused, so the kill never reaches a stranger.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a wait for output, for the program's end or for its group to go lasts before the
/// timeout and the stop check are looked at again.
const TICK: Duration = Duration::from_millis(50);
/// How long a killed leader may take to die before a background thread is left to reap it (a
/// process stuck in uninterruptible I/O ignores SIGKILL until the I/O ends).
const REAP_GRACE: Duration = Duration::from_secs(1);
/// How long to read what an exited program left in its pipes (see `drain`).
const DRAIN_GRACE: Duration = Duration::from_millis(100);
const SMALL_STACK: usize = 64 * 1024;

/// A program to run, and how.
pub struct Program<'a> {
    pub argv: &'a [String],
    pub env: Option<&'a BTreeMap<String, String>>,
    pub dir: Option<&'a Path>,
    pub stdin: Option<&'a [u8]>,
    pub output: Output<'a>,
    pub timeout: Option<Duration>,
    /// Asked every `TICK`; true ends the program as a timeout would.
    pub stopped: &'a dyn Fn() -> bool,
    /// A session of its own (no controlling terminal) rather than only a process group.
    pub own_session: bool,
    /// PR_SET_PDEATHSIG(SIGKILL): it dies with the thread that started it.
    pub die_with_caller: bool,
    /// Between SIGTERM and SIGKILL to its group; zero sends SIGKILL at once.
    pub kill_grace: Duration,
}

impl<'a> Program<'a> {
    /// No environment change, input, timeout or stop; its own process group, killed at once.
    pub fn new(argv: &'a [String], output: Output<'a>) -> Program<'a> {
        Program {
            argv,
            env: None,
            dir: None,
            stdin: None,
            output,
            timeout: None,
            stopped: &|| false,
            own_session: false,
            die_with_caller: false,
            kill_grace: Duration::ZERO,
        }
    }
}

/// Where the program's output goes. Captured output past `max_bytes` is read and dropped, so a
/// chatty program finishes instead of blocking on a full pipe.
pub enum Output<'a> {
    /// Stdout captured; stderr discarded.
    Stdout { max_bytes: usize },
    /// Stdout and stderr captured apart.
    StdoutAndStderr { max_bytes: usize },
    /// Stdout and stderr both written to this file, in order.
    File(&'a File),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum End {
    Exited(ExitStatus),
    TimedOut,
    Stopped,
}

#[derive(Debug)]
pub struct Finished {
    pub end: End,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs the program until it exits, times out or is stopped; then ends its group and reaps it.
/// Err only when it could not be started (or waited for).
pub fn run(program: &Program) -> io::Result<Finished> {
    let mut child = spawn(program)?;
    if let Err(e) = feed(&mut child, program.stdin) {
        signal_group(&child, libc::SIGKILL);
        reap(child);
        return Err(e);
    }
    let mut pipes = Pipes::of(&mut child, &program.output);
    let deadline = program.timeout.map(|timeout| Instant::now() + timeout);
    let end = loop {
        if let Some(status) = exit_status(&child)? {
            break End::Exited(status);
        }
        if (program.stopped)() {
            break End::Stopped;
        }
        let left = deadline.map_or(TICK, |deadline| deadline.saturating_duration_since(Instant::now()));
        if left.is_zero() {
            break End::TimedOut;
        }
        pipes.read_some(left.min(TICK));
    };
    end_group(&child, program.kill_grace, &mut pipes);
    if let End::Exited(_) = end {
        pipes.drain();
    }
    reap(child);
    let [stdout, stderr] = pipes.kept;
    Ok(Finished { end, stdout, stderr })
}

/// How a process ended: "exited with 3", "was killed by signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}{}", signal_name(signal)),
        _ => "ended".into(),
    }
}

fn signal_name(signum: libc::c_int) -> &'static str {
    match signum {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGBUS => " (SIGBUS)",
        libc::SIGILL => " (SIGILL)",
        _ => "",
    }
}

/// A thread that only copies or hashes bytes, polls or waits: it needs little stack.
pub fn spawn_small<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    thread::Builder::new().name(name.into()).stack_size(SMALL_STACK).spawn(work)
}

fn spawn(program: &Program) -> io::Result<Child> {
    let Some((name, args)) = program.argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the command is empty"));
    };
    let mut command = Command::new(name);
    command.args(args).stdin(if program.stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    if let Some(env) = program.env {
        command.envs(env);
    }
    if let Some(dir) = program.dir {
        command.current_dir(dir);
    }
    match program.output {
        Output::Stdout { .. } => command.stdout(Stdio::piped()).stderr(Stdio::null()),
        Output::StdoutAndStderr { .. } => command.stdout(Stdio::piped()).stderr(Stdio::piped()),
        Output::File(file) => command.stdout(file.try_clone()?).stderr(file.try_clone()?),
    };
    let (own_session, die_with_caller) = (program.own_session, program.die_with_caller);
    // SAFETY: setsid, setpgid and prctl are async-signal-safe, and reading errno is too;
    // nothing else runs in the child before exec.
    unsafe { command.pre_exec(move || detach(own_session, die_with_caller)) };
    command.spawn()
}

/// In the child before exec: its own group (or session), so that its group id is its pid.
fn detach(own_session: bool, die_with_caller: bool) -> io::Result<()> {
    // SAFETY: see `spawn`.
    let detached = unsafe {
        if own_session {
            libc::setsid()
        } else {
            libc::setpgid(0, 0)
        }
    };
    // SAFETY: see `spawn`.
    let orphan_dies = || unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } == 0;
    if detached < 0 || (die_with_caller && !orphan_dies()) {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes the input from a thread of its own: a program may fill its output pipe before it
/// reads all its input, and it is the caller that empties that pipe. A program that exits early
/// closes its end, which ends the write.
fn feed(child: &mut Child, input: Option<&[u8]>) -> io::Result<()> {
    let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) else { return Ok(()) };
    let input = input.to_vec();
    spawn_small("stdin-writer", move || drop(stdin.write_all(&input))).map(drop)
}

/// How the child ended, without reaping it (WNOWAIT), so its pid stays reserved; None while
/// it runs.
fn exit_status(child: &Child) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data, so all-zero is valid; waitid only writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: `info` is writable; P_PID with our own child's pid.
    if unsafe { libc::waitid(libc::P_PID, child.id(), &mut info, flags) } != 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(None) } else { Err(e) };
    }
    // SAFETY: waitid filled (or, with WNOHANG and nothing to report, left zeroed) the SIGCHLD
    // layout that si_pid and si_status read.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    let raw = match info.si_code {
        _ if pid == 0 => return Ok(None),
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => status | 0x80,
        _ => status,
    };
    Ok(Some(ExitStatus::from_raw(raw)))
}

/// Ends the child's group: SIGKILL, after SIGTERM and up to `grace` for it to go by itself.
/// Output keeps being read meanwhile, so nothing blocks on a full pipe during the grace.
fn end_group(child: &Child, grace: Duration, pipes: &mut Pipes) {
    let deadline = Instant::now() + grace;
    if !grace.is_zero() && signal_group(child, libc::SIGTERM) {
        while Instant::now() < deadline && group_lives(child.id()) {
            pipes.read_some(TICK);
        }
    }
    signal_group(child, libc::SIGKILL);
}

/// Only while `child` is unreaped: its pid, the group id, is then still ours.
fn signal_group(child: &Child, signal: libc::c_int) -> bool {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(-(child.id() as libc::pid_t), signal) == 0 }
}

/// Whether a process that is no zombie is still in `group`. Read from /proc, as the unreaped
/// leader makes `kill(-group, 0)` succeed to the end; without /proc it counts as alive.
fn group_lives(group: u32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else { return true };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .any(|pid| live_member(pid, group))
}

/// "PID (COMM) STATE PPID PGRP ...": COMM may hold spaces and parentheses, so the fields start
/// after the last ')'.
fn live_member(pid: u32, group: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let Some((_, fields)) = stat.rsplit_once(')') else { return false };
    let mut fields = fields.split_whitespace();
    let alive = !matches!(fields.next(), Some("Z" | "X"));
    alive && fields.nth(1).and_then(|pgrp| pgrp.parse().ok()) == Some(group)
}

/// Waits for the killed leader; one that does not die within REAP_GRACE is left to a
/// background thread, so a process stuck in the kernel cannot stall the caller but is still
/// reaped.
fn reap(mut child: Child) {
    let give_up = Instant::now() + REAP_GRACE;
    while let Ok(None) = child.try_wait() {
        if Instant::now() >= give_up {
            log::warn!("program {} did not die after SIGKILL; reaping it in the background", child.id());
            if let Err(e) = spawn_small("reaper", move || child.wait()) {
                log::warn!("cannot start a reaper thread: {e}");
            }
            return;
        }
        thread::sleep(TICK);
    }
}

/// The program's stdout and stderr pipes (None: not piped, or closed) and what was kept of each.
struct Pipes {
    pipes: [Option<File>; 2],
    kept: [Vec<u8>; 2],
    max_bytes: usize,
}

impl Pipes {
    fn of(child: &mut Child, output: &Output) -> Pipes {
        let max_bytes = match output {
            Output::Stdout { max_bytes } | Output::StdoutAndStderr { max_bytes } => *max_bytes,
            Output::File(_) => 0,
        };
        let file = |fd: Option<OwnedFd>| fd.map(File::from);
        let pipes = [file(child.stdout.take().map(Into::into)), file(child.stderr.take().map(Into::into))];
        Pipes { pipes, kept: [Vec::new(), Vec::new()], max_bytes }
    }

    /// Waits up to `wait` for output and reads what is there (just waits when no pipe is open);
    /// whether anything was read.
    fn read_some(&mut self, wait: Duration) -> bool {
        // poll skips a negative fd: that of a closed pipe.
        let mut fds = self.pipes.each_ref().map(|pipe| libc::pollfd {
            fd: pipe.as_ref().map_or(-1, |pipe| pipe.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        });
        if fds.iter().all(|fd| fd.fd < 0) {
            thread::sleep(wait);
            return false;
        }
        let millis = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) } <= 0 {
            return false;
        }
        (0..fds.len()).filter(|&i| fds[i].revents != 0).fold(false, |read, i| self.read_ready(i) | read)
    }

    /// Reads once from a ready pipe; whether that gave data.
    fn read_ready(&mut self, i: usize) -> bool {
        let Some(pipe) = self.pipes[i].as_mut() else { return false };
        let mut chunk = [0u8; 8192];
        match pipe.read(&mut chunk) {
            Ok(0) => self.pipes[i] = None,
            Ok(n) => {
                let room = self.max_bytes.saturating_sub(self.kept[i].len());
                self.kept[i].extend_from_slice(&chunk[..n.min(room)]);
                return true;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.pipes[i] = None,
        }
        false
    }

    /// Reads what an exited program left. Its group is dead by now, so that is at most a pipe
    /// buffer each; the time limit only guards against a writer that left the group.
    fn drain(&mut self) {
        let give_up = Instant::now() + DRAIN_GRACE;
        while Instant::now() < give_up && self.read_some(Duration::ZERO) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|word| word.to_string()).collect()
    }

    fn sh(script: &str) -> Vec<String> {
        argv(&["sh", "-c", script])
    }

    fn captured(max_bytes: usize) -> Output<'static> {
        Output::Stdout { max_bytes }
    }

    /// The process whose pid a script printed has been killed: gone, or a zombie awaiting its
    /// new parent.
    fn killed(printed_pid: &[u8]) -> bool {
        let pid: u32 = String::from_utf8_lossy(printed_pid).trim().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.rsplit_once(')').is_none_or(|(_, fields)| fields.trim_start().starts_with('Z')) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn exit_of(finished: &Finished) -> ExitStatus {
        match finished.end {
            End::Exited(status) => status,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn captured_output_is_bounded_and_the_rest_still_read() {
        let argv = argv(&["seq", "1", "100000"]);
        let finished = run(&Program::new(&argv, captured(10))).unwrap();
        assert_eq!(finished.stdout, b"1\n2\n3\n4\n5\n");
        assert!(exit_of(&finished).success());
    }

    #[test]
    fn an_exit_kills_a_background_child_that_holds_stdout_at_once() {
        let argv = sh("sleep 100 & echo $!");
        let started = Instant::now();
        let finished = run(&Program::new(&argv, captured(100))).unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        assert!(exit_of(&finished).success());
        assert!(killed(&finished.stdout));
    }

    #[test]
    fn a_timeout_kills_the_whole_group_at_once_or_as_soon_as_sigterm_ended_it() {
        let argv = sh("sleep 100 & echo $!; sleep 100");
        for (own_session, kill_grace) in [(false, Duration::ZERO), (true, Duration::from_secs(5))] {
            let program = Program {
                timeout: Some(Duration::from_millis(300)),
                own_session,
                kill_grace,
                ..Program::new(&argv, captured(100))
            };
            let started = Instant::now();
            let finished = run(&program).unwrap();
            assert_eq!(finished.end, End::TimedOut);
            assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
            assert!(killed(&finished.stdout));
        }
    }

    #[test]
    fn a_stop_check_ends_it() {
        let argv = argv(&["sleep", "100"]);
        let started = Instant::now();
        let stop = || started.elapsed() > Duration::from_millis(200);
        let program = Program { stopped: &stop, ..Program::new(&argv, captured(0)) };
        assert_eq!(run(&program).unwrap().end, End::Stopped);
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn input_larger_than_a_pipe_buffer_goes_through_cat_without_deadlock() {
        let input: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let argv = argv(&["cat"]);
        let program = Program {
            stdin: Some(&input),
            timeout: Some(Duration::from_secs(10)),
            ..Program::new(&argv, captured(usize::MAX))
        };
        let finished = run(&program).unwrap();
        assert!(exit_of(&finished).success());
        assert!(finished.stdout == input, "{} bytes back", finished.stdout.len());
    }

    #[test]
    fn exit_wording() {
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exited with 3");
        assert_eq!(describe(ExitStatus::from_raw(libc::SIGKILL)), "was killed by signal 9 (SIGKILL)");
        let unnamed = libc::SIGUSR1;
        assert_eq!(describe(ExitStatus::from_raw(unnamed)), format!("was killed by signal {unnamed}"));
        let argv = sh("kill -9 $$");
        let finished = run(&Program::new(&argv, captured(0))).unwrap();
        assert_eq!(describe(exit_of(&finished)), "was killed by signal 9 (SIGKILL)");
        let argv = sh("echo out; echo err >&2; exit 3");
        let finished = run(&Program::new(&argv, Output::StdoutAndStderr { max_bytes: 100 })).unwrap();
        assert_eq!((finished.stdout.as_slice(), finished.stderr.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
        assert_eq!(describe(exit_of(&finished)), "exited with 3");
        let empty = run(&Program::new(&[], captured(0))).unwrap_err();
        assert_eq!(empty.to_string(), "the command is empty");
    }
}
