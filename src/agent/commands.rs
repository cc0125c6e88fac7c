//! Remote commands: the operator publishes a retained `{"status":"init",...}` on
//! `ROOT/DEVICE/cmd/OP/ID`; the agent answers on the same topic with `executing`, then
//! `successful` or `failed`. A ledger in the state directory remembers every id handled, so a
//! retained request is never run twice, across restarts too, and a reboot is confirmed by the
//! agent that starts after it.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::heartbeat::Heartbeat;
use super::identity;
use super::outbox::Outbox;
use crate::config::Config;
use crate::fsutil;
use crate::protocol::{CommandState, Topics, MAX_COMMAND_BYTES};
use crate::worker::Workers;

pub const OPS: [&str; 4] = ["ping", "heartbeat", "config", "reboot"];
const LEDGER_FILE: &str = "commands.json";
/// Ids remembered; older ones are forgotten (their retained message is final by then).
const LEDGER_CAPACITY: usize = 500;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    op: String,
    id: String,
    state: CommandState,
    /// The boot a reboot was started in; a different boot at start-up means it happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
}

/// What the commands need from the rest of the agent.
pub struct Context<'a> {
    pub outbox: &'a mut Outbox,
    pub heartbeat: &'a mut Heartbeat,
    pub config: &'a Config,
}

pub struct Commands {
    topics: Topics,
    ledger: VecDeque<Record>,
    ledger_path: PathBuf,
    started: Instant,
    workers: Workers<(String, String, CommandState)>,
    /// `heartbeat` commands waiting for their heartbeat to be queued: (id, seq).
    awaiting_heartbeat: Vec<(String, u64)>,
}

