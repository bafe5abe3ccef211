//! ACL tokens and policies: the records kept in the store, the request bodies that
//! create them (Consul's JSON, case-insensitive keys) and the JSON clients see.
//!
//! A token's secret is never stored: its record holds the SHA-256 of the secret, and
//! the secret is shown once, in the answer to the request that made the token.
//! Secrets are random UUIDs (122 random bits), so a plain hash cannot be reversed
//! by guessing; a slow password hash would only slow every request down.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::rules::{Rules, RulesError};
use crate::{identity::ServiceName, store::Index};

/// Consul's builtin management policy (`global-management`).
pub const MANAGEMENT_POLICY_ID: Uuid = Uuid::from_u128(1);
pub const MANAGEMENT_POLICY_NAME: &str = "global-management";
/// Consul's rules of the management policy: everything, ACLs included.
pub const MANAGEMENT_RULES: &str = r#"acl = "write"
agent_prefix "" {
  policy = "write"
}
event_prefix "" {
  policy = "write"
}
key_prefix "" {
  policy = "write"
}
keyring = "write"
node_prefix "" {
  policy = "write"
}
operator = "write"
mesh = "write"
peering = "write"
query_prefix "" {
  policy = "write"
}
service_prefix "" {
  policy = "write"
  intentions = "write"
}
session_prefix "" {
  policy = "write"
}"#;
/// The accessor Consul gives the anonymous token (requests without a secret).
pub const ANONYMOUS_ACCESSOR: Uuid = Uuid::from_u128(2);
/// What token reads show instead of a secret this agent does not keep.
pub const HIDDEN_SECRET: &str = "<hidden>";
/// Consul's limits on policy names and descriptions.
const MAX_NAME_LEN: usize = 128;
const MAX_DESCRIPTION_LEN: usize = 512;
/// Bounds on a token's links, so a token cannot make authorization expensive.
const MAX_LINKS: usize = 64;

/// Why a token or policy request was refused. The client is at fault (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("Request decode failed: the body must be a JSON object")]
    NotAnObject,
    #[error("Request decode failed: {field} must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("{field} must be a UUID")]
    NotUuid { field: &'static str },
    #[error("Invalid Policy: the Name must be 1-{MAX_NAME_LEN} letters, digits, '-' or '_'")]
    PolicyName,
    #[error("Description exceeds maximum length {MAX_DESCRIPTION_LEN}")]
    DescriptionTooLong,
    #[error("Invalid Policy: {source}")]
    Rules {
        #[source]
        source: RulesError,
    },
    #[error("Invalid service identity: {reason}")]
    ServiceIdentity { reason: String },
    #[error("Invalid node identity: {reason}")]
    NodeIdentity { reason: String },
    #[error("a policy link needs an ID or a Name")]
    EmptyLink,
    #[error("a token may have at most {MAX_LINKS} policies and identities each")]
    TooManyLinks,
    #[error("{field} are not supported by Connect")]
    Unsupported { field: &'static str },
    #[error("the AccessorID in the body does not match the one in the path")]
    AccessorMismatch,
    #[error("the ID in the body does not match the one in the path")]
    PolicyIdMismatch,
}

/// A token's link to a policy, by ID or by name (names resolve when the token is
/// written; the record keeps IDs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyLink {
    Id(Uuid),
    Name(String),
}

/// `{"ServiceName": "web", "Datacenters": ["dc1"]}`: `service:write` on the service
/// and its sidecar, `read` on every service and node (Consul's service identity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceIdentity {
    pub service_name: ServiceName,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datacenters: Vec<String>,
}

/// `{"NodeName": "n1", "Datacenter": "dc1"}`: `node:write` on the node, `read` on
/// every service (Consul's node identity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeIdentity {
    pub node_name: String,
    pub datacenter: String,
}

