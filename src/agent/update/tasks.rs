//! How each task of a flow is carried out: blocking work, run on a worker thread. Each is safe
//! to run again after a crash part way (the journal says a task had begun, not how far it got):
//! an install keeps the file it replaces as a hard link beside it before it renames the new one
//! over it, an undo renames that link back (the previous file byte for byte, with its owner
//! and mode), a service restart is a restart.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::run::{output_tail, Installed, OUTPUT_TAIL};
use crate::agent::files::users::{group_id, user_id};
use crate::fsutil::{error_text, sync_dir};
use crate::runner::{self, End, Output, Program};

/// After SIGTERM, how long a timed-out command's group has before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// `path`'s previous version, kept beside it during the flow `flow_id`.
pub fn previous_path(path: &Path, flow_id: &str) -> PathBuf {
    sibling(path, &format!("tether-prev-{flow_id}"))
}

/// `.NAME.TAG` beside `path`.
pub fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}"))
}

/// What an install is to do.
pub struct Install<'a> {
    pub step: &'a str,
    pub artifact: &'a Path,
    pub path: &'a Path,
    pub mode: u32,
    pub owner: Option<&'a str>,
    pub group: Option<&'a str>,
    /// Whether `path` existed when the step first began (journaled before any change).
    pub existed: bool,
    pub flow_id: &'a str,
}

/// Puts the artifact at the path: the previous file linked aside first (once: a rerun keeps
/// the link made the first time), then the new one written beside it, synced, renamed over.
pub fn install(job: &Install) -> Result<Installed, String> {
    let previous = previous_path(job.path, job.flow_id);
    let failed = |what: &str, e: io::Error| format!("{what} {}: {}", job.path.display(), error_text(&e));
    if job.existed {
        match fs::hard_link(job.path, &previous) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            // A rerun after the rename: the previous file is only the link now.
            Err(e) if e.kind() == io::ErrorKind::NotFound && previous.exists() => {}
            Err(e) => return Err(failed("cannot keep the previous", e)),
        }
    }
    let uid = job.owner.map(|o| user_id(o).ok_or_else(|| format!("no user {o} here"))).transpose()?;
    let gid = job.group.map(|g| group_id(g).ok_or_else(|| format!("no group {g} here"))).transpose()?;
    let temp = sibling(job.path, &format!("tether-new-{}", job.flow_id));
    let written =
        write_copy(job.artifact, &temp, job.mode, uid, gid).and_then(|()| fs::rename(&temp, job.path));
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(failed("cannot write", e));
    }
    let dir = job.path.parent().unwrap_or(Path::new("/"));
    sync_dir(dir).map_err(|e| failed("cannot sync the directory of", e))?;
    Ok(Installed {
        step: job.step.to_string(),
        path: job.path.display().to_string(),
        previous: job.existed.then(|| previous.display().to_string()),
    })
}

fn write_copy(from: &Path, to: &Path, mode: u32, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let mut source = File::open(from)?;
    let _ = fs::remove_file(to);
    let mut target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(to)?;
    io::copy(&mut source, &mut target)?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::fchown(&target, uid, gid)?;
    }
    target.set_permissions(fs::Permissions::from_mode(mode))?;
    target.sync_all()
}

/// Puts back what an install replaced (or removes what it created).
pub fn undo(installed: &Installed) -> Result<(), String> {
    let path = Path::new(&installed.path);
    let done = match &installed.previous {
        // Already renamed back by an undo cut short: the link is gone, the file is back.
        Some(previous) => match fs::rename(previous, path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
        None => match fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
    };
    done.map_err(|e| format!("cannot put {} back: {}", path.display(), error_text(&e)))?;
    sync_dir(path.parent().unwrap_or(Path::new("/"))).map_err(|e| error_text(&e))
}

/// The flow is over: the previous versions kept for it go.
pub fn forget_previous(installed: &[Installed]) {
    for previous in installed.iter().filter_map(|i| i.previous.as_ref()) {
        let _ = fs::remove_file(previous);
    }
}

/// A command to run: argv, its environment, where, for how long.
pub struct Run<'a> {
    pub argv: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub dir: &'a Path,
    pub timeout: Duration,
    /// Where its output goes (stdout and stderr, in order); its tail is kept in the result.
    pub output: &'a Path,
}

