//! An update flow as the operator writes it (docs/updates.md): a name, a version, ordered steps
//! each with its `on_fail`, and the flow's own rollback steps. Read from JSON with an error that
//! names the field (`steps[2].sha256: ...`), so that a flow is refused whole before anything runs.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The default limit of a step's run time (the watchdog).
pub const DEFAULT_STEP_TIMEOUT_S: u64 = 3600;
/// Steps in a flow at most (its journal is rewritten at each step).
pub const MAX_STEPS: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    pub name: String,
    pub version: String,
    pub steps: Vec<Step>,
    /// Run after the completed steps were undone, when a step's on_fail is `rollback`.
    pub rollback: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub action: Action,
    pub on_fail: OnFail,
    pub timeout_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Action {
    /// Fetched into the flow's artifacts directory under the step's name.
    Download {
        url: String,
        sha256: String,
        size: u64,
    },
    /// A downloaded artifact put at `path`, atomically, the previous file kept for a rollback.
    Install {
        artifact: String,
        path: String,
        mode: u32,
        owner: Option<String>,
        group: Option<String>,
    },
    Run {
        argv: Vec<String>,
        env: BTreeMap<String, String>,
    },
    /// `/etc/init.d/NAME ACTION`.
    Service {
        name: String,
        action: String,
    },
    /// Reboots; the flow goes on with the next step after the boot.
    Reboot,
    /// The agent updates itself (docs/updates.md): the binary for its target is fetched,
    /// checked, run on probation, and swapped in only when it passed.
    Agent {
        /// By target triple, as `tether-agent --arch` prints it.
        binaries: BTreeMap<String, Binary>,
        /// What the new binary's `--version` must say, when given.
        version: Option<String>,
        /// Try a binary that failed its probation here before.
        force: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binary {
    pub url: String,
    pub sha256: String,
    pub size: u64,
}

/// What a failed step leads to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFail {
    Abort,
    Continue,
    /// Undo the completed revertible steps (last first), run the flow's rollback steps, fail.
    Rollback,
    /// Run this argv, then abort.
    Run(Vec<String>),
}

const SERVICE_ACTIONS: [&str; 4] = ["restart", "reload", "start", "stop"];

impl Flow {
    /// The flow in `value`, checked whole: every field, every artifact an install names.
    pub fn from_json(value: &Value) -> Result<Flow, String> {
        let object = value.as_object().ok_or("the flow must be a JSON object")?;
        let fields = Fields { object, at: String::new() };
        fields.only(&["name", "version", "steps", "rollback"])?;
        let name = fields.text("name")?;
        let version = fields.text("version")?;
        let steps = steps(&fields, "steps", true)?;
        let rollback = steps_or_none(&fields, "rollback")?;
        let flow = Flow { name, version, steps, rollback };
        flow.check_names()?;
        Ok(flow)
    }

    fn check_names(&self) -> Result<(), String> {
        for (list, steps) in [("steps", &self.steps), ("rollback", &self.rollback)] {
            for (i, step) in steps.iter().enumerate() {
                if steps[..i].iter().any(|other| other.name == step.name) {
                    return Err(format!("{list}: two steps are named \"{}\"", step.name));
                }
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            if let Action::Install { artifact, .. } = &step.action {
                let downloaded = self.steps[..i]
                    .iter()
                    .any(|s| s.name == *artifact && matches!(s.action, Action::Download { .. }));
                if !downloaded {
                    return Err(format!(
                        "steps[{i}].artifact: \"{artifact}\" is not the name of a download step before it"
                    ));
                }
            }
        }
        if let Some(i) = self.rollback.iter().position(|s| {
            matches!(s.action, Action::Install { .. } | Action::Download { .. } | Action::Agent { .. })
        }) {
            return Err(format!(
                "rollback[{i}]: a rollback step runs, restarts or reboots; it does not download or install"
            ));
        }
        Ok(())
    }
}

fn steps_or_none(fields: &Fields, key: &str) -> Result<Vec<Step>, String> {
    match fields.object.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(_) => steps(fields, key, false),
    }
}

fn steps(fields: &Fields, key: &str, required: bool) -> Result<Vec<Step>, String> {
    let list = fields.array(key)?;
    if required && list.is_empty() {
        return Err(format!("{key}: a flow needs at least one step"));
    }
    if list.len() > MAX_STEPS {
        return Err(format!("{key}: {} steps, at most {MAX_STEPS}", list.len()));
    }
    list.iter().enumerate().map(|(i, value)| step(value, &format!("{key}[{i}]"), i)).collect()
}

fn step(value: &Value, at: &str, index: usize) -> Result<Step, String> {
    let object = value.as_object().ok_or_else(|| format!("{at}: must be an object"))?;
    let fields = Fields { object, at: format!("{at}.") };
    let kind = fields.text("type")?;
    let common = ["type", "name", "on_fail", "timeout_s"];
    let (action, own): (Action, &[&str]) = match kind.as_str() {
        "download" => (
            Action::Download { url: url(&fields)?, sha256: sha256(&fields)?, size: fields.count("size")? },
            &["url", "sha256", "size"],
        ),
        "install" => (
            Action::Install {
                artifact: fields.text("artifact")?,
                path: absolute(&fields, "path")?,
                mode: mode(&fields)?,
                owner: fields.optional_text("owner")?,
                group: fields.optional_text("group")?,
            },
            &["artifact", "path", "mode", "owner", "group"],
        ),
        "run" => (Action::Run { argv: argv(&fields, "argv")?, env: env(&fields)? }, &["argv", "env"]),
        "service" => {
            let name = fields.text("name")?;
            let action = fields.optional_text("action")?.unwrap_or_else(|| "restart".into());
            if !SERVICE_ACTIONS.contains(&action.as_str()) {
                return Err(format!(
                    "{at}.action: \"{action}\" is not one of {}",
                    SERVICE_ACTIONS.join(", ")
                ));
            }
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(format!("{at}.name: \"{name}\" is not the name of an init script"));
            }
            (Action::Service { name, action }, &["action"])
        }
        "reboot" => (Action::Reboot, &[]),
        "agent" => (
            Action::Agent {
                binaries: binaries(&fields)?,
                version: fields.optional_text("version")?,
                force: fields.optional_bool("force")?.unwrap_or(false),
            },
            &["binaries", "version", "force"],
        ),
        other => {
            return Err(format!(
                "{at}.type: \"{other}\" is not a step type (download, install, run, service, reboot, agent)"
            ))
        }
    };
    let allowed: Vec<&str> = common.iter().chain(own).copied().collect();
    fields.only(&allowed)?;
    // A service step's `name` is the service; the step takes its name from it.
    let name = match &action {
        Action::Service { name, action } => format!("{action} {name}"),
        _ => fields.optional_text("name")?.unwrap_or_else(|| format!("{} {}", index + 1, kind)),
    };
    let on_fail = on_fail(&fields)?;
    let timeout_s = match fields.object.get("timeout_s") {
        None => DEFAULT_STEP_TIMEOUT_S,
        Some(_) => fields.count("timeout_s").and_then(|t| match t {
            0 => Err(format!("{at}.timeout_s: must be at least 1")),
            t => Ok(t),
        })?,
    };
    Ok(Step { name, action, on_fail, timeout_s })
}

