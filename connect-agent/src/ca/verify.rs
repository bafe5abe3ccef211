//! The peer-certificate validator: given a peer's chain and the trust bundle, the
//! verified SPIFFE ID or a typed reason why not.
//!
//! Path building, signatures, validity periods, basic constraints and extended key
//! usage are checked by webpki (rustls' verifier, fuzzed and widely deployed); on top
//! of that this module applies the SPIFFE X.509-SVID rules (exactly one URI SAN, a
//! service ID of our trust domain, leaf key usage). It is a pure function over
//! in-memory data, fast enough for every handshake, and the core of the rustls
//! verifiers in `ca::tls`. It does not fetch bundles or know intentions.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
};

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::{
    extensions::{GeneralName, ParsedExtension},
    prelude::{FromDer, X509Certificate},
};

use crate::{
    identity::{SpiffeId, TrustDomain},
    store::Index,
};

/// Signature algorithms accepted in peer chains: ECDSA (our CA) plus the ones rustls'
/// ring provider verifies, for operator-supplied PKIs later.
static SIG_ALGS: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
];

/// Longest peer chain considered: leaf plus a few intermediates (a cross-signed root
/// during rotation is one). Longer chains are refused before any parsing.
pub const MAX_CHAIN_LEN: usize = 8;

/// Which side of a TLS connection the peer is: decides the extended key usage its
/// leaf must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// The peer is a TLS client (our inbound listener checks it): clientAuth.
    Client,
    /// The peer is a TLS server (our outbound dialer checks it): serverAuth.
    Server,
}

/// The roots a peer's chain must lead to, for one trust domain. Built once per CA
/// change and shared behind an `Arc`; verifying reads it without I/O.
///
/// It also remembers the leaves it verified lately ([`TrustBundle::verify`]), so
/// that a peer presenting the same certificate again costs a hash lookup, not a
/// signature check: every resumed TLS session re-presents its certificate, and a
/// busy client presents the same one on every full handshake. A new bundle (a
/// root rotation, a new CA) starts with an empty memory.
pub struct TrustBundle {
    trust_domain: TrustDomain,
    active_root_id: String,
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    index: Index,
    verified: Mutex<HashMap<VerifiedKey, Verified>>,
}

impl Clone for TrustBundle {
    fn clone(&self) -> Self {
        Self {
            trust_domain: self.trust_domain.clone(),
            active_root_id: self.active_root_id.clone(),
            roots: self.roots.clone(),
            anchors: self.anchors.clone(),
            index: self.index,
            verified: Mutex::new(HashMap::new()),
        }
    }
}

/// Leaves a bundle remembers as verified; at this size the memory is forgotten
/// at once (about 1 MiB at most, and refilled by the next handshakes).
pub const VERIFIED_MEMORY: usize = 4096;

/// A verified leaf: the SHA-256 of its DER and the role it was verified for.
type VerifiedKey = ([u8; 32], PeerRole);

/// What a verification established, and until when it holds.
#[derive(Debug, Clone)]
struct Verified {
    id: SpiffeId,
    not_before: u64,
    not_after: u64,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("active_root_id", &self.active_root_id)
            .field("roots", &self.roots.len())
            .field("index", &self.index)
            .finish()
    }
}

