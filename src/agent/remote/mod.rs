//! Remote access: terminals, commands and TCP forwarding through end-to-end encrypted tunnels
//! (docs/protocol.md, "Tunnels"; docs/remote-access.md). A tunnel opens with a signed command
//! (`shell`, `exec`, `forward`) answered with the device's half of the key agreement; its frames
//! then travel on `ROOT/DEVICE/s/ID/o` (from the operator) and `.../d` (to it).
//!
//! Each tunnel owns what it started (a process group, sockets) and takes it down when it
//! ends: either side's End, the operator gone (its will, or silent for `expire_after_idle_s`),
//! `expire_after_s`, the process's exit, the agent's stop.

mod forward;
mod logs;
pub mod process;
mod transfer;

use mio::{Interest, Registry, Token};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::files::{FileAccess, RateLimiter};
use crate::config::{Config, FileTransferConfig, LogsConfig, RemoteAccessConfig};
use crate::net::client::Client;
use crate::protocol::{Op, Topics};
use crate::stream::endpoint::{self, Endpoint, Endpoints, Half, OnEof, READ_CHUNK};
use crate::stream::{Handshake, Message, Rejected, Role, StreamId, Tunnel, MIN_WINDOW};
use crate::text::Printable;
use crate::trust::base64;
use crate::worker::Workers;
use forward::Connecting;
use logs::LogReading;
use process::{Child, PtyChild};
use transfer::{Done, Job, Next, Sent, Started, Transfer};

/// Tokens from here up belong to remote access.
const FIRST_TOKEN: usize = 1 << 20;
/// A tunnel request older than this is refused (while the clock is sane): opening a shell is
/// something someone is waiting for now, not a command queued for a device offline.
pub const MAX_OPEN_AGE_S: u64 = 120;
/// After the operator's will: the tunnel waits this long for it to come back (its broker
/// connection dropped and returned) before it ends.
const WILL_GRACE: Duration = Duration::from_secs(15);
/// After the process exited: how long output still coming (a background job holding the
/// terminal) is forwarded before the tunnel ends.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// The smallest frame: a header and a tag.
const MIN_FRAME: usize = 9 + 16;
/// Notices of unknown tunnels waiting to go out at most: frames for unknown tunnels cost a
/// sender (with broker credentials) as much as the notices cost the agent, and no more pile up.
const MAX_UNKNOWN_NOTICES: usize = 16;
/// After the tunnel's End: how long it waits for the operator to acknowledge what it sent.
const LINGER: Duration = Duration::from_secs(5);

pub struct Remote {
    topics: Topics,
    config: RemoteAccessConfig,
    tunnels: BTreeMap<String, Session>,
    next_token: usize,
    forward: forward::Resolver,
    /// Read buffer shared by every stream, kept while a tunnel is open.
    scratch: Vec<u8>,
    /// Topics of tunnels unknown here that an operator sent to: each gets an empty payload.
    unknown: Vec<String>,
    files: FileAccess,
    /// `max_bytes_tx_per_minute` and `max_bytes_rx_per_minute`, shared by all transfers.
    tx_limit: RateLimiter,
    rx_limit: RateLimiter,
    log_sources: LogsConfig,
    /// Grants of the rate limiters so far: see `Session::served`.
    grants: u64,
    /// Transfers' blocking jobs, by tunnel id.
    file_jobs: Workers<(String, Done)>,
}

/// What a tunnel request brings besides its parameters (from the trust check).
pub struct Opener<'a> {
    pub by: &'a str,
    /// When the signed request was issued; None when unsigned.
    pub issued: Option<u64>,
}

struct Session {
    op: Op,
    by: String,
    tunnel: Tunnel,
    to_operator: String,
    opened: Instant,
    process: Option<Process>,
    exit: Option<(i32, Instant)>,
    endpoints: Endpoints,
    connecting: BTreeMap<StreamId, Connecting>,
    /// The forward's targets, as named in the signed request.
    targets: Vec<String>,
    /// The operator's will arrived: the tunnel ends at this time unless it speaks again.
    will_deadline: Option<Instant>,
    /// The End went out: dropped once acknowledged, or at this time.
    ending: Option<Instant>,
    /// A frame the connection had no room for: it goes first next time.
    held: Option<Vec<u8>>,
    /// When bytes were last read from the session's processes or sockets: output is activity.
    output_at: Instant,
    /// ls, get, put, logs --list: the file's side.
    transfer: Option<Transfer>,
    /// logs: the sources being read.
    logs: Option<LogReading>,
    /// When a rate limiter last gave its transfer bytes (`Remote::grants` then). `pump` serves
    /// the least recently served first: transfers sharing a limiter take turns, where the first
    /// in line would take all the limiter frees and the others wait until it is over.
    served: u64,
}

