//! `tetherctl devices`: the fleet as the broker's retained status and heartbeat messages show it,
//! with the key each device presents checked against known_devices (and recorded when new).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};
use tether::text::Printable;

use tether::protocol::{fleet_heartbeat_filter, fleet_status_filter, split_device_topic, Heartbeat, Status};

use crate::format::{self, table};
use crate::known::{self, KnownDevices, Seen};
use crate::session::snapshot;
use crate::settings::Settings;
use crate::{exit, print, print_json, Failure};

/// A device's retained messages, as JSON (or as a JSON string when they are not JSON).
#[derive(Default)]
struct Retained {
    status: Option<Value>,
    heartbeat: Option<Value>,
}

/// One line of the table; `null` in JSON where the device did not say.
#[derive(Serialize)]
struct Row<'a> {
    id: &'a str,
    online: Option<bool>,
    heartbeat_age_s: Option<u64>,
    cpu_pct: Option<f64>,
    mem_used_pct: Option<f64>,
    disk_used_pct: Option<f64>,
    version: Option<String>,
    /// Of the key the status presents.
    fingerprint: Option<String>,
    #[serde(skip)]
    key_changed: bool,
    status: Option<&'a Value>,
    heartbeat: Option<&'a Value>,
}

pub fn run(settings: &Settings, json: bool) -> Result<u8, Failure> {
    let root = &settings.topic_root;
    let messages = snapshot(settings, vec![fleet_status_filter(root), fleet_heartbeat_filter(root)])?;
    let mut fleet: BTreeMap<String, Retained> = BTreeMap::new();
    for message in messages {
        let Some((id, kind)) = split_device_topic(root, &message.topic) else { continue };
        let device = fleet.entry(id.to_string()).or_default();
        let slot = match kind {
            "status" => &mut device.status,
            "heartbeat" => &mut device.heartbeat,
            _ => continue,
        };
        *slot = (!message.payload.is_empty()).then(|| json_or_text(&message.topic, &message.payload));
    }
    fleet.retain(|_, d| d.status.is_some() || d.heartbeat.is_some());

    let seen = check_keys(settings, &fleet);
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let rows: Vec<Row> = fleet.iter().map(|(id, retained)| row(id, retained, &seen[id], now_ms)).collect();
    if rows.is_empty() {
        log::warn!("no device has a retained status or heartbeat under {root}/");
    }
    if json {
        print_json(&rows)?;
    } else {
        print(table(&table_rows(&rows)).trim_end())?;
    }
    Ok(if rows.iter().any(|r| r.key_changed) { exit::KEY_CHANGED } else { exit::SUCCESS })
}

/// Each device's key against known_devices: new ones recorded and said, changed ones warned
/// about loudly. The list is shown all the same: it trusts nothing a device says.
fn check_keys(settings: &Settings, fleet: &BTreeMap<String, Retained>) -> BTreeMap<String, Seen> {
    let mut known = match KnownDevices::load(&settings.trust) {
        Ok(known) => known,
        Err(failure) => {
            eprintln!("tetherctl: {}; device keys are not checked", failure.message);
            return fleet.keys().map(|id| (id.clone(), Seen::NoKey)).collect();
        }
    };
    let seen: BTreeMap<String, Seen> = fleet
        .iter()
        .map(|(id, retained)| {
            let presented = retained.status.as_ref().and_then(|v| Status::deserialize(v).ok());
            (id.clone(), known.see(id, presented.as_ref()))
        })
        .collect();
    let mut new = Vec::new();
    for (id, seen) in &seen {
        match seen {
            Seen::New(key) => new.push((id.clone(), key.fingerprint())),
            Seen::Changed { .. } => {
                eprintln!("{}", known::changed_key_warning(id, seen, &known, &settings.trust))
            }
            Seen::Unreadable { line, why } => eprintln!("tetherctl: {}", known.unreadable(id, *line, why)),
            Seen::Known(_) | Seen::NoKey => {}
        }
    }
    match known.save() {
        Ok(()) => known::announce_new(&known, &new),
        Err(failure) => eprintln!("tetherctl: {}", failure.message),
    }
    seen
}

