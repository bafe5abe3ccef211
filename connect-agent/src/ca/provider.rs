//! The [`CaProvider`] seam and the built-in provider ([`BuiltinProvider`], rcgen).
//!
//! A provider makes roots and hands out a [`Signer`] for a root; the signer issues
//! leaves and cross-signs the next root. Providers know certificates and keys, not
//! the store, the trust bundle or renewal (those are the manager's). Requests are
//! already checked (the SPIFFE ID is typed, the CSR screened); the provider only
//! writes the certificate the request describes.

use std::{fmt, sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{
    Error,
    config::{KeyType, SecretPem},
    pki,
};
use crate::identity::{SpiffeId, TrustDomain};

/// How far back NotBefore is set, to absorb clock skew between nodes (Consul: 1m).
pub const BACKDATE: Duration = Duration::from_secs(60);

/// What a new root should be.
#[derive(Debug)]
pub struct RootRequest<'a> {
    pub trust_domain: &'a TrustDomain,
    pub cluster_id: &'a uuid::Uuid,
    pub ttl: Duration,
    pub key_type: KeyType,
    /// The operator's own CA key; `None` = generate one.
    pub private_key: Option<&'a SecretPem>,
    pub now: OffsetDateTime,
}

/// A new root: its certificate and its key (PKCS#8 PEM, for the store only).
pub struct GeneratedRoot {
    pub cert_der: CertificateDer<'static>,
    pub serial: u64,
    /// The key's actual type (a supplied key decides it, not the configuration).
    pub key_type: KeyType,
    pub key_pem: SecretPem,
}

impl fmt::Debug for GeneratedRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedRoot")
            .field("id", &pki::fingerprint(&self.cert_der))
            .finish_non_exhaustive()
    }
}

/// What a leaf should say. The public key is a DER SubjectPublicKeyInfo.
#[derive(Debug)]
pub struct LeafRequest<'a> {
    pub id: &'a SpiffeId,
    pub spki_der: &'a [u8],
    pub serial: &'a [u8],
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// Makes roots and signers. Implementations: the built-in CA; later external PKI
/// files or Vault.
pub trait CaProvider: Send + Sync + fmt::Debug + 'static {
    /// The `Provider` name in the CA configuration.
    fn name(&self) -> &'static str;

    /// A new self-signed root for the trust domain.
    fn generate_root(&self, req: &RootRequest<'_>) -> Result<GeneratedRoot, Error>;

    /// A signer for a root made by [`CaProvider::generate_root`].
    fn signer(
        &self,
        root: &CertificateDer<'static>,
        key_pem: &SecretPem,
    ) -> Result<Arc<dyn Signer>, Error>;
}

