//! Remote commands: the operator publishes a retained `{"status":"init",...}` on
//! `ROOT/DEVICE/cmd/OP/ID`; the agent answers on the same topic with `executing`, then
//! `successful` or `failed`. The ledger remembers every command started, so a retained request
//! is never run twice, across restarts too, and a reboot is confirmed by the agent that starts
//! after it.
//!
//! Requests that will not run (unknown op, bad parameters, malformed, too big, an id too long,
//! the ledger full) are answered `failed` without being recorded: nothing ran, and the request
//! stays answered on the broker. Whatever arrives on the topic of a command the ledger knows,
//! other than the operator clearing it, changes nothing.

use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;

use super::firewall::{self, Firewall};
use super::heartbeat::Heartbeat;
use super::identity;
use super::ledger::{Key, Ledger, Origin, Phase};
use super::outbox::{Kind, Outbox};
use super::remote::{Opener, Remote};
use super::trust::{Admitted, Trust};
use super::update::flow::Flow;
use super::update::Updates;
use crate::config::Config;
use crate::fsutil::error_text;
use crate::protocol::{
    CommandState, Op, Topics, MAX_COMMAND_BYTES, MAX_COMMAND_ID_BYTES, MAX_OPEN_COMMANDS, OPS,
};
use crate::text::Printable;
use crate::trust::{sha256_hex, Addressed, Answer, DeviceKey, Outcome};
use crate::worker::Workers;

/// What the commands need from the rest of the agent.
pub struct Context<'a> {
    pub outbox: &'a mut Outbox,
    pub heartbeat: &'a mut Heartbeat,
    pub config: &'a Config,
    pub trust: &'a mut Trust,
    pub remote: &'a mut Remote,
    pub updates: &'a Updates,
    pub firewall: &'a mut Firewall,
    pub registry: &'a mio::Registry,
}

pub struct Commands {
    topics: Topics,
    /// The device key that signs final states; None when it could not be read or made.
    signer: Option<Arc<DeviceKey>>,
    ledger: Ledger,
    started: Instant,
    workers: Workers<(Key, CommandState)>,
    /// `heartbeat` commands waiting for their heartbeat to be queued: (id, seq).
    awaiting_heartbeat: Vec<(Key, u64)>,
    /// Commands that change the device, recorded `executing` and carried out once that record
    /// is on disk (`commit`): a crash between the two must not let one run again, and the record
    /// tells at the next start whether it took effect.
    to_start: Vec<(Key, Change)>,
    /// Requests answered with a refusal lately (hashes of topic and payload): the same request
    /// seen again, e.g. in a retained replay that was under way when it was answered, is not
    /// answered twice.
    refused: RecentSet,
}

/// What a command that changes the device does once it is recorded.
enum Change {
    /// Runs the reboot command (argv).
    Reboot(Vec<String>),
    /// Writes authorized_keys (its new text).
    Keys(String),
    /// Begins an update flow (its journal takes over from there).
    Update(Box<Flow>),
    /// Applies a firewall rule set (the firewall's journal takes over from there).
    Firewall(firewall::Request),
}

/// The last `RECENT_REFUSALS` requests refused, as hashes of (topic, payload), in a ring.
struct RecentSet {
    ring: std::collections::VecDeque<(u64, u64)>,
}

const RECENT_REFUSALS: usize = 4096;

impl RecentSet {
    fn contains(&self, topic: &str, payload: &[u8]) -> bool {
        self.ring.contains(&(hash(topic.as_bytes()), hash(payload)))
    }

    fn insert(&mut self, topic: &str, payload: &[u8]) {
        if self.ring.len() == RECENT_REFUSALS {
            self.ring.pop_front();
        }
        self.ring.push_back((hash(topic.as_bytes()), hash(payload)));
    }

    /// The operator cleared the topic: a request sent there again is a new one.
    fn remove_topic(&mut self, topic: &str) {
        let topic = hash(topic.as_bytes());
        self.ring.retain(|(t, _)| *t != topic);
    }
}

fn hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

impl Commands {
    pub fn new(
        topics: Topics,
        state_dir: &std::path::Path,
        waker: Arc<mio::Waker>,
        signer: Option<Arc<DeviceKey>>,
    ) -> Commands {
        Commands {
            topics,
            signer,
            ledger: Ledger::open(state_dir),
            started: Instant::now(),
            workers: Workers::new(waker),
            awaiting_heartbeat: Vec::new(),
            to_start: Vec::new(),
            refused: RecentSet { ring: std::collections::VecDeque::new() },
        }
    }

