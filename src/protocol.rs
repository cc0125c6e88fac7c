//! The wire protocol shared by the agent and `tetherctl`: topic names and payloads.
//! `docs/protocol.md` describes the same thing for people writing their own tools; keep the two
//! in step.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

use crate::text::Printable;

/// Largest command payload the agent accepts; bigger ones are answered `failed`.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Longest command id the agent accepts; longer ones are answered `failed` and never stored.
pub const MAX_COMMAND_ID_BYTES: usize = 128;
/// Commands the agent remembers at once (each until its final state is acknowledged by the
/// broker and the operator has cleared the topic). Past it, new requests are refused.
pub const MAX_OPEN_COMMANDS: usize = 10_000;

/// The ops an agent runs. Each is declared once, in `OPS`, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Ping,
    Heartbeat,
    Config,
    Reboot,
    Keys,
    Shell,
    Exec,
    Forward,
    Ls,
    Get,
    Put,
    Logs,
    Update,
    Firewall,
}

/// The type a parameter's JSON value must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    String,
    /// A whole number from 0 up.
    Count,
    Bool,
    /// A list of strings.
    Strings,
    /// A JSON object.
    Object,
}

#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamType,
    pub required: bool,
}

/// An op as operators see it: its name on the wire, its parameters, and whether it changes the
/// device (ops that do are recorded durably before they start, and never run twice).
#[derive(Debug, Clone, Copy)]
pub struct OpSpec {
    pub op: Op,
    pub name: &'static str,
    pub params: &'static [ParamSpec],
    pub changes_device: bool,
    pub summary: &'static str,
}

pub const OPS: &[OpSpec] = &[
    OpSpec {
        op: Op::Ping,
        name: "ping",
        params: &[],
        changes_device: false,
        summary: "versions and uptimes",
    },
    OpSpec {
        op: Op::Heartbeat,
        name: "heartbeat",
        params: &[],
        changes_device: false,
        summary: "send a heartbeat now",
    },
    OpSpec {
        op: Op::Config,
        name: "config",
        params: &[],
        changes_device: false,
        summary: "the effective configuration, without secrets",
    },
    OpSpec {
        op: Op::Reboot,
        name: "reboot",
        params: &[],
        changes_device: true,
        summary: "reboot the device; confirmed after it",
    },
    OpSpec {
        op: Op::Keys,
        name: "keys",
        params: &[
            ParamSpec { name: "authorized_keys", kind: ParamType::String, required: true },
            ParamSpec { name: "force", kind: ParamType::Bool, required: false },
        ],
        changes_device: true,
        summary: "replace the operators' keys the device trusts",
    },
    OpSpec {
        op: Op::Shell,
        name: "shell",
        params: &[EPH, WINDOW, TERM, ROWS, COLS],
        changes_device: false,
        summary: "open a remote terminal (tetherctl shell)",
    },
    OpSpec {
        op: Op::Exec,
        name: "exec",
        params: &[
            EPH,
            WINDOW,
            ParamSpec { name: "argv", kind: ParamType::Strings, required: true },
            ParamSpec { name: "pty", kind: ParamType::Bool, required: false },
            TERM,
            ROWS,
            COLS,
        ],
        changes_device: false,
        summary: "run a command with its input and output streamed (tetherctl exec)",
    },
    OpSpec {
        op: Op::Forward,
        name: "forward",
        params: &[EPH, WINDOW, ParamSpec { name: "targets", kind: ParamType::Strings, required: true }],
        changes_device: false,
        summary: "forward TCP connections to host:port targets (tetherctl forward)",
    },
    OpSpec {
        op: Op::Ls,
        name: "ls",
        params: &[EPH, WINDOW, PATH],
        changes_device: false,
        summary: "list a directory, as JSON on the tunnel (tetherctl ls)",
    },
    OpSpec {
        op: Op::Get,
        name: "get",
        params: &[EPH, WINDOW, PATH, ParamSpec { name: "offset", kind: ParamType::Count, required: false }],
        changes_device: false,
        summary: "read a file from offset on, its sha256 at the end (tetherctl get)",
    },
    OpSpec {
        op: Op::Put,
        name: "put",
        params: &[
            EPH,
            WINDOW,
            PATH,
            ParamSpec { name: "size", kind: ParamType::Count, required: true },
            ParamSpec { name: "sha256", kind: ParamType::String, required: true },
            ParamSpec { name: "mode", kind: ParamType::Count, required: false },
        ],
        changes_device: false,
        summary: "write a file atomically, verified and resumable (tetherctl put)",
    },
    OpSpec {
        op: Op::Logs,
        name: "logs",
        params: &[
            EPH,
            WINDOW,
            ParamSpec { name: "sources", kind: ParamType::Strings, required: false },
            ParamSpec { name: "lines", kind: ParamType::Count, required: false },
            ParamSpec { name: "since", kind: ParamType::String, required: false },
            ParamSpec { name: "grep", kind: ParamType::String, required: false },
            ParamSpec { name: "follow", kind: ParamType::Bool, required: false },
            ParamSpec { name: "list", kind: ParamType::Bool, required: false },
        ],
        changes_device: false,
        summary: "read (and follow) the device's logs, bounded on the device (tetherctl logs)",
    },
    OpSpec {
        op: Op::Update,
        name: "update",
        params: &[ParamSpec { name: "flow", kind: ParamType::Object, required: true }],
        changes_device: true,
        summary: "run an update flow: downloads, installs, commands, reboots (tetherctl update)",
    },
    OpSpec {
        op: Op::Firewall,
        name: "firewall",
        params: &[
            ParamSpec { name: "action", kind: ParamType::String, required: true },
            ParamSpec { name: "ruleset", kind: ParamType::Object, required: false },
            ParamSpec { name: "confirm", kind: ParamType::Bool, required: false },
            ParamSpec { name: "confirm_s", kind: ParamType::Count, required: false },
        ],
        changes_device: true,
        summary: "apply, show, revert or confirm firewall rules, reverted unless the broker stays reachable \
                  (tetherctl firewall)",
    },
];

