//! The policy rules language: Consul's ACL rules, the subset Connect uses, written in
//! HCL or in JSON (reference §3), parsed into [`Rules`].
//!
//! ```hcl
//! service "web"       { policy = "write" intentions = "read" }
//! service_prefix ""   { policy = "read" }
//! node_prefix ""      { policy = "read" }
//! agent "node-1"      { policy = "read" }
//! operator = "read"
//! acl = "write"
//! ```
//!
//! The JSON form is the same tree (`{"service": {"web": {"policy": "write"}}}`; a list
//! of such objects is accepted too, as HCL's JSON is). py-consul sends its rules as a
//! JSON document inside a string, and a string holding HCL arrives JSON-quoted; both
//! are unwrapped here. Consul resources that Connect does not have (`key`, `session`,
//! `event`, `query` and their prefixes, `keyring`, `mesh`, `peering`) are checked for
//! shape and otherwise ignored, so policies written for Consul load unchanged; any
//! other name is refused. The HCL parser is ours: it reads bodies of attributes and
//! labelled blocks with `#`, `//` and `/* */` comments, and nothing of HCL's
//! expression language (Consul's rules use none).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Largest rules text accepted: a policy is a handful of lines; this bounds parsing.
pub const MAX_RULES_BYTES: usize = 64 * 1024;
/// Deepest nesting of blocks, block labels included (each is a level): rules need
/// three; this bounds the recursion of parsing, merging and dropping the tree.
const MAX_DEPTH: usize = 8;

/// A level of access to a resource. Ordered by how much it grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    Deny,
    Read,
    Write,
}

impl Access {
    fn parse(resource: &str, s: &str) -> Result<Self, RulesError> {
        match s {
            "deny" => Ok(Access::Deny),
            "read" => Ok(Access::Read),
            "write" => Ok(Access::Write),
            other => Err(RulesError::InvalidAccess {
                resource: resource.to_owned(),
                value: truncate(other),
            }),
        }
    }

    /// Consul's rule for two rules on the same name from different policies: `deny`
    /// wins over everything, otherwise the broader access.
    pub fn merge(self, other: Access) -> Access {
        if self == Access::Deny || other == Access::Deny {
            Access::Deny
        } else {
            self.max(other)
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Access::Deny => "deny",
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// A `service` or `service_prefix` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceRule {
    pub policy: Access,
    /// Access to intentions whose destination is the service; when absent, `read`
    /// or `write` on the service grants `intentions = "read"` (never write) and
    /// `deny` denies them (Consul's rule).
    pub intentions: Option<Access>,
}

impl ServiceRule {
    /// The access to intentions this rule grants.
    pub fn intention_access(&self) -> Access {
        self.intentions.unwrap_or(match self.policy {
            Access::Deny => Access::Deny,
            Access::Read | Access::Write => Access::Read,
        })
    }
}

/// One policy's rules, parsed. Names map to access; prefix rules match every name
/// that starts with their label (`""` matches all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub services: BTreeMap<String, ServiceRule>,
    pub service_prefixes: BTreeMap<String, ServiceRule>,
    pub nodes: BTreeMap<String, Access>,
    pub node_prefixes: BTreeMap<String, Access>,
    pub agents: BTreeMap<String, Access>,
    pub agent_prefixes: BTreeMap<String, Access>,
    pub operator: Option<Access>,
    pub acl: Option<Access>,
}

/// Why a rules text was refused (the author's fault). Messages name the line or the
/// resource so the author can find the mistake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("rules are longer than {max} bytes")]
    TooLarge { max: usize },
    #[error("line {line}: expected {expected}, found {found}")]
    Syntax {
        line: usize,
        expected: &'static str,
        found: String,
    },
    #[error("line {line}: blocks are nested deeper than {MAX_DEPTH} levels")]
    TooDeep { line: usize },
    #[error("the rules are not valid JSON: {reason}")]
    Json { reason: String },
    #[error("the rules must be an object of resources")]
    NotAnObject,
    #[error(
        "unknown resource {name:?} (known: service, service_prefix, node, node_prefix, agent, agent_prefix, operator, acl)"
    )]
    UnknownResource { name: String },
    #[error("invalid {resource} access {value:?}: expected \"read\", \"write\" or \"deny\"")]
    InvalidAccess { resource: String, value: String },
    #[error("{resource} must be {expected}")]
    WrongShape {
        resource: String,
        expected: &'static str,
    },
    #[error("{resource} {label:?} is given twice")]
    Duplicate { resource: String, label: String },
    #[error("{resource} {label:?} has no policy")]
    MissingPolicy { resource: String, label: String },
    #[error("{resource} {label:?} has an unknown field {field:?}")]
    UnknownField {
        resource: String,
        label: String,
        field: String,
    },
}

