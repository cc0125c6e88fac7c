//! Where to connect, and with which key to sign: each setting comes from its flag, else its
//! environment variable, else the `--config` file (the agent's `broker` object plus
//! `topic_root`; an operator's file may add `identity` and `known_devices`), else its default.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tether::config::BrokerConfig;
use tether::protocol::check_topic_root;

use crate::Failure;

const DEFAULT_TOPIC_ROOT: &str = "tether";
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection flags as given on the command line.
#[derive(Debug, Default, PartialEq)]
pub struct ConnFlags {
    pub broker: Option<String>,
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<String>,
    pub proxy: Option<String>,
    pub topic_root: Option<String>,
    pub config: Option<String>,
    pub connect_timeout: Option<Duration>,
    pub identity: Option<String>,
    pub known_devices: Option<String>,
}

/// Who signs requests, and where the keys of the devices seen so far are kept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrustSettings {
    /// The key file to sign with, and how the user gave it (`--identity`, `TETHER_IDENTITY`,
    /// `config FILE: identity`); None: the first key in ssh-agent that devices accept, if any.
    pub identity: Option<(PathBuf, String)>,
    /// None when there is no home directory to keep it in and none was given.
    pub known_devices: Option<PathBuf>,
    /// The options that point another tetherctl at the same known_devices file, for the
    /// commands that warnings tell the user to run; empty when it comes from the environment
    /// or is the default.
    pub known_devices_options: Vec<String>,
}

#[derive(Clone)]
pub struct Settings {
    pub broker: BrokerConfig,
    pub topic_root: String,
    /// How long tetherctl tries to reach the broker before it gives up (exit 3).
    pub connect_timeout: Duration,
    pub trust: TrustSettings,
    /// The settings given by flag or environment: (config key, flag or variable name), so an
    /// error names what the user typed.
    sources: Vec<(&'static str, &'static str)>,
    config_path: Option<String>,
}

/// The config keys tetherctl takes from flags, with the flag that sets each: an error about a
/// key the user did not give names the flag they would use.
const FLAGS: [(&str, &str); 8] = [
    ("broker.url", "--broker"),
    ("broker.ca_file", "--ca"),
    ("broker.cert_file", "--cert"),
    ("broker.key_file", "--key"),
    ("broker.username", "--username"),
    ("broker.password_file", "--password-file"),
    ("broker.proxy", "--proxy"),
    ("topic_root", "--topic-root"),
];

impl Settings {
    /// Rewrites an error about config keys ("broker.cert_file and broker.key_file go together")
    /// to name what the user typed: the flag ("--cert"), the variable ("TETHER_CERT"), or the
    /// config file the key is in ("config FILE: broker.cert_file ..."). A key given nowhere is
    /// named by its flag.
    pub fn name_source(&self, message: String) -> String {
        let mut message = message;
        let mut from_file = false;
        for (key, flag) in FLAGS {
            if !message.contains(key) {
                continue;
            }
            let given_as = self.sources.iter().find(|(k, _)| *k == key).map(|(_, given_as)| *given_as);
            match given_as {
                Some(given_as) => message = message.replace(key, given_as),
                None if self.in_config_file(key) => from_file = true,
                None => message = message.replace(key, flag),
            }
        }
        let other_file_key = message.starts_with("broker.");
        match &self.config_path {
            Some(path) if from_file || other_file_key => format!("config {path}: {message}"),
            _ => message,
        }
    }

    /// Whether the config file set `key` (it is set, and no flag or variable did).
    fn in_config_file(&self, key: &str) -> bool {
        let b = &self.broker;
        self.config_path.is_some()
            && match key {
                "broker.url" => true,
                "broker.ca_file" => b.ca_file.is_some(),
                "broker.cert_file" => b.cert_file.is_some(),
                "broker.key_file" => b.key_file.is_some(),
                "broker.username" => b.username.is_some(),
                "broker.password_file" => b.password_file.is_some(),
                "broker.proxy" => b.proxy.is_some(),
                _ => self.topic_root != DEFAULT_TOPIC_ROOT,
            }
    }
}

