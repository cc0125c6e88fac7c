//! Tether: the device agent (`tether-agent`) and the operator CLI (`tetherctl`) share this
//! library: configuration, the wire protocol and the MQTT connection.

pub mod config;
pub mod net;
pub mod protocol;
