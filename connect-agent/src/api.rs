//! The agent's HTTP API: Consul's paths, JSON field names and status codes, so
//! existing Consul clients work (see `reference/consul-connect.md` §1–2).
//!
//! This module owns the server, the conventions shared by every endpoint — error →
//! status mapping ([`Error`]), blocking queries ([`QueryOptions`], [`block_on`]),
//! `X-Consul-Index` — and merges the routes of each area (`ca`, `catalog`,
//! `intentions`, `agent`). Handlers read in-memory state; they never hold a lock
//! across `.await`.

pub mod acl;
pub mod agent;
pub mod authz;
pub mod ca;
pub mod catalog;
pub mod https;
pub mod intentions;
pub mod security;
pub mod server;

pub use authz::{Authz, Right};

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::FromRequestParts,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, request::Parts},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    agent::Agent,
    fault::{self, Blame, Fault},
    store::Index,
};

/// Largest request body accepted (service definitions, intentions, CSRs are small).
pub const MAX_BODY_BYTES: usize = 512 * 1024;
/// Blocking-query wait when the client names none (Consul: 5 minutes).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// Longest blocking-query wait; longer requests are clamped (Consul: 10 minutes).
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

/// What handlers share: the running agent.
pub type ApiState = Arc<Agent>;

/// Every route of the API.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .merge(agent::routes())
        .merge(ca::routes())
        .merge(catalog::routes())
        .merge(intentions::routes())
        .merge(acl::routes())
        .merge(security::routes())
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            MAX_BODY_BYTES,
        ))
        .with_state(agent)
}

/// Binds the HTTP API. Binding is separate from serving so that a port conflict is
/// reported at startup, before the agent claims to be up.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Serves the API until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(listener, router(agent), shutdown).await
}

// ───────────────────────────── errors ─────────────────────────────

/// Every way a request can fail, mapped to Consul's status and plain-text body in one
/// place ([`IntoResponse`]). The API's own checks (the request's shape, the token's
/// rights) have variants here; a domain error (catalog, intentions, ACL, CA, store)
/// arrives whole, through `?`, and is answered by whose fault it is
/// ([`Blame`]): its message is the body, its causes go to the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body is not the JSON the endpoint takes (the client's fault).
    #[error("Request decode failed: {0}")]
    Decode(String),
    /// A parameter or field is missing or invalid (the client's fault).
    #[error("{0}")]
    BadRequest(String),
    /// `?index=` is not a number.
    #[error("Invalid index")]
    InvalidIndex,
    /// `?wait=` is not a duration.
    #[error("Invalid wait time")]
    InvalidWait,
    /// A required query parameter is missing. Consul answers 500 for these (a quirk
    /// clients rely on; see the reference §1.2).
    #[error("required query parameter '{0}' not set")]
    MissingParam(&'static str),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The caller's token lacks the right.
    #[error("Permission denied")]
    PermissionDenied,
    /// The token is unknown.
    #[error("ACL not found")]
    AclNotFound,
    /// ACL endpoints while ACLs are disabled (Consul: 401).
    #[error("ACL support disabled")]
    AclDisabled,
    /// Refused for a reason the caller may know (e.g. signing without a token).
    #[error("{0}")]
    Forbidden(String),
    /// A bound on concurrent work was reached (Consul's 429); retry later.
    #[error("{0}")]
    TooManyRequests(String),
    /// A domain error, with whose fault it is.
    #[error("{error}")]
    Domain {
        fault: Fault,
        error: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl<E: Blame> From<E> for Error {
    fn from(error: E) -> Self {
        Error::Domain {
            fault: error.fault(),
            error: Box::new(error),
        }
    }
}

/// Something on our side failed while doing `doing` (the body says what).
#[derive(Debug, thiserror::Error)]
#[error("{doing}: {source}")]
struct Ours {
    doing: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl Error {
    /// A failure of ours that no domain error covers (encoding an answer, a check
    /// of the data directory), kept with its cause.
    pub fn ours(
        doing: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Domain {
            fault: Fault::Ours,
            error: Box::new(Ours {
                doing,
                source: Box::new(source),
            }),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Decode(_) | Error::BadRequest(_) | Error::InvalidIndex | Error::InvalidWait => {
                StatusCode::BAD_REQUEST
            }
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::PermissionDenied | Error::AclNotFound | Error::Forbidden(_) => {
                StatusCode::FORBIDDEN
            }
            Error::AclDisabled => StatusCode::UNAUTHORIZED,
            Error::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::MissingParam(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Domain { fault, .. } => match fault {
                Fault::Caller => StatusCode::BAD_REQUEST,
                Fault::NotFound => StatusCode::NOT_FOUND,
                Fault::Conflict => StatusCode::CONFLICT,
                Fault::Forbidden => StatusCode::FORBIDDEN,
                Fault::Disabled => StatusCode::UNAUTHORIZED,
                Fault::Ours => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            let causes = match &self {
                Error::Domain { error, .. } => fault::chain(error.as_ref()),
                other => other.to_string(),
            };
            tracing::warn!(error = %causes, "request failed");
        }
        (
            status,
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            )],
            self.to_string(),
        )
            .into_response()
    }
}

/// The HTTP API could not bind its address: a startup failure, not a request's.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind the HTTP API to {addr}: {source} (is another agent or Consul running?)")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// A JSON body extractor whose rejections are Consul's 400 `Request decode failed`.
///
/// It does not insist on a JSON `Content-Type`: Consul does not, and clients such as
/// py-consul send none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| Error::BadRequest(e.body_text()))?;
        serde_json::from_slice(&body)
            .map(Json)
            .map_err(|e| Error::Decode(e.to_string()))
    }
}

// ───────────────────────────── blocking queries ─────────────────────────────

/// `?index=` and `?wait=` of a read, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryOptions {
    /// Block while the result's index is at most this; `None` or `0` returns at once.
    pub index: Option<Index>,
    /// How long to block at most, clamped to [`MAX_WAIT`].
    pub wait: Duration,
}

