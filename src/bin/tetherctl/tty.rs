//! The operator's side of a remote terminal (`shell`, `exec -t`), as ssh has it: raw mode that
//! always comes undone, the window size, escapes typed at the start of a line, and stdin/stdout
//! in a form the mio loop can poll. A resize arrives as `Signal::Resize` once
//! `Signals::watch_resize` is called. When stdin is not a terminal, none of it applies: no raw
//! mode, no escapes (`EscapeFilter::new(None)`), no window size; bytes pass unchanged.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard, Once, PoisonError};

const STDIN: RawFd = libc::STDIN_FILENO;
const STDOUT: RawFd = libc::STDOUT_FILENO;

/// The terminal in raw mode and how to put it back, for `restore_terminal` in the panic hook:
/// release builds abort on panic, so no drop runs there.
static IN_RAW_MODE: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

fn in_raw_mode() -> MutexGuard<'static, Option<(RawFd, libc::termios)>> {
    IN_RAW_MODE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A libc result, -1 turned into the error errno names.
fn os(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(result)
}

pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// A terminal in raw mode until restored or dropped: keys go to the device as typed, Ctrl-C
/// included (as 0x03, not SIGINT). A SIGTERM, SIGINT or SIGHUP from outside reaches the loop as
/// Session's `Input::Interrupted`: the loop must `restore` (or drop this) before exiting.
pub struct RawMode {
    fd: RawFd,
    saved: Option<libc::termios>,
}

impl RawMode {
    /// Raw mode on stdin if it is a terminal, else a guard that does nothing. Installs, once, a
    /// panic hook that restores the terminal before the panic message is printed.
    pub fn stdin() -> io::Result<RawMode> {
        if !is_tty(STDIN) {
            return Ok(RawMode { fd: STDIN, saved: None });
        }
        restore_terminal_on_panic();
        RawMode::enter(STDIN)
    }

    pub fn enter(fd: RawFd) -> io::Result<RawMode> {
        let saved = termios_of(fd)?;
        let mut raw = saved;
        // SAFETY: raw is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        set_termios(fd, &raw)?;
        *in_raw_mode() = Some((fd, saved));
        Ok(RawMode { fd, saved: Some(saved) })
    }

    pub fn is_raw(&self) -> bool {
        self.saved.is_some()
    }

    /// Puts the terminal back as it was; later calls do nothing. Failure is ignored: the
    /// terminal is then gone (hung up), nothing is left to restore.
    pub fn restore(&mut self) {
        let Some(saved) = self.saved.take() else { return };
        let mut in_raw_mode = in_raw_mode();
        if in_raw_mode.is_some_and(|(fd, _)| fd == self.fd) {
            *in_raw_mode = None;
        }
        let _ = set_termios(self.fd, &saved);
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Takes the terminal out of raw mode wherever the guard is: for a panic hook or a fatal exit.
pub fn restore_terminal() {
    let taken = in_raw_mode().take();
    if let Some((fd, saved)) = taken {
        let _ = set_termios(fd, &saved);
    }
}

fn restore_terminal_on_panic() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

fn termios_of(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: tcgetattr fills the zeroed struct or fails.
    unsafe {
        let mut termios: libc::termios = std::mem::zeroed();
        os(libc::tcgetattr(fd, &mut termios)).map(|_| termios)
    }
}

/// TCSANOW: waiting for output to drain could hang an exit on a terminal that stopped reading.
fn set_termios(fd: RawFd, termios: &libc::termios) -> io::Result<()> {
    // SAFETY: termios is a valid struct that tcsetattr only reads.
    os(unsafe { libc::tcsetattr(fd, libc::TCSANOW, termios) }).map(drop)
}

/// (rows, columns) of the operator's terminal, read from stdout or else stdin; None when stdin
/// is not a terminal (no remote pty then) or the size is unknown (0 x 0, as on a serial line).
pub fn window_size() -> Option<(u16, u16)> {
    if !is_tty(STDIN) {
        return None;
    }
    window_size_of(STDOUT).or_else(|| window_size_of(STDIN))
}

pub fn window_size_of(fd: RawFd) -> Option<(u16, u16)> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ fills the winsize or fails.
    os(unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) }).ok()?;
    let rows_columns = (size.ws_row, size.ws_col);
    (rows_columns != (0, 0)).then_some(rows_columns)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeAction {
    Disconnect,
    Help,
}

