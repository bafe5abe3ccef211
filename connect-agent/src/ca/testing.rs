//! A throwaway CA for tests (this crate's, the proxy's, integration tests): a root
//! made by the built-in provider, its trust bundle, and certificates built from
//! editable rcgen templates so a test can give a leaf exactly the defect it needs.

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use super::{
    config::{KeyType, SecretPem},
    pki,
    provider::{BuiltinProvider, CaProvider, RootRequest},
    verify::TrustBundle,
};
use crate::identity::{Datacenter, ServiceName, SpiffeId, TrustDomain};

/// A root, its key and its bundle.
#[derive(Debug)]
pub struct TestCa {
    pub trust_domain: TrustDomain,
    pub root: CertificateDer<'static>,
    pub root_key_pem: String,
    pub bundle: TrustBundle,
}

/// A certificate and the key it certifies.
#[derive(Debug)]
pub struct TestCert {
    pub cert: CertificateDer<'static>,
    pub key: KeyPair,
}

impl TestCa {
    /// A fresh CA with a random trust domain.
    pub fn new() -> Self {
        let cluster = uuid::Uuid::new_v4();
        let td = TrustDomain::for_cluster(&cluster);
        let root = BuiltinProvider
            .generate_root(&RootRequest {
                trust_domain: &td,
                cluster_id: &cluster,
                ttl: std::time::Duration::from_secs(10 * 365 * 24 * 3600),
                key_type: KeyType::EcP256,
                private_key: None,
                now: OffsetDateTime::now_utc(),
            })
            .expect("test root");
        let bundle = TrustBundle::new(
            td.clone(),
            pki::fingerprint(&root.cert_der),
            vec![root.cert_der.clone()],
            1,
        )
        .expect("test bundle");
        let SecretPem(root_key_pem) = root.key_pem;
        Self {
            trust_domain: td,
            root: root.cert_der,
            root_key_pem,
            bundle,
        }
    }

    /// The SPIFFE ID of `service` in dc1.
    pub fn id(&self, service: &str) -> SpiffeId {
        SpiffeId::service(
            self.trust_domain.clone(),
            Datacenter::default(),
            service.parse::<ServiceName>().expect("test service name"),
        )
    }

    /// A correct leaf template for `service`, valid from a minute ago for a day.
    pub fn leaf_params(&self, service: &str) -> CertificateParams {
        let now = OffsetDateTime::now_utc();
        let mut p = CertificateParams::default();
        p.serial_number = Some(SerialNumber::from_slice(&pki::random_serial()));
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::days(1);
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, service);
        p.subject_alt_names = vec![SanType::URI(
            self.id(service).to_string().try_into().expect("uri"),
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p
    }

    /// Signs `params` over a new P-256 key with this CA's root.
    pub fn sign(&self, params: &CertificateParams) -> TestCert {
        self.sign_claiming_root(params, &self.root_key())
    }

    /// Signs `params` naming this CA's root as issuer but signing with `key`:
    /// a forged certificate whose signature does not verify.
    pub fn sign_claiming_root(&self, params: &CertificateParams, key: &KeyPair) -> TestCert {
        let issuer = Issuer::from_ca_cert_der(&self.root, key).expect("issuer");
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let cert = params.signed_by(&leaf_key, &issuer).expect("sign");
        TestCert {
            cert: cert.der().clone(),
            key: leaf_key,
        }
    }

    /// The root's private key.
    pub fn root_key(&self) -> KeyPair {
        KeyPair::from_pem(&self.root_key_pem).expect("root key")
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}
