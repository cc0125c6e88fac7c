//! Messages that must reach the broker (heartbeats, command statuses) wait here until the
//! broker acknowledges them. A message that cannot go out at once (the link is down), or that
//! the broker has not acknowledged within `STORE_AFTER`, is stored as one small file in
//! `STATE/outbox/`, so a power cut or restart loses nothing; a clean stop stores the rest. A
//! connected device whose broker answers does not write to flash at all: at one heartbeat
//! every 25 s, writing each one would cost thousands of fsyncs a day on cheap SD cards and eMMC.
//! No write ever rewrites the whole queue.
//!
//! Messages are of three kinds (`Kind`). Heartbeats are the ones stored on disk. Command states
//! are never dropped and never stored here: the command ledger keeps them and queues them
//! again after a restart, and bounds how many there can be. Answers to refused requests are
//! regenerable: the request stays retained on the broker and is answered again on the next
//! connection; they have a bound of their own. When the queue is past its bound, the oldest
//! heartbeats are dropped and counted. Heartbeats go out before command states, so a burst of
//! commands never holds a heartbeat back.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::OfflineBufferConfig;
use crate::fsutil;
use crate::net::client::Client;

/// QoS 1 publishes in flight at once while draining the queue.
const WINDOW: usize = 16;
const DROPPED_FILE: &str = "dropped";
/// A message not acknowledged this long after it was queued is stored on disk.
const STORE_AFTER: Duration = Duration::from_secs(5);
const MAX_REFUSALS: usize = 16;

struct Entry {
    id: u64,
    kind: Kind,
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    sent: bool,
    kept: Kept,
    queued_at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Stored on disk while unacknowledged; dropped, oldest first, past the bound.
    Heartbeat,
    /// A recorded command's state: never dropped, never stored here (the ledger has it). A
    /// newer state replaces an unsent older one on the same topic.
    CommandState,
    /// The answer to a request refused without recording it: at most `MAX_REFUSALS` wait at
    /// once (their topics can be 64 KiB each); past that a new one is not queued, and the
    /// requests are read again once the queue has drained.
    Refusal,
}

impl Kind {
    fn stored(self) -> bool {
        self == Kind::Heartbeat
    }
    fn replaces_unsent(self) -> bool {
        self != Kind::Heartbeat
    }
    /// Given up, oldest first, past the queue's bounds. Refusals have their own bound.
    fn droppable(self) -> bool {
        self == Kind::Heartbeat
    }
}

/// Where a message is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// Only in memory, for now.
    Memory,
    /// In a file in the outbox directory too.
    Disk,
    /// Only in memory, for good: a kind that is not stored, or storing it failed (full or
    /// read-only disk) and is not tried again.
    MemoryOnly,
}

impl Entry {
    fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
}

pub struct Outbox {
    dir: PathBuf,
    entries: VecDeque<Entry>,
    bytes: usize,
    limits: OfflineBufferConfig,
    next_id: u64,
    dropped: u64,
    /// The broker connection is up: new messages go out at once and are stored only if the
    /// broker does not acknowledge them in time.
    online: bool,
    /// Refusals were dropped for room: their requests must be read again once there is room.
    refusals_dropped: bool,
}

impl Outbox {
    /// Opens the queue in `dir`, recovering what a previous run left.
    pub fn open(dir: &Path, limits: OfflineBufferConfig) -> io::Result<Outbox> {
        fsutil::create_private_dir(dir)?;
        let mut outbox = Outbox {
            dir: dir.to_path_buf(),
            entries: VecDeque::new(),
            bytes: 0,
            limits,
            next_id: 1,
            dropped: 0,
            online: false,
            refusals_dropped: false,
        };
        outbox.dropped = fsutil::read_optional(&dir.join(DROPPED_FILE))?
            .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
            .unwrap_or(0);
        outbox.recover()?;
        Ok(outbox)
    }

    fn recover(&mut self) -> io::Result<()> {
        let mut ids: Vec<u64> =
            fs::read_dir(&self.dir)?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
        ids.sort_unstable();
        for id in ids {
            let path = self.path(id);
            match fs::read(&path).ok().and_then(|bytes| decode(id, bytes)) {
                Some(entry) => {
                    self.bytes += entry.size();
                    self.entries.push_back(entry);
                }
                None => {
                    log::warn!("outbox: discarding unreadable {}", path.display());
                    let _ = fs::remove_file(&path);
                }
            }
            self.next_id = id + 1;
        }
        if !self.entries.is_empty() {
            log::info!("outbox: {} message(s) from before the restart will be sent", self.entries.len());
        }
        self.enforce_bounds();
        Ok(())
    }

