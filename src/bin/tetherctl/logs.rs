//! `tetherctl logs`: a device's logs, like `tail` and `journalctl` there, through the broker
//! (docs/protocol.md, "Logs"). The device applies `-n`, `--since` and `--grep` and sends only
//! the lines kept; they come to stdout, and what happened to a source (missing, rotated,
//! truncated) to stderr. With `-f` it goes on until interrupted.

use serde_json::{json, Map, Value};

use crate::remote::{run_interactive, LocalIo};
use crate::settings::Settings;
use crate::{exit, files, tunnel, Failure};

/// What `logs` was asked.
#[derive(Debug, PartialEq, Default)]
pub struct LogsRequest {
    pub device: String,
    /// None given: the device's system log.
    pub sources: Vec<String>,
    pub lines: Option<u64>,
    pub follow: bool,
    pub since: Option<String>,
    pub grep: Option<String>,
    /// `--list`: the sources, not their lines.
    pub list: bool,
    pub json: bool,
}

pub fn logs(settings: &Settings, req: &LogsRequest) -> Result<u8, Failure> {
    if req.list {
        return list(settings, req);
    }
    let mut params = Map::new();
    if !req.sources.is_empty() {
        params.insert("sources".into(), json!(req.sources));
    }
    if let Some(lines) = req.lines {
        params.insert("lines".into(), json!(lines));
    }
    for (name, value) in [("since", &req.since), ("grep", &req.grep)] {
        if let Some(value) = value {
            params.insert(name.into(), json!(value));
        }
    }
    if req.follow {
        params.insert("follow".into(), json!(true));
    }
    let mut link = tunnel::open(settings, &req.device, "logs", params)?;
    let io = LocalIo::new(&mut link, false, None)?;
    let (code, message) = run_interactive(link, io, None);
    if let Some(message) = message {
        eprintln!("tetherctl: {message}");
    }
    Ok(code)
}

fn list(settings: &Settings, req: &LogsRequest) -> Result<u8, Failure> {
    let mut params = Map::new();
    params.insert("list".into(), json!(true));
    let sources = files::listing(settings, &req.device, "logs", params)?;
    if req.json {
        println!("{}", serde_json::to_string_pretty(&sources).unwrap_or_default());
        return Ok(exit::SUCCESS);
    }
    println!("{:<16} {:<8} {:<10} READS", "SOURCE", "KIND", "AVAILABLE");
    for source in &sources {
        println!("{}", list_line(source));
    }
    Ok(exit::SUCCESS)
}

/// `syslog  files  yes  /var/log/syslog /var/log/messages`.
fn list_line(source: &Value) -> String {
    let text = |name: &str| source.get(name).and_then(Value::as_str).unwrap_or("");
    let words = |name: &str| {
        let words = source.get(name).and_then(Value::as_array).cloned().unwrap_or_default();
        words.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")
    };
    let available = if source.get("available").and_then(Value::as_bool) == Some(true) { "yes" } else { "no" };
    format!("{:<16} {:<8} {:<10} {}", text("name"), text("kind"), available, words("reads"))
}
