//! Operators' and devices' public keys, in SSH's encoding, and the signature check for each
//! key type. Only what ring verifies with code the TLS stack links anyway: ed25519, ECDSA
//! P-256, RSA with SHA-2 (2048 to 8192 bits).

use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use std::fmt;

use super::wire::{self, Reader};
use super::{base64, Refusal};

pub const ED25519: &str = "ssh-ed25519";
pub const ECDSA_P256: &str = "ecdsa-sha2-nistp256";
pub const RSA: &str = "ssh-rsa";
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// A public key and the exact blob it was read from: keys are compared by blob, as OpenSSH does.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    blob: Vec<u8>,
    kind: Kind,
}

#[derive(Clone, PartialEq, Eq)]
enum Kind {
    Ed25519(Vec<u8>),
    /// The uncompressed point, 0x04 || x || y.
    EcdsaP256(Vec<u8>),
    /// Modulus and exponent without leading zeros, as ring takes them.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
}

/// Why a key blob cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Malformed,
    /// The key type or size, as people read it.
    Unsupported(String),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Malformed => write!(f, "malformed key"),
            KeyError::Unsupported(what) => write!(f, "unsupported key: {what}"),
        }
    }
}

impl PublicKey {
    pub fn from_blob(blob: &[u8]) -> Result<PublicKey, KeyError> {
        let mut r = Reader::new(blob);
        let key_type = r.string().ok_or(KeyError::Malformed)?;
        let kind = match key_type {
            b"ssh-ed25519" => read_ed25519(&mut r)?,
            b"ecdsa-sha2-nistp256" => read_ecdsa_p256(&mut r)?,
            b"ssh-rsa" => read_rsa(&mut r)?,
            other => return Err(KeyError::Unsupported(String::from_utf8_lossy(other).into_owned())),
        };
        r.end().ok_or(KeyError::Malformed)?;
        Ok(PublicKey { blob: blob.to_vec(), kind })
    }

    /// From `TYPE BASE64 [comment]`, as in a .pub file or a device's status; the type must be
    /// the key's own.
    pub fn from_openssh(line: &str) -> Result<PublicKey, KeyError> {
        let mut fields = line.split_whitespace();
        let (key_type, encoded) = fields.next().zip(fields.next()).ok_or(KeyError::Malformed)?;
        let blob = base64::decode(encoded.as_bytes()).ok_or(KeyError::Malformed)?;
        let key = PublicKey::from_blob(&blob)?;
        if key.key_type() != key_type {
            return Err(KeyError::Malformed);
        }
        Ok(key)
    }

    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    pub fn key_type(&self) -> &'static str {
        match self.kind {
            Kind::Ed25519(_) => ED25519,
            Kind::EcdsaP256(_) => ECDSA_P256,
            Kind::Rsa { .. } => RSA,
        }
    }

    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.blob)
    }

    /// `TYPE BASE64`, the start of an authorized_keys or .pub line.
    pub fn to_openssh(&self) -> String {
        format!("{} {}", self.key_type(), base64::encode(&self.blob))
    }

    /// Checks an SSH signature blob (`string algorithm, string signature`) over `data`.
    pub(crate) fn verify(&self, signature: &[u8], data: &[u8]) -> Result<(), Refusal> {
        let mut r = Reader::new(signature);
        let (algorithm, sig) =
            r.string().zip(r.string()).ok_or(Refusal::MalformedSignature("signature blob"))?;
        r.end().ok_or(Refusal::MalformedSignature("bytes after the signature"))?;
        let verified = match (&self.kind, algorithm) {
            (Kind::Ed25519(key), b"ssh-ed25519") => {
                UnparsedPublicKey::new(&signature::ED25519, key).verify(data, sig)
            }
            (Kind::EcdsaP256(point), b"ecdsa-sha2-nistp256") => {
                let fixed = ecdsa_fixed(sig).ok_or(Refusal::MalformedSignature("ECDSA r and s"))?;
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point).verify(data, &fixed)
            }
            (Kind::Rsa { n, e }, b"rsa-sha2-256") => {
                verify_rsa(n, e, &signature::RSA_PKCS1_2048_8192_SHA256, data, sig)
            }
            (Kind::Rsa { n, e }, b"rsa-sha2-512") => {
                verify_rsa(n, e, &signature::RSA_PKCS1_2048_8192_SHA512, data, sig)
            }
            (Kind::Rsa { .. }, b"ssh-rsa") => {
                return Err(Refusal::UnsupportedAlgorithm("ssh-rsa (RSA with SHA-1)".into()))
            }
            (_, other) => {
                return Err(Refusal::UnsupportedAlgorithm(format!(
                    "{} signature from a {} key",
                    String::from_utf8_lossy(other),
                    self.key_type()
                )))
            }
        };
        verified.map_err(|_| Refusal::BadSignature)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.key_type(), self.fingerprint())
    }
}