impl Rules {
    /// Parses rules in HCL or JSON (see the module doc). Empty text is no rules.
    pub fn parse(text: &str) -> Result<Rules, RulesError> {
        if text.len() > MAX_RULES_BYTES {
            return Err(RulesError::TooLarge {
                max: MAX_RULES_BYTES,
            });
        }
        let t = text.trim();
        if t.is_empty() {
            return Ok(Rules::default());
        }
        let tree = if t.starts_with('{') || t.starts_with('[') {
            serde_json::from_str::<Value>(t).map_err(|e| RulesError::Json {
                reason: e.to_string(),
            })?
        } else if t.starts_with('"') {
            // A string of rules that was JSON-encoded once more (py-consul does this
            // to whatever it is given).
            let inner: String = serde_json::from_str(t).map_err(|e| RulesError::Json {
                reason: e.to_string(),
            })?;
            if inner.trim_start().starts_with('"') {
                return Err(RulesError::NotAnObject);
            }
            return Rules::parse(&inner);
        } else {
            hcl::parse(t)?
        };
        Rules::from_tree(&tree)
    }

    fn from_tree(tree: &Value) -> Result<Rules, RulesError> {
        let mut rules = Rules::default();
        for obj in objects(tree).ok_or(RulesError::NotAnObject)? {
            for (name, value) in obj {
                rules.add(name, value)?;
            }
        }
        Ok(rules)
    }

    fn add(&mut self, resource: &str, value: &Value) -> Result<(), RulesError> {
        match resource {
            "service" => add_services(&mut self.services, resource, value),
            "service_prefix" => add_services(&mut self.service_prefixes, resource, value),
            "node" => add_named(&mut self.nodes, resource, value),
            "node_prefix" => add_named(&mut self.node_prefixes, resource, value),
            "agent" => add_named(&mut self.agents, resource, value),
            "agent_prefix" => add_named(&mut self.agent_prefixes, resource, value),
            "operator" => set_once(&mut self.operator, resource, value),
            "acl" => set_once(&mut self.acl, resource, value),
            // Consul resources Connect has no use for: checked, then ignored.
            "key" | "key_prefix" | "session" | "session_prefix" | "event" | "event_prefix"
            | "query" | "query_prefix" => {
                let mut ignored = BTreeMap::new();
                add_named_with(&mut ignored, resource, value, &["policy"], true)
            }
            "keyring" | "mesh" | "peering" => {
                let mut ignored = None;
                set_once(&mut ignored, resource, value)
            }
            other => Err(RulesError::UnknownResource {
                name: truncate(other),
            }),
        }
    }
}

/// The objects of a value that is an object or a list of objects.
fn objects(v: &Value) -> Option<Vec<&Map<String, Value>>> {
    match v {
        Value::Object(m) => Some(vec![m]),
        Value::Array(items) => items.iter().map(Value::as_object).collect(),
        _ => None,
    }
}

fn shape(resource: &str, expected: &'static str) -> RulesError {
    RulesError::WrongShape {
        resource: resource.to_owned(),
        expected,
    }
}

fn set_once(slot: &mut Option<Access>, resource: &str, value: &Value) -> Result<(), RulesError> {
    let s = value
        .as_str()
        .ok_or_else(|| shape(resource, "a string such as \"read\""))?;
    if slot.is_some() {
        return Err(RulesError::Duplicate {
            resource: resource.to_owned(),
            label: String::new(),
        });
    }
    *slot = Some(Access::parse(resource, s)?);
    Ok(())
}

/// A labelled block: its label and its fields.
type Block<'a> = (&'a str, &'a Map<String, Value>);