/// Runs the command in its own session, with no input, until it exits, the timeout passes or
/// `stopped()` says so; then its whole group is terminated (SIGTERM, then SIGKILL after
/// KILL_GRACE: the group may outlive its leader, a daemon it started goes too). Ok with the
/// tail of its output when it exits 0.
pub fn run(job: &Run, stopped: impl Fn() -> bool) -> Result<String, String> {
    let program = &job.argv[0];
    let output = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(job.output)
        .map_err(|e| format!("cannot open {}: {}", job.output.display(), error_text(&e)))?;
    let command = Program {
        env: Some(job.env),
        dir: Some(job.dir),
        timeout: Some(job.timeout),
        stopped: &stopped,
        own_session: true,
        // Dies with the agent's worker: the journal then says it was cut short.
        die_with_caller: true,
        kill_grace: KILL_GRACE,
        ..Program::new(job.argv, Output::File(&output))
    };
    let finished = runner::run(&command).map_err(|e| format!("cannot run {program}: {}", error_text(&e)))?;
    let tail = read_tail(job.output);
    let why = match finished.end {
        End::Exited(status) if status.success() => return Ok(tail),
        End::Exited(status) => runner::describe(status),
        End::Stopped => "stopped".to_string(),
        End::TimedOut => format!("timed out after {} s: stopped", job.timeout.as_secs()),
    };
    Err(format!("{program} {why}{}", tail_note(&tail)))
}

fn tail_note(tail: &str) -> String {
    let last = tail.trim_end().lines().last().unwrap_or("");
    if last.is_empty() {
        String::new()
    } else {
        format!(" (its last line: {last})")
    }
}

fn read_tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else { return String::new() };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(OUTPUT_TAIL as u64)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    output_tail(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::Instant;

    fn job<'a>(artifact: &'a Path, path: &'a Path, existed: bool) -> Install<'a> {
        Install { step: "bin", artifact, path, mode: 0o750, owner: None, group: None, existed, flow_id: "f1" }
    }

    #[test]
    fn install_keeps_the_previous_file_and_undo_puts_it_back_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (artifact, path) = (dir.path().join("new"), dir.path().join("app"));
        fs::write(&artifact, b"version 2").unwrap();
        fs::write(&path, b"version 1").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        let installed = install(&job(&artifact, &path, true)).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"version 2");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o750);
        // A rerun after a crash changes nothing more, and keeps the first previous file.
        assert_eq!(install(&job(&artifact, &path, true)).unwrap(), installed);
        undo(&installed).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"version 1");
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode, "the very file, owner and mode with it");
        undo(&installed).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"version 1", "an undo run again is harmless");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "nothing left beside: {left:?}");
    }

    #[test]
    fn undo_of_a_new_file_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (artifact, path) = (dir.path().join("new"), dir.path().join("app"));
        fs::write(&artifact, b"v2").unwrap();
        let installed = install(&job(&artifact, &path, false)).unwrap();
        assert_eq!(installed.previous, None);
        undo(&installed).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_failed_install_leaves_the_target_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app");
        fs::write(&path, b"version 1").unwrap();
        let missing = dir.path().join("missing");
        assert!(install(&job(&missing, &path, true)).unwrap_err().starts_with("cannot write"));
        assert_eq!(fs::read(&path).unwrap(), b"version 1");
        let mut bad_owner = job(&missing, &path, true);
        bad_owner.owner = Some("no-such-user-here");
        assert_eq!(install(&bad_owner).unwrap_err(), "no user no-such-user-here here");
    }

    use std::sync::atomic::{AtomicBool, Ordering};

    fn run_sh(script: &str, timeout: Duration, stop: &AtomicBool) -> Result<String, String> {
        let dir = tempfile::tempdir().unwrap();
        let argv = vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()];
        let env = BTreeMap::from([("GREETING".to_string(), "hello".to_string())]);
        let output = dir.path().join("out");
        run(&Run { argv: &argv, env: &env, dir: dir.path(), timeout, output: &output }, || {
            stop.load(Ordering::Relaxed)
        })
    }

    #[test]
    fn run_gives_the_output_tail_or_why_it_failed() {
        let go = AtomicBool::new(false);
        assert_eq!(
            run_sh("echo $GREETING; echo to-stderr >&2", Duration::from_secs(10), &go).unwrap(),
            "hello\nto-stderr\n"
        );
        let long =
            run_sh("head -c 10000 /dev/zero | tr '\\0' x; echo; echo end", Duration::from_secs(10), &go)
                .unwrap();
        assert_eq!(long.len(), OUTPUT_TAIL);
        assert!(long.ends_with("xx\nend\n"));
        assert_eq!(
            run_sh("echo bad input; exit 3", Duration::from_secs(10), &go).unwrap_err(),
            "/bin/sh exited with 3 (its last line: bad input)"
        );
    }

    #[test]
    fn a_command_over_its_time_is_stopped() {
        let go = AtomicBool::new(false);
        let started = Instant::now();
        let error = run_sh("sleep 60 & wait", Duration::from_millis(300), &go).unwrap_err();
        assert_eq!(error, "/bin/sh timed out after 0 s: stopped");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
