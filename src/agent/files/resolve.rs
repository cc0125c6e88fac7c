//! Paths from an operator, resolved inside `file_transfer.chroot` so that nothing can lead out
//! of it, whatever races a local user runs against the agent.
//!
//! The chroot is held open; each component is opened relative to the directory reached so far
//! with O_PATH|O_NOFOLLOW, so the kernel never resolves a name or a link on its own. `..` goes
//! back to the directory held before (never above the chroot: that is refused), and a link,
//! when links may be followed, has its text walked the same way (an absolute one must lie under
//! the chroot's own path). A link on procfs is refused: its text is not where it leads.
//!
//! The result holds the last directory open and names the last component in it; the caller
//! opens that with O_NOFOLLOW, so a link swapped in after the walk cannot be followed, and a
//! directory renamed or replaced after the walk does not matter: the one held is used.
//!
//! openat2(RESOLVE_BENEATH) would do the walk in the kernel on Linux 5.6 and later; the fleet
//! runs older kernels too, and this walk gives the same guarantee on every one of them, the same
//! messages naming the component and the setting, and the resolved path for the put journal.

use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::sys::{self, c_name};
use super::FileError;
use crate::fsutil::error_text;

/// As the kernel's limit on links followed in one path.
const MAX_LINKS: u32 = 40;

/// The chroot, held open once.
pub struct Root {
    dir: File,
    /// Its canonical path: what absolute link texts are matched against; the journal's paths.
    path: PathBuf,
}

impl Root {
    pub fn open(path: &Path) -> Result<Root, FileError> {
        let fail =
            |e: io::Error| FileError(format!("file_transfer.chroot {}: {}", path.display(), error_text(&e)));
        let canonical = std::fs::canonicalize(path).map_err(fail)?;
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        let dir = OpenOptions::new().read(true).custom_flags(flags).open(&canonical).map_err(fail)?;
        Ok(Root { dir, path: canonical })
    }
}

/// What becomes of a link as the last component.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Leaf {
    /// Followed when `follow_symlinks`, else refused.
    Follow,
    /// Kept as it is (`ls` shows a link as a link).
    Keep,
}

/// Where a path leads, held open.
pub struct Location {
    /// The directory that holds `name`; the directory itself when `name` is None.
    pub dir: File,
    /// The last component; None when the path names a directory the walk reached itself
    /// (`/`, `a/..`).
    pub name: Option<CString>,
    /// What `name` was during the walk (a link as a link); None when it does not exist.
    pub entry: Option<Metadata>,
    /// The path inside the chroot as resolved (links followed), for messages: `/data/x`.
    pub shown: String,
    /// `dir` on the real filesystem.
    pub real_dir: PathBuf,
}

impl Location {
    /// The last component's name, or an error when the path names a directory.
    pub fn file_name(&self) -> Result<&CStr, FileError> {
        self.name.as_deref().ok_or_else(|| FileError(format!("{} is a directory", self.shown)))
    }
}

/// Resolves `path` (absolute or not, it starts at the chroot) inside `root`.
pub fn resolve(root: &Root, path: &str, follow_symlinks: bool, leaf: Leaf) -> Result<Location, FileError> {
    let mut walk = Walk { root, path, follow_symlinks, dirs: Vec::new(), pending: VecDeque::new(), links: 0 };
    walk.push_front(path.as_bytes());
    while let Some(name) = walk.pending.pop_front() {
        if name == b".." {
            walk.up()?;
            continue;
        }
        let last = walk.pending.is_empty();
        let c_name = c_name(&name).map_err(|e| walk.error(&name, &e))?;
        let entry = match sys::open_entry(walk.top(), &c_name) {
            Ok(entry) => entry,
            Err(e) if last && e.kind() == io::ErrorKind::NotFound => return walk.arrive(c_name, None),
            Err(e) => return Err(walk.error(&name, &e)),
        };
        let meta = entry.metadata().map_err(|e| walk.error(&name, &e))?;
        if meta.is_symlink() && !(last && leaf == Leaf::Keep) {
            walk.follow(&name, &entry)?;
        } else if last {
            return walk.arrive(c_name, Some(meta));
        } else if meta.is_dir() {
            walk.dirs.push((entry, name));
        } else {
            return Err(FileError(format!("{} is not a directory", walk.shown(&name))));
        }
    }
    walk.arrive_at_dir()
}

