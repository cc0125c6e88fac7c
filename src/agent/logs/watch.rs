//! What wakes a follower: inotify on the file (written to, truncated, renamed, deleted) and on
//! its directory (a file created or moved in: the new file after a rotation), or, where inotify
//! cannot be had (a kernel without it, the watch limit reached), a timer every POLL_INTERVAL.
//! Either way one descriptor for the event loop, readable when the file may have changed, and
//! silent while nothing happens to it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use crate::agent::remote::process::read_nonblocking;

/// How often a follower without inotify looks at its file.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

const FILE_EVENTS: u32 = libc::IN_MODIFY | libc::IN_MOVE_SELF | libc::IN_DELETE_SELF;
const DIR_EVENTS: u32 = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ONLYDIR;

/// How a follower learns of changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watching {
    Inotify,
    /// A timer: the file is looked at every POLL_INTERVAL.
    Poll,
}

#[derive(Debug)]
pub(super) struct Watch {
    fd: OwnedFd,
    how: Watching,
    /// The inotify watch on the file being read (none with a timer).
    file_watch: Option<libc::c_int>,
}

impl Watch {
    /// inotify when it can be had, else a timer.
    pub fn new(path: &Path) -> io::Result<Watch> {
        Watch::inotify(path).or_else(|e| {
            log::debug!("{}: no inotify ({e}), looking every {POLL_INTERVAL:?}", path.display());
            Watch::timer()
        })
    }

    pub fn inotify(path: &Path) -> io::Result<Watch> {
        // SAFETY: inotify_init1 takes flags only.
        let fd = owned(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        add_watch(&fd, dir, DIR_EVENTS)?;
        let file_watch = Some(add_watch(&fd, path, FILE_EVENTS)?);
        Ok(Watch { fd, how: Watching::Inotify, file_watch })
    }

    pub fn timer() -> io::Result<Watch> {
        // SAFETY: timerfd_create takes a clock and flags only.
        let fd = owned(unsafe {
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        })?;
        let interval = libc::timespec { tv_sec: POLL_INTERVAL.as_secs() as _, tv_nsec: 0 };
        let spec = libc::itimerspec { it_interval: interval, it_value: interval };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Watch { fd, how: Watching::Poll, file_watch: None })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn how(&self) -> Watching {
        self.how
    }

    /// The path names another file now: watch that one rather than the one left behind. Should
    /// it be gone again already, the directory's watch tells when the next one comes.
    pub fn rewatch(&mut self, path: &Path) {
        if self.how != Watching::Inotify {
            return;
        }
        if let Some(old) = self.file_watch.take() {
            // SAFETY: removing a watch of our own inotify descriptor.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), old) };
        }
        self.file_watch = add_watch(&self.fd, path, FILE_EVENTS).ok();
    }

    /// Reads what woke us, so the descriptor is quiet until the next change. What the events
    /// say is not needed: the follower looks at the file and the path itself.
    pub fn drain(&self) {
        let mut events = [0u8; 4096];
        while matches!(read_nonblocking(&self.fd, &mut events), Ok(n) if n > 0) {}
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn add_watch(fd: &OwnedFd, path: &Path, events: u32) -> io::Result<libc::c_int> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: `c_path` is NUL-terminated and outlives the call.
    match unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_path.as_ptr(), events) } {
        -1 => Err(io::Error::last_os_error()),
        watch => Ok(watch),
    }
}
