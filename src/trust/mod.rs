//! Trust that does not depend on the broker: operators sign every request with their SSH keys
//! (OpenSSH's SSHSIG, namespace `tether`, so `ssh-keygen -Y sign` alone makes a valid one) and
//! the device checks them against its authorized_keys; the device signs its answers with a
//! key of its own (namespace `tether-device`), which the very same code, or
//! `ssh-keygen -Y verify`, checks. Apart from `signer` (the operator's side, which talks to
//! ssh-agent or runs ssh-keygen), functions on bytes: files, clocks and topics are the caller's.

mod answer;
mod authorized_keys;
pub mod base64;
mod device_key;
mod key;
mod request;
pub mod signer;
mod sshsig;
mod wire;

use std::fmt;

pub use answer::{verify_answer, Answer, AnswerRefusal, Outcome, ANSWER_VERSION, UNSIGNED_BY};
pub use authorized_keys::{AuthorizedKey, AuthorizedKeys};
pub use device_key::DeviceKey;
pub use key::{fingerprint, KeyError, PublicKey};
pub use request::{
    check_request, verify_init, Addressed, AgeLimit, Request, Verified, CLOCK_SANE_AFTER, MAX_CLOCK_SKEW_S,
    REQUEST_VERSION,
};
pub use sshsig::SshSig;

use crate::text::Printable;

/// Lower-case hex, as sha256sum prints digests.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of `bytes`, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Operators sign requests in this namespace.
pub const REQUEST_NAMESPACE: &str = "tether";
/// Devices sign their answers in this one: an answer can never pass for a request.
pub const DEVICE_NAMESPACE: &str = "tether-device";

/// Why a request is refused; shown to the operator as the `failed` reason, so each names its
/// cause precisely. Text from the network is quoted with control characters escaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No signature at all: whether the op may run unsigned is the caller's decision.
    Unsigned,
    MalformedSignature(&'static str),
    MalformedRequest(String),
    /// A key type, signature algorithm or hash this device does not accept.
    UnsupportedAlgorithm(String),
    WrongNamespace {
        expected: String,
        found: String,
    },
    /// The signer's fingerprint.
    UnknownKey(String),
    /// `signer` as `AuthorizedKey` displays it.
    KeyNotAllowed {
        op: String,
        signer: String,
    },
    BadSignature,
    TooOld {
        age_s: u64,
        max_age_s: u64,
    },
    IssuedInFuture {
        ahead_s: u64,
    },
    OtherDevice(String),
    OtherOp(String),
    OtherId(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unsigned => write!(f, "unsigned request"),
            Refusal::MalformedSignature(why) => write!(f, "malformed signature: {why}"),
            Refusal::MalformedRequest(why) => write!(f, "malformed request: {}", Printable(why)),
            Refusal::UnsupportedAlgorithm(what) => write!(f, "unsupported algorithm: {}", Printable(what)),
            Refusal::WrongNamespace { expected, found } => {
                write!(f, "signature for namespace \"{}\", not \"{expected}\"", Printable(found))
            }
            Refusal::UnknownKey(fingerprint) => {
                write!(f, "unknown key {fingerprint}: not in authorized_keys")
            }
            Refusal::KeyNotAllowed { op, signer } => {
                write!(f, "key {signer} is not allowed op \"{}\"", Printable(op))
            }
            Refusal::BadSignature => write!(f, "bad signature"),
            Refusal::TooOld { age_s, max_age_s } => {
                write!(f, "too old: issued {age_s} s ago, more than max_age_s {max_age_s}")
            }
            Refusal::IssuedInFuture { ahead_s } => write!(
                f,
                "issued {ahead_s} s in the future, more than the {MAX_CLOCK_SKEW_S} s clocks may disagree"
            ),
            Refusal::OtherDevice(device) => write!(f, "signed for another device: \"{}\"", Printable(device)),
            Refusal::OtherOp(op) => write!(f, "signed for another op: \"{}\"", Printable(op)),
            Refusal::OtherId(id) => write!(f, "signed for another id: \"{}\"", Printable(id)),
        }
    }
}
