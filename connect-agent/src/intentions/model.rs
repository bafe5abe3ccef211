//! The intention model: what an intention is ([`Intention`], [`Selector`], [`Action`]),
//! Consul's precedence values, the validated content a write carries ([`Spec`]), how a
//! request body becomes one ([`Body`], case-insensitive keys as Consul decodes them),
//! the JSON clients see ([`ApiIntention`]) and the record kept in the store.
//!
//! It owns validation and the wire shapes; it does not own storage (the parent module)
//! or matching (`table`).

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{
    identity::{self, ServiceName},
    store::Index,
};

/// The only namespace in open-source Consul, and so the only one here.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The lone wildcard a source or destination may be.
pub const WILDCARD: &str = "*";
/// The only source type Consul knows.
pub const SOURCE_TYPE_CONSUL: &str = "consul";
/// Consul's limits on free-form fields (`structs.Intention.Validate`).
pub const MAX_DESCRIPTION_LEN: usize = 512;
pub const MAX_META_PAIRS: usize = 64;
pub const MAX_META_KEY_LEN: usize = 128;
pub const MAX_META_VALUE_LEN: usize = 512;

/// Why a request's intention content was refused. The client is at fault; the API
/// answers 400 with this text (Consul's wording where it has one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("Request decode failed: the body must be a JSON object")]
    NotAnObject,
    #[error("Request decode failed: {field} must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("{field} must be set")]
    Missing { field: &'static str },
    #[error("{field}: wildcard character '*' cannot be used with partial values")]
    PartialWildcard { field: &'static str },
    #[error("{field}: {source}")]
    BadName {
        field: &'static str,
        #[source]
        source: identity::Error,
    },
    #[error(
        "{field} {value:?} is not supported: only the \"default\" namespace exists (namespaces are a Consul Enterprise feature)"
    )]
    Namespace { field: &'static str, value: String },
    #[error("{field}: input can contain at most one '/'")]
    TooManySlashes { field: &'static str },
    #[error("Action must be set to 'allow' or 'deny'")]
    Action,
    #[error("SourceType must be set to 'consul'")]
    SourceType,
    #[error("Description exceeds maximum length {MAX_DESCRIPTION_LEN}")]
    DescriptionTooLong,
    #[error("Meta exceeds maximum element count {MAX_META_PAIRS}")]
    MetaTooMany,
    #[error("Meta key {key:?} is invalid: keys must be 1-{MAX_META_KEY_LEN} characters")]
    MetaKey { key: String },
    #[error("Meta value of key {key:?} exceeds maximum length {MAX_META_VALUE_LEN}")]
    MetaValueTooLong { key: String },
    #[error("ID must be empty")]
    IdNotEmpty,
    #[error("Meta must not be specified")]
    MetaNotAllowed,
    #[error("Meta must not be specified, or should be unchanged during an update.")]
    MetaChanged,
    #[error("Permissions (L7 intentions) are not supported: Connect authorizes connections at L4")]
    Permissions,
    #[error("invalid intention ID {value:?}: it is not a UUID")]
    BadId { value: String },
}

impl crate::fault::Blame for InputError {
    fn fault(&self) -> crate::fault::Fault {
        crate::fault::Fault::Caller
    }
}

// ───────────────────────────── names ─────────────────────────────

/// The source or destination of an intention: one service, or every service (`*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    Any,
    Service(ServiceName),
}

impl Selector {
    /// Parses a bare name (`web` or `*`); `field` names the input in errors.
    pub fn parse(field: &'static str, s: &str) -> Result<Self, InputError> {
        if s == WILDCARD {
            return Ok(Selector::Any);
        }
        if s.contains('*') {
            return Err(InputError::PartialWildcard { field });
        }
        if s.is_empty() {
            return Err(InputError::Missing { field });
        }
        s.parse()
            .map(Selector::Service)
            .map_err(|source| InputError::BadName { field, source })
    }

