//! JWT-SVIDs: the CA's JWT signing keys, signing, the JWKS and validation.
//!
//! Every root has its own JWT signing key, ECDSA P-256 (ES256), made with the
//! root and written in the same transaction, and deleted with it when it is
//! pruned: so the JWT key rotates with the CA, and a token signed before a
//! rotation validates as long as its root is listed (the same rule as a leaf).
//! The key is not the root's own key: one key, one protocol (a CA key that also
//! signs arbitrary JSON could be made to sign something that parses as a
//! certificate's TBS, or the other way round).
//!
//! Records: `ca/jwt/<hex root id>` holds the public half ([`JwtKeyRecord`], read
//! by every agent: it is the JWKS), `secrets/ca/keys/jwt/<hex root id>` the
//! private key as PKCS#8 PEM, inside the range only server agents may read.
//!
//! Tokens are compact JWS: header `{"alg":"ES256","kid":…,"typ":"JWT"}`, claims
//! `sub` (the caller's SPIFFE ID), `aud` (the audiences asked for, as a list),
//! `iat` and `exp`. [`validate`] checks the algorithm, the key (by `kid`) among
//! the listed roots' keys, the signature, the expiry, the audience, and that the
//! subject is a SPIFFE ID of this trust domain.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair as _},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{Error, config::SecretPem, pki};
use crate::identity::{SpiffeId, TrustDomain};

/// The public JWT keys, one record per root.
pub const JWT_PREFIX: &str = "ca/jwt/";
/// The private JWT keys (inside [`super::state::KEYS_PREFIX`]: servers only).
pub const JWT_KEYS_PREFIX: &str = "secrets/ca/keys/jwt/";
/// Longest token [`validate`] reads: a JWT-SVID is a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Most audiences one token may carry, and the longest one.
pub const MAX_AUDIENCES: usize = 16;
pub const MAX_AUDIENCE_LEN: usize = 256;
/// Clock skew tolerated on `exp` and `iat` between agents.
pub const LEEWAY_SECS: i64 = 30;

/// The store key of a root's public JWT key.
pub fn public_key_key(root_id: &str) -> String {
    format!("{JWT_PREFIX}{}", pki::fingerprint_key(root_id))
}

/// The store key of a root's private JWT key.
pub fn private_key_key(root_id: &str) -> String {
    format!("{JWT_KEYS_PREFIX}{}", pki::fingerprint_key(root_id))
}

/// A root's public JWT key as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct JwtKeyRecord {
    /// The root this key belongs to (its `ID`).
    #[serde(rename = "RootID")]
    pub root_id: String,
    /// The JWK `kid`.
    pub key_id: String,
    /// The P-256 point, base64url (JWK `x` and `y`).
    pub x: String,
    pub y: String,
}

/// A JWT key made for a new root: the record to publish and the private key.
#[derive(Debug)]
pub struct GeneratedJwtKey {
    pub record: JwtKeyRecord,
    pub key_pem: SecretPem,
}

/// Makes the JWT key of the root `root_id`.
pub fn generate(root_id: &str) -> Result<GeneratedJwtKey, Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
        Error::Crypto {
            op: "generate a JWT signing key",
            source,
        }
    })?;
    let record = record_of(root_id, key.public_key_raw())?;
    Ok(GeneratedJwtKey {
        record,
        key_pem: SecretPem(key.serialize_pem()),
    })
}

/// The record of an uncompressed P-256 point (`04 || x || y`).
fn record_of(root_id: &str, point: &[u8]) -> Result<JwtKeyRecord, Error> {
    let (x, y) = match point {
        [0x04, rest @ ..] if rest.len() == 64 => rest.split_at(32),
        _ => {
            return Err(Error::BadCertificate {
                what: "JWT signing key",
                reason: "not an uncompressed P-256 point".to_owned(),
            });
        }
    };
    Ok(JwtKeyRecord {
        root_id: root_id.to_owned(),
        key_id: key_id_of(point),
        x: B64.encode(x),
        y: B64.encode(y),
    })
}

/// The `kid` of a key: the first 16 bytes of the SHA-256 of its point, hex.
/// Derived, so that a record cannot name another key's `kid` by mistake.
fn key_id_of(point: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, point);
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A public JWT key, parsed and ready to verify with.
#[derive(Debug, Clone)]
pub struct JwtKey {
    pub record: JwtKeyRecord,
    /// `04 || x || y`.
    point: Vec<u8>,
}

