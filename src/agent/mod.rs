//! The agent's event loop: one thread owns the broker connection and every capability; it
//! sleeps until a socket, a timer, a worker or a signal needs it.

mod commands;
pub mod files;
pub mod firewall;
mod heartbeat;
pub mod identity;
mod ledger;
pub mod logs;
mod outbox;
pub mod remote;
mod trust;
pub mod update;

use mio::{Events, Poll, Token, Waker};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::net::client::{Client, ClientOptions, Event, Will};
use crate::net::options::BrokerInputs;
use crate::protocol::{Status, Topics};
use crate::signals::{Signal, Signals};
use crate::trust::DeviceKey;
use commands::{Commands, Context};
use firewall::Firewall;
use heartbeat::Heartbeat;
use outbox::{Kind, Outbox};
use remote::Remote;
use trust::Trust;
use update::Updates;

pub use trust::check_operators;

const BROKER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);

/// Tags for publishes acknowledged outside the outbox (outbox ids start at 1).
const ONLINE_TAG: u64 = u64::MAX - 1;
const OFFLINE_TAG: u64 = u64::MAX;
/// How long a clean stop waits for the broker to take the offline status.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// The online status is published again every this many heartbeat intervals (5 min at the
/// default 25 s): see `Agent::on_status_timer`.
const STATUS_REFRESH_BEATS: u32 = 12;
/// Incoming packets bigger than this are skipped (commands are far smaller).
const MAX_PACKET: usize = 256 * 1024;

/// How the agent's loop ended.
pub enum Exit {
    Stopped,
    /// A new agent binary is to run on probation, guarded by this process.
    Probation(update::probation::Plan),
}

pub struct Agent {
    config_path: PathBuf,
    config: Config,
    topics: Topics,
    poll: Poll,
    signals: Signals,
    client: Client,
    /// What the running connection was made from, to tell on SIGHUP whether it must be redone.
    broker_inputs: BrokerInputs,
    outbox: Outbox,
    heartbeat: Heartbeat,
    commands: Commands,
    trust: Trust,
    remote: Remote,
    updates: Updates,
    firewall: Firewall,
    /// Signs the device's answers; in its status for operators to pin. None when it could not
    /// be read or made (the agent runs on, its answers unsigned).
    device_key: Option<Arc<DeviceKey>>,
    /// When the current connection came up (unix seconds), for the status's `since`.
    online_since: u64,
    /// When to publish the online status again, while connected.
    status_refresh_at: Option<Instant>,
    /// Set by SIGTERM.
    stop: Option<Stop>,
    /// Set by SIGUSR1 from the guard of this agent's probation: it passed.
    handing_back: bool,
}

/// A clean stop under way: the offline status is offered to the client until it has room for
/// it, then awaited until the broker acknowledges it, both within `STOP_GRACE`.
struct Stop {
    deadline: Instant,
    offline: OfflineStatus,
}

#[derive(PartialEq)]
enum OfflineStatus {
    Unsent,
    Sent,
    Acked,
}

