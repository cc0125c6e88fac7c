//! The crate's one source of randomness: the kernel's, through getrandom(2), else
//! /dev/urandom (kernels before 3.17). Agents started together (a fleet powered up at once, a
//! broker restart seen by all) must not draw alike, which anything derived from the clock or
//! the pid cannot promise.

use std::cell::RefCell;
use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Draws of up to `SMALL_DRAW` bytes come from a pool of the kernel's bytes, per thread,
/// refilled `POOL_BYTES` at a time: a WebSocket frame's mask (4 bytes; 70,000 frames carry a
/// 256 MiB file) had cost a getrandom call each, a quarter of the agent's system calls.
const SMALL_DRAW: usize = 16;
const POOL_BYTES: usize = 256;

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { bytes: [0; POOL_BYTES], used: POOL_BYTES }) };
}

struct Pool {
    bytes: [u8; POOL_BYTES],
    /// Bytes handed out already, from the front; each byte goes out once.
    used: usize,
}

/// Fills `buf` with random bytes. Never blocks, even before the kernel's pool is seeded at
/// boot: an agent must not hang at start, and none of its uses is a secret.
pub fn fill(buf: &mut [u8]) {
    if buf.len() > SMALL_DRAW {
        return from_kernel(buf);
    }
    POOL.with_borrow_mut(|pool| {
        if POOL_BYTES - pool.used < buf.len() {
            from_kernel(&mut pool.bytes);
            pool.used = 0;
        }
        buf.copy_from_slice(&pool.bytes[pool.used..pool.used + buf.len()]);
        pool.used += buf.len();
    });
}

fn from_kernel(buf: &mut [u8]) {
    if !from_getrandom(buf) && !from_urandom(buf) {
        from_fallback(buf);
    }
}

pub fn u64() -> u64 {
    let mut bytes = [0u8; 8];
    fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// Uniform in [`low`, `high`] (to the nanosecond); `low` when `high` is not above it.
pub fn between(low: Duration, high: Duration) -> Duration {
    let span = high.saturating_sub(low).as_nanos() as u64;
    match span.checked_add(1) {
        Some(values) => low + Duration::from_nanos(u64() % values),
        None => low + Duration::from_nanos(u64()),
    }
}

fn from_getrandom(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), libc::GRND_NONBLOCK) };
        if n > 0 {
            done += n as usize;
        } else if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        } else {
            return false; // ENOSYS (old kernel) or EAGAIN (pool not seeded yet)
        }
    }
    true
}

fn from_urandom(buf: &mut [u8]) -> bool {
    File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).is_ok()
}

/// Only when the kernel gives nothing (no getrandom, no /dev in a bare chroot): the clock, the
/// pid and a counter, mixed, so at least two draws of one process differ.
fn from_fallback(buf: &mut [u8]) {
    // 32 bits: ARMv5 has no 64-bit atomics.
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut state = nanos ^ (u64::from(std::process::id()) << 32);
    for chunk in buf.chunks_mut(8) {
        let count = u64::from(COUNTER.fetch_add(1, Ordering::Relaxed));
        state = state.wrapping_add(count.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let word = splitmix(state).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_gives_different_draws() {
        for source in [from_getrandom as fn(&mut [u8]) -> bool, from_urandom, |b| {
            from_fallback(b);
            true
        }] {
            let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
            assert!(source(&mut a) && source(&mut b), "a source failed on Linux");
            assert_ne!(a, b);
        }
    }

    #[test]
    fn small_draws_from_the_pool_differ_across_refills_and_threads() {
        let draws: Vec<[u8; 4]> = (0..3 * POOL_BYTES / 4)
            .map(|_| {
                let mut mask = [0u8; 4];
                fill(&mut mask);
                mask
            })
            .collect();
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(
            distinct.len() > draws.len() - 3,
            "{} of {} draws alike",
            draws.len() - distinct.len(),
            draws.len()
        );
        let here = u64();
        let there = std::thread::spawn(u64).join().unwrap();
        assert_ne!(here, there);
    }

    #[test]
    fn between_stays_within_its_bounds_and_reaches_both_ends() {
        let (low, high) = (Duration::from_millis(500), Duration::from_millis(1000));
        let draws: Vec<Duration> = (0..2000).map(|_| between(low, high)).collect();
        assert!(draws.iter().all(|d| (low..=high).contains(d)));
        assert!(draws.iter().any(|d| *d < low + Duration::from_millis(25)));
        assert!(draws.iter().any(|d| *d > high - Duration::from_millis(25)));
        assert_eq!(between(high, low), high);
    }
}
