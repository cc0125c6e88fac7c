//! The tunnels of `ls`, `get` and `put` (docs/protocol.md, "Files"): stream 0 carries the
//! listing or the file's bytes, a Report the outcome, then the device ends the tunnel. The
//! files themselves are the business of `agent::files`, which checks every path and limit.
//!
//! Bytes are read from (written to) the file on the event loop: regular files do not block
//! for long, and each turn moves at most a window's worth, paced by the rate limiters. What
//! reads or syncs a whole file (hashing the part a resumed get skips, checking and syncing a
//! finished put) is a `Job` for a worker: seconds on a device's flash, during which the loop
//! keeps the heartbeats and acknowledgements going.

use mio::{Interest, Registry, Token};
use serde_json::{json, Map, Value};
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::agent::files::{hash_prefix_until, FileAccess, PutRequest, PutTarget, RateLimiter};
use crate::protocol::Op;
use crate::stream::endpoint::{self, Endpoint, Half, OnEof};
use crate::stream::{Message, Tunnel};
use crate::text::Printable;
use crate::trust::hex;

/// A file op's tunnel: what it sends or receives.
pub enum Transfer {
    Send(Sending),
    Receive(Receiving),
}

/// Blocking work a transfer waits for, to run on a worker; its result goes to `on_done`.
pub type Job = Box<dyn FnOnce() -> Done + Send>;

pub enum Done {
    /// A resumed get's prefix, hashed: sending begins.
    Hashed(Result<ring::digest::Context, String>),
    /// A put checked, synced and renamed over its target, or why not.
    Put(Result<(), String>),
}

/// What the loop does with a transfer once its job is done.
pub enum Next {
    Go,
    /// End the tunnel with this reason (empty: all went well).
    End(String),
}

/// `ls` (the listing) or `get` (the file from `offset`) on stream 0.
pub struct Sending {
    source: Source,
    /// `get` only: the sha256 of the whole file, fed with the prefix the operator has.
    hash: Option<ring::digest::Context>,
    /// A resumed get's prefix is being hashed: nothing is sent before it is.
    hashing: bool,
    /// The hashing job stops once this is dropped (the tunnel ended): see `hash_job`.
    _wanted: Arc<()>,
    pub offset: u64,
    pub sent: u64,
}

enum Source {
    Listing(Cursor<Vec<u8>>),
    /// A get's file: polled when it can be (a FIFO or a device, with `regular_files_only`
    /// false, waits for its bytes), always ready when not (a regular file).
    File(Endpoint),
}

/// `put`: the operator's bytes into the temp file.
pub struct Receiving {
    target: Option<PutTarget>,
    /// Bytes written but not yet acknowledged to the operator: acknowledging them no faster
    /// than `max_bytes_rx_per_minute` is what paces the operator (its window stays shut).
    unacknowledged: usize,
    /// The operator's Eof came: the put is being finished on a worker.
    finishing: bool,
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

/// A transfer just started: what the signed answer adds to the key share (a get's size, mode
/// and mtime; a put's resume offset), and the job it waits for, if any.
pub struct Started {
    pub transfer: Transfer,
    pub about: Value,
    pub job: Option<Job>,
}

/// Starts `op` on `params.path`, or says why not. A get's file is polled with `token`.
pub fn start(
    files: &FileAccess,
    op: Op,
    params: &Map<String, Value>,
    token: Token,
    registry: &Registry,
) -> Result<Started, String> {
    let path = params.get("path").and_then(Value::as_str).unwrap_or_default();
    let count = |name: &str| params.get(name).and_then(Value::as_u64);
    match op {
        Op::Ls => {
            let entries = files.ls(path).map_err(|e| e.0)?;
            let listing = serde_json::to_vec(&entries).map_err(|e| e.to_string())?;
            Ok(Started { transfer: listing_of(listing), about: json!({}), job: None })
        }
        Op::Get => {
            let source = files.get(path).map_err(|e| e.0)?;
            let offset = count("offset").unwrap_or(0);
            if offset > source.size {
                return Err(format!("{path}: offset {offset} is past its end ({} bytes)", source.size));
            }
            let mut file = source.file;
            let wanted = Arc::new(());
            let mut job = None;
            if offset > 0 {
                // A FIFO or a device has no place to go on from.
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| format!("{path}: cannot go on from {offset}: {e}"))?;
                let prefix = file.try_clone().map_err(|e| format!("{path}: {e}"))?;
                job = Some(hash_job(prefix, offset, path, Arc::downgrade(&wanted)));
            }
            let reader = Half::register(file.into(), token, Interest::READABLE, registry)
                .map_err(|e| format!("{path}: cannot poll: {e}"))?;
            let sending = Sending {
                source: Source::File(Endpoint::new(Some(reader), None, OnEof::Close)),
                hash: Some(ring::digest::Context::new(&ring::digest::SHA256)),
                hashing: job.is_some(),
                _wanted: wanted,
                offset,
                sent: 0,
            };
            let about = json!({ "size": source.size, "mode": source.mode, "mtime": source.mtime });
            Ok(Started { transfer: Transfer::Send(sending), about, job })
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
            let receiving =
                Receiving { target: Some(target), unacknowledged: 0, finishing: false, received: 0, offset };
            Ok(Started {
                transfer: Transfer::Receive(receiving),
                about: json!({ "offset": offset }),
                job: None,
            })
        }
    }
}