impl Remote {
    pub fn new(topics: Topics, config: &Config, waker: Arc<mio::Waker>) -> Remote {
        let files = FileAccess::new(&config.file_transfer, &config.state_dir);
        let (tx_limit, rx_limit) = rate_limits(&config.file_transfer, Instant::now());
        Remote {
            files,
            tx_limit,
            rx_limit,
            grants: 0,
            topics,
            config: config.remote_access.clone(),
            log_sources: config.logs.clone(),
            tunnels: BTreeMap::new(),
            next_token: FIRST_TOKEN,
            forward: forward::Resolver::new(Arc::clone(&waker)),
            file_jobs: Workers::new(waker),
            scratch: Vec::new(),
            unknown: Vec::new(),
        }
    }

    pub fn reconfigure(&mut self, config: &Config) {
        self.config = config.remote_access.clone();
        self.log_sources = config.logs.clone();
        self.files.reconfigure(&config.file_transfer);
        (self.tx_limit, self.rx_limit) = rate_limits(&config.file_transfer, Instant::now());
    }

    /// The subscription that brings the operators' frames.
    pub fn filter(&self) -> String {
        self.topics.tunnel_filter()
    }

    pub fn owns(token: Token) -> bool {
        token.0 >= FIRST_TOKEN
    }

    /// A signed `shell`, `exec` or `forward` request that may run: opens its tunnel and returns
    /// the answer's result (the device's key share), or why not.
    pub fn open(
        &mut self,
        op: Op,
        id: &str,
        params: &Map<String, Value>,
        opener: Opener,
        registry: &Registry,
    ) -> Result<Value, String> {
        self.check_allowed(op, opener.by)?;
        check_fresh(opener.issued)?;
        if self.tunnels.contains_key(id) {
            return Err("a tunnel with this id is open".into());
        }
        let operator_key =
            params.get("eph").and_then(Value::as_str).and_then(|b| base64::decode(b.as_bytes()));
        let operator_key = operator_key.ok_or("parameter \"eph\" must be a base64 X25519 key")?;
        let peer_window =
            params.get("window").and_then(Value::as_u64).unwrap_or(crate::stream::DEFAULT_WINDOW.into());
        // What the agent holds for resending is bounded by its own setting, whatever the
        // operator asks.
        let peer_window = peer_window.clamp(MIN_WINDOW.into(), self.config.window.into()) as u32;
        let handshake = Handshake::new()?;
        let device_key = base64::encode(handshake.public());
        let context = crate::stream::tunnel_context(self.topics.device(), op.name(), id);
        let keys = handshake.finish(Role::Device, &operator_key, context.as_bytes())?;
        let now = Instant::now();
        let mut session = Session {
            op,
            by: opener.by.to_string(),
            tunnel: Tunnel::new(keys, self.config.window, peer_window, now),
            to_operator: self.topics.tunnel_to_operator(id),
            opened: now,
            process: None,
            exit: None,
            endpoints: BTreeMap::new(),
            connecting: BTreeMap::new(),
            targets: Vec::new(),
            will_deadline: None,
            ending: None,
            held: None,
            output_at: now,
            transfer: None,
            logs: None,
            served: 0,
        };
        let mut result = json!({ "eph": device_key, "window": self.config.window });
        match op {
            Op::Forward => session.targets = self.forward_targets(params)?,
            Op::Ls | Op::Get | Op::Put => {
                let token = self.take_token();
                let Started { transfer, about, job } =
                    transfer::start(&self.files, op, params, token, registry)?;
                if let Some(job) = job {
                    self.run_file_job(id, job)?;
                }
                session.transfer = Some(transfer);
                if let (Some(result), Value::Object(about)) = (result.as_object_mut(), about) {
                    result.extend(about);
                }
            }
            Op::Logs if params.get("list").and_then(Value::as_bool) == Some(true) => {
                session.transfer = Some(transfer::listing_of(logs::listing(&self.log_sources)));
            }
            Op::Logs => {
                let next_token = &mut self.next_token;
                let take_token = || {
                    *next_token += 1;
                    Token(*next_token)
                };
                session.logs = Some(LogReading::start(&self.log_sources, params, registry, take_token)?);
            }
            _ => self.start_process(&mut session, params, registry)?,
        }
        log::info!("tunnel {}: {} opened (by {})", Printable(id), describe(op, params), Printable(opener.by));
        self.tunnels.insert(id.to_string(), session);
        Ok(result)
    }

    fn run_file_job(&mut self, id: &str, job: Job) -> Result<(), String> {
        let id = id.to_string();
        self.file_jobs.spawn("file", move || (id, job()))
    }