    /// The subscription that brings this device's commands.
    pub fn filter(&self) -> String {
        self.topics.command_filter()
    }

    /// At start: settles commands a previous run left executing (a reboot is successful if the
    /// boot id changed, a `keys` command if authorized_keys holds its keys; anything else was
    /// cut short), and queues every state the broker may not have, so a final state lost in a
    /// crash is published again.
    /// `resumed_update`: the `update` command whose flow the update journal took up again.
    pub fn recover(&mut self, outbox: &mut Outbox, trust: &Trust, resumed_update: Option<&str>) {
        let boot = identity::boot_id();
        for (key, phase) in self.ledger.unacknowledged() {
            let resumed = key.op == Op::Update && resumed_update == Some(&*key.id);
            if phase == Phase::Executing && !resumed {
                let mark = self.ledger.get(&key).and_then(|r| r.mark.clone());
                let state = match (key.op, mark) {
                    (Op::Reboot, Some(then)) if *then != boot => {
                        CommandState::Successful { result: json!({ "boot_id": boot }) }
                    }
                    (Op::Reboot, _) => CommandState::Failed {
                        reason: "the agent restarted but the system did not reboot".into(),
                    },
                    (Op::Keys, Some(sha256)) if trust.keys_on_disk_sha256().as_deref() == Some(&*sha256) => {
                        CommandState::Successful { result: json!({ "keys": trust.operator_count() }) }
                    }
                    (Op::Update, _) => CommandState::Failed {
                        reason: "interrupted: the agent restarted before the flow's first step (nothing ran)"
                            .into(),
                    },
                    (Op::Firewall, _) => CommandState::Failed {
                        reason: "interrupted: the agent restarted before the command ran (the rules are \
                                 unchanged)"
                            .into(),
                    },
                    (Op::Keys, _) => CommandState::Failed {
                        reason: "interrupted: the agent restarted before authorized_keys was replaced \
                                 (it is unchanged)"
                            .into(),
                    },
                    _ => CommandState::Failed {
                        reason: "interrupted: the agent restarted while it ran".into(),
                    },
                };
                log_state(&key, &state, "from before the restart");
                self.ledger.set_state(&key, state, None, None);
            }
            if let Some(state) = self.ledger.state(&key) {
                outbox.push(Kind::CommandState, self.topic(&key), self.state_payload(&key, &state), true);
            }
        }
        // A failure is logged; the states are written at the next successful flush.
        let _ = self.commit_ledger();
    }

    /// Retained `{}` on `ROOT/DEVICE/cmd/OP` for each op this agent runs.
    pub fn adverts(&self) -> Vec<String> {
        OPS.iter().map(|spec| self.topics.command_op(spec.name)).collect()
    }

    pub fn on_message(&mut self, topic: &str, payload: &[u8], ctx: &mut Context) {
        let Some((op_name, id)) = self.topics.parse_command(topic) else { return };
        let key =
            Op::from_name(op_name).filter(|_| id.len() <= MAX_COMMAND_ID_BYTES).map(|op| Key::new(op, id));
        if let Some(key) = key.as_ref().filter(|k| self.ledger.get(k).is_some()) {
            return self.on_known(key, payload, ctx.outbox);
        }
        if payload.is_empty() {
            return self.refused.remove_topic(topic); // an unknown command cleared
        }
        let request = match self.read_request(topic, id, payload) {
            Ok(Some(params)) => params,
            Ok(None) => return,
            Err(reason) => return self.refuse(topic, payload, op_name, id, reason, ctx.outbox),
        };
        let Some(key) = key else {
            let names: Vec<&str> = OPS.iter().map(|s| s.name).collect();
            let reason = format!("unknown op \"{op_name}\" (this agent runs: {})", names.join(", "));
            return self.refuse(topic, payload, op_name, id, reason, ctx.outbox);
        };
        if let Some(until) = self.ledger.replay_refused_until(&key, super::unix_seconds()) {
            let reason = format!(
                "this id ran already and was cleared: a request under it is refused until {until} (unix \
                 time, trust.max_age_s after it was signed): send it under a new id"
            );
            return self.refuse(topic, payload, op_name, id, reason, ctx.outbox);
        }
        let admitted = match ctx.trust.admit(op_name, id, request) {
            Ok(admitted) => admitted,
            Err(reason) => return self.refuse(topic, payload, op_name, id, reason, ctx.outbox),
        };
        if let Err(reason) = key.op.spec().check_params(&admitted.params) {
            return self.refuse(topic, payload, op_name, id, reason, ctx.outbox);
        }
        if self.ledger.is_full() {
            let reason = format!(
                "too many commands not cleared ({MAX_OPEN_COMMANDS}): clear finished ones (empty retained \
                 message on their topic) and send this again under a new id"
            );
            return self.refuse(topic, payload, op_name, id, reason, ctx.outbox);
        }
        self.execute(key, admitted, ctx);
    }