fn on_fail(fields: &Fields) -> Result<OnFail, String> {
    let at = format!("{}on_fail", fields.at);
    match fields.object.get("on_fail") {
        None => Ok(OnFail::Abort),
        Some(Value::String(word)) => match word.as_str() {
            "abort" => Ok(OnFail::Abort),
            "continue" => Ok(OnFail::Continue),
            "rollback" => Ok(OnFail::Rollback),
            other => {
                Err(format!("{at}: \"{other}\" is not abort, continue, rollback or {{\"run\": [ARGV]}}"))
            }
        },
        Some(Value::Object(object)) => {
            let inner = Fields { object, at: format!("{at}.") };
            inner.only(&["run"])?;
            Ok(OnFail::Run(argv(&inner, "run")?))
        }
        Some(other) => {
            Err(format!("{at}: must be abort, continue, rollback or {{\"run\": [ARGV]}}, got {other}"))
        }
    }
}

/// `{"TARGET": {"url": ..., "sha256": ..., "size": ...}, ...}`, at least one.
fn binaries(fields: &Fields) -> Result<BTreeMap<String, Binary>, String> {
    let at = format!("{}binaries", fields.at);
    let object = match fields.object.get("binaries") {
        Some(Value::Object(object)) if !object.is_empty() => object,
        _ => return Err(format!("{at}: must be an object of target triples to {{url, sha256, size}}")),
    };
    object
        .iter()
        .map(|(target, value)| {
            let object = value.as_object().ok_or_else(|| format!("{at}.{target}: must be an object"))?;
            let inner = Fields { object, at: format!("{at}.{target}.") };
            inner.only(&["url", "sha256", "size"])?;
            let binary = Binary { url: url(&inner)?, sha256: sha256(&inner)?, size: inner.count("size")? };
            Ok((target.clone(), binary))
        })
        .collect()
}

fn url(fields: &Fields) -> Result<String, String> {
    let url = fields.text("url")?;
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(format!("{}url: \"{url}\" must start with https:// or http://", fields.at));
    }
    Ok(url)
}

