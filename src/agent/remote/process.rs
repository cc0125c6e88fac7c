//! Children for remote terminals and commands, with non-blocking descriptors the event loop
//! registers in mio (`SourceFd`): a shell on a pseudo-terminal, or a command on three pipes.
//! Each child leads its own session and process group, so stopping it stops what it started.
//! Children are reaped by pid only: other parts of the agent wait for their own children.

use std::ffi::{CStr, CString, OsStr};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::fsutil::error_text;

/// How a child ended: its exit code, or the signal that killed it (both None: reaped elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl Exit {
    /// The code a shell reports: the exit code, 128 + n for signal n, 255 when unknown.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        }
    }
}

/// A child leading its own process group (the group id is its pid). Dropped before it is
/// reaped, it is killed with its group and reaped.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    exit: Option<Exit>,
}

impl Child {
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// How the child ended, once it has; never blocks.
    pub fn try_wait(&mut self) -> Option<Exit> {
        if self.exit.is_none() {
            self.exit = wait_for(self.pid, libc::WNOHANG);
        }
        self.exit
    }

    /// Asks the group to end: SIGHUP as when a terminal closes (a shell ignores SIGTERM), SIGTERM
    /// for commands, SIGCONT because a stopped process acts on neither until continued.
    pub fn terminate(&self) {
        for signal in [libc::SIGHUP, libc::SIGTERM, libc::SIGCONT] {
            self.signal_group(signal);
        }
    }

    /// SIGKILL to the group, for what did not end after `terminate`.
    pub fn kill_group(&self) {
        self.signal_group(libc::SIGKILL);
    }

    fn signal_group(&self, signal: libc::c_int) {
        // Until it is reaped, the child's pid (its group id) cannot go to another process.
        if self.exit.is_none() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-self.pid, signal) };
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.exit.is_some() {
            return;
        }
        self.kill_group();
        // The child itself too, should it have moved to another group: the wait must not hang.
        // SAFETY: kill has no memory-safety preconditions; the pid is not reaped yet.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        wait_for(self.pid, 0);
    }
}

fn wait_for(pid: libc::pid_t, flags: libc::c_int) -> Option<Exit> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is writable; waitpid waits for this one pid only.
        match unsafe { libc::waitpid(pid, &mut status, flags) } {
            0 => return None,
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            // ECHILD: nothing left to wait for.
            -1 => return Some(Exit { code: None, signal: None }),
            _ if libc::WIFSIGNALED(status) => {
                return Some(Exit { code: None, signal: Some(libc::WTERMSIG(status)) })
            }
            _ => return Some(Exit { code: Some(libc::WEXITSTATUS(status)), signal: None }),
        }
    }
}

/// A child on a pseudo-terminal: a remote shell.
#[derive(Debug)]
pub struct PtyChild {
    /// The terminal's master side (non-blocking): the child's output to read, input to write.
    pub master: OwnedFd,
    pub child: Child,
}

impl PtyChild {
    /// Sets the terminal's size; the kernel sends SIGWINCH to its foreground group.
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        set_window_size(&self.master, rows, cols)
    }
}

/// A child on three pipes: a remote command. The ends are the parent's, non-blocking.
#[derive(Debug)]
pub struct PipeChild {
    /// None once closed.
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub child: Child,
}

impl PipeChild {
    /// The child reads end of file, as when the operator's input ends.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }
}

/// Starts argv (no shell) on a new pseudo-terminal of `rows` x `cols` with TERM=`term`, as
/// `user` when given; `env` comes last and overrides.
pub fn spawn_pty(
    argv: &[String],
    env: &[(String, String)],
    user: Option<&str>,
    term: &str,
    rows: u16,
    cols: u16,
) -> Result<PtyChild, String> {
    let (master, slave_stdio) =
        open_pty(rows, cols).map_err(|e| format!("cannot open a terminal: {}", error_text(&e)))?;
    // The slave goes with the Command, dropped by the time spawn returns: the parent keeps none,
    // so reading the master ends once the child and its own children have closed theirs.
    let spawned = spawn(argv, env, user, Some(term), slave_stdio)?;
    Ok(PtyChild { master, child: Child { pid: spawned.id() as libc::pid_t, exit: None } })
}

