//! The files of a `files` entry: a path, or a pattern with `*` (any bytes) and `?` (one byte)
//! in its last component only, as `/var/log/*.log`. A pattern matches the regular files of its
//! directory, in name order; a name starting with `.` only when the pattern does too, as in the
//! shell. No `[...]`, `**` or patterns in directories: a rotated log sits next to the current
//! one.

use std::path::{Path, PathBuf};

/// Whether the path has wildcards (in any component).
pub fn is_pattern(path: &str) -> bool {
    path.contains(['*', '?'])
}

/// The regular files `entries` name now, each once, in the order of the entries.
pub fn expand(entries: &[String]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in entries {
        for file in expand_one(entry) {
            if !files.contains(&file) {
                files.push(file);
            }
        }
    }
    files
}

fn expand_one(entry: &str) -> Vec<PathBuf> {
    let path = Path::new(entry);
    if !is_pattern(entry) {
        return if path.is_file() { vec![path.to_path_buf()] } else { Vec::new() };
    }
    let (Some(dir), Some(pattern)) = (path.parent(), path.file_name()) else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let pattern = pattern.as_encoded_bytes();
    let mut matched: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| name_matches(pattern, entry.file_name().as_encoded_bytes()))
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .collect();
    matched.sort();
    matched
}

fn name_matches(pattern: &[u8], name: &[u8]) -> bool {
    if name.first() == Some(&b'.') && pattern.first() != Some(&b'.') {
        return false;
    }
    wildcard_match(pattern, name)
}

/// `*` and `?` over bytes. On a mismatch after a `*`, that `*` takes one more byte and the
/// match goes on from there: linear in practice, never exponential.
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // The last `*` seen, and where in the name its match currently ends.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((star_p, star_n)) => {
                    star = Some((star_p, star_n + 1));
                    p = star_p + 1;
                    n = star_n + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        let yes = |p: &str, n: &str| assert!(name_matches(p.as_bytes(), n.as_bytes()), "{p} {n}");
        let no = |p: &str, n: &str| assert!(!name_matches(p.as_bytes(), n.as_bytes()), "{p} {n}");
        yes("*.log", "app.log");
        yes("messages*", "messages");
        yes("messages*", "messages.1");
        yes("a?c", "abc");
        yes("*a*b*", "xaxxbx");
        yes("**", "x");
        yes(".*", ".hidden");
        no("*.log", "app.log.1");
        no("*.log", ".hidden.log");
        no("a?c", "ac");
        no("*a*b", "xaxxbx");
        no("abc", "abd");
    }

    #[test]
    fn expands_regular_files_in_name_order_each_once() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.log", "a.log", "c.txt", ".h.log"] {
            std::fs::write(dir.path().join(name), "x\n").unwrap();
        }
        std::fs::create_dir(dir.path().join("d.log")).unwrap();
        let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let files = expand(&[at("*.log"), at("a.log"), at("c.txt"), at("missing"), at("nodir/*.log")]);
        let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["a.log", "b.log", "c.txt"]);
    }
}