/// ssh's escapes: the escape character (`~`) right after a newline, or first of all, starts
/// one and is held until the next byte decides: `~.` disconnects, `~?` asks for `help`, `~~`
/// sends one `~`, and `~` before anything else sends both.
pub struct EscapeFilter {
    escape: Option<u8>,
    at_line_start: bool,
    escape_pending: bool,
}

impl EscapeFilter {
    /// `None` lets every byte through: for `-e none`, or when stdin is not a terminal.
    pub fn new(escape: Option<u8>) -> EscapeFilter {
        EscapeFilter { escape, at_line_start: true, escape_pending: false }
    }

    /// Appends to `out` what goes to the device. Stops at an escape command and returns it with
    /// the input after it, for the caller to feed again once it has acted (after `~?`, more
    /// keys may follow in the same read, a pasted `~.` among them).
    pub fn feed<'a>(&mut self, input: &'a [u8], out: &mut Vec<u8>) -> Option<(EscapeAction, &'a [u8])> {
        let Some(escape) = self.escape else {
            out.extend_from_slice(input);
            return None;
        };
        let mut bytes = input.iter();
        while let Some(&byte) = bytes.next() {
            if let Some(action) = self.step(escape, byte, out) {
                return Some((action, bytes.as_slice()));
            }
        }
        None
    }

    fn step(&mut self, escape: u8, byte: u8, out: &mut Vec<u8>) -> Option<EscapeAction> {
        if std::mem::take(&mut self.escape_pending) {
            match byte {
                b'.' => return Some(EscapeAction::Disconnect),
                // Still at the start of a line: another escape may follow.
                b'?' => return Some(EscapeAction::Help),
                _ if byte == escape => {}
                _ => out.push(escape),
            }
        } else if self.at_line_start && byte == escape {
            self.escape_pending = true;
            return None;
        }
        self.at_line_start = byte == b'\r' || byte == b'\n';
        out.push(byte);
        None
    }

    /// For `~?`; CR LF as the terminal is raw.
    pub fn help(&self) -> String {
        let e = self.escape.map_or('~', char::from);
        format!(
            "Escapes, recognized right after a newline:\r\n {e}.  disconnect\r\n {e}?  this help\r\n \
             {e}{e}  send one {e}\r\n"
        )
    }
}

/// `-e`: one character, `^X` for a control character, or `none` for no escapes.
pub fn parse_escape_char(text: &str) -> Result<Option<u8>, String> {
    match text.as_bytes() {
        b"none" => Ok(None),
        [byte] if byte.is_ascii() => Ok(Some(*byte)),
        [b'^', key] if (b'@'..=b'_').contains(&key.to_ascii_uppercase()) => {
            Ok(Some(key.to_ascii_uppercase() & 0x1f))
        }
        _ => Err(format!("escape character: one character, ^X or none, not {text:?}")),
    }
}

/// A non-blocking descriptor on stdin or stdout for the mio loop (edge-triggered: it reads
/// until EAGAIN), leaving the user's terminal as it found it.
///
/// O_NONBLOCK belongs to the open file description, and a terminal's is shared with the shell:
/// left set by a crash (release builds abort on panic, no drop runs), the shell's next read
/// fails with EAGAIN. So a terminal is opened again, a description of our own that is closed
/// on drop. A pipe or socket, which tetherctl normally has to itself, and a terminal that
/// cannot be opened again (another user's, after `su`) get the flag set and their flags back
/// on drop. A regular file cannot be polled: epoll refuses it (EPERM), the loop must not try.
pub struct NonBlockingFd {
    fd: RawFd,
    undo: Undo,
}

