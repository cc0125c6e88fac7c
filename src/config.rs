//! The agent's configuration file (JSON). Every key is optional except `broker.url`; an unknown
//! key is an error that names it, so a typo never silently falls back to a default.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use crate::net::url::BrokerUrl;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/tether/agent.json";

/// Longer than any of these is a typo (and `Instant + Duration` must not overflow).
const DAY_S: u64 = 86_400;
const HOUR_S: u64 = 3_600;
const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub broker: BrokerConfig,
    pub device_id: Option<String>,
    pub topic_root: String,
    pub state_dir: PathBuf,
    pub heartbeat: HeartbeatConfig,
    pub reconnect: ReconnectConfig,
    pub offline_buffer: OfflineBufferConfig,
    pub reboot_command: Vec<String>,
    pub log_level: Option<String>,
    pub trust: TrustConfig,
    pub remote_access: RemoteAccessConfig,
    pub file_transfer: FileTransferConfig,
    pub logs: LogsConfig,
    pub updates: UpdatesConfig,
    pub firewall: FirewallConfig,
}

/// Who may ask the device for what: docs/protocol.md, "Signed requests".
#[derive(Debug, Clone, Serialize)]
pub struct TrustConfig {
    /// Operators' public keys, OpenSSH format, with `ops="..."` restrictions; re-read on SIGHUP.
    pub authorized_keys: PathBuf,
    /// Ops that run without a signature: they reveal nothing the heartbeat does not publish.
    pub unsigned_ops: Vec<String>,
    /// A signed request older than this is refused (while the device's clock is sane).
    pub max_age_s: u64,
    /// An OpenSSH ed25519 private key provisioned with the image; else the agent makes one in
    /// `state_dir` at its first start.
    pub device_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BrokerConfig {
    pub url: String,
    /// More nodes of the same broker (a cluster), tried in turn after `url` when a connection
    /// fails: `broker.url` written as a list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failover_urls: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub proxy: Option<String>,
    pub keepalive_s: u16,
    pub connect_timeout_s: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatConfig {
    pub interval_s: u64,
    pub disks: Vec<String>,
    pub processes: Vec<ProcessSpec>,
    pub custom: BTreeMap<String, CustomSpec>,
}

/// A process to report on: found by its name (`/proc/PID/comm` or the executable's file name),
/// or, when `pidfile` is given, by the pid in that file; `name` is then only the label.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProcessSpec {
    pub name: String,
    pub pidfile: Option<PathBuf>,
}

/// A custom heartbeat value: the content of `file`, or the output of `command` (an argv, run
/// without a shell) killed after `timeout_s`. Output is trimmed and capped at `max_bytes`; output
/// that parses as JSON is kept as JSON. The `config` op shows a command's arguments only when
/// the entry is `public` (people put tokens in them).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CustomSpec {
    pub file: Option<PathBuf>,
    pub command: Option<Vec<String>>,
    pub timeout_s: u64,
    pub max_bytes: usize,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReconnectConfig {
    pub min_s: u64,
    pub max_s: u64,
}

/// Terminal, exec and port forwarding (docs/remote-access.md).
#[derive(Debug, Clone, Serialize)]
pub struct RemoteAccessConfig {
    /// No tunnel of any kind is opened.
    pub disable: bool,
    /// Tunnels open at once, in all and per operator key.
    pub max_sessions: usize,
    pub max_sessions_per_key: usize,
    /// A tunnel is closed this long after it opened, and after this long without a frame from
    /// the operator (0: never).
    pub expire_after_s: u64,
    pub expire_after_idle_s: u64,
    /// Bytes each stream may have in flight towards the device.
    pub window: u32,
    pub terminal: TerminalConfig,
    pub exec: ExecConfig,
    pub forward: ForwardConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct TerminalConfig {
    pub disable: bool,
    pub shell: Vec<String>,
    /// Shells and commands run as this user (the agent must be root to switch); else as the
    /// agent's own user.
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExecConfig {
    pub disable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForwardConfig {
    pub disable: bool,
    /// `host:port` patterns the device may connect to; `*` stands for any port or any host.
    pub allow: Vec<String>,
    /// Connections open at once in one tunnel.
    pub max_connections: usize,
}

impl Default for RemoteAccessConfig {
    fn default() -> Self {
        RemoteAccessConfig {
            disable: false,
            max_sessions: 8,
            max_sessions_per_key: 4,
            expire_after_s: 8 * 3600,
            expire_after_idle_s: 1800,
            window: crate::stream::DEFAULT_WINDOW,
            terminal: TerminalConfig {
                disable: false,
                shell: vec!["/bin/sh".into(), "-l".into()],
                user: None,
            },
            exec: ExecConfig { disable: false },
            forward: ForwardConfig {
                disable: false,
                allow: vec!["127.0.0.1:*".into(), "localhost:*".into(), "[::1]:*".into()],
                max_connections: 32,
            },
        }
    }
}

impl RemoteAccessConfig {
    fn read(mut s: Section) -> Result<RemoteAccessConfig, ConfigError> {
        let d = RemoteAccessConfig::default();
        let config = RemoteAccessConfig {
            disable: s.flag("disable")?,
            max_sessions: s.number("max_sessions", "", 0..=256, d.max_sessions as u64)? as usize,
            max_sessions_per_key: s.number(
                "max_sessions_per_key",
                "",
                0..=256,
                d.max_sessions_per_key as u64,
            )? as usize,
            expire_after_s: s.number("expire_after_s", SECONDS, 0..=365 * DAY_S, d.expire_after_s)?,
            expire_after_idle_s: s.number(
                "expire_after_idle_s",
                SECONDS,
                0..=365 * DAY_S,
                d.expire_after_idle_s,
            )?,
            window: s.number(
                "window",
                BYTES,
                crate::stream::MIN_WINDOW.into()..=crate::stream::MAX_WINDOW.into(),
                d.window.into(),
            )? as u32,
            terminal: s.section("terminal")?.map(TerminalConfig::read).transpose()?.unwrap_or(d.terminal),
            exec: match s.section("exec")? {
                Some(mut e) => {
                    let exec = ExecConfig { disable: e.flag("disable")? };
                    e.finish()?;
                    exec
                }
                None => d.exec,
            },
            forward: s.section("forward")?.map(ForwardConfig::read).transpose()?.unwrap_or(d.forward),
        };
        s.finish()?;
        Ok(config)
    }
}

impl TerminalConfig {
    fn read(mut s: Section) -> Result<TerminalConfig, ConfigError> {
        let d = RemoteAccessConfig::default().terminal;
        let terminal = TerminalConfig {
            disable: s.flag("disable")?,
            shell: s.words("shell")?.unwrap_or(d.shell),
            user: s.text("user")?,
        };
        let key = s.key("shell");
        s.finish()?;
        check_argv(&key, &terminal.shell)?;
        Ok(terminal)
    }
}

impl ForwardConfig {
    fn read(mut s: Section) -> Result<ForwardConfig, ConfigError> {
        let d = RemoteAccessConfig::default().forward;
        let allow_key = s.key("allow");
        let forward = ForwardConfig {
            disable: s.flag("disable")?,
            allow: s.words("allow")?.unwrap_or(d.allow),
            max_connections: s.number("max_connections", "", 1..=1024, d.max_connections as u64)? as usize,
        };
        s.finish()?;
        if let Some(bad) = forward.allow.iter().find(|p| split_host_port(p).is_none()) {
            return Err(ConfigError(format!(
                "{allow_key}: \"{bad}\" is not host:port (e.g. \"127.0.0.1:8080\", \"localhost:*\", \"[::1]:22\")"
            )));
        }
        Ok(forward)
    }

    /// Whether `target` (`host:port`) matches an `allow` pattern.
    pub fn allows(&self, target: &str) -> bool {
        let Some((host, port)) = split_host_port(target) else { return false };
        self.allow.iter().filter_map(|p| split_host_port(p)).any(|(allowed_host, allowed_port)| {
            (allowed_host == "*" || allowed_host.eq_ignore_ascii_case(host))
                && (allowed_port == "*" || allowed_port == port)
        })
    }
}

/// `host:port`, `[v6]:port`: the host (brackets kept) and the port, both non-empty.
pub fn split_host_port(text: &str) -> Option<(&str, &str)> {
    let (host, port) = text.rsplit_once(':')?;
    let bracketed = host.starts_with('[') && host.ends_with(']');
    let plain = !host.contains(':');
    let port_ok = port == "*" || port.parse::<u16>().is_ok_and(|p| p > 0);
    (!host.is_empty() && (bracketed || plain) && port_ok).then_some((host, port))
}

/// `get`, `put` and `ls` (src/agent/files): what an operator's file access may reach and do.
#[derive(Debug, Clone, Serialize)]
pub struct FileTransferConfig {
    pub disable: bool,
    /// Paths are resolved inside this directory; `..` and symbolic links may not leave it.
    pub chroot: PathBuf,
    /// Symbolic links are followed (within `chroot`) rather than refused.
    pub follow_symlinks: bool,
    pub allow_overwrite: bool,
    /// Device files, FIFOs and sockets are refused.
    pub regular_files_only: bool,
    /// A file may be read only when its owner (group) is in the list; empty: any.
    pub owner_get: Vec<String>,
    pub group_get: Vec<String>,
    /// A written file is given to this user (group).
    pub owner_put: Option<String>,
    pub group_put: Option<String>,
    #[serde(serialize_with = "octal")]
    pub umask: u32,
    /// A written file takes the mode (uid, gid) the operator sends with it.
    pub preserve_mode: bool,
    pub preserve_owner: bool,
    pub preserve_group: bool,
    /// Bytes; 0: no limit.
    pub max_file_size: u64,
    /// Bytes per minute the device sends (`get`) and receives (`put`); 0: no limit.
    pub max_bytes_tx_per_minute: u64,
    pub max_bytes_rx_per_minute: u64,
}

impl Default for FileTransferConfig {
    fn default() -> Self {
        FileTransferConfig {
            disable: false,
            chroot: "/".into(),
            follow_symlinks: false,
            allow_overwrite: true,
            regular_files_only: true,
            owner_get: Vec::new(),
            group_get: Vec::new(),
            owner_put: None,
            group_put: None,
            umask: 0o022,
            preserve_mode: false,
            preserve_owner: false,
            preserve_group: false,
            max_file_size: 1024 * MIB,
            max_bytes_tx_per_minute: 0,
            max_bytes_rx_per_minute: 0,
        }
    }
}

impl FileTransferConfig {
    fn read(mut s: Section) -> Result<FileTransferConfig, ConfigError> {
        let d = FileTransferConfig::default();
        let chroot_key = s.key("chroot");
        let config = FileTransferConfig {
            disable: s.flag("disable")?,
            chroot: s.path("chroot")?.unwrap_or(d.chroot),
            follow_symlinks: s.flag_or("follow_symlinks", d.follow_symlinks)?,
            allow_overwrite: s.flag_or("allow_overwrite", d.allow_overwrite)?,
            regular_files_only: s.flag_or("regular_files_only", d.regular_files_only)?,
            owner_get: s.names("owner_get")?.unwrap_or(d.owner_get),
            group_get: s.names("group_get")?.unwrap_or(d.group_get),
            owner_put: s.name("owner_put")?,
            group_put: s.name("group_put")?,
            umask: s.umask("umask", d.umask)?,
            preserve_mode: s.flag("preserve_mode")?,
            preserve_owner: s.flag("preserve_owner")?,
            preserve_group: s.flag("preserve_group")?,
            max_file_size: s.number("max_file_size", BYTES, 0..=u64::MAX, d.max_file_size)?,
            max_bytes_tx_per_minute: s.number("max_bytes_tx_per_minute", BYTES, 0..=u64::MAX, 0)?,
            max_bytes_rx_per_minute: s.number("max_bytes_rx_per_minute", BYTES, 0..=u64::MAX, 0)?,
        };
        s.finish()?;
        if !config.chroot.is_absolute() {
            return Err(ConfigError(format!(
                "{chroot_key}: must be an absolute path, e.g. \"/data\", got \"{}\"",
                config.chroot.display()
            )));
        }
        Ok(config)
    }
}

/// A umask as people write it: `"0022"`.
fn octal<S: serde::Serializer>(mode: &u32, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{mode:04o}"))
}

/// The logs `tetherctl logs` reads (src/agent/logs).
#[derive(Debug, Clone, Serialize)]
pub struct LogsConfig {
    /// Each replaces the built-in source of its name, if there is one.
    pub sources: Vec<LogSource>,
    /// Whether the built-in sources (syslog, agent, logread, journal) are offered too.
    pub builtin_sources: bool,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig { sources: Vec::new(), builtin_sources: true }
    }
}

/// A log by name: files (paths, or patterns with `*` and `?` in the last component), or the
/// output of a command (an argv, run without a shell).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogSource {
    pub name: String,
    #[serde(flatten)]
    pub input: LogInput,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum LogInput {
    Files(Vec<String>),
    Command(Vec<String>),
}

/// Longest source name: it is typed on tetherctl's command line.
const LOG_SOURCE_NAME_MAX: usize = 64;

impl LogsConfig {
    fn read(mut s: Section) -> Result<LogsConfig, ConfigError> {
        let sources_key = s.key("sources");
        let logs = LogsConfig {
            sources: s.list("sources")?.into_iter().map(LogSource::read).collect::<Result<_, _>>()?,
            builtin_sources: s.flag_or("builtin_sources", true)?,
        };
        s.finish()?;
        for (i, source) in logs.sources.iter().enumerate() {
            if logs.sources[..i].iter().any(|earlier| earlier.name == source.name) {
                return Err(ConfigError(format!(
                    "{sources_key}[{i}].name: \"{}\" is named twice",
                    source.name
                )));
            }
        }
        Ok(logs)
    }
}

impl LogSource {
    fn read(mut s: Section) -> Result<LogSource, ConfigError> {
        let (entry_key, name_key, files_key) = (s.path.clone(), s.key("name"), s.key("files"));
        let (name, files, command) = (s.text("name")?, s.words("files")?, s.words("command")?);
        let command_key = s.key("command");
        s.finish()?;
        let name = name.ok_or_else(|| {
            ConfigError(format!("{name_key}: missing: the name tetherctl logs knows it by"))
        })?;
        check_log_source_name(&name_key, &name)?;
        let input = match (files, command) {
            (Some(files), None) => {
                check_log_files(&files_key, &files)?;
                LogInput::Files(files)
            }
            (None, Some(argv)) => {
                check_argv(&command_key, &argv)?;
                LogInput::Command(argv)
            }
            _ => {
                return Err(ConfigError(format!(
                    "{entry_key}: needs exactly one of \"files\" and \"command\""
                )))
            }
        };
        Ok(LogSource { name, input })
    }
}

fn check_log_source_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if name.is_empty() || name.len() > LOG_SOURCE_NAME_MAX || !name.bytes().all(allowed) {
        return Err(ConfigError(format!(
            "{key}: \"{name}\" is not a source name: 1 to {LOG_SOURCE_NAME_MAX} of A-Z a-z 0-9 - _ ."
        )));
    }
    Ok(())
}

/// Absolute paths; wildcards in the last component only.
fn check_log_files(key: &str, files: &[String]) -> Result<(), ConfigError> {
    if files.is_empty() {
        return Err(ConfigError(format!("{key}: must name at least one file, e.g. [\"/var/log/messages\"]")));
    }
    for (i, file) in files.iter().enumerate() {
        let (dir, last) = file.rsplit_once('/').unwrap_or(("", file));
        let problem = if !file.starts_with('/') {
            "must be an absolute path"
        } else if last.is_empty() {
            "must name a file, not a directory"
        } else if dir.contains(['*', '?']) {
            "may have * and ? in its last component only, e.g. \"/var/log/*.log\""
        } else {
            continue;
        };
        return Err(ConfigError(format!("{key}[{i}]: \"{file}\" {problem}")));
    }
    Ok(())
}

/// Software updates (issue 11): where their downloads go and whom an `https://` download
/// trusts (src/agent/update).
#[derive(Debug, Clone, Serialize)]
pub struct UpdatesConfig {
    /// PEM CA(s) trusted for downloads instead of the system store.
    pub ca_file: Option<PathBuf>,
    /// Downloads are written, and resumed, here; made private (0700) when missing.
    pub download_dir: PathBuf,
    /// While this file exists, a flow waits before its first step (the update inhibitor).
    pub hold_file: PathBuf,
    /// How long a flow waits for the hold file to go at most.
    pub hold_max_s: u64,
    /// Where `service` steps find init scripts.
    pub init_dir: PathBuf,
    /// How long a new agent binary must connect and stay up before it replaces the old one.
    pub probation_s: u64,
}

impl UpdatesConfig {
    /// The defaults, for the agent's `state_dir`.
    pub fn new(state_dir: &Path) -> UpdatesConfig {
        UpdatesConfig {
            ca_file: None,
            download_dir: state_dir.join("downloads"),
            hold_file: "/run/tether-update-hold".into(),
            hold_max_s: 3600,
            init_dir: "/etc/init.d".into(),
            probation_s: 120,
        }
    }