impl JwtKey {
    /// Parses a stored record; the `kid` must be the one its point derives.
    pub fn from_record(record: JwtKeyRecord) -> Result<Self, String> {
        let x = B64.decode(&record.x).map_err(|e| format!("x: {e}"))?;
        let y = B64.decode(&record.y).map_err(|e| format!("y: {e}"))?;
        if x.len() != 32 || y.len() != 32 {
            return Err("x and y must be 32 bytes each".to_owned());
        }
        let mut point = Vec::with_capacity(65);
        point.push(0x04);
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        if key_id_of(&point) != record.key_id {
            return Err("the KeyID does not match the key".to_owned());
        }
        Ok(Self { record, point })
    }

    /// The key as a JWK of a SPIFFE bundle.
    fn jwk(&self) -> Value {
        json!({
            "kty": "EC",
            "crv": "P-256",
            "x": self.record.x,
            "y": self.record.y,
            "kid": self.record.key_id,
            "use": "jwt-svid",
        })
    }
}

/// The JWKS of a trust domain's JWT keys (the SPIFFE bundle format's `keys`).
pub fn jwks<'a>(keys: impl IntoIterator<Item = &'a JwtKey>) -> Vec<u8> {
    let keys: Vec<Value> = keys.into_iter().map(JwtKey::jwk).collect();
    // Serializing a `Value` cannot fail.
    serde_json::to_vec(&json!({ "keys": keys })).unwrap_or_default()
}

/// The active root's JWT key, private half included (server agents only).
pub struct JwtSigner {
    key_id: String,
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// The signer of `public`'s private half, `pem` (PKCS#8).
    pub fn new(public: &JwtKey, pem: &SecretPem) -> Result<Self, String> {
        let der = pem::parse(&pem.0)
            .map_err(|e| e.to_string())?
            .into_contents();
        let rng = SystemRandom::new();
        let pair =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
                .map_err(|e| format!("not a P-256 PKCS#8 key: {e}"))?;
        if pair.public_key().as_ref() != public.point.as_slice() {
            return Err("the private key is not the published key's".to_owned());
        }
        Ok(Self {
            key_id: public.record.key_id.clone(),
            pair,
            rng,
        })
    }

    /// Signs a JWT-SVID for `id`, valid `ttl_secs` from `now` (unix seconds).
    pub fn sign(
        &self,
        id: &SpiffeId,
        audience: &[String],
        now: i64,
        ttl_secs: i64,
    ) -> Result<JwtSvid, Error> {
        let header = json!({"alg": "ES256", "kid": self.key_id, "typ": "JWT"});
        let exp = now + ttl_secs;
        let claims = json!({
            "sub": id.to_string(),
            "aud": audience,
            "iat": now,
            "exp": exp,
        });
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| Error::Crypto {
                op: "sign a JWT-SVID",
                source: rcgen::Error::RingUnspecified,
            })?;
        Ok(JwtSvid {
            token: format!("{signing_input}.{}", B64.encode(sig.as_ref())),
            spiffe_id: id.clone(),
            audience: audience.to_vec(),
            expires_at: exp,
        })
    }
}

/// A signed JWT-SVID.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSvid {
    pub token: String,
    pub spiffe_id: SpiffeId,
    pub audience: Vec<String>,
    /// `exp`, unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("audience", &self.audience)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Checks the audiences a caller asks a token for: at least one, at most
/// [`MAX_AUDIENCES`], none empty or longer than [`MAX_AUDIENCE_LEN`].
pub fn check_audience(audience: &[String]) -> Result<(), Rejection> {
    if audience.is_empty() {
        return Err(Rejection::Audience(
            "at least one audience is required".to_owned(),
        ));
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(Rejection::Audience(format!(
            "at most {MAX_AUDIENCES} audiences"
        )));
    }
    if let Some(a) = audience
        .iter()
        .find(|a| a.is_empty() || a.len() > MAX_AUDIENCE_LEN)
    {
        return Err(Rejection::Audience(format!(
            "an audience must have 1 to {MAX_AUDIENCE_LEN} bytes (got {})",
            a.len()
        )));
    }
    Ok(())
}

/// Why a token is not a valid JWT-SVID for the audience asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("the token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("algorithm {0:?} is not allowed (only ES256)")]
    Algorithm(String),
    #[error("no key {0:?} in the trust bundle")]
    UnknownKey(String),
    #[error("the signature does not verify")]
    Signature,
    #[error("the token expired at {0} (unix seconds)")]
    Expired(i64),
    #[error("{0}")]
    Audience(String),
    #[error("the subject is not a SPIFFE ID of this trust domain: {0}")]
    Subject(String),
}