    pub fn set_limits(&mut self, limits: OfflineBufferConfig) {
        self.limits = limits;
        self.enforce_bounds();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Messages dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Queues a message; it is sent by `pump` in order (heartbeats first), and a heartbeat is
    /// stored on disk unless the broker takes it at once. False for a refusal given up for want
    /// of room (its request is read again once the queue has drained).
    pub fn push(&mut self, kind: Kind, topic: String, payload: Vec<u8>, retain: bool) -> bool {
        if kind.replaces_unsent() {
            self.remove_unsent(&topic);
        }
        let refusals = self.entries.iter().filter(|e| e.kind == Kind::Refusal).count();
        if kind == Kind::Refusal && refusals >= MAX_REFUSALS {
            self.refusals_dropped = true;
            return false;
        }
        let mut entry = Entry {
            id: self.next_id,
            kind,
            topic,
            payload,
            retain,
            sent: false,
            kept: Kept::Memory,
            queued_at: Instant::now(),
        };
        self.next_id += 1;
        if !kind.stored() {
            entry.kept = Kept::MemoryOnly;
        } else if !self.online {
            store(&self.dir, &mut entry);
        }
        self.bytes += entry.size();
        self.entries.push_back(entry);
        self.enforce_bounds();
        true
    }

    /// When the oldest message kept only in memory is due to be stored.
    pub fn next_deadline(&self) -> Option<Instant> {
        // Entries are queued in order, so the first one in memory is the oldest.
        self.entries.iter().find(|e| e.kept == Kept::Memory).map(|e| e.queued_at + STORE_AFTER)
    }

    /// Stores the messages the broker has not acknowledged in time.
    pub fn on_timer(&mut self, now: Instant) {
        for entry in
            self.entries.iter_mut().filter(|e| e.kept == Kept::Memory && e.queued_at + STORE_AFTER <= now)
        {
            log::debug!("outbox: message {} not acknowledged within {STORE_AFTER:?}: storing it", entry.id);
            store(&self.dir, entry);
        }
    }

    /// Stores every message kept only in memory: the agent is stopping, or the link is down.
    pub fn store_all(&mut self) {
        self.entries.iter_mut().filter(|e| e.kept == Kept::Memory).for_each(|e| store(&self.dir, e));
    }

    /// Sends what is not in flight yet, heartbeats first, then the rest oldest first, keeping
    /// a bounded window in flight.
    pub fn pump(&mut self, client: &mut Client) {
        let heartbeats_first = [true, false];
        for heartbeats in heartbeats_first {
            for entry in
                self.entries.iter_mut().filter(|e| !e.sent && (e.kind == Kind::Heartbeat) == heartbeats)
            {
                if !client.can_publish() || client.inflight() >= WINDOW {
                    return;
                }
                entry.sent = client.publish(&entry.topic, &entry.payload, entry.retain, Some(entry.id));
                if !entry.sent {
                    return;
                }
            }
        }
    }

    /// The broker has it: forget it. Returns its kind and topic.
    pub fn on_ack(&mut self, id: u64) -> Option<(Kind, String)> {
        let pos = self.entries.iter().position(|e| e.id == id)?;
        let entry = self.entries.remove(pos)?;
        self.bytes -= entry.size();
        self.forget(&entry);
        // A burst grew the queue: give the memory back once it has drained.
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to_fit();
        }
        Some((entry.kind, entry.topic))
    }

    /// True once after refusals were dropped for room and the queue has drained: time to have
    /// the broker send the requests again (they are retained), to answer them now.
    pub fn take_refusals_to_redo(&mut self) -> bool {
        // The flag first: this runs every loop turn, the scan only after refusals were dropped.
        if self.refusals_dropped && self.online && self.entries.iter().all(|e| e.kind != Kind::Refusal) {
            self.refusals_dropped = false;
            return true;
        }
        false
    }

    fn remove_unsent(&mut self, topic: &str) {
        if let Some(pos) = self.entries.iter().position(|e| !e.sent && e.topic == topic) {
            if let Some(entry) = self.entries.remove(pos) {
                self.bytes -= entry.size();
                self.forget(&entry);
            }
        }
    }

    pub fn on_connected(&mut self) {
        self.online = true;
    }

    /// The connection went away: whatever was in flight is stored, and sent again on the next one.
    pub fn on_disconnected(&mut self) {
        self.online = false;
        self.entries.iter_mut().for_each(|e| e.sent = false);
        self.store_all();
    }

