//! The in-memory intention table and the pure authorization decision.
//!
//! Intentions are indexed by ID, and twice by name: destination → source → intention
//! and source → destination → intention, where a name is a service or `*`. Because a
//! (source, destination) pair is unique, the first match in Consul's evaluation order
//! (reference §4.1: precedence 9, 8, 6, 5) is found with at most four hash lookups —
//! `dst/src`, `dst/*`, `*/src`, `*/*` — whatever the number of intentions. Nothing
//! here does I/O or allocates on the decision path beyond one `Arc` clone.
//!
//! This module does not know the store; the parent keeps the table current.

use std::{collections::HashMap, fmt, sync::Arc};

use uuid::Uuid;

use super::model::{Action, Intention, Selector, WILDCARD};
use crate::{identity::TrustDomain, store::Index};

/// The outcome of an authorization: what to do, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: Reason,
}

/// Why a [`Decision`] came out as it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The first intention in evaluation order that matched.
    Intention(Arc<Intention>),
    /// No intention matched; the agent's default policy decided.
    Default,
    /// The client's certificate names another trust domain than our CA's.
    ExternalTrustDomain(TrustDomain),
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        self.action == Action::Allow
    }

    /// The intention that decided, if one did.
    pub fn intention(&self) -> Option<&Arc<Intention>> {
        match &self.reason {
            Reason::Intention(i) => Some(i),
            Reason::Default | Reason::ExternalTrustDomain(_) => None,
        }
    }

    pub(super) fn default_policy(default_allow: bool) -> Self {
        Decision {
            action: if default_allow {
                Action::Allow
            } else {
                Action::Deny
            },
            reason: Reason::Default,
        }
    }
}

/// Consul's `Reason` strings (reference §2.3).
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            Reason::Intention(i) => write!(f, "Matched intention: {}", i.server_string()),
            // Until ACLs exist, the default is the agent's (allow in --dev); once they
            // do it is the ACL default policy, which is what Consul says here.
            Reason::Default if self.is_allow() => {
                f.write_str("ACLs disabled, access is allowed by default")
            }
            Reason::Default => f.write_str("Default behavior configured by ACLs"),
            Reason::ExternalTrustDomain(td) => {
                write!(f, "Identity from an external trust domain: {td}")
            }
        }
    }
}

/// Match intentions by their source or by their destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchBy {
    Source,
    Destination,
}

/// Every intention, indexed for lookups by ID, by pair and for authorization.
#[derive(Default, Clone)]
pub struct Table {
    index: Index,
    by_id: HashMap<Uuid, Arc<Intention>>,
    /// destination name (or `*`) → source name (or `*`) → intention.
    by_destination: HashMap<String, HashMap<String, Arc<Intention>>>,
    /// source name (or `*`) → destination name (or `*`) → intention.
    by_source: HashMap<String, HashMap<String, Arc<Intention>>>,
}

impl fmt::Debug for Table {
    // Printing 100 000 intentions helps nobody.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("index", &self.index)
            .field("len", &self.by_id.len())
            .finish()
    }
}

impl Table {
    /// A table of `intentions` as of store index `index`.
    pub fn from_intentions(index: Index, intentions: impl IntoIterator<Item = Intention>) -> Self {
        let mut t = Table {
            index,
            ..Table::default()
        };
        for i in intentions {
            t.insert(Arc::new(i));
        }
        t
    }

    /// The store index this table reflects.
    pub fn index(&self) -> Index {
        self.index
    }