enum Undo {
    Close,
    SetFlags(libc::c_int),
    Nothing,
}

impl NonBlockingFd {
    pub fn new(fd: RawFd) -> io::Result<NonBlockingFd> {
        // SAFETY: F_GETFL only reads the descriptor's flags.
        let flags = os(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
        if is_tty(fd) {
            if let Ok(reopened) = reopen_nonblocking(fd, flags & libc::O_ACCMODE) {
                return Ok(NonBlockingFd { fd: reopened, undo: Undo::Close });
            }
        }
        // Already set: another guard, or whoever set it, restores it.
        if flags & libc::O_NONBLOCK != 0 {
            return Ok(NonBlockingFd { fd, undo: Undo::Nothing });
        }
        // SAFETY: F_SETFL with the flags just read plus one.
        os(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
        Ok(NonBlockingFd { fd, undo: Undo::SetFlags(flags) })
    }

    /// What to register, read and write: not always the descriptor given.
    pub fn fd(&self) -> RawFd {
        self.fd
    }
}

impl Drop for NonBlockingFd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours to close, or the flags are those it had.
        match self.undo {
            Undo::Close => unsafe { libc::close(self.fd) },
            Undo::SetFlags(flags) => unsafe { libc::fcntl(self.fd, libc::F_SETFL, flags) },
            Undo::Nothing => 0,
        };
    }
}