/// Hashes the first `len` bytes of `file` (a get resumed at `len`); stops early once `wanted`
/// is gone.
fn hash_job(file: std::fs::File, len: u64, path: &str, wanted: Weak<()>) -> Job {
    let path = path.to_string();
    Box::new(move || {
        let hashed = hash_prefix_until(&file, len, || wanted.strong_count() == 0);
        Done::Hashed(hashed.map_err(|e| format!("{path}: {e}")))
    })
}

/// JSON on stream 0 (`ls`, `logs --list`), then the Report.
pub fn listing_of(json: Vec<u8>) -> Transfer {
    let source = Source::Listing(Cursor::new(json));
    Transfer::Send(Sending { source, hash: None, hashing: false, _wanted: Arc::new(()), offset: 0, sent: 0 })
}

impl Transfer {
    pub fn owns(&self, token: Token) -> bool {
        matches!(self, Transfer::Send(sending) if sending.owns(token))
    }

    /// The job it waited for is done: whether it goes on or the tunnel ends (and why), logged
    /// for the tunnel `tunnel_id`. A result nobody waits for (not this transfer's) changes
    /// nothing.
    pub fn on_done(&mut self, done: Done, tunnel: &mut Tunnel, tunnel_id: &str) -> Next {
        let who = Printable(tunnel_id);
        match (self, done) {
            (Transfer::Send(sending), Done::Hashed(hashed)) if sending.hashing => {
                sending.hashing = false;
                match hashed {
                    Ok(context) => {
                        log::info!(
                            "tunnel {who}: the {} bytes before the offset hashed; sending",
                            sending.offset
                        );
                        sending.hash = Some(context);
                        Next::Go
                    }
                    Err(why) => Next::End(why),
                }
            }
            (Transfer::Receive(receiving), Done::Put(outcome)) if receiving.finishing => {
                receiving.finishing = false;
                let (received, offset) = (receiving.received, receiving.offset);
                let failed =
                    outcome.as_ref().err().map_or(String::new(), |why| format!(" and failed: {why}"));
                log::info!("tunnel {who}: put received {received} bytes from offset {offset}{failed}");
                match outcome {
                    Ok(()) => {
                        let report = json!({ "size": offset + received, "received": received });
                        tunnel.send(Message::Report { json: report.to_string() });
                        Next::End(String::new())
                    }
                    Err(why) => Next::End(why),
                }
            }
            _ => Next::Go,
        }
    }
}

impl Sending {
    pub fn owns(&self, token: Token) -> bool {
        matches!(&self.source, Source::File(file) if file.owns(token))
    }

    pub fn on_ready(&mut self, token: Token) {
        if let Source::File(file) = &mut self.source {
            file.on_ready(token);
        }
    }

    /// Up to `buf.len()` bytes; None when there are none now (the loop says when).
    fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, String> {
        let file = match &mut self.source {
            Source::Listing(listing) => return Ok(Some(listing.read(buf).unwrap_or(0))),
            Source::File(file) if !file.readable() => return Ok(None),
            Source::File(file) => file,
        };
        match file.read(buf) {
            endpoint::Read::Bytes(n) => Ok(Some(n)),
            endpoint::Read::End => Ok(Some(0)),
            endpoint::Read::Later => Ok(None),
            endpoint::Read::Failed(why) => Err(format!("cannot read: {why}")),
        }
    }

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
        while !self.hashing && tunnel.unsent() == 0 && may_send() {
            let room = tunnel.room(0).min(scratch.len());
            let allowed = if room == 0 { 0 } else { limit.allow(room, now) };
            if allowed == 0 {
                break;
            }
            let Some(n) = self.read(&mut scratch[..allowed])? else { break };
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

    /// The operator's Eof: the job that checks the file and renames it over the target (on
    /// failure the temp file goes, the target is untouched); its Done brings the Report.
    pub fn finish(&mut self) -> Result<Job, String> {
        let target = self.target.take().ok_or("the file was already finished")?;
        self.finishing = true;
        Ok(Box::new(move || Done::Put(target.finish().map_err(|e| e.0))))
    }
}
