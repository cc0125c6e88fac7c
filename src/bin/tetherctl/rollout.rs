//! `tetherctl update`: one update flow (docs/updates.md) to many devices, in waves. Every device
//! gets the same command id (the rollout's id), so `tetherctl update status ID` finds the
//! rollout again later from the retained states alone. Each request is signed for its device;
//! each final answer must be signed by the device's recorded key.
//!
//! A wave is sent to `--batch` devices and waited for until each is final, or offline (its flow
//! stays queued, retained, and the device is reported pending). Once `--max-failures` devices
//! failed, no more waves go. Exit 0: all successful; 1: some failed or the rollout stopped; 2:
//! some still pending.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tether::agent::update::flow::Flow;
use tether::net::client::Event;
use tether::protocol::{fleet_heartbeat_filter, fleet_status_filter, split_device_topic, Status, Topics};
use tether::trust::{verify_answer, Addressed, Outcome};

use crate::args::CmdRequest;
use crate::cmd::{classify, device_key, Answer};
use crate::session::{command_id, snapshot, Input, Mode, Session};
use crate::settings::Settings;
use crate::{exit, sign, Failure};

/// Exit status when some devices still have the flow queued.
const PENDING: u8 = 2;

#[derive(Debug, PartialEq)]
pub enum Targets {
    Devices(Vec<String>),
    All,
    /// `KEY=VALUE[,KEY=VALUE...]` on the fields of the retained status and heartbeat.
    Where(String),
}

#[derive(Debug, PartialEq)]
pub struct Rollout {
    pub flow_file: PathBuf,
    pub targets: Targets,
    pub batch: usize,
    pub max_failures: Option<usize>,
    pub json: bool,
    /// How long a wave is waited for at most.
    pub timeout: Option<Duration>,
}

/// Where one device stands.
#[derive(Debug, Clone, PartialEq)]
enum State {
    NotSent,
    /// Sent to a device that is offline: the flow waits, retained, for it.
    Pending,
    Sent,
    Executing(Value),
    Successful,
    Failed(String),
}

impl State {
    fn is_final(&self) -> bool {
        matches!(self, State::Successful | State::Failed(_))
    }

    fn word(&self) -> &'static str {
        match self {
            State::NotSent => "not sent",
            State::Pending => "pending",
            State::Sent => "sent",
            State::Executing(_) => "executing",
            State::Successful => "successful",
            State::Failed(_) => "failed",
        }
    }
}

struct Device {
    id: String,
    state: State,
    online: bool,
    key: Option<tether::trust::PublicKey>,
}

pub fn run(settings: &Settings, req: &Rollout) -> Result<u8, Failure> {
    let text = std::fs::read_to_string(&req.flow_file)
        .map_err(|e| Failure::error(format!("{}: {e}", req.flow_file.display())))?;
    let flow: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::usage(format!("{}: not JSON: {e}", req.flow_file.display())))?;
    Flow::from_json(&flow).map_err(|e| Failure::usage(format!("{}: {e}", req.flow_file.display())))?;
    let fleet = fleet(settings)?;
    let ids = chosen(&fleet, &req.targets)?;
    if ids.is_empty() {
        return Err(Failure::usage("no device matches"));
    }
    let id = command_id();
    let mut session = Session::connect(settings, subscriptions(settings), Mode::Live)?;
    let mut devices: Vec<Device> = Vec::new();
    for device in &ids {
        let status = fleet.get(device).and_then(|f| f.0.clone());
        let online = status
            .as_ref()
            .and_then(|s| serde_json::from_value::<Status>(s.clone()).ok())
            .is_some_and(|s| s.online);
        let payload = status.map(|s| s.to_string().into_bytes());
        let key = device_key(&settings.trust, device, payload.as_deref())?;
        devices.push(Device { id: device.clone(), state: State::NotSent, online, key });
    }
    eprintln!(
        "tetherctl: rollout {id}: {} {} to {} device(s)",
        flow["name"].as_str().unwrap_or(""),
        flow["version"].as_str().unwrap_or(""),
        devices.len()
    );
    let mut view = View::new(req.json);
    let mut stopped = None;
    for wave in (0..devices.len()).collect::<Vec<_>>().chunks(req.batch.max(1)) {
        if let Some(max) = req.max_failures {
            let failed = devices.iter().filter(|d| matches!(d.state, State::Failed(_))).count();
            if failed >= max {
                stopped =
                    Some(format!("{failed} device(s) failed (--max-failures {max}): the rollout stopped"));
                break;
            }
        }
        let mut unacked = BTreeMap::new();
        for &i in wave {
            let tag = i as u64 + 1;
            unacked.insert(tag, send(settings, &mut session, &id, &flow, &mut devices[i], tag)?);
            view.changed(&devices[i]);
        }
        let deadline = req.timeout.map(|t| Instant::now() + t);
        let wave = Wave { members: wave, unacked, deadline };
        if let Some(why) = wait_wave(settings, &mut session, &id, &mut devices, wave, &mut view)? {
            stopped = Some(why);
            break;
        }
    }
    session.close();
    summary(&id, &devices, stopped)
}

