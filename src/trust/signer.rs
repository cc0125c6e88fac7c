//! The operator's side: signing a request text with a key from ssh-agent, or from a key file
//! through `ssh-keygen -Y sign`, so that keys are used as they are (passphrase-protected files
//! included) and never converted. Blocking I/O: for tetherctl, never the agent's loop.

use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use std::{env, fs};

use super::wire::{self, Reader};
use super::{key, sshsig, PublicKey, SshSig};
use crate::fsutil::error_text;

// The agent protocol (draft-miller-ssh-agent).
const AGENT_FAILURE: u8 = 5;
const AGENTC_REQUEST_IDENTITIES: u8 = 11;
const AGENT_IDENTITIES_ANSWER: u8 = 12;
const AGENTC_SIGN_REQUEST: u8 = 13;
const AGENT_SIGN_RESPONSE: u8 = 14;
const AGENT_RSA_SHA2_512: u32 = 4;
/// OpenSSH's own bound on an agent message.
const MAX_AGENT_MESSAGE: usize = 256 * 1024;
/// Long enough for an agent that asks its user to confirm (`ssh-add -c`).
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// A key the agent holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub key_blob: Vec<u8>,
    pub comment: String,
}

impl AgentIdentity {
    /// Whether a device could check this key's signatures.
    pub fn is_supported(&self) -> bool {
        PublicKey::from_blob(&self.key_blob).is_ok()
    }
}

/// A connection to ssh-agent.
pub struct Agent {
    stream: UnixStream,
}

impl Agent {
    /// The agent `SSH_AUTH_SOCK` names.
    pub fn from_env() -> Result<Agent, String> {
        let path = env::var_os("SSH_AUTH_SOCK")
            .filter(|p| !p.is_empty())
            .ok_or("no ssh-agent: SSH_AUTH_SOCK is not set")?;
        Agent::connect(Path::new(&path))
    }

    pub fn connect(socket: &Path) -> Result<Agent, String> {
        let stream = UnixStream::connect(socket)
            .map_err(|e| format!("cannot reach ssh-agent at {}: {}", socket.display(), error_text(&e)))?;
        let timeouts =
            stream.set_read_timeout(Some(AGENT_TIMEOUT)).and(stream.set_write_timeout(Some(AGENT_TIMEOUT)));
        timeouts.map_err(|e| format!("ssh-agent: {}", error_text(&e)))?;
        Ok(Agent { stream })
    }

    pub fn identities(&mut self) -> Result<Vec<AgentIdentity>, String> {
        let answer = self.call(&[AGENTC_REQUEST_IDENTITIES], AGENT_IDENTITIES_ANSWER)?;
        let malformed = || "ssh-agent: malformed list of keys".to_string();
        let mut r = Reader::new(&answer);
        let count = r.u32().ok_or_else(malformed)?;
        let mut identities = Vec::new();
        for _ in 0..count {
            let (key_blob, comment) = r.string().zip(r.string()).ok_or_else(malformed)?;
            let comment = String::from_utf8_lossy(comment).into_owned();
            identities.push(AgentIdentity { key_blob: key_blob.to_vec(), comment });
        }
        r.end().ok_or_else(malformed)?;
        Ok(identities)
    }

    /// An armored SSHSIG of `message` by the agent's key `key_blob`. RSA keys sign with
    /// rsa-sha2-512 (devices refuse SHA-1). The signature is checked before it is returned, so
    /// an agent that signs some other way fails here, not on the device.
    pub fn sign_sshsig(
        &mut self,
        key_blob: &[u8],
        namespace: &str,
        message: &[u8],
    ) -> Result<String, String> {
        let rsa = PublicKey::from_blob(key_blob).is_ok_and(|k| k.key_type() == key::RSA);
        let mut request = vec![AGENTC_SIGN_REQUEST];
        wire::put_string(&mut request, key_blob);
        wire::put_string(&mut request, &sshsig::data_to_sign(namespace, message));
        wire::put_u32(&mut request, if rsa { AGENT_RSA_SHA2_512 } else { 0 });
        let answer = self.call(&request, AGENT_SIGN_RESPONSE)?;
        let malformed = "ssh-agent: malformed signature answer";
        let mut r = Reader::new(&answer);
        let signature = r.string().ok_or(malformed)?;
        r.end().ok_or(malformed)?;
        let armored = sshsig::assemble(key_blob, namespace, signature);
        check_own_signature(&armored, namespace, message).map_err(|why| format!("ssh-agent: {why}"))?;
        Ok(armored)
    }

