//! `max_bytes_tx_per_minute` / `max_bytes_rx_per_minute`: a token bucket refilled continuously,
//! holding at most one second's worth (a minute's budget cannot leave in one burst that fills
//! a 2G link's buffers), handing bytes out in pieces no smaller than a quarter of that (the
//! event loop wakes a few times a second, not for every byte).

use std::time::{Duration, Instant};

/// The bucket holds at least this, so that very low rates still move whole frames.
const MIN_BURST: f64 = 512.0;
/// Pieces handed out are at least burst / GRAIN_PER_BURST (or all that was asked).
const GRAIN_PER_BURST: f64 = 4.0;

#[derive(Debug, Clone)]
pub struct RateLimiter {
    /// Bytes per second; None: no limit.
    per_second: Option<f64>,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl RateLimiter {
    /// `bytes_per_minute` 0 is no limit. The bucket starts full.
    pub fn new(bytes_per_minute: u64, now: Instant) -> RateLimiter {
        let per_second = (bytes_per_minute > 0).then(|| bytes_per_minute as f64 / 60.0);
        let burst = per_second.map_or(0.0, |rate| rate.max(MIN_BURST));
        RateLimiter { per_second, burst, tokens: burst, refilled: now }
    }

    /// How many of `wanted` bytes may go now (all, some, or none), and takes them.
    pub fn allow(&mut self, wanted: usize, now: Instant) -> usize {
        if self.per_second.is_none() {
            return wanted;
        }
        self.refill(now);
        let wanted_f = wanted as f64;
        if self.tokens < wanted_f.min(self.grain()) {
            return 0;
        }
        let granted = wanted_f.min(self.tokens.floor());
        self.tokens -= granted;
        granted as usize
    }

    /// When a piece may go, if not now: the event loop's deadline. None: now (or no limit).
    pub fn next_allowed(&self, now: Instant) -> Option<Instant> {
        let per_second = self.per_second?;
        let missing = self.grain() - self.tokens_at(now);
        // Rounded up, so that at that instant the piece is there.
        (missing > 0.0).then(|| now + Duration::from_nanos((missing / per_second * 1e9).ceil() as u64 + 1))
    }

    fn grain(&self) -> f64 {
        self.burst / GRAIN_PER_BURST
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        (self.tokens + elapsed * self.per_second.unwrap_or(0.0)).min(self.burst)
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = self.tokens_at(now);
        self.refilled = now.max(self.refilled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `chunk`-byte pieces as fast as the limiter allows for a simulated minute, waking
    /// only at `next_allowed`; returns the bytes sent.
    fn bytes_in_a_minute(per_minute: u64, chunk: usize) -> u64 {
        let start = Instant::now();
        let end = start + Duration::from_secs(60);
        let mut limiter = RateLimiter::new(per_minute, start);
        let (mut now, mut sent) = (start, 0u64);
        while now < end {
            let granted = limiter.allow(chunk, now);
            assert!(granted as f64 <= limiter.burst, "{granted} in one go");
            sent += granted as u64;
            if let Some(wake) = limiter.next_allowed(now) {
                assert!(wake > now);
                now = wake;
            }
        }
        sent
    }

    #[test]
    fn a_minute_holds_the_rate_within_ten_percent() {
        for (per_minute, chunk) in [(60_000, 16_384), (1_048_576, 16_384), (6_000_000, 1_000), (30_000, 100)]
        {
            let sent = bytes_in_a_minute(per_minute, chunk) as f64;
            let ratio = sent / per_minute as f64;
            assert!((0.9..=1.1).contains(&ratio), "{per_minute} B/min, chunks of {chunk}: sent {sent}");
        }
    }

    #[test]
    fn pieces_are_not_dribbled_and_no_limit_means_no_wait() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(60 * 4096, start);
        assert_eq!(limiter.allow(100_000, start), 4096, "a full bucket: one second's worth");
        assert_eq!(limiter.allow(100, start + Duration::from_millis(10)), 0, "40 bytes are not a piece");
        let wake = limiter.next_allowed(start + Duration::from_millis(10)).unwrap();
        assert!(wake >= start + Duration::from_millis(250) && wake < start + Duration::from_millis(252));
        assert_eq!(limiter.allow(100_000, wake), 1024);
        assert_eq!(limiter.allow(10, wake + Duration::from_millis(3)), 10, "small asks pass once there");

        let mut unlimited = RateLimiter::new(0, start);
        assert_eq!(unlimited.allow(usize::MAX, start), usize::MAX);
        assert_eq!(unlimited.next_allowed(start), None);
    }
}