    fn read(mut s: Section, state_dir: &Path) -> Result<UpdatesConfig, ConfigError> {
        let d = UpdatesConfig::new(state_dir);
        let updates = UpdatesConfig {
            ca_file: s.path("ca_file")?,
            download_dir: s.path("download_dir")?.unwrap_or(d.download_dir),
            hold_file: s.path("hold_file")?.unwrap_or(d.hold_file),
            hold_max_s: s.number("hold_max_s", SECONDS, 0..=30 * 86_400, d.hold_max_s)?,
            init_dir: s.path("init_dir")?.unwrap_or(d.init_dir),
            probation_s: s.number("probation_s", SECONDS, 1..=86_400, d.probation_s)?,
        };
        s.finish()?;
        Ok(updates)
    }
}

/// The `firewall` op (docs/firewall.md): rules in Tether's own table or chains only.
#[derive(Debug, Clone, Serialize)]
pub struct FirewallConfig {
    /// The op is refused; the rules in force are left alone (a pending change is still reverted).
    pub disable: bool,
    /// `auto` (nftables when `nft` works, else iptables), `nftables` or `iptables`.
    pub backend: String,
    /// The rule set in force is applied again at start (rules survive a reboot).
    pub persist: bool,
    /// How long an `apply` has to prove the broker is still reachable, when it does not say.
    pub default_confirm_s: u64,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        FirewallConfig { disable: false, backend: "auto".into(), persist: true, default_confirm_s: 60 }
    }
}

impl FirewallConfig {
    fn read(mut s: Section) -> Result<FirewallConfig, ConfigError> {
        let d = FirewallConfig::default();
        let backend_key = s.key("backend");
        let firewall = FirewallConfig {
            disable: s.flag("disable")?,
            backend: s.text("backend")?.unwrap_or(d.backend),
            persist: s.flag_or("persist", d.persist)?,
            default_confirm_s: s.number("default_confirm_s", SECONDS, 5..=3600, d.default_confirm_s)?,
        };
        s.finish()?;
        if !["auto", "nftables", "iptables"].contains(&firewall.backend.as_str()) {
            let got = crate::text::Printable(&firewall.backend);
            return Err(ConfigError(format!(
                "{backend_key}: must be \"auto\", \"nftables\" or \"iptables\", got \"{got}\""
            )));
        }
        Ok(firewall)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OfflineBufferConfig {
    pub max_messages: usize,
    pub max_bytes: usize,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval_s: 25,
            disks: vec!["/".into()],
            processes: Vec::new(),
            custom: BTreeMap::new(),
        }
    }
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            authorized_keys: "/etc/tether/authorized_keys".into(),
            unsigned_ops: vec!["ping".into(), "heartbeat".into()],
            max_age_s: 7 * DAY_S,
            device_key: None,
        }
    }
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig { min_s: 1, max_s: 300 }
    }
}