/// Starts argv (no shell) on three pipes, as `user` when given; `env` overrides.
pub fn spawn_pipes(
    argv: &[String],
    env: &[(String, String)],
    user: Option<&str>,
) -> Result<PipeChild, String> {
    let mut spawned = spawn(argv, env, user, None, [Stdio::piped(), Stdio::piped(), Stdio::piped()])?;
    // Owned from here, so that a failure below still kills and reaps it.
    let child = Child { pid: spawned.id() as libc::pid_t, exit: None };
    let stdin = parent_end(spawned.stdin.take())?;
    Ok(PipeChild {
        stdin: Some(stdin),
        stdout: parent_end(spawned.stdout.take())?,
        stderr: parent_end(spawned.stderr.take())?,
        child,
    })
}

fn parent_end(pipe: Option<impl Into<OwnedFd>>) -> Result<OwnedFd, String> {
    let fd: OwnedFd = pipe.ok_or("a pipe to the child is missing")?.into();
    set_nonblocking(&fd).map_err(|e| format!("cannot make a pipe non-blocking: {}", error_text(&e)))?;
    Ok(fd)
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with flag arguments only.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The master, and the slave as the child's stdin, stdout and stderr. Both are opened
/// close-on-exec (std's `open` adds O_CLOEXEC): openpty would leave a moment in which a command
/// spawned by another thread inherits them.
fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, [Stdio; 3])> {
    let open = |path: &OsStr, flags| OpenOptions::new().read(true).write(true).custom_flags(flags).open(path);
    let master = open(OsStr::new("/dev/ptmx"), libc::O_NOCTTY | libc::O_NONBLOCK)?;
    let fd = master.as_raw_fd();
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: `fd` is an open /dev/ptmx; `name` is writable for its length.
    unsafe {
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            return Err(io::Error::last_os_error());
        }
        match libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) {
            0 => {}
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
    set_window_size(&master, rows, cols)?;
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated path.
    let slave_path = unsafe { CStr::from_ptr(name.as_ptr()) };
    let slave = open(OsStr::from_bytes(slave_path.to_bytes()), libc::O_NOCTTY)?;
    Ok((master.into(), [slave.try_clone()?.into(), slave.try_clone()?.into(), slave.into()]))
}

