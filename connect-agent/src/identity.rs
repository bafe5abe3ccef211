//! Names and identities: [`ServiceName`], [`TrustDomain`], [`SpiffeId`].
//!
//! Everything a user, file or peer names enters the agent through `FromStr` here, so
//! the rest of the code handles only valid values. `Display` round-trips `FromStr`.
//! This module knows nothing of certificates; `ca` puts these values into them.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Why a name or identity was refused. The input is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{what} {value:?} is invalid: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> Error {
    Error::Invalid {
        what,
        value: value.chars().take(128).collect(),
        reason,
    }
}

/// Longest service name: a DNS label, so `<svc>.service.consul` stays valid.
const MAX_NAME_LEN: usize = 63;

/// Checks a DNS-label-like name: ASCII letters, digits, `-` and `_`, not starting or
/// ending with `-`. Consul's service names follow the same rule (see the reference).
fn check_label(what: &'static str, s: &str) -> Result<(), Error> {
    if s.is_empty() {
        return Err(invalid(what, s, "it is empty"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(invalid(what, s, "it is longer than 63 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            what,
            s,
            "only ASCII letters, digits, '-' and '_' are allowed",
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(invalid(what, s, "it may not start or end with '-'"));
    }
    Ok(())
}

/// A service's name (`web`, `socat`).
///
/// Names are case-insensitive everywhere, as in Consul's catalog: `Web` and `web`
/// are one service (one catalog entry, one set of endpoints, one leaf, one SNI
/// name, and the same intentions). The spelling a name was given with is kept for
/// display; comparing, hashing and ordering fold ASCII case (a name is DNS-label
/// characters only), so every map keyed by `ServiceName` follows the rule and no
/// caller folds by hand.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

impl ServiceName {
    /// The spelling the name was given with.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name in lower case: its form in DNS names (SNI, certificate SANs, DNS
    /// answers' keys), where case carries no meaning either.
    pub fn to_lowercase(&self) -> String {
        self.0.to_ascii_lowercase()
    }

    fn folded(&self) -> impl Iterator<Item = u8> + '_ {
        self.0.bytes().map(|b| b.to_ascii_lowercase())
    }
}

impl PartialEq for ServiceName {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl Eq for ServiceName {}

impl std::hash::Hash for ServiceName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // One write of the folded name, as `str` hashes (byte by byte would cost
        // the hasher a round per byte on the authorize path). A name is at most
        // MAX_NAME_LEN bytes, so it fits the buffer.
        let mut buf = [0u8; MAX_NAME_LEN];
        let n = self.0.len().min(MAX_NAME_LEN);
        for (d, b) in buf.iter_mut().zip(self.0.bytes()) {
            *d = b.to_ascii_lowercase();
        }
        state.write(&buf[..n]);
        // As `str` does, so that a prefix never hashes like the longer name.
        state.write_u8(0xff);
    }
}

impl PartialOrd for ServiceName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ServiceName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.folded().cmp(other.folded())
    }
}

impl FromStr for ServiceName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        check_label("service name", s)?;
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for ServiceName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        check_label("service name", &s)?;
        Ok(Self(s))
    }
}