fn row<'a>(id: &'a str, retained: &'a Retained, seen: &Seen, now_ms: u64) -> Row<'a> {
    let status = retained.status.as_ref().and_then(|v| typed::<Status>(id, "status", v));
    let heartbeat = retained.heartbeat.as_ref().and_then(|v| typed::<Heartbeat>(id, "heartbeat", v));
    let one_decimal = |x: f64| (x * 10.0).round() / 10.0;
    Row {
        id,
        online: status.as_ref().map(|s| s.online),
        heartbeat_age_s: heartbeat.as_ref().map(|h| now_ms.saturating_sub(h.ts) / 1000),
        cpu_pct: heartbeat.as_ref().map(|h| one_decimal(h.cpu_pct)),
        mem_used_pct: heartbeat.as_ref().and_then(|h| format::mem_used_pct(&h.mem)).map(one_decimal),
        disk_used_pct: heartbeat.as_ref().and_then(format::disk_used_pct).map(one_decimal),
        version: status.and_then(|s| s.version),
        fingerprint: match seen {
            Seen::Known(key) | Seen::New(key) | Seen::Changed { presented: key, .. } => {
                Some(key.fingerprint())
            }
            Seen::NoKey | Seen::Unreadable { .. } => None,
        },
        key_changed: matches!(seen, Seen::Changed { .. }),
        status: retained.status.as_ref(),
        heartbeat: retained.heartbeat.as_ref(),
    }
}

fn table_rows(rows: &[Row]) -> Vec<Vec<String>> {
    let header = ["ID", "ONLINE", "HEARTBEAT", "CPU", "MEM", "DISK", "VERSION", "KEY"];
    let mut out = vec![header.map(String::from).to_vec()];
    for r in rows {
        // `?`: the device sent something unreadable; `-`: it did not say.
        let blank = |sent: Option<&Value>| if sent.is_some() { "?" } else { "-" }.to_string();
        let (no_status, no_heartbeat) = (blank(r.status), blank(r.heartbeat));
        let percent = |x: Option<f64>| x.map_or(no_heartbeat.clone(), |x| format!("{x:.0}%"));
        out.push(vec![
            r.id.to_string(),
            r.online.map_or(no_status.clone(), |online| if online { "yes" } else { "no" }.to_string()),
            r.heartbeat_age_s.map_or(no_heartbeat.clone(), format::age),
            percent(r.cpu_pct),
            percent(r.mem_used_pct),
            percent(r.disk_used_pct),
            r.version.clone().unwrap_or(no_status),
            key_column(r),
        ]);
    }
    out
}

/// The fingerprint's start, enough to tell keys apart at a glance; `-` for a device without a
/// key; CHANGED, loudly, for one whose key is not the one recorded.
fn key_column(row: &Row) -> String {
    const SHOWN: usize = "SHA256:".len() + 8;
    match &row.fingerprint {
        _ if row.key_changed => "CHANGED".into(),
        Some(fingerprint) => fingerprint.chars().take(SHOWN).collect(),
        None => "-".into(),
    }
}

/// The payload as JSON; when it is not JSON, its text, with a warning.
pub fn json_or_text(topic: &str, payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap_or_else(|e| {
        log::warn!("{}: not JSON ({e}): {}", Printable(topic), format::raw(payload));
        Value::String(String::from_utf8_lossy(payload).into_owned())
    })
}

/// The protocol type in `value`, or None with a warning (its columns then show `-`).
fn typed<'a, T: Deserialize<'a>>(device: &str, kind: &str, value: &'a Value) -> Option<T> {
    T::deserialize(value)
        .map_err(|e| {
            if !value.is_string() {
                log::warn!("{device}: malformed {kind} ({e})");
            }
        })
        .ok()
}
