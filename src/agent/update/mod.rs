//! Software updates (docs/updates.md): the `update` op runs a signed flow of steps that
//! survives power loss. One flow runs at a time; its state (`run::FlowRun`) is journaled in
//! `STATE_DIR/update/flow.json` before each task begins and after each ends, so that an agent
//! killed at any point resumes it at its next start and the flow ends with exactly one final
//! state: a task cut short is run again where that is safe (download, install, undo, service)
//! and counts as failed where it is not (a command: it may have done half its work).
//!
//! Tasks run on worker threads; the loop keeps the watchdog (a task over its `timeout_s` is
//! stopped and handled by its on_fail), the update inhibitor (`updates.hold_file`) and the
//! progress reports (at most one a second, each replacing the last unsent one).

pub mod download;
pub mod flow;
pub mod probation;
pub mod run;
pub mod self_update;
pub mod tasks;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::identity;
use super::outbox::{Kind, Outbox};
use crate::fsutil::{self, error_text};
use crate::protocol::{CommandState, Topics};
use crate::text::Printable;
use crate::worker::Workers;
use download::{Cancel, Download};
use flow::{Action, Flow, Step};
use probation::{Plan, Reporter};
use run::{Done, FlowRun, Task};
use self_update::Prepared;

/// How often progress goes out at most, and the hold file is looked at.
const TICK: Duration = Duration::from_secs(1);
/// A retryable download failure (a cut link, a 5xx) is tried again after this, doubling.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What the updates need from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The journal and the outputs of run steps: `STATE_DIR/update`.
    pub dir: PathBuf,
    pub download_dir: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub proxy: Option<String>,
    pub hold_file: PathBuf,
    pub hold_max: Duration,
    pub init_dir: PathBuf,
    pub reboot_command: Vec<String>,
    /// In the environment of the flow's commands, as TETHER_DEVICE_ID.
    pub device: String,
    /// For agent steps: the running binary, its arguments and its config file.
    pub exe: PathBuf,
    pub argv: Vec<OsString>,
    pub config_path: PathBuf,
    pub probation: Duration,
}

impl Settings {
    pub fn of(config: &crate::config::Config, config_path: &Path) -> Settings {
        let updates = &config.updates;
        Settings {
            dir: config.state_dir.join("update"),
            download_dir: updates.download_dir.clone(),
            ca_file: updates.ca_file.clone(),
            proxy: config.broker.proxy.clone(),
            hold_file: updates.hold_file.clone(),
            hold_max: Duration::from_secs(updates.hold_max_s),
            init_dir: updates.init_dir.clone(),
            reboot_command: config.reboot_command.clone(),
            device: crate::agent::identity::device_id(config).unwrap_or_default(),
            exe: self_update::running_exe(),
            argv: std::env::args_os().collect(),
            config_path: config_path.to_path_buf(),
            probation: Duration::from_secs(updates.probation_s),
        }
    }
}

pub struct Updates {
    settings: Settings,
    topics: Topics,
    current: Option<Current>,
    workers: Workers<(u64, Outcome)>,
    /// Numbers the tasks started, so that a result of one given up (timed out) is ignored.
    generation: u64,
    /// Flows over, with their final state, for the commands to publish.
    finished: Vec<(String, CommandState)>,
    /// A new agent binary ready for its probation: the agent hands over to its guard.
    handover: Option<Plan>,
    /// Set when this agent is the new binary on probation.
    reporter: Reporter,
}

/// How a task's worker ended.
enum Outcome {
    Done(Result<Done, String>),
    /// The reboot command returned: the system is going down; the flow goes on after the boot.
    Rebooting,
    /// An agent step's preparation ended.
    Agent(Result<Prepared, String>),
}

/// The journal: the flow under way, as `STATE_DIR/update/flow.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    /// The `update` command's id.
    id: String,
    run: FlowRun,
    /// What the task under way noted before it began: for an install whether its file existed
    /// (`existed`/`absent`), for a reboot the boot id before it.
    #[serde(default)]
    mark: Option<String>,
    /// Where an agent step is (see `probation`).
    #[serde(default)]
    agent: Option<AgentStage>,
    /// Probations the agent step under way began.
    #[serde(default)]
    probations: u32,
}

/// An agent step past its preparation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStage {
    /// The new binary runs on probation, guarded by the old agent.
    Probation,
    /// It passed and is in place.
    Swapped,
    /// It did not pass; the old agent runs on.
    Failed { reason: String },
}

