//! File access for `tetherctl get / put / ls` (issue 10), within the limits of the
//! `file_transfer` settings: every path is resolved inside `chroot` (resolve.rs), every refusal
//! says why and names the setting, and a put is atomic, verified and resumable (put.rs).
//!
//! This layer knows nothing of tunnels: it opens, checks, lists and writes; the tunnel protocol
//! moves the bytes, paced by `RateLimiter`s (one per direction, shared by all transfers, as the
//! settings bound the device's link).

mod journal;
mod put;
mod rate;
mod resolve;
mod sys;
pub mod users;

use serde::Serialize;
use std::collections::HashMap;
use std::ffi::CStr;
use std::fmt;
use std::fs::{File, FileType, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use crate::config::FileTransferConfig;
use crate::fsutil::error_text;
pub use journal::cleanup_at_start;
use journal::Journal;
pub use put::{PutRequest, PutTarget};
pub use rate::RateLimiter;
use resolve::{resolve, Leaf, Location, Root};

/// Why a file operation was refused or failed, in words for the operator.
#[derive(Debug, Clone, PartialEq)]
pub struct FileError(pub String);

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FileError {}

/// What `get` sends: the file open for reading, and what it was when opened.
#[derive(Debug)]
pub struct GetSource {
    /// Opened non-blocking: a FIFO or a device (when `regular_files_only` is false) never
    /// stalls the event loop.
    pub file: File,
    pub size: u64,
    /// Permission bits (`0o644`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
}

/// One line of `ls`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits, setuid, setgid and sticky included (`0o4755`).
    pub mode: u32,
    /// The user's name, or the uid when it has none.
    pub owner: String,
    pub group: String,
    pub mtime: i64,
    /// A link's text (it is not followed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// The device's files as the `file_transfer` settings let operators see and change them.
pub struct FileAccess {
    config: FileTransferConfig,
    /// The chroot, opened once; the error when it could not be (each operation reports it, and
    /// a reload tries again).
    root: Result<Root, FileError>,
    journal: Journal,
}

impl FileAccess {
    /// Never fails: a chroot that cannot be opened (not mounted yet) is reported by each
    /// operation. Call `cleanup_at_start(state_dir)` once before.
    pub fn new(config: &FileTransferConfig, state_dir: &Path) -> FileAccess {
        FileAccess { config: config.clone(), root: open_root(config), journal: Journal::new(state_dir) }
    }

    /// New settings (SIGHUP): the chroot is opened again; puts in progress go on.
    pub fn reconfigure(&mut self, config: &FileTransferConfig) {
        self.config = config.clone();
        self.root = open_root(config);
    }

    pub fn config(&self) -> &FileTransferConfig {
        &self.config
    }

    fn root(&self) -> Result<&Root, FileError> {
        self.root.as_ref().map_err(Clone::clone)
    }

    fn resolve(&self, path: &str, leaf: Leaf) -> Result<Location, FileError> {
        resolve(self.root()?, path, self.config.follow_symlinks, leaf)
    }

    /// Opens `path` for reading, after the checks of `regular_files_only`, `owner_get`,
    /// `group_get` and `max_file_size`.
    pub fn get(&self, path: &str) -> Result<GetSource, FileError> {
        let location = self.resolve(path, Leaf::Follow)?;
        let name = location.file_name()?;
        let shown = &location.shown;
        let entry = location.entry.as_ref().ok_or_else(|| not_found(shown))?;
        // Checked before the open too: opening a device can do things (a watchdog starts).
        self.check_readable(shown, entry)?;
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
        let file = open_last(&location, name, flags, self.config.follow_symlinks)?;
        let meta = file.metadata().map_err(|e| io_error(shown, &e))?;
        if (meta.dev(), meta.ino()) != (entry.dev(), entry.ino()) {
            return Err(FileError(format!("{shown} was replaced while being opened; try again")));
        }
        self.check_readable(shown, &meta)?;
        let (size, mode, uid, gid, mtime) =
            (meta.len(), meta.mode() & 0o7777, meta.uid(), meta.gid(), meta.mtime());
        Ok(GetSource { file, size, mode, uid, gid, mtime })
    }

    fn check_readable(&self, shown: &str, meta: &Metadata) -> Result<(), FileError> {
        self.check_kind(shown, meta.file_type())?;
        self.check_owner(shown, meta)?;
        self.check_size(shown, "is", meta.len())
    }

    /// Directories are never files to read or replace; other non-regular files only when
    /// `regular_files_only` is false.
    fn check_kind(&self, shown: &str, kind: FileType) -> Result<(), FileError> {
        if kind.is_dir() {
            return Err(FileError(format!("{shown} is a directory")));
        }
        if self.config.regular_files_only && !kind.is_file() {
            return Err(FileError(format!(
                "{shown} is {}, not a regular file (file_transfer.regular_files_only is true)",
                kind_text(kind)
            )));
        }
        Ok(())
    }

    fn check_owner(&self, shown: &str, meta: &Metadata) -> Result<(), FileError> {
        let c = &self.config;
        check_listed(&c.owner_get, meta.uid(), users::user_name, |owner, list| {
            format!("{shown} is owned by {owner}, not by a user in file_transfer.owner_get ({list})")
        })?;
        check_listed(&c.group_get, meta.gid(), users::group_name, |group, list| {
            format!("{shown} belongs to group {group}, not to a group in file_transfer.group_get ({list})")
        })
    }

    /// `size` (what the file `is`, or `would be`) within `max_file_size`.
    fn check_size(&self, shown: &str, is: &str, size: u64) -> Result<(), FileError> {
        let max = self.config.max_file_size;
        if max > 0 && size > max {
            return Err(FileError(format!(
                "{shown} {is} {size} bytes, more than file_transfer.max_file_size ({max})"
            )));
        }
        Ok(())
    }

    /// The entries of directory `path` sorted by name, or `path` itself when it is not a
    /// directory. Links are shown as links, with their text; `path` itself is followed only
    /// when `follow_symlinks`.
    pub fn ls(&self, path: &str) -> Result<Vec<Entry>, FileError> {
        let leaf = if self.config.follow_symlinks { Leaf::Follow } else { Leaf::Keep };
        let location = self.resolve(path, leaf)?;
        let shown = &location.shown;
        let entry = location.entry.as_ref().ok_or_else(|| not_found(shown))?;
        let dir = match &location.name {
            None => sys::reopen_dir(&location.dir).map_err(|e| io_error(shown, &e))?,
            Some(name) if entry.is_dir() => {
                open_last(&location, name, libc::O_RDONLY | libc::O_DIRECTORY, self.config.follow_symlinks)?
            }
            Some(name) => {
                return Ok(vec![Names::default()
                    .entry(&location.dir, name)
                    .map_err(|e| io_error(shown, &e))?])
            }
        };
        let names = sys::read_dir_names(&dir).map_err(|e| io_error(shown, &e))?;
        let mut cache = Names::default();
        // An entry removed since the directory was read is left out.
        let mut entries: Vec<Entry> = names.iter().filter_map(|name| cache.entry(&dir, name).ok()).collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }
}

/// User and group names met in one listing (each lookup may read /etc/passwd).
#[derive(Default)]
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    /// `name` in `dir`, as it is (a link is not followed).
    fn entry(&mut self, dir: &File, name: &CStr) -> io::Result<Entry> {
        let file = sys::open_entry(dir, name)?;
        let meta = file.metadata()?;
        let kind = meta.file_type();
        let link = kind.is_symlink().then(|| sys::read_link(&file)).transpose()?;
        let (uid, gid) = (meta.uid(), meta.gid());
        Ok(Entry {
            name: String::from_utf8_lossy(name.to_bytes()).into_owned(),
            kind: match kind {
                k if k.is_file() => Kind::File,
                k if k.is_dir() => Kind::Dir,
                k if k.is_symlink() => Kind::Symlink,
                _ => Kind::Other,
            },
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            owner: self
                .users
                .entry(uid)
                .or_insert_with(|| users::user_name(uid).unwrap_or(uid.to_string()))
                .clone(),
            group: self
                .groups
                .entry(gid)
                .or_insert_with(|| users::group_name(gid).unwrap_or(gid.to_string()))
                .clone(),
            mtime: meta.mtime(),
            link: link.map(|text| String::from_utf8_lossy(&text).into_owned()),
        })
    }
}

