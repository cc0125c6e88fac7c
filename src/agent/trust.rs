//! Who may ask this device for what (docs/protocol.md, "Signed requests and answers"): the
//! operators' keys in `trust.authorized_keys`, the ops that run unsigned, and the device's own
//! key, made at first start, that signs its answers.

use serde_json::{Map, Value};
use std::path::Path;
use std::sync::Arc;

use crate::config::TrustConfig;
use crate::fsutil;
use crate::protocol::Status;
use crate::text::Printable;
use crate::trust::{
    check_request, sha256_hex, verify_init, Addressed, AgeLimit, AuthorizedKeys, DeviceKey, Refusal,
};

/// The device key made at first start, when none is provisioned.
const DEVICE_KEY_FILE: &str = "device_key";

pub struct Trust {
    device: String,
    config: TrustConfig,
    operators: AuthorizedKeys,
}

/// A request that may run: its parameters (from the signed text when signed) and who asked.
pub struct Admitted {
    pub params: Map<String, Value>,
    pub by: String,
    /// The signer's public key blob; None when unsigned.
    pub signer: Option<Vec<u8>>,
    /// When the signed request says it was issued (unix seconds); None when unsigned.
    pub issued: Option<u64>,
    /// When a copy of the signed request is first refused as too old: `issued +
    /// trust.max_age_s + 1` (a replay of it is refused by its id until then); None when unsigned.
    pub replay_until: Option<u64>,
}

impl Trust {
    pub fn new(device: &str, config: &TrustConfig) -> Trust {
        Trust { device: device.to_string(), config: config.clone(), operators: read_operators(config) }
    }

    /// SIGHUP: the trust settings and the operators' keys, read again.
    pub fn reload(&mut self, config: &TrustConfig) {
        self.config = config.clone();
        self.operators = read_operators(config);
    }

    /// Whether the request in `init` (the keys of a retained init besides `status`) may run as
    /// `op`/`id` here, or why not.
    pub fn admit(&self, op: &str, id: &str, init: Map<String, Value>) -> Result<Admitted, String> {
        let verified = match verify_init(&init, &self.operators) {
            Ok(verified) => verified,
            Err(Refusal::Unsigned) => return self.admit_unsigned(op, init),
            Err(refusal) => return Err(refusal.to_string()),
        };
        let at = Addressed { device: &self.device, op, id };
        let limit =
            AgeLimit { max_age_s: self.config.max_age_s, clock_sane_after: crate::trust::CLOCK_SANE_AFTER };
        check_request(&verified.request, at, super::unix_seconds(), limit)
            .map_err(|refusal| refusal.to_string())?;
        Ok(Admitted {
            issued: Some(verified.request.issued),
            replay_until: Some(
                verified.request.issued.saturating_add(self.config.max_age_s).saturating_add(1),
            ),
            params: verified.request.params,
            by: verified.signer.to_string(),
            signer: Some(verified.signer.key.blob().to_vec()),
        })
    }

    fn admit_unsigned(&self, op: &str, params: Map<String, Value>) -> Result<Admitted, String> {
        if self.config.unsigned_ops.iter().any(|allowed| allowed == op) {
            return Ok(Admitted {
                params,
                by: crate::trust::UNSIGNED_BY.into(),
                signer: None,
                issued: None,
                replay_until: None,
            });
        }
        let setup = if self.operators.is_empty() {
            format!(
                "; no operator key is trusted yet: put operators' SSH public keys in {}",
                self.config.authorized_keys.display()
            )
        } else {
            String::new()
        };
        Err(format!(
            "unsigned request: \"{}\" needs a signature (trust.unsigned_ops: {}){setup}",
            Printable(op),
            self.config.unsigned_ops.join(", ")
        ))
    }
}

impl Trust {
    /// The `keys` op, first half: checks `text` and trusts it from now on, in memory only (the
    /// requests after this one in the same turn are judged by it). Refused when a line cannot be
    /// honoured exactly, or, unless `force`, when the new set would not let `signer` send `keys`
    /// again (the fleet would be locked out of rotation). `write_keys` makes it last.
    pub fn stage_keys(&mut self, text: &str, force: bool, signer: Option<&[u8]>) -> Result<usize, String> {
        let keys = AuthorizedKeys::parse_strict(text).map_err(|why| format!("not replaced: {why}"))?;
        let sender_keeps_keys = signer.is_none_or(|blob| keys.find(blob).is_some_and(|k| k.allows("keys")));
        if !force && !sender_keeps_keys {
            return Err(
                "not replaced: the new keys would not let the key that sent them send \"keys\" again \
                        (send \"force\": true to do it anyway)"
                    .into(),
            );
        }
        let count = keys.len();
        self.operators = keys;
        Ok(count)
    }

