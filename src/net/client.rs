//! The MQTT 3.1.1 client both binaries use: one connection to the broker, driven by the owner's
//! mio loop. It connects, keeps the connection alive, reconnects with backoff, and turns what
//! the broker sends into `Event`s. Packets are encoded and decoded by `mqttbytes`.

use bytes::{Bytes, BytesMut};
use mio::event::Event as MioEvent;
use mio::{Registry, Token};
use mqttbytes::v4::{self, ConnectReturnCode, Packet, SubscribeReasonCode};
use mqttbytes::QoS;
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::dial::{describe_io, Dialer, Route};
use super::link::{Link, ReadEnd};
use crate::memory::Drained;
use crate::worker::Workers;

/// A connection that stayed up this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(30);
/// QoS 1 publishes awaiting their PUBACK at most: room for the outbox's window and the
/// status messages, and so far below the 65,535 packet ids that a free one is always near.
pub const MAX_INFLIGHT: usize = 64;
/// Bytes waiting for the socket past which `publish` refuses. PINGREQ, PUBACK and DISCONNECT
/// always go in, so this, with the little rustls and the kernel hold (see `Link::queued`), is
/// all that can hold them back (4 s on a 4 KiB/s link, plus 5 s for rustls and the kernel).
pub const SEND_QUEUE_LIMIT: usize = 16 * 1024;
/// Bytes waiting for the socket past which `publish_bulk` refuses: half of `SEND_QUEUE_LIMIT`,
/// so bulk data leaves at least 8 KiB of it to `publish` (a heartbeat, a command's state).
/// Ahead of a PINGREQ then: 8 KiB here, 4 KiB in rustls, 16 KiB in the kernel (see
/// `Link::queued`), 3 s on a 10 KB/s link; 5 s behind a single 33 KiB chunk.
pub const BULK_QUEUE_LIMIT: usize = 8 * 1024;
/// Events the owner has not taken yet past which the client stops decoding and reading: the
/// broker cannot make it hold more, and the owner's loop gets its turn between batches.
pub const MAX_EVENTS: usize = 64;
/// Bytes waiting for the socket past which the client stops reading: what the broker makes it
/// answer (PUBACKs, WebSocket pongs) cannot pile up while the broker takes nothing. Far above
/// `SEND_QUEUE_LIMIT`, so the owner's own publishes do not pause reading.
const READ_PAUSE_QUEUED: usize = 256 * 1024;

pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

pub struct ClientOptions {
    /// Where to connect: the broker, or the nodes of a cluster tried in turn (never empty).
    pub routes: Vec<Arc<Route>>,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    pub will: Option<Will>,
    /// Subscribed on every connect.
    pub subscriptions: Vec<String>,
    /// A retained message (topic, payload) published on every connect just before the
    /// subscriptions, its topic subscribed after them: the broker sends it after the retained
    /// messages of the others, so it marks the end of that burst, and, when missing, a burst
    /// cut short (see tetherctl's `Session::retained`).
    pub end_marker: Option<(String, Vec<u8>)>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Bigger incoming packets are skipped and reported as `Event::Oversized`.
    pub max_packet: usize,
    /// QoS of the subscriptions. QoS 0 suits a burst of retained messages: Mosquitto caps what
    /// it queues for a client at QoS 1 (`max_queued_messages`), not at QoS 0.
    pub subscription_qos: QoS,
    /// Stop for good, instead of retrying, when the broker's certificate fails verification:
    /// for a person at a terminal, who must fix the settings. See `Client::gave_up`.
    pub give_up_on_rejected_certificate: bool,
}

#[derive(Debug)]
pub enum Event {
    Connected,
    Disconnected,
    Message(v4::Publish),
    /// A publish too big to accept; its payload was discarded.
    Oversized {
        topic: String,
        size: usize,
    },
    /// The broker acknowledged the QoS 1 publish given this tag.
    Acked(u64),
}

enum State {
    Idle { retry_at: Instant },
    Resolving { deadline: Instant },
    Dialing { dialer: Box<Dialer>, deadline: Instant },
    AwaitingConnAck { link: Link, deadline: Instant },
    Up(Box<Session>),
    Stopped,
}

struct Session {
    link: Link,
    since: Instant,
    last_rx: Instant,
    last_tx: Instant,
    ping_sent: Option<Instant>,
}

/// An oversized publish being discarded as its bytes arrive.
struct Skip {
    remaining: usize,
}

pub struct Client {
    opts: ClientOptions,
    state: State,
    token: Token,
    resolver: Workers<Result<Vec<SocketAddr>, String>>,
    inbuf: BytesMut,
    skip: Option<Skip>,
    /// Reading stopped before the socket or `inbuf` ran dry (see `MAX_EVENTS`): it goes on
    /// once the owner has taken the events and the send queue has drained.
    backlog: bool,
    ids: PacketIds,
    events: VecDeque<Event>,
    failures: u32,
    /// Which of `opts.routes` the next attempt uses.
    next_route: usize,
    gave_up: Option<String>,
}

impl Client {
    /// A client that connects at the first `on_timer` call.
    pub fn new(opts: ClientOptions, waker: Arc<mio::Waker>, token: Token) -> Client {
        Client {
            opts,
            state: State::Idle { retry_at: Instant::now() },
            token,
            resolver: Workers::new(waker),
            inbuf: BytesMut::new(),
            skip: None,
            backlog: false,
            ids: PacketIds::default(),
            events: VecDeque::new(),
            failures: 0,
            next_route: 0,
            gave_up: None,
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up(_))
    }

