//! Client options from a `BrokerConfig`: how the agent and `tetherctl` both reach the broker.

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
        let broker = BrokerUrl::parse(&b.url).map_err(|e| format!("broker.url: {e}"))?;
        let proxy =
            b.proxy.as_deref().map(ProxyUrl::parse).transpose().map_err(|e| format!("broker.proxy: {e}"))?;
        let tls = if broker.scheme.is_tls() {
            let files = TlsFiles {
                ca_file: b.ca_file.as_deref(),
                cert_file: b.cert_file.as_deref(),
                key_file: b.key_file.as_deref(),
            };
            Some(tls::client_config(&files)?)
        } else {
            None
        };
        let password = match &b.password_file {
            Some(path) => Some(read_password(path)?),
            None => None,
        };
        let reconnect = ReconnectConfig::default();
        Ok(ClientOptions {
            route: Arc::new(Route { broker, proxy, tls }),
            client_id,
            username: b.username.clone(),
            password,
            keepalive: Duration::from_secs(b.keepalive_s.into()),
            connect_timeout: Duration::from_secs(b.connect_timeout_s),
            will: None,
            subscriptions: Vec::new(),
            reconnect_min: Duration::from_secs(reconnect.min_s),
            reconnect_max: Duration::from_secs(reconnect.max_s),
            max_packet: DEFAULT_MAX_PACKET,
            subscription_qos: mqttbytes::QoS::AtLeastOnce,
            give_up_on_rejected_certificate: false,
        })
    }
}

/// The password file's content without its trailing newline. The content is never logged.
fn read_password(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("broker.password_file: {}: {}", path.display(), crate::fsutil::error_text(&e))
    })?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}