/// Each labelled block of `value`.
fn blocks<'a>(resource: &str, value: &'a Value) -> Result<Vec<Block<'a>>, RulesError> {
    let expected = "an object of \"name\" blocks";
    let mut out = Vec::new();
    for obj in objects(value).ok_or_else(|| shape(resource, expected))? {
        for (label, body) in obj {
            let fields = match body {
                Value::Object(m) => m,
                // HCL's JSON allows a block to be a one-element list.
                Value::Array(items) if items.len() == 1 => items[0]
                    .as_object()
                    .ok_or_else(|| shape(resource, expected))?,
                _ => return Err(shape(resource, expected)),
            };
            out.push((label.as_str(), fields));
        }
    }
    Ok(out)
}

fn access_field(
    resource: &str,
    label: &str,
    fields: &Map<String, Value>,
    name: &str,
) -> Result<Option<Access>, RulesError> {
    match fields.get(name) {
        None => Ok(None),
        Some(Value::String(s))
            if name == "policy" && s == "list" && resource.starts_with("key") =>
        {
            Ok(Some(Access::Read))
        }
        Some(Value::String(s)) => Access::parse(resource, s).map(Some),
        Some(_) => Err(RulesError::WrongShape {
            resource: format!("{resource} {label:?} {name}"),
            expected: "a string such as \"read\"",
        }),
    }
}

fn check_fields(
    resource: &str,
    label: &str,
    fields: &Map<String, Value>,
    known: &[&str],
) -> Result<(), RulesError> {
    match fields.keys().find(|k| !known.contains(&k.as_str())) {
        Some(field) => Err(RulesError::UnknownField {
            resource: resource.to_owned(),
            label: truncate(label),
            field: truncate(field),
        }),
        None => Ok(()),
    }
}

fn add_services(
    into: &mut BTreeMap<String, ServiceRule>,
    resource: &str,
    value: &Value,
) -> Result<(), RulesError> {
    for (label, fields) in blocks(resource, value)? {
        check_fields(resource, label, fields, &["policy", "intentions"])?;
        let policy = access_field(resource, label, fields, "policy")?.ok_or_else(|| {
            RulesError::MissingPolicy {
                resource: resource.to_owned(),
                label: truncate(label),
            }
        })?;
        let intentions = access_field(resource, label, fields, "intentions")?;
        if into
            .insert(label.to_owned(), ServiceRule { policy, intentions })
            .is_some()
        {
            return Err(RulesError::Duplicate {
                resource: resource.to_owned(),
                label: truncate(label),
            });
        }
    }
    Ok(())
}

fn add_named(
    into: &mut BTreeMap<String, Access>,
    resource: &str,
    value: &Value,
) -> Result<(), RulesError> {
    add_named_with(into, resource, value, &["policy"], false)
}

