//! The proxy's counters ([`Metrics`], rendered for Prometheus) and the record every
//! connection leaves when it ends ([`ConnRecord`]): one "connection closed" event
//! with bytes each way, duration and outcome, emitted from `Drop` so that no path —
//! early return, error, panic unwind, cancelled task — skips it.
//!
//! Directions are named from the local application's side: `in` is bytes toward
//! local applications (from the remote peer), `out` is bytes from them.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tracing::{Level, Span};

/// Which side of the mesh a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// mTLS from a peer proxy to a local service.
    Inbound,
    /// Plaintext from a local application to a remote service.
    Outbound,
}

impl Side {
    const ALL: [Side; 2] = [Side::Inbound, Side::Outbound];

    pub fn label(self) -> &'static str {
        match self {
            Side::Inbound => "inbound",
            Side::Outbound => "outbound",
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions finished.
    Closed,
    /// No byte moved for the idle timeout.
    Idle,
    /// An intention change denied it while it was live.
    Revoked,
    /// The agent stopped and the drain deadline passed.
    Shutdown,
    /// A read or write failed mid-stream (reset, broken pipe).
    Reset,
    /// Intentions denied it.
    Denied,
    /// The TLS handshake failed or timed out (bad or missing certificate, garbage,
    /// a stalled peer).
    HandshakeFailed,
    /// The connection limit was reached.
    LimitReached,
    /// It could not be routed: no redirect record, unknown source or destination,
    /// an SNI naming no local service, no healthy instance.
    Unroutable,
    /// No instance of the destination could be dialed.
    DialFailed,
    /// The local service did not accept the connection.
    LocalUnreachable,
    /// Our side failed: no leaf, no authorization decision, a map error.
    Internal,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Closed,
        Outcome::Idle,
        Outcome::Revoked,
        Outcome::Shutdown,
        Outcome::Reset,
        Outcome::Denied,
        Outcome::HandshakeFailed,
        Outcome::LimitReached,
        Outcome::Unroutable,
        Outcome::DialFailed,
        Outcome::LocalUnreachable,
        Outcome::Internal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Idle => "idle_timeout",
            Outcome::Revoked => "revoked",
            Outcome::Shutdown => "shutdown",
            Outcome::Reset => "reset",
            Outcome::Denied => "denied",
            Outcome::HandshakeFailed => "handshake_failed",
            Outcome::LimitReached => "limit_reached",
            Outcome::Unroutable => "unroutable",
            Outcome::DialFailed => "dial_failed",
            Outcome::LocalUnreachable => "local_unreachable",
            Outcome::Internal => "internal",
        }
    }

    fn index(self) -> usize {
        // ALL lists every variant in declaration order.
        self as usize
    }
}

/// The proxy's counters. Lock-free; shared by every connection.
#[derive(Debug, Default)]
pub struct Metrics {
    accepted: [AtomicU64; 2],
    handshake_failures: [AtomicU64; 2],
    /// Completed handshakes per side: `[full, resumed]`.
    handshakes: [[AtomicU64; 2]; 2],
    /// Streams per side on node-to-node connections: `[first, reused]`.
    streams: [[AtomicU64; 2]; 2],
    allowed: AtomicU64,
    denied: AtomicU64,
    closed: [[AtomicU64; Outcome::ALL.len()]; 2],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    active: [AtomicI64; 2],
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn accepted(&self, side: Side) -> u64 {
        self.accepted[side as usize].load(Ordering::Relaxed)
    }

    pub fn handshake_failures(&self, side: Side) -> u64 {
        self.handshake_failures[side as usize].load(Ordering::Relaxed)
    }

    /// Completed TLS handshakes on `side`, resumed ones (`true`) or full ones.
    pub fn handshakes(&self, side: Side, resumed: bool) -> u64 {
        self.handshakes[side as usize][usize::from(resumed)].load(Ordering::Relaxed)
    }

