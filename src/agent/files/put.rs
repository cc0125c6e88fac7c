//! `put`: written to a temp file in the target's directory (created exclusively, never through a
//! link, 0600 until it is done), checked whole against the operator's sha256, given its mode and
//! owner, fsynced and renamed over the target, the directory fsynced: a crash, a `kill -9` or a
//! full disk at any moment leaves the previous version or the new one under the target name,
//! never a half file. Resuming and the journal: journal.rs.
//!
//! A replaced file keeps its mode, owner and group, as when written in place (`scp`), unless a
//! setting says otherwise: `preserve_mode` (the operator's mode, less `umask`), `owner_put` /
//! `group_put`, then `preserve_owner` / `preserve_group`. A new file gets 0666 less `umask`.
//! Setuid, setgid and sticky bits are never applied.

use std::ffi::{CStr, CString};
use std::fs::{File, Metadata, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use super::journal::{self, Journal};
use super::resolve::{Leaf, Location};
use super::{io_error, sha256_prefix, sys, users, FileAccess, FileError};
use crate::fsutil::error_text;

/// What an operator asks to write.
#[derive(Debug, Clone)]
pub struct PutRequest<'a> {
    pub path: &'a str,
    pub size: u64,
    /// Of the whole file, in hex.
    pub sha256: &'a str,
    /// The operator's, applied with `preserve_mode`, `preserve_owner`, `preserve_group`.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// A put under way. Dropped unfinished (the link lost), its temp file stays for a retry to
/// resume while the agent runs; `abort` removes it.
#[derive(Debug)]
pub struct PutTarget {
    file: File,
    /// The target's directory, opened for reading: renamed in, then fsynced.
    dir: File,
    name: CString,
    temp: Temp,
    shown: String,
    size: u64,
    sha256: String,
    written: u64,
    /// The sha256 of the bytes as they are written, for a put begun from zero: its end then
    /// reads nothing back (on the event loop, a read of a big file would hold the heartbeats).
    /// None for a resumed put: its end hashes the whole file.
    hash: Option<RunningHash>,
    attributes: Attributes,
    replace: bool,
    journal: Journal,
    /// This put's number in the journal: a newer put of the same file supersedes it.
    put: u64,
}

struct RunningHash(ring::digest::Context);

impl std::fmt::Debug for RunningHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunningHash")
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Attributes {
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
}

/// A put's temp file: its name in the target's directory, and its real path (the journal's).
#[derive(Debug)]
struct Temp {
    name: CString,
    path: PathBuf,
}

impl Temp {
    fn of(location: &Location, target: &CStr, size: u64, sha256: &str) -> Temp {
        let name = journal::temp_name(&location.real_dir.join(sys::path_of(target.to_bytes())), size, sha256);
        Temp { path: location.real_dir.join(&name), name: CString::new(name).expect("hex has no NUL") }
    }
}

impl FileAccess {
    /// Starts (or resumes) writing `request.path`: refused when `allow_overwrite`,
    /// `regular_files_only` or `max_file_size` forbid it, when the file could not be given the
    /// owner a setting asks for, or when its filesystem lacks the space. Nothing is written then.
    pub fn begin_put(&self, request: &PutRequest) -> Result<PutTarget, FileError> {
        let sha256 = check_sha256(request.path, request.sha256)?;
        let location = self.resolve(request.path, Leaf::Follow)?;
        let name = location.file_name()?.to_owned();
        self.check_target(&location, &name, request.size)?;
        let attributes = self.attributes(&location.shown, request, location.entry.as_ref())?;
        let dir = sys::reopen_dir(&location.dir).map_err(|e| io_error(&location.shown, &e))?;
        let temp = Temp::of(&location, &name, request.size, &sha256);
        let (file, written, put) = self.start_temp(&dir, &temp, &location, request.size)?;
        Ok(PutTarget {
            file,
            dir,
            name,
            temp,
            shown: location.shown,
            size: request.size,
            sha256,
            written,
            hash: (written == 0).then(|| RunningHash(ring::digest::Context::new(&ring::digest::SHA256))),
            attributes,
            replace: self.config.allow_overwrite,
            journal: self.journal.clone(),
            put,
        })
    }

    fn check_target(&self, location: &Location, name: &CStr, size: u64) -> Result<(), FileError> {
        let shown = &location.shown;
        self.check_size(shown, "would be", size)?;
        if journal::is_temp_name(name.to_bytes()) {
            return Err(FileError(format!("{shown}: the name of a put's temp file is not for a target")));
        }
        let Some(existing) = &location.entry else { return Ok(()) };
        self.check_kind(shown, existing.file_type())?;
        if !self.config.allow_overwrite {
            return Err(FileError(format!("{shown} exists (file_transfer.allow_overwrite is false)")));
        }
        Ok(())
    }

    /// The temp file resumed (made by this process and fit for it) or made anew, once there is
    /// room for the rest of the file: the file, the bytes it holds, the put's number.
    fn start_temp(
        &self,
        dir: &File,
        temp: &Temp,
        location: &Location,
        size: u64,
    ) -> Result<(File, u64, u64), FileError> {
        let shown = &location.shown;
        let resumed = if self.journal.made(&temp.path) { resumable(dir, &temp.name, size) } else { None };
        let held = resumed.as_ref().map_or(0, |(_, held)| *held);
        let free = crate::fsutil::free_bytes(dir).map_err(|e| io_error(shown, &e))?;
        check_space(&shown_dir(location), free, size - held)?;
        let put = self.journal.claim(&temp.path).map_err(|e| {
            FileError(format!("{shown}: cannot record the put in state_dir: {}", error_text(&e)))
        })?;
        let file = match resumed {
            Some((file, _)) => file,
            None => create_temp(dir, &temp.name).map_err(|e| {
                self.journal.release(&temp.path, put);
                io_error(shown, &e)
            })?,
        };
        Ok((file, held, put))
    }

    /// The mode and owner the file gets (module doc), or why it cannot get them.
    fn attributes(
        &self,
        shown: &str,
        request: &PutRequest,
        replaced: Option<&Metadata>,
    ) -> Result<Attributes, FileError> {
        let c = &self.config;
        let mode = match request.mode.filter(|_| c.preserve_mode) {
            Some(mode) => mode & 0o777 & !c.umask,
            None => replaced.map_or(0o666 & !c.umask, |old| old.mode() & 0o777),
        };
        let preserved_uid = request.uid.filter(|_| c.preserve_owner);
        let preserved_gid = request.gid.filter(|_| c.preserve_group);
        Ok(Attributes {
            mode,
            uid: give(&USER, shown, c.owner_put.as_deref(), preserved_uid, replaced.map(|m| m.uid()))?,
            gid: give(&GROUP, shown, c.group_put.as_deref(), preserved_gid, replaced.map(|m| m.gid()))?,
        })
    }
}

/// Users or groups, for `give`.
pub(super) struct Ids {
    pub(super) what: &'static str,
    pub(super) put_key: &'static str,
    pub(super) preserve_key: &'static str,
    pub(super) by_name: fn(&str) -> Option<u32>,
    pub(super) can_give: fn(u32) -> bool,
    pub(super) why_not: &'static str,
}

pub(super) const USER: Ids = Ids {
    what: "user",
    put_key: "file_transfer.owner_put",
    preserve_key: "file_transfer.preserve_owner",
    by_name: users::user_id,
    can_give: users::can_give_to_user,
    why_not: "only root gives files away",
};

const GROUP: Ids = Ids {
    what: "group",
    put_key: "file_transfer.group_put",
    preserve_key: "file_transfer.preserve_group",
    by_name: users::group_id,
    can_give: users::can_give_to_group,
    why_not: "the agent is neither root nor in that group",
};

/// The user (group) the file is given to: the one a setting names, else the operator's when
/// preserved, else the replaced file's when the agent can; None: the agent's own.
pub(super) fn give(
    ids: &Ids,
    shown: &str,
    named: Option<&str>,
    preserved: Option<u32>,
    replaced: Option<u32>,
) -> Result<Option<u32>, FileError> {
    let (id, label, key) = match (named, preserved) {
        (Some(name), _) => {
            let id = (ids.by_name)(name).ok_or_else(|| {
                FileError(format!("{}: there is no {} {name} on this device", ids.put_key, ids.what))
            })?;
            (id, name.to_string(), ids.put_key)
        }
        (None, Some(id)) => (id, id.to_string(), ids.preserve_key),
        (None, None) => return Ok(replaced.filter(|id| (ids.can_give)(*id))),
    };
    if !(ids.can_give)(id) {
        return Err(FileError(format!(
            "cannot give {shown} to {} {label} ({key}): {} (the agent runs as uid {})",
            ids.what,
            ids.why_not,
            users::effective_uid()
        )));
    }
    Ok(Some(id))
}

fn check_sha256(path: &str, sha256: &str) -> Result<String, FileError> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sha256.to_ascii_lowercase())
    } else {
        Err(FileError(format!("{path}: the sha256 must be 64 hex digits, got \"{sha256}\"")))
    }
}

