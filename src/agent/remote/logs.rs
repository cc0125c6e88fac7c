//! The tunnel of `logs` (docs/protocol.md, "Logs"): the lines of the sources asked for on
//! stream 0, what happened to a source (unreadable, rotated, truncated) on stream 1, then,
//! unless following, the exit code and the End. Reading is `agent::logs`'s business; this moves
//! its lines into the tunnel as fast as the window and the connection take them and no faster:
//! a source is read again only once what it gave has gone, so a bad link holds no more than
//! `HIGH_WATER` here.

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use serde_json::{Map, Value};
use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::agent::logs::{self, CommandLog, FileLog, Query, Status};
use crate::config::{LogInput, LogSource, LogsConfig};
use crate::stream::{Message, Tunnel};
use crate::text::Printable;

/// Lines waiting for the tunnel: past this, sources are not read.
const HIGH_WATER: usize = 64 * 1024;
/// Bytes handed to the tunnel at once.
const SEND_CHUNK: usize = 16 * 1024;
/// How long a command whose output ended is given to exit, for its exit code.
const EXIT_WAIT: Duration = Duration::from_millis(100);
/// Tried in this order when the operator names no source.
const DEFAULT_SOURCES: [&str; 3] = ["syslog", "journal", "logread"];

/// What the sources of one `logs` request gave and are giving.
pub struct LogReading {
    readers: Vec<Reader>,
    follow: bool,
    /// Lines for stream 0, and notes about the sources for stream 1, not yet in the tunnel.
    lines: Vec<u8>,
    notes: Vec<u8>,
    /// What a reader gave (lines, complaints), before its label is put on each line.
    scratch: Vec<u8>,
    scratch_errors: Vec<u8>,
    /// Some source could not be read (the exit code is 1).
    failed: bool,
    /// Commands whose output ended, until they exit (SIGCHLD wakes the loop) or EXIT_WAIT is
    /// over: a command closes its pipes a moment before it can be waited for (the kernel
    /// closes a process's files first), and one that closed them and goes on (a daemon) is
    /// killed when dropped.
    exiting: Vec<Exiting>,
}

struct Exiting {
    name: String,
    command: CommandLog,
    until: Instant,
}

struct Reader {
    /// Put before each line when more than one file or command is read: `NAME: `.
    label: String,
    log: Log,
    tokens: Vec<Token>,
    /// May have something: read it (a Wait clears it, its descriptor's event sets it).
    ready: bool,
}

enum Log {
    File(FileLog),
    Command(CommandLog),
}

/// What a turn of pumping did.
pub struct Pumped {
    /// Something was read from a source.
    pub read: bool,
    /// Every source ended and everything went: the exit code (0, or 1 if a source failed).
    pub done: Option<i32>,
}

impl LogReading {
    /// Opens the sources `params` names (or the default one) for the query the params make;
    /// refused with the reason for an unknown source or a bad query. A source that exists but
    /// cannot be read is told on stream 1, not refused: the others still come.
    pub fn start(
        config: &LogsConfig,
        params: &Map<String, Value>,
        registry: &Registry,
        mut take_token: impl FnMut() -> Token,
    ) -> Result<LogReading, String> {
        let query = query(params)?;
        let sources = chosen_sources(config, params)?;
        let mut reading = LogReading {
            readers: Vec::new(),
            follow: query.follow,
            lines: Vec::new(),
            notes: Vec::new(),
            scratch: Vec::new(),
            scratch_errors: Vec::new(),
            failed: false,
            exiting: Vec::new(),
        };
        let opened: Vec<(String, Log)> =
            sources.iter().flat_map(|source| reading.open_source(source, &query)).collect();
        let labelled = opened.len() > 1;
        for (label, log) in opened {
            let tokens: Vec<Token> = log.fds().iter().map(|_| take_token()).collect();
            for (fd, token) in log.fds().iter().zip(&tokens) {
                registry
                    .register(&mut SourceFd(fd), *token, Interest::READABLE)
                    .map_err(|e| format!("cannot poll {label}: {e}"))?;
            }
            let label = if labelled { format!("{label}: ") } else { String::new() };
            reading.readers.push(Reader { label, log, tokens, ready: true });
        }
        Ok(reading)
    }

