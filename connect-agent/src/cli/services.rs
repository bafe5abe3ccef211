//! `connect-agent services {register,deregister,list}`: manage the local agent's
//! services through its HTTP API, with output like `consul services`.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::http::{Client, HttpArgs, enc};

/// `services` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServicesCommand {
    /// Register the services in a definition file (`{"service": {...}}`,
    /// `{"services": [...]}` or a bare service object).
    Register {
        #[command(flatten)]
        http: HttpArgs,
        /// The definition file (JSON).
        file: PathBuf,
    },
    /// Deregister a service by ID (its sidecar goes with it).
    Deregister {
        #[command(flatten)]
        http: HttpArgs,
        /// The service ID.
        id: String,
    },
    /// List the services registered on the agent.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub http: HttpArgs,
}

pub async fn run(cmd: ServicesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ServicesCommand::Register { http, file } => register(&http, &file).await,
        ServicesCommand::Deregister { http, id } => {
            let client = Client::new(&http)?;
            client
                .put_empty(&format!("/v1/agent/service/deregister/{}", enc(&id)))
                .await?;
            println!("Deregistered service: {id}");
            Ok(ExitCode::SUCCESS)
        }
        ServicesCommand::List(args) => list(&args.http).await,
    }
}

async fn register(http: &HttpArgs, file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let doc: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    let services = definitions(&doc)
        .with_context(|| format!("{} holds no service definition", file.display()))?;
    let client = Client::new(http)?;
    for svc in services {
        let name = field(svc, "name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        client
            .send_json_no_answer(reqwest::Method::PUT, "/v1/agent/service/register", svc)
            .await
            .with_context(|| format!("Error registering service {name:?}"))?;
        println!("Registered service: {name}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A key of a JSON object, matched case-insensitively (as the agent does).
fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// The service objects of a definition document.
fn definitions(doc: &Value) -> anyhow::Result<Vec<&Value>> {
    if let Some(s) = field(doc, "service").filter(|s| s.is_object()) {
        return Ok(vec![s]);
    }
    if let Some(list) = field(doc, "services") {
        let Some(arr) = list.as_array() else {
            bail!("\"services\" must be a list");
        };
        return Ok(arr.iter().collect());
    }
    if doc.is_object() {
        return Ok(vec![doc]);
    }
    bail!("expected a JSON object")
}

async fn list(http: &HttpArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(http)?;
    let services: BTreeMap<String, Value> = client.get("/v1/agent/services").await?;
    let rows: Vec<[String; 5]> = services
        .values()
        .map(|s| {
            let text = |k: &str| match s.get(k) {
                Some(Value::String(v)) => v.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            [
                text("ID"),
                text("Service"),
                text("Address"),
                text("Port"),
                match text("Kind") {
                    k if k.is_empty() => "typical".to_owned(),
                    k => k,
                },
            ]
        })
        .collect();
    let header = ["ID", "Service", "Address", "Port", "Kind"].map(str::to_owned);
    let mut widths = [0usize; 5];
    for row in std::iter::once(&header).chain(rows.iter()) {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    for row in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn definition_documents() {
        let wrapped = json!({"service": {"name": "web"}});
        assert_eq!(
            definitions(&wrapped).expect("ok"),
            vec![&json!({"name": "web"})]
        );
        let many = json!({"Services": [{"name": "a"}, {"name": "b"}]});
        assert_eq!(definitions(&many).expect("ok").len(), 2);
        let bare = json!({"Name": "web"});
        assert_eq!(definitions(&bare).expect("ok"), vec![&bare]);
        assert!(definitions(&json!([1])).is_err());
        assert!(definitions(&json!({"services": 1})).is_err());
    }
}
