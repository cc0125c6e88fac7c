//! OpenSSH's signature format (PROTOCOL.sshsig), what `ssh-keygen -Y sign` writes: so that an
//! operator needs nothing but OpenSSH to sign a request, and anyone can check a device's answer
//! with `ssh-keygen -Y verify`.

use ring::digest;

use super::wire::{self, Reader};
use super::{base64, PublicKey, Refusal};

const MAGIC: &[u8; 6] = b"SSHSIG";
const VERSION: u32 = 1;
const BEGIN: &str = "-----BEGIN SSH SIGNATURE-----";
const END: &str = "-----END SSH SIGNATURE-----";
/// OpenSSH wraps the armored base64 at 70 columns.
const ARMOR_COLUMNS: usize = 70;

/// The hash of the message that the signature covers (the signer chooses; OpenSSH: sha512).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Sha256,
    Sha512,
}

impl HashAlg {
    fn from_name(name: &[u8]) -> Option<HashAlg> {
        match name {
            b"sha256" => Some(HashAlg::Sha256),
            b"sha512" => Some(HashAlg::Sha512),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha512 => "sha512",
        }
    }

    fn digest(self, message: &[u8]) -> digest::Digest {
        let algorithm = match self {
            HashAlg::Sha256 => &digest::SHA256,
            HashAlg::Sha512 => &digest::SHA512,
        };
        digest::digest(algorithm, message)
    }
}

/// A parsed SSHSIG, not yet checked against any key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSig {
    signer: Vec<u8>,
    namespace: Vec<u8>,
    /// Ignored, as OpenSSH does, but covered by the signature.
    reserved: Vec<u8>,
    hash: HashAlg,
    signature: Vec<u8>,
}

impl SshSig {
    /// From the `-----BEGIN SSH SIGNATURE-----` text; line breaks and spaces in the base64 do
    /// not matter (a JSON string may have been re-wrapped).
    pub fn from_armored(text: &str) -> Result<SshSig, Refusal> {
        let body = text
            .trim()
            .strip_prefix(BEGIN)
            .and_then(|rest| rest.strip_suffix(END))
            .ok_or(Refusal::MalformedSignature("no BEGIN/END SSH SIGNATURE lines"))?;
        let compact: Vec<u8> = body.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        let blob = base64::decode(&compact).ok_or(Refusal::MalformedSignature("bad base64"))?;
        SshSig::from_blob(&blob)
    }

    pub fn from_blob(blob: &[u8]) -> Result<SshSig, Refusal> {
        const MALFORMED: Refusal = Refusal::MalformedSignature("truncated or overlong SSHSIG");
        let mut r = Reader::new(blob);
        if r.bytes(MAGIC.len()) != Some(MAGIC) {
            return Err(Refusal::MalformedSignature("not an SSHSIG"));
        }
        if r.u32().ok_or(MALFORMED)? != VERSION {
            return Err(Refusal::MalformedSignature("SSHSIG version is not 1"));
        }
        let mut field = || r.string().map(<[u8]>::to_vec).ok_or(MALFORMED);
        let (signer, namespace, reserved, hash_name, signature) =
            (field()?, field()?, field()?, field()?, field()?);
        r.end().ok_or(MALFORMED)?;
        let hash = HashAlg::from_name(&hash_name).ok_or_else(|| {
            Refusal::UnsupportedAlgorithm(format!("hash {}", String::from_utf8_lossy(&hash_name)))
        })?;
        Ok(SshSig { signer, namespace, reserved, hash, signature })
    }

    /// The blob of the key that claims to have signed: what to look up.
    pub fn signer_blob(&self) -> &[u8] {
        &self.signer
    }

    pub fn namespace(&self) -> &[u8] {
        &self.namespace
    }

    /// Refuses a signature made for another namespace: one made for a device answer
    /// (`tether-device`), or for git or a file, is never a request.
    pub fn check_namespace(&self, namespace: &str) -> Result<(), Refusal> {
        if self.namespace == namespace.as_bytes() {
            return Ok(());
        }
        Err(Refusal::WrongNamespace {
            expected: namespace.to_string(),
            found: String::from_utf8_lossy(&self.namespace).into_owned(),
        })
    }