fn add_named_with(
    into: &mut BTreeMap<String, Access>,
    resource: &str,
    value: &Value,
    known: &[&str],
    lenient_fields: bool,
) -> Result<(), RulesError> {
    for (label, fields) in blocks(resource, value)? {
        if !lenient_fields {
            check_fields(resource, label, fields, known)?;
        }
        let policy = access_field(resource, label, fields, "policy")?.ok_or_else(|| {
            RulesError::MissingPolicy {
                resource: resource.to_owned(),
                label: truncate(label),
            }
        })?;
        if into.insert(label.to_owned(), policy).is_some() {
            return Err(RulesError::Duplicate {
                resource: resource.to_owned(),
                label: truncate(label),
            });
        }
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The HCL subset: a body is a sequence of `key = value` attributes and
/// `key "label"... { body }` blocks; values are strings, numbers, booleans, `{ body }`
/// objects and `[ ... ]` lists. The result is the JSON tree HCL's JSON form would
/// give: blocks with the same key merge into one object, keyed by label.
mod hcl {
    use serde_json::{Map, Value};

    use super::{MAX_DEPTH, RulesError};

    #[derive(Debug, Clone, PartialEq)]
    enum Tok {
        Ident(String),
        Str(String),
        Num(String),
        Eq,
        LBrace,
        RBrace,
        LBracket,
        RBracket,
        Comma,
        Eof,
    }

    impl Tok {
        fn describe(&self) -> String {
            match self {
                Tok::Ident(s) => format!("`{}`", super::truncate(s)),
                Tok::Str(s) => format!("string {:?}", super::truncate(s)),
                Tok::Num(s) => format!("number {s}"),
                Tok::Eq => "`=`".into(),
                Tok::LBrace => "`{`".into(),
                Tok::RBrace => "`}`".into(),
                Tok::LBracket => "`[`".into(),
                Tok::RBracket => "`]`".into(),
                Tok::Comma => "`,`".into(),
                Tok::Eof => "the end".into(),
            }
        }
    }

    pub(super) fn parse(text: &str) -> Result<Value, RulesError> {
        let toks = lex(text)?;
        let mut p = Parser { toks, pos: 0 };
        let body = p.body(0, true)?;
        Ok(Value::Object(body))
    }

    fn syntax(line: usize, expected: &'static str, found: String) -> RulesError {
        RulesError::Syntax {
            line,
            expected,
            found,
        }
    }

    fn lex(text: &str) -> Result<Vec<(Tok, usize)>, RulesError> {
        let mut out = Vec::new();
        let mut line = 1;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\n' => line += 1,
                c if c.is_whitespace() => {}
                '#' => {
                    while chars.peek().is_some_and(|c| *c != '\n') {
                        chars.next();
                    }
                }
                '/' if chars.peek() == Some(&'/') => {
                    while chars.peek().is_some_and(|c| *c != '\n') {
                        chars.next();
                    }
                }
                '/' if chars.peek() == Some(&'*') => {
                    chars.next();
                    let start = line;
                    let mut prev = ' ';
                    loop {
                        match chars.next() {
                            None => return Err(syntax(start, "`*/`", "the end".into())),
                            Some('/') if prev == '*' => break,
                            Some(c) => {
                                if c == '\n' {
                                    line += 1;
                                }
                                prev = c;
                            }
                        }
                    }
                }
                '=' => out.push((Tok::Eq, line)),
                '{' => out.push((Tok::LBrace, line)),
                '}' => out.push((Tok::RBrace, line)),
                '[' => out.push((Tok::LBracket, line)),
                ']' => out.push((Tok::RBracket, line)),
                ',' => out.push((Tok::Comma, line)),
                '"' => {
                    let start = line;
                    let mut s = String::new();
                    loop {
                        match chars.next() {
                            None | Some('\n') => {
                                return Err(syntax(
                                    start,
                                    "a closing `\"`",
                                    "the end of the line".into(),
                                ));
                            }
                            Some('"') => break,
                            Some('\\') => match chars.next() {
                                Some('"') => s.push('"'),
                                Some('\\') => s.push('\\'),
                                Some('n') => s.push('\n'),
                                Some('t') => s.push('\t'),
                                Some('/') => s.push('/'),
                                other => {
                                    return Err(syntax(
                                        start,
                                        "an escape such as `\\\"`",
                                        format!("`\\{}`", other.unwrap_or(' ')),
                                    ));
                                }
                            },
                            Some(c) => s.push(c),
                        }
                    }
                    out.push((Tok::Str(s), start));
                }
                c if c.is_ascii_digit() || c == '-' => {
                    let mut s = String::from(c);
                    while chars
                        .peek()
                        .is_some_and(|c| c.is_ascii_digit() || *c == '.')
                    {
                        s.extend(chars.next());
                    }
                    out.push((Tok::Num(s), line));
                }
                c if c.is_ascii_alphabetic() || c == '_' => {
                    let mut s = String::from(c);
                    while chars
                        .peek()
                        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                    {
                        s.extend(chars.next());
                    }
                    out.push((Tok::Ident(s), line));
                }
                other => {
                    return Err(syntax(line, "a name, string or `{`", format!("`{other}`")));
                }
            }
        }
        out.push((Tok::Eof, line));
        Ok(out)
    }

    struct Parser {
        toks: Vec<(Tok, usize)>,
        pos: usize,
    }

    impl Parser {
        fn peek(&self) -> &Tok {
            // `lex` always ends the list with Eof and `next` never moves past it.
            &self.toks[self.pos.min(self.toks.len() - 1)].0
        }

        fn line(&self) -> usize {
            self.toks[self.pos.min(self.toks.len() - 1)].1
        }

        fn next(&mut self) -> Tok {
            let t = self.peek().clone();
            if t != Tok::Eof {
                self.pos += 1;
            }
            t
        }

        /// Attributes and blocks until `}` (or the end, at top level).
        fn body(&mut self, depth: usize, top: bool) -> Result<Map<String, Value>, RulesError> {
            if depth > MAX_DEPTH {
                return Err(RulesError::TooDeep { line: self.line() });
            }
            let mut out = Map::new();
            loop {
                let line = self.line();
                let key = match self.next() {
                    Tok::Eof if top => return Ok(out),
                    Tok::RBrace if !top => return Ok(out),
                    Tok::Comma => continue,
                    Tok::Ident(s) | Tok::Str(s) => s,
                    other => {
                        return Err(syntax(line, "a name", other.describe()));
                    }
                };
                let mut labels = Vec::new();
                let value = loop {
                    let line = self.line();
                    match self.next() {
                        Tok::Eq if labels.is_empty() => break self.value(depth + 1)?,
                        // Each label nests the value one level deeper.
                        Tok::Str(_) if depth + labels.len() >= MAX_DEPTH => {
                            return Err(RulesError::TooDeep { line });
                        }
                        Tok::Str(label) => labels.push(label),
                        Tok::LBrace => break Value::Object(self.body(depth + 1, false)?),
                        other => {
                            return Err(syntax(line, "`=`, a label or `{`", other.describe()));
                        }
                    }
                };
                let nested = labels.into_iter().rev().fold(value, |v, label| {
                    Value::Object(Map::from_iter([(label, v)]))
                });
                merge_into(&mut out, key, nested, line)?;
            }
        }

        fn value(&mut self, depth: usize) -> Result<Value, RulesError> {
            if depth > MAX_DEPTH {
                return Err(RulesError::TooDeep { line: self.line() });
            }
            let line = self.line();
            match self.next() {
                Tok::Str(s) => Ok(Value::String(s)),
                Tok::Num(n) => Ok(n
                    .parse::<i64>()
                    .map(Value::from)
                    .or_else(|_| n.parse::<f64>().map(Value::from))
                    .map_err(|_| syntax(line, "a number", format!("`{n}`")))?),
                Tok::Ident(b) if b == "true" => Ok(Value::Bool(true)),
                Tok::Ident(b) if b == "false" => Ok(Value::Bool(false)),
                Tok::LBrace => Ok(Value::Object(self.body(depth, false)?)),
                Tok::LBracket => {
                    let mut items = Vec::new();
                    loop {
                        match self.peek() {
                            Tok::RBracket => {
                                self.next();
                                return Ok(Value::Array(items));
                            }
                            Tok::Comma => {
                                self.next();
                            }
                            _ => items.push(self.value(depth + 1)?),
                        }
                    }
                }
                other => Err(syntax(line, "a value", other.describe())),
            }
        }
    }

    /// Adds `key = value` to a body; two blocks with one key merge (deeply), a
    /// repeated plain attribute is an error.
    fn merge_into(
        out: &mut Map<String, Value>,
        key: String,
        value: Value,
        line: usize,
    ) -> Result<(), RulesError> {
        match (out.get_mut(&key), value) {
            (None, v) => {
                out.insert(key, v);
                Ok(())
            }
            (Some(Value::Object(existing)), Value::Object(more)) => {
                for (k, v) in more {
                    merge_into(existing, k, v, line)?;
                }
                Ok(())
            }
            (Some(_), _) => Err(RulesError::Duplicate {
                resource: format!("line {line}: {}", super::truncate(&key)),
                label: String::new(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(policy: Access, intentions: Option<Access>) -> ServiceRule {
        ServiceRule { policy, intentions }
    }

    #[test]
    fn hcl_and_json_give_the_same_rules() {
        let hcl = r#"
            # Connect service
            service "web" {
              policy = "write"
              intentions = "read"
            }
            service "db" { policy = "read" }   // one line
            /* every service
               may be read */
            service_prefix "" { policy = "read" }
            node_prefix "" { policy = "read" }
            agent "node-1" { policy = "write" }
            operator = "read"
            acl = "write"
            key_prefix "" { policy = "list" }
        "#;
        let json = r#"{
            "service": {"web": {"policy": "write", "intentions": "read"}, "db": {"policy": "read"}},
            "service_prefix": {"": {"policy": "read"}},
            "node_prefix": [{"": {"policy": "read"}}],
            "agent": {"node-1": [{"policy": "write"}]},
            "operator": "read",
            "acl": "write",
            "key_prefix": {"": {"policy": "list"}}
        }"#;
        let a = Rules::parse(hcl).expect("hcl");
        let b = Rules::parse(json).expect("json");
        assert_eq!(a, b);
        assert_eq!(a.services["web"], svc(Access::Write, Some(Access::Read)));
        assert_eq!(a.services["db"], svc(Access::Read, None));
        assert_eq!(a.service_prefixes[""], svc(Access::Read, None));
        assert_eq!(a.node_prefixes[""], Access::Read);
        assert_eq!(a.agents["node-1"], Access::Write);
        assert_eq!(a.operator, Some(Access::Read));
        assert_eq!(a.acl, Some(Access::Write));
    }

    #[test]
    fn json_inside_a_string_is_unwrapped() {
        // What py-consul sends: json.dumps(rules) as the value of "Rules".
        let doc = serde_json::json!({"service": {"web": {"policy": "write"}}}).to_string();
        let r = Rules::parse(&doc).expect("json doc");
        assert_eq!(r.services["web"].policy, Access::Write);
        // An HCL string that was JSON-encoded.
        let quoted = serde_json::to_string("service \"web\" { policy = \"read\" }").expect("json");
        let r = Rules::parse(&quoted).expect("quoted hcl");
        assert_eq!(r.services["web"].policy, Access::Read);
        assert_eq!(Rules::parse("  ").expect("empty"), Rules::default());
    }

    #[test]
    fn derived_intention_access() {
        let cases = [
            (svc(Access::Write, None), Access::Read),
            (svc(Access::Read, None), Access::Read),
            (svc(Access::Deny, None), Access::Deny),
            (svc(Access::Read, Some(Access::Write)), Access::Write),
            (svc(Access::Write, Some(Access::Deny)), Access::Deny),
        ];
        for (rule, want) in cases {
            assert_eq!(rule.intention_access(), want, "{rule:?}");
        }
    }

    #[test]
    fn merge_prefers_deny_then_the_broader() {
        use Access::*;
        let cases = [
            (Read, Write, Write),
            (Write, Read, Write),
            (Deny, Write, Deny),
            (Write, Deny, Deny),
            (Read, Read, Read),
        ];
        for (a, b, want) in cases {
            assert_eq!(a.merge(b), want, "{a:?} + {b:?}");
        }
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            (
                r#"service "web" { policy = "admin" }"#,
                "invalid service access \"admin\"",
            ),
            (r#"service "web" { intentions = "read" }"#, "has no policy"),
            (
                r#"service "web" { policy = "read" colour = "red" }"#,
                "unknown field",
            ),
            (
                r#"services "web" { policy = "read" }"#,
                "unknown resource \"services\"",
            ),
            (
                r#"service "web" { policy = "read" "#,
                "line 1: expected a name",
            ),
            (
                "service \"web\" {\n policy = \"read }",
                "line 2: expected a closing",
            ),
            (
                r#"service "a" { policy = "read" } service "a" { policy = "write" }"#,
                "given twice",
            ),
            (r#"operator = "read" operator = "write""#, "given twice"),
            (r#"operator { x = 1 }"#, "operator must be"),
            ("{\"service\": 5}", "service must be"),
            ("[1]", "must be an object"),
            ("{not json", "not valid JSON"),
            ("service \"web\" { policy = \"read\" } @", "found `@`"),
            ("/* never closed", "expected `*/`"),
        ];
        for (text, want) in cases {
            let err = Rules::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
        }
        let deep = format!("{}{}", "a { ".repeat(20), "}".repeat(20));
        assert!(matches!(
            Rules::parse(&deep),
            Err(RulesError::TooDeep { .. })
        ));
        let huge = "#".repeat(MAX_RULES_BYTES + 1);
        assert!(matches!(
            Rules::parse(&huge),
            Err(RulesError::TooLarge { .. })
        ));
    }

    /// Each block label is one level of nesting: 20,000 labels (they fit in the size
    /// limit) are refused like deep braces, not parsed into a value whose merging and
    /// dropping would overflow the stack.
    #[test]
    fn many_labels_are_an_error_not_a_stack_overflow() {
        let labels = format!("service {} {{ policy = \"read\" }}", "\"\" ".repeat(20_000));
        assert!(labels.len() <= MAX_RULES_BYTES);
        assert!(matches!(
            Rules::parse(&labels),
            Err(RulesError::TooDeep { line: 1 })
        ));
        // The shape rules use still parses.
        assert!(Rules::parse(r#"service "web" { policy = "read" }"#).is_ok());
    }
}
