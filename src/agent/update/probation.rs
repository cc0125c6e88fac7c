//! A new agent binary on probation, guarded by the old agent. SysV init does not respawn, so
//! the old process itself must bring the old version back: it hands the connection over (the
//! journal says `probation`), starts the new binary as its child and watches it, keeping the
//! pid that the init script's pidfile names. Signals from the init script reach the child
//! through it (SIGTERM, SIGHUP). The verdict ends in an exec with that same pid: of the new
//! binary, swapped in, once it connected and stayed up for `updates.probation_s`; of the old one
//! when it crashed, exited, hung without connecting or was killed. Either way the flow goes on
//! from its journal in the agent exec'd.

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use super::{record_agent_stage, self_update, AgentStage};
use crate::signals::{Signal, Signals};
use crate::text::Printable;

/// Names the descriptor on which the agent on probation says it connected.
const ENV_FD: &str = "TETHER_PROBATION_FD";
/// The message on that descriptor.
const CONNECTED: u8 = b'c';
/// How long the child has to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

const SIGNALS: Token = Token(0);
const REPORTS: Token = Token(1);

/// What the guard needs: the flow, the binaries, how the agent was started.
#[derive(Debug)]
pub struct Plan {
    /// The `update` command's id.
    pub id: String,
    pub staged: PathBuf,
    pub sha256: String,
    /// The running binary's path (the init script's DAEMON), and the agent's arguments.
    pub exe: PathBuf,
    pub argv: Vec<OsString>,
    pub probation: Duration,
    /// The update directory: the journal and the list of failed binaries.
    pub dir: PathBuf,
}

enum Verdict {
    Passed,
    Failed(String),
    /// The agent was told to stop (SIGTERM) during the probation: the next start tries again.
    Stopped,
}

/// Runs the probation, then execs the agent that is to run on. Returns only when the agent was
/// stopped meanwhile (Ok) or the exec failed (Err).
pub fn guard(plan: Plan) -> Result<(), String> {
    log::info!(
        "update {}: the new agent starts its probation of {} s",
        Printable(&plan.id),
        plan.probation.as_secs()
    );
    let verdict =
        watch(&plan).unwrap_or_else(|e| Verdict::Failed(format!("its probation could not run: {e}")));
    match verdict {
        Verdict::Stopped => {
            log::info!(
                "update {}: stopped during the probation; the next start tries again",
                Printable(&plan.id)
            );
            Ok(())
        }
        Verdict::Passed => match self_update::swap_in(&plan.staged, &plan.exe, &plan.id) {
            Ok(()) => {
                log::info!(
                    "update {}: the new agent passed its probation and is swapped in",
                    Printable(&plan.id)
                );
                record(&plan, AgentStage::Swapped);
                Err(exec(&plan))
            }
            Err(e) => {
                fail(&plan, format!("the new agent passed its probation but could not be swapped in: {e}"))
            }
        },
        Verdict::Failed(reason) => fail(&plan, reason),
    }
}

fn fail(plan: &Plan, reason: String) -> Result<(), String> {
    log::warn!("update {}: {reason}; the previous agent runs on", Printable(&plan.id));
    if let Err(e) = self_update::remember_failed(&plan.dir, &plan.sha256, &reason) {
        log::error!("update {}: cannot remember the failed binary: {e}", Printable(&plan.id));
    }
    record(plan, AgentStage::Failed { reason });
    Err(exec(plan))
}

fn record(plan: &Plan, stage: AgentStage) {
    if let Err(e) = record_agent_stage(&plan.dir, stage) {
        log::error!("update {}: cannot write the journal: {e}", Printable(&plan.id));
    }
}

/// The binary at the running path, with the same pid and arguments.
fn exec(plan: &Plan) -> String {
    let error = Command::new(&plan.exe).args(plan.argv.iter().skip(1)).exec();
    format!("cannot run {} again: {error}", plan.exe.display())
}