/// `tetherctl update status ID`: the devices that have rollout ID, as their retained states say.
pub fn status(settings: &Settings, id: &str, json: bool) -> Result<u8, Failure> {
    let filter = format!("{}/+/cmd/update/{id}", settings.topic_root);
    let mut devices = Vec::new();
    for message in snapshot(settings, vec![filter])? {
        let Some((device, _)) = split_device_topic(&settings.topic_root, &message.topic) else { continue };
        let mut d = Device { id: device.to_string(), state: State::Sent, online: true, key: None };
        apply(&mut d, &message.payload, id, None);
        devices.push(d);
    }
    if devices.is_empty() {
        return Err(Failure { code: exit::NO_DEVICE, message: format!("no device has a rollout {id}") });
    }
    let mut view = View::new(json);
    devices.iter().for_each(|d| view.changed(d));
    summary(id, &devices, None)
}

fn subscriptions(settings: &Settings) -> Vec<String> {
    vec![fleet_status_filter(&settings.topic_root), format!("{}/+/cmd/update/+", settings.topic_root)]
}

/// Each device's retained status and heartbeat, by id.
type Fleet = BTreeMap<String, (Option<Value>, Option<Value>)>;

/// Each device's retained status and heartbeat.
fn fleet(settings: &Settings) -> Result<Fleet, Failure> {
    let root = &settings.topic_root;
    let mut fleet = Fleet::new();
    for message in snapshot(settings, vec![fleet_status_filter(root), fleet_heartbeat_filter(root)])? {
        let Some((id, kind)) = split_device_topic(root, &message.topic) else { continue };
        let value = serde_json::from_slice(&message.payload).ok();
        let entry = fleet.entry(id.to_string()).or_default();
        match kind {
            "status" => entry.0 = value,
            "heartbeat" => entry.1 = value,
            _ => {}
        }
    }
    Ok(fleet)
}

fn chosen(fleet: &Fleet, targets: &Targets) -> Result<Vec<String>, Failure> {
    match targets {
        Targets::Devices(ids) => Ok(ids.clone()),
        Targets::All => {
            Ok(fleet.iter().filter(|(_, (s, _))| s.is_some()).map(|(id, _)| id.clone()).collect())
        }
        Targets::Where(expr) => {
            let tests = parse_where(expr)?;
            let matches = |(status, heartbeat): &(Option<Value>, Option<Value>)| {
                tests
                    .iter()
                    .all(|test| [status, heartbeat].iter().any(|v| v.as_ref().is_some_and(|v| test.holds(v))))
            };
            Ok(fleet.iter().filter(|(_, f)| matches(f)).map(|(id, _)| id.clone()).collect())
        }
    }
}