    /// Transfers whose job is done go on, or end.
    fn take_file_jobs(&mut self, registry: &Registry) {
        while let Some((id, done)) = self.file_jobs.try_recv() {
            let Some(session) = self.tunnels.get_mut(&id) else {
                if let Done::Put(outcome) = done {
                    log::info!("tunnel {}: put finished after its tunnel ended: {outcome:?}", Printable(&id));
                }
                continue;
            };
            let Some(transfer) = &mut session.transfer else { continue };
            let Next::End(reason) = transfer.on_done(done, &mut session.tunnel, &id) else { continue };
            end(&id, session, &reason, registry);
        }
    }

    fn check_allowed(&self, op: Op, by: &str) -> Result<(), String> {
        let c = &self.config;
        let disabled = c.disable
            || (op == Op::Shell && c.terminal.disable)
            || (op == Op::Exec && c.exec.disable)
            || (op == Op::Forward && c.forward.disable);
        if disabled {
            return Err(format!("{} is disabled on this device (remote_access)", op.name()));
        }
        let open: Vec<&Session> = self.tunnels.values().filter(|s| s.ending.is_none()).collect();
        if open.len() >= c.max_sessions {
            return Err(format!("too many tunnels open ({}, remote_access.max_sessions)", open.len()));
        }
        let mine = open.iter().filter(|s| s.by == by).count();
        if mine >= c.max_sessions_per_key {
            return Err(format!(
                "too many tunnels open by this key ({mine}, remote_access.max_sessions_per_key)"
            ));
        }
        Ok(())
    }

    fn forward_targets(&self, params: &Map<String, Value>) -> Result<Vec<String>, String> {
        let targets: Vec<String> = params
            .get("targets")
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        if targets.is_empty() {
            return Err("no target to forward to".into());
        }
        match targets.iter().find(|t| !self.config.forward.allows(t)) {
            Some(refused) => Err(format!(
                "forwarding to {} is not allowed here (remote_access.forward.allow: {})",
                Printable(refused),
                self.config.forward.allow.join(", ")
            )),
            None => Ok(targets),
        }
    }

    fn start_process(
        &mut self,
        session: &mut Session,
        params: &Map<String, Value>,
        registry: &Registry,
    ) -> Result<(), String> {
        let text = |name: &str| params.get(name).and_then(Value::as_str);
        let number = |name: &str, default: u16| {
            params.get(name).and_then(Value::as_u64).map_or(default, |n| n.clamp(1, 1000) as u16)
        };
        let (rows, cols) = (number("rows", 24), number("cols", 80));
        let term = text("term").unwrap_or("xterm");
        let user = self.config.terminal.user.as_deref();
        let pty = session.op == Op::Shell || params.get("pty").and_then(Value::as_bool) == Some(true);
        let argv: Vec<String> = match session.op {
            Op::Shell => self.config.terminal.shell.clone(),
            _ => params
                .get("argv")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default(),
        };
        if argv.first().is_none_or(|program| program.is_empty()) {
            return Err("no command to run: argv is empty".into());
        }
        if pty {
            let terminal = process::spawn_pty(&argv, &[], user, term, rows, cols)?;
            let dup =
                || terminal.master.try_clone().map_err(|e| format!("cannot duplicate the terminal: {e}"));
            let endpoint = self.endpoint(Some(dup()?), Some(dup()?), OnEof::Ignore, registry)?;
            session.endpoints.insert(0, endpoint);
            session.process = Some(Process::Terminal(terminal));
        } else {
            let mut pipes = process::spawn_pipes(&argv, &[], user)?;
            let stdin = pipes.stdin.take();
            let stdio = self.endpoint(Some(pipes.stdout), stdin, OnEof::Close, registry)?;
            session.endpoints.insert(0, stdio);
            let stderr = self.endpoint(Some(pipes.stderr), None, OnEof::Close, registry)?;
            session.endpoints.insert(1, stderr);
            session.process = Some(Process::Pipes(pipes.child));
        }
        Ok(())
    }

    fn endpoint(
        &mut self,
        reader: Option<OwnedFd>,
        writer: Option<OwnedFd>,
        on_eof: OnEof,
        registry: &Registry,
    ) -> Result<Endpoint, String> {
        let mut half = |fd: Option<OwnedFd>, interest| {
            fd.map(|fd| Half::register(fd, self.take_token(), interest, registry)).transpose()
        };
        let reader = half(reader, Interest::READABLE).map_err(|e| format!("cannot poll: {e}"))?;
        let writer = half(writer, Interest::WRITABLE).map_err(|e| format!("cannot poll: {e}"))?;
        Ok(Endpoint::new(reader, writer, on_eof))
    }

