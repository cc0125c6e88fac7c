//! The tunnels of `ls`, `get` and `put` (docs/protocol.md, "Files"): stream 0 carries the
//! listing or the file's bytes, a Report the outcome, then the device ends the tunnel. The
//! files themselves are the business of `agent::files`, which checks every path and limit.
//!
//! Bytes are read from (written to) the file on the event loop: regular files do not block
//! for long, and each turn moves at most a window's worth, paced by the rate limiters.

use serde_json::{json, Map, Value};
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::time::Instant;

use crate::agent::files::{hash_prefix, FileAccess, PutRequest, PutTarget, RateLimiter};
use crate::protocol::Op;
use crate::stream::{Message, Tunnel};
use crate::trust::hex;

/// A file op's tunnel: what it sends or receives.
pub enum Transfer {
    Send(Sending),
    Receive(Receiving),
}

/// `ls` (the listing) or `get` (the file from `offset`) on stream 0.
pub struct Sending {
    source: Box<dyn Read + Send>,
    /// `get` only: the sha256 of the whole file, fed with the prefix the operator has.
    hash: Option<ring::digest::Context>,
    pub offset: u64,
    pub sent: u64,
}

/// `put`: the operator's bytes into the temp file.
pub struct Receiving {
    target: Option<PutTarget>,
    /// Bytes written but not yet acknowledged to the operator: acknowledging them no faster
    /// than `max_bytes_rx_per_minute` is what paces the operator (its window stays shut).
    unacknowledged: usize,
    pub received: u64,
    pub offset: u64,
}

/// What a turn of sending did.
pub enum Sent {
    Nothing,
    Some,
    /// Everything went, and the Report: the tunnel may end.
    All,
}

/// Starts `op` on `params.path`: the transfer, and what the signed answer adds to the key
/// share (a get's size, mode and mtime; a put's resume offset). Refused with the reason.
pub fn start(files: &FileAccess, op: Op, params: &Map<String, Value>) -> Result<(Transfer, Value), String> {
    let path = params.get("path").and_then(Value::as_str).unwrap_or_default();
    let count = |name: &str| params.get(name).and_then(Value::as_u64);
    match op {
        Op::Ls => {
            let entries = files.ls(path).map_err(|e| e.0)?;
            let listing = serde_json::to_vec(&entries).map_err(|e| e.to_string())?;
            Ok((listing_of(listing), json!({})))
        }
        Op::Get => {
            let source = files.get(path).map_err(|e| e.0)?;
            let offset = count("offset").unwrap_or(0);
            if offset > source.size {
                return Err(format!("{path}: offset {offset} is past its end ({} bytes)", source.size));
            }
            let mut file = source.file;
            let hash = hash_prefix(&file, offset).map_err(|e| format!("{path}: {e}"))?;
            file.seek(SeekFrom::Start(offset)).map_err(|e| format!("{path}: {e}"))?;
            let file: Box<dyn Read + Send> = Box::new(file);
            let result = json!({ "size": source.size, "mode": source.mode, "mtime": source.mtime });
            Ok((Transfer::Send(Sending { source: file, hash: Some(hash), offset, sent: 0 }), result))
        }
        _ => {
            let request = PutRequest {
                path,
                size: count("size").unwrap_or(0),
                sha256: params.get("sha256").and_then(Value::as_str).unwrap_or_default(),
                mode: count("mode").map(|m| m as u32),
                uid: None,
                gid: None,
            };
            let target = files.begin_put(&request).map_err(|e| e.0)?;
            let offset = target.offset();
            let receiving = Receiving { target: Some(target), unacknowledged: 0, received: 0, offset };
            Ok((Transfer::Receive(receiving), json!({ "offset": offset })))
        }
    }
}

/// JSON on stream 0 (`ls`, `logs --list`), then the Report.
pub fn listing_of(json: Vec<u8>) -> Transfer {
    Transfer::Send(Sending { source: Box::new(Cursor::new(json)), hash: None, offset: 0, sent: 0 })
}

impl Sending {
    /// Reads into stream 0 while the window, the connection (`may_send`) and the rate limit
    /// allow; at the source's end, Eof and the Report.
    pub fn pump(
        &mut self,
        tunnel: &mut Tunnel,
        may_send: impl Fn() -> bool,
        limit: &mut RateLimiter,
        scratch: &mut [u8],
        now: Instant,
    ) -> Result<Sent, String> {
        let mut sent = Sent::Nothing;
        while tunnel.unsent() == 0 && may_send() {
            let room = tunnel.room(0).min(scratch.len());
            let allowed = if room == 0 { 0 } else { limit.allow(room, now) };
            if allowed == 0 {
                break;
            }
            let n = match self.source.read(&mut scratch[..allowed]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("cannot read: {}", crate::fsutil::error_text(&e))),
            };
            if n == 0 {
                self.send_end(tunnel);
                return Ok(Sent::All);
            }
            if let Some(hash) = &mut self.hash {
                hash.update(&scratch[..n]);
            }
            tunnel.send_data(0, &scratch[..n]);
            self.sent += n as u64;
            sent = Sent::Some;
        }
        Ok(sent)
    }

    /// Eof, and the Report: a get's whole-file sha256, and for both the bytes sent.
    fn send_end(&mut self, tunnel: &mut Tunnel) {
        tunnel.send(Message::Eof { stream: 0 });
        let mut report = json!({ "size": self.offset + self.sent, "sent": self.sent });
        if let Some(hash) = self.hash.take() {
            report["sha256"] = Value::String(hex(hash.finish().as_ref()));
        }
        tunnel.send(Message::Report { json: report.to_string() });
    }
}

impl Receiving {
    /// Bytes from the operator: written to the temp file, acknowledged later (`acknowledge`).
    /// A write that fails (a full disk, more bytes than announced) ends the put, and its temp
    /// file goes: kept for a retry, it would go on holding the space a full disk lacks.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let target = self.target.as_mut().ok_or("data after the end of the file")?;
        if let Err(e) = target.write(bytes) {
            if let Some(target) = self.target.take() {
                target.abort();
            }
            return Err(e.0);
        }
        self.received += bytes.len() as u64;
        self.unacknowledged += bytes.len();
        Ok(())
    }

    /// Acknowledges written bytes as far as the rate limit allows; returns whether it allowed
    /// any.
    pub fn acknowledge(&mut self, tunnel: &mut Tunnel, limit: &mut RateLimiter, now: Instant) -> bool {
        if self.unacknowledged == 0 {
            return false;
        }
        let granted = limit.allow(self.unacknowledged, now);
        self.unacknowledged -= granted;
        tunnel.consumed(0, granted, now);
        granted > 0
    }

    pub fn waits_for_rate(&self) -> bool {
        self.unacknowledged > 0
    }

    /// The operator's Eof: the file checked and renamed over the target, and the Report; or
    /// why not (the temp file is gone then, the target untouched).
    pub fn finish(&mut self, tunnel: &mut Tunnel) -> Result<(), String> {
        let target = self.target.take().ok_or("the file was already finished")?;
        let size = target.size();
        target.finish().map_err(|e| e.0)?;
        tunnel.send(Message::Report { json: json!({ "size": size, "received": self.received }).to_string() });
        Ok(())
    }
}
