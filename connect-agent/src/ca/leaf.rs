//! Leaf certificates: what an issued leaf carries ([`IssuedCert`], [`Leaf`]), how a
//! CSR from outside is screened before signing ([`screen_csr`]), and when a leaf is
//! renewed ([`renewal_delay`]).
//!
//! Issuing, caching and the renewal tasks are the manager's; this module holds the
//! values and the pure rules.

use std::{fmt, sync::Arc, time::Duration};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use time::OffsetDateTime;
use x509_parser::{
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    prelude::FromDer,
};

use super::{Error, pki};
use crate::{
    identity::{Datacenter, ServiceName, SpiffeId, TrustDomain},
    store::Index,
};

/// Renewal happens at a random point between these fractions of a leaf's lifetime
/// (Consul's agent cache: 60–90 %), so services issued together renew apart.
pub const RENEW_MIN_FRACTION: f64 = 0.6;
pub const RENEW_MAX_FRACTION: f64 = 0.9;
/// After the active root changes, each leaf is re-issued at a random instant within
/// this window (Consul: 30 s), so a rotation does not sign every leaf at once.
pub const ROOT_CHANGE_WINDOW: Duration = Duration::from_secs(30);

/// Where a leaf's key came from (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafRequestKind {
    /// The agent generated the key (the leaf endpoint, local services).
    AgentKey,
    /// An external CSR.
    Csr,
}

/// A signed leaf certificate, without its private key.
#[derive(Clone)]
pub struct IssuedCert {
    pub service: ServiceName,
    pub spiffe_id: SpiffeId,
    pub serial: Vec<u8>,
    /// The leaf followed by the intermediates a peer may need (cross-signed root
    /// during a rotation).
    pub chain: Vec<CertificateDer<'static>>,
    /// [`Self::chain`] as PEM, leaf first (Consul's `CertPEM`).
    pub cert_pem: String,
    pub valid_after: OffsetDateTime,
    pub valid_before: OffsetDateTime,
    /// The ID of the root that signed it.
    pub root_id: String,
    /// Monotonic per agent; `X-Consul-Index` of the leaf endpoint.
    pub index: Index,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial_hex())
            .field("valid_before", &self.valid_before)
            .field("root_id", &self.root_id)
            .field("index", &self.index)
            .finish()
    }
}

impl IssuedCert {
    /// The leaf certificate itself.
    pub fn cert(&self) -> &CertificateDer<'static> {
        // Invariant: `chain` is built leaf-first by the manager and never empty.
        &self.chain[0]
    }

    /// Consul's `SerialNumber`: colon-hex, lowercase.
    pub fn serial_hex(&self) -> String {
        pki::colon_hex(&self.serial)
    }
}

/// A leaf with the private key the agent generated for it. Never printed.
pub struct Leaf {
    pub cert: IssuedCert,
    key_pkcs8: Vec<u8>,
    /// SEC1 PEM (`EC PRIVATE KEY`), Consul's `PrivateKeyPEM`.
    key_pem: String,
    /// Ready for a rustls config (the proxy's cert resolver).
    pub certified_key: Arc<CertifiedKey>,
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl Leaf {
    pub fn new(cert: IssuedCert, key_pkcs8: Vec<u8>) -> Result<Self, Error> {
        let key_pem = pki::sec1_pem_from_pkcs8(&key_pkcs8)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.clone()));
        let signing =
            rustls::crypto::ring::sign::any_ecdsa_type(&der).map_err(|e| Error::LeafKey {
                reason: e.to_string(),
            })?;
        let certified_key = Arc::new(CertifiedKey::new(cert.chain.clone(), signing));
        Ok(Self {
            cert,
            key_pkcs8,
            key_pem,
            certified_key,
        })
    }

    /// The private key, PKCS#8 DER.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The private key as `EC PRIVATE KEY` PEM.
    pub fn private_key_pem(&self) -> &str {
        &self.key_pem
    }
}

/// Why a CSR was refused. The requester is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrRefusal {
    #[error("it is not a valid PKCS#10 request")]
    Malformed,
    #[error("its signature does not verify")]
    BadSignature,
    #[error("it names no URI SAN (SPIFFE ID)")]
    NoUriSan,
    #[error("it names {count} URI SANs; a leaf carries exactly one SPIFFE ID")]
    SeveralUriSans { count: usize },
    #[error("its URI SAN {uri:?} is not a service SPIFFE ID")]
    NotServiceId { uri: String },
    #[error("it asks for trust domain {requested}, but this CA signs for {ours}")]
    ForeignTrustDomain {
        requested: String,
        ours: TrustDomain,
    },
    #[error("it asks for datacenter {requested}, but this agent is in {ours}")]
    ForeignDatacenter { requested: String, ours: Datacenter },
    #[error("it asks for a CA certificate")]
    AsksForCa,
    #[error("its key is not ECDSA P-256")]
    UnsupportedKey,
}

