//! Firewall rules that revert themselves when the device loses contact (docs/firewall.md).
//!
//! The `firewall` op applies a rule set in Tether's own table or chains (`backend`), then the
//! change must prove the device still reaches the broker: the loop drops the connection and
//! makes a fresh one (so a flow the kernel tracks as established cannot fake it), and a QoS 1
//! publish on it must be acknowledged, within `confirm_s`; with `confirm`, an explicit
//! `confirm` from the operator must come too. Otherwise the previous rules are restored
//! exactly and the command fails, reported once the device is back.
//!
//! The journal (`STATE_DIR/firewall.json`, replaced atomically, 0600) holds the rule set in
//! force, the one before it (what `revert` goes back to) and the change pending, written before
//! the rules are touched: an agent killed while a change is pending reverts it at its next
//! start, before it connects. The rules are applied on a worker thread; at start and stop
//! they are applied on the loop's thread (it does nothing else then).

pub mod backend;
pub mod rules;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::outbox::{Kind, Outbox};
use crate::fsutil::{self, error_text};
use crate::net::client::Client;
use crate::protocol::{CommandState, Topics};
use crate::text::Printable;
use crate::worker::Workers;
use rules::{Backend, RuleSet};

/// The tag of the probe publish (outbox ids count up from 1; the loop's own tags are the
/// two highest values).
pub const PROBE_TAG: u64 = u64::MAX - 2;
const MAX_CONFIRM_S: u64 = 3600;
const MIN_CONFIRM_S: u64 = 5;

/// What the firewall needs from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub journal: PathBuf,
    pub disable: bool,
    pub backend: String,
    pub persist: bool,
    pub default_confirm_s: u64,
}

impl Settings {
    pub fn of(config: &crate::config::Config) -> Settings {
        let firewall = &config.firewall;
        Settings {
            journal: config.state_dir.join("firewall.json"),
            disable: firewall.disable,
            backend: firewall.backend.clone(),
            persist: firewall.persist,
            default_confirm_s: firewall.default_confirm_s,
        }
    }
}

/// A rule set in force: its backend and its JSON (None: no rules of Tether's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Applied {
    backend: String,
    ruleset: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Journal {
    current: Option<Applied>,
    previous: Option<Applied>,
    pending: Option<Pending>,
    /// The last change settled and its final state: the ledger may not have it yet when the
    /// agent dies.
    settled: Option<(String, CommandState)>,
}

/// A change applied and not confirmed yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    id: String,
    /// Unix seconds.
    deadline: u64,
    confirm_s: u64,
    confirm: bool,
    /// What `current` and `previous` were before the change: restored when it fails.
    restore: Option<Applied>,
    before: Option<Applied>,
}

/// An `apply` or `revert` request, checked.
pub struct Request {
    /// The rule set to put in force; None: no rules (a revert to before the first apply).
    ruleset: Option<Value>,
    confirm: bool,
    confirm_s: u64,
}

enum Phase {
    Applying,
    /// Applied; waiting for the loop's fresh connection.
    Reconnecting,
    Probing {
        sent: bool,
    },
    AwaitingConfirm,
    /// Restoring the previous rules, because of this.
    Reverting(String),
}

struct Change {
    id: String,
    deadline: Instant,
    confirm_s: u64,
    need_confirm: bool,
    confirmed: bool,
    started: Instant,
    generation: u64,
    phase: Phase,
}

pub struct Firewall {
    settings: Settings,
    topics: Topics,
    backend: Result<Backend, String>,
    journal: Journal,
    change: Option<Change>,
    workers: Workers<(u64, Result<(), String>)>,
    /// `show` answers: (command id, result).
    shows: Workers<(String, Value)>,
    generation: u64,
    finished: Vec<(String, CommandState)>,
    reconnect: bool,
}

impl Firewall {
    pub fn new(settings: Settings, topics: Topics, waker: Arc<mio::Waker>) -> Firewall {
        Firewall {
            settings,
            topics,
            backend: Err("not detected yet".into()),
            journal: Journal::default(),
            change: None,
            workers: Workers::new(Arc::clone(&waker)),
            shows: Workers::new(waker),
            generation: 0,
            finished: Vec::new(),
            reconnect: false,
        }
    }