pub(super) fn check_space(dir: &str, free: u64, needed: u64) -> Result<(), FileError> {
    if free < needed {
        return Err(FileError(format!("not enough space in {dir}: {free} bytes free, {needed} needed")));
    }
    Ok(())
}

/// The directory part of `location.shown`.
fn shown_dir(location: &Location) -> String {
    match location.shown.rsplit_once('/') {
        Some(("", _)) | None => "/".into(),
        Some((dir, _)) => dir.into(),
    }
}

/// The temp file this process made and the bytes it holds, to resume; None when it is not fit
/// for that (gone, not a plain file of the agent's own, longer than the file): a new one is made.
fn resumable(dir: &File, temp: &CStr, size: u64) -> Option<(File, u64)> {
    let file = sys::openat(dir, temp, libc::O_RDWR | libc::O_APPEND | libc::O_NOFOLLOW, 0).ok()?;
    let meta = file.metadata().ok()?;
    let fit =
        meta.is_file() && meta.uid() == users::effective_uid() && meta.nlink() == 1 && meta.len() <= size;
    fit.then_some((file, meta.len()))
}

/// A new temp file, 0600; a stale one of the same name (not this process's) is removed first.
fn create_temp(dir: &File, temp: &CStr) -> io::Result<File> {
    let flags = libc::O_RDWR | libc::O_APPEND | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    match sys::openat(dir, temp, flags, 0o600) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            sys::unlinkat(dir, temp)?;
            sys::openat(dir, temp, flags, 0o600)
        }
        other => other,
    }
}

