//! Blocking work (DNS, collecting a heartbeat, running a command) runs on plain threads that
//! hand their result back through a channel and wake the event loop. Each capability owns its
//! own `Workers<T>`; they all share the loop's one `mio::Waker`.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

/// Enough for the jobs we run (no deep recursion); keeps each thread's footprint small.
const WORKER_STACK_BYTES: usize = 256 * 1024;

pub struct Workers<T> {
    tx: Sender<T>,
    rx: Receiver<T>,
    waker: Arc<mio::Waker>,
    running: usize,
}

impl<T: Send + 'static> Workers<T> {
    pub fn new(waker: Arc<mio::Waker>) -> Workers<T> {
        let (tx, rx) = channel();
        Workers { tx, rx, waker, running: 0 }
    }

    /// Runs `job` on a new thread; its result comes back through `try_recv` after the loop
    /// wakes. Fails when no thread can be started (the job is dropped, not run).
    pub fn spawn(&mut self, name: &str, job: impl FnOnce() -> T + Send + 'static) -> Result<(), String> {
        let tx = self.tx.clone();
        let waker = Arc::clone(&self.waker);
        let spawned = std::thread::Builder::new()
            .name(name.to_string())
            .stack_size(WORKER_STACK_BYTES)
            .spawn(move || {
                // A send fails only when the loop is gone, and then nobody needs the result.
                let _ = tx.send(job());
                let _ = waker.wake();
            });
        match spawned {
            Ok(_) => {
                self.running += 1;
                Ok(())
            }
            Err(e) => Err(format!("cannot start a {name} thread: {}", crate::fsutil::error_text(&e))),
        }
    }

    pub fn try_recv(&mut self) -> Option<T> {
        let result = self.rx.try_recv().ok()?;
        self.running = self.running.saturating_sub(1);
        Some(result)
    }

    /// Jobs started whose result has not been taken yet.
    pub fn running(&self) -> usize {
        self.running
    }
}
