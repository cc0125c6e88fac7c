//! tetherctl's end of a tunnel (docs/protocol.md, "Tunnels"): opened by a signed command whose
//! answer, signed by the device's pinned key, brings the device's half of the key agreement;
//! then frames both ways through the broker while `step` moves bytes between the tunnel and
//! local descriptors.

use mio::{Interest, Token};
use serde_json::{Map, Value};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use tether::net::client::{Event, Will};
use tether::protocol::Topics;
use tether::stream::endpoint::{self, Endpoint, Endpoints, Half, OnEof, READ_CHUNK};
use tether::stream::{tunnel_context, Handshake, Message, Rejected, Role, StreamId, Tunnel, DEFAULT_WINDOW};
use tether::text::Printable;
use tether::trust::{base64, verify_answer, Addressed, Outcome};

use crate::args::CmdRequest;
use crate::cmd::{self, Answer};
use crate::session::{command_id, Input, Mode, Session, FIRST_FREE_TOKEN};
use crate::settings::Settings;
use crate::tty::{EscapeAction, EscapeFilter};
use crate::{exit, Failure};

const REQUEST_TAG: u64 = 1;
/// How long the device has to answer a tunnel request.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// After our End: how long to wait for the device to acknowledge what is still on its way.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// After this long without a frame from the device, tetherctl probes: a device that no longer
/// knows the tunnel (it ended it while tetherctl was away, or restarted) says so, and tetherctl
/// does not wait for it forever.
const PROBE_AFTER: Duration = Duration::from_secs(20);
/// The end of a tunnel the device answered with an empty payload: it does not know it.
pub const UNKNOWN_TO_DEVICE: &str =
    "the device does not know this session (it ended it while tetherctl was away, or restarted)";

pub struct Link {
    session: Session,
    pub tunnel: Tunnel,
    pub device: String,
    to_device: String,
    from_device: String,
    next_token: usize,
    scratch: Vec<u8>,
    /// The device's End came.
    pub ended_by_device: bool,
    /// A frame the connection had no room for: it goes first next time.
    held: Option<Vec<u8>>,
    /// When the last probe went (see `PROBE_AFTER`).
    probed_at: Option<Instant>,
    /// The device's signed answer: its key share, and what the op adds (a get's size).
    pub answer: Map<String, Value>,
}

/// What happened, for the command driving the tunnel: data, eof and frames are handled here.
pub enum Step {
    /// exit, end, close (the stream is closed here already), resize or open from the device.
    Message(Message),
    /// A descriptor the caller registered is ready (endpoints are told already).
    Ready(Token),
    Resized,
    Interrupted,
    TimedOut,
    /// `~.` typed.
    Disconnect,
}

/// The operator's keyboard (stdin): stream 0, through the escape filter.
pub struct Keyboard {
    pub endpoint: Endpoint,
    pub filter: EscapeFilter,
    filtered: Vec<u8>,
}

impl Keyboard {
    pub fn new(endpoint: Endpoint, filter: EscapeFilter) -> Keyboard {
        Keyboard { endpoint, filter, filtered: Vec::new() }
    }
}