impl TrustBundle {
    /// A bundle of `roots` (DER) for `trust_domain`. A root webpki cannot use as an
    /// anchor is an error: the bundle would silently trust less than it says.
    pub fn new(
        trust_domain: TrustDomain,
        active_root_id: String,
        roots: Vec<CertificateDer<'static>>,
        index: Index,
    ) -> Result<Self, VerifyError> {
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|source| VerifyError::Malformed { source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            trust_domain,
            active_root_id,
            roots,
            anchors,
            index,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// [`verify_chain`] against this bundle, remembering a verified leaf that
    /// came without intermediates (our CA's leaves are signed by a root directly)
    /// so that the same certificate, for the same role, within its validity, is
    /// accepted again without the signature check and the X.509 parse. Chains
    /// with intermediates are verified every time.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
    ) -> Result<SpiffeId, VerifyError> {
        let [leaf] = chain else {
            return verify_chain(chain, self, now, role);
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, leaf);
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        let key = (key, role);
        let at = now.as_secs();
        if let Some(v) = self.memory().get(&key)
            && (v.not_before..v.not_after).contains(&at)
        {
            return Ok(v.id.clone());
        }
        let id = verify_chain(chain, self, now, role)?;
        // verify_chain checked the validity period, so the leaf parses.
        if let Some((not_before, not_after)) = validity(leaf) {
            let mut memory = self.memory();
            if memory.len() >= VERIFIED_MEMORY {
                memory.clear();
            }
            memory.insert(
                key,
                Verified {
                    id: id.clone(),
                    not_before,
                    not_after,
                },
            );
        }
        Ok(id)
    }

    /// Leaves remembered as verified now.
    pub fn verified_len(&self) -> usize {
        self.memory().len()
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, HashMap<VerifiedKey, Verified>> {
        // Inserts and clears of ready values: a poisoned map is still consistent.
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The ID (SHA-1 colon-hex) of the root that signs new leaves.
    pub fn active_root_id(&self) -> &str {
        &self.active_root_id
    }

    /// Every trusted root, active and rotated-out alike, as DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The store index of the roots this bundle was built from.
    pub fn index(&self) -> Index {
        self.index
    }

    /// The roots as a rustls store (for clients of other libraries that want one).
    pub fn root_store(&self) -> rustls::RootCertStore {
        rustls::RootCertStore {
            roots: self.anchors.clone(),
        }
    }
}

/// Why a peer's chain was refused. The peer (or its CA) is at fault in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the peer sent no certificate")]
    EmptyChain,
    #[error("the peer sent {len} certificates, more than the {max} accepted")]
    ChainTooLong { len: usize, max: usize },
    #[error("the peer certificate is malformed: {source}")]
    Malformed {
        #[source]
        source: webpki::Error,
    },
    #[error("the peer certificate does not chain to a root of the trust bundle")]
    UnknownRoot,
    #[error("a signature in the peer chain does not verify")]
    BadSignature,
    #[error("the peer certificate expired (not after {not_after}, now {now}, unix seconds)")]
    Expired { not_after: u64, now: u64 },
    #[error(
        "the peer certificate is not valid yet (not before {not_before}, now {now}, unix seconds)"
    )]
    NotYetValid { not_before: u64, now: u64 },
    #[error("the peer identity {id} is of trust domain {found}, not ours ({expected})")]
    WrongTrustDomain {
        id: String,
        found: String,
        expected: TrustDomain,
    },
    #[error("the peer certificate carries no URI SAN (SPIFFE ID)")]
    NoUriSan,
    #[error("the peer certificate carries {count} URI SANs; an X.509-SVID has exactly one")]
    SeveralUriSans { count: usize },
    #[error("the peer's URI SAN {uri:?} is not a service SPIFFE ID")]
    NotServiceId { uri: String },
    #[error("the peer presented a CA certificate as its leaf")]
    CaAsLeaf,
    #[error("the peer certificate's key usage is wrong: {reason}")]
    WrongKeyUsage { reason: &'static str },
    #[error("the peer chain was refused: {source}")]
    Rejected {
        #[source]
        source: webpki::Error,
    },
}

/// Verifies `chain` (leaf first, then any intermediates the peer sent) against
/// `bundle` at `now`, for a peer in `role`, and returns the leaf's SPIFFE ID.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, VerifyError> {
    let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::EmptyChain)?;
    if chain.len() > MAX_CHAIN_LEN {
        return Err(VerifyError::ChainTooLong {
            len: chain.len(),
            max: MAX_CHAIN_LEN,
        });
    }
    let ee = EndEntityCert::try_from(leaf).map_err(map_webpki)?;
    let usage = match role {
        PeerRole::Client => KeyUsage::client_auth(),
        PeerRole::Server => KeyUsage::server_auth(),
    };
    ee.verify_for_usage(
        SIG_ALGS,
        &bundle.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(map_webpki)?;
    let id = leaf_identity(leaf)?;
    if id.trust_domain != bundle.trust_domain {
        return Err(VerifyError::WrongTrustDomain {
            id: id.to_string(),
            found: id.trust_domain.to_string(),
            expected: bundle.trust_domain.clone(),
        });
    }
    Ok(id)
}