fn set_window_size(terminal: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize, which `size` is.
    if unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `term`: the child's stdio is a terminal, to become its controlling terminal.
fn spawn(
    argv: &[String],
    env: &[(String, String)],
    user: Option<&str>,
    term: Option<&str>,
    [stdin, stdout, stderr]: [Stdio; 3],
) -> Result<std::process::Child, String> {
    let (program, args) = argv.split_first().ok_or("the command is empty")?;
    let mut command = Command::new(program);
    command.args(args).stdin(stdin).stdout(stdout).stderr(stderr);
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let mut setup =
        ChildSetup { parent, controlling_terminal: term.is_some(), credentials: None, home: None };
    if let Some(name) = user {
        let account = lookup_account(name)?;
        command.envs(account.environment());
        setup.credentials = account.credentials()?;
        setup.home = Some(account.home);
    }
    if let Some(term) = term {
        command.env("TERM", term);
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    // SAFETY: ChildSetup::run makes only async-signal-safe system calls and does not allocate.
    unsafe { command.pre_exec(move || setup.run()) };
    command.spawn().map_err(|e| spawn_error(&e, program, user))
}

/// What the child does between fork and exec. Prepared in the parent: there, another thread
/// may have held a lock at the fork, so nothing may allocate or read files.
struct ChildSetup {
    /// The agent: the child dies with it (a kill -9 leaves no shell behind).
    parent: libc::pid_t,
    controlling_terminal: bool,
    credentials: Option<Credentials>,
    home: Option<CString>,
}

struct Credentials {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

// The steps that can fail in the child. Only an error number crosses from there to the spawn's
// caller, so the step rides above errno's bits (errno values stay far below 1 << 16).
const STEP_SHIFT: i32 = 16;
const STEP_NAMES: [&str; 6] = ["exec", "setsid", "TIOCSCTTY", "setgid", "setgroups", "setuid"];
const SETSID: i32 = 1;
const TIOCSCTTY: i32 = 2;
const SETGID: i32 = 3;
const SETGROUPS: i32 = 4;
const SETUID: i32 = 5;

fn step_failed(step: i32) -> io::Error {
    io::Error::from_raw_os_error(step << STEP_SHIFT | io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

impl ChildSetup {
    fn run(&self) -> io::Result<()> {
        // SAFETY: system calls with plain arguments and memory prepared before the fork. The
        // child's stdio is already in place, so fd 0 is the terminal's slave when there is one.
        unsafe {
            if libc::setsid() < 0 {
                return Err(step_failed(SETSID));
            }
            if self.controlling_terminal && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(step_failed(TIOCSCTTY));
            }
            if let Some(c) = &self.credentials {
                // Group before user: once setuid drops root, the groups cannot change.
                if libc::setgid(c.gid) != 0 {
                    return Err(step_failed(SETGID));
                }
                if libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0 {
                    return Err(step_failed(SETGROUPS));
                }
                if libc::setuid(c.uid) != 0 {
                    return Err(step_failed(SETUID));
                }
            }
            // After the credentials: changing them clears the setting. Had the agent died
            // already, no signal would come: then the child goes at once.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != self.parent {
                libc::_exit(1);
            }
            // As login does, a missing home is no reason to refuse: the session starts in /.
            if self.home.as_ref().is_some_and(|home| libc::chdir(home.as_ptr()) != 0) {
                libc::chdir(c"/".as_ptr());
            }
        }
        Ok(())
    }
}

fn spawn_error(e: &io::Error, program: &str, user: Option<&str>) -> String {
    let Some(raw) = e.raw_os_error() else {
        return format!("cannot run {program}: {}", error_text(e));
    };
    let reason = error_text(&io::Error::from_raw_os_error(raw & ((1 << STEP_SHIFT) - 1)));
    let step = raw >> STEP_SHIFT;
    match (STEP_NAMES.get(step as usize), user) {
        (Some(name), Some(user)) if step >= SETGID => format!("cannot run as user {user}: {name}: {reason}"),
        (Some(name), _) if step > 0 => format!("cannot run {program}: {name}: {reason}"),
        _ => format!("cannot run {program}: {reason}"),
    }
}

struct Account {
    name: String,
    c_name: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    home: CString,
    shell: CString,
}

/// From the user database by getpwnam_r (with musl, /etc/passwd).
fn lookup_account(name: &str) -> Result<Account, String> {
    let refused = |why: String| format!("cannot run as user {name}: {why}");
    let c_name = CString::new(name).map_err(|_| refused("not a user name".into()))?;
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        // SAFETY: passwd is plain data; all-zero is valid and getpwnam_r fills it.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the length given with it.
        let rc =
            unsafe { libc::getpwnam_r(c_name.as_ptr(), &mut entry, buf.as_mut_ptr(), buf.len(), &mut found) };
        match rc {
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            0 if found.is_null() => return Err(refused("no such user".into())),
            0 => {
                // SAFETY: getpwnam_r succeeded: the fields point at NUL-terminated strings in `buf`.
                let text = |field: *mut libc::c_char| unsafe { CStr::from_ptr(field) }.to_owned();
                let (home, shell) = (text(entry.pw_dir), text(entry.pw_shell));
                return Ok(Account {
                    name: name.into(),
                    c_name,
                    uid: entry.pw_uid,
                    gid: entry.pw_gid,
                    home,
                    shell,
                });
            }
            errno => {
                return Err(refused(format!(
                    "reading users: {}",
                    error_text(&io::Error::from_raw_os_error(errno))
                )))
            }
        }
    }
}

impl Account {
    fn environment(&self) -> Vec<(&str, &OsStr)> {
        let shell = if self.shell.is_empty() { c"/bin/sh" } else { &self.shell };
        let path = match self.uid {
            0 => "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            _ => "/usr/local/bin:/usr/bin:/bin",
        };
        vec![
            ("HOME", OsStr::from_bytes(self.home.to_bytes())),
            ("USER", OsStr::new(&self.name)),
            ("LOGNAME", OsStr::new(&self.name)),
            ("SHELL", OsStr::from_bytes(shell.to_bytes())),
            ("PATH", OsStr::new(path)),
        ]
    }

    /// What the child must become: None when the agent already runs as this user.
    fn credentials(&self) -> Result<Option<Credentials>, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let agent_uid = unsafe { libc::geteuid() };
        check_can_switch(&self.name, self.uid, agent_uid)?;
        if agent_uid != 0 {
            return Ok(None);
        }
        let groups =
            self.groups().ok_or_else(|| format!("cannot run as user {}: too many groups", &self.name))?;
        Ok(Some(Credentials { uid: self.uid, gid: self.gid, groups }))
    }

    /// The user's groups (as initgroups would set them), read here rather than in the child.
    fn groups(&self) -> Option<Vec<libc::gid_t>> {
        let mut groups = vec![0; 32];
        while groups.len() <= 1 << 16 {
            let mut count = groups.len() as libc::c_int;
            // SAFETY: `groups` has room for `count` entries.
            let rc = unsafe {
                libc::getgrouplist(self.c_name.as_ptr(), self.gid, groups.as_mut_ptr(), &mut count)
            };
            if rc >= 0 {
                groups.truncate(count as usize);
                return Some(groups);
            }
            groups.resize((count as usize).max(groups.len() * 2), 0);
        }
        None
    }
}

/// Only root can run a child as someone else.
fn check_can_switch(name: &str, uid: libc::uid_t, agent_uid: libc::uid_t) -> Result<(), String> {
    if agent_uid == 0 || uid == agent_uid {
        return Ok(());
    }
    Err(format!(
        "cannot run as user {name}: the agent runs as uid {agent_uid}, not root, so it cannot switch users"
    ))
}

/// Reads what is there, for fds outside `stream::endpoint` (log followers, inotify).
/// WouldBlock passes through; 0 is the end, which a PTY master reports as EIO once every
/// process has closed the terminal.
pub fn read_nonblocking(fd: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: reading into `buf`, of its own length.
    let read = retrying(|| unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) });
    match read {
        Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
        read => read,
    }
}

