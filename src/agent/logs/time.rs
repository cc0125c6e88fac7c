//! Times for `--since`: what the operator gives (RFC 3339, or a time ago: `30s`, `10m`, `2h`,
//! `1d`, `1w`), and the time a log line starts with: classic syslog `Mmm dd hh:mm:ss` (local time,
//! no year) or ISO 8601 `YYYY-MM-DD[T ]hh:mm[:ss[.frac]][Z|±hh[:]mm]` (local time when it has no
//! offset).

use crate::logging::{civil_from_days, days_from_civil};

const DAY: i64 = 86_400;
const MONTHS: [&[u8]; 12] =
    [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];

/// The moment `--since` names, in both clocks log lines are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    /// Unix seconds: compared with times that carry their offset.
    unix: i64,
    /// The device's local wall clock at that moment, counted as unix seconds count: compared
    /// with times written without an offset, as syslog writes them.
    wall: i64,
    /// The local wall clock when the query was made, and its year: a classic syslog time has
    /// no year, so it gets this one, or the one before when that would put it in the future.
    now_wall: i64,
    now_year: i64,
}

/// The time at the start of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stamp {
    Unix(i64),
    Wall(i64),
    /// Classic syslog: the year is guessed.
    WallWithoutYear {
        month: u32,
        day: u32,
        second: i64,
    },
}

impl Since {
    /// `text` as given to `--since`; `now` in unix seconds (a time ago counts from it).
    pub fn parse(text: &str, now: i64) -> Result<Since, String> {
        let unix = match seconds_ago(text) {
            Some(ago) => now - ago,
            None => absolute(text.trim()).ok_or_else(|| {
                format!(
                    "--since: \"{text}\" is not a time: give RFC 3339 (2024-05-01T12:00:00Z, \
                     2024-05-01 12:00:00+02:00; without an offset it is the device's local time) \
                     or a time ago (30s, 10m, 2h, 1d, 1w)"
                )
            })?,
        };
        Ok(Since::at(unix, now))
    }

    /// The moment `unix`, for a query made at `now` (both unix seconds).
    pub fn at(unix: i64, now: i64) -> Since {
        let now_wall = now + utc_offset(now);
        let now_year = civil_from_days(now_wall.div_euclid(DAY)).0;
        Since { unix, wall: unix + utc_offset(unix), now_wall, now_year }
    }

    /// Unix seconds, e.g. for `journalctl --since @SECONDS`.
    pub fn unix(&self) -> i64 {
        self.unix
    }

    /// Whether a line written at `stamp` is at or after this moment.
    pub(super) fn admits(&self, stamp: Stamp) -> bool {
        match stamp {
            Stamp::Unix(t) => t >= self.unix,
            Stamp::Wall(t) => t >= self.wall,
            Stamp::WallWithoutYear { month, day, second } => self.with_year(month, day, second) >= self.wall,
        }
    }

    fn with_year(&self, month: u32, day: u32, second: i64) -> i64 {
        let wall = |year| days_from_civil(year, month, day) * DAY + second;
        let this_year = wall(self.now_year);
        // A day's slack for clocks a little ahead of the one that wrote the line.
        if this_year > self.now_wall + DAY {
            wall(self.now_year - 1)
        } else {
            this_year
        }
    }
}

/// The time a log line starts with, if it starts with one.
pub(super) fn line_stamp(line: &[u8]) -> Option<Stamp> {
    classic(line).or_else(|| iso(line).map(|(stamp, _)| stamp))
}

/// `10m` and the like, in seconds.
fn seconds_ago(text: &str) -> Option<i64> {
    let text = text.trim();
    let unit = match text.chars().last()? {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => DAY,
        'w' => 7 * DAY,
        _ => return None,
    };
    let count = &text[..text.len() - 1];
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    count.parse::<i64>().ok()?.checked_mul(unit).filter(|s| *s <= 100 * 365 * DAY)
}

/// An ISO 8601 date and time making up the whole text, as unix seconds.
fn absolute(text: &str) -> Option<i64> {
    match iso(text.as_bytes())? {
        (Stamp::Unix(unix), used) if used == text.len() => Some(unix),
        (Stamp::Wall(wall), used) if used == text.len() => {
            // The offset in force at that wall time: looked up twice, as it may differ from the
            // one a few hours away (summer time).
            let guess = wall - utc_offset(wall);
            Some(wall - utc_offset(guess))
        }
        _ => None,
    }
}