    /// Parses a name as query parameters give it: `name` or `namespace/name`, where
    /// the namespace, if given, must be `default`.
    pub fn parse_qualified(field: &'static str, s: &str) -> Result<Self, InputError> {
        let mut parts = s.splitn(3, '/');
        let first = parts.next().unwrap_or_default();
        match (parts.next(), parts.next()) {
            (None, _) => Self::parse(field, first),
            (Some(name), None) => {
                check_namespace(field, first)?;
                Self::parse(field, name)
            }
            (Some(_), Some(_)) => Err(InputError::TooManySlashes { field }),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Selector::Any => WILDCARD,
            Selector::Service(s) => s.as_str(),
        }
    }

    pub fn is_any(&self) -> bool {
        matches!(self, Selector::Any)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Accepts an empty namespace (Consul defaults it) or `default`.
fn check_namespace(field: &'static str, ns: &str) -> Result<(), InputError> {
    if ns.is_empty() || ns == DEFAULT_NAMESPACE {
        Ok(())
    } else {
        Err(InputError::Namespace {
            field,
            value: ns.chars().take(64).collect(),
        })
    }
}

/// What an intention does to connections it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// Consul's exact, lower-case spellings only.
    pub fn parse(s: &str) -> Result<Self, InputError> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            _ => Err(InputError::Action),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }

    fn upper(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Consul's precedence (reference §4.2) with both namespaces exact, as they always
/// are here: 9 exact ⇒ exact, 8 `*` ⇒ exact, 6 exact ⇒ `*`, 5 `*` ⇒ `*`. Higher wins.
pub fn precedence(source: &Selector, destination: &Selector) -> u32 {
    // max = 9 with two exact destination parts (namespace, name), 6 with one; each
    // wildcard source part takes one off.
    let max = if destination.is_any() { 6 } else { 9 };
    let exact_source_parts = if source.is_any() { 1 } else { 2 };
    max - (2 - exact_source_parts)
}

// ───────────────────────────── intentions ─────────────────────────────

/// The validated content of a write: everything a client sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub source: Selector,
    pub destination: Selector,
    pub action: Action,
    pub description: String,
    pub meta: BTreeMap<String, String>,
}

/// A stored intention as the agent holds it in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intention {
    pub id: Uuid,
    pub source: Selector,
    pub destination: Selector,
    pub action: Action,
    pub description: String,
    pub meta: BTreeMap<String, String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub updated_at: String,
    pub create_index: Index,
    pub modify_index: Index,
    /// Content hash (base64), computed once; Consul uses it for replication.
    hash: String,
}

impl Intention {
    pub fn new(
        id: Uuid,
        spec: Spec,
        created_at: String,
        updated_at: String,
        create_index: Index,
        modify_index: Index,
    ) -> Self {
        let hash = content_hash(&id, &spec);
        Self {
            id,
            source: spec.source,
            destination: spec.destination,
            action: spec.action,
            description: spec.description,
            meta: spec.meta,
            created_at,
            updated_at,
            create_index,
            modify_index,
            hash,
        }
    }

    pub fn precedence(&self) -> u32 {
        precedence(&self.source, &self.destination)
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Consul's server-side `String()`: `ALLOW default/web => default/db (ID: …,
    /// Precedence: 9)`, used in authorize reasons and duplicate errors.
    pub fn server_string(&self) -> String {
        format!(
            "{} {DEFAULT_NAMESPACE}/{} => {DEFAULT_NAMESPACE}/{} (ID: {}, Precedence: {})",
            self.action.upper(),
            self.source,
            self.destination,
            self.id,
            self.precedence()
        )
    }

    /// The order Consul lists and evaluates intentions in: precedence, highest first,
    /// then (source namespace, source, destination namespace, destination).
    pub fn evaluation_order(a: &Self, b: &Self) -> std::cmp::Ordering {
        b.precedence()
            .cmp(&a.precedence())
            .then_with(|| a.source.as_str().cmp(b.source.as_str()))
            .then_with(|| a.destination.as_str().cmp(b.destination.as_str()))
    }

    pub fn to_api(&self) -> ApiIntention {
        ApiIntention {
            id: self.id.to_string(),
            description: self.description.clone(),
            source_ns: DEFAULT_NAMESPACE.to_owned(),
            source_name: self.source.to_string(),
            destination_ns: DEFAULT_NAMESPACE.to_owned(),
            destination_name: self.destination.to_string(),
            source_type: SOURCE_TYPE_CONSUL.to_owned(),
            action: self.action.as_str().to_owned(),
            default_addr: String::new(),
            default_port: 0,
            meta: self.meta.clone(),
            precedence: self.precedence(),
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
            hash: self.hash.clone(),
            create_index: self.create_index,
            modify_index: self.modify_index,
        }
    }
}

/// The client-side `String()`: `web => db (allow)` (namespaces shown only when not
/// `default`, which they always are here).
impl fmt::Display for Intention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} => {} ({})",
            self.source, self.destination, self.action
        )
    }
}