    /// A command too big to read at all.
    pub fn on_oversized(&mut self, topic: &str, size: usize, outbox: &mut Outbox) {
        let Some((op_name, id)) = self.topics.parse_command(topic) else { return };
        let known = self.key_of(topic).is_some_and(|key| self.ledger.get(&key).is_some());
        if !known {
            self.refuse(topic, &size.to_le_bytes(), op_name, id, too_large(size), outbox);
        }
    }

    /// The broker acknowledged a command state the outbox sent.
    pub fn on_acked(&mut self, topic: &str) {
        if let Some(key) = self.key_of(topic) {
            self.ledger.mark_acked(&key);
        }
    }

    /// Results of work that ran on a worker (the reboot command).
    pub fn on_wake(&mut self, outbox: &mut Outbox) {
        while let Some((key, state)) = self.workers.try_recv() {
            if state == CommandState::Executing {
                log::info!("command {}/{}: waiting for the reboot", key.op.name(), Printable(&key.id));
                continue;
            }
            self.finish(&key, state, outbox);
        }
    }

    /// Heartbeats with these seqs were just queued: answer the commands that asked for them.
    pub fn on_heartbeats_queued(&mut self, seqs: &[u64], outbox: &mut Outbox) {
        let (done, waiting) =
            std::mem::take(&mut self.awaiting_heartbeat).into_iter().partition(|(_, seq)| seqs.contains(seq));
        self.awaiting_heartbeat = waiting;
        for (key, seq) in done {
            self.finish(&key, CommandState::Successful { result: json!({ "seq": seq }) }, outbox);
        }
    }

    /// End of a loop turn: makes this turn's ledger changes durable, then carries out the
    /// commands that change the device. Called before the outbox sends anything, so the broker
    /// never hears of a state the ledger could forget in a crash.
    pub fn commit(
        &mut self,
        outbox: &mut Outbox,
        trust: &mut Trust,
        updates: &mut Updates,
        fw: &mut Firewall,
    ) {
        for key in self.ledger.retire_oldest() {
            log::debug!("command {}/{}: retired from the history", key.op.name(), Printable(&key.id));
            outbox.push(Kind::CommandState, self.topic(&key), Vec::new(), true);
        }
        let durable = self.commit_ledger();
        for (key, change) in std::mem::take(&mut self.to_start) {
            let outcome = match (&durable, change) {
                (Err(e), change) => {
                    if matches!(change, Change::Keys(_)) {
                        trust.unstage_keys();
                    }
                    Err(format!("not run: cannot record the command on disk ({e})"))
                }
                (Ok(()), Change::Reboot(argv)) => match self.start_reboot(key.clone(), argv) {
                    Ok(()) => continue, // answered by the worker, or by the next boot
                    Err(reason) => Err(reason),
                },
                (Ok(()), Change::Keys(text)) => trust.write_keys(&text).map(|count| json!({ "keys": count })),
                (Ok(()), Change::Update(flow)) => match updates.begin(&key.id, *flow) {
                    Ok(()) => continue, // answered when the flow ends
                    Err(reason) => Err(reason),
                },
                (Ok(()), Change::Firewall(request)) => match fw.begin(&key.id, request) {
                    Ok(()) => continue, // answered when the change is kept or reverted
                    Err(reason) => Err(reason),
                },
            };
            let state = match outcome {
                Ok(result) => CommandState::Successful { result },
                Err(reason) => CommandState::Failed { reason },
            };
            self.finish(&key, state, outbox);
        }
    }

    fn commit_ledger(&mut self) -> Result<(), String> {
        self.ledger.flush().map_err(|e| {
            let text = error_text(&e);
            log::error!("cannot write the command ledger: {text}");
            text
        })
    }

