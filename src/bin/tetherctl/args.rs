//! The command line: connection flags anywhere, then one subcommand with its own arguments.

use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;

use tether::protocol::check_device_id;

use crate::files::Copy;
use crate::firewall::FirewallRequest;
use crate::help;
use crate::logs::LogsRequest;
use crate::remote::{ForwardSpec, Interactive};
use crate::rollout::{Rollout, Targets};
use crate::settings::ConnFlags;
use crate::Failure;

const DEFAULT_CMD_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// The whole help, or one command's.
    Help(Option<&'static str>),
    Version,
    /// The bash completion script.
    Completions,
    Run(Box<Args>),
}

#[derive(Debug, PartialEq)]
pub struct Args {
    pub conn: ConnFlags,
    pub verbose: bool,
    pub command: Command,
}

#[derive(Debug, PartialEq)]
pub enum Command {
    Devices {
        json: bool,
    },
    Watch {
        device: Option<String>,
        json: bool,
    },
    Cmd(CmdRequest),
    Cmds {
        device: String,
        json: bool,
        clear: Option<Clear>,
    },
    Ops {
        device: String,
        json: bool,
    },
    /// Lists known_devices, or forgets the keys of these devices.
    KnownDevices {
        forget: Vec<String>,
    },
    /// `shell` and `exec`.
    Interactive(Interactive),
    Forward {
        device: String,
        specs: Vec<ForwardSpec>,
    },
    Ls {
        device: String,
        path: String,
        json: bool,
    },
    Get(Copy),
    Put(Copy),
    Logs(LogsRequest),
    Update(Rollout),
    UpdateStatus {
        id: String,
        json: bool,
    },
    Firewall(FirewallRequest),
}

#[derive(Debug, PartialEq)]
pub struct CmdRequest {
    pub device: String,
    pub op: String,
    pub params: Map<String, Value>,
    pub timeout: Duration,
    pub queue: bool,
}

/// Which retained commands `cmds --clear` removes.
#[derive(Debug, PartialEq)]
pub enum Clear {
    /// Pending, final and unreadable ones: all but those executing.
    Idle,
    Pending,
    Final,
    All,
    /// These, given as `ID` or `OP/ID`, whatever their state.
    Ids(Vec<String>),
}