/// SHA-256 over the client-set fields, length-prefixed so that no two different
/// intentions encode alike.
fn content_hash(id: &Uuid, spec: &Spec) -> String {
    use base64::Engine as _;
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    field(id.as_bytes());
    field(DEFAULT_NAMESPACE.as_bytes());
    field(spec.source.as_str().as_bytes());
    field(DEFAULT_NAMESPACE.as_bytes());
    field(spec.destination.as_str().as_bytes());
    field(SOURCE_TYPE_CONSUL.as_bytes());
    field(spec.action.as_str().as_bytes());
    field(spec.description.as_bytes());
    for (k, v) in &spec.meta {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

// ───────────────────────────── wire JSON ─────────────────────────────

/// An intention as Consul's API returns it (reference §2.6), field for field and in
/// Consul's order. The CLI decodes it too, so every field has a default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ApiIntention {
    #[serde(rename = "ID")]
    pub id: String,
    pub description: String,
    #[serde(rename = "SourceNS")]
    pub source_ns: String,
    pub source_name: String,
    #[serde(rename = "DestinationNS")]
    pub destination_ns: String,
    pub destination_name: String,
    pub source_type: String,
    pub action: String,
    pub default_addr: String,
    pub default_port: u16,
    pub meta: BTreeMap<String, String>,
    pub precedence: u32,
    pub created_at: String,
    pub updated_at: String,
    pub hash: String,
    pub create_index: Index,
    pub modify_index: Index,
}

impl fmt::Display for ApiIntention {
    /// Consul's `api.Intention.String()`, as the CLI prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} => {} ({})",
            qualified(&self.source_ns, &self.source_name),
            qualified(&self.destination_ns, &self.destination_name),
            self.action
        )
    }
}

fn qualified(ns: &str, name: &str) -> String {
    if ns.is_empty() || ns == DEFAULT_NAMESPACE {
        name.to_owned()
    } else {
        format!("{ns}/{name}")
    }
}

// ───────────────────────────── request bodies ─────────────────────────────

/// An intention body as a client sent it, parsed and checked field by field. Keys
/// match case-insensitively (Consul decodes with mapstructure); read-only fields
/// (`Precedence`, `CreateIndex`, `Hash`, …) and unknown keys are ignored, so a body
/// read from the API can be sent back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Body {
    /// Non-empty `ID` as sent (create refuses it; update takes the path's).
    pub id: Option<String>,
    pub source: Option<Selector>,
    pub destination: Option<Selector>,
    pub action: Option<Action>,
    pub description: String,
    pub meta: BTreeMap<String, String>,
}

