//! `tetherctl ls`, `get` and `put` (docs/protocol.md, "Files"), like scp through the broker.
//!
//! get writes to a temp file next to LOCAL (`.NAME.tether-part`), checks the whole file's
//! sha256 against the device's Report and only then renames it over LOCAL: a mismatch leaves
//! nothing under LOCAL. To stdout (`-`) the file waits in memory until verified. put reads
//! stdin (`-`) whole first, for its size and sha256. A link that breaks mid-transfer is
//! resumed within `--timeout` (default 60 s): get asks for the bytes after those in its temp
//! file, put goes on from the offset the device reports. The --json summary's `resumed_from`
//! is where the transfer that finished started: the bytes already there (a temp file from an
//! earlier run, or what a broken tunnel had moved), 0 when none were.
//! Directories are refused: get and put take files (there is no recursive copy).

use serde_json::{json, Map, Value};
use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tether::agent::files::sha256_prefix;
use tether::stream::endpoint::{Endpoint, Endpoints, OnEof};
use tether::stream::Message;

use crate::settings::Settings;
use crate::tunnel::{self, Link, Step};
use crate::{exit, Failure};

/// How long a broken transfer is retried when `--timeout` names no time.
const DEFAULT_RETRY: Duration = Duration::from_secs(60);
/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// What `get` and `put` were asked.
#[derive(Debug, PartialEq)]
pub struct Copy {
    pub device: String,
    pub remote: String,
    /// None: stdin or stdout (`-`).
    pub local: Option<PathBuf>,
    pub json: bool,
    pub timeout: Option<Duration>,
}

/// How one tunnel of a transfer ended.
enum Outcome {
    /// The device's Report, then its End without a reason.
    Done(Value),
    /// The device ended it with this reason (its own error: not retried).
    Failed(String),
    /// The link broke: worth a retry.
    Broken(String),
}

pub fn ls(settings: &Settings, device: &str, path: &str, as_json: bool) -> Result<u8, Failure> {
    let entries = listing(settings, device, "ls", params(&[("path", json!(path))]))?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&entries).unwrap_or_default());
    } else {
        entries.iter().for_each(|entry| println!("{}", ls_line(entry)));
    }
    Ok(exit::SUCCESS)
}

/// The JSON list an op (`ls`, `logs --list`) sends on stream 0.
pub fn listing(
    settings: &Settings,
    device: &str,
    op: &str,
    params: Map<String, Value>,
) -> Result<Vec<Value>, Failure> {
    let link = tunnel::open(settings, device, op, params)?;
    let mut listing = memory_file()?;
    match receive(link, &listing, &mut Progress::off())? {
        Outcome::Done(_) => {}
        Outcome::Failed(why) | Outcome::Broken(why) => {
            return Err(Failure::error(format!("{device}: {why}")))
        }
    }
    let mut text = String::new();
    listing.seek(SeekFrom::Start(0)).and_then(|_| listing.read_to_string(&mut text)).map_err(local_error)?;
    serde_json::from_str(&text).map_err(|e| Failure::error(format!("a listing that is not JSON: {e}")))
}

/// `-rw-r--r-- root root 1234 2024-05-01 12:00 name -> link`, like ls -l.
fn ls_line(entry: &Value) -> String {
    let text = |name: &str| entry.get(name).and_then(Value::as_str).unwrap_or("");
    let number = |name: &str| entry.get(name).and_then(Value::as_u64).unwrap_or(0);
    let kind = match text("kind") {
        "dir" => 'd',
        "symlink" => 'l',
        "file" => '-',
        _ => '?',
    };
    let mtime = entry.get("mtime").and_then(Value::as_i64).unwrap_or(0);
    let link = entry.get("link").and_then(Value::as_str).map(|l| format!(" -> {l}")).unwrap_or_default();
    format!(
        "{kind}{} {:<8} {:<8} {:>10} {} {}{link}",
        mode_text(number("mode") as u32),
        text("owner"),
        text("group"),
        number("size"),
        utc_minute(mtime),
        text("name"),
    )
}

/// `2024-05-01 12:00` (UTC) for seconds since the epoch, as ls -l shows a time.
fn utc_minute(secs: i64) -> String {
    let rfc3339 = tether::logging::utc_time(secs.max(0) as u64);
    rfc3339.get(..16).unwrap_or(&rfc3339).replace('T', " ")
}

