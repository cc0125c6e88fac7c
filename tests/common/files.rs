//! What the `tetherctl ls / get / put` tests share: a device whose file_transfer chroot is a
//! temp dir of its own, random files, tetherctl transfers running beside the test, and the
//! checks an operator makes (exit code and reason, sha256, temp files left behind).

use super::remote::{text, Setup};
use super::{merge, wait_child, Listener};
use serde_json::{json, Value};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A put's temp file on the device starts so (src/agent/files/journal.rs).
pub const DEVICE_TEMP_PREFIX: &str = ".tether-put-";

/// A device whose file_transfer chroot is a temp dir of its own, with `settings` added.
pub fn device(name: &str, settings: Value) -> (Setup, tempfile::TempDir) {
    device_with(name, settings, json!({}))
}

/// `device`, with `sections` (`{"remote_access": ...}`) merged into its config too.
pub fn device_with(name: &str, settings: Value, mut sections: Value) -> (Setup, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    let mut file_transfer = json!({ "chroot": root.path() });
    merge(&mut file_transfer, settings);
    merge(&mut sections, json!({ "file_transfer": file_transfer }));
    let s = Setup::with_sections(name, sections, Listener::Wss);
    (s, root)
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    tether::random::fill(&mut data);
    data
}

/// A file of `size` random bytes, written a MiB at a time; returns its sha256 (hex).
pub fn write_random_file(path: &Path, size: u64) -> String {
    let mut file = File::create(path).unwrap();
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = chunk.len().min(left as usize);
        tether::random::fill(&mut chunk[..n]);
        context.update(&chunk[..n]);
        file.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    tether::trust::hex(context.finish().as_ref())
}

/// The sha256 (hex) of the file at `path`.
pub fn sha256_file(path: &Path) -> String {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    tether::agent::files::sha256_prefix(&file, len).unwrap()
}

pub fn ok(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

pub fn failed_with(out: &Output, reason: &str) {
    assert_eq!(out.status.code(), Some(1), "stdout: {}", text(&out.stdout));
    assert!(text(&out.stderr).contains(reason), "{reason:?} not in: {}", text(&out.stderr));
}

/// The --json summary of a get or put that succeeded.
pub fn summary(out: &Output) -> Value {
    ok(out);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

pub fn str_of(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The names in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// The temp files of puts in `dir` on the device.
pub fn device_temps(dir: &Path) -> Vec<PathBuf> {
    let names = names_in(dir).into_iter().filter(|n| n.starts_with(DEVICE_TEMP_PREFIX));
    names.map(|n| dir.join(n)).collect()
}

/// The size of the one temp file of a put in `dir`, 0 while there is none.
pub fn device_temp_len(dir: &Path) -> u64 {
    device_temps(dir).iter().filter_map(|t| fs::metadata(t).ok()).map(|m| m.len()).sum()
}

/// A tetherctl running beside the test, its output piped (a summary, a reason: small); killed
/// should the test end first.
pub struct Transfer(Option<Child>);

impl Transfer {
    pub fn start(mut cmd: Command) -> Transfer {
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        Transfer(Some(child))
    }

    /// Whether it exited (its output is still there for `finish`).
    pub fn exited(&mut self) -> bool {
        self.0.as_mut().is_some_and(|child| child.try_wait().unwrap().is_some())
    }

    /// Its output once it exited; panics after `timeout`.
    pub fn finish(mut self, timeout: Duration) -> Output {
        let mut child = self.0.take().unwrap();
        if wait_child(&mut child, timeout).is_none() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("tetherctl still ran after {timeout:?}; stderr: {}", text(&out.stderr));
        }
        child.wait_with_output().unwrap()
    }

    /// SIGKILL, as a terminal closed or a machine lost would stop it.
    pub fn kill(mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