    fn take_token(&mut self) -> Token {
        self.next_token += 1;
        Token(self.next_token)
    }

    /// A frame, or the operator's will (an empty payload), on a tunnel's topic.
    pub fn on_frame(&mut self, topic: &str, payload: &[u8], registry: &Registry) {
        let Some(id) = self.topics.parse_tunnel(topic) else { return };
        let Some(session) = self.tunnels.get_mut(id) else {
            // Tell the operator (a tunnel this agent ended while it was away, or never had):
            // it would wait for it forever. Unauthenticated, as the operator's will.
            if payload.len() >= MIN_FRAME && self.unknown.len() < MAX_UNKNOWN_NOTICES {
                log::debug!("tunnel {}: a frame for no open tunnel", Printable(id));
                self.unknown.push(self.topics.tunnel_to_operator(id));
            }
            return;
        };
        let now = Instant::now();
        if payload.is_empty() {
            log::info!("tunnel {}: the operator's connection dropped; waiting for it", Printable(id));
            session.will_deadline = Some(now + WILL_GRACE);
            return;
        }
        match session.tunnel.receive(payload, now) {
            Ok(message) => {
                session.will_deadline = None;
                if let Some(message) = message {
                    self.on_message(id.to_string(), message, registry, now);
                }
            }
            Err(Rejected::BadTag) => {
                log::warn!("tunnel {}: dropped a frame that is not from its operator", Printable(id))
            }
            Err(Rejected::OverWindow(stream)) => {
                let reason = "the operator sent more than the window allows";
                log::warn!("tunnel {} stream {stream}: {reason}", Printable(id));
                close_stream(session, stream, reason, registry);
            }
            Err(why) => log::debug!("tunnel {}: frame ignored: {why:?}", Printable(id)),
        }
    }

    fn on_message(&mut self, id: String, message: Message, registry: &Registry, now: Instant) {
        let max_connections = self.config.forward.max_connections;
        let allow = &self.config.forward;
        let Some(session) = self.tunnels.get_mut(&id) else { return };
        match message {
            Message::Data { stream, bytes } => {
                if let Some(Transfer::Receive(receiving)) = &mut session.transfer {
                    // A put's file comes on stream 0 only.
                    let written = match stream {
                        0 => receiving.write(&bytes),
                        _ => Err(format!("a put takes its file on stream 0, not {stream}")),
                    };
                    if let Err(why) = written {
                        end(&id, session, &why, registry);
                    }
                    return;
                }
                if let Some(connecting) = session.connecting.get_mut(&stream) {
                    return connecting.hold(&bytes);
                }
                let delivered = endpoint::deliver(
                    &mut session.endpoints,
                    &mut session.tunnel,
                    stream,
                    &bytes,
                    registry,
                    now,
                );
                if let Err(why) = delivered {
                    close_stream(session, stream, &format!("cannot write: {why}"), registry);
                }
            }
            Message::Eof { stream } => {
                if let Some(Transfer::Receive(receiving)) = &mut session.transfer {
                    let started = receiving.finish().and_then(|job| self.run_file_job(&id, job));
                    if let (Err(why), Some(session)) = (started, self.tunnels.get_mut(&id)) {
                        end(&id, session, &why, registry);
                    }
                    return;
                }
                if let Some(connecting) = session.connecting.get_mut(&stream) {
                    return connecting.hold_eof();
                }
                if let Some(Err(why)) = session.endpoints.get_mut(&stream).map(|e| e.write_eof(registry)) {
                    close_stream(session, stream, &format!("cannot write: {why}"), registry);
                }
            }
            Message::Close { stream, reason } => {
                if let Some(mut endpoint) = session.endpoints.remove(&stream) {
                    endpoint.close(registry, !reason.is_empty());
                }
                session.connecting.remove(&stream);
                session.tunnel.forget(stream);
            }
            Message::Open { stream, target } => {
                let open = session.endpoints.len() + session.connecting.len();
                let refusal = if session.op != Op::Forward {
                    Some("this tunnel forwards nothing".to_string())
                } else if !session.targets.contains(&target) || !allow.allows(&target) {
                    Some(format!("{} is not a target of this forward", Printable(&target)))
                } else if session.endpoints.contains_key(&stream) || session.connecting.contains_key(&stream)
                {
                    Some(format!("stream {stream} is in use"))
                } else if open >= max_connections {
                    Some(format!("too many connections ({open}, remote_access.forward.max_connections)"))
                } else {
                    None
                };
                match refusal {
                    Some(reason) => close_stream(session, stream, &reason, registry),
                    None => {
                        let connecting = self.forward.start(&id, stream, &target);
                        if let Some(session) = self.tunnels.get_mut(&id) {
                            session.connecting.insert(stream, connecting);
                        }
                    }
                }
            }
            Message::Resize { rows, cols } => {
                if let Some(process) = &session.process {
                    process.resize(rows, cols);
                }
            }
            Message::End { reason } => {
                let why = if reason.is_empty() { "closed by the operator".to_string() } else { reason };
                end(&id, session, &why, registry);
            }
            Message::Exit { .. } | Message::Report { .. } => {}
        }
    }

