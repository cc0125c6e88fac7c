//! The command ledger: every command this device has started, so that none ever runs twice.
//!
//! It lives in `STATE/commands.log`, a journal of one JSON line per change (a new state, "the
//! broker has the final state", "forget it"). Changes made in one turn of the event loop are
//! appended with one write and one fsync (`flush`), so a burst of thousands of commands costs a
//! few syncs, not a rewrite of the whole ledger per command. The journal is replayed at start
//! (a torn last line from a power cut is cut off) and rewritten whole only when most of its
//! lines are dead.
//!
//! A command is forgotten only when it can never come back: its final state was acknowledged
//! by the broker and the operator has cleared the topic since. The ledger holds at most
//! `MAX_OPEN_COMMANDS`; past that new requests are refused, nothing old is forgotten. Finished
//! commands that no one clears (a rollout keeps its states for `tetherctl update status`, a
//! tool may never clear) are history: the newest `HISTORY_KEPT` stay, older ones are retired
//! (`retire_oldest`: the device clears their topics itself, as an operator would).
//! A state is kept in memory only until its line is written: then the line's place in the
//! journal stands in for it (a burst's results are not held in memory until acknowledged).
//!
//! A forgotten command whose request was signed leaves a tombstone until that request is too
//! old to be admitted (`issued + trust.max_age_s`): someone who captured it (the broker, say)
//! cannot have it run again by publishing it once more after the operator cleared it.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::fsutil;
use crate::memory::Drained;
use crate::protocol::{CommandState, Op, MAX_OPEN_COMMANDS};

const JOURNAL_FILE: &str = "commands.log";
/// The ledger of versions before the journal: read once, then replaced.
const OLD_LEDGER_FILE: &str = "commands.json";
/// Changes waiting for a disk that refuses them are kept up to this size; past it the next
/// successful flush rewrites the journal from memory instead.
const MAX_PENDING_BYTES: usize = 1 << 20;
/// Finished commands kept while no one clears them: the op history.
pub const HISTORY_KEPT: usize = 1_000;
/// One look through the ledger per this many acknowledged final states: the history may pass
/// `HISTORY_KEPT` by that many before its oldest are retired.
const HISTORY_SLACK: usize = 100;
/// Tombstones kept at most; past it the one expiring first goes (with a warning).
const MAX_TOMBSTONES: usize = MAX_OPEN_COMMANDS;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub op: Op,
    pub id: Box<str>,
}

impl Key {
    pub fn new(op: Op, id: &str) -> Key {
        Key { op, id: id.into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Executing,
    Successful,
    Failed,
}

impl Phase {
    pub fn is_final(self) -> bool {
        self != Phase::Executing
    }
}

#[derive(Debug)]
pub struct Record {
    pub phase: Phase,
    /// The broker acknowledged the final state.
    pub acked: bool,
    /// The operator cleared the topic after the final state went out.
    pub cleared: bool,
    /// What tells, after a restart, whether the command took effect: the boot a reboot was
    /// started in, the sha256 of the keys a `keys` command writes.
    pub mark: Option<Box<str>>,
    /// Who asked: the signer (`comment SHA256:...`) or "unsigned"; in the final state.
    pub by: Option<Box<str>>,
    /// Until when (unix seconds) a replay of its signed request must be refused once it is
    /// forgotten; None for an unsigned request.
    replay_until: Option<u64>,
    /// The state as JSON until its journal line is written (compact: a burst's results are
    /// held here until the end of the loop turn).
    state: Option<Box<[u8]>>,
    /// Where the record's latest state line starts in the journal, once written.
    offset: Option<u64>,
}

impl Record {
    fn new(phase: Phase) -> Record {
        Record {
            phase,
            acked: false,
            cleared: false,
            mark: None,
            by: None,
            replay_until: None,
            state: None,
            offset: None,
        }
    }
}

/// Who asked for a command, as the ledger keeps it with the command's first state.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The signer (`comment SHA256:...`) or "unsigned".
    pub by: String,
    /// The signed request's `issued + trust.max_age_s`; None when unsigned.
    pub replay_until: Option<u64>,
}

/// One journal line.
#[derive(Serialize, Deserialize)]
struct Line {
    op: Op,
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<CommandState>,
    /// A reboot's mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
    /// A `keys` command's mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keys_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    by: Option<String>,
    /// A state's `Record::replay_until`, or a forget line's tombstone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replay_until: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    acked: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    forget: bool,
}

impl Line {
    fn state(
        key: &Key,
        state: CommandState,
        mark: Option<String>,
        origin: Option<Origin>,
        acked: bool,
    ) -> Line {
        let (boot_id, keys_sha256) = if key.op == Op::Keys { (None, mark) } else { (mark, None) };
        let (by, replay_until) = origin.map_or((None, None), |o| (Some(o.by), o.replay_until));
        Line {
            op: key.op,
            id: key.id.to_string(),
            state: Some(state),
            boot_id,
            keys_sha256,
            by,
            replay_until,
            acked,
            forget: false,
        }
    }