/// A CSR that passed screening: the identity to sign and the key to certify.
#[derive(Debug)]
pub struct ScreenedCsr {
    pub id: SpiffeId,
    pub spki_der: Vec<u8>,
}

/// Checks a DER CSR: signature, one service SPIFFE ID of our trust domain and
/// datacenter, no CA request, a P-256 key. Only the key and the ID are taken from
/// it; everything else in the leaf is the CA's.
pub fn screen_csr(
    der: &[u8],
    trust_domain: &TrustDomain,
    datacenter: &Datacenter,
) -> Result<ScreenedCsr, CsrRefusal> {
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|_| CsrRefusal::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrRefusal::Malformed);
    }
    csr.verify_signature()
        .map_err(|_| CsrRefusal::BadSignature)?;
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrRefusal::AsksForCa),
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                return Err(CsrRefusal::AsksForCa);
            }
            ParsedExtension::SubjectAlternativeName(san) => {
                uris.extend(san.general_names.iter().filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                }))
            }
            _ => {}
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(CsrRefusal::NoUriSan),
        [one] => *one,
        many => return Err(CsrRefusal::SeveralUriSans { count: many.len() }),
    };
    // Check the trust domain before the ID's shape, so a foreign ID says so.
    if let Some(host) = uri
        .strip_prefix("spiffe://")
        .and_then(|r| r.split('/').next())
        && !host.eq_ignore_ascii_case(trust_domain.as_str())
    {
        return Err(CsrRefusal::ForeignTrustDomain {
            requested: host.chars().take(255).collect(),
            ours: trust_domain.clone(),
        });
    }
    let id: SpiffeId = uri.parse().map_err(|_| CsrRefusal::NotServiceId {
        uri: uri.chars().take(256).collect(),
    })?;
    if &id.datacenter != datacenter {
        return Err(CsrRefusal::ForeignDatacenter {
            requested: id.datacenter.to_string(),
            ours: datacenter.clone(),
        });
    }
    let spki = &csr.certification_request_info.subject_pki;
    let is_p256 = spki.algorithm.algorithm.as_bytes() == [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|oid| oid.as_bytes() == pki::OID_P256);
    if !is_p256 {
        return Err(CsrRefusal::UnsupportedKey);
    }
    Ok(ScreenedCsr {
        id,
        spki_der: spki.raw.to_vec(),
    })
}

/// How long from `now` until a leaf valid over `[valid_after, valid_before]` is
/// renewed, at `fraction` (drawn in [`RENEW_MIN_FRACTION`, `RENEW_MAX_FRACTION`])
/// of its lifetime; zero when that point has passed.
pub fn renewal_delay(
    valid_after: OffsetDateTime,
    valid_before: OffsetDateTime,
    now: OffsetDateTime,
    fraction: f64,
) -> Duration {
    let lifetime = (valid_before - valid_after).max(time::Duration::ZERO);
    let at = valid_after + lifetime * fraction.clamp(0.0, 1.0);
    let left = at - now;
    if left.is_positive() {
        Duration::try_from(left).unwrap_or(Duration::ZERO)
    } else {
        Duration::ZERO
    }
}

/// A random renewal fraction in Consul's window.
pub fn renewal_fraction() -> f64 {
    RENEW_MIN_FRACTION + rand::random::<f64>() * (RENEW_MAX_FRACTION - RENEW_MIN_FRACTION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_delays() {
        let t0 = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
        let h = time::Duration::hours(1);
        let cases = [
            // (now offset from t0, fraction, expected delay)
            (time::Duration::ZERO, 0.6, Duration::from_secs(6 * 3600)),
            (time::Duration::ZERO, 0.9, Duration::from_secs(9 * 3600)),
            (h * 5, 0.6, Duration::from_secs(3600)),
            (h * 7, 0.6, Duration::ZERO),
            (h * 20, 0.9, Duration::ZERO),
        ];
        for (off, frac, want) in cases {
            assert_eq!(
                renewal_delay(t0, t0 + h * 10, t0 + off, frac),
                want,
                "{off} {frac}"
            );
        }
        for _ in 0..100 {
            let f = renewal_fraction();
            assert!((RENEW_MIN_FRACTION..RENEW_MAX_FRACTION).contains(&f));
        }
    }
}