/// Opens a tunnel: `op` (`shell`, `exec`, `forward`) with `params`, signed; fails with the
/// device's reason when it refuses.
pub fn open(
    settings: &Settings,
    device: &str,
    op: &str,
    mut params: Map<String, Value>,
) -> Result<Link, Failure> {
    let topics = Topics::new(&settings.topic_root, device);
    let id = command_id();
    let topic = topics.command(op, &id);
    let (to_device, from_device) = (topics.tunnel_to_device(&id), topics.tunnel_to_operator(&id));
    // Should tetherctl vanish, the device ends the tunnel (after a grace for a reconnect).
    let will = Will { topic: to_device.clone(), payload: Vec::new(), retain: false };
    let subscriptions = vec![topic.clone(), topics.status(), from_device.clone()];
    let mut session = Session::connect_with_will(settings, subscriptions, Mode::Live, Some(will))?;
    let handshake = Handshake::new().map_err(Failure::error)?;
    params.insert("eph".into(), Value::String(base64::encode(handshake.public())));
    params.insert("window".into(), Value::from(DEFAULT_WINDOW));
    let req = CmdRequest {
        device: device.to_string(),
        op: op.to_string(),
        params,
        timeout: OPEN_TIMEOUT,
        queue: false,
    };
    let (request, device_key) = cmd::prepare(settings, &req, &id, &mut session)?;
    let Some(device_key) = device_key else {
        return Err(Failure::error(format!(
            "{device} has no device key (an agent older than signed answers): a tunnel to it could not be \
             end-to-end encrypted"
        )));
    };
    session.publish(&topic, &request, true, Some(REQUEST_TAG));
    let answer = wait_answer(&mut session, &topic, &request)?;
    let asked = Addressed { device, op, id: &id };
    let fields = answer.as_object().cloned().unwrap_or_default();
    let verified = verify_answer(&fields, &device_key, asked).map_err(|why| Failure {
        code: exit::FORGED_ANSWER,
        message: format!(
            "REJECTED a forged answer to the {op} request: {why}; nothing was opened (the device's key is {})",
            device_key.fingerprint()
        ),
    })?;
    if !session.publish_confirmed(&topic, b"", true, Duration::from_secs(5))? {
        log::warn!("could not clear the retained answer on {topic}");
    }
    let result = match verified.outcome {
        Outcome::Successful(result) => result,
        Outcome::Failed(reason) => {
            session.close();
            return Err(Failure::error(format!("{device} refused the {op}: {reason}")));
        }
    };
    let device_half = result.get("eph").and_then(Value::as_str).and_then(|b| base64::decode(b.as_bytes()));
    let peer_window = result.get("window").and_then(Value::as_u64).unwrap_or(DEFAULT_WINDOW.into());
    let keys = device_half
        .ok_or_else(|| "no key in the device's answer".to_string())
        .and_then(|key| handshake.finish(Role::Operator, &key, tunnel_context(device, op, &id).as_bytes()))
        .map_err(|why| Failure::error(format!("cannot open the tunnel: {why}")))?;
    let peer_window =
        peer_window.clamp(tether::stream::MIN_WINDOW.into(), tether::stream::MAX_WINDOW.into()) as u32;
    let mut tunnel = Tunnel::new(keys, DEFAULT_WINDOW, peer_window, Instant::now());
    // The device sends as soon as it answered (a shell's prompt, a short command's output),
    // and what came while there were no keys to open it was dropped above.
    tunnel.ask_resend();
    log::debug!("tunnel {id} open to {device}");
    Ok(Link {
        session,
        tunnel,
        device: device.to_string(),
        to_device,
        from_device,
        next_token: FIRST_FREE_TOKEN,
        scratch: vec![0; READ_CHUNK],
        ended_by_device: false,
        held: None,
        probed_at: None,
        answer: result.as_object().cloned().unwrap_or_default(),
    })
}

/// The device's final answer to the request on `topic`. The tunnel's frames that come
/// meanwhile are dropped: the tunnel asks for them again once it has its keys.
fn wait_answer(session: &mut Session, topic: &str, request: &[u8]) -> Result<Value, Failure> {
    let deadline = Instant::now() + OPEN_TIMEOUT;
    let mut stored = false;
    loop {
        match session.next(Some(deadline))? {
            Input::Client(Event::Acked(REQUEST_TAG)) => stored = true,
            Input::Client(Event::Connected) if !stored => {
                session.publish(topic, request, true, Some(REQUEST_TAG));
            }
            Input::Client(Event::Message(m)) if m.topic == topic => {
                if let Answer::Final { payload, .. } = cmd::classify(&m.payload) {
                    return Ok(payload);
                }
            }
            Input::Interrupted | Input::TimedOut => {
                let _ = session.publish_confirmed(topic, b"", true, Duration::from_secs(5));
                return Err(Failure {
                    code: exit::TIMED_OUT,
                    message: "no answer to the tunnel request".into(),
                });
            }
            _ => {}
        }
    }
}

impl Link {
    /// Registers a descriptor of the caller's under a new token.
    pub fn register(&mut self, fd: OwnedFd, interest: Interest) -> Result<Half, Failure> {
        self.next_token += 1;
        Half::register(fd, Token(self.next_token), interest, self.session.registry())
            .map_err(|e| Failure::error(format!("cannot poll: {e}")))
    }

    /// An endpoint from descriptors of the caller's.
    pub fn endpoint(
        &mut self,
        reader: Option<OwnedFd>,
        writer: Option<OwnedFd>,
        on_eof: OnEof,
    ) -> Result<Endpoint, Failure> {
        let reader = reader.map(|fd| self.register(fd, Interest::READABLE)).transpose()?;
        let writer = writer.map(|fd| self.register(fd, Interest::WRITABLE)).transpose()?;
        Ok(Endpoint::new(reader, writer, on_eof))
    }

    pub fn registry(&self) -> &mio::Registry {
        self.session.registry()
    }

    pub fn watch_resize(&self) -> Result<(), Failure> {
        self.session.watch_resize()
    }

    /// Whether a read from a source of the caller's may go into the tunnel now.
    pub fn may_send(&self) -> bool {
        self.tunnel.unsent() == 0 && self.session.bulk_room() > 0 && self.held.is_none()
    }