/// Signs with one root's key.
pub trait Signer: Send + Sync + fmt::Debug {
    /// Issues a leaf for `req`.
    fn sign_leaf(&self, req: &LeafRequest<'_>) -> Result<CertificateDer<'static>, Error>;

    /// Cross-signs another CA certificate (the next root) with this root, so peers
    /// that trust only this root accept leaves of the next one.
    fn cross_sign(
        &self,
        ca_cert: &CertificateDer<'_>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<CertificateDer<'static>, Error>;
}

/// Consul's built-in CA: keys in the store, certificates made with rcgen.
#[derive(Debug, Default, Clone, Copy)]
pub struct BuiltinProvider;

impl CaProvider for BuiltinProvider {
    fn name(&self) -> &'static str {
        super::config::PROVIDER_CONSUL
    }

    fn generate_root(&self, req: &RootRequest<'_>) -> Result<GeneratedRoot, Error> {
        let key = match req.private_key {
            Some(pem) => {
                let der = pki::ec_pkcs8_from_pem("CA PrivateKey", &pem.0)?;
                KeyPair::try_from(der.as_slice()).map_err(|source| Error::Crypto {
                    op: "load the configured CA PrivateKey",
                    source,
                })?
            }
            None => KeyPair::generate_for(match req.key_type {
                KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
                KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            })
            .map_err(|source| Error::Crypto {
                op: "generate a CA key",
                source,
            })?,
        };
        let key_type = if key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 {
            KeyType::EcP256
        } else if key.algorithm() == &rcgen::PKCS_ECDSA_P384_SHA384 {
            KeyType::EcP384
        } else {
            return Err(Error::InvalidConfig {
                field: "PrivateKey",
                reason: "the built-in CA takes EC P-256 or P-384 keys only".to_owned(),
            });
        };
        let serial = pki::random_root_serial();
        let mut p = CertificateParams::default();
        p.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        p.not_before = req.now - BACKDATE;
        p.not_after = req.now + req.ttl;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, root_common_name(req.cluster_id));
        p.subject_alt_names = vec![SanType::URI(
            req.trust_domain
                .spiffe_uri()
                .try_into()
                .map_err(|source| Error::Crypto {
                    op: "encode the root's URI SAN",
                    source,
                })?,
        )];
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.use_authority_key_identifier_extension = true;
        p.key_identifier_method =
            KeyIdMethod::PreSpecified(pki::ca_key_id(&key.subject_public_key_info()));
        let cert = p.self_signed(&key).map_err(|source| Error::Crypto {
            op: "self-sign the root",
            source,
        })?;
        Ok(GeneratedRoot {
            cert_der: cert.der().clone(),
            serial,
            key_type,
            key_pem: SecretPem(key.serialize_pem()),
        })
    }

    fn signer(
        &self,
        root: &CertificateDer<'static>,
        key_pem: &SecretPem,
    ) -> Result<Arc<dyn Signer>, Error> {
        let der = pki::ec_pkcs8_from_pem("stored CA key", &key_pem.0)?;
        let key = KeyPair::try_from(der.as_slice()).map_err(|source| Error::Crypto {
            op: "load the stored CA key",
            source,
        })?;
        let (_, x509) = X509Certificate::from_der(root).map_err(|e| Error::BadCertificate {
            what: "stored root",
            reason: e.to_string(),
        })?;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(Error::BadCertificate {
                what: "stored root",
                reason: "its public key does not match the stored CA key".to_owned(),
            });
        }
        check_single_valued_names(&x509)?;
        let issuer = Issuer::from_ca_cert_der(root, key).map_err(|source| Error::Crypto {
            op: "load the root as an issuer",
            source,
        })?;
        Ok(Arc::new(BuiltinSigner {
            issuer,
            root_id: pki::fingerprint(root),
        }))
    }
}

/// The subject of a root: Consul's `pri-<uid>.consul.ca.<cluster id prefix>.consul`.
fn root_common_name(cluster_id: &uuid::Uuid) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let uid: String = (0..8)
        .map(|_| ALPHABET[rand::random::<usize>() % ALPHABET.len()] as char)
        .collect();
    let cluster = cluster_id.simple().to_string();
    format!("pri-{uid}.consul.ca.{}.consul", &cluster[..8])
}

/// rcgen panics on a name whose RDN set is empty and refuses multi-valued ones; make
/// both an error before it sees the certificate.
fn check_single_valued_names(x509: &X509Certificate<'_>) -> Result<(), Error> {
    if x509.subject().iter().any(|rdn| rdn.iter().count() != 1) {
        return Err(Error::BadCertificate {
            what: "CA certificate",
            reason: "its subject has an empty or multi-valued RDN".to_owned(),
        });
    }
    Ok(())
}

struct BuiltinSigner {
    issuer: Issuer<'static, KeyPair>,
    root_id: String,
}

impl fmt::Debug for BuiltinSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuiltinSigner")
            .field("root_id", &self.root_id)
            .finish_non_exhaustive()
    }
}

