//! CA tests that span modules: every issued leaf is checked by implementations we
//! did not write (the `spiffe` crate's X.509-SVID parser and `openssl verify
//! -x509_strict`), plus restart, concurrent first start, CSRs, rotation, pruning and
//! background renewal.

use std::{process::Command, sync::Arc, time::Duration};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, UnixTime};
use serde_json::json;
use x509_parser::{
    extensions::{GeneralName, ParsedExtension},
    prelude::{FromDer, X509Certificate},
};

use super::*;
use crate::{
    identity::{Datacenter, ServiceName},
    store::{Store, memory::MemStore},
};

async fn start(store: &MemStore) -> Arc<CaManager> {
    CaManager::start_with(
        Arc::new(BuiltinProvider),
        Datacenter::default(),
        Arc::new(store.clone()),
    )
    .await
    .expect("CA starts")
}

fn svc(name: &str) -> ServiceName {
    name.parse().expect("service name")
}

/// Runs `openssl verify -x509_strict` on `leaf` with `roots` trusted and
/// `untrusted` offered as intermediates, for the TLS client and server purposes.
fn openssl_verify(
    roots: &[CertificateDer<'_>],
    untrusted: &[CertificateDer<'_>],
    leaf: &CertificateDer<'_>,
) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem_of = |certs: &[CertificateDer<'_>]| -> String {
        certs
            .iter()
            .map(|c| pki::pem_encode("CERTIFICATE", c))
            .collect()
    };
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write pem");
        p
    };
    let roots_p = write("roots.pem", pem_of(roots));
    let leaf_p = write("leaf.pem", pem_of(std::slice::from_ref(leaf)));
    let untrusted_p = write("untrusted.pem", pem_of(untrusted));
    for purpose in ["sslclient", "sslserver"] {
        let mut cmd = Command::new("openssl");
        cmd.args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(&roots_p);
        if !untrusted.is_empty() {
            cmd.arg("-untrusted").arg(&untrusted_p);
        }
        let out = cmd
            .arg(&leaf_p)
            .output()
            .expect("the openssl CLI must be installed for this test");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.trim_end().ends_with(": OK") {
            return Err(format!(
                "openssl verify ({purpose}) refused: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// Checks a leaf with the `spiffe` crate's X.509-SVID parser and returns its ID.
fn spiffe_parse(chain: &[CertificateDer<'_>], key_pkcs8: &[u8]) -> String {
    let der: Vec<u8> = chain.iter().flat_map(|c| c.iter().copied()).collect();
    let svid = spiffe::X509Svid::parse_from_der(&der, key_pkcs8)
        .unwrap_or_else(|e| panic!("spiffe crate refused the SVID: {e}"));
    svid.spiffe_id().to_string()
}

fn x509(der: &[u8]) -> X509Certificate<'_> {
    X509Certificate::from_der(der).expect("parses").1
}

fn uri_and_dns_sans(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<String>) {
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    (uris, dns)
}

fn key_ids(cert: &X509Certificate<'_>) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let mut skid = None;
    let mut akid = None;
    for e in cert.extensions() {
        match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => skid = Some(k.0.to_vec()),
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                akid = a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => {}
        }
    }
    (skid, akid)
}

#[tokio::test]
async fn root_has_the_builtin_ca_shape() {
    let store = MemStore::new();
    let ca = start(&store).await;
    let st = ca.state();
    assert_eq!(
        st.trust_domain.as_str(),
        format!("{}.consul", st.cluster_id.hyphenated())
    );
    let root = st.active_root();
    let c = x509(&root.cert_der);
    let bc = c.basic_constraints().expect("ok").expect("present");
    assert!(bc.critical && bc.value.ca);
    let ku = c.key_usage().expect("ok").expect("present").value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let (skid, akid) = key_ids(&c);
    assert_eq!(skid.as_deref().map(<[u8]>::len), Some(32));
    assert_eq!(skid, akid, "self-signed: AuthorityKeyId = SubjectKeyId");
    let (uris, _) = uri_and_dns_sans(&c);
    assert_eq!(uris, vec![st.trust_domain.spiffe_uri()]);
    let years = (root.not_after - root.not_before).whole_days() / 365;
    assert_eq!(years, 10);
    assert_eq!(
        c.public_key()
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.as_bytes().to_vec()),
        Some(pki::OID_P256.to_vec())
    );
    assert_eq!(root.id(), pki::fingerprint(&root.cert_der));
    // An openssl-verifiable self-signed CA.
    openssl_verify(std::slice::from_ref(&root.cert_der), &[], &root.cert_der)
        .expect("openssl accepts the root");
}

#[tokio::test]
async fn issued_leaves_pass_independent_checks() {
    let store = MemStore::new();
    let ca = start(&store).await;
    let st = ca.state();
    let mut serials = std::collections::HashSet::new();
    for name in ["web", "socat", "Db_2"] {
        let w = ca.leaf(&svc(name)).await.expect("leaf");
        assert!(!w.cache_hit);
        let leaf = w.rx.borrow().clone();
        let want = format!("spiffe://{}/ns/default/dc/dc1/svc/{name}", st.trust_domain);
        assert_eq!(leaf.cert.spiffe_id.to_string(), want);

        // The spiffe crate's parser.
        let key = match leaf.private_key_der() {
            rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            other => panic!("unexpected key {other:?}"),
        };
        assert_eq!(spiffe_parse(&leaf.cert.chain, &key), want);
        // openssl, strict.
        openssl_verify(
            std::slice::from_ref(&st.active_root().cert_der),
            &[],
            leaf.cert.cert(),
        )
        .expect("openssl accepts the leaf");
        // Our validator, both roles.
        for role in [PeerRole::Client, PeerRole::Server] {
            let id = verify_chain(&leaf.cert.chain, &st.bundle, UnixTime::now(), role)
                .expect("our validator accepts it");
            assert_eq!(id.to_string(), want);
        }

        // Shape: SANs, key, usages, validity, serial.
        let c = x509(leaf.cert.cert());
        let (uris, dns) = uri_and_dns_sans(&c);
        assert_eq!(uris, vec![want.clone()]);
        assert_eq!(
            dns,
            vec![format!(
                "{}.svc.{}",
                name.to_ascii_lowercase(),
                st.trust_domain
            )]
        );
        assert!(!c.is_ca());
        let eku = c.extended_key_usage().expect("ok").expect("present").value;
        assert!(eku.server_auth && eku.client_auth);
        let (_, akid) = key_ids(&c);
        assert_eq!(akid, Some(st.active_root().key_id.clone()));
        assert_eq!(
            leaf.cert.valid_before - leaf.cert.valid_after,
            time::Duration::hours(72)
        );
        assert_eq!(leaf.cert.serial.len(), 16);
        assert_eq!(leaf.cert.serial_hex().len(), 16 * 3 - 1);
        assert!(serials.insert(leaf.cert.serial.clone()), "serial reused");
        assert!(
            leaf.private_key_pem()
                .starts_with("-----BEGIN EC PRIVATE KEY-----")
        );
        assert!(
            leaf.cert
                .cert_pem
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
    }
    // The second request is a cache hit with the same leaf.
    let again = ca.leaf(&svc("web")).await.expect("leaf");
    assert!(again.cache_hit);
}

#[tokio::test]
async fn restart_keeps_root_and_trust_domain() {
    let store = MemStore::new();
    let first = start(&store).await;
    let (td, root) = {
        let s = first.state();
        (s.trust_domain.clone(), s.active_root().id().to_owned())
    };
    let leaf = first
        .leaf(&svc("web"))
        .await
        .expect("leaf")
        .rx
        .borrow()
        .clone();
    drop(first);
    let second = start(&store).await;
    let s = second.state();
    assert_eq!(s.trust_domain, td);
    assert_eq!(s.active_root().id(), root);
    assert_eq!(s.roots.len(), 1);
    // A leaf of the first run verifies against the second run's bundle.
    verify_chain(
        &leaf.cert.chain,
        &s.bundle,
        UnixTime::now(),
        PeerRole::Client,
    )
    .expect("old leaf still valid after restart");
}

#[tokio::test]
async fn concurrent_first_starts_agree() {
    let store = MemStore::new();
    let (a, b, c) = tokio::join!(start(&store), start(&store), start(&store));
    let ids: Vec<String> = [a, b, c]
        .iter()
        .map(|m| m.state().active_root().id().to_owned())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    let roots = store.list("ca/roots/").await.expect("list");
    assert_eq!(roots.items.len(), 1);
}

fn csr(ca: &CaState, sans: Vec<SanType>, ca_request: bool, p384: bool) -> String {
    let key = KeyPair::generate_for(if p384 {
        &rcgen::PKCS_ECDSA_P384_SHA384
    } else {
        &rcgen::PKCS_ECDSA_P256_SHA256
    })
    .expect("keygen");
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    if ca_request {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let _ = ca;
    p.serialize_request(&key).expect("csr").pem().expect("pem")
}

#[tokio::test]
async fn csrs_are_signed_or_refused() {
    let store = MemStore::new();
    let ca = start(&store).await;
    let st = ca.state();
    let uri = |s: String| SanType::URI(s.try_into().expect("uri"));
    let ours = format!("spiffe://{}/ns/default/dc/dc1/svc/api", st.trust_domain);

    let good = csr(&st, vec![uri(ours.clone())], false, false);
    let issued = ca.sign_csr(good.as_bytes()).expect("signed");
    assert_eq!(issued.spiffe_id.to_string(), ours);
    openssl_verify(
        std::slice::from_ref(&st.active_root().cert_der),
        &[],
        issued.cert(),
    )
    .expect("openssl accepts the CSR leaf");
    verify_chain(&issued.chain, &st.bundle, UnixTime::now(), PeerRole::Server)
        .expect("validator accepts the CSR leaf");

    let foreign = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/api";
    type Want = fn(&CsrRefusal) -> bool;
    let cases: Vec<(&str, String, Want)> = vec![
        (
            "other trust domain",
            csr(&st, vec![uri(foreign.to_owned())], false, false),
            |r| matches!(r, CsrRefusal::ForeignTrustDomain { .. }),
        ),
        (
            "CA certificate",
            csr(&st, vec![uri(ours.clone())], true, false),
            |r| matches!(r, CsrRefusal::AsksForCa),
        ),
        (
            "several URI SANs",
            csr(
                &st,
                vec![uri(ours.clone()), uri(ours.replace("/svc/api", "/svc/db"))],
                false,
                false,
            ),
            |r| matches!(r, CsrRefusal::SeveralUriSans { count: 2 }),
        ),
        (
            "no URI SAN",
            csr(
                &st,
                vec![SanType::DnsName("api.example".try_into().expect("dns"))],
                false,
                false,
            ),
            |r| matches!(r, CsrRefusal::NoUriSan),
        ),
        (
            "other datacenter",
            csr(
                &st,
                vec![uri(ours.replace("/dc/dc1/", "/dc/dc9/"))],
                false,
                false,
            ),
            |r| matches!(r, CsrRefusal::ForeignDatacenter { .. }),
        ),
        (
            "P-384 key",
            csr(&st, vec![uri(ours.clone())], false, true),
            |r| matches!(r, CsrRefusal::UnsupportedKey),
        ),
        ("garbage", "not a csr".to_owned(), |r| {
            matches!(r, CsrRefusal::Malformed)
        }),
    ];
    for (name, pem, want) in cases {
        match ca.sign_csr(pem.as_bytes()) {
            Err(Error::CsrRefused { refusal }) if want(&refusal) => {
                // A clear message names the problem.
                assert!(!refusal.to_string().is_empty());
            }
            other => panic!("{name}: unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn rotation_keeps_old_leaves_and_signs_new_ones_with_the_new_root() {
    let store = MemStore::new();
    let ca = start(&store).await;
    // A second agent on the same store sees the rotation through its watch.
    let peer = start(&store).await;
    let before = ca.state();
    let old_root = before.active_root().clone();
    let old_leaf = ca
        .leaf(&svc("web"))
        .await
        .expect("leaf")
        .rx
        .borrow()
        .clone();

    // A TTL-only change keeps the root.
    ca.set_config(
        CaConfig::from_request(&json!({"Provider": "consul", "Config": {"LeafCertTTL": "24h"}}))
            .expect("config"),
    )
    .await
    .expect("set config");
    assert_eq!(ca.state().active_root().id(), old_root.id());
    assert_eq!(
        ca.state().config.leaf_cert_ttl,
        Duration::from_secs(24 * 3600)
    );

    // A new key type rotates.
    ca.set_config(
        CaConfig::from_request(
            &json!({"Provider": "consul", "Config": {"LeafCertTTL": "24h", "PrivateKeyBits": 384}}),
        )
        .expect("config"),
    )
    .await
    .expect("rotate");
    let after = ca.state();
    assert_eq!(after.trust_domain, before.trust_domain);
    assert_eq!(after.roots.len(), 2);
    let new_root = after.active_root().clone();
    assert_ne!(new_root.id(), old_root.id());
    assert_eq!(new_root.record.private_key_bits, 384);
    assert!(
        after
            .roots
            .iter()
            .any(|r| r.id() == old_root.id() && !r.active())
    );

    // Old leaves stay valid against the new bundle.
    verify_chain(
        &old_leaf.chain_ref(),
        &after.bundle,
        UnixTime::now(),
        PeerRole::Client,
    )
    .expect("old leaf valid after rotation");
    openssl_verify(
        &[old_root.cert_der.clone(), new_root.cert_der.clone()],
        &[],
        old_leaf.cert.cert(),
    )
    .expect("openssl: old leaf");

    // New leaves come from the new root and carry the cross-signed certificate.
    let new_leaf = ca
        .leaf(&svc("web"))
        .await
        .expect("leaf")
        .rx
        .borrow()
        .clone();
    assert_eq!(new_leaf.cert.root_id, new_root.id());
    assert_ne!(new_leaf.cert.serial, old_leaf.cert.serial);
    assert_eq!(new_leaf.cert.chain.len(), 2, "leaf + cross-signed root");
    let cross = new_leaf.cert.chain[1].clone();
    let (_, akid) = key_ids(&x509(&cross));
    assert_eq!(
        akid,
        Some(old_root.key_id.clone()),
        "cross-signed by the old root"
    );
    verify_chain(
        &new_leaf.cert.chain,
        &after.bundle,
        UnixTime::now(),
        PeerRole::Server,
    )
    .expect("new leaf valid");
    openssl_verify(
        std::slice::from_ref(&new_root.cert_der),
        &[],
        new_leaf.cert.cert(),
    )
    .expect("openssl: new leaf, new root");
    // A peer that still trusts only the old root accepts it through the cross-sign.
    openssl_verify(
        std::slice::from_ref(&old_root.cert_der),
        std::slice::from_ref(&cross),
        new_leaf.cert.cert(),
    )
    .expect("openssl: new leaf via the cross-signed root");
    let old_only = TrustBundle::new(
        after.trust_domain.clone(),
        old_root.id().to_owned(),
        vec![old_root.cert_der.clone()],
        1,
    )
    .expect("bundle");
    verify_chain(
        &new_leaf.cert.chain,
        &old_only,
        UnixTime::now(),
        PeerRole::Client,
    )
    .expect("validator: new leaf via the cross-signed root");
    let key = match new_leaf.private_key_der() {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        other => panic!("unexpected key {other:?}"),
    };
    assert_eq!(
        spiffe_parse(&new_leaf.cert.chain, &key),
        new_leaf.cert.spiffe_id.to_string()
    );

    // The other agent follows.
    crate::test_support::eventually("the peer to see the rotation", || {
        peer.state().active_root().id() == new_root.id()
    })
    .await;
    assert_eq!(peer.bundle().borrow().roots().len(), 2);

    // Nothing is pruned while old leaves may live; afterwards the old root goes,
    // and new leaves no longer carry the cross-signed certificate.
    let now = time::OffsetDateTime::now_utc();
    assert_eq!(ca.prune(now).await.expect("prune"), 0);
    let later = now + time::Duration::hours(49);
    assert_eq!(ca.prune(later).await.expect("prune"), 1);
    let pruned = ca.state();
    assert_eq!(pruned.roots.len(), 1);
    assert!(pruned.roots_index > after.roots_index, "roots index moved");
    assert!(
        store
            .get(&state::private_key_key(old_root.id()))
            .await
            .expect("get")
            .is_none()
    );
    let leaf3 = ca.leaf(&svc("db")).await.expect("leaf").rx.borrow().clone();
    assert_eq!(leaf3.cert.chain.len(), 1);
}

impl Leaf {
    fn chain_ref(&self) -> Vec<CertificateDer<'static>> {
        self.cert.chain.clone()
    }
}

#[tokio::test]
async fn a_supplied_private_key_becomes_the_root_key() {
    let store = MemStore::new();
    let ca = start(&store).await;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let sec1 = pki::sec1_pem_from_pkcs8(key.serialized_der()).expect("sec1");
    let cfg = CaConfig::from_request(&json!({"Config": {"PrivateKey": sec1}})).expect("config");
    ca.set_config(cfg.clone()).await.expect("rotate");
    let st = ca.state();
    assert_eq!(st.roots.len(), 2);
    let root = x509(&st.active_root().cert_der);
    assert_eq!(root.public_key().raw, key.subject_public_key_info_der());
    // Setting the same key again changes nothing.
    let id = st.active_root().id().to_owned();
    ca.set_config(cfg).await.expect("same config");
    assert_eq!(ca.state().active_root().id(), id);
    assert_eq!(ca.state().roots.len(), 2);
    // The private key is never shown.
    assert!(
        !ca.state()
            .config
            .public_map()
            .keys()
            .any(|k| k.eq_ignore_ascii_case("privatekey"))
    );
}

trait SpkiDer {
    fn subject_public_key_info_der(&self) -> Vec<u8>;
}

impl SpkiDer for KeyPair {
    fn subject_public_key_info_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(self)
    }
}

#[tokio::test(start_paused = true)]
async fn leaves_renew_in_the_background() {
    let store = MemStore::new();
    let ca = start(&store).await;
    let mut rx = ca.leaf(&svc("web")).await.expect("leaf").rx;
    let first = rx.borrow_and_update().clone();
    // Virtual time: the renewal is due at 60-90 % of 72h.
    tokio::time::timeout(Duration::from_secs(72 * 3600), rx.changed())
        .await
        .expect("renewed before expiry")
        .expect("sender alive");
    let second = rx.borrow_and_update().clone();
    assert_ne!(second.cert.serial, first.cert.serial);
    assert!(second.cert.index > first.cert.index);

    // A rotation re-issues within the 30 s window.
    ca.set_config(
        CaConfig::from_request(&json!({"Config": {"PrivateKeyBits": 384}})).expect("config"),
    )
    .await
    .expect("rotate");
    let new_root = ca.state().active_root().id().to_owned();
    tokio::time::timeout(
        leaf::ROOT_CHANGE_WINDOW + Duration::from_secs(1),
        rx.changed(),
    )
    .await
    .expect("re-issued after rotation")
    .expect("sender alive");
    assert_eq!(rx.borrow().cert.root_id, new_root);
}

#[tokio::test]
async fn rustls_handshake_with_the_verifiers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let store = MemStore::new();
    let ca = start(&store).await;
    let web = ca
        .leaf(&svc("web"))
        .await
        .expect("leaf")
        .rx
        .borrow()
        .clone();
    let socat = ca
        .leaf(&svc("socat"))
        .await
        .expect("leaf")
        .rx
        .borrow()
        .clone();
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_client_cert_verifier(tls::SpiffeClientVerifier::new(ca.bundle()))
        .with_single_cert(socat.cert.chain.clone(), socat.private_key_der())
        .expect("server config");
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(tls::SpiffeServerVerifier::new(ca.bundle()))
        .with_client_auth_cert(web.cert.chain.clone(), web.private_key_der())
        .expect("client config");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.expect("server handshake");
        let peer = tls.get_ref().1.peer_certificates().expect("client cert")[0].clone();
        let id = verify::leaf_identity(&peer).expect("identity");
        tls.write_all(id.service.as_str().as_bytes())
            .await
            .expect("write");
        tls.shutdown().await.expect("shutdown");
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg.clone()));
    let bundle = ca.bundle().borrow().clone();
    let name = tls::server_name_for(&svc("socat"), &bundle).expect("sni");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("client handshake");
    let mut got = String::new();
    tls.read_to_string(&mut got).await.expect("read");
    assert_eq!(got, "web", "server saw the client's SPIFFE ID");
    server.await.expect("server task");

    // Dialing "db" but reaching socat fails the server identity check.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server_cfg2 = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("versions")
    .with_client_cert_verifier(tls::SpiffeClientVerifier::new(ca.bundle()))
    .with_single_cert(socat.cert.chain.clone(), socat.private_key_der())
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg2));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        acceptor.accept(tcp).await.is_err()
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = tls::server_name_for(&svc("db"), &bundle).expect("sni");
    let res = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("handshake in time");
    let err = res.expect_err("identity mismatch must fail");
    assert!(err.to_string().contains("Mismatch"), "{err}");
    assert!(server.await.expect("server task"), "server saw the failure");
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[tokio::test]
async fn jwt_keys_rotate_with_the_roots_and_old_tokens_validate_while_their_root_is_listed() {
    let store = MemStore::new();
    let ca = start(&store).await;
    let peer = start(&store).await;
    let before = ca.state();
    assert_eq!(before.jwt_keys.len(), 1, "the first root has its JWT key");
    assert!(before.active_has_jwt_key());
    let aud = vec!["socat".to_owned()];
    let old = ca.jwt_svid(&svc("web"), &aud).await.expect("jwt");
    assert_eq!(old.spiffe_id.service, svc("web"));
    // Reused while more than half its lifetime is left, whatever the order and
    // repetition of the audiences asked.
    let again = ca.jwt_svid(&svc("web"), &aud).await.expect("jwt");
    assert_eq!(again.token, old.token);
    let two = ca
        .jwt_svid(&svc("web"), &["socat".to_owned(), "db".to_owned()])
        .await
        .expect("jwt");
    let two_again = ca
        .jwt_svid(
            &svc("web"),
            &["db".to_owned(), "socat".to_owned(), "db".to_owned()],
        )
        .await
        .expect("jwt");
    assert_eq!(two.token, two_again.token);
    assert_ne!(two.token, old.token);
    let lifetime = old.expires_at - now_unix();
    assert!(
        (290..=300).contains(&lifetime),
        "5 minutes by default: {lifetime}"
    );
    // Bad audiences are the caller's fault.
    let e = ca
        .jwt_svid(&svc("web"), &[])
        .await
        .expect_err("no audience");
    assert!(matches!(e, Error::JwtRequest(_)), "{e}");

    ca.set_config(
        CaConfig::from_request(
            &json!({"Provider": "consul", "Config": {"PrivateKeyBits": 384, "JWTSVIDTTL": "2m"}}),
        )
        .expect("config"),
    )
    .await
    .expect("rotate");
    let after = ca.state();
    assert_eq!(
        after.jwt_keys.len(),
        2,
        "old and new root's keys are listed"
    );
    assert_eq!(
        after.jwt_keys[1].record.root_id,
        after.active_root().id(),
        "the new root's key is last"
    );
    jwt::validate(
        &old.token,
        "socat",
        &after.jwt_keys,
        &after.trust_domain,
        now_unix(),
    )
    .expect("a token of the old key validates while its root is listed");
    // New tokens come from the new key, with the new lifetime; the cache does not
    // hand out the old one for longer than half of the new lifetime.
    let new = ca
        .jwt_svid(&svc("web"), &["other".to_owned()])
        .await
        .expect("jwt");
    let kid_of = |t: &str| -> String {
        use base64::Engine;
        let h = t.split('.').next().expect("header");
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(h)
            .expect("b64");
        let v: serde_json::Value = serde_json::from_slice(&h).expect("json");
        v["kid"].as_str().expect("kid").to_owned()
    };
    assert_eq!(kid_of(&new.token), after.jwt_keys[1].record.key_id);
    assert_eq!(kid_of(&old.token), after.jwt_keys[0].record.key_id);
    assert!(new.expires_at - now_unix() <= 120);
    // The other agent follows: its JWKS has both keys.
    crate::test_support::eventually("the peer to see the new JWT key", || {
        peer.state().jwt_keys.len() == 2
    })
    .await;

    // Kept two leaf lifetimes (72 h each) after the rotation.
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(145);
    assert_eq!(ca.prune(later).await.expect("prune"), 1);
    let pruned = ca.state();
    assert_eq!(pruned.jwt_keys.len(), 1);
    assert!(matches!(
        jwt::validate(
            &old.token,
            "socat",
            &pruned.jwt_keys,
            &pruned.trust_domain,
            now_unix()
        ),
        Err(jwt::Rejection::UnknownKey(_))
    ));
    for key in [
        jwt::public_key_key(before.active_root().id()),
        jwt::private_key_key(before.active_root().id()),
    ] {
        assert!(
            store.get(&key).await.expect("get").is_none(),
            "{key} pruned"
        );
    }
}

#[tokio::test]
async fn a_store_written_before_jwt_keys_gets_one_from_a_server_and_a_client_never_reads_it() {
    let store = MemStore::new();
    let first = start(&store).await;
    let root = first.state().active_root().id().to_owned();
    drop(first);
    // As an older agent left it: no JWT key at all.
    store
        .txn(
            crate::store::Txn::new()
                .delete(jwt::public_key_key(&root))
                .delete(jwt::private_key_key(&root)),
        )
        .await
        .expect("delete");
    let client = CaManager::start(
        Datacenter::default(),
        CaRole::Client(remote::RemoteSigner::new(&[], "n1".to_owned(), None)),
        Arc::new(store.clone()),
    )
    .await
    .expect("client starts");
    assert!(client.state().jwt_keys.is_empty());
    assert!(client.state().jwt_signer().is_none());
    let server = start(&store).await;
    assert!(server.state().active_has_jwt_key(), "made at start");
    assert!(server.state().jwt_signer().is_some());
    assert!(
        store
            .get(&jwt::private_key_key(&root))
            .await
            .expect("get")
            .is_some()
    );
    crate::test_support::eventually("the client to see the JWKS", || {
        client.state().jwt_keys.len() == 1
    })
    .await;
    assert!(
        client.state().jwt_signer().is_none(),
        "clients never hold the key"
    );
    let t = server
        .jwt_svid(&svc("web"), &["socat".to_owned()])
        .await
        .expect("jwt");
    let c = client.state();
    jwt::validate(&t.token, "socat", &c.jwt_keys, &c.trust_domain, now_unix())
        .expect("the client validates a server's token");
}