    /// The files or command of one source, each with the label its lines get; what cannot be
    /// opened is noted.
    fn open_source(&mut self, source: &LogSource, query: &Query) -> Vec<(String, Log)> {
        let name = &source.name;
        match &source.input {
            LogInput::Files(patterns) => {
                let files = logs::expand_files(patterns);
                if files.is_empty() {
                    self.fail(name, &format!("no such file ({})", patterns.join(", ")));
                }
                let several = files.len() > 1;
                let mut opened = Vec::new();
                for path in files {
                    let label = match (several, path.file_name()) {
                        (true, Some(file)) => format!("{name}/{}", file.to_string_lossy()),
                        _ => name.clone(),
                    };
                    match FileLog::open(&path, query) {
                        Ok(log) => opened.push((label, Log::File(log))),
                        Err(e) => self.fail(name, &file_error(&path, &e)),
                    }
                }
                opened
            }
            LogInput::Command(argv) => match CommandLog::spawn(argv, query) {
                Ok(log) => vec![(name.clone(), Log::Command(log))],
                Err(why) => {
                    self.fail(name, &why);
                    Vec::new()
                }
            },
        }
    }

    fn note(&mut self, label: &str, text: &str) {
        self.notes.extend_from_slice(format!("{label}: {text}\n").as_bytes());
    }

    fn fail(&mut self, label: &str, text: &str) {
        self.failed = true;
        self.note(label, text);
    }

    pub fn owns(&self, token: Token) -> bool {
        self.readers.iter().any(|r| r.tokens.contains(&token))
    }

    pub fn on_ready(&mut self, token: Token) {
        if let Some(reader) = self.readers.iter_mut().find(|r| r.tokens.contains(&token)) {
            reader.ready = true;
        }
    }

    /// Moves lines into the tunnel while its window and the connection (`may_send`) take them,
    /// reading the sources as what they gave goes out.
    pub fn pump(&mut self, tunnel: &mut Tunnel, may_send: impl Fn() -> bool, registry: &Registry) -> Pumped {
        let mut read = self.reap(Instant::now());
        loop {
            let sent =
                send(&mut self.notes, 1, tunnel, &may_send) | send(&mut self.lines, 0, tunnel, &may_send);
            let gave = self.lines.len() < HIGH_WATER && self.read_sources(registry);
            read |= gave;
            if !sent && !gave {
                break;
            }
        }
        let drained = self.lines.is_empty() && self.notes.is_empty();
        let done =
            (self.readers.is_empty() && self.exiting.is_empty() && drained).then(|| i32::from(self.failed));
        Pumped { read, done }
    }

    /// When a command that ended is let go without its exit code.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.exiting.iter().map(|e| e.until).min()
    }

    /// Notes how the commands that ended exited, once they did; whether any did (or was let go).
    fn reap(&mut self, now: Instant) -> bool {
        let before = self.exiting.len();
        let mut failures = Vec::new();
        self.exiting.retain_mut(|e| match e.command.child().try_wait() {
            Some(exit) if exit.shell_code() != 0 => {
                failures.push((e.name.clone(), format!("the command exited with {}", exit.shell_code())));
                false
            }
            Some(_) => false,
            None => now < e.until,
        });
        for (name, why) in failures {
            self.fail(&name, &why);
        }
        self.exiting.len() < before
    }

    /// One read of each source that may have something (only the first unfinished one when not
    /// following: the sources come one after the other); whether any gave lines or news.
    fn read_sources(&mut self, registry: &Registry) -> bool {
        let mut gave = false;
        let mut i = 0;
        while i < self.readers.len() {
            if !self.readers[i].ready {
                if !self.follow {
                    break;
                }
                i += 1;
                continue;
            }
            self.scratch.clear();
            self.scratch_errors.clear();
            let status = self.readers[i].log.read(&mut self.scratch, &mut self.scratch_errors);
            gave |= !self.scratch.is_empty() || !self.scratch_errors.is_empty();
            let label = &self.readers[i].label;
            labelled(label, &self.scratch, &mut self.lines);
            labelled(label, &self.scratch_errors, &mut self.notes);
            match status {
                Ok(Status::More) => {}
                Ok(Status::Wait) => self.readers[i].ready = false,
                Ok(Status::Notice(notice)) => {
                    let label = self.readers[i].name_for_notes();
                    self.note(&label, &notice.to_string());
                    gave = true;
                }
                Ok(Status::End) => {
                    let reader = self.readers.remove(i);
                    reader.deregister(registry);
                    let name = reader.name_for_notes();
                    if let Log::Command(command) = reader.log {
                        self.exiting.push(Exiting { name, command, until: Instant::now() + EXIT_WAIT });
                    }
                    gave = true;
                    continue;
                }
                Err(e) => {
                    let reader = self.readers.remove(i);
                    reader.deregister(registry);
                    self.fail(
                        &reader.name_for_notes(),
                        &format!("cannot read: {}", crate::fsutil::error_text(&e)),
                    );
                    gave = true;
                    continue;
                }
            }
            if !self.follow {
                break;
            }
            i += 1;
        }
        gave
    }

    /// The tunnel ends: the commands are stopped, the descriptors closed.
    pub fn close(&mut self, registry: &Registry) {
        for reader in self.readers.drain(..) {
            reader.deregister(registry);
        }
        self.exiting.clear();
    }
}