impl ServiceIdentity {
    /// The rules this identity stands for.
    pub fn rules(&self) -> Rules {
        use super::rules::{Access, ServiceRule};
        let write = ServiceRule {
            policy: Access::Write,
            intentions: None,
        };
        let read = ServiceRule {
            policy: Access::Read,
            intentions: None,
        };
        let name = self.service_name.as_str();
        let mut r = Rules::default();
        r.services.insert(name.to_owned(), write);
        r.services.insert(format!("{name}-sidecar-proxy"), write);
        r.service_prefixes.insert(String::new(), read);
        r.node_prefixes.insert(String::new(), Access::Read);
        r
    }

    pub fn applies_in(&self, dc: &str) -> bool {
        self.datacenters.is_empty() || self.datacenters.iter().any(|d| d == dc)
    }
}

impl NodeIdentity {
    pub fn rules(&self) -> Rules {
        use super::rules::{Access, ServiceRule};
        let mut r = Rules::default();
        r.nodes.insert(self.node_name.clone(), Access::Write);
        r.service_prefixes.insert(
            String::new(),
            ServiceRule {
                policy: Access::Read,
                intentions: None,
            },
        );
        r
    }
}

/// A token as stored under `acl/token/<accessor>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TokenRecord {
    #[serde(rename = "AccessorID")]
    pub accessor_id: Uuid,
    /// Hex SHA-256 of the secret; the secret itself is never stored.
    #[serde(rename = "SecretSHA256")]
    pub secret_sha256: String,
    pub description: String,
    pub policies: Vec<Uuid>,
    #[serde(default)]
    pub service_identities: Vec<ServiceIdentity>,
    #[serde(default)]
    pub node_identities: Vec<NodeIdentity>,
    #[serde(default)]
    pub local: bool,
    pub create_time: String,
}

/// A policy as stored under `acl/policy/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PolicyRecord {
    #[serde(rename = "ID")]
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// The rules as written (HCL or JSON), parsed again on load.
    pub rules: String,
    #[serde(default)]
    pub datacenters: Vec<String>,
}

/// The SHA-256 of a secret, as the store and the lookup table key it.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// What a token write asks for, parsed and checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRequest {
    pub accessor_id: Option<Uuid>,
    pub secret_id: Option<Uuid>,
    pub description: String,
    pub policies: Vec<PolicyLink>,
    pub service_identities: Vec<ServiceIdentity>,
    pub node_identities: Vec<NodeIdentity>,
    pub local: bool,
}

/// What a policy write asks for, parsed and checked (the rules parse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRequest {
    pub id: Option<Uuid>,
    pub name: String,
    pub description: String,
    pub rules: String,
    pub datacenters: Vec<String>,
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name)
        .or_else(|| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

fn string(obj: &Map<String, Value>, name: &'static str) -> Result<Option<String>, InputError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(InputError::WrongType {
            field: name,
            expected: "a string",
        }),
    }
}

fn uuid_field(obj: &Map<String, Value>, name: &'static str) -> Result<Option<Uuid>, InputError> {
    match string(obj, name)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => Uuid::parse_str(&s)
            .map(Some)
            .map_err(|_| InputError::NotUuid { field: name }),
    }
}

fn list<'a>(obj: &'a Map<String, Value>, name: &'static str) -> Result<&'a [Value], InputError> {
    match field(obj, name) {
        None => Ok(&[]),
        Some(Value::Array(items)) if items.len() > MAX_LINKS => Err(InputError::TooManyLinks),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(InputError::WrongType {
            field: name,
            expected: "a list",
        }),
    }
}

fn description(obj: &Map<String, Value>) -> Result<String, InputError> {
    let d = string(obj, "Description")?.unwrap_or_default();
    if d.chars().count() > MAX_DESCRIPTION_LEN {
        return Err(InputError::DescriptionTooLong);
    }
    Ok(d)
}

fn strings(items: &[Value], field: &'static str) -> Result<Vec<String>, InputError> {
    items
        .iter()
        .map(|v| {
            v.as_str().map(str::to_owned).ok_or(InputError::WrongType {
                field,
                expected: "a list of strings",
            })
        })
        .collect()
}

