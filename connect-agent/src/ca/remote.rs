//! Leaves of client agents, signed by a server agent.
//!
//! A client agent (`--store etcd://…` without `--server`) cannot read the CA's
//! private keys: its etcd role has no access to `secrets/` (see
//! [`super::state::SECRETS_PREFIX`]). For each local service it generates the key
//! itself, sends a CSR to a server agent's `POST /v1/connect/ca/sign`
//! ([`SIGN_PATH`]) and keeps the key; only the certificate travels back. The server
//! signs only if the requesting node's token holds `node:write` on that node and
//! the service is registered on that node in the catalog (`api::ca`).
//! JWT-SVIDs travel the same way ([`JWT_SIGN_PATH`]): the server signs, the
//! client checks the token against the bundle's JWT keys before handing it out.
//!
//! Authentication: an ACL token (`--agent-token-file`), sent as `X-Consul-Token`.
//! The alternative, mTLS with a certificate naming the node, needs a node
//! certificate first, which a client can only get from the very CA it is trying to
//! reach (a bootstrap secret again, plus a second identity kind and its own
//! rotation). The token is what a Consul client agent already holds (its agent
//! token, `node "<name>" { policy = "write" }`), it is revocable in the ACL system
//! that every agent shares, and `node:write` is exactly the right that says "may
//! act for this node". With an `https://` server address the token travels inside
//! TLS verified against the CA's own roots (the trust bundle every agent reads),
//! so it is not exposed on the wire; plain `http://` is for loopback and tests.
//!
//! Servers come from `--server-addr`, then from the catalog: a server agent with
//! an HTTPS API publishes it in its node record ([`crate::catalog::Node`]), and
//! the agent keeps the list current ([`RemoteSigner::set_discovered`]). They are
//! tried in that order; a transport failure or a 5xx moves on to the next (a
//! server that is down is failed over), a 4xx is the answer. Only `https://`
//! addresses are taken from the catalog: a node record is writable by every
//! client node's etcd user, but a server's certificate must chain to the CA's
//! roots and name that address, which only the CA's own servers hold, so a forged
//! record cannot collect a node's token.

use std::{
    fmt,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use rcgen::{CertificateParams, KeyPair, PublicKeyData};
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{
    Error,
    jwt::{self, JwtSvid},
    leaf::IssuedCert,
    pki,
    state::{CaState, cert_facts},
    verify::{PeerRole, verify_chain},
};
use crate::identity::SpiffeId;

/// The signing endpoint of server agents.
pub const SIGN_PATH: &str = "/v1/connect/ca/sign";
/// The JWT-SVID endpoint of server agents (same authentication and checks).
pub const JWT_SIGN_PATH: &str = "/v1/connect/ca/jwt-sign";
/// Bound of one signing request to one server.
pub const SIGN_TIMEOUT: Duration = Duration::from_secs(10);

/// Body of `POST /v1/connect/ca/sign`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct SignRequest {
    /// The requesting node; the token must hold `node:write` on it.
    pub node: String,
    /// The service the leaf is for; it must be registered on `node`.
    pub service: String,
    /// PEM `CERTIFICATE REQUEST` with the service's SPIFFE ID as its URI SAN.
    #[serde(rename = "CSR")]
    pub csr: String,
}

/// Answer of `POST /v1/connect/ca/sign`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct SignResponse {
    pub serial_number: String,
    /// The leaf, then any intermediates (cross-signed roots), PEM.
    #[serde(rename = "CertPEM")]
    pub cert_pem: String,
    pub service: String,
    #[serde(rename = "ServiceURI")]
    pub service_uri: String,
    /// The root that signed it.
    #[serde(rename = "RootID")]
    pub root_id: String,
}

/// Body of `POST /v1/connect/ca/jwt-sign`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct JwtSignRequest {
    /// The requesting node; the token must hold `node:write` on it.
    pub node: String,
    /// The service the token is for; it must be registered on `node`.
    pub service: String,
    pub audience: Vec<String>,
}