/// `Mmm dd hh:mm:ss`, the day space-padded or not.
fn classic(line: &[u8]) -> Option<Stamp> {
    let month = MONTHS.iter().position(|m| line.get(..3) == Some(*m))? as u32 + 1;
    if line.get(3) != Some(&b' ') || line.get(6) != Some(&b' ') {
        return None;
    }
    let day = match line.get(4..6)? {
        [b' ', d] if d.is_ascii_digit() => u32::from(d - b'0'),
        _ => number(line, 4, 2)?,
    };
    let (second, _) = time_of_day(line, 7)?;
    (1..=31).contains(&day).then_some(Stamp::WallWithoutYear { month, day, second })
}

/// `YYYY-MM-DD`, then optionally `[T ]hh:mm[:ss[.frac]]` and an offset; with the bytes used.
fn iso(text: &[u8]) -> Option<(Stamp, usize)> {
    let (year, month, day) = (number(text, 0, 4)?, number(text, 5, 2)?, number(text, 8, 2)?);
    if text[4] != b'-' || text[7] != b'-' || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let midnight = days_from_civil(year.into(), month, day) * DAY;
    let time = match text.get(10) {
        Some(b'T' | b't' | b' ') => time_of_day(text, 11),
        _ => None,
    };
    let Some((second, used)) = time else { return Some((Stamp::Wall(midnight), 10)) };
    let wall = midnight + second;
    match offset(text, used) {
        Some((offset, used)) => Some((Stamp::Unix(wall - offset), used)),
        None => Some((Stamp::Wall(wall), used)),
    }
}