    fn flag(key: &Key, acked: bool, forget: bool) -> Line {
        Line {
            op: key.op,
            id: key.id.to_string(),
            state: None,
            boot_id: None,
            keys_sha256: None,
            by: None,
            replay_until: None,
            acked,
            forget,
        }
    }

    fn tombstone(key: &Key, until: u64) -> Line {
        Line { replay_until: Some(until), ..Line::flag(key, false, true) }
    }

    fn take_mark(&mut self) -> Option<Box<str>> {
        self.boot_id.take().or(self.keys_sha256.take()).map(Into::into)
    }
}

pub struct Ledger {
    path: PathBuf,
    records: HashMap<Key, Record>,
    /// Open for appending once written to.
    file: Option<File>,
    file_len: u64,
    /// Lines in the journal file, live or dead.
    lines: usize,
    /// Lines not written yet, and where each state line starts in them.
    pending: Vec<u8>,
    pending_states: Vec<(Key, usize)>,
    /// The next flush rewrites the journal from memory (pending changes were given up).
    rewrite: bool,
    /// Final states acknowledged since the history was last looked at.
    acked_since_retiring: usize,
    /// Forgotten signed commands, and until when a replay of each is refused (unix seconds).
    tombstones: HashMap<Key, u64>,
}

impl Ledger {
    /// Opens the ledger in `state_dir`, replaying the journal (or importing an old ledger).
    pub fn open(state_dir: &Path) -> Ledger {
        let mut ledger = Ledger {
            path: state_dir.join(JOURNAL_FILE),
            records: HashMap::new(),
            file: None,
            file_len: 0,
            lines: 0,
            pending: Vec::new(),
            pending_states: Vec::new(),
            rewrite: false,
            acked_since_retiring: HISTORY_SLACK,
            tombstones: HashMap::new(),
        };
        match fsutil::read_optional(&ledger.path) {
            Ok(Some(bytes)) => ledger.replay(&bytes),
            Ok(None) => ledger.import_old(&state_dir.join(OLD_LEDGER_FILE)),
            Err(e) => log::error!("command ledger {}: {e}", ledger.path.display()),
        }
        ledger
    }

    fn replay(&mut self, bytes: &[u8]) {
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < bytes.len() {
            log::warn!("command ledger: ignoring a torn last line ({} bytes)", bytes.len() - complete);
            self.rewrite = true;
        }
        let mut offset = 0usize;
        for line in bytes[..complete].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Line>(line) {
                Ok(line) => self.apply(line, Some(offset as u64)),
                Err(e) => log::warn!("command ledger: skipping an unreadable line: {e}"),
            }
            offset += line.len() + 1;
            self.lines += 1;
        }
        self.file_len = complete as u64;
        log::debug!("command ledger: {} command(s) remembered", self.records.len());
    }

    fn import_old(&mut self, old: &Path) {
        #[derive(Deserialize)]
        struct OldRecord {
            op: String,
            id: String,
            state: CommandState,
            #[serde(default)]
            boot_id: Option<String>,
        }
        let Ok(Some(bytes)) = fsutil::read_optional(old) else { return };
        let records: Vec<OldRecord> = serde_json::from_slice(&bytes).unwrap_or_default();
        for r in records {
            if let Some(op) = Op::from_name(&r.op) {
                self.set_state(&Key::new(op, &r.id), r.state, r.boot_id, None);
            }
        }
        self.rewrite = true;
        if self.flush().is_ok() {
            let _ = std::fs::remove_file(old);
        }
    }

