//! The agent's configuration file (JSON). Every key is optional except `broker.url`; an unknown
//! key is an error that names it, so a typo never silently falls back to a default.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::net::url::BrokerUrl;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/tether/agent.json";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub broker: BrokerConfig,
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default = "default_topic_root")]
    pub topic_root: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    #[serde(default)]
    pub offline_buffer: OfflineBufferConfig,
    #[serde(default = "default_reboot_command")]
    pub reboot_command: Vec<String>,
    #[serde(default)]
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub url: String,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub proxy: Option<String>,
    #[serde(default = "default_keepalive_s")]
    pub keepalive_s: u16,
    #[serde(default = "default_connect_timeout_s")]
    pub connect_timeout_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    #[serde(default = "default_heartbeat_interval_s")]
    pub interval_s: u64,
    #[serde(default = "default_disks")]
    pub disks: Vec<String>,
    #[serde(default)]
    pub processes: Vec<ProcessSpec>,
    #[serde(default)]
    pub custom: BTreeMap<String, CustomSpec>,
}

/// A process to report on: found by its name (`/proc/PID/comm` or the executable's file name),
/// or, when `pidfile` is given, by the pid in that file; `name` is then only the label.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub name: String,
    #[serde(default)]
    pub pidfile: Option<PathBuf>,
}

/// A custom heartbeat value: the content of `file`, or the output of `command` (an argv, run
/// without a shell) killed after `timeout_s`. Output is trimmed and capped at `max_bytes`; output
/// that parses as JSON is kept as JSON.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CustomSpec {
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default = "default_custom_timeout_s")]
    pub timeout_s: u64,
    #[serde(default = "default_custom_max_bytes")]
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectConfig {
    #[serde(default = "default_reconnect_min_s")]
    pub min_s: u64,
    #[serde(default = "default_reconnect_max_s")]
    pub max_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineBufferConfig {
    #[serde(default = "default_buffer_messages")]
    pub max_messages: usize,
    #[serde(default = "default_buffer_bytes")]
    pub max_bytes: usize,
}

fn default_topic_root() -> String {
    "tether".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/tether".into()
}
fn default_reboot_command() -> Vec<String> {
    vec!["/sbin/reboot".into()]
}
fn default_keepalive_s() -> u16 {
    60
}
fn default_connect_timeout_s() -> u64 {
    30
}
fn default_heartbeat_interval_s() -> u64 {
    25
}
fn default_disks() -> Vec<String> {
    vec!["/".into()]
}
fn default_custom_timeout_s() -> u64 {
    5
}
fn default_custom_max_bytes() -> usize {
    4096
}
fn default_reconnect_min_s() -> u64 {
    1
}
fn default_reconnect_max_s() -> u64 {
    300
}
fn default_buffer_messages() -> usize {
    1000
}
fn default_buffer_bytes() -> usize {
    1024 * 1024
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval_s: default_heartbeat_interval_s(),
            disks: default_disks(),
            processes: Vec::new(),
            custom: BTreeMap::new(),
        }
    }
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig { min_s: default_reconnect_min_s(), max_s: default_reconnect_max_s() }
    }
}

impl Default for OfflineBufferConfig {
    fn default() -> Self {
        OfflineBufferConfig { max_messages: default_buffer_messages(), max_bytes: default_buffer_bytes() }
    }
}

/// A configuration error, worded for the person who edits the file.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl BrokerConfig {
    /// `url` with every other setting at its default.
    pub fn new(url: String) -> BrokerConfig {
        BrokerConfig {
            url,
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            proxy: None,
            keepalive_s: default_keepalive_s(),
            connect_timeout_s: default_connect_timeout_s(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        BrokerUrl::parse(&self.url).map_err(|e| ConfigError(format!("broker.url: {e}")))?;
        if let Some(proxy) = &self.proxy {
            crate::net::url::ProxyUrl::parse(proxy).map_err(|e| ConfigError(format!("broker.proxy: {e}")))?;
        }
        for (key, path) in [
            ("broker.ca_file", &self.ca_file),
            ("broker.cert_file", &self.cert_file),
            ("broker.key_file", &self.key_file),
            ("broker.password_file", &self.password_file),
        ] {
            if let Some(path) = path {
                if let Err(e) = std::fs::metadata(path) {
                    return fail(format!("{key}: {}: {}", path.display(), crate::fsutil::error_text(&e)));
                }
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return fail("broker.cert_file and broker.key_file go together".into());
        }
        if self.password_file.is_some() && self.username.is_none() {
            return fail("broker.password_file needs broker.username".into());
        }
        if self.keepalive_s < 5 {
            return fail("broker.keepalive_s must be at least 5".into());
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates the file: the one way the agent gets a config.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!("config {}: {}", path.display(), crate::fsutil::error_text(&e)))
        })?;
        Config::parse(&text).map_err(|e| ConfigError(format!("config {}: {}", path.display(), e)))
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_json::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        self.broker.validate()?;
        if let Some(id) = &self.device_id {
            crate::protocol::check_device_id(id).map_err(|e| ConfigError(format!("device_id: {e}")))?;
        }
        crate::protocol::check_topic_root(&self.topic_root)
            .map_err(|e| ConfigError(format!("topic_root: {e}")))?;
        if self.heartbeat.interval_s == 0 {
            return fail("heartbeat.interval_s must be at least 1".into());
        }
        for (name, spec) in &self.heartbeat.custom {
            match (&spec.file, &spec.command) {
                (Some(_), None) => {}
                (None, Some(argv)) if !argv.is_empty() => {}
                (None, Some(_)) => return fail(format!("heartbeat.custom.{name}.command is empty")),
                _ => return fail(format!("heartbeat.custom.{name}: give exactly one of file, command")),
            }
        }
        if self.reconnect.min_s == 0 || self.reconnect.max_s < self.reconnect.min_s {
            return fail("reconnect: need 1 <= min_s <= max_s".into());
        }
        if self.offline_buffer.max_messages == 0 || self.offline_buffer.max_bytes == 0 {
            return fail("offline_buffer: max_messages and max_bytes must be positive".into());
        }
        if self.reboot_command.is_empty() {
            return fail("reboot_command is empty".into());
        }
        if let Some(level) = &self.log_level {
            crate::logging::check_level(level).map_err(|e| ConfigError(format!("log_level: {e}")))?;
        }
        Ok(())
    }

    /// The config as JSON, with nothing secret in it: the password file's path is kept (it is
    /// where the secret lives, not the secret), its content is never read into this value.
    pub fn redacted_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(url) = value.pointer_mut("/broker/url") {
            if let Some(s) = url.as_str() {
                *url = serde_json::Value::String(crate::net::url::strip_userinfo(s));
            }
        }
        if let Some(proxy) = value.pointer_mut("/broker/proxy") {
            if let Some(s) = proxy.as_str() {
                *proxy = serde_json::Value::String(crate::net::url::strip_userinfo(s));
            }
        }
        value
    }
}