/// What tetherctl reads from a config file: the agent's own file works (its other keys are the
/// device's business and ignored), as does a file with just these two.
#[derive(Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    broker: Option<BrokerConfig>,
    #[serde(default)]
    topic_root: Option<String>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    known_devices: Option<String>,
}

/// Takes each setting from its flag, else its environment variable, and remembers which, for
/// error messages.
struct Picker<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    sources: Vec<(&'static str, &'static str)>,
}

impl Picker<'_> {
    fn pick(
        &mut self,
        key: &'static str,
        flag: &Option<String>,
        flag_name: &'static str,
        var: &'static str,
    ) -> Option<String> {
        if let Some(value) = flag.clone() {
            self.sources.push((key, flag_name));
            return Some(value);
        }
        let value = (self.env)(var).filter(|v| !v.is_empty())?;
        self.sources.push((key, var));
        Some(value)
    }

    /// The config file given, loaded (empty when none is).
    fn config_file(&mut self, flags: &ConnFlags) -> Result<(Option<String>, ConfigFile), Failure> {
        let path = self.pick("config", &flags.config, "--config", "TETHER_CONFIG");
        let file = match &path {
            Some(path) => load(Path::new(path))?,
            None => ConfigFile::default(),
        };
        Ok((path, file))
    }

    fn trust(&mut self, flags: &ConnFlags, file: &ConfigFile, config_path: Option<&str>) -> TrustSettings {
        let in_file = |key: &str| format!("config {}: {key}", config_path.unwrap_or_default());
        let identity = match self.pick("identity", &flags.identity, "--identity", "TETHER_IDENTITY") {
            Some(path) => Some((PathBuf::from(path), self.given_as("identity").to_string())),
            None => file.identity.as_ref().map(|path| (PathBuf::from(path), in_file("identity"))),
        };
        let given =
            self.pick("known_devices", &flags.known_devices, "--known-devices", "TETHER_KNOWN_DEVICES");
        let (known_devices, known_devices_options) = match (given, &file.known_devices, config_path) {
            (Some(path), ..) if self.given_as("known_devices") == "--known-devices" => {
                (Some(PathBuf::from(&path)), vec!["--known-devices".into(), path])
            }
            (Some(path), ..) => (Some(PathBuf::from(path)), vec![]),
            (None, Some(path), Some(config)) => {
                (Some(PathBuf::from(path)), vec!["--config".into(), config.to_string()])
            }
            _ => (default_known_devices(self.env), vec![]),
        };
        TrustSettings { identity, known_devices, known_devices_options }
    }

    fn given_as(&self, key: &str) -> &'static str {
        self.sources.iter().find(|(k, _)| *k == key).map_or("", |(_, given_as)| given_as)
    }
}

/// `$XDG_CONFIG_HOME/tether/known_devices`, else `~/.config/tether/known_devices`, as ssh keeps
/// `~/.ssh/known_hosts`.
fn default_known_devices(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let xdg = env("XDG_CONFIG_HOME").map(PathBuf::from).filter(|dir| dir.is_absolute());
    let config_home =
        xdg.or_else(|| env("HOME").filter(|h| !h.is_empty()).map(|h| Path::new(&h).join(".config")));
    Some(config_home?.join("tether").join("known_devices"))
}

/// The trust settings alone, for commands that do not connect.
pub fn resolve_trust(
    flags: &ConnFlags,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<TrustSettings, Failure> {
    let mut picker = Picker { env, sources: Vec::new() };
    let (config_path, file) = picker.config_file(flags)?;
    Ok(picker.trust(flags, &file, config_path.as_deref()))
}

/// The broker settings of the config file (or defaults) with the nodes of `urls`, a
/// comma-separated list: the nodes of one cluster, tried in turn like the agent's.
fn with_urls(file_broker: Option<BrokerConfig>, urls: &str) -> BrokerConfig {
    let mut nodes = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from);
    let first = nodes.next().unwrap_or_default();
    let mut broker = file_broker.unwrap_or_else(|| BrokerConfig::new(first.clone()));
    broker.url = first;
    broker.failover_urls = nodes.collect();
    broker
}