impl Journal {
    fn path(dir: &Path) -> PathBuf {
        dir.join("flow.json")
    }

    /// The journal in the update directory `dir`, if there is one.
    fn read(dir: &Path) -> Result<Option<Journal>, String> {
        let path = Journal::path(dir);
        let bytes = match fsutil::read_optional(&path) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {}", path.display(), error_text(&e))),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: unreadable ({e}); the update it held is lost", path.display()))
    }

    fn write(&self, dir: &Path) -> Result<(), String> {
        let bytes = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        fsutil::create_private_dir(dir).map_err(|e| error_text(&e))?;
        fsutil::write_atomic(&Journal::path(dir), &bytes).map_err(|e| error_text(&e))
    }
}

/// Sets the agent stage in the journal of `dir` (the guard, between two agents).
fn record_agent_stage(dir: &Path, stage: AgentStage) -> Result<(), String> {
    let mut journal = Journal::read(dir)?.ok_or("no journal")?;
    journal.agent = Some(stage);
    journal.write(dir)
}

struct Current {
    journal: Journal,
    task: Option<Running>,
    /// When the hold file was first seen (the flow waits before its first step).
    held_since: Option<Instant>,
    /// The reboot command ran: waiting for the system to go down, until this time.
    rebooting_until: Option<Instant>,
    /// Bytes of the download under way, and its size.
    bytes: Arc<Bytes>,
    progress_sent: Option<(Instant, Value)>,
    /// This agent is the new binary on probation: its guard carries the flow on.
    guarded: bool,
}

/// The download under way: bytes done and its size, written by its worker, read by the loop.
/// A mutex, not two atomics: ARMv5 has no 64-bit atomics, and files pass 4 GiB.
#[derive(Default)]
struct Bytes(Mutex<(u64, u64)>);

impl Bytes {
    fn get(&self) -> (u64, u64) {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, done: u64, total: u64) {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = (done, total);
    }
}

struct Running {
    generation: u64,
    deadline: Instant,
    cancel: Cancel,
    timeout_s: u64,
}

impl Updates {
    pub fn new(settings: Settings, topics: Topics, waker: Arc<mio::Waker>, reporter: Reporter) -> Updates {
        Updates {
            settings,
            topics,
            current: None,
            workers: Workers::new(waker),
            generation: 0,
            finished: Vec::new(),
            handover: None,
            reporter,
        }
    }

    /// The connection is up: a new agent on probation tells its guard.
    pub fn on_connected(&self) {
        self.reporter.connected();
    }

    /// A new agent binary is ready for its probation: the loop stops and hands this to the
    /// guard (`probation::guard`).
    pub fn take_handover(&mut self) -> Option<Plan> {
        self.handover.take()
    }

