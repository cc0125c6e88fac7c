//! A device's signed answer. The device signs the *answer text*, one line of JSON that binds
//! the outcome to the request it answers and says who asked:
//!
//! `{"v":1,"device":"dev1","op":"reboot","id":"r1","status":"successful","result":{},"by":"alice SHA256:..."}`
//!
//! (`"reason":"..."` in place of `"result"` when `failed`; `"by":"unsigned"` for an unsigned
//! request), and the final state carries it verbatim beside the readable fields, with the
//! armored signature by the device key in namespace `tether-device`:
//!
//! `{"status":"successful","result":{},"by":"...","answer":"<answer text>","sig":"-----BEGIN SSH SIGNATURE-----\n..."}`
//!
//! An operator's tool believes the answer text only: the fields beside it are for people and
//! for tools that do not check signatures.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::fmt;

use super::{Addressed, DeviceKey, PublicKey, Refusal, SshSig, DEVICE_NAMESPACE};
use crate::text::Printable;

/// The version of the answer text's format this code reads and writes.
pub const ANSWER_VERSION: u64 = 1;
/// `by` for a request that came without a signature.
pub const UNSIGNED_BY: &str = "unsigned";

/// How a command ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Successful(Value),
    Failed(String),
}

impl Outcome {
    /// `successful` or `failed`, as the `status` of a final state.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Successful(_) => "successful",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// The answer text's content.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub device: String,
    pub op: String,
    pub id: String,
    pub outcome: Outcome,
    /// Who asked: the signer as `AuthorizedKey` displays it (`comment SHA256:...`), or
    /// `UNSIGNED_BY`.
    pub by: String,
}

/// The answer text as it is written: serde keeps the field order, which is the text's.
/// Unknown and repeated keys are refused, as in a request text.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerText {
    v: u64,
    device: String,
    op: String,
    id: String,
    status: String,
    /// Present (even as `null`) exactly when successful.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    by: String,
}

/// A key given as `null` is present: `"result":null` is a result.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl Answer {
    pub fn new(at: Addressed, outcome: Outcome, by: &str) -> Answer {
        Answer {
            device: at.device.to_string(),
            op: at.op.to_string(),
            id: at.id.to_string(),
            outcome,
            by: by.to_string(),
        }
    }

    /// The text to sign, one line, keys in the order above.
    pub fn to_text(&self) -> String {
        let (result, reason) = match &self.outcome {
            Outcome::Successful(result) => (Some(result.clone()), None),
            Outcome::Failed(reason) => (None, Some(reason.clone())),
        };
        let text = AnswerText {
            v: ANSWER_VERSION,
            device: self.device.clone(),
            op: self.op.clone(),
            id: self.id.clone(),
            status: self.outcome.status().to_string(),
            result,
            reason,
            by: self.by.clone(),
        };
        // Strings and a JSON value always encode.
        serde_json::to_string(&text).unwrap_or_default()
    }

    pub fn from_text(text: &str) -> Result<Answer, String> {
        let t: AnswerText = serde_json::from_str(text).map_err(|e| format!("answer text: {e}"))?;
        if t.v != ANSWER_VERSION {
            return Err(format!("answer version {} (this tetherctl reads {ANSWER_VERSION})", t.v));
        }
        let outcome = match (t.status.as_str(), t.result, t.reason) {
            ("successful", Some(result), None) => Outcome::Successful(result),
            ("failed", None, Some(reason)) => Outcome::Failed(reason),
            (status, ..) => {
                return Err(format!(
                    "answer text: \"successful\" goes with \"result\", \"failed\" with \"reason\" \
                     (status \"{}\")",
                    Printable(status)
                ))
            }
        };
        Ok(Answer { device: t.device, op: t.op, id: t.id, outcome, by: t.by })
    }

    /// The final state to publish: the readable fields, the answer text and its signature by
    /// `key`.
    pub fn signed_state(&self, key: &DeviceKey) -> Map<String, Value> {
        let text = self.to_text();
        let sig = key.sign_sshsig(DEVICE_NAMESPACE, text.as_bytes());
        let mut state = self.readable_state();
        state.insert("answer".into(), text.into());
        state.insert("sig".into(), sig.into());
        state
    }

    /// The final state's readable fields alone: what a device without a key publishes.
    pub fn readable_state(&self) -> Map<String, Value> {
        let mut state = Map::new();
        state.insert("status".into(), self.outcome.status().into());
        match &self.outcome {
            Outcome::Successful(result) => state.insert("result".into(), result.clone()),
            Outcome::Failed(reason) => state.insert("reason".into(), reason.as_str().into()),
        };
        state.insert("by".into(), self.by.as_str().into());
        state
    }
}

/// Why an answer is not believed.
#[derive(Debug, Clone, PartialEq)]
pub enum AnswerRefusal {
    /// No `answer` and `sig`: an agent without a key, or someone who has none to sign with.
    Unsigned,
    Malformed(String),
    /// The signature does not check out with the device's key: made by another key
    /// (`UnknownKey`), over other bytes, in another namespace.
    Signature(Refusal),
    /// The signed text answers something else than what was asked.
    Mismatch {
        field: &'static str,
        asked: String,
        signed: String,
    },
}

