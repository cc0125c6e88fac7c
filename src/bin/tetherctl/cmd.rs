//! `tetherctl cmd`: one command to one device. The request is a retained `init` on its own
//! topic, so a device that is connecting right now still finds it; the device answers on the
//! same topic; the final answer is printed and the topic cleared so nothing stays behind. A
//! device without a retained status has never reported: the request is refused rather than
//! left waiting for it, unless the operator asked for that (`--queue`). The request is signed
//! when there is a key to sign with (`sign`); the key the device's status presents is checked
//! against known_devices before anything is sent, and the final answer must be signed by it.
//! `tetherctl ops`: the ops a device advertises.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tether::text::Printable;

use tether::net::client::Event;
use tether::protocol::{Status, Topics};
use tether::trust::{verify_answer, Addressed, AnswerRefusal, Outcome, PublicKey, UNSIGNED_BY};

use crate::args::CmdRequest;
use crate::known::{self, KnownDevices, Seen};
use crate::session::{command_id, snapshot, Input, Mode, Session};
use crate::settings::{Settings, TrustSettings};
use crate::{exit, format, print, sign, Failure};

const REQUEST_TAG: u64 = 1;
/// How long to wait for the broker to take a clearing or a re-sent request.
const CONFIRM_WITHIN: Duration = Duration::from_secs(5);

/// What a message on the command's topic says.
pub enum Answer {
    /// The request itself: ours, coming back.
    Request,
    Executing,
    Final {
        successful: bool,
        payload: Value,
    },
    /// An empty payload: the retained request was cleared.
    Cleared,
    Malformed(String),
}

pub fn run(settings: &Settings, req: &CmdRequest) -> Result<u8, Failure> {
    run_shown(settings, req, &print_json)
}

/// How a final state (`{"status", "result"}` or `{"status", "reason"}`) is printed on stdout.
pub type Show = dyn Fn(&Value) -> Result<(), Failure>;

fn print_json(state: &Value) -> Result<(), Failure> {
    print(&serde_json::to_string_pretty(state).unwrap_or_default())
}

/// `run`, printing the final state with `show`.
pub fn run_shown(settings: &Settings, req: &CmdRequest, show: &Show) -> Result<u8, Failure> {
    let topics = Topics::new(&settings.topic_root, &req.device);
    let id = command_id();
    let topic = topics.command(&req.op, &id);
    let mut session = Session::connect(settings, vec![topic.clone(), topics.status()], Mode::Live)?;
    let (request, device_key) = match prepare(settings, req, &id, &mut session) {
        Ok(prepared) => prepared,
        Err(failure) => {
            session.close();
            return Err(failure);
        }
    };
    log::debug!("request on {topic}");
    session.publish(&topic, &request, true, Some(REQUEST_TAG));
    let mut request_stored = false;
    let mut executing = false;
    let deadline = Instant::now() + req.timeout;
    loop {
        match session.next(Some(deadline))? {
            Input::Client(Event::Acked(REQUEST_TAG)) => request_stored = true,
            // A publish not acknowledged before the connection dropped may not have arrived.
            Input::Client(Event::Connected) if !request_stored => {
                session.publish(&topic, &request, true, Some(REQUEST_TAG));
            }
            Input::Client(Event::Message(message)) if message.topic == topic => {
                match classify(&message.payload) {
                    Answer::Request | Answer::Cleared => {}
                    Answer::Executing => {
                        if !executing {
                            eprintln!("{}: {} executing", req.device, req.op);
                        }
                        executing = true;
                        if let Some(by) = awaits_confirm(&message.payload) {
                            eprintln!(
                                "tetherctl: {} applied the rules and reached the broker; it keeps them only if \
                                 `tetherctl firewall {} confirm` comes before {by} (unix time), its answer retained on:",
                                req.device, req.device
                            );
                            print(&topic)?;
                            session.close();
                            return Ok(exit::SUCCESS);
                        }
                    }
                    Answer::Malformed(why) => log::warn!("{}: malformed answer ({why})", Printable(&topic)),
                    Answer::Final { payload, .. } => {
                        let asked = Addressed { device: &req.device, op: &req.op, id: &id };
                        let code = match report(asked, &topic, device_key.as_ref(), &payload, show) {
                            Ok(code) => code,
                            Err(forged) => {
                                session.close();
                                return Err(forged);
                            }
                        };
                        if !session.publish_confirmed(&topic, b"", true, CONFIRM_WITHIN)? {
                            log::warn!("could not clear the retained answer on {topic}");
                        }
                        session.close();
                        return Ok(code);
                    }
                }
            }
            Input::Client(Event::Oversized { topic: t, size }) if t == topic => {
                log::warn!("{}: skipped an answer of {size} bytes, too big", Printable(&topic))
            }
            Input::Client(_) | Input::Ready(_) | Input::Resized | Input::Turn => {}
            Input::TimedOut => {
                let why = format!("no answer from {} within {} s", req.device, req.timeout.as_secs_f64());
                return give_up(session, req, &topic, &request, executing, why, exit::TIMED_OUT);
            }
            Input::Interrupted => {
                return give_up(
                    session,
                    req,
                    &topic,
                    &request,
                    executing,
                    "interrupted".into(),
                    exit::INTERRUPTED,
                )
            }
        }
    }
}