    /// Something arrived on the topic of a command the ledger knows.
    fn on_known(&mut self, key: &Key, payload: &[u8], outbox: &mut Outbox) {
        if payload.is_empty() {
            log::debug!("command {}/{} cleared by the operator", key.op.name(), Printable(&key.id));
            return self.ledger.mark_cleared(key);
        }
        let is_request = payload.len() <= MAX_COMMAND_BYTES
            && serde_json::from_slice::<CommandState>(payload)
                .is_ok_and(|s| matches!(s, CommandState::Init { .. }));
        if !is_request {
            return; // our own state coming back, or garbage: it changes nothing
        }
        // The request again (the broker lost our answer): say again where it stands.
        log::info!("command {}/{} already handled: not run again", key.op.name(), Printable(&key.id));
        if let Some(state) = self.ledger.state(key) {
            outbox.push(Kind::CommandState, self.topic(key), self.state_payload(key, &state), true);
        }
    }

    /// The parameters of a new request; `None` for a payload that is not a request (one of our
    /// own answers coming back).
    fn read_request(
        &self,
        topic: &str,
        id: &str,
        payload: &[u8],
    ) -> Result<Option<Map<String, Value>>, String> {
        if payload.len() > MAX_COMMAND_BYTES {
            return Err(too_large(payload.len()));
        }
        if id.len() > MAX_COMMAND_ID_BYTES {
            return Err(format!("command id too long: {} bytes (limit {MAX_COMMAND_ID_BYTES})", id.len()));
        }
        let state: CommandState = match serde_json::from_slice(payload) {
            Ok(state) => state,
            Err(e) => return Err(format!("malformed JSON: {e}")),
        };
        match state {
            CommandState::Init { params } => Ok(Some(params)),
            CommandState::Executing => {
                // Ours, from a run whose ledger did not keep it (deleted, or lost in a crash
                // before it was written): it will never finish.
                Err(format!("interrupted: the agent lost track of it ({topic} was executing)"))
            }
            _ => Ok(None),
        }
    }

    fn execute(&mut self, key: Key, admitted: Admitted, ctx: &mut Context) {
        let origin = Origin { by: admitted.by, replay_until: admitted.replay_until };
        let by = &origin.by;
        log::info!("command {}/{}: executing (by {by})", key.op.name(), Printable(&key.id));
        let outcome = match key.op {
            Op::Keys => {
                let text = admitted.params.get("authorized_keys").and_then(Value::as_str).unwrap_or_default();
                let force = admitted.params.get("force").and_then(Value::as_bool).unwrap_or(false);
                match ctx.trust.stage_keys(text, force, admitted.signer.as_deref()) {
                    Ok(_) => {
                        self.mark_executing(&key, Some(sha256_hex(text.as_bytes())), origin, ctx.outbox);
                        return self.to_start.push((key, Change::Keys(text.to_string())));
                    }
                    Err(reason) => CommandState::Failed { reason },
                }
            }
            Op::Shell | Op::Exec | Op::Forward | Op::Ls | Op::Get | Op::Put | Op::Logs => {
                let opener = Opener { by, issued: admitted.issued };
                match ctx.remote.open(key.op, &key.id, &admitted.params, opener, ctx.registry) {
                    Ok(result) => CommandState::Successful { result },
                    Err(reason) => CommandState::Failed { reason },
                }
            }
            Op::Update => match self.check_update(&admitted.params, ctx.updates) {
                Ok(flow) => {
                    self.mark_executing(&key, None, origin, ctx.outbox);
                    return self.to_start.push((key, Change::Update(Box::new(flow))));
                }
                Err(reason) => CommandState::Failed { reason },
            },
            Op::Firewall => match admitted.params.get("action").and_then(Value::as_str).unwrap_or_default() {
                "show" => match ctx.firewall.show(&key.id) {
                    Ok(()) => return self.mark_executing(&key, None, origin, ctx.outbox), // answered by its worker
                    Err(reason) => CommandState::Failed { reason },
                },
                "confirm" => ctx.firewall.confirm().map_or_else(
                    |reason| CommandState::Failed { reason },
                    |result| CommandState::Successful { result },
                ),
                "apply" | "revert" => {
                    let busy = self
                        .to_start
                        .iter()
                        .find(|(_, c)| matches!(c, Change::Firewall(_)))
                        .map(|(k, _)| &*k.id);
                    match ctx.firewall.check(&admitted.params, busy) {
                        Ok(request) => {
                            self.mark_executing(&key, None, origin, ctx.outbox);
                            return self.to_start.push((key, Change::Firewall(request)));
                        }
                        Err(reason) => CommandState::Failed { reason },
                    }
                }
                other => CommandState::Failed {
                    reason: format!(
                        "action: must be apply, show, revert or confirm, got \"{}\"",
                        Printable(other)
                    ),
                },
            },
            Op::Ping => self.ping(),
            Op::Config => match ctx.config.redacted_json() {
                Ok(result) => CommandState::Successful { result },
                Err(reason) => CommandState::Failed { reason },
            },
            Op::Heartbeat => {
                // Answered once the heartbeat is queued, so it reaches the broker first.
                self.mark_executing(&key, None, origin.clone(), ctx.outbox);
                match ctx.heartbeat.trigger(ctx.outbox) {
                    Ok(seq) => return self.awaiting_heartbeat.push((key, seq)),
                    Err(reason) => CommandState::Failed { reason },
                }
            }
            Op::Reboot => {
                if let Some(running) = self.reboot_under_way() {
                    let reason = format!("a reboot is already under way (command {running})");
                    CommandState::Failed { reason }
                } else {
                    self.mark_executing(&key, Some(identity::boot_id()), origin.clone(), ctx.outbox);
                    return self.to_start.push((key, Change::Reboot(ctx.config.reboot_command.clone())));
                }
            }
        };
        self.finish_asked(&key, outcome, Some(origin), ctx.outbox);
    }