    fn apply(&mut self, mut line: Line, offset: Option<u64>) {
        let key = Key::new(line.op, &line.id);
        if line.forget {
            self.records.remove(&key);
            if let Some(until) = line.replay_until {
                self.bury(key, until);
            }
            return;
        }
        if let Some(state) = line.state.take() {
            let Some(phase) = phase_of(&state) else { return };
            let record = self.records.entry(key).or_insert_with(|| Record::new(phase));
            record.phase = phase;
            record.acked = line.acked;
            record.mark = line.take_mark().or(record.mark.take());
            record.by = line.by.map(Into::into).or(record.by.take());
            record.replay_until = line.replay_until.or(record.replay_until);
            record.offset = offset;
        } else if line.acked {
            if let Some(record) = self.records.get_mut(&key) {
                record.acked = true;
            }
        }
    }

    pub fn get(&self, key: &Key) -> Option<&Record> {
        self.records.get(key)
    }

    /// Until when a request for `key` is refused as the replay of a forgotten command, if it is.
    pub fn replay_refused_until(&self, key: &Key, now: u64) -> Option<u64> {
        self.tombstones.get(key).copied().filter(|&until| until > now)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_full(&self) -> bool {
        self.records.len() >= MAX_OPEN_COMMANDS
    }

    /// Records a command's new state (written at the next `flush`); `mark` and `origin`, once
    /// given, stay with the command.
    pub fn set_state(
        &mut self,
        key: &Key,
        state: CommandState,
        mark: Option<String>,
        origin: Option<Origin>,
    ) {
        let Some(phase) = phase_of(&state) else { return };
        let mut line = Line::state(key, state, mark, origin, false);
        let start = self.pending.len();
        self.queue(&line);
        self.pending_states.push((key.clone(), start));
        let record = self.records.entry(key.clone()).or_insert_with(|| Record::new(phase));
        record.phase = phase;
        record.acked = false;
        record.cleared = false;
        record.mark = line.take_mark().or(record.mark.take());
        record.by = line.by.take().map(Into::into).or(record.by.take());
        record.replay_until = line.replay_until.or(record.replay_until);
        record.state = line.state.as_ref().map(|state| state.to_payload().into_boxed_slice());
    }

    /// The broker has the command's final state: it need not be sent again.
    pub fn mark_acked(&mut self, key: &Key) {
        let Some(record) = self.records.get_mut(key) else { return };
        if !record.phase.is_final() || record.acked {
            return;
        }
        record.acked = true;
        self.acked_since_retiring += 1;
        let line = Line::flag(key, true, false);
        self.queue(&line);
        if record_done(self.records.get(key)) {
            self.forget(key);
        }
    }

    /// The operator cleared the command's topic.
    pub fn mark_cleared(&mut self, key: &Key) {
        let Some(record) = self.records.get_mut(key) else { return };
        if !record.phase.is_final() {
            return; // still running: its final state will be retained again
        }
        record.cleared = true;
        if record_done(Some(record)) {
            self.forget(key);
        }
    }

    /// Forgets the oldest finished commands that no one cleared beyond the newest
    /// `HISTORY_KEPT` (oldest: their final state written first); returns them, for their topics
    /// to be cleared. A retired command is as safe from running again as a cleared one: its
    /// request is gone from the broker, and a copy replayed later than `trust.max_age_s` is
    /// refused.
    pub fn retire_oldest(&mut self) -> Vec<Key> {
        if self.acked_since_retiring < HISTORY_SLACK || self.records.len() <= HISTORY_KEPT {
            return Vec::new();
        }
        self.acked_since_retiring = 0;
        let mut history: Vec<(u64, &Key)> = self
            .records
            .iter()
            .filter(|(_, r)| r.phase.is_final() && r.acked && !r.cleared)
            .map(|(key, r)| (r.offset.unwrap_or(u64::MAX), key))
            .collect();
        if history.len() <= HISTORY_KEPT {
            return Vec::new();
        }
        history.sort_unstable_by_key(|(offset, _)| *offset);
        let excess = history.len() - HISTORY_KEPT;
        let retired: Vec<Key> = history.into_iter().take(excess).map(|(_, key)| key.clone()).collect();
        for key in &retired {
            self.forget(key);
        }
        retired
    }

    fn forget(&mut self, key: &Key) {
        let until = self.records.remove(key).and_then(|record| record.replay_until);
        let line = match until.filter(|&until| until > crate::agent::unix_seconds()) {
            Some(until) => {
                self.bury(key.clone(), until);
                Line::tombstone(key, until)
            }
            None => Line::flag(key, false, true),
        };
        self.queue(&line);
        if self.records.capacity() > 64 && self.records.len() < self.records.capacity() / 4 {
            self.records.shrink_to_fit();
        }
    }

    /// Keeps a tombstone for `key`. Past `MAX_TOMBSTONES`, the expired go, then (if that is not
    /// enough) the tenth expiring first: one look through them per many forgotten commands,
    /// not one per command.
    fn bury(&mut self, key: Key, until: u64) {
        self.tombstones.insert(key, until);
        if self.tombstones.len() <= MAX_TOMBSTONES {
            return;
        }
        let now = crate::agent::unix_seconds();
        self.tombstones.retain(|_, until| *until > now);
        if self.tombstones.len() <= MAX_TOMBSTONES {
            return;
        }
        let excess = self.tombstones.len() - MAX_TOMBSTONES * 9 / 10;
        let mut untils: Vec<u64> = self.tombstones.values().copied().collect();
        let (_, &mut last_dropped, _) = untils.select_nth_unstable(excess - 1);
        self.tombstones.retain(|_, until| *until > last_dropped);
        log::warn!(
            "more than {MAX_TOMBSTONES} commands forgotten within trust.max_age_s: a replay of those whose \
             requests were signed first (up to {last_dropped}) is no longer refused by its id, only by its age"
        );
    }

    /// The full state of a record, from memory or from its journal line.
    pub fn state(&self, key: &Key) -> Option<CommandState> {
        let record = self.records.get(key)?;
        if let Some(json) = &record.state {
            return serde_json::from_slice(json).ok();
        }
        let line = self.read_line(record.offset?).ok()?;
        serde_json::from_slice::<Line>(&line).ok()?.state
    }

    /// Commands whose state the broker may not have: executing ones, and final states not
    /// acknowledged, oldest first.
    pub fn unacknowledged(&self) -> Vec<(Key, Phase)> {
        let mut out: Vec<(&Key, &Record)> = self.records.iter().filter(|(_, r)| !r.acked).collect();
        out.sort_by_key(|(_, r)| r.offset.unwrap_or(u64::MAX));
        out.into_iter().map(|(k, r)| (k.clone(), r.phase)).collect()
    }

    /// Writes the changes since the last flush durably: one append and one fsync.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.rewrite || self.lines > 2 * (self.records.len() + self.tombstones.len()) + 1000 {
            return self.rewrite_from_memory();
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.append();
        if result.is_err() && self.pending.len() > MAX_PENDING_BYTES {
            self.clear_pending();
            self.rewrite = true;
        }
        result
    }