impl Body {
    pub fn from_json(v: &Value) -> Result<Self, InputError> {
        let obj = v.as_object().ok_or(InputError::NotAnObject)?;
        let mut body = Body::default();
        let source_ns = string_field(obj, "SourceNS")?;
        let destination_ns = string_field(obj, "DestinationNS")?;
        check_namespace("SourceNS", source_ns.unwrap_or_default())?;
        check_namespace("DestinationNS", destination_ns.unwrap_or_default())?;
        if let Some(s) = string_field(obj, "SourceName")?.filter(|s| !s.is_empty()) {
            body.source = Some(Selector::parse("SourceName", s)?);
        }
        if let Some(s) = string_field(obj, "DestinationName")?.filter(|s| !s.is_empty()) {
            body.destination = Some(Selector::parse("DestinationName", s)?);
        }
        if let Some(t) = string_field(obj, "SourceType")?
            && !t.is_empty()
            && t != SOURCE_TYPE_CONSUL
        {
            return Err(InputError::SourceType);
        }
        if let Some(a) = string_field(obj, "Action")?.filter(|s| !s.is_empty()) {
            body.action = Some(Action::parse(a)?);
        }
        if let Some(d) = string_field(obj, "Description")? {
            if d.chars().count() > MAX_DESCRIPTION_LEN {
                return Err(InputError::DescriptionTooLong);
            }
            body.description = d.to_owned();
        }
        body.id = string_field(obj, "ID")?
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        if let Some(m) = field(obj, "Meta") {
            body.meta = parse_meta(m)?;
        }
        match field(obj, "Permissions") {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => return Err(InputError::Permissions),
        }
        Ok(body)
    }

    /// The full content of a create or an update by ID: names and action required.
    pub fn into_spec(self) -> Result<Spec, InputError> {
        Ok(Spec {
            source: self.source.ok_or(InputError::Missing {
                field: "SourceName",
            })?,
            destination: self.destination.ok_or(InputError::Missing {
                field: "DestinationName",
            })?,
            action: self.action.ok_or(InputError::Action)?,
            description: self.description,
            meta: self.meta,
        })
    }
}

/// A top-level key, matched case-insensitively; JSON `null` counts as absent.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name)
        .or_else(|| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

/// A string field of a JSON object (case-insensitive key), if present.
pub fn string_field<'a>(
    obj: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, InputError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(InputError::WrongType {
            field: name,
            expected: "a string",
        }),
    }
}

fn parse_meta(v: &Value) -> Result<BTreeMap<String, String>, InputError> {
    let obj = v.as_object().ok_or(InputError::WrongType {
        field: "Meta",
        expected: "an object of strings",
    })?;
    if obj.len() > MAX_META_PAIRS {
        return Err(InputError::MetaTooMany);
    }
    let mut meta = BTreeMap::new();
    for (k, v) in obj {
        if k.is_empty() || k.chars().count() > MAX_META_KEY_LEN {
            return Err(InputError::MetaKey {
                key: k.chars().take(MAX_META_KEY_LEN).collect(),
            });
        }
        let v = v.as_str().ok_or(InputError::WrongType {
            field: "Meta",
            expected: "an object of strings",
        })?;
        if v.chars().count() > MAX_META_VALUE_LEN {
            return Err(InputError::MetaValueTooLong { key: k.clone() });
        }
        meta.insert(k.clone(), v.to_owned());
    }
    Ok(meta)
}

/// Parses an intention ID from a path or argument.
pub fn parse_id(s: &str) -> Result<Uuid, InputError> {
    Uuid::parse_str(s).map_err(|_| InputError::BadId {
        value: s.chars().take(64).collect(),
    })
}

// ───────────────────────────── store records ─────────────────────────────

/// What the store holds under `intentions/id/<uuid>`. Indexes, precedence and hash
/// are derived on load, never stored, so they cannot disagree with the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Record {
    #[serde(rename = "ID")]
    pub id: Uuid,
    #[serde(rename = "SourceNS")]
    pub source_ns: String,
    pub source_name: String,
    #[serde(rename = "DestinationNS")]
    pub destination_ns: String,
    pub destination_name: String,
    pub source_type: String,
    pub action: Action,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    pub created_at: String,
    pub updated_at: String,
}

impl Record {
    pub fn new(id: Uuid, spec: &Spec, created_at: String, updated_at: String) -> Self {
        Self {
            id,
            source_ns: DEFAULT_NAMESPACE.to_owned(),
            source_name: spec.source.to_string(),
            destination_ns: DEFAULT_NAMESPACE.to_owned(),
            destination_name: spec.destination.to_string(),
            source_type: SOURCE_TYPE_CONSUL.to_owned(),
            action: spec.action,
            description: spec.description.clone(),
            meta: spec.meta.clone(),
            created_at,
            updated_at,
        }
    }