impl Default for OfflineBufferConfig {
    fn default() -> Self {
        OfflineBufferConfig { max_messages: 1000, max_bytes: 1024 * 1024 }
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
            failover_urls: Vec::new(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            proxy: None,
            keepalive_s: 60,
            connect_timeout_s: 30,
        }
    }

    fn read(mut s: Section) -> Result<BrokerConfig, ConfigError> {
        let url_key = s.key("url");
        let mut urls = s.urls("url")?.unwrap_or_default().into_iter();
        let url = urls.next();
        let failover_urls: Vec<String> = urls.collect();
        let defaults = BrokerConfig::new(String::new());
        let broker = BrokerConfig {
            ca_file: s.path("ca_file")?,
            cert_file: s.path("cert_file")?,
            key_file: s.path("key_file")?,
            username: s.text("username")?,
            password_file: s.path("password_file")?,
            proxy: s.text("proxy")?,
            keepalive_s: s.number("keepalive_s", SECONDS, 5..=u16::MAX.into(), defaults.keepalive_s.into())?
                as u16,
            connect_timeout_s: s.number(
                "connect_timeout_s",
                SECONDS,
                1..=HOUR_S,
                defaults.connect_timeout_s,
            )?,
            ..defaults
        };
        s.finish()?;
        let url = url.ok_or_else(|| {
            ConfigError(format!(
                "{url_key}: missing: the broker's address, e.g. \"wss://mqtt.example.com/mqtt\""
            ))
        })?;
        Ok(BrokerConfig { url, failover_urls, ..broker })
    }

    /// Every URL, in the order they are tried.
    pub fn urls(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.url).chain(&self.failover_urls)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        for (i, url) in self.urls().enumerate() {
            let key = if self.failover_urls.is_empty() {
                "broker.url".to_string()
            } else {
                format!("broker.url[{i}]")
            };
            BrokerUrl::parse(url).map_err(|e| ConfigError(format!("{key}: {e}")))?;
        }
        if let Some(proxy) = &self.proxy {
            crate::net::url::ProxyUrl::parse(proxy).map_err(|e| ConfigError(format!("broker.proxy: {e}")))?;
        }
        for (key, path) in [
            ("broker.ca_file", &self.ca_file),
            ("broker.cert_file", &self.cert_file),
            ("broker.key_file", &self.key_file),
            ("broker.password_file", &self.password_file),
        ] {
            check_exists(key, path.as_deref())?;
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return fail("broker.cert_file and broker.key_file go together".into());
        }
        if self.password_file.is_some() && self.username.is_none() {
            return fail("broker.password_file needs broker.username".into());
        }
        Ok(())
    }
}