/// The SPIFFE ID of a leaf, with the X.509-SVID leaf rules (one URI SAN, a service
/// ID, not a CA, digitalSignature and no CA key usage). Checks no signature: call
/// it on a certificate [`verify_chain`] accepted (e.g. rustls' peer certificate).
pub fn leaf_identity(leaf: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    let (_, x509) = X509Certificate::from_der(leaf).map_err(|_| VerifyError::Malformed {
        source: webpki::Error::BadDer,
    })?;
    let mut uris = Vec::new();
    let mut ku = None;
    for ext in x509.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                uris.extend(san.general_names.iter().filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                }))
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(VerifyError::CaAsLeaf),
            ParsedExtension::KeyUsage(k) => ku = Some(*k),
            _ => {}
        }
    }
    if let Some(ku) = ku {
        if !ku.digital_signature() {
            return Err(VerifyError::WrongKeyUsage {
                reason: "digitalSignature is not set",
            });
        }
        if ku.key_cert_sign() || ku.crl_sign() {
            return Err(VerifyError::WrongKeyUsage {
                reason: "a leaf may not have keyCertSign or cRLSign",
            });
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(VerifyError::NoUriSan),
        [one] => *one,
        many => return Err(VerifyError::SeveralUriSans { count: many.len() }),
    };
    uri.parse::<SpiffeId>()
        .map_err(|_| VerifyError::NotServiceId {
            uri: uri.chars().take(256).collect(),
        })
}

/// A leaf's validity period as `[not_before, not_after)` in Unix seconds; webpki
/// accepts `not_after` itself, so the end is one past it.
fn validity(leaf: &CertificateDer<'_>) -> Option<(u64, u64)> {
    let (_, x509) = X509Certificate::from_der(leaf).ok()?;
    let v = x509.validity();
    let nb = u64::try_from(v.not_before.timestamp()).ok()?;
    let na = u64::try_from(v.not_after.timestamp()).ok()?;
    Some((nb, na.saturating_add(1)))
}

fn map_webpki(e: webpki::Error) -> VerifyError {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => VerifyError::UnknownRoot,
        W::InvalidSignatureForPublicKey
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | W::SignatureAlgorithmMismatch => VerifyError::BadSignature,
        W::CertExpired { time, not_after } => VerifyError::Expired {
            not_after: not_after.as_secs(),
            now: time.as_secs(),
        },
        W::CertNotValidYet { time, not_before } => VerifyError::NotYetValid {
            not_before: not_before.as_secs(),
            now: time.as_secs(),
        },
        W::CaUsedAsEndEntity => VerifyError::CaAsLeaf,
        W::RequiredEkuNotFoundContext(_) | W::EmptyEkuExtension => VerifyError::WrongKeyUsage {
            reason: "the extended key usage does not allow this TLS role",
        },
        W::BadDer | W::BadDerTime | W::TrailingData(_) | W::MalformedExtensions => {
            VerifyError::Malformed { source: e }
        }
        other => VerifyError::Rejected { source: other },
    }
}

