//! A signed request. The operator signs the *request text*, one line of JSON that binds
//! everything giving the request its meaning:
//!
//! `{"v":1,"device":"dev1","op":"reboot","id":"r1","issued":1796400000,"params":{}}`
//!
//! and the retained init carries that text verbatim, as a string, with the armored signature:
//!
//! `{"status":"init","request":"<request text>","sig":"-----BEGIN SSH SIGNATURE-----\n..."}`
//!
//! The signature covers the text's exact bytes, so no JSON canonicalisation is needed on either
//! side; the device reads device, op, id and params from the signed text only, and then checks
//! that they match the topic it came on.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{AuthorizedKey, AuthorizedKeys, Refusal, REQUEST_NAMESPACE};

/// The version of the request text's format this code reads and writes.
pub const REQUEST_VERSION: u64 = 1;
/// How far ahead of the device's clock a request may say it was issued: operators' and
/// devices' clocks disagree by a little.
pub const MAX_CLOCK_SKEW_S: u64 = 300;
/// A clock earlier than this is not set (a board without a battery starts at 1970): ages are
/// not checked then. The build's SOURCE_DATE_EPOCH when set (builds stay reproducible), and
/// never before 2026-12-04, when this was written (build.rs).
pub const CLOCK_SANE_AFTER: u64 = parse_decimal(env!("TETHER_CLOCK_SANE_AFTER"));

const fn parse_decimal(text: &str) -> u64 {
    let bytes = text.as_bytes();
    let mut value = 0u64;
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i].is_ascii_digit(), "TETHER_CLOCK_SANE_AFTER: not a number");
        value = value * 10 + (bytes[i] - b'0') as u64;
        i += 1;
    }
    value
}

/// The request text. Unknown and repeated keys are refused: every key of a signed text means
/// something, and two readers of one text must never see two requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u64,
    pub device: String,
    pub op: String,
    pub id: String,
    /// Unix seconds, by the operator's clock.
    pub issued: u64,
    #[serde(default)]
    pub params: Map<String, Value>,
}

impl Request {
    pub fn new(device: &str, op: &str, id: &str, issued: u64, params: Map<String, Value>) -> Request {
        Request {
            v: REQUEST_VERSION,
            device: device.to_string(),
            op: op.to_string(),
            id: id.to_string(),
            issued,
            params,
        }
    }

    /// The text to sign, one line, keys in the order above.
    pub fn to_text(&self) -> String {
        // A struct of strings, numbers and a JSON map always encodes.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_text(text: &str) -> Result<Request, Refusal> {
        let request: Request = serde_json::from_str(text)
            .map_err(|e| Refusal::MalformedRequest(format!("request text: {e}")))?;
        if request.v != REQUEST_VERSION {
            return Err(Refusal::MalformedRequest(format!(
                "request version {} (this agent reads 1)",
                request.v
            )));
        }
        Ok(request)
    }
}

/// A request whose signature checked out, and who signed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub request: Request,
    pub signer: AuthorizedKey,
}

/// Where a request arrived: the topic's device, op and id, which the signed text must name.
#[derive(Debug, Clone, Copy)]
pub struct Addressed<'a> {
    pub device: &'a str,
    pub op: &'a str,
    pub id: &'a str,
}

/// How old a request may be, and from when the device's clock is trusted to say.
#[derive(Debug, Clone, Copy)]
pub struct AgeLimit {
    pub max_age_s: u64,
    pub clock_sane_after: u64,
}

/// Checks the `request` and `sig` of an init (its keys beside `status`) against the trusted
/// keys. `Unsigned` when there is no `sig`: the caller decides whether the op may run
/// unsigned. A signed init may carry nothing else, as nothing else is signed.
pub fn verify_init(init: &Map<String, Value>, keys: &AuthorizedKeys) -> Result<Verified, Refusal> {
    let Some(sig) = init.get("sig") else { return Err(Refusal::Unsigned) };
    let sig = sig.as_str().ok_or(Refusal::MalformedSignature("\"sig\" is not a string"))?;
    let text = match init.get("request") {
        Some(Value::String(text)) => text,
        _ => return Err(Refusal::MalformedRequest("no \"request\" string beside \"sig\"".into())),
    };
    if let Some(stray) = init.keys().find(|k| !["status", "request", "sig"].contains(&k.as_str())) {
        return Err(Refusal::MalformedRequest(format!("\"{stray}\" is outside the signed request")));
    }
    let signer = keys.verify(sig, REQUEST_NAMESPACE, text.as_bytes())?;
    let request = Request::from_text(text)?;
    if !signer.allows(&request.op) {
        return Err(Refusal::KeyNotAllowed { op: request.op, signer: signer.to_string() });
    }
    Ok(Verified { request, signer: signer.clone() })
}