fn watch(plan: &Plan) -> Result<Verdict, String> {
    let (reports, report_end) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let mut child =
        spawn(plan, &report_end).map_err(|e| format!("cannot start {}: {e}", plan.staged.display()))?;
    drop(report_end);
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut signals = Signals::install(poll.registry(), SIGNALS).map_err(|e| e.to_string())?;
    signals.watch_child_exits().map_err(|e| e.to_string())?;
    let report_fd = reports.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&report_fd), REPORTS, Interest::READABLE)
        .map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(8);
    let started = Instant::now();
    let ends = started + plan.probation;
    let mut connected = false;
    let mut stopping: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(match stopping {
                Some(_) => Verdict::Stopped,
                None => Verdict::Failed(ended(status, started.elapsed(), plan.probation)),
            });
        }
        let now = Instant::now();
        if stopping.is_none() && now >= ends {
            if connected {
                // It leaves the connection without an offline status: the device does not
                // blink offline between it and the same binary under this pid. An agent whose
                // loop hung cannot: that fails it too.
                return Ok(match stop(&mut child, libc::SIGUSR1) {
                    Some(status) if status.success() => Verdict::Passed,
                    Some(status) => Verdict::Failed(ended(status, started.elapsed(), plan.probation)),
                    None => Verdict::Failed(format!(
                        "the new agent did not hand the connection back within {} s of the end of its \
                         probation (its loop does not answer): killed",
                        STOP_GRACE.as_secs()
                    )),
                });
            }
            stop(&mut child, libc::SIGTERM);
            return Ok(Verdict::Failed(format!(
                "the new agent did not connect to the broker within its probation of {} s",
                plan.probation.as_secs()
            )));
        }
        if stopping.is_some_and(|since| now >= since + STOP_GRACE) {
            signal(&child, libc::SIGKILL);
        }
        let wake = stopping.map_or(ends, |since| since + STOP_GRACE);
        // A second at most: a SIGCHLD that came before the handler was in place is not missed.
        let timeout = wake.saturating_duration_since(now).min(Duration::from_secs(1));
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
        }
        for event in events.iter() {
            match event.token() {
                SIGNALS => {
                    for signal_received in signals.drain() {
                        match signal_received {
                            Signal::Terminate if stopping.is_none() => {
                                log::info!("stopping: the new agent on probation is stopped too");
                                stopping = Some(Instant::now());
                                signal(&child, libc::SIGTERM);
                            }
                            Signal::Reload => signal(&child, libc::SIGHUP),
                            _ => {}
                        }
                    }
                }
                REPORTS => match read_reports(report_fd) {
                    Some(true) if !connected => {
                        connected = true;
                        log::info!("update {}: the new agent connected to the broker", Printable(&plan.id));
                    }
                    Some(_) => {}
                    // The child closed its end (it exited): no more reports, and no busy wake-ups.
                    None => {
                        let _ = poll.registry().deregister(&mut SourceFd(&report_fd));
                    }
                },
                _ => {}
            }
        }
    }
}

/// The new binary, with the agent's arguments and the report descriptor; it dies with the guard.
fn spawn(plan: &Plan, report_end: &OwnedFd) -> std::io::Result<Child> {
    let fd = report_end.as_raw_fd();
    let mut command = Command::new(&plan.staged);
    command.args(plan.argv.iter().skip(1)).env(ENV_FD, fd.to_string());
    // SAFETY: fcntl and prctl are async-signal-safe; nothing else runs before exec.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    command.spawn()
}

/// `signum` (SIGTERM, or SIGUSR1 to hand the connection back), then SIGKILL after
/// `STOP_GRACE`; reaped. How it ended, None when it had to be killed.
fn stop(child: &mut Child, signum: libc::c_int) -> Option<ExitStatus> {
    signal(child, signum);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Ok(Some(status)) => return Some(status),
            Err(_) => return None,
        }
    }
    signal(child, libc::SIGKILL);
    let _ = child.wait();
    None
}

fn signal(child: &Child, signum: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, signum) };
}

/// How the child ended, for the flow's reason.
fn ended(status: ExitStatus, after: Duration, probation: Duration) -> String {
    format!(
        "the new agent {} {} s into its probation of {} s",
        crate::runner::describe(status),
        after.as_secs(),
        probation.as_secs()
    )
}

/// Some(whether a connected report came), None at the end of the pipe.
fn read_reports(fd: RawFd) -> Option<bool> {
    let mut buf = [0u8; 64];
    let mut connected = false;
    loop {
        // SAFETY: reading into a local buffer of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        match n {
            0 => return None,
            n if n < 0 => return Some(connected),
            n => connected |= buf[..n as usize].contains(&CONNECTED),
        }
    }
}

/// (read end, write end), both close-on-exec; the read end does not block.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just made these descriptors; nothing else owns them.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    Ok((read, write))
}

/// In the agent on probation: tells its guard when it connected to the broker.
#[derive(Default)]
pub struct Reporter {
    fd: Option<OwnedFd>,
}

impl Reporter {
    /// The descriptor the guard passed, if this agent runs on probation. It is made
    /// close-on-exec at once: a command the agent runs must not keep the guard waiting.
    pub fn from_env() -> Reporter {
        let Some(fd) = std::env::var(ENV_FD).ok().and_then(|v| v.parse::<RawFd>().ok()) else {
            return Reporter::default();
        };
        std::env::remove_var(ENV_FD);
        // SAFETY: F_SETFD on a descriptor number: harmless if it is not open (EBADF).
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            log::warn!("{ENV_FD}={fd} is not an open descriptor: not on probation");
            return Reporter::default();
        }
        // SAFETY: the guard made this descriptor for this process, which owns it from now on.
        Reporter { fd: Some(unsafe { OwnedFd::from_raw_fd(fd) }) }
    }

    pub fn on_probation(&self) -> bool {
        self.fd.is_some()
    }

    pub fn connected(&self) {
        if let Some(fd) = &self.fd {
            // SAFETY: writing one byte from a local; a guard gone makes it fail (EPIPE), ignored.
            unsafe { libc::write(fd.as_raw_fd(), &CONNECTED as *const u8 as *const libc::c_void, 1) };
        }
    }
}
