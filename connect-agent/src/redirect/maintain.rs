//! The agent's upkeep of the eBPF maps: keeping the destination and port maps
//! equal to what the catalog wants, and sweeping redirect records nobody claimed.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use super::{Desired, Redirector};

/// Keeps the eBPF maps equal to `desired()` (the catalog's directory): one full
/// diff whenever `changes` moves, and a retry on the next tick when some entries
/// could not be written.
pub fn sync_maps<F>(
    redirector: Arc<Redirector>,
    mut changes: watch::Receiver<u64>,
    desired: F,
) -> AbortOnDropHandle<()>
where
    F: Fn() -> Arc<Desired> + Send + 'static,
{
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let desired = desired();
            let stats = redirector.sync(&desired);
            if stats.added + stats.removed + stats.failed > 0 {
                tracing::info!(
                    added = stats.added,
                    removed = stats.removed,
                    failed = stats.failed,
                    destinations = desired.destinations.len(),
                    protected_ports = desired.protected_ports.len(),
                    "redirect maps synced"
                );
            }
            let failed = stats.failed > 0;
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tick.tick(), if failed => {}
            }
        }
    }))
}

/// How long a by-port record may wait for the proxy to claim it; the proxy claims
/// right after `accept()`, so anything older belongs to a connection that is gone.
const UNCLAIMED_AFTER: Duration = Duration::from_secs(30);
/// How long a `connect()` may take before its record counts as abandoned: longer
/// than Linux's default SYN retries (about 127 s).
const UNESTABLISHED_AFTER: Duration = Duration::from_secs(180);

/// Sweeps stale redirect records every 10 s (see [`Redirector::sweep`]).
pub fn sweep_records(redirector: Arc<Redirector>) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let r = redirector.clone();
            let stats =
                tokio::task::spawn_blocking(move || r.sweep(UNCLAIMED_AFTER, UNESTABLISHED_AFTER))
                    .await;
            match stats {
                Ok(s) if s.unclaimed + s.unestablished > 0 => tracing::info!(
                    unclaimed = s.unclaimed,
                    unestablished = s.unestablished,
                    "removed stale redirect records"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "the redirect sweep failed"),
            }
        }
    }))
}