/// `env` looks up an environment variable (a parameter so tests need not change the process's).
pub fn resolve(flags: &ConnFlags, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, Failure> {
    let mut picker = Picker { env, sources: Vec::new() };
    let (config_path, file) = picker.config_file(flags)?;
    let trust = picker.trust(flags, &file, config_path.as_deref());
    let given = picker.pick("broker.url", &flags.broker, "--broker", "TETHER_BROKER");
    let mut broker = match (given, file.broker) {
        (Some(urls), file_broker) => with_urls(file_broker, &urls),
        (None, Some(file_broker)) => file_broker,
        (None, None) => {
            return Err(Failure::usage("no broker given: use --broker URL, TETHER_BROKER or --config FILE"))
        }
    };
    let ca = picker.pick("broker.ca_file", &flags.ca, "--ca", "TETHER_CA");
    let cert = picker.pick("broker.cert_file", &flags.cert, "--cert", "TETHER_CERT");
    let key = picker.pick("broker.key_file", &flags.key, "--key", "TETHER_KEY");
    let password_file =
        picker.pick("broker.password_file", &flags.password_file, "--password-file", "TETHER_PASSWORD_FILE");
    let username = picker.pick("broker.username", &flags.username, "--username", "TETHER_USERNAME");
    let proxy = picker.pick("broker.proxy", &flags.proxy, "--proxy", "TETHER_PROXY");
    let topic_root = picker.pick("topic_root", &flags.topic_root, "--topic-root", "TETHER_TOPIC_ROOT");
    broker.ca_file = ca.map(PathBuf::from).or(broker.ca_file.take());
    broker.cert_file = cert.map(PathBuf::from).or(broker.cert_file.take());
    broker.key_file = key.map(PathBuf::from).or(broker.key_file.take());
    broker.password_file = password_file.map(PathBuf::from).or(broker.password_file.take());
    broker.username = username.or(broker.username.take());
    broker.proxy = proxy.or(broker.proxy.take());

    let topic_root = topic_root.or(file.topic_root).unwrap_or_else(|| DEFAULT_TOPIC_ROOT.into());
    let settings = Settings {
        broker,
        topic_root,
        connect_timeout: flags.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        trust,
        sources: picker.sources,
        config_path,
    };
    settings.broker.validate().map_err(|e| Failure::config(settings.name_source(e.to_string())))?;
    check_topic_root(&settings.topic_root)
        .map_err(|e| Failure::config(settings.name_source(format!("topic_root: {e}"))))?;
    Ok(settings)
}

fn load(path: &Path) -> Result<ConfigFile, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::config(format!("config {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Failure::config(format!("config {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn a_list_of_urls_names_the_nodes_of_one_cluster_and_replaces_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ctl.json");
        std::fs::write(&config, r#"{"broker":{"url":["mqtt://f1:1883","mqtt://f2:1883"]}}"#).unwrap();
        let from_file = ConnFlags { config: Some(config.to_str().unwrap().into()), ..Default::default() };
        let s = resolve(&from_file, &env(&[])).unwrap();
        assert_eq!(
            (s.broker.url.as_str(), s.broker.failover_urls.as_slice()),
            ("mqtt://f1:1883", &["mqtt://f2:1883".to_string()][..])
        );

        let flags =
            ConnFlags { broker: Some("mqtt://a:1883, mqtt://b:1883,mqtt://c:1883".into()), ..from_file };
        let s = resolve(&flags, &env(&[])).unwrap();
        assert_eq!(s.broker.url, "mqtt://a:1883");
        assert_eq!(s.broker.failover_urls, ["mqtt://b:1883", "mqtt://c:1883"]);
    }

    #[test]
    fn flags_win_over_env_and_env_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ctl.json");
        std::fs::write(
            &config,
            r#"{"broker":{"url":"mqtt://file:1883","username":"from-file","keepalive_s":30},
                "topic_root":"fleet"}"#,
        )
        .unwrap();
        let flags = ConnFlags { broker: Some("mqtt://flag:1883".into()), ..Default::default() };
        let vars = env(&[
            ("TETHER_CONFIG", config.to_str().unwrap()),
            ("TETHER_BROKER", "mqtt://env:1883"),
            ("TETHER_USERNAME", "from-env"),
        ]);
        let s = resolve(&flags, &vars).unwrap();
        assert_eq!(s.broker.url, "mqtt://flag:1883");
        assert_eq!(s.broker.username.as_deref(), Some("from-env"));
        assert_eq!(s.broker.keepalive_s, 30);
        assert_eq!(s.topic_root, "fleet");
        assert_eq!(s.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    }

    #[test]
    fn missing_broker_is_a_usage_error_and_bad_settings_are_config_errors() {
        let none = env(&[]);
        assert_eq!(resolve(&ConnFlags::default(), &none).err().unwrap().code, crate::exit::USAGE);
        let bad_url = ConnFlags { broker: Some("http://x".into()), ..Default::default() };
        let e = resolve(&bad_url, &none).err().unwrap();
        assert_eq!(e.code, crate::exit::CONFIG);
        assert!(e.message.contains("unsupported scheme"), "{}", e.message);
        let bad_root = ConnFlags {
            broker: Some("mqtt://h".into()),
            topic_root: Some("a/+".into()),
            ..Default::default()
        };
        assert_eq!(resolve(&bad_root, &none).err().unwrap().code, crate::exit::CONFIG);
    }

    #[test]
    fn errors_name_the_flag_variable_or_file_the_setting_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ctl.json");
        std::fs::write(&config, r#"{"broker":{"url":"mqtts://h","cert_file":"/no/cert.pem"}}"#).unwrap();
        let config = config.to_str().unwrap().to_string();
        let message =
            |flags: ConnFlags, vars: &[(&str, &str)]| resolve(&flags, &env(vars)).err().unwrap().message;
        let flag = ConnFlags {
            broker: Some("mqtts://h".into()),
            ca: Some("/no/ca.pem".into()),
            ..Default::default()
        };
        assert!(message(flag, &[]).starts_with("--ca: /no/ca.pem: "));
        let by_env = ConnFlags { broker: Some("mqtts://h".into()), ..Default::default() };
        assert!(message(by_env, &[("TETHER_PASSWORD_FILE", "/no/pw")])
            .starts_with("TETHER_PASSWORD_FILE: /no/pw: "));
        let bad_url = ConnFlags { broker: Some("ftp://h".into()), ..Default::default() };
        assert!(message(bad_url, &[]).starts_with("--broker: unsupported scheme"));
        let in_file = ConnFlags { config: Some(config.clone()), ..Default::default() };
        let m = message(in_file, &[]);
        assert!(m.starts_with(&format!("config {config}: broker.cert_file: /no/cert.pem: ")), "{m}");
    }

    #[test]
    fn errors_about_two_keys_name_both_as_the_user_gave_them() {
        let message = |flags: ConnFlags, vars: &[(&str, &str)]| {
            resolve(&flags, &env(vars)).err().map(|e| e.message).unwrap_or_default()
        };
        let cert_only = ConnFlags {
            broker: Some("mqtts://h".into()),
            cert: Some("/etc/hostname".into()),
            ..Default::default()
        };
        assert_eq!(message(cert_only, &[]), "--cert and --key go together");
        let key_by_env = ConnFlags { broker: Some("mqtts://h".into()), ..Default::default() };
        assert_eq!(
            message(key_by_env, &[("TETHER_KEY", "/etc/hostname")]),
            "--cert and TETHER_KEY go together"
        );
        let password_only = ConnFlags {
            broker: Some("mqtt://h".into()),
            password_file: Some("/etc/hostname".into()),
            ..Default::default()
        };
        assert_eq!(message(password_only, &[]), "--password-file needs --username");
        let bad_root = ConnFlags {
            broker: Some("mqtt://h".into()),
            topic_root: Some("a/+".into()),
            ..Default::default()
        };
        assert!(message(bad_root, &[]).starts_with("--topic-root: \"+\""));
    }

    #[test]
    fn identity_and_known_devices_come_from_flag_env_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ctl.json");
        std::fs::write(&config, r#"{"identity":"/k/file","known_devices":"/kd/file"}"#).unwrap();
        let config = config.to_str().unwrap().to_string();
        let from_file = ConnFlags { config: Some(config.clone()), ..Default::default() };
        let t = resolve_trust(&from_file, &env(&[("HOME", "/home/u")])).unwrap();
        assert_eq!(t.identity, Some(("/k/file".into(), format!("config {config}: identity"))));
        assert_eq!(t.known_devices, Some("/kd/file".into()));
        assert_eq!(t.known_devices_options, ["--config".to_string(), config.clone()]);

        let vars = env(&[("TETHER_IDENTITY", "/k/env"), ("TETHER_KNOWN_DEVICES", "/kd/env")]);
        let t = resolve_trust(&from_file, &vars).unwrap();
        assert_eq!(t.identity, Some(("/k/env".into(), "TETHER_IDENTITY".into())));
        assert_eq!((t.known_devices, t.known_devices_options), (Some("/kd/env".into()), vec![]));

        let flags = ConnFlags {
            identity: Some("/k/flag".into()),
            known_devices: Some("/kd/flag".into()),
            ..from_file
        };
        let t = resolve_trust(&flags, &vars).unwrap();
        assert_eq!(t.identity, Some(("/k/flag".into(), "--identity".into())));
        assert_eq!(t.known_devices_options, ["--known-devices", "/kd/flag"]);
    }

    #[test]
    fn known_devices_live_in_the_users_config_directory_by_default() {
        let default = |vars: &[(&str, &str)]| resolve_trust(&ConnFlags::default(), &env(vars)).unwrap();
        let t = default(&[("HOME", "/home/u")]);
        assert_eq!(t.known_devices, Some("/home/u/.config/tether/known_devices".into()));
        assert_eq!((t.identity, t.known_devices_options.len()), (None, 0));
        let xdg = default(&[("HOME", "/home/u"), ("XDG_CONFIG_HOME", "/xdg")]);
        assert_eq!(xdg.known_devices, Some("/xdg/tether/known_devices".into()));
        let relative = default(&[("HOME", "/home/u"), ("XDG_CONFIG_HOME", "rel")]);
        assert_eq!(relative.known_devices, Some("/home/u/.config/tether/known_devices".into()));
        assert_eq!(default(&[]).known_devices, None);
    }

    #[test]
    fn the_agents_own_config_file_gives_broker_and_topic_root() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.json");
        std::fs::write(
            &config,
            r#"{"broker":{"url":"mqtt://h","username":"u"},"topic_root":"fleet","device_id":"x",
                "heartbeat":{"interval_s":5},"state_dir":"/var/lib/tether"}"#,
        )
        .unwrap();
        let flags = ConnFlags { config: Some(config.to_str().unwrap().into()), ..Default::default() };
        let s = resolve(&flags, &env(&[])).unwrap();
        assert_eq!((s.broker.url.as_str(), s.topic_root.as_str()), ("mqtt://h", "fleet"));
        assert_eq!(s.broker.username.as_deref(), Some("u"));
    }
}