/// One test of `--where`: a field of the device's status or heartbeat (a dotted path into
/// objects, `custom.firmware`) against a value.
#[derive(Debug, PartialEq)]
struct Test {
    path: Vec<String>,
    cmp: Cmp,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Two-character operators first, so that `<=` is not read as `<` and a value `=...`.
const CMPS: [(&str, Cmp); 6] =
    [("!=", Cmp::Ne), ("<=", Cmp::Le), (">=", Cmp::Ge), ("=", Cmp::Eq), ("<", Cmp::Lt), (">", Cmp::Gt)];

fn parse_where(expr: &str) -> Result<Vec<Test>, Failure> {
    expr.split(',').map(parse_test).collect()
}

fn parse_test(test: &str) -> Result<Test, Failure> {
    let found = CMPS
        .iter()
        .filter_map(|(text, cmp)| test.find(text).map(|at| (at, text.len(), *cmp)))
        .min_by_key(|(at, len, _)| (*at, std::cmp::Reverse(*len)));
    match found {
        Some((at, len, cmp)) if at > 0 => Ok(Test {
            path: test[..at].trim().split('.').map(str::to_string).collect(),
            cmp,
            value: test[at + len..].trim().to_string(),
        }),
        _ => Err(Failure::usage(format!(
            "--where: {test:?} is not KEY=VALUE, KEY!=VALUE, KEY<VALUE, KEY<=VALUE, KEY>VALUE or KEY>=VALUE \
             (e.g. version=1.2.0,arch=armv7-unknown-linux-musleabihf or custom.firmware<2.4)"
        ))),
    }
}

impl Test {
    /// Whether `device` (a status or heartbeat) has the field and it passes. Everything is
    /// ordered as a version, dot-separated parts compared as numbers where both are (`1.10`
    /// after `1.9`), else as text: a custom `1.9` is a JSON number and `1.10` a string, and
    /// versions are what rollouts pick by (so decimals are parts too: 21.5 before 21.45).
    fn holds(&self, device: &Value) -> bool {
        let Some(got) = self.path.iter().try_fold(device, |v, key| v.get(key)) else { return false };
        let order = version_order(&text_of(got), &self.value);
        match self.cmp {
            Cmp::Eq => order.is_eq(),
            Cmp::Ne => order.is_ne(),
            Cmp::Lt => order.is_lt(),
            Cmp::Le => order.is_le(),
            Cmp::Gt => order.is_gt(),
            Cmp::Ge => order.is_ge(),
        }
    }
}

fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    let part = |p: &str| p.parse::<u64>().map_err(|_| p.to_string());
    let (a, b) = (a.split('.').map(part), b.split('.').map(part));
    a.cmp(b)
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Publishes the request for `device` (acknowledged as `tag`); returns it, to send again.
fn send(
    settings: &Settings,
    session: &mut Session,
    id: &str,
    flow: &Value,
    device: &mut Device,
    tag: u64,
) -> Result<(String, Vec<u8>), Failure> {
    let mut params = Map::new();
    params.insert("flow".into(), flow.clone());
    let req = CmdRequest {
        device: device.id.clone(),
        op: "update".into(),
        params,
        timeout: Duration::ZERO,
        queue: true,
    };
    let payload = sign::init_payload(&settings.trust, &req, id)?;
    let topic = Topics::new(&settings.topic_root, &device.id).command("update", id);
    // Not waited for here: answers of the devices already sent to come meanwhile, and must
    // not be lost. The wave's wait sends it again should the connection drop before the ack.
    session.publish(&topic, &payload, true, Some(tag));
    device.state = if device.online { State::Sent } else { State::Pending };
    Ok((topic, payload))
}

/// The devices of a wave, and their requests the broker has not acknowledged yet (by tag).
struct Wave<'a> {
    members: &'a [usize],
    unacked: BTreeMap<u64, (String, Vec<u8>)>,
    deadline: Option<Instant>,
}