/// A token that passed [`validate`].
#[derive(Debug, Clone)]
pub struct Validated {
    pub spiffe_id: SpiffeId,
    /// Every claim, as the token carries it.
    pub claims: Map<String, Value>,
}

/// Validates `token` for `audience` against `keys` (the listed roots' JWT
/// keys) at `now` (unix seconds).
pub fn validate<'a>(
    token: &str,
    audience: &str,
    keys: impl IntoIterator<Item = &'a JwtKey>,
    trust_domain: &TrustDomain,
    now: i64,
) -> Result<Validated, Rejection> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Rejection::TooLong);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Rejection::Malformed("a JWS has three dot-separated parts"));
    };
    let header: Map<String, Value> = decode_json(h, "the header is not base64url JSON")?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if alg != "ES256" {
        return Err(Rejection::Algorithm(alg.to_owned()));
    }
    if let Some(typ) = header.get("typ")
        && typ != "JWT"
        && typ != "JOSE"
    {
        return Err(Rejection::Malformed("typ must be JWT or JOSE"));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(Rejection::Malformed("the header has no kid"))?;
    let key = keys
        .into_iter()
        .find(|k| k.record.key_id == kid)
        .ok_or_else(|| Rejection::UnknownKey(kid.to_owned()))?;
    let sig = B64
        .decode(s)
        .map_err(|_| Rejection::Malformed("the signature is not base64url"))?;
    let signing_input = &token[..h.len() + 1 + c.len()];
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &key.point)
        .verify(signing_input.as_bytes(), &sig)
        .map_err(|_| Rejection::Signature)?;
    // Only now, signed by us, are the claims worth reading.
    let claims: Map<String, Value> = decode_json(c, "the claims are not base64url JSON")?;
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or(Rejection::Malformed("exp is missing or not an integer"))?;
    if exp + LEEWAY_SECS <= now {
        return Err(Rejection::Expired(exp));
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(audience)),
        _ => return Err(Rejection::Malformed("aud is missing")),
    };
    if !aud_ok {
        return Err(Rejection::Audience(format!(
            "the token is not for audience {audience:?}"
        )));
    }
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(Rejection::Malformed("sub is missing"))?;
    let spiffe_id: SpiffeId = sub
        .parse()
        .map_err(|e: crate::identity::Error| Rejection::Subject(e.to_string()))?;
    if spiffe_id.trust_domain != *trust_domain {
        return Err(Rejection::Subject(sub.to_owned()));
    }
    Ok(Validated { spiffe_id, claims })
}

