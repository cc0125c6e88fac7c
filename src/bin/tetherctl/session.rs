//! One connection to the broker, driven by a mio loop like the agent's, but step by step: each
//! subcommand asks for the next thing that happens (`next`) and reacts to it in plain sequence.

use mio::{Events, Poll, Token, Waker};
use mqttbytes::v4::Publish;
use mqttbytes::QoS;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tether::net::client::{Client, ClientOptions, Event, Will};
use tether::signals::{Signal, Signals};

use crate::settings::Settings;
use crate::{exit, Failure};

const BROKER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);
/// The first token free for the caller's own descriptors.
pub const FIRST_FREE_TOKEN: usize = 16;

/// Retries while connecting come quickly: someone is waiting at the terminal.
const RECONNECT_MIN: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long the broker may stay silent before the end marker comes, read after read: a long
/// burst of retained messages is fine as long as it keeps coming. See `Session::retained`.
const MARKER_SILENCE_LIMITS: [Duration; 3] =
    [Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(5)];
const MARKER_PAYLOAD: &[u8] = b"end of the retained messages (tetherctl)";
/// How long a read goes on after the end marker, until no retained message came for this
/// long: brokers that stream retained messages after the SUBACK, in no particular order, send
/// the marker early (aedes sends exact topics first: the marker is the first to come). Its
/// stream has gaps of 40 ms at most under load.
const SETTLE: Duration = Duration::from_millis(300);

pub enum Input {
    Client(Event),
    /// SIGINT, SIGTERM or SIGHUP.
    Interrupted,
    TimedOut,
    /// A descriptor the caller registered (`registry`) under this token is ready.
    Ready(Token),
    /// SIGWINCH, once asked for (`watch_resize`).
    Resized,
    /// From `next_turn`: one round of polling happened (the socket may have room again).
    Turn,
}

/// How the session subscribes: `Snapshot` (QoS 0) for reading the retained messages of a whole
/// fleet, which Mosquitto would cut at `max_queued_messages` at QoS 1; `Live` (QoS 1) for
/// messages that must not be lost while they come one by one.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    Snapshot,
    Live,
}

pub struct Session {
    poll: Poll,
    events: Events,
    signals: Signals,
    client: Client,
    interrupted: bool,
    resized: bool,
    /// Tokens of the caller's descriptors that became ready, not returned yet.
    ready: std::collections::VecDeque<Token>,
    /// The topic of the end marker: see `retained`.
    marker: String,
    settings: Settings,
}

impl Session {
    /// Connects and subscribes; fails with exit 3 when the broker cannot be reached within the
    /// connect timeout (the client has logged why at each attempt), or 78 at once when the
    /// broker's certificate fails verification.
    pub fn connect(settings: &Settings, subscriptions: Vec<String>, mode: Mode) -> Result<Session, Failure> {
        Session::connect_with_will(settings, subscriptions, mode, None)
    }

    /// `connect`, with a last will the broker publishes should tetherctl vanish.
    pub fn connect_with_will(
        settings: &Settings,
        subscriptions: Vec<String>,
        mode: Mode,
        will: Option<Will>,
    ) -> Result<Session, Failure> {
        let client_id = client_id();
        let marker = format!("{}/_tetherctl/end", settings.topic_root);
        let opts = ClientOptions {
            subscriptions,
            will,
            end_marker: Some((marker.clone(), MARKER_PAYLOAD.to_vec())),
            connect_timeout: settings
                .connect_timeout
                .min(Duration::from_secs(settings.broker.connect_timeout_s)),
            reconnect_min: RECONNECT_MIN,
            reconnect_max: RECONNECT_MAX,
            subscription_qos: match mode {
                Mode::Snapshot => QoS::AtMostOnce,
                Mode::Live => QoS::AtLeastOnce,
            },
            give_up_on_rejected_certificate: true,
            ..ClientOptions::for_broker(&settings.broker, client_id)
                .map_err(|e| Failure::config(settings.name_source(e)))?
        };
        let broker = opts.routes[0].broker.to_string();
        let poll = Poll::new().map_err(|e| Failure::error(format!("poll: {e}")))?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(|e| Failure::error(format!("waker: {e}")))?;
        let signals = Signals::install(poll.registry(), SIGNALS)
            .map_err(|e| Failure::error(format!("signals: {e}")))?;
        let client = Client::new(opts, Arc::new(waker), BROKER);
        let mut session = Session {
            poll,
            events: Events::with_capacity(16),
            signals,
            client,
            interrupted: false,
            resized: false,
            ready: std::collections::VecDeque::new(),
            marker,
            settings: settings.clone(),
        };

        let deadline = Instant::now() + settings.connect_timeout;
        loop {
            match session.next(Some(deadline))? {
                Input::Client(Event::Connected) => return Ok(session),
                Input::Client(_) | Input::Ready(_) | Input::Resized | Input::Turn => {}
                Input::Interrupted => return Err(Failure::interrupted()),
                Input::TimedOut => {
                    let secs = settings.connect_timeout.as_secs_f64();
                    return Err(Failure {
                        code: exit::NO_BROKER,
                        message: format!("could not connect to {broker} within {secs} s"),
                    });
                }
            }
        }
    }

