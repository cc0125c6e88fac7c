//! `tetherctl cmds DEVICE [--clear ...]`: the commands retained for a device, and clearing them.
//! A command lives on its own retained topic (`ROOT/DEVICE/cmd/OP/ID`) until someone publishes
//! an empty retained message there: requests never run, answers nobody read, and commands a
//! device is running all show here.

use mqttbytes::v4::Publish;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tether::protocol::Topics;

use crate::args::Clear;
use crate::cmd::{classify, Answer};
use crate::devices::json_or_text;
use crate::format::{self, table};
use crate::session::{Mode, Session};
use crate::settings::Settings;
use crate::{exit, print, print_json, Failure};

/// How long to wait for the broker to take each clearing.
const CONFIRM_WITHIN: Duration = Duration::from_secs(5);

#[derive(Serialize)]
struct Retained {
    op: String,
    id: String,
    topic: String,
    /// pending, executing, successful, failed, or unreadable.
    state: &'static str,
    /// From the id when it starts with the unix milliseconds it was sent at (tetherctl's do).
    age_s: Option<u64>,
    payload: Value,
}

pub fn run(settings: &Settings, device: &str, json: bool, clear: Option<&Clear>) -> Result<u8, Failure> {
    let topics = Topics::new(&settings.topic_root, device);
    let mut session = Session::connect(settings, vec![topics.command_filter()], Mode::Snapshot)?;
    let commands = retained_commands(&topics, session.retained()?);
    let code = match clear {
        None => {
            list(&commands, json)?;
            exit::SUCCESS
        }
        Some(clear) => {
            let chosen = choose(&commands, clear)?;
            clear_each(&mut session, device, &chosen)?
        }
    };
    session.close();
    Ok(code)
}

/// The commands on the device's topics, oldest first; cleared topics left out.
fn retained_commands(topics: &Topics, messages: Vec<Publish>) -> Vec<Retained> {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    // The last message on a topic is what the broker retains.
    let latest: BTreeMap<String, Publish> = messages.into_iter().map(|m| (m.topic.clone(), m)).collect();
    let mut commands: Vec<Retained> = latest
        .into_values()
        .filter(|m| !m.payload.is_empty())
        .filter_map(|m| {
            let (op, id) = topics.parse_command(&m.topic)?;
            let state = match classify(&m.payload) {
                Answer::Request => "pending",
                Answer::Executing => "executing",
                Answer::Final { successful: true, .. } => "successful",
                Answer::Final { successful: false, .. } => "failed",
                Answer::Cleared | Answer::Malformed(_) => "unreadable",
            };
            Some(Retained {
                op: op.to_string(),
                id: id.to_string(),
                age_s: sent_at_ms(id).map(|sent| now_ms.saturating_sub(sent) / 1000),
                state,
                payload: json_or_text(&m.topic, &m.payload),
                topic: m.topic,
            })
        })
        .collect();
    commands.sort_by_key(|c| std::cmp::Reverse(c.age_s));
    commands
}

/// The unix milliseconds an id like tetherctl's (`<unix-ms>-...`) starts with, if plausible.
fn sent_at_ms(id: &str) -> Option<u64> {
    let digits = id.split('-').next()?;
    let ms: u64 = digits.parse().ok()?;
    // 2001 to 2286: not a small counter someone else used as an id.
    (digits.len() == 13).then_some(ms)
}

fn list(commands: &[Retained], json: bool) -> Result<(), Failure> {
    if json {
        return print_json(&commands);
    }
    if commands.is_empty() {
        eprintln!("tetherctl: no command is retained for this device");
        return Ok(());
    }
    let mut rows = vec![["OP", "ID", "STATE", "AGE"].map(String::from).to_vec()];
    for c in commands {
        let age = c.age_s.map_or("-".into(), format::age);
        rows.push(vec![c.op.clone(), c.id.clone(), c.state.to_string(), age]);
    }
    print(table(&rows).trim_end())
}

/// The commands `clear` names; an ID that is not retained, or names two commands, is an error
/// and nothing is cleared.
fn choose<'a>(commands: &'a [Retained], clear: &Clear) -> Result<Vec<&'a Retained>, Failure> {
    let by_state = |keep: &dyn Fn(&str) -> bool| commands.iter().filter(|c| keep(c.state)).collect();
    Ok(match clear {
        Clear::Idle => by_state(&|state| state != "executing"),
        Clear::Pending => by_state(&|state| state == "pending"),
        Clear::Final => by_state(&|state| state == "successful" || state == "failed"),
        Clear::All => by_state(&|_| true),
        Clear::Ids(ids) => ids.iter().map(|given| find(commands, given)).collect::<Result<_, _>>()?,
    })
}

fn find<'a>(commands: &'a [Retained], given: &str) -> Result<&'a Retained, Failure> {
    let matches: Vec<&Retained> = commands
        .iter()
        .filter(|c| match given.split_once('/') {
            Some((op, id)) => c.op == op && c.id == id,
            None => c.id == given,
        })
        .collect();
    match matches[..] {
        [one] => Ok(one),
        [] => Err(Failure::error(format!("no command {given} is retained for this device; nothing cleared"))),
        _ => Err(Failure::error(format!(
            "{given} is the id of commands of several ops; say which, e.g. {}/{given}; nothing cleared",
            matches[0].op
        ))),
    }
}

fn clear_each(session: &mut Session, device: &str, chosen: &[&Retained]) -> Result<u8, Failure> {
    if chosen.is_empty() {
        eprintln!("tetherctl: nothing to clear for {device}");
    }
    for c in chosen {
        if !session.publish_confirmed(&c.topic, b"", true, CONFIRM_WITHIN)? {
            return Err(Failure::error(format!("the broker did not confirm clearing {}", c.topic)));
        }
        print(&format!("cleared {}/{} ({})", c.op, c.id, c.state))?;
        if c.state == "executing" {
            eprintln!(
                "tetherctl: {device} is still running {}/{}: its answer will be retained again",
                c.op, c.id
            );
        }
    }
    Ok(exit::SUCCESS)
}
