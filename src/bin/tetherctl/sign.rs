//! Signing requests: with the key file the user named (`-i`, `TETHER_IDENTITY`, the config
//! file's `identity`), else with the first key in ssh-agent that devices accept, else not at
//! all: the request then goes unsigned and the device decides (ping and heartbeat run unsigned
//! by default).

use serde_json::{Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

use tether::protocol::CommandState;
use tether::trust::signer::{sign_with_key_file, Agent, AgentIdentity};
use tether::trust::{fingerprint, Request, REQUEST_NAMESPACE};

use crate::args::CmdRequest;
use crate::settings::TrustSettings;
use crate::Failure;

/// The ops devices run unsigned unless configured otherwise: sending them unsigned is no news.
const UNSIGNED_BY_DEFAULT: [&str; 2] = ["ping", "heartbeat"];

enum Signer<'a> {
    /// Through `ssh-keygen -Y sign`, which asks for the passphrase, or takes the key from
    /// ssh-agent when the file is a `.pub`.
    KeyFile {
        path: &'a std::path::Path,
        given_as: &'a str,
    },
    Agent {
        agent: Agent,
        identity: AgentIdentity,
    },
}

impl<'a> Signer<'a> {
    /// The signer to use, or why there is none.
    fn find(trust: &'a TrustSettings) -> Result<Signer<'a>, String> {
        if let Some((path, given_as)) = &trust.identity {
            return Ok(Signer::KeyFile { path: path.as_path(), given_as: given_as.as_str() });
        }
        let no_identity = "no -i FILE or TETHER_IDENTITY";
        let mut agent = Agent::from_env().map_err(|why| format!("{no_identity}, and {why}"))?;
        let identities = agent.identities().map_err(|why| format!("{no_identity}; {why}"))?;
        let count = identities.len();
        match identities.into_iter().find(AgentIdentity::is_supported) {
            Some(identity) => Ok(Signer::Agent { agent, identity }),
            None if count == 0 => Err(format!("{no_identity}, and ssh-agent holds no key")),
            None => Err(format!(
                "{no_identity}, and none of the {count} keys in ssh-agent is of a type devices accept \
                 (ed25519, ECDSA P-256, RSA of 2048 bits or more)"
            )),
        }
    }

    fn describe(&self) -> String {
        match self {
            Signer::KeyFile { path, given_as } => format!("{given_as} {}", path.display()),
            Signer::Agent { identity, .. } => {
                format!("ssh-agent's key {} {}", identity.comment, fingerprint(&identity.key_blob))
            }
        }
    }

    /// An armored signature of `text`; a failure (a wrong passphrase, an agent that refused)
    /// says which key could not sign.
    fn sign(&mut self, text: &str) -> Result<String, Failure> {
        let signed = match self {
            Signer::KeyFile { path, .. } => sign_with_key_file(path, REQUEST_NAMESPACE, text.as_bytes()),
            Signer::Agent { agent, identity } => {
                agent.sign_sshsig(&identity.key_blob, REQUEST_NAMESPACE, text.as_bytes())
            }
        };
        signed.map_err(|why| {
            Failure::error(format!(
                "cannot sign the request with {}: {why}; nothing was sent",
                self.describe()
            ))
        })
    }
}

/// The init to publish for `req` as command `id`: the signed request when there is a key to
/// sign with; else, as before signing existed, the parameters beside the status, with a note
/// when the op is one devices refuse unsigned by default.
pub fn init_payload(trust: &TrustSettings, req: &CmdRequest, id: &str) -> Result<Vec<u8>, Failure> {
    let mut signer = match Signer::find(trust) {
        Ok(signer) => signer,
        Err(why) => {
            if !UNSIGNED_BY_DEFAULT.contains(&req.op.as_str()) {
                eprintln!(
                    "tetherctl: sending {} unsigned ({why}): {} refuses it unless its \
                     trust.unsigned_ops lets {} run unsigned",
                    req.op, req.device, req.op
                );
            }
            return Ok(CommandState::Init { params: req.params.clone() }.to_payload());
        }
    };
    let text = Request::new(&req.device, &req.op, id, unix_now(), req.params.clone()).to_text();
    let sig = signer.sign(&text)?;
    log::debug!("signed with {}", signer.describe());
    let mut signed = Map::new();
    signed.insert("request".into(), Value::String(text));
    signed.insert("sig".into(), Value::String(sig));
    Ok(CommandState::Init { params: signed }.to_payload())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