    /// A descriptor of some tunnel is ready.
    pub fn on_event(&mut self, token: Token, registry: &Registry) {
        let mut connected = None;
        for (id, session) in &mut self.tunnels {
            if let Some(endpoint) = session.endpoints.values_mut().find(|e| e.owns(token)) {
                return endpoint.on_ready(token);
            }
            if let Some(reading) = session.logs.as_mut().filter(|l| l.owns(token)) {
                return reading.on_ready(token);
            }
            if let Some(Transfer::Send(sending)) = session.transfer.as_mut().filter(|t| t.owns(token)) {
                return sending.on_ready(token);
            }
            let stream = session.connecting.iter().find(|(_, c)| c.token() == Some(token)).map(|(s, _)| *s);
            if let Some(stream) = stream {
                let connecting = session.connecting.remove(&stream).expect("found above");
                connected = Some((id.clone(), stream, connecting));
                break;
            }
        }
        if let Some((id, stream, connecting)) = connected {
            self.on_connect_event(id, stream, connecting, registry);
        }
    }

    fn on_connect_event(
        &mut self,
        id: String,
        stream: StreamId,
        mut connecting: Connecting,
        registry: &Registry,
    ) {
        let Some(session) = self.tunnels.get_mut(&id) else { return };
        match connecting.finish(registry) {
            Ok(None) => {
                session.connecting.insert(stream, connecting);
            }
            Ok(Some(fd)) => {
                let target = connecting.target().to_string();
                let endpoint = fd
                    .try_clone()
                    .map_err(|e| e.to_string())
                    .and_then(|writer| self.endpoint(Some(fd), Some(writer), OnEof::Shutdown, registry));
                let Some(session) = self.tunnels.get_mut(&id) else { return };
                match endpoint {
                    Ok(endpoint) => {
                        log::info!(
                            "tunnel {} stream {stream}: connected to {}",
                            Printable(&id),
                            Printable(&target)
                        );
                        session.endpoints.insert(stream, endpoint);
                        let (early, eof) = connecting.take_early();
                        deliver_early(session, stream, &early, eof, registry);
                    }
                    Err(why) => close_stream(session, stream, &why, registry),
                }
            }
            Err(why) => {
                log::info!("tunnel {} stream {stream}: {why}", Printable(&id));
                close_stream(session, stream, &why, registry);
            }
        }
    }

    /// Forwarded connections whose target's addresses are known: they connect.
    pub fn connect_resolved(&mut self, registry: &Registry) {
        while let Some((id, stream, result)) = self.forward.try_recv() {
            let Some(session) = self.tunnels.get_mut(&id) else { continue };
            let Some(connecting) = session.connecting.remove(&stream) else { continue };
            let token = Token(self.next_token + 1);
            match connecting.connect(result, token, registry) {
                Ok(connecting) => {
                    self.next_token += 1;
                    session.connecting.insert(stream, connecting);
                }
                Err(why) => {
                    log::info!("tunnel {} stream {stream}: {why}", Printable(&id));
                    close_stream(session, stream, &why, registry);
                }
            }
        }
    }

    /// SIGCHLD: some child exited; each tunnel checks its own (never another's).
    pub fn on_child_exit(&mut self) {
        let now = Instant::now();
        for session in self.tunnels.values_mut() {
            if session.exit.is_none() {
                if let Some(code) = session.process.as_mut().and_then(Process::try_wait) {
                    session.exit = Some((code, now));
                }
            }
        }
    }

    /// The broker connection came back: frames may have been lost both ways.
    pub fn on_reconnect(&mut self) {
        for session in self.tunnels.values_mut() {
            session.tunnel.on_reconnect();
        }
    }