    /// QoS 1 publishes sent and not acknowledged yet.
    pub fn inflight(&self) -> usize {
        self.ids.publishes.len()
    }

    /// Whether `publish` takes a QoS 1 message now: connected, fewer than `MAX_INFLIGHT`
    /// awaiting their acknowledgement, and less than `SEND_QUEUE_LIMIT` waiting for the socket.
    /// When it does not, the caller keeps the message and tries again after the next event.
    pub fn can_publish(&self) -> bool {
        self.has_send_room() && !self.ids.is_full()
    }

    /// Bytes waiting for the socket to take them.
    pub fn queued_bytes(&self) -> usize {
        self.link().map_or(0, Link::queued)
    }

    fn has_send_room(&self) -> bool {
        self.is_up() && self.queued_bytes() < SEND_QUEUE_LIMIT
    }

    /// Why the client stopped for good (see `ClientOptions::give_up_on_rejected_certificate`).
    pub fn gave_up(&self) -> Option<&str> {
        self.gave_up.as_deref()
    }

    pub fn next_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front();
        if event.is_none() {
            self.events.release_if_empty();
        }
        event
    }

    /// Replaces the options and starts over with a fresh connection.
    pub fn reconfigure(&mut self, opts: ClientOptions) {
        self.drop_connection();
        self.opts = opts;
        self.failures = 0;
        self.next_route = 0;
        self.state = State::Idle { retry_at: Instant::now() };
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        if self.backlog && self.may_read() {
            return Some(Instant::now());
        }
        match &self.state {
            State::Idle { retry_at } => Some(*retry_at),
            State::Resolving { deadline }
            | State::Dialing { deadline, .. }
            | State::AwaitingConnAck { deadline, .. } => Some(*deadline),
            State::Up(s) => Some(match s.ping_sent {
                Some(sent) => sent + self.opts.keepalive,
                None => s.last_rx.min(s.last_tx) + self.opts.keepalive / 2,
            }),
            State::Stopped => None,
        }
    }

    pub fn on_timer(&mut self, registry: &Registry, now: Instant) {
        if self.backlog && self.may_read() {
            self.read_packets();
        }
        match &mut self.state {
            State::Idle { retry_at } if now >= *retry_at => self.resolve(),
            State::Resolving { deadline }
            | State::Dialing { deadline, .. }
            | State::AwaitingConnAck { deadline, .. }
                if now >= *deadline =>
            {
                self.fail("timed out connecting".into())
            }
            State::Up(s) => match s.ping_sent {
                Some(sent) if now >= sent + self.opts.keepalive => {
                    let silent = (now - s.last_rx).as_secs();
                    self.fail(format!("broker did not answer for {silent} s"))
                }
                None if now >= s.last_rx.min(s.last_tx) + self.opts.keepalive / 2 => {
                    s.ping_sent = Some(now);
                    self.send(&Packet::PingReq);
                }
                _ => {}
            },
            _ => {}
        }
        let _ = registry;
    }

    /// The DNS lookup finished on its worker.
    pub fn on_wake(&mut self, registry: &Registry) {
        while let Some(result) = self.resolver.try_recv() {
            if !matches!(self.state, State::Resolving { .. }) {
                continue; // a lookup for an attempt already given up
            }
            match result
                .and_then(|addrs| Dialer::start(Arc::clone(self.route()), addrs, registry, self.token))
            {
                Ok(dialer) => {
                    let deadline = Instant::now() + self.opts.connect_timeout;
                    self.state = State::Dialing { dialer: Box::new(dialer), deadline };
                }
                Err(e) => self.fail(e),
            }
        }
    }

    pub fn on_socket(&mut self, registry: &Registry, event: &MioEvent) {
        if let State::Dialing { dialer, deadline } = &mut self.state {
            let deadline = *deadline;
            match dialer.advance(registry) {
                Ok(Some(link)) => self.start_mqtt(link, deadline),
                Ok(None) => {}
                Err(e) if dialer.certificate_rejected() && self.opts.give_up_on_rejected_certificate => {
                    self.drop_connection();
                    self.state = State::Stopped;
                    self.gave_up = Some(e);
                }
                Err(e) => self.fail(e),
            }
            return;
        }
        if event.is_writable() {
            if let Some(link) = self.link_mut() {
                if let Err(e) = link.flush() {
                    return self.fail(describe_io(&e));
                }
            }
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() || self.backlog {
            self.read_packets();
        }
    }

    /// Payload bytes a `publish_bulk` takes now: what is left of `BULK_QUEUE_LIMIT`, 0 when not
    /// connected. A bigger payload goes in only while nothing waits for the socket. Room comes
    /// back as the socket takes bytes, on a writable event: the owner's loop turn after any
    /// socket event is the time to look again, no other event tells.
    pub fn bulk_room(&self) -> usize {
        if self.is_up() {
            bulk_room_over(self.queued_bytes())
        } else {
            0
        }
    }

    /// Sends a QoS 0, not retained publish of bulk data (a stream's chunk) if the bulk lane
    /// has room for it (see `bulk_room`); returns whether it did. Bulk data stays well below
    /// what `publish` takes, so it never leaves a heartbeat or a command's state without room,
    /// nor PINGREQ and PUBACK far behind it.
    pub fn publish_bulk(&mut self, topic: &str, payload: &[u8]) -> bool {
        self.is_up()
            && admits_bulk(self.queued_bytes(), payload.len())
            && self.publish(topic, payload, false, None)
    }

    /// Sends a publish now if connected; with `tag`, it goes at QoS 1 and `Event::Acked(tag)`
    /// follows its PUBACK. Returns false when nothing was sent: not connected, the send queue
    /// full, or a QoS 1 publish while `can_publish` is false.
    pub fn publish(&mut self, topic: &str, payload: &[u8], retain: bool, tag: Option<u64>) -> bool {
        if !self.has_send_room() {
            return false;
        }
        let mut packet = v4::Publish::from_bytes(topic, QoS::AtMostOnce, Bytes::copy_from_slice(payload));
        packet.retain = retain;
        if let Some(tag) = tag {
            let Some(pkid) = self.ids.publish(tag) else { return false };
            packet.qos = QoS::AtLeastOnce;
            packet.pkid = pkid;
        }
        self.send(&Packet::Publish(packet));
        self.is_up()
    }

    /// A clean goodbye: DISCONNECT (so the broker drops the will), then close.
    pub fn disconnect(&mut self) {
        if self.is_up() {
            self.send(&Packet::Disconnect);
        }
        self.close_leaving_will();
    }

    /// Drops the connection and connects again at once, the backoff reset: a fresh
    /// connection, e.g. to prove the broker is still reachable after a firewall change, or as
    /// soon as a change that cut it is undone. No DISCONNECT: the broker publishes the will, so
    /// a device that cannot come back shows offline.
    pub fn reconnect_now(&mut self) {
        if matches!(self.state, State::Stopped) {
            return;
        }
        self.drop_connection();
        self.failures = 0;
        self.state = State::Idle { retry_at: Instant::now() };
    }

    /// Closes without a DISCONNECT: the broker publishes the will, as for a lost connection.
    pub fn close_leaving_will(&mut self) {
        self.drop_connection();
        self.state = State::Stopped;
    }

    fn resolve(&mut self) {
        let (host, port) = self.route().first_hop();
        log::debug!("resolving {host}:{port}");
        let started = self.resolver.spawn("resolve", move || match (host.as_str(), port).to_socket_addrs() {
            Ok(addrs) => {
                let addrs: Vec<_> = addrs.collect();
                if addrs.is_empty() {
                    Err(format!("DNS: {host} has no address"))
                } else {
                    Ok(addrs)
                }
            }
            Err(e) => Err(format!("DNS: cannot resolve {host}: {e}")),
        });
        self.state = State::Resolving { deadline: Instant::now() + self.opts.connect_timeout };
        if let Err(e) = started {
            self.fail(e);
        }
    }

    fn start_mqtt(&mut self, link: Link, deadline: Instant) {
        let o = &self.opts;
        let mut connect = v4::Connect::new(o.client_id.clone());
        connect.keep_alive = o.keepalive.as_secs().min(u16::MAX as u64) as u16;
        connect.clean_session = true;
        connect.last_will = o.will.as_ref().map(|w| v4::LastWill {
            topic: w.topic.clone(),
            message: Bytes::copy_from_slice(&w.payload),
            qos: QoS::AtLeastOnce,
            retain: w.retain,
        });
        if let Some(user) = &o.username {
            connect.login = Some(v4::Login::new(user.clone(), o.password.clone().unwrap_or_default()));
        }
        self.inbuf.clear();
        self.skip = None;
        self.state = State::AwaitingConnAck { link, deadline };
        self.send(&Packet::Connect(connect));
        // The CONNACK may already be buffered inside TLS or the WebSocket.
        self.read_packets();
    }

    fn link(&self) -> Option<&Link> {
        match &self.state {
            State::AwaitingConnAck { link, .. } => Some(link),
            State::Up(s) => Some(&s.link),
            _ => None,
        }
    }

    fn link_mut(&mut self) -> Option<&mut Link> {
        match &mut self.state {
            State::AwaitingConnAck { link, .. } => Some(link),
            State::Up(s) => Some(&mut s.link),
            _ => None,
        }
    }

    fn send(&mut self, packet: &Packet) {
        let mut buf = BytesMut::new();
        let encoded = match packet {
            Packet::Connect(p) => p.write(&mut buf),
            Packet::Publish(p) => p.write(&mut buf),
            Packet::PubAck(p) => p.write(&mut buf),
            Packet::Subscribe(p) => p.write(&mut buf),
            Packet::PingReq => v4::PingReq.write(&mut buf),
            Packet::Disconnect => v4::Disconnect.write(&mut buf),
            other => {
                log::error!("bug: the client does not send {} packets", packet_name(other));
                return;
            }
        };
        if encoded.is_err() {
            log::error!(
                "cannot encode an MQTT {} packet: it exceeds the protocol's limits",
                packet_name(packet)
            );
            return;
        }
        let Some(link) = self.link_mut() else { return };
        let result = link.send(&buf);
        if let State::Up(s) = &mut self.state {
            s.last_tx = Instant::now();
        }
        if let Err(e) = result {
            self.fail(describe_io(&e));
        }
    }

    /// Any byte shows the broker is alive: a big message that takes long to arrive (slow link,
    /// slow broker) holds the PINGRESP back behind it, and must not count as silence.
    fn heard_from_broker(&mut self) {
        if let State::Up(s) = &mut self.state {
            s.last_rx = Instant::now();
            s.ping_sent = None;
        }
    }

    /// The owner has caught up with the events and the broker with the bytes sent to it.
    fn may_read(&self) -> bool {
        self.events.len() < MAX_EVENTS && self.link().is_some_and(|l| l.queued() < READ_PAUSE_QUEUED)
    }

    /// Decodes what is left from before, then reads one bounded batch and decodes it, as far
    /// as `may_read` allows. What remains sets `backlog`, for `on_timer` to go on with.
    fn read_packets(&mut self) {
        self.backlog = false;
        if let Err(e) = self.decode_packets(true) {
            return self.fail(e);
        }
        if !self.may_read() {
            self.backlog = self.link().is_some();
            return;
        }
        let mut inbuf = std::mem::take(&mut self.inbuf);
        let Some(link) = self.link_mut() else { return };
        let read = link.read_into(&mut inbuf);
        self.inbuf = inbuf;
        let end = match read {
            Ok((end, bytes)) => {
                if bytes > 0 {
                    self.heard_from_broker();
                }
                end
            }
            Err(e) => return self.fail(describe_io(&e)),
        };
        // The broker's last words are all taken before the connection goes.
        if let Err(e) = self.decode_packets(end != ReadEnd::Closed) {
            return self.fail(e);
        }
        self.inbuf.release_if_empty();
        match end {
            ReadEnd::More => self.backlog = true,
            ReadEnd::WouldBlock => {}
            ReadEnd::Closed => {
                if !matches!(self.state, State::Idle { .. } | State::Stopped) {
                    self.fail("broker closed the connection".into());
                }
            }
        }
    }

    /// Decodes packets from `inbuf` until it holds no whole one or, when `bounded`, until
    /// `may_read` says to wait (then `backlog` is set).
    fn decode_packets(&mut self, bounded: bool) -> Result<(), String> {
        loop {
            if let Some(skip) = &mut self.skip {
                let n = skip.remaining.min(self.inbuf.len());
                let _ = self.inbuf.split_to(n);
                skip.remaining -= n;
                if skip.remaining > 0 {
                    return Ok(());
                }
                self.skip = None;
            }
            if self.inbuf.is_empty() {
                return Ok(());
            }
            if bounded && !self.may_read() {
                self.backlog = true;
                return Ok(());
            }
            match v4::read(&mut self.inbuf, self.opts.max_packet) {
                Ok(packet) => {
                    self.handle(packet)?;
                    if !matches!(self.state, State::Up(_) | State::AwaitingConnAck { .. }) {
                        return Ok(());
                    }
                }
                Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(()),
                Err(mqttbytes::Error::PayloadSizeLimitExceeded(_)) => {
                    if !self.start_skip() {
                        return Ok(()); // wait for the start of the oversized publish
                    }
                }
                Err(e) => return Err(describe_malformed(e)),
            }
        }
    }

    /// Starts discarding an oversized packet once its topic is readable, so the owner can
    /// answer it. False when more bytes are needed first.
    fn start_skip(&mut self) -> bool {
        let Some(head) = OversizedHead::parse(&self.inbuf) else { return false };
        let _ = self.inbuf.split_to(head.header_len);
        self.skip = Some(Skip { remaining: head.remaining_len });
        if head.is_publish {
            if let Some(pkid) = head.pkid {
                self.send(&Packet::PubAck(v4::PubAck::new(pkid)));
            }
            self.events.push_back(Event::Oversized { topic: head.topic, size: head.remaining_len });
        }
        true
    }

    fn handle(&mut self, packet: Packet) -> Result<(), String> {
        match packet {
            Packet::ConnAck(ack) => self.on_connack(ack.code)?,
            Packet::Publish(p) => {
                if p.qos != QoS::AtMostOnce {
                    self.send(&Packet::PubAck(v4::PubAck::new(p.pkid)));
                }
                self.events.push_back(Event::Message(p));
            }
            Packet::PubAck(ack) => {
                if let Some(tag) = self.ids.puback(ack.pkid) {
                    self.events.push_back(Event::Acked(tag));
                }
            }
            Packet::SubAck(ack) => {
                let ours = self.ids.suback(ack.pkid);
                if ours && ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    log::warn!("broker refused a subscription (not authorised by its ACL?)");
                }
            }
            Packet::PingResp => log::trace!("pong"),
            other => log::debug!("ignoring a {} packet from the broker", packet_name(&other)),
        }
        Ok(())
    }

    fn on_connack(&mut self, code: ConnectReturnCode) -> Result<(), String> {
        if code != ConnectReturnCode::Success {
            return Err(describe_connack(code));
        }
        let State::AwaitingConnAck { .. } = self.state else {
            return Err("MQTT: unexpected CONNACK".into());
        };
        let State::AwaitingConnAck { link, .. } = std::mem::replace(&mut self.state, State::Stopped) else {
            unreachable!("checked above")
        };
        let now = Instant::now();
        self.state =
            State::Up(Box::new(Session { link, since: now, last_rx: now, last_tx: now, ping_sent: None }));
        log::info!("connected to {}", self.route().broker);
        self.subscribe();
        self.events.push_back(Event::Connected);
        Ok(())
    }

    /// Subscribes again, so the broker sends the retained messages once more (for answers
    /// given up for room: the requests they answer are still retained).
    /// Sends a PINGREQ now unless one is out. The broker answers after what it queued before,
    /// so a tail of messages it held back comes with it.
    pub fn ping(&mut self) {
        if let State::Up(s) = &mut self.state {
            if s.ping_sent.is_none() {
                s.ping_sent = Some(Instant::now());
                self.send(&Packet::PingReq);
            }
        }
    }

    pub fn resubscribe(&mut self) {
        if self.is_up() {
            self.subscribe();
        }
    }

    fn subscribe(&mut self) {
        if self.opts.subscriptions.is_empty() {
            return;
        }
        let marker = self.opts.end_marker.clone();
        if let Some((topic, payload)) = &marker {
            let mut publish =
                v4::Publish::from_bytes(topic, QoS::AtMostOnce, Bytes::copy_from_slice(payload));
            publish.retain = true;
            self.send(&Packet::Publish(publish));
        }
        let qos = self.opts.subscription_qos;
        let marker_topic = marker.map(|(topic, _)| topic);
        let filters = self
            .opts
            .subscriptions
            .iter()
            .chain(marker_topic.iter())
            .map(|f| v4::SubscribeFilter::new(f.clone(), qos));
        let mut subscribe = v4::Subscribe::new_many(filters);
        subscribe.pkid = self.ids.subscribe();
        self.send(&Packet::Subscribe(subscribe));
    }

    /// Gives up on the current connection or attempt and schedules the next one.
    fn fail(&mut self, reason: String) {
        if matches!(self.state, State::Stopped) {
            return;
        }
        if let State::Up(s) = &self.state {
            if s.since.elapsed() >= STABLE_CONNECTION {
                self.failures = 0;
            }
        }
        // Each node gets its try before the wait grows: a dead node costs one short retry.
        let nodes = self.opts.routes.len() as u32;
        let delay = backoff(self.opts.reconnect_min, self.opts.reconnect_max, self.failures / nodes.max(1));
        self.failures = self.failures.saturating_add(1);
        let failed = self.route().broker.to_string();
        self.next_route = (self.next_route + 1) % self.opts.routes.len().max(1);
        let next = match nodes {
            1 => String::new(),
            _ => format!(" at {}", self.route().broker),
        };
        log::warn!("{failed}: {reason}; retrying{next} in {:.1} s", delay.as_secs_f64());
        self.drop_connection();
        self.state = State::Idle { retry_at: Instant::now() + delay };
    }

    /// The broker node this connection or attempt is for.
    fn route(&self) -> &Arc<Route> {
        &self.opts.routes[self.next_route % self.opts.routes.len()]
    }

    fn drop_connection(&mut self) {
        let was_up = self.is_up();
        self.state = State::Idle { retry_at: Instant::now() };
        self.ids = PacketIds::default();
        self.inbuf = BytesMut::new();
        self.skip = None;
        self.backlog = false;
        if was_up {
            self.events.push_back(Event::Disconnected);
        }
    }
}

