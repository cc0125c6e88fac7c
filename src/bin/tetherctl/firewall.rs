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
use crate::{cmd, Failure};

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
    cmd::run(settings, &request)
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
