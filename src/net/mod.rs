//! Everything between the agent and the broker: URL, TCP, proxy, TLS, WebSocket and MQTT.

pub mod client;
pub mod dial;
pub mod link;
pub mod options;
pub mod tls;
pub mod url;
mod ws;
