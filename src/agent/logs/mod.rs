//! Log sources for `tetherctl logs` (issue 10): the files and commands named in `logs.sources`
//! and the built-in ones, read with the operator's bounds applied on the device, so that a bad
//! link carries only the lines asked for.
//!
//! A query (`Query`: `-n`, `--since`, `--grep`, `-f`) is read from a source's files
//! (`expand_files`, then a `FileLog` for each) or from its command (`CommandLog`). Both hand out
//! lines the same way: `read(&mut out)` appends complete lines, each ending in `\n`, and says
//! what next (`Status`): More (call again), Wait (until the descriptor from `fd`/`fds`,
//! registered readable with the event loop, is ready), End, or a Notice about the file. Nothing
//! here blocks but reading a regular file; nothing spins while a followed log is quiet.

mod command;
mod file;
mod glob;
mod lines;
mod tail;
mod time;
mod watch;

use serde::Serialize;
use std::fmt;
use std::path::Path;

use crate::config::{LogInput, LogSource, LogsConfig};

pub use command::{command_argv, find_program, CommandLog};
pub use file::FileLog;
pub use glob::expand as expand_files;
pub use lines::Grep;
pub use time::Since;
pub use watch::{Watching, POLL_INTERVAL};

/// Longest line given whole; the rest of a longer one is cut, and the line says how much.
pub const LINE_MAX: usize = 16 * 1024;

/// Where the init script sends the agent's output (init.d/tether-agent, LOGFILE).
pub const AGENT_LOG: &str = "/var/log/tether-agent.log";
const SYSLOG_FILES: [&str; 2] = ["/var/log/syslog", "/var/log/messages"];
const JOURNAL: [&str; 4] = ["journalctl", "-o", "short", "--no-pager"];
const AGENT_JOURNAL: [&str; 6] = ["journalctl", "-u", "tether-agent", "-o", "short", "--no-pager"];

/// What the operator asked for.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// `-n`: the last N lines (that `grep` keeps); None: all.
    pub lines: Option<usize>,
    pub since: Option<Since>,
    pub grep: Option<Grep>,
    /// `-f`: go on with what is written next.
    pub follow: bool,
}

impl Query {
    /// From the operator's words: `since` as `Since::parse` takes it (a time ago counts from
    /// `now`, unix seconds), `grep` a regular expression. The error says which is wrong.
    pub fn new(
        lines: Option<usize>,
        since: Option<&str>,
        grep: Option<&str>,
        follow: bool,
        now: i64,
    ) -> Result<Query, String> {
        Ok(Query {
            lines,
            since: since.map(|text| Since::parse(text, now)).transpose()?,
            grep: grep.map(Grep::new).transpose()?,
            follow,
        })
    }
}

/// What a `read` found, besides the lines it appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// There may be more at once: read again.
    More,
    /// Nothing more until the descriptor is ready.
    Wait,
    /// All of it was given (not following, or the command ended).
    End,
    /// Something happened to the file being followed; the lines before it were given.
    Notice(Notice),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The file got shorter: read again from its start.
    Truncated,
    /// The path names another file (rotated, or deleted and made again): read from its start.
    Replaced,
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Notice::Truncated => "file truncated, reading it from its start",
            Notice::Replaced => "file replaced (rotated or recreated), reading the new one from its start",
        })
    }
}

/// The sources offered now: the configured ones, then the built-in ones not configured by
/// name (unless `builtin_sources` is false). Built-in: `syslog` (/var/log/syslog and
/// /var/log/messages, those that exist), `agent` (the init script's log file; under systemd
/// without that file, the unit's journal), `logread` and `journal` when the program is there.
pub fn sources(config: &LogsConfig) -> Vec<LogSource> {
    let mut sources = config.sources.clone();
    if config.builtin_sources {
        let builtin = builtin_sources().into_iter();
        sources.extend(builtin.filter(|b| !config.sources.iter().any(|s| s.name == b.name)));
    }
    sources
}

/// The source of that name, if it is offered.
pub fn source(config: &LogsConfig, name: &str) -> Option<LogSource> {
    sources(config).into_iter().find(|s| s.name == name)
}

fn builtin_sources() -> Vec<LogSource> {
    let mut builtin = vec![files_source("syslog", &SYSLOG_FILES), agent_source()];
    if find_program("logread").is_some() {
        builtin.push(command_source("logread", &["logread"]));
    }
    if find_program("journalctl").is_some() {
        builtin.push(command_source("journal", &JOURNAL));
    }
    builtin
}

fn agent_source() -> LogSource {
    let systemd = Path::new("/run/systemd/system").is_dir();
    if systemd && !Path::new(AGENT_LOG).exists() && find_program("journalctl").is_some() {
        return command_source("agent", &AGENT_JOURNAL);
    }
    files_source("agent", &[AGENT_LOG])
}

fn files_source(name: &str, files: &[&str]) -> LogSource {
    LogSource { name: name.into(), input: LogInput::Files(files.iter().map(|f| f.to_string()).collect()) }
}

fn command_source(name: &str, argv: &[&str]) -> LogSource {
    LogSource { name: name.into(), input: LogInput::Command(argv.iter().map(|a| a.to_string()).collect()) }
}

/// A line of `tetherctl logs DEV --list`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SourceInfo {
    pub name: String,
    /// `files` or `command`.
    pub kind: &'static str,
    /// The file patterns, or the argv.
    pub reads: Vec<String>,
    /// The files that exist now, or the program found.
    pub found: Vec<String>,
    pub available: bool,
}

pub fn list(config: &LogsConfig) -> Vec<SourceInfo> {
    sources(config).into_iter().map(describe).collect()
}

fn describe(source: LogSource) -> SourceInfo {
    let (kind, reads, found) = match source.input {
        LogInput::Files(patterns) => {
            let found: Vec<String> =
                expand_files(&patterns).iter().map(|f| f.display().to_string()).collect();
            ("files", patterns, found)
        }
        LogInput::Command(argv) => {
            let program = argv.first().and_then(|p| find_program(p));
            ("command", argv, program.iter().map(|p| p.display().to_string()).collect())
        }
    };
    SourceInfo { name: source.name, kind, available: !found.is_empty(), reads, found }
}

#[cfg(test)]
mod tests;