    fn append(&mut self) -> io::Result<()> {
        if self.file.is_some() && std::fs::symlink_metadata(&self.path).is_err() {
            // The journal was deleted under us: appending would go to a file nobody can open.
            log::warn!("command ledger {} is gone: writing it again", self.path.display());
            return self.rewrite_from_memory();
        }
        if self.file.is_none() {
            match fsutil::open_append(&self.path) {
                Ok(file) => self.file = Some(file),
                // A link planted in its place: write a journal of our own over it.
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return self.rewrite_from_memory(),
                Err(e) => return Err(e),
            }
        }
        let file = self.file.as_mut().expect("opened above");
        if let Err(e) = file.write_all(&self.pending).and_then(|_| file.sync_data()) {
            // Cut off whatever part got written, so the next append starts on a line boundary.
            let _ = file.set_len(self.file_len);
            return Err(e);
        }
        for (key, start) in self.pending_states.drain(..) {
            if let Some(record) = self.records.get_mut(&key) {
                record.offset = Some(self.file_len + start as u64);
                record.state = None;
            }
        }
        self.file_len += self.pending.len() as u64;
        self.lines += self.pending.iter().filter(|&&b| b == b'\n').count();
        self.clear_pending();
        Ok(())
    }

    /// Replaces the journal with one line per live record, oldest first.
    fn rewrite_from_memory(&mut self) -> io::Result<()> {
        let mut keys: Vec<&Key> = self.records.keys().collect();
        keys.sort_by_key(|k| self.records[*k].offset.unwrap_or(u64::MAX));
        let mut bytes = Vec::new();
        let mut placed = Vec::with_capacity(keys.len());
        for key in keys {
            let record = &self.records[key];
            // Refuse to write a journal that would forget a command.
            let state =
                self.state(key).ok_or_else(|| io::Error::other("cannot read back a recorded state"))?;
            let mark = record.mark.as_deref().map(str::to_string);
            let origin = record
                .by
                .as_deref()
                .map(|by| Origin { by: by.to_string(), replay_until: record.replay_until });
            let line = Line::state(key, state, mark, origin, record.acked);
            placed.push((key.clone(), bytes.len() as u64));
            write_line(&mut bytes, &line);
        }
        let now = crate::agent::unix_seconds();
        self.tombstones.retain(|_, until| *until > now);
        for (key, until) in &self.tombstones {
            write_line(&mut bytes, &Line::tombstone(key, *until));
        }
        fsutil::write_atomic(&self.path, &bytes)?;
        self.file = None;
        self.file_len = bytes.len() as u64;
        self.lines = placed.len() + self.tombstones.len();
        for (key, offset) in placed {
            if let Some(record) = self.records.get_mut(&key) {
                record.offset = Some(offset);
                record.state = None;
            }
        }
        self.clear_pending();
        self.rewrite = false;
        log::debug!("command ledger rewritten: {} command(s)", self.lines);
        Ok(())
    }