/// `SHA256:` and the unpadded base64 of the blob's SHA-256, as OpenSSH prints fingerprints.
pub fn fingerprint(blob: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, blob);
    format!("SHA256:{}", base64::encode_unpadded(digest.as_ref()))
}

fn read_ed25519(r: &mut Reader) -> Result<Kind, KeyError> {
    let key = r.string().filter(|k| k.len() == 32).ok_or(KeyError::Malformed)?;
    Ok(Kind::Ed25519(key.to_vec()))
}

fn read_ecdsa_p256(r: &mut Reader) -> Result<Kind, KeyError> {
    r.string().filter(|&curve| curve == b"nistp256").ok_or(KeyError::Malformed)?;
    let point = r.string().filter(|p| p.len() == 65 && p[0] == 4).ok_or(KeyError::Malformed)?;
    Ok(Kind::EcdsaP256(point.to_vec()))
}

/// OpenSSH writes the exponent first.
fn read_rsa(r: &mut Reader) -> Result<Kind, KeyError> {
    let (e, n) = r.positive_mpint().zip(r.positive_mpint()).ok_or(KeyError::Malformed)?;
    let bits = n.first().map_or(0, |top| n.len() * 8 - top.leading_zeros() as usize);
    if !RSA_BITS.contains(&bits) {
        return Err(KeyError::Unsupported(format!("ssh-rsa of {bits} bits (2048 to 8192 are accepted)")));
    }
    Ok(Kind::Rsa { n: n.to_vec(), e: e.to_vec() })
}

/// SSH's ECDSA signature is `mpint r, mpint s`; ring takes r || s, 32 bytes each.
fn ecdsa_fixed(sig: &[u8]) -> Option<[u8; 64]> {
    let mut r = Reader::new(sig);
    let (big_r, big_s) = r.positive_mpint().zip(r.positive_mpint())?;
    r.end()?;
    let mut fixed = [0u8; 64];
    for (half, value) in fixed.chunks_exact_mut(32).zip([big_r, big_s]) {
        let start = half.len().checked_sub(value.len())?;
        half[start..].copy_from_slice(value);
    }
    Some(fixed)
}

/// OpenSSH accepts an RSA signature shorter than the modulus (some signers drop leading zero
/// bytes) by padding it; ring wants the modulus's length exactly.
fn verify_rsa(
    n: &[u8],
    e: &[u8],
    params: &signature::RsaParameters,
    data: &[u8],
    sig: &[u8],
) -> Result<(), ring::error::Unspecified> {
    let padding = n.len().checked_sub(sig.len()).ok_or(ring::error::Unspecified)?;
    let mut padded = vec![0u8; padding];
    padded.extend_from_slice(sig);
    RsaPublicKeyComponents { n, e }.verify(params, data, &padded)
}