fn describe_connack(code: ConnectReturnCode) -> String {
    match code {
        ConnectReturnCode::BadUserNamePassword => {
            "MQTT: broker refused the connection: bad username or password".into()
        }
        ConnectReturnCode::NotAuthorized => "MQTT: broker refused the connection: not authorised".into(),
        ConnectReturnCode::BadClientId => "MQTT: broker refused the client id".into(),
        ConnectReturnCode::ServiceUnavailable => "MQTT: broker unavailable".into(),
        ConnectReturnCode::RefusedProtocolVersion => {
            "MQTT: broker refused the connection: it does not speak MQTT 3.1.1".into()
        }
        ConnectReturnCode::Success => "MQTT: broker accepted the connection".into(),
    }
}

/// Why the broker's bytes are no MQTT 3.1.1 packet, in words (mqttbytes' own text is a Rust
/// debug dump); the numbers are what the broker sent.
fn describe_malformed(err: mqttbytes::Error) -> String {
    use mqttbytes::Error as E;
    let why = match err {
        E::InvalidPacketType(t) => format!("unknown packet type {t}"),
        E::MalformedRemainingLength => "its length field is invalid".into(),
        E::InvalidQoS(q) => format!("QoS {q} does not exist"),
        E::TopicNotUtf8 => "its topic is not UTF-8".into(),
        E::PacketIdZero => "packet id 0".into(),
        E::InvalidConnectReturnCode(c) => format!("unknown CONNACK code {c}"),
        E::InvalidSubscribeReasonCode(c) => format!("unknown SUBACK code {c}"),
        E::PayloadRequired => "a payload is missing".into(),
        _ => "its fields do not add up".into(),
    };
    format!("MQTT: malformed packet from the broker: {why}")
}

