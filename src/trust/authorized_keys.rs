//! The operators a device trusts, in OpenSSH's authorized_keys format: one key a line,
//! `[options] keytype base64 [comment]`, blank lines and `#` comments. The one option is
//! `ops="ping,config"`, the ops the key may request; a key without it may request every op.
//! A line that cannot be honoured exactly (an option this file does not know, such as
//! `from=` or `restrict`, a bad key) is skipped with a warning: that key is refused, never
//! given more than its line says.

use std::fmt;

use super::{base64, PublicKey, Refusal, SshSig};
use crate::text::Printable;

/// One trusted key and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedKey {
    pub key: PublicKey,
    /// `None`: every op.
    pub ops: Option<Vec<String>>,
    pub comment: String,
    pub fingerprint: String,
}

impl AuthorizedKey {
    pub fn allows(&self, op: &str) -> bool {
        self.ops.as_ref().is_none_or(|ops| ops.iter().any(|allowed| allowed == op))
    }
}

/// Says who signed, for logs and answers: `comment SHA256:...` (the fingerprint alone when
/// there is no comment).
impl fmt::Display for AuthorizedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.comment.is_empty() {
            write!(f, "{}", self.fingerprint)
        } else {
            write!(f, "{} {}", Printable(&self.comment), self.fingerprint)
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizedKeys {
    keys: Vec<AuthorizedKey>,
}

impl AuthorizedKeys {
    /// Reads the file's text; every line that is skipped is logged with its number.
    pub fn parse(text: &str) -> AuthorizedKeys {
        let (keys, skipped) = AuthorizedKeys::parse_all(text);
        for why in skipped {
            log::warn!("{why}; this key is refused");
        }
        keys
    }

    /// A new set sent to the device: every line must be honoured exactly, or the whole set is
    /// refused with the first line that cannot be.
    pub fn parse_strict(text: &str) -> Result<AuthorizedKeys, String> {
        let (keys, skipped) = AuthorizedKeys::parse_all(text);
        match skipped.into_iter().next() {
            Some(why) => Err(why),
            None => Ok(keys),
        }
    }

    /// The keys, and why each line that cannot be honoured is skipped.
    pub fn parse_all(text: &str) -> (AuthorizedKeys, Vec<String>) {
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_line(line) {
                Ok(key) => keys.push(key),
                Err(why) => skipped.push(format!("authorized_keys line {}: {why}", n + 1)),
            }
        }
        (AuthorizedKeys { keys }, skipped)
    }

    /// The first line with this key, as sshd uses it.
    pub fn find(&self, blob: &[u8]) -> Option<&AuthorizedKey> {
        self.keys.iter().find(|k| k.key.blob() == blob)
    }

    pub fn iter(&self) -> impl Iterator<Item = &AuthorizedKey> {
        self.keys.iter()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks an armored SSHSIG of `message` in `namespace` by one of these keys; returns the
    /// key's entry. The key is looked up before any signature arithmetic, so a stranger's
    /// 8192-bit RSA signature costs the device nothing.
    pub fn verify(&self, armored: &str, namespace: &str, message: &[u8]) -> Result<&AuthorizedKey, Refusal> {
        let sig = SshSig::from_armored(armored)?;
        sig.check_namespace(namespace)?;
        let Some(entry) = self.find(sig.signer_blob()) else {
            return Err(unknown_signer(sig.signer_blob()));
        };
        sig.verify(&entry.key, namespace, message)?;
        Ok(entry)
    }
}

/// A key of a type no device accepts (a FIDO `sk-` key, say) is said to be so, rather than
/// unknown: adding it to the file would not help.
fn unknown_signer(blob: &[u8]) -> Refusal {
    match PublicKey::from_blob(blob) {
        Err(super::KeyError::Unsupported(what)) => Refusal::UnsupportedAlgorithm(what),
        _ => Refusal::UnknownKey(super::fingerprint(blob)),
    }
}

fn parse_line(line: &str) -> Result<AuthorizedKey, String> {
    let (first, rest) = split_field(line)?;
    let (ops, key_type, rest) = if looks_like_key_type(first) {
        (None, first, rest)
    } else {
        let ops = parse_options(first)?;
        let (key_type, rest) = split_field(rest)?;
        (ops, key_type, rest)
    };
    let (encoded, comment) = split_field(rest)?;
    if encoded.is_empty() {
        return Err("no key after the key type".into());
    }
    let blob = base64::decode(encoded.as_bytes()).ok_or("bad base64 in the key")?;
    let key = PublicKey::from_blob(&blob).map_err(|e| e.to_string())?;
    if key.key_type() != key_type {
        return Err(format!("the key is {}, the line says {}", key.key_type(), Printable(key_type)));
    }
    let fingerprint = key.fingerprint();
    Ok(AuthorizedKey { key, ops, comment: comment.trim().to_string(), fingerprint })
}

/// As sshd tells them: a key type never has `=` or quotes, options never start like one.
fn looks_like_key_type(field: &str) -> bool {
    !field.contains(['=', '"']) && ["ssh-", "ecdsa-", "sk-"].iter().any(|p| field.starts_with(p))
}

/// The field up to the first blank outside double quotes, and what follows it.
fn split_field(text: &str) -> Result<(&str, &str), String> {
    let text = text.trim_start();
    let mut quoted = false;
    let mut escaped = false;
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => return Ok((&text[..at], &text[at..])),
            _ => {}
        }
    }
    if quoted {
        return Err("unterminated quote in the options".into());
    }
    Ok((text, ""))
}