/// The blob of an ed25519 key: the device key's public half.
pub(crate) fn ed25519_blob(key: &[u8]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(51);
    wire::put_string(&mut blob, ED25519.as_bytes());
    wire::put_string(&mut blob, key);
    blob
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        parts.iter().for_each(|p| wire::put_string(&mut out, p));
        out
    }

    #[test]
    fn ed25519_blobs_parse_and_print_as_openssh_does() {
        let key = PublicKey::from_blob(&ed25519_blob(&[7; 32])).unwrap();
        assert_eq!(key.key_type(), ED25519);
        assert!(key.to_openssh().starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"));
        assert!(key.fingerprint().starts_with("SHA256:") && key.fingerprint().len() == 7 + 43);
        assert_eq!(PublicKey::from_openssh(&format!("{} dev1", key.to_openssh())), Ok(key.clone()));
        let mislabelled = key.to_openssh().replace(ED25519, RSA);
        for bad in ["", "ssh-ed25519", "ssh-ed25519 %%%%", &mislabelled] {
            assert_eq!(PublicKey::from_openssh(bad), Err(KeyError::Malformed), "{bad}");
        }
    }

    #[test]
    fn malformed_and_unsupported_keys_are_told_apart() {
        assert_eq!(PublicKey::from_blob(&blob(&[b"ssh-ed25519", &[7; 31]])), Err(KeyError::Malformed));
        let mut trailing = ed25519_blob(&[7; 32]);
        trailing.push(0);
        assert_eq!(PublicKey::from_blob(&trailing), Err(KeyError::Malformed));
        assert_eq!(
            PublicKey::from_blob(&blob(&[b"ecdsa-sha2-nistp256", b"nistp384", &[4; 65]])),
            Err(KeyError::Malformed)
        );
        assert_eq!(
            PublicKey::from_blob(&blob(&[b"ssh-dss", b""])),
            Err(KeyError::Unsupported("ssh-dss".into()))
        );
        let small_rsa = blob(&[b"ssh-rsa", &[1, 0, 1], &[0x7f; 128]]);
        assert_eq!(
            PublicKey::from_blob(&small_rsa).unwrap_err().to_string(),
            "unsupported key: ssh-rsa of 1023 bits (2048 to 8192 are accepted)"
        );
    }

    #[test]
    fn sha1_and_mismatched_signature_algorithms_are_refused_before_any_arithmetic() {
        let rsa = PublicKey::from_blob(&blob(&[b"ssh-rsa", &[1, 0, 1], &[0x7f; 384]])).unwrap();
        let sha1 = blob(&[b"ssh-rsa", &[1; 384]]);
        assert_eq!(
            rsa.verify(&sha1, b"data"),
            Err(Refusal::UnsupportedAlgorithm("ssh-rsa (RSA with SHA-1)".into()))
        );
        assert_eq!(rsa.verify(&blob(&[b"rsa-sha2-512", &[1; 384]]), b"data"), Err(Refusal::BadSignature));
        let ed25519 = PublicKey::from_blob(&ed25519_blob(&[7; 32])).unwrap();
        assert_eq!(
            ed25519.verify(&blob(&[b"rsa-sha2-256", &[1; 64]]), b"data").unwrap_err().to_string(),
            "unsupported algorithm: rsa-sha2-256 signature from a ssh-ed25519 key"
        );
        let trailing = [&blob(&[b"ssh-ed25519", &[1; 64]])[..], &[0]].concat();
        assert_eq!(
            ed25519.verify(&trailing, b"data"),
            Err(Refusal::MalformedSignature("bytes after the signature"))
        );
    }

    #[test]
    fn ecdsa_mpints_become_fixed_halves() {
        let mut sig = Vec::new();
        wire::put_string(&mut sig, &[0, 0x80, 1]);
        wire::put_string(&mut sig, &[5]);
        let fixed = ecdsa_fixed(&sig).unwrap();
        assert_eq!(
            (&fixed[30..32], fixed[63], fixed[..30].iter().all(|&b| b == 0)),
            (&[0x80, 1][..], 5, true)
        );
        let mut too_long = Vec::new();
        wire::put_string(&mut too_long, &[1; 33]);
        wire::put_string(&mut too_long, &[5]);
        assert_eq!(ecdsa_fixed(&too_long), None);
    }
}