    fn enforce_bounds(&mut self) {
        let before = self.dropped;
        while self.entries.len() > self.limits.max_messages
            || (self.bytes > self.limits.max_bytes && self.entries.len() > 1)
        {
            let Some(pos) = self.first_to_drop() else { break };
            let Some(entry) = self.entries.remove(pos) else { break };
            self.bytes -= entry.size();
            self.forget(&entry);
            self.dropped += 1;
        }
        if self.dropped != before {
            log::warn!(
                "outbox full: dropped {} oldest message(s), {} in all",
                self.dropped - before,
                self.dropped
            );
            let _ = fsutil::write_atomic(&self.dir.join(DROPPED_FILE), self.dropped.to_string().as_bytes());
        }
    }

    /// The oldest heartbeat; none when only command states and refusals are left.
    fn first_to_drop(&self) -> Option<usize> {
        self.entries.iter().position(|e| e.kind.droppable())
    }

    fn path(&self, id: u64) -> PathBuf {
        entry_path(&self.dir, id)
    }

    /// Removes a message's file, if it has one.
    fn forget(&self, entry: &Entry) {
        if entry.kept != Kept::Disk {
            return;
        }
        if let Err(e) = fs::remove_file(self.path(entry.id)) {
            log::warn!("outbox: cannot remove message {}: {e}", entry.id);
        }
    }
}

fn entry_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}"))
}

fn store(dir: &Path, entry: &mut Entry) {
    entry.kept = match fsutil::write_atomic(&entry_path(dir, entry.id), &encode(entry)) {
        Ok(()) => Kept::Disk,
        Err(e) => {
            // Still worth sending; it just would not survive a restart.
            log::error!("outbox: cannot store message {}: {e}", entry.id);
            Kept::MemoryOnly
        }
    };
}

/// `TOPIC \n RETAIN(0|1) \n PAYLOAD`: topics never contain a newline (we build them).
fn encode(entry: &Entry) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(entry.size() + 4);
    bytes.extend_from_slice(entry.topic.as_bytes());
    bytes.extend_from_slice(if entry.retain { b"\n1\n" } else { b"\n0\n" });
    bytes.extend_from_slice(&entry.payload);
    bytes
}

