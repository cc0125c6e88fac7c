//! Real builds of the agent other than the one under test, for the self-update tests: another
//! version (`TETHER_VERSION`), and builds that fail on purpose (`TETHER_FAULT`, see build.rs).
//! Each has a target directory of its own under `target/variants`, seeded with hard links to
//! the dependencies already built for the tests, so that only this crate is compiled again.

use super::AGENT_BIN;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One build at a time: each takes both cores of a small machine.
static BUILDING: Mutex<()> = Mutex::new(());

/// The agent built with `env` into `target/variants/NAME`; built when missing or stale (cargo
/// decides).
pub fn agent_build(name: &str, env: &[(&str, &str)]) -> PathBuf {
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let profile_dir = Path::new(AGENT_BIN).parent().expect("target/debug");
    let target_dir = profile_dir.parent().expect("target").join("variants").join(name);
    let variant_profile = target_dir.join("debug");
    if !variant_profile.exists() {
        seed(profile_dir, &variant_profile);
    }
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    // A clean environment: what cargo set for this test (CARGO_PKG_NAME, OUT_DIR...) would
    // make it see dependencies that read such variables (ureq, ring) as changed.
    let mut build = Command::new(cargo);
    build.env_clear();
    for name in ["PATH", "HOME", "CARGO_HOME", "RUSTUP_HOME", "RUSTUP_TOOLCHAIN", "TMPDIR"] {
        if let Some(value) = std::env::var_os(name) {
            build.env(name, value);
        }
    }
    let out = build
        .args(["build", "--locked", "--bin", "tether-agent", "--target-dir"])
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(
        out.status.success(),
        "cargo build of the {name} agent failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    variant_profile.join("tether-agent")
}

/// The dependencies the tests' build made, so that cargo finds them fresh: their build
/// scripts' outputs and fingerprints copied (cargo rewrites those in place), the compiled
/// crates hard-linked (only read), nothing of this crate's own (the same names in every
/// target directory). Not the lock file: a build there must not wait for the lock that
/// `cargo test` holds.
fn seed(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for dir in ["build", ".fingerprint"] {
        copy(&["-a"], &their_entries(&from.join(dir), |_| true), &to.join(dir));
    }
    let compiled = |name: &str| [".rlib", ".rmeta", ".so"].iter().any(|end| name.ends_with(end));
    copy(&["-al"], &their_entries(&from.join("deps"), compiled), &to.join("deps"));
}

/// The entries of `dir` that `keep` takes, but this crate's own.
fn their_entries(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            !(name.starts_with("tether") || name.starts_with("libtether")) && keep(&name)
        })
        .map(|e| e.path())
        .collect()
}

fn copy(how: &[&str], sources: &[PathBuf], dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    let status = Command::new("cp").args(how).args(sources).arg(dest).status().unwrap();
    assert!(status.success(), "cp {how:?} into {}", dest.display());
}
