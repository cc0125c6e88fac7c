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
use crate::worker::Workers;

/// A connection that stayed up this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(30);

pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

pub struct ClientOptions {
    pub route: Arc<Route>,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    pub will: Option<Will>,
    /// Subscribed on every connect.
    pub subscriptions: Vec<String>,
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
    inflight: HashMap<u16, u64>,
    next_pkid: u16,
    events: VecDeque<Event>,
    failures: u32,
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
            inflight: HashMap::new(),
            next_pkid: 0,
            events: VecDeque::new(),
            failures: 0,
            gave_up: None,
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up(_))
    }

    /// QoS 1 publishes sent and not acknowledged yet.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Why the client stopped for good (see `ClientOptions::give_up_on_rejected_certificate`).
    pub fn gave_up(&self) -> Option<&str> {
        self.gave_up.as_deref()
    }

    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Replaces the options and starts over with a fresh connection.
    pub fn reconfigure(&mut self, opts: ClientOptions) {
        self.drop_connection();
        self.opts = opts;
        self.failures = 0;
        self.state = State::Idle { retry_at: Instant::now() };
    }

    pub fn next_deadline(&self) -> Option<Instant> {
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
                .and_then(|addrs| Dialer::start(Arc::clone(&self.opts.route), addrs, registry, self.token))
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
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.read_packets();
        }
    }

    /// Sends a publish now if connected; with `tag`, it goes at QoS 1 and `Event::Acked(tag)`
    /// follows its PUBACK. Returns false when not connected (nothing was sent).
    pub fn publish(&mut self, topic: &str, payload: &[u8], retain: bool, tag: Option<u64>) -> bool {
        if !self.is_up() {
            return false;
        }
        let mut packet = v4::Publish::from_bytes(topic, QoS::AtMostOnce, Bytes::copy_from_slice(payload));
        packet.retain = retain;
        if let Some(tag) = tag {
            packet.qos = QoS::AtLeastOnce;
            packet.pkid = self.allocate_pkid();
            self.inflight.insert(packet.pkid, tag);
        }
        self.send(&Packet::Publish(packet));
        self.is_up()
    }

    /// A clean goodbye: DISCONNECT (so the broker drops the will), then close.
    pub fn disconnect(&mut self) {
        if self.is_up() {
            self.send(&Packet::Disconnect);
        }
        self.drop_connection();
        self.state = State::Stopped;
    }

    fn resolve(&mut self) {
        let (host, port) = self.opts.route.first_hop();
        log::debug!("resolving {host}:{port}");
        self.resolver.spawn("resolve", move || match (host.as_str(), port).to_socket_addrs() {
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
                log::error!("bug: the client does not send {other:?}");
                return;
            }
        };
        if let Err(e) = encoded {
            log::error!("cannot encode MQTT packet: {e:?}");
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

    /// Reads and decodes until the socket has nothing more, a bounded batch at a time.
    fn read_packets(&mut self) {
        loop {
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
            if let Err(e) = self.decode_packets() {
                return self.fail(e);
            }
            match end {
                ReadEnd::More => continue,
                ReadEnd::WouldBlock => return,
                ReadEnd::Closed => {
                    if !matches!(self.state, State::Idle { .. } | State::Stopped) {
                        self.fail("broker closed the connection".into());
                    }
                    return;
                }
            }
        }
    }

    fn decode_packets(&mut self) -> Result<(), String> {
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
                Err(e) => return Err(format!("MQTT: malformed packet from the broker: {e:?}")),
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
                if let Some(tag) = self.inflight.remove(&ack.pkid) {
                    self.events.push_back(Event::Acked(tag));
                }
            }
            Packet::SubAck(ack) => {
                if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    log::warn!("broker refused a subscription (not authorised by its ACL?)");
                }
            }
            Packet::PingResp => log::trace!("pong"),
            other => log::debug!("ignoring {other:?} from the broker"),
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
        log::info!("connected to {}", self.opts.route.broker);
        if !self.opts.subscriptions.is_empty() {
            let filters = self
                .opts
                .subscriptions
                .iter()
                .map(|f| v4::SubscribeFilter::new(f.clone(), self.opts.subscription_qos));
            let mut subscribe = v4::Subscribe::new_many(filters);
            subscribe.pkid = self.allocate_pkid();
            self.send(&Packet::Subscribe(subscribe));
        }
        self.events.push_back(Event::Connected);
        Ok(())
    }

    fn allocate_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
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
        let delay = backoff(self.opts.reconnect_min, self.opts.reconnect_max, self.failures);
        self.failures = self.failures.saturating_add(1);
        log::warn!("{}: {reason}; retrying in {:.1} s", self.opts.route.broker, delay.as_secs_f64());
        self.drop_connection();
        self.state = State::Idle { retry_at: Instant::now() + delay };
    }

    fn drop_connection(&mut self) {
        let was_up = self.is_up();
        self.state = State::Idle { retry_at: Instant::now() };
        self.inflight.clear();
        self.inbuf = BytesMut::new();
        self.skip = None;
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
        other => format!("MQTT: broker refused the connection: {other:?}"),
    }
}

/// Exponential backoff from `min` doubling to `max`, with jitter in [d/2, d] so a fleet that
/// lost its broker at once does not come back at once.
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let full = min.saturating_mul(1u32 << failures.min(16)).min(max);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let seed = (nanos as u64 ^ (std::process::id() as u64) << 17).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let fraction = 0.5 + (seed >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
    full.mul_f64(fraction).max(min.min(full))
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
