//! Where to start reading a file so that what follows is what `-n` and `--since` ask for: found
//! by reading backwards from the end in blocks, so the cost is the part of the file that is
//! wanted (plus, with `--grep` or `--since`, the lines skipped on the way), in bounded memory
//! whatever the file's size.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::time::line_stamp;
use super::{Query, LINE_MAX};

const BLOCK: usize = 64 * 1024;

/// The offset of the first line to read from the first `end` bytes of `file`.
///
/// `-n N`: the N-th last line that `--grep` keeps. `--since`: the first line of the last run of
/// lines stamped at or after it, which a line stamped before it ends (read backwards, the log is
/// taken to be in time order); a line without a time belongs with the stamped line before it,
/// and lines before the first stamped line of the file are left out. Both: the later offset.
pub(super) fn start_offset(file: &File, end: u64, query: &Query) -> io::Result<u64> {
    if query.lines.is_none() && query.since.is_none() {
        return Ok(0);
    }
    let wanted = query.lines.unwrap_or(usize::MAX);
    if wanted == 0 {
        return Ok(end);
    }
    let needs_text = query.grep.is_some() || query.since.is_some();
    let mut lines = LinesBackward::new(file, end)?;
    // `start`: the earliest line taken so far; `confirmed`: the earliest one known to pass
    // `--since` (the lines between the two have no time: the line before them decides).
    let (mut start, mut confirmed, mut counted) = (end, end, 0);
    while let Some((line_start, line_end)) = lines.next()? {
        let text = if needs_text { lines.text(line_start, line_end)? } else { &[][..] };
        let stamp = query.since.and_then(|since| line_stamp(text).map(|stamp| since.admits(stamp)));
        match stamp {
            Some(false) => return Ok(confirmed),
            Some(true) if counted == wanted => return Ok(start),
            Some(true) => confirmed = line_start,
            None if counted == wanted => continue,
            None => {}
        }
        if query.grep.as_ref().is_none_or(|grep| grep.matches(text)) {
            counted += 1;
        }
        start = line_start;
        if counted == wanted && (query.since.is_none() || confirmed == start) {
            return Ok(start);
        }
    }
    Ok(if query.since.is_some() { confirmed } else { start })
}

/// The lines of a file from the last to the first, as offsets, read in blocks from the end.
struct LinesBackward<'a> {
    file: &'a File,
    block: Vec<u8>,
    block_start: u64,
    /// Where the next line to give ends (before its `\n`); None once the first line was given.
    next_end: Option<u64>,
    /// A line's start when it is not in `block`.
    scratch: Vec<u8>,
}

impl<'a> LinesBackward<'a> {
    fn new(file: &'a File, end: u64) -> io::Result<LinesBackward<'a>> {
        let mut lines =
            LinesBackward { file, block: Vec::new(), block_start: 0, next_end: None, scratch: Vec::new() };
        if end > 0 {
            // The newline at the very end ends the last line; it does not start an empty one.
            lines.load(end)?;
            let last = lines.block[(end - 1 - lines.block_start) as usize];
            lines.next_end = Some(if last == b'\n' { end - 1 } else { end });
        }
        Ok(lines)
    }

    /// The next line back: its start and its end (before the `\n`).
    fn next(&mut self) -> io::Result<Option<(u64, u64)>> {
        let Some(end) = self.next_end else { return Ok(None) };
        let newline = self.newline_before(end)?;
        self.next_end = newline;
        Ok(Some((newline.map_or(0, |n| n + 1), end)))
    }

    /// The line's first LINE_MAX bytes, without the `\r` of a CRLF ending.
    fn text(&mut self, start: u64, end: u64) -> io::Result<&[u8]> {
        let len = (end - start).min(LINE_MAX as u64) as usize;
        let block_end = self.block_start + self.block.len() as u64;
        let text = if start >= self.block_start && start + len as u64 <= block_end {
            let at = (start - self.block_start) as usize;
            &self.block[at..at + len]
        } else {
            self.scratch.resize(len, 0);
            self.file.read_exact_at(&mut self.scratch, start)?;
            &self.scratch[..]
        };
        let whole = len as u64 == end - start;
        Ok(if whole { text.strip_suffix(b"\r").unwrap_or(text) } else { text })
    }

    fn newline_before(&mut self, mut end: u64) -> io::Result<Option<u64>> {
        while end > 0 {
            self.load(end)?;
            let searched = &self.block[..(end - self.block_start) as usize];
            if let Some(at) = searched.iter().rposition(|&b| b == b'\n') {
                return Ok(Some(self.block_start + at as u64));
            }
            end = self.block_start;
        }
        Ok(None)
    }

    /// Makes `block` hold the bytes just before `end`.
    fn load(&mut self, end: u64) -> io::Result<()> {
        let block_end = self.block_start + self.block.len() as u64;
        if end > self.block_start && end <= block_end {
            return Ok(());
        }
        self.block_start = end.saturating_sub(BLOCK as u64);
        self.block.resize((end - self.block_start) as usize, 0);
        self.file.read_exact_at(&mut self.block, self.block_start)
    }
}
