//! The wire protocol shared by the agent and `tetherctl`: topic names and payloads.
//! `docs/protocol.md` describes the same thing for people writing their own tools; keep the two
//! in step.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Largest command payload the agent accepts; bigger ones are answered `failed`.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

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
        return Err(format!("{s:?}: must be 1 to {max} characters"));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) {
        return Err(format!("{s:?}: only letters, digits and - _ . : are allowed"));
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
        }
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

    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}
