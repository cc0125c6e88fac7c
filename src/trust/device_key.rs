//! The device's own ed25519 key: it signs the device's answers, so that a broker in the middle
//! can neither forge a result nor pass for the device. Storing it is the caller's (PKCS#8, as
//! ring makes it).

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

use super::key::{ed25519_blob, ED25519};
use super::{sshsig, wire, PublicKey};

pub struct DeviceKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl DeviceKey {
    /// A new key, as PKCS#8 v2 bytes to store (privately) and `load`.
    pub fn generate() -> Result<Vec<u8>, String> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| "cannot generate a device key: no randomness from the kernel")?;
        Ok(pkcs8.as_ref().to_vec())
    }

    /// Takes PKCS#8 v1 as well (what `openssl genpkey -algorithm ed25519` writes, in DER), so
    /// that a key can be provisioned when the image is built.
    pub fn load(pkcs8: &[u8]) -> Result<DeviceKey, String> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| format!("not an ed25519 PKCS#8 key: {e}"))?;
        let public = PublicKey::from_blob(&ed25519_blob(pair.public_key().as_ref()))
            .map_err(|e| format!("device key: {e}"))?;
        Ok(DeviceKey { pair, public })
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    pub fn public_blob(&self) -> &[u8] {
        self.public.blob()
    }

    pub fn fingerprint(&self) -> String {
        self.public.fingerprint()
    }

    /// `ssh-ed25519 AAAA... comment`, as in a .pub file or authorized_keys.
    pub fn openssh_public(&self, comment: &str) -> String {
        let line = self.public.to_openssh();
        if comment.is_empty() {
            line
        } else {
            format!("{line} {comment}")
        }
    }

    /// An armored SSHSIG of `message`, as `ssh-keygen -Y sign -n NAMESPACE` would make.
    pub fn sign_sshsig(&self, namespace: &str, message: &[u8]) -> String {
        let data = sshsig::data_to_sign(namespace, message);
        let mut signature = Vec::with_capacity(83);
        wire::put_string(&mut signature, ED25519.as_bytes());
        wire::put_string(&mut signature, self.pair.sign(&data).as_ref());
        sshsig::assemble(self.public_blob(), namespace, &signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{SshSig, DEVICE_NAMESPACE};

    #[test]
    fn a_device_signature_verifies_with_its_public_key_only() {
        let key = DeviceKey::load(&DeviceKey::generate().unwrap()).unwrap();
        let sig = SshSig::from_armored(&key.sign_sshsig(DEVICE_NAMESPACE, b"answer")).unwrap();
        assert_eq!(sig.verify(key.public_key(), DEVICE_NAMESPACE, b"answer"), Ok(()));
        assert_eq!(
            sig.verify(key.public_key(), DEVICE_NAMESPACE, b"answer!"),
            Err(crate::trust::Refusal::BadSignature)
        );
        let other = DeviceKey::load(&DeviceKey::generate().unwrap()).unwrap();
        assert!(sig.verify(other.public_key(), DEVICE_NAMESPACE, b"answer").is_err());
        assert!(key.openssh_public("dev1").starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"));
        assert!(key.openssh_public("dev1").ends_with(" dev1"));
    }

    #[test]
    fn anything_but_an_ed25519_pkcs8_key_is_refused() {
        assert!(DeviceKey::load(b"").is_err());
        let mut pkcs8 = DeviceKey::generate().unwrap();
        pkcs8.truncate(pkcs8.len() - 1);
        assert!(DeviceKey::load(&pkcs8).is_err());
    }
}