    /// Moves bytes: descriptors to tunnels as far as windows and the connection's bulk room
    /// allow, tunnels to the broker, operators' bytes to descriptors that became writable.
    pub fn pump(&mut self, client: &mut Client, registry: &Registry) {
        while let Some(topic) = self.unknown.last() {
            if !client.publish_bulk(topic, b"") {
                break;
            }
            self.unknown.pop();
        }
        self.take_file_jobs(registry);
        if self.tunnels.is_empty() {
            self.scratch = Vec::new();
            return;
        }
        if self.scratch.is_empty() {
            self.scratch = vec![0; READ_CHUNK];
        }
        self.connect_resolved(registry);
        let now = Instant::now();
        let mut turns: Vec<(u64, String)> =
            self.tunnels.iter().map(|(id, s)| (s.served, id.clone())).collect();
        turns.sort_unstable();
        for (_, id) in turns {
            let Some(session) = self.tunnels.get_mut(&id) else { continue };
            for (stream, why) in
                endpoint::flush_writers(&mut session.endpoints, &mut session.tunnel, registry, now)
            {
                close_stream(session, stream, &why, registry);
            }
            // Until the connection or the windows are full, or the sources dry: the loop may
            // not wake again before an ack or a new byte comes.
            loop {
                let (read, failed) = match session.ending {
                    Some(_) => (false, Vec::new()),
                    None => {
                        let held = &session.held;
                        let may_send = || client.bulk_room() > 0 && held.is_none();
                        let (endpoints, tunnel) = (&mut session.endpoints, &mut session.tunnel);
                        endpoint::read_sources(endpoints, tunnel, may_send, registry, &mut self.scratch)
                    }
                };
                for (stream, why) in failed {
                    close_stream(session, stream, &why, registry);
                }
                let pumped =
                    pump_transfer(&id, session, client, &mut self.tx_limit, &mut self.scratch, registry);
                let read = read || pumped || pump_logs(&id, session, client, registry);
                let acknowledged = match &mut session.transfer {
                    Some(Transfer::Receive(receiving)) => {
                        receiving.acknowledge(&mut session.tunnel, &mut self.rx_limit, now)
                    }
                    _ => false,
                };
                if pumped || acknowledged {
                    self.grants += 1;
                    session.served = self.grants;
                }
                if read {
                    session.output_at = now;
                }
                let sent = transmit(session, client, now);
                if !read && !sent {
                    break;
                }
            }
            finish_if_done(&id, session, registry, now);
            transmit(session, client, now);
            if session.is_over(now) {
                self.tunnels.remove(&id);
            }
        }
    }

    /// `can_send`: whether the connection has room; the tunnels' own timers wait till it has
    /// (a reconnect, or room in the socket, wakes the loop).
    pub fn next_deadline(&self, can_send: bool) -> Option<Instant> {
        let sessions = self.tunnels.values().filter_map(|s| s.next_deadline(&self.config, can_send)).min();
        let now = Instant::now();
        let transfers = self.tunnels.values().filter_map(|s| match &s.transfer {
            Some(Transfer::Send(_)) if s.ending.is_none() && can_send => self.tx_limit.next_allowed(now),
            Some(Transfer::Receive(r)) if r.waits_for_rate() => self.rx_limit.next_allowed(now),
            _ => None,
        });
        sessions.into_iter().chain(transfers).min()
    }

    pub fn on_timer(&mut self, registry: &Registry, now: Instant) {
        for (id, session) in &mut self.tunnels {
            session.tunnel.on_timer(now);
            if session.ending.is_some() {
                continue;
            }
            if let Some(why) = session.expired(&self.config, now) {
                end(id, session, &why, registry);
            }
        }
    }

    /// The agent is stopping: every tunnel ends, its processes are signalled.
    pub fn stop(&mut self, registry: &Registry) {
        for (id, session) in &mut self.tunnels {
            if session.ending.is_none() {
                end(id, session, "the agent is stopping", registry);
            }
        }
    }

    pub fn open_tunnels(&self) -> usize {
        self.tunnels.len()
    }
}

/// What a tunnel started: a shell or command on a terminal (kept for resizing), or a command
/// on pipes (whose descriptors went to the endpoints).
enum Process {
    Terminal(PtyChild),
    Pipes(Child),
}

impl Process {
    fn child(&mut self) -> &mut Child {
        match self {
            Process::Terminal(terminal) => &mut terminal.child,
            Process::Pipes(child) => child,
        }
    }

    /// The exit code once it exited (128+n for signal n).
    fn try_wait(&mut self) -> Option<i32> {
        self.child().try_wait().map(|exit| exit.shell_code())
    }

    fn terminate(&mut self) {
        self.child().terminate();
    }

    fn resize(&self, rows: u16, cols: u16) {
        if let Process::Terminal(terminal) = self {
            if let Err(e) = terminal.resize(rows, cols) {
                log::debug!("cannot resize a terminal: {e}");
            }
        }
    }
}

