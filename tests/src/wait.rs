//! Bounded waits for the integration tests: every positive wait polls for the thing
//! it waits for, never sleeps a guessed time.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How often [`wait_for`] and [`wait_for_ok`] look again.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `done` until it holds; fails naming `what` after `timeout`. Returns how
/// long it took (some tests report or bound it).
pub fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<Duration> {
    wait_for_ok(timeout, what, || Ok(done()))
}

/// [`wait_for`] for a check that can fail: an error counts as "not yet" (the agent
/// may still be starting), and the timeout's error carries the last one.
pub fn wait_for_ok(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let last = done();
        if matches!(last, Ok(true)) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            match last {
                Err(e) => {
                    bail!("timed out after {timeout:?} waiting for {what} (last error: {e:#})")
                }
                _ => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(POLL);
    }
}