    fn clear_pending(&mut self) {
        self.pending.clear();
        self.pending_states.clear();
        self.pending.release_if_empty();
        self.pending_states.release_if_empty();
    }

    fn queue(&mut self, line: &Line) {
        write_line(&mut self.pending, line);
    }

    fn read_line(&self, offset: u64) -> io::Result<Vec<u8>> {
        let file = match &self.file {
            Some(file) => file.try_clone()?,
            // Never through a link planted in the journal's place: states are read back from it.
            None => File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(&self.path)?,
        };
        let mut line = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = file.read_at(&mut chunk, offset + line.len() as u64)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if let Some(end) = chunk[..n].iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&chunk[..end]);
                return Ok(line);
            }
            line.extend_from_slice(&chunk[..n]);
        }
    }
}

fn record_done(record: Option<&Record>) -> bool {
    record.is_some_and(|r| r.phase.is_final() && r.acked && r.cleared)
}

fn phase_of(state: &CommandState) -> Option<Phase> {
    match state {
        CommandState::Init { .. } => None,
        CommandState::Executing => Some(Phase::Executing),
        CommandState::Successful { .. } => Some(Phase::Successful),
        CommandState::Failed { .. } => Some(Phase::Failed),
    }
}

fn write_line(out: &mut Vec<u8>, line: &Line) {
    // A Line always encodes: its keys are strings and its values plain JSON.
    if serde_json::to_writer(&mut *out, line).is_ok() {
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(result: serde_json::Value) -> CommandState {
        CommandState::Successful { result }
    }

    #[test]
    fn the_oldest_finished_commands_no_one_cleared_are_retired_beyond_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path());
        let key = |i: usize| Key::new(Op::Ping, &format!("c{i:05}"));
        let running = Key::new(Op::Reboot, "running");
        ledger.set_state(&running, CommandState::Executing, None, None);
        let total = HISTORY_KEPT + HISTORY_SLACK + 7;
        for i in 0..total {
            ledger.set_state(&key(i), ok(json!(i)), None, None);
            ledger.flush().unwrap();
            ledger.mark_acked(&key(i));
        }
        ledger.set_state(&key(total), ok(json!(total)), None, None); // not acknowledged yet
        let retired = ledger.retire_oldest();
        assert_eq!(retired, (0..total - HISTORY_KEPT).map(key).collect::<Vec<_>>(), "the oldest first");
        assert!(ledger.get(&key(total - HISTORY_KEPT - 1)).is_none());
        assert!(ledger.get(&key(total - HISTORY_KEPT)).is_some(), "the newest {HISTORY_KEPT} stay");
        assert!(ledger.get(&running).is_some() && ledger.get(&key(total)).is_some(), "open ones stay");
        assert!(ledger.retire_oldest().is_empty(), "nothing more until more finish");
        ledger.flush().unwrap();
        let reopened = Ledger::open(dir.path());
        assert_eq!(reopened.len(), HISTORY_KEPT + 2, "retired for good");
    }

    #[test]
    fn survives_reopen_and_forgets_only_acked_and_cleared_commands() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (Key::new(Op::Ping, "a"), Key::new(Op::Reboot, "b"), Key::new(Op::Ping, "c"));
        let mut ledger = Ledger::open(dir.path());
        ledger.set_state(&a, CommandState::Executing, None, None);
        ledger.set_state(&a, ok(json!({"n": 1})), None, None);
        ledger.set_state(&b, CommandState::Executing, Some("boot-1".into()), None);
        ledger.set_state(&c, ok(json!(2)), None, None);
        ledger.flush().unwrap();
        ledger.mark_cleared(&a); // cleared before the broker acknowledged: kept
        ledger.mark_acked(&a);
        ledger.mark_acked(&c);
        ledger.mark_cleared(&b); // still executing: kept
        ledger.flush().unwrap();
        assert!(ledger.get(&a).is_none(), "acked and cleared: forgotten");

        let reopened = Ledger::open(dir.path());
        assert!(reopened.get(&a).is_none());
        let b_rec = reopened.get(&b).unwrap();
        assert_eq!((b_rec.phase, b_rec.mark.as_deref()), (Phase::Executing, Some("boot-1")));
        let c_rec = reopened.get(&c).unwrap();
        assert!(c_rec.acked && c_rec.state.is_none(), "an acked state is read from the journal");
        assert_eq!(reopened.state(&c), Some(ok(json!(2))));
        assert_eq!(reopened.unacknowledged(), vec![(b, Phase::Executing)]);
    }

    #[test]
    fn a_forgotten_signed_command_stays_refused_until_its_request_is_too_old() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::agent::unix_seconds();
        let signed = |until| Some(Origin { by: "ops SHA256:x".into(), replay_until: Some(until) });
        let (fresh, stale, unsigned) =
            (Key::new(Op::Config, "f"), Key::new(Op::Config, "s"), Key::new(Op::Ping, "u"));
        let mut ledger = Ledger::open(dir.path());
        ledger.set_state(&fresh, ok(json!(1)), None, signed(now + 1000));
        ledger.set_state(&stale, ok(json!(2)), None, signed(now - 1));
        let by = Some(Origin { by: "unsigned".into(), replay_until: None });
        ledger.set_state(&unsigned, ok(json!(3)), None, by);
        for key in [&fresh, &stale, &unsigned] {
            ledger.mark_acked(key);
            ledger.mark_cleared(key);
        }
        ledger.flush().unwrap();
        assert_eq!(ledger.replay_refused_until(&fresh, now), Some(now + 1000));
        assert_eq!(ledger.replay_refused_until(&fresh, now + 1000), None, "too old by then");
        assert_eq!(ledger.replay_refused_until(&stale, now), None);
        assert_eq!(ledger.replay_refused_until(&unsigned, now), None);

        let mut reopened = Ledger::open(dir.path());
        assert_eq!(reopened.replay_refused_until(&fresh, now), Some(now + 1000), "kept on disk");
        reopened.rewrite_from_memory().unwrap();
        let rewritten = Ledger::open(dir.path());
        assert_eq!(rewritten.replay_refused_until(&fresh, now), Some(now + 1000), "kept by a rewrite");
        assert!(rewritten.get(&fresh).is_none());
    }

    #[test]
    fn past_the_bound_the_tombstones_expiring_first_go_a_tenth_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::agent::unix_seconds();
        // An hour ahead: under an emulated ARMv5 the 10,000 burials take seconds, and none of
        // these may expire on the way.
        let later = now + 3600;
        let mut ledger = Ledger::open(dir.path());
        ledger.bury(Key::new(Op::Ping, "expired"), now - 1);
        for i in 0..MAX_TOMBSTONES as u64 {
            ledger.bury(Key::new(Op::Ping, &i.to_string()), later + i);
        }
        assert_eq!(ledger.tombstones.len(), MAX_TOMBSTONES, "the expired one went first");
        ledger.bury(Key::new(Op::Ping, "last"), later + MAX_TOMBSTONES as u64);
        assert_eq!(ledger.tombstones.len(), MAX_TOMBSTONES * 9 / 10, "then those expiring first");
        let kept = |i: usize| ledger.replay_refused_until(&Key::new(Op::Ping, &i.to_string()), now).is_some();
        let first_kept = MAX_TOMBSTONES / 10 + 1;
        assert!(!kept(first_kept - 1) && kept(first_kept) && kept(MAX_TOMBSTONES - 1));
    }

    /// A burst's states do not stay in memory until the broker has them: once written, the
    /// journal line stands in for an unacknowledged state too, and a failed write keeps it.
    #[test]
    fn states_leave_memory_once_written() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Key::new(Op::Ping, "a"), Key::new(Op::Reboot, "b"));
        let mut ledger = Ledger::open(dir.path());
        ledger.set_state(&a, ok(json!({"n": 1})), None, None);
        assert!(ledger.get(&a).unwrap().state.is_some(), "not written yet: kept");
        assert_eq!(ledger.state(&a), Some(ok(json!({"n": 1}))));
        ledger.flush().unwrap();
        assert!(ledger.get(&a).unwrap().state.is_none() && !ledger.get(&a).unwrap().acked);
        assert_eq!(ledger.state(&a), Some(ok(json!({"n": 1}))), "read back from the journal");

        std::fs::remove_file(dir.path().join(JOURNAL_FILE)).unwrap();
        ledger.set_state(&b, CommandState::Executing, Some("boot-1".into()), None);
        ledger.flush().unwrap(); // rewritten from memory and the deleted file, still open
        assert_eq!(ledger.state(&a), Some(ok(json!({"n": 1}))));
        assert_eq!(ledger.state(&b), Some(CommandState::Executing));
        let reopened = Ledger::open(dir.path());
        assert_eq!(reopened.unacknowledged(), vec![(a, Phase::Successful), (b, Phase::Executing)]);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_later_appends_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let a = Key::new(Op::Ping, "a");
        let mut ledger = Ledger::open(dir.path());
        ledger.set_state(&a, ok(json!(1)), None, None);
        ledger.flush().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut torn = std::fs::read(&path).unwrap();
        torn.extend_from_slice(b"{\"op\":\"ping\",\"id\":\"b\",\"sta");
        std::fs::write(&path, torn).unwrap();

        let mut ledger = Ledger::open(dir.path());
        assert_eq!(ledger.len(), 1);
        ledger.set_state(&Key::new(Op::Ping, "c"), ok(json!(3)), None, None);
        ledger.flush().unwrap();
        let reopened = Ledger::open(dir.path());
        assert_eq!(reopened.len(), 2);
        assert_eq!(reopened.state(&Key::new(Op::Ping, "c")), Some(ok(json!(3))));
    }

    #[test]
    fn the_journal_is_compacted_when_mostly_dead() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path());
        let keep = Key::new(Op::Config, "keep");
        ledger.set_state(&keep, ok(json!({"kept": true})), None, None);
        ledger.mark_acked(&keep);
        for i in 0..2000 {
            let k = Key::new(Op::Ping, &format!("id-{i}"));
            ledger.set_state(&k, ok(json!(i)), None, None);
            ledger.mark_acked(&k);
            ledger.mark_cleared(&k);
            ledger.flush().unwrap();
        }
        assert!(ledger.lines < 1100, "{} lines", ledger.lines);
        assert_eq!(ledger.len(), 1);
        assert_eq!(ledger.state(&keep), Some(ok(json!({"kept": true}))));
        let reopened = Ledger::open(dir.path());
        assert_eq!(reopened.state(&keep), Some(ok(json!({"kept": true}))));
    }

    #[test]
    fn imports_the_old_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let old = json!([{"op": "reboot", "id": "r1", "state": {"status": "executing"}, "boot_id": "b0"},
                         {"op": "ping", "id": "p1", "state": {"status": "successful", "result": 1}}]);
        std::fs::write(dir.path().join(OLD_LEDGER_FILE), old.to_string()).unwrap();
        let ledger = Ledger::open(dir.path());
        assert_eq!(ledger.len(), 2);
        assert_eq!(ledger.get(&Key::new(Op::Reboot, "r1")).unwrap().mark.as_deref(), Some("b0"));
        assert!(!dir.path().join(OLD_LEDGER_FILE).exists());
        assert_eq!(Ledger::open(dir.path()).len(), 2);
    }
}