impl Agent {
    /// `probation` is set when this agent is a new binary on probation (see `update::probation`).
    pub fn new(
        config_path: PathBuf,
        config: Config,
        probation: update::probation::Reporter,
    ) -> Result<Agent, String> {
        let device = identity::device_id(&config)?;
        let topics = Topics::new(&config.topic_root, &device);
        crate::fsutil::secure_private_dir(&config.state_dir)
            .map_err(|e| format!("state_dir {}: {e}", config.state_dir.display()))?;
        let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| format!("waker: {e}"))?);
        let signals = Signals::install(poll.registry(), SIGNALS).map_err(|e| format!("signals: {e}"))?;
        signals.watch_child_exits().map_err(|e| format!("signals: {e}"))?;
        if probation.on_probation() {
            signals.watch_hand_over().map_err(|e| format!("signals: {e}"))?;
        }
        let mut outbox = Outbox::open(&config.state_dir.join("outbox"), config.offline_buffer.clone())
            .map_err(|e| format!("outbox in {}: {e}", config.state_dir.display()))?;
        let heartbeat =
            Heartbeat::new(&config.heartbeat, topics.heartbeat(), &config.state_dir, Arc::clone(&waker));
        let trust = Trust::new(topics.device(), &config.trust);
        let device_key = trust::device_key(&config.trust, &config.state_dir)
            .map_err(|e| log::error!("{e}: this device's answers will not be signed"))
            .ok();
        let mut commands =
            Commands::new(topics.clone(), &config.state_dir, Arc::clone(&waker), device_key.clone());
        for leftover in files::cleanup_at_start(&config.state_dir) {
            log::info!("removed the temp file of an unfinished put: {}", leftover.display());
        }
        let remote = Remote::new(topics.clone(), &config, Arc::clone(&waker));
        let settings = update::Settings::of(&config, &config_path);
        let mut updates = Updates::new(settings, topics.clone(), Arc::clone(&waker), probation);
        let resumed_update = updates.resume();
        // Before connecting: a firewall change left unconfirmed is reverted now.
        let mut firewall = Firewall::new(firewall::Settings::of(&config), topics.clone(), Arc::clone(&waker));
        if let Some((id, state)) = firewall.start() {
            commands.settle_firewall(&id, state);
        }
        commands.recover(&mut outbox, &trust, resumed_update.as_deref());
        // Read before the options: a file replaced in between makes the next SIGHUP reconnect
        // once for nothing, rather than miss a change.
        let broker_inputs = BrokerInputs::read(&config.broker);
        let client =
            Client::new(client_options(&config, &topics, &commands, device_key.as_deref())?, waker, BROKER);
        log::info!("tether-agent {} ({}) starting as device {device}", crate::VERSION, crate::TARGET);
        Ok(Agent {
            config_path,
            config,
            topics,
            poll,
            signals,
            client,
            broker_inputs,
            outbox,
            heartbeat,
            commands,
            trust,
            remote,
            updates,
            firewall,
            device_key,
            online_since: 0,
            status_refresh_at: None,
            stop: None,
            handing_back: false,
        })
    }

    pub fn run(mut self) -> Result<Exit, String> {
        #[cfg(tether_fault = "crash_at_start")]
        {
            log::error!("this build crashes at start on purpose (TETHER_FAULT=crash_at_start)");
            std::process::abort();
        }
        let mut events = Events::with_capacity(16);
        loop {
            let timeout = self.next_deadline().map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(format!("poll: {e}"));
                }
            }
            for event in events.iter() {
                match event.token() {
                    BROKER => self.client.on_socket(self.poll.registry(), event),
                    WAKER => self.on_wake(),
                    SIGNALS => self.on_signals(),
                    token if Remote::owns(token) => self.remote.on_event(token, self.poll.registry()),
                    _ => {}
                }
            }
            self.on_timers(Instant::now());
            self.dispatch_client_events();
            // Before the commit: the ledger writes these final states before the outbox sends them.
            for (id, state) in self.updates.take_finished() {
                self.commands.finish_update(&id, state, &mut self.outbox);
            }
            for (id, state) in self.firewall.take_finished() {
                self.commands.finish_firewall(&id, state, &mut self.outbox);
            }
            self.commands.commit(&mut self.outbox, &mut self.trust, &mut self.updates, &mut self.firewall);
            if self.firewall.take_reconnect() && self.stop.is_none() {
                log::info!("firewall: connecting afresh");
                self.client.reconnect_now();
                self.dispatch_client_events();
            }
            if let Some(plan) = self.updates.take_handover() {
                self.hand_over("the new agent, for its probation");
                return Ok(Exit::Probation(plan));
            }
            if self.handing_back {
                self.hand_over("the guard, which runs this binary on (probation passed)");
                return Ok(Exit::Stopped);
            }
            if self.stop.is_none() {
                self.firewall.pump(&mut self.client);
                self.outbox.pump(&mut self.client);
                self.remote.pump(&mut self.client, self.poll.registry());
                if self.outbox.take_refusals_to_redo() {
                    log::info!("reading the refused requests again, to answer those dropped for room");
                    self.client.resubscribe();
                }
            } else {
                self.remote.pump(&mut self.client, self.poll.registry());
                self.send_offline_status();
            }
            if self.stopped() {
                return Ok(Exit::Stopped);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.client.next_deadline(),
            self.heartbeat.next_deadline(),
            self.outbox.next_deadline(),
            self.stop.as_ref().map(|stop| stop.deadline),
            self.status_refresh_at,
            self.remote.next_deadline(self.client.bulk_room() > 0),
            self.updates.next_deadline(),
            self.firewall.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timers(&mut self, now: Instant) {
        // A build that never connects, on purpose: the client never starts.
        if !cfg!(tether_fault = "no_connect") {
            self.client.on_timer(self.poll.registry(), now);
        }
        self.outbox.on_timer(now);
        self.on_status_timer(now);
        self.remote.on_timer(self.poll.registry(), now);
        self.updates.on_timer(now, &mut self.outbox);
        self.firewall.on_timer(now);
        if self.stop.is_none() {
            // A failure is logged where it happens; the next interval tries again.
            let _ = self.heartbeat.on_timer(now, &self.outbox);
        }
    }

    fn on_wake(&mut self) {
        self.client.on_wake(self.poll.registry());
        let queued = self.heartbeat.on_wake(&mut self.outbox);
        self.commands.on_heartbeats_queued(&queued, &mut self.outbox);
        self.commands.on_wake(&mut self.outbox);
        self.updates.on_wake();
        self.firewall.on_wake();
    }

    fn on_signals(&mut self) {
        for signal in self.signals.drain() {
            match signal {
                Signal::Reload => self.reload(),
                Signal::Terminate => self.begin_stop(),
                Signal::Child => self.remote.on_child_exit(),
                Signal::HandOver => self.handing_back = true,
                Signal::Resize => {}
            }
        }
    }

    fn dispatch_client_events(&mut self) {
        while let Some(event) = self.client.next_event() {
            match event {
                Event::Connected => self.on_connected(),
                Event::Disconnected => {
                    log::info!("disconnected; {} message(s) waiting in the outbox", self.outbox.len());
                    self.outbox.on_disconnected();
                    self.status_refresh_at = None;
                }
                Event::Message(publish) if publish.topic == self.topics.status() => {
                    self.on_own_status(&publish.payload)
                }
                Event::Message(publish) if self.topics.parse_tunnel(&publish.topic).is_some() => {
                    self.remote.on_frame(&publish.topic, &publish.payload, self.poll.registry())
                }
                Event::Message(publish) => {
                    let mut ctx = Context {
                        outbox: &mut self.outbox,
                        heartbeat: &mut self.heartbeat,
                        config: &self.config,
                        trust: &mut self.trust,
                        remote: &mut self.remote,
                        updates: &self.updates,
                        firewall: &mut self.firewall,
                        registry: self.poll.registry(),
                    };
                    self.commands.on_message(&publish.topic, &publish.payload, &mut ctx);
                }
                Event::Oversized { topic, size } => {
                    self.commands.on_oversized(&topic, size, &mut self.outbox)
                }
                Event::Acked(OFFLINE_TAG) => {
                    if let Some(stop) = &mut self.stop {
                        stop.offline = OfflineStatus::Acked;
                    }
                }
                Event::Acked(ONLINE_TAG) => log::debug!("online status acknowledged"),
                Event::Acked(firewall::PROBE_TAG) => self.firewall.on_probe_acked(&mut self.outbox),
                Event::Acked(id) => {
                    if let Some((Kind::CommandState, topic)) = self.outbox.on_ack(id) {
                        self.commands.on_acked(&topic);
                    }
                }
            }
        }
    }

    fn on_connected(&mut self) {
        self.updates.on_connected();
        #[cfg(tether_fault = "hang_after_connect")]
        loop {
            // A build whose loop hangs once connected, on purpose (TETHER_FAULT).
            std::thread::sleep(Duration::from_secs(3600));
        }
        self.outbox.on_connected();
        self.firewall.on_connected();
        self.remote.on_reconnect();
        self.online_since = unix_seconds();
        self.publish_online();
        self.status_refresh_at = Some(Instant::now() + self.status_refresh_interval());
        for topic in self.commands.adverts() {
            self.client.publish(&topic, b"{}", true, None);
        }
        if !self.outbox.is_empty() {
            log::info!("sending {} queued message(s)", self.outbox.len());
        }
    }

    /// The retained status can say offline while the device is connected without the device
    /// ever reading it: a late will that a broker does not deliver back (aedes' duplicate
    /// filter, docs/brokers.md), or an ACL that lets the device write its status but not read
    /// it. Publishing it again now and then puts it right on any broker.
    fn on_status_timer(&mut self, now: Instant) {
        if self.status_refresh_at.is_none_or(|at| now < at) {
            return;
        }
        self.status_refresh_at = Some(now + self.status_refresh_interval());
        if self.client.is_up() && self.stop.is_none() {
            self.publish_online();
        }
    }

    fn status_refresh_interval(&self) -> Duration {
        Duration::from_secs(self.config.heartbeat.interval_s) * STATUS_REFRESH_BEATS
    }

    fn publish_online(&mut self) {
        let status = Status { online: true, since: Some(self.online_since), ..Status::offline() };
        let status = trust::with_key(status, self.device_key.as_deref());
        self.client.publish(&self.topics.status(), &status.to_payload(), true, Some(ONLINE_TAG));
    }

    /// The device's own status, read back. `{"online":false}` while it is connected is a will
    /// published late: by a cluster node for a connection this device left for another node,
    /// or by whoever may write there. Operators must not see a live device offline.
    fn on_own_status(&mut self, payload: &[u8]) {
        let says_offline = serde_json::from_slice::<Status>(payload).is_ok_and(|s| !s.online);
        if says_offline && self.stop.is_none() && self.client.is_up() {
            log::warn!(
                "the broker shows this device offline while it is connected: publishing its status again"
            );
            self.publish_online();
        }
    }

    /// SIGHUP: adopt a new config if it is valid, keep the old one otherwise.
    fn reload(&mut self) {
        log::info!("reload requested (SIGHUP): reading {}", self.config_path.display());
        let new = match Config::load(&self.config_path) {
            Ok(new) => new,
            Err(e) => return log::error!("reload refused, keeping the running config: {e}"),
        };
        if new.device_id != self.config.device_id
            || new.topic_root != self.config.topic_root
            || new.state_dir != self.config.state_dir
        {
            return log::error!(
                "reload refused: device_id, topic_root and state_dir take effect only on restart"
            );
        }
        let broker_inputs = BrokerInputs::read(&new.broker);
        let mut changed = broker_inputs.changed_since(&self.broker_inputs);
        if serde_json::to_value(&new.reconnect).ok() != serde_json::to_value(&self.config.reconnect).ok() {
            changed.push("reconnect settings");
        }
        if !changed.is_empty() {
            match client_options(&new, &self.topics, &self.commands, self.device_key.as_deref()) {
                Ok(opts) => {
                    log::info!("{} changed: reconnecting", changed.join(", "));
                    self.client.reconfigure(opts);
                    self.outbox.on_disconnected();
                    self.broker_inputs = broker_inputs;
                }
                Err(e) => return log::error!("reload refused, keeping the running config: {e}"),
            }
        }
        // Config::load refused a bad level already.
        let _ = crate::logging::set_config_level(new.log_level.as_deref());
        self.heartbeat.reconfigure(&new.heartbeat);
        self.outbox.set_limits(new.offline_buffer.clone());
        self.trust.reload(&new.trust);
        self.remote.reconfigure(&new);
        self.updates.reconfigure(update::Settings::of(&new, &self.config_path));
        self.firewall.reconfigure(firewall::Settings::of(&new));
        self.config = new;
        log::info!("config reloaded");
    }

    fn begin_stop(&mut self) {
        if self.stop.is_some() {
            return;
        }
        log::info!("stopping");
        self.remote.stop(self.poll.registry());
        self.stop = Some(Stop { deadline: Instant::now() + STOP_GRACE, offline: OfflineStatus::Unsent });
        self.send_offline_status();
        if self.client.is_up() && self.stop.as_ref().is_some_and(|s| s.offline == OfflineStatus::Unsent) {
            log::info!("the offline status waits for room in the send queue");
        }
    }

    /// Publishes the offline status once the client has room for it (its send queue is
    /// bounded: a slow link can hold it back for a while).
    fn send_offline_status(&mut self) {
        let Some(stop) = &mut self.stop else { return };
        if stop.offline == OfflineStatus::Unsent && self.client.can_publish() {
            let payload = trust::with_key(Status::offline(), self.device_key.as_deref()).to_payload();
            if self.client.publish(&self.topics.status(), &payload, true, Some(OFFLINE_TAG)) {
                stop.offline = OfflineStatus::Sent;
            }
        }
    }

    /// Leaves the connection to another agent process: a clean goodbye (no offline status: the
    /// device is back within seconds), the state kept for it.
    fn hand_over(&mut self, to: &str) {
        log::info!("handing over to {to}");
        self.remote.stop(self.poll.registry());
        self.client.disconnect();
        self.firewall.on_stop();
        self.outbox.store_all();
        self.heartbeat.on_stop();
    }

    /// Whether the stop is done: the broker has the offline status, the connection is gone
    /// (the broker published the will), or the grace is over.
    fn stopped(&mut self) -> bool {
        let Some(stop) = &self.stop else { return false };
        let acked = stop.offline == OfflineStatus::Acked;
        if !acked && self.client.is_up() && Instant::now() < stop.deadline {
            return false;
        }
        if acked {
            self.client.disconnect();
        } else {
            // A DISCONNECT would make the broker drop the will: the retained status would stay
            // online.
            if self.client.is_up() {
                log::warn!(
                    "the broker did not take the offline status within {} s: closing without a goodbye, \
                     so that it publishes the last will",
                    STOP_GRACE.as_secs()
                );
            }
            self.client.close_leaving_will();
        }
        self.firewall.on_stop();
        self.outbox.store_all();
        self.heartbeat.on_stop();
        log::info!("stopped; {} message(s) kept in the outbox for next time", self.outbox.len());
        true
    }
}

/// Everything the MQTT client needs from the config; fails on unreadable TLS or password files.
fn client_options(
    config: &Config,
    topics: &Topics,
    commands: &Commands,
    device_key: Option<&DeviceKey>,
) -> Result<ClientOptions, String> {
    let offline = trust::with_key(Status::offline(), device_key);
    Ok(ClientOptions {
        will: Some(Will { topic: topics.status(), payload: offline.to_payload(), retain: true }),
        // Commands are retained: one lost on a dropped link comes again with the next
        // subscription. QoS 0, because Mosquitto queues at most `max_queued_messages` QoS 1
        // messages for a client (see docs/brokers.md for what it does at QoS 0).
        subscriptions: vec![commands.filter(), topics.status(), topics.tunnel_filter()],
        subscription_qos: mqttbytes::QoS::AtMostOnce,
        reconnect_min: Duration::from_secs(config.reconnect.min_s),
        reconnect_max: Duration::from_secs(config.reconnect.max_s),
        max_packet: MAX_PACKET,
        ..ClientOptions::for_broker(&config.broker, topics.device().to_string())?
    })
}

pub(crate) fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