fn reopen_nonblocking(fd: RawFd, access: libc::c_int) -> io::Result<RawFd> {
    let path = CString::new(format!("/proc/self/fd/{fd}")).map_err(io::Error::other)?;
    let flags = access | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: path is a NUL-terminated string that outlives the call.
    os(unsafe { libc::open(path.as_ptr(), flags) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// What goes to the device and the actions, feeding on after `Help` and stopping at
    /// `Disconnect`, as the loop does.
    fn filter(escape: Option<u8>, feeds: &[&[u8]]) -> (Vec<u8>, Vec<EscapeAction>) {
        let mut filter = EscapeFilter::new(escape);
        let (mut out, mut actions) = (Vec::new(), Vec::new());
        for &feed in feeds {
            let mut input = feed;
            while let Some((action, rest)) = filter.feed(input, &mut out) {
                actions.push(action);
                if action == EscapeAction::Disconnect {
                    return (out, actions);
                }
                input = rest;
            }
        }
        (out, actions)
    }

    #[test]
    fn escapes_start_only_at_the_start_of_a_line() {
        use EscapeAction::*;
        let tilde = Some(b'~');
        assert_eq!(filter(tilde, &[b"~.ls"]), (b"".to_vec(), vec![Disconnect]));
        assert_eq!(filter(tilde, &[b"ls\r~.x"]), (b"ls\r".to_vec(), vec![Disconnect]));
        assert_eq!(filter(tilde, &[b"ls\n~?pwd"]), (b"ls\npwd".to_vec(), vec![Help]));
        assert_eq!(filter(tilde, &[b"a~.b"]), (b"a~.b".to_vec(), vec![]));
        assert_eq!(filter(tilde, &[b"~~~."]), (b"~~.".to_vec(), vec![]));
        assert_eq!(filter(tilde, &[b"~x\r~\r~."]), (b"~x\r~\r".to_vec(), vec![Disconnect]));
        assert_eq!(filter(tilde, &[b"~?~?~.after"]), (b"".to_vec(), vec![Help, Help, Disconnect]));
        assert_eq!(filter(tilde, &[b"\r~", b".", b"x"]), (b"\r".to_vec(), vec![Disconnect]));
        assert_eq!(filter(tilde, &[b"\r~", b"~", b"~."]), (b"\r~~.".to_vec(), vec![]));
        assert_eq!(filter(Some(b'%'), &[b"~.%."]), (b"~.%.".to_vec(), vec![]));
        assert_eq!(filter(Some(b'%'), &[b"\n%."]), (b"\n".to_vec(), vec![Disconnect]));
        assert_eq!(filter(None, &[b"~.\r~?"]), (b"~.\r~?".to_vec(), vec![]));
    }

    #[test]
    fn the_escape_character_is_one_character_a_control_or_none() {
        assert_eq!(parse_escape_char("~"), Ok(Some(b'~')));
        assert_eq!(parse_escape_char("^]"), Ok(Some(0x1d)));
        assert_eq!(parse_escape_char("^b"), Ok(Some(0x02)));
        assert_eq!(parse_escape_char("none"), Ok(None));
        assert!(parse_escape_char("ab").is_err());
        assert!(EscapeFilter::new(Some(b'%')).help().contains(" %.  disconnect\r\n"));
    }

    fn pty() -> (OwnedFd, OwnedFd) {
        let (mut master, mut slave) = (-1, -1);
        let none = std::ptr::null_mut();
        // SAFETY: openpty writes two descriptors, which the OwnedFds then own.
        unsafe {
            assert_eq!(libc::openpty(&mut master, &mut slave, none, none as _, none as _), 0);
            (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave))
        }
    }

    fn same(a: &libc::termios, b: &libc::termios) -> bool {
        (a.c_iflag, a.c_oflag, a.c_cflag, a.c_lflag, a.c_cc)
            == (b.c_iflag, b.c_oflag, b.c_cflag, b.c_lflag, b.c_cc)
    }

    // One test for all raw mode: tests run in parallel and `restore_terminal` is process-wide.
    #[test]
    fn raw_mode_comes_undone_by_restore_drop_or_restore_terminal() {
        let (_master, slave) = pty();
        let fd = slave.as_raw_fd();
        let original = termios_of(fd).unwrap();
        let mut raw = RawMode::enter(fd).unwrap();
        assert!(raw.is_raw());
        assert_eq!(termios_of(fd).unwrap().c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        raw.restore();
        raw.restore();
        assert!(!raw.is_raw() && same(&termios_of(fd).unwrap(), &original));

        drop(RawMode::enter(fd).unwrap());
        assert!(same(&termios_of(fd).unwrap(), &original));

        let _raw = RawMode::enter(fd).unwrap();
        restore_terminal();
        assert!(same(&termios_of(fd).unwrap(), &original));
    }

    #[test]
    fn window_size_is_what_the_terminal_was_set_to() {
        let (master, slave) = pty();
        assert_eq!(window_size_of(slave.as_raw_fd()), None);
        let size = libc::winsize { ws_row: 40, ws_col: 132, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads the winsize.
        assert_eq!(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) }, 0);
        assert_eq!(window_size_of(slave.as_raw_fd()), Some((40, 132)));
    }

    fn flags(fd: RawFd) -> libc::c_int {
        // SAFETY: F_GETFL only reads the flags.
        unsafe { libc::fcntl(fd, libc::F_GETFL) }
    }

    #[test]
    fn a_terminal_is_opened_again_and_a_pipe_gets_its_flags_back() {
        let (_master, slave) = pty();
        let before = flags(slave.as_raw_fd());
        let reopened = NonBlockingFd::new(slave.as_raw_fd()).unwrap();
        assert_ne!(reopened.fd(), slave.as_raw_fd());
        assert_ne!(flags(reopened.fd()) & libc::O_NONBLOCK, 0);
        assert_eq!(flags(slave.as_raw_fd()), before);

        let mut pipe = [-1; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        let (read_end, _write_end) =
            unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
        let before = flags(read_end.as_raw_fd());
        let nonblocking = NonBlockingFd::new(read_end.as_raw_fd()).unwrap();
        let twice = NonBlockingFd::new(read_end.as_raw_fd()).unwrap();
        assert_eq!(nonblocking.fd(), read_end.as_raw_fd());
        assert_ne!(flags(read_end.as_raw_fd()) & libc::O_NONBLOCK, 0);
        drop(nonblocking);
        drop(twice);
        assert_eq!(flags(read_end.as_raw_fd()), before);
    }
}
