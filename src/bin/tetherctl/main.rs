//! `tetherctl`: the operator's tool. It talks to devices only through the broker, with the same
//! connection code as the agent; everything operator-only lives in this directory.

mod args;
mod cmd;
mod devices;
mod format;
mod session;
mod settings;
mod watch;

use std::io::Write;
use std::process::ExitCode;

use args::{Command, Parsed};

const HELP: &str = r#"tetherctl: look after a Tether fleet through its MQTT broker

usage: tetherctl [OPTIONS] COMMAND [ARGS]

commands:
  devices [--json]     every device with a retained status or heartbeat: online, age of the
                       last heartbeat, CPU, memory and first disk used, agent version
  watch [DEVICE] [--json]
                       heartbeats and status changes as they arrive (retained ones first,
                       marked "(retained)") until Ctrl-C; --json: one JSON object per line
  cmd DEVICE OP [--json PARAMS] [--timeout S] [--queue]
                       runs OP on DEVICE and prints its final answer (JSON); PARAMS is a JSON
                       object of parameters. Progress goes to stderr. Waits S seconds (default
                       30); then the command is withdrawn, or with --queue kept (retained) for
                       the device to run when it comes back, and its topic is printed
  ops DEVICE [--json]  the ops DEVICE advertises

connection (a flag wins over its environment variable, which wins over the --config file):
  --broker URL           wss://, ws://, mqtts:// or mqtt://            TETHER_BROKER
  --ca FILE              CA certificate(s) to trust (PEM); default:    TETHER_CA
                         the system's. The broker's certificate is always verified.
  --cert FILE --key FILE client certificate and key (mutual TLS)      TETHER_CERT TETHER_KEY
  --username NAME                                                      TETHER_USERNAME
  --password-file FILE   file holding the password                     TETHER_PASSWORD_FILE
  --proxy URL            HTTP proxy: http://[USER:PASSWORD@]HOST[:PORT] TETHER_PROXY
  --topic-root ROOT      default "tether"                              TETHER_TOPIC_ROOT
  --config FILE          JSON: {"broker": {...}, "topic_root": "..."}  TETHER_CONFIG
                         ("broker" as in the agent's config; errors name its keys)
  --connect-timeout S    give up connecting after S seconds (default 10)

other options:
  -v, --verbose          debug logging (default: warnings; RUST_LOG works too)
  -h, --help             this help
  -V, --version          tetherctl's version

exit status:
  0    success
  1    cmd: the device answered "failed"; or another error
  2    cmd: no final answer within --timeout
  3    could not connect to the broker within --connect-timeout
  64   bad command line
  78   bad connection settings (broker URL, certificate, key or password file, config file)
  130  interrupted (Ctrl-C) before finishing; watch exits 0 on Ctrl-C"#;

/// Exit statuses; scripts rely on them, the help text lists them.
pub mod exit {
    pub const SUCCESS: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const TIMED_OUT: u8 = 2;
    pub const NO_BROKER: u8 = 3;
    pub const USAGE: u8 = 64;
    pub const CONFIG: u8 = 78;
    pub const INTERRUPTED: u8 = 130;
}

/// Why tetherctl stops short, and with which exit status.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure { code: exit::USAGE, message: message.into() }
    }
    pub fn config(message: impl Into<String>) -> Failure {
        Failure { code: exit::CONFIG, message: message.into() }
    }
    pub fn error(message: impl Into<String>) -> Failure {
        Failure { code: exit::FAILED, message: message.into() }
    }
    pub fn interrupted() -> Failure {
        Failure { code: exit::INTERRUPTED, message: "interrupted".into() }
    }
}

/// A line of output on stdout.
pub fn print(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::error(format!("stdout: {e}")))
}

fn main() -> ExitCode {
    let code = match run() {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("tetherctl: {}", failure.message);
            if failure.code == exit::USAGE {
                eprintln!("(tetherctl --help for usage)");
            }
            failure.code
        }
    };
    ExitCode::from(code)
}

fn run() -> Result<u8, Failure> {
    let args = match args::parse(std::env::args().skip(1))? {
        Parsed::Help => {
            print(HELP)?;
            return Ok(exit::SUCCESS);
        }
        Parsed::Version => {
            print(&format!("tetherctl {}", tether::VERSION))?;
            return Ok(exit::SUCCESS);
        }
        Parsed::Run(args) => args,
    };
    tether::logging::init(args.verbose.then_some("warn,tether=debug,tetherctl=debug"), Some("warn"));
    let settings = settings::resolve(&args.conn, &|var| std::env::var(var).ok())?;
    match &args.command {
        Command::Devices { json } => devices::run(&settings, *json),
        Command::Watch { device, json } => watch::run(&settings, device.as_deref(), *json),
        Command::Cmd(request) => cmd::run(&settings, request),
        Command::Ops { device, json } => cmd::list_ops(&settings, device, *json),
    }
}