impl Session {
    /// Ended, and the operator has everything: what we sent, and our acknowledgement of what
    /// it sent (without it, the operator waits for it before it exits). Or the wait is over.
    fn is_over(&self, now: Instant) -> bool {
        let settled = self.tunnel.all_acked() && !self.tunnel.owes_ack();
        self.ending.is_some_and(|at| settled || now >= at)
    }

    /// The last sign of use: input from the operator, or output to it.
    fn active_at(&self) -> Instant {
        self.tunnel.last_message().max(self.output_at)
    }

    fn next_deadline(&self, config: &RemoteAccessConfig, can_send: bool) -> Option<Instant> {
        let after = |secs: u64, from: Instant| (secs > 0).then(|| from + Duration::from_secs(secs));
        let candidates = [
            self.tunnel.next_deadline().filter(|_| can_send),
            self.ending,
            self.will_deadline,
            self.exit.map(|(_, at)| at + DRAIN_GRACE),
            self.logs.as_ref().and_then(LogReading::next_deadline),
            after(config.expire_after_s, self.opened).filter(|_| self.ending.is_none()),
            after(config.expire_after_idle_s, self.active_at()).filter(|_| self.ending.is_none()),
        ];
        candidates.into_iter().flatten().min()
    }

    fn expired(&self, config: &RemoteAccessConfig, now: Instant) -> Option<String> {
        let passed = |secs: u64, from: Instant| secs > 0 && now >= from + Duration::from_secs(secs);
        if self.will_deadline.is_some_and(|at| now >= at) {
            Some(crate::stream::END_OPERATOR_GONE.into())
        } else if passed(config.expire_after_s, self.opened) {
            Some(format!("expired: open for {} s (remote_access.expire_after_s)", config.expire_after_s))
        } else if passed(config.expire_after_idle_s, self.active_at()) {
            Some(format!(
                "{} for {} s (remote_access.expire_after_idle_s)",
                crate::stream::END_IDLE,
                config.expire_after_idle_s
            ))
        } else {
            None
        }
    }
}

/// Publishes what the tunnel has to send while the connection takes it; returns whether
/// anything went.
fn transmit(session: &mut Session, client: &mut Client, now: Instant) -> bool {
    let mut sent = false;
    while client.bulk_room() > 0 {
        let Some(frame) = session.held.take().or_else(|| session.tunnel.poll_transmit(now)) else { break };
        if !client.publish_bulk(&session.to_operator, &frame) {
            // Disconnected: dropped, the tunnel sends it again after reconnecting.
            if client.is_up() {
                session.held = Some(frame);
            }
            break;
        }
        sent = true;
    }
    sent
}

/// An `ls` or `get` sends what the window, the connection and the rate limit allow; it ends
/// the tunnel once all went. Returns whether anything was read.
fn pump_transfer(
    id: &str,
    session: &mut Session,
    client: &Client,
    limit: &mut RateLimiter,
    scratch: &mut [u8],
    registry: &Registry,
) -> bool {
    let Some(Transfer::Send(sending)) = &mut session.transfer else { return false };
    let held = &session.held;
    let may_send = || client.bulk_room() > 0 && held.is_none();
    match sending.pump(&mut session.tunnel, may_send, limit, scratch, Instant::now()) {
        Ok(Sent::Nothing) => false,
        Ok(Sent::Some) => true,
        Ok(Sent::All) => {
            let (sent, offset) = (sending.sent, sending.offset);
            log::info!(
                "tunnel {}: {} sent {sent} bytes from offset {offset}",
                Printable(id),
                session.op.name()
            );
            end(id, session, "", registry);
            true
        }
        Err(why) => {
            end(id, session, &why, registry);
            true
        }
    }
}

/// A `logs` tunnel sends what its sources give while the window and the connection allow; it
/// ends once every source ended and all went (never while following a file). Returns whether
/// anything was read.
fn pump_logs(id: &str, session: &mut Session, client: &Client, registry: &Registry) -> bool {
    let Some(reading) = &mut session.logs else { return false };
    let held = &session.held;
    let may_send = || client.bulk_room() > 0 && held.is_none();
    let pumped = reading.pump(&mut session.tunnel, may_send, registry);
    if let Some(code) = pumped.done {
        logs::finish(&mut session.tunnel, code);
        log::info!("tunnel {}: logs sent", Printable(id));
        end(id, session, "", registry);
        return true;
    }
    pumped.read
}

/// The limiters of `max_bytes_tx_per_minute` and `max_bytes_rx_per_minute`.
fn rate_limits(files: &FileTransferConfig, now: Instant) -> (RateLimiter, RateLimiter) {
    (
        RateLimiter::new(files.max_bytes_tx_per_minute, now),
        RateLimiter::new(files.max_bytes_rx_per_minute, now),
    )
}