/// tetherctl reads the agent's `broker` object from its `--config` file with serde: it gets
/// the agent's errors, which name the key.
impl<'de> Deserialize<'de> for BrokerConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<BrokerConfig, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Section::of("broker".into(), &value).and_then(BrokerConfig::read).map_err(serde::de::Error::custom)
    }
}

impl HeartbeatConfig {
    fn read(mut s: Section) -> Result<HeartbeatConfig, ConfigError> {
        let defaults = HeartbeatConfig::default();
        let heartbeat = HeartbeatConfig {
            interval_s: s.number("interval_s", SECONDS, 1..=DAY_S, defaults.interval_s)?,
            disks: s.words("disks")?.unwrap_or(defaults.disks),
            processes: s.list("processes")?.into_iter().map(ProcessSpec::read).collect::<Result<_, _>>()?,
            custom: s
                .named("custom")?
                .into_iter()
                .map(|(name, spec)| Ok((name, CustomSpec::read(spec)?)))
                .collect::<Result<_, ConfigError>>()?,
        };
        s.finish()?;
        Ok(heartbeat)
    }
}

impl ProcessSpec {
    fn read(mut s: Section) -> Result<ProcessSpec, ConfigError> {
        let name_key = s.key("name");
        let (name, pidfile) = (s.text("name")?, s.path("pidfile")?);
        s.finish()?;
        let name = name.filter(|n| !n.is_empty()).ok_or_else(|| {
            ConfigError(format!("{name_key}: missing: the process's name (or its label, with a pidfile)"))
        })?;
        Ok(ProcessSpec { name, pidfile })
    }
}

impl CustomSpec {
    fn read(mut s: Section) -> Result<CustomSpec, ConfigError> {
        let (entry_key, command_key) = (s.path.clone(), s.key("command"));
        let spec = CustomSpec {
            file: s.path("file")?,
            command: s.words("command")?,
            timeout_s: s.number("timeout_s", SECONDS, 1..=HOUR_S, 5)?,
            max_bytes: s.number("max_bytes", BYTES, 1..=MIB, 4096)? as usize,
            public: s.flag("public")?,
        };
        s.finish()?;
        match (&spec.file, &spec.command) {
            (Some(_), None) => Ok(spec),
            (None, Some(argv)) => check_argv(&command_key, argv).map(|()| spec),
            _ => Err(ConfigError(format!("{entry_key}: needs exactly one of \"file\" and \"command\""))),
        }
    }

    /// Only the program of a command stays, then "…": people put tokens in the arguments.
    fn hide_arguments(&mut self) {
        if self.public {
            return;
        }
        if let Some(argv) = self.command.as_mut().filter(|argv| argv.len() > 1) {
            argv.truncate(1);
            argv.push(HIDDEN_ARGUMENTS.into());
        }
    }
}

/// What the `config` op shows in place of the arguments of a command that is not `public`.
const HIDDEN_ARGUMENTS: &str = "…";

impl ReconnectConfig {
    fn read(mut s: Section) -> Result<ReconnectConfig, ConfigError> {
        let defaults = ReconnectConfig::default();
        let (min_key, max_key) = (s.key("min_s"), s.key("max_s"));
        let reconnect = ReconnectConfig {
            min_s: s.number("min_s", SECONDS, 1..=DAY_S, defaults.min_s)?,
            max_s: s.number("max_s", SECONDS, 1..=DAY_S, defaults.max_s)?,
        };
        s.finish()?;
        if reconnect.min_s > reconnect.max_s {
            return Err(ConfigError(format!(
                "{min_key} ({}) must not be more than {max_key} ({})",
                reconnect.min_s, reconnect.max_s
            )));
        }
        Ok(reconnect)
    }
}

impl OfflineBufferConfig {
    fn read(mut s: Section) -> Result<OfflineBufferConfig, ConfigError> {
        let defaults = OfflineBufferConfig::default();
        let buffer = OfflineBufferConfig {
            max_messages: s.number("max_messages", "", 1..=1_000_000, defaults.max_messages as u64)? as usize,
            max_bytes: s.number("max_bytes", BYTES, 1..=256 * MIB, defaults.max_bytes as u64)? as usize,
        };
        s.finish()?;
        Ok(buffer)
    }
}

impl TrustConfig {
    fn read(mut s: Section) -> Result<TrustConfig, ConfigError> {
        let defaults = TrustConfig::default();
        let ops_key = s.key("unsigned_ops");
        let trust = TrustConfig {
            authorized_keys: s.path("authorized_keys")?.unwrap_or(defaults.authorized_keys),
            unsigned_ops: s.words("unsigned_ops")?.unwrap_or(defaults.unsigned_ops),
            max_age_s: s.number("max_age_s", SECONDS, 60..=365 * DAY_S, defaults.max_age_s)?,
            device_key: s.path("device_key")?,
        };
        s.finish()?;
        if let Some(unknown) =
            trust.unsigned_ops.iter().find(|op| crate::protocol::Op::from_name(op).is_none())
        {
            let known: Vec<&str> = crate::protocol::OPS.iter().map(|spec| spec.name).collect();
            return Err(ConfigError(format!(
                "{ops_key}: unknown op \"{unknown}\" (the ops are {})",
                known.join(", ")
            )));
        }
        Ok(trust)
    }
}

/// A file a setting names must be there (its content is read where it is used).
fn check_exists(key: &str, path: Option<&Path>) -> Result<(), ConfigError> {
    let Some(path) = path else { return Ok(()) };
    std::fs::metadata(path)
        .map(drop)
        .map_err(|e| ConfigError(format!("{key}: {}: {}", path.display(), crate::fsutil::error_text(&e))))
}