/// `rwxr-xr-x` with setuid, setgid and sticky as ls shows them.
fn mode_text(mode: u32) -> String {
    let mut out = String::new();
    for (shift, special, mark) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = (mode >> shift) & 7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => mark,
            (false, true) => mark.to_ascii_uppercase(),
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    out
}

pub fn get(settings: &Settings, req: &Copy) -> Result<u8, Failure> {
    let started = Instant::now();
    let target = req.local.as_ref().map(|local| target_path(local, &req.remote));
    let temp_path = target.as_ref().map(|t| part_path(t));
    let temp = match &temp_path {
        Some(path) => {
            OpenOptions::new().create(true).append(true).read(true).open(path).map_err(local_error)?
        }
        None => memory_file()?,
    };
    let mut retry_until = None;
    let mut resumed_from;
    let (answer, report) = loop {
        let offset = temp.metadata().map_err(local_error)?.len();
        resumed_from = offset;
        let mut params = params(&[("path", json!(req.remote))]);
        params.insert("offset".into(), json!(offset));
        let link = match open_again(settings, &req.device, "get", params, retry_until) {
            Ok(link) => link,
            Err(failure) => {
                remove_if_fresh(&temp_path, retry_until.is_none() && offset == 0);
                return Err(directory_refusal(failure, "get"));
            }
        };
        let answer = link.answer.clone();
        let size = answer.get("size").and_then(Value::as_u64).unwrap_or(0);
        let mut progress = Progress::new(size, offset, req.json);
        match receive(link, &temp, &mut progress)? {
            Outcome::Done(report) => break (answer, report),
            Outcome::Failed(why) => return Err(discard(&temp_path, format!("{}: {why}", req.device))),
            Outcome::Broken(why) => {
                let until = *retry_until.get_or_insert(Instant::now() + req.timeout.unwrap_or(DEFAULT_RETRY));
                if Instant::now() >= until {
                    return Err(Failure::error(format!("{why}; gave up (--timeout)")));
                }
                eprintln!("tetherctl: {why}; resuming");
            }
        }
    };
    let size = temp.metadata().map_err(local_error)?.len();
    let sha256 = sha256_of(&temp)?;
    let expected = report.get("sha256").and_then(Value::as_str).unwrap_or("");
    if sha256 != expected {
        return Err(discard(
            &temp_path,
            format!(
                "sha256 mismatch: {} sent {expected}, the {size} bytes here have {sha256}; nothing written",
                req.device
            ),
        ));
    }
    match (&target, &temp_path) {
        (Some(target), Some(temp_path)) => {
            // As cp and scp without -p: the device's mode, less this user's umask.
            let mode = answer.get("mode").and_then(Value::as_u64).unwrap_or(0o644) as u32 & 0o777 & !umask();
            let _ = fs::set_permissions(temp_path, fs::Permissions::from_mode(mode));
            fs::rename(temp_path, target).map_err(local_error)?;
        }
        _ => {
            let mut reader = &temp;
            reader.seek(SeekFrom::Start(0)).map_err(local_error)?;
            io::copy(&mut reader, &mut io::stdout().lock()).map_err(local_error)?;
        }
    }
    if req.json {
        let local = target.as_ref().map_or("-".into(), |t| t.display().to_string());
        let summary = json!({
            "device": req.device, "remote": req.remote, "local": local, "size": size, "sha256": sha256,
            "resumed_from": resumed_from, "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{summary}");
    }
    Ok(exit::SUCCESS)
}

pub fn put(settings: &Settings, req: &Copy) -> Result<u8, Failure> {
    let started = Instant::now();
    let (source, mode) = match &req.local {
        Some(path) => {
            let file = File::open(path).map_err(|e| Failure::error(format!("{}: {e}", path.display())))?;
            let meta = file.metadata().map_err(local_error)?;
            if meta.is_dir() {
                return Err(Failure::error(format!("{} is a directory: put takes files", path.display())));
            }
            (file, meta.permissions().mode() & 0o777)
        }
        None => (stdin_in_memory()?, 0o644),
    };
    let size = source.metadata().map_err(local_error)?.len();
    let sha256 = sha256_of(&source)?;
    let mut retry_until = None;
    let mut resumed_from;
    loop {
        let mut params = params(&[("path", json!(req.remote)), ("sha256", json!(sha256))]);
        params.insert("size".into(), json!(size));
        params.insert("mode".into(), json!(mode));
        let link = open_again(settings, &req.device, "put", params, retry_until)
            .map_err(|failure| directory_refusal(failure, "put"))?;
        let offset = link.answer.get("offset").and_then(Value::as_u64).unwrap_or(0);
        resumed_from = offset;
        let mut progress = Progress::new(size, offset, req.json);
        match send(link, &source, offset, &mut progress)? {
            Outcome::Done(_) => break,
            Outcome::Failed(why) => return Err(Failure::error(format!("{}: {why}", req.device))),
            Outcome::Broken(why) => {
                let until = *retry_until.get_or_insert(Instant::now() + req.timeout.unwrap_or(DEFAULT_RETRY));
                if Instant::now() >= until {
                    return Err(Failure::error(format!("{why}; gave up (--timeout)")));
                }
                eprintln!("tetherctl: {why}; resuming");
            }
        }
    }
    if req.json {
        let local = req.local.as_ref().map_or("-".into(), |l| l.display().to_string());
        let summary = json!({
            "device": req.device, "remote": req.remote, "local": local, "size": size, "sha256": sha256,
            "resumed_from": resumed_from, "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{summary}");
    }
    Ok(exit::SUCCESS)
}

/// Opens the tunnel; on a retry (`retry_until` set), a broker still away is waited for.
fn open_again(
    settings: &Settings,
    device: &str,
    op: &str,
    params: Map<String, Value>,
    retry_until: Option<Instant>,
) -> Result<Link, Failure> {
    loop {
        match tunnel::open(settings, device, op, params.clone()) {
            Ok(link) => return Ok(link),
            Err(failure)
                if retry_until.is_some_and(|until| Instant::now() < until)
                    && matches!(failure.code, exit::NO_BROKER | exit::TIMED_OUT) =>
            {
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(failure) => return Err(failure),
        }
    }
}

/// Stream 0 into `out` until the device's Report and End.
fn receive(mut link: Link, out: &File, progress: &mut Progress) -> Result<Outcome, Failure> {
    let writer = out.try_clone().map_err(local_error)?;
    let mut endpoints = Endpoints::new();
    endpoints.insert(0, link.endpoint(None, Some(OwnedFd::from(writer)), OnEof::Ignore)?);
    let outcome = run(&mut link, &mut endpoints, progress, || out.metadata().map_or(0, |m| m.len()));
    link.close(&mut endpoints, "");
    outcome
}

/// `source` from `offset` on stream 0, then its end, until the device's Report and End.
fn send(mut link: Link, source: &File, offset: u64, progress: &mut Progress) -> Result<Outcome, Failure> {
    let mut reader = source.try_clone().map_err(local_error)?;
    reader.seek(SeekFrom::Start(offset)).map_err(local_error)?;
    let position = reader.try_clone().map_err(local_error)?;
    let mut endpoints = Endpoints::new();
    let endpoint: Endpoint = link.endpoint(Some(OwnedFd::from(reader)), None, OnEof::Ignore)?;
    endpoints.insert(0, endpoint);
    let outcome = run(&mut link, &mut endpoints, progress, || (&position).stream_position().unwrap_or(0));
    link.close(&mut endpoints, "");
    outcome
}

fn run(
    link: &mut Link,
    endpoints: &mut Endpoints,
    progress: &mut Progress,
    done: impl Fn() -> u64,
) -> Result<Outcome, Failure> {
    let mut report = None;
    loop {
        let tick = progress.enabled().then(|| Instant::now() + PROGRESS_EVERY);
        let step = match link.step(endpoints, None, tick) {
            Ok(step) => step,
            Err(failure) if failure.code == exit::INTERRUPTED => return Err(failure),
            Err(failure) => return Ok(Outcome::Broken(failure.message)),
        };
        match step {
            Step::Message(Message::Report { json }) => report = serde_json::from_str(&json).ok(),
            Step::Message(Message::End { reason }) => {
                progress.finish(done());
                return Ok(match (reason.is_empty(), report.take()) {
                    (true, Some(report)) => Outcome::Done(report),
                    (true, None) => Outcome::Failed("ended the transfer before its end".into()),
                    (false, _) if link_lost(&reason) => Outcome::Broken(reason),
                    (false, _) => Outcome::Failed(reason),
                });
            }
            Step::Message(Message::Close { reason, .. }) if !reason.is_empty() => {
                return Ok(Outcome::Failed(reason))
            }
            Step::Interrupted => return Err(Failure::interrupted()),
            Step::TimedOut => progress.show(done()),
            _ => {}
        }
    }
}

/// The tunnel ended because the link failed, not because of the file: the device no longer
/// knew it, or ended it as the operator's will came or it heard nothing for
/// `expire_after_idle_s` (the broker was away that long; a transfer is never idle otherwise).
fn link_lost(reason: &str) -> bool {
    reason == tunnel::UNKNOWN_TO_DEVICE || tether::stream::link_lost(reason)
}

/// A refusal of a directory says what get and put take.
fn directory_refusal(failure: Failure, op: &str) -> Failure {
    if failure.message.ends_with(" is a directory") {
        return Failure { message: format!("{}: {op} takes files", failure.message), ..failure };
    }
    failure
}

/// LOCAL, or REMOTE's name inside it when it is a directory (as scp does).
fn target_path(local: &Path, remote: &str) -> PathBuf {
    let name = remote.trim_end_matches('/').rsplit('/').next().unwrap_or(remote);
    if local.is_dir() {
        local.join(name)
    } else {
        local.to_path_buf()
    }
}

/// `.NAME.tether-part` next to `target`: same filesystem, so the rename is atomic.
fn part_path(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!(".{name}.tether-part"))
}

fn remove_if_fresh(temp: &Option<PathBuf>, fresh: bool) {
    if let (Some(path), true) = (temp, fresh) {
        let _ = fs::remove_file(path);
    }
}

fn discard(temp: &Option<PathBuf>, message: String) -> Failure {
    remove_if_fresh(temp, true);
    Failure::error(message)
}

fn sha256_of(file: &File) -> Result<String, Failure> {
    let len = file.metadata().map_err(local_error)?.len();
    sha256_prefix(file, len).map_err(local_error)
}

/// An anonymous file in memory: a listing, a get to stdout, a put from stdin.
/// The process's umask (read by setting it, then putting it back: the only way there is).
fn umask() -> u32 {
    // SAFETY: umask has no preconditions; tetherctl creates no files on other threads.
    let mask = unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    unsafe { libc::umask(mask) };
    mask as u32
}

fn memory_file() -> Result<File, Failure> {
    // SAFETY: a C string literal; the descriptor returned is ours.
    let fd = unsafe { libc::memfd_create(c"tetherctl".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(local_error(io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// stdin read whole: its size and sha256 go in the put request.
fn stdin_in_memory() -> Result<File, Failure> {
    let mut file = memory_file()?;
    io::copy(&mut io::stdin().lock(), &mut file).map_err(|e| Failure::error(format!("stdin: {e}")))?;
    Ok(file)
}

fn params(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn local_error(e: io::Error) -> Failure {
    Failure::error(format!("local file: {e}"))
}

/// The progress line on stderr, when it is a terminal (and no --json).
struct Progress {
    enabled: bool,
    size: u64,
    started: Instant,
    from: u64,
}

impl Progress {
    fn new(size: u64, from: u64, json: bool) -> Progress {
        Progress { enabled: !json && io::stderr().is_terminal(), size, started: Instant::now(), from }
    }

    fn off() -> Progress {
        Progress { enabled: false, size: 0, started: Instant::now(), from: 0 }
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn show(&self, done: u64) {
        if !self.enabled {
            return;
        }
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done.saturating_sub(self.from) as f64 / seconds;
        let eta = match rate > 0.0 {
            true => format!("{:.0} s", self.size.saturating_sub(done) as f64 / rate),
            false => "?".into(),
        };
        eprint!("\r{done} / {} bytes  {:.1} MB/s  ETA {eta}   ", self.size, rate / 1e6);
        let _ = io::stderr().flush();
    }

    fn finish(&self, done: u64) {
        if self.enabled {
            self.show(done);
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_as_ls_shows_them() {
        assert_eq!(mode_text(0o644), "rw-r--r--");
        assert_eq!(mode_text(0o4755), "rwsr-xr-x");
        assert_eq!(mode_text(0o1777), "rwxrwxrwt");
        assert_eq!(mode_text(0o2640), "rw-r-S---");
    }

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(utc_minute(0), "1970-01-01 00:00");
        assert_eq!(utc_minute(951_782_400 + 3_660), "2000-02-29 01:01");
        assert_eq!(utc_minute(1_714_564_800), "2024-05-01 12:00");
    }

    #[test]
    fn a_local_directory_takes_the_remote_name() {
        let dir = std::env::temp_dir();
        assert_eq!(target_path(&dir, "/var/log/syslog"), dir.join("syslog"));
        assert_eq!(target_path(Path::new("/no/such/x"), "/a/b"), PathBuf::from("/no/such/x"));
        assert_eq!(part_path(Path::new("/d/f.txt")), PathBuf::from("/d/.f.txt.tether-part"));
    }
}