/// Checks that a verified request was signed for this device, op and id, and is fresh: a
/// request lifted from another topic or replayed long after is refused. The age is checked
/// only while the clock is sane (`now` after `limit.clock_sane_after`); before that, queued
/// requests still run, and the command ledger still stops an id running twice.
pub fn check_request(request: &Request, at: Addressed, now: u64, limit: AgeLimit) -> Result<(), Refusal> {
    if request.device != at.device {
        return Err(Refusal::OtherDevice(request.device.clone()));
    }
    if request.op != at.op {
        return Err(Refusal::OtherOp(request.op.clone()));
    }
    if request.id != at.id {
        return Err(Refusal::OtherId(request.id.clone()));
    }
    if now < limit.clock_sane_after {
        return Ok(());
    }
    if request.issued > now.saturating_add(MAX_CLOCK_SKEW_S) {
        return Err(Refusal::IssuedInFuture { ahead_s: request.issued - now });
    }
    let age_s = now.saturating_sub(request.issued);
    if age_s > limit.max_age_s {
        return Err(Refusal::TooOld { age_s, max_age_s: limit.max_age_s });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{DeviceKey, DEVICE_NAMESPACE};
    use serde_json::json;

    const NOW: u64 = CLOCK_SANE_AFTER + 1_000_000;
    const WEEK: AgeLimit = AgeLimit { max_age_s: 7 * 86_400, clock_sane_after: CLOCK_SANE_AFTER };
    const AT: Addressed = Addressed { device: "dev1", op: "reboot", id: "r1" };

    fn reboot(issued: u64) -> Request {
        Request::new("dev1", "reboot", "r1", issued, Map::new())
    }

    /// A key made with ring stands in for an operator's: the OpenSSH-made ones are in
    /// tests/trust.rs.
    fn operator(options: &str) -> (DeviceKey, AuthorizedKeys) {
        let key = DeviceKey::load(&DeviceKey::generate().unwrap()).unwrap();
        let keys = AuthorizedKeys::parse(&format!("{options}{}", key.openssh_public("op@test")));
        assert_eq!(keys.len(), 1);
        (key, keys)
    }

    fn init(text: &str, sig: &str) -> Map<String, Value> {
        json!({"request": text, "sig": sig}).as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn the_request_text_is_one_line_in_a_fixed_order() {
        let text = reboot(1796400000).to_text();
        assert_eq!(
            text,
            r#"{"v":1,"device":"dev1","op":"reboot","id":"r1","issued":1796400000,"params":{}}"#
        );
        assert_eq!(Request::from_text(&text), Ok(reboot(1796400000)));
        let v2 = text.replace("\"v\":1", "\"v\":2");
        assert_eq!(
            Request::from_text(&v2).unwrap_err().to_string(),
            "malformed request: request version 2 (this agent reads 1)"
        );
        for bad in [text.replace("\"params\"", "\"extra\""), text.replace("\"op\"", "\"device\"")] {
            assert!(matches!(Request::from_text(&bad), Err(Refusal::MalformedRequest(_))), "{bad}");
        }
    }

    #[test]
    fn a_signed_init_verifies_and_names_its_signer() {
        let (key, keys) = operator("");
        let text = reboot(NOW).to_text();
        let verified =
            verify_init(&init(&text, &key.sign_sshsig(REQUEST_NAMESPACE, text.as_bytes())), &keys).unwrap();
        assert_eq!((verified.request, verified.signer.comment.as_str()), (reboot(NOW), "op@test"));
        assert_eq!(verified.signer.fingerprint, key.fingerprint());
    }

    #[test]
    fn inits_that_are_not_exactly_a_signed_request_are_refused() {
        let (key, keys) = operator("");
        let text = reboot(NOW).to_text();
        let sig = key.sign_sshsig(REQUEST_NAMESPACE, text.as_bytes());
        let refused = |init: Map<String, Value>| verify_init(&init, &keys).unwrap_err();
        assert_eq!(refused(Map::new()), Refusal::Unsigned);
        assert_eq!(
            refused(init(&text, "").into_iter().filter(|(k, _)| k != "sig").collect()),
            Refusal::Unsigned
        );
        let mut stray = init(&text, &sig);
        stray.insert("force".into(), json!(true));
        assert_eq!(refused(stray).to_string(), "malformed request: \"force\" is outside the signed request");
        let mut no_text = init(&text, &sig);
        no_text.insert("request".into(), json!({"op": "reboot"}));
        assert!(matches!(refused(no_text), Refusal::MalformedRequest(_)));
        assert_eq!(refused(init(&text.replace("r1", "r2"), &sig)), Refusal::BadSignature);
        let device_answer = key.sign_sshsig(DEVICE_NAMESPACE, text.as_bytes());
        assert!(matches!(refused(init(&text, &device_answer)), Refusal::WrongNamespace { .. }));
        let (stranger, _) = operator("");
        let unknown = stranger.sign_sshsig(REQUEST_NAMESPACE, text.as_bytes());
        assert_eq!(refused(init(&text, &unknown)), Refusal::UnknownKey(stranger.fingerprint()));
        let garbage = "garbage".to_string();
        let signed_garbage = key.sign_sshsig(REQUEST_NAMESPACE, garbage.as_bytes());
        assert!(matches!(refused(init(&garbage, &signed_garbage)), Refusal::MalformedRequest(_)));
    }

    #[test]
    fn a_restricted_key_may_request_its_ops_only() {
        let (key, keys) = operator("ops=\"ping,config\" ");
        let signed = |op: &str| {
            let text = Request::new("dev1", op, "r1", NOW, Map::new()).to_text();
            verify_init(&init(&text, &key.sign_sshsig(REQUEST_NAMESPACE, text.as_bytes())), &keys)
        };
        assert!(signed("ping").is_ok());
        assert_eq!(
            signed("reboot").unwrap_err().to_string(),
            format!("key op@test {} is not allowed op \"reboot\"", key.fingerprint())
        );
    }

    #[test]
    fn a_request_must_name_its_topic() {
        assert_eq!(check_request(&reboot(NOW), AT, NOW, WEEK), Ok(()));
        let other = |device: &str, op: &str, id: &str| {
            check_request(&Request::new(device, op, id, NOW, Map::new()), AT, NOW, WEEK).unwrap_err()
        };
        assert_eq!(other("dev2", "reboot", "r1"), Refusal::OtherDevice("dev2".into()));
        assert_eq!(other("dev1", "ping", "r1"), Refusal::OtherOp("ping".into()));
        assert_eq!(other("dev1", "reboot", "r0").to_string(), "signed for another id: \"r0\"");
    }

    #[test]
    fn age_is_checked_only_on_a_sane_clock() {
        let age = |issued: u64, now: u64| check_request(&reboot(issued), AT, now, WEEK);
        assert_eq!(age(NOW - WEEK.max_age_s, NOW), Ok(()));
        assert_eq!(
            age(NOW - WEEK.max_age_s - 1, NOW),
            Err(Refusal::TooOld { age_s: 604_801, max_age_s: 604_800 })
        );
        assert_eq!(age(NOW + MAX_CLOCK_SKEW_S, NOW), Ok(()));
        assert_eq!(age(NOW + 301, NOW), Err(Refusal::IssuedInFuture { ahead_s: 301 }));
        assert_eq!(age(NOW - 30 * 86_400, 86_400), Ok(()), "a board whose clock starts at 1970");
        assert_eq!(
            age(0, NOW).unwrap_err().to_string(),
            format!("too old: issued {NOW} s ago, more than max_age_s 604800")
        );
    }
}