fn sha256(fields: &Fields) -> Result<String, String> {
    let hex = fields.text("sha256")?.to_ascii_lowercase();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{}sha256: must be 64 hex digits", fields.at));
    }
    Ok(hex)
}

fn absolute(fields: &Fields, key: &str) -> Result<String, String> {
    let path = fields.text(key)?;
    if !path.starts_with('/') || path.ends_with('/') || path.split('/').any(|c| c == "..") {
        return Err(format!("{}{key}: \"{path}\" must be an absolute file path without ..", fields.at));
    }
    Ok(path)
}

/// `"0755"`, or the number 493; default 0644. No setuid, setgid or sticky bits.
fn mode(fields: &Fields) -> Result<u32, String> {
    let at = format!("{}mode", fields.at);
    let mode = match fields.object.get("mode") {
        None => return Ok(0o644),
        Some(Value::String(text)) => {
            u32::from_str_radix(text, 8).map_err(|_| format!("{at}: \"{text}\" is not octal"))?
        }
        Some(Value::Number(n)) => {
            n.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| format!("{at}: bad mode {n}"))?
        }
        Some(other) => return Err(format!("{at}: must be an octal string such as \"0755\", got {other}")),
    };
    if mode > 0o777 {
        return Err(format!("{at}: {mode:o} has bits beyond rwxrwxrwx"));
    }
    Ok(mode)
}

fn argv(fields: &Fields, key: &str) -> Result<Vec<String>, String> {
    let list = fields.array(key)?;
    let argv: Option<Vec<String>> = list.iter().map(|v| v.as_str().map(str::to_string)).collect();
    match argv {
        Some(argv) if argv.first().is_some_and(|p| !p.is_empty()) => Ok(argv),
        Some(_) => Err(format!("{}{key}: needs the program to run", fields.at)),
        None => Err(format!("{}{key}: must be a list of strings", fields.at)),
    }
}

fn env(fields: &Fields) -> Result<BTreeMap<String, String>, String> {
    let Some(value) = fields.object.get("env") else { return Ok(BTreeMap::new()) };
    let object =
        value.as_object().ok_or_else(|| format!("{}env: must be an object of strings", fields.at))?;
    object
        .iter()
        .map(|(k, v)| {
            let bad_name = k.is_empty() || k.contains('=') || k.contains('\0');
            match (bad_name, v.as_str()) {
                (false, Some(v)) => Ok((k.clone(), v.to_string())),
                _ => Err(format!("{}env.{k}: must be a string, under a name without =", fields.at)),
            }
        })
        .collect()
}

/// An object's fields, read with errors that say where.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    /// `steps[2].`, or empty at the top.
    at: String,
}