    /// The `keys` op, second half, once the command is recorded: replaces authorized_keys with
    /// `text`, atomically. On failure the keys on disk are trusted again.
    /// Returns how many keys are trusted now.
    pub fn write_keys(&mut self, text: &str) -> Result<usize, String> {
        let path = self.config.authorized_keys.clone();
        match fsutil::write_atomic(&path, text.as_bytes()) {
            Ok(()) => {
                // Parsed again: a later `keys` in the same turn may have staged another set.
                self.operators = AuthorizedKeys::parse(text);
                log::info!("authorized_keys replaced: trusting {} operator key(s)", self.operators.len());
                Ok(self.operators.len())
            }
            Err(e) => {
                self.unstage_keys();
                Err(format!("not replaced: {}: {}", path.display(), fsutil::error_text(&e)))
            }
        }
    }

    /// Trusts the keys on disk again, after a staged set could not be written.
    pub fn unstage_keys(&mut self) {
        self.operators = read_operators(&self.config);
    }

    /// The sha256 (hex) of authorized_keys as it is on disk, if it can be read.
    pub fn keys_on_disk_sha256(&self) -> Option<String> {
        let bytes = fsutil::read_optional(&self.config.authorized_keys).ok()??;
        Some(sha256_hex(&bytes))
    }

    pub fn operator_count(&self) -> usize {
        self.operators.len()
    }
}

/// What `--check-config` says of the operators' keys: each line the agent will skip, or that
/// there are none. Warnings, not errors: an agent that starts still answers the unsigned ops
/// and the `keys` op can mend the file.
pub fn check_operators(config: &TrustConfig) -> Vec<String> {
    let path = &config.authorized_keys;
    let unsigned_only = || format!("only unsigned ops ({}) will run", config.unsigned_ops.join(", "));
    match fsutil::read_optional(path) {
        Ok(Some(bytes)) => {
            let (keys, skipped) = AuthorizedKeys::parse_all(&String::from_utf8_lossy(&bytes));
            let mut warnings: Vec<String> = skipped
                .into_iter()
                .map(|why| format!("{}: {why}; this key is refused", path.display()))
                .collect();
            if keys.is_empty() {
                warnings.push(format!("{}: no usable key: {}", path.display(), unsigned_only()));
            }
            warnings
        }
        Ok(None) => vec![format!("{}: no such file: {}", path.display(), unsigned_only())],
        Err(e) => vec![format!("{}: {}: no signed request will run", path.display(), fsutil::error_text(&e))],
    }
}

fn read_operators(config: &TrustConfig) -> AuthorizedKeys {
    let path = &config.authorized_keys;
    match fsutil::read_optional(path) {
        Ok(Some(bytes)) => {
            let keys = AuthorizedKeys::parse(&String::from_utf8_lossy(&bytes));
            log::info!("trusting {} operator key(s) from {}", keys.len(), path.display());
            keys
        }
        Ok(None) => {
            log::info!(
                "no {}: only unsigned ops ({}) will run",
                path.display(),
                config.unsigned_ops.join(", ")
            );
            AuthorizedKeys::default()
        }
        Err(e) => {
            log::error!(
                "cannot read {}: {}: no signed request will run",
                path.display(),
                fsutil::error_text(&e)
            );
            AuthorizedKeys::default()
        }
    }
}

/// The device's key: the provisioned one, else the one made at first start in `state_dir`
/// (0600, written atomically), made now if missing.
pub fn device_key(config: &TrustConfig, state_dir: &Path) -> Result<Arc<DeviceKey>, String> {
    let (path, provisioned) = match &config.device_key {
        Some(path) => (path.clone(), true),
        None => (state_dir.join(DEVICE_KEY_FILE), false),
    };
    let existing = fsutil::read_optional(&path)
        .map_err(|e| format!("device key {}: {}", path.display(), fsutil::error_text(&e)))?;
    let pkcs8 = match existing {
        Some(pkcs8) => pkcs8,
        None if provisioned => return Err(format!("trust.device_key {}: no such file", path.display())),
        None => {
            let pkcs8 = DeviceKey::generate()?;
            fsutil::write_atomic(&path, &pkcs8)
                .map_err(|e| format!("device key {}: {}", path.display(), fsutil::error_text(&e)))?;
            log::info!("made this device's key in {}", path.display());
            pkcs8
        }
    };
    let key = DeviceKey::load(&pkcs8).map_err(|e| format!("device key {}: {e}", path.display()))?;
    log::info!("device key {}", key.fingerprint());
    Ok(Arc::new(key))
}

/// Puts the device's public key in a status it publishes, so operators can pin it.
pub fn with_key(mut status: Status, key: Option<&DeviceKey>) -> Status {
    if let Some(key) = key {
        status.key = Some(key.openssh_public(""));
        status.fingerprint = Some(key.fingerprint());
    }
    status
}