impl Commands {
    pub fn new(topics: Topics, state_dir: &std::path::Path, waker: Arc<mio::Waker>) -> Commands {
        let ledger_path = state_dir.join(LEDGER_FILE);
        let ledger = match fsutil::read_optional(&ledger_path) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                log::warn!("{}: unreadable ({e}); starting with an empty ledger", ledger_path.display());
                VecDeque::new()
            }),
            Ok(None) => VecDeque::new(),
            Err(e) => {
                log::warn!("{}: {e}", ledger_path.display());
                VecDeque::new()
            }
        };
        Commands {
            topics,
            ledger,
            ledger_path,
            started: Instant::now(),
            workers: Workers::new(waker),
            awaiting_heartbeat: Vec::new(),
        }
    }

    /// The subscription that brings this device's commands.
    pub fn filter(&self) -> String {
        self.topics.command_filter()
    }

    /// Settles commands a previous run left executing: a reboot is successful if the boot id
    /// changed; anything else was cut short.
    pub fn recover(&mut self, outbox: &mut Outbox) {
        let boot = identity::boot_id();
        let mut settled = Vec::new();
        for record in self.ledger.iter_mut().filter(|r| r.state == CommandState::Executing) {
            record.state = match (record.op.as_str(), &record.boot_id) {
                ("reboot", Some(then)) if *then != boot => {
                    CommandState::Successful { result: json!({"boot_id": boot}) }
                }
                ("reboot", _) => CommandState::Failed {
                    reason: "the agent restarted but the system did not reboot".into(),
                },
                _ => CommandState::Failed { reason: "interrupted: the agent restarted while it ran".into() },
            };
            log::info!("command {}/{} from before the restart: {:?}", record.op, record.id, record.state);
            settled.push((record.op.clone(), record.id.clone(), record.state.clone()));
        }
        if !settled.is_empty() {
            self.save();
        }
        for (op, id, state) in settled {
            outbox.push(self.topics.command(&op, &id), state.to_payload(), true);
        }
    }

    /// Retained `{}` on `ROOT/DEVICE/cmd/OP` for each op this agent runs.
    pub fn adverts(&self) -> Vec<String> {
        OPS.iter().map(|op| self.topics.command_op(op)).collect()
    }

    pub fn on_message(&mut self, topic: &str, payload: &[u8], ctx: &mut Context) {
        let Some((op, id)) = self.topics.parse_command(topic) else { return };
        let (op, id) = (op.to_string(), id.to_string());
        if payload.is_empty() {
            log::debug!("command {op}/{id} cleared by the operator");
            return;
        }
        if payload.len() > MAX_COMMAND_BYTES {
            return self.refuse(&op, &id, too_large(payload.len()), ctx);
        }
        let state: CommandState = match serde_json::from_slice(payload) {
            Ok(state) => state,
            Err(e) => return self.refuse(&op, &id, format!("malformed JSON: {e}"), ctx),
        };
        let CommandState::Init { params } = state else {
            return; // our own status coming back
        };
        if let Some(record) = self.find(&op, &id) {
            // Handled before (maybe before a restart): say again how it ended, do nothing else.
            log::debug!("command {op}/{id} already handled");
            let state = record.state.clone();
            ctx.outbox.push(topic.to_string(), state.to_payload(), true);
            return;
        }
        self.execute(op, id, params, ctx);
    }

    /// A command too big to read at all.
    pub fn on_oversized(&mut self, topic: &str, size: usize, ctx: &mut Context) {
        if let Some((op, id)) = self.topics.parse_command(topic) {
            let (op, id) = (op.to_string(), id.to_string());
            self.refuse(&op, &id, too_large(size), ctx);
        }
    }

    /// A long-running command (reboot) finished on its worker.
    pub fn on_wake(&mut self, outbox: &mut Outbox) {
        while let Some((op, id, state)) = self.workers.try_recv() {
            if state == CommandState::Executing {
                log::info!("command {op}/{id}: waiting for the reboot");
                continue;
            }
            self.finish(&op, &id, state, outbox);
        }
    }

    /// Heartbeats with these seqs were just queued: answer the commands that asked for them.
    pub fn on_heartbeats_queued(&mut self, seqs: &[u64], outbox: &mut Outbox) {
        let (done, waiting) =
            std::mem::take(&mut self.awaiting_heartbeat).into_iter().partition(|(_, seq)| seqs.contains(seq));
        self.awaiting_heartbeat = waiting;
        for (id, seq) in done {
            self.finish("heartbeat", &id, CommandState::Successful { result: json!({ "seq": seq }) }, outbox);
        }
    }

    fn execute(&mut self, op: String, id: String, params: Map<String, Value>, ctx: &mut Context) {
        if !OPS.contains(&op.as_str()) {
            let reason = format!("unknown op {op:?} (this agent runs: {})", OPS.join(", "));
            return self.refuse(&op, &id, reason, ctx);
        }
        log::info!("command {op}/{id}: executing");
        let boot_id = (op == "reboot").then(identity::boot_id);
        self.record(Record { op: op.clone(), id: id.clone(), state: CommandState::Executing, boot_id });
        ctx.outbox.push(self.topics.command(&op, &id), CommandState::Executing.to_payload(), true);
        let _ = params; // none of this ops take parameters
        let outcome = match op.as_str() {
            "ping" => self.ping(),
            "heartbeat" => {
                // Answered once the heartbeat is queued, so it reaches the broker first.
                let seq = ctx.heartbeat.trigger(ctx.outbox);
                return self.awaiting_heartbeat.push((id, seq));
            }
            "config" => CommandState::Successful { result: ctx.config.redacted_json() },
            _ => return self.start_reboot(op, id, ctx.config.reboot_command.clone()),
        };
        self.finish(&op, &id, outcome, ctx.outbox);
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
    fn start_reboot(&mut self, op: String, id: String, argv: Vec<String>) {
        self.workers.spawn("reboot", move || {
            let state = match std::process::Command::new(&argv[0]).args(&argv[1..]).status() {
                Ok(status) if status.success() => CommandState::Executing,
                Ok(status) => {
                    CommandState::Failed { reason: format!("reboot command {:?} failed: {status}", argv[0]) }
                }
                Err(e) => {
                    CommandState::Failed { reason: format!("cannot run reboot command {:?}: {e}", argv[0]) }
                }
            };
            (op, id, state)
        });
    }

    /// Answers `failed` to a request that will not run, and remembers it.
    fn refuse(&mut self, op: &str, id: &str, reason: String, ctx: &mut Context) {
        if self.find(op, id).is_some_and(|r| r.state.is_final()) {
            return;
        }
        log::warn!("command {op}/{id} refused: {reason}");
        self.finish(op, id, CommandState::Failed { reason }, ctx.outbox);
    }

    fn finish(&mut self, op: &str, id: &str, state: CommandState, outbox: &mut Outbox) {
        log::info!(
            "command {op}/{id}: {}",
            if matches!(state, CommandState::Successful { .. }) { "successful" } else { "failed" }
        );
        outbox.push(self.topics.command(op, id), state.to_payload(), true);
        let boot_id = self.find(op, id).and_then(|r| r.boot_id.clone());
        self.record(Record { op: op.to_string(), id: id.to_string(), state, boot_id });
    }

    fn find(&self, op: &str, id: &str) -> Option<&Record> {
        self.ledger.iter().find(|r| r.op == op && r.id == id)
    }

    fn record(&mut self, record: Record) {
        self.ledger.retain(|r| !(r.op == record.op && r.id == record.id));
        self.ledger.push_back(record);
        while self.ledger.len() > LEDGER_CAPACITY {
            self.ledger.pop_front();
        }
        self.save();
    }

    fn save(&self) {
        let bytes = serde_json::to_vec(&self.ledger).unwrap_or_default();
        if let Err(e) = fsutil::write_atomic(&self.ledger_path, &bytes) {
            log::error!("cannot save the command ledger {}: {e}", self.ledger_path.display());
        }
    }
}

fn too_large(size: usize) -> String {
    format!("payload too large: {size} bytes (limit {MAX_COMMAND_BYTES})")
}
