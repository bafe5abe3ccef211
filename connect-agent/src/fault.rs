//! Whose fault an error is. Each domain error (catalog, intentions, ACL, CA, store)
//! says it through [`Blame`]; the HTTP API turns that into a status in one place
//! (`api::Error`) and keeps the error itself, so that a 500 is logged with every
//! cause underneath it.

/// Who has to act on an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request is wrong: the caller fixes it (400).
    Caller,
    /// The request names something that does not exist (404).
    NotFound,
    /// The request conflicts with the current state or lost a race: retry or
    /// reconcile (409).
    Conflict,
    /// The caller may not do this (403).
    Forbidden,
    /// The request needs a feature this agent runs without (Consul answers ACL
    /// endpoints with ACLs disabled 401).
    Disabled,
    /// Ours: the store, a record, the configuration or a bug. The operator looks
    /// (500, logged).
    Ours,
}

/// An error that knows whose fault it is.
pub trait Blame: std::error::Error + Send + Sync + 'static {
    fn fault(&self) -> Fault;
}

impl Blame for crate::store::Error {
    fn fault(&self) -> Fault {
        Fault::Ours
    }
}

/// The error and each of its causes, `: `-separated, for logs.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // `#[error(transparent)]` and "{source}" messages repeat their cause.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the leaf")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot write: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn chain_names_every_cause_once() {
        let io = || std::io::Error::other("disk full");
        assert_eq!(chain(&Outer(io())), "cannot read the leaf: disk full");
        assert_eq!(chain(&Repeats(io())), "cannot write: disk full");
    }
}