    /// Moves bytes until something for the caller happens, or `deadline`.
    pub fn step(
        &mut self,
        endpoints: &mut Endpoints,
        mut keyboard: Option<&mut Keyboard>,
        deadline: Option<Instant>,
    ) -> Result<Step, Failure> {
        loop {
            // Until the connection or the windows are full, or the sources dry: the poll
            // may not wake again before an ack or a new byte comes.
            loop {
                let mut read = false;
                if let Some(keyboard) = keyboard.as_deref_mut() {
                    let unsent = self.tunnel.unsent();
                    if let Some(EscapeAction::Disconnect) = self.read_keyboard(keyboard) {
                        return Ok(Step::Disconnect);
                    }
                    read = self.tunnel.unsent() > unsent;
                }
                if !self.pump(endpoints) && !read {
                    break;
                }
            }
            // The tunnel's timers only matter while it can send: a reconnect or room in the
            // socket wakes the loop otherwise.
            let can_send = self.session.bulk_room() > 0;
            let tunnel_wake =
                [self.tunnel.next_deadline(), Some(self.probe_at())].into_iter().flatten().min();
            let wake = [deadline, tunnel_wake.filter(|_| can_send)].into_iter().flatten().min();
            let input = self.session.next_turn(wake)?;
            let now = Instant::now();
            match input {
                Input::Client(Event::Message(m)) if m.topic == self.from_device => {
                    if let Some(message) = self.receive(endpoints, &m.payload, now) {
                        return Ok(Step::Message(message));
                    }
                }
                Input::Client(Event::Connected) => self.tunnel.on_reconnect(),
                Input::Client(_) | Input::Turn => {}
                Input::Ready(token) => {
                    endpoints.values_mut().filter(|e| e.owns(token)).for_each(|e| e.on_ready(token));
                    match keyboard.as_deref_mut() {
                        Some(keyboard) if keyboard.endpoint.owns(token) => keyboard.endpoint.on_ready(token),
                        _ => return Ok(Step::Ready(token)),
                    }
                }
                Input::Resized => return Ok(Step::Resized),
                Input::Interrupted => return Ok(Step::Interrupted),
                Input::TimedOut => {
                    self.tunnel.on_timer(now);
                    if now >= self.probe_at() {
                        self.tunnel.probe(now);
                        self.probed_at = Some(now);
                    }
                    if deadline.is_some_and(|d| now >= d) {
                        return Ok(Step::TimedOut);
                    }
                }
            }
        }
    }

    /// Keystrokes (or piped input) into stream 0, as far as its window and the connection
    /// take them now; `~?` prints the escapes, `~.` is returned.
    fn read_keyboard(&mut self, keyboard: &mut Keyboard) -> Option<EscapeAction> {
        while keyboard.endpoint.readable() && self.may_send() {
            // An escape held back may add one byte to what was read.
            let room = self.tunnel.room(0).min(self.scratch.len()).saturating_sub(1);
            if room == 0 {
                return None;
            }
            let n = match keyboard.endpoint.read(&mut self.scratch[..room]) {
                endpoint::Read::Bytes(n) => n,
                endpoint::Read::End => {
                    keyboard.endpoint.close_reader(self.session.registry());
                    self.tunnel.send(Message::Eof { stream: 0 });
                    return None;
                }
                endpoint::Read::Later => return None,
                endpoint::Read::Failed(why) => {
                    log::warn!("stdin: {why}");
                    keyboard.endpoint.close_reader(self.session.registry());
                    self.tunnel.send(Message::Eof { stream: 0 });
                    return None;
                }
            };
            let mut input = &self.scratch[..n];
            keyboard.filtered.clear();
            while let Some((action, rest)) = keyboard.filter.feed(input, &mut keyboard.filtered) {
                if action == EscapeAction::Disconnect {
                    return Some(action);
                }
                eprint!("{}", keyboard.filter.help());
                input = rest;
            }
            self.tunnel.send_data(0, &keyboard.filtered);
        }
        None
    }

    fn probe_at(&self) -> Instant {
        self.tunnel.last_heard().max(self.probed_at.unwrap_or(self.tunnel.last_heard())) + PROBE_AFTER
    }

