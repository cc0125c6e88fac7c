//! One line per event on stderr: `2026-11-23T18:30:05Z INFO  message`. The level comes from
//! the first of: `--log-level`, `RUST_LOG`, the config's `log_level`, `info`.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn init(flag: Option<&str>, config_level: Option<&str>) {
    let spec = flag
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()))
        .or_else(|| config_level.map(str::to_string))
        .unwrap_or_else(|| "info".into());
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(&spec);
    builder.format(|out, record| writeln!(out, "{} {:<5} {}", utc_now(), record.level(), record.args()));
    let _ = builder.try_init();
}

/// The current UTC time as RFC 3339 with second precision, without a date crate.
pub fn utc_now() -> String {
    utc_time(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

/// Unix seconds as RFC 3339 UTC, e.g. `2026-11-23T18:30:05Z`.
pub fn utc_time(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::{civil_from_days, utc_time};

    #[test]
    fn rfc3339() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_time(1_795_459_236), "2026-11-23T18:40:36Z");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_722), (2023, 12, 31));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
