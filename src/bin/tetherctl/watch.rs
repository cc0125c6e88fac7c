//! `tetherctl watch`: heartbeats and status changes as they arrive, until a signal.

use mqttbytes::v4::Publish;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{ErrorKind, Write};
use std::time::{SystemTime, UNIX_EPOCH};
use tether::text::Printable;

use tether::protocol::{
    fleet_heartbeat_filter, fleet_status_filter, split_device_topic, Heartbeat, Status, Topics,
};

use crate::format::{self, heartbeat_line, status_line};
use crate::session::{Input, Mode, Session};
use crate::settings::Settings;
use crate::{exit, Failure};
use tether::net::client::Event;

pub fn run(settings: &Settings, device: Option<&str>, json: bool) -> Result<u8, Failure> {
    let root = &settings.topic_root;
    let filters = match device {
        Some(device) => {
            let topics = Topics::new(root, device);
            vec![topics.status(), topics.heartbeat()]
        }
        None => vec![fleet_status_filter(root), fleet_heartbeat_filter(root)],
    };
    let mut session = Session::connect(settings, filters, Mode::Live)?;
    let mut stdout = std::io::stdout().lock();
    loop {
        let line = match session.next(None)? {
            Input::Client(Event::Message(message)) => render(root, &message, json),
            Input::Client(Event::Oversized { topic, size }) => {
                log::warn!("{}: skipped a message of {size} bytes, too big", Printable(&topic));
                None
            }
            Input::Client(_) | Input::TimedOut | Input::Ready(_) | Input::Resized | Input::Turn => None,
            Input::Interrupted => {
                session.close();
                return Ok(exit::SUCCESS);
            }
        };
        let Some(line) = line else { continue };
        if let Err(e) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
            session.close();
            // Whoever read our output (`| head`) has had enough: a normal way to stop.
            return match e.kind() {
                ErrorKind::BrokenPipe => Ok(exit::SUCCESS),
                _ => Err(Failure::error(format!("stdout: {e}"))),
            };
        }
    }
}

/// One line for a status or heartbeat message; None for other topics.
fn render(root: &str, message: &Publish, json: bool) -> Option<String> {
    let (device, kind) = split_device_topic(root, &message.topic)?;
    if kind != "status" && kind != "heartbeat" {
        return None;
    }
    let payload: Option<Result<Value, _>> =
        (!message.payload.is_empty()).then(|| serde_json::from_slice::<Value>(&message.payload));
    if json {
        let payload = match payload {
            None => Value::Null,
            Some(Ok(value)) => value,
            Some(Err(e)) => {
                log::warn!("{}: not JSON ({e})", Printable(&message.topic));
                Value::String(String::from_utf8_lossy(&message.payload).into_owned())
            }
        };
        let line = json!({
            "device": device,
            "topic": message.topic,
            "kind": kind,
            "retained": message.retain,
            "payload": payload,
        });
        return Some(line.to_string());
    }

    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let malformed = |why: String| {
        log::warn!("{}: malformed {kind} ({why})", Printable(&message.topic));
        format!(
            "{} {device} {kind} (malformed) {}",
            tether::logging::utc_time(now),
            format::raw(&message.payload)
        )
    };
    let mut line = match payload {
        None => format!("{} {device} {kind} cleared", tether::logging::utc_time(now)),
        Some(Err(e)) => malformed(e.to_string()),
        Some(Ok(value)) if kind == "heartbeat" => match Heartbeat::deserialize(&value) {
            Ok(heartbeat) => heartbeat_line(device, &heartbeat),
            Err(e) => malformed(e.to_string()),
        },
        Some(Ok(value)) => match Status::deserialize(&value) {
            Ok(status) => status_line(device, &status, now),
            Err(e) => malformed(e.to_string()),
        },
    };
    if message.retain {
        line.push_str(" (retained)");
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, payload: &[u8], retain: bool) -> Publish {
        let mut p = Publish::new(topic, mqttbytes::QoS::AtLeastOnce, payload.to_vec());
        p.retain = retain;
        p
    }

    #[test]
    fn statuses_and_malformed_payloads() {
        let online = br#"{"online":true,"version":"0.1.0","arch":"armv7","since":0}"#;
        assert_eq!(
            render("r", &message("r/d1/status", online, true), false).unwrap(),
            "1970-01-01T00:00:00Z d1 online v0.1.0 armv7 (retained)"
        );
        let offline = render("r", &message("r/d1/status", br#"{"online":false}"#, false), false).unwrap();
        assert!(offline.ends_with(" d1 OFFLINE"), "{offline}");
        let garbage = render("r", &message("r/d1/heartbeat", b"\xff{oops", false), false).unwrap();
        assert!(garbage.ends_with("d1 heartbeat (malformed) \"\u{fffd}{oops\""), "{garbage}");
        let wrong_shape = render("r", &message("r/d1/heartbeat", b"{\"seq\":\"x\"}", false), false).unwrap();
        assert!(wrong_shape.contains("(malformed)"), "{wrong_shape}");
        assert!(render("r", &message("r/d1/other", b"{}", false), false).is_none());
    }

    #[test]
    fn json_lines() {
        let line = render("r", &message("r/d1/heartbeat", b"not json", true), true).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({"device":"d1","topic":"r/d1/heartbeat","kind":"heartbeat","retained":true,"payload":"not json"})
        );
        let cleared = render("r", &message("r/d1/status", b"", false), true).unwrap();
        assert!(cleared.contains("\"payload\":null"), "{cleared}");
    }
}