/// Answer of `POST /v1/connect/ca/jwt-sign`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct JwtSignResponse {
    /// The JWT-SVID, compact JWS.
    pub token: String,
}

/// Where a client agent sends its CSRs, and as whom.
#[derive(Clone)]
pub struct RemoteSigner {
    /// Base URLs (`http://host:port` or `https://host:port`).
    servers: Vec<String>,
    /// Servers found in the catalog, `https://` only, kept current by the agent.
    discovered: Arc<RwLock<Vec<String>>>,
    node: String,
    token: Option<String>,
}

impl fmt::Debug for RemoteSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteSigner")
            .field("servers", &self.servers)
            .field("discovered", &self.discovered())
            .field("node", &self.node)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl RemoteSigner {
    /// `servers` as given to `--server-addr` (`host:port` means `http://host:port`).
    pub fn new(servers: &[String], node: String, token: Option<String>) -> Self {
        let servers = servers
            .iter()
            .map(|s| {
                let s = s.trim_end_matches('/');
                if s.starts_with("http://") || s.starts_with("https://") {
                    s.to_owned()
                } else {
                    format!("http://{s}")
                }
            })
            .collect();
        Self {
            servers,
            discovered: Arc::new(RwLock::new(Vec::new())),
            node,
            token,
        }
    }

    /// Replaces the servers found in the catalog (shared by every clone). Only
    /// `https://` addresses are kept (see the module doc).
    pub fn set_discovered(&self, servers: Vec<String>) {
        let servers: Vec<String> = servers
            .into_iter()
            .filter(|s| s.starts_with("https://"))
            .map(|s| s.trim_end_matches('/').to_owned())
            .collect();
        let mut d = self
            .discovered
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if *d != servers {
            tracing::info!(servers = ?servers, "server agents found in the catalog");
            *d = servers;
        }
    }

    /// The servers found in the catalog now.
    pub fn discovered(&self) -> Vec<String> {
        self.discovered
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every server to try, in order: `--server-addr`, then the catalog's.
    fn candidates(&self) -> Vec<String> {
        let mut all = self.servers.clone();
        for s in self.discovered() {
            if !all.contains(&s) {
                all.push(s);
            }
        }
        all
    }

    /// Has a server sign a leaf for `id` over `key`'s public key. The answer is
    /// checked before it is used: it must carry exactly our key and ID and chain to
    /// the trust bundle of `state`.
    pub async fn sign(
        &self,
        state: &CaState,
        id: &SpiffeId,
        key: &KeyPair,
    ) -> Result<IssuedCert, Error> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().map_err(
            |source| Error::Crypto {
                op: "encode the SPIFFE ID of a CSR",
                source,
            },
        )?)];
        let csr = params
            .serialize_request(key)
            .map_err(|source| Error::Crypto {
                op: "make a CSR",
                source,
            })?;
        let csr_pem = csr.pem().map_err(|source| Error::Crypto {
            op: "encode a CSR",
            source,
        })?;
        let body = SignRequest {
            node: self.node.clone(),
            service: id.service.to_string(),
            csr: csr_pem,
        };
        let resp: SignResponse = self.call(state, SIGN_PATH, &body).await?;
        self.accept(state, id, key, resp)
    }

    /// Has a server sign a JWT-SVID for `id` and `audience`. The answer is
    /// checked before it is used: signed by a key of `state`'s bundle, for `id`
    /// and for each of the audiences.
    pub async fn sign_jwt(
        &self,
        state: &CaState,
        id: &SpiffeId,
        audience: &[String],
    ) -> Result<JwtSvid, Error> {
        let body = JwtSignRequest {
            node: self.node.clone(),
            service: id.service.to_string(),
            audience: audience.to_vec(),
        };
        let resp: JwtSignResponse = self.call(state, JWT_SIGN_PATH, &body).await?;
        let bad = |reason: String| Error::BadCertificate {
            what: "JWT-SVID signed by the server agent",
            reason,
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // One signature check; the other audiences are read off its claims.
        let first = audience
            .first()
            .ok_or_else(|| bad("no audience was asked".to_owned()))?;
        let v = jwt::validate(
            &resp.token,
            first,
            &state.jwt_keys,
            &state.trust_domain,
            now,
        )
        .map_err(|e| bad(e.to_string()))?;
        if v.spiffe_id != *id {
            return Err(bad(format!("it is for {}, not {id}", v.spiffe_id)));
        }
        let aud: Vec<&str> = match v.claims.get("aud") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str()).collect(),
            Some(serde_json::Value::String(a)) => vec![a.as_str()],
            _ => Vec::new(),
        };
        if let Some(missing) = audience.iter().find(|a| !aud.contains(&a.as_str())) {
            return Err(bad(format!("it is not for audience {missing:?}")));
        }
        let expires_at = v
            .claims
            .get("exp")
            .and_then(serde_json::Value::as_i64)
            .ok_or_else(|| bad("it has no exp".to_owned()))?;
        Ok(JwtSvid {
            token: resp.token,
            spiffe_id: id.clone(),
            audience: audience.to_vec(),
            expires_at,
        })
    }

    /// POSTs `body` to `path` of each server in turn until one answers: a
    /// transport failure or a 5xx moves on, a 4xx is the answer.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        state: &CaState,
        path: &str,
        body: &Req,
    ) -> Result<Resp, Error> {
        let mut failures = Vec::new();
        let servers = self.candidates();
        if servers.is_empty() {
            return Err(Error::NoServer {
                tried: "none is known: --server-addr names none, and no server agent with an HTTPS API is in the catalog (yet)".to_owned(),
            });
        }
        for server in &servers {
            match self.post(state, server, path, body).await {
                Ok(resp) => return Ok(resp),
                Err(Attempt::Refused { status, message }) => {
                    return Err(Error::SignRefused {
                        server: server.clone(),
                        status,
                        message,
                    });
                }
                Err(Attempt::Failed(reason)) => {
                    tracing::warn!(%server, %reason, "server agent could not sign, trying the next");
                    failures.push(format!("{server}: {reason}"));
                }
            }
        }
        Err(Error::NoServer {
            tried: failures.join("; "),
        })
    }

    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        state: &CaState,
        server: &str,
        path: &str,
        body: &Req,
    ) -> Result<Resp, Attempt> {
        let https = server.starts_with("https://");
        let mut builder = reqwest::Client::builder()
            .timeout(SIGN_TIMEOUT)
            .connect_timeout(SIGN_TIMEOUT)
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .https_only(https);
        if https {
            // The server's HTTPS certificate is the built-in CA's: trust its roots.
            for root in &state.roots {
                let cert = reqwest::Certificate::from_der(&root.cert_der)
                    .map_err(|e| Attempt::Failed(format!("cannot use a CA root: {e}")))?;
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| Attempt::Failed(format!("cannot build an HTTP client: {e}")))?;
        let mut req = client.post(format!("{server}{path}")).json(body);
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Attempt::Failed(e.without_url().to_string()))?;
        let status = resp.status();
        if status.is_client_error() {
            let message = resp.text().await.unwrap_or_default();
            return Err(Attempt::Refused {
                status: status.as_u16(),
                message: message.chars().take(512).collect(),
            });
        }
        if !status.is_success() {
            let message = resp.text().await.unwrap_or_default();
            return Err(Attempt::Failed(format!(
                "HTTP {status}: {}",
                message.chars().take(512).collect::<String>()
            )));
        }
        resp.json::<Resp>()
            .await
            .map_err(|e| Attempt::Failed(format!("unreadable answer: {e}")))
    }

    /// Checks a server's answer and turns it into a leaf certificate of ours.
    fn accept(
        &self,
        state: &CaState,
        id: &SpiffeId,
        key: &KeyPair,
        resp: SignResponse,
    ) -> Result<IssuedCert, Error> {
        let bad = |reason: String| Error::BadCertificate {
            what: "leaf signed by the server agent",
            reason,
        };
        let chain: Vec<CertificateDer<'static>> =
            pki::certs_from_pem("signed leaf", &resp.cert_pem)?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad("the answer holds no certificate".to_owned()))?;
        let (_, x509) = X509Certificate::from_der(leaf).map_err(|e| bad(e.to_string()))?;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad("it is not for the key this agent sent".to_owned()));
        }
        let uri_matches = x509
            .subject_alternative_name()
            .ok()
            .flatten()
            .is_some_and(|san| {
                san.value
                    .general_names
                    .iter()
                    .any(|n| matches!(n, GeneralName::URI(u) if *u == id.to_string()))
            });
        if !uri_matches {
            return Err(bad(format!("it does not name {id}")));
        }
        verify_chain(&chain, &state.bundle, UnixTime::now(), PeerRole::Client)
            .map_err(|e| bad(format!("it does not chain to the trust bundle: {e}")))?;
        let facts = cert_facts(leaf).map_err(bad)?;
        Ok(IssuedCert {
            service: id.service.clone(),
            spiffe_id: id.clone(),
            serial: x509.raw_serial().to_vec(),
            cert_pem: resp.cert_pem,
            chain,
            valid_after: facts.not_before,
            valid_before: facts.not_after,
            root_id: resp.root_id,
            index: 0,
        })
    }
}

