//! The CA configuration: Consul's `{"Provider", "Config": {...}}` document, parsed
//! into typed values and validated (reference §5.6), and echoed back as it was set.
//!
//! Consul decodes the provider `Config` map loosely: keys in any case, snake_case
//! aliases (`leaf_cert_ttl`), numbers given as strings. We do the same, keep the map
//! as the user wrote it (so `GET` shows what `PUT` said, with defaults filled in) and
//! never echo the private key.

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Error;
use crate::duration;

/// The only provider this build has: Consul's built-in CA.
pub const PROVIDER_CONSUL: &str = "consul";

/// Leaf lifetime when none is configured (Consul: 72h).
pub const DEFAULT_LEAF_CERT_TTL: Duration = Duration::from_secs(72 * 3600);
/// Echoed only: the built-in CA does not rotate on a schedule (Consul: 2160h).
pub const DEFAULT_ROTATION_PERIOD: Duration = Duration::from_secs(2160 * 3600);
/// Echoed and checked against the leaf TTL (Consul: 8760h).
pub const DEFAULT_INTERMEDIATE_CERT_TTL: Duration = Duration::from_secs(8760 * 3600);
/// Root lifetime: 10 years (Consul: 87600h).
pub const DEFAULT_ROOT_CERT_TTL: Duration = Duration::from_secs(87600 * 3600);
/// Consul's lower bound on LeafCertTTL.
pub const MIN_LEAF_CERT_TTL: Duration = Duration::from_secs(3600);
/// Consul's upper bound on LeafCertTTL (one year).
pub const MAX_LEAF_CERT_TTL: Duration = Duration::from_secs(8760 * 3600);
/// JWT-SVID lifetime when none is configured (`JWTSVIDTTL`; not a Consul
/// setting: Consul has no JWT-SVIDs). Short, because a bearer token cannot be
/// revoked: SPIRE's default is 5 minutes too.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(5 * 60);
/// Bounds of `JWTSVIDTTL`: long enough to outlast the validators' clock skew,
/// short enough to stay a short-lived token.
pub const MIN_JWT_SVID_TTL: Duration = Duration::from_secs(60);
pub const MAX_JWT_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// Consul's CSR rate default (echoed; signing is local to each agent here).
pub const DEFAULT_CSR_MAX_PER_SECOND: f64 = 50.0;

/// The CA key's algorithm. Leaves are always P-256 whatever the CA uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyType {
    /// ECDSA P-256 (the default).
    EcP256,
    /// ECDSA P-384.
    EcP384,
}

impl KeyType {
    /// Consul's `PrivateKeyType`.
    pub fn type_name(self) -> &'static str {
        "ec"
    }

    /// Consul's `PrivateKeyBits`.
    pub fn bits(self) -> u32 {
        match self {
            KeyType::EcP256 => 256,
            KeyType::EcP384 => 384,
        }
    }
}

/// A private key given in the configuration. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretPem(pub String);

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

/// A validated CA configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct CaConfig {
    pub provider: String,
    pub leaf_cert_ttl: Duration,
    pub rotation_period: Duration,
    pub intermediate_cert_ttl: Duration,
    pub root_cert_ttl: Duration,
    /// Lifetime of JWT-SVIDs (`JWTSVIDTTL`).
    pub jwt_svid_ttl: Duration,
    pub key_type: KeyType,
    /// A CA key the operator supplied (`PrivateKey`); `None` = the CA generates one.
    pub private_key: Option<SecretPem>,
    pub csr_max_per_second: f64,
    pub csr_max_concurrent: u64,
    pub force_without_cross_signing: bool,
    /// The `Config` map as it was set, private key included (stored, never echoed).
    raw: Map<String, Value>,
}

