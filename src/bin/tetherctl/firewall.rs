//! `tetherctl firewall DEVICE show|apply FILE|revert|confirm`: the `firewall` op
//! (docs/firewall.md) through `cmd`. A rule set is read and checked here first (an error names
//! the field and nothing is sent), and a rule set that would block this very broker (by the
//! URL tetherctl uses, resolved here) is warned about, and still sent: the device's confirmed
//! apply is the safety net.

use serde_json::{json, Map, Value};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

use tether::agent::firewall::rules::RuleSet;
use tether::net::url::BrokerUrl;

use crate::args::CmdRequest;
use crate::settings::Settings;
use crate::{cmd, print, Failure};

/// What the device waits for when a request does not say (its `firewall.default_confirm_s`).
const DEVICE_DEFAULT_CONFIRM_S: u64 = 60;

#[derive(Debug, PartialEq)]
pub struct FirewallRequest {
    pub device: String,
    pub action: String,
    pub file: Option<PathBuf>,
    pub confirm: bool,
    pub confirm_s: Option<u64>,
    pub timeout: Option<Duration>,
    pub json: bool,
}

pub fn run(settings: &Settings, req: &FirewallRequest) -> Result<u8, Failure> {
    let mut params = Map::new();
    params.insert("action".into(), json!(req.action));
    if let Some(file) = &req.file {
        let text =
            std::fs::read_to_string(file).map_err(|e| Failure::error(format!("{}: {e}", file.display())))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Failure::error(format!("{}: not JSON: {e}", file.display())))?;
        let set = RuleSet::from_json(&value)
            .map_err(|e| Failure::error(format!("{}: {e} (nothing was sent)", file.display())))?;
        warn_if_it_blocks_the_broker(settings, &set);
        params.insert("ruleset".into(), value);
    }
    if req.confirm {
        params.insert("confirm".into(), json!(true));
    }
    if let Some(s) = req.confirm_s {
        params.insert("confirm_s".into(), json!(s));
    }
    let changes = matches!(req.action.as_str(), "apply" | "revert");
    let wait = Duration::from_secs(req.confirm_s.unwrap_or(DEVICE_DEFAULT_CONFIRM_S) + 30);
    let timeout = req.timeout.unwrap_or(if changes { wait } else { Duration::from_secs(30) });
    let request =
        CmdRequest { device: req.device.clone(), op: "firewall".into(), params, timeout, queue: false };
    if req.json {
        return cmd::run(settings, &request);
    }
    let action = req.action.clone();
    cmd::run_shown(settings, &request, &move |state| show_state(&action, state))
}

/// A final state for people: failures say why on stderr (`cmd` does), successes here.
fn show_state(action: &str, state: &Value) -> Result<(), Failure> {
    if state["status"] != "successful" {
        return Ok(());
    }
    let result = &state["result"];
    let text = match action {
        "show" => show_text(result),
        "confirm" => format!("confirmed: {}", result["confirmed"].as_str().unwrap_or("?")),
        _ => format!(
            "kept: the device reached the broker again {} s after the change ({}){}",
            result["checked_s"],
            result["backend"].as_str().unwrap_or("?"),
            if result["confirmed"] == true { ", and the operator confirmed it" } else { "" }
        ),
    };
    print(&text)
}

/// `show`'s result: the backend, what is pending, the rule set in force one rule a line, and
/// Tether's rules as the kernel lists them.
fn show_text(result: &Value) -> String {
    let mut out = format!(
        "backend: {}   persist: {}\n",
        result["backend"].as_str().unwrap_or("?"),
        if result["persist"] == false { "no" } else { "yes" }
    );
    match result.get("pending").filter(|p| !p.is_null()) {
        Some(p) => {
            out += &format!(
                "PENDING: command {}, reverted unless confirmed by {} (unix time){}\n",
                p["id"].as_str().unwrap_or("?"),
                p["confirm_by"],
                if p["confirm"] == true { ", the operator's confirm required" } else { "" }
            )
        }
        None => out += "pending: none\n",
    }
    out += "rule set in force:";
    out += &ruleset_text(&result["ruleset"]);
    out += "\nTether's rules in the kernel:\n";
    out += result["kernel"].as_str().filter(|k| !k.is_empty()).unwrap_or("(none)\n");
    out.trim_end().to_string()
}

fn ruleset_text(set: &Value) -> String {
    if set.is_null() {
        return " none".into();
    }
    if let Some(raw) = set.get("raw") {
        return format!(" raw {} text", raw["backend"].as_str().unwrap_or("?"));
    }
    let word = |v: &Value, default: &str| v.as_str().unwrap_or(default).to_string();
    let mut out = format!(
        "\n  default in: {}, out: {}",
        word(&set["default_in"], "allow"),
        word(&set["default_out"], "allow")
    );
    let list = |v: &Value| match v.as_array() {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        _ => "any".into(),
    };
    for (i, rule) in set["rules"].as_array().into_iter().flatten().enumerate() {
        let peer = if rule["direction"] == "in" { "from" } else { "to" };
        out += &format!(
            "\n  {:>3}. {:<6} {:<3} {:<4} ports {} {peer} {}",
            i + 1,
            word(&rule["action"], "?"),
            word(&rule["direction"], "?"),
            word(&rule["protocol"], "any"),
            list(&rule["ports"]),
            list(&rule["addresses"]),
        );
        if let Some(name) = rule["interface"].as_str() {
            out += &format!(" via {name}");
        }
        if let Some(comment) = rule["comment"].as_str() {
            out += &format!("  # {comment}");
        }
    }
    out
}

/// Warns on stderr when the rule set refuses tetherctl's own broker connection, as the device
/// would make it: an outgoing TCP connection to the broker's address and port.
fn warn_if_it_blocks_the_broker(settings: &Settings, set: &RuleSet) {
    for url in settings.broker.urls() {
        let Ok(broker) = BrokerUrl::parse(url) else { continue };
        let addrs: Vec<_> =
            (broker.host.as_str(), broker.port).to_socket_addrs().map(Iterator::collect).unwrap_or_default();
        for addr in addrs {
            match set.blocks_tcp_to(addr.ip(), addr.port()) {
                Some(true) => eprintln!(
                    "tetherctl: warning: this rule set blocks the broker ({url}, {addr}) for a device that reaches \
                     it as tetherctl does: unless it reaches the broker another way, the device will restore its \
                     previous rules when the confirm time is over. Sending it anyway."
                ),
                None => {
                    return eprintln!(
                        "tetherctl: warning: raw rules: tetherctl cannot tell whether they block the broker ({url})"
                    )
                }
                Some(false) => continue,
            }
            return;
        }
    }
}
