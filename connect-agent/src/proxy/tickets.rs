//! The client side's TLS 1.3 ticket store: which session tickets a source service
//! holds for a destination endpoint (one store per source and endpoint, see
//! `TlsConfigs::client_to`), so that the next connection resumes instead of doing
//! a full handshake.
//!
//! rustls' own memory cache keeps at most 8 tickets per server name. A node proxy
//! opens many connections to one destination at once (16 concurrent clients in the
//! connection-rate benchmark), and each takes a ticket, so with 8 about one
//! connection in ten found the cache empty and paid a full handshake (two ECDSA
//! signatures and two chain verifications more). This store keeps up to
//! [`TICKETS_PER_SERVER`] per destination; every handshake brings two new ones,
//! so the store refills as fast as connections drain it.
//!
//! Bounded: at most [`MAX_SERVERS`] destination names per store, the one least
//! recently stored to dropped first; a ticket is about 2 KiB with the server's
//! certificate, so a full store holds at most 256 KiB. TLS 1.2 is never
//! negotiated (TLS 1.3 only), so its sessions are not kept.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use rustls::{
    NamedGroup,
    client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue},
    pki_types::ServerName,
};

/// Tickets kept per destination name: more than the connections a busy client
/// opens to one destination at once.
pub const TICKETS_PER_SERVER: usize = 32;

/// Destination names remembered per store. A store serves one source service and
/// one destination endpoint (a node's inbound address), where the names are the
/// services of that node the source dials: a handful.
pub const MAX_SERVERS: usize = 4;

#[derive(Default)]
struct Server {
    kx_hint: Option<NamedGroup>,
    /// Oldest first; the newest is used first.
    tickets: VecDeque<Tls13ClientSessionValue>,
    /// When this entry last received something, for eviction.
    touched: u64,
}

#[derive(Default)]
struct Inner {
    servers: HashMap<ServerName<'static>, Server>,
    clock: u64,
}

impl Inner {
    /// The entry of `name`, created (evicting the stalest when full) if missing.
    fn entry(&mut self, name: ServerName<'static>) -> &mut Server {
        self.clock += 1;
        let now = self.clock;
        if !self.servers.contains_key(&name) && self.servers.len() >= MAX_SERVERS {
            let stalest = self
                .servers
                .iter()
                .min_by_key(|(_, s)| s.touched)
                .map(|(n, _)| n.clone());
            if let Some(n) = stalest {
                self.servers.remove(&n);
            }
        }
        let s = self.servers.entry(name).or_default();
        s.touched = now;
        s
    }
}

/// A bounded in-memory [`ClientSessionStore`] for one source service.
#[derive(Default)]
pub struct TicketStore {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for TicketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("TicketStore")
            .field("servers", &inner.servers.len())
            .field(
                "tickets",
                &inner
                    .servers
                    .values()
                    .map(|s| s.tickets.len())
                    .sum::<usize>(),
            )
            .finish()
    }
}

impl TicketStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent: a poisoned lock is
        // still a good cache.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tickets held for `name` now.
    pub fn tickets(&self, name: &ServerName<'_>) -> usize {
        self.lock().servers.get(name).map_or(0, |s| s.tickets.len())
    }
}

impl ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.lock().entry(server_name).kx_hint = Some(group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.lock().servers.get(server_name).and_then(|s| s.kx_hint)
    }

    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let mut inner = self.lock();
        let s = inner.entry(server_name);
        if s.tickets.len() >= TICKETS_PER_SERVER {
            s.tickets.pop_front();
        }
        s.tickets.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.lock()
            .servers
            .get_mut(server_name)
            .and_then(|s| s.tickets.pop_back())
    }
}