/// What is stored under `ca/config` and sent by `PUT /v1/connect/ca/configuration`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ConfigDocument {
    #[serde(default)]
    pub provider: String,
    #[serde(default)]
    pub config: Map<String, Value>,
    #[serde(default)]
    pub force_without_cross_signing: bool,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            provider: PROVIDER_CONSUL.to_owned(),
            leaf_cert_ttl: DEFAULT_LEAF_CERT_TTL,
            rotation_period: DEFAULT_ROTATION_PERIOD,
            intermediate_cert_ttl: DEFAULT_INTERMEDIATE_CERT_TTL,
            root_cert_ttl: DEFAULT_ROOT_CERT_TTL,
            jwt_svid_ttl: DEFAULT_JWT_SVID_TTL,
            key_type: KeyType::EcP256,
            private_key: None,
            csr_max_per_second: DEFAULT_CSR_MAX_PER_SECOND,
            csr_max_concurrent: 0,
            force_without_cross_signing: false,
            raw: Map::new(),
        }
    }
}

impl CaConfig {
    /// Parses a request body as Consul does: top-level keys in any case,
    /// `force_without_cross_signing` accepted too.
    pub fn from_request(body: &Value) -> Result<Self, Error> {
        let obj = body.as_object().ok_or(Error::InvalidConfig {
            field: "body",
            reason: "expected a JSON object".to_owned(),
        })?;
        let mut doc = ConfigDocument {
            provider: String::new(),
            config: Map::new(),
            force_without_cross_signing: false,
        };
        for (k, v) in obj {
            match normalize_key(k).as_str() {
                "provider" => {
                    doc.provider = v
                        .as_str()
                        .ok_or(Error::InvalidConfig {
                            field: "Provider",
                            reason: "expected a string".to_owned(),
                        })?
                        .to_owned()
                }
                "config" => {
                    doc.config = match v {
                        Value::Object(m) => m.clone(),
                        Value::Null => Map::new(),
                        _ => {
                            return Err(Error::InvalidConfig {
                                field: "Config",
                                reason: "expected an object".to_owned(),
                            });
                        }
                    }
                }
                "forcewithoutcrosssigning" => {
                    doc.force_without_cross_signing = as_bool(v).ok_or(Error::InvalidConfig {
                        field: "ForceWithoutCrossSigning",
                        reason: "expected a boolean".to_owned(),
                    })?
                }
                "state" => return Err(Error::StateNotSettable),
                // Consul ignores what it does not know (ClusterID, indexes, ...).
                _ => {}
            }
        }
        Self::from_document(&doc)
    }

