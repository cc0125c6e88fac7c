//! OpenSSH's own tools as an operator uses them: keys made by `ssh-keygen`, an `ssh-agent` of
//! the test's own. A missing tool fails the test, saying which: these tests prove that keys are
//! used as OpenSSH makes them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Runs an OpenSSH tool, which must succeed.
pub fn run(command: &mut Command) -> Output {
    let output = output_of(command);
    assert!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

/// Runs an OpenSSH tool, which must exist.
pub fn output_of(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {:?} ({e}): these tests need OpenSSH's ssh-keygen, ssh-agent and ssh-add \
             (Debian: apt-get install openssh-client)",
            command.get_program()
        )
    })
}

/// Makes a passphrase-less key `DIR/NAME` (and `NAME.pub`) commented `NAME`.
pub fn keygen(dir: &Path, name: &str, type_args: &[&str]) -> PathBuf {
    keygen_with_passphrase(dir, name, type_args, "")
}

pub fn keygen_with_passphrase(dir: &Path, name: &str, type_args: &[&str], passphrase: &str) -> PathBuf {
    let path = dir.join(name);
    run(Command::new("ssh-keygen")
        .args(["-q", "-N", passphrase, "-C", name, "-f"])
        .arg(&path)
        .args(type_args));
    path
}

pub fn public_line(key: &Path) -> String {
    fs::read_to_string(key.with_extension("pub")).unwrap().trim().to_string()
}

/// A program that answers `passphrase` when ssh-keygen asks (with `SSH_ASKPASS_REQUIRE=force`):
/// it stands in for the operator at the terminal.
pub fn askpass(dir: &Path, passphrase: &str) -> PathBuf {
    let path = dir.join(format!("askpass-{}", passphrase.len()));
    fs::write(&path, format!("#!/bin/sh\necho '{passphrase}'\n")).unwrap();
    run(Command::new("chmod").arg("755").arg(&path));
    path
}

/// `ssh-agent -D -a SOCKET`, killed when dropped.
pub struct SshAgent {
    child: Child,
    pub socket: PathBuf,
}

impl SshAgent {
    pub fn start(dir: &Path) -> SshAgent {
        let socket = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run ssh-agent ({e}): these tests need OpenSSH's ssh-agent"));
        let agent = SshAgent { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.socket.exists() {
            assert!(Instant::now() < deadline, "ssh-agent did not make {}", agent.socket.display());
            thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    pub fn add(&self, key: &Path) {
        run(Command::new("ssh-add").arg("-q").arg(key).env("SSH_AUTH_SOCK", &self.socket));
    }

    pub fn socket_text(&self) -> &str {
        self.socket.to_str().unwrap()
    }
}

impl Drop for SshAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