    /// At start, before connecting: a change left pending is reverted, then the rule set in
    /// force is applied again (unless `persist` is false). Returns the last change settled,
    /// with its final state, for the ledger to record if it still has it executing.
    pub fn start(&mut self) -> Option<(String, CommandState)> {
        let mut lost = true;
        self.journal = match fsutil::read_optional(&self.settings.journal) {
            Ok(None) => {
                lost = false;
                Journal::default()
            }
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).inspect(|_| lost = false).unwrap_or_else(|e| {
                log::error!("{}: unreadable ({e})", self.settings.journal.display());
                Journal::default()
            }),
            Err(e) => {
                log::error!("cannot read {}: {}", self.settings.journal.display(), error_text(&e));
                Journal::default()
            }
        };
        let reverted = self.journal.pending.is_some();
        if reverted {
            self.revert_now(
                "the agent restarted before the change was confirmed: the previous rules were \
                             restored at its start",
            );
        }
        self.backend = backend::detect(&self.settings.backend);
        if let Err(e) = &self.backend {
            log::info!("firewall: {e} (the firewall op will say so)");
        }
        if let (true, Ok(backend)) = (lost, &self.backend) {
            // A change it held may be pending: the device must not stay cut off for that.
            log::error!("firewall: without its journal, Tether's rules are removed");
            if let Err(e) = backend::apply(*backend, None) {
                log::error!("firewall: cannot remove Tether's rules: {e}");
            }
            return None;
        }
        if self.settings.disable {
            return self.journal.settled.clone();
        }
        let in_force = self.journal.current.clone().filter(|c| c.ruleset.is_some());
        if let Some(current) = in_force.filter(|_| self.settings.persist && !reverted) {
            match apply_blocking(&current) {
                Ok(()) => log::info!("firewall: the rule set in force applied again ({})", current.backend),
                Err(e) => log::error!("firewall: cannot apply the rule set in force again: {e}"),
            }
        }
        self.journal.settled.clone()
    }

    pub fn reconfigure(&mut self, settings: Settings) {
        if settings.backend != self.settings.backend || self.backend.is_err() {
            self.backend = backend::detect(&settings.backend);
        }
        self.settings = settings;
    }

    /// At a clean stop: a change still pending is reverted now, not left in force.
    pub fn on_stop(&mut self) {
        if self.journal.pending.is_some() {
            // The backend's worker first: what it applies must not land after the revert.
            let until = Instant::now() + Duration::from_secs(15);
            while self.workers.running() > 0 && Instant::now() < until {
                if self.workers.try_recv().is_none() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            self.change = None;
            self.revert_now(
                "the agent stopped before the change was confirmed: the previous rules are restored",
            );
        }
    }

    /// Restores what the pending change replaced, on this thread, and records it settled.
    fn revert_now(&mut self, reason: &str) {
        let Some(pending) = self.journal.pending.clone() else { return };
        let current = self.journal.current.clone();
        let outcome = restore_blocking(current.as_ref(), pending.restore.as_ref());
        let state = failed(&pending.id, reason, outcome);
        self.settle(pending, state);
    }

    /// Checks an `apply` or `revert` request; `Ok` means it may begin.
    pub fn check(&mut self, params: &Map<String, Value>, busy: Option<&str>) -> Result<Request, String> {
        if self.settings.disable {
            return Err("the firewall is not managed on this device (firewall.disable)".into());
        }
        if let Some(id) = self.pending_id().or(busy) {
            return Err(format!(
                "a firewall change is pending (command {}): confirm it, or wait for it to be reverted",
                Printable(id)
            ));
        }
        if self.backend.is_err() {
            self.backend = backend::detect(&self.settings.backend); // installed since?
        }
        let backend = self.backend.clone()?;
        let confirm = params.get("confirm").and_then(Value::as_bool).unwrap_or(false);
        let confirm_s =
            params.get("confirm_s").and_then(Value::as_u64).unwrap_or(self.settings.default_confirm_s);
        if !(MIN_CONFIRM_S..=MAX_CONFIRM_S).contains(&confirm_s) {
            return Err(format!(
                "confirm_s: must be {MIN_CONFIRM_S} to {MAX_CONFIRM_S} seconds, got {confirm_s}"
            ));
        }
        let ruleset = match params.get("action").and_then(Value::as_str) {
            Some("revert") => {
                if params.contains_key("ruleset") {
                    return Err("ruleset: not taken by revert (it goes back to the previous rule set)".into());
                }
                if self.journal.current.as_ref().is_none_or(|c| c.ruleset.is_none())
                    && self.journal.previous.is_none()
                {
                    return Err("nothing to revert: no rule set was applied".into());
                }
                self.journal.previous.as_ref().and_then(|p| p.ruleset.clone())
            }
            _ => {
                let value = params.get("ruleset").ok_or("missing parameter \"ruleset\"")?;
                let set = RuleSet::from_json(value).map_err(|e| format!("ruleset.{e}"))?;
                if let Some(raw) = set.raw_backend().filter(|b| *b != backend) {
                    return Err(format!(
                        "ruleset.raw.backend: {} text, but this device's backend is {}",
                        raw.name(),
                        backend.name()
                    ));
                }
                Some(value.clone())
            }
        };
        Ok(Request { ruleset, confirm, confirm_s })
    }

    fn pending_id(&self) -> Option<&str> {
        self.journal.pending.as_ref().map(|p| p.id.as_str())
    }

    /// Applies the rule set of command `id` (recorded executing already).
    pub fn begin(&mut self, id: &str, request: Request) -> Result<(), String> {
        let backend = self.backend.clone()?;
        let applied = Applied { backend: backend.name().into(), ruleset: request.ruleset };
        let set = applied.ruleset.as_ref().map(RuleSet::from_json).transpose()?;
        let pending = Pending {
            id: id.to_string(),
            deadline: super::unix_seconds() + request.confirm_s,
            confirm_s: request.confirm_s,
            confirm: request.confirm,
            restore: self.journal.current.clone(),
            before: self.journal.previous.clone(),
        };
        // Rules in force on another backend (the config named a new one since) go once the new
        // ones are in: Tether's rules live on one backend at a time.
        let left_behind = self
            .journal
            .current
            .as_ref()
            .filter(|c| c.backend != applied.backend)
            .map(|c| Applied { backend: c.backend.clone(), ruleset: None });
        let mut journal = self.journal.clone();
        journal.previous = journal.current.replace(applied);
        journal.pending = Some(pending);
        write_journal(&self.settings.journal, &journal)
            .map_err(|e| format!("not applied: cannot write the firewall journal: {e}"))?;
        let before = std::mem::replace(&mut self.journal, journal);
        self.generation += 1;
        let generation = self.generation;
        let job = move || {
            let applied = backend::apply(backend, set.as_ref());
            (generation, applied.and_then(|()| left_behind.as_ref().map_or(Ok(()), apply_blocking)))
        };
        if let Err(e) = self.workers.spawn("firewall", job) {
            // Nothing applied: the journal must not say a change is pending.
            if let Err(e) = write_journal(&self.settings.journal, &before) {
                log::error!("firewall: cannot write the journal: {e}");
            }
            self.journal = before;
            return Err(format!("not applied: {e}"));
        }
        log::info!(
            "firewall {}: applying on {} (confirm within {} s)",
            Printable(id),
            backend.name(),
            request.confirm_s
        );
        self.change = Some(Change {
            id: id.to_string(),
            deadline: Instant::now() + Duration::from_secs(request.confirm_s),
            confirm_s: request.confirm_s,
            need_confirm: request.confirm,
            confirmed: false,
            started: Instant::now(),
            generation,
            phase: Phase::Applying,
        });
        Ok(())
    }

    /// Results of the backend's worker.
    pub fn on_wake(&mut self) {
        while let Some((id, result)) = self.shows.try_recv() {
            self.finished.push((id, CommandState::Successful { result }));
        }
        while let Some((generation, result)) = self.workers.try_recv() {
            let Some(change) = self.change.as_mut().filter(|c| c.generation == generation) else { continue };
            match (&change.phase, result) {
                (Phase::Applying, Ok(())) => {
                    log::info!(
                        "firewall {}: applied; checking the broker on a fresh connection",
                        Printable(&change.id)
                    );
                    change.phase = Phase::Reconnecting;
                    self.reconnect = true;
                }
                (Phase::Applying, Err(e)) => {
                    let reason = format!("the rule set was not applied: {e}");
                    self.begin_revert(reason);
                }
                (Phase::Reverting(reason), outcome) => {
                    let state = failed(&change.id, reason, outcome);
                    let pending = self.journal.pending.clone();
                    self.change = None;
                    if let Some(pending) = pending {
                        self.settle(pending, state);
                    }
                    self.reconnect = true;
                }
                _ => {}
            }
        }
    }

    /// Whether the loop must drop its connection and make a fresh one (once per call).
    pub fn take_reconnect(&mut self) -> bool {
        std::mem::take(&mut self.reconnect)
    }

    pub fn on_connected(&mut self) {
        if let Some(change) =
            self.change.as_mut().filter(|c| matches!(c.phase, Phase::Reconnecting | Phase::Probing { .. }))
        {
            change.phase = Phase::Probing { sent: false };
        }
    }

    /// Publishes the probe once the client has room: the command's state, retained, QoS 1.
    pub fn pump(&mut self, client: &mut Client) {
        let Some(change) = self.change.as_mut() else { return };
        if !matches!(change.phase, Phase::Probing { sent: false }) || !client.can_publish() {
            return;
        }
        let payload = progress("checking", None);
        if client.publish(&self.topics.command("firewall", &change.id), &payload, true, Some(PROBE_TAG)) {
            change.phase = Phase::Probing { sent: true };
        }
    }

    /// The broker acknowledged the probe: the round trip is done.
    pub fn on_probe_acked(&mut self, outbox: &mut Outbox) {
        let Some(change) = self.change.as_mut().filter(|c| matches!(c.phase, Phase::Probing { sent: true }))
        else {
            return;
        };
        log::info!(
            "firewall {}: the broker answered on a fresh connection {:.1} s after the apply",
            Printable(&change.id),
            change.started.elapsed().as_secs_f64()
        );
        if change.need_confirm && !change.confirmed {
            change.phase = Phase::AwaitingConfirm;
            let by = self.journal.pending.as_ref().map_or(0, |p| p.deadline);
            outbox.push(
                Kind::CommandState,
                self.topics.command("firewall", &change.id),
                progress("awaiting confirm", Some(by)),
                true,
            );
            return;
        }
        self.succeed();
    }

    /// The operator's `confirm`.
    pub fn confirm(&mut self) -> Result<Value, String> {
        let Some(change) = self.change.as_mut() else {
            return Err("no firewall change awaits confirmation".into());
        };
        if matches!(change.phase, Phase::Reverting(_)) {
            return Err(format!("too late: command {} is being reverted", Printable(&change.id)));
        }
        change.confirmed = true;
        let id = change.id.clone();
        if matches!(change.phase, Phase::AwaitingConfirm) {
            self.succeed();
            return Ok(json!({ "confirmed": id }));
        }
        Ok(json!({ "confirmed": id, "note": "kept once the broker is reached on a fresh connection" }))
    }

    fn succeed(&mut self) {
        let Some(change) = self.change.take() else { return };
        let Some(pending) = self.journal.pending.clone() else { return };
        let current = self.journal.current.clone();
        let result = json!({
            "backend": current.as_ref().map(|c| c.backend.clone()),
            "checked_s": (change.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "confirmed": change.confirmed,
        });
        log::info!("firewall {}: kept", Printable(&change.id));
        let state = CommandState::Successful { result };
        self.settle(pending, state);
    }

    /// Records the pending change's final state: kept (success) or restored (failure).
    fn settle(&mut self, pending: Pending, state: CommandState) {
        if matches!(state, CommandState::Failed { .. }) {
            self.journal.current = pending.restore.clone();
            self.journal.previous = pending.before.clone();
        }
        self.journal.pending = None;
        self.journal.settled = Some((pending.id.clone(), state.clone()));
        if let Err(e) = write_journal(&self.settings.journal, &self.journal) {
            log::error!("firewall: cannot write the journal: {e}");
        }
        self.finished.push((pending.id, state));
    }

    fn begin_revert(&mut self, reason: String) {
        let (Some(change), Some(pending)) = (self.change.as_ref(), self.journal.pending.as_ref()) else {
            return;
        };
        log::warn!("firewall {}: {reason}", Printable(&change.id));
        self.generation += 1;
        let generation = self.generation;
        let (current, restore) = (self.journal.current.clone(), pending.restore.clone());
        let spawned = self
            .workers
            .spawn("firewall", move || (generation, restore_blocking(current.as_ref(), restore.as_ref())));
        match spawned {
            Ok(()) => {
                if let Some(change) = self.change.as_mut() {
                    change.generation = generation;
                    change.phase = Phase::Reverting(reason);
                }
            }
            Err(e) => {
                // No thread: restore on the loop's, as at start.
                log::error!("firewall: {e}");
                self.change = None;
                self.revert_now(&reason);
                self.reconnect = true;
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.change.as_ref().filter(|c| c.waits()).map(|c| c.deadline)
    }

    pub fn on_timer(&mut self, now: Instant) {
        let Some(change) = self.change.as_ref().filter(|c| c.waits() && now >= c.deadline) else { return };
        let reason = match change.phase {
            Phase::AwaitingConfirm => format!(
                "not confirmed within {} s: the broker was reached on a fresh connection, but no confirm came \
                 from the operator; the previous rules are restored",
                change.confirm_s
            ),
            _ => format!(
                "not confirmed within {} s: no broker round trip on a fresh connection after the apply (the \
                 rules may block the broker); the previous rules are restored",
                change.confirm_s
            ),
        };
        self.begin_revert(reason);
    }

    /// Changes over since the last call: (command id, final state).
    pub fn take_finished(&mut self) -> Vec<(String, CommandState)> {
        std::mem::take(&mut self.finished)
    }

    /// The `show` action of command `id`: what is in force, what a revert goes back to, what
    /// is pending, and what the kernel holds of Tether's rules, listed on a worker (iptables may
    /// wait for its lock); the answer comes through `take_finished`.
    pub fn show(&mut self, id: &str) -> Result<(), String> {
        let backend = self.backend.clone()?;
        let pending = self
            .journal
            .pending
            .as_ref()
            .map(|p| json!({"id": p.id, "confirm_by": p.deadline, "confirm": p.confirm}));
        let mut result = json!({
            "backend": backend.name(),
            "ruleset": self.journal.current.as_ref().and_then(|c| c.ruleset.clone()),
            "previous": self.journal.previous.as_ref().and_then(|c| c.ruleset.clone()),
            "pending": pending,
            "persist": self.settings.persist,
        });
        let id = id.to_string();
        self.shows.spawn("firewall-show", move || {
            result["kernel"] = json!(backend::list(backend));
            (id, result)
        })
    }
}

impl Change {
    /// Waiting for the broker or the operator (the deadline applies).
    fn waits(&self) -> bool {
        matches!(self.phase, Phase::Reconnecting | Phase::Probing { .. } | Phase::AwaitingConfirm)
    }
}

fn progress(phase: &str, confirm_by: Option<u64>) -> Vec<u8> {
    let mut progress = json!({ "phase": phase });
    if let Some(by) = confirm_by {
        progress["confirm_by"] = json!(by);
    }
    json!({ "status": "executing", "progress": progress }).to_string().into_bytes()
}

fn failed(id: &str, reason: &str, restored: Result<(), String>) -> CommandState {
    let reason = match restored {
        Ok(()) => reason.to_string(),
        Err(e) => {
            log::error!("firewall {}: cannot restore the previous rules: {e}", Printable(id));
            format!("{reason}; but restoring the previous rules failed: {e}")
        }
    };
    log::warn!("firewall {}: failed: {}", Printable(id), Printable(&reason));
    CommandState::Failed { reason }
}

fn apply_blocking(applied: &Applied) -> Result<(), String> {
    let backend = Backend::from_name(&applied.backend).ok_or("unknown backend in the journal")?;
    let set = applied.ruleset.as_ref().map(RuleSet::from_json).transpose()?;
    backend::apply(backend, set.as_ref())
}

/// Puts `restore` back in place of `current`: Tether's rules removed from `current`'s
/// backend when `restore` is on another one (or is nothing at all).
fn restore_blocking(current: Option<&Applied>, restore: Option<&Applied>) -> Result<(), String> {
    if let Some(current) = current.filter(|c| restore.is_none_or(|r| r.backend != c.backend)) {
        apply_blocking(&Applied { backend: current.backend.clone(), ruleset: None })?;
    }
    match restore {
        Some(restore) => apply_blocking(restore),
        None => Ok(()),
    }
}

fn write_journal(path: &std::path::Path, journal: &Journal) -> Result<(), String> {
    let bytes = serde_json::to_vec(journal).map_err(|e| e.to_string())?;
    fsutil::write_atomic(path, &bytes).map_err(|e| error_text(&e))
}