/// Until every device of the wave is final or pending, and every request stored; an error or
/// a stop reason otherwise.
fn wait_wave(
    settings: &Settings,
    session: &mut Session,
    id: &str,
    devices: &mut [Device],
    mut wave: Wave,
    view: &mut View,
) -> Result<Option<String>, Failure> {
    let root = &settings.topic_root;
    let members = wave.members;
    let waiting = |devices: &[Device]| {
        members.iter().any(|&i| !devices[i].state.is_final() && devices[i].state != State::Pending)
    };
    while waiting(devices) || !wave.unacked.is_empty() {
        match session.next(wave.deadline)? {
            Input::Client(Event::Acked(tag)) => {
                wave.unacked.remove(&tag);
            }
            // A publish not acknowledged before the connection dropped may not have arrived.
            Input::Client(Event::Connected) => {
                for (tag, (topic, payload)) in &wave.unacked {
                    session.publish(topic, payload, true, Some(*tag));
                }
            }
            Input::Client(Event::Message(m)) => {
                let Some((device, kind)) = split_device_topic(root, &m.topic) else { continue };
                let Some(d) = devices.iter_mut().find(|d| d.id == device) else { continue };
                if kind == "status" {
                    d.online = serde_json::from_slice::<Status>(&m.payload).is_ok_and(|s| s.online);
                    // Offline before it began: its flow waits for it.
                    if !d.online && d.state == State::Sent {
                        d.state = State::Pending;
                        view.changed(d);
                    }
                    continue;
                }
                if m.topic.ends_with(&format!("/cmd/update/{id}")) {
                    let key = d.key.clone();
                    if apply(d, &m.payload, id, key.as_ref()) {
                        view.changed(d);
                    }
                }
            }
            Input::Interrupted => return Ok(Some("interrupted: the flows sent stay queued".into())),
            Input::TimedOut => return Ok(Some("the wave did not end within --timeout".into())),
            _ => {}
        }
    }
    Ok(None)
}

/// A message on the device's command topic; whether its state changed.
fn apply(device: &mut Device, payload: &[u8], id: &str, key: Option<&tether::trust::PublicKey>) -> bool {
    let state = match classify(payload) {
        Answer::Executing => {
            let progress =
                serde_json::from_slice::<Value>(payload).ok().and_then(|v| v.get("progress").cloned());
            State::Executing(progress.unwrap_or(Value::Null))
        }
        Answer::Final { payload, .. } => final_state(&device.id, id, &payload, key),
        Answer::Request if device.state == State::NotSent => State::Sent,
        _ => return false,
    };
    let changed = state != device.state;
    device.state = state;
    changed
}

fn final_state(device: &str, id: &str, payload: &Value, key: Option<&tether::trust::PublicKey>) -> State {
    let asked = Addressed { device, op: "update", id };
    let outcome = match key {
        Some(key) => match verify_answer(payload.as_object().unwrap_or(&Map::new()), key, asked) {
            Ok(answer) => answer.outcome,
            Err(why) => return State::Failed(format!("REJECTED a forged answer: {why}")),
        },
        None => match payload["status"].as_str() {
            Some("successful") => Outcome::Successful(payload["result"].clone()),
            _ => Outcome::Failed(payload["reason"].as_str().unwrap_or("").to_string()),
        },
    };
    match outcome {
        Outcome::Successful(_) => State::Successful,
        Outcome::Failed(reason) => State::Failed(reason),
    }
}

fn summary(id: &str, devices: &[Device], stopped: Option<String>) -> Result<u8, Failure> {
    let count = |word: &str| devices.iter().filter(|d| d.state.word() == word).count();
    let (ok, failed, pending) =
        (count("successful"), count("failed"), count("pending") + count("sent") + count("executing"));
    eprintln!(
        "tetherctl: rollout {id}: {ok} successful, {failed} failed, {pending} pending, {} not sent{}",
        count("not sent"),
        stopped.as_ref().map(|s| format!("; {s}")).unwrap_or_default()
    );
    Ok(if failed > 0 || stopped.is_some() {
        exit::FAILED
    } else if pending > 0 {
        PENDING
    } else {
        exit::SUCCESS
    })
}

