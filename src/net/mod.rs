//! Everything between the agent and the broker: URL, TCP, proxy, TLS, WebSocket and MQTT.

pub mod url;
