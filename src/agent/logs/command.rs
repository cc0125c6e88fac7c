//! Command sources: a program whose output is the log (busybox `logread`, `journalctl`, or the
//! user's own), run without a shell on pipes (`spawn_pipes`). For `logread` and `journalctl` the
//! query's `-f`, `-n` and `--since` become options of their own (`command_argv`). The device
//! applies `--grep` to every command, `--since` (on the lines' times) where the program cannot,
//! and, when not following, `-n` by keeping the last lines while the output comes. What the
//! program writes on stderr comes through as lines too, unfiltered: it says why nothing came.
//!
//! The caller ends a command that follows by terminating its group (`child().terminate()`), or
//! by dropping the CommandLog, which kills and reaps it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::lines::{put_line, LineFilter, LineSplitter};
use super::{Query, Status};
use crate::agent::remote::process::{read_nonblocking, spawn_pipes, Child, PipeChild};

/// Bytes of output read per `read` call, from each pipe.
const CHUNK: usize = 16 * 1024;
/// `-n` on a command that cannot be asked for it: at most this much of its last lines is kept.
const TAIL_BYTES: usize = 1024 * 1024;
/// Where programs are looked for after PATH (an init script's PATH may lack the sbin ones).
const PROGRAM_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// The argv to run for a command source and a query. A `-f` already in the source's argv of
/// `logread` or `journalctl` is dropped: following is the query's to ask for.
pub fn command_argv(argv: &[String], query: &Query) -> Vec<String> {
    let mut argv = argv.to_vec();
    let program = program_name(&argv).map(str::to_string);
    match program.as_deref() {
        Some("journalctl") => {
            argv.retain(|arg| arg != "-f" && arg != "--follow");
            argv.extend(journalctl_options(query));
        }
        Some("logread") => {
            argv.retain(|arg| arg != "-f" && arg != "-F");
            // -F shows the (small) buffer, then follows; -f only what comes.
            if query.follow {
                argv.push(if query.lines == Some(0) { "-f" } else { "-F" }.into());
            }
        }
        _ => {}
    }
    argv
}

/// With `--grep`, `-n` counts kept lines, so journalctl is not asked for N lines then; except
/// when following, where the device cannot tell its history from what comes next.
fn journalctl_options(query: &Query) -> Vec<String> {
    let mut options = Vec::new();
    if query.follow {
        options.push("-f".to_string());
    }
    match query.lines {
        Some(n) if query.follow || query.grep.is_none() => options.extend(["-n".into(), n.to_string()]),
        None if query.follow => options.extend(["-n".into(), "all".into()]),
        _ => {}
    }
    if let Some(since) = query.since {
        options.extend(["--since".into(), format!("@{}", since.unix())]);
    }
    options
}

fn program_name(argv: &[String]) -> Option<&str> {
    let program = Path::new(argv.first()?);
    program.file_name()?.to_str()
}

/// Where `program` is: itself when it has a `/`, else the first executable file of that name
/// in PATH, then in the usual bin and sbin directories.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let executable =
        |path: &Path| path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| executable(p));
    }
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path_dirs).chain(PROGRAM_DIRS.iter().map(PathBuf::from));
    dirs.map(|dir| dir.join(program)).find(|candidate| executable(candidate))
}

/// A running command source.
#[derive(Debug)]
pub struct CommandLog {
    pipes: PipeChild,
    stdout: Output,
    stderr: Output,
    filter: LineFilter,
    /// Not following, with `-n`: the last lines, given when the output ends.
    tail: Option<TailLines>,
    chunk: Vec<u8>,
}

#[derive(Debug, Default)]
struct Output {
    lines: LineSplitter,
    ended: bool,
}