    /// Sends one message and reads the answer's body, which must be of type `expected`.
    fn call(&mut self, body: &[u8], expected: u8) -> Result<Vec<u8>, String> {
        let io_error = |e: io::Error| format!("ssh-agent: {}", error_text(&e));
        let mut message = Vec::with_capacity(body.len() + 4);
        wire::put_string(&mut message, body);
        self.stream.write_all(&message).map_err(io_error)?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(io_error)?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_AGENT_MESSAGE {
            return Err(format!("ssh-agent: an answer of {len} bytes"));
        }
        let mut answer = vec![0u8; len];
        self.stream.read_exact(&mut answer).map_err(io_error)?;
        match answer[0] {
            t if t == expected => Ok(answer.split_off(1)),
            AGENT_FAILURE => Err("ssh-agent refused (is the key still loaded? did its user confirm?)".into()),
            other => Err(format!("ssh-agent: unexpected answer of type {other}")),
        }
    }
}

/// An armored SSHSIG of `message` by the private key in `key_file`, made by
/// `ssh-keygen -Y sign`: it asks for a passphrase on the terminal if the file has one (or uses
/// ssh-agent when `key_file` is a public key whose private half is loaded there).
pub fn sign_with_key_file(key_file: &Path, namespace: &str, message: &[u8]) -> Result<String, String> {
    let dir = PrivateTempDir::new()?;
    let message_file = dir.path.join("request");
    fs::write(&message_file, message)
        .map_err(|e| format!("{}: {}", message_file.display(), error_text(&e)))?;
    let output = Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", namespace, "-f"])
        .arg(key_file)
        .arg(&message_file)
        // The message is in a file: stdin stays the terminal's, for ssh-keygen's passphrase
        // prompt (it would read the passphrase from a piped stdin).
        .stdin(Stdio::inherit())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            format!("cannot run ssh-keygen (OpenSSH 8.1 or later signs with a key file): {}", error_text(&e))
        })?;
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr);
        return Err(format!("ssh-keygen -Y sign -f {} failed: {}", key_file.display(), said.trim()));
    }
    let sig_file = dir.path.join("request.sig");
    let armored =
        fs::read_to_string(&sig_file).map_err(|e| format!("{}: {}", sig_file.display(), error_text(&e)))?;
    check_own_signature(&armored, namespace, message)
        .map_err(|why| format!("ssh-keygen signed with {}: {why}", key_file.display()))?;
    Ok(armored)
}

/// A device would refuse what fails here: better to say so before sending it.
fn check_own_signature(armored: &str, namespace: &str, message: &[u8]) -> Result<(), String> {
    let sig = SshSig::from_armored(armored).map_err(|r| r.to_string())?;
    let key =
        PublicKey::from_blob(sig.signer_blob()).map_err(|e| format!("devices cannot use this key: {e}"))?;
    sig.verify(&key, namespace, message).map_err(|r| r.to_string())
}

/// A directory only this user can enter, so nobody swaps the message or the signature between
/// the writes and the reads; removed with everything in it when dropped.
struct PrivateTempDir {
    path: PathBuf,
}

impl PrivateTempDir {
    fn new() -> Result<PrivateTempDir, String> {
        let path = env::temp_dir().join(format!("tether-sign-{:016x}", crate::random::u64()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("{}: {}", path.display(), error_text(&e)))?;
        Ok(PrivateTempDir { path })
    }
}

impl Drop for PrivateTempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