/// The order in which node `me` tries the servers `(node name, API)` found in the
/// catalog: by node name, rotated by a hash of `me`, so that client agents spread
/// over the servers and each one always starts with the same server.
pub fn order_servers(mut servers: Vec<(String, String)>, me: &str) -> Vec<String> {
    servers.retain(|(node, _)| node != me);
    servers.sort();
    if servers.is_empty() {
        return Vec::new();
    }
    // FNV-1a: stable across runs and builds, unlike the std hasher.
    let hash = me.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let start = (hash % servers.len() as u64) as usize;
    servers.rotate_left(start);
    servers.into_iter().map(|(_, api)| api).collect()
}

/// One server's answer, as far as trying the next server is concerned.
enum Attempt {
    /// A 4xx: the request itself is refused; another server would say the same.
    Refused { status: u16, message: String },
    /// Unreachable, 5xx, or an unreadable answer: try the next server.
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn servers_are_spread_stably_and_never_include_this_node() {
        let servers = s(&[
            ("s2", "https://198.18.0.2:8501"),
            ("s1", "https://198.18.0.1:8501"),
            ("s3", "https://198.18.0.3:8501"),
            ("c1", "https://198.18.0.9:8501"),
        ]);
        let a = order_servers(servers.clone(), "c1");
        assert_eq!(a.len(), 3, "{a:?}");
        assert!(!a.contains(&"https://198.18.0.9:8501".to_owned()));
        assert_eq!(a, order_servers(servers.clone(), "c1"), "stable");
        // Every server (c1 too, for other nodes) is somebody's first choice.
        let firsts: std::collections::BTreeSet<String> = (0..32)
            .map(|i| order_servers(servers.clone(), &format!("client-{i}"))[0].clone())
            .collect();
        assert_eq!(firsts.len(), 4, "{firsts:?}");
        assert!(order_servers(Vec::new(), "c1").is_empty());
    }

    #[test]
    fn only_https_servers_come_from_the_catalog_after_the_explicit_ones() {
        let signer = RemoteSigner::new(&["127.0.0.1:8500".to_owned()], "c1".into(), None);
        signer.set_discovered(vec![
            "http://198.18.0.1:8500".into(),
            "https://198.18.0.2:8501/".into(),
            "https://198.18.0.3:8501".into(),
        ]);
        assert_eq!(
            signer.candidates(),
            [
                "http://127.0.0.1:8500",
                "https://198.18.0.2:8501",
                "https://198.18.0.3:8501"
            ]
        );
        // Clones share the list the agent keeps current.
        let clone = signer.clone();
        signer.set_discovered(vec!["https://198.18.0.3:8501".into()]);
        assert_eq!(clone.discovered(), ["https://198.18.0.3:8501"]);
    }
}