    fn receive(&mut self, endpoints: &mut Endpoints, frame: &[u8], now: Instant) -> Option<Message> {
        if frame.is_empty() {
            // Unauthenticated, like the operator's will: whoever can publish here can end the
            // session, as they could by dropping its frames.
            self.ended_by_device = true;
            return Some(Message::End { reason: UNKNOWN_TO_DEVICE.into() });
        }
        let registry = self.session.registry();
        match self.tunnel.receive(frame, now) {
            Ok(Some(Message::Data { stream, bytes })) => {
                if let Err(why) =
                    endpoint::deliver(endpoints, &mut self.tunnel, stream, &bytes, registry, now)
                {
                    self.close_stream(endpoints, stream, &why);
                }
                None
            }
            Ok(Some(Message::Eof { stream })) => {
                if let Some(Err(why)) = endpoints.get_mut(&stream).map(|e| e.write_eof(registry)) {
                    self.close_stream(endpoints, stream, &why);
                }
                None
            }
            Ok(Some(Message::Close { stream, reason })) => {
                if let Some(mut endpoint) = endpoints.remove(&stream) {
                    endpoint.close(registry, !reason.is_empty());
                }
                self.tunnel.forget(stream);
                Some(Message::Close { stream, reason })
            }
            Ok(Some(Message::End { reason })) => {
                self.ended_by_device = true;
                Some(Message::End { reason })
            }
            Ok(message) => message,
            Err(Rejected::BadTag) => {
                log::warn!(
                    "tunnel to {}: dropped a frame that is not from the device",
                    Printable(&self.device)
                );
                None
            }
            Err(Rejected::OverWindow(stream)) => {
                self.close_stream(endpoints, stream, "the device sent more than the window allows");
                None
            }
            Err(why) => {
                log::debug!("frame ignored: {why:?}");
                None
            }
        }
    }

    /// Closes one stream here and tells the device why.
    pub fn close_stream(&mut self, endpoints: &mut Endpoints, stream: StreamId, reason: &str) {
        if let Some(mut endpoint) = endpoints.remove(&stream) {
            endpoint.close(self.session.registry(), !reason.is_empty());
        }
        self.tunnel.send(Message::Close { stream, reason: reason.to_string() });
        self.tunnel.forget(stream);
    }

    /// One round of moving bytes; returns whether any moved (then another round may move more).
    fn pump(&mut self, endpoints: &mut Endpoints) -> bool {
        let now = Instant::now();
        let registry = self.session.registry();
        for (stream, why) in endpoint::flush_writers(endpoints, &mut self.tunnel, registry, now) {
            self.close_stream(endpoints, stream, &why);
        }
        let (session, held) = (&self.session, &self.held);
        let may_send = || session.bulk_room() > 0 && held.is_none();
        let (read, failed) = endpoint::read_sources(
            endpoints,
            &mut self.tunnel,
            may_send,
            session.registry(),
            &mut self.scratch,
        );
        for (stream, why) in failed {
            self.close_stream(endpoints, stream, &why);
        }
        let sent = self.transmit(now);
        read || sent
    }

    fn transmit(&mut self, now: Instant) -> bool {
        let mut sent = false;
        while self.session.bulk_room() > 0 {
            let Some(frame) = self.held.take().or_else(|| self.tunnel.poll_transmit(now)) else { break };
            if !self.session.publish_bulk(&self.to_device, &frame) {
                // Disconnected: dropped, the tunnel sends it again after reconnecting.
                if self.session.is_up() {
                    self.held = Some(frame);
                }
                break;
            }
            sent = true;
        }
        sent
    }

    /// Ends the tunnel: our End (unless the device ended it) answered by the device's, the
    /// device's last frames acknowledged (so it can forget the tunnel at once), local writes
    /// finished, all within `CLOSE_WAIT`; then a clean goodbye to the broker (no will).
    pub fn close(mut self, endpoints: &mut Endpoints, reason: &str) {
        if !self.ended_by_device {
            self.tunnel.send(Message::End { reason: reason.to_string() });
        }
        let deadline = Instant::now() + CLOSE_WAIT;
        let settled = |link: &Link, endpoints: &Endpoints| {
            link.ended_by_device && !link.tunnel.owes_ack() && endpoints.values().all(|e| !e.has_pending())
        };
        loop {
            while self.pump(endpoints) {}
            if settled(&self, endpoints) {
                break;
            }
            // The tunnel's timers too (while it can send, as in `step`): the ack owed for the
            // device's End is due 10 ms after it, and the device lingers until it has it.
            let tunnel_wake = self.tunnel.next_deadline().filter(|_| self.session.bulk_room() > 0);
            let wake = tunnel_wake.map_or(deadline, |at| at.min(deadline));
            match self.session.next_turn(Some(wake)) {
                Ok(Input::Client(Event::Message(m))) if m.topic == self.from_device => {
                    self.receive(endpoints, &m.payload, Instant::now());
                }
                Ok(Input::Client(Event::Connected)) => self.tunnel.on_reconnect(),
                Ok(Input::TimedOut) if Instant::now() < deadline => self.tunnel.on_timer(Instant::now()),
                Ok(Input::Interrupted | Input::TimedOut) | Err(_) => break,
                Ok(_) => {}
            }
        }
        for endpoint in endpoints.values_mut() {
            endpoint.close(self.session.registry(), false);
        }
        self.session.close();
    }
}