/// An argv must start with the program: "[]" or "[\"\"]" would run nothing.
fn check_argv(key: &str, argv: &[String]) -> Result<(), ConfigError> {
    match argv.first() {
        Some(program) if !program.is_empty() => Ok(()),
        _ => Err(ConfigError(format!(
            "{key}: must start with the program to run, e.g. [\"/usr/bin/modem-status\", \"--json\"]"
        ))),
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
        let value: Value =
            serde_json::from_str(text).map_err(|e| ConfigError(format!("not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(wanted("the configuration", "a JSON object, {\"broker\": {\"url\": ...}}", &value));
        }
        let config = Config::read(Section::of(String::new(), &value)?)?;
        config.validate()?;
        Ok(config)
    }

    fn read(mut s: Section) -> Result<Config, ConfigError> {
        let broker = s.section("broker")?.map(BrokerConfig::read).transpose()?;
        let state_dir: PathBuf = s.path("state_dir")?.unwrap_or_else(|| "/var/lib/tether".into());
        let config = Config {
            broker: BrokerConfig::new(String::new()),
            device_id: s.text("device_id")?,
            topic_root: s.text("topic_root")?.unwrap_or_else(|| "tether".into()),
            heartbeat: s.section("heartbeat")?.map(HeartbeatConfig::read).transpose()?.unwrap_or_default(),
            reconnect: s.section("reconnect")?.map(ReconnectConfig::read).transpose()?.unwrap_or_default(),
            offline_buffer: s
                .section("offline_buffer")?
                .map(OfflineBufferConfig::read)
                .transpose()?
                .unwrap_or_default(),
            reboot_command: s.words("reboot_command")?.unwrap_or_else(|| vec!["/sbin/reboot".into()]),
            log_level: s.text("log_level")?,
            trust: s.section("trust")?.map(TrustConfig::read).transpose()?.unwrap_or_default(),
            remote_access: s
                .section("remote_access")?
                .map(RemoteAccessConfig::read)
                .transpose()?
                .unwrap_or_default(),
            file_transfer: s
                .section("file_transfer")?
                .map(FileTransferConfig::read)
                .transpose()?
                .unwrap_or_default(),
            logs: s.section("logs")?.map(LogsConfig::read).transpose()?.unwrap_or_default(),
            firewall: s.section("firewall")?.map(FirewallConfig::read).transpose()?.unwrap_or_default(),
            updates: match s.section("updates")? {
                Some(updates) => UpdatesConfig::read(updates, &state_dir)?,
                None => UpdatesConfig::new(&state_dir),
            },
            state_dir,
        };
        s.finish()?;
        let broker = broker.ok_or_else(|| {
            ConfigError("broker: missing: at least {\"url\": \"wss://mqtt.example.com/mqtt\"}".into())
        })?;
        Ok(Config { broker, ..config })
    }

    /// What the types and ranges do not say: files that must exist, names the topics accept.
    fn validate(&self) -> Result<(), ConfigError> {
        self.broker.validate()?;
        if let Some(id) = &self.device_id {
            crate::protocol::check_device_id(id).map_err(|e| ConfigError(format!("device_id: {e}")))?;
        }
        crate::protocol::check_topic_root(&self.topic_root)
            .map_err(|e| ConfigError(format!("topic_root: {e}")))?;
        check_argv("reboot_command", &self.reboot_command)?;
        check_exists("updates.ca_file", self.updates.ca_file.as_deref())?;
        if let Some(level) = &self.log_level {
            crate::logging::check_level(level).map_err(|e| ConfigError(format!("log_level: {e}")))?;
        }
        Ok(())
    }

    /// What `--check-config` adds to `load`, so that an init script's check catches it: the agent
    /// can create `state_dir` (it is created, as the agent would) and write in it (a file made
    /// there and removed).
    pub fn check_state_dir(&self) -> Result<(), ConfigError> {
        let dir = &self.state_dir;
        let fail = |what: &str, e: std::io::Error| {
            ConfigError(format!("state_dir: {}: {what}: {}", dir.display(), crate::fsutil::error_text(&e)))
        };
        crate::fsutil::create_private_dir(dir).map_err(|e| fail("cannot create it", e))?;
        let probe = dir.join(format!(".check-config.{}", std::process::id()));
        // Created exclusively, never through a link someone planted at this predictable name.
        crate::fsutil::create_new(&probe).map_err(|e| fail("cannot write in it", e))?;
        std::fs::remove_file(&probe).map_err(|e| fail("cannot remove a file from it", e))
    }

    /// The config as JSON, with nothing secret in it: the password file's path is kept (it is
    /// where the secret lives, not the secret), its content is never read into this value;
    /// user and password are cut from the URLs; custom commands show their program only,
    /// unless `public`.
    pub fn redacted_json(&self) -> Result<Value, String> {
        let mut shown = self.clone();
        shown.broker.url = crate::net::url::strip_userinfo(&shown.broker.url);
        for url in &mut shown.broker.failover_urls {
            *url = crate::net::url::strip_userinfo(url);
        }
        shown.broker.proxy = shown.broker.proxy.as_deref().map(crate::net::url::strip_userinfo);
        shown.heartbeat.custom.values_mut().for_each(CustomSpec::hide_arguments);
        serde_json::to_value(&shown).map_err(|e| format!("cannot encode the config: {e}"))
    }
}

const SECONDS: &str = " of seconds";
const BYTES: &str = " of bytes";

/// One JSON object of the file, read key by key: an error names the key by its full path
/// (`heartbeat.custom.modem.timeout_s`) and says in words what it wants. Absent and `null` both
/// mean the default. The keys not read by `finish` are unknown: a typo never falls back to a
/// default in silence.
struct Section<'a> {
    path: String,
    fields: &'a Map<String, Value>,
    read: Vec<&'static str>,
}

impl<'a> Section<'a> {
    fn of(path: String, value: &'a Value) -> Result<Section<'a>, ConfigError> {
        match value {
            Value::Object(fields) => Ok(Section { path, fields, read: Vec::new() }),
            other => Err(wanted(&path, "an object, {...}", other)),
        }
    }

    fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn get(&mut self, name: &'static str) -> Option<(String, &'a Value)> {
        self.read.push(name);
        self.fields.get(name).filter(|v| !v.is_null()).map(|v| (self.key(name), v))
    }

    fn text(&mut self, name: &'static str) -> Result<Option<String>, ConfigError> {
        self.get(name).map(|(key, v)| text(&key, v)).transpose()
    }

    fn path(&mut self, name: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        match self.get(name) {
            Some((_, Value::String(path))) if !path.is_empty() => Ok(Some(path.into())),
            Some((key, v)) => Err(wanted(&key, "a path, e.g. \"/etc/tether/ca.pem\"", v)),
            None => Ok(None),
        }
    }

    fn flag(&mut self, name: &'static str) -> Result<bool, ConfigError> {
        self.flag_or(name, false)
    }

    fn flag_or(&mut self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name) {
            Some((_, Value::Bool(flag))) => Ok(*flag),
            Some((key, v)) => Err(wanted(&key, "true or false", v)),
            None => Ok(default),
        }
    }

    /// A user or group name (or a number, an id), not empty.
    fn name(&mut self, name: &'static str) -> Result<Option<String>, ConfigError> {
        match self.get(name) {
            Some((_, Value::String(text))) if !text.is_empty() => Ok(Some(text.clone())),
            Some((key, v)) => Err(wanted(&key, "a user or group name, e.g. \"app\"", v)),
            None => Ok(None),
        }
    }

    /// A list of user or group names, none empty.
    fn names(&mut self, name: &'static str) -> Result<Option<Vec<String>>, ConfigError> {
        let key = self.key(name);
        let names = self.words(name)?;
        match names.iter().flatten().position(String::is_empty) {
            Some(i) => Err(ConfigError(format!("{key}[{i}]: must be a user or group name, got \"\""))),
            None => Ok(names),
        }
    }

    /// Permission bits to clear, in octal as for umask(1): `"0022"`, or the number 22.
    fn umask(&mut self, name: &'static str, default: u32) -> Result<u32, ConfigError> {
        let Some((key, v)) = self.get(name) else { return Ok(default) };
        let digits = match v {
            Value::String(text) => Some(text.clone()),
            Value::Number(n) if n.is_u64() => Some(n.to_string()),
            _ => None,
        };
        let mode =
            digits.filter(|d| !d.is_empty() && d.len() <= 4).and_then(|d| u32::from_str_radix(&d, 8).ok());
        mode.filter(|m| *m <= 0o777)
            .ok_or_else(|| wanted(&key, "octal permission bits from \"0000\" to \"0777\", e.g. \"0022\"", v))
    }

