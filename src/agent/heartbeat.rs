//! The periodic heartbeat: collected on a worker thread (custom scripts may take seconds),
//! numbered with a sequence that survives restarts, and queued in the outbox so one made
//! while offline is delivered later.
//!
//! The sequence is not written for every heartbeat (flash wears): the file holds a bound that
//! no seq made so far exceeds, raised `SEQ_BLOCK` at a time, and the exact last seq on a clean
//! stop. After a crash or power cut the seq jumps ahead to the bound, so it never repeats.
//! The file is overwritten in place at a fixed size, so a full disk cannot stop it being saved;
//! a seq is never used past what the file says unless the file said so first.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::outbox::{Kind, Outbox};
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
    /// The settings the collector was made from, to make a new one if a collection is lost.
    config: HeartbeatConfig,
    interval: Duration,
    next_due: Instant,
    /// None while a collection runs on a worker (it owns the collector then).
    collector: Option<Collector>,
    /// The config changed while a collection ran: its collector is remade when it returns.
    collector_stale: bool,
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
            config: config.clone(),
            interval: Duration::from_secs(config.interval_s),
            next_due: Instant::now(),
            collector: Some(Collector::new(config)),
            collector_stale: false,
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
            None => self.collector_stale = true,
        }
        self.config = config.clone();
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.collector.as_ref().map(|_| self.next_due)
    }

    /// Starts a heartbeat when one is due. An error (no seq can be reserved, no thread can be
    /// started) is logged and tried again at the next interval.
    pub fn on_timer(&mut self, now: Instant, outbox: &Outbox) -> Result<(), String> {
        if now >= self.next_due && self.collector.is_some() {
            return self.start(outbox.dropped()).map(|_| ());
        }
        Ok(())
    }

    /// Starts a heartbeat now (the `heartbeat` command); returns the seq it will carry, or
    /// the running collection's when one is under way.
    pub fn trigger(&mut self, outbox: &Outbox) -> Result<u64, String> {
        match self.collector {
            Some(_) => self.start(outbox.dropped()),
            None => Ok(self.last_seq),
        }
    }

    fn start(&mut self, dropped: u64) -> Result<u64, String> {
        // Keep the cadence, but never try to catch up on missed beats in a burst.
        let now = Instant::now();
        self.next_due = (self.next_due + self.interval).max(now + self.interval / 2);
        let seq = self.last_seq + 1;
        if seq > self.reserved_seq {
            self.save_seq(seq + SEQ_BLOCK - 1).map_err(|e| {
                let reason = format!("no heartbeat: cannot save its seq ({e}), and a seq must never repeat");
                log::error!("{reason}");
                reason
            })?;
        }
        let Some(mut collector) = self.collector.take() else { return Ok(self.last_seq) };
        self.last_seq = seq;
        let started = self.workers.spawn("heartbeat", move || {
            let heartbeat = collector.collect(seq, dropped);
            (collector, heartbeat)
        });
        if let Err(e) = started {
            // The collector went with the thread that never started: make a new one.
            self.collector = Some(Collector::new(&self.config));
            return Err(format!("no heartbeat: {e}"));
        }
        Ok(seq)
    }

    /// Queues finished heartbeats for delivery; returns their seqs.
    pub fn on_wake(&mut self, outbox: &mut Outbox) -> Vec<u64> {
        let mut queued = Vec::new();
        while let Some((collector, heartbeat)) = self.workers.try_recv() {
            self.collector = Some(match std::mem::take(&mut self.collector_stale) {
                true => Collector::new(&self.config),
                false => collector,
            });
            match serde_json::to_vec(&heartbeat) {
                Ok(payload) => {
                    log::debug!("heartbeat {} collected ({} bytes)", heartbeat.seq, payload.len());
                    outbox.push(Kind::Heartbeat, self.topic.clone(), payload, true);
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
        if let Err(e) = self.save_seq(self.queued_seq) {
            log::warn!("cannot save the heartbeat seq: {e}");
        }
    }

    fn save_seq(&mut self, seq: u64) -> Result<(), String> {
        let text = format!("{seq:020}\n");
        fsutil::overwrite_small(&self.seq_path, text.as_bytes()).map_err(|e| fsutil::error_text(&e))?;
        self.reserved_seq = seq;
        Ok(())
    }
}
