//! The `agent` step (docs/updates.md): the binary for this device's target is fetched and
//! checked by running it (`--arch`, `--version`, `--check-config` on the live config); it then
//! runs on probation (`probation.rs`) while the binary in place stays the old one, and only a
//! binary that passed is swapped in, the previous one kept beside it. A binary that failed its
//! probation here is remembered and not tried again unless the step says `force`.

use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::download::Cancel;
use super::flow::{Action, Binary, Step};
use super::{tasks, Settings};
use crate::fsutil::{self, error_text};

/// Probations an agent step may begin: more means each was cut short (the agent stopped, the
/// power went), which a binary that reboots the device would also do.
pub const MAX_PROBATIONS: u32 = 3;
/// Binaries remembered as failed, newest last.
const FAILED_KEPT: usize = 32;
/// How long the new binary has to answer `--arch`, `--version` and `--check-config`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// How an agent step's preparation ended.
pub enum Prepared {
    /// The binary named is the one running: nothing to do.
    Running,
    /// Downloaded and checked, at `staged`: ready for its probation.
    Staged { sha256: String },
}

/// The binary an agent step names for this device's target.
pub fn binary_of(step: &Step) -> Option<&Binary> {
    match &step.action {
        Action::Agent { binaries, .. } => binaries.get(crate::TARGET),
        _ => None,
    }
}

/// Where an agent step's binary waits for its probation, in the download directory.
pub fn staged_path(settings: &Settings, step: &Step) -> PathBuf {
    super::artifact_path(&settings.download_dir, &step.name)
}

/// The blocking part of an agent step, on a worker: `fetch` downloads the binary to
/// `staged_path`.
pub fn prepare(
    step: &Step,
    settings: &Settings,
    cancel: &Cancel,
    fetch: impl FnOnce() -> Result<(), String>,
) -> Result<Prepared, String> {
    let Action::Agent { binaries, version, force } = &step.action else {
        return Err("not an agent step".into());
    };
    let binary = binaries.get(crate::TARGET).ok_or_else(|| {
        let named: Vec<&str> = binaries.keys().map(String::as_str).collect();
        format!("no binary for this device's target {} (the step has {})", crate::TARGET, named.join(", "))
    })?;
    let sha256 = binary.sha256.to_ascii_lowercase();
    if sha256_of(&settings.exe).is_ok_and(|running| running == sha256) {
        return Ok(Prepared::Running);
    }
    if let Some(failed) = failed_before(&settings.dir, &sha256).filter(|_| !force) {
        return Err(format!(
            "this binary (sha256 {}…) failed its probation here before ({}); \"force\": true tries it again",
            &sha256[..12],
            failed.reason
        ));
    }
    fetch()?;
    let staged = staged_path(settings, step);
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot make {} executable: {}", staged.display(), error_text(&e)))?;
    if cancel.is_cancelled() {
        return Err("cancelled".into());
    }
    check(&staged, version.as_deref(), settings)?;
    Ok(Prepared::Staged { sha256 })
}

/// Runs the new binary as the init script would check it: built for this target, the version
/// the step names, and content with the live config.
fn check(staged: &Path, version: Option<&str>, settings: &Settings) -> Result<(), String> {
    let arch = probe(staged, &["--arch"], settings)?;
    if arch.trim() != crate::TARGET {
        return Err(format!(
            "the new binary is built for {}, this device runs {}",
            arch.trim(),
            crate::TARGET
        ));
    }
    let said = probe(staged, &["--version"], settings)?;
    let said = said.trim().trim_start_matches("tether-agent").trim();
    if let Some(version) = version.filter(|v| *v != said) {
        return Err(format!("the new binary says it is version {said}, the step expects {version}"));
    }
    let config = settings.config_path.display().to_string();
    probe(staged, &["--config", &config, "--check-config"], settings)
        .map_err(|e| format!("the new binary refuses the live config: {e}"))?;
    Ok(())
}

fn probe(binary: &Path, args: &[&str], settings: &Settings) -> Result<String, String> {
    let argv: Vec<String> =
        std::iter::once(binary.display().to_string()).chain(args.iter().map(|a| a.to_string())).collect();
    let output = settings.dir.join("output-agent-check");
    let job = tasks::Run {
        argv: &argv,
        env: &Default::default(),
        dir: &settings.download_dir,
        timeout: PROBE_TIMEOUT,
        output: &output,
    };
    let result = tasks::run(&job, || false);
    let _ = fs::remove_file(&output);
    result
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_of(path: &Path) -> std::io::Result<String> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    crate::agent::files::sha256_prefix(&file, len)
}