fn decode(id: u64, bytes: Vec<u8>) -> Option<Entry> {
    let topic_end = bytes.iter().position(|&b| b == b'\n')?;
    let topic = String::from_utf8(bytes[..topic_end].to_vec()).ok()?;
    let retain = match bytes.get(topic_end + 1..topic_end + 3)? {
        b"1\n" => true,
        b"0\n" => false,
        _ => return None,
    };
    let payload = bytes[topic_end + 3..].to_vec();
    // Only heartbeats are stored (older versions stored command states too: those are sent
    // like heartbeats, and the ledger sends them again anyway).
    Some(Entry {
        id,
        kind: Kind::Heartbeat,
        topic,
        payload,
        retain,
        sent: false,
        kept: Kept::Disk,
        queued_at: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tether-outbox-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn limits(max_messages: usize, max_bytes: usize) -> OfflineBufferConfig {
        OfflineBufferConfig { max_messages, max_bytes }
    }

    #[test]
    fn survives_reopen_in_order() {
        let dir = temp_dir("reopen");
        let mut outbox = Outbox::open(&dir, limits(10, 1 << 20)).unwrap();
        for i in 0..3 {
            outbox.push(Kind::Heartbeat, "t/x".into(), format!("{{\"seq\":{i}}}").into_bytes(), i == 1);
        }
        outbox.on_ack(1);
        let reopened = Outbox::open(&dir, limits(10, 1 << 20)).unwrap();
        let got: Vec<_> = reopened.entries.iter().map(|e| (e.id, e.retain, e.payload.clone())).collect();
        assert_eq!(got, vec![(2, true, b"{\"seq\":1}".to_vec()), (3, false, b"{\"seq\":2}".to_vec())]);
        assert_eq!(reopened.next_id, 4);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn drops_oldest_past_the_bounds_and_counts_them() {
        let dir = temp_dir("bounds");
        let mut outbox = Outbox::open(&dir, limits(3, 1 << 20)).unwrap();
        for i in 0..5 {
            outbox.push(Kind::Heartbeat, "t".into(), vec![b'0' + i], false);
        }
        assert_eq!(outbox.len(), 3);
        assert_eq!(outbox.dropped(), 2);
        assert_eq!(outbox.entries.front().unwrap().payload, b"2");
        outbox.set_limits(limits(100, 5));
        assert_eq!(outbox.len(), 2, "byte bound: each entry is 2 bytes");
        let reopened = Outbox::open(&dir, limits(100, 1 << 20)).unwrap();
        assert_eq!((reopened.len(), reopened.dropped()), (2, 3));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn files(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
            .count()
    }

    #[test]
    fn online_messages_acknowledged_in_time_never_touch_the_disk() {
        let dir = temp_dir("online");
        let mut outbox = Outbox::open(&dir, limits(10, 1 << 20)).unwrap();
        outbox.on_connected();
        outbox.push(Kind::Heartbeat, "t".into(), b"a".to_vec(), true);
        outbox.push(Kind::Heartbeat, "t".into(), b"b".to_vec(), true);
        assert_eq!(files(&dir), 0);
        let due = outbox.next_deadline().expect("a store deadline");
        outbox.on_timer(due - Duration::from_millis(1));
        assert_eq!(files(&dir), 0, "stored before the delay");
        outbox.on_ack(1);
        outbox.on_ack(2);
        assert!(outbox.is_empty() && outbox.next_deadline().is_none());
        outbox.store_all();
        assert_eq!(files(&dir), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unacknowledged_messages_are_stored_late_on_disconnect_and_on_stop() {
        let dir = temp_dir("late");
        let mut outbox = Outbox::open(&dir, limits(10, 1 << 20)).unwrap();
        outbox.on_connected();
        outbox.push(Kind::Heartbeat, "t".into(), b"late".to_vec(), true);
        outbox.on_timer(outbox.next_deadline().unwrap());
        assert_eq!(files(&dir), 1, "not acknowledged in time: stored");
        assert_eq!(outbox.next_deadline(), None, "nothing left to store");
        outbox.push(Kind::Heartbeat, "t".into(), b"cut".to_vec(), false);
        outbox.on_disconnected();
        assert_eq!(files(&dir), 2, "the link went down: stored");
        outbox.push(Kind::Heartbeat, "t".into(), b"offline".to_vec(), false);
        assert_eq!(files(&dir), 3, "queued while offline: stored at once");
        outbox.on_connected();
        outbox.push(Kind::Heartbeat, "t".into(), b"stop".to_vec(), false);
        outbox.store_all();
        outbox.on_ack(1);
        let reopened = Outbox::open(&dir, limits(10, 1 << 20)).unwrap();
        let got: Vec<_> = reopened.entries.iter().map(|e| e.payload.clone()).collect();
        assert_eq!(got, [b"cut".to_vec(), b"offline".to_vec(), b"stop".to_vec()]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn command_states_are_never_dropped_nor_stored_and_replace_their_unsent_state() {
        let dir = temp_dir("kinds");
        let mut outbox = Outbox::open(&dir, limits(3, 1 << 20)).unwrap();
        outbox.push(Kind::CommandState, "c/1".into(), b"executing".to_vec(), true);
        outbox.push(Kind::Heartbeat, "hb".into(), b"1".to_vec(), true);
        outbox.push(Kind::Refusal, "c/bad".into(), b"failed".to_vec(), true);
        outbox.push(Kind::CommandState, "c/1".into(), b"successful".to_vec(), true);
        assert_eq!(outbox.len(), 3, "the final state replaced the unsent executing one");
        for i in 2..6 {
            outbox.push(Kind::CommandState, format!("c/{i}"), b"successful".to_vec(), true);
        }
        let kept: Vec<_> = outbox.entries.iter().map(|e| (e.kind, e.topic.as_str())).collect();
        assert_eq!(kept.len(), 6, "over the bound with command states and a refusal: {kept:?}");
        assert!(kept.iter().all(|(k, _)| *k != Kind::Heartbeat), "{kept:?}");
        assert_eq!(outbox.dropped(), 1, "the heartbeat");
        assert_eq!(files(&dir), 1, "only the dropped-count file: command states are not stored");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_are_discarded() {
        let dir = temp_dir("corrupt");
        fsutil::create_private_dir(&dir).unwrap();
        fs::write(dir.join(format!("{:020}", 7)), b"no newline").unwrap();
        let outbox = Outbox::open(&dir, limits(10, 1 << 20)).unwrap();
        assert!(outbox.is_empty());
        assert_eq!(outbox.next_id, 8);
        fs::remove_dir_all(&dir).unwrap();
    }
}