/// The MQTT name of a packet's type, for logs.
fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// Payload bytes the bulk lane takes while `queued` bytes wait for the socket.
fn bulk_room_over(queued: usize) -> usize {
    BULK_QUEUE_LIMIT.saturating_sub(queued)
}

/// Whether a bulk payload of `size` bytes goes in while `queued` bytes wait: when the room
/// left holds it, or, bigger than that, when nothing waits, so a chunk bigger than the whole
/// lane still gets through, alone.
fn admits_bulk(queued: usize, size: usize) -> bool {
    let room = bulk_room_over(queued);
    queued == 0 || (room > 0 && size <= room)
}

/// Exponential backoff from `min` doubling to `max`, every delay drawn uniformly in [d/2, d]:
/// a fleet that lost its broker at once does not come back at once, from the first retry on,
/// and no agent retries sooner than `min / 2`.
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let full = min.saturating_mul(1u32 << failures.min(16)).min(max);
    crate::random::between(full / 2, full)
}

/// The packet ids awaiting the broker's acknowledgement. At most `MAX_INFLIGHT` + 1 are taken,
/// so the search for a free one always ends within that many steps.
#[derive(Default)]
struct PacketIds {
    /// QoS 1 publishes, with the owner's tag.
    publishes: HashMap<u16, u64>,
    /// The SUBSCRIBE sent on connect, until its SUBACK.
    subscribe: Option<u16>,
    last: u16,
}