/// The running binary was replaced under its path: `/proc/self/exe` then ends in " (deleted)".
pub fn running_exe() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(path) => PathBuf::from(path),
        None => exe,
    }
}

/// Puts the binary that passed its probation at the running binary's path, atomically; the
/// one it replaces stays beside it as `.NAME.previous` (the one before that goes).
pub fn swap_in(staged: &Path, exe: &Path, flow_id: &str) -> Result<(), String> {
    let mode = fs::metadata(exe).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o755);
    let install = tasks::Install {
        step: "agent",
        artifact: staged,
        path: exe,
        mode,
        owner: None,
        group: None,
        existed: true,
        flow_id,
    };
    let installed = tasks::install(&install)?;
    if let Some(previous) = installed.previous {
        let kept = previous_binary(exe);
        fs::rename(&previous, &kept).map_err(|e| {
            format!("cannot keep the previous binary as {}: {}", kept.display(), error_text(&e))
        })?;
    }
    Ok(())
}

/// Where the binary an agent step replaced is kept.
pub fn previous_binary(exe: &Path) -> PathBuf {
    tasks::sibling(exe, "previous")
}

/// A binary that failed its probation on this device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedBinary {
    pub sha256: String,
    pub reason: String,
    /// Unix seconds.
    pub at: u64,
}

fn failed_path(dir: &Path) -> PathBuf {
    dir.join("failed-agents.json")
}

fn failed_list(dir: &Path) -> Vec<FailedBinary> {
    match fsutil::read_optional(&failed_path(dir)) {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            log::warn!("{}: unreadable ({e}); starting a new list", failed_path(dir).display());
            Vec::new()
        }),
        _ => Vec::new(),
    }
}

fn failed_before(dir: &Path, sha256: &str) -> Option<FailedBinary> {
    failed_list(dir).into_iter().rev().find(|f| f.sha256 == sha256)
}

/// Remembers a binary that failed its probation, so that it is not tried again unforced.
pub fn remember_failed(dir: &Path, sha256: &str, reason: &str) -> Result<(), String> {
    let mut list = failed_list(dir);
    list.retain(|f| f.sha256 != sha256);
    list.push(FailedBinary {
        sha256: sha256.into(),
        reason: reason.into(),
        at: crate::agent::unix_seconds(),
    });
    let excess = list.len().saturating_sub(FAILED_KEPT);
    list.drain(..excess);
    let bytes = serde_json::to_vec_pretty(&list).map_err(|e| e.to_string())?;
    fsutil::create_private_dir(dir).map_err(|e| error_text(&e))?;
    fsutil::write_atomic(&failed_path(dir), &bytes).map_err(|e| error_text(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_binaries_are_remembered_newest_last_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        assert!(failed_before(dir.path(), "aa").is_none());
        remember_failed(dir.path(), "aa", "crashed").unwrap();
        remember_failed(dir.path(), "aa", "crashed again").unwrap();
        assert_eq!(failed_before(dir.path(), "aa").unwrap().reason, "crashed again");
        for i in 0..FAILED_KEPT {
            remember_failed(dir.path(), &format!("b{i}"), "x").unwrap();
        }
        assert!(failed_before(dir.path(), "aa").is_none(), "the oldest went");
        assert_eq!(failed_list(dir.path()).len(), FAILED_KEPT);
    }

    #[test]
    fn a_swap_keeps_the_previous_binary_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let (exe, staged) = (dir.path().join("tether-agent"), dir.path().join("staged"));
        fs::write(&exe, b"old").unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(&staged, b"new").unwrap();
        swap_in(&staged, &exe, "f1").unwrap();
        assert_eq!(fs::read(&exe).unwrap(), b"new");
        assert_eq!(fs::metadata(&exe).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(fs::read(previous_binary(&exe)).unwrap(), b"old");
        fs::write(&staged, b"newer").unwrap();
        swap_in(&staged, &exe, "f2").unwrap();
        assert_eq!(fs::read(previous_binary(&exe)).unwrap(), b"new");
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [".tether-agent.previous", "staged", "tether-agent"]);
    }
}
