//! End-to-end encrypted, flow-controlled streams between an operator and a device, carried as
//! MQTT messages through a broker that sees only ciphertext (docs/protocol.md, "Tunnels").
//!
//! A tunnel is opened by a signed command (`shell`, `exec`, `forward`): the request carries the
//! operator's ephemeral key, the device's signed answer its own; both derive the keys
//! (`crypto`). Inside a tunnel, numbered streams carry bytes (a shell's terminal, an exec's
//! stdin/stdout/stderr, each forwarded connection), each with its own window. `Tunnel` is the
//! state of one tunnel, pure: its owner feeds it frames and time, and publishes what it hands
//! back, so agent and tetherctl share it and it is tested without I/O.

mod crypto;
pub mod endpoint;
mod message;
mod tunnel;

pub use crypto::{Handshake, Keys, Role, PUBLIC_KEY_LEN};
pub use message::{Message, StreamId};
pub use tunnel::{Rejected, Tunnel, MAX_DATA};

/// A tunnel's window (bytes in flight per stream) when a side names none.
pub const DEFAULT_WINDOW: u32 = 256 * 1024;
/// Windows are clamped to this range: below it a stream crawls, above it memory is not bounded
/// by anything the device chose.
pub const MIN_WINDOW: u32 = 16 * 1024;
pub const MAX_WINDOW: u32 = 4 * 1024 * 1024;

/// The end reasons a device gives when the link failed, not the work: a tool may open the
/// tunnel again and go on (docs/protocol.md, "Ending"). Other reasons are for people.
pub const END_OPERATOR_GONE: &str = "the operator's connection dropped and did not come back";
/// The start of the reason for `remote_access.expire_after_idle_s` (the broker away that long).
pub const END_IDLE: &str = "expired: nothing from the operator";

/// Whether a device's end `reason` says the link failed (see `END_OPERATOR_GONE`).
pub fn link_lost(reason: &str) -> bool {
    reason == END_OPERATOR_GONE || reason.starts_with(END_IDLE)
}

/// What both ends feed the key derivation with besides the keys: the tunnel's device, op and
/// id, so that the keys belong to this one request.
pub fn tunnel_context(device: &str, op: &str, id: &str) -> String {
    format!("{device}\n{op}\n{id}")
}
