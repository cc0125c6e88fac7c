//! `tetherctl cmd`: one command to one device. The request is a retained `init` on its own
//! topic, so a device that is connecting right now still finds it; the device answers on the
//! same topic; the final answer is printed and the topic cleared so nothing stays behind. A
//! device without a retained status has never reported: the request is refused rather than
//! left waiting for it, unless the operator asked for that (`--queue`).
//! `tetherctl ops`: the ops a device advertises.

use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tether::text::Printable;

use tether::net::client::Event;
use tether::protocol::{CommandState, Topics};

use crate::args::CmdRequest;
use crate::format;
use crate::session::{command_id, snapshot, Input, Mode, Session};
use crate::settings::Settings;
use crate::{exit, print, Failure};

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
        reason: Option<String>,
        payload: Value,
    },
    /// An empty payload: the retained request was cleared.
    Cleared,
    Malformed(String),
}

pub fn run(settings: &Settings, req: &CmdRequest) -> Result<u8, Failure> {
    let topics = Topics::new(&settings.topic_root, &req.device);
    let topic = topics.command(&req.op, &command_id());
    let request = CommandState::Init { params: req.params.clone() }.to_payload();
    let mut session = Session::connect(settings, vec![topic.clone(), topics.status()], Mode::Live)?;
    let status = topics.status();
    if !session.retained()?.iter().any(|m| m.topic == status && !m.payload.is_empty()) {
        let never = format!("{} has never reported: no retained status on {status}", req.device);
        if !req.queue {
            session.close();
            let hint = "check the device id, or use --queue to leave the command for when it appears";
            return Err(Failure { code: exit::NO_DEVICE, message: format!("{never}; {hint}") });
        }
        eprintln!("tetherctl: {never}; the command waits for it (--queue)");
    }
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
                    }
                    Answer::Malformed(why) => log::warn!("{}: malformed answer ({why})", Printable(&topic)),
                    Answer::Final { successful, reason, payload } => {
                        let text = serde_json::to_string_pretty(&payload).unwrap_or_default();
                        print(&text)?;
                        if let Some(reason) = reason {
                            eprintln!("tetherctl: {} {} failed: {reason}", req.device, req.op);
                        }
                        if !session.publish_confirmed(&topic, b"", true, CONFIRM_WITHIN)? {
                            log::warn!("could not clear the retained answer on {topic}");
                        }
                        session.close();
                        return Ok(if successful { exit::SUCCESS } else { exit::FAILED });
                    }
                }
            }
            Input::Client(Event::Oversized { topic: t, size }) if t == topic => {
                log::warn!("{}: skipped an answer of {size} bytes, too big", Printable(&topic))
            }
            Input::Client(_) => {}
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
        Some(status @ ("successful" | "failed")) => Answer::Final {
            successful: status == "successful",
            reason: (status == "failed").then(|| {
                value.get("reason").and_then(Value::as_str).unwrap_or("(no reason given)").to_string()
            }),
            payload: value,
        },
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
            Answer::Final { successful: true, reason: None, .. }
        ));
        let Answer::Final { successful: false, reason: Some(reason), .. } =
            classify(br#"{"status":"failed","reason":"nope"}"#)
        else {
            panic!("not failed")
        };
        assert_eq!(reason, "nope");
        assert!(matches!(classify(br#"{"status":"failed"}"#), Answer::Final { successful: false, .. }));
        assert!(matches!(classify(b"{oops"), Answer::Malformed(_)));
        assert!(matches!(classify(br#"{"status":5}"#), Answer::Malformed(_)));
        assert!(matches!(classify(b"[]"), Answer::Malformed(_)));
    }
}
