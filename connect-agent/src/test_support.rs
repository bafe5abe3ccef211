//! Helpers for this crate's unit tests.

use std::time::Duration;

/// How long [`eventually`] waits: a bound for a broken test, not a latency
/// assertion (tests that measure latency assert on their own clock).
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// Polls `done` every 5 ms until it holds; panics naming `what` after
/// [`EVENTUALLY`]. Uses tokio's clock, so tests with paused time advance it.
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {EVENTUALLY:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