impl PacketIds {
    fn is_full(&self) -> bool {
        self.publishes.len() >= MAX_INFLIGHT
    }

    /// An id for a QoS 1 publish tagged `tag`; none while `MAX_INFLIGHT` are in flight.
    fn publish(&mut self, tag: u64) -> Option<u16> {
        if self.is_full() {
            return None;
        }
        let id = self.next_free();
        self.publishes.insert(id, tag);
        Some(id)
    }

    fn subscribe(&mut self) -> u16 {
        let id = self.next_free();
        self.subscribe = Some(id);
        id
    }

    /// The tag of the publish `id` acknowledges, if it is ours.
    fn puback(&mut self, id: u16) -> Option<u64> {
        self.publishes.remove(&id)
    }

    /// Whether `id` acknowledges our SUBSCRIBE (the broker may repeat or invent SUBACKs).
    fn suback(&mut self, id: u16) -> bool {
        let ours = self.subscribe == Some(id);
        if ours {
            self.subscribe = None;
        }
        ours
    }

    fn next_free(&mut self) -> u16 {
        loop {
            self.last = self.last.wrapping_add(1);
            let id = self.last;
            if id != 0 && self.subscribe != Some(id) && !self.publishes.contains_key(&id) {
                return id;
            }
        }
    }
}