/// The options of one command, as given; checked against the command once it is known.
#[derive(Default)]
struct CommandOptions {
    /// Each option given, for the check.
    given: Vec<&'static str>,
    json_output: bool,
    json_params: Option<String>,
    timeout: Option<Duration>,
    queue: bool,
    clear: bool,
    /// exec -t: a terminal on the device.
    tty: bool,
    /// -e: the escape character, as given.
    escape: Option<String>,
    /// logs: -n, -f, --since, --grep, --list.
    lines: Option<u64>,
    follow: bool,
    since: Option<String>,
    grep: Option<String>,
    list: bool,
    /// update: --batch, --max-failures, --where (--all is `all`).
    batch: Option<usize>,
    max_failures: Option<usize>,
    where_expr: Option<String>,
    pending: bool,
    final_only: bool,
    all: bool,
    /// firewall: --confirm, --confirm-s.
    confirm: bool,
    confirm_s: Option<u64>,
}

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed, Failure> {
    let mut conn = ConnFlags::default();
    let (mut verbose, mut help, mut version) = (false, false, false);
    let mut positionals: Vec<String> = Vec::new();
    let mut opts = CommandOptions::default();

    let mut args = args.into_iter();
    // `exec DEVICE -- CMD ARGS...`: everything after `--` is the remote command, verbatim.
    let mut remote_argv: Vec<String> = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "--" && positionals.first().is_some_and(|s| s == "exec") {
            remote_argv.extend(args.by_ref());
            break;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_string(), Some(value.to_string())),
            _ => (arg, None),
        };
        // `cmd` takes `--json PARAMS`; the other subcommands take `--json` alone.
        let after_cmd = positionals.first().is_some_and(|s| s == "cmd");
        let takes_value = help::FILE_OPTIONS.contains(&name.as_str())
            || help::VALUE_OPTIONS.contains(&name.as_str())
            || name == "--timeout"
            || name == "-e"
            || name == "-n"
            || name == "--since"
            || name == "--grep"
            || name == "--batch"
            || name == "--max-failures"
            || name == "--where"
            || name == "--confirm-s"
            || (name == "--json" && after_cmd);
        let value = match (takes_value, inline) {
            (true, Some(v)) => Some(v),
            (true, None) => Some(args.next().ok_or_else(|| Failure::usage(format!("{name} needs a value")))?),
            (false, Some(_)) => return Err(Failure::usage(format!("{name} takes no value"))),
            (false, None) => None,
        };
        match (name.as_str(), value) {
            ("--broker", v) => conn.broker = v,
            ("--ca", v) => conn.ca = v,
            ("--cert", v) => conn.cert = v,
            ("--key", v) => conn.key = v,
            ("--username", v) => conn.username = v,
            ("--password-file", v) => conn.password_file = v,
            ("--proxy", v) => conn.proxy = v,
            ("--topic-root", v) => conn.topic_root = v,
            ("--config", v) => conn.config = v,
            ("--connect-timeout", Some(v)) => conn.connect_timeout = Some(seconds(&name, &v)?),
            ("-i" | "--identity", v) => conn.identity = v,
            ("--known-devices", v) => conn.known_devices = v,
            ("-v" | "--verbose", _) => verbose = true,
            ("-h" | "--help", _) => help = true,
            ("-V" | "--version", _) => version = true,
            ("-t" | "-e" | "-n" | "-f", value) => opts.set(&name, value)?,
            (flag, value) if flag.starts_with("--") => opts.set(flag, value)?,
            (flag, _) if flag.starts_with('-') && flag.len() > 1 => {
                return Err(Failure::usage(format!("unknown option {flag}")))
            }
            (_, _) => positionals.push(name),
        }
    }
    if help {
        let command = positionals.first().and_then(|name| help::find(name)).map(|c| c.name);
        return Ok(Parsed::Help(command));
    }
    if version {
        return Ok(Parsed::Version);
    }

    let Some((subcommand, operands)) = positionals.split_first() else {
        return Err(Failure::usage("no command given"));
    };
    let Some(about) = help::find(subcommand) else {
        return Err(Failure::usage(format!("unknown command {subcommand:?}")));
    };
    if let Some(option) = opts.given.iter().find(|o| !about.options.contains(o)) {
        return Err(Failure::usage(format!("{subcommand} takes no {option}\nusage: {}", help::usage(about))));
    }
    let wrong_arguments =
        || Failure::usage(format!("{subcommand}: wrong arguments\nusage: {}", help::usage(about)));
    let json = opts.json_output;
    let command = match (subcommand.as_str(), operands) {
        ("help", []) => return Ok(Parsed::Help(None)),
        ("help", [name]) => match help::find(name) {
            Some(c) => return Ok(Parsed::Help(Some(c.name))),
            None => return Err(Failure::usage(format!("help: unknown command {name:?}"))),
        },
        ("completions", [shell]) if shell == "bash" => return Ok(Parsed::Completions),
        ("completions", [shell]) => {
            return Err(Failure::usage(format!("completions: {shell:?} is not supported; bash is")))
        }
        ("devices", []) => Command::Devices { json },
        ("watch", []) => Command::Watch { device: None, json },
        ("watch", [device]) => Command::Watch { device: Some(device_id(device)?), json },
        ("ops", [device]) => Command::Ops { device: device_id(device)?, json },
        ("known-devices", []) => Command::KnownDevices { forget: vec![] },
        ("known-devices", [action, devices @ ..]) if action == "forget" && !devices.is_empty() => {
            Command::KnownDevices { forget: devices.iter().map(|d| device_id(d)).collect::<Result<_, _>>()? }
        }
        ("cmds", [device, ids @ ..]) => {
            Command::Cmds { device: device_id(device)?, json, clear: opts.clear_selection(ids)? }
        }
        ("cmd", [device, op]) => {
            if json {
                return Err(Failure::usage("cmd: --json PARAMS goes after `cmd`"));
            }
            Command::Cmd(CmdRequest {
                device: device_id(device)?,
                op: check_device_id(op)
                    .map(|()| op.clone())
                    .map_err(|e| Failure::usage(format!("OP {e}")))?,
                params: params(opts.json_params.as_deref())?,
                timeout: opts.timeout.unwrap_or(DEFAULT_CMD_TIMEOUT),
                queue: opts.queue,
            })
        }
        ("shell", [device]) => Command::Interactive(Interactive {
            device: device_id(device)?,
            argv: None,
            pty: true,
            escape: opts.escape()?,
            timeout: None,
        }),
        ("exec", [device]) if !remote_argv.is_empty() => Command::Interactive(Interactive {
            device: device_id(device)?,
            argv: Some(remote_argv),
            pty: opts.tty,
            escape: opts.escape()?,
            timeout: opts.timeout,
        }),
        ("forward", [device, specs @ ..]) if !specs.is_empty() => Command::Forward {
            device: device_id(device)?,
            specs: specs
                .iter()
                .map(|s| ForwardSpec::parse(s).map_err(|e| Failure::usage(format!("forward: {e}"))))
                .collect::<Result<_, _>>()?,
        },
        ("ls", [device, path]) => Command::Ls { device: device_id(device)?, path: path.clone(), json },
        ("get", [device, remote, local @ ..]) if local.len() <= 1 => Command::Get(Copy {
            device: device_id(device)?,
            remote: remote.clone(),
            local: Some(local.first().map_or(".", String::as_str)).filter(|l| *l != "-").map(PathBuf::from),
            json,
            timeout: opts.timeout,
        }),
        ("put", [local, device, remote]) => Command::Put(Copy {
            device: device_id(device)?,
            remote: remote.clone(),
            local: Some(local.as_str()).filter(|l| *l != "-").map(PathBuf::from),
            json,
            timeout: opts.timeout,
        }),
        ("logs", [device, sources @ ..]) => {
            let alone = opts.given.len() == 1 + usize::from(json) && sources.is_empty();
            if opts.list && !alone {
                return Err(Failure::usage("logs: --list takes no SOURCE and no other option but --json"));
            }
            if json && !opts.list {
                return Err(Failure::usage(
                    "logs: --json goes with --list (the lines come as the device has them)",
                ));
            }
            Command::Logs(LogsRequest {
                device: device_id(device)?,
                sources: sources.to_vec(),
                lines: opts.lines,
                follow: opts.follow,
                since: opts.since.clone(),
                grep: opts.grep.clone(),
                list: opts.list,
                json,
            })
        }
        ("update", [status, id]) if status == "status" => Command::UpdateStatus { id: id.clone(), json },
        ("update", [flow, devices @ ..]) => {
            let targets = match (opts.all, &opts.where_expr, devices.is_empty()) {
                (true, None, true) => Targets::All,
                (false, Some(expr), true) => Targets::Where(expr.clone()),
                (false, None, false) => {
                    Targets::Devices(devices.iter().map(|d| device_id(d)).collect::<Result<_, _>>()?)
                }
                _ => {
                    return Err(Failure::usage(
                        "update: name the devices, or --all, or --where EXPR (one of them)",
                    ))
                }
            };
            Command::Update(Rollout {
                flow_file: PathBuf::from(flow),
                targets,
                batch: opts.batch.unwrap_or(10),
                max_failures: opts.max_failures,
                json,
                timeout: opts.timeout,
            })
        }
        ("firewall", [device, action, file @ ..]) => {
            let takes_file = action == "apply";
            let known = ["show", "apply", "revert", "confirm"].contains(&action.as_str());
            let changes = takes_file || action == "revert";
            if !known || takes_file != (file.len() == 1) || file.len() > 1 {
                return Err(wrong_arguments());
            }
            if !changes && (opts.confirm || opts.confirm_s.is_some()) {
                return Err(Failure::usage(format!(
                    "firewall {action}: --confirm and --confirm-s go with apply and revert"
                )));
            }
            Command::Firewall(FirewallRequest {
                device: device_id(device)?,
                action: action.clone(),
                file: file.first().map(PathBuf::from),
                confirm: opts.confirm,
                confirm_s: opts.confirm_s,
                timeout: opts.timeout,
                json,
            })
        }
        _ => return Err(wrong_arguments()),
    };
    Ok(Parsed::Run(Box::new(Args { conn, verbose, command })))
}

