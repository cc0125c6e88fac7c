//! Client options from a `BrokerConfig`: how the agent and `tetherctl` both reach the broker.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::client::ClientOptions;
use super::dial::Route;
use super::tls::{self, TlsFiles};
use super::url::{BrokerUrl, ProxyUrl};
use crate::config::{BrokerConfig, ReconnectConfig};

/// Incoming packets bigger than this are skipped unless the caller sets another bound.
const DEFAULT_MAX_PACKET: usize = 4 * 1024 * 1024;

impl ClientOptions {
    /// The route (URL, proxy, TLS), login, keepalive and connect timeout of `b`; no will, no
    /// subscriptions and the default reconnect backoff, for the caller to change. Fails on an
    /// unusable URL or an unreadable TLS or password file.
    pub fn for_broker(b: &BrokerConfig, client_id: String) -> Result<ClientOptions, String> {
        let proxy =
            b.proxy.as_deref().map(ProxyUrl::parse).transpose().map_err(|e| format!("broker.proxy: {e}"))?;
        let mut tls_config = None;
        let mut routes = Vec::new();
        for (i, url) in b.urls().enumerate() {
            let key = if b.failover_urls.is_empty() {
                "broker.url".to_string()
            } else {
                format!("broker.url[{i}]")
            };
            let broker = BrokerUrl::parse(url).map_err(|e| format!("{key}: {e}"))?;
            if broker.scheme.is_tls() && tls_config.is_none() {
                tls_config = Some(tls_for(b)?);
            }
            let tls = tls_config.clone().filter(|_| broker.scheme.is_tls());
            routes.push(Arc::new(Route { broker, proxy: proxy.clone(), tls }));
        }
        let password = match &b.password_file {
            Some(path) => Some(read_password(path)?),
            None => None,
        };
        let reconnect = ReconnectConfig::default();
        Ok(ClientOptions {
            routes,
            client_id,
            username: b.username.clone(),
            password,
            keepalive: Duration::from_secs(b.keepalive_s.into()),
            connect_timeout: Duration::from_secs(b.connect_timeout_s),
            will: None,
            subscriptions: Vec::new(),
            end_marker: None,
            reconnect_min: Duration::from_secs(reconnect.min_s),
            reconnect_max: Duration::from_secs(reconnect.max_s),
            max_packet: DEFAULT_MAX_PACKET,
            subscription_qos: mqttbytes::QoS::AtLeastOnce,
            give_up_on_rejected_certificate: false,
        })
    }
}

/// One TLS setting for every node: they are one broker, with one CA.
fn tls_for(b: &BrokerConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let files = TlsFiles {
        ca_file: b.ca_file.as_deref(),
        cert_file: b.cert_file.as_deref(),
        key_file: b.key_file.as_deref(),
    };
    tls::client_config(&files)
}

/// What `ClientOptions::for_broker` builds from, each with a digest: the settings, and the
/// content of each file they name. The agent compares them on SIGHUP to know whether its
/// connection must be made again: a rotated password or certificate usually keeps its path.
pub struct BrokerInputs(Vec<(&'static str, u64)>);

impl BrokerInputs {
    /// Reads every file `b` names; one that cannot be read has a digest of its own, so it
    /// differs from what was read before and `for_broker` is asked, and says why it fails.
    pub fn read(b: &BrokerConfig) -> BrokerInputs {
        let mut inputs = vec![("broker settings", settings_digest(b))];
        let files = [
            ("broker.ca_file", &b.ca_file),
            ("broker.cert_file", &b.cert_file),
            ("broker.key_file", &b.key_file),
            ("broker.password_file", &b.password_file),
        ];
        for (key, path) in files {
            if let Some(path) = path {
                inputs.push((key, digest(&std::fs::read(path).ok())));
            }
        }
        BrokerInputs(inputs)
    }

    /// The names of the inputs that differ from `before` (`broker.password_file`...).
    pub fn changed_since(&self, before: &BrokerInputs) -> Vec<&'static str> {
        self.0.iter().filter(|input| !before.0.contains(input)).map(|(name, _)| *name).collect()
    }
}

fn settings_digest(b: &BrokerConfig) -> u64 {
    // Destructured, so a setting added to BrokerConfig cannot be left out.
    let BrokerConfig {
        url,
        failover_urls,
        ca_file,
        cert_file,
        key_file,
        username,
        password_file,
        proxy,
        keepalive_s,
        connect_timeout_s,
    } = b;
    digest(&(
        url,
        failover_urls,
        ca_file,
        cert_file,
        key_file,
        username,
        password_file,
        proxy,
        keepalive_s,
        connect_timeout_s,
    ))
}

fn digest(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// The password file's content without its trailing newline. The content is never logged.
fn read_password(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("broker.password_file: {}: {}", path.display(), crate::fsutil::error_text(&e))
    })?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

#[cfg(test)]
mod tests {
    use super::BrokerInputs;
    use crate::config::BrokerConfig;

    fn broker(password_file: &std::path::Path) -> BrokerConfig {
        let json = serde_json::json!({"url": "mqtt://h", "username": "u", "password_file": password_file});
        crate::config::Config::parse(&serde_json::json!({"broker": json}).to_string()).unwrap().broker
    }

    #[test]
    fn a_file_changed_under_the_same_path_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "old").unwrap();
        let config = broker(&path);
        let before = BrokerInputs::read(&config);
        assert!(BrokerInputs::read(&config).changed_since(&before).is_empty());
        std::fs::write(&path, "new").unwrap();
        assert_eq!(BrokerInputs::read(&config).changed_since(&before), ["broker.password_file"]);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(BrokerInputs::read(&config).changed_since(&before), ["broker.password_file"]);
        let mut other = config.clone();
        other.keepalive_s += 1;
        assert_eq!(
            BrokerInputs::read(&other).changed_since(&before),
            ["broker settings", "broker.password_file"]
        );
    }
}
