//! Tether: the device agent (`tether-agent`) and the operator CLI (`tetherctl`) share this
//! library: configuration, the wire protocol and the MQTT connection.

pub mod agent;
pub mod config;
pub mod fsutil;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod random;
pub mod runner;
pub mod signals;
pub mod stream;
pub mod text;
pub mod trust;
pub mod worker;

/// The agent's version: Cargo.toml's, or `TETHER_VERSION` when the build set it (build.rs).
pub const VERSION: &str = env!("TETHER_VERSION");
/// The target triple this build is for, e.g. `armv5te-unknown-linux-musleabi`.
pub const TARGET: &str = env!("TETHER_TARGET");