/// What must hold before anything is sent: the device has reported (unless `--queue`), and its
/// key is the one recorded. Then the request, signed if there is a key to sign with, and the
/// key the device's answer must be signed with.
pub fn prepare(
    settings: &Settings,
    req: &CmdRequest,
    id: &str,
    session: &mut Session,
) -> Result<(Vec<u8>, Option<PublicKey>), Failure> {
    let status = Topics::new(&settings.topic_root, &req.device).status();
    let retained = session.retained()?;
    let reported = retained.iter().filter(|m| m.topic == status && !m.payload.is_empty()).last();
    if reported.is_none() {
        let never = format!("{} has never reported: no retained status on {status}", req.device);
        if !req.queue {
            let hint = "check the device id, or use --queue to leave the command for when it appears";
            return Err(Failure { code: exit::NO_DEVICE, message: format!("{never}; {hint}") });
        }
        eprintln!("tetherctl: {never}; the command waits for it (--queue)");
    }
    let device_key = device_key(&settings.trust, &req.device, reported.map(|m| &m.payload[..]))?;
    let request = sign::init_payload(&settings.trust, req, id)?;
    Ok((request, device_key))
}

/// The key the device's answer must be signed with: the one recorded (a status that presents
/// another stops tetherctl here), else the status's, recorded now; None for a device without
/// a key (an agent older than signed answers).
pub fn device_key(
    trust: &TrustSettings,
    device: &str,
    status: Option<&[u8]>,
) -> Result<Option<PublicKey>, Failure> {
    let mut known = KnownDevices::load(trust)?;
    let presented: Option<Status> = status.and_then(|p| serde_json::from_slice(p).ok());
    match known.see(device, presented.as_ref()) {
        Seen::Known(key) => Ok(Some(key)),
        Seen::New(key) => {
            // A key that cannot be written down still checks this answer.
            match known.save() {
                Ok(()) => known::announce_new(&known, &[(device.to_string(), key.fingerprint())]),
                Err(failure) => eprintln!("tetherctl: {}", failure.message),
            }
            Ok(Some(key))
        }
        Seen::NoKey => Ok(known.recorded(device)?.cloned()),
        Seen::Unreadable { line, why } => Err(Failure::config(known.unreadable(device, line, &why))),
        changed @ Seen::Changed { .. } => Err(Failure {
            code: exit::KEY_CHANGED,
            message: format!(
                "the key of {device} has changed: nothing was sent to it.\n{}",
                known::changed_key_warning(device, &changed, &known, trust)
            ),
        }),
    }
}

/// Prints a final answer and returns the exit status it makes. With a key, only the answer
/// text signed by it for exactly this command counts; anything else is rejected as forged.
fn report(
    asked: Addressed,
    topic: &str,
    device_key: Option<&PublicKey>,
    state: &Value,
    show: &Show,
) -> Result<u8, Failure> {
    let Some(key) = device_key else {
        eprintln!(
            "tetherctl: warning: {} has no device key (an agent older than signed answers): its answer \
             cannot be checked",
            asked.device
        );
        return print_final(asked, state, show);
    };
    let fields = state.as_object().cloned().unwrap_or_default();
    let answer = verify_answer(&fields, key, asked).map_err(|why| forged(asked, topic, key, why))?;
    let asker = match answer.by.as_str() {
        UNSIGNED_BY => "an unsigned request".to_string(),
        signer => signer.to_string(),
    };
    eprintln!("tetherctl: {} signed its answer: it ran {} for {asker}", asked.device, asked.op);
    let shown = match answer.outcome {
        Outcome::Successful(result) => json!({"status": "successful", "result": result}),
        Outcome::Failed(reason) => json!({"status": "failed", "reason": reason}),
    };
    print_final(asked, &shown, show)
}

fn forged(asked: Addressed, topic: &str, key: &PublicKey, why: AnswerRefusal) -> Failure {
    Failure {
        code: exit::FORGED_ANSWER,
        message: format!(
            "REJECTED a forged answer: {why}. It is not {device}'s answer to this command (its key is \
             {}): the broker, or someone who can publish on it, may be forging device answers. Its \
             result is not shown; it stays retained on {topic} for inspection (tetherctl cmds {device}).",
            key.fingerprint(),
            device = asked.device,
        ),
    }
}

/// The answer as JSON on stdout, and a failure's reason on stderr.
fn print_final(asked: Addressed, state: &Value, show: &Show) -> Result<u8, Failure> {
    show(state)?;
    if state.get("status").and_then(Value::as_str) == Some("successful") {
        return Ok(exit::SUCCESS);
    }
    let reason = state.get("reason").and_then(Value::as_str).unwrap_or("(no reason given)");
    eprintln!("tetherctl: {} {} failed: {reason}", asked.device, asked.op);
    Ok(exit::FAILED)
}

