//! The keys of one tunnel: an ephemeral X25519 agreement between operator and device, whose
//! public halves travel in the signed open request and the device-signed answer, stretched by
//! HKDF into one ChaCha20-Poly1305 key per direction. A frame's nonce is its kind and counter,
//! which never repeat under one key (a frame sent again is the same bytes).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::hkdf;
use ring::rand::SystemRandom;

pub const PUBLIC_KEY_LEN: usize = 32;
pub const TAG_LEN: usize = 16;

/// Which end of the tunnel this is: it picks the key to seal with and the one to open with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Operator,
    Device,
}

/// This end's ephemeral key pair, until the peer's public key is known.
pub struct Handshake {
    private: EphemeralPrivateKey,
    public: [u8; PUBLIC_KEY_LEN],
}

impl Handshake {
    pub fn new() -> Result<Handshake, String> {
        let private = EphemeralPrivateKey::generate(&X25519, &SystemRandom::new())
            .map_err(|_| "cannot make an ephemeral key: no randomness".to_string())?;
        let public_key =
            private.compute_public_key().map_err(|_| "cannot compute a public key".to_string())?;
        let mut public = [0u8; PUBLIC_KEY_LEN];
        public.copy_from_slice(public_key.as_ref());
        Ok(Handshake { private, public })
    }

    pub fn public(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.public
    }

    /// The tunnel's keys, from the peer's public key and `context`: the signed request text,
    /// so the keys belong to that one request (device, op, id, both sides' choices).
    pub fn finish(self, role: Role, peer_public: &[u8], context: &[u8]) -> Result<Keys, String> {
        if peer_public.len() != PUBLIC_KEY_LEN {
            return Err(format!("the peer's key is {} bytes, not {PUBLIC_KEY_LEN}", peer_public.len()));
        }
        let (operator_public, device_public) = match role {
            Role::Operator => (&self.public[..], peer_public),
            Role::Device => (peer_public, &self.public[..]),
        };
        let peer = UnparsedPublicKey::new(&X25519, peer_public);
        agreement::agree_ephemeral(self.private, &peer, |shared| {
            let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, context);
            let prk = salt.extract(shared);
            let key = |direction: &[u8]| {
                let info = [b"tether tunnel v1 ".as_slice(), direction, operator_public, device_public];
                let okm = prk.expand(&info, &CHACHA20_POLY1305).expect("one key's length is valid for HKDF");
                LessSafeKey::new(UnboundKey::from(okm))
            };
            let (to_device, to_operator) = (key(b"operator to device"), key(b"device to operator"));
            match role {
                Role::Operator => Keys { seal: to_device, open: to_operator },
                Role::Device => Keys { seal: to_operator, open: to_device },
            }
        })
        .map_err(|_| "key agreement failed: the peer's key is not a valid X25519 key".to_string())
    }
}

pub struct Keys {
    seal: LessSafeKey,
    open: LessSafeKey,
}

impl Keys {
    /// `header` (kind and counter, sent in the clear, authenticated) followed by `plaintext`
    /// sealed.
    pub fn seal(&self, header: [u8; 9], plaintext: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(header.len() + plaintext.len() + TAG_LEN);
        self.seal_into(header, plaintext, &mut frame);
        frame
    }

    /// `seal`, appended to `out`, in place: no buffer of its own.
    pub fn seal_into(&self, header: [u8; 9], plaintext: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&header);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .seal
            .seal_in_place_separate_tag(nonce(&header), Aad::from(header), &mut out[start..])
            .expect("a frame is far below ChaCha20-Poly1305's limit");
        out.extend_from_slice(tag.as_ref());
    }

    /// The plaintext of a frame, or None when its tag is wrong (not from the peer, or altered).
    pub fn open(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let header: [u8; 9] = frame.get(..9)?.try_into().ok()?;
        let mut body = frame[9..].to_vec();
        let len = self.open.open_in_place(nonce(&header), Aad::from(header), &mut body).ok()?.len();
        body.truncate(len);
        Some(body)
    }
}

fn nonce(header: &[u8; 9]) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[0] = header[0];
    bytes[4..].copy_from_slice(&header[1..]);
    Nonce::assume_unique_for_key(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreed(context: &[u8], device_context: &[u8]) -> (Keys, Keys) {
        let operator = Handshake::new().unwrap();
        let device = Handshake::new().unwrap();
        let (op_pub, dev_pub) = (*operator.public(), *device.public());
        (
            operator.finish(Role::Operator, &dev_pub, context).unwrap(),
            device.finish(Role::Device, &op_pub, device_context).unwrap(),
        )
    }

    #[test]
    fn each_side_opens_what_the_other_sealed_and_nothing_else() {
        let (operator, device) = agreed(b"request", b"request");
        let frame = operator.seal([0, 0, 0, 0, 0, 0, 0, 0, 7], b"ls -l\n");
        assert_eq!(device.open(&frame).unwrap(), b"ls -l\n");
        assert!(operator.open(&frame).is_none(), "a party must not accept its own frames");
        let back = device.seal([1, 0, 0, 0, 0, 0, 0, 0, 1], b"total 0\n");
        assert_eq!(operator.open(&back).unwrap(), b"total 0\n");
    }

    #[test]
    fn a_changed_header_body_or_context_is_refused() {
        let (operator, device) = agreed(b"request", b"request");
        let frame = operator.seal([0, 0, 0, 0, 0, 0, 0, 0, 7], b"data");
        let mut moved = frame.clone();
        moved[8] = 8; // replayed under another counter
        assert!(device.open(&moved).is_none());
        let mut flipped = frame.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(device.open(&flipped).is_none());
        assert!(device.open(&frame[..8]).is_none());
        let (operator, device) = agreed(b"request", b"another request");
        assert!(device.open(&operator.seal([0; 9], b"x")).is_none());
    }

    #[test]
    fn a_bad_peer_key_is_an_error() {
        let err = Handshake::new().unwrap().finish(Role::Device, &[1, 2, 3], b"").err().unwrap();
        assert!(err.contains("3 bytes"), "{err}");
    }
}