    /// A whole number of `unit` within `range`; `5.0` counts as 5.
    fn number(
        &mut self,
        name: &'static str,
        unit: &str,
        range: RangeInclusive<u64>,
        default: u64,
    ) -> Result<u64, ConfigError> {
        let Some((key, v)) = self.get(name) else { return Ok(default) };
        let whole = v.as_u64().or_else(|| {
            v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64).map(|f| f as u64)
        });
        whole.filter(|n| range.contains(n)).ok_or_else(|| {
            wanted(&key, &format!("a whole number{unit} from {} to {}", range.start(), range.end()), v)
        })
    }

    /// A URL, or a non-empty list of them.
    fn urls(&mut self, name: &'static str) -> Result<Option<Vec<String>>, ConfigError> {
        const WHAT: &str = "a URL, or a list of URLs tried in turn (the nodes of a cluster)";
        match self.get(name) {
            Some((_, Value::String(url))) => Ok(Some(vec![url.clone()])),
            Some((key, Value::Array(items))) if !items.is_empty() => items
                .iter()
                .enumerate()
                .map(|(i, item)| text(&format!("{key}[{i}]"), item))
                .collect::<Result<_, _>>()
                .map(Some),
            Some((key, v)) => Err(wanted(&key, WHAT, v)),
            None => Ok(None),
        }
    }

    /// A list of strings (an argv, mount points).
    fn words(&mut self, name: &'static str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.get(name) {
            Some((key, Value::Array(items))) => items
                .iter()
                .enumerate()
                .map(|(i, item)| text(&format!("{key}[{i}]"), item))
                .collect::<Result<_, _>>()
                .map(Some),
            Some((key, v)) => Err(wanted(&key, "a list of strings, e.g. [\"a\", \"b\"]", v)),
            None => Ok(None),
        }
    }

    fn section(&mut self, name: &'static str) -> Result<Option<Section<'a>>, ConfigError> {
        self.get(name).map(|(key, v)| Section::of(key, v)).transpose()
    }

    /// A list of objects, e.g. `heartbeat.processes`.
    fn list(&mut self, name: &'static str) -> Result<Vec<Section<'a>>, ConfigError> {
        match self.get(name) {
            Some((key, Value::Array(items))) => {
                items.iter().enumerate().map(|(i, item)| Section::of(format!("{key}[{i}]"), item)).collect()
            }
            Some((key, v)) => Err(wanted(&key, "a list of objects, [{...}, ...]", v)),
            None => Ok(Vec::new()),
        }
    }

    /// An object whose keys are names the user picks, each with an object, e.g.
    /// `heartbeat.custom`.
    fn named(&mut self, name: &'static str) -> Result<Vec<(String, Section<'a>)>, ConfigError> {
        let Some(section) = self.section(name)? else { return Ok(Vec::new()) };
        let entries = section.fields.iter();
        entries.map(|(entry, v)| Ok((entry.clone(), Section::of(section.key(entry), v)?))).collect()
    }

    fn finish(self) -> Result<(), ConfigError> {
        match self.fields.keys().find(|k| !self.read.contains(&k.as_str())) {
            Some(unknown) => Err(ConfigError(format!(
                "{}: unknown key (the keys here are {})",
                self.key(unknown),
                self.read.join(", ")
            ))),
            None => Ok(()),
        }
    }
}

fn text(key: &str, value: &Value) -> Result<String, ConfigError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        other => Err(wanted(key, "a string, in double quotes", other)),
    }
}