struct Walk<'a> {
    root: &'a Root,
    /// As the operator wrote it.
    path: &'a str,
    follow_symlinks: bool,
    /// The directories entered below the chroot, each with its name.
    dirs: Vec<(File, Vec<u8>)>,
    /// The components still to walk.
    pending: VecDeque<Vec<u8>>,
    links: u32,
}

impl Walk<'_> {
    fn top(&self) -> &File {
        self.dirs.last().map_or(&self.root.dir, |(dir, _)| dir)
    }

    /// `path`'s components go first; empty ones and `.` mean nothing.
    fn push_front(&mut self, path: &[u8]) {
        let components = path.split(|b| *b == b'/').filter(|c| !c.is_empty() && *c != b".");
        let components: Vec<Vec<u8>> = components.map(<[u8]>::to_vec).collect();
        for component in components.into_iter().rev() {
            self.pending.push_front(component);
        }
    }

    fn up(&mut self) -> Result<(), FileError> {
        match self.dirs.pop() {
            Some(_) => Ok(()),
            None => Err(self.outside()),
        }
    }

    fn outside(&self) -> FileError {
        FileError(format!("{}: leads outside file_transfer.chroot ({})", self.path, self.root.path.display()))
    }

    /// Walks on into the text of the link `name` (open as `link`), or refuses it.
    fn follow(&mut self, name: &[u8], link: &File) -> Result<(), FileError> {
        let shown = self.shown(name);
        if !self.follow_symlinks {
            return Err(FileError(format!(
                "{shown} is a symbolic link (file_transfer.follow_symlinks is false)"
            )));
        }
        if sys::is_procfs(self.top()).map_err(|e| self.error(name, &e))? {
            return Err(FileError(format!("{shown} is a link in /proc: magic links are refused")));
        }
        self.links += 1;
        if self.links > MAX_LINKS {
            return Err(FileError(format!("{}: more than {MAX_LINKS} symbolic links", self.path)));
        }
        let text = sys::read_link(link).map_err(|e| self.error(name, &e))?;
        if text.starts_with(b"/") {
            let inside = sys::path_of(&text).strip_prefix(&self.root.path).map_err(|_| {
                FileError(format!(
                    "{shown} points to {}, outside file_transfer.chroot ({})",
                    String::from_utf8_lossy(&text),
                    self.root.path.display()
                ))
            })?;
            self.dirs.clear();
            self.push_front(inside.as_os_str().as_bytes());
        } else {
            self.push_front(&text);
        }
        Ok(())
    }

    /// The walk ends at `name` in the directory on top.
    fn arrive(self, name: CString, entry: Option<Metadata>) -> Result<Location, FileError> {
        let shown = self.shown(name.as_bytes());
        let dir = self.top().try_clone().map_err(|e| FileError(format!("{shown}: {}", error_text(&e))))?;
        Ok(Location { dir, real_dir: self.real_dir(), name: Some(name), entry, shown })
    }

    /// The walk ends at the directory on top itself.
    fn arrive_at_dir(self) -> Result<Location, FileError> {
        let shown = self.shown(b"");
        let fail = |e: io::Error| FileError(format!("{shown}: {}", error_text(&e)));
        let dir = self.top().try_clone().map_err(fail)?;
        let entry = dir.metadata().map_err(fail)?;
        Ok(Location { dir, real_dir: self.real_dir(), name: None, entry: Some(entry), shown })
    }

    fn real_dir(&self) -> PathBuf {
        let mut path = self.root.path.clone();
        path.extend(self.dirs.iter().map(|(_, name)| sys::path_of(name)));
        path
    }

    /// `/a/b/NAME`, the path inside the chroot as walked so far.
    fn shown(&self, name: &[u8]) -> String {
        let names = self.dirs.iter().map(|(_, dir)| dir.as_slice()).chain([name]).filter(|n| !n.is_empty());
        let mut shown = String::new();
        for n in names {
            shown.push('/');
            shown.push_str(&String::from_utf8_lossy(n));
        }
        if shown.is_empty() {
            shown.push('/');
        }
        shown
    }

    fn error(&self, name: &[u8], e: &io::Error) -> FileError {
        FileError(format!("{}: {}", self.shown(name), error_text(e)))
    }
}
