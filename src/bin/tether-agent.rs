//! `tether-agent`: the device daemon. Runs in the foreground (init or a supervisor starts it).

use std::path::PathBuf;
use std::process::ExitCode;

/// The C library's allocator keeps a little more memory with every worker thread the agent
/// starts (one per heartbeat): `bench/soak` measured +50 % RSS after a round of 3,000 commands
/// and 2,000 heartbeats and +62 % after two. dlmalloc alone stopped the creep but kept a burst's
/// peak (+19 %); with big blocks on pages of their own (see `tether::memory`) the soak ends
/// +7.5 % and stays there.
#[global_allocator]
static ALLOCATOR: tether::memory::Allocator = tether::memory::Allocator;

use tether::agent::update::probation;
use tether::agent::{check_operators, identity, Agent, Exit};
use tether::config::{Config, DEFAULT_CONFIG_PATH};

const USAGE: &str = "usage: tether-agent [--config PATH] [--log-level LEVEL]
                    [--check-config | --print-id | --print-heartbeat | --version | --arch | --help]

  --config PATH        configuration file (default /etc/tether/agent.json)
  --log-level LEVEL    error, warn, info, debug or trace (default: RUST_LOG, the config, info)
  --check-config       validate the configuration and exit
  --print-id           print this device's id and exit
  --print-heartbeat    collect one heartbeat, print it as JSON and exit (no broker needed)
  --version            print the version and exit
  --arch               print the target this binary was built for and exit";

/// A bad command line (sysexits.h), as tetherctl.
const EX_USAGE: u8 = 64;

#[derive(PartialEq)]
enum Action {
    Run,
    CheckConfig,
    PrintId,
    PrintHeartbeat,
}

struct Args {
    config: PathBuf,
    log_level: Option<String>,
    action: Action,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args { config: DEFAULT_CONFIG_PATH.into(), log_level: None, action: Action::Run };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--config" | "-c" => args.config = value("--config")?.into(),
            "--log-level" => args.log_level = Some(value("--log-level")?),
            "--check-config" => args.action = Action::CheckConfig,
            "--print-id" => args.action = Action::PrintId,
            "--print-heartbeat" => args.action = Action::PrintHeartbeat,
            "--version" | "-V" => {
                println!("tether-agent {}", tether::VERSION);
                return Ok(None);
            }
            "--arch" => {
                println!("{}", tether::TARGET);
                return Ok(None);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    // Taken first, while only this thread runs: it takes a variable out of the environment.
    let probation = probation::Reporter::from_env();
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-agent: {e}\n{USAGE}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match run(args, probation) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: as a log line once logging runs; a bad config or log level comes before it.
            if log::log_enabled!(log::Level::Error) {
                log::error!("{e}");
            } else {
                eprintln!("tether-agent: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args, probation: probation::Reporter) -> Result<(), String> {
    if args.action == Action::PrintHeartbeat {
        return print_heartbeat(&args);
    }
    let config = Config::load(&args.config).map_err(|e| e.to_string())?;
    tether::logging::start(args.log_level.as_deref(), config.log_level.as_deref())?;
    if args.action == Action::PrintId {
        println!("{}", identity::device_id(&config)?);
        return Ok(());
    }
    // The same check, in the same words, before a start as in the init script's pre-start check.
    config.check_state_dir().map_err(|e| e.to_string())?;
    if args.action == Action::CheckConfig {
        for warning in check_operators(&config.trust) {
            eprintln!("tether-agent: warning: {warning}");
        }
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    match Agent::new(args.config, config, probation)?.run()? {
        Exit::Stopped => Ok(()),
        Exit::Probation(plan) => probation::guard(plan),
    }
}

/// Works without a config file too: then the default heartbeat settings apply.
fn print_heartbeat(args: &Args) -> Result<(), String> {
    let heartbeat_config = match Config::load(&args.config) {
        Ok(config) => config.heartbeat,
        Err(_) if !args.config.exists() => Default::default(),
        Err(e) => return Err(e.to_string()),
    };
    tether::logging::start(args.log_level.as_deref(), None)?;
    let heartbeat = tether::metrics::Collector::new(&heartbeat_config).collect(0, 0);
    let json = serde_json::to_string_pretty(&heartbeat).map_err(|e| e.to_string())?;
    println!("{json}");
    Ok(())
}