impl Reader {
    fn name_for_notes(&self) -> String {
        match (&self.log, self.label.is_empty()) {
            (_, false) => self.label.trim_end_matches(": ").to_string(),
            (Log::File(file), true) => file.path().display().to_string(),
            (Log::Command(_), true) => "the command".to_string(),
        }
    }

    fn deregister(&self, registry: &Registry) {
        for fd in self.log.fds() {
            let _ = registry.deregister(&mut SourceFd(&fd));
        }
    }
}

impl Log {
    /// What to poll: a follower's inotify or timer descriptor, a command's two pipes.
    fn fds(&self) -> Vec<RawFd> {
        match self {
            Log::File(file) => file.fd().into_iter().collect(),
            Log::Command(command) => command.fds().to_vec(),
        }
    }

    fn read(&mut self, out: &mut Vec<u8>, errors: &mut Vec<u8>) -> io::Result<Status> {
        match self {
            Log::File(file) => file.read(out),
            Log::Command(command) => command.read(out, errors),
        }
    }
}

/// Queues what the window and the connection take of `pending` on `stream`; whether any went.
fn send(pending: &mut Vec<u8>, stream: u32, tunnel: &mut Tunnel, may_send: &impl Fn() -> bool) -> bool {
    let mut sent = false;
    while !pending.is_empty() && tunnel.unsent() == 0 && may_send() {
        let take = pending.len().min(SEND_CHUNK);
        let taken = tunnel.send_data(stream, &pending[..take]);
        if taken == 0 {
            break;
        }
        pending.drain(..taken);
        sent = true;
    }
    sent
}

/// Appends `lines` (each ending in `\n`) to `out`, each after `label`.
fn labelled(label: &str, lines: &[u8], out: &mut Vec<u8>) {
    if label.is_empty() {
        return out.extend_from_slice(lines);
    }
    for line in lines.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(label.as_bytes());
        out.extend_from_slice(line);
    }
}

fn file_error(path: &Path, e: &io::Error) -> String {
    format!("{}: {}", path.display(), crate::fsutil::error_text(e))
}

/// `lines`, `since`, `grep`, `follow` as the operator gave them.
fn query(params: &Map<String, Value>) -> Result<Query, String> {
    let text = |name: &str| params.get(name).and_then(Value::as_str);
    let lines = params.get("lines").and_then(Value::as_u64).map(|n| n.min(usize::MAX as u64) as usize);
    let follow = params.get("follow").and_then(Value::as_bool).unwrap_or(false);
    let now = crate::agent::unix_seconds() as i64;
    Query::new(lines, text("since"), text("grep"), follow, now)
}

/// The sources named in `params.sources`, or the default: the first of `DEFAULT_SOURCES`
/// offered and available here.
fn chosen_sources(config: &LogsConfig, params: &Map<String, Value>) -> Result<Vec<LogSource>, String> {
    let offered = logs::sources(config);
    let names: Vec<&str> = params
        .get("sources")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if names.is_empty() {
        let available = logs::list(config);
        let default = DEFAULT_SOURCES
            .iter()
            .find(|name| available.iter().any(|s| s.name == **name && s.available))
            .and_then(|name| offered.iter().find(|s| s.name == *name));
        return default.cloned().map(|s| vec![s]).ok_or_else(|| {
            format!(
                "no system log found here ({}): name a source (tetherctl logs DEVICE --list)",
                DEFAULT_SOURCES.join(", ")
            )
        });
    }
    names
        .iter()
        .map(|name| {
            offered.iter().find(|s| s.name == *name).cloned().ok_or_else(|| {
                let known: Vec<&str> = offered.iter().map(|s| s.name.as_str()).collect();
                format!("no log source named {} here (the sources: {})", Printable(name), known.join(", "))
            })
        })
        .collect()
}

/// `logs --list`: the sources, as JSON (what `tetherctl logs DEVICE --list` shows).
pub fn listing(config: &LogsConfig) -> Vec<u8> {
    serde_json::to_vec(&logs::list(config)).unwrap_or_default()
}

/// Tells the tunnel that all went: Exit with the code. The caller ends the tunnel.
pub fn finish(tunnel: &mut Tunnel, code: i32) {
    tunnel.send(Message::Eof { stream: 0 });
    tunnel.send(Message::Eof { stream: 1 });
    tunnel.send(Message::Exit { code });
}