/// The parameters every tunnel op takes (docs/protocol.md, "Tunnels").
const EPH: ParamSpec = ParamSpec { name: "eph", kind: ParamType::String, required: true };
const WINDOW: ParamSpec = ParamSpec { name: "window", kind: ParamType::Count, required: false };
const TERM: ParamSpec = ParamSpec { name: "term", kind: ParamType::String, required: false };
const ROWS: ParamSpec = ParamSpec { name: "rows", kind: ParamType::Count, required: false };
const COLS: ParamSpec = ParamSpec { name: "cols", kind: ParamType::Count, required: false };
/// A path on the device, resolved inside `file_transfer.chroot`.
const PATH: ParamSpec = ParamSpec { name: "path", kind: ParamType::String, required: true };

impl Op {
    /// Ops that open a tunnel: their answer carries the device's half of the key agreement.
    pub fn opens_tunnel(self) -> bool {
        matches!(self, Op::Shell | Op::Exec | Op::Forward | Op::Ls | Op::Get | Op::Put | Op::Logs)
    }

    pub fn from_name(name: &str) -> Option<Op> {
        OPS.iter().find(|s| s.name == name).map(|s| s.op)
    }

    pub fn spec(self) -> &'static OpSpec {
        OPS.iter().find(|s| s.op == self).expect("every Op is declared in OPS")
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }
}