    pub(super) fn set_index(&mut self, index: Index) {
        self.index = index;
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Adds or replaces (by ID) an intention. If another intention held the same pair
    /// — which the store's transactions prevent — it is dropped, so the indexes never
    /// disagree.
    pub fn insert(&mut self, intention: Arc<Intention>) {
        self.remove(&intention.id);
        let (src, dst) = (intention.source.as_str(), intention.destination.as_str());
        if let Some(other) = self.pair(src, dst).map(|o| o.id) {
            tracing::warn!(
                kept = %intention.id, dropped = %other, source = src, destination = dst,
                "two intentions for one source/destination pair"
            );
            self.remove(&other);
        }
        self.by_destination
            .entry(dst.to_owned())
            .or_default()
            .insert(src.to_owned(), intention.clone());
        self.by_source
            .entry(src.to_owned())
            .or_default()
            .insert(dst.to_owned(), intention.clone());
        self.by_id.insert(intention.id, intention);
    }

    /// Removes an intention by ID.
    pub fn remove(&mut self, id: &Uuid) -> Option<Arc<Intention>> {
        let old = self.by_id.remove(id)?;
        let (src, dst) = (old.source.as_str(), old.destination.as_str());
        remove_nested(&mut self.by_destination, dst, src);
        remove_nested(&mut self.by_source, src, dst);
        Some(old)
    }

    pub fn get(&self, id: &Uuid) -> Option<&Arc<Intention>> {
        self.by_id.get(id)
    }

    /// The intention for exactly this pair (no wildcard expansion).
    pub fn exact(&self, source: &Selector, destination: &Selector) -> Option<&Arc<Intention>> {
        self.pair(source.as_str(), destination.as_str())
    }

    fn pair(&self, source: &str, destination: &str) -> Option<&Arc<Intention>> {
        self.by_destination.get(destination)?.get(source)
    }

    /// Whether `source` may reach `destination`: the first intention in evaluation
    /// order whose source and destination match (each the name itself or `*`), else
    /// the default policy. Names are matched as given; a name of `*` matches only
    /// wildcard intentions.
    pub fn decide(&self, source: &str, destination: &str, default_allow: bool) -> Decision {
        let destinations = [destination, WILDCARD];
        let destinations = if destination == WILDCARD {
            &destinations[1..]
        } else {
            &destinations[..]
        };
        for dst in destinations {
            let Some(sources) = self.by_destination.get(*dst) else {
                continue;
            };
            let found = if source == WILDCARD {
                None
            } else {
                sources.get(source)
            };
            if let Some(i) = found.or_else(|| sources.get(WILDCARD)) {
                return Decision {
                    action: i.action,
                    reason: Reason::Intention(i.clone()),
                };
            }
        }
        Decision::default_policy(default_allow)
    }

    /// Intentions whose source (or destination) is `name` or `*`, in evaluation order.
    /// `*` itself yields only the wildcard intentions.
    pub fn matching(&self, by: MatchBy, name: &str) -> Vec<Arc<Intention>> {
        let map = match by {
            MatchBy::Source => &self.by_source,
            MatchBy::Destination => &self.by_destination,
        };
        let mut out: Vec<Arc<Intention>> = Vec::new();
        for key in [name, WILDCARD] {
            if let Some(m) = map.get(key) {
                out.extend(m.values().cloned());
            }
            if name == WILDCARD {
                break;
            }
        }
        out.sort_by(|a, b| Intention::evaluation_order(a, b));
        out
    }

    /// Every intention, in evaluation order (as Consul lists them).
    pub fn all(&self) -> Vec<Arc<Intention>> {
        let mut out: Vec<Arc<Intention>> = self.by_id.values().cloned().collect();
        out.sort_by(|a, b| Intention::evaluation_order(a, b));
        out
    }
}

fn remove_nested(
    map: &mut HashMap<String, HashMap<String, Arc<Intention>>>,
    outer: &str,
    inner: &str,
) {
    if let Some(m) = map.get_mut(outer) {
        m.remove(inner);
        if m.is_empty() {
            map.remove(outer);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::intentions::model::Spec;

    fn ixn(n: u128, src: &str, dst: &str, action: Action) -> Intention {
        Intention::new(
            Uuid::from_u128(n),
            Spec {
                source: Selector::parse("SourceName", src).expect("src"),
                destination: Selector::parse("DestinationName", dst).expect("dst"),
                action,
                description: String::new(),
                meta: BTreeMap::new(),
            },
            "2024-01-01T00:00:00Z".into(),
            "2024-01-01T00:00:00Z".into(),
            n as Index,
            n as Index,
        )
    }

    use Action::{Allow, Deny};

    /// Each case: the intentions present, then (source, destination) → the expected
    /// action and the ID of the intention that decides (0 = the default policy).
    #[test]
    fn precedence_and_wildcards() {
        type Case = (
            &'static str,
            Vec<(&'static str, &'static str, Action)>,
            (&'static str, &'static str),
            bool,
            (Action, u128),
        );
        let cases: Vec<Case> = vec![
            (
                "empty, default deny",
                vec![],
                ("web", "db"),
                false,
                (Deny, 0),
            ),
            (
                "empty, default allow",
                vec![],
                ("web", "db"),
                true,
                (Allow, 0),
            ),
            (
                "exact beats everything",
                vec![
                    ("web", "db", Allow),
                    ("*", "db", Deny),
                    ("web", "*", Deny),
                    ("*", "*", Deny),
                ],
                ("web", "db"),
                false,
                (Allow, 1),
            ),
            (
                "wildcard source on exact destination (8) beats exact source on wildcard destination (6)",
                vec![("*", "db", Deny), ("web", "*", Allow), ("*", "*", Allow)],
                ("web", "db"),
                true,
                (Deny, 1),
            ),
            (
                "exact source on wildcard destination (6) beats */* (5)",
                vec![("web", "*", Allow), ("*", "*", Deny)],
                ("web", "db"),
                false,
                (Allow, 1),
            ),
            (
                "*/* applies when nothing else does",
                vec![("*", "*", Deny), ("api", "db", Allow)],
                ("web", "db"),
                true,
                (Deny, 1),
            ),
            (
                "other sources' intentions do not apply",
                vec![("api", "db", Deny), ("api", "*", Deny)],
                ("web", "db"),
                true,
                (Allow, 0),
            ),
            (
                "other destinations' intentions do not apply",
                vec![("web", "cache", Deny), ("*", "cache", Deny)],
                ("web", "db"),
                true,
                (Allow, 0),
            ),
            (
                "a deny at higher precedence overrides default allow",
                vec![("web", "db", Deny)],
                ("web", "db"),
                true,
                (Deny, 1),
            ),
            (
                "names are case-sensitive",
                vec![("Web", "db", Allow)],
                ("web", "db"),
                false,
                (Deny, 0),
            ),
            (
                "checking source * sees only wildcard sources",
                vec![("web", "db", Allow), ("*", "db", Deny)],
                ("*", "db"),
                true,
                (Deny, 2),
            ),
            (
                "checking destination * sees only wildcard destinations",
                vec![("web", "db", Deny), ("web", "*", Allow)],
                ("web", "*"),
                false,
                (Allow, 2),
            ),
        ];
        for (name, present, (src, dst), default_allow, (action, id)) in cases {
            let t = Table::from_intentions(
                1,
                present
                    .iter()
                    .enumerate()
                    .map(|(n, (s, d, a))| ixn(n as u128 + 1, s, d, *a)),
            );
            let d = t.decide(src, dst, default_allow);
            assert_eq!(d.action, action, "{name}");
            assert_eq!(
                d.intention().map(|i| i.id.as_u128()).unwrap_or(0),
                id,
                "{name}"
            );
        }
    }

    #[test]
    fn evaluation_order_breaks_ties_by_name() {
        let t = Table::from_intentions(
            1,
            [
                ixn(1, "*", "*", Allow),
                ixn(2, "web", "*", Allow),
                ixn(3, "*", "db", Allow),
                ixn(4, "web", "db", Allow),
                ixn(5, "api", "db", Allow),
                ixn(6, "zeta", "db", Allow),
                ixn(7, "api", "*", Allow),
                ixn(8, "web", "cache", Allow),
            ],
        );
        let order =
            |v: Vec<Arc<Intention>>| -> Vec<u128> { v.iter().map(|i| i.id.as_u128()).collect() };
        // Precedence 9 (api, web, zeta by source name), 8, 6 (api, web), 5.
        assert_eq!(
            order(t.matching(MatchBy::Destination, "db")),
            vec![5, 4, 6, 3, 7, 2, 1]
        );
        assert_eq!(
            order(t.matching(MatchBy::Source, "web")),
            // 9: web=>cache, web=>db (by destination name); 8: *=>db; 6: web=>*; 5: *=>*.
            vec![8, 4, 3, 2, 1]
        );
        assert_eq!(order(t.matching(MatchBy::Destination, "*")), vec![7, 2, 1]);
        assert_eq!(
            order(t.matching(MatchBy::Destination, "nothing")),
            vec![7, 2, 1]
        );
        assert_eq!(order(t.all()), vec![5, 8, 4, 6, 3, 7, 2, 1]);
    }

    #[test]
    fn insert_replace_and_remove_keep_indexes_consistent() {
        let mut t = Table::from_intentions(1, [ixn(1, "web", "db", Deny)]);
        // Update in place with a new pair: the old pair must stop matching.
        t.insert(Arc::new(ixn(1, "api", "db", Deny)));
        assert_eq!(t.decide("web", "db", true).action, Allow);
        assert_eq!(t.decide("api", "db", true).action, Deny);
        assert_eq!(t.matching(MatchBy::Source, "web").len(), 0);
        assert_eq!(t.len(), 1);
        // A second ID claiming the same pair replaces the first everywhere.
        t.insert(Arc::new(ixn(2, "api", "db", Allow)));
        assert_eq!(t.len(), 1);
        assert!(t.get(&Uuid::from_u128(1)).is_none());
        assert_eq!(t.decide("api", "db", false).action, Allow);
        assert!(t.remove(&Uuid::from_u128(2)).is_some());
        assert!(t.is_empty());
        assert!(t.by_destination.is_empty() && t.by_source.is_empty());
        assert_eq!(
            t.decide("api", "db", false),
            Decision::default_policy(false)
        );
    }

    #[test]
    fn reasons() {
        let t = Table::from_intentions(1, [ixn(1, "web", "db", Deny)]);
        assert_eq!(
            t.decide("web", "db", true).to_string(),
            "Matched intention: DENY default/web => default/db (ID: 00000000-0000-0000-0000-000000000001, Precedence: 9)"
        );
        assert_eq!(
            t.decide("x", "db", true).to_string(),
            "ACLs disabled, access is allowed by default"
        );
        assert_eq!(
            t.decide("x", "db", false).to_string(),
            "Default behavior configured by ACLs"
        );
    }
}
