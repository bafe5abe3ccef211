//! A server certificate for the agent's own HTTPS API, signed by the active root.
//!
//! Service leaves name a SPIFFE service and the SNI form `<svc>.svc.<td>`; an HTTP
//! client checks a host name instead. This certificate carries DNS SAN `localhost`
//! and IP SANs for loopback and the HTTPS address (Consul gives its agent
//! certificates the same), serverAuth only, and chains to the roots that
//! `GET /v1/connect/ca/roots?pem=true` hands out, so a client's `-ca-file` is that
//! bundle. The key is made here and never stored: the API asks again after a
//! restart, on rotation and before expiry (`api::https` does that).

use std::{net::IpAddr, time::Duration};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::{Error, pki, provider::BACKDATE, state::CaState};
use crate::store::Store;

/// A certificate (chain first to last) and its key for the HTTPS API.
pub struct ApiCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The root that signed it: a new active root means a new certificate.
    pub root_id: String,
}

impl std::fmt::Debug for ApiCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiCert")
            .field("not_after", &self.not_after)
            .field("root_id", &self.root_id)
            .finish_non_exhaustive()
    }
}

/// Issues the HTTPS API's certificate for `ips` (besides loopback) with the active
/// root of `state`, whose key is read from `store`.
pub async fn issue_api_cert(
    store: &dyn Store,
    state: &CaState,
    ips: &[IpAddr],
    ttl: Duration,
) -> Result<ApiCert, Error> {
    let root = state.active_root();
    let key_key = super::state::private_key_key(root.id());
    let kv = store
        .get(&key_key)
        .await?
        .ok_or_else(|| Error::CorruptRecord {
            key: key_key.clone(),
            reason: "the active root's key is missing".to_owned(),
        })?;
    let key_pem = String::from_utf8(kv.value).map_err(|_| Error::CorruptRecord {
        key: key_key.clone(),
        reason: "not UTF-8".to_owned(),
    })?;
    let ca_der = pki::ec_pkcs8_from_pem("stored CA key", &key_pem)?;
    let crypto = |op| move |source| Error::Crypto { op, source };
    let ca_key = KeyPair::try_from(ca_der.as_slice()).map_err(crypto("load the stored CA key"))?;
    let issuer = Issuer::from_ca_cert_der(&root.cert_der, ca_key)
        .map_err(crypto("load the root as an issuer"))?;

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(crypto("generate the HTTPS API key"))?;
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.serial_number = Some(SerialNumber::from_slice(&pki::random_serial()));
    p.not_before = now - BACKDATE;
    p.not_after = now + ttl;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "connect-agent HTTPS API");
    let mut all_ips: Vec<IpAddr> = vec![
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    ];
    for ip in ips {
        if !ip.is_unspecified() && !all_ips.contains(ip) {
            all_ips.push(*ip);
        }
    }
    p.subject_alt_names = std::iter::once(
        "localhost"
            .try_into()
            .map(SanType::DnsName)
            .map_err(crypto("encode the DNS SAN")),
    )
    .chain(all_ips.into_iter().map(|ip| Ok(SanType::IpAddress(ip))))
    .collect::<Result<_, _>>()?;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(crypto("sign the HTTPS API certificate"))?;
    let mut chain = vec![cert.der().clone()];
    chain.extend(
        state
            .active_intermediates(now)
            .into_iter()
            .map(|i| i.der.clone()),
    );
    Ok(ApiCert {
        chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_before: p.not_before,
        not_after: p.not_after,
        root_id: root.id().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    use super::*;
    use crate::{ca::CaManager, store::memory::MemStore};

    #[tokio::test]
    async fn api_certificate_names_loopback_and_the_address() {
        let store = Arc::new(MemStore::new());
        let ca = CaManager::start(Default::default(), crate::ca::CaRole::Server, store.clone())
            .await
            .expect("ca");
        let state = ca.state();
        let extra: IpAddr = "198.18.0.7".parse().expect("ip");
        let cert = issue_api_cert(
            store.as_ref(),
            &state,
            &[extra, "0.0.0.0".parse().expect("ip")],
            Duration::from_secs(3600),
        )
        .await
        .expect("issue");
        assert_eq!(cert.root_id, state.active_root().id());
        let (_, x) = X509Certificate::from_der(&cert.chain[0]).expect("parse");
        let san = x
            .subject_alternative_name()
            .expect("san ok")
            .expect("san present");
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).expect("v4")).to_string(),
                    _ => {
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).expect("v6")).to_string()
                    }
                },
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["localhost", "127.0.0.1", "::1", "198.18.0.7"]);
        assert!(!x.is_ca());
        // It chains to the active root (webpki, as HTTPS clients check it).
        let roots = state.bundle.root_store();
        let anchors: Vec<_> = roots.roots.clone();
        let ee = webpki::EndEntityCert::try_from(&cert.chain[0]).expect("ee");
        ee.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            &[],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .expect("chains to the root");
        ee.verify_is_valid_for_subject_name(
            &rustls::pki_types::ServerName::try_from("localhost").expect("name"),
        )
        .expect("valid for localhost");
    }
}