fn decode_json(part: &str, what: &'static str) -> Result<Map<String, Value>, Rejection> {
    let bytes = B64.decode(part).map_err(|_| Rejection::Malformed(what))?;
    serde_json::from_slice(&bytes).map_err(|_| Rejection::Malformed(what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Datacenter, ServiceName};

    fn td() -> TrustDomain {
        "11111111-2222-3333-4444-555555555555.consul"
            .parse()
            .expect("td")
    }

    fn id(service: &str) -> SpiffeId {
        SpiffeId::service(
            td(),
            "dc1".parse::<Datacenter>().expect("dc"),
            service.parse::<ServiceName>().expect("service"),
        )
    }

    fn key() -> (JwtKey, JwtSigner) {
        let g = generate("aa:bb").expect("generate");
        let public = JwtKey::from_record(g.record).expect("public");
        let signer = JwtSigner::new(&public, &g.key_pem).expect("signer");
        (public, signer)
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_signed_token_validates_for_each_of_its_audiences_and_no_other() {
        let (public, signer) = key();
        let aud = vec!["socat".to_owned(), "db".to_owned()];
        let svid = signer.sign(&id("web"), &aud, NOW, 300).expect("sign");
        assert_eq!(svid.expires_at, NOW + 300);
        for a in ["socat", "db"] {
            let v = validate(&svid.token, a, [&public], &td(), NOW + 10).expect("valid");
            assert_eq!(v.spiffe_id, id("web"));
            assert_eq!(v.claims["sub"], id("web").to_string());
            assert_eq!(v.claims["exp"], NOW + 300);
        }
        let e = validate(&svid.token, "other", [&public], &td(), NOW).expect_err("other");
        assert!(matches!(e, Rejection::Audience(_)), "{e}");
    }

    #[test]
    fn tampering_expiry_foreign_keys_and_algorithms_are_rejected() {
        let (public, signer) = key();
        let (other, _) = key();
        let aud = vec!["socat".to_owned()];
        let token = signer.sign(&id("web"), &aud, NOW, 300).expect("sign").token;
        // A claim changed after signing: sub web -> socat.
        let parts: Vec<&str> = token.split('.').collect();
        let claims = String::from_utf8(B64.decode(parts[1]).expect("b64")).expect("utf8");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(claims.replace("/svc/web", "/svc/socat")),
            parts[2]
        );
        assert!(matches!(
            validate(&forged, "socat", [&public], &td(), NOW),
            Err(Rejection::Signature)
        ));
        // One flipped signature byte.
        let mut sig = B64.decode(parts[2]).expect("sig");
        sig[7] ^= 1;
        let flipped = format!("{}.{}.{}", parts[0], parts[1], B64.encode(&sig));
        assert!(matches!(
            validate(&flipped, "socat", [&public], &td(), NOW),
            Err(Rejection::Signature)
        ));
        // Expired (beyond the leeway).
        assert!(matches!(
            validate(&token, "socat", [&public], &td(), NOW + 300 + LEEWAY_SECS),
            Err(Rejection::Expired(_))
        ));
        assert!(
            validate(
                &token,
                "socat",
                [&public],
                &td(),
                NOW + 300 + LEEWAY_SECS - 1
            )
            .is_ok()
        );
        // Signed by a key the bundle does not list.
        assert!(matches!(
            validate(&token, "socat", [&other], &td(), NOW),
            Err(Rejection::UnknownKey(_))
        ));
        // alg none, with the original claims and no signature.
        let none = format!(
            "{}.{}.",
            B64.encode(r#"{"alg":"none","kid":"x"}"#),
            parts[1]
        );
        assert!(matches!(
            validate(&none, "socat", [&public], &td(), NOW),
            Err(Rejection::Algorithm(a)) if a == "none"
        ));
        assert!(matches!(
            validate("a.b", "socat", [&public], &td(), NOW),
            Err(Rejection::Malformed(_))
        ));
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            validate(&long, "socat", [&public], &td(), NOW).map(|_| ()),
            Err(Rejection::TooLong)
        );
    }

    #[test]
    fn a_token_of_another_trust_domain_is_rejected_even_when_signed_by_our_key() {
        let (public, signer) = key();
        let foreign: TrustDomain = "99999999-2222-3333-4444-555555555555.consul"
            .parse()
            .expect("td");
        let stranger = SpiffeId::service(
            foreign,
            "dc1".parse().expect("dc"),
            "web".parse().expect("svc"),
        );
        let token = signer
            .sign(&stranger, &["socat".to_owned()], NOW, 300)
            .expect("sign")
            .token;
        assert!(matches!(
            validate(&token, "socat", [&public], &td(), NOW),
            Err(Rejection::Subject(_))
        ));
    }

    #[test]
    fn records_are_checked_against_their_key_and_the_jwks_has_every_key() {
        let g = generate("aa:bb").expect("generate");
        let mut wrong = g.record.clone();
        wrong.key_id = "00".repeat(16);
        assert!(JwtKey::from_record(wrong).is_err());
        let a = JwtKey::from_record(g.record.clone()).expect("a");
        let (b, _) = key();
        // Another key's private half does not pass for this one.
        let other = generate("cc").expect("other");
        assert!(JwtSigner::new(&a, &other.key_pem).is_err());
        let doc: Value = serde_json::from_slice(&jwks([&a, &b])).expect("json");
        let keys = doc["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0]["kid"], g.record.key_id);
        assert_eq!(keys[0]["kty"], "EC");
        assert_eq!(keys[0]["crv"], "P-256");
        assert_eq!(keys[0]["use"], "jwt-svid");
    }

    #[test]
    fn audiences_are_bounded() {
        assert!(check_audience(&[]).is_err());
        assert!(check_audience(&[String::new()]).is_err());
        assert!(check_audience(&["a".repeat(MAX_AUDIENCE_LEN + 1)]).is_err());
        assert!(check_audience(&vec!["a".to_owned(); MAX_AUDIENCES + 1]).is_err());
        assert!(check_audience(&["socat".to_owned()]).is_ok());
    }
}
