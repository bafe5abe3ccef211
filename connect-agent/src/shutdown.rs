//! One shutdown mechanism for the whole agent: a signal stops accepting, in-flight
//! work drains until a deadline, then whatever is left is cancelled.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How long in-flight requests and connections may drain after a stop signal.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Shared by every listener and long-running task.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the agent stops accepting new work.
    pub stop: CancellationToken,
    /// Cancelled when the drain deadline passed: tasks must end now.
    pub force: CancellationToken,
    /// Tasks that must finish (or be forced) before the process exits.
    pub tasks: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops accepting, waits for tracked tasks up to `deadline`, then forces them.
    pub async fn drain(&self, deadline: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.tasks.len(),
                "drain deadline passed, cancelling"
            );
            self.force.cancel();
            // Forced tasks end at their next await point.
            let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        }
    }
}

/// Signals the agent reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT or SIGTERM: stop.
    Stop,
    /// SIGHUP: re-read the config directory.
    Reload,
}

/// Listens for SIGINT, SIGTERM and SIGHUP.
#[derive(Debug)]
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; call before binding so no early signal is missed.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::Stop,
            _ = self.term.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