impl Fields<'_> {
    fn only(&self, allowed: &[&str]) -> Result<(), String> {
        match self.object.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(unknown) => {
                Err(format!("{}{unknown}: unknown field (the fields here: {})", self.at, allowed.join(", ")))
            }
            None => Ok(()),
        }
    }

    fn text(&self, key: &str) -> Result<String, String> {
        self.optional_text(key)?.ok_or_else(|| format!("{}{key}: missing", self.at))
    }

    fn optional_text(&self, key: &str) -> Result<Option<String>, String> {
        match self.object.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() && !s.contains('\0') => Ok(Some(s.clone())),
            Some(other) => Err(format!("{}{key}: must be a non-empty string, got {other}", self.at)),
        }
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>, String> {
        match self.object.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(format!("{}{key}: must be true or false, got {other}", self.at)),
        }
    }

    fn count(&self, key: &str) -> Result<u64, String> {
        match self.object.get(key) {
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().unwrap_or(0)),
            Some(other) => Err(format!("{}{key}: must be a whole number, got {other}", self.at)),
            None => Err(format!("{}{key}: missing", self.at)),
        }
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>, String> {
        match self.object.get(key) {
            Some(Value::Array(list)) => Ok(list),
            Some(other) => Err(format!("{}{key}: must be a list, got {other}", self.at)),
            None => Err(format!("{}{key}: missing", self.at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn good() -> Value {
        json!({
            "name": "app", "version": "1.2.0",
            "steps": [
                {"name": "fetch", "type": "download", "url": "https://h/app", "sha256": HASH, "size": 4},
                {"type": "install", "artifact": "fetch", "path": "/usr/bin/app", "mode": "0755", "on_fail": "rollback"},
                {"type": "run", "argv": ["/usr/bin/app", "--check"], "env": {"A": "1"}, "timeout_s": 30,
                 "on_fail": {"run": ["logger", "check failed"]}},
                {"type": "service", "name": "app"},
                {"type": "reboot", "on_fail": "continue"}
            ],
            "rollback": [{"type": "service", "name": "app", "action": "restart"}]
        })
    }

    #[test]
    fn a_flow_reads_with_its_defaults() {
        let flow = Flow::from_json(&good()).unwrap();
        assert_eq!((flow.name.as_str(), flow.version.as_str(), flow.steps.len()), ("app", "1.2.0", 5));
        let names: Vec<&str> = flow.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["fetch", "2 install", "3 run", "restart app", "5 reboot"]);
        assert_eq!(flow.steps[0].on_fail, OnFail::Abort);
        assert_eq!(flow.steps[0].timeout_s, DEFAULT_STEP_TIMEOUT_S);
        assert_eq!(flow.steps[2].timeout_s, 30);
        assert_eq!(flow.steps[2].on_fail, OnFail::Run(vec!["logger".into(), "check failed".into()]));
        assert!(matches!(flow.steps[1].action, Action::Install { mode: 0o755, .. }));
        assert_eq!(flow.rollback.len(), 1);
        // The journal keeps the flow as JSON and reads it back the same.
        let again: Flow = serde_json::from_value(serde_json::to_value(&flow).unwrap()).unwrap();
        assert_eq!(again, flow);
    }

    #[test]
    fn an_agent_step_names_a_binary_per_target() {
        let flow = Flow::from_json(&json!({"name": "agent", "version": "2.0.0", "steps": [{
            "type": "agent", "version": "2.0.0",
            "binaries": {"armv5te-unknown-linux-musleabi": {"url": "https://h/a5", "sha256": HASH, "size": 9}}
        }]}))
        .unwrap();
        let Action::Agent { binaries, version, force } = &flow.steps[0].action else {
            panic!("not an agent step")
        };
        assert_eq!(binaries["armv5te-unknown-linux-musleabi"].size, 9);
        assert_eq!((version.as_deref(), *force), (Some("2.0.0"), false));
        assert_eq!(flow.steps[0].name, "1 agent");
    }

    #[test]
    fn a_bad_flow_is_refused_with_the_field_named() {
        let cases = [
            (json!({"steps": []}), "name: missing"),
            (json!({"name": "a", "version": "1", "steps": []}), "steps: a flow needs at least one step"),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "dance"}]}),
                "steps[0].type: \"dance\" is not a step type",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "download", "url": "ftp://x", "sha256": HASH, "size": 1}]}),
                "steps[0].url: \"ftp://x\" must start with https:// or http://",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "download", "url": "https://x", "sha256": "abc", "size": 1}]}),
                "steps[0].sha256: must be 64 hex digits",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "install", "artifact": "x", "path": "/a"}]}),
                "steps[0].artifact: \"x\" is not the name of a download step before it",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "run", "argv": []}]}),
                "steps[0].argv: needs the program",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "run", "argv": ["x"], "on_fail": "retry"}]}),
                "steps[0].on_fail: \"retry\" is not abort, continue, rollback",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "run", "argv": ["x"], "colour": 1}]}),
                "steps[0].colour: unknown field",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "service", "name": "../x"}]}),
                "steps[0].name: \"../x\" is not the name of an init script",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "reboot", "timeout_s": 0}]}),
                "steps[0].timeout_s: must be at least 1",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "agent", "binaries": {}}]}),
                "steps[0].binaries: must be an object of target triples",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "agent",
                    "binaries": {"x86_64-unknown-linux-musl": {"url": "https://h/a", "sha256": HASH}}}]}),
                "steps[0].binaries.x86_64-unknown-linux-musl.size: missing",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "agent", "force": "yes",
                    "binaries": {"t": {"url": "https://h/a", "sha256": HASH, "size": 1}}}]}),
                "steps[0].force: must be true or false",
            ),
            (
                json!({"name": "a", "version": "1", "steps": [{"type": "run", "argv": ["x"], "name": "a"}, {"type": "reboot", "name": "a"}]}),
                "steps: two steps are named \"a\"",
            ),
        ];
        for (flow, expected) in cases {
            let error = Flow::from_json(&flow).unwrap_err();
            assert!(error.starts_with(expected), "{error:?} does not start with {expected:?}");
        }
        let mut bad_path = good();
        bad_path["steps"][1]["path"] = json!("/usr/../etc/passwd");
        assert!(Flow::from_json(&bad_path).unwrap_err().contains("without .."));
        let mut bad_mode = good();
        bad_mode["steps"][1]["mode"] = json!("4755");
        assert!(Flow::from_json(&bad_mode).unwrap_err().contains("beyond rwxrwxrwx"));
    }
}