impl Signer for BuiltinSigner {
    fn sign_leaf(&self, req: &LeafRequest<'_>) -> Result<CertificateDer<'static>, Error> {
        let crypto = |op| move |source| Error::Crypto { op, source };
        let spki = rcgen::SubjectPublicKeyInfo::from_der(req.spki_der)
            .map_err(crypto("read the leaf's public key"))?;
        let mut p = CertificateParams::default();
        p.serial_number = Some(SerialNumber::from_slice(req.serial));
        p.not_before = req.not_before;
        p.not_after = req.not_after;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, req.id.service.as_str());
        p.subject_alt_names = vec![
            SanType::URI(
                req.id
                    .to_string()
                    .try_into()
                    .map_err(crypto("encode the URI SAN"))?,
            ),
            SanType::DnsName(
                leaf_dns_name(req.id)
                    .try_into()
                    .map_err(crypto("encode the DNS SAN"))?,
            ),
        ];
        p.is_ca = IsCa::ExplicitNoCa;
        // SPIFFE X.509-SVID §4.3: digitalSignature required; keyEncipherment and
        // keyAgreement allowed; no CA usages.
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&spki, &self.issuer)
            .map_err(crypto("sign the leaf"))?;
        Ok(cert.der().clone())
    }

    fn cross_sign(
        &self,
        ca_cert: &CertificateDer<'_>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<CertificateDer<'static>, Error> {
        let bad = |reason: String| Error::BadCertificate {
            what: "root to cross-sign",
            reason,
        };
        let (_, x509) = X509Certificate::from_der(ca_cert).map_err(|e| bad(e.to_string()))?;
        check_single_valued_names(&x509)?;
        let spki =
            rcgen::SubjectPublicKeyInfo::from_der(x509.public_key().raw).map_err(|source| {
                Error::Crypto {
                    op: "read the public key of the root to cross-sign",
                    source,
                }
            })?;
        let skid = x509
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(k.0.to_vec())
                }
                _ => None,
            })
            .ok_or_else(|| bad("it has no SubjectKeyIdentifier".to_owned()))?;
        let uris: Vec<String> = x509
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut p = CertificateParams::default();
        p.serial_number = Some(SerialNumber::from_slice(&pki::random_serial()));
        p.not_before = not_before;
        p.not_after = not_after;
        p.distinguished_name = dn_from_x509(x509.subject()).map_err(bad)?;
        p.subject_alt_names = uris
            .into_iter()
            .map(|u| {
                u.try_into()
                    .map(SanType::URI)
                    .map_err(|source| Error::Crypto {
                        op: "encode the cross-signed URI SAN",
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.use_authority_key_identifier_extension = true;
        p.key_identifier_method = KeyIdMethod::PreSpecified(skid);
        let cert = p
            .signed_by(&spki, &self.issuer)
            .map_err(|source| Error::Crypto {
                op: "cross-sign the new root",
                source,
            })?;
        Ok(cert.der().clone())
    }
}

/// The DNS SAN of a service leaf, `<service>.svc.<trust-domain>` in lower case: the
/// SNI that proxies send (DESIGN "A connection, end to end").
pub fn leaf_dns_name(id: &SpiffeId) -> String {
    crate::identity::service_dns_name(&id.service, &id.trust_domain)
}

/// Rebuilds a subject for rcgen keeping each value's string type, so the bytes
/// match the original (path building compares names byte for byte).
fn dn_from_x509(name: &x509_parser::x509::X509Name<'_>) -> Result<DistinguishedName, String> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let attr = rdn.iter().next().ok_or("an RDN is empty")?;
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or("an attribute type is not a valid OID")?
            .collect();
        let data = attr.attr_value().data;
        let text = || std::str::from_utf8(data).map_err(|_| "a name is not UTF-8".to_owned());
        let value = match attr.attr_value().header.tag() {
            Tag::PrintableString => DnValue::PrintableString(
                text()?
                    .try_into()
                    .map_err(|e: rcgen::Error| e.to_string())?,
            ),
            Tag::Ia5String => DnValue::Ia5String(
                text()?
                    .try_into()
                    .map_err(|e: rcgen::Error| e.to_string())?,
            ),
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            other => return Err(format!("a name uses an unsupported string type {other}")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}