    /// The next thing that happens: an event of the client, a signal, or `deadline` passing.
    pub fn next(&mut self, deadline: Option<Instant>) -> Result<Input, Failure> {
        self.next_filtered(deadline, false)
    }

    /// `next`, or `Input::Turn` after one round of polling: for a caller that moves bulk data,
    /// which must send more as soon as the socket takes it.
    pub fn next_turn(&mut self, deadline: Option<Instant>) -> Result<Input, Failure> {
        self.next_filtered(deadline, true)
    }

    fn next_filtered(&mut self, deadline: Option<Instant>, one_turn: bool) -> Result<Input, Failure> {
        loop {
            match self.next_with_marker(deadline, one_turn)? {
                Input::Client(Event::Message(p)) if p.topic == self.marker => {}
                input => return Ok(input),
            }
        }
    }

    fn next_with_marker(&mut self, deadline: Option<Instant>, one_turn: bool) -> Result<Input, Failure> {
        let mut polled = false;
        loop {
            if let Some(why) = self.client.gave_up() {
                let why = self.settings.name_source(why.to_string());
                return Err(Failure::config(format!("{}: {why}", self.settings.broker.url)));
            }
            if std::mem::take(&mut self.interrupted) {
                return Ok(Input::Interrupted);
            }
            if std::mem::take(&mut self.resized) {
                return Ok(Input::Resized);
            }
            if let Some(token) = self.ready.pop_front() {
                return Ok(Input::Ready(token));
            }
            if let Some(event) = self.client.next_event() {
                return Ok(Input::Client(event));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(Input::TimedOut);
            }
            if one_turn && polled {
                return Ok(Input::Turn);
            }
            polled = true;
            let wake = [self.client.next_deadline(), deadline].into_iter().flatten().min();
            let timeout = wake.map(|w| w.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut self.events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Failure::error(format!("poll: {e}")));
                }
            }
            let registry = self.poll.registry();
            for event in self.events.iter() {
                match event.token() {
                    BROKER => self.client.on_socket(registry, event),
                    WAKER => self.client.on_wake(registry),
                    SIGNALS => {
                        for signal in self.signals.drain() {
                            match signal {
                                Signal::Resize => self.resized = true,
                                _ => self.interrupted = true,
                            }
                        }
                    }
                    token => self.ready.push_back(token),
                }
            }
            self.client.on_timer(registry, Instant::now());
        }
    }

    /// For the caller's own descriptors, under tokens from `FIRST_FREE_TOKEN` up.
    pub fn registry(&self) -> &mio::Registry {
        self.poll.registry()
    }

    /// SIGWINCH comes as `Input::Resized` from now on.
    pub fn watch_resize(&self) -> Result<(), Failure> {
        self.signals.watch_resize().map_err(|e| Failure::error(format!("SIGWINCH: {e}")))
    }

    /// Bulk data (tunnel frames): QoS 0, only while `bulk_room` is not 0.
    pub fn publish_bulk(&mut self, topic: &str, payload: &[u8]) -> bool {
        self.client.publish_bulk(topic, payload)
    }

    pub fn bulk_room(&self) -> usize {
        self.client.bulk_room()
    }

    pub fn is_up(&self) -> bool {
        self.client.is_up()
    }

    /// With a tag the publish goes at QoS 1 and `Event::Acked(tag)` follows. False when not
    /// connected: nothing was sent.
    pub fn publish(&mut self, topic: &str, payload: &[u8], retain: bool, tag: Option<u64>) -> bool {
        self.client.publish(topic, payload, retain, tag)
    }

    /// Publishes at QoS 1 and waits until the broker has it, publishing again after a
    /// reconnect. False if `within` passes or a signal comes first. Whatever else arrives
    /// meanwhile is dropped.
    pub fn publish_confirmed(
        &mut self,
        topic: &str,
        payload: &[u8],
        retain: bool,
        within: Duration,
    ) -> Result<bool, Failure> {
        const TAG: u64 = u64::MAX - 1;
        let deadline = Instant::now() + within;
        self.publish(topic, payload, retain, Some(TAG));
        loop {
            match self.next(Some(deadline))? {
                Input::Client(Event::Acked(TAG)) => return Ok(true),
                Input::Client(Event::Connected) => {
                    self.publish(topic, payload, retain, Some(TAG));
                }
                Input::Client(_) | Input::Ready(_) | Input::Resized | Input::Turn => {}
                Input::Interrupted | Input::TimedOut => return Ok(false),
            }
        }
    }

    /// The messages retained on the session's subscriptions (and any published meanwhile), in
    /// the order the broker sent them; an empty payload means the topic was cleared. The end
    /// marker, subscribed last, comes after them on Mosquitto; `SETTLE` covers brokers that
    /// send it early. Mosquitto drops QoS 0 messages to a client
    /// that falls `max_queued_messages` behind, a burst's tail first: over WebSockets all but the
    /// first 1000, over TCP those that come while a stalled reader is behind. The marker is
    /// dropped with them, so when it does not come everything is read again; fails rather than
    /// return a part when it never does.
    pub fn retained(&mut self) -> Result<Vec<Publish>, Failure> {
        let reads = MARKER_SILENCE_LIMITS.len();
        for (read, silence) in MARKER_SILENCE_LIMITS.into_iter().enumerate() {
            if read > 0 {
                self.client.resubscribe();
            }
            if let Some(messages) = self.read_retained(silence)? {
                return Ok(messages);
            }
            log::info!(
                "no end marker after {} s of silence (read {} of {reads}): the broker may have dropped \
                 messages to tetherctl; reading again",
                silence.as_secs(),
                read + 1
            );
        }
        Err(Failure::error(format!(
            "the end marker on {} never came ({reads} reads): the list would be incomplete. Does the \
             broker's ACL let tetherctl publish and subscribe there? Mosquitto drops messages to a \
             client that falls max_queued_messages behind, over WebSockets after 1000: for a large \
             fleet, raise it above twice the number of devices (see docs/brokers.md)",
            self.marker
        )))
    }

    /// One read: until the end marker came and then no retained message for `SETTLE`; None
    /// after `silence` without the marker. Halfway through the silence a PINGREQ nudges the
    /// broker: a burst's tail held back on either side (seen once under load: Mosquitto logged
    /// the marker sent and tetherctl heard nothing for 5 s) comes before its answer.
    fn read_retained(&mut self, silence: Duration) -> Result<Option<Vec<Publish>>, Failure> {
        let mut messages = Vec::new();
        let mut marker_seen = false;
        let mut last_retained = Instant::now();
        let mut last_heard = Instant::now();
        let mut pinged = false;
        loop {
            let deadline = match (marker_seen, pinged) {
                (true, _) => last_retained + SETTLE,
                (false, false) => last_heard + silence / 2,
                (false, true) => last_heard + silence,
            };
            let input = self.next_with_marker(Some(deadline), false)?;
            if matches!(input, Input::Client(_)) {
                last_heard = Instant::now();
            }
            match input {
                // Only the copy sent on subscribing is flagged retained: another tetherctl
                // publishing the marker meanwhile sends it live.
                Input::Client(Event::Message(p)) if p.topic == self.marker => {
                    if p.retain {
                        marker_seen = true;
                        last_retained = Instant::now();
                    }
                }
                Input::Client(Event::Message(p)) => {
                    if p.retain {
                        last_retained = Instant::now();
                    }
                    messages.push(p);
                }
                // Reconnected: the client subscribed again, the retained messages come again.
                Input::Client(Event::Connected) => {
                    messages.clear();
                    marker_seen = false;
                }
                Input::Client(Event::Oversized { topic, size }) => {
                    log::warn!("{topic}: skipped a message of {size} bytes, too big")
                }
                Input::Client(_) | Input::Ready(_) | Input::Resized | Input::Turn => {}
                Input::Interrupted => return Err(Failure::interrupted()),
                Input::TimedOut if !marker_seen && !pinged => {
                    self.client.ping();
                    pinged = true;
                }
                Input::TimedOut => return Ok(marker_seen.then_some(messages)),
            }
        }
    }

    /// A clean goodbye.
    pub fn close(mut self) {
        self.client.disconnect();
    }
}

/// What is retained on `filters` now: see `Session::retained`.
pub fn snapshot(settings: &Settings, filters: Vec<String>) -> Result<Vec<Publish>, Failure> {
    let mut session = Session::connect(settings, filters, Mode::Snapshot)?;
    let messages = session.retained()?;
    session.close();
    Ok(messages)
}

/// Unique, so two tetherctls never take each other's connection; 22 characters.
fn client_id() -> String {
    format!("tetherctl-{:012x}", tether::random::u64() >> 16)
}

/// A command id no other tetherctl picks, as docs/protocol.md suggests: `<unix-ms>-<random
/// hex>`, one topic level; the time for people reading the topics, 64 random bits so that
/// operators on two machines sending in the same millisecond never pick the same.
pub fn command_id() -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("{ms}-{:016x}", tether::random::u64())
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_ids_are_one_topic_level_and_never_repeat() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| super::command_id()).collect();
        assert_eq!(ids.len(), 1000, "a command id repeated");
        let id = ids.iter().next().unwrap();
        assert!(tether::protocol::check_device_id(id).is_ok() && id.len() <= 64, "{id}");
    }
}