    /// Checks that `key` signed `message` in `namespace`.
    pub fn verify(&self, key: &PublicKey, namespace: &str, message: &[u8]) -> Result<(), Refusal> {
        self.check_namespace(namespace)?;
        if self.signer != key.blob() {
            return Err(Refusal::UnknownKey(super::fingerprint(&self.signer)));
        }
        let data = signed_data(&self.namespace, &self.reserved, self.hash, message);
        key.verify(&self.signature, &data)
    }

    pub fn to_armored(&self) -> String {
        armor(&self.to_blob())
    }

    pub fn to_blob(&self) -> Vec<u8> {
        let mut blob = MAGIC.to_vec();
        wire::put_u32(&mut blob, VERSION);
        for field in
            [&self.signer[..], &self.namespace, &self.reserved, self.hash.name().as_bytes(), &self.signature]
        {
            wire::put_string(&mut blob, field);
        }
        blob
    }
}

/// What the key signs: the namespace and the message's hash, never the message itself.
fn signed_data(namespace: &[u8], reserved: &[u8], hash: HashAlg, message: &[u8]) -> Vec<u8> {
    let mut data = MAGIC.to_vec();
    for field in [namespace, reserved, hash.name().as_bytes(), hash.digest(message).as_ref()] {
        wire::put_string(&mut data, field);
    }
    data
}

/// The data a signer signs for `message` in `namespace`, hashed with SHA-512 as OpenSSH does;
/// `assemble` then wraps the signature it returns.
pub(crate) fn data_to_sign(namespace: &str, message: &[u8]) -> Vec<u8> {
    signed_data(namespace.as_bytes(), b"", HashAlg::Sha512, message)
}

/// The armored SSHSIG of a signature made over `data_to_sign(namespace, message)`.
pub(crate) fn assemble(signer: &[u8], namespace: &str, signature: &[u8]) -> String {
    SshSig {
        signer: signer.to_vec(),
        namespace: namespace.as_bytes().to_vec(),
        reserved: Vec::new(),
        hash: HashAlg::Sha512,
        signature: signature.to_vec(),
    }
    .to_armored()
}

fn armor(blob: &[u8]) -> String {
    let mut text = String::from(BEGIN);
    for (n, c) in base64::encode(blob).chars().enumerate() {
        if n % ARMOR_COLUMNS == 0 {
            text.push('\n');
        }
        text.push(c);
    }
    text.push('\n');
    text.push_str(END);
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SshSig {
        SshSig {
            signer: super::super::key::ed25519_blob(&[1; 32]),
            namespace: b"tether".to_vec(),
            reserved: Vec::new(),
            hash: HashAlg::Sha512,
            signature: vec![9; 83],
        }
    }

    #[test]
    fn armor_round_trips_with_openssh_line_length() {
        let text = sample().to_armored();
        assert!(text.starts_with("-----BEGIN SSH SIGNATURE-----\nU1NIU0lHAAAAAQ"), "{text}");
        assert!(text.lines().all(|l| l.len() <= ARMOR_COLUMNS));
        assert_eq!(SshSig::from_armored(&text), Ok(sample()));
        let rewrapped = text.replace('\n', "\r\n  ");
        assert_eq!(SshSig::from_armored(&rewrapped), Ok(sample()));
    }

    #[test]
    fn each_malformation_is_named() {
        let malformed = |text: &str| match SshSig::from_armored(text) {
            Err(Refusal::MalformedSignature(why)) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(malformed("hello"), "no BEGIN/END SSH SIGNATURE lines");
        assert_eq!(malformed(&format!("{BEGIN}\n%%%%\n{END}")), "bad base64");
        assert_eq!(malformed(&armor(b"SSHSIH\0\0\0\x01")), "not an SSHSIG");
        assert_eq!(malformed(&armor(b"SSHSIG\0\0\0\x02")), "SSHSIG version is not 1");
        let blob = sample().to_blob();
        assert_eq!(malformed(&armor(&blob[..blob.len() - 1])), "truncated or overlong SSHSIG");
        assert_eq!(malformed(&armor(&[&blob[..], b"x"].concat())), "truncated or overlong SSHSIG");
        let mut sha1 = MAGIC.to_vec();
        wire::put_u32(&mut sha1, VERSION);
        for field in [&sample().signer[..], b"tether", b"", b"sha1", &[9; 83]] {
            wire::put_string(&mut sha1, field);
        }
        assert_eq!(SshSig::from_blob(&sha1), Err(Refusal::UnsupportedAlgorithm("hash sha1".into())));
    }
}
