//! `tetherctl`: the operator's tool. It talks to devices only through the broker, with the same
//! connection code as the agent; everything operator-only lives in this directory.

mod args;
mod cmd;
mod cmds;
mod completions;
mod devices;
mod files;
mod firewall;
mod format;
mod help;
mod known;
mod logs;
mod remote;
mod rollout;
mod session;
mod settings;
mod sign;
mod tty;
mod tunnel;
mod watch;

use std::io::Write;

/// dlmalloc for every block: a tunnel moves thousands of frames a second, and musl's allocator
/// maps and unmaps a page for each 4 KiB block (a static tetherctl forwarded at 38 MB/s on
/// three times the CPU of a glibc one; bench/remote). The agent's allocator gives each block of
/// a page or more pages of its own, which keeps a long-running agent's memory flat but costs
/// tetherctl, which runs for one command, about a system call per frame received: the buffers
/// a transfer grows and drops were mapped, resized and unmapped each time (bench/files).
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;
use std::process::ExitCode;

use args::{Command, Parsed};

/// Exit statuses; scripts rely on them, the help text lists them.
pub mod exit {
    pub const SUCCESS: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const TIMED_OUT: u8 = 2;
    pub const NO_BROKER: u8 = 3;
    /// The key a device presents is not the one known_devices holds for it.
    pub const KEY_CHANGED: u8 = 4;
    /// An answer not signed by the device's key for the command asked.
    pub const FORGED_ANSWER: u8 = 5;
    pub const USAGE: u8 = 64;
    /// `cmd` to a device that has never reported (sysexits' "addressee unknown").
    pub const NO_DEVICE: u8 = 67;
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

/// `value` as pretty JSON on stdout, written as it is made: a fleet's can be tens of megabytes.
pub fn print_json(value: &impl serde::Serialize) -> Result<(), Failure> {
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut stdout, value)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(stdout))
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
        Parsed::Help(command) => {
            print(&help::text(command.and_then(help::find)))?;
            return Ok(exit::SUCCESS);
        }
        Parsed::Completions => {
            print(&completions::bash())?;
            return Ok(exit::SUCCESS);
        }
        Parsed::Version => {
            print(&format!("tetherctl {}", tether::VERSION))?;
            return Ok(exit::SUCCESS);
        }
        Parsed::Run(args) => args,
    };
    tether::logging::init(args.verbose.then_some("warn,tether=debug,tetherctl=debug"), Some("warn"));
    let env = |var: &str| std::env::var(var).ok();
    // It needs no broker.
    if let Command::KnownDevices { forget } = &args.command {
        return known::run(&settings::resolve_trust(&args.conn, &env)?, forget);
    }
    let settings = settings::resolve(&args.conn, &env)?;
    match &args.command {
        Command::Devices { json } => devices::run(&settings, *json),
        Command::Watch { device, json } => watch::run(&settings, device.as_deref(), *json),
        Command::Cmd(request) => cmd::run(&settings, request),
        Command::Ops { device, json } => cmd::list_ops(&settings, device, *json),
        Command::Cmds { device, json, clear } => cmds::run(&settings, device, *json, clear.as_ref()),
        Command::KnownDevices { forget } => known::run(&settings.trust, forget),
        Command::Interactive(request) => remote::interactive(&settings, request),
        Command::Forward { device, specs } => remote::forward(&settings, device, specs),
        Command::Ls { device, path, json } => files::ls(&settings, device, path, *json),
        Command::Get(request) => files::get(&settings, request),
        Command::Put(request) => files::put(&settings, request),
        Command::Logs(request) => logs::logs(&settings, request),
        Command::Update(request) => rollout::run(&settings, request),
        Command::UpdateStatus { id, json } => rollout::status(&settings, id, *json),
        Command::Firewall(request) => firewall::run(&settings, request),
    }
}