/// `ops="a,b"` (the name in any case, as sshd reads options), alone: every other option is
/// refused, since the device could not honour it.
fn parse_options(field: &str) -> Result<Option<Vec<String>>, String> {
    let mut ops = None;
    for option in split_options(field) {
        let (name, value) = option.split_once('=').unwrap_or((option, ""));
        if !name.eq_ignore_ascii_case("ops") {
            let known = "the only option is ops=\"...\"";
            return Err(format!("unknown option \"{}\" ({known})", Printable(name)));
        }
        if ops.is_some() {
            return Err("ops= given twice".into());
        }
        let list = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .filter(|v| !v.contains(['"', '\\']))
            .ok_or("ops= must be a quoted list of ops, e.g. ops=\"ping,config\"")?;
        ops = Some(list.split(',').map(str::trim).filter(|op| !op.is_empty()).map(String::from).collect());
    }
    Ok(ops)
}

/// Splits at the commas outside double quotes.
fn split_options(field: &str) -> Vec<&str> {
    let mut options = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (at, c) in field.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                options.push(&field[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    options.push(&field[start..]);
    options
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::key::ed25519_blob;

    fn key_text(seed: u8) -> String {
        format!("ssh-ed25519 {}", base64::encode(&ed25519_blob(&[seed; 32])))
    }

    #[test]
    fn options_comments_and_blank_lines() {
        let text = format!(
            "# operators\n\n{} alice@laptop\n  ops=\"ping, config\" {} ci build\n{}\n",
            key_text(1),
            key_text(2),
            key_text(3)
        );
        let keys = AuthorizedKeys::parse(&text);
        let all: Vec<_> = keys.iter().map(|k| (k.ops.clone(), k.comment.as_str())).collect();
        assert_eq!(
            all,
            [(None, "alice@laptop"), (Some(vec!["ping".into(), "config".into()]), "ci build"), (None, "")]
        );
        let ci = keys.find(&ed25519_blob(&[2; 32])).unwrap();
        assert!(ci.allows("ping") && ci.allows("config") && !ci.allows("reboot"));
        assert!(keys.find(&ed25519_blob(&[1; 32])).unwrap().allows("reboot"));
        assert_eq!(ci.to_string(), format!("ci build {}", ci.fingerprint));
        assert_eq!(keys.find(&ed25519_blob(&[9; 32])), None);
    }

    #[test]
    fn every_line_that_cannot_be_honoured_exactly_is_refused_with_its_reason() {
        let k = key_text(1);
        let cases = [
            (format!("restrict {k}"), "unknown option \"restrict\" (the only option is ops=\"...\")"),
            (
                format!("from=\"10.0.0.0/8\",ops=\"ping\" {k}"),
                "unknown option \"from\" (the only option is ops=\"...\")",
            ),
            (format!("ops=\"ping\",ops=\"reboot\" {k}"), "ops= given twice"),
            (format!("ops=ping {k}"), "ops= must be a quoted list of ops, e.g. ops=\"ping,config\""),
            (format!("ops=\"ping {k}"), "unterminated quote in the options"),
            ("ssh-ed25519".into(), "no key after the key type"),
            ("ssh-ed25519 AAAA*AAA".into(), "bad base64 in the key"),
            (k.replace("ssh-ed25519", "ssh-rsa"), "the key is ssh-ed25519, the line says ssh-rsa"),
            ("ssh-dss AAAAB3NzaC1kc3MAAAAA".into(), "unsupported key: ssh-dss"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5".into(), "malformed key"),
        ];
        for (line, why) in cases {
            assert_eq!(parse_line(&line).unwrap_err(), why, "{line}");
            assert!(AuthorizedKeys::parse(&line).is_empty());
        }
        let spaced = parse_line(&format!("OPS=\"ping,a b\" {k} c")).unwrap();
        assert_eq!(spaced.ops, Some(vec!["ping".into(), "a b".into()]));
    }
}
