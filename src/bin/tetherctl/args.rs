//! The command line: connection flags anywhere, then one subcommand with its own arguments.

use serde_json::{Map, Value};
use std::time::Duration;

use tether::protocol::check_device_id;

use crate::settings::ConnFlags;
use crate::Failure;

const DEFAULT_CMD_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, PartialEq)]
pub enum Parsed {
    Help,
    Version,
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
    Devices { json: bool },
    Watch { device: Option<String>, json: bool },
    Cmd(CmdRequest),
    Ops { device: String, json: bool },
}

#[derive(Debug, PartialEq)]
pub struct CmdRequest {
    pub device: String,
    pub op: String,
    pub params: Map<String, Value>,
    pub timeout: Duration,
    pub queue: bool,
}

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed, Failure> {
    let mut conn = ConnFlags::default();
    let (mut verbose, mut help, mut version) = (false, false, false);
    let mut positionals: Vec<String> = Vec::new();
    // Subcommand options, checked against the subcommand once it is known.
    let (mut json_output, mut json_params, mut timeout, mut queue) = (false, None, None, false);

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_string(), Some(value.to_string())),
            _ => (arg, None),
        };
        // `cmd` takes `--json PARAMS`; the other subcommands take `--json` alone.
        let after_cmd = positionals.first().is_some_and(|s| s == "cmd");
        let takes_value = matches!(
            name.as_str(),
            "--broker"
                | "--ca"
                | "--cert"
                | "--key"
                | "--username"
                | "--password-file"
                | "--proxy"
                | "--topic-root"
                | "--config"
                | "--connect-timeout"
                | "--timeout"
        ) || (name == "--json" && after_cmd);
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
            ("--timeout", Some(v)) => timeout = Some(seconds(&name, &v)?),
            ("--json", Some(v)) => json_params = Some(v),
            ("--json", None) => json_output = true,
            ("--queue", _) => queue = true,
            ("-v" | "--verbose", _) => verbose = true,
            ("-h" | "--help", _) => help = true,
            ("-V" | "--version", _) => version = true,
            (flag, _) if flag.starts_with('-') && flag.len() > 1 => {
                return Err(Failure::usage(format!("unknown option {flag}")))
            }
            (_, _) => positionals.push(name),
        }
    }
    if help {
        return Ok(Parsed::Help);
    }
    if version {
        return Ok(Parsed::Version);
    }

    let Some((subcommand, operands)) = positionals.split_first() else {
        return Err(Failure::usage("no command given"));
    };
    let wrong_arguments =
        || Failure::usage(format!("{subcommand}: wrong arguments\nusage: {}", usage_of(subcommand)));
    let command = match (subcommand.as_str(), operands) {
        ("devices", []) => Command::Devices { json: json_output },
        ("watch", []) => Command::Watch { device: None, json: json_output },
        ("watch", [device]) => Command::Watch { device: Some(device_id(device)?), json: json_output },
        ("ops", [device]) => Command::Ops { device: device_id(device)?, json: json_output },
        ("cmd", [device, op]) => {
            if json_output {
                return Err(Failure::usage("cmd: --json PARAMS goes after `cmd`"));
            }
            Command::Cmd(CmdRequest {
                device: device_id(device)?,
                op: check_device_id(op)
                    .map(|()| op.clone())
                    .map_err(|e| Failure::usage(format!("OP {e}")))?,
                params: params(json_params.as_deref())?,
                timeout: timeout.unwrap_or(DEFAULT_CMD_TIMEOUT),
                queue,
            })
        }
        ("devices" | "watch" | "ops" | "cmd", _) => return Err(wrong_arguments()),
        (other, _) => return Err(Failure::usage(format!("unknown command {other:?}"))),
    };
    if !matches!(command, Command::Cmd(_)) && (timeout.is_some() || queue) {
        return Err(Failure::usage(format!("--timeout and --queue are for cmd, not {subcommand}")));
    }
    Ok(Parsed::Run(Box::new(Args { conn, verbose, command })))
}

/// The one-line usage of a subcommand, for its errors.
fn usage_of(subcommand: &str) -> &'static str {
    match subcommand {
        "devices" => "tetherctl devices [--json]",
        "watch" => "tetherctl watch [DEVICE] [--json]",
        "ops" => "tetherctl ops DEVICE [--json]",
        _ => "tetherctl cmd DEVICE OP [--json PARAMS] [--timeout S] [--queue]",
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
    fn subcommands_and_their_options() {
        assert_eq!(command("devices --json"), Command::Devices { json: true });
        assert_eq!(
            command("--broker mqtt://h watch d1"),
            Command::Watch { device: Some("d1".into()), json: false }
        );
        assert_eq!(command("ops d1 --json"), Command::Ops { device: "d1".into(), json: true });
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
        assert_eq!(parse_line("devices --help").ok(), Some(Parsed::Help));
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
        assert!(usage_error("devices --queue").contains("for cmd"));
        assert!(usage_error("devices --json=1").contains("takes no value"));
        assert!(usage_error("--json cmd d1 ping").contains("after `cmd`"));
    }
}