impl OpSpec {
    /// Checks a request's parameters against the declaration: unknown, missing or ill-typed
    /// ones are refused with a reason.
    pub fn check_params(&self, params: &Map<String, Value>) -> Result<(), String> {
        if let Some(unknown) = params.keys().find(|k| !self.params.iter().any(|p| p.name == k.as_str())) {
            let known: Vec<&str> = self.params.iter().map(|p| p.name).collect();
            let takes = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            return Err(format!("unknown parameter \"{unknown}\" ({} takes: {takes})", self.name));
        }
        for p in self.params {
            match params.get(p.name) {
                None if p.required => return Err(format!("missing parameter \"{}\"", p.name)),
                None => {}
                Some(value) if !p.kind.accepts(value) => {
                    return Err(format!("parameter \"{}\" must be {}", p.name, p.kind.describe()))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

impl ParamType {
    fn accepts(self, value: &Value) -> bool {
        match self {
            ParamType::String => value.is_string(),
            ParamType::Count => value.is_u64(),
            ParamType::Bool => value.is_boolean(),
            ParamType::Strings => value.as_array().is_some_and(|items| items.iter().all(Value::is_string)),
            ParamType::Object => value.is_object(),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ParamType::String => "a string",
            ParamType::Count => "a whole number from 0 up",
            ParamType::Bool => "true or false",
            ParamType::Strings => "a list of strings",
            ParamType::Object => "a JSON object",
        }
    }
}

/// Topic names for one device: `ROOT/DEVICE/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
    device: String,
}

impl Topics {
    pub fn new(root: &str, device: &str) -> Topics {
        Topics { root: root.to_string(), device: device.to_string() }
    }
    pub fn device(&self) -> &str {
        &self.device
    }
    pub fn status(&self) -> String {
        format!("{}/{}/status", self.root, self.device)
    }
    pub fn heartbeat(&self) -> String {
        format!("{}/{}/heartbeat", self.root, self.device)
    }
    /// Where the agent advertises that it supports `op` (a retained `{}`).
    pub fn command_op(&self, op: &str) -> String {
        format!("{}/{}/cmd/{}", self.root, self.device, op)
    }
    pub fn command(&self, op: &str, id: &str) -> String {
        format!("{}/{}/cmd/{}/{}", self.root, self.device, op, id)
    }
    /// The agent's subscription: every command instance addressed to it.
    pub fn command_filter(&self) -> String {
        format!("{}/{}/cmd/+/+", self.root, self.device)
    }
    /// Splits `ROOT/DEVICE/cmd/OP/ID` into `(OP, ID)` when the topic is one of this device's.
    /// Where the operator's frames for tunnel `id` go, and where the device's come back: one
    /// topic per direction, so that neither side ever receives its own frames.
    pub fn tunnel_to_device(&self, id: &str) -> String {
        format!("{}/{}/s/{}/o", self.root, self.device, id)
    }
    pub fn tunnel_to_operator(&self, id: &str) -> String {
        format!("{}/{}/s/{}/d", self.root, self.device, id)
    }
    /// What the agent subscribes to: every tunnel's operator frames.
    pub fn tunnel_filter(&self) -> String {
        format!("{}/{}/s/+/o", self.root, self.device)
    }
    /// The tunnel id of a topic matched by `tunnel_filter`.
    pub fn parse_tunnel<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic.strip_prefix(&self.root)?.strip_prefix('/')?.strip_prefix(&self.device)?;
        rest.strip_prefix("/s/")?.strip_suffix("/o").filter(|id| !id.is_empty() && !id.contains('/'))
    }

    pub fn parse_command<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = topic.strip_prefix(&self.root)?.strip_prefix('/')?;
        let rest = rest.strip_prefix(&self.device)?.strip_prefix("/cmd/")?;
        let (op, id) = rest.split_once('/')?;
        (!op.is_empty() && !id.is_empty() && !id.contains('/')).then_some((op, id))
    }
}

/// Topic filters an operator tool subscribes to, across the fleet.
pub fn fleet_status_filter(root: &str) -> String {
    format!("{root}/+/status")
}
pub fn fleet_heartbeat_filter(root: &str) -> String {
    format!("{root}/+/heartbeat")
}

/// `ROOT/DEVICE/KIND` → `(DEVICE, KIND)`.
pub fn split_device_topic<'a>(root: &str, topic: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = topic.strip_prefix(root)?.strip_prefix('/')?;
    rest.split_once('/')
}

/// A device id is one topic level of safe characters, so it can never widen a subscription
/// or an ACL pattern.
pub fn check_device_id(id: &str) -> Result<(), String> {
    check_level(id, 64)
}

pub fn check_topic_root(root: &str) -> Result<(), String> {
    if root.is_empty() || root.len() > 128 {
        return Err("must be 1 to 128 characters".into());
    }
    root.split('/').try_for_each(|level| check_level(level, 128))
}

fn check_level(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max {
        return Err(format!("\"{}\": must be 1 to {max} characters", Printable(s)));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) {
        return Err(format!("\"{}\": only letters, digits and - _ . : are allowed", Printable(s)));
    }
    Ok(())
}

/// Retained on `ROOT/DEVICE/status`; the broker publishes `Status::offline()` as the last will.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Unix seconds when this connection came up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// The device key's OpenSSH public line, `ssh-ed25519 AAAA...`: what signs its answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl Status {
    /// The last will and the clean-stop status: they keep `version` and `arch`, so an operator
    /// still sees what an offline device runs.
    pub fn offline() -> Status {
        Status {
            online: false,
            version: Some(crate::VERSION.to_string()),
            arch: Some(crate::TARGET.to_string()),
            since: None,
            key: None,
            fingerprint: None,
        }
    }

