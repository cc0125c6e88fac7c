//! A pseudo-terminal standing in for the operator's terminal window, for the tests of what
//! tetherctl shows there: the test types on its master and reads what appears there; tetherctl
//! runs on its slave, in a session of its own whose controlling terminal it is, as under a
//! terminal emulator.

use super::remote::text;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Output the remote side owes us: a round trip through the broker, on a loaded machine.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A pseudo-terminal standing in for the operator's terminal window.
pub struct Terminal {
    master: OwnedFd,
    slave: OwnedFd,
    /// Everything read from the master, and how much of it `wait_for` has matched already.
    pub output: Vec<u8>,
    matched: usize,
}

/// A terminal's settings, comparable: what raw mode changes and must change back.
#[derive(Debug, PartialEq, Eq)]
pub struct TerminalSettings {
    pub input: libc::tcflag_t,
    pub output: libc::tcflag_t,
    pub control: libc::tcflag_t,
    pub local: libc::tcflag_t,
    pub characters: [libc::cc_t; libc::NCCS],
    pub speeds: (libc::speed_t, libc::speed_t),
}

impl TerminalSettings {
    pub fn is_raw(&self) -> bool {
        self.local & (libc::ICANON | libc::ECHO | libc::ISIG) == 0
    }
}

impl Terminal {
    pub fn new(rows: u16, cols: u16) -> Terminal {
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: openpty writes two descriptors, which the OwnedFds then own; it reads `size`.
        let (master, slave) = unsafe {
            let opened =
                libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size);
            assert_eq!(opened, 0, "openpty: {}", io::Error::last_os_error());
            (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave))
        };
        // Tests run in parallel: a process another test spawns must not inherit the terminal (it
        // would hold it open, and the kernel would not see tetherctl's leave it).
        for fd in [&master, &slave] {
            // SAFETY: fcntl on a descriptor we own, with a flag argument only.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        Terminal { master, slave, output: Vec::new(), matched: 0 }
    }

    /// Starts `command` on the terminal: its stdin, stdout and stderr, and its controlling
    /// terminal in a session of its own, so that the kernel signals it as a terminal does.
    pub fn start(&self, mut command: Command) -> Running {
        let slave = || Stdio::from(self.slave.try_clone().unwrap());
        // The device's terminal is of this type: one every full-screen program knows.
        command.stdin(slave()).stdout(slave()).stderr(slave()).env("TERM", "xterm");
        // SAFETY: between fork and exec, only async-signal-safe calls that allocate nothing.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
        Running(command.spawn().expect("tetherctl starts"))
    }

    /// The settings as tetherctl, on the slave side, has them.
    pub fn settings(&self) -> TerminalSettings {
        // SAFETY: tcgetattr fills the zeroed termios or fails; cfget*speed only read it.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(self.slave.as_raw_fd(), &mut t), 0, "tcgetattr");
            TerminalSettings {
                input: t.c_iflag,
                output: t.c_oflag,
                control: t.c_cflag,
                local: t.c_lflag,
                characters: t.c_cc,
                speeds: (libc::cfgetispeed(&t), libc::cfgetospeed(&t)),
            }
        }
    }

    /// The user resizes the window: the kernel sends SIGWINCH to the terminal's foreground group.
    pub fn resize(&self, rows: u16, cols: u16) {
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize, which `size` is.
        assert_eq!(unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) }, 0);
    }

    /// Keys typed, as the terminal sends them (Enter is `\r`).
    pub fn type_keys(&self, keys: &str) {
        let mut rest = keys.as_bytes();
        while !rest.is_empty() {
            // SAFETY: writing from a buffer of the given length.
            let n = unsafe { libc::write(self.master.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
            assert!(n > 0, "typing on the terminal: {}", io::Error::last_os_error());
            rest = &rest[n as usize..];
        }
    }

    /// Reads what the terminal shows, waiting up to `timeout` for something to come.
    pub fn read_some(&mut self, timeout: Duration) {
        let mut poll_fd = libc::pollfd { fd: self.master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll_fd, 1, timeout.as_millis() as libc::c_int) } <= 0 {
            return;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a buffer of its own length; poll said it will not block.
        let n = unsafe { libc::read(self.master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            self.output.extend_from_slice(&buf[..n as usize]);
        }
    }

    /// Reads until `find` locates `what` in the output not matched yet (returning where it
    /// ends); returns that output up to there. Panics with the output after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        find: impl Fn(&[u8]) -> Option<usize>,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let unmatched = &self.output[self.matched..];
            if let Some(end) = find(unmatched) {
                let seen = text(&unmatched[..end]);
                self.matched += end;
                return seen;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the terminal never showed {what} in {timeout:?}; it shows: {unmatched:?}",
                unmatched = text(unmatched)
            );
            self.read_some(left.min(Duration::from_millis(200)));
        }
    }

    pub fn expect(&mut self, needle: &str) -> String {
        self.wait_for(&format!("{needle:?}"), PATIENCE, |out| end_of(out, needle.as_bytes()))
    }

    /// A shell prompt, waiting for input: the output ends with `$ ` or `# `.
    pub fn expect_prompt(&mut self) {
        self.wait_for("a shell prompt", PATIENCE, |out| {
            (out.ends_with(b"$ ") || out.ends_with(b"# ")).then_some(out.len())
        });
    }

    /// The number printed right after `marker` (`marker` followed by digits).
    pub fn expect_number_after(&mut self, marker: &str) -> u32 {
        let found = self.wait_for(&format!("{marker:?} and a number"), PATIENCE, |out| {
            let start = out.windows(marker.len()).enumerate().find_map(|(i, w)| {
                (w == marker.as_bytes() && out.get(i + marker.len()).is_some_and(u8::is_ascii_digit))
                    .then_some(i + marker.len())
            })?;
            let digits = out[start..].iter().take_while(|b| b.is_ascii_digit()).count();
            // Only once the number is whole: something that is not a digit follows it.
            (start + digits < out.len()).then_some(start + digits)
        });
        found.rsplit_once(marker).unwrap().1.parse().unwrap()
    }

    /// Waits for tetherctl to exit, reading the terminal meanwhile (a full terminal would hold
    /// its last words back).
    pub fn wait_exit(&mut self, tetherctl: &mut Running, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = tetherctl.0.try_wait().unwrap() {
                self.read_some(Duration::ZERO);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tetherctl still runs after {timeout:?}; the terminal shows: {:?}",
                text(&self.output[self.matched..])
            );
            self.read_some(Duration::from_millis(50));
        }
    }

    /// Everything shown that no `wait_for` matched yet.
    pub fn rest(&self) -> String {
        text(&self.output[self.matched..])
    }
}

/// Where `needle` first ends in `haystack`.
pub fn end_of(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle).map(|i| i + needle.len())
}

/// tetherctl, killed should the test end before it does (in a session of its own, nothing
/// else would stop it).
pub struct Running(pub Child);

impl Running {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