impl TokenRequest {
    /// Parses `PUT /v1/acl/token[/<id>]` bodies. Roles, templated policies, auth
    /// methods and expiry are refused rather than silently dropped: a token that
    /// outlives the expiry its creator asked for would be a hole.
    pub fn from_json(v: &Value) -> Result<Self, InputError> {
        let obj = v.as_object().ok_or(InputError::NotAnObject)?;
        for (name, what) in [
            ("Roles", "Roles"),
            ("TemplatedPolicies", "TemplatedPolicies"),
        ] {
            if !list(obj, name)?.is_empty() {
                return Err(InputError::Unsupported { field: what });
            }
        }
        for name in ["ExpirationTime", "ExpirationTTL", "AuthMethod"] {
            if field(obj, name).is_some_and(|v| v.as_str() != Some("")) {
                return Err(InputError::Unsupported {
                    field: match name {
                        "AuthMethod" => "auth methods",
                        _ => "token expiration times",
                    },
                });
            }
        }
        let mut policies = Vec::new();
        for item in list(obj, "Policies")? {
            let link = item.as_object().ok_or(InputError::WrongType {
                field: "Policies",
                expected: "a list of {\"ID\"} or {\"Name\"} objects",
            })?;
            match (uuid_field(link, "ID")?, string(link, "Name")?) {
                (Some(id), _) => policies.push(PolicyLink::Id(id)),
                (None, Some(name)) if !name.is_empty() => policies.push(PolicyLink::Name(name)),
                _ => return Err(InputError::EmptyLink),
            }
        }
        let mut service_identities = Vec::new();
        for item in list(obj, "ServiceIdentities")? {
            let o = item.as_object().ok_or(InputError::WrongType {
                field: "ServiceIdentities",
                expected: "a list of objects",
            })?;
            let name = string(o, "ServiceName")?.unwrap_or_default();
            let service_name =
                name.parse::<ServiceName>()
                    .map_err(|e| InputError::ServiceIdentity {
                        reason: e.to_string(),
                    })?;
            let datacenters = strings(list(o, "Datacenters")?, "Datacenters")?;
            service_identities.push(ServiceIdentity {
                service_name,
                datacenters,
            });
        }
        let mut node_identities = Vec::new();
        for item in list(obj, "NodeIdentities")? {
            let o = item.as_object().ok_or(InputError::WrongType {
                field: "NodeIdentities",
                expected: "a list of objects",
            })?;
            let node_name = string(o, "NodeName")?.unwrap_or_default();
            let datacenter = string(o, "Datacenter")?.unwrap_or_default();
            if node_name.is_empty() || datacenter.is_empty() {
                return Err(InputError::NodeIdentity {
                    reason: "NodeName and Datacenter must be set".to_owned(),
                });
            }
            node_identities.push(NodeIdentity {
                node_name,
                datacenter,
            });
        }
        let local = match field(obj, "Local") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(InputError::WrongType {
                    field: "Local",
                    expected: "a boolean",
                });
            }
        };
        Ok(TokenRequest {
            accessor_id: uuid_field(obj, "AccessorID")?,
            secret_id: uuid_field(obj, "SecretID")?,
            description: description(obj)?,
            policies,
            service_identities,
            node_identities,
            local,
        })
    }
}

impl PolicyRequest {
    /// Parses `PUT /v1/acl/policy[/<id>]` bodies; the rules must parse.
    pub fn from_json(v: &Value) -> Result<Self, InputError> {
        let obj = v.as_object().ok_or(InputError::NotAnObject)?;
        let name = string(obj, "Name")?.unwrap_or_default();
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(InputError::PolicyName);
        }
        let rules = string(obj, "Rules")?.unwrap_or_default();
        Rules::parse(&rules).map_err(|source| InputError::Rules { source })?;
        Ok(PolicyRequest {
            id: uuid_field(obj, "ID")?,
            name,
            description: description(obj)?,
            rules,
            datacenters: strings(list(obj, "Datacenters")?, "Datacenters")?,
        })
    }
}

// ───────────────────────────── API shapes ─────────────────────────────

/// `{"ID", "Name"}` of a token's policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PolicyLinkJson {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
}