impl fmt::Display for AnswerRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnswerRefusal::Unsigned => write!(f, "the answer is not signed"),
            AnswerRefusal::Malformed(why) => write!(f, "malformed answer: {}", Printable(why)),
            AnswerRefusal::Signature(Refusal::UnknownKey(fingerprint)) => {
                write!(f, "signed by another key, {fingerprint}")
            }
            AnswerRefusal::Signature(refusal) => write!(f, "{refusal}"),
            AnswerRefusal::Mismatch { field, asked, signed } => write!(
                f,
                "signed as the answer for {field} \"{}\", not \"{}\"",
                Printable(signed),
                Printable(asked)
            ),
        }
    }
}

/// Checks a final state (`successful` or `failed`) against the device's key and what was
/// asked; the signed answer it carries when it is the device's answer to exactly that.
pub fn verify_answer(
    state: &Map<String, Value>,
    key: &PublicKey,
    asked: Addressed,
) -> Result<Answer, AnswerRefusal> {
    let (Some(text), Some(sig)) = (state.get("answer"), state.get("sig")) else {
        return Err(AnswerRefusal::Unsigned);
    };
    let (Some(text), Some(sig)) = (text.as_str(), sig.as_str()) else {
        return Err(AnswerRefusal::Malformed("\"answer\" and \"sig\" must be strings".into()));
    };
    let sig = SshSig::from_armored(sig).map_err(AnswerRefusal::Signature)?;
    sig.verify(key, DEVICE_NAMESPACE, text.as_bytes()).map_err(AnswerRefusal::Signature)?;
    let answer = Answer::from_text(text).map_err(AnswerRefusal::Malformed)?;
    let status = state.get("status").and_then(Value::as_str).unwrap_or_default();
    let pairs = [
        ("device", asked.device, answer.device.as_str()),
        ("op", asked.op, answer.op.as_str()),
        ("id", asked.id, answer.id.as_str()),
        ("status", status, answer.outcome.status()),
    ];
    if let Some((field, asked, signed)) = pairs.into_iter().find(|(_, asked, signed)| asked != signed) {
        return Err(AnswerRefusal::Mismatch { field, asked: asked.into(), signed: signed.into() });
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const AT: Addressed = Addressed { device: "dev1", op: "reboot", id: "r1" };

    fn device() -> DeviceKey {
        DeviceKey::load(&DeviceKey::generate().unwrap()).unwrap()
    }

    fn rebooted() -> Answer {
        Answer::new(AT, Outcome::Successful(json!({"boot_id": "b"})), "alice SHA256:x")
    }

    #[test]
    fn the_answer_text_is_one_line_in_a_fixed_order() {
        let text = rebooted().to_text();
        assert_eq!(
            text,
            r#"{"v":1,"device":"dev1","op":"reboot","id":"r1","status":"successful","result":{"boot_id":"b"},"by":"alice SHA256:x"}"#
        );
        assert_eq!(Answer::from_text(&text), Ok(rebooted()));
        let failed = Answer::new(AT, Outcome::Failed("no".into()), UNSIGNED_BY);
        assert_eq!(
            failed.to_text(),
            r#"{"v":1,"device":"dev1","op":"reboot","id":"r1","status":"failed","reason":"no","by":"unsigned"}"#
        );
        assert_eq!(Answer::from_text(&failed.to_text()), Ok(failed));
        let null = Answer::new(AT, Outcome::Successful(Value::Null), "b");
        assert_eq!(Answer::from_text(&null.to_text()), Ok(null));
    }

    #[test]
    fn answer_texts_that_say_two_things_or_unknown_ones_are_refused() {
        let text = rebooted().to_text();
        let both = text.replace("\"by\"", "\"reason\":\"no\",\"by\"");
        let failed_with_result = text.replace("successful", "failed");
        let v2 = text.replace("\"v\":1", "\"v\":2");
        let extra = text.replace("\"by\"", "\"extra\":1,\"by\"");
        let repeated = text.replace("\"id\":\"r1\"", "\"id\":\"r1\",\"id\":\"r0\"");
        for bad in [both, failed_with_result, v2, extra, repeated] {
            assert!(Answer::from_text(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_signed_state_verifies_with_the_devices_key_for_what_was_asked_only() {
        let key = device();
        let state = rebooted().signed_state(&key);
        assert_eq!(
            (&state["status"], &state["result"], &state["by"]),
            (&json!("successful"), &json!({"boot_id": "b"}), &json!("alice SHA256:x"))
        );
        assert_eq!(verify_answer(&state, key.public_key(), AT), Ok(rebooted()));

        let other = Addressed { id: "r2", ..AT };
        assert_eq!(
            verify_answer(&state, key.public_key(), other).unwrap_err().to_string(),
            "signed as the answer for id \"r1\", not \"r2\""
        );
        let stranger = device();
        assert_eq!(
            verify_answer(&rebooted().signed_state(&stranger), key.public_key(), AT),
            Err(AnswerRefusal::Signature(Refusal::UnknownKey(stranger.fingerprint())))
        );
        let mut relabelled = state.clone();
        relabelled.insert("status".into(), json!("failed"));
        assert!(matches!(
            verify_answer(&relabelled, key.public_key(), AT),
            Err(AnswerRefusal::Mismatch { field: "status", .. })
        ));
        let mut edited = state.clone();
        let text = edited["answer"].as_str().unwrap().replace("\"b\"", "\"c\"");
        edited.insert("answer".into(), text.into());
        assert_eq!(
            verify_answer(&edited, key.public_key(), AT),
            Err(AnswerRefusal::Signature(Refusal::BadSignature))
        );
        let unsigned = json!({"status": "successful", "result": {}}).as_object().cloned().unwrap();
        assert_eq!(verify_answer(&unsigned, key.public_key(), AT), Err(AnswerRefusal::Unsigned));
    }
}