/// Stops waiting: withdraws the request, or with `--queue` (or when the device has started it
/// and so will answer) leaves it retained and prints its topic.
fn give_up(
    mut session: Session,
    req: &CmdRequest,
    topic: &str,
    request: &[u8],
    executing: bool,
    why: String,
    code: u8,
) -> Result<u8, Failure> {
    let (device, op) = (&req.device, &req.op);
    if executing {
        eprintln!("tetherctl: {why}; {device} started {op}, its answer will be retained on:");
        print(topic)?;
    } else if req.queue {
        // Make sure the broker holds the request: the first publish may have been lost.
        if !session.publish_confirmed(topic, request, true, CONFIRM_WITHIN)? {
            session.close();
            return Err(Failure::error(format!("{why}; and the broker did not confirm the queued request")));
        }
        eprintln!("tetherctl: {why}; the command stays queued for {device}, retained on:");
        print(topic)?;
    } else if session.publish_confirmed(topic, b"", true, CONFIRM_WITHIN)? {
        eprintln!("tetherctl: {why}; the command was withdrawn");
    } else {
        eprintln!("tetherctl: {why}; could not withdraw the command, it may still be retained on {topic}");
    }
    session.close();
    Ok(code)
}

/// A firewall change waiting for the operator's confirm (docs/firewall.md): until when.
fn awaits_confirm(payload: &[u8]) -> Option<u64> {
    let state: Value = serde_json::from_slice(payload).ok()?;
    let progress = state.get("progress")?;
    (progress.get("phase")?.as_str()? == "awaiting confirm")
        .then(|| progress["confirm_by"].as_u64().unwrap_or(0))
}

pub fn classify(payload: &[u8]) -> Answer {
    if payload.is_empty() {
        return Answer::Cleared;
    }
    let value: Value = match serde_json::from_slice(payload) {
        Ok(value) => value,
        Err(e) => return Answer::Malformed(format!("{e}: {}", format::raw(payload))),
    };
    // By the status alone, so an answer with odd other fields still ends the wait.
    match value.get("status").and_then(Value::as_str) {
        Some("init") => Answer::Request,
        Some("executing") => Answer::Executing,
        Some(status @ ("successful" | "failed")) => {
            Answer::Final { successful: status == "successful", payload: value }
        }
        _ => Answer::Malformed(format!("no known status: {}", format::raw(payload))),
    }
}

/// `tetherctl ops DEVICE`: the ops with a retained `{}` on `ROOT/DEVICE/cmd/OP`.
pub fn list_ops(settings: &Settings, device: &str, json: bool) -> Result<u8, Failure> {
    let topics = Topics::new(&settings.topic_root, device);
    let prefix = topics.command_op("");
    let mut ops = BTreeMap::new();
    for message in snapshot(settings, vec![topics.command_op("+")])? {
        if let Some(op) = message.topic.strip_prefix(&prefix) {
            ops.insert(op.to_string(), !message.payload.is_empty());
        }
    }
    let ops: Vec<String> = ops.into_iter().filter(|(_, advertised)| *advertised).map(|(op, _)| op).collect();
    if ops.is_empty() {
        log::warn!("{device} advertises no ops (is the device id right?)");
    }
    if json {
        print(&serde_json::to_string(&ops).unwrap_or_default())?;
    } else if !ops.is_empty() {
        print(&ops.join("\n"))?;
    }
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert!(matches!(classify(b""), Answer::Cleared));
        assert!(matches!(classify(br#"{"status":"init","n":1}"#), Answer::Request));
        assert!(matches!(classify(br#"{"status":"executing"}"#), Answer::Executing));
        assert!(matches!(
            classify(br#"{"status":"successful","result":{}}"#),
            Answer::Final { successful: true, .. }
        ));
        let Answer::Final { successful: false, payload } =
            classify(br#"{"status":"failed","reason":"nope"}"#)
        else {
            panic!("not failed")
        };
        assert_eq!(payload["reason"], "nope");
        assert!(matches!(classify(br#"{"status":"failed"}"#), Answer::Final { successful: false, .. }));
        assert!(matches!(classify(b"{oops"), Answer::Malformed(_)));
        assert!(matches!(classify(br#"{"status":5}"#), Answer::Malformed(_)));
        assert!(matches!(classify(b"[]"), Answer::Malformed(_)));
    }

    #[test]
    fn a_firewall_change_awaiting_the_operators_confirm() {
        let waiting =
            br#"{"status":"executing","progress":{"phase":"awaiting confirm","confirm_by":1796455000}}"#;
        assert_eq!(awaits_confirm(waiting), Some(1796455000));
        assert_eq!(awaits_confirm(br#"{"status":"executing","progress":{"phase":"checking"}}"#), None);
        assert_eq!(awaits_confirm(br#"{"status":"executing"}"#), None);
    }
}