/// Consul's `ACLToken` (reads show `SecretID` as `<hidden>`; see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TokenJson {
    #[serde(rename = "AccessorID")]
    pub accessor_id: String,
    #[serde(rename = "SecretID")]
    pub secret_id: String,
    pub description: String,
    pub policies: Vec<PolicyLinkJson>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_identities: Vec<ServiceIdentity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_identities: Vec<NodeIdentity>,
    pub local: bool,
    pub create_time: String,
    pub hash: String,
    pub create_index: Index,
    pub modify_index: Index,
}

/// Consul's `ACLPolicy`; lists leave out `Rules` (Consul's list stub).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PolicyJson {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datacenters: Vec<String>,
    pub hash: String,
    pub create_index: Index,
    pub modify_index: Index,
}

/// Base64 SHA-256 of a record's content: Consul's `Hash`, which changes whenever
/// the content does.
pub fn content_hash<T: Serialize>(record: &T) -> String {
    use base64::Engine;
    let bytes = serde_json::to_vec(record).unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&bytes))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn token_requests() {
        let id = Uuid::new_v4();
        let r = TokenRequest::from_json(&json!({
            "description": "web token",
            "Policies": [{"ID": id.to_string()}, {"Name": "readers"}],
            "ServiceIdentities": [{"ServiceName": "web", "Datacenters": ["dc1"]}],
            "NodeIdentities": [{"NodeName": "n1", "Datacenter": "dc1"}],
            "Local": true
        }))
        .expect("valid");
        assert_eq!(r.description, "web token");
        assert_eq!(
            r.policies,
            [PolicyLink::Id(id), PolicyLink::Name("readers".into())]
        );
        assert_eq!(r.service_identities[0].service_name.as_str(), "web");
        assert_eq!(r.node_identities[0].node_name, "n1");
        assert!(r.local);

        let bad: &[(Value, &str)] = &[
            (json!([]), "JSON object"),
            (json!({"SecretID": "nope"}), "SecretID must be a UUID"),
            (json!({"Policies": [{}]}), "needs an ID or a Name"),
            (json!({"Policies": "x"}), "Policies must be a list"),
            (json!({"Roles": [{"Name": "r"}]}), "Roles are not supported"),
            (json!({"ExpirationTTL": "1h"}), "expiration"),
            (
                json!({"ServiceIdentities": [{"ServiceName": "we b"}]}),
                "service identity",
            ),
            (
                json!({"NodeIdentities": [{"NodeName": "n"}]}),
                "node identity",
            ),
            (json!({"Description": "x".repeat(600)}), "maximum length"),
            (
                json!({"Policies": vec![json!({"Name": "p"}); 65]}),
                "at most",
            ),
        ];
        for (body, want) in bad {
            let e = TokenRequest::from_json(body).expect_err(&body.to_string());
            assert!(e.to_string().contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn policy_requests() {
        // py-consul: lowercase keys, rules as a JSON document in a string.
        let rules = json!({"service": {"web": {"policy": "write"}}}).to_string();
        let p =
            PolicyRequest::from_json(&json!({"name": "web-write", "rules": rules})).expect("valid");
        assert_eq!(p.name, "web-write");
        assert_eq!(p.rules, rules);
        for (body, want) in [
            (json!({"Name": ""}), "Name must be"),
            (json!({"Name": "a b"}), "Name must be"),
            (json!({"Name": "p", "Rules": "service {"}), "Invalid Policy"),
            (json!({"Name": "p", "ID": "x"}), "ID must be a UUID"),
        ] {
            let e = PolicyRequest::from_json(&body).expect_err(&body.to_string());
            assert!(e.to_string().contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn identities_expand_to_consuls_templates() {
        let si = ServiceIdentity {
            service_name: "web".parse().expect("name"),
            datacenters: vec![],
        };
        let r = si.rules();
        assert!(r.services.contains_key("web"));
        assert!(r.services.contains_key("web-sidecar-proxy"));
        assert!(r.service_prefixes.contains_key(""));
        assert!(si.applies_in("dc9"));
        let ni = NodeIdentity {
            node_name: "n1".into(),
            datacenter: "dc1".into(),
        };
        assert!(ni.rules().nodes.contains_key("n1"));
        assert!(Rules::parse(MANAGEMENT_RULES).is_ok());
    }
}