    pub fn reconfigure(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// The id of the flow under way, if one is.
    pub fn busy(&self) -> Option<&str> {
        self.current.as_ref().map(|c| c.journal.id.as_str())
    }

    /// At start: the flow a previous run left under way, resumed; its command id.
    pub fn resume(&mut self) -> Option<String> {
        let journal = match Journal::read(&self.settings.dir) {
            Ok(journal) => journal?,
            Err(e) => {
                log::error!("{e}");
                return None;
            }
        };
        let id = journal.id.clone();
        if self.reporter.on_probation() {
            // The old agent guards this one and carries the flow on after the verdict.
            log::info!("update {}: this agent runs on probation", Printable(&id));
            self.current = Some(Current { guarded: true, ..Current::new(journal) });
            return Some(id);
        }
        log::info!("update {}: resuming at {}", Printable(&id), journal.run.position());
        self.current = Some(Current::new(journal));
        self.settle_interrupted_task();
        self.advance();
        Some(id)
    }

    /// Starts the flow of command `id` (recorded executing already).
    pub fn begin(&mut self, id: &str, flow: Flow) -> Result<(), String> {
        if let Some(busy) = self.busy() {
            return Err(format!("an update is under way (command {})", Printable(busy)));
        }
        let journal =
            Journal { id: id.to_string(), run: FlowRun::new(flow), mark: None, agent: None, probations: 0 };
        self.write(&journal).map_err(|e| format!("not started: cannot write the update journal: {e}"))?;
        log::info!(
            "update {}: flow {} {} begins",
            Printable(id),
            journal.run.flow.name,
            journal.run.flow.version
        );
        self.current = Some(Current::new(journal));
        self.advance();
        Ok(())
    }

    /// Results of tasks.
    pub fn on_wake(&mut self) {
        while let Some((generation, outcome)) = self.workers.try_recv() {
            let Some(current) = &mut self.current else { continue };
            if current.task.as_ref().is_none_or(|t| t.generation != generation) {
                continue; // given up already (timed out)
            }
            let task = current.task.take().expect("checked above");
            match outcome {
                Outcome::Rebooting => {
                    log::info!("update {}: rebooting", Printable(&current.journal.id));
                    current.rebooting_until = Some(task.deadline);
                }
                Outcome::Done(result) => self.task_done(result),
                Outcome::Agent(Ok(Prepared::Running)) => self.task_done(Ok(Done {
                    output: Some(format!(
                        "tether-agent {} is the binary named: nothing to do",
                        crate::VERSION
                    )),
                    installed: None,
                })),
                Outcome::Agent(Ok(Prepared::Staged { sha256 })) => self.hand_over(sha256),
                Outcome::Agent(Err(why)) => self.task_done(Err(why)),
            }
        }
        self.advance();
    }

    /// Journals the probation, then readies the handover.
    fn hand_over(&mut self, sha256: String) {
        let Some(current) = &mut self.current else { return };
        let staged = match current.journal.run.task() {
            Some(Task::Step { step, .. }) => self_update::staged_path(&self.settings, step),
            _ => return,
        };
        current.journal.probations += 1;
        if current.journal.probations > self_update::MAX_PROBATIONS {
            let why = format!(
                "the probation was cut short {} times (the agent stopped, or the power went)",
                self_update::MAX_PROBATIONS
            );
            return self.task_done(Err(why));
        }
        current.journal.agent = Some(AgentStage::Probation);
        let journal = current.journal.clone();
        if let Err(e) = self.write(&journal) {
            return self.task_done(Err(format!("not run: cannot write the update journal: {e}")));
        }
        self.handover = Some(Plan {
            id: journal.id,
            staged,
            sha256,
            exe: self.settings.exe.clone(),
            argv: self.settings.argv.clone(),
            probation: self.settings.probation,
            dir: self.settings.dir.clone(),
        });
    }

    /// Flows over since the last call: (command id, final state).
    pub fn take_finished(&mut self) -> Vec<(String, CommandState)> {
        std::mem::take(&mut self.finished)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let current = self.current.as_ref()?;
        let tick = (current.task.is_some() || current.held_since.is_some()).then(|| Instant::now() + TICK);
        let task = current.task.as_ref().map(|t| t.deadline);
        [tick, task, current.rebooting_until].into_iter().flatten().min()
    }

    pub fn on_timer(&mut self, now: Instant, outbox: &mut Outbox) {
        let Some(current) = &mut self.current else { return };
        if let Some(task) = current.task.as_ref().filter(|t| now >= t.deadline) {
            let why = format!("timed out after {} s (its timeout_s)", task.timeout_s);
            task.cancel.cancel();
            current.task = None;
            self.task_done(Err(why));
        } else if current.rebooting_until.is_some_and(|until| now >= until) {
            current.rebooting_until = None;
            self.task_done(Err("the system did not reboot in time".into()));
        }
        self.advance();
        self.report_progress(now, outbox);
    }

    /// Progress of the flow under way on its command's topic, when it changed, at most once a
    /// second; the outbox keeps only the latest unsent state of a topic.
    fn report_progress(&mut self, now: Instant, outbox: &mut Outbox) {
        let topic = |id: &str| self.topics.command("update", id);
        let Some(current) = &mut self.current else { return };
        if current.progress_sent.as_ref().is_some_and(|(at, _)| now < *at + TICK) {
            return;
        }
        let mut progress = current.journal.run.position();
        let (done, total) = current.bytes.get();
        if total > 0 {
            progress["done"] = json!(done);
            progress["total"] = json!(total);
        }
        if let Some(since) = current.held_since {
            progress["held_s"] = json!(since.elapsed().as_secs());
        }
        if current.progress_sent.as_ref().is_some_and(|(_, sent)| *sent == progress) {
            return;
        }
        let payload = json!({ "status": "executing", "progress": progress }).to_string().into_bytes();
        outbox.push(Kind::CommandState, topic(&current.journal.id), payload, true);
        current.progress_sent = Some((now, progress));
    }

    fn write(&self, journal: &Journal) -> Result<(), String> {
        journal.write(&self.settings.dir)
    }

    /// After a restart, the task the journal says had begun: done (a reboot that happened),
    /// to run again, or failed (a command cut short, a reboot that did not happen).
    fn settle_interrupted_task(&mut self) {
        let Some(current) = &self.current else { return };
        let journal = &current.journal;
        if !journal.run.started {
            return;
        }
        let result = match &journal.agent {
            Some(AgentStage::Failed { reason }) => Err(reason.clone()),
            Some(AgentStage::Swapped) => Ok(Done {
                output: Some(format!("tether-agent {} passed its probation and runs", crate::VERSION)),
                installed: None,
            }),
            // Cut short without a verdict (no guard ran it to its end): it begins again.
            Some(AgentStage::Probation) | None => return self.settle_other_task(),
        };
        self.task_done(result);
    }

    fn settle_other_task(&mut self) {
        let Some(current) = &self.current else { return };
        let journal = &current.journal;
        let result = match journal.run.task() {
            Some(Task::Step { step, .. }) | Some(Task::Rollback { step, .. }) => match &step.action {
                Action::Reboot if journal.mark.as_deref() != Some(identity::boot_id().as_str()) => {
                    Ok(Done::default())
                }
                Action::Reboot => Err("the agent restarted but the system did not reboot".to_string()),
                Action::Run { .. } => Err("interrupted: the agent restarted while it ran".to_string()),
                _ => return, // run again
            },
            Some(Task::OnFailCommand { .. }) => {
                Err("interrupted: the agent restarted while it ran".to_string())
            }
            _ => return,
        };
        self.task_done(result);
    }

    fn task_done(&mut self, result: Result<Done, String>) {
        let Some(current) = &mut self.current else { return };
        let id = &current.journal.id;
        match &result {
            Ok(_) => log::info!("update {}: {} done", Printable(id), current.journal.run.position()["name"]),
            Err(why) => log::warn!(
                "update {}: {} failed: {}",
                Printable(id),
                current.journal.run.position()["name"],
                Printable(why)
            ),
        }
        current.journal.run.on_done(result);
        current.journal.mark = None;
        current.journal.agent = None;
        current.journal.probations = 0;
        current.bytes.set(0, 0);
        let journal = current.journal.clone();
        if let Err(e) = self.write(&journal) {
            // The next task must not begin with the journal behind: it would run this one again.
            log::error!("update {}: cannot write the journal: {e}", Printable(&journal.id));
        }
    }

    /// Starts the next task, or ends the flow.
    fn advance(&mut self) {
        let Some(current) = &mut self.current else { return };
        if current.task.is_some() || current.rebooting_until.is_some() || current.guarded {
            return;
        }
        if let Some(outcome) = current.journal.run.outcome() {
            return self.finish(outcome);
        }
        if self.held(Instant::now()) {
            return;
        }
        if let Err(why) = self.start_task() {
            self.task_done(Err(why));
            self.advance();
        }
    }

    /// Whether the flow waits for the hold file to go (before its first step only).
    fn held(&mut self, now: Instant) -> bool {
        let Some(current) = &mut self.current else { return false };
        let first = current.journal.run.results.is_empty() && !current.journal.run.started;
        let hold = &self.settings.hold_file;
        if !(first && hold.exists()) {
            current.held_since = None;
            return false;
        }
        let since = *current.held_since.get_or_insert_with(|| {
            log::info!("update {}: held while {} exists", Printable(&current.journal.id), hold.display());
            now
        });
        if now < since + self.settings.hold_max {
            return true;
        }
        log::warn!(
            "update {}: {} still exists after {} s (updates.hold_max_s): going on",
            Printable(&current.journal.id),
            hold.display(),
            self.settings.hold_max.as_secs()
        );
        false
    }

    /// Journals the task as begun, then hands it to a worker.
    fn start_task(&mut self) -> Result<(), String> {
        let settings = self.settings.clone();
        let Some(current) = &mut self.current else { return Ok(()) };
        if !current.journal.run.started {
            current.journal.mark = current.journal.run.task().and_then(|task| mark(&task));
        }
        let task = current.journal.run.task().ok_or("no task")?;
        let job = prepare(&task, &current.journal, &settings, Arc::clone(&current.bytes))?;
        current.journal.run.started = true;
        let journal = current.journal.clone();
        self.write(&journal).map_err(|e| format!("not run: cannot write the update journal: {e}"))?;
        self.generation += 1;
        let (generation, cancel) = (self.generation, Cancel::new());
        let timeout_s = job.timeout_s;
        let worker_cancel = cancel.clone();
        self.workers.spawn("update", move || (generation, (job.work)(&worker_cancel)))?;
        let Some(current) = &mut self.current else { return Ok(()) };
        let deadline = Instant::now() + Duration::from_secs(timeout_s);
        current.task = Some(Running { generation, deadline, cancel, timeout_s });
        log::info!("update {}: {}", Printable(&journal.id), journal.run.position());
        Ok(())
    }

    fn finish(&mut self, outcome: Result<Value, String>) {
        let Some(current) = self.current.take() else { return };
        let journal = current.journal;
        tasks::forget_previous(&journal.run.installed);
        let state = match outcome {
            Ok(result) => CommandState::Successful { result },
            Err(reason) => CommandState::Failed { reason },
        };
        if let Err(e) = std::fs::remove_file(Journal::path(&self.settings.dir)) {
            log::error!("update {}: cannot remove the journal: {}", Printable(&journal.id), error_text(&e));
        }
        remove_downloads(&self.settings, &journal.run.flow);
        self.finished.push((journal.id, state));
    }
}

impl Current {
    fn new(journal: Journal) -> Current {
        Current {
            journal,
            task: None,
            held_since: None,
            rebooting_until: None,
            bytes: Arc::new(Bytes::default()),
            progress_sent: None,
            guarded: false,
        }
    }
}

/// What a task notes in the journal before it begins.
fn mark(task: &Task) -> Option<String> {
    let step = match task {
        Task::Step { step, .. } | Task::Rollback { step, .. } => step,
        _ => return None,
    };
    match &step.action {
        Action::Install { path, .. } => {
            Some(if Path::new(path).symlink_metadata().is_ok() { "existed" } else { "absent" }.into())
        }
        Action::Reboot => Some(identity::boot_id()),
        _ => None,
    }
}

/// A task ready for a worker.
struct Job {
    timeout_s: u64,
    work: Box<dyn FnOnce(&Cancel) -> Outcome + Send>,
}

fn prepare(task: &Task, journal: &Journal, settings: &Settings, bytes: Arc<Bytes>) -> Result<Job, String> {
    let job = |timeout_s: u64, work: Box<dyn FnOnce(&Cancel) -> Outcome + Send>| Job { timeout_s, work };
    let done = |result: Result<Done, String>| Outcome::Done(result);
    match task {
        Task::Undo(installed) => {
            let installed = (*installed).clone();
            Ok(job(60, Box::new(move |_| done(tasks::undo(&installed).map(|()| Done::default())))))
        }
        Task::OnFailCommand { argv } => {
            let command =
                command_job(argv, &Default::default(), "on-fail", settings, flow::DEFAULT_STEP_TIMEOUT_S);
            Ok(job(flow::DEFAULT_STEP_TIMEOUT_S, command))
        }
        Task::Step { step, .. } | Task::Rollback { step, .. } => step_job(step, journal, settings, bytes),
    }
}

fn step_job(step: &Step, journal: &Journal, settings: &Settings, bytes: Arc<Bytes>) -> Result<Job, String> {
    let timeout_s = step.timeout_s;
    let work: Box<dyn FnOnce(&Cancel) -> Outcome + Send> = match &step.action {
        Action::Download { .. } => {
            let download = download_of(step, settings).ok_or("not a download")?;
            Box::new(move |cancel| Outcome::Done(fetch(&download, cancel, &bytes)))
        }
        Action::Install { artifact, path, mode, owner, group } => {
            let artifact = artifact_path(&settings.download_dir, artifact);
            let (path, mode, owner, group) = (PathBuf::from(path), *mode, owner.clone(), group.clone());
            let (step_name, flow_id) = (step.name.clone(), journal.id.clone());
            let existed = journal.mark.as_deref() == Some("existed");
            Box::new(move |_| {
                let job = tasks::Install {
                    step: &step_name,
                    artifact: &artifact,
                    path: &path,
                    mode,
                    owner: owner.as_deref(),
                    group: group.as_deref(),
                    existed,
                    flow_id: &flow_id,
                };
                Outcome::Done(
                    tasks::install(&job).map(|installed| Done { installed: Some(installed), output: None }),
                )
            })
        }
        Action::Run { argv, env } => command_job(argv, env, &step.name, settings, timeout_s),
        Action::Service { name, action } => {
            let script = settings.init_dir.join(name);
            if !script.is_file() {
                return Err(format!("no init script {}", script.display()));
            }
            let argv = vec![script.display().to_string(), action.clone()];
            command_job(&argv, &Default::default(), &step.name, settings, timeout_s)
        }
        Action::Agent { .. } => {
            let (step, settings) = (step.clone(), settings.clone());
            let download = download_of(&step, &settings)
                .ok_or_else(|| format!("no binary for this device's target {}", crate::TARGET))?;
            Box::new(move |cancel| {
                let fetch = || fetch(&download, cancel, &bytes).map(|_| ());
                Outcome::Agent(self_update::prepare(&step, &settings, cancel, fetch))
            })
        }
        Action::Reboot => {
            let argv = settings.reboot_command.clone();
            let run = command_job(&argv, &Default::default(), &step.name, settings, timeout_s);
            Box::new(move |cancel| match run(cancel) {
                Outcome::Done(Ok(_)) => Outcome::Rebooting,
                other => other,
            })
        }
    };
    Ok(Job { timeout_s, work })
}

/// A command of the flow, run in the download directory (where the artifacts are, also named
/// by TETHER_ARTIFACTS), its output in the update directory.
fn command_job(
    argv: &[String],
    env: &std::collections::BTreeMap<String, String>,
    name: &str,
    settings: &Settings,
    timeout_s: u64,
) -> Box<dyn FnOnce(&Cancel) -> Outcome + Send> {
    let (argv, mut env) = (argv.to_vec(), env.clone());
    env.insert("TETHER_ARTIFACTS".into(), settings.download_dir.display().to_string());
    env.insert("TETHER_DEVICE_ID".into(), settings.device.clone());
    let (dir, output) =
        (settings.download_dir.clone(), settings.dir.join(format!("output-{}", file_safe(name))));
    Box::new(move |cancel| {
        let _ = fsutil::create_private_dir(&dir);
        let job = tasks::Run {
            argv: &argv,
            env: &env,
            dir: &dir,
            timeout: Duration::from_secs(timeout_s),
            output: &output,
        };
        let result = tasks::run(&job, || cancel.is_cancelled());
        let _ = std::fs::remove_file(&output);
        Outcome::Done(result.map(|tail| Done { output: Some(tail), installed: None }))
    })
}

/// One download attempt after another while the failures are worth a retry (a cut link, a
/// stalled or unreachable server: the bytes on disk are kept and only the rest asked for).
fn fetch(download: &Download, cancel: &Cancel, bytes: &Bytes) -> Result<Done, String> {
    let mut wait = RETRY_FIRST;
    loop {
        let attempt = download.run(cancel, |p| {
            bytes.set(p.done, p.total);
        });
        match attempt {
            Ok(_) => return Ok(Done::default()),
            Err(e) if e.failure.retryable() && !cancel.is_cancelled() => {
                log::info!(
                    "download {}: {e}; again in {} s",
                    download::shown_url(&download.url),
                    wait.as_secs()
                );
                let until = Instant::now() + wait;
                while Instant::now() < until && !cancel.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                wait = (wait * 2).min(RETRY_MAX);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

pub(super) fn artifact_path(download_dir: &Path, step: &str) -> PathBuf {
    download_dir.join(file_safe(step))
}

/// A step's name as a file name: what is not a letter, digit, `-`, `_` or `.` becomes `_`.
fn file_safe(name: &str) -> String {
    let safe: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    match safe.trim_start_matches('.') {
        "" => "_".into(),
        trimmed => trimmed.to_string(),
    }
}

/// The flow is over: its artifacts (and any partial download) go.
fn remove_downloads(settings: &Settings, flow: &Flow) {
    for download in flow.steps.iter().filter_map(|step| download_of(step, settings)) {
        let _ = download.discard();
        let _ = std::fs::remove_file(&download.dest);
    }
}

/// What a download step, or an agent step for this target, fetches, and where to.
fn download_of(step: &Step, settings: &Settings) -> Option<Download> {
    let (url, sha256, size) = match &step.action {
        Action::Download { url, sha256, size } => (url, sha256, size),
        Action::Agent { .. } => {
            let binary = self_update::binary_of(step)?;
            (&binary.url, &binary.sha256, &binary.size)
        }
        _ => return None,
    };
    Some(Download {
        url: url.clone(),
        sha256: sha256.clone(),
        size: *size,
        dest: artifact_path(&settings.download_dir, &step.name),
        ca_file: settings.ca_file.clone(),
        proxy: settings.proxy.clone(),
    })
}