    /// Streams (application connections over a node-to-node connection that
    /// carries streams) on `side`: on a connection that had carried one before
    /// (`true`), or the first on a new one.
    pub fn streams(&self, side: Side, reused: bool) -> u64 {
        self.streams[side as usize][usize::from(reused)].load(Ordering::Relaxed)
    }

    /// Authorization decisions that allowed a connection.
    pub fn allowed(&self) -> u64 {
        self.allowed.load(Ordering::Relaxed)
    }

    /// Authorization decisions that denied a connection.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// Connections on `side` that ended with `outcome`.
    pub fn closed(&self, side: Side, outcome: Outcome) -> u64 {
        self.closed[side as usize][outcome.index()].load(Ordering::Relaxed)
    }

    /// Bytes toward local applications.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    /// Bytes from local applications.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }

    /// Connections on `side` now open (accepted and not yet closed).
    pub fn active(&self, side: Side) -> i64 {
        self.active[side as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn count_decision(&self, allowed: bool) {
        let c = if allowed { &self.allowed } else { &self.denied };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_handshake_failure(&self, side: Side) {
        self.handshake_failures[side as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_handshake(&self, side: Side, kind: Option<rustls::HandshakeKind>) {
        let resumed = kind == Some(rustls::HandshakeKind::Resumed);
        self.handshakes[side as usize][usize::from(resumed)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_stream(&self, side: Side, reused: bool) {
        self.streams[side as usize][usize::from(reused)].fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the counters in Prometheus' text format.
    pub fn render_prometheus(&self, out: &mut String) {
        header(
            out,
            "connect_proxy_connections_accepted_total",
            "counter",
            "Connections accepted by the proxy's listeners.",
        );
        for side in Side::ALL {
            sample(
                out,
                "connect_proxy_connections_accepted_total",
                &[("side", side.label())],
                self.accepted(side),
            );
        }
        header(
            out,
            "connect_proxy_handshake_failures_total",
            "counter",
            "TLS handshakes that failed or timed out.",
        );
        for side in Side::ALL {
            sample(
                out,
                "connect_proxy_handshake_failures_total",
                &[("side", side.label())],
                self.handshake_failures(side),
            );
        }
        per_side_pair(
            out,
            "connect_proxy_handshakes_total",
            "TLS handshakes completed, full or resumed from a session ticket.",
            ("kind", ["full", "resumed"]),
            &self.handshakes,
        );
        per_side_pair(
            out,
            "connect_proxy_streams_total",
            "Application connections carried as streams over node-to-node connections, on a new one or one reused.",
            ("connection", ["new", "reused"]),
            &self.streams,
        );
        header(
            out,
            "connect_proxy_authorizations_total",
            "counter",
            "Authorization decisions on inbound connections.",
        );
        sample(
            out,
            "connect_proxy_authorizations_total",
            &[("decision", "allow")],
            self.allowed(),
        );
        sample(
            out,
            "connect_proxy_authorizations_total",
            &[("decision", "deny")],
            self.denied(),
        );
        header(
            out,
            "connect_proxy_connections_closed_total",
            "counter",
            "Connections that ended, by how they ended.",
        );
        for side in Side::ALL {
            for outcome in Outcome::ALL {
                sample(
                    out,
                    "connect_proxy_connections_closed_total",
                    &[("side", side.label()), ("outcome", outcome.label())],
                    self.closed(side, outcome),
                );
            }
        }
        header(
            out,
            "connect_proxy_bytes_total",
            "counter",
            "Bytes spliced; in = toward local applications, out = from them.",
        );
        sample(
            out,
            "connect_proxy_bytes_total",
            &[("direction", "in")],
            self.bytes_in(),
        );
        sample(
            out,
            "connect_proxy_bytes_total",
            &[("direction", "out")],
            self.bytes_out(),
        );
        header(
            out,
            "connect_proxy_active_connections",
            "gauge",
            "Connections open now.",
        );
        for side in Side::ALL {
            let _ = writeln!(
                out,
                "connect_proxy_active_connections{{side=\"{}\"}} {}",
                side.label(),
                self.active(side)
            );
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A counter family by side and a label of two values, kept as
/// `counters[side][value]`.
fn per_side_pair(
    out: &mut String,
    name: &str,
    help: &str,
    (label, values): (&str, [&str; 2]),
    counters: &[[AtomicU64; 2]; 2],
) {
    header(out, name, "counter", help);
    for side in Side::ALL {
        for (value, counter) in values.iter().zip(&counters[side as usize]) {
            sample(
                out,
                name,
                &[("side", side.label()), (label, value)],
                counter.load(Ordering::Relaxed),
            );
        }
    }
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    let _ = write!(out, "{name}{{");
    for (i, (k, v)) in labels.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(out, "{sep}{k}=\"{v}\"");
    }
    let _ = writeln!(out, "}} {value}");
}

/// What one connection did; emits "connection closed" and updates the counters
/// when dropped. Create it at accept, set the outcome and bytes as they become
/// known.
#[derive(Debug)]
pub(crate) struct ConnRecord<'m> {
    metrics: &'m Metrics,
    span: Span,
    side: Side,
    started: Instant,
    outcome: Outcome,
    error: Option<String>,
    bytes_in: u64,
    bytes_out: u64,
}

impl<'m> ConnRecord<'m> {
    pub(crate) fn open(metrics: &'m Metrics, side: Side, span: Span) -> Self {
        metrics.accepted[side as usize].fetch_add(1, Ordering::Relaxed);
        metrics.active[side as usize].fetch_add(1, Ordering::Relaxed);
        Self {
            metrics,
            span,
            side,
            started: Instant::now(),
            // Until a path says otherwise, the connection died on our side (e.g.
            // the task was dropped).
            outcome: Outcome::Internal,
            error: None,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    pub(crate) fn finish(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    pub(crate) fn fail(&mut self, outcome: Outcome, error: &dyn std::error::Error) {
        self.outcome = outcome;
        self.error = Some(crate::fault::chain(error));
    }

    pub(crate) fn bytes(&mut self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in = bytes_in;
        self.bytes_out = bytes_out;
    }
}

impl Drop for ConnRecord<'_> {
    fn drop(&mut self) {
        let m = self.metrics;
        let side = self.side as usize;
        m.active[side].fetch_sub(1, Ordering::Relaxed);
        m.closed[side][self.outcome.index()].fetch_add(1, Ordering::Relaxed);
        m.bytes_in.fetch_add(self.bytes_in, Ordering::Relaxed);
        m.bytes_out.fetch_add(self.bytes_out, Ordering::Relaxed);
        let duration_ms = duration_ms(self.started.elapsed());
        let outcome = self.outcome.label();
        let error = self.error.as_deref().unwrap_or("");
        let (bytes_in, bytes_out) = (self.bytes_in, self.bytes_out);
        match close_level(self.side, self.outcome) {
            Level::WARN => {
                tracing::warn!(parent: &self.span, bytes_in, bytes_out, duration_ms, outcome, error, "connection closed")
            }
            Level::INFO => {
                tracing::info!(parent: &self.span, bytes_in, bytes_out, duration_ms, outcome, error, "connection closed")
            }
            _ => {
                tracing::debug!(parent: &self.span, bytes_in, bytes_out, duration_ms, outcome, error, "connection closed")
            }
        }
    }
}

/// How loudly a connection's end is logged. Denials and revocations are what
/// operators look for (info). A local application that cannot reach its
/// destination, or a local service that does not answer, is a degraded mesh
/// (warn). Everything a remote peer can cause at will — bad handshakes, unknown
/// names — and normal ends are per-connection detail (debug).
fn close_level(side: Side, outcome: Outcome) -> Level {
    match (side, outcome) {
        (_, Outcome::Denied | Outcome::Revoked) => Level::INFO,
        (Side::Outbound, Outcome::Unroutable | Outcome::DialFailed | Outcome::Internal)
        | (Side::Inbound, Outcome::LocalUnreachable | Outcome::Internal) => Level::WARN,
        _ => Level::DEBUG,
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_indexes_follow_all() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i, "{o:?}");
        }
    }

    #[test]
    fn records_count_once_and_render() {
        let m = Metrics::new();
        {
            let mut r = ConnRecord::open(&m, Side::Inbound, Span::none());
            assert_eq!(m.active(Side::Inbound), 1);
            r.bytes(5, 7);
            r.finish(Outcome::Closed);
        }
        {
            // A record dropped without an outcome counts as ours to explain.
            let _r = ConnRecord::open(&m, Side::Outbound, Span::none());
        }
        m.count_decision(true);
        m.count_decision(false);
        m.count_handshake_failure(Side::Inbound);
        m.count_handshake(Side::Outbound, Some(rustls::HandshakeKind::Resumed));
        m.count_handshake(Side::Outbound, Some(rustls::HandshakeKind::Full));
        m.count_handshake(Side::Outbound, Some(rustls::HandshakeKind::Resumed));
        m.count_stream(Side::Inbound, true);
        assert_eq!(m.active(Side::Inbound), 0);
        assert_eq!(m.closed(Side::Inbound, Outcome::Closed), 1);
        assert_eq!(m.closed(Side::Outbound, Outcome::Internal), 1);
        let mut out = String::new();
        m.render_prometheus(&mut out);
        for line in [
            "connect_proxy_connections_accepted_total{side=\"inbound\"} 1",
            "connect_proxy_connections_accepted_total{side=\"outbound\"} 1",
            "connect_proxy_handshake_failures_total{side=\"inbound\"} 1",
            "connect_proxy_handshakes_total{side=\"outbound\",kind=\"full\"} 1",
            "connect_proxy_handshakes_total{side=\"outbound\",kind=\"resumed\"} 2",
            "connect_proxy_handshakes_total{side=\"inbound\",kind=\"resumed\"} 0",
            "connect_proxy_streams_total{side=\"inbound\",connection=\"reused\"} 1",
            "connect_proxy_streams_total{side=\"inbound\",connection=\"new\"} 0",
            "connect_proxy_authorizations_total{decision=\"allow\"} 1",
            "connect_proxy_authorizations_total{decision=\"deny\"} 1",
            "connect_proxy_connections_closed_total{side=\"inbound\",outcome=\"closed\"} 1",
            "connect_proxy_bytes_total{direction=\"in\"} 5",
            "connect_proxy_bytes_total{direction=\"out\"} 7",
            "connect_proxy_active_connections{side=\"inbound\"} 0",
            "# TYPE connect_proxy_active_connections gauge",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
        // Every family has exactly one HELP and one TYPE line.
        let types = out.lines().filter(|l| l.starts_with("# TYPE")).count();
        let helps = out.lines().filter(|l| l.starts_with("# HELP")).count();
        assert_eq!((types, helps), (8, 8));
    }

    #[test]
    fn close_levels() {
        let cases = [
            (Side::Inbound, Outcome::Denied, Level::INFO),
            (Side::Outbound, Outcome::Revoked, Level::INFO),
            (Side::Outbound, Outcome::DialFailed, Level::WARN),
            (Side::Outbound, Outcome::Unroutable, Level::WARN),
            (Side::Inbound, Outcome::LocalUnreachable, Level::WARN),
            (Side::Inbound, Outcome::Internal, Level::WARN),
            (Side::Inbound, Outcome::Unroutable, Level::DEBUG),
            (Side::Inbound, Outcome::HandshakeFailed, Level::DEBUG),
            (Side::Outbound, Outcome::Closed, Level::DEBUG),
            (Side::Inbound, Outcome::LimitReached, Level::DEBUG),
        ];
        for (side, outcome, want) in cases {
            assert_eq!(close_level(side, outcome), want, "{side:?} {outcome:?}");
        }
    }
}