    /// Parses and validates a stored or submitted document.
    pub fn from_document(doc: &ConfigDocument) -> Result<Self, Error> {
        let provider = if doc.provider.is_empty() {
            PROVIDER_CONSUL.to_owned()
        } else {
            doc.provider.clone()
        };
        if provider != PROVIDER_CONSUL {
            return Err(Error::UnsupportedProvider { provider });
        }
        let mut c = CaConfig {
            provider,
            force_without_cross_signing: doc.force_without_cross_signing,
            raw: doc.config.clone(),
            ..CaConfig::default()
        };
        let mut key_type_name: Option<String> = None;
        let mut key_bits: Option<u64> = None;
        for (k, v) in &doc.config {
            match normalize_key(k).as_str() {
                "leafcertttl" => c.leaf_cert_ttl = as_duration("LeafCertTTL", v)?,
                "rotationperiod" => c.rotation_period = as_duration("RotationPeriod", v)?,
                "intermediatecertttl" => {
                    c.intermediate_cert_ttl = as_duration("IntermediateCertTTL", v)?
                }
                "rootcertttl" => c.root_cert_ttl = as_duration("RootCertTTL", v)?,
                "jwtsvidttl" => c.jwt_svid_ttl = as_duration("JWTSVIDTTL", v)?,
                "privatekeytype" => {
                    key_type_name = Some(
                        v.as_str()
                            .ok_or(Error::InvalidConfig {
                                field: "PrivateKeyType",
                                reason: "expected a string".to_owned(),
                            })?
                            .to_ascii_lowercase(),
                    )
                }
                "privatekeybits" => key_bits = Some(as_u64("PrivateKeyBits", v)?),
                "privatekey" => {
                    let pem = v.as_str().ok_or(Error::InvalidConfig {
                        field: "PrivateKey",
                        reason: "expected a PEM string".to_owned(),
                    })?;
                    if !pem.trim().is_empty() {
                        c.private_key = Some(SecretPem(pem.to_owned()));
                    }
                }
                "rootcert" if v.as_str().is_some_and(|s| !s.trim().is_empty()) => {
                    return Err(Error::InvalidConfig {
                        field: "RootCert",
                        reason: "RootCert is not supported: the built-in CA makes its own root; \
                                 give only PrivateKey to bring your own key"
                            .to_owned(),
                    });
                }
                "csrmaxpersecond" => c.csr_max_per_second = as_f64("CSRMaxPerSecond", v)?,
                "csrmaxconcurrent" => c.csr_max_concurrent = as_u64("CSRMaxConcurrent", v)?,
                _ => {}
            }
        }
        c.key_type = match (key_type_name.as_deref().unwrap_or("ec"), key_bits) {
            ("ec", None | Some(0) | Some(256)) => KeyType::EcP256,
            ("ec", Some(384)) => KeyType::EcP384,
            ("ec", Some(bits)) => {
                return Err(Error::InvalidConfig {
                    field: "PrivateKeyBits",
                    reason: format!("EC keys of {bits} bits are not supported (use 256 or 384)"),
                });
            }
            (other, _) => {
                return Err(Error::InvalidConfig {
                    field: "PrivateKeyType",
                    reason: format!("{other:?} is not supported by the built-in CA (use \"ec\")"),
                });
            }
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |field, reason: String| Err(Error::InvalidConfig { field, reason });
        if self.leaf_cert_ttl < MIN_LEAF_CERT_TTL {
            return bad(
                "LeafCertTTL",
                format!(
                    "leaf cert TTL must be greater or equal than {}",
                    duration::format(MIN_LEAF_CERT_TTL)
                ),
            );
        }
        if self.leaf_cert_ttl > MAX_LEAF_CERT_TTL {
            return bad(
                "LeafCertTTL",
                format!(
                    "leaf cert TTL must be less than {}",
                    duration::format(MAX_LEAF_CERT_TTL)
                ),
            );
        }
        let three_leaves = self.leaf_cert_ttl * 3;
        if self.intermediate_cert_ttl < three_leaves {
            return bad(
                "IntermediateCertTTL",
                format!(
                    "intermediate cert TTL must be greater or equal than 3 * LeafCertTTL (>={})",
                    duration::format(three_leaves)
                ),
            );
        }
        // A root must outlive the leaves it signs, with room for a rotation.
        if self.root_cert_ttl < three_leaves {
            return bad(
                "RootCertTTL",
                format!(
                    "root cert TTL must be greater or equal than 3 * LeafCertTTL (>={})",
                    duration::format(three_leaves)
                ),
            );
        }
        if !(MIN_JWT_SVID_TTL..=MAX_JWT_SVID_TTL).contains(&self.jwt_svid_ttl) {
            return bad(
                "JWTSVIDTTL",
                format!(
                    "JWT-SVID TTL must be between {} and {}",
                    duration::format(MIN_JWT_SVID_TTL),
                    duration::format(MAX_JWT_SVID_TTL)
                ),
            );
        }
        if !(self.csr_max_per_second.is_finite() && self.csr_max_per_second >= 0.0) {
            return bad(
                "CSRMaxPerSecond",
                "must be a non-negative number".to_owned(),
            );
        }
        Ok(())
    }

    /// Whether going from `self` to `next` needs a new root: a different CA key
    /// (supplied, or no longer supplied) or key type. Consul rotates on exactly these;
    /// TTL changes only apply to what is signed next.
    pub fn needs_new_root(&self, next: &CaConfig) -> bool {
        self.key_type != next.key_type
            || match (&self.private_key, &next.private_key) {
                (_, Some(n)) => self.private_key.as_ref() != Some(n),
                (Some(_), None) => true,
                (None, None) => false,
            }
    }

    /// The document to store (private key included).
    pub fn to_document(&self) -> ConfigDocument {
        ConfigDocument {
            provider: self.provider.clone(),
            config: self.raw.clone(),
            force_without_cross_signing: self.force_without_cross_signing,
        }
    }

    /// The `Config` map to show: as set, defaults filled in, private key removed.
    pub fn public_map(&self) -> Map<String, Value> {
        let mut m: Map<String, Value> = self
            .raw
            .iter()
            .filter(|(k, _)| normalize_key(k) != "privatekey")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let present = |m: &Map<String, Value>, key: &str| {
            m.keys().any(|k| normalize_key(k) == normalize_key(key))
        };
        let defaults: [(&str, Value); 8] = [
            ("LeafCertTTL", go_dur(self.leaf_cert_ttl)),
            ("RotationPeriod", go_dur(self.rotation_period)),
            ("IntermediateCertTTL", go_dur(self.intermediate_cert_ttl)),
            ("RootCertTTL", go_dur(self.root_cert_ttl)),
            ("JWTSVIDTTL", go_dur(self.jwt_svid_ttl)),
            ("PrivateKeyType", Value::from(self.key_type.type_name())),
            ("PrivateKeyBits", Value::from(self.key_type.bits())),
            ("CSRMaxPerSecond", go_number(self.csr_max_per_second)),
        ];
        for (k, v) in defaults {
            if !present(&m, k) {
                m.insert(k.to_owned(), v);
            }
        }
        if !present(&m, "CSRMaxConcurrent") {
            m.insert(
                "CSRMaxConcurrent".to_owned(),
                Value::from(self.csr_max_concurrent),
            );
        }
        m
    }
}

/// A float as Go's JSON encoder writes it: `50`, not `50.0`.
fn go_number(v: f64) -> Value {
    if v.fract() == 0.0 && (0.0..9.0e15).contains(&v) {
        Value::from(v as u64)
    } else {
        Value::from(v)
    }
}

/// Consul-style short durations for defaults (`72h`, not `72h0m0s`).
fn go_dur(d: Duration) -> Value {
    let secs = d.as_secs();
    if d.subsec_nanos() == 0 && secs.is_multiple_of(3600) {
        Value::from(format!("{}h", secs / 3600))
    } else {
        Value::from(duration::format(d))
    }
}

/// `LeafCertTTL`, `leaf_cert_ttl` and `leafcertttl` are the same key.
fn normalize_key(k: &str) -> String {
    k.chars()
        .filter(|c| *c != '_' && *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn as_duration(field: &'static str, v: &Value) -> Result<Duration, Error> {
    match v {
        Value::String(s) => duration::parse(s).map_err(|e| Error::InvalidConfig {
            field,
            reason: e.to_string(),
        }),
        // Go's time.Duration is nanoseconds; mapstructure takes bare numbers as such.
        Value::Number(n) => n
            .as_u64()
            .map(Duration::from_nanos)
            .ok_or(Error::InvalidConfig {
                field,
                reason: "expected a non-negative duration".to_owned(),
            }),
        _ => Err(Error::InvalidConfig {
            field,
            reason: "expected a duration such as \"72h\"".to_owned(),
        }),
    }
}

fn as_u64(field: &'static str, v: &Value) -> Result<u64, Error> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.ok_or(Error::InvalidConfig {
        field,
        reason: "expected a non-negative integer".to_owned(),
    })
}

fn as_f64(field: &'static str, v: &Value) -> Result<f64, Error> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.ok_or(Error::InvalidConfig {
        field,
        reason: "expected a number".to_owned(),
    })
}

fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.as_str() {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
            "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults_and_echo() {
        let c =
            CaConfig::from_request(&json!({"Provider": "consul", "Config": {}})).expect("valid");
        assert_eq!(c.leaf_cert_ttl, DEFAULT_LEAF_CERT_TTL);
        assert_eq!(c.root_cert_ttl, DEFAULT_ROOT_CERT_TTL);
        let m = c.public_map();
        assert_eq!(m["LeafCertTTL"], json!("72h"));
        assert_eq!(m["RotationPeriod"], json!("2160h"));
        assert_eq!(m["IntermediateCertTTL"], json!("8760h"));
        assert_eq!(m["PrivateKeyType"], json!("ec"));
        assert_eq!(m["PrivateKeyBits"], json!(256));
        assert_eq!(m["CSRMaxPerSecond"], json!(50));
        assert_eq!(c.jwt_svid_ttl, DEFAULT_JWT_SVID_TTL);
        assert_eq!(m["JWTSVIDTTL"], json!("5m0s"));
    }

    #[test]
    fn the_jwt_svid_ttl_is_configurable_within_bounds() {
        let c = CaConfig::from_request(&json!({"Config": {"jwt_svid_ttl": "90s"}})).expect("valid");
        assert_eq!(c.jwt_svid_ttl, Duration::from_secs(90));
        for bad in ["59s", "25h"] {
            let e = CaConfig::from_request(&json!({"Config": {"JWTSVIDTTL": bad}})).expect_err(bad);
            assert!(e.to_string().contains("JWT-SVID TTL"), "{e}");
        }
    }

    #[test]
    fn keys_in_any_case_and_values_as_written() {
        let c = CaConfig::from_request(&json!({
            "provider": "consul",
            "config": {"leaf_cert_ttl": "24h", "PrivateKeyBits": "384", "PrivateKey": "secret"},
            "force_without_cross_signing": true,
        }))
        .expect("valid");
        assert_eq!(c.leaf_cert_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(c.key_type, KeyType::EcP384);
        assert!(c.force_without_cross_signing);
        let m = c.public_map();
        assert_eq!(m["leaf_cert_ttl"], json!("24h"));
        assert!(!m.contains_key("LeafCertTTL"), "no duplicate of a set key");
        assert!(!m.keys().any(|k| k == "PrivateKey"), "private key echoed");
    }

    #[test]
    fn invalid_configs() {
        let cases = [
            (json!({"Provider": "vault"}), "not supported"),
            (
                json!({"Config": {"LeafCertTTL": "30m"}}),
                "leaf cert TTL must be greater or equal than 1h0m0s",
            ),
            (
                json!({"Config": {"LeafCertTTL": "9000h"}}),
                "leaf cert TTL must be less than",
            ),
            (
                json!({"Config": {"LeafCertTTL": "72h", "IntermediateCertTTL": "100h"}}),
                "intermediate cert TTL must be greater or equal than 3 * LeafCertTTL (>=216h0m0s)",
            ),
            (
                json!({"Config": {"LeafCertTTL": "soon"}}),
                "invalid duration",
            ),
            (
                json!({"Config": {"PrivateKeyType": "rsa"}}),
                "not supported",
            ),
            (json!({"Config": {"PrivateKeyBits": 521}}), "521 bits"),
            (json!({"Config": {"RootCert": "-----BEGIN"}}), "RootCert"),
            (json!({"State": {"x": "y"}}), "State"),
            (json!([1]), "JSON object"),
        ];
        for (body, want) in cases {
            let err = CaConfig::from_request(&body).expect_err("must be refused");
            assert!(err.to_string().contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn root_changes() {
        let base = CaConfig::default();
        let ttl = CaConfig::from_request(&json!({"Config": {"LeafCertTTL": "24h"}})).expect("ok");
        let bits = CaConfig::from_request(&json!({"Config": {"PrivateKeyBits": 384}})).expect("ok");
        let key = CaConfig::from_request(&json!({"Config": {"PrivateKey": "k"}})).expect("ok");
        assert!(!base.needs_new_root(&ttl));
        assert!(base.needs_new_root(&bits));
        assert!(base.needs_new_root(&key));
        assert!(!key.needs_new_root(&key.clone()));
        assert!(key.needs_new_root(&base));
    }

    #[test]
    fn document_round_trip() {
        let c =
            CaConfig::from_request(&json!({"Config": {"LeafCertTTL": "2h", "PrivateKey": "k"}}))
                .expect("ok");
        let doc = c.to_document();
        let back = CaConfig::from_document(&doc).expect("stored config parses");
        assert_eq!(back, c);
    }
}