    /// The record's content, re-validated: a record written by another node or an
    /// older version is input like any other.
    pub fn spec(&self) -> Result<Spec, InputError> {
        check_namespace("SourceNS", &self.source_ns)?;
        check_namespace("DestinationNS", &self.destination_ns)?;
        if self.source_type != SOURCE_TYPE_CONSUL {
            return Err(InputError::SourceType);
        }
        Ok(Spec {
            source: Selector::parse("SourceName", &self.source_name)?,
            destination: Selector::parse("DestinationName", &self.destination_name)?,
            action: self.action,
            description: self.description.clone(),
            meta: self.meta.clone(),
        })
    }
}

/// Now, as RFC 3339 in UTC (Consul's JSON time form).
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        // Formatting a UTC time with a 4-digit year cannot fail; fall back to the
        // Unix epoch text rather than panic if the clock is absurd.
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(s: &str) -> Selector {
        Selector::Service(s.parse().expect("service name"))
    }

    #[test]
    fn selectors() {
        let cases: &[(&str, Result<Selector, InputError>)] = &[
            ("web", Ok(svc("web"))),
            ("*", Ok(Selector::Any)),
            (
                "web*",
                Err(InputError::PartialWildcard {
                    field: "SourceName",
                }),
            ),
            (
                "**",
                Err(InputError::PartialWildcard {
                    field: "SourceName",
                }),
            ),
            (
                "",
                Err(InputError::Missing {
                    field: "SourceName",
                }),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(&Selector::parse("SourceName", input), want, "{input:?}");
        }
        assert!(matches!(
            Selector::parse("SourceName", "we b"),
            Err(InputError::BadName { .. })
        ));
    }

    #[test]
    fn qualified_selectors() {
        assert_eq!(Selector::parse_qualified("name", "web"), Ok(svc("web")));
        assert_eq!(
            Selector::parse_qualified("name", "default/web"),
            Ok(svc("web"))
        );
        assert_eq!(
            Selector::parse_qualified("name", "default/*"),
            Ok(Selector::Any)
        );
        assert!(matches!(
            Selector::parse_qualified("name", "other/web"),
            Err(InputError::Namespace { .. })
        ));
        assert_eq!(
            Selector::parse_qualified("name", "a/b/c"),
            Err(InputError::TooManySlashes { field: "name" })
        );
    }

    #[test]
    fn precedence_values() {
        let any = Selector::Any;
        let web = svc("web");
        let db = svc("db");
        for (src, dst, want) in [
            (&web, &db, 9),
            (&any, &db, 8),
            (&web, &any, 6),
            (&any, &any, 5),
        ] {
            assert_eq!(precedence(src, dst), want, "{src} => {dst}");
        }
    }

    fn intention(src: &str, dst: &str, action: Action) -> Intention {
        Intention::new(
            Uuid::nil(),
            Spec {
                source: Selector::parse("SourceName", src).expect("src"),
                destination: Selector::parse("DestinationName", dst).expect("dst"),
                action,
                description: String::new(),
                meta: BTreeMap::new(),
            },
            "2024-01-01T00:00:00Z".into(),
            "2024-01-01T00:00:00Z".into(),
            3,
            4,
        )
    }

    #[test]
    fn string_forms() {
        let i = intention("web", "socat", Action::Deny);
        assert_eq!(i.to_string(), "web => socat (deny)");
        assert_eq!(i.to_api().to_string(), "web => socat (deny)");
        assert_eq!(
            i.server_string(),
            "DENY default/web => default/socat (ID: 00000000-0000-0000-0000-000000000000, Precedence: 9)"
        );
    }

    #[test]
    fn api_json_has_consuls_fields() {
        let v = serde_json::to_value(intention("*", "db", Action::Allow).to_api()).expect("json");
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        for k in [
            "ID",
            "Description",
            "SourceNS",
            "SourceName",
            "DestinationNS",
            "DestinationName",
            "SourceType",
            "Action",
            "DefaultAddr",
            "DefaultPort",
            "Meta",
            "Precedence",
            "CreatedAt",
            "UpdatedAt",
            "Hash",
            "CreateIndex",
            "ModifyIndex",
        ] {
            assert!(keys.contains(&k), "missing {k} in {keys:?}");
        }
        assert_eq!(v["Meta"], json!({}));
        assert_eq!(v["Precedence"], json!(8));
        assert_eq!(v["SourceNS"], json!("default"));
        assert_eq!(
            (v["CreateIndex"].clone(), v["ModifyIndex"].clone()),
            (json!(3), json!(4))
        );
    }

    #[test]
    fn hash_follows_content() {
        let a = intention("web", "db", Action::Allow);
        let b = intention("web", "db", Action::Deny);
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash(), intention("web", "db", Action::Allow).hash());
    }

    #[test]
    fn bodies() {
        let b = Body::from_json(&json!({
            "sourcename": "web", "DESTINATIONNAME": "db", "Action": "deny",
            "Description": "d", "Meta": {"k": "v"}, "SourceType": "consul",
            "Precedence": 9, "CreateIndex": 5, "SourceNS": "default", "Permissions": null
        }))
        .expect("valid");
        let spec = b.into_spec().expect("complete");
        assert_eq!(spec.source, svc("web"));
        assert_eq!(spec.destination, svc("db"));
        assert_eq!(spec.action, Action::Deny);
        assert_eq!(spec.meta.get("k").map(String::as_str), Some("v"));
    }

    #[test]
    fn bad_bodies() {
        let long = "x".repeat(MAX_DESCRIPTION_LEN + 1);
        let many: Map<String, Value> = (0..=MAX_META_PAIRS)
            .map(|i| (format!("k{i}"), json!("v")))
            .collect();
        let cases = [
            (json!([]), InputError::NotAnObject),
            (json!({"Action": "maybe"}), InputError::Action),
            (json!({"Action": "ALLOW"}), InputError::Action),
            (
                json!({"SourceName": 7}),
                InputError::WrongType {
                    field: "SourceName",
                    expected: "a string",
                },
            ),
            (
                json!({"SourceName": "web*"}),
                InputError::PartialWildcard {
                    field: "SourceName",
                },
            ),
            (json!({"SourceType": "aws"}), InputError::SourceType),
            (json!({"Description": long}), InputError::DescriptionTooLong),
            (json!({"Meta": many}), InputError::MetaTooMany),
            (
                json!({"Meta": {"": "v"}}),
                InputError::MetaKey { key: String::new() },
            ),
            (
                json!({"Meta": {"k": 1}}),
                InputError::WrongType {
                    field: "Meta",
                    expected: "an object of strings",
                },
            ),
            (
                json!({"Permissions": [{"Action": "deny"}]}),
                InputError::Permissions,
            ),
            (
                json!({"DestinationNS": "prod"}),
                InputError::Namespace {
                    field: "DestinationNS",
                    value: "prod".into(),
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Body::from_json(&input), Err(want), "{input}");
        }
        let missing = Body::from_json(&json!({"SourceName": "web", "Action": "allow"}))
            .expect("parses")
            .into_spec();
        assert_eq!(
            missing,
            Err(InputError::Missing {
                field: "DestinationName"
            })
        );
        let no_action = Body::from_json(&json!({"SourceName": "web", "DestinationName": "db"}))
            .expect("parses")
            .into_spec();
        assert_eq!(no_action, Err(InputError::Action));
    }

    #[test]
    fn records_round_trip() {
        let i = intention("web", "*", Action::Allow);
        let spec = Spec {
            source: i.source.clone(),
            destination: i.destination.clone(),
            action: i.action,
            description: i.description.clone(),
            meta: i.meta.clone(),
        };
        let r = Record::new(i.id, &spec, i.created_at.clone(), i.updated_at.clone());
        let bytes = serde_json::to_vec(&r).expect("encode");
        let back: Record = serde_json::from_slice(&bytes).expect("decode");
        assert_eq!(back.spec(), Ok(spec));
    }
}
