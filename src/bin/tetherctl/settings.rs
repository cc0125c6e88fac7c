//! Where to connect: each setting comes from its flag, else its environment variable, else the
//! `--config` file (the agent's `broker` object plus `topic_root`), else its default.

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
}

pub struct Settings {
    pub broker: BrokerConfig,
    pub topic_root: String,
    /// How long tetherctl tries to reach the broker before it gives up (exit 3).
    pub connect_timeout: Duration,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    broker: Option<BrokerConfig>,
    #[serde(default)]
    topic_root: Option<String>,
}

/// `env` looks up an environment variable (a parameter so tests need not change the process's).
pub fn resolve(flags: &ConnFlags, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, Failure> {
    let pick = |flag: &Option<String>, var: &str| flag.clone().or_else(|| env(var).filter(|v| !v.is_empty()));
    let file = match pick(&flags.config, "TETHER_CONFIG") {
        Some(path) => load(Path::new(&path))?,
        None => ConfigFile::default(),
    };
    let url = pick(&flags.broker, "TETHER_BROKER")
        .or_else(|| file.broker.as_ref().map(|b| b.url.clone()))
        .ok_or_else(|| Failure::usage("no broker given: use --broker URL, TETHER_BROKER or --config FILE"))?;
    let mut broker = file.broker.unwrap_or_else(|| BrokerConfig::new(url.clone()));
    broker.url = url;
    let path = |flag: &Option<String>, var: &str, current: Option<PathBuf>| {
        pick(flag, var).map(PathBuf::from).or(current)
    };
    broker.ca_file = path(&flags.ca, "TETHER_CA", broker.ca_file.take());
    broker.cert_file = path(&flags.cert, "TETHER_CERT", broker.cert_file.take());
    broker.key_file = path(&flags.key, "TETHER_KEY", broker.key_file.take());
    broker.password_file = path(&flags.password_file, "TETHER_PASSWORD_FILE", broker.password_file.take());
    broker.username = pick(&flags.username, "TETHER_USERNAME").or(broker.username.take());
    broker.proxy = pick(&flags.proxy, "TETHER_PROXY").or(broker.proxy.take());
    broker.validate().map_err(|e| Failure::config(e.to_string()))?;

    let topic_root = pick(&flags.topic_root, "TETHER_TOPIC_ROOT")
        .or(file.topic_root)
        .unwrap_or_else(|| DEFAULT_TOPIC_ROOT.into());
    check_topic_root(&topic_root).map_err(|e| Failure::config(format!("topic root: {e}")))?;
    let connect_timeout = flags.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    Ok(Settings { broker, topic_root, connect_timeout })
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
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ctl.json");
        std::fs::write(&config, r#"{"broker":{"url":"mqtt://h"},"device_id":"x"}"#).unwrap();
        let flags = ConnFlags { config: Some(config.to_str().unwrap().into()), ..Default::default() };
        let e = resolve(&flags, &env(&[])).err().unwrap();
        assert!(e.message.contains("unknown field `device_id`"), "{}", e.message);
    }
}