/// The start of a packet too big to read whole.
struct OversizedHead {
    header_len: usize,
    remaining_len: usize,
    is_publish: bool,
    topic: String,
    pkid: Option<u16>,
}

impl OversizedHead {
    fn parse(buf: &[u8]) -> Option<OversizedHead> {
        let byte1 = *buf.first()?;
        let mut remaining_len = 0usize;
        let mut header_len = 1;
        for (i, &b) in buf.iter().skip(1).take(4).enumerate() {
            remaining_len |= ((b & 0x7f) as usize) << (7 * i);
            header_len += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let body = buf.get(header_len..)?;
        let is_publish = byte1 >> 4 == 3;
        if !is_publish {
            return Some(OversizedHead {
                header_len,
                remaining_len,
                is_publish,
                topic: String::new(),
                pkid: None,
            });
        }
        let topic_len = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
        let topic = String::from_utf8_lossy(body.get(2..2 + topic_len)?).into_owned();
        let qos = (byte1 >> 1) & 3;
        let pkid = match qos {
            0 => None,
            _ => Some(u16::from_be_bytes([*body.get(2 + topic_len)?, *body.get(3 + topic_len)?])),
        };
        Some(OversizedHead { header_len, remaining_len, is_publish, topic, pkid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_max_with_jitter() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(300));
        for failures in 0..20 {
            let full = Duration::from_secs(1u64 << failures.min(16)).min(max);
            let d = backoff(min, max, failures);
            assert!(
                d <= full && d >= full / 2,
                "failures {failures}: {d:?} outside [{:?}, {full:?}]",
                full / 2
            );
        }
    }

    /// The first retry after a broker restart is the one a whole fleet makes together: its
    /// delays must cover [min/2, min], each tenth of it.
    #[test]
    fn the_first_retry_is_spread_over_half_min_to_min() {
        let (min, max) = (Duration::from_secs(2), Duration::from_secs(300));
        let mut tenths = [0usize; 10];
        for _ in 0..2000 {
            let d = backoff(min, max, 0);
            assert!(d >= min / 2 && d <= min, "{d:?} outside [{:?}, {min:?}]", min / 2);
            let tenth = ((d - min / 2).as_secs_f64() / (min / 2).as_secs_f64() * 10.0) as usize;
            tenths[tenth.min(9)] += 1;
        }
        assert!(tenths.iter().all(|&n| n >= 100), "first delays per tenth of [min/2, min]: {tenths:?}");
    }

    #[test]
    fn at_most_max_inflight_publishes_take_packet_ids() {
        let mut ids = PacketIds::default();
        let sub = ids.subscribe();
        let taken: Vec<u16> = (0..MAX_INFLIGHT as u64).map(|tag| ids.publish(tag).expect("room")).collect();
        assert!(ids.is_full());
        assert_eq!(ids.publish(999), None, "a publish beyond MAX_INFLIGHT got an id");
        let mut all: Vec<u16> = taken.iter().copied().chain([sub]).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), MAX_INFLIGHT + 1, "an id was given twice");
        assert_eq!(ids.puback(taken[3]), Some(3));
        assert_eq!(ids.puback(taken[3]), None, "a repeated PUBACK acknowledged twice");
        assert!(ids.publish(1000).is_some(), "no room after a PUBACK");
    }