impl PutTarget {
    /// Bytes in the temp file: at the start, what a resumed put already holds (the operator
    /// sends only the rest).
    pub fn offset(&self) -> u64 {
        self.written
    }

    /// Appends `bytes`. After an error, `abort`.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), FileError> {
        self.check_current()?;
        if self.written + bytes.len() as u64 > self.size {
            return Err(FileError(format!("{}: more than the {} bytes announced", self.shown, self.size)));
        }
        self.file.write_all(bytes).map_err(|e| io_error(&self.shown, &e))?;
        if let Some(hash) = &mut self.hash {
            hash.0.update(bytes);
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Checks the whole temp file (size, sha256), gives it its mode and owner and renames it
    /// over the target. On failure the temp file is removed and the target left as it was.
    pub fn finish(mut self) -> Result<(), FileError> {
        self.check_current()?;
        let committed = self.commit();
        if committed.is_err() {
            self.abort();
        }
        committed
    }

    /// Removes the temp file (unless a newer put of the same file took it over).
    pub fn abort(self) {
        if self.journal.owns(&self.temp.path, self.put) {
            self.discard();
        }
    }

    fn commit(&mut self) -> Result<(), FileError> {
        let shown = &self.shown;
        if self.written != self.size {
            return Err(FileError(format!("{shown}: {} bytes received of {}", self.written, self.size)));
        }
        let sha256 = match self.hash.take() {
            Some(hash) => crate::trust::hex(hash.0.finish().as_ref()),
            None => sha256_prefix(&self.file, self.size).map_err(|e| io_error(shown, &e))?,
        };
        if sha256 != self.sha256 {
            return Err(FileError(format!(
                "{shown}: sha256 mismatch: the bytes received have {sha256}, the file {}; nothing written",
                self.sha256
            )));
        }
        let Attributes { mode, uid, gid } = self.attributes;
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&self.file, uid, gid).map_err(|e| io_error(shown, &e))?;
        }
        self.file.set_permissions(Permissions::from_mode(mode)).map_err(|e| io_error(shown, &e))?;
        self.file.sync_all().map_err(|e| io_error(shown, &e))?;
        let rename = || sys::renameat(&self.dir, &self.temp.name, &self.name, self.replace);
        match self.journal.rename(&self.temp.path, self.put, rename) {
            None => return Err(superseded(shown)),
            Some(Err(e)) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(FileError(format!("{shown} exists (file_transfer.allow_overwrite is false)")))
            }
            Some(Err(e)) => return Err(io_error(shown, &e)),
            Some(Ok(())) => {}
        }
        self.dir
            .sync_all()
            .map_err(|e| io_error(&format!("{shown} (renamed in, the directory not synced)"), &e))
    }

    fn discard(&self) {
        if let Err(e) = sys::unlinkat(&self.dir, &self.temp.name) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("{}: {}", self.temp.path.display(), error_text(&e));
            }
        }
        self.journal.release(&self.temp.path, self.put);
    }

    fn check_current(&self) -> Result<(), FileError> {
        if !self.journal.owns(&self.temp.path, self.put) {
            return Err(superseded(&self.shown));
        }
        Ok(())
    }
}

fn superseded(shown: &str) -> FileError {
    FileError(format!("{shown}: superseded by a newer put of the same file"))
}
