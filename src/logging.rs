//! One line per event on stderr: `2026-11-23T18:30:05Z INFO  message`. The level comes from
//! the first of: `--log-level`, `RUST_LOG`, the config's `log_level`, `info`. Each is a level
//! (`error`, `warn`, `info`, `debug`, `trace`, `off`) or, as in RUST_LOG, comma-separated
//! `MODULE=LEVEL` directives, e.g. `warn,tether::net=debug`. Anything else is refused: env_logger
//! would take a bare word (`loud`) for a module name and log nothing else.
//!
//! Release builds compile `trace` lines out (log's `release_max_level_debug`): the HTTP
//! client's hex-dump every byte, a cost even when off. `trace` then logs what `debug` does.

use std::io::Write;
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

const DEFAULT_LEVEL: &str = "info";
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

static LOGGER: Logger = Logger::new();

/// Whether `spec` is a level or RUST_LOG-style directives; the error says what is allowed.
pub fn check_level(spec: &str) -> Result<(), String> {
    let is_level = |word: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word.trim()));
    let is_module = |word: &str| {
        let word = word.trim();
        !word.is_empty()
            && word
                .split("::")
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    };
    let bad = spec.split(',').find(|directive| match directive.split_once('=') {
        Some((module, level)) => !is_module(module) || !is_level(level),
        None => !is_level(directive),
    });
    match bad {
        Some(directive) => Err(format!(
            "\"{}\" is not a log level: use error, warn, info, debug, trace or off (or, as in \
             RUST_LOG, MODULE=LEVEL directives separated by commas)",
            directive.trim()
        )),
        None => Ok(()),
    }
}

/// Starts logging (the agent): a bad level from the flag, RUST_LOG or the config is an error
/// that names its source. `--log-level` or RUST_LOG, when given, keep winning over the config's
/// level at later `set_config_level` calls.
pub fn start(flag: Option<&str>, config_level: Option<&str>) -> Result<(), String> {
    let env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let given = flag.map(|f| ("--log-level", f.to_string())).or(env.map(|e| ("RUST_LOG", e)));
    let _ = LOGGER.given.set(given);
    set_config_level(config_level)?;
    let _ = log::set_logger(&LOGGER);
    Ok(())
}

/// Applies the config's `log_level` (absent: `info`), e.g. after SIGHUP reloaded the config,
/// unless `--log-level` or RUST_LOG was given. A bad level changes nothing.
pub fn set_config_level(config_level: Option<&str>) -> Result<(), String> {
    let max = LOGGER.apply(config_level)?;
    log::set_max_level(max);
    Ok(())
}

/// Starts logging for a tool that must go on anyway (tetherctl): a bad level is logged and
/// `fallback` (absent: `info`) used instead.
pub fn init(flag: Option<&str>, fallback: Option<&str>) {
    if let Err(e) = start(flag, fallback) {
        let fallback = fallback.unwrap_or(DEFAULT_LEVEL);
        if let Ok(max) = LOGGER.set(fallback) {
            log::set_max_level(max);
            let _ = log::set_logger(&LOGGER);
        }
        log::warn!("{e}; logging at {fallback}");
    }
}

/// env_logger's filter and format, behind a lock so the filter can change while running.
struct Logger {
    filter: RwLock<Option<env_logger::Logger>>,
    /// Where the level was given on the command line or in the environment, and what it is.
    given: OnceLock<Option<(&'static str, String)>>,
}

impl Logger {
    const fn new() -> Logger {
        Logger { filter: RwLock::new(None), given: OnceLock::new() }
    }

    /// Filters by what was given, else `config_level`, else `info`.
    fn apply(&self, config_level: Option<&str>) -> Result<LevelFilter, String> {
        let (source, spec) = match self.given.get().and_then(Option::as_ref) {
            Some((source, spec)) => (*source, spec.as_str()),
            None => ("log_level", config_level.unwrap_or(DEFAULT_LEVEL)),
        };
        self.set(spec).map_err(|e| format!("{source}: {e}"))
    }

    fn set(&self, spec: &str) -> Result<LevelFilter, String> {
        check_level(spec)?;
        let mut builder = env_logger::Builder::new();
        builder.parse_filters(spec);
        builder.format(|out, record| writeln!(out, "{} {:<5} {}", utc_now(), record.level(), record.args()));
        let filter = builder.build();
        let max = filter.filter();
        *self.filter.write().unwrap_or_else(PoisonError::into_inner) = Some(filter);
        Ok(max)
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        let filter = self.filter.read().unwrap_or_else(PoisonError::into_inner);
        filter.as_ref().is_some_and(|f| f.enabled(metadata))
    }

    fn log(&self, record: &Record<'_>) {
        if let Some(filter) = self.filter.read().unwrap_or_else(PoisonError::into_inner).as_ref() {
            filter.log(record);
        }
    }

    fn flush(&self) {}
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
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
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

/// The inverse of `civil_from_days`: days since 1970-01-01 of a date (month 1 to 12).
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Level;

    fn enabled(logger: &Logger, level: Level, target: &str) -> bool {
        logger.enabled(&Metadata::builder().level(level).target(target).build())
    }

    #[test]
    fn levels_and_directives_are_checked() {
        for good in ["info", "WARN", " debug ", "off", "trace", "warn,tether::net=debug", "tether=trace"] {
            assert_eq!(check_level(good), Ok(()), "{good}");
        }
        for bad in [
            "bogus",
            "loud",
            "",
            "tether",
            "info,bogus",
            "tether=loud",
            "=info",
            "a::=info",
            "info/foo",
            "error,",
        ] {
            let e = check_level(bad).expect_err(bad);
            assert!(e.contains("is not a log level: use error, warn, info, debug, trace or off"), "{e}");
        }
        assert!(check_level("info,bogus").unwrap_err().starts_with("\"bogus\" is not"));
    }

    #[test]
    fn the_config_level_applies_at_run_time_and_a_bad_one_changes_nothing() {
        let logger = Logger::new();
        logger.given.set(None).unwrap();
        assert_eq!(logger.apply(Some("warn")), Ok(LevelFilter::Warn));
        assert!(!enabled(&logger, Level::Info, "tether::agent"));
        assert_eq!(logger.apply(Some("debug")), Ok(LevelFilter::Debug));
        assert!(enabled(&logger, Level::Debug, "tether::agent"));
        let e = logger.apply(Some("loud")).unwrap_err();
        assert!(e.starts_with("log_level: \"loud\" is not a log level"), "{e}");
        assert!(enabled(&logger, Level::Debug, "tether::agent"), "a refused level changed the filter");
        assert_eq!(logger.apply(None), Ok(LevelFilter::Info));
        assert!(!enabled(&logger, Level::Debug, "tether::agent"));
    }

    #[test]
    fn the_flag_or_rust_log_wins_over_the_config() {
        let logger = Logger::new();
        logger.given.set(Some(("--log-level", "error,tether::net=debug".into()))).unwrap();
        logger.apply(Some("trace")).unwrap();
        assert!(!enabled(&logger, Level::Warn, "tether::agent"));
        assert!(enabled(&logger, Level::Debug, "tether::net::client"));
        let bad = Logger::new();
        bad.given.set(Some(("RUST_LOG", "bogus".into()))).unwrap();
        assert!(bad.apply(Some("info")).unwrap_err().starts_with("RUST_LOG: \"bogus\" is not a log level"));
    }

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
        for days in [-800_000, -1, 0, 59, 11_016, 19_722, 20_415, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }
}