    /// Long-lived connections wrap around the 16-bit ids many times, with the oldest publish
    /// unacknowledged all along: ids stay unique and non-zero, and never collide with it.
    #[test]
    fn packet_ids_wrap_around_what_stays_in_flight() {
        let mut ids = PacketIds::default();
        let stuck = ids.publish(u64::MAX).unwrap();
        let sub = ids.subscribe();
        let mut window = std::collections::VecDeque::new();
        for tag in 0..200_000u64 {
            if ids.is_full() {
                let oldest = window.pop_front().unwrap();
                assert!(ids.puback(oldest).is_some());
            }
            let id = ids.publish(tag).expect("room after a PUBACK");
            let reused = id == stuck || id == sub || window.contains(&id);
            assert!(id != 0 && !reused, "id {id} given while in flight");
            window.push_back(id);
        }
        assert!(ids.suback(sub) && !ids.suback(sub), "the SUBACK is ours once");
    }

    /// A client that is up on a loopback socket whose other end, returned, plays the broker.
    /// Both kernel buffers are small, so the client's own send queue fills soon.
    fn client_on_loopback() -> (Client, std::net::TcpStream) {
        use std::os::fd::AsRawFd;
        let small = |fd: i32, option: i32| {
            let size: libc::c_int = 4096;
            let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: a valid socket and a c_int option value of the given length.
            unsafe {
                libc::setsockopt(fd, libc::SOL_SOCKET, option, (&size as *const libc::c_int).cast(), len)
            };
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        small(listener.as_raw_fd(), libc::SO_RCVBUF);
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (broker, _) = listener.accept().unwrap();
        small(ours.as_raw_fd(), libc::SO_SNDBUF);
        ours.set_nonblocking(true).unwrap();

        let route = Route {
            broker: crate::net::url::BrokerUrl::parse("mqtt://127.0.0.1").unwrap(),
            proxy: None,
            tls: None,
        };
        let opts = ClientOptions {
            routes: vec![Arc::new(route)],
            client_id: "test".into(),
            username: None,
            password: None,
            keepalive: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            will: None,
            subscriptions: vec![],
            end_marker: None,
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(2),
            max_packet: 1024,
            subscription_qos: QoS::AtLeastOnce,
            give_up_on_rejected_certificate: false,
        };
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), Token(1)).unwrap());
        let mut client = Client::new(opts, waker, Token(0));
        let link = Link::raw(crate::net::link::Stream::Plain(mio::net::TcpStream::from_std(ours)));
        let now = Instant::now();
        client.state =
            State::Up(Box::new(Session { link, since: now, last_rx: now, last_tx: now, ping_sent: None }));
        (client, broker)
    }

    /// A hostile broker sends QoS 1 publishes without end and never reads: the PUBACKs they
    /// call for stop piling up once READ_PAUSE_QUEUED bytes wait, because reading stops too.
    /// (No real broker behaves so, Mosquitto included: this one is played by the test.)
    #[test]
    fn a_broker_that_never_reads_cannot_grow_the_send_queue_with_acks() {
        let (mut client, mut broker) = client_on_loopback();
        let flood = std::thread::spawn(move || {
            let publishes: Vec<u8> =
                (1..=1000u16).flat_map(|id| [0x32, 5, 0, 1, b't', (id >> 8) as u8, id as u8]).collect();
            // Ends when the client's socket closes.
            while std::io::Write::write_all(&mut broker, &publishes).is_ok() {}
        });
        let bound = READ_PAUSE_QUEUED + 4; // one PUBACK past it
        let mut reads = 0;
        while client.queued_bytes() < READ_PAUSE_QUEUED && reads < 1_000_000 {
            client.read_packets();
            while client.next_event().is_some() {}
            reads += 1;
        }
        let queued = client.queued_bytes();
        for _ in 0..1000 {
            client.read_packets();
            while client.next_event().is_some() {}
        }
        let later = client.queued_bytes();
        assert!(client.is_up(), "the connection was dropped");
        drop(client);
        flood.join().unwrap();
        assert!(queued >= READ_PAUSE_QUEUED, "the send queue never filled: {queued} bytes");
        assert!(later <= bound, "{later} bytes of acks queued (bound {bound})");
    }

    #[test]
    fn the_bulk_lane_takes_its_share_then_one_big_chunk_alone() {
        assert_eq!(bulk_room_over(0), BULK_QUEUE_LIMIT);
        assert!(admits_bulk(BULK_QUEUE_LIMIT - 100, 100));
        assert!(!admits_bulk(BULK_QUEUE_LIMIT - 100, 101), "past the share");
        assert!(!admits_bulk(BULK_QUEUE_LIMIT, 0), "an empty payload once the share is used up");
        assert!(admits_bulk(0, 33 * 1024), "a chunk bigger than the lane was refused on an empty queue");
        assert!(!admits_bulk(1, 33 * 1024), "a chunk bigger than the lane was taken behind others");
        assert_eq!(bulk_room_over(SEND_QUEUE_LIMIT), 0);
    }

    /// A broker that reads nothing: bulk publishes stop at the lane's share while `publish`
    /// still takes a heartbeat; once the broker reads, a flush (what a writable event does)
    /// gives the room back.
    #[test]
    fn bulk_data_leaves_room_to_publish_and_gets_its_own_back_as_the_socket_drains() {
        let (mut client, mut broker) = client_on_loopback();
        let chunk = [b'x'; 1000];
        let mut taken = 0;
        while client.publish_bulk("t/bulk", &chunk) {
            taken += 1;
            assert!(taken < 10_000, "the bulk lane has no bound");
        }
        let queued = client.queued_bytes();
        assert!(
            (BULK_QUEUE_LIMIT - chunk.len()..BULK_QUEUE_LIMIT + chunk.len() + 16).contains(&queued),
            "{queued}"
        );
        assert_eq!(client.bulk_room(), bulk_room_over(queued));
        assert!(client.can_publish() && client.publish("t/hb", b"heartbeat", true, Some(1)));

        broker.set_nonblocking(true).unwrap();
        let mut received = 0;
        let mut sink = [0u8; 65536];
        for _ in 0..10_000 {
            while let Ok(n @ 1..) = std::io::Read::read(&mut broker, &mut sink) {
                received += n;
            }
            client.link_mut().unwrap().flush().unwrap();
            if client.queued_bytes() == 0 && received > taken * chunk.len() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(client.bulk_room(), BULK_QUEUE_LIMIT, "{received} bytes read, room not back");
        assert!(received > taken * chunk.len(), "{received} bytes read of {taken} chunks");
    }

    /// A 32 MiB publish past `max_packet` is skipped as it streams in: the input buffer never
    /// holds more than a read batch of it, and what follows it is read as usual.
    #[test]
    fn an_oversized_publish_is_skipped_in_bounded_memory() {
        let (mut client, mut broker) = client_on_loopback();
        let sender = std::thread::spawn(move || {
            let mut bytes = BytesMut::new();
            let mut huge = v4::Publish::new("t/huge", QoS::AtLeastOnce, vec![b'x'; 32 << 20]);
            huge.pkid = 1;
            huge.write(&mut bytes).unwrap();
            v4::Publish::new("t/after", QoS::AtMostOnce, b"after".to_vec()).write(&mut bytes).unwrap();
            std::io::Write::write_all(&mut broker, &bytes).unwrap();
            broker // kept open until the test is done
        });
        let (mut oversized, mut after, mut largest) = (None, false, 0);
        for _ in 0..1_000_000 {
            client.read_packets();
            largest = largest.max(client.inbuf.capacity());
            while let Some(event) = client.next_event() {
                match event {
                    Event::Oversized { topic, size } => oversized = Some((topic, size)),
                    Event::Message(p) => after = p.payload == "after",
                    _ => {}
                }
            }
            if after {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        assert!(client.is_up(), "the connection was dropped");
        let (topic, size) = oversized.expect("no Oversized event");
        assert_eq!((topic.as_str(), size > 32 << 20), ("t/huge", true));
        assert!(after, "the message after the huge one did not arrive");
        assert!(largest <= 2 * 64 * 1024, "the input buffer grew to {largest} bytes");
        drop(sender.join().unwrap());
    }

    /// What a broker's garbage or refusal is called in the log: words, no Rust debug dump.
    #[test]
    fn broker_errors_are_described_in_words() {
        let decode = |bytes: &[u8]| v4::read(&mut BytesMut::from(bytes), 1024).unwrap_err();
        assert_eq!(
            describe_malformed(decode(&[0xf0, 0])),
            "MQTT: malformed packet from the broker: unknown packet type 15"
        );
        assert_eq!(
            describe_malformed(decode(&[0x20, 0xff, 0xff, 0xff, 0xff, 0x01])),
            "MQTT: malformed packet from the broker: its length field is invalid"
        );
        assert_eq!(
            describe_connack(ConnectReturnCode::RefusedProtocolVersion),
            "MQTT: broker refused the connection: it does not speak MQTT 3.1.1"
        );
        assert_eq!(packet_name(&Packet::PubRec(v4::PubRec::new(1))), "PUBREC");
    }

    #[test]
    fn oversized_head_names_topic_and_packet_id() {
        let mut buf = BytesMut::new();
        let mut p = v4::Publish::new("a/b", QoS::AtLeastOnce, vec![7u8; 300]);
        p.pkid = 9;
        p.write(&mut buf).unwrap();
        let head = OversizedHead::parse(&buf).unwrap();
        assert_eq!((head.topic.as_str(), head.pkid, head.header_len), ("a/b", Some(9), 3));
        assert_eq!(head.remaining_len, buf.len() - 3);
        assert!(OversizedHead::parse(&buf[..5]).is_none());
    }

    /// A hostile broker's bytes: random and mutated packets must give errors, never a panic.
    #[test]
    fn decoding_garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut valid = BytesMut::new();
        let mut p =
            v4::Publish::new("tether/d/cmd/ping/1", QoS::AtLeastOnce, b"{\"status\":\"init\"}".to_vec());
        p.pkid = 3;
        p.write(&mut valid).unwrap();
        for round in 0..200_000 {
            let mut buf = if round % 2 == 0 {
                let len = (next() % 64) as usize;
                (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                let mut b = valid.to_vec();
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                b.truncate(1 + (next() as usize) % b.len());
                b
            };
            let mut stream = BytesMut::from(&buf[..]);
            while !stream.is_empty() {
                if v4::read(&mut stream, 1024).is_err() {
                    break;
                }
            }
            let _ = OversizedHead::parse(&buf);
            buf.clear();
        }
    }
}
