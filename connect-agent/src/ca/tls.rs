//! rustls adapters over the validator: a [`ClientCertVerifier`] for the inbound
//! listener and a [`ServerCertVerifier`] for outbound dials, both reading the live
//! trust bundle from a `watch` (no I/O on the handshake path; a rotation reaches
//! the next handshake without rebuilding any TLS config).
//!
//! The server verifier takes the expected destination from the SNI, which proxies
//! set to `<service>.svc.<trust-domain>` (the leaf's DNS SAN): one client config
//! serves every destination. Intentions are not checked here: the proxy asks them
//! with the identity [`super::TrustBundle::verify`] returns for the verified leaf.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use tokio::sync::watch;

use super::verify::{PeerRole, TrustBundle, VerifyError};

/// Requires and verifies client certificates against the live trust bundle.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: watch::Receiver<Arc<TrustBundle>>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: watch::Receiver<Arc<TrustBundle>>) -> Arc<Self> {
        Arc::new(Self {
            bundle,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Our clients have one identity each; hints would only leak the roots.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.bundle.borrow().clone();
        let chain = chain_of(end_entity, intermediates);
        bundle
            .verify(&chain, now, PeerRole::Client)
            .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies a server's chain against the live bundle and that its SPIFFE ID names
/// the service in the SNI (`<service>.svc.<trust-domain>`).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: watch::Receiver<Arc<TrustBundle>>,
    algs: WebPkiSupportedAlgorithms,
}

/// The server's identity is not the one the SNI asked for.
#[derive(Debug, thiserror::Error)]
pub enum ServerIdentityError {
    #[error("server name {name:?} is not <service>.svc.<trust-domain>")]
    BadServerName { name: String },
    #[error("peer certificate mismatch: expected service {expected}, got {got}")]
    Mismatch { expected: String, got: String },
}

impl SpiffeServerVerifier {
    pub fn new(bundle: watch::Receiver<Arc<TrustBundle>>) -> Arc<Self> {
        Arc::new(Self {
            bundle,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.bundle.borrow().clone();
        let name = match server_name {
            ServerName::DnsName(d) => d.as_ref().to_owned(),
            other => {
                return Err(other_error(ServerIdentityError::BadServerName {
                    name: format!("{other:?}"),
                }));
            }
        };
        let expected = crate::identity::service_of_dns_name(&name, bundle.trust_domain())
            .ok_or_else(|| {
                other_error(ServerIdentityError::BadServerName { name: name.clone() })
            })?;
        let chain = chain_of(end_entity, intermediates);
        let id = bundle
            .verify(&chain, now, PeerRole::Server)
            .map_err(to_rustls)?;
        if id.service != expected {
            return Err(other_error(ServerIdentityError::Mismatch {
                expected: expected.to_string(),
                got: id.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The SNI a client sends to reach `service`: `<service>.svc.<trust-domain>`.
pub fn server_name_for(
    service: &crate::identity::ServiceName,
    bundle: &TrustBundle,
) -> Result<ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
    ServerName::try_from(crate::identity::service_dns_name(
        service,
        bundle.trust_domain(),
    ))
}

fn chain_of<'a>(
    end_entity: &CertificateDer<'a>,
    intermediates: &[CertificateDer<'a>],
) -> Vec<CertificateDer<'a>> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    chain
}

/// Standard failures become rustls' own certificate errors (so the right TLS alert
/// goes out); SPIFFE-specific ones keep our typed error inside `Other`.
fn to_rustls(e: VerifyError) -> rustls::Error {
    let ce = match e {
        VerifyError::UnknownRoot => CertificateError::UnknownIssuer,
        VerifyError::BadSignature => CertificateError::BadSignature,
        VerifyError::Expired { .. } => CertificateError::Expired,
        VerifyError::NotYetValid { .. } => CertificateError::NotValidYet,
        VerifyError::WrongKeyUsage { .. } => CertificateError::InvalidPurpose,
        VerifyError::Malformed { .. } => CertificateError::BadEncoding,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

fn other_error(e: ServerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}
