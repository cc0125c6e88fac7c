//! Network input quoted in log lines: control characters escaped, so a NUL or newline in a
//! command id cannot split or forge a log line, and long values cut short, so a hostile
//! 60,000-character id costs one short line.

use std::fmt;

/// Longest piece of network input quoted whole in a log line.
const MAX_QUOTED_CHARS: usize = 160;

/// Displays `s` with control characters escaped (`\n`, `\u{0}`) and cut after
/// `MAX_QUOTED_CHARS` characters, saying how long it really was.
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, c) in self.0.chars().enumerate() {
            if n == MAX_QUOTED_CHARS {
                return write!(f, "…({} bytes)", self.0.len());
            }
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Printable;

    #[test]
    fn control_characters_are_escaped_and_long_input_cut() {
        assert_eq!(Printable("ping").to_string(), "ping");
        assert_eq!(Printable("a\nb\0c\u{1b}[31m").to_string(), "a\\nb\\u{0}c\\u{1b}[31m");
        let long = "x".repeat(60_000);
        let shown = Printable(&long).to_string();
        assert!(shown.len() < 200 && shown.ends_with("…(60000 bytes)"), "{shown}");
        assert!(!Printable("é\u{7f}").to_string().contains('\u{7f}'));
    }
}