    fn mark_executing(&mut self, key: &Key, mark: Option<String>, origin: Origin, outbox: &mut Outbox) {
        self.ledger.set_state(key, CommandState::Executing, mark, Some(origin));
        outbox.push(Kind::CommandState, self.topic(key), CommandState::Executing.to_payload(), true);
    }

    /// The flow of an `update` request, if it may begin: readable whole, and no other under way.
    fn check_update(&self, params: &Map<String, Value>, updates: &Updates) -> Result<Flow, String> {
        let under_way = updates.busy().map(str::to_string).or_else(|| {
            self.to_start.iter().find(|(_, c)| matches!(c, Change::Update(_))).map(|(k, _)| k.id.to_string())
        });
        if let Some(id) = under_way {
            return Err(format!(
                "an update is under way (command {}): send this one after it ends",
                Printable(&id)
            ));
        }
        Flow::from_json(params.get("flow").unwrap_or(&Value::Null)).map_err(|e| format!("flow: {e}"))
    }

    /// The final state of a firewall change.
    pub fn finish_firewall(&mut self, id: &str, state: CommandState, outbox: &mut Outbox) {
        self.finish(&Key::new(Op::Firewall, id), state, outbox);
    }

    /// At start, before `recover`: the final state of a firewall change settled by a previous
    /// run (or reverted at this start), for a command the ledger still has executing.
    pub fn settle_firewall(&mut self, id: &str, state: CommandState) {
        let key = Key::new(Op::Firewall, id);
        if self.ledger.get(&key).is_some_and(|r| r.phase == Phase::Executing) {
            log_state(&key, &state, "settled by the firewall journal");
            self.ledger.set_state(&key, state, None, None);
        }
    }

    /// The final state of an update flow.
    pub fn finish_update(&mut self, id: &str, state: CommandState, outbox: &mut Outbox) {
        self.finish(&Key::new(Op::Update, id), state, outbox);
    }

    fn reboot_under_way(&self) -> Option<String> {
        let boot = identity::boot_id();
        self.ledger
            .unacknowledged()
            .into_iter()
            .chain(self.to_start.iter().map(|(k, _)| (k.clone(), Phase::Executing)))
            .find(|(key, phase)| {
                key.op == Op::Reboot
                    && *phase == Phase::Executing
                    && self.ledger.get(key).and_then(|r| r.mark.as_deref()) == Some(boot.as_str())
            })
            .map(|(key, _)| Printable(&key.id).to_string())
    }

    fn ping(&self) -> CommandState {
        let system_uptime = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map(|s| s as u64);
        CommandState::Successful {
            result: json!({
                "version": crate::VERSION,
                "arch": crate::TARGET,
                "uptime_s": system_uptime,
                "agent_uptime_s": self.started.elapsed().as_secs(),
            }),
        }
    }

