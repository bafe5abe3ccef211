//! Enforcement: the [`Authz`] extractor gives every handler the caller's ACL
//! identity, and [`Authz::require`] turns a missing right into Consul's 403.
//!
//! The token is read as Consul does (reference §1.3): `?token=`, then the
//! `X-Consul-Token` header, then `Authorization: Bearer <token>`; none is the
//! anonymous token. Resolving is an in-memory lookup ([`crate::acl::Acl::resolve`]).
//! An unknown secret is not refused at extraction: an endpoint that needs no right
//! answers it as Consul does, one that needs a right answers 403 `ACL not found`.
//! Denials answer exactly `Permission denied`, naming neither the right nor the
//! resource; the agent logs the accessor and the right instead.

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, request::Parts},
};

use super::{ApiState, Error};
use crate::acl::Caller;
pub use crate::acl::Right;

/// The caller's ACL identity, for handlers to check rights against.
#[derive(Debug, Clone)]
pub struct Authz {
    identity: Caller,
}

impl Authz {
    /// An identity fixed by the caller (tests, in-process callers).
    pub fn new(identity: Caller) -> Self {
        Self { identity }
    }

    pub fn identity(&self) -> &Caller {
        &self.identity
    }

    /// Succeeds if the caller holds `right`; otherwise 403 `Permission denied`, or
    /// 403 `ACL not found` for a secret no token has.
    pub fn require(&self, right: Right<'_>) -> Result<(), Error> {
        match &self.identity {
            Caller::Unknown => Err(Error::AclNotFound),
            id if id.allows(right) => Ok(()),
            id => {
                tracing::info!(accessor = ?id.accessor(), %right, "permission denied");
                Err(Error::PermissionDenied)
            }
        }
    }

    /// Whether the caller holds `right`, for filtering lists (no error, no log).
    pub fn allows(&self, right: Right<'_>) -> bool {
        self.identity.allows(right)
    }

    /// For list endpoints that filter instead of refusing: an unknown secret is
    /// still 403 `ACL not found` (Consul's behaviour), anything else proceeds.
    pub fn known(&self) -> Result<(), Error> {
        match self.identity {
            Caller::Unknown => Err(Error::AclNotFound),
            _ => Ok(()),
        }
    }

    /// Keeps the items whose right the caller holds.
    pub fn filter<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        right: impl Fn(&T) -> Right<'_>,
    ) -> Result<Vec<T>, Error> {
        self.known()?;
        Ok(items
            .into_iter()
            .filter(|item| self.identity.allows(right(item)))
            .collect())
    }
}

impl FromRequestParts<ApiState> for Authz {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, agent: &ApiState) -> Result<Self, Error> {
        let secret = token_of(parts.uri.query().unwrap_or(""), &parts.headers);
        Ok(Authz {
            identity: agent.acl.resolve(secret.as_deref()),
        })
    }
}

/// The secret a request carries, in Consul's order of precedence.
pub fn token_of(query: &str, headers: &HeaderMap) -> Option<String> {
    let from_query = query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == "token").then(|| percent_decode(v))
    });
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    from_query
        .filter(|t| !t.is_empty())
        .or_else(|| {
            header("x-consul-token")
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
        })
        .or_else(|| {
            header("authorization")
                .and_then(|v| {
                    v.split_once(' ')
                        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                })
                .map(|(_, t)| t.trim().to_owned())
                .filter(|t| !t.is_empty())
        })
}

/// `%XX` and `+` decoding of a query value; invalid escapes are kept as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        // Two hex digits are at most 0xff.
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn token_precedence() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of("", &h), None);
        h.insert("authorization", HeaderValue::from_static("Bearer  b-tok "));
        assert_eq!(token_of("", &h).as_deref(), Some("b-tok"));
        h.insert("x-consul-token", HeaderValue::from_static("h-tok"));
        assert_eq!(token_of("", &h).as_deref(), Some("h-tok"));
        assert_eq!(token_of("a=1&token=q%2Dtok", &h).as_deref(), Some("q-tok"));
        assert_eq!(token_of("token=", &h).as_deref(), Some("h-tok"));
        let mut basic = HeaderMap::new();
        basic.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(token_of("", &basic), None);
    }

    #[test]
    fn percent_decoding() {
        for (raw, want) in [
            ("abc", "abc"),
            ("a%20b", "a b"),
            ("a+b", "a b"),
            ("%zz", "%zz"),
            ("50%", "50%"),
            ("%4", "%4"),
        ] {
            assert_eq!(percent_decode(raw), want, "{raw}");
        }
    }
}