fn retrying(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        match call() {
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            -1 => return Err(io::Error::last_os_error()),
            n => return Ok(n as usize),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const PATIENCE: Duration = Duration::from_secs(10);

    /// Writes what fits; WouldBlock passes through.
    fn write_nonblocking(fd: impl AsFd, buf: &[u8]) -> io::Result<usize> {
        let fd = fd.as_fd().as_raw_fd();
        // SAFETY: writing from `buf`, of its own length.
        retrying(|| unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) })
    }

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    fn sh(script: &str) -> Vec<String> {
        argv(&["/bin/sh", "-c", script])
    }

    fn poll_readable(fd: &OwnedFd) {
        let mut poll_fd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut poll_fd, 1, 100) };
    }

    /// Reads until `done` says so or the end; panics with what came after PATIENCE.
    fn read_until(fd: &OwnedFd, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while !done(&text) {
            assert!(Instant::now() < deadline, "timed out, read so far: {text:?}");
            poll_readable(fd);
            match read_nonblocking(fd, &mut buf) {
                Ok(0) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        text
    }

    fn read_to_end(fd: &OwnedFd) -> String {
        read_until(fd, |_| false)
    }

    fn wait_exit(child: &mut Child) -> Exit {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(exit) = child.try_wait() {
                return exit;
            }
            assert!(Instant::now() < deadline, "child {} did not exit", child.pid());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn write_all(fd: &OwnedFd, text: &str) {
        assert_eq!(write_nonblocking(fd, text.as_bytes()).unwrap(), text.len());
    }

    #[test]
    fn pty_sets_term_and_size_and_resizes() {
        let mut pty = spawn_pty(&argv(&["/bin/sh"]), &[], None, "vt100", 24, 80).unwrap();
        write_all(&pty.master, "stty size; echo T=$TERM\n");
        let first = read_until(&pty.master, |t| t.contains("T=vt100"));
        assert!(first.contains("24 80"), "{first:?}");
        pty.resize(30, 100).unwrap();
        write_all(&pty.master, "stty size; exit 3\n");
        assert!(read_to_end(&pty.master).contains("30 100"));
        assert_eq!(wait_exit(&mut pty.child).code, Some(3));
    }

    #[test]
    fn pipes_keep_stdout_and_stderr_apart() {
        let mut pipes = spawn_pipes(
            &sh("echo $GREETING; echo err >&2; exit 7"),
            &[("GREETING".into(), "out".into())],
            None,
        )
        .unwrap();
        assert_eq!(read_to_end(&pipes.stdout), "out\n");
        assert_eq!(read_to_end(&pipes.stderr), "err\n");
        let exit = wait_exit(&mut pipes.child);
        assert_eq!((exit, exit.shell_code()), (Exit { code: Some(7), signal: None }, 7));
    }

    #[test]
    fn a_signal_exit_is_128_plus_n() {
        let mut pipes = spawn_pipes(&sh("kill -TERM $$"), &[], None).unwrap();
        let exit = wait_exit(&mut pipes.child);
        assert_eq!((exit.signal, exit.shell_code()), (Some(libc::SIGTERM), 128 + libc::SIGTERM));
    }

    #[test]
    fn closing_stdin_ends_cat() {
        let mut pipes = spawn_pipes(&argv(&["cat"]), &[], None).unwrap();
        write_all(pipes.stdin.as_ref().unwrap(), "hello\n");
        pipes.close_stdin();
        assert_eq!(read_to_end(&pipes.stdout), "hello\n");
        assert_eq!(wait_exit(&mut pipes.child).shell_code(), 0);
    }

    /// The group's processes that have not exited (zombies left to an init that does not reap
    /// do not count).
    fn live_members(group: u32) -> usize {
        let stats = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("stat")).ok());
        let in_group = |stat: &String| {
            let fields: Vec<&str> =
                stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
            matches!(fields[..], [state, _, pgrp, ..] if state != "Z" && pgrp == group.to_string())
        };
        stats.filter(in_group).count()
    }

    fn wait_for_members(group: u32, wanted: impl Fn(usize) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !wanted(live_members(group)) {
            assert!(Instant::now() < deadline, "group {group} has {} live members", live_members(group));
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn terminate_ends_the_whole_group() {
        let mut pipes = spawn_pipes(&sh("sleep 100 & sleep 100"), &[], None).unwrap();
        let group = pipes.child.pid();
        wait_for_members(group, |n| n >= 2);
        pipes.child.terminate();
        assert!(wait_exit(&mut pipes.child).signal.is_some());
        wait_for_members(group, |n| n == 0);
    }

    #[test]
    fn drop_kills_and_reaps() {
        let pipes = spawn_pipes(&argv(&["sleep", "100"]), &[], None).unwrap();
        let proc_dir = format!("/proc/{}", pipes.child.pid());
        drop(pipes);
        assert!(!std::path::Path::new(&proc_dir).exists());
    }

    #[test]
    fn what_cannot_run_says_why() {
        let missing = spawn_pipes(&argv(&["/nonexistent/program"]), &[], None).unwrap_err();
        assert_eq!(missing, "cannot run /nonexistent/program: No such file or directory");
        let missing =
            spawn_pty(&argv(&["no-such-program"]), &[("PATH".into(), "/bin".into())], None, "vt100", 24, 80)
                .unwrap_err();
        assert_eq!(missing, "cannot run no-such-program: No such file or directory");
        assert_eq!(spawn_pipes(&[], &[], None).unwrap_err(), "the command is empty");
        let stranger = spawn_pipes(&argv(&["id"]), &[], Some("no-such-user-here")).unwrap_err();
        assert_eq!(stranger, "cannot run as user no-such-user-here: no such user");
        // How a step between fork and exec that failed reads, as std hands over its error number.
        let setuid_failed = io::Error::from_raw_os_error(SETUID << STEP_SHIFT | libc::EPERM);
        assert_eq!(
            spawn_error(&setuid_failed, "sh", Some("alice")),
            "cannot run as user alice: setuid: Operation not permitted"
        );
        let no_terminal = io::Error::from_raw_os_error(TIOCSCTTY << STEP_SHIFT | libc::EPERM);
        assert_eq!(
            spawn_error(&no_terminal, "sh", None),
            "cannot run sh: TIOCSCTTY: Operation not permitted"
        );
    }

    #[test]
    fn runs_as_the_agents_own_user_by_name() {
        let mut whoami = spawn_pipes(&argv(&["id", "-un"]), &[], None).unwrap();
        let name = read_to_end(&whoami.stdout).trim().to_string();
        wait_exit(&mut whoami.child);
        let mut id = spawn_pipes(&sh("id -u; echo $USER"), &[], Some(&name)).unwrap();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(read_to_end(&id.stdout), format!("{uid}\n{name}\n"));
        assert_eq!(wait_exit(&mut id.child).code, Some(0));
    }

    #[test]
    fn only_root_switches_users() {
        assert!(check_can_switch("alice", 1001, 0).is_ok());
        assert!(check_can_switch("alice", 1001, 1001).is_ok());
        let refused = check_can_switch("alice", 1001, 1000).unwrap_err();
        assert_eq!(
            refused,
            "cannot run as user alice: the agent runs as uid 1000, not root, so it cannot switch users"
        );
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let refused = spawn_pipes(&argv(&["id"]), &[], Some("root")).unwrap_err();
            assert!(refused.contains("not root, so it cannot switch users"), "{refused}");
            return;
        }
        let nobody = lookup_account("nobody").unwrap();
        let mut id = spawn_pty(&sh("id -u; id -G; pwd"), &[], Some("nobody"), "vt100", 24, 80).unwrap();
        let groups = nobody.groups().unwrap().iter().map(|g| g.to_string()).collect::<Vec<_>>().join(" ");
        // As login does, a home that does not exist (Debian's /nonexistent) leaves the child in /.
        let home = nobody.home.to_str().unwrap();
        let cwd = if std::path::Path::new(home).is_dir() { home } else { "/" };
        let expected = format!("{}\r\n{groups}\r\n{cwd}\r\n", nobody.uid);
        assert_eq!(read_to_end(&id.master), expected);
        assert_eq!(wait_exit(&mut id.child).code, Some(0));
    }
}