/// `hh:mm[:ss[.frac]]` at `at`: the second of the day and where it ends.
fn time_of_day(text: &[u8], at: usize) -> Option<(i64, usize)> {
    let (hour, minute) = (number(text, at, 2)?, number(text, at + 3, 2)?);
    if text[at + 2] != b':' || hour > 23 || minute > 59 {
        return None;
    }
    let mut second = i64::from(hour * 3600 + minute * 60);
    let mut end = at + 5;
    if text.get(end) == Some(&b':') {
        let s = number(text, end + 1, 2).filter(|s| *s <= 60)?;
        second += i64::from(s);
        end += 3;
        if matches!(text.get(end), Some(b'.' | b',')) {
            end += 1 + text[end + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
        }
    }
    Some((second, end))
}

/// `Z`, `±hh`, `±hhmm` or `±hh:mm` at `at`: seconds east of UTC and where it ends.
fn offset(text: &[u8], at: usize) -> Option<(i64, usize)> {
    let sign = match text.get(at)? {
        b'Z' | b'z' => return Some((0, at + 1)),
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let hours = number(text, at + 1, 2).filter(|h| *h <= 23)?;
    let (minutes, end) = match text.get(at + 3) {
        Some(b':') => (number(text, at + 4, 2)?, at + 6),
        Some(b) if b.is_ascii_digit() => (number(text, at + 3, 2)?, at + 5),
        _ => (0, at + 3),
    };
    Some((sign * i64::from(hours * 3600 + minutes.min(59) * 60), end))
}

/// The decimal number in `len` digits at `at`.
fn number(text: &[u8], at: usize, len: usize) -> Option<u32> {
    let digits = text.get(at..at + len)?;
    digits.iter().try_fold(0u32, |n, b| b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0')))
}

/// Seconds east of UTC in the device's time zone at `unix` (TZ, else /etc/localtime).
fn utc_offset(unix: i64) -> i64 {
    // `as _`: time_t is 32 bits on some targets (so dates past 2038 wrap there), and libc
    // deprecates naming it on musl, whose width is changing.
    let time = unix as _;
    // SAFETY: tm is plain data; all-zero is valid and localtime_r fills it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::localtime_r(&time, &mut tm) }.is_null() {
        return 0;
    }
    tm.tm_gmtoff as i64
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const NOW: i64 = 1_778_000_000; // 2026-05-05T16:53:20Z

    /// Unix seconds of a UTC date and time.
    pub fn utc(year: i64, month: u32, day: u32, hour: i64, minute: i64, second: i64) -> i64 {
        days_from_civil(year, month, day) * DAY + hour * 3600 + minute * 60 + second
    }

    /// `unix` as the device's local wall clock: `Mmm dd hh:mm:ss` and `YYYY-MM-DD hh:mm:ss`.
    pub fn local_texts(unix: i64) -> (String, String) {
        let wall = unix + utc_offset(unix);
        let (year, month, day) = civil_from_days(wall.div_euclid(DAY));
        let second = wall.rem_euclid(DAY);
        let clock = format!("{:02}:{:02}:{:02}", second / 3600, second % 3600 / 60, second % 60);
        let month_name = String::from_utf8_lossy(MONTHS[month as usize - 1]);
        (format!("{month_name} {day:>2} {clock}"), format!("{year}-{month:02}-{day:02} {clock}"))
    }

    #[test]
    fn since_takes_rfc3339_and_times_ago() {
        let parse = |text| Since::parse(text, NOW).map(|s| s.unix());
        assert_eq!(parse("2026-05-01T12:00:00Z"), Ok(utc(2026, 5, 1, 12, 0, 0)));
        assert_eq!(parse("2026-05-01t12:00:00.250z"), Ok(utc(2026, 5, 1, 12, 0, 0)));
        assert_eq!(parse("2026-05-01T12:00:00+02:00"), Ok(utc(2026, 5, 1, 10, 0, 0)));
        assert_eq!(parse("2026-05-01 12:00:00-0130"), Ok(utc(2026, 5, 1, 13, 30, 0)));
        assert_eq!(parse("10m"), Ok(NOW - 600));
        assert_eq!(parse(" 2h"), Ok(NOW - 7200));
        assert_eq!(parse("1d"), Ok(NOW - DAY));
        assert_eq!(parse("30s"), Ok(NOW - 30));
        assert_eq!(parse("1w"), Ok(NOW - 7 * DAY));
        // Without an offset: the device's local time.
        let (_, local) = local_texts(NOW - 3600);
        assert_eq!(parse(&local), Ok(NOW - 3600));
        for bad in ["", "m", "10", "10y", "-5m", "yesterday", "2026-13-01T00:00:00Z", "2026-05-01T25:00Z"] {
            let e = parse(bad).unwrap_err();
            assert!(e.starts_with(&format!("--since: \"{bad}\" is not a time")), "{bad}: {e}");
        }
    }

    #[test]
    fn line_stamps_classic_and_iso() {
        let wall = |month, day, second| Some(Stamp::WallWithoutYear { month, day, second });
        assert_eq!(line_stamp(b"Jan  5 10:00:01 host kernel: x"), wall(1, 5, 36_001));
        assert_eq!(line_stamp(b"Dec 25 23:59:59 host a: b"), wall(12, 25, 86_399));
        assert_eq!(line_stamp(b"Dec 05 00:00:00 host"), wall(12, 5, 0));
        assert_eq!(
            line_stamp(b"2026-11-23T18:30:05Z INFO  started"),
            Some(Stamp::Unix(utc(2026, 11, 23, 18, 30, 5)))
        );
        assert_eq!(
            line_stamp(b"2026-11-23T18:30:05.123456+01:00 host app[1]: x"),
            Some(Stamp::Unix(utc(2026, 11, 23, 17, 30, 5)))
        );
        assert_eq!(line_stamp(b"2026-11-23 18:30:05 x"), Some(Stamp::Wall(utc(2026, 11, 23, 18, 30, 5))));
        for none in
            [&b"\tat java.lang.Thread"[..], b"", b"Jan", b"Foo  5 10:00:01 x", b"Jan  5 1:00:01 x", b"2026-1"]
        {
            assert_eq!(line_stamp(none), None, "{}", String::from_utf8_lossy(none));
        }
    }

    #[test]
    fn a_classic_stamp_gets_this_year_or_the_last() {
        // 2026-01-02: a line of Dec 31 is from 2025, one of Jan 1 from 2026.
        let now = utc(2026, 1, 2, 12, 0, 0);
        let since = Since::at(utc(2025, 12, 30, 0, 0, 0), now);
        let stamp = |month, day| Stamp::WallWithoutYear { month, day, second: 43_200 };
        assert!(since.admits(stamp(12, 31)));
        assert!(since.admits(stamp(1, 1)));
        assert!(!since.admits(stamp(12, 29)));
        // Later in the year, a December line is last year's: before a since of this spring.
        let since = Since::at(utc(2026, 4, 1, 0, 0, 0), utc(2026, 5, 1, 0, 0, 0));
        assert!(!since.admits(stamp(12, 31)));
        assert!(since.admits(stamp(4, 30)));
    }
}