impl CommandLog {
    /// Starts `argv` (a source's command) for `query`, as the agent's user, with English month
    /// names in its times (LC_TIME=C) so that `--since` can read them.
    pub fn spawn(argv: &[String], query: &Query) -> Result<CommandLog, String> {
        let mut argv = command_argv(argv, query);
        let program = argv.first().ok_or("the command is empty")?;
        if let Some(found) = find_program(program) {
            argv[0] = found.to_string_lossy().into_owned();
        }
        let mut pipes = spawn_pipes(&argv, &[("LC_TIME".into(), "C".into())], None)?;
        pipes.close_stdin();
        let native_since = program_name(&argv) == Some("journalctl");
        let since = query.since.filter(|_| !native_since);
        let tail = query.lines.filter(|_| !query.follow).map(TailLines::new);
        Ok(CommandLog {
            pipes,
            stdout: Output::default(),
            stderr: Output::default(),
            filter: LineFilter::new(since, query.grep.clone()),
            tail,
            chunk: vec![0; CHUNK],
        })
    }

    /// Its stdout and stderr, to register (readable) with the event loop.
    pub fn fds(&self) -> [RawFd; 2] {
        [self.pipes.stdout.as_raw_fd(), self.pipes.stderr.as_raw_fd()]
    }

    /// To terminate it, or learn how it ended once `read` says End.
    pub fn child(&mut self) -> &mut Child {
        &mut self.pipes.child
    }

    /// Appends the next lines of its output to `out` and of its complaints (stderr, neither
    /// filtered nor cut to `-n`) to `errors`, each ending in `\n`: More (call again), Wait (for
    /// a descriptor), End (both pipes closed and everything given).
    pub fn read(&mut self, out: &mut Vec<u8>, errors: &mut Vec<u8>) -> io::Result<Status> {
        let (filter, tail) = (&mut self.filter, &mut self.tail);
        let from_stderr = read_some(&self.pipes.stderr, &mut self.stderr, &mut self.chunk, |text, cut| {
            put_line(errors, text, cut)
        })?;
        let from_stdout = read_some(&self.pipes.stdout, &mut self.stdout, &mut self.chunk, |text, cut| {
            if filter.keep(text) {
                match tail {
                    Some(tail) => tail.push(text, cut),
                    None => put_line(out, text, cut),
                }
            }
        })?;
        if from_stderr || from_stdout {
            return Ok(Status::More);
        }
        if !self.stdout.ended || !self.stderr.ended {
            return Ok(Status::Wait);
        }
        let gave = self.tail.as_mut().is_some_and(|tail| tail.give(out, CHUNK));
        Ok(if gave { Status::More } else { Status::End })
    }
}

/// Reads what one pipe has (up to a chunk) into lines; whether anything came or ended.
fn read_some(
    pipe: &OwnedFd,
    output: &mut Output,
    chunk: &mut [u8],
    mut line: impl FnMut(&[u8], u64),
) -> io::Result<bool> {
    if output.ended {
        return Ok(false);
    }
    match read_nonblocking(pipe, chunk) {
        Ok(0) => {
            output.ended = true;
            output.lines.finish(line);
            Ok(true)
        }
        Ok(read) => {
            output.lines.push(&chunk[..read], &mut line);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// The last `wanted` lines, of at most TAIL_BYTES in all, each as it will be given.
#[derive(Debug)]
struct TailLines {
    lines: VecDeque<Vec<u8>>,
    wanted: usize,
    bytes: usize,
}

impl TailLines {
    fn new(wanted: usize) -> TailLines {
        TailLines { lines: VecDeque::new(), wanted, bytes: 0 }
    }

    fn push(&mut self, text: &[u8], cut: u64) {
        let mut line = Vec::with_capacity(text.len() + 1);
        put_line(&mut line, text, cut);
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > self.wanted || self.bytes > TAIL_BYTES {
            let dropped = self.lines.pop_front().map_or(0, |line| line.len());
            self.bytes -= dropped;
        }
    }

    /// Moves lines to `out`, about `max` bytes of them; whether there were any.
    fn give(&mut self, out: &mut Vec<u8>, max: usize) -> bool {
        let start = out.len();
        while out.len() - start < max {
            let Some(line) = self.lines.pop_front() else { break };
            self.bytes -= line.len();
            out.extend_from_slice(&line);
        }
        out.len() > start
    }
}
