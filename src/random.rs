//! The crate's one source of randomness: the kernel's, through getrandom(2), else
//! /dev/urandom (kernels before 3.17). Agents started together (a fleet powered up at once, a
//! broker restart seen by all) must not draw alike, which anything derived from the clock or
//! the pid cannot promise.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Fills `buf` with random bytes. Never blocks, even before the kernel's pool is seeded at
/// boot: an agent must not hang at start, and none of its uses is a secret.
pub fn fill(buf: &mut [u8]) {
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
    fn between_stays_within_its_bounds_and_reaches_both_ends() {
        let (low, high) = (Duration::from_millis(500), Duration::from_millis(1000));
        let draws: Vec<Duration> = (0..2000).map(|_| between(low, high)).collect();
        assert!(draws.iter().all(|d| (low..=high).contains(d)));
        assert!(draws.iter().any(|d| *d < low + Duration::from_millis(25)));
        assert!(draws.iter().any(|d| *d > high - Duration::from_millis(25)));
        assert_eq!(between(high, low), high);
    }
}