impl From<ServiceName> for String {
    fn from(n: ServiceName) -> String {
        n.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `<service>.svc.<trust-domain>` in lower case: a service's name in DNS form, the
/// SNI proxies send and the DNS SAN of the service's leaf (DESIGN "A connection,
/// end to end").
pub fn service_dns_name(service: &ServiceName, trust_domain: &TrustDomain) -> String {
    format!("{}.svc.{trust_domain}", service.to_lowercase())
}

/// The service a DNS name `<service>.svc.<trust-domain>` names, in any case (DNS
/// names carry none); `None` for any other name.
pub fn service_of_dns_name(name: &str, trust_domain: &TrustDomain) -> Option<ServiceName> {
    let suffix = format!(".svc.{trust_domain}");
    let cut = name.len().checked_sub(suffix.len())?;
    let (service, tail) = (name.get(..cut)?, name.get(cut..)?);
    if !tail.eq_ignore_ascii_case(&suffix) {
        return None;
    }
    service.parse().ok()
}

/// A datacenter name (`dc1`), same rules as a service name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Datacenter(String);

impl Datacenter {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Datacenter {
    fn default() -> Self {
        Self("dc1".to_owned())
    }
}

impl FromStr for Datacenter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        check_label("datacenter", s)?;
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for Datacenter {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<Datacenter> for String {
    fn from(d: Datacenter) -> String {
        d.0
    }
}

impl fmt::Display for Datacenter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE trust domain, `<cluster-id>.consul` for the built-in CA. Lower case,
/// DNS-like (letters, digits, `.`, `-`, `_`), as the SPIFFE ID spec requires.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain of a cluster: `<cluster-id>.consul`.
    pub fn for_cluster(cluster_id: &uuid::Uuid) -> Self {
        Self(format!("{}.consul", cluster_id.hyphenated()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<td>`, carried by CA roots.
    pub fn spiffe_uri(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.is_empty() {
            return Err(invalid("trust domain", s, "it is empty"));
        }
        if s.len() > 255 {
            return Err(invalid(
                "trust domain",
                s,
                "it is longer than 255 characters",
            ));
        }
        if !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
        }) {
            return Err(invalid(
                "trust domain",
                s,
                "only lower-case letters, digits, '.', '-' and '_' are allowed",
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<TrustDomain> for String {
    fn from(t: TrustDomain) -> String {
        t.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A service's SPIFFE ID: `spiffe://<td>/ns/<ns>/dc/<dc>/svc/<name>`, as Consul issues.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: TrustDomain,
    pub namespace: String,
    pub datacenter: Datacenter,
    pub service: ServiceName,
}

impl SpiffeId {
    /// The ID of `service` in the default namespace.
    pub fn service(
        trust_domain: TrustDomain,
        datacenter: Datacenter,
        service: ServiceName,
    ) -> Self {
        Self {
            trust_domain,
            namespace: "default".to_owned(),
            datacenter,
            service,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        const WHAT: &str = "SPIFFE ID";
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| invalid(WHAT, s, "it does not start with spiffe://"))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid(WHAT, s, "it has no path"))?;
        let trust_domain: TrustDomain = td
            .parse()
            .map_err(|_| invalid(WHAT, s, "its trust domain is invalid"))?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "dc", dc, "svc", svc] => {
                check_label("namespace", ns)
                    .map_err(|_| invalid(WHAT, s, "its namespace is invalid"))?;
                Ok(Self {
                    trust_domain,
                    namespace: (*ns).to_owned(),
                    datacenter: dc
                        .parse()
                        .map_err(|_| invalid(WHAT, s, "its datacenter is invalid"))?,
                    service: svc
                        .parse()
                        .map_err(|_| invalid(WHAT, s, "its service name is invalid"))?,
                })
            }
            _ => Err(invalid(
                WHAT,
                s,
                "its path is not /ns/<namespace>/dc/<datacenter>/svc/<service>",
            )),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/dc/{}/svc/{}",
            self.trust_domain, self.namespace, self.datacenter, self.service
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for ok in ["web", "socat", "a", "web-2", "web_v2", "Web"] {
            assert_eq!(
                ok.parse::<ServiceName>().map(|n| n.to_string()).as_deref(),
                Ok(ok)
            );
        }
        let long = "x".repeat(64);
        for bad in [
            "",
            "-web",
            "web-",
            "we b",
            "web/1",
            "wéb",
            "a.b",
            "*",
            long.as_str(),
        ] {
            assert!(bad.parse::<ServiceName>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn spiffe_ids_round_trip() {
        let s = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web";
        let id: SpiffeId = s.parse().expect("valid id");
        assert_eq!(id.service.as_str(), "web");
        assert_eq!(id.datacenter.as_str(), "dc1");
        assert_eq!(id.to_string(), s);
    }

    #[test]
    fn spiffe_ids_rejected() {
        for bad in [
            "",
            "http://td.consul/ns/default/dc/dc1/svc/web",
            "spiffe://td.consul",
            "spiffe://td.consul/",
            "spiffe://TD.consul/ns/default/dc/dc1/svc/web",
            "spiffe://td.consul/ns/default/dc/dc1/svc/",
            "spiffe://td.consul/ns/default/dc/dc1/svc/web/extra",
            "spiffe://td.consul/ns/default/dc/dc1/agent/web",
            "spiffe://td.consul/ns/default/dc/dc1/svc/we b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn trust_domain_for_cluster() {
        let id = uuid::Uuid::nil();
        let td = TrustDomain::for_cluster(&id);
        assert_eq!(td.as_str(), "00000000-0000-0000-0000-000000000000.consul");
        assert_eq!(
            td.spiffe_uri(),
            "spiffe://00000000-0000-0000-0000-000000000000.consul"
        );
        assert_eq!(td.as_str().parse::<TrustDomain>(), Ok(td));
    }

    #[test]
    fn service_names_are_one_whatever_their_case() {
        use std::collections::{BTreeMap, HashMap};
        let web: ServiceName = "Web".parse().expect("name");
        let lower: ServiceName = "web".parse().expect("name");
        let other: ServiceName = "web2".parse().expect("name");
        assert_eq!(web, lower);
        assert_ne!(web, other);
        assert_eq!(web.to_string(), "Web", "the spelling is kept for display");
        assert_eq!(web.to_lowercase(), "web");
        let mut by_hash = HashMap::new();
        by_hash.insert(lower.clone(), 1);
        assert_eq!(by_hash.get(&web), Some(&1));
        let mut ordered = BTreeMap::new();
        ordered.insert(web.clone(), 1);
        ordered.insert(lower.clone(), 2);
        ordered.insert("API".parse::<ServiceName>().expect("name"), 3);
        assert_eq!(ordered.len(), 2);
        assert_eq!(
            ordered.keys().map(ServiceName::as_str).collect::<Vec<_>>(),
            ["API", "Web"],
            "ordered by the folded name"
        );
        assert!("ab".parse::<ServiceName>().expect("name") < "AB-c".parse().expect("name"));
    }

    #[test]
    fn service_dns_names_round_trip_in_any_case() {
        let td = TrustDomain::for_cluster(&uuid::Uuid::nil());
        let web: ServiceName = "Web".parse().expect("name");
        let dns = service_dns_name(&web, &td);
        assert_eq!(dns, format!("web.svc.{td}"));
        assert_eq!(service_of_dns_name(&dns, &td), Some(web.clone()));
        let upper = dns.to_ascii_uppercase();
        assert_eq!(service_of_dns_name(&upper, &td), Some(web));
        for bad in [
            format!("svc.{td}"),
            format!(".svc.{td}"),
            format!("a.b.svc.{td}"),
            "web.svc.other.consul".to_owned(),
            "web".to_owned(),
            String::new(),
        ] {
            assert_eq!(service_of_dns_name(&bad, &td), None, "{bad:?}");
        }
    }
}
