//! Decisions: the [`Grants`] compiled from a token's rules answer whether it holds
//! a [`Right`], in memory.
//!
//! Consul's semantics (reference §3): for a named resource an exact rule wins over
//! prefix rules, the longest matching prefix wins among those, and without any rule
//! the agent's default policy decides (`allow` grants everything but ACL
//! management; `deny` nothing). Rules of several policies on the same name merge:
//! `deny` wins, otherwise the broader access. Intentions are destination-oriented:
//! the right on an intention is the right on its destination service's `intentions`.

use std::{collections::HashMap, fmt};

use super::rules::{Access, Rules};

/// What a request needs. Names are service, node or agent (node) names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right<'a> {
    ServiceRead(&'a str),
    ServiceWrite(&'a str),
    /// Read intentions whose destination is this service.
    IntentionRead(&'a str),
    /// Create, change or delete intentions whose destination is this service.
    IntentionWrite(&'a str),
    NodeRead(&'a str),
    NodeWrite(&'a str),
    /// Read the agent on this node (its configuration, members, security report).
    AgentRead(&'a str),
    /// Change the agent on this node (reload, maintenance).
    AgentWrite(&'a str),
    OperatorRead,
    OperatorWrite,
    /// Read ACL tokens and policies.
    AclRead,
    /// Manage ACL tokens and policies.
    AclWrite,
}

impl fmt::Display for Right<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Right::ServiceRead(n) => write!(f, "service:read on {n:?}"),
            Right::ServiceWrite(n) => write!(f, "service:write on {n:?}"),
            Right::IntentionRead(n) => write!(f, "intentions:read on {n:?}"),
            Right::IntentionWrite(n) => write!(f, "intentions:write on {n:?}"),
            Right::NodeRead(n) => write!(f, "node:read on {n:?}"),
            Right::NodeWrite(n) => write!(f, "node:write on {n:?}"),
            Right::AgentRead(n) => write!(f, "agent:read on {n:?}"),
            Right::AgentWrite(n) => write!(f, "agent:write on {n:?}"),
            Right::OperatorRead => f.write_str("operator:read"),
            Right::OperatorWrite => f.write_str("operator:write"),
            Right::AclRead => f.write_str("acl:read"),
            Right::AclWrite => f.write_str("acl:write"),
        }
    }
}

/// The agent's `--acl-default-policy`: what a request gets where no rule speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum DefaultPolicy {
    Allow,
    Deny,
}

impl DefaultPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::Allow => "allow",
            DefaultPolicy::Deny => "deny",
        }
    }

    fn access(self) -> Access {
        match self {
            DefaultPolicy::Allow => Access::Write,
            DefaultPolicy::Deny => Access::Deny,
        }
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Exact names and prefixes of one resource kind, matched in any case: service and
/// node names are case-insensitive everywhere (see `identity::ServiceName`), so a
/// rule for `web` covers `Web`, and a token for `WEB` does not reach a service
/// other than the one its name folds to.
#[derive(Debug, Clone, Default)]
struct NameTable {
    exact: HashMap<String, Access>,
    /// Longest first, so the first match is the longest prefix.
    prefixes: Vec<(String, Access)>,
}

impl NameTable {
    fn add_exact(&mut self, name: &str, access: Access) {
        self.exact
            .entry(name.to_ascii_lowercase())
            .and_modify(|a| *a = a.merge(access))
            .or_insert(access);
    }

    fn add_prefix(&mut self, prefix: &str, access: Access) {
        let prefix = prefix.to_ascii_lowercase();
        match self.prefixes.iter_mut().find(|(p, _)| *p == prefix) {
            Some((_, a)) => *a = a.merge(access),
            None => self.prefixes.push((prefix, access)),
        }
    }

    fn finish(&mut self) {
        self.prefixes
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    }

    fn lookup(&self, name: &str) -> Option<Access> {
        let name = name.to_ascii_lowercase();
        self.exact.get(&name).copied().or_else(|| {
            self.prefixes
                .iter()
                .find(|(p, _)| name.starts_with(p.as_str()))
                .map(|(_, a)| *a)
        })
    }
}

/// One token's compiled rules plus the default policy.
#[derive(Debug, Clone)]
pub struct Grants {
    services: NameTable,
    intentions: NameTable,
    nodes: NameTable,
    agents: NameTable,
    operator: Option<Access>,
    acl: Option<Access>,
    default: DefaultPolicy,
}

impl Grants {
    /// The grants of a token whose policies hold `rules` (already filtered to
    /// the ones that apply in this datacenter).
    pub fn new<'a>(rules: impl IntoIterator<Item = &'a Rules>, default: DefaultPolicy) -> Self {
        let mut a = Grants {
            services: NameTable::default(),
            intentions: NameTable::default(),
            nodes: NameTable::default(),
            agents: NameTable::default(),
            operator: None,
            acl: None,
            default,
        };
        let merge = |slot: &mut Option<Access>, v: Option<Access>| {
            if let Some(v) = v {
                *slot = Some(slot.map_or(v, |s| s.merge(v)));
            }
        };
        for r in rules {
            for (name, rule) in &r.services {
                a.services.add_exact(name, rule.policy);
                a.intentions.add_exact(name, rule.intention_access());
            }
            for (prefix, rule) in &r.service_prefixes {
                a.services.add_prefix(prefix, rule.policy);
                a.intentions.add_prefix(prefix, rule.intention_access());
            }
            for (name, access) in &r.nodes {
                a.nodes.add_exact(name, *access);
            }
            for (prefix, access) in &r.node_prefixes {
                a.nodes.add_prefix(prefix, *access);
            }
            for (name, access) in &r.agents {
                a.agents.add_exact(name, *access);
            }
            for (prefix, access) in &r.agent_prefixes {
                a.agents.add_prefix(prefix, *access);
            }
            merge(&mut a.operator, r.operator);
            merge(&mut a.acl, r.acl);
        }
        for t in [
            &mut a.services,
            &mut a.intentions,
            &mut a.nodes,
            &mut a.agents,
        ] {
            t.finish();
        }
        a
    }

    /// The anonymous request's grants: the default policy alone.
    pub fn anonymous(default: DefaultPolicy) -> Self {
        Self::new([], default)
    }

    /// Whether the holder has `right`.
    pub fn allows(&self, right: Right<'_>) -> bool {
        let (have, want) = match right {
            Right::ServiceRead(n) => (self.named(&self.services, n), Access::Read),
            Right::ServiceWrite(n) => (self.named(&self.services, n), Access::Write),
            Right::IntentionRead(n) => (self.named(&self.intentions, n), Access::Read),
            Right::IntentionWrite(n) => (self.named(&self.intentions, n), Access::Write),
            Right::NodeRead(n) => (self.named(&self.nodes, n), Access::Read),
            Right::NodeWrite(n) => (self.named(&self.nodes, n), Access::Write),
            Right::AgentRead(n) => (self.named(&self.agents, n), Access::Read),
            Right::AgentWrite(n) => (self.named(&self.agents, n), Access::Write),
            Right::OperatorRead => (self.global(self.operator), Access::Read),
            Right::OperatorWrite => (self.global(self.operator), Access::Write),
            // Never granted by the default policy, as in Consul: only a rule (the
            // management policy has one) gives ACL rights.
            Right::AclRead => (self.acl.unwrap_or(Access::Deny), Access::Read),
            Right::AclWrite => (self.acl.unwrap_or(Access::Deny), Access::Write),
        };
        have >= want && have != Access::Deny
    }

    fn named(&self, table: &NameTable, name: &str) -> Access {
        table.lookup(name).unwrap_or(self.default.access())
    }

    fn global(&self, rule: Option<Access>) -> Access {
        rule.unwrap_or(self.default.access())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(rules: &[&str], default: DefaultPolicy) -> Grants {
        let parsed: Vec<Rules> = rules
            .iter()
            .map(|r| Rules::parse(r).expect("rules"))
            .collect();
        Grants::new(&parsed, default)
    }

    #[test]
    fn decision_table() {
        use DefaultPolicy::*;
        use Right::*;
        let web_writer = r#"service "web" { policy = "write" }"#;
        let prefixes = r#"
            service_prefix "" { policy = "read" }
            service_prefix "api-" { policy = "write" intentions = "write" }
            service "api-internal" { policy = "deny" }
        "#;
        let cases: &[(&[&str], DefaultPolicy, Right<'_>, bool)] = &[
            // Exact rules.
            (&[web_writer], Deny, ServiceWrite("web"), true),
            (&[web_writer], Deny, ServiceRead("web"), true),
            (&[web_writer], Deny, IntentionRead("web"), true),
            (&[web_writer], Deny, IntentionWrite("web"), false),
            (&[web_writer], Deny, ServiceRead("db"), false),
            (&[web_writer], Deny, ServiceWrite("web2"), false),
            (&[web_writer], Allow, ServiceWrite("db"), true),
            // Names match in any case, as the catalog and the proxy do.
            (&[web_writer], Deny, ServiceWrite("WEB"), true),
            (
                &[r#"service "WEB" { policy = "write" }"#],
                Deny,
                ServiceWrite("web"),
                true,
            ),
            (&[prefixes], Deny, ServiceWrite("API-x"), true),
            (&[prefixes], Deny, ServiceWrite("API-Internal"), false),
            // Longest prefix, exact over prefix.
            (&[prefixes], Deny, ServiceRead("db"), true),
            (&[prefixes], Deny, ServiceWrite("db"), false),
            (&[prefixes], Deny, ServiceWrite("api-users"), true),
            (&[prefixes], Deny, IntentionWrite("api-users"), true),
            (&[prefixes], Deny, IntentionWrite("db"), false),
            (&[prefixes], Deny, IntentionRead("db"), true),
            (&[prefixes], Deny, ServiceRead("api-internal"), false),
            (&[prefixes], Deny, IntentionRead("api-internal"), false),
            (&[prefixes], Allow, ServiceRead("api-internal"), false),
            // Wildcard intention destinations need a rule covering "*".
            (&[prefixes], Deny, IntentionWrite("*"), false),
            (
                &[r#"service_prefix "" { policy = "read" intentions = "write" }"#],
                Deny,
                IntentionWrite("*"),
                true,
            ),
            // Several policies: broader wins, deny wins over all.
            (
                &[web_writer, r#"service "web" { policy = "read" }"#],
                Deny,
                ServiceWrite("web"),
                true,
            ),
            (
                &[web_writer, r#"service "web" { policy = "deny" }"#],
                Allow,
                ServiceRead("web"),
                false,
            ),
            // Nodes, agents, operator.
            (
                &[r#"node_prefix "" { policy = "read" }"#],
                Deny,
                NodeRead("n1"),
                true,
            ),
            (
                &[r#"node_prefix "" { policy = "read" }"#],
                Deny,
                NodeWrite("n1"),
                false,
            ),
            (
                &[r#"agent "n1" { policy = "read" }"#],
                Deny,
                AgentRead("n1"),
                true,
            ),
            (
                &[r#"agent "n1" { policy = "read" }"#],
                Deny,
                AgentRead("n2"),
                false,
            ),
            (
                &[r#"agent "n1" { policy = "read" }"#],
                Deny,
                AgentWrite("n1"),
                false,
            ),
            (&[r#"operator = "read""#], Deny, OperatorRead, true),
            (&[r#"operator = "read""#], Deny, OperatorWrite, false),
            (&[r#"operator = "deny""#], Allow, OperatorRead, false),
            (&[], Allow, OperatorWrite, true),
            (&[], Deny, OperatorRead, false),
            // ACL rights come from rules only.
            (&[], Allow, AclRead, false),
            (&[r#"acl = "read""#], Deny, AclRead, true),
            (&[r#"acl = "read""#], Deny, AclWrite, false),
            (&[r#"acl = "write""#], Deny, AclWrite, true),
        ];
        for (rules, default, right, want) in cases {
            assert_eq!(
                auth(rules, *default).allows(*right),
                *want,
                "{right} with {rules:?} and default {default}"
            );
        }
    }

    #[test]
    fn anonymous_follows_the_default() {
        let deny = Grants::anonymous(DefaultPolicy::Deny);
        let allow = Grants::anonymous(DefaultPolicy::Allow);
        for r in [
            Right::ServiceRead("web"),
            Right::IntentionWrite("web"),
            Right::AgentRead("n"),
            Right::OperatorWrite,
        ] {
            assert!(!deny.allows(r), "{r}");
            assert!(allow.allows(r), "{r}");
        }
    }
}
