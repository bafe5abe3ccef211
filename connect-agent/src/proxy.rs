//! The node's mTLS data plane: inbound (mTLS from other nodes to local services) and
//! outbound (transparent, upstream listeners, explicit proxy) connections.
//!
//! This file holds the shared pieces; `splice` moves bytes, `conns` tracks live
//! connections so revoked ones can be closed.

pub mod conns;
pub mod splice;