#[derive(Deserialize)]
struct RawQueryOptions {
    index: Option<String>,
    wait: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for QueryOptions {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        let raw: RawQueryOptions = serde_urlencoded_query(parts.uri.query().unwrap_or(""));
        let index = match raw.index.as_deref() {
            None | Some("") => None,
            Some(s) => Some(s.parse::<Index>().map_err(|_| Error::InvalidIndex)?),
        };
        let wait = match raw.wait.as_deref() {
            None | Some("") => DEFAULT_WAIT,
            Some(s) => crate::duration::parse(s).map_err(|_| Error::InvalidWait)?,
        };
        Ok(QueryOptions {
            index: index.filter(|i| *i > 0),
            wait: wait.min(MAX_WAIT),
        })
    }
}

/// Reads `index` and `wait` from a query string, ignoring every other parameter.
fn serde_urlencoded_query(q: &str) -> RawQueryOptions {
    let mut raw = RawQueryOptions {
        index: None,
        wait: None,
    };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "index" => raw.index = Some(v.to_owned()),
            "wait" => raw.wait = Some(v.to_owned()),
            _ => {}
        }
    }
    raw
}

/// Runs a blocking read: calls `read` (cheap, in-memory) and, while the result's index
/// is at most `opts.index` (Consul's rule), waits for `changes` to move or for the wait to pass (plus up
/// to wait/16 of jitter, as Consul does, so that many clients don't return at once).
/// On timeout the current result is returned, as Consul does.
pub async fn block_on<T>(
    opts: QueryOptions,
    mut changes: watch::Receiver<Index>,
    mut read: impl FnMut() -> (T, Index),
) -> (T, Index) {
    let jitter = if opts.wait.is_zero() {
        Duration::ZERO
    } else {
        let max = opts.wait / 16;
        Duration::from_millis(rand::random::<u64>() % (max.as_millis() as u64 + 1))
    };
    let deadline = tokio::time::Instant::now() + opts.wait + jitter;
    loop {
        changes.borrow_and_update();
        let (value, index) = read();
        match opts.index {
            Some(min) if index <= min => {}
            _ => return (value, index),
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            // Timed out, or the source is gone: answer with what we have.
            Ok(Err(_)) | Err(_) => return read(),
        }
    }
}

/// `X-Consul-Index` (never 0: Consul rewrites 0 to 1) and the other headers clients
/// expect on reads.
pub fn index_headers(index: Index) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        HeaderName::from_static("x-consul-index"),
        HeaderValue::from(index.max(1)),
    );
    h.insert(
        HeaderName::from_static("x-consul-knownleader"),
        HeaderValue::from_static("true"),
    );
    h.insert(
        HeaderName::from_static("x-consul-lastcontact"),
        HeaderValue::from_static("0"),
    );
    h
}

/// Adds `X-Cache: HIT|MISS` for agent-cache endpoints.
pub fn cache_header(headers: &mut HeaderMap, hit: bool) {
    headers.insert(
        HeaderName::from_static("x-cache"),
        HeaderValue::from_static(if hit { "HIT" } else { "MISS" }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn block_on_returns_at_once_without_index() {
        let (_tx, rx) = watch::channel(5);
        let opts = QueryOptions {
            index: None,
            wait: Duration::from_secs(60),
        };
        let (v, i) = block_on(opts, rx, || ("x", 5)).await;
        assert_eq!((v, i), ("x", 5));
    }

    #[tokio::test(start_paused = true)]
    async fn block_on_waits_for_a_change() {
        let (tx, rx) = watch::channel(5);
        let current = Arc::new(std::sync::atomic::AtomicU64::new(5));
        let c2 = current.clone();
        let opts = QueryOptions {
            index: Some(5),
            wait: Duration::from_secs(60),
        };
        let task = tokio::spawn(async move {
            block_on(opts, rx, move || {
                ((), c2.load(std::sync::atomic::Ordering::SeqCst))
            })
            .await
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!task.is_finished(), "returned before any change");
        current.store(6, std::sync::atomic::Ordering::SeqCst);
        tx.send_replace(6);
        let ((), i) = task.await.expect("join");
        assert_eq!(i, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn block_on_times_out_with_the_current_index() {
        let (_tx, rx) = watch::channel(5);
        let opts = QueryOptions {
            index: Some(5),
            wait: Duration::from_secs(2),
        };
        let start = tokio::time::Instant::now();
        let ((), i) = block_on(opts, rx, || ((), 5)).await;
        assert_eq!(i, 5);
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited <= Duration::from_millis(2200),
            "{waited:?}"
        );
    }
}