/// `id` must be in `allowed` (by name or number), unless the list is empty; else the refusal,
/// given the name (or number) and the list.
fn check_listed(
    allowed: &[String],
    id: u32,
    name_of: fn(u32) -> Option<String>,
    refusal: impl FnOnce(&str, &str) -> String,
) -> Result<(), FileError> {
    if allowed.is_empty() {
        return Ok(());
    }
    let name = name_of(id);
    if users::listed(allowed, id, name.as_deref()) {
        return Ok(());
    }
    Err(FileError(refusal(&name.unwrap_or_else(|| id.to_string()), &allowed.join(", "))))
}

/// Opens the last component of `location` with O_NOFOLLOW: a link swapped in after the walk
/// is refused, never followed.
fn open_last(
    location: &Location,
    name: &CStr,
    flags: libc::c_int,
    following: bool,
) -> Result<File, FileError> {
    let shown = &location.shown;
    sys::openat(&location.dir, name, flags | libc::O_NOFOLLOW, 0).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) if following => {
            FileError(format!("{shown} became a symbolic link while being opened"))
        }
        Some(libc::ELOOP) => {
            FileError(format!("{shown} is a symbolic link (file_transfer.follow_symlinks is false)"))
        }
        _ => io_error(shown, &e),
    })
}

/// The sha256 (hex) of the first `len` bytes of `file`, whatever its position: a resumed
/// transfer checks the part already there, a finished one the whole file.
pub fn sha256_prefix(file: &File, len: u64) -> io::Result<String> {
    Ok(crate::trust::hex(hash_prefix_until(file, len, || false)?.finish().as_ref()))
}

