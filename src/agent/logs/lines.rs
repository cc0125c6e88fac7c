//! What files and commands share: cutting bytes into bounded lines, and keeping the lines a
//! query wants (`--grep`; `--since` for lines read forward).

use super::time::{line_stamp, Since};
use super::LINE_MAX;

/// `--grep`: a regular expression (regex-lite: linear time whatever the pattern, Perl-like
/// syntax without Unicode classes), matched anywhere in the line.
#[derive(Debug, Clone)]
pub struct Grep(regex_lite::Regex);

/// Bounds the memory an operator's pattern may take on the device.
const GREP_SIZE_LIMIT: usize = 256 * 1024;

impl Grep {
    pub fn new(pattern: &str) -> Result<Grep, String> {
        let regex = regex_lite::RegexBuilder::new(pattern).size_limit(GREP_SIZE_LIMIT).build();
        regex.map(Grep).map_err(|e| format!("--grep: {e}"))
    }

    /// Bytes that are not UTF-8 match as U+FFFD.
    pub fn matches(&self, line: &[u8]) -> bool {
        self.0.is_match(&String::from_utf8_lossy(line))
    }
}

/// Cuts a stream of bytes into lines: `\n` ends a line and a `\r` before it is dropped; a line
/// longer than LINE_MAX keeps its first LINE_MAX bytes and counts the rest as cut. It holds at
/// most one unfinished line, of at most LINE_MAX bytes.
#[derive(Debug, Default)]
pub(super) struct LineSplitter {
    partial: Vec<u8>,
    cut: u64,
}

impl LineSplitter {
    /// Calls `line(text, bytes_cut)` for each line `bytes` completes.
    pub fn push(&mut self, mut bytes: &[u8], mut line: impl FnMut(&[u8], u64)) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() && self.cut == 0 {
                let whole = &bytes[..end];
                let kept = &whole[..whole.len().min(LINE_MAX)];
                let cut = (whole.len() - kept.len()) as u64;
                line(strip_cr(kept, cut), cut);
            } else {
                self.keep(&bytes[..end]);
                line(strip_cr(&self.partial, self.cut), self.cut);
                self.partial.clear();
                self.cut = 0;
            }
            bytes = &bytes[end + 1..];
        }
        self.keep(bytes);
    }

    /// The unfinished line, at the end of the stream (or of a file left for another).
    pub fn finish(&mut self, line: impl FnOnce(&[u8], u64)) {
        if !self.partial.is_empty() || self.cut > 0 {
            line(strip_cr(&self.partial, self.cut), self.cut);
        }
        self.partial.clear();
        self.cut = 0;
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = LINE_MAX - self.partial.len();
        let kept = bytes.len().min(room);
        self.partial.extend_from_slice(&bytes[..kept]);
        self.cut += (bytes.len() - kept) as u64;
    }
}

/// The `\r` of a CRLF line ending; a line that was cut has its ending in the part cut.
fn strip_cr(line: &[u8], cut: u64) -> &[u8] {
    match line.strip_suffix(b"\r") {
        Some(text) if cut == 0 => text,
        _ => line,
    }
}

/// Appends a line as the operator gets it: its text, what was cut, a newline.
pub(super) fn put_line(out: &mut Vec<u8>, text: &[u8], cut: u64) {
    out.extend_from_slice(text);
    if cut > 0 {
        out.extend_from_slice(format!(" [{cut} more bytes cut]").as_bytes());
    }
    out.push(b'\n');
}

/// Keeps the lines a query wants, read in order. `--since`: the lines from the first one
/// stamped at or after it; a line without a time takes the verdict of the line before it (so
/// nothing before the first stamped line), and once one passes, the log is taken to be in time
/// order and every later line passes.
#[derive(Debug, Clone)]
pub(super) struct LineFilter {
    /// Until a line has passed.
    since: Option<Since>,
    grep: Option<Grep>,
}

impl LineFilter {
    pub fn new(since: Option<Since>, grep: Option<Grep>) -> LineFilter {
        LineFilter { since, grep }
    }

    pub fn keep(&mut self, line: &[u8]) -> bool {
        if let Some(since) = &self.since {
            match line_stamp(line) {
                Some(stamp) if since.admits(stamp) => self.since = None,
                _ => return false,
            }
        }
        self.grep.as_ref().is_none_or(|grep| grep.matches(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<(String, u64)> {
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        let mut add = |text: &[u8], cut| lines.push((String::from_utf8_lossy(text).into_owned(), cut));
        for chunk in chunks {
            splitter.push(chunk, &mut add);
        }
        splitter.finish(&mut add);
        lines
    }

    #[test]
    fn lines_across_chunks_with_crlf_and_no_last_newline() {
        let lines = split(&[b"one\r\ntw", b"o\n", b"\n", b"thr", b"ee\r"]);
        let texts: Vec<&str> = lines.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(texts, ["one", "two", "", "three"]);
    }

    #[test]
    fn a_long_line_is_cut_and_says_so() {
        let long = vec![b'x'; LINE_MAX + 10];
        let half = LINE_MAX / 2;
        for chunks in [vec![&long[..], b"\nnext\n"], vec![&long[..half], &long[half..], b"\nnext\n"]] {
            let lines = split(&chunks);
            assert_eq!(lines[0], ("x".repeat(LINE_MAX), 10));
            assert_eq!(lines[1], ("next".to_string(), 0));
        }
        let mut out = Vec::new();
        put_line(&mut out, b"abc", 10);
        assert_eq!(out, b"abc [10 more bytes cut]\n");
    }

    #[test]
    fn grep_is_a_regex_and_bad_ones_say_why() {
        let grep = Grep::new("err(or)?|fail").unwrap();
        assert!(grep.matches(b"disk error on sda"));
        assert!(grep.matches(b"link FAIL fail"));
        assert!(!grep.matches(b"all good"));
        assert!(grep.matches(b"\xff\xfe fail"));
        assert!(Grep::new("(unclosed").unwrap_err().starts_with("--grep: "));
    }
}