/// `KEY: must be WHAT, got VALUE`, the value as it is written in JSON (shortened).
fn wanted(key: &str, what: &str, got: &Value) -> ConfigError {
    let mut shown = got.to_string();
    if shown.chars().count() > 40 {
        shown = shown.chars().take(37).chain("...".chars()).collect();
    }
    ConfigError(format!("{key}: must be {what}, got {shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The error for a config made of a minimal valid one with `patch` merged in.
    fn error_of(patch: Value) -> String {
        let mut config = json!({"broker": {"url": "mqtt://127.0.0.1:1883"}, "state_dir": "/tmp/tether-unit"});
        merge(&mut config, patch);
        match Config::parse(&config.to_string()) {
            Ok(_) => panic!("accepted {config}"),
            Err(e) => e.0,
        }
    }

    fn merge(base: &mut Value, patch: Value) {
        match (base, patch) {
            (Value::Object(b), Value::Object(p)) => {
                for (k, v) in p {
                    merge(b.entry(k).or_insert(Value::Null), v);
                }
            }
            (b, p) => *b = p,
        }
    }

    #[test]
    fn wrong_types_name_the_key_and_what_it_wants() {
        assert_eq!(
            error_of(json!({"broker": {"keepalive_s": "x"}})),
            "broker.keepalive_s: must be a whole number of seconds from 5 to 65535, got \"x\""
        );
        assert_eq!(
            error_of(json!({"heartbeat": {"custom": {"modem": {"command": "/bin/modem"}}}})),
            "heartbeat.custom.modem.command: must be a list of strings, e.g. [\"a\", \"b\"], got \"/bin/modem\""
        );
        assert_eq!(
            error_of(json!({"heartbeat": {"disks": ["/", 7]}})),
            "heartbeat.disks[1]: must be a string, in double quotes, got 7"
        );
        assert_eq!(
            error_of(json!({"heartbeat": {"processes": [{"name": "a"}, {"pidfile": "/run/b.pid"}]}})),
            "heartbeat.processes[1].name: missing: the process's name (or its label, with a pidfile)"
        );
        assert_eq!(
            error_of(json!({"heartbeat": {"custom": {"fw": {"file": "/etc/v", "public": "yes"}}}})),
            "heartbeat.custom.fw.public: must be true or false, got \"yes\""
        );
        assert_eq!(error_of(json!({"reconnect": []})), "reconnect: must be an object, {...}, got []");
        assert!(error_of(json!({"device_id": 42})).starts_with("device_id: must be a string"));
        assert!(error_of(json!({"state_dir": ""})).starts_with("state_dir: must be a path"));
        let long = error_of(json!({"topic_root": ["a very long list", "that goes on", "and on and on"]}));
        assert!(long.ends_with("got [\"a very long list\",\"that goes on\",\"a..."), "{long}");
    }

    #[test]
    fn durations_and_sizes_out_of_range_are_refused() {
        for (patch, message) in [
            (
                json!({"broker": {"connect_timeout_s": 0}}),
                "broker.connect_timeout_s: must be a whole number of seconds from 1 to 3600, got 0",
            ),
            (
                json!({"broker": {"keepalive_s": 70000}}),
                "broker.keepalive_s: must be a whole number of seconds from 5 to 65535, got 70000",
            ),
            (
                json!({"heartbeat": {"interval_s": 0}}),
                "heartbeat.interval_s: must be a whole number of seconds from 1 to 86400, got 0",
            ),
            (
                json!({"heartbeat": {"interval_s": 2.5}}),
                "heartbeat.interval_s: must be a whole number of seconds from 1 to 86400, got 2.5",
            ),
            (
                json!({"heartbeat": {"interval_s": -1}}),
                "heartbeat.interval_s: must be a whole number of seconds from 1 to 86400, got -1",
            ),
            (
                json!({"heartbeat": {"custom": {"x": {"file": "/f", "timeout_s": 0}}}}),
                "heartbeat.custom.x.timeout_s: must be a whole number of seconds from 1 to 3600, got 0",
            ),
            (
                json!({"heartbeat": {"custom": {"x": {"file": "/f", "max_bytes": 0}}}}),
                "heartbeat.custom.x.max_bytes: must be a whole number of bytes from 1 to 1048576, got 0",
            ),
            (
                json!({"reconnect": {"min_s": 0}}),
                "reconnect.min_s: must be a whole number of seconds from 1 to 86400, got 0",
            ),
            (
                json!({"reconnect": {"max_s": 1e30}}),
                "reconnect.max_s: must be a whole number of seconds from 1 to 86400, got 1e+30",
            ),
            (
                json!({"reconnect": {"min_s": 10, "max_s": 5}}),
                "reconnect.min_s (10) must not be more than reconnect.max_s (5)",
            ),
            (
                json!({"offline_buffer": {"max_messages": 0}}),
                "offline_buffer.max_messages: must be a whole number from 1 to 1000000, got 0",
            ),
            (
                json!({"offline_buffer": {"max_bytes": 0}}),
                "offline_buffer.max_bytes: must be a whole number of bytes from 1 to 268435456, got 0",
            ),
            (
                json!({"trust": {"unsigned_ops": ["ping", "rebot"]}}),
                "trust.unsigned_ops: unknown op \"rebot\" (the ops are ping, heartbeat, config, reboot, keys, shell, exec, forward, ls, get, put, logs, update, firewall)",
            ),
            (
                json!({"trust": {"max_age_s": 5}}),
                "trust.max_age_s: must be a whole number of seconds from 60 to 31536000, got 5",
            ),
        ] {
            assert_eq!(error_of(patch.clone()), message, "{patch}");
        }
    }

    #[test]
    fn structure_errors_name_the_key() {
        assert_eq!(
            error_of(json!({"heartbeat": {"intervl_s": 5}})),
            "heartbeat.intervl_s: unknown key (the keys here are interval_s, disks, processes, custom)"
        );
        assert!(
            error_of(json!({"colour": "blue"})).starts_with("colour: unknown key (the keys here are broker,")
        );
        assert_eq!(
            error_of(json!({"heartbeat": {"custom": {"x": {"file": "/f", "command": ["/bin/true"]}}}})),
            "heartbeat.custom.x: needs exactly one of \"file\" and \"command\""
        );
        assert_eq!(
            error_of(json!({"heartbeat": {"custom": {"x": {}}}})),
            "heartbeat.custom.x: needs exactly one of \"file\" and \"command\""
        );
        assert!(error_of(json!({"heartbeat": {"custom": {"x": {"command": []}}}}))
            .starts_with("heartbeat.custom.x.command: must start with the program to run"));
        assert!(error_of(json!({"reboot_command": [""]}))
            .starts_with("reboot_command: must start with the program"));
        assert!(error_of(json!({"broker": {"url": null}})).starts_with("broker.url: missing"));
        assert!(error_of(json!({"broker": null})).starts_with("broker: missing"));
        assert!(Config::parse("[1]").unwrap_err().0.starts_with("the configuration: must be a JSON object"));
        assert!(Config::parse("{\"broker\": ").unwrap_err().0.starts_with("not valid JSON: "));
        assert_eq!(
            error_of(json!({"log_level": "loud"})),
            format!("log_level: {}", crate::logging::check_level("loud").unwrap_err())
        );
    }

    #[test]
    fn defaults_and_null() {
        let config = Config::parse(
            r#"{"broker": {"url": "mqtt://h", "keepalive_s": null}, "heartbeat": {"interval_s": 5.0}}"#,
        )
        .unwrap();
        assert_eq!(config.broker.keepalive_s, 60);
        assert_eq!(config.broker.connect_timeout_s, 30);
        assert_eq!(config.heartbeat.interval_s, 5);
        assert_eq!(config.heartbeat.disks, ["/"]);
        assert_eq!((config.reconnect.min_s, config.reconnect.max_s), (1, 300));
        assert_eq!(config.state_dir, Path::new("/var/lib/tether"));
        assert_eq!(config.topic_root, "tether");
        assert_eq!(config.reboot_command, ["/sbin/reboot"]);
    }

    #[test]
    fn the_firewall_section_has_safe_defaults_and_names_bad_keys() {
        let parse = |firewall: Value| {
            let config = json!({"broker": {"url": "mqtt://h"}, "firewall": firewall});
            Config::parse(&config.to_string()).map(|c| c.firewall).map_err(|e| e.0)
        };
        let d = parse(json!({})).unwrap();
        assert_eq!(
            (d.disable, d.backend.as_str(), d.persist, d.default_confirm_s),
            (false, "auto", true, 60)
        );
        let set = parse(json!({"backend": "iptables", "persist": false, "default_confirm_s": 10})).unwrap();
        assert_eq!((set.backend.as_str(), set.persist, set.default_confirm_s), ("iptables", false, 10));
        assert_eq!(
            parse(json!({"backend": "pf"})).unwrap_err(),
            "firewall.backend: must be \"auto\", \"nftables\" or \"iptables\", got \"pf\""
        );
        assert_eq!(
            parse(json!({"default_confirm_s": 2})).unwrap_err(),
            "firewall.default_confirm_s: must be a whole number of seconds from 5 to 3600, got 2"
        );
    }

    #[test]
    fn updates_download_dir_follows_state_dir_and_errors_name_the_key() {
        let parse = |patch: Value| {
            let mut config = json!({"broker": {"url": "mqtt://h"}});
            merge(&mut config, patch);
            Config::parse(&config.to_string()).map(|c| c.updates).map_err(|e| e.0)
        };
        let d = parse(json!({})).unwrap();
        assert_eq!((d.ca_file, d.download_dir.as_path()), (None, Path::new("/var/lib/tether/downloads")));
        let moved = parse(json!({"state_dir": "/data/tether"})).unwrap();
        assert_eq!(moved.download_dir, Path::new("/data/tether/downloads"));
        let set = parse(json!({"updates": {"download_dir": "/mnt/big", "ca_file": "/"}})).unwrap();
        assert_eq!(
            (set.download_dir.as_path(), set.ca_file.as_deref()),
            (Path::new("/mnt/big"), Some(Path::new("/")))
        );
        for (patch, message) in [
            (
                json!({"updates": {"ca_file": "/nonexistent/ca.pem"}}),
                "updates.ca_file: /nonexistent/ca.pem: No such file or directory",
            ),
            (json!({"updates": {"download_dir": ""}}), "updates.download_dir: must be a path"),
            (
                json!({"updates": {"dir": "/x"}}),
                "updates.dir: unknown key (the keys here are ca_file, download_dir, hold_file, hold_max_s, init_dir, probation_s)",
            ),
            (
                json!({"updates": {"hold_max_s": -1}}),
                "updates.hold_max_s: must be a whole number of seconds from 0 to 2592000",
            ),
            (json!({"updates": []}), "updates: must be an object"),
        ] {
            let error = parse(patch.clone()).unwrap_err();
            assert!(error.starts_with(message), "{patch}: {error}");
        }
    }

    #[test]
    fn file_transfer_defaults_are_safe_and_errors_name_the_key() {
        let config = Config::parse(r#"{"broker": {"url": "mqtt://h"}}"#).unwrap();
        let d = &config.file_transfer;
        assert_eq!((d.disable, d.chroot.as_path(), d.follow_symlinks), (false, Path::new("/"), false));
        assert_eq!((d.allow_overwrite, d.regular_files_only, d.umask), (true, true, 0o022));
        assert_eq!((d.max_file_size, d.max_bytes_tx_per_minute, d.max_bytes_rx_per_minute), (1 << 30, 0, 0));
        assert!(!d.preserve_mode && !d.preserve_owner && !d.preserve_group && d.owner_put.is_none());
        assert_eq!(config.redacted_json().unwrap()["file_transfer"]["umask"], "0022");

        let umask_of = |umask: Value| {
            let text = json!({"broker": {"url": "mqtt://h"}, "file_transfer": {"umask": umask}}).to_string();
            Config::parse(&text).map(|c| c.file_transfer.umask).map_err(|e| e.0)
        };
        assert_eq!(umask_of(json!("0027")), Ok(0o027));
        assert_eq!(umask_of(json!("77")), Ok(0o077));
        assert_eq!(umask_of(json!(22)), Ok(0o022), "digits read as octal, as umask(1) does");
        for bad in [json!("0028"), json!(1000), json!("u=rwx"), json!(""), json!(-1), json!(true)] {
            let error = umask_of(bad.clone()).unwrap_err();
            assert!(
                error.starts_with("file_transfer.umask: must be octal permission bits"),
                "{bad}: {error}"
            );
        }
        for (patch, message) in [
            (json!({"chroot": "data"}), "file_transfer.chroot: must be an absolute path, e.g. \"/data\", got \"data\""),
            (json!({"owner_get": ["root", ""]}), "file_transfer.owner_get[1]: must be a user or group name, got \"\""),
            (json!({"owner_put": ""}), "file_transfer.owner_put: must be a user or group name, e.g. \"app\", got \"\""),
            (json!({"allow_overwrite": "no"}), "file_transfer.allow_overwrite: must be true or false, got \"no\""),
            (json!({"max_file_size": -1}), "file_transfer.max_file_size: must be a whole number of bytes from 0 to 18446744073709551615, got -1"),
            (json!({"max_bytes_tx_per_minute": 1.5}), "file_transfer.max_bytes_tx_per_minute: must be a whole number of bytes from 0 to 18446744073709551615, got 1.5"),
        ] {
            assert_eq!(error_of(json!({"file_transfer": patch})), message);
        }
        assert!(error_of(json!({"file_transfer": {"chroot_dir": "/"}}))
            .starts_with("file_transfer.chroot_dir: unknown key (the keys here are disable, chroot, "));
    }

    #[test]
    fn log_sources() {
        let config = Config::parse(
            &json!({
                "broker": {"url": "mqtt://h"},
                "logs": {"sources": [
                    {"name": "app", "files": ["/var/log/app/*.log", "/var/log/app.log"]},
                    {"name": "modem", "command": ["/usr/bin/modem-log", "-f"]},
                ], "builtin_sources": false},
            })
            .to_string(),
        )
        .unwrap();
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            config.logs.sources,
            [
                LogSource {
                    name: "app".into(),
                    input: LogInput::Files(words(&["/var/log/app/*.log", "/var/log/app.log"]))
                },
                LogSource {
                    name: "modem".into(),
                    input: LogInput::Command(words(&["/usr/bin/modem-log", "-f"]))
                },
            ]
        );
        assert!(!config.logs.builtin_sources);
        let shown = config.redacted_json().unwrap();
        assert_eq!(
            shown["logs"]["sources"][1],
            json!({"name": "modem", "command": ["/usr/bin/modem-log", "-f"]})
        );
        let defaults = Config::parse(r#"{"broker": {"url": "mqtt://h"}}"#).unwrap().logs;
        assert!(defaults.sources.is_empty() && defaults.builtin_sources);

        let source = |entry: Value| error_of(json!({"logs": {"sources": [entry]}}));
        assert_eq!(
            source(json!({"files": ["/var/log/x"]})),
            "logs.sources[0].name: missing: the name tetherctl logs knows it by"
        );
        assert_eq!(
            source(json!({"name": "a b", "files": ["/x"]})),
            "logs.sources[0].name: \"a b\" is not a source name: 1 to 64 of A-Z a-z 0-9 - _ ."
        );
        assert_eq!(
            source(json!({"name": "a", "files": ["/x"], "command": ["/bin/cat"]})),
            "logs.sources[0]: needs exactly one of \"files\" and \"command\""
        );
        assert_eq!(
            source(json!({"name": "a", "files": []})),
            "logs.sources[0].files: must name at least one file, e.g. [\"/var/log/messages\"]"
        );
        assert_eq!(
            source(json!({"name": "a", "files": ["/ok", "var/log/x"]})),
            "logs.sources[0].files[1]: \"var/log/x\" must be an absolute path"
        );
        assert_eq!(
            source(json!({"name": "a", "files": ["/var/log/*/x.log"]})),
            "logs.sources[0].files[0]: \"/var/log/*/x.log\" may have * and ? in its last component only, e.g. \"/var/log/*.log\""
        );
        assert_eq!(
            source(json!({"name": "a", "files": ["/var/log/"]})),
            "logs.sources[0].files[0]: \"/var/log/\" must name a file, not a directory"
        );
        assert!(source(json!({"name": "a", "command": []}))
            .starts_with("logs.sources[0].command: must start with"));
        assert_eq!(
            source(json!({"name": "a", "file": "/x"})),
            "logs.sources[0].file: unknown key (the keys here are name, files, command)"
        );
        assert_eq!(
            error_of(
                json!({"logs": {"sources": [{"name": "a", "files": ["/x"]}, {"name": "a", "files": ["/y"]}]}})
            ),
            "logs.sources[1].name: \"a\" is named twice"
        );
        assert_eq!(
            error_of(json!({"logs": {"builtin_sources": "no"}})),
            "logs.builtin_sources: must be true or false, got \"no\""
        );
    }

    #[test]
    fn tetherctl_reads_the_broker_object_with_the_same_errors() {
        let broker: BrokerConfig =
            serde_json::from_str(r#"{"url": "wss://b/mqtt", "keepalive_s": 30}"#).unwrap();
        assert_eq!(
            (broker.url.as_str(), broker.keepalive_s, broker.connect_timeout_s),
            ("wss://b/mqtt", 30, 30)
        );
        let e = serde_json::from_str::<BrokerConfig>(r#"{"url": "wss://b/mqtt", "keepalive_s": "x"}"#)
            .unwrap_err();
        assert!(e.to_string().starts_with("broker.keepalive_s: must be a whole number of seconds"), "{e}");
    }

    #[test]
    fn redacted_json_hides_secrets_and_command_arguments_unless_public() {
        let config = Config::parse(
            &json!({
                "broker": {"url": "wss://b.example/mqtt", "proxy": "http://u:proxypw@proxy:3128"},
                "heartbeat": {"custom": {
                    "modem": {"command": ["/usr/bin/modem-status", "--token", "s3cret"]},
                    "uptime": {"command": ["/usr/bin/uptime", "-p"], "public": true},
                    "date": {"command": ["/bin/date"]},
                    "fw": {"file": "/etc/version"},
                }},
            })
            .to_string(),
        )
        .unwrap();
        let shown = config.redacted_json().unwrap();
        let text = shown.to_string();
        for secret in ["s3cret", "--token", "proxypw"] {
            assert!(!text.contains(secret), "{secret} is in {text}");
        }
        let custom = &shown["heartbeat"]["custom"];
        assert_eq!(custom["modem"]["command"], json!(["/usr/bin/modem-status", "…"]));
        assert_eq!(custom["uptime"]["command"], json!(["/usr/bin/uptime", "-p"]));
        assert_eq!(custom["uptime"]["public"], true);
        assert_eq!(custom["date"]["command"], json!(["/bin/date"]));
        assert_eq!(custom["fw"]["file"], "/etc/version");
        // The running config itself keeps every argument.
        assert_eq!(config.heartbeat.custom["modem"].command.as_ref().unwrap().len(), 3);
    }
}