/// The sha256 context fed with the first `len` bytes of `file` (a resumed get goes on hashing
/// from there, so that its report covers the whole file), asking `stop` before each block of
/// 64 KiB: a long file is not read to its end once the work is cancelled (an error
/// "cancelled" then).
pub fn hash_prefix_until(
    file: &File,
    len: u64,
    stop: impl Fn() -> bool,
) -> io::Result<ring::digest::Context> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    while done < len {
        if stop() {
            return Err(io::Error::other("cancelled"));
        }
        let want = buf.len().min((len - done).try_into().unwrap_or(usize::MAX));
        let n = match file.read_at(&mut buf[..want], done) {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("shorter than {len} bytes")))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        context.update(&buf[..n]);
        done += n as u64;
    }
    Ok(context)
}

fn kind_text(kind: FileType) -> &'static str {
    match kind {
        k if k.is_fifo() => "a FIFO",
        k if k.is_char_device() => "a character device",
        k if k.is_block_device() => "a block device",
        k if k.is_socket() => "a socket",
        k if k.is_symlink() => "a symbolic link",
        _ => "a special file",
    }
}

fn open_root(config: &FileTransferConfig) -> Result<Root, FileError> {
    if config.disable {
        return Err(FileError("file transfer is disabled on this device (file_transfer.disable)".into()));
    }
    let root = Root::open(&config.chroot);
    if let Err(e) = &root {
        log::warn!("file transfer: {e}");
    }
    root
}

fn not_found(shown: &str) -> FileError {
    io_error(shown, &io::Error::from_raw_os_error(libc::ENOENT))
}

fn io_error(shown: &str, e: &io::Error) -> FileError {
    FileError(format!("{shown}: {}", error_text(e)))
}

#[cfg(test)]
mod tests;
