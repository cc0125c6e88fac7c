//! The puts in progress, on disk in `state_dir`, so that the temp file of an agent killed
//! mid-put is removed at its next start (`cleanup_at_start`): the target was never touched.
//!
//! While the agent runs, a put cut by a lost link finds its temp file again and resumes from
//! it. After a restart a put starts over: the journal says which temp files this process made,
//! and one it did not make (left by an agent killed, or planted by someone else) is never taken
//! for the beginning of the operator's file.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::fsutil::{self, error_text};

const JOURNAL_FILE: &str = "file-puts.json";
const TEMP_PREFIX: &str = ".tether-put-";
const TEMP_SUFFIX: &str = ".part";

/// Shared by the file access layer and its puts (a put may finish on a worker thread).
#[derive(Clone, Debug)]
pub struct Journal(Arc<Mutex<State>>);

#[derive(Debug)]
struct State {
    path: PathBuf,
    /// Temp files (real paths) made by this process, each with the put that writes it now.
    temps: BTreeMap<PathBuf, u64>,
    last_put: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct OnDisk {
    temps: Vec<PathBuf>,
}

impl Journal {
    pub fn new(state_dir: &Path) -> Journal {
        let state = State { path: state_dir.join(JOURNAL_FILE), temps: BTreeMap::new(), last_put: 0 };
        Journal(Arc::new(Mutex::new(state)))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether this process made `temp` (so it may be resumed).
    pub fn made(&self, temp: &Path) -> bool {
        self.state().temps.contains_key(temp)
    }

    /// Makes `temp` written by a new put, which supersedes any other put writing it (the
    /// operator retried after losing the link, before the device noticed). Recorded on disk
    /// before the temp file is made; returns the put's number.
    pub fn claim(&self, temp: &Path) -> io::Result<u64> {
        let mut state = self.state();
        state.last_put += 1;
        let put = state.last_put;
        if state.temps.insert(temp.to_path_buf(), put).is_none() {
            if let Err(e) = state.save() {
                state.temps.remove(temp);
                return Err(e);
            }
        }
        Ok(put)
    }

    /// Whether put number `put` is still the one writing `temp`.
    pub fn owns(&self, temp: &Path, put: u64) -> bool {
        self.state().temps.get(temp) == Some(&put)
    }

    /// Forgets `temp` once its file is gone (renamed or removed), if `put` still owns it.
    pub fn release(&self, temp: &Path, put: u64) {
        let mut state = self.state();
        if state.temps.get(temp) == Some(&put) {
            state.forget(temp);
        }
    }

    /// Runs `rename` (of `temp` over its target) if `put` still owns `temp`, and forgets `temp`
    /// once renamed; None when a newer put took it over. Under the journal's lock: a put
    /// finishing on a worker and a retry of it beginning on the loop never both have the file.
    pub fn rename(
        &self,
        temp: &Path,
        put: u64,
        rename: impl FnOnce() -> io::Result<()>,
    ) -> Option<io::Result<()>> {
        let mut state = self.state();
        if state.temps.get(temp) != Some(&put) {
            return None;
        }
        let renamed = rename();
        if renamed.is_ok() {
            state.forget(temp);
        }
        Some(renamed)
    }
}

impl State {
    fn forget(&mut self, temp: &Path) {
        self.temps.remove(temp);
        if let Err(e) = self.save() {
            // The file is gone already: the next start finds nothing to remove there.
            log::warn!("{}: {}", self.path.display(), error_text(&e));
        }
    }

    fn save(&self) -> io::Result<()> {
        let on_disk = OnDisk { temps: self.temps.keys().cloned().collect() };
        let json = serde_json::to_vec(&on_disk).map_err(io::Error::other)?;
        fsutil::write_atomic(&self.path, &json)
    }
}

/// The temp file's name for a put of `size` bytes with `sha256` to `target` (a real path): the
/// same put, retried, finds the same file.
pub fn temp_name(target: &Path, size: u64, sha256: &str) -> String {
    let mut key = target.as_os_str().as_encoded_bytes().to_vec();
    key.extend_from_slice(format!("|{size}|{sha256}").as_bytes());
    let digest = crate::trust::sha256_hex(&key);
    format!("{TEMP_PREFIX}{}{TEMP_SUFFIX}", &digest[..16])
}

pub fn is_temp_name(name: &[u8]) -> bool {
    let middle =
        name.strip_prefix(TEMP_PREFIX.as_bytes()).and_then(|n| n.strip_suffix(TEMP_SUFFIX.as_bytes()));
    middle.is_some_and(|hex| hex.len() == 16 && hex.iter().all(u8::is_ascii_hexdigit))
}

/// Removes the temp files of puts a previous agent left (killed mid-put), then the journal;
/// returns the files removed. Only names of the temp file pattern are ever removed, and
/// removing a name never follows a link.
pub fn cleanup_at_start(state_dir: &Path) -> Vec<PathBuf> {
    let path = state_dir.join(JOURNAL_FILE);
    let on_disk: OnDisk = match fsutil::read_optional(&path) {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            log::warn!("{}: {e}; temp files of puts it listed stay", path.display());
            OnDisk::default()
        }),
        Ok(None) => return Vec::new(),
        Err(e) => {
            log::warn!("{}: {}", path.display(), error_text(&e));
            return Vec::new();
        }
    };
    let mut removed = Vec::new();
    for temp in on_disk.temps {
        if !temp.file_name().is_some_and(|name| is_temp_name(name.as_encoded_bytes())) {
            log::warn!("{}: not a put's temp file, left alone", temp.display());
            continue;
        }
        match std::fs::remove_file(&temp) {
            Ok(()) => {
                log::info!("{}: removed, the put was cut by the agent's stop", temp.display());
                removed.push(temp);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("{}: cannot remove it: {}", temp.display(), error_text(&e)),
        }
    }
    if let Err(e) = std::fs::remove_file(&path) {
        log::warn!("{}: {}", path.display(), error_text(&e));
    }
    removed
}