    /// Runs the reboot command on a worker: it may block until the system goes down.
    fn start_reboot(&mut self, key: Key, argv: Vec<String>) -> Result<(), String> {
        let id = key.id.to_string();
        let job_key = key.clone();
        self.workers.spawn("reboot", move || {
            let status =
                std::process::Command::new(&argv[0]).args(&argv[1..]).env("TETHER_COMMAND_ID", &id).status();
            let state = match status {
                Ok(status) if status.success() => CommandState::Executing,
                Ok(status) => {
                    CommandState::Failed { reason: format!("reboot command {} failed: {status}", argv[0]) }
                }
                Err(e) => CommandState::Failed {
                    reason: format!("cannot run reboot command {}: {}", argv[0], error_text(&e)),
                },
            };
            (job_key, state)
        })
    }

    /// Answers `failed` to a request that will not run, without recording it.
    fn refuse(
        &mut self,
        topic: &str,
        request: &[u8],
        op: &str,
        id: &str,
        reason: String,
        outbox: &mut Outbox,
    ) {
        if self.refused.contains(topic, request) {
            return;
        }
        // A hostile op or id (up to 64 KiB) is not echoed into a signed answer: answering it
        // would cost as much again in memory and on the broker. Such requests come from no
        // tool that checks answers.
        let answer = if op.len() <= MAX_OP_NAME_BYTES && id.len() <= MAX_COMMAND_ID_BYTES {
            self.answer_payload(op, id, Outcome::Failed(reason.clone()), NOBODY)
        } else {
            CommandState::Failed { reason: reason.clone() }.to_payload()
        };
        if outbox.push(Kind::Refusal, topic.to_string(), answer, true) {
            log::warn!("command {}/{} refused: {}", Printable(op), Printable(id), Printable(&reason));
            self.refused.insert(topic, request);
        }
    }

    fn finish(&mut self, key: &Key, state: CommandState, outbox: &mut Outbox) {
        self.finish_asked(key, state, None, outbox);
    }

    /// `origin`: who asked, when the command is recorded for the first time with its final state.
    fn finish_asked(&mut self, key: &Key, state: CommandState, origin: Option<Origin>, outbox: &mut Outbox) {
        log_state(key, &state, "");
        self.ledger.set_state(key, state.clone(), None, origin);
        let payload = self.state_payload(key, &state);
        outbox.push(Kind::CommandState, self.topic(key), payload, true);
    }

    /// A command's state as published: a final state says who asked, signed by the device.
    fn state_payload(&self, key: &Key, state: &CommandState) -> Vec<u8> {
        let outcome = match state {
            CommandState::Successful { result } => Outcome::Successful(result.clone()),
            CommandState::Failed { reason } => Outcome::Failed(reason.clone()),
            _ => return state.to_payload(),
        };
        let by = self.ledger.get(key).and_then(|record| record.by.as_deref()).unwrap_or(NOBODY);
        self.answer_payload(key.op.name(), &key.id, outcome, by)
    }

    /// A final state: the outcome, who asked, and the answer text signed by the device key
    /// (docs/protocol.md, "The answer"); unsigned when the device has no key.
    fn answer_payload(&self, op: &str, id: &str, outcome: Outcome, by: &str) -> Vec<u8> {
        let answer = Answer::new(Addressed { device: self.topics.device(), op, id }, outcome, by);
        let state = match &self.signer {
            Some(key) => answer.signed_state(key),
            None => answer.readable_state(),
        };
        serde_json::to_vec(&state)
            .unwrap_or_else(|_| br#"{"status":"failed","reason":"cannot encode"}"#.to_vec())
    }

    fn topic(&self, key: &Key) -> String {
        self.topics.command(key.op.name(), &key.id)
    }

    fn key_of(&self, topic: &str) -> Option<Key> {
        let (op, id) = self.topics.parse_command(topic)?;
        Some(Key::new(Op::from_name(op)?, id))
    }
}

fn log_state(key: &Key, state: &CommandState, note: &str) {
    let detail = match state {
        CommandState::Failed { reason } => format!(": {}", Printable(reason)),
        _ => String::new(),
    };
    let note = if note.is_empty() { String::new() } else { format!(" ({note})") };
    log::info!("command {}/{}: {}{detail}{note}", key.op.name(), Printable(&key.id), state.word());
}

/// Longer than any op's name: not echoed in a signed refusal.
const MAX_OP_NAME_BYTES: usize = 64;

/// `by` for an answer to nobody the device could name: a refused request, or a command recorded
/// before signed requests.
const NOBODY: &str = "unknown";

fn too_large(size: usize) -> String {
    format!("payload too large: {size} bytes (limit {MAX_COMMAND_BYTES})")
}