/// The bundle a verifier reads; `Arc` so a handshake takes it without copying.
pub type SharedBundle = Arc<TrustBundle>;

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };

    use super::*;
    use crate::ca::testing::TestCa;

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn a_good_leaf_verifies_for_both_roles() {
        let ca = TestCa::new();
        let leaf = ca.sign(&ca.leaf_params("web"));
        for role in [PeerRole::Client, PeerRole::Server] {
            let id = verify_chain(std::slice::from_ref(&leaf.cert), &ca.bundle, now(), role)
                .expect("valid leaf");
            assert_eq!(id, ca.id("web"));
        }
    }

    /// One certificate per validator error, each carrying exactly that defect.
    #[test]
    fn each_defect_has_its_error() {
        let ca = TestCa::new();
        let other = TestCa::new();
        let hour: time::Duration = time::Duration::hours(1);
        let t: time::OffsetDateTime = time::OffsetDateTime::now_utc();

        type Edit = fn(&mut rcgen::CertificateParams, &TestCa);
        type Want = fn(&VerifyError) -> bool;
        let templated: Vec<(&str, Edit, PeerRole, Want)> = vec![
            (
                "expired",
                |p, _| {
                    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(3);
                    p.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
                },
                PeerRole::Client,
                |e| matches!(e, VerifyError::Expired { .. }),
            ),
            (
                "not yet valid",
                |p, _| {
                    p.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(1);
                    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(2);
                },
                PeerRole::Client,
                |e| matches!(e, VerifyError::NotYetValid { .. }),
            ),
            (
                "wrong trust domain",
                |p, _| {
                    p.subject_alt_names = vec![SanType::URI(
                        "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web"
                            .try_into()
                            .expect("uri"),
                    )];
                },
                PeerRole::Client,
                |e| matches!(e, VerifyError::WrongTrustDomain { .. }),
            ),
            (
                "no URI SAN",
                |p, _| {
                    p.subject_alt_names =
                        vec![SanType::DnsName("web.example".try_into().expect("dns"))];
                },
                PeerRole::Client,
                |e| matches!(e, VerifyError::NoUriSan),
            ),
            (
                "several URI SANs",
                |p, ca| {
                    p.subject_alt_names = vec![
                        SanType::URI(ca.id("web").to_string().try_into().expect("uri")),
                        SanType::URI(ca.id("db").to_string().try_into().expect("uri")),
                    ];
                },
                PeerRole::Client,
                |e| matches!(e, VerifyError::SeveralUriSans { count: 2 }),
            ),
            (
                "not a service ID",
                |p, ca| {
                    p.subject_alt_names = vec![SanType::URI(
                        format!("spiffe://{}/agent/client/dc/dc1/id/n1", ca.trust_domain)
                            .try_into()
                            .expect("uri"),
                    )];
                },
                PeerRole::Client,
                |e| matches!(e, VerifyError::NotServiceId { .. }),
            ),
            (
                "CA certificate as leaf",
                |p, _| {
                    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                    p.key_usages = vec![
                        KeyUsagePurpose::KeyCertSign,
                        KeyUsagePurpose::DigitalSignature,
                    ];
                },
                PeerRole::Client,
                |e| matches!(e, VerifyError::CaAsLeaf),
            ),
            (
                "server-only EKU presented by a client",
                |p, _| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth],
                PeerRole::Client,
                |e| matches!(e, VerifyError::WrongKeyUsage { .. }),
            ),
            (
                "client-only EKU presented by a server",
                |p, _| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
                PeerRole::Server,
                |e| matches!(e, VerifyError::WrongKeyUsage { .. }),
            ),
            (
                "keyCertSign on a leaf",
                |p, _| {
                    p.key_usages = vec![
                        KeyUsagePurpose::DigitalSignature,
                        KeyUsagePurpose::KeyCertSign,
                    ]
                },
                PeerRole::Client,
                |e| matches!(e, VerifyError::WrongKeyUsage { .. }),
            ),
            (
                "no digitalSignature",
                |p, _| p.key_usages = vec![KeyUsagePurpose::KeyAgreement],
                PeerRole::Client,
                |e| matches!(e, VerifyError::WrongKeyUsage { .. }),
            ),
        ];
        for (name, edit, role, want) in templated {
            let mut p = ca.leaf_params("web");
            edit(&mut p, &ca);
            let leaf = ca.sign(&p);
            let got = verify_chain(std::slice::from_ref(&leaf.cert), &ca.bundle, now(), role);
            match got {
                Err(e) if want(&e) => {}
                other => panic!("{name}: unexpected {other:?}"),
            }
        }

        // Unknown root: a correct leaf from another CA.
        let foreign = other.sign(&other.leaf_params("web"));
        assert_eq!(
            verify_chain(&[foreign.cert], &ca.bundle, now(), PeerRole::Client),
            Err(VerifyError::UnknownRoot)
        );

        // Bad signature: names our root as issuer, signed by another key.
        let forger = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let forged = ca.sign_claiming_root(&ca.leaf_params("web"), &forger);
        assert_eq!(
            verify_chain(&[forged.cert], &ca.bundle, now(), PeerRole::Client),
            Err(VerifyError::BadSignature)
        );

        // The root itself presented as a leaf.
        assert_eq!(
            verify_chain(
                std::slice::from_ref(&ca.root),
                &ca.bundle,
                now(),
                PeerRole::Client
            ),
            Err(VerifyError::CaAsLeaf)
        );

        // Time is the caller's: a valid leaf checked a day later is expired.
        let leaf = ca.sign(&ca.leaf_params("web"));
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            (t + hour * 48_i32).unix_timestamp() as u64,
        ));
        assert!(matches!(
            verify_chain(&[leaf.cert], &ca.bundle, later, PeerRole::Client),
            Err(VerifyError::Expired { .. })
        ));

        assert_eq!(
            verify_chain(&[], &ca.bundle, now(), PeerRole::Client),
            Err(VerifyError::EmptyChain)
        );
        let long = vec![ca.root.clone(); MAX_CHAIN_LEN + 1];
        assert!(matches!(
            verify_chain(&long, &ca.bundle, now(), PeerRole::Client),
            Err(VerifyError::ChainTooLong { .. })
        ));
        assert!(matches!(
            verify_chain(
                &[CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01])],
                &ca.bundle,
                now(),
                PeerRole::Client
            ),
            Err(VerifyError::Malformed { .. })
        ));
    }

    /// The bundle's memory of verified leaves saves work, never a check: time,
    /// role, other bundles and failures are all still seen.
    #[test]
    fn remembered_leaves_still_expire_and_failures_are_not_remembered() {
        let ca = TestCa::new();
        let leaf = ca.sign(&ca.leaf_params("web"));
        let chain = std::slice::from_ref(&leaf.cert);
        assert_eq!(
            ca.bundle.verify(chain, now(), PeerRole::Client),
            Ok(ca.id("web"))
        );
        assert_eq!(ca.bundle.verified_len(), 1);
        // Again: the same answer, from memory.
        assert_eq!(
            ca.bundle.verify(chain, now(), PeerRole::Client),
            Ok(ca.id("web"))
        );
        assert_eq!(ca.bundle.verified_len(), 1);
        // Another role is verified (and remembered) on its own.
        assert_eq!(
            ca.bundle.verify(chain, now(), PeerRole::Server),
            Ok(ca.id("web"))
        );
        assert_eq!(ca.bundle.verified_len(), 2);

        // Past its not_after, a remembered leaf is expired like any other.
        let (_, not_after) = validity(&leaf.cert).expect("validity");
        let after = UnixTime::since_unix_epoch(std::time::Duration::from_secs(not_after));
        let last = UnixTime::since_unix_epoch(std::time::Duration::from_secs(not_after - 1));
        assert_eq!(
            ca.bundle.verify(chain, last, PeerRole::Client),
            Ok(ca.id("web"))
        );
        assert!(matches!(
            ca.bundle.verify(chain, after, PeerRole::Client),
            Err(VerifyError::Expired { .. })
        ));
        // So is one before its not_before.
        let (not_before, _) = validity(&leaf.cert).expect("validity");
        let before = UnixTime::since_unix_epoch(std::time::Duration::from_secs(not_before - 1));
        assert!(matches!(
            ca.bundle.verify(chain, before, PeerRole::Client),
            Err(VerifyError::NotYetValid { .. })
        ));

        // A leaf of another CA fails every time and is not remembered.
        let other = TestCa::new();
        let foreign = other.sign(&other.leaf_params("web"));
        for _ in 0..2 {
            assert_eq!(
                ca.bundle
                    .verify(std::slice::from_ref(&foreign.cert), now(), PeerRole::Client),
                Err(VerifyError::UnknownRoot)
            );
        }
        assert_eq!(ca.bundle.verified_len(), 2);

        // Another bundle (a rotation builds a new one) remembers nothing of this
        // one: the leaf is checked against its roots.
        assert_eq!(
            other.bundle.verify(chain, now(), PeerRole::Client),
            Err(VerifyError::UnknownRoot)
        );
        assert_eq!(ca.bundle.clone().verified_len(), 0);
    }
}
