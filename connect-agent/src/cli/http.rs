//! The HTTP client the CLI subcommands (and the explicit proxy) use to talk to a
//! running agent, with Consul's flags and environment variables.
//!
//! `https://` addresses verify the agent against `-ca-file` (the built-in CA's
//! bundle is `connect-agent ca roots -pem`); `-client-cert`/`-client-key` present a
//! certificate to an agent that runs with `--verify-incoming`. The token goes in
//! `X-Consul-Token`, from `-token`, `-token-file` or `CONNECT_HTTP_TOKEN`.

use anyhow::{Context, bail};
use clap::Args;
use serde::{Serialize, de::DeserializeOwned};

/// How to reach the agent; the same flags on every subcommand, as in `consul`.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// The agent's HTTP API address (`host:port`, or a URL with http:// or https://).
    #[arg(long, env = "CONNECT_HTTP_ADDR", default_value = "127.0.0.1:8500")]
    pub http_addr: String,

    /// ACL token sent as X-Consul-Token.
    #[arg(long, env = "CONNECT_HTTP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// File holding the ACL token (keeps it out of the process list).
    #[arg(long, env = "CONNECT_HTTP_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,

    /// PEM CA bundle that verifies an https:// agent.
    #[arg(long, env = "CONNECT_CACERT", value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,

    /// PEM client certificate for an agent that runs with --verify-incoming.
    #[arg(
        long,
        env = "CONNECT_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    pub client_cert: Option<std::path::PathBuf>,

    /// PEM private key of --client-cert.
    #[arg(
        long,
        env = "CONNECT_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    pub client_key: Option<std::path::PathBuf>,
}

impl Default for HttpArgs {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8500".to_owned(),
            token: None,
            token_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
        }
    }
}

impl HttpArgs {
    /// Plain HTTP to `addr` with no token.
    pub fn to(addr: impl Into<String>) -> Self {
        Self {
            http_addr: addr.into(),
            ..Self::default()
        }
    }
}

/// A thin JSON client for the agent's API.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// A non-2xx answer from the agent: its status and plain-text body.
#[derive(Debug, thiserror::Error)]
#[error("Unexpected response code: {status} ({body})")]
pub struct StatusError {
    pub status: u16,
    pub body: String,
}

impl Client {
    pub fn new(args: &HttpArgs) -> anyhow::Result<Self> {
        let base =
            if args.http_addr.starts_with("http://") || args.http_addr.starts_with("https://") {
                args.http_addr.trim_end_matches('/').to_owned()
            } else {
                format!("http://{}", args.http_addr)
            };
        let mut builder = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(15 * 60))
            .connect_timeout(std::time::Duration::from_secs(10))
            .use_rustls_tls()
            .https_only(base.starts_with("https://"));
        if let Some(path) = &args.ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read -ca-file {}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("-ca-file {} is not a PEM bundle", path.display()))?;
            if certs.is_empty() {
                bail!("-ca-file {} holds no certificate", path.display());
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
            let mut pem = std::fs::read(cert)
                .with_context(|| format!("cannot read -client-cert {}", cert.display()))?;
            pem.push(b'\n');
            pem.extend(
                std::fs::read(key)
                    .with_context(|| format!("cannot read -client-key {}", key.display()))?,
            );
            let identity = reqwest::Identity::from_pem(&pem).with_context(|| {
                format!(
                    "-client-cert {} / -client-key {} are not a PEM certificate and key",
                    cert.display(),
                    key.display()
                )
            })?;
            builder = builder.identity(identity);
        }
        let http = builder.build().context("cannot build the HTTP client")?;
        let token = match (&args.token, &args.token_file) {
            (Some(t), _) if !t.is_empty() => Some(t.clone()),
            (_, Some(path)) => {
                let t = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read -token-file {}", path.display()))?;
                Some(t.trim().to_owned()).filter(|t| !t.is_empty())
            }
            _ => None,
        };
        Ok(Self { base, token, http })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            rb = rb.header("X-Consul-Token", t);
        }
        rb
    }

    async fn send(
        &self,
        rb: reqwest::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<reqwest::Response> {
        let resp = rb
            .send()
            .await
            .with_context(|| format!("cannot reach the agent at {} ({what})", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(StatusError {
                status: status.as_u16(),
                body: body.trim().to_owned(),
            }
            .into());
        }
        Ok(resp)
    }

    /// GET a JSON document.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self
            .send(self.request(reqwest::Method::GET, path), path)
            .await?;
        resp.json()
            .await
            .with_context(|| format!("cannot decode the answer of GET {path}"))
    }

    /// GET a JSON document and the `X-Consul-Index` header.
    pub async fn get_with_index<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> anyhow::Result<(T, u64)> {
        let resp = self
            .send(self.request(reqwest::Method::GET, path), path)
            .await?;
        let index = resp
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let v = resp
            .json()
            .await
            .with_context(|| format!("cannot decode the answer of GET {path}"))?;
        Ok((v, index))
    }

    /// PUT/POST a JSON body and decode a JSON answer.
    pub async fn send_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let resp = self
            .send(self.request(method, path).json(body), path)
            .await?;
        resp.json()
            .await
            .with_context(|| format!("cannot decode the answer of {path}"))
    }

    /// PUT/POST a JSON body, ignoring the answer's body.
    pub async fn send_json_no_answer<B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> anyhow::Result<()> {
        self.send(self.request(method, path).json(body), path)
            .await?;
        Ok(())
    }

    /// PUT with no body.
    pub async fn put_empty(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.request(reqwest::Method::PUT, path), path)
            .await?;
        Ok(())
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.request(reqwest::Method::DELETE, path), path)
            .await?;
        Ok(())
    }
}

/// Fails with the agent's own message when a response was not a success.
pub fn status_of(err: &anyhow::Error) -> Option<u16> {
    err.downcast_ref::<StatusError>().map(|e| e.status)
}

/// Percent-encodes one path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Refuses an empty required argument with the usage-style message consul prints.
pub fn require(name: &str, value: &str) -> anyhow::Result<()> {
    if value.is_empty() {
        bail!("{name} must not be empty");
    }
    Ok(())
}