/// A process tunnel ends once the process exited and its output is read (or the drain grace
/// is over): the exit code, then End.
fn finish_if_done(id: &str, session: &mut Session, registry: &Registry, now: Instant) {
    let Some((code, exited_at)) = session.exit else { return };
    if session.ending.is_some() {
        return;
    }
    let drained = session.endpoints.values().all(|e| !e.reader_open());
    if !drained && now < exited_at + DRAIN_GRACE {
        return;
    }
    if session.tunnel.unsent() > 0 && now < exited_at + DRAIN_GRACE {
        return;
    }
    session.tunnel.send(Message::Exit { code });
    log::info!("tunnel {}: the process exited ({code})", Printable(id));
    end(id, session, "", registry);
}

/// Ends a tunnel from this side: its End goes out, its process is signalled and its
/// descriptors closed; it is dropped once the operator acknowledged or after `LINGER`.
fn end(id: &str, session: &mut Session, reason: &str, registry: &Registry) {
    if session.ending.is_some() {
        return;
    }
    if !reason.is_empty() {
        log::info!("tunnel {}: ending: {}", Printable(id), Printable(reason));
    } else {
        log::info!("tunnel {}: ending", Printable(id));
    }
    session.tunnel.send(Message::End { reason: reason.to_string() });
    session.ending = Some(Instant::now() + LINGER);
    // An unfinished put's temp file stays for a retry to resume.
    session.transfer = None;
    if let Some(mut reading) = session.logs.take() {
        reading.close(registry);
    }
    if let Some(process) = &mut session.process {
        process.terminate();
    }
    for endpoint in session.endpoints.values_mut() {
        endpoint.close(registry, !reason.is_empty());
    }
    session.endpoints.clear();
    for connecting in session.connecting.values_mut() {
        connecting.cancel(registry);
    }
    session.connecting.clear();
}

/// What the operator sent while the connection was being made goes to it now.
fn deliver_early(session: &mut Session, stream: StreamId, bytes: &[u8], eof: bool, registry: &Registry) {
    let now = Instant::now();
    let mut delivered =
        endpoint::deliver(&mut session.endpoints, &mut session.tunnel, stream, bytes, registry, now);
    if eof && delivered.is_ok() {
        delivered = session.endpoints.get_mut(&stream).map_or(Ok(()), |e| e.write_eof(registry).map(drop));
    }
    if let Err(why) = delivered {
        close_stream(session, stream, &format!("cannot write: {why}"), registry);
    }
}

fn close_stream(session: &mut Session, stream: StreamId, reason: &str, registry: &Registry) {
    if let Some(mut endpoint) = session.endpoints.remove(&stream) {
        endpoint.close(registry, true);
    }
    if let Some(mut connecting) = session.connecting.remove(&stream) {
        connecting.cancel(registry);
    }
    session.tunnel.send(Message::Close { stream, reason: reason.to_string() });
    session.tunnel.forget(stream);
}

fn check_fresh(issued: Option<u64>) -> Result<(), String> {
    let Some(issued) = issued else { return Ok(()) };
    let now = super::unix_seconds();
    if now < crate::trust::CLOCK_SANE_AFTER {
        return Ok(());
    }
    let age = now.saturating_sub(issued);
    if age > MAX_OPEN_AGE_S {
        return Err(format!("tunnel request too old ({age} s, at most {MAX_OPEN_AGE_S} s): open it again"));
    }
    Ok(())
}

fn describe(op: Op, params: &Map<String, Value>) -> String {
    match op {
        Op::Exec => {
            let program = params.get("argv").and_then(|a| a.get(0)).and_then(Value::as_str).unwrap_or("");
            format!("exec {}", Printable(program))
        }
        Op::Forward => {
            let targets = params.get("targets").and_then(Value::as_array).map_or(0, Vec::len);
            format!("forward to {targets} target(s)")
        }
        Op::Ls | Op::Get | Op::Put => {
            let path = params.get("path").and_then(Value::as_str).unwrap_or("");
            let offset = params.get("offset").and_then(Value::as_u64).filter(|o| op == Op::Get && *o > 0);
            let from = offset.map_or(String::new(), |o| format!(" from offset {o}"));
            format!("{} {}{from}", op.name(), Printable(path))
        }
        Op::Logs => {
            let names = params.get("sources").and_then(Value::as_array).map_or(Vec::new(), |names| {
                names.iter().filter_map(Value::as_str).map(|n| Printable(n).to_string()).collect()
            });
            let follow = params.get("follow").and_then(Value::as_bool) == Some(true);
            format!("logs {}{}", names.join(" "), if follow { " -f" } else { "" })
        }
        _ => op.name().to_string(),
    }
}
