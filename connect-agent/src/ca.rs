//! The built-in certificate authority and SPIFFE service identities.
//!
//! Owns: the cluster's trust domain (`<cluster-id>.consul`, made at first start), the
//! CA configuration, the roots and their keys (durable, through the `Store` under
//! `ca/`), leaf issuance for services (agent-generated keys and external CSRs),
//! background renewal of the leaves this agent holds, root rotation with
//! cross-signing, and the validator every mTLS handshake uses.
//!
//! Does not own: the HTTP endpoints (`api::ca`) and their ACL checks (a leaf needs
//! `service:write`, checked there), or the proxy's TLS listeners (they take [`tls`] verifiers, the
//! [`TrustBundle`] watch and each service's [`Leaf`] watch from [`CaManager`]).
//!
//! Layout: [`manager`] (the running CA: snapshot, watches, leaf cache, renewal,
//! rotation), [`state`] (store records and the snapshot), [`provider`] (the
//! [`CaProvider`] seam and the rcgen-based built-in provider), [`config`] (Consul's
//! CA configuration), [`leaf`] (leaf values, CSR screening, renewal timing),
//! [`verify`] (the validator), [`tls`] (rustls adapters), [`pki`] (encodings),
//! [`api_cert`] (the agent's own HTTPS API certificate), [`jwt`] (JWT-SVIDs: the
//! CA's JWT keys, signing, the JWKS, validation).
//!
//! Formats follow `reference/consul-connect.md` §5: roots are ECDSA P-256 (P-384 on
//! request), CA:true, keyCertSign/cRLSign/digitalSignature, SubjectKeyId =
//! AuthorityKeyId = SHA-256 of the public key, URI SAN `spiffe://<trust-domain>`,
//! 10 years; leaves are ECDSA P-256 with URI SAN
//! `spiffe://<td>/ns/default/dc/<dc>/svc/<name>`, DNS SAN `<name>.svc.<td>`, a random
//! 128-bit serial, serverAuth + clientAuth, not a CA, 72 h by default.

pub mod api_cert;
pub mod config;
pub mod jwt;
pub mod leaf;
pub mod manager;
pub mod pki;
pub mod provider;
pub mod remote;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
pub mod verify;

#[cfg(test)]
mod tests;

pub use config::CaConfig;
pub use leaf::{CsrRefusal, IssuedCert, Leaf};
pub use manager::{CaManager, CaRole, LeafWatch};
pub use provider::{BuiltinProvider, CaProvider, Signer};
pub use state::{CaState, Root};
pub use verify::{PeerRole, TrustBundle, VerifyError, verify_chain};

/// Why a CA operation failed. Each variant says whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operator's CA configuration is invalid (user input).
    #[error("{reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// The configuration names a provider this build does not have (user input).
    #[error("CA provider {provider:?} is not supported: only \"consul\" (the built-in CA) is")]
    UnsupportedProvider { provider: String },
    /// `State` is provider-managed and may not be set (user input).
    #[error("the State field of the CA configuration cannot be set")]
    StateNotSettable,
    /// A CSR was refused (the requester's fault).
    #[error("the certificate signing request is refused: {refusal}")]
    CsrRefused {
        #[source]
        refusal: CsrRefusal,
    },
    /// PEM input could not be read (user input or a corrupt record).
    #[error("cannot read the {what} PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    /// A certificate the CA must use is unusable.
    #[error("the {what} is unusable: {reason}")]
    BadCertificate { what: &'static str, reason: String },
    /// Key generation or signing failed (our bug or the crypto library's).
    #[error("cannot {op}: {source}")]
    Crypto {
        op: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// A freshly generated leaf key could not be loaded for TLS (our bug).
    #[error("the leaf key cannot be used for TLS: {reason}")]
    LeafKey { reason: String },
    /// A stored CA record cannot be read: the store was changed by hand or is damaged.
    #[error("the stored CA record {key} is corrupt: {reason} (restore it from a backup)")]
    CorruptRecord { key: String, reason: String },
    /// A record could not be encoded (our bug).
    #[error("cannot encode a CA record: {source}")]
    Encode {
        #[source]
        source: serde_json::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    /// Other writers kept changing the CA configuration while this one retried.
    #[error("the CA configuration changed concurrently {attempts} times; try again")]
    Contended { attempts: u32 },
    /// This agent is a client agent: it never holds the CA's keys (our caller
    /// asked a client for what only a server does).
    #[error(
        "this is a client agent, which never holds the CA key: {op} on a server agent (--server)"
    )]
    NotServer { op: &'static str },
    /// A server agent refused to sign this client's CSR (the request's fault).
    #[error("the server agent {server} refused to sign (HTTP {status}): {message}")]
    SignRefused {
        server: String,
        status: u16,
        message: String,
    },
    /// No server agent could be reached to sign a CSR.
    #[error("no server agent could sign the leaf: {tried}")]
    NoServer { tried: String },
    /// A client agent started before any server agent created the CA.
    #[error("no CA in the store after {waited:?}: start a server agent (--server) first")]
    NoCa { waited: std::time::Duration },
    /// A CSR names another service than the one the request is for.
    #[error("the CSR is for service {csr:?}, not {requested:?}")]
    CsrServiceMismatch { csr: String, requested: String },
    /// The active root has no JWT signing key and none could be made.
    #[error("the active CA root has no JWT signing key")]
    NoJwtKey,
    /// A JWT-SVID request the CA refuses (the caller's audiences).
    #[error("the JWT-SVID request is refused: {0}")]
    JwtRequest(#[from] jwt::Rejection),
    /// The agent holds as many leaves as it may; none is idle enough to drop.
    #[error("this agent already holds {max} leaf certificates in use; refusing another")]
    TooManyLeaves { max: usize },
}

impl crate::fault::Blame for Error {
    fn fault(&self) -> crate::fault::Fault {
        use crate::fault::Fault;
        match self {
            Error::StateNotSettable
            | Error::CsrRefused { .. }
            | Error::CsrServiceMismatch { .. }
            | Error::JwtRequest(_)
            | Error::NotServer { .. } => Fault::Caller,
            // A server refused this client agent's request: pass its answer on.
            Error::SignRefused { status, .. } => match status {
                401 | 403 => Fault::Forbidden,
                404 => Fault::NotFound,
                _ => Fault::Caller,
            },
            Error::Contended { .. } => Fault::Conflict,
            // Consul answers validation failures of the CA configuration with 500
            // and the message (reference §2.5); everything else is ours anyway.
            _ => Fault::Ours,
        }
    }
}
