//! One application connection through the proxy, from where it starts to its
//! close record: an accepted outbound connection (transparent, an upstream
//! listener, the explicit proxy), an inbound TLS connection that carries one, or
//! one stream of a reused node-to-node connection.
//!
//! Every path needs the same four things — the id that logs and the registry use,
//! the tracing span, a slot of the connection limit, and the close record — and
//! ends the same way: [`Connection::finish`] turns what the connection's run
//! returned ([`Ran`]) into its close record.

use tokio::sync::OwnedSemaphorePermit;
use tracing::Span;

use super::{
    ConnError, Outcome, Shared, Side, conns::ConnId, metrics::ConnRecord, splice, splice_outcome,
};

/// What the run of one connection returned: what the splice moved and how it
/// ended, the error that stopped it before or instead, or `None` when a forced
/// shutdown cut it.
pub(super) type Ran = Option<Result<splice::Spliced, ConnError>>;

/// One application connection (see the module doc). Holds its slot of the
/// connection limit until it is finished or dropped.
pub(super) struct Connection<'m> {
    pub(super) id: ConnId,
    pub(super) span: Span,
    side: Side,
    shared: &'m Shared,
    rec: ConnRecord<'m>,
    slot: Slot,
}

/// What a connection holds while it lives: a permit of the handshake budget
/// while its peer is unauthenticated, a slot of the connection limit after.
enum Slot {
    Handshake(#[allow(dead_code)] crate::admission::Permit),
    Carrying(#[allow(dead_code)] OwnedSemaphorePermit),
}

impl<'m> Connection<'m> {
    /// Starts the close record of a new connection on `side`, in the span that
    /// `span` makes for its id, and takes a slot of the connection limit. `None`
    /// when the limit is reached: the refusal is recorded and logged (rate
    /// limited); the caller only closes its socket.
    pub(super) fn open(
        shared: &'m Shared,
        side: Side,
        span: impl FnOnce(ConnId) -> Span,
    ) -> Option<Self> {
        let id = shared.registry.next_id();
        let span = span(id);
        let mut rec = ConnRecord::open(&shared.metrics, side, span.clone());
        match shared.registry.reserve() {
            Ok(slot) => Some(Self {
                id,
                span,
                side,
                shared,
                rec,
                slot: Slot::Carrying(slot),
            }),
            Err(full) => {
                shared.limit_log.refused("connection limit", full.max);
                rec.finish(Outcome::LimitReached);
                None
            }
        }
    }

    /// [`Connection::open`] for a connection whose peer must first complete a TLS
    /// handshake: it takes a permit of the handshake budget (bounded in all and
    /// per peer IP, [`crate::admission`]) instead of a connection slot, so that
    /// silent or slow peers cannot crowd out carried connections. `None` when the
    /// budget refuses it. [`Connection::handshaken`] swaps the permit for a slot.
    pub(super) fn open_handshake(
        shared: &'m Shared,
        side: Side,
        peer: std::net::IpAddr,
        span: impl FnOnce(ConnId) -> Span,
    ) -> Option<Self> {
        let id = shared.registry.next_id();
        let span = span(id);
        let mut rec = ConnRecord::open(&shared.metrics, side, span.clone());
        match shared.handshakes.try_enter(peer) {
            Ok(permit) => Some(Self {
                id,
                span,
                side,
                shared,
                rec,
                slot: Slot::Handshake(permit),
            }),
            Err(_) => {
                // The budget logged it.
                rec.finish(Outcome::LimitReached);
                None
            }
        }
    }

    /// Trades the handshake permit of an authenticated connection for a slot of
    /// the connection limit. `None` (recorded as limit reached) when the limit
    /// is reached.
    pub(super) fn handshaken(mut self) -> Option<Self> {
        match self.shared.registry.reserve() {
            Ok(slot) => {
                self.slot = Slot::Carrying(slot);
                Some(self)
            }
            Err(full) => {
                self.shared.limit_log.refused("connection limit", full.max);
                self.rec.finish(Outcome::LimitReached);
                None
            }
        }
    }

    /// Closes the record with what the run returned, and frees the slot.
    pub(super) fn finish(mut self, ran: Ran) {
        match ran {
            Some(Ok(out)) => {
                self.rec.bytes(out.to_local, out.from_local);
                self.rec
                    .finish(splice_outcome(out.end, &self.shared.shutdown));
            }
            Some(Err(e)) => {
                if e.outcome() == Outcome::HandshakeFailed {
                    self.shared.metrics.count_handshake_failure(self.side);
                }
                self.rec.fail(e.outcome(), &e);
            }
            None => self.rec.finish(Outcome::Shutdown),
        }
    }

    /// Closes the record of a connection that never carried an application
    /// connection (a node-to-node connection closed before its first stream).
    pub(super) fn finish_unused(mut self, outcome: Outcome) {
        self.rec.finish(outcome);
    }
}

/// Whether `ran` is a refusal: the connection must end with a reset (see
/// `inbound::reset` and `outbound::refuse`).
pub(super) fn denied(ran: &Ran) -> bool {
    matches!(ran, Some(Err(ConnError::Denied { .. })))
}
