//! Connect's node agent.
//!
//! One process per node: it gives each local service a SPIFFE identity from the CA,
//! keeps the catalog and intentions in a durable store with an in-memory cache,
//! answers authorize checks from that cache, attaches the eBPF programs that send
//! applications' connections to its mTLS proxy, and serves Consul's HTTP API.
//!
//! Modules, from the edge in: `cli` and `api` (the interfaces), `app` (wiring and
//! lifecycle), `redirect` (eBPF), `store` (durable state), `identity` (names).

pub mod acl;
pub mod admission;
pub mod agent;
pub mod api;
pub mod app;
pub mod ca;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod datadir;
pub mod dns;
pub mod duration;
pub mod fault;
pub mod identity;
pub mod intentions;
pub mod proxy;
pub mod redirect;
pub mod shutdown;
pub mod store;
pub mod vip;
pub mod workload;

#[cfg(test)]
mod test_support;