impl CommandOptions {
    fn set(&mut self, flag: &str, value: Option<String>) -> Result<(), Failure> {
        let name = match (flag, value) {
            ("--json", Some(v)) => {
                self.json_params = Some(v);
                "--json"
            }
            ("--json", None) => {
                self.json_output = true;
                "--json"
            }
            ("--timeout", Some(v)) => {
                self.timeout = Some(seconds(flag, &v)?);
                "--timeout"
            }
            ("--queue", _) => {
                self.queue = true;
                "--queue"
            }
            ("--clear", _) => {
                self.clear = true;
                "--clear"
            }
            ("--pending", _) => {
                self.pending = true;
                "--pending"
            }
            ("--final", _) => {
                self.final_only = true;
                "--final"
            }
            ("--all", _) => {
                self.all = true;
                "--all"
            }
            ("-t", _) => {
                self.tty = true;
                "-t"
            }
            ("-e", v) => {
                self.escape = v;
                "-e"
            }
            ("-n", Some(v)) => {
                let lines =
                    v.parse().map_err(|_| Failure::usage(format!("-n: {v:?} is not a number of lines")))?;
                self.lines = Some(lines);
                "-n"
            }
            ("-f", _) => {
                self.follow = true;
                "-f"
            }
            ("--since", v) => {
                self.since = v;
                "--since"
            }
            ("--grep", v) => {
                self.grep = v;
                "--grep"
            }
            ("--list", _) => {
                self.list = true;
                "--list"
            }
            ("--batch" | "--max-failures", Some(v)) => {
                let n: usize = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| Failure::usage(format!("{flag}: {v:?} is not a number from 1 up")))?;
                if flag == "--batch" {
                    self.batch = Some(n);
                    "--batch"
                } else {
                    self.max_failures = Some(n);
                    "--max-failures"
                }
            }
            ("--where", v) => {
                self.where_expr = v;
                "--where"
            }
            ("--confirm", _) => {
                self.confirm = true;
                "--confirm"
            }
            ("--confirm-s", Some(v)) => {
                let n = v
                    .parse()
                    .map_err(|_| Failure::usage(format!("--confirm-s: {v:?} is not a number of seconds")))?;
                self.confirm_s = Some(n);
                "--confirm-s"
            }
            (flag, _) => return Err(Failure::usage(format!("unknown option {flag}"))),
        };
        self.given.push(name);
        Ok(())
    }

    /// `-e`: the escape character (`~` unless given), None for `-e none`.
    fn escape(&self) -> Result<Option<u8>, Failure> {
        match &self.escape {
            None => Ok(Some(b'~')),
            Some(text) => crate::tty::parse_escape_char(text).map_err(|e| Failure::usage(format!("-e: {e}"))),
        }
    }

    /// What `cmds --clear` is to clear; None: only list.
    fn clear_selection(&self, ids: &[String]) -> Result<Option<Clear>, Failure> {
        let narrowed = [(self.pending, "--pending"), (self.final_only, "--final"), (self.all, "--all")];
        let narrowed: Vec<&str> = narrowed.iter().filter(|(on, _)| *on).map(|(_, name)| *name).collect();
        if !self.clear {
            return match (narrowed.first(), ids.is_empty()) {
                (Some(option), _) => Err(Failure::usage(format!("cmds: {option} goes with --clear"))),
                (None, false) => Err(Failure::usage("cmds: IDs go with --clear")),
                (None, true) => Ok(None),
            };
        }
        if narrowed.len() + usize::from(!ids.is_empty()) > 1 {
            return Err(Failure::usage("cmds --clear: choose one of --pending, --final, --all or IDs"));
        }
        for given in ids {
            let (op, id) = given.split_once('/').map_or((None, given.as_str()), |(op, id)| (Some(op), id));
            op.into_iter()
                .chain([id])
                .try_for_each(check_device_id)
                .map_err(|e| Failure::usage(format!("ID {e}")))?;
        }
        Ok(Some(match narrowed.first() {
            Some(&"--pending") => Clear::Pending,
            Some(&"--final") => Clear::Final,
            Some(_) => Clear::All,
            None if ids.is_empty() => Clear::Idle,
            None => Clear::Ids(ids.to_vec()),
        }))
    }
}