    /// The JSON payload; never empty (an empty retained message would delete the status).
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| format!("{{\"online\":{}}}", self.online).into_bytes())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Heartbeat {
    pub seq: u64,
    /// Unix milliseconds when it was collected.
    pub ts: u64,
    /// The kernel's machine name (`uname -m`), e.g. `armv5tejl`, `aarch64`.
    pub machine: String,
    pub uptime_s: u64,
    pub load: [f64; 3],
    pub cpu_pct: f64,
    pub mem: Memory,
    pub disks: Vec<Disk>,
    pub net: Vec<NetIface>,
    pub processes: Vec<ProcessInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub temperatures: Vec<Temperature>,
    pub custom: BTreeMap<String, Value>,
    /// Heartbeats dropped so far because the offline buffer was full.
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Memory {
    pub total_kb: u64,
    pub available_kb: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Disk {
    pub mount: String,
    pub total_kb: u64,
    pub free_kb: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetIface {
    pub iface: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessInfo {
    pub name: String,
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_kb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pct: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Temperature {
    pub zone: String,
    pub celsius: f64,
}

/// The retained message on `ROOT/DEVICE/cmd/OP/ID`, written by the operator (`init`) and then
/// by the agent (`executing`, then `successful` or `failed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum CommandState {
    /// The operator's request; every other key is a parameter of the op.
    Init {
        #[serde(flatten)]
        params: Map<String, Value>,
    },
    Executing,
    Successful {
        #[serde(default)]
        result: Value,
    },
    Failed {
        reason: String,
    },
}

impl CommandState {
    pub fn is_final(&self) -> bool {
        matches!(self, CommandState::Successful { .. } | CommandState::Failed { .. })
    }

    /// The JSON payload. Encoding a state cannot fail (its keys are strings); if it ever did,
    /// an explicit failure goes out rather than an empty retained message, which would delete
    /// the topic's state.
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self)
            .unwrap_or_else(|_| br#"{"status":"failed","reason":"cannot encode the result"}"#.to_vec())
    }

    /// A short word for logs.
    pub fn word(&self) -> &'static str {
        match self {
            CommandState::Init { .. } => "init",
            CommandState::Executing => "executing",
            CommandState::Successful { .. } => "successful",
            CommandState::Failed { .. } => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_op_is_declared_once() {
        for spec in OPS {
            assert_eq!(Op::from_name(spec.name), Some(spec.op));
            assert_eq!(spec.op.name(), spec.name);
            assert_eq!(OPS.iter().filter(|s| s.op == spec.op).count(), 1);
        }
        assert_eq!(Op::from_name("sh"), None);
    }

    /// These reach config errors (`device_id: ...`): plain quotes, control characters escaped.
    #[test]
    fn a_bad_topic_level_is_quoted_as_people_read_it() {
        assert_eq!(
            check_device_id("x+y\n").unwrap_err(),
            "\"x+y\\n\": only letters, digits and - _ . : are allowed"
        );
        assert_eq!(check_topic_root("a//b").unwrap_err(), "\"\": must be 1 to 128 characters");
        assert!(check_device_id("dev-1_a.b:c").is_ok());
    }

    #[test]
    fn params_are_checked_against_the_declaration() {
        let ping = Op::Ping.spec();
        assert!(ping.check_params(&Map::new()).is_ok());
        let extra = json!({"force": true}).as_object().unwrap().clone();
        assert_eq!(ping.check_params(&extra).unwrap_err(), "unknown parameter \"force\" (ping takes: none)");
        let spec = OpSpec {
            op: Op::Ping,
            name: "t",
            params: &[ParamSpec { name: "n", kind: ParamType::Count, required: true }],
            changes_device: false,
            summary: "",
        };
        assert_eq!(spec.check_params(&Map::new()).unwrap_err(), "missing parameter \"n\"");
        let bad = json!({"n": "3"}).as_object().unwrap().clone();
        assert_eq!(spec.check_params(&bad).unwrap_err(), "parameter \"n\" must be a whole number from 0 up");
        assert!(spec.check_params(json!({"n": 3}).as_object().unwrap()).is_ok());
    }
}
