//! The periodic heartbeat: collected on a worker thread (custom scripts may take seconds),
//! numbered with a sequence that survives restarts, and queued in the outbox so one made
//! while offline is delivered later.
//!
//! The sequence is not written for every heartbeat (flash wears): the file holds a bound that
//! no seq made so far exceeds, raised `SEQ_BLOCK` at a time, and the exact last seq on a clean
//! stop. After a crash or power cut the seq jumps ahead to the bound, so it never repeats.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::outbox::Outbox;
use crate::config::HeartbeatConfig;
use crate::fsutil;
use crate::metrics::Collector;
use crate::protocol;
use crate::worker::Workers;

const SEQ_FILE: &str = "heartbeat-seq";
/// Seqs reserved per write of the seq file: one write every ~40 min at the default interval.
const SEQ_BLOCK: u64 = 100;

pub struct Heartbeat {
    topic: String,
    interval: Duration,
    next_due: Instant,
    /// None while a collection runs on a worker (it owns the collector then).
    collector: Option<Collector>,
    /// A new config's collector settings, applied when the running collection returns.
    pending_config: Option<HeartbeatConfig>,
    workers: Workers<(Collector, protocol::Heartbeat)>,
    /// The seq of the latest collection started.
    last_seq: u64,
    /// The seq of the latest heartbeat queued.
    queued_seq: u64,
    /// What the seq file says: no seq up to it may be used again.
    reserved_seq: u64,
    seq_path: PathBuf,
}

impl Heartbeat {
    pub fn new(
        config: &HeartbeatConfig,
        topic: String,
        state_dir: &std::path::Path,
        waker: Arc<mio::Waker>,
    ) -> Heartbeat {
        let seq_path = state_dir.join(SEQ_FILE);
        let last_seq = fsutil::read_optional(&seq_path)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
            .unwrap_or(0);
        Heartbeat {
            topic,
            interval: Duration::from_secs(config.interval_s),
            next_due: Instant::now(),
            collector: Some(Collector::new(config)),
            pending_config: None,
            workers: Workers::new(waker),
            last_seq,
            queued_seq: last_seq,
            reserved_seq: last_seq,
            seq_path,
        }
    }

    pub fn reconfigure(&mut self, config: &HeartbeatConfig) {
        let interval = Duration::from_secs(config.interval_s);
        if interval != self.interval {
            log::info!("heartbeat interval now {} s", config.interval_s);
            self.next_due = Instant::now() + interval;
            self.interval = interval;
        }
        match &mut self.collector {
            Some(collector) => *collector = Collector::new(config),
            None => self.pending_config = Some(config.clone()),
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.collector.as_ref().map(|_| self.next_due)
    }

    pub fn on_timer(&mut self, now: Instant, outbox: &Outbox) {
        if now >= self.next_due && self.collector.is_some() {
            self.start(outbox.dropped());
        }
    }

    /// Starts a heartbeat now (the `heartbeat` command); returns the seq it will carry, or
    /// the running collection's when one is under way.
    pub fn trigger(&mut self, outbox: &Outbox) -> u64 {
        if self.collector.is_some() {
            self.start(outbox.dropped());
        }
        self.last_seq
    }

    fn start(&mut self, dropped: u64) {
        let Some(mut collector) = self.collector.take() else { return };
        self.last_seq += 1;
        let seq = self.last_seq;
        if seq > self.reserved_seq {
            self.save_seq(seq + SEQ_BLOCK - 1);
        }
        self.workers.spawn("heartbeat", move || {
            let heartbeat = collector.collect(seq, dropped);
            (collector, heartbeat)
        });
        // Keep the cadence, but never try to catch up on missed beats in a burst.
        let now = Instant::now();
        self.next_due = (self.next_due + self.interval).max(now + self.interval / 2);
    }

    /// Queues finished heartbeats for delivery; returns their seqs.
    pub fn on_wake(&mut self, outbox: &mut Outbox) -> Vec<u64> {
        let mut queued = Vec::new();
        while let Some((collector, heartbeat)) = self.workers.try_recv() {
            self.collector = Some(match self.pending_config.take() {
                Some(config) => Collector::new(&config),
                None => collector,
            });
            match serde_json::to_vec(&heartbeat) {
                Ok(payload) => {
                    log::debug!("heartbeat {} collected ({} bytes)", heartbeat.seq, payload.len());
                    outbox.push(self.topic.clone(), payload, true);
                    self.queued_seq = heartbeat.seq;
                }
                Err(e) => log::error!("cannot encode heartbeat: {e}"),
            }
            queued.push(heartbeat.seq);
        }
        queued
    }

    /// A clean stop: the next run goes on from the last heartbeat queued, so neither a stop
    /// nor a collection it cut short leaves a gap.
    pub fn on_stop(&mut self) {
        self.save_seq(self.queued_seq);
    }

    fn save_seq(&mut self, seq: u64) {
        match fsutil::write_atomic(&self.seq_path, seq.to_string().as_bytes()) {
            Ok(()) => self.reserved_seq = seq,
            Err(e) => log::warn!("cannot save heartbeat seq: {e}"),
        }
    }
}
