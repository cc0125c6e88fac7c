//! Where a flow stands, and where it goes next: pure, without I/O, so that every path through
//! `on_fail` and rollback is tested without running anything. The journal stores it whole
//! (`FlowRun` is what is written before each side effect and after each result).
//!
//! A flow runs its steps in order. A step that fails leads by its `on_fail` to: abort (the flow
//! fails), continue (with the next step), rollback (the completed installs are undone last
//! first, then the flow's rollback steps run, and the flow fails), or a command to run before
//! aborting. Undo and rollback go on through their own failures: they are the way back, and
//! stopping half way would leave the device in neither version.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::flow::{Flow, OnFail, Step};

/// The longest output kept of a step (its last bytes).
pub const OUTPUT_TAIL: usize = 2048;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowRun {
    pub flow: Flow,
    pub phase: Phase,
    /// What each step that ran gave, in the order they ran.
    pub results: Vec<StepResult>,
    /// Files installed so far, in order: undone last first.
    pub installed: Vec<Installed>,
    /// The failure that turned the flow back (rollback, or the on_fail command).
    pub failure: Option<String>,
    /// What went wrong on the way back.
    pub rollback_errors: Vec<String>,
    /// The task of `phase` has begun: its side effects may be under way.
    pub started: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Running `steps[step]`.
    Forward {
        step: usize,
    },
    /// Undoing `installed[index]`, then those before it.
    Undo {
        index: usize,
    },
    /// Running the flow's `rollback[step]`.
    Rollback {
        step: usize,
    },
    /// Running a failed step's on_fail command.
    OnFail {
        step: usize,
    },
    Done {
        successful: bool,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub name: String,
    /// `successful`, `failed`, `undone`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The end of what a run step wrote (stdout and stderr).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// A file an install step replaced or created, and how to put it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    pub step: String,
    pub path: String,
    /// The previous file, kept (hard-linked) beside it; None: there was none (undo removes it).
    pub previous: Option<String>,
}

/// What the agent is to do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Task<'a> {
    Step {
        index: usize,
        step: &'a Step,
    },
    Undo(&'a Installed),
    /// A step of the flow's rollback list.
    Rollback {
        index: usize,
        step: &'a Step,
    },
    /// The on_fail command of the step that failed.
    OnFailCommand {
        argv: &'a [String],
    },
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Done {
    pub output: Option<String>,
    pub installed: Option<Installed>,
}

impl FlowRun {
    pub fn new(flow: Flow) -> FlowRun {
        FlowRun {
            flow,
            phase: Phase::Forward { step: 0 },
            results: Vec::new(),
            installed: Vec::new(),
            failure: None,
            rollback_errors: Vec::new(),
            started: false,
        }
    }

    /// The task to carry out now; None once the flow is over.
    pub fn task(&self) -> Option<Task<'_>> {
        match &self.phase {
            Phase::Forward { step } => Some(Task::Step { index: *step, step: &self.flow.steps[*step] }),
            Phase::Undo { index } => Some(Task::Undo(&self.installed[*index])),
            Phase::Rollback { step } => {
                Some(Task::Rollback { index: *step, step: &self.flow.rollback[*step] })
            }
            Phase::OnFail { step } => match &self.flow.steps[*step].on_fail {
                OnFail::Run(argv) => Some(Task::OnFailCommand { argv }),
                _ => None,
            },
            Phase::Done { .. } => None,
        }
    }

    /// The final state, once the flow is over: its result, or why it failed.
    pub fn outcome(&self) -> Option<Result<Value, String>> {
        match &self.phase {
            Phase::Done { successful: true, .. } => Some(Ok(json!({
                "flow": self.flow.name,
                "version": self.flow.version,
                "steps": self.results,
            }))),
            Phase::Done { successful: false, reason } => Some(Err(reason.clone())),
            _ => None,
        }
    }

    /// Step i of n, its name, and the phase, for progress reports.
    pub fn position(&self) -> Value {
        let (phase, index, total, name) = match &self.phase {
            Phase::Forward { step } => {
                ("forward", *step, self.flow.steps.len(), self.flow.steps[*step].name.as_str())
            }
            Phase::Undo { index } => {
                ("undo", *index, self.installed.len(), self.installed[*index].step.as_str())
            }
            Phase::Rollback { step } => {
                ("rollback", *step, self.flow.rollback.len(), self.flow.rollback[*step].name.as_str())
            }
            Phase::OnFail { step } => {
                ("on_fail", *step, self.flow.steps.len(), self.flow.steps[*step].name.as_str())
            }
            Phase::Done { .. } => ("done", 0, 0, ""),
        };
        json!({ "phase": phase, "step": index + 1, "steps": total, "name": name })
    }

    /// The task ended: on to the next one.
    pub fn on_done(&mut self, result: Result<Done, String>) {
        self.started = false;
        match self.phase.clone() {
            Phase::Forward { step } => self.after_step(step, result),
            Phase::Undo { index } => {
                let installed = &self.installed[index];
                let name = format!("undo {}", installed.step);
                if let Err(why) = &result {
                    self.rollback_errors.push(format!("{name}: {why}"));
                }
                self.record(&name, &result, "undone");
                self.phase = match index {
                    0 => Phase::Rollback { step: 0 },
                    _ => Phase::Undo { index: index - 1 },
                };
                self.skip_empty_rollback();
            }
            Phase::Rollback { step } => {
                let name = self.flow.rollback[step].name.clone();
                if let Err(why) = &result {
                    self.rollback_errors.push(format!("{name}: {why}"));
                }
                self.record(&name, &result, "successful");
                self.phase = Phase::Rollback { step: step + 1 };
                self.skip_empty_rollback();
            }
            Phase::OnFail { step } => {
                let name = format!("on_fail of {}", self.flow.steps[step].name);
                self.record(&name, &result, "successful");
                let mut reason = self.failure.clone().unwrap_or_default();
                if let Err(why) = result {
                    reason.push_str(&format!("; its on_fail command failed too: {why}"));
                }
                self.phase = Phase::Done { successful: false, reason };
            }
            Phase::Done { .. } => {}
        }
    }

    fn after_step(&mut self, step: usize, result: Result<Done, String>) {
        let current = &self.flow.steps[step];
        let (name, on_fail) = (current.name.clone(), current.on_fail.clone());
        if let Ok(Done { installed: Some(installed), .. }) = &result {
            self.installed.push(installed.clone());
        }
        self.record(&name, &result, "successful");
        let Err(why) = result else { return self.forward_from(step + 1) };
        let failure = format!("step {} of {} ({name}) failed: {why}", step + 1, self.flow.steps.len());
        match on_fail {
            OnFail::Abort => self.phase = Phase::Done { successful: false, reason: failure },
            OnFail::Continue => self.forward_from(step + 1),
            OnFail::Run(_) => {
                self.failure = Some(failure);
                self.phase = Phase::OnFail { step };
            }
            OnFail::Rollback => {
                self.failure = Some(failure);
                self.phase = match self.installed.len() {
                    0 => Phase::Rollback { step: 0 },
                    n => Phase::Undo { index: n - 1 },
                };
                self.skip_empty_rollback();
            }
        }
    }

    fn forward_from(&mut self, step: usize) {
        self.phase = match step < self.flow.steps.len() {
            true => Phase::Forward { step },
            false => Phase::Done { successful: true, reason: String::new() },
        };
    }

    /// Past the last rollback step: the flow is over, failed, and says how far back it got.
    fn skip_empty_rollback(&mut self) {
        if !matches!(self.phase, Phase::Rollback { step } if step >= self.flow.rollback.len()) {
            return;
        }
        let failure = self.failure.clone().unwrap_or_default();
        let reason = match self.rollback_errors.is_empty() {
            true => format!("{failure}; rolled back"),
            false => format!("{failure}; the rollback did not complete: {}", self.rollback_errors.join("; ")),
        };
        self.phase = Phase::Done { successful: false, reason };
    }

    fn record(&mut self, name: &str, result: &Result<Done, String>, ok_status: &str) {
        let (status, reason, output) = match result {
            Ok(done) => (ok_status, None, done.output.clone()),
            Err(why) => ("failed", Some(why.clone()), None),
        };
        self.results.push(StepResult { name: name.to_string(), status: status.into(), reason, output });
    }
}

/// The last `OUTPUT_TAIL` bytes of `output`, as text.
pub fn output_tail(output: &[u8]) -> String {
    let start = output.len().saturating_sub(OUTPUT_TAIL);
    String::from_utf8_lossy(&output[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn flow(on_fail: Value) -> Flow {
        Flow::from_json(&json!({
            "name": "app", "version": "2",
            "steps": [
                {"name": "fetch", "type": "download", "url": "https://h/a", "sha256": HASH, "size": 4},
                {"name": "bin", "type": "install", "artifact": "fetch", "path": "/usr/bin/app"},
                {"name": "conf", "type": "install", "artifact": "fetch", "path": "/etc/app.conf"},
                {"name": "check", "type": "run", "argv": ["app", "--check"], "on_fail": on_fail},
                {"name": "last", "type": "run", "argv": ["true"]}
            ],
            "rollback": [{"name": "tell", "type": "run", "argv": ["logger", "rolled back"]}]
        }))
        .unwrap()
    }

    fn installed(step: &str, path: &str) -> Done {
        let previous = Some(format!("{path}.prev"));
        Done { installed: Some(Installed { step: step.into(), path: path.into(), previous }), output: None }
    }

    /// Runs the flow, the check step failing; returns the tasks seen, by name.
    fn run_with_failing_check(run: &mut FlowRun, undo_fails: bool) -> Vec<String> {
        let mut seen = Vec::new();
        while let Some(task) = run.task() {
            let (name, result) = match task {
                Task::Step { step, .. } if step.name == "check" => {
                    (step.name.clone(), Err("exit 1".to_string()))
                }
                Task::Step { step, .. } if step.name == "bin" || step.name == "conf" => {
                    let path = if step.name == "bin" { "/usr/bin/app" } else { "/etc/app.conf" };
                    (step.name.clone(), Ok(installed(&step.name, path)))
                }
                Task::Step { step, .. } => (step.name.clone(), Ok(Done::default())),
                Task::Undo(i) if undo_fails && i.step == "conf" => {
                    (format!("undo {}", i.step), Err("EROFS".into()))
                }
                Task::Undo(i) => (format!("undo {}", i.step), Ok(Done::default())),
                Task::Rollback { step, .. } => (step.name.clone(), Ok(Done::default())),
                Task::OnFailCommand { argv } => (argv.join(" "), Ok(Done::default())),
            };
            seen.push(name);
            run.on_done(result);
        }
        seen
    }

    #[test]
    fn all_steps_successful() {
        let mut run = FlowRun::new(flow(json!("abort")));
        let mut names = Vec::new();
        while let Some(Task::Step { step, .. }) = run.task() {
            names.push(step.name.clone());
            run.on_done(Ok(Done { output: Some("ok\n".into()), installed: None }));
        }
        assert_eq!(names, ["fetch", "bin", "conf", "check", "last"]);
        let result = run.outcome().unwrap().unwrap();
        assert_eq!(result["version"], "2");
        assert_eq!(result["steps"][3], json!({"name": "check", "status": "successful", "output": "ok\n"}));
    }

    #[test]
    fn abort_stops_at_the_failed_step() {
        let mut run = FlowRun::new(flow(json!("abort")));
        let seen = run_with_failing_check(&mut run, false);
        assert_eq!(seen, ["fetch", "bin", "conf", "check"]);
        assert_eq!(run.outcome(), Some(Err("step 4 of 5 (check) failed: exit 1".into())));
    }

    #[test]
    fn continue_goes_on_and_the_flow_succeeds_with_the_failure_recorded() {
        let mut run = FlowRun::new(flow(json!("continue")));
        let seen = run_with_failing_check(&mut run, false);
        assert_eq!(seen, ["fetch", "bin", "conf", "check", "last"]);
        let result = run.outcome().unwrap().unwrap();
        assert_eq!(result["steps"][3]["status"], "failed");
        assert_eq!(result["steps"][3]["reason"], "exit 1");
    }

    #[test]
    fn rollback_undoes_the_installs_last_first_then_runs_the_rollback_steps() {
        let mut run = FlowRun::new(flow(json!("rollback")));
        let seen = run_with_failing_check(&mut run, false);
        assert_eq!(seen, ["fetch", "bin", "conf", "check", "undo conf", "undo bin", "tell"]);
        assert_eq!(run.outcome(), Some(Err("step 4 of 5 (check) failed: exit 1; rolled back".into())));
    }

    #[test]
    fn a_rollback_goes_on_through_its_own_failures_and_says_so() {
        let mut run = FlowRun::new(flow(json!("rollback")));
        let seen = run_with_failing_check(&mut run, true);
        assert_eq!(seen, ["fetch", "bin", "conf", "check", "undo conf", "undo bin", "tell"]);
        assert_eq!(
            run.outcome(),
            Some(Err(
                "step 4 of 5 (check) failed: exit 1; the rollback did not complete: undo conf: EROFS".into()
            ))
        );
    }

    #[test]
    fn an_on_fail_command_runs_then_the_flow_aborts() {
        let mut run = FlowRun::new(flow(json!({"run": ["logger", "check failed"]})));
        let seen = run_with_failing_check(&mut run, false);
        assert_eq!(seen, ["fetch", "bin", "conf", "check", "logger check failed"]);
        assert_eq!(run.outcome(), Some(Err("step 4 of 5 (check) failed: exit 1".into())));
    }

    #[test]
    fn a_rollback_with_nothing_installed_and_no_rollback_steps_fails_at_once() {
        let mut flow = flow(json!("abort"));
        flow.steps[0].on_fail = OnFail::Rollback;
        flow.rollback.clear();
        let mut run = FlowRun::new(flow);
        run.on_done(Err("404".into()));
        assert_eq!(run.task(), None);
        assert_eq!(run.outcome(), Some(Err("step 1 of 5 (fetch) failed: 404; rolled back".into())));
    }

    #[test]
    fn the_journal_form_reads_back_the_same_at_every_point() {
        let mut run = FlowRun::new(flow(json!("rollback")));
        let mut checked = 0;
        while run.task().is_some() {
            run.started = true;
            let again: FlowRun = serde_json::from_str(&serde_json::to_string(&run).unwrap()).unwrap();
            assert_eq!(again, run);
            let result = match run.task() {
                Some(Task::Step { step, .. }) if step.name == "check" => Err("no".to_string()),
                Some(Task::Step { step, .. }) if step.name == "bin" => Ok(installed("bin", "/usr/bin/app")),
                _ => Ok(Done::default()),
            };
            run.on_done(result);
            checked += 1;
        }
        assert_eq!(checked, 6);
        assert!(!run.started);
    }
}
