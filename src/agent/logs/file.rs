//! One log file read for a query: from where `-n` and `--since` start it, to its end, and with
//! `-f` on from there as it grows, across a rotation by rename (the old file's remainder, then
//! the new file from its start once it appears at the path), a truncation (from the start again)
//! and a deletion followed by a new file.
//!
//! A truncation is noticed when the file is found shorter than what was read of it, as `tail -f`
//! does: a file truncated and then written past that length before the follower looked again is
//! read on from the old offset.

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::lines::{put_line, Grep, LineSplitter};
use super::watch::{Watch, Watching};
use super::{tail, Notice, Query, Status};

/// Bytes read from the file per `read` call.
const CHUNK: usize = 16 * 1024;

#[derive(Debug)]
pub struct FileLog {
    path: PathBuf,
    file: File,
    /// Device and inode of `file`: when the path names another, the file was replaced.
    identity: (u64, u64),
    /// What was read of `file`.
    offset: u64,
    /// Not following: the file's length when it was opened, where the read ends.
    end: Option<u64>,
    lines: LineSplitter,
    grep: Option<Grep>,
    /// Following.
    watch: Option<Watch>,
    chunk: Vec<u8>,
}

impl FileLog {
    /// Opens `path` where the query's `-n` and `--since` start it; with `follow`, sets up what
    /// wakes the follower (see `fd`).
    pub fn open(path: &Path, query: &Query) -> io::Result<FileLog> {
        FileLog::open_watched(path, query, Watch::new)
    }

    /// `open`, with the watch made by `watch` (tests choose a timer).
    pub(super) fn open_watched(
        path: &Path,
        query: &Query,
        watch: impl FnOnce(&Path) -> io::Result<Watch>,
    ) -> io::Result<FileLog> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        let offset = tail::start_offset(&file, meta.len(), query)?;
        let watch = if query.follow { Some(watch(path)?) } else { None };
        Ok(FileLog {
            path: path.to_path_buf(),
            file,
            identity: (meta.dev(), meta.ino()),
            offset,
            end: (!query.follow).then_some(meta.len()),
            lines: LineSplitter::default(),
            grep: query.grep.clone(),
            watch,
            chunk: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Following: the descriptor to register (readable) with the event loop; `read` again
    /// when it is ready.
    pub fn fd(&self) -> Option<RawFd> {
        self.watch.as_ref().map(Watch::fd)
    }

    /// Following: by inotify or by a timer.
    pub fn watching(&self) -> Option<Watching> {
        self.watch.as_ref().map(Watch::how)
    }

    /// Appends the next complete lines the query keeps to `out` (about CHUNK bytes of the file
    /// at a time), each ending in `\n`. A line still being written is held until its newline
    /// (at most LINE_MAX bytes of it), except at the end of a read that does not follow.
    pub fn read(&mut self, out: &mut Vec<u8>) -> io::Result<Status> {
        if let Some(watch) = &self.watch {
            watch.drain();
            if self.file.metadata()?.len() < self.offset {
                self.restart(out);
                return Ok(Status::Notice(Notice::Truncated));
            }
        }
        if self.read_chunk(out)? {
            return Ok(Status::More);
        }
        if self.watch.is_none() {
            self.finish_line(out);
            return Ok(Status::End);
        }
        if self.reopen_if_replaced(out)? {
            return Ok(Status::Notice(Notice::Replaced));
        }
        Ok(Status::Wait)
    }

    /// Whether anything was read.
    fn read_chunk(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        let left = self.end.map_or(u64::MAX, |end| end.saturating_sub(self.offset));
        self.chunk.resize(left.min(CHUNK as u64) as usize, 0);
        if self.chunk.is_empty() {
            return Ok(false);
        }
        let read = self.file.read_at(&mut self.chunk, self.offset)?;
        self.offset += read as u64;
        self.lines.push(&self.chunk[..read], kept(&self.grep, out));
        Ok(read > 0)
    }

    /// The unfinished last line, when no more of it will come.
    fn finish_line(&mut self, out: &mut Vec<u8>) {
        self.lines.finish(kept(&self.grep, out));
    }

    fn restart(&mut self, out: &mut Vec<u8>) {
        self.finish_line(out);
        self.offset = 0;
    }

    /// Switches to the file now at the path, if it is another one. The old file was read to
    /// its end just before: a rotation that renames loses no line.
    fn reopen_if_replaced(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        let identity = |meta: &std::fs::Metadata| (meta.dev(), meta.ino());
        // Gone: the directory's watch tells when a new one comes.
        let Ok(meta) = std::fs::metadata(&self.path) else { return Ok(false) };
        if identity(&meta) == self.identity || !meta.is_file() {
            return Ok(false);
        }
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        self.identity = identity(&file.metadata()?);
        self.file = file;
        self.restart(out);
        if let Some(watch) = &mut self.watch {
            watch.rewatch(&self.path);
        }
        Ok(true)
    }
}

/// Puts the lines `grep` keeps in `out`.
fn kept<'a>(grep: &'a Option<Grep>, out: &'a mut Vec<u8>) -> impl FnMut(&[u8], u64) + 'a {
    move |text, cut| {
        if grep.as_ref().is_none_or(|grep| grep.matches(text)) {
            put_line(out, text, cut);
        }
    }
}