/// JSON lines (one per change), or on a terminal a table redrawn in place.
struct View {
    json: bool,
    terminal: bool,
    rows: BTreeMap<String, String>,
    drawn: usize,
}

impl View {
    fn new(json: bool) -> View {
        View { json, terminal: !json && std::io::stdout().is_terminal(), rows: BTreeMap::new(), drawn: 0 }
    }

    fn changed(&mut self, device: &Device) {
        let (step, progress, reason) = details(&device.state);
        if self.json || !self.terminal {
            let line = json!({"device": device.id, "state": device.state.word(), "step": step, "progress": progress, "reason": reason});
            println!("{line}");
            return;
        }
        let row =
            format!("{:<24} {:<10} {:<28} {:<12} {}", device.id, device.state.word(), step, progress, reason);
        self.rows.insert(device.id.clone(), row);
        self.redraw();
    }

    fn redraw(&mut self) {
        let mut out = std::io::stdout().lock();
        if self.drawn > 0 {
            let _ = write!(out, "\x1b[{}A", self.drawn);
        }
        let _ =
            writeln!(out, "\x1b[2K{:<24} {:<10} {:<28} {:<12} REASON", "DEVICE", "STATE", "STEP", "PROGRESS");
        for row in self.rows.values() {
            let _ = writeln!(out, "\x1b[2K{row}");
        }
        self.drawn = self.rows.len() + 1;
        let _ = out.flush();
    }
}

/// Step, progress and reason, as shown.
fn details(state: &State) -> (String, String, String) {
    match state {
        State::Executing(p) if !p.is_null() => {
            let step = format!("{}/{} {}", p["step"], p["steps"], p["name"].as_str().unwrap_or(""));
            let progress = match (p["done"].as_u64(), p["total"].as_u64()) {
                (Some(done), Some(total)) if total > 0 => format!("{}%", done * 100 / total),
                _ if p.get("held_s").is_some() => "held".into(),
                _ => String::new(),
            };
            (step, progress, String::new())
        }
        State::Failed(reason) => (String::new(), String::new(), reason.clone()),
        _ => (String::new(), String::new(), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn holds(test: &str, device: Value) -> bool {
        parse_test(test).unwrap().holds(&device)
    }

    #[test]
    fn where_compares_versions_numbers_and_text() {
        let device = json!({"version": "1.10.2", "arch": "armv7", "online": true, "uptime_s": 90,
                            "custom": {"firmware": "2.4", "sensors": {"t": 21.5}}});
        for (test, expected) in [
            ("version=1.10.2", true),
            ("version!=1.10.2", false),
            ("version>1.9", true), // 10 after 9, not before it as text
            ("version<1.10.10", true),
            ("version>=1.10.2", true),
            ("version<=1.10.1", false),
            ("arch=armv7", true),
            ("arch!=armv5te", true),
            ("online=true", true),
            ("uptime_s>=90", true),
            ("uptime_s<90", false),
            ("custom.firmware<2.10", true),
            ("custom.sensors.t>21", true),
            ("custom.missing!=1", false), // a field the device lacks passes no test
            ("uptime_s=ninety", false),
            ("custom.sensors.t<21.45", true), // parts, not decimals
        ] {
            assert_eq!(holds(test, device.clone()), expected, "{test}");
        }
    }

    #[test]
    fn where_says_what_it_takes() {
        assert_eq!(
            parse_test(" custom.firmware <= 2.4 ").unwrap(),
            Test { path: vec!["custom".into(), "firmware".into()], cmp: Cmp::Le, value: "2.4".into() }
        );
        assert_eq!(parse_test("a=b=c").unwrap().value, "b=c");
        for bad in ["version", "=1.2", ""] {
            assert!(parse_test(bad).unwrap_err().message.contains("is not KEY=VALUE"), "{bad}");
        }
    }
}