fn device_id(id: &str) -> Result<String, Failure> {
    check_device_id(id).map_err(|e| Failure::usage(format!("DEVICE {e}")))?;
    Ok(id.to_string())
}

fn seconds(flag: &str, text: &str) -> Result<Duration, Failure> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 1e9 => Ok(Duration::from_secs_f64(s)),
        _ => Err(Failure::usage(format!("{flag}: expected a positive number of seconds, got {text:?}"))),
    }
}

/// The op's parameters: a JSON object, merged into `{"status":"init"}`.
fn params(json: Option<&str>) -> Result<Map<String, Value>, Failure> {
    let Some(json) = json else { return Ok(Map::new()) };
    match serde_json::from_str(json) {
        Ok(Value::Object(params)) if params.contains_key("status") => {
            Err(Failure::usage("--json: \"status\" is not a parameter (tetherctl sets it to \"init\")"))
        }
        Ok(Value::Object(params)) => Ok(params),
        Ok(_) => Err(Failure::usage("--json: the parameters must be a JSON object, e.g. '{\"n\":1}'")),
        Err(e) => Err(Failure::usage(format!("--json: not valid JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit;

    fn parse_line(line: &str) -> Result<Parsed, Failure> {
        parse(line.split_whitespace().map(String::from))
    }

    fn command(line: &str) -> Command {
        match parse_line(line) {
            Ok(Parsed::Run(args)) => args.command,
            Ok(other) => panic!("{line}: {other:?}"),
            Err(e) => panic!("{line}: {}", e.message),
        }
    }

    fn usage_error(line: &str) -> String {
        let e = parse_line(line).err().unwrap_or_else(|| panic!("{line} should be refused"));
        assert_eq!(e.code, exit::USAGE, "{line}");
        e.message
    }

    #[test]
    fn exec_takes_everything_after_the_double_dash_as_the_remote_command() {
        let Command::Interactive(exec) = command("exec dev1 -t --timeout 5 -- ls -l --color -- -t") else {
            panic!("not exec")
        };
        assert_eq!(
            exec.argv,
            Some(vec!["ls".into(), "-l".into(), "--color".into(), "--".into(), "-t".into()])
        );
        assert!(exec.pty);
        assert_eq!(exec.timeout, Some(Duration::from_secs(5)));
        assert_eq!(exec.escape, Some(b'~'));
        let Command::Interactive(shell) = command("shell dev1 -e none") else { panic!("not shell") };
        assert_eq!((shell.argv, shell.pty, shell.escape), (None, true, None));
        assert!(parse_line("exec dev1").is_err(), "no command");
        assert!(parse_line("shell dev1 -t").is_err(), "-t is exec's");
        assert!(parse_line("exec dev1 ls").is_err(), "the command goes after --");
    }

    #[test]
    fn forward_takes_one_spec_or_more() {
        let Command::Forward { device, specs } = command("forward dev1 8080:127.0.0.1:80 2222:localhost:22")
        else {
            panic!("not forward")
        };
        assert_eq!((device.as_str(), specs.len()), ("dev1", 2));
        assert!(parse_line("forward dev1").is_err());
        assert!(parse_line("forward dev1 8080").is_err());
    }

    #[test]
    fn subcommands_and_their_options() {
        assert_eq!(command("devices --json"), Command::Devices { json: true });
        assert_eq!(
            command("--broker mqtt://h watch d1"),
            Command::Watch { device: Some("d1".into()), json: false }
        );
        assert_eq!(command("ops d1 --json"), Command::Ops { device: "d1".into(), json: true });
        assert_eq!(command("known-devices"), Command::KnownDevices { forget: vec![] });
        assert_eq!(
            command("known-devices forget d1 d2"),
            Command::KnownDevices { forget: vec!["d1".into(), "d2".into()] }
        );
        let Command::Cmd(req) = command("cmd d1 ping --json={\"n\":1} --timeout 2.5 --queue") else {
            panic!("not cmd")
        };
        assert_eq!((req.device.as_str(), req.op.as_str()), ("d1", "ping"));
        assert_eq!(req.params["n"], 1);
        assert_eq!((req.timeout, req.queue), (Duration::from_millis(2500), true));
        let Command::Cmd(req) = command("cmd d1 ping") else { panic!("not cmd") };
        assert_eq!((req.timeout, req.queue, req.params.len()), (DEFAULT_CMD_TIMEOUT, false, 0));
    }

    #[test]
    fn firewall_actions_and_their_options() {
        let Command::Firewall(req) = command("firewall d1 apply r.json --confirm --confirm-s 20 --json")
        else {
            panic!("not firewall")
        };
        assert_eq!(
            req,
            FirewallRequest {
                device: "d1".into(),
                action: "apply".into(),
                file: Some(PathBuf::from("r.json")),
                confirm: true,
                confirm_s: Some(20),
                timeout: None,
                json: true,
            }
        );
        let Command::Firewall(req) = command("firewall d1 show") else { panic!("not firewall") };
        assert_eq!((req.action.as_str(), req.file, req.json), ("show", None, false));
        for line in ["firewall d1 apply", "firewall d1 show x", "firewall d1 flush", "firewall d1 revert a b"]
        {
            assert!(usage_error(line).contains("firewall: wrong arguments"), "{line}");
        }
        assert!(usage_error("firewall d1 confirm --confirm").contains("go with apply and revert"));
        assert!(usage_error("firewall d1 apply r --confirm-s x").contains("not a number of seconds"));
    }

    #[test]
    fn what_cmds_clears() {
        let clear = |line: &str| match command(line) {
            Command::Cmds { clear, .. } => clear,
            other => panic!("{line}: {other:?}"),
        };
        assert_eq!(clear("cmds d1"), None);
        assert_eq!(clear("cmds d1 --clear"), Some(Clear::Idle));
        assert_eq!(clear("cmds d1 --clear --pending"), Some(Clear::Pending));
        assert_eq!(clear("cmds d1 --final --clear"), Some(Clear::Final));
        assert_eq!(clear("cmds d1 --clear --all"), Some(Clear::All));
        assert_eq!(
            clear("cmds d1 --clear 1-2 ping/3-4"),
            Some(Clear::Ids(vec!["1-2".into(), "ping/3-4".into()]))
        );
    }

    #[test]
    fn connection_flags_anywhere() {
        let Ok(Parsed::Run(args)) =
            parse_line("-v devices --broker=wss://b/mqtt --ca ca.pem --connect-timeout 3 --topic-root r")
        else {
            panic!()
        };
        assert!(args.verbose);
        assert_eq!(args.conn.broker.as_deref(), Some("wss://b/mqtt"));
        assert_eq!(args.conn.ca.as_deref(), Some("ca.pem"));
        assert_eq!(args.conn.topic_root.as_deref(), Some("r"));
        assert_eq!(args.conn.connect_timeout, Some(Duration::from_secs(3)));
        let Ok(Parsed::Run(args)) = parse_line("cmd d1 reboot -i id_ed25519 --known-devices=kd") else {
            panic!()
        };
        assert_eq!(args.conn.identity.as_deref(), Some("id_ed25519"));
        assert_eq!(args.conn.known_devices.as_deref(), Some("kd"));
        let Ok(Parsed::Run(args)) = parse_line("--identity k.pub devices") else { panic!() };
        assert_eq!(args.conn.identity.as_deref(), Some("k.pub"));
        assert_eq!(parse_line("devices --help").ok(), Some(Parsed::Help(Some("devices"))));
        assert_eq!(parse_line("--help").ok(), Some(Parsed::Help(None)));
        assert_eq!(parse_line("help").ok(), Some(Parsed::Help(None)));
        assert_eq!(parse_line("help cmds").ok(), Some(Parsed::Help(Some("cmds"))));
        assert_eq!(parse_line("completions bash").ok(), Some(Parsed::Completions));
        assert_eq!(parse_line("-V").ok(), Some(Parsed::Version));
    }

    #[test]
    fn usage_errors() {
        assert!(usage_error("").contains("no command"));
        assert!(usage_error("frobnicate").contains("unknown command"));
        assert!(usage_error("devices --bogus").contains("unknown option --bogus"));
        assert!(usage_error("devices extra").contains("usage: tetherctl devices"));
        assert!(usage_error("cmd d1").contains("usage: tetherctl cmd"));
        assert!(usage_error("cmd d1 ping --json").contains("needs a value"));
        assert!(usage_error("cmd d1 ping --json [1]").contains("JSON object"));
        assert!(usage_error("cmd d1 ping --json {\"status\":1}").contains("status"));
        assert!(usage_error("cmd d1 ping --json {").contains("not valid JSON"));
        assert!(usage_error("cmd d1 ping --timeout 0").contains("positive"));
        assert!(usage_error("cmd d+ ping").contains("DEVICE"));
        assert!(usage_error("cmd d1 a/b").contains("OP"));
        assert!(usage_error("devices --queue").contains("devices takes no --queue"));
        assert!(usage_error("help frobnicate").contains("unknown command"));
        assert!(usage_error("completions zsh").contains("bash"));
        assert!(usage_error("cmds d1 --all").contains("--all goes with --clear"));
        assert!(usage_error("cmds d1 x").contains("IDs go with --clear"));
        assert!(usage_error("cmds d1 --clear --final x").contains("choose one"));
        assert!(usage_error("cmds d1 --clear a/b/c").contains("ID"));
        assert!(usage_error("devices --json=1").contains("takes no value"));
        assert!(usage_error("--json cmd d1 ping").contains("after `cmd`"));
        assert!(usage_error("cmd d1 reboot -i").contains("-i needs a value"));
        assert!(usage_error("known-devices forget").contains("usage: tetherctl known-devices"));
        assert!(usage_error("known-devices d1").contains("usage: tetherctl known-devices"));
        assert!(usage_error("known-devices forget d+").contains("DEVICE"));
    }
}
