//! Turns SIGTERM, SIGINT and SIGHUP (and, for a process that asks, SIGCHLD or SIGWINCH) into
//! readable bytes on a pipe the event loop polls (the self-pipe trick): the handler only does an
//! async-signal-safe `write`, all real work happens in the loop.

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

static PIPE_WRITE_FD: AtomicI32 = AtomicI32::new(-1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Terminate,
    Reload,
    /// A child exited (or several did: the kernel merges pending SIGCHLDs). Only a wake-up:
    /// whoever owns a child reaps that pid, nothing reaps globally.
    Child,
    /// The terminal's window changed size: only after `watch_resize`.
    Resize,
    /// SIGUSR1, only after `watch_hand_over`: an agent on probation that passed leaves the
    /// connection to its guard without an offline status.
    HandOver,
}

pub struct Signals {
    read_fd: RawFd,
}

extern "C" fn on_signal(signum: libc::c_int) {
    let fd = PIPE_WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signum as u8;
        // The interrupted thread may be about to read errno, and a full pipe sets it (EAGAIN).
        // SAFETY: errno is thread-local and always valid to read and write.
        let saved_errno = unsafe { *libc::__errno_location() };
        // SAFETY: write(2) is async-signal-safe; the buffer is a local byte.
        unsafe { libc::write(fd, &byte as *const u8 as *const libc::c_void, 1) };
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = saved_errno };
    }
}

fn install_handler(signum: libc::c_int, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as *const () as usize;
        action.sa_flags = flags;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signum, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Signals {
    /// Installs the handlers and registers the pipe with `token`.
    pub fn install(registry: &Registry, token: Token) -> io::Result<Signals> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        PIPE_WRITE_FD.store(fds[1], Ordering::Relaxed);
        for signum in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            install_handler(signum, libc::SA_RESTART)?;
        }
        // A broken connection must surface as an error from write, not kill the process.
        // SAFETY: ignoring SIGPIPE is always valid.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        registry.register(&mut SourceFd(&fds[0]), token, Interest::READABLE)?;
        Ok(Signals { read_fd: fds[0] })
    }

    /// Also delivers `Signal::Child` when a child exits. Opt-in: a process that does not watch
    /// its children (tetherctl) keeps SIGCHLD's default. Stopped children are not reported, and
    /// the disposition is a handler, never SIG_IGN, which would reap every child behind the
    /// back of code that waits for its own.
    pub fn watch_child_exits(&self) -> io::Result<()> {
        install_handler(libc::SIGCHLD, libc::SA_RESTART | libc::SA_NOCLDSTOP)
    }

    /// Also reports SIGUSR1 (whose default ends the process): for an agent on probation.
    pub fn watch_hand_over(&self) -> io::Result<()> {
        install_handler(libc::SIGUSR1, libc::SA_RESTART)
    }

    /// Also reports SIGWINCH, whose default is to be ignored: for tetherctl's remote terminal.
    pub fn watch_resize(&self) -> io::Result<()> {
        install_handler(libc::SIGWINCH, libc::SA_RESTART)
    }

    /// The signals received since the last call, in order.
    pub fn drain(&mut self) -> Vec<Signal> {
        let mut buf = [0u8; 32];
        let mut signals = Vec::new();
        loop {
            // SAFETY: reading into a local buffer of the given length.
            let n = unsafe { libc::read(self.read_fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if n <= 0 {
                return signals;
            }
            signals.extend(buf[..n as usize].iter().map(|&b| match b as libc::c_int {
                libc::SIGHUP => Signal::Reload,
                libc::SIGCHLD => Signal::Child,
                libc::SIGWINCH => Signal::Resize,
                libc::SIGUSR1 => Signal::HandOver,
                _ => Signal::Terminate,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use std::time::Duration;

    #[test]
    fn a_resize_wakes_the_loop_once_asked_for() {
        let mut poll = Poll::new().unwrap();
        let mut signals = Signals::install(poll.registry(), Token(7)).unwrap();
        signals.watch_resize().unwrap();
        // SAFETY: raising a signal whose handler was just installed.
        assert_eq!(unsafe { libc::raise(libc::SIGWINCH) }, 0);
        let mut events = Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(5))).unwrap();
        assert!(events.iter().any(|e| e.token() == Token(7) && e.is_readable()));
        assert_eq!(signals.drain(), [Signal::Resize]);
    }
}
